//! One rx/tx queue pair of a started port ([`DpdkQueue`]), the packet
//! [`Device`] a worker polls.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use dpdk_sys as sys;

use super::eal::register_thread_for_life;
use super::port::PortInner;
use super::{lcore_id, Mempool, ETHER_HDR_LEN, MAX_IPV4_PACKET};
use crate::phy::{Device, DeviceCaps, PhyError, RxMeta, TxOffload};

/// Frames asked for in one `rte_eth_rx_burst` call.
const RX_BURST: usize = 64;
/// Frames queued by `tx_frame` before a `tx_flush` is forced.
const TX_BATCH: usize = 64;

/// One rx/tx queue pair of a started port, owned by one worker thread.
#[derive(Debug)]
pub struct DpdkQueue {
    port: Arc<PortInner>,
    queue_id: u16,
    tx_pool: Arc<Mempool>,
    caps: DeviceCaps,
    rx_mbufs: [*mut sys::rte_mbuf; RX_BURST],
    /// What the burst's call filled in for each of `rx_mbufs`.
    rx_views: [sys::shim_rx_view; RX_BURST],
    /// Where a chained frame (jumbo over small buffers, LRO) is copied into
    /// one piece before it is lent; grows to the largest such frame.
    rx_chained: Vec<u8>,
    /// Frames that arrived chained and were copied into `rx_chained`.
    rx_chained_frames: u64,
    /// The largest TSO segment plus headers the PMD takes: the IP MTU for
    /// net_tap, whose GSO (DPDK 22.11) counts the Ethernet header against
    /// it and drops the frame otherwise; None for PMDs that follow the
    /// ethdev rule (segment payload ≤ MSS).
    tso_frame_cap: Option<usize>,
    /// Frames written by `tx_frame`, not yet taken by the PMD.
    tx_pending: Vec<*mut sys::rte_mbuf>,
    /// How many of `tx_pending` (a prefix) already went through tx_prepare.
    tx_prepared: usize,
    tx_dropped: u64,
    /// The PMD fills in the checksums of frames flagged in `ol_flags`;
    /// without it a trusted port leaves them out (`caps.tx_checksum` is
    /// then ours alone).
    pmd_tx_checksum: bool,
    /// `ChecksumMode::Trusted`: every received frame counts as verified,
    /// unless the PMD's rx offload found it bad.
    trusted_rx: bool,
}

// SAFETY: the queue pair is handed out once (Port::queue), so moving the
// DpdkQueue moves the only user of that rx/tx queue to another thread; the
// mbufs it holds are owned by it alone. It is not Sync: bursts on one queue
// must not run concurrently.
unsafe impl Send for DpdkQueue {}

/// Frees a burst of received mbufs when dropped, so a panicking callback
/// leaks nothing.
struct RxBurstGuard<'a> {
    mbufs: &'a mut [*mut sys::rte_mbuf],
}

impl Drop for RxBurstGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: each pointer is a received mbuf owned by this burst and no
        // slice into it outlives the callback that got it.
        unsafe { sys::rte_pktmbuf_free_bulk(self.mbufs.as_mut_ptr(), self.mbufs.len() as u32) }
    }
}

impl DpdkQueue {
    /// The queue pair `queue_id` of `port`, already marked taken by
    /// [`Port::queue_with_tx_pool`](super::Port::queue_with_tx_pool).
    pub(super) fn new(port: Arc<PortInner>, queue_id: u16, tx_pool: Arc<Mempool>) -> DpdkQueue {
        let offloads = port.offloads;
        let tso_frame_cap = (port.driver == "net_tap").then_some(port.mtu);
        let frame_limit = if offloads.tso {
            MAX_IPV4_PACKET + ETHER_HDR_LEN
        } else {
            port.mtu + ETHER_HDR_LEN
        };
        // A trusted port tells the stack it checks and fills in checksums
        // itself: the stack then neither verifies nor computes them, and
        // the queue does what the PMD offers and skips the rest.
        let caps = DeviceCaps {
            mac: port.mac,
            mtu: port.mtu,
            rx_checksum: offloads.rx_checksum || offloads.trusted,
            tx_checksum: offloads.tx_checksum || offloads.trusted,
            tso: offloads.tso,
            max_tx_frame: frame_limit.min(tx_pool.frame_capacity()),
        };
        DpdkQueue {
            port,
            queue_id,
            tx_pool,
            caps,
            rx_mbufs: [std::ptr::null_mut(); RX_BURST],
            rx_views: [sys::shim_rx_view::default(); RX_BURST],
            rx_chained: Vec::new(),
            rx_chained_frames: 0,
            tso_frame_cap,
            tx_pending: Vec::with_capacity(TX_BATCH),
            tx_prepared: 0,
            tx_dropped: 0,
            pmd_tx_checksum: offloads.tx_checksum,
            trusted_rx: offloads.trusted,
        }
    }

    pub fn port_id(&self) -> u16 {
        self.port.port_id
    }

    pub fn queue_id(&self) -> u16 {
        self.queue_id
    }

    /// Frames dropped because the PMD rejected them in `rte_eth_tx_prepare`
    /// (bad offload metadata).
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped
    }

    /// Received frames that came chained over several mbufs (a frame
    /// longer than one rx buffer, or an LRO aggregate) and were copied into
    /// one piece before being lent: one copy more than a frame in one mbuf.
    pub fn rx_chained_frames(&self) -> u64 {
        self.rx_chained_frames
    }

    /// Frames written but not yet taken by the PMD.
    pub fn tx_pending(&self) -> usize {
        self.tx_pending.len()
    }

    fn check_offload(&self, len: usize, offload: &TxOffload) -> Result<(), PhyError> {
        let wants_checksum = offload.ipv4_checksum || offload.tcp_checksum;
        if (wants_checksum && !self.caps.tx_checksum)
            || (offload.tso_segment_size != 0 && !self.caps.tso)
        {
            return Err(PhyError::Device(format!(
                "tx offload {offload:?} not enabled on port {}",
                self.port.port_id
            )));
        }
        let headers =
            usize::from(offload.l2_len) + usize::from(offload.l3_len) + usize::from(offload.l4_len);
        if (wants_checksum || offload.tso_segment_size != 0)
            && (offload.l2_len == 0 || offload.l3_len == 0 || headers > len)
        {
            return Err(PhyError::Device(format!(
                "tx offload header lengths {offload:?} do not fit a {len}-byte frame"
            )));
        }
        Ok(())
    }

    /// Runs tx_prepare on the pending frames not yet prepared, dropping
    /// (and counting) the ones the PMD rejects.
    fn prepare_pending(&mut self) {
        while self.tx_prepared < self.tx_pending.len() {
            let rest = &mut self.tx_pending[self.tx_prepared..];
            // SAFETY: rest holds valid mbufs owned by this queue; the port and
            // queue are started and only this thread uses the queue.
            let prepared = usize::from(unsafe {
                sys::shim_rte_eth_tx_prepare(
                    self.port.port_id,
                    self.queue_id,
                    rest.as_mut_ptr(),
                    rest.len() as u16,
                )
            });
            self.tx_prepared += prepared;
            if self.tx_prepared < self.tx_pending.len() {
                let rejected = self.tx_pending.remove(self.tx_prepared);
                // SAFETY: the rejected mbuf is owned by this queue and was just
                // removed from the pending list.
                unsafe { sys::shim_rte_pktmbuf_free(rejected) };
                self.tx_dropped += 1;
            }
        }
    }
}

/// Asks the cache for the first segment of a received frame (a hint: the
/// lines come while the frame before it is processed).
fn prefetch_frame(view: &sys::shim_rx_view) {
    // SAFETY: a prefetch reads nothing into the program and cannot fault;
    // `data` and `data_len` describe the first segment of an mbuf the
    // burst just returned, which stays allocated until the burst's guard
    // frees it.
    unsafe { sys::shim_prefetch_lines(view.data, u32::from(view.data_len)) };
}

/// What a trusted port says of a frame it received: good (the link cannot
/// have corrupted it, and its sender may have left the checksums out),
/// unless a PMD with rx offload found it bad.
fn trusted_rx_meta(ol_flags: u64) -> RxMeta {
    // DPDK's two-bit fields: GOOD, BAD (the other bit alone), NONE (both:
    // "not computed, data valid"), UNKNOWN (neither).
    let ip_bad = sys::SHIM_MBUF_F_RX_IP_CKSUM_MASK & !sys::SHIM_MBUF_F_RX_IP_CKSUM_GOOD;
    let l4_bad = sys::SHIM_MBUF_F_RX_L4_CKSUM_MASK & !sys::SHIM_MBUF_F_RX_L4_CKSUM_GOOD;
    RxMeta {
        ipv4_checksum_good: ol_flags & sys::SHIM_MBUF_F_RX_IP_CKSUM_MASK != ip_bad,
        l4_checksum_good: ol_flags & sys::SHIM_MBUF_F_RX_L4_CKSUM_MASK != l4_bad,
    }
}

fn rx_meta(ol_flags: u64) -> RxMeta {
    RxMeta {
        ipv4_checksum_good: ol_flags & sys::SHIM_MBUF_F_RX_IP_CKSUM_MASK
            == sys::SHIM_MBUF_F_RX_IP_CKSUM_GOOD,
        l4_checksum_good: ol_flags & sys::SHIM_MBUF_F_RX_L4_CKSUM_MASK
            == sys::SHIM_MBUF_F_RX_L4_CKSUM_GOOD,
    }
}

/// The mbuf `ol_flags` and whether the TSO fields apply for `offload`.
fn tx_ol_flags(len: usize, offload: &TxOffload) -> (u64, u16) {
    let headers =
        usize::from(offload.l2_len) + usize::from(offload.l3_len) + usize::from(offload.l4_len);
    let payload = len.saturating_sub(headers);
    // A frame that already fits one segment goes out with checksum offload
    // only: some NICs reject TSO requests that produce a single segment.
    let tso = offload.tso_segment_size != 0 && payload > usize::from(offload.tso_segment_size);
    let mut flags = 0;
    if offload.ipv4_checksum {
        flags |= sys::SHIM_MBUF_F_TX_IP_CKSUM;
    }
    if tso {
        flags |= sys::SHIM_MBUF_F_TX_TCP_SEG;
    } else if offload.tcp_checksum || offload.tso_segment_size != 0 {
        flags |= sys::SHIM_MBUF_F_TX_TCP_CKSUM;
    }
    if flags != 0 {
        flags |= sys::SHIM_MBUF_F_TX_IPV4;
    }
    (flags, if tso { offload.tso_segment_size } else { 0 })
}

impl Device for DpdkQueue {
    fn caps(&self) -> DeviceCaps {
        self.caps
    }

    fn rx_burst(&mut self, max: usize, on_frame: &mut dyn FnMut(&[u8], RxMeta)) -> usize {
        // The polling thread may not be the one that connected (a login
        // thread): give it an lcore id so its mbuf allocs and frees use a
        // per-lcore cache instead of the pool's shared ring. One
        // thread-local read when already registered.
        if lcore_id() == u32::MAX {
            let _ = register_thread_for_life();
        }
        let trusted_rx = self.trusted_rx;
        let meta = |ol_flags: u64| {
            if trusted_rx {
                trusted_rx_meta(ol_flags)
            } else {
                rx_meta(ol_flags)
            }
        };
        let mut received = 0;
        while received < max {
            let want = (max - received).min(RX_BURST);
            // SAFETY: rx_mbufs and rx_views have room for `want` entries
            // each (want <= RX_BURST); the queue is started and owned by
            // this thread. The call fills a view for each mbuf it returns.
            let got = usize::from(unsafe {
                sys::shim_rte_eth_rx_burst_views(
                    self.port.port_id,
                    self.queue_id,
                    self.rx_mbufs.as_mut_ptr(),
                    want as u16,
                    self.rx_views.as_mut_ptr(),
                )
            });
            let guard = RxBurstGuard {
                mbufs: &mut self.rx_mbufs[..got],
            };
            let views = &self.rx_views[..got];
            // A frame the port wrote (DMA, or memif's peer on another
            // core) is not in this core's cache: fetch the next frame's
            // lines while this one is parsed and placed, so its checksum
            // and copy do not stall on each line in turn.
            if let Some(first) = views.first() {
                prefetch_frame(first);
            }
            for (i, (&mbuf, view)) in guard.mbufs.iter().zip(views).enumerate() {
                if let Some(next) = views.get(i + 1) {
                    prefetch_frame(next);
                }
                let (segments, data_len, pkt_len, ol_flags) =
                    (view.nb_segs, view.data_len, view.pkt_len, view.ol_flags);
                let data = view.data as *const u8;
                if segments != 1 {
                    // The stack wants a frame in one piece: copy the chain.
                    let len = pkt_len as usize;
                    if self.rx_chained.len() < len {
                        self.rx_chained.resize(len, 0);
                    }
                    // SAFETY: mbuf is a valid received chain of pkt_len
                    // bytes; rx_chained has room for len bytes, which
                    // rte_pktmbuf_read copies there (the chain spans
                    // segments, so it never returns a pointer into the
                    // first one) and nothing else references.
                    let read = unsafe {
                        sys::shim_rte_pktmbuf_read(
                            mbuf,
                            0,
                            pkt_len,
                            self.rx_chained.as_mut_ptr().cast(),
                        )
                    } as *const u8;
                    if read.is_null() {
                        continue;
                    }
                    // SAFETY: read points at len initialised bytes: into
                    // rx_chained, or into the mbuf's first segment (freed
                    // only after the callback, by the guard).
                    let frame = unsafe { std::slice::from_raw_parts(read, len) };
                    self.rx_chained_frames += 1;
                    on_frame(frame, meta(ol_flags));
                    continue;
                }
                // SAFETY: the first segment holds data_len initialised bytes
                // at data; the slice lives only during the callback and the
                // mbuf is freed after it (by the guard).
                let frame = unsafe { std::slice::from_raw_parts(data, usize::from(data_len)) };
                on_frame(frame, meta(ol_flags));
            }
            drop(guard);
            received += got;
            if got < want {
                break;
            }
        }
        received
    }

    fn tx_frame(
        &mut self,
        len: usize,
        offload: TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), PhyError> {
        if len > self.caps.max_tx_frame {
            return Err(PhyError::FrameTooLong {
                len,
                max: self.caps.max_tx_frame,
            });
        }
        self.check_offload(len, &offload)?;
        if self.tx_pending.len() == TX_BATCH && self.tx_flush() == TX_BATCH {
            return Err(PhyError::NoBuffer);
        }
        // SAFETY: the pool is alive (held by self).
        let mbuf = unsafe { sys::shim_rte_pktmbuf_alloc(self.tx_pool.as_ptr()) };
        if mbuf.is_null() {
            return Err(PhyError::NoBuffer);
        }
        // SAFETY: mbuf is a fresh, reset mbuf owned here; len fits its
        // tailroom (max_tx_frame <= frame_capacity), so append succeeds.
        let data = unsafe { sys::shim_rte_pktmbuf_append(mbuf, len as u16) } as *mut u8;
        debug_assert!(!data.is_null());
        // SAFETY: data points at len writable bytes inside the mbuf (pool
        // memory, initialised when the pool was created and by earlier
        // frames), which no one else references. They are not zeroed: the
        // `Device::tx_frame` contract has `fill` write every byte, which
        // tests/net_iface.rs checks for the stack's frames.
        let frame = unsafe { std::slice::from_raw_parts_mut(data, len) };
        fill(frame);
        let (ol_flags, mut tso_segsz) = if self.pmd_tx_checksum {
            tx_ol_flags(len, &offload)
        } else {
            // Trusted, no offload (check_offload let no TSO through): the
            // frame leaves as the stack wrote it, pseudo-header sum only.
            (0, 0)
        };
        if let (Some(cap), true) = (self.tso_frame_cap, tso_segsz != 0) {
            // Smaller segments are always valid TCP: the sequence numbers
            // count bytes, not segments.
            let headers = usize::from(offload.l2_len)
                + usize::from(offload.l3_len)
                + usize::from(offload.l4_len);
            tso_segsz = tso_segsz.min(cap.saturating_sub(headers).max(1) as u16);
        }
        if ol_flags != 0 {
            // SAFETY: mbuf is owned here and not yet visible to the PMD.
            unsafe {
                sys::shim_rte_mbuf_set_ol_flags(mbuf, ol_flags);
                sys::shim_rte_mbuf_set_tx_offload(
                    mbuf,
                    offload.l2_len,
                    offload.l3_len,
                    offload.l4_len,
                    tso_segsz,
                );
            }
        } else if self.tx_prepared == self.tx_pending.len() {
            // Nothing for tx_prepare to fix in a frame without offloads.
            self.tx_prepared += 1;
        }
        self.tx_pending.push(mbuf);
        Ok(())
    }

    fn tx_flush(&mut self) -> usize {
        if self.tx_pending.is_empty() {
            return 0;
        }
        self.prepare_pending();
        let count = self.tx_pending.len() as u16;
        // SAFETY: tx_pending holds valid, prepared mbufs owned by this queue;
        // the PMD takes ownership of the first `sent` of them.
        let sent = usize::from(unsafe {
            sys::shim_rte_eth_tx_burst(
                self.port.port_id,
                self.queue_id,
                self.tx_pending.as_mut_ptr(),
                count,
            )
        });
        // What the PMD did not take stays queued (still prepared) for the
        // next flush: backpressure instead of silent loss.
        self.tx_pending.drain(..sent);
        self.tx_prepared -= sent;
        self.tx_pending.len()
    }
}

impl Drop for DpdkQueue {
    fn drop(&mut self) {
        if !self.tx_pending.is_empty() {
            // SAFETY: the pending mbufs are owned by this queue and never
            // reached the PMD.
            unsafe {
                sys::rte_pktmbuf_free_bulk(
                    self.tx_pending.as_mut_ptr(),
                    self.tx_pending.len() as u32,
                )
            }
        }
        if let Some(taken) = self.port.queue_taken.get(usize::from(self.queue_id)) {
            taken.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_meta_reads_good_checksums_only() {
        assert_eq!(rx_meta(0), RxMeta::default());
        let good = sys::SHIM_MBUF_F_RX_IP_CKSUM_GOOD | sys::SHIM_MBUF_F_RX_L4_CKSUM_GOOD;
        assert_eq!(
            rx_meta(good),
            RxMeta {
                ipv4_checksum_good: true,
                l4_checksum_good: true
            }
        );
        // "BAD" and "NONE" are other values of the same two-bit fields.
        assert!(!rx_meta(sys::SHIM_MBUF_F_RX_IP_CKSUM_MASK).ipv4_checksum_good);
        assert!(!rx_meta(sys::SHIM_MBUF_F_RX_L4_CKSUM_MASK).l4_checksum_good);
    }

    #[test]
    fn trusted_rx_takes_every_frame_but_one_the_pmd_found_bad() {
        let good = RxMeta {
            ipv4_checksum_good: true,
            l4_checksum_good: true,
        };
        // No rx offload (memif, ring): ol_flags say nothing.
        assert_eq!(trusted_rx_meta(0), good);
        // NONE (both bits: not computed, data valid) and GOOD pass.
        let none = sys::SHIM_MBUF_F_RX_IP_CKSUM_MASK | sys::SHIM_MBUF_F_RX_L4_CKSUM_MASK;
        assert_eq!(trusted_rx_meta(none), good);
        let ok = sys::SHIM_MBUF_F_RX_IP_CKSUM_GOOD | sys::SHIM_MBUF_F_RX_L4_CKSUM_GOOD;
        assert_eq!(trusted_rx_meta(ok), good);
        // BAD: the stack verifies in software and drops it.
        let ip_bad = sys::SHIM_MBUF_F_RX_IP_CKSUM_MASK & !sys::SHIM_MBUF_F_RX_IP_CKSUM_GOOD;
        let l4_bad = sys::SHIM_MBUF_F_RX_L4_CKSUM_MASK & !sys::SHIM_MBUF_F_RX_L4_CKSUM_GOOD;
        assert!(!trusted_rx_meta(ip_bad).ipv4_checksum_good);
        assert!(trusted_rx_meta(ip_bad).l4_checksum_good);
        assert!(!trusted_rx_meta(l4_bad).l4_checksum_good);
    }

    #[test]
    fn tx_flags_follow_the_offload_request() {
        let headers = TxOffload {
            l2_len: 14,
            l3_len: 20,
            l4_len: 20,
            ..TxOffload::default()
        };
        assert_eq!(tx_ol_flags(100, &headers), (0, 0));

        let checksums = TxOffload {
            ipv4_checksum: true,
            tcp_checksum: true,
            ..headers
        };
        let (flags, segsz) = tx_ol_flags(100, &checksums);
        assert_eq!(
            flags,
            sys::SHIM_MBUF_F_TX_IPV4 | sys::SHIM_MBUF_F_TX_IP_CKSUM | sys::SHIM_MBUF_F_TX_TCP_CKSUM
        );
        assert_eq!(segsz, 0);

        let tso = TxOffload {
            tso_segment_size: 1448,
            ..checksums
        };
        let (flags, segsz) = tx_ol_flags(54 + 3 * 1448, &tso);
        assert_eq!(
            flags,
            sys::SHIM_MBUF_F_TX_IPV4 | sys::SHIM_MBUF_F_TX_IP_CKSUM | sys::SHIM_MBUF_F_TX_TCP_SEG
        );
        assert_eq!(segsz, 1448);

        // One segment's worth: plain checksum offload, no TSO.
        let (flags, segsz) = tx_ol_flags(54 + 1000, &tso);
        assert_eq!(flags & sys::SHIM_MBUF_F_TX_TCP_SEG, 0);
        assert_ne!(flags & sys::SHIM_MBUF_F_TX_TCP_CKSUM, 0);
        assert_eq!(segsz, 0);
    }
}
