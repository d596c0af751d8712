//! Device and path configuration. A path is a port binding: how to open a
//! byte stream to one target portal (kernel TCP bound to a local address, or
//! the userspace stack) plus the login for its own session (MPIO).
#![warn(missing_docs)]

use super::path::ReconnectPolicy;
use super::selector::Policy;
use super::MultipathError;
use crate::iscsi::chap::{Credentials, Secret};
use crate::iscsi::connection::ConnTimers;
use crate::iscsi::discovery::send_targets;
use crate::iscsi::login::{random_isid, LoginConfig};
use crate::iscsi::url::IscsiUrl;
use crate::transport::kernel::{KernelTcp, KernelTcpOptions};
use crate::transport::{Transport, TransportError};
use std::net::SocketAddr;
use std::time::Duration;

/// Opens a new byte stream for a path; called for the first login and for
/// every reconnect. Kernel TCP and the userspace stack both fit.
pub type Connector = Box<dyn FnMut() -> Result<Box<dyn Transport>, TransportError> + Send>;

/// `Box<dyn Transport>` as a `Transport` (sessions are generic over it).
pub struct BoxedTransport(pub Box<dyn Transport>);

impl Transport for BoxedTransport {
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        self.0.send(buf)
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

/// One path: a connector and the login for this path's session.
pub struct PathConfig {
    /// For stats and errors, e.g. `10.0.1.1->10.0.1.2:3260`.
    pub name: String,
    /// Login parameters. Each path needs its own ISID (distinct I_T nexus);
    /// the constructors below pick a random one.
    pub login: LoginConfig,
    /// Opens this path's byte stream (first login and every reconnect).
    pub connector: Connector,
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
            connector,
        }
    }

    /// A kernel TCP path to `portal`, leaving from `bind` (port binding)
    /// when given.
    pub fn kernel(portal: SocketAddr, bind: Option<SocketAddr>, login: LoginConfig) -> PathConfig {
        let opts = KernelTcpOptions {
            bind,
            connect_timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let name = match bind {
            Some(b) => format!("{}->{}", b.ip(), portal),
            None => portal.to_string(),
        };
        PathConfig::new(
            &name,
            login,
            Box::new(move || {
                KernelTcp::connect(portal, &opts).map(|t| Box::new(t) as Box<dyn Transport>)
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

/// Everything `MultipathDevice::open` needs.
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
}

impl DeviceConfig {
    /// Defaults: queue-depth policy, depth 128, 30 s `no_path_timeout`,
    /// 8 retries, NOP every 2 s, 20 s command timeout, busy-polling workers.
    pub fn new(paths: Vec<PathConfig>, lun: u16) -> DeviceConfig {
        DeviceConfig {
            paths,
            lun,
            policy: Policy::QueueDepth,
            queue_depth: 128,
            no_path_timeout: Duration::from_secs(30),
            max_retries: 8,
            timers: ConnTimers {
                nop_interval: Some(Duration::from_secs(2)),
                nop_timeout: Duration::from_secs(3),
                command_timeout: Some(Duration::from_secs(20)),
            },
            login_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            idle: IdleMode::BusyPoll,
            cores: Vec::new(),
        }
    }

    /// Paths from URLs (`iscsi://[user%pass@]host[:port]/iqn/lun`), one per
    /// URL, kernel TCP, bound to `binds[i]` when given. All URLs must name
    /// the same target and LUN.
    pub fn from_urls(
        urls: &[&str],
        initiator: &str,
        binds: &[Option<SocketAddr>],
    ) -> Result<DeviceConfig, MultipathError> {
        DeviceConfig::from_urls_with(urls, initiator, |i, addr, login| {
            Ok(PathConfig::kernel(
                addr,
                binds.get(i).copied().flatten(),
                login,
            ))
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
            let url = IscsiUrl::parse(u).map_err(|e| MultipathError::Config(e.to_string()))?;
            let (t, l) = url
                .require_target()
                .map_err(|e| MultipathError::Config(e.to_string()))?;
            if target.as_deref().is_some_and(|x| x != t) || lun.is_some_and(|x| x != l) {
                return Err(MultipathError::Config(format!(
                    "URL {url} names another target/LUN than the first URL"
                )));
            }
            target = Some(t.to_string());
            lun = Some(l);
            let addr = url
                .socket_addr()
                .map_err(|e| MultipathError::Config(format!("{url}: {e}")))?;
            let login = login_from_url(&url, initiator, t);
            paths.push(make_path(i, addr, login)?);
        }
        let lun = lun.ok_or_else(|| MultipathError::Config("no paths given".into()))?;
        Ok(DeviceConfig::new(paths, lun))
    }

    /// Paths from SendTargets discovery through `portal`: one path per portal
    /// the target reports (per bind address, when several are given: the
    /// full mesh of local addresses × portals).
    pub fn from_discovery(
        portal: SocketAddr,
        initiator: &str,
        target: &str,
        lun: u16,
        binds: &[Option<SocketAddr>],
    ) -> Result<DeviceConfig, MultipathError> {
        let opts = KernelTcpOptions {
            bind: binds.first().copied().flatten(),
            connect_timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        let t = KernelTcp::connect(portal, &opts)
            .map_err(|e| MultipathError::Discovery(e.to_string()))?;
        let found = send_targets(
            t,
            LoginConfig::new(initiator, None),
            Duration::from_secs(10),
        )
        .map_err(|e| MultipathError::Discovery(e.to_string()))?;
        let t = found
            .iter()
            .find(|t| t.name == target)
            .ok_or_else(|| MultipathError::Discovery(format!("target {target} not reported")))?;
        let binds: Vec<Option<SocketAddr>> = if binds.is_empty() {
            vec![None]
        } else {
            binds.to_vec()
        };
        let mut paths = Vec::new();
        for p in &t.portals {
            let Ok(addr) = p.address().parse::<SocketAddr>() else {
                continue;
            };
            for b in &binds {
                // A bind address only reaches portals of its own family.
                if b.is_some_and(|b| b.is_ipv4() != addr.is_ipv4()) {
                    continue;
                }
                paths.push(PathConfig::kernel(
                    addr,
                    *b,
                    LoginConfig::new(initiator, Some(target)),
                ));
            }
        }
        if paths.is_empty() {
            return Err(MultipathError::Discovery(format!(
                "target {target} has no usable portal"
            )));
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
