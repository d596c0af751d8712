//! `iscsi-bypass bench`: the default job, JSON schema, verify (including a
//! detected corruption), and clear errors for bad input. Uses the embedded
//! target, so no root is needed.

use iscsi_bypass::bench::engine::MultipathFactory;
use iscsi_bypass::bench::job::{JobSpec, RwMode};
use iscsi_bypass::bench::{self, BenchError, LiveCounters};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::worker::{DeviceConfig, IdleMode, PathConfig, WorkerDevice};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_iscsi-bypass");

fn bench_cmd(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN).arg("bench").args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn default_job_runs_over_two_paths_with_fio_like_json() {
    let (ok, out, err) = bench_cmd(&["--runtime", "1s", "--ramp", "200ms", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let read = &v["jobs"][0]["read"];
    assert!(read["iops"].as_f64().unwrap() > 100.0, "{read}");
    assert!(read["total_ios"].as_u64().unwrap() > 100);
    for p in ["50.000000", "99.000000", "99.900000", "99.990000"] {
        assert!(
            read["clat_ns"]["percentile"][p].as_u64().unwrap() > 0,
            "{p}"
        );
    }
    let ours = &v["iscsi_bypass"];
    assert!(ours["cpu_ns_per_io"].as_f64().unwrap() > 0.0);
    // Poll-mode accounting: the path workers' busy rounds, per I/O; the
    // rounds that found nothing (they nap between I/Os) are idle.
    let busy = ours["busy_ns_per_io"].as_f64().unwrap();
    assert!(busy > 0.0, "{ours}");
    assert!(ours["idle_ns"].as_u64().unwrap() > 0, "{ours}");
    let paths = ours["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2, "the default job uses two paths");
    for p in paths {
        assert!(
            p["stats"]["total_ios"].as_u64().unwrap() > 0,
            "both paths carry I/O: {p}"
        );
    }
}

#[test]
fn text_report_and_hist_log() {
    let dir = std::env::temp_dir().join(format!("ib-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("lat.hist.log");
    let hdr = dir.join("lat.hlog");
    let (ok, out, err) = bench_cmd(&[
        "--runtime",
        "500ms",
        "--ramp",
        "0",
        "--rw",
        "randrw",
        "--bs",
        "8k",
        "--hist-log",
        log.to_str().unwrap(),
        "--hist-log-msec",
        "100",
        "--hdr-log",
        hdr.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("read: IOPS="), "{out}");
    assert!(out.contains("write: IOPS="), "{out}");
    assert!(out.contains("p99.9="), "{out}");
    assert!(out.contains("ns per I/O"), "{out}");
    // fio's log_hist_msec format: msec, ddir, bs, 1856 bins; a line per
    // 100 ms and direction.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(", ").collect()).collect();
    assert!(lines.len() >= 4, "{text}");
    for l in &lines {
        assert_eq!(l.len(), 3 + 1856);
        assert!(l[1] == "0" || l[1] == "1", "{l:?}");
        assert_eq!(l[2], "8192");
    }
    assert!(lines.iter().any(|l| l[1] == "0") && lines.iter().any(|l| l[1] == "1"));
    let hdr_text = std::fs::read_to_string(&hdr).unwrap();
    assert!(hdr_text.contains("#[StartTime"), "{hdr_text}");
    assert!(
        hdr_text.lines().any(|l| l.starts_with("Tag=read,")),
        "{hdr_text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_gives_one_clear_line_and_nonzero_exit() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = format!("iscsi://{closed}/iqn.2026-11.x:y/0");
    let t = Target::start(TargetConfig::ram(
        "iqn.2026-11.org.iscsi-bypass:small",
        1 << 20,
    ))
    .unwrap();
    let small = format!("iscsi://{}/{}/0", t.portals()[0], t.iqn());
    let refusing = Target::start(TargetConfig::ram(
        "iqn.2026-11.org.iscsi-bypass:refuse",
        1 << 20,
    ))
    .unwrap();
    refusing.faults().refuse_logins(2, 2);
    let refused = format!("iscsi://{}/{}/0", refusing.portals()[0], refusing.iqn());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--rw", "sideways"], "unknown rw mode"),
        (vec!["--iodepth", "0"], "iodepth"),
        (vec![&unreachable, "--runtime", "1s"], "Connection refused"),
        (
            vec![&small, "--size", "8m", "--runtime", "1s"],
            "LUN has 1048576 bytes",
        ),
        (vec![&refused, "--runtime", "1s"], "not authorized"),
        (
            vec!["--policy", "random", "--runtime", "1s"],
            "policy \"random\": want queue-depth",
        ),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = bench_cmd(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
    let o = Command::new(BIN)
        .args(["bench", "--frobnicate"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--frobnicate"));
}

fn device_on(t: &TargetHandle) -> WorkerDevice {
    WorkerDevice::open(config_on(t)).unwrap()
}

/// One kernel path per portal of `t`, workers napping when idle.
fn config_on(t: &TargetHandle) -> DeviceConfig {
    let paths = t
        .portals()
        .iter()
        .map(|p| {
            PathConfig::kernel(
                *p,
                None,
                LoginConfig::new("iqn.2026-11.org.iscsi-bypass:test", Some(t.iqn())),
            )
        })
        .collect();
    let mut config = DeviceConfig::new(paths, 0);
    config.idle = IdleMode::Sleep(Duration::from_micros(50));
    config
}

fn verify_job(rw: RwMode) -> JobSpec {
    JobSpec {
        rw,
        bs: 4096,
        iodepth: 8,
        numjobs: 2,
        runtime: Duration::from_millis(700),
        ramp: Duration::ZERO,
        size: 1 << 20,
        verify: true,
        ..JobSpec::default()
    }
}

#[test]
fn verify_passes_on_good_data_and_names_the_lba_of_a_corruption() {
    let t = Target::start(
        TargetConfig::ram("iqn.2026-11.org.iscsi-bypass:verify", 8 << 20).loopback_portals(2),
    )
    .unwrap();
    let device = device_on(&t);
    let factory = MultipathFactory {
        device: &device,
        path_names: vec!["a".into(), "b".into()],
        idle_sleep: Some(Duration::from_micros(20)),
    };
    // Sequential writes stamp every block of the 1 MiB region first.
    let mut fill = verify_job(RwMode::Write);
    fill.numjobs = 1;
    fill.runtime = Duration::from_millis(400);
    let r = bench::run(&fill, &factory, Arc::new(LiveCounters::default())).unwrap();
    r.check().unwrap();
    let r = bench::run(
        &verify_job(RwMode::RandRw),
        &factory,
        Arc::new(LiveCounters::default()),
    )
    .unwrap();
    r.check().unwrap();
    let s = bench::report::summary(&r);
    assert!(s.read.ios > 0 && s.write.ios > 0);

    // Flip one byte of block 100 behind the initiator's back.
    let lun = t.lun(0).unwrap();
    let mut block = vec![0u8; 512];
    lun.read(100 * 512, &mut block);
    assert_eq!(&block[..8], b"IBVERIFY", "the fill job stamped block 100");
    block[200] ^= 0xff;
    lun.write(100 * 512, &block);
    let mut read = verify_job(RwMode::Read);
    read.numjobs = 1;
    read.runtime = Duration::from_secs(5);
    let r = bench::run(&read, &factory, Arc::new(LiveCounters::default())).unwrap();
    match r.check() {
        Err(BenchError::Verify { lba, what }) => {
            assert_eq!(lba, 100);
            assert!(what.contains("CRC32C"), "{what}");
        }
        other => panic!("corruption not detected: {:?}", other.err()),
    }
    device.close();
}

#[test]
fn discovered_target_uses_all_its_portals() {
    let t = Target::start(
        TargetConfig::null("iqn.2026-11.org.iscsi-bypass:disc", 64 << 20).loopback_portals(2),
    )
    .unwrap();
    let portal = format!("iscsi://{}", t.portals()[0]);
    let (ok, out, err) = bench_cmd(&[
        "--discover",
        &portal,
        "--runtime",
        "500ms",
        "--ramp",
        "0",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let paths = v["iscsi_bypass"]["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2, "{v}");
    let (ok, _, err) = bench_cmd(&[
        "--discover",
        &portal,
        "--target-iqn",
        "iqn.2026-11.nope:x",
        "--runtime",
        "1s",
    ]);
    assert!(!ok);
    assert!(err.contains("is not among"), "{err}");
}

#[test]
fn verify_holds_across_a_path_failure() {
    let t = Target::start(
        TargetConfig::ram("iqn.2026-11.org.iscsi-bypass:failover", 8 << 20).loopback_portals(2),
    )
    .unwrap();
    let mut config = config_on(&t);
    // Notice a dead path fast.
    config.timers.nop_interval = Some(Duration::from_millis(200));
    config.timers.nop_timeout = Duration::from_millis(300);
    let device = WorkerDevice::open(config).unwrap();
    let factory = MultipathFactory {
        device: &device,
        path_names: vec!["a".into(), "b".into()],
        idle_sleep: Some(Duration::from_micros(20)),
    };
    let mut job = verify_job(RwMode::RandRw);
    job.runtime = Duration::from_secs(3);
    let faults = t.faults().portal(0);
    let r = std::thread::scope(|s| {
        let runner = s.spawn(|| bench::run(&job, &factory, Arc::new(LiveCounters::default())));
        std::thread::sleep(Duration::from_millis(800));
        faults.drop_connections_now();
        runner.join().unwrap()
    })
    .unwrap();
    r.check()
        .expect("no I/O error and no verify mismatch across the failover");
    let s = bench::report::summary(&r);
    assert!(
        s.read.ios > 100 && s.write.ios > 100,
        "I/O went on: {} reads, {} writes",
        s.read.ios,
        s.write.ios
    );
    let stats = device.paths();
    assert!(
        stats.iter().map(|p| p.logins).sum::<u64>() >= 3,
        "the dropped path logged in again: {stats:?}"
    );
    device.close();
}
