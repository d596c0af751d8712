//! Worker layer: per-path poll-mode workers, the lock-free rings between
//! them and the application, and the application-facing multipath device.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod device;
mod open;
mod path_worker;
pub mod ring;

pub use crate::multipath::{
    DeviceConfig, IdleMode, Io, IoCompletion, IoError, IoOp, PathConfig, PathState, PathStats,
    Policy,
};
pub use device::{IoQueue, MultipathDevice, SubmitError};
pub use open::{Chap, Options, Transport};
