//! The target side of one iSCSI connection, sans-IO: the driver reads bytes
//! into [`TargetConn::recv_buffer`], calls [`TargetConn::received`], writes
//! [`TargetConn::output`] and calls [`TargetConn::clear_output`]; timers go
//! through [`TargetConn::poll_timeout`]/[`TargetConn::handle_timeout`].
//! Nothing here reads a clock or a socket.
//!
//! Error recovery level 0, one connection per session. Malformed PDUs are
//! answered with Reject where the stream can continue, otherwise the
//! connection closes with a reason ([`TargetConn::close_reason`]).

use std::net::SocketAddr;
use std::time::Instant;

use crate::iscsi::chap;
use crate::iscsi::params::{respond, Params};
use crate::wire::iscsi::{
    digest, pad_len, tmf, Bhs, DataIn, DataOut, Digests, IscsiWireError, LoginRequest,
    LoginResponse, LogoutRequest, LogoutResponse, NopIn, NopOut, PduFramer, PduHeader, R2t,
    Reject, ScsiCommand, ScsiResponse, Sn, Stage, TaskMgmtRequest, TaskMgmtResponse, TextRequest,
    TextResponse, BHS_LEN, RESERVED_TAG,
};
use crate::wire::text::TextPairs;

use super::scsi::{self, status, ParamCommand, Plan, Port, Sense};
use super::SharedTarget;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Login,
    FullFeature,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod negotiated yet.
    NotStarted,
    /// AuthMethod=CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapResponse { id: u8, challenge: [u8; 16] },
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
    error: Option<Sense>,
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
    /// Per LUN index: a UNIT ATTENTION is still to be reported.
    unit_attention: Vec<bool>,
    last_rx: Instant,
    ping: Option<(u32, Instant)>,
}

impl TargetConn {
    /// A new connection on portal index `portal` of `shared`.
    pub fn new(shared: SharedTarget, portal: usize, now: Instant) -> TargetConn {
        let ours = shared.config.limits.max_recv_data_segment_len;
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
                last_rx: now,
                ping: None,
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

    pub fn initiator_name(&self) -> &str {
        &self.core.initiator_name
    }

    /// The negotiated parameters (initiator's view of the names; see [`Params`]).
    pub fn params(&self) -> &Params {
        &self.core.params
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let interval = self.core.shared.config.nop_in_interval?;
        if self.core.phase != Phase::FullFeature {
            return None;
        }
        Some(match self.core.ping {
            Some((_, sent)) => sent + interval,
            None => self.core.last_rx + interval,
        })
    }

    /// Runs timers: sends a NOP-In ping on an idle connection, or closes
    /// one whose ping went unanswered for a whole interval.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else {
            return;
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

    fn process(&mut self, now: Instant) {
        while self.core.phase != Phase::Closed && self.rx_start < self.rx_end {
            let avail = &self.rx[self.rx_start..self.rx_end];
            match self.core.framer.frame(avail) {
                Ok(None) => break,
                Ok(Some(f)) => {
                    let bhs = &avail[..BHS_LEN];
                    let data = &avail[f.data.clone()];
                    self.core.handle(&f.header, bhs, data, now);
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
        Sink::Params { buf, .. } => {
            let at = at as usize;
            if at < buf.len() {
                let n = data.len().min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&data[..n]);
            }
        }
        Sink::Discard => {}
    }
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

    /// CmdSN rules (RFC 7143 §3.2.2.1): immediate PDUs pass; others must lie
    /// in [ExpCmdSN, MaxCmdSN] and advance ExpCmdSN; duplicates and
    /// out-of-window ones are dropped.
    fn accept_cmd_sn(&mut self, immediate: bool, cmd_sn: Sn) -> bool {
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
        match self.phase {
            Phase::Login => match h {
                PduHeader::LoginRequest(r) => self.on_login(r, data),
                other => self.close(format!("{} PDU during login", other.opcode())),
            },
            Phase::FullFeature => match h {
                PduHeader::ScsiCommand(c) => self.on_scsi_command(c, bhs, data),
                PduHeader::DataOut(d) => self.on_data_out(d, bhs, data),
                PduHeader::NopOut(n) => self.on_nop_out(n, data, now),
                PduHeader::TextRequest(t) => self.on_text(t, bhs, data),
                PduHeader::TaskMgmtRequest(t) => self.on_task_mgmt(t),
                PduHeader::LogoutRequest(l) => self.on_logout(l),
                PduHeader::Snack(_) => self.reject(reject::SNACK, bhs),
                _ => self.reject(reject::PROTOCOL_ERROR, bhs),
            },
            Phase::Closed => {}
        }
    }

    // ------------------------------------------------------------ login

    fn login_fail(&mut self, r: &LoginRequest, class: u8, detail: u8, why: &str) {
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
        self.emit(&h, &[]);
        self.close(format!("login failed: {why}"));
    }

    fn login_respond(&mut self, r: &LoginRequest, transit: bool, nsg: Stage, tsih: u16, text: &[u8]) {
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
            self.max_cmd_sn = r.cmd_sn.add(self.shared.config.queue_depth.max(1) - 1);
            if r.version_min > 0 {
                return self.login_fail(r, 0x02, 0x05, "unsupported iSCSI version");
            }
            if let Some((class, detail)) = self.shared.faults.login_refusal(self.portal) {
                return self.login_fail(r, class, detail, "refused by fault injection");
            }
            if r.tsih != 0 {
                return self.login_fail(r, 0x02, 0x0a, "session does not exist (TSIH given)");
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
                Err(why) => return self.login_fail(r, 0x02, 0x01, &why),
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
        if transit && r.nsg == Stage::FullFeature {
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
        let ours: String = match key {
            "HeaderDigest" | "DataDigest" => {
                if l.allow_digests {
                    "None,CRC32C".into()
                } else {
                    "None".into()
                }
            }
            "MaxConnections" => "1".into(),
            "InitialR2T" => yes_no(l.initial_r2t).into(),
            "ImmediateData" => yes_no(l.immediate_data).into(),
            "MaxBurstLength" => l.max_burst_len.to_string(),
            "FirstBurstLength" => l.first_burst_len.to_string(),
            "DefaultTime2Wait" => "0".into(),
            "DefaultTime2Retain" => "0".into(),
            "MaxOutstandingR2T" => l.max_outstanding_r2t.to_string(),
            "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".into(),
            "ErrorRecoveryLevel" => "0".into(),
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
                if !algs.split(',').any(|a| a == chap::CHAP_MD5) {
                    reply.push("CHAP_A", "Reject");
                    return Err(format!("CHAP_A={algs} has no MD5"));
                }
                let id: u8 = rand::random();
                let challenge: [u8; 16] = rand::random();
                reply.push("CHAP_A", chap::CHAP_MD5);
                reply.push("CHAP_I", id.to_string());
                reply.push("CHAP_C", chap::encode_hex(&challenge));
                self.login.auth = Auth::ChapResponse { id, challenge };
            }
            Auth::ChapResponse { id, challenge } => {
                let cfg = chap_cfg.ok_or("CHAP is not configured")?;
                let (Some(name), Some(resp)) = (pairs.get("CHAP_N"), pairs.get("CHAP_R")) else {
                    return Err("CHAP_N/CHAP_R missing".into());
                };
                let resp = chap::decode_binary(resp).map_err(|e| e.to_string())?;
                if name != cfg.initiator.user
                    || chap::verify(id, &cfg.initiator.secret, &challenge, &resp).is_err()
                {
                    return Err(format!("CHAP response of user {name:?} does not verify"));
                }
                match (pairs.get("CHAP_I"), pairs.get("CHAP_C")) {
                    (Some(i), Some(c)) => {
                        let target = cfg.target.ok_or("mutual CHAP asked, but no target secret")?;
                        let i = chap::parse_identifier(i).map_err(|e| e.to_string())?;
                        let c = chap::decode_binary(c).map_err(|e| e.to_string())?;
                        if c == challenge {
                            return Err("initiator reflected our CHAP challenge".into());
                        }
                        reply.push("CHAP_N", target.user.clone());
                        reply.push(
                            "CHAP_R",
                            chap::encode_hex(&chap::response(i, &target.secret, &c)),
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
        self.digests = self.params.digests();
        self.framer = PduFramer {
            digests: self.digests,
            max_data_segment_len: self.params.max_recv_data_segment_len,
        };
        let ua = self.shared.config.unit_attention_on_login;
        self.unit_attention = vec![ua; self.shared.luns.len()];
        log::debug!(
            "login of {} complete: {:?} session, TSIH {}, {}",
            self.initiator_name,
            self.session_type,
            self.tsih,
            self.params
        );
    }

    // ------------------------------------------------------------ SCSI

    fn send_status(&mut self, itt: u32, status: u8, resid: Residual, exp_data_sn: Sn, sense: Option<Sense>) {
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
            residual: if resid.overflow || resid.underflow { resid.count } else { 0 },
        });
        match sense {
            None => self.emit(&h, &[]),
            Some(s) => {
                let mut data = [0u8; 2 + Sense::FIXED_LEN];
                data[1] = Sense::FIXED_LEN as u8;
                data[2..].copy_from_slice(&s.emit_fixed());
                self.emit(&h, &data);
            }
        }
    }

    fn send_check(&mut self, itt: u32, sense: Sense, exp_data_sn: Sn) {
        let none = residual(0, 0);
        self.send_status(itt, status::CHECK_CONDITION, none, exp_data_sn, Some(sense));
    }

    /// Data-In PDUs cut at the initiator's MaxRecvDataSegmentLength, the F
    /// bit at each MaxBurstLength, and GOOD status in the last one.
    fn send_data_in(&mut self, itt: u32, lun: u64, source: DataSource, transfer: u64, expected: u32) {
        let resid = residual(transfer, expected);
        let total = transfer.min(u64::from(expected)) as u32;
        if total == 0 {
            return self.send_status(itt, status::GOOD, resid, Sn(0), None);
        }
        let max_seg = self.params.max_xmit_data_segment_len.max(512);
        let burst = self.params.max_burst_len.max(512);
        let (exp, max) = self.window();
        let stat_sn = self.next_stat_sn();
        let Core {
            out,
            scratch,
            shared,
            digests,
            ..
        } = self;
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
            push_pdu_with(out, &h, len as usize, *digests, |buf| match source {
                DataSource::Lun { lun, offset: base } => {
                    shared.luns[lun].read(base + u64::from(offset), buf)
                }
                DataSource::Scratch => {
                    buf.copy_from_slice(&scratch[offset as usize..offset as usize + buf.len()])
                }
            });
            offset += len;
            data_sn = data_sn.next();
        }
    }

    fn on_scsi_command(&mut self, c: &ScsiCommand, bhs: &[u8], data: &[u8]) {
        if !self.accept_cmd_sn(c.immediate, c.cmd_sn) {
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
            })
        } else if let Some(ua) = lun_index
            .filter(|&i| self.unit_attention.get(i) == Some(&true))
            .filter(|_| !scsi::ignores_unit_attention(&c.cdb))
        {
            self.unit_attention[ua] = false;
            Plan::Check(Sense::POWER_ON_RESET)
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
                    self.start_write(c, &[], Sink::Discard, 0, Some(sense));
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

    fn start_write(&mut self, c: &ScsiCommand, data: &[u8], sink: Sink, transfer: u64, error: Option<Sense>) {
        if self.tasks.len() >= MAX_PENDING_WRITES {
            return self.close("too many write commands waiting for data");
        }
        let expected = if c.write { c.expected_data_len } else { 0 };
        let mut task = WriteTask {
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
            error,
        };
        if !data.is_empty() && expected > 0 {
            let n = data.len().min(expected as usize);
            store(&self.shared, &mut task.sink, 0, &data[..n]);
            task.received = n as u32;
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
        if t.received >= t.expected || (t.unsolicited_done && t.error.is_some()) {
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
            t.r2t_sn = t.r2t_sn.next();
            t.next_r2t_offset += len;
            t.outstanding_r2t += 1;
            crate::wire::iscsi::encode_pdu(&mut self.out, &h, &[], self.digests);
        }
    }

    fn complete_write(&mut self, task: WriteTask) {
        let r2ts = task.r2t_sn;
        if let Some(sense) = task.error {
            return self.send_check(task.itt, sense, r2ts);
        }
        let result = match task.sink {
            Sink::Params { lun, command, buf } => {
                scsi::finish_params(&self.shared, lun, command, &buf[..(task.received as usize).min(buf.len())])
            }
            Sink::Lun { .. } | Sink::Discard => Ok(()),
        };
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
        let end = u64::from(d.buffer_offset) + data.len() as u64;
        if end > u64::from(self.tasks[i].expected) {
            return self.reject(reject::INVALID_FIELD, bhs);
        }
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
        let echo = data.len().min(self.params.max_xmit_data_segment_len as usize);
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
        for (k, v) in pairs.iter() {
            if k == "SendTargets" {
                self.send_targets(v, &mut reply);
            } else {
                reply.push(k, "NotUnderstood");
            }
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
                if let Some(i) = self.tasks.iter().position(|w| w.itt == t.referenced_task_tag) {
                    self.tasks.swap_remove(i);
                    0
                } else if t.ref_cmd_sn.lt(t.cmd_sn) {
                    // Already answered: "function complete" (RFC 7143 §11.5.1).
                    0
                } else {
                    1
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LOGICAL_UNIT_RESET => {
                let known = scsi::decode_lun(t.lun).and_then(|n| self.shared.lun_index(n));
                if known.is_none() {
                    2
                } else {
                    self.tasks.retain(|w| w.lun_field != t.lun);
                    0
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.tasks.clear();
                0
            }
            tmf::CLEAR_ACA => 0,
            tmf::TASK_REASSIGN => 4,
            _ => 5,
        };
        let (exp, max) = self.window();
        let h = PduHeader::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt: t.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
        });
        self.emit(&h, &[]);
    }

    fn on_logout(&mut self, l: &LogoutRequest) {
        if !self.accept_cmd_sn(l.immediate, l.cmd_sn) {
            return;
        }
        let response = match l.reason {
            0 => 0,
            1 if l.cid == self.cid => 0,
            1 => 1,
            _ => 2,
        };
        let (exp, max) = self.window();
        let h = PduHeader::LogoutResponse(LogoutResponse {
            response,
            itt: l.itt,
            stat_sn: self.next_stat_sn(),
            exp_cmd_sn: exp,
            max_cmd_sn: max,
            time2wait: 0,
            time2retain: 0,
        });
        self.emit(&h, &[]);
        if response == 0 {
            self.tasks.clear();
            self.close("logout");
        }
    }
}

