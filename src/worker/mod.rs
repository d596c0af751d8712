//! Worker layer: per-path poll-mode workers, the lock-free rings between
//! them and the application, and the application-facing multipath device.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod device;
mod open;
mod path_worker;
pub mod poll_meter;
pub mod ring;

pub use crate::multipath::{
    DeviceConfig, IdleMode, Io, IoCompletion, IoError, IoOp, PathConfig, PathState, PathStats,
    Policy,
};
pub use device::{IoQueue, MultipathDevice, SubmitError};
pub use open::{Chap, Options, Transport};

/// Lets the calling thread's short sleeps end on time: Linux pads every
/// timed wait by the thread's timer slack (50 µs by default), which
/// turned a 20 µs idle nap of a poller into ~70 µs of added latency.
/// Best effort (a 1 µs slack).
pub fn precise_timers() {
    let _ = nix::sys::prctl::set_timerslack(1_000);
}
