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

mod dpdk_common;

use iscsi_bypass::phy::dpdk::{Eal, Mempool, Port, PortConfig, DEFAULT_MBUF_DATA_ROOM};
use iscsi_bypass::phy::{Device, PhyError, TxOffload};

/// An EtherType from the IEEE "local experimental" range, so no stack
/// mistakes the test frames for anything.
const TEST_ETHER_TYPE: [u8; 2] = [0x88, 0xb5];

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
/// The calling thread's allowed CPUs (`Cpus_allowed_list`).
fn thread_cpus() -> String {
    std::fs::read_to_string("/proc/thread-self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

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
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        println!("SKIPPED dpdk_net_ring_loopback: {why}");
        return;
    }

    let args = dpdk_common::eal_args("net_ring0");
    println!("EAL args: {}", args.join(" "));
    let cpus_before = thread_cpus();
    let eal = Eal::init(&args).expect("EAL initialises");
    // EAL pins its caller to the main lcore; Eal::init undoes that, or
    // every thread spawned later (path workers) would share one CPU.
    assert_eq!(thread_cpus(), cpus_before, "the caller's CPU set is kept");
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
    // A polling thread that did not connect registers itself on its first
    // burst, and every registered thread gives its lcore id back when it
    // exits: many more short-lived threads (a login thread per reconnect)
    // than EAL has lcores (128) each get one.
    let mut queue = queue_again;
    let threads = std::thread::spawn(move || {
        assert_eq!(iscsi_bypass::phy::dpdk::lcore_id(), u32::MAX);
        queue.rx_burst(1, &mut |_, _| {});
        let id = iscsi_bypass::phy::dpdk::lcore_id();
        assert_ne!(id, u32::MAX, "the polling thread was given an lcore id");
        (0..300)
            .map(|_| {
                std::thread::spawn(|| Eal::get().unwrap().register_current_thread())
                    .join()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    for (i, r) in threads.iter().enumerate() {
        assert!(r.is_ok(), "thread {i} of 300: {r:?}");
    }
    drop(port);
    println!("dpdk_net_ring_loopback: {total} frames looped through net_ring0");
}
