//! A bounded, lock-free single-producer/single-consumer ring.
//!
//! The one place in the worker layer that needs `unsafe`: slots are
//! `UnsafeCell<MaybeUninit<T>>` handed between exactly two threads by the
//! head/tail protocol below. It is model checked with loom
//! (`RUSTFLAGS="--cfg loom" cargo test --release --lib worker::ring`).
//!
//! Protocol: the producer owns `tail`, the consumer owns `head`; both are
//! free-running counters (wrapping), the slot is `index & mask`. The producer
//! writes a slot, then publishes it with a Release store of `tail`; the
//! consumer sees it with an Acquire load of `tail`, reads the slot, then hands
//! the slot back with a Release store of `head`, which the producer Acquires
//! before reusing the slot. Each side caches the other's index and reloads it
//! only when the ring looks full/empty, so the common case touches no shared
//! cache line.
#![allow(unsafe_code)]

use super::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};
use crossbeam::utils::CachePadded;
use std::mem::MaybeUninit;

struct Ring<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
    /// Next slot the consumer reads.
    head: CachePadded<AtomicUsize>,
    /// Next slot the producer writes.
    tail: CachePadded<AtomicUsize>,
}

// SAFETY: a `Ring` hands each `T` from one thread to another exactly once
// (the head/tail protocol gives every slot a single owner at a time), so it
// is as thread-safe as sending the `T` itself.
unsafe impl<T: Send> Send for Ring<T> {}
// SAFETY: as above; the only shared mutable state is the slots, whose
// accesses are ordered by the Acquire/Release pairs on head and tail.
unsafe impl<T: Send> Sync for Ring<T> {}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // Both ends are gone (we hold the last Arc): drop what is left.
        let mut head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        while head != tail {
            let slot = &self.slots[head & self.mask];
            // SAFETY: slots in head..tail were written by the producer and
            // not read by the consumer; we are the only owner now.
            slot.with_mut(|p| unsafe { (*p).assume_init_drop() });
            head = head.wrapping_add(1);
        }
    }
}

/// The sending end. Not `Clone`: one producer.
pub struct Producer<T> {
    ring: Arc<Ring<T>>,
    tail: usize,
    cached_head: usize,
}

/// The receiving end. Not `Clone`: one consumer.
pub struct Consumer<T> {
    ring: Arc<Ring<T>>,
    head: usize,
    cached_tail: usize,
}

impl<T> std::fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .field("tail", &self.tail)
            .finish()
    }
}

impl<T> std::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .field("head", &self.head)
            .finish()
    }
}

/// Creates a ring holding at least `capacity` items (rounded up to a power
/// of two, at least 2).
pub fn ring<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let cap = capacity.max(2).next_power_of_two();
    let slots: Box<[UnsafeCell<MaybeUninit<T>>]> = (0..cap)
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let ring = Arc::new(Ring {
        slots,
        mask: cap - 1,
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
    });
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
            cached_head: 0,
        },
        Consumer {
            ring,
            head: 0,
            cached_tail: 0,
        },
    )
}

impl<T> Producer<T> {
    /// Appends `v`, or gives it back when the ring is full.
    pub fn push(&mut self, v: T) -> Result<(), T> {
        let cap = self.ring.mask + 1;
        if self.tail.wrapping_sub(self.cached_head) >= cap {
            self.cached_head = self.ring.head.load(Ordering::Acquire);
            if self.tail.wrapping_sub(self.cached_head) >= cap {
                return Err(v);
            }
        }
        let slot = &self.ring.slots[self.tail & self.ring.mask];
        // SAFETY: the slot is outside head..tail, so the consumer is done with
        // it (its Release store of head was Acquired above) and will not touch
        // it until our Release store of tail below.
        slot.with_mut(|p| unsafe { (*p).write(v) });
        self.tail = self.tail.wrapping_add(1);
        self.ring.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Free slots (a lower bound: the consumer may free more meanwhile).
    pub fn free(&mut self) -> usize {
        self.cached_head = self.ring.head.load(Ordering::Acquire);
        (self.ring.mask + 1) - self.tail.wrapping_sub(self.cached_head)
    }

    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }
}

impl<T> Consumer<T> {
    /// Takes the oldest item, if any.
    pub fn pop(&mut self) -> Option<T> {
        if self.head == self.cached_tail {
            self.cached_tail = self.ring.tail.load(Ordering::Acquire);
            if self.head == self.cached_tail {
                return None;
            }
        }
        let slot = &self.ring.slots[self.head & self.ring.mask];
        // SAFETY: the slot is in head..tail: the producer initialised it
        // before its Release store of tail (Acquired above) and will not
        // touch it until our Release store of head below.
        let v = slot.with_mut(|p| unsafe { (*p).assume_init_read() });
        self.head = self.head.wrapping_add(1);
        self.ring.head.store(self.head, Ordering::Release);
        Some(v)
    }

    /// Items waiting (a lower bound: the producer may add more meanwhile).
    pub fn len(&mut self) -> usize {
        self.cached_tail = self.ring.tail.load(Ordering::Acquire);
        self.cached_tail.wrapping_sub(self.head)
    }

    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.ring.mask + 1
    }
}

#[cfg(all(test, not(loom)))]
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

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    #[test]
    fn loom_spsc_transfers_in_order() {
        loom::model(|| {
            let (mut p, mut c) = ring::<usize>(2);
            let t = loom::thread::spawn(move || {
                let mut i = 0;
                while i < 3 {
                    match p.push(i) {
                        Ok(()) => i += 1,
                        Err(_) => loom::thread::yield_now(),
                    }
                }
            });
            let mut expect = 0;
            while expect < 3 {
                match c.pop() {
                    Some(v) => {
                        assert_eq!(v, expect);
                        expect += 1;
                    }
                    None => loom::thread::yield_now(),
                }
            }
            t.join().unwrap();
        });
    }

    #[test]
    fn loom_drop_with_items_in_flight() {
        loom::model(|| {
            let (mut p, mut c) = ring::<loom::sync::Arc<()>>(2);
            let item = loom::sync::Arc::new(());
            let probe = item.clone();
            let t = loom::thread::spawn(move || {
                let _ = p.push(item);
            });
            let _ = c.pop();
            t.join().unwrap();
            drop(c);
            // Popped or dropped with the ring: either way exactly once.
            assert_eq!(loom::sync::Arc::strong_count(&probe), 1);
        });
    }
}
