//! Multipath: paths (port bindings), grouping paths to the same logical unit
//! by their VPD 83h designator, ALUA path priorities, selectors
//! (queue-depth, service-time, round-robin, failover), the path state
//! machine with reconnect back-off, and the retry policy for I/O.
//!
//! This layer is logic and shared state only; the threads, rings and the
//! application-facing device that run it live one layer up, in
//! [`crate::worker`] (`worker::MultipathDevice`, `worker::IoQueue`).
#![deny(unsafe_code)]

pub mod config;
pub mod io;
pub mod path;
pub mod probe;
pub mod selector;

pub use config::{BoxedTransport, Connector, DeviceConfig, IdleMode, PathConfig};
pub use io::{Io, IoCompletion, IoError, IoOp};
pub use path::{
    PathEvent, PathHealth, PathLoad, PathShared, PathState, PathStats, ReconnectPolicy,
};
pub use selector::{select, Policy, SelectorState};

use crate::scsi::ScsiError;
use thiserror::Error;

/// Errors of opening and running a multipath device.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MultipathError {
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("discovery failed: {0}")]
    Discovery(String),
    #[error("path {path}: login failed: {reason}")]
    Login { path: String, reason: String },
    #[error("path {path}: {what} failed: {error}")]
    Scsi {
        path: String,
        what: &'static str,
        error: ScsiError,
    },
    #[error("path {path}: the logical unit reports no usable VPD 83h designator, so it cannot be matched with other paths")]
    NoLuIdentity { path: String },
    #[error("path {path} leads to logical unit {found}, but path {first_path} leads to {expected}: refusing to group different LUs into one device")]
    DifferentLogicalUnits {
        first_path: String,
        expected: String,
        path: String,
        found: String,
    },
    #[error("path {path} reports {found}, but the device has {expected}")]
    GeometryMismatch {
        path: String,
        expected: String,
        found: String,
    },
    #[error("no path could be logged in: {}", .0.join("; "))]
    NoPathUp(Vec<String>),
    #[error("cannot start worker thread: {0}")]
    Thread(String),
}
