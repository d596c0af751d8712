//! The embedded target driven by libiscsi's tools (Debian `libiscsi-bin`):
//! discovery, INQUIRY, READ CAPACITY(16), iscsi-perf, CHAP (one-way and
//! mutual) through the URL, fault injection, and a subset of
//! `iscsi-test-cu`. A missing tool makes its test print why it skipped, or
//! fail under `CI=true`.
//! Every child process and socket read has a timeout, so nothing hangs.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use iscsi_bypass::target::{AluaState, LunConfig, Target, TargetConfig, TargetHandle};

const IQN: &str = "iqn.2024-01.org.iscsi-bypass:libiscsi-test";
const INITIATOR: &str = "iqn.2024-01.org.iscsi-bypass:libiscsi-initiator";

/// The tool's path, or `None` after printing why the test skips.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = format!("{name} is not installed (Debian package libiscsi-bin)");
        assert!(
            !matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1")),
            "CI=true requires this test to run, but: {why}"
        );
        eprintln!("skipped: {why}");
    }
    found
}

/// Waits for `child` up to `timeout`, killing it after that. The bool is
/// true when it had to be killed.
fn wait_with_timeout(mut child: Child, timeout: Duration) -> (Output, bool) {
    let deadline = Instant::now() + timeout;
    let mut killed = false;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                killed = true;
                break;
            }
        }
    }
    (child.wait_with_output().expect("collect output"), killed)
}

fn spawn(path: &PathBuf, args: &[String]) -> Child {
    Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn libiscsi tool")
}

struct Ran {
    ok: bool,
    killed: bool,
    stdout: String,
    stderr: String,
}

fn run(path: &PathBuf, args: &[String], timeout: Duration) -> Ran {
    let (out, killed) = wait_with_timeout(spawn(path, args), timeout);
    let ran = Ran {
        ok: out.status.success(),
        killed,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!(
        "$ {} {}\n{}{}",
        path.display(),
        args.join(" "),
        ran.stdout,
        ran.stderr
    );
    ran
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn lun_url(portal: SocketAddr, auth: &str, lun: u16) -> String {
    format!(
        "iscsi://{auth}{}:{}/{IQN}/{lun}",
        portal.ip(),
        portal.port()
    )
}

fn two_portal_target() -> TargetHandle {
    let cfg = TargetConfig::ram(IQN, 64 << 20)
        .lun(LunConfig::null(1, 1 << 30).block_size(4096))
        .loopback_portals(2)
        .unit_attentions(true);
    Target::start(cfg).expect("start target")
}

const T: Duration = Duration::from_secs(20);

#[test]
fn iscsi_ls_discovers_every_portal_and_lun() {
    let Some(ls) = tool("iscsi-ls") else { return };
    let target = two_portal_target();
    let p = target.portals();
    let url = format!("iscsi://{}:{}", p[0].ip(), p[0].port());
    let r = run(&ls, &args(&["-i", INITIATOR, "-s", &url]), T);
    assert!(r.ok, "iscsi-ls failed: {}", r.stderr);
    for (i, portal) in p.iter().enumerate() {
        let line = format!("Target:{IQN} Portal:{portal},{}", i + 1);
        assert!(r.stdout.contains(&line), "missing {line:?}");
    }
    assert!(r.stdout.contains("Lun:0"));
    assert!(r.stdout.contains("Lun:1"));
}

#[test]
fn iscsi_inq_reads_standard_inquiry() {
    let Some(inq) = tool("iscsi-inq") else { return };
    let target = two_portal_target();
    let p = target.portals();
    let r = run(&inq, &args(&["-i", INITIATOR, &lun_url(p[1], "", 0)]), T);
    assert!(r.ok, "iscsi-inq failed: {}", r.stderr);
    for want in [
        "Vendor:IBYPASS",
        "Product:RAM LUN",
        "TPGS:1",
        "CmdQue:1",
        "SPC-4",
        "SBC-3",
    ] {
        assert!(r.stdout.contains(want), "missing {want:?}");
    }
    let r = run(&inq, &args(&["-i", INITIATOR, &lun_url(p[0], "", 1)]), T);
    assert!(r.ok && r.stdout.contains("Product:NULL LUN"));
    // VPD page list.
    let r = run(
        &inq,
        &args(&["-i", INITIATOR, "-e", "1", &lun_url(p[0], "", 0)]),
        T,
    );
    assert!(r.ok);
    for page in ["0x80", "0x83", "0xb0", "0xb2"] {
        assert!(
            r.stdout.contains(&format!("Page:{page}")),
            "missing VPD {page}"
        );
    }
}

#[test]
fn iscsi_readcapacity16_reports_size_and_block_size() {
    let Some(rc16) = tool("iscsi-readcapacity16") else {
        return;
    };
    let target = two_portal_target();
    let p = target.portals();
    let r = run(&rc16, &args(&["-i", INITIATOR, &lun_url(p[0], "", 0)]), T);
    assert!(r.ok, "iscsi-readcapacity16 failed: {}", r.stderr);
    assert!(r.stdout.contains("RETURNED LOGICAL BLOCK ADDRESS:131071"));
    assert!(r.stdout.contains("LOGICAL BLOCK LENGTH IN BYTES:512"));
    assert!(r.stdout.contains("LBPME:1"));
    assert!(r.stdout.contains("Total size:67108864"));
    let r = run(&rc16, &args(&["-i", INITIATOR, &lun_url(p[1], "", 1)]), T);
    assert!(r.ok);
    assert!(r.stdout.contains("RETURNED LOGICAL BLOCK ADDRESS:262143"));
    assert!(r.stdout.contains("LOGICAL BLOCK LENGTH IN BYTES:4096"));
}

/// iscsi-perf runs until interrupted: let it go ~2 s, then SIGINT.
fn perf_for_two_seconds(perf: &PathBuf, extra: &[&str], url: &str) -> String {
    let mut a = args(&["-i", INITIATOR, "-m", "16"]);
    a.extend(args(extra));
    a.push(url.to_string());
    let child = spawn(perf, &a);
    thread::sleep(Duration::from_millis(2200));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let (out, killed) = wait_with_timeout(child, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "$ iscsi-perf {}\n{stdout}{}",
        a.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!killed, "iscsi-perf did not stop on SIGINT");
    stdout
}

#[test]
fn iscsi_perf_runs_against_ram_and_null_luns() {
    let Some(perf) = tool("iscsi-perf") else {
        return;
    };
    let target = two_portal_target();
    let p = target.portals();
    let out = perf_for_two_seconds(&perf, &[], &lun_url(p[0], "", 0));
    assert!(out.contains("capacity is 131072 blocks"), "{out}");
    assert!(out.contains("iops average"), "no throughput line: {out}");
    assert!(!out.contains("in_flight 0,"), "requests stalled");
    let out = perf_for_two_seconds(&perf, &["-r", "-b", "2"], &lun_url(p[1], "", 1));
    assert!(out.contains("iops average"), "{out}");
}

#[test]
fn chap_through_the_url() {
    let (Some(inq), Some(ls)) = (tool("iscsi-inq"), tool("iscsi-ls")) else {
        return;
    };
    let cfg = TargetConfig::ram(IQN, 16 << 20)
        .loopback_portals(2)
        .chap("alice", "alice-secret-12")
        .mutual_chap("target-bob", "bob-secret-3456");
    let target = Target::start(cfg).expect("start target");
    let p = target.portals();
    let good = run(
        &inq,
        &args(&["-i", INITIATOR, &lun_url(p[0], "alice%alice-secret-12@", 0)]),
        T,
    );
    assert!(good.ok, "one-way CHAP failed: {}", good.stderr);
    let bad = run(
        &inq,
        &args(&["-i", INITIATOR, &lun_url(p[0], "alice%wrong-secret@", 0)]),
        T,
    );
    assert!(!bad.ok && !bad.killed);
    assert!(
        bad.stderr.contains("Authentication failure"),
        "{}",
        bad.stderr
    );
    let none = run(&inq, &args(&["-i", INITIATOR, &lun_url(p[0], "", 0)]), T);
    assert!(!none.ok && !none.killed);
    // Mutual CHAP: libiscsi checks our answer to its challenge.
    let mutual = format!(
        "{}?target_user=target-bob&target_password=bob-secret-3456",
        lun_url(p[1], "alice%alice-secret-12@", 0)
    );
    let r = run(&inq, &args(&["-i", INITIATOR, &mutual]), T);
    assert!(r.ok, "mutual CHAP failed: {}", r.stderr);
    let wrong = mutual.replace("bob-secret-3456", "not-bobs-secret");
    let r = run(&inq, &args(&["-i", INITIATOR, &wrong]), T);
    assert!(!r.ok && r.stderr.contains("CHAP_R"), "{}", r.stderr);
    // Discovery does not need CHAP unless configured; listing LUNs does.
    let url = format!(
        "iscsi://alice%alice-secret-12@{}:{}",
        p[0].ip(),
        p[0].port()
    );
    let r = run(&ls, &args(&["-i", INITIATOR, "-s", &url]), T);
    assert!(r.ok && r.stdout.contains("Lun:0"), "{}", r.stderr);
}

#[test]
fn faults_are_seen_by_libiscsi() {
    let Some(inq) = tool("iscsi-inq") else { return };
    let target = two_portal_target();
    let p = target.portals();
    let faults = target.faults();
    faults.portal(0).refuse_logins(0x03, 0x01);
    let r = run(&inq, &args(&["-i", INITIATOR, &lun_url(p[0], "", 0)]), T);
    assert!(!r.ok && !r.killed, "login should be refused");
    let r = run(&inq, &args(&["-i", INITIATOR, &lun_url(p[1], "", 0)]), T);
    assert!(r.ok, "the other portal still works");
    faults.clear();
    faults.portal(0).clear();
    // A stalled portal accepts but never answers: the tool hangs until killed.
    faults.portal(1).stall();
    let r = run(
        &inq,
        &args(&["-i", INITIATOR, &lun_url(p[1], "", 0)]),
        Duration::from_secs(2),
    );
    assert!(r.killed, "stalled portal answered");
    faults.portal(1).unstall();
    let r = run(&inq, &args(&["-i", INITIATOR, &lun_url(p[1], "", 0)]), T);
    assert!(r.ok);
    // ALUA standby refuses media access but not INQUIRY.
    target.set_alua_state(2, AluaState::Standby).unwrap();
    let r = run(&inq, &args(&["-i", INITIATOR, &lun_url(p[1], "", 0)]), T);
    assert!(r.ok);
}

/// A subset of libiscsi's conformance suite that the target passes.
#[test]
fn iscsi_test_cu_subset() {
    let Some(cu) = tool("iscsi-test-cu") else {
        return;
    };
    let target = two_portal_target();
    let p = target.portals();
    let families = [
        "ALL.Inquiry",
        "ALL.Mandatory",
        "ALL.ModeSense6",
        "ALL.TestUnitReady",
        "ALL.ReadCapacity10",
        "ALL.ReadCapacity16",
        "ALL.Read6",
        "ALL.Read10",
        "ALL.Read12",
        "ALL.Read16",
        "ALL.Write10",
        "ALL.Write12",
        "ALL.Write16",
        "ALL.Verify10",
        "ALL.Verify16",
        "ALL.Unmap",
        "ALL.StartStopUnit",
        "ALL.PreventAllow",
        "ALL.iSCSIcmdsn",
        "ALL.iSCSIResiduals",
        "ALL.iSCSITMF",
        "ALL.MultipathIO.Simple",
        "ALL.MultipathIO.Reset",
    ];
    let mut failed = Vec::new();
    for family in families {
        let mut a = args(&["-d", "-s", "-t", family, &lun_url(p[0], "", 0)]);
        if family.contains("Multipath") {
            a.push(lun_url(p[1], "", 0));
        }
        let (out, killed) = wait_with_timeout(spawn(&cu, &a), Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("tests ") || l.contains("FAIL"))
            .collect();
        eprintln!("{family}: exit {:?} {summary:?}", out.status.code());
        if killed || !out.status.success() {
            failed.push(family);
        }
    }
    assert!(
        failed.is_empty(),
        "iscsi-test-cu families failed: {failed:?}"
    );
}

/// libiscsi's own tests of the issue #16 commands against the embedded
/// target: GET LBA STATUS, REPORT SUPPORTED OPERATION CODES.
#[test]
fn iscsi_test_cu_lba_status_and_supported_opcodes() {
    let Some(cu) = tool("iscsi-test-cu") else {
        return;
    };
    let target = two_portal_target();
    let p = target.portals();
    let mut failed = Vec::new();
    for family in ["ALL.GetLBAStatus", "ALL.ReportSupportedOpcodes"] {
        let a = args(&["-d", "-s", "-t", family, &lun_url(p[0], "", 0)]);
        let (out, killed) = wait_with_timeout(spawn(&cu, &a), Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{family}: exit {:?}\n{stdout}", out.status.code());
        // CUnit's summary: "tests  Total Ran Passed Failed Inactive".
        let passed = stdout
            .lines()
            .map(str::split_whitespace)
            .find_map(|mut w| (w.next() == Some("tests")).then(|| w.nth(2)))
            .flatten()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        // A sub-check libiscsi skips (it reads some refusals as "command
        // not implemented") is a failure too: every one must run.
        if killed || !out.status.success() || passed < 3 || stdout.contains("[SKIPPED]") {
            failed.push(family);
        }
    }
    assert!(
        failed.is_empty(),
        "iscsi-test-cu families failed: {failed:?}"
    );
}

/// Without any libiscsi tool: stopping closes idle connections and joins
/// threads promptly, and "drop now" closes a connection at once.
#[test]
fn drop_now_and_stop_do_not_hang() {
    let target = two_portal_target();
    let p = target.portals();
    let mut a = TcpStream::connect(p[0]).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = TcpStream::connect(p[1]).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    thread::sleep(Duration::from_millis(100));
    target.faults().portal(0).drop_connections_now();
    let mut buf = [0u8; 64];
    assert!(
        matches!(a.read(&mut buf), Ok(0)),
        "portal 0 connection closed"
    );
    let started = Instant::now();
    target.stop();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stop took too long"
    );
    match b.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("portal 1 connection still open after stop: {other:?}"),
    }
    assert!(TcpStream::connect_timeout(&p[0], Duration::from_secs(1)).is_err());
}

/// libiscsi's persistent reservation suites (two initiator names, so two
/// I_T nexuses) against the embedded target's reservations.
#[test]
fn iscsi_test_cu_persistent_reservations() {
    let Some(cu) = tool("iscsi-test-cu") else {
        return;
    };
    let target = two_portal_target();
    let p = target.portals();
    let families = [
        "ALL.PrinReadKeys",
        "ALL.PrinServiceactionRange",
        "ALL.PrinReportCapabilities",
        "ALL.ProutRegister",
        "ALL.ProutReserve",
        "ALL.ProutClear",
        "ALL.ProutPreempt",
    ];
    let mut failed = Vec::new();
    for family in families {
        let a = args(&["-d", "-s", "-t", family, &lun_url(p[0], "", 0)]);
        let (out, killed) = wait_with_timeout(spawn(&cu, &a), Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("tests ") || l.contains("FAIL") || l.contains("asserts"))
            .collect();
        eprintln!("{family}: exit {:?} {summary:?}", out.status.code());
        if killed || !out.status.success() || !stdout.contains("Run Summary") {
            eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
            failed.push(family);
        }
    }
    assert!(
        failed.is_empty(),
        "iscsi-test-cu reservation suites failed: {failed:?}"
    );
}
