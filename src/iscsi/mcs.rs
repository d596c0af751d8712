//! MC/S: several connections in one session (RFC 7143 §4.1, §6.3), driven
//! inline on one thread.
//!
//! The leading login offers `MaxConnections` (from `Offer::max_connections`)
//! and makes the session (its TSIH); every further connection logs in with
//! the session's ISID and TSIH, a CID of its own and only the
//! per-connection keys ([`Login::non_leading`](super::login::Login::non_leading)).
//! The connections share one lock-free CmdSN window
//! ([`SessionWindow`]); each keeps its own StatSN, and a command's R2T,
//! Data-Out, Data-In and status stay on the connection it was sent on
//! (connection allegiance: its ITT names the connection).
//!
//! What happens to the commands of a failed connection depends on the
//! error recovery level: at ERL 0 a failed connection fails the session
//! (RFC 7143 §7.1.5: session recovery), so the commands come back to the
//! caller as on a failed MPIO path.

use super::connection::{Command, Completion, Event};
use super::params::Params;
use super::session::{Joining, Session, SessionConfig, SessionError};
use super::window::SessionWindow;
use crate::transport::Transport;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Most connections one session carries here: a connection's index sits in
/// 4 bits of its ITTs.
pub const MAX_MCS_CONNECTIONS: usize = 16;

#[derive(Debug, Error)]
pub enum McsError {
    #[error("leading login: {0}")]
    Leading(#[source] SessionError),
    #[error(
        "the target granted MaxConnections={granted} (we offered {offered}): connection {wanted} of the session is not allowed; use sessions of their own (MPIO) instead"
    )]
    NotGranted {
        offered: u32,
        granted: u32,
        wanted: usize,
    },
    #[error("the target granted MaxConnections={granted}, then refused the login of connection CID {cid} of session TSIH {tsih:#06x}: {source}")]
    LoginRefused {
        cid: u16,
        tsih: u16,
        granted: u32,
        #[source]
        source: SessionError,
    },
    #[error("CID {cid} is already a live connection of session TSIH {tsih:#06x}: a new connection needs a CID of its own (or reinstate the failed one)")]
    CidInUse { cid: u16, tsih: u16 },
    #[error("no connection with CID {0} in this session")]
    NoSuchConnection(u16),
    #[error("at most {MAX_MCS_CONNECTIONS} connections per session")]
    TooManyConnections,
    #[error("connection CID {cid} failed: {source}")]
    ConnectionFailed {
        cid: u16,
        #[source]
        source: SessionError,
    },
    #[error("the session runs at ErrorRecoveryLevel {erl}: the tasks of a failed connection cannot be reassigned (ERL 2); reinstate the session instead, as for a failed MPIO path")]
    NeedsErl2 { erl: u32 },
    #[error("logout of failed connection CID {cid} for recovery (reason 2) answered {response} (2 = recovery not supported)")]
    RemoveRefused { cid: u16, response: u8 },
    #[error("no live connection left in the session")]
    NoConnection,
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// One connection of the session.
struct Member<T: Transport> {
    cid: u16,
    session: Session<T>,
    failed: bool,
}

/// An MC/S session over several transports, driven on one thread.
pub struct McsSession<T: Transport> {
    /// Indexed by the connection's index in the session (its ITT bits).
    members: Vec<Option<Member<T>>>,
    window: Arc<SessionWindow>,
    config: SessionConfig,
    leading: Params,
    tsih: u16,
    events: VecDeque<(u16, Event)>,
    /// Connection failures not reported yet (each is reported once, after
    /// the events that came before it).
    failures: VecDeque<McsError>,
}

impl<T: Transport> std::fmt::Debug for McsSession<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McsSession")
            .field("tsih", &self.tsih)
            .field("cids", &self.cids())
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> McsSession<T> {
    /// The leading login over `transport` with `config.login.cid` as its
    /// CID, offering `config.login.offer.max_connections`.
    pub fn open(transport: T, config: &SessionConfig) -> Result<McsSession<T>, McsError> {
        let session = Session::login_joining(transport, config, Joining::Leading)
            .map_err(McsError::Leading)?;
        let outcome = session.outcome().clone();
        let window = session.connection().window().clone();
        let mut config = config.clone();
        config.login.isid = outcome.isid;
        config.login.tsih = outcome.tsih;
        Ok(McsSession {
            members: vec![Some(Member {
                cid: outcome.cid,
                session,
                failed: false,
            })],
            window,
            config,
            leading: outcome.params,
            tsih: outcome.tsih,
            events: VecDeque::new(),
            failures: VecDeque::new(),
        })
    }

    /// The session's TSIH.
    pub fn tsih(&self) -> u16 {
        self.tsih
    }

    /// The MaxConnections the target granted.
    pub fn granted(&self) -> u32 {
        self.leading.max_connections
    }

    /// The leading login's (session-wide) parameters.
    pub fn params(&self) -> &Params {
        &self.leading
    }

    pub fn window(&self) -> &Arc<SessionWindow> {
        &self.window
    }

    /// The CIDs of the session's connections, live or failed.
    pub fn cids(&self) -> Vec<u16> {
        self.members.iter().flatten().map(|m| m.cid).collect()
    }

    /// The connection with CID `cid`.
    pub fn session(&self, cid: u16) -> Option<&Session<T>> {
        self.member(cid).map(|m| &m.session)
    }

    fn member(&self, cid: u16) -> Option<&Member<T>> {
        self.members.iter().flatten().find(|m| m.cid == cid)
    }

    fn live(&self) -> usize {
        self.members.iter().flatten().filter(|m| !m.failed).count()
    }

    /// Adds a connection with CID `cid` over `transport`: a login with the
    /// session's ISID and TSIH. The connection count is checked against
    /// the granted MaxConnections first, and the CID against the live ones.
    pub fn add_connection(&mut self, transport: T, cid: u16) -> Result<(), McsError> {
        if let Some(m) = self.member(cid) {
            if !m.failed {
                return Err(McsError::CidInUse {
                    cid,
                    tsih: self.tsih,
                });
            }
        }
        let wanted = self.live() + 1;
        if wanted as u64 > u64::from(self.granted()) {
            return Err(McsError::NotGranted {
                offered: self.config.login.offer.max_connections,
                granted: self.granted(),
                wanted,
            });
        }
        // A failed connection with this CID is reinstated (RFC 7143 §6.3.4:
        // the target ends the old connection); it keeps its index.
        let index = match self
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.cid == cid))
        {
            Some(i) => i,
            None => match self.members.iter().position(Option::is_none) {
                Some(i) => i,
                None if self.members.len() < MAX_MCS_CONNECTIONS => {
                    self.members.push(None);
                    self.members.len() - 1
                }
                None => return Err(McsError::TooManyConnections),
            },
        };
        let mut config = self.config.clone();
        config.login.cid = cid;
        let joining = Joining::More {
            window: &self.window,
            index: index as u8,
            leading: &self.leading,
        };
        let session = Session::login_joining(transport, &config, joining).map_err(|source| {
            McsError::LoginRefused {
                cid,
                tsih: self.tsih,
                granted: self.granted(),
                source,
            }
        })?;
        self.members[index] = Some(Member {
            cid,
            session,
            failed: false,
        });
        Ok(())
    }

    /// Submits on the live connection with the fewest commands
    /// outstanding; returns its CID.
    pub fn submit(&mut self, cmd: Command) -> Result<u16, McsError> {
        let m = self
            .members
            .iter_mut()
            .flatten()
            .filter(|m| !m.failed)
            .min_by_key(|m| m.session.connection().outstanding())
            .ok_or(McsError::NoConnection)?;
        m.session.submit(cmd)?;
        Ok(m.cid)
    }

    /// Submits on connection `cid`.
    pub fn submit_on(&mut self, cid: u16, cmd: Command) -> Result<(), McsError> {
        let m = self
            .members
            .iter_mut()
            .flatten()
            .find(|m| m.cid == cid && !m.failed)
            .ok_or(McsError::NoSuchConnection(cid))?;
        m.session.submit(cmd)?;
        Ok(())
    }

    /// One round on every live connection. A connection that fails is
    /// reported once as [`McsError::ConnectionFailed`] (by this call or,
    /// when several fail, the next ones); the others go on.
    pub fn poll_io(&mut self) -> Result<bool, McsError> {
        let progressed = self.poll_round();
        match self.failures.pop_front() {
            Some(e) => Err(e),
            None => Ok(progressed),
        }
    }

    fn poll_round(&mut self) -> bool {
        let mut progressed = false;
        for m in self.members.iter_mut().flatten().filter(|m| !m.failed) {
            match m.session.poll_io() {
                Ok(p) => progressed |= p,
                Err(e) => {
                    m.failed = true;
                    self.failures.push_back(McsError::ConnectionFailed {
                        cid: m.cid,
                        source: e,
                    });
                }
            }
            while let Some(e) = m.session.connection_mut().poll_event() {
                self.events.push_back((m.cid, e));
            }
        }
        progressed
    }

    /// The next event of any connection, with the CID it came on; a
    /// connection's failure ([`McsError::ConnectionFailed`]) comes once,
    /// after the events that arrived before it.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<(u16, Event)>, McsError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            if let Some(f) = self.failures.pop_front() {
                return Err(f);
            }
            if self.live() == 0 {
                return Err(McsError::NoConnection);
            }
            let progressed = self.poll_round();
            if !self.events.is_empty() || !self.failures.is_empty() {
                continue;
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            if !progressed {
                std::thread::yield_now();
            }
        }
    }

    /// Runs one command to completion on the least busy connection.
    pub fn execute(&mut self, mut cmd: Command, timeout: Duration) -> Result<Completion, McsError> {
        const SYNC_TAG: u64 = u64::MAX - 1;
        cmd.user_tag = SYNC_TAG;
        self.submit(cmd)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                Some((_, Event::Completed(c))) if c.user_tag == SYNC_TAG => return Ok(c),
                Some(_) => {}
                None => {
                    return Err(McsError::Timeout {
                        what: "SCSI command",
                        after: timeout,
                    })
                }
            }
        }
    }

    /// Takes back the unfinished commands of failed connection `cid` and
    /// drops it from the session (ERL 0: none of them was acknowledged; at
    /// ERL 0 the caller must reinstate the session before resending a
    /// write, as after a failed MPIO path).
    pub fn take_failed(&mut self, cid: u16) -> Result<Vec<Command>, McsError> {
        let i = self
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.cid == cid && m.failed))
            .ok_or(McsError::NoSuchConnection(cid))?;
        let m = self.members[i]
            .take()
            .ok_or(McsError::NoSuchConnection(cid))?;
        let (_, cmds) = m.session.into_parts();
        Ok(cmds)
    }

    /// ERL 2 recovery of failed connection `failed` through live connection
    /// `via` (RFC 7143 §6.2.2): a logout with reason 2 (remove the
    /// connection for recovery) for `failed`, sent on `via` (answered 0, or
    /// 1 "CID not found" when the target has seen it fail and dropped it
    /// already: its tasks wait in the session either way). Then every task
    /// that was sent on `failed` moves to `via`: those the target received
    /// (CmdSN below the session's ExpCmdSN after the logout) with TASK
    /// REASSIGN (the answers come as [`Event::Reassigned`] from
    /// [`next_event`](Self::next_event); a refused one brings its command
    /// back to the caller, not done, and nothing waits for it), those it
    /// never received sent again with their ITT and CmdSN
    /// ([`Connection::retry`](super::connection::Connection::retry)), so
    /// the session's CmdSN order has no hole; those that never got a CmdSN
    /// are submitted on `via` anew. Returns how many sent tasks moved.
    pub fn recover(&mut self, failed: u16, via: u16, timeout: Duration) -> Result<usize, McsError> {
        let erl = self.leading.error_recovery_level;
        if erl < 2 {
            return Err(McsError::NeedsErl2 { erl });
        }
        let fi = self
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.cid == failed && m.failed))
            .ok_or(McsError::NoSuchConnection(failed))?;
        let vi = self
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.cid == via && !m.failed))
            .ok_or(McsError::NoSuchConnection(via))?;
        {
            let v = self.members[vi]
                .as_mut()
                .ok_or(McsError::NoSuchConnection(via))?;
            v.session
                .connection_mut()
                .logout_reason(2, failed, Instant::now())
                .map_err(SessionError::from)?;
            let deadline = Instant::now() + timeout;
            loop {
                match v.session.next_event(Duration::from_millis(20)) {
                    Ok(Some(Event::ConnectionLoggedOut { cid, response, .. })) if cid == failed => {
                        if response > 1 {
                            return Err(McsError::RemoveRefused { cid, response });
                        }
                        break;
                    }
                    Ok(Some(e)) => self.events.push_back((via, e)),
                    Ok(None) if Instant::now() >= deadline => {
                        return Err(McsError::Timeout {
                            what: "logout for recovery",
                            after: timeout,
                        })
                    }
                    Ok(None) => {}
                    Err(e) => {
                        v.failed = true;
                        return Err(McsError::ConnectionFailed {
                            cid: via,
                            source: e,
                        });
                    }
                }
            }
        }
        let mut f = self.members[fi]
            .take()
            .ok_or(McsError::NoSuchConnection(failed))?;
        let (orphans, unsent) = f.session.connection_mut().take_orphans();
        let (mut t, _) = f.session.into_parts();
        t.close();
        let v = self.members[vi]
            .as_mut()
            .ok_or(McsError::NoSuchConnection(via))?;
        // What the target received of the failed connection's commands:
        // the Logout Response came after it left the session.
        let exp = self.window.exp_cmd_sn();
        let n = orphans.len();
        for o in orphans {
            let conn = v.session.connection_mut();
            let r = if o.cmd.immediate || o.cmd_sn.lt(exp) {
                conn.reassign(o, Instant::now())
            } else {
                conn.retry(o, Instant::now())
            };
            r.map_err(|n| SessionError::from(n.error))?;
        }
        for c in unsent {
            v.session.submit(c)?;
        }
        Ok(n)
    }

    /// Marks connection `cid` failed (say, its link is known to be down),
    /// so it takes no more commands.
    pub fn mark_failed(&mut self, cid: u16) {
        for m in self.members.iter_mut().flatten().filter(|m| m.cid == cid) {
            m.failed = true;
            m.session
                .connection_mut()
                .set_failed(super::connection::ConnError::Failed("marked failed".into()));
        }
    }

    /// Logs out connection `cid` alone (reason 1, on that connection) and
    /// drops it from the session; the others stay.
    pub fn remove_connection(&mut self, cid: u16, timeout: Duration) -> Result<(), McsError> {
        if self.live() <= 1 {
            // The last connection's logout ends the session: use logout().
            return Err(McsError::NoConnection);
        }
        let i = self
            .members
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| m.cid == cid))
            .ok_or(McsError::NoSuchConnection(cid))?;
        let m = self.members[i]
            .as_mut()
            .ok_or(McsError::NoSuchConnection(cid))?;
        m.session
            .connection_mut()
            .logout_reason(1, cid, Instant::now())
            .map_err(SessionError::from)?;
        let deadline = Instant::now() + timeout;
        loop {
            match m.session.next_event(Duration::from_millis(50)) {
                Ok(Some(Event::LoggedOut { .. })) => break,
                Ok(Some(e)) => self.events.push_back((cid, e)),
                Ok(None) if Instant::now() >= deadline => {
                    return Err(McsError::Timeout {
                        what: "connection logout",
                        after: timeout,
                    })
                }
                Ok(None) => {}
                Err(SessionError::Transport(crate::transport::TransportError::Closed)) => break,
                Err(e) => return Err(McsError::ConnectionFailed { cid, source: e }),
            }
        }
        if let Some(m) = self.members[i].take() {
            let (mut t, _) = m.session.into_parts();
            t.close();
        }
        Ok(())
    }

    /// Logs the whole session out (on the first live connection) and closes
    /// every transport.
    pub fn logout(mut self, timeout: Duration) -> Result<(), McsError> {
        let mut members: Vec<Member<T>> = self.members.drain(..).flatten().collect();
        let lead = members
            .iter()
            .position(|m| !m.failed)
            .ok_or(McsError::NoConnection)?;
        let m = members.swap_remove(lead);
        // Reason 0 closes every connection of the session at the target.
        let r = m.session.logout(timeout);
        for other in members {
            let (mut t, _) = other.session.into_parts();
            t.close();
        }
        r?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::connection::Direction;
    use crate::iscsi::login::LoginConfig;
    use crate::iscsi::session::testing::{login_rsp, scsi_response, Scripted};
    use crate::iscsi::session::IdlePolicy;
    use crate::wire::iscsi::{encode_pdu, Digests, LoginResponse, PduHeader, Sn, Stage};

    fn leading(granted: &str) -> Scripted {
        let op = format!("MaxConnections={granted}\0");
        Scripted {
            stages: [
                login_rsp(
                    Stage::Security,
                    Stage::Operational,
                    100,
                    b"AuthMethod=None\0",
                ),
                login_rsp(Stage::Operational, Stage::FullFeature, 101, op.as_bytes()),
            ]
            .into_iter()
            .collect(),
            rx: VecDeque::new(),
        }
    }

    fn more(stages: Vec<Vec<u8>>) -> Scripted {
        Scripted {
            stages: stages.into_iter().collect(),
            rx: VecDeque::new(),
        }
    }

    fn joined() -> Vec<Vec<u8>> {
        vec![
            login_rsp(
                Stage::Security,
                Stage::Operational,
                500,
                b"AuthMethod=None\0",
            ),
            login_rsp(Stage::Operational, Stage::FullFeature, 501, &[]),
        ]
    }

    fn refused() -> Vec<u8> {
        let mut v = Vec::new();
        let h = PduHeader::LoginResponse(LoginResponse {
            transit: false,
            cont: false,
            csg: Stage::Security,
            nsg: Stage::Security,
            version_max: 0,
            version_active: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 0,
            stat_sn: Sn(0),
            exp_cmd_sn: Sn(1),
            max_cmd_sn: Sn(8),
            // Too many connections (RFC 7143 §11.13.5: 0x0206).
            status_class: 2,
            status_detail: 6,
        });
        encode_pdu(&mut v, &h, &[], Digests::default());
        v
    }

    fn config() -> SessionConfig {
        let mut c = SessionConfig::new(LoginConfig::new("iqn.i", Some("iqn.t")));
        c.login.isid = [0x80, 0, 0, 0, 0, 1];
        c.login.offer.max_connections = 4;
        c.idle = IdlePolicy::BusyPoll;
        c
    }

    #[test]
    fn second_connection_joins_with_the_tsih_and_shares_the_window() {
        let mut s = McsSession::open(leading("2"), &config()).unwrap();
        assert_eq!((s.tsih(), s.granted()), (1, 2));
        s.add_connection(more(joined()), 1).unwrap();
        assert_eq!(s.cids(), [0, 1]);
        let c0 = s.session(0).unwrap().connection().window().clone();
        let c1 = s.session(1).unwrap().connection().window().clone();
        assert!(Arc::ptr_eq(&c0, &c1));
        // A third is more than the target granted.
        let e = s.add_connection(more(joined()), 2).unwrap_err();
        assert!(
            matches!(
                e,
                McsError::NotGranted {
                    granted: 2,
                    offered: 4,
                    wanted: 3
                }
            ),
            "{e}"
        );
        // CID 1 is taken.
        let e = s.add_connection(more(joined()), 1).unwrap_err();
        assert!(matches!(e, McsError::CidInUse { cid: 1, tsih: 1 }), "{e}");
        assert!(e.to_string().contains("CID 1 is already a live connection"));
    }

    #[test]
    fn a_target_that_grants_one_connection_gets_a_clear_error() {
        let mut s = McsSession::open(leading("1"), &config()).unwrap();
        let e = s.add_connection(more(joined()), 1).unwrap_err().to_string();
        assert!(
            e.contains("granted MaxConnections=1 (we offered 4)") && e.contains("MPIO"),
            "{e}"
        );
    }

    #[test]
    fn granted_then_refused_second_login_is_named_and_the_first_goes_on() {
        let mut s = McsSession::open(leading("2"), &config()).unwrap();
        let e = s.add_connection(more(vec![refused()]), 1).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                McsError::LoginRefused {
                    cid: 1,
                    tsih: 1,
                    granted: 2,
                    ..
                }
            ) && msg
                .contains("granted MaxConnections=2, then refused the login of connection CID 1"),
            "{msg}"
        );
        assert_eq!(s.cids(), [0]);
    }

    /// At ERL 0 (what the leading login negotiated here) the tasks of a
    /// failed connection cannot be reassigned: recovery is refused with the
    /// reason, and the commands come back to be retried after session
    /// reinstatement, as on a failed MPIO path.
    #[test]
    fn recovery_at_erl0_is_refused_and_the_commands_come_back() {
        let mut s = McsSession::open(leading("2"), &config()).unwrap();
        s.add_connection(more(joined()), 1).unwrap();
        let cmd = Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap();
        s.submit_on(1, cmd).unwrap();
        s.mark_failed(1);
        let e = s.recover(1, 0, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, McsError::NeedsErl2 { erl: 0 }), "{e}");
        assert!(e.to_string().contains("reinstate the session"), "{e}");
        let back = s.take_failed(1).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(s.cids(), [0]);
    }

    /// Commands go to the least busy connection, and each completes on the
    /// connection it was sent on (tags with that connection's index).
    #[test]
    fn commands_spread_over_the_connections_and_complete_on_theirs() {
        let mut lead = leading("2");
        lead.stages.push_back(scsi_response(0x2_0000, 102, 0));
        let mut s = McsSession::open(lead, &config()).unwrap();
        let mut second = joined();
        second.push(scsi_response(0x2_1000, 502, 0));
        s.add_connection(more(second), 1).unwrap();
        let cmd = |tag| {
            let mut c = Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap();
            c.user_tag = tag;
            c
        };
        assert_eq!(s.submit(cmd(1)).unwrap(), 0);
        assert_eq!(s.submit(cmd(2)).unwrap(), 1);
        let mut done = Vec::new();
        while done.len() < 2 {
            match s.next_event(Duration::from_secs(1)).unwrap() {
                Some((cid, Event::Completed(c))) => done.push((cid, c.user_tag)),
                Some(_) => {}
                None => panic!("no completion"),
            }
        }
        done.sort_unstable();
        assert_eq!(done, [(0, 1), (1, 2)]);
        assert_eq!(s.window().next_cmd_sn(), Sn(3));
    }
}
