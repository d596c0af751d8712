//! Bounded single-producer/single-consumer rings between an application
//! queue and a path worker. Each ring has exactly one producer and one
//! consumer; the handles are not `Clone`, so the type system keeps it so.
//!
//! The storage is crossbeam's lock-free `ArrayQueue` (no allocation per
//! item, no locks). It replaced a hand-written ring so that `unsafe` stays in
//! `dpdk-sys` and the DPDK wrapper (`docs/architecture.md`); crossbeam's queue is
//! itself tested under loom and miri upstream.

use crossbeam::queue::ArrayQueue;
use std::sync::Arc;

/// The producing end.
pub struct Producer<T> {
    queue: Arc<ArrayQueue<T>>,
}

/// The consuming end.
pub struct Consumer<T> {
    queue: Arc<ArrayQueue<T>>,
}

impl<T> std::fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("len", &self.queue.len())
            .field("capacity", &self.queue.capacity())
            .finish()
    }
}

impl<T> std::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("len", &self.queue.len())
            .field("capacity", &self.queue.capacity())
            .finish()
    }
}

/// A ring with room for at least `capacity` items (rounded up to a power of
/// two, minimum 2, so depths stay predictable).
pub fn ring<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let cap = capacity.max(2).next_power_of_two();
    let queue = Arc::new(ArrayQueue::new(cap));
    (
        Producer {
            queue: queue.clone(),
        },
        Consumer { queue },
    )
}

impl<T> Producer<T> {
    /// Appends `v`, or gives it back when the ring is full.
    pub fn push(&mut self, v: T) -> Result<(), T> {
        self.queue.push(v)
    }

    /// Free slots right now.
    pub fn free(&mut self) -> usize {
        self.queue.capacity() - self.queue.len()
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }
}

impl<T> Consumer<T> {
    /// Takes the oldest item, if any.
    pub fn pop(&mut self) -> Option<T> {
        self.queue.pop()
    }

    /// Items waiting.
    pub fn len(&mut self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&mut self) -> bool {
        self.queue.is_empty()
    }

    /// Slots in the ring.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize as StdAtomic;

    #[test]
    fn capacity_rounds_up_to_power_of_two() {
        assert_eq!(ring::<u8>(0).0.capacity(), 2);
        assert_eq!(ring::<u8>(5).0.capacity(), 8);
        assert_eq!(ring::<u8>(64).1.capacity(), 64);
    }

    #[test]
    fn fifo_full_and_empty() {
        let (mut p, mut c) = ring(4);
        assert_eq!(c.pop(), None);
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(99), Err(99));
        assert_eq!(p.free(), 0);
        assert_eq!(c.len(), 4);
        assert_eq!(c.pop(), Some(0));
        p.push(4).unwrap();
        let got: Vec<i32> = std::iter::from_fn(|| c.pop()).collect();
        assert_eq!(got, vec![1, 2, 3, 4]);
        assert!(c.is_empty());
    }

    #[test]
    fn indices_wrap_around() {
        let (mut p, mut c) = ring(2);
        for i in 0..10_000u32 {
            p.push(i).unwrap();
            assert_eq!(c.pop(), Some(i));
        }
    }

    #[test]
    fn leftover_items_are_dropped_once() {
        static DROPS: StdAtomic = StdAtomic::new(0);
        struct D;
        impl Drop for D {
            fn drop(&mut self) {
                DROPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let (mut p, mut c) = ring(8);
        for _ in 0..5 {
            assert!(p.push(D).is_ok());
        }
        drop(c.pop());
        drop(p);
        drop(c);
        assert_eq!(DROPS.load(std::sync::atomic::Ordering::SeqCst), 5);
    }

    #[test]
    fn two_threads_keep_order_and_lose_nothing() {
        const N: u64 = 1_000_000;
        let (mut p, mut c) = ring::<u64>(64);
        let t = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                if p.push(i).is_ok() {
                    i += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        let mut expect = 0;
        while expect < N {
            if let Some(v) = c.pop() {
                assert_eq!(v, expect);
                expect += 1;
            } else {
                std::hint::spin_loop();
            }
        }
        t.join().unwrap();
    }

    #[test]
    fn buffers_travel_without_copies() {
        let (mut p, mut c) = ring::<Vec<u8>>(4);
        let v = vec![7u8; 4096];
        let ptr = v.as_ptr();
        p.push(v).unwrap();
        let back = c.pop().unwrap();
        assert_eq!(back.as_ptr(), ptr);
    }
}
