//! Write load with per-chunk generations, and the read-back that proves no
//! acknowledged write was lost: shared by the failover tests (ALUA, Async
//! Messages, multipath over tgtd, the relay's fencing test).
#![allow(dead_code)]

use iscsi_bypass::multipath::{Io, IoCompletion};
use iscsi_bypass::IoQueue;
use std::time::{Duration, Instant};

/// What a load did: writes completed per path (paths past the second count
/// as the second) and failed writes.
pub struct Load {
    pub per_path: [u64; 2],
    pub errors: u64,
}

/// Writes of `blocks` blocks at depth 8 for `dur`, each stamped with its
/// chunk and generation; `generation` tracks what each chunk must hold.
/// One write per chunk in flight: concurrent writes to one chunk may land
/// in either order (SCSI orders nothing between them), so the check relies
/// on it.
pub fn write_load(q: &mut IoQueue, dur: Duration, blocks: u32, generation: &mut [u32]) -> Load {
    let chunk = blocks as usize * q.block_size() as usize;
    let mut load = Load {
        per_path: [0; 2],
        errors: 0,
    };
    let mut free: Vec<Vec<u8>> = (0..8).map(|_| vec![0u8; chunk]).collect();
    let mut pending = vec![0u32; generation.len()];
    let mut out: Vec<IoCompletion> = Vec::new();
    let mut next = 0usize;
    let start = Instant::now();
    loop {
        let running = start.elapsed() < dur;
        while running && !free.is_empty() {
            let c = next % generation.len();
            if pending[c] != 0 {
                break;
            }
            let mut buf = free.pop().unwrap();
            let g = generation[c] + 1;
            stamp(&mut buf, c, g);
            pending[c] = g;
            next += 1;
            let io = Io::write(c as u64 * u64::from(blocks), blocks, buf, c as u64);
            if let Err(e) = q.submit(io) {
                pending[c] = 0;
                next -= 1;
                free.push(e.into_io().buffer);
                break;
            }
        }
        if !running && q.in_flight() == 0 {
            return load;
        }
        out.clear();
        q.wait_completions(&mut out, 1, Duration::from_millis(50));
        for c in out.drain(..) {
            let chunk = c.user_tag as usize;
            match &c.result {
                Ok(()) => generation[chunk] = pending[chunk],
                Err(e) => {
                    load.errors += 1;
                    eprintln!("write of chunk {chunk} failed: {e}");
                }
            }
            pending[chunk] = 0;
            if let Some(p) = c.path {
                load.per_path[p.min(1)] += 1;
            }
            free.push(c.buffer);
        }
    }
}

/// Fills `buf` with words naming the chunk, the generation and the word.
pub fn stamp(buf: &mut [u8], chunk: usize, generation: u32) {
    for (i, w) in buf.chunks_mut(8).enumerate() {
        let v = (chunk as u64) << 32 | u64::from(generation) | (i as u64) << 56;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// Reads every written chunk back: it must hold its newest acknowledged
/// generation.
pub fn verify(q: &mut IoQueue, blocks: u32, generation: &[u32]) {
    let lost = mismatches(q, blocks, generation);
    assert!(
        lost.is_empty(),
        "acknowledged generations lost ({} chunks; chunk, generation found, acknowledged): {:?}",
        lost.len(),
        &lost[..lost.len().min(8)]
    );
}

/// A chunk that read back other than its newest acknowledged generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub chunk: usize,
    /// The generation its first word names.
    pub found: u32,
    pub acknowledged: u32,
}

/// Reads every written chunk (`generation` not 0) back and returns those
/// that do not hold `stamp(chunk, generation)`.
pub fn mismatches(q: &mut IoQueue, blocks: u32, generation: &[u32]) -> Vec<Mismatch> {
    let chunk = blocks as usize * q.block_size() as usize;
    let (mut got, mut want) = (vec![0u8; chunk], vec![0u8; chunk]);
    let mut out = Vec::new();
    for (c, &g) in generation.iter().enumerate() {
        if g == 0 {
            continue;
        }
        q.read_at(c as u64 * u64::from(blocks), &mut got)
            .expect("read back");
        stamp(&mut want, c, g);
        if got != want {
            out.push(Mismatch {
                chunk: c,
                found: u64::from_le_bytes(got[..8].try_into().unwrap()) as u32,
                acknowledged: g,
            });
        }
    }
    out
}
