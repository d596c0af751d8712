//! The NIC-like bed: both ends on DPDK's net_af_xdp (AF_XDP sockets: the
//! kernel driver's rx/tx rings mapped into the process, the closest thing
//! to a NIC queue this machine has) over a veth pair the test creates. The
//! embedded target on the userspace stack runs as a process of its own on
//! one end; this process logs in on the other end and writes and reads
//! back 1 MiB and 4 KiB blocks byte for byte.
//!
//! Not root / no af_xdp plugin / no `ip`: SKIPPED, unless CI=true.
#![cfg(feature = "dpdk")]

mod common;
mod dpdk_common;

use dpdk_common::target_process::{self, VethPair};
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use std::net::{Ipv4Addr, SocketAddrV4};
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
