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
    let t = s.trim().to_ascii_lowercase();
    let digits_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: f64 = num.parse().map_err(|_| JobError::Duration(s.into()))?;
    let secs = match unit {
        "" | "s" | "sec" => n,
        "ms" => n / 1000.0,
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
                let v = parse_size(value)?;
                if v == 0 || v > 16 << 20 {
                    return Err(invalid("must be 1 byte to 16 MiB"));
                }
                self.bs = v as u32;
            }
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
            "runtime" => self.runtime = parse_duration(value)?,
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

    /// Reads a small fio-style job file: `[name]` sections are job names
    /// (the last one wins; one job per run), `key=value` lines, `#`/`;` comments.
    pub fn from_job_file(text: &str) -> Result<JobSpec, JobError> {
        let mut job = JobSpec::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if name != "global" {
                    job.name = name.to_string();
                }
                continue;
            }
            let (k, v) = match line.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => (line, "1"),
            };
            job.set(k, v).map_err(|e| JobError::File {
                line: i + 1,
                why: e.to_string(),
            })?;
        }
        Ok(job)
    }

    /// Checks the job against a LUN; returns the block range (first, count)
    /// the job may touch.
    pub fn region(&self, block_size: u32, capacity_blocks: u64) -> Result<(u64, u64), JobError> {
        let bs = block_size as u64;
        if !(self.bs as u64).is_multiple_of(bs) {
            return Err(JobError::Invalid {
                key: "bs".into(),
                why: format!("{} is not a multiple of the LUN block size {bs}", self.bs),
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
        if self.offset + size > lun_bytes || size < self.bs as u64 {
            return Err(JobError::Invalid {
                key: "size".into(),
                why: format!(
                    "the job needs {} bytes at offset {} but the LUN has {lun_bytes} bytes",
                    size.max(self.bs as u64),
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
