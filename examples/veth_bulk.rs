//! Bulk TCP through the same veth pair with the kernel socket path and with
//! the userspace stack on DPDK (net_af_packet on the root end); the peer is
//! kernel TCP in a network namespace this program creates (and removes).
//! Prints MB/s for upload (to a kernel sink) and download (from a kernel
//! source) for both, and the DPDK/kernel ratio. Needs root. Used by
//! `bench/net-stack.sh`.
//!
//! Usage: veth_bulk [MIB] [--no-huge]   (default 512 MiB per direction)

#[allow(dead_code)]
#[path = "../tests/dpdk_common/netns.rs"]
mod netns;

use iscsi_bypass::phy::dpdk::PMD_DIR;
use iscsi_bypass::transport::dpdk::{DpdkOptions, DpdkStack};
use iscsi_bypass::transport::{Transport, TransportError};
use netns::VethNetns;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const PORT: u16 = 5301;

/// Serves connections forever: the first byte says what to do,
/// b'U' = sink everything, b'D' = send `total` bytes and close.
fn kernel_peer(bed: &VethNetns, total: usize) {
    let netns = bed.netns.clone();
    let addr = SocketAddrV4::new(bed.kernel_ip, PORT);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        netns::enter(&netns).expect("enter netns");
        let listener = TcpListener::bind(addr).expect("bind in netns");
        tx.send(()).unwrap();
        let block = vec![0xa5u8; 256 * 1024];
        let mut buf = vec![0u8; 256 * 1024];
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut op = [0u8; 1];
            if s.read_exact(&mut op).is_err() {
                continue;
            }
            if op[0] == b'U' {
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            } else {
                let mut left = total;
                while left > 0 {
                    let n = left.min(block.len());
                    if s.write_all(&block[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
            }
        }
    });
    rx.recv().unwrap();
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn kernel_run(bed: &VethNetns, total: usize) -> (f64, f64) {
    let remote = SocketAddrV4::new(bed.kernel_ip, PORT);
    let block = vec![0x3cu8; 256 * 1024];
    let mut s = TcpStream::connect(remote).expect("kernel connect");
    s.write_all(b"U").unwrap();
    let start = Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(block.len());
        s.write_all(&block[..n]).unwrap();
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let up = mbps(total, start.elapsed());

    let mut s = TcpStream::connect(remote).expect("kernel connect");
    s.write_all(b"D").unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < total {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "kernel source closed early");
        got += n;
    }
    (up, mbps(total, start.elapsed()))
}

fn dpdk_run(stack: &DpdkStack, bed: &VethNetns, total: usize) -> (f64, f64) {
    let remote = SocketAddrV4::new(bed.kernel_ip, PORT);
    let block = vec![0x3cu8; 256 * 1024];
    let mut t = stack.connect(0, remote).expect("DPDK connect");
    while t.send(b"U").expect("send") == 0 {
        t.poll().unwrap();
    }
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        t.poll().expect("poll");
        let n = t
            .send(&block[..block.len().min(total - sent)])
            .expect("send");
        sent += n;
    }
    // Everything acknowledged.
    while t.socket().send_queue() > 0 {
        t.poll().expect("poll");
    }
    let up = mbps(total, start.elapsed());
    t.close();
    drop(t);

    let mut t = stack.connect(0, remote).expect("DPDK connect");
    while t.send(b"D").expect("send") == 0 {
        t.poll().unwrap();
    }
    let start = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < total {
        t.poll().expect("poll");
        match t.recv(&mut buf) {
            Ok(n) => got += n,
            Err(TransportError::Closed) => break,
            Err(e) => panic!("recv: {e}"),
        }
    }
    assert_eq!(got, total);
    (up, mbps(total, start.elapsed()))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(512);
    let no_huge = args.iter().any(|a| a == "--no-huge");
    let total = mib << 20;
    let bed = VethNetns::create("bk", 233).expect("veth + netns");
    kernel_peer(&bed, total);

    // Kernel path: the root end gets the address for this run only.
    let cidr = format!("{}/24", bed.stack_ip);
    netns::run("ip", &["addr", "add", &cidr, "dev", &bed.dpdk_if]).unwrap();
    let (k_up, k_down) = kernel_run(&bed, total);
    // Again without TSO/GSO/checksum offload on the root end: MTU-sized
    // segments, as the userspace stack sends over af_packet.
    netns::run(
        "ethtool",
        &["-K", &bed.dpdk_if, "tx", "off", "tso", "off", "gso", "off"],
    )
    .unwrap();
    let (m_up, m_down) = kernel_run(&bed, total);
    netns::run("ip", &["addr", "del", &cidr, "dev", &bed.dpdk_if]).unwrap();
    netns::run("ip", &["neigh", "flush", "dev", &bed.dpdk_if]).ok();

    let mut eal: Vec<String> = [
        "-l",
        "0",
        "--no-pci",
        "-d",
        PMD_DIR,
        "--file-prefix",
        &format!("veth-bulk-{}", std::process::id()),
        "--log-level",
        "lib.eal:notice",
        "--vdev",
        &format!("net_af_packet0,iface={}", bed.dpdk_if),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if no_huge {
        eal.extend(["--no-huge", "-m", "256"].map(String::from));
    } else {
        eal.push("--in-memory".into());
    }
    let mut options = DpdkOptions::new(eal, "net_af_packet0", bed.stack_ip, 24);
    options.user.tcp.rx_buffer = 1 << 20;
    options.user.tcp.tx_buffer = 1 << 20;
    let stack = DpdkStack::open(options).expect("DPDK stack");
    let (d_up, d_down) = dpdk_run(&stack, &bed, total);

    println!("veth bulk, {mib} MiB per direction, peer = kernel TCP in a netns:");
    println!(
        "  (download: the netns peer has tx checksum offload off in both runs, so MTU segments)"
    );
    println!("  kernel sockets              : upload {k_up:8.1} MB/s  download {k_down:8.1} MB/s");
    println!("  kernel, no TSO/GSO/csum off.: upload {m_up:8.1} MB/s  download {m_down:8.1} MB/s");
    println!("  DPDK af_packet + user stack : upload {d_up:8.1} MB/s  download {d_down:8.1} MB/s");
    println!(
        "  ratio DPDK/kernel           : upload {:.2}  download {:.2}",
        d_up / k_up,
        d_down / k_down
    );
    println!(
        "  ratio DPDK/kernel-no-offload: upload {:.2}  download {:.2}",
        d_up / m_up,
        d_down / m_down
    );
}
