//! Helpers shared by the DPDK test binaries (each binary owns one EAL).
#![allow(dead_code)]

use std::path::Path;

pub mod netns;
pub mod switch;
pub mod target_process;

use iscsi_bypass::phy::dpdk;
use std::sync::Mutex;

fn status_field(name: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .map(|rest| rest.trim().to_string())
}

/// True under `CI=true`: a missing prerequisite fails the test instead of
/// skipping it.
pub fn required() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Why DPDK tests cannot run here, if they cannot. Under `CI=true` that is a
/// failure with the reason, never a skip.
pub fn skip_reason(pmd: &str) -> Option<String> {
    let why = missing_prerequisite(pmd);
    if let Some(why) = &why {
        assert!(
            !required(),
            "CI=true requires the {pmd} test to run, but: {why}"
        );
    }
    why
}

fn missing_prerequisite(pmd: &str) -> Option<String> {
    // "Uid:  real effective saved fs"
    let root = status_field("Uid:")
        .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false);
    if !root {
        return Some("needs root (DPDK maps memory and devices)".to_string());
    }
    let plugin = Path::new(dpdk::PMD_DIR).join(format!("librte_{pmd}.so"));
    if !plugin.exists() {
        return Some(format!(
            "no DPDK plugin {} (run scripts/setup.sh)",
            plugin.display()
        ));
    }
    None
}

fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("HugePages_Free:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The first CPU this process may run on: EAL's main lcore must be one.
fn first_allowed_cpu() -> String {
    status_field("Cpus_allowed_list:")
        .and_then(|list| {
            list.split([',', '-'])
                .next()
                .map(|cpu| cpu.trim().to_string())
        })
        .filter(|cpu| !cpu.is_empty())
        .unwrap_or_else(|| "0".to_string())
}

/// EAL arguments for one test process with one `vdev`: `--in-memory`, with
/// hugepages when free ones exist, else `--no-huge -m 256`;
/// ISCSI_BYPASS_DPDK_NO_HUGE=1 forces the latter.
pub fn eal_args(vdev: &str) -> Vec<String> {
    eal_args_multi(&[vdev])
}

/// [`eal_args`] with several `--vdev`s (one port each).
pub fn eal_args_multi(vdevs: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["-l".into(), first_allowed_cpu(), "--no-pci".into()];
    for vdev in vdevs {
        args.extend(["--vdev".to_string(), vdev.to_string()]);
    }
    args.extend([
        // The shared EAL loads this directory by itself; naming it keeps the
        // test working with an EAL built without a default plugin path.
        "-d".into(),
        dpdk::PMD_DIR.into(),
        "--log-level".into(),
        "lib.eal:notice".into(),
    ]);
    let force_no_huge = std::env::var_os("ISCSI_BYPASS_DPDK_NO_HUGE").is_some();
    let prefix = if !force_no_huge && free_hugepages() >= 64 {
        // Hugepages without shared files (hugetlbfs, /var/run/dpdk), so
        // processes may share a prefix: one per test binary, since EAL
        // leaves an empty runtime directory per prefix in /var/run/dpdk
        // and per-process names would pile up there run after run.
        // (No telemetry socket either: two processes would fight over it.)
        args.extend(["--in-memory", "--no-telemetry"].map(String::from));
        format!("iscsi-bypass-test-{}", test_binary_name())
    } else {
        // --no-huge implies legacy memory, which --in-memory refuses: the
        // config files need a prefix of their own per process.
        args.extend(["--no-huge", "-m", "256"].map(String::from));
        format!("iscsi-bypass-test-{}", std::process::id())
    };
    args.extend(["--file-prefix".to_string(), prefix]);
    args
}

/// `dpdk_smoke` for `target/debug/deps/dpdk_smoke-0123abcd`.
fn test_binary_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|stem| match stem.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => stem,
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// The CPUs this process may run on (from Cpus_allowed_list), in order.
pub fn allowed_cpus() -> Vec<usize> {
    let list = status_field("Cpus_allowed_list:").unwrap_or_default();
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.parse::<usize>(), hi.parse::<usize>()) {
            cpus.extend(lo..=hi);
        }
    }
    if cpus.is_empty() {
        cpus.push(0);
    }
    cpus
}

/// Logs in to `iqn` over `transport` and checks the LU holds `lu_bytes`.
pub fn login_lun<T: iscsi_bypass::transport::Transport>(
    transport: T,
    initiator: &str,
    iqn: &str,
    lu_bytes: u64,
) -> iscsi_bypass::scsi::lun::LunHandle<T> {
    use iscsi_bypass::iscsi::login::LoginConfig;
    use iscsi_bypass::iscsi::session::{Session, SessionConfig};
    let login = LoginConfig::new(initiator, Some(iqn));
    let session = Session::login(transport, &SessionConfig::new(login)).expect("login");
    let mut lun = iscsi_bypass::scsi::lun::LunHandle::new(session, 0);
    let cap = lun.read_capacity().expect("READ CAPACITY");
    assert_eq!(cap.block_count * u64::from(cap.block_size), lu_bytes);
    lun
}

/// For each `(count, bytes)`: `count` writes of `bytes` random bytes at
/// random LBAs (from `seed`), each read back and compared byte for byte.
pub fn write_read_back<T: iscsi_bypass::transport::Transport>(
    lun: &mut iscsi_bypass::scsi::lun::LunHandle<T>,
    seed: u64,
    rounds: &[(usize, usize)],
) {
    use rand::{Rng, SeedableRng};
    let cap = lun.read_capacity().expect("READ CAPACITY");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for &(count, bytes) in rounds {
        let blocks = (bytes / cap.block_size as usize) as u32;
        for _ in 0..count {
            let lba = rng.gen_range(0..cap.block_count - u64::from(blocks));
            let data: Vec<u8> = (0..bytes).map(|_| rng.gen()).collect();
            lun.write(lba, data.clone()).expect("WRITE");
            assert!(
                lun.read(lba, blocks).expect("READ") == data,
                "read-back mismatch at LBA {lba}"
            );
        }
    }
}

/// Frame sizes seen by a [`FrameSizes`] device: how many frames in each
/// direction were longer than its threshold, and the longest.
#[derive(Debug, Default)]
pub struct FrameCounts {
    pub rx_big: std::sync::atomic::AtomicU64,
    pub tx_big: std::sync::atomic::AtomicU64,
    pub rx_max: std::sync::atomic::AtomicUsize,
    pub tx_max: std::sync::atomic::AtomicUsize,
}

impl FrameCounts {
    pub fn get(&self) -> (u64, u64, usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.rx_big.load(Relaxed),
            self.tx_big.load(Relaxed),
            self.rx_max.load(Relaxed),
            self.tx_max.load(Relaxed),
        )
    }
}

/// A device that counts the frames longer than `threshold` bytes it
/// receives and sends (e.g. to show jumbo or TSO frames on the wire).
pub struct FrameSizes<D> {
    inner: D,
    threshold: usize,
    counts: std::sync::Arc<FrameCounts>,
}

impl<D: iscsi_bypass::phy::Device> FrameSizes<D> {
    pub fn wrap(inner: D, threshold: usize) -> (Self, std::sync::Arc<FrameCounts>) {
        let counts = std::sync::Arc::new(FrameCounts::default());
        let device = FrameSizes {
            inner,
            threshold,
            counts: std::sync::Arc::clone(&counts),
        };
        (device, counts)
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: iscsi_bypass::phy::Device> iscsi_bypass::phy::Device for FrameSizes<D> {
    fn caps(&self) -> iscsi_bypass::phy::DeviceCaps {
        self.inner.caps()
    }
    fn rx_burst(
        &mut self,
        max: usize,
        on_frame: &mut dyn FnMut(&[u8], iscsi_bypass::phy::RxMeta),
    ) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let (threshold, counts) = (self.threshold, &self.counts);
        self.inner.rx_burst(max, &mut |frame, meta| {
            if frame.len() > threshold {
                counts.rx_big.fetch_add(1, Relaxed);
            }
            counts.rx_max.fetch_max(frame.len(), Relaxed);
            on_frame(frame, meta)
        })
    }
    fn tx_frame(
        &mut self,
        len: usize,
        offload: iscsi_bypass::phy::TxOffload,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), iscsi_bypass::phy::PhyError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.tx_frame(len, offload, fill)?;
        if len > self.threshold {
            self.counts.tx_big.fetch_add(1, Relaxed);
        }
        self.counts.tx_max.fetch_max(len, Relaxed);
        Ok(())
    }
    fn tx_flush(&mut self) -> usize {
        self.inner.tx_flush()
    }
}

/// EAL for this test binary, started once; the lock keeps two tests of
/// the binary from racing its start.
pub fn eal(args: &[String]) -> dpdk::Eal {
    static FIRST: Mutex<()> = Mutex::new(());
    let _one_at_a_time = FIRST.lock().unwrap_or_else(|e| e.into_inner());
    iscsi_bypass::transport::dpdk::eal(args).expect("EAL")
}
