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
use std::collections::HashMap;
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
    open_at_erl(urls, mcs, 0)
}

/// As [`open`], offering ErrorRecoveryLevel `erl` on every path.
fn open_at_erl(urls: &[String], mcs: bool, erl: u32) -> Device {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut config = options(mcs).device_config(&urls).expect("config");
    for p in &mut config.paths {
        p.login.offer.error_recovery_level = erl;
        if erl >= 2 {
            // The target asks no wait before a reconnect (DefaultTime2Wait
            // 0): the other connection's commands queued behind a CmdSN of
            // the failed one wait for its reinstatement, not 2 s.
            p.login.offer.default_time2wait = 0;
        }
    }
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

/// How many times the LU executed each write (its byte range and data):
/// every write of `write_load` is unique (chunk and generation stamped).
fn executions_per_write(target: &TargetHandle) -> HashMap<(u64, u32), usize> {
    let mut n = HashMap::new();
    for e in target.lun(0).expect("LUN 0").write_executions() {
        *n.entry((e.offset, e.data_crc)).or_insert(0) += 1;
    }
    n
}

/// A write load on two MC/S paths at ERL `erl` during which the target
/// runs one write of connection 1, loses its status and kills the
/// connection (`lose_status_and_kill`). Returns the device (for its
/// counters), the writes completed and how often each write ran.
fn lose_one_status_under_load(
    target: &TargetHandle,
    erl: u32,
) -> (Device, u64, HashMap<(u64, u32), usize>) {
    lose_one_status(target, erl, None)
}

/// Connection 1 loses a write's status and dies under write load; with
/// `link_down`, its path cannot log in again for that long (its portal
/// refuses logins), so it is not reinstated in time and its tasks must
/// move to connection 0.
fn lose_one_status(
    target: &TargetHandle,
    erl: u32,
    link_down: Option<Duration>,
) -> (Device, u64, HashMap<(u64, u32), usize>) {
    let _ = env_logger::builder().is_test(true).try_init();
    let dev = open_at_erl(&urls(target), true, erl);
    assert_eq!(nexus(&dev)[1].1, 1, "two connections");
    target.lun(0).unwrap().log_write_executions(true);
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 256];
    let faults = target.faults();
    let fault = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        if link_down.is_some() {
            // Out of resources: the path backs off and tries again.
            faults.portal(1).refuse_logins(3, 1);
        }
        faults.lose_status_and_kill(1, 1);
        if let Some(down) = link_down {
            std::thread::sleep(down);
            faults.portal(1).accept_logins();
        }
    });
    let l = write_load(&mut q, Duration::from_millis(1500), BLOCKS, &mut generation);
    fault.join().unwrap();
    println!(
        "ERL {erl}: writes per path {:?}, errors {}",
        l.per_path, l.errors
    );
    assert_eq!(l.errors, 0, "no write failed");
    let p1 = &dev.paths()[1];
    assert!(
        p1.events.iter().any(|e| e.state != PathState::Up),
        "connection 1 failed: {:?}",
        p1.events
    );
    wait_up(&dev, Duration::from_secs(10));
    verify(&mut q, BLOCKS, &generation);
    drop(q);
    let runs = executions_per_write(target);
    (dev, l.per_path[0] + l.per_path[1], runs)
}

/// #14, the fallback (ERL below 2, what the MC/S paths did at every ERL
/// before TASK REASSIGN): the write whose status was lost with its
/// connection is fenced (Logout reason 1 on the other connection) and
/// retried as a new task, so it runs twice at the LU. Harmless for a plain
/// WRITE of the same data, wrong for COMPARE AND WRITE or PR OUT, or when
/// another write to the range went in between: what ERL 2 recovery avoids.
#[test]
fn erl1_old_fence_resends_and_the_lost_status_write_runs_twice() {
    let target = target();
    let (dev, completed, runs) = lose_one_status_under_load(&target, 1);
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    println!("{completed} writes completed, run twice: {twice:?}");
    assert!(!twice.is_empty(), "the lost-status write ran twice");
    assert!(twice.iter().all(|(_, &n)| n == 2), "{twice:?}");
    let p1 = &dev.paths()[1];
    assert_eq!((p1.reassigned, p1.reassign_fallbacks), (0, 0));
    assert!(p1.resubmitted > 0, "connection 1 gave its writes back");
    dev.close();
}

/// #14, done when "a connection killed mid-write loses nothing, and no
/// write is executed twice": at ERL 2 the tasks of the killed connection
/// (the one whose status was lost, and those part way through their data)
/// wait for its reinstatement (a login with CID 1 into the same session),
/// which takes them over by TASK REASSIGN: the target sends the lost
/// status again and asks by R2T for the missing data. Every write
/// completes, every write ran exactly once at the LU, and every chunk reads
/// back its newest generation.
#[test]
fn erl2_lost_status_write_is_reassigned_and_runs_exactly_once() {
    let target = target();
    let (dev, completed, runs) = lose_one_status_under_load(&target, 2);
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "writes run twice: {twice:?}");
    let executed: usize = runs.values().sum();
    assert_eq!(executed as u64, completed, "each completed write ran once");
    let p1 = &dev.paths()[1];
    println!(
        "{completed} writes; connection 1: {} reassigned, {} fallbacks, {} resubmitted",
        p1.reassigned, p1.reassign_fallbacks, p1.resubmitted
    );
    assert!(p1.reassigned >= 1, "the lost-status write was reassigned");
    assert_eq!(p1.reassign_fallbacks, 0);
    let ids = nexus(&dev);
    assert_eq!(ids[0].0, ids[1].0, "one session: {ids:?}");
    dev.close();
}

/// #14 hostile answer: a target that refuses TASK REASSIGN (the fault
/// answers 255; tgtd answers 5, not supported) gets the fallback: the
/// refused tasks are retried as new commands (the counter says how many),
/// the application sees no error, and every chunk reads back its newest
/// generation; the lost-status write then runs twice, as without ERL 2.
#[test]
fn erl2_refused_task_reassign_falls_back_to_the_retry_without_an_error() {
    let target = target();
    target.faults().refuse_task_reassign(u32::MAX);
    let (dev, completed, runs) = lose_one_status_under_load(&target, 2);
    let p1 = &dev.paths()[1];
    println!(
        "{completed} writes; connection 1: {} reassigned, {} fallbacks",
        p1.reassigned, p1.reassign_fallbacks
    );
    assert!(p1.reassign_fallbacks >= 1, "the refusals were counted");
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    assert!(!twice.is_empty(), "the lost-status write ran twice");
    target.faults().clear_connection_faults();
    dev.close();
}

/// ERL 2, the failed connection's link stays down past DefaultTime2Wait
/// (0 here) and its reconnects fail: its tasks move to the other live
/// connection of the session (Logout reason 2 for its CID there, then
/// TASK REASSIGN), so the write whose status was lost is not run twice and
/// nothing is lost.
#[test]
fn erl2_link_down_moves_the_tasks_to_the_other_connection_and_runs_each_write_once() {
    let target = target();
    let (dev, completed, runs) = lose_one_status(&target, 2, Some(Duration::from_secs(3)));
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "writes run twice: {twice:?}");
    let executed: usize = runs.values().sum();
    assert_eq!(executed as u64, completed, "each completed write ran once");
    let p1 = &dev.paths()[1];
    println!(
        "{completed} writes; connection 1: {} reassigned, {} fallbacks, {} resubmitted; events {:?}",
        p1.reassigned,
        p1.reassign_fallbacks,
        p1.resubmitted,
        p1.events.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );
    assert!(p1.reassigned >= 1, "the lost-status write was reassigned");
    assert_eq!(p1.reassign_fallbacks, 0);
    assert!(
        p1.events.iter().any(|e| e.reason.contains("login")),
        "connection 1's reconnects were refused meanwhile: {:?}",
        p1.events
    );
    let p0 = &dev.paths()[0];
    assert!(
        p0.events.iter().all(|e| e.state == PathState::Up),
        "connection 0 stayed up: {:?}",
        p0.events
    );
    let ids = nexus(&dev);
    assert_eq!(ids[0].0, ids[1].0, "one session: {ids:?}");
    dev.close();
}

/// The same, but the target refuses the TASK REASSIGN on the other
/// connection: the tasks fall back to the fence and retry (counted), with
/// no error to the application (the lost-status write then runs twice).
#[test]
fn erl2_link_down_refused_task_reassign_on_the_other_connection_falls_back() {
    let target = target();
    target.faults().refuse_task_reassign(u32::MAX);
    let (dev, completed, runs) = lose_one_status(&target, 2, Some(Duration::from_secs(3)));
    let p1 = &dev.paths()[1];
    println!(
        "{completed} writes; connection 1: {} reassigned, {} fallbacks",
        p1.reassigned, p1.reassign_fallbacks
    );
    assert!(p1.reassign_fallbacks >= 1, "the refusals were counted");
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    assert!(!twice.is_empty(), "the lost-status write ran twice");
    assert!(twice.iter().all(|(_, &n)| n == 2), "{twice:?}");
    target.faults().clear_connection_faults();
    dev.close();
}
