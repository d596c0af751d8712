//! `iscsi-bypass bench`.

use super::{ConnectOptions, Output};
use anyhow::{bail, Context, Result};
use clap::Args;
use iscsi_bypass::bench::engine::{MultipathFactory, SessionFactory};
use iscsi_bypass::bench::job::JobSpec;
use iscsi_bypass::bench::{self, report, LiveCounters};
use iscsi_bypass::iscsi::session::{IdlePolicy, Session, SessionConfig};
use iscsi_bypass::iscsi::url::IscsiUrl;
use iscsi_bypass::target::{Target, TargetConfig};
use iscsi_bypass::worker::{DeviceConfig, IdleMode, PathConfig, Policy, PortBinding, WorkerDevice};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Target URLs (iscsi://host[:port]/iqn/lun), one per path. None: start
    /// the embedded target on loopback with two portals.
    pub urls: Vec<String>,
    /// fio-style job file (key=value lines); flags below override it.
    #[arg(long)]
    pub job_file: Option<PathBuf>,
    /// randread, randwrite, read, write, randrw, rw.
    #[arg(long)]
    pub rw: Option<String>,
    /// Percentage of reads in a mixed workload (randrw, rw); default 50.
    #[arg(long)]
    pub rwmixread: Option<String>,
    /// Block size per I/O (e.g. 4k, 128k).
    #[arg(long)]
    pub bs: Option<String>,
    /// Outstanding I/Os per job.
    #[arg(long)]
    pub iodepth: Option<String>,
    /// Job threads (each with its own queue).
    #[arg(long, alias = "workers")]
    pub numjobs: Option<String>,
    /// Measured time (e.g. 30s).
    #[arg(long)]
    pub runtime: Option<String>,
    /// Warm-up before measuring (e.g. 2s).
    #[arg(long)]
    pub ramp: Option<String>,
    /// Bytes of the LUN to use.
    #[arg(long)]
    pub size: Option<String>,
    /// Byte offset into the LUN where the I/O region starts (e.g. 1g).
    #[arg(long)]
    pub offset: Option<String>,
    /// Stamp every written block (LBA, generation, CRC32C) and check reads.
    #[arg(long)]
    pub verify: bool,
    /// Seed for the random offsets (fio's randseed), for repeatable runs.
    #[arg(long)]
    pub seed: Option<String>,
    /// Write fio's completion-latency histogram log here (the format of
    /// fio's `log_hist_msec`: `msec, ddir, bs, bin0..bin1855` per interval
    /// and direction; docs/bench.md).
    #[arg(long)]
    pub hist_log: Option<PathBuf>,
    /// Interval of --hist-log in ms (default: the job file's log_hist_msec,
    /// else 1000).
    #[arg(long, value_name = "MS")]
    pub hist_log_msec: Option<u64>,
    /// Write an HdrHistogram interval log (one interval for the measured
    /// part, mergeable across hosts) here.
    #[arg(long)]
    pub hdr_log: Option<PathBuf>,
    /// Draw the run as an SVG here: latency by percentile, and IOPS over
    /// time per path (the picture `iscsi-bypass plot` makes of the JSON).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Serve Prometheus metrics of the paths at http://ADDR/metrics while
    /// the job runs (multipath engine), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Transport: kernel (TCP sockets) or dpdk (userspace TCP on DPDK).
    #[arg(long, default_value = "kernel")]
    pub transport: String,
    /// Multipath path selector: queue-depth, service-time,
    /// historical-service-time (hst), round-robin[:N], failover.
    #[arg(long, default_value = "queue-depth")]
    pub policy: String,
    /// Spin instead of blocking when idle (poll mode; one core per job).
    #[arg(long)]
    pub busy_poll: bool,
    #[command(flatten)]
    pub health: super::health::PathHealthArgs,
    /// Discover the target's paths at this portal (SendTargets): every portal
    /// of the target becomes a path; with --iface (or --bind) repeated, every
    /// interface × portal pair that reaches the target (kernel or dpdk).
    #[arg(long, conflicts_with = "urls")]
    pub discover: Option<String>,
    /// With --discover: which target (needed when the portal lists several).
    #[arg(long, requires = "discover")]
    pub target_iqn: Option<String>,
    /// With --discover: the LUN.
    #[arg(long, default_value_t = 0)]
    pub lun: u16,
    /// With --discover and several --iface: at most this many paths (bound
    /// interfaces) per portal.
    #[arg(long, requires = "discover", value_name = "N")]
    pub max_paths_per_portal: Option<usize>,
    /// auto (inline for one path, multipath for several), inline (the job
    /// thread drives its own session, like iscsi-perf), multipath (path
    /// workers behind lock-free rings).
    #[arg(long, default_value = "auto")]
    pub engine: String,
    /// Cores to pin path workers to (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub cores: Vec<usize>,
    #[command(flatten)]
    pub dpdk: DpdkArgs,
}

/// Options of `--transport dpdk` (the userspace TCP/IP stack on DPDK).
#[derive(Args, Debug, Clone, Default)]
pub struct DpdkArgs {
    /// DPDK EAL options, one string, e.g. "-l 1 --in-memory --no-pci
    /// --vdev net_af_packet0,iface=veth0" (split on whitespace).
    #[arg(long, allow_hyphen_values = true, value_name = "ARGS")]
    pub eal: Option<String>,
    /// DPDK port by its device name (net_af_packet0, 0000:03:00.0);
    /// repeat for several ports: job j runs on port j mod #ports.
    #[arg(long, value_name = "NAME")]
    pub dpdk_port: Vec<String>,
    /// The userspace stack's address, A.B.C.D/NN: one per --dpdk-port (in
    /// the same order), or one for all of them.
    #[arg(long, value_name = "A.B.C.D/NN")]
    pub local_ip: Vec<String>,
    /// Next hop for targets outside --local-ip's prefix.
    #[arg(long, value_name = "A.B.C.D")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Static neighbour, never ARPed: IP=MAC (repeatable).
    #[arg(long = "neighbour", value_name = "IP=MAC")]
    pub neighbours: Vec<String>,
    /// Queue pairs per port (default: connections / ports). Several
    /// connections on one port need a port that reports its RSS key and
    /// redirection table (real NICs do; af_packet does not): each
    /// connection then picks a source port RSS steers to its queue.
    #[arg(long, value_name = "N")]
    pub dpdk_queues: Option<u16>,
    /// Do not use checksum offload, TSO or LRO even where the port has them.
    #[arg(long)]
    pub dpdk_no_offload: bool,
    /// Checksums on the DPDK port(s): sw (verify every frame, send correct
    /// checksums: by the port's offload where it has one, else in
    /// software) or trusted (net_memif and net_ring only, and the peer
    /// trusted too: no software checksums either way; a peer in sw mode
    /// drops the frames).
    #[arg(long, default_value = "sw", value_name = "sw|trusted")]
    pub checksum: iscsi_bypass::phy::ChecksumMode,
    /// IP MTU of the DPDK port(s), e.g. 9000 for jumbo frames (default:
    /// the port's, 1500 on most); the stack's MSS follows it, and the mbufs
    /// are sized to hold a whole frame. Both ends must agree.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u16).range(576..))]
    pub mtu: Option<u16>,
}

impl BenchArgs {
    /// The jobs: every job section of the job file (or one default job),
    /// each with the flags applied on top.
    fn jobs(&self) -> Result<Vec<JobSpec>> {
        let mut jobs = match &self.job_file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading job file {}", p.display()))?;
                JobSpec::jobs_from_file(&text)?
            }
            None => vec![JobSpec::default()],
        };
        let flags = [
            ("rw", &self.rw),
            ("rwmixread", &self.rwmixread),
            ("bs", &self.bs),
            ("iodepth", &self.iodepth),
            ("numjobs", &self.numjobs),
            ("runtime", &self.runtime),
            ("ramp_time", &self.ramp),
            ("size", &self.size),
            ("offset", &self.offset),
            ("randseed", &self.seed),
        ];
        for job in &mut jobs {
            for (k, v) in flags {
                if let Some(v) = v {
                    job.set(k, v)?;
                }
            }
            if self.verify {
                job.verify = true;
            }
        }
        Ok(jobs)
    }

    fn run_options(&self, jobs: &[JobSpec]) -> bench::RunOptions {
        let from_file = jobs.iter().any(|j| j.log_hist_msec > 0);
        bench::RunOptions {
            hist_msec: match (self.hist_log.is_some(), self.hist_log_msec) {
                (_, Some(ms)) => ms.max(1),
                (true, None) if !from_file => 1000,
                _ => 0,
            },
        }
    }
}

/// What the job threads need from the jobs together: the deepest queue
/// and the most threads.
fn max_iodepth(jobs: &[JobSpec]) -> u32 {
    jobs.iter().map(|j| j.iodepth).max().unwrap_or(1)
}

fn check_regions(jobs: &[JobSpec], block_size: u32, blocks: u64) -> Result<()> {
    for j in jobs {
        j.region(block_size, blocks)?;
    }
    Ok(())
}

pub fn run(args: &BenchArgs, opts: &ConnectOptions, out: &Output) -> Result<()> {
    let job = args.jobs()?;
    let job = job.as_slice();
    match args.transport.as_str() {
        "kernel" => {}
        "dpdk" => return run_dpdk(args, opts, out, job),
        other => bail!("unknown transport {other:?} (kernel or dpdk)"),
    }
    let policy: Policy = args.policy.parse()?;
    // No URL: the embedded target on loopback with two portals, so a new
    // user sees the whole thing (two paths, multipath) with one command.
    let embedded = if args.urls.is_empty() && args.discover.is_none() {
        let config = TargetConfig::null(EMBEDDED_IQN, EMBEDDED_SIZE).loopback_portals(2);
        let t = Target::start(config).context("starting the embedded target")?;
        if !out.json {
            let portals: Vec<String> = t.portals().iter().map(|p| p.to_string()).collect();
            eprintln!(
                "no target given: using the embedded null target {} on {}",
                t.iqn(),
                portals.join(" and ")
            );
        }
        Some(t)
    } else {
        None
    };
    let bound = !opts.iface.is_empty() || !opts.bind.is_empty();
    let (urls, bindings): (Vec<String>, Vec<PortBinding>) = match (&embedded, &args.discover) {
        (Some(t), _) => {
            let urls: Vec<String> = t
                .portals()
                .iter()
                .map(|p| format!("iscsi://{p}/{}/0", t.iqn()))
                .collect();
            let b = opts.bindings(urls.len())?;
            (urls, b)
        }
        (None, Some(portal)) if bound => {
            discovered_bound_paths(portal, args, opts, out, iscsi_bypass::Transport::Kernel)?
        }
        (None, Some(portal)) => (
            super::discovered_urls(
                portal,
                args.target_iqn.as_deref(),
                u64::from(args.lun),
                opts,
            )?,
            Vec::new(),
        ),
        (None, None) => (args.urls.clone(), opts.bindings(args.urls.len())?),
    };
    let result = if !multipath_engine(&args.engine, urls.len())? {
        run_inline(&urls[0], job, args, opts, out)?
    } else {
        for b in &bindings {
            b.check_kernel()?;
        }
        super::port_binding::warn_host_setup(&bindings);
        let kernel_path = |i: usize, addr, login| {
            let b = bindings.get(i).cloned().unwrap_or_default();
            Ok(PathConfig::kernel_bound(addr, &b, login))
        };
        run_multipath(&urls, policy, job, args, opts, out, &kernel_path)?
    };
    drop(embedded);
    report_and_check(&result, args, out)
}

/// Whether `--engine` (for `paths` URLs) means the multipath device rather
/// than a job thread driving its own session (`inline`).
fn multipath_engine(engine: &str, paths: usize) -> Result<bool> {
    match engine {
        "auto" => Ok(paths > 1),
        "multipath" => Ok(true),
        "inline" if paths > 1 => {
            bail!("--engine inline drives one path; give one URL or use --engine multipath")
        }
        "inline" => Ok(false),
        other => bail!("unknown engine {other:?} (auto, inline, multipath)"),
    }
}

/// `--discover` with `--iface`/`--bind`: every binding × portal pair that
/// reaches the target (at most `--max-paths-per-portal` per portal); the
/// pairs that do not are reported on stderr.
fn discovered_bound_paths(
    portal: &str,
    args: &BenchArgs,
    opts: &ConnectOptions,
    out: &Output,
    transport: iscsi_bypass::Transport,
) -> Result<(Vec<String>, Vec<PortBinding>)> {
    let url = IscsiUrl::parse(portal)?;
    let login = opts.login_config(&url, None)?;
    let options = iscsi_bypass::Options {
        initiator: opts.initiator_name.clone(),
        transport,
        bindings: opts.mesh_bindings()?,
        login_timeout: opts.timeout(),
        chap: login.chap.map(|initiator| iscsi_bypass::Chap {
            initiator,
            target: login.mutual_chap,
        }),
        ..iscsi_bypass::Options::default()
    };
    let found = options.discover_paths(
        &url.portal(),
        args.target_iqn.as_deref(),
        args.lun,
        args.max_paths_per_portal,
    )?;
    for u in &found.unreachable {
        eprintln!(
            "discovery: {} -> {} cannot reach {}: {}",
            u.binding.describe(),
            u.portal,
            found.target,
            u.reason
        );
    }
    for (b, p) in &found.capped {
        eprintln!(
            "discovery: {} -> {p} left out by --max-paths-per-portal",
            b.describe()
        );
    }
    if !out.json {
        for (u, b) in found.urls.iter().zip(&found.bindings) {
            eprintln!("discovery: path {} -> {u}", b.describe());
        }
    }
    Ok((found.urls, found.bindings))
}

const EMBEDDED_IQN: &str = "iqn.2026-11.org.iscsi-bypass:embedded";
const EMBEDDED_SIZE: u64 = 1 << 30;

fn run_inline(
    url_text: &str,
    job: &[JobSpec],
    args: &BenchArgs,
    opts: &ConnectOptions,
    out: &Output,
) -> Result<bench::RunResult> {
    let url = IscsiUrl::parse(url_text)?;
    let (target, lun) = url.require_target()?;
    let target = target.to_string();
    // Probe the LUN once: capacity and block size, and a clear error early.
    let mut probe = super::open_lun(url_text, opts)?;
    let cap = probe.read_capacity().context("READ CAPACITY")?;
    super::close(probe);
    check_regions(job, cap.block_size, cap.block_count)?;
    let idle = if args.busy_poll {
        IdlePolicy::BusyPoll
    } else {
        IdlePolicy::Wait(Duration::from_micros(200))
    };
    let factory = SessionFactory {
        connect: |_job: u32| -> Result<Session<_>, String> {
            let login = opts
                .login_config(&url, Some(&target))
                .map_err(|e| e.to_string())?;
            let mut config = SessionConfig::new(login);
            config.idle = idle;
            opts.login_session(&url, config)
                .map_err(|e| super::error_chain(&e))
        },
        lun,
        block_size: cap.block_size,
        capacity_blocks: cap.block_count,
        max_in_flight: max_iodepth(job) as usize,
        path_name: url.portal(),
    };
    run_with_progress(job, args.run_options(job), &factory, out)
}

/// Makes path `i` to a portal with a login (the transport's connector).
type PathMaker<'a> = dyn Fn(usize, std::net::SocketAddr, iscsi_bypass::iscsi::login::LoginConfig) -> Result<PathConfig>
    + 'a;

fn run_multipath(
    urls: &[String],
    policy: Policy,
    job: &[JobSpec],
    args: &BenchArgs,
    opts: &ConnectOptions,
    out: &Output,
    make_path: &PathMaker,
) -> Result<bench::RunResult> {
    let mut paths = Vec::new();
    let mut lun = None;
    for u in urls {
        let url = IscsiUrl::parse(u)?;
        let (target, l) = url.require_target()?;
        if lun.is_some_and(|x| x != l) {
            bail!("all paths must name the same LUN ({u} names LUN {l})");
        }
        lun = Some(l);
        let login = opts.login_config(&url, Some(target))?;
        let addr = url
            .socket_addr()
            .with_context(|| format!("resolving {}", url.portal()))?;
        paths.push(make_path(paths.len(), addr, login)?);
    }
    let mut config = DeviceConfig::new(paths, lun.unwrap_or(0));
    config.policy = policy;
    config.queue_depth = max_iodepth(job) as usize;
    config.login_timeout = opts.timeout();
    args.health.apply(&mut config);
    config.idle = if args.busy_poll {
        IdleMode::BusyPoll
    } else {
        // Spin briefly, then block on the socket and the wake-up eventfd.
        IdleMode::Block(Duration::from_micros(10))
    };
    config.cores = args.cores.clone();
    let device = WorkerDevice::open(config).context("opening the multipath device")?;
    let metrics = super::start_metrics(args.metrics_listen, &device)?;
    check_regions(job, device.block_size(), device.capacity())?;
    let factory = MultipathFactory {
        path_names: device.paths().iter().map(|p| p.name.clone()).collect(),
        device: &device,
        idle_sleep: (!args.busy_poll).then_some(Duration::from_micros(20)),
    };
    let mut result = run_with_progress(job, args.run_options(job), &factory, out)?;
    result.path_nexus = device.paths().iter().map(|p| p.nexus).collect();
    drop(metrics);
    device.close();
    Ok(result)
}

#[cfg(not(feature = "dpdk"))]
fn run_dpdk(_: &BenchArgs, _: &ConnectOptions, _: &Output, _: &JobSpec) -> Result<()> {
    bail!("this build has no DPDK support (rebuild with the `dpdk` feature)")
}

/// Starts the DPDK ports and a userspace stack on each from the CLI options.
#[cfg(feature = "dpdk")]
pub(super) fn dpdk_stacks(
    d: &DpdkArgs,
    jobs: u16,
    connect_timeout: Duration,
) -> Result<Vec<Arc<iscsi_bypass::transport::dpdk::DpdkStack>>> {
    use iscsi_bypass::net::OffloadConfig;
    use iscsi_bypass::transport::dpdk::{parse_ip_prefix, parse_neighbour, DpdkOptions, DpdkStack};
    let eal: Vec<String> = d
        .eal
        .as_deref()
        .context("--transport dpdk needs --eal \"EAL ARGS\" (e.g. \"-l 1 --in-memory --vdev net_af_packet0,iface=veth0\")")?
        .split_whitespace()
        .map(String::from)
        .collect();
    if d.dpdk_port.is_empty() {
        bail!("--transport dpdk needs --dpdk-port NAME (e.g. net_af_packet0 or 0000:03:00.0)");
    }
    let ports = d.dpdk_port.len() as u16;
    let ips = match d.local_ip.len() {
        0 => bail!("--transport dpdk needs --local-ip A.B.C.D/NN"),
        1 => vec![d.local_ip[0].clone(); d.dpdk_port.len()],
        n if n == d.dpdk_port.len() => d.local_ip.clone(),
        n => bail!("{n} --local-ip for {ports} --dpdk-port: give one per port or one for all"),
    };
    let queues = d.dpdk_queues.unwrap_or_else(|| jobs.div_ceil(ports)).max(1);
    let neighbours = d
        .neighbours
        .iter()
        .map(|n| parse_neighbour(n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut stacks = Vec::new();
    for (port, ip) in d.dpdk_port.iter().zip(&ips) {
        let (ip, prefix) = parse_ip_prefix(ip)?;
        let mut options = DpdkOptions::new(eal.clone(), port, ip, prefix);
        options.queues = queues;
        options.gateway = d.gateway;
        options.user.connect_timeout = connect_timeout;
        options.user.static_neighbours = neighbours.clone();
        options.port_config.checksum = d.checksum;
        if d.dpdk_no_offload {
            if d.checksum == iscsi_bypass::phy::ChecksumMode::Trusted {
                bail!(
                    "--checksum trusted skips checksums through the stack's offload path, \
                     which --dpdk-no-offload switches off: give one or the other"
                );
            }
            options.user.offload = OffloadConfig::NONE;
            options.port_config.checksum_offload = false;
            options.port_config.tso = false;
            options.port_config.lro = false;
        }
        options.port_config.mtu = d.mtu;
        let stack = DpdkStack::open(options)?;
        if queues > 1 && stack.port().rss_steering().is_none() {
            bail!(
                "{jobs} connections (jobs, or paths) on {ports} DPDK port(s) put {queues} on port {port:?}, \
                 which does not report its RSS key and redirection table (af_packet, for one), so \
                 replies could land on another connection's queue; give one --dpdk-port per connection"
            );
        }
        stacks.push(stack);
    }
    Ok(stacks)
}

/// `bench --transport dpdk`: the same job, each job thread on its own queue
/// pair (of port j mod #ports) with its own userspace stack and session.
#[cfg(feature = "dpdk")]
fn run_dpdk(args: &BenchArgs, opts: &ConnectOptions, out: &Output, job: &[JobSpec]) -> Result<()> {
    use iscsi_bypass::scsi::lun::LunHandle;
    use std::net::SocketAddr;
    if let Some(portal) = &args.discover {
        return run_dpdk_discovered(portal, args, opts, out, job);
    }
    let multipath = multipath_engine(&args.engine, args.urls.len())?;
    if args.urls.is_empty() {
        bail!("--transport dpdk needs target URLs (one per path) or --discover PORTAL");
    }
    if multipath {
        return run_dpdk_multipath(args, opts, out, job);
    }
    if !opts.iface.is_empty() || !opts.bind.is_empty() {
        bail!(
            "--iface/--bind over DPDK pick each path's port: use them with --engine multipath \
             (the inline engine runs job j on port j mod #ports)"
        );
    }
    let url = IscsiUrl::parse(&args.urls[0])?;
    let (target, lun) = url.require_target()?;
    let target = target.to_string();
    let remote = match url
        .socket_addr()
        .with_context(|| format!("resolving portal {}", url.portal()))?
    {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => bail!("the userspace stack speaks IPv4 only, not {a}"),
    };
    let jobs = u16::try_from(job.iter().map(|j| j.numjobs).sum::<u32>())
        .context("too many jobs for DPDK queues")?;
    let stacks = dpdk_stacks(&args.dpdk, jobs.max(1), opts.timeout())?;
    let login = |job: u32| -> Result<Session<_>> {
        let stack = &stacks[job as usize % stacks.len()];
        let queue = ((job as usize / stacks.len()) % usize::from(stack.queues())) as u16;
        let t = stack.connect(queue, remote).with_context(|| {
            format!(
                "TCP over DPDK port {:?} queue {queue}",
                stack.options().port
            )
        })?;
        let mut config = SessionConfig::new(opts.login_config(&url, Some(&target))?);
        config.login_timeout = opts.timeout();
        config.idle = if args.busy_poll {
            IdlePolicy::BusyPoll
        } else {
            IdlePolicy::Wait(Duration::from_micros(200))
        };
        Session::login(t, &config)
            .with_context(|| format!("login to {target} at {} over DPDK", url.portal()))
    };
    // Probe as job 0 (its queue is free again afterwards): capacity and
    // block size.
    let mut probe = LunHandle::new(login(0)?, lun);
    probe.timeout = opts.timeout();
    let cap = probe.read_capacity().context("READ CAPACITY")?;
    let _ = probe.into_session().logout(Duration::from_secs(2));
    check_regions(job, cap.block_size, cap.block_count)?;
    let names: Vec<String> = stacks
        .iter()
        .map(|s| format!("{} on {}", s.options().local_ip, s.options().port))
        .collect();
    let factory = SessionFactory {
        connect: |job: u32| -> Result<Session<_>, String> {
            login(job).map_err(|e| super::error_chain(&e))
        },
        lun,
        block_size: cap.block_size,
        capacity_blocks: cap.block_count,
        max_in_flight: max_iodepth(job) as usize,
        path_name: format!("dpdk {} -> {remote}", names.join(", ")),
    };
    let result = run_with_progress(job, args.run_options(job), &factory, out)?;
    report_and_check(&result, args, out)
}

/// `bench --transport dpdk --discover PORTAL`: SendTargets over a stack,
/// then one path per portal, or with `--iface` per interface × portal pair
/// that reaches the target (each on its interface's port, next queue).
#[cfg(feature = "dpdk")]
fn run_dpdk_discovered(
    portal: &str,
    args: &BenchArgs,
    opts: &ConnectOptions,
    out: &Output,
    job: &[JobSpec],
) -> Result<()> {
    let policy: Policy = args.policy.parse()?;
    let ports = u16::try_from(args.dpdk.dpdk_port.len().max(1)).context("too many ports")?;
    let stacks = dpdk_stacks(&args.dpdk, ports, opts.timeout())?;
    let transport = iscsi_bypass::Transport::Dpdk(stacks.clone());
    let (urls, bindings) = discovered_bound_paths(portal, args, opts, out, transport)?;
    let maker = std::cell::RefCell::new(iscsi_bypass::worker::dpdk_path_maker(&stacks, &bindings)?);
    let path = |i: usize, addr: std::net::SocketAddr, login| -> Result<PathConfig> {
        Ok((maker.borrow_mut())(i, addr, login)?)
    };
    let result = run_multipath(&urls, policy, job, args, opts, out, &path)?;
    report_and_check(&result, args, out)
}

/// `bench --transport dpdk --engine multipath`: the library's multipath
/// device with path `i` on port `i mod #ports`, queue pair `i / #ports`.
#[cfg(feature = "dpdk")]
fn run_dpdk_multipath(
    args: &BenchArgs,
    opts: &ConnectOptions,
    out: &Output,
    job: &[JobSpec],
) -> Result<()> {
    use std::net::SocketAddr;
    let policy: Policy = args.policy.parse()?;
    let paths = u16::try_from(args.urls.len()).context("too many paths")?;
    let bindings = opts.bindings(args.urls.len())?;
    let stacks = dpdk_stacks(&args.dpdk, paths, opts.timeout())?;
    if !bindings.is_empty() {
        // Port binding: each path on the port its --iface/--bind names.
        let maker =
            std::cell::RefCell::new(iscsi_bypass::worker::dpdk_path_maker(&stacks, &bindings)?);
        let bound_path = |i: usize, addr: SocketAddr, login| -> Result<PathConfig> {
            Ok((maker.borrow_mut())(i, addr, login)?)
        };
        let result = run_multipath(&args.urls, policy, job, args, opts, out, &bound_path)?;
        return report_and_check(&result, args, out);
    }
    let dpdk_path = |i: usize, addr: SocketAddr, login| -> Result<PathConfig> {
        let SocketAddr::V4(remote) = addr else {
            bail!("the userspace stack speaks IPv4 only, not {addr}");
        };
        let stack = &stacks[i % stacks.len()];
        let queue = (i / stacks.len()) as u16;
        let name = format!(
            "{}/q{queue} {}->{remote}",
            stack.options().port,
            stack.options().local_ip
        );
        Ok(PathConfig::to_portal(
            &name,
            login,
            addr,
            Box::new(stack.addr_connector(queue)),
        ))
    };
    let result = run_multipath(&args.urls, policy, job, args, opts, out, &dpdk_path)?;
    report_and_check(&result, args, out)
}

/// Runs the job with a live progress line on a terminal (none when piped).
pub fn run_with_progress(
    job: &[JobSpec],
    options: bench::RunOptions,
    factory: &dyn bench::EngineFactory,
    out: &Output,
) -> Result<bench::RunResult> {
    let live = Arc::new(LiveCounters::default());
    let show = std::io::stderr().is_terminal() && !out.json;
    let progress = show.then(|| {
        let live = live.clone();
        std::thread::spawn(move || progress_loop(&live))
    });
    let r = bench::run_jobs(job, options, factory, live.clone());
    live.stop.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
        eprint!("\r\x1b[2K");
    }
    Ok(r?)
}

fn progress_loop(live: &LiveCounters) {
    let mut last = (Instant::now(), 0u64, 0u64, 0u64);
    let mut last_paths = [0u64; 8];
    while !live.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        if now.duration_since(last.0) < Duration::from_secs(1) {
            continue;
        }
        let ios = live.ios.load(Ordering::Relaxed);
        let bytes = live.bytes.load(Ordering::Relaxed);
        let lat = live.lat_ns_sum.load(Ordering::Relaxed);
        let dt = now.duration_since(last.0).as_secs_f64();
        let dios = ios - last.1;
        let mean_us = if dios > 0 {
            (lat - last.3) as f64 / dios as f64 / 1e3
        } else {
            0.0
        };
        let state = if live.measuring.load(Ordering::Relaxed) {
            "run"
        } else {
            "ramp"
        };
        let mut per_path = String::new();
        for (i, c) in live.path_ios.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            let d = n - last_paths[i];
            last_paths[i] = n;
            if n > 0 {
                per_path.push_str(&format!("  path{i} {:.0}", d as f64 / dt));
            }
        }
        eprint!(
            "\r\x1b[2K[{state}] {:.0} IOPS  {:.1} MiB/s  mean {:.1} us{per_path}",
            dios as f64 / dt,
            (bytes - last.2) as f64 / dt / 1048576.0,
            mean_us
        );
        last = (now, ios, bytes, lat);
    }
}

pub fn report_and_check(result: &bench::RunResult, args: &BenchArgs, out: &Output) -> Result<()> {
    let s = report::summary(result);
    if out.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report::json(result, &s))?
        );
    } else {
        print!("{}", report::text(result, &s));
    }
    if let Some(p) = &args.plot {
        super::plot::write_report_plot(&report::json(result, &s), p)?;
    }
    if let Some(p) = &args.hist_log {
        report::write_hist_log(result, p).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.hdr_log {
        report::write_hdr_log(result, p).with_context(|| format!("writing {}", p.display()))?;
    }
    result.check()?;
    Ok(())
}
