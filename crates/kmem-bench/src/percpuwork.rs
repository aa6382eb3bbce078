//! The per-CPU counter case: two threads increment a counter at the same time.
//!
//! * kmem: `this_cpu_inc` on an `alloc_percpu::<u64>()` of the machine (each thread runs on
//!   its own vCPU, so each adds to its own copy: a CPU section around a plain load and store);
//! * `atomic-fetch-add`: one shared `AtomicU64::fetch_add(1, Relaxed)`: the cache line
//!   bounces between the two cores;
//! * `thread-local`: a `thread_local!` `Cell<u64>`: what a process without CPU sections would
//!   do, a floor for the cost of the section itself.
//!
//! An operation is one increment on each thread (the threads run together, so ns/op is the
//! wall time over the increments of one thread). After every sample the counter's total is
//! checked against the increments made: a lost update fails the run.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kmem::gfp::GFP_KERNEL;
use kmem::percpu::PerCpuBox;
use kmem_hosted::Machine;
use kmem_hosted::platform::HostedPlatform;

/// A counter two threads increment.
pub trait Counter: Sync {
    /// Adds one, on the calling thread.
    fn inc(&self);
    /// The total so far (all threads quiet).
    fn total(&self) -> u64;
}

/// kmem's `this_cpu_inc` on a dynamic per-CPU `u64`.
pub struct KmemCounter<'k>(PerCpuBox<'k, HostedPlatform, u64>);

impl<'k> KmemCounter<'k> {
    /// A counter on `machine`'s per-CPU allocator.
    pub fn new(machine: &'k Machine) -> KmemCounter<'k> {
        KmemCounter(PerCpuBox::new(machine.kmem(), GFP_KERNEL).expect("alloc_percpu"))
    }
}

impl Counter for KmemCounter<'_> {
    #[inline(always)]
    fn inc(&self) {
        self.0.this_cpu_inc();
    }
    fn total(&self) -> u64 {
        self.0.sum()
    }
}

/// One `AtomicU64` shared by both threads, on its own cache line.
#[repr(align(128))]
#[derive(Default)]
pub struct SharedAtomic(AtomicU64);

impl Counter for SharedAtomic {
    #[inline(always)]
    fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    fn total(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

thread_local! {
    static LOCAL: Cell<u64> = const { Cell::new(0) };
}

/// A `thread_local!` cell per thread; each thread adds its count to `sum` when it finishes a
/// run.
#[derive(Default)]
pub struct ThreadLocal {
    sum: AtomicU64,
}

impl Counter for ThreadLocal {
    #[inline(always)]
    fn inc(&self) {
        LOCAL.with(|c| c.set(black_box(c.get()) + 1));
    }
    fn total(&self) -> u64 {
        self.sum.load(Relaxed)
    }
}

impl ThreadLocal {
    fn flush(&self) {
        self.sum.fetch_add(LOCAL.with(|c| c.replace(0)), Relaxed);
    }
}

/// Runs `n` increments on each of two threads at once, then checks the total grew by `2n`.
pub fn two_threads<C: Counter>(c: &C, n: u64, flush: impl Fn(&C) + Sync) {
    let before = c.total();
    let start = Barrier::new(2);
    let run = || {
        start.wait();
        for _ in 0..n {
            c.inc();
        }
        flush(c);
    };
    std::thread::scope(|s| {
        s.spawn(run);
        run();
    });
    let after = c.total();
    assert_eq!(
        after - before,
        2 * n,
        "a counter lost updates: {before} + 2 x {n} != {after}"
    );
}

/// [`two_threads`] for counters without a flush.
pub fn two_threads_plain<C: Counter>(c: &C, n: u64) {
    two_threads(c, n, |_| {})
}

/// [`two_threads`] for the thread-local counter.
pub fn two_threads_local(c: &ThreadLocal, n: u64) {
    two_threads(c, n, ThreadLocal::flush)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmem_hosted::MachineConfig;

    #[test]
    fn every_counter_counts_exactly() {
        let m = Machine::boot(MachineConfig::x86_64(64 << 20).with_cpus(2)).unwrap();
        let k = KmemCounter::new(&m);
        two_threads_plain(&k, 10_000);
        two_threads_plain(&k, 10_000);
        assert_eq!(k.total(), 40_000);
        let a = SharedAtomic::default();
        two_threads_plain(&a, 10_000);
        assert_eq!(a.total(), 20_000);
        let t = ThreadLocal::default();
        two_threads_local(&t, 10_000);
        assert_eq!(t.total(), 20_000);
    }
}
