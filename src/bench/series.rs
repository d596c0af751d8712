//! IOPS over time, per path and in total, counted by the job threads while
//! they measure, and what the JSON report carries for pictures:
//!
//! - `iscsi_bypass.iops_series_interval_ms`: the sampling interval;
//! - `iscsi_bypass.iops_series`: IOPS of the whole job, one value per interval;
//! - `iscsi_bypass.paths[].iops_series`: the same per path;
//! - `iscsi_bypass.clat_spectrum.{read,write}`: `[[percentile, ns], ...]`,
//!   dense enough to draw (see [`super::plot::spectrum_percentiles`]).

use super::{new_histogram, plot, RunResult};
use serde_json::{json, Value};
use std::time::Duration;

/// At most this many intervals are kept; later completions count in the last.
const MAX_BUCKETS: usize = 100_000;

/// The sampling interval for a run of `runtime`: the longest of 100 ms,
/// 200 ms, 250 ms, 500 ms, 1 s, 2 s, 5 s, 10 s, 30 s, 60 s that still gives
/// 50 intervals (100 ms for runs under 5 s).
pub fn interval_for(runtime: Duration) -> Duration {
    const STEPS_MS: [u64; 10] = [100, 200, 250, 500, 1000, 2000, 5000, 10_000, 30_000, 60_000];
    let ms = runtime.as_millis() as u64;
    let step = STEPS_MS
        .iter()
        .rev()
        .find(|&&s| ms / s >= 50)
        .copied()
        .unwrap_or(STEPS_MS[0]);
    Duration::from_millis(step)
}

/// Completions per interval, per path and in total.
#[derive(Debug, Clone, PartialEq)]
pub struct IopsSeries {
    interval: Duration,
    total: Vec<u64>,
    per_path: Vec<Vec<u64>>,
}

impl IopsSeries {
    pub fn new(runtime: Duration, paths: usize) -> IopsSeries {
        IopsSeries {
            interval: interval_for(runtime),
            total: Vec::new(),
            per_path: vec![Vec::new(); paths],
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Counts one completion `since` measuring began, on `path` if known.
    pub fn record(&mut self, path: Option<usize>, since: Duration) {
        let i =
            ((since.as_nanos() / self.interval.as_nanos().max(1)) as usize).min(MAX_BUCKETS - 1);
        bump(&mut self.total, i);
        if let Some(p) = path.and_then(|p| self.per_path.get_mut(p)) {
            bump(p, i);
        }
    }

    /// Adds another job thread's counts (same interval).
    pub fn merge(&mut self, other: &IopsSeries) {
        add(&mut self.total, &other.total);
        if self.per_path.len() < other.per_path.len() {
            self.per_path.resize(other.per_path.len(), Vec::new());
        }
        for (a, b) in self.per_path.iter_mut().zip(&other.per_path) {
            add(a, b);
        }
    }

    /// Total completions per interval.
    pub fn total(&self) -> &[u64] {
        &self.total
    }

    /// Completions per interval on path `p`.
    pub fn path(&self, p: usize) -> &[u64] {
        self.per_path.get(p).map(Vec::as_slice).unwrap_or(&[])
    }

    /// IOPS per interval of `counts` over a measured period of `measured`:
    /// ceil(measured / interval) values, the last over its own (shorter)
    /// length; completions after the period (the drain) count in the last.
    pub fn iops(&self, counts: &[u64], measured: Duration) -> Vec<f64> {
        let iv = self.interval.as_secs_f64();
        let n = ((measured.as_secs_f64() / iv).ceil() as usize).clamp(1, MAX_BUCKETS);
        let mut out: Vec<f64> = (0..n)
            .map(|i| counts.get(i).copied().unwrap_or(0) as f64)
            .collect();
        let late: u64 = counts.iter().skip(n).sum();
        out[n - 1] += late as f64;
        let last_len = (measured.as_secs_f64() - (n - 1) as f64 * iv).clamp(iv * 1e-3, iv);
        for (i, v) in out.iter_mut().enumerate() {
            *v /= if i == n - 1 { last_len } else { iv };
        }
        out
    }
}

fn bump(v: &mut Vec<u64>, i: usize) {
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] += 1;
}

fn add(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// Adds the IOPS series and the dense latency spectrum to a report made by
/// [`super::report::json`].
pub fn add_to_json(report: &mut Value, run: &RunResult) {
    let Some(first) = run.jobs.first() else {
        return;
    };
    let mut series = first.series.clone();
    let mut read = new_histogram();
    let mut write = new_histogram();
    for (i, j) in run.jobs.iter().enumerate() {
        if i > 0 {
            series.merge(&j.series);
        }
        let _ = read.add(&j.dirs[super::job::READ].clat);
        let _ = write.add(&j.dirs[super::job::WRITE].clat);
    }
    let measured = run
        .jobs
        .iter()
        .map(|j| j.measured)
        .max()
        .unwrap_or_default();
    let Some(ours) = report.get_mut("iscsi_bypass") else {
        return;
    };
    ours["iops_series_interval_ms"] = json!(series.interval().as_millis() as u64);
    ours["iops_series"] = json!(series.iops(series.total(), measured));
    if let Some(paths) = ours.get_mut("paths").and_then(Value::as_array_mut) {
        for (i, p) in paths.iter_mut().enumerate() {
            p["iops_series"] = json!(series.iops(series.path(i), measured));
        }
    }
    let mut spectrum = serde_json::Map::new();
    for (dir, h) in [("read", &read), ("write", &write)] {
        if !h.is_empty() {
            spectrum.insert(dir.into(), json!(plot::spectrum_of_histogram(h)));
        }
    }
    ours["clat_spectrum"] = Value::Object(spectrum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_give_about_fifty_points() {
        assert_eq!(
            interval_for(Duration::from_secs(1)),
            Duration::from_millis(100)
        );
        assert_eq!(
            interval_for(Duration::from_secs(10)),
            Duration::from_millis(200)
        );
        assert_eq!(
            interval_for(Duration::from_secs(60)),
            Duration::from_secs(1)
        );
        assert_eq!(
            interval_for(Duration::from_secs(3600)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn counts_per_path_and_interval() {
        let mut a = IopsSeries::new(Duration::from_secs(1), 2);
        a.record(Some(0), Duration::from_millis(50));
        a.record(Some(1), Duration::from_millis(150));
        a.record(None, Duration::from_millis(160));
        let mut b = IopsSeries::new(Duration::from_secs(1), 2);
        b.record(Some(1), Duration::from_millis(120));
        // The drain, after the measured second: counts in the last interval.
        b.record(Some(1), Duration::from_millis(1020));
        a.merge(&b);
        assert_eq!(a.total(), &[1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(a.path(0), &[1]);
        assert_eq!(a.path(1), &[0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(a.path(5), &[] as &[u64]);
        let measured = Duration::from_millis(950);
        let iops = a.iops(a.path(1), measured);
        assert_eq!(iops.len(), 10);
        assert_eq!(iops[1], 20.0);
        // The last interval is 50 ms long and holds the late completion.
        assert!((iops[9] - 20.0).abs() < 1e-9, "{iops:?}");
        assert_eq!(a.iops(a.path(0), measured)[0], 10.0);
    }
}
