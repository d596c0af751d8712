//! Job description with fio's option names, from flags or a small job file.

use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JobError {
    #[error("unknown rw mode {0:?} (randread, randwrite, read, write, randrw, rw)")]
    RwMode(String),
    #[error("bad size {0:?} (examples: 4k, 128KiB, 1m, 2g, 512)")]
    Size(String),
    #[error("bad duration {0:?} (examples: 30s, 500ms, 2m, 10)")]
    Duration(String),
    #[error("job option {key}: {why}")]
    Invalid { key: String, why: String },
    #[error("job file line {line}: {why}")]
    File { line: usize, why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
    Rw,
}

impl RwMode {
    pub fn parse(s: &str) -> Result<RwMode, JobError> {
        Ok(match s {
            "read" => RwMode::Read,
            "write" => RwMode::Write,
            "randread" => RwMode::RandRead,
            "randwrite" => RwMode::RandWrite,
            "randrw" => RwMode::RandRw,
            "rw" | "readwrite" => RwMode::Rw,
            other => return Err(JobError::RwMode(other.into())),
        })
    }
    pub fn random(self) -> bool {
        matches!(self, RwMode::RandRead | RwMode::RandWrite | RwMode::RandRw)
    }
    /// Percentage of reads for this mode, given `rwmixread` for mixed modes.
    pub fn read_percent(self, rwmixread: u8) -> u8 {
        match self {
            RwMode::Read | RwMode::RandRead => 100,
            RwMode::Write | RwMode::RandWrite => 0,
            RwMode::RandRw | RwMode::Rw => rwmixread.min(100),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::RandRead => "randread",
            RwMode::RandWrite => "randwrite",
            RwMode::RandRw => "randrw",
            RwMode::Rw => "rw",
        }
    }
}

/// A benchmark job.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobSpec {
    pub name: String,
    pub rw: RwMode,
    pub rwmixread: u8,
    /// Bytes per I/O.
    pub bs: u32,
    /// Outstanding I/Os per job (worker thread).
    pub iodepth: u32,
    /// Job threads submitting I/O.
    pub numjobs: u32,
    #[serde(serialize_with = "ser_secs")]
    pub runtime: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub ramp: Duration,
    /// Bytes of the LUN to use (0 = from `offset` to the end).
    pub size: u64,
    pub offset: u64,
    pub verify: bool,
    pub seed: u64,
    /// Write block size when it differs from the read one (`bs=4k,8k`).
    pub bs_write: Option<u32>,
    /// `bssplit`: (block size, percentage) per direction (read, write);
    /// empty: every I/O of that direction is `bs` (or `bs_write`).
    pub bssplit: [Vec<(u32, u32)>; 2],
    /// `rate_iops` per direction (read, write); 0: no cap.
    pub rate_iops: [u64; 2],
    /// `rate` in bytes per second per direction; 0: no cap. Wins over
    /// `rate_iops` for a direction that has both, as in fio.
    pub rate: [u64; 2],
    pub random_distribution: Distribution,
    /// `thinktime`: stall this long after `thinktime_blocks` I/Os.
    #[serde(serialize_with = "ser_secs")]
    pub thinktime: Duration,
    /// `thinktime_spin`: spin (burn CPU) this part of `thinktime`.
    #[serde(serialize_with = "ser_secs")]
    pub thinktime_spin: Duration,
    pub thinktime_blocks: u32,
    /// `thinktime_blocks_type=issue` (true) or `complete` (false, fio's
    /// default): which I/Os count towards `thinktime_blocks`.
    pub thinktime_blocks_issue: bool,
    /// `stonewall` / `wait_for_previous`: start only after every job
    /// before this one in the file finished.
    pub stonewall: bool,
    /// `log_hist_msec`: interval of the latency histogram log (0: one
    /// sample per second when `--hist-log` is given).
    pub log_hist_msec: u64,
    /// `log_hist_coarseness` 0-6: merge 2^n of fio's bins per column.
    pub log_hist_coarseness: u8,
}

/// fio's `random_distribution` models (fio's own algorithms, lib/zipf.c and
/// lib/gauss.c, in [`super::dist`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "model")]
pub enum Distribution {
    /// Uniform (fio's `random`, the default).
    Random,
    /// `zipf:theta[:center]` (theta != 1).
    Zipf { theta: f64, center: Option<f64> },
    /// `pareto:h[:center]` (0 < h < 1).
    Pareto { h: f64, center: Option<f64> },
    /// `normal:dev[:center]`, dev a percentage of the range, 0 <= dev < 100.
    Normal { dev: f64, center: Option<f64> },
}

impl Distribution {
    /// Parses fio's `random_distribution` value.
    pub fn parse(s: &str) -> Result<Distribution, JobError> {
        let bad = |why: String| JobError::Invalid {
            key: "random_distribution".into(),
            why,
        };
        let mut parts = s.trim().split(':');
        let model = parts.next().unwrap_or("").to_ascii_lowercase();
        if model == "zoned" || model == "zoned_abs" {
            return Err(bad(format!(
                "{model} is not supported (random, zipf, pareto, normal)"
            )));
        }
        let num = |p: Option<&str>, what: &str| -> Result<Option<f64>, JobError> {
            match p {
                None | Some("") => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| bad(format!("{what} {v:?} is not a number"))),
            }
        };
        let val = num(parts.next(), "value")?;
        let center = num(parts.next(), "center")?;
        if let Some(extra) = parts.next() {
            return Err(bad(format!("unexpected {extra:?}")));
        }
        if center.is_some_and(|c| !(0.0..=1.0).contains(&c)) {
            return Err(bad("the center must be 0.0-1.0".into()));
        }
        Ok(match model.as_str() {
            "random" if val.is_none() => Distribution::Random,
            "zipf" => {
                let theta = val.unwrap_or(1.1);
                if theta == 1.0 || theta <= 0.0 {
                    return Err(bad("zipf theta must be > 0 and not 1.0".into()));
                }
                Distribution::Zipf { theta, center }
            }
            "pareto" => {
                let h = val.unwrap_or(0.2);
                if h <= 0.0 || h >= 1.0 {
                    return Err(bad("pareto h must be between 0 and 1 (exclusive)".into()));
                }
                Distribution::Pareto { h, center }
            }
            "normal" | "gauss" => {
                let dev = val.unwrap_or(0.0);
                if !(0.0..100.0).contains(&dev) {
                    return Err(bad("normal deviation must be 0 <= dev < 100".into()));
                }
                Distribution::Normal { dev, center }
            }
            _ => {
                return Err(bad(format!(
                    "unknown model {s:?} (random, zipf:θ, pareto:h, normal:dev%)"
                )))
            }
        })
    }
}

/// Index of reads and writes in per-direction arrays (fio's DDIR_READ,
/// DDIR_WRITE; also the `ddir` column of the histogram log).
pub const READ: usize = 0;
pub const WRITE: usize = 1;

/// Options fio takes that name its own target, engine or reporting; the
/// target here is the iSCSI URL (or the embedded target), so a job file
/// shared with fio may carry them and they change nothing.
pub const IGNORED_OPTIONS: &[&str] = &[
    "ioengine",
    "filename",
    "directory",
    "direct",
    "buffered",
    "time_based",
    "group_reporting",
    "thread",
    "invalidate",
    "randrepeat",
    "norandommap",
    "new_group",
    "write_hist_log",
    "per_job_logs",
];

/// Splits fio's per-direction value `read[,write[,trim]]`: one value
/// applies to both directions, an empty one leaves that direction alone.
fn per_dir(value: &str) -> [Option<&str>; 2] {
    match value.split_once(',') {
        None => [Some(value), Some(value)],
        Some((r, rest)) => {
            let w = rest.split(',').next().unwrap_or("");
            fn f(s: &str) -> Option<&str> {
                (!s.trim().is_empty()).then_some(s.trim())
            }
            [f(r), f(w)]
        }
    }
}

/// Parses one direction of `bssplit`: `4k/50:64k/40:1m` (a missing
/// percentage shares what is left equally, as in fio).
pub fn parse_bssplit(s: &str) -> Result<Vec<(u32, u32)>, JobError> {
    let bad = |why: String| JobError::Invalid {
        key: "bssplit".into(),
        why,
    };
    let mut out: Vec<(u32, Option<u32>)> = Vec::new();
    for part in s.split(':').map(str::trim).filter(|p| !p.is_empty()) {
        let (bs, pct) = match part.split_once('/') {
            Some((b, p)) => (b, Some(p)),
            None => (part, None),
        };
        let bs = parse_size(bs)?;
        if bs == 0 || bs > 16 << 20 {
            return Err(bad(format!("block size {part:?} must be 1 byte to 16 MiB")));
        }
        let pct = match pct {
            None => None,
            Some(p) => Some(
                p.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| v <= 100)
                    .ok_or_else(|| bad(format!("percentage in {part:?} must be 0-100")))?,
            ),
        };
        out.push((bs as u32, pct));
    }
    if out.is_empty() {
        return Err(bad("no block sizes".into()));
    }
    if out.len() > 64 {
        return Err(bad("at most 64 block sizes".into()));
    }
    let given: u32 = out.iter().filter_map(|(_, p)| *p).sum();
    let missing = out.iter().filter(|(_, p)| p.is_none()).count() as u32;
    if given > 100 {
        return Err(bad(format!("percentages add up to {given}, more than 100")));
    }
    let share = (100 - given).checked_div(missing).unwrap_or(0);
    let split: Vec<(u32, u32)> = out
        .into_iter()
        .map(|(b, p)| (b, p.unwrap_or(share)))
        .collect();
    if split.iter().all(|(_, p)| *p == 0) {
        return Err(bad("all percentages are 0".into()));
    }
    Ok(split)
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Default for JobSpec {
    fn default() -> JobSpec {
        JobSpec {
            name: "job".into(),
            rw: RwMode::RandRead,
            rwmixread: 50,
            bs: 4096,
            iodepth: 32,
            numjobs: 1,
            runtime: Duration::from_secs(5),
            ramp: Duration::from_secs(1),
            size: 0,
            offset: 0,
            verify: false,
            seed: 0x15c5_1b7a_55ed,
            bs_write: None,
            bssplit: [Vec::new(), Vec::new()],
            rate_iops: [0; 2],
            rate: [0; 2],
            random_distribution: Distribution::Random,
            thinktime: Duration::ZERO,
            thinktime_spin: Duration::ZERO,
            thinktime_blocks: 1,
            thinktime_blocks_issue: false,
            stonewall: false,
            log_hist_msec: 0,
            log_hist_coarseness: 0,
        }
    }
}

/// Parses `4k`, `128KiB`, `1m`, `2g`, `512` (bytes; k/m/g are powers of 1024,
/// as in fio).
pub fn parse_size(s: &str) -> Result<u64, JobError> {
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| JobError::Size(s.into()))?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(JobError::Size(s.into())),
    };
    n.checked_mul(mult).ok_or_else(|| JobError::Size(s.into()))
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, JobError> {
    parse_duration_unit(s, 1.0)
}

/// Like [`parse_duration`], a bare number in units of `unit_secs` (fio's
/// `thinktime` takes microseconds when the unit is omitted).
pub fn parse_duration_unit(s: &str, unit_secs: f64) -> Result<Duration, JobError> {
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: f64 = num.parse().map_err(|_| JobError::Duration(s.into()))?;
    let secs = match unit {
        "" => n * unit_secs,
        "s" | "sec" => n,
        "ms" | "msec" => n / 1000.0,
        "us" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(JobError::Duration(s.into())),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(JobError::Duration(s.into()));
    }
    Ok(Duration::from_secs_f64(secs))
}

impl JobSpec {
    /// fio's defaults: `rw=read`, `iodepth=1`, no ramp.
    pub fn fio_defaults() -> JobSpec {
        JobSpec {
            rw: RwMode::Read,
            iodepth: 1,
            ramp: Duration::ZERO,
            ..JobSpec::default()
        }
    }

    /// Applies one fio-style `key=value` option.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), JobError> {
        let invalid = |why: &str| JobError::Invalid {
            key: key.into(),
            why: why.into(),
        };
        match key {
            "name" => self.name = value.into(),
            "rw" | "readwrite" => self.rw = RwMode::parse(value)?,
            "rwmixread" => {
                self.rwmixread = value
                    .parse::<u8>()
                    .ok()
                    .filter(|&v| v <= 100)
                    .ok_or_else(|| invalid("must be 0-100"))?
            }
            "bs" | "blocksize" => {
                let one = |v: &str| -> Result<u32, JobError> {
                    let v = parse_size(v)?;
                    if v == 0 || v > 16 << 20 {
                        return Err(invalid("must be 1 byte to 16 MiB"));
                    }
                    Ok(v as u32)
                };
                let [r, w] = per_dir(value);
                if let Some(r) = r {
                    self.bs = one(r)?;
                }
                self.bs_write = match (w, value.contains(',')) {
                    (Some(w), true) => Some(one(w)?),
                    (None, true) => self.bs_write,
                    (_, false) => None,
                };
            }
            "bssplit" => {
                let [r, w] = per_dir(value);
                if let Some(r) = r {
                    self.bssplit[READ] = parse_bssplit(r)?;
                }
                if let Some(w) = w {
                    self.bssplit[WRITE] = parse_bssplit(w)?;
                }
            }
            "rate_iops" | "rate" => {
                let [r, w] = per_dir(value);
                let target = if key == "rate" {
                    &mut self.rate
                } else {
                    &mut self.rate_iops
                };
                for (d, v) in [(READ, r), (WRITE, w)] {
                    if let Some(v) = v {
                        target[d] = if key == "rate" {
                            parse_size(v)?
                        } else {
                            v.parse::<u64>()
                                .map_err(|_| invalid("not a whole number of IOPS"))?
                        };
                    }
                }
            }
            "random_distribution" => self.random_distribution = Distribution::parse(value)?,
            "thinktime" => self.thinktime = parse_duration_unit(value, 1e-6)?,
            "thinktime_spin" => self.thinktime_spin = parse_duration_unit(value, 1e-6)?,
            "thinktime_blocks" => {
                self.thinktime_blocks = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| v >= 1)
                    .ok_or_else(|| invalid("must be 1 or more"))?
            }
            "thinktime_blocks_type" => {
                self.thinktime_blocks_issue = match value {
                    "issue" => true,
                    "complete" => false,
                    _ => return Err(invalid("issue or complete")),
                }
            }
            "stonewall" | "wait_for_previous" => {
                self.stonewall = !matches!(value, "0" | "false" | "no")
            }
            "log_hist_msec" => {
                self.log_hist_msec = value
                    .parse::<u64>()
                    .map_err(|_| invalid("milliseconds, a whole number"))?
            }
            "log_hist_coarseness" => {
                self.log_hist_coarseness = value
                    .parse::<u8>()
                    .ok()
                    .filter(|&v| v <= 6)
                    .ok_or_else(|| invalid("must be 0-6"))?
            }
            k if IGNORED_OPTIONS.contains(&k) => {}
            "iodepth" => {
                self.iodepth = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| (1..=4096).contains(&v))
                    .ok_or_else(|| invalid("must be 1-4096"))?
            }
            "numjobs" | "workers" => {
                self.numjobs = value
                    .parse::<u32>()
                    .ok()
                    .filter(|&v| (1..=256).contains(&v))
                    .ok_or_else(|| invalid("must be 1-256"))?
            }
            "runtime" | "timeout" => self.runtime = parse_duration(value)?,
            "ramp_time" | "ramp" => self.ramp = parse_duration(value)?,
            "size" => self.size = parse_size(value)?,
            "offset" => self.offset = parse_size(value)?,
            "verify" => {
                self.verify = match value {
                    "1" | "true" | "yes" | "crc32c" => true,
                    "0" | "false" | "no" => false,
                    _ => return Err(invalid("use 1/0")),
                }
            }
            "randseed" | "seed" => {
                self.seed = value.parse().map_err(|_| invalid("not a number"))?
            }
            _ => return Err(invalid("unknown option")),
        }
        Ok(())
    }

    /// Reads a fio job file and returns its first job (see
    /// [`JobSpec::jobs_from_file`] for all of them).
    pub fn from_job_file(text: &str) -> Result<JobSpec, JobError> {
        Ok(JobSpec::jobs_from_file(text)?.remove(0))
    }

    /// Reads a fio job file as fio does: `[global]` sets the defaults of
    /// every job section after it (a later `[global]` changes them for the
    /// jobs after it), each other `[name]` section is a job, `key=value` or
    /// bare `key` lines, `#`/`;` comments. Options before any section count
    /// as global. A file with no job section is one job of its globals.
    ///
    /// A job file starts from fio's defaults where ours differ: `rw=read`,
    /// `iodepth=1`, `ramp_time=0` (the command line's defaults are a 4 KiB
    /// randread at QD32 after a 1 s ramp).
    pub fn jobs_from_file(text: &str) -> Result<Vec<JobSpec>, JobError> {
        let mut global = JobSpec::fio_defaults();
        let mut jobs: Vec<JobSpec> = Vec::new();
        // Which spec the lines go to: None = global.
        let mut in_job = false;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                let name = name.trim();
                if name.is_empty() {
                    return Err(JobError::File {
                        line: i + 1,
                        why: "empty section name".into(),
                    });
                }
                if name == "global" {
                    in_job = false;
                } else {
                    let mut job = global.clone();
                    job.name = name.to_string();
                    // Inherited from [global] only when it was set there.
                    jobs.push(job);
                    in_job = true;
                }
                continue;
            }
            let (k, v) = match line.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (line, "1"),
            };
            let target = match (in_job, jobs.last_mut()) {
                (true, Some(j)) => j,
                _ => &mut global,
            };
            target.set(k, v).map_err(|e| JobError::File {
                line: i + 1,
                why: e.to_string(),
            })?;
        }
        if jobs.is_empty() {
            jobs.push(global);
        }
        Ok(jobs)
    }

    /// Block sizes of direction `dir` ([`READ`] or [`WRITE`]) with their
    /// weights: `bssplit`, else the one `bs` (or `bs_write`).
    pub fn block_sizes(&self, dir: usize) -> Vec<(u32, u32)> {
        if !self.bssplit[dir].is_empty() {
            return self.bssplit[dir].clone();
        }
        let bs = if dir == WRITE {
            self.bs_write.unwrap_or(self.bs)
        } else {
            self.bs
        };
        vec![(bs, 100)]
    }

    /// Directions this job issues.
    pub fn directions(&self) -> Vec<usize> {
        match self.rw.read_percent(self.rwmixread) {
            100 => vec![READ],
            0 => vec![WRITE],
            _ => vec![READ, WRITE],
        }
    }

    /// Smallest block size of a direction (fio's `min_bs`, the unit of
    /// `rate_iops` and of random offsets).
    pub fn min_bs(&self, dir: usize) -> u32 {
        self.block_sizes(dir)
            .iter()
            .map(|b| b.0)
            .min()
            .unwrap_or(self.bs)
    }

    /// Largest block size over the directions this job issues.
    pub fn max_bs(&self) -> u32 {
        self.directions()
            .into_iter()
            .flat_map(|d| self.block_sizes(d))
            .map(|b| b.0)
            .max()
            .unwrap_or(self.bs)
    }

    /// Smallest block size over the directions this job issues.
    pub fn min_bs_all(&self) -> u32 {
        self.directions()
            .into_iter()
            .map(|d| self.min_bs(d))
            .min()
            .unwrap_or(self.bs)
    }

    /// The rate cap of a direction in bytes per second, fio's way: `rate`,
    /// else `rate_iops` times the direction's smallest block size.
    pub fn rate_bps(&self, dir: usize) -> u64 {
        if self.rate[dir] > 0 {
            self.rate[dir]
        } else {
            self.rate_iops[dir] * u64::from(self.min_bs(dir))
        }
    }

    /// Checks the job against a LUN; returns the block range (first, count)
    /// the job may touch.
    pub fn region(&self, block_size: u32, capacity_blocks: u64) -> Result<(u64, u64), JobError> {
        let bs = block_size as u64;
        for d in self.directions() {
            for (b, _) in self.block_sizes(d) {
                if !(b as u64).is_multiple_of(bs) {
                    let key = if self.bssplit[d].is_empty() {
                        "bs"
                    } else {
                        "bssplit"
                    };
                    return Err(JobError::Invalid {
                        key: key.into(),
                        why: format!("{b} is not a multiple of the LUN block size {bs}"),
                    });
                }
            }
        }
        if self.verify
            && self
                .directions()
                .iter()
                .any(|&d| self.block_sizes(d) != vec![(self.bs, 100)])
        {
            return Err(JobError::Invalid {
                key: "verify".into(),
                why: "verify needs one block size for reads and writes (no bssplit, no bs=R,W)"
                    .into(),
            });
        }
        if !self.offset.is_multiple_of(bs) {
            return Err(JobError::Invalid {
                key: "offset".into(),
                why: format!("not a multiple of the LUN block size {bs}"),
            });
        }
        let lun_bytes = capacity_blocks * bs;
        let size = if self.size == 0 {
            lun_bytes.saturating_sub(self.offset)
        } else {
            self.size
        };
        let max_bs = self.max_bs() as u64;
        if self.offset + size > lun_bytes || size < max_bs {
            return Err(JobError::Invalid {
                key: "size".into(),
                why: format!(
                    "the job needs {} bytes at offset {} but the LUN has {lun_bytes} bytes",
                    size.max(max_bs),
                    self.offset
                ),
            });
        }
        Ok((self.offset / bs, size / bs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128KiB").unwrap(), 131072);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("4q").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("1y").is_err());
    }

    #[test]
    fn job_file_and_errors() {
        let j = JobSpec::from_job_file(
            "[global]\nbs=8k\n; comment\n[db]\nrw=randrw\nrwmixread=70\niodepth=16\nverify\n",
        )
        .unwrap();
        assert_eq!(
            (
                j.name.as_str(),
                j.bs,
                j.rw,
                j.rwmixread,
                j.iodepth,
                j.verify
            ),
            ("db", 8192, RwMode::RandRw, 70, 16, true)
        );
        let e = JobSpec::from_job_file("rw=sideways\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        assert!(JobSpec::default().set("iodepth", "0").is_err());
        assert!(JobSpec::default().set("colour", "red").is_err());
    }

    #[test]
    fn bssplit_like_fio() {
        assert_eq!(
            parse_bssplit("4k/50:64k/40:1m/10").unwrap(),
            vec![(4096, 50), (65536, 40), (1 << 20, 10)]
        );
        // Missing percentages share what is left.
        assert_eq!(
            parse_bssplit("4k/50:8k:16k").unwrap(),
            vec![(4096, 50), (8192, 25), (16384, 25)]
        );
        assert_eq!(parse_bssplit("8k").unwrap(), vec![(8192, 100)]);
        assert!(parse_bssplit("4k/70:8k/40").is_err());
        assert!(parse_bssplit("4k/x").is_err());
        assert!(parse_bssplit("").is_err());
        // Per direction with a comma; one list for both without.
        let mut j = JobSpec::default();
        j.set("bssplit", "4k/50:64k/50,8k").unwrap();
        assert_eq!(j.block_sizes(READ), vec![(4096, 50), (65536, 50)]);
        assert_eq!(j.block_sizes(WRITE), vec![(8192, 100)]);
        let mut j = JobSpec::default();
        j.set("bssplit", "4k/10:8k/90").unwrap();
        assert_eq!(j.block_sizes(READ), j.block_sizes(WRITE));
        // Only writes split; reads keep bs.
        let mut j = JobSpec::default();
        j.set("bs", "16k").unwrap();
        j.set("bssplit", ",4k/50:8k/50").unwrap();
        assert_eq!(j.block_sizes(READ), vec![(16384, 100)]);
        assert_eq!(j.min_bs(WRITE), 4096);
        // bs=R,W.
        let mut j = JobSpec::default();
        j.set("bs", "4k,64k").unwrap();
        assert_eq!((j.min_bs(READ), j.min_bs(WRITE)), (4096, 65536));
    }

    #[test]
    fn rate_options_are_bytes_per_direction_as_in_fio() {
        let mut j = JobSpec::default();
        j.set("rate_iops", "300,200").unwrap();
        j.set("bssplit", "4k/50:64k/50").unwrap();
        // rate_iops counts the smallest block size of the direction.
        assert_eq!(j.rate_bps(READ), 300 * 4096);
        assert_eq!(j.rate_bps(WRITE), 200 * 4096);
        let mut j = JobSpec::default();
        j.set("rate_iops", ",500").unwrap();
        assert_eq!(j.rate_iops, [0, 500]);
        j.set("rate_iops", "100").unwrap();
        assert_eq!(j.rate_iops, [100, 100]);
        j.set("rate", "1m,").unwrap();
        assert_eq!(j.rate_bps(READ), 1 << 20);
        assert_eq!(j.rate_bps(WRITE), 100 * 4096);
        assert!(j.set("rate_iops", "fast").is_err());
    }

    #[test]
    fn distributions_and_think_time_parse() {
        assert_eq!(Distribution::parse("random").unwrap(), Distribution::Random);
        assert_eq!(
            Distribution::parse("zipf:1.2").unwrap(),
            Distribution::Zipf {
                theta: 1.2,
                center: None
            }
        );
        assert_eq!(
            Distribution::parse("pareto:0.3:0.25").unwrap(),
            Distribution::Pareto {
                h: 0.3,
                center: Some(0.25)
            }
        );
        assert_eq!(
            Distribution::parse("normal:5").unwrap(),
            Distribution::Normal {
                dev: 5.0,
                center: None
            }
        );
        for bad in [
            "zipf:1",
            "pareto:1.5",
            "normal:100",
            "zipf:x",
            "zoned:50/50",
            "fractal",
        ] {
            assert!(Distribution::parse(bad).is_err(), "{bad}");
        }
        let mut j = JobSpec::default();
        // fio: thinktime without a unit is microseconds.
        j.set("thinktime", "250").unwrap();
        assert_eq!(j.thinktime, Duration::from_micros(250));
        j.set("thinktime", "2ms").unwrap();
        assert_eq!(j.thinktime, Duration::from_millis(2));
        j.set("thinktime_blocks", "8").unwrap();
        j.set("thinktime_blocks_type", "issue").unwrap();
        assert!(j.thinktime_blocks_issue);
        assert!(j.set("thinktime_blocks", "0").is_err());
        j.set("log_hist_msec", "250").unwrap();
        j.set("log_hist_coarseness", "2").unwrap();
        assert_eq!((j.log_hist_msec, j.log_hist_coarseness), (250, 2));
        assert!(j.set("log_hist_coarseness", "7").is_err());
    }

    #[test]
    fn several_jobs_inherit_global_as_fio_does() {
        let jobs = JobSpec::jobs_from_file(
            "[global]\nbs=8k\nioengine=libaio\nfilename=/dev/x\ndirect=1\ntime_based\n\
             [a]\nrw=randread\n[b]\nrw=write\nbs=64k\n\
             [global]\niodepth=4\n[c]\nstonewall\n",
        )
        .unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!((jobs[0].bs, jobs[0].rw), (8192, RwMode::RandRead));
        assert_eq!((jobs[1].bs, jobs[1].rw), (65536, RwMode::Write));
        // A later [global] changes the defaults of the jobs after it only;
        // fio's default iodepth is 1.
        assert_eq!((jobs[0].iodepth, jobs[2].iodepth), (1, 4));
        assert_eq!(jobs[2].rw, RwMode::Read);
        assert_eq!(jobs[0].ramp, Duration::ZERO);
        assert_eq!(jobs[2].bs, 8192);
        assert!(!jobs[0].stonewall && !jobs[1].stonewall && jobs[2].stonewall);
        // Only globals: one job.
        let jobs = JobSpec::jobs_from_file("bs=16k\n").unwrap();
        assert_eq!((jobs.len(), jobs[0].bs), (1, 16384));
        let e = JobSpec::jobs_from_file("[a]\n[]\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn region_checks_the_lun() {
        let mut j = JobSpec::default();
        assert_eq!(j.region(512, 1000).unwrap(), (0, 1000));
        j.size = 1 << 20;
        let e = j.region(512, 1000).unwrap_err();
        assert!(e.to_string().contains("LUN has 512000 bytes"), "{e}");
        j.size = 0;
        j.bs = 1000;
        assert!(j.region(512, 1000).is_err());
    }
}
