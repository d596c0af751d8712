//! The target side of one iSCSI connection, sans-IO: the driver reads bytes
//! into [`TargetConn::recv_buffer`], calls [`TargetConn::received`], writes
//! [`TargetConn::output`] and calls [`TargetConn::clear_output`]; timers go
//! through [`TargetConn::poll_timeout`]/[`TargetConn::handle_timeout`].
//! Nothing here reads a clock or a socket.
//!
//! Several connections per session (MC/S): a login with a session's ISID
//! and TSIH adds a connection to it ([`super::session`] holds what they
//! share: the CmdSN window and order, the connections by CID, the tasks of
//! failed ones). A command's R2Ts, Data-In and status go out on the
//! connection it came in on; StatSN counts per connection. Error recovery
//! up to level 2: at ERL 1 the responses of a task are kept until the
//! initiator acknowledges its status, and a SNACK has them sent again; at
//! ERL 2 the tasks of a failed or removed connection wait for a TASK
//! REASSIGN on another one. Malformed PDUs are answered with Reject where
//! the stream can continue, otherwise the connection closes with a reason
//! ([`TargetConn::close_reason`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::iscsi::chap;
pub use crate::iscsi::login::SessionType;
use crate::iscsi::params::{respond, Params};
use crate::wire::iscsi::{
    digest, pad_len, tmf, Bhs, DataIn, DataOut, Digests, IscsiWireError, LoginRequest,
    LoginResponse, LogoutRequest, LogoutResponse, NopIn, NopOut, PduFramer, PduHeader, R2t, Reject,
    ScsiCommand, ScsiResponse, Sn, Snack, Stage, TaskMgmtRequest, TaskMgmtResponse, TextRequest,
    TextResponse, BHS_LEN, RESERVED_TAG,
};
use crate::wire::text::TextPairs;

use super::fault::AsyncEvent;
use super::scsi::{self, status, ParamCommand, Plan, Port, Sense};
use super::session::{closing, Gate, Session};
use super::strict::{self, Rule, Violation};
use super::SharedTarget;
use crate::wire::iscsi::AsyncMessage;

/// Keys negotiated on the leading connection only (RFC 7143 §13, "LO").
const LEADING_ONLY: &[&str] = &[
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "iSCSIProtocolLevel",
    "TaskReporting",
];

/// Reject reason codes (RFC 7143 §11.17.1).
mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const SNACK: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const NOT_SUPPORTED: u8 = 0x05;
    pub const INVALID_FIELD: u8 = 0x09;
}

/// Reads smaller than this leave too little room; the buffer is compacted
/// or grown first.
const MIN_RECV_ROOM: usize = 64 * 1024;
/// Login text larger than this (all continuation PDUs together) is refused.
const MAX_LOGIN_TEXT: usize = 64 * 1024;
/// Write commands waiting for data beyond this close the connection: only a
/// misbehaving initiator gets here (the CmdSN window bounds the others).
const MAX_PENDING_WRITES: usize = 4096;
/// How soon a connection whose next command waits for a lower CmdSN on
/// another connection looks again (the connections of a session run on
/// their own threads, and nothing wakes a blocked socket read).
const WAIT_RETRY: std::time::Duration = std::time::Duration::from_micros(100);
/// How soon a hung connection (fault injection) looks at its faults again.
const HANG_RETRY: std::time::Duration = std::time::Duration::from_millis(5);
/// At ERL 1 and up, tasks whose responses are kept (until the initiator
/// acknowledges their status), and the bytes of their data segments;
/// beyond either the oldest are forgotten.
const MAX_RETAINED: usize = 4096;
const MAX_RETAINED_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    FullFeature,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod negotiated yet.
    NotStarted,
    /// AuthMethod=CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapResponse {
        id: u8,
        /// As long as the chosen algorithm's digest (at least 16 bytes).
        challenge: [u8; 32],
        challenge_len: u8,
        algorithm: chap::ChapAlgorithm,
    },
    Done,
}

#[derive(Debug)]
struct LoginState {
    started: bool,
    names_checked: bool,
    auth: Auth,
    /// Text of Login Requests with the C bit, awaiting the last one.
    partial: Vec<u8>,
    tpgt_sent: bool,
    mrdsl_declared: bool,
}

/// Where the data of a write goes.
#[derive(Debug)]
enum Sink {
    Lun {
        lun: usize,
        offset: u64,
        len: u64,
    },
    Params {
        lun: usize,
        command: ParamCommand,
        buf: Vec<u8>,
    },
    /// The command already failed; its data is drained before the status.
    Discard,
    /// PERSISTENT RESERVE OUT: the parameter list, then [`super::pr`].
    PrOut {
        lun: usize,
        cdb: crate::wire::scsi::pr::PrOutCdb,
        buf: Vec<u8>,
    },
    /// A RESERVATION CONFLICT: its data is drained before the status.
    Conflict,
}

impl Sink {
    /// The LU index the data goes to, if any.
    fn lun(&self) -> Option<usize> {
        match self {
            Sink::Lun { lun, .. } | Sink::Params { lun, .. } | Sink::PrOut { lun, .. } => {
                Some(*lun)
            }
            Sink::Discard | Sink::Conflict => None,
        }
    }
}

/// A command waiting for Data-Out.
#[derive(Debug)]
struct WriteTask {
    itt: u32,
    lun_field: u64,
    sink: Sink,
    /// Bytes the initiator will send (ExpectedDataTransferLength).
    expected: u32,
    /// Bytes the CDB asks for, for the residual.
    transfer: u64,
    received: u32,
    /// The unsolicited burst (immediate data and Data-Out with TTT
    /// 0xffffffff) has ended; R2Ts may go out.
    unsolicited_done: bool,
    next_r2t_offset: u32,
    outstanding_r2t: u32,
    r2t_sn: Sn,
    /// TTT of the Data-Out sequence in progress (0xffffffff: unsolicited).
    sequence_ttt: Option<u32>,
    next_data_sn: Sn,
    error: Option<Sense>,
    /// Strict mode: unsolicited bytes so far (immediate + Data-Out
    /// without R2T), and the R2Ts not yet answered in full (TTT, offset,
    /// length).
    unsolicited: u32,
    r2ts: Vec<(u32, u32, u32)>,
    /// The LU's PREEMPT AND ABORT count when the task started.
    pr_seen: u64,
    /// The LU's reset generation when the task started: a LOGICAL UNIT
    /// RESET (or target reset) through any session since aborts it.
    reset_seen: u64,
}

/// The PDUs sent for one task, kept at ERL 1 and up until the initiator
/// acknowledges its status (ExpStatSN past it), for SNACK and TASK
/// REASSIGN.
#[derive(Debug)]
struct Retained {
    itt: u32,
    /// Data-In, R2T and SCSI Response headers with their data segments.
    pdus: Vec<(PduHeader, Vec<u8>)>,
    /// The StatSN of its status, once sent.
    status_sn: Option<Sn>,
}

/// A task of a connection that failed or was removed for recovery,
/// waiting in its session for a TASK REASSIGN (ERL 2).
#[derive(Debug)]
pub(crate) struct Orphan {
    itt: u32,
    /// Still waiting for data.
    write: Option<WriteTask>,
    /// What was sent for it (a completed task's Data-In and status).
    sent: Option<Retained>,
}

impl Orphan {
    pub(crate) fn itt(&self) -> u32 {
        self.itt
    }
}

/// Text Request/Response exchange spanning several PDUs.
#[derive(Debug, Default)]
struct TextExchange {
    ttt: u32,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    sent: usize,
}

#[derive(Debug, Clone, Copy)]
struct Residual {
    overflow: bool,
    underflow: bool,
    count: u32,
}

fn residual(transfer: u64, expected: u32) -> Residual {
    let expected = u64::from(expected);
    Residual {
        overflow: transfer > expected,
        underflow: transfer < expected,
        count: transfer.abs_diff(expected).min(u64::from(u32::MAX)) as u32,
    }
}

enum DataSource {
    Lun { lun: usize, offset: u64 },
    Scratch,
}

/// One target-side connection.
#[derive(Debug)]
pub struct TargetConn {
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    core: Core,
}

#[derive(Debug)]
struct Core {
    shared: SharedTarget,
    portal: usize,
    local_addr: Option<SocketAddr>,
    out: Vec<u8>,
    phase: Phase,
    close_reason: Option<String>,
    login: LoginState,
    session_type: SessionType,
    initiator_name: String,
    isid: [u8; 6],
    tsih: u16,
    cid: u16,
    /// Negotiated values. Field names follow the initiator's view in
    /// `Params`; here `max_xmit_data_segment_len` is the initiator's
    /// MaxRecvDataSegmentLength, which bounds what we send.
    params: Params,
    digests: Digests,
    framer: PduFramer,
    stat_sn: Sn,
    exp_cmd_sn: Sn,
    max_cmd_sn: Sn,
    tasks: Vec<WriteTask>,
    next_ttt: u32,
    scratch: Vec<u8>,
    text: TextExchange,
    /// Per LUN index: a UNIT ATTENTION still to be reported.
    unit_attention: Vec<Option<Sense>>,
    /// Per LUN index: the reset generation this session has been told about.
    seen_resets: Vec<u64>,
    /// Per LUN index: the ALUA generation this session has been told about.
    seen_alua: Vec<u64>,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
    /// Set once a newer login of the same I_T nexus reinstated (ended)
    /// this session: nothing more is executed.
    ended: Option<Arc<AtomicBool>>,
    /// Strict mode on ([`strict`]).
    strict: bool,
    /// Strict mode: the highest ExpStatSN the initiator sent.
    exp_stat_sn_seen: Sn,
    /// Async messages up to this generation are not for this connection.
    async_seen: u64,
    /// After an AsyncEvent 1: the initiator must have logged out by then.
    logout_due: Option<Instant>,
    /// After an AsyncEvent 4: what to declare as our
    /// MaxRecvDataSegmentLength in the Text negotiation (None inside: keep).
    renegotiate: Option<Option<u32>>,
    /// After a renegotiation: the StatSN of the Text Response that declared
    /// the new MaxRecvDataSegmentLength, the new value and the old one.
    /// PDUs whose ExpStatSN is past that StatSN obey the new value.
    mrdsl_change: Option<(Sn, u32, u32)>,
    /// This session's I_T nexus, for persistent reservations (normal
    /// sessions in full feature phase).
    nexus: Option<super::pr::ItNexus>,
    /// ABORT TASKs answered "function complete" for commands not received
    /// yet (ITT, CmdSN): such a command is dropped when it arrives.
    aborted_early: Vec<(u32, Sn)>,
    /// What the connections of this session share (normal sessions; a
    /// connection joining a session has it from its first login PDU).
    session: Option<Arc<Session>>,
    /// This connection's flag in the session ([`closing`]); set once it is
    /// in the session.
    closing: Option<Arc<AtomicU8>>,
    /// This connection logs in to an existing session (TSIH given).
    joining: bool,
    /// The PDU being handled waits for its CmdSN turn (it goes to
    /// `waiting`).
    blocked: bool,
    /// PDUs waiting for their CmdSN turn, as received (whole PDUs), in
    /// order: commands whose lower CmdSNs come on other connections, and
    /// the Data-Out of those commands. Immediate PDUs, and Data-Out for
    /// tasks that run, pass them.
    waiting: Vec<Vec<u8>>,
    /// The ITTs of the commands in `waiting`.
    waiting_itts: Vec<u32>,
    /// The last time the connection was driven.
    last_step: Instant,
    /// Handed its tasks over to the session (or dropped them).
    released: bool,
    /// Tasks are kept for TASK REASSIGN when this connection ends.
    recover_tasks: bool,
    /// ERL 1 and up: the responses of tasks not yet acknowledged.
    retained: Vec<Retained>,
    /// The data bytes in `retained`.
    retained_bytes: usize,
}

impl TargetConn {
    /// A new connection on portal index `portal` of `shared`.
    pub fn new(shared: SharedTarget, portal: usize, now: Instant) -> TargetConn {
        let ours = shared.config.limits.max_recv_data_segment_len;
        let strict = shared.config.strict;
        let params = Params {
            max_recv_data_segment_len: ours,
            ..Params::default()
        };
        TargetConn {
            rx: vec![0u8; 2 * MIN_RECV_ROOM],
            rx_start: 0,
            rx_end: 0,
            core: Core {
                shared,
                portal,
                local_addr: None,
                out: Vec::with_capacity(64 * 1024),
                phase: Phase::Login,
                close_reason: None,
                login: LoginState {
                    started: false,
                    names_checked: false,
                    auth: Auth::NotStarted,
                    partial: Vec::new(),
                    tpgt_sent: false,
                    mrdsl_declared: false,
                },
                session_type: SessionType::Normal,
                initiator_name: String::new(),
                isid: [0; 6],
                tsih: 0,
                cid: 0,
                params,
                digests: Digests::default(),
                framer: PduFramer {
                    digests: Digests::default(),
                    max_data_segment_len: ours.max(8192),
                },
                stat_sn: Sn(0),
                exp_cmd_sn: Sn(0),
                max_cmd_sn: Sn(0),
                tasks: Vec::with_capacity(64),
                next_ttt: 1,
                scratch: Vec::with_capacity(4096),
                text: TextExchange::default(),
                unit_attention: Vec::new(),
                seen_resets: Vec::new(),
                seen_alua: Vec::new(),
                last_rx: now,
                ping: None,
                ended: None,
                strict,
                exp_stat_sn_seen: Sn(0),
                async_seen: 0,
                logout_due: None,
                renegotiate: None,
                mrdsl_change: None,
                nexus: None,
                aborted_early: Vec::new(),
                session: None,
                closing: None,
                joining: false,
                blocked: false,
                waiting: Vec::new(),
                waiting_itts: Vec::new(),
                last_step: now,
                released: false,
                recover_tasks: false,
                retained: Vec::new(),
                retained_bytes: 0,
            },
        }
    }

    /// The address the initiator connected to; used for SendTargets when a
    /// portal listens on an unspecified address.
    pub fn set_local_addr(&mut self, addr: SocketAddr) {
        self.core.local_addr = Some(addr);
    }

    /// Free space to read into; pass the count read to [`received`](Self::received).
    pub fn recv_buffer(&mut self) -> &mut [u8] {
        if self.rx.len() - self.rx_end < MIN_RECV_ROOM {
            if self.rx_start > 0 {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            // A PDU may need the whole negotiated segment plus headers.
            let need = self.rx_end + MIN_RECV_ROOM;
            if self.rx.len() < need {
                self.rx.resize(need.next_power_of_two(), 0);
            }
        }
        &mut self.rx[self.rx_end..]
    }

    /// `n` bytes were read into [`recv_buffer`](Self::recv_buffer).
    pub fn received(&mut self, n: usize, now: Instant) {
        self.rx_end = (self.rx_end + n).min(self.rx.len());
        self.core.last_rx = now;
        self.process(now);
    }

    /// Convenience for tests and simple drivers: copies `bytes` in.
    pub fn receive(&mut self, mut bytes: &[u8], now: Instant) {
        while !bytes.is_empty() && !self.is_closed() {
            let room = self.recv_buffer();
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.received(n, now);
        }
    }

    /// Bytes to send to the initiator.
    pub fn output(&self) -> &[u8] {
        &self.core.out
    }

    /// Call after [`output`](Self::output) was written; keeps the capacity.
    pub fn clear_output(&mut self) {
        self.core.out.clear();
    }

    /// True once the connection should be closed (after writing the output).
    pub fn is_closed(&self) -> bool {
        self.core.phase == Phase::Closed
    }

    pub fn close_reason(&self) -> Option<&str> {
        self.core.close_reason.as_deref()
    }

    pub fn is_full_feature(&self) -> bool {
        self.core.phase == Phase::FullFeature
    }

    pub fn session_type(&self) -> SessionType {
        self.core.session_type
    }

    pub fn tsih(&self) -> u16 {
        self.core.tsih
    }

    /// The connection ID the initiator gave this connection.
    pub fn cid(&self) -> u16 {
        self.core.cid
    }

    /// How many connections this connection's session has (0 before the
    /// full feature phase or for discovery).
    pub fn session_connections(&self) -> usize {
        match (&self.core.session, &self.core.closing) {
            (Some(s), Some(_)) => s.conn_count(),
            _ => 0,
        }
    }

    /// The tasks of failed connections of this session waiting for a
    /// TASK REASSIGN.
    pub fn orphaned_tasks(&self) -> usize {
        self.core.session.as_ref().map_or(0, |s| s.orphan_count())
    }

    /// True while the next PDU waits for a lower CmdSN that another
    /// connection of the session carries.
    pub fn is_waiting_for_cmd_sn(&self) -> bool {
        !self.core.waiting.is_empty()
    }

    pub fn initiator_name(&self) -> &str {
        &self.core.initiator_name
    }

    /// The negotiated parameters (initiator's view of the names; see [`Params`]).
    pub fn params(&self) -> &Params {
        &self.core.params
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.core.phase != Phase::FullFeature {
            return None;
        }
        if !self.core.waiting.is_empty() {
            return Some(self.core.last_step + WAIT_RETRY);
        }
        if self.core.closing.is_some() && self.core.shared.faults.cid_state(self.core.cid).hang {
            return Some(self.core.last_step + HANG_RETRY);
        }
        let ping = self
            .core
            .shared
            .config
            .nop_in_interval
            .map(|interval| match self.core.ping {
                Some((_, sent)) => sent + interval,
                None => self.core.last_rx + interval,
            });
        match (ping, self.core.logout_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs timers: sends a NOP-In ping on an idle connection, or closes
    /// one whose ping went unanswered for a whole interval.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_reinstated() {
            self.core
                .close("session reinstated by a newer login with the same ISID");
            return;
        }
        self.core.last_step = now;
        if self.core.check_closing() {
            return;
        }
        if self.core.hung() {
            return;
        }
        if self.rx_start < self.rx_end || !self.core.waiting.is_empty() {
            // PDUs waiting for their CmdSN turn, or bytes left unread while
            // the connection was hung.
            self.process(now);
            if self.is_closed() {
                return;
            }
        }
        self.core.poll_async(now);
        if self.core.logout_overdue(now) {
            return;
        }
        if self.core.phase != Phase::FullFeature {
            return;
        }
        let Some(interval) = self.core.shared.config.nop_in_interval else {
            return;
        };
        let deadline = match self.core.ping {
            Some((_, sent)) => sent + interval,
            None => self.core.last_rx + interval,
        };
        if now < deadline {
            return;
        }
        let c = &mut self.core;
        if c.ping.is_some() {
            c.close("the initiator did not answer our NOP-In ping");
            return;
        }
        let ttt = c.alloc_ttt();
        let (exp, max) = c.window();
        let h = PduHeader::NopIn(NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt,
            stat_sn: c.stat_sn,
            exp_cmd_sn: exp,
            max_cmd_sn: max,
        });
        c.emit(&h, &[]);
        c.ping = Some((ttt, now));
    }

    /// True once a newer login of the same initiator port (ISID) on the
    /// same portal group ended this session (reinstatement).
    pub fn is_reinstated(&self) -> bool {
        self.core
            .ended
            .as_ref()
            .is_some_and(|e| e.load(Ordering::Acquire))
    }

    fn process(&mut self, now: Instant) {
        if self.is_reinstated() {
            // Whatever was still buffered belongs to a session that no
            // longer exists: it must not run (it could be a stale write).
            self.core
                .close("session reinstated by a newer login with the same ISID");
            self.rx_start = 0;
            self.rx_end = 0;
            return;
        }
        self.core.last_step = now;
        if self.core.check_closing() {
            self.rx_start = 0;
            self.rx_end = 0;
            return;
        }
        if self.core.hung() {
            return;
        }
        while self.core.phase != Phase::Closed && self.rx_start < self.rx_end {
            let avail = &self.rx[self.rx_start..self.rx_end];
            match self.core.framer.frame(avail) {
                Ok(None) => break,
                Ok(Some(f)) => {
                    self.core
                        .take_pdu(&f.header, &avail[..f.total_len], f.data.clone(), now);
                    self.rx_start += f.total_len;
                }
                Err(e) => {
                    let Some(skip) = self.core.framing_error(avail, e) else {
                        break;
                    };
                    self.rx_start += skip;
                }
            }
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        self.core.retry_waiting(now);
        self.core.poll_async(now);
        self.core.logout_overdue(now);
    }
}

impl Drop for TargetConn {
    fn drop(&mut self) {
        self.core.release();
    }
}

/// Appends one PDU whose data segment (`len` bytes) is written in place by
/// `fill`, so LUN data goes straight into the send buffer.
fn push_pdu_with(
    out: &mut Vec<u8>,
    header: &PduHeader,
    len: usize,
    digests: Digests,
    fill: impl FnOnce(&mut [u8]),
) {
    let start = out.len();
    out.extend_from_slice(&header.emit(0, len as u32));
    if digests.header {
        let d = digest(&out[start..]);
        out.extend_from_slice(&d.to_le_bytes());
    }
    if len > 0 {
        let data_start = out.len();
        out.resize(data_start + len + pad_len(len), 0);
        fill(&mut out[data_start..data_start + len]);
        if digests.data {
            let d = digest(&out[data_start..]);
            out.extend_from_slice(&d.to_le_bytes());
        }
    }
}

/// Puts `data`, which belongs at byte `at` of the command's buffer, where
/// the command wants it.
fn store(shared: &super::TargetShared, sink: &mut Sink, at: u32, data: &[u8]) {
    match sink {
        Sink::Lun { lun, offset, len } => {
            let at = u64::from(at);
            if at < *len {
                let n = (data.len() as u64).min(*len - at) as usize;
                shared.luns[*lun].write(*offset + at, &data[..n]);
            }
        }
        Sink::Params { buf, .. } | Sink::PrOut { buf, .. } => {
            let at = at as usize;
            if at < buf.len() {
                let n = data.len().min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&data[..n]);
            }
        }
        Sink::Discard | Sink::Conflict => {}
    }
}

/// The ITT of a PDU that can wait for its CmdSN turn.
fn itt_of(h: &PduHeader) -> Option<u32> {
    Some(match h {
        PduHeader::ScsiCommand(c) => c.itt,
        PduHeader::NopOut(n) => n.itt,
        PduHeader::TextRequest(t) => t.itt,
        PduHeader::TaskMgmtRequest(t) => t.itt,
        PduHeader::LogoutRequest(l) => l.itt,
        _ => return None,
    })
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "Yes"
    } else {
        "No"
    }
}

impl Core {
    fn close(&mut self, reason: impl Into<String>) {
        if self.phase != Phase::Closed {
            let reason = reason.into();
            log::debug!("iSCSI target connection closing: {reason}");
            self.close_reason = Some(reason);
            self.phase = Phase::Closed;
        }
    }

    fn send_tmf_response(&mut self, itt: u32, response: u8) {
        let (exp, max) = self.window();
        let h = PduHeader::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
        });
        self.emit(&h, &[]);
    }

    fn emit(&mut self, h: &PduHeader, data: &[u8]) {
        crate::wire::iscsi::encode_pdu(&mut self.out, h, data, self.digests);
    }

    fn next_stat_sn(&mut self) -> Sn {
        let s = self.stat_sn;
        self.stat_sn = s.next();
        s
    }

    fn alloc_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = match t.wrapping_add(1) {
            RESERVED_TAG => 1,
            n => n,
        };
        t
    }

    /// ExpCmdSN and MaxCmdSN to advertise. The window is the queue depth
    /// minus the commands still waiting for data; MaxCmdSN never moves
    /// back, because initiators ignore a smaller value anyway.
    fn window(&mut self) -> (Sn, Sn) {
        let depth = self.shared.config.queue_depth.max(1);
        let busy = self.tasks.len() as u32;
        if let Some(s) = &self.session {
            // Session-wide: one window over all of its connections.
            let (exp, max) = s.window(self.cid, busy, depth);
            self.exp_cmd_sn = exp;
            self.max_cmd_sn = max;
            return (exp, max);
        }
        let candidate = Sn(self
            .exp_cmd_sn
            .0
            .wrapping_add(depth.saturating_sub(busy).max(1))
            .wrapping_sub(1));
        if candidate.gt(self.max_cmd_sn) {
            self.max_cmd_sn = candidate;
        }
        (self.exp_cmd_sn, self.max_cmd_sn)
    }

    /// CmdSN rules (RFC 7143 §4.2.2.1): immediate PDUs pass; others must lie
    /// in [ExpCmdSN, MaxCmdSN] and advance ExpCmdSN; duplicates and
    /// out-of-window ones are dropped.
    fn accept_cmd_sn(&mut self, immediate: bool, cmd_sn: Sn) -> bool {
        if let Some(s) = &self.session {
            let gate = s.gate(self.cid, immediate, cmd_sn);
            let (exp, max) = s.cmd_window();
            self.exp_cmd_sn = exp;
            self.max_cmd_sn = max;
            return match gate {
                Gate::Go => true,
                Gate::Drop => false,
                Gate::Wait => {
                    self.blocked = true;
                    false
                }
            };
        }
        if immediate {
            return true;
        }
        if cmd_sn.lt(self.exp_cmd_sn) || cmd_sn.gt(self.max_cmd_sn) {
            log::warn!(
                "dropping command with CmdSN {cmd_sn} outside the window [{}, {}]",
                self.exp_cmd_sn,
                self.max_cmd_sn
            );
            return false;
        }
        if cmd_sn != self.exp_cmd_sn {
            // One TCP connection cannot lose a command; a gap is an
            // initiator bug. Go on rather than wait forever.
            log::warn!("CmdSN gap: expected {}, got {cmd_sn}", self.exp_cmd_sn);
        }
        self.exp_cmd_sn = cmd_sn.next();
        true
    }

    // ------------------------------------------------------------ MC/S

    /// One framed PDU (`raw`, its data segment at `data`): handled now, or
    /// kept in `waiting` for its CmdSN turn.
    fn take_pdu(&mut self, h: &PduHeader, raw: &[u8], data: std::ops::Range<usize>, now: Instant) {
        if let PduHeader::DataOut(d) = h {
            if self.waiting_itts.contains(&d.itt) {
                // Data of a command that has not run yet.
                return self.waiting.push(raw.to_vec());
            }
        }
        self.handle(h, &raw[..BHS_LEN], &raw[data], now);
        if let Some(s) = &self.session {
            s.end_turn(self.cid);
        }
        if std::mem::take(&mut self.blocked) {
            if let Some(itt) = itt_of(h) {
                self.waiting_itts.push(itt);
            }
            self.waiting.push(raw.to_vec());
        }
    }

    /// Runs the waiting PDUs whose turn has come, in order.
    fn retry_waiting(&mut self, now: Instant) {
        while !self.waiting.is_empty() && self.phase != Phase::Closed {
            let mut progress = false;
            let queue = std::mem::take(&mut self.waiting);
            let mut keep = Vec::with_capacity(queue.len());
            for raw in queue {
                if self.phase == Phase::Closed {
                    break;
                }
                let Ok(Some(f)) = self.framer.frame(&raw) else {
                    continue;
                };
                if let PduHeader::DataOut(d) = &f.header {
                    if self.waiting_itts.contains(&d.itt) {
                        keep.push(raw);
                        continue;
                    }
                }
                self.handle(&f.header, &raw[..BHS_LEN], &raw[f.data.clone()], now);
                if let Some(s) = &self.session {
                    s.end_turn(self.cid);
                }
                if std::mem::take(&mut self.blocked) {
                    keep.push(raw);
                } else {
                    progress = true;
                    if let Some(itt) = itt_of(&f.header) {
                        if let Some(i) = self.waiting_itts.iter().position(|&x| x == itt) {
                            self.waiting_itts.remove(i);
                        }
                    }
                }
            }
            self.waiting = keep;
            if !progress {
                break;
            }
        }
        if self.waiting.is_empty() {
            self.waiting_itts.clear();
        }
    }

    /// Fault injection: this connection is hung (reads and answers nothing).
    fn hung(&self) -> bool {
        self.closing.is_some() && self.shared.faults.cid_state(self.cid).hang
    }

    /// Closes the connection if the session told it to (a Logout of it on
    /// another connection, a login that reinstated its CID) or a fault
    /// kills it. True when it is closed.
    fn check_closing(&mut self) -> bool {
        if self.phase == Phase::Closed {
            return true;
        }
        let Some(flag) = &self.closing else {
            return false;
        };
        let how = flag.load(Ordering::Acquire);
        if how != closing::OPEN {
            self.recover_tasks = how == closing::RECOVER;
            self.close(if self.recover_tasks {
                "connection removed for recovery (logout reason 2 or reinstatement)"
            } else {
                "connection closed by a logout on another connection or its reinstatement"
            });
        } else if self.shared.faults.cid_state(self.cid).kill {
            self.recover_tasks = self.erl() >= 2;
            self.close(format!(
                "fault injection: connection CID {} killed",
                self.cid
            ));
        } else {
            return false;
        }
        self.release();
        true
    }

    /// The negotiated ErrorRecoveryLevel.
    fn erl(&self) -> u32 {
        self.params.error_recovery_level
    }

    /// The connection leaves its session: its tasks go to the session for
    /// TASK REASSIGN (ERL 2, unless it logged out cleanly) or are dropped;
    /// the last connection out ends the session. Runs once.
    fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        // Not in a session (discovery, a login that did not finish).
        let (Some(session), Some(flag)) = (self.session.clone(), self.closing.clone()) else {
            return;
        };
        let recover = self.erl() >= 2 && (self.recover_tasks || self.close_unclean());
        let mut orphans = Vec::new();
        if recover {
            let mut sent: Vec<Retained> = std::mem::take(&mut self.retained);
            self.retained_bytes = 0;
            for w in std::mem::take(&mut self.tasks) {
                let i = sent.iter().position(|r| r.itt == w.itt);
                orphans.push(Orphan {
                    itt: w.itt,
                    sent: i.map(|i| sent.swap_remove(i)),
                    write: Some(w),
                });
            }
            for r in sent {
                orphans.push(Orphan {
                    itt: r.itt,
                    write: None,
                    sent: Some(r),
                });
            }
            if !orphans.is_empty() {
                log::info!(
                    "connection CID {} of TSIH {} gone: {} task(s) wait for TASK REASSIGN",
                    self.cid,
                    self.tsih,
                    orphans.len()
                );
            }
        }
        let left = session.release_conn(self.cid, &flag, orphans);
        if left == 0 {
            if let Some(ended) = &self.ended {
                self.shared.leave_session(ended);
            }
        }
    }

    /// Whether the connection ended without a logout (a broken TCP
    /// connection, a protocol error): at ERL 2 its tasks are kept.
    fn close_unclean(&self) -> bool {
        self.phase != Phase::Closed || self.close_reason.as_deref() != Some("logout")
    }

    /// ERL 1 and up: keeps a copy of a PDU sent for task `itt`.
    fn retain(&mut self, itt: u32, h: &PduHeader, data: &[u8]) {
        if self.erl() == 0 || self.session.is_none() {
            return;
        }
        let status = match h {
            PduHeader::ScsiResponse(r) => Some(r.stat_sn),
            PduHeader::DataIn(d) if d.status_present => Some(d.stat_sn),
            _ => None,
        };
        let i = match self.retained.iter().rposition(|r| r.itt == itt) {
            Some(i) if self.retained[i].status_sn.is_none() => i,
            _ => {
                if self.retained.len() >= MAX_RETAINED {
                    self.forget_oldest();
                }
                self.retained.push(Retained {
                    itt,
                    pdus: Vec::new(),
                    status_sn: None,
                });
                self.retained.len() - 1
            }
        };
        let r = &mut self.retained[i];
        r.pdus.push((h.clone(), data.to_vec()));
        if status.is_some() {
            r.status_sn = status;
        }
        self.retained_bytes += data.len();
        while self.retained_bytes > MAX_RETAINED_BYTES && self.retained.len() > 1 {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if self.retained.is_empty() {
            return;
        }
        let r = self.retained.remove(0);
        log::debug!(
            "ERL 1: responses of task {:#x} forgotten (too many kept)",
            r.itt
        );
        self.retained_bytes -= r.pdus.iter().map(|(_, d)| d.len()).sum::<usize>();
    }

    fn recount_retained(&mut self) {
        self.retained_bytes = self
            .retained
            .iter()
            .flat_map(|r| r.pdus.iter())
            .map(|(_, d)| d.len())
            .sum();
    }

    /// The initiator has seen every status before `exp_stat_sn`: those
    /// tasks' responses need not be kept.
    fn acknowledge(&mut self, exp_stat_sn: Sn) {
        if !self.retained.is_empty() {
            let before = self.retained.len();
            self.retained
                .retain(|r| r.status_sn.is_none_or(|s| s.ge(exp_stat_sn)));
            if self.retained.len() != before {
                self.recount_retained();
            }
        }
    }

    /// Sends a kept PDU again with the current window; `stat_sn` replaces
    /// its StatSN when given (the status of a reassigned task).
    fn resend(&mut self, h: &PduHeader, data: &[u8], stat_sn: Option<Sn>) -> PduHeader {
        let (exp, max) = self.window();
        let mut h = h.clone();
        match &mut h {
            PduHeader::DataIn(d) => {
                d.exp_cmd_sn = exp;
                d.max_cmd_sn = max;
                if let (Some(sn), true) = (stat_sn, d.status_present) {
                    d.stat_sn = sn;
                }
            }
            PduHeader::ScsiResponse(r) => {
                r.exp_cmd_sn = exp;
                r.max_cmd_sn = max;
                if let Some(sn) = stat_sn {
                    r.stat_sn = sn;
                }
            }
            PduHeader::R2t(r) => {
                r.exp_cmd_sn = exp;
                r.max_cmd_sn = max;
                r.stat_sn = self.stat_sn;
            }
            _ => {}
        }
        self.emit(&h, data);
        h
    }

    /// SNACK (ERL 1): sends again the Data-In or R2Ts of a task (Data/R2T),
    /// the statuses in a StatSN range (Status), or takes a DataACK.
    fn on_snack(&mut self, k: &Snack, bhs: &[u8]) {
        if self.erl() == 0 {
            return self.reject(reject::SNACK, bhs);
        }
        let in_run = |sn: Sn| {
            sn.ge(Sn(k.beg_run))
                && (k.run_length == 0 || sn.lt(Sn(k.beg_run.wrapping_add(k.run_length))))
        };
        let mut again: Vec<(PduHeader, Vec<u8>)> = Vec::new();
        match k.kind {
            // Data/R2T: by DataSN or R2TSN within the task.
            0 => {
                if let Some(r) = self.retained.iter().rev().find(|r| r.itt == k.itt) {
                    for (h, d) in &r.pdus {
                        let hit = match h {
                            PduHeader::DataIn(x) => in_run(x.data_sn),
                            PduHeader::R2t(x) => in_run(x.r2t_sn),
                            _ => false,
                        };
                        if hit {
                            again.push((h.clone(), d.clone()));
                        }
                    }
                }
            }
            // Status: by StatSN.
            1 => {
                for r in &self.retained {
                    for (h, d) in &r.pdus {
                        let sn = match h {
                            PduHeader::ScsiResponse(x) => Some(x.stat_sn),
                            PduHeader::DataIn(x) if x.status_present => Some(x.stat_sn),
                            _ => None,
                        };
                        if sn.is_some_and(in_run) {
                            again.push((h.clone(), d.clone()));
                        }
                    }
                }
            }
            // DataACK: the Data-In before BegRun arrived; nothing to send.
            2 => {
                if let Some(r) = self.retained.iter_mut().find(|r| r.itt == k.itt) {
                    r.pdus.retain(|(h, _)| match h {
                        PduHeader::DataIn(x) => x.status_present || x.data_sn.ge(Sn(k.beg_run)),
                        _ => true,
                    });
                }
                self.recount_retained();
                return;
            }
            _ => return self.reject(reject::SNACK, bhs),
        }
        if again.is_empty() {
            log::debug!(
                "SNACK type {} for ITT {:#x} BegRun {} RunLength {}: nothing kept to send",
                k.kind,
                k.itt,
                k.beg_run,
                k.run_length
            );
            return self.reject(reject::SNACK, bhs);
        }
        for (h, d) in again {
            self.resend(&h, &d, None);
        }
    }

    /// TASK REASSIGN (ERL 2): takes over a task of a failed or removed
    /// connection of this session; what is left of it (R2Ts for the data
    /// not yet received, Data-In from ExpDataSN, status) goes out here.
    fn on_task_reassign(&mut self, t: &TaskMgmtRequest) {
        let session = self.session.clone();
        if session.as_ref().is_some_and(|s| s.release_pending()) {
            // The connection it belonged to has been told to go but has not
            // handed its tasks over yet.
            self.blocked = true;
            return;
        }
        if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
            return;
        }
        let mut orphan = None;
        let response = if self.shared.faults.take_reassign_refusal() {
            255
        } else if self.erl() < 2 {
            // Task allegiance reassignment not supported.
            4
        } else if self.tasks.iter().any(|w| w.itt == t.referenced_task_tag) {
            // Task still allegiant (to this very connection).
            3
        } else {
            orphan = session.and_then(|s| s.take_orphan(t.referenced_task_tag));
            if orphan.is_some() {
                0
            } else {
                1
            }
        };
        self.send_tmf_response(t.itt, response);
        if let Some(o) = orphan {
            log::info!(
                "task {:#x} reassigned to connection CID {}",
                o.itt,
                self.cid
            );
            self.adopt(o, t.exp_data_sn);
        }
    }

    fn adopt(&mut self, o: Orphan, exp_data_sn: Sn) {
        if let Some(sent) = o.sent {
            let stat_sn = sent.status_sn.map(|_| self.next_stat_sn());
            for (h, d) in &sent.pdus {
                let again = match h {
                    PduHeader::DataIn(x) => x.data_sn.ge(exp_data_sn) || x.status_present,
                    PduHeader::ScsiResponse(_) => true,
                    // A write that is still running gets new R2Ts below.
                    _ => false,
                };
                if again {
                    let h = self.resend(h, d, stat_sn);
                    self.retain(o.itt, &h, d);
                }
            }
        }
        if let Some(mut w) = o.write {
            // Unsolicited data that had not arrived is now asked for by
            // R2T; what arrived stays, so no byte is written twice.
            w.unsolicited_done = true;
            w.outstanding_r2t = 0;
            w.sequence_ttt = None;
            w.next_data_sn = Sn(0);
            w.next_r2t_offset = w.received;
            w.r2ts.clear();
            self.tasks.push(w);
            let i = self.tasks.len() - 1;
            self.advance_write(i);
        }
    }

    // ------------------------------------------------------------ async

    /// Sends an async message the fault injector has for this connection.
    fn poll_async(&mut self, now: Instant) {
        if self.phase != Phase::FullFeature || self.session_type != SessionType::Normal {
            return;
        }
        let faults = self.shared.faults.clone();
        let Some(event) = faults.take_async_event(self.portal, &mut self.async_seen) else {
            return;
        };
        faults.count_async_sent();
        let (mut lun, mut params, mut data) = (0u64, (0u16, 0u16, 0u16), Vec::new());
        match event {
            AsyncEvent::Scsi { lun: n, sense } => {
                lun = scsi::encode_lun(n);
                let s = Sense {
                    key: sense.key,
                    asc: sense.asc,
                    ascq: sense.ascq,
                    information: None,
                    sense_key_specific: None,
                };
                data = vec![0u8; 2 + Sense::FIXED_LEN];
                data[1] = Sense::FIXED_LEN as u8;
                data[2..].copy_from_slice(&s.emit_fixed());
            }
            AsyncEvent::RequestLogout { within } => {
                params.2 = within;
                self.logout_due = Some(now + std::time::Duration::from_secs(u64::from(within)));
            }
            AsyncEvent::DropConnection {
                time2wait,
                time2retain,
            }
            | AsyncEvent::DropSession {
                time2wait,
                time2retain,
            } => {
                params = (self.cid, time2wait, time2retain);
                if matches!(event, AsyncEvent::DropSession { .. }) {
                    params.0 = 0;
                }
            }
            AsyncEvent::Renegotiate {
                max_recv_data_segment_len,
            } => self.renegotiate = Some(max_recv_data_segment_len),
        }
        let (exp, max) = self.window();
        let h = PduHeader::AsyncMessage(AsyncMessage {
            lun,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            event: event.code(),
            vcode: 0,
            param1: params.0,
            param2: params.1,
            param3: params.2,
        });
        self.emit(&h, &data);
        log::info!(
            "sent AsyncEvent {} to {} ({event:?})",
            event.code(),
            self.initiator_name
        );
        if event.code() == 2 || event.code() == 3 {
            self.close(format!(
                "dropped after announcing it (AsyncEvent {})",
                event.code()
            ));
        }
    }

    /// After an AsyncEvent 1: closes the connection once Parameter3 has
    /// passed without a logout. True when it did.
    fn logout_overdue(&mut self, now: Instant) -> bool {
        if self.phase != Phase::FullFeature || self.logout_due.is_none_or(|due| now < due) {
            return false;
        }
        self.logout_due = None;
        self.shared.faults.count_logout(false);
        self.close("the initiator did not log out within Parameter3 of AsyncEvent 1");
        true
    }

    // ------------------------------------------------------------ strict

    /// Strict mode: records that the initiator broke `rule` and ends the
    /// connection. Returns false, for `return` in the checks.
    fn violation(&mut self, rule: Rule, detail: String) -> bool {
        let v = Violation {
            rule,
            initiator: self.initiator_name.clone(),
            detail,
        };
        let reason = format!("strict mode: {v}");
        self.shared.record_violation(v);
        self.close(reason);
        false
    }

    /// The MaxRecvDataSegmentLength a PDU acknowledging up to `exp_stat_sn`
    /// must keep: after a renegotiation, the new value once the initiator
    /// has seen the Text Response that declared it, the larger one before.
    fn recv_limit(&self, exp_stat_sn: Option<Sn>) -> u32 {
        let ours = self.params.max_recv_data_segment_len;
        match (self.mrdsl_change, exp_stat_sn) {
            (Some((answer, new, _)), Some(e)) if e.gt(answer) => new,
            (Some((_, new, old)), _) => new.max(old),
            (None, _) => ours,
        }
    }

    /// The checks of strict mode that need no task: reserved fields,
    /// CmdSN, ExpStatSN, segment length, the SCSI Command's F bit and
    /// immediate data. False: a rule was broken (the connection is closed).
    fn check_strict(&mut self, h: &PduHeader, bhs: &[u8], data: &[u8]) -> bool {
        let what = strict::what(h);
        if let Some((field, value)) = strict::reserved_set(h, bhs) {
            return self.violation(
                Rule::ReservedZero,
                format!("{what}: {field} is {value:#x}, not 0"),
            );
        }
        let exp_stat_sn = strict::exp_stat_sn_of(h);
        let mcs = self
            .session
            .as_ref()
            .is_some_and(|s| s.max_connections() > 1);
        if let Some(e) = exp_stat_sn {
            // Acknowledges at most what we sent (StatSN up to stat_sn - 1),
            // and never less than before (except a PDU that waited for its
            // CmdSN turn, MC/S).
            if e.gt(self.stat_sn) || (!mcs && e.lt(self.exp_stat_sn_seen)) {
                return self.violation(
                    Rule::ExpStatSn,
                    format!(
                        "{what} has ExpStatSN {e}; the target has sent StatSN up to {} and was acknowledged up to {}",
                        Sn(self.stat_sn.0.wrapping_sub(1)),
                        Sn(self.exp_stat_sn_seen.0.wrapping_sub(1))
                    ),
                );
            }
            if e.gt(self.exp_stat_sn_seen) {
                self.exp_stat_sn_seen = e;
            }
        }
        let several = self
            .session
            .as_ref()
            .map_or((false, (self.exp_cmd_sn, self.max_cmd_sn)), |s| {
                (s.max_connections() > 1, s.cmd_window())
            });
        if let (Some((_, cmd_sn)), (true, (exp, max))) = (strict::cmd_sn_of(h), several) {
            // MC/S: a CmdSN may run ahead of ExpCmdSN (lower ones come on
            // other connections), but never out of the window.
            if !strict::is_ping_answer(h) && (cmd_sn.lt(exp) || cmd_sn.gt(max)) {
                return self.violation(
                    Rule::CmdSnWindow,
                    format!("{what} has CmdSN {cmd_sn}; the session's window is [{exp}, {max}]"),
                );
            }
        } else if let Some((immediate, cmd_sn)) = strict::cmd_sn_of(h) {
            if immediate || strict::is_ping_answer(h) {
                if cmd_sn != self.exp_cmd_sn {
                    return self.violation(
                        Rule::ImmediateCmdSn,
                        format!(
                            "immediate {what} has CmdSN {cmd_sn}, not the next CmdSN {} (ExpCmdSN)",
                            self.exp_cmd_sn
                        ),
                    );
                }
            } else if cmd_sn != self.exp_cmd_sn || cmd_sn.gt(self.max_cmd_sn) {
                return self.violation(
                    Rule::CmdSnWindow,
                    format!(
                        "{what} has CmdSN {cmd_sn}; ExpCmdSN is {}, MaxCmdSN {}",
                        self.exp_cmd_sn, self.max_cmd_sn
                    ),
                );
            }
        }
        let limit = self.recv_limit(exp_stat_sn);
        if data.len() > limit as usize {
            return self.violation(
                Rule::MaxRecvDataSegmentLength,
                format!(
                    "{what} carries a {}-byte data segment; the target's MaxRecvDataSegmentLength is {limit}",
                    data.len()
                ),
            );
        }
        if let PduHeader::ScsiCommand(c) = h {
            let expected = if c.write { c.expected_data_len } else { 0 };
            let first_burst = self.params.first_burst_len.min(expected);
            if !data.is_empty() && !self.params.immediate_data {
                return self.violation(
                    Rule::UnsolicitedData,
                    format!(
                        "SCSI Command carries {} bytes of immediate data with ImmediateData=No",
                        data.len()
                    ),
                );
            }
            if data.len() as u64 > u64::from(self.params.first_burst_len) {
                return self.violation(
                    Rule::FirstBurstLength,
                    format!(
                        "{} bytes of immediate data; FirstBurstLength is {}",
                        data.len(),
                        self.params.first_burst_len
                    ),
                );
            }
            if !c.final_bit {
                if !c.write || self.params.initial_r2t {
                    return self.violation(
                        Rule::FinalBit,
                        format!(
                            "SCSI Command without the F bit, but no unsolicited Data-Out may follow ({}, InitialR2T={})",
                            if c.write { "a write" } else { "not a write" },
                            if self.params.initial_r2t { "Yes" } else { "No" }
                        ),
                    );
                }
                if data.len() as u32 >= first_burst {
                    return self.violation(
                        Rule::FinalBit,
                        format!(
                            "SCSI Command without the F bit after {} bytes of immediate data: the unsolicited burst ({first_burst} bytes) is complete",
                            data.len()
                        ),
                    );
                }
            }
        }
        true
    }

    /// Strict checks of a Data-Out against its task `i`. False: broken.
    fn check_strict_data_out(&mut self, i: usize, d: &DataOut, len: u32) -> bool {
        let first_burst = self.params.first_burst_len;
        let initial_r2t = self.params.initial_r2t;
        let t = &self.tasks[i];
        let expected_sn = if t.sequence_ttt == Some(d.ttt) {
            t.next_data_sn
        } else {
            Sn(0)
        };
        if d.data_sn != expected_sn || d.buffer_offset != t.received {
            let detail = format!(
                "Data-Out for ITT {:#x} has DataSN {} at offset {}, expected DataSN {} at offset {}",
                d.itt, d.data_sn, d.buffer_offset, expected_sn, t.received
            );
            return self.violation(Rule::DataSnOrder, detail);
        }
        if d.ttt == RESERVED_TAG {
            if initial_r2t {
                let detail = format!(
                    "unsolicited Data-Out for ITT {:#x} with InitialR2T=Yes",
                    d.itt
                );
                return self.violation(Rule::UnsolicitedData, detail);
            }
            if t.unsolicited_done {
                let detail = format!(
                    "unsolicited Data-Out for ITT {:#x} after the F bit ended the unsolicited burst",
                    d.itt
                );
                return self.violation(Rule::FinalBit, detail);
            }
            let total = t.unsolicited.saturating_add(len);
            let burst = first_burst.min(t.expected);
            if total > first_burst {
                let detail = format!(
                    "{total} bytes of unsolicited data for ITT {:#x}; FirstBurstLength is {first_burst}",
                    d.itt
                );
                return self.violation(Rule::FirstBurstLength, detail);
            }
            if total == burst && !d.final_bit {
                let detail = format!(
                    "the Data-Out that completes ITT {:#x}'s unsolicited burst ({burst} bytes) lacks the F bit",
                    d.itt
                );
                return self.violation(Rule::FinalBit, detail);
            }
            self.tasks[i].unsolicited = total;
            return true;
        }
        let Some(k) = t.r2ts.iter().position(|r| r.0 == d.ttt) else {
            let detail = format!(
                "Data-Out for ITT {:#x} with TTT {:#x}, which no outstanding R2T gave: data beyond what the R2Ts asked for",
                d.itt, d.ttt
            );
            return self.violation(Rule::MaxBurstLength, detail);
        };
        let (_, off, want) = t.r2ts[k];
        let end = u64::from(d.buffer_offset) + u64::from(len);
        let r2t_end = u64::from(off) + u64::from(want);
        if end > r2t_end {
            let detail = format!(
                "Data-Out for ITT {:#x} (TTT {:#x}) reaches byte {end}; its R2T asked for {want} bytes from {off} (MaxBurstLength {})",
                d.itt, d.ttt, self.params.max_burst_len
            );
            return self.violation(Rule::MaxBurstLength, detail);
        }
        if (end == r2t_end) != d.final_bit {
            let detail = format!(
                "Data-Out for ITT {:#x} (TTT {:#x}) ending at byte {end} of the R2T's {off}..{r2t_end} {} the F bit",
                d.itt,
                d.ttt,
                if d.final_bit { "has" } else { "lacks" }
            );
            return self.violation(Rule::FinalBit, detail);
        }
        if d.final_bit {
            self.tasks[i].r2ts.swap_remove(k);
        }
        true
    }

    fn reject(&mut self, reason: u8, bhs: &[u8]) {
        log::debug!(
            "rejecting PDU: {}",
            crate::wire::iscsi::reject_reason_text(reason)
        );
        let (exp, max) = self.window();
        let h = PduHeader::Reject(Reject {
            reason,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            data_sn: Sn(0),
        });
        self.emit(&h, &bhs[..BHS_LEN.min(bhs.len())]);
    }

    /// Decides what to do about bytes the framer refused: `Some(n)` skips
    /// a PDU of `n` bytes (it was answered with Reject), `None` waits for
    /// more bytes or has closed the connection.
    fn framing_error(&mut self, avail: &[u8], e: IscsiWireError) -> Option<usize> {
        let bhs = Bhs::new_checked(avail).ok()?;
        let total = self.framer.pdu_len(&bhs);
        match e {
            IscsiWireError::UnknownOpcode(_) | IscsiWireError::BadStage(_)
                if self.phase == Phase::FullFeature =>
            {
                self.reject(reject::PROTOCOL_ERROR, &avail[..BHS_LEN]);
                Some(total)
            }
            IscsiWireError::DataDigest { .. } if self.phase == Phase::FullFeature => {
                self.reject(reject::DATA_DIGEST, &avail[..BHS_LEN]);
                Some(total)
            }
            e => {
                self.close(format!("malformed PDU: {e}"));
                None
            }
        }
    }

    fn handle(&mut self, h: &PduHeader, bhs: &[u8], data: &[u8], now: Instant) {
        if self.phase == Phase::FullFeature && !self.retained.is_empty() {
            let ack = match h {
                PduHeader::Snack(k) => Some(k.exp_stat_sn),
                other => strict::exp_stat_sn_of(other),
            };
            if let Some(e) = ack {
                self.acknowledge(e);
            }
        }
        match self.phase {
            Phase::Login => match h {
                PduHeader::LoginRequest(r) => self.on_login(r, data),
                other => self.close(format!("{} PDU during login", other.opcode())),
            },
            Phase::FullFeature => match h {
                _ if self.strict && !self.check_strict(h, bhs, data) => {}
                PduHeader::ScsiCommand(c) => self.on_scsi_command(c, bhs, data),
                PduHeader::DataOut(d) => self.on_data_out(d, bhs, data),
                PduHeader::NopOut(n) => self.on_nop_out(n, data, now),
                PduHeader::TextRequest(t) => self.on_text(t, bhs, data),
                PduHeader::TaskMgmtRequest(t) if t.function == tmf::TASK_REASSIGN => {
                    self.on_task_reassign(t)
                }
                PduHeader::TaskMgmtRequest(t) => self.on_task_mgmt(t),
                PduHeader::LogoutRequest(l) => self.on_logout(l),
                PduHeader::Snack(k) => self.on_snack(k, bhs),
                _ => self.reject(reject::PROTOCOL_ERROR, bhs),
            },
            Phase::Closed => {}
        }
    }

    // ------------------------------------------------------------ login

    fn login_fail(&mut self, r: &LoginRequest, class: u8, detail: u8, why: &str) {
        self.login_fail_with_text(r, class, detail, why, &[])
    }

    /// A login reject whose data segment carries `text` (declarations that
    /// explain the refusal).
    fn login_fail_with_text(
        &mut self,
        r: &LoginRequest,
        class: u8,
        detail: u8,
        why: &str,
        text: &[u8],
    ) {
        log::info!(
            "login from {:?} refused ({class:#04x}/{detail:#04x}): {why}",
            self.initiator_name
        );
        let (exp, max) = self.window();
        let h = PduHeader::LoginResponse(LoginResponse {
            transit: false,
            cont: false,
            csg: r.csg,
            nsg: r.csg,
            version_max: 0,
            version_active: 0,
            isid: r.isid,
            tsih: 0,
            itt: r.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            status_class: class,
            status_detail: detail,
        });
        self.emit(&h, text);
        self.close(format!("login failed: {why}"));
    }

    fn login_respond(
        &mut self,
        r: &LoginRequest,
        transit: bool,
        nsg: Stage,
        tsih: u16,
        text: &[u8],
    ) {
        let (exp, max) = self.window();
        let h = PduHeader::LoginResponse(LoginResponse {
            transit,
            cont: false,
            csg: r.csg,
            nsg: if transit { nsg } else { r.csg },
            version_max: 0,
            version_active: 0,
            isid: r.isid,
            tsih,
            itt: r.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            status_class: 0,
            status_detail: 0,
        });
        self.emit(&h, text);
    }

    fn chap_required(&self) -> bool {
        self.shared
            .config
            .chap
            .as_ref()
            .is_some_and(|c| self.session_type == SessionType::Normal || c.on_discovery)
    }

    fn on_login(&mut self, r: &LoginRequest, data: &[u8]) {
        if !self.login.started {
            self.login.started = true;
            self.isid = r.isid;
            self.cid = r.cid;
            self.stat_sn = r.exp_stat_sn;
            self.exp_cmd_sn = r.cmd_sn;
            self.max_cmd_sn = r.cmd_sn.plus(self.shared.config.queue_depth.max(1) - 1);
            if r.version_min > 0 {
                return self.login_fail(r, 0x02, 0x05, "unsupported iSCSI version");
            }
            if let Some((class, detail)) = self.shared.faults.login_refusal(self.portal) {
                return self.login_fail(r, class, detail, "refused by fault injection");
            }
            if let Some((to, permanent)) = self.shared.faults.login_redirect(self.portal) {
                let mut t = TextPairs::new();
                t.push("TargetAddress", to.clone());
                let detail = if permanent { 0x02 } else { 0x01 };
                let why = format!("redirected to {to}");
                return self.login_fail_with_text(r, 0x01, detail, &why, &t.to_bytes());
            }
        }
        if r.tsih != 0 && !self.joining && !self.login.names_checked {
            // A connection for an existing session (MC/S): checked once the
            // InitiatorName of this first request is known.
            let pairs = TextPairs::parse(data).ok();
            if let Some(name) = pairs.as_ref().and_then(|p| p.get("InitiatorName")) {
                self.initiator_name = name.to_string();
            }
            let tpgt = self.shared.portals.get(self.portal).map_or(1, |p| p.tpgt);
            match self
                .shared
                .find_session(&self.initiator_name, r.isid, tpgt, r.tsih, r.cid)
            {
                Ok((session, ended)) => {
                    let mut params = session.params.clone();
                    // Per connection: digests and MaxRecvDataSegmentLength.
                    params.header_digest = self.params.header_digest;
                    params.data_digest = self.params.data_digest;
                    params.max_recv_data_segment_len = self.params.max_recv_data_segment_len;
                    params.max_xmit_data_segment_len = self.params.max_xmit_data_segment_len;
                    self.params = params;
                    let (exp, max) = session.cmd_window();
                    self.exp_cmd_sn = exp;
                    self.max_cmd_sn = max;
                    self.tsih = r.tsih;
                    self.session = Some(session);
                    self.ended = Some(ended);
                    self.joining = true;
                }
                Err(super::JoinRefusal::NoSession) => {
                    return self.login_fail(r, 0x02, 0x0a, "session does not exist (TSIH given)")
                }
                Err(super::JoinRefusal::TooManyConnections) => {
                    return self.login_fail(
                        r,
                        0x02,
                        0x09,
                        "the session has MaxConnections connections already",
                    )
                }
            }
        }
        if self.login.partial.len() + data.len() > MAX_LOGIN_TEXT {
            return self.login_fail(r, 0x02, 0x00, "login text too long");
        }
        if r.cont {
            // More text follows: acknowledge with an empty response.
            self.login.partial.extend_from_slice(data);
            return self.login_respond(r, false, r.csg, 0, &[]);
        }
        let text;
        let text_ref = if self.login.partial.is_empty() {
            data
        } else {
            self.login.partial.extend_from_slice(data);
            text = std::mem::take(&mut self.login.partial);
            &text[..]
        };
        let pairs = match TextPairs::parse(text_ref) {
            Ok(p) => p,
            Err(e) => return self.login_fail(r, 0x02, 0x00, &format!("bad login text: {e}")),
        };
        let mut reply = TextPairs::new();
        if let Err((class, detail, why)) = self.login_keys(r, &pairs, &mut reply) {
            return self.login_fail(r, class, detail, &why);
        }
        let chap_required = self.chap_required();
        let transit_allowed = match r.csg {
            Stage::Security => match self.security_step(&pairs, &mut reply) {
                Err(why) => {
                    let key = crate::iscsi::login::ACCEPTED_CHAP_ALGORITHMS_KEY;
                    let mut explain = TextPairs::new();
                    if let Some(v) = reply.get(key) {
                        explain.push(key, v.to_string());
                    }
                    return self.login_fail_with_text(r, 0x02, 0x01, &why, &explain.to_bytes());
                }
                Ok(()) => match self.login.auth {
                    Auth::Done => true,
                    Auth::NotStarted if !chap_required => true,
                    Auth::NotStarted if r.transit => {
                        return self.login_fail(r, 0x02, 0x01, "authentication required")
                    }
                    _ => false,
                },
            },
            Stage::Operational => {
                if chap_required && self.login.auth != Auth::Done {
                    return self.login_fail(r, 0x02, 0x01, "authentication required");
                }
                true
            }
            Stage::FullFeature => {
                return self.login_fail(r, 0x02, 0x0b, "login request in full feature stage")
            }
        };
        let transit = r.transit && transit_allowed;
        // Declarations the initiator needs from us.
        if !self.login.tpgt_sent && self.session_type == SessionType::Normal {
            self.login.tpgt_sent = true;
            let tpgt = self.shared.portals.get(self.portal).map_or(1, |p| p.tpgt);
            reply.push("TargetPortalGroupTag", tpgt.to_string());
            if let Some(alias) = &self.shared.config.alias {
                reply.push("TargetAlias", alias.clone());
            }
        }
        if !self.login.mrdsl_declared
            && (r.csg == Stage::Operational || pairs.get("MaxRecvDataSegmentLength").is_some())
        {
            self.login.mrdsl_declared = true;
            reply.push(
                "MaxRecvDataSegmentLength",
                self.params.max_recv_data_segment_len.to_string(),
            );
        }
        let text = reply.to_bytes();
        if transit && r.nsg == Stage::FullFeature && self.joining {
            if self.session_type != SessionType::Normal {
                return self.login_fail(r, 0x02, 0x00, "a discovery session has one connection");
            }
            let Some(session) = self.session.clone() else {
                return self.login_fail(r, 0x02, 0x0a, "session does not exist (TSIH given)");
            };
            match session.add_conn(self.cid) {
                Ok((flag, reinstated)) => {
                    if reinstated {
                        log::info!(
                            "connection CID {} of TSIH {} reinstated",
                            self.cid,
                            self.tsih
                        );
                    }
                    self.closing = Some(flag);
                }
                Err(()) => {
                    return self.login_fail(
                        r,
                        0x02,
                        0x09,
                        "the session has MaxConnections connections already",
                    )
                }
            }
            let tsih = self.tsih;
            self.login_respond(r, true, r.nsg, tsih, &text);
            self.enter_full_feature();
        } else if transit && r.nsg == Stage::FullFeature {
            let tsih = self.shared.allocate_tsih();
            self.tsih = tsih;
            self.login_respond(r, true, r.nsg, tsih, &text);
            self.enter_full_feature();
        } else {
            self.login_respond(r, transit, r.nsg, 0, &text);
        }
    }

    /// Declarative and operational keys; `Err` fails the login.
    fn login_keys(
        &mut self,
        r: &LoginRequest,
        pairs: &TextPairs,
        reply: &mut TextPairs,
    ) -> Result<(), (u8, u8, String)> {
        let mut target_named = false;
        for (k, v) in pairs.iter() {
            match k {
                "InitiatorName" => self.initiator_name = v.to_string(),
                "InitiatorAlias" => {}
                "SessionType" => {
                    self.session_type = match v {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return Err((0x02, 0x00, format!("SessionType={v}"))),
                    }
                }
                "TargetName" => {
                    if v != self.shared.config.iqn {
                        return Err((0x02, 0x03, format!("no target named {v}")));
                    }
                    target_named = true;
                }
                "AuthMethod" => {}
                _ if k.starts_with("CHAP_") => {}
                "MaxRecvDataSegmentLength" => match v.parse::<u32>() {
                    Ok(n) if (512..=16_777_215).contains(&n) => {
                        self.params.max_xmit_data_segment_len = n
                    }
                    _ => reply.push(k, "Reject"),
                },
                // Declarations only a target makes; the initiator gets no answer.
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => {
                    reply.push(k, "Irrelevant")
                }
                _ => self.negotiate(k, v, reply),
            }
        }
        if !self.login.names_checked && !r.cont {
            self.login.names_checked = true;
            if self.initiator_name.is_empty() {
                return Err((0x02, 0x07, "InitiatorName missing".into()));
            }
            if self.session_type == SessionType::Normal && !target_named {
                return Err((0x02, 0x07, "TargetName missing".into()));
            }
        }
        Ok(())
    }

    /// Answers one operational key with the RFC 7143 result function.
    fn negotiate(&mut self, key: &str, offer: &str, reply: &mut TextPairs) {
        let l = self.shared.config.limits;
        if self.joining && LEADING_ONLY.contains(&key) {
            // Session-wide ("LO", RFC 7143 §13): settled on the leading
            // connection; this one has the session's values.
            return reply.push(key, "Irrelevant");
        }
        let ours: String = match key {
            "HeaderDigest" | "DataDigest" => {
                if l.allow_digests {
                    "None,CRC32C".into()
                } else {
                    "None".into()
                }
            }
            "MaxConnections" => self.shared.config.max_connections.max(1).to_string(),
            "InitialR2T" => yes_no(l.initial_r2t).into(),
            "ImmediateData" => yes_no(l.immediate_data).into(),
            "MaxBurstLength" => l.max_burst_len.to_string(),
            "FirstBurstLength" => l.first_burst_len.to_string(),
            "DefaultTime2Wait" => "0".into(),
            // Time2Retain matters for connection recovery only; the
            // target keeps a failed connection's tasks until the session ends.
            "DefaultTime2Retain" => if self.shared.config.max_error_recovery_level >= 2 {
                "20"
            } else {
                "0"
            }
            .into(),
            "MaxOutstandingR2T" => l.max_outstanding_r2t.to_string(),
            "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".into(),
            "ErrorRecoveryLevel" => self
                .shared
                .config
                .max_error_recovery_level
                .min(2)
                .to_string(),
            "IFMarker" | "OFMarker" => "No".into(),
            "iSCSIProtocolLevel" => "1".into(),
            "TaskReporting" => "RFC3720".into(),
            _ => String::new(),
        };
        let answer = respond(key, offer, &ours).unwrap_or_else(|_| "Reject".into());
        if answer != "Reject" && answer != "NotUnderstood" {
            // Values came out of `respond`, so they parse.
            let _ = self.params.apply(key, &answer);
        }
        reply.push(key, answer);
    }

    /// AuthMethod and the CHAP exchange. `Err` is an authentication failure.
    fn security_step(&mut self, pairs: &TextPairs, reply: &mut TextPairs) -> Result<(), String> {
        let chap_cfg = self.shared.config.chap.clone();
        if let Some(offer) = pairs.get("AuthMethod") {
            let ours = match (&chap_cfg, self.chap_required()) {
                (Some(_), true) => "CHAP",
                (Some(_), false) => "CHAP,None",
                (None, _) => "None",
            };
            let chosen = respond("AuthMethod", offer, ours).unwrap_or_else(|_| "Reject".into());
            reply.push("AuthMethod", chosen.clone());
            self.login.auth = match chosen.as_str() {
                "CHAP" => Auth::ChapAlgorithm,
                "None" => Auth::Done,
                _ => return Err(format!("no acceptable AuthMethod in {offer}")),
            };
        }
        match self.login.auth {
            Auth::ChapAlgorithm => {
                let Some(algs) = pairs.get("CHAP_A") else {
                    return Ok(());
                };
                let accepted = chap_cfg
                    .as_ref()
                    .map_or(&[][..], |c| c.algorithms.as_slice());
                let Some(algorithm) = chap::choose_algorithm(algs, accepted) else {
                    // Say what we take, for the initiator's error message.
                    reply.push(
                        crate::iscsi::login::ACCEPTED_CHAP_ALGORITHMS_KEY,
                        chap::ChapAlgorithm::offer(accepted),
                    );
                    return Err(format!(
                        "initiator offered CHAP_A={algs} ({}); this target accepts {}",
                        chap::ChapAlgorithm::describe_wire(algs),
                        chap::ChapAlgorithm::describe(accepted)
                    ));
                };
                let id: u8 = rand::random();
                let challenge: [u8; 32] = rand::random();
                let challenge_len = algorithm.challenge_len().min(32);
                reply.push("CHAP_A", algorithm.code().to_string());
                reply.push("CHAP_I", id.to_string());
                reply.push("CHAP_C", chap::encode_hex(&challenge[..challenge_len]));
                self.login.auth = Auth::ChapResponse {
                    id,
                    challenge,
                    challenge_len: challenge_len as u8,
                    algorithm,
                };
            }
            Auth::ChapResponse {
                id,
                challenge,
                challenge_len,
                algorithm,
            } => {
                let challenge = &challenge[..usize::from(challenge_len)];
                let cfg = chap_cfg.ok_or("CHAP is not configured")?;
                let (Some(name), Some(resp)) = (pairs.get("CHAP_N"), pairs.get("CHAP_R")) else {
                    return Err("CHAP_N/CHAP_R missing".into());
                };
                let resp = chap::decode_binary(resp).map_err(|e| e.to_string())?;
                if name != cfg.initiator.user
                    || chap::verify(algorithm, id, &cfg.initiator.secret, challenge, &resp).is_err()
                {
                    return Err(format!("CHAP response of user {name:?} does not verify"));
                }
                match (pairs.get("CHAP_I"), pairs.get("CHAP_C")) {
                    (Some(i), Some(c)) => {
                        let target = cfg
                            .target
                            .ok_or("mutual CHAP asked, but no target secret")?;
                        let i = chap::parse_identifier(i).map_err(|e| e.to_string())?;
                        let c = chap::decode_binary(c).map_err(|e| e.to_string())?;
                        if c == challenge {
                            return Err("initiator reflected our CHAP challenge".into());
                        }
                        reply.push("CHAP_N", target.user.clone());
                        reply.push(
                            "CHAP_R",
                            chap::encode_hex(&chap::response(algorithm, i, &target.secret, &c)),
                        );
                    }
                    (None, None) => {}
                    _ => return Err("CHAP_I without CHAP_C or the reverse".into()),
                }
                self.login.auth = Auth::Done;
            }
            Auth::NotStarted | Auth::Done => {}
        }
        Ok(())
    }

    fn enter_full_feature(&mut self) {
        self.phase = Phase::FullFeature;
        if self.session_type == SessionType::Normal {
            let tpgt = self.shared.portals.get(self.portal).map_or(1, |p| p.tpgt);
            if !self.joining {
                let session = Arc::new(Session::new(
                    self.tsih,
                    self.params.clone(),
                    self.exp_cmd_sn,
                    self.max_cmd_sn,
                ));
                // A new session has room for its first connection.
                if let Ok((flag, _)) = session.add_conn(self.cid) {
                    self.closing = Some(flag);
                }
                let (ended, _) = self.shared.enter_session(
                    &self.initiator_name,
                    self.isid,
                    tpgt,
                    session.clone(),
                );
                self.session = Some(session);
                self.ended = Some(ended);
            }
            self.nexus = Some(super::pr::ItNexus {
                initiator: self.initiator_name.clone(),
                isid: self.isid,
                tpgt,
            });
        }
        self.digests = self.params.digests();
        self.framer = PduFramer {
            digests: self.digests,
            // Strict mode frames longer segments too, to name the rule.
            max_data_segment_len: if self.strict {
                16 << 20
            } else {
                self.params.max_recv_data_segment_len
            },
        };
        self.exp_stat_sn_seen = self.stat_sn;
        self.async_seen = self.shared.faults.async_generation();
        let ua = self
            .shared
            .config
            .unit_attentions
            .then_some(Sense::POWER_ON_RESET);
        self.unit_attention = vec![ua; self.shared.luns.len()];
        self.seen_resets = self
            .shared
            .luns
            .iter()
            .map(|l| l.reset_generation())
            .collect();
        self.seen_alua = vec![self.shared.alua_generation(); self.shared.luns.len()];
        log::debug!(
            "login of {} complete: {:?} session, TSIH {}, {}",
            self.initiator_name,
            self.session_type,
            self.tsih,
            self.params
        );
    }

    // ------------------------------------------------------------ SCSI

    fn send_status(
        &mut self,
        itt: u32,
        status: u8,
        resid: Residual,
        exp_data_sn: Sn,
        sense: Option<Sense>,
    ) {
        let (exp, max) = self.window();
        let h = PduHeader::ScsiResponse(ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow: resid.overflow,
            underflow: resid.underflow,
            response: 0,
            status,
            itt,
            snack_tag: 0,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            exp_data_sn,
            bidi_residual: 0,
            residual: if resid.overflow || resid.underflow {
                resid.count
            } else {
                0
            },
        });
        match sense {
            None => {
                self.emit(&h, &[]);
                self.retain(itt, &h, &[]);
            }
            Some(s) => {
                let mut data = [0u8; 2 + Sense::FIXED_LEN];
                data[1] = Sense::FIXED_LEN as u8;
                data[2..].copy_from_slice(&s.emit_fixed());
                self.emit(&h, &data);
                self.retain(itt, &h, &data);
            }
        }
    }

    fn send_check(&mut self, itt: u32, sense: Sense, exp_data_sn: Sn) {
        let none = residual(0, 0);
        self.send_status(itt, status::CHECK_CONDITION, none, exp_data_sn, Some(sense));
    }

    /// Data-In PDUs cut at the initiator's MaxRecvDataSegmentLength, the F
    /// bit at each MaxBurstLength, and GOOD status in the last one.
    fn send_data_in(
        &mut self,
        itt: u32,
        lun: u64,
        source: DataSource,
        transfer: u64,
        expected: u32,
    ) {
        let resid = residual(transfer, expected);
        let total = transfer.min(u64::from(expected)) as u32;
        if total == 0 {
            return self.send_status(itt, status::GOOD, resid, Sn(0), None);
        }
        let max_seg = self.params.max_xmit_data_segment_len.max(512);
        let burst = self.params.max_burst_len.max(512);
        let (exp, max) = self.window();
        let stat_sn = self.next_stat_sn();
        let keep = self.erl() > 0 && self.session.is_some();
        let mut kept: Vec<(PduHeader, Vec<u8>)> = Vec::new();
        let cid = self.cid;
        let Core {
            out,
            scratch,
            shared,
            digests,
            ..
        } = self;
        let hdr_len = BHS_LEN + if digests.header { 4 } else { 0 };
        let (mut offset, mut in_burst, mut data_sn) = (0u32, 0u32, Sn(0));
        while offset < total {
            let len = (total - offset).min(max_seg).min(burst - in_burst);
            let last = offset + len == total;
            in_burst += len;
            let burst_end = last || in_burst == burst;
            if burst_end {
                in_burst = 0;
            }
            let h = PduHeader::DataIn(DataIn {
                final_bit: burst_end,
                ack: false,
                overflow: last && resid.overflow,
                underflow: last && resid.underflow,
                status_present: last,
                status: status::GOOD,
                lun,
                itt,
                ttt: RESERVED_TAG,
                stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                data_sn,
                buffer_offset: offset,
                residual: if last && (resid.overflow || resid.underflow) {
                    resid.count
                } else {
                    0
                },
            });
            let start = out.len();
            push_pdu_with(out, &h, len as usize, *digests, |buf| match source {
                DataSource::Lun { lun, offset: base } => {
                    shared.luns[lun].read(base + u64::from(offset), buf)
                }
                DataSource::Scratch => {
                    buf.copy_from_slice(&scratch[offset as usize..offset as usize + buf.len()])
                }
            });
            if keep {
                let at = start + hdr_len;
                kept.push((h, out[at..at + len as usize].to_vec()));
            }
            if shared.faults.take_data_in_drop(cid) {
                // As if a digest error had dropped it on the way.
                log::debug!("fault injection: Data-In DataSN {data_sn} of ITT {itt:#x} left out");
                out.truncate(start);
            }
            offset += len;
            data_sn = data_sn.next();
        }
        for (h, d) in kept {
            self.retain(itt, &h, &d);
        }
    }

    fn on_scsi_command(&mut self, c: &ScsiCommand, bhs: &[u8], data: &[u8]) {
        if !self.accept_cmd_sn(c.immediate, c.cmd_sn) {
            return;
        }
        if self.aborted_before_arrival(c.itt, c.cmd_sn) {
            return;
        }
        if self.session_type == SessionType::Discovery {
            return self.reject(reject::NOT_SUPPORTED, bhs);
        }
        let faults = self.shared.faults.clone();
        if let Some(reason) = faults.take_reject(self.portal) {
            return self.reject(reason, bhs);
        }
        let drop_after = faults.count_command_for_drop(self.portal);
        let lun_index = scsi::decode_lun(c.lun).and_then(|n| self.shared.lun_index(n));
        let plan = if let Some(s) = faults.take_check_condition(self.portal) {
            Plan::Check(Sense {
                key: s.key,
                asc: s.asc,
                ascq: s.ascq,
                information: None,
                sense_key_specific: None,
            })
        } else if let Some(ua) = lun_index
            .filter(|_| !scsi::ignores_unit_attention(&c.cdb))
            .and_then(|i| self.take_unit_attention(i))
        {
            Plan::Check(ua)
        } else if self.reservation_gate(c, data, lun_index) {
            if drop_after {
                self.close("fault injection: drop after N commands");
            }
            return;
        } else {
            let port = Port {
                shared: &self.shared,
                portal: self.portal,
            };
            scsi::plan(port, c.lun, &c.cdb, &mut self.scratch)
        };
        let expected = c.expected_data_len;
        match plan {
            Plan::ReadLun { lun, offset, len } => {
                self.send_data_in(c.itt, c.lun, DataSource::Lun { lun, offset }, len, expected)
            }
            Plan::DataIn => {
                let len = self.scratch.len() as u64;
                self.send_data_in(c.itt, c.lun, DataSource::Scratch, len, expected)
            }
            Plan::Good => self.send_status(c.itt, status::GOOD, residual(0, expected), Sn(0), None),
            Plan::Check(sense) => {
                if c.write && !c.final_bit {
                    // Unsolicited Data-Out follows; drain it, then report.
                    // Immediate data counts: the Data-Out continues after it.
                    self.start_write(c, data, Sink::Discard, 0, Some(sense));
                } else {
                    self.send_check(c.itt, sense, Sn(0));
                }
            }
            Plan::WriteLun { lun, offset, len } => {
                self.start_write(c, data, Sink::Lun { lun, offset, len }, len, None)
            }
            Plan::ParamsOut { lun, command, len } => {
                let sink = Sink::Params {
                    lun,
                    command,
                    buf: vec![0u8; len as usize],
                };
                self.start_write(c, data, sink, u64::from(len), None)
            }
        }
        if drop_after {
            self.close("fault injection: drop after N commands");
        }
    }

    /// Persistent reservations: runs PERSISTENT RESERVE IN, starts
    /// PERSISTENT RESERVE OUT, and answers RESERVATION CONFLICT to a
    /// command the reservation forbids. True when the command was taken
    /// care of here.
    fn reservation_gate(&mut self, c: &ScsiCommand, data: &[u8], lun: Option<usize>) -> bool {
        use crate::wire::scsi::pr::{PrInAction, PrInCdb, PrOutCdb};
        use crate::wire::scsi::DataRepr;
        let (Some(li), Some(nexus)) = (lun, self.nexus.as_ref()) else {
            return false;
        };
        let l = &self.shared.luns[li];
        match c.cdb[0] {
            super::pr::PERSISTENT_RESERVE_IN => {
                let bytes = match PrInCdb::parse(&c.cdb) {
                    Ok(cdb) => {
                        let mut bytes = match cdb.action {
                            PrInAction::ReadKeys => l.with_reservations(|r| r.read_keys().to_vec()),
                            PrInAction::ReadReservation => {
                                l.with_reservations(|r| r.read_reservation().to_vec())
                            }
                            PrInAction::ReportCapabilities => {
                                super::pr::Reservations::capabilities().to_vec()
                            }
                            PrInAction::ReadFullStatus => {
                                l.with_reservations(|r| r.read_full_status())
                            }
                        };
                        bytes.truncate(usize::from(cdb.alloc_len));
                        Some(bytes)
                    }
                    Err(_) => None,
                };
                match bytes {
                    Some(b) => {
                        self.scratch.clear();
                        self.scratch.extend_from_slice(&b);
                        let len = b.len() as u64;
                        let expected = c.expected_data_len;
                        self.send_data_in(c.itt, c.lun, DataSource::Scratch, len, expected);
                    }
                    None => self.send_check(c.itt, Sense::INVALID_FIELD_IN_CDB, Sn(0)),
                }
                true
            }
            super::pr::PERSISTENT_RESERVE_OUT => {
                match PrOutCdb::parse(&c.cdb) {
                    Ok(cdb) => {
                        let len = cdb.param_len.min(4096);
                        let sink = Sink::PrOut {
                            lun: li,
                            cdb,
                            buf: vec![0; len as usize],
                        };
                        self.start_write(c, data, sink, u64::from(cdb.param_len), None);
                    }
                    Err(_) if c.write && !c.final_bit => {
                        let sense = Some(Sense::INVALID_FIELD_IN_CDB);
                        self.start_write(c, data, Sink::Discard, 0, sense);
                    }
                    Err(_) => self.send_check(c.itt, Sense::INVALID_FIELD_IN_CDB, Sn(0)),
                }
                true
            }
            op if !l.reservation_allows(nexus, op) => {
                if c.write && !c.final_bit {
                    self.start_write(c, data, Sink::Conflict, 0, None);
                } else {
                    let none = residual(0, 0);
                    let conflict = super::pr::RESERVATION_CONFLICT;
                    self.send_status(c.itt, conflict, none, Sn(0), None);
                }
                true
            }
            _ => false,
        }
    }

    /// Whether a PREEMPT AND ABORT of this session's I_T nexus, or a
    /// LOGICAL UNIT RESET of its LU (through any session), ended `t` after
    /// it started.
    fn task_aborted(&self, t: &WriteTask) -> bool {
        let Some(lun) = t.sink.lun() else {
            return false;
        };
        if self.shared.luns[lun].reset_generation() != t.reset_seen {
            return true;
        }
        match &self.nexus {
            Some(nexus) => self.shared.luns[lun].task_aborted(nexus, t.pr_seen),
            None => false,
        }
    }

    /// Whether the command (ITT, CmdSN) arriving now was aborted before it
    /// arrived (ABORT TASK answered "function complete" for it, RFC 7143
    /// §11.5.1): then it is dropped, unexecuted and unanswered.
    fn aborted_before_arrival(&mut self, itt: u32, cmd_sn: Sn) -> bool {
        let Some(i) = self
            .aborted_early
            .iter()
            .position(|&(t, sn)| t == itt && sn == cmd_sn)
        else {
            return false;
        };
        self.aborted_early.swap_remove(i);
        log::debug!("command {itt:#x} (CmdSN {cmd_sn}) aborted before it arrived: dropped");
        true
    }

    /// A pending UNIT ATTENTION for LUN index `i`: an ALUA state change
    /// (always reported), else reset and power-on ones if unit attentions
    /// are on.
    fn take_unit_attention(&mut self, i: usize) -> Option<Sense> {
        let alua = self.shared.alua_generation();
        if let Some(seen) = self.seen_alua.get_mut(i) {
            if *seen != alua {
                *seen = alua;
                return Some(Sense::ASYMMETRIC_ACCESS_STATE_CHANGED);
            }
        }
        if !self.shared.config.unit_attentions {
            return None;
        }
        let generation = self.shared.luns.get(i)?.reset_generation();
        if let Some(seen) = self.seen_resets.get_mut(i) {
            if *seen != generation {
                *seen = generation;
                self.unit_attention[i] = Some(Sense::LUN_RESET_OCCURRED);
            }
        }
        self.unit_attention.get_mut(i)?.take()
    }

    fn start_write(
        &mut self,
        c: &ScsiCommand,
        data: &[u8],
        sink: Sink,
        transfer: u64,
        error: Option<Sense>,
    ) {
        if self.tasks.len() >= MAX_PENDING_WRITES {
            return self.close("too many write commands waiting for data");
        }
        let expected = if c.write { c.expected_data_len } else { 0 };
        let pr_seen = sink.lun().map_or(0, |l| self.shared.luns[l].pr_aborts());
        let reset_seen = sink
            .lun()
            .map_or(0, |l| self.shared.luns[l].reset_generation());
        let mut task = WriteTask {
            pr_seen,
            reset_seen,
            itt: c.itt,
            lun_field: c.lun,
            sink,
            expected,
            transfer,
            received: 0,
            unsolicited_done: c.final_bit,
            next_r2t_offset: 0,
            outstanding_r2t: 0,
            r2t_sn: Sn(0),
            sequence_ttt: None,
            next_data_sn: Sn(0),
            error,
            unsolicited: 0,
            r2ts: Vec::new(),
        };
        if !data.is_empty() && expected > 0 {
            let n = data.len().min(expected as usize);
            store(&self.shared, &mut task.sink, 0, &data[..n]);
            task.received = n as u32;
            task.unsolicited = n as u32;
        }
        task.next_r2t_offset = task.received;
        self.tasks.push(task);
        let i = self.tasks.len() - 1;
        self.advance_write(i);
    }

    /// After data arrived (or the command itself): complete the task, or
    /// send the R2Ts its window allows.
    fn advance_write(&mut self, i: usize) {
        let t = &self.tasks[i];
        let failed = t.error.is_some() || matches!(t.sink, Sink::Conflict);
        if t.received >= t.expected || (t.unsolicited_done && failed) {
            let task = self.tasks.swap_remove(i);
            return self.complete_write(task);
        }
        if !self.tasks[i].unsolicited_done {
            return;
        }
        let max_r2t = self.params.max_outstanding_r2t.max(1);
        let burst = self.params.max_burst_len.max(512);
        while self.tasks[i].outstanding_r2t < max_r2t
            && self.tasks[i].next_r2t_offset < self.tasks[i].expected
        {
            let ttt = self.alloc_ttt();
            let (exp, max) = self.window();
            let t = &mut self.tasks[i];
            let len = (t.expected - t.next_r2t_offset).min(burst);
            let h = PduHeader::R2t(R2t {
                lun: t.lun_field,
                itt: t.itt,
                ttt,
                stat_sn: self.stat_sn,
                exp_cmd_sn: exp,
                max_cmd_sn: max,
                r2t_sn: t.r2t_sn,
                buffer_offset: t.next_r2t_offset,
                desired_len: len,
            });
            if self.strict {
                t.r2ts.push((ttt, t.next_r2t_offset, len));
            }
            t.r2t_sn = t.r2t_sn.next();
            t.next_r2t_offset += len;
            t.outstanding_r2t += 1;
            let itt = t.itt;
            crate::wire::iscsi::encode_pdu(&mut self.out, &h, &[], self.digests);
            self.retain(itt, &h, &[]);
        }
    }

    fn complete_write(&mut self, task: WriteTask) {
        let r2ts = task.r2t_sn;
        if self.task_aborted(&task) {
            // Aborted by a PREEMPT AND ABORT of this nexus or a LUN reset:
            // no status.
            log::debug!(
                "task {:#x} aborted by PREEMPT AND ABORT or LUN reset",
                task.itt
            );
            return;
        }
        if let Some(sense) = task.error {
            return self.send_check(task.itt, sense, r2ts);
        }
        let alua_before = self.shared.alua_generation();
        let mut stpg = false;
        let result = match task.sink {
            Sink::PrOut { lun, cdb, buf } => {
                let Some(nexus) = self.nexus.clone() else {
                    return self.send_check(task.itt, Sense::INVALID_OPCODE, r2ts);
                };
                let params = &buf[..(task.received as usize).min(buf.len())];
                let r = self.shared.luns[lun]
                    .with_reservations(|r| r.reserve_out(&nexus, &cdb, params));
                return match r {
                    Ok(victims) => {
                        if !victims.is_empty() {
                            log::info!(
                                "PREEMPT AND ABORT by {}: tasks of {} I_T nexus(es) aborted",
                                nexus.initiator,
                                victims.len()
                            );
                        }
                        let resid = residual(task.transfer, task.expected);
                        self.send_status(task.itt, status::GOOD, resid, r2ts, None)
                    }
                    Err(super::pr::PrRefusal::Conflict) => {
                        let none = residual(0, 0);
                        let conflict = super::pr::RESERVATION_CONFLICT;
                        self.send_status(task.itt, conflict, none, r2ts, None)
                    }
                    Err(super::pr::PrRefusal::Check(sense)) => {
                        self.send_check(task.itt, sense, r2ts)
                    }
                };
            }
            Sink::Conflict => {
                let none = residual(0, 0);
                let conflict = super::pr::RESERVATION_CONFLICT;
                return self.send_status(task.itt, conflict, none, r2ts, None);
            }
            Sink::Params { lun, command, buf } => {
                stpg = command == scsi::ParamCommand::SetTargetPortGroups;
                scsi::finish_params(
                    &self.shared,
                    lun,
                    command,
                    &buf[..(task.received as usize).min(buf.len())],
                )
            }
            Sink::Lun { .. } | Sink::Discard => Ok(()),
        };
        if stpg && result.is_ok() {
            // SPC-4 §5.15.2.4: the I_T nexus that asked for the change
            // gets no UNIT ATTENTION for it; every other one does.
            let now = self.shared.alua_generation();
            for seen in &mut self.seen_alua {
                if *seen == alua_before {
                    *seen = now;
                }
            }
        }
        match result {
            Ok(()) => {
                let resid = residual(task.transfer, task.expected);
                self.send_status(task.itt, status::GOOD, resid, r2ts, None)
            }
            Err(sense) => self.send_check(task.itt, sense, r2ts),
        }
    }

    fn on_data_out(&mut self, d: &DataOut, bhs: &[u8], data: &[u8]) {
        let Some(i) = self.tasks.iter().position(|t| t.itt == d.itt) else {
            // The command may have failed early; its data is stale.
            log::debug!("Data-Out for unknown ITT {:#x} dropped", d.itt);
            return;
        };
        if self.task_aborted(&self.tasks[i]) {
            // PREEMPT AND ABORT or a LUN reset ended it: its data must
            // not land.
            log::debug!("Data-Out for aborted task {:#x} dropped", d.itt);
            self.tasks.swap_remove(i);
            return;
        }
        if self.strict && !self.check_strict_data_out(i, d, data.len() as u32) {
            return;
        }
        let end = u64::from(d.buffer_offset) + data.len() as u64;
        if end > u64::from(self.tasks[i].expected) {
            return self.reject(reject::INVALID_FIELD, bhs);
        }
        // DataPDUInOrder and DataSequenceInOrder are Yes: offsets follow on,
        // DataSN counts from 0 in each sequence. ERL 0 cannot recover a gap.
        let t = &mut self.tasks[i];
        let expected_sn = if t.sequence_ttt == Some(d.ttt) {
            t.next_data_sn
        } else {
            Sn(0)
        };
        if d.data_sn != expected_sn || d.buffer_offset != t.received {
            let why = format!(
                "Data-Out for ITT {:#x} has DataSN {} offset {}, expected DataSN {} offset {}",
                d.itt, d.data_sn, d.buffer_offset, expected_sn, t.received
            );
            return self.close(why);
        }
        t.sequence_ttt = (!d.final_bit).then_some(d.ttt);
        t.next_data_sn = expected_sn.next();
        store(&self.shared, &mut self.tasks[i].sink, d.buffer_offset, data);
        let t = &mut self.tasks[i];
        t.received = t.received.saturating_add(data.len() as u32);
        if d.ttt == RESERVED_TAG {
            if d.final_bit && !t.unsolicited_done {
                t.unsolicited_done = true;
                t.next_r2t_offset = t.next_r2t_offset.max(t.received);
            }
        } else if d.final_bit {
            t.outstanding_r2t = t.outstanding_r2t.saturating_sub(1);
        }
        self.advance_write(i);
    }

    // ------------------------------------------------------------ others

    fn on_nop_out(&mut self, n: &NopOut, data: &[u8], now: Instant) {
        if n.itt == RESERVED_TAG {
            // The answer to our ping (or a one-way NOP): nothing to send.
            if self.ping.is_some_and(|(ttt, _)| ttt == n.ttt) {
                self.ping = None;
                self.last_rx = now;
            }
            return;
        }
        if !self.accept_cmd_sn(n.immediate, n.cmd_sn) {
            return;
        }
        let (exp, max) = self.window();
        let h = PduHeader::NopIn(NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
        });
        let echo = data
            .len()
            .min(self.params.max_xmit_data_segment_len as usize);
        self.emit(&h, &data[..echo]);
    }

    fn on_text(&mut self, t: &TextRequest, bhs: &[u8], data: &[u8]) {
        if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
            return;
        }
        if t.ttt != RESERVED_TAG {
            if t.ttt != self.text.ttt {
                return self.reject(reject::INVALID_FIELD, bhs);
            }
            if self.text.sent < self.text.outgoing.len() {
                return self.send_text_chunk(t);
            }
        } else {
            // A new exchange resets any earlier one.
            self.text.incoming.clear();
            self.text.outgoing.clear();
            self.text.sent = 0;
        }
        if self.text.incoming.len() + data.len() > MAX_LOGIN_TEXT {
            return self.reject(reject::INVALID_FIELD, bhs);
        }
        self.text.incoming.extend_from_slice(data);
        if t.cont {
            // More request text follows: empty answer with a TTT to echo.
            self.text.ttt = self.alloc_ttt();
            let (exp, max) = self.window();
            let h = PduHeader::TextResponse(TextResponse {
                final_bit: false,
                cont: false,
                lun: t.lun,
                itt: t.itt,
                ttt: self.text.ttt,
                stat_sn: self.next_stat_sn(),
                exp_cmd_sn: exp,
                max_cmd_sn: max,
            });
            return self.emit(&h, &[]);
        }
        let request = std::mem::take(&mut self.text.incoming);
        let pairs = match TextPairs::parse(&request) {
            Ok(p) => p,
            Err(_) => return self.reject(reject::INVALID_FIELD, bhs),
        };
        let mut reply = TextPairs::new();
        let mut declared = None;
        for (k, v) in pairs.iter() {
            if k == "SendTargets" {
                self.send_targets(v, &mut reply);
            } else if k == "MaxRecvDataSegmentLength" {
                // Declarative, "Use: ALL" (RFC 7143 §13.12): renegotiable in
                // the full feature phase. Theirs bounds what we send.
                match v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (512..=16_777_215).contains(n))
                {
                    Some(n) => {
                        self.params.max_xmit_data_segment_len = n;
                        let old = self.params.max_recv_data_segment_len;
                        let new = self.renegotiate.take().flatten().unwrap_or(old);
                        reply.push(k, new.to_string());
                        declared = Some((new, old));
                    }
                    None => reply.push(k, "Reject"),
                }
            } else {
                reply.push(k, "NotUnderstood");
            }
        }
        if let Some((new, old)) = declared {
            // The response goes out with the next StatSN.
            self.mrdsl_change = Some((self.stat_sn, new, old));
            self.params.max_recv_data_segment_len = new;
            if new > self.framer.max_data_segment_len {
                self.framer.max_data_segment_len = new;
            }
            self.shared.faults.count_renegotiation();
        }
        self.text.outgoing = reply.to_bytes();
        self.text.sent = 0;
        self.text.ttt = self.alloc_ttt();
        self.send_text_chunk(t);
    }

    fn send_targets(&self, which: &str, reply: &mut TextPairs) {
        let iqn = &self.shared.config.iqn;
        let ours = match which {
            "All" => true,
            // Empty: the target of this (normal) session.
            "" => self.session_type == SessionType::Normal,
            name => name == iqn,
        };
        if !ours {
            return;
        }
        reply.push("TargetName", iqn.clone());
        for p in &self.shared.portals {
            let mut addr = p.addr;
            if addr.ip().is_unspecified() {
                if let Some(local) = self.local_addr {
                    addr.set_ip(local.ip());
                }
            }
            reply.push("TargetAddress", format!("{addr},{}", p.tpgt));
        }
    }

    fn send_text_chunk(&mut self, t: &TextRequest) {
        let max = self.params.max_xmit_data_segment_len.max(512) as usize;
        let start = self.text.sent;
        let end = (start + max).min(self.text.outgoing.len());
        let last = end == self.text.outgoing.len();
        let (exp, max_cmd) = self.window();
        let h = PduHeader::TextResponse(TextResponse {
            final_bit: last,
            cont: !last,
            lun: t.lun,
            itt: t.itt,
            ttt: if last { RESERVED_TAG } else { self.text.ttt },
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max_cmd,
        });
        let chunk = std::mem::take(&mut self.text.outgoing);
        self.emit(&h, &chunk[start..end]);
        self.text.outgoing = chunk;
        self.text.sent = end;
        if last {
            self.text.outgoing.clear();
            self.text.sent = 0;
        }
    }

    fn on_task_mgmt(&mut self, t: &TaskMgmtRequest) {
        if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
            return;
        }
        let response = match t.function {
            tmf::ABORT_TASK => {
                if let Some(i) = self
                    .tasks
                    .iter()
                    .position(|w| w.itt == t.referenced_task_tag)
                {
                    self.tasks.swap_remove(i);
                    0
                } else if t.ref_cmd_sn.ge(self.exp_cmd_sn) && t.ref_cmd_sn.lt(t.cmd_sn) {
                    // Never received, still in the window: "function
                    // complete" (RFC 7143 §11.5.1), and the command is
                    // dropped if it arrives later. One already answered
                    // falls through to "task does not exist".
                    if self.aborted_early.len() >= MAX_PENDING_WRITES {
                        self.aborted_early.remove(0);
                    }
                    self.aborted_early
                        .push((t.referenced_task_tag, t.ref_cmd_sn));
                    0
                } else {
                    1
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                let known = scsi::decode_lun(t.lun).and_then(|n| self.shared.lun_index(n));
                match known {
                    None => 2,
                    Some(i) => {
                        self.tasks.retain(|w| w.lun_field != t.lun);
                        if t.function == tmf::LOGICAL_UNIT_RESET {
                            // Every session, this one included, then reports
                            // 29/03 once (as LIO does per initiator), and
                            // every session's tasks on the LU end: a write
                            // waiting for its data never lands
                            // (`task_aborted`).
                            self.shared.luns[i].reset();
                        }
                        0
                    }
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                // Every LU is reset: the other sessions' tasks end too.
                self.tasks.clear();
                for lun in &self.shared.luns {
                    lun.reset();
                }
                0
            }
            tmf::CLEAR_ACA => 0,
            // TASK REASSIGN is answered by its own handler (MC/S, ERL 2).
            _ => 5,
        };
        self.send_tmf_response(t.itt, response);
    }

    fn on_logout(&mut self, l: &LogoutRequest) {
        if !self.accept_cmd_sn(l.immediate, l.cmd_sn) {
            return;
        }
        // Response 0 closes this connection (`me`) or has the session close
        // another one; 1: no such CID; 2: recovery not supported.
        let session = self.session.clone();
        let mut me = false;
        let response = match l.reason {
            0 => {
                // The whole session: every other connection closes too.
                if let Some(s) = &session {
                    for cid in s.cids() {
                        if cid != self.cid {
                            s.close_conn(cid, closing::TERMINATE);
                        }
                    }
                }
                me = true;
                0
            }
            1 | 2 if l.reason == 2 && self.erl() < 2 => 2,
            1 | 2 if l.cid == self.cid => {
                me = true;
                self.recover_tasks = l.reason == 2;
                0
            }
            1 | 2 => {
                let how = if l.reason == 2 {
                    closing::RECOVER
                } else {
                    closing::TERMINATE
                };
                match &session {
                    Some(s) if s.close_conn(l.cid, how) => 0,
                    _ => 1,
                }
            }
            _ => {
                log::debug!("Logout reason {} is not defined", l.reason);
                let bhs = PduHeader::LogoutRequest(l.clone()).emit(0, 0);
                return self.reject(reject::INVALID_FIELD, &bhs);
            }
        };
        let (exp, max) = self.window();
        let time2retain = if l.reason == 2 && response == 0 {
            self.params.default_time2retain.min(u32::from(u16::MAX)) as u16
        } else {
            0
        };
        let h = PduHeader::LogoutResponse(LogoutResponse {
            response,
            itt: l.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            time2wait: 0,
            time2retain,
        });
        self.emit(&h, &[]);
        if me {
            if self.logout_due.take().is_some() {
                self.shared.faults.count_logout(true);
            }
            if self.recover_tasks {
                self.close("logout for recovery");
            } else {
                self.tasks.clear();
                self.close("logout");
            }
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::chap::{ChapAlgorithm, Secret};
    use crate::target::{TargetConfig, TargetLimits, TargetShared};
    use crate::wire::iscsi::{LoginRequest, ScsiCommand};
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::time::Duration;

    const IQN: &str = "iqn.2024-01.test:target";

    fn shared(cfg: TargetConfig) -> SharedTarget {
        let addrs: Vec<SocketAddr> = vec![
            "10.0.0.1:3260".parse().unwrap(),
            "10.0.1.1:3260".parse().unwrap(),
        ];
        Arc::new(TargetShared::new(cfg, &addrs).unwrap())
    }

    /// A scripted initiator talking to one `TargetConn`.
    struct Peer {
        conn: TargetConn,
        digests: Digests,
        now: Instant,
        cmd_sn: Sn,
        itt: u32,
        isid: [u8; 6],
        /// The TSIH and CID the logins carry (MC/S: a session's TSIH).
        tsih: u16,
        cid: u16,
    }

    type Pdu = (PduHeader, Vec<u8>);

    impl Peer {
        fn new(shared: SharedTarget, portal: usize) -> Peer {
            let now = Instant::now();
            Peer {
                conn: TargetConn::new(shared, portal, now),
                digests: Digests::default(),
                now,
                cmd_sn: Sn(100),
                itt: 0,
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 0,
                cid: 1,
            }
        }

        fn send_raw(&mut self, bytes: &[u8]) -> Vec<Pdu> {
            self.conn.receive(bytes, self.now);
            self.take_output()
        }

        /// Runs the connection's timers and returns what it sent.
        fn tick(&mut self) -> Vec<Pdu> {
            self.conn.handle_timeout(self.now);
            self.take_output()
        }

        fn take_output(&mut self) -> Vec<Pdu> {
            let out = self.conn.output().to_vec();
            self.conn.clear_output();
            let framer = PduFramer {
                digests: self.digests,
                max_data_segment_len: 16 << 20,
            };
            let mut pdus = Vec::new();
            let mut at = 0;
            while at < out.len() {
                let f = framer
                    .frame(&out[at..])
                    .expect("target output frames")
                    .expect("whole PDU");
                pdus.push((f.header.clone(), out[at..][f.data.clone()].to_vec()));
                at += f.total_len;
            }
            pdus
        }

        #[track_caller]
        fn send(&mut self, h: PduHeader, data: &[u8]) -> Vec<Pdu> {
            let mut bytes = Vec::new();
            crate::wire::iscsi::encode_pdu(&mut bytes, &h, data, self.digests);
            self.send_raw(&bytes)
        }

        fn next_itt(&mut self) -> u32 {
            self.itt += 1;
            self.itt
        }

        #[track_caller]
        fn login_step(
            &mut self,
            csg: Stage,
            nsg: Stage,
            transit: bool,
            keys: &[(&str, &str)],
        ) -> (LoginResponse, TextPairs) {
            let mut t = TextPairs::new();
            for (k, v) in keys {
                t.push(k, *v);
            }
            let h = PduHeader::LoginRequest(LoginRequest {
                transit,
                cont: false,
                csg,
                nsg,
                version_max: 0,
                version_min: 0,
                isid: self.isid,
                tsih: self.tsih,
                itt: 7,
                cid: self.cid,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: Sn(50),
            });
            let mut pdus = self.send(h, &t.to_bytes());
            assert_eq!(pdus.len(), 1, "one login response");
            let (h, data) = pdus.remove(0);
            let PduHeader::LoginResponse(r) = h else {
                panic!("not a login response: {h:?}")
            };
            (r, TextPairs::parse(&data).unwrap())
        }

        /// Normal session without authentication, straight to full feature.
        #[track_caller]
        fn login_normal(&mut self, ops: &[(&str, &str)]) -> TextPairs {
            let mut keys = vec![
                ("InitiatorName", "iqn.2024-01.test:ini"),
                ("TargetName", IQN),
                ("SessionType", "Normal"),
            ];
            keys.extend_from_slice(ops);
            let (r, t) = self.login_step(Stage::Operational, Stage::FullFeature, true, &keys);
            assert_eq!((r.status_class, r.status_detail), (0, 0), "{t:?}");
            assert!(r.transit && r.nsg == Stage::FullFeature);
            assert!(self.conn.is_full_feature());
            self.digests = self.conn.params().digests();
            t
        }

        fn command(
            &mut self,
            cdb: &[u8],
            read: bool,
            write: bool,
            expected: u32,
            final_bit: bool,
        ) -> ScsiCommand {
            let mut c = [0u8; 16];
            c[..cdb.len()].copy_from_slice(cdb);
            let itt = self.next_itt();
            let cmd = ScsiCommand {
                immediate: false,
                final_bit,
                read,
                write,
                attr: 1,
                lun: 0,
                itt,
                expected_data_len: expected,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: Sn(0),
                cdb: c,
            };
            self.cmd_sn = self.cmd_sn.next();
            cmd
        }

        #[track_caller]
        fn read10(&mut self, lba: u32, blocks: u16) -> Vec<Pdu> {
            let mut cdb = vec![0x28, 0];
            cdb.extend_from_slice(&lba.to_be_bytes());
            cdb.extend_from_slice(&[0, (blocks >> 8) as u8, blocks as u8, 0]);
            let c = self.command(&cdb, true, false, u32::from(blocks) * 512, true);
            self.send(PduHeader::ScsiCommand(c), &[])
        }
    }

    fn write10_cdb(lba: u32, blocks: u16) -> Vec<u8> {
        let mut cdb = vec![0x2a, 0];
        cdb.extend_from_slice(&lba.to_be_bytes());
        cdb.extend_from_slice(&[0, (blocks >> 8) as u8, blocks as u8, 0]);
        cdb
    }

    /// Joins Data-In payloads and returns (data, final status PDU).
    #[track_caller]
    fn collect_data_in(pdus: &[Pdu]) -> (Vec<u8>, DataIn) {
        let mut data = Vec::new();
        let mut last = None;
        for (i, (h, d)) in pdus.iter().enumerate() {
            let PduHeader::DataIn(di) = h else {
                panic!("expected Data-In, got {h:?}")
            };
            assert_eq!(di.data_sn, Sn(i as u32));
            assert_eq!(di.buffer_offset as usize, data.len());
            assert_eq!(di.status_present, i == pdus.len() - 1);
            data.extend_from_slice(d);
            last = Some(di.clone());
        }
        (data, last.expect("at least one Data-In"))
    }

    #[track_caller]
    fn expect_sense(pdus: &[Pdu], key: u8, asc: u8, ascq: u8) {
        assert_eq!(pdus.len(), 1);
        let (PduHeader::ScsiResponse(r), data) = &pdus[0] else {
            panic!("{:?}", pdus[0])
        };
        assert_eq!(r.status, status::CHECK_CONDITION);
        assert_eq!(&data[..2], &[0, 18]);
        assert_eq!(
            (data[2] & 0x7f, data[4] & 0x0f, data[14], data[15]),
            (0x70, key, asc, ascq)
        );
    }

    #[test]
    fn login_negotiates_with_rfc_result_functions() {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 1);
        let t = p.login_normal(&[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "None"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "65536"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxOutstandingR2T", "16"),
            ("MaxRecvDataSegmentLength", "32768"),
            ("ErrorRecoveryLevel", "2"),
            ("X-com.example.Vendor", "1"),
        ]);
        assert_eq!(t.get("HeaderDigest"), Some("CRC32C"));
        assert_eq!(t.get("DataDigest"), Some("None"));
        assert_eq!(t.get("MaxBurstLength"), Some("1048576"));
        assert_eq!(t.get("FirstBurstLength"), Some("65536"));
        assert_eq!(t.get("InitialR2T"), Some("No"));
        assert_eq!(t.get("MaxOutstandingR2T"), Some("8"));
        assert_eq!(t.get("ErrorRecoveryLevel"), Some("2"));
        assert_eq!(t.get("X-com.example.Vendor"), Some("NotUnderstood"));
        assert_eq!(t.get("TargetPortalGroupTag"), Some("2"));
        assert_eq!(t.get("MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(p.conn.params().max_xmit_data_segment_len, 32768);
        assert_ne!(p.conn.tsih(), 0);
        // Header digests are on from the first full-feature PDU: a NOP round trip proves it.
        let itt = p.next_itt();
        let pdus = p.send(
            PduHeader::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt,
                ttt: RESERVED_TAG,
                cmd_sn: p.cmd_sn,
                exp_stat_sn: Sn(0),
            }),
            b"ping",
        );
        let (PduHeader::NopIn(n), d) = &pdus[0] else {
            panic!()
        };
        assert_eq!((n.itt, d.as_slice()), (itt, &b"ping"[..]));
    }

    #[test]
    fn login_refusals() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let mut p = Peer::new(s.clone(), 0);
        let (r, _) = p.login_step(
            Stage::Operational,
            Stage::FullFeature,
            true,
            &[("InitiatorName", "iqn.x"), ("TargetName", "iqn.nope")],
        );
        assert_eq!((r.status_class, r.status_detail), (0x02, 0x03));
        assert!(p.conn.is_closed());
        let mut p = Peer::new(s.clone(), 0);
        let (r, _) = p.login_step(
            Stage::Operational,
            Stage::FullFeature,
            true,
            &[("TargetName", IQN)],
        );
        assert_eq!((r.status_class, r.status_detail), (0x02, 0x07));
        s.faults.portal(0).refuse_logins(0x03, 0x01);
        let mut p = Peer::new(s.clone(), 0);
        let (r, _) = p.login_step(
            Stage::Operational,
            Stage::FullFeature,
            true,
            &[("InitiatorName", "iqn.x"), ("TargetName", IQN)],
        );
        assert_eq!((r.status_class, r.status_detail), (0x03, 0x01));
        // Portal 1 is not refused.
        let mut p = Peer::new(s, 1);
        p.login_normal(&[]);
    }

    /// Runs the CHAP exchange; returns the final response and its keys.
    fn chap_login(
        p: &mut Peer,
        user: &str,
        secret: &[u8],
        mutual: Option<(u8, &[u8])>,
    ) -> (LoginResponse, TextPairs) {
        let (r, t) = p.login_step(
            Stage::Security,
            Stage::Operational,
            true,
            &[
                ("InitiatorName", "iqn.2024-01.test:ini"),
                ("TargetName", IQN),
                ("SessionType", "Normal"),
                ("AuthMethod", "CHAP,None"),
            ],
        );
        assert_eq!(r.status_class, 0);
        assert!(!r.transit, "no transit before CHAP completes");
        assert_eq!(t.get("AuthMethod"), Some("CHAP"));
        // The initiator's first choice wins; the target accepts all by default.
        let (r, t) = p.login_step(
            Stage::Security,
            Stage::Operational,
            false,
            &[("CHAP_A", "7,5")],
        );
        assert_eq!(r.status_class, 0);
        assert_eq!(t.get("CHAP_A"), Some("7"));
        let id = chap::parse_identifier(t.get("CHAP_I").unwrap()).unwrap();
        let challenge = chap::decode_binary(t.get("CHAP_C").unwrap()).unwrap();
        assert_eq!(challenge.len(), 32);
        let r_hex = chap::encode_hex(&chap::response(
            ChapAlgorithm::Sha256,
            id,
            &Secret::new(secret.to_vec()),
            &challenge,
        ));
        let mut keys = vec![("CHAP_N", user.to_string()), ("CHAP_R", r_hex)];
        if let Some((i, c)) = mutual {
            keys.push(("CHAP_I", i.to_string()));
            keys.push(("CHAP_C", chap::encode_hex(c)));
        }
        let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
        p.login_step(Stage::Security, Stage::Operational, true, &keys)
    }

    #[test]
    fn chap_one_way() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20).chap("alice", "secretsecret12"));
        let mut p = Peer::new(s.clone(), 0);
        let (r, _) = chap_login(&mut p, "alice", b"secretsecret12", None);
        assert_eq!(
            (r.status_class, r.transit, r.nsg),
            (0, true, Stage::Operational)
        );
        let (r, _) = p.login_step(
            Stage::Operational,
            Stage::FullFeature,
            true,
            &[("MaxRecvDataSegmentLength", "8192")],
        );
        assert_eq!((r.status_class, r.nsg), (0, Stage::FullFeature));
        assert!(p.conn.is_full_feature());

        let mut p = Peer::new(s.clone(), 0);
        let (r, _) = chap_login(&mut p, "alice", b"wrong-secret!!", None);
        assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));
        assert!(p.conn.is_closed());

        // Skipping security when CHAP is required fails too.
        let mut p = Peer::new(s.clone(), 0);
        let (r, _) = p.login_step(
            Stage::Operational,
            Stage::FullFeature,
            true,
            &[("InitiatorName", "iqn.x"), ("TargetName", IQN)],
        );
        assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));

        // Mutual CHAP asked, but the target has no secret of its own.
        let mut p = Peer::new(s, 0);
        let (r, _) = chap_login(&mut p, "alice", b"secretsecret12", Some((9, &[0x55; 16])));
        assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));
    }

    #[test]
    fn chap_mutual() {
        let s = shared(
            TargetConfig::ram(IQN, 1 << 20)
                .chap("alice", "secretsecret12")
                .mutual_chap("target-bob", "targetsecret34"),
        );
        let mut p = Peer::new(s, 0);
        let challenge = [0x42u8; 16];
        let (r, t) = chap_login(&mut p, "alice", b"secretsecret12", Some((9, &challenge)));
        assert_eq!(r.status_class, 0);
        assert_eq!(t.get("CHAP_N"), Some("target-bob"));
        let their = chap::decode_binary(t.get("CHAP_R").unwrap()).unwrap();
        let sha256 = ChapAlgorithm::Sha256;
        let target_secret = Secret::new(b"targetsecret34".to_vec());
        chap::verify(sha256, 9, &target_secret, &challenge, &their).unwrap();
        let other = Secret::new(b"other".to_vec());
        assert!(chap::verify(sha256, 9, &other, &challenge, &their).is_err());
        // The mutual answer uses the chosen algorithm, not MD5.
        assert!(chap::verify(ChapAlgorithm::Md5, 9, &target_secret, &challenge, &their).is_err());
    }

    #[test]
    fn chap_algorithms_the_target_accepts() {
        let s = shared(
            TargetConfig::ram(IQN, 1 << 20)
                .chap("alice", "secretsecret12")
                .chap_algorithms(&[ChapAlgorithm::Md5, ChapAlgorithm::Sha1]),
        );
        let first_steps = |p: &mut Peer, offer: &str| {
            p.login_step(
                Stage::Security,
                Stage::Operational,
                true,
                &[
                    ("InitiatorName", "iqn.2024-01.test:ini"),
                    ("TargetName", IQN),
                    ("AuthMethod", "CHAP"),
                ],
            );
            p.login_step(
                Stage::Security,
                Stage::Operational,
                false,
                &[("CHAP_A", offer)],
            )
        };
        // First offered value it accepts.
        let mut p = Peer::new(s.clone(), 0);
        let (r, t) = first_steps(&mut p, "8,7,6,5");
        assert_eq!((r.status_class, t.get("CHAP_A")), (0, Some("6")));
        assert_eq!(
            chap::decode_binary(t.get("CHAP_C").unwrap()).unwrap().len(),
            20
        );
        // None of them: authentication failure, saying what it accepts.
        let mut p = Peer::new(s, 0);
        let (r, t) = first_steps(&mut p, "8,7");
        assert_eq!((r.status_class, r.status_detail), (0x02, 0x01));
        assert_eq!(
            t.get(crate::iscsi::login::ACCEPTED_CHAP_ALGORITHMS_KEY),
            Some("5,6")
        );
        assert!(p.conn.is_closed());
    }

    #[test]
    fn discovery_send_targets_lists_every_portal() {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        let (r, t) = p.login_step(
            Stage::Operational,
            Stage::FullFeature,
            true,
            &[("InitiatorName", "iqn.x"), ("SessionType", "Discovery")],
        );
        assert_eq!(r.status_class, 0);
        assert_eq!(t.get("TargetPortalGroupTag"), None);
        let pdus = p.send(
            PduHeader::TextRequest(TextRequest {
                immediate: true,
                final_bit: true,
                cont: false,
                lun: 0,
                itt: 3,
                ttt: RESERVED_TAG,
                cmd_sn: p.cmd_sn,
                exp_stat_sn: Sn(0),
            }),
            b"SendTargets=All\0",
        );
        let (PduHeader::TextResponse(tr), data) = &pdus[0] else {
            panic!()
        };
        assert!(tr.final_bit && tr.ttt == RESERVED_TAG);
        let t = TextPairs::parse(data).unwrap();
        let v: Vec<(&str, &str)> = t.iter().collect();
        assert_eq!(
            v,
            [
                ("TargetName", IQN),
                ("TargetAddress", "10.0.0.1:3260,1"),
                ("TargetAddress", "10.0.1.1:3260,2"),
            ]
        );
        // SCSI commands are not for discovery sessions.
        let c = p.command(&[0x00], false, false, 0, true);
        let pdus = p.send(PduHeader::ScsiCommand(c), &[]);
        assert!(matches!(&pdus[0].0, PduHeader::Reject(r) if r.reason == reject::NOT_SUPPORTED));
        // Logout closes.
        let pdus = p.send(
            PduHeader::LogoutRequest(LogoutRequest {
                immediate: true,
                reason: 0,
                itt: 9,
                cid: 1,
                cmd_sn: p.cmd_sn,
                exp_stat_sn: Sn(0),
            }),
            &[],
        );
        assert!(
            matches!(&pdus[0].0, PduHeader::LogoutResponse(l) if l.response == 0 && l.itt == 9)
        );
        assert!(p.conn.is_closed());
    }

    #[test]
    fn long_text_response_continues_with_ttt() {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        p.login_normal(&[("MaxRecvDataSegmentLength", "512")]);
        let mut req = Vec::new();
        for i in 0..40 {
            req.extend_from_slice(format!("X-unknown-key-{i:03}=value\0").as_bytes());
        }
        let mut text = Vec::new();
        let mut pdus = p.send(
            PduHeader::TextRequest(TextRequest {
                immediate: true,
                final_bit: true,
                cont: false,
                lun: 0,
                itt: 3,
                ttt: RESERVED_TAG,
                cmd_sn: p.cmd_sn,
                exp_stat_sn: Sn(0),
            }),
            &req,
        );
        loop {
            let (PduHeader::TextResponse(tr), data) = pdus.remove(0) else {
                panic!()
            };
            assert!(data.len() <= 512);
            text.extend_from_slice(&data);
            if tr.final_bit {
                break;
            }
            assert!(tr.cont && tr.ttt != RESERVED_TAG);
            pdus = p.send(
                PduHeader::TextRequest(TextRequest {
                    immediate: true,
                    final_bit: true,
                    cont: false,
                    lun: 0,
                    itt: 3,
                    ttt: tr.ttt,
                    cmd_sn: p.cmd_sn,
                    exp_stat_sn: Sn(0),
                }),
                &[],
            );
        }
        assert_eq!(TextPairs::parse(&text).unwrap().0.len(), 40);
    }

    #[test]
    fn read_is_split_at_initiator_mrdsl_with_status_in_last_data_in() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        s.luns[0].write(512 * 10, &pattern);
        let mut p = Peer::new(s, 0);
        p.login_normal(&[
            ("MaxRecvDataSegmentLength", "1000"),
            ("MaxBurstLength", "4096"),
        ]);
        let pdus = p.read10(10, 16);
        assert_eq!(
            pdus.len(),
            10,
            "8192 bytes in 1000-byte PDUs cut at 4096-byte bursts"
        );
        let (data, last) = collect_data_in(&pdus);
        assert_eq!(data, pattern);
        assert_eq!(last.status, status::GOOD);
        assert!(!last.underflow && !last.overflow);
        let finals: Vec<bool> = pdus
            .iter()
            .map(|(h, _)| matches!(h, PduHeader::DataIn(d) if d.final_bit))
            .collect();
        assert_eq!(finals.iter().filter(|&&f| f).count(), 2);
        assert!(finals[4] && finals[9]);
    }

    #[test]
    fn read_with_digests_and_residuals() {
        let mut p = Peer::new(shared(TargetConfig::null(IQN, 1 << 20)), 0);
        p.login_normal(&[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]);
        assert!(p.digests.header && p.digests.data);
        // INQUIRY with a 255-byte allocation: 66 bytes come back, underflow 189.
        let c = p.command(&[0x12, 0, 0, 0, 255], true, false, 255, true);
        let pdus = p.send(PduHeader::ScsiCommand(c), &[]);
        let (data, last) = collect_data_in(&pdus);
        assert_eq!(data.len(), 66);
        assert_eq!(&data[8..15], b"IBYPASS");
        assert!(last.underflow && last.residual == 189);
        // READ asking for 2 blocks with room for 1: overflow 512.
        let c = p.command(&[0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], true, false, 512, true);
        let pdus = p.send(PduHeader::ScsiCommand(c), &[]);
        let (data, last) = collect_data_in(&pdus);
        assert_eq!(data, vec![0u8; 512]);
        assert!(last.overflow && last.residual == 512);
    }

    #[test]
    fn write_with_immediate_data_only() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let mut p = Peer::new(s.clone(), 0);
        p.login_normal(&[("InitialR2T", "Yes"), ("ImmediateData", "Yes")]);
        let data = vec![0xabu8; 1024];
        let c = p.command(&write10_cdb(3, 2), false, true, 1024, true);
        let pdus = p.send(PduHeader::ScsiCommand(c.clone()), &data);
        let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
            panic!("{pdus:?}")
        };
        assert_eq!(
            (r.status, r.itt, r.exp_data_sn),
            (status::GOOD, c.itt, Sn(0))
        );
        let mut back = vec![0u8; 1024];
        s.luns[0].read(3 * 512, &mut back);
        assert_eq!(back, data);
        let (read, _) = collect_data_in(&p.read10(3, 2));
        assert_eq!(read, data);
    }

    /// Session reinstatement (RFC 7143 §6.3.5): a new login with the same
    /// ISID on the same portal group ends the old session, and a write the
    /// old connection only reads afterwards (a hung portal waking up) is
    /// not executed. Another ISID, or another portal group, is left alone.
    /// Portals of one portal group share I_T nexuses: a login with a known
    /// ISID through the other portal ends the session (the fence through
    /// another portal of `multipath::fence`), and the group is what the
    /// login response names. Portals of their own groups do not.
    #[test]
    fn a_login_through_another_portal_of_the_group_reinstates() {
        let one = |grouped: bool| {
            let mut cfg = TargetConfig::ram(IQN, 1 << 20)
                .portal("10.0.0.1:3260".parse().unwrap())
                .portal("10.0.1.1:3260".parse().unwrap());
            if grouped {
                cfg = cfg.one_portal_group(7);
            }
            shared(cfg)
        };
        let s = one(true);
        assert_eq!((s.portals[0].tpgt, s.portals[1].tpgt), (7, 7));
        assert_eq!(
            (s.portals[0].relative_port, s.portals[1].relative_port),
            (1, 2),
            "relative port ids stay per portal"
        );
        let mut old = Peer::new(s.clone(), 0);
        old.login_normal(&[]);
        let mut fence = Peer::new(s.clone(), 1);
        let t = fence.login_normal(&[]);
        assert_eq!(t.get("TargetPortalGroupTag"), Some("7"));
        assert!(old.conn.is_reinstated(), "ended through the other portal");
        assert_eq!(s.session_count(), 1);
        let s = one(false);
        let mut old = Peer::new(s.clone(), 0);
        old.login_normal(&[]);
        let mut other = Peer::new(s.clone(), 1);
        let t = other.login_normal(&[]);
        assert_eq!(t.get("TargetPortalGroupTag"), Some("2"));
        assert!(!old.conn.is_reinstated(), "another group: another nexus");
        assert_eq!(s.session_count(), 2);
    }

    #[test]
    fn reinstatement_ends_the_old_session_and_its_late_writes() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let mut old = Peer::new(s.clone(), 0);
        old.login_normal(&[("ImmediateData", "Yes"), ("InitialR2T", "Yes")]);
        let mut other_isid = Peer::new(s.clone(), 0);
        other_isid.isid = [0x80, 0, 0, 0, 0, 2];
        other_isid.login_normal(&[]);
        let mut other_portal = Peer::new(s.clone(), 1);
        other_portal.login_normal(&[]);
        assert_eq!(s.session_count(), 3);
        // The old connection's write was sent, but not read yet.
        let c = old.command(&write10_cdb(7, 1), false, true, 512, true);
        let mut late = Vec::new();
        crate::wire::iscsi::encode_pdu(
            &mut late,
            &PduHeader::ScsiCommand(c),
            &[0xee; 512],
            old.digests,
        );
        let mut new = Peer::new(s.clone(), 0);
        new.login_normal(&[]);
        assert_eq!(s.session_count(), 3, "the old session was replaced");
        assert!(old.conn.is_reinstated());
        assert!(!other_isid.conn.is_reinstated());
        assert!(!other_portal.conn.is_reinstated());
        let answer = old.send_raw(&late);
        assert!(answer.is_empty(), "{answer:?}");
        assert!(old.conn.is_closed());
        let mut back = vec![0u8; 512];
        s.luns[0].read(7 * 512, &mut back);
        assert_eq!(back, vec![0u8; 512], "the late write did not run");
        drop(old);
        assert_eq!(s.session_count(), 3, "the new session stays");
        drop(new);
        assert_eq!(s.session_count(), 2);
    }

    #[test]
    fn write_with_unsolicited_data_and_r2ts() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let mut p = Peer::new(s.clone(), 0);
        p.login_normal(&[
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("FirstBurstLength", "1024"),
            ("MaxBurstLength", "2048"),
            ("MaxOutstandingR2T", "2"),
            ("MaxRecvDataSegmentLength", "65536"),
        ]);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let c = p.command(&write10_cdb(0, 16), false, true, 8192, false);
        // 512 immediate + 512 unsolicited Data-Out = FirstBurstLength.
        assert!(p
            .send(PduHeader::ScsiCommand(c.clone()), &data[..512])
            .is_empty());
        let dout = |offset: u32, ttt: u32, final_bit: bool, sn: u32| {
            PduHeader::DataOut(DataOut {
                final_bit,
                lun: 0,
                itt: c.itt,
                ttt,
                exp_stat_sn: Sn(0),
                data_sn: Sn(sn),
                buffer_offset: offset,
            })
        };
        let pdus = p.send(dout(512, RESERVED_TAG, true, 0), &data[512..1024]);
        // Two R2Ts (MaxOutstandingR2T), each at most MaxBurstLength.
        let r2ts: Vec<R2t> = pdus
            .iter()
            .map(|(h, _)| match h {
                PduHeader::R2t(r) => r.clone(),
                o => panic!("{o:?}"),
            })
            .collect();
        assert_eq!(r2ts.len(), 2);
        assert_eq!(
            (r2ts[0].buffer_offset, r2ts[0].desired_len, r2ts[0].r2t_sn),
            (1024, 2048, Sn(0))
        );
        assert_eq!(
            (r2ts[1].buffer_offset, r2ts[1].desired_len, r2ts[1].r2t_sn),
            (3072, 2048, Sn(1))
        );
        let mut all = Vec::new();
        let mut queue: std::collections::VecDeque<R2t> = r2ts.into();
        while let Some(r) = queue.pop_front() {
            // Answer each R2T in two Data-Outs.
            let half = r.desired_len / 2;
            let o = r.buffer_offset as usize;
            assert!(p
                .send(
                    dout(r.buffer_offset, r.ttt, false, 0),
                    &data[o..o + half as usize]
                )
                .is_empty());
            let out = p.send(
                dout(r.buffer_offset + half, r.ttt, true, 1),
                &data[o + half as usize..o + r.desired_len as usize],
            );
            for (h, _) in out {
                match h {
                    PduHeader::R2t(r) => queue.push_back(r),
                    other => all.push(other),
                }
            }
        }
        assert_eq!(all.len(), 1);
        let PduHeader::ScsiResponse(resp) = &all[0] else {
            panic!()
        };
        assert_eq!((resp.status, resp.exp_data_sn), (status::GOOD, Sn(4)));
        let mut back = vec![0u8; 8192];
        s.luns[0].read(0, &mut back);
        assert_eq!(back, data);
    }

    #[test]
    fn bad_lba_and_bad_opcode_give_sense() {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        p.login_normal(&[]);
        expect_sense(&p.read10(2048, 1), 0x05, 0x21, 0x00);
        let c = p.command(&[0xee], false, false, 0, true);
        expect_sense(&p.send(PduHeader::ScsiCommand(c), &[]), 0x05, 0x20, 0x00);
        // A failing write whose unsolicited data follows answers after the data.
        let c = p.command(&write10_cdb(4096, 1), false, true, 512, false);
        assert!(p.send(PduHeader::ScsiCommand(c.clone()), &[]).is_empty());
        let pdus = p.send(
            PduHeader::DataOut(DataOut {
                final_bit: true,
                lun: 0,
                itt: c.itt,
                ttt: RESERVED_TAG,
                exp_stat_sn: Sn(0),
                data_sn: Sn(0),
                buffer_offset: 0,
            }),
            &[0u8; 512],
        );
        expect_sense(&pdus, 0x05, 0x21, 0x00);
    }

    #[test]
    fn data_sn_out_of_order_closes_the_connection() {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        p.login_normal(&[("InitialR2T", "No"), ("ImmediateData", "No")]);
        let c = p.command(&write10_cdb(0, 2), false, true, 1024, false);
        assert!(p.send(PduHeader::ScsiCommand(c.clone()), &[]).is_empty());
        let pdus = p.send(
            PduHeader::DataOut(DataOut {
                final_bit: false,
                lun: 0,
                itt: c.itt,
                ttt: RESERVED_TAG,
                exp_stat_sn: Sn(0),
                data_sn: Sn(1),
                buffer_offset: 0,
            }),
            &[0u8; 512],
        );
        assert!(pdus.is_empty());
        assert!(p.conn.is_closed());
        assert!(p.conn.close_reason().unwrap().contains("DataSN"));
    }

    #[test]
    fn cmd_window_advances_and_drops_outside_commands() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20).queue_depth(4));
        let mut p = Peer::new(s, 0);
        p.login_normal(&[("InitialR2T", "Yes")]);
        let tur = |p: &mut Peer| {
            let c = p.command(&[0x00], false, false, 0, true);
            p.send(PduHeader::ScsiCommand(c), &[])
        };
        let pdus = tur(&mut p);
        let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
            panic!()
        };
        assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (Sn(101), Sn(104)));
        let stat = r.stat_sn;
        // A write waiting for R2T data holds a slot: MaxCmdSN does not move on.
        let c = p.command(&write10_cdb(0, 1), false, true, 512, true);
        let pdus = p.send(PduHeader::ScsiCommand(c.clone()), &[]);
        let (PduHeader::R2t(r2t), _) = &pdus[0] else {
            panic!()
        };
        assert_eq!((r2t.exp_cmd_sn, r2t.max_cmd_sn), (Sn(102), Sn(104)));
        assert_eq!(r2t.stat_sn, stat.next(), "R2T does not consume StatSN");
        // A duplicate CmdSN is dropped silently.
        let mut dup = p.command(&[0x00], false, false, 0, true);
        dup.cmd_sn = Sn(100);
        p.cmd_sn = Sn(102);
        assert!(p.send(PduHeader::ScsiCommand(dup), &[]).is_empty());
        // Beyond MaxCmdSN too.
        let mut far = p.command(&[0x00], false, false, 0, true);
        far.cmd_sn = Sn(200);
        p.cmd_sn = Sn(102);
        assert!(p.send(PduHeader::ScsiCommand(far), &[]).is_empty());
        let pdus = p.send(
            PduHeader::DataOut(DataOut {
                final_bit: true,
                lun: 0,
                itt: c.itt,
                ttt: r2t.ttt,
                exp_stat_sn: Sn(0),
                data_sn: Sn(0),
                buffer_offset: 0,
            }),
            &[1u8; 512],
        );
        let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
            panic!()
        };
        assert_eq!(
            (r.exp_cmd_sn, r.max_cmd_sn, r.stat_sn),
            (Sn(102), Sn(105), stat.next())
        );
        let pdus = tur(&mut p);
        let (PduHeader::ScsiResponse(r), _) = &pdus[0] else {
            panic!()
        };
        assert_eq!((r.exp_cmd_sn, r.max_cmd_sn), (Sn(103), Sn(106)));
    }

    #[test]
    fn nop_pings_both_ways() {
        let cfg = TargetConfig::ram(IQN, 1 << 20).nop_in_interval(Some(Duration::from_secs(5)));
        let mut p = Peer::new(shared(cfg), 0);
        p.login_normal(&[]);
        let t0 = p.now;
        assert_eq!(p.conn.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        p.conn.handle_timeout(t0 + Duration::from_secs(5));
        let pdus = p.send_raw(&[]);
        let (PduHeader::NopIn(ping), _) = &pdus[0] else {
            panic!()
        };
        assert_eq!(ping.itt, RESERVED_TAG);
        // Answered: no close at the next deadline.
        p.send(
            PduHeader::NopOut(NopOut {
                immediate: true,
                lun: 0,
                itt: RESERVED_TAG,
                ttt: ping.ttt,
                cmd_sn: p.cmd_sn,
                exp_stat_sn: Sn(0),
            }),
            &[],
        );
        assert!(!p.conn.is_closed());
        p.now = t0 + Duration::from_secs(6);
        p.send_raw(&[]);
        p.conn.handle_timeout(t0 + Duration::from_secs(11));
        assert_eq!(p.send_raw(&[]).len(), 1, "second ping");
        p.conn.handle_timeout(t0 + Duration::from_secs(17));
        assert!(p.conn.is_closed(), "unanswered ping closes");
    }

    #[test]
    fn malformed_pdus_get_reject_or_close() {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        p.login_normal(&[]);
        let mut bad = [0u8; 48];
        bad[0] = 0x1c; // no such opcode
        let pdus = p.send_raw(&bad);
        assert!(
            matches!(&pdus[0], (PduHeader::Reject(r), d) if r.reason == reject::PROTOCOL_ERROR && d.len() == 48)
        );
        // A target-only opcode from the initiator.
        bad[0] = 0x21;
        let pdus = p.send_raw(&bad);
        assert!(matches!(&pdus[0].0, PduHeader::Reject(_)));
        assert!(!p.conn.is_closed());
        // SNACK is not supported at ERL 0.
        bad[0] = 0x10;
        assert!(
            matches!(&p.send_raw(&bad)[0].0, PduHeader::Reject(r) if r.reason == reject::SNACK)
        );
        // A data segment beyond our MaxRecvDataSegmentLength ends the connection.
        bad[0] = 0x00;
        bad[5] = 0x7f;
        p.send_raw(&bad);
        assert!(p.conn.is_closed());
        // Garbage during login closes without a panic.
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        p.send_raw(&[0x25; 100]);
        assert!(p.conn.is_closed());
    }

    /// A TMF request from `p` (immediate, at the next CmdSN).
    fn tmf_req(p: &Peer, function: u8, referenced: u32, ref_cmd_sn: Sn) -> PduHeader {
        PduHeader::TaskMgmtRequest(TaskMgmtRequest {
            immediate: true,
            function,
            lun: 0,
            itt: 0x700,
            referenced_task_tag: referenced,
            cmd_sn: p.cmd_sn,
            exp_stat_sn: Sn(0),
            ref_cmd_sn,
            exp_data_sn: Sn(0),
        })
    }

    fn data_out(itt: u32, ttt: u32) -> PduHeader {
        PduHeader::DataOut(DataOut {
            final_bit: true,
            lun: 0,
            itt,
            ttt,
            exp_stat_sn: Sn(0),
            data_sn: Sn(0),
            buffer_offset: 0,
        })
    }

    /// A write waiting for its data (R2T) on session `b`; returns (ITT, TTT).
    fn write_waiting_for_data(b: &mut Peer, lba: u32) -> (u32, u32) {
        let c = b.command(&write10_cdb(lba, 1), false, true, 512, true);
        let itt = c.itt;
        let pdus = b.send(PduHeader::ScsiCommand(c), &[]);
        let [(PduHeader::R2t(r2t), _)] = &pdus[..] else {
            panic!("{pdus:?}")
        };
        (itt, r2t.ttt)
    }

    /// The fence steps that stop writes the target holds: LOGICAL UNIT
    /// RESET through another session (another I_T nexus) and a target
    /// reset end a write that waits for its Data-Out, which then never
    /// lands and gets no status; ABORT TASK SET of the write's own session
    /// does too; ABORT TASK SET of another session does not (it is per
    /// I_T nexus).
    #[test]
    fn resets_and_abort_task_set_stop_writes_waiting_for_data() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let mut a = Peer::new(s.clone(), 0);
        a.login_normal(&[]);
        let mut b = Peer::new(s.clone(), 1);
        b.isid = [0x80, 0, 0, 0, 0, 2];
        b.login_normal(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
        let landed = |lba: u64| {
            let mut back = vec![0u8; 512];
            s.luns[0].read(lba * 512, &mut back);
            back != vec![0u8; 512]
        };
        // ABORT TASK SET of another nexus leaves b's write alone.
        let (itt, ttt) = write_waiting_for_data(&mut b, 1);
        let h = tmf_req(&a, tmf::ABORT_TASK_SET, 0, a.cmd_sn);
        assert!(matches!(&a.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
        let pdus = b.send(data_out(itt, ttt), &[0xee; 512]);
        assert!(
            matches!(&pdus[..], [(PduHeader::ScsiResponse(r), _)] if r.status == 0),
            "{pdus:?}"
        );
        assert!(landed(1));
        // Its own ABORT TASK SET ends it.
        let (itt, ttt) = write_waiting_for_data(&mut b, 2);
        let h = tmf_req(&b, tmf::ABORT_TASK_SET, 0, b.cmd_sn);
        assert!(matches!(&b.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
        assert!(b.send(data_out(itt, ttt), &[0xee; 512]).is_empty());
        assert!(!landed(2), "aborted by its own session's ABORT TASK SET");
        // LUN RESET through a: b's write never lands and gets no status.
        let (itt, ttt) = write_waiting_for_data(&mut b, 3);
        let h = tmf_req(&a, tmf::LOGICAL_UNIT_RESET, 0, a.cmd_sn);
        assert!(matches!(&a.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
        assert!(b.send(data_out(itt, ttt), &[0xee; 512]).is_empty());
        assert!(!landed(3), "aborted by a LUN reset through another session");
        // Target warm reset through a, likewise.
        let (itt, ttt) = write_waiting_for_data(&mut b, 4);
        let h = tmf_req(&a, tmf::TARGET_WARM_RESET, 0, a.cmd_sn);
        assert!(matches!(&a.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
        assert!(b.send(data_out(itt, ttt), &[0xee; 512]).is_empty());
        assert!(!landed(4), "aborted by a target reset");
        // A write started after the reset runs.
        let (itt, ttt) = write_waiting_for_data(&mut b, 5);
        let pdus = b.send(data_out(itt, ttt), &[0xee; 512]);
        assert!(
            matches!(&pdus[..], [(PduHeader::ScsiResponse(_), _)]),
            "{pdus:?}"
        );
        assert!(landed(5));
    }

    /// ABORT TASK of a command the target has not received yet (its CmdSN
    /// is inside the window, below the TMF's: it is still on its way, e.g.
    /// on another connection) is answered "function complete", and the
    /// command, when it arrives, is dropped: not executed, not answered
    /// (RFC 7143 §11.5.1). The CmdSN still advances.
    #[test]
    fn a_command_aborted_before_it_arrived_is_never_executed() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let mut p = Peer::new(s.clone(), 0);
        p.login_normal(&[("ImmediateData", "Yes"), ("InitialR2T", "No")]);
        // The write takes CmdSN n; the TMF goes out at n + 1 before it.
        let c = p.command(&write10_cdb(7, 1), false, true, 512, true);
        let h = tmf_req(&p, tmf::ABORT_TASK, c.itt, c.cmd_sn);
        assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
        assert!(
            p.send(PduHeader::ScsiCommand(c), &[0xee; 512]).is_empty(),
            "dropped, unanswered"
        );
        let mut back = vec![0u8; 512];
        s.luns[0].read(7 * 512, &mut back);
        assert_eq!(back, vec![0u8; 512], "the aborted write did not land");
        // The next command runs normally (its CmdSN follows on).
        let c = p.command(&write10_cdb(8, 1), false, true, 512, true);
        let pdus = p.send(PduHeader::ScsiCommand(c), &[0xee; 512]);
        assert!(
            matches!(&pdus[..], [(PduHeader::ScsiResponse(r), _)] if r.status == 0),
            "{pdus:?}"
        );
        s.luns[0].read(8 * 512, &mut back);
        assert_eq!(back, vec![0xee; 512]);
    }

    #[test]
    fn task_management_and_faults() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20).unit_attentions(true));
        let mut p = Peer::new(s.clone(), 0);
        p.login_normal(&[("InitialR2T", "Yes")]);
        // UNIT ATTENTION once, and INQUIRY does not consume it.
        let c = p.command(&[0x12, 0, 0, 0, 36], true, false, 36, true);
        assert!(matches!(
            &p.send(PduHeader::ScsiCommand(c), &[])[0].0,
            PduHeader::DataIn(_)
        ));
        let c = p.command(&[0x00], false, false, 0, true);
        expect_sense(&p.send(PduHeader::ScsiCommand(c), &[]), 0x06, 0x29, 0x00);
        let c = p.command(&[0x00], false, false, 0, true);
        assert!(
            matches!(&p.send(PduHeader::ScsiCommand(c), &[])[0].0, PduHeader::ScsiResponse(r) if r.status == 0)
        );
        // ABORT TASK of a write waiting for data.
        let c = p.command(&write10_cdb(0, 1), false, true, 512, true);
        assert!(matches!(
            &p.send(PduHeader::ScsiCommand(c.clone()), &[])[0].0,
            PduHeader::R2t(_)
        ));
        let tm = |p: &mut Peer, function, referenced| {
            PduHeader::TaskMgmtRequest(TaskMgmtRequest {
                immediate: true,
                function,
                lun: 0,
                itt: 77,
                referenced_task_tag: referenced,
                cmd_sn: p.cmd_sn,
                exp_stat_sn: Sn(0),
                ref_cmd_sn: c.cmd_sn,
                exp_data_sn: Sn(0),
            })
        };
        let h = tm(&mut p, tmf::ABORT_TASK, c.itt);
        assert!(
            matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0 && r.itt == 77)
        );
        // The same task again: answered already, so "task does not exist".
        let h = tm(&mut p, tmf::ABORT_TASK, c.itt);
        assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 1));
        // LUN RESET: a UNIT ATTENTION 29/03 once on every session.
        let mut other = Peer::new(s.clone(), 1);
        other.login_normal(&[]);
        let c2 = other.command(&[0x00], false, false, 0, true);
        expect_sense(
            &other.send(PduHeader::ScsiCommand(c2), &[]),
            0x06,
            0x29,
            0x00,
        );
        let h = tm(&mut p, tmf::LOGICAL_UNIT_RESET, 0);
        assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 0));
        let c2 = other.command(&[0x00], false, false, 0, true);
        expect_sense(
            &other.send(PduHeader::ScsiCommand(c2), &[]),
            0x06,
            0x29,
            0x03,
        );
        let c1 = p.command(&[0x00], false, false, 0, true);
        expect_sense(&p.send(PduHeader::ScsiCommand(c1), &[]), 0x06, 0x29, 0x03);
        let c1 = p.command(&[0x00], false, false, 0, true);
        assert!(
            matches!(&p.send(PduHeader::ScsiCommand(c1), &[])[0].0, PduHeader::ScsiResponse(r) if r.status == 0)
        );
        let h = tm(&mut p, 0x7f, 0);
        assert!(matches!(&p.send(h, &[])[0].0, PduHeader::TaskMgmtResponse(r) if r.response == 5));
        // Injected Reject and CHECK CONDITION, then normal service again.
        s.faults.reject_next_commands(1, 0x09);
        s.faults.check_condition_next(1, 0x03, 0x11, 0x00);
        let c = p.command(&[0x00], false, false, 0, true);
        assert!(
            matches!(&p.send(PduHeader::ScsiCommand(c), &[])[0].0, PduHeader::Reject(r) if r.reason == 0x09)
        );
        let c = p.command(&[0x00], false, false, 0, true);
        expect_sense(&p.send(PduHeader::ScsiCommand(c), &[]), 0x03, 0x11, 0x00);
        s.faults.drop_after_commands(2);
        let c = p.command(&[0x00], false, false, 0, true);
        assert_eq!(p.send(PduHeader::ScsiCommand(c), &[]).len(), 1);
        let c = p.command(&[0x00], false, false, 0, true);
        assert_eq!(
            p.send(PduHeader::ScsiCommand(c), &[]).len(),
            1,
            "the Nth command is answered"
        );
        assert!(p.conn.is_closed());
    }

    /// Regression (found by tests/system_sim.rs): a write that fails
    /// before its data arrives (here a UNIT ATTENTION) with immediate data
    /// and unsolicited Data-Out following must drain the Data-Out that
    /// continues after the immediate data, not close the connection.
    #[test]
    fn failed_write_with_immediate_data_drains_the_unsolicited_rest() {
        let s = shared(TargetConfig::ram(IQN, 1 << 20).unit_attentions(true));
        let mut p = Peer::new(s, 0);
        p.login_normal(&[("InitialR2T", "No"), ("ImmediateData", "Yes")]);
        let data = vec![0x5au8; 2048];
        let c = p.command(&write10_cdb(8, 4), false, true, 2048, false);
        assert!(p
            .send(PduHeader::ScsiCommand(c.clone()), &data[..1024])
            .is_empty());
        let pdus = p.send(
            PduHeader::DataOut(DataOut {
                final_bit: true,
                lun: 0,
                itt: c.itt,
                ttt: RESERVED_TAG,
                exp_stat_sn: Sn(0),
                data_sn: Sn(0),
                buffer_offset: 1024,
            }),
            &data[1024..],
        );
        assert!(!p.conn.is_closed(), "{:?}", p.conn.close_reason());
        expect_sense(&pdus, 0x06, 0x29, 0x00);
        // Nothing was written, and the connection goes on.
        let (read, _) = collect_data_in(&p.read10(8, 4));
        assert_eq!(read, vec![0u8; 2048]);
    }

    /// SPC-4: an ALUA state change is reported to every session, once, by
    /// UNIT ATTENTION 2A/06 (also with power-on/reset UAs off), so
    /// initiators re-read REPORT TARGET PORT GROUPS.
    /// Sends one PERSISTENT RESERVE OUT (parameter list as immediate data)
    /// and returns the status byte.
    fn pr_out(
        p: &mut Peer,
        action: crate::wire::scsi::pr::PrOutAction,
        t: Option<crate::wire::scsi::pr::PrType>,
        key: u64,
        sa_key: u64,
    ) -> u8 {
        use crate::wire::scsi::pr::{PrOutCdb, PrOutParams};
        use crate::wire::scsi::DataRepr;
        let cdb = PrOutCdb::new(action, t).emit();
        let params = PrOutParams {
            key,
            sa_key,
            ..Default::default()
        }
        .to_vec();
        let c = p.command(cdb.as_slice(), false, true, 24, true);
        let pdus = p.send(PduHeader::ScsiCommand(c), &params);
        match &pdus[..] {
            [(PduHeader::ScsiResponse(r), _)] => r.status,
            o => panic!("{o:?}"),
        }
    }

    fn pr_in(p: &mut Peer, action: crate::wire::scsi::pr::PrInAction) -> Vec<u8> {
        let cdb = crate::wire::scsi::pr::PrInCdb {
            action,
            alloc_len: 1024,
        }
        .emit();
        let c = p.command(cdb.as_slice(), true, false, 1024, true);
        collect_data_in(&p.send(PduHeader::ScsiCommand(c), &[])).0
    }

    /// Two I_T nexuses (ISIDs): registration, a WE-RO reservation, the
    /// conflict it gives the unregistered one, and PREEMPT AND ABORT
    /// stopping a write of the preempted nexus that waits for its data.
    #[test]
    fn persistent_reservations_per_nexus_and_preempt_and_abort() {
        use crate::wire::scsi::pr::{PrInAction, PrKeys, PrOutAction::*, PrReservation, PrType};
        use crate::wire::scsi::DataRepr;
        let s = shared(TargetConfig::ram(IQN, 1 << 20));
        let mut a = Peer::new(s.clone(), 0);
        a.login_normal(&[]);
        let mut b = Peer::new(s.clone(), 1);
        b.isid = [0x80, 0, 0, 0, 0, 2];
        b.login_normal(&[("ImmediateData", "No"), ("InitialR2T", "Yes")]);
        let we_ro = Some(PrType::WriteExclusiveRegistrantsOnly);
        assert_eq!(pr_out(&mut a, Register, None, 0, 0xaa), status::GOOD);
        assert_eq!(pr_out(&mut b, Register, None, 0, 0xbb), status::GOOD);
        assert_eq!(pr_out(&mut a, Reserve, we_ro, 0xaa, 0), status::GOOD);
        let keys = PrKeys::parse(&pr_in(&mut b, PrInAction::ReadKeys)).unwrap();
        assert_eq!(keys.keys, vec![0xaa, 0xbb]);
        let r = PrReservation::parse(&pr_in(&mut b, PrInAction::ReadReservation)).unwrap();
        assert_eq!(
            r.reservation.map(|h| (h.key, h.pr_type())),
            Some((0xaa, we_ro))
        );
        // b (registered) starts a write that waits for its data (R2T).
        let c = b.command(&write10_cdb(3, 1), false, true, 512, true);
        let itt = c.itt;
        let pdus = b.send(PduHeader::ScsiCommand(c), &[]);
        let [(PduHeader::R2t(r2t), _)] = &pdus[..] else {
            panic!("{pdus:?}")
        };
        let ttt = r2t.ttt;
        // a preempts b's key and aborts b's tasks.
        assert_eq!(
            pr_out(&mut a, PreemptAndAbort, we_ro, 0xaa, 0xbb),
            status::GOOD
        );
        let late = PduHeader::DataOut(DataOut {
            final_bit: true,
            lun: 0,
            itt,
            ttt,
            exp_stat_sn: Sn(0),
            data_sn: Sn(0),
            buffer_offset: 0,
        });
        assert!(b.send(late, &[0xee; 512]).is_empty(), "aborted: no status");
        let mut back = vec![0u8; 512];
        s.luns[0].read(3 * 512, &mut back);
        assert_eq!(back, vec![0u8; 512], "the aborted write did not land");
        // b is no longer registered: its writes conflict, its reads do not.
        let c = b.command(&write10_cdb(3, 1), false, true, 512, true);
        let pdus = b.send(PduHeader::ScsiCommand(c), &[]);
        let [(PduHeader::ScsiResponse(r), _)] = &pdus[..] else {
            panic!("{pdus:?}")
        };
        assert_eq!(r.status, 0x18, "RESERVATION CONFLICT");
        assert_eq!(collect_data_in(&b.read10(3, 1)).0.len(), 512);
        assert_eq!(
            PrKeys::parse(&pr_in(&mut a, PrInAction::ReadKeys))
                .unwrap()
                .keys,
            vec![0xaa]
        );
        // a unregistered nexus may not CLEAR; a may, and then b writes.
        assert_eq!(pr_out(&mut b, Clear, None, 0xbb, 0), 0x18);
        assert_eq!(pr_out(&mut a, Release, we_ro, 0xaa, 0), status::GOOD);
        assert_eq!(pr_out(&mut a, Clear, None, 0xaa, 0), status::GOOD);
        let c = b.command(&write10_cdb(3, 1), false, true, 512, true);
        let pdus = b.send(PduHeader::ScsiCommand(c.clone()), &[]);
        assert!(matches!(&pdus[..], [(PduHeader::R2t(_), _)]), "{pdus:?}");
    }

    #[test]
    fn alua_change_raises_one_unit_attention_per_session() {
        let cfg = TargetConfig::ram(IQN, 1 << 20)
            .portal_in_group("10.0.0.1:3260".parse().unwrap(), 1)
            .portal_in_group("10.0.1.1:3260".parse().unwrap(), 2);
        let s = shared(cfg);
        let mut a = Peer::new(s.clone(), 0);
        a.login_normal(&[]);
        let mut b = Peer::new(s.clone(), 1);
        b.login_normal(&[]);
        collect_data_in(&a.read10(0, 1));
        s.set_alua_state(1, crate::target::AluaState::ActiveNonOptimized)
            .unwrap();
        expect_sense(&a.read10(0, 1), 0x06, 0x2a, 0x06);
        collect_data_in(&a.read10(0, 1));
        expect_sense(&b.read10(0, 1), 0x06, 0x2a, 0x06);
        collect_data_in(&b.read10(0, 1));
        // The same state again is no change.
        s.set_alua_state(1, crate::target::AluaState::ActiveNonOptimized)
            .unwrap();
        collect_data_in(&a.read10(0, 1));
        // A session that logs in after a change has nothing to hear.
        let mut c = Peer::new(s.clone(), 1);
        c.login_normal(&[]);
        collect_data_in(&c.read10(0, 1));
    }

    #[test]
    fn login_text_may_span_pdus() {
        let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
        let text = b"InitiatorName=iqn.x\0TargetName=iqn.2024-01.test:target\0";
        let req = |cont, transit| {
            PduHeader::LoginRequest(LoginRequest {
                transit,
                cont,
                csg: Stage::Operational,
                nsg: Stage::FullFeature,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 0,
                itt: 1,
                cid: 0,
                cmd_sn: Sn(1),
                exp_stat_sn: Sn(0),
            })
        };
        let pdus = p.send(req(true, false), &text[..10]);
        assert!(matches!(&pdus[0], (PduHeader::LoginResponse(r), d) if d.is_empty() && !r.transit));
        let pdus = p.send(req(false, true), &text[10..]);
        assert!(
            matches!(&pdus[0].0, PduHeader::LoginResponse(r) if r.status_class == 0 && r.transit)
        );
        assert!(p.conn.is_full_feature());
    }

    #[test]
    fn small_limits_still_work() {
        let limits = TargetLimits {
            max_recv_data_segment_len: 512,
            max_burst_len: 512,
            first_burst_len: 512,
            max_outstanding_r2t: 1,
            ..TargetLimits::default()
        };
        let s = shared(TargetConfig::ram(IQN, 1 << 20).limits(limits));
        let mut p = Peer::new(s, 0);
        let t = p.login_normal(&[("MaxBurstLength", "262144"), ("InitialR2T", "No")]);
        assert_eq!(t.get("MaxRecvDataSegmentLength"), Some("512"));
        assert_eq!(t.get("MaxBurstLength"), Some("512"));
    }

    proptest! {
        /// No byte sequence from the initiator panics the target, in login or later.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), after_login: bool) {
            let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
            if after_login {
                p.login_normal(&[]);
            }
            p.conn.receive(&bytes, p.now);
            p.conn.clear_output();
        }

        /// Valid-looking headers with random fields never panic either.
        #[test]
        fn arbitrary_headers_never_panic(mut hdr in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform16(any::<u8>()),
                                         op in proptest::sample::select(vec![0x00u8, 0x01, 0x02, 0x04, 0x05, 0x06, 0x10])) {
            let mut p = Peer::new(shared(TargetConfig::ram(IQN, 1 << 20)), 0);
            p.login_normal(&[]);
            hdr[0] = op | (hdr[0] & 0x40);
            hdr[4] = 0;
            hdr[5] = 0;
            hdr[6] &= 0x03;
            let mut pdu = hdr.to_vec();
            pdu.extend_from_slice(&tail);
            let dsl = u32::from_be_bytes([0, hdr[5], hdr[6], hdr[7]]) as usize;
            pdu.resize(48 + dsl + pad_len(dsl), 0x5a);
            p.conn.receive(&pdu, p.now);
        }
    }

    /// MC/S and error recovery (src/target/conn/tests/mcs.rs).
    mod mcs;
}
