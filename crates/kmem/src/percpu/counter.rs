//! `percpu_counter` (`lib/percpu_counter.c`): a count updated on every CPU without sharing a
//! cache line, folded into a global value in batches.
//!
//! Each CPU adds to its own `s32` delta with a plain load and store. When a delta would reach
//! `±batch`, the CPU takes the counter's lock, adds the delta to the global `count` and zeroes
//! its own. So [`PercpuCounter::read`] (the global value alone) is off by less than
//! `batch * nr_cpu_ids`, and [`PercpuCounter::sum`] (the global value plus every delta, under
//! the lock) is exact whenever no update runs concurrently.

use core::sync::atomic::{AtomicI64, Ordering::Relaxed};

use super::PercpuPtr;
use crate::Kmem;
use crate::gfp::Gfp;
use crate::platform::Platform;
use crate::sync::SpinLock;

/// The default batch (`percpu_counter_batch`): `max(32, 2 * nr_cpu_ids)`.
pub fn percpu_counter_batch(nr_cpus: usize) -> i32 {
    (2 * nr_cpus).clamp(32, i32::MAX as usize) as i32
}

/// A per-CPU counter (`struct percpu_counter`).
pub struct PercpuCounter<'k, P: Platform> {
    kmem: &'k Kmem<P>,
    lock: SpinLock<()>, // serializes folds, sums and sets
    count: AtomicI64,   // the global value; written under `lock`, read anywhere
    counters: PercpuPtr<i32>,
    batch: i32,
}

// SAFETY: the per-CPU deltas are only accessed through atomic loads and stores; the global
// value is atomic; everything else is immutable.
unsafe impl<P: Platform + Sync> Sync for PercpuCounter<'_, P> {}
// SAFETY: as for `Sync`.
unsafe impl<P: Platform + Sync> Send for PercpuCounter<'_, P> {}

impl<'k, P: Platform> PercpuCounter<'k, P> {
    /// `percpu_counter_init(fbc, amount, gfp)`: a counter starting at `amount`, its deltas
    /// from `alloc_percpu_gfp`. `None` when they cannot be allocated.
    pub fn new(kmem: &'k Kmem<P>, amount: i64, gfp: Gfp) -> Option<Self> {
        let counters = kmem.alloc_percpu_gfp::<i32>(gfp)?;
        Some(PercpuCounter {
            kmem,
            lock: SpinLock::new(()),
            count: AtomicI64::new(amount),
            counters,
            batch: percpu_counter_batch(kmem.nr_cpus()),
        })
    }

    /// The batch [`PercpuCounter::add`] uses.
    pub fn batch(&self) -> i32 {
        self.batch
    }

    /// `percpu_counter_add`: [`PercpuCounter::add_batch`] with the default batch.
    #[inline]
    pub fn add(&self, amount: i64) {
        self.add_batch(amount, self.batch)
    }

    /// `percpu_counter_inc`.
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }

    /// `percpu_counter_dec`.
    #[inline]
    pub fn dec(&self) {
        self.add(-1)
    }

    /// `percpu_counter_sub`.
    #[inline]
    pub fn sub(&self, amount: i64) {
        self.add(amount.wrapping_neg())
    }

    /// `percpu_counter_add_batch`: adds `amount` to this CPU's delta, folding the delta into
    /// the global count when its magnitude reaches `batch`.
    ///
    /// Context: any; never sleeps.
    pub fn add_batch(&self, amount: i64, batch: i32) {
        let guard = self.kmem.platform().cpu_guard();
        let mine = self.counters.this_cpu_ptr(&guard).as_ptr();
        // SAFETY: the deltas are a live `i32` allocation owned by `self`, accessed only by
        // atomic loads and stores; this CPU's is written only inside its CPU section (held).
        let old = unsafe { <i32 as super::PcpuInt>::load(mine) };
        let count = i64::from(old) + amount;
        if count.unsigned_abs() >= u64::from(batch.unsigned_abs()) {
            let _l = self.lock.lock();
            self.count.store(self.count.load(Relaxed) + count, Relaxed);
            // SAFETY: as above.
            unsafe { <i32 as super::PcpuInt>::store(mine, 0) };
        } else {
            // SAFETY: as above; `|count| < batch` fits an `i32`.
            unsafe { <i32 as super::PcpuInt>::store(mine, count as i32) };
        }
        drop(guard);
    }

    /// `percpu_counter_read`: the global count alone; may be off by up to
    /// `batch * nr_cpu_ids`. Cheap.
    #[inline]
    pub fn read(&self) -> i64 {
        self.count.load(Relaxed)
    }

    /// `percpu_counter_read_positive`: [`PercpuCounter::read`], or 0 if negative.
    #[inline]
    pub fn read_positive(&self) -> i64 {
        self.read().max(0)
    }

    /// `percpu_counter_sum`: the global count plus every CPU's delta, under the lock. Exact
    /// when no update is in flight.
    pub fn sum(&self) -> i64 {
        let _l = self.lock.lock();
        let mut ret = self.count.load(Relaxed);
        for cpu in 0..self.kmem.nr_cpus() {
            // SAFETY: live `i32` deltas, atomic accesses only; `cpu` is in range.
            ret += i64::from(unsafe { self.counters.per_cpu_read(cpu) });
        }
        ret
    }

    /// `percpu_counter_sum_positive`.
    pub fn sum_positive(&self) -> i64 {
        self.sum().max(0)
    }

    /// `percpu_counter_set`: every delta to 0 and the count to `amount`. Racy against
    /// concurrent adds, as in Linux.
    pub fn set(&self, amount: i64) {
        let _l = self.lock.lock();
        for cpu in 0..self.kmem.nr_cpus() {
            // SAFETY: as in `sum`.
            unsafe { self.counters.per_cpu_write(cpu, 0) };
        }
        self.count.store(amount, Relaxed);
    }

    /// `__percpu_counter_compare`: the sign of `count - rhs` (-1, 0 or 1), from the cheap
    /// [`PercpuCounter::read`] when it is far enough from `rhs` to be sure, else from the
    /// exact [`PercpuCounter::sum`].
    pub fn compare_batch(&self, rhs: i64, batch: i32) -> i32 {
        let count = self.read();
        let slack = i64::from(batch) * self.kmem.nr_cpus() as i64;
        if (count - rhs).abs() > slack {
            return if count > rhs { 1 } else { -1 };
        }
        let count = self.sum();
        (count > rhs) as i32 - (count < rhs) as i32
    }

    /// `percpu_counter_compare`, with the default batch.
    pub fn compare(&self, rhs: i64) -> i32 {
        self.compare_batch(rhs, self.batch)
    }
}

impl<P: Platform> Drop for PercpuCounter<'_, P> {
    /// `percpu_counter_destroy`.
    fn drop(&mut self) {
        // SAFETY: the deltas are owned by `self`, which is going away.
        unsafe { self.kmem.free_percpu(self.counters) }
    }
}
