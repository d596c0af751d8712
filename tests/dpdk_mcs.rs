//! MC/S over DPDK (docs/mcs.md): two DPDK paths that are two connections of
//! one session, against the embedded target on the userspace stack.
//!
//! The bed, all in one process (as tests/dpdk_fence.rs builds it): the
//! target on the userspace stack with two portals (ports 3260 and 3261 of
//! 10.221.0.1) in one portal group, and two DPDK paths, each on a port of
//! its own, joined to the target by a pair of crossed rte_rings each; the
//! target's stack serves both of its ring ports through a small learning
//! switch whose ports can be cut (frames to and from a cut port are
//! dropped, as on a pulled cable).
//!
//! With `mcs` the two paths are CIDs 0 and 1 of one TSIH; writes stripe
//! over both and read back. Then path 1's link is cut with writes in
//! flight on it: the application sees no error, path 0 stays up, path 1's
//! writes are done on path 0 (after the Logout that closes connection 1 at
//! the target), the link comes back, path 1 rejoins the session with its
//! CID, and every chunk reads back its newest acknowledged generation.
//!
//! Not root / no net_ring plugin: SKIPPED, unless CI=true.
#![cfg(feature = "dpdk")]

#[path = "common/chunks.rs"]
mod chunks;
mod common;
mod dpdk_common;

use chunks::{verify, write_load};
use dpdk_common::switch::Switch;
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::multipath::{DeviceConfig, PathConfig};
use iscsi_bypass::target::{LunConfig, Target, TargetConfig, UserListenConfig};
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use iscsi_bypass::{Device as MpDevice, IdleMode, PathState, Policy};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-12.org.iscsi-bypass:dpdk-mcs";
const INITIATOR: &str = "iqn.2026-12.org.iscsi-bypass:dpdk-mcs-host";
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 221, 0, 1);
/// Blocks per chunk of the write load.
const BLOCKS: u32 = 8;

/// (TSIH, CID) of every path.
fn nexus(dev: &MpDevice) -> Vec<(u16, u16)> {
    dev.paths()
        .iter()
        .map(|p| {
            let n = p
                .nexus
                .unwrap_or_else(|| panic!("path {} not logged in: {:?}", p.name, p.events));
            (n.tsih, n.cid)
        })
        .collect()
}

fn wait_up(dev: &MpDevice, within: Duration) {
    let t = Instant::now();
    while dev.paths().iter().any(|p| p.state != PathState::Up) {
        assert!(
            t.elapsed() < within,
            "paths not up within {within:?}: {:?}",
            dev.paths()
                .iter()
                .map(|p| (p.state, p.events.last().map(|e| e.reason.clone())))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_dpdk_paths_as_one_mcs_session_stripe_and_survive_a_cut_link() {
    let _ = env_logger::builder().is_test(true).try_init();
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        assert!(
            !common::required(),
            "CI=true requires dpdk_mcs to run, but: {why}"
        );
        println!("SKIPPED dpdk_mcs: {why}");
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = dpdk_common::eal(&args);
    eal.ring_pair("ibxm0t", "ibxm0i").expect("ring pair 0");
    eal.ring_pair("ibxm1t", "ibxm1i").expect("ring pair 1");
    let stack = |port: &str, ip: Ipv4Addr| {
        DpdkStack::open(DpdkOptions::new(args.clone(), port, ip, 24))
            .unwrap_or_else(|e| panic!("stack on {port}: {e}"))
    };
    // The target: one address on both ring ports, through the switch.
    let target_ports = [
        stack("net_ring_ibxm0t", TARGET_IP),
        stack("net_ring_ibxm1t", TARGET_IP),
    ];
    let switch = Switch::new(
        target_ports
            .iter()
            .map(|s| s.queue(0).expect("target queue"))
            .collect(),
    );
    let cut = switch.cut_flags();
    let options = target_ports[0].options();
    let mut interface = options.user.interface_config(TARGET_IP, None);
    interface.mac = Some(iscsi_bypass::wire::ethernet::EthernetAddress(
        target_ports[0].mac(),
    ));
    let portals = [3260u16, 3261].map(|p| SocketAddr::from((TARGET_IP, p)));
    let config = TargetConfig::new(IQN)
        .lun(LunConfig::ram(0, 8 << 20))
        .portal(portals[0])
        .portal(portals[1])
        .one_portal_group(1);
    let t = Target::start_on_device(config, switch, UserListenConfig::new(interface))
        .expect("target on the userspace stack");

    // Two DPDK paths, path i to portal i, as two connections of one session.
    let initiators = [
        stack("net_ring_ibxm0i", Ipv4Addr::new(10, 221, 0, 2)),
        stack("net_ring_ibxm1i", Ipv4Addr::new(10, 221, 0, 3)),
    ];
    let paths = (0..2)
        .map(|i| {
            let SocketAddr::V4(remote) = portals[i] else {
                unreachable!()
            };
            let remote = SocketAddrV4::new(*remote.ip(), remote.port());
            PathConfig::new(
                &format!("dpdk{i}->{remote}"),
                LoginConfig::new(INITIATOR, Some(IQN)),
                Box::new(initiators[i].connector(0, remote)),
            )
        })
        .collect();
    let mut c = DeviceConfig::new(paths, 0);
    c.mcs = true;
    c.policy = Policy::QueueDepth;
    c.idle = IdleMode::Sleep(Duration::from_micros(50));
    c.login_timeout = Duration::from_secs(2);
    c.no_path_timeout = Duration::from_secs(20);
    c.timers.nop_interval = Some(Duration::from_millis(300));
    c.timers.nop_timeout = Duration::from_millis(700);
    c.timers.command_timeout = Some(Duration::from_secs(3));
    c.reconnect.initial = Duration::from_millis(100);
    c.reconnect.max = Duration::from_millis(300);
    let dev = MpDevice::open(c).expect("open two DPDK paths as one MC/S session");
    wait_up(&dev, Duration::from_secs(10));

    // One session, two connections, at both ends.
    let ids = nexus(&dev);
    assert_eq!(ids[0].0, ids[1].0, "one TSIH: {ids:?}");
    assert_eq!((ids[0].1, ids[1].1), (0, 1), "CIDs: {ids:?}");
    assert_eq!(t.session_count(), 1);
    let mut cids = t.session_cids(ids[0].0).expect("the session at the target");
    cids.sort_unstable();
    assert_eq!(cids, [0, 1]);

    // Writes stripe over both connections and read back.
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 256];
    let l = write_load(&mut q, Duration::from_millis(800), BLOCKS, &mut generation);
    println!("MC/S over DPDK: writes per connection {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert!(
        l.per_path[0] > 0 && l.per_path[1] > 0,
        "both connections carried writes: {:?}",
        l.per_path
    );
    verify(&mut q, BLOCKS, &generation);
    let before = dev.paths()[1].resubmitted;

    // Path 1's link is cut under the write load, and comes back later.
    let cutter = {
        let cut = cut.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            cut[1].store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(2500));
            cut[1].store(false, Ordering::Relaxed);
        })
    };
    let l = write_load(&mut q, Duration::from_millis(4000), BLOCKS, &mut generation);
    cutter.join().unwrap();
    println!(
        "MC/S over DPDK, link of CID 1 cut: writes per connection {:?}, errors {}",
        l.per_path, l.errors
    );
    assert_eq!(l.errors, 0, "no write failed");
    let p1 = &dev.paths()[1];
    assert!(
        p1.events.iter().any(|e| e.state != PathState::Up),
        "connection 1 failed: {:?}",
        p1.events
    );
    assert!(
        p1.resubmitted > before,
        "the cut caught writes in flight on connection 1: {p1:?}"
    );
    let p0 = &dev.paths()[0];
    assert!(
        p0.events.iter().all(|e| e.state == PathState::Up),
        "connection 0 stayed up: {:?}",
        p0.events
    );
    verify(&mut q, BLOCKS, &generation);

    // Path 1 rejoins with its CID, one session again, both connections
    // carry writes.
    wait_up(&dev, Duration::from_secs(15));
    let again = nexus(&dev);
    assert_eq!(again[1].1, 1, "rejoined with its CID");
    assert_eq!(again[0].0, again[1].0, "one session again: {again:?}");
    let mut cids = t
        .session_cids(again[0].0)
        .expect("the session at the target");
    cids.sort_unstable();
    assert_eq!(cids, [0, 1], "the target has both connections again");
    let l = write_load(&mut q, Duration::from_millis(800), BLOCKS, &mut generation);
    assert_eq!(l.errors, 0);
    assert!(
        l.per_path[1] > 0,
        "connection 1 carries writes again: {:?}",
        l.per_path
    );
    verify(&mut q, BLOCKS, &generation);
    drop(q);
    dev.close();
    t.stop();
}
