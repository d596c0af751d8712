//! `iscsi-bypass target --transport dpdk` as a process of its own (one EAL
//! per process), killed on drop; and a bare veth pair for two DPDK ends.

use super::netns;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_iscsi-bypass");

/// The target process; killed (and `remove` deleted) on drop.
pub struct TargetProcess {
    child: Child,
    remove: Option<String>,
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(path) = &self.remove {
            let _ = std::fs::remove_file(path);
        }
        remove_runtime_dir("ibx-t");
    }
}

/// Removes the runtime directory EAL leaves in /var/run/dpdk for a helper
/// process started with [`process_eal`] and `prefix`.
pub fn remove_runtime_dir(prefix: &str) {
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}{}", std::process::id()));
}

/// EAL arguments for a helper process: `--no-huge`, its own file prefix.
pub fn process_eal(cpu: usize, prefix: &str, vdev: &str) -> String {
    format!(
        "-l {cpu} --no-pci --no-huge -m 256 --no-telemetry --file-prefix {prefix}{} -d {} \
         --log-level lib.eal:notice --vdev {vdev}",
        std::process::id(),
        iscsi_bypass::phy::dpdk::PMD_DIR
    )
}

/// Starts the target with a 64 MiB RAM LUN on `port` (created by `vdev`)
/// at `ip`, pinned to `cpu`, and waits until it listens (20 s at most).
pub fn start(
    iqn: &str,
    vdev: &str,
    port: &str,
    ip: Ipv4Addr,
    cpu: usize,
    remove: Option<String>,
) -> TargetProcess {
    start_with_args(iqn, vdev, port, ip, cpu, remove, &[])
}

/// [`start`] with more options for `iscsi-bypass target` (e.g. `--mtu 9000`).
pub fn start_with_args(
    iqn: &str,
    vdev: &str,
    port: &str,
    ip: Ipv4Addr,
    cpu: usize,
    remove: Option<String>,
    extra: &[&str],
) -> TargetProcess {
    let eal = process_eal(cpu, "ibx-t", vdev);
    let mut child = Command::new(BIN)
        .args([
            "target",
            "--transport",
            "dpdk",
            "--size",
            "64m",
            "--iqn",
            iqn,
        ])
        .args(["--eal", &eal, "--dpdk-port", port])
        .args(["--local-ip", &format!("{ip}/24")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start iscsi-bypass target");
    let stdout = child.stdout.take().expect("target stdout");
    let mut target = TargetProcess { child, remove };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("target: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("listening on") => return target,
            Ok(_) => {}
            Err(_) => {
                let status = target.child.try_wait().ok().flatten();
                panic!("the DPDK target did not come up within 20 s (exit status {status:?})");
            }
        }
    }
}

/// A veth pair in the root namespace, both ends up, no addresses, IPv6
/// off (so the kernel sends nothing on it); deleted on drop.
pub struct VethPair {
    pub a: String,
    pub b: String,
}

impl VethPair {
    pub fn create(tag: &str) -> Result<VethPair, String> {
        let short = std::process::id() % 100_000;
        let pair = VethPair {
            a: format!("ib{tag}a{short}"),
            b: format!("ib{tag}b{short}"),
        };
        let _ = netns::run("ip", &["link", "del", &pair.a]);
        netns::run(
            "ip",
            &[
                "link", "add", &pair.a, "type", "veth", "peer", "name", &pair.b,
            ],
        )?;
        for end in [&pair.a, &pair.b] {
            netns::sysctl(None, &format!("net.ipv6.conf.{end}.disable_ipv6"), "1")?;
            netns::run("ip", &["link", "set", end, "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        let _ = netns::run("ip", &["link", "del", &self.a]);
    }
}
