//! Write fencing against tgtd, with one path behind a pausable TCP relay.
//!
//! tgtd listens on two loopback portals, 127.0.0.1 and 127.0.0.2 (one
//! target, portal group 1 on both). Path 0 reaches 127.0.0.2 through a relay
//! written here (loopback only); path 1 goes to 127.0.0.1 directly. Under a
//! write+verify load the relay is paused: it keeps reading what both sides
//! send but holds it, as a hung portal or a stalled network would. Writes
//! caught in path 0's session must complete on path 1 only after the fence
//! (a login with path 0's ISID through 127.0.0.1, which makes tgtd end path
//! 0's session: RFC 7143 §6.3.5). The relay then delivers what it held (a
//! hung portal that wakes up) or never does (a dead link, delivered at the
//! very end): the held write arrives after tgtd ended its session, so it is
//! refused (tgtd had closed that connection), and every block reads back
//! the newest generation acknowledged. The load stops before the relay
//! resumes, so a late write that did run would show. A third run with fencing off shows
//! the late write landing on newer data: what the test guards against.
//!
//! Each run prints `RESULT case=... max_stall_ms=...`: the longest time a
//! write waited after the relay was paused (`bench/multipath.sh` collects
//! these lines). Needs root and tgtd: skipped with a reason otherwise,
//! failed when CI=true.

#[path = "common/chunks.rs"]
mod chunks;
mod common;

use common::{tgtd_unavailable, Tgtd, TgtdOptions};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::worker::{DeviceConfig, IdleMode, Io, PathConfig, Policy, WorkerDevice};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INITIATOR: &str = "iqn.2026-12.org.iscsi-bypass:relay-test";
/// tgtd tests share the two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------ relay

/// One relayed connection, as the test sees it.
#[derive(Debug, Default)]
struct ConnRecord {
    /// Bytes from the initiator held when the relay resumed.
    held_at_resume: AtomicU64,
    /// tgtd closed its side while the relay held the initiator's bytes
    /// (what reinstatement does to the old session's connection).
    upstream_closed_while_paused: AtomicBool,
    /// Whether the upstream end had been closed by tgtd when the held bytes
    /// went out.
    delivered_to_closed: AtomicBool,
}

#[derive(Default)]
struct RelayState {
    paused: AtomicBool,
    /// While paused, discard instead of holding (a dead link).
    discard: AtomicBool,
    stop: AtomicBool,
    /// When the relay was paused.
    paused_at: Mutex<Option<Instant>>,
    conns: Mutex<Vec<Arc<ConnRecord>>>,
}

/// A TCP relay on 127.0.0.1 to `upstream` that can hold the bytes of every
/// connection (both directions) and deliver them later.
struct Relay {
    addr: SocketAddr,
    state: Arc<RelayState>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listen");
        let addr = listener.local_addr().expect("relay addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(RelayState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            while !st.stop.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(up) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let rec = Arc::new(ConnRecord::default());
                        if let Ok(mut c) = st.conns.lock() {
                            c.push(rec.clone());
                        }
                        for (src, dst, to_target) in [
                            (client.try_clone().unwrap(), up.try_clone().unwrap(), true),
                            (up, client, false),
                        ] {
                            let (st, rec) = (st.clone(), rec.clone());
                            std::thread::spawn(move || pump(src, dst, to_target, &st, &rec));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        });
        Relay { addr, state }
    }

    fn pause(&self, discard: bool) -> Instant {
        let now = Instant::now();
        self.state.discard.store(discard, Ordering::Release);
        *self.state.paused_at.lock().unwrap() = Some(now);
        self.state.paused.store(true, Ordering::Release);
        now
    }

    fn resume(&self) {
        self.state.paused.store(false, Ordering::Release);
    }

    fn conns(&self) -> Vec<Arc<ConnRecord>> {
        self.state.conns.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Release);
        self.state.paused.store(false, Ordering::Release);
    }
}

/// Copies `src` to `dst`; while the relay is paused, what it reads is held
/// (and an end of stream too) until it resumes.
fn pump(
    mut src: TcpStream,
    mut dst: TcpStream,
    to_target: bool,
    st: &RelayState,
    rec: &ConnRecord,
) {
    let _ = src.set_read_timeout(Some(Duration::from_millis(5)));
    let mut buf = vec![0u8; 256 << 10];
    let mut held: Vec<u8> = Vec::new();
    let mut eof = false;
    let mut was_paused = false;
    loop {
        if st.stop.load(Ordering::Acquire) {
            break;
        }
        if !eof {
            match src.read(&mut buf) {
                Ok(0) => eof = true,
                Ok(n) => held.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => eof = true,
            }
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
        let paused = st.paused.load(Ordering::Acquire);
        if paused {
            was_paused = true;
            if st.discard.load(Ordering::Acquire) {
                held.clear();
            }
            if eof && !to_target {
                // tgtd closed the connection while its initiator's bytes
                // were held.
                rec.upstream_closed_while_paused
                    .store(true, Ordering::Release);
            }
            continue;
        }
        if was_paused && to_target {
            was_paused = false;
            rec.held_at_resume
                .fetch_add(held.len() as u64, Ordering::AcqRel);
            if !held.is_empty() && rec.upstream_closed_while_paused.load(Ordering::Acquire) {
                rec.delivered_to_closed.store(true, Ordering::Release);
            }
        }
        if !held.is_empty() {
            if dst.write_all(&held).is_err() {
                break;
            }
            held.clear();
        }
        if eof {
            let _ = dst.shutdown(Shutdown::Write);
            break;
        }
    }
}

// --------------------------------------------------------------- workload

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// The relay holds for 3 s, then delivers (a hung portal that wakes up).
    Hung,
    /// The relay discards everything from then on (a dead link).
    Dead,
    /// As `Hung`, with fencing off.
    Unfenced,
}

struct Outcome {
    writes: u64,
    errors: u64,
    mismatches: u64,
    failed_over: u64,
    max_stall: Duration,
    conns: Vec<Arc<ConnRecord>>,
}

fn run(case: Case) -> Option<Outcome> {
    if tgtd_unavailable().is_some() {
        return None;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tgtd = Tgtd::start(TgtdOptions::two_portals("127.0.0.1", "127.0.0.2", 16 << 20));
    let relay = Relay::start(format!("127.0.0.2:{}", tgtd.port).parse().unwrap());
    let direct: SocketAddr = format!("127.0.0.1:{}", tgtd.port).parse().unwrap();
    let login = LoginConfig::new(INITIATOR, Some(&tgtd.iqn));
    let paths = vec![
        PathConfig::kernel(relay.addr, None, login.clone()),
        PathConfig::kernel(direct, None, login),
    ];
    // Default detection and fencing settings; only the workers nap instead
    // of busy-polling (the test machine's cores are shared).
    let mut config = DeviceConfig::new(paths, 1);
    config.policy = Policy::QueueDepth;
    config.idle = IdleMode::Sleep(Duration::from_micros(50));
    config.fence_writes = case != Case::Unfenced;
    let dev = WorkerDevice::open(config).expect("open both paths");
    let mut q = dev.queue_pair();

    const CHUNK_BLOCKS: u32 = 8;
    const CHUNKS: u64 = 256;
    let chunk = CHUNK_BLOCKS as usize * dev.block_size() as usize;
    let qd = 8;
    let mut free: Vec<Vec<u8>> = (0..qd).map(|_| vec![0u8; chunk]).collect();
    let mut generation = vec![0u32; CHUNKS as usize];
    let mut pending = vec![0u32; CHUNKS as usize];
    let mut in_flight = vec![false; CHUNKS as usize];
    let mut submitted_at = vec![Instant::now(); CHUNKS as usize];
    let (pause_after, hold) = (Duration::from_secs(1), Duration::from_secs(3));
    // The load stops when the relay resumes: a late write that ran would
    // not be overwritten again.
    let run_for = pause_after + hold;
    let start = Instant::now();
    let mut paused_at: Option<Instant> = None;
    let mut next = 0u64;
    let (mut writes, mut errors, mut failed_over) = (0u64, 0u64, 0u64);
    let mut max_stall = Duration::ZERO;
    let mut out = Vec::new();
    loop {
        let t = start.elapsed();
        if paused_at.is_none() && t >= pause_after {
            paused_at = Some(relay.pause(case == Case::Dead));
        }
        let running = t < run_for;
        while running && !free.is_empty() {
            let c = next % CHUNKS;
            next += 1;
            if in_flight[c as usize] {
                continue;
            }
            let mut buf = free.pop().unwrap();
            let g = generation[c as usize] + 1;
            chunks::stamp(&mut buf, c as usize, g);
            pending[c as usize] = g;
            match q.submit(Io::write(c * u64::from(CHUNK_BLOCKS), CHUNK_BLOCKS, buf, c)) {
                Ok(()) => {
                    in_flight[c as usize] = true;
                    submitted_at[c as usize] = Instant::now();
                }
                Err(e) => {
                    free.push(e.into_io().buffer);
                    next -= 1;
                    break;
                }
            }
        }
        if !running && q.in_flight() == 0 {
            break;
        }
        out.clear();
        q.wait_completions(&mut out, 1, Duration::from_millis(10));
        let now = Instant::now();
        for c in out.drain(..) {
            let i = c.user_tag as usize;
            writes += 1;
            in_flight[i] = false;
            if let Some(p) = paused_at {
                // How long this write waited since the path hung (or since
                // it was submitted, if later).
                max_stall = max_stall.max(now - submitted_at[i].max(p));
            }
            if c.retries > 0 {
                failed_over += 1;
            }
            match &c.result {
                Ok(()) => generation[i] = pending[i],
                Err(e) => {
                    errors += 1;
                    eprintln!("write error: {e}");
                }
            }
            free.push(c.buffer);
        }
    }
    if case != Case::Dead {
        // The portal wakes up: what it held arrives now.
        relay.resume();
    }
    // Give a late write the time to land if tgtd would still run it.
    std::thread::sleep(Duration::from_millis(1000));
    let lost = chunks::mismatches(&mut q, CHUNK_BLOCKS, &generation);
    for m in lost.iter().take(3) {
        eprintln!(
            "chunk {}: generation {}, acknowledged {}",
            m.chunk, m.found, m.acknowledged
        );
    }
    let mismatches = lost.len() as u64;
    let conns = relay.conns();
    let name = match case {
        Case::Hung => "hung_path",
        Case::Dead => "dead_link",
        Case::Unfenced => "hung_path_unfenced",
    };
    let held: u64 = conns
        .iter()
        .map(|c| c.held_at_resume.load(Ordering::Acquire))
        .sum();
    let refused = conns
        .iter()
        .filter(|c| c.delivered_to_closed.load(Ordering::Acquire))
        .count();
    println!(
        "RESULT case={name} target=tgtd max_stall_ms={} writes={writes} errors={errors} mismatches={mismatches} failed_over={failed_over} held_bytes={held} held_conns_closed_by_target={refused}",
        max_stall.as_millis()
    );
    for p in dev.paths() {
        println!(
            "path {} {:?} commands {} resubmitted {} logins {} events {:?}",
            p.name,
            p.state,
            p.commands,
            p.resubmitted,
            p.logins,
            p.events
                .iter()
                .map(|e| (e.since_open, e.state, e.reason.clone()))
                .collect::<Vec<_>>()
        );
    }
    drop(q);
    drop(dev);
    Some(Outcome {
        writes,
        errors,
        mismatches,
        failed_over,
        max_stall,
        conns,
    })
}

/// The connection that carried path 0's session when the relay paused: it
/// held initiator bytes (the write, or at least a ping) when it resumed,
/// and tgtd had closed it by then (ended by the fence login).
fn check_fenced(o: &Outcome, held_bytes: bool) {
    assert_eq!(o.errors, 0, "no write may fail");
    assert_eq!(
        o.mismatches, 0,
        "every block reads back its newest generation"
    );
    assert!(o.writes > 100, "the load ran ({} writes)", o.writes);
    assert!(
        o.failed_over > 0,
        "some writes were caught on the paused path"
    );
    let held: Vec<_> = o
        .conns
        .iter()
        .filter(|c| !held_bytes || c.held_at_resume.load(Ordering::Acquire) > 0)
        .collect();
    assert!(!held.is_empty(), "the relay held initiator bytes");
    assert!(
        held.iter()
            .any(|c| c.upstream_closed_while_paused.load(Ordering::Acquire)),
        "tgtd closed the paused session's connection (reinstatement through the other portal) before the held bytes arrived"
    );
    // Writes did not wait for the paused portal to return (fence_timeout is
    // 30 s, the pause 3 s or for ever): they were fenced through the other
    // portal. No timing is asserted: bench/multipath.sh reports max_stall.
    let _ = o.max_stall;
}

#[test]
fn hung_portal_is_fenced_through_the_other_portal_and_its_late_write_is_refused() {
    if let Some(o) = run(Case::Hung) {
        check_fenced(&o, true);
    }
}

#[test]
fn dead_link_is_fenced_through_the_other_portal_and_writes_complete_there() {
    if let Some(o) = run(Case::Dead) {
        check_fenced(&o, false);
    }
}

/// The control: without fencing a write caught on the paused path is retried
/// on the other at once, acknowledged, overwritten by a newer generation,
/// and then the held copy arrives and runs (nothing ended its session).
#[test]
fn without_fencing_the_held_write_lands_on_newer_data() {
    // The hazard needs a write's data among the held bytes; a pause that
    // catches only headers or pings shows nothing, so up to three tries.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let Some(o) = run(Case::Unfenced) else { return };
        assert_eq!(o.errors, 0);
        assert!(o.failed_over > 0, "writes were caught on the paused path");
        if o.mismatches > 0 {
            return;
        }
        seen.push(
            o.conns
                .iter()
                .map(|c| c.held_at_resume.load(Ordering::Acquire))
                .sum::<u64>(),
        );
    }
    panic!("the late copy of a retried write never overwrote a newer generation (held bytes per try: {seen:?})");
}
