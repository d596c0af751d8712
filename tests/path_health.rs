//! Path health against the embedded target, whose fault injection kills
//! and restores a portal: flap damping holds a flapping path down, the
//! failover policy's failback modes (immediate, delayed, manual), and
//! no_path_retry (fail at once, N checks, queue until a path returns), the
//! last also as the NBD export's errno.

use iscsi_bypass::multipath::{Failback, FlapDamping, NoPathRetry};
use iscsi_bypass::target::{FaultInjector, Target, TargetConfig, TargetHandle};
use iscsi_bypass::{Device, IdleMode, IoCompletion, IoError, IoQueue, Options, PathState, Policy};
use std::time::{Duration, Instant};

const IQN: &str = "iqn.2026-12.org.iscsi-bypass:health";

fn target() -> TargetHandle {
    Target::start(TargetConfig::ram(IQN, 8 << 20).loopback_portals(2)).expect("target")
}

fn urls(t: &TargetHandle) -> Vec<String> {
    t.portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{IQN}/0"))
        .collect()
}

fn open(t: &TargetHandle, n: usize, edit: impl FnOnce(&mut iscsi_bypass::DeviceConfig)) -> Device {
    let opts = Options {
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        login_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let u = urls(t);
    let u: Vec<&str> = u[..n].iter().map(String::as_str).collect();
    let mut c = opts.device_config(&u).expect("config");
    c.reconnect.initial = Duration::from_millis(50);
    c.reconnect.max = Duration::from_millis(200);
    edit(&mut c);
    Device::open(c).expect("open")
}

/// Kills portal `i`'s connections and refuses its logins (out of resources).
fn kill(f: &FaultInjector) {
    f.refuse_logins(0x03, 0x01);
    f.drop_connections_now();
}

fn wait_state(dev: &Device, path: usize, want: PathState, within: Duration) -> Duration {
    let t0 = Instant::now();
    while dev.paths()[path].state != want {
        assert!(
            t0.elapsed() < within,
            "path {path} not {want} within {within:?}: {:?}",
            dev.paths()[path]
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t0.elapsed()
}

/// The path one write went down.
fn io_path(q: &mut IoQueue) -> usize {
    let mut done = Vec::new();
    q.submit(iscsi_bypass::Io::write(0, 1, vec![7; 512], 1))
        .map_err(|e| e.to_string())
        .unwrap();
    q.wait_completions(&mut done, 1, Duration::from_secs(10));
    let c = done.pop().expect("completion");
    c.result.expect("write");
    c.path.expect("a path")
}

#[test]
fn flap_damping_holds_a_flapping_path_down() {
    let t = target();
    let dev = open(&t, 2, |c| {
        c.flap_damping = Some(FlapDamping {
            threshold: 2,
            window: Duration::from_secs(30),
            hold_down: Duration::from_secs(5),
        });
        // Path 1 sits idle for the whole test, so its NOP-Out pings are its
        // only traffic. The time it was seen down (6 copies of this test at
        // once on 2 cores) its event log said "no answer to NOP-Out ping
        // within 3s": its own ping timer after 2 s + 3 s without a PDU, not
        // anything portal 0's faults did. A longer ping timeout keeps the
        // check below about portal 0 alone.
        c.timers.nop_timeout = Duration::from_secs(10);
    });
    let p0 = t.faults().portal(0);
    // First failure: back after the back-off (and the target's
    // DefaultTime2Wait of 2 s).
    p0.drop_connections_now();
    wait_state(&dev, 0, PathState::Down, Duration::from_secs(5));
    let back = wait_state(&dev, 0, PathState::Up, Duration::from_secs(5));
    assert!(back < Duration::from_millis(3500), "{back:?}");
    // Second failure within the window: marginal, held down 5 s although
    // the portal takes logins.
    p0.drop_connections_now();
    wait_state(&dev, 0, PathState::Down, Duration::from_secs(5));
    let held = wait_state(&dev, 0, PathState::Up, Duration::from_secs(15));
    assert!(held >= Duration::from_millis(4800), "held only {held:?}");
    // The other path stayed up meanwhile and never logged in again.
    let p1 = &dev.paths()[1];
    assert!(
        p1.state == PathState::Up && p1.logins == 1,
        "path 1 left Up while portal 0 flapped: {:?}",
        p1.events
    );
    dev.close();
}

#[test]
fn failover_fails_back_per_mode() {
    let t = target();
    for mode in [
        Failback::Manual,
        Failback::Immediate,
        Failback::After(Duration::from_millis(1500)),
    ] {
        let dev = open(&t, 2, |c| {
            c.policy = Policy::Failover;
            c.failback = mode;
        });
        let mut q = dev.queue_pair();
        assert_eq!(io_path(&mut q), 0, "{mode:?}");
        let p0 = t.faults().portal(0);
        kill(&p0);
        wait_state(&dev, 0, PathState::Down, Duration::from_secs(5));
        assert_eq!(io_path(&mut q), 1, "{mode:?}: failed over");
        p0.accept_logins();
        wait_state(&dev, 0, PathState::Up, Duration::from_secs(5));
        let up = Instant::now();
        match mode {
            Failback::Immediate => assert_eq!(io_path(&mut q), 0, "immediate"),
            Failback::Manual => {
                for _ in 0..20 {
                    assert_eq!(io_path(&mut q), 1, "manual: stays");
                }
                dev.failback();
                assert_eq!(io_path(&mut q), 0, "manual: back on request");
            }
            Failback::After(d) => {
                assert_eq!(io_path(&mut q), 1, "not yet");
                let mut path = 1;
                while path == 1 {
                    assert!(
                        up.elapsed() < d + Duration::from_secs(3),
                        "never failed back"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                    path = io_path(&mut q);
                }
                assert!(
                    up.elapsed() >= d,
                    "failed back after only {:?}",
                    up.elapsed()
                );
            }
        }
        drop(q);
        dev.close();
    }
}

#[test]
fn no_path_retry_fail_retries_and_queue() {
    let t = target();
    let all = t.faults().all_portals();
    // Fail: at once.
    let dev = open(&t, 1, |c| {
        c.set_no_path_retry(NoPathRetry::Fail, Duration::from_secs(5))
    });
    let mut q = dev.queue_pair();
    kill(&all);
    wait_state(&dev, 0, PathState::Down, Duration::from_secs(5));
    let t0 = Instant::now();
    let mut buf = vec![0u8; 512];
    let e = q.read_at(0, &mut buf).unwrap_err();
    assert!(matches!(e, IoError::NoPath { .. }), "{e}");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        iscsi_bypass::nbd::server::errno_for(&e),
        5,
        "the NBD export answers EIO"
    );
    drop(q);
    dev.close();
    all.accept_logins();

    // N retries of the check interval: 3 × 200 ms.
    let dev = open(&t, 1, |c| {
        c.set_no_path_retry(NoPathRetry::Retries(3), Duration::from_millis(200))
    });
    let mut q = dev.queue_pair();
    kill(&all);
    wait_state(&dev, 0, PathState::Down, Duration::from_secs(5));
    let t0 = Instant::now();
    let e = q.read_at(0, &mut buf).unwrap_err();
    let waited = t0.elapsed();
    assert!(matches!(e, IoError::NoPath { .. }), "{e}");
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    drop(q);
    dev.close();
    all.accept_logins();

    // Queue: the I/O waits (here 2 s, far past any timeout) and completes
    // once a path returns.
    let dev = open(&t, 1, |c| {
        c.set_no_path_retry(NoPathRetry::Queue, Duration::from_secs(5))
    });
    let mut q = dev.queue_pair();
    kill(&all);
    wait_state(&dev, 0, PathState::Down, Duration::from_secs(5));
    q.submit(iscsi_bypass::Io::write(4, 1, vec![0x5a; 512], 9))
        .map_err(|e| e.to_string())
        .unwrap();
    let mut done = Vec::new();
    q.wait_completions(&mut done, 1, Duration::from_secs(2));
    assert!(
        done.is_empty(),
        "queued, not failed: {:?}",
        done.first().map(|c| &c.result)
    );
    all.accept_logins();
    q.wait_completions(&mut done, 1, Duration::from_secs(10));
    let c = done.pop().expect("completed once the path returned");
    c.result.expect("the queued write succeeded");
    q.read_at(4, &mut buf).unwrap();
    assert_eq!(buf, vec![0x5a; 512]);
    drop(q);
    dev.close();
}

/// Historical service time over two equal paths (two portals of one
/// embedded target): they split the reads about evenly, as queue-depth
/// does, though completions are seen late on a loaded machine.
///
/// Each portal answers 100 µs late (the target's response delay), so what
/// the selector measures is the paths' own service, not this two-core
/// host's scheduling: answering at once, an idle path's probe measured its
/// target thread waking from a blocked read (milliseconds while the busy
/// path's threads held both cores), and hst, by those figures rightly,
/// kept the load on the busy path (7 % / 93 % in CI, half the runs here).
#[test]
fn historical_service_time_splits_two_equal_paths_evenly() {
    let t = target();
    t.faults()
        .all_portals()
        .delay_responses(Duration::from_micros(100));
    let dev = open(&t, 2, |c| c.policy = Policy::HistoricalServiceTime);
    wait_state(&dev, 0, PathState::Up, Duration::from_secs(10));
    wait_state(&dev, 1, PathState::Up, Duration::from_secs(10));
    let mut q = dev.queue_pair();
    let mut per_path = [0u64; 2];
    let t0 = Instant::now();
    reads_at_qd8(&mut q, Duration::from_millis(1500), |c| {
        c.result.as_ref().expect("read");
        // The first 300 ms warm the estimates up.
        if t0.elapsed() > Duration::from_millis(300) {
            per_path[c.path.expect("a path")] += 1;
        }
    });
    let total = per_path[0] + per_path[1];
    let share = per_path[0] as f64 / total as f64;
    println!("hst over two equal paths: {per_path:?} ({share:.3} on path 0)");
    assert!(total > 100, "only {total} reads measured");
    // The failure this guards against is a collapse onto one path (over
    // 90 %). A loaded two-core machine really does starve one path's worker
    // for a while, and following that is what the selector is for (CI saw
    // 0.734), so the band is wide.
    assert!(
        (0.2..=0.8).contains(&share),
        "equal paths split {per_path:?} under historical-service-time"
    );
    drop(q);
    dev.close();
}

/// A path's historical latency is what its commands took: never less than
/// a loopback round trip. Timed at the start of the worker's round, a
/// command sent and answered within that round measured next to nothing,
/// and the estimate sank to 1 ns (hst then sent that path everything).
#[test]
fn historical_latency_is_never_below_a_round_trip() {
    let floor_before = loopback_round_trip_floor();
    let t = target();
    let dev = open(&t, 2, |c| c.policy = Policy::HistoricalServiceTime);
    wait_state(&dev, 0, PathState::Up, Duration::from_secs(10));
    wait_state(&dev, 1, PathState::Up, Duration::from_secs(10));
    let mut q = dev.queue_pair();
    let mut lowest = [u64::MAX; 2];
    let n = reads_at_qd8(&mut q, Duration::from_millis(1500), |_| {
        for p in dev.path_handles() {
            let load = p.load();
            if load.hst_latency_ns > 0 {
                lowest[load.index] = lowest[load.index].min(load.hst_latency_ns);
            }
        }
    });
    // What a bare 4 KiB request and answer over loopback TCP to another
    // thread takes at the least, on this machine now (a quiet one answers
    // an iSCSI read in ~6 µs, a loaded one in 20-30): no command can be
    // answered sooner. The mistimed estimate sank far below it (to 1 ns).
    // Taken before and after the reads, the faster counts.
    let floor = floor_before.min(loopback_round_trip_floor());
    println!(
        "lowest historical latency per path over {n} reads: {lowest:?} ns; \
         fastest bare loopback round trip {} ns",
        floor.as_nanos()
    );
    for (path, &ns) in lowest.iter().enumerate() {
        assert!(
            ns != u64::MAX && u128::from(ns) * 2 >= floor.as_nanos(),
            "path {path}'s historical latency fell to {ns} ns, under half the \
             fastest bare round trip ({floor:?})"
        );
    }
    drop(q);
    dev.close();
}

/// The fastest of 2,000 round trips of a 48-byte request and a 4,144-byte
/// answer (a read command, its Data-In) between two threads over loopback
/// TCP with blocking sockets.
fn loopback_round_trip_floor() -> Duration {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local address");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let (mut request, answer) = ([0u8; 48], vec![7u8; 4144]);
        while s.read_exact(&mut request).is_ok() {
            if s.write_all(&answer).is_err() {
                break;
            }
        }
    });
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let (request, mut answer) = ([1u8; 48], vec![0u8; 4144]);
    let mut fastest = Duration::MAX;
    for _ in 0..2000 {
        let t = Instant::now();
        c.write_all(&request).expect("send");
        c.read_exact(&mut answer).expect("receive");
        fastest = fastest.min(t.elapsed());
    }
    drop(c);
    server.join().expect("echo thread");
    fastest
}

/// 4 KiB reads, 8 in flight, for `run`; `on_completion` sees each one.
/// Returns how many were submitted.
fn reads_at_qd8(
    q: &mut IoQueue,
    run: Duration,
    mut on_completion: impl FnMut(&IoCompletion),
) -> u64 {
    let mut done = Vec::new();
    let (mut in_flight, mut n) = (0, 0u64);
    let t0 = Instant::now();
    while t0.elapsed() < run || in_flight > 0 {
        while in_flight < 8 && t0.elapsed() < run {
            q.submit(iscsi_bypass::Io::read(
                (n * 8) % 16_000,
                8,
                vec![0; 4096],
                n,
            ))
            .map_err(|e| e.to_string())
            .unwrap();
            n += 1;
            in_flight += 1;
        }
        done.clear();
        q.wait_completions(&mut done, 1, Duration::from_secs(10));
        assert!(!done.is_empty(), "no completion within 10 s");
        in_flight -= done.len();
        done.iter().for_each(&mut on_completion);
    }
    n
}
