//! A small key-value log on a multipath iSCSI LU: appends records, makes
//! each batch durable with FLUSH (SYNCHRONIZE CACHE), and after path
//! failures mid-run reads every acknowledged record back and checks it.
//!
//! ```text
//! cargo run --example kvlog                     # embedded target, 2 loopback paths,
//!                                               # kills path 0's connections mid-run
//! cargo run --example kvlog -- URL [URL...]     # a real target (no fault injection)
//! ```
//! Exits non-zero when an acknowledged record is missing or wrong.
//!
//! Record layout (512 bytes, or one block if larger, per record; little-endian):
//! `magic u32 | seq u64 | key_len u16 | val_len u16 | crc32c u32 | key | value`.

use iscsi_bypass::target::{FaultInjector, Target, TargetConfig};
use iscsi_bypass::{Device, IdleMode, Io, IoCompletion, IoQueue, Options};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x4b56_4c47; // "KVLG"
const BLOCK: usize = 512;
const HEADER: usize = 20;

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Records acknowledged (their batch's FLUSH completed).
    pub acknowledged: u64,
    /// Acknowledged records read back intact.
    pub verified: u64,
    /// Problems found (missing, corrupt or wrong records).
    pub lost: Vec<String>,
    /// I/Os that needed a retry or another path.
    pub retried: u64,
    /// Path failures injected.
    pub faults: u32,
    /// Wall time.
    pub elapsed: Duration,
}

fn record(seq: u64) -> (String, String) {
    (
        format!("key-{seq:08}"),
        format!("value {seq} {}", "x".repeat((seq % 200) as usize)),
    )
}

fn encode(seq: u64, key: &str, val: &str, out: &mut [u8]) {
    out.fill(0);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..12].copy_from_slice(&seq.to_le_bytes());
    out[12..14].copy_from_slice(&(key.len() as u16).to_le_bytes());
    out[14..16].copy_from_slice(&(val.len() as u16).to_le_bytes());
    out[HEADER..HEADER + key.len()].copy_from_slice(key.as_bytes());
    let v = HEADER + key.len();
    out[v..v + val.len()].copy_from_slice(val.as_bytes());
    let crc = crc32c::crc32c(&out[HEADER..v + val.len()]) ^ crc32c::crc32c(&out[..16]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
}

fn decode(b: &[u8]) -> Result<(u64, String, String), String> {
    let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if u32at(0) != MAGIC {
        return Err("no record (bad magic)".into());
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[4..12]);
    let seq = u64::from_le_bytes(s);
    let kl = u16::from_le_bytes([b[12], b[13]]) as usize;
    let vl = u16::from_le_bytes([b[14], b[15]]) as usize;
    if HEADER + kl + vl > b.len() {
        return Err("lengths beyond the block".into());
    }
    let crc = crc32c::crc32c(&b[HEADER..HEADER + kl + vl]) ^ crc32c::crc32c(&b[..16]);
    if crc != u32at(16) {
        return Err("checksum mismatch".into());
    }
    let key = String::from_utf8_lossy(&b[HEADER..HEADER + kl]).into_owned();
    let val = String::from_utf8_lossy(&b[HEADER + kl..HEADER + kl + vl]).into_owned();
    Ok((seq, key, val))
}

/// Appends `records` records in batches of `batch` (pipelined writes, then
/// one FLUSH); calls `fault(batch_index)` between batches. Then reads the
/// whole log back on a fresh queue and checks every acknowledged record.
pub fn run_log(
    dev: &Device,
    records: u64,
    batch: u64,
    mut fault: impl FnMut(u64) -> bool,
) -> Report {
    let started = Instant::now();
    let mut r = Report::default();
    let mut q = dev.queue_pair();
    let capacity = dev.capacity();
    // One record per 512 bytes, or per block where blocks are larger.
    let bs = dev.block_size().max(1) as usize;
    let rec = BLOCK.max(bs);
    let per = (rec / bs) as u64;
    let records = records.min(capacity / per);
    let mut done: Vec<IoCompletion> = Vec::with_capacity(batch as usize + 1);
    // Buffers are reused: no allocation per record once warmed up.
    let mut free: Vec<Vec<u8>> = Vec::new();
    let mut seq = 0u64;
    let mut batch_no = 0u64;
    while seq < records {
        if fault(batch_no) {
            r.faults += 1;
        }
        let first = seq;
        let end = (seq + batch).min(records);
        while seq < end {
            let mut buf = free.pop().unwrap_or_default();
            buf.resize(rec, 0);
            let (k, v) = record(seq);
            encode(seq, &k, &v, &mut buf);
            submit(
                &mut q,
                Io::write(seq * per, per as u32, buf, seq),
                &mut done,
            );
            seq += 1;
        }
        let mut failed = false;
        let want = (end - first) as usize;
        collect(&mut q, want, &mut done, &mut free, &mut r, &mut failed);
        // Durable point: everything written above before FLUSH completes.
        submit(&mut q, Io::flush(u64::MAX), &mut done);
        collect(&mut q, 1, &mut done, &mut free, &mut r, &mut failed);
        if !failed {
            r.acknowledged = end;
        } else {
            r.lost
                .push(format!("batch {batch_no} (records {first}..{end}) failed"));
            break;
        }
        batch_no += 1;
    }
    drop(q);
    // Read back on a new queue (new I/O after the failures).
    let mut q = dev.queue_pair();
    let mut buf = vec![0u8; rec * 64];
    let mut at = 0u64;
    while at < r.acknowledged {
        let n = (r.acknowledged - at).min(64);
        let b = &mut buf[..n as usize * rec];
        if let Err(e) = q.read_at(at * per, b) {
            r.lost
                .push(format!("read of records {at}..{} failed: {e}", at + n));
            break;
        }
        for i in 0..n {
            let s = at + i;
            let blk = &b[i as usize * rec..(i as usize + 1) * rec];
            match decode(blk) {
                Ok((got, k, v)) if got == s && (k.clone(), v.clone()) == record(s) => {
                    r.verified += 1
                }
                Ok((got, _, _)) => r
                    .lost
                    .push(format!("record {s}: found record {got} or wrong data")),
                Err(e) => r.lost.push(format!("record {s}: {e}")),
            }
        }
        at += n;
    }
    r.elapsed = started.elapsed();
    r
}

fn submit(q: &mut IoQueue, mut io: Io, done: &mut Vec<IoCompletion>) {
    loop {
        match q.submit(io) {
            Ok(()) => return,
            Err(iscsi_bypass::SubmitError::QueueFull(back)) => {
                io = back;
                q.wait_completions(done, 1, Duration::from_millis(10));
            }
            Err(e) => panic!("cannot submit: {e}"),
        }
    }
}

fn collect(
    q: &mut IoQueue,
    want: usize,
    done: &mut Vec<IoCompletion>,
    free: &mut Vec<Vec<u8>>,
    r: &mut Report,
    failed: &mut bool,
) {
    let mut got = 0;
    while got < want {
        if done.is_empty() {
            q.wait_completions(done, 1, Duration::from_secs(1));
        }
        for c in done.drain(..) {
            got += 1;
            if c.retries > 0 {
                r.retried += 1;
            }
            if let Err(e) = &c.result {
                eprintln!("kvlog: {:?} (tag {}) failed: {e}", c.op, c.user_tag);
                *failed = true;
            }
            free.push(c.buffer);
        }
    }
}

/// The CI run: embedded target with two loopback portals; path 0's
/// connections are killed a third of the way in, path 1's two thirds in
/// (after path 0 is back), while records keep being appended.
pub fn run_embedded(records: u64) -> Report {
    let target = Target::start(
        TargetConfig::ram("iqn.2026-11.org.iscsi-bypass:kvlog", 16 << 20).loopback_portals(2),
    )
    .expect("start the embedded target");
    let urls: Vec<String> = target
        .portals()
        .iter()
        .map(|p| format!("iscsi://{p}/{}/0", target.iqn()))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let opts = Options {
        idle: IdleMode::Sleep(Duration::from_micros(50)),
        no_path_timeout: Duration::from_secs(20),
        ..Options::default()
    };
    let dev = Device::open_urls(&urls, &opts).expect("open the multipath device");
    let faults: FaultInjector = target.faults();
    let batch = 16;
    let batches = records.div_ceil(batch);
    let report = run_log(&dev, records, batch, |b| {
        if b == batches / 3 {
            faults.portal(0).drop_connections_now();
            true
        } else if b == 2 * batches / 3 {
            // Wait for path 0 to come back, so one path is always up.
            let t = Instant::now();
            while dev.paths()[0].state != iscsi_bypass::PathState::Up
                && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            faults.portal(1).drop_connections_now();
            true
        } else {
            false
        }
    });
    dev.close();
    report
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let records = std::env::var("KVLOG_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let report = if args.is_empty() {
        run_embedded(records)
    } else {
        let urls: Vec<&str> = args.iter().map(String::as_str).collect();
        let opts = Options {
            chap: iscsi_bypass::Chap::from_env(),
            ..Options::default()
        };
        let dev = match Device::open_urls(&urls, &opts) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("kvlog: {e}");
                std::process::exit(2);
            }
        };
        let r = run_log(&dev, records, 16, |_| false);
        dev.close();
        r
    };
    println!(
        "kvlog: {} records acknowledged, {} verified, {} retried I/Os, {} path faults injected, {:.2?}",
        report.acknowledged, report.verified, report.retried, report.faults, report.elapsed
    );
    if !report.lost.is_empty() || report.verified != report.acknowledged || report.acknowledged == 0
    {
        for l in report.lost.iter().take(20) {
            eprintln!("kvlog: LOST {l}");
        }
        std::process::exit(1);
    }
}
