//! The target's runtime over the userspace TCP/IP stack: one poll-mode
//! thread owns a packet [`Device`] (a DPDK queue, a simulated link) and one
//! [`Interface`], keeps a listening socket on every portal's port, and
//! drives a [`TargetConn`] per accepted connection. No kernel socket is
//! involved, so the target and the initiator can both run kernel-free
//! (e.g. over DPDK's `net_memif` between two processes).
//!
//! Portals must carry the stack's own address (or the unspecified address,
//! which means it). Fault injection: only [`FaultInjector::stall`] is
//! honoured (a stalled portal's connections stop reading).
//!
//! [`FaultInjector::stall`]: super::FaultInjector

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant as StdInstant};

use super::server::{Runtime, TargetHandle};
use super::{SharedTarget, TargetConfig, TargetConn, TargetError, TargetShared};
use crate::net::{
    Instant, Interface, InterfaceConfig, SocketHandle, TcpError, TcpSocket, TcpState,
};
use crate::phy::Device;
use crate::transport::TxPart;

/// Idle rounds spent spinning before each further idle round yields the CPU
/// (sched_yield: cheap, and kind to a machine with few cores).
const SPIN_ROUNDS: u32 = 2048;
/// How long a stopping target keeps polling so FINs and resets get out.
const CLOSE_GRACE: Duration = Duration::from_millis(20);

/// How the target's stack is addressed.
#[derive(Debug, Clone)]
pub struct UserListenConfig {
    /// Address, prefix, neighbours, MTU, offloads and TCP settings of the
    /// target's interface.
    pub interface: InterfaceConfig,
    /// Name of the poll thread (it starts with `iscsi-tgt-`, which keeps its
    /// CPU out of an in-process bench's initiator figures).
    pub thread_name: String,
}

impl UserListenConfig {
    pub fn new(interface: InterfaceConfig) -> UserListenConfig {
        UserListenConfig {
            interface,
            thread_name: "iscsi-tgt-user".into(),
        }
    }
}

impl super::server::Target {
    /// Serves `config` on the userspace stack over `device` until the
    /// handle is stopped or dropped. Portal port 0 means 3260.
    pub fn start_on_device<D: Device + Send + 'static>(
        config: TargetConfig,
        device: D,
        listen: UserListenConfig,
    ) -> Result<TargetHandle, TargetError> {
        config.validate()?;
        let ip = listen.interface.ip;
        let wanted: Vec<SocketAddr> = if config.portals.is_empty() {
            vec![SocketAddr::from((ip, 3260))]
        } else {
            config.portals.iter().map(|p| p.addr).collect()
        };
        let mut bound = Vec::with_capacity(wanted.len());
        for addr in wanted {
            let port = if addr.port() == 0 { 3260 } else { addr.port() };
            match addr.ip() {
                IpAddr::V4(a) if a == ip || a.is_unspecified() => {
                    bound.push(SocketAddr::from((ip, port)))
                }
                _ => {
                    return Err(TargetError::Config(format!(
                        "portal {addr} is not on the userspace stack's address {ip} \
                         (the stack answers only for its own IPv4 address)"
                    )))
                }
            }
        }
        for (i, a) in bound.iter().enumerate() {
            if bound[..i].contains(a) {
                return Err(TargetError::Config(format!("portal {a} is given twice")));
            }
        }
        let shared = Arc::new(TargetShared::new(config, &bound)?);
        let runtime = Arc::new(Runtime::default());
        let mut iface = Interface::new(listen.interface, device.caps());
        let mut listeners = Vec::with_capacity(bound.len());
        for (portal, addr) in bound.iter().enumerate() {
            let handle = iface.add_socket(None);
            iface
                .listen(handle, addr.port())
                .map_err(|e| TargetError::Config(format!("listening on {addr}: {e}")))?;
            listeners.push(Listener { portal, handle });
        }
        let poller = UserPoller {
            shared: shared.clone(),
            runtime: runtime.clone(),
            device,
            iface,
            listeners,
            conns: Vec::new(),
            spare: Vec::new(),
            epoch: StdInstant::now(),
        };
        let thread = thread::Builder::new()
            .name(listen.thread_name)
            .spawn(move || poller.run())
            .map_err(TargetError::Spawn)?;
        log::info!(
            "iSCSI target {} listening on {:?} (userspace stack)",
            shared.config.iqn,
            bound
        );
        Ok(TargetHandle::from_parts(shared, runtime, vec![thread]))
    }
}

/// Queues what is left of `conn`'s output on `socket` (`sent` bytes of it
/// went already): owned bytes copied into the send ring, the LU's Data-In
/// payload by reference (`TcpSocket::send_shared`: copied once, from the
/// LU into the frames, and again on a retransmission). Once all is queued
/// the output is cleared and `sent` reset. Returns the bytes queued now
/// and whether all is queued; an error says the connection died (its
/// output is dropped).
pub fn send_output(
    socket: &mut TcpSocket,
    conn: &mut TargetConn,
    sent: &mut usize,
) -> Result<(usize, bool), TcpError> {
    let mut queued = 0;
    let mut skip = *sent;
    let mut full = false;
    let mut failed = None;
    for part in conn.output_parts() {
        let len = part.len();
        if skip >= len {
            skip -= len;
            continue;
        }
        let want = len - skip;
        let result = match part {
            TxPart::Bytes(bytes) => socket.send_slice(&bytes[skip..]),
            TxPart::Shared { buf, start, .. } => socket.send_shared(buf, start + skip, want),
        };
        let Ok(n) = result else {
            failed = result.err();
            break;
        };
        queued += n;
        skip = 0;
        if n < want {
            full = true;
            break;
        }
    }
    if let Some(e) = failed {
        conn.clear_output();
        *sent = 0;
        return Err(e);
    }
    *sent += queued;
    if full {
        return Ok((queued, false));
    }
    conn.clear_output();
    *sent = 0;
    Ok((queued, true))
}

/// A listening socket of one portal.
struct Listener {
    portal: usize,
    handle: SocketHandle,
}

/// One accepted connection.
struct UserConn {
    handle: SocketHandle,
    portal: usize,
    conn: TargetConn,
    /// Bytes of `conn.output_parts()` already queued on the socket.
    sent: usize,
    peer: SocketAddrV4,
}

struct UserPoller<D: Device> {
    shared: SharedTarget,
    runtime: Arc<Runtime>,
    device: D,
    iface: Interface,
    listeners: Vec<Listener>,
    conns: Vec<UserConn>,
    /// Closed sockets, reused as the next listeners.
    spare: Vec<SocketHandle>,
    epoch: StdInstant,
}

impl<D: Device> UserPoller<D> {
    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as u64)
    }

    fn run(mut self) {
        let mut idle_rounds = 0u32;
        while !self.runtime.stop.load(std::sync::atomic::Ordering::Relaxed) {
            let now = self.now();
            let mut busy = self.iface.poll(now, &mut self.device);
            self.accept();
            for i in 0..self.conns.len() {
                busy |= self.pump(i);
            }
            busy |= self.reap();
            if busy {
                idle_rounds = 0;
            } else if idle_rounds < SPIN_ROUNDS {
                idle_rounds += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        for c in &self.conns {
            self.iface.socket_mut(c.handle).abort();
        }
        let until = StdInstant::now() + CLOSE_GRACE;
        while StdInstant::now() < until {
            let now = self.now();
            self.iface.poll(now, &mut self.device);
            std::hint::spin_loop();
        }
    }

    /// Listeners that got a SYN become connections; a fresh listener takes
    /// each one's place.
    fn accept(&mut self) {
        for l in 0..self.listeners.len() {
            let handle = self.listeners[l].handle;
            if self.iface.socket(handle).state() == TcpState::Listen {
                continue;
            }
            let portal = self.listeners[l].portal;
            let socket = self.iface.socket(handle);
            let (local, peer) = (socket.local_endpoint(), socket.remote_endpoint());
            let mut conn = TargetConn::new(self.shared.clone(), portal, StdInstant::now());
            conn.set_local_addr(SocketAddr::V4(local));
            // Data-In payload straight from the LU into the frames.
            conn.set_data_in_by_reference(true);
            log::debug!("connection from {peer} on portal {portal} (userspace stack)");
            self.conns.push(UserConn {
                handle,
                portal,
                conn,
                sent: 0,
                peer,
            });
            let next = self
                .spare
                .pop()
                .unwrap_or_else(|| self.iface.add_socket(None));
            let port = self.shared.portals[portal].addr.port();
            match self.iface.listen(next, port) {
                Ok(()) => self.listeners[l].handle = next,
                Err(e) => {
                    log::warn!("cannot listen again on port {port}: {e}");
                    self.spare.push(next);
                }
            }
        }
    }

    /// Moves bytes between connection `i`'s socket and its state machine.
    fn pump(&mut self, i: usize) -> bool {
        let c = &mut self.conns[i];
        let socket = self.iface.socket_mut(c.handle);
        let mut moved = false;
        if !socket.may_send() && !socket.may_recv() {
            return false;
        }
        if self.shared.faults.is_stalled(c.portal) {
            return false;
        }
        loop {
            // Output first: input is read only once the last answer is out,
            // so a slow reader throttles us instead of growing the buffer.
            match send_output(socket, &mut c.conn, &mut c.sent) {
                Ok((n, done)) => {
                    moved |= n > 0;
                    if !done {
                        return moved;
                    }
                }
                // The connection died; reap() frees it.
                Err(_) => return moved,
            }
            if c.conn.is_closed() {
                socket.close();
                return moved;
            }
            match socket.recv_slice(c.conn.recv_buffer()) {
                Ok(0) => break,
                Ok(n) => {
                    c.conn.received(n, StdInstant::now());
                    moved = true;
                }
                Err(_) => {
                    // FIN or reset from the initiator: close our side too.
                    socket.close();
                    return moved;
                }
            }
        }
        c.conn.handle_timeout(StdInstant::now());
        moved
    }

    /// Forgets connections whose socket is closed; returns whether any went.
    fn reap(&mut self) -> bool {
        let before = self.conns.len();
        let iface = &self.iface;
        let spare = &mut self.spare;
        self.conns.retain(|c| {
            let state = iface.socket(c.handle).state();
            if state != TcpState::Closed {
                return true;
            }
            log::debug!(
                "connection from {} on portal {} ended: {}",
                c.peer,
                c.portal,
                c.conn.close_reason().unwrap_or("closed by the initiator")
            );
            spare.push(c.handle);
            false
        });
        self.conns.len() != before
    }
}

#[cfg(feature = "dpdk")]
impl super::server::Target {
    /// Serves `config` on queue pair `queue` of a started DPDK stack, with
    /// the stack's address and settings (the embedded target kernel-free).
    pub fn start_on_dpdk(
        config: TargetConfig,
        stack: &crate::transport::dpdk::DpdkStack,
        queue: u16,
    ) -> Result<TargetHandle, TargetError> {
        let options = stack.options();
        let device = stack.queue(queue).map_err(|e| {
            TargetError::Config(format!(
                "queue {queue} of DPDK port {:?}: {e}",
                options.port
            ))
        })?;
        let mut interface = options
            .user
            .interface_config(options.local_ip, options.gateway);
        interface.mac = Some(crate::wire::ethernet::EthernetAddress(stack.mac()));
        let mut listen = UserListenConfig::new(interface);
        listen.thread_name = format!("iscsi-tgt-dpdk{queue}");
        Self::start_on_device(config, device, listen)
    }
}
