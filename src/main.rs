//! `iscsi-bypass`: the command-line front end.

#![deny(unsafe_code)]

mod cli;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cli::{ConnectOptions, Output};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "iscsi-bypass",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ISCSI_BYPASS_GIT_REV"), ")"),
    about = "Kernel-bypass, multipath iSCSI initiator",
    long_about = "Kernel-bypass, multipath iSCSI initiator.\n\nTarget URLs use libiscsi's format: iscsi://[user[%password]@]host[:port]/target-iqn/lun\n(mutual CHAP: ?target_user=U&target_password=P). Prefer secrets from files or the environment:\nISCSI_CHAP_PASSWORD / ISCSI_CHAP_TARGET_PASSWORD (LIBISCSI_CHAP_PASSWORD is honoured too)."
)]
struct Cli {
    #[command(flatten)]
    connect: ConnectOptions,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the targets and portals a portal knows (SendTargets=All).
    Discover {
        /// iscsi://host[:port]
        portal: String,
    },
    /// INQUIRY with VPD pages (serial, device identification, limits).
    Inquiry {
        /// Target LU: iscsi://[user[%password]@]host[:port]/target-iqn/lun
        url: String,
    },
    /// READ CAPACITY(16): block count, block size, capacity.
    Readcap {
        /// Target LU: iscsi://[user[%password]@]host[:port]/target-iqn/lun
        url: String,
    },
    /// REPORT LUNS.
    ReportLuns {
        /// Target: iscsi://[user[%password]@]host[:port]/target-iqn/lun (the LUN part
        /// only picks where to send the command)
        url: String,
    },
    /// Read blocks into a file (or stdout with --out -).
    Read {
        /// Target LU: iscsi://[user[%password]@]host[:port]/target-iqn/lun
        url: String,
        /// First logical block to read.
        #[arg(long, default_value_t = 0)]
        lba: u64,
        /// Number of logical blocks to read.
        #[arg(long)]
        blocks: u32,
        /// File to write the blocks to; `-` for stdout.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Benchmark: fio-like job against one or more target URLs (or, with no
    /// URL, against the embedded target on loopback over two paths).
    Bench(Box<cli::bench::BenchArgs>),
    /// Run the embedded iSCSI target (RAM or null LUN) until interrupted.
    Target(Box<cli::target::TargetArgs>),
    /// Write a file's contents (a whole number of blocks) at an LBA.
    Write {
        /// Target LU: iscsi://[user[%password]@]host[:port]/target-iqn/lun
        url: String,
        /// First logical block to write.
        #[arg(long, default_value_t = 0)]
        lba: u64,
        /// File whose contents are written (a whole number of blocks).
        #[arg(long = "in", short)]
        input: PathBuf,
        /// Issue SYNCHRONIZE CACHE after the write.
        #[arg(long)]
        sync: bool,
    },
    /// Serve the multipath LU over NBD (qemu, nbdcopy, nbd-client).
    ExportNbd(Box<cli::nbd::ExportNbdArgs>),
    /// Show the LU and its paths by ALUA group, like `multipath -ll`.
    Paths(cli::paths::PathsArgs),
    /// Draw a bench (or fio) JSON report or a fio histogram log as an SVG:
    /// latency by percentile, and IOPS over time per path.
    Plot(cli::plot::PlotArgs),
}

fn main() {
    let cli = Cli::parse();
    init_logging(&cli.command);
    let out = Output { json: cli.json };
    if let Err(e) = run(cli, &out) {
        // One clear line, with the chain of causes, and a non-zero exit.
        eprintln!("error: {}", cli::error_chain(&e));
        std::process::exit(1);
    }
}

/// Logs to stderr with timestamps, filtered by `RUST_LOG` (e.g.
/// `RUST_LOG=iscsi_bypass=debug`). Quiet by default: warnings and errors,
/// plus path events and clients for the long-running servers.
fn init_logging(command: &Cmd) {
    let default = match command {
        Cmd::ExportNbd(_) | Cmd::Target(_) => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_micros()
        .init();
}

fn run(cli: Cli, out: &Output) -> Result<()> {
    let opts = &cli.connect;
    match cli.command {
        Cmd::Bench(args) => cli::bench::run(&args, opts, out)?,
        Cmd::Target(args) => cli::target::run(&args, out)?,
        Cmd::ExportNbd(args) => cli::nbd::run(&args, opts)?,
        Cmd::Paths(args) => cli::paths::run(&args, opts, out)?,
        Cmd::Plot(args) => cli::plot::run(&args, out)?,
        Cmd::Discover { portal } => {
            let targets = cli::discover(&portal, opts)?;
            out.discovery(&targets);
        }
        Cmd::Inquiry { url } => {
            let mut lun = cli::open_lun(&url, opts)?;
            let info = lun.lun_info().context("INQUIRY")?;
            out.lun_info(&info);
            cli::close(lun);
        }
        Cmd::Readcap { url } => {
            let mut lun = cli::open_lun(&url, opts)?;
            let cap = lun.read_capacity().context("READ CAPACITY")?;
            out.capacity(&cap);
            cli::close(lun);
        }
        Cmd::ReportLuns { url } => {
            let mut lun = cli::open_lun(&url, opts)?;
            let luns = lun.report_luns().context("REPORT LUNS")?;
            out.luns(&luns);
            cli::close(lun);
        }
        Cmd::Read {
            url,
            lba,
            blocks,
            out: path,
        } => {
            let mut lun = cli::open_lun(&url, opts)?;
            let data = cli::read_blocks(&mut lun, lba, blocks)?;
            if path.as_os_str() == "-" {
                use std::io::Write;
                std::io::stdout().write_all(&data)?;
            } else {
                std::fs::write(&path, &data)
                    .with_context(|| format!("writing {}", path.display()))?;
                out.transfer("read", lba, data.len());
            }
            cli::close(lun);
        }
        Cmd::Write {
            url,
            lba,
            input,
            sync,
        } => {
            let data =
                std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
            let mut lun = cli::open_lun(&url, opts)?;
            let n = data.len();
            cli::write_blocks(&mut lun, lba, data)?;
            if sync {
                lun.synchronize_cache().context("SYNCHRONIZE CACHE")?;
            }
            out.transfer("written", lba, n);
            cli::close(lun);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Cli, Cmd};
    use clap::{CommandFactory, Parser};
    use iscsi_bypass::phy::ChecksumMode;

    /// `--checksum` on `bench` and `target`: sw by default, trusted when
    /// asked, and a bad value refused with the value and both choices named.
    #[test]
    fn checksum_mode_option_parses_and_names_a_bad_value() {
        let target = |extra: &[&str]| {
            let mut argv = vec!["iscsi-bypass", "target", "--transport", "dpdk"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let mode = |cli: Cli| match cli.command {
            Cmd::Target(t) => t.dpdk.checksum,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(mode(target(&[]).unwrap()), ChecksumMode::Sw);
        let trusted = target(&["--checksum", "trusted"]).unwrap();
        assert_eq!(mode(trusted), ChecksumMode::Trusted);
        let err = target(&["--checksum", "hw"]).unwrap_err().to_string();
        assert!(err.contains("--checksum"), "{err}");
        assert!(err.contains("\"hw\""), "{err}");
        assert!(err.contains("sw") && err.contains("trusted"), "{err}");
        let bench = Cli::try_parse_from(["iscsi-bypass", "bench", "--checksum", "trusted"]);
        match bench.unwrap().command {
            Cmd::Bench(b) => assert_eq!(b.dpdk.checksum, ChecksumMode::Trusted),
            other => panic!("parsed as {other:?}"),
        }
    }

    /// Every option and positional argument of every subcommand says what it
    /// is in `--help` (clap's own `--help`/`--version` aside).
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let said = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if said.trim().is_empty() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "iscsi-bypass", &mut missing);
        assert!(
            missing.is_empty(),
            "arguments without help text: {missing:#?}"
        );
    }
}
