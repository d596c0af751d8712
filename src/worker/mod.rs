//! Worker layer: per-path poll-mode workers, the lock-free rings between
//! them and the application, and the application-facing multipath device.
#![warn(missing_docs)]

mod device;
mod helper;
mod mcs;
mod open;
mod path_worker;
pub mod poll_meter;
mod reservations;
pub mod ring;

pub use crate::multipath::{
    DeviceConfig, IdleMode, Io, IoCompletion, IoError, IoOp, PathConfig, PathState, PathStats,
    Policy, PortBinding,
};
pub use device::{IoQueue, SubmitError, WorkerDevice};
#[cfg(feature = "dpdk")]
pub use open::{dpdk_path_maker, dpdk_port_iface};
pub use open::{Chap, DiscoveredPaths, Options, Transport, UnreachablePair};
pub use reservations::{PrError, PR_TIMEOUT};

/// Lets the calling thread's short sleeps end on time: Linux pads every
/// timed wait by the thread's timer slack (50 µs by default), which
/// turned a 20 µs idle nap of a poller into ~70 µs of added latency.
/// Best effort (a 1 µs slack).
pub fn precise_timers() {
    let _ = nix::sys::prctl::set_timerslack(1_000);
}
