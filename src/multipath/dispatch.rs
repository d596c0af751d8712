//! The multipath dispatcher as a sans-IO state machine: it owns the I/O
//! slots of one submission queue, picks a path for each command (ALUA tier
//! first, then the [`Policy`]'s selector), judges outcomes (complete, retry
//! after a delay, fail), takes back commands a failed path bounces, holds
//! bounced writes until their old path is fenced, and fails I/O that found
//! no usable path for `no_path_timeout`.
//!
//! It never reads a clock, touches a ring or a socket: the caller passes
//! `now` and events in and carries out the [`Action`]s it hands out.
//!
//! ```text
//!  submit ─────────────►┐
//!  handle_response ────►│ Dispatcher ──poll_action──► Send { path, slot, cmd }
//!  handle_timeout(now) ►│  (slots,    ◄─send_refused─ (the path could not take it)
//!                       │   waiting)  ──poll_action──► Complete { slot, completion }
//!  PathTable (state, ALUA tier, load, session epoch) ─┘
//! ```
//!
//! `worker::IoQueue` drives it with the rings and `Instant::now()`; the
//! seeded system simulation (`tests/system_sim.rs`) drives the very same
//! code with virtual time.
//!
//! # Fencing
//! A write that was handed to a path's iSCSI session and comes back
//! unanswered (the session failed) may still be executed by the target
//! later: a hung portal that wakes up, or bytes a network held back. If it
//! were retried on another path at once, and the application then wrote
//! the same blocks again, the late copy could overwrite newer acknowledged
//! data. So such a write waits until its old path is *fenced*: the newest
//! session of the path known ended ([`PathTable::fenced_through`]) is the
//! one the write was sent in or a later one. It moves when the path logs in
//! again with the same ISID and TSIH 0, or when another path logs in once
//! with the failed path's ISID through a portal of the same portal group
//! (`multipath::fence`): either makes the target end the old session and
//! all its tasks (session reinstatement, RFC 7143 §6.3.5). Reads,
//! flushes and commands that never reached a session need no fence. A write
//! that stays unfenced for `fence_timeout` fails with
//! [`IoError::NotFenced`]; see docs/multipath.md for the order of fence
//! steps and how to switch fencing off.

use super::io::{command_from_completion, judge, IoCompletion, IoError, IoOp, Verdict};
use super::path::PathLoad;
use super::selector::{select, Policy, SelectorState};
use crate::iscsi::connection::{Command, Completion, Direction, SubmitError};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use thiserror::Error;

/// What the dispatcher needs to know about the paths. `worker` reads the
/// per-path atomics; the simulation its own state.
pub trait PathTable {
    /// Number of paths (indices `0..count()`).
    fn count(&self) -> usize;
    /// The path's ALUA tier when it can take I/O now (0 is best), None
    /// when it is not up or its ALUA state forbids I/O.
    fn usable_tier(&self, path: usize) -> Option<u8>;
    /// The load figures the selector weighs.
    fn load(&self, path: usize) -> PathLoad;
    /// The newest session epoch of the path known ended: a write sent in
    /// that session or an earlier one can no longer run on the target (the
    /// path logged in again with the same ISID, or a fence login with its
    /// ISID succeeded through another portal of its portal group).
    fn fenced_through(&self, path: usize) -> u64;
    /// Selector state shared by every queue of the device.
    fn selector(&self) -> &SelectorState;
}

/// Tunables of the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchConfig {
    /// How commands are spread over the usable paths of the best tier.
    pub policy: Policy,
    /// How long an I/O waits for a usable path before failing with
    /// [`IoError::NoPath`].
    pub no_path_timeout: Duration,
    /// Retries after retryable SCSI statuses (bounces do not count).
    pub max_retries: u32,
    /// Hold a write bounced off a failed session until that path is fenced
    /// (on by default). Off: it is retried at once on any path, which can
    /// let a late copy overwrite newer data (see the module docs).
    pub fence_writes: bool,
    /// How long a bounced write waits for its old path to be fenced before
    /// failing with [`IoError::NotFenced`].
    pub fence_timeout: Duration,
}

impl Default for DispatchConfig {
    fn default() -> DispatchConfig {
        DispatchConfig {
            policy: Policy::QueueDepth,
            no_path_timeout: Duration::from_secs(30),
            max_retries: 8,
            fence_writes: true,
            fence_timeout: Duration::from_secs(30),
        }
    }
}

/// What a path reports about a command it was handed.
#[derive(Debug)]
pub enum PathResponse {
    /// The target answered (any status).
    Done(Completion),
    /// The path failed before the target answered; the command comes back.
    Bounced {
        /// The command, buffer included.
        cmd: Command,
        /// The session epoch of the path the command had been handed to
        /// (it went out on the wire and may still run), or None when it
        /// never left the path's queue.
        sent_in_session: Option<u64>,
        /// The path whose session `sent_in_session` counts, when not the
        /// one reporting: an MC/S task that another connection took over
        /// (TASK REASSIGN) and that connection failed with it; it is that
        /// connection that may still run it. None: the reporting path.
        sent_on: Option<usize>,
    },
    /// The command was consumed by a failing session and is lost: why the
    /// session refused it.
    Lost(SubmitError),
    /// The target confirmed an ABORT TASK of the command, overdue on a live
    /// path ("function complete" or "task does not exist"): it will not
    /// run, so it may go out again at once, on any path. Each one doubles
    /// the time the command may take before it is aborted again
    /// ([`crate::multipath::AbortPolicy::after_for`]); after
    /// [`MAX_ABORTS`] the I/O fails with [`IoError::Aborted`].
    Aborted {
        /// The command, buffer included.
        cmd: Command,
    },
    /// The target refused the command with RESERVATION CONFLICT because
    /// the path's registration was removed by a PREEMPT AND ABORT this
    /// device sent itself (a *stray preempt*: a fence of the path's older,
    /// already ended session whose answer was lost with its fencer's
    /// session, and which ran after the path registered again). The
    /// command did not run; the path registers its key again, and the
    /// command goes out again at once, at most [`MAX_CONFLICT_RETRIES`]
    /// times before the conflict reaches the application.
    StrayPreempt {
        /// The command, buffer included.
        cmd: Command,
    },
}

/// Confirmed ABORT TASKs of one I/O after which it fails with
/// [`IoError::Aborted`] (the target stays too slow for it, and aborting
/// and retrying it could go on for ever).
pub const MAX_ABORTS: u32 = 4;

/// Resends of one I/O after a RESERVATION CONFLICT caused by a stray
/// preempt of the device's own ([`PathResponse::StrayPreempt`]) before the
/// conflict reaches the application.
pub const MAX_CONFLICT_RETRIES: u32 = 2;

/// What the caller has to do next.
#[derive(Debug)]
pub enum Action {
    /// Hand `cmd` to path `path` tagged with `slot`, and add its bytes to
    /// the path's load; if the path cannot take it, give it back with
    /// [`Dispatcher::send_refused`].
    Send {
        /// Path index.
        path: usize,
        /// The slot to report the outcome against.
        slot: u32,
        /// The command.
        cmd: Command,
        /// Confirmed ABORT TASKs of this I/O so far: the path waits
        /// [`crate::multipath::AbortPolicy::after_for`] this many before it
        /// aborts the command again.
        aborts: u32,
    },
    /// The I/O in `slot` is finished; the slot is free again.
    Complete {
        /// The freed slot.
        slot: u32,
        /// What the application gets.
        completion: IoCompletion,
    },
}

/// A response the dispatcher cannot match with what it handed out: a bug
/// in the caller or a path, reported instead of corrupting a slot.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DispatchError {
    /// The slot number is outside the queue.
    #[error("response for slot {slot}, but the queue has {depth} slots")]
    NoSuchSlot {
        /// The slot named.
        slot: u32,
        /// The queue's depth.
        depth: usize,
    },
    /// The slot's command is not on that path (answered twice, or by the
    /// wrong path).
    #[error("slot {slot} answered by path {path}, but its command is on {on:?}")]
    NotOnPath {
        /// The slot named.
        slot: u32,
        /// The path that answered.
        path: usize,
        /// Where the dispatcher has it (None: not handed out).
        on: Option<usize>,
    },
}

/// Why a slot is parked in the waiting list.
#[derive(Debug, Default)]
struct Slot {
    user_tag: u64,
    op: Option<IoOp>,
    submitted_at: Option<Instant>,
    bytes: u64,
    /// The path its command is on, while a path has it.
    path: Option<usize>,
    last_path: Option<usize>,
    /// Every resubmission (reported in the completion).
    retries: u32,
    /// Resubmissions after retryable SCSI statuses only.
    status_retries: u32,
    /// Confirmed ABORT TASKs ([`PathResponse::Aborted`]).
    aborts: u32,
    /// Resends after a stray preempt's RESERVATION CONFLICT
    /// ([`PathResponse::StrayPreempt`]).
    conflict_retries: u32,
    /// The command, while the dispatcher holds it.
    held: Option<Command>,
    not_before: Option<Instant>,
    no_path_since: Option<Instant>,
    /// Waiting until this path's session epoch exceeds the value, since.
    fence: Option<(usize, u64, Instant)>,
    busy: bool,
}

/// The dispatcher of one submission queue (see the module docs).
#[derive(Debug)]
pub struct Dispatcher {
    config: DispatchConfig,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    /// Slots to dispatch at the next `poll_action`.
    ready: VecDeque<u32>,
    /// Slots held for a delay, a path or a fence; looked at by `handle_timeout`.
    waiting: VecDeque<u32>,
    done: VecDeque<(u32, IoCompletion)>,
    scratch: Vec<PathLoad>,
    rotate: usize,
    closed: bool,
    fences_waited: u64,
}

impl Dispatcher {
    /// A dispatcher with `depth` slots; `rotate` seeds the tie-breaker (so
    /// queues of one device start on different paths).
    pub fn new(depth: usize, config: DispatchConfig, rotate: usize) -> Dispatcher {
        let depth = depth.clamp(1, 1 << 16);
        Dispatcher {
            config,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..depth as u32).rev().collect(),
            in_flight: 0,
            ready: VecDeque::with_capacity(depth),
            waiting: VecDeque::with_capacity(depth),
            done: VecDeque::with_capacity(depth),
            scratch: Vec::new(),
            rotate,
            closed: false,
            fences_waited: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// Slots in use: submitted and not yet handed out as `Complete`.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Number of slots.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Whether a slot is free for `submit`.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// How many bounced writes had to wait for a fence so far.
    pub fn fences_waited(&self) -> u64 {
        self.fences_waited
    }

    /// The path and bytes of every command a path holds now (to take them
    /// off the load figures when the queue goes away).
    pub fn on_paths(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.path.map(|p| (p, s.bytes)))
    }

    /// The path slot `slot`'s command is on, if a path has it.
    pub fn path_of(&self, slot: u32) -> Option<usize> {
        self.slots.get(slot as usize).and_then(|s| s.path)
    }

    /// The device is closing: what comes back or waits now completes with
    /// [`IoError::Closed`].
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Takes a new I/O (its command built already); the command goes out at
    /// the next [`poll_action`](Self::poll_action). Gives the command back
    /// when every slot is in use.
    pub fn submit(
        &mut self,
        now: Instant,
        op: IoOp,
        user_tag: u64,
        cmd: Command,
    ) -> Result<u32, Command> {
        let Some(slot) = self.free.pop() else {
            return Err(cmd);
        };
        self.slots[slot as usize] = Slot {
            user_tag,
            op: Some(op),
            submitted_at: Some(now),
            bytes: cmd.buffer.len() as u64,
            held: Some(cmd),
            busy: true,
            ..Slot::default()
        };
        self.in_flight += 1;
        self.ready.push_back(slot);
        Ok(slot)
    }

    /// A path answered for `slot`. Returns the bytes to take off that
    /// path's load figures.
    pub fn handle_response(
        &mut self,
        now: Instant,
        path: usize,
        slot: u32,
        response: PathResponse,
    ) -> Result<u64, DispatchError> {
        let depth = self.slots.len();
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return Err(DispatchError::NoSuchSlot { slot, depth });
        };
        if !s.busy || s.path != Some(path) {
            return Err(DispatchError::NotOnPath {
                slot,
                path,
                on: s.path,
            });
        }
        s.path = None;
        let bytes = s.bytes;
        match response {
            PathResponse::Done(c) => {
                match judge(
                    c.response,
                    c.status,
                    &c.sense,
                    s.status_retries,
                    self.config.max_retries,
                ) {
                    Verdict::Success => self.complete(slot, Ok(()), c.buffer, now),
                    Verdict::Fail(e) => self.complete(slot, Err(e), c.buffer, now),
                    Verdict::Retry { .. } if self.closed => {
                        self.complete(slot, Err(IoError::Closed), c.buffer, now)
                    }
                    Verdict::Retry { delay, .. } => {
                        s.retries += 1;
                        s.status_retries += 1;
                        s.not_before = (!delay.is_zero()).then(|| now + delay);
                        s.held = Some(command_from_completion(c));
                        self.waiting.push_back(slot);
                    }
                }
            }
            PathResponse::Bounced {
                cmd,
                sent_in_session,
                sent_on,
            } => {
                if self.closed {
                    self.complete(slot, Err(IoError::Closed), cmd.buffer, now);
                    return Ok(bytes);
                }
                s.retries += 1;
                let needs_fence = self.config.fence_writes && cmd.direction == Direction::Write;
                s.held = Some(cmd);
                match sent_in_session {
                    Some(session) if needs_fence => {
                        s.fence = Some((sent_on.unwrap_or(path), session, now));
                        self.fences_waited += 1;
                        self.waiting.push_back(slot);
                    }
                    _ => self.ready.push_back(slot),
                }
            }
            PathResponse::Lost(reason) => {
                self.complete(
                    slot,
                    Err(IoError::PathLost { path, reason }),
                    Vec::new(),
                    now,
                );
            }
            PathResponse::Aborted { cmd } => {
                s.aborts += 1;
                if self.closed {
                    self.complete(slot, Err(IoError::Closed), cmd.buffer, now);
                } else if s.aborts >= MAX_ABORTS {
                    let e = IoError::Aborted {
                        op: s.op.unwrap_or(IoOp::Read),
                        user_tag: s.user_tag,
                        opcode: cmd.cdb[0],
                        path,
                        aborts: s.aborts,
                    };
                    self.complete(slot, Err(e), cmd.buffer, now);
                } else {
                    // The target will not run it: no fence needed.
                    s.retries += 1;
                    s.held = Some(cmd);
                    self.ready.push_back(slot);
                }
            }
            PathResponse::StrayPreempt { cmd } => {
                s.conflict_retries += 1;
                if self.closed {
                    self.complete(slot, Err(IoError::Closed), cmd.buffer, now);
                } else if s.conflict_retries > MAX_CONFLICT_RETRIES {
                    let e = IoError::Scsi(crate::scsi::ScsiError::ReservationConflict);
                    self.complete(slot, Err(e), cmd.buffer, now);
                } else {
                    // Refused with a status: it did not run, no fence needed.
                    s.retries += 1;
                    s.held = Some(cmd);
                    self.ready.push_back(slot);
                }
            }
        }
        Ok(bytes)
    }

    /// The path of a `Send` could not take the command: it waits like one
    /// without a path.
    pub fn send_refused(&mut self, now: Instant, slot: u32, cmd: Command) {
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        s.path = None;
        s.held = Some(cmd);
        s.no_path_since.get_or_insert(now);
        self.waiting.push_back(slot);
    }

    /// Looks at every held I/O: those whose delay is over, whose fence is
    /// done, or that may find a path now go out at the next `poll_action`;
    /// those out of time fail. Call it whenever the paths may have changed
    /// or [`poll_timeout`](Self::poll_timeout) is due (cheap when nothing
    /// waits).
    pub fn handle_timeout(&mut self, now: Instant, paths: &impl PathTable) {
        for _ in 0..self.waiting.len() {
            let Some(slot) = self.waiting.pop_front() else {
                break;
            };
            let s = &mut self.slots[slot as usize];
            if s.held.is_none() {
                continue;
            }
            if self.closed {
                let buf = s.held.take().map(|c| c.buffer).unwrap_or_default();
                self.complete(slot, Err(IoError::Closed), buf, now);
                continue;
            }
            if let Some((path, session, since)) = s.fence {
                if paths.fenced_through(path) >= session {
                    s.fence = None;
                } else {
                    let waited = now.saturating_duration_since(since);
                    if waited >= self.config.fence_timeout {
                        let buf = s.held.take().map(|c| c.buffer).unwrap_or_default();
                        self.complete(slot, Err(IoError::NotFenced { path, waited }), buf, now);
                    } else {
                        self.waiting.push_back(slot);
                    }
                    continue;
                }
            }
            if s.not_before.is_some_and(|t| now < t) {
                self.waiting.push_back(slot);
                continue;
            }
            s.not_before = None;
            self.ready.push_back(slot);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) has something to do
    /// without any other event: a retry delay, a no-path or fence deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.ready.is_empty() || !self.done.is_empty() {
            return None;
        }
        self.waiting
            .iter()
            .filter_map(|&slot| {
                let s = &self.slots[slot as usize];
                if let Some((_, _, since)) = s.fence {
                    return Some(since + self.config.fence_timeout);
                }
                let no_path = s.no_path_since.map(|t| t + self.config.no_path_timeout);
                match (s.not_before, no_path) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// Whether I/O waits for something (a delay, a path or a fence).
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The next thing to do, or None. Carry out a `Send` (or refuse it)
    /// before asking again: the next choice weighs the load it adds.
    pub fn poll_action(&mut self, now: Instant, paths: &impl PathTable) -> Option<Action> {
        if let Some((slot, completion)) = self.done.pop_front() {
            return Some(Action::Complete { slot, completion });
        }
        while let Some(slot) = self.ready.pop_front() {
            let Some(cmd) = self.slots[slot as usize].held.take() else {
                continue;
            };
            if self.closed {
                self.complete(slot, Err(IoError::Closed), cmd.buffer, now);
                return self.poll_action(now, paths);
            }
            match self.choose(paths, cmd.buffer.len() as u64, now) {
                Some(path) => {
                    let s = &mut self.slots[slot as usize];
                    s.path = Some(path);
                    s.last_path = Some(path);
                    s.no_path_since = None;
                    let aborts = s.aborts;
                    return Some(Action::Send {
                        path,
                        slot,
                        cmd,
                        aborts,
                    });
                }
                None => {
                    let s = &mut self.slots[slot as usize];
                    let since = *s.no_path_since.get_or_insert(now);
                    let waited = now.saturating_duration_since(since);
                    if waited >= self.config.no_path_timeout {
                        self.complete(slot, Err(IoError::NoPath { waited }), cmd.buffer, now);
                        return self.poll_action(now, paths);
                    }
                    s.held = Some(cmd);
                    self.waiting.push_back(slot);
                }
            }
        }
        None
    }

    /// The best usable path for a command of `bytes`: the best ALUA tier's
    /// usable paths, then the policy's choice among them.
    fn choose(&mut self, paths: &impl PathTable, bytes: u64, now: Instant) -> Option<usize> {
        self.scratch.clear();
        let mut best = u8::MAX;
        for p in 0..paths.count() {
            if let Some(t) = paths.usable_tier(p) {
                if t < best {
                    best = t;
                    self.scratch.clear();
                }
                if t == best {
                    self.scratch.push(paths.load(p));
                }
            }
        }
        self.rotate = self.rotate.wrapping_add(1);
        select(
            self.config.policy,
            &self.scratch,
            bytes,
            paths.selector(),
            self.rotate,
            now,
        )
    }

    fn complete(&mut self, slot: u32, result: Result<(), IoError>, buffer: Vec<u8>, now: Instant) {
        let s = std::mem::take(&mut self.slots[slot as usize]);
        let completion = IoCompletion {
            user_tag: s.user_tag,
            op: s.op.unwrap_or(IoOp::Read),
            result,
            latency: s
                .submitted_at
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
            path: s.last_path,
            retries: s.retries,
            buffer,
        };
        self.free.push(slot);
        self.in_flight -= 1;
        self.done.push_back((slot, completion));
    }
}

#[cfg(test)]
mod tests {
    //! The dispatcher driven directly: a table of fake paths, virtual time.
    use super::*;
    use crate::iscsi::connection::CommandEcho;
    use crate::multipath::io::build_command;
    use crate::multipath::Io;

    #[derive(Default)]
    struct Fake {
        tiers: Vec<Option<u8>>,
        loads: Vec<(u64, u64)>,
        epochs: Vec<u64>,
        selector: SelectorState,
    }

    impl Fake {
        fn new(n: usize) -> Fake {
            Fake {
                tiers: vec![Some(0); n],
                loads: vec![(0, 0); n],
                epochs: vec![1; n],
                selector: SelectorState::new(),
            }
        }
    }

    impl PathTable for Fake {
        fn count(&self) -> usize {
            self.tiers.len()
        }
        fn usable_tier(&self, path: usize) -> Option<u8> {
            self.tiers[path]
        }
        fn load(&self, path: usize) -> PathLoad {
            PathLoad {
                index: path,
                outstanding: self.loads[path].0,
                outstanding_bytes: self.loads[path].1,
                ..PathLoad::default()
            }
        }
        fn fenced_through(&self, path: usize) -> u64 {
            self.epochs[path] - 1
        }
        fn selector(&self) -> &SelectorState {
            &self.selector
        }
    }

    fn config() -> DispatchConfig {
        DispatchConfig {
            no_path_timeout: Duration::from_millis(50),
            max_retries: 3,
            fence_timeout: Duration::from_millis(500),
            ..DispatchConfig::default()
        }
    }

    fn submit(d: &mut Dispatcher, now: Instant, mut io: Io) -> u32 {
        let cmd = build_command(&mut io, 0, 512, 1000).expect("valid");
        d.submit(now, io.op, io.user_tag, cmd).expect("room")
    }

    /// Runs actions: sends are recorded (and counted in the fake's load),
    /// completions returned.
    fn drain(
        d: &mut Dispatcher,
        now: Instant,
        paths: &mut Fake,
        sent: &mut Vec<(usize, u32, Command)>,
    ) -> Vec<IoCompletion> {
        let mut done = Vec::new();
        while let Some(a) = d.poll_action(now, paths) {
            match a {
                Action::Send {
                    path, slot, cmd, ..
                } => {
                    paths.loads[path].0 += 1;
                    paths.loads[path].1 += cmd.buffer.len() as u64;
                    sent.push((path, slot, cmd));
                }
                Action::Complete { completion, .. } => done.push(completion),
            }
        }
        done
    }

    fn answer(cmd: Command, status: u8) -> PathResponse {
        PathResponse::Done(Completion {
            user_tag: cmd.user_tag,
            response: 0,
            status,
            sense: Vec::new(),
            residual: 0,
            transferred: cmd.buffer.len(),
            command: CommandEcho {
                lun: cmd.lun,
                cdb: cmd.cdb,
                cdb_len: cmd.cdb_len,
                direction: cmd.direction,
            },
            buffer: cmd.buffer,
        })
    }

    fn give_back(
        d: &mut Dispatcher,
        now: Instant,
        paths: &mut Fake,
        path: usize,
        slot: u32,
        r: PathResponse,
    ) {
        let bytes = d.handle_response(now, path, slot, r).expect("matches");
        paths.loads[path].0 -= 1;
        paths.loads[path].1 -= bytes;
    }

    #[test]
    fn spreads_by_queue_depth_and_completes() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(8, config(), 0);
        for t in 0..4 {
            submit(&mut d, t0, Io::read(t, 1, Vec::new(), t));
        }
        let mut sent = Vec::new();
        assert!(drain(&mut d, t0, &mut paths, &mut sent).is_empty());
        assert_eq!(paths.loads[0].0, 2);
        assert_eq!(paths.loads[1].0, 2);
        for (p, slot, cmd) in sent.drain(..) {
            give_back(&mut d, t0, &mut paths, p, slot, answer(cmd, 0));
        }
        let done = drain(&mut d, t0, &mut paths, &mut sent);
        let mut tags: Vec<_> = done.iter().map(|c| c.user_tag).collect();
        tags.sort();
        assert_eq!(tags, vec![0, 1, 2, 3]);
        assert!(done.iter().all(|c| c.result.is_ok()));
        assert_eq!(d.in_flight(), 0);
        assert_eq!(paths.loads, vec![(0, 0), (0, 0)]);
    }

    #[test]
    fn full_queue_gives_the_command_back_and_wrong_answers_are_refused() {
        let t0 = Instant::now();
        let mut paths = Fake::new(1);
        let mut d = Dispatcher::new(2, config(), 0);
        let a = submit(&mut d, t0, Io::read(0, 1, Vec::new(), 0));
        submit(&mut d, t0, Io::read(1, 1, Vec::new(), 1));
        let mut io = Io::read(2, 1, Vec::new(), 2);
        let cmd = build_command(&mut io, 0, 512, 1000).expect("valid");
        assert!(d.submit(t0, IoOp::Read, 2, cmd).is_err());
        let mut sent = Vec::new();
        drain(&mut d, t0, &mut paths, &mut sent);
        let (_, _, cmd) = sent.remove(0);
        assert_eq!(
            d.handle_response(t0, 1, a, answer(cmd, 0)),
            Err(DispatchError::NotOnPath {
                slot: a,
                path: 1,
                on: Some(0)
            })
        );
        assert!(matches!(
            d.handle_response(t0, 0, 99, PathResponse::Lost(SubmitError::Full)),
            Err(DispatchError::NoSuchSlot { slot: 99, .. })
        ));
    }

    #[test]
    fn a_lost_command_fails_naming_the_path_and_why() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(4, config(), 1);
        let mut sent = Vec::new();
        submit(&mut d, t0, Io::write(0, 1, vec![0; 512], 5));
        assert!(drain(&mut d, t0, &mut paths, &mut sent).is_empty());
        let (path, slot, _cmd) = sent.pop().expect("sent");
        let reason = SubmitError::TooLarge { len: 1 << 33 };
        d.handle_response(t0, path, slot, PathResponse::Lost(reason.clone()))
            .expect("known slot");
        let done = drain(&mut d, t0, &mut paths, &mut sent);
        let err = done[0].result.clone().expect_err("lost");
        assert_eq!(err, IoError::PathLost { path, reason });
        assert_eq!(
            err.to_string(),
            format!("path {path} failed while taking the command, and it was lost: data buffer of 8589934592 bytes is larger than the 32-bit transfer length")
        );
    }

    #[test]
    fn alua_optimized_tier_first_then_non_optimized() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        paths.tiers = vec![Some(1), Some(0)];
        let mut d = Dispatcher::new(8, config(), 0);
        for t in 0..3 {
            submit(&mut d, t0, Io::read(t, 1, Vec::new(), t));
        }
        let mut sent = Vec::new();
        drain(&mut d, t0, &mut paths, &mut sent);
        assert!(sent.iter().all(|(p, _, _)| *p == 1));
        paths.tiers[1] = None;
        submit(&mut d, t0, Io::read(9, 1, Vec::new(), 9));
        drain(&mut d, t0, &mut paths, &mut sent);
        assert_eq!(sent.last().map(|s| s.0), Some(0));
    }

    #[test]
    fn busy_is_retried_after_its_delay_and_retries_run_out() {
        let t0 = Instant::now();
        let mut paths = Fake::new(1);
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::read(0, 1, Vec::new(), 5));
        let mut sent = Vec::new();
        let mut now = t0;
        for round in 0..4 {
            drain(&mut d, now, &mut paths, &mut sent);
            let (p, slot, cmd) = sent
                .pop()
                .unwrap_or_else(|| panic!("retry {round} not sent"));
            give_back(&mut d, now, &mut paths, p, slot, answer(cmd, 0x08));
            // Not before its back-off delay.
            d.handle_timeout(now, &paths);
            assert!(round == 3 || d.poll_action(now, &paths).is_none());
            if let Some(t) = d.poll_timeout() {
                now = t;
            }
            d.handle_timeout(now, &paths);
        }
        let done = drain(&mut d, now, &mut paths, &mut sent);
        assert_eq!(done.len(), 1);
        assert!(matches!(
            done[0].result,
            Err(IoError::RetriesExhausted { retries: 3, .. })
        ));
    }

    #[test]
    fn no_path_waits_then_fails_and_a_returning_path_rescues() {
        let t0 = Instant::now();
        let mut paths = Fake::new(1);
        paths.tiers[0] = None;
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::read(0, 1, Vec::new(), 1));
        submit(&mut d, t0, Io::read(1, 1, Vec::new(), 2));
        let mut sent = Vec::new();
        assert!(drain(&mut d, t0, &mut paths, &mut sent).is_empty());
        assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_millis(50)));
        // Back in time: both go out.
        paths.tiers[0] = Some(0);
        let t1 = t0 + Duration::from_millis(10);
        d.handle_timeout(t1, &paths);
        drain(&mut d, t1, &mut paths, &mut sent);
        assert_eq!(sent.len(), 2);
        // The path fails again with one of them; the other completed.
        let (p, slot, cmd) = sent.remove(0);
        give_back(&mut d, t1, &mut paths, p, slot, answer(cmd, 0));
        paths.tiers[0] = None;
        let (p, slot, cmd) = sent.remove(0);
        give_back(
            &mut d,
            t1,
            &mut paths,
            p,
            slot,
            PathResponse::Bounced {
                cmd,
                sent_in_session: Some(1),
                sent_on: None,
            },
        );
        assert_eq!(drain(&mut d, t1, &mut paths, &mut sent).len(), 1);
        let t2 = t1 + Duration::from_millis(60);
        d.handle_timeout(t2, &paths);
        let done = drain(&mut d, t2, &mut paths, &mut sent);
        assert!(matches!(done[0].result, Err(IoError::NoPath { .. })));
        assert_eq!(done[0].buffer.len(), 512, "buffer comes back");
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn bounced_read_fails_over_at_once_and_bounces_do_not_use_up_retries() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::read(0, 1, Vec::new(), 7));
        let mut sent = Vec::new();
        for _ in 0..5 {
            drain(&mut d, t0, &mut paths, &mut sent);
            let (p, slot, cmd) = sent.pop().expect("sent");
            give_back(
                &mut d,
                t0,
                &mut paths,
                p,
                slot,
                PathResponse::Bounced {
                    cmd,
                    sent_in_session: Some(1),
                    sent_on: None,
                },
            );
        }
        drain(&mut d, t0, &mut paths, &mut sent);
        let (p, slot, cmd) = sent.pop().expect("sent again without waiting");
        give_back(&mut d, t0, &mut paths, p, slot, answer(cmd, 0));
        let done = drain(&mut d, t0, &mut paths, &mut sent);
        assert!(done[0].result.is_ok());
        assert_eq!(done[0].retries, 5);
    }

    #[test]
    fn bounced_write_waits_for_its_old_path_to_be_fenced() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(4, config(), 0);
        let data = vec![0xab; 1024];
        submit(&mut d, t0, Io::write(10, 2, data.clone(), 42));
        let mut sent = Vec::new();
        drain(&mut d, t0, &mut paths, &mut sent);
        let (first, slot, cmd) = sent.pop().expect("sent");
        let other = 1 - first;
        paths.tiers[first] = None;
        give_back(
            &mut d,
            t0,
            &mut paths,
            first,
            slot,
            PathResponse::Bounced {
                cmd,
                sent_in_session: Some(1),
                sent_on: None,
            },
        );
        // The other path is up, but the old one is not fenced yet.
        let t1 = t0 + Duration::from_millis(100);
        d.handle_timeout(t1, &paths);
        assert!(drain(&mut d, t1, &mut paths, &mut sent).is_empty());
        assert!(sent.is_empty(), "not retried before the fence");
        assert_eq!(d.fences_waited(), 1);
        assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_millis(500)));
        // The old path logs in again (same ISID: the old session is gone).
        paths.epochs[first] = 2;
        d.handle_timeout(t1, &paths);
        drain(&mut d, t1, &mut paths, &mut sent);
        let (p, slot, cmd) = sent.pop().expect("retried after the fence");
        assert_eq!(p, other, "the old path is still down");
        assert_eq!(cmd.buffer, data, "same data");
        give_back(&mut d, t1, &mut paths, p, slot, answer(cmd, 0));
        let done = drain(&mut d, t1, &mut paths, &mut sent);
        assert!(done[0].result.is_ok());
        assert_eq!(
            (done[0].user_tag, done[0].path, done[0].retries),
            (42, Some(other), 1)
        );
    }

    #[test]
    fn a_write_bounced_for_another_path_waits_for_that_paths_fence() {
        // MC/S: the taker took over the first path's write (TASK REASSIGN)
        // and failed with it; the first path hands it back, but it is the
        // taker's connection, in its session 3, that may still run it.
        let t0 = Instant::now();
        let mut paths = Fake::new(3);
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::write(10, 1, vec![7; 512], 9));
        let mut sent = Vec::new();
        drain(&mut d, t0, &mut paths, &mut sent);
        let (first, slot, cmd) = sent.pop().expect("sent");
        let taker = (first + 1) % 3;
        paths.tiers[first] = None;
        paths.epochs[first] = 5; // the reporting path's own session: fenced
        give_back(
            &mut d,
            t0,
            &mut paths,
            first,
            slot,
            PathResponse::Bounced {
                cmd,
                sent_in_session: Some(3),
                sent_on: Some(taker),
            },
        );
        paths.tiers[taker] = None;
        let t1 = t0 + Duration::from_millis(100);
        d.handle_timeout(t1, &paths);
        assert!(drain(&mut d, t1, &mut paths, &mut sent).is_empty());
        assert!(sent.is_empty(), "not retried before the taker is fenced");
        paths.epochs[taker] = 4;
        d.handle_timeout(t1, &paths);
        drain(&mut d, t1, &mut paths, &mut sent);
        let (p, slot, cmd) = sent.pop().expect("retried once the taker is fenced");
        assert_eq!(cmd.buffer, vec![7; 512]);
        give_back(&mut d, t1, &mut paths, p, slot, answer(cmd, 0));
        assert!(drain(&mut d, t1, &mut paths, &mut sent)[0].result.is_ok());
    }

    #[test]
    fn unfenced_write_fails_after_the_fence_timeout_and_unsent_ones_go_at_once() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::write(0, 1, vec![1; 512], 1));
        submit(&mut d, t0, Io::write(5, 1, vec![2; 512], 2));
        let mut sent = Vec::new();
        drain(&mut d, t0, &mut paths, &mut sent);
        for (p, slot, cmd) in std::mem::take(&mut sent) {
            let sent_in_session = (cmd.buffer[0] == 1).then_some(1);
            give_back(
                &mut d,
                t0,
                &mut paths,
                p,
                slot,
                PathResponse::Bounced {
                    cmd,
                    sent_in_session,
                    sent_on: None,
                },
            );
        }
        // The one that never reached a session goes out again at once.
        drain(&mut d, t0, &mut paths, &mut sent);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].2.buffer[0], 2);
        let t1 = t0 + Duration::from_millis(500);
        d.handle_timeout(t1, &paths);
        let done = drain(&mut d, t1, &mut paths, &mut sent);
        assert!(
            matches!(done[0].result, Err(IoError::NotFenced { .. })),
            "{:?}",
            done[0].result
        );
    }

    #[test]
    fn fencing_can_be_switched_off() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(
            4,
            DispatchConfig {
                fence_writes: false,
                ..config()
            },
            0,
        );
        submit(&mut d, t0, Io::write(0, 1, vec![1; 512], 1));
        let mut sent = Vec::new();
        drain(&mut d, t0, &mut paths, &mut sent);
        let (p, slot, cmd) = sent.pop().expect("sent");
        paths.tiers[p] = None;
        give_back(
            &mut d,
            t0,
            &mut paths,
            p,
            slot,
            PathResponse::Bounced {
                cmd,
                sent_in_session: Some(1),
                sent_on: None,
            },
        );
        drain(&mut d, t0, &mut paths, &mut sent);
        assert_eq!(sent.pop().map(|s| s.0), Some(1 - p));
    }

    /// The abort livelock: a command the target stays too slow for is
    /// aborted (ABORT TASK confirmed) and goes out again at once, each time
    /// with its abort count, so that its path waits twice as long before the
    /// next abort; after the `MAX_ABORTS`th it fails to the application with
    /// `IoError::Aborted`, naming the command and the path, instead of
    /// going round for ever.
    #[test]
    fn an_aborted_command_goes_out_again_counted_and_fails_after_the_fourth_abort() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::write(7, 1, vec![3; 512], 99));
        let mut sent_counts = Vec::new();
        let mut last_path = None;
        let mut done = Vec::new();
        for _ in 0..MAX_ABORTS + 1 {
            let mut sent = Vec::new();
            let mut now_done = Vec::new();
            while let Some(a) = d.poll_action(t0, &paths) {
                match a {
                    Action::Send {
                        path,
                        slot,
                        cmd,
                        aborts,
                    } => {
                        paths.loads[path].0 += 1;
                        paths.loads[path].1 += cmd.buffer.len() as u64;
                        sent_counts.push(aborts);
                        sent.push((path, slot, cmd));
                    }
                    Action::Complete { completion, .. } => now_done.push(completion),
                }
            }
            done.extend(now_done);
            let Some((p, slot, cmd)) = sent.pop() else {
                break;
            };
            last_path = Some(p);
            // Confirmed: no fence, it goes out again at once.
            give_back(
                &mut d,
                t0,
                &mut paths,
                p,
                slot,
                PathResponse::Aborted { cmd },
            );
        }
        assert_eq!(sent_counts, vec![0, 1, 2, 3], "sent with its abort count");
        assert_eq!(done.len(), 1);
        let path = last_path.expect("sent");
        assert_eq!(
            done[0].result,
            Err(IoError::Aborted {
                op: IoOp::Write,
                user_tag: 99,
                // WRITE (16)
                opcode: 0x8a,
                path,
                aborts: MAX_ABORTS,
            })
        );
        assert_eq!(done[0].buffer, vec![3; 512], "buffer comes back");
        assert_eq!(d.fences_waited(), 0, "an aborted command needs no fence");
        assert_eq!(d.in_flight(), 0);
        let msg = done[0].result.clone().expect_err("failed").to_string();
        assert!(
            msg.contains("aborted 4 times") && msg.contains(&format!("path {path}")),
            "{msg}"
        );
    }

    /// A RESERVATION CONFLICT a stray preempt of the device's own caused is
    /// resent at once (the command did not run: no fence), at most
    /// `MAX_CONFLICT_RETRIES` times; then the conflict reaches the
    /// application, as a plain one does at once.
    #[test]
    fn a_stray_preempt_conflict_is_resent_twice_then_reaches_the_application() {
        let t0 = Instant::now();
        let mut paths = Fake::new(2);
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::write(1, 1, vec![5; 512], 8));
        let mut sent = Vec::new();
        for round in 0..=MAX_CONFLICT_RETRIES {
            assert!(drain(&mut d, t0, &mut paths, &mut sent).is_empty());
            let (p, slot, cmd) = sent.pop().unwrap_or_else(|| panic!("resend {round}"));
            give_back(
                &mut d,
                t0,
                &mut paths,
                p,
                slot,
                PathResponse::StrayPreempt { cmd },
            );
        }
        let done = drain(&mut d, t0, &mut paths, &mut sent);
        assert!(sent.is_empty(), "not sent a fourth time");
        assert_eq!(
            done[0].result,
            Err(IoError::Scsi(crate::scsi::ScsiError::ReservationConflict))
        );
        assert_eq!(done[0].retries, MAX_CONFLICT_RETRIES);
        assert_eq!(d.fences_waited(), 0);
        // A plain conflict (no stray preempt) fails at once.
        submit(&mut d, t0, Io::write(2, 1, vec![6; 512], 9));
        drain(&mut d, t0, &mut paths, &mut sent);
        let (p, slot, cmd) = sent.pop().expect("sent");
        give_back(&mut d, t0, &mut paths, p, slot, answer(cmd, 0x18));
        let done = drain(&mut d, t0, &mut paths, &mut sent);
        assert!(done[0]
            .result
            .as_ref()
            .is_err_and(|e| e.is_reservation_conflict()));
        assert_eq!(done[0].retries, 0);
    }

    #[test]
    fn closing_completes_what_comes_back_and_what_waits() {
        let t0 = Instant::now();
        let mut paths = Fake::new(1);
        let mut d = Dispatcher::new(4, config(), 0);
        submit(&mut d, t0, Io::read(0, 1, Vec::new(), 1));
        let mut sent = Vec::new();
        drain(&mut d, t0, &mut paths, &mut sent);
        paths.tiers[0] = None;
        submit(&mut d, t0, Io::read(1, 1, Vec::new(), 2));
        drain(&mut d, t0, &mut paths, &mut sent);
        d.close();
        let (p, slot, cmd) = sent.pop().expect("sent");
        give_back(&mut d, t0, &mut paths, p, slot, answer(cmd, 0x08));
        d.handle_timeout(t0, &paths);
        let done = drain(&mut d, t0, &mut paths, &mut sent);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.result == Err(IoError::Closed)));
    }
}
