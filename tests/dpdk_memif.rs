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

/// memif ring buffers that hold a whole MTU-9000 frame (the default is
/// 2 KiB, a jumbo frame then spans five descriptors; with those, 64 KiB
/// I/Os stalled here: see docs/dpdk.md).
const JUMBO_BUFFERS: &str = "bsize=10240";

/// The memif control socket of each test's target (per process).
fn socket(test: &str) -> String {
    format!("/run/ibx-memif-{test}{}.sock", std::process::id())
}

/// This process's EAL, with a memif client for each test's target
/// (net_memif0: MTU 1500, net_memif1: MTU 9000); a client connects when
/// its port starts, after its target (the memif server) is up.
fn this_eal() -> (Eal, Vec<String>) {
    let args = dpdk_common::eal_args_multi(&[
        &format!("net_memif0,role=client,socket={}", socket("")),
        &format!(
            "net_memif1,role=client,socket={},{JUMBO_BUFFERS}",
            socket("j")
        ),
    ]);
    println!("EAL args: {}", args.join(" "));
    (dpdk::eal(&args).expect("EAL"), args)
}

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:memif";
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const INITIATOR_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);

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

/// Jumbo frames over memif: the target (`--mtu 9000`) and two initiators at
/// MTU 9000, the CLI bench with verify and this process, whose queue is
/// wrapped to count the frames with more than 4 KiB of payload. DPDK 22.11's
/// memif reports a 1518-byte frame limit it never applies, so the MTU is
/// the stacks' own there; its ring buffers are made 10 KiB
/// (`JUMBO_BUFFERS`), one frame per descriptor.
#[test]
fn iscsi_over_memif_at_mtu_9000() {
    if let Some(why) = dpdk_common::skip_reason("net_memif") {
        return skip(&why);
    }
    let _serial = serial();
    let socket = socket("j");
    let _ = std::fs::remove_file(&socket);
    let cpus = dpdk_common::allowed_cpus();
    let _target = target_process::start_with_args(
        IQN,
        &format!("net_memif0,role=server,socket={socket},{JUMBO_BUFFERS}"),
        "net_memif0",
        TARGET_IP,
        *cpus.last().unwrap_or(&0),
        Some(socket.clone()),
        &["--mtu", "9000"],
    );
    let url = format!("iscsi://{TARGET_IP}:3260/{IQN}/0");
    let bench_eal = target_process::process_eal(
        cpus[0],
        "ibx-b",
        &format!("net_memif0,role=client,socket={socket},{JUMBO_BUFFERS}"),
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
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
}
