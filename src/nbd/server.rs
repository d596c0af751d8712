//! The NBD server runtime: a listener thread accepting clients (TCP or a
//! Unix socket) and one thread per client connection. Each connection owns
//! one [`IoQueue`] of the shared [`MultipathDevice`], reads pipelined
//! requests from a non-blocking socket, submits them without waiting, and
//! writes replies as the I/Os complete (in completion order, as NBD allows).

use super::handshake::{ExportInfo, Handshake, Step};
use super::wire::{self, cflags, cmd, errno, tflags, Request, WireError};
use super::NbdError;
use crate::multipath::{Io, IoCompletion, IoError, IoOp};
use crate::scsi::ScsiError;
use crate::wire::scsi::SenseKey;
use crate::worker::{IoQueue, MultipathDevice, SubmitError};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the export presents itself and how large requests may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Export name (clients may also use the empty default name).
    pub name: String,
    /// Free text for `NBD_OPT_LIST` / `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Refuse writes, trims and write-zeroes with `EPERM`.
    pub read_only: bool,
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    pub max_payload: u32,
    /// Largest single SCSI command the export issues; bigger requests are split.
    pub max_io_bytes: u32,
    /// How long a client has to finish the handshake.
    pub handshake_timeout: Duration,
}

impl Default for ExportConfig {
    fn default() -> ExportConfig {
        ExportConfig {
            name: "iscsi-bypass".into(),
            description: "multipath iSCSI LU served by iscsi-bypass".into(),
            read_only: false,
            max_payload: 32 << 20,
            max_io_bytes: 1 << 20,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the server listens.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket (e.g. `127.0.0.1:10809`).
    Tcp(TcpListener),
    /// A Unix socket; the file is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a TCP listener.
    pub fn tcp(addr: SocketAddr) -> Result<Listener, NbdError> {
        let l = TcpListener::bind(addr).map_err(|e| NbdError::Bind(addr.to_string(), e))?;
        Ok(Listener::Tcp(l))
    }

    /// Binds a Unix socket at `path`, replacing a stale socket file there.
    pub fn unix(path: &Path) -> Result<Listener, NbdError> {
        let name = path.display().to_string();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(NbdError::Bind(
                    name,
                    std::io::Error::new(ErrorKind::AlreadyExists, "exists and is not a socket"),
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path).map_err(|e| NbdError::Bind(name, e))?;
        Ok(Listener::Unix(l, path.to_path_buf()))
    }

    /// What clients connect to: `nbd://127.0.0.1:PORT` or `nbd+unix:///?socket=PATH`.
    pub fn uri(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd://{a}"),
                Err(_) => "nbd://?".into(),
            },
            Listener::Unix(_, p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    fn accept(&self) -> std::io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, a) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), a.to_string()))
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept()?;
                Ok((Stream::Unix(s), p.display().to_string()))
            }
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

struct Export {
    device: Arc<MultipathDevice>,
    config: ExportConfig,
    info: ExportInfo,
    /// Serialises read-modify-write of partial blocks across connections.
    rmw: Mutex<()>,
    /// WRITE SAME was refused once: zero writes from then on.
    no_write_same: AtomicBool,
    stats: Arc<ServerStats>,
}

/// Entry points: [`NbdServer::run`] (blocking) and [`NbdServer::spawn`].
#[derive(Debug)]
pub struct NbdServer;

/// A server running in background threads; dropping it stops it.
#[derive(Debug)]
pub struct NbdServerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), NbdError>>>,
    uri: String,
    stats: Arc<ServerStats>,
}

impl NbdServerHandle {
    /// The URI clients use (`nbd://…` or `nbd+unix:///?socket=…`).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Live counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops accepting, closes every connection and joins the threads.
    pub fn stop(mut self) -> Result<(), NbdError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), NbdError> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| NbdError::Thread("listener thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for NbdServerHandle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn export_info(device: &MultipathDevice, config: &ExportConfig) -> ExportInfo {
    let mut flags =
        tflags::HAS_FLAGS | tflags::SEND_FLUSH | tflags::SEND_FUA | tflags::CAN_MULTI_CONN;
    if config.read_only {
        flags |= tflags::READ_ONLY;
    } else {
        flags |= tflags::SEND_TRIM | tflags::SEND_WRITE_ZEROES;
    }
    let bs = device.block_size();
    ExportInfo {
        name: config.name.clone(),
        description: config.description.clone(),
        size: device.capacity_bytes(),
        flags,
        min_block: bs,
        preferred_block: bs.max(4096),
        max_payload: config.max_payload,
    }
}

impl NbdServer {
    /// Serves `device` on `listener` until `stop` is set. One thread per
    /// client; returns after every connection thread has ended.
    pub fn run(
        device: Arc<MultipathDevice>,
        config: ExportConfig,
        listener: Listener,
        stop: Arc<AtomicBool>,
    ) -> Result<(), NbdError> {
        Self::run_with_stats(device, config, listener, stop, Arc::default())
    }

    /// Starts [`run`](Self::run) in a background thread.
    pub fn spawn(
        device: Arc<MultipathDevice>,
        config: ExportConfig,
        listener: Listener,
    ) -> Result<NbdServerHandle, NbdError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats: Arc<ServerStats> = Arc::default();
        let uri = listener.uri();
        let (s, st) = (stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("nbd-listen".into())
            .spawn(move || Self::run_with_stats(device, config, listener, s, st))
            .map_err(|e| NbdError::Thread(e.to_string()))?;
        Ok(NbdServerHandle {
            stop,
            thread: Some(thread),
            uri,
            stats,
        })
    }

    fn run_with_stats(
        device: Arc<MultipathDevice>,
        config: ExportConfig,
        listener: Listener,
        stop: Arc<AtomicBool>,
        stats: Arc<ServerStats>,
    ) -> Result<(), NbdError> {
        if config.max_io_bytes < device.block_size() || config.max_payload == 0 {
            return Err(NbdError::Config(
                "max_io_bytes must hold a block and max_payload must be positive".into(),
            ));
        }
        listener
            .set_nonblocking()
            .map_err(|e| NbdError::Bind(listener.uri(), e))?;
        let info = export_info(&device, &config);
        let export = Arc::new(Export {
            device,
            config,
            info,
            rmw: Mutex::new(()),
            no_write_same: AtomicBool::new(false),
            stats,
        });
        log::info!(
            "NBD export serving {} ({} bytes)",
            listener.uri(),
            export.info.size
        );
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        let mut next = 0u64;
        while !stop.load(Ordering::Acquire) {
            conns.retain(|c| !c.is_finished());
            match listener.accept() {
                Ok((stream, peer)) => {
                    next += 1;
                    export.stats.connections.fetch_add(1, Ordering::Relaxed);
                    let (e, s) = (export.clone(), stop.clone());
                    let spawned = std::thread::Builder::new()
                        .name(format!("nbd-conn-{next}"))
                        .spawn(move || match serve(stream, &e, &s) {
                            Ok(why) => log::info!("NBD client {peer}: closed ({why})"),
                            Err(err) => log::warn!("NBD client {peer}: closed: {err}"),
                        });
                    match spawned {
                        Ok(t) => conns.push(t),
                        Err(e) => log::warn!("cannot start a thread for an NBD client: {e}"),
                    }
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    let mut fds = [PollFd::new(listener.fd(), PollFlags::POLLIN)];
                    let _ = poll(&mut fds, PollTimeout::from(50u16));
                }
                Err(e) => {
                    log::warn!("NBD accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        for c in conns {
            let _ = c.join();
        }
        Ok(())
    }
}

/// Runs one client: handshake, then transmission. Returns why it ended.
fn serve(mut stream: Stream, export: &Export, stop: &AtomicBool) -> Result<String, NbdError> {
    let mut out = Vec::with_capacity(256);
    let mut hs = Handshake::new(export.info.clone(), &mut out);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    stream.write_all(&out)?;
    out.clear();
    let deadline = Instant::now() + export.config.handshake_timeout;
    let mut inbuf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok("server stopping".into());
        }
        if Instant::now() > deadline {
            return Err(NbdError::Protocol("handshake timed out".into()));
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok("client left during the handshake".into()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        inbuf.extend_from_slice(&chunk[..n]);
        let (used, step) = hs
            .feed(&inbuf, &mut out)
            .map_err(|e| NbdError::Protocol(format!("handshake: {e}")))?;
        inbuf.drain(..used);
        stream.write_all(&out)?;
        out.clear();
        match step {
            Step::Continue => {}
            Step::Close(why) => return Ok(why),
            Step::Transmission => break,
        }
    }
    stream.set_read_timeout(None)?;
    stream.set_nonblocking(true)?;
    let mut conn = Conn::new(export);
    let r = conn.run(&mut stream, inbuf, stop);
    stream.shutdown();
    r
}

/// Bytes read from the client and not yet parsed: `buf[start..end]`.
/// Zeroed once; grows only for large write payloads, shrinks back when empty.
struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

const INBUF: usize = 256 * 1024;

impl InBuf {
    fn new(early: Vec<u8>) -> InBuf {
        let end = early.len();
        let mut buf = early;
        buf.resize(end.max(INBUF), 0);
        InBuf { buf, start: 0, end }
    }

    fn data(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > 4 * INBUF {
                self.buf.truncate(INBUF);
                self.buf.shrink_to_fit();
            }
        }
    }

    /// Free space after the data, with room for `need` bytes of data in all.
    fn space_for(&mut self, need: usize) -> &mut [u8] {
        if self.buf.len() - self.start < need.max(INBUF / 4) || self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }
}

enum OutSeg {
    Header([u8; wire::SIMPLE_REPLY_LEN]),
    Data {
        buf: Vec<u8>,
        start: usize,
        end: usize,
    },
}

impl OutSeg {
    fn bytes(&self) -> &[u8] {
        match self {
            OutSeg::Header(h) => h,
            OutSeg::Data { buf, start, end } => buf.get(*start..*end).unwrap_or(&[]),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Trim,
    Zeroes,
}

struct Pending {
    handle: u64,
    kind: Kind,
    remaining: u32,
    error: u32,
    fua: bool,
    flushing: bool,
    /// Reads: the data chunks in order, and which bytes of the aligned
    /// range the client asked for.
    chunks: Vec<Option<Vec<u8>>>,
    skip: usize,
    len: usize,
    chunk_bytes: usize,
    /// Write-zeroes: the block range, and whether to zero it again with
    /// plain writes (WRITE SAME was refused).
    zero: (u64, u64),
    refill: bool,
}

/// Most NBD requests one connection keeps in progress.
const MAX_PENDING: usize = 1024;
/// Buffers kept for reuse per connection.
const POOL: usize = 64;

struct Conn<'a> {
    export: &'a Export,
    q: IoQueue,
    bs: u64,
    size: u64,
    max_io: u64,
    out: VecDeque<OutSeg>,
    out_pos: usize,
    pending: Vec<Option<Pending>>,
    free: Vec<u32>,
    live: usize,
    backlog: VecDeque<Io>,
    pool: Vec<Vec<u8>>,
    comps: Vec<IoCompletion>,
}

fn tag(id: u32, chunk: u32) -> u64 {
    (u64::from(id) << 32) | u64::from(chunk)
}

impl<'a> Conn<'a> {
    fn new(export: &'a Export) -> Conn<'a> {
        let bs = u64::from(export.device.block_size().max(1));
        let max_io = (u64::from(export.config.max_io_bytes) / bs).max(1) * bs;
        Conn {
            export,
            q: export.device.queue_pair(),
            bs,
            size: export.info.size,
            max_io,
            out: VecDeque::new(),
            out_pos: 0,
            pending: Vec::new(),
            free: Vec::new(),
            live: 0,
            backlog: VecDeque::new(),
            pool: Vec::new(),
            comps: Vec::with_capacity(256),
        }
    }

    fn run(
        &mut self,
        s: &mut Stream,
        early: Vec<u8>,
        stop: &AtomicBool,
    ) -> Result<String, NbdError> {
        let max_payload = self.export.config.max_payload;
        let mut inbuf = InBuf::new(early);
        let mut disc = false;
        let mut eof = false;
        let mut idle_rounds = 0u32;
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok("server stopping".into());
            }
            let mut progress = self.submit_backlog();
            // Requests already buffered.
            while !disc && self.backlog.is_empty() && self.live < MAX_PENDING {
                match wire::parse_request(inbuf.data(), max_payload) {
                    Ok(Some((req, payload, n))) => {
                        progress = true;
                        if req.kind == cmd::DISC {
                            disc = true;
                        } else {
                            self.request(req, payload);
                        }
                        inbuf.consume(n);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // Flush what we owe, then close: the stream cannot be framed.
                        let _ = self.write_out(s);
                        return Err(NbdError::Protocol(e.to_string()));
                    }
                }
            }
            progress |= self.collect();
            progress |= self.write_out(s)?;
            // Read more when we can take it.
            if !disc && !eof && self.backlog.is_empty() && self.live < MAX_PENDING {
                let need = match wire::Request::parse(inbuf.data()) {
                    Ok(Some(r)) => wire::REQUEST_LEN + r.payload_len().min(max_payload as usize),
                    _ => wire::REQUEST_LEN,
                };
                let space = inbuf.space_for(need);
                let got = if space.is_empty() {
                    Err(std::io::Error::from(ErrorKind::WouldBlock))
                } else {
                    s.read(space)
                };
                match got {
                    Ok(0) => eof = true,
                    Ok(n) => {
                        inbuf.filled(n);
                        progress = true;
                    }
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if (disc || eof) && self.live == 0 && self.backlog.is_empty() && self.out.is_empty() {
                let pending_bytes = inbuf.data().len();
                return Ok(if disc {
                    "client disconnected (NBD_CMD_DISC)".into()
                } else if pending_bytes > 0 {
                    format!("client closed the socket mid-request ({pending_bytes} bytes unparsed)")
                } else {
                    "client closed the socket".into()
                });
            }
            if progress {
                idle_rounds = 0;
                continue;
            }
            idle_rounds = idle_rounds.saturating_add(1);
            if self.q.in_flight() > 0 || !self.backlog.is_empty() {
                // I/O in flight: poll the queue (spin, then yield, then nap).
                if idle_rounds < 64 {
                    std::hint::spin_loop();
                } else if idle_rounds < 1024 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(20));
                }
            } else {
                let mut flags = PollFlags::empty();
                if !disc && !eof {
                    flags |= PollFlags::POLLIN;
                }
                if !self.out.is_empty() {
                    flags |= PollFlags::POLLOUT;
                }
                let mut fds = [PollFd::new(s.fd(), flags)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
        }
    }

    fn take_buf(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    fn give_buf(&mut self, mut b: Vec<u8>) {
        if self.pool.len() < POOL && b.capacity() > 0 {
            b.clear();
            self.pool.push(b);
        }
    }

    fn reply_now(&mut self, handle: u64, error: u32) {
        self.export.stats.requests.fetch_add(1, Ordering::Relaxed);
        if error != 0 {
            self.export.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.out
            .push_back(OutSeg::Header(wire::simple_reply(error, handle)));
    }

    fn new_pending(&mut self, p: Pending) -> u32 {
        self.live += 1;
        match self.free.pop() {
            Some(id) => {
                self.pending[id as usize] = Some(p);
                id
            }
            None => {
                self.pending.push(Some(p));
                (self.pending.len() - 1) as u32
            }
        }
    }

    fn pending_for(&mut self, handle: u64, kind: Kind, fua: bool) -> u32 {
        self.new_pending(Pending {
            handle,
            kind,
            remaining: 0,
            error: 0,
            fua,
            flushing: false,
            chunks: Vec::new(),
            skip: 0,
            len: 0,
            chunk_bytes: 0,
            zero: (0, 0),
            refill: false,
        })
    }

    fn request(&mut self, r: Request, payload: &[u8]) {
        let end = r.offset.checked_add(u64::from(r.length));
        let in_range = end.is_some_and(|e| e <= self.size);
        let fua = r.flags & cflags::FUA != 0;
        let ro = self.export.config.read_only;
        match r.kind {
            cmd::READ => {
                if !in_range || r.length > self.export.config.max_payload {
                    return self.reply_now(r.handle, errno::EINVAL);
                }
                if r.length == 0 {
                    return self.reply_now(r.handle, 0);
                }
                self.read(r);
            }
            cmd::WRITE => {
                if ro {
                    return self.reply_now(r.handle, errno::EPERM);
                }
                if !in_range {
                    return self.reply_now(r.handle, errno::ENOSPC);
                }
                if r.length == 0 {
                    return self.reply_now(r.handle, 0);
                }
                self.write(r, payload, fua);
            }
            cmd::FLUSH => {
                let id = self.pending_for(r.handle, Kind::Flush, false);
                self.push_io(id, Io::flush(tag(id, 0)));
            }
            cmd::TRIM => {
                if ro {
                    return self.reply_now(r.handle, errno::EPERM);
                }
                if !in_range {
                    return self.reply_now(r.handle, errno::EINVAL);
                }
                // Advisory: only whole blocks inside the range.
                let first = r.offset.div_ceil(self.bs);
                let last = (r.offset + u64::from(r.length)) / self.bs;
                let id = self.pending_for(r.handle, Kind::Trim, fua);
                let mut lba = first;
                while lba < last {
                    let n = (last - lba).min(1 << 22) as u32;
                    let io = Io::unmap(lba, n, self.take_buf(), tag(id, 0));
                    self.push_io(id, io);
                    lba += u64::from(n);
                }
                self.maybe_done(id);
            }
            cmd::WRITE_ZEROES => {
                if ro {
                    return self.reply_now(r.handle, errno::EPERM);
                }
                if !in_range {
                    return self.reply_now(r.handle, errno::ENOSPC);
                }
                self.write_zeroes(r, fua);
            }
            _ => self.reply_now(r.handle, errno::EINVAL),
        }
    }

    fn push_io(&mut self, id: u32, io: Io) {
        if let Some(Some(p)) = self.pending.get_mut(id as usize) {
            p.remaining += 1;
        }
        self.backlog.push_back(io);
    }

    fn read(&mut self, r: Request) {
        let bs = self.bs;
        let a0 = r.offset / bs * bs;
        let a1 = (r.offset + u64::from(r.length)).div_ceil(bs) * bs;
        let nchunks = (a1 - a0).div_ceil(self.max_io) as usize;
        let id = self.new_pending(Pending {
            handle: r.handle,
            kind: Kind::Read,
            remaining: 0,
            error: 0,
            fua: false,
            flushing: false,
            chunks: (0..nchunks).map(|_| None).collect(),
            skip: (r.offset - a0) as usize,
            len: r.length as usize,
            chunk_bytes: self.max_io as usize,
            zero: (0, 0),
            refill: false,
        });
        let mut at = a0;
        let mut i = 0u32;
        while at < a1 {
            let n = (a1 - at).min(self.max_io);
            let io = Io::read(at / bs, (n / bs) as u32, self.take_buf(), tag(id, i));
            self.push_io(id, io);
            at += n;
            i += 1;
        }
    }

    fn write(&mut self, r: Request, payload: &[u8], fua: bool) {
        let bs = self.bs;
        if !r.offset.is_multiple_of(bs) || !(payload.len() as u64).is_multiple_of(bs) {
            // Partial blocks: read-modify-write, synchronously and
            // serialised with other partial writes (clients that asked for
            // the block size never send these).
            let e = self.rmw(r.offset, payload, fua);
            return self.reply_now(r.handle, e);
        }
        let id = self.pending_for(r.handle, Kind::Write, fua);
        for (i, c) in payload.chunks(self.max_io as usize).enumerate() {
            let mut b = self.take_buf();
            b.extend_from_slice(c);
            let lba = r.offset / bs + (i as u64 * self.max_io) / bs;
            // FUA maps to the WRITE's own FUA bit: no flush afterwards.
            let io = Io::write_durable(lba, (c.len() as u64 / bs) as u32, b, fua, tag(id, 0));
            self.push_io(id, io);
        }
    }

    fn write_zeroes(&mut self, r: Request, fua: bool) {
        let bs = self.bs;
        let end = r.offset + u64::from(r.length);
        let first = r.offset.div_ceil(bs);
        let last = end / bs;
        if first >= last {
            // No whole block inside: read-modify-write the bytes.
            let e = self.rmw_zero(r.offset, u64::from(r.length), fua);
            return self.reply_now(r.handle, e);
        }
        let head = first * bs - r.offset;
        let tail = end - last * bs;
        for (at, n) in [(r.offset, head), (last * bs, tail)] {
            if n > 0 {
                let e = self.rmw_zero(at, n, false);
                if e != 0 {
                    return self.reply_now(r.handle, e);
                }
            }
        }
        let id = self.pending_for(r.handle, Kind::Zeroes, fua);
        if let Some(Some(p)) = self.pending.get_mut(id as usize) {
            p.zero = (first, last);
        }
        self.zero_range(id, first, last);
    }

    /// Queues zeroing of blocks `first..last` (WRITE SAME, or zero writes
    /// where the target refuses WRITE SAME).
    fn zero_range(&mut self, id: u32, first: u64, last: u64) {
        let bs = self.bs;
        let ws = !self.export.no_write_same.load(Ordering::Relaxed);
        let step = if ws {
            (self.max_io / bs) * 16
        } else {
            self.max_io / bs
        };
        let mut lba = first;
        while lba < last {
            let n = (last - lba).min(step);
            let mut b = self.take_buf();
            b.resize((if ws { bs } else { n * bs }) as usize, 0);
            b.fill(0);
            let io = Io {
                op: if ws { IoOp::WriteSame } else { IoOp::Write },
                lba,
                blocks: n as u32,
                buffer: b,
                user_tag: tag(id, 0),
            };
            self.push_io(id, io);
            lba += n;
        }
    }

    fn rmw_zero(&mut self, offset: u64, len: u64, fua: bool) -> u32 {
        let zeros = vec![0u8; len as usize];
        self.rmw(offset, &zeros, fua)
    }

    /// Synchronous read-modify-write of `data` at a byte offset; returns
    /// an NBD errno (0 on success).
    fn rmw(&mut self, offset: u64, data: &[u8], fua: bool) -> u32 {
        let len = data.len() as u64;
        if len == 0 {
            return 0;
        }
        let bs = self.bs;
        let a0 = offset / bs * bs;
        let a1 = (offset + len).div_ceil(bs) * bs;
        let _guard = self.export.rmw.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = vec![0u8; (a1 - a0) as usize];
        let head_partial = !offset.is_multiple_of(bs);
        let tail_partial = !(offset + len).is_multiple_of(bs);
        let r = (|| -> Result<(), IoError> {
            if head_partial {
                self.q.read_at(a0 / bs, &mut buf[..bs as usize])?;
            }
            if tail_partial && (a1 - bs > a0 || !head_partial) {
                let at = (a1 - a0 - bs) as usize;
                self.q.read_at((a1 - bs) / bs, &mut buf[at..])?;
            }
            let at = (offset - a0) as usize;
            buf[at..at + data.len()].copy_from_slice(data);
            for (i, c) in buf.chunks(self.max_io as usize).enumerate() {
                self.q
                    .write_at_durable(a0 / bs + (i as u64 * self.max_io) / bs, c, fua)?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => 0,
            Err(e) => {
                log::warn!("NBD partial-block write at byte {offset}: {e}");
                errno_for(&e)
            }
        }
    }

    fn submit_backlog(&mut self) -> bool {
        let mut any = false;
        while let Some(io) = self.backlog.pop_front() {
            match self.q.submit(io) {
                Ok(()) => any = true,
                Err(SubmitError::QueueFull(io)) => {
                    self.backlog.push_front(io);
                    break;
                }
                Err(e) => {
                    any = true;
                    let (error, io) = match e {
                        SubmitError::Invalid { error, io } => (error, io),
                        other => (IoError::Closed, other.into_io()),
                    };
                    self.done(io.user_tag, io.op, Err(error), io.buffer);
                }
            }
        }
        any
    }

    fn collect(&mut self) -> bool {
        let mut comps = std::mem::take(&mut self.comps);
        self.q.poll_completions(&mut comps);
        let any = !comps.is_empty();
        for c in comps.drain(..) {
            self.done(c.user_tag, c.op, c.result, c.buffer);
        }
        self.comps = comps;
        any
    }

    fn done(&mut self, tag: u64, op: IoOp, result: Result<(), IoError>, buffer: Vec<u8>) {
        let id = (tag >> 32) as u32;
        let chunk = (tag & 0xffff_ffff) as usize;
        let Some(Some(p)) = self.pending.get_mut(id as usize) else {
            return self.give_buf(buffer);
        };
        p.remaining = p.remaining.saturating_sub(1);
        let mut spare = Some(buffer);
        match result {
            Ok(()) => {
                if p.kind == Kind::Read {
                    if let Some(slot) = p.chunks.get_mut(chunk) {
                        *slot = spare.take();
                    }
                }
            }
            Err(e) => {
                if p.kind == Kind::Trim && is_illegal_request(&e) {
                    // The target cannot unmap: a discard is only advice.
                } else if op == IoOp::WriteSame && is_illegal_request(&e) {
                    // No WRITE SAME: zero the range with plain writes.
                    self.export.no_write_same.store(true, Ordering::Relaxed);
                    // Zero the whole range again once the rest is back.
                    p.refill = true;
                } else {
                    log::warn!("NBD {op:?} failed: {e}");
                    if p.error == 0 {
                        p.error = errno_for(&e);
                    }
                }
            }
        }
        if let Some(b) = spare {
            self.give_buf(b);
        }
        self.maybe_done(id);
    }

    fn maybe_done(&mut self, id: u32) {
        let Some(Some(p)) = self.pending.get_mut(id as usize) else {
            return;
        };
        if p.remaining > 0 {
            return;
        }
        if p.refill {
            p.refill = false;
            let (first, last) = p.zero;
            self.zero_range(id, first, last);
            return;
        }
        // Writes carried FUA themselves; trims and zeroes (UNMAP, WRITE
        // SAME have no FUA bit) are made durable with a flush.
        if p.fua && !p.flushing && p.error == 0 && !matches!(p.kind, Kind::Read | Kind::Write) {
            p.flushing = true;
            self.push_io(id, Io::flush(tag(id, 0)));
            return;
        }
        let Some(p) = self.pending[id as usize].take() else {
            return;
        };
        self.free.push(id);
        self.live -= 1;
        self.reply_now(p.handle, p.error);
        if p.kind != Kind::Read {
            return;
        }
        let (skip, len, cb) = (p.skip, p.len, p.chunk_bytes);
        for (i, c) in p.chunks.into_iter().enumerate() {
            let Some(buf) = c else { continue };
            if p.error != 0 {
                self.give_buf(buf);
                continue;
            }
            let cs = i * cb;
            let ce = cs + buf.len();
            let s = skip.max(cs);
            let e = (skip + len).min(ce);
            if s < e {
                self.out.push_back(OutSeg::Data {
                    buf,
                    start: s - cs,
                    end: e - cs,
                });
            } else {
                self.give_buf(buf);
            }
        }
    }

    /// Writes queued replies; `Ok(true)` when some bytes went out.
    fn write_out(&mut self, s: &mut Stream) -> Result<bool, NbdError> {
        let mut any = false;
        while !self.out.is_empty() {
            let mut slices = [std::io::IoSlice::new(&[]); 16];
            let mut n = 0;
            for (i, seg) in self.out.iter().take(16).enumerate() {
                let b = seg.bytes();
                slices[i] = std::io::IoSlice::new(if i == 0 {
                    b.get(self.out_pos..).unwrap_or(&[])
                } else {
                    b
                });
                n = i + 1;
            }
            match s.write_vectored(&slices[..n]) {
                Ok(0) => return Err(NbdError::Protocol("socket closed while replying".into())),
                Ok(mut w) => {
                    any = true;
                    while w > 0 {
                        let Some(front) = self.out.front() else { break };
                        let left = front.bytes().len() - self.out_pos;
                        if w >= left {
                            w -= left;
                            self.out_pos = 0;
                            if let Some(OutSeg::Data { buf, .. }) = self.out.pop_front() {
                                self.give_buf(buf);
                            }
                        } else {
                            self.out_pos += w;
                            w = 0;
                        }
                    }
                    // Drop empty segments (zero-length data).
                    while self
                        .out
                        .front()
                        .is_some_and(|f| f.bytes().len() == self.out_pos && self.out_pos == 0)
                    {
                        if let Some(OutSeg::Data { buf, .. }) = self.out.pop_front() {
                            self.give_buf(buf);
                        }
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    break
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(any)
    }
}

fn sense_of(e: &IoError) -> Option<&crate::wire::scsi::SenseData> {
    match e {
        IoError::Scsi(ScsiError::CheckCondition { sense })
        | IoError::RetriesExhausted {
            last: ScsiError::CheckCondition { sense },
            ..
        } => Some(sense),
        _ => None,
    }
}

fn is_illegal_request(e: &IoError) -> bool {
    sense_of(e).is_some_and(|s| s.key == SenseKey::IllegalRequest)
}

/// The NBD errno for a failed I/O.
pub fn errno_for(e: &IoError) -> u32 {
    match e {
        IoError::OutOfRange { .. } | IoError::BadBuffer { .. } => errno::EINVAL,
        IoError::Closed => errno::ESHUTDOWN,
        _ => match sense_of(e) {
            Some(s) => match (s.key, s.asc, s.ascq) {
                (SenseKey::DataProtect, _, _) => errno::EPERM,
                (_, 0x27, 0x07) => errno::ENOSPC,
                (SenseKey::IllegalRequest, 0x21, _) => errno::ENOSPC,
                (SenseKey::IllegalRequest, 0x20, _) => errno::ENOTSUP,
                (SenseKey::IllegalRequest, _, _) => errno::EINVAL,
                _ => errno::EIO,
            },
            None => errno::EIO,
        },
    }
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> NbdError {
        NbdError::Io(e)
    }
}

impl From<WireError> for NbdError {
    fn from(e: WireError) -> NbdError {
        NbdError::Protocol(e.to_string())
    }
}
