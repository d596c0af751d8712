//! Kernel-free iSCSI: the embedded target on the userspace stack in one
//! process (`iscsi-bypass target --transport dpdk`, memif server) and the
//! initiator on the userspace stack in another (memif client), over DPDK's
//! net_memif: shared memory, no kernel on the data path on either side.
//!
//! 1. `iscsi-bypass bench --verify` (a process of its own, QD8 random
//!    read/write with every block stamped and checked) against the target;
//! 2. this process: login, READ CAPACITY, 1 MiB and 4 KiB writes at random
//!    places read back byte for byte (the target re-arms its listener, and
//!    the memif server takes a second client after the first left).
//!
//! EAL: `--no-huge` for the target (plain memory, its own --file-prefix);
//! the initiator takes the tests' usual choice. The memif control socket
//! is /run/ibx-memif-<pid>.sock. Not root / no memif plugin: SKIPPED,
//! unless CI=true.
#![cfg(feature = "dpdk")]

mod common;
mod dpdk_common;

use dpdk_common::target_process;
use iscsi_bypass::phy::dpdk::Eal;
use iscsi_bypass::phy::Device;
use iscsi_bypass::transport::dpdk::{self, DpdkOptions, DpdkStack};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One test at a time: each starts a target process with the same EAL
/// file prefix (and the bench CLI with another).
fn serial() -> MutexGuard<'static, ()> {
    static ONE: Mutex<()> = Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The memif control socket of each test's target (per process).
fn socket(test: &str) -> String {
    format!("/run/ibx-memif-{test}{}.sock", std::process::id())
}

/// This process's EAL, with a memif client for each test's target
/// (net_memif0: MTU 1500, net_memif1: MTU 9000); a client connects when
/// its port starts, after its target (the memif server) is up.
/// Two more pairs in this process for `memif_moves_frames_as_sent`: server
/// net_memif2 / client net_memif3 with memif's default 2 KiB buffers, and
/// net_memif4 / net_memif5 with 10 KiB ones.
fn this_eal() -> (Eal, Vec<String>) {
    let pair = |server: u8, sock: &str, extra: &str| {
        [
            format!(
                "net_memif{server},role=server,socket={}{extra}",
                socket(sock)
            ),
            format!(
                "net_memif{},role=client,socket={}{extra}",
                server + 1,
                socket(sock)
            ),
        ]
    };
    let mut vdevs = vec![
        format!("net_memif0,role=client,socket={}", socket("")),
        // Memif's default buffers: `with_memif_buffers` below makes them
        // hold an MTU-9000 frame, as `DpdkStack::open` does for the CLI.
        format!("net_memif1,role=client,socket={}", socket("j")),
    ];
    vdevs.extend(pair(2, "p2", ""));
    vdevs.extend(pair(4, "p4", ",bsize=10240"));
    let refs: Vec<&str> = vdevs.iter().map(String::as_str).collect();
    let args = dpdk::with_memif_buffers(&dpdk_common::eal_args_multi(&refs), "net_memif1", 9014);
    println!("EAL args: {}", args.join(" "));
    for sock in ["p2", "p4"] {
        let _ = std::fs::remove_file(socket(sock));
    }
    (dpdk::eal(&args).expect("EAL"), args)
}

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:memif";
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const INITIATOR_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);

/// The embedded target as a process of its own, memif server on a fresh
/// socket for `test`, pinned to the last allowed CPU, with `extra` target
/// options; the socket path and the allowed CPUs come back for the client.
fn memif_server_target(
    test: &str,
    extra: &[&str],
) -> (String, Vec<usize>, target_process::TargetProcess) {
    let socket = socket(test);
    let _ = std::fs::remove_file(&socket);
    let cpus = dpdk_common::allowed_cpus();
    let target = target_process::start_with_args(
        IQN,
        &format!("net_memif0,role=server,socket={socket}"),
        "net_memif0",
        TARGET_IP,
        *cpus.last().unwrap_or(&0),
        Some(socket.clone()),
        extra,
    );
    (socket, cpus, target)
}

fn skip(why: &str) {
    assert!(
        !common::required(),
        "CI=true requires dpdk_memif to run, but: {why}"
    );
    println!("SKIPPED dpdk_memif: {why}");
}

#[test]
fn iscsi_over_memif_between_two_userspace_stacks() {
    if let Some(why) = dpdk_common::skip_reason("net_memif") {
        return skip(&why);
    }
    let _serial = serial();
    let started = Instant::now();
    let socket = socket("");
    let _ = std::fs::remove_file(&socket);
    let cpus = dpdk_common::allowed_cpus();
    let target_cpu = *cpus.last().unwrap_or(&0);
    let vdev = format!("net_memif0,role=server,socket={socket}");
    let _target = target_process::start(
        IQN,
        &vdev,
        "net_memif0",
        TARGET_IP,
        target_cpu,
        Some(socket.clone()),
    );
    let url = format!("iscsi://{TARGET_IP}:3260/{IQN}/0");

    // 1. The CLI initiator in a process of its own, with verify.
    let eal = target_process::process_eal(
        cpus[0],
        "ibx-b",
        &format!("net_memif0,role=client,socket={socket}"),
    );
    let bench = Command::new(target_process::BIN)
        .args(["bench", &url, "--transport", "dpdk", "--eal", &eal])
        .args(["--dpdk-port", "net_memif0", "--local-ip"])
        .arg(format!("{INITIATOR_IP}/24"))
        .args(["--rw", "randrw", "--bs", "4k", "--iodepth", "8"])
        .args([
            "--size",
            "16m",
            "--runtime",
            "2s",
            "--verify",
            "--busy-poll",
        ])
        .output()
        .expect("run iscsi-bypass bench");
    target_process::remove_runtime_dir("ibx-b");
    let text = String::from_utf8_lossy(&bench.stdout);
    println!("bench:\n{text}{}", String::from_utf8_lossy(&bench.stderr));
    assert!(bench.status.success(), "bench over memif failed");
    assert!(text.contains("read: IOPS=") && text.contains("write: IOPS="));
    assert!(
        text.contains("busy_ns_per_io"),
        "poll-mode accounting shown"
    );

    // 2. This process as the initiator: a second memif client, a second
    // connection to the target.
    let (_, args) = this_eal();
    let stack = DpdkStack::open(DpdkOptions::new(args, "net_memif0", INITIATOR_IP, 24))
        .expect("DPDK stack on the memif client");
    let remote = SocketAddrV4::new(TARGET_IP, 3260);
    let transport = stack.connect(0, remote).expect("TCP over memif");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:memif-test",
        IQN,
        64 << 20,
    );
    let io_start = Instant::now();
    dpdk_common::write_read_back(&mut lun, 0x3e31f, &[(4, 1 << 20), (64, 4096)]);
    println!(
        "4 x 1 MiB + 64 x 4 KiB written and read back over memif in {:?}",
        io_start.elapsed()
    );
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    println!("total {:?}", started.elapsed());
}

/// `--checksum trusted` on both ends of memif (a link that cannot corrupt
/// a frame): the target and the CLI bench skip the software checksums, and
/// `--verify` checks every block of a QD8 random read/write and of 128 KiB
/// reads. Then a bench in sw mode against the trusted target: it verifies,
/// the target's frames carry no TCP checksum, so the login must fail (the
/// mode fails closed) instead of taking unchecked bytes.
#[test]
fn iscsi_over_memif_with_trusted_checksums() {
    if let Some(why) = dpdk_common::skip_reason("net_memif") {
        return skip(&why);
    }
    let _serial = serial();
    let (socket, cpus, _target) = memif_server_target("t", &["--checksum", "trusted"]);
    let url = format!("iscsi://{TARGET_IP}:3260/{IQN}/0");
    let bench = |checksum: &str, rw: &str, bs: &str, timeout: &str| {
        let eal = target_process::process_eal(
            cpus[0],
            "ibx-b",
            &format!("net_memif0,role=client,socket={socket}"),
        );
        let out = Command::new(target_process::BIN)
            .args(["--timeout", timeout])
            .args(["bench", &url, "--transport", "dpdk", "--eal", &eal])
            .args(["--dpdk-port", "net_memif0", "--checksum", checksum])
            .arg("--local-ip")
            .arg(format!("{INITIATOR_IP}/24"))
            .args(["--rw", rw, "--bs", bs, "--iodepth", "8", "--size", "16m"])
            .args(["--runtime", "1s", "--verify", "--busy-poll"])
            .output()
            .expect("run iscsi-bypass bench");
        target_process::remove_runtime_dir("ibx-b");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        println!(
            "bench --checksum {checksum} --rw {rw} --bs {bs}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = bench("trusted", "randrw", "4k", "10");
    assert!(ok, "bench over memif with trusted checksums failed");
    assert!(text.contains("read: IOPS=") && text.contains("write: IOPS="));
    let (ok, text) = bench("trusted", "randread", "128k", "10");
    assert!(ok, "128 KiB reads over memif with trusted checksums failed");
    assert!(text.contains("read: IOPS="));
    let (ok, _) = bench("sw", "randread", "4k", "3");
    assert!(
        !ok,
        "an initiator that verifies checksums logged in to a target that sends none"
    );
}

/// Jumbo frames over memif: the target (`--mtu 9000`) and two initiators at
/// MTU 9000, the CLI bench with verify (64 KiB random writes and reads) and
/// this process, whose queue is wrapped to count the frames with more than
/// 4 KiB of payload. DPDK 22.11's memif reports a 1518-byte frame limit it
/// never applies, so the MTU is the stacks' own there. No vdev names a
/// `bsize`: each side's stack gives memif buffers that hold a whole frame
/// (`with_memif_buffers`). With memif's default 2 KiB buffers, frames got
/// glued and lost (see `memif_moves_frames_as_sent`): memif never reorders,
/// so this process must see no segment out of order.
#[test]
fn iscsi_over_memif_at_mtu_9000() {
    if let Some(why) = dpdk_common::skip_reason("net_memif") {
        return skip(&why);
    }
    let _serial = serial();
    let (socket, cpus, _target) = memif_server_target("j", &["--mtu", "9000"]);
    let url = format!("iscsi://{TARGET_IP}:3260/{IQN}/0");
    let bench_eal = target_process::process_eal(
        cpus[0],
        "ibx-b",
        &format!("net_memif0,role=client,socket={socket}"),
    );
    let bench = Command::new(target_process::BIN)
        .args(["bench", &url, "--transport", "dpdk", "--eal", &bench_eal])
        .args(["--dpdk-port", "net_memif0", "--mtu", "9000", "--local-ip"])
        .arg(format!("{INITIATOR_IP}/24"))
        .args(["--rw", "randrw", "--bs", "64k", "--iodepth", "4"])
        .args(["--size", "16m", "--runtime", "1s", "--verify"])
        .output()
        .expect("run iscsi-bypass bench");
    target_process::remove_runtime_dir("ibx-b");
    let text = String::from_utf8_lossy(&bench.stdout);
    println!("bench:\n{text}{}", String::from_utf8_lossy(&bench.stderr));
    assert!(
        bench.status.success(),
        "bench over memif at MTU 9000 failed"
    );
    assert!(text.contains("read: IOPS=") && text.contains("write: IOPS="));

    let (_, args) = this_eal();
    let mut options = DpdkOptions::new(args, "net_memif1", INITIATOR_IP, 24);
    options.port_config.mtu = Some(9000);
    let stack = DpdkStack::open(options).expect("DPDK stack on the memif client");
    assert_eq!(stack.port().mtu(), 9000);
    let remote = SocketAddrV4::new(TARGET_IP, 3260);
    let queue = stack.take_queue(0, remote).expect("queue 0");
    assert!(queue.caps().max_tx_frame >= 9014, "{:?}", queue.caps());
    let (device, frames) = dpdk_common::FrameSizes::wrap(queue, 54 + 4096);
    let transport = stack
        .connect_device(device, remote)
        .expect("TCP over memif at MTU 9000");
    let mss = transport.socket().effective_mss();
    assert!((8948..=8960).contains(&mss), "MSS {mss} at MTU 9000");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:memif-jumbo",
        IQN,
        64 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0x9001, &[(4, 1 << 20), (16, 4096), (8, 65536)]);
    let (rx_big, tx_big, rx_max, tx_max) = frames.get();
    println!(
        "frames over 4 KiB of payload: rx {rx_big} (max {rx_max} B), tx {tx_big} (max {tx_max} B)"
    );
    assert!(rx_big >= 450 && tx_big >= 450, "rx {rx_big}, tx {tx_big}");
    assert!(rx_max > 8000 && rx_max <= 9014 && tx_max <= 9014);
    let chained = lun
        .session()
        .transport()
        .device()
        .inner()
        .rx_chained_frames();
    println!("frames that came chained over several mbufs: {chained}");
    let tcp = lun.session().transport().socket().counters();
    println!("TCP counters: {tcp:?}");
    assert_eq!(
        tcp.out_of_order_segments, 0,
        "memif keeps order: a segment out of order is a frame lost"
    );
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
}

/// Frames of mixed lengths (9014, 60, 4000, 60, 1514 bytes), each stamped
/// with its number and length, sent through a memif pair inside this
/// process and checked one for one at the other end. With 10 KiB buffers
/// (one frame per descriptor) every frame must arrive as sent. With the
/// default 2 KiB buffers, DPDK 22.11's net_memif spreads long frames over
/// several descriptors and leaves the NEXT flag set on reused first
/// descriptors: the count of frames that arrived glued or lost is printed
/// (what `with_memif_buffers` works around), not asserted.
#[test]
fn memif_moves_frames_as_sent() {
    if let Some(why) = dpdk_common::skip_reason("net_memif") {
        return skip(&why);
    }
    let _serial = serial();
    let (eal, _) = this_eal();
    let glued_small = send_mixed_frames(&eal, 2, "2 KiB");
    println!("2 KiB memif buffers: {glued_small} of {FRAMES} frames not received as sent");
    let glued_big = send_mixed_frames(&eal, 4, "10 KiB");
    assert_eq!(
        glued_big, 0,
        "10 KiB memif buffers: frames not received as sent"
    );
}

const FRAMES: usize = 6000;

/// Sends `FRAMES` stamped frames from net_memif<server + 1> (client) to
/// net_memif<server>; returns how many did not arrive as sent.
fn send_mixed_frames(eal: &Eal, server: u8, what: &str) -> usize {
    use iscsi_bypass::phy::dpdk::{data_room_for_mtu, Mempool, Port, PortConfig};
    use iscsi_bypass::phy::TxOffload;
    let start = |n: u8| {
        let id = eal
            .port_by_name(&format!("net_memif{n}"))
            .expect("memif port");
        let pool = Mempool::new(
            eal,
            &format!("mix{n}"),
            4095,
            64,
            data_room_for_mtu(9000),
            -1,
        )
        .expect("pool");
        let config = PortConfig {
            mtu: Some(9000),
            ..PortConfig::default()
        };
        Port::start(eal, id, &config, pool).expect("start memif port")
    };
    let rx_port = start(server);
    let tx_port = start(server + 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(rx_port.link_up() && tx_port.link_up()) {
        assert!(
            Instant::now() < deadline,
            "memif pair ({what}) did not connect"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rx = rx_port.queue(0).expect("rx queue");
    let mut tx = tx_port.queue(0).expect("tx queue");
    const SIZES: [usize; 5] = [9014, 60, 4000, 60, 1514];
    let stamp = |frame: &mut [u8], n: usize| {
        let len = frame.len() as u32;
        frame.fill(n as u8);
        frame[..6].fill(0xff);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        frame[14..18].copy_from_slice(&(n as u32).to_be_bytes());
        frame[18..22].copy_from_slice(&len.to_be_bytes());
    };
    let (mut sent, mut expected, mut bad) = (0usize, 0usize, 0usize);
    let check = |frame: &[u8], expected: &mut usize, bad: &mut usize| {
        let n = u32::from_be_bytes(frame[14..18].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(frame[18..22].try_into().unwrap()) as usize;
        if n != *expected || len != frame.len() || len != SIZES[n % SIZES.len()] {
            *bad += 1;
        }
        *expected = n + 1;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while expected < FRAMES && Instant::now() < deadline {
        while sent < FRAMES && tx.tx_pending() < 32 {
            let len = SIZES[sent % SIZES.len()];
            if tx
                .tx_frame(len, TxOffload::default(), &mut |f| stamp(f, sent))
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        tx.tx_flush();
        rx.rx_burst(64, &mut |frame, _| {
            if frame.len() < 22 {
                bad += 1;
            } else {
                check(frame, &mut expected, &mut bad);
            }
        });
    }
    // Closing these ports (both ends of a memif pair in this process) ended
    // the test binary with SIGSEGV inside DPDK 22.11 here; they live on,
    // unpolled, until the process exits.
    std::mem::forget((rx, tx, rx_port, tx_port));
    bad + FRAMES.saturating_sub(expected)
}
