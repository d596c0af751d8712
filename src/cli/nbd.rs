//! `iscsi-bypass export-nbd`: serve a multipath LU over NBD.

use super::ConnectOptions;
use anyhow::{bail, Context, Result};
use clap::Args;
use iscsi_bypass::nbd::{ExportConfig, Listener, NbdServer};
use iscsi_bypass::worker::{DeviceConfig, IdleMode, MultipathDevice};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

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
}

/// Logs to stderr (the CLI has no logger otherwise).
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("{} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

pub fn run(args: &ExportNbdArgs, opts: &ConnectOptions) -> Result<()> {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let listener = match (&args.socket, args.listen) {
        (Some(p), None) => Listener::unix(p)?,
        (None, Some(a)) => Listener::tcp(a)?,
        _ => bail!("give exactly one of --socket PATH or --listen ADDR:PORT"),
    };
    let urls: Vec<&str> = args.urls.iter().map(String::as_str).collect();
    let bindings = opts.bindings(urls.len())?;
    super::port_binding::warn_host_setup(&bindings);
    let mut config = DeviceConfig::from_urls(&urls, &opts.initiator_name, &bindings)
        .context("path configuration")?;
    // CHAP from flags, secret files and the environment, per URL.
    for (p, u) in config.paths.iter_mut().zip(&urls) {
        let url = iscsi_bypass::iscsi::url::IscsiUrl::parse(u)?;
        let target = p.login.target_name.clone();
        let isid = p.login.isid;
        p.login = opts.login_config(&url, target.as_deref())?;
        p.login.isid = isid;
    }
    config.policy = args.policy.parse().map_err(anyhow::Error::msg)?;
    config.no_path_timeout = Duration::from_secs(args.no_path_timeout.max(1));
    config.login_timeout = opts.timeout();
    config.idle = if args.busy_poll {
        IdleMode::BusyPoll
    } else {
        IdleMode::Sleep(Duration::from_micros(50))
    };
    let device = MultipathDevice::open(config).context("opening the multipath device")?;
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
