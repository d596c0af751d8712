//! The send queue of one socket: the bytes from `SND.UNA` on, some copied
//! into a ring (small things: iSCSI headers, digests), some only referenced
//! (a write's payload, [`SharedBytes`]) so they are copied once, straight
//! from the caller's buffer into the outgoing frame. A reference is held
//! until the peer acknowledges the last of its bytes; a retransmission
//! reads them from the same buffer again.

use super::super::ring::RingBuffer;
use std::collections::VecDeque;
use std::sync::Arc;

/// A buffer the socket may send from without copying it first. The socket
/// keeps a clone until its bytes are acknowledged; the owner gets it back
/// (`Arc::try_unwrap`) once nobody else holds it.
pub type SharedBytes = Arc<Vec<u8>>;

/// Most pieces one segment's payload is gathered from.
pub const MAX_GATHER: usize = 16;

#[derive(Debug)]
enum Kind {
    /// Ring bytes, the first of them the `ring_at`-th byte ever put in the
    /// ring.
    Inline { ring_at: u64 },
    /// `buf[start..]`.
    Shared { buf: SharedBytes, start: usize },
}

/// `len` bytes of the stream from its `at`-th byte (positions count from
/// the queue's creation and never move, so a lookup is a binary search and
/// acknowledging bytes changes no piece but the first).
#[derive(Debug)]
struct Piece {
    at: u64,
    len: usize,
    kind: Kind,
}

impl Piece {
    fn end(&self) -> u64 {
        self.at + self.len as u64
    }
}

/// The unacknowledged and unsent bytes, in stream order. While nothing is
/// shared, `pieces` is empty and the ring holds everything (the old, pure
/// ring behaviour, with no per-piece walk).
#[derive(Debug)]
pub struct SendBuffer {
    ring: RingBuffer,
    pieces: VecDeque<Piece>,
    /// Shared pieces in `pieces`.
    shared: usize,
    len: usize,
    /// Stream position of the first byte queued (`SND.UNA`'s byte).
    head: u64,
    /// Bytes ever taken out of the ring: the ring position of its first byte.
    ring_head: u64,
}

impl SendBuffer {
    pub fn new(capacity: usize) -> SendBuffer {
        SendBuffer {
            ring: RingBuffer::new(capacity),
            pieces: VecDeque::new(),
            shared: 0,
            len: 0,
            head: 0,
            ring_head: 0,
        }
    }
    /// Bytes queued (copied and referenced) may not exceed this.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn window(&self) -> usize {
        self.capacity() - self.len
    }
    /// Bytes held by reference, not copied.
    pub fn shared_len(&self) -> usize {
        let head = self.head;
        self.pieces
            .iter()
            .filter(|p| matches!(p.kind, Kind::Shared { .. }))
            .map(|p| (p.end() - p.at.max(head)) as usize)
            .sum()
    }
    pub fn clear(&mut self) {
        self.ring.clear();
        self.pieces.clear();
        self.shared = 0;
        self.len = 0;
        self.head = 0;
        self.ring_head = 0;
    }

    /// Stream position just past the last byte queued.
    fn tail(&self) -> u64 {
        self.head + self.len as u64
    }

    /// Copies as much of `data` as fits; returns the count.
    pub fn enqueue_slice(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.window());
        let ring_tail = self.ring_head + self.ring.len() as u64;
        let written = self.ring.enqueue_slice(&data[..n]);
        if written > 0 && self.shared > 0 {
            let at = self.tail();
            match self.pieces.back_mut() {
                // Ring bytes are in stream order: the last inline piece
                // grows when nothing was shared after it.
                Some(p) if matches!(p.kind, Kind::Inline { .. }) => p.len += written,
                _ => self.pieces.push_back(Piece {
                    at,
                    len: written,
                    kind: Kind::Inline { ring_at: ring_tail },
                }),
            }
        }
        self.len += written;
        written
    }

    /// Queues `buf[start..start + len]` by reference, as much as fits;
    /// returns the count (the caller offers the rest later).
    pub fn enqueue_shared(&mut self, buf: &SharedBytes, start: usize, len: usize) -> usize {
        let end = start.saturating_add(len).min(buf.len());
        let n = end.saturating_sub(start).min(self.window());
        if n == 0 {
            return 0;
        }
        if self.shared == 0 {
            self.pieces.clear();
            if !self.ring.is_empty() {
                self.pieces.push_back(Piece {
                    at: self.head,
                    len: self.ring.len(),
                    kind: Kind::Inline {
                        ring_at: self.ring_head,
                    },
                });
            }
        }
        let at = self.tail();
        match self.pieces.back_mut() {
            // The next bytes of the same buffer extend the last piece.
            Some(Piece {
                len: l,
                kind: Kind::Shared { buf: b, start: s },
                ..
            }) if Arc::ptr_eq(b, buf) && *s + *l == start => *l += n,
            _ => {
                self.pieces.push_back(Piece {
                    at,
                    len: n,
                    kind: Kind::Shared {
                        buf: buf.clone(),
                        start,
                    },
                });
                self.shared += 1;
            }
        }
        self.len += n;
        n
    }

    /// At most `max` bytes of piece `index` from stream position `pos`
    /// (inside the piece).
    fn piece_slice(&self, index: usize, pos: u64, max: usize) -> &[u8] {
        let Some(piece) = self.pieces.get(index) else {
            return &[];
        };
        let into = (pos - piece.at) as usize;
        let n = max.min(piece.len - into);
        match &piece.kind {
            Kind::Inline { ring_at } => {
                let ring_offset = (ring_at + into as u64 - self.ring_head) as usize;
                self.ring.get_allocated(ring_offset, n)
            }
            Kind::Shared { buf, start } => &buf[start + into..start + into + n],
        }
    }

    /// The piece holding stream position `pos`, if any.
    fn find(&self, pos: u64) -> Option<usize> {
        let index = self.pieces.partition_point(|p| p.end() <= pos);
        (index < self.pieces.len()).then_some(index)
    }

    /// The contiguous bytes from `offset`, at most `max` of them.
    pub fn get_allocated(&self, offset: usize, max: usize) -> &[u8] {
        if self.shared == 0 {
            return self.ring.get_allocated(offset, max);
        }
        let pos = self.head + offset as u64;
        match self.find(pos) {
            Some(index) => self.piece_slice(index, pos, max),
            None => &[],
        }
    }

    /// Fills `out` with the slices holding `len` bytes from `offset` (fewer
    /// when they take more than `out.len()` slices or the queue ends);
    /// returns the slice count and the bytes they cover.
    pub fn gather<'a>(&'a self, offset: usize, len: usize, out: &mut [&'a [u8]]) -> (usize, usize) {
        let (mut count, mut total) = (0, 0);
        if self.shared == 0 {
            while count < out.len() && total < len {
                let piece = self.ring.get_allocated(offset + total, len - total);
                if piece.is_empty() {
                    break;
                }
                out[count] = piece;
                count += 1;
                total += piece.len();
            }
            return (count, total);
        }
        // One search, then the pieces after it in turn.
        let pos = self.head + offset as u64;
        let Some(mut index) = self.find(pos) else {
            return (0, 0);
        };
        while count < out.len() && total < len {
            let at = pos + total as u64;
            let piece = self.piece_slice(index, at, len - total);
            if piece.is_empty() {
                break;
            }
            // Short of the piece's end when the ring wraps inside it: the
            // same piece again, from where this slice ends.
            if self
                .pieces
                .get(index)
                .is_some_and(|p| at + piece.len() as u64 >= p.end())
            {
                index += 1;
            }
            out[count] = piece;
            count += 1;
            total += piece.len();
        }
        (count, total)
    }

    /// How many of `len` bytes from `offset` fit in at most `slices` slices.
    pub fn gatherable(&self, offset: usize, len: usize, slices: usize) -> usize {
        let mut out = [&[][..]; MAX_GATHER];
        let n = slices.clamp(1, MAX_GATHER);
        self.gather(offset, len, &mut out[..n]).1
    }

    /// Drops `count` bytes from the front (acknowledged), releasing the
    /// references whose bytes are all gone.
    pub fn dequeue_allocated(&mut self, count: usize) {
        let count = count.min(self.len);
        self.len -= count;
        if self.shared == 0 {
            self.ring.dequeue_allocated(count);
            self.ring_head += count as u64;
            self.head += count as u64;
            return;
        }
        let new_head = self.head + count as u64;
        while let Some(piece) = self.pieces.front() {
            let from = piece.at.max(self.head);
            let upto = piece.end().min(new_head);
            if let Kind::Inline { .. } = piece.kind {
                let n = upto.saturating_sub(from) as usize;
                self.ring.dequeue_allocated(n);
                self.ring_head += n as u64;
            }
            if piece.end() > new_head {
                break;
            }
            if let Some(Piece {
                kind: Kind::Shared { .. },
                ..
            }) = self.pieces.pop_front()
            {
                self.shared -= 1;
            }
            self.head = upto;
        }
        self.head = new_head;
        if self.shared == 0 {
            // Only ring bytes are left: back to the plain ring.
            self.pieces.clear();
        }
    }

    /// Moves an empty ring back to offset 0 (keeps later data contiguous).
    pub fn rewind_if_empty(&mut self) {
        if self.ring.is_empty() {
            self.ring.rewind_if_empty();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(b: &SendBuffer, offset: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = offset;
        loop {
            let piece = b.get_allocated(at, usize::MAX);
            if piece.is_empty() {
                return out;
            }
            out.extend_from_slice(piece);
            at += piece.len();
        }
    }

    #[test]
    fn inline_and_shared_pieces_keep_stream_order() {
        let mut b = SendBuffer::new(64);
        let data: SharedBytes = Arc::new((0u8..40).collect());
        assert_eq!(b.enqueue_slice(b"HDR1"), 4);
        assert_eq!(b.enqueue_shared(&data, 0, 16), 16);
        assert_eq!(b.enqueue_slice(b"HDR2"), 4);
        // Continues the same buffer: one piece, not two.
        assert_eq!(b.enqueue_shared(&data, 16, 8), 8);
        assert_eq!(b.enqueue_shared(&data, 24, 8), 8);
        assert_eq!(b.len(), 40);
        assert_eq!(b.shared_len(), 32);
        let mut want = b"HDR1".to_vec();
        want.extend(0u8..16);
        want.extend_from_slice(b"HDR2");
        want.extend(16u8..32);
        assert_eq!(collect(&b, 0), want);
        assert_eq!(collect(&b, 10), want[10..]);
        let mut slices = [&[][..]; 3];
        let (n, total) = b.gather(2, 30, &mut slices);
        assert_eq!((n, total), (3, 22), "3 slices cover 2..24");
        assert_eq!(b.gatherable(2, 30, MAX_GATHER), 30);
        // The references go as their bytes are acknowledged.
        assert_eq!(Arc::strong_count(&data), 3);
        b.dequeue_allocated(19);
        assert_eq!(Arc::strong_count(&data), 3, "first piece has one byte left");
        b.dequeue_allocated(1);
        assert_eq!(Arc::strong_count(&data), 2);
        assert_eq!(collect(&b, 0), want[20..]);
        b.dequeue_allocated(20);
        assert_eq!(Arc::strong_count(&data), 1);
        assert!(b.is_empty());
        assert_eq!(b.enqueue_slice(b"tail"), 4);
        assert_eq!(collect(&b, 0), b"tail");
    }

    proptest::proptest! {
        /// Any mix of copied and shared bytes, acknowledged in any steps,
        /// reads back as the same stream as a plain byte model: byte by
        /// byte lookups and gathers from any offset (the ring wraps).
        #[test]
        fn pieces_read_back_as_the_stream(
            ops in proptest::collection::vec((0u8..3, 0usize..40, 0usize..8), 1..60),
            offset in 0usize..64,
        ) {
            let mut b = SendBuffer::new(64);
            let data: SharedBytes = Arc::new((0..200u32).map(|i| (i * 7 + 3) as u8).collect());
            let mut model: Vec<u8> = Vec::new();
            let mut next = 0u8;
            let mut shared_at = 0usize;
            for (op, n, skip) in ops {
                match op {
                    0 => {
                        let bytes: Vec<u8> = (0..n).map(|i| next.wrapping_add(i as u8) | 0x80).collect();
                        next = next.wrapping_add(n as u8);
                        let took = b.enqueue_slice(&bytes);
                        model.extend_from_slice(&bytes[..took]);
                    }
                    1 => {
                        // Sometimes continues the last shared range, sometimes not.
                        let start = (shared_at + skip % 2) % 150;
                        let took = b.enqueue_shared(&data, start, n);
                        model.extend_from_slice(&data[start..start + took]);
                        shared_at = start + took;
                    }
                    _ => {
                        let n = n.min(model.len());
                        b.dequeue_allocated(n);
                        model.drain(..n);
                        b.rewind_if_empty();
                    }
                }
                proptest::prop_assert_eq!(b.len(), model.len());
                proptest::prop_assert_eq!(collect(&b, 0), model.clone());
                let from = offset.min(model.len());
                let mut slices = [&[][..]; MAX_GATHER];
                let (count, total) = b.gather(from, model.len() - from, &mut slices);
                let joined: Vec<u8> = slices[..count].concat();
                proptest::prop_assert_eq!(total, joined.len());
                proptest::prop_assert_eq!(&joined[..], &model[from..from + total]);
                proptest::prop_assert!(count == MAX_GATHER || total == model.len() - from);
            }
            b.clear();
            proptest::prop_assert_eq!(Arc::strong_count(&data), 1);
        }
    }

    #[test]
    fn shared_bytes_count_against_the_capacity() {
        let mut b = SendBuffer::new(16);
        let data: SharedBytes = Arc::new(vec![7; 32]);
        assert_eq!(b.enqueue_slice(b"abcd"), 4);
        assert_eq!(b.enqueue_shared(&data, 0, 32), 12);
        assert_eq!(b.window(), 0);
        assert_eq!(b.enqueue_slice(b"x"), 0);
        assert_eq!(b.enqueue_shared(&data, 12, 1), 0);
        // Out of range asks take nothing.
        b.dequeue_allocated(16);
        assert_eq!(b.enqueue_shared(&data, 40, 4), 0);
        b.clear();
        assert_eq!(Arc::strong_count(&data), 1);
    }
}
