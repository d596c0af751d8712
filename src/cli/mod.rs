//! CLI plumbing: connection options, secrets, output formatting.

pub mod bench;
pub mod nbd;
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
use iscsi_bypass::transport::TransportError;
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
    /// Local address to bind (port binding: the path's source interface).
    #[arg(long, global = true)]
    pub bind: Option<std::net::IpAddr>,
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

    pub fn connect(&self, url: &IscsiUrl) -> Result<KernelTcp> {
        let addr: SocketAddr = url
            .socket_addr()
            .with_context(|| format!("resolving portal {}", url.portal()))?;
        Ok(self.connect_addr(addr)?)
    }

    fn connect_addr(&self, addr: SocketAddr) -> Result<KernelTcp, TransportError> {
        let opts = KernelTcpOptions {
            bind: self.bind.map(|ip| SocketAddr::new(ip, 0)),
            connect_timeout: Some(self.timeout()),
            ..Default::default()
        };
        KernelTcp::connect(addr, &opts)
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
        let target = config.login.target_name.clone().unwrap_or_default();
        let (session, _at) = LoginPortal::new(addr)
            .login(|a| self.connect_addr(a), &config)
            .with_context(|| format!("login to {target}"))?;
        Ok(session)
    }
}

pub fn discover(portal: &str, opts: &ConnectOptions) -> Result<Vec<DiscoveredTarget>> {
    let url = IscsiUrl::parse(portal)?;
    let login = opts.login_config(&url, None)?;
    let t = opts.connect(&url)?;
    discovery::send_targets(t, login, opts.timeout())
        .with_context(|| format!("discovery at {}", url.portal()))
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
