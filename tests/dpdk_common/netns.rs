//! A veth pair whose kernel end lives in a network namespace the test
//! creates, and whose other end (no IP address) a DPDK net_af_packet port
//! drives. Everything is removed on drop, also when the test panics.
//!
//! ```text
//!   root ns: <dpdk>  (no IP, forwarding/IPv6 off) ── veth ── <kern> 10.23x.y.1/24  :netns
//! ```

use std::fs::File;
use std::net::Ipv4Addr;
use std::process::Command;

pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn sysctl(ns: Option<&str>, key: &str, value: &str) -> Result<(), String> {
    let setting = format!("{key}={value}");
    match ns {
        Some(ns) => run("ip", &["netns", "exec", ns, "sysctl", "-qw", &setting]),
        None => run("sysctl", &["-qw", &setting]),
    }
    .map(drop)
}

/// The test bed. Names and the subnet derive from `tag` and the pid, so
/// parallel test binaries do not collide.
pub struct VethNetns {
    pub netns: String,
    /// The root-namespace end, for DPDK (`net_af_packet0,iface=<dpdk_if>`).
    pub dpdk_if: String,
    /// The namespace end, with `kernel_ip`.
    pub kernel_if: String,
    pub kernel_ip: Ipv4Addr,
    /// The address the userspace stack uses (not configured in any kernel).
    pub stack_ip: Ipv4Addr,
}

impl VethNetns {
    /// `second_octet` picks 10.<second_octet>.y.0/24 (230..=239 for tests).
    pub fn create(tag: &str, second_octet: u8) -> Result<VethNetns, String> {
        let pid = std::process::id();
        let short = pid % 100_000;
        let subnet = (pid % 250) as u8 + 1;
        let bed = VethNetns {
            netns: format!("ib{tag}{short}"),
            dpdk_if: format!("ib{tag}d{short}"),
            kernel_if: format!("ib{tag}k{short}"),
            kernel_ip: Ipv4Addr::new(10, second_octet, subnet, 1),
            stack_ip: Ipv4Addr::new(10, second_octet, subnet, 2),
        };
        // From here on Drop cleans up whatever was made.
        run("ip", &["netns", "add", &bed.netns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &bed.dpdk_if,
                "type",
                "veth",
                "peer",
                "name",
                &bed.kernel_if,
                "netns",
                &bed.netns,
            ],
        )?;
        // The root end only carries the stack's frames: no IPv6 chatter and
        // no forwarding of what arrives on it.
        let _ = sysctl(
            None,
            &format!("net.ipv6.conf.{}.disable_ipv6", bed.dpdk_if),
            "1",
        );
        sysctl(
            None,
            &format!("net.ipv4.conf.{}.forwarding", bed.dpdk_if),
            "0",
        )?;
        let _ = sysctl(
            Some(&bed.netns),
            &format!("net.ipv6.conf.{}.disable_ipv6", bed.kernel_if),
            "1",
        );
        // Kernel TCP over veth leaves checksums to "hardware" (the pseudo-
        // header sum only, CHECKSUM_PARTIAL); af_packet hands such frames
        // to DPDK as they are, so the kernel end must compute them.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &bed.netns,
                "ethtool",
                "-K",
                &bed.kernel_if,
                "tx",
                "off",
            ],
        )?;
        run("ip", &["link", "set", &bed.dpdk_if, "up"])?;
        let cidr = format!("{}/24", bed.kernel_ip);
        bed.exec_ip(&["addr", "add", &cidr, "dev", &bed.kernel_if])?;
        bed.exec_ip(&["link", "set", &bed.kernel_if, "up"])?;
        bed.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(bed)
    }

    /// `ip -n <netns> ARGS`.
    pub fn exec_ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.netns.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// `tc` in the root namespace (for the DPDK end) or in the netns.
    pub fn tc(&self, in_netns: bool, args: &[&str]) -> Result<String, String> {
        let mut all = Vec::new();
        if in_netns {
            all.extend_from_slice(&["-n", self.netns.as_str()]);
        }
        all.extend_from_slice(args);
        run("tc", &all)
    }

    /// The namespace end's MAC, `aa:bb:..`.
    pub fn kernel_mac(&self) -> Result<[u8; 6], String> {
        let out = self.exec_ip(&["-o", "link", "show", &self.kernel_if])?;
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .ok_or_else(|| format!("no MAC in {out:?}"))?;
        let mut mac = [0u8; 6];
        for (b, h) in mac.iter_mut().zip(text.split(':')) {
            *b = u8::from_str_radix(h, 16).map_err(|e| format!("MAC {text}: {e}"))?;
        }
        Ok(mac)
    }
}

impl Drop for VethNetns {
    fn drop(&mut self) {
        // Deleting the root end removes its peer; deleting the namespace
        // removes the peer too if the first step failed.
        let _ = run("ip", &["link", "del", &self.dpdk_if]);
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

/// Moves the calling thread into namespace `netns` (sockets it opens after
/// this live there). Meant for a dedicated server thread.
pub fn enter(netns: &str) -> Result<(), String> {
    let path = format!("/run/netns/{netns}");
    let file = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns({path}): {e}"))
}

/// Whether the tools the netns tests need exist; `None` when they do.
pub fn missing_tools() -> Option<String> {
    for (cmd, arg) in [("ip", "-V"), ("sysctl", "-V"), ("ethtool", "--version")] {
        if run(cmd, &[arg]).is_err() {
            return Some(format!("needs `{cmd}`"));
        }
    }
    None
}
