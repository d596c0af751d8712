//! NBD export: serves a [`WorkerDevice`](crate::worker::WorkerDevice)
//! over the Network Block Device protocol, so unmodified programs (qemu,
//! nbdcopy, `nbd-client` + the kernel's `/dev/nbdX`) can use the multipath
//! LU.
//!
//! - [`wire`]: message formats, sans-IO, no panics on any bytes.
//! - [`handshake`]: the fixed newstyle negotiation as a sans-IO state
//!   machine (`NBD_OPT_GO`/`INFO`/`EXPORT_NAME`/`LIST`/`ABORT`).
//! - [`tls`]: `NBD_OPT_STARTTLS` with X.509 certificates (rustls).
//! - [`server`]: the runtime: a listener thread and connection threads
//!   (`threads`: started as clients come, at most `--max-clients`, each
//!   serving one client at a time and kept for the next), each client with
//!   its own [`IoQueue`](crate::worker::IoQueue) (kept for the next client
//!   when it closes); requests are pipelined and answered with simple
//!   replies in completion order.
//! - `pool`: the data buffers every connection of an export shares
//!   (bounded; large buffers are allocated once per export, not per client).
//!
//! Mapping: READ → READ(16), WRITE → WRITE(16) (+FUA → the WRITE's FUA
//! bit; TRIM/WRITE_ZEROES with FUA → SYNCHRONIZE CACHE after), FLUSH → SYNCHRONIZE CACHE, TRIM → UNMAP (whole blocks; ignored
//! where the target has no UNMAP), WRITE_ZEROES → WRITE SAME(16) with a zero
//! block (zero writes where the target refuses WRITE SAME). Requests that do
//! not cover whole blocks are served by read-modify-write.
#![warn(missing_docs)]

pub mod handshake;
mod pool;
pub mod server;
mod threads;
pub mod tls;
pub mod wire;

pub use handshake::{ExportInfo, TlsPolicy};
pub use server::{check_exposure, ExportConfig, Listener, NbdServer, NbdServerHandle, ServerStats};
pub use tls::TlsConfig;

use thiserror::Error;

/// Errors of the NBD export.
#[derive(Debug, Error)]
pub enum NbdError {
    /// The listening socket could not be set up.
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    /// Socket I/O with a client failed.
    #[error("socket error: {0}")]
    Io(std::io::Error),
    /// A client broke the protocol; its connection is closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Bad export configuration.
    #[error("bad export configuration: {0}")]
    Config(String),
    /// TLS with a client failed (handshake, certificate, record layer).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server is stopping; the connection was closed.
    #[error("server stopping")]
    Stopping,
    /// The configuration would expose the LU in plaintext to the network.
    #[error("{0}")]
    Insecure(String),
    /// A thread could not be started or panicked.
    #[error("thread: {0}")]
    Thread(String),
}
