//! Poll-mode CPU accounting, as SPDK does for its pollers: every round of
//! a poll loop is *busy* (something moved: a PDU, a completion, a
//! submission) or *idle* (an empty poll, a spin, a nap), and the time since
//! the previous round goes to one or the other. A busy-polling worker's
//! CPU time is all spin and work mixed; its busy time is the work alone, so
//! "busy ns per I/O" is what a core would spend per I/O if it had nothing
//! else to do. (Idle time includes sleeps, so it is wall time, not CPU.)
//!
//! Each poll loop calls [`tick`] once per round with whether the round did
//! anything; the calling thread's totals are kept thread-locally and added
//! to the process-wide ones every [`FLUSH_NS`] and when the thread exits.
//! Readers take [`totals`] before and after a measurement.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Thread-local time is published once this much has gathered.
pub const FLUSH_NS: u64 = 200_000;

static BUSY_NS: AtomicU64 = AtomicU64::new(0);
static IDLE_NS: AtomicU64 = AtomicU64::new(0);

/// Busy and idle nanoseconds of every poll loop of the process so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollTotals {
    /// Time in rounds that did something.
    pub busy_ns: u64,
    /// Time in rounds that found nothing to do (spinning or sleeping).
    pub idle_ns: u64,
}

impl PollTotals {
    /// What accrued between `earlier` and `self`.
    pub fn since(self, earlier: PollTotals) -> PollTotals {
        PollTotals {
            busy_ns: self.busy_ns.saturating_sub(earlier.busy_ns),
            idle_ns: self.idle_ns.saturating_sub(earlier.idle_ns),
        }
    }
}

#[derive(Debug, Default)]
struct Meter {
    last: Option<Instant>,
    busy_ns: u64,
    idle_ns: u64,
}

impl Meter {
    fn flush(&mut self) {
        if self.busy_ns > 0 {
            BUSY_NS.fetch_add(self.busy_ns, Ordering::Relaxed);
        }
        if self.idle_ns > 0 {
            IDLE_NS.fetch_add(self.idle_ns, Ordering::Relaxed);
        }
        self.busy_ns = 0;
        self.idle_ns = 0;
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.flush();
    }
}

thread_local! {
    static METER: RefCell<Meter> = RefCell::new(Meter::default());
}

/// Ends a round of the calling thread's poll loop: the time since its
/// previous tick was busy (`busy`) or idle. The first tick on a thread only
/// starts the clock. Returns the time it read, for a caller that needs the
/// time now too (one clock read serves both).
pub fn tick(busy: bool) -> Instant {
    tick_after_wait(std::time::Duration::ZERO, busy)
}

/// Like [`tick`], for a round that waited `waited` inside (a receive that
/// blocked until the target's bytes came): that part is idle, the rest of
/// the round busy or idle as `busy` says.
pub fn tick_after_wait(waited: std::time::Duration, busy: bool) -> Instant {
    let now = Instant::now();
    tick_at(now, waited, busy);
    now
}

/// [`tick_after_wait`] at `now`, a clock reading the caller just took (the
/// end of its round): a busy loop that reads the clock anyway, say to time
/// a submission, does not read it again for the meter.
pub fn tick_at(now: Instant, waited: std::time::Duration, busy: bool) {
    METER.with(|m| {
        let Ok(mut m) = m.try_borrow_mut() else {
            return;
        };
        if let Some(last) = m.last {
            let ns = now.saturating_duration_since(last).as_nanos() as u64;
            let (b, i) = split(ns, waited, busy);
            m.busy_ns += b;
            m.idle_ns += i;
            if m.busy_ns + m.idle_ns >= FLUSH_NS {
                m.flush();
            }
        }
        m.last = Some(now);
    });
}

/// A round of `ns` that waited `waited` inside: (busy, idle) nanoseconds.
fn split(ns: u64, waited: std::time::Duration, busy: bool) -> (u64, u64) {
    let idle = (waited.as_nanos().min(u128::from(u64::MAX)) as u64).min(ns);
    if busy {
        (ns - idle, idle)
    } else {
        (0, ns)
    }
}

/// Publishes the calling thread's pending time now (e.g. before a reader
/// takes [`totals`] at the end of a measurement).
pub fn flush() {
    METER.with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            m.flush();
        }
    });
}

/// The process-wide totals published so far.
pub fn totals() -> PollTotals {
    PollTotals {
        busy_ns: BUSY_NS.load(Ordering::Relaxed),
        idle_ns: IDLE_NS.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Work between ticks marked busy counts as busy; sleeping between
    /// ticks marked idle does not.
    #[test]
    fn busy_and_idle_rounds_are_told_apart() {
        let before = totals();
        std::thread::spawn(|| {
            tick(false);
            for _ in 0..5 {
                let until = Instant::now() + Duration::from_millis(4);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                tick(true);
                std::thread::sleep(Duration::from_millis(4));
                tick(false);
            }
        })
        .join()
        .unwrap();
        // The thread exited: its meter flushed on drop.
        let d = totals().since(before);
        // At least this thread's 20 ms each (other tests' threads may add).
        assert!(d.busy_ns >= 20_000_000, "{d:?}");
        assert!(d.idle_ns >= 20_000_000, "{d:?}");
    }

    /// The wait inside a busy round is idle; the rest of the round busy.
    #[test]
    fn the_wait_inside_a_round_is_idle() {
        let ms = Duration::from_millis;
        assert_eq!(split(5_000_000, ms(3), true), (2_000_000, 3_000_000));
        assert_eq!(split(5_000_000, ms(3), false), (0, 5_000_000));
        assert_eq!(split(5_000_000, Duration::ZERO, true), (5_000_000, 0));
        // A wait longer than the round (clock granularity) is the round.
        assert_eq!(split(1_000, ms(1), true), (0, 1_000));
    }

    #[test]
    fn first_tick_only_starts_the_clock() {
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(2));
            tick(true);
            METER.with(|cell| {
                let m = cell.borrow();
                assert_eq!(m.busy_ns, 0, "nothing before the first tick counts");
                assert!(m.last.is_some());
            });
        })
        .join()
        .unwrap();
    }
}
