//! How an idle reader of a socket should wait for its next bytes, learnt
//! from its past waits (sans-IO: the caller measures and says how long).
//!
//! Blocking costs a context switch and a wake-up when the bytes come,
//! more than a fast target's whole answer on loopback; spinning costs CPU
//! for as long as it lasts. So a wait that is due within a few µs spins,
//! and a longer one blocks. Optionally (`hybrid`), a longer one sleeps on
//! a timer until shortly before the answer is due (the timer's wake-up
//! then happens while the target is still working), spins the rest, and
//! gives up into a plain blocking wait once the answer is late, like the
//! block layer's hybrid polling; that buys latency with CPU, so it is off
//! by default.

use std::time::Duration;

/// What a wait should do, in order: sleep on a timer (returning early
/// when bytes arrive), spin (non-blocking reads) until `spin_until` after
/// the wait began, then block until bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPlan {
    /// Sleep on a timer this long first (zero: no timed sleep).
    pub sleep: Duration,
    /// Spin until this long after the wait began (zero: no spin).
    pub spin_until: Duration,
}

impl WaitPlan {
    /// Block at once: nothing learnt yet, or the answer is far off.
    pub const BLOCK: WaitPlan = WaitPlan {
        sleep: Duration::ZERO,
        spin_until: Duration::ZERO,
    };
}

/// A wait this short or shorter is spun through without sleeping.
const SPIN_ONLY_BELOW: Duration = Duration::from_micros(12);
/// The longest spin of one wait: past it the answer is late and the
/// reader blocks (the CPU it would burn is worth more than the µs).
const MAX_SPIN: Duration = Duration::from_micros(40);
/// Waits longer than this are not worth a timed sleep: block.
const MAX_SLEEP_THEN_SPIN: Duration = Duration::from_millis(2);
/// Waits taken into the estimate before it plans anything but blocking.
const WARM_UP: u32 = 8;
/// What a timer wake-up is assumed to overshoot before any was measured.
const INITIAL_OVERSLEEP: Duration = Duration::from_micros(10);

/// The learnt shape of a reader's waits: a smoothed mean and mean absolute
/// deviation of how long waits lasted (exponential, weight 1/8 like TCP's
/// RTT estimator), and how far timed sleeps overshoot.
#[derive(Debug, Clone)]
pub struct WaitEstimate {
    mean_ns: u64,
    dev_ns: u64,
    oversleep_ns: u64,
    samples: u32,
    /// Whether timed sleeps before a spin are allowed (else: spin short
    /// waits, block long ones).
    hybrid: bool,
}

/// Spin through short waits, block on long ones: timed sleeps before a
/// spin cost CPU that a loaded machine (and the CPU-per-I/O budget) does
/// not have, and on a guest that halt-polls a blocked thread wakes fast.
impl Default for WaitEstimate {
    fn default() -> WaitEstimate {
        WaitEstimate::new(false)
    }
}

fn ewma(old: u64, sample: u64) -> u64 {
    // old + (sample - old) / 8, in signed arithmetic.
    (old as i128 + (sample as i128 - old as i128) / 8) as u64
}

impl WaitEstimate {
    pub fn new(hybrid: bool) -> WaitEstimate {
        WaitEstimate {
            mean_ns: 0,
            dev_ns: 0,
            oversleep_ns: INITIAL_OVERSLEEP.as_nanos() as u64,
            samples: 0,
            hybrid,
        }
    }

    /// A wait ended with bytes `waited` after it began.
    pub fn observe(&mut self, waited: Duration) {
        let w = waited.as_nanos().min(u64::MAX as u128) as u64;
        if self.samples == 0 {
            self.mean_ns = w;
            self.dev_ns = w / 2;
        } else {
            let err = w.abs_diff(self.mean_ns);
            self.dev_ns = ewma(self.dev_ns, err);
            self.mean_ns = ewma(self.mean_ns, w);
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// A timed sleep of `asked` lasted `slept`.
    pub fn observe_sleep(&mut self, asked: Duration, slept: Duration) {
        let over = slept.saturating_sub(asked).as_nanos().min(u64::MAX as u128) as u64;
        self.oversleep_ns = ewma(self.oversleep_ns, over);
    }

    /// The smoothed mean wait.
    pub fn mean(&self) -> Duration {
        Duration::from_nanos(self.mean_ns)
    }

    /// The smoothed mean absolute deviation of the waits.
    pub fn deviation(&self) -> Duration {
        Duration::from_nanos(self.dev_ns)
    }

    /// What the next wait should do.
    pub fn plan(&self) -> WaitPlan {
        if self.samples < WARM_UP {
            return WaitPlan::BLOCK;
        }
        let mean = self.mean();
        let dev = self.deviation();
        // Most answers come before this.
        let late = mean + 2 * dev;
        if late <= SPIN_ONLY_BELOW {
            return WaitPlan {
                sleep: Duration::ZERO,
                spin_until: late.max(Duration::from_micros(2)),
            };
        }
        if !self.hybrid || mean > MAX_SLEEP_THEN_SPIN {
            return WaitPlan::BLOCK;
        }
        // Wake before the early answers, allowing for the timer's overshoot.
        let early = mean.saturating_sub(2 * dev);
        let sleep = early.saturating_sub(Duration::from_nanos(self.oversleep_ns));
        let spin_until = late.min(sleep + MAX_SPIN);
        if spin_until <= sleep {
            return WaitPlan::BLOCK;
        }
        WaitPlan { sleep, spin_until }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn learnt(waits: &[u64], hybrid: bool) -> WaitEstimate {
        let mut e = WaitEstimate::new(hybrid);
        for _ in 0..4 {
            for &w in waits {
                e.observe(us(w));
            }
        }
        e
    }

    #[test]
    fn blocks_until_it_has_learnt() {
        let mut e = WaitEstimate::new(true);
        for _ in 0..WARM_UP - 1 {
            e.observe(us(3));
            assert_eq!(e.plan(), WaitPlan::BLOCK);
        }
        e.observe(us(3));
        assert_ne!(e.plan(), WaitPlan::BLOCK);
    }

    #[test]
    fn short_waits_spin_without_sleeping() {
        let p = learnt(&[3, 4, 3, 5], true).plan();
        assert_eq!(p.sleep, Duration::ZERO);
        assert!(
            p.spin_until >= us(4) && p.spin_until <= SPIN_ONLY_BELOW,
            "{p:?}"
        );
    }

    #[test]
    fn steady_long_waits_sleep_then_spin_around_the_mean() {
        let mut e = learnt(&[60, 62, 58, 61], true);
        e.observe_sleep(us(40), us(45));
        let p = e.plan();
        assert!(p.sleep > us(30) && p.sleep < us(58), "{p:?}");
        assert!(
            p.spin_until > us(60) && p.spin_until <= p.sleep + MAX_SPIN,
            "{p:?}"
        );
    }

    #[test]
    fn a_timer_that_overshoots_more_wakes_earlier() {
        let mut a = learnt(&[60, 62, 58, 61], true);
        let mut b = a.clone();
        for _ in 0..32 {
            a.observe_sleep(us(40), us(42));
            b.observe_sleep(us(40), us(60));
        }
        assert!(
            b.plan().sleep < a.plan().sleep,
            "{:?} {:?}",
            a.plan(),
            b.plan()
        );
    }

    #[test]
    fn scattered_waits_spin_at_most_max_spin() {
        let p = learnt(&[20, 200, 40, 300], true).plan();
        if p != WaitPlan::BLOCK {
            assert!(p.spin_until - p.sleep <= MAX_SPIN, "{p:?}");
        }
    }

    #[test]
    fn without_hybrid_long_waits_block() {
        assert_eq!(learnt(&[60, 62, 58, 61], false).plan(), WaitPlan::BLOCK);
        assert_ne!(learnt(&[3, 4, 3, 5], false).plan(), WaitPlan::BLOCK);
    }

    #[test]
    fn very_long_waits_block() {
        assert_eq!(learnt(&[5_000, 6_000], true).plan(), WaitPlan::BLOCK);
    }

    #[test]
    fn the_mean_follows_a_change() {
        let mut e = learnt(&[60], true);
        for _ in 0..64 {
            e.observe(us(5));
        }
        assert!(e.mean() < us(7), "{:?}", e.mean());
        assert_eq!(e.plan().sleep, Duration::ZERO);
    }
}
