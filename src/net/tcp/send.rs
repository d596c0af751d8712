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
enum Piece {
    /// This many bytes of the ring, in order.
    Inline(usize),
    /// `buf[start..start + len]`.
    Shared {
        buf: SharedBytes,
        start: usize,
        len: usize,
    },
}

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Inline(n) => *n,
            Piece::Shared { len, .. } => *len,
        }
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
}

impl SendBuffer {
    pub fn new(capacity: usize) -> SendBuffer {
        SendBuffer {
            ring: RingBuffer::new(capacity),
            pieces: VecDeque::new(),
            shared: 0,
            len: 0,
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
        self.pieces
            .iter()
            .filter(|p| matches!(p, Piece::Shared { .. }))
            .map(Piece::len)
            .sum()
    }
    pub fn clear(&mut self) {
        self.ring.clear();
        self.pieces.clear();
        self.shared = 0;
        self.len = 0;
    }

    /// Copies as much of `data` as fits; returns the count.
    pub fn enqueue_slice(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.window());
        let written = self.ring.enqueue_slice(&data[..n]);
        if written > 0 && self.shared > 0 {
            match self.pieces.back_mut() {
                Some(Piece::Inline(len)) => *len += written,
                _ => self.pieces.push_back(Piece::Inline(written)),
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
        if self.shared == 0 && !self.ring.is_empty() {
            self.pieces.clear();
            self.pieces.push_back(Piece::Inline(self.ring.len()));
        }
        match self.pieces.back_mut() {
            // The next bytes of the same buffer extend the last piece.
            Some(Piece::Shared {
                buf: b,
                start: s,
                len: l,
            }) if Arc::ptr_eq(b, buf) && *s + *l == start => *l += n,
            _ => {
                self.pieces.push_back(Piece::Shared {
                    buf: buf.clone(),
                    start,
                    len: n,
                });
                self.shared += 1;
            }
        }
        self.len += n;
        n
    }

    /// The contiguous bytes from `offset`, at most `max` of them.
    pub fn get_allocated(&self, offset: usize, max: usize) -> &[u8] {
        if self.shared == 0 {
            return self.ring.get_allocated(offset, max);
        }
        let mut at = 0;
        let mut ring_at = 0;
        for piece in &self.pieces {
            let len = piece.len();
            if offset < at + len {
                let into = offset - at;
                let n = max.min(len - into);
                return match piece {
                    Piece::Inline(_) => self.ring.get_allocated(ring_at + into, n),
                    Piece::Shared { buf, start, .. } => &buf[start + into..start + into + n],
                };
            }
            at += len;
            if let Piece::Inline(n) = piece {
                ring_at += n;
            }
        }
        &[]
    }

    /// Fills `out` with the slices holding `len` bytes from `offset` (fewer
    /// when they take more than `out.len()` slices or the queue ends);
    /// returns the slice count and the bytes they cover.
    pub fn gather<'a>(&'a self, offset: usize, len: usize, out: &mut [&'a [u8]]) -> (usize, usize) {
        let (mut count, mut total) = (0, 0);
        while count < out.len() && total < len {
            let piece = self.get_allocated(offset + total, len - total);
            if piece.is_empty() {
                break;
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
        let mut count = count.min(self.len);
        self.len -= count;
        if self.shared == 0 {
            self.ring.dequeue_allocated(count);
            return;
        }
        while count > 0 {
            let Some(piece) = self.pieces.front_mut() else {
                break;
            };
            let n = count.min(piece.len());
            count -= n;
            match piece {
                Piece::Inline(len) => {
                    self.ring.dequeue_allocated(n);
                    *len -= n;
                }
                Piece::Shared { start, len, .. } => {
                    *start += n;
                    *len -= n;
                }
            }
            if piece.len() == 0 {
                if let Some(Piece::Shared { .. }) = self.pieces.pop_front() {
                    self.shared -= 1;
                }
            }
        }
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
