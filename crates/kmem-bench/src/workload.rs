//! The workloads: an order-0 alloc+free pair, and a random-order churn over a working set.
//!
//! Both are generic over [`PageSource`] and `#[inline(never)]`, so each allocator gets its own
//! compiled loop (callgrind and `perf` show them as `pair_loop<…>` / `Churn<…>::run`).

use std::hint::black_box;

use crate::source::PageSource;

/// Marsaglia's xorshift64: a fixed-seed, allocation-free source of pseudo-random numbers,
/// identical for every allocator driven with the same seed.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator seeded with `seed` (0 is replaced by a fixed nonzero constant).
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next number.
    #[inline(always)]
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Orders drawn by the churn, indexed by the top 4 bits of a random number: order 0 with
/// probability 11/16, 1 with 3/16, 2 and 3 with 1/16 each.
pub const CHURN_ORDERS: [u32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 3];

/// Does `n` order-0 alloc+free pairs on `src`.
#[inline(never)]
pub fn pair_loop<S: PageSource>(src: &mut S, n: u64) {
    for _ in 0..n {
        let h = black_box(src.alloc(0));
        // SAFETY: `h` was just allocated from `src` at order 0 and is freed once.
        unsafe { src.free(h, 0) };
    }
}

/// A working set of live blocks on one source. Each step frees a random live block and
/// allocates a block of a random order (from [`CHURN_ORDERS`]) in its place. Dropping the
/// churn frees every live block.
pub struct Churn<S: PageSource> {
    src: S,
    rng: XorShift64,
    live: Vec<(usize, u32)>, // (handle, order)
}

impl<S: PageSource> Churn<S> {
    /// Fills a working set of `blocks` blocks (random orders from `seed`) on `src`.
    pub fn new(mut src: S, blocks: usize, seed: u64) -> Churn<S> {
        assert!(
            blocks > 0 && blocks <= u32::MAX as usize,
            "working set size out of range"
        );
        let mut rng = XorShift64::new(seed);
        let live = (0..blocks)
            .map(|_| {
                let order = CHURN_ORDERS[(rng.next() >> 60) as usize];
                (src.alloc(order), order)
            })
            .collect();
        Churn { src, rng, live }
    }

    /// Runs `steps` steps.
    #[inline(never)]
    pub fn run(&mut self, steps: u64) {
        let n = self.live.len() as u64;
        for _ in 0..steps {
            let r = self.rng.next();
            let i = (((r & 0xffff_ffff) * n) >> 32) as usize;
            let order = CHURN_ORDERS[(r >> 60) as usize];
            let (h, o) = self.live[i];
            // SAFETY: every entry of `live` is a block allocated from `src` with its order and
            // not freed since; it is replaced right below.
            unsafe { self.src.free(h, o) };
            self.live[i] = (black_box(self.src.alloc(order)), order);
        }
    }

    /// Live blocks per order `0..=3`.
    pub fn live_per_order(&self) -> [usize; 4] {
        let mut c = [0; 4];
        for &(_, o) in &self.live {
            c[o as usize] += 1;
        }
        c
    }
}

impl<S: PageSource> Drop for Churn<S> {
    fn drop(&mut self) {
        for (h, o) in self.live.drain(..) {
            // SAFETY: as in `run`: each entry is a live block of `src` with its order.
            unsafe { self.src.free(h, o) };
        }
    }
}
