//! Pools of packet buffers ([`Mempool`]).

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;

use dpdk_sys as sys;

use super::{rte_errno, rte_strerror, Eal, ETHER_OVERHEAD};
use crate::phy::PhyError;

/// The DPDK pktmbuf data room that fits a standard 1500-byte MTU frame.
pub const DEFAULT_MBUF_DATA_ROOM: u16 = sys::SHIM_MBUF_DEFAULT_BUF_SIZE as u16;
/// The headroom DPDK reserves at the front of every mbuf.
pub const MBUF_HEADROOM: u16 = sys::SHIM_PKTMBUF_HEADROOM as u16;

/// The data room (headroom included) of an mbuf that holds one whole frame
/// of an `mtu`-byte IP packet (Ethernet header, a VLAN tag and the CRC
/// counted), rounded up to 1 KiB; never below [`DEFAULT_MBUF_DATA_ROOM`].
/// 9216 + 128 for MTU 9000.
pub fn data_room_for_mtu(mtu: usize) -> u16 {
    data_room_for_frame(mtu + ETHER_OVERHEAD + 4)
}

/// The data room of an mbuf that holds a `frame`-byte frame after the
/// headroom, rounded up to 1 KiB (at most 65535).
pub fn data_room_for_frame(frame: usize) -> u16 {
    let room = usize::from(MBUF_HEADROOM) + frame.div_ceil(1024) * 1024;
    room.clamp(usize::from(DEFAULT_MBUF_DATA_ROOM), usize::from(u16::MAX)) as u16
}

/// A pool of packet buffers (`rte_pktmbuf_pool_create`).
#[derive(Debug)]
pub struct Mempool {
    raw: NonNull<sys::rte_mempool>,
    data_room: u16,
    capacity: u32,
}

// SAFETY: the pool is created with the default multi-producer/multi-consumer
// ring handler, so allocating and freeing from any thread is safe; the
// pointer itself is never written after creation.
unsafe impl Send for Mempool {}
// SAFETY: as for Send; &Mempool only allows thread-safe DPDK calls.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// Creates a pool of `mbufs` buffers, each with `data_room` bytes
    /// (headroom included; [`DEFAULT_MBUF_DATA_ROOM`] fits a 1500-byte MTU),
    /// with a per-lcore cache of `cache_size`. `name` must be unique in the
    /// process; `socket_id` -1 means any NUMA node.
    pub fn new(
        _eal: &Eal,
        name: &str,
        mbufs: u32,
        cache_size: u32,
        data_room: u16,
        socket_id: i32,
    ) -> Result<Arc<Mempool>, PhyError> {
        if data_room <= MBUF_HEADROOM {
            return Err(PhyError::Device(format!(
                "mbuf data room {data_room} leaves no space after the {MBUF_HEADROOM}-byte headroom"
            )));
        }
        let c_name = CString::new(name)
            .map_err(|_| PhyError::Device(format!("mempool name {name:?} contains a NUL byte")))?;
        // SAFETY: EAL is initialised (an Eal exists); c_name is NUL-terminated
        // and copied by DPDK.
        let raw = unsafe {
            sys::rte_pktmbuf_pool_create(
                c_name.as_ptr(),
                mbufs,
                cache_size,
                0,
                data_room,
                socket_id,
            )
        };
        let raw = NonNull::new(raw).ok_or_else(|| {
            PhyError::Device(format!(
                "rte_pktmbuf_pool_create({name}, {mbufs} mbufs): {}",
                rte_strerror(rte_errno())
            ))
        })?;
        Ok(Arc::new(Mempool {
            raw,
            data_room,
            capacity: mbufs,
        }))
    }

    /// Bytes per buffer, headroom included.
    pub fn data_room(&self) -> u16 {
        self.data_room
    }

    /// Buffers in the pool.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Bytes of frame one buffer can hold after the headroom.
    pub fn frame_capacity(&self) -> usize {
        usize::from(self.data_room - MBUF_HEADROOM)
    }

    /// Buffers currently free in the pool (per-lcore caches included).
    pub fn available(&self) -> u32 {
        // SAFETY: the pool is alive for &self; the count is only a snapshot.
        unsafe { sys::rte_mempool_avail_count(self.raw.as_ptr()) }
    }

    /// Buffers currently allocated (held by PMD rings, queues or in flight).
    pub fn in_use(&self) -> u32 {
        // SAFETY: as for `available`.
        unsafe { sys::rte_mempool_in_use_count(self.raw.as_ptr()) }
    }

    pub(super) fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.raw.as_ptr()
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: every user of the pool (ports, queues) holds an Arc to it, so
        // none is left; mbufs they held were returned before they dropped it.
        unsafe { sys::rte_mempool_free(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rooms_fit_their_frames() {
        assert_eq!(data_room_for_mtu(1500), DEFAULT_MBUF_DATA_ROOM);
        let jumbo = data_room_for_mtu(9000);
        assert!(usize::from(jumbo - MBUF_HEADROOM) >= 9000 + 14 + 4 + 4);
        assert_eq!(jumbo, MBUF_HEADROOM + 9216);
        assert_eq!(data_room_for_frame(1 << 20), u16::MAX);
    }
}
