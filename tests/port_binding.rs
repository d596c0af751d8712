//! Port binding as vSphere does it, on the bed the vSphere set-up warns
//! about (scripts/netns-one-subnet.sh): two initiator interfaces v0/v1 on
//! ONE subnet into one bridge in the target namespace, tgtd on one portal
//! (10.233.1.2) or two (also 10.233.1.3). The initiator runs inside the
//! initiator namespace (this binary re-executes itself there with
//! `ip netns exec`; each DPDK run gets a process, hence an EAL, of its own).
//!
//! Each scenario reads the interfaces' byte counters around a load and
//! prints the per-interface split (`PB split ...` lines):
//! - `kernel_*`: kernel TCP. Without binding every path leaves through v0
//!   (the first route to the subnet): the split is 100/0. Bound
//!   (SO_BINDTODEVICE + source address, after applying what
//!   scripts/check-port-binding.sh prints), each interface carries its
//!   path's share.
//! - `dpdk_*`: the userspace stack, one net_af_packet port per veth, each
//!   with its own address on the subnet; bindings name the port by its
//!   kernel interface or DPDK name, and the bytes follow the binding.
//! - `*_iface_down_*`: write+verify while v0 goes down: only the path bound
//!   to v0 fails, nothing is lost.
//!
//! Needs root, tgtd, iproute2 and ethtool, and for `dpdk_*` the af_packet
//! PMD: skipped with a reason otherwise, failed when CI=true.

mod common;
#[cfg(feature = "dpdk")]
mod dpdk_common;

use common::{tgtd_unavailable, which, Tgtd, TgtdOptions};
use iscsi_bypass::iscsi::connection::ConnTimers;
use iscsi_bypass::multipath::ReconnectPolicy;
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::worker::{DeviceConfig, IdleMode, Io, IoQueue, PathState, WorkerDevice};
use iscsi_bypass::{Options, PortBinding};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const INITIATOR: &str = "iqn.2026-11.org.iscsi-bypass:pb-test";
#[cfg(feature = "dpdk")]
const VDEVS: [&str; 2] = ["net_af_packet0,iface=v0", "net_af_packet1,iface=v1"];
static SERIAL: Mutex<()> = Mutex::new(());

fn script(name: &str) -> String {
    format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

struct Bed {
    name: String,
}

impl Bed {
    fn up(name: &str, mode: &str, portals: u8) -> Bed {
        // From here on Drop removes whatever was made.
        let bed = Bed {
            name: name.to_string(),
        };
        let st = Command::new("bash")
            .arg(script("netns-one-subnet.sh"))
            .args(["up", name, mode, &portals.to_string()])
            .status()
            .expect("run netns-one-subnet.sh");
        assert!(st.success(), "netns-one-subnet.sh up failed");
        bed
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script("netns-one-subnet.sh"))
            .args(["down", &self.name])
            .status();
    }
}

fn unavailable(dpdk: bool) -> bool {
    if tgtd_unavailable().is_some() {
        return true;
    }
    if dpdk {
        #[cfg(feature = "dpdk")]
        if let Some(why) = dpdk_common::skip_reason("net_af_packet") {
            assert!(!common::required(), "CI requires the DPDK tests: {why}");
            eprintln!("SKIPPED: {why}");
            return true;
        }
        #[cfg(not(feature = "dpdk"))]
        {
            assert!(!common::required(), "CI requires the dpdk feature");
            eprintln!("SKIPPED: built without the dpdk feature");
            return true;
        }
    }
    for tool in ["ip", "ethtool"] {
        if which(tool).is_none() {
            assert!(!common::required(), "CI requires {tool}");
            eprintln!("SKIPPED: {tool} not installed");
            return true;
        }
    }
    false
}

/// Bed + tgtd, then `scenario` inside the initiator namespace.
fn run_outer(bed_name: &str, scenario: &str, dpdk: bool, portals: u8) {
    if unavailable(dpdk) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::up(bed_name, if dpdk { "dpdk" } else { "kernel" }, portals);
    let tgt = format!("{bed_name}-tgt");
    let tgtd = Tgtd::start(TgtdOptions {
        lun_sizes: vec![64 << 20],
        portals: vec!["10.233.1.2".into()],
        netns: Some(tgt.clone()),
        ..Default::default()
    });
    if portals == 2 {
        // tgtd keeps only the last --iscsi portal= option: add the second.
        tgtd.adm(&[
            "--mode",
            "portal",
            "--op",
            "new",
            "--param",
            &format!("portal=10.233.1.3:{}", tgtd.port),
        ]);
    }
    // tgtd answers SendTargets with the portal the question came in on
    // only; the embedded target reports both, for the discovery mesh.
    let embedded = (portals == 2).then(|| embedded_target_in(&tgt));
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{bed_name}-ini")])
        .arg(std::env::current_exe().unwrap())
        .args([
            "inner",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PB_SCENARIO", scenario)
        .env("PB_DPDK", if dpdk { "1" } else { "0" })
        .env("PB_IQN", &tgtd.iqn)
        .env("PB_PORT", tgtd.port.to_string())
        .output()
        .expect("run inner test");
    drop(tgtd);
    drop(embedded);
    drop(bed);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for l in text
        .lines()
        .filter_map(|l| l.find("PB ").map(|at| &l[at..]))
    {
        println!("{l}");
    }
    assert!(
        out.status.success() && text.contains("PB-SCENARIO-PASSED"),
        "scenario {scenario} failed:\n{text}"
    );
}

const EMBEDDED_IQN: &str = "iqn.2026-11.org.iscsi-bypass:pb-embedded";
const EMBEDDED_PORT: u16 = 3261;

/// The embedded target in namespace `ns` on both portals of the bed.
fn embedded_target_in(ns: &str) -> TargetHandle {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let path = format!("/run/netns/{ns}");
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut c = TargetConfig::ram(EMBEDDED_IQN, 16 << 20);
        for ip in ["10.233.1.2", "10.233.1.3"] {
            c = c.portal(format!("{ip}:{EMBEDDED_PORT}").parse().unwrap());
        }
        Target::start(c).expect("embedded target")
    })
    .join()
    .expect("start the embedded target")
}

#[test]
fn kernel_one_subnet_each_bound_path_leaves_through_its_own_interface() {
    run_outer("pbk1", "split", false, 1);
}

#[test]
fn kernel_one_subnet_two_portals_bound_paths_and_discovery_across_bindings() {
    run_outer("pbk2", "two-portals", false, 2);
}

#[test]
fn kernel_one_subnet_iface_down_fails_only_its_path_and_loses_nothing() {
    run_outer("pbk3", "down", false, 1);
}

#[test]
fn dpdk_one_subnet_each_bound_path_leaves_through_its_own_interface() {
    run_outer("pbd1", "split", true, 1);
}

#[test]
fn dpdk_one_subnet_two_portals_bound_paths_and_discovery_across_bindings() {
    run_outer("pbd2", "two-portals", true, 2);
}

#[test]
fn dpdk_one_subnet_iface_down_fails_only_its_path_and_loses_nothing() {
    run_outer("pbd3", "down", true, 1);
}

#[test]
fn dpdk_cli_bench_binds_each_path_to_the_port_of_its_iface() {
    run_outer("pbd4", "cli", true, 1);
}

/// The CLI's count and name checks (no target needed: they come first).
#[test]
fn cli_refuses_mismatched_or_unknown_bindings() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
            .args(args)
            .output()
            .expect("run iscsi-bypass");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let two = [
        "iscsi://127.0.0.1:1/iqn.x:y/0",
        "iscsi://127.0.0.2:1/iqn.x:y/0",
    ];
    let err = run(&["bench", two[0], two[1], "--iface", "lo"]);
    assert!(err.contains("2 path(s) but 1 --iface"), "{err}");
    let err = run(&[
        "bench",
        two[0],
        two[1],
        "--bind",
        "127.0.0.1",
        "--bind",
        "127.0.0.2",
        "--bind",
        "127.0.0.3",
    ]);
    assert!(err.contains("2 path(s) but 3 --bind"), "{err}");
    let err = run(&[
        "bench", two[0], two[1], "--iface", "lo", "--iface", "nope-if9",
    ]);
    assert!(err.contains("no interface named \"nope-if9\""), "{err}");
    let err = run(&[
        "export-nbd",
        two[0],
        two[1],
        "--socket",
        "/tmp/pb-never.sock",
        "--iface",
        "lo",
    ]);
    assert!(err.contains("2 path(s) but 1 --iface"), "{err}");
    let err = run(&["bench", two[0], "--iface", "lo", "--bind", "192.0.2.99"]);
    assert!(err.contains("not an address of lo"), "{err}");
}

// ---------------------------------------------------------------------------
// Inside the initiator namespace.

struct Env {
    iqn: String,
    port: u16,
    dpdk: bool,
}

impl Env {
    fn url(&self, portal: &str) -> String {
        format!("iscsi://{portal}:{}/{}/1", self.port, self.iqn)
    }
}

#[test]
#[ignore = "run by the tests above inside the initiator namespace"]
fn inner() {
    let Ok(scenario) = std::env::var("PB_SCENARIO") else {
        return;
    };
    let env = Env {
        iqn: std::env::var("PB_IQN").unwrap(),
        port: std::env::var("PB_PORT").unwrap().parse().unwrap(),
        dpdk: std::env::var("PB_DPDK").as_deref() == Ok("1"),
    };
    if !env.dpdk {
        host_setup(&env);
    }
    match scenario.as_str() {
        "split" => scenario_split(&env),
        "two-portals" => scenario_two_portals(&env),
        "down" => scenario_down(&env),
        "cli" => scenario_cli_dpdk(&env),
        s => panic!("unknown scenario {s}"),
    }
    println!("PB-SCENARIO-PASSED");
}

/// scripts/check-port-binding.sh on the fresh bed reports what is missing;
/// applying what it prints makes it pass.
fn host_setup(env: &Env) {
    let check = || {
        Command::new("bash")
            .arg(script("check-port-binding.sh"))
            .args(["v0", "v1"])
            .output()
            .expect("run check-port-binding.sh")
    };
    let before = check();
    let fixes = String::from_utf8_lossy(&before.stdout).into_owned();
    assert_eq!(before.status.code(), Some(1), "{fixes}");
    for want in [
        "arp_ignore=1",
        "arp_announce=2",
        "ip rule add from 10.233.1.12",
    ] {
        assert!(fixes.contains(want), "no {want} in:\n{fixes}");
    }
    // The bench warns about the same before it runs.
    let url = env.url("10.233.1.2");
    let bench = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .args(["bench", &url, &url, "--iface", "v0", "--iface", "v1"])
        .args(["--runtime", "200ms", "--ramp", "0", "--json"])
        .output()
        .expect("run bench");
    let stderr = String::from_utf8_lossy(&bench.stderr);
    assert!(
        stderr.contains("warning: the bound interfaces v0, v1 share a subnet")
            && stderr.contains("v1: arp_ignore=0"),
        "no set-up warning from bench: {stderr}"
    );
    println!("PB check-port-binding.sh prints:");
    for l in fixes.lines() {
        println!("PB   {l}");
    }
    let st = Command::new("bash")
        .args(["-c", &fixes])
        .status()
        .expect("apply fixes");
    assert!(st.success());
    let after = check();
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
}

fn counters(iface: &str) -> u64 {
    ["rx_bytes", "tx_bytes"]
        .iter()
        .map(|c| {
            std::fs::read_to_string(format!("/sys/class/net/{iface}/statistics/{c}"))
                .unwrap_or_else(|e| panic!("{iface} {c}: {e}"))
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

fn options(env: &Env, bindings: Vec<PortBinding>) -> Options {
    Options {
        initiator: INITIATOR.into(),
        transport: transport(env),
        bindings,
        idle: IdleMode::Sleep(Duration::from_micros(20)),
        queue_depth: 32,
        ..Options::default()
    }
}

#[cfg(feature = "dpdk")]
fn transport(env: &Env) -> iscsi_bypass::Transport {
    if env.dpdk {
        iscsi_bypass::Transport::Dpdk(dpdk_stacks().clone())
    } else {
        iscsi_bypass::Transport::Kernel
    }
}

#[cfg(not(feature = "dpdk"))]
fn transport(_: &Env) -> iscsi_bypass::Transport {
    iscsi_bypass::Transport::Kernel
}

/// Stacks on v0 (10.233.1.11) and v1 (10.233.1.12): one subnet.
#[cfg(feature = "dpdk")]
fn dpdk_stacks() -> &'static Vec<std::sync::Arc<iscsi_bypass::transport::dpdk::DpdkStack>> {
    use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
    use std::sync::{Arc, OnceLock};
    static STACKS: OnceLock<Vec<Arc<DpdkStack>>> = OnceLock::new();
    STACKS.get_or_init(|| {
        let args = dpdk_common::eal_args_multi(&VDEVS);
        (0..2u8)
            .map(|p| {
                let ip = std::net::Ipv4Addr::new(10, 233, 1, 11 + p);
                let port = format!("net_af_packet{p}");
                DpdkStack::open(DpdkOptions::new(args.clone(), &port, ip, 24))
                    .unwrap_or_else(|e| panic!("DPDK stack on {port}: {e}"))
            })
            .collect()
    })
}

fn tune(c: &mut DeviceConfig) {
    c.cores = vec![0, 1];
    c.timers = ConnTimers {
        nop_interval: Some(Duration::from_millis(500)),
        nop_timeout: Duration::from_millis(1000),
        command_timeout: Some(Duration::from_secs(5)),
    };
    c.reconnect = ReconnectPolicy {
        initial: Duration::from_millis(250),
        max: Duration::from_secs(2),
    };
}

fn open(env: &Env, urls: &[String], bindings: Vec<PortBinding>) -> WorkerDevice {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut c = options(env, bindings)
        .device_config(&urls)
        .expect("device config");
    tune(&mut c);
    WorkerDevice::open(c).expect("open")
}

/// Random 32 KiB reads at depth 16 for `dur`: I/Os per path.
fn read_load(q: &mut IoQueue, capacity: u64, dur: Duration, npaths: usize) -> Vec<u64> {
    let blocks = 64u32;
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut per_path = vec![0u64; npaths];
    let bs = q.block_size() as usize;
    let mut free: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; blocks as usize * bs]).collect();
    let mut out = Vec::new();
    let start = Instant::now();
    loop {
        let running = start.elapsed() < dur;
        while running && !free.is_empty() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let lba = rng % (capacity / u64::from(blocks)) * u64::from(blocks);
            let buf = free.pop().unwrap();
            if let Err(e) = q.submit(Io::read(lba, blocks, buf, 0)) {
                free.push(e.into_io().buffer);
                break;
            }
        }
        if !running && q.in_flight() == 0 {
            break;
        }
        out.clear();
        q.wait_completions(&mut out, 1, Duration::from_millis(100));
        for c in out.drain(..) {
            c.result.as_ref().expect("read");
            if let Some(p) = c.path {
                per_path[p] += 1;
            }
            free.push(c.buffer);
        }
    }
    per_path
}

/// Runs the read load and returns (path shares, interface shares of
/// v0/v1), printing both.
fn measure(label: &str, dev: &WorkerDevice) -> (Vec<f64>, [f64; 2]) {
    let mut q = dev.queue_pair();
    read_load(&mut q, dev.capacity(), Duration::from_millis(300), 2);
    let before = [counters("v0"), counters("v1")];
    let per_path = read_load(&mut q, dev.capacity(), Duration::from_millis(1500), 2);
    let after = [counters("v0"), counters("v1")];
    let bytes = [after[0] - before[0], after[1] - before[1]];
    let total = (bytes[0] + bytes[1]).max(1) as f64;
    let ios: u64 = per_path.iter().sum();
    let path_share: Vec<f64> = per_path.iter().map(|&n| n as f64 / ios as f64).collect();
    let iface = [bytes[0] as f64 / total, bytes[1] as f64 / total];
    let names: Vec<String> = dev.paths().iter().map(|p| p.name.clone()).collect();
    println!(
        "PB split {label}: v0 {:.1} MB ({:.1}%), v1 {:.1} MB ({:.1}%); paths {names:?} I/Os {per_path:?} ({:.1}% / {:.1}%)",
        bytes[0] as f64 / 1e6,
        iface[0] * 100.0,
        bytes[1] as f64 / 1e6,
        iface[1] * 100.0,
        path_share[0] * 100.0,
        path_share[1] * 100.0,
    );
    (path_share, iface)
}

/// Each interface carries the share of the path bound to it
/// (`iface_of[i]`: the interface index of path `i`).
fn assert_follows(label: &str, path_share: &[f64], iface: [f64; 2], iface_of: [usize; 2]) {
    for (p, &i) in iface_of.iter().enumerate() {
        assert!(
            (path_share[p] - iface[i]).abs() < 0.1,
            "{label}: path {p} did {:.3} of the I/O but v{i} carried {:.3} of the bytes",
            path_share[p],
            iface[i]
        );
        assert!(
            iface[i] > 0.05,
            "{label}: v{i} carried only {:.3}",
            iface[i]
        );
    }
}

fn scenario_split(env: &Env) {
    let urls = vec![env.url("10.233.1.2"), env.url("10.233.1.2")];
    // Without binding.
    let dev = open(env, &urls, Vec::new());
    let (share, iface) = measure("unbound", &dev);
    dev.close();
    if env.dpdk {
        // The userspace stacks share no routing table: each port owns its
        // address and answers ARP only for it, and unbound paths go to the
        // least-used stack on the portal's subnet. No 100/0 here.
        assert_follows("unbound over DPDK", &share, iface, [0, 1]);
    } else {
        // The problem: both connections leave through the first route.
        assert!(
            iface[0].max(iface[1]) > 0.95,
            "unbound paths spread over both interfaces: {iface:?}"
        );
    }
    if env.dpdk {
        // Bound in reverse: path 0 on v1 (by kernel interface name), path 1
        // on net_af_packet0 (by DPDK name, with its address).
        let bound = vec![
            PortBinding::iface("v1"),
            PortBinding::iface_source("net_af_packet0", "10.233.1.11".parse().unwrap()),
        ];
        let dev = open(env, &urls, bound);
        let names: Vec<String> = dev.paths().iter().map(|p| p.name.clone()).collect();
        assert!(names[0].starts_with("net_af_packet1/"), "{names:?}");
        assert!(names[1].starts_with("net_af_packet0/"), "{names:?}");
        let (share, iface) = measure("bound (path 0 -> v1, path 1 -> v0)", &dev);
        dev.close();
        assert_follows("bound", &share, iface, [1, 0]);
        // Bindings that name nothing real are refused, saying why.
        let urls1: Vec<&str> = vec![urls[0].as_str()];
        let bad = |b: PortBinding| match options(env, vec![b]).device_config(&urls1) {
            Ok(_) => panic!("a wrong binding was accepted"),
            Err(e) => e.to_string(),
        };
        let e = bad(PortBinding::iface_source(
            "v0",
            "10.233.1.12".parse().unwrap(),
        ));
        assert!(
            e.contains("has address 10.233.1.11, not 10.233.1.12"),
            "{e}"
        );
        let e = bad(PortBinding::iface("v9"));
        assert!(e.contains("no DPDK port named \"v9\""), "{e}");
    } else {
        let bound = vec![
            PortBinding::iface_source("v0", "10.233.1.11".parse().unwrap()),
            PortBinding::iface_source("v1", "10.233.1.12".parse().unwrap()),
        ];
        let dev = open(env, &urls, bound);
        let (share, iface) = measure("bound (path 0 -> v0, path 1 -> v1)", &dev);
        dev.close();
        assert_follows("bound", &share, iface, [0, 1]);
        // Interface alone (the kernel picks its address), in reverse.
        let dev = open(
            env,
            &urls,
            vec![PortBinding::iface("v1"), PortBinding::iface("v0")],
        );
        let (share, iface) = measure("bound by interface only, reversed", &dev);
        dev.close();
        assert_follows("bound by interface", &share, iface, [1, 0]);
        nbd_export_is_bound(&urls);
        // The CLI: one --iface/--bind per URL.
        let out = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
            .arg("bench")
            .args(&urls)
            .args(["--iface", "v0", "--bind", "10.233.1.11"])
            .args(["--iface", "v1", "--bind", "10.233.1.12"])
            .args(["--bs", "32k", "--iodepth", "16", "--runtime", "1s"])
            .args(["--ramp", "0", "--json"])
            .output()
            .expect("run bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "bench: {stderr}");
        assert!(!stderr.contains("warning"), "set-up is complete: {stderr}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let paths = report["iscsi_bypass"]["paths"].as_array().expect("paths");
        let names: Vec<&str> = paths.iter().filter_map(|p| p["name"].as_str()).collect();
        println!("PB cli bench paths: {names:?}");
        assert!(
            names[0].starts_with("v0 10.233.1.11->") && names[1].starts_with("v1 10.233.1.12->"),
            "{names:?}"
        );
    }
}

fn scenario_two_portals(env: &Env) {
    let urls = vec![env.url("10.233.1.2"), env.url("10.233.1.3")];
    let bound = vec![PortBinding::iface("v0"), PortBinding::iface("v1")];
    let dev = open(env, &urls, bound.clone());
    let (share, iface) = measure("two portals bound (v0 -> .2, v1 -> .3)", &dev);
    dev.close();
    assert_follows("two portals", &share, iface, [0, 1]);
    // Discovery across bindings through tgtd, which reports one portal
    // (the one asked): one path per interface that reaches it.
    let mut with = bound.clone();
    if !env.dpdk {
        // v2's link is down: its pairs cannot reach the target.
        with.push(PortBinding::iface("v2"));
    }
    let tgtd_portal = format!("10.233.1.2:{}", env.port);
    let found = options(env, with.clone())
        .discover_paths(&tgtd_portal, Some(&env.iqn), 1, None)
        .expect("discovery across bindings (tgtd)");
    println!(
        "PB discover via tgtd: {:?} over {:?}",
        found.urls, found.bindings
    );
    assert_eq!(found.bindings, bound, "{found:?}");
    // Discovery across bindings through the embedded target, which
    // reports both portals: every interface × portal pair.
    let portal = format!("10.233.1.2:{EMBEDDED_PORT}");
    let iqn = EMBEDDED_IQN;
    let found = options(env, with.clone())
        .discover_paths(&portal, Some(iqn), 0, None)
        .expect("discovery across bindings");
    let pairs: Vec<String> = found
        .urls
        .iter()
        .zip(&found.bindings)
        .map(|(u, b)| format!("{} -> {u}", b.describe()))
        .collect();
    println!("PB discover: {pairs:?}");
    for u in &found.unreachable {
        println!(
            "PB discover unreachable: {} -> {}: {}",
            u.binding.describe(),
            u.portal,
            u.reason
        );
    }
    assert_eq!(found.urls.len(), 4, "{pairs:?}");
    if !env.dpdk {
        assert_eq!(found.unreachable.len(), 2, "{:?}", found.unreachable);
        assert!(found
            .unreachable
            .iter()
            .all(|u| u.binding == PortBinding::iface("v2")));
    }
    // Capped at one path per portal: one interface per portal.
    let capped = options(env, with)
        .discover_paths(&portal, Some(iqn), 0, Some(1))
        .expect("capped discovery");
    let pairs: Vec<String> = capped
        .urls
        .iter()
        .zip(&capped.bindings)
        .map(|(u, b)| format!("{} -> {u}", b.describe()))
        .collect();
    println!("PB discover --max-paths-per-portal 1: {pairs:?}");
    assert_eq!(capped.urls.len(), 2, "{pairs:?}");
    assert_ne!(capped.bindings[0], capped.bindings[1], "{pairs:?}");
    assert_ne!(capped.urls[0], capped.urls[1], "{pairs:?}");
    let urls: Vec<&str> = capped.urls.iter().map(String::as_str).collect();
    let dev = WorkerDevice::open_urls(&urls, &capped.options(&options(env, Vec::new())))
        .expect("open discovered");
    let mut q = dev.queue_pair();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 13 + 5) as u8).collect();
    q.write_at(4096, &data).expect("write");
    let mut back = vec![0u8; data.len()];
    q.read_at(4096, &mut back).expect("read");
    assert!(back == data, "read back differs");
    drop(q);
    dev.close();
    if !env.dpdk {
        // The CLI: --discover with several --iface; v2's pairs reported.
        let out = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
            .arg("bench")
            .args(["--discover", &format!("iscsi://{portal}")])
            .args(["--target-iqn", iqn, "--lun", "0"])
            .args(["--iface", "v0", "--iface", "v1", "--iface", "v2"])
            .args(["--max-paths-per-portal", "1"])
            .args(["--runtime", "1s", "--ramp", "0", "--json"])
            .output()
            .expect("run bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "bench: {stderr}");
        for l in stderr.lines().filter(|l| l.starts_with("discovery")) {
            println!("PB cli {l}");
        }
        assert!(
            stderr.contains("v2 -> 10.233.1.2") && stderr.contains("cannot reach"),
            "{stderr}"
        );
        assert!(
            stderr.contains("left out by --max-paths-per-portal"),
            "{stderr}"
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let paths = report["iscsi_bypass"]["paths"].as_array().expect("paths");
        assert_eq!(paths.len(), 2, "{report}");
    }
}

fn scenario_down(env: &Env) {
    let urls = vec![env.url("10.233.1.2"), env.url("10.233.1.2")];
    let bound = if env.dpdk {
        vec![PortBinding::iface("v0"), PortBinding::iface("v1")]
    } else {
        vec![
            PortBinding::iface_source("v0", "10.233.1.11".parse().unwrap()),
            PortBinding::iface_source("v1", "10.233.1.12".parse().unwrap()),
        ]
    };
    let dev = open(env, &urls, bound);
    let mut q = dev.queue_pair();
    const CHUNK_BLOCKS: u32 = 8;
    let chunk = CHUNK_BLOCKS as usize * dev.block_size() as usize;
    let chunks = 1024u64;
    let fill = |buf: &mut Vec<u8>, c: u64, g: u32| {
        buf.resize(chunk, 0);
        for (i, w) in buf.chunks_mut(8).enumerate() {
            let v = (c << 32 | u64::from(g)) ^ (i as u64) << 48;
            w.copy_from_slice(&v.to_le_bytes());
        }
    };
    let mut acked = vec![0u32; chunks as usize];
    let mut pending = vec![0u32; chunks as usize];
    let mut free: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; chunk]).collect();
    let mut out = Vec::new();
    let (mut next, mut writes, mut errors) = (0u64, 0u64, 0u64);
    let (mut down, mut restored) = (false, false);
    let start = Instant::now();
    loop {
        let t = start.elapsed();
        if !down && t >= Duration::from_secs(1) {
            let st = Command::new("ip")
                .args(["link", "set", "v0", "down"])
                .status()
                .unwrap();
            assert!(st.success());
            down = true;
        }
        let running = t < Duration::from_secs(5);
        if !running && down && !restored {
            // Writes caught on the dead path wait until that path is fenced
            // (its session reinstated, docs/multipath.md); bring the link
            // back so they can finish instead of failing after fence_timeout.
            let st = Command::new("ip")
                .args(["link", "set", "v0", "up"])
                .status()
                .unwrap();
            assert!(st.success());
            restored = true;
        }
        while running && !free.is_empty() {
            let mut buf = free.pop().unwrap();
            let c = next % chunks;
            if pending[c as usize] != acked[c as usize] {
                // That chunk's last write is still in flight.
                free.push(buf);
                break;
            }
            next += 1;
            let g = acked[c as usize] + 1;
            fill(&mut buf, c, g);
            pending[c as usize] = g;
            if let Err(e) = q.submit(Io::write(c * u64::from(CHUNK_BLOCKS), CHUNK_BLOCKS, buf, c)) {
                free.push(e.into_io().buffer);
                pending[c as usize] = acked[c as usize];
                next -= 1;
                break;
            }
        }
        if !running && q.in_flight() == 0 {
            break;
        }
        out.clear();
        q.wait_completions(&mut out, 1, Duration::from_millis(20));
        for c in out.drain(..) {
            writes += 1;
            let tag = c.user_tag as usize;
            match &c.result {
                Ok(()) => acked[tag] = pending[tag],
                Err(e) => {
                    errors += 1;
                    pending[tag] = acked[tag];
                    eprintln!("write error: {e}");
                }
            }
            free.push(c.buffer);
        }
    }
    let mut mismatches = 0;
    let (mut expect, mut got) = (Vec::new(), vec![0u8; chunk]);
    for c in 0..chunks {
        let g = acked[c as usize];
        if g == 0 {
            continue;
        }
        fill(&mut expect, c, g);
        q.read_at(c * u64::from(CHUNK_BLOCKS), &mut got)
            .expect("read back");
        if got != expect {
            mismatches += 1;
        }
    }
    let paths = dev.paths();
    for p in &paths {
        println!(
            "PB down: path {} {:?} cmds {} resubmitted {} events {:?}",
            p.name,
            p.state,
            p.commands,
            p.resubmitted,
            p.events.iter().map(|e| e.state).collect::<Vec<_>>()
        );
    }
    println!("PB down: {writes} writes, {errors} errors, {mismatches} mismatches");
    assert_eq!(errors, 0);
    assert_eq!(mismatches, 0);
    assert!(
        paths[0].events.iter().any(|e| e.state == PathState::Down),
        "the path bound to v0 never went down"
    );
    assert!(
        paths[1].events.iter().all(|e| e.state != PathState::Down),
        "the path bound to v1 went down too: {:?}",
        paths[1].events
    );
    assert_eq!(paths[1].state, PathState::Up);
    drop(q);
    dev.close();
}

/// `bench --transport dpdk` with `--iface` per URL, in reverse of the port
/// order: path 0 on the port driving v1, path 1 on the one driving v0.
#[cfg(feature = "dpdk")]
fn scenario_cli_dpdk(env: &Env) {
    let urls = [env.url("10.233.1.2"), env.url("10.233.1.2")];
    let eal = dpdk_common::eal_args_multi(&VDEVS).join(" ");
    let out = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .arg("bench")
        .args(&urls)
        .args([
            "--transport",
            "dpdk",
            "--eal",
            &eal,
            "--engine",
            "multipath",
        ])
        .args([
            "--dpdk-port",
            "net_af_packet0",
            "--local-ip",
            "10.233.1.11/24",
        ])
        .args([
            "--dpdk-port",
            "net_af_packet1",
            "--local-ip",
            "10.233.1.12/24",
        ])
        .args(["--iface", "v1", "--iface", "v0"])
        .args(["--bs", "32k", "--iodepth", "16", "--runtime", "1s"])
        .args(["--ramp", "0", "--json"])
        .output()
        .expect("run bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let paths = report["iscsi_bypass"]["paths"].as_array().expect("paths");
    let names: Vec<&str> = paths.iter().filter_map(|p| p["name"].as_str()).collect();
    println!("PB cli dpdk paths: {names:?}");
    assert!(
        names[0].starts_with("net_af_packet1/q0 10.233.1.12->")
            && names[1].starts_with("net_af_packet0/q0 10.233.1.11->"),
        "{names:?}"
    );
    // --discover over DPDK with both interfaces: tgtd reports the portal
    // asked, so one path per interface, each on its port.
    let out = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .arg("bench")
        .args(["--discover", &format!("iscsi://10.233.1.2:{}", env.port)])
        .args(["--target-iqn", &env.iqn, "--lun", "1"])
        .args(["--transport", "dpdk", "--eal", &eal])
        .args([
            "--dpdk-port",
            "net_af_packet0",
            "--local-ip",
            "10.233.1.11/24",
        ])
        .args([
            "--dpdk-port",
            "net_af_packet1",
            "--local-ip",
            "10.233.1.12/24",
        ])
        .args(["--iface", "v0", "--iface", "v1"])
        .args(["--bs", "32k", "--iodepth", "16", "--runtime", "1s"])
        .args(["--ramp", "0", "--json"])
        .output()
        .expect("run bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench --discover over DPDK: {stderr}");
    let discovered: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let found: Vec<&str> = discovered["iscsi_bypass"]["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    println!("PB cli dpdk discovered paths: {found:?}");
    assert!(
        found.len() == 2
            && found[0].starts_with("net_af_packet0/q0 ")
            && found[1].starts_with("net_af_packet1/q0 "),
        "{found:?}"
    );
    // The names prove the binding (the byte split is the library
    // scenario's); here each path must carry I/O at all.
    for p in paths {
        let ios = p["stats"]["total_ios"].as_u64().unwrap_or(0);
        println!("PB cli dpdk path {}: {ios} I/Os", p["name"]);
        assert!(ios > 0, "path {} carried no I/O", p["name"]);
    }
}

#[cfg(not(feature = "dpdk"))]
fn scenario_cli_dpdk(_: &Env) {
    unreachable!("dpdk scenarios are skipped without the dpdk feature")
}

/// `export-nbd` with one `--iface`/`--bind` per URL: nbdcopy reads the
/// whole LU through it, and both interfaces carry the bytes.
fn nbd_export_is_bound(urls: &[String]) {
    let sock = format!("/tmp/pb-nbd-{}.sock", std::process::id());
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(env!("CARGO_BIN_EXE_iscsi-bypass"))
        .arg("export-nbd")
        .args(urls)
        .args(["--iface", "v0", "--bind", "10.233.1.11"])
        .args(["--iface", "v1", "--bind", "10.233.1.12"])
        .args(["--socket", &sock])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start export-nbd");
    struct Kill(std::process::Child, String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_file(&self.1);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::path::Path::new(&sock).exists() {
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("export-nbd exited ({st}): {err}");
        }
        assert!(Instant::now() < deadline, "export-nbd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = Kill(child, sock.clone());
    let before = [counters("v0"), counters("v1")];
    let st = Command::new("nbdcopy")
        .arg(format!("nbd+unix:///?socket={sock}"))
        .arg("null:")
        .status()
        .expect("run nbdcopy (scripts/setup.sh installs libnbd-bin)");
    assert!(st.success(), "nbdcopy failed");
    let after = [counters("v0"), counters("v1")];
    drop(child);
    let bytes = [after[0] - before[0], after[1] - before[1]];
    let total = (bytes[0] + bytes[1]) as f64;
    println!(
        "PB split export-nbd bound, nbdcopy of the LU: v0 {:.1} MB ({:.1}%), v1 {:.1} MB ({:.1}%)",
        bytes[0] as f64 / 1e6,
        bytes[0] as f64 / total * 100.0,
        bytes[1] as f64 / 1e6,
        bytes[1] as f64 / total * 100.0
    );
    assert!(total > 60e6, "nbdcopy moved only {total} bytes");
    for (i, b) in bytes.iter().enumerate() {
        assert!(*b as f64 > total * 0.1, "v{i} carried {b} of {total} bytes");
    }
}
