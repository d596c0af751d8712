//! DPDK smoke test: EAL, a mempool, one net_ring port and one queue pair;
//! frames sent on the queue come back on it (a net_ring vdev created from
//! the command line uses the same ring for its rx and tx, i.e. a loopback).
//!
//! EAL can be initialised once per process, so every DPDK check lives in
//! the single test function below (and this file is its own test binary).
//! Skips, saying why, when not root or when DPDK's PMD plugins are missing.
//! Hugepages are used when free ones exist (`--in-memory`), otherwise
//! `--no-huge -m 256`; set ISCSI_BYPASS_DPDK_NO_HUGE=1 to force the latter.
#![cfg(feature = "dpdk")]

use std::path::Path;

use iscsi_bypass::phy::dpdk::{self, Eal, Mempool, Port, PortConfig, DEFAULT_MBUF_DATA_ROOM};
use iscsi_bypass::phy::{Device, PhyError, TxOffload};

/// An EtherType from the IEEE "local experimental" range, so no stack
/// mistakes the test frames for anything.
const TEST_ETHER_TYPE: [u8; 2] = [0x88, 0xb5];

fn status_field(name: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .map(|rest| rest.trim().to_string())
}

fn running_as_root() -> bool {
    // "Uid:  real effective saved fs"
    status_field("Uid:")
        .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("HugePages_Free:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The first CPU this process may run on: EAL's main lcore must be one.
fn first_allowed_cpu() -> String {
    status_field("Cpus_allowed_list:")
        .and_then(|list| {
            list.split([',', '-'])
                .next()
                .map(|cpu| cpu.trim().to_string())
        })
        .filter(|cpu| !cpu.is_empty())
        .unwrap_or_else(|| "0".to_string())
}

fn eal_args() -> Vec<String> {
    let mut args: Vec<String> = [
        "-l",
        &first_allowed_cpu(),
        "--no-pci",
        "--vdev",
        "net_ring0",
        "-d",
        dpdk::PMD_DIR,
        "--file-prefix",
        &format!("iscsi-bypass-smoke-{}", std::process::id()),
        "--log-level",
        "lib.eal:notice",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let force_no_huge = std::env::var_os("ISCSI_BYPASS_DPDK_NO_HUGE").is_some();
    if !force_no_huge && free_hugepages() >= 64 {
        // Hugepage memory without files left in hugetlbfs.
        args.push("--in-memory".to_string());
    } else {
        args.extend(["--no-huge", "-m", "256"].map(String::from));
    }
    args
}

fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> impl FnMut(&mut [u8]) {
    move |frame: &mut [u8]| {
        assert_eq!(frame.len(), len);
        frame[0..6].copy_from_slice(&dst);
        frame[6..12].copy_from_slice(&src);
        frame[12..14].copy_from_slice(&TEST_ETHER_TYPE);
        frame[14..18].copy_from_slice(&seq.to_be_bytes());
        for (i, byte) in frame[18..].iter_mut().enumerate() {
            *byte = (i as u32).wrapping_add(seq) as u8;
        }
    }
}

fn expected_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut frame = vec![0; len];
    test_frame(dst, src, seq, len)(&mut frame);
    frame
}

/// Polls until `want` frames arrived or a generous number of empty polls.
fn receive(queue: &mut impl Device, want: usize) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    for _ in 0..100_000 {
        queue.rx_burst(want - frames.len(), &mut |frame, _meta| {
            frames.push(frame.to_vec())
        });
        if frames.len() >= want {
            break;
        }
        std::hint::spin_loop();
    }
    frames
}

#[test]
fn dpdk_net_ring_loopback() {
    if !running_as_root() {
        println!("SKIPPED dpdk_net_ring_loopback: needs root (DPDK maps memory and devices)");
        return;
    }
    if !Path::new(dpdk::PMD_DIR).join("librte_net_ring.so").exists() {
        println!(
            "SKIPPED dpdk_net_ring_loopback: no DPDK PMD plugins in {} (run scripts/setup.sh)",
            dpdk::PMD_DIR
        );
        return;
    }

    let args = eal_args();
    println!("EAL args: {}", args.join(" "));
    let eal = Eal::init(&args).expect("EAL initialises");
    assert!(Eal::init(&args).is_err(), "EAL must refuse a second init");
    assert!(Eal::get().is_some());

    let port_id = eal.port_by_name("net_ring0").expect("net_ring0 was probed");
    let pool =
        Mempool::new(&eal, "smoke_pool", 2047, 32, DEFAULT_MBUF_DATA_ROOM, -1).expect("mempool");
    let baseline_in_use = pool.in_use();
    let port = Port::start(&eal, port_id, &PortConfig::default(), pool.clone()).expect("port");
    let mut queue = port.queue(0).expect("queue 0");
    assert!(port.queue(0).is_err(), "a queue pair is handed out once");
    assert!(port.queue(1).is_err(), "only one queue pair was configured");

    let caps = queue.caps();
    println!("net_ring0 caps: {caps:?}");
    assert!(caps.max_tx_frame >= 1514);
    let (dst, src) = (caps.mac, [0x02, 0, 0, 0, 0, 0x01]);

    // A few frames of different sizes, one burst, back in order.
    let sizes = [60usize, 128, 1514];
    for (seq, &len) in sizes.iter().enumerate() {
        queue
            .tx_frame(
                len,
                TxOffload::default(),
                &mut test_frame(dst, src, seq as u32, len),
            )
            .expect("tx_frame");
    }
    assert_eq!(queue.tx_flush(), 0, "net_ring takes the whole burst");
    let frames = receive(&mut queue, sizes.len());
    assert_eq!(frames.len(), sizes.len(), "every frame comes back");
    for (seq, (&len, frame)) in sizes.iter().zip(&frames).enumerate() {
        assert_eq!(
            frame,
            &expected_frame(dst, src, seq as u32, len),
            "frame {seq}"
        );
    }

    // More than one tx batch and rx burst: tx_frame flushes when its batch
    // is full, rx_burst loops over several PMD bursts.
    let many = 300u32;
    for seq in 0..many {
        queue
            .tx_frame(
                100,
                TxOffload::default(),
                &mut test_frame(dst, src, seq, 100),
            )
            .expect("tx_frame");
    }
    assert_eq!(queue.tx_flush(), 0);
    let frames = receive(&mut queue, many as usize);
    assert_eq!(frames.len(), many as usize);
    for (seq, frame) in frames.iter().enumerate() {
        assert_eq!(
            frame,
            &expected_frame(dst, src, seq as u32, 100),
            "frame {seq}"
        );
    }

    // Limits and offloads net_ring does not have are refused up front.
    let too_long = caps.max_tx_frame + 1;
    assert!(matches!(
        queue.tx_frame(too_long, TxOffload::default(), &mut |_| {}),
        Err(PhyError::FrameTooLong { .. })
    ));
    if !caps.tx_checksum {
        let checksum = TxOffload {
            ipv4_checksum: true,
            tcp_checksum: true,
            l2_len: 14,
            l3_len: 20,
            l4_len: 20,
            ..TxOffload::default()
        };
        assert!(queue.tx_frame(100, checksum, &mut |_| {}).is_err());
    }
    assert_eq!(queue.tx_pending(), 0, "refused frames are not queued");

    let stats = port.stats().expect("stats");
    println!("net_ring0 stats: {stats:?}");
    let total = sizes.len() as u64 + u64::from(many);
    assert_eq!(stats.tx_packets, total);
    assert_eq!(stats.rx_packets, total);

    // Unsent frames are freed with their queue; nothing leaks.
    queue
        .tx_frame(60, TxOffload::default(), &mut test_frame(dst, src, 0, 60))
        .expect("tx_frame");
    drop(queue);
    assert_eq!(
        pool.in_use(),
        baseline_in_use,
        "every mbuf went back to the pool"
    );
    let queue_again = port.queue(0).expect("a dropped queue can be taken again");
    drop(queue_again);
    drop(port);
    println!("dpdk_net_ring_loopback: {total} frames looped through net_ring0");
}
