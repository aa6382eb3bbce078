//! The workloads: an order-0 alloc+free pair, and a random-order churn over a working set.
//!
//! Both are generic over [`PageSource`] and `#[inline(never)]`, so each allocator gets its own
//! compiled loop (callgrind and `perf` show them as `pair_loop<…>` / `WorkingSet<…>::run`).
//! [`WorkingSet`] is the churn over any [`ChurnSource`]: the page churn here ([`Churn`], over
//! the [`Pages`] adapter) and the object churn of [`crate::objwork`].

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

/// How a churn drives one source: how the request of a new entry (a block order, an object
/// size) is drawn from a random number, how one entry is allocated for a request, and how it
/// is freed given the request's 32-bit word (what the working set keeps beside each live
/// entry, so that an entry stays 16 bytes). [`Pages`] and
/// [`Objects`](crate::objwork::Objects) adapt the page and object sources; their methods are
/// `#[inline(always)]`, so [`WorkingSet::run`] compiles to one loop per allocator with no
/// indirect call in it.
pub trait ChurnSource {
    /// What a request is, as the source's `alloc` takes it.
    type Request: Copy;

    /// The request of a new entry, drawn from random number `r`.
    fn request(r: u64) -> Self::Request;

    /// The request as a 32-bit word (lossless for every request [`ChurnSource::request`]
    /// draws).
    fn word(req: Self::Request) -> u32;

    /// Allocates one entry for request `req` and returns its handle. Panics when the
    /// allocator is out of memory.
    fn alloc(&mut self, req: Self::Request) -> usize;

    /// Frees an entry.
    ///
    /// # Safety
    ///
    /// `handle` must come from [`ChurnSource::alloc`] on this source with a request whose
    /// [`ChurnSource::word`] is `word`, and must not have been freed since.
    unsafe fn free(&mut self, handle: usize, word: u32);
}

/// A [`PageSource`] as a [`ChurnSource`]: the request is a block order drawn from
/// [`CHURN_ORDERS`] by the top 4 bits of the random number.
pub struct Pages<S: PageSource>(S);

impl<S: PageSource> ChurnSource for Pages<S> {
    type Request = u32;

    #[inline(always)]
    fn request(r: u64) -> u32 {
        CHURN_ORDERS[(r >> 60) as usize]
    }

    #[inline(always)]
    fn word(order: u32) -> u32 {
        order
    }

    #[inline(always)]
    fn alloc(&mut self, order: u32) -> usize {
        self.0.alloc(order)
    }

    #[inline(always)]
    unsafe fn free(&mut self, handle: usize, order: u32) {
        // SAFETY: by the caller's contract `handle` came from `alloc` on this source with an
        // order whose word is `order` (the word is the order itself), i.e. from the page
        // source's `alloc` with `order`, and it is freed once.
        unsafe { self.0.free(handle, order) };
    }
}

/// A working set of live entries on one [`ChurnSource`]. Each step frees a random live entry
/// and allocates a new one of a random request ([`ChurnSource::request`]) in its place; the
/// sequence comes from a fixed-seed [`XorShift64`], the same for every allocator. Dropping the
/// working set frees every live entry.
///
/// The page churn is [`Churn`], the object churn [`ObjChurn`](crate::objwork::ObjChurn).
pub struct WorkingSet<C: ChurnSource> {
    src: C,
    rng: XorShift64,
    live: Vec<(usize, u32)>, // (handle, request word)
}

impl<C: ChurnSource> WorkingSet<C> {
    /// Fills a working set of `entries` entries (random requests from `seed`) on `src`.
    /// Panics unless `entries` is in `1..=u32::MAX`.
    pub fn with_source(mut src: C, entries: usize, seed: u64) -> WorkingSet<C> {
        assert!(
            entries > 0 && entries <= u32::MAX as usize,
            "working set size out of range"
        );
        let mut rng = XorShift64::new(seed);
        let live = (0..entries)
            .map(|_| {
                let req = C::request(rng.next());
                (src.alloc(req), C::word(req))
            })
            .collect();
        WorkingSet { src, rng, live }
    }

    /// Runs `steps` steps.
    #[inline(never)]
    pub fn run(&mut self, steps: u64) {
        let n = self.live.len() as u64;
        for _ in 0..steps {
            let r = self.rng.next();
            let i = (((r & 0xffff_ffff) * n) >> 32) as usize;
            let req = C::request(r);
            let (h, q) = self.live[i];
            // SAFETY: every entry of `live` was allocated from `src` with a request of its word
            // and not freed since; it is replaced right below.
            unsafe { self.src.free(h, q) };
            self.live[i] = (black_box(self.src.alloc(req)), C::word(req));
        }
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when the working set is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The request word ([`ChurnSource::word`]) of each live entry.
    pub fn words(&self) -> impl Iterator<Item = u32> + '_ {
        self.live.iter().map(|&(_, q)| q)
    }
}

impl<C: ChurnSource> Drop for WorkingSet<C> {
    fn drop(&mut self) {
        for (h, q) in self.live.drain(..) {
            // SAFETY: as in `run`: each entry is a live entry of `src` with its request word.
            unsafe { self.src.free(h, q) };
        }
    }
}

/// A working set of live blocks on one page source. Each step frees a random live block and
/// allocates a block of a random order (from [`CHURN_ORDERS`]) in its place. Dropping the
/// churn frees every live block.
pub type Churn<S> = WorkingSet<Pages<S>>;

impl<S: PageSource> Churn<S> {
    /// Fills a working set of `blocks` blocks (random orders from `seed`) on `src`.
    pub fn new(src: S, blocks: usize, seed: u64) -> Churn<S> {
        WorkingSet::with_source(Pages(src), blocks, seed)
    }

    /// Live blocks per order `0..=3`.
    pub fn live_per_order(&self) -> [usize; 4] {
        let mut c = [0; 4];
        for o in self.words() {
            c[o as usize] += 1;
        }
        c
    }
}
