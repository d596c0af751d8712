//! Tracks which byte ranges beyond `rcv_nxt` have arrived out of order, in a
//! fixed number of slots (no allocation per segment).

/// Received ranges as `[start, end)` offsets from the first missing byte.
#[derive(Debug, Clone)]
pub struct Assembler {
    ranges: [(usize, usize); Assembler::SLOTS],
    count: usize,
}

/// The segment could not be recorded: too many holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyHoles;

impl Default for Assembler {
    fn default() -> Self {
        Assembler {
            ranges: [(0, 0); Assembler::SLOTS],
            count: 0,
        }
    }
}

impl Assembler {
    pub const SLOTS: usize = 32;

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    pub fn clear(&mut self) {
        self.count = 0;
    }
    pub fn ranges(&self) -> &[(usize, usize)] {
        &self.ranges[..self.count]
    }

    /// Records `[offset, offset + len)`.
    pub fn add(&mut self, offset: usize, len: usize) -> Result<(), TooManyHoles> {
        if len == 0 {
            return Ok(());
        }
        let (mut start, mut end) = (offset, offset + len);
        // Ranges are sorted and disjoint; merge every one that touches.
        let mut i = 0;
        while i < self.count && self.ranges[i].1 < start {
            i += 1;
        }
        let mut j = i;
        while j < self.count && self.ranges[j].0 <= end {
            start = start.min(self.ranges[j].0);
            end = end.max(self.ranges[j].1);
            j += 1;
        }
        let merged = j - i;
        if merged == 0 {
            if self.count == Self::SLOTS {
                return Err(TooManyHoles);
            }
            self.ranges.copy_within(i..self.count, i + 1);
            self.count += 1;
        } else if merged > 1 {
            self.ranges.copy_within(j..self.count, i + 1);
            self.count -= merged - 1;
        }
        self.ranges[i] = (start, end);
        Ok(())
    }

    /// If data starts at offset 0, removes that range and returns its length;
    /// the remaining offsets are shifted down by it.
    pub fn remove_front(&mut self) -> usize {
        if self.count == 0 || self.ranges[0].0 != 0 {
            return 0;
        }
        let len = self.ranges[0].1;
        self.ranges.copy_within(1..self.count, 0);
        self.count -= 1;
        self.shift(len);
        len
    }

    /// Moves the origin forward by `by` bytes (data arrived in order).
    pub fn shift(&mut self, by: usize) {
        let mut kept = 0;
        for i in 0..self.count {
            let (s, e) = self.ranges[i];
            if e > by {
                self.ranges[kept] = (s.saturating_sub(by), e - by);
                kept += 1;
            }
        }
        self.count = kept;
    }

    /// The range containing `offset`, if any.
    pub fn range_containing(&self, offset: usize) -> Option<(usize, usize)> {
        self.ranges()
            .iter()
            .copied()
            .find(|&(s, e)| s <= offset && offset < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_removes() {
        let mut a = Assembler::default();
        a.add(10, 5).unwrap();
        a.add(20, 5).unwrap();
        assert_eq!(a.ranges(), &[(10, 15), (20, 25)]);
        a.add(15, 5).unwrap();
        assert_eq!(a.ranges(), &[(10, 25)]);
        assert_eq!(a.remove_front(), 0);
        a.add(0, 10).unwrap();
        assert_eq!(a.remove_front(), 25);
        assert!(a.is_empty());
    }

    #[test]
    fn overlapping_and_full() {
        let mut a = Assembler::default();
        for i in 0..Assembler::SLOTS {
            a.add(i * 10 + 1, 2).unwrap();
        }
        assert_eq!(a.add(1000, 1), Err(TooManyHoles));
        a.add(0, 1000).unwrap();
        assert_eq!(a.ranges(), &[(0, 1000)]);
        a.add(5, 10).unwrap();
        assert_eq!(a.ranges(), &[(0, 1000)]);
    }

    #[test]
    fn shift_drops_covered_ranges() {
        let mut a = Assembler::default();
        a.add(5, 5).unwrap();
        a.add(20, 5).unwrap();
        a.shift(7);
        assert_eq!(a.ranges(), &[(0, 3), (13, 18)]);
    }
}
