//! Retransmission timeout estimation (RFC 6298).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    min_rto: Duration,
    max_rto: Duration,
    /// Consecutive timeouts; the RTO is doubled for each (§5.5).
    backoff: u32,
}

impl RttEstimator {
    pub fn new(initial_rto: Duration, min_rto: Duration, max_rto: Duration) -> Self {
        RttEstimator {
            srtt: None,
            rttvar: Duration::ZERO,
            rto: initial_rto.clamp(min_rto, max_rto),
            min_rto,
            max_rto,
            backoff: 0,
        }
    }

    /// Smoothed RTT, or the RTO before the first sample.
    pub fn srtt(&self) -> Duration {
        self.srtt.unwrap_or(self.rto)
    }

    pub fn has_sample(&self) -> bool {
        self.srtt.is_some()
    }

    /// Takes a sample from a segment that was not retransmitted (Karn) or
    /// from a timestamp echo.
    pub fn sample(&mut self, rtt: Duration) {
        let rtt = rtt.max(Duration::from_micros(1));
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(rtt);
        // G (clock granularity) is 1 ms for the timestamp clock.
        let var = (self.rttvar * 4).max(Duration::from_millis(1));
        self.rto = (srtt + var).clamp(self.min_rto, self.max_rto);
        self.backoff = 0;
    }

    /// The current timeout, backoff applied.
    pub fn rto(&self) -> Duration {
        let factor = 1u32 << self.backoff.min(16);
        self.rto.saturating_mul(factor).min(self.max_rto)
    }

    pub fn on_timeout(&mut self) {
        self.backoff = self.backoff.saturating_add(1);
    }

    /// New data was acked: the backoff may be collapsed (§5.7 leaves it
    /// to the next sample; we keep it until then, as Karn requires).
    pub fn backoff(&self) -> u32 {
        self.backoff
    }

    pub fn reset_backoff(&mut self) {
        self.backoff = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn first_sample_and_smoothing() {
        let mut r = RttEstimator::new(ms(1000), ms(200), ms(60_000));
        assert_eq!(r.rto(), ms(1000));
        r.sample(ms(100));
        // srtt = 100, rttvar = 50, rto = 300.
        assert_eq!(r.rto(), ms(300));
        r.sample(ms(100));
        // rttvar = 37.5, rto = 100 + 150 = 250.
        assert_eq!(r.rto(), Duration::from_micros(250_000));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let mut r = RttEstimator::new(ms(1000), ms(200), ms(60_000));
        r.on_timeout();
        assert_eq!(r.rto(), ms(2000));
        for _ in 0..20 {
            r.on_timeout();
        }
        assert_eq!(r.rto(), ms(60_000));
        r.sample(ms(10));
        assert_eq!(r.rto(), ms(200));
    }
}
