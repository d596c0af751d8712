//! `iscsi-bypass target`: the embedded target as a standalone server, e.g.
//! for benchmarks where target and initiator run as separate processes.

use super::Output;
use anyhow::{bail, Context, Result};
use clap::Args;
use iscsi_bypass::bench::job::parse_size;
use iscsi_bypass::iscsi::chap::ChapAlgorithm;
use iscsi_bypass::target::{LunConfig, Target, TargetConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct TargetArgs {
    /// Address to listen on; repeat for several portals (one ALUA group
    /// each). Default: 127.0.0.1:3260 (kernel), or the --local-ip on port
    /// 3260 (dpdk).
    #[arg(long = "portal")]
    pub portals: Vec<SocketAddr>,
    /// The target's iSCSI name (IQN), as initiators address it.
    #[arg(long, default_value = "iqn.2026-11.org.iscsi-bypass:target")]
    pub iqn: String,
    /// LUN 0 size (e.g. 1g).
    #[arg(long, default_value = "1g")]
    pub size: String,
    /// Block size: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Null LUN: reads return zeros, writes are dropped (for initiator benchmarks).
    #[arg(long)]
    pub null: bool,
    /// Require CHAP from initiators with this user name.
    #[arg(long)]
    pub chap_user: Option<String>,
    /// File holding the CHAP secret initiators must use.
    #[arg(long)]
    pub chap_secret_file: Option<PathBuf>,
    /// The target's own CHAP user name, for initiators asking for mutual CHAP.
    #[arg(long)]
    pub target_user: Option<String>,
    /// File holding the target's own CHAP secret (mutual CHAP).
    #[arg(long)]
    pub target_secret_file: Option<PathBuf>,
    /// CHAP algorithms accepted (the initiator's first offered one of these is chosen).
    #[arg(long, default_value = "sha3-256,sha256,sha1,md5")]
    pub chap_algorithms: String,
    /// Command window (MaxCmdSN - ExpCmdSN + 1) per session.
    #[arg(long, default_value_t = 128)]
    pub queue_depth: u32,
    /// Serve a non-loopback portal without CHAP (trusted networks only).
    #[arg(long)]
    pub no_auth: bool,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Transport: kernel (TCP sockets) or dpdk (the userspace TCP/IP stack
    /// on a DPDK port, one poll-mode thread; takes the --eal, --dpdk-port
    /// and --local-ip options of `bench`).
    #[arg(long, default_value = "kernel")]
    pub transport: String,
    #[command(flatten)]
    pub dpdk: super::bench::DpdkArgs,
}

/// The first line of a secret file, which must not be empty.
fn first_line(f: &PathBuf) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        bail!("secret file {} is empty", f.display());
    }
    Ok(line.as_bytes().to_vec())
}

pub fn run(args: &TargetArgs, out: &Output) -> Result<()> {
    let size = parse_size(&args.size)?;
    if args.block_size != 512 && args.block_size != 4096 {
        bail!("block size must be 512 or 4096, not {}", args.block_size);
    }
    let lun = if args.null {
        LunConfig::null(0, size)
    } else {
        LunConfig::ram(0, size)
    }
    .block_size(args.block_size);
    let mut config = TargetConfig::new(args.iqn.clone())
        .lun(lun)
        .queue_depth(args.queue_depth);
    let portals = if args.portals.is_empty() && args.transport == "kernel" {
        vec![SocketAddr::from(([127, 0, 0, 1], 3260))]
    } else {
        args.portals.clone()
    };
    for p in &portals {
        config = config.portal(*p);
    }
    if let Some(user) = &args.chap_user {
        let Some(f) = &args.chap_secret_file else {
            bail!("--chap-user needs --chap-secret-file");
        };
        config = config.chap(user.clone(), first_line(f)?);
        if let Some(target_user) = &args.target_user {
            let Some(f) = &args.target_secret_file else {
                bail!("--target-user needs --target-secret-file");
            };
            config = config.mutual_chap(target_user.clone(), first_line(f)?);
        }
        let algorithms =
            ChapAlgorithm::parse_list(&args.chap_algorithms).context("--chap-algorithms")?;
        config = config.chap_algorithms(&algorithms);
    } else if args.target_user.is_some() {
        bail!("--target-user (mutual CHAP) needs --chap-user as well");
    }
    // Before binding: never serve the LUN unauthenticated to the network by mistake.
    config.check_exposure(args.no_auth)?;
    let handle = match args.transport.as_str() {
        "kernel" => Target::start(config).context("starting the target")?,
        "dpdk" => start_dpdk(config, args)?,
        other => bail!("unknown transport {other:?} (kernel or dpdk)"),
    };
    let portals: Vec<String> = handle.portals().iter().map(|p| p.to_string()).collect();
    if out.json {
        println!(
            "{}",
            serde_json::json!({"iqn": handle.iqn(), "portals": portals})
        );
    } else {
        println!(
            "target {} listening on {}",
            handle.iqn(),
            portals.join(", ")
        );
        for p in &portals {
            println!("  iscsi://{p}/{}/0", handle.iqn());
        }
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    match args.seconds {
        Some(s) => std::thread::sleep(std::time::Duration::from_secs(s)),
        None => loop {
            std::thread::park();
        },
    }
    handle.stop();
    Ok(())
}

#[cfg(not(feature = "dpdk"))]
fn start_dpdk(_: TargetConfig, _: &TargetArgs) -> Result<iscsi_bypass::target::TargetHandle> {
    bail!("this build has no DPDK support (rebuild with the `dpdk` feature)")
}

/// The target on queue 0 of one DPDK port, on the userspace stack.
#[cfg(feature = "dpdk")]
fn start_dpdk(
    config: TargetConfig,
    args: &TargetArgs,
) -> Result<iscsi_bypass::target::TargetHandle> {
    if args.dpdk.dpdk_port.len() != 1 {
        bail!("target --transport dpdk serves on one --dpdk-port");
    }
    let stacks = super::bench::dpdk_stacks(&args.dpdk, 1, std::time::Duration::from_secs(10))?;
    Target::start_on_dpdk(config, &stacks[0], 0).context("starting the target on DPDK")
}
