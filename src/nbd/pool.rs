//! Data buffers shared by every connection of one export.
//!
//! A connection needs large buffers (request payloads, read data, its input
//! buffer) for as long as it lives. Allocating them per connection and
//! freeing them when it closes made the allocator keep them: glibc raises
//! its mmap threshold the first time a large block is freed, after which
//! every large block comes from the arena of the thread that asked for it,
//! and with one thread per client the process held the high-water of many
//! arenas (the soak's export grew by ~75 MB in 30 minutes at ~120
//! connections a minute). Buffers now come from one pool per export and go
//! back to it when a request, a reply or a connection is done, so once the
//! working set is allocated new connections allocate nothing large.
//!
//! The pool keeps at most `cap` bytes of free buffers; what comes back past
//! that is freed. Buffers are kept in power-of-two classes of capacity (4 KiB
//! up to 64 MiB) so a buffer taken for `n` bytes never reallocates while it
//! is filled to `n`.

use std::sync::Mutex;

/// Smallest class kept: 4 KiB (smaller buffers are not worth pooling).
const MIN_SHIFT: u32 = 12;
/// Largest class kept: 64 MiB (the largest request payload is 32 MiB plus
/// its header; bigger buffers are allocated and freed as they come).
const MAX_SHIFT: u32 = 26;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;

/// A bounded pool of byte buffers (see the module docs).
#[derive(Debug)]
pub(crate) struct BufPool {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Free buffers by class: `classes[i]` holds buffers with a capacity of
    /// at least `1 << (MIN_SHIFT + i)` bytes.
    classes: [Vec<Vec<u8>>; CLASSES],
    /// Capacity of the free buffers held.
    bytes: usize,
    /// Capacity of the buffers this pool allocated, less those it freed.
    owned: usize,
}

/// Class of a buffer that must hold `len` bytes (`None`: too large to pool).
fn class_for_len(len: usize) -> Option<usize> {
    let shift = len.max(1).checked_next_power_of_two()?.trailing_zeros();
    let shift = shift.max(MIN_SHIFT);
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

/// Class a buffer of capacity `cap` can serve (`None`: not pooled).
fn class_of_capacity(cap: usize) -> Option<usize> {
    if cap < 1 << MIN_SHIFT {
        return None;
    }
    let shift = usize::BITS - 1 - cap.leading_zeros();
    (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
}

impl BufPool {
    /// A pool keeping at most `cap` bytes of free buffers.
    pub(crate) fn new(cap: usize) -> BufPool {
        BufPool {
            cap,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer with room for at least `len` bytes: a free one of
    /// its class if there is one, else a new one with the class's full
    /// capacity. (Only its own class: a workload that repeats finds the same
    /// buffers again instead of taking larger ones others then miss.)
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let Some(c) = class_for_len(len) else {
            return Vec::with_capacity(len);
        };
        let mut inner = self.lock();
        if let Some(b) = inner.classes[c].pop() {
            inner.bytes -= b.capacity();
            return b;
        }
        let b = Vec::with_capacity(1 << (MIN_SHIFT as usize + c));
        inner.owned += b.capacity();
        b
    }

    /// Returns a buffer; it is kept (emptied) while the pool has room,
    /// freed otherwise.
    pub(crate) fn give(&self, mut b: Vec<u8>) {
        let cap = b.capacity();
        let Some(c) = class_of_capacity(cap) else {
            return;
        };
        let mut inner = self.lock();
        if inner.bytes + cap > self.cap {
            inner.owned = inner.owned.saturating_sub(cap);
            return;
        }
        b.clear();
        inner.bytes += cap;
        inner.classes[c].push(b);
    }

    /// Capacity of the free buffers held now.
    pub(crate) fn held_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Capacity of the pooled buffers in use or free now (those taken
    /// from the pool count from their allocation until it frees them).
    pub(crate) fn owned_bytes(&self) -> usize {
        self.lock().owned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_have_room_for_the_length_asked_and_come_back_for_reuse() {
        let pool = BufPool::new(8 << 20);
        let mut b = pool.take(300_000);
        assert!(b.capacity() >= 300_000);
        assert_eq!(b.capacity(), 512 << 10, "a full power-of-two class");
        b.resize(300_000, 7);
        let ptr = b.as_ptr();
        pool.give(b);
        assert_eq!(pool.held_bytes(), 512 << 10);
        // The same class is served from the pool.
        let again = pool.take(262_145);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty(), "buffers come back emptied");
        assert_eq!(pool.held_bytes(), 0);
        // A smaller request does not take a much larger buffer.
        pool.give(again);
        let small = pool.take(4096);
        assert_ne!(small.as_ptr(), ptr);
        assert_eq!(small.capacity(), 4096);
        assert_eq!(pool.held_bytes(), 512 << 10);
    }

    #[test]
    fn the_pool_never_holds_more_than_its_cap() {
        let cap = 4 << 20;
        let pool = BufPool::new(cap);
        // Many connections' worth of buffers coming back at once.
        let bufs: Vec<Vec<u8>> = (0..64).map(|i| pool.take(4096 << (i % 9))).collect();
        let total: usize = bufs.iter().map(Vec::capacity).sum();
        assert!(total > cap);
        for b in bufs {
            pool.give(b);
            assert!(pool.held_bytes() <= cap);
        }
        assert!(pool.held_bytes() > cap / 2, "the pool fills up to its cap");
        // Taking everything back out empties it; nothing is kept twice.
        let held = pool.held_bytes();
        let mut taken = 0;
        for i in 0..64 {
            taken += pool.take(4096 << (i % 9)).capacity();
        }
        assert!(taken >= held);
        assert_eq!(pool.held_bytes(), 0);
    }

    #[test]
    fn odd_sizes_are_pooled_by_the_class_they_can_serve() {
        let pool = BufPool::new(64 << 20);
        // Too small to pool, too large to pool: freed.
        pool.give(Vec::with_capacity(100));
        pool.give(Vec::with_capacity((64 << 20) + 1));
        assert_eq!(pool.held_bytes(), 0);
        let huge = pool.take(100 << 20);
        assert!(huge.capacity() >= 100 << 20);
        // A buffer grown to a capacity between classes serves the lower one.
        let mut b = Vec::with_capacity(5000);
        b.resize(5000, 1);
        let cap = b.capacity();
        pool.give(b);
        let t = pool.take(4096);
        assert_eq!(t.capacity(), cap);
        assert!(pool.take(5000).capacity() >= 5000);
        assert_eq!(class_for_len(0), Some(0));
        assert_eq!(class_for_len(usize::MAX), None);
    }
}
