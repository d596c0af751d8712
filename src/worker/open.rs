//! The easy way in: [`MultipathDevice::open_urls`] with [`Options`].
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

use super::MultipathDevice;
use crate::iscsi::chap::{ChapAlgorithm, Credentials, Secret};
use crate::iscsi::login::LoginConfig;
use crate::multipath::{DeviceConfig, IdleMode, MultipathError, Policy};
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

/// What [`MultipathDevice::open_urls`] needs besides the URLs. Every field
/// has a default (`Options::default()`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Our initiator IQN (default `iqn.2026-11.org.iscsi-bypass:<hostname>`).
    pub initiator: String,
    /// Transport of every path.
    pub transport: Transport,
    /// Local addresses to bind path `i`'s connection to (`binds[i]`, port
    /// binding); missing entries: no binding.
    pub binds: Vec<Option<SocketAddr>>,
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
            binds: Vec::new(),
            cores: Vec::new(),
            policy: base.policy,
            queue_depth: base.queue_depth,
            no_path_timeout: base.no_path_timeout,
            login_timeout: base.login_timeout,
            idle: base.idle,
            chap: None,
            chap_algorithms: ChapAlgorithm::PREFERRED.to_vec(),
        }
    }
}

impl Options {
    /// The full [`DeviceConfig`] for `urls` (one path per URL), to adjust
    /// further before [`MultipathDevice::open`].
    pub fn device_config(&self, urls: &[&str]) -> Result<DeviceConfig, MultipathError> {
        let mut c = match &self.transport {
            Transport::Kernel => DeviceConfig::from_urls(urls, &self.initiator, &self.binds)?,
            #[cfg(feature = "dpdk")]
            Transport::Dpdk(stacks) => {
                DeviceConfig::from_urls_with(urls, &self.initiator, dpdk_paths(stacks)?)?
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

/// A path maker for [`DeviceConfig::from_urls_with`] that puts each path
/// on a userspace stack: one on the portal's subnet with the fewest paths
/// so far, else `stacks[i % n]`; the path takes that stack's next queue.
#[cfg(feature = "dpdk")]
fn dpdk_paths(
    stacks: &[std::sync::Arc<crate::transport::dpdk::DpdkStack>],
) -> Result<
    impl FnMut(
            usize,
            SocketAddr,
            LoginConfig,
        ) -> Result<crate::multipath::PathConfig, MultipathError>
        + '_,
    MultipathError,
> {
    if stacks.is_empty() {
        return Err(MultipathError::Config(
            "Transport::Dpdk needs at least one started DPDK stack".into(),
        ));
    }
    let mut used = vec![0usize; stacks.len()];
    Ok(move |i: usize, addr: SocketAddr, login: LoginConfig| {
        let SocketAddr::V4(remote) = addr else {
            return Err(MultipathError::Config(format!(
                "path {i} to {addr}: the userspace stack speaks IPv4 only"
            )));
        };
        let s = (0..stacks.len())
            .filter(|&s| on_subnet(&stacks[s], *remote.ip()))
            .min_by_key(|&s| used[s])
            .unwrap_or(i % stacks.len());
        let stack = &stacks[s];
        let queue = used[s];
        used[s] += 1;
        let port = &stack.options().port;
        if queue >= usize::from(stack.queues()) {
            return Err(MultipathError::Config(format!(
                "path {i} (to {remote}) needs queue pair {queue} of DPDK port {port:?}, which has {} \
                 (open the stack with more queues, or add ports)",
                stack.queues()
            )));
        }
        let name = format!("{port}/q{queue} {}->{remote}", stack.options().local_ip);
        Ok(crate::multipath::PathConfig::new(
            &name,
            login,
            Box::new(stack.connector(queue as u16, remote)),
        ))
    })
}

impl Options {
    /// SendTargets through `portal` (`host[:port]`, port 3260 by default):
    /// one URL per portal the target reports, for LUN `lun`. `target` picks
    /// the target when the portal serves several (with one, None will do).
    /// Runs over this transport: kernel TCP (leaving from `binds[0]` when
    /// given) or the first DPDK stack's queue 0 (free again afterwards);
    /// `chap` applies to the discovery login too.
    pub fn discover_urls(
        &self,
        portal: &str,
        target: Option<&str>,
        lun: u16,
    ) -> Result<Vec<String>, MultipathError> {
        use crate::iscsi::discovery::send_targets;
        use std::net::ToSocketAddrs;
        let fail = |e: String| MultipathError::Discovery(format!("through {portal}: {e}"));
        let addr = portal
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| (portal, 3260).to_socket_addrs().ok()?.next())
            .ok_or_else(|| fail("not an address (host[:port])".into()))?;
        let mut login = LoginConfig::new(&self.initiator, None);
        login.chap_algorithms = self.chap_algorithms.clone();
        if let Some(chap) = &self.chap {
            login.chap = Some(chap.initiator.clone());
            login.mutual_chap = chap.target.clone();
        }
        let found = match &self.transport {
            Transport::Kernel => {
                let opts = crate::transport::kernel::KernelTcpOptions {
                    bind: self.binds.first().copied().flatten(),
                    connect_timeout: Some(self.login_timeout),
                    ..Default::default()
                };
                let t = crate::transport::kernel::KernelTcp::connect(addr, &opts)
                    .map_err(|e| fail(e.to_string()))?;
                send_targets(t, login, self.login_timeout)
            }
            #[cfg(feature = "dpdk")]
            Transport::Dpdk(stacks) => {
                let SocketAddr::V4(remote) = addr else {
                    return Err(fail("the userspace stack speaks IPv4 only".into()));
                };
                let stack = stacks
                    .iter()
                    .find(|s| on_subnet(s, *remote.ip()))
                    .or(stacks.first())
                    .ok_or_else(|| fail("Transport::Dpdk has no stack".into()))?;
                let t = stack.connect(0, remote).map_err(|e| fail(e.to_string()))?;
                send_targets(t, login, self.login_timeout)
            }
        }
        .map_err(|e| fail(e.to_string()))?;
        let chosen = match target {
            Some(name) => found.iter().find(|t| t.name == name).ok_or_else(|| {
                fail(format!(
                    "target {name} not reported (it reported: {})",
                    found
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?,
            None => match found.as_slice() {
                [one] => one,
                [] => return Err(fail("no targets reported".into())),
                many => {
                    return Err(fail(format!(
                        "{} targets reported; name one ({})",
                        many.len(),
                        many.iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            },
        };
        let urls: Vec<String> = chosen
            .portals
            .iter()
            .map(|p| format!("iscsi://{}/{}/{lun}", p.address(), chosen.name))
            .collect();
        if urls.is_empty() {
            return Err(fail(format!("target {} has no portal", chosen.name)));
        }
        Ok(urls)
    }
}

impl MultipathDevice {
    /// Discovers `target`'s portals through `portal`
    /// ([`Options::discover_urls`]) and opens LUN `lun` with one path per
    /// portal.
    pub fn open_discovered(
        portal: &str,
        target: Option<&str>,
        lun: u16,
        options: &Options,
    ) -> Result<MultipathDevice, MultipathError> {
        let urls = options.discover_urls(portal, target, lun)?;
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        MultipathDevice::open_urls(&urls, options)
    }

    /// Opens the LU behind `urls` (`iscsi://[user%secret@]host[:port]/iqn/lun`,
    /// one path per URL, all to the same target and LUN) with `options`.
    pub fn open_urls(urls: &[&str], options: &Options) -> Result<MultipathDevice, MultipathError> {
        MultipathDevice::open(options.device_config(urls)?)
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
        send_sync::<MultipathDevice>();
        send::<super::super::IoQueue>();
        send::<crate::multipath::Io>();
        send::<crate::multipath::IoCompletion>();
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
