//! The workload generator behind `iscsi-bypass bench`: fio-like jobs,
//! per-I/O latency in HdrHistogram, CPU time of the initiator per I/O,
//! optional data verification, and reports (text, fio-like JSON,
//! HdrHistogram interval logs).
//!
//! The I/O itself goes through an [`Engine`] (one per job thread), so the
//! same generator drives a single iSCSI session, a multipath device over
//! kernel TCP, or over the userspace stack.

pub mod cpu;
pub mod dist;
pub mod engine;
pub mod fio_hist;
pub mod fiohist;
pub mod job;
pub mod pace;
pub mod plot;
pub mod report;
pub mod series;
pub mod verify;

use crate::worker::poll_meter;
use hdrhistogram::Histogram;
use job::JobSpec;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Job(#[from] job::JobError),
    #[error("I/O engine: {0}")]
    Engine(String),
    #[error("verify failed at LBA {lba}: {what}")]
    Verify { lba: u64, what: String },
    #[error("{count} I/O errors; first: {first}")]
    IoErrors { count: u64, first: String },
}

/// One I/O as the generator asks for it.
#[derive(Debug)]
pub struct BenchIo {
    pub tag: u64,
    pub write: bool,
    pub lba: u64,
    pub blocks: u32,
    /// `blocks * block_size` bytes: data to write, or room to read into.
    pub buffer: Vec<u8>,
}

/// A finished I/O.
#[derive(Debug)]
pub struct BenchDone {
    pub tag: u64,
    pub result: Result<(), String>,
    pub buffer: Vec<u8>,
    /// Index of the path that served it, when the engine knows.
    pub path: Option<usize>,
}

/// Submission and completion for one job thread.
pub trait Engine: Send {
    /// Queues an I/O issued at `issued` (the job loop's clock reading just
    /// before the call; an engine that needs the time takes it from there
    /// rather than read the clock again); gives it back when the queue is
    /// full.
    fn submit(&mut self, io: BenchIo, issued: Instant) -> Result<(), BenchIo>;
    /// Moves finished I/Os into `out`; may do I/O work (poll mode). Returns
    /// the time of a clock reading taken at the end of the poll (the poll
    /// meter's), if it took one: the job loop times the completions by it.
    fn poll(&mut self, out: &mut Vec<BenchDone>) -> Result<Option<Instant>, String>;
    /// Closes the engine (logout); called once at the end.
    fn finish(&mut self) {}
}

/// Opens one engine per job thread and describes the device behind them.
pub trait EngineFactory: Sync {
    fn block_size(&self) -> u32;
    fn capacity_blocks(&self) -> u64;
    fn open(&self, job_index: u32) -> Result<Box<dyn Engine>, String>;
    /// Names of the paths, for per-path reports.
    fn path_names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Per-direction statistics of one job thread, the numbers fio keeps per
/// `ddir`.
#[derive(Clone)]
pub struct DirStats {
    /// Submission latency: from the job loop's issue of the I/O until the
    /// engine accepted it (built the command and wrote it to the socket,
    /// or put it on the path worker's ring) — fio's `slat`.
    pub slat: Histogram<u64>,
    /// Completion latency: from the engine accepting the I/O until the job
    /// loop saw it complete — fio's `clat`.
    pub clat: Histogram<u64>,
    /// Total latency, issue to completion (`slat + clat`) — fio's `lat`.
    pub lat: Histogram<u64>,
    pub bytes: u64,
    /// Completed I/Os per block size (checks `bssplit`).
    pub bs_counts: BTreeMap<u32, u64>,
    /// Bandwidth samples in KiB/s, one per 500 ms of the measured part
    /// (fio's `bw_avg_time` default).
    pub bw_samples: Vec<u64>,
    /// IOPS samples, one per 500 ms (fio's `iops_avg_time` default).
    pub iops_samples: Vec<u64>,
}

impl DirStats {
    fn new() -> DirStats {
        DirStats {
            slat: new_histogram(),
            clat: new_histogram(),
            lat: new_histogram(),
            bytes: 0,
            bs_counts: BTreeMap::new(),
            bw_samples: Vec::new(),
            iops_samples: Vec::new(),
        }
    }
}

/// Results of one job thread.
pub struct JobResult {
    /// Index of the job (section of the job file) this thread ran.
    pub job: usize,
    /// [`job::READ`] and [`job::WRITE`].
    pub dirs: [DirStats; 2],
    pub ios_per_path: Vec<u64>,
    pub lat_per_path: Vec<Histogram<u64>>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub verify_failure: Option<(u64, String)>,
    pub measured: Duration,
    /// CPU of this job thread during the measured part.
    pub usage: cpu::ThreadUsage,
    /// fio-style latency histogram log samples (when asked for).
    pub hist: Vec<fiohist::HistSample>,
    /// Completions per interval, per path (for IOPS over time).
    pub series: series::IopsSeries,
}

impl JobResult {
    pub fn read_lat(&self) -> &Histogram<u64> {
        &self.dirs[job::READ].lat
    }
    pub fn write_lat(&self) -> &Histogram<u64> {
        &self.dirs[job::WRITE].lat
    }
    pub fn read_bytes(&self) -> u64 {
        self.dirs[job::READ].bytes
    }
    pub fn write_bytes(&self) -> u64 {
        self.dirs[job::WRITE].bytes
    }
}

/// Counters the progress line reads while the run goes on.
#[derive(Default)]
pub struct LiveCounters {
    pub ios: AtomicU64,
    pub bytes: AtomicU64,
    pub lat_ns_sum: AtomicU64,
    /// Completed I/Os per path (the first eight paths), for the progress line.
    pub path_ios: [AtomicU64; 8],
    pub measuring: AtomicBool,
    pub stop: AtomicBool,
}

/// A job thread's completions not yet added to the shared [`LiveCounters`]:
/// the progress line reads them about once a second, so a thread adds them
/// every [`LIVE_BATCH`] I/Os, every sample window and when it stops, rather
/// than doing four atomic adds per I/O on lines every job thread writes.
#[derive(Default)]
struct LivePending {
    ios: u64,
    bytes: u64,
    lat_ns_sum: u64,
    path_ios: [u64; 8],
}

/// Completions a job thread gathers before publishing them.
const LIVE_BATCH: u64 = 256;

impl LivePending {
    fn record(&mut self, live: &LiveCounters, path: Option<usize>, bytes: u64, lat_ns: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.lat_ns_sum += lat_ns;
        if let Some(c) = path.and_then(|p| self.path_ios.get_mut(p)) {
            *c += 1;
        }
        if self.ios >= LIVE_BATCH {
            self.publish(live);
        }
    }

    fn publish(&mut self, live: &LiveCounters) {
        if self.ios == 0 {
            return;
        }
        live.ios.fetch_add(self.ios, Ordering::Relaxed);
        live.bytes.fetch_add(self.bytes, Ordering::Relaxed);
        live.lat_ns_sum
            .fetch_add(self.lat_ns_sum, Ordering::Relaxed);
        for (c, n) in live.path_ios.iter().zip(&mut self.path_ios) {
            if *n > 0 {
                c.fetch_add(std::mem::take(n), Ordering::Relaxed);
            }
        }
        *self = LivePending::default();
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Interval of fio's bandwidth and IOPS samples (`bw_avg_time`,
/// `iops_avg_time`).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// Where one job thread does its I/O and how it is set up.
#[derive(Debug, Clone, Copy)]
pub struct ThreadPlan<'a> {
    /// Index of this thread among the job's `numjobs` clones.
    pub clone: u32,
    /// Interval of the histogram log in ms (0: no log).
    pub hist_msec: u64,
    /// Time zero of the histogram log, shared by the threads of a run:
    /// set by the first thread whose measured part begins (None: this
    /// thread's own measured start, as fio's per-job epoch).
    pub hist_epoch: Option<&'a std::sync::OnceLock<Instant>>,
}

/// What one I/O in flight is.
struct InFlight {
    /// Offset into the thread's region, in LUN blocks.
    off: u64,
    write: bool,
    generation: u64,
    issued: Instant,
    submitted: Instant,
}

/// Picks block sizes by weight, as fio's `bssplit`.
struct BsPicker {
    sizes: Vec<(u32, u32)>,
    total: u32,
}

impl BsPicker {
    fn new(sizes: Vec<(u32, u32)>) -> BsPicker {
        let total = sizes.iter().map(|s| s.1).sum::<u32>().max(1);
        BsPicker { sizes, total }
    }
    fn pick(&self, rng: &mut SmallRng) -> u32 {
        if self.sizes.len() == 1 {
            return self.sizes[0].0;
        }
        let mut r = rng.gen_range(0..self.total);
        for &(bs, w) in &self.sizes {
            if r < w {
                return bs;
            }
            r -= w;
        }
        self.sizes[self.sizes.len() - 1].0
    }
}

/// Sleeps until `until` (or `end`, if sooner), spinning for the last bit
/// so short waits (rate caps of many thousand IOPS) stay accurate.
fn wait_until(until: Instant, end: Instant) {
    let t = until.min(end);
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > Duration::from_micros(200) {
            std::thread::sleep(left - Duration::from_micros(100));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Runs one job thread's loop: keeps `iodepth` I/Os in flight until the
/// ramp and runtime have passed, honouring the job's block sizes, rate
/// caps, offset distribution and think time.
pub fn run_job(
    spec: &JobSpec,
    job_index: u32,
    engine: &mut dyn Engine,
    block_size: u32,
    region: (u64, u64),
    paths: usize,
    live: &LiveCounters,
) -> JobResult {
    run_job_planned(
        spec,
        ThreadPlan {
            clone: job_index,
            hist_msec: 0,
            hist_epoch: None,
        },
        engine,
        block_size,
        region,
        paths,
        live,
    )
}

/// [`run_job`] with a [`ThreadPlan`].
pub fn run_job_planned(
    spec: &JobSpec,
    plan: ThreadPlan<'_>,
    engine: &mut dyn Engine,
    block_size: u32,
    region: (u64, u64),
    paths: usize,
    live: &LiveCounters,
) -> JobResult {
    let job_index = plan.clone;
    let lbs = block_size as u64;
    // Offsets are multiples of the smallest block size (fio's range size).
    let unit = (spec.min_bs_all() as u64 / lbs).max(1);
    // With verify each job thread owns a slice of the region, so verify
    // never races between threads; otherwise every clone covers the whole
    // region, as fio's clones do.
    let (first, len) = if spec.verify {
        let per_job = region.1 / spec.numjobs as u64;
        (region.0 + per_job * job_index as u64, per_job)
    } else {
        region
    };
    let nranges = (len / unit).max(1);
    let seed = spec.seed ^ (job_index as u64).wrapping_mul(0x9e37_79b9);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut offsets = dist::OffsetGen::new(spec.random_distribution, nranges, seed ^ 0x0ff5e7);
    let read_pct = spec.rw.read_percent(spec.rwmixread) as u32;
    let pickers = [
        BsPicker::new(spec.block_sizes(job::READ)),
        BsPicker::new(spec.block_sizes(job::WRITE)),
    ];
    let mixed = read_pct > 0 && read_pct < 100;
    let mut rate =
        pace::RateLimiter::new([spec.rate_bps(job::READ), spec.rate_bps(job::WRITE)], mixed);
    let mut generations =
        verify::GenerationMap::new(if spec.verify { nranges as usize } else { 0 });
    let mut next_generation: u64 = 1;
    let mut seq_off: u64 = 0;
    // Ranges with an I/O in flight (verify only: it needs order).
    let mut in_flight: HashSet<u64> = HashSet::with_capacity(spec.iodepth as usize * 2);
    let mut pending: Vec<Option<InFlight>> = (0..spec.iodepth).map(|_| None).collect();
    let mut free_tags: Vec<u64> = (0..spec.iodepth as u64).rev().collect();
    let max_bs = spec.max_bs() as usize;
    let mut buffers: Vec<Vec<u8>> = (0..spec.iodepth).map(|_| vec![0u8; max_bs]).collect();
    let mut done = Vec::with_capacity(spec.iodepth as usize);
    let mut hist = [
        fiohist::HistWindow::new(plan.hist_msec),
        fiohist::HistWindow::new(plan.hist_msec),
    ];
    let mut r = JobResult {
        job: 0,
        dirs: [DirStats::new(), DirStats::new()],
        ios_per_path: vec![0; paths.max(1)],
        lat_per_path: (0..paths.max(1)).map(|_| new_histogram()).collect(),
        errors: 0,
        first_error: None,
        verify_failure: None,
        measured: Duration::ZERO,
        usage: cpu::ThreadUsage::default(),
        hist: Vec::new(),
        series: series::IopsSeries::new(spec.runtime, paths.max(1)),
    };
    let directions = spec.directions();
    let start = Instant::now();
    let measure_from = start + spec.ramp;
    let end = measure_from + spec.runtime;
    let mut measuring = false;
    let mut hist_zero = measure_from;
    let mut usage_start = cpu::ThreadUsage::now();
    let mut measured_end: Option<(Instant, cpu::ThreadUsage)> = None;
    // Rate epoch: the start, then the end of the ramp (fio resets there).
    let mut rate_epoch = start;
    // bw/iops sampling windows.
    let mut next_sample = measure_from + SAMPLE_INTERVAL;
    let mut window_start = measure_from;
    let mut window_bytes = [0u64; 2];
    let mut window_ios = [0u64; 2];
    // Think time: I/Os counted, and whether a stall waits for the queue
    // to drain.
    let thinking = !spec.thinktime.is_zero();
    let (mut think_issued, mut think_completed, mut think_last) = (0u64, 0u64, 0u64);
    let mut think_pending = false;
    let mut live_pending = LivePending::default();
    // The clock reading that ended the previous round, when nothing ran
    // since: this round starts at it.
    let mut round_start: Option<Instant> = None;
    loop {
        let now = round_start.take().unwrap_or_else(Instant::now);
        if !measuring && now >= measure_from {
            measuring = true;
            live.measuring.store(true, Ordering::Relaxed);
            usage_start = cpu::ThreadUsage::now();
            rate.reset();
            rate_epoch = now;
            hist_zero = plan.hist_epoch.map_or(now, |e| *e.get_or_init(|| now));
            window_start = now;
            next_sample = now + SAMPLE_INTERVAL;
        }
        if measuring && now >= next_sample && measured_end.is_none() {
            let ms = now
                .saturating_duration_since(window_start)
                .as_millis()
                .max(1) as u64;
            for &d in &directions {
                r.dirs[d]
                    .bw_samples
                    .push(window_bytes[d] * 1000 / ms / 1024);
                r.dirs[d].iops_samples.push(window_ios[d] * 1000 / ms);
            }
            window_bytes = [0; 2];
            window_ios = [0; 2];
            window_start = now;
            // A slow (rate-capped) job still shows on the progress line.
            live_pending.publish(live);
            next_sample = now + SAMPLE_INTERVAL;
        }
        let stopping =
            now >= end || live.stop.load(Ordering::Relaxed) || r.verify_failure.is_some();
        if stopping && measured_end.is_none() {
            measured_end = Some((now, cpu::ThreadUsage::now()));
        }
        if stopping && free_tags.len() == spec.iodepth as usize {
            break;
        }
        // Think time: once the queue drained, stall (spin, then sleep).
        if think_pending && !stopping && free_tags.len() == spec.iodepth as usize {
            let spin_until = Instant::now() + spec.thinktime_spin.min(spec.thinktime);
            while Instant::now() < spin_until.min(end) {
                std::hint::spin_loop();
            }
            wait_until(now + spec.thinktime, end);
            think_pending = false;
            think_last = if spec.thinktime_blocks_issue {
                think_issued
            } else {
                think_completed
            };
            continue;
        }
        // Fill the queue.
        let mut submitted_any = false;
        let mut last_submitted: Option<Instant> = None;
        let mut rate_wait: Option<Instant> = None;
        while !stopping && !think_pending && !free_tags.is_empty() {
            let mut write = rng.gen_range(0..100) >= read_pct;
            if rate.active() {
                let now_us = Instant::now()
                    .saturating_duration_since(rate_epoch)
                    .as_micros() as u64;
                match rate.choose(write as usize, now_us) {
                    pace::Pace::Go(d) => write = d == job::WRITE,
                    pace::Pace::Wait { until_us, .. } => {
                        rate_wait = Some(rate_epoch + Duration::from_micros(until_us));
                        break;
                    }
                }
            }
            let dir = write as usize;
            let bytes = pickers[dir].pick(&mut rng);
            let blocks = (bytes as u64 / lbs).max(1);
            let Some(tag) = free_tags.pop() else { break };
            let off = if spec.rw.random() {
                let mut pick = || {
                    let o = offsets.next_index() * unit;
                    if o + blocks > len {
                        (len.saturating_sub(blocks)) / unit * unit
                    } else {
                        o
                    }
                };
                let mut o = pick();
                if spec.verify {
                    // Avoid a range with an I/O in flight (verify needs order).
                    let mut tries = 0;
                    while in_flight.contains(&(o / unit)) && tries < 8 {
                        o = pick();
                        tries += 1;
                    }
                    if in_flight.contains(&(o / unit)) {
                        free_tags.push(tag);
                        break;
                    }
                }
                o
            } else {
                if seq_off + blocks > len {
                    seq_off = 0;
                }
                let o = seq_off;
                if spec.verify && in_flight.contains(&(o / unit)) {
                    free_tags.push(tag);
                    break;
                }
                seq_off += blocks;
                o
            };
            let lba = first + off;
            let mut buffer = buffers.pop().unwrap_or_default();
            buffer.resize((blocks * lbs) as usize, 0);
            let mut generation = 0;
            if write && spec.verify {
                generation = next_generation;
                next_generation += 1;
                for (i, b) in buffer.chunks_mut(block_size as usize).enumerate() {
                    verify::stamp_block(b, lba + i as u64, generation);
                }
            }
            let io = BenchIo {
                tag,
                write,
                lba,
                blocks: blocks as u32,
                buffer,
            };
            // Read before the submit: a job thread preempted right after it
            // would otherwise shorten the latency by the time it waited. The
            // reading after one submit is the next one's issue time (the
            // bookkeeping between them counts into the next I/O's latency).
            let issued = last_submitted.take().unwrap_or_else(Instant::now);
            match engine.submit(io, issued) {
                Ok(()) => {
                    let submitted = Instant::now();
                    last_submitted = Some(submitted);
                    submitted_any = true;
                    if spec.verify {
                        in_flight.insert(off / unit);
                    }
                    rate.issued(dir, blocks * lbs);
                    pending[tag as usize] = Some(InFlight {
                        off,
                        write,
                        generation,
                        issued,
                        submitted,
                    });
                    if thinking && measuring {
                        think_issued += 1;
                        let counter = if spec.thinktime_blocks_issue {
                            think_issued
                        } else {
                            think_completed
                        };
                        if counter >= think_last + u64::from(spec.thinktime_blocks) {
                            think_pending = true;
                        }
                    }
                }
                Err(io) => {
                    buffers.push(io.buffer);
                    free_tags.push(tag);
                    break;
                }
            }
        }
        // The round's end is the last submit's reading when there was one.
        match last_submitted {
            Some(t) => poll_meter::tick_at(t, Duration::ZERO, true),
            None => {
                poll_meter::tick(submitted_any);
            }
        }
        if free_tags.len() == spec.iodepth as usize {
            // Nothing in flight: wait for the rate cap's next slot rather
            // than poll an idle engine.
            if let Some(t) = rate_wait {
                wait_until(t, end);
                continue;
            }
        }
        let polled_at = match engine.poll(&mut done) {
            Ok(t) => t,
            Err(e) => {
                r.errors += 1;
                r.first_error.get_or_insert(e);
                break;
            }
        };
        let now = polled_at.unwrap_or_else(Instant::now);
        let completed_any = !done.is_empty();
        for d in done.drain(..) {
            let Some(Some(io)) = pending.get_mut(d.tag as usize).map(Option::take) else {
                continue;
            };
            let slot = io.off / unit;
            if spec.verify {
                in_flight.remove(&slot);
            }
            free_tags.push(d.tag);
            let lat = now.saturating_duration_since(io.issued).as_nanos() as u64;
            let slat = io.submitted.saturating_duration_since(io.issued).as_nanos() as u64;
            let clat = now.saturating_duration_since(io.submitted).as_nanos() as u64;
            match &d.result {
                Ok(()) => {
                    if thinking && measuring {
                        think_completed += 1;
                    }
                    if spec.verify {
                        let lba = first + io.off;
                        if io.write {
                            generations.set(slot as usize, io.generation);
                        } else {
                            for (i, b) in d.buffer.chunks(block_size as usize).enumerate() {
                                let at = lba + i as u64;
                                if let Err(m) = generations.check(slot as usize, b, at) {
                                    r.verify_failure.get_or_insert((at, m.to_string()));
                                    break;
                                }
                            }
                        }
                    }
                    if measuring && io.issued >= measure_from {
                        let dir = io.write as usize;
                        let bytes = d.buffer.len() as u64;
                        r.series
                            .record(d.path, now.saturating_duration_since(measure_from));
                        let st = &mut r.dirs[dir];
                        let _ = st.lat.record(lat.max(1));
                        let _ = st.clat.record(clat.max(1));
                        let _ = st.slat.record(slat.max(1));
                        st.bytes += bytes;
                        *st.bs_counts.entry(bytes as u32).or_insert(0) += 1;
                        window_bytes[dir] += bytes;
                        window_ios[dir] += 1;
                        if plan.hist_msec > 0 {
                            let ms = now.saturating_duration_since(hist_zero).as_millis() as u64;
                            if let Some(s) = hist[dir].record(clat, ms, dir as u8, bytes as u32) {
                                r.hist.push(s);
                            }
                        }
                        if let Some(p) = d.path {
                            if let Some(c) = r.ios_per_path.get_mut(p) {
                                *c += 1;
                            }
                            if let Some(h) = r.lat_per_path.get_mut(p) {
                                let _ = h.record(lat.max(1));
                            }
                        }
                        live_pending.record(live, d.path, bytes, lat);
                    }
                }
                Err(e) => {
                    r.errors += 1;
                    if spec.verify && io.write {
                        generations.write_failed(slot as usize, io.generation);
                    }
                    if r.first_error.is_none() {
                        r.first_error = Some(e.clone());
                    }
                }
            }
            buffers.push(d.buffer);
        }
        round_start = Some(poll_meter::tick(completed_any));
    }
    live_pending.publish(live);
    let (end_at, usage_end) =
        measured_end.unwrap_or_else(|| (Instant::now(), cpu::ThreadUsage::now()));
    r.measured = end_at
        .saturating_duration_since(measure_from)
        .min(spec.runtime);
    r.usage = usage_end.since(usage_start);
    engine.finish();
    r
}

/// The outcome of a whole run.
pub struct RunResult {
    /// The first job (the only one of a single-job run).
    pub spec: JobSpec,
    /// Every job of the run, in job-file order.
    pub specs: Vec<JobSpec>,
    /// fio's `groupid` of each job: jobs after a `stonewall` start a new
    /// group.
    pub groups: Vec<u32>,
    /// Each job thread's results ([`JobResult::job`] says which job).
    pub jobs: Vec<JobResult>,
    pub elapsed: Duration,
    /// Initiator CPU nanoseconds during the measured part.
    pub cpu_ns: u64,
    /// Busy and idle time of the initiator's poll loops (job threads and
    /// path workers) during the measured part: see [`poll_meter`].
    pub poll: poll_meter::PollTotals,
    pub path_names: Vec<String>,
    /// The session (TSIH) and connection (CID) of each path, by index, as
    /// the caller records them (MPIO: a TSIH each; MC/S: one TSIH, a CID
    /// each); empty when not known.
    pub path_nexus: Vec<Option<crate::multipath::Nexus>>,
}

/// Options of a run that are not the jobs'.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Histogram log interval in ms for every job (0: each job's
    /// `log_hist_msec`; no log when that is 0 too).
    pub hist_msec: u64,
}

/// Runs `spec` on `numjobs` threads, each with its own engine.
pub fn run(
    spec: &JobSpec,
    factory: &dyn EngineFactory,
    live: Arc<LiveCounters>,
) -> Result<RunResult, BenchError> {
    run_jobs(
        std::slice::from_ref(spec),
        RunOptions::default(),
        factory,
        live,
    )
}

/// Runs the jobs of a job file as fio does: every job at once, except that
/// a job with `stonewall` waits until all jobs before it finished. Each
/// job has `numjobs` threads, each with its own engine.
pub fn run_jobs(
    specs: &[JobSpec],
    options: RunOptions,
    factory: &dyn EngineFactory,
    live: Arc<LiveCounters>,
) -> Result<RunResult, BenchError> {
    let Some(first_spec) = specs.first() else {
        return Err(job::JobError::Invalid {
            key: "job".into(),
            why: "no job to run".into(),
        }
        .into());
    };
    let block_size = factory.block_size();
    let mut regions = Vec::new();
    for spec in specs {
        let region = spec.region(block_size, factory.capacity_blocks())?;
        if spec.verify && region.1 / (spec.numjobs as u64) < (spec.bs / block_size) as u64 {
            return Err(job::JobError::Invalid {
                key: "numjobs".into(),
                why: "the region is too small to give each job one I/O".into(),
            }
            .into());
        }
        regions.push(region);
    }
    // Groups: a stonewall starts the next one (fio's groupid).
    let mut groups = Vec::new();
    let mut group = 0u32;
    for (i, spec) in specs.iter().enumerate() {
        if spec.stonewall && i > 0 {
            group += 1;
        }
        groups.push(group);
    }
    let paths = factory.path_names();
    let start = Instant::now();
    let cpu_start = Arc::new(AtomicU64::new(0));
    let poll_start = Arc::new(std::sync::Mutex::new(poll_meter::totals()));
    let phases_done = AtomicBool::new(false);
    let hist_epoch = std::sync::OnceLock::new();
    let mut results: Vec<(JobResult, poll_meter::PollTotals)> = Vec::new();
    std::thread::scope(|s| -> Result<(), BenchError> {
        // Sample the CPU counter when measuring begins (after the ramp).
        let sampler = {
            let live = live.clone();
            let cpu_start = cpu_start.clone();
            let poll_start = poll_start.clone();
            let phases_done = &phases_done;
            s.spawn(move || {
                while !live.measuring.load(Ordering::Relaxed)
                    && !live.stop.load(Ordering::Relaxed)
                    && !phases_done.load(Ordering::Relaxed)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                cpu_start.store(cpu::initiator_cpu_ns(), Ordering::Relaxed);
                *poll_start.lock().unwrap_or_else(|e| e.into_inner()) = poll_meter::totals();
            })
        };
        let mut outcome = Ok(());
        for g in 0..=group {
            if live.stop.load(Ordering::Relaxed) {
                break;
            }
            // Open every engine of the group first, then start the threads.
            let mut threads = Vec::new();
            let mut opened = 0u32;
            for (j, spec) in specs.iter().enumerate().filter(|(j, _)| groups[*j] == g) {
                for clone in 0..spec.numjobs {
                    match factory.open(opened) {
                        Ok(e) => threads.push((j, clone, e)),
                        Err(e) => {
                            outcome = Err(BenchError::Engine(e));
                            break;
                        }
                    }
                    opened += 1;
                }
            }
            if outcome.is_err() {
                break;
            }
            let handles: Vec<_> = threads
                .into_iter()
                .map(|(j, clone, mut engine)| {
                    let live = &live;
                    let spec = &specs[j];
                    let region = regions[j];
                    let n_paths = paths.len();
                    let hist_epoch = &hist_epoch;
                    let hist_msec = match (options.hist_msec, spec.log_hist_msec) {
                        (0, m) => m,
                        (m, _) => m,
                    };
                    std::thread::Builder::new()
                        .name(format!("bench-job{j}.{clone}"))
                        .spawn_scoped(s, move || {
                            crate::worker::precise_timers();
                            let mut r = run_job_planned(
                                spec,
                                ThreadPlan {
                                    clone,
                                    hist_msec,
                                    hist_epoch: Some(hist_epoch),
                                },
                                engine.as_mut(),
                                block_size,
                                region,
                                n_paths,
                                live,
                            );
                            r.job = j;
                            // The measured part ended: what the loop did
                            // after it (logout) is not the run's.
                            poll_meter::flush();
                            let poll = poll_meter::totals();
                            drop(engine);
                            cpu::account_exiting_thread();
                            (r, poll)
                        })
                        .expect("spawn job thread")
                })
                .collect();
            for h in handles {
                results.push(h.join().expect("job thread panicked"));
            }
        }
        phases_done.store(true, Ordering::Relaxed);
        live.stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        outcome
    })?;
    let cpu_ns = cpu::initiator_cpu_ns().saturating_sub(cpu_start.load(Ordering::Relaxed));
    // The latest of the job threads' end-of-run readings.
    let poll_end = results
        .iter()
        .map(|(_, p)| *p)
        .max_by_key(|p| p.busy_ns + p.idle_ns)
        .unwrap_or_else(poll_meter::totals);
    let poll = poll_end.since(*poll_start.lock().unwrap_or_else(|e| e.into_inner()));
    let run = RunResult {
        spec: first_spec.clone(),
        specs: specs.to_vec(),
        groups,
        jobs: results.into_iter().map(|(r, _)| r).collect(),
        poll,
        elapsed: start.elapsed(),
        cpu_ns,
        path_names: paths,
        path_nexus: Vec::new(),
    };
    Ok(run)
}

impl RunResult {
    /// Fails the run on verify mismatches or I/O errors.
    pub fn check(&self) -> Result<(), BenchError> {
        if let Some((lba, what)) = self.jobs.iter().find_map(|j| j.verify_failure.clone()) {
            return Err(BenchError::Verify { lba, what });
        }
        let errors: u64 = self.jobs.iter().map(|j| j.errors).sum();
        if errors > 0 {
            let first = self
                .jobs
                .iter()
                .find_map(|j| j.first_error.clone())
                .unwrap_or_default();
            return Err(BenchError::IoErrors {
                count: errors,
                first,
            });
        }
        Ok(())
    }
}
