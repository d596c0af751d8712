//! Byte-stream transports the iSCSI layer runs over: kernel TCP sockets and
//! the userspace TCP stack. The iSCSI code is sans-IO; a driver moves bytes
//! between a [`Transport`] and the iSCSI state machines.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Errors of a byte-stream transport.
#[derive(Debug, Error)]
pub enum TransportError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("connection closed by peer")]
    Closed,
    #[error("connection reset: {0}")]
    Reset(String),
    #[error("transport I/O error: {0}")]
    Io(#[from] io::Error),
}

/// The reader of a byte stream that knows where each byte belongs (the
/// iSCSI connection: PDU headers into its staging, Data-In payload into the
/// command's own buffer), so a transport can put received bytes there with
/// one copy: a socket reads into [`RxSink::rx_buffers`]; the userspace
/// stack pushes bytes straight from the frame with [`RxSink::rx_push`].
pub trait RxSink {
    /// Where the next bytes go, in stream order: fill the first slice, then
    /// the second (which may be empty).
    fn rx_buffers(&mut self) -> (&mut [u8], &mut [u8]);
    /// `n` bytes were written into the slices from `rx_buffers`. False: the
    /// reader failed and wants no more.
    fn rx_commit(&mut self, n: usize) -> bool;
    /// Takes bytes the transport holds; returns how many it took (fewer
    /// than offered, or 0, means it wants no more now).
    fn rx_push(&mut self, bytes: &[u8]) -> usize;
    /// The time the transport read for the round whose bytes follow (a
    /// userspace stack reads the clock once per poll), so the reader need
    /// not read it again: one clock read per round. The latest call holds.
    /// Transports that read no clock (kernel TCP) never call it.
    fn rx_time(&mut self, now: std::time::Instant) {
        let _ = now;
    }
}

/// What [`Transport::recv_into_wait`] got: the bytes handed over (0:
/// nothing came in time) and how long it waited (spun, slept or blocked)
/// before they came or it gave up: idle time, for poll-mode accounting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub bytes: usize,
    pub waited: Duration,
}

impl Received {
    /// Bytes that were there without waiting.
    pub fn now(bytes: usize) -> Received {
        Received {
            bytes,
            waited: Duration::ZERO,
        }
    }
}

/// One piece of the bytes to send, in stream order: bytes the sender owns
/// (headers), or a range of a shared buffer (a write's payload) that a
/// transport may send from without copying it first.
#[derive(Debug, Clone, Copy)]
pub enum TxPart<'a> {
    Bytes(&'a [u8]),
    Shared {
        buf: &'a Arc<Vec<u8>>,
        start: usize,
        len: usize,
    },
}

impl TxPart<'_> {
    /// The bytes of this part.
    pub fn bytes(&self) -> &[u8] {
        match *self {
            TxPart::Bytes(b) => b,
            TxPart::Shared { buf, start, len } => buf.get(start..start + len).unwrap_or(&[]),
        }
    }
    pub fn len(&self) -> usize {
        self.bytes().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connected, non-blocking byte stream.
pub trait Transport: Send {
    /// Does the transport's own work (like [`poll`](Transport::poll)) and
    /// hands what has arrived to `sink`, copying each byte once where the
    /// transport can. Returns the bytes handed over (0: nothing yet). A
    /// closed or reset stream is an error, also right after bytes were
    /// handed over in the same call (the sink has taken those already).
    fn recv_into(&mut self, sink: &mut dyn RxSink) -> Result<usize, TransportError> {
        self.poll()?;
        let mut total = 0;
        loop {
            let (buf, _) = sink.rx_buffers();
            let n = self.recv(buf)?;
            if n == 0 {
                break;
            }
            total += n;
            if !sink.rx_commit(n) {
                break;
            }
        }
        Ok(total)
    }
    /// Like [`recv_into`](Transport::recv_into), but when nothing has
    /// arrived waits up to about `timeout` for the first bytes and hands
    /// them over in the same call (kernel TCP: a short spin or timed sleep
    /// as its wait estimate says, then one blocking `recvmsg`; no `poll(2)`
    /// and read after it). It waits for bytes to read only: a caller with
    /// bytes still to send waits with [`wait`](Transport::wait). This
    /// default waits with `wait` (busy-polled transports: a yield) and
    /// receives after.
    fn recv_into_wait(
        &mut self,
        sink: &mut dyn RxSink,
        timeout: Duration,
    ) -> Result<Received, TransportError> {
        let bytes = self.recv_into(sink)?;
        if bytes > 0 || timeout.is_zero() {
            return Ok(Received::now(bytes));
        }
        let begun = std::time::Instant::now();
        if self.is_busy_polled() {
            std::thread::yield_now();
        } else {
            self.wait(timeout)?;
        }
        let waited = begun.elapsed();
        Ok(Received {
            bytes: self.recv_into(sink)?,
            waited,
        })
    }
    /// Writes as much of `buf` as fits now; `Ok(0)` means "full, try later".
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError>;
    /// Writes as much of `parts`, in order, as fits now; returns the bytes
    /// taken (a part may be taken in part). The kernel transport writes
    /// them with one `writev`; the userspace stack queues shared parts by
    /// reference (copied once, into the frame). This default copies each
    /// part with [`send`](Transport::send).
    fn send_parts(&mut self, parts: &[TxPart<'_>]) -> Result<usize, TransportError> {
        let mut total = 0;
        for part in parts {
            let bytes = part.bytes();
            let n = self.send(bytes)?;
            total += n;
            if n < bytes.len() {
                break;
            }
        }
        Ok(total)
    }
    /// Reads what has arrived; `Ok(0)` means "nothing yet".
    /// A peer that closed gives `Err(TransportError::Closed)`.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;
    /// Does the transport's own work (userspace stack: rx burst, timers, tx
    /// burst). The kernel transport has nothing to do.
    fn poll(&mut self) -> Result<(), TransportError>;
    /// Waits up to `timeout` for something to read or for room to write.
    /// Busy-polling transports may return at once.
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError>;
    /// Blocks until there is something to read, `wake` is notified (a
    /// submitter queued work) or `timeout` passes. Transports without a
    /// descriptor to block on return soon (busy-polled ones at once).
    fn wait_or_wake(&mut self, wake: &Wake, timeout: Duration) -> Result<(), TransportError> {
        let _ = wake;
        if self.is_busy_polled() {
            std::thread::yield_now();
            Ok(())
        } else {
            self.wait(timeout.min(Duration::from_millis(1)))
        }
    }
    /// Whether the transport moves only when polled (the userspace stack):
    /// then an idle caller should call [`recv_into`](Transport::recv_into)
    /// again (after a yield) rather than [`wait`](Transport::wait), which
    /// would receive into the transport's own buffer first.
    fn is_busy_polled(&self) -> bool {
        false
    }
    /// Whether [`open_side`](Transport::open_side) opens second
    /// connections (the userspace stack, whose NIC queue this transport
    /// owns; kernel TCP opens sockets of its own instead).
    fn has_side_connections(&self) -> bool {
        false
    }
    /// Opens a second connection to this transport's peer on this
    /// transport's own stack, for another thread (a fence login over DPDK,
    /// see [`side`]). Its bytes move only in [`pump_side`](Transport::pump_side),
    /// which the owner of this transport calls while the side is in use.
    /// Opening one closes the side opened before. None: not offered.
    fn open_side(&mut self) -> Option<Result<side::SideTcp, TransportError>> {
        None
    }
    /// Moves the side connection's bytes (and polls the stack); true if
    /// anything moved. Nothing to do without a side connection.
    fn pump_side(&mut self) -> bool {
        false
    }
    /// Closes the stream (FIN); further sends fail.
    fn close(&mut self);
    fn local_addr(&self) -> Option<SocketAddr>;
    fn peer_addr(&self) -> Option<SocketAddr>;
}
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod kernel;
pub mod side;
pub mod user;
pub mod wait;
pub mod wake;

pub use wake::Wake;
