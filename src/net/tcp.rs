//! The TCP state machine (RFC 9293) for one connection, sans-IO.
//!
//! The interface hands a socket every segment addressed to it
//! ([`TcpSocket::process`]) and asks it for segments to send
//! ([`TcpSocket::dispatch`]); the socket never reads a clock. Retransmission
//! follows RFC 6298 (RTO, backoff, Karn), loss recovery RFC 6582 NewReno
//! with SACK (RFC 2018) choosing what to resend, congestion control CUBIC
//! (RFC 9438) or NewReno, timestamps and window scaling RFC 7323.

use super::assembler::Assembler;
use super::congestion::{CongestionAlgorithm, CongestionController};
use super::ring::RingBuffer;
use super::rtt::RttEstimator;
use super::scoreboard::Scoreboard;
use crate::clock::{earliest, Instant};
use crate::wire::tcp::{SeqNumber, TcpFlags, TcpOptions, TcpRepr, TcpTimestamp, MAX_WINDOW_SCALE};
use send::SendBuffer;
pub use send::{SharedBytes, MAX_GATHER};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use thiserror::Error;

/// Why a socket call failed or a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TcpError {
    #[error("socket is not in a state that allows this")]
    InvalidState,
    #[error("connection refused")]
    Refused,
    #[error("connection reset by peer")]
    Reset,
    #[error("connection timed out")]
    TimedOut,
    #[error("peer closed the connection")]
    Finished,
}

/// RFC 9293 connection states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Listen,
    SynSent,
    SynReceived,
    Established,
    FinWait1,
    FinWait2,
    CloseWait,
    Closing,
    LastAck,
    TimeWait,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Keepalive probing (RFC 1122 §4.2.3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub probes: u32,
}

/// Per-socket tunables. Every feature can be switched off.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    pub rx_buffer: usize,
    pub tx_buffer: usize,
    pub window_scaling: bool,
    pub timestamps: bool,
    pub sack: bool,
    pub congestion: CongestionAlgorithm,
    pub initial_rto: Duration,
    pub min_rto: Duration,
    pub max_rto: Duration,
    pub syn_retries: u32,
    /// Consecutive RTO expirations before the connection is dropped.
    pub max_retransmissions: u32,
    /// `None` acknowledges every segment at once.
    pub delayed_ack: Option<Duration>,
    pub keepalive: Option<Keepalive>,
    /// 2 × MSL.
    pub time_wait: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            rx_buffer: 256 * 1024,
            tx_buffer: 256 * 1024,
            window_scaling: true,
            timestamps: true,
            sack: true,
            congestion: CongestionAlgorithm::Cubic,
            initial_rto: Duration::from_secs(1),
            // Linux's floor; RFC 6298's 1 s is far above LAN round trips.
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(60),
            syn_retries: 6,
            max_retransmissions: 15,
            delayed_ack: Some(Duration::from_millis(40)),
            keepalive: None,
            time_wait: Duration::from_secs(60),
        }
    }
}

/// Event counts of one socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub segments_in: u64,
    pub segments_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub retransmitted_segments: u64,
    pub retransmitted_bytes: u64,
    pub fast_retransmits: u64,
    pub timeouts: u64,
    pub dup_acks_in: u64,
    pub out_of_order_segments: u64,
    pub out_of_order_dropped: u64,
    pub unacceptable_segments: u64,
    pub paws_rejected: u64,
    pub challenge_acks: u64,
    pub resets_in: u64,
    pub resets_out: u64,
    pub zero_window_probes: u64,
    pub keepalive_probes: u64,
    pub sack_blocks_in: u64,
    /// In-order payload bytes the reader took straight from the frame
    /// (never copied into the receive ring); included in `bytes_in`.
    pub bytes_direct: u64,
    /// Bytes queued for sending by copying them into the send ring
    /// ([`TcpSocket::send_slice`]).
    pub tx_bytes_copied: u64,
    /// Bytes queued for sending by reference ([`TcpSocket::send_shared`]):
    /// copied once, from the caller's buffer into the frame.
    pub tx_bytes_shared: u64,
}

/// What the interface should do after a segment was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessOutcome {
    Done,
    /// Answer the segment with a reset (RFC 9293 "send a reset").
    SendReset,
}

/// What one planned segment carries; built first so the payload can be
/// borrowed from the send buffer only while the segment is emitted.
#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: PlanKind,
    seq: SeqNumber,
    len: usize,
    syn: bool,
    fin: bool,
    rst: bool,
    with_ack: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PlanKind {
    Control,
    Data,
    FastRetransmit,
    WindowProbe,
    Keepalive,
}

/// Reason a dispatch stopped: the device or neighbour could not take more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmitBlocked;

/// What [`TcpSocket::dispatch_gather`] calls per segment: the segment (its
/// `payload` empty), the slices its payload is gathered from, and the
/// per-segment payload size (for TSO).
pub type GatherEmit<'e> = dyn FnMut(&TcpRepr, &[&[u8]], usize) -> Result<(), EmitBlocked> + 'e;

/// One TCP connection (or listener).
#[derive(Debug)]
pub struct TcpSocket {
    config: TcpConfig,
    state: State,
    local: SocketAddrV4,
    remote: SocketAddrV4,
    error: Option<TcpError>,

    iss: SeqNumber,
    snd_una: SeqNumber,
    snd_nxt: SeqNumber,
    /// Highest sequence number sent plus one.
    snd_max: SeqNumber,
    snd_wnd: usize,
    max_snd_wnd: usize,
    snd_wl1: SeqNumber,
    snd_wl2: SeqNumber,
    /// Shift applied to windows the peer advertises.
    snd_wscale: u8,
    /// Shift applied to windows we advertise.
    rcv_wscale: u8,
    irs: SeqNumber,
    rcv_nxt: SeqNumber,
    rcv_adv_right: SeqNumber,

    tx: SendBuffer,
    rx: RingBuffer,
    assembler: Assembler,
    /// Most recently received out-of-order block, reported first (RFC 2018).
    last_ooo: Option<(SeqNumber, SeqNumber)>,
    fin_queued: bool,
    fin_received: bool,

    /// Largest IP MTU - 40 the interface can carry.
    local_mss: usize,
    remote_mss: usize,
    /// Largest payload in one emitted frame (TSO), at least one segment.
    tso_payload: usize,

    timestamps: bool,
    ts_recent: u32,
    ts_offset: u32,
    last_ack_sent: SeqNumber,
    sack: bool,
    scoreboard: Scoreboard,

    rtt: RttEstimator,
    rtt_probe: Option<(SeqNumber, Instant)>,
    cc: CongestionController,
    dup_acks: u32,
    in_recovery: bool,
    recover: SeqNumber,
    high_rxt: SeqNumber,
    rtx_next: Option<SeqNumber>,
    retries: u32,

    syn_due: bool,
    ack_now: bool,
    rst_due: bool,
    probe_due: bool,
    keepalive_due: bool,
    unacked_segments: u32,
    timer_rtx: Option<Instant>,
    timer_persist: Option<Instant>,
    persist_backoff: u32,
    timer_delack: Option<Instant>,
    timer_keepalive: Option<Instant>,
    keepalive_sent: u32,
    timer_time_wait: Option<Instant>,
    last_send: Instant,
    /// Slices one segment's payload may be gathered from: 1 for
    /// [`TcpSocket::dispatch`], [`MAX_GATHER`] for [`TcpSocket::dispatch_gather`].
    gather_slices: usize,

    counters: TcpCounters,
}

fn serial_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl TcpSocket {
    pub fn new(config: TcpConfig) -> TcpSocket {
        let rtt = RttEstimator::new(config.initial_rto, config.min_rto, config.max_rto);
        let cc = CongestionController::new(config.congestion, 536);
        let unspecified = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        TcpSocket {
            tx: SendBuffer::new(config.tx_buffer),
            rx: RingBuffer::new(config.rx_buffer),
            config,
            state: State::Closed,
            local: unspecified,
            remote: unspecified,
            error: None,
            iss: SeqNumber(0),
            snd_una: SeqNumber(0),
            snd_nxt: SeqNumber(0),
            snd_max: SeqNumber(0),
            snd_wnd: 0,
            max_snd_wnd: 0,
            snd_wl1: SeqNumber(0),
            snd_wl2: SeqNumber(0),
            snd_wscale: 0,
            rcv_wscale: 0,
            irs: SeqNumber(0),
            rcv_nxt: SeqNumber(0),
            rcv_adv_right: SeqNumber(0),
            assembler: Assembler::default(),
            last_ooo: None,
            fin_queued: false,
            fin_received: false,
            local_mss: 1460,
            remote_mss: 536,
            tso_payload: 0,
            timestamps: false,
            ts_recent: 0,
            ts_offset: 0,
            last_ack_sent: SeqNumber(0),
            sack: false,
            scoreboard: Scoreboard::default(),
            rtt,
            rtt_probe: None,
            cc,
            dup_acks: 0,
            in_recovery: false,
            recover: SeqNumber(0),
            high_rxt: SeqNumber(0),
            rtx_next: None,
            retries: 0,
            syn_due: false,
            ack_now: false,
            rst_due: false,
            probe_due: false,
            keepalive_due: false,
            unacked_segments: 0,
            timer_rtx: None,
            timer_persist: None,
            persist_backoff: 0,
            timer_delack: None,
            timer_keepalive: None,
            keepalive_sent: 0,
            timer_time_wait: None,
            last_send: Instant::ZERO,
            gather_slices: 1,
            counters: TcpCounters::default(),
        }
    }

    // ---- queries ------------------------------------------------------

    pub fn state(&self) -> State {
        self.state
    }
    pub fn local_endpoint(&self) -> SocketAddrV4 {
        self.local
    }
    pub fn remote_endpoint(&self) -> SocketAddrV4 {
        self.remote
    }
    /// Why the connection ended, if it did abnormally.
    pub fn error(&self) -> Option<TcpError> {
        self.error
    }
    pub fn counters(&self) -> &TcpCounters {
        &self.counters
    }
    pub fn config(&self) -> &TcpConfig {
        &self.config
    }
    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed | State::TimeWait)
    }
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }
    /// Data can still be queued for sending.
    pub fn may_send(&self) -> bool {
        matches!(self.state, State::Established | State::CloseWait) && !self.fin_queued
    }
    /// Data can still arrive or is waiting to be read.
    pub fn may_recv(&self) -> bool {
        !self.rx.is_empty()
            || matches!(
                self.state,
                State::Established | State::FinWait1 | State::FinWait2
            )
    }
    pub fn send_queue(&self) -> usize {
        self.tx.len()
    }
    pub fn send_capacity(&self) -> usize {
        self.tx.window()
    }
    pub fn recv_queue(&self) -> usize {
        self.rx.len()
    }
    /// Congestion window in bytes.
    pub fn cwnd(&self) -> usize {
        self.cc.cwnd
    }
    pub fn rto(&self) -> Duration {
        self.rtt.rto()
    }
    pub fn smoothed_rtt(&self) -> Duration {
        self.rtt.srtt()
    }
    /// Segment payload size in use (MSS less the timestamp option).
    pub fn effective_mss(&self) -> usize {
        let mss = self.local_mss.min(self.remote_mss);
        mss.saturating_sub(if self.timestamps { 12 } else { 0 })
            .max(1)
    }

    /// Sets the MSS the link allows (MTU - 40) and the TSO frame payload
    /// limit (0: no TSO). Called by the interface before opening.
    pub fn set_link_limits(&mut self, local_mss: usize, tso_payload: usize) {
        self.local_mss = local_mss.max(64);
        self.tso_payload = tso_payload;
    }

    // ---- user calls ---------------------------------------------------

    fn reset_connection_state(&mut self, iss: SeqNumber, ts_offset: u32) {
        let config = self.config.clone();
        let (local_mss, tso) = (self.local_mss, self.tso_payload);
        let counters = self.counters;
        let (tx, rx) = (
            std::mem::replace(&mut self.tx, SendBuffer::new(0)),
            std::mem::replace(&mut self.rx, RingBuffer::new(0)),
        );
        *self = TcpSocket::new_with_buffers(config, tx, rx);
        self.tx.clear();
        self.rx.clear();
        self.counters = counters;
        self.local_mss = local_mss;
        self.tso_payload = tso;
        self.iss = iss;
        self.snd_una = iss;
        self.snd_nxt = iss;
        self.snd_max = iss;
        self.recover = iss;
        self.high_rxt = iss;
        self.ts_offset = ts_offset;
        let mut shift = 0;
        if self.config.window_scaling {
            while shift < MAX_WINDOW_SCALE && (self.rx.capacity() >> shift) > 65535 {
                shift += 1;
            }
        }
        self.rcv_wscale = shift;
    }

    fn new_with_buffers(config: TcpConfig, tx: SendBuffer, rx: RingBuffer) -> TcpSocket {
        // Reuses the pre-allocated rings: no allocation when a socket is reopened.
        let mut s = TcpSocket::new(TcpConfig {
            rx_buffer: 0,
            tx_buffer: 0,
            ..config
        });
        s.config.rx_buffer = rx.capacity();
        s.config.tx_buffer = tx.capacity();
        s.tx = tx;
        s.rx = rx;
        s
    }

    /// Starts an active open. `iss` and `ts_offset` come from the
    /// interface's seeded RNG.
    pub fn connect(
        &mut self,
        now: Instant,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        iss: SeqNumber,
        ts_offset: u32,
    ) -> Result<(), TcpError> {
        if self.is_open() || remote.port() == 0 || local.port() == 0 {
            return Err(TcpError::InvalidState);
        }
        self.reset_connection_state(iss, ts_offset);
        self.local = local;
        self.remote = remote;
        self.state = State::SynSent;
        self.syn_due = true;
        self.last_send = now;
        Ok(())
    }

    /// Waits for one connection on `local` (address may be unspecified).
    pub fn listen(
        &mut self,
        local: SocketAddrV4,
        iss: SeqNumber,
        ts_offset: u32,
    ) -> Result<(), TcpError> {
        if self.is_open() || local.port() == 0 {
            return Err(TcpError::InvalidState);
        }
        self.reset_connection_state(iss, ts_offset);
        self.local = local;
        self.state = State::Listen;
        Ok(())
    }

    /// Queues data; returns how much fit.
    pub fn send_slice(&mut self, data: &[u8]) -> Result<usize, TcpError> {
        if !self.may_send() {
            return Err(self.error.unwrap_or(TcpError::InvalidState));
        }
        let n = self.tx.enqueue_slice(data);
        self.counters.tx_bytes_copied += n as u64;
        Ok(n)
    }

    /// Queues `buf[start..start + len]` by reference, without copying it:
    /// the socket keeps a clone of `buf` until those bytes are acknowledged
    /// and emits (and re-emits) them from there. Returns how much fit; they
    /// count against the send buffer like copied bytes.
    pub fn send_shared(
        &mut self,
        buf: &SharedBytes,
        start: usize,
        len: usize,
    ) -> Result<usize, TcpError> {
        if !self.may_send() {
            return Err(self.error.unwrap_or(TcpError::InvalidState));
        }
        let n = self.tx.enqueue_shared(buf, start, len);
        self.counters.tx_bytes_shared += n as u64;
        Ok(n)
    }

    /// Bytes of the send queue held by reference ([`send_shared`](Self::send_shared)).
    pub fn send_queue_shared(&self) -> usize {
        self.tx.shared_len()
    }

    /// Reads received data. `Err(Finished)` once the peer's FIN has been
    /// read up to; other errors say why the connection died.
    pub fn recv_slice(&mut self, buf: &mut [u8]) -> Result<usize, TcpError> {
        if self.rx.is_empty() {
            if let Some(err) = self.error {
                return Err(err);
            }
            if self.fin_received {
                return Err(TcpError::Finished);
            }
            if matches!(
                self.state,
                State::Closed | State::Listen | State::SynSent | State::SynReceived
            ) {
                return Err(TcpError::InvalidState);
            }
            return Ok(0);
        }
        let count = self.rx.dequeue_slice(buf);
        self.after_read();
        Ok(count)
    }

    /// Lends the received bytes to `read` in place (smoltcp's `recv(|buf|
    /// ..)` shape), one contiguous piece of the ring at a time; `read`
    /// returns how many it consumed, and a short count stops the loop.
    /// Returns the total consumed. Errors as in [`recv_slice`](Self::recv_slice).
    pub fn recv_with(&mut self, read: &mut dyn FnMut(&[u8]) -> usize) -> Result<usize, TcpError> {
        if self.rx.is_empty() {
            return self.recv_slice(&mut []);
        }
        let mut total = 0;
        loop {
            let piece = self.rx.get_allocated(0, usize::MAX);
            if piece.is_empty() {
                break;
            }
            let len = piece.len();
            let n = read(piece).min(len);
            self.rx.dequeue_allocated(n);
            total += n;
            if n < len {
                break;
            }
        }
        self.after_read();
        Ok(total)
    }

    /// Window update when the advertised window grew noticeably.
    fn after_read(&mut self) {
        let right = self.rcv_nxt + self.advertised_window_bytes();
        let growth = right.since(self.rcv_adv_right);
        let threshold = (self.rx.capacity() / 2).min(2 * self.effective_mss());
        if growth >= threshold && growth > 0 && self.state != State::Closed {
            self.ack_now = true;
        }
    }

    /// Graceful close: a FIN follows the queued data.
    pub fn close(&mut self) {
        match self.state {
            State::Listen | State::SynSent => self.state = State::Closed,
            State::SynReceived | State::Established => {
                self.fin_queued = true;
                self.state = State::FinWait1;
            }
            State::CloseWait => {
                self.fin_queued = true;
                self.state = State::LastAck;
            }
            _ => {}
        }
    }

    /// Drops the connection with a reset.
    pub fn abort(&mut self) {
        match self.state {
            State::Closed | State::Listen | State::SynSent | State::TimeWait => {
                self.state = State::Closed
            }
            _ => self.rst_due = true,
        }
    }

    // ---- helpers ------------------------------------------------------

    fn ts_now(&self, now: Instant) -> u32 {
        (now.total_millis() as u32).wrapping_add(self.ts_offset)
    }

    fn fin_seq(&self) -> SeqNumber {
        // SYN is gone by the time data flows; the FIN follows the last byte.
        self.snd_una + self.tx.len() + usize::from(self.snd_una == self.iss)
    }

    fn fin_sent(&self) -> bool {
        self.fin_queued && self.snd_max > self.fin_seq()
    }

    fn flight(&self) -> usize {
        self.snd_nxt.since(self.snd_una)
    }

    fn advertised_window_bytes(&self) -> usize {
        let max = 65535usize << self.rcv_wscale;
        (self.rx.window().min(max) >> self.rcv_wscale) << self.rcv_wscale
    }

    fn window_field(&self, syn: bool) -> u16 {
        if syn {
            self.rx.window().min(65535) as u16
        } else {
            (self.advertised_window_bytes() >> self.rcv_wscale).min(65535) as u16
        }
    }

    fn set_closed(&mut self, error: Option<TcpError>) {
        self.state = State::Closed;
        if error.is_some() {
            self.error = error;
        }
        self.timer_rtx = None;
        self.timer_persist = None;
        self.timer_delack = None;
        self.timer_keepalive = None;
        self.timer_time_wait = None;
        self.ack_now = false;
        self.syn_due = false;
        self.probe_due = false;
        self.keepalive_due = false;
    }

    fn enter_time_wait(&mut self, now: Instant) {
        self.state = State::TimeWait;
        self.timer_rtx = None;
        self.timer_persist = None;
        self.timer_keepalive = None;
        self.timer_time_wait = Some(now + self.config.time_wait);
    }

    fn restart_keepalive(&mut self, now: Instant) {
        self.keepalive_sent = 0;
        self.timer_keepalive = self.config.keepalive.map(|k| now + k.idle);
    }

    fn negotiate_syn_options(&mut self, options: &TcpOptions) {
        self.remote_mss = usize::from(options.mss.unwrap_or(536)).max(64);
        match (self.config.window_scaling, options.window_scale) {
            (true, Some(shift)) => self.snd_wscale = shift.min(MAX_WINDOW_SCALE),
            _ => {
                self.snd_wscale = 0;
                self.rcv_wscale = 0;
            }
        }
        self.sack = self.config.sack && options.sack_permitted;
        self.timestamps = self.config.timestamps && options.timestamp.is_some();
        if let Some(ts) = options.timestamp {
            self.ts_recent = ts.tsval;
        }
        self.cc.set_mss(self.effective_mss());
    }

    // ---- input --------------------------------------------------------

    /// Does this socket take a segment from `remote` to `local`?
    #[inline]
    pub fn accepts(&self, src: SocketAddrV4, dst: SocketAddrV4) -> bool {
        match self.state {
            State::Closed => false,
            State::Listen => {
                self.local.port() == dst.port()
                    && (self.local.ip().is_unspecified() || self.local.ip() == dst.ip())
            }
            _ => self.local == dst && self.remote == src,
        }
    }

    /// Processes one segment addressed to this socket.
    pub fn process(
        &mut self,
        now: Instant,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seg: &TcpRepr,
    ) -> ProcessOutcome {
        self.process_with(now, src, dst, seg, &mut |_| 0)
    }

    /// [`process`](Self::process), offering in-order payload to `direct`
    /// before it is copied into the receive ring: when the ring is empty and
    /// no hole is pending, `direct` sees the segment's new bytes straight
    /// from the frame and returns how many it took (the rest goes to the
    /// ring as usual). This is the one-copy receive path.
    pub fn process_with(
        &mut self,
        now: Instant,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seg: &TcpRepr,
        direct: &mut dyn FnMut(&[u8]) -> usize,
    ) -> ProcessOutcome {
        self.counters.segments_in += 1;
        match self.state {
            State::Closed => ProcessOutcome::SendReset,
            State::Listen => self.process_listen(now, src, dst, seg),
            State::SynSent => self.process_syn_sent(now, seg),
            _ => self.process_synchronized(now, seg, direct),
        }
    }

    fn process_listen(
        &mut self,
        now: Instant,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seg: &TcpRepr,
    ) -> ProcessOutcome {
        if seg.flags.rst {
            return ProcessOutcome::Done;
        }
        if seg.ack_number.is_some() {
            return ProcessOutcome::SendReset;
        }
        if !seg.flags.syn {
            return ProcessOutcome::Done;
        }
        self.local = dst;
        self.remote = src;
        self.irs = seg.seq_number;
        self.rcv_nxt = seg.seq_number + 1;
        self.negotiate_syn_options(&seg.options);
        self.snd_wnd = usize::from(seg.window_len);
        self.max_snd_wnd = self.snd_wnd;
        self.snd_wl1 = seg.seq_number;
        self.state = State::SynReceived;
        self.syn_due = true;
        self.restart_keepalive(now);
        ProcessOutcome::Done
    }

    fn process_syn_sent(&mut self, now: Instant, seg: &TcpRepr) -> ProcessOutcome {
        let ack_ok = match seg.ack_number {
            Some(ack) => {
                if ack <= self.iss || ack > self.snd_max {
                    return if seg.flags.rst {
                        ProcessOutcome::Done
                    } else {
                        ProcessOutcome::SendReset
                    };
                }
                true
            }
            None => false,
        };
        if seg.flags.rst {
            self.counters.resets_in += 1;
            if ack_ok {
                self.set_closed(Some(TcpError::Refused));
            }
            return ProcessOutcome::Done;
        }
        if !seg.flags.syn {
            return ProcessOutcome::Done;
        }
        self.irs = seg.seq_number;
        self.rcv_nxt = seg.seq_number + 1;
        self.negotiate_syn_options(&seg.options);
        self.snd_wl1 = seg.seq_number;
        if let Some(ack) = seg.ack_number.filter(|_| ack_ok) {
            // Karn: only an unretransmitted SYN gives an RTT sample.
            if self.retries == 0 {
                self.rtt.sample(now - self.last_send);
            }
            self.retries = 0;
            self.rtt.reset_backoff();
            self.snd_una = ack;
            self.snd_nxt = self.snd_nxt.max(ack);
            self.snd_wl2 = ack;
            self.snd_wnd = usize::from(seg.window_len) << self.snd_wscale;
            self.max_snd_wnd = self.snd_wnd;
            self.timer_rtx = None;
            self.state = State::Established;
            self.ack_now = true;
            self.restart_keepalive(now);
        } else {
            // Simultaneous open: answer with SYN-ACK from the same ISS.
            self.snd_wnd = usize::from(seg.window_len);
            self.state = State::SynReceived;
            self.snd_nxt = self.iss;
            self.syn_due = true;
        }
        ProcessOutcome::Done
    }

    fn segment_acceptable(&self, seq: SeqNumber, len: usize) -> bool {
        let wnd = self.rx.window();
        let in_window = |s: SeqNumber| s >= self.rcv_nxt && s < self.rcv_nxt + wnd;
        match (len, wnd) {
            (0, 0) => seq == self.rcv_nxt,
            (0, _) => in_window(seq),
            (_, 0) => false,
            (_, _) => in_window(seq) || in_window(seq + (len - 1)),
        }
    }

    fn process_synchronized(
        &mut self,
        now: Instant,
        seg: &TcpRepr,
        direct: &mut dyn FnMut(&[u8]) -> usize,
    ) -> ProcessOutcome {
        let mut payload = seg.payload;
        let mut fin = seg.flags.fin;
        let seq = seg.seq_number;

        // PAWS (RFC 7323 §5.3).
        if self.timestamps && !seg.flags.rst {
            if let Some(ts) = seg.options.timestamp {
                if serial_lt(ts.tsval, self.ts_recent) {
                    self.counters.paws_rejected += 1;
                    self.ack_now = true;
                    return ProcessOutcome::Done;
                }
            }
        }

        if self.state == State::TimeWait {
            if seg.flags.rst {
                self.set_closed(None);
                return ProcessOutcome::Done;
            }
            // A retransmitted FIN: our last ACK was lost.
            self.ack_now = true;
            if fin {
                self.timer_time_wait = Some(now + self.config.time_wait);
            }
            return ProcessOutcome::Done;
        }

        let seg_len = payload.len() + usize::from(seg.flags.syn) + usize::from(fin);
        if !self.segment_acceptable(seq, seg_len) {
            if self.rx.window() == 0 && seq == self.rcv_nxt {
                // Zero window: still take ACK, RST and a bare FIN (RFC 9293 §3.10.7.4).
                if !payload.is_empty() {
                    fin = false;
                }
                payload = &[];
                self.ack_now = true;
            } else {
                self.counters.unacceptable_segments += 1;
                if !seg.flags.rst {
                    self.ack_now = true;
                }
                return ProcessOutcome::Done;
            }
        }

        if seg.flags.rst {
            self.counters.resets_in += 1;
            if seq == self.rcv_nxt {
                self.set_closed(Some(TcpError::Reset));
            } else {
                // RFC 5961 §3.2: in-window but not exact: challenge ACK.
                self.counters.challenge_acks += 1;
                self.ack_now = true;
            }
            return ProcessOutcome::Done;
        }

        if seg.flags.syn {
            if self.state == State::SynReceived && seq == self.irs {
                // Our SYN-ACK was lost: send it again.
                self.syn_due = true;
            } else {
                // RFC 5961 §4.2.
                self.counters.challenge_acks += 1;
                self.ack_now = true;
            }
            return ProcessOutcome::Done;
        }

        let Some(ack) = seg.ack_number else {
            return ProcessOutcome::Done;
        };

        if self.timestamps {
            if let Some(ts) = seg.options.timestamp {
                if seq <= self.last_ack_sent {
                    self.ts_recent = ts.tsval;
                }
            }
        }
        self.restart_keepalive(now);

        if self.state == State::SynReceived {
            if ack <= self.snd_una || ack > self.snd_max {
                return ProcessOutcome::SendReset;
            }
            self.state = State::Established;
            self.snd_wnd = usize::from(seg.window_len) << self.snd_wscale;
            self.max_snd_wnd = self.snd_wnd;
            self.snd_wl1 = seq;
            self.snd_wl2 = ack;
            if self.retries == 0 {
                self.rtt.sample(now - self.last_send);
            }
            self.retries = 0;
            if self.fin_queued {
                self.state = State::FinWait1;
            }
        }

        if ack > self.snd_max {
            self.ack_now = true;
            return ProcessOutcome::Done;
        }
        self.process_ack(now, seg, ack, payload.is_empty() && !fin);

        if !matches!(
            self.state,
            State::Established
                | State::FinWait1
                | State::FinWait2
                | State::CloseWait
                | State::Closing
                | State::LastAck
        ) {
            return ProcessOutcome::Done;
        }

        // Data.
        let accepts_data = matches!(
            self.state,
            State::Established | State::FinWait1 | State::FinWait2
        );
        if !payload.is_empty() {
            if accepts_data {
                self.receive_data(now, seq, payload, direct);
            } else {
                self.ack_now = true;
            }
        }

        if fin && accepts_data && seq + payload.len() == self.rcv_nxt {
            self.rcv_nxt += 1;
            self.fin_received = true;
            self.ack_now = true;
            match self.state {
                State::Established => self.state = State::CloseWait,
                State::FinWait1 => self.state = State::Closing,
                State::FinWait2 => self.enter_time_wait(now),
                _ => {}
            }
        } else if fin {
            self.ack_now = true;
        }
        ProcessOutcome::Done
    }

    // Inlined (as receive_data and count_in_order_segment) into the one
    // caller, once per segment received: a call's prologue and spills cost
    // more than the body on the in-order data path.
    #[inline(always)]
    fn process_ack(&mut self, now: Instant, seg: &TcpRepr, ack: SeqNumber, pure_ack: bool) {
        let seq = seg.seq_number;
        let window = usize::from(seg.window_len) << self.snd_wscale;
        let window_changed = window != self.snd_wnd;
        if ack < self.snd_una {
            return;
        }
        if self.snd_wl1 < seq || (self.snd_wl1 == seq && self.snd_wl2 <= ack) {
            self.snd_wnd = window;
            self.max_snd_wnd = self.max_snd_wnd.max(window);
            self.snd_wl1 = seq;
            self.snd_wl2 = ack;
        }
        if self.sack {
            for &(left, right) in seg.options.sack_blocks.as_slice() {
                if left >= self.snd_una && right <= self.snd_max && left < right {
                    self.counters.sack_blocks_in += 1;
                    self.scoreboard.add(left, right);
                }
            }
        }
        let acked = ack.since(self.snd_una);
        if acked > 0 {
            self.on_new_ack(now, seg, ack, acked);
        } else if pure_ack && !window_changed && self.snd_max > self.snd_una && self.flight() > 0 {
            self.on_dup_ack();
        }
        if self.snd_wnd > 0 {
            self.timer_persist = None;
            self.persist_backoff = 0;
        }
    }

    fn on_new_ack(&mut self, now: Instant, seg: &TcpRepr, ack: SeqNumber, acked: usize) {
        let mut data_acked = acked;
        if self.snd_una == self.iss {
            data_acked -= 1; // our SYN
        }
        let fin_acked = self.fin_sent() && ack == self.fin_seq() + 1;
        if fin_acked {
            data_acked -= 1;
        }
        self.tx.dequeue_allocated(data_acked);
        self.tx.rewind_if_empty();
        self.snd_una = ack;
        self.snd_nxt = self.snd_nxt.max(ack);
        self.scoreboard.prune(ack);
        self.retries = 0;

        // RTT: the timestamp echo when there is one, else the timed segment.
        let mut sampled = false;
        if self.timestamps {
            if let Some(ts) = seg.options.timestamp.filter(|ts| ts.tsecr != 0) {
                let ms = self.ts_now(now).wrapping_sub(ts.tsecr);
                if ms < 60_000 {
                    self.rtt.sample(Duration::from_millis(u64::from(ms)));
                    sampled = true;
                }
            }
        }
        if let Some((probe_seq, sent_at)) = self.rtt_probe {
            if ack > probe_seq {
                if !sampled {
                    self.rtt.sample(now - sent_at);
                }
                self.rtt_probe = None;
            }
        }

        self.timer_rtx = if self.flight() == 0 {
            None
        } else {
            Some(now + self.rtt.rto())
        };

        if self.in_recovery {
            if ack >= self.recover {
                self.in_recovery = false;
                self.dup_acks = 0;
                self.rtx_next = None;
                self.cc.on_recovery_exit(self.flight());
            } else {
                // Partial ACK (RFC 6582 §3.2 step 5): deflate, resend the next hole.
                let mss = self.effective_mss();
                self.cc.cwnd = self.cc.cwnd.saturating_sub(acked).max(mss);
                if acked >= mss {
                    self.cc.cwnd += mss;
                }
                let from = self.snd_una.max(self.high_rxt);
                let hole = self.scoreboard.next_unsacked(from);
                if hole < self.snd_max {
                    self.rtx_next = Some(hole);
                }
            }
        } else {
            self.dup_acks = 0;
            self.cc.on_ack(now, data_acked, self.rtt.srtt());
        }

        if fin_acked {
            match self.state {
                State::FinWait1 => self.state = State::FinWait2,
                State::Closing => self.enter_time_wait(now),
                State::LastAck => self.set_closed(None),
                _ => {}
            }
        }
    }

    fn on_dup_ack(&mut self) {
        self.counters.dup_acks_in += 1;
        self.dup_acks += 1;
        let mss = self.effective_mss();
        if self.in_recovery {
            self.cc.cwnd += mss;
            if self.sack && self.rtx_next.is_none() {
                // Resend the next hole below the highest SACKed byte.
                let from = self.snd_una.max(self.high_rxt);
                let hole = self.scoreboard.next_unsacked(from);
                if self.scoreboard.highest().is_some_and(|h| hole < h) {
                    self.rtx_next = Some(hole);
                }
            }
        } else if self.dup_acks == 3 && self.snd_una > self.recover {
            self.counters.fast_retransmits += 1;
            self.in_recovery = true;
            self.recover = self.snd_max;
            self.cc.on_congestion_event(self.flight());
            self.cc.cwnd += 3 * mss;
            self.high_rxt = self.snd_una;
            self.rtx_next = Some(self.snd_una);
            self.rtt_probe = None;
        }
    }

    #[inline(always)]
    fn receive_data(
        &mut self,
        now: Instant,
        seq: SeqNumber,
        payload: &[u8],
        direct: &mut dyn FnMut(&[u8]) -> usize,
    ) {
        let (offset, mut data) = if seq < self.rcv_nxt {
            let skip = self.rcv_nxt.since(seq);
            (0, payload.get(skip..).unwrap_or(&[]))
        } else {
            (seq.since(self.rcv_nxt), payload)
        };
        if data.is_empty() {
            self.ack_now = true;
            return;
        }
        // Filling a hole is acknowledged at once (RFC 5681 §4.2).
        let had_holes = !self.assembler.is_empty();
        if offset == 0 && !had_holes && self.rx.is_empty() {
            // In order with nothing queued before it: the reader takes the
            // bytes from the frame itself, with no stop in the ring. The
            // ring stays empty, so the window stays what it was.
            let delivered = direct(data).min(data.len());
            self.counters.bytes_direct += delivered as u64;
            self.rcv_nxt += delivered;
            self.counters.bytes_in += delivered as u64;
            data = &data[delivered..];
            if data.is_empty() {
                self.count_in_order_segment(now);
                return;
            }
        }
        let written = self.rx.write_unallocated(offset, data);
        if self.assembler.add(offset, written).is_err() {
            self.counters.out_of_order_dropped += 1;
            self.ack_now = true;
            return;
        }
        let advanced = self.assembler.remove_front();
        self.rx.enqueue_unallocated(advanced);
        self.rcv_nxt += advanced;
        self.counters.bytes_in += advanced as u64;
        if offset > 0 {
            self.counters.out_of_order_segments += 1;
            if let Some((s, e)) = self.assembler.range_containing(offset) {
                self.last_ooo = Some((self.rcv_nxt + s, self.rcv_nxt + e));
            }
            self.ack_now = true;
        } else if had_holes || !self.assembler.is_empty() {
            self.ack_now = true;
        } else {
            self.count_in_order_segment(now);
        }
    }

    /// Delayed ACK (RFC 1122 §4.2.3.2): every second full segment at once,
    /// else within the delay. ACKs are sent at dispatch, once per rx burst.
    #[inline(always)]
    fn count_in_order_segment(&mut self, now: Instant) {
        self.unacked_segments += 1;
        match self.config.delayed_ack {
            Some(delay) if self.unacked_segments < 2 => {
                if self.timer_delack.is_none() {
                    self.timer_delack = Some(now + delay);
                }
            }
            _ => self.ack_now = true,
        }
    }

    // ---- timers -------------------------------------------------------

    /// Fires expired timers.
    fn on_timers(&mut self, now: Instant) {
        if self.timer_time_wait.is_some_and(|t| now >= t) {
            self.set_closed(None);
            return;
        }
        if self.timer_delack.is_some_and(|t| now >= t) {
            self.timer_delack = None;
            self.ack_now = true;
        }
        if self.timer_rtx.is_some_and(|t| now >= t) {
            self.on_retransmit_timeout();
        }
        if self.timer_persist.is_some_and(|t| now >= t) {
            self.timer_persist = None;
            self.probe_due = true;
        }
        if self.timer_keepalive.is_some_and(|t| now >= t) {
            self.timer_keepalive = None;
            if let Some(k) = self.config.keepalive {
                if self.flight() > 0 || !self.tx.is_empty() {
                    // Retransmission covers a busy connection.
                    self.timer_keepalive = Some(now + k.idle);
                    return;
                }
                if self.keepalive_sent >= k.probes {
                    self.set_closed(Some(TcpError::TimedOut));
                    return;
                }
                if matches!(
                    self.state,
                    State::Established | State::CloseWait | State::FinWait2
                ) {
                    self.keepalive_due = true;
                }
            }
        }
    }

    fn on_retransmit_timeout(&mut self) {
        self.retries += 1;
        self.counters.timeouts += 1;
        self.rtt.on_timeout();
        let limit = match self.state {
            State::SynSent | State::SynReceived => self.config.syn_retries,
            _ => self.config.max_retransmissions,
        };
        if self.retries > limit {
            self.set_closed(Some(TcpError::TimedOut));
            return;
        }
        if matches!(self.state, State::SynSent | State::SynReceived) {
            self.syn_due = true;
            self.snd_nxt = self.iss;
        } else {
            // Go back N; SACK information may be reneged (RFC 2018 §8).
            self.cc.on_retransmit_timeout(self.flight());
            self.snd_nxt = self.snd_una;
            self.scoreboard.clear();
            self.in_recovery = false;
            self.recover = self.snd_max;
            self.dup_acks = 0;
            self.rtx_next = None;
        }
        self.rtt_probe = None;
        // Re-armed by whatever is sent next; nothing may be sendable (zero
        // window: the persist timer takes over, and must not count retries).
        self.timer_rtx = None;
    }

    /// When the socket next needs [`dispatch`](Self::dispatch), if ever.
    pub fn poll_at(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        if self.has_urgent_work() {
            return Some(Instant::ZERO);
        }
        let mut at = earliest(self.timer_rtx, self.timer_persist);
        at = earliest(at, self.timer_delack);
        at = earliest(at, self.timer_keepalive);
        earliest(at, self.timer_time_wait)
    }

    fn has_urgent_work(&self) -> bool {
        self.next_plan().is_some()
    }

    // ---- output -------------------------------------------------------

    fn next_data_plan(&self) -> Option<Plan> {
        if !matches!(
            self.state,
            State::Established
                | State::FinWait1
                | State::CloseWait
                | State::Closing
                | State::LastAck
        ) {
            return None;
        }
        // The common case of a poll round: nothing new to send (checked
        // before the window and MSS arithmetic below).
        let offset = self.snd_nxt.since(self.snd_una);
        let unsent = self.tx.len().saturating_sub(offset);
        if self.rtx_next.is_none() && unsent == 0 && !self.fin_queued {
            return None;
        }
        let mss = self.effective_mss();
        let max_payload = mss.max(self.tso_payload / mss * mss);
        let fin_seq = self.fin_seq();
        if let Some(seq) = self.rtx_next {
            let offset = seq.since(self.snd_una);
            let mut len = self.tx.len().saturating_sub(offset).min(mss);
            len = len.min(self.snd_max.since(seq));
            if let Some(sacked) = self.scoreboard.next_sacked_start(seq) {
                len = len.min(sacked.since(seq));
            }
            if len > 0 {
                len = self.tx.gatherable(offset, len, self.gather_slices);
            }
            let fin = self.fin_sent() && seq + len == fin_seq;
            if len > 0 || fin {
                return Some(Plan {
                    kind: PlanKind::FastRetransmit,
                    seq,
                    len,
                    syn: false,
                    fin,
                    rst: false,
                    with_ack: true,
                });
            }
        }
        let wnd_right = self.snd_una + self.snd_wnd;
        let usable_wnd = wnd_right.since(self.snd_nxt);
        let usable_cwnd = self.cc.cwnd.saturating_sub(self.flight());
        let mut len = unsent.min(usable_wnd).min(usable_cwnd).min(max_payload);
        if len > 0 {
            len = self.tx.gatherable(offset, len, self.gather_slices);
        }
        // Sender-side silly window avoidance (RFC 9293 §3.8.6.2.1), no Nagle.
        if len > 0 && len < mss && len < unsent && len < self.max_snd_wnd / 2 && self.flight() > 0 {
            len = 0;
        }
        let fin = self.fin_queued && self.snd_nxt + len == fin_seq && self.snd_nxt <= fin_seq;
        if len == 0 && !fin {
            return None;
        }
        Some(Plan {
            kind: PlanKind::Data,
            seq: self.snd_nxt,
            len,
            syn: false,
            fin,
            rst: false,
            with_ack: true,
        })
    }

    fn next_plan(&self) -> Option<Plan> {
        let control = |seq, syn, rst, with_ack| Plan {
            kind: PlanKind::Control,
            seq,
            len: 0,
            syn,
            fin: false,
            rst,
            with_ack,
        };
        if self.rst_due {
            return Some(control(self.bare_seq(), false, true, true));
        }
        match self.state {
            State::Closed | State::Listen => return None,
            State::SynSent if self.syn_due => return Some(control(self.iss, true, false, false)),
            // A duplicate SYN or an unacceptable segment is answered with the SYN-ACK.
            State::SynReceived if self.syn_due || self.ack_now => {
                return Some(control(self.iss, true, false, true))
            }
            State::SynSent | State::SynReceived => return None,
            _ => {}
        }
        if let Some(plan) = self.next_data_plan() {
            return Some(plan);
        }
        if self.probe_due {
            let offset = self.snd_nxt.since(self.snd_una);
            if !self.tx.get_allocated(offset, 1).is_empty() {
                return Some(Plan {
                    kind: PlanKind::WindowProbe,
                    seq: self.snd_nxt,
                    len: 1,
                    syn: false,
                    fin: false,
                    rst: false,
                    with_ack: true,
                });
            }
        }
        if self.keepalive_due {
            return Some(Plan {
                kind: PlanKind::Keepalive,
                ..control(self.snd_una - 1, false, false, true)
            });
        }
        if self.ack_now {
            return Some(control(self.bare_seq(), false, false, true));
        }
        None
    }

    /// The sequence number of a bare ACK or RST. The highest sent: after a
    /// go-back-N rewind `snd_nxt` may sit below the peer's RCV.NXT, which
    /// would make them unacceptable (and two such peers ACK each other
    /// forever). But never past the right edge of the peer's window: a
    /// zero-window probe's byte (or a FIN) sent into a closed window counts
    /// in `snd_max` although the peer refused it, and a receiver drops a
    /// segment that starts past RCV.NXT + RCV.WND (RFC 9293 §3.10.7.4: with
    /// RCV.WND = 0 only SEG.SEQ = RCV.NXT is acceptable; Linux counts it as
    /// TCPBeyondWindow). Every ACK of the peer's data would be lost for as
    /// long as its window stays shut, and it stays shut when the peer's
    /// application is blocked sending to us: a deadlock. (Linux's own bare
    /// ACKs and RSTs take the same care: `tcp_acceptable_seq`.)
    fn bare_seq(&self) -> SeqNumber {
        if matches!(self.state, State::SynSent | State::SynReceived) {
            // No window from the peer yet (or its SYN's, unscaled).
            return self.snd_max;
        }
        self.snd_max.min(self.snd_una + self.snd_wnd)
    }

    fn build_options(&self, now: Instant, plan: &Plan) -> TcpOptions {
        let mut options = TcpOptions::default();
        if plan.syn {
            let syn_ack = self.state == State::SynReceived;
            options.mss = Some(self.local_mss.min(65535) as u16);
            if self.config.window_scaling
                && (!syn_ack || self.snd_wscale > 0 || self.rcv_wscale > 0)
            {
                options.window_scale = Some(self.rcv_wscale);
            }
            options.sack_permitted = if syn_ack { self.sack } else { self.config.sack };
            let want_ts = if syn_ack {
                self.timestamps
            } else {
                self.config.timestamps
            };
            if want_ts {
                options.timestamp = Some(TcpTimestamp {
                    tsval: self.ts_now(now),
                    tsecr: if syn_ack { self.ts_recent } else { 0 },
                });
            }
            return options;
        }
        if self.timestamps && !plan.rst {
            options.timestamp = Some(TcpTimestamp {
                tsval: self.ts_now(now),
                tsecr: self.ts_recent,
            });
        }
        if self.sack && plan.with_ack && !plan.rst && !self.assembler.is_empty() {
            if let Some((l, r)) = self.last_ooo.filter(|&(l, _)| l > self.rcv_nxt) {
                options.sack_blocks.push(l, r);
            }
            for &(s, e) in self.assembler.ranges() {
                let block = (self.rcv_nxt + s, self.rcv_nxt + e);
                if Some(block) != self.last_ooo && !options.sack_blocks.push(block.0, block.1) {
                    break;
                }
            }
        }
        options
    }

    /// Emits every segment that is due. `emit` gets the segment and the
    /// per-segment payload size (for TSO); it returns `Err` when the device
    /// or the neighbour cache cannot take the segment now. Each segment's
    /// payload is one contiguous slice of the send queue.
    pub fn dispatch(
        &mut self,
        now: Instant,
        emit: &mut dyn FnMut(&TcpRepr, usize) -> Result<(), EmitBlocked>,
    ) -> Result<(), EmitBlocked> {
        self.dispatch_inner(now, 1, &mut |repr, payload, seg_size| {
            let repr = TcpRepr {
                payload: payload.first().copied().unwrap_or(&[]),
                ..*repr
            };
            emit(&repr, seg_size)
        })
    }

    /// [`dispatch`](Self::dispatch) with each segment's payload gathered
    /// from up to [`MAX_GATHER`] slices (ring bytes and shared buffers, see
    /// [`send_shared`](Self::send_shared)), so a segment can carry an iSCSI
    /// header from the ring and the data after it from the caller's buffer.
    /// `emit` gets the segment with an empty `payload` and the slices that
    /// make it up, in order (`TcpRepr::emit_gather` writes them).
    pub fn dispatch_gather(
        &mut self,
        now: Instant,
        emit: &mut GatherEmit<'_>,
    ) -> Result<(), EmitBlocked> {
        self.dispatch_inner(now, MAX_GATHER, emit)
    }

    fn dispatch_inner(
        &mut self,
        now: Instant,
        slices: usize,
        emit: &mut GatherEmit<'_>,
    ) -> Result<(), EmitBlocked> {
        if self.state == State::Closed {
            return Ok(());
        }
        self.gather_slices = slices.clamp(1, MAX_GATHER);
        self.on_timers(now);
        // Bounded: each pass consumes window, buffer or a flag.
        for _ in 0..4096 {
            let Some(plan) = self.next_plan() else { break };
            let options = self.build_options(now, &plan);
            // Option bytes beyond the timestamp come out of the payload so a
            // segment never exceeds the MSS; TSO frames are whole segments.
            let extra_options =
                options
                    .buffer_len()
                    .saturating_sub(if self.timestamps { 12 } else { 0 });
            let seg_size = self.effective_mss().saturating_sub(extra_options).max(1);
            let mut len = plan.len;
            if len > seg_size {
                len = len / seg_size * seg_size;
            }
            let offset = plan.seq.since(self.snd_una);
            let mut pieces = [&[][..]; MAX_GATHER];
            let (count, sent_len) = if len > 0 {
                self.tx
                    .gather(offset, len, &mut pieces[..self.gather_slices])
            } else {
                (0, 0)
            };
            let fin = plan.fin && sent_len == plan.len;
            let ack_number = plan.with_ack.then_some(self.rcv_nxt);
            let repr = TcpRepr {
                src_port: self.local.port(),
                dst_port: self.remote.port(),
                flags: TcpFlags {
                    syn: plan.syn,
                    fin,
                    rst: plan.rst,
                    psh: sent_len > 0 && offset + sent_len == self.tx.len(),
                },
                seq_number: plan.seq,
                ack_number,
                window_len: self.window_field(plan.syn),
                options,
                payload: &[],
            };
            emit(&repr, &pieces[..count], seg_size)?;
            self.on_sent(now, &plan, sent_len, fin);
            if plan.rst {
                break;
            }
        }
        self.arm_persist(now);
        Ok(())
    }

    fn on_sent(&mut self, now: Instant, plan: &Plan, len: usize, fin: bool) {
        self.counters.segments_out += 1;
        if plan.with_ack {
            self.ack_now = false;
            self.timer_delack = None;
            self.unacked_segments = 0;
            self.last_ack_sent = self.rcv_nxt;
            self.rcv_adv_right = self.rcv_nxt + self.advertised_window_bytes();
        }
        if plan.rst {
            self.counters.resets_out += 1;
            self.rst_due = false;
            self.set_closed(None);
            return;
        }
        let end = plan.seq + len + usize::from(plan.syn) + usize::from(fin);
        match plan.kind {
            PlanKind::Control if plan.syn => {
                self.syn_due = false;
                self.snd_nxt = end;
                self.snd_max = self.snd_max.max(end);
                self.last_send = now;
                if self.timer_rtx.is_none() {
                    self.timer_rtx = Some(now + self.rtt.rto());
                }
            }
            PlanKind::Control => {}
            PlanKind::FastRetransmit => {
                self.counters.retransmitted_segments += 1;
                self.counters.retransmitted_bytes += len as u64;
                self.high_rxt = end;
                self.rtx_next = None;
                if self.timer_rtx.is_none() {
                    self.timer_rtx = Some(now + self.rtt.rto());
                }
            }
            PlanKind::Data => {
                if plan.seq < self.snd_max {
                    self.counters.retransmitted_segments += 1;
                    self.counters.retransmitted_bytes +=
                        len.min(self.snd_max.since(plan.seq)) as u64;
                } else if self.rtt_probe.is_none() && len > 0 {
                    self.rtt_probe = Some((plan.seq, now));
                }
                if self.flight() == 0 && now - self.last_send > self.rtt.rto() {
                    self.cc.on_idle_restart(10 * self.effective_mss());
                }
                self.counters.bytes_out += len as u64;
                self.snd_nxt = end;
                self.snd_max = self.snd_max.max(end);
                self.last_send = now;
                if self.timer_rtx.is_none() {
                    self.timer_rtx = Some(now + self.rtt.rto());
                }
            }
            PlanKind::WindowProbe => {
                self.counters.zero_window_probes += 1;
                self.probe_due = false;
                self.snd_max = self.snd_max.max(end);
                self.persist_backoff += 1;
                let backoff = self
                    .rtt
                    .rto()
                    .saturating_mul(1 << self.persist_backoff.min(10));
                self.timer_persist = Some(now + backoff.min(self.config.max_rto));
            }
            PlanKind::Keepalive => {
                self.counters.keepalive_probes += 1;
                self.keepalive_due = false;
                self.keepalive_sent += 1;
                self.timer_keepalive = self.config.keepalive.map(|k| now + k.interval);
            }
        }
    }

    /// Arms the persist timer when the peer's zero window stalls queued data.
    fn arm_persist(&mut self, now: Instant) {
        let unsent = self
            .tx
            .len()
            .saturating_sub(self.snd_nxt.since(self.snd_una));
        let stalled = self.snd_wnd == 0 && unsent > 0 && self.flight() == 0;
        if stalled && self.is_open() && self.timer_persist.is_none() && !self.probe_due {
            let backoff = self
                .rtt
                .rto()
                .saturating_mul(1 << self.persist_backoff.min(10));
            self.timer_persist = Some(now + backoff.min(self.config.max_rto));
        }
    }
}

mod send;

#[cfg(test)]
mod tests;
