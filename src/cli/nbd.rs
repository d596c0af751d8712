//! `iscsi-bypass export-nbd`: serve a multipath LU over NBD.

use super::ConnectOptions;
use anyhow::{bail, Result};
use clap::Args;
use iscsi_bypass::nbd::{ExportConfig, Listener, NbdServer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Arguments of `export-nbd`.
#[derive(Args, Debug)]
pub struct ExportNbdArgs {
    /// Target URLs, one per path, all to the same LU
    /// (iscsi://host[:port]/iqn/lun).
    #[arg(required = true)]
    pub urls: Vec<String>,
    /// Listen on a Unix socket (clients: nbd+unix:///?socket=PATH).
    #[arg(long, conflicts_with = "listen")]
    pub socket: Option<PathBuf>,
    /// Listen on a TCP address, e.g. 127.0.0.1:10809 (clients: nbd://ADDR).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Export name (clients may also ask for the default, empty name).
    #[arg(long, default_value = "iscsi-bypass")]
    pub name: String,
    /// Refuse writes, trims and write-zeroes.
    #[arg(long)]
    pub read_only: bool,
    /// Path selection: queue-depth, service-time, round-robin[:N] or failover.
    #[arg(long, default_value = "queue-depth")]
    pub policy: String,
    /// Spin path workers when idle (lowest latency, one busy core per path).
    #[arg(long)]
    pub busy_poll: bool,
    /// Seconds I/O waits for a usable path before failing.
    #[arg(long, default_value_t = 30)]
    pub no_path_timeout: u64,
    /// Serve Prometheus metrics (per-path commands, bytes, errors, latency
    /// histogram, state) at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

pub fn run(args: &ExportNbdArgs, opts: &ConnectOptions) -> Result<()> {
    let listener = match (&args.socket, args.listen) {
        (Some(p), None) => Listener::unix(p)?,
        (None, Some(a)) => Listener::tcp(a)?,
        _ => bail!("give exactly one of --socket PATH or --listen ADDR:PORT"),
    };
    let device = super::open_device(
        &args.urls,
        opts,
        &args.policy,
        args.no_path_timeout,
        args.busy_poll,
    )?;
    let _metrics = super::start_metrics(args.metrics_listen, &device)?;
    log::info!(
        "LU {}: {} blocks of {} bytes over {} path(s)",
        device.lu_id(),
        device.capacity(),
        device.block_size(),
        device.paths().len()
    );
    let export = ExportConfig {
        name: args.name.clone(),
        read_only: args.read_only,
        ..ExportConfig::default()
    };
    eprintln!("serving {}", listener.uri());
    NbdServer::run(
        Arc::new(device),
        export,
        listener,
        Arc::new(AtomicBool::new(false)),
    )?;
    Ok(())
}
