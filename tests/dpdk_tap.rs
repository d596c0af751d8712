//! DPDK against the kernel through a net_tap vdev: a TCP SYN to a closed
//! port, sent with the IPv4/TCP checksum offloads the port offers, must draw
//! a RST from the kernel, which it only sends if both checksums were right.
//!
//! Own test binary because EAL initialises once per process. Skips, saying
//! why, when not root, without /dev/net/tun or `ip`, or without the plugin.
#![cfg(feature = "dpdk")]

mod dpdk_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use iscsi_bypass::phy::dpdk::{Eal, Mempool, Port, PortConfig, DEFAULT_MBUF_DATA_ROOM};
use iscsi_bypass::phy::{Device, TxOffload};
use iscsi_bypass::transport::dpdk::{self, DpdkOptions, DpdkStack};
use iscsi_bypass::transport::Transport;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::Mutex;

/// The kernel side of each test's tap (per process, so parallel runs of
/// the binary do not collide): net_tap0 for the checksum test, net_tap1
/// for the TSO one.
fn tap_names() -> (String, String) {
    let pid = std::process::id() % 100_000;
    (format!("ibtap{pid}"), format!("ibtso{pid}"))
}

/// EAL with both taps, whichever test comes first (they run in parallel).
fn eal() -> (Eal, Vec<String>) {
    static FIRST: Mutex<()> = Mutex::new(());
    let _one_at_a_time = FIRST.lock().unwrap_or_else(|e| e.into_inner());
    let (a, b) = tap_names();
    let args = dpdk_common::eal_args_multi(&[
        &format!("net_tap0,iface={a}"),
        &format!("net_tap1,iface={b}"),
    ]);
    println!("EAL args: {}", args.join(" "));
    (dpdk::eal(&args).expect("EAL initialises"), args)
}

/// Why the tap tests cannot run here (CI=true: a failure instead).
fn tap_missing() -> Option<String> {
    if let Some(why) = dpdk_common::skip_reason("net_tap") {
        return Some(why);
    }
    if !Path::new("/dev/net/tun").exists() || ip(&["-V"]).is_err() {
        assert!(
            !dpdk_common::required(),
            "CI=true requires dpdk_net_tap to run, but it needs /dev/net/tun and iproute2"
        );
        return Some("needs /dev/net/tun and iproute2".into());
    }
    None
}

const OUR_PORT: u16 = 40_000;
/// Nothing listens here, so the kernel answers a SYN with a RST.
const CLOSED_PORT: u16 = 9;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Writes Ethernet + IPv4 + TCP SYN headers with both checksum fields left
/// for the NIC: IPv4 checksum 0, TCP checksum = the pseudo-header sum (DPDK's
/// convention for RTE_MBUF_F_TX_TCP_CKSUM).
fn write_syn(frame: &mut [u8], dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) {
    frame[0..6].copy_from_slice(&dst_mac);
    frame[6..12].copy_from_slice(&src_mac);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let tcp = &mut frame[34..54];
    tcp[0..2].copy_from_slice(&OUR_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&CLOSED_PORT.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = SYN;
    tcp[14..16].copy_from_slice(&8192u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&dst);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    tcp[16..18].copy_from_slice(&checksum(&pseudo, 0).to_be_bytes());
}

/// Fills in both checksums in software, for a port without the offloads.
fn software_checksums(frame: &mut [u8]) {
    let ip_sum = !checksum(&frame[14..34], 0);
    frame[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    let pseudo = u32::from(u16::from_be_bytes([frame[50], frame[51]]));
    frame[50..52].copy_from_slice(&[0, 0]);
    let tcp_sum = !checksum(&frame[34..54], pseudo);
    frame[50..52].copy_from_slice(&tcp_sum.to_be_bytes());
}

fn is_rst_for_us(frame: &[u8], kernel_ip: [u8; 4], our_ip: [u8; 4]) -> bool {
    frame.len() >= 54
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 6
        && frame[26..30] == kernel_ip
        && frame[30..34] == our_ip
        && u16::from_be_bytes([frame[34], frame[35]]) == CLOSED_PORT
        && u16::from_be_bytes([frame[36], frame[37]]) == OUR_PORT
        && frame[47] & RST != 0
}

#[test]
fn dpdk_net_tap_checksum_offload_reaches_the_kernel() {
    if let Some(why) = tap_missing() {
        println!("SKIPPED dpdk_net_tap: {why}");
        return;
    }
    // Per-process names and subnet so parallel runs do not collide.
    let pid = std::process::id();
    let iface = tap_names().0;
    let subnet = (pid % 250) as u8 + 1;
    let kernel_ip = [10, 251, subnet, 1];
    let our_ip = [10, 251, subnet, 2];
    let dotted = |a: [u8; 4]| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);

    let (eal, _) = eal();
    let port_id = eal.port_by_name("net_tap0").expect("net_tap0 was probed");
    let pool = Mempool::new(&eal, "tap_pool", 4095, 32, DEFAULT_MBUF_DATA_ROOM, -1).expect("pool");
    let port = Port::start(&eal, port_id, &PortConfig::default(), pool).expect("port");
    let mut queue = port.queue(0).expect("queue 0");
    let caps = queue.caps();
    println!("net_tap0 caps: {caps:?}");

    ip(&[
        "addr",
        "add",
        &format!("{}/24", dotted(kernel_ip)),
        "dev",
        &iface,
    ])
    .expect("address");
    ip(&["link", "set", &iface, "up"]).expect("link up");
    let our_mac = caps.mac;
    let mac_text = our_mac.map(|b| format!("{b:02x}")).join(":");
    // A static neighbour: the kernel answers without ARPing for us.
    ip(&[
        "neigh",
        "replace",
        &dotted(our_ip),
        "lladdr",
        &mac_text,
        "dev",
        &iface,
        "nud",
        "permanent",
    ])
    .expect("neighbour");
    let kernel_mac_text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .expect("kernel side MAC");
    let mut kernel_mac = [0u8; 6];
    for (byte, hex) in kernel_mac.iter_mut().zip(kernel_mac_text.trim().split(':')) {
        *byte = u8::from_str_radix(hex, 16).expect("hex MAC");
    }

    let offload = if caps.tx_checksum {
        TxOffload {
            ipv4_checksum: true,
            tcp_checksum: true,
            l2_len: 14,
            l3_len: 20,
            l4_len: 20,
            ..TxOffload::default()
        }
    } else {
        TxOffload::default()
    };
    let use_offload = caps.tx_checksum;
    let mut got_rst = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    // Resend every 200 ms: the first SYN may race the link coming up.
    while got_rst.is_none() && Instant::now() < deadline {
        queue
            .tx_frame(54, offload, &mut |frame| {
                write_syn(frame, kernel_mac, our_mac, our_ip, kernel_ip);
                if !use_offload {
                    software_checksums(frame);
                }
            })
            .expect("tx_frame");
        assert_eq!(queue.tx_flush(), 0);
        let resend_at = Instant::now() + Duration::from_millis(200);
        while got_rst.is_none() && Instant::now() < resend_at {
            queue.rx_burst(32, &mut |frame, meta| {
                if is_rst_for_us(frame, kernel_ip, our_ip) {
                    got_rst = Some(meta);
                }
            });
        }
    }
    let _ = ip(&["link", "set", &iface, "down"]);
    let meta = got_rst.expect("the kernel answered the SYN with a RST");
    println!(
        "net_tap0: RST received (tx checksum offload {}), rx meta {meta:?}",
        if use_offload { "on" } else { "off" }
    );
    if caps.rx_checksum {
        assert!(
            meta.ipv4_checksum_good && meta.l4_checksum_good,
            "rx checksum flags"
        );
    }
    drop(queue);
    drop(port);
}

/// TSO through `DpdkStack`: net_tap offers TCP segmentation (it cuts
/// frames in software, with DPDK's GSO library, as a NIC would in
/// hardware), so the stack hands the port frames far larger than the MTU
/// (up to ~32 KiB, from its pool of large tx buffers) and the kernel at the
/// tap's far end must receive 4 MiB intact, checksums and all (it drops
/// segments with a bad one; the connection would then stall).
#[test]
fn dpdk_stack_sends_tso_frames_through_net_tap() {
    if let Some(why) = tap_missing() {
        println!("SKIPPED dpdk_net_tap (TSO): {why}");
        return;
    }
    let pid = std::process::id();
    let iface = tap_names().1;
    let subnet = (pid % 250) as u8 + 1;
    let kernel_ip = Ipv4Addr::new(10, 252, subnet, 1);
    let our_ip = Ipv4Addr::new(10, 252, subnet, 2);
    let (_, args) = eal();
    let stack =
        DpdkStack::open(DpdkOptions::new(args, "net_tap1", our_ip, 24)).expect("stack on net_tap1");
    println!(
        "net_tap1 ({}): TSO {}, LRO {}, checksum offload (rx, tx) {:?}",
        stack.port().driver(),
        stack.port().tso(),
        stack.port().lro(),
        stack.port().checksum_offload()
    );
    assert!(stack.port().tso(), "net_tap offers TCP TSO");
    // The kernel side of a tap starts with the port's MAC; Linux ignores
    // ARP requests from its own address, so it gets another.
    ip(&["link", "set", "dev", &iface, "address", "02:69:62:74:73:6f"]).expect("kernel MAC");
    ip(&["addr", "add", &format!("{kernel_ip}/24"), "dev", &iface]).expect("address");
    ip(&["link", "set", &iface, "up"]).expect("link up");
    let listener = TcpListener::bind((kernel_ip, 0)).expect("kernel listener");
    let remote = match listener.local_addr().expect("listener address") {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let expected = data.clone();
    let reader = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).map(|_| got)
    });

    let queue = stack
        .take_queue(0, SocketAddrV4::new(kernel_ip, remote.port()))
        .expect("queue");
    assert!(
        queue.caps().tso && queue.caps().max_tx_frame > 16_000,
        "{:?}",
        queue.caps()
    );
    let (device, frames) = dpdk_common::FrameSizes::wrap(queue, 1514);
    let connected = stack.connect_device(device, SocketAddrV4::new(kernel_ip, remote.port()));
    let mut conn = connected.unwrap_or_else(|e| {
        let show = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        panic!(
            "TCP to the kernel over net_tap1: {e}\n{}{}frames seen (rx>1514, tx>1514, rx max, tx max): {:?}",
            show(&["-s", "link", "show", "dev", &iface]),
            show(&["neigh", "show", "dev", &iface]),
            frames.get()
        )
    });
    let mut sent = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent < data.len() {
        assert!(
            Instant::now() < deadline,
            "sent only {sent} of {} bytes",
            data.len()
        );
        sent += conn.send(&data[sent..]).expect("send");
        conn.poll().expect("poll");
    }
    // Until the kernel acknowledged every byte.
    while conn.socket().send_queue() > 0 {
        assert!(Instant::now() < deadline, "{:?}", conn.socket().counters());
        conn.poll().expect("poll");
    }
    conn.close();
    let close_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < close_until && !reader.is_finished() {
        let _ = conn.poll();
    }
    let got = reader.join().expect("reader thread").expect("kernel read");
    let _ = ip(&["link", "set", &iface, "down"]);
    assert!(
        got == expected,
        "the kernel got {} of {} bytes, or other bytes",
        got.len(),
        expected.len()
    );
    let (_, tx_big, _, tx_max) = frames.get();
    let tx_frames = conn.interface().counters().tx_frames;
    println!("TSO frames (> 1514 bytes) sent: {tx_big}, largest {tx_max} B; {tx_frames} frames in all for 4 MiB");
    assert!(
        tx_big > 0 && tx_max > 1514,
        "no frame beyond the MTU: TSO unused"
    );
    // MTU-sized segments would be ~2900 frames.
    assert!(tx_frames < 2900 / 2, "{tx_frames} frames");
}
