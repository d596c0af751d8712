//! The userspace TCP/IP stack on DPDK against Linux TCP.
//!
//! Topology (made and removed by the test): a veth pair, one end in the root
//! namespace without an IP address driven by DPDK's net_af_packet, the other
//! in a fresh network namespace with 10.231.y.1/24 where a kernel TCP echo
//! server runs (a thread that `setns`-ed into the namespace). The stack
//! (10.231.y.2) resolves the kernel with ARP, connects, and streams a
//! pattern that the kernel echoes back; every byte is compared, so each one
//! crossed both directions.
//!
//! Phases: a clean path (256 MiB each way); a path whose return leg (kernel
//! to DPDK) is rate-limited (32 MiB); then an impaired one (64 MiB). The
//! second phase fills the kernel's receive queue while its echo server is
//! blocked writing to us: its window closes and the stack probes it, and
//! every ACK of the kernel's data must still be acceptable to the kernel
//! (ones that counted the probe's refused byte were dropped as beyond the
//! window, so the echo server never got unblocked: a deadlock CI saw as "no
//! progress for 20 s" in the clean phase, once af_packet ring drops under
//! load had slowed the kernel's sending). This kernel has no netem (nor
//! prio, u32/matchall classifiers or iptables), so impairment is: `tc tbf`
//! with a short queue on both veth ends (real rate-limit tail drops by the
//! kernel: DPDK→kernel frames pass the root end's qdisc, kernel→DPDK ones
//! the namespace end's), plus seeded random loss and reordering of IPv4
//! frames in both directions by `phy::impair::Impaired` around the DPDK
//! queue.
//!
//! Not root / no af_packet plugin / no `ip`: prints SKIPPED and passes,
//! unless CI=true, where it fails.
#![cfg(feature = "dpdk")]

mod dpdk_common;

use dpdk_common::netns::{self, VethNetns};
use iscsi_bypass::phy::impair::{ImpairConfig, Impaired};
use iscsi_bypass::phy::Device;
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use iscsi_bypass::transport::user::UserTcp;
use iscsi_bypass::transport::{Transport, TransportError};
use rand::{RngCore, SeedableRng};
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ECHO_PORT: u16 = 5201;
/// Pattern period: a prime, so a misplaced chunk never lines up again.
const PERIOD: usize = 1_048_573;

fn skip(why: &str) {
    assert!(
        !dpdk_common::required(),
        "CI=true requires dpdk_interop to run, but: {why}"
    );
    println!("SKIPPED dpdk_interop: {why}");
}

fn mib_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A kernel echo server in the namespace; serves one client per entry of
/// `chunks` one after the other and returns the bytes echoed to each. It
/// reads up to the entry's chunk size (one `read` for a chunk of 256 KiB or
/// less, else until the chunk is full) and writes that back.
fn kernel_echo_server(
    bed: &VethNetns,
    chunks: Vec<usize>,
) -> std::thread::JoinHandle<Result<Vec<u64>, String>> {
    let addr = SocketAddrV4::new(bed.kernel_ip, ECHO_PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let netns = bed.netns.clone();
    let enter = move || -> Result<TcpListener, String> {
        netns::enter(&netns)?;
        TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))
    };
    let handle = std::thread::spawn(move || {
        let listener = match enter() {
            Ok(l) => {
                let _ = ready_tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        let mut echoed = Vec::new();
        for chunk in chunks {
            let (mut s, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(30))).ok();
            let mut buf = vec![0u8; chunk];
            let mut total = 0u64;
            loop {
                let mut n = 0;
                while n < chunk {
                    let got = s
                        .read(&mut buf[n..])
                        .map_err(|e| format!("read from {peer}: {e}"))?;
                    n += got;
                    if got == 0 || chunk <= 256 * 1024 {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n])
                    .map_err(|e| format!("write to {peer}: {e}"))?;
                total += n as u64;
            }
            echoed.push(total);
        }
        Ok(echoed)
    });
    ready_rx
        .recv()
        .expect("echo server thread started")
        .expect("kernel echo server listens in the namespace");
    handle
}

/// How long one phase's echo may take.
const TRANSFER_LIMIT: Duration = Duration::from_secs(60);

struct Outcome {
    elapsed: Duration,
}

/// Streams `total` bytes of the pattern and checks the echo byte for byte.
fn echo_transfer<D: Device + Send>(
    conn: &mut UserTcp<D>,
    pattern: &[u8],
    total: usize,
    limit: Duration,
    port_state: &dyn Fn() -> String,
) -> Outcome {
    let start = Instant::now();
    let mut sent = 0usize;
    let mut received = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let mut last_progress = (Instant::now(), 0usize);
    while received < total {
        conn.poll().expect("poll");
        while sent < total {
            let at = sent % PERIOD;
            let len = (PERIOD - at).min(total - sent);
            let n = conn.send(&pattern[at..at + len]).expect("send");
            if n == 0 {
                break;
            }
            sent += n;
        }
        loop {
            let n = match conn.recv(&mut buf) {
                Ok(n) => n,
                Err(e) => panic!("recv after {received} bytes: {e}"),
            };
            if n == 0 {
                break;
            }
            let mut off = 0;
            while off < n {
                let at = (received + off) % PERIOD;
                let len = (PERIOD - at).min(n - off);
                if buf[off..off + len] != pattern[at..at + len] {
                    let bad = (0..len)
                        .find(|&i| buf[off + i] != pattern[at + i])
                        .unwrap_or(0);
                    panic!("echo differs at byte {}", received + off + bad);
                }
                off += len;
            }
            received += n;
        }
        if received != last_progress.1 {
            last_progress = (Instant::now(), received);
        }
        assert!(
            last_progress.0.elapsed() < Duration::from_secs(20),
            "no progress for 20 s at {received}/{total} bytes echoed ({sent} sent); socket {:?}, iface {:?}, port {}",
            conn.socket().counters(),
            conn.interface().counters(),
            port_state()
        );
        assert!(
            start.elapsed() < limit,
            "transfer exceeded {limit:?}: {received}/{total} bytes echoed"
        );
    }
    let elapsed = start.elapsed();
    // Orderly close: our FIN, then the kernel's once it saw EOF.
    conn.close();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match conn.recv(&mut buf) {
            Err(TransportError::Closed) => break,
            Ok(0) => {}
            Ok(n) => panic!("{n} bytes after the echo was complete"),
            Err(e) => panic!("close: {e}"),
        }
        assert!(Instant::now() < deadline, "kernel never closed its side");
        conn.wait(Duration::from_millis(10)).expect("wait");
    }
    Outcome { elapsed }
}

/// A token-bucket root qdisc on `dev`: `rate`, `burst` and queue `limit`
/// as tc spells them.
fn tbf(bed: &VethNetns, in_netns: bool, dev: &str, rate: &str, burst: &str, limit: &str) {
    bed.tc(
        in_netns,
        &[
            "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst, "limit",
            limit,
        ],
    )
    .expect("tc tbf");
}

fn tc_drops(bed: &VethNetns, in_netns: bool, dev: &str) -> u64 {
    let text = bed
        .tc(in_netns, &["-s", "qdisc", "show", "dev", dev])
        .unwrap_or_default();
    text.split("dropped ")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn dpdk_stack_interop_with_linux_tcp() {
    if let Some(why) = dpdk_common::skip_reason("net_af_packet") {
        return skip(&why);
    }
    if let Some(why) = netns::missing_tools() {
        return skip(&why);
    }
    let clean_mib = mib_from_env("ISCSI_BYPASS_INTEROP_MIB", 256);
    let slow_mib = mib_from_env("ISCSI_BYPASS_INTEROP_SLOW_MIB", 32);
    let lossy_mib = mib_from_env("ISCSI_BYPASS_INTEROP_LOSSY_MIB", 64);

    let bed = VethNetns::create("ip", 231).expect("veth + netns test bed");
    let vdev = format!("net_af_packet0,iface={},qpairs=1", bed.dpdk_if);
    let args = dpdk_common::eal_args(&vdev);
    println!("EAL args: {}", args.join(" "));
    let mut options = DpdkOptions::new(args, "net_af_packet0", bed.stack_ip, 24);
    options.user.connect_timeout = Duration::from_secs(10);
    options.user.tcp.rx_buffer = 1 << 20;
    options.user.tcp.tx_buffer = 1 << 20;
    let stack = DpdkStack::open(options).expect("DPDK stack on net_af_packet0");
    println!(
        "DPDK port net_af_packet0 on {} (MAC {:02x?}), stack {} -> kernel {} in netns {}",
        bed.dpdk_if,
        stack.port().mac(),
        bed.stack_ip,
        bed.kernel_ip,
        bed.netns
    );

    let mut pattern = vec![0u8; PERIOD];
    rand::rngs::StdRng::seed_from_u64(0x1f2e_3d4c).fill_bytes(&mut pattern);
    let pattern = Arc::new(pattern);
    // The second connection's echo server writes back 8 MiB at a time:
    // while such a write is blocked on the slow return leg (phase 2), the
    // kernel reads nothing and its receive window closes.
    let server = kernel_echo_server(&bed, vec![256 << 10, 8 << 20, 256 << 10]);
    let remote = SocketAddrV4::new(bed.kernel_ip, ECHO_PORT);

    // What a stall message needs beyond the stack's counters (the port's
    // drops, the rx pool).
    let port_state = || {
        format!(
            "stats {:?}, rx pool (in use, available) {:?}",
            stack.port().stats(),
            stack.port().rx_pool_usage()
        )
    };
    // One echo of `mib` MiB over a fresh connection on queue 0, its rate
    // printed under `label`: the socket's counters after it.
    let echo_phase = |label: &str, mib: usize| {
        let total = mib << 20;
        let mut conn = stack.connect(0, remote).expect("connect over DPDK");
        let out = echo_transfer(&mut conn, &pattern, total, TRANSFER_LIMIT, &port_state);
        let counters = *conn.socket().counters();
        println!(
            "{label}: {mib} MiB each way in {:.2} s = {:.1} MB/s per direction; tcp {counters:?}",
            out.elapsed.as_secs_f64(),
            total as f64 / out.elapsed.as_secs_f64() / 1e6
        );
        counters
    };
    // Phase 1: clean path.
    echo_phase("clean", clean_mib);

    // Phase 2: the kernel->DPDK leg slowed to 100 mbit (tbf on the
    // namespace end): the echo server blocks writing an 8 MiB chunk back
    // for half a second, the kernel's receive queue fills and its window
    // closes while we still have data to send. The kernel's socket buffers
    // are capped at 1 MiB for this connection: autotuned, its receive
    // buffer may grow past what we have left to send.
    let buffers = ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"].map(|key| {
        let was = netns::run("ip", &["netns", "exec", &bed.netns, "sysctl", "-n", key])
            .expect("read a TCP buffer sysctl of the namespace");
        netns::sysctl(Some(&bed.netns), key, "4096 131072 1048576")
            .expect("cap the namespace's TCP buffers");
        (key, was.split_whitespace().collect::<Vec<_>>().join(" "))
    });
    tbf(&bed, true, &bed.kernel_if, "100mbit", "32kb", "256kb");
    let counters = echo_phase("slow return", slow_mib);
    assert!(
        counters.zero_window_probes > 0,
        "the kernel's window never closed, so this phase tested nothing: {counters:?}"
    );
    for (key, was) in &buffers {
        netns::sysctl(Some(&bed.netns), key, was).expect("restore the namespace's TCP buffers");
    }

    // Phase 3: tail drops by tbf in both kernel directions + random loss
    // and reordering in the DPDK queue.
    tbf(&bed, false, &bed.dpdk_if, "400mbit", "64kb", "96kb");
    tbf(&bed, true, &bed.kernel_if, "400mbit", "64kb", "96kb");
    let device = stack.take_queue(0, remote).expect("queue 0 again");
    let impair = ImpairConfig {
        rx_loss: 0.005,
        tx_loss: 0.005,
        rx_reorder: 0.01,
        tx_reorder: 0.01,
        seed: 7,
        ..ImpairConfig::default()
    };
    let mut conn = stack
        .connect_device(Impaired::new(device, impair), remote)
        .expect("connect over the impaired path");
    let total = lossy_mib << 20;
    let out = echo_transfer(&mut conn, &pattern, total, TRANSFER_LIMIT, &port_state);
    let impaired = conn.device().counters();
    let counters = conn.socket().counters();
    let tbf_drops = (
        tc_drops(&bed, false, &bed.dpdk_if),
        tc_drops(&bed, true, &bed.kernel_if),
    );
    println!(
        "impaired: {lossy_mib} MiB each way in {:.2} s = {:.1} MB/s per direction; \
         injected {impaired:?}; tbf drops DPDK->kernel {} kernel->DPDK {}; tcp {counters:?}",
        out.elapsed.as_secs_f64(),
        total as f64 / out.elapsed.as_secs_f64() / 1e6,
        tbf_drops.0,
        tbf_drops.1
    );
    assert!(
        impaired.rx_dropped > 0 && impaired.tx_dropped > 0 && impaired.tx_reordered > 0,
        "the impairment did something: {impaired:?}"
    );
    drop(conn);

    let echoed = server
        .join()
        .expect("echo server thread")
        .expect("echo server");
    assert_eq!(
        echoed,
        vec![
            (clean_mib << 20) as u64,
            (slow_mib << 20) as u64,
            (lossy_mib << 20) as u64
        ]
    );
}
