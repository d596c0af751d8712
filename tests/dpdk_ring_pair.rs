//! The embedded target and the initiator in one process, each on its own
//! userspace stack and DPDK port, the two ports joined back to back by a
//! pair of crossed rte_rings (`Eal::ring_pair`): the whole DPDK data path
//! (mbufs, bursts, the stack, iSCSI on both sides) with no kernel and no
//! second process. Login, READ CAPACITY, 1 MiB and 4 KiB writes read back.
//!
//! Not root / no net_ring plugin: SKIPPED, unless CI=true.
#![cfg(feature = "dpdk")]

mod common;
mod dpdk_common;

use iscsi_bypass::phy::dpdk::Eal;
use iscsi_bypass::phy::{ChecksumMode, Device};
use iscsi_bypass::target::{LunConfig, Target, TargetConfig};
use iscsi_bypass::transport::dpdk::{self, DpdkOptions, DpdkStack};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// EAL for this binary, whichever test comes first (they run in parallel).
fn eal(args: &[String]) -> Eal {
    static FIRST: Mutex<()> = Mutex::new(());
    let _one_at_a_time = FIRST.lock().unwrap_or_else(|e| e.into_inner());
    dpdk::eal(args).expect("EAL")
}

const IQN: &str = "iqn.2026-11.org.iscsi-bypass:ring-pair";

#[test]
fn iscsi_over_a_net_ring_pair_in_one_process() {
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        assert!(
            !common::required(),
            "CI=true requires dpdk_ring_pair to run, but: {why}"
        );
        println!("SKIPPED dpdk_ring_pair: {why}");
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = eal(&args);
    let (a, b) = eal.ring_pair("ibxta", "ibxia").expect("ring pair");
    assert_ne!(a, b);
    let names = eal.port_names();
    assert!(
        names.iter().any(|n| n == "net_ring_ibxta") && names.iter().any(|n| n == "net_ring_ibxia"),
        "{names:?}"
    );
    let target_ip = Ipv4Addr::new(10, 216, 0, 1);
    let target_stack = DpdkStack::open(DpdkOptions::new(
        args.clone(),
        "net_ring_ibxta",
        target_ip,
        24,
    ))
    .expect("target's stack");
    let initiator_stack = DpdkStack::open(DpdkOptions::new(
        args,
        "net_ring_ibxia",
        Ipv4Addr::new(10, 216, 0, 2),
        24,
    ))
    .expect("initiator's stack");
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 32 << 20));
    let target = Target::start_on_dpdk(config, &target_stack, 0).expect("target on DPDK");

    // Ring ports have no MAC of their own; the stacks make up distinct ones.
    assert_ne!(target_stack.mac(), initiator_stack.mac());
    let transport = initiator_stack
        .connect(0, SocketAddrV4::new(target_ip, 3260))
        .expect("TCP over the ring pair");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:ring-test",
        IQN,
        32 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0x41, &[(4, 1 << 20), (32, 4096)]);
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    target.stop();
}

/// Jumbo frames: both ports at MTU 9000 (mbufs of 9 KiB + headroom), so
/// the stacks' MSS is 8960 and each 1 MiB transfer moves in ~117 segments
/// of 8948 payload bytes (timestamps on) instead of ~725 of 1448. The
/// initiator's queue is wrapped to count the frames longer than 4 KiB of
/// payload in each direction; every write is read back byte for byte.
#[test]
fn iscsi_over_a_net_ring_pair_at_mtu_9000() {
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        assert!(
            !common::required(),
            "CI=true requires dpdk_ring_pair to run, but: {why}"
        );
        println!("SKIPPED dpdk_ring_pair (MTU 9000): {why}");
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = eal(&args);
    eal.ring_pair("ibxjt", "ibxji").expect("ring pair");
    let target_ip = Ipv4Addr::new(10, 217, 0, 1);
    let jumbo = |port: &str, ip: Ipv4Addr| {
        let mut options = DpdkOptions::new(args.clone(), port, ip, 24);
        options.port_config.mtu = Some(9000);
        DpdkStack::open(options).expect("stack at MTU 9000")
    };
    let target_stack = jumbo("net_ring_ibxjt", target_ip);
    let initiator_stack = jumbo("net_ring_ibxji", Ipv4Addr::new(10, 217, 0, 2));
    assert_eq!(initiator_stack.port().mtu(), 9000);
    assert_eq!(target_stack.port().mtu(), 9000);
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 32 << 20));
    let target = Target::start_on_dpdk(config, &target_stack, 0).expect("target on DPDK");

    let remote = SocketAddrV4::new(target_ip, 3260);
    let queue = initiator_stack.take_queue(0, remote).expect("queue 0");
    let caps = queue.caps();
    assert_eq!(caps.mtu, 9000);
    assert!(caps.max_tx_frame >= 9014, "{caps:?}");
    let (device, frames) = dpdk_common::FrameSizes::wrap(queue, 54 + 4096);
    let transport = initiator_stack
        .connect_device(device, remote)
        .expect("TCP over the ring pair at MTU 9000");
    assert_eq!(transport.interface().mtu(), 9000);
    let mss = transport.socket().effective_mss();
    assert!((8948..=8960).contains(&mss), "MSS {mss} at MTU 9000");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:ring-jumbo",
        IQN,
        32 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0x9000, &[(4, 1 << 20), (16, 4096), (8, 65536)]);
    let (rx_big, tx_big, rx_max, tx_max) = frames.get();
    println!(
        "frames over 4 KiB of payload: rx {rx_big} (max {rx_max} B), tx {tx_big} (max {tx_max} B)"
    );
    // 4 MiB + 512 KiB each way in segments of ~8948 bytes: > 500 frames.
    assert!(rx_big >= 450 && tx_big >= 450, "rx {rx_big}, tx {tx_big}");
    assert!(rx_max > 8000 && rx_max <= 9014 && tx_max <= 9014);
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    target.stop();
}

/// A device that checks the TCP checksum of every received segment with
/// data in software (as a verifying stack would), to show whether the
/// sender computed it.
struct ChecksumProbe<D> {
    inner: D,
    data_segments: u64,
    valid: u64,
}

impl<D: Device> Device for ChecksumProbe<D> {
    fn caps(&self) -> iscsi_bypass::phy::DeviceCaps {
        self.inner.caps()
    }
    fn rx_burst(
        &mut self,
        max: usize,
        on_frame: &mut dyn FnMut(&[u8], iscsi_bypass::phy::RxMeta),
    ) -> usize {
        use iscsi_bypass::wire::tcp::Packet;
        let (data, valid) = (&mut self.data_segments, &mut self.valid);
        self.inner.rx_burst(max, &mut |frame, meta| {
            if frame.len() > 54 && frame[12..14] == [0x08, 0x00] && frame[23] == 6 {
                let ip_len = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
                let at =
                    |i: usize| Ipv4Addr::new(frame[i], frame[i + 1], frame[i + 2], frame[i + 3]);
                let (src, dst) = (at(26), at(30));
                if let Ok(tcp) = Packet::new_checked(&frame[34..14 + ip_len]) {
                    if !tcp.payload().is_empty() {
                        *data += 1;
                        *valid += u64::from(tcp.verify_checksum(src, dst));
                    }
                }
            }
            on_frame(frame, meta)
        })
    }
    fn tx_frame(
        &mut self,
        len: usize,
        offload: iscsi_bypass::phy::TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), iscsi_bypass::phy::PhyError> {
        self.inner.tx_frame(len, offload, fill)
    }
    fn tx_flush(&mut self) -> usize {
        self.inner.tx_flush()
    }
}

fn ring_stack(args: &[String], port: &str, ip: Ipv4Addr, checksum: ChecksumMode) -> Arc<DpdkStack> {
    let mut options = DpdkOptions::new(args.to_vec(), port, ip, 24);
    options.port_config.checksum = checksum;
    options.user.connect_timeout = Duration::from_secs(2);
    let stack = DpdkStack::open(options).expect("stack on a ring port");
    assert_eq!(stack.port().checksum_mode(), checksum);
    stack
}

fn skipped(what: &str) -> bool {
    if let Some(why) = dpdk_common::skip_reason("net_ring") {
        assert!(
            !common::required(),
            "CI=true requires dpdk_ring_pair to run, but: {why}"
        );
        println!("SKIPPED dpdk_ring_pair ({what}): {why}");
        return true;
    }
    false
}

/// Both ports in `ChecksumMode::Trusted` (net_ring: mbuf pointers through
/// rte_rings, nothing can garble a frame): the stacks neither compute nor
/// verify checksums, which the initiator's probe sees (the target's data
/// segments carry no valid TCP checksum), and every write reads back byte
/// for byte, 128 KiB reads included.
#[test]
fn trusted_checksums_over_a_net_ring_pair() {
    if skipped("trusted") {
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = eal(&args);
    eal.ring_pair("ibxct", "ibxci").expect("ring pair");
    let target_ip = Ipv4Addr::new(10, 218, 0, 1);
    let trusted = ChecksumMode::Trusted;
    let target_stack = ring_stack(&args, "net_ring_ibxct", target_ip, trusted);
    let initiator_stack = ring_stack(
        &args,
        "net_ring_ibxci",
        Ipv4Addr::new(10, 218, 0, 2),
        trusted,
    );
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 32 << 20));
    let target = Target::start_on_dpdk(config, &target_stack, 0).expect("target on DPDK");
    let remote = SocketAddrV4::new(target_ip, 3260);
    let queue = initiator_stack.take_queue(0, remote).expect("queue 0");
    let caps = queue.caps();
    assert!(caps.rx_checksum && caps.tx_checksum, "{caps:?}");
    let probe = ChecksumProbe {
        inner: queue,
        data_segments: 0,
        valid: 0,
    };
    let transport = initiator_stack
        .connect_device(probe, remote)
        .expect("TCP over the ring pair, trusted");
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:ring-trusted",
        IQN,
        32 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0x7c5, &[(4, 1 << 20), (32, 4096), (8, 128 << 10)]);
    let t = lun.session().transport();
    let (data, valid) = (t.device().data_segments, t.device().valid);
    let counters = t.interface().counters();
    println!("data segments received {data}, with a valid TCP checksum {valid}; {counters:?}");
    assert!(data > 3000, "{data} data segments");
    // A segment's pseudo-header sum passes as its checksum 1 time in 65536.
    assert!(valid * 100 < data, "{valid} of {data} carried a checksum");
    assert_eq!(counters.rx_tcp_checksum_errors, 0);
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    target.stop();
}

/// A trusted initiator against a target in sw mode: the target verifies,
/// the initiator's SYN carries no checksum, so the connection never comes
/// up (trusted fails closed: nothing unchecked is taken).
#[test]
fn trusted_end_cannot_connect_to_a_verifying_peer() {
    if skipped("trusted to sw") {
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = eal(&args);
    eal.ring_pair("ibxmt", "ibxmi").expect("ring pair");
    let target_ip = Ipv4Addr::new(10, 219, 0, 1);
    let target_stack = ring_stack(&args, "net_ring_ibxmt", target_ip, ChecksumMode::Sw);
    let initiator_stack = ring_stack(
        &args,
        "net_ring_ibxmi",
        Ipv4Addr::new(10, 219, 0, 2),
        ChecksumMode::Trusted,
    );
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 1 << 20));
    let target = Target::start_on_dpdk(config, &target_stack, 0).expect("target on DPDK");
    let result = initiator_stack.connect(0, SocketAddrV4::new(target_ip, 3260));
    assert!(
        result.is_err(),
        "a verifying target accepted a SYN without a checksum"
    );
    println!(
        "connect: {}",
        result.err().map(|e| e.to_string()).unwrap_or_default()
    );
    target.stop();
}

/// sw mode (the default) with the initiator's received frames garbled
/// now and then (`ImpairConfig::rx_corrupt`: one bit of a packet's last
/// byte): every garbled frame is refused by the software checksum, TCP
/// retransmits, and every write still reads back byte for byte.
#[test]
fn sw_checksums_refuse_corrupted_frames_over_a_net_ring_pair() {
    use iscsi_bypass::phy::impair::{ImpairConfig, Impaired};
    if skipped("sw, corrupted") {
        return;
    }
    let args = dpdk_common::eal_args_multi(&[]);
    let eal = eal(&args);
    eal.ring_pair("ibxst", "ibxsi").expect("ring pair");
    let target_ip = Ipv4Addr::new(10, 220, 0, 1);
    let target_stack = ring_stack(&args, "net_ring_ibxst", target_ip, ChecksumMode::Sw);
    let initiator_stack = ring_stack(
        &args,
        "net_ring_ibxsi",
        Ipv4Addr::new(10, 220, 0, 2),
        ChecksumMode::Sw,
    );
    let config = TargetConfig::new(IQN).lun(LunConfig::ram(0, 32 << 20));
    let target = Target::start_on_dpdk(config, &target_stack, 0).expect("target on DPDK");
    let remote = SocketAddrV4::new(target_ip, 3260);
    let queue = initiator_stack.take_queue(0, remote).expect("queue 0");
    let mut transport = initiator_stack
        .connect_device(Impaired::new(queue, ImpairConfig::default()), remote)
        .expect("TCP over the ring pair");
    transport.device_mut().set_config(ImpairConfig {
        rx_corrupt: 0.01,
        seed: 0xc0,
        ..ImpairConfig::default()
    });
    let mut lun = dpdk_common::login_lun(
        transport,
        "iqn.2026-11.org.iscsi-bypass:ring-corrupt",
        IQN,
        32 << 20,
    );
    dpdk_common::write_read_back(&mut lun, 0xbad, &[(4, 1 << 20), (16, 4096)]);
    let t = lun.session().transport();
    let corrupted = t.device().counters().rx_corrupted;
    let c = t.interface().counters();
    println!(
        "corrupted {corrupted}; {c:?}; tcp {:?}",
        t.socket().counters()
    );
    assert!(corrupted >= 10, "only {corrupted} frames corrupted");
    // The last byte of an IPv4 packet here is always inside its TCP segment.
    assert_eq!(c.rx_tcp_checksum_errors, corrupted, "{c:?}");
    lun.into_session()
        .logout(Duration::from_secs(5))
        .expect("logout");
    target.stop();
}
