//! The object workloads: an alloc+free pair of one size, and a random-size churn over a
//! working set of live objects.
//!
//! Both are generic over [`ObjSource`] and `#[inline(never)]`, so each allocator gets its own
//! compiled loop (callgrind shows them as `obj_pair_loop<…>` / `ObjChurn<…>::run`).

use std::hint::black_box;

use crate::objsource::ObjSource;
use crate::workload::XorShift64;

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

/// A working set of live objects on one source. Each step frees a random live object and
/// allocates one of a random size ([`churn_size`]) in its place; the sequence comes from a
/// fixed-seed [`XorShift64`], the same for every allocator. Dropping the churn frees every
/// live object.
pub struct ObjChurn<S: ObjSource> {
    src: S,
    rng: XorShift64,
    live: Vec<(usize, u32)>, // (address, size)
}

impl<S: ObjSource> ObjChurn<S> {
    /// Fills a working set of `objects` objects (random sizes from `seed`) on `src`.
    pub fn new(mut src: S, objects: usize, seed: u64) -> ObjChurn<S> {
        assert!(
            objects > 0 && objects <= u32::MAX as usize,
            "working set size out of range"
        );
        let mut rng = XorShift64::new(seed);
        let live = (0..objects)
            .map(|_| {
                let size = churn_size(rng.next());
                (src.alloc(size) as usize, size as u32)
            })
            .collect();
        ObjChurn { src, rng, live }
    }

    /// Runs `steps` steps.
    #[inline(never)]
    pub fn run(&mut self, steps: u64) {
        let n = self.live.len() as u64;
        for _ in 0..steps {
            let r = self.rng.next();
            let i = (((r & 0xffff_ffff) * n) >> 32) as usize;
            let size = churn_size(r);
            let (p, s) = self.live[i];
            // SAFETY: every entry of `live` is an object allocated from `src` with its size
            // and not freed since; it is replaced right below.
            unsafe { self.src.free(p as *mut u8, s as usize) };
            self.live[i] = (black_box(self.src.alloc(size)) as usize, size as u32);
        }
    }

    /// Live objects.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when the working set is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Bytes asked for by the live objects.
    pub fn live_bytes(&self) -> usize {
        self.live.iter().map(|&(_, s)| s as usize).sum()
    }
}

impl<S: ObjSource> Drop for ObjChurn<S> {
    fn drop(&mut self) {
        for (p, s) in self.live.drain(..) {
            // SAFETY: as in `run`: each entry is a live object of `src` with its size.
            unsafe { self.src.free(p as *mut u8, s as usize) };
        }
    }
}
