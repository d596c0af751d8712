//! Thin safe wrappers over DPDK: the EAL singleton ([`eal`]), pktmbuf pools
//! ([`mempool`]), ethdev ports ([`port`]) and one queue pair per worker
//! ([`queue`]: [`DpdkQueue`], a [`Device`](super::Device)).
//!
//! This module and its children are the only code of the crate allowed to
//! use `unsafe` (the one `#![allow(unsafe_code)]` is here and covers the
//! submodules); every `unsafe` block carries a `// SAFETY:` comment. The
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

use std::ffi::CStr;

use dpdk_sys as sys;

use super::PhyError;

pub mod eal;
pub mod mempool;
pub mod port;
pub mod queue;

pub use eal::{lcore_id, Eal};
pub use mempool::{
    data_room_for_frame, data_room_for_mtu, Mempool, PoolLayout, DEFAULT_MBUF_DATA_ROOM,
    MBUF_HEADROOM,
};
pub use port::{
    driver_name, link_cannot_corrupt, Port, PortConfig, PortStats, AF_XDP_DRIVER, TRUSTED_DRIVERS,
};
pub use queue::DpdkQueue;

/// Ethernet header plus CRC: the frame overhead on top of the MTU the PMD
/// needs room for in one rx buffer.
const ETHER_OVERHEAD: usize = (sys::SHIM_ETHER_HDR_LEN + sys::SHIM_ETHER_CRC_LEN) as usize;
const ETHER_HDR_LEN: usize = sys::SHIM_ETHER_HDR_LEN as usize;
/// The largest IPv4 packet, which bounds a TSO frame.
const MAX_IPV4_PACKET: usize = 65_535;

/// Where Debian's DPDK 22.11 keeps its PMD plugins (`-d` for EAL).
pub const PMD_DIR: &str = sys::PMD_DIR;

pub(crate) fn rte_errno() -> i32 {
    // SAFETY: reads DPDK's thread-local errno.
    unsafe { sys::shim_rte_errno() }
}

pub(crate) fn rte_strerror(errnum: i32) -> String {
    // SAFETY: rte_strerror returns a pointer to a static or thread-local
    // NUL-terminated string, valid until the next call on this thread; it is
    // copied out at once.
    unsafe { CStr::from_ptr(sys::rte_strerror(errnum.abs())) }
        .to_string_lossy()
        .into_owned()
}

/// Turns a DPDK `0 or -errno` return value into a `PhyError`.
/// The errno values the shim returns negated.
pub(crate) mod libc_errno {
    pub const ENOENT: i32 = 2;
}

pub(crate) fn check(ret: i32, what: &str) -> Result<(), PhyError> {
    if ret < 0 {
        Err(PhyError::Device(format!("{what}: {}", rte_strerror(ret))))
    } else {
        Ok(())
    }
}
