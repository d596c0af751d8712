//! The NBD server runtime: a listener thread accepting clients (TCP or a
//! Unix socket) and connection threads, each serving one client at a time:
//! started as clients come, at most `max_clients`, and kept, idle, for the
//! next client until the server stops (so a stream of short connections
//! starts no threads; see `threads`). Each connection owns
//! one [`IoQueue`] of the shared [`WorkerDevice`], reads pipelined
//! requests from a non-blocking socket, submits them without waiting, and
//! writes replies as the I/Os complete (in completion order, as NBD allows).

use super::handshake::{ExportInfo, Handshake, Step, TlsPolicy};
use super::pool::BufPool;
use super::threads::{ConnThreads, NotRun};
use super::tls::{TlsConfig, TlsSession};
use super::wire::{self, cflags, cmd, errno, tflags, Request, WireError};
use super::NbdError;
use crate::multipath::{Io, IoCompletion, IoError, IoOp, LuCaps};
use crate::scsi::{Feature, ScsiError};
use crate::wire::scsi::SenseKey;
use crate::worker::{IoQueue, SubmitError, WorkerDevice};
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
    /// How long a client has to finish the handshake (TLS included).
    pub handshake_timeout: Duration,
    /// TLS (`NBD_OPT_STARTTLS`); `None` serves plaintext only.
    pub tls: Option<TlsConfig>,
    /// Most clients connected at once; more are closed on accept.
    pub max_clients: usize,
    /// Most bytes one client may hold in the server: data of requests in
    /// progress plus replies it has not read yet. Past this the server
    /// stops reading its requests until it catches up (one request of up
    /// to `max_payload` is always taken).
    pub max_buffered_bytes: usize,
}

impl Default for ExportConfig {
    fn default() -> ExportConfig {
        ExportConfig {
            name: "iscsi-bypass".into(),
            description: "multipath iSCSI LU served by iscsi-bypass".into(),
            read_only: false,
            max_payload: 32 << 20,
            max_io_bytes: 1 << 20,
            handshake_timeout: Duration::from_secs(10),
            tls: None,
            max_clients: 32,
            max_buffered_bytes: 64 << 20,
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

/// A client connection: the socket, and TLS over it after `STARTTLS`.
struct Wire {
    sock: Stream,
    tls: Option<TlsSession>,
}

impl Wire {
    fn fd(&self) -> BorrowedFd<'_> {
        self.sock.fd()
    }

    /// Encrypted bytes waiting for the socket (never for plaintext).
    fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(TlsSession::wants_write)
    }

    fn flush_tls(&mut self) -> std::io::Result<bool> {
        match &mut self.tls {
            None => Ok(false),
            Some(t) => t.flush_tls(&mut self.sock),
        }
    }

    /// Ends TLS (close_notify) and shuts the socket down; a second call
    /// only repeats the shutdown.
    fn close(&mut self) {
        if let Some(mut t) = self.tls.take() {
            t.close(&mut self.sock);
        }
        self.sock.shutdown();
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.tls {
            None => self.sock.read(buf),
            Some(t) => t.read(&mut self.sock, buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match &mut self.tls {
            None => self.sock.write_vectored(bufs),
            Some(t) => t.write_vectored(&mut self.sock, bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Refuses to serve the LU in plaintext beyond this host by mistake: a TCP
/// listener on a non-loopback address needs TLS with
/// [`TlsPolicy::Require`], unless `insecure_plaintext` says the network is
/// trusted. Unix sockets and loopback addresses always pass.
pub fn check_exposure(
    addr: SocketAddr,
    tls: Option<&TlsConfig>,
    insecure_plaintext: bool,
) -> Result<(), NbdError> {
    let ip = addr.ip().to_canonical();
    if ip.is_loopback() || insecure_plaintext {
        return Ok(());
    }
    let why = match tls.map(|t| t.policy) {
        Some(TlsPolicy::Require) => return Ok(()),
        Some(_) => "--tls allow still serves clients that do not start TLS",
        None => "there is no TLS",
    };
    Err(NbdError::Insecure(format!(
        "refusing to serve NBD on {addr} in plaintext ({why}): {ip} is not a loopback address, \
         so anyone who can reach it could read and write the whole LU. Add --tls-cert FILE \
         --tls-key FILE (and --tls require), or --insecure-plaintext if this network is trusted"
    )))
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
    /// Clients connected now (handshake or transmission).
    pub active: AtomicU64,
    /// Connections closed on accept because `max_clients` were connected.
    pub refused: AtomicU64,
    /// TLS sessions established.
    pub tls_sessions: AtomicU64,
    /// Connections closed for a failed or timed-out handshake (TLS included).
    pub handshake_failures: AtomicU64,
    /// Most bytes any one client has held in the server
    /// (see [`ExportConfig::max_buffered_bytes`]).
    pub peak_buffered: AtomicU64,
    /// Connection threads started: they serve one client at a time and
    /// wait for the next, so this is the most clients ever connected at
    /// once (at most [`ExportConfig::max_clients`]), not the connections.
    pub threads: AtomicU64,
}

/// What every connection of one export shares (the device is passed
/// separately: a connection only sees its own [`BlockQueue`]).
struct Export {
    config: ExportConfig,
    info: ExportInfo,
    /// Serialises read-modify-write of partial blocks across connections.
    rmw: Mutex<()>,
    /// WRITE SAME was refused once: zero writes from then on.
    no_write_same: AtomicBool,
    stats: Arc<ServerStats>,
    /// The LU's commands and Block Limits: requests are cut to fit them.
    caps: LuCaps,
    /// Data buffers of every connection (at most `max_buffered_bytes` of
    /// free ones are kept): large buffers are allocated once per export, not
    /// once per connection.
    pool: BufPool,
    /// Device queues of closed connections, idle, for the next ones (at
    /// most `max_clients`): a connection does not set up and tear down a
    /// queue on every path worker.
    queues: Mutex<Vec<IoQueue>>,
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

fn export_info(device: &WorkerDevice, config: &ExportConfig) -> ExportInfo {
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
    /// Serves `device` on `listener` until `stop` is set. A thread per
    /// connected client, kept for the next client when it closes (at most
    /// `max_clients`); returns after every connection thread has ended.
    pub fn run(
        device: Arc<WorkerDevice>,
        config: ExportConfig,
        listener: Listener,
        stop: Arc<AtomicBool>,
    ) -> Result<(), NbdError> {
        Self::run_with_stats(device, config, listener, stop, Arc::default())
    }

    /// Starts [`run`](Self::run) in a background thread.
    pub fn spawn(
        device: Arc<WorkerDevice>,
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
        device: Arc<WorkerDevice>,
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
        if config.max_clients == 0 || config.max_buffered_bytes == 0 {
            return Err(NbdError::Config(
                "max_clients and max_buffered_bytes must be positive".into(),
            ));
        }
        listener
            .set_nonblocking()
            .map_err(|e| NbdError::Bind(listener.uri(), e))?;
        let info = export_info(&device, &config);
        let caps = device.caps().clone();
        // No WRITE SAME of either size: zero with plain writes from the start.
        let no_ws = !caps.commands.supports(Feature::WriteSame16)
            && !caps.commands.supports(Feature::WriteSame10);
        let export = Arc::new(Export {
            pool: BufPool::new(config.max_buffered_bytes),
            queues: Mutex::new(Vec::new()),
            config,
            info,
            rmw: Mutex::new(()),
            no_write_same: AtomicBool::new(no_ws),
            stats,
            caps,
        });
        log::info!(
            "NBD export serving {} ({} bytes)",
            listener.uri(),
            export.info.size
        );
        // Connections are served by at most `max_clients` long-lived
        // threads (see `threads`): a closed connection's thread waits for
        // the next client instead of ending.
        let (e, s, d) = (export.clone(), stop.clone(), device.clone());
        let mut threads = ConnThreads::new(
            "nbd-conn",
            export.config.max_clients,
            move |(stream, peer): (Stream, String)| {
                match serve(stream, &e, &d, &s) {
                    Ok(why) => log::info!(
                        "NBD client {peer}: closed ({why}); buffers: {} KiB, {} KiB free",
                        e.pool.owned_bytes() >> 10,
                        e.pool.held_bytes() >> 10
                    ),
                    Err(NbdError::Stopping) => {
                        log::info!("NBD client {peer}: closed (server stopping)")
                    }
                    Err(err) => log::warn!("NBD client {peer}: closed: {err}"),
                }
                e.stats.active.fetch_sub(1, Ordering::Relaxed);
            },
        );
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let active = export.stats.active.load(Ordering::Relaxed);
                    if active >= export.config.max_clients as u64 {
                        export.stats.refused.fetch_add(1, Ordering::Relaxed);
                        log::warn!(
                            "NBD client {peer}: refused, {active} clients are connected (the \
                             limit; raise it with --max-clients)"
                        );
                        stream.shutdown();
                        continue;
                    }
                    export.stats.connections.fetch_add(1, Ordering::Relaxed);
                    export.stats.active.fetch_add(1, Ordering::Relaxed);
                    let mut job = (stream, peer);
                    // Fewer than `max_clients` are connected, so a thread
                    // that is all but idle (its client's count is gone, it
                    // has not yet asked for the next) is at most a moment
                    // away: wait for it rather than refuse.
                    let deadline = Instant::now() + Duration::from_secs(2);
                    let refused = loop {
                        match threads.run(job) {
                            Ok(()) => break None,
                            Err(NotRun::Busy(j)) if Instant::now() < deadline => {
                                job = j;
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            Err(NotRun::Busy(j)) => {
                                break Some((j, "every connection thread is busy".to_string()))
                            }
                            Err(NotRun::Spawn(j, err)) => {
                                break Some((j, format!("cannot start a thread: {err}")))
                            }
                        }
                    };
                    export
                        .stats
                        .threads
                        .store(threads.started() as u64, Ordering::Relaxed);
                    if let Some(((stream, peer), why)) = refused {
                        export.stats.active.fetch_sub(1, Ordering::Relaxed);
                        export.stats.refused.fetch_add(1, Ordering::Relaxed);
                        log::warn!("NBD client {peer}: refused ({why})");
                        stream.shutdown();
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
        threads.join();
        Ok(())
    }
}

/// Runs one client: handshake, then transmission. Returns why it ended.
fn serve(
    stream: Stream,
    export: &Export,
    device: &WorkerDevice,
    stop: &AtomicBool,
) -> Result<String, NbdError> {
    stream.set_nonblocking(true)?;
    let mut wire = Wire {
        sock: stream,
        tls: None,
    };
    let r = match handshake(&mut wire, export, stop) {
        Ok(Ok(early)) => {
            let idle = export
                .queues
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop();
            let mut q = idle.unwrap_or_else(|| device.queue_pair());
            let r = Conn::new(export, &mut q).run(&mut wire, early, stop);
            wire.close();
            put_back_queue(export, q, stop);
            r
        }
        Ok(Err(why)) => Ok(why),
        Err(e) => {
            if !matches!(e, NbdError::Stopping) {
                export
                    .stats
                    .handshake_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
        }
    };
    wire.close();
    r
}

/// Keeps a closed connection's queue for the next one, once the I/Os it
/// still has in flight are back (their buffers go to the pool). A queue
/// that does not drain in time, or past `max_clients` idle ones, is dropped.
fn put_back_queue(export: &Export, mut q: IoQueue, stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut comps = Vec::new();
    while q.in_flight() > 0 {
        if stop.load(Ordering::Acquire) || Instant::now() > deadline {
            return;
        }
        if q.poll_completions(&mut comps) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for c in comps.drain(..) {
            export.pool.give(c.buffer);
        }
    }
    let mut idle = export.queues.lock().unwrap_or_else(|e| e.into_inner());
    if idle.len() < export.config.max_clients {
        idle.push(q);
    }
}

/// Waits until `wire` is readable (or writable, when `out` or TLS bytes
/// wait), the handshake deadline passes, or the server stops.
fn wait_handshake(
    wire: &Wire,
    want_out: bool,
    deadline: Instant,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<(), NbdError> {
    if stop.load(Ordering::Acquire) {
        return Err(NbdError::Stopping);
    }
    let now = Instant::now();
    if now >= deadline {
        return Err(NbdError::Protocol(format!(
            "handshake not finished within {} s (the handshake timeout)",
            limit.as_secs_f64()
        )));
    }
    let mut flags = PollFlags::POLLIN;
    if want_out || wire.wants_write() {
        flags |= PollFlags::POLLOUT;
    }
    let ms = (deadline - now).as_millis().clamp(1, 200) as u16;
    let mut fds = [PollFd::new(wire.fd(), flags)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
    Ok(())
}

/// Sends handshake bytes on the non-blocking `wire`, within the deadline.
fn send_handshake(
    wire: &mut Wire,
    mut bytes: &[u8],
    deadline: Instant,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<(), NbdError> {
    loop {
        if !bytes.is_empty() {
            match wire.write(bytes) {
                Ok(0) => return Err(NbdError::Protocol("socket closed in the handshake".into())),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e.into()),
            }
        }
        wire.flush_tls()?;
        if bytes.is_empty() && !wire.wants_write() {
            return Ok(());
        }
        wait_handshake(wire, true, deadline, limit, stop)?;
    }
}

/// The option haggling (and TLS, when the client starts it). `Ok(Ok(bytes))`
/// enters transmission with `bytes` already read; `Ok(Err(why))` is a
/// clean close.
fn handshake(
    wire: &mut Wire,
    export: &Export,
    stop: &AtomicBool,
) -> Result<Result<Vec<u8>, String>, NbdError> {
    let tls = export.config.tls.as_ref();
    let policy = tls.map_or(TlsPolicy::Off, |t| t.policy);
    let limit = export.config.handshake_timeout;
    let deadline = Instant::now() + limit;
    let mut out = Vec::with_capacity(256);
    let mut hs = Handshake::with_tls(export.info.clone(), policy, &mut out);
    send_handshake(wire, &out, deadline, limit, stop)?;
    out.clear();
    let mut inbuf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let (used, step) = hs
            .feed(&inbuf, &mut out)
            .map_err(|e| NbdError::Protocol(format!("handshake: {e}")))?;
        inbuf.drain(..used);
        send_handshake(wire, &out, deadline, limit, stop)?;
        out.clear();
        match step {
            Step::Continue => {}
            Step::Close(why) => return Ok(Err(why)),
            Step::Transmission => return Ok(Ok(inbuf)),
            Step::StartTls => {
                let Some(tls) = tls.filter(|_| wire.tls.is_none()) else {
                    return Err(NbdError::Protocol("STARTTLS twice".into()));
                };
                wire.tls = Some(TlsSession::new(tls.session()?, &inbuf)?);
                inbuf.clear();
                if !tls_handshake(wire, &mut inbuf, deadline, limit, stop)? {
                    return Ok(Err("client left during the TLS handshake".into()));
                }
                hs.tls_started();
                export.stats.tls_sessions.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        match wire.read(&mut chunk) {
            Ok(0) => return Ok(Err("client left during the handshake".into())),
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                wait_handshake(wire, false, deadline, limit, stop)?
            }
            Err(e) if e.kind() == ErrorKind::InvalidData => {
                return Err(NbdError::Tls(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the TLS handshake to its end; decrypted bytes that follow it go to
/// `inbuf`. `Ok(false)`: the client closed the connection.
fn tls_handshake(
    wire: &mut Wire,
    inbuf: &mut Vec<u8>,
    deadline: Instant,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<bool, NbdError> {
    let mut chunk = [0u8; 4096];
    loop {
        match wire.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => inbuf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(NbdError::Tls(format!("handshake failed: {e}"))),
        }
        wire.flush_tls()?;
        if !wire.tls.as_ref().is_some_and(TlsSession::is_handshaking) {
            return Ok(true);
        }
        if let Err(e) = wait_handshake(wire, false, deadline, limit, stop) {
            return Err(match e {
                NbdError::Protocol(why) => NbdError::Tls(why),
                other => other,
            });
        }
    }
}

/// Bytes read from the client and not yet parsed: `buf[start..end]`.
/// Its buffer comes from the export's pool (and goes back there); it grows
/// only for large write payloads and shrinks back when empty.
struct InBuf<'p> {
    pool: &'p BufPool,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

const INBUF: usize = 256 * 1024;

impl<'p> InBuf<'p> {
    fn new(pool: &'p BufPool, early: &[u8]) -> InBuf<'p> {
        let mut buf = pool.take(INBUF.max(early.len()));
        buf.extend_from_slice(early);
        buf.resize(buf.capacity(), 0);
        InBuf {
            pool,
            buf,
            start: 0,
            end: early.len(),
        }
    }

    /// Moves the data into a pool buffer of room for `len` bytes and gives
    /// the old buffer back.
    fn move_to(&mut self, len: usize) {
        let mut b = self.pool.take(len.max(self.end - self.start));
        b.extend_from_slice(&self.buf[self.start..self.end]);
        b.resize(b.capacity(), 0);
        self.end -= self.start;
        self.start = 0;
        self.pool.give(std::mem::replace(&mut self.buf, b));
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
                self.move_to(INBUF);
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
            self.move_to(need);
        }
        &mut self.buf[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }
}

impl Drop for InBuf<'_> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
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
    /// Write-zeroes: the next block to queue (zeroing goes out in batches
    /// of at most `ZERO_BATCH_BYTES` of buffers).
    zero_next: u64,
    /// Request data bytes this request holds (reads and writes).
    held: usize,
}

/// What a connection needs from the device: one queue of it. The export
/// uses an [`IoQueue`]; tests drive [`Conn`] over a queue in memory.
trait BlockQueue {
    fn submit(&mut self, io: Io) -> Result<(), SubmitError>;
    fn poll_completions(&mut self, out: &mut Vec<IoCompletion>) -> usize;
    fn in_flight(&self) -> usize;
    fn read_at(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError>;
    fn write_at_durable(&mut self, lba: u64, data: &[u8], durable: bool) -> Result<(), IoError>;
}

impl<T: BlockQueue> BlockQueue for &mut T {
    fn submit(&mut self, io: Io) -> Result<(), SubmitError> {
        T::submit(self, io)
    }
    fn poll_completions(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        T::poll_completions(self, out)
    }
    fn in_flight(&self) -> usize {
        T::in_flight(self)
    }
    fn read_at(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        T::read_at(self, lba, buf)
    }
    fn write_at_durable(&mut self, lba: u64, data: &[u8], durable: bool) -> Result<(), IoError> {
        T::write_at_durable(self, lba, data, durable)
    }
}

impl BlockQueue for IoQueue {
    fn submit(&mut self, io: Io) -> Result<(), SubmitError> {
        IoQueue::submit(self, io)
    }
    fn poll_completions(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        IoQueue::poll_completions(self, out)
    }
    fn in_flight(&self) -> usize {
        IoQueue::in_flight(self)
    }
    fn read_at(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        IoQueue::read_at(self, lba, buf)
    }
    fn write_at_durable(&mut self, lba: u64, data: &[u8], durable: bool) -> Result<(), IoError> {
        IoQueue::write_at_durable(self, lba, data, durable)
    }
}

/// Most NBD requests one connection keeps in progress.
const MAX_PENDING: usize = 1024;
/// Most buffer bytes one write-zeroes request has queued at a time (zero
/// writes, where the target refuses WRITE SAME, need a buffer per block).
const ZERO_BATCH_BYTES: u64 = 8 << 20;

/// One client in transmission, sans-IO: bytes in ([`Conn::take_requests`]),
/// I/Os to the queue and back ([`Conn::pump`]), reply bytes out
/// ([`Conn::write_out`] into any `Write`). [`Conn::run`] drives it over the
/// client's socket.
struct Conn<'a, Q: BlockQueue> {
    export: &'a Export,
    q: Q,
    /// The client sent NBD_CMD_DISC: take no more requests.
    disc: bool,
    bs: u64,
    size: u64,
    max_io: u64,
    out: VecDeque<OutSeg>,
    out_pos: usize,
    pending: Vec<Option<Pending>>,
    free: Vec<u32>,
    live: usize,
    backlog: VecDeque<Io>,
    comps: Vec<IoCompletion>,
    /// Bytes held for the client: data of requests in progress plus
    /// replies not yet written (bounded by `max_buffered_bytes`).
    held: usize,
    /// The highest `held` published to the stats so far.
    peak_held: usize,
}

fn tag(id: u32, chunk: u32) -> u64 {
    (u64::from(id) << 32) | u64::from(chunk)
}

impl<'a, Q: BlockQueue> Conn<'a, Q> {
    fn new(export: &'a Export, q: Q) -> Conn<'a, Q> {
        let bs = u64::from(export.info.min_block.max(1));
        // At most the LU's MAXIMUM TRANSFER LENGTH per command.
        let max_blocks = (u64::from(export.config.max_io_bytes) / bs)
            .min(u64::from(export.caps.limits.io_chunk_blocks()))
            .max(1);
        let max_io = max_blocks * bs;
        Conn {
            export,
            q,
            disc: false,
            bs,
            size: export.info.size,
            max_io,
            out: VecDeque::new(),
            out_pos: 0,
            pending: Vec::new(),
            free: Vec::new(),
            live: 0,
            backlog: VecDeque::new(),
            comps: Vec::with_capacity(256),
            held: 0,
            peak_held: 0,
        }
    }

    /// Whether the connection takes more requests now (none pending in the
    /// backlog, room in the request table and in the buffer cap).
    fn wants_requests(&self) -> bool {
        !self.disc && self.backlog.is_empty() && self.live < MAX_PENDING && self.has_room()
    }

    /// Parses and starts the requests buffered in `inbuf`, as far as
    /// [`wants_requests`](Self::wants_requests) allows. `Ok(true)` when
    /// some were taken; an error means the stream cannot be framed.
    fn take_requests(&mut self, inbuf: &mut InBuf) -> Result<bool, WireError> {
        let max_payload = self.export.config.max_payload;
        let mut progress = false;
        while self.wants_requests() {
            let Some((req, payload, n)) = wire::parse_request(inbuf.data(), max_payload)? else {
                break;
            };
            progress = true;
            if req.kind == cmd::DISC {
                self.disc = true;
            } else {
                self.request(req, payload);
            }
            inbuf.consume(n);
        }
        Ok(progress)
    }

    /// Submits the backlog and collects completions; `true` on progress.
    #[cfg(test)]
    fn pump(&mut self) -> bool {
        let submitted = self.submit_backlog();
        submitted | self.collect()
    }

    /// Nothing in progress and nothing left to send.
    fn is_drained(&self) -> bool {
        self.live == 0 && self.backlog.is_empty() && self.out.is_empty()
    }

    fn run(&mut self, s: &mut Wire, early: Vec<u8>, stop: &AtomicBool) -> Result<String, NbdError> {
        let max_payload = self.export.config.max_payload;
        let mut inbuf = InBuf::new(&self.export.pool, &early);
        drop(early);
        let mut eof = false;
        let mut idle_rounds = 0u32;
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok("server stopping".into());
            }
            let mut progress = self.submit_backlog();
            // Requests already buffered.
            match self.take_requests(&mut inbuf) {
                Ok(p) => progress |= p,
                Err(e) => {
                    // Flush what we owe, then close: the stream cannot be framed.
                    let _ = self.write_out(s);
                    return Err(NbdError::Protocol(e.to_string()));
                }
            }
            progress |= self.collect();
            progress |= self.write_out(s)?;
            progress |= s.flush_tls()?;
            // Read more when we can take it.
            if !eof && self.wants_requests() {
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
                    Err(e) if e.kind() == ErrorKind::InvalidData && s.tls.is_some() => {
                        return Err(NbdError::Tls(e.to_string()))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if (self.disc || eof) && self.is_drained() {
                let pending_bytes = inbuf.data().len();
                return Ok(if self.disc {
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
                if !self.disc && !eof {
                    flags |= PollFlags::POLLIN;
                }
                if !self.out.is_empty() || s.wants_write() {
                    flags |= PollFlags::POLLOUT;
                }
                let mut fds = [PollFd::new(s.fd(), flags)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
        }
    }

    /// An empty buffer with room for `len` bytes, from the export's pool.
    fn take_buf(&self, len: usize) -> Vec<u8> {
        self.export.pool.take(len)
    }

    fn give_buf(&self, b: Vec<u8>) {
        self.export.pool.give(b)
    }

    /// Whether the client may send more requests now.
    fn has_room(&self) -> bool {
        self.held < self.export.config.max_buffered_bytes
    }

    fn push_out(&mut self, seg: OutSeg) {
        self.held += seg.bytes().len();
        self.out.push_back(seg);
        self.note_peak();
    }

    fn note_peak(&mut self) {
        if self.held > self.peak_held {
            self.peak_held = self.held;
            self.export
                .stats
                .peak_buffered
                .fetch_max(self.held as u64, Ordering::Relaxed);
        }
    }

    fn pop_out(&mut self) {
        if let Some(seg) = self.out.pop_front() {
            self.held -= seg.bytes().len();
            if let OutSeg::Data { buf, .. } = seg {
                self.give_buf(buf);
            }
        }
    }

    fn reply_now(&mut self, handle: u64, error: u32) {
        self.export.stats.requests.fetch_add(1, Ordering::Relaxed);
        if error != 0 {
            self.export.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.push_out(OutSeg::Header(wire::simple_reply(error, handle)));
    }

    fn new_pending(&mut self, p: Pending) -> u32 {
        self.live += 1;
        self.held += p.held;
        self.note_peak();
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
            zero_next: 0,
            held: 0,
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
                // Advisory: only whole blocks (whole unmap granules, where
                // the LU reports a granularity) inside the range, and
                // nothing where the LU has no UNMAP.
                let first = r.offset.div_ceil(self.bs);
                let last = ((r.offset + u64::from(r.length)) / self.bs).max(first);
                let caps = &self.export.caps;
                let range = if caps.commands.supports(Feature::Unmap) {
                    caps.limits.unmap_aligned(first, last - first)
                } else {
                    None
                };
                let step = u64::from(caps.limits.unmap_chunk_blocks()).min(1 << 22);
                let id = self.pending_for(r.handle, Kind::Trim, fua);
                if let Some((mut lba, n)) = range {
                    let last = lba + n;
                    while lba < last {
                        let n = (last - lba).min(step) as u32;
                        let io = Io::unmap(lba, n, self.take_buf(0), tag(id, 0));
                        self.push_io(id, io);
                        lba += u64::from(n);
                    }
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
            zero_next: 0,
            held: r.length as usize,
        });
        let mut at = a0;
        let mut i = 0u32;
        while at < a1 {
            let n = (a1 - at).min(self.max_io);
            let io = Io::read(
                at / bs,
                (n / bs) as u32,
                self.take_buf(n as usize),
                tag(id, i),
            );
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
        if let Some(Some(p)) = self.pending.get_mut(id as usize) {
            p.held = payload.len();
        }
        self.held += payload.len();
        self.note_peak();
        for (i, c) in payload.chunks(self.max_io as usize).enumerate() {
            let mut b = self.take_buf(c.len());
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
        if let Some(Some(p)) = self.pending.get_mut(id as usize) {
            p.zero = (first, last);
            p.zero_next = first;
        }
        self.zero_batch(id);
    }

    /// Queues the next batch of the zeroing of request `id`.
    fn zero_batch(&mut self, id: u32) {
        let Some(Some(p)) = self.pending.get(id as usize) else {
            return;
        };
        let (mut lba, last) = (p.zero_next, p.zero.1);
        let bs = self.bs;
        let ws = !self.export.no_write_same.load(Ordering::Relaxed);
        let step = if ws {
            let caps = &self.export.caps;
            let mut max = caps.limits.write_same_chunk_blocks();
            if !caps.commands.supports(Feature::WriteSame16) {
                max = max.min(u32::from(u16::MAX));
            }
            ((self.max_io / bs) * 16).min(u64::from(max))
        } else {
            self.max_io / bs
        };
        let mut queued = 0u64;
        while lba < last && queued < ZERO_BATCH_BYTES {
            let n = (last - lba).min(step);
            let bytes = if ws { bs } else { n * bs };
            let mut b = self.take_buf(bytes as usize);
            b.resize(bytes as usize, 0);
            let io = Io {
                op: if ws { IoOp::WriteSame } else { IoOp::Write },
                lba,
                blocks: n as u32,
                buffer: b,
                user_tag: tag(id, 0),
            };
            self.push_io(id, io);
            lba += n;
            queued += bytes;
        }
        if let Some(Some(p)) = self.pending.get_mut(id as usize) {
            p.zero_next = lba;
        }
    }

    fn rmw_zero(&mut self, offset: u64, len: u64, fua: bool) -> u32 {
        let mut zeros = self.take_buf(len as usize);
        zeros.resize(len as usize, 0);
        let e = self.rmw(offset, &zeros, fua);
        self.give_buf(zeros);
        e
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
        let mut buf = self.take_buf((a1 - a0) as usize);
        buf.resize((a1 - a0) as usize, 0);
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
        self.give_buf(buf);
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
        if p.error == 0 && p.zero_next < p.zero.1 {
            self.zero_batch(id);
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
        self.held -= p.held;
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
                self.push_out(OutSeg::Data {
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
    fn write_out(&mut self, s: &mut impl Write) -> Result<bool, NbdError> {
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
                            self.pop_out();
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
                        self.pop_out();
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

impl<Q: BlockQueue> Drop for Conn<'_, Q> {
    /// Gives the buffers of unsent replies, unfinished reads and unsubmitted
    /// I/Os back to the export's pool.
    fn drop(&mut self) {
        let pool = &self.export.pool;
        for seg in self.out.drain(..) {
            if let OutSeg::Data { buf, .. } = seg {
                pool.give(buf);
            }
        }
        for io in self.backlog.drain(..) {
            pool.give(io.buffer);
        }
        for p in self.pending.drain(..).flatten() {
            p.chunks.into_iter().flatten().for_each(|b| pool.give(b));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::scsi::SenseData;

    /// A LU in memory that completes every I/O at once (on submit).
    struct MemQueue {
        data: Vec<u8>,
        bs: usize,
        done: Vec<IoCompletion>,
        refuse_write_same: bool,
        ops: Vec<(IoOp, u64, u32)>,
        /// Buffer bytes submitted and not yet collected, and its peak.
        outstanding: usize,
        peak_outstanding: usize,
    }

    impl MemQueue {
        fn new(size: usize, bs: usize) -> MemQueue {
            MemQueue {
                data: (0..size).map(|i| (i * 7 + i / 511) as u8).collect(),
                bs,
                done: Vec::new(),
                refuse_write_same: false,
                ops: Vec::new(),
                outstanding: 0,
                peak_outstanding: 0,
            }
        }
    }

    impl BlockQueue for MemQueue {
        fn submit(&mut self, mut io: Io) -> Result<(), SubmitError> {
            let (bs, at) = (self.bs, io.lba as usize * self.bs);
            let len = io.blocks as usize * bs;
            self.ops.push((io.op, io.lba, io.blocks));
            let mut result = Ok(());
            match io.op {
                IoOp::Read => {
                    io.buffer.resize(len, 0);
                    io.buffer.copy_from_slice(&self.data[at..at + len]);
                }
                IoOp::Write | IoOp::WriteFua => self.data[at..at + len].copy_from_slice(&io.buffer),
                IoOp::WriteSame if self.refuse_write_same => {
                    let sense = SenseData::new(SenseKey::IllegalRequest, 0x20, 0);
                    result = Err(IoError::Scsi(ScsiError::CheckCondition { sense }));
                }
                IoOp::WriteSame => {
                    for b in self.data[at..at + len].chunks_mut(bs) {
                        b.copy_from_slice(&io.buffer);
                    }
                }
                IoOp::Unmap => self.data[at..at + len].fill(0),
                IoOp::Flush => {}
            }
            self.outstanding += io.buffer.capacity();
            self.peak_outstanding = self.peak_outstanding.max(self.outstanding);
            self.done.push(IoCompletion {
                user_tag: io.user_tag,
                op: io.op,
                result,
                latency: Duration::ZERO,
                path: Some(0),
                retries: 0,
                buffer: io.buffer,
            });
            Ok(())
        }
        fn poll_completions(&mut self, out: &mut Vec<IoCompletion>) -> usize {
            let n = self.done.len();
            self.outstanding = 0;
            out.append(&mut self.done);
            n
        }
        fn in_flight(&self) -> usize {
            self.done.len()
        }
        fn read_at(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
            let at = lba as usize * self.bs;
            buf.copy_from_slice(&self.data[at..at + buf.len()]);
            Ok(())
        }
        fn write_at_durable(
            &mut self,
            lba: u64,
            data: &[u8],
            _durable: bool,
        ) -> Result<(), IoError> {
            let at = lba as usize * self.bs;
            self.data[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    const BS: usize = 512;
    const LU: usize = 16 << 20;

    fn export(config: ExportConfig) -> Export {
        Export {
            pool: BufPool::new(config.max_buffered_bytes),
            queues: Mutex::new(Vec::new()),
            info: ExportInfo {
                name: config.name.clone(),
                description: String::new(),
                size: LU as u64,
                flags: tflags::HAS_FLAGS,
                min_block: BS as u32,
                preferred_block: 4096,
                max_payload: config.max_payload,
            },
            config,
            rmw: Mutex::new(()),
            no_write_same: AtomicBool::new(false),
            stats: Arc::default(),
            caps: LuCaps::default(),
        }
    }

    fn small_io() -> ExportConfig {
        ExportConfig {
            max_io_bytes: 4096,
            ..ExportConfig::default()
        }
    }

    fn req(kind: u16, handle: u64, offset: u64, length: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        Request {
            flags: 0,
            kind,
            handle,
            offset,
            length,
        }
        .emit(&mut v);
        v.extend_from_slice(data);
        v
    }

    /// Runs the connection until nothing moves; returns the reply bytes.
    fn drive(c: &mut Conn<'_, MemQueue>, inbuf: &mut InBuf) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let a = c.take_requests(inbuf).unwrap();
            let b = c.pump();
            let w = c.write_out(&mut out).unwrap();
            if !(a || b || w) {
                return out;
            }
        }
    }

    /// Splits reply bytes: (handle, error, data) with `len(handle)` bytes
    /// of data after each successful read.
    fn replies(mut b: &[u8], len: impl Fn(u64) -> usize) -> Vec<(u64, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let (err, handle) = wire::parse_simple_reply(b).expect("reply magic");
            let n = if err == 0 { len(handle) } else { 0 };
            v.push((handle, err, b[16..16 + n].to_vec()));
            b = &b[16 + n..];
        }
        v
    }

    #[test]
    fn an_unaligned_read_is_split_into_chunks_and_trimmed_to_the_bytes_asked() {
        let e = export(small_io());
        let mut c = Conn::new(&e, MemQueue::new(LU, BS));
        let want = c.q.data[1000..11000].to_vec();
        let mut inbuf = InBuf::new(&e.pool, &req(cmd::READ, 7, 1000, 10_000, &[]));
        let out = drive(&mut c, &mut inbuf);
        let r = replies(&out, |_| 10_000);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].1), (7, 0));
        assert!(r[0].2 == want);
        // Aligned to 512..11264: 4 KiB, 4 KiB, 2.5 KiB.
        let ops: Vec<_> = c.q.ops.iter().map(|o| (o.1, o.2)).collect();
        assert_eq!(ops, vec![(1, 8), (9, 8), (17, 5)]);
        assert!(c.is_drained());
        assert_eq!(c.held, 0);
    }

    #[test]
    fn connections_take_buffers_from_the_export_pool_and_give_them_back() {
        let e = export(ExportConfig {
            max_io_bytes: 64 << 10,
            ..ExportConfig::default()
        });
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let mut input = req(cmd::WRITE, 1, 1 << 20, data.len() as u32, &data);
        input.extend(req(cmd::READ, 2, 1 << 20, data.len() as u32, &[]));
        input.extend(req(cmd::READ, 3, 4096, 300_000, &[]));
        let run = |write_replies: bool| {
            let mut c = Conn::new(&e, MemQueue::new(LU, BS));
            let mut inbuf = InBuf::new(&e.pool, &input);
            if write_replies {
                let out = drive(&mut c, &mut inbuf);
                let r = replies(&out, |h| match h {
                    2 => 1 << 20,
                    3 => 300_000,
                    _ => 0,
                });
                assert_eq!(r.len(), 3);
                assert!(r[1].2 == data);
            } else {
                // A client that reads no replies and goes away.
                while c.take_requests(&mut inbuf).unwrap() | c.pump() {}
                assert!(!c.out.is_empty());
            }
        };
        run(true);
        // Closed: its input buffer and the chunk buffers (64 KiB each) are
        // in the pool now.
        let held = e.pool.held_bytes();
        assert!(held >= INBUF + (1 << 20), "pool holds {held} bytes");
        // The next connection with the same work finds all it needs there:
        // nothing new is allocated, nothing is lost.
        run(true);
        assert_eq!(e.pool.held_bytes(), held);
        // Replies never sent go back too: this client holds the chunks of
        // both reads at once (16 + 5 of 64 KiB, 5 more than the pool had).
        run(false);
        let more = held + 5 * (64 << 10);
        assert_eq!(e.pool.held_bytes(), more);
        run(true);
        assert_eq!(e.pool.held_bytes(), more);
    }

    #[test]
    fn writes_aligned_and_partial_reach_the_lu() {
        let e = export(small_io());
        let mut c = Conn::new(&e, MemQueue::new(LU, BS));
        let a: Vec<u8> = (0..10240u32).map(|i| (i % 251) as u8).collect();
        let p: Vec<u8> = vec![0xab; 700];
        let mut input = req(cmd::WRITE, 1, 8192, a.len() as u32, &a);
        input.extend(req(cmd::WRITE, 2, 100_001, p.len() as u32, &p));
        input.extend(req(cmd::FLUSH, 3, 0, 0, &[]));
        let before = c.q.data.clone();
        let mut inbuf = InBuf::new(&e.pool, &input);
        let out = drive(&mut c, &mut inbuf);
        let mut r = replies(&out, |_| 0);
        r.sort();
        assert_eq!(r, vec![(1, 0, vec![]), (2, 0, vec![]), (3, 0, vec![])]);
        assert!(c.q.data[8192..8192 + a.len()] == a[..]);
        assert!(c.q.data[100_001..100_701] == p[..]);
        // The bytes around the partial write are untouched.
        assert_eq!(c.q.data[99_840..100_001], before[99_840..100_001]);
        assert_eq!(c.q.data[100_701..101_376], before[100_701..101_376]);
    }

    #[test]
    fn write_zeroes_falls_back_to_plain_writes_when_write_same_is_refused() {
        let e = export(small_io());
        let mut q = MemQueue::new(LU, BS);
        q.refuse_write_same = true;
        let mut c = Conn::new(&e, q);
        let mut inbuf = InBuf::new(&e.pool, &req(cmd::WRITE_ZEROES, 5, 65_536, 65_536, &[]));
        let out = drive(&mut c, &mut inbuf);
        assert_eq!(replies(&out, |_| 0), vec![(5, 0, vec![])]);
        assert!(c.q.data[65_536..131_072].iter().all(|&b| b == 0));
        assert_ne!(c.q.data[65_535], 0);
        assert!(e.no_write_same.load(Ordering::Relaxed));
        assert!(c.q.ops.iter().any(|o| o.0 == IoOp::WriteSame));
        assert!(c.q.ops.iter().any(|o| o.0 == IoOp::Write));
        // From then on, straight to writes.
        c.q.ops.clear();
        let mut inbuf = InBuf::new(&e.pool, &req(cmd::WRITE_ZEROES, 6, 0, 8192, &[]));
        drive(&mut c, &mut inbuf);
        assert!(c.q.ops.iter().all(|o| o.0 == IoOp::Write));
    }

    #[test]
    fn zero_writes_go_out_in_bounded_batches() {
        let e = export(ExportConfig {
            max_io_bytes: 1 << 20,
            ..ExportConfig::default()
        });
        e.no_write_same.store(true, Ordering::Relaxed);
        let mut c = Conn::new(&e, MemQueue::new(LU, BS));
        let len = 12u32 << 20;
        let mut inbuf = InBuf::new(&e.pool, &req(cmd::WRITE_ZEROES, 8, 1 << 20, len, &[]));
        let out = drive(&mut c, &mut inbuf);
        assert_eq!(replies(&out, |_| 0), vec![(8, 0, vec![])]);
        assert!(c.q.data[1 << 20..(13 << 20)].iter().all(|&b| b == 0));
        assert_ne!(c.q.data[(13 << 20) + 1], 0);
        assert_eq!(c.q.ops.len(), 12);
        // Never the whole 12 MiB of zero buffers at once.
        let peak = c.q.peak_outstanding as u64;
        assert!(peak <= 9 << 20, "{peak} bytes of zeroes queued at once");
    }

    #[test]
    fn bad_requests_get_errors_and_garbage_cannot_be_framed() {
        let e = export(ExportConfig {
            read_only: true,
            ..small_io()
        });
        let mut c = Conn::new(&e, MemQueue::new(LU, BS));
        let mut input = req(cmd::READ, 1, LU as u64 - 512, 1024, &[]);
        input.extend(req(cmd::WRITE, 2, 0, 512, &[0; 512]));
        input.extend(req(cmd::TRIM, 3, 0, 512, &[]));
        input.extend(req(99, 4, 0, 0, &[]));
        let mut inbuf = InBuf::new(&e.pool, &input);
        let r = replies(&drive(&mut c, &mut inbuf), |_| 0);
        assert_eq!(
            r,
            vec![
                (1, errno::EINVAL, vec![]),
                (2, errno::EPERM, vec![]),
                (3, errno::EPERM, vec![]),
                (4, errno::EINVAL, vec![])
            ]
        );
        assert!(c.q.ops.is_empty());
        let mut inbuf = InBuf::new(&e.pool, &[0x55; 64]);
        assert!(c.take_requests(&mut inbuf).is_err());
    }

    #[test]
    fn disc_stops_taking_requests() {
        let e = export(small_io());
        let mut c = Conn::new(&e, MemQueue::new(LU, BS));
        let mut input = req(cmd::DISC, 1, 0, 0, &[]);
        input.extend(req(cmd::READ, 2, 0, 512, &[]));
        let mut inbuf = InBuf::new(&e.pool, &input);
        assert!(drive(&mut c, &mut inbuf).is_empty());
        assert!(c.disc && c.is_drained());
        assert_eq!(
            inbuf.data().len(),
            wire::REQUEST_LEN,
            "the READ after DISC is left"
        );
    }

    #[test]
    fn a_client_that_reads_no_replies_is_held_to_the_buffer_cap() {
        let cap = 256 * 1024;
        let e = export(ExportConfig {
            max_buffered_bytes: cap,
            ..small_io()
        });
        let mut c = Conn::new(&e, MemQueue::new(LU, BS));
        let mut input = Vec::new();
        for i in 0..100u64 {
            input.extend(req(cmd::READ, i, i * 65_536 % LU as u64, 65_536, &[]));
        }
        let mut inbuf = InBuf::new(&e.pool, &input);
        // Never written out: the replies pile up to the cap, no further.
        for _ in 0..50 {
            c.take_requests(&mut inbuf).unwrap();
            c.pump();
        }
        assert!(!c.wants_requests());
        assert!(
            c.held >= cap && c.held < cap + 65_536 + 64,
            "held {}",
            c.held
        );
        let taken = 100 - inbuf.data().len() / wire::REQUEST_LEN;
        assert!((4..=5).contains(&taken), "took {taken} requests");
        // Once the client reads, the rest is served.
        let out = drive(&mut c, &mut inbuf);
        let r = replies(&out, |_| 65_536);
        assert_eq!(r.len(), 100, "all answered once the client reads");
        assert!(r.iter().all(|x| x.1 == 0));
        assert!(c.is_drained() && c.held == 0);
        assert!(e.stats.peak_buffered.load(Ordering::Relaxed) as usize <= cap + 65_536 + 64);
    }

    #[test]
    fn plaintext_is_refused_beyond_loopback_unless_asked_for() {
        for ok in [
            "127.0.0.1:10809",
            "127.9.9.9:1",
            "[::1]:10809",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(
                check_exposure(ok.parse().unwrap(), None, false).is_ok(),
                "{ok}"
            );
        }
        for bad in ["0.0.0.0:10809", "192.0.2.7:10809", "[::]:10809"] {
            let e = check_exposure(bad.parse().unwrap(), None, false).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("not a loopback address"), "{msg}");
            assert!(msg.contains("--tls-cert") && msg.contains("--insecure-plaintext"));
            assert!(check_exposure(bad.parse().unwrap(), None, true).is_ok());
        }
    }
}
