//! Path selectors. Lock-free: they read per-path atomics ([`PathLoad`]) and
//! at most one shared atomic counter; the caller supplies the candidates
//! (usable paths of the best ALUA tier) in a reused buffer.

use super::health::{Failback, FailbackClock};
use super::path::PathLoad;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How a device spreads commands over its usable paths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Policy {
    #[default]
    /// Fewest outstanding commands; ties by outstanding bytes (default).
    QueueDepth,
    /// Outstanding bytes (plus this command) weighted by each path's recent
    /// latency (EWMA): a slow path gets proportionally less.
    ServiceTime,
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
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "queue-depth" => Ok(Policy::QueueDepth),
            "service-time" => Ok(Policy::ServiceTime),
            "round-robin" => Ok(Policy::RoundRobin { ios_per_path: 1 }),
            "failover" => Ok(Policy::Failover),
            other => match other.strip_prefix("round-robin:") {
                Some(n) => n
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .map(|ios_per_path| Policy::RoundRobin { ios_per_path })
                    .ok_or_else(|| format!("bad round-robin count in {other:?}")),
                None => Err(format!(
                    "unknown policy {other:?} (queue-depth, service-time, round-robin[:N], failover)"
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
/// `io_bytes`. `rotate` breaks ties (callers pass a per-queue counter so
/// idle paths share work instead of all going to the first one).
pub fn select(
    policy: Policy,
    candidates: &[PathLoad],
    io_bytes: u64,
    state: &SelectorState,
    rotate: usize,
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

    fn load(index: usize, outstanding: u64, bytes: u64, lat_us: u64) -> PathLoad {
        PathLoad {
            index,
            outstanding,
            outstanding_bytes: bytes,
            latency_ewma_ns: lat_us * 1000,
        }
    }

    #[test]
    fn no_candidates_no_path() {
        for p in [
            Policy::QueueDepth,
            Policy::ServiceTime,
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
            "round-robin:16".parse(),
            Ok(Policy::RoundRobin { ios_per_path: 16 })
        );
        assert!("round-robin:0".parse::<Policy>().is_err());
        assert!("fastest".parse::<Policy>().is_err());
    }
}
