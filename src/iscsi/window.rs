//! The CmdSN window of one session (RFC 7143 §3.2.2.1, §4.2.2.1), shared
//! lock-free by every connection of the session.
//!
//! With MC/S the connections of a session run on different workers, but the
//! session has one command numbering: the next CmdSN is taken with a
//! compare-and-swap that also checks the target's MaxCmdSN, and ExpCmdSN and
//! MaxCmdSN are merged from whichever connection a response arrives on
//! (serial-number arithmetic, never backwards). A session with one
//! connection (MPIO) has a window of its own that nobody else sees.

use crate::wire::iscsi::Sn;
use std::sync::atomic::{AtomicU32, Ordering};

/// The session's next CmdSN and the target's ExpCmdSN..=MaxCmdSN window.
#[derive(Debug)]
pub struct SessionWindow {
    next: AtomicU32,
    exp: AtomicU32,
    max: AtomicU32,
}

impl SessionWindow {
    /// A window starting at `cmd_sn` (the next CmdSN to give), with the
    /// target's `exp_cmd_sn`/`max_cmd_sn` from the leading login.
    pub fn new(cmd_sn: Sn, exp_cmd_sn: Sn, max_cmd_sn: Sn) -> SessionWindow {
        SessionWindow {
            next: AtomicU32::new(cmd_sn.0),
            exp: AtomicU32::new(exp_cmd_sn.0),
            max: AtomicU32::new(max_cmd_sn.0),
        }
    }

    /// The CmdSN the next non-immediate command will get (what immediate
    /// PDUs carry, RFC 7143 §3.2.2.1).
    pub fn next_cmd_sn(&self) -> Sn {
        Sn(self.next.load(Ordering::Acquire))
    }

    pub fn exp_cmd_sn(&self) -> Sn {
        Sn(self.exp.load(Ordering::Acquire))
    }

    pub fn max_cmd_sn(&self) -> Sn {
        Sn(self.max.load(Ordering::Acquire))
    }

    /// How many more non-immediate commands the window allows now.
    pub fn space(&self) -> u32 {
        let d = self.max_cmd_sn().diff(self.next_cmd_sn());
        if d < 0 {
            0
        } else {
            d as u32 + 1
        }
    }

    /// Takes the next CmdSN if the window has room (lock-free: one CAS; a
    /// connection that loses the race retries with the new value).
    pub fn try_take(&self) -> Option<Sn> {
        let mut cur = self.next.load(Ordering::Acquire);
        loop {
            if Sn(cur).gt(self.max_cmd_sn()) {
                return None;
            }
            match self.next.compare_exchange_weak(
                cur,
                cur.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Sn(cur)),
                Err(now) => cur = now,
            }
        }
    }

    /// Merges the target's ExpCmdSN/MaxCmdSN from a PDU that arrived on any
    /// connection. RFC 7143 §4.2.2.1: a pair with MaxCmdSN < ExpCmdSN - 1 is
    /// ignored, and neither value ever moves backwards (a stale PDU on a
    /// slower connection cannot shrink the window).
    pub fn update(&self, exp_cmd_sn: Sn, max_cmd_sn: Sn) {
        if max_cmd_sn.lt(Sn(exp_cmd_sn.0.wrapping_sub(1))) {
            return;
        }
        merge_max(&self.exp, exp_cmd_sn);
        merge_max(&self.max, max_cmd_sn);
    }
}

/// Raises `cell` to `v` if `v` is later in serial-number order.
fn merge_max(cell: &AtomicU32, v: Sn) {
    let mut cur = cell.load(Ordering::Acquire);
    while v.gt(Sn(cur)) {
        match cell.compare_exchange_weak(cur, v.0, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn takes_only_inside_the_window() {
        let w = SessionWindow::new(Sn(1), Sn(1), Sn(3));
        assert_eq!(w.space(), 3);
        assert_eq!(w.try_take(), Some(Sn(1)));
        assert_eq!(w.try_take(), Some(Sn(2)));
        assert_eq!(w.try_take(), Some(Sn(3)));
        assert_eq!(w.try_take(), None);
        assert_eq!(w.space(), 0);
        w.update(Sn(2), Sn(4));
        assert_eq!(w.try_take(), Some(Sn(4)));
        assert_eq!(w.try_take(), None);
    }

    #[test]
    fn merge_is_a_serial_max_and_ignores_bad_pairs() {
        let w = SessionWindow::new(Sn(u32::MAX - 1), Sn(u32::MAX - 1), Sn(u32::MAX));
        // Wraps: 2 is later than u32::MAX in serial arithmetic.
        w.update(Sn(u32::MAX), Sn(2));
        assert_eq!(w.max_cmd_sn(), Sn(2));
        assert_eq!(w.exp_cmd_sn(), Sn(u32::MAX));
        // A stale update from a slower connection does not shrink it.
        w.update(Sn(u32::MAX - 1), Sn(u32::MAX));
        assert_eq!(w.max_cmd_sn(), Sn(2));
        assert_eq!(w.exp_cmd_sn(), Sn(u32::MAX));
        // MaxCmdSN < ExpCmdSN - 1: ignored as a whole.
        w.update(Sn(100), Sn(50));
        assert_eq!((w.exp_cmd_sn(), w.max_cmd_sn()), (Sn(u32::MAX), Sn(2)));
        assert_eq!(w.space(), 5);
        let got: Vec<u32> = std::iter::from_fn(|| w.try_take()).map(|s| s.0).collect();
        assert_eq!(got, vec![u32::MAX - 1, u32::MAX, 0, 1, 2]);
    }

    /// Several threads take CmdSNs at once: each number is given exactly
    /// once and none past MaxCmdSN.
    #[test]
    fn concurrent_takers_get_distinct_numbers() {
        let w = Arc::new(SessionWindow::new(Sn(10), Sn(10), Sn(10 + 3999)));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(s) = w.try_take() {
                        mine.push(s.0);
                    }
                    mine
                })
            })
            .collect();
        let mut all: Vec<u32> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        assert_eq!(all, (10..10 + 4000).collect::<Vec<_>>());
    }
}
