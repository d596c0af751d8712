//! `iscsi-bypass export-nbd`: serve a multipath LU over NBD.

use super::ConnectOptions;
use anyhow::{bail, Result};
use clap::Args;
use iscsi_bypass::bench::job::parse_size;
use iscsi_bypass::nbd::{check_exposure, ExportConfig, Listener, NbdServer, TlsConfig, TlsPolicy};
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
    /// Path selection: queue-depth, service-time, historical-service-time (hst),
    /// round-robin[:N] or failover.
    #[arg(long, default_value = "queue-depth")]
    pub policy: String,
    /// Spin path workers when idle (lowest latency, one busy core per path).
    #[arg(long)]
    pub busy_poll: bool,
    /// Seconds I/O waits for a usable path before failing.
    #[arg(long, default_value_t = 30)]
    pub no_path_timeout: u64,
    #[command(flatten)]
    pub health: super::health::PathHealthArgs,
    /// Serve Prometheus metrics (per-path commands, bytes, errors, latency
    /// histogram, state) at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS: PEM certificate chain of this server (NBD_OPT_STARTTLS).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: PEM private key matching --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS: PEM CA certificates; clients must present a certificate it signed.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// TLS policy: require (refuse clients that do not start TLS) or allow.
    #[arg(long, value_parser = ["require", "allow"], requires = "tls_cert")]
    pub tls: Option<String>,
    /// Serve plaintext on a non-loopback --listen address (trusted networks only).
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Most clients connected at once; more are closed as they connect.
    /// Also the most connection threads (each serves one client at a time
    /// and is kept for the next).
    #[arg(long, default_value_t = 32)]
    pub max_clients: usize,
    /// Seconds a client has to finish the handshake (TLS included).
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout: u64,
    /// Largest read or write one request may carry (e.g. 32m).
    #[arg(long, default_value = "32m")]
    pub max_request: String,
    /// Most bytes buffered per client (requests in progress + unread replies).
    #[arg(long, default_value = "64m")]
    pub max_buffered: String,
}

pub fn run(args: &ExportNbdArgs, opts: &ConnectOptions) -> Result<()> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let policy = match args.tls.as_deref() {
                Some("allow") => TlsPolicy::Allow,
                _ => TlsPolicy::Require,
            };
            Some(TlsConfig::from_pem_files(
                cert,
                key,
                args.tls_ca.as_deref(),
                policy,
            )?)
        }
        _ => None,
    };
    let max_payload = parse_size(&args.max_request)?;
    let max_buffered = parse_size(&args.max_buffered)?;
    if max_payload == 0 || max_payload > u64::from(u32::MAX) {
        bail!("--max-request must be between 1 byte and 4 GiB - 1");
    }
    if args.max_clients == 0 {
        bail!("--max-clients must be at least 1");
    }
    let listener = match (&args.socket, args.listen) {
        (Some(p), None) => Listener::unix(p)?,
        (None, Some(a)) => {
            // Before binding: never expose the LU in plaintext by mistake.
            check_exposure(a, tls.as_ref(), args.insecure_plaintext)?;
            Listener::tcp(a)?
        }
        _ => bail!("give exactly one of --socket PATH or --listen ADDR:PORT"),
    };
    let device = super::open_device(
        &args.urls,
        opts,
        &args.policy,
        args.no_path_timeout,
        args.busy_poll,
        &args.health,
    )?;
    let _metrics = super::start_metrics(args.metrics_listen, &device)?;
    log::info!(
        "LU {}: {} blocks of {} bytes over {} path(s)",
        device.lu_id(),
        device.capacity(),
        device.block_size(),
        device.paths().len()
    );
    let tls_note = match &tls {
        Some(t) if t.requires_client_certificates() => " (TLS with client certificates)",
        Some(t) if t.policy == TlsPolicy::Require => " (TLS required)",
        Some(_) => " (TLS allowed)",
        None => "",
    };
    let export = ExportConfig {
        name: args.name.clone(),
        read_only: args.read_only,
        tls,
        max_clients: args.max_clients,
        handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        max_payload: max_payload as u32,
        max_buffered_bytes: max_buffered.max(1) as usize,
        ..ExportConfig::default()
    };
    let uri = listener.uri();
    let uri = if tls_note.is_empty() {
        uri
    } else {
        uri.replacen("nbd", "nbds", 1)
    };
    eprintln!("serving {uri}{tls_note}");
    NbdServer::run(
        Arc::new(device),
        export,
        listener,
        Arc::new(AtomicBool::new(false)),
    )?;
    Ok(())
}
