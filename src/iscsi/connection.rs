//! The full-feature-phase connection state machine (RFC 7143 §3-4, §11),
//! initiator side, sans-IO.
//!
//! Bytes from the transport go in through [`Connection::rx_space`] +
//! [`Connection::commit_rx`]; bytes to send come out of
//! [`Connection::pending_tx`] + [`Connection::consume_tx`]; completions come
//! out of [`Connection::poll_event`]. Time is passed in (`now`), never read.
//!
//! Covered: CmdSN/ExpCmdSN/MaxCmdSN window (never sends outside it),
//! StatSN/ExpStatSN, task tags, immediate and unsolicited data
//! (FirstBurstLength), R2T with MaxBurstLength/MaxOutstandingR2T, Data-In with
//! DataSN order and bounds checks, status in the final Data-In, digests,
//! NOP-Out pings and answers to target NOP-Ins, text requests (SendTargets)
//! with continuation, task management, logout, Reject and Async Message.
//! Error recovery level 0: any protocol error fails the connection, and
//! [`Connection::take_outstanding`] hands every unfinished command back so
//! that a session or the multipath layer can retry it elsewhere. At ERL 1
//! and up a lost Data-In (DataSN gap, data digest error), R2T (R2TSN gap)
//! or status (StatSN gap) is asked for again by SNACK instead. Immediate
//! SCSI commands ([`Command::immediate`]) bypass the window. MC/S: the
//! CmdSN window may be the session's, shared with its other connections
//! ([`Connection::in_session`]), and at ERL 2 a failed connection's tasks
//! ([`Connection::take_orphans`]) move to a live one by TASK REASSIGN
//! ([`Connection::reassign`]).

use super::params::Params;
use super::window::SessionWindow;
use crate::transport::TxPart;
use crate::wire::iscsi::{
    encode_pdu, pad_len, Bhs, DataIn, DataOut, Digests, FramedPdu, IscsiWireError, LogoutRequest,
    NopOut, Opcode, PduFramer, PduHeader, ScsiCommand, Sn, Snack, TaskMgmtRequest, TextRequest,
    BHS_LEN, DIGEST_LEN, RESERVED_TAG,
};
use crate::wire::text::TextPairs;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Most tasks one connection tracks at once (bounded: the slab never grows past it).
pub const MAX_TASKS: usize = 4096;

/// Task management function 8, TASK REASSIGN (RFC 7143 §11.5.1).
pub const TMF_TASK_REASSIGN: u8 = crate::wire::iscsi::tmf::TASK_REASSIGN;

/// At ERL 1 and up, the most statuses that may be missing at once (a
/// StatSN further ahead than this fails the connection).
pub const MAX_STATUS_GAP: u32 = 1024;

/// SNACK types (RFC 7143 §11.16.1): Data/R2T, Status.
const SNACK_DATA: u8 = 0;
const SNACK_STATUS: u8 = 1;

/// Where a Data-In that is left out (ERL 1 and up) would be placed: no
/// slot (its bytes go to the sink).
const NO_SLOT: u16 = u16::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnError {
    #[error("malformed PDU from target: {0}")]
    Wire(#[from] IscsiWireError),
    #[error("protocol error from target: {0}")]
    Protocol(String),
    #[error("target rejected a PDU: {0}")]
    Rejected(String),
    /// The target announced that it drops the connection (AsyncEvent 2)
    /// or the whole session (AsyncEvent 3), RFC 7143 §11.9.1: reconnect no
    /// sooner than `time2wait` seconds; tasks may be reassigned for
    /// `time2retain` seconds after that (not at error recovery level 0).
    #[error("target announced it drops the {} (AsyncEvent {event}, Time2Wait {time2wait} s, Time2Retain {time2retain} s)", if *.event == 3 { "session" } else { "connection" })]
    TargetDropped {
        event: u8,
        time2wait: u16,
        time2retain: u16,
    },
    #[error("no answer to NOP-Out ping within {0:?}: connection considered dead")]
    PingTimeout(Duration),
    #[error("command timed out after {0:?}")]
    CommandTimeout(Duration),
    #[error("connection has failed earlier: {0}")]
    Failed(String),
    #[error("connection is logged out")]
    LoggedOut,
    /// A StatSN out of order on this connection (StatSN is per
    /// connection): at ERL 0 any gap, at ERL 1 and up one too far ahead
    /// to be a few lost statuses (more than [`MAX_STATUS_GAP`]).
    #[error("StatSN {got} out of order (expected {expected}) on connection CID {cid}")]
    StatSn { cid: u16, expected: Sn, got: Sn },
    /// A PDU for a task of another connection of the MC/S session arrived
    /// on this one (RFC 7143 §5.1: a task's PDUs stay on its connection).
    #[error("{what} for task tag {itt:#x} arrived on connection CID {cid}, but that tag belongs to connection #{owner} of the session: a task's PDUs must stay on its connection (RFC 7143 §5.1)")]
    WrongConnection {
        what: &'static str,
        itt: u32,
        cid: u16,
        owner: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmitError {
    #[error("too many outstanding tasks ({MAX_TASKS})")]
    Full,
    #[error("data buffer of {len} bytes is larger than the 32-bit transfer length")]
    TooLarge { len: usize },
    #[error("CDB of {0} bytes is longer than 16 bytes")]
    CdbTooLong(usize),
    #[error("connection is not usable: {0}")]
    Down(String),
}

/// Data direction of a SCSI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    None,
    /// Data from the target into the buffer.
    Read,
    /// Data from the buffer to the target.
    Write,
}

/// A SCSI command to run. The buffer's length is the expected transfer length.
#[derive(Debug, Clone)]
pub struct Command {
    pub lun: u64,
    pub cdb: [u8; 16],
    pub cdb_len: u8,
    pub direction: Direction,
    pub buffer: Vec<u8>,
    /// The caller's tag, returned in the completion.
    pub user_tag: u64,
    /// Sent as an immediate command (the I bit, RFC 7143 §3.2.2.1): at
    /// once, whatever the CmdSN window, carrying the next CmdSN without
    /// taking it. The target may refuse it for want of resources.
    pub immediate: bool,
}

impl Command {
    pub fn new(
        lun: u64,
        cdb: &[u8],
        direction: Direction,
        buffer: Vec<u8>,
    ) -> Result<Command, SubmitError> {
        if cdb.len() > 16 {
            return Err(SubmitError::CdbTooLong(cdb.len()));
        }
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        Ok(Command {
            lun,
            cdb: c,
            cdb_len: cdb.len() as u8,
            direction,
            buffer,
            user_tag: 0,
            immediate: false,
        })
    }
}

/// A finished SCSI command: the target's status, sense bytes if any, and
/// the buffer back (filled for reads).
#[derive(Debug, Clone)]
pub struct Completion {
    pub user_tag: u64,
    /// iSCSI response: 0 = command completed at target, 1 = target failure.
    pub response: u8,
    pub status: u8,
    pub sense: Vec<u8>,
    /// Bytes not transferred (underflow) as positive, overflow as negative.
    pub residual: i64,
    /// Bytes of data the target actually moved.
    pub transferred: usize,
    pub buffer: Vec<u8>,
    pub command: CommandEcho,
}

/// Enough of the command to resubmit it or report on it.
#[derive(Debug, Clone)]
pub struct CommandEcho {
    pub lun: u64,
    pub cdb: [u8; 16],
    pub cdb_len: u8,
    pub direction: Direction,
}

/// Things the connection reports.
#[derive(Debug, Clone)]
pub enum Event {
    Completed(Completion),
    /// Answer to a task management request.
    TaskManagement {
        user_tag: u64,
        response: u8,
    },
    /// Complete answer to a text request (all continuations joined).
    Text {
        user_tag: u64,
        pairs: TextPairs,
    },
    /// A NOP-Out ping we sent was answered.
    PingAnswered {
        rtt: Duration,
    },
    /// SCSI asynchronous event (e.g. a UNIT ATTENTION such as an ALUA change).
    AsyncScsiEvent {
        lun: u64,
        sense: Vec<u8>,
    },
    /// The target asks us to log out within `within` seconds
    /// (AsyncEvent 1, Parameter3).
    LogoutRequested {
        within: u16,
    },
    /// The target asked for parameter renegotiation (AsyncEvent 4); the
    /// connection has sent the Text Request with our declarations.
    RenegotiationStarted,
    /// The renegotiation's Text Response was applied: the target's
    /// MaxRecvDataSegmentLength now bounds the data segments we send.
    Renegotiated {
        max_xmit_data_segment_len: u32,
    },
    LoggedOut {
        time2wait: u16,
        time2retain: u16,
    },
    /// A TASK REASSIGN (ERL 2) was answered: `response` 0 = the task goes
    /// on on this connection (its completion comes as usual); any other
    /// value (RFC 7143 §11.6.1: 1 = task does not exist, 3 = task still
    /// allegiant, 4 = allegiance reassignment not supported, 5 = function
    /// not supported) means the
    /// target refused, and the command comes back in `refused`, not done.
    Reassigned {
        user_tag: u64,
        response: u8,
        refused: Option<Box<Command>>,
    },
    /// The answer to a logout of another connection of the session (reason
    /// 1 or 2 for `cid`, sent on this one): `response` 0 = removed, 1 = CID
    /// not found, 2 = recovery not supported (RFC 7143 §11.15.1). This
    /// connection stays up.
    ConnectionLoggedOut {
        cid: u16,
        response: u8,
        time2wait: u16,
        time2retain: u16,
    },
}

#[derive(Debug)]
enum TaskKind {
    Scsi {
        cmd: Command,
        /// Data-In bytes received or Data-Out bytes sent so far.
        data_done: usize,
        next_data_sn: Sn,
        /// Pending R2T-solicited transfers: (ttt, offset, length).
        r2ts: VecDeque<(u32, u32, u32)>,
        /// Unsolicited data still to send as Data-Out (offset, end).
        unsolicited: Option<(u32, u32)>,
        r2ts_seen: u32,
        /// A write's buffer while its payload leaves by reference
        /// ([`Connection::set_tx_by_reference`]); `cmd.buffer` is empty then.
        out: Option<Arc<Vec<u8>>>,
        /// ERL 1: a Data SNACK is out for the Data-In from `next_data_sn`
        /// on; the newest DataSN left out since (a lower one after it means
        /// the answer itself lost one: ask again).
        snack: Option<Sn>,
        /// ERL 1: R2TSNs skipped (lost), asked for again by R2T SNACK.
        r2ts_missing: Vec<Sn>,
        /// Taken over by TASK REASSIGN: the target's R2TSN goes on from
        /// where it was on the failed connection, so the first R2T sets it.
        r2t_sn_from_target: bool,
        /// ERL 1: a read's status that came while its data was missing;
        /// it completes the command once the data is in.
        held: Option<Box<HeldStatus>>,
    },
    Tmf {
        user_tag: u64,
    },
    /// Our TASK REASSIGN for the adopted task in `slot`.
    Reassign {
        slot: u16,
    },
    Text {
        user_tag: u64,
        /// Our request text, kept until the window lets it go.
        request: Vec<u8>,
        collected: Vec<u8>,
        /// The target's transfer tag once it answered with the C bit: the
        /// next (empty) request asks for the rest, and it too takes a CmdSN.
        continuation: Option<u32>,
        /// Ours, for an AsyncEvent 4: the answer is applied, not reported.
        renegotiation: bool,
    },
    Ping {
        sent_at: Instant,
    },
    /// Our Logout Request: `cid` named in it, and whether it ends this
    /// connection (reason 0, or this connection's own CID).
    Logout {
        cid: u16,
        closes_this: bool,
    },
}

impl TaskKind {
    /// A SCSI command not sent yet: no data moved, no R2T seen.
    #[inline(always)]
    fn fresh(cmd: Command) -> TaskKind {
        TaskKind::Scsi {
            cmd,
            data_done: 0,
            next_data_sn: Sn(0),
            r2ts: VecDeque::new(),
            unsolicited: None,
            r2ts_seen: 0,
            out: None,
            snack: None,
            r2ts_missing: Vec::new(),
            r2t_sn_from_target: false,
            held: None,
        }
    }
}

/// A SCSI status kept until the data before it is in (ERL 1).
#[derive(Debug)]
struct HeldStatus {
    response: u8,
    status: u8,
    sense: Vec<u8>,
    residual: i64,
}

/// A SCSI command that was sent on a connection that failed, with the tag
/// and CmdSN it was sent with: what a TASK REASSIGN onto another connection
/// of the session names (ERL 2, RFC 7143 §6.2.2).
#[derive(Debug)]
pub struct Orphan {
    pub itt: u32,
    pub cmd_sn: Sn,
    pub cmd: Command,
}

/// A task [`Connection::reassign`] or [`Connection::retry`] could not take
/// over (a failed connection, a full task table), given back.
#[derive(Debug)]
pub struct NotTaken {
    pub error: SubmitError,
    pub orphan: Orphan,
}

impl Connection {
    /// Two slots (for a TMF and the task it names), both or neither;
    /// their kinds are the caller's to set.
    fn alloc_pair(&mut self, now: Instant) -> Result<(u16, u16), SubmitError> {
        let first = self.alloc_slot(TaskKind::Tmf { user_tag: 0 }, now)?;
        match self.alloc_slot(TaskKind::Tmf { user_tag: 0 }, now) {
            Ok(second) => Ok((first, second)),
            Err(e) => {
                self.free_slot(first);
                Err(e)
            }
        }
    }
}

#[derive(Debug)]
struct Task {
    itt: u32,
    kind: TaskKind,
    /// CmdSN given (None while waiting for window space).
    cmd_sn: Option<Sn>,
    submitted_at: Instant,
}

/// Timers and limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimers {
    /// Send a NOP-Out ping after this much silence from the target.
    pub nop_interval: Option<Duration>,
    /// A ping not answered within this fails the connection.
    pub nop_timeout: Duration,
    /// A SCSI command not finished within this fails the connection.
    pub command_timeout: Option<Duration>,
}

impl Default for ConnTimers {
    fn default() -> ConnTimers {
        ConnTimers {
            nop_interval: Some(Duration::from_secs(5)),
            nop_timeout: Duration::from_secs(5),
            command_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Connection-level counters.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConnStats {
    pub commands: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub pdus_in: u64,
    pub pdus_out: u64,
    pub r2ts: u64,
    pub nop_pings: u64,
    pub window_stalls: u64,
    /// Data-In payload bytes that went straight into the command's buffer:
    /// read there by the transport ([`Connection::rx_buffers`]) or copied
    /// there once from the transport's own bytes ([`Connection::receive`]).
    pub rx_bytes_placed: u64,
    /// Data-In payload bytes that stopped in the staging buffer first (read
    /// ahead with a header) and were copied again: the second copies.
    pub rx_bytes_staged: u64,
    /// Write payload (immediate data and Data-Out) handed to the transport
    /// by reference, never copied here ([`Connection::tx_parts`]).
    pub tx_bytes_shared: u64,
    /// Write payload copied into the connection's send bytes.
    pub tx_bytes_copied: u64,
    /// Completed writes whose buffer the transport still held (unacknowledged
    /// bytes, e.g. an early error status): the caller got a copy.
    pub tx_buffers_copied_back: u64,
    /// SNACKs sent (ERL 1): Data/R2T and Status.
    pub snacks: u64,
    /// Data-In PDUs left out (ERL 1): after a DataSN gap, with a data
    /// digest error, or copies of ones taken already.
    pub data_in_discarded: u64,
    /// Statuses that came again (after a Status SNACK) for commands done
    /// already, dropped.
    pub statuses_again: u64,
}

/// A write's payload range in the send stream, placed before `tx[at]`.
#[derive(Debug)]
struct TxRef {
    at: usize,
    buf: Arc<Vec<u8>>,
    start: usize,
    len: usize,
}

/// Appends a data PDU whose payload is `buf[start..start + len]`, by
/// reference (`refs`) or copied into `tx`. Padding and digests are copied.
#[allow(clippy::too_many_arguments)]
fn encode_data_pdu(
    tx: &mut Vec<u8>,
    refs: Option<&mut VecDeque<TxRef>>,
    hdr: &PduHeader,
    buf: &[u8],
    shared: Option<&Arc<Vec<u8>>>,
    start: usize,
    len: usize,
    digests: Digests,
    stats: &mut ConnStats,
) {
    let data = &buf[start..start + len];
    let (Some(refs), Some(shared), true) = (refs, shared, len > 0) else {
        encode_pdu(tx, hdr, data, digests);
        stats.tx_bytes_copied += len as u64;
        return;
    };
    let header_at = tx.len();
    tx.extend_from_slice(&hdr.emit(0, len as u32));
    if digests.header {
        let d = crate::wire::iscsi::digest(&tx[header_at..]);
        tx.extend_from_slice(&d.to_le_bytes());
    }
    refs.push_back(TxRef {
        at: tx.len(),
        buf: shared.clone(),
        start,
        len,
    });
    let pad = &[0u8; 3][..pad_len(len)];
    tx.extend_from_slice(pad);
    if digests.data {
        let d = crc32c::crc32c_append(crc32c::crc32c(data), pad);
        tx.extend_from_slice(&d.to_le_bytes());
    }
    stats.tx_bytes_shared += len as u64;
}

/// Most empty `Arc` shells a connection keeps for its next writes.
const TX_SHELLS: usize = 64;

/// Do `bytes` start with the BHS of a Data-In that carries data (its
/// payload is placed straight into the command's buffer)?
fn starts_data_in_with_data(bytes: &[u8]) -> bool {
    Bhs::new_checked(bytes)
        .is_ok_and(|b| b.opcode_raw() == Opcode::DataIn as u8 && b.data_segment_len() > 0)
}

/// The caller's buffer back from a write: taken out when nobody else holds
/// it (the emptied `Arc` goes to `shells`, for the next write), else copied
/// (the transport still has unacknowledged bytes of it).
fn reclaim_buffer(
    buffer: &mut Vec<u8>,
    out: Option<Arc<Vec<u8>>>,
    stats: &mut ConnStats,
    shells: &mut Vec<Arc<Vec<u8>>>,
) {
    let Some(mut out) = out else {
        return;
    };
    match Arc::get_mut(&mut out) {
        Some(shared) => {
            *buffer = std::mem::take(shared);
            if shells.len() < TX_SHELLS {
                shells.push(out);
            }
        }
        None => {
            stats.tx_buffers_copied_back += 1;
            *buffer = out.as_ref().clone();
        }
    }
}

/// `buffer` in a shell from `shells` (no allocation), or in a new `Arc`.
fn share_buffer(buffer: Vec<u8>, shells: &mut Vec<Arc<Vec<u8>>>) -> Arc<Vec<u8>> {
    match shells.pop() {
        Some(mut shell) => match Arc::get_mut(&mut shell) {
            Some(slot) => {
                *slot = buffer;
                shell
            }
            // Only unshared shells are kept; this is not reached.
            None => Arc::new(buffer),
        },
        None => Arc::new(buffer),
    }
}

/// Most bytes read ahead into the staging buffer past the PDU being
/// received, while the stream carries no Data-In (so many small responses
/// come in one read). Zero while Data-In flows, so that its payload is read
/// straight into the command's buffer and never staged.
const STAGING_READ_AHEAD: usize = 4096;

/// A Data-In whose header has been checked and whose data segment is being
/// placed straight into its command's buffer.
#[derive(Debug)]
struct Placing {
    header: DataIn,
    slot: u16,
    /// Where this segment starts in the command's buffer, the next byte to
    /// fill, and its end.
    start: usize,
    at: usize,
    end: usize,
    /// Padding and data digest after the segment (read via staging).
    trailer_len: usize,
    /// Running CRC32C of the data (and then the padding), when negotiated.
    crc: Option<u32>,
    /// Left out (ERL 1): its bytes go to `Connection::sink`.
    discard: bool,
}

pub struct Connection {
    params: Params,
    framer: PduFramer,
    digests: Digests,
    timers: ConnTimers,
    /// The session's CmdSN window: this connection's own (MPIO), or shared
    /// with the other connections of an MC/S session.
    window: Arc<SessionWindow>,
    /// This connection's CID, and its index in the session, which sits in
    /// bits 12..16 of every ITT it gives, so the tags of an MC/S session's
    /// connections never collide and a PDU for another connection's task is
    /// recognised as such.
    cid: u16,
    itt_conn_bits: u32,
    /// Made by [`Connection::in_session`]: one of an MC/S session's connections.
    in_mcs: bool,
    /// Tasks adopted from another connection by TASK REASSIGN: their ITT
    /// (another connection's) and the slot they live in here.
    adopted: Vec<(u32, u16)>,
    exp_stat_sn: Sn,
    /// ERL 1: StatSNs received ahead of `exp_stat_sn` (the ones between
    /// were lost), and how far Status SNACKs have asked already.
    stat_seen: Vec<Sn>,
    status_snacked: Sn,
    /// Where the bytes of a Data-In that is left out go (ERL 1).
    sink: Vec<u8>,
    /// Slots indexed by the low 12 bits of the ITT; high bits are a generation
    /// so a late PDU for a reused slot is recognised as unknown.
    slots: Vec<Option<Task>>,
    /// No SCSI task outstanding was submitted before this: a lower bound of
    /// the oldest one's submit time (a task that finished leaves it where it
    /// was), made exact again by [`handle_timeout`](Self::handle_timeout)
    /// once the command timeout from it passes. [`poll_timeout`](Self::poll_timeout)
    /// takes the deadline from it instead of scanning every slot each round
    /// (one cache line a slot); a deadline that comes early only makes the
    /// exact check run once more. None: no SCSI task since the last check.
    scsi_floor: Option<Instant>,
    free: Vec<u16>,
    generation: u16,
    /// Commands waiting for CmdSN window space, in submission order.
    waiting: VecDeque<u16>,
    /// Tasks with Data-Out still to send.
    data_out_ready: VecDeque<u16>,
    /// Staging for PDU headers and for data segments that are not Data-In.
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    placing: Option<Placing>,
    /// Whether the last PDU received was a Data-In (then no read-ahead).
    data_in_flowing: bool,
    tx: Vec<u8>,
    tx_start: usize,
    /// Write payload queued by reference, in stream order (empty unless
    /// `tx_by_reference`).
    tx_refs: VecDeque<TxRef>,
    tx_by_reference: bool,
    /// Emptied `Arc`s of writes that came back, reused by the next writes
    /// so a write sent by reference allocates nothing.
    tx_shells: Vec<Arc<Vec<u8>>>,
    events: VecDeque<Event>,
    failed: Option<ConnError>,
    last_rx: Instant,
    ping_outstanding: bool,
    logged_out: bool,
    pub stats: ConnStats,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("cid", &self.cid)
            .field("cmd_sn", &self.window.next_cmd_sn())
            .field("max_cmd_sn", &self.window.max_cmd_sn())
            .field("exp_stat_sn", &self.exp_stat_sn)
            .field("outstanding", &self.outstanding())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Starts the full feature phase from a login outcome.
    pub fn new(
        outcome: &super::login::LoginOutcome,
        timers: ConnTimers,
        now: Instant,
    ) -> Connection {
        let window = Arc::new(SessionWindow::new(
            outcome.cmd_sn,
            outcome.exp_cmd_sn,
            outcome.max_cmd_sn,
        ));
        let mut c = Connection::in_session(outcome, timers, now, window, 0);
        c.in_mcs = false;
        c
    }

    /// Starts the full feature phase of one connection of an MC/S session:
    /// `window` is the session's, shared with its other connections, and
    /// `index` (0..16) this connection's place in the session, which keeps
    /// its ITTs apart from theirs. The login's ExpCmdSN/MaxCmdSN are merged
    /// into the window.
    pub fn in_session(
        outcome: &super::login::LoginOutcome,
        timers: ConnTimers,
        now: Instant,
        window: Arc<SessionWindow>,
        index: u8,
    ) -> Connection {
        window.update(outcome.exp_cmd_sn, outcome.max_cmd_sn);
        let params = outcome.params.clone();
        let digests = params.digests();
        Connection {
            framer: PduFramer {
                digests,
                max_data_segment_len: params.max_recv_data_segment_len,
            },
            digests,
            params,
            timers,
            window,
            cid: outcome.cid,
            itt_conn_bits: u32::from(index & 0xf) << 12,
            in_mcs: true,
            adopted: Vec::new(),
            exp_stat_sn: outcome.exp_stat_sn,
            stat_seen: Vec::new(),
            status_snacked: outcome.exp_stat_sn,
            sink: Vec::new(),
            slots: Vec::new(),
            scsi_floor: None,
            free: Vec::new(),
            generation: 1,
            waiting: VecDeque::new(),
            data_out_ready: VecDeque::new(),
            rx: vec![0; 16 * 1024],
            rx_start: 0,
            rx_end: 0,
            placing: None,
            data_in_flowing: true,
            tx: Vec::with_capacity(256 * 1024),
            tx_start: 0,
            tx_refs: VecDeque::new(),
            tx_by_reference: false,
            tx_shells: Vec::new(),
            events: VecDeque::new(),
            failed: None,
            last_rx: now,
            ping_outstanding: false,
            logged_out: false,
            stats: ConnStats::default(),
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// SCSI commands submitted and not finished (incl. those waiting for window).
    pub fn outstanding(&self) -> usize {
        self.slots
            .iter()
            .flatten()
            .filter(|t| matches!(t.kind, TaskKind::Scsi { .. }))
            .count()
    }

    /// How many more non-immediate commands the target's window allows now.
    pub fn window_space(&self) -> u32 {
        self.window.space()
    }

    /// The session's CmdSN window (shared by every connection of an MC/S
    /// session).
    pub fn window(&self) -> &Arc<SessionWindow> {
        &self.window
    }

    /// This connection's CID.
    pub fn cid(&self) -> u16 {
        self.cid
    }

    pub fn is_failed(&self) -> Option<&ConnError> {
        self.failed.as_ref()
    }

    fn check_usable(&self) -> Result<(), SubmitError> {
        if let Some(e) = &self.failed {
            return Err(SubmitError::Down(e.to_string()));
        }
        if self.logged_out {
            return Err(SubmitError::Down("logged out".into()));
        }
        Ok(())
    }

    fn alloc_slot(&mut self, kind: TaskKind, now: Instant) -> Result<u16, SubmitError> {
        let (slot, itt) = self.take_slot()?;
        if matches!(kind, TaskKind::Scsi { .. }) {
            self.lower_scsi_floor(now);
        }
        self.slots[slot as usize] = Some(Task {
            itt,
            kind,
            cmd_sn: None,
            submitted_at: now,
        });
        Ok(slot)
    }

    /// A free slot and the new tag for it; the caller fills the slot (a
    /// SCSI task is built in place there: no move of the whole `Task`).
    #[inline]
    fn take_slot(&mut self) -> Result<(u16, u32), SubmitError> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.slots.len() < MAX_TASKS => {
                self.slots.push(None);
                (self.slots.len() - 1) as u16
            }
            None => return Err(SubmitError::Full),
        };
        self.generation = self.generation.wrapping_add(1).max(1);
        let mut itt = ((self.generation as u32) << 16) | self.itt_conn_bits | slot as u32;
        // A reinstated connection (same index, generations from 1 again)
        // may hold tasks adopted from its predecessor under their old
        // tags: a new task never takes one of those.
        while self.adopted.iter().any(|(i, _)| *i == itt) {
            self.generation = self.generation.wrapping_add(1).max(1);
            itt = ((self.generation as u32) << 16) | self.itt_conn_bits | slot as u32;
        }
        Ok((slot, itt))
    }

    /// The error for a PDU naming a task this connection does not have. A
    /// tag of another connection of the session breaks connection
    /// allegiance (RFC 7143 §5.1: a task's PDUs stay on its connection).
    fn unknown_task(&self, what: &'static str, itt: u32) -> ConnError {
        let theirs = itt & 0xf000;
        if itt != RESERVED_TAG
            && theirs != self.itt_conn_bits
            && self.in_mcs
            && !self.adopted.iter().any(|(i, _)| *i == itt)
        {
            ConnError::WrongConnection {
                what,
                itt,
                cid: self.cid,
                owner: theirs >> 12,
            }
        } else {
            ConnError::Protocol(format!("{what} for unknown task tag {itt:#x}"))
        }
    }

    /// The slot a tag lives in: its low 12 bits, or for a task adopted by
    /// TASK REASSIGN, where it was put.
    fn slot_of(&self, itt: u32) -> u16 {
        // Adopted tags may carry this connection's own index too: those
        // of its predecessor, when it was reinstated (same CID and index).
        if !self.adopted.is_empty() {
            if let Some(&(_, slot)) = self.adopted.iter().find(|(i, _)| *i == itt) {
                return slot;
            }
        }
        (itt & 0xfff) as u16
    }

    fn task_by_itt(&mut self, itt: u32) -> Option<(u16, &mut Task)> {
        let slot = self.slot_of(itt);
        match self.slots.get_mut(slot as usize) {
            Some(Some(t)) if t.itt == itt => Some((slot, t)),
            _ => None,
        }
    }

    fn free_slot(&mut self, slot: u16) -> Option<Task> {
        let t = self.slots.get_mut(slot as usize)?.take();
        if t.is_some() {
            self.slot_emptied(slot);
        }
        t
    }

    /// [`free_slot`](Self::free_slot) for a slot that holds a task, which
    /// is dropped where it lies (not moved out to the caller).
    fn release_slot(&mut self, slot: u16) {
        if let Some(t) = self.slots.get_mut(slot as usize) {
            if t.is_some() {
                *t = None;
                self.slot_emptied(slot);
            }
        }
    }

    /// A slot whose task just left: free for the next one, and no longer
    /// an adopted task's.
    fn slot_emptied(&mut self, slot: u16) {
        self.free.push(slot);
        if !self.adopted.is_empty() {
            self.adopted.retain(|&(_, s)| s != slot);
        }
    }

    /// Queues a SCSI command. It is sent as soon as the CmdSN window allows.
    pub fn submit(&mut self, cmd: Command, now: Instant) -> Result<(), SubmitError> {
        self.check_usable()?;
        if u32::try_from(cmd.buffer.len()).is_err() {
            return Err(SubmitError::TooLarge {
                len: cmd.buffer.len(),
            });
        }
        let immediate = cmd.immediate;
        let (slot, itt) = self.take_slot()?;
        self.lower_scsi_floor(now);
        self.slots[slot as usize] = Some(Task {
            itt,
            kind: TaskKind::fresh(cmd),
            cmd_sn: None,
            submitted_at: now,
        });
        self.stats.commands += 1;
        if immediate {
            // RFC 7143 §3.2.2.1: the next CmdSN, not taken, and no wait
            // for window space.
            let cmd_sn = self.window.next_cmd_sn();
            self.send_command(slot, cmd_sn);
            return Ok(());
        }
        self.waiting.push_back(slot);
        self.flush_waiting();
        Ok(())
    }

    /// Sends the commands that wait for CmdSN window space, as far as the
    /// window allows now. In an MC/S session another connection's response
    /// may have opened the shared window: the driver calls this each round.
    pub fn send_queued(&mut self) {
        if !self.waiting.is_empty() && self.failed.is_none() {
            self.flush_waiting();
        }
    }

    /// Sends queued commands while the window has room.
    fn flush_waiting(&mut self) {
        while let Some(&slot) = self.waiting.front() {
            if !self.is_queued_kind(slot) {
                // Gone: never burn a CmdSN on it, or the target would wait
                // forever for the hole.
                self.waiting.pop_front();
                continue;
            }
            // Check and take in one step: other connections of the session
            // take from the same window.
            let Some(cmd_sn) = self.window.try_take() else {
                self.stats.window_stalls += 1;
                return;
            };
            self.waiting.pop_front();
            self.send_command(slot, cmd_sn);
        }
    }

    fn is_queued_kind(&self, slot: u16) -> bool {
        matches!(
            self.slots.get(slot as usize),
            Some(Some(Task {
                kind: TaskKind::Scsi { .. } | TaskKind::Text { .. },
                ..
            }))
        )
    }

    fn send_command(&mut self, slot: u16, cmd_sn: Sn) {
        match self.slots.get(slot as usize) {
            Some(Some(Task {
                kind: TaskKind::Scsi { .. },
                ..
            })) => {}
            Some(Some(Task {
                kind:
                    TaskKind::Text {
                        request,
                        continuation,
                        ..
                    },
                ..
            })) => {
                match *continuation {
                    Some(ttt) => self.send_text_pdu(slot, ttt, &[], cmd_sn),
                    None => {
                        let data = request.clone();
                        self.send_text_pdu(slot, RESERVED_TAG, &data, cmd_sn);
                    }
                }
                return;
            }
            // Checked by the caller before it took the CmdSN.
            _ => return,
        }
        let exp_stat_sn = self.exp_stat_sn;
        let immediate_allowed = self.params.immediate_data;
        let initial_r2t = self.params.initial_r2t;
        let first_burst = self.params.first_burst_len as usize;
        let max_xmit = self.params.max_xmit_data_segment_len as usize;
        let digests = self.digests;
        let Some(Some(task)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        task.cmd_sn = Some(cmd_sn);
        let itt = task.itt;
        let TaskKind::Scsi {
            cmd,
            data_done,
            unsolicited,
            out,
            ..
        } = &mut task.kind
        else {
            return;
        };
        let len = cmd.buffer.len();
        let write = cmd.direction == Direction::Write;
        if write && len > 0 && self.tx_by_reference {
            *out = Some(share_buffer(
                std::mem::take(&mut cmd.buffer),
                &mut self.tx_shells,
            ));
        }
        let shared = out.as_ref();
        // Unsolicited data: immediate (in the command PDU) then Data-Out up to
        // FirstBurstLength when InitialR2T=No (RFC 7143's "Data Transfer Overview"; §3.2.4.2 in RFC 3720).
        let mut immediate_len = 0;
        if write && len > 0 {
            let unsolicited_limit = if initial_r2t && !immediate_allowed {
                0
            } else {
                len.min(first_burst)
            };
            if immediate_allowed {
                immediate_len = unsolicited_limit.min(max_xmit);
            }
            if !initial_r2t && unsolicited_limit > immediate_len {
                *unsolicited = Some((immediate_len as u32, unsolicited_limit as u32));
            }
        }
        *data_done = immediate_len;
        let unsolicited_follows = unsolicited.is_some();
        let hdr = ScsiCommand {
            immediate: cmd.immediate,
            final_bit: !unsolicited_follows,
            read: cmd.direction == Direction::Read,
            write,
            attr: 1,
            lun: cmd.lun,
            itt,
            expected_data_len: len as u32,
            cmd_sn,
            exp_stat_sn,
            cdb: cmd.cdb,
        };
        if immediate_len == 0 {
            // No data segment (every read): the header and its digest,
            // framed without the general PduHeader.
            crate::wire::iscsi::encode_bhs(&mut self.tx, &hdr.emit_bhs(0, 0), digests);
        } else {
            encode_data_pdu(
                &mut self.tx,
                shared.map(|_| &mut self.tx_refs),
                &PduHeader::ScsiCommand(hdr),
                shared.map_or(&cmd.buffer[..], |b| &b[..]),
                shared,
                0,
                immediate_len,
                digests,
                &mut self.stats,
            );
        }
        self.stats.pdus_out += 1;
        if write {
            self.stats.bytes_written += immediate_len as u64;
        }
        if unsolicited_follows {
            self.data_out_ready.push_back(slot);
            self.send_data_out();
        }
    }

    /// Emits Data-Out PDUs for unsolicited bursts and answered R2Ts.
    fn send_data_out(&mut self) {
        let max_xmit = self.params.max_xmit_data_segment_len as usize;
        let exp_stat_sn = self.exp_stat_sn;
        let digests = self.digests;
        while let Some(slot) = self.data_out_ready.pop_front() {
            let Some(Some(task)) = self.slots.get_mut(slot as usize) else {
                continue;
            };
            let itt = task.itt;
            let TaskKind::Scsi {
                cmd,
                unsolicited,
                r2ts,
                data_done,
                out,
                ..
            } = &mut task.kind
            else {
                continue;
            };
            let shared = out.as_ref();
            let (ttt, start, end) = if let Some((s, e)) = unsolicited.take() {
                (RESERVED_TAG, s as usize, e as usize)
            } else if let Some((ttt, off, len)) = r2ts.pop_front() {
                (ttt, off as usize, off as usize + len as usize)
            } else {
                continue;
            };
            let mut offset = start;
            let mut data_sn = Sn(0);
            while offset < end {
                let n = (end - offset).min(max_xmit);
                let hdr = PduHeader::DataOut(DataOut {
                    final_bit: offset + n == end,
                    lun: cmd.lun,
                    itt,
                    ttt,
                    exp_stat_sn,
                    data_sn,
                    buffer_offset: offset as u32,
                });
                encode_data_pdu(
                    &mut self.tx,
                    shared.map(|_| &mut self.tx_refs),
                    &hdr,
                    shared.map_or(&cmd.buffer[..], |b| &b[..]),
                    shared,
                    offset,
                    n,
                    digests,
                    &mut self.stats,
                );
                self.stats.pdus_out += 1;
                self.stats.bytes_written += n as u64;
                *data_done += n;
                data_sn = data_sn.next();
                offset += n;
            }
            if !r2ts.is_empty() {
                self.data_out_ready.push_back(slot);
            }
        }
    }

    /// Sends a NOP-Out ping (immediate, so it needs no window space).
    pub fn ping(&mut self, now: Instant) -> Result<(), SubmitError> {
        let cmd_sn = self.window.next_cmd_sn();
        self.send_nop_out(true, cmd_sn, now)?;
        self.stats.nop_pings += 1;
        self.ping_outstanding = true;
        Ok(())
    }

    /// MC/S: a non-immediate NOP-Out with CmdSN `cmd_sn`, which takes the
    /// place in the session's CmdSN order of a command lost with another,
    /// failed connection (once the target has closed that one), so the
    /// target need not wait for it. Answered by a NOP-In, like a ping.
    pub fn fill_cmd_sn(&mut self, cmd_sn: Sn, now: Instant) -> Result<(), SubmitError> {
        self.send_nop_out(false, cmd_sn, now)
    }

    /// A NOP-Out that asks for an answer (its own task tag, tracked as a
    /// ping task).
    fn send_nop_out(
        &mut self,
        immediate: bool,
        cmd_sn: Sn,
        now: Instant,
    ) -> Result<(), SubmitError> {
        self.check_usable()?;
        let slot = self.alloc_slot(TaskKind::Ping { sent_at: now }, now)?;
        let itt = self.slots[slot as usize]
            .as_ref()
            .map(|t| t.itt)
            .unwrap_or(0);
        let hdr = PduHeader::NopOut(NopOut {
            immediate,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        encode_pdu(&mut self.tx, &hdr, &[], self.digests);
        self.stats.pdus_out += 1;
        Ok(())
    }

    /// The CmdSNs of this connection's unfinished non-immediate tasks
    /// (MC/S: what a failed connection may leave missing in the session's
    /// CmdSN order).
    pub fn outstanding_cmd_sns(&self) -> Vec<Sn> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|t| t.cmd_sn)
            .collect()
    }

    /// Sends a task management request (immediate).
    pub fn task_management(
        &mut self,
        function: u8,
        lun: u64,
        referenced_user_tag: Option<u64>,
        user_tag: u64,
        now: Instant,
    ) -> Result<(), SubmitError> {
        self.check_usable()?;
        let next_cmd_sn = self.window.next_cmd_sn();
        let (referenced_itt, ref_cmd_sn) = match referenced_user_tag {
            Some(tag) => self
                .slots
                .iter()
                .flatten()
                .find_map(|t| match &t.kind {
                    TaskKind::Scsi { cmd, .. } if cmd.user_tag == tag => {
                        Some((t.itt, t.cmd_sn.unwrap_or(next_cmd_sn)))
                    }
                    _ => None,
                })
                .unwrap_or((RESERVED_TAG, next_cmd_sn)),
            None => (RESERVED_TAG, next_cmd_sn),
        };
        let slot = self.alloc_slot(TaskKind::Tmf { user_tag }, now)?;
        let itt = self.slots[slot as usize]
            .as_ref()
            .map(|t| t.itt)
            .unwrap_or(0);
        let hdr = PduHeader::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt,
            referenced_task_tag: referenced_itt,
            cmd_sn: next_cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: Sn(0),
        });
        encode_pdu(&mut self.tx, &hdr, &[], self.digests);
        self.stats.pdus_out += 1;
        Ok(())
    }

    /// Sends a text request (e.g. `SendTargets=All`); the answer comes as
    /// [`Event::Text`].
    pub fn text_request(
        &mut self,
        pairs: &TextPairs,
        user_tag: u64,
        now: Instant,
    ) -> Result<(), SubmitError> {
        self.check_usable()?;
        let slot = self.alloc_slot(
            TaskKind::Text {
                user_tag,
                request: pairs.to_bytes(),
                collected: Vec::new(),
                continuation: None,
                renegotiation: false,
            },
            now,
        )?;
        // Non-immediate: it takes a CmdSN, so it waits for window space too.
        self.waiting.push_back(slot);
        self.flush_waiting();
        Ok(())
    }

    /// Text requests are non-immediate: they take a CmdSN (`cmd_sn`).
    fn send_text_pdu(&mut self, slot: u16, ttt: u32, data: &[u8], cmd_sn: Sn) {
        let Some(Some(task)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        task.cmd_sn = Some(cmd_sn);
        let hdr = PduHeader::TextRequest(TextRequest {
            immediate: false,
            final_bit: true,
            cont: false,
            lun: 0,
            itt: task.itt,
            ttt,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        encode_pdu(&mut self.tx, &hdr, data, self.digests);
        self.stats.pdus_out += 1;
    }

    /// Answers AsyncEvent 4 (RFC 7143 §11.9.1: "the initiator MUST honor
    /// this request by issuing a Text Request ... as early as possible,
    /// unless a Text Request is already pending"): declares our
    /// MaxRecvDataSegmentLength again, the one operational key the full
    /// feature phase may renegotiate (§13.12, "Use: ALL"; the others are
    /// leading-only or login-only). The answer is applied when it comes
    /// ([`Event::Renegotiated`]).
    fn start_renegotiation(&mut self, now: Instant) {
        let pending = self
            .slots
            .iter()
            .flatten()
            .any(|t| matches!(t.kind, TaskKind::Text { .. }));
        if pending || self.check_usable().is_err() {
            return;
        }
        let mut pairs = TextPairs::new();
        pairs.push(
            "MaxRecvDataSegmentLength",
            self.params.max_recv_data_segment_len.to_string(),
        );
        let Ok(slot) = self.alloc_slot(
            TaskKind::Text {
                user_tag: 0,
                request: pairs.to_bytes(),
                collected: Vec::new(),
                continuation: None,
                renegotiation: true,
            },
            now,
        ) else {
            return;
        };
        self.events.push_back(Event::RenegotiationStarted);
        self.waiting.push_back(slot);
        self.flush_waiting();
    }

    /// Takes the target's declarations from a renegotiation's answer.
    fn apply_renegotiation(&mut self, pairs: &TextPairs) -> Result<(), ConnError> {
        for (k, v) in pairs.iter() {
            match k {
                "MaxRecvDataSegmentLength" => {
                    let n = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (512..=16_777_215).contains(n))
                        .ok_or_else(|| {
                            ConnError::Protocol(format!(
                                "renegotiation: MaxRecvDataSegmentLength={v:?} is not 512..16777215 (RFC 7143 §13.12)"
                            ))
                        })?;
                    self.params.max_xmit_data_segment_len = n;
                }
                // Answers to keys we did not send, or to vendor keys.
                _ => log::debug!("renegotiation: target sent {k}={v}, ignored"),
            }
        }
        self.events.push_back(Event::Renegotiated {
            max_xmit_data_segment_len: self.params.max_xmit_data_segment_len,
        });
        Ok(())
    }

    /// Starts a logout of the whole session (reason 0).
    pub fn logout(&mut self, now: Instant) -> Result<(), SubmitError> {
        self.logout_reason(0, self.cid, now)
    }

    /// Starts a logout (RFC 7143 §11.14.1) with `reason` 0 (close the
    /// session), 1 (close connection `cid`) or 2 (remove connection `cid`
    /// for recovery), sent on this connection. With reason 1 or 2 and
    /// another CID, this connection stays up after the answer.
    pub fn logout_reason(&mut self, reason: u8, cid: u16, now: Instant) -> Result<(), SubmitError> {
        self.check_usable()?;
        let closes_this = reason == 0 || cid == self.cid;
        let slot = self.alloc_slot(TaskKind::Logout { cid, closes_this }, now)?;
        let itt = self.slots[slot as usize]
            .as_ref()
            .map(|t| t.itt)
            .unwrap_or(0);
        let cmd_sn = self.window.next_cmd_sn();
        let hdr = PduHeader::LogoutRequest(LogoutRequest {
            immediate: true,
            reason,
            itt,
            cid,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        });
        encode_pdu(&mut self.tx, &hdr, &[], self.digests);
        self.stats.pdus_out += 1;
        Ok(())
    }

    /// Bytes waiting to be written to the transport (with
    /// [`set_tx_by_reference`](Self::set_tx_by_reference): only those
    /// before the next payload sent by reference; use [`tx_parts`](Self::tx_parts)).
    pub fn pending_tx(&self) -> &[u8] {
        let end = self.tx_refs.front().map_or(self.tx.len(), |r| r.at);
        &self.tx[self.tx_start..end]
    }

    /// Whether anything waits to be written to the transport.
    pub fn has_pending_tx(&self) -> bool {
        self.tx_start < self.tx.len() || !self.tx_refs.is_empty()
    }

    /// Lets a write's payload (immediate data, Data-Out) leave by reference
    /// ([`TxPart::Shared`] from [`tx_parts`](Self::tx_parts)) instead of
    /// being copied into the send bytes: the transport sends straight from
    /// the caller's buffer, which comes back with the completion (copied
    /// only if the transport still holds unacknowledged bytes of it).
    /// Set before the first command.
    pub fn set_tx_by_reference(&mut self, on: bool) {
        self.tx_by_reference = on;
    }

    /// The bytes waiting to be written, in order, as up to `out.len()`
    /// parts; returns the count. Then call [`consume_tx`](Self::consume_tx)
    /// with how many bytes the transport took.
    pub fn tx_parts<'a>(&'a self, out: &mut [TxPart<'a>]) -> usize {
        let mut n = 0;
        let mut pos = self.tx_start;
        for r in &self.tx_refs {
            if r.at > pos {
                if n == out.len() {
                    return n;
                }
                out[n] = TxPart::Bytes(&self.tx[pos..r.at]);
                n += 1;
                pos = r.at;
            }
            if n == out.len() {
                return n;
            }
            out[n] = TxPart::Shared {
                buf: &r.buf,
                start: r.start,
                len: r.len,
            };
            n += 1;
        }
        if pos < self.tx.len() && n < out.len() {
            out[n] = TxPart::Bytes(&self.tx[pos..]);
            n += 1;
        }
        n
    }

    /// Marks `n` bytes of [`pending_tx`](Self::pending_tx) (or of the
    /// [`tx_parts`](Self::tx_parts)) as written.
    pub fn consume_tx(&mut self, mut n: usize) {
        while n > 0 {
            let inline_end = self.tx_refs.front().map_or(self.tx.len(), |r| r.at);
            if inline_end > self.tx_start {
                let k = n.min(inline_end - self.tx_start);
                self.tx_start += k;
                n -= k;
                continue;
            }
            let Some(r) = self.tx_refs.front_mut() else {
                break;
            };
            let k = n.min(r.len);
            r.start += k;
            r.len -= k;
            n -= k;
            if r.len == 0 {
                self.tx_refs.pop_front();
            }
        }
        if self.tx_start == self.tx.len() && self.tx_refs.is_empty() {
            self.tx.clear();
            self.tx_start = 0;
        }
    }

    /// Where the next bytes from the transport go, in stream order: fill
    /// the first slice, then the second (often empty). While a Data-In's
    /// data segment is due, the first is the command's own buffer (the
    /// transport reads the payload straight there: one copy) and the second
    /// takes the segment's padding/digest and the next PDU's header, so one
    /// `readv` gets both. Otherwise the first is staging for the PDU being
    /// received. Then call [`commit_rx`](Self::commit_rx) with the count.
    pub fn rx_buffers(&mut self) -> (&mut [u8], &mut [u8]) {
        self.buffers(true)
    }

    /// The first slice of [`rx_buffers`](Self::rx_buffers), at most `max`
    /// bytes (for transports that read into one buffer at a time).
    pub fn rx_space(&mut self, max: usize) -> &mut [u8] {
        let (first, _) = self.buffers(true);
        let n = first.len().min(max.max(1));
        &mut first[..n]
    }

    /// Staging bytes the PDU being received still needs (not counting any
    /// read-ahead).
    fn staging_need(&self) -> usize {
        let have = &self.rx[self.rx_start..self.rx_end];
        if let Some(p) = &self.placing {
            // The segment's data goes to the buffer; then the trailer.
            return if p.at < p.end {
                0
            } else {
                p.trailer_len.saturating_sub(have.len())
            };
        }
        let Ok(bhs) = Bhs::new_checked(have) else {
            return BHS_LEN - have.len();
        };
        if bhs.data_segment_len() > self.framer.max_data_segment_len {
            // commit_rx fails the connection on this header.
            return 1;
        }
        let header_len =
            BHS_LEN + bhs.total_ahs_len() + if self.digests.header { DIGEST_LEN } else { 0 };
        let whole = if bhs.opcode_raw() == Opcode::DataIn as u8 {
            header_len
        } else {
            self.framer.pdu_len(&bhs)
        };
        whole.saturating_sub(have.len()).max(1)
    }

    /// Makes `want` bytes of room after the staged bytes.
    fn reserve_staging(&mut self, want: usize) {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        if self.rx.len() - self.rx_end < want {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
            if self.rx.len() - self.rx_end < want {
                // Bounded: a PDU's length is checked against
                // MaxRecvDataSegmentLength before room is made for it.
                self.rx.resize(self.rx_end + want, 0);
            }
        }
    }

    fn buffers(&mut self, read_ahead: bool) -> (&mut [u8], &mut [u8]) {
        let header_len = BHS_LEN + if self.digests.header { DIGEST_LEN } else { 0 };
        if let Some(p) = &self.placing {
            if p.at < p.end && self.rx_start == self.rx_end {
                let (slot, at, end, discard) = (p.slot, p.at, p.end, p.discard);
                let after = if read_ahead {
                    p.trailer_len + header_len
                } else {
                    0
                };
                self.reserve_staging(after);
                let Connection {
                    slots,
                    rx,
                    rx_end,
                    sink,
                    ..
                } = self;
                let second = &mut rx[*rx_end..*rx_end + after];
                if discard {
                    // Bounded: the segment's length was checked against
                    // MaxRecvDataSegmentLength with its header.
                    if sink.len() < end - at {
                        sink.resize(end - at, 0);
                    }
                    return (&mut sink[..end - at], second);
                }
                return match task_buffer(slots, slot) {
                    Some(buf) => (&mut buf[at..end], second),
                    None => (second, &mut []),
                };
            }
        }
        let need = self.staging_need();
        let extra = if read_ahead && !self.data_in_flowing {
            STAGING_READ_AHEAD
        } else {
            0
        };
        self.reserve_staging(need + extra);
        let end = self.rx_end;
        (&mut self.rx[end..end + need + extra], &mut [])
    }

    /// Takes `n` bytes the transport wrote into [`rx_buffers`](Self::rx_buffers)
    /// (or [`rx_space`](Self::rx_space)) and processes every PDU they complete.
    pub fn commit_rx(&mut self, n: usize, now: Instant) -> Result<(), ConnError> {
        if let Some(e) = &self.failed {
            return Err(ConnError::Failed(e.to_string()));
        }
        if n > 0 {
            self.last_rx = now;
        }
        let mut left = n;
        if let Some(p) = &mut self.placing {
            if p.at < p.end && self.rx_start == self.rx_end {
                // The first buffer was the command's: account for what landed.
                let took = left.min(p.end - p.at);
                if let (Some(crc), Some(buf)) =
                    (p.crc.as_mut(), task_buffer(&mut self.slots, p.slot))
                {
                    *crc = crc32c::crc32c_append(*crc, &buf[p.at..p.at + took]);
                }
                p.at += took;
                self.stats.rx_bytes_placed += took as u64;
                left -= took;
            }
        }
        self.rx_end = (self.rx_end + left).min(self.rx.len());
        if let Err(e) = self.process_staged(now) {
            return Err(self.fail(e));
        }
        self.after_rx();
        Ok(())
    }

    /// Feeds bytes the transport holds (a frame's payload, its receive
    /// ring): Data-In payload is copied once, straight into the command's
    /// buffer; headers and other segments go through staging.
    pub fn receive(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), ConnError> {
        while !bytes.is_empty() {
            let placed = self.place_data_in(bytes, now)?;
            if placed > 0 {
                bytes = &bytes[placed..];
                continue;
            }
            let header = self.data_in_header_in_place(bytes, now)?;
            if header > 0 {
                bytes = &bytes[header..];
                continue;
            }
            let (first, _) = self.buffers(false);
            let n = first.len().min(bytes.len());
            first[..n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.commit_rx(n, now)?;
        }
        Ok(())
    }

    /// [`receive`](Self::receive)'s path for Data-In payload: while a
    /// segment's data is due and staging is empty, the bytes go straight
    /// into the command's buffer, and the PDU machinery
    /// ([`commit_rx`](Self::commit_rx)) runs only once the segment's data
    /// is complete (most of a read's bytes come in frames that are all
    /// payload: nothing else can change before its end). Returns the bytes
    /// taken; 0: not placing into a buffer now (the general path).
    fn place_data_in(&mut self, bytes: &[u8], now: Instant) -> Result<usize, ConnError> {
        if self.failed.is_some() || self.rx_start != self.rx_end {
            return Ok(0);
        }
        let Some(p) = &mut self.placing else {
            return Ok(0);
        };
        if p.at >= p.end || p.discard {
            return Ok(0);
        }
        let Some(buf) = task_buffer(&mut self.slots, p.slot) else {
            return Ok(0);
        };
        let n = bytes.len().min(p.end - p.at);
        let landed = &mut buf[p.at..p.at + n];
        landed.copy_from_slice(&bytes[..n]);
        if let Some(crc) = p.crc.as_mut() {
            *crc = crc32c::crc32c_append(*crc, landed);
        }
        p.at += n;
        let complete = p.at == p.end;
        let trailer = p.trailer_len;
        self.stats.rx_bytes_placed += n as u64;
        self.last_rx = now;
        if complete && trailer == 0 {
            // No padding and no data digest: the Data-In is done here (what
            // process_staged would do with it, nothing being staged).
            if let Some(p) = self.placing.take() {
                if let Err(e) = self.finish_data_in(&p.header, p.slot, p.start, p.end - p.start) {
                    return Err(self.fail(e));
                }
            }
            self.after_rx();
        } else if complete {
            // The trailer and the finished Data-In.
            self.commit_rx(0, now)?;
        }
        Ok(n)
    }

    /// Processes what staging holds: PDU headers, whole non-Data-In PDUs,
    /// read-ahead Data-In payload and data trailers.
    fn process_staged(&mut self, now: Instant) -> Result<(), ConnError> {
        loop {
            if let Some(p) = &mut self.placing {
                let staged = self.rx_end - self.rx_start;
                if p.at < p.end {
                    if staged == 0 {
                        return Ok(());
                    }
                    // Payload that was read ahead with a header: a second copy.
                    let n = staged.min(p.end - p.at);
                    let from = &self.rx[self.rx_start..self.rx_start + n];
                    if let Some(buf) = task_buffer(&mut self.slots, p.slot) {
                        buf[p.at..p.at + n].copy_from_slice(from);
                    }
                    if let Some(crc) = p.crc.as_mut() {
                        *crc = crc32c::crc32c_append(*crc, from);
                    }
                    p.at += n;
                    self.rx_start += n;
                    self.stats.rx_bytes_staged += n as u64;
                    continue;
                }
                if staged < p.trailer_len {
                    return Ok(());
                }
                let trailer = &self.rx[self.rx_start..self.rx_start + p.trailer_len];
                let pad = pad_len(p.end - p.start);
                let mut digest_ok = true;
                if let Some(crc) = p.crc {
                    let crc = crc32c::crc32c_append(crc, &trailer[..pad]);
                    let d = &trailer[pad..pad + DIGEST_LEN];
                    let received = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                    if received != crc {
                        if self.params.error_recovery_level == 0 {
                            return Err(IscsiWireError::DataDigest {
                                received,
                                computed: crc,
                            }
                            .into());
                        }
                        digest_ok = false;
                    }
                }
                self.rx_start += p.trailer_len;
                let Some(p) = self.placing.take() else {
                    return Ok(());
                };
                if p.discard {
                    continue;
                }
                if !digest_ok {
                    // ERL 1: what landed is overwritten when it comes again.
                    self.data_in_lost(&p.header, p.slot);
                    continue;
                }
                self.finish_data_in(&p.header, p.slot, p.start, p.end - p.start)?;
                continue;
            }
            let staged = &self.rx[self.rx_start..self.rx_end];
            if staged.len() < BHS_LEN {
                return Ok(());
            }
            if starts_data_in_with_data(staged) {
                let Some((d, header_len, dsl)) = self.framer.frame_data_in_header(staged)? else {
                    return Ok(());
                };
                self.rx_start += header_len;
                self.start_data_in(d, dsl)?;
                continue;
            }
            let framed = match self.framer.frame(staged)? {
                Some(f) => f,
                None => return Ok(()),
            };
            let start = self.rx_start;
            self.rx_start += framed.total_len;
            self.stats.pdus_in += 1;
            self.data_in_flowing = matches!(framed.header, PduHeader::DataIn(_));
            self.handle_pdu(&framed, start, now)?;
        }
    }

    /// A Data-In header is in: its segment's data is to be placed next.
    fn start_data_in(&mut self, d: DataIn, dsl: usize) -> Result<(), ConnError> {
        self.stats.pdus_in += 1;
        self.data_in_flowing = true;
        self.update_window(d.exp_cmd_sn, d.max_cmd_sn);
        let (slot, start, discard) = match self.check_data_in(&d, dsl)? {
            Some((slot, start)) => (slot, start, false),
            None => (NO_SLOT, 0, true),
        };
        self.placing = Some(Placing {
            trailer_len: self.framer.trailer_len(dsl),
            crc: (self.digests.data && !discard).then_some(0),
            header: d,
            slot,
            start,
            at: start,
            end: start + dsl,
            discard,
        });
        Ok(())
    }

    /// [`receive`](Self::receive)'s path for a Data-In header at the start
    /// of the bytes handed over, with nothing staged: it is framed where it
    /// lies (in the frame), not copied into staging and taken through
    /// [`commit_rx`](Self::commit_rx) first. Returns the header bytes
    /// taken; 0: not a whole Data-In header there (the general path).
    fn data_in_header_in_place(&mut self, bytes: &[u8], now: Instant) -> Result<usize, ConnError> {
        if self.failed.is_some() || self.placing.is_some() || self.rx_start != self.rx_end {
            return Ok(0);
        }
        if !starts_data_in_with_data(bytes) {
            return Ok(0);
        }
        let (d, header_len, dsl) = match self.framer.frame_data_in_header(bytes) {
            Ok(Some(framed)) => framed,
            Ok(None) => return Ok(0),
            Err(e) => return Err(self.fail(e.into())),
        };
        self.last_rx = now;
        if let Err(e) = self.start_data_in(d, dsl) {
            return Err(self.fail(e));
        }
        self.after_rx();
        Ok(header_len)
    }

    /// What a receive can unblock: commands waiting for window space (the
    /// PDU moved MaxCmdSN) and Data-Out bursts made ready.
    fn after_rx(&mut self) {
        if !self.waiting.is_empty() {
            self.flush_waiting();
        }
        if !self.data_out_ready.is_empty() {
            self.send_data_out();
        }
    }

    fn fail(&mut self, e: ConnError) -> ConnError {
        if self.failed.is_none() {
            self.failed = Some(e.clone());
        }
        e
    }

    /// Marks the connection failed from outside (transport error).
    pub fn set_failed(&mut self, e: ConnError) {
        self.fail(e);
    }

    fn update_window(&mut self, exp_cmd_sn: Sn, max_cmd_sn: Sn) {
        // RFC 7143 §4.2.2.1: ignore values where MaxCmdSN < ExpCmdSN - 1, and
        // never let the window move backwards (SessionWindow::update).
        self.window.update(exp_cmd_sn, max_cmd_sn);
    }

    /// The negotiated ErrorRecoveryLevel.
    fn erl(&self) -> u32 {
        self.params.error_recovery_level
    }

    /// Takes a PDU's StatSN; returns whether it is new. In order, it moves
    /// ExpStatSN on. At ERL 0 anything else fails the connection (one TCP
    /// connection delivers in order). At ERL 1 and up a StatSN ahead means
    /// the statuses between were lost (a digest error dropped them): it is
    /// kept, and a Status SNACK asks for the missing ones; a StatSN seen
    /// before is a status sent again after a SNACK (false).
    fn check_stat_sn(&mut self, stat_sn: Sn) -> Result<bool, ConnError> {
        if stat_sn == self.exp_stat_sn {
            self.exp_stat_sn = stat_sn.next();
            while let Some(i) = self.stat_seen.iter().position(|s| *s == self.exp_stat_sn) {
                self.stat_seen.swap_remove(i);
                self.exp_stat_sn = self.exp_stat_sn.next();
            }
            return Ok(true);
        }
        let jump = ConnError::StatSn {
            cid: self.cid,
            expected: self.exp_stat_sn,
            got: stat_sn,
        };
        if self.erl() == 0 {
            return Err(jump);
        }
        if self.stat_sn_taken(stat_sn) {
            return Ok(false);
        }
        if stat_sn.diff(self.exp_stat_sn) as u32 > MAX_STATUS_GAP
            || self.stat_seen.len() >= MAX_STATUS_GAP as usize
        {
            return Err(jump);
        }
        self.stat_seen.push(stat_sn);
        self.snack_statuses_before(stat_sn);
        Ok(true)
    }

    /// Whether a status with this StatSN was taken already (ERL 1).
    fn stat_sn_taken(&self, stat_sn: Sn) -> bool {
        stat_sn.lt(self.exp_stat_sn) || self.stat_seen.contains(&stat_sn)
    }

    /// One whole PDU from staging (its data segment at `base + f.data`),
    /// handed to the handler for its kind (`connection/pdu.rs`).
    fn handle_pdu(&mut self, f: &FramedPdu, base: usize, now: Instant) -> Result<(), ConnError> {
        let data = base + f.data.start..base + f.data.end;
        match &f.header {
            PduHeader::DataIn(d) => {
                self.update_window(d.exp_cmd_sn, d.max_cmd_sn);
                self.on_data_in(d, data)
            }
            PduHeader::ScsiResponse(r) => self.on_scsi_response(r, data),
            PduHeader::R2t(r) => self.on_r2t_pdu(r),
            PduHeader::NopIn(n) => self.on_nop_in(n, data, now),
            PduHeader::TaskMgmtResponse(t) => self.on_tmf_response(t),
            PduHeader::TextResponse(t) => self.on_text_response(t, data),
            PduHeader::LogoutResponse(l) => self.on_logout_response(l),
            PduHeader::AsyncMessage(a) => self.on_async_message(a, data, now),
            PduHeader::Reject(r) => self.on_reject(r, data),
            other => Err(ConnError::Protocol(format!(
                "target sent an initiator-only PDU ({})",
                other.opcode()
            ))),
        }
    }

    /// A Data-In whose data sits in staging (an empty segment, in practice).
    fn on_data_in(&mut self, d: &DataIn, data: std::ops::Range<usize>) -> Result<(), ConnError> {
        let len = data.len();
        let Some((slot, off)) = self.check_data_in(d, len)? else {
            return Ok(());
        };
        if len > 0 {
            if let Some(buf) = task_buffer(&mut self.slots, slot) {
                buf[off..off + len].copy_from_slice(&self.rx[data]);
            }
            self.stats.rx_bytes_staged += len as u64;
        }
        self.finish_data_in(d, slot, off, len)
    }

    /// Checks a Data-In header against its task before any of its `len`
    /// data bytes are taken; returns the task's slot and where in the
    /// command's buffer the data goes. None (ERL 1 and up only): the PDU is
    /// left out, its bytes go nowhere: it came after a lost one (a Data
    /// SNACK asks for everything from the lost one on), or it is a copy of
    /// one taken already.
    fn check_data_in(&mut self, d: &DataIn, len: usize) -> Result<Option<(u16, usize)>, ConnError> {
        let erl = self.erl();
        if d.status_present {
            if erl == 0 {
                self.check_stat_sn(d.stat_sn)?;
            } else if !self.stat_sn_taken(d.stat_sn) {
                // Every status before this one has been sent.
                self.snack_statuses_before(d.stat_sn);
            }
        }
        let itt = d.itt;
        let slot = self.slot_of(itt);
        if !matches!(self.slots.get(slot as usize), Some(Some(t)) if t.itt == itt) {
            if erl > 0 && d.status_present && self.stat_sn_taken(d.stat_sn) {
                // Sent again after a SNACK for a command done already.
                self.stats.data_in_discarded += 1;
                self.stats.statuses_again += 1;
                return Ok(None);
            }
            return Err(self.unknown_task("Data-In", itt));
        }
        let Some(Some(task)) = self.slots.get_mut(slot as usize) else {
            return Err(ConnError::Protocol(format!(
                "Data-In for unknown task tag {itt:#x}"
            )));
        };
        if task.cmd_sn.is_none() {
            return Err(not_sent_yet("Data-In", itt));
        }
        let TaskKind::Scsi {
            cmd,
            data_done,
            next_data_sn,
            snack,
            ..
        } = &mut task.kind
        else {
            return Err(ConnError::Protocol(format!(
                "Data-In for non-SCSI task {itt:#x}"
            )));
        };
        let off = d.buffer_offset as usize;
        if len > 0 {
            if cmd.direction != Direction::Read {
                return Err(ConnError::Protocol(format!(
                    "Data-In for task {itt:#x}, which reads no data"
                )));
            }
            if d.data_sn != *next_data_sn {
                if erl == 0 {
                    return Err(ConnError::Protocol(format!(
                        "Data-In DataSN {} out of order (expected {}) for task {itt:#x}",
                        d.data_sn, next_data_sn
                    )));
                }
                self.stats.data_in_discarded += 1;
                if d.data_sn.lt(*next_data_sn) {
                    // A copy of one taken already.
                    return Ok(None);
                }
                // Lost before this one: ask for all from the lost one on,
                // once per round of answers.
                let ask = snack.is_none_or(|hi| d.data_sn.le(hi));
                *snack = Some(d.data_sn);
                let (lun, beg) = (cmd.lun, *next_data_sn);
                if ask {
                    self.send_snack(SNACK_DATA, lun, itt, beg.0, 0);
                }
                return Ok(None);
            }
            let end = off.saturating_add(len);
            if end > cmd.buffer.len() {
                return Err(ConnError::Protocol(format!(
                    "Data-In past the expected transfer length: offset {off} + {len} > {}",
                    cmd.buffer.len()
                )));
            }
            if off != *data_done {
                // DataPDUInOrder=Yes: data must arrive contiguously.
                return Err(ConnError::Protocol(format!(
                    "Data-In at offset {off}, expected {data_done} (DataPDUInOrder)"
                )));
            }
        }
        Ok(Some((slot, off)))
    }

    /// ERL 1: a Data-In of the task in `slot` came with a data digest
    /// error: it is asked for again with everything after it (Data SNACK,
    /// RunLength 0); what comes after it until then is left out.
    fn data_in_lost(&mut self, d: &DataIn, slot: u16) {
        self.stats.data_in_discarded += 1;
        let Some(Some(Task {
            itt,
            kind:
                TaskKind::Scsi {
                    cmd,
                    next_data_sn,
                    snack,
                    ..
                },
            ..
        })) = self.slots.get_mut(slot as usize)
        else {
            return;
        };
        let ask = snack.is_none_or(|hi| d.data_sn.le(hi));
        *snack = Some(d.data_sn);
        let (lun, itt, beg) = (cmd.lun, *itt, *next_data_sn);
        if ask {
            self.send_snack(SNACK_DATA, lun, itt, beg.0, 0);
        }
    }

    /// A Data-In's `len` bytes are in the command's buffer at `off`:
    /// accounts for them and completes the command if it carries status
    /// (or, at ERL 1, if its status came while this data was missing).
    fn finish_data_in(
        &mut self,
        d: &DataIn,
        slot: u16,
        off: usize,
        len: usize,
    ) -> Result<(), ConnError> {
        let mut held = None;
        if len > 0 {
            if let Some(Some(Task {
                kind:
                    TaskKind::Scsi {
                        cmd,
                        data_done,
                        next_data_sn,
                        snack,
                        held: h,
                        ..
                    },
                ..
            })) = self.slots.get_mut(slot as usize)
            {
                *data_done = off + len;
                *next_data_sn = next_data_sn.next();
                *snack = None;
                if h.as_ref().is_some_and(|s| {
                    *data_done as i64 >= cmd.buffer.len() as i64 - s.residual.max(0)
                }) {
                    held = h.take();
                }
            }
            self.stats.bytes_read += len as u64;
        }
        if d.status_present {
            if !d.final_bit {
                return Err(ConnError::Protocol(
                    "Data-In with status but without the F bit".into(),
                ));
            }
            if self.erl() > 0 {
                // Taken only now that its data is in, so that ExpStatSN
                // does not pass it while a SNACK may still need it.
                self.check_stat_sn(d.stat_sn)?;
            }
            let residual = signed_residual(d.underflow, d.overflow, d.residual);
            return self.complete_scsi(d.itt, 0, d.status, Vec::new(), Some(residual));
        }
        if let Some(s) = held {
            let HeldStatus {
                response,
                status,
                sense,
                residual,
            } = *s;
            return self.complete_scsi(d.itt, response, status, sense, Some(residual));
        }
        Ok(())
    }

    fn on_r2t(
        &mut self,
        itt: u32,
        ttt: u32,
        offset: u32,
        len: u32,
        r2t_sn: Sn,
    ) -> Result<(), ConnError> {
        let max_burst = self.params.max_burst_len;
        let max_r2t = self.params.max_outstanding_r2t;
        let erl = self.erl();
        let Some((slot, task)) = self.task_by_itt(itt) else {
            return Err(self.unknown_task("R2T", itt));
        };
        if task.cmd_sn.is_none() {
            return Err(not_sent_yet("R2T", itt));
        }
        let TaskKind::Scsi {
            cmd,
            r2ts,
            r2ts_seen,
            r2ts_missing,
            r2t_sn_from_target,
            out,
            ..
        } = &mut task.kind
        else {
            return Err(ConnError::Protocol(format!(
                "R2T for non-SCSI task {itt:#x}"
            )));
        };
        if cmd.direction != Direction::Write {
            return Err(ConnError::Protocol(format!(
                "R2T for task {itt:#x}, which writes no data"
            )));
        }
        if *r2t_sn_from_target {
            *r2t_sn_from_target = false;
            *r2ts_seen = r2t_sn.0;
        }
        let mut snack = None;
        if r2t_sn != Sn(*r2ts_seen) {
            let seen = Sn(*r2ts_seen);
            if erl == 0 || (r2t_sn.gt(seen) && r2t_sn.diff(seen) as u32 > max_r2t.max(16)) {
                return Err(ConnError::Protocol(format!(
                    "R2TSN {} out of order (expected {}) for task {itt:#x}",
                    r2t_sn, r2ts_seen
                )));
            }
            if r2t_sn.gt(seen) {
                // ERL 1: the R2Ts before this one were lost; ask for them
                // again and take this one.
                let gap = r2t_sn.diff(seen) as u32;
                r2ts_missing.extend((0..gap).map(|i| seen.plus(i)));
                snack = Some((cmd.lun, seen.0, gap));
            } else if let Some(i) = r2ts_missing.iter().position(|s| *s == r2t_sn) {
                // One that was lost, sent again.
                r2ts_missing.swap_remove(i);
            } else {
                // A copy of one taken already.
                return Ok(());
            }
        }
        if len == 0 || len > max_burst {
            return Err(ConnError::Protocol(format!(
                "R2T asks for {len} bytes; MaxBurstLength is {max_burst}"
            )));
        }
        let end = offset as u64 + len as u64;
        let data_len = out.as_ref().map_or(cmd.buffer.len(), |b| b.len());
        if end > data_len as u64 {
            return Err(ConnError::Protocol(format!(
                "R2T for bytes {offset}..{end}, past the {data_len} bytes of the command"
            )));
        }
        if r2ts.len() as u32 >= max_r2t {
            return Err(ConnError::Protocol(format!(
                "more than MaxOutstandingR2T={max_r2t} R2Ts outstanding"
            )));
        }
        if r2t_sn.ge(Sn(*r2ts_seen)) {
            *r2ts_seen = r2t_sn.0.wrapping_add(1);
        }
        r2ts.push_back((ttt, offset, len));
        self.stats.r2ts += 1;
        self.data_out_ready.push_back(slot);
        if let Some((lun, beg, run)) = snack {
            self.send_snack(SNACK_DATA, lun, itt, beg, run);
        }
        Ok(())
    }

    fn complete_scsi(
        &mut self,
        itt: u32,
        response: u8,
        status: u8,
        sense: Vec<u8>,
        residual: Option<i64>,
    ) -> Result<(), ConnError> {
        // The error (a formatted string) is built only when it is due.
        let Some((slot, task)) = self.task_by_itt(itt) else {
            return Err(self.unknown_task("SCSI status", itt));
        };
        if !matches!(task.kind, TaskKind::Scsi { .. }) {
            return Err(ConnError::Protocol(format!(
                "SCSI status for non-SCSI task {itt:#x}"
            )));
        }
        if task.cmd_sn.is_none() {
            return Err(not_sent_yet("SCSI status", itt));
        }
        if let TaskKind::Scsi {
            snack: Some(_),
            held,
            ..
        } = &mut task.kind
        {
            // ERL 1: a read's status while Data-In asked for again are
            // still to come; it completes the command when they are in.
            *held = Some(Box::new(HeldStatus {
                response,
                status,
                sense,
                residual: residual.unwrap_or(0),
            }));
            return Ok(());
        }
        // What the completion needs is taken from the task where it lies,
        // then the slot is freed: the whole `Task` is not moved out first.
        let TaskKind::Scsi {
            cmd,
            data_done,
            out,
            ..
        } = &mut task.kind
        else {
            return Ok(());
        };
        let data_done = *data_done;
        let out = out.take();
        let mut buffer = std::mem::take(&mut cmd.buffer);
        let (user_tag, command) = (
            cmd.user_tag,
            CommandEcho {
                lun: cmd.lun,
                cdb: cmd.cdb,
                cdb_len: cmd.cdb_len,
                direction: cmd.direction,
            },
        );
        self.release_slot(slot);
        if !self.data_out_ready.is_empty() {
            self.data_out_ready.retain(|&s| s != slot);
        }
        reclaim_buffer(&mut buffer, out, &mut self.stats, &mut self.tx_shells);
        let transferred = if command.direction == Direction::Read {
            data_done
        } else {
            buffer
                .len()
                .saturating_sub(residual.unwrap_or(0).max(0) as usize)
        };
        self.events.push_back(Event::Completed(Completion {
            user_tag,
            response,
            status,
            sense,
            residual: residual.unwrap_or(0),
            transferred,
            command,
            buffer,
        }));
        Ok(())
    }

    /// Sends a SNACK (RFC 7143 §11.16): `kind` 0 asks for the Data-In
    /// with DataSN (or the R2Ts with R2TSN) in `[beg_run, beg_run +
    /// run_length)` of task `itt` again (RunLength 0: all from BegRun on),
    /// 1 the statuses with those StatSNs.
    fn send_snack(&mut self, kind: u8, lun: u64, itt: u32, beg_run: u32, run_length: u32) {
        let hdr = PduHeader::Snack(Snack {
            kind,
            lun,
            itt,
            ttt: RESERVED_TAG,
            exp_stat_sn: self.exp_stat_sn,
            beg_run,
            run_length,
        });
        encode_pdu(&mut self.tx, &hdr, &[], self.digests);
        self.stats.pdus_out += 1;
        self.stats.snacks += 1;
    }

    /// ERL 1: the target has sent every status before `next` (a PDU
    /// carried it as its StatSN): those not received were lost, and a
    /// Status SNACK asks for them (each range once; those received among
    /// them come again and are dropped).
    fn snack_statuses_before(&mut self, next: Sn) {
        if self.erl() == 0 {
            return;
        }
        let from = if self.status_snacked.gt(self.exp_stat_sn) {
            self.status_snacked
        } else {
            self.exp_stat_sn
        };
        if next.gt(from) && next.diff(from) as u32 <= MAX_STATUS_GAP {
            let run = next.diff(from) as u32;
            self.status_snacked = next;
            self.send_snack(SNACK_STATUS, 0, RESERVED_TAG, from.0, run);
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// A SCSI task submitted at `at` is outstanding: see `scsi_floor`.
    fn lower_scsi_floor(&mut self, at: Instant) {
        self.scsi_floor = Some(self.scsi_floor.map_or(at, |f| f.min(at)));
    }

    /// The submit time of the oldest outstanding SCSI task (a scan of every
    /// slot), None if there is none.
    fn oldest_scsi(&self) -> Option<Instant> {
        self.slots
            .iter()
            .flatten()
            .filter(|t| matches!(t.kind, TaskKind::Scsi { .. }))
            .map(|t| t.submitted_at)
            .min()
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) needs to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(iv) = self.timers.nop_interval {
            if self.ping_outstanding {
                consider(self.last_rx + iv + self.timers.nop_timeout);
            } else {
                consider(self.last_rx + iv);
            }
        }
        if let Some(ct) = self.timers.command_timeout {
            if let Some(floor) = self.scsi_floor {
                consider(floor + ct);
            }
        }
        next
    }

    /// Runs timers: pings an idle target, fails the connection on a missing
    /// ping answer or a command past its timeout.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ConnError> {
        if self.failed.is_some() || self.logged_out {
            return Ok(());
        }
        if let Some(iv) = self.timers.nop_interval {
            let silent = now.saturating_duration_since(self.last_rx);
            if self.ping_outstanding && silent >= iv + self.timers.nop_timeout {
                return Err(self.fail(ConnError::PingTimeout(self.timers.nop_timeout)));
            }
            if !self.ping_outstanding && silent >= iv {
                let _ = self.ping(now);
            }
        }
        if let Some(ct) = self.timers.command_timeout {
            let due = |since: Option<Instant>| {
                since.is_some_and(|t| now.saturating_duration_since(t) >= ct)
            };
            if due(self.scsi_floor) {
                // The floor's deadline passed: the exact oldest says whether
                // a command is late, and becomes the floor.
                self.scsi_floor = self.oldest_scsi();
                if due(self.scsi_floor) {
                    return Err(self.fail(ConnError::CommandTimeout(ct)));
                }
            }
        }
        Ok(())
    }

    /// Takes back the unfinished SCSI commands of a failed connection for
    /// TASK REASSIGN (ERL 2): those that were sent come with their tag and
    /// CmdSN ([`Orphan`]); those still waiting for window space never took
    /// a CmdSN and come back as plain commands, to be submitted anew.
    pub fn take_orphans(&mut self) -> (Vec<Orphan>, Vec<Command>) {
        let mut orphans = Vec::new();
        let mut unsent = Vec::new();
        let exp = self.window.exp_cmd_sn().0;
        let mut tasks: Vec<Task> = self.slots.iter_mut().filter_map(Option::take).collect();
        tasks.sort_by_key(|t| t.cmd_sn.map(|s| s.0.wrapping_sub(exp)).unwrap_or(u32::MAX));
        for t in tasks {
            if let TaskKind::Scsi { mut cmd, out, .. } = t.kind {
                // A write sent by reference gets its buffer back first: the
                // connection that takes it over sends from it again.
                reclaim_buffer(&mut cmd.buffer, out, &mut self.stats, &mut self.tx_shells);
                match t.cmd_sn {
                    Some(cmd_sn) => orphans.push(Orphan {
                        itt: t.itt,
                        cmd_sn,
                        cmd,
                    }),
                    None => unsent.push(cmd),
                }
            }
        }
        self.free.clear();
        self.slots.clear();
        self.adopted.clear();
        self.waiting.clear();
        self.data_out_ready.clear();
        (orphans, unsent)
    }

    /// Takes over a task of a failed connection of the same session
    /// (ERL 2): sends TASK REASSIGN (function 8, immediate) naming its
    /// ITT and CmdSN, with ExpDataSN 0 so the target sends all its Data-In
    /// again (and asks for write data by R2T). The task lives here from
    /// now on; [`Event::Reassigned`] tells how the target answered. Call it
    /// after the failed connection was logged out with reason 2 (or
    /// reinstated), RFC 7143 §6.2.2.
    pub fn reassign(&mut self, orphan: Orphan, now: Instant) -> Result<(), Box<NotTaken>> {
        if let Err(error) = self.check_usable() {
            return Err(Box::new(NotTaken { error, orphan }));
        }
        // Its tag is taken first, so that neither new slot gets it.
        self.adopted.push((orphan.itt, u16::MAX));
        let (tmf_slot, slot) = match self.alloc_pair(now) {
            Ok(pair) => pair,
            Err(error) => {
                self.adopted.pop();
                return Err(Box::new(NotTaken { error, orphan }));
            }
        };
        self.adopted.pop();
        let Orphan { itt, cmd_sn, cmd } = orphan;
        let lun = cmd.lun;
        if let Some(Some(t)) = self.slots.get_mut(slot as usize) {
            t.kind = TaskKind::fresh(cmd);
            t.itt = itt;
            t.cmd_sn = Some(cmd_sn);
            if let TaskKind::Scsi {
                r2t_sn_from_target, ..
            } = &mut t.kind
            {
                *r2t_sn_from_target = true;
            }
        }
        self.adopted.push((itt, slot));
        let tmf_itt = match self.slots.get_mut(tmf_slot as usize) {
            Some(Some(t)) => {
                t.kind = TaskKind::Reassign { slot };
                t.itt
            }
            _ => 0,
        };
        let hdr = PduHeader::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function: TMF_TASK_REASSIGN,
            lun,
            itt: tmf_itt,
            referenced_task_tag: itt,
            cmd_sn: self.window.next_cmd_sn(),
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn: cmd_sn,
            exp_data_sn: Sn(0),
        });
        encode_pdu(&mut self.tx, &hdr, &[], self.digests);
        self.stats.pdus_out += 1;
        Ok(())
    }

    /// Sends a failed connection's command again on this one, with its ITT
    /// and CmdSN (ERL 2; a "retry", RFC 7143 §7.2.1): for a command the
    /// target never received (its CmdSN not below the session's ExpCmdSN
    /// once the failed connection is gone), so that the session's CmdSN
    /// order has no hole for the target to wait on (an immediate command,
    /// which holds no place in that order, goes with the next CmdSN and the
    /// I bit). The task lives here from now on, as a fresh command.
    pub fn retry(&mut self, orphan: Orphan, now: Instant) -> Result<(), Box<NotTaken>> {
        if let Err(error) = self.check_usable() {
            return Err(Box::new(NotTaken { error, orphan }));
        }
        self.adopted.push((orphan.itt, u16::MAX));
        let slot = match self.alloc_slot(TaskKind::Tmf { user_tag: 0 }, now) {
            Ok(s) => s,
            Err(error) => {
                self.adopted.pop();
                return Err(Box::new(NotTaken { error, orphan }));
            }
        };
        self.adopted.pop();
        let Orphan { itt, cmd_sn, cmd } = orphan;
        // An immediate command holds no place in the CmdSN order: it goes
        // again with the I bit and the CmdSN of the next non-immediate one,
        // as any immediate PDU does (RFC 7143 §3.2.2.1); its old CmdSN may
        // be behind the session's by now.
        let cmd_sn = if cmd.immediate {
            self.window.next_cmd_sn()
        } else {
            cmd_sn
        };
        if let Some(Some(t)) = self.slots.get_mut(slot as usize) {
            t.kind = TaskKind::fresh(cmd);
            t.itt = itt;
        }
        self.adopted.push((itt, slot));
        self.stats.commands += 1;
        self.send_command(slot, cmd_sn);
        Ok(())
    }

    fn on_reassign_answer(&mut self, slot: u16, response: u8) -> Result<(), ConnError> {
        let user_tag = match self.slots.get(slot as usize) {
            Some(Some(Task {
                kind: TaskKind::Scsi { cmd, .. },
                ..
            })) => cmd.user_tag,
            // Already completed here (status came before the answer).
            _ => {
                if response == 0 {
                    return Ok(());
                }
                return Err(ConnError::Protocol(format!(
                    "TASK REASSIGN refused (response {response}) for a task that has completed"
                )));
            }
        };
        let refused = if response == 0 {
            None
        } else {
            match self.free_slot(slot).map(|t| t.kind) {
                Some(TaskKind::Scsi { cmd, .. }) => Some(Box::new(cmd)),
                _ => None,
            }
        };
        self.events.push_back(Event::Reassigned {
            user_tag,
            response,
            refused,
        });
        Ok(())
    }

    /// Takes back every unfinished SCSI command (after a failure), so it can
    /// be retried on another connection. Writes included: none of them was
    /// acknowledged, so resending is safe.
    pub fn take_outstanding(&mut self) -> Vec<Command> {
        let mut out = Vec::new();
        // Resubmit in CmdSN order to keep ordering as close as possible.
        let mut tasks: Vec<Task> = (0..self.slots.len())
            .filter_map(|i| self.slots[i].take())
            .collect();
        tasks.sort_by_key(|t| {
            t.cmd_sn
                .map(|s| s.0.wrapping_sub(self.window.exp_cmd_sn().0))
                .unwrap_or(u32::MAX)
        });
        // Unsent payload references go first, so the buffers can come back
        // (the send bytes are useless without them).
        if !self.tx_refs.is_empty() {
            self.tx_refs.clear();
            self.tx.clear();
            self.tx_start = 0;
        }
        for t in tasks {
            if let TaskKind::Scsi {
                mut cmd, out: buf, ..
            } = t.kind
            {
                reclaim_buffer(&mut cmd.buffer, buf, &mut self.stats, &mut self.tx_shells);
                out.push(cmd);
            }
        }
        self.free.clear();
        self.slots.clear();
        self.adopted.clear();
        self.waiting.clear();
        self.data_out_ready.clear();
        out
    }

    /// User tags of the SCSI commands sent to the target (they have a
    /// CmdSN) at least `age` before `now` and not answered yet: candidates
    /// for ABORT TASK (`multipath::fence::TaskAborts`).
    pub fn overdue_commands(&self, now: Instant, age: Duration) -> Vec<u64> {
        self.slots
            .iter()
            .flatten()
            .filter_map(|t| match &t.kind {
                TaskKind::Scsi { cmd, .. }
                    if t.cmd_sn.is_some()
                        && now.saturating_duration_since(t.submitted_at) >= age =>
                {
                    Some(cmd.user_tag)
                }
                _ => None,
            })
            .collect()
    }

    /// Takes back the SCSI command `user_tag` without a status, once the
    /// target has confirmed an ABORT TASK for it ("function complete" or
    /// "task does not exist", RFC 7143 §11.6.1): no response or R2T comes
    /// for it any more. None when the connection holds no such command
    /// (it was answered first).
    pub fn take_aborted(&mut self, user_tag: u64) -> Option<Command> {
        let slot = self.slots.iter().position(|t| {
            matches!(t, Some(Task { kind: TaskKind::Scsi { cmd, .. }, .. }) if cmd.user_tag == user_tag)
        })? as u16;
        self.waiting.retain(|s| *s != slot);
        self.data_out_ready.retain(|s| *s != slot);
        // A Data-In segment still being placed for it (it cannot be, the
        // response came after it) lands nowhere: `task_buffer` finds none.
        match self.free_slot(slot)?.kind {
            TaskKind::Scsi { cmd, .. } => Some(cmd),
            _ => None,
        }
    }
}

/// The buffer of the SCSI command in `slot`, if there is one.
fn task_buffer(slots: &mut [Option<Task>], slot: u16) -> Option<&mut Vec<u8>> {
    match slots.get_mut(slot as usize) {
        Some(Some(Task {
            kind: TaskKind::Scsi { cmd, .. },
            ..
        })) => Some(&mut cmd.buffer),
        _ => None,
    }
}

/// A target answered a task still waiting for CmdSN window space: it can
/// only have guessed the tag.
fn not_sent_yet(what: &str, itt: u32) -> ConnError {
    ConnError::Protocol(format!(
        "{what} for task {itt:#x}, which was not sent yet (waiting for CmdSN window space)"
    ))
}

/// Sense bytes from a SCSI Response or Async Message data segment:
/// SenseLength (2 bytes) then the sense data (clipped to what is there).
fn sense_from_segment(payload: &[u8]) -> Vec<u8> {
    if payload.len() < 2 {
        return Vec::new();
    }
    let sl = u16::from_be_bytes([payload[0], payload[1]]) as usize;
    payload.get(2..2 + sl).unwrap_or(&payload[2..]).to_vec()
}

/// Residual count as a signed value: underflow positive, overflow negative.
fn signed_residual(underflow: bool, overflow: bool, residual: u32) -> i64 {
    if underflow {
        residual as i64
    } else if overflow {
        -(residual as i64)
    } else {
        0
    }
}

mod pdu;
#[cfg(test)]
mod tests;
