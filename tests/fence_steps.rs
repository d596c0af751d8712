//! The fence steps beyond session reinstatement, against the embedded
//! target (docs/multipath.md, "Fencing"). Its two portals are in portal
//! groups of their own, so a failed path cannot be fenced by a login with
//! its ISID through the other portal: with portal 0 hung (it reads and
//! forgets, so path 0 cannot log in again either), a write caught on path
//! 0 waits for a fence. The reservation step (PREEMPT AND ABORT of path
//! 0's key through path 1) or the last-resort LOGICAL UNIT RESET releases
//! it to path 1 within a second or two; with neither, it fails with
//! `IoError::NotFenced` after `fence_timeout`. (tgtd 1.0.85 answers
//! PREEMPT AND ABORT with ILLEGAL REQUEST, so the reservation step cannot
//! work there; `tests/reservations.rs` checks that refusal.)

use iscsi_bypass::multipath::ReservationFence;
use iscsi_bypass::target::{Target, TargetConfig, TargetHandle};
use iscsi_bypass::{
    Device, DeviceConfig, IdleMode, Io, IoError, IoQueue, Options, PathState, Policy,
};
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-12.org.iscsi-bypass:fence";
const BASE_KEY: u64 = 0x5eed_0000_0000_0000;

fn target() -> TargetHandle {
    Target::start(TargetConfig::ram(IQN, 8 << 20).loopback_portals(2)).expect("target")
}

/// Two paths, I/O on path 0 while it is up (failover), held writes fail
/// after `fence_timeout`.
fn open(t: &TargetHandle, fence_timeout: Duration, edit: impl FnOnce(&mut DeviceConfig)) -> Device {
    let opts = Options {
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        login_timeout: Duration::from_secs(1),
        policy: Policy::Failover,
        ..Options::default()
    };
    let urls: Vec<String> = t
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut c = opts.device_config(&urls).expect("config");
    c.reconnect.initial = Duration::from_millis(50);
    c.reconnect.max = Duration::from_millis(200);
    c.fence_timeout = fence_timeout;
    edit(&mut c);
    Device::open(c).expect("open")
}

/// One write of block `lba`: its result, the path that completed it, and
/// how long it took.
fn write(q: &mut IoQueue, lba: u64, fill: u8) -> (Result<(), IoError>, Option<usize>, Duration) {
    let t0 = Instant::now();
    q.submit(Io::write(lba, 1, vec![fill; 512], lba))
        .map_err(|e| e.to_string())
        .expect("submit");
    let mut done = Vec::new();
    q.wait_completions(&mut done, 1, Duration::from_secs(30));
    let c = done.pop().expect("a completion within 30 s");
    (c.result, c.path, t0.elapsed())
}

fn read(q: &mut IoQueue, lba: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    q.read_at(lba, &mut b).expect("read");
    b
}

fn wait_up(dev: &Device, path: usize, within: Duration) {
    let t0 = Instant::now();
    while dev.paths()[path].state != PathState::Up {
        assert!(
            t0.elapsed() < within,
            "path {path} not up within {within:?}: {:?}",
            dev.paths()[path]
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Portal 0 hangs with a write of path 0's in flight: returns that write's
/// (result, path, time) and leaves portal 0 hung.
fn write_caught_on_a_hung_portal(
    t: &TargetHandle,
    q: &mut IoQueue,
) -> (Result<(), IoError>, Option<usize>, Duration) {
    let (r, path, _) = write(q, 1, 0x11);
    assert_eq!((r, path), (Ok(()), Some(0)), "failover: I/O on path 0");
    t.faults().portal(0).stall();
    write(q, 2, 0x22)
}

/// With the reservation fence on, every path registers its key under a
/// WE-RO reservation at login; when portal 0 hangs, path 1 preempts path
/// 0's key (PREEMPT AND ABORT) and the held write completes on path 1
/// while portal 0 is still hung. Path 0 registers again when it is back.
#[test]
fn a_path_alone_in_its_portal_group_is_fenced_by_preempt_and_abort() {
    use iscsi_bypass::PrType;
    let t = target();
    let fence = ReservationFence { base_key: BASE_KEY };
    let dev = open(&t, Duration::from_secs(20), |c| {
        c.reservation_fence = Some(fence)
    });
    let keys = dev.pr_read_keys().expect("READ KEYS").keys;
    assert!(
        keys.contains(&fence.key_of(0)) && keys.contains(&fence.key_of(1)),
        "every path registered at login: {keys:x?}"
    );
    let held = dev.pr_read_reservation().expect("READ RESERVATION");
    assert_eq!(
        held.reservation.map(|h| h.pr_type()),
        Some(Some(PrType::WriteExclusiveRegistrantsOnly))
    );
    let mut q = dev.queue_pair();
    let (r, path, took) = write_caught_on_a_hung_portal(&t, &mut q);
    assert_eq!(
        r,
        Ok(()),
        "fenced by PREEMPT AND ABORT, not by fence_timeout"
    );
    assert_eq!(path, Some(1));
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_ne!(
        dev.paths()[0].state,
        PathState::Up,
        "portal 0 is still hung"
    );
    let keys = dev.pr_read_keys().expect("READ KEYS").keys;
    assert!(
        !keys.contains(&fence.key_of(0)),
        "path 0's key preempted: {keys:x?}"
    );
    assert!(keys.contains(&fence.key_of(1)), "{keys:x?}");
    assert_eq!(read(&mut q, 2), vec![0x22; 512]);
    // Back: path 0 logs in and registers again.
    t.faults().portal(0).unstall();
    wait_up(&dev, 0, Duration::from_secs(15));
    let keys = dev.pr_read_keys().expect("READ KEYS").keys;
    assert!(
        keys.contains(&fence.key_of(0)),
        "registered again: {keys:x?}"
    );
    dev.close();
}

/// Without the reservation step, the write waits for a fence that never
/// comes and fails with `NotFenced`; with the last-resort LUN reset on, a
/// LOGICAL UNIT RESET through path 1 fences it and it completes there.
#[test]
fn without_other_steps_the_lun_reset_fences_and_without_it_the_write_fails_unfenced() {
    let t = target();
    let dev = open(&t, Duration::from_millis(1500), |_| {});
    let mut q = dev.queue_pair();
    let (r, _, took) = write_caught_on_a_hung_portal(&t, &mut q);
    assert!(
        matches!(r, Err(IoError::NotFenced { .. })),
        "{r:?} after {took:?}"
    );
    dev.close();
    t.faults().portal(0).unstall();

    let t = target();
    let dev = open(&t, Duration::from_secs(20), |c| {
        c.lun_reset_fence = Some(Duration::from_millis(300))
    });
    let mut q = dev.queue_pair();
    let (r, path, took) = write_caught_on_a_hung_portal(&t, &mut q);
    assert_eq!(r, Ok(()), "fenced by LOGICAL UNIT RESET");
    assert_eq!(path, Some(1));
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert_eq!(read(&mut q, 2), vec![0x22; 512]);
    t.faults().portal(0).unstall();
    dev.close();
}
