//! Byte-stream transports the iSCSI layer runs over: kernel TCP sockets and
//! the userspace TCP stack. The iSCSI code is sans-IO; a driver moves bytes
//! between a [`Transport`] and the iSCSI state machines.

use std::io;
use std::net::SocketAddr;
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

/// A connected, non-blocking byte stream.
pub trait Transport: Send {
    /// Writes as much of `buf` as fits now; `Ok(0)` means "full, try later".
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError>;
    /// Reads what has arrived; `Ok(0)` means "nothing yet".
    /// A peer that closed gives `Err(TransportError::Closed)`.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;
    /// Does the transport's own work (userspace stack: rx burst, timers, tx
    /// burst). The kernel transport has nothing to do.
    fn poll(&mut self) -> Result<(), TransportError>;
    /// Waits up to `timeout` for something to read or for room to write.
    /// Busy-polling transports may return at once.
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError>;
    /// Closes the stream (FIN); further sends fail.
    fn close(&mut self);
    fn local_addr(&self) -> Option<SocketAddr>;
    fn peer_addr(&self) -> Option<SocketAddr>;
}
#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod kernel;
pub mod user;
