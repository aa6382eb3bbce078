//! Fault injection: `failslab` and `fail_page_alloc`, after Linux's `lib/fault-inject.c`,
//! `mm/failslab.c` and `mm/fail_page_alloc.c`.
//!
//! A [`FaultAttr`] decides whether an allocation should fail, with Linux's four knobs (the
//! `<interval>,<probability>,<space>,<times>` of the `failslab=` and `fail_page_alloc=` boot
//! parameters, see [`FaultParams`]) and Linux's order of tests (`should_fail_ex`):
//!
//! 1. `probability == 0` or `times == 0`: never fail;
//! 2. `space`: while more than the request's size is left, subtract the size and succeed;
//! 3. `interval > 1`: only every `interval`-th request that got this far may fail;
//! 4. fail with `probability` percent (100 or more: always);
//! 5. on failure, log `FAULT_INJECTION: forcing a failure.` (unless `__GFP_NOWARN`) and
//!    count `times` down (`-1` means without limit).
//!
//! [`FailSlab`] and [`FailPageAlloc`] add the filters of the two users: neither fails a
//! `__GFP_NOFAIL` request; both ignore requests that may sleep (`ignore-gfp-wait`, on by
//! default as in Linux, so `GFP_KERNEL` requests are spared unless it is turned off);
//! `fail_page_alloc` also ignores `__GFP_HIGHMEM` requests and orders below `min-order` (1)
//! by default. The filters are the debugfs files of Linux and can be changed at run time.
//!
//! # Cost
//!
//! The hooks in `kmem_cache_alloc` and `alloc_pages` are one relaxed load of a word and a
//! branch; everything else is out of line. A [`FaultAttr`] is armed only while its
//! probability and its remaining `times` are non-zero, so an exhausted one costs no more than
//! a disabled one. The word is a *gate* ([`FaultAttr::gate`]): 0 while armed, a bound chosen
//! by the user while disarmed. `kmalloc` compares its size with `failslab`'s gate, whose
//! bound is the largest size its caches serve, so the failslab test costs it nothing: the
//! size test it makes anyway sends every request to the slow path while failslab is armed.
//!
//! # Randomness
//!
//! The probability test draws from a generator of the attribute's own (xorshift64*, seeded
//! when the attribute is configured), not from the platform: the same requests with the same
//! parameters fail the same way on every run, which makes a failing workload reproducible.

use core::fmt;
use core::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed,
};

use crate::gfp::{__GFP_DIRECT_RECLAIM, __GFP_HIGHMEM, __GFP_NOFAIL, __GFP_NOWARN, Gfp};
use crate::platform::{LogLevel, Platform};

/// The four numbers of a fault attribute, as `setup_fault_attr` reads them from
/// `<interval>,<probability>,<space>,<times>`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FaultParams {
    /// Only every `interval`-th eligible request may fail (0 and 1: every one).
    pub interval: u64,
    /// Percent chance that an eligible request fails; 0 disables, 100 or more always fails.
    pub probability: u64,
    /// Bytes (failslab) or pages (fail_page_alloc) to let through before failing anything.
    pub space: i32,
    /// How many failures to inject at most; `-1` means without limit.
    pub times: i32,
}

impl FaultParams {
    /// Linux's `FAULT_ATTR_INITIALIZER`: interval 1, probability 0 (disabled), space 0,
    /// times 1.
    pub const DISABLED: FaultParams = FaultParams {
        interval: 1,
        probability: 0,
        space: 0,
        times: 1,
    };

    /// True when these parameters can inject a failure (`probability` and `times` non-zero).
    pub const fn enabled(&self) -> bool {
        self.probability != 0 && self.times != 0
    }
}

impl Default for FaultParams {
    fn default() -> Self {
        FaultParams::DISABLED
    }
}

impl fmt::Display for FaultParams {
    /// The boot-parameter form: `interval,probability,space,times`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{},{}",
            self.interval, self.probability, self.space, self.times
        )
    }
}

/// A fault attribute (`struct fault_attr`): the knobs and the counters of one injection
/// point. See the [module docs](self) for the algorithm.
pub struct FaultAttr {
    /// 0 while armed, else `open`.
    gate: AtomicUsize,
    open: usize,
    name: &'static str,
    interval: AtomicU64,
    probability: AtomicU64,
    space: AtomicI32,
    times: AtomicI32,
    count: AtomicU64,
    verbose: AtomicU32,
    rng: AtomicU64,
    injected: AtomicU64,
}

impl FaultAttr {
    /// A disabled attribute named `name` (`failslab`, `fail_page_alloc`), verbose 2 as
    /// Linux's default (log every failure), whose gate is `usize::MAX` while disarmed.
    pub const fn new(name: &'static str) -> FaultAttr {
        FaultAttr::with_gate(name, usize::MAX)
    }

    /// As [`FaultAttr::new`], with `open` (not 0) as the gate while disarmed.
    pub const fn with_gate(name: &'static str, open: usize) -> FaultAttr {
        assert!(open != 0);
        let d = FaultParams::DISABLED;
        FaultAttr {
            gate: AtomicUsize::new(open),
            open,
            name,
            interval: AtomicU64::new(d.interval),
            probability: AtomicU64::new(d.probability),
            space: AtomicI32::new(d.space),
            times: AtomicI32::new(d.times),
            count: AtomicU64::new(0),
            verbose: AtomicU32::new(2),
            rng: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// The attribute's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Sets the four knobs (as the boot parameter or writes to the debugfs files do), resets
    /// the request counter and reseeds the generator, so the same parameters give the same
    /// failures again. The count of injected failures is kept.
    pub fn configure(&self, p: FaultParams) {
        self.set_armed(false);
        self.interval.store(p.interval, Relaxed);
        self.probability.store(p.probability, Relaxed);
        self.space.store(p.space, Relaxed);
        self.times.store(p.times, Relaxed);
        self.count.store(0, Relaxed);
        self.rng.store(seed(self.name), Relaxed);
        self.set_armed(p.enabled());
    }

    fn set_armed(&self, on: bool) {
        self.gate.store(if on { 0 } else { self.open }, Relaxed);
    }

    /// The knobs as they stand: `space` and `times` count down as requests pass and fail.
    pub fn params(&self) -> FaultParams {
        FaultParams {
            interval: self.interval.load(Relaxed),
            probability: self.probability.load(Relaxed),
            space: self.space.load(Relaxed),
            times: self.times.load(Relaxed),
        }
    }

    /// `verbose`: 0 logs nothing, 1 and more log each injected failure (Linux's 2 adds a
    /// stack dump, which kmem does not have).
    pub fn set_verbose(&self, v: u32) {
        self.verbose.store(v, Relaxed);
    }

    /// True when the attribute may inject a failure: the one load the hooks make.
    #[inline(always)]
    pub fn armed(&self) -> bool {
        self.gate() == 0
    }

    /// The gate: 0 while the attribute is armed, else the bound it was created with
    /// ([`FaultAttr::with_gate`]). A fast path that tests `x < gate` for a bound of its own
    /// tests armed-ness in the same compare.
    #[inline(always)]
    pub fn gate(&self) -> usize {
        self.gate.load(Relaxed)
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Relaxed)
    }

    /// `should_fail_ex` without the report: true when a request of `size` (bytes or pages)
    /// must fail. Counts `space`, the interval and `times` down as Linux does.
    pub fn should_fail(&self, size: u64) -> bool {
        let probability = self.probability.load(Relaxed);
        if probability == 0 || self.times.load(Relaxed) == 0 {
            return false;
        }
        let space = self.space.load(Relaxed);
        if i64::from(space) > i64::try_from(size).unwrap_or(i64::MAX) {
            // `atomic_sub(size, &attr->space)`: `size < space <= i32::MAX` here.
            self.space.fetch_sub(size as i32, Relaxed);
            return false;
        }
        let interval = self.interval.load(Relaxed);
        if interval > 1 {
            let count = self.count.fetch_add(1, Relaxed) + 1;
            if count % interval != 0 {
                return false;
            }
        }
        if probability <= u64::from(self.random_below_100()) {
            return false;
        }
        // `atomic_dec_not_zero` unless unlimited; disarm when the last one is used.
        let dec = self
            .times
            .fetch_update(Relaxed, Relaxed, |t| (t != -1 && t != 0).then(|| t - 1));
        if dec == Ok(1) {
            self.set_armed(false);
        }
        self.injected.fetch_add(1, Relaxed);
        true
    }

    /// `get_random_u32_below(100)` from the attribute's own generator.
    fn random_below_100(&self) -> u32 {
        let mut x = self.rng.load(Relaxed);
        if x == 0 {
            x = seed(self.name);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Relaxed);
        let r = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32;
        ((u64::from(r) * 100) >> 32) as u32
    }

    /// `fail_dump`: the notice Linux prints for an injected failure.
    fn report<P: Platform>(&self, p: &P) {
        if self.verbose.load(Relaxed) == 0 {
            return;
        }
        let a = self.params();
        p.log(
            LogLevel::Info,
            format_args!("FAULT_INJECTION: forcing a failure."),
        );
        p.log(
            LogLevel::Info,
            format_args!(
                "name {}, interval {}, probability {}, space {}, times {}",
                self.name, a.interval, a.probability, a.space, a.times
            ),
        );
    }
}

impl fmt::Debug for FaultAttr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultAttr")
            .field("name", &self.name)
            .field("params", &self.params())
            .field("injected", &self.injected())
            .finish()
    }
}

/// A non-zero seed derived from the attribute's name (FNV-1a), so two attributes configured
/// alike draw different sequences.
fn seed(name: &str) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h | 1
}

/// `failslab`: fault injection for slab allocations (`kmem_cache_alloc`, small `kmalloc`).
#[derive(Debug)]
pub struct FailSlab {
    /// The attribute (`/sys/kernel/debug/failslab/{interval,probability,space,times}`).
    pub attr: FaultAttr,
    ignore_gfp_reclaim: AtomicBool,
}

impl FailSlab {
    /// Disabled, ignoring requests that may sleep (Linux's defaults).
    pub const fn new() -> FailSlab {
        FailSlab {
            // The gate is kmalloc's fast-path bound on `size - 1` (see the module docs).
            attr: FaultAttr::with_gate("failslab", crate::kmalloc::KMALLOC_MAX_CACHE_SIZE),
            ignore_gfp_reclaim: AtomicBool::new(true),
        }
    }

    /// `ignore-gfp-wait`: spare requests with `__GFP_DIRECT_RECLAIM` (default: yes).
    pub fn set_ignore_gfp_reclaim(&self, on: bool) {
        self.ignore_gfp_reclaim.store(on, Relaxed);
    }

    /// The `ignore-gfp-wait` setting.
    pub fn ignore_gfp_reclaim(&self) -> bool {
        self.ignore_gfp_reclaim.load(Relaxed)
    }

    /// `should_failslab`: true when an allocation of an object of `object_size` bytes with
    /// `gfp` must fail. One relaxed load when disarmed; the size is only asked for when armed
    /// (so the caller's fast path does not load it).
    #[inline(always)]
    pub fn should_failslab<P: Platform>(
        &self,
        p: &P,
        object_size: impl FnOnce() -> usize,
        gfp: Gfp,
    ) -> bool {
        self.attr.armed() && self.should_failslab_slow(p, object_size(), gfp)
    }

    #[cold]
    #[inline(never)]
    fn should_failslab_slow<P: Platform>(&self, p: &P, object_size: usize, gfp: Gfp) -> bool {
        if gfp.intersects(__GFP_NOFAIL)
            || (self.ignore_gfp_reclaim() && gfp.intersects(__GFP_DIRECT_RECLAIM))
        {
            return false;
        }
        let fail = self.attr.should_fail(object_size as u64);
        if fail && !gfp.intersects(__GFP_NOWARN) {
            self.attr.report(p);
        }
        fail
    }
}

impl Default for FailSlab {
    fn default() -> Self {
        FailSlab::new()
    }
}

/// `fail_page_alloc`: fault injection for the page allocator (`alloc_pages` and everything
/// built on it).
#[derive(Debug)]
pub struct FailPageAlloc {
    /// The attribute (`/sys/kernel/debug/fail_page_alloc/{interval,probability,space,times}`).
    pub attr: FaultAttr,
    ignore_gfp_reclaim: AtomicBool,
    ignore_gfp_highmem: AtomicBool,
    min_order: AtomicU32,
}

impl FailPageAlloc {
    /// Disabled, ignoring requests that may sleep, `__GFP_HIGHMEM` requests and order 0
    /// (Linux's defaults).
    pub const fn new() -> FailPageAlloc {
        FailPageAlloc {
            attr: FaultAttr::new("fail_page_alloc"),
            ignore_gfp_reclaim: AtomicBool::new(true),
            ignore_gfp_highmem: AtomicBool::new(true),
            min_order: AtomicU32::new(1),
        }
    }

    /// `ignore-gfp-wait`: spare requests with `__GFP_DIRECT_RECLAIM` (default: yes).
    pub fn set_ignore_gfp_reclaim(&self, on: bool) {
        self.ignore_gfp_reclaim.store(on, Relaxed);
    }

    /// `ignore-gfp-highmem`: spare requests with `__GFP_HIGHMEM` (default: yes).
    pub fn set_ignore_gfp_highmem(&self, on: bool) {
        self.ignore_gfp_highmem.store(on, Relaxed);
    }

    /// `min-order`: spare requests of lower orders (default: 1).
    pub fn set_min_order(&self, order: u32) {
        self.min_order.store(order, Relaxed);
    }

    /// The filters: `(ignore-gfp-wait, ignore-gfp-highmem, min-order)`.
    pub fn filters(&self) -> (bool, bool, u32) {
        (
            self.ignore_gfp_reclaim.load(Relaxed),
            self.ignore_gfp_highmem.load(Relaxed),
            self.min_order.load(Relaxed),
        )
    }

    /// `should_fail_alloc_page`: true when an allocation of `1 << order` pages with `gfp`
    /// must fail. One relaxed load when disarmed.
    #[inline(always)]
    pub fn should_fail_alloc_page<P: Platform>(&self, p: &P, gfp: Gfp, order: u32) -> bool {
        self.attr.armed() && self.should_fail_slow(p, gfp, order)
    }

    #[cold]
    #[inline(never)]
    fn should_fail_slow<P: Platform>(&self, p: &P, gfp: Gfp, order: u32) -> bool {
        let (ignore_reclaim, ignore_highmem, min_order) = self.filters();
        if order < min_order
            || gfp.intersects(__GFP_NOFAIL)
            || (ignore_highmem && gfp.intersects(__GFP_HIGHMEM))
            || (ignore_reclaim && gfp.intersects(__GFP_DIRECT_RECLAIM))
        {
            return false;
        }
        let fail = self.attr.should_fail(1u64 << order);
        if fail && !gfp.intersects(__GFP_NOWARN) {
            self.attr.report(p);
        }
        fail
    }
}

impl Default for FailPageAlloc {
    fn default() -> Self {
        FailPageAlloc::new()
    }
}

/// The injection points of one machine.
#[derive(Debug, Default)]
pub struct Faults {
    /// `failslab`.
    pub failslab: FailSlab,
    /// `fail_page_alloc`.
    pub fail_page_alloc: FailPageAlloc,
}

impl Faults {
    /// Both points configured from boot parameters.
    pub fn new(failslab: FaultParams, fail_page_alloc: FaultParams) -> Faults {
        let f = Faults::default();
        f.failslab.attr.configure(failslab);
        f.fail_page_alloc.attr.configure(fail_page_alloc);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn attr(p: FaultParams) -> FaultAttr {
        let a = FaultAttr::new("test");
        a.configure(p);
        a
    }

    fn run(a: &FaultAttr, n: usize, size: u64) -> Vec<bool> {
        (0..n).map(|_| a.should_fail(size)).collect()
    }

    #[test]
    fn disabled_never_fails_and_is_not_armed() {
        let a = attr(FaultParams::DISABLED);
        assert!(!a.armed());
        assert!(run(&a, 100, 8).iter().all(|f| !f));
        let a = attr(FaultParams {
            times: 0,
            probability: 100,
            ..FaultParams::DISABLED
        });
        assert!(!a.armed(), "times 0 disables");
        assert!(!a.should_fail(8));
    }

    #[test]
    fn times_counts_down_and_disarms() {
        let a = attr(FaultParams {
            interval: 1,
            probability: 100,
            space: 0,
            times: 3,
        });
        assert!(a.armed());
        assert_eq!(run(&a, 5, 8), [true, true, true, false, false]);
        assert!(!a.armed(), "exhausted");
        assert_eq!(a.injected(), 3);
        assert_eq!(a.params().times, 0);
    }

    #[test]
    fn unlimited_times() {
        let a = attr(FaultParams {
            interval: 1,
            probability: 100,
            space: 0,
            times: -1,
        });
        assert!(run(&a, 1000, 8).iter().all(|f| *f));
        assert!(a.armed());
        assert_eq!(a.params().times, -1);
    }

    #[test]
    fn interval_fails_every_nth() {
        let a = attr(FaultParams {
            interval: 3,
            probability: 100,
            space: 0,
            times: -1,
        });
        assert_eq!(
            run(&a, 9, 8),
            [false, false, true, false, false, true, false, false, true]
        );
    }

    #[test]
    fn space_lets_bytes_through_first() {
        let a = attr(FaultParams {
            interval: 1,
            probability: 100,
            space: 100,
            times: -1,
        });
        // 100 > 40: pass, 60 left; 60 > 40: pass, 20 left; 20 > 40 is false: fail.
        assert_eq!(run(&a, 3, 40), [false, false, true]);
        assert_eq!(a.params().space, 20);
        // Equal is not more: fails.
        let a = attr(FaultParams {
            interval: 1,
            probability: 100,
            space: 8,
            times: -1,
        });
        assert!(a.should_fail(8));
    }

    #[test]
    fn probability_is_roughly_honoured_and_reproducible() {
        let p = FaultParams {
            interval: 1,
            probability: 30,
            space: 0,
            times: -1,
        };
        let a = attr(p);
        let first = run(&a, 10_000, 8);
        let n = first.iter().filter(|f| **f).count();
        assert!((2500..3500).contains(&n), "{n} of 10000 at 30%");
        a.configure(p);
        assert_eq!(run(&a, 10_000, 8), first, "same parameters, same failures");
        let a = attr(FaultParams {
            probability: 101,
            ..p
        });
        assert!(run(&a, 100, 8).iter().all(|f| *f));
    }

    #[test]
    fn display_is_the_boot_form() {
        let p = FaultParams {
            interval: 10,
            probability: 50,
            space: 4096,
            times: -1,
        };
        let mut buf = [0u8; 64];
        assert_eq!(
            crate::fmt_util::format_into(&mut buf, format_args!("{p}")),
            "10,50,4096,-1"
        );
    }
}
