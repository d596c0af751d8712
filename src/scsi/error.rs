//! Command outcome: SCSI status + sense decoded into [`ScsiError`], and a
//! retry classification for the multipath layer.
#![warn(missing_docs)]

use crate::wire::scsi::{asc, DataRepr, ScsiStatus, ScsiWireError, SenseData, SenseKey};
use thiserror::Error;

/// Errors of the SCSI layer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScsiError {
    /// CHECK CONDITION with parsed sense data (key, ASC/ASCQ) saying why.
    #[error("CHECK CONDITION: {sense}")]
    CheckCondition {
        /// The decoded sense data.
        sense: SenseData,
    },
    /// CHECK CONDITION whose sense data was missing or malformed.
    #[error("CHECK CONDITION with unusable sense data: {0}")]
    CheckConditionNoSense(ScsiWireError),
    /// BUSY status: the LU cannot take the command now; retryable.
    #[error("BUSY")]
    Busy,
    /// RESERVATION CONFLICT status: another initiator holds a reservation
    /// on the LU; not retried.
    #[error("RESERVATION CONFLICT")]
    ReservationConflict,
    /// TASK SET FULL status: the LU's command queue is full; retryable.
    #[error("TASK SET FULL")]
    TaskSetFull,
    /// ACA ACTIVE status: an auto contingent allegiance condition blocks
    /// the command; retryable.
    #[error("ACA ACTIVE")]
    AcaActive,
    /// TASK ABORTED status: the command was aborted by another initiator or
    /// the device server; retryable.
    #[error("TASK ABORTED")]
    TaskAborted,
    /// A status byte this crate does not know (the raw value); fatal.
    #[error("unknown SCSI status {0:#04x}")]
    UnknownStatus(u8),
    /// Response data that does not parse.
    #[error("malformed response data: {0}")]
    BadData(#[from] ScsiWireError),
    /// `blocks × block_size` is 4 GiB or more, beyond the 32-bit transfer
    /// length of one command; the command is not built.
    #[error("transfer of {blocks} blocks of {block_size} bytes exceeds 4 GiB")]
    TransferTooLarge {
        /// Blocks asked for.
        blocks: u32,
        /// Logical block size in bytes.
        block_size: u32,
    },
    /// More UNMAP block descriptors (the count given) than one parameter
    /// list can hold; the command is not built.
    #[error("{0} UNMAP descriptors do not fit one parameter list")]
    TooManyDescriptors(usize),
}

/// What the caller should do about a failed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ErrorClass {
    /// Transient: retry (after a short delay), on this path or any other.
    Retryable,
    /// The path (target port) cannot serve the LU now (ALUA standby,
    /// unavailable, access state changed): refresh REPORT TARGET PORT
    /// GROUPS and retry on another path.
    PathLevel,
    /// Retrying will not help: report the error to the submitter.
    Fatal,
}

/// Kinds of UNIT ATTENTION the upper layers act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitAttention {
    /// 29h/xx: power on, reset, I_T nexus loss.
    PowerOnReset,
    /// 2Ah/06h and 2Ah/07h: re-read REPORT TARGET PORT GROUPS.
    AluaStateChanged,
    /// 2Ah/09h: re-read the capacity.
    CapacityChanged,
    /// 2Ah/other: mode, log or reservation parameters changed.
    ParametersChanged,
    /// 3Fh/0Eh: rescan with REPORT LUNS.
    ReportedLunsChanged,
    /// 3Fh/03h, 3Fh/05h: re-read INQUIRY / device identification.
    InquiryDataChanged,
    /// 28h/00h: not ready to ready transition, medium may have changed.
    MediumChanged,
    /// 2Fh/xx: commands cleared by another initiator or the device server.
    CommandsCleared,
    /// Any other UNIT ATTENTION (retried, no further action).
    Other,
}

impl UnitAttention {
    /// The kind of UNIT ATTENTION `s` reports, from its ASC/ASCQ; `None`
    /// when the sense key is not UNIT ATTENTION.
    pub fn from_sense(s: &SenseData) -> Option<UnitAttention> {
        if s.key != SenseKey::UnitAttention {
            return None;
        }
        Some(match (s.asc, s.ascq) {
            (0x29, _) => UnitAttention::PowerOnReset,
            (0x2a, 0x06) | (0x2a, 0x07) => UnitAttention::AluaStateChanged,
            (0x2a, 0x09) => UnitAttention::CapacityChanged,
            (0x2a, _) => UnitAttention::ParametersChanged,
            (0x3f, 0x0e) => UnitAttention::ReportedLunsChanged,
            (0x3f, 0x03) | (0x3f, 0x05) => UnitAttention::InquiryDataChanged,
            (0x28, 0x00) => UnitAttention::MediumChanged,
            (0x2f, _) => UnitAttention::CommandsCleared,
            _ => UnitAttention::Other,
        })
    }
}

/// Classify sense data of a CHECK CONDITION.
pub fn classify_sense(s: &SenseData) -> ErrorClass {
    match s.key {
        SenseKey::UnitAttention => match UnitAttention::from_sense(s) {
            Some(UnitAttention::AluaStateChanged) => ErrorClass::PathLevel,
            _ => ErrorClass::Retryable,
        },
        SenseKey::NotReady => match s.code() {
            asc::ALUA_STANDBY | asc::ALUA_UNAVAILABLE => ErrorClass::PathLevel,
            // 04h/0Ah (ALUA transitioning), becoming ready, operation or
            // format in progress, cause not reportable.
            asc::LUN_NOT_READY_INIT_REQUIRED | asc::LUN_NOT_READY_MANUAL_INTERVENTION => {
                ErrorClass::Fatal
            }
            (0x04, 0x12) => ErrorClass::PathLevel,
            (0x04, _) => ErrorClass::Retryable,
            _ => ErrorClass::Fatal,
        },
        SenseKey::AbortedCommand => ErrorClass::Retryable,
        SenseKey::NoSense | SenseKey::RecoveredError | SenseKey::Completed => ErrorClass::Retryable,
        SenseKey::MediumError
        | SenseKey::HardwareError
        | SenseKey::IllegalRequest
        | SenseKey::DataProtect
        | SenseKey::BlankCheck
        | SenseKey::VendorSpecific
        | SenseKey::CopyAborted
        | SenseKey::Reserved
        | SenseKey::VolumeOverflow
        | SenseKey::Miscompare => ErrorClass::Fatal,
    }
}

impl ScsiError {
    /// Retry classification: UNIT ATTENTION, BUSY, TASK SET FULL, TASK
    /// ABORTED, ABORTED COMMAND and NOT READY "in progress" / ALUA
    /// transitioning are retryable; ALUA standby/unavailable and access
    /// state changes are path-level; medium, hardware, illegal request,
    /// data protect and reservation conflicts are fatal.
    pub fn class(&self) -> ErrorClass {
        match self {
            ScsiError::CheckCondition { sense } => classify_sense(sense),
            ScsiError::Busy
            | ScsiError::TaskSetFull
            | ScsiError::TaskAborted
            | ScsiError::AcaActive
            | ScsiError::CheckConditionNoSense(_) => ErrorClass::Retryable,
            ScsiError::ReservationConflict
            | ScsiError::UnknownStatus(_)
            | ScsiError::BadData(_)
            | ScsiError::TransferTooLarge { .. }
            | ScsiError::TooManyDescriptors(_) => ErrorClass::Fatal,
        }
    }
    /// Whether [`class`](Self::class) is [`ErrorClass::Retryable`].
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Retryable
    }
    /// Whether [`class`](Self::class) is [`ErrorClass::PathLevel`]: retry on
    /// another path.
    pub fn is_path_error(&self) -> bool {
        self.class() == ErrorClass::PathLevel
    }
    /// Whether [`class`](Self::class) is [`ErrorClass::Fatal`].
    pub fn is_fatal(&self) -> bool {
        self.class() == ErrorClass::Fatal
    }
    /// The sense data, for [`ScsiError::CheckCondition`] only.
    pub fn sense(&self) -> Option<&SenseData> {
        match self {
            ScsiError::CheckCondition { sense } => Some(sense),
            _ => None,
        }
    }
    /// The UNIT ATTENTION condition reported, if any.
    pub fn unit_attention(&self) -> Option<UnitAttention> {
        self.sense().and_then(UnitAttention::from_sense)
    }
    /// The status byte that carries this error, where there is one.
    pub fn status(&self) -> Option<ScsiStatus> {
        Some(match self {
            ScsiError::CheckCondition { .. } | ScsiError::CheckConditionNoSense(_) => {
                ScsiStatus::CheckCondition
            }
            ScsiError::Busy => ScsiStatus::Busy,
            ScsiError::ReservationConflict => ScsiStatus::ReservationConflict,
            ScsiError::TaskSetFull => ScsiStatus::TaskSetFull,
            ScsiError::AcaActive => ScsiStatus::AcaActive,
            ScsiError::TaskAborted => ScsiStatus::TaskAborted,
            _ => return None,
        })
    }
}

/// Decode a command's outcome from its status byte and sense bytes (the
/// sense data itself, without iSCSI's 2-byte SenseLength prefix).
///
/// GOOD and CONDITION MET succeed; so does CHECK CONDITION with RECOVERED
/// ERROR or COMPLETED sense (the command completed; the sense is
/// informational).
pub fn check_status(status: u8, sense: &[u8]) -> Result<(), ScsiError> {
    match ScsiStatus::from_u8(status) {
        Ok(ScsiStatus::Good) | Ok(ScsiStatus::ConditionMet) => Ok(()),
        Ok(ScsiStatus::CheckCondition) => match SenseData::parse(sense) {
            Ok(s) if matches!(s.key, SenseKey::RecoveredError | SenseKey::Completed) => Ok(()),
            Ok(sense) => Err(ScsiError::CheckCondition { sense }),
            Err(e) => Err(ScsiError::CheckConditionNoSense(e)),
        },
        Ok(ScsiStatus::Busy) => Err(ScsiError::Busy),
        Ok(ScsiStatus::ReservationConflict) => Err(ScsiError::ReservationConflict),
        Ok(ScsiStatus::TaskSetFull) => Err(ScsiError::TaskSetFull),
        Ok(ScsiStatus::AcaActive) => Err(ScsiError::AcaActive),
        Ok(ScsiStatus::TaskAborted) => Err(ScsiError::TaskAborted),
        Err(_) => Err(ScsiError::UnknownStatus(status)),
    }
}
