//! A second TCP connection on a userspace stack that a live connection
//! owns, for another thread to use as a blocking-style [`Transport`]: the
//! fence login a DPDK path runs for another path of its portal group
//! (docs/multipath.md, "Fencing", step 2).
//!
//! A userspace stack's NIC queue belongs to its live connection
//! ([`UserTcp`](super::user::UserTcp)), so a fence login cannot open a
//! queue of its own. Instead the live connection opens a second socket on
//! its own interface ([`Transport::open_side`]) and hands out a
//! [`SideTcp`]; the thread that owns the live connection (the path worker)
//! moves the side's bytes between the socket and two byte queues on every
//! [`Transport::pump_side`] call, and the helper thread that runs the login
//! reads and writes those queues. The live connection's own I/O path is
//! untouched: no lock on it, and frames of the side connection stop in its
//! socket's receive ring until the next pump.
//!
//! When the owning connection is dropped (its session failed), the side
//! connection fails too ("the connection carrying it ended").

use super::{Transport, TransportError};
use std::collections::VecDeque;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most bytes each direction's queue holds (a login exchange is a few KiB).
pub(crate) const SIDE_QUEUE: usize = 256 * 1024;

/// Where a side connection stands, as its owner last saw the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SidePhase {
    /// SYN sent, no answer yet.
    Connecting,
    /// Established: bytes flow.
    Open,
    /// The peer sent FIN (`None`) or the connection failed (the reason).
    Ended(Option<String>),
}

/// The state both ends share.
#[derive(Debug)]
pub(crate) struct SideState {
    /// Bytes the user wrote, not yet in the socket.
    pub tx: VecDeque<u8>,
    /// Bytes the socket received, not yet read by the user.
    pub rx: VecDeque<u8>,
    pub phase: SidePhase,
    /// The user closed (or dropped) its end: the owner closes the socket.
    pub user_closed: bool,
    /// The owning connection is gone: the socket with it.
    pub owner_gone: bool,
}

#[derive(Debug)]
pub(crate) struct SideShared {
    state: Mutex<SideState>,
    changed: Condvar,
}

impl SideShared {
    pub(crate) fn new() -> Arc<SideShared> {
        Arc::new(SideShared {
            state: Mutex::new(SideState {
                tx: VecDeque::new(),
                rx: VecDeque::new(),
                phase: SidePhase::Connecting,
                user_closed: false,
                owner_gone: false,
            }),
            changed: Condvar::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SideState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes a user waiting in [`SideTcp::wait`] or
    /// [`SideTcp::wait_connected`].
    pub(crate) fn notify(&self) {
        self.changed.notify_all();
    }
}

/// The owner's end, kept by the live connection: when it goes (the live
/// connection was dropped), the user's end fails.
#[derive(Debug)]
pub(crate) struct SideOwner(pub Arc<SideShared>);

impl Drop for SideOwner {
    fn drop(&mut self) {
        self.0.lock().owner_gone = true;
        self.0.notify();
    }
}

/// The user's end of a side connection: a [`Transport`] for another
/// thread, carried by the owning connection's pumps.
#[derive(Debug)]
pub struct SideTcp {
    shared: Arc<SideShared>,
    local: SocketAddrV4,
    remote: SocketAddrV4,
}

fn gone() -> TransportError {
    TransportError::Reset(
        "the connection whose userspace stack carried this side connection ended".into(),
    )
}

impl SideTcp {
    pub(crate) fn new(
        shared: Arc<SideShared>,
        local: SocketAddrV4,
        remote: SocketAddrV4,
    ) -> SideTcp {
        SideTcp {
            shared,
            local,
            remote,
        }
    }

    /// Waits until the handshake is done (the owner must keep pumping).
    pub fn wait_connected(&self, timeout: Duration) -> Result<(), TransportError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.owner_gone {
                return Err(TransportError::Connect {
                    addr: self.remote.into(),
                    source: std::io::Error::other(gone().to_string()),
                });
            }
            match &st.phase {
                SidePhase::Open => return Ok(()),
                SidePhase::Ended(why) => {
                    return Err(TransportError::Connect {
                        addr: self.remote.into(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionRefused,
                            why.clone().unwrap_or_else(|| "closed by the peer".into()),
                        ),
                    })
                }
                SidePhase::Connecting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::ConnectTimeout {
                    addr: self.remote.into(),
                    timeout,
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Transport for SideTcp {
    fn send(&mut self, buf: &[u8]) -> Result<usize, TransportError> {
        let mut st = self.shared.lock();
        if st.owner_gone {
            return Err(gone());
        }
        match &st.phase {
            SidePhase::Open => {}
            SidePhase::Connecting => return Ok(0),
            SidePhase::Ended(None) => return Err(TransportError::Closed),
            SidePhase::Ended(Some(why)) => return Err(TransportError::Reset(why.clone())),
        }
        if st.user_closed {
            return Err(TransportError::Closed);
        }
        let n = buf.len().min(SIDE_QUEUE.saturating_sub(st.tx.len()));
        st.tx.extend(&buf[..n]);
        Ok(n)
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let mut st = self.shared.lock();
        if !st.rx.is_empty() {
            let n = buf.len().min(st.rx.len());
            for (b, byte) in buf.iter_mut().zip(st.rx.drain(..n)) {
                *b = byte;
            }
            return Ok(n);
        }
        if st.owner_gone {
            return Err(gone());
        }
        match &st.phase {
            SidePhase::Ended(None) => Err(TransportError::Closed),
            SidePhase::Ended(Some(why)) => Err(TransportError::Reset(why.clone())),
            _ => Ok(0),
        }
    }

    fn poll(&mut self) -> Result<(), TransportError> {
        if self.shared.lock().owner_gone {
            return Err(gone());
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            // Readability, as the kernel transport's poll(2) (a sender
            // that found the queue full retries after this anyway).
            let ready =
                !st.rx.is_empty() || st.owner_gone || matches!(st.phase, SidePhase::Ended(_));
            let now = Instant::now();
            if ready || now >= deadline {
                return Ok(());
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn close(&mut self) {
        self.shared.lock().user_closed = true;
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::V4(self.local))
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(SocketAddr::V4(self.remote))
    }
}

impl Drop for SideTcp {
    fn drop(&mut self) {
        self.shared.lock().user_closed = true;
    }
}
