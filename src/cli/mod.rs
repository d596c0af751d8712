//! CLI plumbing: connection options, secrets, output formatting.

pub mod bench;
pub mod health;
pub mod nbd;
pub mod paths;
pub mod plot;
pub mod port_binding;
pub mod target;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use iscsi_bypass::iscsi::chap::{ChapAlgorithm, Credentials, Secret};
use iscsi_bypass::iscsi::discovery::{self, DiscoveredTarget};
use iscsi_bypass::iscsi::login::LoginConfig;
use iscsi_bypass::iscsi::params::DigestKind;
use iscsi_bypass::iscsi::redirect::LoginPortal;
use iscsi_bypass::iscsi::session::{Session, SessionConfig};
use iscsi_bypass::iscsi::url::IscsiUrl;
use iscsi_bypass::scsi::lun::LunHandle;
use iscsi_bypass::scsi::{Capacity, LunInfo, ReportLunsData};
use iscsi_bypass::transport::kernel::{KernelTcp, KernelTcpOptions};
use iscsi_bypass::worker::{DeviceConfig, IdleMode, WorkerDevice};
use iscsi_bypass::PortBinding;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Options shared by every command that logs in to a target.
#[derive(Args, Debug, Clone)]
pub struct ConnectOptions {
    /// Our iSCSI initiator name (IQN).
    #[arg(long, global = true, default_value_t = default_initiator_name())]
    pub initiator_name: String,
    /// CHAP user name (overrides the URL's user).
    #[arg(long, global = true)]
    pub chap_user: Option<String>,
    /// File holding the CHAP secret (first line). Better than a URL password.
    #[arg(long, global = true)]
    pub chap_secret_file: Option<PathBuf>,
    /// Target's CHAP user name, for mutual CHAP.
    #[arg(long, global = true)]
    pub target_user: Option<String>,
    /// File holding the target's CHAP secret, for mutual CHAP.
    #[arg(long, global = true)]
    pub target_secret_file: Option<PathBuf>,
    /// CHAP algorithms to offer, most preferred first (CHAP_A 8, 7, 6, 5).
    #[arg(long, global = true, default_value = "sha3-256,sha256,sha1,md5")]
    pub chap_algorithms: String,
    /// Offer header digests: none, crc32c, or both (crc32c preferred).
    #[arg(long, global = true, default_value = "none")]
    pub header_digest: String,
    /// Offer data digests: none, crc32c, or both.
    #[arg(long, global = true, default_value = "none")]
    pub data_digest: String,
    /// Source address of a path (port binding); repeat it once per path,
    /// in the order of the URLs (with --discover: one per --iface).
    #[arg(long, global = true, value_name = "ADDR")]
    pub bind: Vec<std::net::IpAddr>,
    /// Interface a path leaves through (port binding: SO_BINDTODEVICE on
    /// kernel TCP, the port on DPDK); repeat it once per path, in the order
    /// of the URLs. With --discover: the interfaces to pair with every portal.
    #[arg(long, global = true, value_name = "NAME")]
    pub iface: Vec<String>,
    /// Seconds to wait for connect, login and each command.
    #[arg(long, global = true, default_value_t = 10)]
    pub timeout: u64,
    /// Largest data segment we accept (MaxRecvDataSegmentLength).
    #[arg(long, global = true, default_value_t = 262_144)]
    pub max_recv_data_segment_length: u32,
    /// Offer ImmediateData=No.
    #[arg(long, global = true)]
    pub no_immediate_data: bool,
    /// Offer InitialR2T=Yes (no unsolicited Data-Out).
    #[arg(long, global = true)]
    pub initial_r2t: bool,
}

pub fn default_initiator_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("iqn.2026-11.org.iscsi-bypass:{host}")
}

fn digest_offer(v: &str) -> Result<Vec<DigestKind>> {
    Ok(match v.to_ascii_lowercase().as_str() {
        "none" => vec![DigestKind::None],
        "crc32c" => vec![DigestKind::Crc32c],
        "both" => vec![DigestKind::Crc32c, DigestKind::None],
        other => bail!("digest must be none, crc32c or both, not {other:?}"),
    })
}

fn read_secret_file(p: &PathBuf) -> Result<Secret> {
    let s = std::fs::read_to_string(p)
        .with_context(|| format!("reading secret file {}", p.display()))?;
    let line = s.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        bail!("secret file {} is empty", p.display());
    }
    Ok(Secret::new(line.as_bytes().to_vec()))
}

fn env_secret(names: &[&str]) -> Option<Secret> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        .map(|v| Secret::new(v.into_bytes()))
}

impl ConnectOptions {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.max(1))
    }

    /// Builds the login configuration: URL, flags, files and environment.
    pub fn login_config(&self, url: &IscsiUrl, target: Option<&str>) -> Result<LoginConfig> {
        let mut c = LoginConfig::new(&self.initiator_name, target);
        c.offer.header_digest = digest_offer(&self.header_digest)?;
        c.offer.data_digest = digest_offer(&self.data_digest)?;
        c.offer.max_recv_data_segment_len =
            self.max_recv_data_segment_length.clamp(512, 16_777_215);
        c.offer.immediate_data = !self.no_immediate_data;
        c.offer.initial_r2t = self.initial_r2t;
        c.chap_algorithms =
            ChapAlgorithm::parse_list(&self.chap_algorithms).context("--chap-algorithms")?;
        let user = self.chap_user.clone().or_else(|| url.user.clone());
        if let Some(user) = user {
            let secret = match &self.chap_secret_file {
                Some(p) => read_secret_file(p)?,
                None => url
                    .password
                    .clone()
                    .map(|p| Secret::new(p.into_bytes()))
                    .or_else(|| env_secret(&["ISCSI_CHAP_PASSWORD", "LIBISCSI_CHAP_PASSWORD"]))
                    .ok_or_else(|| {
                        anyhow!("CHAP user {user:?} given but no secret: use --chap-secret-file, ISCSI_CHAP_PASSWORD, or user%password@ in the URL")
                    })?,
            };
            c.chap = Some(Credentials { user, secret });
        }
        let target_user = self.target_user.clone().or_else(|| url.target_user.clone());
        if let Some(user) = target_user {
            if c.chap.is_none() {
                bail!("mutual CHAP needs our own CHAP credentials as well");
            }
            let secret = match &self.target_secret_file {
                Some(p) => read_secret_file(p)?,
                None => url
                    .target_password
                    .clone()
                    .map(|p| Secret::new(p.into_bytes()))
                    .or_else(|| {
                        env_secret(&[
                            "ISCSI_CHAP_TARGET_PASSWORD",
                            "LIBISCSI_CHAP_TARGET_PASSWORD",
                        ])
                    })
                    .ok_or_else(|| anyhow!("target user {user:?} given but no target secret"))?,
            };
            c.mutual_chap = Some(Credentials { user, secret });
        }
        Ok(c)
    }

    /// One port binding per path for `paths` URLs, from the repeated
    /// `--iface` and `--bind` (each none, or one per URL), checked against
    /// this host's interfaces.
    pub fn bindings(&self, paths: usize) -> Result<Vec<PortBinding>> {
        let b = PortBinding::per_path(&self.iface, &self.bind, paths)?;
        Ok(b)
    }

    /// The bindings to pair with discovered portals: `--iface` i with
    /// `--bind` i (either list may be empty).
    pub fn mesh_bindings(&self) -> Result<Vec<PortBinding>> {
        self.bindings(self.iface.len().max(self.bind.len()))
    }

    /// The binding of a one-connection command.
    fn single_binding(&self) -> Result<PortBinding> {
        if self.iface.len() > 1 || self.bind.len() > 1 {
            bail!("this command opens one connection: give at most one --iface and one --bind");
        }
        let b = PortBinding {
            iface: self.iface.first().cloned(),
            source: self.bind.first().copied(),
        };
        b.check_kernel()?;
        Ok(b)
    }

    /// Connects and logs in to `url`'s target, following login redirects
    /// (each hop is logged and named in errors).
    pub fn login_session(
        &self,
        url: &IscsiUrl,
        mut config: SessionConfig,
    ) -> Result<Session<KernelTcp>> {
        let addr: SocketAddr = url
            .socket_addr()
            .with_context(|| format!("resolving portal {}", url.portal()))?;
        config.login_timeout = self.timeout();
        let opts: KernelTcpOptions = self.single_binding()?.kernel_options(self.timeout());
        let target = config.login.target_name.clone().unwrap_or_default();
        let (session, _at) = LoginPortal::new(addr)
            .login(|a| KernelTcp::connect(a, &opts), &config)
            .with_context(|| format!("login to {target}"))?;
        Ok(session)
    }
}

pub fn discover(portal: &str, opts: &ConnectOptions) -> Result<Vec<DiscoveredTarget>> {
    let url = IscsiUrl::parse(portal)?;
    let login = opts.login_config(&url, None)?;
    let addr: SocketAddr = url
        .socket_addr()
        .with_context(|| format!("resolving portal {}", url.portal()))?;
    let k: KernelTcpOptions = opts.single_binding()?.kernel_options(opts.timeout());
    // Login redirects are followed, as for a normal session's login.
    discovery::send_targets_at(
        &mut LoginPortal::new(addr),
        |a| KernelTcp::connect(a, &k),
        login,
        opts.timeout(),
    )
    .with_context(|| format!("discovery at {}", url.portal()))
}

/// Opens a multipath device over kernel TCP, one path per URL, with the
/// connection options' CHAP, digests and timeouts.
pub fn open_device(
    urls: &[String],
    opts: &ConnectOptions,
    policy: &str,
    no_path_timeout_secs: u64,
    busy_poll: bool,
    health: &health::PathHealthArgs,
) -> Result<WorkerDevice> {
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let bindings = opts.bindings(urls.len())?;
    port_binding::warn_host_setup(&bindings);
    let mut config = DeviceConfig::from_urls(&urls, &opts.initiator_name, &bindings)
        .context("path configuration")?;
    // CHAP from flags, secret files and the environment, per URL.
    for (p, u) in config.paths.iter_mut().zip(&urls) {
        let url = IscsiUrl::parse(u)?;
        let target = p.login.target_name.clone();
        let isid = p.login.isid;
        p.login = opts.login_config(&url, target.as_deref())?;
        p.login.isid = isid;
    }
    config.policy = policy.parse().map_err(anyhow::Error::msg)?;
    config.no_path_timeout = Duration::from_secs(no_path_timeout_secs.max(1));
    health.apply(&mut config);
    config.login_timeout = opts.timeout();
    config.idle = if busy_poll {
        IdleMode::BusyPoll
    } else {
        IdleMode::Sleep(Duration::from_micros(50))
    };
    WorkerDevice::open(config).context("opening the multipath device")
}

/// Starts the Prometheus endpoint for `device` when `--metrics-listen` was
/// given; it stops when the returned server is dropped.
pub fn start_metrics(
    addr: Option<SocketAddr>,
    device: &WorkerDevice,
) -> Result<Option<iscsi_bypass::metrics::MetricsServer>> {
    let Some(addr) = addr else { return Ok(None) };
    let server = iscsi_bypass::metrics::MetricsServer::start(addr, device.path_handles())?;
    eprintln!("metrics at http://{}/metrics", server.local_addr());
    Ok(Some(server))
}

/// One URL per portal of the discovered target (`target_iqn`, or the only
/// target the portal reports).
pub fn discovered_urls(
    portal: &str,
    target_iqn: Option<&str>,
    lun: u64,
    opts: &ConnectOptions,
) -> Result<Vec<String>> {
    let targets = discover(portal, opts)?;
    let target = match target_iqn {
        Some(iqn) => targets.iter().find(|t| t.name == iqn).with_context(|| {
            format!(
                "target {iqn} is not among the {} targets at {portal}",
                targets.len()
            )
        })?,
        None => match targets.as_slice() {
            [one] => one,
            [] => bail!("no targets found at {portal}"),
            many => bail!(
                "{} targets at {portal}; choose one with --target-iqn ({})",
                many.len(),
                many.iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    Ok(target
        .portals
        .iter()
        .map(|p| format!("iscsi://{}/{}/{}", p.address(), target.name, lun))
        .collect())
}

pub fn open_lun(url: &str, opts: &ConnectOptions) -> Result<LunHandle<KernelTcp>> {
    let url = IscsiUrl::parse(url)?;
    let (target, lun) = url.require_target()?;
    let login = opts.login_config(&url, Some(target))?;
    let session = opts.login_session(&url, SessionConfig::new(login))?;
    let mut handle = LunHandle::new(session, lun);
    handle.timeout = opts.timeout();
    Ok(handle)
}

pub fn close(lun: LunHandle<KernelTcp>) {
    let _ = lun.into_session().logout(Duration::from_secs(2));
}

/// Largest single READ/WRITE the CLI issues (1 MiB).
const CHUNK_BYTES: usize = 1 << 20;

pub fn read_blocks(lun: &mut LunHandle<KernelTcp>, lba: u64, blocks: u32) -> Result<Vec<u8>> {
    let bs = lun.read_capacity()?.block_size as usize;
    let per = (CHUNK_BYTES / bs).max(1) as u32;
    let mut out = Vec::with_capacity(blocks as usize * bs);
    let mut done = 0u32;
    while done < blocks {
        let n = per.min(blocks - done);
        let data = lun
            .read(lba + done as u64, n)
            .with_context(|| format!("READ at LBA {}", lba + done as u64))?;
        out.extend_from_slice(&data);
        done += n;
    }
    Ok(out)
}

pub fn write_blocks(lun: &mut LunHandle<KernelTcp>, lba: u64, data: Vec<u8>) -> Result<()> {
    let bs = lun.read_capacity()?.block_size as usize;
    if !data.len().is_multiple_of(bs) {
        bail!(
            "input is {} bytes, not a whole number of {bs}-byte blocks",
            data.len()
        );
    }
    let per_bytes = (CHUNK_BYTES / bs).max(1) * bs;
    for (i, chunk) in data.chunks(per_bytes).enumerate() {
        let at = lba + (i * per_bytes / bs) as u64;
        lun.write(at, chunk.to_vec())
            .with_context(|| format!("WRITE at LBA {at}"))?;
    }
    Ok(())
}

pub fn error_chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}

/// Text or JSON output.
pub struct Output {
    pub json: bool,
}

impl Output {
    fn print_json<T: serde::Serialize>(&self, v: &T) {
        println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    }

    pub fn discovery(&self, targets: &[DiscoveredTarget]) {
        if self.json {
            return self.print_json(&targets);
        }
        for t in targets {
            for p in &t.portals {
                match p.tpgt {
                    Some(g) => println!("{} {},{}", t.name, p.address(), g),
                    None => println!("{} {}", t.name, p.address()),
                }
            }
        }
    }

    pub fn lun_info(&self, info: &LunInfo) {
        if self.json {
            return self.print_json(info);
        }
        println!("Vendor:        {}", info.vendor);
        println!("Product:       {}", info.product);
        println!("Revision:      {}", info.revision);
        println!("Device type:   {}", info.device_type_name);
        if let Some(s) = &info.serial {
            println!("Serial:        {s}");
        }
        if let Some(id) = &info.lu_id {
            println!("LU identifier: {id}");
        }
        println!(
            "Capacity:      {} blocks x {} bytes = {} bytes",
            info.block_count, info.block_size, info.capacity_bytes
        );
        println!("ALUA:          {}", info.alua);
        if let Some(g) = info.target_port_group {
            println!("Port group:    {g}");
        }
        if let Some(p) = info.relative_target_port {
            println!("Relative port: {p}");
        }
        println!(
            "Thin:          {}",
            if info.thin_provisioned { "yes" } else { "no" }
        );
    }

    pub fn capacity(&self, c: &Capacity) {
        if self.json {
            return self.print_json(&serde_json::json!({
                "block_count": c.block_count,
                "block_size": c.block_size,
                "physical_block_size": c.physical_block_size,
                "capacity_bytes": c.bytes(),
                "lbpme": c.lbpme,
            }));
        }
        println!("Blocks:     {}", c.block_count);
        println!("Block size: {}", c.block_size);
        println!(
            "Capacity:   {} bytes ({:.1} MiB)",
            c.bytes(),
            c.bytes() as f64 / 1048576.0
        );
    }

    pub fn luns(&self, l: &ReportLunsData) {
        let numbers: Vec<serde_json::Value> = l
            .luns
            .iter()
            .map(|lun| match lun.number() {
                Some(n) => serde_json::json!(n),
                None => serde_json::json!(format!("{:016x}", lun.to_u64())),
            })
            .collect();
        if self.json {
            return self.print_json(&serde_json::json!({ "luns": numbers }));
        }
        for n in numbers {
            println!("LUN {n}");
        }
    }

    pub fn transfer(&self, what: &str, lba: u64, bytes: usize) {
        if self.json {
            return self.print_json(&serde_json::json!({ "op": what, "lba": lba, "bytes": bytes }));
        }
        println!("{bytes} bytes {what} at LBA {lba}");
    }
}
