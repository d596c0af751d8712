//! Path selectors. Lock-free: they read per-path atomics ([`PathLoad`]) and
//! at most one shared atomic counter; the caller supplies the candidates
//! (usable paths of the best ALUA tier) in a reused buffer.

use super::health::{BadSetting, Failback, FailbackClock};
use super::path::PathLoad;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Historical service time: a path that has finished nothing for this
/// long (or for `paths ×` its latency, if longer) and has nothing
/// outstanding gets one command as a probe while another path is busy, so
/// a slow path is measured again twice a second instead of being starved
/// on an old estimate forever; each probe costs one command at that path's
/// latency.
pub const HST_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Historical service time: commands larger than this are never probes
/// (a probe is one command at a slow path's speed; a small one costs
/// little there).
pub const HST_PROBE_MAX_BYTES: u64 = 64 << 10;

/// Historical service time: a path whose estimates rest on fewer
/// completions than this since they were last replaced (a probe after an
/// idle spell, a new or reconnected path) is on probation: it takes one
/// command at a time while another path can take the command, and its
/// newest sample counts if it is worse than its average. A probe can be
/// lucky (a token bucket refilled while the path idled answers the first
/// command or two at full speed): the path is then tried one command at a
/// time, and the first slow answer puts it back out of the running,
/// instead of a queue of commands at the slow rate.
pub const HST_PROBATION: u32 = 4;

/// Historical service time: paths whose latency estimates are within this
/// many percent of the best one, and whose service times are within
/// [`HST_SAME_SPEED`] of the best, count as one speed class; expected
/// completions within this many percent of the class's best tie, and
/// ties go to the fewest outstanding commands.
pub const HST_SAME_LATENCY_PERCENT: u64 = 150;

/// Historical service time: the service time (time per command, counted
/// with overlapping commands one after the other) of a path that carries
/// few commands is its whole round trip, that of a busy one the time
/// between completions, so two equal paths can differ by up to their
/// queue depth; within this factor of the best, a path still counts as
/// the same speed (as dm-multipath's `threshold_multiplier`), and a class
/// shares its best service time.
pub const HST_SAME_SPEED: u64 = 8;

/// How a device spreads commands over its usable paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Policy {
    #[default]
    /// Fewest outstanding commands; ties by outstanding bytes (default).
    QueueDepth,
    /// Outstanding bytes (plus this command) weighted by each path's recent
    /// latency (EWMA): a slow path gets proportionally less.
    ServiceTime,
    /// The smallest expected completion time, `max(latency, (outstanding
    /// + 1) × service time)` from each path's historical latency and service
    /// time (EWMAs; the service time counts overlapping commands one after
    /// the other: on a busy path, the time between completions), like
    /// dm-multipath's historical-service-time (Linux 5.8). Paths of one
    /// speed class (see [`HST_SAME_LATENCY_PERCENT`]) share by outstanding
    /// commands; a slower path gets a command only when it would finish
    /// sooner than on the class. A path idle and unheard of for
    /// [`HST_PROBE_INTERVAL`] is probed with one command while others are
    /// busy, and a freshly measured one is on [`HST_PROBATION`].
    HistoricalServiceTime,
    /// Rotate, switching path every `ios_per_path` commands.
    RoundRobin {
        /// Commands sent down one path before moving to the next (0 acts as 1).
        ios_per_path: u32,
    },
    /// One active path; the others stand by until it fails (no automatic
    /// fail-back, so a flapping path does not bounce I/O around).
    Failover,
}

impl std::str::FromStr for Policy {
    type Err = BadSetting;
    fn from_str(s: &str) -> Result<Policy, BadSetting> {
        match s {
            "queue-depth" => Ok(Policy::QueueDepth),
            "service-time" => Ok(Policy::ServiceTime),
            "historical-service-time" | "hst" => Ok(Policy::HistoricalServiceTime),
            "round-robin" => Ok(Policy::RoundRobin { ios_per_path: 1 }),
            "failover" => Ok(Policy::Failover),
            other => match other.strip_prefix("round-robin:") {
                Some(n) => n
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .map(|ios_per_path| Policy::RoundRobin { ios_per_path })
                    .ok_or_else(|| {
                        BadSetting::new("policy", other, "round-robin:N with a count N > 0")
                    }),
                None => Err(BadSetting::new(
                    "policy",
                    other,
                    "queue-depth, service-time, historical-service-time, round-robin[:N] or failover",
                )),
            },
        }
    }
}

/// Device-wide selector state shared by all submitters.
#[derive(Debug, Default)]
pub struct SelectorState {
    rr: AtomicU64,
    /// Failover: index of the active path + 1 (0 = none chosen yet).
    active: AtomicUsize,
    /// Failover: when to return to the preferred path.
    failback: FailbackClock,
}

impl SelectorState {
    /// Fresh state: round-robin starts at the first candidate, no failover
    /// path chosen yet.
    pub fn new() -> SelectorState {
        SelectorState::default()
    }

    /// Fresh state whose failover policy fails back as `failback` says.
    pub fn with_failback(failback: Failback) -> SelectorState {
        SelectorState {
            failback: FailbackClock::new(failback),
            ..SelectorState::default()
        }
    }

    /// The failover policy's current active path.
    pub fn active(&self) -> Option<usize> {
        self.active.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Manual failback: the next command goes to the preferred (lowest
    /// index usable) path, which then stays active.
    pub fn fail_back(&self) {
        self.active.store(0, Ordering::Relaxed);
    }
}

/// Picks one of `candidates` (non-empty for a result) for a command moving
/// `io_bytes` at `now`. `rotate` breaks ties (callers pass a per-queue
/// counter so idle paths share work instead of all going to the first one).
pub fn select(
    policy: Policy,
    candidates: &[PathLoad],
    io_bytes: u64,
    state: &SelectorState,
    rotate: usize,
    now: Instant,
) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    if n == 1 && policy != Policy::Failover {
        return Some(candidates[0].index);
    }
    match policy {
        Policy::QueueDepth => min_by_key(candidates, rotate, |p| {
            (p.outstanding as u128) << 64 | p.outstanding_bytes as u128
        }),
        Policy::ServiceTime => {
            // Paths without a sample yet get the best known latency, so they
            // are tried and measured instead of starving.
            let best = candidates
                .iter()
                .map(|p| p.latency_ewma_ns)
                .filter(|&l| l > 0)
                .min()
                .unwrap_or(1);
            min_by_key(candidates, rotate, |p| {
                let lat = if p.latency_ewma_ns == 0 {
                    best
                } else {
                    p.latency_ewma_ns
                };
                (p.outstanding_bytes as u128 + io_bytes.max(1) as u128) * lat as u128
            })
        }
        Policy::HistoricalServiceTime => historical_service_time(candidates, io_bytes, rotate, now),
        Policy::RoundRobin { ios_per_path } => {
            let k = state.rr.fetch_add(1, Ordering::Relaxed) / u64::from(ios_per_path.max(1));
            Some(candidates[(k % n as u64) as usize].index)
        }
        Policy::Failover => {
            // Lowest index = highest priority (configuration order).
            let best = candidates.iter().map(|p| p.index).min()?;
            if let Some(a) = state.active() {
                if candidates.iter().any(|p| p.index == a) {
                    if best >= a {
                        state.failback.no_better_path();
                        return Some(a);
                    }
                    if !state
                        .failback
                        .should_fail_back(best, std::time::Instant::now)
                    {
                        return Some(a);
                    }
                    log::info!("failover: failing back from path {a} to path {best}");
                }
            }
            let pick = best;
            state.active.store(pick + 1, Ordering::Relaxed);
            Some(pick)
        }
    }
}

/// [`Policy::HistoricalServiceTime`]: a probe if one is due; else the
/// speed class of the best latency (paths on probation with a command
/// outstanding left out while another can take it) shares by outstanding
/// commands among those whose expected completion ties with the class's
/// best, unless a path outside the class expects to finish sooner.
fn historical_service_time(
    candidates: &[PathLoad],
    io_bytes: u64,
    rotate: usize,
    now: Instant,
) -> Option<usize> {
    let n = candidates.len();
    // Probe: an idle path not heard from for the probe interval, while
    // another carries commands (an idle device measures nothing: its next
    // command simply goes to the path expected to be fastest). The one
    // waiting longest first; one probe per path at a time, as a probe in
    // flight makes the path busy.
    let others_busy = candidates.iter().any(|p| p.outstanding > 0);
    if others_busy && io_bytes <= HST_PROBE_MAX_BYTES {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        let due = |p: &PathLoad| {
            p.outstanding == 0
                && p.last_finish.is_none_or(|t| {
                    let stale_after = HST_PROBE_INTERVAL
                        .max(Duration::from_nanos(p.hst_latency_ns).saturating_mul(n32));
                    now.saturating_duration_since(t) >= stale_after
                })
        };
        // None (never finished) sorts first: it waited longest.
        let probe = candidates
            .iter()
            .filter(|p| due(p))
            .min_by_key(|p| p.last_finish);
        if let Some(p) = probe {
            return Some(p.index);
        }
    }
    let on_probation = |p: &PathLoad| p.fresh_samples < HST_PROBATION;
    // On probation one command at a time, unless every path is.
    let held = |p: &PathLoad| on_probation(p) && p.outstanding > 0;
    let all_held = candidates.iter().all(held);
    let eligible = |p: &PathLoad| all_held || !held(p);
    // The latency a new command can expect at least; on probation the
    // newest sample too, if worse (0: unmeasured).
    let latency = |p: &PathLoad| {
        if on_probation(p) {
            p.hst_latency_ns.max(p.newest_latency_ns)
        } else {
            p.hst_latency_ns
        }
    };
    let measured_min = |f: &dyn Fn(&PathLoad) -> u64| {
        candidates
            .iter()
            .filter(|p| eligible(p))
            .map(f)
            .filter(|&v| v > 0)
            .min()
    };
    let Some(best_latency) = measured_min(&latency) else {
        // Nothing measured yet: fewest outstanding.
        return min_by_key(candidates, rotate, |p| {
            if eligible(p) {
                (p.outstanding as u128) << 64 | p.outstanding_bytes as u128
            } else {
                u128::MAX
            }
        });
    };
    let best_service = measured_min(&|p| p.service_time_ns).unwrap_or(best_latency);
    // Unmeasured paths count as the best, so they are tried and measured.
    let lat = |p: &PathLoad| match latency(p) {
        0 => best_latency,
        l => l,
    };
    let in_class = |p: &PathLoad| {
        eligible(p)
            && lat(p) as u128 * 100 <= best_latency as u128 * HST_SAME_LATENCY_PERCENT as u128
            && p.service_time_ns <= best_service.saturating_mul(HST_SAME_SPEED)
    };
    // A class shares its best service time: the figure of a path that
    // carries few commands is its round trip, not what one more costs.
    let class_service = candidates
        .iter()
        .filter(|p| in_class(p))
        .map(|p| p.service_time_ns)
        .filter(|&t| t > 0)
        .min()
        .unwrap_or(best_latency);
    let expected = |p: &PathLoad| {
        let service = if in_class(p) {
            class_service
        } else if p.service_time_ns == 0 {
            lat(p)
        } else {
            p.service_time_ns
        };
        (lat(p) as u128).max((p.outstanding as u128 + 1) * service as u128)
    };
    let class_best = candidates
        .iter()
        .filter(|p| in_class(p))
        .map(expected)
        .min();
    let outsider = candidates
        .iter()
        .filter(|p| eligible(p) && !in_class(p))
        .map(|p| (expected(p), p.index))
        .min();
    match (class_best, outsider) {
        (_, Some((e, index))) if class_best.is_none_or(|best| e < best) => Some(index),
        (Some(best), _) => min_by_key(candidates, rotate, |p| {
            if in_class(p) && expected(p) * 100 <= best * HST_SAME_LATENCY_PERCENT as u128 {
                (p.outstanding as u128) << 64 | p.outstanding_bytes as u128
            } else {
                u128::MAX
            }
        }),
        (None, _) => None,
    }
}

/// The candidate with the smallest key; among equal keys the first one at
/// or after `rotate` (cyclically).
fn min_by_key(
    candidates: &[PathLoad],
    rotate: usize,
    key: impl Fn(&PathLoad) -> u128,
) -> Option<usize> {
    let n = candidates.len();
    let start = rotate % n;
    let mut best: Option<(u128, usize)> = None;
    for i in 0..n {
        let p = &candidates[(start + i) % n];
        let k = key(p);
        if best.is_none_or(|(bk, _)| k < bk) {
            best = Some((k, p.index));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The selectors that look at no clock, at any time.
    fn select(
        policy: Policy,
        candidates: &[PathLoad],
        io_bytes: u64,
        state: &SelectorState,
        rotate: usize,
    ) -> Option<usize> {
        super::select(policy, candidates, io_bytes, state, rotate, Instant::now())
    }

    fn load(index: usize, outstanding: u64, bytes: u64, lat_us: u64) -> PathLoad {
        PathLoad {
            index,
            outstanding,
            outstanding_bytes: bytes,
            latency_ewma_ns: lat_us * 1000,
            ..PathLoad::default()
        }
    }

    /// A path for historical-service-time: outstanding commands, service
    /// time, and when it last finished a command (`finished_ago`).
    fn hst_load(
        index: usize,
        outstanding: u64,
        service_us: u64,
        finished_ago: Option<Duration>,
        now: Instant,
    ) -> PathLoad {
        PathLoad {
            index,
            outstanding,
            outstanding_bytes: outstanding * 4096,
            service_time_ns: service_us * 1000,
            last_finish: finished_ago.map(|d| now - d),
            ..PathLoad::default()
        }
    }

    fn hst(c: &[PathLoad], rotate: usize, now: Instant) -> Option<usize> {
        super::select(
            Policy::HistoricalServiceTime,
            c,
            4096,
            &SelectorState::new(),
            rotate,
            now,
        )
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn hst_picks_the_smallest_expected_completion() {
        let now = Instant::now() + Duration::from_secs(10);
        // Fast path (25 us per command) with 7 outstanding: 8 x 25 = 200 us
        // beats an idle slow path's 1700 us.
        let c = [
            hst_load(0, 7, 25, Some(MS), now),
            hst_load(1, 0, 1700, Some(MS), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(0));
        // With 80 queued on it (81 x 25 = 2025 us) the slow path is sooner.
        let c = [
            hst_load(0, 80, 25, Some(MS), now),
            hst_load(1, 0, 1700, Some(MS), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(1));
        // Outstanding counts, not bytes: equal service, fewer commands wins.
        let c = [
            hst_load(0, 3, 100, Some(MS), now),
            hst_load(1, 2, 100, Some(MS), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(1));
        // Within HST_SAME_SPEED of each other paths count as equally fast:
        // fewest outstanding (else 2 x 500 us would lose to 4 x 100 us).
        let c = [
            hst_load(0, 3, 100, Some(MS), now),
            hst_load(1, 1, 500, Some(MS), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(1));
        let c = [
            hst_load(0, 3, 100, Some(MS), now),
            hst_load(1, 1, 900, Some(MS), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(0));
        // Equal estimates rotate.
        let c = [
            hst_load(4, 1, 100, Some(MS), now),
            hst_load(6, 1, 100, Some(MS), now),
        ];
        let picks: Vec<_> = (0..4).map(|r| hst(&c, r, now).unwrap()).collect();
        assert_eq!(picks, vec![4, 6, 4, 6]);
    }

    #[test]
    fn hst_probes_a_stale_idle_path_while_another_is_busy() {
        let now = Instant::now() + Duration::from_secs(10);
        let stale = Some(HST_PROBE_INTERVAL + MS);
        // The slow path finished nothing for over the probe interval and is
        // idle, the fast one is busy: one probe.
        let c = [
            hst_load(0, 4, 25, Some(MS), now),
            hst_load(1, 0, 1700, stale, now),
        ];
        assert_eq!(hst(&c, 0, now), Some(1));
        // The probe in flight: no second one.
        let c = [
            hst_load(0, 4, 25, Some(MS), now),
            hst_load(1, 1, 1700, stale, now),
        ];
        assert_eq!(hst(&c, 0, now), Some(0));
        // Heard from recently: no probe.
        let recent = Some(HST_PROBE_INTERVAL - MS);
        let c = [
            hst_load(0, 4, 25, Some(MS), now),
            hst_load(1, 0, 1700, recent, now),
        ];
        assert_eq!(hst(&c, 0, now), Some(0));
        // An idle device probes nothing: the fastest path gets the command.
        let c = [
            hst_load(0, 0, 25, stale, now),
            hst_load(1, 0, 1700, stale, now),
        ];
        assert_eq!(hst(&c, 1, now), Some(0));
        // A very slow path (1 s per command) is stale only after paths x
        // its service time: 2 s here.
        let c = [
            hst_load(0, 4, 25, Some(MS), now),
            hst_load(1, 0, 1_000_000, Some(1500 * MS), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(0));
        let c = [
            hst_load(0, 4, 25, Some(MS), now),
            hst_load(1, 0, 1_000_000, Some(2001 * MS), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(1));
        // Of two stale idle paths, the one waiting longest; never-heard-of first.
        let c = [
            hst_load(0, 4, 25, Some(MS), now),
            hst_load(1, 0, 900, Some(3 * HST_PROBE_INTERVAL), now),
            hst_load(2, 0, 900, Some(5 * HST_PROBE_INTERVAL), now),
        ];
        assert_eq!(hst(&c, 0, now), Some(2));
        let c = [
            hst_load(0, 4, 25, Some(MS), now),
            hst_load(1, 0, 900, Some(5 * HST_PROBE_INTERVAL), now),
            hst_load(2, 0, 0, None, now),
        ];
        assert_eq!(hst(&c, 0, now), Some(2));
    }

    #[test]
    fn hst_counts_unmeasured_paths_at_the_best_known_service_time() {
        let now = Instant::now();
        // Idle device: the unmeasured path weighs 1 x 25 us, the measured
        // one 2 x 25 us.
        let c = [
            hst_load(0, 1, 25, Some(MS), now),
            hst_load(1, 0, 0, None, now),
        ];
        assert_eq!(hst(&c, 0, now), Some(1));
        // Nothing measured yet anywhere: fewest outstanding.
        let c = [hst_load(0, 2, 0, None, now), hst_load(1, 1, 0, None, now)];
        assert_eq!(hst(&c, 0, now), Some(1));
        assert_eq!(hst(&[], 0, now), None);
    }

    #[test]
    fn no_candidates_no_path() {
        for p in [
            Policy::QueueDepth,
            Policy::ServiceTime,
            Policy::HistoricalServiceTime,
            Policy::RoundRobin { ios_per_path: 1 },
            Policy::Failover,
        ] {
            assert_eq!(select(p, &[], 4096, &SelectorState::new(), 0), None);
        }
    }

    #[test]
    fn queue_depth_prefers_fewest_outstanding_then_fewest_bytes() {
        let s = SelectorState::new();
        let c = [load(0, 4, 100, 0), load(1, 2, 9999, 0), load(2, 3, 0, 0)];
        assert_eq!(select(Policy::QueueDepth, &c, 4096, &s, 0), Some(1));
        let c = [load(0, 2, 8192, 0), load(1, 2, 4096, 0)];
        assert_eq!(select(Policy::QueueDepth, &c, 4096, &s, 0), Some(1));
        // Latency does not matter to queue-depth.
        let c = [load(0, 1, 0, 10_000), load(1, 1, 0, 1)];
        assert_eq!(select(Policy::QueueDepth, &c, 4096, &s, 0), Some(0));
    }

    #[test]
    fn queue_depth_ties_rotate() {
        let s = SelectorState::new();
        let c = [load(3, 0, 0, 0), load(5, 0, 0, 0), load(9, 1, 0, 0)];
        let picks: Vec<_> = (0..4)
            .map(|r| select(Policy::QueueDepth, &c, 512, &s, r).unwrap())
            .collect();
        assert_eq!(picks, vec![3, 5, 3, 3]);
    }

    #[test]
    fn service_time_weights_bytes_by_latency() {
        let s = SelectorState::new();
        // Slow path idle, fast path with some bytes: fast still wins while
        // (bytes + io) * 100us < io * 1000us.
        let c = [load(0, 0, 0, 1000), load(1, 4, 4 * 4096, 100)];
        assert_eq!(select(Policy::ServiceTime, &c, 4096, &s, 0), Some(1));
        // Enough queued on the fast path: the slow one is cheaper.
        let c = [load(0, 0, 0, 1000), load(1, 20, 20 * 4096, 100)];
        assert_eq!(select(Policy::ServiceTime, &c, 4096, &s, 0), Some(0));
        // Equal latency: fewest bytes.
        let c = [load(0, 1, 8192, 50), load(1, 3, 4096, 50)];
        assert_eq!(select(Policy::ServiceTime, &c, 4096, &s, 0), Some(1));
    }

    #[test]
    fn service_time_tries_unmeasured_paths() {
        let s = SelectorState::new();
        let c = [load(0, 1, 4096, 500), load(1, 0, 0, 0)];
        assert_eq!(select(Policy::ServiceTime, &c, 4096, &s, 0), Some(1));
    }

    /// A closed-loop model in virtual time: `qd` commands always in
    /// flight over FIFO paths (per-command service time, plus a fixed
    /// round trip), with the real per-path accounting
    /// ([`PathShared::record_completion_seen`]) feeding the real selector.
    /// `speed(path, t)` gives a path's service time at `t`. Returns the
    /// latency histogram (µs) and the commands per path, both counted from
    /// `measure_from`. The initiator sees each completion at once.
    fn model(
        policy: Policy,
        paths: usize,
        speed: impl Fn(usize, Duration) -> Duration,
        run: Duration,
        measure_from: Duration,
    ) -> (hdrhistogram::Histogram<u64>, Vec<u64>) {
        model_polled(policy, paths, speed, run, measure_from, None, true)
    }

    /// How a starved initiator looks: half its polls come 5-50 µs after
    /// the one before, half 0.5-4 ms after (descheduled), from a seeded
    /// xorshift.
    struct Starved(u64);

    impl Starved {
        fn gap(&mut self) -> Duration {
            let mut r = || {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0
            };
            let us = if r() % 2 == 0 {
                5 + r() % 46
            } else {
                500 + r() % 3501
            };
            Duration::from_micros(us)
        }
    }

    /// [`model`], with the initiator polling at the times `starved` gives
    /// (None: at every completion): a completion is seen, and the next
    /// command submitted, at the first poll after it finished, the same
    /// for every path. `tell_looked`: the accounting learns when the
    /// initiator looked before (as the path worker tells it); false: every
    /// completion is recorded as if seen the moment it finished.
    fn model_polled(
        policy: Policy,
        paths: usize,
        speed: impl Fn(usize, Duration) -> Duration,
        run: Duration,
        measure_from: Duration,
        mut starved: Option<Starved>,
        tell_looked: bool,
    ) -> (hdrhistogram::Histogram<u64>, Vec<u64>) {
        use super::super::path::PathShared;
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        const RTT: Duration = Duration::from_micros(100);
        let qd = 8;
        let t0 = Instant::now();
        let shared: Vec<PathShared> = (0..paths).map(|i| PathShared::new(i, "m", t0)).collect();
        let state = SelectorState::new();
        let mut free_at = vec![t0; paths];
        let mut events = BinaryHeap::new();
        let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        let mut per_path = vec![0; paths];
        let mut loads = Vec::new();
        let mut submit = |at: Instant, events: &mut BinaryHeap<_>, rotate: usize| {
            loads.clear();
            loads.extend(shared.iter().map(PathShared::load));
            let p = super::select(policy, &loads, 4096, &state, rotate, at).unwrap();
            shared[p].add_outstanding(4096);
            let begin = at.max(free_at[p]);
            free_at[p] = begin + speed(p, at - t0);
            events.push(Reverse((free_at[p] + RTT, p, at)));
        };
        for i in 0..qd {
            submit(t0, &mut events, i);
        }
        let mut n = 0;
        let mut looked = t0;
        while let Some(&Reverse((next, _, _))) = events.peek() {
            // The poll that sees the next completion.
            let mut now = looked;
            match starved.as_mut() {
                None => {
                    now = next;
                    looked = now;
                }
                Some(s) => {
                    while now < next {
                        looked = now;
                        now += s.gap();
                    }
                }
            }
            let mut seen = Vec::new();
            while let Some(&Reverse((done, p, at))) = events.peek() {
                if done > now {
                    break;
                }
                events.pop();
                seen.push((p, at));
            }
            for (p, at) in seen {
                shared[p].sub_outstanding(4096);
                let before = if tell_looked { looked.min(now) } else { now };
                shared[p].record_completion_seen(now, before, now - at, 4096, false);
                if at - t0 >= measure_from {
                    hist.record((now - at).as_micros() as u64).unwrap();
                    per_path[p] += 1;
                }
                if now - t0 < run {
                    n += 1;
                    submit(now, &mut events, n);
                }
            }
            looked = now;
        }
        (hist, per_path)
    }

    #[test]
    fn hst_keeps_the_p99_of_a_fast_and_a_slow_path_near_the_fast_ones() {
        // 60 µs per command on path 0, 1.7 ms (4 KiB at 20 Mbit/s) on 1.
        let speed = |p: usize, _| Duration::from_micros(if p == 0 { 60 } else { 1700 });
        let run = Duration::from_secs(4);
        let from = Duration::from_millis(500);
        let (alone, _) = model(Policy::QueueDepth, 1, speed, run, from);
        let (hst, hst_paths) = model(Policy::HistoricalServiceTime, 2, speed, run, from);
        let (st, st_paths) = model(Policy::ServiceTime, 2, speed, run, from);
        let share = |v: &[u64]| v[1] as f64 / v.iter().sum::<u64>() as f64;
        let p99 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.99);
        println!(
            "model: fast alone p99 {} us; hst p99 {} us, slow share {:.5}; service-time p99 {} us, slow share {:.5}",
            p99(&alone),
            p99(&hst),
            share(&hst_paths),
            p99(&st),
            share(&st_paths)
        );
        // The goal: p99 <= 1.5 x the fast path's alone. The slow path gets
        // its probes (about one a second) and little else.
        assert!(
            p99(&hst) * 2 <= p99(&alone) * 3,
            "hst p99 {} vs alone {}",
            p99(&hst),
            p99(&alone)
        );
        assert!(
            (1..=20).contains(&hst_paths[1]),
            "slow path got {} commands",
            hst_paths[1]
        );
        // Service-time weighs latency that includes the fast path's own
        // queue, so the slow path looks cheaper whenever that queue is full.
        assert!(
            p99(&st) > p99(&hst) * 3 / 2,
            "service-time p99 {} vs hst {}",
            p99(&st),
            p99(&hst)
        );
    }

    #[test]
    fn hst_keeps_the_p99_near_the_fast_paths_on_a_starved_initiator() {
        // As above, but the initiator polls as a starved one does (see
        // `Starved`): completions wait unseen for up to 4 ms, in batches,
        // the same wait for both paths. Counted as path time, the wait
        // makes the fast path look as slow as its initiator (within
        // HST_SAME_SPEED of the slow one), and hst shares by outstanding
        // commands like queue-depth; bounded by when the worker looked,
        // the estimate stays the path's.
        let speed = |p: usize, _| Duration::from_micros(if p == 0 { 60 } else { 1700 });
        let run = Duration::from_secs(4);
        let from = Duration::from_millis(500);
        let share = |v: &[u64]| v[1] as f64 / v.iter().sum::<u64>() as f64;
        let p99 = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.99);
        let (mut total, mut naive_total) = (0.0, 0.0);
        for seed in [1, 7] {
            let poll = || Some(Starved(0x9e37_79b9_7f4a_7c15 ^ seed));
            let hst = Policy::HistoricalServiceTime;
            let (alone, _) = model_polled(Policy::QueueDepth, 1, speed, run, from, poll(), true);
            let (mixed, paths) = model_polled(hst, 2, speed, run, from, poll(), true);
            let (naive, naive_paths) = model_polled(hst, 2, speed, run, from, poll(), false);
            naive_total += share(&naive_paths);
            total += share(&paths);
            println!(
                "starved model seed {seed}: fast alone p99 {} us; hst p99 {} us, slow share {:.5}; counting the wait: p99 {} us, slow share {:.5}",
                p99(&alone),
                p99(&mixed),
                share(&paths),
                p99(&naive),
                share(&naive_paths)
            );
            assert!(
                p99(&mixed) * 2 <= p99(&alone) * 3,
                "seed {seed}: hst p99 {} vs alone {}",
                p99(&mixed),
                p99(&alone)
            );
            assert!(share(&paths) < 0.02, "seed {seed}: slow share {paths:?}");
        }
        // The model shows the fault: counting the wait as path time sends
        // the slow path a share like queue-depth's.
        assert!(
            naive_total > 5.0 * total,
            "slow share counting the wait {naive_total:.4}, bounded {total:.4}"
        );
    }

    #[test]
    fn hst_splits_equal_paths_evenly_on_a_starved_initiator() {
        let speed = |_, _| Duration::from_micros(60);
        for starved in [None, Some(Starved(5)), Some(Starved(99))] {
            let (_, per_path) = model_polled(
                Policy::HistoricalServiceTime,
                2,
                speed,
                Duration::from_secs(2),
                Duration::from_millis(500),
                starved,
                true,
            );
            let share = per_path[1] as f64 / (per_path[0] + per_path[1]) as f64;
            assert!(
                (0.45..=0.55).contains(&share),
                "path 1 share {share:.3} ({per_path:?})"
            );
        }
    }

    #[test]
    fn hst_finds_a_slow_path_that_got_fast() {
        // Path 1 is slow for the first 2 s, then as fast as path 0: the
        // probes notice, and it takes its half again (the two equal paths
        // share the load, though the busier one's service time looks
        // shorter; see HST_SAME_SPEED).
        let speed = |p: usize, t: Duration| {
            Duration::from_micros(if p == 1 && t < Duration::from_secs(2) {
                1700
            } else {
                25
            })
        };
        let (_, per_path) = model(
            Policy::HistoricalServiceTime,
            2,
            speed,
            Duration::from_secs(5),
            Duration::from_secs(4),
        );
        let share = per_path[1] as f64 / (per_path[0] + per_path[1]) as f64;
        assert!(
            share > 0.3,
            "path 1 share {share:.3} after it got fast ({per_path:?})"
        );
    }

    #[test]
    fn round_robin_switches_every_n() {
        let s = SelectorState::new();
        let c = [load(0, 50, 0, 0), load(1, 0, 0, 0), load(2, 0, 0, 0)];
        let p = Policy::RoundRobin { ios_per_path: 2 };
        let picks: Vec<_> = (0..8).map(|_| select(p, &c, 1, &s, 0).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 1, 2, 2, 0, 0]);
    }

    #[test]
    fn failover_sticks_to_one_path_until_it_disappears() {
        let s = SelectorState::new();
        let both = [load(0, 100, 0, 0), load(1, 0, 0, 0)];
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(0));
        assert_eq!(select(Policy::Failover, &both, 1, &s, 1), Some(0));
        let only1 = [load(1, 0, 0, 0)];
        assert_eq!(select(Policy::Failover, &only1, 1, &s, 0), Some(1));
        // Path 0 is back: no fail-back.
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(1));
        assert_eq!(s.active(), Some(1));
    }

    #[test]
    fn failover_fails_back_immediately_after_a_delay_or_on_request() {
        let both = [load(0, 0, 0, 0), load(1, 0, 0, 0)];
        let only1 = [load(1, 0, 0, 0)];
        let s = SelectorState::with_failback(Failback::Immediate);
        assert_eq!(select(Policy::Failover, &only1, 1, &s, 0), Some(1));
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(0));
        // Manual: stays until fail_back().
        let s = SelectorState::with_failback(Failback::Manual);
        assert_eq!(select(Policy::Failover, &only1, 1, &s, 0), Some(1));
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(1));
        s.fail_back();
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(0));
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(0));
        // A delay: the wait itself is FailbackClock's (tested with a fake
        // clock in multipath::health); an hour is not over yet.
        let s = SelectorState::with_failback(Failback::After(std::time::Duration::from_secs(3600)));
        assert_eq!(select(Policy::Failover, &only1, 1, &s, 0), Some(1));
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(1));
        let s = SelectorState::with_failback(Failback::After(std::time::Duration::ZERO));
        assert_eq!(select(Policy::Failover, &only1, 1, &s, 0), Some(1));
        assert_eq!(select(Policy::Failover, &both, 1, &s, 0), Some(0));
    }

    #[test]
    fn policy_names_parse() {
        assert_eq!("queue-depth".parse(), Ok(Policy::QueueDepth));
        assert_eq!(
            "historical-service-time".parse(),
            Ok(Policy::HistoricalServiceTime)
        );
        assert_eq!("hst".parse(), Ok(Policy::HistoricalServiceTime));
        assert_eq!(
            "round-robin:16".parse(),
            Ok(Policy::RoundRobin { ios_per_path: 16 })
        );
        assert_eq!(
            "round-robin:0".parse::<Policy>().unwrap_err().to_string(),
            "policy \"round-robin:0\": want round-robin:N with a count N > 0"
        );
        assert!("fastest".parse::<Policy>().is_err());
    }
}
