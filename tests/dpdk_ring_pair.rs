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

use iscsi_bypass::phy::dpdk::Eal;
use iscsi_bypass::phy::Device;
use iscsi_bypass::target::{LunConfig, Target, TargetConfig};
use iscsi_bypass::transport::dpdk::{self, DpdkOptions, DpdkStack};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;
use std::time::Duration;

/// EAL for this binary, whichever test comes first (they run in parallel).
fn eal(args: &[String]) -> Eal {
    static FIRST: Mutex<()> = Mutex::new(());
    let _one_at_a_time = FIRST.lock().unwrap_or_else(|e| e.into_inner());
    dpdk::eal(args).expect("EAL")
}

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
    let eal = eal(&args);
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

/// Jumbo frames: both ports at MTU 9000 (mbufs of 9 KiB + headroom), so
/// the stacks' MSS is 8960 and each 1 MiB transfer moves in ~117 segments
/// of 8948 payload bytes (timestamps on) instead of ~725 of 1448. The
/// initiator's queue is wrapped to count the frames longer than 4 KiB of
/// payload in each direction; every write is read back byte for byte.
#[test]
fn iscsi_over_a_net_ring_pair_at_mtu_9000() {
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        assert!(
            !common::required(),
            "CI=true requires dpdk_ring_pair to run, but: {why}"
        );
        println!("SKIPPED dpdk_ring_pair (MTU 9000): {why}");
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = eal(&args);
    eal.ring_pair("ibxjt", "ibxji").expect("ring pair");
    let target_ip = Ipv4Addr::new(10, 217, 0, 1);
    let jumbo = |port: &str, ip: Ipv4Addr| {
        let mut options = DpdkOptions::new(args.clone(), port, ip, 24);
        options.port_config.mtu = Some(9000);
        DpdkStack::open(options).expect("stack at MTU 9000")
    };
    let target_stack = jumbo("net_ring_ibxjt", target_ip);
    let initiator_stack = jumbo("net_ring_ibxji", Ipv4Addr::new(10, 217, 0, 2));
    assert_eq!(initiator_stack.port().mtu(), 9000);
    assert_eq!(target_stack.port().mtu(), 9000);
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 32 << 20));
    let target = Target::start_on_dpdk(config, &target_stack, 0).expect("target on DPDK");

    let remote = SocketAddrV4::new(target_ip, 3260);
    let queue = initiator_stack.take_queue(0, remote).expect("queue 0");
    let caps = queue.caps();
    assert_eq!(caps.mtu, 9000);
    assert!(caps.max_tx_frame >= 9014, "{caps:?}");
    let (device, frames) = dpdk_common::FrameSizes::wrap(queue, 54 + 4096);
    let transport = initiator_stack
        .connect_device(device, remote)
        .expect("TCP over the ring pair at MTU 9000");
    assert_eq!(transport.interface().mtu(), 9000);
    let mss = transport.socket().effective_mss();
    assert!((8948..=8960).contains(&mss), "MSS {mss} at MTU 9000");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:ring-jumbo",
        IQN,
        32 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0x9000, &[(4, 1 << 20), (16, 4096), (8, 65536)]);
    let (rx_big, tx_big, rx_max, tx_max) = frames.get();
    println!(
        "frames over 4 KiB of payload: rx {rx_big} (max {rx_max} B), tx {tx_big} (max {tx_max} B)"
    );
    // 4 MiB + 512 KiB each way in segments of ~8948 bytes: > 500 frames.
    assert!(rx_big >= 450 && tx_big >= 450, "rx {rx_big}, tx {tx_big}");
    assert!(rx_max > 8000 && rx_max <= 9014 && tx_max <= 9014);
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    target.stop();
}
