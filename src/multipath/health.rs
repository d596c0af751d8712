//! Path health settings as multipath-tools users know them, and their
//! sans-IO logic (every decision takes `now`; the tests drive it with a
//! fake clock):
//!
//! - [`FlapDamping`] (`san_path_err_threshold`, `san_path_err_forget_rate`,
//!   `san_path_err_recovery_time`; marginal paths): a path that fails
//!   `threshold` times within `window` stays out for `hold_down` before it
//!   may log in again. [`FlapWindow`] keeps the count; `PathHealth` applies
//!   it to the reconnect schedule.
//! - [`Failback`] under the `failover` policy: back to the preferred
//!   (lowest-index) path at once, after it has been usable for a delay, or
//!   only when the application asks (`WorkerDevice::failback`).
//!   [`FailbackClock`] decides; the selector asks it.
//! - [`NoPathRetry`] (`no_path_retry` / `queue_if_no_path`): how long I/O
//!   waits when no path is usable: fail at once, N checks of the no-path
//!   interval, or queue until a path returns.
#![warn(missing_docs)]

use std::collections::VecDeque;
use thiserror::Error;

/// A setting's text that does not parse ([`FlapDamping`], [`Failback`],
/// [`NoPathRetry`], [`Policy`](super::Policy)): which setting, the value
/// given, and what it wants.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{setting} {value:?}: want {want}")]
pub struct BadSetting {
    /// The setting, e.g. `failback`.
    pub setting: &'static str,
    /// The text given.
    pub value: String,
    /// What the setting takes.
    pub want: &'static str,
}

impl BadSetting {
    /// `value` does not parse as `setting`, which wants `want`.
    pub fn new(setting: &'static str, value: &str, want: &'static str) -> BadSetting {
        BadSetting {
            setting,
            value: value.to_string(),
            want,
        }
    }
}
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Flap damping (multipath-tools' `san_path_err_*`): `threshold` failures
/// of a live path within `window` hold it down for `hold_down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FlapDamping {
    /// Failures that make a path marginal (`san_path_err_threshold`).
    pub threshold: u32,
    /// How long a failure is remembered (`san_path_err_forget_rate`, here
    /// as a time instead of a count of checker intervals).
    pub window: Duration,
    /// How long a marginal path stays out (`san_path_err_recovery_time`).
    pub hold_down: Duration,
}

impl std::str::FromStr for FlapDamping {
    type Err = BadSetting;
    /// `N:WINDOW_SECS:HOLD_SECS`, e.g. `3:60:120`.
    fn from_str(s: &str) -> Result<FlapDamping, BadSetting> {
        let bad = || {
            BadSetting::new(
                "flap damping",
                s,
                "THRESHOLD:WINDOW_SECS:HOLD_SECS, e.g. 3:60:120",
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let [n, w, h] = parts[..] else {
            return Err(bad());
        };
        let threshold: u32 = n.parse().map_err(|_| bad())?;
        let secs = |v: &str| v.parse::<f64>().ok().filter(|x| x.is_finite() && *x > 0.0);
        let (Some(w), Some(h)) = (secs(w), secs(h)) else {
            return Err(bad());
        };
        if threshold == 0 {
            return Err(bad());
        }
        Ok(FlapDamping {
            threshold,
            window: Duration::from_secs_f64(w),
            hold_down: Duration::from_secs_f64(h),
        })
    }
}

/// The failures of one path within the damping window.
#[derive(Debug, Clone)]
pub struct FlapWindow {
    damping: FlapDamping,
    failures: VecDeque<Instant>,
}

impl FlapWindow {
    /// An empty record.
    pub fn new(damping: FlapDamping) -> FlapWindow {
        FlapWindow {
            damping,
            failures: VecDeque::new(),
        }
    }

    /// A live path failed at `now`: `Some(until)` when this failure makes
    /// it marginal (the record then starts afresh).
    pub fn on_failure(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&t) = self.failures.front() {
            if now.saturating_duration_since(t) > self.damping.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        self.failures.push_back(now);
        if self.failures.len() as u64 >= u64::from(self.damping.threshold.max(1)) {
            self.failures.clear();
            Some(now + self.damping.hold_down)
        } else {
            None
        }
    }

    /// The settings.
    pub fn damping(&self) -> FlapDamping {
        self.damping
    }

    /// Failures remembered at `now`.
    pub fn recent(&self, now: Instant) -> usize {
        self.failures
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) <= self.damping.window)
            .count()
    }
}

/// When the `failover` policy returns to the preferred path (the lowest
/// index among the usable paths of the best ALUA tier).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum Failback {
    /// As soon as the preferred path is usable again.
    Immediate,
    /// Once the preferred path has been usable for this long (seen by the
    /// selector throughout).
    After(Duration),
    /// Never by itself: the application calls `WorkerDevice::failback`.
    #[default]
    Manual,
}

impl std::str::FromStr for Failback {
    type Err = BadSetting;
    /// `immediate`, `manual`, or a delay in seconds (`followover` is not
    /// supported).
    fn from_str(s: &str) -> Result<Failback, BadSetting> {
        match s {
            "immediate" => Ok(Failback::Immediate),
            "manual" => Ok(Failback::Manual),
            secs => secs
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(|x| Failback::After(Duration::from_secs_f64(x)))
                .ok_or_else(|| BadSetting::new("failback", s, "immediate, manual or SECONDS")),
        }
    }
}

/// The failback decision, lock-free (the selector runs on every submitter
/// thread): which better path has been waiting since when.
#[derive(Debug)]
pub struct FailbackClock {
    mode: Failback,
    origin: Instant,
    /// Index + 1 of the better path seen waiting (0: none).
    pending: AtomicUsize,
    /// When it was first seen, in ns since `origin`.
    since_ns: AtomicU64,
}

impl Default for FailbackClock {
    fn default() -> FailbackClock {
        FailbackClock::new(Failback::default())
    }
}

impl FailbackClock {
    /// A clock for `mode`.
    pub fn new(mode: Failback) -> FailbackClock {
        FailbackClock {
            mode,
            origin: Instant::now(),
            pending: AtomicUsize::new(0),
            since_ns: AtomicU64::new(0),
        }
    }

    /// The mode.
    pub fn mode(&self) -> Failback {
        self.mode
    }

    /// Whether to move from the active path to `better` (usable, lower
    /// index) now. `now` is called only when the answer depends on time.
    pub fn should_fail_back(&self, better: usize, now: impl FnOnce() -> Instant) -> bool {
        match self.mode {
            Failback::Immediate => true,
            Failback::Manual => false,
            Failback::After(delay) => {
                let now = now();
                let ns = now.saturating_duration_since(self.origin).as_nanos() as u64;
                if self.pending.swap(better + 1, Ordering::AcqRel) != better + 1 {
                    self.since_ns.store(ns, Ordering::Release);
                    return delay.is_zero();
                }
                let since = self.since_ns.load(Ordering::Acquire);
                if Duration::from_nanos(ns.saturating_sub(since)) >= delay {
                    self.pending.store(0, Ordering::Release);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// No better path is usable: a wait in progress starts over.
    pub fn no_better_path(&self) {
        if self.pending.load(Ordering::Relaxed) != 0 {
            self.pending.store(0, Ordering::Release);
        }
    }
}

/// How long I/O waits for a usable path (multipath-tools' `no_path_retry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum NoPathRetry {
    /// Fail at once with `IoError::NoPath` (`no_path_retry fail`).
    Fail,
    /// Wait this many no-path check intervals (`no_path_retry N`).
    Retries(u32),
    /// Queue until a path returns (`no_path_retry queue`,
    /// `queue_if_no_path`); only closing the device ends the wait.
    Queue,
}

/// The no-path check interval of `NoPathRetry::Retries` by default
/// (multipath-tools' `polling_interval`).
pub const NO_PATH_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What "for ever" is in a `no_path_timeout` (about 136 years; `Instant`
/// arithmetic does not overflow with it).
pub const QUEUE_FOREVER: Duration = Duration::from_secs(u32::MAX as u64);

impl NoPathRetry {
    /// The `no_path_timeout` this means with checks every `interval`.
    pub fn timeout(self, interval: Duration) -> Duration {
        match self {
            NoPathRetry::Fail => Duration::ZERO,
            NoPathRetry::Retries(n) => interval.saturating_mul(n).min(QUEUE_FOREVER),
            NoPathRetry::Queue => QUEUE_FOREVER,
        }
    }
}

impl std::str::FromStr for NoPathRetry {
    type Err = BadSetting;
    /// `fail`, `queue`, or a number of retries.
    fn from_str(s: &str) -> Result<NoPathRetry, BadSetting> {
        match s {
            "fail" => Ok(NoPathRetry::Fail),
            "queue" => Ok(NoPathRetry::Queue),
            n => n
                .parse()
                .map(NoPathRetry::Retries)
                .map_err(|_| BadSetting::new("no_path_retry", s, "fail, queue or a number")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn flaps_within_the_window_hold_the_path_down() {
        let d = FlapDamping {
            threshold: 3,
            window: 10 * S,
            hold_down: 60 * S,
        };
        let t0 = Instant::now();
        let mut w = FlapWindow::new(d);
        assert_eq!(w.on_failure(t0), None);
        assert_eq!(w.on_failure(t0 + 4 * S), None);
        // The first one is forgotten by t0 + 11 s: still two.
        assert_eq!(w.on_failure(t0 + 11 * S), None);
        assert_eq!(w.recent(t0 + 11 * S), 2);
        assert_eq!(w.on_failure(t0 + 12 * S), Some(t0 + 72 * S));
        assert_eq!(w.recent(t0 + 12 * S), 0, "starts afresh");
        assert_eq!(
            "3:60:120".parse(),
            Ok(FlapDamping {
                threshold: 3,
                window: 60 * S,
                hold_down: 120 * S,
            })
        );
        assert!("3:60".parse::<FlapDamping>().is_err());
        assert!("0:1:1".parse::<FlapDamping>().is_err());
    }

    #[test]
    fn failback_modes() {
        let t0 = Instant::now();
        assert!(FailbackClock::new(Failback::Immediate).should_fail_back(0, || t0));
        assert!(!FailbackClock::new(Failback::Manual).should_fail_back(0, || t0));
        let c = FailbackClock::new(Failback::After(5 * S));
        assert!(!c.should_fail_back(0, || t0 + S));
        assert!(!c.should_fail_back(0, || t0 + 5 * S));
        assert!(c.should_fail_back(0, || t0 + 6 * S));
        // A gap (the better path went away) restarts the wait.
        assert!(!c.should_fail_back(1, || t0 + 10 * S));
        c.no_better_path();
        assert!(!c.should_fail_back(1, || t0 + 14 * S));
        assert!(!c.should_fail_back(1, || t0 + 18 * S));
        assert!(c.should_fail_back(1, || t0 + 19 * S));
        assert_eq!("immediate".parse(), Ok(Failback::Immediate));
        assert_eq!(
            "2.5".parse(),
            Ok(Failback::After(Duration::from_millis(2500)))
        );
        assert_eq!(
            "soon".parse::<Failback>().unwrap_err(),
            BadSetting::new("failback", "soon", "immediate, manual or SECONDS")
        );
    }

    #[test]
    fn no_path_retry_is_a_timeout() {
        assert_eq!(NoPathRetry::Fail.timeout(5 * S), Duration::ZERO);
        assert_eq!(NoPathRetry::Retries(3).timeout(5 * S), 15 * S);
        assert_eq!(NoPathRetry::Queue.timeout(5 * S), QUEUE_FOREVER);
        // Instant arithmetic with it does not overflow.
        let _ = Instant::now() + QUEUE_FOREVER;
        assert_eq!("queue".parse(), Ok(NoPathRetry::Queue));
        assert_eq!("12".parse(), Ok(NoPathRetry::Retries(12)));
        assert_eq!(
            "x".parse::<NoPathRetry>().unwrap_err().to_string(),
            "no_path_retry \"x\": want fail, queue or a number"
        );
    }
}
