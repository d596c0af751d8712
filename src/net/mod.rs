//! The userspace TCP/IP stack, sans-IO: one [`Interface`] per worker takes
//! frames and the current [`Instant`] in, and sends frames through a
//! [`crate::phy::Device`]; [`Interface::poll_at`] says when to come back.
//! It never reads a clock.
#![deny(unsafe_code)]

pub mod arp;
pub mod assembler;
pub mod congestion;
pub mod iface;
pub mod ring;
pub mod rss;
pub mod rtt;
pub mod scoreboard;
pub mod tcp;
pub mod time;

pub use congestion::CongestionAlgorithm;
pub use iface::{Interface, InterfaceConfig, InterfaceCounters, OffloadConfig, SocketHandle};
pub use tcp::{Keepalive, State as TcpState, TcpConfig, TcpCounters, TcpError, TcpSocket};
pub use time::Instant;

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
