//! A fixed-capacity byte ring, allocated once per socket.

/// Bytes `[read_at, read_at + len)` (modulo capacity) are allocated; the
/// rest may hold out-of-order data written with `write_unallocated`.
#[derive(Debug)]
pub struct RingBuffer {
    storage: Box<[u8]>,
    read_at: usize,
    len: usize,
}

impl RingBuffer {
    pub fn new(capacity: usize) -> RingBuffer {
        RingBuffer {
            storage: vec![0u8; capacity].into_boxed_slice(),
            read_at: 0,
            len: 0,
        }
    }
    pub fn capacity(&self) -> usize {
        self.storage.len()
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
    pub fn clear(&mut self) {
        self.read_at = 0;
        self.len = 0;
    }

    fn index(&self, offset: usize) -> usize {
        let cap = self.capacity();
        if cap == 0 {
            0
        } else {
            (self.read_at + offset) % cap
        }
    }

    /// Appends as much of `data` as fits; returns the count.
    pub fn enqueue_slice(&mut self, data: &[u8]) -> usize {
        let written = self.write_unallocated(0, data);
        self.len += written;
        written
    }

    /// Copies `data` into the free space starting `offset` bytes after the
    /// allocated part; returns how many bytes fit.
    pub fn write_unallocated(&mut self, offset: usize, data: &[u8]) -> usize {
        let free = self.window();
        if offset >= free {
            return 0;
        }
        let count = data.len().min(free - offset);
        let start = self.index(self.len + offset);
        let first = count.min(self.capacity() - start);
        self.storage[start..start + first].copy_from_slice(&data[..first]);
        self.storage[..count - first].copy_from_slice(&data[first..count]);
        count
    }

    /// Marks `count` bytes after the allocated part as allocated.
    pub fn enqueue_unallocated(&mut self, count: usize) {
        self.len += count.min(self.window());
    }

    /// Copies up to `buf.len()` bytes out; returns the count.
    pub fn dequeue_slice(&mut self, buf: &mut [u8]) -> usize {
        let count = self.read_allocated(0, buf);
        self.dequeue_allocated(count);
        count
    }

    /// Copies allocated bytes from `offset` without consuming them.
    pub fn read_allocated(&self, offset: usize, buf: &mut [u8]) -> usize {
        if offset >= self.len {
            return 0;
        }
        let count = buf.len().min(self.len - offset);
        let start = self.index(offset);
        let first = count.min(self.capacity() - start);
        buf[..first].copy_from_slice(&self.storage[start..start + first]);
        buf[first..count].copy_from_slice(&self.storage[..count - first]);
        count
    }

    /// The contiguous allocated bytes from `offset`, at most `max` of them.
    pub fn get_allocated(&self, offset: usize, max: usize) -> &[u8] {
        if offset >= self.len {
            return &[];
        }
        let start = self.index(offset);
        let count = max.min(self.len - offset).min(self.capacity() - start);
        &self.storage[start..start + count]
    }

    /// Drops `count` bytes from the front.
    pub fn dequeue_allocated(&mut self, count: usize) {
        let count = count.min(self.len);
        self.read_at = self.index(count);
        self.len -= count;
    }

    /// Moves an empty ring back to offset 0, which keeps later data
    /// contiguous for longer. Only for rings without out-of-order data
    /// parked beyond the allocated part (the send buffer).
    pub fn rewind_if_empty(&mut self) {
        if self.len == 0 {
            self.read_at = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around() {
        let mut ring = RingBuffer::new(8);
        assert_eq!(ring.enqueue_slice(b"abcdef"), 6);
        let mut out = [0u8; 4];
        assert_eq!(ring.dequeue_slice(&mut out), 4);
        assert_eq!(&out, b"abcd");
        assert_eq!(ring.enqueue_slice(b"ghijklmn"), 6);
        assert_eq!(ring.get_allocated(0, 100), b"efgh");
        assert_eq!(ring.get_allocated(4, 100), b"ijkl");
        let mut all = [0u8; 8];
        assert_eq!(ring.read_allocated(0, &mut all), 8);
        assert_eq!(&all, b"efghijkl");
    }

    #[test]
    fn out_of_order_writes() {
        let mut ring = RingBuffer::new(8);
        assert_eq!(ring.write_unallocated(3, b"def"), 3);
        assert_eq!(ring.write_unallocated(0, b"abc"), 3);
        ring.enqueue_unallocated(6);
        let mut out = [0u8; 8];
        assert_eq!(ring.dequeue_slice(&mut out), 6);
        assert_eq!(&out[..6], b"abcdef");
        assert_eq!(ring.write_unallocated(8, b"x"), 0);
        assert_eq!(ring.write_unallocated(6, b"xyz"), 2);
    }
}
