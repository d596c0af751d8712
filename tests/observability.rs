//! What engineers watch: `iscsi-bypass paths` (the `multipath -ll` view),
//! the CLI's logging, and the Prometheus endpoint of a long-running export,
//! against the embedded target on two loopback portals.

use iscsi_bypass::target::{AluaState, Target, TargetConfig, TargetHandle};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_iscsi-bypass");
const IQN: &str = "iqn.2026-12.org.iscsi-bypass:paths-view";

fn target() -> TargetHandle {
    Target::start(TargetConfig::ram(IQN, 16 << 20).loopback_portals(2)).expect("start target")
}

fn urls(t: &TargetHandle) -> Vec<String> {
    t.portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect()
}

fn cli(args: &[&str], rust_log: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null()).env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    cmd.output().expect("run iscsi-bypass")
}

#[test]
fn json_view_groups_paths_by_alua_with_their_sessions() {
    let t = target();
    t.set_alua_state(2, AluaState::Standby).unwrap();
    let u = urls(&t);
    let out = cli(&["--json", "paths", &u[0], &u[1]], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "quiet by default: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON view");
    assert_eq!(view["lu"]["block_size"], 512);
    assert_eq!(view["lu"]["capacity_bytes"], 16 << 20);
    assert!(
        view["lu"]["id"].as_str().unwrap().starts_with("naa."),
        "{view}"
    );
    let groups = view["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{view}");
    assert_eq!(groups[0]["alua"], "active/optimized");
    assert_eq!(groups[1]["alua"], "standby");
    let mut isids = Vec::new();
    for (g, portal) in groups.iter().zip(t.portals()) {
        let paths = g["paths"].as_array().unwrap();
        assert_eq!(paths.len(), 1, "{g}");
        let p = &paths[0];
        assert_eq!(p["portal"], portal.to_string());
        assert_eq!(p["state"], "Up");
        assert_eq!(p["transport"], "kernel");
        assert!(p["tsih"].as_u64().unwrap() > 0, "target-assigned TSIH: {p}");
        assert_eq!(p["cid"], 0);
        isids.push(p["isid"].as_str().unwrap().to_string());
    }
    assert_ne!(isids[0], isids[1], "one session (I_T nexus) per path");
}

#[test]
fn discovery_finds_every_portal_and_text_draws_the_tree() {
    let t = target();
    let portal = format!("iscsi://{}", t.portals()[0]);
    let out = cli(&["paths", "--discover", &portal], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "header, size, one group, two paths:\n{text}"
    );
    assert!(
        lines[1].starts_with("size=16.0 MiB (32768 x 512 B)"),
        "{text}"
    );
    assert!(lines[2].starts_with("`-+- alua=active/optimized"), "{text}");
    for (line, p) in lines[3..].iter().zip(t.portals()) {
        assert!(line.contains(&format!(" {p} kernel isid=")), "{line}");
        assert!(line.contains(" up "), "{line}");
    }
}

#[test]
fn rust_log_shows_timestamped_path_events() {
    let t = target();
    let u = urls(&t);
    let out = cli(&["paths", &u[0]], Some("info"));
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("path ") && l.contains("-> up: logged in"))
        .unwrap_or_else(|| panic!("no login event in:\n{log}"));
    // env_logger's RFC 3339 timestamp: [2026-12-01T20:00:00.123456Z INFO ...
    assert!(line.starts_with("[20") && line.contains("Z INFO"), "{line}");
}

#[test]
fn watch_redraws_until_interrupted() {
    let t = target();
    let u = urls(&t);
    let mut child = Command::new(BIN)
        .args(["--json", "paths", "--watch", "0.2", &u[0], &u[1]])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let mut views = 0;
    while views < 3 && started.elapsed() < Duration::from_secs(20) {
        let line = lines.next().expect("a view").unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).expect("each redraw is one JSON line");
        assert_eq!(v["groups"][0]["paths"].as_array().unwrap().len(), 2);
        views += 1;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(views, 3);
}

#[test]
fn bad_input_gets_one_clear_error() {
    let out = cli(&["paths", "--discover", "iscsi://127.0.0.1:1"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    let t = target();
    let portal = format!("iscsi://{}", t.portals()[0]);
    let out = cli(
        &[
            "paths",
            "--discover",
            &portal,
            "--target-iqn",
            "iqn.2026-12.org.example:nope",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target iqn.2026-12.org.example:nope is not among the 1 targets"),
        "{err}"
    );
    let out = cli(&["paths"], None);
    assert!(!out.status.success(), "a URL or --discover is required");
}

/// One scrape of `http://addr/metrics`.
fn scrape(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    reply.starts_with("HTTP/1.1 200").then_some(reply)
}

#[test]
fn export_nbd_serves_path_metrics_on_loopback() {
    let t = target();
    let u = urls(&t);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let socket = std::env::temp_dir().join(format!("ibx-metrics-{}.sock", std::process::id()));
    let mut child = Command::new(BIN)
        .args(["export-nbd", &u[0], &u[1], "--socket"])
        .arg(&socket)
        .args(["--metrics-listen", &metrics])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut text = None;
    while text.is_none() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        text = scrape(&metrics);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&socket);
    let text = text.expect("the export serves /metrics");
    for (i, p) in t.portals().iter().enumerate() {
        let line = format!(r#"iscsi_path_up{{path="{i}",name="{p}"}} 1"#);
        assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        let logins = format!(r#"iscsi_path_logins_total{{path="{i}",name="{p}"}} 1"#);
        assert!(text.lines().any(|l| l == logins), "no {logins} in\n{text}");
    }
    assert!(text.contains("# TYPE iscsi_path_latency_seconds histogram"));
    assert!(text.trim_end().ends_with("# EOF"));
}
