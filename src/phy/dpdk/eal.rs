//! The EAL singleton ([`Eal`]), the ports EAL knows of, and lcore ids for
//! the threads that use mbufs.

use std::ffi::{c_char, CStr, CString};
use std::sync::Mutex;

use dpdk_sys as sys;

use super::{check, libc_errno, rte_errno, rte_strerror, PMD_DIR};
use crate::phy::PhyError;

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
pub(super) fn register_thread_for_life() -> Result<u32, PhyError> {
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
