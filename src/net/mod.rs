//! The userspace TCP/IP stack, sans-IO: one [`Interface`] per worker takes
//! frames and the current [`Instant`] in, and sends frames through a
//! [`crate::phy::Device`]; [`Interface::poll_at`] says when to come back.
//! It never reads a clock.

pub mod arp;
pub mod assembler;
pub mod congestion;
pub mod iface;
pub mod ring;
pub mod rtt;
pub mod scoreboard;
pub mod tcp;

pub use congestion::CongestionAlgorithm;
pub use iface::{Interface, InterfaceConfig, InterfaceCounters, OffloadConfig, SocketHandle};
pub use tcp::{Keepalive, State as TcpState, TcpConfig, TcpCounters, TcpError, TcpSocket};
// The clock and the RSS hash sit below both net and phy (phy's DPDK port
// reports its RSS key); these keep their old paths.
pub use crate::clock::{self as time, Instant};
pub use crate::phy::rss;

use thiserror::Error;

/// Errors of the network stack.
#[derive(Debug, Error)]
pub enum NetError {
    #[error("no such socket")]
    InvalidHandle,
    #[error("no free ephemeral port")]
    NoEphemeralPort,
    #[error("tcp: {0}")]
    Tcp(#[from] TcpError),
    #[error("device: {0}")]
    Phy(#[from] crate::phy::PhyError),
}
