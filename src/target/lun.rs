//! Logical units: RAM-backed (chunks behind their own locks, allocated on
//! first write, so a large sparse LUN costs little and connections on
//! different chunks do not contend) or null.
//!
//! A chunk's bytes are shared (`Arc`): a read can lend them by reference
//! ([`Lun::read_shared`], the embedded target's Data-In on the userspace
//! stack, held by TCP until acknowledged), and a write to a chunk that is
//! lent copies it first (copy on write), so what was lent never changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use super::{stable_hash, LunBacking, LunConfig};

/// Bytes per independently locked chunk of a RAM LUN; also what a write
/// copies when it meets a chunk still lent to an unacknowledged Data-In.
const CHUNK: u64 = 256 << 10;

/// The bytes of one chunk, shared with the Data-In that lend them.
pub type SharedChunk = Arc<Vec<u8>>;

/// One chunk of a RAM LUN; `None` until first written (reads as zeros).
type Chunk = RwLock<Option<SharedChunk>>;

/// One chunk of zeros, lent for unwritten chunks and null LUNs.
fn zeros() -> &'static SharedChunk {
    static ZEROS: OnceLock<SharedChunk> = OnceLock::new();
    ZEROS.get_or_init(|| Arc::new(vec![0u8; CHUNK as usize]))
}

/// One logical unit.
#[derive(Debug)]
pub struct Lun {
    number: u16,
    block_size: u32,
    blocks: u64,
    serial: String,
    /// NAA IEEE Registered Extended designator (16 bytes): the multipath
    /// identity, the same on every portal.
    naa: [u8; 16],
    /// `None` for a null LUN; each chunk is `None` until first written.
    chunks: Option<Vec<Chunk>>,
    /// Bumped by every LUN reset; sessions that saw an older value owe
    /// their initiator a UNIT ATTENTION.
    resets: AtomicU64,
    /// WRITEs received with FUA set (a RAM LUN writes through, so they are
    /// honoured by construction; counted for tests).
    fua_writes: AtomicU64,
    /// SYNCHRONIZE CACHE commands received.
    cache_syncs: AtomicU64,
    /// Held across COMPARE AND WRITE's compare and write (atomic against
    /// other COMPARE AND WRITEs, as VMware's ATS lock needs).
    compare_and_write: std::sync::Mutex<()>,
    /// One bit per block, set once written and cleared by UNMAP / WRITE
    /// SAME with UNMAP (GET LBA STATUS). RAM LUNs up to [`MAX_TRACKED_BLOCKS`]
    /// blocks; `None` otherwise (every block then reports mapped).
    mapped: Option<Vec<AtomicU64>>,
    /// Persistent reservations (per I_T nexus; see [`super::pr`]).
    pr: std::sync::Mutex<super::pr::Reservations>,
    /// Somebody is registered or holds a reservation: commands must be
    /// checked (without taking the lock when not).
    pr_active: std::sync::atomic::AtomicBool,
    /// PREEMPT AND ABORTs so far (a copy of the count under the lock, so
    /// pending tasks are checked without it).
    pr_aborts: AtomicU64,
    /// Writes executed (see [`Lun::write_executions`]), while
    /// `log_writes` is on; off by default (the log grows per write).
    log_writes: std::sync::atomic::AtomicBool,
    executions: std::sync::Mutex<Vec<WriteExecution>>,
}

/// One write the LU executed (its status was decided GOOD), as logged by
/// [`Lun::log_write_executions`]: tests check with it that recovery ran
/// each write exactly once (a retry as a new task has a new ITT and
/// CmdSN, but the same range and data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteExecution {
    /// The task's ITT and CmdSN as the initiator sent them.
    pub itt: u32,
    pub cmd_sn: u32,
    /// The connection the command came on.
    pub cid: u16,
    /// The CDB's operation code (WRITE 10, COMPARE AND WRITE, ...).
    pub opcode: u8,
    /// Byte range at the LU (for a parameter-list command: its LBA range
    /// where it has one, else 0, 0).
    pub offset: u64,
    pub len: u64,
    /// CRC32C of the data the command carried.
    pub data_crc: u32,
}

/// Largest RAM LUN (in blocks) whose mapped blocks are tracked: a 4 MiB bitmap.
pub const MAX_TRACKED_BLOCKS: u64 = 32 << 20;

impl Lun {
    pub fn new(iqn: &str, cfg: &LunConfig) -> Lun {
        let blocks = cfg.blocks();
        let size = blocks * u64::from(cfg.block_size);
        let id = stable_hash(&[iqn.as_bytes(), &cfg.lun.to_be_bytes()]);
        let serial = cfg
            .serial
            .clone()
            .unwrap_or_else(|| format!("IB{:012X}{:04X}", id >> 16, cfg.lun));
        let chunks = match cfg.backing {
            LunBacking::Null => None,
            LunBacking::Ram => Some(
                (0..size.div_ceil(CHUNK))
                    .map(|_| RwLock::new(None))
                    .collect(),
            ),
        };
        Lun {
            number: cfg.lun,
            block_size: cfg.block_size,
            blocks,
            serial,
            naa: naa_designator(id, stable_hash(&[&id.to_be_bytes(), iqn.as_bytes()])),
            chunks,
            resets: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            cache_syncs: AtomicU64::new(0),
            compare_and_write: std::sync::Mutex::new(()),
            mapped: (cfg.backing == LunBacking::Ram && blocks <= MAX_TRACKED_BLOCKS).then(|| {
                (0..blocks.div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            }),
            pr: std::sync::Mutex::new(super::pr::Reservations::default()),
            pr_active: std::sync::atomic::AtomicBool::new(false),
            pr_aborts: AtomicU64::new(0),
            log_writes: std::sync::atomic::AtomicBool::new(false),
            executions: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Starts (or stops) logging every executed write, for
    /// [`write_executions`](Self::write_executions).
    pub fn log_write_executions(&self, on: bool) {
        self.log_writes.store(on, Ordering::Release);
    }

    /// The writes executed since logging was switched on, in order.
    pub fn write_executions(&self) -> Vec<WriteExecution> {
        self.executions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn logs_writes(&self) -> bool {
        self.log_writes.load(Ordering::Acquire)
    }

    pub(crate) fn record_write_execution(&self, e: WriteExecution) {
        self.executions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// Runs `f` on the LU's persistent reservations, under their lock.
    pub fn with_reservations<R>(&self, f: impl FnOnce(&mut super::pr::Reservations) -> R) -> R {
        let mut g = match self.pr.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let r = f(&mut g);
        self.pr_active.store(g.is_active(), Ordering::Release);
        self.pr_aborts.store(g.aborts(), Ordering::Release);
        r
    }

    /// May `nexus` run a command with this operation code now, or does
    /// it meet a RESERVATION CONFLICT?
    pub fn reservation_allows(&self, nexus: &super::pr::ItNexus, opcode: u8) -> bool {
        if !self.pr_active.load(Ordering::Acquire) {
            return true;
        }
        let access = super::pr::access_of(opcode);
        self.with_reservations(|r| r.allows(nexus, access))
    }

    /// PREEMPT AND ABORTs so far; see [`task_aborted`](Self::task_aborted).
    pub fn pr_aborts(&self) -> u64 {
        self.pr_aborts.load(Ordering::Acquire)
    }

    /// Whether a task `nexus` started when [`pr_aborts`](Self::pr_aborts)
    /// was `seen` has been aborted by a PREEMPT AND ABORT since.
    pub fn task_aborted(&self, nexus: &super::pr::ItNexus, seen: u64) -> bool {
        self.pr_aborts() != seen && self.with_reservations(|r| r.aborted_since(nexus, seen))
    }

    /// Marks blocks `[first, first + n)` mapped or deallocated.
    fn track(&self, first: u64, n: u64, mapped: bool) {
        let Some(bits) = &self.mapped else { return };
        let end = first.saturating_add(n).min(self.blocks);
        let mut b = first;
        while b < end {
            let (w, bit) = ((b / 64) as usize, b % 64);
            let take = (64 - bit).min(end - b);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            if let Some(word) = bits.get(w) {
                // Load first: rewrites of mapped blocks stay read-only here.
                let cur = word.load(Ordering::Relaxed);
                if mapped && cur & mask != mask {
                    word.fetch_or(mask, Ordering::Relaxed);
                } else if !mapped && cur & mask != 0 {
                    word.fetch_and(!mask, Ordering::Relaxed);
                }
            }
            b += take;
        }
    }

    fn is_mapped(&self, block: u64) -> bool {
        match &self.mapped {
            None => true,
            Some(bits) => bits
                .get((block / 64) as usize)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (block % 64)) != 0),
        }
    }

    /// Whether mapped blocks are tracked (a RAM LUN, not too large).
    pub fn tracks_mapping(&self) -> bool {
        self.mapped.is_some()
    }

    /// Runs of blocks from `lba` with the same state, `(first, count,
    /// mapped)`, at most `max_runs` of them, none past the end; a run is at
    /// most `u32::MAX` blocks (an LBA status descriptor's count).
    pub fn mapping_runs(&self, lba: u64, max_runs: usize) -> Vec<(u64, u32, bool)> {
        let mut out = Vec::new();
        let mut b = lba;
        while b < self.blocks && out.len() < max_runs {
            let m = self.is_mapped(b);
            let start = b;
            if self.mapped.is_none() {
                b = self.blocks;
            } else {
                while b < self.blocks && self.is_mapped(b) == m && b - start < u64::from(u32::MAX) {
                    // Whole words at once when aligned.
                    if b.is_multiple_of(64) && b + 64 <= self.blocks {
                        let w = self.mapped.as_ref().and_then(|v| v.get((b / 64) as usize));
                        let full = if m { u64::MAX } else { 0 };
                        if w.is_some_and(|w| w.load(Ordering::Relaxed) == full)
                            && b - start + 64 <= u64::from(u32::MAX)
                        {
                            b += 64;
                            continue;
                        }
                    }
                    b += 1;
                }
            }
            let n = (b - start).min(u64::from(u32::MAX));
            out.push((start, n as u32, m));
            b = start + n;
        }
        out
    }

    /// Deallocates (UNMAP) `len` bytes at `offset`: zeroes them and marks
    /// their blocks deallocated.
    pub fn deallocate(&self, offset: u64, len: u64) {
        self.zero_inner(offset, len);
        let bs = u64::from(self.block_size);
        self.track(offset / bs, len / bs, false);
    }

    /// Records a LUN reset; returns the new reset generation.
    pub fn reset(&self) -> u64 {
        self.resets.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// WRITEs received with FUA set.
    pub fn fua_writes(&self) -> u64 {
        self.fua_writes.load(Ordering::Relaxed)
    }

    /// SYNCHRONIZE CACHE commands received.
    pub fn cache_syncs(&self) -> u64 {
        self.cache_syncs.load(Ordering::Relaxed)
    }

    /// Runs `f` holding the COMPARE AND WRITE lock.
    pub(crate) fn atomically<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self
            .compare_and_write
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f()
    }

    pub(crate) fn count_fua_write(&self) {
        self.fua_writes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_cache_sync(&self) {
        self.cache_syncs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reset_generation(&self) -> u64 {
        self.resets.load(Ordering::Acquire)
    }

    pub fn number(&self) -> u16 {
        self.number
    }
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    pub fn size_bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
    pub fn serial(&self) -> &str {
        &self.serial
    }
    pub fn naa(&self) -> &[u8; 16] {
        &self.naa
    }
    pub fn is_null(&self) -> bool {
        self.chunks.is_none()
    }

    /// Whether `[lba, lba + blocks)` lies inside the LUN.
    pub fn in_range(&self, lba: u64, blocks: u64) -> bool {
        lba.checked_add(blocks)
            .is_some_and(|end| end <= self.blocks)
    }

    /// Fills `buf` from byte `offset`. Bytes beyond the end read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let Some(chunks) = &self.chunks else {
            buf.fill(0);
            return;
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (ci, within) = ((pos / CHUNK) as usize, (pos % CHUNK) as usize);
            let n = (buf.len() - done).min(CHUNK as usize - within);
            let dst = &mut buf[done..done + n];
            match chunks
                .get(ci)
                .map(|c| c.read().unwrap_or_else(|e| e.into_inner()))
            {
                Some(guard) => match guard.as_ref() {
                    Some(data) => dst.copy_from_slice(&data[within..within + n]),
                    None => dst.fill(0),
                },
                None => dst.fill(0),
            }
            done += n;
        }
    }

    /// Lends the `len` bytes at byte `offset`, without copying them: calls
    /// `each(buf, start, n)` for each piece `buf[start..start + n]`, in
    /// order, one per chunk touched (a shared chunk of zeros where nothing
    /// was written, and for a null LUN). A lent chunk never changes: a
    /// later write copies it first. Bytes beyond the end read as zeros.
    pub fn read_shared(
        &self,
        offset: u64,
        len: usize,
        mut each: impl FnMut(&SharedChunk, usize, usize),
    ) {
        let mut done = 0usize;
        while done < len {
            let pos = offset.saturating_add(done as u64);
            let (ci, within) = ((pos / CHUNK) as usize, (pos % CHUNK) as usize);
            let n = (len - done).min(CHUNK as usize - within);
            let chunk = self
                .chunks
                .as_ref()
                .and_then(|chunks| chunks.get(ci))
                .map(|c| c.read().unwrap_or_else(|e| e.into_inner()));
            match chunk.as_ref().and_then(|guard| guard.as_ref()) {
                // A chunk may be shorter than CHUNK (the LUN's last one).
                Some(data) if within + n <= data.len() => each(data, within, n),
                Some(data) => {
                    let have = data.len().saturating_sub(within);
                    if have > 0 {
                        each(data, within, have);
                    }
                    each(zeros(), 0, n - have);
                }
                None => each(zeros(), within, n),
            }
            done += n;
        }
    }

    /// Stores `data` at byte `offset`. Bytes beyond the end are dropped.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let bs = u64::from(self.block_size);
        self.track(offset / bs, (data.len() as u64).div_ceil(bs), true);
        self.modify(offset, data.len(), |dst, from| {
            dst.copy_from_slice(&data[from..from + dst.len()])
        });
    }

    /// Zeroes `len` bytes at `offset` (UNMAP, WRITE SAME with zeros); whole
    /// chunks are released.
    pub fn zero(&self, offset: u64, len: u64) {
        let bs = u64::from(self.block_size);
        self.track(offset / bs, len.div_ceil(bs), true);
        self.zero_inner(offset, len);
    }

    fn zero_inner(&self, offset: u64, len: u64) {
        let Some(chunks) = &self.chunks else { return };
        let end = offset.saturating_add(len).min(self.size_bytes());
        let mut pos = offset;
        while pos < end {
            let (ci, within) = ((pos / CHUNK) as usize, pos % CHUNK);
            let n = (end - pos).min(CHUNK - within);
            if let Some(chunk) = chunks.get(ci) {
                let mut guard = chunk.write().unwrap_or_else(|e| e.into_inner());
                if within == 0 && n == CHUNK {
                    *guard = None;
                } else if let Some(data) = guard.as_mut() {
                    // Copies the chunk first if a Data-In still holds it.
                    Arc::make_mut(data)[within as usize..(within + n) as usize].fill(0);
                }
            }
            pos += n;
        }
    }

    fn modify(&self, offset: u64, len: usize, mut f: impl FnMut(&mut [u8], usize)) {
        let Some(chunks) = &self.chunks else { return };
        let size = self.size_bytes();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            if pos >= size {
                return;
            }
            let (ci, within) = ((pos / CHUNK) as usize, (pos % CHUNK) as usize);
            let chunk_len = (size - (ci as u64 * CHUNK)).min(CHUNK) as usize;
            let n = (len - done).min(chunk_len - within);
            let Some(chunk) = chunks.get(ci) else { return };
            let mut guard = chunk.write().unwrap_or_else(|e| e.into_inner());
            let data = guard.get_or_insert_with(|| Arc::new(vec![0u8; chunk_len]));
            // Copies the chunk first if a Data-In still holds it.
            f(&mut Arc::make_mut(data)[within..within + n], done);
            done += n;
        }
    }
}

/// NAA type 6 (IEEE Registered Extended): 4-bit NAA, 24-bit company id,
/// 100 bits vendor specific. The company id is the locally administered
/// 52-54-00 prefix: this is a test target, not a registered product.
fn naa_designator(a: u64, b: u64) -> [u8; 16] {
    const COMPANY_ID: u128 = 0x52_54_00;
    let vendor = ((u128::from(a) << 64) | u128::from(b)) & ((1u128 << 100) - 1);
    ((6u128 << 124) | (COMPANY_ID << 100) | vendor).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_lun_reads_back_across_chunks_and_zeroes() {
        let lun = Lun::new("iqn.t", &LunConfig::ram(0, 3 * CHUNK));
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let at = CHUNK - 100;
        lun.write(at, &data);
        let mut back = vec![0u8; 5000];
        lun.read(at, &mut back);
        assert_eq!(back, data);
        let mut untouched = vec![1u8; 16];
        lun.read(2 * CHUNK + 5, &mut untouched);
        assert_eq!(untouched, vec![0u8; 16]);
        lun.zero(at, 200);
        lun.read(at, &mut back[..200]);
        assert!(back[..200].iter().all(|&b| b == 0));
        // Writes past the end are dropped, not a panic.
        lun.write(3 * CHUNK - 2, &[9, 9, 9, 9]);
        let mut tail = [0u8; 4];
        lun.read(3 * CHUNK - 2, &mut tail);
        assert_eq!(tail, [9, 9, 0, 0]);
    }

    /// What `read_shared` lends, glued together.
    fn lent(lun: &Lun, offset: u64, len: usize) -> (Vec<u8>, Vec<SharedChunk>) {
        let (mut bytes, mut held) = (Vec::new(), Vec::new());
        lun.read_shared(offset, len, |buf, start, n| {
            bytes.extend_from_slice(&buf[start..start + n]);
            held.push(Arc::clone(buf));
        });
        (bytes, held)
    }

    #[test]
    fn lent_bytes_are_those_read_and_never_change() {
        let lun = Lun::new("iqn.t", &LunConfig::ram(0, 3 * CHUNK));
        let data: Vec<u8> = (0..9000u32).map(|i| (i * 13) as u8).collect();
        let at = CHUNK - 4000;
        lun.write(at, &data);
        // Across a chunk boundary and into unwritten space.
        let (bytes, held) = lent(&lun, at - 100, 9100);
        let mut copied = vec![0u8; 9100];
        lun.read(at - 100, &mut copied);
        assert_eq!(bytes, copied);
        assert_eq!(&bytes[100..], &data[..]);
        assert_eq!(held.len(), 2);
        // A write over lent bytes copies the chunk: the lent bytes stay.
        lun.write(at, &[0xee; 64]);
        assert_eq!(&held[0][(at % CHUNK) as usize..][..64], &data[..64]);
        let (after, _) = lent(&lun, at, 64);
        assert_eq!(after, vec![0xee; 64]);
        lun.zero(at, 16);
        assert_eq!(&held[0][(at % CHUNK) as usize..][..16], &data[..16]);
        // Unwritten chunks, past the end, and null LUNs lend zeros.
        let (tail, _) = lent(&lun, 3 * CHUNK - 8, 24);
        assert_eq!(tail, vec![0u8; 24]);
        let null = Lun::new("iqn.t", &LunConfig::null(1, 4 * CHUNK));
        let (zeros, held) = lent(&null, 5, 2 * CHUNK as usize);
        assert!(zeros.iter().all(|&b| b == 0) && zeros.len() == 2 * CHUNK as usize);
        assert_eq!(held.len(), 3);
    }

    #[test]
    fn a_short_last_chunk_lends_zeros_after_its_end() {
        // 1.5 chunks: the second chunk holds CHUNK / 2 bytes.
        let lun = Lun::new("iqn.t", &LunConfig::ram(0, CHUNK + CHUNK / 2));
        lun.write(CHUNK, &[5u8; 10]);
        let (bytes, _) = lent(&lun, CHUNK + CHUNK / 2 - 4, 8);
        assert_eq!(bytes, vec![0u8; 8]);
        let (bytes, _) = lent(&lun, CHUNK + 8, 4);
        assert_eq!(bytes, vec![5, 5, 0, 0]);
    }

    #[test]
    fn mapping_is_tracked_per_block() {
        let lun = Lun::new("iqn.t", &LunConfig::ram(0, 1 << 20));
        assert!(lun.tracks_mapping());
        assert_eq!(lun.mapping_runs(0, 8), vec![(0, 2048, false)]);
        lun.write(512 * 3, &[1u8; 512 * 200]);
        assert_eq!(
            lun.mapping_runs(0, 8),
            vec![(0, 3, false), (3, 200, true), (203, 1845, false)]
        );
        lun.deallocate(512 * 10, 512 * 100);
        assert_eq!(lun.mapping_runs(5, 2), vec![(5, 5, true), (10, 100, false)]);
        lun.zero(512 * 10, 512);
        assert_eq!(lun.mapping_runs(10, 1), vec![(10, 1, true)]);
        let null = Lun::new("iqn.t", &LunConfig::null(1, 1 << 20));
        assert_eq!(null.mapping_runs(7, 4), vec![(7, 2041, true)]);
    }

    #[test]
    fn null_lun_reads_zeros() {
        let lun = Lun::new("iqn.t", &LunConfig::null(1, 1 << 30));
        lun.write(0, &[1, 2, 3]);
        let mut b = [7u8; 3];
        lun.read(0, &mut b);
        assert_eq!(b, [0, 0, 0]);
        assert!(lun.is_null());
        assert!(lun.in_range((1 << 21) - 1, 1));
        assert!(!lun.in_range(1 << 21, 1));
        assert!(!lun.in_range(u64::MAX, 2));
    }

    #[test]
    fn identity_is_stable_and_naa6() {
        let a = Lun::new("iqn.t", &LunConfig::ram(0, 4096));
        let b = Lun::new("iqn.t", &LunConfig::null(0, 4096));
        let c = Lun::new("iqn.t", &LunConfig::ram(1, 4096));
        assert_eq!(a.naa(), b.naa());
        assert_ne!(a.naa(), c.naa());
        assert_eq!(a.naa()[0] >> 4, 6);
        assert_eq!(a.serial(), b.serial());
    }
}
