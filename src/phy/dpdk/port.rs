//! Ethdev ports: configuration, start, offloads, statistics ([`Port`]), and
//! handing out their queue pairs.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dpdk_sys as sys;

use super::{check, DpdkQueue, Eal, Mempool, ETHER_OVERHEAD, MAX_IPV4_PACKET};
use crate::phy::rss::RssSteering;
use crate::phy::{ChecksumMode, PhyError};

/// The RSS hash key and redirection table of a started port; None when
/// the PMD does not report them (or reports nothing usable).
fn query_rss(port_id: u16, info: &sys::rte_eth_dev_info) -> Option<RssSteering> {
    let key_len = usize::from(info.hash_key_size);
    let reta_size = usize::from(info.reta_size);
    if key_len < 16 || reta_size == 0 {
        return None;
    }
    let mut key = vec![0u8; key_len];
    let mut conf = sys::rte_eth_rss_conf {
        rss_key: key.as_mut_ptr(),
        rss_key_len: info.hash_key_size,
        rss_hf: 0,
    };
    // SAFETY: the port is started; rss_key points to rss_key_len writable
    // bytes that outlive the call.
    if unsafe { sys::rte_eth_dev_rss_hash_conf_get(port_id, &mut conf) } != 0 {
        return None;
    }
    // Only the 4-tuple hash of TCP over IPv4 is modelled.
    if conf.rss_hf & sys::SHIM_ETH_RSS_TCP == 0 {
        return None;
    }
    let groups = reta_size.div_ceil(64);
    let mut entries: Vec<sys::rte_eth_rss_reta_entry64> = (0..groups)
        .map(|_| sys::rte_eth_rss_reta_entry64 {
            mask: u64::MAX,
            reta: [0; 64],
        })
        .collect();
    // SAFETY: entries holds reta_size.div_ceil(64) groups, as many as
    // reta_size entries need; the port is started.
    let ret =
        unsafe { sys::rte_eth_dev_rss_reta_query(port_id, entries.as_mut_ptr(), info.reta_size) };
    if ret != 0 {
        return None;
    }
    let reta = entries
        .iter()
        .flat_map(|g| g.reta.iter().copied())
        .take(reta_size)
        .collect();
    Some(RssSteering { key, reta })
}

/// How to set up a port.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// Queue pairs (one per worker). Several pairs enable RSS on rx.
    pub queues: u16,
    /// Descriptors per rx ring (adjusted to the PMD's limits).
    pub rx_ring_size: u16,
    /// Descriptors per tx ring (adjusted to the PMD's limits).
    pub tx_ring_size: u16,
    /// The IP MTU to set; `None` keeps the device's.
    pub mtu: Option<u16>,
    /// Receive frames for any MAC (needed on a shared link or a vdev).
    pub promiscuous: bool,
    /// Enable IPv4/TCP checksum offloads (rx and tx) where the PMD has them.
    pub checksum_offload: bool,
    /// Software checksums where the PMD has no offload (`Sw`), or none on
    /// a link that cannot corrupt frames, between two trusted ends
    /// (`Trusted`: net_memif and net_ring only); see [`ChecksumMode`].
    pub checksum: ChecksumMode,
    /// Enable TCP segmentation offload where the PMD has it.
    pub tso: bool,
    /// Enable TCP large receive offload where the PMD has it (the port then
    /// delivers frames longer than the MTU, chained over several mbufs when
    /// they do not fit one).
    pub lro: bool,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            queues: 1,
            rx_ring_size: 1024,
            tx_ring_size: 1024,
            mtu: None,
            promiscuous: true,
            checksum_offload: true,
            checksum: ChecksumMode::Sw,
            tso: true,
            lro: true,
        }
    }
}

/// Counters of a port (`rte_eth_stats_get`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Dropped by the NIC because the rx ring was full.
    pub rx_missed: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    /// Rx buffer allocation failures (the mempool ran dry).
    pub rx_no_mbuf: u64,
}

/// What a started port offers; the same for all its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PortOffloads {
    pub(super) rx_checksum: bool,
    pub(super) tx_checksum: bool,
    pub(super) tso: bool,
    pub(super) lro: bool,
    /// `ChecksumMode::Trusted`: no software checksums where the PMD has no
    /// offload (rx frames count as verified, tx frames keep the
    /// pseudo-header sum).
    pub(super) trusted: bool,
}

#[derive(Debug)]
pub(super) struct PortInner {
    pub(super) port_id: u16,
    pub(super) mac: [u8; 6],
    pub(super) mtu: usize,
    pub(super) offloads: PortOffloads,
    /// The PMD's name (`net_memif`, `net_tap`, `net_ice`, ...).
    pub(super) driver: String,
    rx_pool: Arc<Mempool>,
    pub(super) queue_taken: Vec<AtomicBool>,
    /// Hash key and redirection table, when the port spreads flows over
    /// several rx queues by RSS and tells how.
    rss: Option<RssSteering>,
}

impl Drop for PortInner {
    fn drop(&mut self) {
        // SAFETY: the last Port handle and every DpdkQueue of this port are
        // gone (they hold this Arc), so no thread is inside a burst call.
        // Errors cannot be reported from drop and the port is unusable after.
        unsafe {
            sys::rte_eth_dev_stop(self.port_id);
            sys::rte_eth_dev_close(self.port_id);
        }
        // rx_pool drops after this, once the PMD returned its ring mbufs.
    }
}

/// A configured and started ethdev port.
#[derive(Debug, Clone)]
pub struct Port {
    inner: Arc<PortInner>,
}

impl Port {
    /// Configures `port_id` with `config`, sets up its queue pairs with rx
    /// buffers from `rx_pool`, and starts it.
    pub fn start(
        _eal: &Eal,
        port_id: u16,
        config: &PortConfig,
        rx_pool: Arc<Mempool>,
    ) -> Result<Port, PhyError> {
        // SAFETY: EAL is initialised; the call only reads the port table.
        if unsafe { sys::rte_eth_dev_is_valid_port(port_id) } == 0 {
            return Err(PhyError::Device(format!("no DPDK port {port_id}")));
        }
        if config.queues == 0 {
            return Err(PhyError::Device(
                "a port needs at least one queue pair".to_string(),
            ));
        }
        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: port_id is valid and info is a writable rte_eth_dev_info.
        let ret = unsafe { sys::rte_eth_dev_info_get(port_id, &mut info) };
        check(ret, "rte_eth_dev_info_get")?;
        if config.queues > info.max_rx_queues || config.queues > info.max_tx_queues {
            return Err(PhyError::Device(format!(
                "port {port_id} has at most {} rx / {} tx queues, {} asked",
                info.max_rx_queues, info.max_tx_queues, config.queues
            )));
        }

        let mut eth_conf = sys::rte_eth_conf::default();
        let rx_checksum_flags =
            sys::SHIM_ETH_RX_OFFLOAD_IPV4_CKSUM | sys::SHIM_ETH_RX_OFFLOAD_TCP_CKSUM;
        let tx_checksum_flags =
            sys::SHIM_ETH_TX_OFFLOAD_IPV4_CKSUM | sys::SHIM_ETH_TX_OFFLOAD_TCP_CKSUM;
        let has = |capa: u64, flags: u64| capa & flags == flags;
        let offloads = PortOffloads {
            rx_checksum: config.checksum_offload && has(info.rx_offload_capa, rx_checksum_flags),
            tx_checksum: config.checksum_offload && has(info.tx_offload_capa, tx_checksum_flags),
            // TSO needs the checksum offloads too: the NIC fills in the
            // checksums of the segments it cuts.
            tso: config.tso
                && config.checksum_offload
                && has(
                    info.tx_offload_capa,
                    tx_checksum_flags | sys::SHIM_ETH_TX_OFFLOAD_TCP_TSO,
                ),
            lro: config.lro && has(info.rx_offload_capa, sys::SHIM_ETH_RX_OFFLOAD_TCP_LRO),
            trusted: config.checksum == ChecksumMode::Trusted,
        };
        if offloads.rx_checksum {
            eth_conf.rxmode.offloads |= rx_checksum_flags;
        }
        if offloads.tx_checksum {
            eth_conf.txmode.offloads |= tx_checksum_flags;
        }
        if offloads.tso {
            eth_conf.txmode.offloads |= sys::SHIM_ETH_TX_OFFLOAD_TCP_TSO;
        }
        if offloads.lro {
            eth_conf.rxmode.offloads |= sys::SHIM_ETH_RX_OFFLOAD_TCP_LRO;
            eth_conf.rxmode.max_lro_pkt_size = info.max_lro_pkt_size.min(MAX_IPV4_PACKET as u32);
        }
        // SAFETY: driver_name is NULL or a NUL-terminated static string of
        // the PMD, valid while the port exists; it is copied out at once.
        let driver = unsafe {
            (!info.driver_name.is_null()).then(|| {
                CStr::from_ptr(info.driver_name)
                    .to_string_lossy()
                    .into_owned()
            })
        }
        .unwrap_or_default();
        if offloads.trusted && !link_cannot_corrupt(&driver) {
            return Err(PhyError::Device(format!(
                "checksum mode trusted on port {port_id} ({driver}): only a link that cannot \
                 corrupt a frame, between two processes of this host that both skip \
                 checksums, may go without them ({}); use --checksum sw",
                TRUSTED_DRIVERS.join(", ")
            )));
        }
        if driver == AF_XDP_DRIVER {
            // net_af_xdp registers the pool's memory as its UMEM assuming the
            // buffers are packed in one chunk; one outside is lost for good
            // the first time the kernel sees it (see `Mempool::new_packed`).
            let layout = rx_pool.layout();
            let outside = layout.outside_af_xdp_umem(page_size());
            if outside > 0 {
                return Err(PhyError::Device(format!(
                    "{outside} of the {} mbufs of the rx pool for port {port_id} ({driver}) lie                      outside the UMEM the PMD builds over it (it assumes one packed chunk;                      this pool has {} chunk(s)); create it with Mempool::new_packed",
                    layout.objects.len(),
                    layout.chunks.len()
                )));
            }
        }
        // Each queue allocates tx mbufs from one pool and never shares them
        // (refcnt 1), which is the contract of fast free.
        if has(
            info.tx_offload_capa,
            sys::SHIM_ETH_TX_OFFLOAD_MBUF_FAST_FREE,
        ) {
            eth_conf.txmode.offloads |= sys::SHIM_ETH_TX_OFFLOAD_MBUF_FAST_FREE;
        }
        if config.queues > 1 {
            let rss = (sys::SHIM_ETH_RSS_IP | sys::SHIM_ETH_RSS_TCP) & info.flow_type_rss_offloads;
            if rss != 0 {
                eth_conf.rxmode.mq_mode = sys::RTE_ETH_MQ_RX_RSS;
                eth_conf.rx_adv_conf.rss_conf.rss_hf = rss;
            }
        }
        if let Some(mtu) = config.mtu {
            if mtu < info.min_mtu || mtu > info.max_mtu {
                return Err(PhyError::Device(format!(
                    "MTU {mtu} outside port {port_id}'s ({driver}) range {}..={}",
                    info.min_mtu, info.max_mtu
                )));
            }
            let frame = u32::from(mtu) + ETHER_OVERHEAD as u32;
            if frame <= info.max_rx_pktlen {
                eth_conf.rxmode.mtu = u32::from(mtu);
            } else if !mtu_unenforced(&driver) {
                return Err(PhyError::Device(format!(
                    "MTU {mtu} needs {frame}-byte frames, but port {port_id} ({driver}) takes \
                     at most {} bytes",
                    info.max_rx_pktlen
                )));
            }
            // Else (memif): the PMD keeps its own MTU setting, which it
            // never applies to a frame; the port's MTU is ours alone.
        }
        // A frame longer than one rx buffer comes chained (scatter, where
        // the PMD needs asking; memif and ring chain by themselves), and
        // `DpdkQueue::rx_burst` copies it into one piece, so an rx pool
        // should have buffers of the frame size (see `data_room_for_mtu`).
        let wanted_mtu = config.mtu.map(usize::from).unwrap_or(1500);
        let chained = |len: usize| rx_pool.frame_capacity() < len;
        if chained(wanted_mtu + ETHER_OVERHEAD) || offloads.lro {
            if has(info.rx_offload_capa, sys::SHIM_ETH_RX_OFFLOAD_SCATTER) {
                eth_conf.rxmode.offloads |= sys::SHIM_ETH_RX_OFFLOAD_SCATTER;
            } else if chained(wanted_mtu + ETHER_OVERHEAD) && !mtu_unenforced(&driver) {
                return Err(PhyError::Device(format!(
                    "rx mbufs hold {} bytes, too small for MTU {wanted_mtu} frames, and port \
                     {port_id} ({driver}) cannot chain them (no rx scatter)",
                    rx_pool.frame_capacity()
                )));
            }
        }

        // SAFETY: port_id is valid and stopped (never started, or closed);
        // eth_conf is a fully initialised rte_eth_conf.
        let ret =
            unsafe { sys::rte_eth_dev_configure(port_id, config.queues, config.queues, &eth_conf) };
        check(ret, "rte_eth_dev_configure")?;
        let (mut rx_ring_size, mut tx_ring_size) = (config.rx_ring_size, config.tx_ring_size);
        // SAFETY: both pointers are valid u16 out/in parameters.
        let ret = unsafe {
            sys::rte_eth_dev_adjust_nb_rx_tx_desc(port_id, &mut rx_ring_size, &mut tx_ring_size)
        };
        check(ret, "rte_eth_dev_adjust_nb_rx_tx_desc")?;
        // PMDs fill every rx descriptor with an mbuf at start; a pool that
        // cannot do that (and leave some for tx) fails later and obscurely.
        let rx_buffers = u32::from(rx_ring_size) * u32::from(config.queues);
        if rx_pool.capacity() <= rx_buffers {
            return Err(PhyError::Device(format!(
                "mempool of {} mbufs cannot fill {} rx descriptors; make it larger",
                rx_pool.capacity(),
                rx_buffers
            )));
        }
        // SAFETY: port_id is valid.
        let socket_id = unsafe { sys::rte_eth_dev_socket_id(port_id) };
        // SOCKET_ID_ANY (-1) becomes u32::MAX, which is what DPDK expects.
        let socket_id = socket_id as u32;
        let mut rx_conf = info.default_rxconf;
        rx_conf.offloads = eth_conf.rxmode.offloads;
        let mut tx_conf = info.default_txconf;
        tx_conf.offloads = eth_conf.txmode.offloads;
        for queue in 0..config.queues {
            // SAFETY: the port is configured with `queues` rx queues; rx_conf
            // is initialised; rx_pool outlives the port (PortInner holds it).
            let ret = unsafe {
                sys::rte_eth_rx_queue_setup(
                    port_id,
                    queue,
                    rx_ring_size,
                    socket_id,
                    &rx_conf,
                    rx_pool.as_ptr(),
                )
            };
            check(ret, "rte_eth_rx_queue_setup")?;
            // SAFETY: as above, for the tx queues.
            let ret = unsafe {
                sys::rte_eth_tx_queue_setup(port_id, queue, tx_ring_size, socket_id, &tx_conf)
            };
            check(ret, "rte_eth_tx_queue_setup")?;
        }
        // SAFETY: the port is configured with all its queues set up.
        let ret = unsafe { sys::rte_eth_dev_start(port_id) };
        check(ret, "rte_eth_dev_start")?;
        // From here on, dropping `inner` stops and closes the port.
        let mut inner = PortInner {
            port_id,
            mac: [0; 6],
            mtu: wanted_mtu,
            offloads,
            driver,
            rx_pool,
            queue_taken: (0..config.queues).map(|_| AtomicBool::new(false)).collect(),
            rss: None,
        };
        if eth_conf.rxmode.mq_mode == sys::RTE_ETH_MQ_RX_RSS {
            inner.rss = query_rss(port_id, &info);
        }
        if config.promiscuous {
            // SAFETY: the port is started. Some PMDs have no promiscuous mode
            // (-ENOTSUP); that only matters for traffic to other MACs.
            let _ = unsafe { sys::rte_eth_promiscuous_enable(port_id) };
        }
        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: mac is a writable rte_ether_addr.
        let ret = unsafe { sys::rte_eth_macaddr_get(port_id, &mut mac) };
        check(ret, "rte_eth_macaddr_get")?;
        inner.mac = mac.addr_bytes;
        let mut mtu = 0u16;
        // SAFETY: mtu is a writable u16.
        if unsafe { sys::rte_eth_dev_get_mtu(port_id, &mut mtu) } == 0
            && mtu != 0
            && !(config.mtu.is_some() && mtu_unenforced(&inner.driver))
        {
            inner.mtu = usize::from(mtu);
        }
        Ok(Port {
            inner: Arc::new(inner),
        })
    }

    pub fn id(&self) -> u16 {
        self.inner.port_id
    }

    /// How the port spreads received flows over its queues (RSS key and
    /// redirection table), if it does and says so: what a connection needs
    /// to pick a source port whose traffic comes back on its own queue.
    pub fn rss_steering(&self) -> Option<&RssSteering> {
        self.inner.rss.as_ref()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.inner.mac
    }

    /// The IP MTU in effect.
    pub fn mtu(&self) -> usize {
        self.inner.mtu
    }

    /// The PMD's name (`net_memif`, `net_tap`, ...).
    pub fn driver(&self) -> &str {
        &self.inner.driver
    }

    /// Whether TCP segmentation offload is on (the PMD has it and the
    /// config asked for it): queues then take frames up to 64 KiB, given a
    /// tx pool with buffers that large ([`Port::queue_with_tx_pool`]).
    pub fn tso(&self) -> bool {
        self.inner.offloads.tso
    }

    /// Whether large receive offload is on: received frames may be longer
    /// than the MTU.
    pub fn lro(&self) -> bool {
        self.inner.offloads.lro
    }

    /// How the port treats checksums: [`ChecksumMode::Trusted`] only on a
    /// link that cannot corrupt frames (checked at start).
    pub fn checksum_mode(&self) -> ChecksumMode {
        if self.inner.offloads.trusted {
            ChecksumMode::Trusted
        } else {
            ChecksumMode::Sw
        }
    }

    /// Whether IPv4/TCP checksum offload is on (rx, tx).
    pub fn checksum_offload(&self) -> (bool, bool) {
        (
            self.inner.offloads.rx_checksum,
            self.inner.offloads.tx_checksum,
        )
    }

    /// Whether the link is up, without waiting for autonegotiation.
    pub fn link_up(&self) -> bool {
        let mut link = sys::rte_eth_link::default();
        // SAFETY: the port is started and link is writable.
        let ret = unsafe { sys::rte_eth_link_get_nowait(self.inner.port_id, &mut link) };
        ret == 0 && link.link_status() != 0
    }

    pub fn stats(&self) -> Result<PortStats, PhyError> {
        let mut stats = sys::rte_eth_stats::default();
        // SAFETY: the port is started and stats is writable.
        let ret = unsafe { sys::rte_eth_stats_get(self.inner.port_id, &mut stats) };
        check(ret, "rte_eth_stats_get")?;
        Ok(PortStats {
            rx_packets: stats.ipackets,
            tx_packets: stats.opackets,
            rx_bytes: stats.ibytes,
            tx_bytes: stats.obytes,
            rx_missed: stats.imissed,
            rx_errors: stats.ierrors,
            tx_errors: stats.oerrors,
            rx_no_mbuf: stats.rx_nombuf,
        })
    }

    /// The rx pool's mbufs in use and available (a pool drained by frames
    /// someone holds stops the PMD's receive: it has nothing to fill).
    pub fn rx_pool_usage(&self) -> (u32, u32) {
        (self.inner.rx_pool.in_use(), self.inner.rx_pool.available())
    }

    /// Takes queue pair `queue_id`, allocating tx buffers from the rx pool.
    /// Each queue pair can be taken once.
    pub fn queue(&self, queue_id: u16) -> Result<DpdkQueue, PhyError> {
        self.queue_with_tx_pool(queue_id, Arc::clone(&self.inner.rx_pool))
    }

    /// Takes queue pair `queue_id`, allocating tx buffers from `tx_pool`
    /// (e.g. one with 64 KiB buffers for TSO, or one per worker).
    pub fn queue_with_tx_pool(
        &self,
        queue_id: u16,
        tx_pool: Arc<Mempool>,
    ) -> Result<DpdkQueue, PhyError> {
        let taken = self
            .inner
            .queue_taken
            .get(usize::from(queue_id))
            .ok_or_else(|| {
                PhyError::Device(format!("port {} has no queue {queue_id}", self.id()))
            })?;
        if taken.swap(true, Ordering::AcqRel) {
            return Err(PhyError::Device(format!(
                "queue {queue_id} of port {} is already taken",
                self.id()
            )));
        }
        Ok(DpdkQueue::new(Arc::clone(&self.inner), queue_id, tx_pool))
    }
}

/// PMDs that report a frame limit (ethdev's `max_rx_pktlen`) they never
/// apply: DPDK 22.11's net_memif says 1518 bytes but moves frames of any
/// length, chained over its ring's buffers, so a jumbo MTU is the stack's
/// alone there and the PMD is left at its own.
/// The PMD name of DPDK's AF_XDP driver.
pub const AF_XDP_DRIVER: &str = "net_af_xdp";

/// The name of the PMD that drives `port_id` (`net_af_xdp`, `net_memif`).
pub fn driver_name(_eal: &Eal, port_id: u16) -> Result<String, PhyError> {
    // SAFETY: EAL is initialised; the call only reads the port table.
    if unsafe { sys::rte_eth_dev_is_valid_port(port_id) } == 0 {
        return Err(PhyError::Device(format!("no DPDK port {port_id}")));
    }
    let mut info = sys::rte_eth_dev_info::default();
    // SAFETY: port_id is valid and info is a writable rte_eth_dev_info.
    let ret = unsafe { sys::rte_eth_dev_info_get(port_id, &mut info) };
    check(ret, "rte_eth_dev_info_get")?;
    // SAFETY: driver_name is NULL or a NUL-terminated static string of the
    // PMD; it is copied out at once.
    Ok(unsafe {
        (!info.driver_name.is_null()).then(|| {
            CStr::from_ptr(info.driver_name)
                .to_string_lossy()
                .into_owned()
        })
    }
    .unwrap_or_default())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

/// The PMDs whose link cannot corrupt a frame: shared memory between
/// processes of one host (net_memif) or rings of mbuf pointers inside one
/// process (net_ring); no wire, no DMA, no kernel in between.
pub const TRUSTED_DRIVERS: [&str; 2] = ["net_memif", "net_ring"];

/// Whether `ChecksumMode::Trusted` may be used on a port of this PMD.
pub fn link_cannot_corrupt(driver: &str) -> bool {
    TRUSTED_DRIVERS.contains(&driver)
}

fn mtu_unenforced(driver: &str) -> bool {
    driver == "net_memif"
}
