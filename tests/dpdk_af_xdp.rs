//! The NIC-like bed: both ends on DPDK's net_af_xdp (AF_XDP sockets: the
//! kernel driver's rx/tx rings mapped into the process, the closest thing
//! to a NIC queue this machine has) over a veth pair the test creates. The
//! embedded target on the userspace stack runs as a process of its own on
//! one end (`--no-huge`); on the other end
//! 1. `iscsi-bypass bench --verify` (a process of its own, `--no-huge`
//!    too) runs random writes and reads at QD32, every block stamped and
//!    checked: enough buffers in flight that every mbuf of both pools is
//!    used (before the pools were packed, the ones past the end of
//!    net_af_xdp's UMEM were lost one by one until the connection stalled:
//!    "no answer to NOP-Out ping");
//! 2. this process logs in and writes and reads back 1 MiB and 4 KiB
//!    blocks byte for byte.
//!
//! Not root / no af_xdp plugin / no `ip`: SKIPPED, unless CI=true.
#![cfg(feature = "dpdk")]

mod common;
mod dpdk_common;

use dpdk_common::target_process::{self, VethPair};
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:af-xdp";
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
const INITIATOR_IP: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 2);

fn skip(why: &str) {
    assert!(
        !common::required(),
        "CI=true requires dpdk_af_xdp to run, but: {why}"
    );
    println!("SKIPPED dpdk_af_xdp: {why}");
}

#[test]
fn iscsi_over_af_xdp_on_a_veth_pair() {
    if let Some(why) = dpdk_common::skip_reason("net_af_xdp") {
        return skip(&why);
    }
    if let Some(why) = dpdk_common::netns::missing_tools() {
        return skip(&why);
    }
    let started = Instant::now();
    let veth = VethPair::create("x").expect("veth pair");
    let cpus = dpdk_common::allowed_cpus();
    let _target = target_process::start(
        IQN,
        &format!("net_af_xdp0,iface={}", veth.a),
        "net_af_xdp0",
        TARGET_IP,
        *cpus.last().unwrap_or(&0),
        None,
    );
    let vdev = format!("net_af_xdp0,iface={}", veth.b);

    // 1. The CLI initiator, QD32 random writes and reads with verify.
    let url = format!("iscsi://{TARGET_IP}:3260/{IQN}/0");
    let bench_eal = target_process::process_eal(cpus[0], "ibx-b", &vdev);
    let bench = Command::new(target_process::BIN)
        .args(["bench", &url, "--transport", "dpdk", "--eal", &bench_eal])
        .args(["--dpdk-port", "net_af_xdp0", "--local-ip"])
        .arg(format!("{INITIATOR_IP}/24"))
        .args(["--rw", "randrw", "--bs", "4k", "--iodepth", "32"])
        .args([
            "--size",
            "16m",
            "--runtime",
            "3s",
            "--verify",
            "--busy-poll",
        ])
        .output()
        .expect("run iscsi-bypass bench");
    target_process::remove_runtime_dir("ibx-b");
    let text = String::from_utf8_lossy(&bench.stdout);
    println!("bench:\n{text}{}", String::from_utf8_lossy(&bench.stderr));
    assert!(bench.status.success(), "bench over af_xdp at QD32 failed");
    assert!(text.contains("read: IOPS=") && text.contains("write: IOPS="));

    // 2. This process as the initiator.
    let args = dpdk_common::eal_args(&vdev);
    println!("EAL args: {}", args.join(" "));
    let stack = DpdkStack::open(DpdkOptions::new(args, "net_af_xdp0", INITIATOR_IP, 24))
        .expect("DPDK stack on net_af_xdp0");
    let transport = stack
        .connect(0, SocketAddrV4::new(TARGET_IP, 3260))
        .expect("TCP over af_xdp");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:af-xdp-test",
        IQN,
        64 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0xaf, &[(4, 1 << 20), (32, 4096)]);
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    println!("total {:?}", started.elapsed());
}
