//! SCSI persistent reservations for applications (cluster databases,
//! cluster file systems, fencing agents), on [`WorkerDevice`].
//!
//! Each path is its own iSCSI session, so its own I_T nexus: a key must be
//! registered on every path for the host to keep access over all of them
//! (as `mpathpersist` does for dm-multipath). [`WorkerDevice::pr_register`]
//! and [`WorkerDevice::pr_register_and_ignore`] therefore register on
//! every path that is up; the other actions go down one path. Use a
//! registrants-only or all-registrants type (WE-RO, EA-RO, WE-AR, EA-AR)
//! when the host writes over several paths: under WE or EA only the one
//! I_T nexus that reserved may write, and the host's other paths get
//! RESERVATION CONFLICT like any other initiator.
//!
//! A path that logs in later is not registered by itself: call
//! [`WorkerDevice::pr_register_and_ignore`] again (it is idempotent).
//! A READ or WRITE the reservation forbids completes with
//! `IoError::Scsi(ScsiError::ReservationConflict)` (not retried; see
//! [`IoError::is_reservation_conflict`](crate::IoError::is_reservation_conflict)).
#![warn(missing_docs)]

use super::device::WorkerDevice;
use crate::iscsi::connection::Direction;
use crate::multipath::PathState;
use crate::scsi::{check_status, ScsiCommand, ScsiError, PR_IN_ALLOC_LEN};
use crate::wire::scsi::pr::{
    PrCapabilities, PrInAction, PrKeys, PrOutAction, PrOutParams, PrReservation, PrType,
};
use crate::wire::scsi::{DataRepr, ScsiWireError};
use std::time::Duration;
use thiserror::Error;

/// How long one reservation command may take before [`PrError::Timeout`].
pub const PR_TIMEOUT: Duration = Duration::from_secs(30);

/// Tries of one command that meets UNIT ATTENTION, BUSY or the like.
const PR_TRIES: u32 = 5;

/// Why a persistent reservation command failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PrError {
    /// RESERVATION CONFLICT: the key given is not this I_T nexus's, the
    /// nexus is not registered, or another holds the reservation.
    #[error("RESERVATION CONFLICT on path {path}")]
    ReservationConflict {
        /// The path (I_T nexus) the command went down.
        path: usize,
    },
    /// Another SCSI error (e.g. ILLEGAL REQUEST: the target does not
    /// support persistent reservations, or a field was invalid).
    #[error("path {path}: {error}")]
    Scsi {
        /// The path the command went down.
        path: usize,
        /// The status and sense.
        error: ScsiError,
    },
    /// The iSCSI layer reported a target failure (response code).
    #[error("path {path}: the target answered with iSCSI response {response:#04x}")]
    TargetFailure {
        /// The path the command went down.
        path: usize,
        /// The iSCSI response code.
        response: u8,
    },
    /// The parameter data that came back does not parse.
    #[error("path {path}: {error}")]
    BadData {
        /// The path the command went down.
        path: usize,
        /// What is wrong with it.
        error: ScsiWireError,
    },
    /// The path is not up, or failed before the target answered.
    #[error("path {path} is not up")]
    PathDown {
        /// The path.
        path: usize,
    },
    /// No path is up.
    #[error("no path is up")]
    NoPathUp,
    /// No answer within [`PR_TIMEOUT`].
    #[error("path {path}: no answer within {waited:?}")]
    Timeout {
        /// The path.
        path: usize,
        /// How long it waited.
        waited: Duration,
    },
}

impl PrError {
    /// Whether the target answered RESERVATION CONFLICT.
    pub fn is_reservation_conflict(&self) -> bool {
        matches!(self, PrError::ReservationConflict { .. })
    }
}

impl WorkerDevice {
    fn up_paths(&self) -> Vec<usize> {
        self.paths()
            .iter()
            .filter(|p| p.state == PathState::Up)
            .map(|p| p.index)
            .collect()
    }

    fn first_up_path(&self) -> Result<usize, PrError> {
        self.up_paths().first().copied().ok_or(PrError::NoPathUp)
    }

    /// Runs `cmd` on `path`, retrying UNIT ATTENTION and other retryable
    /// statuses a few times; the data-in on success.
    fn pr_command(
        &self,
        path: usize,
        cmd: &ScsiCommand,
        direction: Direction,
        data: &[u8],
    ) -> Result<Vec<u8>, PrError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let buffer = match direction {
                Direction::Read => vec![0; cmd.transfer_len() as usize],
                _ => data.to_vec(),
            };
            let c = match self.path_command(path, cmd, direction, buffer, PR_TIMEOUT) {
                Ok(Some(c)) => c,
                Ok(None) => return Err(PrError::PathDown { path }),
                Err(()) => {
                    return Err(PrError::Timeout {
                        path,
                        waited: PR_TIMEOUT,
                    })
                }
            };
            if c.response != 0 {
                return Err(PrError::TargetFailure {
                    path,
                    response: c.response,
                });
            }
            match check_status(c.status, &c.sense) {
                Ok(()) => {
                    let mut b = c.buffer;
                    b.truncate(c.transferred.min(b.len()));
                    return Ok(b);
                }
                Err(ScsiError::ReservationConflict) => {
                    return Err(PrError::ReservationConflict { path })
                }
                Err(e) if e.is_retryable() && tries < PR_TRIES => {
                    if e.unit_attention().is_none() {
                        std::thread::sleep(Duration::from_millis(10 << tries));
                    }
                }
                Err(error) => return Err(PrError::Scsi { path, error }),
            }
        }
    }

    /// PERSISTENT RESERVE IN with `action` on path `path`: the raw
    /// parameter data (see [`PrKeys`], [`PrReservation`],
    /// [`PrCapabilities`] to decode it).
    pub fn pr_in_on_path(&self, path: usize, action: PrInAction) -> Result<Vec<u8>, PrError> {
        let cmd = ScsiCommand::persistent_reserve_in(action, PR_IN_ALLOC_LEN);
        self.pr_command(path, &cmd, Direction::Read, &[])
    }

    /// PERSISTENT RESERVE OUT with `action` on path `path` (that path's
    /// I_T nexus), with `key` as RESERVATION KEY and `sa_key` as SERVICE
    /// ACTION RESERVATION KEY; `pr_type` for RESERVE, RELEASE, PREEMPT
    /// and PREEMPT AND ABORT.
    pub fn pr_out_on_path(
        &self,
        path: usize,
        action: PrOutAction,
        pr_type: Option<PrType>,
        key: u64,
        sa_key: u64,
    ) -> Result<(), PrError> {
        let params = PrOutParams {
            key,
            sa_key,
            ..PrOutParams::default()
        };
        let (cmd, data) = ScsiCommand::persistent_reserve_out(action, pr_type, &params);
        self.pr_command(path, &cmd, Direction::Write, &data)
            .map(|_| ())
    }

    fn on_every_up_path(
        &self,
        action: PrOutAction,
        pr_type: Option<PrType>,
        key: u64,
        sa_key: u64,
    ) -> Result<(), PrError> {
        let paths = self.up_paths();
        if paths.is_empty() {
            return Err(PrError::NoPathUp);
        }
        for p in paths {
            self.pr_out_on_path(p, action, pr_type, key, sa_key)?;
        }
        Ok(())
    }

    /// READ KEYS: the generation and every registered key (one per
    /// registered I_T nexus, so a host registered on two paths shows its
    /// key twice).
    pub fn pr_read_keys(&self) -> Result<PrKeys, PrError> {
        let path = self.first_up_path()?;
        let data = self.pr_in_on_path(path, PrInAction::ReadKeys)?;
        PrKeys::parse(&data).map_err(|error| PrError::BadData { path, error })
    }

    /// READ RESERVATION: the reservation's holder key and type, if any.
    pub fn pr_read_reservation(&self) -> Result<PrReservation, PrError> {
        let path = self.first_up_path()?;
        let data = self.pr_in_on_path(path, PrInAction::ReadReservation)?;
        PrReservation::parse(&data).map_err(|error| PrError::BadData { path, error })
    }

    /// REPORT CAPABILITIES: which types and options the target supports.
    pub fn pr_capabilities(&self) -> Result<PrCapabilities, PrError> {
        let path = self.first_up_path()?;
        let data = self.pr_in_on_path(path, PrInAction::ReportCapabilities)?;
        PrCapabilities::parse(&data).map_err(|error| PrError::BadData { path, error })
    }

    /// REGISTER on every path that is up: replaces `old_key` (0 when not
    /// registered) with `new_key`; a `new_key` of 0 unregisters (and
    /// releases a reservation the path held). A path whose current key is
    /// not `old_key` gets [`PrError::ReservationConflict`].
    pub fn pr_register(&self, old_key: u64, new_key: u64) -> Result<(), PrError> {
        self.on_every_up_path(PrOutAction::Register, None, old_key, new_key)
    }

    /// REGISTER AND IGNORE EXISTING KEY on every path that is up: `key`
    /// becomes this host's key whatever was registered before (0
    /// unregisters). Idempotent: call it again after a path logs in anew.
    pub fn pr_register_and_ignore(&self, key: u64) -> Result<(), PrError> {
        self.on_every_up_path(PrOutAction::RegisterAndIgnoreExistingKey, None, 0, key)
    }

    /// RESERVE with `key` (registered) and `pr_type`, down the first path
    /// that is up (that path's I_T nexus becomes the holder; for WE and EA
    /// only it may then write, see the module docs).
    pub fn pr_reserve(&self, key: u64, pr_type: PrType) -> Result<(), PrError> {
        let path = self.first_up_path()?;
        self.pr_out_on_path(path, PrOutAction::Reserve, Some(pr_type), key, 0)
    }

    /// RELEASE of the reservation of `pr_type` held with `key`. Sent down
    /// every path that is up: a path that is not the holder does nothing.
    pub fn pr_release(&self, key: u64, pr_type: PrType) -> Result<(), PrError> {
        self.on_every_up_path(PrOutAction::Release, Some(pr_type), key, 0)
    }

    /// CLEAR: removes every registration (every host's) and the
    /// reservation. `key` must be registered.
    pub fn pr_clear(&self, key: u64) -> Result<(), PrError> {
        let path = self.first_up_path()?;
        self.pr_out_on_path(path, PrOutAction::Clear, None, key, 0)
    }

    /// PREEMPT: removes the registrations of `victim_key` and, if that key
    /// held the reservation, takes it over with `pr_type`. `key` is ours.
    pub fn pr_preempt(&self, key: u64, victim_key: u64, pr_type: PrType) -> Result<(), PrError> {
        let path = self.first_up_path()?;
        self.pr_out_on_path(path, PrOutAction::Preempt, Some(pr_type), key, victim_key)
    }

    /// PREEMPT AND ABORT: as [`pr_preempt`](Self::pr_preempt), and the
    /// target aborts every task of the preempted I_T nexuses, so nothing
    /// they sent before can still land (how a cluster fences a node).
    pub fn pr_preempt_and_abort(
        &self,
        key: u64,
        victim_key: u64,
        pr_type: PrType,
    ) -> Result<(), PrError> {
        let path = self.first_up_path()?;
        self.pr_out_on_path(
            path,
            PrOutAction::PreemptAndAbort,
            Some(pr_type),
            key,
            victim_key,
        )
    }
}
