//! Congestion control: CUBIC (RFC 9438, the default) and NewReno (RFC 5681 /
//! RFC 6582). Fast-recovery window inflation is done by the socket; the
//! controller owns `cwnd`/`ssthresh` and the growth rules outside recovery.

use crate::clock::Instant;
use std::time::Duration;

/// Which algorithm a socket uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CongestionAlgorithm {
    #[default]
    Cubic,
    NewReno,
}

const CUBIC_C: f64 = 0.4;
const CUBIC_BETA: f64 = 0.7;

#[derive(Debug, Clone)]
pub struct CongestionController {
    algorithm: CongestionAlgorithm,
    mss: usize,
    pub cwnd: usize,
    pub ssthresh: usize,
    /// NewReno congestion avoidance: bytes acked since the last increase.
    bytes_acked: usize,
    // CUBIC state, in segments / seconds.
    w_max: f64,
    k: f64,
    w_est: f64,
    epoch_start: Option<Instant>,
}

impl CongestionController {
    pub fn new(algorithm: CongestionAlgorithm, mss: usize) -> Self {
        let mss = mss.max(1);
        CongestionController {
            algorithm,
            mss,
            // RFC 6928 initial window of 10 segments.
            cwnd: 10 * mss,
            ssthresh: usize::MAX,
            bytes_acked: 0,
            w_max: 0.0,
            k: 0.0,
            w_est: 0.0,
            epoch_start: None,
        }
    }

    pub fn algorithm(&self) -> CongestionAlgorithm {
        self.algorithm
    }

    pub fn set_mss(&mut self, mss: usize) {
        let mss = mss.max(1);
        if self.cwnd == 10 * self.mss {
            self.cwnd = 10 * mss;
        }
        self.mss = mss;
    }

    pub fn in_slow_start(&self) -> bool {
        self.cwnd < self.ssthresh
    }

    /// New data acked outside recovery.
    pub fn on_ack(&mut self, now: Instant, acked: usize, srtt: Duration) {
        if acked == 0 {
            return;
        }
        if self.in_slow_start() {
            // RFC 3465 appropriate byte counting with L = 2.
            self.cwnd = self.cwnd.saturating_add(acked.min(2 * self.mss));
            return;
        }
        match self.algorithm {
            CongestionAlgorithm::NewReno => {
                self.bytes_acked += acked;
                if self.bytes_acked >= self.cwnd {
                    self.bytes_acked -= self.cwnd;
                    self.cwnd += self.mss;
                }
            }
            CongestionAlgorithm::Cubic => self.cubic_on_ack(now, acked, srtt),
        }
    }

    fn cubic_on_ack(&mut self, now: Instant, acked: usize, srtt: Duration) {
        let mss = self.mss as f64;
        let cwnd = self.cwnd as f64 / mss;
        let epoch = match self.epoch_start {
            Some(t) => t,
            None => {
                // First avoidance ack after slow start or recovery (§4.2).
                self.epoch_start = Some(now);
                if self.w_max < cwnd {
                    self.w_max = cwnd;
                    self.k = 0.0;
                } else {
                    self.k = ((self.w_max - cwnd) / CUBIC_C).cbrt();
                }
                self.w_est = cwnd;
                now
            }
        };
        let t = (now - epoch).as_secs_f64();
        let rtt = srtt.as_secs_f64();
        let w_cubic = |t: f64| CUBIC_C * (t - self.k).powi(3) + self.w_max;
        // Reno-friendly estimate (§4.3).
        let alpha = 3.0 * (1.0 - CUBIC_BETA) / (1.0 + CUBIC_BETA);
        let acked_segments = acked as f64 / mss;
        self.w_est += alpha * acked_segments / cwnd;
        let target = w_cubic(t + rtt).clamp(cwnd, 1.5 * cwnd);
        let new_cwnd = if w_cubic(t) < self.w_est {
            self.w_est.max(cwnd)
        } else {
            cwnd + (target - cwnd) / cwnd * acked_segments
        };
        self.cwnd = ((new_cwnd * mss) as usize).max(self.cwnd);
    }

    /// A loss detected by duplicate acks: sets ssthresh and cwnd = ssthresh.
    pub fn on_congestion_event(&mut self, flight: usize) {
        self.bytes_acked = 0;
        match self.algorithm {
            CongestionAlgorithm::NewReno => {
                self.ssthresh = (flight / 2).max(2 * self.mss);
            }
            CongestionAlgorithm::Cubic => {
                let mss = self.mss as f64;
                let cwnd = self.cwnd as f64 / mss;
                // Fast convergence (§4.7).
                self.w_max = if cwnd < self.w_max {
                    cwnd * (1.0 + CUBIC_BETA) / 2.0
                } else {
                    cwnd
                };
                self.ssthresh = ((cwnd * CUBIC_BETA * mss) as usize).max(2 * self.mss);
                self.epoch_start = None;
            }
        }
        self.cwnd = self.ssthresh;
    }

    /// Retransmission timeout: collapse to one segment (RFC 5681 §3.1).
    pub fn on_retransmit_timeout(&mut self, flight: usize) {
        self.on_congestion_event(flight);
        self.cwnd = self.mss;
    }

    /// Leaving fast recovery (RFC 6582 §3.2 step 6, option 1).
    pub fn on_recovery_exit(&mut self, flight: usize) {
        self.cwnd = self
            .ssthresh
            .min(flight.max(self.mss) + self.mss)
            .max(2 * self.mss);
        self.epoch_start = None;
    }

    /// The connection sat idle longer than an RTO (RFC 5681 §4.1).
    pub fn on_idle_restart(&mut self, rto_window: usize) {
        self.cwnd = self.cwnd.min(rto_window.max(self.mss));
        self.epoch_start = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_then_newreno_avoidance() {
        let mut cc = CongestionController::new(CongestionAlgorithm::NewReno, 1000);
        assert_eq!(cc.cwnd, 10_000);
        cc.on_ack(Instant::ZERO, 1000, Duration::from_millis(1));
        assert_eq!(cc.cwnd, 11_000);
        cc.on_congestion_event(20_000);
        assert_eq!(cc.ssthresh, 10_000);
        assert_eq!(cc.cwnd, 10_000);
        for _ in 0..10 {
            cc.on_ack(Instant::ZERO, 1000, Duration::from_millis(1));
        }
        assert_eq!(cc.cwnd, 11_000);
        cc.on_retransmit_timeout(11_000);
        assert_eq!(cc.cwnd, 1000);
        assert_eq!(cc.ssthresh, 5500);
    }

    #[test]
    fn cubic_backs_off_by_beta_and_regrows() {
        let mut cc = CongestionController::new(CongestionAlgorithm::Cubic, 1000);
        cc.cwnd = 100_000;
        cc.on_congestion_event(100_000);
        assert_eq!(cc.cwnd, 70_000);
        let mut now = Instant::ZERO;
        let rtt = Duration::from_millis(10);
        for _ in 0..2000 {
            now += Duration::from_millis(1);
            cc.on_ack(now, 1000, rtt);
        }
        // After 2 s the cubic curve is past K (≈ 4.2 s for W_max = 100)? No:
        // K = cbrt(30 / 0.4) ≈ 4.2 s, so cwnd is still below W_max but grew.
        assert!(cc.cwnd > 70_000 && cc.cwnd < 100_000, "cwnd {}", cc.cwnd);
        for _ in 0..8000 {
            now += Duration::from_millis(1);
            cc.on_ack(now, 1000, rtt);
        }
        assert!(cc.cwnd > 100_000, "cwnd {}", cc.cwnd);
    }

    #[test]
    fn cubic_fast_convergence_lowers_w_max() {
        let mut cc = CongestionController::new(CongestionAlgorithm::Cubic, 1000);
        cc.cwnd = 100_000;
        cc.on_congestion_event(100_000);
        cc.on_congestion_event(70_000);
        assert!((cc.w_max - 70.0 * 0.85).abs() < 1e-9);
    }
}
