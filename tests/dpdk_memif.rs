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
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::{Duration, Instant};

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
    let started = Instant::now();
    let socket = format!("/run/ibx-memif-{}.sock", std::process::id());
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
    let vdev = format!("net_memif0,role=client,socket={socket}");
    let args = dpdk_common::eal_args(&vdev);
    println!("EAL args: {}", args.join(" "));
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
