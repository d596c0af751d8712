//! Bulk transfer between two userspace stacks over the in-memory link
//! (`phy::sim`, virtual time, no loss): the CPU cost of the TCP/IP stack
//! alone. `bench/net-stack.sh` runs it under callgrind for instructions per
//! segment; on its own it prints throughput.
//!
//! Usage: stack_bulk [MIB] [--offload]   (default 64 MiB, offloads off)

use iscsi_bypass::net::{Instant, Interface, InterfaceConfig, OffloadConfig, TcpConfig, TcpState};
use iscsi_bypass::phy::sim::{self, SimConfig};
use iscsi_bypass::phy::Device;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mib: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(64);
    let offload = args.iter().any(|a| a == "--offload");
    let total = mib << 20;
    let link = SimConfig {
        delay: Duration::from_micros(20),
        rx_checksum: offload,
        tx_checksum: offload,
        tso: false,
        ..SimConfig::default()
    };
    let (mut dev_a, mut dev_b) = sim::link(link, 1);
    let tcp = TcpConfig {
        rx_buffer: 1 << 20,
        tx_buffer: 1 << 20,
        ..TcpConfig::default()
    };
    let make = |ip, seed, dev: &sim::SimDevice| {
        let mut c = InterfaceConfig::new(ip, 24);
        c.seed = seed;
        c.tcp = tcp.clone();
        c.offload = if offload {
            OffloadConfig {
                tso: false,
                ..OffloadConfig::default()
            }
        } else {
            OffloadConfig::NONE
        };
        Interface::new(c, dev.caps())
    };
    let mut a = make(A, 1, &dev_a);
    let mut b = make(B, 2, &dev_b);
    let ha = a.add_socket(None);
    let hb = b.add_socket(None);
    b.listen(hb, 5001).expect("listen");
    let mut now = Instant::ZERO;
    a.connect(now, ha, SocketAddrV4::new(B, 5001))
        .expect("connect");

    let chunk = vec![0x5au8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut received) = (0usize, 0usize);
    let wall = std::time::Instant::now();
    while received < total {
        dev_a.set_now(now);
        a.poll(now, &mut dev_a);
        b.poll(now, &mut dev_b);
        let sa = a.socket_mut(ha);
        if sa.state() == TcpState::Established {
            while sent < total {
                let n = sa
                    .send_slice(&chunk[..chunk.len().min(total - sent)])
                    .unwrap_or(0);
                if n == 0 {
                    break;
                }
                sent += n;
            }
        }
        let sb = b.socket_mut(hb);
        while let Ok(n) = sb.recv_slice(&mut buf) {
            if n == 0 {
                break;
            }
            received += n;
        }
        a.poll(now, &mut dev_a);
        b.poll(now, &mut dev_b);
        let next = [a.poll_at(now), b.poll_at(now), dev_a.next_arrival()]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(t) if t > now => now = t,
            _ => now += Duration::from_micros(1),
        }
    }
    let secs = wall.elapsed().as_secs_f64();
    let ca = a.socket(ha).counters();
    let cb = b.socket(hb).counters();
    let segments = ca.segments_out + cb.segments_out;
    println!(
        "stack_bulk: {mib} MiB in {secs:.3} s wall = {:.1} MB/s (both stacks on one core, checksums {}), \
         segments: data {} + acks {} = {segments}, retransmits {}",
        total as f64 / secs / 1e6,
        if offload { "offloaded" } else { "in software" },
        ca.segments_out,
        cb.segments_out,
        ca.retransmitted_segments
    );
    println!(
        "segments_total={segments} data_segments={}",
        ca.segments_out
    );
}
