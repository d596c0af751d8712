//! The easy way in: [`WorkerDevice::open_urls`] with [`Options`].
//!
//! ```no_run
//! use iscsi_bypass::{Chap, Device, Options};
//! let opts = Options {
//!     chap: Chap::from_env(),
//!     cores: vec![2, 3],
//!     ..Options::default()
//! };
//! let dev = Device::open_urls(
//!     &["iscsi://10.0.1.2/iqn.2003-01.org.example:disk/0",
//!       "iscsi://10.0.2.2/iqn.2003-01.org.example:disk/0"],
//!     &opts,
//! )?;
//! let mut q = dev.queue_pair(); // one per application thread
//! let mut block = vec![0u8; dev.block_size() as usize];
//! q.read_at(0, &mut block)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::WorkerDevice;
use crate::iscsi::chap::{ChapAlgorithm, Credentials, Secret};
use crate::iscsi::discovery::DiscoveredTarget;
use crate::iscsi::login::LoginConfig;
use crate::multipath::{
    ConfigError, DeviceConfig, DiscoveryError, IdleMode, MultipathError, Policy, PortBinding,
};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Which byte stream the paths run over.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum Transport {
    /// Kernel TCP sockets (`poll(2)`-driven, one per path).
    #[default]
    Kernel,
    /// The userspace TCP/IP stack on started DPDK ports
    /// ([`DpdkStack::open`](crate::transport::dpdk::DpdkStack::open)): each
    /// path runs on a stack whose subnet holds its portal (the one with the
    /// fewest paths so far), or, with no such stack, on `stacks[i % n]`
    /// (through its gateway). Each path takes the next free queue pair of
    /// its stack, so a stack needs as many queues as paths land on it (and,
    /// with more than one, a port that reports its RSS configuration). Each
    /// path worker then owns one queue pair, one stack instance and one
    /// connection; nothing on its I/O path enters the kernel.
    #[cfg(feature = "dpdk")]
    Dpdk(Vec<std::sync::Arc<crate::transport::dpdk::DpdkStack>>),
}

/// CHAP credentials for every path's login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chap {
    /// Our CHAP name and secret (the target checks them).
    pub initiator: Credentials,
    /// The target's name and secret, for mutual CHAP (we check them).
    pub target: Option<Credentials>,
}

fn env_first(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

impl Chap {
    /// One-way CHAP.
    pub fn new(user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Chap {
        Chap {
            initiator: Credentials {
                user: user.into(),
                secret: Secret::new(secret),
            },
            target: None,
        }
    }

    /// Adds the target's credentials (mutual CHAP).
    pub fn mutual(mut self, user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Chap {
        self.target = Some(Credentials {
            user: user.into(),
            secret: Secret::new(secret),
        });
        self
    }

    /// From the environment: `ISCSI_CHAP_USER` + `ISCSI_CHAP_PASSWORD`
    /// (or libiscsi's `LIBISCSI_CHAP_USERNAME` / `LIBISCSI_CHAP_PASSWORD`),
    /// and for mutual CHAP `ISCSI_CHAP_TARGET_USER` +
    /// `ISCSI_CHAP_TARGET_PASSWORD`. `None` when user or secret is unset.
    pub fn from_env() -> Option<Chap> {
        let user = env_first(&["ISCSI_CHAP_USER", "LIBISCSI_CHAP_USERNAME"])?;
        let secret = env_first(&["ISCSI_CHAP_PASSWORD", "LIBISCSI_CHAP_PASSWORD"])?;
        let mut c = Chap::new(user, secret.into_bytes());
        if let (Some(u), Some(s)) = (
            env_first(&["ISCSI_CHAP_TARGET_USER", "LIBISCSI_CHAP_TARGET_USERNAME"]),
            env_first(&[
                "ISCSI_CHAP_TARGET_PASSWORD",
                "LIBISCSI_CHAP_TARGET_PASSWORD",
            ]),
        ) {
            c = c.mutual(u, s.into_bytes());
        }
        Some(c)
    }

    /// `user` with the secret on the first line of `secret_file`.
    pub fn from_file(user: impl Into<String>, secret_file: &Path) -> std::io::Result<Chap> {
        let text = std::fs::read_to_string(secret_file)?;
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if line.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("secret file {} is empty", secret_file.display()),
            ));
        }
        Ok(Chap::new(user, line.as_bytes().to_vec()))
    }
}

/// What [`WorkerDevice::open_urls`] needs besides the URLs. Every field
/// has a default (`Options::default()`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Our initiator IQN (default `iqn.2026-11.org.iscsi-bypass:<hostname>`).
    pub initiator: String,
    /// Transport of every path.
    pub transport: Transport,
    /// Port binding of each path (`bindings[i]` for the `i`th URL: the
    /// interface it leaves through and its source address); empty: no
    /// binding, otherwise exactly one per URL. With discovery
    /// ([`Options::discover_paths`]) these are the bindings to mesh with
    /// the target's portals.
    pub bindings: Vec<PortBinding>,
    /// Cores to pin the path workers to (worker `i` on `cores[i % len]`);
    /// empty: no pinning.
    pub cores: Vec<usize>,
    /// Path selection policy.
    pub policy: Policy,
    /// Most I/Os in flight per [`IoQueue`](super::IoQueue).
    pub queue_depth: usize,
    /// How long I/O waits for a usable path before failing with
    /// [`IoError::NoPath`](crate::multipath::IoError::NoPath).
    pub no_path_timeout: Duration,
    /// Login timeout per path.
    pub login_timeout: Duration,
    /// What idle path workers do: `BusyPoll` for the lowest latency (one
    /// core per path), `Sleep` on shared machines.
    pub idle: IdleMode,
    /// CHAP for every path; URL credentials (`user%secret@`) apply when `None`.
    pub chap: Option<Chap>,
    /// CHAP algorithms offered on every login, most preferred first
    /// (default SHA3-256, SHA-256, SHA-1, MD5).
    pub chap_algorithms: Vec<ChapAlgorithm>,
    /// multipath-tools' `no_path_retry`; when set it replaces
    /// `no_path_timeout` (fail at once, N checks of
    /// [`NO_PATH_CHECK_INTERVAL`](crate::multipath::health::NO_PATH_CHECK_INTERVAL), or queue).
    pub no_path_retry: Option<crate::multipath::NoPathRetry>,
    /// Under `Policy::Failover`: when to return to the preferred path.
    pub failback: crate::multipath::Failback,
    /// Hold flapping paths down (`san_path_err_*`); None: off.
    pub flap_damping: Option<crate::multipath::FlapDamping>,
    /// ABORT TASK of commands overdue on a live path
    /// ([`DeviceConfig::abort_overdue`]); on by default.
    pub abort_overdue: Option<crate::multipath::AbortPolicy>,
    /// The reservation fence step ([`DeviceConfig::reservation_fence`]);
    /// off by default.
    pub reservation_fence: Option<crate::multipath::ReservationFence>,
    /// The last-resort LOGICAL UNIT RESET ([`DeviceConfig::lun_reset_fence`]);
    /// off by default.
    pub lun_reset_fence: Option<Duration>,
    /// MC/S: the URLs (or discovered portals) become connections of one
    /// session instead of sessions of their own
    /// ([`DeviceConfig::mcs`]); off by default.
    pub mcs: bool,
}

impl Default for Options {
    fn default() -> Options {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let base = DeviceConfig::new(Vec::new(), 0);
        Options {
            initiator: format!("iqn.2026-11.org.iscsi-bypass:{host}"),
            transport: Transport::Kernel,
            bindings: Vec::new(),
            cores: Vec::new(),
            policy: base.policy,
            queue_depth: base.queue_depth,
            no_path_timeout: base.no_path_timeout,
            login_timeout: base.login_timeout,
            idle: base.idle,
            chap: None,
            chap_algorithms: ChapAlgorithm::PREFERRED.to_vec(),
            no_path_retry: None,
            failback: base.failback,
            flap_damping: base.flap_damping,
            abort_overdue: base.abort_overdue,
            reservation_fence: base.reservation_fence,
            lun_reset_fence: base.lun_reset_fence,
            mcs: base.mcs,
        }
    }
}

impl Options {
    /// The full [`DeviceConfig`] for `urls` (one path per URL), to adjust
    /// further before [`WorkerDevice::open`].
    pub fn device_config(&self, urls: &[&str]) -> Result<DeviceConfig, MultipathError> {
        let mut c = match &self.transport {
            Transport::Kernel => DeviceConfig::from_urls(urls, &self.initiator, &self.bindings)?,
            #[cfg(feature = "dpdk")]
            Transport::Dpdk(stacks) => {
                crate::multipath::config::check_binding_count(&self.bindings, urls.len())?;
                DeviceConfig::from_urls_with(
                    urls,
                    &self.initiator,
                    dpdk_path_maker(stacks, &self.bindings)?,
                )?
            }
        };
        for p in &mut c.paths {
            if let Some(chap) = &self.chap {
                p.login.chap = Some(chap.initiator.clone());
                p.login.mutual_chap = chap.target.clone();
            }
            p.login.chap_algorithms = self.chap_algorithms.clone();
        }
        c.cores = self.cores.clone();
        c.policy = self.policy;
        c.queue_depth = self.queue_depth;
        c.no_path_timeout = self.no_path_timeout;
        if let Some(r) = self.no_path_retry {
            c.set_no_path_retry(r, crate::multipath::health::NO_PATH_CHECK_INTERVAL);
        }
        c.failback = self.failback;
        c.flap_damping = self.flap_damping;
        c.abort_overdue = self.abort_overdue;
        c.reservation_fence = self.reservation_fence;
        c.lun_reset_fence = self.lun_reset_fence;
        c.mcs = self.mcs;
        c.login_timeout = self.login_timeout;
        c.idle = self.idle;
        Ok(c)
    }
}

/// Whether `ip` is in the subnet of `stack`.
#[cfg(feature = "dpdk")]
fn on_subnet(stack: &crate::transport::dpdk::DpdkStack, ip: std::net::Ipv4Addr) -> bool {
    let o = stack.options();
    crate::transport::user::on_link(o.local_ip, o.user.prefix_len, ip)
}

/// The kernel interface a DPDK port drives, when it is an af_packet (or
/// similar) vdev named in the EAL arguments with `iface=NAME`.
#[cfg(feature = "dpdk")]
pub fn dpdk_port_iface(stack: &crate::transport::dpdk::DpdkStack) -> Option<String> {
    let o = stack.options();
    vdev_iface(&o.eal_args, &o.port)
}

/// `NAME` of `--vdev PORT,...,iface=NAME` (or `--vdev=...`) in `eal_args`.
#[cfg(any(feature = "dpdk", test))]
fn vdev_iface(eal_args: &[String], port: &str) -> Option<String> {
    let mut args = eal_args.iter();
    while let Some(a) = args.next() {
        let vdev = match a.strip_prefix("--vdev=") {
            Some(v) => v,
            None if a == "--vdev" => args.next()?,
            None => continue,
        };
        let mut parts = vdev.split(',');
        if parts.next() != Some(port) {
            continue;
        }
        if let Some(name) = parts.find_map(|kv| kv.strip_prefix("iface=")) {
            return Some(name.to_string());
        }
    }
    None
}

/// The stack `binding` names: its interface is the port's DPDK name or the
/// kernel interface the port drives, and its source (if given) is the
/// stack's address.
#[cfg(feature = "dpdk")]
fn stack_for_binding(
    stacks: &[std::sync::Arc<crate::transport::dpdk::DpdkStack>],
    binding: &PortBinding,
) -> Result<usize, ConfigError> {
    let by_iface = |s: &crate::transport::dpdk::DpdkStack, iface: &str| {
        s.options().port == iface || dpdk_port_iface(s).as_deref() == Some(iface)
    };
    let by_source = |s: &crate::transport::dpdk::DpdkStack| {
        binding
            .source
            .is_none_or(|ip| ip == std::net::IpAddr::V4(s.options().local_ip))
    };
    let describe_all = || {
        stacks
            .iter()
            .map(|s| match dpdk_port_iface(s) {
                Some(i) => format!("{} on {i} at {}", s.options().port, s.options().local_ip),
                None => format!("{} at {}", s.options().port, s.options().local_ip),
            })
            .collect::<Vec<_>>()
    };
    let found =
        match &binding.iface {
            Some(iface) => {
                let s = stacks
                    .iter()
                    .position(|s| by_iface(s, iface))
                    .ok_or_else(|| ConfigError::NoDpdkPort {
                        binding: binding.describe(),
                        iface: iface.clone(),
                        ports: describe_all(),
                    })?;
                if let Some(wanted) = binding.source.filter(|_| !by_source(&stacks[s])) {
                    return Err(ConfigError::DpdkStackAddress {
                        binding: binding.describe(),
                        port: stacks[s].options().port.clone(),
                        has: stacks[s].options().local_ip,
                        wanted,
                    });
                }
                s
            }
            None => stacks.iter().position(|s| by_source(s)).ok_or_else(|| {
                ConfigError::NoDpdkStackAt {
                    binding: binding.describe(),
                    stacks: describe_all(),
                }
            })?,
        };
    Ok(found)
}

/// A path maker for [`DeviceConfig::from_urls_with`] that puts path `i` on
/// a userspace stack: the one `bindings[i]` names (port binding), or with
/// no binding one on the portal's subnet with the fewest paths so far, else
/// `stacks[i % n]`; the path takes that stack's next free queue pair.
#[cfg(feature = "dpdk")]
pub fn dpdk_path_maker<'a>(
    stacks: &'a [std::sync::Arc<crate::transport::dpdk::DpdkStack>],
    bindings: &'a [PortBinding],
) -> Result<
    impl FnMut(
            usize,
            SocketAddr,
            LoginConfig,
        ) -> Result<crate::multipath::PathConfig, MultipathError>
        + 'a,
    MultipathError,
> {
    if stacks.is_empty() {
        return Err(ConfigError::NoDpdkStack.into());
    }
    let mut used = vec![0usize; stacks.len()];
    Ok(move |i: usize, addr: SocketAddr, login: LoginConfig| {
        let SocketAddr::V4(remote) = addr else {
            return Err(ConfigError::Ipv6OnUserspaceStack {
                path: i,
                portal: addr,
            }
            .into());
        };
        let s = match bindings.get(i).filter(|b| !b.is_unbound()) {
            Some(b) => stack_for_binding(stacks, b)?,
            None => (0..stacks.len())
                .filter(|&s| on_subnet(&stacks[s], *remote.ip()))
                .min_by_key(|&s| used[s])
                .unwrap_or(i % stacks.len()),
        };
        let stack = &stacks[s];
        let queue = used[s];
        used[s] += 1;
        let port = &stack.options().port;
        if queue >= usize::from(stack.queues()) {
            return Err(ConfigError::NoQueuePair {
                path: i,
                remote,
                queue,
                port: port.clone(),
                queues: stack.queues(),
            }
            .into());
        }
        let name = format!("{port}/q{queue} {}->{remote}", stack.options().local_ip);
        Ok(crate::multipath::PathConfig::to_portal(
            &name,
            login,
            addr,
            Box::new(stack.addr_connector(queue as u16)),
        ))
    })
}

/// Why a discovery or reachability connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The transport could not connect.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// The userspace stack and an IPv6 portal.
    #[cfg(feature = "dpdk")]
    #[error("the userspace stack speaks IPv4 only")]
    Ipv6OnUserspaceStack,
    /// The binding names no usable stack.
    #[error(transparent)]
    Binding(#[from] ConfigError),
    /// `Transport::Dpdk` with no stack.
    #[cfg(feature = "dpdk")]
    #[error("Transport::Dpdk has no stack")]
    NoDpdkStack,
}

/// A binding × portal pair that discovery could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreachablePair {
    /// The local half of the pair.
    pub binding: PortBinding,
    /// The portal (`host:port`) as the target reported it.
    pub portal: String,
    /// Why not: the connect error, or another address family.
    pub reason: String,
}

/// What [`Options::discover_paths`] found: one path per usable binding ×
/// portal pair.
#[derive(Debug, Clone, Default)]
pub struct DiscoveredPaths {
    /// The target's name.
    pub target: String,
    /// One URL per path.
    pub urls: Vec<String>,
    /// Path `i`'s binding (for [`Options::bindings`]).
    pub bindings: Vec<PortBinding>,
    /// Pairs that could not reach the target.
    pub unreachable: Vec<UnreachablePair>,
    /// Reachable pairs left out by the per-portal cap.
    pub capped: Vec<(PortBinding, String)>,
}

impl DiscoveredPaths {
    /// `Options` for opening these paths: `base` with these bindings.
    pub fn options(&self, base: &Options) -> Options {
        Options {
            bindings: self.bindings.clone(),
            ..base.clone()
        }
    }
}

impl Options {
    /// One byte stream to `addr` through `binding` over this transport:
    /// kernel TCP bound as the binding says, or queue 0 of the DPDK stack
    /// the binding names (with no binding: the stack on `addr`'s subnet,
    /// else the first). For discovery and reachability probes, while no
    /// device holds the queues.
    fn connect_through(
        &self,
        addr: SocketAddr,
        binding: &PortBinding,
        timeout: Duration,
    ) -> Result<crate::multipath::BoxedTransport, ConnectError> {
        match &self.transport {
            Transport::Kernel => {
                let opts = binding.kernel_options(timeout);
                let t = crate::transport::kernel::KernelTcp::connect(addr, &opts)?;
                Ok(crate::multipath::BoxedTransport(Box::new(t)))
            }
            #[cfg(feature = "dpdk")]
            Transport::Dpdk(stacks) => {
                let SocketAddr::V4(remote) = addr else {
                    return Err(ConnectError::Ipv6OnUserspaceStack);
                };
                let s = if binding.is_unbound() {
                    stacks
                        .iter()
                        .position(|s| on_subnet(s, *remote.ip()))
                        .unwrap_or(0)
                } else {
                    stack_for_binding(stacks, binding)?
                };
                let stack = stacks.get(s).ok_or(ConnectError::NoDpdkStack)?;
                let t = stack.connect(0, remote)?;
                Ok(crate::multipath::BoxedTransport(Box::new(t)))
            }
        }
    }

    /// SendTargets at `addr`, leaving through the first of the bindings
    /// (or none) that works.
    fn send_targets_through(
        &self,
        addr: SocketAddr,
        portal: &str,
    ) -> Result<Vec<DiscoveredTarget>, MultipathError> {
        use crate::iscsi::discovery::send_targets_at;
        use crate::iscsi::redirect::LoginPortal;
        if matches!(self.transport, Transport::Kernel) {
            for b in &self.bindings {
                b.check_kernel()?;
            }
        }
        let mut login = LoginConfig::new(&self.initiator, None);
        login.chap_algorithms = self.chap_algorithms.clone();
        if let Some(chap) = &self.chap {
            login.chap = Some(chap.initiator.clone());
            login.mutual_chap = chap.target.clone();
        }
        let unbound = [PortBinding::default()];
        let tries: &[PortBinding] = if self.bindings.is_empty() {
            &unbound
        } else {
            &self.bindings
        };
        let mut failed = Vec::new();
        for b in tries {
            // Login redirects are followed (an array's group address
            // sends discovery logins on to a member portal).
            let found = send_targets_at(
                &mut LoginPortal::new(addr),
                |a| {
                    self.connect_through(a, b, self.login_timeout)
                        .map_err(|e| match e {
                            ConnectError::Transport(e) => e,
                            other => {
                                crate::transport::TransportError::Io(std::io::Error::other(other))
                            }
                        })
                },
                login.clone(),
                self.login_timeout,
            );
            match found {
                Ok(found) => return Ok(found),
                Err(e) => failed.push(crate::multipath::config::DiscoveryTry {
                    via: (!b.is_unbound()).then(|| b.describe()),
                    error: e.into(),
                }),
            }
        }
        Err(DiscoveryError::SendTargets {
            portal: portal.to_string(),
            tries: failed,
        }
        .into())
    }

    /// SendTargets through `portal` (`host[:port]`, port 3260 by default):
    /// one URL per portal the target reports, for LUN `lun`. `target` picks
    /// the target when the portal serves several (with one, None will do).
    /// Runs over this transport: kernel TCP (leaving through the first of
    /// `bindings` that works) or a DPDK stack's queue 0 (free again
    /// afterwards); `chap` applies to the discovery login too.
    pub fn discover_urls(
        &self,
        portal: &str,
        target: Option<&str>,
        lun: u16,
    ) -> Result<Vec<String>, MultipathError> {
        let addr = resolve_portal(portal).ok_or_else(|| DiscoveryError::BadPortal {
            portal: portal.to_string(),
        })?;
        let found = self.send_targets_through(addr, portal)?;
        let chosen = choose_target(&found, target, portal)?;
        let urls: Vec<String> = chosen
            .portals
            .iter()
            .map(|p| format!("iscsi://{}/{}/{lun}", p.address(), chosen.name))
            .collect();
        if urls.is_empty() {
            return Err(DiscoveryError::NoPortal {
                portal: portal.to_string(),
                target: chosen.name.clone(),
            }
            .into());
        }
        Ok(urls)
    }

    /// Discovery across port bindings, as ESXi does for a bound adapter:
    /// SendTargets through `portal`, then every binding of
    /// [`Options::bindings`] × every portal the target reports that can
    /// reach it (each pair is tried with a connect, closed again) becomes a
    /// path, at most `max_per_portal` per portal. With no bindings: one
    /// path per portal, as [`Options::discover_urls`]. Pairs that cannot
    /// reach the target are listed in the answer; none reaching it is an
    /// error naming every pair and why.
    pub fn discover_paths(
        &self,
        portal: &str,
        target: Option<&str>,
        lun: u16,
        max_per_portal: Option<usize>,
    ) -> Result<DiscoveredPaths, MultipathError> {
        if max_per_portal == Some(0) {
            return Err(DiscoveryError::ZeroPerPortal {
                portal: portal.to_string(),
            }
            .into());
        }
        let addr = resolve_portal(portal).ok_or_else(|| DiscoveryError::BadPortal {
            portal: portal.to_string(),
        })?;
        let found = self.send_targets_through(addr, portal)?;
        let chosen = choose_target(&found, target, portal)?;
        let probe = !self.bindings.is_empty();
        let bindings = if probe {
            self.bindings.clone()
        } else {
            vec![PortBinding::default()]
        };
        let probe_timeout = self.login_timeout.min(Duration::from_secs(3));
        let mut out = DiscoveredPaths {
            target: chosen.name.clone(),
            ..DiscoveredPaths::default()
        };
        // Paths taken per binding so far: with a cap, each portal prefers
        // the bindings with the fewest paths (so two interfaces capped at
        // one path per portal spread over two portals).
        let mut used = vec![0usize; bindings.len()];
        for p in &chosen.portals {
            let text = p.address();
            let mut taken = 0;
            let mut order: Vec<usize> = (0..bindings.len()).collect();
            order.sort_by_key(|&b| used[b]);
            for bi in order {
                let b = &bindings[bi];
                let unreachable = |reason: String| UnreachablePair {
                    binding: b.clone(),
                    portal: text.clone(),
                    reason,
                };
                let Ok(portal_addr) = text.parse::<SocketAddr>() else {
                    out.unreachable
                        .push(unreachable("not an IP address and port".into()));
                    continue;
                };
                if b.source
                    .is_some_and(|s| s.is_ipv4() != portal_addr.is_ipv4())
                {
                    out.unreachable
                        .push(unreachable("another address family".into()));
                    continue;
                }
                if probe {
                    match self.connect_through(portal_addr, b, probe_timeout) {
                        Ok(mut t) => crate::transport::Transport::close(&mut t),
                        Err(e) => {
                            out.unreachable.push(unreachable(e.to_string()));
                            continue;
                        }
                    }
                }
                if max_per_portal.is_some_and(|m| taken >= m) {
                    out.capped.push((b.clone(), text.clone()));
                    continue;
                }
                out.urls
                    .push(format!("iscsi://{text}/{}/{lun}", chosen.name));
                out.bindings.push(b.clone());
                used[bi] += 1;
                taken += 1;
            }
        }
        if out.urls.is_empty() {
            let why: Vec<String> = out
                .unreachable
                .iter()
                .map(|u| format!("{} -> {}: {}", u.binding.describe(), u.portal, u.reason))
                .collect();
            return Err(DiscoveryError::NoUsablePair {
                portal: portal.to_string(),
                target: chosen.name.clone(),
                why,
            }
            .into());
        }
        if !probe {
            out.bindings.clear();
        }
        Ok(out)
    }
}

/// `host:port`, or `host` with port 3260.
fn resolve_portal(portal: &str) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    portal
        .parse::<SocketAddr>()
        .ok()
        .or_else(|| (portal, 3260).to_socket_addrs().ok()?.next())
}

/// The target named `target`, or the only one reported.
fn choose_target<'a>(
    found: &'a [DiscoveredTarget],
    target: Option<&str>,
    portal: &str,
) -> Result<&'a DiscoveredTarget, DiscoveryError> {
    let names = || found.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    let portal = portal.to_string();
    match target {
        Some(name) => {
            found
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| DiscoveryError::TargetNotReported {
                    portal,
                    target: name.to_string(),
                    reported: names(),
                })
        }
        None => match found {
            [one] => Ok(one),
            [] => Err(DiscoveryError::NoTargets { portal }),
            _ => Err(DiscoveryError::SeveralTargets {
                portal,
                reported: names(),
            }),
        },
    }
}

impl WorkerDevice {
    /// Discovers `target`'s portals through `portal`
    /// ([`Options::discover_paths`]) and opens LUN `lun` with one path per
    /// portal, or, with bindings, per binding × portal pair that reaches it.
    pub fn open_discovered(
        portal: &str,
        target: Option<&str>,
        lun: u16,
        options: &Options,
    ) -> Result<WorkerDevice, MultipathError> {
        let found = options.discover_paths(portal, target, lun, None)?;
        let urls: Vec<&str> = found.urls.iter().map(String::as_str).collect();
        WorkerDevice::open_urls(&urls, &found.options(options))
    }

    /// Opens the LU behind `urls` (`iscsi://[user%secret@]host[:port]/iqn/lun`,
    /// one path per URL, all to the same target and LUN) with `options`.
    pub fn open_urls(urls: &[&str], options: &Options) -> Result<WorkerDevice, MultipathError> {
        WorkerDevice::open(options.device_config(urls)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_a_device_config() {
        let o = Options {
            chap: Some(
                Chap::new("u", b"secret-123456".to_vec()).mutual("t", b"tsecret-12345".to_vec()),
            ),
            cores: vec![1],
            queue_depth: 7,
            ..Options::default()
        };
        let c = o
            .device_config(&[
                "iscsi://127.0.0.1:3260/iqn.x:y/1",
                "iscsi://127.0.0.2/iqn.x:y/1",
            ])
            .unwrap();
        assert_eq!((c.paths.len(), c.lun, c.queue_depth), (2, 1, 7));
        assert_eq!(c.paths[1].login.chap.as_ref().unwrap().user, "u");
        assert_eq!(c.paths[0].login.mutual_chap.as_ref().unwrap().user, "t");
        assert!(o.device_config(&[]).is_err());
    }

    /// What docs/threading.md promises.
    #[test]
    fn thread_contracts() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<WorkerDevice>();
        send::<super::super::IoQueue>();
        send::<crate::multipath::Io>();
        send::<crate::multipath::IoCompletion>();
    }

    #[test]
    fn vdev_iface_names_the_kernel_interface_of_a_port() {
        let args: Vec<String> = [
            "-l",
            "1",
            "--vdev",
            "net_af_packet0,iface=v0,qpairs=1",
            "--vdev=net_af_packet1,blocksz=4096,iface=eth7",
            "--vdev",
            "net_tap0,iface=tap3",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(vdev_iface(&args, "net_af_packet0").as_deref(), Some("v0"));
        assert_eq!(vdev_iface(&args, "net_af_packet1").as_deref(), Some("eth7"));
        assert_eq!(vdev_iface(&args, "net_tap0").as_deref(), Some("tap3"));
        assert_eq!(vdev_iface(&args, "0000:03:00.0"), None);
        assert_eq!(vdev_iface(&args, "net_af_packet"), None);
    }

    #[test]
    fn chap_from_file() {
        let p = std::env::temp_dir().join(format!("chap-{}", std::process::id()));
        std::fs::write(&p, "s3cret-value\nignored\n").unwrap();
        let c = Chap::from_file("me", &p).unwrap();
        assert_eq!(c.initiator.secret.expose(), b"s3cret-value");
        std::fs::write(&p, "\n").unwrap();
        assert!(Chap::from_file("me", &p).is_err());
        let _ = std::fs::remove_file(&p);
    }
}
