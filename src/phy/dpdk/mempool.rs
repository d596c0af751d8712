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
    /// The mempool flags it was created with.
    flags: u32,
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
        eal: &Eal,
        name: &str,
        mbufs: u32,
        cache_size: u32,
        data_room: u16,
        socket_id: i32,
    ) -> Result<Arc<Mempool>, PhyError> {
        Mempool::create(eal, name, mbufs, cache_size, data_room, socket_id, false)
    }

    /// [`Mempool::new`] with the buffers packed back to back in one
    /// virtually contiguous chunk (`RTE_MEMPOOL_F_NO_IOVA_CONTIG`), which is
    /// what net_af_xdp assumes: it registers the pool's memory as its UMEM,
    /// from the first chunk's page for `buffers x object size` bytes. A
    /// default pool does not fit that without hugepages (`--no-huge`): each
    /// buffer must then not cross a 4 KiB page, so one 2.4 KiB buffer takes
    /// a page and the last ~40 % lie past the UMEM's end. The kernel drops
    /// such a buffer from the fill or tx ring without a completion, so it
    /// never comes back: the pool drains until rx and tx stop. Only for
    /// PMDs that do not DMA into buffers by IOVA (a buffer may cross a page).
    pub fn new_packed(
        eal: &Eal,
        name: &str,
        mbufs: u32,
        cache_size: u32,
        data_room: u16,
        socket_id: i32,
    ) -> Result<Arc<Mempool>, PhyError> {
        Mempool::create(eal, name, mbufs, cache_size, data_room, socket_id, true)
    }

    fn create(
        _eal: &Eal,
        name: &str,
        mbufs: u32,
        cache_size: u32,
        data_room: u16,
        socket_id: i32,
        packed: bool,
    ) -> Result<Arc<Mempool>, PhyError> {
        if data_room <= MBUF_HEADROOM {
            return Err(PhyError::Device(format!(
                "mbuf data room {data_room} leaves no space after the {MBUF_HEADROOM}-byte headroom"
            )));
        }
        let c_name = CString::new(name)
            .map_err(|_| PhyError::Device(format!("mempool name {name:?} contains a NUL byte")))?;
        let raw = if packed {
            // SAFETY: EAL is initialised; c_name is NUL-terminated and copied.
            unsafe { create_packed_pktmbuf_pool(&c_name, mbufs, cache_size, data_room, socket_id) }
        } else {
            // SAFETY: EAL is initialised (an Eal exists); c_name is
            // NUL-terminated and copied by DPDK.
            unsafe {
                sys::rte_pktmbuf_pool_create(
                    c_name.as_ptr(),
                    mbufs,
                    cache_size,
                    0,
                    data_room,
                    socket_id,
                )
            }
        };
        let raw = NonNull::new(raw).ok_or_else(|| {
            PhyError::Device(format!(
                "rte_pktmbuf_pool_create({name}, {mbufs} mbufs{}): {}",
                if packed { ", packed" } else { "" },
                rte_strerror(rte_errno())
            ))
        })?;
        Ok(Arc::new(Mempool {
            raw,
            data_room,
            capacity: mbufs,
            flags: if packed {
                RTE_MEMPOOL_F_NO_IOVA_CONTIG
            } else {
                0
            },
        }))
    }

    /// Where the buffers lie: each memory chunk's address and length, and
    /// each buffer's object address (its mempool header included) with the
    /// full object size.
    pub fn layout(&self) -> PoolLayout {
        let mut layout = PoolLayout::default();
        // SAFETY: the pool is alive and populated; the callbacks only write
        // into `layout`, which outlives both iterations.
        unsafe {
            let arg = (&mut layout as *mut PoolLayout).cast();
            sys::rte_mempool_mem_iter(self.raw.as_ptr(), Some(collect_chunk), arg);
            sys::rte_mempool_obj_iter(self.raw.as_ptr(), Some(collect_object), arg);
        }
        // The sizes rte_mempool_create_empty computed for this pool: the
        // same function on the same element size and flags.
        let mut sizes = sys::rte_mempool_objsz::default();
        // SAFETY: sizes is a writable rte_mempool_objsz.
        let total =
            unsafe { sys::rte_mempool_calc_obj_size(self.elt_size(), self.flags, &mut sizes) };
        layout.object_size = total as usize;
        layout.header_size = sizes.header_size as usize;
        layout
    }

    /// The mempool element of one buffer: the mbuf and its data room.
    fn elt_size(&self) -> u32 {
        std::mem::size_of::<sys::rte_mbuf>() as u32 + u32::from(self.data_room)
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

/// Where a pool's buffers lie ([`Mempool::layout`]).
#[derive(Debug, Default, Clone)]
pub struct PoolLayout {
    /// (address, length) of each memory chunk, in the pool's order.
    pub chunks: Vec<(usize, usize)>,
    /// Address of each object's element (the mbuf), in population order.
    pub objects: Vec<usize>,
    /// Header + element + trailer of one object.
    pub object_size: usize,
    /// The mempool header in front of each element.
    pub header_size: usize,
}

impl PoolLayout {
    /// How many buffers lie (partly) outside the UMEM net_af_xdp (DPDK
    /// 22.11, unaligned-chunk mode) registers over this pool: from the
    /// first chunk's address rounded down to a `page` boundary, `objects x
    /// object_size` bytes plus that rounding. Such a buffer is rejected by
    /// the kernel, and the PMD never gets it back.
    pub fn outside_af_xdp_umem(&self, page: usize) -> usize {
        let Some(&(first, _)) = self.chunks.first() else {
            return self.objects.len();
        };
        let base = first & !(page - 1);
        let end = base + (first - base) + self.objects.len() * self.object_size;
        self.objects
            .iter()
            .filter(|&&obj| {
                let start = obj - self.header_size;
                start < base || start + self.object_size > end
            })
            .count()
    }
}

unsafe extern "C" fn collect_chunk(
    _mp: *mut sys::rte_mempool,
    arg: *mut std::os::raw::c_void,
    memhdr: *mut sys::rte_mempool_memhdr,
    _idx: std::os::raw::c_uint,
) {
    // SAFETY: arg is the &mut PoolLayout Mempool::layout passed; memhdr is
    // a valid chunk header of the pool during the callback.
    unsafe {
        let layout = &mut *arg.cast::<PoolLayout>();
        layout.chunks.push(((*memhdr).addr as usize, (*memhdr).len));
    }
}

unsafe extern "C" fn collect_object(
    _mp: *mut sys::rte_mempool,
    arg: *mut std::os::raw::c_void,
    obj: *mut std::os::raw::c_void,
    _idx: std::os::raw::c_uint,
) {
    // SAFETY: arg is the &mut PoolLayout Mempool::layout passed.
    let layout = unsafe { &mut *arg.cast::<PoolLayout>() };
    layout.objects.push(obj as usize);
}

/// rte_mempool.h: objects need not be IOVA-contiguous (nor stay inside a page).
const RTE_MEMPOOL_F_NO_IOVA_CONTIG: u32 = 0x0020;
/// DPDK's default mbuf pool handler (`RTE_MBUF_DEFAULT_MEMPOOL_OPS`), what
/// `rte_pktmbuf_pool_create` uses unless EAL got `--mbuf-pool-ops-name`.
const DEFAULT_MEMPOOL_OPS: &std::ffi::CStr = c"ring_mp_mc";

/// `rte_pktmbuf_pool_create` (DPDK 22.11's `rte_pktmbuf_pool_create_by_ops`
/// with the default ops) with `RTE_MEMPOOL_F_NO_IOVA_CONTIG`, so the
/// objects are laid out back to back, ignoring page boundaries.
///
/// # Safety
/// EAL must be initialised.
unsafe fn create_packed_pktmbuf_pool(
    name: &CString,
    mbufs: u32,
    cache_size: u32,
    data_room: u16,
    socket_id: i32,
) -> *mut sys::rte_mempool {
    /// `struct rte_pktmbuf_pool_private` (rte_mbuf.h).
    #[repr(C)]
    struct PktmbufPoolPrivate {
        mbuf_data_room_size: u16,
        mbuf_priv_size: u16,
        flags: u32,
    }
    let mut private = PktmbufPoolPrivate {
        mbuf_data_room_size: data_room,
        mbuf_priv_size: 0,
        flags: 0,
    };
    let elt_size = std::mem::size_of::<sys::rte_mbuf>() as u32 + u32::from(data_room);
    // SAFETY: (whole body) EAL is initialised (the caller's contract); the
    // pool pointer is checked before use and freed on every failure path;
    // `private` outlives rte_pktmbuf_pool_init, which copies it.
    unsafe {
        let mp = sys::rte_mempool_create_empty(
            name.as_ptr(),
            mbufs,
            elt_size,
            cache_size,
            std::mem::size_of::<PktmbufPoolPrivate>() as u32,
            socket_id,
            RTE_MEMPOOL_F_NO_IOVA_CONTIG,
        );
        if mp.is_null() {
            return mp;
        }
        if sys::rte_mempool_set_ops_byname(mp, DEFAULT_MEMPOOL_OPS.as_ptr(), std::ptr::null_mut())
            != 0
        {
            sys::rte_mempool_free(mp);
            return std::ptr::null_mut();
        }
        sys::rte_pktmbuf_pool_init(mp, (&mut private as *mut PktmbufPoolPrivate).cast());
        if sys::rte_mempool_populate_default(mp) < 0 {
            sys::rte_mempool_free(mp);
            return std::ptr::null_mut();
        }
        sys::rte_mempool_obj_iter(mp, Some(sys::rte_pktmbuf_init), std::ptr::null_mut());
        mp
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

    /// A layout as `rte_mempool_populate_*` makes it: `count` objects of
    /// `size` bytes (header `header`) from `start`, `stride` apart.
    fn layout(start: usize, count: usize, size: usize, stride: usize, header: usize) -> PoolLayout {
        PoolLayout {
            chunks: vec![(start, count * stride)],
            objects: (0..count).map(|i| start + i * stride + header).collect(),
            object_size: size,
            header_size: header,
        }
    }

    #[test]
    fn packed_buffers_all_lie_in_the_af_xdp_umem() {
        // A packed pool (NO_IOVA_CONTIG): objects back to back from an
        // address that is not page-aligned.
        let packed = layout(0x7f00_0000_0040, 4096, 2432, 2432, 64);
        assert_eq!(packed.outside_af_xdp_umem(4096), 0);
    }

    #[test]
    fn buffers_one_per_page_fall_off_the_af_xdp_umem() {
        // What a default pool gets with --no-huge: a 2432-byte object may
        // not cross a 4 KiB page, so each takes one. The UMEM covers
        // 4096 x 2432 bytes: objects past ~59 % of the pages are outside.
        let per_page = layout(0x7f00_0000_0000, 4096, 2432, 4096, 64);
        let outside = per_page.outside_af_xdp_umem(4096);
        let covered = (4096 * 2432 - 2432) / 4096 + 1;
        assert_eq!(outside, 4096 - covered);
        assert!(outside > 1600, "{outside}");
        // With 2 MiB pages the gaps are small, but the last buffers still
        // fall outside.
        let objs_per_page = (2 << 20) / 2432;
        let mut huge = PoolLayout {
            chunks: vec![(0x7f00_0000_0000, 5 << 21)],
            objects: Vec::new(),
            object_size: 2432,
            header_size: 64,
        };
        for i in 0..4096 {
            let page = i / objs_per_page;
            huge.objects
                .push(0x7f00_0000_0000 + page * (2 << 20) + (i % objs_per_page) * 2432 + 64);
        }
        assert!(huge.outside_af_xdp_umem(4096) > 0);
        // No chunk at all: nothing is covered.
        let empty = PoolLayout {
            objects: vec![64],
            ..PoolLayout::default()
        };
        assert_eq!(empty.outside_af_xdp_umem(4096), 1);
    }
}
