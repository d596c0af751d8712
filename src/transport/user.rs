//! [`Transport`] over the userspace stack and any [`Device`]: the iSCSI
//! layer runs unchanged on kernel TCP or on this. Time comes from the real
//! clock, converted to the stack's [`Instant`] (the stack never reads it).

use super::side::{SideOwner, SidePhase, SideShared, SideTcp, SIDE_QUEUE};
use super::{RxSink, Transport, TransportError, TxPart};
use crate::net::{
    Instant, Interface, InterfaceConfig, NetError, OffloadConfig, SocketHandle, TcpConfig,
    TcpError, TcpSocket, TcpState,
};
use crate::phy::Device;
use crate::wire::ethernet::EthernetAddress;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

/// Settings of a userspace-stack connection.
#[derive(Debug, Clone)]
pub struct UserTcpConfig {
    pub prefix_len: u8,
    /// Neighbours never resolved with ARP (e.g. a point-to-point target).
    pub static_neighbours: Vec<(Ipv4Addr, [u8; 6])>,
    pub mtu: Option<usize>,
    pub offload: OffloadConfig,
    pub tcp: TcpConfig,
    /// Seeds ISN, timestamp offset and ephemeral port choice.
    pub seed: u64,
    /// Source port to use instead of a random ephemeral one (RSS steering).
    pub local_port: Option<u16>,
    /// ARP plus handshake must finish within this.
    pub connect_timeout: Duration,
}

impl Default for UserTcpConfig {
    fn default() -> Self {
        UserTcpConfig {
            prefix_len: 24,
            static_neighbours: Vec::new(),
            mtu: None,
            offload: OffloadConfig::default(),
            tcp: TcpConfig::default(),
            seed: 0,
            local_port: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl UserTcpConfig {
    /// The interface these settings describe, at `local_ip` (e.g. for a
    /// listening stack: the embedded target on the userspace stack).
    pub fn interface_config(
        &self,
        local_ip: Ipv4Addr,
        gateway: Option<Ipv4Addr>,
    ) -> InterfaceConfig {
        let mut c = InterfaceConfig::new(local_ip, self.prefix_len);
        c.gateway = gateway;
        c.static_neighbours = self
            .static_neighbours
            .iter()
            .map(|&(ip, mac)| (ip, EthernetAddress(mac)))
            .collect();
        c.mtu = self.mtu;
        c.offload = self.offload;
        c.seed = self.seed;
        c.tcp = self.tcp.clone();
        c
    }
}

/// Real time since the transport was created, as the stack's `Instant`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    epoch: std::time::Instant,
}

impl Clock {
    fn now(&self) -> Instant {
        self.read().1
    }

    /// One clock read, as real time and as the stack's `Instant`.
    fn read(&self) -> (std::time::Instant, Instant) {
        let wall = std::time::Instant::now();
        let since = wall.saturating_duration_since(self.epoch);
        (wall, Instant::from_micros(since.as_micros() as u64))
    }
}

/// One TCP connection over the userspace stack, owning its device queue.
pub struct UserTcp<D: Device> {
    device: D,
    iface: Interface,
    handle: SocketHandle,
    clock: Clock,
    remote: SocketAddrV4,
    /// Side connections ([`Transport::open_side`]): the socket of the
    /// current one, how they are steered, and the socket to reuse.
    side: SideSockets,
}

impl<D: Device> std::fmt::Debug for UserTcp<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserTcp")
            .field("iface", &self.iface)
            .field("remote", &self.remote)
            .finish()
    }
}

fn to_transport_error(err: TcpError) -> TransportError {
    match err {
        TcpError::Finished => TransportError::Closed,
        TcpError::Reset => TransportError::Reset("connection reset by peer".into()),
        TcpError::TimedOut => TransportError::Reset("retransmission timeout".into()),
        TcpError::Refused => TransportError::Reset("connection refused".into()),
        TcpError::InvalidState => TransportError::Closed,
    }
}

/// Whether `remote` is on `local`'s prefix (reached without a gateway).
pub fn on_link(local: Ipv4Addr, prefix_len: u8, remote: Ipv4Addr) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    u32::from(local) & mask == u32::from(remote) & mask
}

/// The address ARP must resolve to reach `remote`: itself when on the local
/// prefix, else the gateway (or, lacking one, `remote` anyway).
fn next_hop(
    local: Ipv4Addr,
    prefix_len: u8,
    gateway: Option<Ipv4Addr>,
    remote: Ipv4Addr,
) -> Ipv4Addr {
    match gateway {
        Some(gw) if !on_link(local, prefix_len, remote) => gw,
        _ => remote,
    }
}

impl<D: Device> UserTcp<D> {
    /// Resolves the next hop with ARP (unless static), opens the connection
    /// and returns once it is established. `local_mac` overrides the
    /// device's; `gateway` is used for remotes outside the local prefix.
    pub fn connect(
        mut device: D,
        local_ip: Ipv4Addr,
        local_mac: Option<[u8; 6]>,
        gateway: Option<Ipv4Addr>,
        remote: SocketAddrV4,
        config: UserTcpConfig,
    ) -> Result<Self, TransportError> {
        let clock = Clock {
            epoch: std::time::Instant::now(),
        };
        let mut iface_config = config.interface_config(local_ip, gateway);
        iface_config.mac = local_mac.map(EthernetAddress);
        let mut iface = Interface::new(iface_config, device.caps());
        let handle = iface.add_socket(None);
        let addr = SocketAddr::V4(remote);
        let connect_error = |e: NetError| TransportError::Connect {
            addr,
            source: io::Error::other(e.to_string()),
        };
        iface
            .connect_from(clock.now(), handle, config.local_port, remote)
            .map_err(connect_error)?;
        let deadline = clock.now() + config.connect_timeout;
        loop {
            let now = clock.now();
            iface.poll(now, &mut device);
            let socket = iface.socket(handle);
            match socket.state() {
                TcpState::Established | TcpState::CloseWait => break,
                TcpState::Closed => {
                    let kind = match socket.error() {
                        Some(TcpError::Refused) => io::ErrorKind::ConnectionRefused,
                        Some(TcpError::TimedOut) => io::ErrorKind::TimedOut,
                        _ => io::ErrorKind::ConnectionAborted,
                    };
                    return Err(TransportError::Connect {
                        addr,
                        source: io::Error::from(kind),
                    });
                }
                _ => {}
            }
            if now >= deadline {
                let next_hop = next_hop(local_ip, config.prefix_len, gateway, *remote.ip());
                if iface.neighbour(next_hop, now).is_none() {
                    return Err(TransportError::Connect {
                        addr,
                        source: io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "ARP for next hop {next_hop} from {local_ip} got no reply within {:?}",
                                config.connect_timeout
                            ),
                        ),
                    });
                }
                return Err(TransportError::ConnectTimeout {
                    addr,
                    timeout: config.connect_timeout,
                });
            }
            std::thread::yield_now();
        }
        Ok(UserTcp {
            device,
            iface,
            handle,
            clock,
            remote,
            side: SideSockets::default(),
        })
    }

    pub fn socket(&self) -> &TcpSocket {
        self.iface.socket(self.handle)
    }
    pub fn interface(&self) -> &Interface {
        &self.iface
    }
    pub fn device(&self) -> &D {
        &self.device
    }
    /// The device, e.g. to change a test adapter's settings mid-session.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn socket_mut(&mut self) -> &mut TcpSocket {
        self.iface.socket_mut(self.handle)
    }

    /// Lends the receive ring's bytes to `sink` in place. A peer's FIN or
    /// reset is reported once nothing is left to read.
    fn drain_ring(&mut self, sink: &mut dyn RxSink) -> Result<usize, TransportError> {
        let state = self.socket().state();
        match self
            .socket_mut()
            .recv_with(&mut |bytes| sink.rx_push(bytes))
        {
            Ok(n) => Ok(n),
            Err(TcpError::InvalidState) if state != TcpState::Closed => Ok(0),
            Err(e) => Err(to_transport_error(e)),
        }
    }
}

impl<D: Device + Send> Transport for UserTcp<D> {
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        self.socket_mut()
            .send_slice(buf)
            .map_err(to_transport_error)
    }

    /// Shared parts (a write's payload) are queued by reference: TCP keeps
    /// the buffer until its bytes are acknowledged and copies them once,
    /// into the frame. Other parts are copied into the send ring.
    fn send_parts(&mut self, parts: &[TxPart<'_>]) -> Result<usize, TransportError> {
        let socket = self.socket_mut();
        let mut total = 0;
        for part in parts {
            let (n, want) = match *part {
                TxPart::Bytes(b) => (socket.send_slice(b), b.len()),
                TxPart::Shared { buf, start, len } => (socket.send_shared(buf, start, len), len),
            };
            let n = n.map_err(to_transport_error)?;
            total += n;
            if n < want {
                break;
            }
        }
        Ok(total)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        match self.socket_mut().recv_slice(buf) {
            Ok(n) => Ok(n),
            Err(TcpError::InvalidState) if self.socket().state() != TcpState::Closed => Ok(0),
            Err(e) => Err(to_transport_error(e)),
        }
    }

    /// One copy per byte: what waits in the receive ring (data that came
    /// out of order, or that the reader refused before) is lent to the
    /// reader in place; then a poll of the stack hands in-order payload to
    /// the reader straight from each received frame.
    fn recv_into(&mut self, sink: &mut dyn RxSink) -> Result<usize, TransportError> {
        let (wall, now) = self.clock.read();
        sink.rx_time(wall);
        let mut total = self.drain_ring(sink)?;
        let handle = self.handle;
        let ring_empty = self.socket().recv_queue() == 0;
        let mut direct = 0;
        self.iface
            .poll_with(now, &mut self.device, &mut |h, bytes| {
                if h != handle || !ring_empty {
                    return 0;
                }
                let n = sink.rx_push(bytes);
                direct += n;
                n
            });
        total += direct;
        // A hole just filled, or bytes the reader did not take.
        total += self.drain_ring(sink)?;
        match self.socket().error() {
            Some(e) if total == 0 && self.socket().recv_queue() == 0 => Err(to_transport_error(e)),
            _ => Ok(total),
        }
    }

    fn poll(&mut self) -> Result<(), TransportError> {
        let now = self.clock.now();
        self.iface.poll(now, &mut self.device);
        match self.socket().error() {
            Some(e) if self.socket().recv_queue() == 0 => Err(to_transport_error(e)),
            _ => Ok(()),
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let deadline = self.clock.now() + timeout;
        loop {
            self.poll()?;
            let socket = self.socket();
            let ready = socket.recv_queue() > 0
                || (socket.may_send() && socket.send_capacity() > 0)
                || !socket.may_recv();
            if ready || self.clock.now() >= deadline {
                return Ok(());
            }
            std::thread::yield_now();
        }
    }

    /// Frames received by [`wait`](Transport::wait) would stop in the
    /// receive ring (a second copy); callers poll with `recv_into` instead.
    fn is_busy_polled(&self) -> bool {
        true
    }

    fn has_side_connections(&self) -> bool {
        true
    }

    fn open_side(&mut self) -> Option<Result<SideTcp, TransportError>> {
        Some(self.open_side_socket())
    }

    fn pump_side(&mut self) -> bool {
        self.pump_side_socket()
    }

    fn close(&mut self) {
        self.socket_mut().close();
        let now = self.clock.now();
        self.iface.poll(now, &mut self.device);
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::V4(self.socket().local_endpoint()))
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::V4(self.remote))
    }
}

/// The side connections of one [`UserTcp`] (one at a time).
#[derive(Debug, Default)]
struct SideSockets {
    /// The socket of the side in use, and its owner's end.
    current: Option<(SocketHandle, SideOwner)>,
    /// A socket made for an earlier side, reused once it is closed.
    spare: Option<SocketHandle>,
    /// On a multi-queue port: (RSS, the queue this connection's replies
    /// come back on), so a side's replies come back there too.
    steering: Option<(crate::phy::rss::RssSteering, u16)>,
}

impl<D: Device> UserTcp<D> {
    /// On a multi-queue port: side connections get a source port whose
    /// replies RSS puts on `queue` (this connection's queue), as
    /// `DpdkStack` chose this connection's own.
    pub fn steer_side_connections(&mut self, rss: crate::phy::rss::RssSteering, queue: u16) {
        self.side.steering = Some((rss, queue));
    }

    /// A second connection to this connection's peer, on this interface
    /// and device (see [`super::side`]).
    fn open_side_socket(&mut self) -> Result<SideTcp, TransportError> {
        if let Some((handle, _owner)) = self.side.current.take() {
            self.iface.socket_mut(handle).abort();
        }
        let now = self.clock.now();
        let handle = match self.side.spare {
            Some(h) if !self.iface.socket(h).is_open() => h,
            _ => {
                let h = self.iface.add_socket(None);
                self.side.spare = Some(h);
                h
            }
        };
        let local_ip = *self.socket().local_endpoint().ip();
        let addr = SocketAddr::V4(self.remote);
        let failed = |why: String| TransportError::Connect {
            addr,
            source: io::Error::other(why),
        };
        let local_port = match &self.side.steering {
            None => None,
            Some((rss, queue)) => {
                // Past this connection's own port (taken).
                let start = self.socket().local_endpoint().port().wrapping_add(1);
                let port = rss
                    .pick_local_port(
                        local_ip,
                        self.remote,
                        *queue,
                        49152..=65535,
                        start.max(49152),
                    )
                    .ok_or_else(|| {
                        failed(format!(
                            "no source port steers {}'s replies to queue {queue}",
                            self.remote
                        ))
                    })?;
                Some(port)
            }
        };
        let port = self
            .iface
            .connect_from(now, handle, local_port, self.remote)
            .map_err(|e| failed(format!("side connection: {e}")))?;
        let shared = SideShared::new();
        self.side.current = Some((handle, SideOwner(shared.clone())));
        self.iface.poll(now, &mut self.device);
        Ok(SideTcp::new(
            shared,
            SocketAddrV4::new(local_ip, port),
            self.remote,
        ))
    }

    /// Moves the side's bytes between its socket and its queues, then
    /// polls the stack (what the side queued goes out; what came for it
    /// stops in its socket's ring until the next pump).
    fn pump_side_socket(&mut self) -> bool {
        let Some((handle, owner)) = &self.side.current else {
            return false;
        };
        let (handle, shared) = (*handle, owner.0.clone());
        let mut moved = false;
        let mut done = false;
        {
            let mut st = shared.lock();
            let socket = self.iface.socket_mut(handle);
            if st.user_closed {
                // A FIN when it got that far; the stack finishes the close.
                socket.close();
                done = true;
            } else {
                if st.phase == SidePhase::Connecting && socket.may_send() {
                    st.phase = SidePhase::Open;
                    moved = true;
                }
                if st.phase == SidePhase::Open {
                    while !st.tx.is_empty() {
                        let n = {
                            let (front, _) = st.tx.as_slices();
                            socket.send_slice(front).unwrap_or(0)
                        };
                        if n == 0 {
                            break;
                        }
                        st.tx.drain(..n);
                        moved = true;
                    }
                    let mut room = SIDE_QUEUE.saturating_sub(st.rx.len());
                    let _ = socket.recv_with(&mut |bytes| {
                        let n = bytes.len().min(room);
                        st.rx.extend(&bytes[..n]);
                        room -= n;
                        moved |= n > 0;
                        n
                    });
                }
                let ended = match socket.state() {
                    TcpState::Closed => true,
                    _ => st.phase == SidePhase::Open && !socket.may_recv(),
                };
                if ended && !matches!(st.phase, SidePhase::Ended(_)) {
                    st.phase = SidePhase::Ended(
                        socket
                            .error()
                            .map(|e| to_transport_error(e).to_string())
                            .or_else(|| {
                                (socket.state() == TcpState::Closed
                                    && st.phase == SidePhase::Connecting)
                                    .then(|| "connection closed before it was established".into())
                            }),
                    );
                    moved = true;
                }
            }
        }
        if moved {
            shared.notify();
        }
        if done {
            self.side.current = None;
        }
        let now = self.clock.now();
        self.iface.poll(now, &mut self.device) | moved
    }
}
