//! Async Messages (RFC 7143 §11.9) and login redirects on the library's
//! multipath paths, end to end against the embedded target: each event is
//! injected with `FaultInjector::send_async_event` while writes run on two
//! paths, and afterwards every acknowledged write is read back. The target
//! runs in strict mode, so the initiator's PDUs around each event are
//! checked too (no violation may be recorded). Kernel TCP on loopback.

use iscsi_bypass::target::{
    fault::InjectedSense, AluaState, AsyncEvent, Target, TargetConfig, TargetHandle,
};
use iscsi_bypass::{Device, IdleMode, IoQueue, Options, PathState, Policy};
#[path = "common/chunks.rs"]
mod chunks;
mod common;
use chunks::{verify, write_load, Load};
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-12.org.iscsi-bypass:async";

fn strict_target(portals: usize) -> TargetHandle {
    Target::start(
        TargetConfig::ram(IQN, 64 << 20)
            .loopback_portals(portals)
            .strict(true),
    )
    .expect("embedded target")
}

fn urls(target: &TargetHandle, portals: &[usize]) -> Vec<String> {
    let all = target.portals();
    portals
        .iter()
        .map(|&i| format!("iscsi://{}/{IQN}/0", all[i]))
        .collect()
}

fn open(urls: &[String]) -> Device {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let opts = Options {
        policy: Policy::QueueDepth,
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        no_path_timeout: Duration::from_secs(20),
        ..Options::default()
    };
    Device::open_urls(&urls, &opts).expect("open the device")
}

/// Waits until path `i` is Up with at least `logins` logins.
#[track_caller]
fn wait_up(dev: &Device, i: usize, logins: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = &dev.paths()[i];
        if p.state == PathState::Up && p.logins >= logins {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "path {i} not back up: {:?}",
            p.events
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn no_violations(target: &TargetHandle) {
    let v = target.violations();
    assert!(v.is_empty(), "strict mode caught: {v:#?}");
}

/// Writes of `blocks` blocks for `dur` while `fault` runs once, `after`
/// into the load (on a thread of its own).
fn load_with_fault(
    q: &mut IoQueue,
    dur: Duration,
    blocks: u32,
    generation: &mut [u32],
    after: Duration,
    fault: impl FnOnce() + Send,
) -> Load {
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(after);
            fault();
        });
        write_load(q, dur, blocks, generation)
    })
}

/// The scaffolding of each Async Message test: a strict target with two
/// portals and a device on both; writes of `blocks` blocks for `dur`,
/// `event` sent to portal 0 after 300 ms; then no error, both paths
/// carried writes, every write reads back, no violation. Returns the
/// target and the device for the event's own checks.
fn event_under_load(blocks: u32, dur: Duration, event: AsyncEvent) -> (TargetHandle, Device) {
    let target = strict_target(2);
    let dev = open(&urls(&target, &[0, 1]));
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 512];
    let faults = target.faults().portal(0);
    let load = load_with_fault(
        &mut q,
        dur,
        blocks,
        &mut generation,
        Duration::from_millis(300),
        || faults.send_async_event(event),
    );
    println!("{event:?}: per path {:?}", load.per_path);
    assert_eq!(load.errors, 0, "the application saw I/O errors");
    assert!(load.per_path[0] > 0 && load.per_path[1] > 0);
    verify(&mut q, blocks, &generation);
    no_violations(&target);
    drop(q);
    (target, dev)
}

/// The redirect tests' reconnect: portal 1 drops its connections 200 ms
/// into 1.5 s of writes; no error, path 0 is back up with a second login,
/// every write reads back.
fn reconnect_under_load(target: &TargetHandle, dev: &Device) {
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 256];
    let faults = target.faults().portal(1);
    let load = load_with_fault(
        &mut q,
        Duration::from_millis(1500),
        8,
        &mut generation,
        Duration::from_millis(200),
        || faults.drop_connections_now(),
    );
    assert_eq!(load.errors, 0);
    wait_up(dev, 0, 2);
    verify(&mut q, 8, &generation);
}

/// AsyncEvent 1: path 0 stops taking I/O, finishes what it has, logs out
/// within Parameter3 and logs in again; the application sees nothing.
#[test]
fn logout_request_drains_logs_out_and_reconnects() {
    let (target, dev) = event_under_load(
        8,
        Duration::from_millis(1500),
        AsyncEvent::RequestLogout { within: 4 },
    );
    wait_up(&dev, 0, 2);
    let f = target.faults();
    assert_eq!(f.logouts_after_request(), 1, "one logout, in time");
    assert_eq!(f.logout_requests_ignored(), 0);
    let p = &dev.paths()[0];
    assert!(p.async_events >= 1);
    assert!(
        p.events
            .iter()
            .any(|e| e.reason.contains("logging out at the target's request")),
        "{:?}",
        p.events
    );
    assert_eq!(dev.paths()[1].logins, 1, "path 1 was not disturbed");
}

/// Finds when path `i` went Down for a reason containing `why`, and when
/// it was next Up.
fn down_up_gap(dev: &Device, i: usize, why: &str) -> Duration {
    let events = dev.paths()[i].events.clone();
    let k = events
        .iter()
        .position(|e| e.state == PathState::Down && e.reason.contains(why))
        .unwrap_or_else(|| panic!("no Down event with {why:?}: {events:?}"));
    let up = events[k..]
        .iter()
        .find(|e| e.state == PathState::Up)
        .unwrap_or_else(|| panic!("not Up after {why:?}: {events:?}"));
    up.since_open - events[k].since_open
}

/// AsyncEvent 2: the target announces the connection drop with
/// Time2Wait 1 s and closes; the path logs in again no sooner, and the
/// writes it had wait for that login (the fence) before they are retried.
#[test]
fn connection_drop_announced_reconnects_after_time2wait() {
    let (_target, dev) = event_under_load(
        8,
        Duration::from_millis(2000),
        AsyncEvent::DropConnection {
            time2wait: 1,
            time2retain: 0,
        },
    );
    wait_up(&dev, 0, 2);
    let gap = down_up_gap(&dev, 0, "AsyncEvent 2");
    println!("down for {gap:?}");
    assert!(gap >= Duration::from_secs(1), "reconnected after {gap:?}");
    assert!(dev.paths()[0].async_events >= 1);
}

/// AsyncEvent 3 likewise (the whole session; one connection per session).
#[test]
fn session_drop_announced_reconnects_after_time2wait() {
    let (_target, dev) = event_under_load(
        8,
        Duration::from_millis(2000),
        AsyncEvent::DropSession {
            time2wait: 1,
            time2retain: 5,
        },
    );
    wait_up(&dev, 0, 2);
    let gap = down_up_gap(&dev, 0, "AsyncEvent 3");
    assert!(gap >= Duration::from_secs(1), "reconnected after {gap:?}");
}

/// AsyncEvent 4: the initiator renegotiates MaxRecvDataSegmentLength by
/// Text Request and keeps the new, smaller limit for its immediate data
/// and Data-Out (strict mode would flag a longer segment).
#[test]
fn renegotiation_applies_the_new_max_recv_data_segment_length() {
    // 32 KiB writes: immediate data and unsolicited Data-Out, 4 KiB each
    // after the renegotiation.
    let (target, dev) = event_under_load(
        64,
        Duration::from_millis(1500),
        AsyncEvent::Renegotiate {
            max_recv_data_segment_len: Some(4096),
        },
    );
    assert_eq!(target.faults().renegotiations(), 1);
    let p = dev.paths();
    assert_eq!(p[0].logins, 1, "renegotiation is no reconnect");
    assert!(p[0].async_events >= 1);
}

fn alua_of(dev: &Device) -> Vec<Option<String>> {
    dev.paths().iter().map(|p| p.alua.clone()).collect()
}

/// AsyncEvent 0 with UNIT ATTENTION 2A/06: an idle device re-reads the
/// ALUA states (nothing else would tell it: no command runs), and I/O
/// follows; 2A/09 (capacity changed) is counted and logged.
#[test]
fn scsi_async_event_triggers_the_alua_re_read() {
    let target = strict_target(2);
    target
        .set_alua_state(1, AluaState::ActiveOptimized)
        .unwrap();
    target
        .set_alua_state(2, AluaState::ActiveNonOptimized)
        .unwrap();
    let dev = open(&urls(&target, &[0, 1]));
    let before = alua_of(&dev);
    assert_eq!(
        before,
        vec![
            Some("active/optimized".into()),
            Some("active/non-optimized".into())
        ]
    );
    target.set_alua_state(1, AluaState::Standby).unwrap();
    target
        .set_alua_state(2, AluaState::ActiveOptimized)
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(alua_of(&dev), before, "no I/O, so no path knows yet");
    target
        .faults()
        .portal(1)
        .send_async_event(AsyncEvent::Scsi {
            lun: 0,
            sense: InjectedSense {
                key: 0x06,
                asc: 0x2a,
                ascq: 0x06,
            },
        });
    let want = vec![Some("standby".into()), Some("active/optimized".into())];
    let deadline = Instant::now() + Duration::from_secs(5);
    while alua_of(&dev) != want {
        assert!(
            Instant::now() < deadline,
            "ALUA not re-read: {:?}",
            alua_of(&dev)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dev.paths()[1].async_events >= 1);
    target.faults().send_async_event(AsyncEvent::Scsi {
        lun: 0,
        sense: InjectedSense {
            key: 0x06,
            asc: 0x2a,
            ascq: 0x09,
        },
    });
    let mut q = dev.queue_pair();
    let mut generation = vec![0u32; 256];
    let load = write_load(&mut q, Duration::from_millis(600), 8, &mut generation);
    assert_eq!(load.errors, 0);
    assert_eq!(load.per_path[0], 0, "the standby path was used");
    verify(&mut q, 8, &generation);
    let deadline = Instant::now() + Duration::from_secs(2);
    while dev.paths()[0].async_events < 1 {
        assert!(Instant::now() < deadline, "2A/09 not counted on path 0");
        std::thread::sleep(Duration::from_millis(20));
    }
    no_violations(&target);
}

/// Login redirects on a library path: a temporary redirect is followed at
/// open, and the reconnect goes back to the original address (the target
/// there no longer redirects; the redirect's portal refuses logins, so a
/// reconnect there would never come up).
#[test]
fn temporary_redirect_is_followed_and_reconnects_go_home() {
    let target = strict_target(2);
    let all = target.portals();
    target.faults().portal(0).redirect_logins(all[1], false);
    let dev = open(&urls(&target, &[0]));
    let p = &dev.paths()[0];
    let landed = p
        .events
        .iter()
        .find(|e| e.state == PathState::Up)
        .expect("up");
    assert!(
        landed.reason.contains(&format!(
            "logged in at {} (after {} redirected temporarily to {})",
            all[1], all[0], all[1]
        )),
        "{}",
        landed.reason
    );
    assert_eq!(target.faults().portal(1).connections(), 1);
    target.faults().portal(0).stop_redirecting();
    target.faults().portal(1).refuse_logins(0x03, 0x01);
    reconnect_under_load(&target, &dev);
    assert_eq!(target.faults().portal(0).connections(), 1, "back home");
    no_violations(&target);
}

/// A permanent redirect moves the path's home: the reconnect goes to the
/// new address at once (the original one now refuses logins).
#[test]
fn permanent_redirect_moves_reconnects_to_the_new_address() {
    let target = strict_target(2);
    let all = target.portals();
    target.faults().portal(0).redirect_logins(all[1], true);
    let dev = open(&urls(&target, &[0]));
    target.faults().portal(0).refuse_logins(0x03, 0x01);
    reconnect_under_load(&target, &dev);
    let p = &dev.paths()[0];
    let last_up = p.events.iter().rev().find(|e| e.state == PathState::Up);
    assert_eq!(
        last_up.map(|e| e.reason.as_str()),
        Some("logged in"),
        "the reconnect went straight to {}: {:?}",
        all[1],
        p.events
    );
    assert_eq!(target.faults().portal(1).connections(), 1);
}

/// A redirect to an address nobody answers: open fails, naming the hop.
#[test]
fn unusable_redirect_is_named_in_the_open_error() {
    let target = strict_target(1);
    let dead: std::net::SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
    target.faults().redirect_logins(dead, false);
    let urls = urls(&target, &[0]);
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let e = Device::open_urls(&urls, &Options::default()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(&format!("redirected temporarily to {dead}")),
        "{text}"
    );
}
