//! Fault injection: a [`FaultInjector`] is a cheap handle (one `Arc`) onto
//! atomics that connections consult as they work. Each fault is set either
//! for all portals ([`FaultInjector`] as returned by the target) or for one
//! ([`FaultInjector::portal`]).

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Sense data for injected CHECK CONDITIONs: key, ASC, ASCQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedSense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// An Async Message (RFC 7143 §11.9) for connections to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEvent {
    /// AsyncEvent 0: a SCSI asynchronous event on `lun` with this sense
    /// (e.g. UNIT ATTENTION 2A/06 ALUA state changed, 2A/09 capacity
    /// data changed).
    Scsi { lun: u16, sense: InjectedSense },
    /// AsyncEvent 1: log out within `within` seconds (Parameter3). A
    /// connection that has not logged out by then is dropped.
    RequestLogout { within: u16 },
    /// AsyncEvent 2: the connection is dropped (right after the message);
    /// Parameter2 = Time2Wait, Parameter3 = Time2Retain.
    DropConnection { time2wait: u16, time2retain: u16 },
    /// AsyncEvent 3: every connection of the session is dropped, likewise.
    DropSession { time2wait: u16, time2retain: u16 },
    /// AsyncEvent 4: asks for a Text negotiation; in it the target then
    /// declares `max_recv_data_segment_len` as its MaxRecvDataSegmentLength
    /// (None: the value it has).
    Renegotiate {
        max_recv_data_segment_len: Option<u32>,
    },
}

impl AsyncEvent {
    /// The AsyncEvent code on the wire.
    pub fn code(&self) -> u8 {
        match self {
            AsyncEvent::Scsi { .. } => 0,
            AsyncEvent::RequestLogout { .. } => 1,
            AsyncEvent::DropConnection { .. } => 2,
            AsyncEvent::DropSession { .. } => 3,
            AsyncEvent::Renegotiate { .. } => 4,
        }
    }
}

/// What the connections did about async messages (all portals).
#[derive(Debug, Default)]
struct AsyncCounters {
    sent: AtomicU64,
    logouts_in_time: AtomicU64,
    logouts_missed: AtomicU64,
    renegotiations: AtomicU64,
}

#[derive(Debug, Default)]
struct FaultSet {
    delay_us: AtomicU64,
    /// Commands left before a connection is dropped; 0 = off.
    drop_after: AtomicU64,
    /// `class << 8 | detail`, or 0 = accept logins.
    refuse_login: AtomicU32,
    reject_next: AtomicU32,
    reject_reason: AtomicU32,
    check_next: AtomicU32,
    /// `key << 16 | asc << 8 | ascq`.
    check_sense: AtomicU32,
    stalled: AtomicBool,
    /// Answer logins with a redirect: TargetAddress value and whether it
    /// is permanent (0x0102) or temporary (0x0101).
    redirect: Mutex<Option<(String, bool)>>,
    /// The newest async message for this scope and its generation.
    async_event: Mutex<Option<(u64, AsyncEvent)>>,
}

#[derive(Debug)]
struct Registered {
    id: u64,
    portal: usize,
    stream: TcpStream,
}

#[derive(Debug, Default)]
struct Faults {
    all: FaultSet,
    portals: Vec<FaultSet>,
    /// Live connections, so "drop now" can shut their sockets at once.
    conns: Mutex<Vec<Registered>>,
    next_conn_id: AtomicU64,
    /// Generation of the newest async message (any scope); 0: none yet.
    async_generation: AtomicU64,
    async_counters: AsyncCounters,
    /// Faults for one connection, chosen by its CID (MC/S tests).
    by_cid: CidFaults,
}

/// Handle onto the fault switches of one target, scoped to all portals or to
/// one portal.
#[derive(Debug, Clone)]
pub struct FaultInjector {
    faults: Arc<Faults>,
    /// `None` = all portals.
    scope: Option<usize>,
}

/// Takes one from a countdown; true when one was there to take.
fn take_one(c: &AtomicU32) -> bool {
    c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

impl FaultInjector {
    pub(crate) fn new(portals: usize) -> FaultInjector {
        FaultInjector {
            faults: Arc::new(Faults {
                portals: (0..portals).map(|_| FaultSet::default()).collect(),
                ..Faults::default()
            }),
            scope: None,
        }
    }

    /// The same switches, scoped to portal `index` (as in `portals()`).
    /// An index beyond the portals affects nothing.
    pub fn portal(&self, index: usize) -> FaultInjector {
        FaultInjector {
            faults: self.faults.clone(),
            scope: Some(index),
        }
    }

    /// Scoped back to all portals.
    pub fn all_portals(&self) -> FaultInjector {
        FaultInjector {
            faults: self.faults.clone(),
            scope: None,
        }
    }

    fn set(&self) -> Option<&FaultSet> {
        match self.scope {
            None => Some(&self.faults.all),
            Some(i) => self.faults.portals.get(i),
        }
    }

    fn with(&self, f: impl FnOnce(&FaultSet)) {
        if let Some(s) = self.set() {
            f(s)
        }
    }

    /// Delays every response by `delay` (zero turns it off).
    pub fn delay_responses(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.with(|s| s.delay_us.store(us, Ordering::Relaxed));
    }

    /// Closes the connection that answers the `n`-th SCSI command from now
    /// (right after answering it). 0 turns it off.
    pub fn drop_after_commands(&self, n: u64) {
        self.with(|s| s.drop_after.store(n, Ordering::Relaxed));
    }

    /// Closes every connection in scope now (shuts the sockets down).
    pub fn drop_connections_now(&self) {
        let conns = self.faults.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.iter() {
            if self.scope.is_none_or(|p| p == c.portal) {
                let _ = c.stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Fails every login with this status class/detail (e.g. 0x02/0x01
    /// authentication failure, 0x03/0x01 out of resources).
    pub fn refuse_logins(&self, status_class: u8, status_detail: u8) {
        let v = (u32::from(status_class) << 8) | u32::from(status_detail);
        self.with(|s| s.refuse_login.store(v, Ordering::Relaxed));
    }

    pub fn accept_logins(&self) {
        self.with(|s| s.refuse_login.store(0, Ordering::Relaxed));
    }

    /// Answers every login with a redirect to `to` (portal group tag 1):
    /// status 0x0102 "moved permanently" when `permanent`, else 0x0101
    /// "moved temporarily", as arrays with a group address do.
    pub fn redirect_logins(&self, to: SocketAddr, permanent: bool) {
        self.redirect_logins_to(format!("{to},1"), permanent)
    }

    /// As [`redirect_logins`](Self::redirect_logins) with a TargetAddress
    /// value as given (e.g. a host name, or something malformed).
    pub fn redirect_logins_to(&self, target_address: String, permanent: bool) {
        self.with(|s| {
            *s.redirect.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((target_address.clone(), permanent))
        });
    }

    /// Stops redirecting logins.
    pub fn stop_redirecting(&self) {
        self.with(|s| *s.redirect.lock().unwrap_or_else(|e| e.into_inner()) = None);
    }

    /// Answers the next `n` SCSI commands with a Reject PDU of `reason`
    /// (e.g. 0x04 protocol error, 0x09 invalid PDU field).
    pub fn reject_next_commands(&self, n: u32, reason: u8) {
        self.with(|s| {
            s.reject_reason.store(u32::from(reason), Ordering::Relaxed);
            s.reject_next.store(n, Ordering::Release);
        });
    }

    /// Answers the next `n` SCSI commands with CHECK CONDITION and this sense.
    pub fn check_condition_next(&self, n: u32, key: u8, asc: u8, ascq: u8) {
        let v = (u32::from(key) << 16) | (u32::from(asc) << 8) | u32::from(ascq);
        self.with(|s| {
            s.check_sense.store(v, Ordering::Relaxed);
            s.check_next.store(n, Ordering::Release);
        });
    }

    /// Stalls: connections keep being accepted and read, but nothing is
    /// answered until [`unstall`](Self::unstall).
    pub fn stall(&self) {
        self.with(|s| s.stalled.store(true, Ordering::Relaxed));
    }

    pub fn unstall(&self) {
        self.with(|s| s.stalled.store(false, Ordering::Relaxed));
    }

    /// Has every connection in scope that is in the full feature phase of
    /// a normal session now send `event` once (connections that log in
    /// later do not). Sent within one tick (50 ms) of an idle connection,
    /// or after the next PDU of a busy one.
    pub fn send_async_event(&self, event: AsyncEvent) {
        let generation = self.faults.async_generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.with(|s| {
            *s.async_event.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, event))
        });
    }

    /// Async messages sent so far (all portals).
    pub fn async_events_sent(&self) -> u64 {
        self.faults.async_counters.sent.load(Ordering::Acquire)
    }

    /// Logout Requests that came within Parameter3 of an AsyncEvent 1.
    pub fn logouts_after_request(&self) -> u64 {
        self.faults
            .async_counters
            .logouts_in_time
            .load(Ordering::Acquire)
    }

    /// Connections dropped because they did not log out in time after an
    /// AsyncEvent 1.
    pub fn logout_requests_ignored(&self) -> u64 {
        self.faults
            .async_counters
            .logouts_missed
            .load(Ordering::Acquire)
    }

    /// Text negotiations after an AsyncEvent 4 that declared
    /// MaxRecvDataSegmentLength.
    pub fn renegotiations(&self) -> u64 {
        self.faults
            .async_counters
            .renegotiations
            .load(Ordering::Acquire)
    }

    /// Live connections in scope (logged in or not).
    pub fn connections(&self) -> usize {
        self.faults
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| self.scope.is_none_or(|p| p == c.portal))
            .count()
    }

    /// Turns every fault in scope off.
    pub fn clear(&self) {
        self.with(|s| {
            s.delay_us.store(0, Ordering::Relaxed);
            s.drop_after.store(0, Ordering::Relaxed);
            s.refuse_login.store(0, Ordering::Relaxed);
            s.reject_next.store(0, Ordering::Relaxed);
            s.check_next.store(0, Ordering::Relaxed);
            s.stalled.store(false, Ordering::Relaxed);
            *s.redirect.lock().unwrap_or_else(|e| e.into_inner()) = None;
            *s.async_event.lock().unwrap_or_else(|e| e.into_inner()) = None;
        });
    }

    // ---- what connections ask (portal-specific set first, then the global one)

    fn sets(&self, portal: usize) -> impl Iterator<Item = &FaultSet> {
        self.faults
            .portals
            .get(portal)
            .into_iter()
            .chain(std::iter::once(&self.faults.all))
    }

    pub(crate) fn response_delay(&self, portal: usize) -> Duration {
        let us = self
            .sets(portal)
            .map(|s| s.delay_us.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        Duration::from_micros(us)
    }

    pub(crate) fn is_stalled(&self, portal: usize) -> bool {
        self.sets(portal).any(|s| s.stalled.load(Ordering::Relaxed))
    }

    /// The redirect for logins on `portal`: TargetAddress and permanence.
    pub(crate) fn login_redirect(&self, portal: usize) -> Option<(String, bool)> {
        self.sets(portal)
            .find_map(|s| s.redirect.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The current async generation: a connection entering the full
    /// feature phase starts from it (older messages are not for it).
    pub(crate) fn async_generation(&self) -> u64 {
        self.faults.async_generation.load(Ordering::Acquire)
    }

    /// An async message newer than `seen` for `portal`, if any; `seen`
    /// moves to the current generation. One atomic load when none is new.
    pub(crate) fn take_async_event(&self, portal: usize, seen: &mut u64) -> Option<AsyncEvent> {
        let now = self.faults.async_generation.load(Ordering::Acquire);
        if now <= *seen {
            return None;
        }
        let before = *seen;
        *seen = now;
        self.sets(portal)
            .filter_map(|s| *s.async_event.lock().unwrap_or_else(|e| e.into_inner()))
            .filter(|&(g, _)| g > before)
            .max_by_key(|&(g, _)| g)
            .map(|(_, e)| e)
    }

    pub(crate) fn count_async_sent(&self) {
        self.faults
            .async_counters
            .sent
            .fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn count_logout(&self, in_time: bool) {
        let c = &self.faults.async_counters;
        let counter = if in_time {
            &c.logouts_in_time
        } else {
            &c.logouts_missed
        };
        counter.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn count_renegotiation(&self) {
        self.faults
            .async_counters
            .renegotiations
            .fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn login_refusal(&self, portal: usize) -> Option<(u8, u8)> {
        self.sets(portal)
            .map(|s| s.refuse_login.load(Ordering::Relaxed))
            .find(|&v| v != 0)
            .map(|v| ((v >> 8) as u8, v as u8))
    }

    pub(crate) fn take_reject(&self, portal: usize) -> Option<u8> {
        self.sets(portal)
            .find(|s| take_one(&s.reject_next))
            .map(|s| s.reject_reason.load(Ordering::Relaxed) as u8)
    }

    pub(crate) fn take_check_condition(&self, portal: usize) -> Option<InjectedSense> {
        self.sets(portal)
            .find(|s| take_one(&s.check_next))
            .map(|s| {
                let v = s.check_sense.load(Ordering::Relaxed);
                InjectedSense {
                    key: (v >> 16) as u8,
                    asc: (v >> 8) as u8,
                    ascq: v as u8,
                }
            })
    }

    /// Counts one command; true when this one is the last before a drop.
    pub(crate) fn count_command_for_drop(&self, portal: usize) -> bool {
        self.sets(portal).any(|s| {
            s.drop_after
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                == Ok(1)
        })
    }

    pub(crate) fn register(&self, portal: usize, stream: &TcpStream) -> Option<u64> {
        let stream = stream.try_clone().ok()?;
        let id = self.faults.next_conn_id.fetch_add(1, Ordering::Relaxed);
        self.faults
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Registered { id, portal, stream });
        Some(id)
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.faults
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| c.id != id);
    }

    /// Shuts down every registered connection regardless of scope (stop).
    pub(crate) fn shutdown_all(&self) {
        for c in self
            .faults
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Faults aimed at the connection with one CID (in any session), so a test
/// can fail one connection of an MC/S session and keep the others.
#[derive(Debug, Default)]
struct CidFaults {
    /// Fast path: false while no CID fault is set.
    any: AtomicBool,
    set: Mutex<Vec<CidFault>>,
    /// TASK REASSIGNs still to refuse (any connection).
    refuse_reassign: AtomicU32,
}

#[derive(Debug, Clone, Copy, Default)]
struct CidFault {
    cid: u16,
    /// Closes at its next step (as if the TCP connection broke).
    kill: bool,
    /// Neither reads nor answers until unhung (a stuck connection).
    hang: bool,
    /// Data-In PDUs still to leave out (as if a digest error dropped them).
    drop_data_in: u32,
    /// R2Ts still to leave out (as if a digest error dropped them).
    drop_r2t: u32,
    /// Writes still to execute whose status is then lost with the
    /// connection (killed right after the write ran).
    lose_status_and_kill: u32,
}

/// What a connection must do about the faults aimed at its CID.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CidFaultState {
    pub(crate) kill: bool,
    pub(crate) hang: bool,
}

impl FaultInjector {
    fn with_cid(&self, cid: u16, f: impl FnOnce(&mut CidFault)) {
        let c = &self.faults.by_cid;
        let mut set = c.set.lock().unwrap_or_else(|e| e.into_inner());
        let i = match set.iter().position(|x| x.cid == cid) {
            Some(i) => i,
            None => {
                set.push(CidFault {
                    cid,
                    ..CidFault::default()
                });
                set.len() - 1
            }
        };
        f(&mut set[i]);
        set.retain(|x| {
            x.kill || x.hang || x.drop_data_in > 0 || x.drop_r2t > 0 || x.lose_status_and_kill > 0
        });
        c.any.store(!set.is_empty(), Ordering::Release);
    }

    /// Closes the connection with this CID (any session) at its next step,
    /// as a broken TCP connection would; later logins with the CID are not
    /// affected once it has gone (see [`FaultInjector::revive_connection`]).
    pub fn kill_connection(&self, cid: u16) {
        self.with_cid(cid, |f| f.kill = true);
    }

    /// Lets connections with this CID live again after [`kill_connection`](Self::kill_connection).
    pub fn revive_connection(&self, cid: u16) {
        self.with_cid(cid, |f| f.kill = false);
    }

    /// The connection with this CID stops reading and answering (its TCP
    /// connection stays up): a hung connection. A Logout of it from
    /// another connection still closes it.
    pub fn hang_connection(&self, cid: u16) {
        self.with_cid(cid, |f| f.hang = true);
    }

    pub fn unhang_connection(&self, cid: u16) {
        self.with_cid(cid, |f| f.hang = false);
    }

    /// Leaves out the next `n` Data-In PDUs of the connection with this
    /// CID, as if a digest error had dropped them: the initiator sees a
    /// DataSN gap (and at ERL 1 asks again with a SNACK).
    pub fn drop_data_in(&self, cid: u16, n: u32) {
        self.with_cid(cid, |f| f.drop_data_in = n);
    }

    /// Leaves out the next `n` R2Ts of the connection with this CID, as if
    /// a digest error had dropped them: the write waits for data that is
    /// never asked for until the initiator (ERL 1) asks for the R2T again
    /// with a Data/R2T SNACK.
    pub fn drop_r2t(&self, cid: u16, n: u32) {
        self.with_cid(cid, |f| f.drop_r2t = n);
    }

    /// True when this R2T of connection `cid` is to be left out.
    pub(crate) fn take_r2t_drop(&self, cid: u16) -> bool {
        if !self.faults.by_cid.any.load(Ordering::Acquire) {
            return false;
        }
        let mut taken = false;
        self.with_cid(cid, |f| {
            if f.drop_r2t > 0 {
                f.drop_r2t -= 1;
                taken = true;
            }
        });
        taken
    }

    /// The kill/hang faults for `cid`; one atomic load when none is set.
    pub(crate) fn cid_state(&self, cid: u16) -> CidFaultState {
        let c = &self.faults.by_cid;
        if !c.any.load(Ordering::Acquire) {
            return CidFaultState::default();
        }
        let set = c.set.lock().unwrap_or_else(|e| e.into_inner());
        set.iter()
            .find(|x| x.cid == cid)
            .map_or(CidFaultState::default(), |x| CidFaultState {
                kill: x.kill,
                hang: x.hang,
            })
    }

    /// True when this Data-In of connection `cid` is to be left out.
    pub(crate) fn take_data_in_drop(&self, cid: u16) -> bool {
        if !self.faults.by_cid.any.load(Ordering::Acquire) {
            return false;
        }
        let mut taken = false;
        self.with_cid(cid, |f| {
            if f.drop_data_in > 0 {
                f.drop_data_in -= 1;
                taken = true;
            }
        });
        taken
    }

    /// The next `n` writes that complete on the connection with this CID
    /// are executed at the LU, and then their status is lost: it is not
    /// sent, and the connection is killed (as if the TCP connection broke
    /// right after the write ran). The status is kept, so a TASK REASSIGN
    /// (ERL 2) sends it again; a retry as a new task runs the write twice.
    pub fn lose_status_and_kill(&self, cid: u16, n: u32) {
        self.with_cid(cid, |f| f.lose_status_and_kill = n);
    }

    /// True when the status of this write of connection `cid` is to be
    /// lost with its connection.
    pub(crate) fn take_status_loss(&self, cid: u16) -> bool {
        if !self.faults.by_cid.any.load(Ordering::Acquire) {
            return false;
        }
        let mut taken = false;
        self.with_cid(cid, |f| {
            if f.lose_status_and_kill > 0 {
                f.lose_status_and_kill -= 1;
                taken = true;
            }
        });
        taken
    }

    /// Answers the next `n` TASK REASSIGN requests "function rejected"
    /// (response 255), to play a target that refuses the recovery.
    pub fn refuse_task_reassign(&self, n: u32) {
        self.faults
            .by_cid
            .refuse_reassign
            .store(n, Ordering::Release);
    }

    pub(crate) fn take_reassign_refusal(&self) -> bool {
        take_one(&self.faults.by_cid.refuse_reassign)
    }

    /// Turns every per-CID fault off.
    pub fn clear_connection_faults(&self) {
        let c = &self.faults.by_cid;
        c.refuse_reassign.store(0, Ordering::Release);
        c.set.lock().unwrap_or_else(|e| e.into_inner()).clear();
        c.any.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countdowns_are_per_scope() {
        let f = FaultInjector::new(2);
        f.portal(1).reject_next_commands(2, 0x04);
        assert_eq!(f.take_reject(0), None);
        assert_eq!(f.take_reject(1), Some(0x04));
        assert_eq!(f.take_reject(1), Some(0x04));
        assert_eq!(f.take_reject(1), None);
        f.check_condition_next(1, 0x03, 0x11, 0x00);
        assert_eq!(
            f.take_check_condition(0),
            Some(InjectedSense {
                key: 3,
                asc: 0x11,
                ascq: 0,
            })
        );
        assert_eq!(f.take_check_condition(1), None);
        f.drop_after_commands(2);
        assert!(!f.count_command_for_drop(0));
        assert!(f.count_command_for_drop(1));
        assert!(!f.count_command_for_drop(1));
        f.portal(0).delay_responses(Duration::from_micros(50));
        assert_eq!(f.response_delay(0), Duration::from_micros(50));
        assert_eq!(f.response_delay(1), Duration::ZERO);
        f.refuse_logins(3, 1);
        assert_eq!(f.login_refusal(1), Some((3, 1)));
        f.clear();
        assert_eq!(f.login_refusal(1), None);
        // Out-of-range portal scopes are inert, not a panic.
        f.portal(9).stall();
        assert!(!f.is_stalled(9));
    }

    #[test]
    fn async_events_reach_each_connection_once_and_only_in_scope() {
        let f = FaultInjector::new(2);
        // A connection that entered the full feature phase now.
        let mut seen0 = f.async_generation();
        let mut seen1 = f.async_generation();
        assert_eq!(f.take_async_event(0, &mut seen0), None);
        let ev = AsyncEvent::RequestLogout { within: 3 };
        f.portal(0).send_async_event(ev);
        assert_eq!(f.take_async_event(1, &mut seen1), None, "other portal");
        assert_eq!(f.take_async_event(0, &mut seen0), Some(ev));
        assert_eq!(f.take_async_event(0, &mut seen0), None, "once");
        // A connection that logs in later does not get it.
        let mut later = f.async_generation();
        assert_eq!(f.take_async_event(0, &mut later), None);
        let all = AsyncEvent::DropSession {
            time2wait: 1,
            time2retain: 2,
        };
        f.send_async_event(all);
        assert_eq!(f.take_async_event(1, &mut seen1), Some(all));
        assert_eq!(f.take_async_event(0, &mut later), Some(all));
        assert_eq!(all.code(), 3);
    }

    #[test]
    fn connection_faults_aim_at_one_cid() {
        let f = FaultInjector::new(1);
        assert_eq!(f.cid_state(2), CidFaultState::default());
        f.hang_connection(2);
        f.kill_connection(3);
        assert!(f.cid_state(2).hang && !f.cid_state(2).kill);
        assert!(f.cid_state(3).kill && !f.cid_state(1).kill);
        f.drop_data_in(1, 2);
        assert!(!f.take_data_in_drop(2));
        assert!(f.take_data_in_drop(1) && f.take_data_in_drop(1));
        assert!(!f.take_data_in_drop(1), "only two");
        f.drop_r2t(3, 1);
        assert!(!f.take_r2t_drop(1) && !f.take_data_in_drop(3));
        assert!(f.take_r2t_drop(3));
        assert!(!f.take_r2t_drop(3), "only one");
        f.unhang_connection(2);
        f.revive_connection(3);
        assert_eq!(f.cid_state(2), CidFaultState::default());
        assert!(!f.faults.by_cid.any.load(Ordering::Acquire));
        f.lose_status_and_kill(5, 1);
        assert!(!f.take_status_loss(4), "another CID");
        assert!(f.take_status_loss(5));
        assert!(!f.take_status_loss(5), "only one");
        assert!(!f.faults.by_cid.any.load(Ordering::Acquire));
        f.kill_connection(4);
        f.clear_connection_faults();
        assert!(!f.cid_state(4).kill);
    }
}
