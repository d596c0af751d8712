//! Reports: a human summary, JSON with the fields of fio 3.33's
//! `--output-format=json` (per job and direction: bytes, bandwidth, IOPS,
//! slat/clat/lat with clat percentiles, bandwidth and IOPS samples, CPU),
//! fio's histogram log (`log_hist_msec`, see [`super::fiohist`]) and
//! HdrHistogram interval logs that can be merged across hosts.

use super::job::{READ, WRITE};
use super::{fiohist, new_histogram, JobResult, RunResult};
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
    // Groups (split at stonewall) run one after the other: their times
    // add up; the jobs of one group run at once.
    let mut group_secs: std::collections::BTreeMap<u32, f64> = Default::default();
    for j in &run.jobs {
        let g = run.groups.get(j.job).copied().unwrap_or(0);
        let e = group_secs.entry(g).or_insert(0.0);
        *e = e.max(j.measured.as_secs_f64());
    }
    let secs = group_secs.values().sum::<f64>().max(1e-9);
    for j in &run.jobs {
        let _ = read.add(j.read_lat());
        let _ = write.add(j.write_lat());
        rb += j.read_bytes();
        wb += j.write_bytes();
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

fn bs_text(spec: &super::job::JobSpec) -> String {
    let one = |d: usize| {
        spec.block_sizes(d)
            .iter()
            .map(|(b, p)| {
                if spec.bssplit[d].is_empty() {
                    b.to_string()
                } else {
                    format!("{b}/{p}")
                }
            })
            .collect::<Vec<_>>()
            .join(":")
    };
    let (r, w) = (one(READ), one(WRITE));
    if r == w {
        r
    } else {
        format!("{r},{w}")
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
    for (i, spec) in run.specs.iter().enumerate() {
        out.push_str(&format!(
            "{}: rw={} bs={} iodepth={} numjobs={} runtime={:.1}s\n",
            spec.name,
            spec.rw.name(),
            bs_text(spec),
            spec.iodepth,
            spec.numjobs,
            s.seconds
        ));
        if run.specs.len() > 1 {
            let threads: Vec<&JobResult> = run.jobs.iter().filter(|j| j.job == i).collect();
            for d in [READ, WRITE] {
                let ios: u64 = threads.iter().map(|j| j.dirs[d].lat.len()).sum();
                if ios == 0 {
                    continue;
                }
                let secs = threads
                    .iter()
                    .map(|j| j.measured.as_secs_f64())
                    .fold(0.0, f64::max)
                    .max(1e-9);
                out.push_str(&format!(
                    "  {}: IOPS={:.0} ios={ios}\n",
                    if d == READ { "read" } else { "write" },
                    ios as f64 / secs
                ));
            }
        }
    }
    if run.specs.len() > 1 {
        out.push_str("all jobs:\n");
    }
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

/// fio's default `percentile_list`.
pub const FIO_PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// fio's latency object: `min`, `max` (integers), `mean`, `stddev`
/// (floats; stddev of the sample, as fio's), `N`.
fn lat_stats(h: &Histogram<u64>) -> serde_json::Map<String, Value> {
    let n = h.len();
    let (min, max, mean, stddev) = if n > 0 {
        let pop = h.stdev();
        let sample = if n > 1 {
            pop * (n as f64 / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        (h.min(), h.max(), h.mean(), sample)
    } else {
        (0, 0, 0.0, 0.0)
    };
    let mut m = serde_json::Map::new();
    m.insert("min".into(), json!(min));
    m.insert("max".into(), json!(max));
    m.insert("mean".into(), json!(mean));
    m.insert("stddev".into(), json!(stddev));
    m.insert("N".into(), json!(n));
    m
}

/// min, max, mean, sample standard deviation of integer samples.
fn sample_stats(v: &[u64]) -> (u64, u64, f64, f64) {
    if v.is_empty() {
        return (0, 0, 0.0, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<u64>() as f64 / n;
    let var = if v.len() > 1 {
        v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (
        *v.iter().min().unwrap_or(&0),
        *v.iter().max().unwrap_or(&0),
        mean,
        var.sqrt(),
    )
}

/// One job's direction, its threads merged (as fio's `group_reporting`
/// merges a job's clones).
struct JobDir {
    slat: Histogram<u64>,
    clat: Histogram<u64>,
    lat: Histogram<u64>,
    bytes: u64,
    runtime_ms: u64,
    bw_samples: Vec<u64>,
    iops_samples: Vec<u64>,
    bs_counts: std::collections::BTreeMap<u32, u64>,
}

fn job_dir(threads: &[&JobResult], d: usize) -> JobDir {
    let mut out = JobDir {
        slat: new_histogram(),
        clat: new_histogram(),
        lat: new_histogram(),
        bytes: 0,
        runtime_ms: 0,
        bw_samples: Vec::new(),
        iops_samples: Vec::new(),
        bs_counts: Default::default(),
    };
    // Sum the clones' samples window by window (the job's bandwidth in
    // each 500 ms), over the windows all clones have.
    let windows = threads
        .iter()
        .map(|t| t.dirs[d].bw_samples.len())
        .min()
        .unwrap_or(0);
    out.bw_samples = vec![0; windows];
    out.iops_samples = vec![0; windows];
    for t in threads {
        let st = &t.dirs[d];
        let _ = out.slat.add(&st.slat);
        let _ = out.clat.add(&st.clat);
        let _ = out.lat.add(&st.lat);
        out.bytes += st.bytes;
        for (b, n) in &st.bs_counts {
            *out.bs_counts.entry(*b).or_insert(0) += n;
        }
        for i in 0..windows {
            out.bw_samples[i] += st.bw_samples[i];
            out.iops_samples[i] += st.iops_samples[i];
        }
        if !st.lat.is_empty() {
            out.runtime_ms = out.runtime_ms.max(t.measured.as_millis() as u64);
        }
    }
    out
}

/// fio's per-direction object. `group_bw_kib` is the aggregate bandwidth
/// of the job's group (fio's `bw_agg` is a job's share of it, in %).
fn fio_dir_json(d: &JobDir, group_bw_kib: f64) -> Value {
    let ios = d.lat.len();
    let rt = d.runtime_ms;
    let bw_bytes = (d.bytes * 1000).checked_div(rt).unwrap_or(0);
    let iops = if rt > 0 {
        ios as f64 * 1000.0 / rt as f64
    } else {
        0.0
    };
    let mut clat = lat_stats(&d.clat);
    let pct: serde_json::Map<String, Value> = FIO_PERCENTILES
        .iter()
        .map(|&p| {
            let v = if ios > 0 {
                d.clat.value_at_quantile(p / 100.0)
            } else {
                0
            };
            (format!("{p:.6}"), json!(v))
        })
        .collect();
    let mut pct = pct;
    // Kept from schema 1 (fio's list has no maximum).
    pct.insert(
        "100.000000".into(),
        json!(if ios > 0 { d.clat.max() } else { 0 }),
    );
    clat.insert("percentile".into(), Value::Object(pct));
    let (bw_min, bw_max, bw_mean, bw_dev) = sample_stats(&d.bw_samples);
    let (iops_min, iops_max, iops_mean, iops_dev) = sample_stats(&d.iops_samples);
    let bw_agg = if d.bw_samples.is_empty() {
        0.0
    } else if group_bw_kib > 1.0 {
        (bw_mean * 100.0 / group_bw_kib).min(100.0)
    } else {
        100.0
    };
    json!({
        "io_bytes": d.bytes,
        "io_kbytes": d.bytes / 1024,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes / 1024,
        "iops": iops,
        "runtime": rt,
        "total_ios": ios,
        "short_ios": 0,
        "drop_ios": 0,
        "slat_ns": Value::Object(lat_stats(&d.slat)),
        "clat_ns": Value::Object(clat),
        "lat_ns": Value::Object(lat_stats(&d.lat)),
        "bw_min": bw_min,
        "bw_max": bw_max,
        "bw_agg": bw_agg,
        "bw_mean": bw_mean,
        "bw_dev": bw_dev,
        "bw_samples": d.bw_samples.len(),
        "iops_min": iops_min,
        "iops_max": iops_max,
        "iops_mean": iops_mean,
        "iops_stddev": iops_dev,
        "iops_samples": d.iops_samples.len(),
    })
}

/// JSON with fio 3.33's fields (`--output-format=json`): one entry in
/// `jobs` per job of the job file, its `numjobs` threads merged as fio's
/// `group_reporting` does, and our additions under `iscsi_bypass`. The
/// schema is stable: fields are only ever added.
pub fn json(run: &RunResult, s: &Summary) -> Value {
    let ms = (s.seconds * 1000.0) as u64;
    let per_job: Vec<(Vec<&JobResult>, [JobDir; 2])> = (0..run.specs.len())
        .map(|i| {
            let threads: Vec<&JobResult> = run.jobs.iter().filter(|j| j.job == i).collect();
            let dirs = [job_dir(&threads, READ), job_dir(&threads, WRITE)];
            (threads, dirs)
        })
        .collect();
    // Aggregate bandwidth of each group, KiB/s, per direction.
    let group_bw = |g: u32, d: usize| -> f64 {
        per_job
            .iter()
            .enumerate()
            .filter(|(i, _)| run.groups.get(*i) == Some(&g))
            .map(|(_, (_, dirs))| {
                let x = &dirs[d];
                if x.runtime_ms > 0 {
                    x.bytes as f64 * 1000.0 / x.runtime_ms as f64 / 1024.0
                } else {
                    0.0
                }
            })
            .sum()
    };
    let empty = job_dir(&[], READ);
    let jobs: Vec<Value> = per_job
        .iter()
        .enumerate()
        .map(|(i, (threads, dirs))| {
            let spec = &run.specs[i];
            let g = run.groups.get(i).copied().unwrap_or(0);
            let runtime_ns: u64 = threads.iter().map(|t| t.measured.as_nanos() as u64).sum();
            let usr: u64 = threads.iter().map(|t| t.usage.usr_ns).sum();
            let sys: u64 = threads.iter().map(|t| t.usage.sys_ns).sum();
            let ctx: u64 = threads.iter().map(|t| t.usage.ctx).sum();
            let pct = |x: u64| {
                if runtime_ns > 0 {
                    100.0 * x as f64 / runtime_ns as f64
                } else {
                    0.0
                }
            };
            let errors: u64 = threads.iter().map(|t| t.errors).sum();
            json!({
                "jobname": spec.name,
                "groupid": g,
                "error": errors,
                "eta": 0,
                "elapsed": run.elapsed.as_secs(),
                "job options": spec,
                "read": fio_dir_json(&dirs[READ], group_bw(g, READ)),
                "write": fio_dir_json(&dirs[WRITE], group_bw(g, WRITE)),
                "trim": fio_dir_json(&empty, 0.0),
                "job_runtime": threads.iter().map(|t| t.measured.as_millis() as u64).max().unwrap_or(0),
                "usr_cpu": pct(usr),
                "sys_cpu": pct(sys),
                "ctx": ctx,
            })
        })
        .collect();
    let bs_ios: Vec<Value> = per_job
        .iter()
        .enumerate()
        .map(|(i, (_, dirs))| {
            let counts = |d: &JobDir| -> serde_json::Map<String, Value> {
                d.bs_counts
                    .iter()
                    .map(|(b, n)| (b.to_string(), json!(n)))
                    .collect()
            };
            json!({
                "jobname": run.specs[i].name,
                "read_bs_ios": counts(&dirs[READ]),
                "write_bs_ios": counts(&dirs[WRITE]),
            })
        })
        .collect();
    let mut report = json!({
        "iscsi-bypass version": format!("{} ({})", env!("CARGO_PKG_VERSION"), env!("ISCSI_BYPASS_GIT_REV")),
        "schema": 1,
        "jobs": jobs,
        "iscsi_bypass": {
            "cpu_ns": s.cpu_ns,
            "cpu_ns_per_io": s.cpu_ns_per_io,
            "iops_per_cpu_second": s.iops_per_cpu_second,
            "busy_ns": s.busy_ns,
            "busy_ns_per_io": s.busy_ns_per_io,
            "idle_ns": s.idle_ns,
            "total": dir_json(&s.total, ms),
            "paths": s.paths.iter().enumerate().map(|(i, (name, p))| {
                let nexus = run.path_nexus.get(i).copied().flatten();
                json!({"name": name, "tsih": nexus.map(|n| n.tsih), "cid": nexus.map(|n| n.cid), "stats": dir_json(p, ms)})
            }).collect::<Vec<_>>(),
            "jobs": bs_ios,
        }
    });
    super::series::add_to_json(&mut report, run);
    report
}

/// Writes fio's histogram log (`log_hist_msec` format, see
/// [`super::fiohist`]): the samples of every job thread, in time order.
pub fn write_hist_log(run: &RunResult, path: &std::path::Path) -> std::io::Result<()> {
    let samples: Vec<fiohist::HistSample> = run
        .jobs
        .iter()
        .flat_map(|j| j.hist.iter().cloned())
        .collect();
    let coarseness = run.spec.log_hist_coarseness;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    fiohist::write_log(&mut file, &samples, coarseness)?;
    use std::io::Write as _;
    file.flush()
}

/// Writes an HdrHistogram interval log (V2, compressed) with one interval
/// per direction for the whole measured period.
pub fn write_hdr_log(run: &RunResult, path: &std::path::Path) -> std::io::Result<()> {
    use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
    use hdrhistogram::serialization::V2DeflateSerializer;
    let mut read = new_histogram();
    let mut write = new_histogram();
    for j in &run.jobs {
        let _ = read.add(j.read_lat());
        let _ = write.add(j.write_lat());
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
