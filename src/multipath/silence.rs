//! Fast dead-path detection, sans-IO. The NOP-Out ping of an idle
//! connection runs on a slow timer (`nop_interval` + `nop_timeout`, seconds),
//! so a link that dies without a reset would hold the commands on it that
//! long. A path with commands outstanding that has received nothing for
//! several times its recent response time is pinged at once, with a short
//! timeout; an answer (any PDU) clears it, so a busy path that keeps
//! answering, or a slow one that answers the ping, is never failed.
//!
//! The path worker (and the system simulation) feed it once per round:
//! commands outstanding, the connection's received-PDU counter, the path's
//! recent response time; it answers with what to do.

use std::time::{Duration, Instant};

/// Tunables; `DeviceConfig::fast_ping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPing {
    /// Silence of this many recent response times (with commands
    /// outstanding) sends a ping.
    pub factor: u32,
    /// Never ping before this much silence (a path without a sample yet
    /// uses this as its threshold).
    pub floor: Duration,
    /// The ping's answer may take this many thresholds...
    pub timeout_factor: u32,
    /// ...but at least this long.
    pub min_timeout: Duration,
}

impl Default for FastPing {
    fn default() -> FastPing {
        FastPing {
            factor: 8,
            floor: Duration::from_millis(50),
            timeout_factor: 4,
            min_timeout: Duration::from_millis(250),
        }
    }
}

/// What the caller should do after [`SilenceWatch::on_round`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SilenceVerdict {
    /// Nothing.
    Fine,
    /// Send a NOP-Out ping now.
    Ping,
    /// The path answered nothing, not even the ping, for this long: fail it.
    Dead(Duration),
}

/// Per-connection state of the fast ping (reset it with a new session).
#[derive(Debug, Clone)]
pub struct SilenceWatch {
    config: FastPing,
    seen_pdus: u64,
    quiet_since: Instant,
    /// A fast ping is out; the path is dead if nothing arrives by then.
    deadline: Option<Instant>,
    pings: u64,
}

impl SilenceWatch {
    /// A watch for a connection that starts now.
    pub fn new(config: FastPing, now: Instant) -> SilenceWatch {
        SilenceWatch {
            config,
            seen_pdus: 0,
            quiet_since: now,
            deadline: None,
            pings: 0,
        }
    }

    /// Fast pings sent so far.
    pub fn pings(&self) -> u64 {
        self.pings
    }

    /// The silence that triggers a ping for a path answering in `recent`.
    pub fn threshold(&self, recent: Duration) -> Duration {
        (recent * self.config.factor).max(self.config.floor)
    }

    /// One round: `outstanding` commands on the connection, `pdus_in`
    /// received so far (any kind), `recent` the path's response time
    /// (EWMA; zero when unknown).
    pub fn on_round(
        &mut self,
        now: Instant,
        outstanding: usize,
        pdus_in: u64,
        recent: Duration,
    ) -> SilenceVerdict {
        if pdus_in != self.seen_pdus || outstanding == 0 {
            // Something arrived, or nothing is owed: not silence.
            self.seen_pdus = pdus_in;
            self.quiet_since = now;
            self.deadline = None;
            return SilenceVerdict::Fine;
        }
        let silent = now.saturating_duration_since(self.quiet_since);
        match self.deadline {
            Some(d) if now >= d => SilenceVerdict::Dead(silent),
            Some(_) => SilenceVerdict::Fine,
            None => {
                let threshold = self.threshold(recent);
                if silent < threshold {
                    return SilenceVerdict::Fine;
                }
                let timeout = (threshold * self.config.timeout_factor).max(self.config.min_timeout);
                self.deadline = Some(now + timeout);
                self.pings += 1;
                SilenceVerdict::Ping
            }
        }
    }

    /// When `on_round` may change its answer without new input (for a
    /// caller that sleeps until its next timer).
    pub fn poll_timeout(&self, outstanding: usize, recent: Duration) -> Option<Instant> {
        if outstanding == 0 {
            return None;
        }
        Some(
            self.deadline
                .unwrap_or(self.quiet_since + self.threshold(recent)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_busy_path_that_keeps_answering_is_never_pinged() {
        let t0 = Instant::now();
        let mut w = SilenceWatch::new(FastPing::default(), t0);
        // 10 s of load: commands always outstanding, an answer every 5 ms
        // although responses take 2 ms on average.
        for i in 1..=2000u64 {
            let v = w.on_round(t0 + ms(5 * i), 32, i, ms(2));
            assert_eq!(v, SilenceVerdict::Fine, "round {i}");
        }
        assert_eq!(w.pings(), 0);
    }

    #[test]
    fn an_idle_path_is_left_to_the_nop_timer() {
        let t0 = Instant::now();
        let mut w = SilenceWatch::new(FastPing::default(), t0);
        assert_eq!(
            w.on_round(t0 + ms(10_000), 0, 0, ms(1)),
            SilenceVerdict::Fine
        );
        assert_eq!(w.poll_timeout(0, ms(1)), None);
    }

    #[test]
    fn a_slow_path_that_answers_the_ping_is_not_failed() {
        let t0 = Instant::now();
        let mut w = SilenceWatch::new(FastPing::default(), t0);
        assert_eq!(w.on_round(t0, 4, 10, ms(20)), SilenceVerdict::Fine);
        // 8 x 20 ms of silence: ping.
        assert_eq!(
            w.on_round(t0 + ms(159), 4, 10, ms(20)),
            SilenceVerdict::Fine
        );
        assert_eq!(
            w.on_round(t0 + ms(160), 4, 10, ms(20)),
            SilenceVerdict::Ping
        );
        assert_eq!(
            w.on_round(t0 + ms(400), 4, 10, ms(20)),
            SilenceVerdict::Fine
        );
        // The NOP-In arrives: back to normal, and the next ping waits again.
        assert_eq!(
            w.on_round(t0 + ms(500), 4, 11, ms(20)),
            SilenceVerdict::Fine
        );
        assert_eq!(
            w.on_round(t0 + ms(600), 4, 11, ms(20)),
            SilenceVerdict::Fine
        );
        assert_eq!(w.pings(), 1);
    }

    #[test]
    fn a_dead_path_is_failed_within_threshold_plus_timeout() {
        let t0 = Instant::now();
        let mut w = SilenceWatch::new(FastPing::default(), t0);
        assert_eq!(w.on_round(t0, 8, 3, ms(1)), SilenceVerdict::Fine);
        // Threshold: max(8 x 1 ms, 50 ms floor); timeout max(4 x 50, 250) ms.
        assert_eq!(w.poll_timeout(8, ms(1)), Some(t0 + ms(50)));
        assert_eq!(w.on_round(t0 + ms(50), 8, 3, ms(1)), SilenceVerdict::Ping);
        assert_eq!(w.poll_timeout(8, ms(1)), Some(t0 + ms(300)));
        assert_eq!(w.on_round(t0 + ms(299), 8, 3, ms(1)), SilenceVerdict::Fine);
        assert_eq!(
            w.on_round(t0 + ms(300), 8, 3, ms(1)),
            SilenceVerdict::Dead(ms(300))
        );
    }
}
