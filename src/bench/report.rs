//! Reports: a human summary, JSON close to fio's where fields mean the same
//! (`jobs[].read.iops`, `bw`, `clat_ns.percentile`...), and HdrHistogram
//! interval logs that can be merged across hosts.

use super::{new_histogram, RunResult};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::time::Duration;

/// Percentiles reported everywhere.
pub const PERCENTILES: [f64; 6] = [50.0, 90.0, 99.0, 99.9, 99.99, 100.0];

/// Aggregated numbers of one direction (or of one path).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DirSummary {
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub bw_bytes: f64,
    pub lat_ns_min: u64,
    pub lat_ns_mean: f64,
    pub lat_ns_max: u64,
    /// (percentile, ns)
    pub percentiles: Vec<(f64, u64)>,
}

fn summarize(h: &Histogram<u64>, bytes: u64, secs: f64) -> DirSummary {
    let n = h.len();
    DirSummary {
        ios: n,
        bytes,
        iops: if secs > 0.0 { n as f64 / secs } else { 0.0 },
        bw_bytes: if secs > 0.0 { bytes as f64 / secs } else { 0.0 },
        lat_ns_min: if n > 0 { h.min() } else { 0 },
        lat_ns_mean: if n > 0 { h.mean() } else { 0.0 },
        lat_ns_max: if n > 0 { h.max() } else { 0 },
        percentiles: PERCENTILES
            .iter()
            .map(|&p| {
                (
                    p,
                    if n > 0 {
                        h.value_at_quantile(p / 100.0)
                    } else {
                        0
                    },
                )
            })
            .collect(),
    }
}

/// The whole run, aggregated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub seconds: f64,
    pub read: DirSummary,
    pub write: DirSummary,
    pub total: DirSummary,
    pub cpu_ns: u64,
    pub cpu_ns_per_io: f64,
    /// IOs per initiator CPU-second.
    pub iops_per_cpu_second: f64,
    /// Time of the initiator's poll-loop rounds that did work (see
    /// `worker::poll_meter`), and per I/O: a busy-polling worker's CPU per
    /// I/O without the spin.
    pub busy_ns: u64,
    pub busy_ns_per_io: f64,
    /// Time of rounds that found nothing (spinning or sleeping).
    pub idle_ns: u64,
    pub paths: Vec<(String, DirSummary)>,
    pub errors: u64,
}

pub fn summary(run: &RunResult) -> Summary {
    let mut read = new_histogram();
    let mut write = new_histogram();
    let (mut rb, mut wb, mut errors) = (0, 0, 0);
    let mut per_path: Vec<(Histogram<u64>, u64)> = Vec::new();
    let secs = run
        .jobs
        .iter()
        .map(|j| j.measured.as_secs_f64())
        .fold(0.0, f64::max)
        .max(1e-9);
    for j in &run.jobs {
        let _ = read.add(&j.read_lat);
        let _ = write.add(&j.write_lat);
        rb += j.read_bytes;
        wb += j.write_bytes;
        errors += j.errors;
        for (i, h) in j.lat_per_path.iter().enumerate() {
            if per_path.len() <= i {
                per_path.push((new_histogram(), 0));
            }
            let _ = per_path[i].0.add(h);
            per_path[i].1 += j.ios_per_path.get(i).copied().unwrap_or(0);
        }
    }
    let mut total = read.clone();
    let _ = total.add(&write);
    let ios = total.len();
    let bytes_per_io = (rb + wb).checked_div(ios).unwrap_or(0);
    let paths = per_path
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < run.path_names.len())
        .map(|(i, (h, _))| {
            (
                run.path_names[i].clone(),
                summarize(h, h.len() * bytes_per_io, secs),
            )
        })
        .collect();
    Summary {
        seconds: secs,
        read: summarize(&read, rb, secs),
        write: summarize(&write, wb, secs),
        total: summarize(&total, rb + wb, secs),
        cpu_ns: run.cpu_ns,
        cpu_ns_per_io: if ios > 0 {
            run.cpu_ns as f64 / ios as f64
        } else {
            0.0
        },
        iops_per_cpu_second: if run.cpu_ns > 0 {
            ios as f64 / (run.cpu_ns as f64 / 1e9)
        } else {
            0.0
        },
        busy_ns: run.poll.busy_ns,
        busy_ns_per_io: if ios > 0 {
            run.poll.busy_ns as f64 / ios as f64
        } else {
            0.0
        },
        idle_ns: run.poll.idle_ns,
        paths,
        errors,
    }
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{:.1}ms", ns as f64 / 1e6)
    } else if ns >= 10_000 {
        format!("{:.1}us", ns as f64 / 1e3)
    } else {
        format!("{ns}ns")
    }
}

fn fmt_bw(b: f64) -> String {
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2}GiB/s", b / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.1}MiB/s", b / (1024.0 * 1024.0))
    }
}

/// The human summary.
pub fn text(run: &RunResult, s: &Summary) -> String {
    let mut out = String::new();
    let spec = &run.spec;
    out.push_str(&format!(
        "{}: rw={} bs={} iodepth={} numjobs={} runtime={:.1}s\n",
        spec.name,
        spec.rw.name(),
        spec.bs,
        spec.iodepth,
        spec.numjobs,
        s.seconds
    ));
    for (name, d) in [("read", &s.read), ("write", &s.write)] {
        if d.ios == 0 {
            continue;
        }
        out.push_str(&format!(
            "  {name}: IOPS={:.0} BW={} ios={} lat min={} mean={} max={}\n",
            d.iops,
            fmt_bw(d.bw_bytes),
            d.ios,
            fmt_ns(d.lat_ns_min),
            fmt_ns(d.lat_ns_mean as u64),
            fmt_ns(d.lat_ns_max)
        ));
        let pcts: Vec<String> = d
            .percentiles
            .iter()
            .map(|(p, v)| format!("p{}={}", p, fmt_ns(*v)))
            .collect();
        out.push_str(&format!("    {}\n", pcts.join(" ")));
    }
    out.push_str(&format!(
        "  cpu: {:.2} ms initiator CPU, {:.0} ns per I/O, {:.0} IOPS per CPU-second\n",
        s.cpu_ns as f64 / 1e6,
        s.cpu_ns_per_io,
        s.iops_per_cpu_second
    ));
    out.push_str(&format!(
        "  poll: busy {:.2} ms, idle {:.2} ms, busy_ns_per_io={:.0}\n",
        s.busy_ns as f64 / 1e6,
        s.idle_ns as f64 / 1e6,
        s.busy_ns_per_io
    ));
    for (name, p) in &s.paths {
        let share = if s.total.ios > 0 {
            100.0 * p.ios as f64 / s.total.ios as f64
        } else {
            0.0
        };
        out.push_str(&format!(
            "  path {name}: {:.0} IOPS ({share:.0}%), p50={} p99={}\n",
            p.iops,
            fmt_ns(p.percentiles[0].1),
            fmt_ns(p.percentiles[2].1)
        ));
    }
    if s.errors > 0 {
        out.push_str(&format!("  errors: {}\n", s.errors));
    }
    out
}

fn dir_json(d: &DirSummary, runtime_ms: u64) -> Value {
    let pct: serde_json::Map<String, Value> = d
        .percentiles
        .iter()
        .map(|(p, v)| (format!("{p:.6}"), json!(v)))
        .collect();
    let lat = json!({
        "min": d.lat_ns_min,
        "max": d.lat_ns_max,
        "mean": d.lat_ns_mean,
        "N": d.ios,
        "percentile": pct,
    });
    json!({
        "io_bytes": d.bytes,
        "io_kbytes": d.bytes / 1024,
        "bw_bytes": d.bw_bytes as u64,
        "bw": (d.bw_bytes / 1024.0) as u64,
        "iops": d.iops,
        "runtime": runtime_ms,
        "total_ios": d.ios,
        "clat_ns": lat,
        "lat_ns": lat,
    })
}

/// JSON close to fio's `--output-format=json`, with our additions under
/// `iscsi_bypass`. The schema is stable: fields are only ever added.
pub fn json(run: &RunResult, s: &Summary) -> Value {
    let ms = (s.seconds * 1000.0) as u64;
    let mut report = json!({
        "iscsi-bypass version": format!("{} ({})", env!("CARGO_PKG_VERSION"), env!("ISCSI_BYPASS_GIT_REV")),
        "schema": 1,
        "jobs": [{
            "jobname": run.spec.name,
            "job options": run.spec,
            "read": dir_json(&s.read, ms),
            "write": dir_json(&s.write, ms),
            "error": s.errors,
        }],
        "iscsi_bypass": {
            "cpu_ns": s.cpu_ns,
            "cpu_ns_per_io": s.cpu_ns_per_io,
            "iops_per_cpu_second": s.iops_per_cpu_second,
            "busy_ns": s.busy_ns,
            "busy_ns_per_io": s.busy_ns_per_io,
            "idle_ns": s.idle_ns,
            "total": dir_json(&s.total, ms),
            "paths": s.paths.iter().map(|(name, p)| json!({"name": name, "stats": dir_json(p, ms)})).collect::<Vec<_>>(),
        }
    });
    super::series::add_to_json(&mut report, run);
    report
}

/// Writes an HdrHistogram interval log (V2, compressed) with one interval
/// per direction for the whole measured period.
pub fn write_hist_log(run: &RunResult, path: &std::path::Path) -> std::io::Result<()> {
    use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
    use hdrhistogram::serialization::V2DeflateSerializer;
    let mut read = new_histogram();
    let mut write = new_histogram();
    for j in &run.jobs {
        let _ = read.add(&j.read_lat);
        let _ = write.add(&j.write_lat);
    }
    let mut file = std::fs::File::create(path)?;
    let mut ser = V2DeflateSerializer::new();
    let mut builder = IntervalLogWriterBuilder::new();
    builder.add_comment(&format!(
        "iscsi-bypass {} rw={} bs={}",
        env!("CARGO_PKG_VERSION"),
        run.spec.rw.name(),
        run.spec.bs
    ));
    builder.with_max_value_divisor(1e6);
    builder.with_start_time(std::time::SystemTime::now() - dur_of(run));
    let mut w = builder.begin_log_with(&mut file, &mut ser)?;
    let dur = Duration::from_secs_f64(
        run.jobs
            .iter()
            .map(|j| j.measured.as_secs_f64())
            .fold(0.0, f64::max),
    );
    for (tag, h) in [("read", &read), ("write", &write)] {
        if h.is_empty() {
            continue;
        }
        let tag = hdrhistogram::serialization::interval_log::Tag::new(tag);
        w.write_histogram(h, Duration::ZERO, dur, tag)
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
    }
    Ok(())
}

fn dur_of(run: &RunResult) -> Duration {
    Duration::from_secs_f64(
        run.jobs
            .iter()
            .map(|j| j.measured.as_secs_f64())
            .fold(0.0, f64::max),
    )
}
