//! Interface-level behaviour: ARP, ICMP echo, fragments, resets for closed
//! ports, static neighbours, and a bulk transfer with every offload on/off.

use iscsi_bypass::net::{Instant, Interface, InterfaceConfig, OffloadConfig, TcpState};
use iscsi_bypass::phy::sim::{self, SimConfig, SimDevice};
use iscsi_bypass::phy::{Device, TxOffload};
use iscsi_bypass::wire::arp::{self, ArpOperation, ArpRepr};
use iscsi_bypass::wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr, Frame};
use iscsi_bypass::wire::icmp::{self, Icmpv4Repr};
use iscsi_bypass::wire::ipv4::{self, protocol, Ipv4Repr};
use iscsi_bypass::wire::packet::Checksum;
use iscsi_bypass::wire::tcp::{self, SeqNumber, TcpFlags, TcpOptions, TcpRepr};
use std::net::{Ipv4Addr, SocketAddrV4};

const US: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const PEER_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x0b]);

fn setup() -> (Interface, SimDevice, SimDevice) {
    let (ours, peer) = sim::link(SimConfig::default(), 1);
    let iface = Interface::new(InterfaceConfig::new(US, 24), ours.caps());
    (iface, ours, peer)
}

/// Sends a frame from the peer and lets the interface process it.
fn inject(
    iface: &mut Interface,
    ours: &mut SimDevice,
    peer: &mut SimDevice,
    len: usize,
    fill: &mut dyn FnMut(&mut [u8]),
) {
    peer.tx_frame(len, TxOffload::default(), fill).unwrap();
    let t = ours.next_arrival().unwrap();
    ours.set_now(t);
    iface.poll(t, ours);
}

/// Frames the interface sent, after they crossed the link.
fn collect(peer: &mut SimDevice) -> Vec<Vec<u8>> {
    if let Some(t) = peer.next_arrival() {
        peer.set_now(t);
    }
    let mut frames = Vec::new();
    peer.rx_burst(64, &mut |f, _| frames.push(f.to_vec()));
    frames
}

fn ipv4_frame(
    iface: &Interface,
    proto: u8,
    payload_len: usize,
    fill_payload: impl Fn(&mut [u8]),
    frag: bool,
) -> Vec<u8> {
    let len = ethernet::HEADER_LEN + ipv4::HEADER_LEN + payload_len;
    let mut buf = vec![0u8; len];
    EthernetRepr {
        src_addr: PEER_MAC,
        dst_addr: iface.mac(),
        ethertype: EtherType::Ipv4,
    }
    .emit(&mut buf)
    .unwrap();
    let ip = Ipv4Repr {
        src_addr: PEER,
        dst_addr: US,
        protocol: proto,
        payload_len,
        ttl: 64,
        ident: 1,
        dont_frag: false,
    };
    ip.emit(&mut buf[ethernet::HEADER_LEN..], Checksum::Both)
        .unwrap();
    if frag {
        buf[ethernet::HEADER_LEN + 6] = 0x20; // more fragments
        ipv4::fill_checksum(
            &mut buf[ethernet::HEADER_LEN..ethernet::HEADER_LEN + ipv4::HEADER_LEN],
        );
    }
    fill_payload(&mut buf[ethernet::HEADER_LEN + ipv4::HEADER_LEN..]);
    buf
}

#[test]
fn answers_arp_requests_and_learns_the_sender() {
    let (mut iface, mut ours, mut peer) = setup();
    let request = ArpRepr {
        operation: ArpOperation::Request,
        source_hardware_addr: PEER_MAC,
        source_protocol_addr: PEER,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: US,
    };
    inject(&mut iface, &mut ours, &mut peer, 42, &mut |buf| {
        EthernetRepr {
            src_addr: PEER_MAC,
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EtherType::Arp,
        }
        .emit(buf)
        .unwrap();
        request.emit(&mut buf[14..]).unwrap();
    });
    let frames = collect(&mut peer);
    assert_eq!(frames.len(), 1);
    let frame = Frame::new_checked(&frames[0][..]).unwrap();
    let reply = ArpRepr::parse(&arp::Packet::new_checked(frame.payload()).unwrap()).unwrap();
    assert_eq!(reply.operation, ArpOperation::Reply);
    assert_eq!(reply.source_hardware_addr, iface.mac());
    assert_eq!(reply.target_protocol_addr, PEER);
    assert_eq!(iface.neighbour(PEER, ours.now()), Some(PEER_MAC));

    // A gratuitous ARP from a known neighbour moves it to a new MAC.
    let moved = EthernetAddress([0x02, 0, 0, 0, 0, 0x0c]);
    let gratuitous = ArpRepr {
        operation: ArpOperation::Request,
        source_hardware_addr: moved,
        source_protocol_addr: PEER,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: PEER,
    };
    inject(&mut iface, &mut ours, &mut peer, 42, &mut |buf| {
        EthernetRepr {
            src_addr: moved,
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EtherType::Arp,
        }
        .emit(buf)
        .unwrap();
        gratuitous.emit(&mut buf[14..]).unwrap();
    });
    assert!(collect(&mut peer).is_empty(), "no reply to gratuitous ARP");
    assert_eq!(iface.neighbour(PEER, ours.now()), Some(moved));
}

#[test]
fn answers_ping_and_drops_fragments() {
    let (mut iface, mut ours, mut peer) = setup();
    let echo = Icmpv4Repr::EchoRequest {
        ident: 9,
        seq_no: 3,
        data: b"ping-data",
    };
    let frame = ipv4_frame(
        &iface,
        protocol::ICMP,
        echo.buffer_len(),
        |b| echo.emit(b).unwrap(),
        false,
    );
    inject(&mut iface, &mut ours, &mut peer, frame.len(), &mut |b| {
        b.copy_from_slice(&frame)
    });
    let frames = collect(&mut peer);
    assert_eq!(frames.len(), 1);
    let eth = Frame::new_checked(&frames[0][..]).unwrap();
    let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
    assert!(ip.dont_frag() && ip.verify_checksum());
    let packet = icmp::Packet::new_checked(ip.payload()).unwrap();
    assert_eq!(
        Icmpv4Repr::parse(&packet, Checksum::Both).unwrap(),
        Icmpv4Repr::EchoReply {
            ident: 9,
            seq_no: 3,
            data: b"ping-data"
        }
    );
    assert_eq!(iface.counters().icmp_echo_replies, 1);

    let frag = ipv4_frame(
        &iface,
        protocol::ICMP,
        echo.buffer_len(),
        |b| echo.emit(b).unwrap(),
        true,
    );
    inject(&mut iface, &mut ours, &mut peer, frag.len(), &mut |b| {
        b.copy_from_slice(&frag)
    });
    assert!(collect(&mut peer).is_empty());
    assert_eq!(iface.counters().rx_fragments_dropped, 1);
}

#[test]
fn closed_port_gets_reset_and_bad_checksum_is_dropped() {
    let (mut iface, mut ours, mut peer) = setup();
    let syn = TcpRepr {
        src_port: 40000,
        dst_port: 3260,
        flags: TcpFlags {
            syn: true,
            ..Default::default()
        },
        seq_number: SeqNumber(77),
        ack_number: None,
        window_len: 1000,
        options: TcpOptions::default(),
        payload: &[],
    };
    let frame = ipv4_frame(
        &iface,
        protocol::TCP,
        syn.buffer_len(),
        |b| syn.emit(b, PEER, US, Checksum::Both).unwrap(),
        false,
    );
    let mut corrupted = frame.clone();
    *corrupted.last_mut().unwrap() ^= 0xff;
    inject(
        &mut iface,
        &mut ours,
        &mut peer,
        corrupted.len(),
        &mut |b| b.copy_from_slice(&corrupted),
    );
    assert!(collect(&mut peer).is_empty());
    assert_eq!(iface.counters().rx_tcp_checksum_errors, 1);

    inject(&mut iface, &mut ours, &mut peer, frame.len(), &mut |b| {
        b.copy_from_slice(&frame)
    });
    let frames = collect(&mut peer);
    assert_eq!(frames.len(), 1);
    let eth = Frame::new_checked(&frames[0][..]).unwrap();
    let ip = ipv4::Packet::new_checked(eth.payload()).unwrap();
    let seg = tcp::Packet::new_checked(ip.payload()).unwrap();
    let rst = TcpRepr::parse(&seg, US, PEER, Checksum::Both).unwrap();
    assert!(rst.flags.rst);
    assert_eq!(rst.ack_number, Some(SeqNumber(78)));
    assert_eq!(rst.seq_number, SeqNumber(0));
}

#[test]
fn static_neighbour_skips_arp() {
    let (ours, _peer) = sim::link(SimConfig::default(), 1);
    let mut config = InterfaceConfig::new(US, 24);
    config.static_neighbours = vec![(PEER, PEER_MAC)];
    let mut iface = Interface::new(config, ours.caps());
    let mut ours = ours;
    let h = iface.add_socket(None);
    iface
        .connect(Instant::ZERO, h, SocketAddrV4::new(PEER, 3260))
        .unwrap();
    iface.poll(Instant::ZERO, &mut ours);
    assert_eq!(iface.counters().arp_requests_sent, 0);
    assert_eq!(iface.counters().tx_frames, 1, "the SYN went straight out");
}

/// Bulk transfer on a clean link with each offload combination; TSO must
/// produce frames larger than the MTU that the simulated NIC splits.
#[test]
fn bulk_transfer_with_offload_combinations() {
    for (rx, tx, tso) in [
        (false, false, false),
        (true, true, false),
        (true, true, true),
        (false, true, true),
    ] {
        let link = SimConfig {
            rx_checksum: true,
            tx_checksum: true,
            tso: true,
            ..SimConfig::default()
        };
        let (mut a, mut b) = sim::link(link, 3);
        let offload = OffloadConfig {
            rx_checksum: rx,
            tx_checksum: tx,
            tso,
        };
        let mut ca = InterfaceConfig::new(US, 24);
        ca.offload = offload;
        let mut cb = InterfaceConfig::new(PEER, 24);
        cb.offload = offload;
        let mut ia = Interface::new(ca, a.caps());
        let mut ib = Interface::new(cb, b.caps());
        assert_eq!(ia.offload(), offload);
        let ha = ia.add_socket(None);
        let hb = ib.add_socket(None);
        ib.listen(hb, 3260).unwrap();
        ia.connect(Instant::ZERO, ha, SocketAddrV4::new(PEER, 3260))
            .unwrap();
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
        let (mut sent, mut got) = (0, Vec::new());
        let mut now = Instant::ZERO;
        for _ in 0..200_000 {
            a.set_now(now);
            ia.poll(now, &mut a);
            ib.poll(now, &mut b);
            if ia.socket(ha).state() == TcpState::Established && sent < data.len() {
                sent += ia.socket_mut(ha).send_slice(&data[sent..]).unwrap();
            }
            let mut buf = [0u8; 65536];
            if let Ok(n) = ib.socket_mut(hb).recv_slice(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            ia.poll(now, &mut a);
            ib.poll(now, &mut b);
            if got.len() == data.len() {
                break;
            }
            let next = [ia.poll_at(now), ib.poll_at(now), a.next_arrival()]
                .into_iter()
                .flatten()
                .min();
            now = next.map_or(now, |t| t.max(now));
        }
        assert!(
            got == data,
            "offload {offload:?}: got {} of {} bytes",
            got.len(),
            data.len()
        );
        let counters = ia.socket(ha).counters();
        assert_eq!(counters.retransmitted_segments, 0, "{offload:?}");
        if tso {
            // Far fewer frames than MTU-sized segments.
            assert!(
                ia.counters().tx_frames < (data.len() / 1448) as u64 / 4,
                "{offload:?}: {:?}",
                ia.counters()
            );
        }
    }
}

/// A device that hands `tx_frame`'s fill a buffer full of `poison` (as a
/// reused DPDK mbuf holds an old frame) and logs every frame it sends.
struct Poisoned {
    inner: SimDevice,
    poison: u8,
    sent: Vec<Vec<u8>>,
}

impl Device for Poisoned {
    fn caps(&self) -> iscsi_bypass::phy::DeviceCaps {
        self.inner.caps()
    }
    fn rx_burst(
        &mut self,
        max: usize,
        on_frame: &mut dyn FnMut(&[u8], iscsi_bypass::phy::RxMeta),
    ) -> usize {
        self.inner.rx_burst(max, on_frame)
    }
    fn tx_frame(
        &mut self,
        len: usize,
        offload: TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), iscsi_bypass::phy::PhyError> {
        let (poison, sent) = (self.poison, &mut self.sent);
        self.inner.tx_frame(len, offload, &mut |buf| {
            buf.fill(poison);
            fill(buf);
            sent.push(buf.to_vec());
        })
    }
    fn tx_flush(&mut self) -> usize {
        self.inner.tx_flush()
    }
}

/// Every frame the stack sends, for an ARP exchange, a handshake with all
/// options, data both ways with software checksums, and the close.
fn frames_sent_over_poisoned_buffers(poison: u8) -> Vec<Vec<u8>> {
    let (a, b) = sim::link(SimConfig::default(), 9);
    let mut a = Poisoned {
        inner: a,
        poison,
        sent: Vec::new(),
    };
    let mut b = Poisoned {
        inner: b,
        poison,
        sent: Vec::new(),
    };
    let mut ia = Interface::new(InterfaceConfig::new(US, 24), a.caps());
    let mut ib = Interface::new(InterfaceConfig::new(PEER, 24), b.caps());
    let ha = ia.add_socket(None);
    let hb = ib.add_socket(None);
    ib.listen(hb, 3260).unwrap();
    ia.connect(Instant::ZERO, ha, SocketAddrV4::new(PEER, 3260))
        .unwrap();
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 241) as u8).collect();
    let (mut sent, mut got, mut echoed) = (0, Vec::new(), Vec::new());
    let mut now = Instant::ZERO;
    for _ in 0..20_000 {
        a.inner.set_now(now);
        ia.poll(now, &mut a);
        ib.poll(now, &mut b);
        if ia.socket(ha).state() == TcpState::Established && sent < data.len() {
            sent += ia.socket_mut(ha).send_slice(&data[sent..]).unwrap();
        }
        let mut buf = [0u8; 4096];
        if let Ok(n) = ib.socket_mut(hb).recv_slice(&mut buf) {
            got.extend_from_slice(&buf[..n]);
            let _ = ib.socket_mut(hb).send_slice(&buf[..n]);
        }
        if let Ok(n) = ia.socket_mut(ha).recv_slice(&mut buf) {
            echoed.extend_from_slice(&buf[..n]);
        }
        if echoed.len() == data.len() && ia.socket(ha).may_send() {
            ia.socket_mut(ha).close();
            ib.socket_mut(hb).close();
        }
        ia.poll(now, &mut a);
        ib.poll(now, &mut b);
        if ia.socket(ha).state() == TcpState::Closed || ia.socket(ha).state() == TcpState::TimeWait
        {
            break;
        }
        let next = [ia.poll_at(now), ib.poll_at(now), a.inner.next_arrival()]
            .into_iter()
            .flatten()
            .min();
        now = next.map_or(now, |t| t.max(now));
    }
    assert!(
        echoed == data,
        "echo incomplete: {} of {}",
        echoed.len(),
        data.len()
    );
    let mut all = a.sent;
    all.extend(b.sent);
    all
}

#[test]
fn the_stack_writes_every_byte_of_its_tx_frames() {
    // What lets a device skip zeroing its tx buffers: the same exchange over
    // buffers pre-filled with 0x00 and with 0xff gives identical frames, so
    // no byte of any frame is left as the buffer held it.
    let zeroed = frames_sent_over_poisoned_buffers(0x00);
    let poisoned = frames_sent_over_poisoned_buffers(0xff);
    assert!(zeroed.len() > 40, "only {} frames", zeroed.len());
    assert_eq!(zeroed.len(), poisoned.len());
    for (i, (z, p)) in zeroed.iter().zip(&poisoned).enumerate() {
        assert!(
            z == p,
            "frame {i} keeps bytes of the old buffer:\n{z:02x?}\n{p:02x?}"
        );
    }
}
