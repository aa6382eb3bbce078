//! Two threads freeing each other's objects, through lock-free single-producer,
//! single-consumer rings of batches.
//!
//! Thread A (the benchmarking thread) and thread B (a worker) each run [`exchange`]: allocate
//! a batch of objects straight into a free slot of their outgoing ring, publish it, then take
//! one batch from their incoming ring and free every object in it. Every object is allocated
//! by one thread and freed by the other. A ring holds a few batches, so each thread can run
//! ahead of the other by that much; neither ever waits for its own batch to come back.
//!
//! The rings are this module's own (no channel, no lock, no allocation after setup), so the
//! only allocator calls in the loop are the ones measured. A thread waiting on a ring spins a
//! little, then yields. When one side's handle is dropped (its thread ended, or unwound from a
//! panic) the ring is closed and the other side panics instead of waiting forever.

use std::cell::UnsafeCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::Scope;

use crate::harness::FixedSampler;
use crate::objsource::ObjSource;

/// Spins before a waiter starts yielding.
const SPINS: u32 = 128;

#[repr(align(128))]
struct Padded<T>(T);

/// The shared part of a ring: `cap` slots of `batch` words.
struct Ring {
    batch: usize,
    cap: usize,
    slots: Box<[UnsafeCell<usize>]>,
    /// Slots consumed so far; written by the consumer only.
    head: Padded<AtomicUsize>,
    /// Slots produced so far; written by the producer only.
    tail: Padded<AtomicUsize>,
    /// Set when either handle is dropped.
    closed: AtomicBool,
}

// SAFETY: a slot is written only by the producer while it is free (`tail - head < cap`, the
// consumer does not read it) and read only by the consumer while it is full; `tail` is
// published with Release after the writes and read with Acquire before the reads, and `head`
// likewise in the other direction. Only one `Producer` and one `Consumer` exist per ring.
unsafe impl Sync for Ring {}
// SAFETY: as above; the words are plain integers.
unsafe impl Send for Ring {}

impl Ring {
    fn slot(&self, i: usize) -> *mut usize {
        let start = (i % self.cap) * self.batch;
        self.slots[start].get()
    }
}

/// The sending end of a ring.
pub struct Producer {
    ring: Arc<Ring>,
    tail: usize,
}

/// The receiving end of a ring.
pub struct Consumer {
    ring: Arc<Ring>,
    head: usize,
}

/// A ring of `cap` batches of `batch` words: one producer, one consumer.
pub fn ring(cap: usize, batch: usize) -> (Producer, Consumer) {
    assert!(
        cap > 0 && batch > 0,
        "a ring needs at least one slot of one word"
    );
    let ring = Arc::new(Ring {
        batch,
        cap,
        slots: (0..cap * batch).map(|_| UnsafeCell::new(0)).collect(),
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
        closed: AtomicBool::new(false),
    });
    (
        Producer {
            ring: ring.clone(),
            tail: 0,
        },
        Consumer { ring, head: 0 },
    )
}

/// Waits until `ready()`; panics if the ring is closed and still not ready (a closing side
/// stores `closed` with Release after its last publication, so nothing is lost).
#[inline(always)]
fn wait_until(closed: &AtomicBool, ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        if closed.load(Ordering::Acquire) && !ready() {
            panic!("cross-free: the other thread is gone");
        }
        spins += 1;
        if spins < SPINS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

impl Producer {
    /// Waits for a free slot, lets `fill` write its `batch` words, and publishes it.
    #[inline(always)]
    pub fn produce(&mut self, fill: impl FnOnce(&mut [usize])) {
        let r = &*self.ring;
        let tail = self.tail;
        wait_until(&r.closed, || {
            tail - r.head.0.load(Ordering::Acquire) < r.cap
        });
        // SAFETY: the slot is free (see `Ring`'s Sync impl) and only this producer writes it.
        let slot = unsafe { std::slice::from_raw_parts_mut(r.slot(self.tail), r.batch) };
        fill(slot);
        self.tail += 1;
        r.tail.0.store(self.tail, Ordering::Release);
    }
}

impl Consumer {
    /// Waits for a full slot, lets `take` read its `batch` words, and frees the slot.
    #[inline(always)]
    pub fn consume(&mut self, take: impl FnOnce(&[usize])) {
        let r = &*self.ring;
        let head = self.head;
        wait_until(&r.closed, || r.tail.0.load(Ordering::Acquire) != head);
        // SAFETY: the slot is full and the producer does not touch it until `head` passes it.
        let slot = unsafe { std::slice::from_raw_parts(r.slot(self.head), r.batch) };
        take(slot);
        self.head += 1;
        r.head.0.store(self.head, Ordering::Release);
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.ring.closed.store(true, Ordering::Release);
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.ring.closed.store(true, Ordering::Release);
    }
}

/// One thread's side of the exchange: `batches` times, allocate a batch of `size`-byte
/// objects into `tx`, then free a batch from `rx`.
///
/// Every batch received must hold objects of `src`'s allocator of `size` bytes that the
/// other side allocated and handed over, freed by nobody else.
#[inline(never)]
pub fn exchange<S: ObjSource>(
    src: &mut S,
    tx: &mut Producer,
    rx: &mut Consumer,
    batches: u64,
    size: usize,
) {
    for _ in 0..batches {
        tx.produce(|slot| {
            for w in slot {
                *w = src.alloc(size) as usize;
            }
        });
        rx.consume(|slot| {
            for &p in slot {
                // SAFETY: the other side allocated `p` from the same allocator with `size`
                // and handed it over; only this side frees it, once.
                unsafe { src.free(p as *mut u8, size) };
            }
        });
    }
}

/// The shape of a cross-free run.
#[derive(Clone, Copy, Debug)]
pub struct CrossFreeParams {
    /// Object size in bytes.
    pub size: usize,
    /// Objects per batch.
    pub batch: usize,
    /// Batches each ring holds.
    pub ring: usize,
    /// Untimed batches per thread.
    pub warmup_batches: u64,
    /// Batches per thread per timed sample.
    pub batches: u64,
}

/// The cross-free case for one allocator: `a` is used on the calling thread, `b` moves to a
/// worker thread spawned in `scope` that lives as long as the returned sampler. One unit of
/// the sampler is one batch each way (`2 * batch` objects, each allocated and freed once).
/// `a` and `b` must be sources of the same allocator.
pub(crate) fn cross_free_sampler<'scope, 'env, S>(
    scope: &'scope Scope<'scope, 'env>,
    mut a: S,
    mut b: S,
    p: CrossFreeParams,
) -> FixedSampler<impl FnMut(u64) + 'scope>
where
    S: ObjSource + Send + 'scope,
{
    let CrossFreeParams { size, batch, .. } = p;
    let (mut a_tx, mut b_rx) = ring(p.ring, batch);
    let (mut b_tx, mut a_rx) = ring(p.ring, batch);
    let (cmd_tx, cmd_rx) = mpsc::channel::<u64>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("cross-free-b".into())
        .spawn_scoped(scope, move || {
            while let Ok(n) = cmd_rx.recv() {
                exchange(&mut b, &mut b_tx, &mut b_rx, n, size);
                if done_tx.send(()).is_err() {
                    break;
                }
            }
        })
        .expect("cross-free: spawning the worker thread");
    let f = move |n: u64| {
        cmd_tx.send(n).expect("cross-free: the worker is gone");
        exchange(&mut a, &mut a_tx, &mut a_rx, n, size);
        done_rx.recv().expect("cross-free: the worker is gone");
    };
    FixedSampler::new(f, p.warmup_batches, p.batches, 2 * batch as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_passes_batches_in_order_between_threads() {
        let (mut tx, mut rx) = ring(3, 5);
        std::thread::scope(|s| {
            s.spawn(move || {
                for i in 0..1000usize {
                    tx.produce(|slot| slot.iter_mut().for_each(|w| *w = i));
                }
            });
            for i in 0..1000usize {
                rx.consume(|slot| assert!(slot.iter().all(|&w| w == i)));
            }
        });
    }

    #[test]
    #[should_panic(expected = "the other thread is gone")]
    fn a_dropped_producer_closes_the_ring() {
        let (tx, mut rx) = ring(1, 1);
        drop(tx);
        rx.consume(|_| {});
    }
}
