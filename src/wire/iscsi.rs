//! iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment (BHS), the
//! optional AHS, header digest, data segment with padding, and data digest.
//!
//! [`Bhs`] is a checked view of the 48 header bytes; [`PduHeader`] is the
//! typed representation of every opcode the initiator or the embedded target
//! sends or receives, with `parse`/`emit`. [`PduFramer`] finds PDU boundaries
//! in a byte stream and verifies digests. Nothing here panics on any input.

use std::fmt;
use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// Length of a CRC32C digest on the wire.
pub const DIGEST_LEN: usize = 4;
/// The reserved "no task" tag.
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// Largest DataSegmentLength the 24-bit field can carry.
pub const MAX_DATA_SEGMENT_LEN: u32 = 0x00ff_ffff;

/// Errors found while decoding iSCSI PDUs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IscsiWireError {
    #[error("PDU header too short: {0} bytes, need 48")]
    Truncated(usize),
    #[error("unknown iSCSI opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("header digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    HeaderDigest { received: u32, computed: u32 },
    #[error("data digest mismatch (received {received:#010x}, computed {computed:#010x})")]
    DataDigest { received: u32, computed: u32 },
    #[error("DataSegmentLength {len} exceeds the negotiated maximum of {max}")]
    DataSegmentTooLong { len: u32, max: u32 },
    #[error("login stage {0} is not a valid stage code")]
    BadStage(u8),
    #[error("{opcode} PDU must not carry a data segment ({len} bytes)")]
    UnexpectedData { opcode: Opcode, len: u32 },
}

/// Serial number arithmetic (RFC 1982, 32 bits) for CmdSN, StatSN, DataSN, R2TSN.
/// Comparisons are deliberately methods, not `Ord`: the order wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Sn(pub u32);

impl Sn {
    pub fn next(self) -> Sn {
        Sn(self.0.wrapping_add(1))
    }
    pub fn plus(self, n: u32) -> Sn {
        Sn(self.0.wrapping_add(n))
    }
    /// Signed distance `self - other` in serial arithmetic.
    pub fn diff(self, other: Sn) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }
    pub fn lt(self, other: Sn) -> bool {
        self.diff(other) < 0
    }
    pub fn le(self, other: Sn) -> bool {
        self.diff(other) <= 0
    }
    pub fn gt(self, other: Sn) -> bool {
        self.diff(other) > 0
    }
    pub fn ge(self, other: Sn) -> bool {
        self.diff(other) >= 0
    }
}

impl fmt::Display for Sn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// iSCSI opcodes (RFC 7143 §11.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    Snack = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Result<Opcode, IscsiWireError> {
        Ok(match v & 0x3f {
            0x00 => Opcode::NopOut,
            0x01 => Opcode::ScsiCommand,
            0x02 => Opcode::TaskMgmtRequest,
            0x03 => Opcode::LoginRequest,
            0x04 => Opcode::TextRequest,
            0x05 => Opcode::DataOut,
            0x06 => Opcode::LogoutRequest,
            0x10 => Opcode::Snack,
            0x20 => Opcode::NopIn,
            0x21 => Opcode::ScsiResponse,
            0x22 => Opcode::TaskMgmtResponse,
            0x23 => Opcode::LoginResponse,
            0x24 => Opcode::TextResponse,
            0x25 => Opcode::DataIn,
            0x26 => Opcode::LogoutResponse,
            0x31 => Opcode::R2t,
            0x32 => Opcode::AsyncMessage,
            0x3f => Opcode::Reject,
            other => return Err(IscsiWireError::UnknownOpcode(other)),
        })
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Opcode::NopOut => "NOP-Out",
            Opcode::ScsiCommand => "SCSI Command",
            Opcode::TaskMgmtRequest => "Task Management Request",
            Opcode::LoginRequest => "Login Request",
            Opcode::TextRequest => "Text Request",
            Opcode::DataOut => "Data-Out",
            Opcode::LogoutRequest => "Logout Request",
            Opcode::Snack => "SNACK",
            Opcode::NopIn => "NOP-In",
            Opcode::ScsiResponse => "SCSI Response",
            Opcode::TaskMgmtResponse => "Task Management Response",
            Opcode::LoginResponse => "Login Response",
            Opcode::TextResponse => "Text Response",
            Opcode::DataIn => "Data-In",
            Opcode::LogoutResponse => "Logout Response",
            Opcode::R2t => "R2T",
            Opcode::AsyncMessage => "Async Message",
            Opcode::Reject => "Reject",
        };
        f.write_str(name)
    }
}

/// A checked view of a Basic Header Segment. Field accessors cannot panic.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs<'a>(&'a [u8; BHS_LEN]);

impl<'a> Bhs<'a> {
    /// Checks the length only; the opcode is checked by [`PduHeader::parse`].
    pub fn new_checked(bytes: &'a [u8]) -> Result<Bhs<'a>, IscsiWireError> {
        bytes
            .get(..BHS_LEN)
            .and_then(|b| <&[u8; BHS_LEN]>::try_from(b).ok())
            .map(Bhs)
            .ok_or(IscsiWireError::Truncated(bytes.len()))
    }
    pub fn bytes(&self) -> &'a [u8; BHS_LEN] {
        self.0
    }
    pub fn opcode_raw(&self) -> u8 {
        self.0[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// Total AHS length in bytes (the field counts 4-byte words).
    pub fn total_ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    pub fn data_segment_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.0[at], self.0[at + 1]])
    }
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }
    fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_be_bytes(b)
    }
    fn sn_at(&self, at: usize) -> Sn {
        Sn(self.u32_at(at))
    }
}

impl fmt::Debug for Bhs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Bhs {{ opcode: {:#04x}, itt: {:#x}, dsl: {} }}",
            self.opcode_raw(),
            self.itt(),
            self.data_segment_len()
        )
    }
}

/// Builder for the 48 header bytes.
struct BhsWriter([u8; BHS_LEN]);

impl BhsWriter {
    fn new(opcode: Opcode, immediate: bool, flags: u8) -> BhsWriter {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode as u8 | if immediate { 0x40 } else { 0 };
        b[1] = flags;
        BhsWriter(b)
    }
    fn u8(&mut self, at: usize, v: u8) -> &mut Self {
        self.0[at] = v;
        self
    }
    fn u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
        self
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_be_bytes());
        self
    }
    fn sn(&mut self, at: usize, v: Sn) -> &mut Self {
        self.u32(at, v.0)
    }
    fn finish(mut self, ahs_len: usize, data_len: u32) -> [u8; BHS_LEN] {
        self.0[4] = (ahs_len / 4).min(255) as u8;
        let dl = data_len.min(MAX_DATA_SEGMENT_LEN).to_be_bytes();
        self.0[5..8].copy_from_slice(&dl[1..4]);
        self.0
    }
}

/// Login stages (RFC 7143 §11.12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Security = 0,
    Operational = 1,
    FullFeature = 3,
}

impl Stage {
    fn from_bits(v: u8) -> Result<Stage, IscsiWireError> {
        match v {
            0 => Ok(Stage::Security),
            1 => Ok(Stage::Operational),
            3 => Ok(Stage::FullFeature),
            other => Err(IscsiWireError::BadStage(other)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_bit: bool,
    pub read: bool,
    pub write: bool,
    /// Task attribute (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_len: u32,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
    pub cdb: [u8; 16],
}

impl ScsiCommand {
    /// The BHS `PduHeader::ScsiCommand(..).emit(ahs_len, data_len)`
    /// writes, without the general header's match and moves: the submit
    /// path frames every command with it.
    #[inline]
    pub fn emit_bhs(&self, ahs_len: usize, data_len: u32) -> [u8; BHS_LEN] {
        self.bhs_writer().finish(ahs_len, data_len)
    }

    #[inline]
    fn bhs_writer(&self) -> BhsWriter {
        let flags = flag(self.final_bit, 0x80)
            | flag(self.read, 0x40)
            | flag(self.write, 0x20)
            | (self.attr & 7);
        let mut w = BhsWriter::new(Opcode::ScsiCommand, self.immediate, flags);
        w.u64(8, self.lun)
            .u32(16, self.itt)
            .u32(20, self.expected_data_len)
            .sn(24, self.cmd_sn)
            .sn(28, self.exp_stat_sn);
        w.0[32..48].copy_from_slice(&self.cdb);
        w
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
    pub ref_cmd_sn: Sn,
    pub exp_data_sn: Sn,
}

/// Task management functions (RFC 7143 §11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_bit: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_bit: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: Sn,
    pub data_sn: Sn,
    pub buffer_offset: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 close session, 1 close connection, 2 remove connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: Sn,
    pub exp_stat_sn: Sn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snack {
    pub kind: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: Sn,
    pub beg_run: u32,
    pub run_length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
}

/// A SCSI Response; `Default` is GOOD with no residuals, for building one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// 0 = command completed at target; 1 = target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub exp_data_sn: Sn,
    pub bidi_residual: u32,
    pub residual: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    /// 0 complete, 1 task does not exist, 2 LUN does not exist, 3 task still
    /// allegiant, 4 reassignment unsupported, 5 function unsupported,
    /// 6 authorization failed, 255 rejected.
    pub response: u8,
    pub itt: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub status_class: u8,
    pub status_detail: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    pub final_bit: bool,
    pub cont: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub final_bit: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// The S bit: this PDU carries the command's status.
    pub status_present: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub data_sn: Sn,
    pub buffer_offset: u32,
    pub residual: u32,
}

impl DataIn {
    /// The fields of a Data-In BHS (the opcode is the caller's to check).
    #[inline]
    fn from_bhs(b: &Bhs<'_>) -> DataIn {
        let f = b.flags();
        DataIn {
            final_bit: f & 0x80 != 0,
            ack: f & 0x40 != 0,
            overflow: f & 0x04 != 0,
            underflow: f & 0x02 != 0,
            status_present: f & 0x01 != 0,
            status: b.0[3],
            lun: b.lun(),
            itt: b.itt(),
            ttt: b.u32_at(20),
            stat_sn: b.sn_at(24),
            exp_cmd_sn: b.sn_at(28),
            max_cmd_sn: b.sn_at(32),
            data_sn: b.sn_at(36),
            buffer_offset: b.u32_at(40),
            residual: b.u32_at(44),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    /// 0 closed, 1 CID not found, 2 recovery not supported, 3 cleanup failed.
    pub response: u8,
    pub itt: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub time2wait: u16,
    pub time2retain: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub r2t_sn: Sn,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    /// 0 SCSI async event (sense in data), 1 logout requested, 2 connection
    /// drop, 3 session drop, 4 renegotiate, 255 vendor.
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: Sn,
    pub exp_cmd_sn: Sn,
    pub max_cmd_sn: Sn,
    pub data_sn: Sn,
}

/// Human text for a Reject reason code (RFC 7143 §11.17.1).
pub fn reject_reason_text(reason: u8) -> &'static str {
    match reason {
        0x02 => "data (payload) digest error",
        0x03 => "SNACK reject",
        0x04 => "protocol error",
        0x05 => "command not supported",
        0x06 => "immediate command rejected: too many immediate commands",
        0x07 => "task in progress",
        0x08 => "invalid data ack",
        0x09 => "invalid PDU field",
        0x0a => "long operation reject: out of resources",
        0x0b => "deprecated (negotiation reset)",
        0x0c => "waiting for logout",
        _ => "unknown reason",
    }
}

/// Every PDU header, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PduHeader {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    Snack(Snack),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

impl PduHeader {
    pub fn opcode(&self) -> Opcode {
        match self {
            PduHeader::NopOut(_) => Opcode::NopOut,
            PduHeader::ScsiCommand(_) => Opcode::ScsiCommand,
            PduHeader::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            PduHeader::LoginRequest(_) => Opcode::LoginRequest,
            PduHeader::TextRequest(_) => Opcode::TextRequest,
            PduHeader::DataOut(_) => Opcode::DataOut,
            PduHeader::LogoutRequest(_) => Opcode::LogoutRequest,
            PduHeader::Snack(_) => Opcode::Snack,
            PduHeader::NopIn(_) => Opcode::NopIn,
            PduHeader::ScsiResponse(_) => Opcode::ScsiResponse,
            PduHeader::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            PduHeader::LoginResponse(_) => Opcode::LoginResponse,
            PduHeader::TextResponse(_) => Opcode::TextResponse,
            PduHeader::DataIn(_) => Opcode::DataIn,
            PduHeader::LogoutResponse(_) => Opcode::LogoutResponse,
            PduHeader::R2t(_) => Opcode::R2t,
            PduHeader::AsyncMessage(_) => Opcode::AsyncMessage,
            PduHeader::Reject(_) => Opcode::Reject,
        }
    }

    /// Parses the typed header out of a checked BHS.
    pub fn parse(b: &Bhs<'_>) -> Result<PduHeader, IscsiWireError> {
        let f = b.flags();
        let opcode = Opcode::from_u8(b.opcode_raw())?;
        Ok(match opcode {
            Opcode::NopOut => PduHeader::NopOut(NopOut {
                immediate: b.immediate(),
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                cmd_sn: b.sn_at(24),
                exp_stat_sn: b.sn_at(28),
            }),
            Opcode::ScsiCommand => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b.0[32..48]);
                PduHeader::ScsiCommand(ScsiCommand {
                    immediate: b.immediate(),
                    final_bit: f & 0x80 != 0,
                    read: f & 0x40 != 0,
                    write: f & 0x20 != 0,
                    attr: f & 0x07,
                    lun: b.lun(),
                    itt: b.itt(),
                    expected_data_len: b.u32_at(20),
                    cmd_sn: b.sn_at(24),
                    exp_stat_sn: b.sn_at(28),
                    cdb,
                })
            }
            Opcode::TaskMgmtRequest => PduHeader::TaskMgmtRequest(TaskMgmtRequest {
                immediate: b.immediate(),
                function: f & 0x7f,
                lun: b.lun(),
                itt: b.itt(),
                referenced_task_tag: b.u32_at(20),
                cmd_sn: b.sn_at(24),
                exp_stat_sn: b.sn_at(28),
                ref_cmd_sn: b.sn_at(32),
                exp_data_sn: b.sn_at(36),
            }),
            Opcode::LoginRequest => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b.0[8..14]);
                PduHeader::LoginRequest(LoginRequest {
                    transit: f & 0x80 != 0,
                    cont: f & 0x40 != 0,
                    csg: Stage::from_bits((f >> 2) & 3)?,
                    nsg: stage_or_default(f & 3, f & 0x80 != 0)?,
                    version_max: b.0[2],
                    version_min: b.0[3],
                    isid,
                    tsih: b.u16_at(14),
                    itt: b.itt(),
                    cid: b.u16_at(20),
                    cmd_sn: b.sn_at(24),
                    exp_stat_sn: b.sn_at(28),
                })
            }
            Opcode::TextRequest => PduHeader::TextRequest(TextRequest {
                immediate: b.immediate(),
                final_bit: f & 0x80 != 0,
                cont: f & 0x40 != 0,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                cmd_sn: b.sn_at(24),
                exp_stat_sn: b.sn_at(28),
            }),
            Opcode::DataOut => PduHeader::DataOut(DataOut {
                final_bit: f & 0x80 != 0,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                exp_stat_sn: b.sn_at(28),
                data_sn: b.sn_at(36),
                buffer_offset: b.u32_at(40),
            }),
            Opcode::LogoutRequest => PduHeader::LogoutRequest(LogoutRequest {
                immediate: b.immediate(),
                reason: f & 0x7f,
                itt: b.itt(),
                cid: b.u16_at(20),
                cmd_sn: b.sn_at(24),
                exp_stat_sn: b.sn_at(28),
            }),
            Opcode::Snack => PduHeader::Snack(Snack {
                kind: f & 0x0f,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                exp_stat_sn: b.sn_at(28),
                beg_run: b.u32_at(40),
                run_length: b.u32_at(44),
            }),
            Opcode::NopIn => PduHeader::NopIn(NopIn {
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
            }),
            Opcode::ScsiResponse => PduHeader::ScsiResponse(ScsiResponse {
                bidi_overflow: f & 0x10 != 0,
                bidi_underflow: f & 0x08 != 0,
                overflow: f & 0x04 != 0,
                underflow: f & 0x02 != 0,
                response: b.0[2],
                status: b.0[3],
                itt: b.itt(),
                snack_tag: b.u32_at(20),
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
                exp_data_sn: b.sn_at(36),
                bidi_residual: b.u32_at(40),
                residual: b.u32_at(44),
            }),
            Opcode::TaskMgmtResponse => PduHeader::TaskMgmtResponse(TaskMgmtResponse {
                response: b.0[2],
                itt: b.itt(),
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
            }),
            Opcode::LoginResponse => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b.0[8..14]);
                PduHeader::LoginResponse(LoginResponse {
                    transit: f & 0x80 != 0,
                    cont: f & 0x40 != 0,
                    csg: Stage::from_bits((f >> 2) & 3)?,
                    nsg: stage_or_default(f & 3, f & 0x80 != 0)?,
                    version_max: b.0[2],
                    version_active: b.0[3],
                    isid,
                    tsih: b.u16_at(14),
                    itt: b.itt(),
                    stat_sn: b.sn_at(24),
                    exp_cmd_sn: b.sn_at(28),
                    max_cmd_sn: b.sn_at(32),
                    status_class: b.0[36],
                    status_detail: b.0[37],
                })
            }
            Opcode::TextResponse => PduHeader::TextResponse(TextResponse {
                final_bit: f & 0x80 != 0,
                cont: f & 0x40 != 0,
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
            }),
            Opcode::DataIn => PduHeader::DataIn(DataIn::from_bhs(b)),
            Opcode::LogoutResponse => PduHeader::LogoutResponse(LogoutResponse {
                response: b.0[2],
                itt: b.itt(),
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
                time2wait: b.u16_at(40),
                time2retain: b.u16_at(42),
            }),
            Opcode::R2t => PduHeader::R2t(R2t {
                lun: b.lun(),
                itt: b.itt(),
                ttt: b.u32_at(20),
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
                r2t_sn: b.sn_at(36),
                buffer_offset: b.u32_at(40),
                desired_len: b.u32_at(44),
            }),
            Opcode::AsyncMessage => PduHeader::AsyncMessage(AsyncMessage {
                lun: b.lun(),
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
                event: b.0[36],
                vcode: b.0[37],
                param1: b.u16_at(38),
                param2: b.u16_at(40),
                param3: b.u16_at(42),
            }),
            Opcode::Reject => PduHeader::Reject(Reject {
                reason: b.0[2],
                stat_sn: b.sn_at(24),
                exp_cmd_sn: b.sn_at(28),
                max_cmd_sn: b.sn_at(32),
                data_sn: b.sn_at(36),
            }),
        })
    }

    /// Emits the 48 header bytes for a PDU with `ahs_len` bytes of AHS and a
    /// data segment of `data_len` bytes.
    pub fn emit(&self, ahs_len: usize, data_len: u32) -> [u8; BHS_LEN] {
        let w = match self {
            PduHeader::NopOut(p) => {
                let mut w = BhsWriter::new(Opcode::NopOut, p.immediate, 0x80);
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(24, p.cmd_sn)
                    .sn(28, p.exp_stat_sn);
                w
            }
            PduHeader::ScsiCommand(p) => p.bhs_writer(),
            PduHeader::TaskMgmtRequest(p) => {
                let mut w = BhsWriter::new(
                    Opcode::TaskMgmtRequest,
                    p.immediate,
                    0x80 | (p.function & 0x7f),
                );
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.referenced_task_tag)
                    .sn(24, p.cmd_sn)
                    .sn(28, p.exp_stat_sn)
                    .sn(32, p.ref_cmd_sn)
                    .sn(36, p.exp_data_sn);
                w
            }
            PduHeader::LoginRequest(p) => {
                let flags =
                    flag(p.transit, 0x80) | flag(p.cont, 0x40) | ((p.csg as u8) << 2) | p.nsg as u8;
                // Login requests are always immediate (RFC 7143 §11.12).
                let mut w = BhsWriter::new(Opcode::LoginRequest, true, flags);
                w.u8(2, p.version_max).u8(3, p.version_min);
                w.0[8..14].copy_from_slice(&p.isid);
                w.u16(14, p.tsih)
                    .u32(16, p.itt)
                    .u16(20, p.cid)
                    .sn(24, p.cmd_sn)
                    .sn(28, p.exp_stat_sn);
                w
            }
            PduHeader::TextRequest(p) => {
                let flags = flag(p.final_bit, 0x80) | flag(p.cont, 0x40);
                let mut w = BhsWriter::new(Opcode::TextRequest, p.immediate, flags);
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(24, p.cmd_sn)
                    .sn(28, p.exp_stat_sn);
                w
            }
            PduHeader::DataOut(p) => {
                let mut w = BhsWriter::new(Opcode::DataOut, false, flag(p.final_bit, 0x80));
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(28, p.exp_stat_sn)
                    .sn(36, p.data_sn)
                    .u32(40, p.buffer_offset);
                w
            }
            PduHeader::LogoutRequest(p) => {
                let mut w =
                    BhsWriter::new(Opcode::LogoutRequest, p.immediate, 0x80 | (p.reason & 0x7f));
                w.u32(16, p.itt)
                    .u16(20, p.cid)
                    .sn(24, p.cmd_sn)
                    .sn(28, p.exp_stat_sn);
                w
            }
            PduHeader::Snack(p) => {
                let mut w = BhsWriter::new(Opcode::Snack, false, 0x80 | (p.kind & 0x0f));
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(28, p.exp_stat_sn)
                    .u32(40, p.beg_run)
                    .u32(44, p.run_length);
                w
            }
            PduHeader::NopIn(p) => {
                let mut w = BhsWriter::new(Opcode::NopIn, false, 0x80);
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn);
                w
            }
            PduHeader::ScsiResponse(p) => {
                let flags = 0x80
                    | flag(p.bidi_overflow, 0x10)
                    | flag(p.bidi_underflow, 0x08)
                    | flag(p.overflow, 0x04)
                    | flag(p.underflow, 0x02);
                let mut w = BhsWriter::new(Opcode::ScsiResponse, false, flags);
                w.u8(2, p.response)
                    .u8(3, p.status)
                    .u32(16, p.itt)
                    .u32(20, p.snack_tag)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn)
                    .sn(36, p.exp_data_sn)
                    .u32(40, p.bidi_residual)
                    .u32(44, p.residual);
                w
            }
            PduHeader::TaskMgmtResponse(p) => {
                let mut w = BhsWriter::new(Opcode::TaskMgmtResponse, false, 0x80);
                w.u8(2, p.response)
                    .u32(16, p.itt)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn);
                w
            }
            PduHeader::LoginResponse(p) => {
                let flags =
                    flag(p.transit, 0x80) | flag(p.cont, 0x40) | ((p.csg as u8) << 2) | p.nsg as u8;
                let mut w = BhsWriter::new(Opcode::LoginResponse, false, flags);
                w.u8(2, p.version_max).u8(3, p.version_active);
                w.0[8..14].copy_from_slice(&p.isid);
                w.u16(14, p.tsih)
                    .u32(16, p.itt)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn)
                    .u8(36, p.status_class)
                    .u8(37, p.status_detail);
                w
            }
            PduHeader::TextResponse(p) => {
                let flags = flag(p.final_bit, 0x80) | flag(p.cont, 0x40);
                let mut w = BhsWriter::new(Opcode::TextResponse, false, flags);
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn);
                w
            }
            PduHeader::DataIn(p) => {
                let flags = flag(p.final_bit, 0x80)
                    | flag(p.ack, 0x40)
                    | flag(p.overflow, 0x04)
                    | flag(p.underflow, 0x02)
                    | flag(p.status_present, 0x01);
                let mut w = BhsWriter::new(Opcode::DataIn, false, flags);
                w.u8(3, p.status)
                    .u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn)
                    .sn(36, p.data_sn)
                    .u32(40, p.buffer_offset)
                    .u32(44, p.residual);
                w
            }
            PduHeader::LogoutResponse(p) => {
                let mut w = BhsWriter::new(Opcode::LogoutResponse, false, 0x80);
                w.u8(2, p.response)
                    .u32(16, p.itt)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn)
                    .u16(40, p.time2wait)
                    .u16(42, p.time2retain);
                w
            }
            PduHeader::R2t(p) => {
                let mut w = BhsWriter::new(Opcode::R2t, false, 0x80);
                w.u64(8, p.lun)
                    .u32(16, p.itt)
                    .u32(20, p.ttt)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn)
                    .sn(36, p.r2t_sn)
                    .u32(40, p.buffer_offset)
                    .u32(44, p.desired_len);
                w
            }
            PduHeader::AsyncMessage(p) => {
                let mut w = BhsWriter::new(Opcode::AsyncMessage, false, 0x80);
                w.u64(8, p.lun)
                    .u32(16, RESERVED_TAG)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn)
                    .u8(36, p.event)
                    .u8(37, p.vcode)
                    .u16(38, p.param1)
                    .u16(40, p.param2)
                    .u16(42, p.param3);
                w
            }
            PduHeader::Reject(p) => {
                let mut w = BhsWriter::new(Opcode::Reject, false, 0x80);
                w.u8(2, p.reason)
                    .u32(16, RESERVED_TAG)
                    .sn(24, p.stat_sn)
                    .sn(28, p.exp_cmd_sn)
                    .sn(32, p.max_cmd_sn)
                    .sn(36, p.data_sn);
                w
            }
        };
        w.finish(ahs_len, data_len)
    }
}

fn flag(on: bool, bit: u8) -> u8 {
    if on {
        bit
    } else {
        0
    }
}

/// NSG is only meaningful with the T bit; without it a target may leave any
/// value there, so read it as "same as nothing" (Security) rather than fail.
fn stage_or_default(bits: u8, transit: bool) -> Result<Stage, IscsiWireError> {
    if transit {
        Stage::from_bits(bits)
    } else {
        Ok(Stage::from_bits(bits).unwrap_or(Stage::Security))
    }
}

/// Padding needed to bring `len` to a 4-byte boundary.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// CRC32C digest as it goes on the wire (RFC 7143 §13.1: little-endian bytes
/// of the CRC, which is how iSCSI implementations put it).
pub fn digest(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// Digest settings of one direction of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Where the parts of one complete PDU lie in a receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramedPdu {
    pub header: PduHeader,
    /// Byte range of the AHS.
    pub ahs: std::ops::Range<usize>,
    /// Byte range of the data segment (without padding and digest).
    pub data: std::ops::Range<usize>,
    /// Total bytes the PDU occupies in the stream.
    pub total_len: usize,
}

/// Finds PDU boundaries in a received byte stream and verifies digests.
#[derive(Debug, Clone, Copy)]
pub struct PduFramer {
    pub digests: Digests,
    /// Our MaxRecvDataSegmentLength: a longer data segment is a protocol error.
    pub max_data_segment_len: u32,
}

impl PduFramer {
    /// Total length of the PDU that starts at `buf`, once 48 bytes are there.
    pub fn pdu_len(&self, bhs: &Bhs<'_>) -> usize {
        let dsl = bhs.data_segment_len() as usize;
        let mut n = BHS_LEN + bhs.total_ahs_len();
        if self.digests.header {
            n += DIGEST_LEN;
        }
        if dsl > 0 {
            n += dsl + pad_len(dsl);
            if self.digests.data {
                n += DIGEST_LEN;
            }
        }
        n
    }

    /// Tries to frame one PDU at the start of `buf`. `Ok(None)` means more
    /// bytes are needed; the error cases are protocol errors that end the
    /// connection.
    pub fn frame(&self, buf: &[u8]) -> Result<Option<FramedPdu>, IscsiWireError> {
        let Ok(bhs) = Bhs::new_checked(buf) else {
            return Ok(None);
        };
        let dsl = bhs.data_segment_len();
        if dsl > self.max_data_segment_len {
            return Err(IscsiWireError::DataSegmentTooLong {
                len: dsl,
                max: self.max_data_segment_len,
            });
        }
        let total = self.pdu_len(&bhs);
        let header_end = BHS_LEN + bhs.total_ahs_len();
        if self.digests.header && buf.len() >= header_end + DIGEST_LEN {
            self.check_header_digest(buf, header_end)?;
        }
        if buf.len() < total {
            return Ok(None);
        }
        let header = PduHeader::parse(&bhs)?;
        let data_start = header_end + if self.digests.header { DIGEST_LEN } else { 0 };
        let data_end = data_start + dsl as usize;
        if self.digests.data && dsl > 0 {
            let at = data_end + pad_len(dsl as usize);
            let received = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
            let computed = digest(&buf[data_start..at]);
            if received != computed {
                return Err(IscsiWireError::DataDigest { received, computed });
            }
        }
        Ok(Some(FramedPdu {
            header,
            ahs: BHS_LEN..header_end,
            data: data_start..data_end,
            total_len: total,
        }))
    }

    /// Parses the header of the PDU at the start of `buf` (BHS, AHS and
    /// header digest) without waiting for its data segment, so the caller
    /// can place the data itself. `Ok(None)` means the header is not all
    /// there yet. Returns the header, the header's length including its
    /// digest, and the data segment length.
    pub fn frame_header(
        &self,
        buf: &[u8],
    ) -> Result<Option<(PduHeader, usize, usize)>, IscsiWireError> {
        let Some((bhs, header_len, dsl)) = self.header_extent(buf)? else {
            return Ok(None);
        };
        Ok(Some((PduHeader::parse(&bhs)?, header_len, dsl)))
    }

    /// [`frame_header`](Self::frame_header) for a PDU whose opcode is
    /// Data-In (None otherwise, or while the header is not all there): the
    /// `DataIn` itself, without the general `PduHeader` (a read's hot path,
    /// one Data-In per 4 KiB read).
    pub fn frame_data_in_header(
        &self,
        buf: &[u8],
    ) -> Result<Option<(DataIn, usize, usize)>, IscsiWireError> {
        let Some((bhs, header_len, dsl)) = self.header_extent(buf)? else {
            return Ok(None);
        };
        if bhs.opcode_raw() != Opcode::DataIn as u8 {
            return Ok(None);
        }
        Ok(Some((DataIn::from_bhs(&bhs), header_len, dsl)))
    }

    /// The checked BHS at the start of `buf`, the header's length with its
    /// digest (checked when negotiated) and the data segment length; None
    /// while the header is not all there.
    #[inline]
    fn header_extent<'a>(
        &self,
        buf: &'a [u8],
    ) -> Result<Option<(Bhs<'a>, usize, usize)>, IscsiWireError> {
        let Ok(bhs) = Bhs::new_checked(buf) else {
            return Ok(None);
        };
        let dsl = bhs.data_segment_len();
        if dsl > self.max_data_segment_len {
            return Err(IscsiWireError::DataSegmentTooLong {
                len: dsl,
                max: self.max_data_segment_len,
            });
        }
        let header_end = BHS_LEN + bhs.total_ahs_len();
        let header_len = header_end + if self.digests.header { DIGEST_LEN } else { 0 };
        if buf.len() < header_len {
            return Ok(None);
        }
        if self.digests.header {
            self.check_header_digest(buf, header_end)?;
        }
        Ok(Some((bhs, header_len, dsl as usize)))
    }

    /// Bytes after a data segment of `dsl` bytes: padding, then the data
    /// digest when negotiated (none after an empty segment).
    pub fn trailer_len(&self, dsl: usize) -> usize {
        if dsl == 0 {
            0
        } else {
            pad_len(dsl) + if self.digests.data { DIGEST_LEN } else { 0 }
        }
    }

    fn check_header_digest(&self, buf: &[u8], header_end: usize) -> Result<(), IscsiWireError> {
        let d = &buf[header_end..header_end + DIGEST_LEN];
        let received = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        let computed = digest(&buf[..header_end]);
        if received != computed {
            return Err(IscsiWireError::HeaderDigest { received, computed });
        }
        Ok(())
    }
}

/// Appends an emitted BHS and, when negotiated, its header digest: the
/// header part of [`encode_pdu`], for callers that frame the BHS
/// themselves (a command without a data segment).
#[inline]
pub fn encode_bhs(out: &mut Vec<u8>, bhs: &[u8; BHS_LEN], digests: Digests) {
    let start = out.len();
    out.extend_from_slice(bhs);
    if digests.header {
        let d = digest(&out[start..]);
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// Appends one whole PDU (header, header digest, data, padding, data digest)
/// to `out`. `data` may be given in pieces (e.g. a slice of a caller's buffer).
pub fn encode_pdu(out: &mut Vec<u8>, header: &PduHeader, data: &[u8], digests: Digests) {
    encode_bhs(out, &header.emit(0, data.len() as u32), digests);
    if !data.is_empty() {
        let data_start = out.len();
        out.extend_from_slice(data);
        out.extend_from_slice(&[0u8; 3][..pad_len(data.len())]);
        if digests.data {
            let d = digest(&out[data_start..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framer(header: bool, data: bool) -> PduFramer {
        PduFramer {
            digests: Digests { header, data },
            max_data_segment_len: 1 << 20,
        }
    }

    #[test]
    fn serial_numbers_wrap() {
        let a = Sn(u32::MAX);
        let b = a.next();
        assert_eq!(b, Sn(0));
        assert!(a.lt(b));
        assert!(b.gt(a));
        assert!(Sn(5).le(Sn(5)));
        assert_eq!(Sn(2).diff(Sn(u32::MAX - 1)), 4);
    }

    #[test]
    fn scsi_command_layout_matches_rfc() {
        let mut cdb = [0u8; 16];
        cdb[0] = 0x12;
        let h = PduHeader::ScsiCommand(ScsiCommand {
            immediate: false,
            final_bit: true,
            read: true,
            write: false,
            attr: 1,
            lun: 0x0001_0000_0000_0000,
            itt: 0x1234,
            expected_data_len: 96,
            cmd_sn: Sn(7),
            exp_stat_sn: Sn(9),
            cdb,
        });
        let b = h.emit(0, 0);
        assert_eq!(b[0], 0x01);
        assert_eq!(b[1], 0xc1);
        assert_eq!(&b[8..10], &[0, 1]);
        assert_eq!(&b[16..20], &[0, 0, 0x12, 0x34]);
        assert_eq!(&b[20..24], &[0, 0, 0, 96]);
        assert_eq!(b[32], 0x12);
        let back = PduHeader::parse(&Bhs::new_checked(&b).unwrap()).unwrap();
        assert_eq!(back, h);
    }

    /// The Data-In framing gives what the general framing gives, for a
    /// Data-In (with a header digest too), and nothing for other PDUs.
    #[test]
    fn data_in_header_frames_as_the_general_header() {
        let d = DataIn {
            final_bit: true,
            ack: false,
            overflow: false,
            underflow: true,
            status_present: true,
            status: 2,
            lun: 0x0001_0000_0000_0000,
            itt: 0x0102_0304,
            ttt: u32::MAX,
            stat_sn: Sn(11),
            exp_cmd_sn: Sn(12),
            max_cmd_sn: Sn(44),
            data_sn: Sn(3),
            buffer_offset: 8192,
            residual: 512,
        };
        for header_digest in [false, true] {
            let f = framer(header_digest, false);
            let mut pdu = Vec::new();
            encode_pdu(
                &mut pdu,
                &PduHeader::DataIn(d.clone()),
                &[7u8; 100],
                f.digests,
            );
            let general = f.frame_header(&pdu).unwrap().unwrap();
            let (got, header_len, dsl) = f.frame_data_in_header(&pdu).unwrap().unwrap();
            assert_eq!(general, (PduHeader::DataIn(got.clone()), header_len, dsl));
            assert_eq!((got, dsl), (d.clone(), 100));
            assert_eq!(
                f.frame_data_in_header(&pdu[..header_len - 1]).unwrap(),
                None
            );
            let nop = PduHeader::NopIn(NopIn {
                lun: 0,
                itt: 1,
                ttt: u32::MAX,
                stat_sn: Sn(1),
                exp_cmd_sn: Sn(1),
                max_cmd_sn: Sn(1),
            });
            let mut other = Vec::new();
            encode_pdu(&mut other, &nop, &[], f.digests);
            assert_eq!(f.frame_data_in_header(&other).unwrap(), None);
        }
    }

    #[test]
    fn login_request_is_immediate_and_carries_stages() {
        let h = PduHeader::LoginRequest(LoginRequest {
            transit: true,
            cont: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 1, 2, 3],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: Sn(1),
            exp_stat_sn: Sn(0),
        });
        let b = h.emit(0, 10);
        assert_eq!(b[0], 0x43);
        assert_eq!(b[1], 0x87);
        assert_eq!(&b[5..8], &[0, 0, 10]);
    }

    #[test]
    fn framing_with_digests_and_padding() {
        let h = PduHeader::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 5,
            ttt: RESERVED_TAG,
            cmd_sn: Sn(1),
            exp_stat_sn: Sn(1),
        });
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut out = Vec::new();
            encode_pdu(
                &mut out,
                &h,
                b"hello",
                Digests {
                    header: hd,
                    data: dd,
                },
            );
            let f = framer(hd, dd);
            // Every strict prefix asks for more bytes.
            for cut in 0..out.len() {
                assert_eq!(f.frame(&out[..cut]).unwrap(), None, "cut {cut}");
            }
            let framed = f.frame(&out).unwrap().unwrap();
            assert_eq!(framed.total_len, out.len());
            assert_eq!(&out[framed.data.clone()], b"hello");
            assert_eq!(framed.header, h);
        }
    }

    #[test]
    fn digest_errors_are_detected() {
        let h = PduHeader::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 5,
            ttt: RESERVED_TAG,
            cmd_sn: Sn(1),
            exp_stat_sn: Sn(1),
        });
        let mut out = Vec::new();
        let d = Digests {
            header: true,
            data: true,
        };
        encode_pdu(&mut out, &h, b"payload!", d);
        let mut bad_header = out.clone();
        bad_header[20] ^= 1;
        assert!(matches!(
            framer(true, true).frame(&bad_header),
            Err(IscsiWireError::HeaderDigest { .. })
        ));
        let mut bad_data = out.clone();
        bad_data[BHS_LEN + 4 + 2] ^= 1;
        assert!(matches!(
            framer(true, true).frame(&bad_data),
            Err(IscsiWireError::DataDigest { .. })
        ));
    }

    #[test]
    fn crc32c_known_answer() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(digest(&[0u8; 32]), 0x8a91_36aa);
        // 32 bytes of 0xff.
        assert_eq!(digest(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn oversized_data_segment_is_refused() {
        let mut b = [0u8; 48];
        b[0] = 0x25;
        b[5] = 0x10; // 1 MiB
        let f = PduFramer {
            digests: Digests::default(),
            max_data_segment_len: 8192,
        };
        assert!(matches!(
            f.frame(&b),
            Err(IscsiWireError::DataSegmentTooLong { .. })
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let f = framer(true, true);
            let _ = f.frame(&bytes);
            if let Ok(b) = Bhs::new_checked(&bytes) {
                let _ = PduHeader::parse(&b);
            }
        }

        /// Any header that parses re-emits to bytes that parse to the same header.
        #[test]
        fn parse_emit_round_trip(mut bytes in proptest::array::uniform32(any::<u8>()),
                                 rest in proptest::array::uniform16(any::<u8>()),
                                 op in proptest::sample::select(vec![0x00u8,0x01,0x02,0x03,0x04,0x05,0x06,0x10,0x20,0x21,0x22,0x23,0x24,0x25,0x26,0x31,0x32,0x3f])) {
            bytes[0] = op | (bytes[0] & 0x40);
            let mut full = [0u8; 48];
            full[..32].copy_from_slice(&bytes);
            full[32..].copy_from_slice(&rest);
            if let Ok(h) = PduHeader::parse(&Bhs::new_checked(&full).unwrap()) {
                let again = h.emit(0, 0);
                let h2 = PduHeader::parse(&Bhs::new_checked(&again).unwrap()).unwrap();
                prop_assert_eq!(h, h2);
            }
        }
    }

    proptest! {
        /// encode_pdu → frame gives back the header and the data, with every
        /// digest setting, and every strict prefix asks for more bytes.
        #[test]
        fn encode_frame_round_trip(
            mut bytes in proptest::array::uniform32(any::<u8>()),
            rest in proptest::array::uniform16(any::<u8>()),
            op in proptest::sample::select(vec![0x00u8,0x01,0x02,0x03,0x04,0x05,0x06,0x10,0x20,0x21,0x22,0x23,0x24,0x25,0x26,0x31,0x32,0x3f]),
            data in proptest::collection::vec(any::<u8>(), 0..300),
            hd in any::<bool>(),
            dd in any::<bool>(),
        ) {
            bytes[0] = op;
            let mut full = [0u8; 48];
            full[..32].copy_from_slice(&bytes);
            full[32..].copy_from_slice(&rest);
            if let Ok(h) = PduHeader::parse(&Bhs::new_checked(&full).unwrap()) {
                let mut out = Vec::new();
                encode_pdu(&mut out, &h, &data, Digests { header: hd, data: dd });
                let f = framer(hd, dd);
                let got = f.frame(&out).unwrap().unwrap();
                prop_assert_eq!(got.total_len, out.len());
                prop_assert_eq!(&got.header, &h);
                prop_assert_eq!(&out[got.data.clone()], &data[..]);
                for cut in [0, 47, out.len() - 1] {
                    if cut < out.len() {
                        prop_assert_eq!(f.frame(&out[..cut]).unwrap(), None);
                    }
                }
            }
        }
    }
}
