//! fio's rate limiting (`rate`, `rate_iops`), sans-IO: the job loop asks
//! which direction may issue at a time and tells what it issued; time is
//! microseconds since the limiter's epoch, given by the caller.
//!
//! As in fio (`init.c:__setup_rate`, `backend.c:usec_for_io`,
//! `io_u.c:rate_ddir`): a direction's cap is bytes per second (`rate`, or
//! `rate_iops` times the direction's smallest block size, so with
//! `bssplit` the larger blocks use up more of an IOPS cap); an I/O is due
//! when the bytes issued so far, at the cap, take no longer than the time
//! since the epoch; when the direction drawn is ahead of its rate and the
//! other direction of a mixed job is behind, the other one goes instead.

use super::job::{READ, WRITE};

/// What the job loop may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Issue an I/O of this direction now.
    Go(usize),
    /// Nothing is due before `until_us`; then this direction is.
    Wait { until_us: u64, dir: usize },
}

#[derive(Debug, Clone)]
pub struct RateLimiter {
    bps: [u64; 2],
    issued: [u64; 2],
    next_us: [u64; 2],
    /// Whether the job issues both directions (rwmix of each > 0).
    mixed: bool,
}

impl RateLimiter {
    /// `bps` per direction (0: no cap); `mixed` for a job that reads and
    /// writes.
    pub fn new(bps: [u64; 2], mixed: bool) -> RateLimiter {
        RateLimiter {
            bps,
            issued: [0; 2],
            next_us: [0; 2],
            mixed,
        }
    }

    /// Whether any direction has a cap.
    pub fn active(&self) -> bool {
        self.bps.iter().any(|&b| b > 0)
    }

    /// Starts again from zero at a new epoch (fio does at the end of the
    /// ramp).
    pub fn reset(&mut self) {
        self.issued = [0; 2];
        self.next_us = [0; 2];
    }

    /// fio's `rate_ddir`: the drawn direction `dir`, or the other one, or
    /// a wait.
    pub fn choose(&self, dir: usize, now_us: u64) -> Pace {
        if self.next_us[dir] <= now_us {
            return Pace::Go(dir);
        }
        if self.mixed {
            let odir = dir ^ 1;
            if self.next_us[odir] <= now_us {
                return Pace::Go(odir);
            }
            if self.next_us[dir] <= self.next_us[odir] {
                return Pace::Wait {
                    until_us: self.next_us[dir],
                    dir,
                };
            }
            return Pace::Wait {
                until_us: self.next_us[odir],
                dir: odir,
            };
        }
        Pace::Wait {
            until_us: self.next_us[dir],
            dir,
        }
    }

    /// Accounts an issued I/O of `bytes` (fio's `usec_for_io`).
    pub fn issued(&mut self, dir: usize, bytes: u64) {
        let bps = self.bps[dir];
        self.issued[dir] += bytes;
        if bps == 0 {
            return;
        }
        let b = self.issued[dir];
        let secs = b / bps;
        let rem = b % bps;
        self.next_us[dir] = secs * 1_000_000 + rem * 1_000_000 / bps;
    }

    /// Bytes issued per direction since the epoch.
    pub fn issued_bytes(&self) -> [u64; 2] {
        [self.issued[READ], self.issued[WRITE]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the limiter as the job loop does, on a simulated clock with
    /// I/Os that complete instantly; returns I/Os per direction after
    /// `secs` seconds.
    fn simulate(bps: [u64; 2], bs: [u64; 2], read_pct: u32, secs: u64) -> [u64; 2] {
        let mixed = read_pct > 0 && read_pct < 100;
        let mut r = RateLimiter::new(bps, mixed);
        let mut now = 0u64;
        let mut ios = [0u64; 2];
        let mut draw = 0u32;
        let end = secs * 1_000_000;
        while now < end {
            draw = (draw + 37) % 100;
            let dir = if draw < read_pct { READ } else { WRITE };
            match r.choose(dir, now) {
                Pace::Go(d) => {
                    r.issued(d, bs[d]);
                    ios[d] += 1;
                }
                Pace::Wait { until_us, .. } => now = until_us,
            }
        }
        ios
    }

    #[test]
    fn rate_iops_caps_each_direction() {
        // rate_iops=300,200 with 4 KiB I/Os: 300 reads and 200 writes a
        // second; the mix gives way to the caps.
        let ios = simulate([300 * 4096, 200 * 4096], [4096, 4096], 50, 10);
        assert!(ios[READ].abs_diff(3000) <= 2, "{ios:?}");
        assert!(ios[WRITE].abs_diff(2000) <= 2, "{ios:?}");
    }

    #[test]
    fn uncapped_direction_is_not_held_back_by_the_other() {
        let mut r = RateLimiter::new([100 * 4096, 0], true);
        r.issued(READ, 4096);
        // Reads are ahead: the drawn read gives way to a write.
        assert_eq!(r.choose(READ, 0), Pace::Go(WRITE));
        assert_eq!(r.choose(WRITE, 0), Pace::Go(WRITE));
        // A read-only job waits for its next slot: 10 ms at 100 IOPS.
        let mut r = RateLimiter::new([100 * 4096, 0], false);
        r.issued(READ, 4096);
        assert_eq!(
            r.choose(READ, 0),
            Pace::Wait {
                until_us: 10_000,
                dir: READ
            }
        );
        assert_eq!(r.choose(READ, 10_000), Pace::Go(READ));
    }

    #[test]
    fn larger_blocks_use_up_an_iops_cap_in_bytes() {
        // fio's rate_iops with bssplit: the cap is rate_iops * min_bs
        // bytes; 64 KiB I/Os each count as 16 of the 4 KiB ones.
        let ios = simulate([100 * 4096, 0], [65536, 0], 100, 16);
        assert!(ios[READ].abs_diff(100) <= 1, "{ios:?}");
    }
}
