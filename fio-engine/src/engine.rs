//! The per-job engine: one multipath device and one [`IoQueue`] per fio
//! file, I/Os staged by `queue` and submitted by `commit`, completions
//! collected by `getevents` and handed out by `event`.
//!
//! Nothing here knows fio's structures: an I/O carries an opaque `tag`
//! (the io_u's address) and, for reads, the address its data goes to
//! (`dst`); [`crate::ffi`] does the copies into fio's buffers.

use crate::config::EngineConfig;
use iscsi_bypass::{Device, Io, IoCompletion, IoError, IoQueue, SubmitError};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What fio asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// fio's sync / datasync: SYNCHRONIZE CACHE.
    Flush,
    /// fio's trim: UNMAP.
    Trim,
}

/// Why `queue` did not take an I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// No room now: fio reaps completions and queues it again.
    Busy,
    /// The request cannot be sent (alignment, range, unknown file).
    Invalid(String),
}

/// A finished I/O.
#[derive(Debug)]
pub struct Done {
    /// The tag given to `queue` (fio's io_u).
    pub tag: usize,
    /// 0, or the errno fio records for it.
    pub error: i32,
    /// Where the read data goes (the address given to `queue`).
    pub dst: usize,
    /// Read data (exactly the length asked for), for a successful read.
    pub data: Option<Vec<u8>>,
}

struct File {
    url: String,
    queue: IoQueue,
    device: Device,
}

#[derive(Clone, Copy)]
struct Slot {
    tag: usize,
    dst: usize,
    len: usize,
    file: usize,
    op: Op,
    offset: u64,
}

/// Errors printed before going quiet (fio reports each failed io_u itself).
const ERRORS_SHOWN: u32 = 16;

/// The engine of one fio job (thread or process).
pub struct Engine {
    cfg: EngineConfig,
    files: Vec<Option<File>>,
    /// In flight or staged, by `user_tag`.
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u64>,
    staged: VecDeque<(usize, Io)>,
    backlog: VecDeque<Done>,
    events: Vec<Option<Done>>,
    pool: Vec<Vec<u8>>,
    scratch: Vec<IoCompletion>,
    errors_shown: u32,
}

/// errno values fio records in `io_u->error` (Linux).
pub mod errno {
    pub const EIO: i32 = libc::EIO;
    pub const EINVAL: i32 = libc::EINVAL;
    pub const EBUSY: i32 = libc::EBUSY;
    pub const ESHUTDOWN: i32 = libc::ESHUTDOWN;
}

fn errno_of(e: &IoError) -> i32 {
    match e {
        IoError::OutOfRange { .. } | IoError::BadBuffer { .. } | IoError::ZeroLength { .. } => {
            errno::EINVAL
        }
        IoError::Closed => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

/// Logs in to the paths of `url` once and returns the LU's size in bytes
/// (fio sizes files before it forks its jobs).
pub fn probe_size(cfg: &EngineConfig, url: &str) -> Result<u64, String> {
    let urls = cfg.urls_for(url).map_err(|e| e.to_string())?;
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let dev = Device::open_urls(&refs, &cfg.options).map_err(|e| e.to_string())?;
    let bytes = dev.capacity_bytes();
    dev.close();
    Ok(bytes)
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Engine {
        Engine {
            cfg,
            files: Vec::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            staged: VecDeque::new(),
            backlog: VecDeque::new(),
            events: Vec::new(),
            pool: Vec::new(),
            scratch: Vec::with_capacity(256),
            errors_shown: 0,
        }
    }

    /// Opens the multipath device of one fio file (its URL and the extra
    /// paths); returns its index, size in bytes and block size.
    pub fn open_file(&mut self, url: &str) -> Result<(usize, u64, u32), String> {
        if !self.cfg.extra_paths.is_empty() {
            if let Some(other) = self.files.iter().flatten().find(|f| f.url != url) {
                return Err(format!(
                    "iscsi_paths adds paths to one LU, but {} is open as well: give one filename",
                    other.url
                ));
            }
        }
        let urls = self.cfg.urls_for(url).map_err(|e| e.to_string())?;
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        let device = Device::open_urls(&refs, &self.cfg.options).map_err(|e| e.to_string())?;
        let queue = device.queue_pair();
        let (bytes, bs) = (device.capacity_bytes(), device.block_size());
        self.files.push(Some(File {
            url: url.to_string(),
            queue,
            device,
        }));
        Ok((self.files.len() - 1, bytes, bs))
    }

    /// Closes a file's device (logs out of its paths).
    pub fn close_file(&mut self, file: usize) {
        if let Some(f) = self.files.get_mut(file).and_then(Option::take) {
            let File { queue, device, .. } = f;
            drop(queue);
            device.close();
        }
    }

    /// Stages one I/O (sent by the next `commit`). `data` is the write
    /// payload; `dst` is where read data goes (handed back in [`Done`]).
    #[allow(clippy::too_many_arguments)]
    pub fn queue(
        &mut self,
        file: usize,
        op: Op,
        offset: u64,
        len: usize,
        data: Option<&[u8]>,
        tag: usize,
        dst: usize,
    ) -> Result<(), QueueError> {
        let f = self
            .files
            .get(file)
            .and_then(Option::as_ref)
            .ok_or_else(|| QueueError::Invalid(format!("file {file} is not open")))?;
        if self.staged.len()
            + self
                .files
                .iter()
                .flatten()
                .map(|f| f.queue.in_flight())
                .sum::<usize>()
            >= self.cfg.options.queue_depth
        {
            return Err(QueueError::Busy);
        }
        let bs = u64::from(f.queue.block_size());
        let (lba, blocks) = if op == Op::Flush {
            (0, 0)
        } else {
            if !offset.is_multiple_of(bs) || !(len as u64).is_multiple_of(bs) || len == 0 {
                return Err(QueueError::Invalid(format!(
                    "{}: {op:?} of {len} bytes at offset {offset} is not in whole {bs}-byte blocks \
                     (set bs and offsets to multiples of the LU's block size)",
                    f.url
                )));
            }
            let blocks = u32::try_from(len as u64 / bs).map_err(|_| {
                QueueError::Invalid(format!("{}: {len} bytes in one I/O is too large", f.url))
            })?;
            (offset / bs, blocks)
        };
        let user_tag = match self.free_slots.pop() {
            Some(t) => t,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u64
            }
        };
        let mut buffer = self.pool.pop().unwrap_or_default();
        buffer.clear();
        let io = match op {
            Op::Read => {
                buffer.reserve(len);
                Io::read(lba, blocks, buffer, user_tag)
            }
            Op::Write => {
                let Some(d) = data.filter(|d| d.len() == len) else {
                    self.free_slots.push(user_tag);
                    return Err(QueueError::Invalid(format!(
                        "{}: write of {len} bytes without its data",
                        f.url
                    )));
                };
                buffer.extend_from_slice(d);
                Io::write(lba, blocks, buffer, user_tag)
            }
            Op::Flush => Io::flush(user_tag),
            Op::Trim => Io::unmap(lba, blocks, buffer, user_tag),
        };
        self.slots[user_tag as usize] = Some(Slot {
            tag,
            dst,
            len,
            file,
            op,
            offset,
        });
        self.staged.push_back((file, io));
        Ok(())
    }

    /// Submits what `queue` staged. An I/O the device refuses as malformed
    /// completes with EINVAL; one without room stays staged (sent by the
    /// next `commit` or `getevents`).
    pub fn commit(&mut self) {
        while let Some((file, io)) = self.staged.pop_front() {
            let Some(f) = self.files.get_mut(file).and_then(Option::as_mut) else {
                let tag = io.user_tag;
                self.finish_unsent(tag, errno::ESHUTDOWN, "its file was closed", io.buffer);
                continue;
            };
            match f.queue.submit(io) {
                Ok(()) => {}
                Err(SubmitError::QueueFull(io)) => {
                    self.staged.push_front((file, io));
                    break;
                }
                Err(SubmitError::Invalid { error, io }) => {
                    let msg = error.to_string();
                    self.finish_unsent(io.user_tag, errno_of(&error), &msg, io.buffer);
                }
                Err(SubmitError::Closed(io)) => {
                    self.finish_unsent(io.user_tag, errno::ESHUTDOWN, "device closed", io.buffer);
                }
            }
        }
    }

    fn finish_unsent(&mut self, user_tag: u64, error: i32, why: &str, buffer: Vec<u8>) {
        self.pool.push(buffer);
        if let Some(s) = self.take_slot(user_tag) {
            self.report(&s, why);
            self.backlog.push_back(Done {
                tag: s.tag,
                error,
                dst: s.dst,
                data: None,
            });
        }
    }

    fn take_slot(&mut self, user_tag: u64) -> Option<Slot> {
        let s = self.slots.get_mut(user_tag as usize)?.take()?;
        self.free_slots.push(user_tag);
        Some(s)
    }

    fn report(&mut self, s: &Slot, why: &str) {
        if self.errors_shown < ERRORS_SHOWN {
            self.errors_shown += 1;
            let url = self
                .files
                .get(s.file)
                .and_then(Option::as_ref)
                .map_or("?", |f| f.url.as_str());
            eprintln!(
                "fio: iscsi-bypass: {url}: {:?} of {} bytes at offset {}: {why}",
                s.op, s.len, s.offset
            );
            if self.errors_shown == ERRORS_SHOWN {
                eprintln!("fio: iscsi-bypass: further I/O errors are not shown");
            }
        }
    }

    /// I/Os staged or in flight.
    pub fn outstanding(&self) -> usize {
        self.staged.len()
            + self
                .files
                .iter()
                .flatten()
                .map(|f| f.queue.in_flight())
                .sum::<usize>()
    }

    /// Moves finished I/Os into the backlog; returns how many.
    fn poll(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.files.len() {
            let Some(f) = self.files[i].as_mut() else {
                continue;
            };
            f.queue.poll_completions(&mut self.scratch);
            let mut done = std::mem::take(&mut self.scratch);
            for c in done.drain(..) {
                n += 1;
                let Some(s) = self.take_slot(c.user_tag) else {
                    continue;
                };
                match c.result {
                    Ok(()) if s.op == Op::Read && c.buffer.len() >= s.len => {
                        let mut data = c.buffer;
                        data.truncate(s.len);
                        self.backlog.push_back(Done {
                            tag: s.tag,
                            error: 0,
                            dst: s.dst,
                            data: Some(data),
                        });
                    }
                    Ok(()) if s.op == Op::Read => {
                        let why = format!("read returned {} bytes", c.buffer.len());
                        self.pool.push(c.buffer);
                        self.report(&s, &why);
                        self.backlog.push_back(Done {
                            tag: s.tag,
                            error: errno::EIO,
                            dst: s.dst,
                            data: None,
                        });
                    }
                    Ok(()) => {
                        self.pool.push(c.buffer);
                        self.backlog.push_back(Done {
                            tag: s.tag,
                            error: 0,
                            dst: s.dst,
                            data: None,
                        });
                    }
                    Err(e) => {
                        self.pool.push(c.buffer);
                        self.report(&s, &e.to_string());
                        self.backlog.push_back(Done {
                            tag: s.tag,
                            error: errno_of(&e),
                            dst: s.dst,
                            data: None,
                        });
                    }
                }
            }
            self.scratch = done;
        }
        n
    }

    /// Waits until at least `min` I/Os finished (or `timeout` passed, or
    /// nothing is outstanding), and makes up to `max` of them the events
    /// `event(0..n)` returns.
    pub fn getevents(&mut self, min: usize, max: usize, timeout: Option<Duration>) -> usize {
        // Events fio did not take go first next time (fio takes them all).
        for d in self.events.drain(..).rev().flatten() {
            self.backlog.push_front(d);
        }
        let max = max.max(1);
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut empty_polls = 0u32;
        loop {
            if !self.staged.is_empty() {
                self.commit();
            }
            let got = self.poll();
            if self.backlog.len() >= min || self.outstanding() == 0 {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if got == 0 {
                empty_polls = empty_polls.saturating_add(1);
                match self.cfg.idle_sleep {
                    Some(d) if empty_polls > 64 => std::thread::sleep(d),
                    _ if empty_polls.is_multiple_of(256) => std::thread::yield_now(),
                    _ => std::hint::spin_loop(),
                }
            } else {
                empty_polls = 0;
            }
        }
        let n = self.backlog.len().min(max);
        self.events.extend(self.backlog.drain(..n).map(Some));
        n
    }

    /// The `idx`th event of the last `getevents`, once.
    pub fn take_event(&mut self, idx: usize) -> Option<Done> {
        self.events.get_mut(idx)?.take()
    }

    /// Gives a read buffer back for reuse.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.pool.push(buffer);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for i in 0..self.files.len() {
            self.close_file(i);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The engine against the embedded target (RAM LU, two loopback
    //! portals), as fio drives it: queue, commit, getevents, event.
    use super::*;
    use crate::config::RawConfig;
    use iscsi_bypass::target::{Target, TargetConfig};

    const IQN: &str = "iqn.2026-11.org.iscsi-bypass:fio-engine-unit";

    fn engine(paths: Option<String>, depth: u32) -> Engine {
        let raw = RawConfig {
            paths,
            queue_depth: depth,
            nr_files: 1,
            no_path_timeout_s: 5,
            ..RawConfig::default()
        };
        Engine::new(EngineConfig::parse(&raw, &|_| None).unwrap())
    }

    fn drain(e: &mut Engine, want: usize) -> Vec<Done> {
        let mut out = Vec::new();
        while out.len() < want {
            let n = e.getevents(1, 64, Some(Duration::from_secs(10)));
            assert!(n > 0, "no completion within 10 s");
            for i in 0..n {
                out.push(e.take_event(i).unwrap());
            }
            assert!(e.take_event(0).is_none(), "an event is handed out once");
        }
        out
    }

    #[test]
    fn write_then_read_back_over_two_paths() {
        let t = Target::start(TargetConfig::ram(IQN, 4 << 20).loopback_portals(2)).unwrap();
        let urls: Vec<String> = t
            .portals()
            .iter()
            .map(|p| format!("iscsi://{p}/{IQN}/0"))
            .collect();
        let mut e = engine(Some(urls[1].clone()), 16);
        let (file, bytes, bs) = e.open_file(&urls[0]).unwrap();
        assert_eq!((bytes, bs), (4 << 20, 512));
        // 16 writes of 4 KiB with distinct contents, one commit.
        for i in 0..16u8 {
            let data = vec![i.wrapping_mul(7) ^ 0x5a; 4096];
            e.queue(
                file,
                Op::Write,
                u64::from(i) * 4096,
                4096,
                Some(&data),
                1000 + i as usize,
                0,
            )
            .unwrap();
        }
        e.commit();
        let done = drain(&mut e, 16);
        assert!(done.iter().all(|d| d.error == 0 && d.data.is_none()));
        let mut tags: Vec<usize> = done.iter().map(|d| d.tag).collect();
        tags.sort();
        assert_eq!(tags, (1000..1016).collect::<Vec<_>>());
        // 16 deep: a 17th I/O waits for room.
        for i in 0..16u8 {
            e.queue(
                file,
                Op::Read,
                u64::from(i) * 4096,
                4096,
                None,
                i as usize,
                5000 + i as usize,
            )
            .unwrap();
        }
        assert_eq!(
            e.queue(file, Op::Flush, 0, 0, None, 7, 0),
            Err(QueueError::Busy)
        );
        e.commit();
        let mut done = drain(&mut e, 16);
        e.queue(file, Op::Flush, 0, 0, None, 7, 0).unwrap();
        e.commit();
        done.extend(drain(&mut e, 1));
        for d in done {
            assert_eq!(d.error, 0);
            if d.tag == 7 {
                continue;
            }
            let i = d.tag as u8;
            assert_eq!(d.dst, 5000 + d.tag);
            let data = d.data.unwrap();
            assert_eq!(data, vec![i.wrapping_mul(7) ^ 0x5a; 4096], "block {i}");
            e.recycle(data);
        }
        assert_eq!(e.outstanding(), 0);
        e.close_file(file);
        t.stop();
    }

    #[test]
    fn misaligned_and_out_of_range_io_are_refused_with_einval() {
        let t = Target::start(TargetConfig::ram(IQN, 1 << 20).loopback_portals(1)).unwrap();
        let url = format!("iscsi://{}/{IQN}/0", t.portals()[0]);
        let mut e = engine(None, 4);
        let (file, bytes, _) = e.open_file(&url).unwrap();
        let r = e.queue(file, Op::Read, 100, 512, None, 1, 0);
        assert!(
            matches!(&r, Err(QueueError::Invalid(m)) if m.contains("whole 512-byte blocks")),
            "{r:?}"
        );
        assert!(matches!(
            e.queue(9, Op::Read, 0, 512, None, 1, 0),
            Err(QueueError::Invalid(_))
        ));
        // Past the end: the device refuses it at submit; fio sees EINVAL.
        e.queue(file, Op::Read, bytes, 4096, None, 3, 0).unwrap();
        e.commit();
        let done = drain(&mut e, 1);
        assert_eq!((done[0].tag, done[0].error), (3, errno::EINVAL));
        t.stop();
    }

    #[test]
    fn open_fails_with_the_reason() {
        let mut e = engine(None, 4);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = e
            .open_file(&format!("iscsi://127.0.0.1:{port}/{IQN}/0"))
            .unwrap_err();
        assert!(!err.is_empty());
        assert!(e.open_file("nonsense").is_err());
    }
}
