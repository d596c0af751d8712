//! fio itself, driving the engine (libfio_iscsi_bypass.so, the cdylib this
//! crate builds): fio's own `verify=crc32c` write-then-verify against tgtd
//! and the embedded target, with one of two paths killed mid-run, and fio's
//! client/server mode on loopback. A verify run against a null LU (reads
//! give zeros) shows the verify does catch wrong data.
//!
//! Under CI=true a missing fio or tgtd fails the test; the engine's build
//! (which needs fio's configured source) fails the build with its reason.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{free_port, required, tgtd_unavailable, which, Tgtd, TgtdOptions};
use iscsi_bypass::target::{Target, TargetConfig};
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:fio-engine";

/// fio, or None (SKIPPED) outside CI.
fn fio() -> Option<PathBuf> {
    let f = which("fio");
    if f.is_none() {
        assert!(
            !required(),
            "CI requires fio (scripts/setup.sh installs it)"
        );
        eprintln!("SKIPPED: fio not installed");
    }
    f
}

/// The engine (the cdylib of this crate), built once per test run with the
/// test binary's profile: `cargo test` builds the rlib the tests link, not
/// the .so fio loads. A build failure (e.g. no configured fio source) fails
/// the test with cargo's output.
fn engine_so() -> PathBuf {
    static SO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    SO.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/<profile>/deps/fio-HASH
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .ok_or("test binary outside target/<profile>/deps")?
            .to_path_buf();
        let mut c = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        // What cargo set for this test binary (CARGO_PKG_NAME, ...): some
        // build scripts (ring's) rerun when those change, and would rebuild
        // the dependency tree between this build and the outer one.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            let set_by_cargo = [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
                || k == "CARGO_PRIMARY_PACKAGE"
                || k == "CARGO_TARGET_TMPDIR"
                || k == "OUT_DIR";
            if set_by_cargo {
                c.env_remove(&k);
            }
        }
        c.args([
            "build",
            "--quiet",
            "-p",
            "fio-iscsi-bypass",
            "--lib",
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            c.arg("--release");
        }
        let o = c.output().map_err(|e| format!("running cargo: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "building the engine failed:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let so = profile_dir.join("libfio_iscsi_bypass.so");
        if !so.is_file() {
            return Err(format!("the build left no {}", so.display()));
        }
        Ok(so)
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// fio splits --filename on ':'; an iSCSI URL's colons are escaped.
fn fio_filename(url: &str) -> String {
    url.replace(':', "\\:")
}

fn common_args(url: &str) -> Vec<String> {
    vec![
        format!("--ioengine=external:{}", engine_so().display()),
        format!("--filename={}", fio_filename(url)),
        "--output-format=json".into(),
        // A failed or killed verify job would leave its state file in the
        // working directory, the source tree.
        "--verify_state_save=0".into(),
    ]
}

fn run(fio: &PathBuf, args: &[String], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(fio);
    c.args(args)
        .env_remove("ISCSI_CHAP_USER")
        .env_remove("ISCSI_CHAP_PASSWORD");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run fio")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// fio's JSON report (whatever precedes the first '{' is fio's chatter).
fn report(o: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&o.stdout);
    let at = s
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio:\n{}", text(o)));
    serde_json::from_str(&s[at..]).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", text(o)))
}

/// The job wrote `bytes` and read them all back through verify, with no
/// error.
fn assert_verified(o: &Output, bytes: u64) -> serde_json::Value {
    assert!(o.status.success(), "fio failed:\n{}", text(o));
    let r = report(o);
    let job = &r["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error:\n{}", text(o));
    assert_eq!(
        job["write"]["io_bytes"],
        bytes,
        "bytes written:\n{}",
        text(o)
    );
    assert_eq!(
        job["read"]["io_bytes"],
        bytes,
        "bytes verified:\n{}",
        text(o)
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !stderr.contains("verify:"),
        "verify complained:\n{}",
        text(o)
    );
    r
}

fn verify_job(size: &str) -> Vec<String> {
    [
        "--name=verify",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        &format!("--size={size}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randrepeat=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn verify_crc32c_against_tgtd() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let Some(fio) = fio() else { return };
    let t = Tgtd::start(TgtdOptions::default());
    let mut args = common_args(&t.url(1));
    args.extend(verify_job("16m"));
    // Mixed sizes as well: 512 B .. 64 KiB writes, all verified.
    args.push("--bsrange=512-64k".into());
    let o = run(&fio, &args, &[]);
    assert_verified(&o, 16 << 20);
}

#[test]
fn verify_crc32c_against_the_embedded_target_two_paths_chap() {
    let Some(fio) = fio() else { return };
    let secret = "fio-engine-secret-16";
    let t = Target::start(
        TargetConfig::ram(IQN, 32 << 20)
            .loopback_portals(2)
            .chap("fio", secret.as_bytes().to_vec()),
    )
    .unwrap();
    let urls: Vec<String> = t
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect();
    let dir = std::env::temp_dir().join(format!("fio-engine-chap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret");
    std::fs::File::create(&secret_file)
        .and_then(|mut f| writeln!(f, "{secret}"))
        .unwrap();

    // The secret from a file.
    let mut args = common_args(&urls[0]);
    args.extend(verify_job("16m"));
    args.push(format!("--iscsi_paths={}", urls[1]));
    args.push("--iscsi_policy=round-robin".into());
    args.push("--iscsi_chap_user=fio".into());
    args.push(format!(
        "--iscsi_chap_secret_file={}",
        secret_file.display()
    ));
    let o = run(&fio, &args, &[]);
    assert_verified(&o, 16 << 20);

    // The secret from the environment.
    let mut args = common_args(&urls[1]);
    args.extend(verify_job("4m"));
    let o = run(
        &fio,
        &args,
        &[("ISCSI_CHAP_USER", "fio"), ("ISCSI_CHAP_PASSWORD", secret)],
    );
    assert_verified(&o, 4 << 20);

    // No credentials: the login fails and fio says why.
    let o = run(&fio, &args, &[]);
    assert!(
        !o.status.success(),
        "a login without CHAP succeeded:\n{}",
        text(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("iscsi-bypass"),
        "no reason given:\n{}",
        text(&o)
    );

    // A secret in the URL is refused before any login.
    let with_secret = urls[0].replace("iscsi://", &format!("iscsi://fio%{secret}@"));
    let mut args = common_args(&with_secret);
    args.extend(verify_job("4m"));
    let o = run(&fio, &args, &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("iscsi_chap_secret_file"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
    t.stop();
}

#[test]
fn verify_stays_clean_when_a_path_dies_mid_run() {
    let Some(fio) = fio() else { return };
    let t = Target::start(TargetConfig::ram(IQN, 32 << 20).loopback_portals(2)).unwrap();
    let urls: Vec<String> = t
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect();
    let mut args = common_args(&urls[0]);
    args.extend(verify_job("16m"));
    // 4096 writes at 2000/s: the write phase lasts ~2 s, the kill lands in it.
    args.push(format!("--iscsi_paths={}", urls[1]));
    args.push("--rate_iops=2000".into());
    args.push("--iscsi_no_path_timeout=20".into());
    let child = Command::new(&fio)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    // Wait until a quarter of the blocks are written, then kill the first
    // path: its connections drop and it cannot log in again for 2 s.
    let written = || {
        let lun = t.lun(0).expect("LUN 0");
        let mut block = vec![0u8; 4096];
        (0..(16u64 << 20) / 4096)
            .filter(|i| {
                lun.read(i * 4096, &mut block);
                block.iter().any(|&b| b != 0)
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut child = Some(child);
    while written() < 1024 {
        if let Some(Ok(Some(_))) = child.as_mut().map(|c| c.try_wait()) {
            let o = child.take().unwrap().wait_with_output().unwrap();
            panic!("fio ended before the kill:\n{}", text(&o));
        }
        assert!(
            Instant::now() < deadline,
            "fio wrote under 1024 blocks in 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let f = t.faults().portal(0);
    f.refuse_logins(0x03, 0x01);
    f.drop_connections_now();
    let at_kill = written();
    assert!(at_kill < 4096, "the write phase was over before the kill");
    // Two seconds on the surviving path alone, then the dead portal takes
    // logins again: a write caught in flight on it is re-sent only once
    // that path's session is fenced (the library's rule: an unfenced write
    // is never re-sent, it fails after fence_timeout), and fencing needs a
    // login there.
    std::thread::sleep(Duration::from_secs(2));
    f.accept_logins();
    let o = child.take().unwrap().wait_with_output().expect("fio");
    let r = assert_verified(&o, 16 << 20);
    assert_eq!(r["jobs"][0]["write"]["total_ios"], 4096, "{}", text(&o));
    t.stop();
}

#[test]
fn verify_catches_wrong_data() {
    let Some(fio) = fio() else { return };
    // A null LU drops writes and reads zeros: the verify must fail.
    let t = Target::start(TargetConfig::null(IQN, 8 << 20).loopback_portals(1)).unwrap();
    let url = format!("iscsi://{}/{IQN}/0", t.portals()[0]);
    let mut args = common_args(&url);
    args.extend(verify_job("1m"));
    let o = run(&fio, &args, &[]);
    assert!(
        !o.status.success(),
        "verify passed on a null LU:\n{}",
        text(&o)
    );
    let all = text(&o);
    assert!(all.contains("verify"), "no verify failure reported:\n{all}");
    t.stop();
}

/// Kills the fio server on drop.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn client_server_on_loopback() {
    let Some(fio) = fio() else { return };
    let t = Target::start(TargetConfig::ram(IQN, 16 << 20).loopback_portals(2)).unwrap();
    let urls: Vec<String> = t
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect();
    let port = free_port();
    let server = Server(
        Command::new(&fio)
            .arg(format!("--server=ip:127.0.0.1,{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fio --server"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "fio --server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The job file the client sends (the engine path is the server's).
    let dir = std::env::temp_dir().join(format!("fio-engine-cs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let job = dir.join("job.fio");
    std::fs::write(
        &job,
        format!(
            "[verify]\nioengine=external:{}\nfilename={}\niscsi_paths={}\nrw=randwrite\nbs=4k\n\
             iodepth=8\nsize=4m\nverify=crc32c\ndo_verify=1\nverify_fatal=1\n",
            engine_so().display(),
            fio_filename(&urls[0]),
            urls[1]
        ),
    )
    .unwrap();
    // fio's client saves the verify state (local-*-verify.state) in its
    // working directory: keep it out of the source tree.
    let o = Command::new(&fio)
        .current_dir(&dir)
        .arg("--output-format=json")
        .arg(format!("--client=ip:127.0.0.1,{port}"))
        .arg(&job)
        .output()
        .expect("run fio --client");
    drop(server);
    assert!(o.status.success(), "fio --client failed:\n{}", text(&o));
    let r = report(&o);
    let job = r["client_stats"]
        .as_array()
        .and_then(|a| a.iter().find(|j| j["jobname"] == "verify"))
        .unwrap_or_else(|| panic!("no client_stats for the job:\n{}", text(&o)));
    assert_eq!(job["error"], 0, "{}", text(&o));
    assert_eq!(job["write"]["io_bytes"], 4u64 << 20, "{}", text(&o));
    assert_eq!(job["read"]["io_bytes"], 4u64 << 20, "{}", text(&o));
    assert_eq!(job["hostname"].as_str().map(|h| !h.is_empty()), Some(true));
    std::fs::remove_dir_all(&dir).unwrap();
    t.stop();
}
