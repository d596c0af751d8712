//! Reading fio's latency histogram logs (`write_hist_log` with
//! `log_hist_msec`, fio 3.33): one line per direction and interval,
//!
//! ```text
//! msec, ddir, bs, bin0, bin1, ..., binN
//! ```
//!
//! where `msec` is the end of the interval, `ddir` 0 (read), 1 (write) or 2
//! (trim), and the bins count the completions of that interval in fio's
//! `io_u_plat` buckets (`FIO_IO_U_PLAT_NR` = 29 groups x 64 = 1856 of them,
//! or `1856 >> log_hist_coarseness` when neighbouring bins were summed).
//! A bin's latency is computed as fio's `stat.c:plat_idx_to_val` does;
//! percentiles as `stat.c:calc_clat_percentiles` does.

use thiserror::Error;

use super::fiohist::idx_edges;
/// fio's `stat.c:plat_idx_to_val`: the latency (ns) fio gives bin `idx` of
/// its full histogram (the one transcription, in [`super::fiohist`]).
pub use super::fiohist::idx_to_val as plat_idx_to_val;
/// fio's `FIO_IO_U_PLAT_NR`: bins of a histogram line at coarseness 0.
pub use super::fiohist::FIO_IO_U_PLAT_NR as PLAT_NR;
/// The largest `log_hist_coarseness` fio accepts.
pub const MAX_COARSENESS: u32 = 6;

/// The latency (ns) of bin `idx` of a line written with
/// `log_hist_coarseness=coarseness`: at 0, fio's own value; else the middle
/// of the fine bins it sums (from the lower edge of the first to the upper
/// edge of the last).
pub fn bin_value(idx: usize, coarseness: u32) -> f64 {
    if coarseness == 0 {
        return plat_idx_to_val(idx) as f64;
    }
    let stride = 1usize << coarseness;
    let (lo, _) = idx_edges(idx * stride);
    let (_, hi) = idx_edges(idx * stride + stride - 1);
    (lo as f64 + hi as f64) / 2.0
}

/// The coarseness that gives a line `bins` bins, if any does.
pub fn coarseness_of(bins: usize) -> Option<u32> {
    (0..=MAX_COARSENESS).find(|&c| PLAT_NR >> c == bins)
}

/// Percentiles (in %, ascending) of summed bins, as fio computes them: the
/// first bin whose running sum reaches `p / 100 * total`. Empty bins give
/// an empty result.
pub fn percentiles(bins: &[u64], coarseness: u32, pcts: &[f64]) -> Vec<(f64, f64)> {
    rank_percentiles(
        bins.iter()
            .enumerate()
            .map(|(i, &n)| (bin_value(i, coarseness), n)),
        pcts,
    )
}

/// fio's percentile rule over (latency, count) pairs in ascending latency.
pub fn rank_percentiles(
    bins: impl Iterator<Item = (f64, u64)> + Clone,
    pcts: &[f64],
) -> Vec<(f64, f64)> {
    let total: u64 = bins.clone().map(|(_, n)| n).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(pcts.len());
    let mut j = 0;
    let mut sum = 0u64;
    for (value, n) in bins {
        sum += n;
        while j < pcts.len() && reaches(sum, pcts[j], total) {
            out.push((pcts[j], value));
            j += 1;
        }
        if j == pcts.len() {
            break;
        }
    }
    out
}

/// Whether `sum` of `total` samples reaches percentile `pct`: `sum >=
/// pct / 100 * total`. fio computes that in `long double`; in `f64` the
/// rounding of `pct / 100 * total` can land on the other side of an
/// integer (fio's list holds values like 99.9 that binary cannot hold), so
/// the comparison is made exactly, which is what `long double` gives at
/// these sizes: `pct` is `m * 2^e`.
fn reaches(sum: u64, pct: f64, total: u64) -> bool {
    if !pct.is_finite() || pct <= 0.0 {
        return true;
    }
    let bits = pct.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (m, e) = if exp == 0 {
        (frac, -1074)
    } else {
        (frac | 1 << 52, exp - 1075)
    };
    let lhs = u128::from(sum) * 100;
    let rhs = u128::from(m) * u128::from(total);
    let exact = if e >= 0 {
        rhs.checked_shl(e as u32).map(|r| lhs >= r)
    } else {
        lhs.checked_shl((-e) as u32)
            .filter(|l| l >> ((-e) as u32) == lhs)
            .map(|l| l >= rhs)
    };
    exact.unwrap_or(sum as f64 >= pct / 100.0 * total as f64)
}

/// fio's data directions, by `ddir` number.
pub fn ddir_name(ddir: u32) -> &'static str {
    match ddir {
        0 => "read",
        1 => "write",
        2 => "trim",
        _ => "other",
    }
}

/// One line of a histogram log.
#[derive(Debug, Clone, PartialEq)]
pub struct HistLine {
    /// End of the interval, ms since the job started.
    pub msec: u64,
    pub ddir: u32,
    pub bs: u64,
    pub bins: Vec<u64>,
}

/// A whole histogram log.
#[derive(Debug, Clone, PartialEq)]
pub struct HistLog {
    pub coarseness: u32,
    pub lines: Vec<HistLine>,
}

#[derive(Debug, Error, PartialEq)]
pub enum HistLogError {
    #[error("the histogram log is empty: no `msec, ddir, bs, bin0..binN` lines")]
    Empty,
    #[error(
        "this is an HdrHistogram interval log, not fio's log_hist_msec format \
         (`msec, ddir, bs, bin0..binN`)"
    )]
    HdrHistogram,
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
}

fn line_err(line: usize, what: impl Into<String>) -> HistLogError {
    HistLogError::Line {
        line,
        what: what.into(),
    }
}

impl HistLog {
    /// Parses a log; blank lines are skipped, anything else must be a
    /// histogram line with the same number of bins as the first.
    pub fn parse(text: &str) -> Result<HistLog, HistLogError> {
        let mut lines = Vec::new();
        let mut coarseness = None;
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            if lines.is_empty()
                && (raw.starts_with("#[")
                    || raw.starts_with("\"StartTimestamp\"")
                    || raw.starts_with("Tag="))
            {
                return Err(HistLogError::HdrHistogram);
            }
            let cols: Vec<&str> = raw.split(',').map(str::trim).collect();
            if cols.len() < 4 {
                return Err(line_err(
                    line_no,
                    format!(
                        "{} comma-separated columns, expected `msec, ddir, bs, bin0..binN` \
                         ({} bins)",
                        cols.len(),
                        PLAT_NR
                    ),
                ));
            }
            let num = |i: usize, name: &str| -> Result<u64, HistLogError> {
                cols[i].parse::<u64>().map_err(|_| {
                    line_err(
                        line_no,
                        format!(
                            "column {} ({name}) is {:?}, not a whole number",
                            i + 1,
                            cols[i]
                        ),
                    )
                })
            };
            let msec = num(0, "msec")?;
            let ddir = num(1, "ddir")?;
            if ddir > 2 {
                return Err(line_err(
                    line_no,
                    format!("ddir {ddir} is not 0 (read), 1 (write) or 2 (trim)"),
                ));
            }
            let bs = num(2, "bs")?;
            let bins = (3..cols.len())
                .map(|i| num(i, "bin"))
                .collect::<Result<Vec<u64>, _>>()?;
            let c = match coarseness {
                Some(c) => {
                    if bins.len() != PLAT_NR >> c {
                        return Err(line_err(
                            line_no,
                            format!(
                                "{} bins, but the first line has {}",
                                bins.len(),
                                PLAT_NR >> c
                            ),
                        ));
                    }
                    c
                }
                None => coarseness_of(bins.len()).ok_or_else(|| {
                    line_err(
                        line_no,
                        format!(
                            "{} bins: fio 3.x writes {PLAT_NR} >> log_hist_coarseness (0..={MAX_COARSENESS}), \
                             i.e. one of {}",
                            bins.len(),
                            (0..=MAX_COARSENESS)
                                .map(|c| (PLAT_NR >> c).to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?,
            };
            coarseness = Some(c);
            lines.push(HistLine {
                msec,
                ddir: ddir as u32,
                bs,
                bins,
            });
        }
        match coarseness {
            Some(coarseness) => Ok(HistLog { coarseness, lines }),
            None => Err(HistLogError::Empty),
        }
    }

    /// The directions present, ascending.
    pub fn ddirs(&self) -> Vec<u32> {
        let mut d: Vec<u32> = self.lines.iter().map(|l| l.ddir).collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// The bins of direction `ddir` summed over all intervals.
    pub fn summed(&self, ddir: u32) -> Vec<u64> {
        let mut sum = vec![0u64; PLAT_NR >> self.coarseness];
        for l in self.lines.iter().filter(|l| l.ddir == ddir) {
            for (s, b) in sum.iter_mut().zip(&l.bins) {
                *s += b;
            }
        }
        sum
    }

    /// IOPS of direction `ddir` per interval: (end of interval in s, IOPS).
    /// An interval runs from the previous line's `msec` of that direction
    /// (the first from 0).
    pub fn iops(&self, ddir: u32) -> Vec<(f64, f64)> {
        let mut prev = 0u64;
        let mut last_dt = 0u64;
        // I/Os of lines at time 0, before any interval: they go into the first.
        let mut carry = 0u64;
        let mut out: Vec<(f64, f64)> = Vec::new();
        for l in self.lines.iter().filter(|l| l.ddir == ddir) {
            let dt = l.msec.saturating_sub(prev);
            let n: u64 = l.bins.iter().sum();
            if dt > 0 {
                let n = n + std::mem::take(&mut carry);
                out.push((l.msec as f64 / 1000.0, n as f64 * 1000.0 / dt as f64));
                last_dt = dt;
            } else if let Some(last) = out.last_mut() {
                // fio logged two lines at the same millisecond (several
                // block sizes, or a loaded machine): one interval.
                last.1 += n as f64 * 1000.0 / last_dt as f64;
            } else {
                carry += n;
            }
            prev = l.msec;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bench::fiohist::val_to_idx;

    #[test]
    fn coarse_bins_span_the_fine_bins_they_sum() {
        assert_eq!(bin_value(300, 0), plat_idx_to_val(300) as f64);
        // Coarseness 1: bin 100 sums fine bins 200 and 201, [288, 296).
        assert_eq!(idx_edges(200), (288, 292));
        assert_eq!(idx_edges(201), (292, 296));
        assert_eq!(bin_value(100, 1), 292.0);
        // Low bins are single nanoseconds: bin 3 of coarseness 2 is 12..=15.
        assert_eq!(bin_value(3, 2), 13.5);
        for c in 0..=MAX_COARSENESS {
            assert_eq!(coarseness_of(PLAT_NR >> c), Some(c));
        }
        assert_eq!(
            coarseness_of(1216),
            None,
            "fio 2.x's 19 groups are not ours"
        );
    }

    #[test]
    fn percentiles_pick_the_first_bin_reaching_the_rank() {
        let mut bins = [0u64; PLAT_NR];
        bins[50] = 90; // 90 I/Os at 50 ns
        bins[val_to_idx(10_000)] = 9; // 9 at ~10 us
        bins[val_to_idx(1_000_000)] = 1; // 1 at ~1 ms
        let p = percentiles(&bins, 0, &[50.0, 90.0, 95.0, 99.0, 99.5, 100.0]);
        let v: Vec<f64> = p.iter().map(|x| x.1).collect();
        let ten_us = plat_idx_to_val(val_to_idx(10_000)) as f64;
        let one_ms = plat_idx_to_val(val_to_idx(1_000_000)) as f64;
        assert_eq!(v, vec![50.0, 50.0, ten_us, ten_us, one_ms, one_ms]);
        assert!((ten_us - 10_000.0).abs() / 10_000.0 < 1.0 / 64.0);
        assert!(percentiles(&[0u64; PLAT_NR], 0, &[50.0]).is_empty());
    }

    fn line(msec: u64, ddir: u32, bins: &[(usize, u64)], n: usize) -> String {
        let mut b = vec![0u64; n];
        for &(i, c) in bins {
            b[i] = c;
        }
        let b: Vec<String> = b.iter().map(u64::to_string).collect();
        format!("{msec}, {ddir}, 4096, {}\n", b.join(", "))
    }

    #[test]
    fn parses_a_log_and_sums_its_intervals() {
        let text = line(100, 0, &[(40, 10)], PLAT_NR)
            + &line(101, 1, &[(60, 5)], PLAT_NR)
            + "\n"
            + &line(200, 0, &[(40, 20), (41, 10)], PLAT_NR);
        let log = HistLog::parse(&text).unwrap();
        assert_eq!(log.coarseness, 0);
        assert_eq!(log.ddirs(), vec![0, 1]);
        let r = log.summed(0);
        assert_eq!((r[40], r[41]), (30, 10));
        assert_eq!(log.iops(0), vec![(0.1, 100.0), (0.2, 300.0)]);
        assert_eq!(log.iops(1), vec![(0.101, 5.0 * 1000.0 / 101.0)]);
        // Two lines at one millisecond are one interval: no I/O is dropped.
        let same = HistLog::parse(
            &(line(100, 0, &[(40, 10)], PLAT_NR) + "\n" + &line(100, 0, &[(40, 5)], PLAT_NR)),
        )
        .unwrap();
        assert_eq!(same.iops(0), vec![(0.1, 150.0)]);
        let coarse = HistLog::parse(&line(1000, 0, &[(3, 1)], PLAT_NR >> 2)).unwrap();
        assert_eq!(coarse.coarseness, 2);
    }

    #[test]
    fn percentile_ranks_are_compared_exactly_as_fio_does() {
        // 99.9 is a little over 99.9: 4995 of 5000 does not reach it.
        assert!(!reaches(4995, 99.9, 5000));
        assert!(reaches(4996, 99.9, 5000));
        assert!(reaches(2500, 50.0, 5000));
        assert!(!reaches(2499, 50.0, 5000));
        assert!(reaches(5000, 100.0, 5000));
    }

    #[test]
    fn bad_logs_say_what_is_wrong() {
        assert_eq!(HistLog::parse(""), Err(HistLogError::Empty));
        assert_eq!(HistLog::parse("\n  \n"), Err(HistLogError::Empty));
        assert_eq!(
            HistLog::parse("#[StartTime: 1.0 (seconds since epoch)]\n"),
            Err(HistLogError::HdrHistogram)
        );
        let e = HistLog::parse("1000, 12345, 0, 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("ddir 12345"), "{e}");
        // fio's plain latency log (`time, value, ddir, bs, offset`): its
        // value is no direction.
        let e = HistLog::parse("10, 4512, 0, 4096, 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("ddir 4512"), "{e}");
        let e = HistLog::parse("10, 0, 4096, 5, 6\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("2 bins"), "{e}");
        let e = HistLog::parse(&(line(1, 0, &[], PLAT_NR) + &line(2, 0, &[], PLAT_NR / 2)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("first line has 1856"),
            "{e}"
        );
        let e = HistLog::parse(&line(1, 0, &[], PLAT_NR).replace("4096", "4k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("column 3 (bs)") && e.contains("\"4k\""), "{e}");
    }
}
