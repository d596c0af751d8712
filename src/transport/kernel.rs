//! The kernel TCP transport: a `TcpStream`, optionally bound to a chosen
//! local address first (ESXi-style port binding: the path leaves through
//! the interface that owns that address).
//!
//! The socket stays in blocking mode and every call passes `MSG_DONTWAIT`,
//! except the one blocking receive of [`Transport::recv_into_wait`]: an idle
//! reader waits inside `recvmsg` (bounded by `SO_RCVTIMEO`) and gets its
//! bytes from the same call, where `poll(2)` and then `readv` took two.
//! Before blocking it spins or sleeps on a timer as its [`WaitEstimate`]
//! says (a QD1 answer on loopback comes sooner than a blocked thread wakes).

use super::wait::{WaitEstimate, WaitPlan};
use super::{Received, RxSink, Transport, TransportError, TxPart, Wake};
use nix::errno::Errno;
use nix::poll::{poll, ppoll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, recvmsg, MsgFlags};
use nix::sys::time::TimeSpec;
use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// Options of a kernel TCP connection.
#[derive(Debug, Clone, Default)]
pub struct KernelTcpOptions {
    /// Bind to this local address (port 0 = any) before connecting.
    pub bind: Option<SocketAddr>,
    /// Bind to this interface by name (SO_BINDTODEVICE; needs root).
    pub bind_device: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// Socket buffer sizes (SO_SNDBUF/SO_RCVBUF) in bytes.
    pub buffer_size: Option<usize>,
}

/// System calls a [`KernelTcp`] made, by kind (for syscalls-per-I/O
/// figures; the wake-up eventfd's are counted by [`Wake`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelTcpCalls {
    /// `sendmsg`/`send` calls.
    pub sends: u64,
    /// Non-blocking `recvmsg`/`recv` calls (spins included).
    pub recvs: u64,
    /// Blocking `recvmsg` calls (the idle wait).
    pub blocking_recvs: u64,
    /// `poll`/`ppoll` calls (timed sleeps, waits with a wake-up fd).
    pub polls: u64,
    /// `setsockopt(SO_RCVTIMEO)` calls.
    pub timeouts_set: u64,
}

#[derive(Debug)]
pub struct KernelTcp {
    stream: TcpStream,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    /// The receive timeout on the socket now (it bounds the blocking
    /// receive); set again only when a wait wants another one.
    rcv_timeout: Option<Duration>,
    estimate: WaitEstimate,
    calls: KernelTcpCalls,
}

/// Flags of every non-blocking call: no SIGPIPE from a peer that left.
const NOW: MsgFlags = MsgFlags::MSG_DONTWAIT.union(MsgFlags::MSG_NOSIGNAL);

/// The receive timeouts a blocking wait picks from (the largest that fits
/// the wait), so `SO_RCVTIMEO` is set again only when the caller's bound
/// changes by a step. The kernel keeps the timeout in ticks, rounded up.
const BLOCK_STEPS_MS: [u64; 8] = [1, 2, 5, 10, 20, 50, 100, 500];
/// The shortest wait that blocks in `recvmsg` (with the 1 ms step: a
/// 1 ms wait that spun a little first still blocks); shorter ones sleep in
/// `ppoll`, whose timeout is exact.
const MIN_BLOCK: Duration = Duration::from_micros(500);

impl KernelTcp {
    /// Connects to `addr` (blocking up to the connect timeout).
    pub fn connect(addr: SocketAddr, opts: &KernelTcpOptions) -> Result<KernelTcp, TransportError> {
        let connect_err = |source: io::Error| TransportError::Connect { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(connect_err)?;
        if let Some(dev) = &opts.bind_device {
            socket
                .bind_device(Some(dev.as_bytes()))
                .map_err(connect_err)?;
        }
        if let Some(local) = opts.bind {
            socket.bind(&SockAddr::from(local)).map_err(connect_err)?;
        }
        if let Some(size) = opts.buffer_size {
            let _ = socket.set_send_buffer_size(size);
            let _ = socket.set_recv_buffer_size(size);
        }
        socket.set_tcp_nodelay(true).map_err(connect_err)?;
        let timeout = opts.connect_timeout.unwrap_or(Duration::from_secs(5));
        match socket.connect_timeout(&SockAddr::from(addr), timeout) {
            Ok(()) => {}
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock =>
            {
                return Err(TransportError::ConnectTimeout { addr, timeout })
            }
            Err(e) => return Err(connect_err(e)),
        }
        KernelTcp::from_stream(socket.into())
    }

    /// Wraps a connected stream (used by tests and the embedded target).
    pub fn from_stream(stream: TcpStream) -> Result<KernelTcp, TransportError> {
        stream.set_nodelay(true)?;
        // Blocking mode: only the idle wait blocks, every other call says
        // MSG_DONTWAIT.
        stream.set_nonblocking(false)?;
        Ok(KernelTcp {
            local: stream.local_addr().ok(),
            peer: stream.peer_addr().ok(),
            stream,
            rcv_timeout: None,
            estimate: WaitEstimate::default(),
            calls: KernelTcpCalls::default(),
        })
    }

    /// The system calls made so far.
    pub fn calls(&self) -> KernelTcpCalls {
        self.calls
    }

    /// What this transport has learnt about its waits.
    pub fn wait_estimate(&self) -> &WaitEstimate {
        &self.estimate
    }

    /// Whether an idle wait may sleep on a timer until shortly before the
    /// answer is due and spin the rest (default off: it spins only through
    /// waits due within a few µs, and blocks on longer ones).
    pub fn set_hybrid_wait(&mut self, hybrid: bool) {
        self.estimate = WaitEstimate::new(hybrid);
    }

    /// One `recvmsg` into the sink's buffers; `Ok(None)`: nothing to read
    /// (or, blocking, the receive timeout passed).
    fn read_once(
        &mut self,
        sink: &mut dyn RxSink,
        flags: MsgFlags,
    ) -> Result<Option<(usize, usize)>, TransportError> {
        let fd = self.stream.as_raw_fd();
        let (first, second) = sink.rx_buffers();
        let offered = first.len() + second.len();
        if offered == 0 {
            return Ok(Some((0, 0)));
        }
        let result = if second.is_empty() {
            recv(fd, first, flags)
        } else {
            let mut bufs = [IoSliceMut::new(first), IoSliceMut::new(second)];
            recvmsg::<()>(fd, &mut bufs, None, flags).map(|m| m.bytes)
        };
        match result {
            Ok(0) => Err(TransportError::Closed),
            Ok(n) => Ok(Some((n, offered))),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(None),
            Err(e) => Err(classify(e.into())),
        }
    }

    /// Reads on without blocking after `n` of `offered` bytes were read:
    /// a short read means the socket is drained, which saves the `EAGAIN`
    /// call.
    fn read_rest(
        &mut self,
        sink: &mut dyn RxSink,
        mut n: usize,
        mut offered: usize,
    ) -> Result<usize, TransportError> {
        let mut total = 0;
        loop {
            total += n;
            if !sink.rx_commit(n) || n < offered {
                return Ok(total);
            }
            self.calls.recvs += 1;
            match self.read_once(sink, NOW)? {
                Some((0, _)) | None => return Ok(total),
                Some((more, of)) => (n, offered) = (more, of),
            }
        }
    }

    /// Blocks in `recvmsg` for up to about `timeout` (the largest
    /// receive-timeout step within `timeout`, at least 1 ms), then reads on
    /// without blocking.
    fn recv_blocking(
        &mut self,
        sink: &mut dyn RxSink,
        timeout: Duration,
    ) -> Result<usize, TransportError> {
        let ms = timeout.as_millis() as u64;
        let step = BLOCK_STEPS_MS
            .iter()
            .rev()
            .find(|&&s| s <= ms)
            .copied()
            .unwrap_or(1);
        let step = Duration::from_millis(step);
        if self.rcv_timeout != Some(step) {
            self.calls.timeouts_set += 1;
            self.stream.set_read_timeout(Some(step))?;
            self.rcv_timeout = Some(step);
        }
        self.calls.blocking_recvs += 1;
        match self.read_once(sink, MsgFlags::MSG_NOSIGNAL)? {
            Some((0, _)) | None => Ok(0),
            Some((n, offered)) => self.read_rest(sink, n, offered),
        }
    }

    /// Sleeps on a timer for up to `d`, returning early (true) when bytes
    /// arrive.
    fn sleep_readable(&mut self, d: Duration) -> Result<bool, TransportError> {
        self.calls.polls += 1;
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
        match ppoll(&mut fds, Some(TimeSpec::from_duration(d)), None) {
            Ok(n) => Ok(n > 0),
            Err(Errno::EINTR) => Ok(false),
            Err(e) => Err(TransportError::Io(e.into())),
        }
    }
}

fn classify(e: io::Error) -> TransportError {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TransportError::Reset(e.to_string()),
        _ => TransportError::Io(e),
    }
}

/// `Ok(0)` for "full, try later"; errors classified.
fn sent(r: io::Result<usize>) -> Result<usize, TransportError> {
    match r {
        Ok(n) => Ok(n),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            Ok(0)
        }
        Err(e) => Err(classify(e)),
    }
}

impl Transport for KernelTcp {
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.calls.sends += 1;
        sent(SockRef::from(&self.stream).send_with_flags(buf, NOW.bits()))
    }

    /// One `sendmsg` of the parts (iSCSI headers and the caller's data
    /// buffers), so the kernel's copy into its socket buffer is the only
    /// one. At most 64 parts per call; the caller sends the rest next time.
    fn send_parts(&mut self, parts: &[TxPart<'_>]) -> Result<usize, TransportError> {
        let mut slices = [IoSlice::new(&[]); 64];
        let mut count = 0;
        for part in parts.iter().filter(|p| !p.is_empty()).take(slices.len()) {
            slices[count] = IoSlice::new(part.bytes());
            count += 1;
        }
        if count == 0 {
            return Ok(0);
        }
        self.calls.sends += 1;
        sent(SockRef::from(&self.stream).send_vectored_with_flags(&slices[..count], NOW.bits()))
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.calls.recvs += 1;
        match recv(self.stream.as_raw_fd(), buf, NOW) {
            Ok(0) => Err(TransportError::Closed),
            Ok(n) => Ok(n),
            Err(Errno::EAGAIN | Errno::EINTR) => Ok(0),
            Err(e) => Err(classify(e.into())),
        }
    }

    /// `recvmsg` straight into the reader's buffers (for iSCSI: a Data-In's
    /// payload into the command's buffer, plus the next PDU's header), so
    /// the kernel's copy is the only one.
    fn recv_into(&mut self, sink: &mut dyn RxSink) -> Result<usize, TransportError> {
        self.calls.recvs += 1;
        match self.read_once(sink, NOW)? {
            Some((0, _)) | None => Ok(0),
            Some((n, offered)) => self.read_rest(sink, n, offered),
        }
    }

    /// Reads what is there; when nothing is, waits as the estimate of this
    /// connection's waits says (sleep on a timer, spin, then block in
    /// `recvmsg`) and reads what comes in the same call. A wait that goes
    /// straight to blocking makes one call: the blocking `recvmsg` returns
    /// at once when bytes are there.
    fn recv_into_wait(
        &mut self,
        sink: &mut dyn RxSink,
        timeout: Duration,
    ) -> Result<Received, TransportError> {
        if timeout.is_zero() {
            return Ok(Received::now(self.recv_into(sink)?));
        }
        let begun = Instant::now();
        let WaitPlan { sleep, spin_until } = self.estimate.plan();
        let spin_until = spin_until.min(timeout);
        let mut looked = false;
        if !sleep.is_zero() && sleep < spin_until {
            if self.sleep_readable(sleep)? {
                // Bytes came during the sleep (or were there already).
                let bytes = self.recv_into(sink)?;
                if bytes > 0 {
                    let waited = begun.elapsed();
                    self.estimate.observe(waited);
                    return Ok(Received { bytes, waited });
                }
            } else {
                self.estimate.observe_sleep(sleep, begun.elapsed());
            }
            looked = true;
        }
        while !spin_until.is_zero() {
            let bytes = self.recv_into(sink)?;
            let waited = begun.elapsed();
            if bytes > 0 {
                if looked || waited > Duration::from_micros(1) {
                    self.estimate.observe(waited);
                }
                return Ok(Received { bytes, waited });
            }
            looked = true;
            if waited >= spin_until {
                break;
            }
            std::hint::spin_loop();
        }
        let left = timeout.saturating_sub(begun.elapsed());
        let bytes = if left >= MIN_BLOCK {
            self.recv_blocking(sink, left)?
        } else if !left.is_zero() && self.sleep_readable(left)? {
            // Too short for a receive timeout (kept in kernel ticks).
            self.recv_into(sink)?
        } else {
            0
        };
        let waited = begun.elapsed();
        // A blocking receive that found bytes at once is no wait; one that
        // waited (or followed a spin) says how long answers take.
        if bytes > 0 && (looked || waited > Duration::from_micros(5)) {
            self.estimate.observe(waited);
        }
        Ok(Received { bytes, waited })
    }

    fn poll(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        if timeout.is_zero() {
            return Ok(());
        }
        // poll(2) for readability: one syscall, no mode switches.
        self.calls.polls += 1;
        let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
        let ms = timeout.as_millis().clamp(1, u16::MAX as u128) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(TransportError::Io(e.into())),
        }
    }

    /// One poll(2) on the socket and the wake-up eventfd; the eventfd is
    /// drained only when it was signalled.
    fn wait_or_wake(&mut self, wake: &Wake, timeout: Duration) -> Result<(), TransportError> {
        if timeout.is_zero() {
            return Ok(());
        }
        self.calls.polls += 1;
        let mut fds = [
            PollFd::new(self.stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.fd(), PollFlags::POLLIN),
        ];
        let ms = timeout.as_millis().clamp(1, u16::MAX as u128) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) => {
                if fds[1].any().unwrap_or(false) {
                    wake.mark_signalled();
                }
                Ok(())
            }
            Err(Errno::EINTR) => Ok(()),
            Err(e) => Err(TransportError::Io(e.into())),
        }
    }

    fn close(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    #[test]
    fn connect_send_recv_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let opts = KernelTcpOptions {
            bind: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        let mut t = KernelTcp::connect(addr, &opts).unwrap();
        let (mut server, _) = l.accept().unwrap();
        assert_eq!(t.send(b"hello").unwrap(), 5);
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"world").unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            t.wait(Duration::from_millis(100)).unwrap();
            let mut b = [0u8; 16];
            let n = t.recv(&mut b).unwrap();
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got, b"world");
        drop(server);
        let mut closed = false;
        for _ in 0..100 {
            t.wait(Duration::from_millis(10)).unwrap();
            match t.recv(&mut [0u8; 4]) {
                Err(TransportError::Closed) => {
                    closed = true;
                    break;
                }
                Ok(0) => continue,
                other => panic!("{other:?}"),
            }
        }
        assert!(closed);
    }

    /// The worker's side of the handshake on a real socket, against a
    /// submitter on another thread that hands over one item at a time at
    /// random moments: every item must end the worker's wait by the wake-up
    /// (the wait's bound is 10 s, so a lost wake-up shows as a stall), also
    /// when a write lands after the worker woke for another reason and the
    /// eventfd stays readable.
    #[test]
    fn a_submission_from_another_thread_ends_a_blocked_wait() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t =
            KernelTcp::connect(l.local_addr().unwrap(), &KernelTcpOptions::default()).unwrap();
        let (_server, _) = l.accept().unwrap();
        let wake = Arc::new(Wake::new().unwrap());
        let offered = Arc::new(AtomicU64::new(0));
        let taken = Arc::new(AtomicU64::new(0));
        const ITEMS: u64 = 2000;
        let submitter = {
            let (wake, offered, taken) = (wake.clone(), offered.clone(), taken.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_u32;
                for i in 1..=ITEMS {
                    // One item at a time: the worker sleeps in between.
                    while taken.load(Ordering::Acquire) < i - 1 {
                        std::hint::spin_loop();
                    }
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    for _ in 0..x % 4000 {
                        std::hint::spin_loop();
                    }
                    offered.store(i, Ordering::Release);
                    wake.notify();
                }
            })
        };
        let mut done = 0;
        let mut longest = Duration::ZERO;
        while done < ITEMS {
            wake.prepare_sleep();
            if offered.load(Ordering::Acquire) == done {
                let begun = Instant::now();
                t.wait_or_wake(&wake, Duration::from_secs(10)).unwrap();
                longest = longest.max(begun.elapsed());
            }
            wake.finish_sleep();
            if offered.load(Ordering::Acquire) > done {
                done += 1;
                taken.store(done, Ordering::Release);
            }
            assert!(longest < Duration::from_secs(5), "a wake-up was lost");
        }
        submitter.join().unwrap();
        assert!(wake.notified() > 0, "the worker never slept");
        assert!(
            wake.drains() <= wake.notified() + 1,
            "{} drains for {} wake-ups",
            wake.drains(),
            wake.notified()
        );
    }

    /// An idle wait blocks in one `recvmsg` that returns the bytes (no
    /// poll(2) first), and a wait that times out returns nothing.
    #[test]
    fn an_idle_wait_is_one_blocking_receive() {
        struct Buf(Vec<u8>, usize);
        impl RxSink for Buf {
            fn rx_buffers(&mut self) -> (&mut [u8], &mut [u8]) {
                let at = self.1;
                (&mut self.0[at..], &mut [])
            }
            fn rx_commit(&mut self, n: usize) -> bool {
                self.1 += n;
                true
            }
            fn rx_push(&mut self, _: &[u8]) -> usize {
                0
            }
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t =
            KernelTcp::connect(l.local_addr().unwrap(), &KernelTcpOptions::default()).unwrap();
        let (mut server, _) = l.accept().unwrap();
        let mut sink = Buf(vec![0; 64], 0);
        let got = t
            .recv_into_wait(&mut sink, Duration::from_millis(5))
            .unwrap();
        assert_eq!(got.bytes, 0);
        assert!(got.waited >= Duration::from_millis(1), "{got:?}");
        let before = t.calls();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            server.write_all(b"answer").unwrap();
            server
        });
        let got = t.recv_into_wait(&mut sink, Duration::from_secs(5)).unwrap();
        let _server = writer.join().unwrap();
        assert_eq!(got.bytes, 6);
        assert_eq!(&sink.0[..6], b"answer");
        let calls = t.calls();
        assert_eq!(calls.blocking_recvs - before.blocking_recvs, 1, "{calls:?}");
        assert_eq!(
            calls.polls, before.polls,
            "no poll(2) before the read: {calls:?}"
        );
        assert_eq!(calls.recvs, before.recvs, "a short read ends it: {calls:?}");
    }

    #[test]
    fn refused_connection_names_the_address() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let e = KernelTcp::connect(addr, &KernelTcpOptions::default()).unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
