//! The library's discovery entry point: `Device::open_discovered` against
//! the embedded target with two loopback portals and CHAP (on discovery
//! too), and its errors for a wrong target name, wrong secret and an
//! unreachable portal.

use iscsi_bypass::multipath::DiscoveryError;
use iscsi_bypass::target::{Target, TargetConfig};
use iscsi_bypass::{Chap, Device, IdleMode, MultipathError, Options};
use std::time::Duration;

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:discover";

fn options(secret: &[u8]) -> Options {
    Options {
        chap: Some(Chap::new("db-host", secret.to_vec())),
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        login_timeout: Duration::from_secs(3),
        ..Options::default()
    }
}

#[test]
fn open_discovered_finds_every_portal_and_does_io() {
    let target = Target::start(
        TargetConfig::ram(IQN, 16 << 20)
            .loopback_portals(2)
            .chap("db-host", b"a-secret-of-12".to_vec())
            .chap_on_discovery(true),
    )
    .expect("embedded target");
    let portal = target.portals()[0].to_string();
    let opts = options(b"a-secret-of-12");

    let urls = opts.discover_urls(&portal, None, 0).expect("discovery");
    assert_eq!(urls.len(), 2, "{urls:?}");
    for p in target.portals() {
        assert!(
            urls.contains(&format!("iscsi://{p}/{IQN}/0")),
            "{p} missing from {urls:?}"
        );
    }

    let dev = Device::open_discovered(&portal, Some(IQN), 0, &opts).expect("open");
    assert_eq!(dev.paths().len(), 2);
    let mut q = dev.queue_pair();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
    q.write_at(64, &data).expect("write");
    let mut back = vec![0u8; 4096];
    q.read_at(64, &mut back).expect("read");
    assert_eq!(back, data);
    drop(q);
    dev.close();

    // Bad input: one clear error each.
    let err = opts
        .discover_urls(&portal, Some("iqn.2026-11.nobody:here"), 0)
        .unwrap_err();
    assert!(
        matches!(
            &err,
            MultipathError::Discovery(DiscoveryError::TargetNotReported { target, reported, .. })
                if target == "iqn.2026-11.nobody:here" && reported.iter().any(|r| r == IQN)
        ),
        "{err}"
    );
    let err = options(b"a-wrong-secret")
        .discover_urls(&portal, None, 0)
        .unwrap_err();
    assert!(err.to_string().contains("authentication"), "{err}");
    let err = opts.discover_urls("not an address", None, 0).unwrap_err();
    assert!(
        matches!(&err, MultipathError::Discovery(DiscoveryError::BadPortal { portal }) if portal == "not an address"),
        "{err}"
    );
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = opts
        .discover_urls(&closed.to_string(), None, 0)
        .unwrap_err();
    assert!(err.to_string().contains(&closed.to_string()), "{err}");
}

/// Discovery follows login redirects, as an array's group address sends
/// every login on to a member portal: SendTargets through a portal that
/// redirects lands on the other and lists both; a redirect loop ends with
/// an error naming its hops.
#[test]
fn discovery_follows_login_redirects() {
    let target = Target::start(TargetConfig::ram(IQN, 16 << 20).loopback_portals(2))
        .expect("embedded target");
    let all = target.portals();
    let opts = Options {
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        login_timeout: Duration::from_secs(3),
        ..Options::default()
    };
    target.faults().portal(0).redirect_logins(all[1], false);
    let urls = opts
        .discover_urls(&all[0].to_string(), None, 0)
        .expect("discovery through a redirecting portal");
    assert_eq!(urls.len(), 2, "{urls:?}");
    for p in &all {
        assert!(urls.contains(&format!("iscsi://{p}/{IQN}/0")), "{urls:?}");
    }
    let dev = Device::open_discovered(&all[0].to_string(), Some(IQN), 0, &opts)
        .expect("open what was discovered");
    assert_eq!(dev.paths().len(), 2);
    dev.close();
    // Each portal sends logins to the other: a loop.
    target.faults().portal(1).redirect_logins(all[0], true);
    let err = opts
        .discover_urls(&all[0].to_string(), None, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redirected more than")
            && err.contains(&format!("{} redirected temporarily to {}", all[0], all[1])),
        "{err}"
    );
}

#[test]
fn block_idle_mode_sleeps_and_is_woken_by_each_submission() {
    // IdleMode::Block with no spin: between I/Os the path worker blocks on
    // its socket and its eventfd; a submission must wake it (a lost
    // wake-up would leave each I/O waiting for the 20 ms bound).
    let target = Target::start(TargetConfig::ram(IQN, 16 << 20)).expect("embedded target");
    let url = format!("iscsi://{}/{IQN}/0", target.portals()[0]);
    let opts = Options {
        idle: IdleMode::Block(Duration::ZERO),
        login_timeout: Duration::from_secs(3),
        ..Options::default()
    };
    let dev = Device::open_urls(&[url.as_str()], &opts).expect("open");
    let mut q = dev.queue_pair();
    let start = std::time::Instant::now();
    let rounds = 200u32;
    for i in 0..rounds {
        // Idle long enough for the worker to block before each I/O.
        std::thread::sleep(Duration::from_millis(2));
        let data: Vec<u8> = (0..4096u32).map(|b| (b * 7 + i) as u8).collect();
        q.write_at(u64::from(i % 64) * 8, &data).expect("write");
        let mut back = vec![0u8; 4096];
        q.read_at(u64::from(i % 64) * 8, &mut back).expect("read");
        assert_eq!(back, data, "round {i}");
    }
    let elapsed = start.elapsed();
    let wakeups = dev.paths()[0].wakeups;
    drop(q);
    dev.close();
    assert!(
        wakeups >= u64::from(rounds / 2),
        "the worker was woken {wakeups} times for {rounds} idle gaps"
    );
    // 400 I/Os held by lost wake-ups would take 8 s; a working wake-up
    // leaves each at loopback latency.
    assert!(
        elapsed < Duration::from_secs(6),
        "{elapsed:?} for {rounds} rounds"
    );
}

#[test]
fn submissions_from_other_threads_wake_a_blocked_worker() {
    // Two application threads, each with its own queue, take turns: each
    // I/O is submitted from a thread that did not submit the last one,
    // while the worker blocks (IdleMode::Block, no spin) in poll(2) on its
    // socket and eventfd. The worker drains its eventfd only when it was
    // signalled; a lost wake-up would hold the I/O for the worker's 20 ms
    // bound.
    let target = Target::start(TargetConfig::ram(IQN, 16 << 20)).expect("embedded target");
    let url = format!("iscsi://{}/{IQN}/0", target.portals()[0]);
    let opts = Options {
        idle: IdleMode::Block(Duration::ZERO),
        login_timeout: Duration::from_secs(3),
        ..Options::default()
    };
    let dev = Device::open_urls(&[url.as_str()], &opts).expect("open");
    let rounds = 150u32;
    let turn = std::sync::atomic::AtomicU32::new(0);
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for me in 0..2u32 {
            let (dev, turn) = (&dev, &turn);
            s.spawn(move || {
                let mut q = dev.queue_pair();
                loop {
                    let t = turn.load(std::sync::atomic::Ordering::Acquire);
                    if t >= rounds {
                        return;
                    }
                    if t % 2 != me {
                        std::thread::yield_now();
                        continue;
                    }
                    // Idle long enough for the worker to block.
                    std::thread::sleep(Duration::from_millis(2));
                    let data: Vec<u8> = (0..4096u32).map(|b| (b * 3 + t) as u8).collect();
                    let lba = u64::from(t % 32) * 8;
                    q.write_at(lba, &data).expect("write");
                    let mut back = vec![0u8; 4096];
                    q.read_at(lba, &mut back).expect("read");
                    assert_eq!(back, data, "turn {t}");
                    turn.store(t + 1, std::sync::atomic::Ordering::Release);
                }
            });
        }
    });
    let elapsed = start.elapsed();
    let wakeups = dev.paths()[0].wakeups;
    dev.close();
    assert!(
        wakeups >= u64::from(rounds / 2),
        "the worker was woken {wakeups} times for {rounds} idle gaps"
    );
    // 300 I/Os held by lost wake-ups would take 6 s; the 2 ms gaps 0.3 s.
    assert!(
        elapsed < Duration::from_secs(5),
        "{elapsed:?} for {rounds} turns"
    );
}
