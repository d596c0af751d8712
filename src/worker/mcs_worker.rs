//! The MC/S parts of a path worker (`DeviceConfig::mcs`): its reconnect
//! login into the device's one session, and the fence of another path's
//! failed connection by a Logout with reason 1 (close the connection) sent
//! on this path's live connection. Uses the device's [`FenceBoard`] like
//! the MPIO fence steps do.

use super::super::mcs::{fill_holes, McsPaths, MoveOffer, Returned};
use super::{Conn, Worker};
use crate::iscsi::connection::{Command, Completion, Orphan};
use crate::iscsi::session::Session;
use crate::multipath::config::{BoxedTransport, PathConnector};
use crate::multipath::fence::{FenceBoard, FenceError, FenceNeed};
use crate::multipath::path::PathState;
use crate::multipath::probe::{PathProbe, ProbeConfig};
use crate::multipath::MultipathError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the Logout that fences another connection may go unanswered.
const MCS_FENCE_ANSWER: Duration = Duration::from_secs(3);

/// A reconnect login of an MC/S path, run on the worker's helper thread.
type McsLogin =
    Box<dyn FnOnce(&mut PathConnector, &ProbeConfig) -> Result<PathProbe, MultipathError> + Send>;

impl Worker {
    /// The login of this path's reconnect when it is an MC/S connection:
    /// with its own CID into the running session while another path's
    /// connection is up (connection reinstatement), else a new leading
    /// login (session reinstatement: every other path's connection so far
    /// counts as ended). None for MPIO.
    pub(super) fn mcs_login(&self) -> Option<McsLogin> {
        let m = self.mcs.as_ref()?;
        let paths = m.paths.clone();
        let peers = self.peers.clone();
        let me = self.shared.index;
        Some(Box::new(move |connector, cfg| {
            let others_up = || {
                peers
                    .iter()
                    .any(|p| p.index != me && p.state() == PathState::Up)
            };
            let after_leading = || {
                for p in peers.iter().filter(|p| p.index != me) {
                    p.fence_through(p.session_epoch());
                }
            };
            paths.login(me, connector, cfg, &others_up, &after_leading)
        }))
    }

    /// This MC/S path failed with writes in its connection: ask a live
    /// connection of the session to close it (Logout reason 1).
    pub(super) fn want_mcs_fence(&self, board: &FenceBoard) {
        let Some(m) = &self.mcs else { return };
        if m.tsih == 0 {
            return;
        }
        let mut login = self.probe.login.clone();
        (login.tsih, login.cid) = (m.tsih, m.cid);
        log::info!(
            "path {}: connection CID {} of MC/S session {:#06x} failed with writes in it: fence wanted (Logout reason 1 on another connection)",
            self.shared.name,
            m.cid,
            m.tsih
        );
        board.post(FenceNeed {
            path: self.shared.index,
            epoch: self.session_epoch,
            tpgt: self.shared.portal_group().unwrap_or(0),
            login,
            pr_key: None,
        });
    }

    /// The MC/S fence step, each round: times out an unanswered Logout of
    /// ours, or, while this connection is up, claims another connection's
    /// need and sends the Logout (reason 1, its CID) on this connection.
    pub(super) fn mcs_fence_for_others(&mut self, now: Instant) {
        self.mcs_take_returns(now);
        self.mcs_check_held(now);
        self.mcs_move_step(now);
        let Some(board) = self.fence.clone() else {
            return;
        };
        let Some(m) = &mut self.mcs else { return };
        if let Some((_, sent)) = &m.fence {
            if now.saturating_duration_since(*sent) >= MCS_FENCE_ANSWER {
                m.confirm = None;
                if let Some((job, _)) = m.fence.take() {
                    let e = FenceError::ConnectionLogoutUnanswered(MCS_FENCE_ANSWER);
                    board.finish(&job, &Err(e), now);
                }
            }
            return;
        }
        if !board.has_pending() || m.moves.moving.is_some() {
            return;
        }
        let Conn::Up(session) = &mut self.conn else {
            return;
        };
        let peers = self.peers.clone();
        let fenced_through = |p: usize| peers.get(p).map_or(u64::MAX, |s| s.fenced_through());
        let Some(job) = board.claim_connection(self.shared.index, m.tsih, now, fenced_through)
        else {
            return;
        };
        let cid = job.need.login.cid;
        match session.connection_mut().logout_reason(1, cid, now) {
            Ok(()) => {
                log::info!(
                    "path {}: Logout (reason 1) of failed connection CID {cid} of session {:#06x} (path {}, session {})",
                    self.shared.name,
                    m.tsih,
                    peers[job.need.path].name,
                    job.need.epoch
                );
                m.fence = Some((job, now));
            }
            Err(_) => {
                board.finish(&job, &Err(FenceError::FencerFailed), now);
            }
        }
    }

    /// The answer to our fencing Logout for connection `cid`: 0 (closed,
    /// its tasks ended) or 1 (no such connection any more: the target
    /// already ended it) fences it, and its held writes may go. The CmdSNs
    /// it left missing are filled on `session` first.
    pub(super) fn on_mcs_fence_answer(
        &mut self,
        session: &mut Session<BoxedTransport>,
        cid: u16,
        response: u8,
        now: Instant,
    ) {
        let Some(board) = self.fence.clone() else {
            return;
        };
        let Some(m) = &mut self.mcs else { return };
        let ours = m
            .fence
            .as_ref()
            .is_some_and(|(j, _)| j.need.login.cid == cid);
        if !ours || m.confirm.is_some() {
            return;
        }
        let Some((job, _)) = m.fence.take() else {
            return;
        };
        let result = match response {
            0 | 1 => Ok(()),
            r => Err(FenceError::ConnectionLogout(r)),
        };
        let victim = self.peers[job.need.path].clone();
        if result.is_ok() {
            // Trusted once a ping sent after it is answered: some targets
            // (tgtd) answer 0 to any Logout and close the connection it
            // came on instead of the one named. The NOP-Outs filling the
            // lost CmdSNs are answered first (in order), then the ping.
            let holes = m.paths.take_holes(job.need.path, m.tsih);
            let filled = fill_holes(session, holes, &self.shared.name, now).len() as u32;
            if session.connection_mut().ping(now).is_ok() {
                log::info!(
                    "path {}: connection CID {cid} of path {} closed by Logout reason 1 (response {response}); confirming with a ping",
                    self.shared.name,
                    victim.name
                );
                m.fence = Some((job, now));
                m.confirm = Some(filled + 1);
                return;
            }
        }
        let result = result.and(Err(FenceError::FencerFailed));
        let attempts = board.finish(&job, &result, now);
        match result {
            Ok(()) => {}
            Err(e) => log::info!(
                "path {}: fencing connection CID {cid} of path {} failed (attempt {attempts}): {e}",
                self.shared.name,
                victim.name
            ),
        }
    }

    /// A NOP-In answered one of our pings: the one confirming a Logout
    /// that removes another path's connection to take its tasks over, or
    /// the last one of a fence being confirmed (after the NOP-Outs filling
    /// CmdSNs), which confirms it, and the failed connection's held writes
    /// may go.
    pub(super) fn on_mcs_ping_answered(
        &mut self,
        session: &mut Session<BoxedTransport>,
        now: Instant,
    ) {
        if self.mcs_move_ping_answered(session, now) {
            return;
        }
        let Some(board) = self.fence.clone() else {
            return;
        };
        let Some(m) = &mut self.mcs else { return };
        let Some(n) = &mut m.confirm else { return };
        *n = n.saturating_sub(1);
        if *n > 0 {
            return;
        }
        m.confirm = None;
        let Some((job, _)) = m.fence.take() else {
            return;
        };
        let victim = self.peers[job.need.path].clone();
        victim.fence_through(job.need.epoch);
        let attempts = board.finish(&job, &Ok(()), now);
        log::info!(
            "path {}: fenced connection CID {} of path {} (session {}) by Logout reason 1 (attempt {attempts})",
            self.shared.name,
            job.need.login.cid,
            victim.name,
            job.need.epoch
        );
    }

    /// This path's own connection failed: a fencing Logout it had sent
    /// goes back on the board for another connection, and another path's
    /// tasks it was about to take over go back to that path.
    pub(super) fn mcs_fencer_failed(&mut self, now: Instant) {
        let Some(m) = &mut self.mcs else { return };
        m.confirm = None;
        if let Some(mv) = m.moves.moving.take() {
            // Its Logout (reason 2) may or may not have removed the other
            // connection: the tasks go back to their path's fence and retry.
            m.paths.moved_out(mv.offer.from);
            give_back_offer(
                &m.paths,
                mv.offer,
                true,
                "the connection taking it over failed",
            );
        }
        let Some(board) = self.fence.clone() else {
            return;
        };
        if let Some((job, _)) = m.fence.take() {
            board.finish(&job, &Err(FenceError::FencerFailed), now);
        }
    }
}

impl Worker {
    /// This MC/S path's connection failed: the CmdSNs it held unanswered
    /// are noted for whoever closes it at the target.
    pub(super) fn mcs_note_holes(&self, session: &Session<BoxedTransport>) {
        let Some(m) = &self.mcs else { return };
        let sns = session.connection().outstanding_cmd_sns();
        m.paths.post_holes(self.shared.index, m.tsih, sns);
    }

    /// This MC/S path logged in again into the same session (connection
    /// reinstatement: the target closed its old connection first): it
    /// fills what its old connection left missing, unless a fencing Logout
    /// already did.
    pub(super) fn mcs_fill_own_holes(&self, session: &mut Session<BoxedTransport>) {
        let Some(m) = &self.mcs else { return };
        let tsih = session.outcome().tsih;
        let holes = m.paths.take_holes(self.shared.index, tsih);
        // Their NOP-Ins are ordinary ping answers here.
        let _ = fill_holes(session, holes, &self.shared.name, Instant::now());
    }
}

/// How long a failed connection's tasks are held for a reinstatement that
/// has not started (the path waits out a back-off or a hold-down): then
/// they go back to the fence-and-retry path. Well inside the target's
/// DefaultTime2Wait + DefaultTime2Retain, for which it keeps them.
const HOLD_FOR_REASSIGN: Duration = Duration::from_secs(5);

/// How long after DefaultTime2Wait a failed connection's path may take to
/// start its own reinstatement (its reconnect waits out a back-off) before
/// its tasks move to another live connection of the session anyway. A
/// reconnect login that fails moves them at once.
const OWN_REINSTATEMENT: Duration = Duration::from_secs(1);

/// ERL 2: the sent tasks of this path's failed connection, held (not
/// bounced) until the path's reconnect reinstates the connection (a login
/// with the same CID into the same session, RFC 7143 §6.3.4, which
/// removes the old one for recovery as a Logout reason 2 would) and takes
/// them over by TASK REASSIGN, so a write whose status was lost is not
/// run a second time. One TASK REASSIGN per task per failure, then its
/// answer; anything else falls back to the fence and retry.
pub(super) struct HeldTasks {
    orphans: Vec<Orphan>,
    /// The session (TSIH) and the path's session epoch they were sent in.
    tsih: u16,
    epoch: u64,
    /// From then on (the failure plus DefaultTime2Wait) they may move to
    /// another live connection of the session, and do when this path is
    /// not reinstating its own connection.
    offer_at: Instant,
    /// Past this, a reinstatement not yet started is not waited for: the
    /// connection failed, plus DefaultTime2Wait (no reassignment before
    /// it) and the shorter of DefaultTime2Retain (the target drops the
    /// tasks after it) and [`HOLD_FOR_REASSIGN`].
    expires: Instant,
}

impl Worker {
    /// `session`'s connection failed: at ERL 2 in an MC/S session, takes
    /// its sent tasks to be reassigned after reinstatement and returns the
    /// commands that never went out (to bounce; nothing will run them).
    /// None: not MC/S at ERL 2 (the caller fences and retries).
    pub(super) fn mcs_hold_for_reassign(
        &mut self,
        session: &mut Session<BoxedTransport>,
        now: Instant,
    ) -> Option<Vec<Command>> {
        let m = self.mcs.as_mut()?;
        let params = session.connection().params();
        // Time2Retain 0: the target keeps nothing to reassign.
        if m.tsih == 0 || params.error_recovery_level < 2 || params.default_time2retain == 0 {
            return None;
        }
        let wait = Duration::from_secs(u64::from(params.default_time2wait));
        let retain = Duration::from_secs(u64::from(params.default_time2retain));
        let (orphans, unsent) = session.connection_mut().take_orphans();
        // The reinstatement login fills those the target never received
        // (and whoever fences the connection, on a fallback).
        let sns = orphans
            .iter()
            .filter(|o| !o.cmd.immediate)
            .map(|o| o.cmd_sn)
            .collect();
        m.paths.post_holes(self.shared.index, m.tsih, sns);
        log::info!(
            "path {}: connection CID {} of MC/S session {:#06x} failed at ERL 2: {} task(s) held for TASK REASSIGN after reinstatement",
            self.shared.name,
            m.cid,
            m.tsih,
            orphans.len()
        );
        if let Some(old) = m.held.take() {
            // Not reinstated since the last failure (cannot happen: a
            // login in between takes them); never lose them.
            self.mcs_release_held(old, "held across a second failure");
        }
        if let Some(m) = self.mcs.as_mut() {
            m.held = (!orphans.is_empty()).then(|| HeldTasks {
                orphans,
                tsih: m.tsih,
                epoch: self.session_epoch,
                offer_at: now + wait,
                expires: now + wait + retain.min(HOLD_FOR_REASSIGN),
            });
        }
        Some(unsent)
    }

    /// The held tasks go back to the fence-and-retry path: the fence is
    /// asked for when writes are among them (their CmdSNs were posted for
    /// whoever closes the connection), and the commands go back to their
    /// queues (held there until the fence).
    fn mcs_release_held(&mut self, held: HeldTasks, why: &str) {
        let HeldTasks {
            orphans,
            tsih,
            epoch,
            ..
        } = held;
        let users = orphans
            .iter()
            .filter(|o| o.cmd.user_tag & super::INTERNAL_TAG == 0)
            .count() as u64;
        self.shared.record_reassign_fallback(users, why);
        let writes = orphans
            .iter()
            .any(|o| o.cmd.direction == crate::iscsi::connection::Direction::Write);
        if let Some(m) = &self.mcs {
            // Filled by a login that then failed: nothing to wait for.
            m.paths.take_filled(self.shared.index, tsih);
        }
        if writes && self.session_epoch == epoch {
            // Not reinstated yet: the old connection may still run them.
            if let Some(board) = self.fence.clone() {
                self.want_mcs_fence(&board);
            }
        }
        for o in orphans {
            self.bounce_as(o.cmd, Some(epoch));
        }
    }

    /// Each round while the path is down (not while a login runs): held
    /// tasks whose reinstatement has not started [`OWN_REINSTATEMENT`]
    /// after DefaultTime2Wait move to another live connection of the
    /// session; with none up, those whose reinstatement has not come in
    /// [`HOLD_FOR_REASSIGN`] fall back.
    pub(super) fn mcs_check_held(&mut self, now: Instant) {
        if !matches!(self.conn, super::Conn::Down) {
            return;
        }
        let Some(h) = self.mcs.as_ref().and_then(|m| m.held.as_ref()) else {
            return;
        };
        let offer = now >= h.offer_at + OWN_REINSTATEMENT && self.mcs_others_up();
        let expired = now >= h.expires;
        if !offer && !expired {
            return;
        }
        if let Some(h) = self.mcs.as_mut().and_then(|m| m.held.take()) {
            if offer && !expired {
                self.mcs_offer_held(h);
            } else {
                self.mcs_release_held(h, "the connection was not reinstated in time");
            }
        }
    }

    /// The reconnect login failed (or led elsewhere): held tasks move to
    /// another live connection of the session (from DefaultTime2Wait on),
    /// or fall back when none is up.
    pub(super) fn mcs_reconnect_failed(&mut self) {
        let others_up = self.mcs_others_up();
        if let Some(h) = self.mcs.as_mut().and_then(|m| m.held.take()) {
            if others_up {
                self.mcs_offer_held(h);
            } else {
                self.mcs_release_held(h, "the reconnect login failed");
            }
        }
    }

    /// True when another path's connection is up (in the session, then:
    /// every up path of an MC/S device is a connection of its one session).
    fn mcs_others_up(&self) -> bool {
        let me = self.shared.index;
        self.peers
            .iter()
            .any(|p| p.index != me && p.state() == PathState::Up)
    }

    /// Offers the held tasks to the session's other live connections.
    fn mcs_offer_held(&mut self, held: HeldTasks) {
        let Some(m) = &self.mcs else {
            return self.mcs_release_held(held, "not an MC/S path");
        };
        log::info!(
            "path {}: connection CID {} not reinstated: {} task(s) offered for TASK REASSIGN on another connection of session {:#06x}",
            self.shared.name,
            m.cid,
            held.orphans.len(),
            held.tsih
        );
        m.paths.offer(MoveOffer {
            from: self.shared.index,
            tsih: held.tsih,
            cid: m.cid,
            epoch: held.epoch,
            orphans: held.orphans,
            not_before: held.offer_at,
            expires: held.expires,
        });
    }

    /// Before this path's reconnect login: false while another connection
    /// is removing this path's failed one (its Logout reason 2 would remove
    /// the new connection with the same CID). An offer nobody took yet is
    /// held again for this login's reinstatement (offered again if it
    /// fails).
    pub(super) fn mcs_may_connect(&mut self) -> bool {
        let me = self.shared.index;
        let now = Instant::now();
        let Some(m) = &mut self.mcs else { return true };
        if m.paths.is_moving(me) {
            return false;
        }
        if let Some(o) = m.paths.withdraw(me) {
            let held = HeldTasks {
                orphans: o.orphans,
                tsih: o.tsih,
                epoch: o.epoch,
                offer_at: o.not_before,
                expires: o.expires,
            };
            if now >= held.expires {
                self.mcs_release_held(held, "not taken over within DefaultTime2Retain");
            } else if let Some(old) = m.held.replace(held) {
                self.mcs_release_held(old, "held across a second failure");
            }
        }
        true
    }

    /// The path is up again: held tasks of its old connection are taken
    /// over on the new one when it joined the same session (reinstatement:
    /// the target kept them). Those the target received (CmdSN below the
    /// session's ExpCmdSN now, or immediate) get TASK REASSIGN; those it
    /// never received are sent again with their ITT and CmdSN, so the
    /// session's CmdSN order has no hole. A new session (the old one
    /// reinstated: its tasks ended) falls back to a retry.
    pub(super) fn mcs_reassign_held(&mut self, now: Instant) {
        let Some(held) = self.mcs.as_mut().and_then(|m| m.held.take()) else {
            return;
        };
        let super::Conn::Up(session) = &mut self.conn else {
            self.mcs_release_held(held, "the path is not up");
            return;
        };
        if session.outcome().tsih != held.tsih {
            self.mcs_release_held(held, "the session was reinstated, ending its tasks");
            return;
        }
        let exp = session.connection().window().exp_cmd_sn();
        let filled = match &self.mcs {
            Some(m) => m.paths.take_filled(self.shared.index, held.tsih),
            None => Vec::new(),
        };
        let (mut reassigned, mut retried, mut moved) = (0u64, 0u64, 0usize);
        let mut failed = Vec::new();
        let mut never_received = Vec::new();
        for o in held.orphans {
            if !o.cmd.immediate && filled.contains(&o.cmd_sn) {
                // The login filled its CmdSN: the target never had it.
                never_received.push(o.cmd);
                continue;
            }
            let received = o.cmd.immediate || o.cmd_sn.lt(exp);
            let user = o.cmd.user_tag & super::INTERNAL_TAG == 0;
            let conn = session.connection_mut();
            let r = if received {
                conn.reassign(o, now)
            } else {
                conn.retry(o, now)
            };
            match r {
                Ok(()) if received => reassigned += 1,
                Ok(()) => retried += 1,
                Err(not_taken) => {
                    failed.push((not_taken.orphan, received));
                    continue;
                }
            }
            moved += usize::from(user);
        }
        log::info!(
            "path {}: reinstated connection CID {} took over {reassigned} task(s) by TASK REASSIGN, {retried} sent again with their ITT and CmdSN; {} never received go out anew",
            self.shared.name,
            session.outcome().cid,
            never_received.len()
        );
        for (o, received) in &failed {
            if !received && !o.cmd.immediate {
                // Not received and not sent again: fill its CmdSN.
                let _ = session.connection_mut().fill_cmd_sn(o.cmd_sn, now);
            }
        }
        self.in_session += moved;
        self.shared.record_reassigned(reassigned + retried);
        let n = never_received
            .iter()
            .filter(|c| c.user_tag & super::INTERNAL_TAG == 0)
            .count();
        self.shared.record_resubmitted(n as u64);
        for c in never_received {
            // Nothing will run it: it goes out anew at once.
            self.bounce_as(c, None);
        }
        if !failed.is_empty() {
            let n = failed.len() as u64;
            self.shared
                .record_reassign_fallback(n, "no room in the new connection's task table");
            for (o, _) in failed {
                self.bounce_as(o.cmd, Some(held.epoch));
            }
        }
    }

    /// The answer to a TASK REASSIGN: refused (tgtd: 5, not supported), the
    /// command came back: it goes to the fence-and-retry path (the old
    /// connection is gone at the target: its reinstatement closed it).
    pub(super) fn on_reassign_answer(
        &mut self,
        user_tag: u64,
        response: u8,
        refused: Option<Box<Command>>,
    ) {
        let Some(cmd) = refused else {
            return;
        };
        let Some(cmd) = self.mcs_refused_adopted(*cmd, response) else {
            return;
        };
        let internal = user_tag & super::INTERNAL_TAG != 0;
        if !internal {
            self.in_session = self.in_session.saturating_sub(1);
        }
        self.shared.record_reassign_fallback(
            u64::from(!internal),
            &format!("TASK REASSIGN refused, response {response}"),
        );
        let epoch = self.session_epoch.saturating_sub(1);
        self.bounce_as(cmd, Some(epoch));
    }

    /// The device closes: held tasks, and those offered to another
    /// connection that nobody took, go back to their queues, with what
    /// other connections gave back.
    pub(super) fn mcs_drop_held(&mut self) {
        self.mcs_take_returns(Instant::now());
        let offered = self
            .mcs
            .as_ref()
            .and_then(|m| m.paths.withdraw(self.shared.index));
        if let Some(o) = offered {
            for x in o.orphans {
                self.bounce_as(x.cmd, Some(o.epoch));
            }
        }
        if let Some(h) = self.mcs.as_mut().and_then(|m| m.held.take()) {
            for o in h.orphans {
                self.bounce_as(o.cmd, Some(h.epoch));
            }
        }
    }
}

/// How long the Logout (reason 2) removing another path's failed
/// connection may go unanswered before its tasks fall back.
const MOVE_LOGOUT_ANSWER: Duration = MCS_FENCE_ANSWER;

/// ERL 2 on a live connection: other paths' tasks it takes over.
#[derive(Default)]
pub(super) struct Moves {
    /// The offer being taken over now.
    moving: Option<Moving>,
    /// Other paths' tasks on this connection now: (user tag, the path that
    /// answers its queue, that path's session epoch they were sent in).
    /// Their completions and bounces go back to that path.
    adopted: Vec<(u64, usize, u64)>,
    /// The Time2Wait of the last answer to a Logout this path sent for
    /// another connection.
    logout_time2wait: Duration,
}

struct Moving {
    offer: MoveOffer,
    /// When the Logout (reason 2) of its failed connection went out.
    sent: Instant,
    /// Answered: TASK REASSIGN is due then (the answer's Time2Wait).
    reassign_at: Option<Instant>,
    /// A ping sent after the answer came back: this connection outlived
    /// the Logout, so the target removed the one it named (tgtd answers 0
    /// to any Logout and closes the connection it came on instead).
    confirmed: bool,
}

impl Worker {
    /// Each round while this MC/S path is up: claims another path's
    /// offered tasks and removes their failed connection (Logout reason 2,
    /// its CID) on this one; times out an unanswered Logout; takes the
    /// tasks over once it is answered and its Time2Wait has passed.
    fn mcs_move_step(&mut self, now: Instant) {
        let Some(m) = &mut self.mcs else { return };
        let super::Conn::Up(session) = &mut self.conn else {
            return;
        };
        match &m.moves.moving {
            None => {
                // One Logout of another connection at a time: the ping
                // that confirms either is told apart by that.
                if m.tsih == 0 || m.fence.is_some() || m.confirm.is_some() {
                    return;
                }
                let Some(offer) = m.paths.claim(self.shared.index, m.tsih, now) else {
                    return;
                };
                let victim = self.peers.get(offer.from).map_or("?", |p| p.name.as_str());
                match session.connection_mut().logout_reason(2, offer.cid, now) {
                    Ok(()) => {
                        log::info!(
                            "path {}: Logout (reason 2, remove for recovery) of failed connection CID {} of path {victim}, to take over its {} task(s)",
                            self.shared.name,
                            offer.cid,
                            offer.orphans.len()
                        );
                        m.moves.moving = Some(Moving {
                            offer,
                            sent: now,
                            reassign_at: None,
                            confirmed: false,
                        });
                    }
                    Err(_) => {
                        m.paths.moved_out(offer.from);
                        give_back_offer(
                            &m.paths,
                            offer,
                            true,
                            "the Logout removing its connection could not be sent",
                        );
                    }
                }
            }
            Some(mv) if mv.reassign_at.is_none() || !mv.confirmed => {
                if now.saturating_duration_since(mv.sent) < MOVE_LOGOUT_ANSWER {
                    return;
                }
                if let Some(mv) = m.moves.moving.take() {
                    m.paths.moved_out(mv.offer.from);
                    give_back_offer(
                        &m.paths,
                        mv.offer,
                        true,
                        "the Logout removing its connection went unanswered",
                    );
                }
            }
            Some(mv) => {
                if mv.reassign_at.is_some_and(|t| now < t) {
                    return;
                }
                let Some(mv) = m.moves.moving.take() else {
                    return;
                };
                let super::Conn::Up(mut session) =
                    std::mem::replace(&mut self.conn, super::Conn::Down)
                else {
                    return;
                };
                self.mcs_take_over(&mut session, mv.offer, now);
                self.conn = super::Conn::Up(session);
            }
        }
    }

    /// The answer to a Logout this path sent for another path's connection
    /// `cid`: removing it to take its tasks over, or fencing it.
    pub(super) fn on_mcs_logout_answer(
        &mut self,
        session: &mut Session<BoxedTransport>,
        cid: u16,
        response: u8,
        time2wait: u16,
        now: Instant,
    ) {
        if let Some(m) = &mut self.mcs {
            m.moves.logout_time2wait = Duration::from_secs(u64::from(time2wait));
        }
        if !self.on_mcs_move_logout(session, cid, response, time2wait, now) {
            self.on_mcs_fence_answer(session, cid, response, now);
        }
    }

    /// This path's connection failed while the answer to its Logout of
    /// another connection waited for its confirming ping: the target
    /// closed this connection for that Logout (tgtd does), an expected
    /// end: the reconnect waits the Logout Response's Time2Wait, not
    /// DefaultTime2Wait. Its leading login then reinstates the session,
    /// which fences the other connection too.
    pub(super) fn mcs_closed_after_own_logout(&self) -> Option<Duration> {
        let m = self.mcs.as_ref()?;
        let moving = m
            .moves
            .moving
            .as_ref()
            .is_some_and(|mv| mv.reassign_at.is_some() && !mv.confirmed);
        (m.confirm.is_some() || moving).then_some(m.moves.logout_time2wait)
    }

    /// The answer to a Logout with reason 2 this path sent for another
    /// path's failed connection `cid`: 0 (removed) or 1 (the target had
    /// dropped it already) lets its tasks be taken over here (after the
    /// answer's Time2Wait); anything else sends them back to their path's
    /// fence and retry. False: not ours.
    fn on_mcs_move_logout(
        &mut self,
        session: &mut Session<BoxedTransport>,
        cid: u16,
        response: u8,
        time2wait: u16,
        now: Instant,
    ) -> bool {
        let Some(m) = &mut self.mcs else { return false };
        let Some(mv) = &mut m.moves.moving else {
            return false;
        };
        if mv.offer.cid != cid || mv.reassign_at.is_some() {
            return false;
        }
        m.paths.moved_out(mv.offer.from);
        if response > 1 {
            if let Some(mv) = m.moves.moving.take() {
                let why = format!("Logout reason 2 of its connection answered {response}");
                give_back_offer(&m.paths, mv.offer, true, &why);
            }
            return true;
        }
        let wait = match response {
            0 => Duration::from_secs(u64::from(time2wait)),
            _ => Duration::ZERO,
        };
        mv.reassign_at = Some(now + wait);
        // Trusted once a ping sent after it is answered (see `Moving`).
        if session.connection_mut().ping(now).is_err() {
            if let Some(mv) = m.moves.moving.take() {
                give_back_offer(&m.paths, mv.offer, true, "no ping after the Logout");
            }
        }
        true
    }

    /// A ping was answered: the one confirming a Logout (reason 2) of
    /// another path's connection lets its tasks be taken over (at once
    /// when the Logout's Time2Wait has passed, else by the next rounds).
    /// False: not ours.
    fn mcs_move_ping_answered(
        &mut self,
        session: &mut Session<BoxedTransport>,
        now: Instant,
    ) -> bool {
        let Some(m) = &mut self.mcs else { return false };
        let Some(mv) = &mut m.moves.moving else {
            return false;
        };
        let Some(at) = mv.reassign_at.filter(|_| !mv.confirmed) else {
            return false;
        };
        mv.confirmed = true;
        if now >= at {
            if let Some(mv) = m.moves.moving.take() {
                self.mcs_take_over(session, mv.offer, now);
            }
        }
        true
    }

    /// Takes another path's tasks over on `session` (its failed connection
    /// is removed at the target): TASK REASSIGN for those the target
    /// received, a retry with ITT and CmdSN for those it did not, after the
    /// CmdSNs it left missing are filled (those filled go back to be sent
    /// anew).
    fn mcs_take_over(
        &mut self,
        session: &mut Session<BoxedTransport>,
        offer: MoveOffer,
        now: Instant,
    ) {
        let Some(m) = &mut self.mcs else { return };
        let paths = m.paths.clone();
        let MoveOffer {
            from,
            tsih,
            cid,
            epoch,
            orphans,
            expires,
            ..
        } = offer;
        if now >= expires {
            paths.give_back_all(
                from,
                epoch,
                orphans,
                false,
                "DefaultTime2Retain passed before the take-over",
            );
            return;
        }
        // Nothing of the failed connection runs at the target any more but
        // what is taken over here: a retry of a refused task may go at once.
        if let Some(victim) = self.peers.get(from) {
            victim.fence_through(epoch);
        }
        let holes = paths.take_holes(from, tsih);
        let filled = fill_holes(session, holes, &self.shared.name, now);
        let exp = session.connection().window().exp_cmd_sn();
        let (mut reassigned, mut retried, mut anew, mut failed) = (0u64, 0u64, 0u64, 0u64);
        for o in orphans {
            let not_received = !o.cmd.immediate && filled.contains(&o.cmd_sn);
            let received = o.cmd.immediate || o.cmd_sn.lt(exp);
            if o.cmd.user_tag & super::INTERNAL_TAG != 0 {
                // The other path's own command (ALUA, key repair): not
                // taken over, but its CmdSN must not stay a hole.
                if !received && !not_received {
                    let _ = session.connection_mut().fill_cmd_sn(o.cmd_sn, now);
                }
                continue;
            }
            if not_received {
                paths.give_back(from, Returned::Anew(o.cmd));
                anew += 1;
                continue;
            }
            let tag = o.cmd.user_tag;
            let conn = session.connection_mut();
            let r = if received {
                conn.reassign(o, now)
            } else {
                conn.retry(o, now)
            };
            match r {
                Ok(()) => {
                    m.moves.adopted.push((tag, from, epoch));
                    if received {
                        reassigned += 1;
                    } else {
                        retried += 1;
                    }
                }
                Err(not_taken) => {
                    let o = not_taken.orphan;
                    if !received && !o.cmd.immediate {
                        let _ = session.connection_mut().fill_cmd_sn(o.cmd_sn, now);
                    }
                    failed += 1;
                    paths.give_back(
                        from,
                        Returned::Fallback {
                            cmd: o.cmd,
                            epoch,
                            fence: false,
                            why: "no room in the task table of the connection taking it over"
                                .into(),
                            ran_on: None,
                        },
                    );
                }
            }
        }
        let victim = self.peers.get(from);
        log::info!(
            "path {}: took over {reassigned} task(s) of failed connection CID {cid} (path {}) by TASK REASSIGN, {retried} sent again with their ITT and CmdSN, {anew} never received go out anew, {failed} not taken",
            self.shared.name,
            victim.map_or("?", |p| p.name.as_str())
        );
        if let Some(v) = victim {
            v.record_reassigned(reassigned + retried);
        }
    }

    /// A completion of a task taken over from another path goes back to
    /// it (None); any other is this path's own (Some).
    pub(super) fn mcs_forward_done(&mut self, c: Completion) -> Option<Completion> {
        let Some(m) = &mut self.mcs else {
            return Some(c);
        };
        if m.moves.adopted.is_empty() {
            return Some(c);
        }
        let Some(i) = m.moves.adopted.iter().position(|a| a.0 == c.user_tag) else {
            return Some(c);
        };
        let (_, owner, _) = m.moves.adopted.swap_remove(i);
        m.paths.give_back(owner, Returned::Done(c));
        None
    }

    /// A command bounced here that was taken over from another path goes
    /// back to it for its retry (None): the connection that took it over
    /// failed or ended it. `ran_on`: the connection (path, session epoch)
    /// that may still run it, this one's when it had it by TASK REASSIGN:
    /// the owner's retry then waits for that connection's fence, not only
    /// its own (which the take-over's Logout already confirmed).
    pub(super) fn mcs_forward_bounce(
        &mut self,
        cmd: Command,
        ran_on: Option<(usize, u64)>,
    ) -> Option<Command> {
        let Some(m) = &mut self.mcs else {
            return Some(cmd);
        };
        if m.moves.adopted.is_empty() {
            return Some(cmd);
        }
        let Some(i) = m.moves.adopted.iter().position(|a| a.0 == cmd.user_tag) else {
            return Some(cmd);
        };
        let (_, owner, epoch) = m.moves.adopted.swap_remove(i);
        m.paths.give_back(
            owner,
            Returned::Fallback {
                cmd,
                epoch,
                fence: false,
                why: "the connection that took it over gave it up".into(),
                ran_on,
            },
        );
        None
    }

    /// A refused TASK REASSIGN of a task taken over from another path: it
    /// goes back to that path's fence and retry (None).
    fn mcs_refused_adopted(&mut self, cmd: Command, response: u8) -> Option<Command> {
        let Some(m) = &mut self.mcs else {
            return Some(cmd);
        };
        let Some(i) = m.moves.adopted.iter().position(|a| a.0 == cmd.user_tag) else {
            return Some(cmd);
        };
        let (_, owner, epoch) = m.moves.adopted.swap_remove(i);
        m.paths.give_back(
            owner,
            Returned::Fallback {
                cmd,
                epoch,
                fence: false,
                why: format!("TASK REASSIGN on another connection refused, response {response}"),
                ran_on: None,
            },
        );
        None
    }

    /// Each round: what other connections gave back of this path's tasks
    /// they took over answers its queues (completions) or goes to its
    /// fence and retry.
    fn mcs_take_returns(&mut self, now: Instant) {
        let Some(m) = &self.mcs else { return };
        let returns = m.paths.take_returns(self.shared.index);
        for r in returns {
            match r {
                Returned::Done(c) => {
                    // Taken over from yet another path: it goes on there.
                    let Some(c) = self.mcs_forward_done(c) else {
                        continue;
                    };
                    // `on_completion` counts it out of this path's session.
                    self.in_session += 1;
                    self.on_completion(c, now);
                }
                Returned::Fallback {
                    cmd,
                    epoch,
                    fence,
                    why,
                    ran_on,
                } => {
                    if cmd.user_tag & super::INTERNAL_TAG != 0 {
                        continue; // the path's own: dropped, as a bounce does
                    }
                    self.shared.record_reassign_fallback(1, &why);
                    let write = cmd.direction == crate::iscsi::connection::Direction::Write;
                    if fence && write && epoch == self.session_epoch {
                        if let Some(board) = self.fence.clone() {
                            self.want_mcs_fence(&board);
                        }
                    }
                    match ran_on {
                        // The connection that took it over may run it.
                        Some((path, e)) => self.bounce_on(cmd, Some(e), Some(path)),
                        None => self.bounce_as(cmd, Some(epoch)),
                    }
                }
                Returned::Anew(cmd) => {
                    self.shared.record_resubmitted(1);
                    self.bounce_as(cmd, None);
                }
            }
        }
    }
}

fn give_back_offer(paths: &Arc<McsPaths>, offer: MoveOffer, fence: bool, why: &str) {
    paths.give_back_all(offer.from, offer.epoch, offer.orphans, fence, why);
}
