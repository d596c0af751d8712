//! iscsi-bypass: a kernel-bypass, multipath iSCSI initiator.
//!
//! Layer order (each layer imports only from the layers before it):
//! `wire`, `clock` ← `phy` ← `net` ← `transport` ← `iscsi` ← `scsi` ←
//! `multipath` ← `worker` ← {`bench`, `nbd`} ← the CLI (`src/main.rs`,
//! `src/cli/`). `target`, the embedded iSCSI target, uses `wire`, `iscsi`
//! (`chap`, `params`) and, for its DPDK listener, the userspace stack
//! (`phy`, `net`, `transport`); the CLI and the tests run it.
//! The architecture (layers, threads, data path, `unsafe`, tests):
//! `docs/architecture.md`.
//!
//! # The library API
//!
//! An application opens one [`Device`] (a multipath LU: one iSCSI session
//! per path, one poll-mode worker thread per path), then takes one
//! [`IoQueue`] per application thread and submits [`Io`]s on it:
//!
//! ```no_run
//! use iscsi_bypass::{Device, Io, IoCompletion, Options};
//! use std::time::Duration;
//! let dev = Device::open_urls(&["iscsi://10.0.1.2/iqn.2003-01.org.example:disk/0",
//!                               "iscsi://10.0.2.2/iqn.2003-01.org.example:disk/0"],
//!                             &Options::default())?;
//! let mut q = dev.queue_pair();
//! // Polling: submit without waiting, collect completions (buffers come back).
//! q.submit(Io::write(0, 8, vec![0xab; 4096], 1)).map_err(|e| e.to_string())?;
//! q.submit(Io::flush(2)).map_err(|e| e.to_string())?;
//! let mut done: Vec<IoCompletion> = Vec::with_capacity(64);
//! q.wait_completions(&mut done, 2, Duration::from_secs(5));
//! // Blocking convenience on the same queue.
//! let mut buf = vec![0u8; 4096];
//! q.read_at(0, &mut buf)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Errors are typed: [`IoError`] carries the SCSI status and decoded sense
//! ([`ScsiError`], [`SenseData`]), retries that ran out, and
//! [`IoError::NoPath`] when every path stayed down for `no_path_timeout`;
//! [`IoCompletion::retries`] counts the path-level resubmissions that
//! succeeded. Which calls may run on which threads: `docs/threading.md`.
//!
//! SCSI persistent reservations (for cluster databases and fencing) are
//! methods on the device: [`WorkerDevice::pr_register_and_ignore`],
//! [`pr_reserve`](WorkerDevice::pr_reserve),
//! [`pr_read_keys`](WorkerDevice::pr_read_keys),
//! [`pr_preempt_and_abort`](WorkerDevice::pr_preempt_and_abort) and the
//! rest; they fail with a typed [`PrError`], RESERVATION CONFLICT
//! included, and an I/O the reservation forbids fails with
//! [`IoError::is_reservation_conflict`].
#![deny(unsafe_code)]

pub mod bench;
pub mod clock;
pub mod iscsi;
pub mod metrics;
pub mod multipath;
pub mod nbd;
pub mod net;
pub mod phy;
pub mod scsi;
pub mod target;
pub mod transport;
pub mod wire;
pub mod worker;

pub use iscsi::chap::ChapAlgorithm;
pub use multipath::{
    DeviceConfig, IdleMode, Io, IoCompletion, IoError, IoOp, MultipathError, PathConfig, PathState,
    PathStats, Policy, PortBinding,
};
pub use scsi::ScsiError;
pub use wire::scsi::pr::{
    PrCapabilities, PrHolder, PrInAction, PrKeys, PrOutAction, PrReservation, PrType,
};
pub use wire::scsi::{SenseData, SenseKey};
pub use worker::{Chap, IoQueue, Options, PrError, SubmitError, Transport, WorkerDevice};

/// The application-facing multipath device ([`WorkerDevice`]).
pub type Device = WorkerDevice;
