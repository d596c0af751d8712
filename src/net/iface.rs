//! One network interface instance per worker: Ethernet, ARP, IPv4, ICMP echo
//! and the TCP sockets, driven by `poll(now, device)`.

use super::arp::ArpCache;
use super::tcp::{EmitBlocked, ProcessOutcome, TcpConfig, TcpSocket};
use super::NetError;
use crate::clock::{earliest, Instant};
use crate::phy::{Device, DeviceCaps, RxMeta, TxOffload};
use crate::wire::arp::{self as arp_wire, ArpOperation, ArpRepr};
use crate::wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr, Frame};
use crate::wire::icmp::{self, Icmpv4Repr};
use crate::wire::ipv4::{self, protocol, Ipv4Repr};
use crate::wire::packet::{Checksum, PacketError};
use crate::wire::tcp::{
    self as tcp_wire, offload_pseudo_header_checksum, SeqNumber, TcpFlags, TcpOptions, TcpRepr,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::time::Duration;

/// Which offloads the stack may use; each is used only if the device has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadConfig {
    pub rx_checksum: bool,
    pub tx_checksum: bool,
    /// TCP segmentation offload; needs `tx_checksum` as well.
    pub tso: bool,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        OffloadConfig {
            rx_checksum: true,
            tx_checksum: true,
            tso: true,
        }
    }
}

impl OffloadConfig {
    pub const NONE: OffloadConfig = OffloadConfig {
        rx_checksum: false,
        tx_checksum: false,
        tso: false,
    };
}

#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Neighbours that are never resolved with ARP.
    pub static_neighbours: Vec<(Ipv4Addr, EthernetAddress)>,
    /// MAC to use; `None` takes the device's.
    pub mac: Option<EthernetAddress>,
    /// IP MTU; `None` takes the device's.
    pub mtu: Option<usize>,
    pub offload: OffloadConfig,
    pub arp_timeout: Duration,
    pub arp_retry: Duration,
    pub ttl: u8,
    /// Seeds the RNG for ISNs, timestamp offsets and ephemeral ports.
    pub seed: u64,
    pub ephemeral_ports: RangeInclusive<u16>,
    /// Configuration of sockets created with `add_socket(None)`.
    pub tcp: TcpConfig,
}

impl InterfaceConfig {
    pub fn new(ip: Ipv4Addr, prefix_len: u8) -> InterfaceConfig {
        InterfaceConfig {
            ip,
            prefix_len,
            gateway: None,
            static_neighbours: Vec::new(),
            mac: None,
            mtu: None,
            offload: OffloadConfig::default(),
            arp_timeout: Duration::from_secs(60),
            arp_retry: Duration::from_secs(1),
            ttl: 64,
            seed: 0,
            ephemeral_ports: 49152..=65535,
            tcp: TcpConfig::default(),
        }
    }
}

/// Interface-level event counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_malformed: u64,
    pub rx_not_for_us: u64,
    pub rx_unknown_ethertype: u64,
    pub rx_ipv4_checksum_errors: u64,
    pub rx_fragments_dropped: u64,
    pub rx_unknown_protocol: u64,
    pub rx_tcp_checksum_errors: u64,
    pub rx_tcp_no_socket: u64,
    pub rx_icmp_ignored: u64,
    pub arp_requests_sent: u64,
    pub arp_replies_sent: u64,
    pub arp_learned: u64,
    /// ARP packets whose sender hardware address is not the frame's
    /// Ethernet source: dropped (a flipped bit past the NIC's FCS check
    /// would otherwise teach a wrong MAC for the neighbour's lifetime;
    /// ARP has no checksum of its own).
    pub rx_arp_mismatch: u64,
    pub icmp_echo_replies: u64,
    pub tcp_resets_sent: u64,
    pub tx_blocked_no_neighbour: u64,
    pub tx_device_errors: u64,
    pub reply_queue_full: u64,
}

/// Index of a socket inside its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketHandle(usize);

/// Replies built while receiving (the device is busy lending rx frames),
/// sent right after the rx burst. Buffers are allocated once.
#[derive(Debug)]
struct ReplyQueue {
    frames: Vec<(usize, Box<[u8]>)>,
    len: usize,
}

impl ReplyQueue {
    fn new(slots: usize, frame_len: usize) -> ReplyQueue {
        ReplyQueue {
            frames: (0..slots)
                .map(|_| (0, vec![0u8; frame_len].into_boxed_slice()))
                .collect(),
            len: 0,
        }
    }

    /// Builds a frame of `len` bytes with `fill`; false when full or too big.
    fn push(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), PacketError>,
    ) -> bool {
        let Some((slot_len, buf)) = self.frames.get_mut(self.len) else {
            return false;
        };
        let Some(frame) = buf.get_mut(..len) else {
            return false;
        };
        if fill(frame).is_err() {
            return false;
        }
        *slot_len = len;
        self.len += 1;
        true
    }
}

pub struct Interface {
    config: InterfaceConfig,
    mac: EthernetAddress,
    mtu: usize,
    caps: DeviceCaps,
    offload: OffloadConfig,
    arp: ArpCache,
    /// Last ARP request: whom and when.
    arp_pending: Option<(Ipv4Addr, Instant)>,
    sockets: Vec<TcpSocket>,
    rng: SmallRng,
    ip_ident: u16,
    replies: ReplyQueue,
    counters: InterfaceCounters,
}

impl std::fmt::Debug for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interface")
            .field("ip", &self.config.ip)
            .field("mac", &self.mac)
            .finish()
    }
}

/// Fields needed to emit a frame, borrowed apart from the sockets.
struct TxContext<'a> {
    mac: EthernetAddress,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
    ttl: u8,
    offload: OffloadConfig,
    arp: &'a mut ArpCache,
    arp_pending: &'a mut Option<(Ipv4Addr, Instant)>,
    arp_retry: Duration,
    ip_ident: &'a mut u16,
    counters: &'a mut InterfaceCounters,
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    let mask = if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

impl TxContext<'_> {
    fn next_hop(&self, dst: Ipv4Addr) -> Ipv4Addr {
        if same_subnet(dst, self.ip, self.prefix_len) {
            dst
        } else {
            self.gateway.unwrap_or(dst)
        }
    }

    /// The neighbour's MAC, or an ARP request (rate-limited) and `None`.
    fn resolve(
        &mut self,
        now: Instant,
        dst: Ipv4Addr,
        device: &mut dyn Device,
    ) -> Option<EthernetAddress> {
        let hop = self.next_hop(dst);
        if let Some(mac) = self.arp.lookup(hop, now) {
            return Some(mac);
        }
        self.counters.tx_blocked_no_neighbour += 1;
        let due = match *self.arp_pending {
            Some((ip, at)) if ip == hop => now >= at + self.arp_retry,
            _ => true,
        };
        if due {
            let repr = ArpRepr {
                operation: ArpOperation::Request,
                source_hardware_addr: self.mac,
                source_protocol_addr: self.ip,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: hop,
            };
            if send_arp(device, self.mac, EthernetAddress::BROADCAST, &repr).is_ok() {
                self.counters.arp_requests_sent += 1;
                self.counters.tx_frames += 1;
                *self.arp_pending = Some((hop, now));
            }
        }
        None
    }

    fn send_tcp(
        &mut self,
        now: Instant,
        device: &mut dyn Device,
        remote: Ipv4Addr,
        repr: &TcpRepr,
        payload: &[&[u8]],
        seg_size: usize,
    ) -> Result<(), EmitBlocked> {
        let Some(dst_mac) = self.resolve(now, remote, device) else {
            return Err(EmitBlocked);
        };
        let payload_len: usize = payload.iter().map(|p| p.len()).sum();
        let tcp_len = repr.buffer_len() + payload_len;
        let ip_repr = Ipv4Repr {
            src_addr: self.ip,
            dst_addr: remote,
            protocol: protocol::TCP,
            payload_len: tcp_len,
            ttl: self.ttl,
            ident: *self.ip_ident,
            dont_frag: true,
        };
        *self.ip_ident = self.ip_ident.wrapping_add(1);
        let tso = self.offload.tso && payload_len > seg_size;
        let csum_offload = self.offload.tx_checksum;
        let offload = TxOffload {
            ipv4_checksum: csum_offload,
            tcp_checksum: csum_offload,
            tso_segment_size: if tso { seg_size as u16 } else { 0 },
            l2_len: ethernet::HEADER_LEN as u8,
            l3_len: ipv4::HEADER_LEN as u8,
            l4_len: repr.header_len() as u8,
        };
        let eth = EthernetRepr {
            src_addr: self.mac,
            dst_addr: dst_mac,
            ethertype: EtherType::Ipv4,
        };
        let total = ethernet::HEADER_LEN + ipv4::HEADER_LEN + tcp_len;
        let csum = if csum_offload {
            Checksum::None
        } else {
            Checksum::Both
        };
        let src_ip = self.ip;
        let result = device.tx_frame(total, offload, &mut |buf: &mut [u8]| {
            let (eth_buf, rest) = buf.split_at_mut(ethernet::HEADER_LEN);
            let (ip_buf, tcp_buf) = rest.split_at_mut(ipv4::HEADER_LEN);
            // Sizes were computed from the same reprs; these cannot fail.
            let _ = eth.emit(eth_buf);
            let _ = ip_repr.emit(ip_buf, csum);
            // The one copy of the payload: from the send queue (ring bytes
            // and the caller's shared buffers) into the frame.
            let _ = repr.emit_gather(tcp_buf, payload, src_ip, remote, csum);
            if csum_offload {
                let len = if tso { None } else { Some(tcp_len) };
                tcp_wire::Packet::new_unchecked(tcp_buf)
                    .set_checksum(offload_pseudo_header_checksum(src_ip, remote, len));
            }
        });
        match result {
            Ok(()) => {
                self.counters.tx_frames += 1;
                Ok(())
            }
            Err(_) => {
                self.counters.tx_device_errors += 1;
                Err(EmitBlocked)
            }
        }
    }
}

fn send_arp(
    device: &mut dyn Device,
    src: EthernetAddress,
    dst: EthernetAddress,
    repr: &ArpRepr,
) -> Result<(), crate::phy::PhyError> {
    let eth = EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: EtherType::Arp,
    };
    device.tx_frame(
        ethernet::HEADER_LEN + arp_wire::PACKET_LEN,
        TxOffload::default(),
        &mut |buf| {
            let _ = eth.emit(buf);
            let _ = repr.emit(&mut buf[ethernet::HEADER_LEN..]);
        },
    )
}

impl Interface {
    pub fn new(config: InterfaceConfig, caps: DeviceCaps) -> Interface {
        let mac = config.mac.unwrap_or(EthernetAddress(caps.mac));
        let mtu = config.mtu.unwrap_or(caps.mtu).min(caps.mtu).max(576);
        let offload = OffloadConfig {
            rx_checksum: config.offload.rx_checksum && caps.rx_checksum,
            tx_checksum: config.offload.tx_checksum && caps.tx_checksum,
            tso: config.offload.tso && caps.tso && config.offload.tx_checksum && caps.tx_checksum,
        };
        let mut arp = ArpCache::new(16, config.arp_timeout);
        for &(ip, neighbour) in &config.static_neighbours {
            arp.insert_static(ip, neighbour);
        }
        Interface {
            rng: SmallRng::seed_from_u64(config.seed),
            replies: ReplyQueue::new(16, mtu + ethernet::HEADER_LEN),
            mac,
            mtu,
            caps,
            offload,
            arp,
            arp_pending: None,
            sockets: Vec::new(),
            ip_ident: 0,
            counters: InterfaceCounters::default(),
            config,
        }
    }

    pub fn mac(&self) -> EthernetAddress {
        self.mac
    }
    pub fn ip(&self) -> Ipv4Addr {
        self.config.ip
    }
    pub fn mtu(&self) -> usize {
        self.mtu
    }
    /// The offloads in use (configuration ∧ device capabilities).
    pub fn offload(&self) -> OffloadConfig {
        self.offload
    }
    pub fn counters(&self) -> &InterfaceCounters {
        &self.counters
    }
    pub fn neighbour(&self, ip: Ipv4Addr, now: Instant) -> Option<EthernetAddress> {
        self.arp.lookup(ip, now)
    }

    /// Creates a socket (allocates its buffers once).
    pub fn add_socket(&mut self, config: Option<TcpConfig>) -> SocketHandle {
        let mut socket = TcpSocket::new(config.unwrap_or_else(|| self.config.tcp.clone()));
        socket.set_link_limits(
            self.mtu - ipv4::HEADER_LEN - tcp_wire::HEADER_LEN,
            self.tso_payload(),
        );
        self.sockets.push(socket);
        SocketHandle(self.sockets.len() - 1)
    }

    fn tso_payload(&self) -> usize {
        if !self.offload.tso {
            return 0;
        }
        let headers = ethernet::HEADER_LEN
            + ipv4::HEADER_LEN
            + tcp_wire::HEADER_LEN
            + tcp_wire::MAX_OPTIONS_LEN;
        self.caps
            .max_tx_frame
            .saturating_sub(headers)
            .min(65535 - 100)
    }

    pub fn socket(&self, handle: SocketHandle) -> &TcpSocket {
        &self.sockets[handle.0]
    }
    pub fn socket_mut(&mut self, handle: SocketHandle) -> &mut TcpSocket {
        &mut self.sockets[handle.0]
    }
    pub fn try_socket(&self, handle: SocketHandle) -> Option<&TcpSocket> {
        self.sockets.get(handle.0)
    }

    fn port_in_use(&self, port: u16) -> bool {
        self.sockets
            .iter()
            .any(|s| s.is_open() && s.local_endpoint().port() == port)
    }

    /// Active open to `remote` from a random ephemeral port.
    pub fn connect(
        &mut self,
        now: Instant,
        handle: SocketHandle,
        remote: SocketAddrV4,
    ) -> Result<u16, NetError> {
        self.connect_from(now, handle, None, remote)
    }

    /// Active open to `remote` from `local_port` (e.g. one chosen for RSS
    /// steering), or from a random ephemeral port when None.
    pub fn connect_from(
        &mut self,
        now: Instant,
        handle: SocketHandle,
        local_port: Option<u16>,
        remote: SocketAddrV4,
    ) -> Result<u16, NetError> {
        if handle.0 >= self.sockets.len() {
            return Err(NetError::InvalidHandle);
        }
        if let Some(port) = local_port.filter(|&p| p != 0 && !self.port_in_use(p)) {
            let iss = SeqNumber(self.rng.gen());
            let ts_offset = self.rng.gen();
            let local = SocketAddrV4::new(self.config.ip, port);
            self.sockets[handle.0].connect(now, local, remote, iss, ts_offset)?;
            return Ok(port);
        }
        if local_port.is_some() {
            return Err(NetError::NoEphemeralPort);
        }
        let range = self.config.ephemeral_ports.clone();
        let span = u32::from(*range.end()).saturating_sub(u32::from(*range.start())) + 1;
        let mut port = None;
        for _ in 0..span.min(1024) {
            let candidate = (u32::from(*range.start()) + self.rng.gen_range(0..span)) as u16;
            if candidate != 0 && !self.port_in_use(candidate) {
                port = Some(candidate);
                break;
            }
        }
        let port = port.ok_or(NetError::NoEphemeralPort)?;
        let iss = SeqNumber(self.rng.gen());
        let ts_offset = self.rng.gen();
        let local = SocketAddrV4::new(self.config.ip, port);
        self.sockets[handle.0].connect(now, local, remote, iss, ts_offset)?;
        Ok(port)
    }

    /// Passive open on `port`.
    pub fn listen(&mut self, handle: SocketHandle, port: u16) -> Result<(), NetError> {
        if handle.0 >= self.sockets.len() {
            return Err(NetError::InvalidHandle);
        }
        let iss = SeqNumber(self.rng.gen());
        let ts_offset = self.rng.gen();
        self.sockets[handle.0].listen(SocketAddrV4::new(self.config.ip, port), iss, ts_offset)?;
        Ok(())
    }

    /// Sends a gratuitous ARP announcing our address.
    pub fn announce(&mut self, device: &mut dyn Device) -> Result<(), NetError> {
        let repr = ArpRepr {
            operation: ArpOperation::Request,
            source_hardware_addr: self.mac,
            source_protocol_addr: self.config.ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: self.config.ip,
        };
        send_arp(device, self.mac, EthernetAddress::BROADCAST, &repr)?;
        device.tx_flush();
        Ok(())
    }

    /// Receives a burst, runs timers and sends what is due. Returns whether
    /// any frame came in or went out.
    pub fn poll(&mut self, now: Instant, device: &mut dyn Device) -> bool {
        self.poll_with(now, device, &mut |_, _| 0)
    }

    /// [`poll`](Self::poll), offering each socket's in-order payload to
    /// `direct` straight from the received frame (see
    /// [`TcpSocket::process_with`]): `direct(handle, bytes)` returns how
    /// many bytes it took; the rest is queued in the socket's receive ring.
    pub fn poll_with(
        &mut self,
        now: Instant,
        device: &mut dyn Device,
        direct: &mut dyn FnMut(SocketHandle, &[u8]) -> usize,
    ) -> bool {
        let tx_before = self.counters.tx_frames;
        let received = device.rx_burst(32, &mut |frame, meta| {
            self.process_frame(now, frame, meta, direct)
        });
        self.flush_replies(device);

        let Interface {
            config,
            mac,
            offload,
            arp,
            arp_pending,
            sockets,
            ip_ident,
            counters,
            ..
        } = self;
        let mut ctx = TxContext {
            mac: *mac,
            ip: config.ip,
            prefix_len: config.prefix_len,
            gateway: config.gateway,
            ttl: config.ttl,
            offload: *offload,
            arp,
            arp_pending,
            arp_retry: config.arp_retry,
            ip_ident,
            counters,
        };
        for socket in sockets.iter_mut() {
            let remote = *socket.remote_endpoint().ip();
            let _ = socket.dispatch_gather(now, &mut |repr, payload, seg_size| {
                ctx.send_tcp(now, device, remote, repr, payload, seg_size)
            });
        }
        device.tx_flush();
        received > 0 || self.counters.tx_frames != tx_before
    }

    /// When `poll` should next run, if nothing arrives before.
    pub fn poll_at(&self, now: Instant) -> Option<Instant> {
        let mut at = None;
        for socket in &self.sockets {
            let Some(mut t) = socket.poll_at() else {
                continue;
            };
            let remote = *socket.remote_endpoint().ip();
            let hop = if same_subnet(remote, self.config.ip, self.config.prefix_len) {
                remote
            } else {
                self.config.gateway.unwrap_or(remote)
            };
            if !remote.is_unspecified() && self.arp.lookup(hop, now).is_none() {
                // Blocked on ARP: the next request is what can make progress.
                let retry = match self.arp_pending {
                    Some((ip, sent)) if ip == hop => sent + self.config.arp_retry,
                    _ => now,
                };
                t = t.max(retry);
            }
            at = earliest(at, Some(t));
        }
        at
    }

    fn flush_replies(&mut self, device: &mut dyn Device) {
        for (len, buf) in &self.replies.frames[..self.replies.len] {
            let frame = &buf[..*len];
            match device.tx_frame(frame.len(), TxOffload::default(), &mut |out| {
                out.copy_from_slice(frame)
            }) {
                Ok(()) => self.counters.tx_frames += 1,
                Err(_) => self.counters.tx_device_errors += 1,
            }
        }
        self.replies.len = 0;
    }

    fn process_frame(
        &mut self,
        now: Instant,
        frame: &[u8],
        meta: RxMeta,
        direct: &mut dyn FnMut(SocketHandle, &[u8]) -> usize,
    ) {
        self.counters.rx_frames += 1;
        let Ok(eth) = Frame::new_checked(frame) else {
            self.counters.rx_malformed += 1;
            return;
        };
        let Ok(eth_repr) = EthernetRepr::parse(&eth) else {
            self.counters.rx_malformed += 1;
            return;
        };
        if eth_repr.dst_addr != self.mac && !eth_repr.dst_addr.is_broadcast() {
            self.counters.rx_not_for_us += 1;
            return;
        }
        match eth_repr.ethertype {
            EtherType::Arp => self.process_arp(now, eth_repr.src_addr, eth.payload()),
            EtherType::Ipv4 => {
                self.process_ipv4(now, eth_repr.src_addr, eth.payload(), meta, direct)
            }
            EtherType::Unknown(_) => self.counters.rx_unknown_ethertype += 1,
        }
    }

    fn process_arp(&mut self, now: Instant, eth_src: EthernetAddress, payload: &[u8]) {
        let Ok(packet) = arp_wire::Packet::new_checked(payload) else {
            self.counters.rx_malformed += 1;
            return;
        };
        let Ok(repr) = ArpRepr::parse(&packet) else {
            self.counters.rx_malformed += 1;
            return;
        };
        // ARP has no checksum: the one cross-check is the frame's own
        // source. A neighbour answers with its own MAC in both; a bit
        // flipped in either (e.g. in a switch's memory, past the FCS) is
        // dropped here, and a pending request is sent again after
        // `arp_retry`, instead of a wrong MAC being learned (and every
        // frame to the neighbour going nowhere) until the entry expires.
        if repr.source_hardware_addr != eth_src {
            self.counters.rx_arp_mismatch += 1;
            return;
        }
        let sender_ip = repr.source_protocol_addr;
        let sender_mac = repr.source_hardware_addr;
        if sender_mac == self.mac
            || sender_ip == self.config.ip
            || !sender_mac.is_unicast()
            || sender_ip.is_unspecified()
        {
            return;
        }
        let for_us = repr.target_protocol_addr == self.config.ip;
        // RFC 826: refresh a known sender (this covers gratuitous ARP);
        // learn a new one only if it is talking to us.
        if for_us || self.arp.contains(sender_ip) {
            self.arp.fill(sender_ip, sender_mac, now);
            self.counters.arp_learned += 1;
        }
        if for_us && repr.operation == ArpOperation::Request {
            let reply = ArpRepr {
                operation: ArpOperation::Reply,
                source_hardware_addr: self.mac,
                source_protocol_addr: self.config.ip,
                target_hardware_addr: sender_mac,
                target_protocol_addr: sender_ip,
            };
            let eth = EthernetRepr {
                src_addr: self.mac,
                dst_addr: sender_mac,
                ethertype: EtherType::Arp,
            };
            let queued = self
                .replies
                .push(ethernet::HEADER_LEN + arp_wire::PACKET_LEN, |buf| {
                    eth.emit(buf)?;
                    reply.emit(&mut buf[ethernet::HEADER_LEN..])
                });
            if queued {
                self.counters.arp_replies_sent += 1;
            } else {
                self.counters.reply_queue_full += 1;
            }
        }
    }

    fn process_ipv4(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        payload: &[u8],
        meta: RxMeta,
        direct: &mut dyn FnMut(SocketHandle, &[u8]) -> usize,
    ) {
        let Ok(packet) = ipv4::Packet::new_checked(payload) else {
            self.counters.rx_malformed += 1;
            return;
        };
        let ip_check = if self.offload.rx_checksum && meta.ipv4_checksum_good {
            Checksum::None
        } else {
            Checksum::Both
        };
        let (ip_repr, data) = match Ipv4Repr::parse_with_payload(&packet, ip_check) {
            Ok(r) => r,
            Err(PacketError::Checksum) => {
                self.counters.rx_ipv4_checksum_errors += 1;
                return;
            }
            Err(PacketError::Unsupported) if packet.is_fragment() => {
                self.counters.rx_fragments_dropped += 1;
                return;
            }
            Err(_) => {
                self.counters.rx_malformed += 1;
                return;
            }
        };
        if ip_repr.dst_addr != self.config.ip {
            self.counters.rx_not_for_us += 1;
            return;
        }
        match ip_repr.protocol {
            protocol::TCP => self.process_tcp(now, src_mac, &ip_repr, data, meta, direct),
            protocol::ICMP => self.process_icmp(src_mac, &ip_repr, data),
            _ => self.counters.rx_unknown_protocol += 1,
        }
    }

    fn process_icmp(&mut self, src_mac: EthernetAddress, ip_repr: &Ipv4Repr, data: &[u8]) {
        let Ok(packet) = icmp::Packet::new_checked(data) else {
            self.counters.rx_malformed += 1;
            return;
        };
        let Ok(Icmpv4Repr::EchoRequest {
            ident,
            seq_no,
            data,
        }) = Icmpv4Repr::parse(&packet, Checksum::Both)
        else {
            self.counters.rx_icmp_ignored += 1;
            return;
        };
        let reply = Icmpv4Repr::EchoReply {
            ident,
            seq_no,
            data,
        };
        let ip_reply = Ipv4Repr {
            src_addr: self.config.ip,
            dst_addr: ip_repr.src_addr,
            protocol: protocol::ICMP,
            payload_len: reply.buffer_len(),
            ttl: self.config.ttl,
            ident: self.ip_ident,
            dont_frag: true,
        };
        self.ip_ident = self.ip_ident.wrapping_add(1);
        let eth = EthernetRepr {
            src_addr: self.mac,
            dst_addr: src_mac,
            ethertype: EtherType::Ipv4,
        };
        let len = ethernet::HEADER_LEN + ipv4::HEADER_LEN + reply.buffer_len();
        let queued = self.replies.push(len, |buf| {
            eth.emit(buf)?;
            ip_reply.emit(&mut buf[ethernet::HEADER_LEN..], Checksum::Both)?;
            reply.emit(&mut buf[ethernet::HEADER_LEN + ipv4::HEADER_LEN..])
        });
        if queued {
            self.counters.icmp_echo_replies += 1;
        } else {
            self.counters.reply_queue_full += 1;
        }
    }

    fn process_tcp(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        ip_repr: &Ipv4Repr,
        data: &[u8],
        meta: RxMeta,
        direct: &mut dyn FnMut(SocketHandle, &[u8]) -> usize,
    ) {
        let Ok(packet) = tcp_wire::Packet::new_checked(data) else {
            self.counters.rx_malformed += 1;
            return;
        };
        let check = if self.offload.rx_checksum && meta.l4_checksum_good {
            Checksum::None
        } else {
            Checksum::Both
        };
        let seg = match TcpRepr::parse(&packet, ip_repr.src_addr, ip_repr.dst_addr, check) {
            Ok(seg) => seg,
            Err(PacketError::Checksum) => {
                self.counters.rx_tcp_checksum_errors += 1;
                return;
            }
            Err(_) => {
                self.counters.rx_malformed += 1;
                return;
            }
        };
        let src = SocketAddrV4::new(ip_repr.src_addr, seg.src_port);
        let dst = SocketAddrV4::new(ip_repr.dst_addr, seg.dst_port);
        // Connected sockets first, then listeners.
        let index = self
            .sockets
            .iter()
            .position(|s| s.state() != super::tcp::State::Listen && s.accepts(src, dst))
            .or_else(|| self.sockets.iter().position(|s| s.accepts(src, dst)));
        let outcome = match index {
            Some(i) => self.sockets[i].process_with(now, src, dst, &seg, &mut |bytes| {
                direct(SocketHandle(i), bytes)
            }),
            None => {
                self.counters.rx_tcp_no_socket += 1;
                ProcessOutcome::SendReset
            }
        };
        if outcome == ProcessOutcome::SendReset && !seg.flags.rst {
            self.queue_reset(src_mac, ip_repr, &seg);
        }
    }

    /// RFC 9293 §3.10.7.1 reset for a segment nobody wants.
    fn queue_reset(&mut self, src_mac: EthernetAddress, ip_repr: &Ipv4Repr, seg: &TcpRepr) {
        let (seq, ack) = match seg.ack_number {
            Some(ack) => (ack, None),
            None => (SeqNumber(0), Some(seg.seq_number + seg.segment_len())),
        };
        let rst = TcpRepr {
            src_port: seg.dst_port,
            dst_port: seg.src_port,
            flags: TcpFlags {
                rst: true,
                ..TcpFlags::default()
            },
            seq_number: seq,
            ack_number: ack,
            window_len: 0,
            options: TcpOptions::default(),
            payload: &[],
        };
        let ip = Ipv4Repr {
            src_addr: self.config.ip,
            dst_addr: ip_repr.src_addr,
            protocol: protocol::TCP,
            payload_len: rst.buffer_len(),
            ttl: self.config.ttl,
            ident: self.ip_ident,
            dont_frag: true,
        };
        self.ip_ident = self.ip_ident.wrapping_add(1);
        let eth = EthernetRepr {
            src_addr: self.mac,
            dst_addr: src_mac,
            ethertype: EtherType::Ipv4,
        };
        let len = ethernet::HEADER_LEN + ipv4::HEADER_LEN + rst.buffer_len();
        let (src_ip, dst_ip) = (self.config.ip, ip_repr.src_addr);
        let queued = self.replies.push(len, |buf| {
            eth.emit(buf)?;
            ip.emit(&mut buf[ethernet::HEADER_LEN..], Checksum::Both)?;
            rst.emit(
                &mut buf[ethernet::HEADER_LEN + ipv4::HEADER_LEN..],
                src_ip,
                dst_ip,
                Checksum::Both,
            )
        });
        if queued {
            self.counters.tcp_resets_sent += 1;
        } else {
            self.counters.reply_queue_full += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phy::sim::{self, SimConfig, SimDevice};
    use crate::phy::TxOffload;

    const US: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

    /// The peer's ARP reply to `to`, with `sender_mac` in the ARP payload.
    fn reply_from_peer(
        peer: &mut SimDevice,
        to: EthernetAddress,
        eth_src: EthernetAddress,
        sender_mac: EthernetAddress,
    ) {
        let repr = ArpRepr {
            operation: ArpOperation::Reply,
            source_hardware_addr: sender_mac,
            source_protocol_addr: PEER,
            target_hardware_addr: to,
            target_protocol_addr: US,
        };
        let eth = EthernetRepr {
            src_addr: eth_src,
            dst_addr: to,
            ethertype: EtherType::Arp,
        };
        peer.tx_frame(
            ethernet::HEADER_LEN + arp_wire::PACKET_LEN,
            TxOffload::default(),
            &mut |buf| {
                eth.emit(buf).unwrap();
                repr.emit(&mut buf[ethernet::HEADER_LEN..]).unwrap();
            },
        )
        .unwrap();
    }

    /// Seed 7206 of tests/system_sim.rs: the target's ARP reply had one bit
    /// of its sender hardware address flipped (02:.. became 06:..), the
    /// initiator learned the wrong MAC, and every SYN went to it (the
    /// target dropped them as not for it) until the entry expired 60 s
    /// later. Such a reply is now dropped and the request is sent again.
    #[test]
    fn an_arp_reply_whose_sender_mac_is_not_the_frame_source_is_not_learned() {
        let (mut ours, mut peer) = sim::link(SimConfig::default(), 7206);
        let mut iface = Interface::new(InterfaceConfig::new(US, 24), ours.caps());
        let peer_mac = EthernetAddress(peer.caps().mac);
        let mut flipped = peer_mac;
        flipped.0[0] ^= 1 << 2;
        let h = iface.add_socket(None);
        iface
            .connect(Instant::ZERO, h, SocketAddrV4::new(PEER, 3260))
            .unwrap();
        iface.poll(Instant::ZERO, &mut ours);
        assert_eq!(iface.counters().arp_requests_sent, 1);

        // Both ends share the link's clock: poll ours for `ms` ms from `t`.
        let run = |iface: &mut Interface, ours: &mut SimDevice, t: Instant, ms: u64| {
            for i in 1..=ms {
                let now = t + Duration::from_millis(i);
                ours.set_now(now);
                iface.poll(now, ours);
            }
            t + Duration::from_millis(ms)
        };
        reply_from_peer(&mut peer, iface.mac(), peer_mac, flipped);
        let t = run(&mut iface, &mut ours, Instant::ZERO, 10);
        assert_eq!(
            iface.neighbour(PEER, t),
            None,
            "the flipped MAC is not learned"
        );
        assert_eq!(iface.counters().rx_arp_mismatch, 1);

        // The request goes out again after arp_retry; a sound reply is
        // learned and the SYN goes to the right MAC.
        let t = run(&mut iface, &mut ours, t, 1_000);
        assert_eq!(iface.counters().arp_requests_sent, 2);
        reply_from_peer(&mut peer, iface.mac(), peer_mac, peer_mac);
        let t = run(&mut iface, &mut ours, t, 10);
        assert_eq!(iface.neighbour(PEER, t), Some(peer_mac));
        // The SYN goes out (at once, or on its retransmission timer).
        run(&mut iface, &mut ours, t, 3_000);
        let mut syn_to = None;
        peer.rx_burst(64, &mut |f, _| {
            let eth = Frame::new_checked(f).unwrap();
            if eth.ethertype() == EtherType::Ipv4 {
                syn_to = Some(EthernetRepr::parse(&eth).unwrap().dst_addr);
            }
        });
        assert_eq!(syn_to, Some(peer_mac));
    }
}
