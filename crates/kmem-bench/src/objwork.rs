//! The object workloads: an alloc+free pair of one size, and a random-size churn over a
//! working set of live objects.
//!
//! Both are generic over [`ObjSource`] and `#[inline(never)]`, so each allocator gets its own
//! compiled loop (callgrind shows them as `obj_pair_loop<…>` / `WorkingSet<…>::run`: the
//! churn is the [`WorkingSet`] of [`crate::workload`] over the [`Objects`] adapter).

use std::hint::black_box;

use crate::objsource::ObjSource;
use crate::workload::{ChurnSource, WorkingSet};

/// Smallest size the churn draws.
pub const CHURN_MIN_SIZE: usize = 8;
/// Largest size the churn draws (kmalloc's largest cache class).
pub const CHURN_MAX_SIZE: usize = 8192;

/// The size drawn from random number `r`: uniform in
/// [`CHURN_MIN_SIZE`]`..=`[`CHURN_MAX_SIZE`], from the top 32 bits of `r` (multiply-shift,
/// no division).
#[inline(always)]
pub fn churn_size(r: u64) -> usize {
    const SPAN: u64 = (CHURN_MAX_SIZE - CHURN_MIN_SIZE + 1) as u64;
    CHURN_MIN_SIZE + (((r >> 32) * SPAN) >> 32) as usize
}

/// Does `n` alloc+free pairs of `size` bytes on `src`.
#[inline(never)]
pub fn obj_pair_loop<S: ObjSource>(src: &mut S, size: usize, n: u64) {
    for _ in 0..n {
        let p = black_box(src.alloc(size));
        // SAFETY: `p` was just allocated from `src` with `size` and is freed once.
        unsafe { src.free(p, size) };
    }
}

/// An [`ObjSource`] as a [`ChurnSource`]: the request is an object size drawn by
/// [`churn_size`], the handle the object's address.
pub struct Objects<S: ObjSource>(S);

impl<S: ObjSource> ChurnSource for Objects<S> {
    type Request = usize;

    #[inline(always)]
    fn request(r: u64) -> usize {
        churn_size(r)
    }

    #[inline(always)]
    fn word(size: usize) -> u32 {
        // At most CHURN_MAX_SIZE: fits in a u32.
        size as u32
    }

    #[inline(always)]
    fn alloc(&mut self, size: usize) -> usize {
        self.0.alloc(size) as usize
    }

    #[inline(always)]
    unsafe fn free(&mut self, handle: usize, size: u32) {
        // SAFETY: by the caller's contract `handle` came from `alloc` on this source with a
        // size whose word is `size` (the word is the size itself: no size drawn exceeds
        // `u32::MAX`), i.e. it is the address the object source's `alloc` returned for that
        // size, and it is freed once.
        unsafe { self.0.free(handle as *mut u8, size as usize) };
    }
}

/// A working set of live objects on one source. Each step frees a random live object and
/// allocates one of a random size ([`churn_size`]) in its place; the sequence comes from a
/// fixed-seed [`XorShift64`](crate::workload::XorShift64), the same for every allocator.
/// Dropping the churn frees every live object.
pub type ObjChurn<S> = WorkingSet<Objects<S>>;

impl<S: ObjSource> ObjChurn<S> {
    /// Fills a working set of `objects` objects (random sizes from `seed`) on `src`.
    pub fn new(src: S, objects: usize, seed: u64) -> ObjChurn<S> {
        WorkingSet::with_source(Objects(src), objects, seed)
    }

    /// Bytes asked for by the live objects.
    pub fn live_bytes(&self) -> usize {
        self.words().map(|s| s as usize).sum()
    }
}
