//! Test fixtures: a real tgtd target on loopback, started and stopped by the
//! test itself (also on failure: `Drop` kills it and removes its files).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// True when the test must not be skipped (CI runs as root with tgtd set up).
pub fn required() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Returns Some(reason) when tgtd-based tests cannot run here. In CI that is
/// a failure, not a skip.
pub fn tgtd_unavailable() -> Option<String> {
    let reason = if !is_root() {
        Some("not running as root".to_string())
    } else if which("tgtd").is_none() || which("tgtadm").is_none() {
        Some("tgtd/tgtadm not installed (run scripts/setup.sh)".to_string())
    } else {
        None
    };
    if let Some(r) = &reason {
        assert!(!required(), "CI requires tgtd tests to run, but: {r}");
        eprintln!("SKIPPED: {r}");
    }
    reason
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static NEXT_CONTROL: AtomicU16 = AtomicU16::new(0);

/// A tgtd instance with one target and file-backed LUNs.
pub struct Tgtd {
    child: Child,
    control_port: u16,
    pub port: u16,
    pub iqn: String,
    pub dir: PathBuf,
    pub lun_files: Vec<PathBuf>,
}

pub struct TgtdOptions {
    pub lun_sizes: Vec<u64>,
    pub block_size: u32,
    pub chap: Option<(String, String)>,
    pub mutual: Option<(String, String)>,
    /// Extra target parameters (`tgtadm --op update --name K --value V`).
    pub params: Vec<(String, String)>,
    /// Addresses to listen on; default 127.0.0.1.
    pub portals: Vec<String>,
    /// Run tgtd inside this network namespace.
    pub netns: Option<String>,
}

impl Default for TgtdOptions {
    fn default() -> Self {
        TgtdOptions {
            lun_sizes: vec![64 << 20],
            block_size: 512,
            chap: None,
            mutual: None,
            params: Vec::new(),
            portals: vec!["127.0.0.1".into()],
            netns: None,
        }
    }
}

impl TgtdOptions {
    /// One target with one LUN of `lun_size` bytes listening on two portals
    /// (`a` and `b`, one port, tgtd's portal group 1 on both): the
    /// multipath tests' target.
    pub fn two_portals(a: &str, b: &str, lun_size: u64) -> TgtdOptions {
        TgtdOptions {
            lun_sizes: vec![lun_size],
            portals: vec![a.into(), b.into()],
            ..Default::default()
        }
    }
}

impl Tgtd {
    pub fn start(opts: TgtdOptions) -> Tgtd {
        let port = free_port();
        // Control ports name tgtd's management socket; keep them unique per
        // process and per test.
        let control_port = 1000
            + (std::process::id() as u16 % 20000)
            + NEXT_CONTROL.fetch_add(1, Ordering::SeqCst) * 7;
        let dir = std::env::temp_dir().join(format!(
            "iscsi-bypass-tgtd-{}-{}",
            std::process::id(),
            control_port
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tgtd"]);
                c
            }
            None => Command::new("tgtd"),
        };
        cmd.arg("-f").arg("-C").arg(control_port.to_string());
        // tgtd keeps only the last --iscsi portal= option; the others are
        // added with tgtadm once it runs.
        if let Some(p) = opts.portals.first() {
            cmd.arg("--iscsi").arg(format!("portal={p}:{port}"));
        }
        let log = std::fs::File::create(dir.join("tgtd.log")).unwrap();
        let child = cmd
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tgtd");
        let iqn = format!("iqn.2026-11.org.iscsi-bypass.test:t{control_port}");
        let mut t = Tgtd {
            child,
            control_port,
            port,
            iqn,
            dir,
            lun_files: Vec::new(),
        };
        t.wait_ready();
        for p in opts.portals.iter().skip(1) {
            t.adm(&[
                "--mode",
                "portal",
                "--op",
                "new",
                "--param",
                &format!("portal={p}:{port}"),
            ]);
        }
        t.adm(&[
            "--mode",
            "target",
            "--op",
            "new",
            "--tid",
            "1",
            "-T",
            &t.iqn.clone(),
        ]);
        for (i, size) in opts.lun_sizes.iter().enumerate() {
            let f = t.dir.join(format!("lun{}.img", i + 1));
            let file = std::fs::File::create(&f).unwrap();
            file.set_len(*size).unwrap();
            t.adm(&[
                "--mode",
                "logicalunit",
                "--op",
                "new",
                "--tid",
                "1",
                "--lun",
                &(i + 1).to_string(),
                "-b",
                f.to_str().unwrap(),
                "--blocksize",
                &opts.block_size.to_string(),
            ]);
            t.lun_files.push(f);
        }
        if let Some((u, p)) = &opts.chap {
            t.adm(&[
                "--mode",
                "account",
                "--op",
                "new",
                "--user",
                u,
                "--password",
                p,
            ]);
            t.adm(&[
                "--mode", "account", "--op", "bind", "--tid", "1", "--user", u,
            ]);
        }
        if let Some((u, p)) = &opts.mutual {
            t.adm(&[
                "--mode",
                "account",
                "--op",
                "new",
                "--user",
                u,
                "--password",
                p,
            ]);
            t.adm(&[
                "--mode",
                "account",
                "--op",
                "bind",
                "--tid",
                "1",
                "--user",
                u,
                "--outgoing",
            ]);
        }
        for (k, v) in &opts.params {
            t.adm(&[
                "--mode", "target", "--op", "update", "--tid", "1", "--name", k, "--value", v,
            ]);
        }
        t.adm(&[
            "--mode", "target", "--op", "bind", "--tid", "1", "-I", "ALL",
        ]);
        t
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("tgtadm")
                .args([
                    "-C",
                    &self.control_port.to_string(),
                    "--lld",
                    "iscsi",
                    "--mode",
                    "target",
                    "--op",
                    "show",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("tgtd.log")).unwrap_or_default();
                panic!("tgtd exited early ({status}): {log}");
            }
            assert!(Instant::now() < deadline, "tgtd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn adm(&self, args: &[&str]) {
        let out = Command::new("tgtadm")
            .args(["-C", &self.control_port.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .expect("run tgtadm");
        assert!(
            out.status.success(),
            "tgtadm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, lun: u16) -> String {
        format!("iscsi://127.0.0.1:{}/{}/{}", self.port, self.iqn, lun)
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
