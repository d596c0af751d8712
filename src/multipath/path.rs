//! Per-path shared state (atomics read by selectors on every submission),
//! the path state machine with reconnect back-off, and statistics snapshots.

use crate::scsi::AluaState;
use crossbeam::utils::CachePadded;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Where a path is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum PathState {
    /// Logging in (first time or after a failure).
    Connecting,
    /// Logged in and carrying I/O.
    Up,
    /// Failed; waiting for the next reconnect attempt.
    Down,
    /// Will not be retried (e.g. it leads to a different logical unit).
    Failed,
    /// The device was closed.
    Closed,
}

impl PathState {
    fn to_u8(self) -> u8 {
        self as u8
    }
    fn from_u8(v: u8) -> PathState {
        match v {
            0 => PathState::Connecting,
            1 => PathState::Up,
            2 => PathState::Down,
            3 => PathState::Failed,
            _ => PathState::Closed,
        }
    }
}

impl std::fmt::Display for PathState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathState::Connecting => "connecting",
            PathState::Up => "up",
            PathState::Down => "down",
            PathState::Failed => "failed",
            PathState::Closed => "closed",
        })
    }
}

const ALUA_UNKNOWN: u8 = 0xff;
/// No TargetPortalGroupTag known (outside `u16`).
const NO_TPGT: u32 = u32::MAX;

/// Which ALUA tier a path belongs to; lower is preferred. `None`: unusable.
pub fn alua_tier(state: Option<AluaState>) -> Option<u8> {
    match state {
        // No ALUA information (target without TPGS): treat as optimized.
        None | Some(AluaState::ActiveOptimized) => Some(0),
        Some(AluaState::ActiveNonOptimized) | Some(AluaState::LbaDependent) => Some(1),
        Some(_) => None,
    }
}

/// A state change, for the stats snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathEvent {
    /// Wall-clock time of the change.
    pub at: SystemTime,
    /// Time since the device was opened.
    pub since_open: Duration,
    /// The state the path entered.
    pub state: PathState,
    /// Why, e.g. `"logged in"`, `"reconnecting"` or the error that took the
    /// path down.
    pub reason: String,
}

/// Counters the submitters write (hot, contended between app threads).
#[derive(Debug, Default)]
struct Load {
    outstanding: AtomicU64,
    outstanding_bytes: AtomicU64,
}

/// Counters the path's worker writes (single writer).
#[derive(Debug, Default)]
struct WorkerCounters {
    latency_ewma_ns: AtomicU64,
    /// Historical service time (see [`service_time_update`]), ns.
    service_ewma_ns: AtomicU64,
    /// When the newest command finished: ns since `opened`, 0 = never.
    last_finish_ns: AtomicU64,
    /// When the worker last looked before it saw that command (ns since
    /// `opened`): the command finished after this.
    last_looked_ns: AtomicU64,
    /// Historical latency (see [`PathShared::record_completion_seen`]), ns.
    hst_latency_ns: AtomicU64,
    /// The newest command's latency sample (bounded like the above), ns.
    newest_latency_ns: AtomicU64,
    /// The latency tail (see [`tail_update`]), ns.
    tail_latency_ns: AtomicU64,
    /// Completions since the estimates were last replaced after an idle
    /// spell (see [`HST_FRESH_CAP`]).
    fresh_samples: AtomicU32,
    commands: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    resubmitted: AtomicU64,
    reassigned: AtomicU64,
    reassign_fallbacks: AtomicU64,
    logins: AtomicU64,
    async_events: AtomicU64,
}

/// State of one path shared between its worker, the submitters and the
/// stats reader. Everything on the submission path is a plain atomic.
#[derive(Debug)]
pub struct PathShared {
    /// The path's position in [`DeviceConfig::paths`](super::DeviceConfig::paths);
    /// selectors and completions name paths by it.
    pub index: usize,
    /// The path's name, from [`PathConfig::name`](super::PathConfig::name).
    pub name: String,
    opened: Instant,
    state: CachePadded<AtomicU8>,
    alua: AtomicU8,
    tpg: Mutex<Option<u16>>,
    load: CachePadded<Load>,
    counters: CachePadded<WorkerCounters>,
    events: Mutex<Vec<PathEvent>>,
    /// The I_T nexus of the current (or last) session.
    nexus: Mutex<Option<Nexus>>,
    /// Latencies in microseconds, merged in by the worker now and then.
    histogram: Mutex<hdrhistogram::Histogram<u64>>,
    /// Sessions logged in so far (see [`PathShared::begin_session`]).
    sessions: AtomicU64,
    /// The newest session epoch known ended (see [`PathShared::fenced_through`]).
    fenced: AtomicU64,
    /// The TargetPortalGroupTag of the newest session (`NO_TPGT`: none).
    portal_group: AtomicU32,
    /// Wakes the worker blocked in `IdleMode::Block` when work is queued
    /// (None if no eventfd could be made: the worker then only naps).
    pub wake: Option<crate::transport::Wake>,
}

/// A new latency histogram: 1 µs .. 100 s, 3 significant digits.
pub fn new_histogram() -> hdrhistogram::Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    #[allow(clippy::expect_used)]
    hdrhistogram::Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Keeps at most this many state changes per path (the newest ones).
const MAX_EVENTS: usize = 256;

impl PathShared {
    /// A path in state [`PathState::Connecting`] with no ALUA state, target
    /// port group or counters yet; `opened` is the device's open time, the
    /// origin of [`PathEvent::since_open`].
    pub fn new(index: usize, name: &str, opened: Instant) -> PathShared {
        PathShared {
            index,
            name: name.to_string(),
            opened,
            state: CachePadded::new(AtomicU8::new(PathState::Connecting.to_u8())),
            alua: AtomicU8::new(ALUA_UNKNOWN),
            tpg: Mutex::new(None),
            load: CachePadded::new(Load::default()),
            counters: CachePadded::new(WorkerCounters::default()),
            events: Mutex::new(Vec::new()),
            nexus: Mutex::new(None),
            histogram: Mutex::new(new_histogram()),
            sessions: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            portal_group: AtomicU32::new(NO_TPGT),
            wake: crate::transport::Wake::new().ok(),
        }
    }

    /// The worker took a new session into service: returns its epoch (1 for
    /// the first). Every login of a path uses the path's ISID with TSIH 0,
    /// so the target ends the sessions before it (reinstatement): a command
    /// sent in an older epoch can no longer run ([`fenced_through`] moves
    /// to the epoch before this one).
    ///
    /// [`fenced_through`]: PathShared::fenced_through
    pub fn begin_session(&self) -> u64 {
        let epoch = self.sessions.fetch_add(1, Ordering::AcqRel) + 1;
        self.fence_through(epoch - 1);
        epoch
    }

    /// The epoch of the newest session (0 before the first login).
    pub fn session_epoch(&self) -> u64 {
        self.sessions.load(Ordering::Acquire)
    }

    /// Every session of this path up to this epoch is known ended (by a
    /// login of the path itself, or a fence login with its ISID through
    /// another portal of its portal group): a write sent in one of them
    /// can no longer run on the target.
    pub fn fenced_through(&self) -> u64 {
        self.fenced.load(Ordering::Acquire)
    }

    /// Records that the sessions up to `epoch` are ended (never moves back).
    pub fn fence_through(&self, epoch: u64) {
        self.fenced.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Records the TargetPortalGroupTag of the new session's login response.
    pub fn set_portal_group(&self, tpgt: Option<u16>) {
        self.portal_group
            .store(tpgt.map_or(NO_TPGT, u32::from), Ordering::Release);
    }

    /// The TargetPortalGroupTag of the newest session, if the target said.
    pub fn portal_group(&self) -> Option<u16> {
        u16::try_from(self.portal_group.load(Ordering::Acquire)).ok()
    }

    /// The path's current state.
    pub fn state(&self) -> PathState {
        PathState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Changes the state and records the change (not on the I/O path).
    pub fn set_state(&self, state: PathState, reason: &str) {
        let old = self.state.swap(state.to_u8(), Ordering::AcqRel);
        if old == state.to_u8() {
            return;
        }
        if state == PathState::Up {
            self.counters.logins.fetch_add(1, Ordering::Relaxed);
        }
        let old = PathState::from_u8(old);
        if state == PathState::Up || old == PathState::Up {
            log::info!("path {}: {old} -> {state}: {reason}", self.name);
        } else {
            log::debug!("path {}: {old} -> {state}: {reason}", self.name);
        }
        if let Ok(mut ev) = self.events.lock() {
            if ev.len() >= MAX_EVENTS {
                ev.remove(0);
            }
            ev.push(PathEvent {
                at: SystemTime::now(),
                since_open: self.opened.elapsed(),
                state,
                reason: reason.to_string(),
            });
        }
    }

    /// The path's ALUA access state; `None` while unknown or when the
    /// target does not report one (treated as active/optimized).
    pub fn alua(&self) -> Option<AluaState> {
        match self.alua.load(Ordering::Acquire) {
            ALUA_UNKNOWN => None,
            v => Some(AluaState::from_bits(v)),
        }
    }

    /// Sets the path's ALUA state; true when it changed.
    pub fn set_alua(&self, state: Option<AluaState>) -> bool {
        let changed = self.swap_alua(state);
        if changed {
            let shown = state.map_or("unknown".to_string(), |a| a.to_string());
            log::info!("path {}: ALUA state {shown}", self.name);
        }
        changed
    }

    /// Records the session's I_T nexus after a login (for the stats).
    pub fn set_nexus(&self, nexus: Nexus) {
        if let Ok(mut n) = self.nexus.lock() {
            *n = Some(nexus);
        }
    }

    /// Stores the ALUA state; true when it changed.
    fn swap_alua(&self, state: Option<AluaState>) -> bool {
        let v = state.map_or(ALUA_UNKNOWN, AluaState::bits);
        self.alua.swap(v, Ordering::AcqRel) != v
    }

    /// Records the target port group the path's port belongs to (from VPD 83h).
    pub fn set_tpg(&self, tpg: Option<u16>) {
        if let Ok(mut t) = self.tpg.lock() {
            *t = tpg;
        }
    }

    /// The path's target port group, if the target reported one.
    pub fn tpg(&self) -> Option<u16> {
        self.tpg.lock().ok().and_then(|t| *t)
    }

    /// Tier for selection, or None when the path cannot take I/O now.
    pub fn usable_tier(&self) -> Option<u8> {
        if self.state() != PathState::Up {
            return None;
        }
        alua_tier(self.alua())
    }

    /// Submitter side: a command of `bytes` was handed to this path.
    pub fn add_outstanding(&self, bytes: u64) {
        self.load.outstanding.fetch_add(1, Ordering::Relaxed);
        self.load
            .outstanding_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Submitter side: a command handed to this path came back.
    pub fn sub_outstanding(&self, bytes: u64) {
        self.load.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.load
            .outstanding_bytes
            .fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Snapshot of the load figures selectors use.
    pub fn load(&self) -> PathLoad {
        PathLoad {
            index: self.index,
            outstanding: self.load.outstanding.load(Ordering::Relaxed),
            outstanding_bytes: self.load.outstanding_bytes.load(Ordering::Relaxed),
            latency_ewma_ns: self.counters.latency_ewma_ns.load(Ordering::Relaxed),
            service_time_ns: self.counters.service_ewma_ns.load(Ordering::Relaxed),
            hst_latency_ns: self.counters.hst_latency_ns.load(Ordering::Relaxed),
            newest_latency_ns: self.counters.newest_latency_ns.load(Ordering::Relaxed),
            tail_latency_ns: self.counters.tail_latency_ns.load(Ordering::Relaxed),
            fresh_samples: self.counters.fresh_samples.load(Ordering::Relaxed),
            last_finish: match self.counters.last_finish_ns.load(Ordering::Relaxed) {
                0 => None,
                ns => self.opened.checked_add(Duration::from_nanos(ns)),
            },
        }
    }

    /// Worker side: one command finished on this path (now).
    pub fn record_completion(&self, latency: Duration, bytes: u64, error: bool) {
        self.record_completion_at(Instant::now(), latency, bytes, error);
    }

    /// Worker side: one command finished on this path at `now`, `latency`
    /// after the worker took it, seen as soon as it finished (see
    /// [`PathShared::record_completion_seen`]).
    pub fn record_completion_at(&self, now: Instant, latency: Duration, bytes: u64, error: bool) {
        self.record_completion_seen(now, now, latency, bytes, error);
    }

    /// Worker side: one command finished on this path, seen at `now`,
    /// `latency` after the worker took it; the worker had last looked (and
    /// not seen it) at `looked` (≤ `now`), so it finished in `(looked, now]`.
    /// Updates the latency EWMA, and the historical service time: the time
    /// since the command started, or since the path's previous completion
    /// if that came later (commands that overlap are counted as if served
    /// one after the other, so on a busy path the figure is the time
    /// between completions).
    ///
    /// A starved initiator sees completions late, in batches: the first of
    /// a batch would count the whole wait, as if the path had been busy,
    /// and a fast path would look as slow as its initiator. So the sample
    /// is known only within bounds: from the later of the command's start
    /// and the previous completion's `looked`, up to `now` (upper), and
    /// from the later of its start and the previous completion's `now`, up
    /// to `looked` (lower). If the time the completion may have waited
    /// unseen (`now - looked`) is at most half the upper bound, the upper
    /// bound is the sample (as if seen at once); otherwise the estimate
    /// moves only as far as needed to lie within the bounds: the figure
    /// measures the path, not the initiator's scheduling. The historical
    /// latency (for historical-service-time) is bounded the same way, the
    /// latency lying in `(looked - start, now - start]`, and
    /// [`PathLoad::fresh_samples`] counts the completions since the
    /// estimates were last replaced after an idle spell.
    pub fn record_completion_seen(
        &self,
        now: Instant,
        looked: Instant,
        latency: Duration,
        bytes: u64,
        error: bool,
    ) {
        let c = &self.counters;
        let sample = latency.as_nanos().min(u64::MAX as u128) as u64;
        let old = c.latency_ewma_ns.load(Ordering::Relaxed);
        c.latency_ewma_ns
            .store(ewma_update(old, sample), Ordering::Relaxed);
        let since_open = |t: Instant| {
            (t.saturating_duration_since(self.opened).as_nanos()).clamp(1, u64::MAX as u128) as u64
        };
        let finish = since_open(now);
        let looked = since_open(looked).min(finish);
        let last = c.last_finish_ns.load(Ordering::Relaxed);
        let last_looked = c.last_looked_ns.load(Ordering::Relaxed).min(last);
        let start = finish.saturating_sub(sample);
        let upper = finish.saturating_sub(start.max(last_looked));
        let lower = looked.saturating_sub(start.max(last)).min(upper);
        let since_last = (last != 0).then(|| finish.saturating_sub(last));
        let old = c.service_ewma_ns.load(Ordering::Relaxed);
        let waited = finish - looked;
        let seen = if old == 0 || waited.saturating_mul(2) <= upper {
            upper
        } else {
            old.clamp(lower, upper)
        };
        c.service_ewma_ns.store(
            service_time_update(old, seen, since_last),
            Ordering::Relaxed,
        );
        // The latency, bounded the same way: it lies in (looked - start,
        // now - start]; a long unseen wait is the initiator's, not the path's.
        let old = c.hst_latency_ns.load(Ordering::Relaxed);
        let lat_lower = looked.saturating_sub(start).min(sample);
        let lat_seen = if old == 0 || waited.saturating_mul(2) <= sample {
            sample
        } else {
            old.clamp(lat_lower, sample)
        };
        // One outlier (a descheduled target, a lost segment) moves the
        // estimate at most as far as a sample 4x the estimate would: a
        // path that really got slower gets there within a few commands.
        let lat_ewma_sample = if old == 0 {
            lat_seen
        } else {
            lat_seen.min(old.saturating_mul(HST_LATENCY_OUTLIER))
        };
        c.hst_latency_ns.store(
            service_time_update(old, lat_ewma_sample, since_last),
            Ordering::Relaxed,
        );
        c.newest_latency_ns
            .store(lat_seen.max(1), Ordering::Relaxed);
        // The tail takes what the path surely took (up to when the worker
        // last looked): a starved initiator's unseen wait is not the path's.
        let hst_now = c.hst_latency_ns.load(Ordering::Relaxed);
        let old_tail = c.tail_latency_ns.load(Ordering::Relaxed);
        c.tail_latency_ns.store(
            tail_update(old_tail, hst_now, lat_lower, since_last),
            Ordering::Relaxed,
        );
        // An estimate replaced after an idle spell rests on one sample.
        let replaced = since_last.is_none_or(|d| d >= SERVICE_TIME_FORGOTTEN_NS);
        let fresh = if replaced {
            1
        } else {
            c.fresh_samples
                .load(Ordering::Relaxed)
                .saturating_add(1)
                .min(HST_FRESH_CAP)
        };
        c.fresh_samples.store(fresh, Ordering::Relaxed);
        c.last_finish_ns.fetch_max(finish, Ordering::Relaxed);
        c.last_looked_ns.fetch_max(looked, Ordering::Relaxed);
        c.commands.fetch_add(1, Ordering::Relaxed);
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        if error {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Worker side: the target sent an Async Message (`what` says which
    /// and what it carried); logged and counted ([`PathStats::async_events`]).
    pub fn record_async_event(&self, what: &str) {
        log::warn!("path {}: target sent an async message: {what}", self.name);
        self.counters.async_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Worker side: commands handed back because this path failed.
    pub fn record_resubmitted(&self, n: u64) {
        if n > 0 {
            log::info!(
                "path {}: failing over {n} command(s) to other paths",
                self.name
            );
        }
        self.counters.resubmitted.fetch_add(n, Ordering::Relaxed);
    }

    /// MC/S at ERL 2: `n` tasks of this path's failed connection taken
    /// over by TASK REASSIGN (or sent again with their ITT and CmdSN, for
    /// those the target never received) on its reinstated connection.
    pub fn record_reassigned(&self, n: u64) {
        self.counters.reassigned.fetch_add(n, Ordering::Relaxed);
    }

    /// MC/S at ERL 2: `n` tasks of this path's failed connection that
    /// could not be taken over (TASK REASSIGN refused, the connection not
    /// reinstated in time, the session reinstated instead) and went back
    /// to the fence-and-retry path: a write among them that had run
    /// before its status was lost runs again.
    pub fn record_reassign_fallback(&self, n: u64, why: &str) {
        if n > 0 {
            log::info!(
                "path {}: {n} task(s) not reassigned ({why}): fenced and retried as new commands",
                self.name
            );
        }
        self.counters
            .reassign_fallbacks
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Worker side: merge a batch of latency samples into the shared
    /// histogram (not per I/O: every few milliseconds).
    pub fn merge_histogram(&self, local: &mut hdrhistogram::Histogram<u64>) {
        if local.is_empty() {
            return;
        }
        if let Ok(mut h) = self.histogram.lock() {
            let _ = h.add(&*local);
        }
        local.reset();
    }

    /// The latency histogram in buckets: for each upper bound (seconds,
    /// ascending) the samples above the previous bound and at most this one,
    /// then infinity (`+Inf`) for the samples above the last bound; with the sum
    /// (seconds) and count of all samples. The shape `prometheus-client`
    /// encodes (it accumulates the buckets itself).
    pub fn latency_buckets(&self, bounds_secs: &[f64]) -> (f64, u64, Vec<(f64, u64)>) {
        let Ok(h) = self.histogram.lock() else {
            return (0.0, 0, Vec::new());
        };
        let mut buckets = Vec::with_capacity(bounds_secs.len() + 1);
        let mut counted = 0;
        for &bound in bounds_secs {
            let micros = (bound * 1e6) as u64;
            let at_most = if h.is_empty() || micros < h.low() {
                0
            } else {
                h.count_between(0, micros)
            };
            buckets.push((bound, at_most.saturating_sub(counted)));
            counted = counted.max(at_most);
        }
        buckets.push((f64::INFINITY, h.len().saturating_sub(counted)));
        let sum_secs = h.mean() * h.len() as f64 / 1e6;
        (sum_secs, h.len(), buckets)
    }

    /// A snapshot of state, counters, latency percentiles and state changes.
    /// Percentiles cover only samples the worker has merged so far (it does
    /// so every ~20 ms).
    pub fn stats(&self) -> PathStats {
        let c = &self.counters;
        let l = self.load();
        let q = |h: &hdrhistogram::Histogram<u64>, p: f64| {
            Duration::from_micros(if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            })
        };
        let (p50, p90, p99, p999, max, samples) = match self.histogram.lock() {
            Ok(h) => (
                q(&h, 0.5),
                q(&h, 0.9),
                q(&h, 0.99),
                q(&h, 0.999),
                Duration::from_micros(h.max()),
                h.len(),
            ),
            Err(_) => Default::default(),
        };
        PathStats {
            index: self.index,
            name: self.name.clone(),
            state: self.state(),
            alua: self.alua().map(|a| a.to_string()),
            target_port_group: self.tpg(),
            commands: c.commands.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            resubmitted: c.resubmitted.load(Ordering::Relaxed),
            reassigned: c.reassigned.load(Ordering::Relaxed),
            reassign_fallbacks: c.reassign_fallbacks.load(Ordering::Relaxed),
            async_events: c.async_events.load(Ordering::Relaxed),
            wakeups: self.wake.as_ref().map_or(0, |w| w.notified()),
            logins: c.logins.load(Ordering::Relaxed),
            outstanding: l.outstanding,
            outstanding_bytes: l.outstanding_bytes,
            latency_ewma: Duration::from_nanos(l.latency_ewma_ns),
            latency_samples: samples,
            latency_p50: p50,
            latency_p90: p90,
            latency_p99: p99,
            latency_p999: p999,
            latency_max: max,
            events: self.events.lock().map(|e| e.clone()).unwrap_or_default(),
            nexus: self.nexus.lock().ok().and_then(|n| *n),
        }
    }
}

/// EWMA with weight 1/8 for the new sample; the first sample is taken as is.
pub fn ewma_update(old: u64, sample: u64) -> u64 {
    if old == 0 {
        sample.max(1)
    } else {
        // old + (sample - old) / 8 without overflow or going negative.
        (old - old / 8).saturating_add(sample / 8).max(1)
    }
}

/// An estimate this old halves its weight against a new sample in
/// [`service_time_update`].
pub const SERVICE_TIME_HALF_LIFE: Duration = Duration::from_millis(100);

/// After this long without a completion [`service_time_update`] replaces
/// an estimate by the new sample (3 half-lives).
const SERVICE_TIME_FORGOTTEN_NS: u64 = 3 * SERVICE_TIME_HALF_LIFE.as_nanos() as u64;

/// A latency sample counts in the historical latency as at most this many
/// times the estimate.
const HST_LATENCY_OUTLIER: u64 = 4;

/// [`PathLoad::fresh_samples`] counts up to this.
pub const HST_FRESH_CAP: u32 = 255;

/// The historical service time's EWMA: the new sample weighs 1/8, the old
/// estimate 7/8, halved for every [`SERVICE_TIME_HALF_LIFE`] since the
/// path's previous completion (`since_last`; None: the first one). So a
/// busy path's figure is smooth, and the sample of a path that was idle or
/// probed rarely replaces a stale estimate (after 3 half-lives, entirely).
pub fn service_time_update(old: u64, sample: u64, since_last: Option<u64>) -> u64 {
    let halvings = since_last.map_or(u64::MAX, |d| d / SERVICE_TIME_HALF_LIFE.as_nanos() as u64);
    if old == 0 || halvings >= 3 {
        return sample.max(1);
    }
    // old * w + sample * (1 - w), w = 7/8 >> halvings, in u128 so nothing overflows.
    let w_old = 7u128 >> halvings;
    ((old as u128 * w_old + sample as u128 * (8 - w_old)) / 8).clamp(1, u64::MAX as u128) as u64
}

/// How fast [`tail_update`]'s tail falls back towards the historical
/// latency: its excess halves for every this long since the path's
/// previous completion.
pub const TAIL_HALF_LIFE: Duration = Duration::from_millis(250);

/// The latency tail: a maximum that decays. A sample above the tail is the
/// new tail; otherwise the tail's excess over the historical latency
/// (`hst`) halves per [`TAIL_HALF_LIFE`] since the previous completion
/// (`since_last`; None: the first one), linearly within a half-life, and
/// once more for the faster answer. So a
/// path that answered slowly within the last half second or so is still
/// known as slow, whatever one lucky answer (a token bucket refilled while
/// the path idled) did to its averages, and a path that became fast sheds
/// the old figure within a second. Selectors decay it further by the time
/// since the path's last completion ([`tail_decayed`]).
pub fn tail_update(old: u64, hst: u64, sample: u64, since_last: Option<u64>) -> u64 {
    let decayed = since_last.map_or(0, |d| tail_decayed(old, hst, d));
    if sample >= decayed {
        return sample.max(1);
    }
    // An answer faster than the tail halves its excess too: a path that
    // got fast sheds it in a few commands, a slow one raises it again.
    let floor = hst.max(sample);
    (floor + decayed.saturating_sub(floor) / 2).max(1)
}

/// A tail `tail` over the historical latency `hst`, `age` ns later: its
/// excess halved per [`TAIL_HALF_LIFE`] (linearly within one); 0 stays 0.
pub fn tail_decayed(tail: u64, hst: u64, age: u64) -> u64 {
    if tail == 0 {
        return 0;
    }
    let half_life = TAIL_HALF_LIFE.as_nanos() as u64;
    let excess = tail.saturating_sub(hst);
    let halvings = age / half_life;
    let excess = if halvings >= 64 {
        0
    } else {
        excess >> halvings
    };
    // 2^-x ~ 1 - x/2 on [0, 1).
    let rem = (age % half_life) as u128;
    let cut = (excess as u128 * rem / (2 * half_life as u128)) as u64;
    tail.min(hst.saturating_add(excess - cut))
}

/// The load figures a selector looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathLoad {
    /// The path's index ([`PathShared::index`]); what [`select`](super::select)
    /// returns.
    pub index: usize,
    /// Commands handed to the path and not yet completed.
    pub outstanding: u64,
    /// Data bytes of those commands.
    pub outstanding_bytes: u64,
    /// Smoothed command latency in nanoseconds (EWMA, new sample weighted
    /// 1/8); 0 = no sample yet.
    pub latency_ewma_ns: u64,
    /// Historical service time in nanoseconds: the EWMA of the time each
    /// command took when overlapping commands are counted one after the
    /// other ([`PathShared::record_completion_at`]), so the expected wait
    /// of a new command is about `(outstanding + 1) * service_time_ns`;
    /// 0 = no sample yet.
    pub service_time_ns: u64,
    /// When the path last completed a command; None = never.
    pub last_finish: Option<Instant>,
    /// Historical latency in nanoseconds: the EWMA (weights and ageing as
    /// [`service_time_ns`](Self::service_time_ns)) of each command's whole
    /// latency, bounded by when the worker looked; 0 = no sample yet.
    pub hst_latency_ns: u64,
    /// The newest command's latency sample (bounded the same way), ns.
    pub newest_latency_ns: u64,
    /// The latency tail in nanoseconds: the largest recent latency that the
    /// path surely took (the sample's lower bound), decaying towards
    /// [`hst_latency_ns`](Self::hst_latency_ns) ([`tail_update`]); 0 = no
    /// sample yet.
    pub tail_latency_ns: u64,
    /// Completions since the estimates were last replaced by a single
    /// sample (the first completion, or the first after an idle spell of 3
    /// half-lives), up to [`HST_FRESH_CAP`]: how much the estimates rest on.
    pub fresh_samples: u32,
}

/// A point-in-time view of one path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathStats {
    /// The path's position in [`DeviceConfig::paths`](super::DeviceConfig::paths).
    pub index: usize,
    /// The path's name, e.g. `10.0.1.1->10.0.1.2:3260`.
    pub name: String,
    /// Current state.
    pub state: PathState,
    /// ALUA access state as text (e.g. `active/optimized`, `standby`);
    /// `None` when unknown or the target does not do ALUA.
    pub alua: Option<String>,
    /// Target port group of the path's port, if the target reported one.
    pub target_port_group: Option<u16>,
    /// Commands completed on this path (any status).
    pub commands: u64,
    /// Data bytes moved by completed commands.
    pub bytes: u64,
    /// Completions with a non-GOOD status.
    pub errors: u64,
    /// Commands handed back for another path after this path failed.
    pub resubmitted: u64,
    /// MC/S at ERL 2: tasks of a failed connection of this path taken
    /// over on its reinstated connection (TASK REASSIGN, or a retry with
    /// the same ITT and CmdSN of one the target never received).
    pub reassigned: u64,
    /// MC/S at ERL 2: tasks that could not be taken over (TASK REASSIGN
    /// refused, e.g. response 5 "not supported" from tgtd; the connection
    /// not reinstated) and were fenced and retried as new commands.
    pub reassign_fallbacks: u64,
    /// Successful logins (1 + reconnects).
    pub logins: u64,
    /// Async Messages the target sent on this path (RFC 7143 §11.9: SCSI
    /// async events, logout requests, drop announcements, renegotiation).
    pub async_events: u64,
    /// Times a submission woke this path's worker from a block
    /// (`IdleMode::Block`): each one an eventfd write.
    pub wakeups: u64,
    /// Commands handed to this path and not yet completed.
    pub outstanding: u64,
    /// Data bytes of those commands.
    pub outstanding_bytes: u64,
    /// Smoothed command latency (EWMA, new sample weighted 1/8); zero
    /// before the first completion. Latency runs from dispatch to this path
    /// until completion.
    pub latency_ewma: Duration,
    /// Latency samples behind the percentiles below (one per completed
    /// command, merged every ~20 ms).
    pub latency_samples: u64,
    /// Median latency (microsecond resolution; zero with no samples).
    pub latency_p50: Duration,
    /// 90th percentile latency.
    pub latency_p90: Duration,
    /// 99th percentile latency.
    pub latency_p99: Duration,
    /// 99.9th percentile latency.
    pub latency_p999: Duration,
    /// Highest latency seen.
    pub latency_max: Duration,
    /// State changes, oldest first (at most the newest 256 are kept).
    pub events: Vec<PathEvent>,
    /// The current (or last) session's I_T nexus; `None` before the first
    /// login.
    pub nexus: Option<Nexus>,
}

/// Which session and connection carry a path (RFC 7143 §4.2.7: the ISID
/// and TSIH name the session, the CID the connection in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Nexus {
    /// Initiator session ID, 6 bytes as 12 hex digits.
    #[serde(serialize_with = "isid_hex")]
    pub isid: [u8; 6],
    /// Target-assigned session identifying handle.
    pub tsih: u16,
    /// Connection ID within the session.
    pub cid: u16,
}

impl Nexus {
    /// The ISID as 12 hex digits, as targets and `iscsiadm` show it.
    pub fn isid_hex(&self) -> String {
        self.isid.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn isid_hex<S: serde::Serializer>(isid: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(
        &Nexus {
            isid: *isid,
            tsih: 0,
            cid: 0,
        }
        .isid_hex(),
    )
}

/// Reconnect timing: exponential back-off, never sooner than the target's
/// DefaultTime2Wait after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the first reconnect attempt; doubled after each failed
    /// attempt (default 250 ms).
    pub initial: Duration,
    /// Upper bound of the delay (default 10 s).
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> ReconnectPolicy {
        ReconnectPolicy {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(10),
        }
    }
}

/// The path state machine, sans-IO: the worker feeds it outcomes and `now`,
/// it says when to try to log in again.
#[derive(Debug, Clone)]
pub struct PathHealth {
    policy: ReconnectPolicy,
    state: PathState,
    /// Failed attempts since the last successful login.
    attempts: u32,
    next_attempt: Option<Instant>,
    /// DefaultTime2Wait of the last session.
    time2wait: Duration,
    /// Flap damping: failures of the live path in the window, and the
    /// path's name for the log.
    damping: Option<(super::health::FlapWindow, String)>,
    /// Held down (marginal) until then.
    held_until: Option<Instant>,
}

impl PathHealth {
    /// A path about to log in for the first time ([`PathState::Connecting`]).
    pub fn new(policy: ReconnectPolicy) -> PathHealth {
        PathHealth {
            policy,
            state: PathState::Connecting,
            attempts: 0,
            next_attempt: None,
            time2wait: Duration::ZERO,
            damping: None,
            held_until: None,
        }
    }

    /// With flap damping (None: without): a live path of this name that
    /// fails `threshold` times within `window` stays down for `hold_down`.
    pub fn with_damping(
        mut self,
        damping: Option<super::health::FlapDamping>,
        name: &str,
    ) -> PathHealth {
        self.damping = damping.map(|d| (super::health::FlapWindow::new(d), name.to_string()));
        self
    }

    /// Until when the path is held down for flapping (marginal), if it is.
    pub fn held_down_until(&self, now: Instant) -> Option<Instant> {
        self.held_until.filter(|&t| t > now)
    }

    /// The path's state as the state machine sees it.
    pub fn state(&self) -> PathState {
        self.state
    }

    /// Failed attempts since the last successful login (0 while up).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the next login attempt is due; `None` when none is scheduled
    /// (up, connecting, failed or closed).
    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }

    /// Logged in (again). `time2wait` is the negotiated DefaultTime2Wait.
    pub fn on_login(&mut self, time2wait: Duration) {
        if matches!(self.state, PathState::Failed | PathState::Closed) {
            return;
        }
        self.state = PathState::Up;
        self.attempts = 0;
        self.next_attempt = None;
        self.time2wait = time2wait;
    }

    /// The connection failed (or a login attempt did): schedule a retry.
    pub fn on_failure(&mut self, now: Instant) -> Instant {
        let was_up = self.state == PathState::Up;
        if was_up {
            self.attempts = 0;
        }
        if !matches!(self.state, PathState::Failed | PathState::Closed) {
            self.state = PathState::Down;
        }
        let shift = self.attempts.min(20);
        let backoff = self
            .policy
            .initial
            .saturating_mul(1u32 << shift)
            .min(self.policy.max);
        // The target asked us to wait at least Time2Wait before logging in again.
        let delay = if self.attempts == 0 {
            backoff.max(self.time2wait)
        } else {
            backoff
        };
        self.attempts = self.attempts.saturating_add(1);
        let mut at = now + delay;
        if let Some((window, name)) = self.damping.as_mut().filter(|_| was_up) {
            if let Some(until) = window.on_failure(now) {
                log::warn!(
                    "path {name}: failed {} times within {:?}: marginal, held down for {:?}",
                    window_threshold(window),
                    window_span(window),
                    until.saturating_duration_since(now)
                );
                self.held_until = Some(until);
            }
        }
        if let Some(until) = self.held_until.filter(|&t| t > at) {
            at = until;
        }
        self.next_attempt = Some(at);
        at
    }

    /// As [`on_failure`](Self::on_failure) for a connection the target
    /// closed after answering a Logout sent on it (tgtd closes the
    /// connection a Logout for another CID came on): not an unexpected
    /// termination, so the first retry waits the Logout Response's
    /// `time2wait` instead of DefaultTime2Wait (RFC 7143 §11.15.2), with
    /// the usual back-off.
    pub fn on_logged_out(&mut self, now: Instant, time2wait: Duration) -> Instant {
        let negotiated = std::mem::replace(&mut self.time2wait, time2wait);
        let at = self.on_failure(now);
        self.time2wait = negotiated;
        at
    }

    /// As [`on_failure`](Self::on_failure), with the next attempt no sooner
    /// than `at_least` from now: the Time2Wait a target gave in an Async
    /// Message (RFC 7143 §11.9.1) or a Logout Response (§11.15.2).
    pub fn on_failure_waiting(&mut self, now: Instant, at_least: Duration) -> Instant {
        let at = self.on_failure(now).max(now + at_least);
        self.next_attempt = Some(at);
        at
    }

    /// A login attempt starts.
    pub fn on_attempt(&mut self) {
        if self.state == PathState::Down {
            self.state = PathState::Connecting;
        }
        self.next_attempt = None;
    }

    /// Whether to start a login attempt now.
    pub fn due(&self, now: Instant) -> bool {
        self.state == PathState::Down && self.next_attempt.is_some_and(|t| now >= t)
    }

    /// Never again (wrong LU, bad credentials...).
    pub fn give_up(&mut self) {
        self.state = PathState::Failed;
        self.next_attempt = None;
    }

    /// The device is closing: [`PathState::Closed`], no further attempts.
    pub fn close(&mut self) {
        self.state = PathState::Closed;
        self.next_attempt = None;
    }
}

fn window_threshold(w: &super::health::FlapWindow) -> u32 {
    w.damping().threshold
}

fn window_span(w: &super::health::FlapWindow) -> Duration {
    w.damping().window
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        }
    }

    #[test]
    fn backoff_doubles_up_to_max_and_resets_on_login() {
        let t0 = Instant::now();
        let mut h = PathHealth::new(policy());
        h.on_login(Duration::ZERO);
        assert_eq!(h.state(), PathState::Up);
        let mut delays = Vec::new();
        for _ in 0..6 {
            let at = h.on_failure(t0);
            assert_eq!(h.state(), PathState::Down);
            delays.push((at - t0).as_millis());
            assert!(h.due(at) && !h.due(t0));
            h.on_attempt();
            assert_eq!(h.state(), PathState::Connecting);
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        h.on_login(Duration::ZERO);
        assert_eq!(h.state(), PathState::Up);
        assert_eq!(h.attempts(), 0);
        assert_eq!((h.on_failure(t0) - t0).as_millis(), 100);
    }

    #[test]
    fn a_flapping_path_is_held_down() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let damping = super::super::health::FlapDamping {
            threshold: 3,
            window: 10 * s,
            hold_down: 30 * s,
        };
        let mut h = PathHealth::new(policy()).with_damping(Some(damping), "p0");
        // Two failures of the live path: back-off only.
        for i in 0..2u32 {
            h.on_login(Duration::ZERO);
            let at = h.on_failure(t0 + i * s);
            assert_eq!(at, t0 + i * s + Duration::from_millis(100));
            assert_eq!(h.held_down_until(t0), None);
            h.on_attempt();
        }
        // Failed logins while down do not count.
        assert_eq!(
            h.on_failure(t0 + 2 * s),
            t0 + 2 * s + Duration::from_millis(200)
        );
        h.on_attempt();
        // The third failure of the live path within 10 s: held down 30 s.
        h.on_login(Duration::ZERO);
        let at = h.on_failure(t0 + 3 * s);
        assert_eq!(at, t0 + 33 * s);
        assert_eq!(h.held_down_until(t0 + 3 * s), Some(t0 + 33 * s));
        assert!(!h.due(t0 + 32 * s) && h.due(t0 + 33 * s));
        h.on_attempt();
        // A failed login meanwhile is still held to the end of the hold-down.
        assert_eq!(h.on_failure(t0 + 20 * s), t0 + 33 * s);
        assert_eq!(h.held_down_until(t0 + 34 * s), None);
        // Without damping, the same failures only back off.
        let mut plain = PathHealth::new(policy());
        for i in 0..5u32 {
            plain.on_login(Duration::ZERO);
            assert_eq!(
                plain.on_failure(t0 + i * s),
                t0 + i * s + Duration::from_millis(100)
            );
        }
    }

    #[test]
    fn first_retry_honours_time2wait() {
        let t0 = Instant::now();
        let mut h = PathHealth::new(policy());
        h.on_login(Duration::from_secs(2));
        assert_eq!(h.on_failure(t0) - t0, Duration::from_secs(2));
        h.on_attempt();
        // Later attempts follow the back-off.
        assert_eq!(h.on_failure(t0) - t0, Duration::from_millis(200));
    }

    /// A connection the target closed after answering a Logout sent on it
    /// waits the Logout Response's Time2Wait, not DefaultTime2Wait, and
    /// the negotiated value still holds for the next unexpected failure.
    #[test]
    fn closed_after_a_logout_waits_the_logout_time2wait() {
        let t0 = Instant::now();
        let mut h = PathHealth::new(policy());
        h.on_login(Duration::from_secs(2));
        assert_eq!(
            h.on_logged_out(t0, Duration::ZERO) - t0,
            Duration::from_millis(100)
        );
        h.on_login(Duration::from_secs(2));
        assert_eq!(
            h.on_logged_out(t0, Duration::from_secs(1)) - t0,
            Duration::from_secs(1)
        );
        h.on_login(Duration::from_secs(2));
        assert_eq!(h.on_failure(t0) - t0, Duration::from_secs(2));
    }

    #[test]
    fn failed_paths_stay_failed() {
        let t0 = Instant::now();
        let mut h = PathHealth::new(policy());
        h.give_up();
        h.on_failure(t0);
        assert_eq!(h.state(), PathState::Failed);
        h.on_login(Duration::ZERO);
        assert_eq!(h.state(), PathState::Failed);
        assert!(!h.due(t0 + Duration::from_secs(100)));
    }

    #[test]
    fn shared_state_tiers_and_counters() {
        let p = PathShared::new(0, "p0", Instant::now());
        assert_eq!(p.usable_tier(), None, "not up yet");
        p.set_state(PathState::Up, "login");
        assert_eq!(p.usable_tier(), Some(0));
        p.set_alua(Some(AluaState::ActiveNonOptimized));
        assert_eq!(p.usable_tier(), Some(1));
        p.set_alua(Some(AluaState::Standby));
        assert_eq!(p.usable_tier(), None);
        p.set_alua(None);
        p.add_outstanding(4096);
        p.add_outstanding(512);
        assert_eq!(p.load().outstanding, 2);
        p.sub_outstanding(4096);
        assert_eq!(p.load().outstanding_bytes, 512);
        p.record_completion(Duration::from_micros(100), 4096, false);
        let s = p.stats();
        assert_eq!((s.commands, s.bytes, s.logins), (1, 4096, 1));
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.events[0].state, PathState::Up);
    }

    #[test]
    fn service_time_counts_overlapping_commands_one_after_the_other() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let p = PathShared::new(0, "p0", t0);
        assert_eq!((p.load().service_time_ns, p.load().last_finish), (0, None));
        // Alone: the whole latency.
        p.record_completion_at(t0 + us(1000), us(1000), 4096, false);
        assert_eq!(p.load().service_time_ns, 1_000_000);
        assert_eq!(p.load().last_finish, Some(t0 + us(1000)));
        // Started at 100 us, before the first finished: counted from 1000 us
        // (a 100 us sample).
        p.record_completion_at(t0 + us(1100), us(1000), 4096, false);
        assert_eq!(p.load().service_time_ns, (7 * 1_000_000 + 100_000) / 8);
        // Finished in the same instant: a zero sample.
        p.record_completion_at(t0 + us(1100), us(900), 4096, false);
        assert_eq!(p.load().service_time_ns, (7 * 887_500) / 8);
        assert_eq!(p.load().last_finish, Some(t0 + us(1100)));
        // After a second of silence the old estimate is worth nothing.
        p.record_completion_at(t0 + Duration::from_secs(2), us(300), 4096, false);
        assert_eq!(p.load().service_time_ns, 300_000);
        assert_eq!(p.stats().commands, 4);
    }

    #[test]
    fn service_time_of_a_completion_seen_late_is_bounded_by_when_the_worker_looked() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let p = PathShared::new(0, "p0", t0);
        p.record_completion_seen(t0 + us(1000), t0 + us(1000), us(1000), 4096, false);
        assert_eq!(p.load().service_time_ns, 1_000_000);
        // Seen at 5000 us, the worker had last looked at 1000 us (it was
        // descheduled): the command finished somewhere in between, so its
        // sample lies in [0, 4000] us, and 1000 us is consistent with it.
        p.record_completion_seen(t0 + us(5000), t0 + us(1000), us(4500), 4096, false);
        assert_eq!(p.load().service_time_ns, 1_000_000);
        // Another in the same batch: started at 800 us, after the previous
        // completion could have finished (1000 us), sample in [0, 4000] us.
        p.record_completion_seen(t0 + us(5000), t0 + us(1000), us(4200), 4096, false);
        assert_eq!(p.load().service_time_ns, 1_000_000);
        // Seen at 5300 us, looked at 5250 us, started at 5050 us: the
        // sample lies in [200, 250] us and the wait (50 us) is small: the
        // upper bound counts, as if seen at once.
        p.record_completion_seen(t0 + us(5300), t0 + us(5250), us(250), 4096, false);
        assert_eq!(p.load().service_time_ns, (7 * 1_000_000 + 250_000) / 8);
        // A long wait whose bounds exclude the estimate pull it to the
        // nearest bound: started at 5300 us and not finished when the
        // worker looked at 9000 us (seen at 16000 us), so at least 3700 us.
        let before = p.load().service_time_ns;
        p.record_completion_seen(t0 + us(16000), t0 + us(9000), us(10700), 4096, false);
        assert_eq!(p.load().service_time_ns, (7 * before + 3_700_000) / 8);
        // ... and one whose upper bound is below it: started at 16000 us,
        // looked at 16400 us, seen at 17000 us: at most 1000 us.
        let before = p.load().service_time_ns;
        p.record_completion_seen(t0 + us(17000), t0 + us(16400), us(1000), 4096, false);
        assert_eq!(p.load().service_time_ns, (7 * before + 1_000_000) / 8);
        assert_eq!(p.stats().commands, 6);
    }

    #[test]
    fn hst_latency_is_bounded_by_when_the_worker_looked_and_fresh_samples_count() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let p = PathShared::new(0, "p0", t0);
        assert_eq!(p.load().fresh_samples, 0);
        p.record_completion_seen(t0 + us(1000), t0 + us(1000), us(200), 4096, false);
        let l = p.load();
        assert_eq!((l.hst_latency_ns, l.newest_latency_ns), (200_000, 200_000));
        assert_eq!(l.fresh_samples, 1);
        // Started at 900 us, seen at 5000 us; the worker had looked at
        // 1100 us (descheduled since): the latency lies in [200, 4100] us,
        // 200 us is within, so the estimate stays.
        p.record_completion_seen(t0 + us(5000), t0 + us(1100), us(4100), 4096, false);
        let l = p.load();
        assert_eq!((l.hst_latency_ns, l.newest_latency_ns), (200_000, 200_000));
        assert_eq!(l.fresh_samples, 2);
        // Seen at once: the whole latency counts, 1/8, though as at most
        // 4 x the estimate; the newest sample is kept as it was.
        p.record_completion_seen(t0 + us(6000), t0 + us(6000), us(1000), 4096, false);
        let l = p.load();
        assert_eq!(l.hst_latency_ns, (7 * 200_000 + 800_000) / 8);
        assert_eq!((l.newest_latency_ns, l.fresh_samples), (1_000_000, 3));
        // After an idle spell of 3 half-lives the estimates are replaced
        // and rest on one sample again.
        p.record_completion_seen(t0 + us(400_000), t0 + us(400_000), us(300), 4096, false);
        let l = p.load();
        assert_eq!((l.hst_latency_ns, l.fresh_samples), (300_000, 1));
    }

    #[test]
    fn service_time_ewma_forgets_with_age() {
        let ms = |n: u64| Some(n * 1_000_000);
        assert_eq!(service_time_update(0, 800, None), 800);
        assert_eq!(service_time_update(0, 0, None), 1);
        assert_eq!(service_time_update(800, 1600, None), 1600);
        // Fresh: 7/8 old, 1/8 new.
        assert_eq!(service_time_update(800, 1600, ms(1)), 900);
        // One half-life: 3/8 old; two: 1/8; three or more: replaced.
        assert_eq!(service_time_update(800, 1600, ms(100)), 1300);
        assert_eq!(service_time_update(800, 1600, ms(250)), 1500);
        assert_eq!(service_time_update(800, 1600, ms(300)), 1600);
        assert_eq!(service_time_update(u64::MAX, u64::MAX, ms(1)), u64::MAX);
    }

    #[test]
    fn ewma_moves_an_eighth() {
        assert_eq!(ewma_update(0, 800), 800);
        assert_eq!(ewma_update(800, 1600), 900);
        assert_eq!(ewma_update(800, 0), 700);
        assert_eq!(
            ewma_update(u64::MAX, u64::MAX),
            u64::MAX - u64::MAX / 8 + u64::MAX / 8
        );
    }
}
