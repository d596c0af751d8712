//! The per-path poll loop: drain submission rings into the session, pump the
//! session's I/O, hand completions back on the completion rings. On failure
//! every unfinished command goes back to its queue for another path, and the
//! path logs in again in the background with back-off.

use super::helper::{Helper, Job};
use super::ring::{Consumer, Producer};
use crate::iscsi::connection::{Command, Completion, Direction, Event, SubmitError, MAX_TASKS};
use crate::iscsi::session::{Session, SessionError};
use crate::multipath::config::{BoxedTransport, IdleMode, PathConnector};
use crate::multipath::fence::{
    AbortError, AbortPolicy, FenceBoard, FenceError, FenceJob, FenceNeed, TaskAborts,
};
use crate::multipath::path::{new_histogram, Nexus, PathHealth, PathShared, PathState};
use crate::multipath::probe::{
    alua_state_of, fence_login, group_of, probe, PathProbe, PreemptGate, ProbeConfig,
};
use crate::multipath::silence::{FastPing, SilenceVerdict, SilenceWatch};
use crate::multipath::MultipathError;
use crate::scsi::{
    check_status, ErrorClass, ScsiCommand, SenseData, TargetPortGroupsData, UnitAttention,
};
use crate::transport::Transport;
use crate::wire::scsi::{DataRepr, ScsiStatus};
use crossbeam::queue::ArrayQueue;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "mcs_worker.rs"]
mod mcs_worker;

/// A command on its way to a worker. `slot` is the queue's own index.
pub(crate) struct Request {
    pub slot: u32,
    pub cmd: Command,
    pub dispatched_at: Instant,
    /// Confirmed ABORT TASKs of this I/O so far: it is aborted again only
    /// after `AbortPolicy::after_for(aborts)`.
    pub aborts: u32,
}

/// What a worker hands back to a queue.
pub(crate) enum Response {
    /// The target answered (any status).
    Done { slot: u32, completion: Completion },
    /// Not run to completion on this path (path failed or going away):
    /// resubmit elsewhere. Writes included: none was acknowledged.
    /// `sent_in_session`: the epoch of the session that had the command
    /// (it may still run there until that session is fenced), or None when
    /// it never left the ring.
    Bounced {
        slot: u32,
        cmd: Command,
        sent_in_session: Option<u64>,
        /// The path whose session that is, when not this one (an MC/S task
        /// another connection took over and failed with).
        sent_on: Option<usize>,
    },
    /// The command could not be handed to the session and is lost.
    Lost { slot: u32, reason: SubmitError },
    /// The target confirmed an ABORT TASK of the overdue command: it will
    /// not run; resubmit anywhere (counted against `MAX_ABORTS`).
    Aborted { slot: u32, cmd: Command },
    /// Refused with RESERVATION CONFLICT because a stray preempt of our
    /// own removed this path's key (`FenceBoard::take_stray_preempt`); the
    /// path registers again, the command did not run: resubmit.
    StrayPreempt { slot: u32, cmd: Command },
}

/// Control messages to a worker (rare; MPSC because any thread may open a queue).
pub(crate) enum Control {
    AddQueue {
        id: u32,
        depth: usize,
        sub: Consumer<Request>,
        comp: Producer<Response>,
    },
    RemoveQueue {
        id: u32,
    },
    /// A command of the device's own (persistent reservations) to run on
    /// this path's session; the completion goes back on `reply`, and
    /// dropping `reply` unanswered means the path could not run it.
    Scsi {
        cmd: Command,
        reply: std::sync::mpsc::Sender<Completion>,
    },
}

struct QueueEnds {
    id: u32,
    sub: Consumer<Request>,
    comp: Producer<Response>,
    /// When each slot's command was dispatched (the latency the
    /// application sees).
    started: Vec<Instant>,
    /// When this worker took each slot's command from the ring (its round's
    /// clock, or the dispatch if later): the path's own latency starts
    /// here, so a worker that napped or was descheduled before it took the
    /// command does not make its path look slow.
    taken: Vec<Instant>,
    /// Each slot's confirmed ABORT TASKs so far (`Request::aborts`).
    aborts: Vec<u32>,
}

impl QueueEnds {
    /// Hands a response to the queue. This cannot fail, so no command is
    /// dropped here: the queue has `depth` slots, a slot's command is in one
    /// place at a time (the queue, a submission ring, a session, or this
    /// completion ring, one response per dispatch), and the ring holds at
    /// least `depth` (checked when the queue is added). A full ring means a
    /// slot was answered twice.
    fn respond(&mut self, r: Response) {
        let pushed = self.comp.push(r);
        debug_assert!(pushed.is_ok(), "queue {}: completion ring full", self.id);
        if pushed.is_err() {
            log::error!(
                "queue {}: completion ring full, a response is lost",
                self.id
            );
        }
    }
}

/// Why a live path's session was given up (the path then goes Down and
/// reconnects).
#[derive(Debug, thiserror::Error)]
pub(crate) enum PathFailure {
    /// The connection failed (transport error, ping or command timeout,
    /// protocol violation), as the connection reported it.
    #[error("{0}")]
    Connection(crate::iscsi::connection::ConnError),
    /// The session failed while moving bytes.
    #[error("{0}")]
    Session(crate::iscsi::session::SessionError),
    /// Logged out, as the target asked (AsyncEvent 1): reconnect after
    /// `time2wait`.
    #[error("logged out at the target's request (AsyncEvent 1); reconnecting after {time2wait:?}")]
    LoggedOut {
        /// The Logout Response's Time2Wait.
        time2wait: Duration,
    },
    /// The target asked for a logout and did not answer ours.
    #[error("the target requested a logout (AsyncEvent 1) and did not answer ours within {0:?}")]
    LogoutUnanswered(Duration),
    /// An ABORT TASK of an overdue command was refused or not answered.
    #[error("{0}")]
    Abort(AbortError),
    /// Nothing arrived for `silent`, not even the answer to a fast ping,
    /// with commands outstanding.
    #[error("nothing received for {silent:?} with {outstanding} commands outstanding, not even an answer to a ping")]
    Silent {
        /// How long nothing arrived.
        silent: Duration,
        /// Commands the session held.
        outstanding: usize,
    },
}

impl PathFailure {
    /// The AsyncEvent 2/3 announcement behind this failure, if it was one:
    /// (event, Time2Wait, Time2Retain).
    fn announced_drop(&self) -> Option<(u8, u16, u16)> {
        use crate::iscsi::connection::ConnError;
        use crate::iscsi::session::SessionError;
        match self {
            PathFailure::Connection(ConnError::TargetDropped {
                event,
                time2wait,
                time2retain,
            })
            | PathFailure::Session(SessionError::Connection(ConnError::TargetDropped {
                event,
                time2wait,
                time2retain,
            })) => Some((*event, *time2wait, *time2retain)),
            _ => None,
        }
    }

    /// How long the target asked us to wait before logging in again.
    fn time2wait(&self) -> Duration {
        match self {
            PathFailure::LoggedOut { time2wait } => *time2wait,
            f => f.announced_drop().map_or(Duration::ZERO, |(_, t, _)| {
                Duration::from_secs(u64::from(t))
            }),
        }
    }
}

/// A logout the target asked for (AsyncEvent 1): the path takes no new
/// commands, lets those in flight finish, then logs out.
#[derive(Debug, Clone, Copy)]
struct Drain {
    /// Log out at the latest then, with whatever is still in flight.
    logout_by: Instant,
    /// When our Logout Request went out.
    logout_sent: Option<Instant>,
}

/// How long a Logout Request may go unanswered.
const LOGOUT_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Tags of the worker's own commands (REPORT TARGET PORT GROUPS).
const INTERNAL_TAG: u64 = 1 << 63;
/// With [`INTERNAL_TAG`]: the worker's SET TARGET PORT GROUPS.
const STPG_TAG: u64 = 1 << 62;
/// Tags of [`Control::Scsi`] commands (also internal: never bounced).
const DEVICE_TAG: u64 = INTERNAL_TAG | 1 << 61;
/// Tags of the worker's ABORT TASKs (task management, not SCSI commands).
const ABORT_TAG: u64 = INTERNAL_TAG | 1 << 60;
/// Tag of the worker's LOGICAL UNIT RESET (the last fence step).
const LUN_RESET_TAG: u64 = INTERNAL_TAG | 1 << 59;
/// How long a LOGICAL UNIT RESET may go unanswered.
const LUN_RESET_ANSWER: Duration = Duration::from_secs(10);
/// Tags of the worker's REGISTER AND IGNORE EXISTING KEY (`| 1`) and
/// RESERVE (`| 2`) that repair its key after a stray preempt.
const KEY_REPAIR_TAG: u64 = INTERNAL_TAG | 1 << 58;

fn tag(queue: u32, slot: u32) -> u64 {
    (u64::from(queue) << 32) | u64::from(slot)
}

type ConnectResult = (PathConnector, Result<PathProbe, MultipathError>);
type FenceResult = (PathConnector, FenceJob, Result<(), FenceError>);

enum Conn {
    Up(Box<Session<BoxedTransport>>),
    Down,
    Connecting(Job<ConnectResult>),
}

pub(crate) struct WorkerSetup {
    pub shared: Arc<PathShared>,
    pub control: Arc<ArrayQueue<Control>>,
    pub stop: Arc<AtomicBool>,
    pub connector: PathConnector,
    pub probe: ProbeConfig,
    pub lu_id: String,
    pub health: PathHealth,
    pub session: Option<PathProbe>,
    pub idle: IdleMode,
    pub fast_ping: Option<FastPing>,
    /// ABORT TASK of overdue commands (None: off).
    pub abort: Option<AbortPolicy>,
    /// Fence logins for other paths of the portal group (with `fence`).
    pub login_fence: bool,
    /// The last-resort LOGICAL UNIT RESET for a need unfenced this long
    /// (with `fence`; None: never).
    pub lun_reset_fence: Option<Duration>,
    pub core: Option<usize>,
    /// Device-wide count of ALUA changes any path learnt of.
    pub alua_epoch: Arc<AtomicU64>,
    /// Every path of the device, for explicit ALUA transitions.
    pub alua_control: Arc<AluaControl>,
    /// Fences wanted through other portals (None: fencing through other
    /// portals is off).
    pub fence: Option<Arc<FenceBoard>>,
    /// Every path of the device, this one included (by index).
    pub peers: Arc<[Arc<PathShared>]>,
    /// MC/S: the session this path is a connection of (None: MPIO).
    pub mcs: Option<Arc<super::mcs::McsPaths>>,
}

/// Shared by a device's workers: who may send SET TARGET PORT GROUPS.
#[derive(Debug)]
pub(crate) struct AluaControl {
    paths: Vec<Arc<PathShared>>,
    /// When the last SET TARGET PORT GROUPS went out (one at a time, at
    /// most one per [`STPG_INTERVAL`]).
    last: std::sync::Mutex<Option<Instant>>,
}

/// Least time between two SET TARGET PORT GROUPS of one device.
const STPG_INTERVAL: Duration = Duration::from_secs(2);

impl AluaControl {
    pub(crate) fn new(paths: Vec<Arc<PathShared>>) -> AluaControl {
        AluaControl {
            paths,
            last: std::sync::Mutex::new(None),
        }
    }

    /// Whether some logged-in path is active/optimized.
    fn optimized_path_up(&self) -> bool {
        self.paths.iter().any(|p| {
            p.state() == PathState::Up && p.alua() == Some(crate::scsi::AluaState::ActiveOptimized)
        })
    }

    /// Takes the right to send one SET TARGET PORT GROUPS now.
    fn take_turn(&self, now: Instant) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if last.is_some_and(|t| now.saturating_duration_since(t) < STPG_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

pub(crate) struct Worker {
    shared: Arc<PathShared>,
    control: Arc<ArrayQueue<Control>>,
    stop: Arc<AtomicBool>,
    connector: Option<PathConnector>,
    probe: ProbeConfig,
    lu_id: String,
    health: PathHealth,
    conn: Conn,
    queues: Vec<QueueEnds>,
    /// [`Control::Scsi`] commands in the session, by tag.
    device_cmds: Vec<(u64, std::sync::mpsc::Sender<Completion>)>,
    next_device_tag: u64,
    /// SCSI commands in the current session (ours: no O(n) scan per I/O).
    in_session: usize,
    /// The current (or last) session's epoch ([`PathShared::begin_session`]).
    session_epoch: u64,
    /// Fast ping of a silent path with commands outstanding.
    fast_ping: Option<FastPing>,
    silence: Option<SilenceWatch>,
    abort_policy: Option<AbortPolicy>,
    /// ABORT TASKs of the current session.
    aborts: Option<TaskAborts>,
    tpg: Option<u16>,
    relative_port: Option<u16>,
    alua_refresh_pending: bool,
    alua_refresh_wanted: bool,
    /// A logout the target requested is under way.
    draining: Option<Drain>,
    alua_epoch: Arc<AtomicU64>,
    /// The epoch this path's state was last read in.
    alua_epoch_seen: u64,
    alua_control: Arc<AluaControl>,
    /// The LU does explicit ALUA only (INQUIRY TPGS 10b).
    explicit_alua: bool,
    /// Supported-states byte of this path's group (REPORT TARGET PORT GROUPS).
    group_supported: Option<u8>,
    stpg_pending: bool,
    /// A stray preempt of our own removed this path's key from its live
    /// session (`FenceBoard::take_stray_preempt`): register again at the
    /// next round.
    key_repair_wanted: bool,
    /// That registration's commands not answered yet: until then, commands
    /// refused with RESERVATION CONFLICT go back to be resent.
    key_repair_pending: u8,
    hist: hdrhistogram::Histogram<u64>,
    last_merge: Instant,
    idle: IdleMode,
    idle_rounds: u32,
    /// When the current run of idle rounds began (for `IdleMode::Block`).
    idle_since: Option<Instant>,
    /// When the previous round looked for completions (or a block on the
    /// socket ended): a completion seen now finished after it (see
    /// `PathShared::record_completion_seen`).
    looked_at: Instant,
    fence: Option<Arc<FenceBoard>>,
    peers: Arc<[Arc<PathShared>]>,
    /// A fence login this path runs for another (it has our connector).
    fence_job: Option<Job<FenceResult>>,
    /// A fence login this path runs for another over a second connection
    /// on its own userspace stack (DPDK), which this worker pumps.
    fence_side: Option<(FenceJob, Job<Result<(), FenceError>>)>,
    /// Runs this path's logins and fence logins (one thread for them all).
    helper: Helper,
    login_fence: bool,
    /// A PREEMPT AND ABORT this path sent for another, and its answer.
    /// Our PREEMPT AND ABORT in flight, its answer, and the session epoch
    /// it went out in.
    fence_preempt: Option<(FenceJob, std::sync::mpsc::Receiver<Completion>, u64)>,
    lun_reset_after: Option<Duration>,
    /// A LOGICAL UNIT RESET this path sent for another: (job, TMF tag, sent).
    fence_reset: Option<(FenceJob, u64, Instant)>,
    /// MC/S: this path is a connection of the device's one session.
    mcs: Option<McsConn>,
}

/// A path that is one connection of an MC/S session.
struct McsConn {
    paths: Arc<super::mcs::McsPaths>,
    /// The TSIH of the session the current connection is in (0: none yet).
    tsih: u16,
    /// The CID of the current connection.
    cid: u16,
    /// A Logout (reason 1) this path sent to close another path's failed
    /// connection: the job and when it went out.
    fence: Option<(FenceJob, Instant)>,
    /// That Logout was answered: NOP-Ins still to come before the fence
    /// counts (the hole-filling NOP-Outs' and a confirming ping's).
    confirm: Option<u32>,
    /// ERL 2: the failed connection's tasks, waiting for its reinstatement.
    held: Option<mcs_worker::HeldTasks>,
    /// ERL 2: other paths' tasks this connection takes over.
    moves: mcs_worker::Moves,
}

impl Worker {
    pub(crate) fn new(s: WorkerSetup) -> Worker {
        let helper = Helper::new(format!("mp-login-{}", s.shared.index));
        let mut probe_cfg = s.probe;
        if probe_cfg.pr_key.is_some() {
            probe_cfg.preempt_gate = s.fence.clone().map(|board| PreemptGate {
                board,
                path: s.shared.index,
            });
        }
        let mut w = Worker {
            shared: s.shared,
            control: s.control,
            stop: s.stop,
            connector: Some(s.connector),
            probe: probe_cfg,
            lu_id: s.lu_id,
            health: s.health,
            conn: Conn::Down,
            queues: Vec::new(),
            device_cmds: Vec::new(),
            next_device_tag: 0,
            in_session: 0,
            session_epoch: 0,
            fast_ping: s.fast_ping,
            silence: None,
            abort_policy: s.abort,
            aborts: None,
            tpg: None,
            relative_port: None,
            alua_refresh_pending: false,
            alua_refresh_wanted: false,
            draining: None,
            alua_epoch_seen: s.alua_epoch.load(Ordering::Acquire),
            alua_epoch: s.alua_epoch,
            alua_control: s.alua_control,
            explicit_alua: false,
            group_supported: None,
            stpg_pending: false,
            key_repair_wanted: false,
            key_repair_pending: 0,
            hist: new_histogram(),
            last_merge: Instant::now(),
            idle: s.idle,
            idle_rounds: 0,
            idle_since: None,
            looked_at: Instant::now(),
            fence: s.fence,
            peers: s.peers,
            fence_job: None,
            fence_side: None,
            login_fence: s.login_fence,
            fence_preempt: None,
            lun_reset_after: s.lun_reset_fence,
            fence_reset: None,
            mcs: s.mcs.map(|paths| McsConn {
                paths,
                tsih: 0,
                cid: 0,
                fence: None,
                confirm: None,
                held: None,
                moves: mcs_worker::Moves::default(),
            }),
            helper,
        };
        super::precise_timers();
        if let Some(core) = s.core {
            // Fewer cores than workers is fine: several share one.
            let _ = core_affinity::set_for_current(core_affinity::CoreId { id: core });
        }
        match s.session {
            Some(p) => w.install(p),
            None => {
                w.health.on_failure(Instant::now());
            }
        }
        w
    }

    /// Takes a freshly logged-in session into service.
    fn install(&mut self, mut p: PathProbe) {
        self.tpg = p.target_port_group;
        self.relative_port = p.relative_port;
        self.explicit_alua = p.tpgs == crate::wire::scsi::Tpgs::Explicit;
        self.group_supported = p.group_supported;
        self.stpg_pending = false;
        self.shared.set_tpg(p.target_port_group);
        self.set_alua(p.alua);
        // Just read: changes announced before this login are known.
        self.alua_epoch_seen = self.alua_epoch.load(Ordering::Acquire);
        self.health.on_login(p.time2wait);
        self.in_session = 0;
        // Same ISID, TSIH 0: the target has ended the sessions before this
        // one, so what they held is fenced.
        self.session_epoch = self.shared.begin_session();
        self.shared
            .set_portal_group(p.session.connection().params().target_portal_group_tag);
        if let Some(board) = &self.fence {
            board.fenced(self.shared.index, self.session_epoch - 1);
        }
        self.silence = self.fast_ping.map(|c| SilenceWatch::new(c, Instant::now()));
        self.aborts = self
            .abort_policy
            .map(|a| TaskAborts::new(a, ABORT_TAG, Instant::now()));
        self.alua_refresh_pending = false;
        self.alua_refresh_wanted = false;
        self.key_repair_wanted = false;
        self.key_repair_pending = 0;
        self.draining = None;
        let outcome = p.session.outcome();
        if let Some(m) = &mut self.mcs {
            (m.tsih, m.cid) = (outcome.tsih, outcome.cid);
        }
        self.shared.set_nexus(Nexus {
            isid: outcome.isid,
            tsih: outcome.tsih,
            cid: outcome.cid,
        });
        let how = match &p.redirected_to {
            Some(at) => format!("logged in at {at}"),
            None => "logged in".to_string(),
        };
        self.mcs_fill_own_holes(&mut p.session);
        self.conn = Conn::Up(Box::new(p.session));
        self.mcs_reassign_held(Instant::now());
        self.shared.set_state(PathState::Up, &how);
    }

    pub(crate) fn run(mut self) {
        loop {
            if self.stop.load(Ordering::Acquire) {
                self.shutdown();
                return;
            }
            let progressed = self.round(Instant::now());
            super::poll_meter::tick(progressed);
            self.idle_wait(progressed);
            if !progressed {
                super::poll_meter::tick(false);
            }
        }
    }

    /// One turn of the poll loop; true if anything moved.
    fn round(&mut self, now: Instant) -> bool {
        self.take_control();
        self.fence_for_others(now);
        let progressed = match std::mem::replace(&mut self.conn, Conn::Down) {
            Conn::Up(mut session) => {
                let r = self.step_up(&mut session, now);
                match r {
                    Ok(p) => {
                        self.conn = Conn::Up(session);
                        p
                    }
                    Err(reason) => {
                        if let Some((event, t2w, t2r)) = reason.announced_drop() {
                            self.shared.record_async_event(&format!(
                                "the {} will be dropped (AsyncEvent {event}): reconnecting after Time2Wait {t2w} s (Time2Retain {t2r} s)",
                                if event == 3 { "session" } else { "connection" }
                            ));
                        }
                        let wait = reason.time2wait();
                        self.path_failed(*session, &reason.to_string(), wait, now);
                        true
                    }
                }
            }
            Conn::Down => {
                self.bounce_rings();
                if self.health.due(now) {
                    self.start_connect();
                }
                false
            }
            Conn::Connecting(handle) => {
                self.bounce_rings();
                if handle.is_finished() {
                    self.finish_connect(handle, now);
                } else {
                    self.conn = Conn::Connecting(handle);
                }
                false
            }
        };
        if now.duration_since(self.last_merge) >= Duration::from_millis(20) {
            self.shared.merge_histogram(&mut self.hist);
            self.last_merge = now;
        }
        self.looked_at = now;
        progressed
    }

    fn idle_wait(&mut self, progressed: bool) {
        if progressed {
            self.idle_rounds = 0;
            self.idle_since = None;
            return;
        }
        if !matches!(self.conn, Conn::Up(_)) {
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        self.idle_rounds = self.idle_rounds.saturating_add(1);
        // Block's own spin is the whole spin: each idle round reads the
        // socket (a syscall), and 64 of them outlasted a loopback answer,
        // so the worker never blocked and burnt a core at QD1.
        if self.idle_rounds < 64 && !matches!(self.idle, IdleMode::Block(_)) {
            std::hint::spin_loop();
            return;
        }
        match self.idle {
            IdleMode::BusyPoll => std::hint::spin_loop(),
            IdleMode::Yield => std::thread::yield_now(),
            IdleMode::Sleep(d) => std::thread::sleep(d),
            IdleMode::Block(spin) => self.block(spin),
        }
    }

    /// Spins for `spin` since the last progress, then blocks on the socket
    /// and the path's wake-up eventfd until data, a submission or a timer.
    fn block(&mut self, spin: Duration) {
        let now = Instant::now();
        let idle_since = *self.idle_since.get_or_insert(now);
        if now.duration_since(idle_since) < spin {
            std::hint::spin_loop();
            return;
        }
        let shared = self.shared.clone();
        let Some(wake) = shared.wake.as_ref() else {
            std::thread::sleep(Duration::from_micros(20));
            return;
        };
        let Conn::Up(session) = &mut self.conn else {
            return;
        };
        wake.prepare_sleep();
        // Work queued before `prepare_sleep` was not announced: look again.
        let queued = !self.control.is_empty() || self.queues.iter_mut().any(|q| !q.sub.is_empty());
        if !queued && !self.stop.load(Ordering::Acquire) {
            // Bounded, so the stop flag and health checks are seen.
            let _ = session.wait_or_wake(wake, Duration::from_millis(20));
        }
        wake.finish_sleep();
        // The kernel wakes the worker when data arrives: what it finds
        // next did not wait unseen through the block.
        self.looked_at = Instant::now();
    }

    fn take_control(&mut self) {
        while let Some(c) = self.control.pop() {
            match c {
                Control::AddQueue {
                    id,
                    depth,
                    sub,
                    comp,
                } => {
                    // What makes `QueueEnds::respond` infallible.
                    debug_assert!(comp.capacity() >= depth);
                    self.queues.push(QueueEnds {
                        id,
                        sub,
                        comp,
                        started: vec![Instant::now(); depth],
                        taken: vec![Instant::now(); depth],
                        aborts: vec![0; depth],
                    })
                }
                Control::RemoveQueue { id } => self.queues.retain(|q| q.id != id),
                Control::Scsi { mut cmd, reply } => {
                    // Not up: `reply` is dropped, and the caller hears so.
                    if let Conn::Up(session) = &mut self.conn {
                        self.next_device_tag = (self.next_device_tag + 1) & 0xffff_ffff;
                        cmd.user_tag = DEVICE_TAG | self.next_device_tag;
                        if session.submit(cmd).is_ok() {
                            self.device_cmds
                                .push((DEVICE_TAG | self.next_device_tag, reply));
                        }
                    }
                }
            }
        }
    }

    /// One round on a live session. Err: the connection is dead.
    fn step_up(
        &mut self,
        session: &mut Session<BoxedTransport>,
        now: Instant,
    ) -> Result<bool, PathFailure> {
        let mut progressed = false;
        if let Some(e) = session.connection().is_failed() {
            return Err(PathFailure::Connection(e.clone()));
        }
        // Admit new commands while the target's CmdSN window has room;
        // otherwise they wait in the rings and the submitters see this path
        // as loaded (and eventually QueueFull).
        if self.draining.is_some() {
            // Logging out: what the rings still hold goes to other paths.
            self.bounce_rings();
        }
        if self.key_repair_wanted {
            self.repair_key(session);
            progressed = true;
        }
        for q in &mut self.queues {
            if self.draining.is_some() {
                break;
            }
            while session.connection().window_space() > 0 && self.in_session < MAX_TASKS - 8 {
                let Some(req) = q.sub.pop() else { break };
                let slot = req.slot;
                if let Some(s) = q.started.get_mut(slot as usize) {
                    *s = req.dispatched_at;
                }
                if let Some(t) = q.taken.get_mut(slot as usize) {
                    *t = req.dispatched_at.max(now);
                }
                if let Some(a) = q.aborts.get_mut(slot as usize) {
                    *a = req.aborts;
                }
                let mut cmd = req.cmd;
                cmd.user_tag = tag(q.id, slot);
                if let Err(e) = session.submit(cmd) {
                    // The session consumed the command, so it is reported
                    // lost (an error completion, not a silent drop). Only a
                    // buffer over 4 GiB gets here: is_failed was checked
                    // above and in_session bounds the tasks.
                    q.respond(Response::Lost {
                        slot,
                        reason: match &e {
                            SessionError::Submit(s) => s.clone(),
                            other => SubmitError::Down(other.to_string()),
                        },
                    });
                    return Err(PathFailure::Session(e));
                }
                self.in_session += 1;
                progressed = true;
            }
        }
        let epoch = self.alua_epoch.load(Ordering::Acquire);
        if epoch != self.alua_epoch_seen {
            self.alua_epoch_seen = epoch;
            self.alua_refresh_wanted = true;
        }
        if self.alua_refresh_wanted && !self.alua_refresh_pending && self.draining.is_none() {
            self.submit_rtpg(session);
        }
        if self.explicit_alua && !self.alua_refresh_pending && !self.stpg_pending {
            self.maybe_stpg(session, now);
        }
        progressed |= session.poll_io().map_err(PathFailure::Session)?;
        // Completions are timed when they were decoded, not when the round
        // began: the commands sent in this round (dispatched after `now`)
        // can be answered within it by a near target, and a latency of
        // zero, or a round's length too short, pulled the historical latency
        // towards 1 ns and hst sent everything to that path. One clock read
        // per round that completes something.
        let mut seen_at = None;
        while let Some(ev) = session.connection_mut().poll_event() {
            progressed = true;
            match ev {
                Event::Completed(c) => {
                    let seen = *seen_at.get_or_insert_with(Instant::now);
                    self.on_completion(c, seen)
                }
                Event::AsyncScsiEvent { lun, sense } => self.on_async_scsi_event(lun, &sense),
                Event::LogoutRequested { within } => self.begin_drain(within, now),
                Event::RenegotiationStarted => self.shared.record_async_event(
                    "parameter renegotiation requested (AsyncEvent 4): Text Request sent",
                ),
                Event::Renegotiated {
                    max_xmit_data_segment_len,
                } => log::info!(
                    "path {}: renegotiated: the target's MaxRecvDataSegmentLength is {max_xmit_data_segment_len}",
                    self.shared.name
                ),
                Event::LoggedOut { time2wait, .. } => {
                    return Err(PathFailure::LoggedOut {
                        time2wait: Duration::from_secs(u64::from(time2wait)),
                    });
                }
                Event::TaskManagement { user_tag, response } => {
                    self.on_abort_answer(session, user_tag, response)?
                }
                Event::ConnectionLoggedOut {
                    cid,
                    response,
                    time2wait,
                    ..
                } => self.on_mcs_logout_answer(session, cid, response, time2wait, now),
                Event::PingAnswered { .. } => self.on_mcs_ping_answered(session, now),
                Event::Reassigned {
                    user_tag,
                    response,
                    refused,
                } => self.on_reassign_answer(user_tag, response, refused),
                _ => {}
            }
        }
        progressed |= self.abort_overdue(session, now)?;
        if let Some(d) = &mut self.draining {
            match d.logout_sent {
                None if self.in_session == 0 || now >= d.logout_by => {
                    if self.in_session > 0 {
                        log::warn!(
                            "path {}: {} command(s) still in flight at the logout deadline: they go to other paths",
                            self.shared.name,
                            self.in_session
                        );
                    }
                    // MC/S: this connection only (reason 1), not the session.
                    let sent = match &self.mcs {
                        Some(m) => session.connection_mut().logout_reason(1, m.cid, now),
                        None => session.connection_mut().logout(now),
                    };
                    sent.map_err(|e| PathFailure::Session(e.into()))?;
                    d.logout_sent = Some(now);
                    progressed = true;
                }
                Some(sent) if now.saturating_duration_since(sent) > LOGOUT_ANSWER_TIMEOUT => {
                    return Err(PathFailure::LogoutUnanswered(LOGOUT_ANSWER_TIMEOUT));
                }
                _ => {}
            }
        }
        if let Some(watch) = &mut self.silence {
            let recent = Duration::from_nanos(self.shared.load().latency_ewma_ns);
            let pdus_in = session.connection().stats.pdus_in;
            match watch.on_round(now, self.in_session, pdus_in, recent) {
                SilenceVerdict::Fine => {}
                SilenceVerdict::Ping => {
                    // Immediate: needs no window space. A full task table
                    // leaves it to the NOP timer.
                    let _ = session.connection_mut().ping(now);
                    progressed = true;
                }
                SilenceVerdict::Dead(silent) => {
                    return Err(PathFailure::Silent {
                        silent,
                        outstanding: self.in_session,
                    });
                }
            }
        }
        Ok(progressed)
    }

    /// Sends ABORT TASK for commands overdue on this path while it still
    /// answers; fails the path when an abort went unanswered.
    fn abort_overdue(
        &mut self,
        session: &mut Session<BoxedTransport>,
        now: Instant,
    ) -> Result<bool, PathFailure> {
        let Some(aborts) = &mut self.aborts else {
            return Ok(false);
        };
        aborts.on_round(now).map_err(PathFailure::Abort)?;
        if self.in_session == 0 || !aborts.check_due(now) {
            return Ok(false);
        }
        // A command aborted n times before waits `after_for(n)`.
        let queues = &self.queues;
        let overdue = aborts.overdue(
            |age| session.connection().overdue_commands(now, age),
            |t| {
                if t & INTERNAL_TAG != 0 {
                    return None;
                }
                let (qid, slot) = ((t >> 32) as u32, t as u32);
                let q = queues.iter().find(|q| q.id == qid);
                Some(
                    q.and_then(|q| q.aborts.get(slot as usize).copied())
                        .unwrap_or(0),
                )
            },
        );
        let mut sent = false;
        for (tmf, cmd) in aborts.start(now, &overdue) {
            match session.connection_mut().task_management(
                crate::wire::iscsi::tmf::ABORT_TASK,
                self.probe.lun,
                Some(cmd),
                tmf,
                now,
            ) {
                Ok(()) => {
                    log::warn!(
                        "path {}: command {cmd:#x} unanswered for {:?}: ABORT TASK sent",
                        self.shared.name,
                        aborts.policy().after
                    );
                    sent = true;
                }
                Err(_) => aborts.forget(tmf),
            }
        }
        Ok(sent)
    }

    /// The answer to one of our ABORT TASKs: confirmed, the command is gone
    /// at the target and goes back to its queue for any path; refused, the
    /// path fails (its writes then wait for the next fence steps).
    fn on_abort_answer(
        &mut self,
        session: &mut Session<BoxedTransport>,
        tmf: u64,
        response: u8,
    ) -> Result<(), PathFailure> {
        if self.fence_reset.as_ref().is_some_and(|(_, t, _)| *t == tmf) {
            self.finish_lun_reset(Some(response), Instant::now());
            return Ok(());
        }
        let Some(aborts) = &mut self.aborts else {
            return Ok(());
        };
        match aborts.on_response(tmf, response) {
            None => Ok(()),
            Some(Err(e)) => Err(PathFailure::Abort(e)),
            Some(Ok(tag)) => {
                if let Some(cmd) = session.connection_mut().take_aborted(tag) {
                    log::warn!(
                        "path {}: ABORT TASK of command {tag:#x} confirmed (response {response}): it goes to another path",
                        self.shared.name
                    );
                    self.in_session = self.in_session.saturating_sub(1);
                    self.shared.record_resubmitted(1);
                    // Fenced: the target will not run it any more.
                    self.respond_with(cmd, |slot, cmd| Response::Aborted { slot, cmd });
                }
                Ok(())
            }
        }
    }

    /// AsyncEvent 0: a SCSI event with sense data (RFC 7143 §11.9.1),
    /// logged and counted; an ALUA change makes every path re-read its state.
    fn on_async_scsi_event(&mut self, lun: u64, sense: &[u8]) {
        let parsed = SenseData::parse(sense).ok();
        let what = match &parsed {
            Some(s) => format!(
                "SCSI event on LUN {:#x} (AsyncEvent 0): {:?}, ASC/ASCQ {:02x}/{:02x}",
                lun, s.key, s.asc, s.ascq
            ),
            None => format!(
                "SCSI event on LUN {lun:#x} (AsyncEvent 0) with {} bytes of unreadable sense",
                sense.len()
            ),
        };
        self.shared.record_async_event(&what);
        match parsed.as_ref().and_then(UnitAttention::from_sense) {
            Some(UnitAttention::AluaStateChanged) => self.alua_changed(),
            Some(ua) => log::info!("path {}: {ua:?}", self.shared.name),
            None => {}
        }
    }

    /// AsyncEvent 1: stop taking commands on this path (state Down, so the
    /// queues send new I/O elsewhere), let those in flight finish, and log
    /// out within `within` seconds (at three quarters of it at the latest).
    fn begin_drain(&mut self, within: u16, now: Instant) {
        self.shared.record_async_event(&format!(
            "logout requested within {within} s (AsyncEvent 1): finishing {} command(s) in flight first",
            self.in_session
        ));
        if self.draining.is_some() {
            return;
        }
        self.shared.set_state(
            PathState::Down,
            &format!(
                "logging out at the target's request (AsyncEvent 1, within {within} s): finishing what is in flight"
            ),
        );
        self.draining = Some(Drain {
            logout_by: now + Duration::from_millis(u64::from(within) * 750),
            logout_sent: None,
        });
    }

    /// The target said the ALUA states changed: re-read ours, and have the
    /// other paths re-read theirs.
    fn alua_changed(&mut self) {
        self.alua_refresh_wanted = true;
        self.announce_alua_change();
    }

    /// Records this path's ALUA state; a change is news for the others.
    fn set_alua(&mut self, state: Option<crate::scsi::AluaState>) {
        if self.shared.set_alua(state) {
            self.announce_alua_change();
        }
    }

    /// Bumps the device-wide epoch (the other paths re-read their state),
    /// counting the bump as seen here.
    fn announce_alua_change(&mut self) {
        self.alua_epoch_seen = self.alua_epoch.fetch_add(1, Ordering::AcqRel) + 1;
    }

    /// Explicit ALUA: with no active/optimized path left, asks the target
    /// (SET TARGET PORT GROUPS) to make this path's standby or
    /// non-optimized group active/optimized, if the group supports that.
    /// One path of the device at a time; the others re-read their state
    /// when it completes.
    fn maybe_stpg(&mut self, session: &mut Session<BoxedTransport>, now: Instant) {
        use crate::scsi::AluaState;
        let Some(group) = self.tpg else { return };
        if !matches!(
            self.shared.alua(),
            Some(AluaState::Standby | AluaState::ActiveNonOptimized)
        ) {
            return;
        }
        // AO_SUP (bit 0) of the group's supported states.
        if self.group_supported.is_some_and(|b| b & 0x01 == 0) {
            return;
        }
        if self.alua_control.optimized_path_up() || !self.alua_control.take_turn(now) {
            return;
        }
        let (c, list) = ScsiCommand::set_target_port_groups(&[(group, AluaState::ActiveOptimized)]);
        if let Ok(mut cmd) = Command::new(self.probe.lun, c.cdb_bytes(), Direction::Write, list) {
            cmd.user_tag = INTERNAL_TAG | STPG_TAG;
            if session.submit(cmd).is_ok() {
                log::info!(
                    "path {}: no active/optimized path left; SET TARGET PORT GROUPS: group {group} -> active/optimized",
                    self.shared.name
                );
                self.stpg_pending = true;
            }
        }
    }

    fn submit_rtpg(&mut self, session: &mut Session<BoxedTransport>) {
        let c = ScsiCommand::report_target_port_groups(1024);
        if let Ok(mut cmd) = Command::new(
            self.probe.lun,
            c.cdb_bytes(),
            Direction::Read,
            vec![0; 1024],
        ) {
            cmd.user_tag = INTERNAL_TAG;
            if session.submit(cmd).is_ok() {
                self.alua_refresh_pending = true;
                self.alua_refresh_wanted = false;
            }
        }
    }

    fn on_completion(&mut self, c: Completion, now: Instant) {
        // MC/S: another path's task taken over here goes back to it.
        let Some(c) = self.mcs_forward_done(c) else {
            return;
        };
        if c.user_tag & DEVICE_TAG == DEVICE_TAG {
            if let Some(i) = self.device_cmds.iter().position(|(t, _)| *t == c.user_tag) {
                let (_, reply) = self.device_cmds.swap_remove(i);
                let _ = reply.send(c);
            }
            return;
        }
        if c.user_tag & !3 == KEY_REPAIR_TAG {
            self.on_key_repair_answer(&c);
            return;
        }
        if c.user_tag & INTERNAL_TAG != 0 && c.user_tag & STPG_TAG != 0 {
            self.stpg_pending = false;
            match check_status(c.status, &c.sense) {
                Ok(()) if c.response == 0 => {
                    log::info!("path {}: SET TARGET PORT GROUPS done", self.shared.name);
                }
                Err(e) => log::warn!(
                    "path {}: SET TARGET PORT GROUPS failed: {e}",
                    self.shared.name
                ),
                Ok(()) => log::warn!(
                    "path {}: SET TARGET PORT GROUPS: iSCSI response {:#04x}",
                    self.shared.name,
                    c.response
                ),
            }
            // Every path re-reads its state (the target may have moved others).
            self.alua_changed();
            return;
        }
        if c.user_tag & INTERNAL_TAG != 0 {
            self.alua_refresh_pending = false;
            match check_status(c.status, &c.sense) {
                Ok(()) if c.response == 0 => {
                    let data =
                        TargetPortGroupsData::parse(&c.buffer[..c.transferred.min(c.buffer.len())])
                            .ok();
                    if let Some(g) = data
                        .as_ref()
                        .and_then(|d| group_of(d, self.tpg, self.relative_port))
                    {
                        self.group_supported = Some(g.supported);
                    }
                    let state = data.and_then(|d| alua_state_of(&d, self.tpg, self.relative_port));
                    self.set_alua(state);
                }
                // A UNIT ATTENTION is reported once (often the very ALUA
                // change we ask about): ask again.
                Err(e) if e.unit_attention().is_some() => self.alua_refresh_wanted = true,
                _ => {}
            }
            return;
        }
        self.in_session = self.in_session.saturating_sub(1);
        if c.response == 0
            && c.status == ScsiStatus::ReservationConflict.as_u8()
            && self.stray_preempt()
        {
            log::warn!(
                "path {}: command {:#x} refused with RESERVATION CONFLICT: a stray PREEMPT AND ABORT of our own removed this path's key; registering again and resending it",
                self.shared.name,
                c.user_tag
            );
            let cmd = crate::multipath::io::command_from_completion(c);
            self.respond_with(cmd, |slot, cmd| Response::StrayPreempt { slot, cmd });
            return;
        }
        let error = c.response != 0 || c.status != 0;
        if error {
            if let Err(e) = check_status(c.status, &c.sense) {
                if e.unit_attention() == Some(UnitAttention::AluaStateChanged) {
                    self.alua_changed();
                } else if e.class() == ErrorClass::PathLevel {
                    self.alua_refresh_wanted = true;
                }
            }
        }
        let qid = (c.user_tag >> 32) as u32;
        let slot = c.user_tag as u32;
        let Some(q) = self.queues.iter_mut().find(|q| q.id == qid) else {
            return; // the queue is gone
        };
        let since = |at: &Vec<Instant>| {
            at.get(slot as usize)
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(*s))
        };
        let latency = since(&q.started);
        self.shared.record_completion_seen(
            now,
            self.looked_at.min(now),
            since(&q.taken),
            c.transferred as u64,
            error,
        );
        let _ = self.hist.record(latency.as_micros().max(1) as u64);
        q.respond(Response::Done {
            slot,
            completion: c,
        });
    }

    /// A command of this path's live session got RESERVATION CONFLICT:
    /// true when a stray preempt of our own explains it (a repair of the
    /// key is under way, or `FenceBoard::take_stray_preempt` finds a
    /// PREEMPT AND ABORT in doubt that fenced an older session of this
    /// path, which this session's login has ended already, so registering
    /// again cannot let that session write). Then the key is registered
    /// again at the next round. False: the conflict is real (another host
    /// removed the key, or holds the LU) and reaches the application.
    fn stray_preempt(&mut self) -> bool {
        if self.key_repair_wanted || self.key_repair_pending > 0 {
            return true;
        }
        let (Some(board), Some(key)) = (&self.fence, self.probe.pr_key) else {
            return false;
        };
        if !board.take_stray_preempt(self.shared.index, self.session_epoch, key) {
            return false;
        }
        self.key_repair_wanted = true;
        true
    }

    /// Registers this path's key again on its live session after a stray
    /// preempt (as the probe does at login): REGISTER AND IGNORE EXISTING
    /// KEY, then RESERVE WE-RO (RESERVATION CONFLICT there: another path
    /// holds it, fine). Submitted before any command the rings still hold,
    /// so those run after it.
    fn repair_key(&mut self, session: &mut Session<BoxedTransport>) {
        use crate::wire::scsi::pr::{PrOutAction, PrOutParams, PrType};
        self.key_repair_wanted = false;
        let (Some(board), Some(key)) = (&self.fence, self.probe.pr_key) else {
            return;
        };
        let peers = &self.peers;
        board.settle_stray_preempts(self.shared.index, |v| {
            peers.get(v).map_or(u64::MAX, |p| p.fenced_through())
        });
        let register = ScsiCommand::persistent_reserve_out(
            PrOutAction::RegisterAndIgnoreExistingKey,
            None,
            &PrOutParams {
                sa_key: key,
                ..PrOutParams::default()
            },
        );
        let reserve = ScsiCommand::persistent_reserve_out(
            PrOutAction::Reserve,
            Some(PrType::WriteExclusiveRegistrantsOnly),
            &PrOutParams {
                key,
                ..PrOutParams::default()
            },
        );
        for (n, (c, data)) in [(1, register), (2, reserve)] {
            let Ok(mut cmd) = Command::new(self.probe.lun, c.cdb_bytes(), Direction::Write, data)
            else {
                continue;
            };
            cmd.user_tag = KEY_REPAIR_TAG | n;
            if session.submit(cmd).is_ok() {
                self.key_repair_pending += 1;
            }
        }
        log::warn!(
            "path {}: registering key {key:#x} again on session {} (a stray preempt of our own removed it)",
            self.shared.name,
            self.session_epoch
        );
    }

    /// The answer to a command of [`repair_key`](Self::repair_key).
    fn on_key_repair_answer(&mut self, c: &Completion) {
        self.key_repair_pending = self.key_repair_pending.saturating_sub(1);
        let what = if c.user_tag & 3 == 1 {
            "REGISTER AND IGNORE EXISTING KEY"
        } else {
            "RESERVE"
        };
        let conflict_ok =
            c.user_tag & 3 == 2 && c.status == ScsiStatus::ReservationConflict.as_u8();
        match check_status(c.status, &c.sense) {
            _ if c.response != 0 => log::warn!(
                "path {}: {what} after a stray preempt: iSCSI response {:#04x}",
                self.shared.name,
                c.response
            ),
            Err(e) if !conflict_ok => log::warn!(
                "path {}: {what} after a stray preempt failed: {e}",
                self.shared.name
            ),
            _ => {}
        }
    }

    /// Sends every command waiting in the rings back for another path.
    fn bounce_rings(&mut self) {
        for q in &mut self.queues {
            while let Some(req) = q.sub.pop() {
                q.respond(Response::Bounced {
                    slot: req.slot,
                    cmd: req.cmd,
                    sent_in_session: None,
                    sent_on: None,
                });
            }
        }
    }

    fn bounce(&mut self, cmd: Command) {
        let epoch = self.session_epoch;
        self.bounce_as(cmd, Some(epoch));
    }

    /// Hands `cmd` back to its queue as `response(slot, cmd)`.
    fn respond_with(&mut self, cmd: Command, response: impl FnOnce(u32, Command) -> Response) {
        if cmd.user_tag & INTERNAL_TAG != 0 {
            return;
        }
        // Refused or aborted: it does not run where it was.
        let Some(cmd) = self.mcs_forward_bounce(cmd, None) else {
            return;
        };
        let qid = (cmd.user_tag >> 32) as u32;
        let slot = cmd.user_tag as u32;
        if let Some(q) = self.queues.iter_mut().find(|q| q.id == qid) {
            q.respond(response(slot, cmd));
        }
    }

    /// Hands `cmd` back to its queue; `sent_in_session`: the session that
    /// may still run it (None: nothing will).
    fn bounce_as(&mut self, cmd: Command, sent_in_session: Option<u64>) {
        self.bounce_on(cmd, sent_in_session, None);
    }

    /// [`Self::bounce_as`], the session being path `sent_on`'s when Some
    /// (MC/S: another connection took the task over and failed with it).
    pub(super) fn bounce_on(
        &mut self,
        cmd: Command,
        sent_in_session: Option<u64>,
        sent_on: Option<usize>,
    ) {
        if cmd.user_tag & INTERNAL_TAG != 0 {
            return;
        }
        let ran_on = sent_in_session.map(|e| (sent_on.unwrap_or(self.shared.index), e));
        let Some(cmd) = self.mcs_forward_bounce(cmd, ran_on) else {
            return;
        };
        let qid = (cmd.user_tag >> 32) as u32;
        let slot = cmd.user_tag as u32;
        if let Some(q) = self.queues.iter_mut().find(|q| q.id == qid) {
            q.respond(Response::Bounced {
                slot,
                cmd,
                sent_in_session,
                sent_on,
            });
        }
    }

    /// Hands over the completions the session decoded but nobody polled yet.
    ///
    /// A session can fail in the same `poll_io` that decoded final responses
    /// (the target answers, then closes: one read returns the answers, the
    /// next one the close), and `step_up` also returns early on a failed
    /// submit or a logout request. Those commands are finished, so
    /// `take_outstanding` no longer has them: if their `Completed` events
    /// were dropped with the session, their queue would get neither `Done`
    /// nor `Bounced`, and the I/O would stay outstanding for ever.
    /// Returns the Time2Wait of a Logout Response among them (the target
    /// answers a logout and closes: both can come in one read).
    fn deliver_decoded(
        &mut self,
        session: &mut Session<BoxedTransport>,
        now: Instant,
    ) -> Option<Duration> {
        let mut logged_out = None;
        let mut seen_at = None;
        while let Some(ev) = session.connection_mut().poll_event() {
            match ev {
                Event::Completed(c) => {
                    let seen = *seen_at.get_or_insert_with(|| Instant::now().max(now));
                    self.on_completion(c, seen)
                }
                Event::LoggedOut { time2wait, .. } => {
                    logged_out = Some(Duration::from_secs(u64::from(time2wait)))
                }
                _ => {}
            }
        }
        logged_out
    }

    /// Ends the session: `at_least` is the Time2Wait the target asked for
    /// (zero: the negotiated DefaultTime2Wait and the back-off decide).
    fn path_failed(
        &mut self,
        mut session: Session<BoxedTransport>,
        reason: &str,
        at_least: Duration,
        now: Instant,
    ) {
        // Answered before the failure: Done, not Bounced (and not lost).
        // First, so that a Logout Response read with the close counts.
        let logged_out = self.deliver_decoded(&mut session, now);
        let (reason, at_least) = match logged_out {
            Some(t) if self.draining.is_some() => (
                format!(
                    "logged out at the target's request (AsyncEvent 1); reconnecting after {t:?}"
                ),
                t.max(at_least),
            ),
            _ => (reason.to_string(), at_least),
        };
        self.draining = None;
        // State first, so the queues do not pick this path for what we bounce.
        self.shared.set_state(PathState::Down, &reason);
        match self.mcs_closed_after_own_logout() {
            Some(t2w) => self.health.on_logged_out(now, t2w.max(at_least)),
            None => self.health.on_failure_waiting(now, at_least),
        };
        // MC/S at ERL 2: the sent tasks wait for TASK REASSIGN, and only
        // those never sent come back (nothing will run them).
        let (cmds, held) = match self.mcs_hold_for_reassign(&mut session, now) {
            Some(unsent) => (unsent, true),
            None => {
                self.mcs_note_holes(&session);
                (session.connection_mut().take_outstanding(), false)
            }
        };
        let n = cmds
            .iter()
            .filter(|c| c.user_tag & INTERNAL_TAG == 0)
            .count();
        self.shared.record_resubmitted(n as u64);
        if !held && cmds.iter().any(|c| c.direction == Direction::Write) {
            self.want_fence();
        }
        for c in cmds {
            if held {
                self.bounce_as(c, None);
            } else {
                self.bounce(c);
            }
        }
        self.bounce_rings();
        self.in_session = 0;
        self.aborts = None;
        // The next login registers the key anyway.
        self.key_repair_wanted = false;
        self.key_repair_pending = 0;
        if self.fence_reset.is_some() {
            self.finish_lun_reset(None, now);
        }
        self.mcs_fencer_failed(now);
        // Their callers hear that the path failed.
        self.device_cmds.clear();
        let (mut t, _) = session.into_parts();
        t.close();
        self.conn = Conn::Down;
    }

    /// This path failed with writes in its session: ask the other live
    /// paths of its portal group to end the session (`multipath::fence`).
    fn want_fence(&self) {
        let Some(board) = &self.fence else { return };
        if self.mcs.is_some() {
            self.want_mcs_fence(board);
            return;
        }
        let Some(tpgt) = self.shared.portal_group() else {
            log::info!(
                "path {}: the target named no portal group for the failed session, so it can be fenced only by this path's own next login",
                self.shared.name
            );
            return;
        };
        log::info!(
            "path {}: session {} failed with writes in it: fence wanted through another portal of group {tpgt}",
            self.shared.name,
            self.session_epoch
        );
        board.post(FenceNeed {
            path: self.shared.index,
            epoch: self.session_epoch,
            tpgt,
            login: self.probe.login.clone(),
            pr_key: self.probe.pr_key,
        });
    }

    /// Runs fence logins for other paths: collects one that ended, and, while
    /// this path is up, claims a need of its portal group and logs in with
    /// the failed path's ISID on a thread of its own (with this path's
    /// connector, which a reconnect of this path waits for).
    fn fence_for_others(&mut self, now: Instant) {
        if self.mcs.is_some() {
            self.mcs_fence_for_others(now);
            return;
        }
        // Every round: two loads when there is nothing to do.
        if self.fence_job.is_none()
            && self.fence_side.is_none()
            && self.fence_preempt.is_none()
            && self.fence_reset.is_none()
            && !self.fence.as_ref().is_some_and(|b| b.has_pending())
        {
            return;
        }
        let Some(board) = self.fence.clone() else {
            return;
        };
        if self.fence_preempt.is_some() {
            self.finish_preempt(&board, now);
            return;
        }
        if let Some((_, _, sent)) = &self.fence_reset {
            if now.saturating_duration_since(*sent) >= LUN_RESET_ANSWER {
                self.finish_lun_reset(None, now);
            }
            return;
        }
        if self.fence_side.is_some() {
            self.pump_side_fence(&board, now);
            return;
        }
        if let Some(h) = self.fence_job.take() {
            if !h.is_finished() {
                self.fence_job = Some(h);
                return;
            }
            match h.join() {
                Ok((connector, job, result)) => {
                    self.connector = Some(connector);
                    let attempts = board.finish(&job, &result, now);
                    let victim = &self.peers[job.need.path].name;
                    match result {
                        Ok(()) => log::info!(
                            "path {}: fenced session {} of path {victim} (login with its ISID through this portal, group {}; attempt {attempts})",
                            self.shared.name,
                            job.need.epoch,
                            job.need.tpgt
                        ),
                        Err(e) if attempts <= 1 => log::info!(
                            "path {}: fencing session {} of path {victim} failed (attempt {attempts}; retried with back-off): {e}",
                            self.shared.name,
                            job.need.epoch
                        ),
                        Err(e) => log::debug!(
                            "path {}: fencing session {} of path {victim} failed (attempt {attempts}): {e}",
                            self.shared.name,
                            job.need.epoch
                        ),
                    }
                }
                Err(_) => {
                    // The connector went down with the thread.
                    self.health.give_up();
                    self.shared
                        .set_state(PathState::Failed, "fence login thread panicked");
                }
            }
            return;
        }
        if !board.has_pending() || !matches!(self.conn, Conn::Up(_)) {
            return;
        }
        let Some(tpgt) = self.shared.portal_group() else {
            return;
        };
        let peers = self.peers.clone();
        let fenced_through = |p: usize| peers.get(p).map_or(u64::MAX, |s| s.fenced_through());
        if self.probe.pr_key.is_some() {
            // No live path of its group left: preempt its key instead.
            let group_live = |g: u16, failed: usize| {
                peers.iter().any(|s| {
                    s.index != failed && s.state() == PathState::Up && s.portal_group() == Some(g)
                })
            };
            if let Some(job) =
                board.claim_preempt(self.shared.index, now, fenced_through, group_live)
            {
                self.start_preempt(&board, job, now);
                return;
            }
        }
        let side = self.side_fence_ready();
        let claimed = if self.login_fence && (self.connector.is_some() || side) {
            board.claim(self.shared.index, tpgt, now, fenced_through)
        } else {
            None
        };
        let Some(job) = claimed else {
            if let Some(after) = self.lun_reset_after {
                if let Some(job) =
                    board.claim_lun_reset(self.shared.index, now, after, fenced_through)
                {
                    self.start_lun_reset(&board, job, now);
                }
            }
            return;
        };
        if side {
            self.start_side_fence(&board, job, now);
            return;
        }
        let Some(mut connector) = self.connector.take() else {
            return;
        };
        let victim = self.peers[job.need.path].clone();
        let timers = self.probe.timers;
        let login_timeout = self.probe.login_timeout;
        let spawned = self.helper.run(move || {
            let result =
                fence_login(&mut connector, &job.need, timers, login_timeout).map(|session| {
                    // Ended at the target: the held writes may go now,
                    // before our logout of the fence session.
                    victim.fence_through(job.need.epoch);
                    let _ = session.logout(Duration::from_millis(500));
                });
            (connector, job, result)
        });
        match spawned {
            Ok(h) => self.fence_job = Some(h),
            Err(e) => {
                self.health.give_up();
                self.shared.set_state(
                    PathState::Failed,
                    &format!("cannot spawn fence login thread: {e}"),
                );
            }
        }
    }

    /// Whether this path's live session runs on a userspace stack that can
    /// carry a second connection (DPDK: the path's NIC queue belongs to
    /// its session, so a fence login cannot take it through the connector).
    fn side_fence_ready(&self) -> bool {
        matches!(&self.conn, Conn::Up(s) if s.transport().has_side_connections())
    }

    /// The fence login over a second connection on this path's own stack:
    /// the session's transport opens it to this path's portal, a helper
    /// thread logs in over it with the failed path's ISID (as with a
    /// connector), and this worker moves its bytes every round
    /// ([`pump_side_fence`](Self::pump_side_fence)) until the job ends.
    fn start_side_fence(&mut self, board: &FenceBoard, job: FenceJob, now: Instant) {
        let opened = match &mut self.conn {
            Conn::Up(session) => session.transport_mut().open_side(),
            _ => None,
        };
        let side = match opened {
            Some(Ok(side)) => side,
            Some(Err(e)) => {
                board.finish(&job, &Err(FenceError::Connect(e.to_string())), now);
                return;
            }
            None => {
                board.finish(&job, &Err(FenceError::FencerFailed), now);
                return;
            }
        };
        log::info!(
            "path {}: fence login for session {} of path {} over a second connection on this path's stack ({:?} -> {:?})",
            self.shared.name,
            job.need.epoch,
            self.peers[job.need.path].name,
            side.local_addr(),
            side.peer_addr()
        );
        let victim = self.peers[job.need.path].clone();
        let timers = self.probe.timers;
        let login_timeout = self.probe.login_timeout;
        let need = job.need.clone();
        let spawned = self.helper.run(move || {
            let mut side = Some(side);
            let mut connector = PathConnector::Fixed(Box::new(move || {
                let side = side
                    .take()
                    .ok_or(crate::transport::TransportError::Closed)?;
                side.wait_connected(login_timeout)?;
                Ok(Box::new(side) as Box<dyn Transport>)
            }));
            fence_login(&mut connector, &need, timers, login_timeout).map(|session| {
                // Ended at the target: the held writes may go now, before
                // our logout of the fence session.
                victim.fence_through(need.epoch);
                let _ = session.logout(Duration::from_millis(500));
            })
        });
        match spawned {
            Ok(h) => self.fence_side = Some((job, h)),
            Err(e) => {
                board.finish(&job, &Err(FenceError::FencerFailed), now);
                log::warn!(
                    "path {}: cannot start the fence login thread: {e}",
                    self.shared.name
                );
            }
        }
    }

    /// Moves the side connection's bytes while its fence login runs, and
    /// collects the login once it has ended.
    fn pump_side_fence(&mut self, board: &FenceBoard, now: Instant) {
        if let Conn::Up(session) = &mut self.conn {
            session.transport_mut().pump_side();
        }
        let Some((job, h)) = self.fence_side.take() else {
            return;
        };
        if !h.is_finished() {
            self.fence_side = Some((job, h));
            return;
        }
        if let Conn::Up(session) = &mut self.conn {
            // The login dropped its end: close the side's socket.
            session.transport_mut().pump_side();
        }
        let result = h.join().unwrap_or(Err(FenceError::FencerFailed));
        let attempts = board.finish(&job, &result, now);
        let victim = &self.peers[job.need.path].name;
        match result {
            Ok(()) => log::info!(
                "path {}: fenced session {} of path {victim} (login with its ISID over a second connection on this path's stack, group {}; attempt {attempts})",
                self.shared.name,
                job.need.epoch,
                job.need.tpgt
            ),
            Err(e) => log::info!(
                "path {}: fencing session {} of path {victim} over a second connection failed (attempt {attempts}; retried with back-off): {e}",
                self.shared.name,
                job.need.epoch
            ),
        }
    }

    /// The reservation fence step: PERSISTENT RESERVE OUT, PREEMPT AND
    /// ABORT of the failed path's key, on this path's session (with this
    /// path's key as the reservation key; the type stays Write Exclusive –
    /// Registrants Only).
    fn start_preempt(&mut self, board: &FenceBoard, job: FenceJob, now: Instant) {
        use crate::wire::scsi::pr::{PrOutAction, PrOutParams, PrType};
        let (Some(key), Some(victim_key)) = (self.probe.pr_key, job.need.pr_key) else {
            board.finish(&job, &Err(FenceError::FencerFailed), now);
            return;
        };
        let Conn::Up(session) = &mut self.conn else {
            board.finish(&job, &Err(FenceError::FencerFailed), now);
            return;
        };
        let (c, data) = ScsiCommand::persistent_reserve_out(
            PrOutAction::PreemptAndAbort,
            Some(PrType::WriteExclusiveRegistrantsOnly),
            &PrOutParams {
                key,
                sa_key: victim_key,
                ..PrOutParams::default()
            },
        );
        let Ok(mut cmd) = Command::new(self.probe.lun, c.cdb_bytes(), Direction::Write, data)
        else {
            board.finish(&job, &Err(FenceError::FencerFailed), now);
            return;
        };
        self.next_device_tag = (self.next_device_tag + 1) & 0xffff_ffff;
        let tag = DEVICE_TAG | self.next_device_tag;
        cmd.user_tag = tag;
        if session.submit(cmd).is_err() {
            board.finish(&job, &Err(FenceError::FencerFailed), now);
            return;
        }
        let (reply, answer) = std::sync::mpsc::channel();
        self.device_cmds.push((tag, reply));
        log::info!(
            "path {}: no live path of portal group {} left: PREEMPT AND ABORT of path {}'s key {victim_key:#x} (session {})",
            self.shared.name,
            job.need.tpgt,
            self.peers[job.need.path].name,
            job.need.epoch
        );
        self.fence_preempt = Some((job, answer, self.session_epoch));
    }

    /// The last resort: LOGICAL UNIT RESET on this path's session. The LU
    /// aborts every task of every initiator (and reports UNIT ATTENTION
    /// 29/03 to each), so the failed session's tasks the LU holds end.
    fn start_lun_reset(&mut self, board: &FenceBoard, job: FenceJob, now: Instant) {
        let Conn::Up(session) = &mut self.conn else {
            board.finish(&job, &Err(FenceError::FencerFailed), now);
            return;
        };
        let tag = LUN_RESET_TAG | u64::from(job.need.epoch as u32);
        if session
            .connection_mut()
            .task_management(
                crate::wire::iscsi::tmf::LOGICAL_UNIT_RESET,
                self.probe.lun,
                None,
                tag,
                now,
            )
            .is_err()
        {
            board.finish(&job, &Err(FenceError::FencerFailed), now);
            return;
        }
        log::warn!(
            "path {}: session {} of path {} not fenced by the other steps: LOGICAL UNIT RESET (every initiator's tasks on the LU are aborted)",
            self.shared.name,
            job.need.epoch,
            self.peers[job.need.path].name
        );
        self.fence_reset = Some((job, tag, now));
    }

    /// The LOGICAL UNIT RESET was answered (`response`) or timed out / its
    /// path failed (None).
    fn finish_lun_reset(&mut self, response: Option<u8>, now: Instant) {
        let Some((job, _, sent)) = self.fence_reset.take() else {
            return;
        };
        let Some(board) = self.fence.clone() else {
            return;
        };
        let result = match response {
            Some(crate::multipath::fence::TMF_FUNCTION_COMPLETE) => Ok(()),
            Some(r) => Err(FenceError::LunReset(r)),
            None if now.saturating_duration_since(sent) >= LUN_RESET_ANSWER => {
                Err(FenceError::LunResetUnanswered(LUN_RESET_ANSWER))
            }
            None => Err(FenceError::FencerFailed),
        };
        let victim = self.peers[job.need.path].clone();
        if result.is_ok() {
            victim.fence_through(job.need.epoch);
        }
        let attempts = board.finish(&job, &result, now);
        match result {
            Ok(()) => log::warn!(
                "path {}: fenced session {} of path {} by LOGICAL UNIT RESET (attempt {attempts})",
                self.shared.name,
                job.need.epoch,
                victim.name
            ),
            Err(e) => log::info!(
                "path {}: LOGICAL UNIT RESET for session {} of path {} failed (attempt {attempts}): {e}",
                self.shared.name,
                job.need.epoch,
                victim.name
            ),
        }
    }

    /// Collects the answer to our PREEMPT AND ABORT: GOOD ends the failed
    /// session's right to write (its tasks aborted, its key gone), so its
    /// held writes may go.
    fn finish_preempt(&mut self, board: &FenceBoard, now: Instant) {
        use std::sync::mpsc::TryRecvError;
        let Some((job, answer, epoch)) = self.fence_preempt.take() else {
            return;
        };
        let result = match answer.try_recv() {
            Err(TryRecvError::Empty) => {
                self.fence_preempt = Some((job, answer, epoch));
                return;
            }
            Err(TryRecvError::Disconnected) => {
                // Our session failed before the answer: the preempt may
                // still run later (a hung portal that resumes), after the
                // victim registered again.
                if let Some(key) = job.need.pr_key {
                    board.preempt_in_doubt(&job, key, epoch);
                }
                Err(FenceError::FencerFailed)
            }
            Ok(c) if c.response != 0 => Err(FenceError::PreemptResponse(c.response)),
            Ok(c) => check_status(c.status, &c.sense).map_err(FenceError::Preempt),
        };
        let victim = self.peers[job.need.path].clone();
        if result.is_ok() {
            victim.fence_through(job.need.epoch);
        }
        let attempts = board.finish(&job, &result, now);
        match result {
            Ok(()) => log::info!(
                "path {}: fenced session {} of path {} by PREEMPT AND ABORT of its key (attempt {attempts})",
                self.shared.name,
                job.need.epoch,
                victim.name
            ),
            Err(e) => log::info!(
                "path {}: PREEMPT AND ABORT for session {} of path {} failed (attempt {attempts}; retried with back-off): {e}",
                self.shared.name,
                job.need.epoch,
                victim.name
            ),
        }
    }

    fn start_connect(&mut self) {
        if !self.mcs_may_connect() {
            return;
        }
        let Some(mut connector) = self.connector.take() else {
            return;
        };
        self.health.on_attempt();
        self.shared.set_state(PathState::Connecting, "reconnecting");
        if let (Some(board), Some(_)) = (&self.fence, self.probe.pr_key) {
            // Before this login registers: preempts in doubt whose fencer
            // is known ended by now can no longer undo that registration.
            let peers = &self.peers;
            board.settle_stray_preempts(self.shared.index, |v| {
                peers.get(v).map_or(u64::MAX, |p| p.fenced_through())
            });
        }
        let cfg = self.probe.clone();
        let mcs_login = self.mcs_login();
        let spawned = self.helper.run(move || {
            let r = match mcs_login {
                Some(login) => login(&mut connector, &cfg),
                None => probe(&mut connector, &cfg),
            };
            (connector, r)
        });
        match spawned {
            Ok(h) => self.conn = Conn::Connecting(h),
            Err(e) => {
                // The connector moved into the failed closure: the path is lost.
                self.health.give_up();
                self.shared.set_state(
                    PathState::Failed,
                    &format!("cannot spawn login thread: {e}"),
                );
            }
        }
    }

    fn finish_connect(&mut self, handle: Job<ConnectResult>, now: Instant) {
        let Ok((connector, result)) = handle.join() else {
            self.release_preempts();
            self.health.give_up();
            self.shared
                .set_state(PathState::Failed, "login thread panicked");
            return;
        };
        self.connector = Some(connector);
        match result {
            Ok(p) if p.lu_id != self.lu_id => {
                let reason = format!(
                    "now leads to logical unit {} instead of {}",
                    p.lu_id, self.lu_id
                );
                let (mut t, _) = p.session.into_parts();
                t.close();
                self.health.give_up();
                self.shared.set_state(PathState::Failed, &reason);
            }
            Ok(p) => self.install(p),
            Err(e) => {
                self.health.on_failure(now);
                self.shared.set_state(PathState::Down, &e.to_string());
            }
        }
        if !matches!(self.conn, Conn::Up(_)) {
            self.mcs_reconnect_failed();
        }
        self.release_preempts();
    }

    /// The login that held off preempts of this path's key while it
    /// registered ([`PreemptGate`]) has ended: installed (its failed
    /// session is marked fenced first) or failed.
    fn release_preempts(&self) {
        if let (Some(board), Some(_)) = (&self.fence, &self.probe.preempt_gate) {
            board.release_preempts(self.shared.index);
        }
    }

    fn shutdown(&mut self) {
        match std::mem::replace(&mut self.conn, Conn::Down) {
            Conn::Up(mut session) => {
                self.deliver_decoded(&mut session, Instant::now());
                let cmds = session.connection_mut().take_outstanding();
                for c in cmds {
                    self.bounce(c);
                }
                let _ = session.logout(Duration::from_millis(500));
            }
            Conn::Connecting(_) | Conn::Down => {}
        }
        self.mcs_drop_held();
        self.bounce_rings();
        self.shared.merge_histogram(&mut self.hist);
        self.health.close();
        self.shared.set_state(PathState::Closed, "device closed");
    }
}

#[cfg(test)]
mod tests {
    //! The worker's poll loop against a real session over a scripted
    //! in-memory transport (the test plays the queue's side of the rings).
    use super::*;
    use crate::iscsi::connection::ConnTimers;
    use crate::iscsi::login::LoginConfig;
    use crate::iscsi::session::testing::{login_stages, scsi_response, Scripted};
    use crate::iscsi::session::{IdlePolicy, SessionConfig};
    use crate::multipath::path::ReconnectPolicy;
    use crate::transport::TransportError;
    use crate::worker::ring::ring;
    use std::collections::VecDeque;

    /// A worker whose path is Up on a session that plays `after_login`
    /// (one stage per send, then the peer closes), with one queue of
    /// depth 8 registered: its submission producer and completion consumer.
    fn worker_on(
        after_login: Vec<Vec<u8>>,
    ) -> (
        Worker,
        Arc<PathShared>,
        Producer<Request>,
        Consumer<Response>,
    ) {
        let mut stages = login_stages();
        stages.extend(after_login);
        let t = Scripted {
            stages: VecDeque::from(stages),
            rx: VecDeque::new(),
        };
        let mut login = LoginConfig::new("iqn.i", Some("iqn.t"));
        login.isid = [0x80, 0, 0, 0, 0, 1];
        let mut config = SessionConfig::new(login.clone());
        config.idle = IdlePolicy::BusyPoll;
        let session = Session::login(BoxedTransport(Box::new(t)), &config).expect("login");
        let shared = Arc::new(PathShared::new(0, "p0", Instant::now()));
        shared.set_state(PathState::Up, "test");
        let control = Arc::new(ArrayQueue::new(8));
        let w = Worker::new(WorkerSetup {
            shared: shared.clone(),
            control: control.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            connector: PathConnector::Fixed(Box::new(|| Err(TransportError::Closed))),
            probe: ProbeConfig {
                name: "p0".into(),
                login,
                lun: 0,
                timers: ConnTimers::default(),
                login_timeout: Duration::from_secs(1),
                pr_key: None,
                preempt_gate: None,
            },
            lu_id: "naa.test".into(),
            health: PathHealth::new(ReconnectPolicy::default()),
            session: Some(PathProbe {
                session,
                lu_id: "naa.test".into(),
                target_port_group: None,
                relative_port: None,
                alua: None,
                capacity_blocks: 1000,
                block_size: 512,
                time2wait: Duration::ZERO,
                redirected_to: None,
                tpgs: crate::wire::scsi::Tpgs::None,
                group_supported: None,
                caps: Default::default(),
            }),
            idle: IdleMode::BusyPoll,
            fast_ping: None,
            abort: None,
            login_fence: true,
            lun_reset_fence: None,
            core: None,
            alua_epoch: Arc::new(AtomicU64::new(0)),
            alua_control: Arc::new(AluaControl::new(vec![shared.clone()])),
            fence: None,
            peers: Arc::from(vec![shared.clone()]),
            mcs: None,
        });
        let (sub_p, sub_c) = ring::<Request>(8);
        let (comp_p, comp_c) = ring::<Response>(8);
        assert!(control
            .push(Control::AddQueue {
                id: 0,
                depth: 8,
                sub: sub_c,
                comp: comp_p,
            })
            .is_ok());
        (w, shared, sub_p, comp_c)
    }

    fn test_unit_ready(slot: u32) -> Request {
        Request {
            slot,
            cmd: Command::new(0, &[0; 6], Direction::None, Vec::new()).unwrap(),
            dispatched_at: Instant::now(),
            aborts: 0,
        }
    }

    /// Regression (the all-paths-down hang): the target answers a command
    /// and closes the connection, and the worker reads both in one poll.
    /// The answer became a completion event inside the session, the failure
    /// sent the worker to `path_failed` before it drained the events, and
    /// `take_outstanding` no longer had the (finished) command: the queue got
    /// neither `Done` nor `Bounced`, and the I/O stayed outstanding for ever.
    #[test]
    fn completion_read_together_with_the_close_is_delivered() {
        // The first task after login gets ITT 0x2_0000 and StatSN 102.
        let (mut w, shared, mut sub, mut comp) = worker_on(vec![scsi_response(0x2_0000, 102, 0)]);
        assert!(sub.push(test_unit_ready(3)).is_ok());
        w.round(Instant::now());
        assert_eq!(shared.state(), PathState::Down, "the close was seen");
        match comp.pop() {
            Some(Response::Done { slot, completion }) => {
                assert_eq!((slot, completion.status), (3, 0));
            }
            Some(Response::Bounced { slot, .. }) => panic!("slot {slot} bounced"),
            Some(Response::Lost { slot, reason }) => panic!("slot {slot} lost: {reason}"),
            Some(Response::Aborted { slot, .. } | Response::StrayPreempt { slot, .. }) => {
                panic!("slot {slot} sent back")
            }
            None => panic!("the completion was dropped: the I/O would hang"),
        }
        assert!(comp.pop().is_none(), "exactly one response per command");
    }

    /// A command the target never answered comes back
    /// `Bounced` when the connection dies.
    #[test]
    fn unanswered_command_is_bounced_when_the_connection_dies() {
        let (mut w, shared, mut sub, mut comp) = worker_on(Vec::new());
        assert!(sub.push(test_unit_ready(5)).is_ok());
        w.round(Instant::now());
        assert_eq!(shared.state(), PathState::Down);
        assert!(matches!(
            comp.pop(),
            Some(Response::Bounced { slot: 5, .. })
        ));
        assert!(comp.pop().is_none());
        // What arrives while the path is down goes straight back too.
        assert!(sub.push(test_unit_ready(6)).is_ok());
        w.round(Instant::now());
        assert!(matches!(
            comp.pop(),
            Some(Response::Bounced { slot: 6, .. })
        ));
    }

    fn pdu(h: crate::wire::iscsi::PduHeader) -> Vec<u8> {
        let mut v = Vec::new();
        crate::wire::iscsi::encode_pdu(&mut v, &h, &[], Default::default());
        v
    }

    fn write_req(slot: u32) -> Request {
        Request {
            slot,
            cmd: Command::new(
                0,
                &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                Direction::Write,
                vec![0; 512],
            )
            .unwrap(),
            dispatched_at: Instant::now(),
            aborts: 0,
        }
    }

    /// A worker with ABORT TASK after 10 s (answered within 3 s), on a
    /// session that plays `after_login`; one write (slot 4) submitted at t0.
    fn worker_with_overdue_write(
        after_login: Vec<Vec<u8>>,
    ) -> (Worker, Arc<PathShared>, Consumer<Response>, Instant) {
        let (mut w, shared, mut sub, comp) = worker_on(after_login);
        let policy = AbortPolicy {
            after: Duration::from_secs(10),
            answer_within: Duration::from_secs(3),
        };
        let t0 = Instant::now();
        w.aborts = Some(TaskAborts::new(policy, ABORT_TAG, t0));
        assert!(sub.push(write_req(4)).is_ok());
        w.round(t0);
        w.round(t0 + Duration::from_secs(5));
        (w, shared, comp, t0)
    }

    fn tmf_response(response: u8) -> Vec<u8> {
        use crate::wire::iscsi::{PduHeader, Sn, TaskMgmtResponse};
        // The TMF is the second task after login: ITT 0x3_0001.
        pdu(PduHeader::TaskMgmtResponse(TaskMgmtResponse {
            response,
            itt: 0x3_0001,
            stat_sn: Sn(102),
            exp_cmd_sn: Sn(2),
            max_cmd_sn: Sn(9),
        }))
    }

    /// The abort back-off, as the queue hands it over (`Request::aborts`):
    /// a write that was aborted once before is not aborted again after
    /// `after` (10 s) but only after `after_for(1)` (20 s), so a target that
    /// stays slow is given twice as long each time.
    #[test]
    fn a_write_aborted_before_is_aborted_again_only_after_twice_as_long() {
        for (aborts, at, due) in [(0, 11, true), (1, 11, false), (1, 21, true)] {
            let (mut w, shared, mut sub, _comp) = worker_on(vec![Vec::new(); 4]);
            let policy = AbortPolicy {
                after: Duration::from_secs(10),
                answer_within: Duration::from_secs(30),
            };
            let t0 = Instant::now();
            w.aborts = Some(TaskAborts::new(policy, ABORT_TAG, t0));
            let mut req = write_req(4);
            req.aborts = aborts;
            assert!(sub.push(req).is_ok());
            w.round(t0);
            // Looks for overdue commands every after / 4.
            w.round(t0 + Duration::from_secs(5));
            w.round(t0 + Duration::from_secs(at));
            assert_eq!(shared.state(), PathState::Up);
            let out = w.aborts.as_ref().map(|a| a.outstanding());
            assert_eq!(
                out,
                Some(usize::from(due)),
                "aborted {aborts} times before, {at} s unanswered"
            );
        }
    }

    /// A write unanswered for 10 s on a live path gets ABORT TASK; once the
    /// target confirms ("function complete", and likewise "task does not
    /// exist"), it goes back to its queue as `Aborted`: no session may
    /// still run it (retried at once, no fence to wait for, counted against
    /// `MAX_ABORTS`), and the path stays up.
    #[test]
    fn an_overdue_write_is_aborted_and_goes_back_fenced_once_confirmed() {
        for response in [0, 1] {
            let (mut w, shared, mut comp, t0) =
                worker_with_overdue_write(vec![Vec::new(), tmf_response(response), Vec::new()]);
            match comp.pop() {
                None => {}
                Some(Response::Done { .. }) => panic!("not overdue yet: done"),
                Some(Response::Lost { reason, .. }) => panic!("not overdue yet: lost {reason}"),
                Some(Response::Bounced {
                    sent_in_session, ..
                }) => panic!("not overdue yet: bounced {sent_in_session:?}"),
                Some(Response::Aborted { .. } | Response::StrayPreempt { .. }) => {
                    panic!("not overdue yet: sent back")
                }
            }
            for i in 0..4 {
                w.round(t0 + Duration::from_secs(11) + Duration::from_millis(i));
            }
            match comp.pop() {
                Some(Response::Aborted { slot: 4, cmd }) => {
                    assert_eq!(cmd.direction, Direction::Write)
                }
                Some(Response::Bounced {
                    sent_in_session, ..
                }) => panic!("bounced as sent in {sent_in_session:?}"),
                Some(Response::Aborted { slot, .. }) => panic!("slot {slot} aborted"),
                Some(Response::StrayPreempt { .. }) => panic!("conflict"),
                Some(Response::Done { .. }) => panic!("completed"),
                Some(Response::Lost { reason, .. }) => panic!("lost: {reason}"),
                None => panic!("the aborted write did not come back"),
            }
            assert_eq!(shared.state(), PathState::Up, "the path stays up");
            assert_eq!(w.in_session, 0);
            assert_eq!(w.aborts.as_ref().map(|a| a.confirmed), Some(1));
        }
    }

    /// A refused ABORT TASK, or one unanswered within 3 s, fails the path:
    /// the write comes back as sent in the failed session, so it waits for
    /// the fence (reinstatement) before it may go elsewhere.
    #[test]
    fn a_refused_or_unanswered_abort_fails_the_path_and_the_write_waits_for_the_fence() {
        for refused in [true, false] {
            let stages = if refused {
                vec![Vec::new(), tmf_response(5), Vec::new()]
            } else {
                vec![Vec::new(), Vec::new(), Vec::new()]
            };
            let (mut w, shared, mut comp, t0) = worker_with_overdue_write(stages);
            w.round(t0 + Duration::from_secs(11));
            w.round(t0 + Duration::from_secs(11) + Duration::from_millis(1));
            if !refused {
                assert_eq!(
                    shared.state(),
                    PathState::Up,
                    "still waiting for the answer"
                );
                w.round(t0 + Duration::from_secs(14) + Duration::from_millis(1));
            }
            assert_eq!(shared.state(), PathState::Down, "refused: {refused}");
            assert!(matches!(
                comp.pop(),
                Some(Response::Bounced {
                    slot: 4,
                    sent_in_session: Some(1),
                    ..
                })
            ));
            assert!(comp.pop().is_none());
        }
    }

    /// AsyncEvent 1 while a command is in flight: the path goes Down (no
    /// new I/O), the command still completes (Done, not bounced), what the
    /// ring holds afterwards goes back unsent, and only then the logout
    /// goes out; its answer ends the session.
    #[test]
    fn logout_request_finishes_in_flight_work_then_logs_out() {
        use crate::wire::iscsi::{AsyncMessage, LogoutResponse, PduHeader, Sn};
        let mut first = pdu(PduHeader::AsyncMessage(AsyncMessage {
            lun: 0,
            stat_sn: Sn(102),
            exp_cmd_sn: Sn(1),
            max_cmd_sn: Sn(8),
            event: 1,
            vcode: 0,
            param1: 0,
            param2: 0,
            param3: 10,
        }));
        first.extend(scsi_response(0x2_0000, 103, 0));
        let logout = pdu(PduHeader::LogoutResponse(LogoutResponse {
            response: 0,
            itt: 0x3_0000,
            stat_sn: Sn(104),
            exp_cmd_sn: Sn(2),
            max_cmd_sn: Sn(9),
            time2wait: 1,
            time2retain: 0,
        }));
        let (mut w, shared, mut sub, mut comp) = worker_on(vec![first, logout]);
        assert!(sub.push(test_unit_ready(3)).is_ok());
        w.round(Instant::now());
        assert_eq!(shared.state(), PathState::Down, "no new I/O for this path");
        assert!(w.draining.is_some_and(|d| d.logout_sent.is_some()));
        match comp.pop() {
            Some(Response::Done { slot: 3, .. }) => {}
            _ => panic!("the in-flight command did not complete"),
        }
        assert!(sub.push(test_unit_ready(4)).is_ok());
        w.round(Instant::now());
        assert!(matches!(
            comp.pop(),
            Some(Response::Bounced {
                slot: 4,
                sent_in_session: None,
                ..
            })
        ));
        assert!(comp.pop().is_none());
        assert!(matches!(w.conn, Conn::Down), "logged out");
        assert!(w.draining.is_none());
        assert!(shared.stats().async_events >= 1);
        // Time2Wait 1 s from the Logout Response: no reconnect before.
        assert!(!w.health.due(Instant::now() + Duration::from_millis(900)));
        assert!(w.health.due(Instant::now() + Duration::from_millis(1100)));
    }
}

#[cfg(test)]
mod preempt_race_tests {
    //! The reservation re-register race (docs/multipath.md, "Fencing",
    //! step 3): real workers, probes and the embedded target.
    use super::*;
    use crate::iscsi::connection::ConnTimers;
    use crate::iscsi::login::LoginConfig;
    use crate::multipath::fence::FenceNeed;
    use crate::multipath::path::ReconnectPolicy;
    use crate::target::{Target, TargetConfig};
    use crate::transport::kernel::{KernelTcp, KernelTcpOptions};
    use crate::transport::{RxSink, TransportError, TxPart};
    use std::net::SocketAddr;

    const IQN: &str = "iqn.2026-12.org.iscsi-bypass:pr-race";

    /// Kernel TCP whose sending can be paused: what a path sends while
    /// paused stays in its session (a command in flight, not yet at the
    /// target).
    struct Pausable {
        inner: KernelTcp,
        paused: Arc<AtomicBool>,
    }

    impl Transport for Pausable {
        fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
            if self.paused.load(Ordering::Acquire) {
                return Ok(0);
            }
            self.inner.send(buf)
        }
        fn send_parts(&mut self, parts: &[TxPart<'_>]) -> Result<usize, TransportError> {
            if self.paused.load(Ordering::Acquire) {
                return Ok(0);
            }
            self.inner.send_parts(parts)
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
            self.inner.recv(buf)
        }
        fn recv_into(&mut self, sink: &mut dyn RxSink) -> Result<usize, TransportError> {
            self.inner.recv_into(sink)
        }
        fn poll(&mut self) -> Result<(), TransportError> {
            self.inner.poll()
        }
        fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
            self.inner.wait(timeout)
        }
        fn close(&mut self) {
            self.inner.close()
        }
        fn local_addr(&self) -> Option<SocketAddr> {
            self.inner.local_addr()
        }
        fn peer_addr(&self) -> Option<SocketAddr> {
            self.inner.peer_addr()
        }
    }

    fn connector(addr: SocketAddr, paused: Arc<AtomicBool>) -> PathConnector {
        PathConnector::Fixed(Box::new(move || {
            let inner = KernelTcp::connect(addr, &KernelTcpOptions::default())?;
            Ok(Box::new(Pausable {
                inner,
                paused: paused.clone(),
            }) as Box<dyn Transport>)
        }))
    }

    fn key(i: usize) -> u64 {
        0x5eed_0000_0000_0100 + i as u64
    }

    fn probe_config(i: usize, gate: Option<PreemptGate>) -> ProbeConfig {
        let mut login = LoginConfig::new("iqn.2026-12.org.iscsi-bypass:pr-race-host", Some(IQN));
        login.isid = [0x80, 0, 0, 0x7e, 0, i as u8];
        ProbeConfig {
            name: format!("p{i}"),
            login,
            lun: 0,
            timers: ConnTimers {
                nop_interval: None,
                nop_timeout: Duration::from_secs(5),
                command_timeout: Some(Duration::from_secs(20)),
            },
            login_timeout: Duration::from_secs(10),
            pr_key: Some(key(i)),
            preempt_gate: gate,
        }
    }

    /// A WRITE on `session`, retried past UNIT ATTENTIONs (a preempted
    /// nexus hears of it): its outcome.
    fn write_block(session: &mut Session<BoxedTransport>) -> Result<(), crate::scsi::ScsiError> {
        let c = ScsiCommand::write10(3, 1, 512, false).expect("WRITE(10)");
        for _ in 0..5 {
            let cmd = Command::new(0, c.cdb_bytes(), Direction::Write, vec![0x5a; 512]).unwrap();
            let done = session
                .execute(cmd, Duration::from_secs(10))
                .expect("answered");
            match check_status(done.status, &done.sense) {
                Err(e) if e.unit_attention().is_some() => continue,
                r => return r,
            }
        }
        panic!("UNIT ATTENTION five times");
    }

    /// Path 0's session failed with writes; path 1 has claimed the
    /// reservation fence (PREEMPT AND ABORT of path 0's key) and sent it,
    /// but it has not reached the target yet, when path 0 logs in again.
    /// Registering at once, path 0's fresh registration would be removed
    /// by the preempt when it runs, and its writes would get RESERVATION
    /// CONFLICT until its next login. Its login must wait for the
    /// preempt's answer and register after it.
    #[test]
    fn a_login_during_a_preempt_of_its_key_registers_after_the_preempt() {
        let t = Target::start(TargetConfig::ram(IQN, 1 << 20).loopback_portals(2)).expect("target");
        let portals = t.portals();
        let board = Arc::new(FenceBoard::new());
        let never = Arc::new(AtomicBool::new(false));
        let hold_path1 = Arc::new(AtomicBool::new(false));
        // Both paths log in and register (path 1 first: it reserves WE-RO).
        let p1 = probe(
            &mut connector(portals[1], hold_path1.clone()),
            &probe_config(1, None),
        )
        .expect("path 1 logs in");
        let mut c0 = connector(portals[0], never.clone());
        let old = probe(&mut c0, &probe_config(0, None)).expect("path 0 logs in");
        let tpgt0 = old
            .session
            .connection()
            .params()
            .target_portal_group_tag
            .expect("portal group of portal 0");
        let shared: Vec<Arc<PathShared>> = (0..2)
            .map(|i| Arc::new(PathShared::new(i, &format!("p{i}"), Instant::now())))
            .collect();
        // Path 0's session 1 fails with writes in it.
        assert_eq!(shared[0].begin_session(), 1);
        shared[0].set_portal_group(Some(tpgt0));
        shared[0].set_state(PathState::Down, "test: failed with writes");
        let (mut gone, _) = old.session.into_parts();
        gone.close();
        let lu_id = p1.lu_id.clone();
        let mut w1 = Worker::new(WorkerSetup {
            shared: shared[1].clone(),
            control: Arc::new(ArrayQueue::new(8)),
            stop: Arc::new(AtomicBool::new(false)),
            connector: connector(portals[1], hold_path1.clone()),
            probe: probe_config(1, None),
            lu_id,
            health: PathHealth::new(ReconnectPolicy::default()),
            session: Some(p1),
            idle: IdleMode::BusyPoll,
            fast_ping: None,
            abort: None,
            login_fence: true,
            lun_reset_fence: None,
            core: None,
            alua_epoch: Arc::new(AtomicU64::new(0)),
            alua_control: Arc::new(AluaControl::new(shared.clone())),
            fence: Some(board.clone()),
            peers: Arc::from(shared.clone()),
            mcs: None,
        });
        assert!(
            w1.probe.preempt_gate.is_some(),
            "the worker gates its logins"
        );
        board.post(FenceNeed {
            path: 0,
            epoch: 1,
            tpgt: tpgt0,
            login: probe_config(0, None).login,
            pr_key: Some(key(0)),
        });
        // Path 1 claims the preempt (no live path of portal 0's group is
        // left) and sends it; the bytes stay in its session.
        hold_path1.store(true, Ordering::Release);
        w1.round(Instant::now());
        assert!(w1.fence_preempt.is_some(), "PREEMPT AND ABORT in flight");
        // Path 0 logs in again, as its worker would (with the gate).
        let gate = PreemptGate {
            board: board.clone(),
            path: 0,
        };
        let relogin = std::thread::spawn(move || probe(&mut c0, &probe_config(0, Some(gate))));
        while !relogin.is_finished() && !board.holds_preempts(0) {
            std::thread::sleep(Duration::from_millis(1));
        }
        // The preempt reaches the target and is answered.
        hold_path1.store(false, Ordering::Release);
        let t0 = Instant::now();
        while w1.fence_preempt.is_some() {
            assert!(t0.elapsed() < Duration::from_secs(10), "preempt unanswered");
            w1.round(Instant::now());
        }
        assert!(shared[0].fenced_through() >= 1, "fenced by the preempt");
        let mut new = relogin
            .join()
            .expect("login thread")
            .expect("path 0 logs in again");
        board.release_preempts(0);
        assert_eq!(
            write_block(&mut new.session),
            Ok(()),
            "path 0's write after its new login (a RESERVATION CONFLICT: its new key was preempted)"
        );
        let _ = new.session.logout(Duration::from_millis(500));
        w1.shutdown();
        t.stop();
    }
}
