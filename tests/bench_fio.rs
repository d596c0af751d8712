//! `iscsi-bypass bench` against fio itself: one job file, run by fio 3.33
//! on a plain file (psync) and by `bench` on the embedded null target. The
//! JSON fields we claim to share with fio must sit at the same paths with
//! the same JSON types, and the values must hold together (IOPS against
//! I/Os and runtime, percentiles in order, bssplit shares, rate caps, think
//! time). The histogram log must have fio's columns.
//!
//! Bounds are count-based: a rate cap or a think time gives a hard upper
//! bound on the I/Os of a run of a given length; lower bounds are loose,
//! so a loaded machine cannot make the test fail.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_iscsi-bypass");

/// The shared job file: jobs `split`, `capped` and `think` run together,
/// `seq` after them (stonewall). `write_hist_log`, `ioengine`, `filename`
/// and `time_based` are for fio; bench ignores them.
fn job_file(dir: &Path) -> String {
    format!(
        "\
[global]
ioengine=psync
filename={file}
size=16m
runtime=2
ramp_time=0
time_based
write_hist_log={dir}/fio
log_hist_msec=200

[split]
rw=randrw
rwmixread=60
bssplit=4k/50:16k/30:64k/20,8k
iodepth=8

[capped]
rw=randread
bssplit=4k/50:64k/50
rate_iops=400
random_distribution=zipf:1.2

[think]
rw=randwrite
bs=4k
iodepth=4
thinktime=10ms
thinktime_blocks=4
random_distribution=pareto:0.3

[seq]
stonewall
rw=read
bs=8k
random_distribution=normal:10
",
        file = dir.join("fio.dat").display(),
        dir = dir.display()
    )
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ib-benchfio-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// JSON type class: fio writes integers without a point and floats with one.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every field of `fio` (recursively) is in `ours` at the same path with
/// the same type; returns what is missing or different.
fn same_shape(fio: &Value, ours: &Value, path: &str, problems: &mut Vec<String>) {
    if kind(fio) != kind(ours) {
        problems.push(format!(
            "{path}: fio has {} ({fio}), we have {} ({ours})",
            kind(fio),
            kind(ours)
        ));
        return;
    }
    if let (Value::Object(f), Value::Object(o)) = (fio, ours) {
        for (k, fv) in f {
            match o.get(k) {
                Some(ov) => same_shape(fv, ov, &format!("{path}.{k}"), problems),
                None => problems.push(format!("{path}.{k}: missing")),
            }
        }
    }
}

/// The per-job fields we claim to write as fio does.
const JOB_FIELDS: [&str; 11] = [
    "jobname",
    "groupid",
    "error",
    "eta",
    "elapsed",
    "read",
    "write",
    "trim",
    "job_runtime",
    "usr_cpu",
    "sys_cpu",
];

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// Values of one direction that must hold together.
fn check_dir(name: &str, d: &Value) {
    let ios = u(&d["total_ios"]);
    let rt = u(&d["runtime"]);
    if ios == 0 {
        return;
    }
    assert!(rt > 0, "{name}: runtime 0 with {ios} I/Os");
    let iops = f(&d["iops"]);
    let want = ios as f64 * 1000.0 / rt as f64;
    assert!(
        (iops - want).abs() <= want * 0.01 + 0.01,
        "{name}: iops {iops} vs total_ios/runtime {want}"
    );
    let bytes = u(&d["io_bytes"]);
    assert_eq!(u(&d["io_kbytes"]), bytes / 1024, "{name}");
    assert_eq!(u(&d["bw"]), u(&d["bw_bytes"]) / 1024, "{name}");
    let bw = u(&d["bw_bytes"]) as f64;
    let want_bw = bytes as f64 * 1000.0 / rt as f64;
    assert!((bw - want_bw).abs() <= want_bw * 0.01 + 1.0, "{name}: bw");
    for l in ["slat_ns", "clat_ns", "lat_ns"] {
        // fio measures no submission latency for a sync engine (psync).
        if l == "slat_ns" && u(&d[l]["N"]) == 0 && name.starts_with("fio") {
            continue;
        }
        assert_eq!(u(&d[l]["N"]), ios, "{name}.{l}.N");
        let (mn, mx, mean) = (u(&d[l]["min"]), u(&d[l]["max"]), f(&d[l]["mean"]));
        assert!(
            mn as f64 <= mean && mean <= mx as f64,
            "{name}.{l}: {mn} {mean} {mx}"
        );
        assert!(f(&d[l]["stddev"]) >= 0.0);
    }
    // Total latency is submission plus completion latency.
    assert!(
        f(&d["lat_ns"]["mean"]) >= f(&d["clat_ns"]["mean"]),
        "{name}"
    );
    let p = d["clat_ns"]["percentile"].as_object().unwrap();
    let mut keys: Vec<(f64, u64)> = p
        .iter()
        .map(|(k, v)| (k.parse::<f64>().unwrap(), u(v)))
        .collect();
    keys.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in keys.windows(2) {
        assert!(
            w[0].1 <= w[1].1,
            "{name}: percentiles out of order {keys:?}"
        );
    }
    assert!(
        keys[0].1 >= u(&d["clat_ns"]["min"]) / 2,
        "{name}: p1 below min"
    );
    let samples = u(&d["bw_samples"]);
    assert_eq!(samples, u(&d["iops_samples"]), "{name}");
    if samples > 0 {
        assert!(u(&d["bw_min"]) as f64 <= f(&d["bw_mean"]) + 1.0, "{name}");
        assert!(f(&d["bw_mean"]) <= u(&d["bw_max"]) as f64 + 1.0, "{name}");
        assert!(
            u(&d["iops_min"]) as f64 <= f(&d["iops_mean"]) + 1.0,
            "{name}"
        );
        assert!(
            f(&d["iops_mean"]) <= u(&d["iops_max"]) as f64 + 1.0,
            "{name}"
        );
        assert!((0.0..=100.0).contains(&f(&d["bw_agg"])), "{name}");
    }
}

fn job<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["jobname"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {v}"))
}

fn bs_ios(v: &Value, name: &str, dir: &str) -> Vec<(u64, u64)> {
    let j = v["iscsi_bypass"]["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["jobname"] == name)
        .unwrap();
    j[format!("{dir}_bs_ios")]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.parse().unwrap(), u(n)))
        .collect()
}

/// Lines of a histogram log: (msec, ddir, bs, bins).
fn hist_lines(path: &Path) -> Vec<(u64, u64, u64, Vec<u64>)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let v: Vec<u64> = l
                .split(", ")
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("bad field {x:?} in {l}"))
                })
                .collect();
            (v[0], v[1], v[2], v[3..].to_vec())
        })
        .collect()
}

#[test]
fn bench_json_and_hist_log_match_fios_for_the_same_job_file() {
    assert!(
        common::which("fio").is_some(),
        "fio is not installed (scripts/setup.sh installs it)"
    );
    let dir = tmpdir("cmp");
    let jobs = dir.join("cmp.fio");
    std::fs::write(&jobs, job_file(&dir)).unwrap();

    // --output: fio prints notes (a sync engine with iodepth > 1) on stdout.
    let fio_json = dir.join("fio.json");
    let o = Command::new("fio")
        .arg("--output-format=json")
        .arg(format!("--output={}", fio_json.display()))
        .arg(&jobs)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(&fio_json).unwrap();
    let fio: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("fio JSON: {e}: {text}"));

    let hist = dir.join("bench.hist.log");
    let o = Command::new(BIN)
        .args(["--json", "bench", "--job-file"])
        .arg(&jobs)
        .arg("--hist-log")
        .arg(&hist)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bench: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ours: Value = serde_json::from_slice(&o.stdout).unwrap();

    // Same jobs, same groups (stonewall starts group 1).
    let names = |v: &Value| -> Vec<(String, u64)> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| (j["jobname"].as_str().unwrap().to_string(), u(&j["groupid"])))
            .collect()
    };
    assert_eq!(names(&fio), names(&ours));
    assert_eq!(
        names(&ours),
        [("split", 0), ("capped", 0), ("think", 0), ("seq", 1)]
            .map(|(n, g)| (n.to_string(), g))
            .to_vec()
    );

    // Shape: every field we claim, at fio's path with fio's type.
    let mut problems = Vec::new();
    for (fj, oj) in fio["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(ours["jobs"].as_array().unwrap())
    {
        let name = fj["jobname"].as_str().unwrap();
        for k in JOB_FIELDS {
            same_shape(&fj[k], &oj[k], &format!("{name}.{k}"), &mut problems);
        }
        same_shape(
            &fj["ctx"],
            &oj["ctx"],
            &format!("{name}.ctx"),
            &mut problems,
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Values hold together, in fio's output and in ours.
    for (who, v) in [("fio", &fio), ("ours", &ours)] {
        for j in v["jobs"].as_array().unwrap() {
            for d in ["read", "write"] {
                check_dir(&format!("{who} {}.{d}", j["jobname"]), &j[d]);
            }
        }
    }
    let split = job(&ours, "split");
    assert!(f(&split["usr_cpu"]) + f(&split["sys_cpu"]) > 0.0, "{split}");
    assert!(u(&split["ctx"]) > 0 || f(&split["usr_cpu"]) > 0.0);

    // bssplit: the read sizes in their shares, writes all 8 KiB.
    let reads = bs_ios(&ours, "split", "read");
    let total: u64 = reads.iter().map(|r| r.1).sum();
    assert!(total >= 200, "too few reads to check shares: {reads:?}");
    for (bs, pct) in [(4096u64, 50.0), (16384, 30.0), (65536, 20.0)] {
        let n = reads.iter().find(|r| r.0 == bs).map(|r| r.1).unwrap_or(0);
        let got = 100.0 * n as f64 / total as f64;
        // 5 standard deviations of a binomial share, at least 3 points.
        let sd = (pct * (100.0 - pct) / total as f64).sqrt();
        assert!(
            (got - pct).abs() <= (5.0 * sd).max(3.0),
            "{bs}: {got:.1}% of {total}, want {pct}%: {reads:?}"
        );
    }
    assert_eq!(
        bs_ios(&ours, "split", "write")
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        vec![8192]
    );
    let sw = &split["write"];
    let sr = &split["read"];
    let read_share =
        u(&sr["total_ios"]) as f64 / (u(&sr["total_ios"]) + u(&sw["total_ios"])) as f64;
    assert!(
        (0.5..0.7).contains(&read_share),
        "rwmixread=60: {read_share}"
    );

    // rate_iops=400 with bssplit 4k/64k: fio caps bytes at 400 * 4 KiB/s,
    // so the I/Os stay well under 400/s. Hard upper bound: one I/O ahead.
    let capped = &job(&ours, "capped")["read"];
    let rt = u(&capped["runtime"]) as f64 / 1000.0;
    let cap_bytes = 400.0 * 4096.0 * rt + 65536.0;
    let bytes = u(&capped["io_bytes"]) as f64;
    assert!(bytes <= cap_bytes, "capped: {bytes} bytes > {cap_bytes}");
    assert!(
        bytes >= cap_bytes * 0.25,
        "capped barely ran: {bytes} of {cap_bytes}"
    );
    assert!(
        (u(&capped["total_ios"]) as f64) < 400.0 * rt / 4.0,
        "rate_iops counts bytes of the smallest block: {capped}"
    );
    // The same cap under fio.
    let fcapped = &job(&fio, "capped")["read"];
    let frt = u(&fcapped["runtime"]) as f64 / 1000.0;
    assert!(u(&fcapped["io_bytes"]) as f64 <= 400.0 * 4096.0 * frt * 1.05 + 65536.0);

    // thinktime=10ms after every 4 completed I/Os at iodepth 4: at most
    // 8 I/Os per 10 ms cycle.
    let think = &job(&ours, "think")["write"];
    let ms = u(&think["runtime"]);
    let bound = 8 * (ms / 10 + 1);
    assert!(u(&think["total_ios"]) <= bound, "think: {think}");
    assert!(u(&think["total_ios"]) > 0);

    // The histogram logs: fio's columns (3 + 1856 bins), reads 0 and
    // writes 1, in time order, and no more I/Os than were done.
    let fio_logs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("_clat_hist."))
        .collect();
    assert!(!fio_logs.is_empty(), "fio wrote no histogram log");
    let fio_cols = hist_lines(&fio_logs[0])
        .first()
        .map(|l| l.3.len())
        .expect("fio's log has lines");
    let lines = hist_lines(&hist);
    assert!(lines.len() >= 4, "{} lines", lines.len());
    for l in &lines {
        assert_eq!(l.3.len(), fio_cols, "columns like fio's");
        assert!(l.1 <= 1, "ddir {}", l.1);
        assert!([4096, 8192, 16384, 65536].contains(&l.2), "bs {}", l.2);
    }
    assert!(lines.windows(2).all(|w| w[0].0 <= w[1].0), "time order");
    // One time axis for the run: the stonewalled job's lines come after
    // the first group's measured time.
    let group0_ms = u(&split["read"]["runtime"]);
    let last = lines.last().unwrap().0;
    assert!(
        last > group0_ms,
        "last sample at {last} ms, group 0 ran {group0_ms} ms"
    );
    let logged_reads: u64 = lines
        .iter()
        .filter(|l| l.1 == 0)
        .map(|l| l.3.iter().sum::<u64>())
        .sum();
    let all_reads: u64 = ours["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| u(&j["read"]["total_ios"]))
        .sum();
    assert!(
        logged_reads > 0 && logged_reads <= all_reads,
        "{logged_reads} logged of {all_reads}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn job_file_errors_name_the_option() {
    let dir = tmpdir("err");
    let cases = [
        ("[a]\nbssplit=4k/70:8k/50\n", "more than 100"),
        ("[a]\nrandom_distribution=zipf:1\n", "not 1.0"),
        (
            "[a]\nrandom_distribution=zoned:60/10:40/90\n",
            "not supported",
        ),
        ("[a]\nrate_iops=lots\n", "rate_iops"),
        ("[a]\nthinktime=soon\n", "bad duration"),
        (
            "[a]\nbssplit=4k/50:8k/50\nverify=1\n",
            "verify needs one block size",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = dir.join(format!("{i}.fio"));
        std::fs::write(&p, text).unwrap();
        let o = Command::new(BIN)
            .args(["--json", "bench", "--runtime", "1s", "--job-file"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{text:?} should fail");
        assert!(err.contains(needle), "{text:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{text:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
