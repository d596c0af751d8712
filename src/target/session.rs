//! One normal session of the embedded target, shared by its connections
//! (MC/S, RFC 7143 §4.2 and §7): the session-wide CmdSN window, the turn
//! that makes commands arriving on different connections run in CmdSN
//! order, the connections by CID, and the tasks of failed connections
//! waiting for a TASK REASSIGN (ERL 2), each for at most DefaultTime2Wait +
//! DefaultTime2Retain.
//!
//! Each [`super::TargetConn`] keeps its own StatSN, digests, tasks and
//! output (connection allegiance); only what is session-wide lives here,
//! behind one mutex taken a few times per command.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::iscsi::params::Params;
use crate::wire::iscsi::Sn;

use super::conn::Orphan;

/// What the CmdSN rules say about a non-immediate PDU of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Its turn: ExpCmdSN has moved past it; run it now.
    Go,
    /// A duplicate or out of the window: dropped (RFC 7143 §3.2.2.1).
    Drop,
    /// A lower CmdSN is still to come on another connection (or is being
    /// executed there): wait, and keep everything behind it waiting.
    Wait,
}

/// Values of a connection's `closing` flag.
pub(crate) mod closing {
    /// Open.
    pub(crate) const OPEN: u8 = 0;
    /// Close it and terminate its tasks (Logout reason 1, reinstatement
    /// below ERL 2).
    pub(crate) const TERMINATE: u8 = 1;
    /// Close it and keep its tasks for TASK REASSIGN (Logout reason 2,
    /// reinstatement at ERL 2).
    pub(crate) const RECOVER: u8 = 2;
}

/// One connection of a session as the session knows it.
#[derive(Debug)]
pub(crate) struct ConnEntry {
    pub(crate) cid: u16,
    /// Set when the connection must stop: a Logout of it from another
    /// connection, its reinstatement by a login with the same CID.
    pub(crate) closing: Arc<AtomicU8>,
    /// Write tasks it has waiting for data (for the window).
    busy: u32,
}

#[derive(Debug)]
struct State {
    exp_cmd_sn: Sn,
    max_cmd_sn: Sn,
    /// The connection running the command whose CmdSN was ExpCmdSN - 1;
    /// the next one waits until it is done.
    executing: Option<u16>,
    conns: Vec<ConnEntry>,
    /// Connections told to close that have not yet handed over their
    /// tasks (a TASK REASSIGN for them waits).
    closing_unreleased: Vec<u16>,
    orphans: Vec<Orphan>,
}

/// The shared part of one normal session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) tsih: u16,
    /// Session-wide parameters negotiated on the leading connection
    /// (MaxConnections, ERL, InitialR2T, burst lengths, ...). A connection
    /// that joins takes them and negotiates only its own (digests,
    /// MaxRecvDataSegmentLength).
    pub(crate) params: Params,
    state: Mutex<State>,
}

impl Session {
    pub(crate) fn new(tsih: u16, params: Params, exp_cmd_sn: Sn, max_cmd_sn: Sn) -> Session {
        Session {
            tsih,
            params,
            state: Mutex::new(State {
                exp_cmd_sn,
                max_cmd_sn,
                executing: None,
                conns: Vec::new(),
                closing_unreleased: Vec::new(),
                orphans: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn max_connections(&self) -> usize {
        self.params.max_connections.max(1) as usize
    }

    pub(crate) fn erl(&self) -> u32 {
        self.params.error_recovery_level
    }

    /// Adds connection `cid`. A connection with the same CID that is still
    /// there is told to close (connection reinstatement, RFC 7143 §6.3.4);
    /// returns its flag so the caller knows one was replaced. `Err` when
    /// the session already has MaxConnections connections.
    pub(crate) fn add_conn(&self, cid: u16) -> Result<(Arc<AtomicU8>, bool), ()> {
        let how = if self.erl() >= 2 {
            closing::RECOVER
        } else {
            closing::TERMINATE
        };
        let mut s = self.lock();
        let mut reinstated = false;
        if let Some(i) = s.conns.iter().position(|c| c.cid == cid) {
            let old = s.conns.swap_remove(i);
            old.closing.store(how, Ordering::Release);
            s.closing_unreleased.push(cid);
            reinstated = true;
        } else if s.conns.len() >= self.max_connections() {
            return Err(());
        }
        let closing = Arc::new(AtomicU8::new(closing::OPEN));
        s.conns.push(ConnEntry {
            cid,
            closing: closing.clone(),
            busy: 0,
        });
        Ok((closing, reinstated))
    }

    /// Whether connection `cid` could join now (a free place, or its CID
    /// is being reinstated).
    pub(crate) fn has_room_for(&self, cid: u16) -> bool {
        let s = self.lock();
        s.conns.iter().any(|c| c.cid == cid) || s.conns.len() < self.max_connections()
    }

    /// Tells connection `cid` to close (a Logout naming it, from any
    /// connection), `how` being one of [`closing`]. False when no such
    /// connection is in the session.
    pub(crate) fn close_conn(&self, cid: u16, how: u8) -> bool {
        let mut s = self.lock();
        let Some(i) = s.conns.iter().position(|c| c.cid == cid) else {
            return false;
        };
        let old = s.conns.swap_remove(i);
        old.closing.store(how, Ordering::Release);
        s.closing_unreleased.push(cid);
        true
    }

    /// Connection `cid` (whose flag is `closing`) is gone; `orphans` are
    /// its tasks, kept for TASK REASSIGN. Returns how many connections the
    /// session still has.
    pub(crate) fn release_conn(
        &self,
        cid: u16,
        closing: &Arc<AtomicU8>,
        orphans: Vec<Orphan>,
    ) -> usize {
        let mut s = self.lock();
        s.conns.retain(|c| !Arc::ptr_eq(&c.closing, closing));
        if let Some(i) = s.closing_unreleased.iter().position(|&c| c == cid) {
            s.closing_unreleased.swap_remove(i);
        }
        if s.executing == Some(cid) {
            s.executing = None;
        }
        s.orphans.extend(orphans);
        s.conns.len()
    }

    /// The CIDs of its connections now.
    pub(crate) fn cids(&self) -> Vec<u16> {
        self.lock().conns.iter().map(|c| c.cid).collect()
    }

    /// How many connections the session has now.
    pub(crate) fn conn_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether a connection was told to close but has not handed over its
    /// tasks yet.
    pub(crate) fn release_pending(&self) -> bool {
        !self.lock().closing_unreleased.is_empty()
    }

    /// The CmdSN rules for a PDU on connection `cid`. In a session of one
    /// connection (MaxConnections=1) a gap cannot be filled (one TCP stream
    /// loses nothing), so it is stepped over; in an MC/S session a higher
    /// CmdSN waits for the lower ones to arrive on any connection (a
    /// command lost with a failed connection is the initiator's to send
    /// again) and run first.
    pub(crate) fn gate(&self, cid: u16, immediate: bool, cmd_sn: Sn) -> Gate {
        if immediate {
            return Gate::Go;
        }
        let mut s = self.lock();
        if cmd_sn.lt(s.exp_cmd_sn) || cmd_sn.gt(s.max_cmd_sn) {
            log::warn!(
                "dropping command with CmdSN {cmd_sn} outside the window [{}, {}]",
                s.exp_cmd_sn,
                s.max_cmd_sn
            );
            return Gate::Drop;
        }
        let alone = self.max_connections() <= 1;
        if !alone && (cmd_sn != s.exp_cmd_sn || s.executing.is_some_and(|c| c != cid)) {
            return Gate::Wait;
        }
        if cmd_sn != s.exp_cmd_sn {
            log::warn!("CmdSN gap: expected {}, got {cmd_sn}", s.exp_cmd_sn);
        }
        s.exp_cmd_sn = cmd_sn.next();
        if !alone {
            s.executing = Some(cid);
        }
        Gate::Go
    }

    /// Connection `cid` finished the command it was given the turn for.
    pub(crate) fn end_turn(&self, cid: u16) {
        let mut s = self.lock();
        if s.executing == Some(cid) {
            s.executing = None;
        }
    }

    /// ExpCmdSN and MaxCmdSN to advertise on any connection: the queue
    /// depth minus the write tasks of every connection still waiting for
    /// data (`busy` is connection `cid`'s count); MaxCmdSN never moves back.
    pub(crate) fn window(&self, cid: u16, busy: u32, depth: u32) -> (Sn, Sn) {
        let mut s = self.lock();
        if let Some(c) = s.conns.iter_mut().find(|c| c.cid == cid) {
            c.busy = busy;
        }
        let total: u32 = s.conns.iter().map(|c| c.busy).sum::<u32>().max(busy);
        let candidate = Sn(s
            .exp_cmd_sn
            .0
            .wrapping_add(depth.max(1).saturating_sub(total).max(1))
            .wrapping_sub(1));
        if candidate.gt(s.max_cmd_sn) {
            s.max_cmd_sn = candidate;
        }
        (s.exp_cmd_sn, s.max_cmd_sn)
    }

    /// The window as it stands, for checks.
    pub(crate) fn cmd_window(&self) -> (Sn, Sn) {
        let s = self.lock();
        (s.exp_cmd_sn, s.max_cmd_sn)
    }

    /// Takes the orphaned task with this ITT (a TASK REASSIGN).
    pub(crate) fn take_orphan(&self, itt: u32) -> Option<Orphan> {
        let mut s = self.lock();
        let i = s.orphans.iter().position(|o| o.itt() == itt)?;
        Some(s.orphans.swap_remove(i))
    }

    /// Orphaned tasks waiting for reassignment.
    pub(crate) fn orphan_count(&self) -> usize {
        self.lock().orphans.len()
    }

    /// Takes the orphaned tasks whose wait for reassignment ended by
    /// `now` (DefaultTime2Wait + DefaultTime2Retain after their connection
    /// failed): they are never reassigned.
    pub(crate) fn expire_orphans(&self, now: Instant) -> Vec<Orphan> {
        let mut s = self.lock();
        if !s.orphans.iter().any(|o| o.expires() <= now) {
            return Vec::new();
        }
        let (ended, kept) = std::mem::take(&mut s.orphans)
            .into_iter()
            .partition(|o| o.expires() <= now);
        s.orphans = kept;
        ended
    }

    /// When the next orphaned task stops waiting for reassignment.
    pub(crate) fn orphans_expire_at(&self) -> Option<Instant> {
        self.lock().orphans.iter().map(Orphan::expires).min()
    }
}
