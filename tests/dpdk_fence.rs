//! Fencing over DPDK (docs/multipath.md, "Fencing", step 2; docs/dpdk.md,
//! "Fence logins"): a DPDK path's NIC queue belongs to its live session,
//! so its fence login for another path runs over a second TCP connection
//! on its own userspace stack.
//!
//! The bed, all in one process: the embedded target on the userspace
//! stack, two portals (ports 3260 and 3261 of 10.219.0.1) in one portal
//! group, and two DPDK paths, each on a port of its own, joined to the
//! target by a pair of crossed rte_rings (`Eal::ring_pair`) each; the
//! target's stack serves both of its ring ports through a small learning
//! switch (a `phy::Device` over the two queues). Portal 0 hangs (the
//! target stops reading its connections) with a write of path 0 in flight:
//! path 1 logs in with path 0's ISID through portal 1 over its second
//! connection, which ends path 0's session; the write completes on path 1
//! while portal 0 is still hung, newer data goes over it, and when portal
//! 0 wakes up the held write reaches a reinstated session and never runs.
//! Every block reads back its newest generation; path 0 logs in again by
//! itself over its own queue. The control, with `fence_writes = false` on
//! the same bed: the held write lands over newer data.
//!
//! Not root / no net_ring plugin: SKIPPED, unless CI=true.
#![cfg(feature = "dpdk")]

mod common;
mod dpdk_common;

use dpdk_common::switch::Switch;
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::multipath::{DeviceConfig, PathConfig};
use iscsi_bypass::target::{LunConfig, Target, TargetConfig, UserListenConfig};
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use iscsi_bypass::{Device as MpDevice, IdleMode, Io, IoError, IoQueue, PathState, Policy};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-12.org.iscsi-bypass:dpdk-fence";
const INITIATOR: &str = "iqn.2026-12.org.iscsi-bypass:dpdk-fence-host";
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 219, 0, 1);

/// Block `lba` of generation `generation`: every byte says both.
fn block(lba: u64, generation: u8) -> Vec<u8> {
    let mut b = vec![generation; 512];
    b[..8].copy_from_slice(&lba.to_be_bytes());
    b
}

/// One write; its result, the path that completed it, how long it took.
fn write(
    q: &mut IoQueue,
    lba: u64,
    generation: u8,
) -> (Result<(), IoError>, Option<usize>, Duration) {
    let t0 = Instant::now();
    q.submit(Io::write(lba, 1, block(lba, generation), lba))
        .map_err(|e| e.to_string())
        .expect("submit");
    let mut done = Vec::new();
    q.wait_completions(&mut done, 1, Duration::from_secs(20));
    let c = done.pop().expect("a completion within 20 s");
    (c.result, c.path, t0.elapsed())
}

fn wait_state(dev: &MpDevice, path: usize, up: bool, within: Duration) {
    let t0 = Instant::now();
    while (dev.paths()[path].state == PathState::Up) != up {
        assert!(
            t0.elapsed() < within,
            "path {path} not {} within {within:?}: {:?}",
            if up { "up" } else { "down" },
            dev.paths()[path]
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_dpdk_path_fences_a_hung_dpdk_path_through_its_own_stack() {
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        assert!(
            !common::required(),
            "CI=true requires dpdk_fence to run, but: {why}"
        );
        println!("SKIPPED dpdk_fence: {why}");
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = dpdk_common::eal(&args);
    eal.ring_pair("ibxf0t", "ibxf0i").expect("ring pair 0");
    eal.ring_pair("ibxf1t", "ibxf1i").expect("ring pair 1");
    let stack = |port: &str, ip: Ipv4Addr| {
        DpdkStack::open(DpdkOptions::new(args.clone(), port, ip, 24))
            .unwrap_or_else(|e| panic!("stack on {port}: {e}"))
    };
    // The target: one address on both ring ports, through the switch.
    let target_ports = [
        stack("net_ring_ibxf0t", TARGET_IP),
        stack("net_ring_ibxf1t", TARGET_IP),
    ];
    let switch = Switch::new(
        target_ports
            .iter()
            .map(|s| s.queue(0).expect("target queue"))
            .collect(),
    );
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

    // Two DPDK paths, path i to portal i.
    let initiators = [
        stack("net_ring_ibxf0i", Ipv4Addr::new(10, 219, 0, 2)),
        stack("net_ring_ibxf1i", Ipv4Addr::new(10, 219, 0, 3)),
    ];
    let device = |fence_writes: bool| {
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
        c.policy = Policy::Failover;
        c.idle = IdleMode::Sleep(Duration::from_micros(50));
        c.login_timeout = Duration::from_secs(1);
        c.timers.nop_interval = Some(Duration::from_millis(500));
        c.timers.nop_timeout = Duration::from_secs(1);
        c.reconnect.initial = Duration::from_millis(50);
        c.reconnect.max = Duration::from_millis(200);
        // Without the fence over the second connection the held write would
        // wait for this and fail (no other step is on).
        c.fence_timeout = Duration::from_secs(8);
        c.fence_writes = fence_writes;
        let dev = MpDevice::open(c).expect("open over two DPDK paths");
        wait_state(&dev, 1, true, Duration::from_secs(5));
        dev
    };
    let dev = device(true);
    let mut q = dev.queue_pair();

    const BLOCKS: u64 = 8;
    for lba in 0..BLOCKS {
        let (r, path, _) = write(&mut q, lba, 1);
        assert_eq!((r, path), (Ok(()), Some(0)), "failover: I/O on path 0");
    }
    // Portal 0 hangs with a write of path 0's in flight.
    t.faults().portal(0).stall();
    let (r, path, took) = write(&mut q, 1, 2);
    assert_eq!(
        r,
        Ok(()),
        "fenced through portal 1 over path 1's stack, not by fence_timeout (took {took:?})"
    );
    assert_eq!(path, Some(1), "completed on path 1");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_ne!(
        dev.paths()[0].state,
        PathState::Up,
        "portal 0 is still hung"
    );
    // Newer data over the held write's block, and others.
    for lba in 0..BLOCKS {
        let (r, path, _) = write(&mut q, lba, 3);
        assert_eq!((r, path), (Ok(()), Some(1)));
    }
    let (r, _, _) = write(&mut q, 1, 4);
    assert_eq!(r, Ok(()));
    // Portal 0 wakes up: the held write reaches the target on path 0's old
    // connection, whose session is gone; path 0 logs in again (its own
    // reinstatement) over its own queue.
    t.faults().portal(0).unstall();
    wait_state(&dev, 0, true, Duration::from_secs(10));
    // Path 0's new login was answered after the old connection's bytes
    // were read (one poll loop serves both); give a late run a moment.
    std::thread::sleep(Duration::from_millis(200));
    for lba in 0..BLOCKS {
        let mut b = vec![0u8; 512];
        q.read_at(lba, &mut b).expect("read");
        let want = if lba == 1 { 4 } else { 3 };
        assert_eq!(
            b,
            block(lba, want),
            "block {lba}: generation {} (newest {want})",
            b[8]
        );
    }
    let stats = dev.paths();
    assert!(
        stats[0].logins >= 2,
        "path 0 logged in again: {:?}",
        stats[0]
    );
    dev.close();

    // The control: without fencing the same hang brings the held write
    // back over newer data, so the bed does deliver it late.
    let dev = device(false);
    let mut q = dev.queue_pair();
    let (r, path, _) = write(&mut q, 17, 1);
    assert_eq!((r, path), (Ok(()), Some(0)));
    t.faults().portal(0).stall();
    let (r, path, _) = write(&mut q, 17, 2);
    assert_eq!((r, path), (Ok(()), Some(1)), "retried at once, unfenced");
    let (r, _, _) = write(&mut q, 17, 3);
    assert_eq!(r, Ok(()));
    t.faults().portal(0).unstall();
    wait_state(&dev, 0, true, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let mut b = vec![0u8; 512];
    q.read_at(17, &mut b).expect("read");
    assert_eq!(
        b,
        block(17, 2),
        "without fencing the held generation 2 lands over generation 3 (read {})",
        b[8]
    );
    dev.close();
    t.stop();
}
