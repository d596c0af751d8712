//! MC/S paths (`DeviceConfig::mcs`): the paths of a multipath device as
//! the connections of one iSCSI session instead of sessions of their own.
//!
//! Path 0 makes the session with the leading login, offering
//! MaxConnections = the number of paths; every other path logs in as one
//! more connection of it (the session's ISID and TSIH, its path index as
//! CID, only the per-connection keys). All connections share one
//! lock-free CmdSN window ([`SessionWindow`]), so the path workers, each on
//! its own thread and socket, number their commands in one session-wide
//! order without a lock on the I/O path. The lock here is taken for logins
//! only (they are serialised, so the leading login comes first).
//!
//! A path that reconnects logs in again with its own CID: connection
//! reinstatement (RFC 7143 §6.3.4) while another connection of the
//! session is up, else a new leading login with the same ISID and TSIH 0,
//! which reinstates the whole session (§6.3.5) and ends every old
//! connection and task. See docs/multipath.md, "MC/S".

use crate::iscsi::connection::{Command, Completion, Orphan};
use crate::iscsi::params::Params;
use crate::iscsi::session::{IdlePolicy, Joining, Session, SessionConfig};
use crate::iscsi::window::SessionWindow;
use crate::multipath::config::{BoxedTransport, PathConnector};
use crate::multipath::probe::{inspect, PathProbe, ProbeConfig};
use crate::multipath::MultipathError;
use crate::wire::iscsi::Sn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The running session the connections join.
#[derive(Debug, Clone)]
struct Joined {
    isid: [u8; 6],
    tsih: u16,
    window: Arc<SessionWindow>,
    leading: Params,
}

/// Shared by the path workers of an MC/S device.
#[derive(Debug)]
pub(crate) struct McsPaths {
    paths: usize,
    session: Mutex<Option<Joined>>,
    /// CmdSNs that failed connections held unanswered: (path, TSIH,
    /// CmdSNs). Whoever closes such a connection at the target (a fencing
    /// Logout, or the path's own reinstatement login) takes them and fills
    /// the ones the target still waits for with NOP-Outs.
    holes: Mutex<Vec<(usize, u16, Vec<Sn>)>>,
    /// CmdSNs of a failed connection that its path's reinstatement login
    /// filled with NOP-Outs (the target never had those commands): (path,
    /// TSIH, CmdSNs), for the worker, which sends those commands anew
    /// and reassigns the others.
    filled: Mutex<Vec<(usize, u16, Vec<Sn>)>>,
    /// ERL 2: failed connections' tasks offered to another live connection
    /// of the session (their own path could not reinstate its connection
    /// by DefaultTime2Wait), and how many (read each round, lock-free).
    offers: Mutex<Vec<MoveOffer>>,
    offered: AtomicUsize,
    /// Paths whose offer a live connection claimed and whose failed
    /// connection it has not removed yet (Logout reason 2 unanswered): such
    /// a path must not log in again with its CID meanwhile (the Logout
    /// would remove the new connection).
    moving: Mutex<Vec<usize>>,
    /// What the connections that took over a path's tasks give back to it
    /// (its dispatcher hears only from it): (path, what), and how many.
    returns: Mutex<Vec<(usize, Returned)>>,
    returned: AtomicUsize,
}

/// ERL 2: the sent tasks of path `from`'s failed connection `cid` of session
/// `tsih`, for another live connection of the session to take over: it
/// removes the failed connection (Logout reason 2), then sends TASK
/// REASSIGN for each (RFC 7143 §6.2.2), not before `not_before` (the
/// failure plus DefaultTime2Wait).
#[derive(Debug)]
pub(crate) struct MoveOffer {
    pub(crate) from: usize,
    pub(crate) tsih: u16,
    pub(crate) cid: u16,
    /// The session epoch of `from` they were sent in.
    pub(crate) epoch: u64,
    pub(crate) orphans: Vec<Orphan>,
    pub(crate) not_before: Instant,
    /// Past this a task is not held for TASK REASSIGN any more (the
    /// failure plus DefaultTime2Wait + DefaultTime2Retain, capped).
    pub(crate) expires: Instant,
}

/// What a connection that took over a task of another path gives back to
/// that path, which answers its queue.
#[derive(Debug)]
pub(crate) enum Returned {
    /// The task completed on the connection that took it over.
    Done(Completion),
    /// Not taken over (refused, or the connection that took it failed):
    /// the path's fence-and-retry. `fence`: the failed connection may
    /// still run it at the target (its removal was not confirmed).
    /// `ran_on`: the connection that took it over and may still run it
    /// (path, session epoch), whose fence then gates the retry instead.
    Fallback {
        cmd: Command,
        epoch: u64,
        fence: bool,
        why: String,
        ran_on: Option<(usize, u64)>,
    },
    /// The target never received it (its CmdSN was filled): sent anew.
    Anew(Command),
}

impl McsPaths {
    pub(crate) fn new(paths: usize) -> McsPaths {
        McsPaths {
            paths,
            session: Mutex::new(None),
            holes: Mutex::new(Vec::new()),
            filled: Mutex::new(Vec::new()),
            offers: Mutex::new(Vec::new()),
            offered: AtomicUsize::new(0),
            moving: Mutex::new(Vec::new()),
            returns: Mutex::new(Vec::new()),
            returned: AtomicUsize::new(0),
        }
    }

    /// Offers a failed connection's tasks to the other live connections.
    pub(crate) fn offer(&self, offer: MoveOffer) {
        if let Ok(mut o) = self.offers.lock() {
            o.push(offer);
            self.offered.store(o.len(), Ordering::Release);
        }
    }

    /// Takes back path `path`'s offer nobody claimed yet (the path is about
    /// to reinstate its connection itself).
    pub(crate) fn withdraw(&self, path: usize) -> Option<MoveOffer> {
        if self.offered.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut o = self.offers.lock().ok()?;
        let i = o.iter().position(|x| x.from == path)?;
        let offer = o.swap_remove(i);
        self.offered.store(o.len(), Ordering::Release);
        Some(offer)
    }

    /// Path `by`, a live connection of session `tsih`, claims an offer of
    /// another path of that session that may be reassigned `now`; the
    /// offering path counts as moving until [`McsPaths::moved_out`].
    /// Offers of other sessions are given back as fallbacks (their tasks
    /// ended with their session).
    pub(crate) fn claim(&self, by: usize, tsih: u16, now: Instant) -> Option<MoveOffer> {
        if self.offered.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut o = self.offers.lock().ok()?;
        // Not taken over within DefaultTime2Retain (of a session gone, say):
        // back to their paths' fence and retry.
        let mut expired = Vec::new();
        o.retain_mut(|x| {
            if now < x.expires {
                return true;
            }
            expired.push((x.from, x.epoch, std::mem::take(&mut x.orphans)));
            false
        });
        self.offered.store(o.len(), Ordering::Release);
        for (from, epoch, orphans) in expired {
            self.give_back_all(
                from,
                epoch,
                orphans,
                true,
                "not taken over within DefaultTime2Retain",
            );
        }
        let i = o
            .iter()
            .position(|x| x.from != by && x.tsih == tsih && now >= x.not_before)?;
        let offer = o.swap_remove(i);
        self.offered.store(o.len(), Ordering::Release);
        drop(o);
        if let Ok(mut m) = self.moving.lock() {
            m.push(offer.from);
        }
        Some(offer)
    }

    /// Path `path`'s failed connection was removed at the target (or its
    /// removal given up): the path may log in again.
    pub(crate) fn moved_out(&self, path: usize) {
        if let Ok(mut m) = self.moving.lock() {
            m.retain(|p| *p != path);
        }
    }

    /// True while a live connection is removing path `path`'s failed one.
    pub(crate) fn is_moving(&self, path: usize) -> bool {
        self.moving.lock().is_ok_and(|m| m.contains(&path))
    }

    /// Gives `what` back to path `path`.
    pub(crate) fn give_back(&self, path: usize, what: Returned) {
        if let Ok(mut r) = self.returns.lock() {
            r.push((path, what));
            self.returned.store(r.len(), Ordering::Release);
        }
    }

    /// Gives `orphans` back to path `path` for its fence and retry
    /// (`fence`: the connection they were sent on may still run them).
    pub(crate) fn give_back_all(
        &self,
        path: usize,
        epoch: u64,
        orphans: Vec<Orphan>,
        fence: bool,
        why: &str,
    ) {
        for o in orphans {
            self.give_back(
                path,
                Returned::Fallback {
                    cmd: o.cmd,
                    epoch,
                    fence,
                    why: why.to_string(),
                    ran_on: None,
                },
            );
        }
    }

    /// What was given back to path `path` (one atomic load when nothing).
    pub(crate) fn take_returns(&self, path: usize) -> Vec<Returned> {
        if self.returned.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let Ok(mut r) = self.returns.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut kept = Vec::with_capacity(r.len());
        for (p, what) in r.drain(..) {
            if p == path {
                out.push(what);
            } else {
                kept.push((p, what));
            }
        }
        *r = kept;
        self.returned.store(r.len(), Ordering::Release);
        out
    }

    /// Path `path`'s connection of session `tsih` failed holding these
    /// non-immediate CmdSNs.
    pub(crate) fn post_holes(&self, path: usize, tsih: u16, cmd_sns: Vec<Sn>) {
        if cmd_sns.is_empty() {
            return;
        }
        if let Ok(mut h) = self.holes.lock() {
            h.push((path, tsih, cmd_sns));
        }
    }

    /// Takes what path `path`'s failed connections of session `tsih` held
    /// (each CmdSN is taken once: a NOP-Out for a CmdSN the target has
    /// passed would go unanswered). Those of other sessions are dropped.
    pub(crate) fn take_holes(&self, path: usize, tsih: u16) -> Vec<Sn> {
        let Ok(mut h) = self.holes.lock() else {
            return Vec::new();
        };
        h.retain(|(_, t, _)| *t == tsih);
        let mut out = Vec::new();
        h.retain(|(p, _, sns)| {
            if *p == path {
                out.extend_from_slice(sns);
                false
            } else {
                true
            }
        });
        out
    }

    /// The CmdSNs path `path`'s reinstatement login into session `tsih`
    /// filled (see [`McsPaths::login`]), taken once.
    pub(crate) fn take_filled(&self, path: usize, tsih: u16) -> Vec<Sn> {
        let Ok(mut f) = self.filled.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        f.retain(|(p, t, sns)| {
            if *p == path && *t == tsih {
                out.extend_from_slice(sns);
                false
            } else {
                true
            }
        });
        out
    }

    /// Logs path `index` in: as connection CID `index` of the running
    /// session when `others_up()` (another path's connection of it is up),
    /// else as the leading connection of a new session, which reinstates
    /// the old one (same ISID, TSIH 0): then `after_leading()` runs, still
    /// under the login lock, so the caller can count every other path's
    /// connection so far as ended. Then inspects the LU as every path's
    /// login does.
    pub(crate) fn login(
        &self,
        index: usize,
        connector: &mut PathConnector,
        cfg: &ProbeConfig,
        others_up: &dyn Fn() -> bool,
        after_leading: &dyn Fn(),
    ) -> Result<PathProbe, MultipathError> {
        let login_err = |e: String| MultipathError::Login {
            path: cfg.name.clone(),
            reason: e,
        };
        // Held through the login: one login of the session at a time.
        let mut joined = self
            .session
            .lock()
            .map_err(|_| login_err("MC/S session state poisoned".into()))?;
        let mut sc = SessionConfig::new(cfg.login.clone());
        sc.timers = cfg.timers;
        sc.login_timeout = cfg.login_timeout;
        sc.idle = IdlePolicy::Wait(Duration::from_millis(1));
        sc.login.cid = index as u16;
        let transport = match connector {
            PathConnector::Fixed(connect) => connect(),
            // No redirects for a connection of a session: the portal itself.
            PathConnector::Portal { portal, connect } => connect(portal.home()),
        }
        .map_err(|e| login_err(e.to_string()))?;
        let transport = BoxedTransport(transport);
        let session = match joined.as_ref().filter(|_| others_up()) {
            Some(j) => {
                sc.login.isid = j.isid;
                sc.login.tsih = j.tsih;
                let joining = Joining::More {
                    window: &j.window,
                    index: index as u8,
                    leading: &j.leading,
                };
                let mut s = Session::login_joining(transport, &sc, joining).map_err(|e| {
                    login_err(format!(
                        "connection CID {index} of MC/S session TSIH {:#06x}: {e}",
                        j.tsih
                    ))
                })?;
                // The login closed this CID's old connection at the target:
                // the CmdSNs it never received are filled now, before the
                // LU is inspected (its commands would wait behind them).
                let holes = self.take_holes(index, j.tsih);
                let filled = fill_holes(&mut s, holes, &cfg.name, Instant::now());
                if !filled.is_empty() {
                    if let Ok(mut f) = self.filled.lock() {
                        f.push((index, j.tsih, filled));
                    }
                }
                s
            }
            None => {
                if let Some(j) = joined.as_ref() {
                    sc.login.isid = j.isid;
                }
                sc.login.tsih = 0;
                sc.login.offer.max_connections = self.paths as u32;
                if sc.login.offer.error_recovery_level >= 2
                    && sc.login.offer.default_time2retain == 0
                {
                    // ERL 2 needs the target to keep a failed connection's
                    // tasks for their reassignment: RFC 7143's default.
                    sc.login.offer.default_time2retain = 20;
                }
                let s = Session::login_joining(transport, &sc, Joining::Leading)
                    .map_err(|e| login_err(format!("leading login of the MC/S session: {e}")))?;
                let o = s.outcome().clone();
                if (o.params.max_connections as usize) < self.paths {
                    let _ = s.logout(Duration::from_millis(500));
                    return Err(MultipathError::McsNotGranted {
                        offered: self.paths as u32,
                        granted: o.params.max_connections,
                        wanted: self.paths,
                    });
                }
                *joined = Some(Joined {
                    isid: o.isid,
                    tsih: o.tsih,
                    window: s.connection().window().clone(),
                    leading: o.params.clone(),
                });
                if let Ok(mut h) = self.holes.lock() {
                    // A new session: the old one's CmdSN order is gone.
                    h.clear();
                }
                if let Ok(mut f) = self.filled.lock() {
                    f.clear();
                }
                after_leading();
                s
            }
        };
        drop(joined);
        inspect(session, None, cfg)
    }
}

/// What opening an MC/S device logs in: the paths in order, the first
/// that comes up leading, the others joining. A path that cannot log in
/// starts Down (and keeps trying, as in MPIO); a target that grants fewer
/// connections than paths fails the open.
pub(crate) type Probed = (
    ProbeConfig,
    PathConnector,
    Result<PathProbe, MultipathError>,
);

pub(crate) fn login_all(
    mcs: &McsPaths,
    setups: Vec<(ProbeConfig, PathConnector)>,
) -> Result<Vec<Probed>, MultipathError> {
    let mut out: Vec<Probed> = Vec::with_capacity(setups.len());
    for (i, (cfg, mut connector)) in setups.into_iter().enumerate() {
        let up = out.iter().any(|(_, _, r)| r.is_ok());
        let r = mcs.login(i, &mut connector, &cfg, &|| up, &|| {});
        if let Err(e @ MultipathError::McsNotGranted { .. }) = &r {
            return Err(e.clone());
        }
        out.push((cfg, connector, r));
    }
    Ok(out)
}

/// Sends a NOP-Out (non-immediate) on `session` for each CmdSN in `holes`
/// the target has not passed yet (ExpCmdSN as the target last said: after
/// the failed connection was closed nothing else can fill them), in
/// order, so the commands behind them run.
/// Returns the CmdSNs filled.
pub(crate) fn fill_holes(
    session: &mut Session<BoxedTransport>,
    mut holes: Vec<Sn>,
    name: &str,
    now: Instant,
) -> Vec<Sn> {
    let exp = session.connection().window().exp_cmd_sn();
    holes.retain(|c| !c.lt(exp));
    holes.sort_by_key(|c| c.0.wrapping_sub(exp.0));
    holes.dedup();
    if holes.is_empty() {
        return holes;
    }
    log::info!(
        "path {name}: {} CmdSN(s) from {} left by a failed connection: filled with NOP-Outs",
        holes.len(),
        holes[0]
    );
    let mut sent = Vec::with_capacity(holes.len());
    for c in holes {
        if session.connection_mut().fill_cmd_sn(c, now).is_err() {
            break;
        }
        sent.push(c);
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::connection::ConnTimers;
    use crate::iscsi::login::LoginConfig;
    use crate::iscsi::session::testing::{login_rsp, Scripted};
    use crate::wire::iscsi::Stage;
    use std::collections::VecDeque;

    fn cfg() -> ProbeConfig {
        ProbeConfig {
            name: "p0".into(),
            login: LoginConfig::new("iqn.i", Some("iqn.t")),
            lun: 0,
            timers: ConnTimers::default(),
            login_timeout: Duration::from_secs(1),
            pr_key: None,
            preempt_gate: None,
        }
    }

    /// A target that grants fewer connections than there are paths gets the
    /// typed error naming both numbers, at the leading login.
    #[test]
    fn fewer_connections_granted_than_paths_is_a_typed_error() {
        let mcs = McsPaths::new(2);
        let mut connector = PathConnector::Fixed(Box::new(|| {
            let t: Box<dyn crate::transport::Transport> = Box::new(Scripted {
                stages: [
                    login_rsp(Stage::Security, Stage::Operational, 1, b"AuthMethod=None\0"),
                    login_rsp(
                        Stage::Operational,
                        Stage::FullFeature,
                        2,
                        b"MaxConnections=1\0",
                    ),
                ]
                .into_iter()
                .collect(),
                rx: VecDeque::new(),
            });
            Ok(t)
        }));
        let e = mcs
            .login(0, &mut connector, &cfg(), &|| false, &|| {})
            .unwrap_err();
        assert_eq!(
            e,
            MultipathError::McsNotGranted {
                offered: 2,
                granted: 1,
                wanted: 2
            }
        );
        assert!(e.to_string().contains("granted MaxConnections=1"), "{e}");
    }
}
