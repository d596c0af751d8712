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
    digest, pad_len, Bhs, DataIn, DataOut, Digests, IscsiWireError, LoginRequest, LoginResponse,
    LogoutRequest, LogoutResponse, NopIn, NopOut, PduFramer, PduHeader, R2t, Reject, ScsiCommand,
    ScsiResponse, Sn, Snack, Stage, TaskMgmtRequest, TaskMgmtResponse, TextRequest, TextResponse,
    BHS_LEN, RESERVED_TAG,
};
use crate::wire::text::TextPairs;

use super::fault::AsyncEvent;
use super::lun::SharedChunk;
use super::scsi::{self, ParamCommand, Plan, Port, Sense};
use super::session::{closing, Gate, Session};
use super::strict::{self, Rule, Violation};
use super::SharedTarget;
use crate::transport::TxPart;
use crate::wire::scsi::{ScsiStatus, SenseKey};
// For the submodules' `super::pr` and `super::JoinRefusal`.
use super::{pr, JoinRefusal};
use crate::wire::iscsi::AsyncMessage;

mod checks;
mod events;
mod io;
mod login;
mod output;
mod recovery;
mod text;
mod tmf;

use output::{push_pdu_by_reference, push_pdu_with};

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
    /// The command's CmdSN and operation code (the execution log).
    cmd_sn: Sn,
    opcode: u8,
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

impl WriteTask {
    /// The DataSN the next Data-Out of the sequence with TTT `ttt` must
    /// carry: DataSN counts from 0 in each sequence.
    fn expected_data_sn(&self, ttt: u32) -> Sn {
        if self.sequence_ttt == Some(ttt) {
            self.next_data_sn
        } else {
            Sn(0)
        }
    }
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
    /// When it stops waiting: DefaultTime2Wait + DefaultTime2Retain (as
    /// negotiated for the session) after its connection ended. Then it is
    /// ended, and data that comes for it later never lands.
    expires: Instant,
}

impl Orphan {
    pub(crate) fn itt(&self) -> u32 {
        self.itt
    }

    pub(crate) fn expires(&self) -> Instant {
        self.expires
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

/// A piece of the LU's bytes lent to the output: `buf[start..start + len]`
/// goes out after byte `at` of `Core::out`.
#[derive(Debug)]
struct OutRef {
    at: usize,
    buf: SharedChunk,
    start: usize,
    len: usize,
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
    /// Data-In payload lent by the LU (by reference), each spliced into
    /// the output at byte `at` of `out`; empty unless `data_in_by_reference`.
    out_refs: Vec<OutRef>,
    /// Bytes in `out_refs`.
    out_ref_bytes: usize,
    /// Data-In payload of a LU goes out by reference (`out_refs`) instead
    /// of being copied into `out`.
    data_in_by_reference: bool,
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
                out_refs: Vec::new(),
                out_ref_bytes: 0,
                data_in_by_reference: false,
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

    /// Bytes to send to the initiator; all of them unless Data-In goes out
    /// by reference ([`set_data_in_by_reference`](Self::set_data_in_by_reference)),
    /// whose payload only [`output_parts`](Self::output_parts) shows.
    pub fn output(&self) -> &[u8] {
        &self.core.out
    }

    /// Lets a READ's Data-In payload go out by reference to the LU's
    /// bytes ([`Lun::read_shared`](super::lun::Lun::read_shared)) instead
    /// of copying it into the output: for a driver that sends
    /// [`output_parts`](Self::output_parts) (the userspace stack queues
    /// them on TCP without a copy, so the payload is copied once, from the
    /// LU into the frames). Headers, digests, padding and every other PDU
    /// stay in [`output`](Self::output).
    pub fn set_data_in_by_reference(&mut self, on: bool) {
        self.core.data_in_by_reference = on;
    }

    /// The output, in order: owned bytes and ranges of the LU's buffers.
    pub fn output_parts(&self) -> impl Iterator<Item = TxPart<'_>> + '_ {
        let (out, refs) = (&self.core.out, &self.core.out_refs);
        let (mut pos, mut next) = (0usize, 0usize);
        std::iter::from_fn(move || match refs.get(next) {
            Some(r) if pos < r.at => {
                let bytes = &out[pos..r.at];
                pos = r.at;
                Some(TxPart::Bytes(bytes))
            }
            Some(r) => {
                next += 1;
                Some(TxPart::Shared {
                    buf: &r.buf,
                    start: r.start,
                    len: r.len,
                })
            }
            None if pos < out.len() => {
                let bytes = &out[pos..];
                pos = out.len();
                Some(TxPart::Bytes(bytes))
            }
            None => None,
        })
    }

    /// Bytes in [`output_parts`](Self::output_parts).
    pub fn output_len(&self) -> usize {
        self.core.out.len() + self.core.out_ref_bytes
    }

    /// Call after the output was written; keeps the capacity.
    pub fn clear_output(&mut self) {
        self.core.out.clear();
        self.core.out_refs.clear();
        self.core.out_ref_bytes = 0;
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
        let orphans = self
            .core
            .session
            .as_ref()
            .and_then(|s| s.orphans_expire_at());
        [ping, self.core.logout_due, orphans]
            .into_iter()
            .flatten()
            .min()
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
        self.core.expire_orphans(now);
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
        self.core.expire_orphans(now);
        self.core.poll_async(now);
        self.core.logout_overdue(now);
    }
}

impl Drop for TargetConn {
    fn drop(&mut self) {
        self.core.release();
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
                PduHeader::TaskMgmtRequest(t)
                    if t.function == crate::wire::iscsi::tmf::TASK_REASSIGN =>
                {
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
mod tests;
