//! The sender's record of SACKed ranges above `snd_una` (RFC 2018 / 6675),
//! in a fixed number of slots.

use crate::wire::tcp::SeqNumber;

#[derive(Debug, Clone, Default)]
pub struct Scoreboard {
    blocks: [(SeqNumber, SeqNumber); Scoreboard::SLOTS],
    count: usize,
}

impl Scoreboard {
    pub const SLOTS: usize = 16;

    pub fn clear(&mut self) {
        self.count = 0;
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn blocks(&self) -> &[(SeqNumber, SeqNumber)] {
        &self.blocks[..self.count]
    }

    /// Records a SACK block; blocks are kept sorted and disjoint. When the
    /// slots are full the highest block is dropped (it is the least useful
    /// for finding the next hole).
    pub fn add(&mut self, left: SeqNumber, right: SeqNumber) {
        if right <= left {
            return;
        }
        let (mut start, mut end) = (left, right);
        let mut i = 0;
        while i < self.count && self.blocks[i].1 < start {
            i += 1;
        }
        let mut j = i;
        while j < self.count && self.blocks[j].0 <= end {
            start = start.min(self.blocks[j].0);
            end = end.max(self.blocks[j].1);
            j += 1;
        }
        let merged = j - i;
        if merged == 0 {
            if self.count == Self::SLOTS {
                if i == Self::SLOTS {
                    return;
                }
                self.count -= 1;
            }
            self.blocks.copy_within(i..self.count, i + 1);
            self.count += 1;
        } else if merged > 1 {
            self.blocks.copy_within(j..self.count, i + 1);
            self.count -= merged - 1;
        }
        self.blocks[i] = (start, end);
    }

    /// Forgets everything below `snd_una`.
    pub fn prune(&mut self, snd_una: SeqNumber) {
        let mut kept = 0;
        for i in 0..self.count {
            let (l, r) = self.blocks[i];
            if r > snd_una {
                self.blocks[kept] = (l.max(snd_una), r);
                kept += 1;
            }
        }
        self.count = kept;
    }

    /// Right edge of the highest SACKed block.
    pub fn highest(&self) -> Option<SeqNumber> {
        self.blocks().last().map(|b| b.1)
    }

    /// The first sequence number at or after `from` that is not SACKed.
    pub fn next_unsacked(&self, from: SeqNumber) -> SeqNumber {
        let mut at = from;
        for &(l, r) in self.blocks() {
            if l <= at && at < r {
                at = r;
            }
        }
        at
    }

    /// Left edge of the first SACKed block after `from`.
    pub fn next_sacked_start(&self, from: SeqNumber) -> Option<SeqNumber> {
        self.blocks().iter().map(|b| b.0).find(|&l| l > from)
    }

    pub fn sacked_bytes(&self) -> usize {
        self.blocks().iter().map(|&(l, r)| r.since(l)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: u32) -> SeqNumber {
        SeqNumber(v)
    }

    #[test]
    fn merge_prune_and_holes() {
        let mut sb = Scoreboard::default();
        sb.add(s(300), s(400));
        sb.add(s(100), s(200));
        sb.add(s(200), s(250));
        assert_eq!(sb.blocks(), &[(s(100), s(250)), (s(300), s(400))]);
        assert_eq!(sb.next_unsacked(s(0)), s(0));
        assert_eq!(sb.next_unsacked(s(100)), s(250));
        assert_eq!(sb.next_sacked_start(s(250)), Some(s(300)));
        assert_eq!(sb.highest(), Some(s(400)));
        assert_eq!(sb.sacked_bytes(), 250);
        sb.prune(s(320));
        assert_eq!(sb.blocks(), &[(s(320), s(400))]);
    }

    #[test]
    fn wraps_across_zero() {
        let mut sb = Scoreboard::default();
        sb.add(s(u32::MAX - 10), s(5));
        sb.add(s(10), s(20));
        assert_eq!(sb.next_unsacked(s(u32::MAX - 5)), s(5));
        assert_eq!(sb.highest(), Some(s(20)));
    }

    #[test]
    fn full_drops_highest() {
        let mut sb = Scoreboard::default();
        for i in 0..Scoreboard::SLOTS as u32 + 2 {
            sb.add(s(i * 10), s(i * 10 + 5));
        }
        assert_eq!(sb.blocks().len(), Scoreboard::SLOTS);
        assert_eq!(sb.blocks()[0], (s(0), s(5)));
    }
}
