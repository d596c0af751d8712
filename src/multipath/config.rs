//! Device and path configuration. A path is a port binding: how to open a
//! byte stream to one target portal (kernel TCP bound to a local address, or
//! the userspace stack) plus the login for its own session (MPIO).
#![warn(missing_docs)]

use super::path::ReconnectPolicy;
use super::selector::Policy;
use super::MultipathError;
use crate::iscsi::chap::{Credentials, Secret};
use crate::iscsi::connection::ConnTimers;
use crate::iscsi::discovery::send_targets_at;
use crate::iscsi::login::{random_isid, LoginConfig};
use crate::iscsi::redirect::LoginPortal;
use crate::iscsi::url::IscsiUrl;
use crate::transport::kernel::{KernelTcp, KernelTcpOptions};
use crate::transport::{Transport, TransportError};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use thiserror::Error;

/// Why a device configuration (URLs, port bindings, the transport's
/// stacks) cannot serve its paths.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// No path at all.
    #[error("no paths given")]
    NoPaths,
    /// A per-path list has neither none nor one entry per path.
    #[error("{paths} path(s) but {bindings} {what} binding(s): give one per path, in the order of the paths, or none")]
    BindingCount {
        /// How many paths there are.
        paths: usize,
        /// How many bindings the list has.
        bindings: usize,
        /// Which list, e.g. `"--iface (interface)"` or `"port"`.
        what: &'static str,
    },
    /// The host's interfaces could not be listed to check a binding.
    #[error("binding {binding}: listing interfaces: {error}")]
    ListInterfaces {
        /// The binding, as [`PortBinding::describe`] says it.
        binding: String,
        /// getifaddrs' error.
        #[source]
        error: nix::Error,
    },
    /// A binding names an interface the host does not have.
    #[error("binding {binding}: no interface named {iface:?} (interfaces here: {})", .known.join(", "))]
    NoSuchInterface {
        /// The binding.
        binding: String,
        /// The interface it names.
        iface: String,
        /// The host's interfaces.
        known: Vec<String>,
    },
    /// A binding's source address is not one of its interface's.
    #[error("binding {binding}: {source_ip} is not an address of {iface} (its addresses: {})", if .own.is_empty() { "none".to_string() } else { .own.join(", ") })]
    NotAnAddressOf {
        /// The binding.
        binding: String,
        /// Its source address.
        source_ip: IpAddr,
        /// Its interface.
        iface: String,
        /// The interface's own addresses.
        own: Vec<String>,
    },
    /// A binding's source address belongs to no interface here.
    #[error("binding {source_ip}: no interface here has that address")]
    NoInterfaceHasAddress {
        /// The address.
        source_ip: IpAddr,
    },
    /// A path's source address and its portal are of different families.
    #[error("path {path}: source {binding} cannot reach portal {portal} (another address family)")]
    AddressFamily {
        /// The path's index.
        path: usize,
        /// Its binding.
        binding: String,
        /// The portal.
        portal: SocketAddr,
    },
    /// A URL does not parse or names no target and LUN.
    #[error(transparent)]
    Url(#[from] crate::iscsi::url::UrlError),
    /// A URL names another target or LUN than the first one.
    #[error("URL {url} names another target/LUN than the first URL")]
    OtherTarget {
        /// The URL.
        url: String,
    },
    /// A URL's host does not resolve to a portal address.
    #[error("{url}: {error}")]
    PortalAddress {
        /// The URL.
        url: String,
        /// The resolver's error.
        #[source]
        error: super::Cause<std::io::Error>,
    },
    /// A path over the userspace stack to an IPv6 portal.
    #[error("path {path} to {portal}: the userspace stack speaks IPv4 only")]
    Ipv6OnUserspaceStack {
        /// The path's index.
        path: usize,
        /// The portal.
        portal: SocketAddr,
    },
    /// `Transport::Dpdk` without a started stack.
    #[error("Transport::Dpdk needs at least one started DPDK stack")]
    NoDpdkStack,
    /// A binding names an interface no DPDK port is or drives.
    #[error("binding {binding}: no DPDK port named {iface:?} or driving that interface (ports: {})", .ports.join(", "))]
    NoDpdkPort {
        /// The binding.
        binding: String,
        /// The interface it names.
        iface: String,
        /// The stacks' ports, e.g. `net_af_packet0 on veth1 at 10.0.0.1`.
        ports: Vec<String>,
    },
    /// The DPDK port a binding names has another address than its source.
    #[error("binding {binding}: the stack on DPDK port {port} has address {has}, not {wanted}")]
    DpdkStackAddress {
        /// The binding.
        binding: String,
        /// The port.
        port: String,
        /// The stack's address.
        has: std::net::Ipv4Addr,
        /// The binding's source address.
        wanted: IpAddr,
    },
    /// No DPDK stack has a binding's source address.
    #[error("binding {binding}: no DPDK stack has that address (stacks: {})", .stacks.join(", "))]
    NoDpdkStackAt {
        /// The binding.
        binding: String,
        /// The stacks, as in [`ConfigError::NoDpdkPort`].
        stacks: Vec<String>,
    },
    /// More paths on a DPDK port than it has queue pairs.
    #[error("path {path} (to {remote}) needs queue pair {queue} of DPDK port {port:?}, which has {queues} (open the stack with more queues, or add ports)")]
    NoQueuePair {
        /// The path's index.
        path: usize,
        /// Its portal.
        remote: std::net::SocketAddrV4,
        /// The queue pair it would take.
        queue: usize,
        /// The port.
        port: String,
        /// The port's queue pairs.
        queues: u16,
    },
}

/// Why SendTargets discovery found no usable path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DiscoveryError {
    /// The portal given is not `host[:port]`.
    #[error("through {portal}: not an address (host[:port])")]
    BadPortal {
        /// The portal as given.
        portal: String,
    },
    /// A per-portal cap of 0.
    #[error("through {portal}: at most 0 paths per portal leaves no path")]
    ZeroPerPortal {
        /// The portal.
        portal: String,
    },
    /// The discovery session failed (through every binding tried).
    #[error("through {portal}: {}", .tries.iter().map(|t| t.to_string()).collect::<Vec<_>>().join("; "))]
    SendTargets {
        /// The portal.
        portal: String,
        /// One failure per binding tried.
        tries: Vec<DiscoveryTry>,
    },
    /// The portal did not report the target asked for.
    #[error("through {portal}: target {target} not reported (it reported: {})", .reported.join(", "))]
    TargetNotReported {
        /// The portal.
        portal: String,
        /// The target asked for.
        target: String,
        /// The targets it reported.
        reported: Vec<String>,
    },
    /// No target named, and the portal reported none.
    #[error("through {portal}: no targets reported")]
    NoTargets {
        /// The portal.
        portal: String,
    },
    /// No target named, and the portal reported several.
    #[error("through {portal}: {} targets reported; name one ({})", .reported.len(), .reported.join(", "))]
    SeveralTargets {
        /// The portal.
        portal: String,
        /// The targets it reported.
        reported: Vec<String>,
    },
    /// The target reported no portal that can be a path.
    #[error("through {portal}: target {target} has no usable portal")]
    NoPortal {
        /// The portal discovery went through.
        portal: String,
        /// The target.
        target: String,
    },
    /// No binding × portal pair reaches the target.
    #[error("through {portal}: no binding × portal pair of target {target} is usable ({})", if .why.is_empty() { "it reported no portal".to_string() } else { .why.join("; ") })]
    NoUsablePair {
        /// The portal discovery went through.
        portal: String,
        /// The target.
        target: String,
        /// Per pair, `binding -> portal: reason`.
        why: Vec<String>,
    },
}

/// One failed SendTargets attempt of a discovery.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}{error}", .via.as_ref().map(|v| format!("via {v}: ")).unwrap_or_default())]
pub struct DiscoveryTry {
    /// The binding it left through (None: unbound).
    pub via: Option<String>,
    /// What failed.
    #[source]
    pub error: super::Cause<crate::iscsi::discovery::SendTargetsError>,
}

/// Opens a new byte stream for a path; called for the first login and for
/// every reconnect. Kernel TCP and the userspace stack both fit.
pub type Connector = Box<dyn FnMut() -> Result<Box<dyn Transport>, TransportError> + Send>;

/// Opens a new byte stream to a given address: what a path that follows
/// login redirects needs (the redirect names the next address).
pub type AddrConnector =
    Box<dyn FnMut(SocketAddr) -> Result<Box<dyn Transport>, TransportError> + Send>;

/// How a path opens its byte stream for each login.
pub enum PathConnector {
    /// Always the same way (a path built by hand); a login the target
    /// redirects fails, naming the address it was sent to.
    Fixed(Connector),
    /// To the portal's address, following login redirects (RFC 7143
    /// §11.13.5) a bounded number of hops: every login starts at
    /// [`LoginPortal::home`], the original address after temporary
    /// redirects, the last permanent redirect's address otherwise.
    Portal {
        /// Where logins start, and the redirects the last one followed.
        portal: LoginPortal,
        /// Opens a stream to an address.
        connect: AddrConnector,
    },
}

impl From<Connector> for PathConnector {
    fn from(c: Connector) -> PathConnector {
        PathConnector::Fixed(c)
    }
}

/// `Box<dyn Transport>` as a `Transport` (sessions are generic over it).
pub struct BoxedTransport(pub Box<dyn Transport>);

impl Transport for BoxedTransport {
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        self.0.send(buf)
    }
    // Forwarded, or every write would take the copying default.
    fn send_parts(
        &mut self,
        parts: &[crate::transport::TxPart<'_>],
    ) -> Result<usize, TransportError> {
        self.0.send_parts(parts)
    }
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        self.0.recv(buf)
    }
    fn recv_into(
        &mut self,
        sink: &mut dyn crate::transport::RxSink,
    ) -> Result<usize, TransportError> {
        self.0.recv_into(sink)
    }
    fn recv_into_wait(
        &mut self,
        sink: &mut dyn crate::transport::RxSink,
        timeout: Duration,
    ) -> Result<crate::transport::Received, TransportError> {
        self.0.recv_into_wait(sink, timeout)
    }
    fn poll(&mut self) -> Result<(), TransportError> {
        self.0.poll()
    }
    fn is_busy_polled(&self) -> bool {
        self.0.is_busy_polled()
    }
    fn wait_or_wake(
        &mut self,
        wake: &crate::transport::Wake,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        self.0.wait_or_wake(wake, timeout)
    }
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.0.wait(timeout)
    }
    fn has_side_connections(&self) -> bool {
        self.0.has_side_connections()
    }
    fn open_side(
        &mut self,
    ) -> Option<Result<crate::transport::side::SideTcp, crate::transport::TransportError>> {
        self.0.open_side()
    }
    fn pump_side(&mut self) -> bool {
        self.0.pump_side()
    }
    fn close(&mut self) {
        self.0.close()
    }
    fn local_addr(&self) -> Option<SocketAddr> {
        self.0.local_addr()
    }
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.0.peer_addr()
    }
}

/// The local half of a port binding: where one path leaves from. A path is
/// (interface, source address, portal), the way an ESXi port binding pairs
/// a VMkernel port (its uplink and address) with a target portal.
///
/// Over kernel TCP the interface becomes `SO_BINDTODEVICE` (so the path
/// leaves through it even when several interfaces share one subnet) and the
/// source address a `bind(2)`; over DPDK the interface names the port (its
/// DPDK name, or the kernel interface its af_packet vdev drives) and the
/// address must be that port's stack address. Both parts are optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortBinding {
    /// Interface the path leaves through (`eth1`, `v0`; on DPDK also the
    /// port name such as `net_af_packet0`).
    pub iface: Option<String>,
    /// Source address of the path's connection.
    pub source: Option<IpAddr>,
}

impl PortBinding {
    /// A binding to interface `iface` (the kernel picks its address).
    pub fn iface(iface: &str) -> PortBinding {
        PortBinding {
            iface: Some(iface.to_string()),
            source: None,
        }
    }

    /// A binding to interface `iface` with source address `source`.
    pub fn iface_source(iface: &str, source: IpAddr) -> PortBinding {
        PortBinding {
            iface: Some(iface.to_string()),
            source: Some(source),
        }
    }

    /// A binding to source address `source` alone.
    pub fn source(source: IpAddr) -> PortBinding {
        PortBinding {
            iface: None,
            source: Some(source),
        }
    }

    /// Whether this binds nothing (the path goes wherever routing sends it).
    pub fn is_unbound(&self) -> bool {
        self.iface.is_none() && self.source.is_none()
    }

    /// `v0 10.0.0.11`, `v0`, `10.0.0.11`, or `unbound`.
    pub fn describe(&self) -> String {
        match (&self.iface, self.source) {
            (Some(i), Some(s)) => format!("{i} {s}"),
            (Some(i), None) => i.clone(),
            (None, Some(s)) => s.to_string(),
            (None, None) => "unbound".into(),
        }
    }

    /// One binding per path from per-path interface and source lists (the
    /// CLI's repeated `--iface` and `--bind`, in the order of the paths):
    /// each list is empty or has exactly one entry per path.
    pub fn per_path(
        ifaces: &[String],
        sources: &[IpAddr],
        paths: usize,
    ) -> Result<Vec<PortBinding>, MultipathError> {
        for (what, n) in [
            ("--iface (interface)", ifaces.len()),
            ("--bind (source address)", sources.len()),
        ] {
            if n != 0 && n != paths {
                return Err(ConfigError::BindingCount {
                    paths,
                    bindings: n,
                    what,
                }
                .into());
            }
        }
        Ok((0..paths)
            .map(|i| PortBinding {
                iface: ifaces.get(i).cloned(),
                source: sources.get(i).copied(),
            })
            .collect())
    }

    /// Checks this binding against the host's interfaces for kernel TCP:
    /// the interface exists, and the source address is one of its own
    /// (or, with no interface, of some interface).
    pub fn check_kernel(&self) -> Result<(), MultipathError> {
        if self.is_unbound() {
            return Ok(());
        }
        let addrs = host_addresses().map_err(|error| ConfigError::ListInterfaces {
            binding: self.describe(),
            error,
        })?;
        if let Some(iface) = &self.iface {
            let known: Vec<&str> = addrs.iter().map(|(n, _)| n.as_str()).collect();
            if !known.contains(&iface.as_str()) {
                let mut names: Vec<String> = Vec::new();
                for n in &known {
                    if !names.iter().any(|m| m == n) {
                        names.push(n.to_string());
                    }
                }
                return Err(ConfigError::NoSuchInterface {
                    binding: self.describe(),
                    iface: iface.clone(),
                    known: names,
                }
                .into());
            }
        }
        if let Some(source) = self.source {
            let owners: Vec<&str> = addrs
                .iter()
                .filter(|(_, a)| *a == Some(source))
                .map(|(n, _)| n.as_str())
                .collect();
            match &self.iface {
                Some(iface) if !owners.contains(&iface.as_str()) => {
                    let own: Vec<String> = addrs
                        .iter()
                        .filter(|(n, a)| n == iface && a.is_some())
                        .filter_map(|(_, a)| a.map(|a| a.to_string()))
                        .collect();
                    return Err(ConfigError::NotAnAddressOf {
                        binding: self.describe(),
                        source_ip: source,
                        iface: iface.clone(),
                        own,
                    }
                    .into());
                }
                None if owners.is_empty() => {
                    return Err(ConfigError::NoInterfaceHasAddress { source_ip: source }.into());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Kernel TCP options for a path with this binding.
    pub fn kernel_options(&self, connect_timeout: Duration) -> KernelTcpOptions {
        KernelTcpOptions {
            bind: self.source.map(|ip| SocketAddr::new(ip, 0)),
            bind_device: self.iface.clone(),
            connect_timeout: Some(connect_timeout),
            ..Default::default()
        }
    }
}

/// Every interface with each of its IP addresses (`None` for an interface
/// with no address, so that it is still known by name).
fn host_addresses() -> Result<Vec<(String, Option<IpAddr>)>, nix::Error> {
    let mut out = Vec::new();
    for a in nix::ifaddrs::getifaddrs()? {
        let ip = a.address.as_ref().and_then(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        out.push((a.interface_name, ip));
    }
    Ok(out)
}

/// Checks `bindings` for `paths` paths: none, or one per path.
pub fn check_binding_count(bindings: &[PortBinding], paths: usize) -> Result<(), MultipathError> {
    if !bindings.is_empty() && bindings.len() != paths {
        return Err(ConfigError::BindingCount {
            paths,
            bindings: bindings.len(),
            what: "port",
        }
        .into());
    }
    Ok(())
}

/// One path: a connector and the login for this path's session.
pub struct PathConfig {
    /// For stats and errors, e.g. `10.0.1.1->10.0.1.2:3260`.
    pub name: String,
    /// Login parameters. Each path needs its own ISID (distinct I_T nexus);
    /// the constructors below pick a random one.
    pub login: LoginConfig,
    /// Opens this path's byte stream (first login and every reconnect).
    pub connector: PathConnector,
}

impl std::fmt::Debug for PathConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathConfig")
            .field("name", &self.name)
            .field("target", &self.login.target_name)
            .finish_non_exhaustive()
    }
}

impl PathConfig {
    /// A path over any transport.
    pub fn new(name: &str, mut login: LoginConfig, connector: Connector) -> PathConfig {
        login.isid = random_isid();
        PathConfig {
            name: name.to_string(),
            login,
            connector: PathConnector::Fixed(connector),
        }
    }

    /// A path to `portal` over any transport (`connect` opens a stream to
    /// an address) that follows login redirects: see
    /// [`PathConnector::Portal`].
    pub fn to_portal(
        name: &str,
        mut login: LoginConfig,
        portal: SocketAddr,
        connect: AddrConnector,
    ) -> PathConfig {
        login.isid = random_isid();
        PathConfig {
            name: name.to_string(),
            login,
            connector: PathConnector::Portal {
                portal: LoginPortal::new(portal),
                connect,
            },
        }
    }

    /// A kernel TCP path to `portal`, leaving from `bind` (port binding)
    /// when given.
    pub fn kernel(portal: SocketAddr, bind: Option<SocketAddr>, login: LoginConfig) -> PathConfig {
        let binding = PortBinding {
            iface: None,
            source: bind.map(|b| b.ip()),
        };
        PathConfig::kernel_bound(portal, &binding, login)
    }

    /// A kernel TCP path to `portal` through `binding`: `SO_BINDTODEVICE`
    /// on its interface and `bind(2)` to its source address, each when
    /// given. Named `iface source->portal`.
    pub fn kernel_bound(
        portal: SocketAddr,
        binding: &PortBinding,
        login: LoginConfig,
    ) -> PathConfig {
        let opts = binding.kernel_options(Duration::from_secs(2));
        let name = if binding.is_unbound() {
            portal.to_string()
        } else {
            format!("{}->{}", binding.describe(), portal)
        };
        PathConfig::to_portal(
            &name,
            login,
            portal,
            Box::new(move |addr| {
                KernelTcp::connect(addr, &opts).map(|t| Box::new(t) as Box<dyn Transport>)
            }),
        )
    }
}

/// What a worker does when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleMode {
    /// Spin: lowest latency, one core per path busy all the time.
    BusyPoll,
    /// `yield_now` after a short spin (shared machines).
    Yield,
    /// Sleep this long after a short spin (shared machines, CI).
    Sleep(Duration),
    /// Spin this long, then block on the socket and on the path's wake-up
    /// eventfd, which a submission signals (kernel TCP; a busy-polled
    /// transport keeps spinning, yielding).
    Block(Duration),
}

/// Everything `WorkerDevice::open` needs.
#[derive(Debug)]
pub struct DeviceConfig {
    /// The paths, all to the same LU.
    pub paths: Vec<PathConfig>,
    /// LUN number (as in `iscsi://host/iqn/LUN`).
    pub lun: u16,
    /// Path selection policy.
    pub policy: Policy,
    /// Most I/Os in flight per `IoQueue`; `submit` answers `QueueFull` beyond.
    pub queue_depth: usize,
    /// How long I/O waits for a usable path before failing with `NoPath`.
    pub no_path_timeout: Duration,
    /// Retries after retryable SCSI errors (UNIT ATTENTION, BUSY, ...).
    /// Resubmissions after path failures do not count.
    pub max_retries: u32,
    /// Hold a write that a failed session gave back until its path is
    /// fenced (logged in again, ending the old session) instead of retrying
    /// it elsewhere at once; see docs/multipath.md, "Fencing". On by default.
    pub fence_writes: bool,
    /// How long such a write waits for the fence before it fails with
    /// `IoError::NotFenced`.
    pub fence_timeout: Duration,
    /// With `fence_writes`: when a path fails with writes in its session,
    /// another live path of the same target portal group logs in once with
    /// the failed path's ISID (ending its session, RFC 7143 §6.3.5) and out
    /// again, so the held writes go out without waiting for the failed
    /// portal to return (`multipath::fence`). On by default.
    pub fence_via_other_portals: bool,
    /// ABORT TASK of a command that stays unanswered on a path that still
    /// answers (`multipath::fence::TaskAborts`): once the target confirms,
    /// the command goes to another path without failing this one; a refused
    /// or unanswered abort fails the path (and its writes wait for the next
    /// fence steps). Some(10 s, answered within 3 s) by default; None:
    /// such a command waits for the `command_timeout`, which fails the path.
    pub abort_overdue: Option<crate::multipath::AbortPolicy>,
    /// With `fence_writes`: the reservation fence step
    /// (`multipath::fence::ReservationFence`): every path registers its
    /// own key at login under a Write Exclusive – Registrants Only
    /// reservation, and a failed path whose portal group has no live path
    /// left is fenced by PREEMPT AND ABORT of its key through a live path.
    /// Off (None) by default: other initiators sharing the LU can write only
    /// if they register too.
    pub reservation_fence: Option<crate::multipath::ReservationFence>,
    /// With `fence_writes`: the last resort. A failed session that no other
    /// step has fenced this long after its path failed gets LOGICAL UNIT
    /// RESET through a live path. That aborts the tasks of *every*
    /// initiator on the LU (other hosts' commands in flight fail or must
    /// be retried, and all see UNIT ATTENTION 29/03), and it ends only
    /// what the LU has received: commands a network still holds run after
    /// it. Off (None) by default.
    pub lun_reset_fence: Option<Duration>,
    /// Ping a path at once when it has commands outstanding and has sent
    /// nothing for several times its recent response time (None: only the
    /// `timers` ping). See `multipath::silence`.
    pub fast_ping: Option<crate::multipath::FastPing>,
    /// NOP-Out pings on idle paths and the command timeout.
    pub timers: ConnTimers,
    /// Time allowed for each path's connect + login (+ probe).
    pub login_timeout: Duration,
    /// Back-off between reconnect attempts of a failed path.
    pub reconnect: ReconnectPolicy,
    /// What idle path workers do.
    pub idle: IdleMode,
    /// Cores to pin workers to (worker i on `cores[i % len]`); empty: no pinning.
    pub cores: Vec<usize>,
    /// Under `Policy::Failover`: when to return to the preferred path
    /// (default manual: never by itself). See `multipath::health`.
    pub failback: crate::multipath::Failback,
    /// Hold a flapping path down (multipath-tools' `san_path_err_*`);
    /// None (default): a failed path reconnects with back-off only.
    pub flap_damping: Option<crate::multipath::FlapDamping>,
    /// MC/S: the paths become the connections of one session (path 0's
    /// leading login offers MaxConnections = the number of paths; the
    /// others join with its ISID and TSIH, CID = their index) instead of
    /// sessions of their own. Open fails with
    /// `MultipathError::McsNotGranted` when the target grants fewer. A
    /// failed connection's writes are fenced by a Logout (reason 1, close
    /// the connection) sent on a live connection. See docs/multipath.md,
    /// "MC/S". Off by default.
    pub mcs: bool,
}

impl DeviceConfig {
    /// Defaults: queue-depth policy, depth 128, 30 s `no_path_timeout`,
    /// 8 retries, writes fenced (30 s `fence_timeout`), NOP every 2 s, 20 s command timeout, busy-polling workers.
    pub fn new(paths: Vec<PathConfig>, lun: u16) -> DeviceConfig {
        DeviceConfig {
            paths,
            lun,
            policy: Policy::QueueDepth,
            queue_depth: 128,
            no_path_timeout: Duration::from_secs(30),
            max_retries: 8,
            fence_writes: true,
            fence_timeout: Duration::from_secs(30),
            fence_via_other_portals: true,
            abort_overdue: Some(crate::multipath::AbortPolicy::default()),
            reservation_fence: None,
            lun_reset_fence: None,
            fast_ping: Some(crate::multipath::FastPing::default()),
            timers: ConnTimers {
                nop_interval: Some(Duration::from_secs(2)),
                nop_timeout: Duration::from_secs(3),
                command_timeout: Some(Duration::from_secs(20)),
            },
            login_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            idle: IdleMode::BusyPoll,
            cores: Vec::new(),
            failback: crate::multipath::Failback::default(),
            flap_damping: None,
            mcs: false,
        }
    }

    /// Sets `no_path_timeout` from multipath-tools' `no_path_retry`: fail
    /// at once, `n` checks `interval` apart, or queue until a path returns.
    pub fn set_no_path_retry(&mut self, retry: crate::multipath::NoPathRetry, interval: Duration) {
        self.no_path_timeout = retry.timeout(interval);
    }

    /// Paths from URLs (`iscsi://[user%pass@]host[:port]/iqn/lun`), one per
    /// URL, kernel TCP, path `i` through `bindings[i]` (none, or one per
    /// URL; each checked against the host's interfaces). All URLs must name
    /// the same target and LUN.
    pub fn from_urls(
        urls: &[&str],
        initiator: &str,
        bindings: &[PortBinding],
    ) -> Result<DeviceConfig, MultipathError> {
        check_binding_count(bindings, urls.len())?;
        for b in bindings {
            b.check_kernel()?;
        }
        DeviceConfig::from_urls_with(urls, initiator, |i, addr, login| {
            let binding = bindings.get(i).cloned().unwrap_or_default();
            if binding
                .source
                .is_some_and(|s| s.is_ipv4() != addr.is_ipv4())
            {
                return Err(ConfigError::AddressFamily {
                    path: i,
                    binding: binding.describe(),
                    portal: addr,
                }
                .into());
            }
            Ok(PathConfig::kernel_bound(addr, &binding, login))
        })
    }

    /// [`DeviceConfig::from_urls`] with another transport: `make_path(i,
    /// portal, login)` builds path `i` from its URL's resolved portal and
    /// login (credentials from the URL).
    pub fn from_urls_with(
        urls: &[&str],
        initiator: &str,
        mut make_path: impl FnMut(usize, SocketAddr, LoginConfig) -> Result<PathConfig, MultipathError>,
    ) -> Result<DeviceConfig, MultipathError> {
        let mut paths = Vec::new();
        let mut lun = None;
        let mut target: Option<String> = None;
        for (i, u) in urls.iter().enumerate() {
            let url = IscsiUrl::parse(u).map_err(ConfigError::from)?;
            let (t, l) = url.require_target().map_err(ConfigError::from)?;
            if target.as_deref().is_some_and(|x| x != t) || lun.is_some_and(|x| x != l) {
                return Err(ConfigError::OtherTarget {
                    url: url.to_string(),
                }
                .into());
            }
            target = Some(t.to_string());
            lun = Some(l);
            let addr = url.socket_addr().map_err(|e| ConfigError::PortalAddress {
                url: url.to_string(),
                error: e.into(),
            })?;
            let login = login_from_url(&url, initiator, t);
            paths.push(make_path(i, addr, login)?);
        }
        let lun = lun.ok_or(ConfigError::NoPaths)?;
        Ok(DeviceConfig::new(paths, lun))
    }

    /// Paths from SendTargets discovery through `portal` over kernel TCP:
    /// one path per portal the target reports, per binding when several
    /// are given (the full mesh of bindings × portals; a source address
    /// only pairs with portals of its own family). Discovery itself leaves
    /// through the first binding. For the mesh with reachability checks
    /// and a per-portal cap, see `Options::discover_paths`.
    pub fn from_discovery(
        portal: SocketAddr,
        initiator: &str,
        target: &str,
        lun: u16,
        bindings: &[PortBinding],
    ) -> Result<DeviceConfig, MultipathError> {
        for b in bindings {
            b.check_kernel()?;
        }
        let first = bindings.first().cloned().unwrap_or_default();
        let k = first.kernel_options(Duration::from_secs(3));
        // Login redirects are followed, as for the paths' own logins.
        let found = send_targets_at(
            &mut LoginPortal::new(portal),
            |a| KernelTcp::connect(a, &k),
            LoginConfig::new(initiator, None),
            Duration::from_secs(10),
        )
        .map_err(|e| DiscoveryError::SendTargets {
            portal: portal.to_string(),
            tries: vec![DiscoveryTry {
                via: (!first.is_unbound()).then(|| first.describe()),
                error: e.into(),
            }],
        })?;
        let t = found.iter().find(|t| t.name == target).ok_or_else(|| {
            DiscoveryError::TargetNotReported {
                portal: portal.to_string(),
                target: target.to_string(),
                reported: found.iter().map(|t| t.name.clone()).collect(),
            }
        })?;
        let bindings: Vec<PortBinding> = if bindings.is_empty() {
            vec![PortBinding::default()]
        } else {
            bindings.to_vec()
        };
        let mut paths = Vec::new();
        for p in &t.portals {
            let Ok(addr) = p.address().parse::<SocketAddr>() else {
                continue;
            };
            for b in &bindings {
                // A source address only reaches portals of its own family.
                if b.source.is_some_and(|s| s.is_ipv4() != addr.is_ipv4()) {
                    continue;
                }
                paths.push(PathConfig::kernel_bound(
                    addr,
                    b,
                    LoginConfig::new(initiator, Some(target)),
                ));
            }
        }
        if paths.is_empty() {
            return Err(DiscoveryError::NoPortal {
                portal: portal.to_string(),
                target: target.to_string(),
            }
            .into());
        }
        Ok(DeviceConfig::new(paths, lun))
    }
}

fn login_from_url(url: &IscsiUrl, initiator: &str, target: &str) -> LoginConfig {
    let mut login = LoginConfig::new(initiator, Some(target));
    if let (Some(u), Some(p)) = (&url.user, &url.password) {
        login.chap = Some(Credentials {
            user: u.clone(),
            secret: Secret::new(p.as_bytes()),
        });
    }
    if let (Some(u), Some(p)) = (&url.target_user, &url.target_password) {
        login.mutual_chap = Some(Credentials {
            user: u.clone(),
            secret: Secret::new(p.as_bytes()),
        });
    }
    login
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_per_path_need_one_per_path_or_none() {
        let ifaces = vec!["v0".to_string(), "v1".to_string()];
        let src: Vec<IpAddr> = vec!["10.0.0.11".parse().unwrap()];
        let b = PortBinding::per_path(&ifaces, &[], 2).unwrap();
        assert_eq!(b[1], PortBinding::iface("v1"));
        assert!(PortBinding::per_path(&[], &[], 3)
            .unwrap()
            .iter()
            .all(PortBinding::is_unbound));
        let e = PortBinding::per_path(&ifaces, &src, 2).unwrap_err();
        assert!(e.to_string().contains("2 path(s) but 1 --bind"), "{e}");
        let e = PortBinding::per_path(&ifaces, &[], 3).unwrap_err();
        assert!(e.to_string().contains("3 path(s) but 2 --iface"), "{e}");
    }

    #[test]
    fn kernel_bindings_are_checked_against_the_interfaces() {
        let lo = "127.0.0.1".parse().unwrap();
        PortBinding::iface_source("lo", lo).check_kernel().unwrap();
        PortBinding::source(lo).check_kernel().unwrap();
        let e = PortBinding::iface("no-such-if0")
            .check_kernel()
            .unwrap_err();
        assert!(
            e.to_string().contains("no interface named \"no-such-if0\""),
            "{e}"
        );
        let e = PortBinding::source("192.0.2.77".parse().unwrap())
            .check_kernel()
            .unwrap_err();
        assert!(
            e.to_string().contains("no interface here has that address"),
            "{e}"
        );
        let e = PortBinding::iface_source("lo", "192.0.2.77".parse().unwrap())
            .check_kernel()
            .unwrap_err();
        assert!(e.to_string().contains("is not an address of lo"), "{e}");
        let e = DeviceConfig::from_urls(
            &["iscsi://127.0.0.1/iqn.x:y/0", "iscsi://127.0.0.2/iqn.x:y/0"],
            "iqn.x:i",
            &[PortBinding::iface("lo")],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("2 path(s) but 1 port binding"),
            "{e}"
        );
        let c = DeviceConfig::from_urls(
            &["iscsi://127.0.0.1/iqn.x:y/0"],
            "iqn.x:i",
            &[PortBinding::iface_source("lo", lo)],
        )
        .unwrap();
        assert_eq!(c.paths[0].name, "lo 127.0.0.1->127.0.0.1:3260");
    }
}
