//! The workload generator behind `iscsi-bypass bench`: fio-like jobs,
//! per-I/O latency in HdrHistogram, CPU time of the initiator per I/O,
//! optional data verification, and reports (text, fio-like JSON,
//! HdrHistogram interval logs).
//!
//! The I/O itself goes through an [`Engine`] (one per job thread), so the
//! same generator drives a single iSCSI session, a multipath device over
//! kernel TCP, or over the userspace stack.

pub mod cpu;
pub mod engine;
pub mod fio_hist;
pub mod job;
pub mod plot;
pub mod report;
pub mod series;
pub mod verify;

use crate::worker::poll_meter;
use hdrhistogram::Histogram;
use job::JobSpec;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
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
    /// Queues an I/O; gives it back when the queue is full.
    fn submit(&mut self, io: BenchIo) -> Result<(), BenchIo>;
    /// Moves finished I/Os into `out`; may do I/O work (poll mode).
    fn poll(&mut self, out: &mut Vec<BenchDone>) -> Result<(), String>;
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

/// Results of one job thread.
pub struct JobResult {
    pub read_lat: Histogram<u64>,
    pub write_lat: Histogram<u64>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub ios_per_path: Vec<u64>,
    pub lat_per_path: Vec<Histogram<u64>>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub verify_failure: Option<(u64, String)>,
    pub measured: Duration,
    /// Completions per interval, per path (for IOPS over time).
    pub series: series::IopsSeries,
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

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Runs one job thread's loop: keeps `iodepth` I/Os in flight until the
/// ramp and runtime have passed.
pub fn run_job(
    spec: &JobSpec,
    job_index: u32,
    engine: &mut dyn Engine,
    block_size: u32,
    region: (u64, u64),
    paths: usize,
    live: &LiveCounters,
) -> JobResult {
    let bs_blocks = (spec.bs / block_size).max(1) as u64;
    // Each job thread owns a slice of the region, so verify never races
    // between threads.
    let per_job = region.1 / spec.numjobs as u64;
    let first = region.0 + per_job * job_index as u64;
    let slots = (per_job / bs_blocks).max(1);
    let mut rng = SmallRng::seed_from_u64(spec.seed ^ (job_index as u64).wrapping_mul(0x9e37_79b9));
    let read_pct = spec.rw.read_percent(spec.rwmixread) as u32;
    let mut generations = verify::GenerationMap::new(if spec.verify { slots as usize } else { 0 });
    let mut next_generation: u64 = 1;
    let mut seq_slot: u64 = 0;
    let mut in_flight: HashSet<u64> = HashSet::with_capacity(spec.iodepth as usize * 2);
    // tag -> (slot, write, generation, submit time)
    let mut pending: Vec<Option<(u64, bool, u64, Instant)>> =
        (0..spec.iodepth).map(|_| None).collect();
    let mut free_tags: Vec<u64> = (0..spec.iodepth as u64).rev().collect();
    let mut buffers: Vec<Vec<u8>> = (0..spec.iodepth)
        .map(|_| vec![0u8; spec.bs as usize])
        .collect();
    let mut done = Vec::with_capacity(spec.iodepth as usize);
    let mut r = JobResult {
        read_lat: new_histogram(),
        write_lat: new_histogram(),
        read_bytes: 0,
        write_bytes: 0,
        ios_per_path: vec![0; paths.max(1)],
        lat_per_path: (0..paths.max(1)).map(|_| new_histogram()).collect(),
        errors: 0,
        first_error: None,
        verify_failure: None,
        measured: Duration::ZERO,
        series: series::IopsSeries::new(spec.runtime, paths.max(1)),
    };
    let start = Instant::now();
    let measure_from = start + spec.ramp;
    let end = measure_from + spec.runtime;
    let mut measuring = false;
    loop {
        let now = Instant::now();
        if !measuring && now >= measure_from {
            measuring = true;
            live.measuring.store(true, Ordering::Relaxed);
        }
        let stopping =
            now >= end || live.stop.load(Ordering::Relaxed) || r.verify_failure.is_some();
        if stopping && free_tags.len() == spec.iodepth as usize {
            break;
        }
        // Fill the queue.
        let mut submitted_any = false;
        while !stopping && !free_tags.is_empty() {
            let Some(tag) = free_tags.pop() else { break };
            let slot = if spec.rw.random() {
                // Avoid a slot with an I/O in flight (verify needs order).
                let mut s = rng.gen_range(0..slots);
                let mut tries = 0;
                while in_flight.contains(&s) && tries < 8 {
                    s = rng.gen_range(0..slots);
                    tries += 1;
                }
                if in_flight.contains(&s) {
                    free_tags.push(tag);
                    break;
                }
                s
            } else {
                let s = seq_slot % slots;
                if in_flight.contains(&s) {
                    free_tags.push(tag);
                    break;
                }
                seq_slot += 1;
                s
            };
            let write = rng.gen_range(0..100) >= read_pct;
            let lba = first + slot * bs_blocks;
            let mut buffer = buffers.pop().unwrap_or_else(|| vec![0u8; spec.bs as usize]);
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
                blocks: bs_blocks as u32,
                buffer,
            };
            // Before the submit: a job thread preempted right after it
            // would otherwise shorten the latency by the time it waited.
            let submitted = Instant::now();
            match engine.submit(io) {
                Ok(()) => {
                    submitted_any = true;
                    in_flight.insert(slot);
                    pending[tag as usize] = Some((slot, write, generation, submitted));
                }
                Err(io) => {
                    buffers.push(io.buffer);
                    free_tags.push(tag);
                    break;
                }
            }
        }
        poll_meter::tick(submitted_any);
        if let Err(e) = engine.poll(&mut done) {
            r.errors += 1;
            r.first_error.get_or_insert(e);
            break;
        }
        let now = Instant::now();
        let completed_any = !done.is_empty();
        for d in done.drain(..) {
            let Some(Some((slot, write, generation, t0))) =
                pending.get_mut(d.tag as usize).map(Option::take)
            else {
                continue;
            };
            in_flight.remove(&slot);
            free_tags.push(d.tag);
            let lat = now.saturating_duration_since(t0).as_nanos() as u64;
            match &d.result {
                Ok(()) => {
                    if spec.verify {
                        let lba = first + slot * bs_blocks;
                        if write {
                            generations.set(slot as usize, generation);
                        } else {
                            let expected = generations.get(slot as usize);
                            for (i, b) in d.buffer.chunks(block_size as usize).enumerate() {
                                if let Err(m) = verify::check_block(b, lba + i as u64, expected) {
                                    r.verify_failure
                                        .get_or_insert((lba + i as u64, m.to_string()));
                                    break;
                                }
                            }
                        }
                    }
                    if measuring && t0 >= measure_from {
                        let h = if write {
                            &mut r.write_lat
                        } else {
                            &mut r.read_lat
                        };
                        let _ = h.record(lat.max(1));
                        let bytes = d.buffer.len() as u64;
                        r.series
                            .record(d.path, now.saturating_duration_since(measure_from));
                        if write {
                            r.write_bytes += bytes;
                        } else {
                            r.read_bytes += bytes;
                        }
                        if let Some(p) = d.path {
                            if let Some(c) = live.path_ios.get(p) {
                                c.fetch_add(1, Ordering::Relaxed);
                            }
                            if let Some(c) = r.ios_per_path.get_mut(p) {
                                *c += 1;
                            }
                            if let Some(h) = r.lat_per_path.get_mut(p) {
                                let _ = h.record(lat.max(1));
                            }
                        }
                        live.ios.fetch_add(1, Ordering::Relaxed);
                        live.bytes.fetch_add(bytes, Ordering::Relaxed);
                        live.lat_ns_sum.fetch_add(lat, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    r.errors += 1;
                    if r.first_error.is_none() {
                        r.first_error = Some(e.clone());
                    }
                }
            }
            buffers.push(d.buffer);
        }
        poll_meter::tick(completed_any);
    }
    r.measured = Instant::now()
        .saturating_duration_since(measure_from)
        .min(spec.runtime);
    engine.finish();
    r
}

/// The outcome of a whole run.
pub struct RunResult {
    pub spec: JobSpec,
    pub jobs: Vec<JobResult>,
    pub elapsed: Duration,
    /// Initiator CPU nanoseconds during the measured part.
    pub cpu_ns: u64,
    /// Busy and idle time of the initiator's poll loops (job threads and
    /// path workers) during the measured part: see [`poll_meter`].
    pub poll: poll_meter::PollTotals,
    pub path_names: Vec<String>,
}

/// Runs `spec` on `numjobs` threads, each with its own engine.
pub fn run(
    spec: &JobSpec,
    factory: &dyn EngineFactory,
    live: Arc<LiveCounters>,
) -> Result<RunResult, BenchError> {
    let block_size = factory.block_size();
    let region = spec.region(block_size, factory.capacity_blocks())?;
    if region.1 / (spec.numjobs as u64) < (spec.bs / block_size) as u64 {
        return Err(job::JobError::Invalid {
            key: "numjobs".into(),
            why: "the region is too small to give each job one I/O".into(),
        }
        .into());
    }
    let paths = factory.path_names();
    let mut engines = Vec::new();
    for i in 0..spec.numjobs {
        engines.push(factory.open(i).map_err(BenchError::Engine)?);
    }
    let start = Instant::now();
    let cpu_start = Arc::new(AtomicU64::new(0));
    let poll_start = Arc::new(std::sync::Mutex::new(poll_meter::totals()));
    let results: Vec<(JobResult, poll_meter::PollTotals)> = std::thread::scope(|s| {
        // Sample the CPU counter when measuring begins (after the ramp).
        let sampler = {
            let live = live.clone();
            let cpu_start = cpu_start.clone();
            let poll_start = poll_start.clone();
            s.spawn(move || {
                while !live.measuring.load(Ordering::Relaxed) && !live.stop.load(Ordering::Relaxed)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                cpu_start.store(cpu::initiator_cpu_ns(), Ordering::Relaxed);
                *poll_start.lock().unwrap_or_else(|e| e.into_inner()) = poll_meter::totals();
            })
        };
        let handles: Vec<_> = engines
            .into_iter()
            .enumerate()
            .map(|(i, mut engine)| {
                let live = &live;
                let spec = &spec;
                let n_paths = paths.len();
                std::thread::Builder::new()
                    .name(format!("bench-job{i}"))
                    .spawn_scoped(s, move || {
                        crate::worker::precise_timers();
                        let r = run_job(
                            spec,
                            i as u32,
                            engine.as_mut(),
                            block_size,
                            region,
                            n_paths,
                            live,
                        );
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
        let results = handles
            .into_iter()
            .map(|h| h.join().expect("job thread panicked"))
            .collect();
        live.stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        results
    });
    let cpu_ns = cpu::initiator_cpu_ns().saturating_sub(cpu_start.load(Ordering::Relaxed));
    // The latest of the job threads' end-of-run readings.
    let poll_end = results
        .iter()
        .map(|(_, p)| *p)
        .max_by_key(|p| p.busy_ns + p.idle_ns)
        .unwrap_or_else(poll_meter::totals);
    let poll = poll_end.since(*poll_start.lock().unwrap_or_else(|e| e.into_inner()));
    let run = RunResult {
        spec: spec.clone(),
        jobs: results.into_iter().map(|(r, _)| r).collect(),
        poll,
        elapsed: start.elapsed(),
        cpu_ns,
        path_names: paths,
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
