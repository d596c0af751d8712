//! The embedded target and the initiator in one process, each on its own
//! userspace stack and DPDK port, the two ports joined back to back by a
//! pair of crossed rte_rings (`Eal::ring_pair`): the whole DPDK data path
//! (mbufs, bursts, the stack, iSCSI on both sides) with no kernel and no
//! second process. Login, READ CAPACITY, 1 MiB and 4 KiB writes read back.
//!
//! Not root / no net_ring plugin: SKIPPED, unless CI=true.
#![cfg(feature = "dpdk")]

mod common;
mod dpdk_common;

use iscsi_bypass::target::{LunConfig, Target, TargetConfig};
use iscsi_bypass::transport::dpdk::{self, DpdkOptions, DpdkStack};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:ring-pair";

#[test]
fn iscsi_over_a_net_ring_pair_in_one_process() {
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        assert!(
            !common::required(),
            "CI=true requires dpdk_ring_pair to run, but: {why}"
        );
        println!("SKIPPED dpdk_ring_pair: {why}");
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = dpdk::eal(&args).expect("EAL");
    let (a, b) = eal.ring_pair("ibxta", "ibxia").expect("ring pair");
    assert_ne!(a, b);
    let names = eal.port_names();
    assert!(
        names.iter().any(|n| n == "net_ring_ibxta") && names.iter().any(|n| n == "net_ring_ibxia"),
        "{names:?}"
    );
    let target_ip = Ipv4Addr::new(10, 216, 0, 1);
    let target_stack = DpdkStack::open(DpdkOptions::new(
        args.clone(),
        "net_ring_ibxta",
        target_ip,
        24,
    ))
    .expect("target's stack");
    let initiator_stack = DpdkStack::open(DpdkOptions::new(
        args,
        "net_ring_ibxia",
        Ipv4Addr::new(10, 216, 0, 2),
        24,
    ))
    .expect("initiator's stack");
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 32 << 20));
    let target = Target::start_on_dpdk(config, &target_stack, 0).expect("target on DPDK");

    // Ring ports have no MAC of their own; the stacks make up distinct ones.
    assert_ne!(target_stack.mac(), initiator_stack.mac());
    let transport = initiator_stack
        .connect(0, SocketAddrV4::new(target_ip, 3260))
        .expect("TCP over the ring pair");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:ring-test",
        IQN,
        32 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0x41, &[(4, 1 << 20), (32, 4096)]);
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    target.stop();
}
