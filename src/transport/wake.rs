//! Wakes a worker blocked in its transport's wait: an eventfd that a
//! submitter writes only while the worker says it sleeps, so a busy worker
//! costs submitters one atomic load and no syscall.
//!
//! The handshake (no lost wake-up): the worker stores `sleeping = true`,
//! then looks at its rings once more, and blocks only if they were empty;
//! a submitter queues its work, then reads `sleeping`. Both sides put a
//! SeqCst fence between their store and their load, so at least one of
//! them sees the other's write.
//!
//! The worker reads the eventfd only when it was signalled: its poll saw
//! it readable, or a submitter counted a write since the last drain. A
//! write that lands after the worker woke for another reason leaves the
//! eventfd readable; the next sleep's poll then returns at once, sees it
//! and drains it (one spare round, never a lost wake-up).

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};

#[derive(Debug)]
pub struct Wake {
    fd: EventFd,
    sleeping: AtomicBool,
    /// Wake-ups written (each one a syscall by a submitter).
    notified: AtomicU64,
    /// The worker's own: its poll saw the eventfd readable.
    signalled: AtomicBool,
    /// The worker's own: `notified` when it last drained the eventfd.
    drained_at: AtomicU64,
    /// Reads of the eventfd (each one a syscall by the worker).
    drains: AtomicU64,
}

impl Wake {
    pub fn new() -> io::Result<Wake> {
        let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(io::Error::from)?;
        Ok(Wake {
            fd,
            sleeping: AtomicBool::new(false),
            notified: AtomicU64::new(0),
            signalled: AtomicBool::new(false),
            drained_at: AtomicU64::new(0),
            drains: AtomicU64::new(0),
        })
    }

    /// A submitter queued work: wakes the worker if it sleeps.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            self.notified.fetch_add(1, Ordering::Relaxed);
            // EAGAIN only when the counter is saturated: awake anyway.
            let _ = self.fd.write(1);
        }
    }

    /// The worker is about to block: after this, look at the rings once
    /// more and block only if they are empty.
    pub fn prepare_sleep(&self) {
        self.sleeping.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// The worker's wait saw the eventfd readable (call before
    /// [`finish_sleep`](Self::finish_sleep)).
    pub fn mark_signalled(&self) {
        self.signalled.store(true, Ordering::Relaxed);
    }

    /// The worker is awake again: drains the eventfd if it was signalled
    /// (no syscall after a wake-up by data or a timeout).
    pub fn finish_sleep(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
        let notified = self.notified.load(Ordering::Relaxed);
        let moved = notified != self.drained_at.load(Ordering::Relaxed);
        if self.signalled.swap(false, Ordering::Relaxed) || moved {
            self.drained_at.store(notified, Ordering::Relaxed);
            self.drains.fetch_add(1, Ordering::Relaxed);
            // Nonblocking: EAGAIN when the counted write has not landed yet
            // (then the next sleep's poll sees it).
            let _ = self.fd.read();
        }
    }

    /// Wake-ups written so far.
    pub fn notified(&self) -> u64 {
        self.notified.load(Ordering::Relaxed)
    }

    /// Reads of the eventfd so far.
    pub fn drains(&self) -> u64 {
        self.drains.load(Ordering::Relaxed)
    }

    /// The descriptor to poll for readability along with the socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    fn readable(w: &Wake) -> bool {
        let mut fds = [PollFd::new(w.fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn notifies_only_a_sleeping_worker() {
        let w = Wake::new().unwrap();
        w.notify();
        assert_eq!(w.notified(), 0, "an awake worker costs no syscall");
        assert!(!readable(&w));
        w.prepare_sleep();
        w.notify();
        assert_eq!(w.notified(), 1);
        assert!(readable(&w));
        w.finish_sleep();
        assert!(!readable(&w), "finish_sleep drains the wake-up");
        assert_eq!(w.drains(), 1);
        // Woken by data or a timeout, not signalled: no read.
        w.prepare_sleep();
        w.finish_sleep();
        assert_eq!(w.drains(), 1, "an unsignalled wake-up costs no syscall");
    }

    #[test]
    fn a_write_that_lands_after_the_drain_is_seen_by_the_next_poll() {
        let w = Wake::new().unwrap();
        w.prepare_sleep();
        // The worker woke for data; a submitter saw it asleep but its write
        // comes only after the worker's drain.
        w.notified.fetch_add(1, Ordering::Relaxed);
        w.finish_sleep();
        let _ = w.fd.write(1);
        assert!(readable(&w), "the late write stays readable");
        w.prepare_sleep();
        // The next poll sees it: marked and drained.
        assert!(readable(&w));
        w.mark_signalled();
        w.finish_sleep();
        assert!(!readable(&w));
    }

    #[test]
    fn a_blocked_poll_is_woken_by_another_thread() {
        let w = std::sync::Arc::new(Wake::new().unwrap());
        w.prepare_sleep();
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            w2.notify();
        });
        let start = std::time::Instant::now();
        let mut fds = [PollFd::new(w.fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
        assert_eq!(n, 1);
        assert!(start.elapsed() < std::time::Duration::from_secs(4));
        w.finish_sleep();
        t.join().unwrap();
    }
}
