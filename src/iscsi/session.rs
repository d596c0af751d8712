//! A driver that runs the sans-IO login and connection state machines over a
//! [`Transport`]: log in, submit commands, pump bytes, collect events.
//! A `Session` drives one connection: the whole session (MPIO, one session
//! per path), or one connection of an MC/S session, whose connections share
//! the session's CmdSN window ([`super::mcs::McsSession`] holds them).

use super::connection::{
    Command, Completion, ConnError, ConnTimers, Connection, Event, SubmitError,
};
use super::login::{Login, LoginConfig, LoginError, LoginOutcome, LoginProgress};
use super::params::Params;
use super::window::SessionWindow;
use crate::transport::{RxSink, Transport, TransportError, TxPart};
use crate::wire::iscsi::{Digests, IscsiWireError, PduFramer, PduHeader, Sn};
use crate::wire::text::TextPairs;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Login(#[from] LoginError),
    #[error(transparent)]
    Connection(#[from] ConnError),
    #[error("cannot submit: {0}")]
    Submit(#[from] SubmitError),
    #[error("malformed login PDU from target: {0}")]
    LoginWire(#[from] IscsiWireError),
    #[error("target sent a {0} PDU during login")]
    UnexpectedLoginPdu(String),
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
}

/// What the driver does when there is nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin (poll-mode): lowest latency, one core busy.
    BusyPoll,
    /// Block in the transport for up to this long (shared machines, CLI).
    Wait(Duration),
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub login: LoginConfig,
    pub timers: ConnTimers,
    pub login_timeout: Duration,
    pub idle: IdlePolicy,
}

impl SessionConfig {
    pub fn new(login: LoginConfig) -> SessionConfig {
        SessionConfig {
            login,
            timers: ConnTimers::default(),
            login_timeout: Duration::from_secs(10),
            idle: IdlePolicy::Wait(Duration::from_millis(2)),
        }
    }
}

pub struct Session<T: Transport> {
    conn: Connection,
    transport: T,
    outcome: LoginOutcome,
    idle: IdlePolicy,
    /// How long the last [`poll_io_wait`](Session::poll_io_wait) waited.
    waited: Duration,
}

impl<T: Transport> std::fmt::Debug for Session<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tsih", &self.outcome.tsih)
            .field("conn", &self.conn)
            .finish_non_exhaustive()
    }
}

/// Sends everything in `buf` (spinning/waiting on a full transport).
fn send_all<T: Transport>(
    t: &mut T,
    mut buf: &[u8],
    deadline: Instant,
) -> Result<(), SessionError> {
    while !buf.is_empty() {
        t.poll()?;
        let n = t.send(buf)?;
        buf = &buf[n..];
        if n == 0 {
            if Instant::now() >= deadline {
                return Err(SessionError::Timeout {
                    what: "sending to the target",
                    after: Duration::ZERO,
                });
            }
            t.wait(Duration::from_micros(200))?;
        }
    }
    Ok(())
}

/// The connection as the reader of its transport's bytes. The time is the
/// transport's own for the round ([`RxSink::rx_time`], the userspace
/// stack's), or else taken when the first bytes are handed over, not when
/// the receive began: a waiting receive may block for milliseconds first.
/// It is read once per round: every segment of one receive burst arrived
/// at the same moment for the connection's timers (a clock read per
/// segment cost more than the segment's iSCSI bookkeeping), and the
/// round's timer check uses it too.
struct ConnSink<'a> {
    conn: &'a mut Connection,
    error: Option<ConnError>,
    now: Option<Instant>,
}

impl ConnSink<'_> {
    fn new(conn: &mut Connection) -> ConnSink<'_> {
        ConnSink {
            conn,
            error: None,
            now: None,
        }
    }

    fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }
}

impl RxSink for ConnSink<'_> {
    fn rx_buffers(&mut self) -> (&mut [u8], &mut [u8]) {
        self.conn.rx_buffers()
    }

    fn rx_commit(&mut self, n: usize) -> bool {
        if self.error.is_some() {
            return false;
        }
        let now = self.now();
        match self.conn.commit_rx(n, now) {
            Ok(()) => true,
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }

    fn rx_time(&mut self, now: Instant) {
        self.now = Some(now);
    }

    fn rx_push(&mut self, bytes: &[u8]) -> usize {
        if self.error.is_some() {
            return 0;
        }
        let now = self.now();
        match self.conn.receive(bytes, now) {
            Ok(()) => bytes.len(),
            Err(e) => {
                self.error = Some(e);
                0
            }
        }
    }
}

/// Which connection of its session a login makes.
#[derive(Debug, Clone, Copy)]
pub enum Joining<'a> {
    /// The only connection of its session (MPIO).
    Alone,
    /// The leading connection of an MC/S session: its window is the one
    /// later connections share ([`Connection::window`]).
    Leading,
    /// One more connection of a running MC/S session: the session's window,
    /// the connection's index in the session (0..16, in its ITTs) and the
    /// leading login's parameters. `SessionConfig::login` carries the
    /// session's ISID and TSIH and the new CID.
    More {
        window: &'a Arc<SessionWindow>,
        index: u8,
        leading: &'a Params,
    },
}

impl<T: Transport> Session<T> {
    /// Logs in over a connected transport.
    pub fn login(transport: T, config: &SessionConfig) -> Result<Session<T>, SessionError> {
        Session::login_joining(transport, config, Joining::Alone)
    }

    /// Logs in over a connected transport as the connection `joining` says.
    pub fn login_joining(
        mut transport: T,
        config: &SessionConfig,
        joining: Joining<'_>,
    ) -> Result<Session<T>, SessionError> {
        let start = Instant::now();
        let deadline = start + config.login_timeout;
        let mut login = match joining {
            Joining::More {
                window, leading, ..
            } => Login::non_leading(config.login.clone(), 0, window.next_cmd_sn(), leading),
            Joining::Alone | Joining::Leading => Login::new(config.login.clone(), 0, Sn(1)),
        };
        let mut out = Vec::new();
        login.start(&mut out);
        // During login the target may send up to 8 KiB per PDU; allow more to
        // be lenient with targets that ignore that, but stay bounded.
        let framer = PduFramer {
            digests: Digests::default(),
            max_data_segment_len: 65536,
        };
        let mut inbuf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            send_all(&mut transport, &out, deadline)?;
            out.clear();
            // Read until one whole login response is there.
            let framed = loop {
                if let Some(f) = framer.frame(&inbuf)? {
                    break f;
                }
                // Checked on every round, not only when nothing arrived: a
                // target that keeps talking must not keep the login alive.
                if Instant::now() >= deadline {
                    return Err(SessionError::Timeout {
                        what: "login",
                        after: config.login_timeout,
                    });
                }
                transport.poll()?;
                let n = transport.recv(&mut chunk)?;
                if n == 0 {
                    transport.wait(Duration::from_millis(5))?;
                }
                inbuf.extend_from_slice(&chunk[..n]);
            };
            let data = inbuf[framed.data.clone()].to_vec();
            inbuf.drain(..framed.total_len);
            let PduHeader::LoginResponse(rsp) = &framed.header else {
                return Err(SessionError::UnexpectedLoginPdu(
                    framed.header.opcode().to_string(),
                ));
            };
            match login.on_response(rsp, &data, &mut out)? {
                LoginProgress::Continue => {}
                LoginProgress::Done(outcome) => {
                    let now = Instant::now();
                    let mut conn = match joining {
                        Joining::Alone => Connection::new(&outcome, config.timers, now),
                        Joining::Leading => {
                            let window = Arc::new(SessionWindow::new(
                                outcome.cmd_sn,
                                outcome.exp_cmd_sn,
                                outcome.max_cmd_sn,
                            ));
                            Connection::in_session(&outcome, config.timers, now, window, 0)
                        }
                        Joining::More { window, index, .. } => Connection::in_session(
                            &outcome,
                            config.timers,
                            now,
                            window.clone(),
                            index,
                        ),
                    };
                    // Write payload leaves from the caller's buffer (one copy:
                    // the kernel's, or the userspace stack's into the frame).
                    conn.set_tx_by_reference(true);
                    if !inbuf.is_empty() {
                        conn.receive(&inbuf, Instant::now())?;
                    }
                    return Ok(Session {
                        conn,
                        transport,
                        outcome,
                        idle: config.idle,
                        waited: Duration::ZERO,
                    });
                }
            }
        }
    }

    pub fn outcome(&self) -> &LoginOutcome {
        &self.outcome
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }
    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn submit(&mut self, cmd: Command) -> Result<(), SessionError> {
        self.submit_at(cmd, Instant::now())
    }

    /// [`submit`](Self::submit) with the time the caller just read (a job
    /// loop that times each I/O has the clock in hand already).
    pub fn submit_at(&mut self, cmd: Command, now: Instant) -> Result<(), SessionError> {
        self.conn.submit(cmd, now)?;
        Ok(())
    }

    /// One round of I/O: flush output, read input, run timers. Returns true
    /// if anything moved. Errors mean the connection is dead; take the
    /// outstanding commands back with [`Connection::take_outstanding`].
    pub fn poll_io(&mut self) -> Result<bool, SessionError> {
        self.poll_io_wait(Duration::ZERO)
    }

    /// One round of I/O like [`poll_io`](Self::poll_io), but when nothing
    /// has arrived it waits for the target's bytes up to `max` (less when a
    /// timer is due; not at all in busy-poll mode or while bytes wait to go
    /// out) and takes them in the same call: on kernel TCP a QD1 round is
    /// one send and one receive. [`waited`](Self::waited) says how long it
    /// waited.
    pub fn poll_io_wait(&mut self, max: Duration) -> Result<bool, SessionError> {
        self.waited = Duration::ZERO;
        let r = self.poll_io_inner(max);
        if let Err(e) = &r {
            self.conn.set_failed(ConnError::Failed(e.to_string()));
        }
        r
    }

    /// How long the last [`poll_io_wait`](Self::poll_io_wait) spent waiting
    /// (spinning, sleeping or blocked) rather than working.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Hands the connection's pending bytes to the transport, headers and
    /// the callers' write buffers (by reference) in one call; returns the
    /// bytes taken.
    fn send_pending(&mut self) -> Result<usize, SessionError> {
        // Most poll rounds have nothing to send: skip building the parts.
        if !self.conn.has_pending_tx() {
            return Ok(0);
        }
        let mut parts = [TxPart::Bytes(&[]); 16];
        let count = self.conn.tx_parts(&mut parts);
        if count == 0 {
            return Ok(0);
        }
        let n = self.transport.send_parts(&parts[..count])?;
        self.conn.consume_tx(n);
        Ok(n)
    }

    fn poll_io_inner(&mut self, max: Duration) -> Result<bool, SessionError> {
        if let Some(e) = self.conn.is_failed() {
            return Err(e.clone().into());
        }
        let mut progressed = false;
        // Another connection of an MC/S session may have opened the window.
        self.conn.send_queued();
        while self.send_pending()? > 0 {
            progressed = true;
        }
        let mut wait = match self.idle {
            IdlePolicy::BusyPoll => Duration::ZERO,
            // A full send buffer empties without bytes arriving.
            IdlePolicy::Wait(_) if self.conn.has_pending_tx() => Duration::ZERO,
            IdlePolicy::Wait(_) => max,
        };
        if !wait.is_zero() {
            if let Some(t) = self.conn.poll_timeout() {
                wait = wait.min(t.saturating_duration_since(Instant::now()));
            }
        }
        // The transport's own work and the receive, in one: it puts each
        // byte where the connection wants it (Data-In payload straight into
        // the command's buffer).
        let mut sink = ConnSink::new(&mut self.conn);
        let received = self.transport.recv_into_wait(&mut sink, wait);
        let round_time = sink.now;
        if let Some(e) = sink.error {
            return Err(e.into());
        }
        let received = received?;
        self.waited = received.waited;
        if received.bytes > 0 {
            progressed = true;
        }
        if self.conn.has_pending_tx() {
            // Answers to what we just received (R2T data, NOP-Out) go out now.
            self.send_pending()?;
        }
        let now = round_time.unwrap_or_else(Instant::now);
        if let Some(t) = self.conn.poll_timeout() {
            if now >= t {
                self.conn.handle_timeout(now)?;
            }
        }
        Ok(progressed)
    }

    /// Waits for the next event, pumping I/O, for up to `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, SessionError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.conn.poll_event() {
                return Ok(Some(e));
            }
            let wait = match self.idle {
                IdlePolicy::BusyPoll => Duration::ZERO,
                IdlePolicy::Wait(d) => d.min(deadline.saturating_duration_since(Instant::now())),
            };
            let progressed = match self.poll_io_wait(wait) {
                Ok(p) => p,
                // What arrived before the failure (say, a final response
                // followed by the target closing) is delivered first; the
                // failure is sticky and comes with the next call.
                Err(e) => return self.conn.poll_event().map(Some).ok_or(e),
            };
            if let Some(e) = self.conn.poll_event() {
                return Ok(Some(e));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if !progressed && self.waited.is_zero() {
                // No waiting receive (bytes still to send): wait here.
                self.idle_wait(deadline - now)?;
            }
        }
    }

    /// Waits (per the idle policy) for the transport to have something, up to
    /// `max`. Poll-mode callers call this after a [`poll_io`](Self::poll_io)
    /// that moved nothing, so an idle session sleeps instead of spinning.
    pub fn wait_for_io(&mut self, max: Duration) -> Result<(), SessionError> {
        self.idle_wait(max)
    }

    /// Blocks until the transport has something, `wake` is notified or
    /// `max` passes (less while bytes wait to go out, or a timer is due).
    pub fn wait_or_wake(
        &mut self,
        wake: &crate::transport::Wake,
        max: Duration,
    ) -> Result<(), SessionError> {
        let mut d = if !self.conn.has_pending_tx() {
            max
        } else {
            Duration::from_micros(100)
        };
        if let Some(t) = self.conn.poll_timeout() {
            d = d.min(t.saturating_duration_since(Instant::now()));
        }
        self.transport.wait_or_wake(wake, d)?;
        Ok(())
    }

    fn idle_wait(&mut self, left: Duration) -> Result<(), SessionError> {
        match self.idle {
            IdlePolicy::BusyPoll => Ok(()),
            IdlePolicy::Wait(_) if self.transport.is_busy_polled() => {
                std::thread::yield_now();
                Ok(())
            }
            IdlePolicy::Wait(d) => {
                // Don't block while we still have bytes to push out.
                let d = if !self.conn.has_pending_tx() {
                    d
                } else {
                    Duration::from_micros(100)
                };
                self.transport.wait(d.min(left))?;
                Ok(())
            }
        }
    }

    /// Runs one command to completion (blocking convenience).
    pub fn execute(
        &mut self,
        mut cmd: Command,
        timeout: Duration,
    ) -> Result<Completion, SessionError> {
        // A tag unlikely to collide with asynchronous users of this session.
        const SYNC_TAG: u64 = u64::MAX - 1;
        cmd.user_tag = SYNC_TAG;
        self.submit(cmd)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                Some(Event::Completed(c)) if c.user_tag == SYNC_TAG => return Ok(c),
                Some(_) => {}
                None => {
                    return Err(SessionError::Timeout {
                        what: "SCSI command",
                        after: timeout,
                    })
                }
            }
        }
    }

    /// Sends a text request and waits for the whole answer.
    pub fn text(
        &mut self,
        pairs: &TextPairs,
        timeout: Duration,
    ) -> Result<TextPairs, SessionError> {
        const TEXT_TAG: u64 = u64::MAX - 2;
        self.conn.text_request(pairs, TEXT_TAG, Instant::now())?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                Some(Event::Text { user_tag, pairs }) if user_tag == TEXT_TAG => return Ok(pairs),
                Some(_) => {}
                None => {
                    return Err(SessionError::Timeout {
                        what: "text request",
                        after: timeout,
                    })
                }
            }
        }
    }

    /// Task management (ABORT TASK, LUN RESET...), waiting for the answer.
    pub fn task_management(
        &mut self,
        function: u8,
        lun: u64,
        referenced: Option<u64>,
        timeout: Duration,
    ) -> Result<u8, SessionError> {
        const TMF_TAG: u64 = u64::MAX - 3;
        self.conn
            .task_management(function, lun, referenced, TMF_TAG, Instant::now())?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                Some(Event::TaskManagement { user_tag, response }) if user_tag == TMF_TAG => {
                    return Ok(response)
                }
                Some(_) => {}
                None => {
                    return Err(SessionError::Timeout {
                        what: "task management request",
                        after: timeout,
                    })
                }
            }
        }
    }

    /// Logs out and closes the transport.
    pub fn logout(mut self, timeout: Duration) -> Result<(), SessionError> {
        self.conn.logout(Instant::now())?;
        let deadline = Instant::now() + timeout;
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left) {
                Ok(Some(Event::LoggedOut { .. })) => break Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => {
                    break Err(SessionError::Timeout {
                        what: "logout",
                        after: timeout,
                    })
                }
                // A target may close right after answering.
                Err(SessionError::Transport(TransportError::Closed)) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.transport.close();
        result
    }

    /// Takes the transport back and returns unfinished commands (after a failure).
    pub fn into_parts(mut self) -> (T, Vec<Command>) {
        let cmds = self.conn.take_outstanding();
        (self.transport, cmds)
    }
}

/// Test helpers shared with the layers above (the multipath worker tests
/// run real sessions over these).
#[cfg(test)]
pub(crate) mod testing {
    use crate::transport::{Transport, TransportError};
    use crate::wire::iscsi::{
        encode_pdu, Digests, LoginResponse, PduHeader, ScsiResponse, Sn, Stage,
    };
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// An in-memory transport: each send releases the next scripted chunk of
    /// target bytes; once the script is used up and read, the peer has closed.
    pub(crate) struct Scripted {
        pub stages: VecDeque<Vec<u8>>,
        pub rx: VecDeque<u8>,
    }

    impl Transport for Scripted {
        fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
            if let Some(s) = self.stages.pop_front() {
                self.rx.extend(s);
            }
            Ok(buf.len())
        }
        // One transmission, one stage, however many pieces it has.
        fn send_parts(
            &mut self,
            parts: &[crate::transport::TxPart<'_>],
        ) -> Result<usize, TransportError> {
            if let Some(s) = self.stages.pop_front() {
                self.rx.extend(s);
            }
            Ok(parts.iter().map(|p| p.bytes().len()).sum())
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
            if self.rx.is_empty() {
                return if self.stages.is_empty() {
                    Err(TransportError::Closed)
                } else {
                    Ok(0)
                };
            }
            let n = buf.len().min(self.rx.len());
            for (d, s) in buf.iter_mut().zip(self.rx.drain(..n)) {
                *d = s;
            }
            Ok(n)
        }
        fn poll(&mut self) -> Result<(), TransportError> {
            Ok(())
        }
        fn wait(&mut self, _: Duration) -> Result<(), TransportError> {
            Ok(())
        }
        fn close(&mut self) {}
        fn local_addr(&self) -> Option<SocketAddr> {
            None
        }
        fn peer_addr(&self) -> Option<SocketAddr> {
            None
        }
    }

    pub(crate) fn login_rsp(csg: Stage, nsg: Stage, stat_sn: u32, text: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        let h = PduHeader::LoginResponse(LoginResponse {
            transit: true,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_active: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 1,
            itt: 0,
            stat_sn: Sn(stat_sn),
            exp_cmd_sn: Sn(1),
            max_cmd_sn: Sn(8),
            status_class: 0,
            status_detail: 0,
        });
        encode_pdu(&mut v, &h, text, Digests::default());
        v
    }

    /// The two login responses `Scripted` plays to a login with ISID
    /// 80 00 00 00 00 01; the session ends up at StatSN 102, CmdSN window
    /// 1..8.
    pub(crate) fn login_stages() -> Vec<Vec<u8>> {
        vec![
            login_rsp(
                Stage::Security,
                Stage::Operational,
                100,
                b"AuthMethod=None\0",
            ),
            login_rsp(Stage::Operational, Stage::FullFeature, 101, &[]),
        ]
    }

    /// A SCSI Response PDU (no sense, no residual).
    pub(crate) fn scsi_response(itt: u32, stat_sn: u32, status: u8) -> Vec<u8> {
        let mut v = Vec::new();
        let h = PduHeader::ScsiResponse(ScsiResponse {
            status,
            itt,
            stat_sn: Sn(stat_sn),
            exp_cmd_sn: Sn(2),
            max_cmd_sn: Sn(9),
            ..ScsiResponse::default()
        });
        encode_pdu(&mut v, &h, &[], Digests::default());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{login_stages, Scripted};
    use super::*;
    use crate::iscsi::connection::Direction;
    use crate::wire::iscsi::{encode_pdu, ScsiResponse};
    use std::collections::VecDeque;

    /// Regression: a target that sends a command's final response and closes
    /// at once. The completion arrived before the close and must be
    /// delivered; the close is reported on the next call, and stays reported.
    #[test]
    fn completion_before_close_is_delivered_and_failure_is_sticky() {
        let mut status = Vec::new();
        let rsp = PduHeader::ScsiResponse(ScsiResponse {
            status: 0,
            itt: 0x2_0000,
            stat_sn: Sn(102),
            exp_cmd_sn: Sn(2),
            max_cmd_sn: Sn(9),
            ..ScsiResponse::default()
        });
        encode_pdu(&mut status, &rsp, &[], Digests::default());
        let t = Scripted {
            stages: login_stages().into_iter().chain([status]).collect(),
            rx: VecDeque::new(),
        };
        let mut config = SessionConfig::new(LoginConfig::new("iqn.i", Some("iqn.t")));
        config.login.isid = [0x80, 0, 0, 0, 0, 1];
        config.idle = IdlePolicy::BusyPoll;
        let mut s = Session::login(t, &config).expect("login");
        let cmd = Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap();
        let done = s.execute(cmd, Duration::from_secs(1)).expect("completion");
        assert_eq!(done.status, 0);
        let e = s.next_event(Duration::from_millis(10)).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
        let e = s.next_event(Duration::from_millis(10)).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }
}
