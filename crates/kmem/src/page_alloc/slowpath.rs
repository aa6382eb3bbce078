//! The allocation slow path (`__alloc_pages_slowpath`), reclaim and the failure report.
//!
//! When the fast attempt (low watermark) fails, the slow path:
//!
//! 1. retries at the min watermark, lowered as the mask entitles (`gfp_to_alloc_flags`):
//!    `__GFP_HIGH` to half of min, `GFP_ATOMIC` to 3/8, `GFP_NOWAIT` not at all;
//!    `__GFP_MEMALLOC` ignores the watermarks;
//! 2. fails at once if the mask may not sleep;
//! 3. otherwise loops: direct reclaim (registered [`Shrinker`]s, then draining every CPU's
//!    page lists), retry, and wait for a free. `__GFP_NORETRY` fails after one round, costly
//!    orders (> 3) fail after one round unless `__GFP_RETRY_MAYFAIL`; after
//!    `Config::reclaim_retries` rounds without progress `__GFP_RETRY_MAYFAIL` fails, and
//!    other masks reach the OOM step. kmem has no task to kill: it prints the OOM report, lets
//!    the allocation use the OOM victim's reserve once, then fails it. `__GFP_NOFAIL` never
//!    fails: it may use half of the min reserve, and waits for frees for as long as it takes.
//!
//! A sleeping allocation made from atomic context is reported ("sleeping function called
//! from invalid context") and does not enter reclaim: it fails as a non-sleeping one would,
//! rather than sleep while holding a CPU.
//!
//! A failure prints Linux's "page allocation failure" report with the zones' free areas,
//! unless `__GFP_NOWARN`.
//!
//! Waiting: `waiters` counts sleepers on `free_seq`; a free that sees `waiters != 0` bumps
//! `free_seq` and wakes them. Waits are bounded by `Config::reclaim_wait_ns`, so a wake-up
//! lost to the race between the check and the sleep costs one timeout, never a hang.

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, Ordering};

use super::zone::Zone;
use super::{AllocFlags, PageAlloc, page::Page};
use crate::addr::{MAX_PAGE_ORDER, PAGE_ALLOC_COSTLY_ORDER, PAGE_SIZE};
use crate::fmt_util::BufWriter;
use crate::gfp::{
    __GFP_HIGH, __GFP_MEMALLOC, __GFP_NOFAIL, __GFP_NOMEMALLOC, __GFP_NORETRY, __GFP_NOWARN,
    __GFP_RETRY_MAYFAIL, Gfp, gfp_zone, gfpflags_allow_blocking,
};
use crate::platform::{CpuGuard, LogLevel, Platform};
use crate::sync::SpinLock;

/// A cache that can give memory back under pressure (`struct shrinker`).
pub trait Shrinker: Sync {
    /// A name for reports.
    fn name(&self) -> &str;
    /// How many objects could be freed now (`count_objects`).
    fn count_objects(&self) -> usize;
    /// Frees up to `nr_to_scan` objects; returns how many pages went back to the page
    /// allocator (`scan_objects`). Called with no allocator lock held; may not sleep.
    fn scan_objects(&self, nr_to_scan: usize) -> usize;
}

/// Most shrinkers registered at once.
pub const MAX_SHRINKERS: usize = 16;

/// A registered shrinker's handle.
#[derive(Debug, PartialEq, Eq)]
pub struct ShrinkerId(usize);

type ShrinkerSlots = [Option<&'static dyn Shrinker>; MAX_SHRINKERS];

/// Reclaim state of one page allocator.
pub(crate) struct Reclaim {
    shrinkers: SpinLock<ShrinkerSlots>,
    running: SpinLock<()>, // held by the one direct reclaimer running shrinkers
    /// Tasks sleeping in the slow path.
    pub(crate) waiters: AtomicU32,
    free_seq: AtomicU32, // bumped by frees while `waiters != 0`
}

impl Reclaim {
    pub(crate) fn new() -> Reclaim {
        Reclaim {
            shrinkers: SpinLock::new([None; MAX_SHRINKERS]),
            running: SpinLock::new(()),
            waiters: AtomicU32::new(0),
            free_seq: AtomicU32::new(0),
        }
    }
}

fn gfp_to_alloc_flags(gfp: Gfp) -> AllocFlags {
    let mut f = AllocFlags::WMARK_MIN;
    if gfp.contains(__GFP_HIGH) {
        f |= AllocFlags::MIN_RESERVE;
    }
    if !gfpflags_allow_blocking(gfp) && !gfp.contains(__GFP_NOMEMALLOC) {
        f |= AllocFlags::NON_BLOCK;
    }
    AllocFlags(f)
}

impl<P: Platform> PageAlloc<P> {
    /// Registers a shrinker that direct reclaim will call (`shrinker_register`).
    /// Returns `None` when `MAX_SHRINKERS` are registered already.
    ///
    /// # Safety
    ///
    /// `s` must stay valid until [`PageAlloc::unregister_shrinker`] returns for the handle,
    /// or for as long as this allocator lives.
    pub unsafe fn register_shrinker(&self, s: &dyn Shrinker) -> Option<ShrinkerId> {
        // SAFETY: only the lifetime is extended; the caller keeps `s` alive for as long as it
        // is registered, and `unregister_shrinker` waits for any call in flight.
        let s: &'static dyn Shrinker = unsafe { core::mem::transmute::<&dyn Shrinker, _>(s) };
        let mut slots = self.reclaim.shrinkers.lock();
        let i = slots.iter().position(Option::is_none)?;
        slots[i] = Some(s);
        Some(ShrinkerId(i))
    }

    /// Unregisters a shrinker; when this returns, no call into it is in flight.
    pub fn unregister_shrinker(&self, id: ShrinkerId) {
        self.reclaim.shrinkers.lock()[id.0] = None;
        drop(self.reclaim.running.lock());
    }

    /// Calls every shrinker (`shrink_slab`); returns pages they freed. Only one task runs the
    /// shrinkers at a time; a second one (or a shrinker that allocates) skips them.
    pub fn shrink_slab(&self) -> usize {
        let Some(_running) = self.reclaim.running.try_lock() else {
            return 0;
        };
        let slots: ShrinkerSlots = *self.reclaim.shrinkers.lock();
        let mut freed = 0;
        for s in slots.iter().flatten() {
            let n = s.count_objects();
            if n != 0 {
                freed += s.scan_objects(n);
            }
        }
        freed
    }

    /// Direct reclaim: shrinkers, then every CPU's page lists. Returns pages made free.
    fn direct_reclaim(&self) -> usize {
        self.shrink_slab() + self.drain_all_pages()
    }

    #[cold]
    pub(super) fn wake_waiters(&self) {
        self.reclaim.free_seq.fetch_add(1, Ordering::Release);
        self.platform.wake_all(&self.reclaim.free_seq);
    }

    #[cold]
    #[inline(never)]
    pub(super) fn alloc_pages_slowpath(&self, gfp: Gfp, order: u32, highest: usize) -> Option<u32> {
        let can_reclaim = gfpflags_allow_blocking(gfp);
        let mut flags = gfp_to_alloc_flags(gfp);
        if let Some(i) = self.get_page_from_freelist(gfp, order, highest, flags) {
            return Some(i);
        }
        if gfp.contains(__GFP_MEMALLOC) && !gfp.contains(__GFP_NOMEMALLOC) {
            let f = AllocFlags(flags.0 | AllocFlags::NO_WATERMARKS);
            if let Some(i) = self.get_page_from_freelist(gfp, order, highest, f) {
                return Some(i);
            }
        }
        if !can_reclaim {
            return self.nopage(gfp, order);
        }
        if self.platform.in_atomic() {
            // A kernel would sleep here and might deadlock; kmem reports the bug and treats
            // the request as one that may not sleep, so the caller gets `None` instead.
            self.report_atomic_sleep();
            return self.nopage(gfp, order);
        }
        let nofail = gfp.contains(__GFP_NOFAIL);
        let mut no_progress = 0u32;
        loop {
            self.reclaim.waiters.fetch_add(1, Ordering::SeqCst);
            let seq = self.reclaim.free_seq.load(Ordering::Acquire);
            let progress = self.direct_reclaim();
            let mut got = self.get_page_from_freelist(gfp, order, highest, flags);
            if got.is_none() && nofail {
                // `__alloc_pages_cpuset_fallback`: help a non-failing allocation with some
                // access to the reserves (half of min).
                let f = AllocFlags(flags.0 | AllocFlags::MIN_RESERVE);
                got = self.get_page_from_freelist(gfp, order, highest, f);
            }
            if got.is_none() && progress == 0 {
                no_progress += 1;
            } else {
                no_progress = 0;
            }
            let give_up = got.is_none()
                && !nofail
                && (gfp.contains(__GFP_NORETRY)
                    || (order > PAGE_ALLOC_COSTLY_ORDER && !gfp.contains(__GFP_RETRY_MAYFAIL))
                    || no_progress > self.config.reclaim_retries);
            if got.is_none() && !give_up {
                self.platform
                    .wait(&self.reclaim.free_seq, seq, self.config.reclaim_wait_ns);
            }
            self.reclaim.waiters.fetch_sub(1, Ordering::SeqCst);
            if got.is_some() {
                return got;
            }
            if give_up {
                break;
            }
        }
        let out_of_retries = no_progress > self.config.reclaim_retries;
        if out_of_retries && !gfp.contains(__GFP_RETRY_MAYFAIL) && order <= PAGE_ALLOC_COSTLY_ORDER
        {
            self.oom_report(gfp, order);
            flags = AllocFlags(flags.0 | AllocFlags::OOM);
            if let Some(i) = self.get_page_from_freelist(gfp, order, highest, flags) {
                return Some(i);
            }
        }
        self.nopage(gfp, order)
    }

    #[cold]
    fn nopage(&self, gfp: Gfp, order: u32) -> Option<u32> {
        self.alloc_failures.fetch_add(1, Ordering::Relaxed);
        if !gfp.contains(__GFP_NOWARN) {
            self.warn_alloc(gfp, order);
        }
        None
    }

    /// An order above `MAX_PAGE_ORDER` or invalid zone modifiers.
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_invalid(&self, gfp: Gfp, order: u32) -> Option<&Page> {
        self.alloc_failures.fetch_add(1, Ordering::Relaxed);
        let p = &self.platform;
        if let Err(bad) = gfp_zone(gfp) {
            p.log(LogLevel::Err, format_args!("BUG: gfp_zone: {bad}"));
            self.log_task_line();
        } else if !gfp.contains(__GFP_NOWARN) {
            p.log(
                LogLevel::Warning,
                format_args!(
                    "WARNING: __alloc_pages: order:{order} is above MAX_PAGE_ORDER ({MAX_PAGE_ORDER}), mode:{:#x}({gfp})",
                    gfp.bits()
                ),
            );
            self.log_task_line();
        }
        None
    }

    fn log_task_line(&self) {
        let t = self.platform.current_task();
        let cpu = self.platform.cpu_guard().cpu();
        self.platform.log(
            LogLevel::Warning,
            format_args!("CPU: {cpu} PID: {} Comm: {}", t.pid, t.comm()),
        );
    }

    /// "page allocation failure" (`warn_alloc`) with the free areas (`show_free_areas`).
    #[cold]
    fn warn_alloc(&self, gfp: Gfp, order: u32) {
        let t = self.platform.current_task();
        self.platform.log(
            LogLevel::Warning,
            format_args!(
                "{}: page allocation failure: order:{order}, mode:{:#x}({gfp}), nodemask=(null)",
                t.comm(),
                gfp.bits()
            ),
        );
        self.log_task_line();
        self.show_free_areas();
    }

    /// The `Mem-Info:` block of an allocation-failure or OOM report.
    pub fn show_free_areas(&self) {
        let p = &self.platform;
        p.log(LogLevel::Warning, format_args!("Mem-Info:"));
        let kb = |pages: usize| pages * (PAGE_SIZE / 1024);
        for z in self.zones.iter().filter(|z| z.configured && z.populated()) {
            p.log(
                LogLevel::Warning,
                format_args!(
                    "Node 0 {} free:{}kB boost:0kB min:{}kB low:{}kB high:{}kB present:{}kB managed:{}kB",
                    z.name(),
                    kb(z.free_pages()),
                    kb(z.watermark[0]),
                    kb(z.watermark[1]),
                    kb(z.watermark[2]),
                    kb(z.present_pages),
                    kb(z.managed_pages)
                ),
            );
            let mut buf = [0u8; 96];
            let mut w = BufWriter::new(&mut buf);
            let _ = w.write_str("lowmem_reserve[]:");
            for (i, r) in z.lowmem_reserve.iter().enumerate() {
                if self.zones[i].configured {
                    let _ = write!(w, " {r}");
                }
            }
            p.log(LogLevel::Warning, format_args!("{}", w.as_str()));
        }
        for z in self.zones.iter().filter(|z| z.configured && z.populated()) {
            self.log_free_area_line(z);
        }
    }

    /// `Node 0 DMA: 1*4kB 0*8kB ... = 15360kB`.
    fn log_free_area_line(&self, z: &Zone) {
        let mut buf = [0u8; 512];
        let mut w = BufWriter::new(&mut buf);
        let _ = write!(w, "Node 0 {}:", z.name());
        let mut total = 0;
        for o in 0..=MAX_PAGE_ORDER {
            let n = z.nr_free(o);
            let kb = (PAGE_SIZE / 1024) << o;
            total += n * kb;
            let _ = write!(w, " {n}*{kb}kB");
        }
        let _ = write!(w, " = {total}kB");
        self.platform
            .log(LogLevel::Warning, format_args!("{}", w.as_str()));
    }

    #[cold]
    fn oom_report(&self, gfp: Gfp, order: u32) {
        let t = self.platform.current_task();
        self.platform.log(
            LogLevel::Warning,
            format_args!(
                "{} invoked oom-killer: gfp_mask={:#x}({gfp}), order={order}, oom_score_adj=0",
                t.comm(),
                gfp.bits()
            ),
        );
        self.show_free_areas();
        self.platform.log(
            LogLevel::Err,
            format_args!("Out of memory and no killable processes..."),
        );
    }
}
