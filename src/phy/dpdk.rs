//! Thin safe wrappers over DPDK: the EAL singleton, pktmbuf pools, ethdev
//! ports and one queue pair per worker ([`DpdkQueue`], a [`Device`]).
//!
//! This is the only module of the crate allowed to use `unsafe`. The
//! ownership rules that make the wrappers sound:
//! - [`Eal`] is a token that proves `rte_eal_init` succeeded; there is no way
//!   to build one otherwise, and every other constructor takes one.
//! - A [`Port`] keeps its rx mempool alive (`Arc`) and stops/closes the port
//!   when the last handle (the `Port` or one of its queues) goes away.
//! - Each queue pair is handed out once ([`Port::queue`]), so one thread owns
//!   each rx/tx queue, as DPDK requires for the lock-free burst functions.
//! - Every mbuf this module holds is owned by exactly one `DpdkQueue` and is
//!   freed when sent (by the PMD), lent (after the callback) or dropped.
#![allow(unsafe_code)]

use std::ffi::{c_char, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dpdk_sys as sys;

use super::rss::RssSteering;
use super::{Device, DeviceCaps, PhyError, RxMeta, TxOffload};

/// Frames asked for in one `rte_eth_rx_burst` call.
const RX_BURST: usize = 64;
/// Frames queued by `tx_frame` before a `tx_flush` is forced.
const TX_BATCH: usize = 64;
/// Ethernet header plus CRC: the frame overhead on top of the MTU the PMD
/// needs room for in one rx buffer.
const ETHER_OVERHEAD: usize = (sys::SHIM_ETHER_HDR_LEN + sys::SHIM_ETHER_CRC_LEN) as usize;
const ETHER_HDR_LEN: usize = sys::SHIM_ETHER_HDR_LEN as usize;
/// The largest IPv4 packet, which bounds a TSO frame.
const MAX_IPV4_PACKET: usize = 65_535;

/// The DPDK pktmbuf data room that fits a standard 1500-byte MTU frame.
pub const DEFAULT_MBUF_DATA_ROOM: u16 = sys::SHIM_MBUF_DEFAULT_BUF_SIZE as u16;
/// The headroom DPDK reserves at the front of every mbuf.
pub const MBUF_HEADROOM: u16 = sys::SHIM_PKTMBUF_HEADROOM as u16;
/// Where Debian's DPDK 22.11 keeps its PMD plugins (`-d` for EAL).
pub const PMD_DIR: &str = sys::PMD_DIR;

enum EalState {
    Uninitialised,
    Initialised,
    Failed(String),
}

static EAL_STATE: Mutex<EalState> = Mutex::new(EalState::Uninitialised);

/// Proof that the DPDK Environment Abstraction Layer is initialised.
///
/// EAL can be initialised once per process and never again after
/// `rte_eal_cleanup`, so this handle is never torn down: DPDK's state lives
/// until the process exits.
#[derive(Debug, Clone, Copy)]
pub struct Eal {
    _private: (),
}

impl Eal {
    /// Initialises EAL with `args` (EAL options only, e.g. `["-l", "0",
    /// "--in-memory", "--vdev", "net_ring0"]`; the program name is added).
    ///
    /// Once per process: a second call returns an error, use [`Eal::get`].
    /// `rte_eal_init` pins the calling thread to the main lcore; this gives
    /// the thread its CPU set back afterwards, since we run no EAL lcore
    /// functions and every thread spawned later would inherit the pin: an
    /// application thread and a path worker both spinning on one CPU take
    /// turns of a scheduler slice each (milliseconds per I/O).
    pub fn init(args: &[String]) -> Result<Eal, PhyError> {
        let mut state = EAL_STATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*state {
            EalState::Initialised => {
                return Err(PhyError::Device(
                    "DPDK EAL is already initialised in this process".to_string(),
                ))
            }
            EalState::Failed(why) => {
                return Err(PhyError::Device(format!(
                    "DPDK EAL initialisation already failed in this process: {why}"
                )))
            }
            EalState::Uninitialised => {}
        }
        let mut owned = Vec::with_capacity(args.len() + 1);
        owned.push(CString::new("iscsi-bypass").expect("no NUL in a literal"));
        for arg in args {
            owned.push(CString::new(arg.as_str()).map_err(|_| {
                PhyError::Device(format!("EAL argument {arg:?} contains a NUL byte"))
            })?);
        }
        // EAL may keep pointers into argv (and getopt permutes it), so the
        // strings and the array live for the rest of the process.
        let argv: &'static mut [*mut c_char] = Box::leak(
            owned
                .into_iter()
                .map(CString::into_raw)
                .chain(std::iter::once(std::ptr::null_mut()))
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        let argc = (argv.len() - 1) as i32;
        let cpus = current_cpu_set();
        // SAFETY: argv holds argc valid NUL-terminated strings followed by a
        // NULL, all leaked so they outlive EAL; the state lock guarantees this
        // is the only rte_eal_init call in the process.
        let ret = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        if let Some(cpus) = cpus {
            restore_cpu_set(&cpus);
        }
        if ret < 0 {
            let why = rte_strerror(rte_errno());
            *state = EalState::Failed(why.clone());
            return Err(PhyError::Device(format!("rte_eal_init failed: {why}")));
        }
        *state = EalState::Initialised;
        Ok(Eal { _private: () })
    }

    /// The handle of an EAL initialised earlier in this process, if any.
    pub fn get() -> Option<Eal> {
        let state = EAL_STATE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        matches!(*state, EalState::Initialised).then_some(Eal { _private: () })
    }

    /// Gives the calling (non-EAL) thread an lcore id, so mempool per-lcore
    /// caches work on it, for as long as the thread lives: the id is
    /// released when the thread exits, so short-lived threads (a login
    /// thread per reconnect) do not use up EAL's lcore table nor strand the
    /// mbufs in their caches (the next thread given the id reuses them).
    /// A thread that already has an id keeps it.
    pub fn register_current_thread(&self) -> Result<u32, PhyError> {
        register_thread_for_life()
    }

    /// Number of ethdev ports EAL probed (PCI devices bound to a DPDK driver
    /// plus `--vdev` devices).
    pub fn port_count(&self) -> u16 {
        // SAFETY: EAL is initialised; this only reads the port table.
        unsafe { sys::rte_eth_dev_count_avail() }
    }

    /// The port id of a device by its DPDK name (`net_ring0`, `0000:03:00.0`).
    pub fn port_by_name(&self, name: &str) -> Result<u16, PhyError> {
        let c_name = CString::new(name)
            .map_err(|_| PhyError::Device(format!("port name {name:?} contains a NUL byte")))?;
        let mut port_id = 0u16;
        // SAFETY: c_name is NUL-terminated and port_id is a valid out pointer.
        let ret = unsafe { sys::rte_eth_dev_get_port_by_name(c_name.as_ptr(), &mut port_id) };
        check(ret, "rte_eth_dev_get_port_by_name")?;
        Ok(port_id)
    }

    /// Two ring ports joined back to back, `net_ring_<a>` and
    /// `net_ring_<b>`: what one sends the other receives (a cable in
    /// memory, for tests in one process). A `net_ring` vdev made on the
    /// EAL command line loops back to itself instead. Needs the net_ring
    /// plugin loaded by EAL (it is, from the distribution's plugin dir).
    pub fn ring_pair(&self, a: &str, b: &str) -> Result<(u16, u16), PhyError> {
        let plugin = CString::new(format!("{PMD_DIR}/librte_net_ring.so"))
            .map_err(|_| PhyError::Device("plugin path contains a NUL byte".into()))?;
        let name = |n: &str| {
            CString::new(n)
                .map_err(|_| PhyError::Device(format!("port name {n:?} contains a NUL byte")))
        };
        let (c_a, c_b) = (name(a)?, name(b)?);
        let (mut port_a, mut port_b) = (0u16, 0u16);
        // SAFETY: EAL is initialised (self exists); every string is
        // NUL-terminated and outlives the call; both out pointers are valid.
        let ret = unsafe {
            sys::shim_ring_pair(
                plugin.as_ptr(),
                c_a.as_ptr(),
                c_b.as_ptr(),
                1024,
                &mut port_a,
                &mut port_b,
            )
        };
        match ret {
            0 => Ok((port_a, port_b)),
            r if r == -libc_errno::ENOENT => Err(PhyError::Device(format!(
                "the net_ring plugin {PMD_DIR}/librte_net_ring.so is not loaded (add -d {PMD_DIR} to the EAL args)"
            ))),
            r => check(r, "rte_eth_from_rings (ring pair)").map(|()| (port_a, port_b)),
        }
    }

    /// The DPDK names of all probed ports (for error messages).
    pub fn port_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for port_id in 0..sys::RTE_MAX_ETHPORTS as u16 {
            // SAFETY: EAL is initialised; this only reads the port table.
            if unsafe { sys::rte_eth_dev_is_valid_port(port_id) } == 0 {
                continue;
            }
            let mut buf = [0 as c_char; sys::RTE_ETH_NAME_MAX_LEN as usize];
            // SAFETY: buf has room for RTE_ETH_NAME_MAX_LEN bytes including
            // the NUL, which is what the call writes at most.
            if unsafe { sys::rte_eth_dev_get_name_by_port(port_id, buf.as_mut_ptr()) } == 0 {
                // SAFETY: on success buf holds a NUL-terminated string.
                let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
                names.push(name.to_string_lossy().into_owned());
            }
        }
        names
    }
}

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

/// The calling thread's CPU affinity, if it can be read.
fn current_cpu_set() -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data (all-zero is a valid empty set) and
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes to it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
            .then_some(set)
    }
}

/// Sets the calling thread's CPU affinity (best effort).
fn restore_cpu_set(set: &libc::cpu_set_t) {
    // SAFETY: `set` is a valid cpu_set_t read by sched_getaffinity; the call
    // only reads it and changes this thread's own affinity.
    let ret = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if ret != 0 {
        log::warn!(
            "could not restore the CPU affinity after rte_eal_init: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Releases the calling thread's lcore id when the thread exits.
struct LcoreRelease;

impl Drop for LcoreRelease {
    fn drop(&mut self) {
        // SAFETY: runs on the registered thread itself (thread-local
        // destructor), once; EAL outlives every thread (it is never torn
        // down), and unregistering only frees this thread's lcore slot.
        unsafe { sys::rte_thread_unregister() }
    }
}

thread_local! {
    static LCORE_RELEASE: std::cell::RefCell<Option<LcoreRelease>> =
        const { std::cell::RefCell::new(None) };
}

/// Registers the calling thread with EAL until it exits (see
/// [`Eal::register_current_thread`]). Only called where an EAL exists.
fn register_thread_for_life() -> Result<u32, PhyError> {
    let current = lcore_id();
    if current != u32::MAX {
        return Ok(current);
    }
    // SAFETY: EAL is initialised (callers hold an Eal, or a queue of a port
    // that needed one); rte_thread_register only touches the calling
    // thread's lcore slot.
    let ret = unsafe { sys::rte_thread_register() };
    if ret < 0 {
        return Err(PhyError::Device(format!(
            "rte_thread_register: {}",
            rte_strerror(rte_errno())
        )));
    }
    LCORE_RELEASE.with(|r| *r.borrow_mut() = Some(LcoreRelease));
    Ok(lcore_id())
}

/// The lcore id of the calling thread (`u32::MAX`, LCORE_ID_ANY, for a thread
/// EAL does not know).
pub fn lcore_id() -> u32 {
    // SAFETY: reads a thread-local; valid before and after EAL init.
    unsafe { sys::shim_rte_lcore_id() }
}

fn rte_errno() -> i32 {
    // SAFETY: reads DPDK's thread-local errno.
    unsafe { sys::shim_rte_errno() }
}

fn rte_strerror(errnum: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local
    // NUL-terminated string, valid until the next call on this thread; it is
    // copied out at once.
    unsafe { CStr::from_ptr(sys::rte_strerror(errnum.abs())) }
        .to_string_lossy()
        .into_owned()
}

/// Turns a DPDK `0 or -errno` return value into a `PhyError`.
/// The errno values the shim returns negated.
mod libc_errno {
    pub const ENOENT: i32 = 2;
}

fn check(ret: i32, what: &str) -> Result<(), PhyError> {
    if ret < 0 {
        Err(PhyError::Device(format!("{what}: {}", rte_strerror(ret))))
    } else {
        Ok(())
    }
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

    fn as_ptr(&self) -> *mut sys::rte_mempool {
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
    /// Enable TCP segmentation offload where the PMD has it.
    pub tso: bool,
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
            tso: true,
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
struct PortOffloads {
    rx_checksum: bool,
    tx_checksum: bool,
    tso: bool,
}

#[derive(Debug)]
struct PortInner {
    port_id: u16,
    mac: [u8; 6],
    mtu: usize,
    offloads: PortOffloads,
    rx_pool: Arc<Mempool>,
    queue_taken: Vec<AtomicBool>,
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
                    "MTU {mtu} outside port {port_id}'s range {}..={}",
                    info.min_mtu, info.max_mtu
                )));
            }
            eth_conf.rxmode.mtu = u32::from(mtu);
        }
        // Rx scatter is off: a whole frame must fit one rx buffer.
        let wanted_mtu = config.mtu.map(usize::from).unwrap_or(1500);
        if rx_pool.frame_capacity() < wanted_mtu + ETHER_OVERHEAD {
            return Err(PhyError::Device(format!(
                "rx mbufs hold {} bytes, too small for MTU {wanted_mtu} frames",
                rx_pool.frame_capacity()
            )));
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
        if unsafe { sys::rte_eth_dev_get_mtu(port_id, &mut mtu) } == 0 && mtu != 0 {
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
        let offloads = self.inner.offloads;
        let frame_limit = if offloads.tso {
            MAX_IPV4_PACKET + ETHER_HDR_LEN
        } else {
            self.inner.mtu + ETHER_HDR_LEN
        };
        let caps = DeviceCaps {
            mac: self.inner.mac,
            mtu: self.inner.mtu,
            rx_checksum: offloads.rx_checksum,
            tx_checksum: offloads.tx_checksum,
            tso: offloads.tso,
            max_tx_frame: frame_limit.min(tx_pool.frame_capacity()),
        };
        Ok(DpdkQueue {
            port: Arc::clone(&self.inner),
            queue_id,
            tx_pool,
            caps,
            rx_mbufs: [std::ptr::null_mut(); RX_BURST],
            tx_pending: Vec::with_capacity(TX_BATCH),
            tx_prepared: 0,
            tx_dropped: 0,
        })
    }
}

/// One rx/tx queue pair of a started port, owned by one worker thread.
#[derive(Debug)]
pub struct DpdkQueue {
    port: Arc<PortInner>,
    queue_id: u16,
    tx_pool: Arc<Mempool>,
    caps: DeviceCaps,
    rx_mbufs: [*mut sys::rte_mbuf; RX_BURST],
    /// Frames written by `tx_frame`, not yet taken by the PMD.
    tx_pending: Vec<*mut sys::rte_mbuf>,
    /// How many of `tx_pending` (a prefix) already went through tx_prepare.
    tx_prepared: usize,
    tx_dropped: u64,
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
        let mut received = 0;
        while received < max {
            let want = (max - received).min(RX_BURST);
            // SAFETY: rx_mbufs has room for `want` pointers; the queue is
            // started and owned by this thread.
            let got = usize::from(unsafe {
                sys::shim_rte_eth_rx_burst(
                    self.port.port_id,
                    self.queue_id,
                    self.rx_mbufs.as_mut_ptr(),
                    want as u16,
                )
            });
            let guard = RxBurstGuard {
                mbufs: &mut self.rx_mbufs[..got],
            };
            for &mbuf in guard.mbufs.iter() {
                // SAFETY: mbuf is a valid received mbuf owned by this burst.
                let (segments, data_len, ol_flags, data) = unsafe {
                    (
                        sys::shim_rte_pktmbuf_nb_segs(mbuf),
                        sys::shim_rte_pktmbuf_data_len(mbuf),
                        sys::shim_rte_mbuf_ol_flags(mbuf),
                        sys::shim_rte_pktmbuf_mtod(mbuf) as *const u8,
                    )
                };
                // Rx scatter is off, so a chained frame is a PMD quirk; the
                // stack wants contiguous frames, so it is dropped.
                if segments != 1 {
                    continue;
                }
                // SAFETY: the first segment holds data_len initialised bytes
                // at data; the slice lives only during the callback and the
                // mbuf is freed after it (by the guard).
                let frame = unsafe { std::slice::from_raw_parts(data, usize::from(data_len)) };
                on_frame(frame, rx_meta(ol_flags));
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
        let (ol_flags, tso_segsz) = tx_ol_flags(len, &offload);
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
