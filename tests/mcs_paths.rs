//! MC/S connections as the multipath device's paths (`Options::mcs`): two
//! URLs become two connections of one session, each on its own path
//! worker and socket, striped by the same selector; a connection killed
//! mid-write is fenced by a Logout (reason 1) on the other and loses
//! nothing. Against the embedded target (kernel TCP on loopback) and tgtd.

mod common;

use common::{tgtd_unavailable, Tgtd, TgtdOptions};
use iscsi_bypass::multipath::{MultipathError, PathState};
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::{Device, IdleMode, Options, Policy};
#[path = "common/chunks.rs"]
mod chunks;
use chunks::{verify, write_load};
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-12.org.iscsi-bypass:mcs-paths";
const BLOCKS: u32 = 8;

/// The embedded target with two loopback portals in one portal group
/// (MaxConnections 4 and ERL 2 by default).
fn target() -> TargetHandle {
    Target::start(
        TargetConfig::ram(IQN, 16 << 20)
            .loopback_portals(2)
            .one_portal_group(1),
    )
    .expect("embedded target")
}

fn urls(target: &TargetHandle) -> Vec<String> {
    target
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect()
}

fn options(mcs: bool) -> Options {
    Options {
        mcs,
        policy: Policy::QueueDepth,
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        no_path_timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

fn open(urls: &[String], mcs: bool) -> Device {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut config = options(mcs).device_config(&urls).expect("config");
    // A command stuck behind a CmdSN lost with a killed connection fails
    // its connection after this (and the session is made again).
    config.timers.command_timeout = Some(Duration::from_secs(3));
    Device::open(config).expect("open the device")
}

/// (TSIH, CID) of every path.
fn nexus(dev: &Device) -> Vec<(u16, u16)> {
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

fn wait_up(dev: &Device, within: Duration) {
    let t = Instant::now();
    while dev.paths().iter().any(|p| p.state != PathState::Up) {
        assert!(
            t.elapsed() < within,
            "paths not back up: {:?}",
            dev.paths()
                .iter()
                .map(|p| (p.state, p.events.last().map(|e| e.reason.clone())))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two paths in MC/S mode are two connections (CIDs 0 and 1) of one
/// session at the target; writes go over both and read back; in MPIO mode
/// the same URLs make two sessions, each with its own TSIH.
#[test]
fn two_mcs_paths_are_two_connections_of_one_session_and_stripe_writes() {
    let target = target();
    let urls = urls(&target);
    let dev = open(&urls, true);
    let ids = nexus(&dev);
    assert_eq!(ids[0].0, ids[1].0, "one TSIH: {ids:?}");
    assert_eq!((ids[0].1, ids[1].1), (0, 1), "CIDs: {ids:?}");
    assert_eq!(target.session_count(), 1);
    let mut cids = target
        .session_cids(ids[0].0)
        .expect("session at the target");
    cids.sort_unstable();
    assert_eq!(cids, [0, 1]);

    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 256];
    let l = write_load(&mut q, Duration::from_millis(800), BLOCKS, &mut generation);
    println!("MC/S writes per path {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert!(
        l.per_path[0] > 0 && l.per_path[1] > 0,
        "both connections carried writes: {:?}",
        l.per_path
    );
    verify(&mut q, BLOCKS, &generation);
    drop(q);
    dev.close();

    let mpio = open(&urls, false);
    let ids = nexus(&mpio);
    assert_ne!(ids[0].0, ids[1].0, "MPIO: a session each: {ids:?}");
    assert_eq!((ids[0].1, ids[1].1), (0, 0));
    mpio.close();
}

/// A connection killed at the target under write load: its writes go to
/// the other connection once a Logout (reason 1) there has closed it, the
/// path logs in again with its CID into the same session, and every chunk
/// reads back its newest acknowledged generation.
#[test]
fn a_killed_connection_loses_no_write_and_rejoins_the_session() {
    let _ = env_logger::builder().is_test(true).try_init();
    let target = target();
    let dev = open(&urls(&target), true);
    let ids = nexus(&dev);
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 256];
    let faults = target.faults();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        faults.kill_connection(1);
        std::thread::sleep(Duration::from_millis(300));
        faults.revive_connection(1);
    });
    let l = write_load(&mut q, Duration::from_millis(1500), BLOCKS, &mut generation);
    killer.join().unwrap();
    println!("writes per path {:?}, errors {}", l.per_path, l.errors);
    assert_eq!(l.errors, 0, "no write failed");
    let p1 = &dev.paths()[1];
    assert!(
        p1.events.iter().any(|e| e.state != PathState::Up),
        "connection 1 failed: {:?}",
        p1.events
    );
    assert!(p1.resubmitted > 0, "connection 1 gave back commands");
    // The live connection never stalled behind a CmdSN lost with the
    // killed one (those are filled with NOP-Outs), so it never failed.
    let p0 = &dev.paths()[0];
    assert!(
        p0.events.iter().all(|e| e.state == PathState::Up),
        "connection 0 stayed up: {:?}",
        p0.events
    );
    wait_up(&dev, Duration::from_secs(10));
    let again = nexus(&dev);
    assert_eq!(again[1].1, 1, "rejoined with its CID");
    assert_eq!(again[0].0, again[1].0, "one session again: {again:?}");
    if again[0].0 == ids[0].0 {
        println!("connection 1 reinstated in session {:#06x}", ids[0].0);
    } else {
        println!(
            "session {:#06x} reinstated as {:#06x}",
            ids[0].0, again[0].0
        );
    }
    verify(&mut q, BLOCKS, &generation);
    // And the session carries writes on both connections again.
    let l = write_load(&mut q, Duration::from_millis(500), BLOCKS, &mut generation);
    assert_eq!(l.errors, 0);
    verify(&mut q, BLOCKS, &generation);
    drop(q);
    dev.close();
}

/// tgtd as Debian ships it grants MaxConnections=1: opening two MC/S paths
/// fails with the typed error naming what it granted. With MaxConnections
/// raised by tgtadm it grants 2 (and more), and the two paths stripe
/// writes over two connections of one session.
#[test]
fn tgtd_mcs_paths_need_max_connections_raised() {
    if tgtd_unavailable().is_some() {
        return;
    }
    let t = Tgtd::start(TgtdOptions::default());
    let urls = [t.url(1), t.url(1)];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let e = Device::open_urls(&urls, &options(true)).unwrap_err();
    assert_eq!(
        e,
        MultipathError::McsNotGranted {
            offered: 2,
            granted: 1,
            wanted: 2
        },
        "{e}"
    );
    assert!(e.to_string().contains("MPIO"), "{e}");
    drop(t);

    let t = Tgtd::start(TgtdOptions {
        params: vec![("MaxConnections".to_string(), "4".to_string())],
        ..Default::default()
    });
    let urls = [t.url(1), t.url(1)];
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let dev = Device::open_urls(&urls, &options(true)).expect("MC/S with tgtd");
    let ids = nexus(&dev);
    assert_eq!(ids[0].0, ids[1].0, "one TSIH: {ids:?}");
    assert_eq!((ids[0].1, ids[1].1), (0, 1));
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 128];
    let l = write_load(&mut q, Duration::from_millis(800), BLOCKS, &mut generation);
    println!("tgtd MC/S writes per path {:?}", l.per_path);
    assert_eq!(l.errors, 0);
    assert!(l.per_path[0] > 0 && l.per_path[1] > 0, "{:?}", l.per_path);
    verify(&mut q, BLOCKS, &generation);
    drop(q);
    dev.close();
}
