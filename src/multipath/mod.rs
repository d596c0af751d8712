//! Multipath: paths (port bindings), grouping paths to the same logical unit
//! by their VPD 83h designator, ALUA path priorities, selectors
//! (queue-depth, service-time, historical-service-time, round-robin,
//! failover), the path state
//! machine with reconnect back-off, and the retry policy for I/O.
//!
//! This layer is logic and shared state only; the threads, rings and the
//! application-facing device that run it live one layer up, in
//! [`crate::worker`] (`worker::WorkerDevice`, `worker::IoQueue`).
#![warn(missing_docs)]

pub mod config;
pub mod dispatch;
pub mod fence;
pub mod health;
pub mod io;
pub mod path;
pub mod probe;
pub mod selector;
pub mod silence;

pub use config::{
    AddrConnector, BoxedTransport, Connector, DeviceConfig, IdleMode, PathConfig, PathConnector,
    PortBinding,
};
pub use config::{ConfigError, DiscoveryError};
pub use dispatch::{
    Action, DispatchConfig, DispatchError, Dispatcher, PathResponse, PathTable, MAX_ABORTS,
    MAX_CONFLICT_RETRIES,
};
pub use fence::{
    AbortError, AbortPolicy, FenceBoard, FenceError, FenceJob, FenceNeed, ReservationFence,
    TaskAborts,
};
pub use health::{BadSetting, Failback, FlapDamping, NoPathRetry};
pub use io::{Io, IoCompletion, IoError, IoOp, LuCaps};
pub use path::{
    Nexus, PathEvent, PathHealth, PathLoad, PathShared, PathState, PathStats, ReconnectPolicy,
};
pub use selector::{select, Policy, SelectorState};
pub use silence::{FastPing, SilenceVerdict, SilenceWatch};

use crate::scsi::ScsiError;
use thiserror::Error;

/// Errors of opening and running a multipath device.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MultipathError {
    /// The configuration is unusable: no paths, a URL that does not parse
    /// or names another target/LUN than the first, or a transport that
    /// cannot serve a path. The [`ConfigError`] says which.
    #[error("bad configuration: {0}")]
    Config(#[from] ConfigError),
    /// SendTargets discovery failed: the portal could not be reached, or it
    /// did not report the target or any usable portal for it.
    #[error("discovery failed: {0}")]
    Discovery(#[from] DiscoveryError),
    /// A path could not connect, log in, or keep its session while being
    /// probed.
    #[error("path {path}: login failed: {reason}")]
    Login {
        /// The path's name ([`PathConfig::name`]).
        path: String,
        /// The transport, login or session error, as text.
        reason: String,
    },
    /// A SCSI command sent while probing a path (TEST UNIT READY, READ
    /// CAPACITY(16), INQUIRY VPD 83h) failed or returned malformed data.
    #[error("path {path}: {what} failed: {error}")]
    Scsi {
        /// The path's name ([`PathConfig::name`]).
        path: String,
        /// The command that failed, e.g. `"READ CAPACITY(16)"`.
        what: &'static str,
        /// The SCSI status, sense or parse error.
        error: ScsiError,
    },
    /// The LU behind a path has no VPD 83h designator to identify it by, so
    /// the path cannot be grouped with others.
    #[error("path {path}: the logical unit reports no usable VPD 83h designator, so it cannot be matched with other paths")]
    NoLuIdentity {
        /// The path's name ([`PathConfig::name`]).
        path: String,
    },
    /// Two paths lead to different logical units (VPD 83h designators
    /// differ); the device refuses to open rather than mix them.
    #[error("path {path} leads to logical unit {found}, but path {first_path} leads to {expected}: refusing to group different LUs into one device")]
    DifferentLogicalUnits {
        /// The first path that logged in; its LU is the device's.
        first_path: String,
        /// The LU designator of `first_path`, e.g. `naa.6000...`.
        expected: String,
        /// The path that leads elsewhere.
        path: String,
        /// The LU designator `path` reported.
        found: String,
    },
    /// A path reports another capacity or block size than the first path
    /// that logged in.
    #[error("path {path} reports {found}, but the device has {expected}")]
    GeometryMismatch {
        /// The path that disagrees.
        path: String,
        /// The device's geometry, as `"<N> blocks of <size>"`.
        expected: String,
        /// What `path` reported, in the same form.
        found: String,
    },
    /// No path could be logged in and probed at open; one error message per
    /// path that failed.
    #[error("no path could be logged in: {}", .0.join("; "))]
    NoPathUp(Vec<String>),
    /// A worker or login thread could not be spawned (or all login threads
    /// panicked).
    #[error(transparent)]
    Thread(#[from] ThreadError),
    /// MC/S (`DeviceConfig::mcs`): the leading login was granted fewer
    /// connections than the device has paths (as
    /// `iscsi::mcs::McsError::NotGranted`).
    #[error(
        "the target granted MaxConnections={granted} (we offered {offered}): connection {wanted} of the session is not allowed; use sessions of their own (MPIO) instead"
    )]
    McsNotGranted {
        /// The MaxConnections offered (the number of paths).
        offered: u32,
        /// What the target answered.
        granted: u32,
        /// Connections the device needs.
        wanted: usize,
    },
}

/// A thread of the device could not run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ThreadError {
    /// The OS refused to start a worker thread.
    #[error("cannot start worker thread {name}: {error}")]
    Spawn {
        /// The thread's name, e.g. `mp-worker-0`.
        name: String,
        /// The spawn error.
        #[source]
        error: Cause<std::io::Error>,
    },
    /// Every path's login thread panicked at open.
    #[error("cannot open: every login thread panicked")]
    LoginThreadsPanicked,
}

/// The cause of an error that must stay `Clone` and comparable: shared by
/// the clones, compared by what it says.
#[derive(Debug)]
pub struct Cause<E>(pub std::sync::Arc<E>);

impl<E> Clone for Cause<E> {
    fn clone(&self) -> Self {
        Cause(self.0.clone())
    }
}

impl<E> From<E> for Cause<E> {
    fn from(e: E) -> Self {
        Cause(std::sync::Arc::new(e))
    }
}

impl<E: std::fmt::Display> std::fmt::Display for Cause<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Cause<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl<E: std::fmt::Display> PartialEq for Cause<E> {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl<E: std::fmt::Display> Eq for Cause<E> {}
