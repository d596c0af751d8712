//! `iscsi-bypass paths`: the LU and its paths, grouped by ALUA state, in
//! the style of `multipath -ll` (text) or as JSON.

use super::{ConnectOptions, Output};
use anyhow::{Context, Result};
use clap::Args;
use iscsi_bypass::multipath::{PathState, PathStats};
use iscsi_bypass::scsi::LunInfo;
use iscsi_bypass::worker::WorkerDevice;
use serde::Serialize;
use std::time::{Duration, Instant};

/// Arguments of `paths`.
#[derive(Args, Debug)]
pub struct PathsArgs {
    /// Target URLs, one per path, all to the same LU
    /// (iscsi://host[:port]/iqn/lun).
    #[arg(required_unless_present = "discover", conflicts_with = "discover")]
    pub urls: Vec<String>,
    /// Find the paths by SendTargets at this portal (iscsi://host[:port]):
    /// one path to each portal the target reports.
    #[arg(long, value_name = "PORTAL")]
    pub discover: Option<String>,
    /// With --discover: the target to show (default: the only one found).
    #[arg(long, value_name = "IQN")]
    pub target_iqn: Option<String>,
    /// With --discover: the LUN to show.
    #[arg(long, default_value_t = 0)]
    pub lun: u64,
    /// Path selection policy of the device that is opened.
    #[arg(long, default_value = "queue-depth")]
    pub policy: String,
    /// Redraw every SECS seconds until interrupted (IOPS then counts the
    /// interval).
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
    /// Seconds to wait for paths still logging in before the first view.
    #[arg(long, default_value_t = 3)]
    pub settle: u64,
}

/// The whole view, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct PathsView {
    pub lu: LuView,
    pub policy: String,
    /// Path groups, best ALUA state first.
    pub groups: Vec<PathGroup>,
}

/// The logical unit behind the paths.
#[derive(Debug, Serialize)]
pub struct LuView {
    pub id: String,
    pub vendor: String,
    pub product: String,
    pub revision: String,
    pub block_size: u32,
    pub blocks: u64,
    pub capacity_bytes: u64,
}

/// Paths that share an ALUA access state.
#[derive(Debug, Serialize)]
pub struct PathGroup {
    /// `active/optimized`, `standby`, ... or `unknown` (no ALUA).
    pub alua: String,
    pub paths: Vec<PathView>,
}

/// One path's line.
#[derive(Debug, Serialize)]
pub struct PathView {
    pub index: usize,
    /// Local address the path is bound to, if any.
    pub local: Option<String>,
    pub portal: String,
    pub transport: &'static str,
    pub target_port_group: Option<u16>,
    pub isid: Option<String>,
    pub tsih: Option<u16>,
    pub cid: Option<u16>,
    pub state: PathState,
    pub outstanding: u64,
    pub commands: u64,
    pub errors: u64,
    pub logins: u64,
    /// Completions per second over the last interval (since open for the
    /// first view).
    pub iops: f64,
    /// Smoothed latency, microseconds.
    pub latency_us: f64,
    pub latency_p99_us: f64,
}

/// Ranks ALUA states for the order of the groups (best first).
fn alua_rank(alua: &str) -> u8 {
    match alua {
        "active/optimized" => 0,
        "active/non-optimized" => 1,
        "lba-dependent" => 2,
        "unknown" => 3,
        "standby" => 4,
        "unavailable" => 5,
        _ => 6,
    }
}

/// Builds the view from a device snapshot; `previous` (commands per path
/// and when they were counted) gives the IOPS.
pub fn build_view(
    lu: LuView,
    device_policy: String,
    paths: &[PathStats],
    previous: Option<(&[u64], Duration)>,
    since_open: Duration,
) -> PathsView {
    let mut groups: Vec<PathGroup> = Vec::new();
    for p in paths {
        let (local, portal) = match p.name.split_once("->") {
            Some((local, portal)) => (Some(local.to_string()), portal.to_string()),
            None => (None, p.name.clone()),
        };
        let (counted, interval) = match previous {
            Some((before, dt)) => (before.get(p.index).copied().unwrap_or(0), dt),
            None => (0, since_open),
        };
        let secs = interval.as_secs_f64();
        let iops = if secs > 0.0 {
            p.commands.saturating_sub(counted) as f64 / secs
        } else {
            0.0
        };
        let view = PathView {
            index: p.index,
            local,
            portal,
            transport: "kernel",
            target_port_group: p.target_port_group,
            isid: p.nexus.map(|n| n.isid_hex()),
            tsih: p.nexus.map(|n| n.tsih),
            cid: p.nexus.map(|n| n.cid),
            state: p.state,
            outstanding: p.outstanding,
            commands: p.commands,
            errors: p.errors,
            logins: p.logins,
            iops,
            latency_us: p.latency_ewma.as_secs_f64() * 1e6,
            latency_p99_us: p.latency_p99.as_secs_f64() * 1e6,
        };
        let alua = p.alua.clone().unwrap_or_else(|| "unknown".to_string());
        match groups.iter_mut().find(|g| g.alua == alua) {
            Some(g) => g.paths.push(view),
            None => groups.push(PathGroup {
                alua,
                paths: vec![view],
            }),
        }
    }
    groups.sort_by_key(|g| alua_rank(&g.alua));
    PathsView {
        lu,
        policy: device_policy,
        groups,
    }
}

impl LuView {
    fn from_info(info: &LunInfo) -> LuView {
        LuView {
            id: info.lu_id.clone().unwrap_or_default(),
            vendor: info.vendor.clone(),
            product: info.product.clone(),
            revision: info.revision.clone(),
            block_size: info.block_size,
            blocks: info.block_count,
            capacity_bytes: info.capacity_bytes,
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// The text form, one LU header, one line per group and per path.
pub fn render_text(view: &PathsView) -> String {
    use std::fmt::Write;
    let lu = &view.lu;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {},{} rev {}\nsize={} ({} x {} B) policy='{}'",
        lu.id,
        lu.vendor,
        lu.product,
        lu.revision,
        human_bytes(lu.capacity_bytes),
        lu.blocks,
        lu.block_size,
        view.policy
    );
    for (g, group) in view.groups.iter().enumerate() {
        let last_group = g + 1 == view.groups.len();
        let tpg = group
            .paths
            .first()
            .and_then(|p| p.target_port_group)
            .map(|t| format!(" tpg={t}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{}-+- alua={}{tpg}",
            if last_group { '`' } else { '|' },
            group.alua
        );
        for (i, p) in group.paths.iter().enumerate() {
            let branch = if i + 1 == group.paths.len() { '`' } else { '|' };
            let stem = if last_group { ' ' } else { '|' };
            let route = match &p.local {
                Some(local) => format!("{local}->{}", p.portal),
                None => p.portal.clone(),
            };
            let nexus = match (&p.isid, p.tsih, p.cid) {
                (Some(isid), Some(tsih), Some(cid)) => {
                    format!("isid={isid} tsih={tsih} cid={cid}")
                }
                _ => "no session".to_string(),
            };
            let _ = writeln!(
                out,
                "{stem} {branch}- {} {route} {} {nexus} {} out={} iops={:.0} lat={:.0}us p99={:.0}us logins={} errors={}",
                p.index,
                p.transport,
                p.state,
                p.outstanding,
                p.iops,
                p.latency_us,
                p.latency_p99_us,
                p.logins,
                p.errors
            );
        }
    }
    out
}

/// Waits until no path is still logging in, or `settle` passes.
fn wait_settled(device: &WorkerDevice, settle: Duration) {
    let deadline = Instant::now() + settle;
    while Instant::now() < deadline
        && device.paths().iter().any(|p| {
            p.state == PathState::Connecting || (p.state == PathState::Up && p.nexus.is_none())
        })
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(args: &PathsArgs, opts: &ConnectOptions, out: &Output) -> Result<()> {
    let urls = match &args.discover {
        Some(portal) => super::discovered_urls(portal, args.target_iqn.as_deref(), args.lun, opts)?,
        None => args.urls.clone(),
    };
    // The LU's identity and names come from one plain session to the first
    // path; the device then logs in every path.
    let info = {
        let mut lun = super::open_lun(&urls[0], opts)?;
        let info = lun.lun_info().context("INQUIRY")?;
        super::close(lun);
        info
    };
    let device = super::open_device(&urls, opts, &args.policy, 30, false, &Default::default())?;
    let opened = Instant::now();
    wait_settled(&device, Duration::from_secs(args.settle));
    let mut previous: Option<(Vec<u64>, Instant)> = None;
    loop {
        let paths = device.paths();
        let now = Instant::now();
        let before = previous
            .as_ref()
            .map(|(c, at)| (c.as_slice(), now.duration_since(*at)));
        let view = build_view(
            LuView::from_info(&info),
            args.policy.clone(),
            &paths,
            before,
            opened.elapsed(),
        );
        if out.json {
            println!("{}", serde_json::to_string(&view)?);
        } else {
            if args.watch.is_some() {
                // Clear the screen and home the cursor, as `watch` does.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render_text(&view));
        }
        let Some(every) = args.watch else { break };
        previous = Some((paths.iter().map(|p| p.commands).collect(), now));
        std::thread::sleep(Duration::from_secs_f64(every.max(0.1)));
    }
    device.close();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iscsi_bypass::multipath::Nexus;

    fn lu() -> LuView {
        LuView {
            id: "naa.60000000000000000000000000000001".into(),
            vendor: "IET".into(),
            product: "VIRTUAL-DISK".into(),
            revision: "0001".into(),
            block_size: 512,
            blocks: 2048,
            capacity_bytes: 1 << 20,
        }
    }

    fn path(index: usize, name: &str, alua: Option<&str>, commands: u64) -> PathStats {
        PathStats {
            index,
            name: name.into(),
            state: PathState::Up,
            alua: alua.map(str::to_string),
            target_port_group: Some(index as u16 + 1),
            commands,
            bytes: commands * 4096,
            errors: 0,
            resubmitted: 0,
            reassigned: 0,
            reassign_fallbacks: 0,
            async_events: 0,
            logins: 1,
            outstanding: 3,
            outstanding_bytes: 3 * 4096,
            latency_ewma: Duration::from_micros(120),
            latency_samples: commands,
            latency_p50: Duration::from_micros(100),
            latency_p90: Duration::from_micros(150),
            latency_p99: Duration::from_micros(400),
            latency_p999: Duration::from_micros(900),
            latency_max: Duration::from_millis(2),
            events: Vec::new(),
            wakeups: 0,
            nexus: Some(Nexus {
                isid: [0x80, 0, 0x12, 0x34, 0x56, index as u8],
                tsih: 7 + index as u16,
                cid: 0,
            }),
        }
    }

    #[test]
    fn groups_by_alua_best_first_with_interval_iops() {
        let paths = [
            path(0, "10.0.1.1->10.0.1.2:3260", Some("standby"), 500),
            path(1, "10.0.2.2:3260", Some("active/optimized"), 3000),
            path(2, "10.0.1.1->10.0.3.2:3260", Some("active/optimized"), 2000),
        ];
        let before = [400, 1000, 1000];
        let view = build_view(
            lu(),
            "queue-depth".into(),
            &paths,
            Some((&before, Duration::from_secs(2))),
            Duration::from_secs(9),
        );
        let groups: Vec<(&str, Vec<usize>)> = view
            .groups
            .iter()
            .map(|g| (g.alua.as_str(), g.paths.iter().map(|p| p.index).collect()))
            .collect();
        assert_eq!(
            groups,
            [("active/optimized", vec![1, 2]), ("standby", vec![0])]
        );
        let p1 = &view.groups[0].paths[0];
        assert_eq!(p1.iops, 1000.0, "2000 commands in 2 s");
        assert_eq!(
            (p1.local.as_deref(), p1.portal.as_str()),
            (None, "10.0.2.2:3260")
        );
        let p0 = &view.groups[1].paths[0];
        assert_eq!(p0.local.as_deref(), Some("10.0.1.1"));
        assert_eq!(p0.isid.as_deref(), Some("800012345600"));
        assert_eq!((p0.tsih, p0.cid), (Some(7), Some(0)));
        assert_eq!(p0.latency_us, 120.0);
    }

    #[test]
    fn first_view_counts_since_open_and_renders_a_tree() {
        let paths = [
            path(0, "10.0.1.1->10.0.1.2:3260", None, 900),
            path(1, "10.0.1.1->10.0.2.2:3260", None, 0),
        ];
        let view = build_view(
            lu(),
            "round-robin".into(),
            &paths,
            None,
            Duration::from_secs(3),
        );
        assert_eq!(view.groups.len(), 1);
        assert_eq!(view.groups[0].paths[0].iops, 300.0);
        let text = render_text(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("naa.60000000000000000000000000000001 IET,VIRTUAL-DISK"));
        assert!(lines[1].contains("size=1.0 MiB (2048 x 512 B) policy='round-robin'"));
        assert_eq!(lines[2], "`-+- alua=unknown tpg=1");
        assert!(
            lines[3].starts_with("  |- 0 10.0.1.1->10.0.1.2:3260 kernel isid=800012345600 tsih=7 cid=0 up out=3 iops=300"),
            "{}",
            lines[3]
        );
        assert!(lines[4].starts_with("  `- 1 "), "{}", lines[4]);
        let json: serde_json::Value = serde_json::to_value(&view).unwrap();
        assert_eq!(json["groups"][0]["paths"][1]["tsih"], 8);
        assert_eq!(json["groups"][0]["paths"][0]["state"], "Up");
    }
}
