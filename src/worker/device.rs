//! The application-facing multipath device: open (log in every path, check
//! they reach the same LU), per-thread I/O queues, blocking helpers, stats.
//!
//! ```text
//! IoQueue (app thread) --SPSC Request ring--> path worker i --> iSCSI session i
//!          <--SPSC Response ring--
//! ```
//! Each `IoQueue` has one ring pair per path, so every ring has exactly one
//! producer and one consumer. The selector reads per-path atomics. Commands
//! that come back from a failed path are re-dispatched by their queue, so a
//! queue must be polled (`poll_completions`, or the blocking helpers) for
//! failover to make progress.

use super::path_worker::{Control, Request, Response, Worker, WorkerSetup};
use super::ring::{ring, Consumer, Producer};
use crate::multipath::config::DeviceConfig;
use crate::multipath::dispatch::{Action, DispatchConfig, Dispatcher, PathResponse, PathTable};
use crate::multipath::io::{build_command_for, LuCaps};
use crate::multipath::path::{PathHealth, PathShared, PathState};
use crate::multipath::probe::{probe, PathProbe, ProbeConfig};
use crate::multipath::{
    Io, IoCompletion, IoError, IoOp, MultipathError, PathLoad, PathStats, Policy, SelectorState,
};
use crate::scsi::caps::split;
use crate::scsi::Lun;
use crate::scsi::TransferLimits;
use crossbeam::queue::ArrayQueue;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Why `IoQueue::submit` did not take a request; the request comes back.
#[derive(Debug, Error)]
pub enum SubmitError {
    /// `queue_depth` I/Os are in flight: poll completions, then retry.
    #[error("queue full")]
    QueueFull(Io),
    /// The request is malformed (range, buffer size); nothing was sent.
    #[error("invalid request: {error}")]
    Invalid {
        /// What is wrong.
        error: IoError,
        /// The request, buffer included.
        io: Io,
    },
    /// The device is closed.
    #[error("device closed")]
    Closed(Io),
}

impl SubmitError {
    /// The request, to retry it or reuse its buffer.
    pub fn into_io(self) -> Io {
        match self {
            SubmitError::QueueFull(io)
            | SubmitError::Closed(io)
            | SubmitError::Invalid { io, .. } => io,
        }
    }
}

struct DeviceShared {
    paths: Vec<Arc<PathShared>>,
    controls: Vec<Arc<ArrayQueue<Control>>>,
    selector: SelectorState,
    dispatch: DispatchConfig,
    lun: u64,
    block_size: u32,
    capacity_blocks: u64,
    lu_id: String,
    /// What the LU supports and its Block Limits (from the first path up).
    caps: LuCaps,
    queue_depth: usize,
    closed: AtomicBool,
    next_queue_id: AtomicU32,
}

struct WorkerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A logical unit reached over several paths (sessions of their own, or the
/// connections of one MC/S session), each path driven by its own worker
/// thread: the device owns those threads, so it lives in worker/ and is named
/// for it. Applications know it as [`crate::Device`].
pub struct WorkerDevice {
    shared: Arc<DeviceShared>,
    workers: Vec<WorkerHandle>,
}

impl std::fmt::Debug for WorkerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerDevice")
            .field("lu", &self.shared.lu_id)
            .field("paths", &self.shared.paths.len())
            .field("policy", &self.shared.dispatch.policy)
            .finish_non_exhaustive()
    }
}

impl WorkerDevice {
    /// Logs in every path (in parallel), checks that all reach the same LU
    /// (VPD 83h designator) with the same geometry, and starts one worker
    /// per path. Paths that cannot log in now start Down and keep retrying
    /// in the background; at least one must come up.
    pub fn open(config: DeviceConfig) -> Result<WorkerDevice, MultipathError> {
        if config.paths.is_empty() {
            return Err(crate::multipath::ConfigError::NoPaths.into());
        }
        let lun = Lun::from_number(config.lun).to_u64();
        let opened = Instant::now();
        let mut setups = Vec::new();
        // MC/S: one I_T nexus for every path, so one reservation key.
        let pr_fence = config
            .reservation_fence
            .filter(|_| config.fence_writes && !config.mcs);
        let mcs = config
            .mcs
            .then(|| Arc::new(super::mcs::McsPaths::new(config.paths.len())));
        for (i, p) in config.paths.into_iter().enumerate() {
            let probe_cfg = ProbeConfig {
                name: p.name.clone(),
                login: p.login,
                lun,
                timers: config.timers,
                login_timeout: config.login_timeout,
                pr_key: pr_fence.map(|r| r.key_of(i)),
                preempt_gate: None,
            };
            setups.push((probe_cfg, p.connector));
        }
        // Log in all paths at once: a dead portal costs one timeout, not one each.
        // MC/S: one after the other, the leading login first.
        let probed: Vec<(ProbeConfig, _, Result<PathProbe, MultipathError>)> = match &mcs {
            Some(mcs) => super::mcs::login_all(mcs, setups)?,
            None => std::thread::scope(|s| {
                let handles: Vec<_> = setups
                    .into_iter()
                    .map(|(cfg, mut conn)| {
                        s.spawn(move || {
                            let r = probe(&mut conn, &cfg);
                            (cfg, conn, r)
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            }),
        };
        if probed.is_empty() {
            return Err(crate::multipath::ThreadError::LoginThreadsPanicked.into());
        }
        let reference = probed
            .iter()
            .find_map(|(cfg, _, r)| r.as_ref().ok().map(|p| (cfg.name.clone(), p)));
        let Some((ref_name, reference)) = reference else {
            return Err(MultipathError::NoPathUp(
                probed
                    .iter()
                    .filter_map(|(_, _, r)| r.as_ref().err().map(|e| e.to_string()))
                    .collect(),
            ));
        };
        let (lu_id, block_size, capacity_blocks, caps) = (
            reference.lu_id.clone(),
            reference.block_size,
            reference.capacity_blocks,
            reference.caps.clone(),
        );
        for (cfg, _, r) in &probed {
            if let Ok(p) = r {
                if p.lu_id != lu_id {
                    return Err(MultipathError::DifferentLogicalUnits {
                        first_path: ref_name,
                        expected: lu_id,
                        path: cfg.name.clone(),
                        found: p.lu_id.clone(),
                    });
                }
                if (p.block_size, p.capacity_blocks) != (block_size, capacity_blocks) {
                    return Err(MultipathError::GeometryMismatch {
                        path: cfg.name.clone(),
                        expected: format!("{capacity_blocks} blocks of {block_size}"),
                        found: format!("{} blocks of {}", p.capacity_blocks, p.block_size),
                    });
                }
            }
        }
        // Bumped by any path that learns of an ALUA change: the others then
        // re-read their state (a standby path gets no I/O, so it would not
        // hear the target's UNIT ATTENTION by itself).
        let alua_epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // Every path's shared state, so a worker can tell when no path is
        // active/optimized any more (explicit ALUA: SET TARGET PORT GROUPS).
        let all_paths: Vec<Arc<PathShared>> = (0..probed.len())
            .map(|i| Arc::new(PathShared::new(i, &probed[i].0.name, opened)))
            .collect();
        let alua_control = Arc::new(super::path_worker::AluaControl::new(all_paths.clone()));
        let mut paths = Vec::new();
        let mut controls = Vec::new();
        let mut workers = Vec::new();
        let mut starts = Vec::new();
        let fence = (config.fence_writes
            && (config.mcs
                || config.fence_via_other_portals
                || pr_fence.is_some()
                || config.lun_reset_fence.is_some()))
        .then(|| Arc::new(crate::multipath::fence::FenceBoard::new()));
        let peers: Arc<[Arc<PathShared>]> = all_paths.clone().into();
        for (i, (cfg, connector, r)) in probed.into_iter().enumerate() {
            let shared = all_paths[i].clone();
            let control = Arc::new(ArrayQueue::new(64));
            let stop = Arc::new(AtomicBool::new(false));
            let session = match r {
                Ok(p) => {
                    // Up before open() returns, so the first I/O can use it.
                    shared.set_tpg(p.target_port_group);
                    shared.set_alua(p.alua);
                    let o = p.session.outcome();
                    shared.set_nexus(crate::multipath::Nexus {
                        isid: o.isid,
                        tsih: o.tsih,
                        cid: o.cid,
                    });
                    let how = match &p.redirected_to {
                        Some(at) => format!("logged in at {at}"),
                        None => "logged in".to_string(),
                    };
                    shared.set_state(PathState::Up, &how);
                    Some(p)
                }
                Err(e) => {
                    shared.set_state(PathState::Down, &e.to_string());
                    None
                }
            };
            paths.push(shared.clone());
            controls.push(control.clone());
            let health =
                PathHealth::new(config.reconnect).with_damping(config.flap_damping, &cfg.name);
            starts.push(WorkerSetup {
                shared,
                control,
                stop: stop.clone(),
                connector,
                probe: cfg,
                lu_id: lu_id.clone(),
                health,
                session,
                idle: config.idle,
                fast_ping: config.fast_ping,
                abort: config.abort_overdue,
                // MC/S: a login with the session's ISID would end every
                // connection; a failed one is fenced by a Logout instead.
                login_fence: config.fence_via_other_portals && !config.mcs,
                mcs: mcs.clone(),
                lun_reset_fence: config.lun_reset_fence,
                core: (!config.cores.is_empty()).then(|| config.cores[i % config.cores.len()]),
                alua_epoch: alua_epoch.clone(),
                alua_control: alua_control.clone(),
                fence: fence.clone(),
                peers: peers.clone(),
            });
            workers.push(WorkerHandle { stop, thread: None });
        }
        for (i, setup) in starts.into_iter().enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("mp-worker-{i}"))
                .spawn(move || Worker::new(setup).run())
                .map_err(|e| crate::multipath::ThreadError::Spawn {
                    name: format!("mp-worker-{i}"),
                    error: e.into(),
                })?;
            workers[i].thread = Some(t);
        }
        Ok(WorkerDevice {
            shared: Arc::new(DeviceShared {
                paths,
                controls,
                selector: SelectorState::with_failback(config.failback),
                dispatch: DispatchConfig {
                    policy: config.policy,
                    no_path_timeout: config.no_path_timeout,
                    max_retries: config.max_retries,
                    fence_writes: config.fence_writes,
                    fence_timeout: config.fence_timeout,
                },
                lun,
                block_size,
                capacity_blocks,
                lu_id,
                caps,
                queue_depth: config.queue_depth.clamp(1, 1 << 16),
                closed: AtomicBool::new(false),
                next_queue_id: AtomicU32::new(0),
            }),
            workers,
        })
    }

    /// A new I/O queue for one application thread (`queue_depth` slots).
    pub fn queue_pair(&self) -> IoQueue {
        let d = &self.shared;
        let id = d.next_queue_id.fetch_add(1, Ordering::Relaxed);
        let depth = d.queue_depth;
        let mut subs = Vec::new();
        let mut comps = Vec::new();
        for (i, control) in d.controls.iter().enumerate() {
            let (sub_p, sub_c) = ring::<Request>(depth);
            let (comp_p, comp_c) = ring::<Response>(depth);
            subs.push(sub_p);
            comps.push(comp_c);
            let mut msg = Control::AddQueue {
                id,
                depth,
                sub: sub_c,
                comp: comp_p,
            };
            // Workers drain controls every round; wait for room if needed.
            while let Err(back) = control.push(msg) {
                msg = back;
                std::thread::yield_now();
            }
            if let Some(wake) = d.paths.get(i).and_then(|p| p.wake.as_ref()) {
                wake.notify();
            }
        }
        IoQueue {
            dev: d.clone(),
            id,
            subs,
            comps,
            dispatcher: Dispatcher::new(depth, d.dispatch, id as usize),
            blocking: vec![false; depth],
            ready: Vec::with_capacity(depth),
            blocking_done: None,
            spare: Vec::new(),
        }
    }

    /// Capacity in blocks.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity_blocks
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.shared.capacity_blocks * u64::from(self.shared.block_size)
    }

    /// Logical block size in bytes (512 or 4096 typically).
    pub fn block_size(&self) -> u32 {
        self.shared.block_size
    }

    /// The LU's Block Limits (VPD B0h) as the device honours them.
    pub fn limits(&self) -> TransferLimits {
        self.shared.caps.limits
    }

    /// What the LU supports (REPORT SUPPORTED OPERATION CODES) and its limits.
    pub fn caps(&self) -> &LuCaps {
        &self.shared.caps
    }

    /// The LU's VPD 83h identity, e.g. `naa.60000000...`.
    pub fn lu_id(&self) -> &str {
        &self.shared.lu_id
    }

    /// The path selection policy.
    pub fn policy(&self) -> Policy {
        self.shared.dispatch.policy
    }

    /// Under `Policy::Failover`: return to the preferred path (the first
    /// usable one in configuration order) now. This is the only way back
    /// with `Failback::Manual` (the default); with the other modes it is
    /// done by itself.
    pub fn failback(&self) {
        self.shared.selector.fail_back();
    }

    /// A snapshot of every path: state, ALUA, counters, latency percentiles
    /// (merged from the workers every ~20 ms), state changes.
    pub fn paths(&self) -> Vec<PathStats> {
        self.shared.paths.iter().map(|p| p.stats()).collect()
    }

    /// The live per-path state (what [`paths`](Self::paths) snapshots), for
    /// exporters that read it on their own schedule, such as
    /// [`crate::metrics`].
    pub fn path_handles(&self) -> Vec<Arc<PathShared>> {
        self.shared.paths.clone()
    }

    /// Runs one SCSI command of the device's own on path `path`'s session
    /// (for [`super::reservations`]): `Ok(None)` when the path is not up or
    /// failed before the target answered, `Err(())` when it did not answer
    /// within `timeout`.
    pub(crate) fn path_command(
        &self,
        path: usize,
        cdb: &crate::scsi::ScsiCommand,
        direction: crate::iscsi::connection::Direction,
        buffer: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<crate::iscsi::connection::Completion>, ()> {
        let (Some(control), Some(p)) =
            (self.shared.controls.get(path), self.shared.paths.get(path))
        else {
            return Ok(None);
        };
        if self.shared.closed.load(Ordering::Acquire) || p.state() != PathState::Up {
            return Ok(None);
        }
        let Ok(cmd) = crate::iscsi::connection::Command::new(
            self.shared.lun,
            cdb.cdb_bytes(),
            direction,
            buffer,
        ) else {
            return Ok(None);
        };
        let (reply, answer) = std::sync::mpsc::channel();
        if control.push(Control::Scsi { cmd, reply }).is_err() {
            return Ok(None);
        }
        if let Some(wake) = &p.wake {
            wake.notify();
        }
        match answer.recv_timeout(timeout) {
            Ok(c) => Ok(Some(c)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(()),
        }
    }

    /// Stops the workers (logging out). In-flight I/O completes with
    /// `IoError::Closed` in its queue.
    pub fn close(mut self) {
        self.stop_workers();
    }

    fn stop_workers(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        for w in &self.workers {
            w.stop.store(true, Ordering::Release);
        }
        for p in &self.shared.paths {
            if let Some(wake) = &p.wake {
                wake.notify();
            }
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for WorkerDevice {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// One application thread's submission/completion queue. Not `Sync`: give
/// each thread its own (`WorkerDevice::queue_pair`).
///
/// The slots, path choice, retries and failover are the sans-IO
/// [`Dispatcher`]'s; the queue owns the rings and the clock and carries out
/// what the dispatcher asks for.
pub struct IoQueue {
    dev: Arc<DeviceShared>,
    id: u32,
    subs: Vec<Producer<Request>>,
    comps: Vec<Consumer<Response>>,
    dispatcher: Dispatcher,
    /// Per slot: a blocking helper waits for it.
    blocking: Vec<bool>,
    /// Completions met while a blocking call waited for its own.
    ready: Vec<IoCompletion>,
    blocking_done: Option<IoCompletion>,
    spare: Vec<u8>,
}

impl std::fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("id", &self.id)
            .field("in_flight", &self.dispatcher.in_flight())
            .finish_non_exhaustive()
    }
}

/// The device's paths as the dispatcher sees them: the per-path atomics.
impl PathTable for DeviceShared {
    fn count(&self) -> usize {
        self.paths.len()
    }
    fn usable_tier(&self, path: usize) -> Option<u8> {
        self.paths[path].usable_tier()
    }
    fn load(&self, path: usize) -> PathLoad {
        self.paths[path].load()
    }
    fn fenced_through(&self, path: usize) -> u64 {
        self.paths[path].fenced_through()
    }
    fn selector(&self) -> &SelectorState {
        &self.selector
    }
}

impl IoQueue {
    /// I/Os submitted and not yet returned by `poll_completions`.
    pub fn in_flight(&self) -> usize {
        self.dispatcher.in_flight()
    }

    /// Most I/Os this queue takes at once (`queue_depth`).
    pub fn depth(&self) -> usize {
        self.dispatcher.depth()
    }

    /// The device's logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.dev.block_size
    }

    /// Queues an I/O. Never blocks; `QueueFull` when `queue_depth` I/Os are
    /// in flight. Without a usable path the I/O waits (up to
    /// `no_path_timeout`) inside the queue.
    pub fn submit(&mut self, io: Io) -> Result<(), SubmitError> {
        self.submit_inner(io, false)
    }

    fn submit_inner(&mut self, mut io: Io, blocking: bool) -> Result<(), SubmitError> {
        if self.dev.closed.load(Ordering::Acquire) {
            return Err(SubmitError::Closed(io));
        }
        if !self.dispatcher.has_room() {
            return Err(SubmitError::QueueFull(io));
        }
        let d = &self.dev;
        let cmd = match build_command_for(&mut io, d.lun, d.block_size, d.capacity_blocks, &d.caps)
        {
            Ok(c) => c,
            Err(error) => return Err(SubmitError::Invalid { error, io }),
        };
        let now = Instant::now();
        match self.dispatcher.submit(now, io.op, io.user_tag, cmd) {
            Ok(slot) => self.blocking[slot as usize] = blocking,
            Err(cmd) => {
                io.buffer = cmd.buffer;
                return Err(SubmitError::QueueFull(io));
            }
        }
        let mut ready = std::mem::take(&mut self.ready);
        self.run_actions(now, &mut ready);
        self.ready = ready;
        Ok(())
    }

    /// Carries out what the dispatcher asks for: sends on the rings,
    /// completions into `out` (or to the blocking call waiting for one).
    fn run_actions(&mut self, now: Instant, out: &mut Vec<IoCompletion>) {
        while let Some(action) = self.dispatcher.poll_action(now, &*self.dev) {
            match action {
                Action::Send {
                    path,
                    slot,
                    cmd,
                    aborts,
                } => {
                    let bytes = cmd.buffer.len() as u64;
                    let req = Request {
                        slot,
                        cmd,
                        dispatched_at: now,
                        aborts,
                    };
                    match self.subs[path].push(req) {
                        Ok(()) => {
                            // After the push, so a worker woken up finds it.
                            if let Some(wake) = &self.dev.paths[path].wake {
                                wake.notify();
                            }
                            self.dev.paths[path].add_outstanding(bytes);
                        }
                        Err(req) => self.dispatcher.send_refused(now, slot, req.cmd),
                    }
                }
                Action::Complete { slot, completion } => {
                    if std::mem::take(&mut self.blocking[slot as usize]) {
                        self.blocking_done = Some(completion);
                    } else {
                        out.push(completion);
                    }
                }
            }
        }
    }

    /// Moves finished I/Os into `out` (appending); returns how many. Also
    /// re-dispatches I/Os coming back from failed paths and retries.
    pub fn poll_completions(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let before = out.len();
        out.append(&mut self.ready);
        self.pump(out);
        out.len() - before
    }

    /// Like `poll_completions`, but waits (spinning, then yielding) until
    /// at least `min` completions are there or `timeout` passes.
    pub fn wait_completions(
        &mut self,
        out: &mut Vec<IoCompletion>,
        min: usize,
        timeout: Duration,
    ) -> usize {
        let deadline = Instant::now() + timeout;
        let mut got = 0;
        let mut rounds = 0u32;
        loop {
            got += self.poll_completions(out);
            if got >= min || self.in_flight() == 0 || Instant::now() >= deadline {
                return got;
            }
            rounds += 1;
            if rounds < 256 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn pump(&mut self, out: &mut Vec<IoCompletion>) {
        let now = Instant::now();
        if self.dev.closed.load(Ordering::Acquire) {
            self.dispatcher.close();
        }
        for i in 0..self.comps.len() {
            while let Some(r) = self.comps[i].pop() {
                let (slot, response) = match r {
                    Response::Done { slot, completion } => (slot, PathResponse::Done(completion)),
                    Response::Bounced {
                        slot,
                        cmd,
                        sent_in_session,
                        sent_on,
                    } => (
                        slot,
                        PathResponse::Bounced {
                            cmd,
                            sent_in_session,
                            sent_on,
                        },
                    ),
                    Response::Lost { slot, reason } => (slot, PathResponse::Lost(reason)),
                    Response::Aborted { slot, cmd } => (slot, PathResponse::Aborted { cmd }),
                    Response::StrayPreempt { slot, cmd } => {
                        (slot, PathResponse::StrayPreempt { cmd })
                    }
                };
                // Workers answer only what this queue handed them, once per
                // dispatch (queue ids are distinct): anything else is a
                // worker bug, reported and ignored.
                match self.dispatcher.handle_response(now, i, slot, response) {
                    Ok(bytes) => self.dev.paths[i].sub_outstanding(bytes),
                    Err(e) => {
                        debug_assert!(false, "queue {}: {e}", self.id);
                        log::error!("queue {}: {e}", self.id);
                    }
                }
                self.run_actions(now, out);
            }
        }
        if self.dispatcher.has_waiting() {
            self.dispatcher.handle_timeout(now, &*self.dev);
        }
        self.run_actions(now, out);
    }

    /// Runs one I/O to completion; other I/Os finishing meanwhile are kept
    /// for the next `poll_completions`.
    fn run_blocking(&mut self, mut io: Io) -> IoCompletion {
        let mut rounds = 0u32;
        loop {
            match self.submit_inner(io, true) {
                Ok(()) => break,
                Err(SubmitError::QueueFull(back)) => {
                    io = back;
                    self.pump_ready();
                    backoff(&mut rounds);
                }
                Err(e) => {
                    let (error, io) = match e {
                        SubmitError::Invalid { error, io } => (error, io),
                        SubmitError::Closed(io) | SubmitError::QueueFull(io) => {
                            (IoError::Closed, io)
                        }
                    };
                    return IoCompletion {
                        user_tag: io.user_tag,
                        op: io.op,
                        result: Err(error),
                        latency: Duration::ZERO,
                        path: None,
                        retries: 0,
                        buffer: io.buffer,
                    };
                }
            }
        }
        rounds = 0;
        loop {
            self.pump_ready();
            if let Some(c) = self.blocking_done.take() {
                return c;
            }
            backoff(&mut rounds);
        }
    }

    fn pump_ready(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        self.pump(&mut ready);
        self.ready = ready;
    }

    /// What the LU supports and its Block Limits.
    pub fn caps(&self) -> &LuCaps {
        &self.dev.caps
    }

    /// Reads `buf.len()` bytes (a multiple of the block size) at block
    /// `lba`, in pieces of at most the LU's MAXIMUM TRANSFER LENGTH.
    pub fn read_at(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let blocks = self.blocks_for(IoOp::Read, buf.len())?;
        let bs = self.dev.block_size as usize;
        let chunk = self.dev.caps.limits.io_chunk_blocks();
        for (at, n) in split(lba, blocks.into(), chunk) {
            let from = (at - lba) as usize * bs;
            let dst = &mut buf[from..from + n as usize * bs];
            let spare = std::mem::take(&mut self.spare);
            let c = self.run_blocking(Io::read(at, n, spare, 0));
            if c.result.is_ok() && c.buffer.len() >= dst.len() {
                dst.copy_from_slice(&c.buffer[..dst.len()]);
            }
            self.spare = c.buffer;
            c.result?;
        }
        Ok(())
    }

    /// UNMAP of `blocks` blocks at `lba`, in as many UNMAP commands as the
    /// LU's MAXIMUM UNMAP LBA COUNT needs.
    pub fn unmap_at(&mut self, lba: u64, blocks: u64) -> Result<(), IoError> {
        let chunk = self.dev.caps.limits.unmap_chunk_blocks();
        for (at, n) in split(lba, blocks, chunk) {
            let spare = std::mem::take(&mut self.spare);
            let c = self.run_blocking(Io::unmap(at, n, spare, 0));
            self.spare = c.buffer;
            c.result?;
        }
        Ok(())
    }

    /// WRITE SAME of `block` (one block) to `blocks` blocks at `lba`, split
    /// at the LU's MAXIMUM WRITE SAME LENGTH (and WRITE SAME(10)'s 16 bits
    /// where the LU has only that).
    pub fn write_same_at(&mut self, lba: u64, blocks: u64, block: &[u8]) -> Result<(), IoError> {
        let caps = &self.dev.caps;
        let mut chunk = caps.limits.write_same_chunk_blocks();
        if !caps.commands.supports(crate::scsi::Feature::WriteSame16) {
            chunk = chunk.min(u32::from(u16::MAX));
        }
        for (at, n) in split(lba, blocks, chunk) {
            let mut spare = std::mem::take(&mut self.spare);
            spare.clear();
            spare.extend_from_slice(block);
            let c = self.run_blocking(Io::write_same(at, n, spare, 0));
            self.spare = c.buffer;
            c.result?;
        }
        Ok(())
    }

    /// Writes `data` (a multiple of the block size) at block `lba`; returns
    /// once the target has confirmed it.
    pub fn write_at(&mut self, lba: u64, data: &[u8]) -> Result<(), IoError> {
        self.write_at_durable(lba, data, false)
    }

    /// As [`write_at`](Self::write_at); with `durable` the WRITE carries
    /// FUA, so the data is on stable media when this returns (no
    /// SYNCHRONIZE CACHE of the whole LU needed).
    pub fn write_at_durable(
        &mut self,
        lba: u64,
        data: &[u8],
        durable: bool,
    ) -> Result<(), IoError> {
        let blocks = self.blocks_for(IoOp::Write, data.len())?;
        let bs = self.dev.block_size as usize;
        let chunk = self.dev.caps.limits.io_chunk_blocks();
        for (at, n) in split(lba, blocks.into(), chunk) {
            let from = (at - lba) as usize * bs;
            let mut spare = std::mem::take(&mut self.spare);
            spare.clear();
            spare.extend_from_slice(&data[from..from + n as usize * bs]);
            let c = self.run_blocking(Io::write_durable(at, n, spare, durable, 0));
            self.spare = c.buffer;
            c.result?;
        }
        Ok(())
    }

    /// SYNCHRONIZE CACHE for the whole LU.
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.run_blocking(Io::flush(0)).result
    }

    fn blocks_for(&self, op: IoOp, len: usize) -> Result<u32, IoError> {
        let bs = self.dev.block_size as usize;
        if !len.is_multiple_of(bs) || u32::try_from(len / bs).is_err() {
            return Err(IoError::BadBuffer {
                op,
                expected: len.div_ceil(bs) * bs,
                got: len,
            });
        }
        Ok((len / bs) as u32)
    }
}

fn backoff(rounds: &mut u32) {
    *rounds = rounds.saturating_add(1);
    if *rounds < 256 {
        std::hint::spin_loop();
    } else if *rounds < 4096 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        // What the workers still hold for us will never be collected: take
        // it off the paths' load figures, and tell the workers.
        for (p, bytes) in self.dispatcher.on_paths() {
            self.dev.paths[p].sub_outstanding(bytes);
        }
        for c in &self.dev.controls {
            let mut msg = Control::RemoveQueue { id: self.id };
            for _ in 0..1000 {
                match c.push(msg) {
                    Ok(()) => break,
                    Err(back) => {
                        msg = back;
                        std::thread::yield_now();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The queue's dispatch / failover / retry logic against fake workers
    //! (the tests play the workers' side of the rings).
    use super::*;
    use crate::iscsi::connection::{CommandEcho, Completion};

    struct FakeWorker {
        sub: Consumer<Request>,
        comp: Producer<Response>,
    }

    fn device(n: usize) -> (WorkerDevice, Vec<Arc<ArrayQueue<Control>>>) {
        let opened = Instant::now();
        let paths: Vec<_> = (0..n)
            .map(|i| {
                let p = Arc::new(PathShared::new(i, &format!("p{i}"), opened));
                p.set_state(PathState::Up, "test");
                assert_eq!(p.begin_session(), 1);
                p
            })
            .collect();
        let controls: Vec<_> = (0..n).map(|_| Arc::new(ArrayQueue::new(8))).collect();
        let dev = WorkerDevice {
            shared: Arc::new(DeviceShared {
                paths,
                controls: controls.clone(),
                selector: SelectorState::new(),
                dispatch: DispatchConfig {
                    policy: Policy::QueueDepth,
                    no_path_timeout: Duration::from_millis(50),
                    max_retries: 3,
                    fence_writes: true,
                    fence_timeout: Duration::from_millis(200),
                },
                lun: 0,
                block_size: 512,
                capacity_blocks: 1000,
                lu_id: "naa.test".into(),
                caps: LuCaps::default(),
                queue_depth: 8,
                closed: AtomicBool::new(false),
                next_queue_id: AtomicU32::new(0),
            }),
            workers: Vec::new(),
        };
        (dev, controls)
    }

    fn workers(controls: &[Arc<ArrayQueue<Control>>]) -> Vec<FakeWorker> {
        controls
            .iter()
            .map(|c| match c.pop() {
                Some(Control::AddQueue { sub, comp, .. }) => FakeWorker { sub, comp },
                _ => panic!("no queue registered"),
            })
            .collect()
    }

    fn done(req: Request, status: u8) -> Response {
        let c = req.cmd;
        Response::Done {
            slot: req.slot,
            completion: Completion {
                user_tag: c.user_tag,
                response: 0,
                status,
                sense: Vec::new(),
                residual: 0,
                transferred: c.buffer.len(),
                command: CommandEcho {
                    lun: c.lun,
                    cdb: c.cdb,
                    cdb_len: c.cdb_len,
                    direction: c.direction,
                },
                buffer: c.buffer,
            },
        }
    }

    #[test]
    fn queue_depth_spreads_and_completes() {
        let (dev, controls) = device(2);
        let mut q = dev.queue_pair();
        let mut w = workers(&controls);
        for t in 0..4 {
            q.submit(Io::read(t, 1, Vec::new(), t)).unwrap();
        }
        assert_eq!(dev.paths()[0].outstanding, 2);
        assert_eq!(dev.paths()[1].outstanding, 2);
        for fw in &mut w {
            while let Some(r) = fw.sub.pop() {
                assert!(fw.comp.push(done(r, 0)).is_ok());
            }
        }
        let mut out = Vec::new();
        assert_eq!(q.poll_completions(&mut out), 4);
        assert!(out
            .iter()
            .all(|c| c.result.is_ok() && c.buffer.len() == 512));
        let mut tags: Vec<_> = out.iter().map(|c| c.user_tag).collect();
        tags.sort();
        assert_eq!(tags, vec![0, 1, 2, 3]);
        assert_eq!(q.in_flight(), 0);
        assert!(dev
            .paths()
            .iter()
            .all(|p| p.outstanding == 0 && p.outstanding_bytes == 0));
    }

    #[test]
    fn queue_full_gives_the_request_back() {
        let (dev, _controls) = device(1);
        let mut q = dev.queue_pair();
        match q.submit(Io::read(999, 2, Vec::new(), 1)) {
            Err(SubmitError::Invalid { error, .. }) => {
                assert!(matches!(error, IoError::OutOfRange { .. }))
            }
            other => panic!("{other:?}"),
        }
        for t in 0..8 {
            q.submit(Io::read(t, 1, Vec::new(), t)).unwrap();
        }
        match q.submit(Io::write(0, 1, vec![9; 512], 99)) {
            Err(SubmitError::QueueFull(io)) => assert_eq!(io.buffer, vec![9; 512]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bounced_write_is_resubmitted_on_the_other_path_once_fenced_and_completes_only_there() {
        let (dev, controls) = device(2);
        let mut q = dev.queue_pair();
        let mut w = workers(&controls);
        let data = vec![0xab; 1024];
        q.submit(Io::write(10, 2, data.clone(), 42)).unwrap();
        let (first, other) = if dev.paths()[0].outstanding == 1 {
            (0, 1)
        } else {
            (1, 0)
        };
        let req = w[first].sub.pop().unwrap();
        // The path dies with the write in flight: the worker marks it Down
        // and hands the command back.
        dev.shared.paths[first].set_state(PathState::Down, "link down");
        assert!(w[first]
            .comp
            .push(Response::Bounced {
                slot: req.slot,
                cmd: req.cmd,
                sent_in_session: Some(1),
                sent_on: None,
            })
            .is_ok());
        let mut out = Vec::new();
        assert_eq!(q.poll_completions(&mut out), 0, "not acknowledged yet");
        assert!(
            w[other].sub.pop().is_none(),
            "not retried before the old path is fenced"
        );
        // The old path's worker logs in again (same ISID): fenced.
        assert_eq!(dev.shared.paths[first].begin_session(), 2);
        assert_eq!(q.poll_completions(&mut out), 0, "not acknowledged yet");
        let again = w[other].sub.pop().expect("resubmitted on the other path");
        assert_eq!(again.cmd.buffer, data, "same data");
        assert!(w[other].comp.push(done(again, 0)).is_ok());
        assert_eq!(q.poll_completions(&mut out), 1);
        assert!(out[0].result.is_ok());
        assert_eq!(
            (out[0].user_tag, out[0].path, out[0].retries),
            (42, Some(other), 1)
        );
        assert!(dev.paths().iter().all(|p| p.outstanding == 0));
    }

    #[test]
    fn no_path_waits_then_fails_and_a_returning_path_rescues() {
        let (dev, controls) = device(1);
        let mut q = dev.queue_pair();
        let mut w = workers(&controls);
        dev.shared.paths[0].set_state(PathState::Down, "down");
        q.submit(Io::read(0, 1, Vec::new(), 1)).unwrap();
        q.submit(Io::read(1, 1, Vec::new(), 2)).unwrap();
        let mut out = Vec::new();
        assert_eq!(q.poll_completions(&mut out), 0);
        // The path comes back within no_path_timeout: both go out.
        dev.shared.paths[0].set_state(PathState::Up, "back");
        assert_eq!(q.poll_completions(&mut out), 0);
        let r1 = w[0].sub.pop().unwrap();
        let r2 = w[0].sub.pop().unwrap();
        assert!(w[0].comp.push(done(r1, 0)).is_ok());
        dev.shared.paths[0].set_state(PathState::Down, "down again");
        assert!(w[0]
            .comp
            .push(Response::Bounced {
                slot: r2.slot,
                cmd: r2.cmd,
                sent_in_session: Some(1),
                sent_on: None,
            })
            .is_ok());
        assert_eq!(q.poll_completions(&mut out), 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(q.poll_completions(&mut out), 1);
        assert!(matches!(out[1].result, Err(IoError::NoPath { .. })));
        assert_eq!(out[1].buffer.len(), 512, "buffer comes back");
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn busy_is_retried_and_retries_run_out() {
        let (dev, controls) = device(1);
        let mut q = dev.queue_pair();
        let mut w = workers(&controls);
        q.submit(Io::read(0, 1, Vec::new(), 5)).unwrap();
        let mut out = Vec::new();
        for round in 0..4 {
            let mut req = None;
            for _ in 0..200 {
                q.poll_completions(&mut out);
                req = w[0].sub.pop();
                if req.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let req = req.unwrap_or_else(|| panic!("retry {round} not dispatched"));
            assert!(w[0].comp.push(done(req, 0x08)).is_ok());
        }
        q.poll_completions(&mut out);
        assert_eq!(out.len(), 1);
        assert!(
            matches!(
                out[0].result,
                Err(IoError::RetriesExhausted { retries: 3, .. })
            ),
            "{:?}",
            out[0].result
        );
    }

    #[test]
    fn path_bounces_do_not_use_up_status_retries() {
        let (dev, controls) = device(1);
        let mut q = dev.queue_pair();
        let mut w = workers(&controls);
        q.submit(Io::read(0, 1, Vec::new(), 5)).unwrap();
        let mut out = Vec::new();
        let next =
            |q: &mut IoQueue, out: &mut Vec<IoCompletion>, w: &mut Vec<FakeWorker>, round: u32| {
                for _ in 0..200 {
                    q.poll_completions(out);
                    if let Some(r) = w[0].sub.pop() {
                        return r;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                panic!("round {round} not dispatched")
            };
        // More path bounces than max_retries (3)...
        for round in 0..5 {
            let req = next(&mut q, &mut out, &mut w, round);
            assert!(w[0]
                .comp
                .push(Response::Bounced {
                    slot: req.slot,
                    cmd: req.cmd,
                    sent_in_session: Some(1),
                    sent_on: None,
                })
                .is_ok());
        }
        // ...then one BUSY: still retried, then it succeeds.
        let req = next(&mut q, &mut out, &mut w, 5);
        assert!(w[0].comp.push(done(req, 0x08)).is_ok());
        let req = next(&mut q, &mut out, &mut w, 6);
        assert!(w[0].comp.push(done(req, 0x00)).is_ok());
        q.poll_completions(&mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].result.is_ok(), "{:?}", out[0].result);
        assert_eq!(out[0].retries, 6);
    }

    #[test]
    fn alua_optimized_paths_first() {
        let (dev, controls) = device(2);
        let mut q = dev.queue_pair();
        let mut w = workers(&controls);
        dev.shared.paths[0].set_alua(Some(crate::scsi::AluaState::ActiveNonOptimized));
        for t in 0..4 {
            q.submit(Io::read(t, 1, Vec::new(), t)).unwrap();
        }
        assert_eq!(dev.paths()[1].outstanding, 4);
        dev.shared.paths[1].set_alua(Some(crate::scsi::AluaState::Standby));
        q.submit(Io::read(9, 1, Vec::new(), 9)).unwrap();
        assert_eq!(
            dev.paths()[0].outstanding,
            1,
            "non-optimized when nothing better"
        );
        drop(w.pop());
    }
}
