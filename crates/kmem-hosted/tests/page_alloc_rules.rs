//! The rules of the page allocator, one test each, as users of the Linux API rely on them:
//! zone choice and fallback, watermarks and `lowmem_reserve`, the slow path (blocking,
//! retries, OOM, `__GFP_NOFAIL`, shrinkers, the failure report), atomic context, per-CPU
//! lists, buddy splitting and coalescing, compound pages, `alloc_pages_exact`, zeroing, bad
//! input, and boot-time accounting.
//!
//! Every test boots its own small simulated machine ([`Machine`]), so tests are independent
//! and may run in parallel. Thresholds are checked exactly: the per-CPU lists (which hide
//! pages from the zone's free count) are drained before each measured call.

mod common;
use common::{boot, three_zones};

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kmem::addr::{MAX_PAGE_ORDER, NR_PAGE_ORDERS, PAGE_SHIFT, PAGE_SIZE, Pfn, VirtAddr};
use kmem::gfp::*;
use kmem::page_alloc::Shrinker;
use kmem::page_alloc::page::Page;
use kmem::platform::{CpuGuard, Platform};
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const PAGES_PER_MIB: usize = (MIB as usize) / PAGE_SIZE;

const DMA: usize = 0;
const DMA32: usize = 1;
const NORMAL: usize = 2;
const HIGHMEM: usize = 3;

/// Allocations a test holds: head page and order.
type Held<'m> = Vec<(&'m Page, u32)>;

// ------------------------------------------------------------------------------- helpers

/// x86_64 with 12 MiB of RAM: only ZONE_DMA is populated.
fn one_zone(min_free_kbytes: Option<u64>) -> MachineConfig {
    let mut cfg = MachineConfig::x86_64(12 * MIB);
    cfg.kmem.min_free_kbytes = min_free_kbytes;
    cfg
}

fn zone_of(m: &Machine, p: &Page) -> usize {
    m.page_zone(p).ztype.index()
}

fn pfn(m: &Machine, p: &Page) -> u64 {
    m.page_to_pfn(p).0
}

/// Frees everything in `held`.
fn free_all(m: &Machine, held: &mut Held<'_>) {
    for (p, order) in held.drain(..) {
        // SAFETY: `p` is a live allocation of `order` made by this test and not used again.
        unsafe { m.__free_pages(p, order) };
    }
}

/// The allocator's observable state: free and per-CPU page counts, free blocks per zone and
/// order, and the total found by walking the free lists (which also checks them).
#[derive(Debug, PartialEq, Eq)]
struct Snap {
    free: usize,
    pcp: usize,
    areas: Vec<[usize; NR_PAGE_ORDERS]>,
    listed: usize,
}

fn snap(m: &Machine) -> Snap {
    Snap {
        free: m.nr_free_pages(),
        pcp: m.nr_pcp_pages(),
        areas: m.free_area_counts(),
        listed: m.check_free_lists().expect("free lists are consistent"),
    }
}

/// Takes every free page of the low-memory zones (orders 10 down to 0, ignoring the
/// watermarks), so that nothing is left in the buddy or per-CPU lists.
fn exhaust(m: &Machine) -> Held<'_> {
    let gfp = GFP_NOWAIT | __GFP_MEMALLOC | __GFP_NOWARN;
    let mut held = Vec::new();
    m.drain_all_pages();
    for order in (0..=MAX_PAGE_ORDER).rev() {
        while let Some(p) = m.alloc_pages(gfp, order) {
            held.push((p, order));
        }
    }
    assert_eq!(
        m.nr_free_pages(),
        0,
        "exhausted: no page in the buddy lists"
    );
    assert_eq!(m.nr_pcp_pages(), 0, "exhausted: no page on per-CPU lists");
    held
}

/// As [`exhaust`], but every page is held as an order-0 allocation, so that tests can give
/// memory back one page at a time whatever the layout of the free blocks was.
fn exhaust_in_pages(m: &Machine) -> Held<'_> {
    free_all(m, &mut exhaust(m));
    common::take_all_pages(m)
        .into_iter()
        .map(|p| (p, 0))
        .collect()
}

/// Allocates blocks of `order` with `gfp` until a call fails, draining the per-CPU lists
/// before every call, and returns the free pages of zone `zi` that each call saw (the last
/// call is the one that failed).
///
/// Why drain: an order-0..3 allocation that finds its CPU's list empty refills it with a
/// batch of blocks from the buddy lists, and pages on per-CPU lists do not count as free. So
/// without draining, the zone's free count drops in steps of a batch and the level at which
/// a mask starts failing is only known to within a batch. Draining before each call puts the
/// unused part of the batch back, so every successful order-0 call lowers the count by
/// exactly one page and the failing call sees exactly the threshold.
fn descend<'m>(m: &'m Machine, zi: usize, gfp: Gfp, order: u32, held: &mut Held<'m>) -> Vec<usize> {
    let mut seen = Vec::new();
    loop {
        m.drain_all_pages();
        seen.push(m.zones()[zi].free_pages());
        match m.alloc_pages(gfp, order) {
            Some(p) => {
                assert_eq!(
                    zone_of(m, p),
                    zi,
                    "{gfp:?}: allocated from the measured zone"
                );
                held.push((p, order));
            }
            None => return seen,
        }
        assert!(seen.len() < 1 << 20, "{gfp:?}: never fails");
    }
}

/// Allocates order-4 blocks with `gfp` (whose highest zone is `highest`) until a call fails,
/// and returns the zone of each block. Checks the fallback rule on every call: a block comes
/// from a lower zone only when every populated zone above it was at or below its low
/// watermark plus its `lowmem_reserve[highest]` (the fast path's test), the zones being
/// tried from `highest` down.
fn alloc_tracking_fallback<'m>(
    m: &'m Machine,
    gfp: Gfp,
    highest: usize,
    held: &mut Held<'m>,
) -> Vec<usize> {
    let mut seq = Vec::new();
    loop {
        let before: Vec<usize> = m.zones().iter().map(|z| z.free_pages()).collect();
        let Some(p) = m.alloc_pages(gfp, 4) else {
            return seq;
        };
        let zi = zone_of(m, p);
        assert!(
            zi <= highest,
            "{gfp:?} got a page of zone {zi}, above {highest}"
        );
        let above = m.zones().iter().zip(&before).take(highest + 1).skip(zi + 1);
        for (z, &free) in above.filter(|(z, _)| z.managed_pages != 0) {
            let mark = z.watermark[1] + z.lowmem_reserve[highest];
            assert!(
                free <= mark + 15,
                "{gfp:?} fell back to zone {zi} while {} had {free} free (low {mark})",
                z.name()
            );
        }
        seq.push(zi);
        held.push((p, 4));
    }
}

/// Asserts that an order-0 `descend` failed exactly when the zone reached `threshold` free
/// pages: every call above it succeeded, the first call at it failed.
fn assert_stops_at(seen: &[usize], threshold: usize, what: &str) {
    let fail = *seen.last().unwrap();
    assert_eq!(
        fail, threshold,
        "{what}: fails at free == {threshold}; seen {fail}"
    );
    if let [.., ok, _] = seen {
        assert_eq!(
            *ok,
            threshold + 1,
            "{what}: the last success left {ok} free"
        );
    }
}

/// Runs `bad`, which must be rejected: one "BUG: Bad page state" report (mentioning
/// `reason`, unless empty) and no change to the allocator's state.
fn assert_rejected(m: &Machine, what: &str, reason: &str, bad: impl FnOnce()) {
    m.platform().take_log();
    let before = snap(m);
    let reports = m.bad_page_reports();
    bad();
    assert_eq!(
        m.bad_page_reports(),
        reports + 1,
        "{what}: exactly one report"
    );
    let log = m.platform().take_log().join("\n");
    assert!(
        log.contains("BUG: Bad page state"),
        "{what}: reported\n{log}"
    );
    assert!(
        log.contains(reason),
        "{what}: the report says {reason:?}\n{log}"
    );
    assert_eq!(snap(m), before, "{what}: nothing changed");
}

/// True when `len` bytes at `va` are all zero.
fn is_zero(va: VirtAddr, len: usize) -> bool {
    // SAFETY: callers pass a mapping of pages they own, valid for `len` bytes.
    unsafe { std::slice::from_raw_parts(va.as_ptr(), len) }
        .iter()
        .all(|&b| b == 0)
}

/// Fills the `1 << order` pages at `p` (low memory) with `byte`.
fn fill(m: &Machine, p: &Page, order: u32, byte: u8) {
    let va = m.page_address(p).expect("low-memory page");
    // SAFETY: `p` is a live allocation of `order` owned by the caller, mapped at `va`.
    unsafe { va.as_ptr().write_bytes(byte, PAGE_SIZE << order) };
}

/// A shrinker that reports one object but frees nothing: counts direct-reclaim rounds.
struct CountingShrinker {
    scans: AtomicUsize,
}

impl Shrinker for CountingShrinker {
    fn name(&self) -> &str {
        "counting"
    }
    fn count_objects(&self) -> usize {
        1
    }
    fn scan_objects(&self, _nr_to_scan: usize) -> usize {
        self.scans.fetch_add(1, Ordering::Relaxed);
        0
    }
}

/// A cache of pages that it gives back to the page allocator when asked.
struct PoolShrinker<'m> {
    m: &'m Machine,
    pool: Mutex<Held<'m>>,
    scans: AtomicUsize,
}

impl Shrinker for PoolShrinker<'_> {
    fn name(&self) -> &str {
        "page-pool"
    }
    fn count_objects(&self) -> usize {
        self.pool.lock().unwrap().len()
    }
    fn scan_objects(&self, nr_to_scan: usize) -> usize {
        self.scans.fetch_add(1, Ordering::Relaxed);
        let mut pool = self.pool.lock().unwrap();
        let mut pages = 0;
        for _ in 0..nr_to_scan {
            let Some((p, order)) = pool.pop() else { break };
            // SAFETY: the pool owns `p`, a live allocation of `order`, and forgets it here.
            unsafe { self.m.__free_pages(p, order) };
            pages += 1 << order;
        }
        pages
    }
}

/// A machine whose slow path waits `wait_ns` per round and retries `retries` times.
fn slow_machine(wait_ns: u64, retries: u32) -> Machine {
    let mut cfg = one_zone(None);
    cfg.kmem.reclaim_wait_ns = wait_ns;
    cfg.kmem.reclaim_retries = retries;
    boot(cfg)
}

// ------------------------------------------------------------------------------- zone choice

/// GFP_KERNEL takes Normal first and falls back to DMA32, then DMA, only when the zones
/// above are at their watermarks.
#[test]
fn gfp_kernel_prefers_normal_then_dma32_then_dma() {
    let m = boot(three_zones());
    for zi in [DMA, DMA32, NORMAL] {
        assert!(m.zones()[zi].managed_pages > 0, "zone {zi} populated");
    }
    let gfp = GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN;
    let mut held = Vec::new();
    let seq = alloc_tracking_fallback(&m, gfp, NORMAL, &mut held);
    assert_eq!(seq[0], NORMAL, "the first page comes from Normal");
    for zi in [NORMAL, DMA32, DMA] {
        assert!(seq.contains(&zi), "zone {zi} was used");
    }
    free_all(&m, &mut held);
    m.check_free_lists().unwrap();
}

/// GFP_DMA allocates only from DMA, and fails when DMA is exhausted although the other
/// zones are full.
#[test]
fn gfp_dma_only_from_dma_and_fails_when_dma_is_exhausted() {
    let m = boot(three_zones());
    let others = (
        m.zones()[DMA32].free_pages(),
        m.zones()[NORMAL].free_pages(),
    );
    let mut held = Vec::new();
    for gfp in [
        GFP_DMA | __GFP_NOWARN,
        GFP_KERNEL | GFP_DMA | __GFP_NORETRY | __GFP_NOWARN,
    ] {
        for order in [4, 0] {
            loop {
                m.drain_all_pages();
                let Some(p) = m.alloc_pages(gfp, order) else {
                    break;
                };
                assert_eq!(
                    zone_of(&m, p),
                    DMA,
                    "{gfp:?} gave a page of zone {}",
                    zone_of(&m, p)
                );
                held.push((p, order));
            }
        }
    }
    assert!(held.len() > 100, "DMA gave many pages first");
    let failures = m.alloc_failures();
    assert!(m.alloc_pages(GFP_DMA | __GFP_NOWARN, 0).is_none());
    assert_eq!(m.alloc_failures(), failures + 1);
    m.drain_all_pages();
    assert_eq!(
        (
            m.zones()[DMA32].free_pages(),
            m.zones()[NORMAL].free_pages()
        ),
        others,
        "DMA32 and Normal untouched"
    );
    // Other masks still find memory.
    let p = m
        .alloc_pages(GFP_KERNEL, 0)
        .expect("GFP_KERNEL still succeeds");
    assert_eq!(zone_of(&m, p), NORMAL);
    held.push((p, 0));
    free_all(&m, &mut held);
}

/// GFP_DMA32 allocates from DMA32, falls back to DMA when DMA32 is at its watermark, and
/// never takes Normal.
#[test]
fn gfp_dma32_from_dma32_then_dma_never_normal() {
    let m = boot(three_zones());
    let normal = m.zones()[NORMAL].free_pages();
    let mut held = Vec::new();
    let seq = alloc_tracking_fallback(&m, GFP_DMA32 | __GFP_NOWARN, DMA32, &mut held);
    assert_eq!(seq[0], DMA32);
    assert!(seq.contains(&DMA), "falls back to DMA");
    assert!(!seq.contains(&NORMAL), "never Normal");
    assert_eq!(m.zones()[NORMAL].free_pages(), normal);
    free_all(&m, &mut held);
}

/// x86_32: GFP_HIGHUSER takes HighMem first and falls back to Normal; __GFP_DMA32 means
/// Normal (there is no DMA32 zone: Linux's OPT_ZONE_DMA32); __get_free_pages never returns
/// HighMem.
#[test]
fn x86_32_highmem_first_dma32_means_normal_get_free_pages_is_lowmem() {
    let m = boot(MachineConfig::x86_32(960 * MIB));
    assert!(m.zones()[HIGHMEM].managed_pages > 0);
    assert!(!m.zones()[DMA32].configured);

    let p = m.alloc_pages(GFP_HIGHUSER, 0).unwrap();
    assert_eq!(zone_of(&m, p), HIGHMEM, "GFP_HIGHUSER prefers HighMem");
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(p, 0) };

    for gfp in [GFP_KERNEL | __GFP_DMA32, GFP_DMA32] {
        let p = m.alloc_pages(gfp, 0).unwrap();
        assert_eq!(zone_of(&m, p), NORMAL, "{gfp:?} means Normal on x86_32");
        // SAFETY: allocated above at order 0, not used again.
        unsafe { m.__free_pages(p, 0) };
    }
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    assert_eq!(zone_of(&m, p), NORMAL, "GFP_KERNEL never gets HighMem");
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(p, 0) };

    for order in [0, 2] {
        let va = m.__get_free_pages(GFP_HIGHUSER, order).expect("an address");
        let page = m.virt_to_page(va).expect("in the direct map");
        assert_ne!(zone_of(&m, page), HIGHMEM);
        assert_eq!(m.page_address(page), Some(va));
        // SAFETY: `va` came from __get_free_pages at `order` and is not used again.
        unsafe { m.free_pages(va, order) };
    }

    // HighMem exhausted (down to its watermark): GFP_HIGHUSER falls back to Normal.
    let mut held = Vec::new();
    loop {
        let p = m.alloc_pages(GFP_HIGHUSER | __GFP_NOWARN, 4).unwrap();
        held.push((p, 4));
        if zone_of(&m, p) != HIGHMEM {
            assert_eq!(zone_of(&m, p), NORMAL, "HighMem falls back to Normal");
            break;
        }
    }
    assert!(held.len() > 100);
    assert!(m.zones()[HIGHMEM].free_pages() <= m.zones()[HIGHMEM].watermark[1] + 16);
    free_all(&m, &mut held);
    assert_eq!(m.bad_page_reports(), 0);
}

/// A HighMem page has no direct-map address; kmap maps it, and what is written through one
/// mapping is read back through the next.
#[test]
fn highmem_page_has_no_address_and_kmap_maps_it() {
    let m = boot(MachineConfig::x86_32(960 * MIB));
    let p = m.alloc_pages(GFP_HIGHUSER, 0).unwrap();
    assert_eq!(zone_of(&m, p), HIGHMEM);
    assert_eq!(m.page_address(p), None, "HighMem is not in the direct map");
    let va = m.kmap(p);
    assert!(va.is_page_aligned());
    assert!(
        m.virt_to_page(va).is_none(),
        "a kmap address is not a direct-map address"
    );
    // SAFETY: `va` maps the live page `p` for PAGE_SIZE bytes until kunmap.
    let buf = unsafe { std::slice::from_raw_parts_mut(va.as_ptr(), PAGE_SIZE) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    m.kunmap(p);
    assert_eq!(m.kmap_slots_in_use(), 0);
    let va2 = m.kmap(p);
    assert_eq!(m.kmap_slots_in_use(), 1);
    // SAFETY: `va2` maps the live page `p` for PAGE_SIZE bytes until kunmap.
    let buf = unsafe { std::slice::from_raw_parts(va2.as_ptr(), PAGE_SIZE) };
    assert!(buf.iter().enumerate().all(|(i, &b)| b == (i * 7 + 3) as u8));
    // Two kmaps of one page share the mapping.
    assert_eq!(m.kmap(p), va2);
    m.kunmap(p);
    m.kunmap(p);
    assert_eq!(m.kmap_slots_in_use(), 0);

    // Misuse: an unbalanced kunmap and free_pages of a kmap address are reported.
    assert_rejected(&m, "unbalanced kunmap", "kunmap", || m.kunmap(p));
    assert_rejected(
        &m,
        "free_pages(kmap address)",
        "outside the direct map",
        || {
            // SAFETY: the free is rejected (not a direct-map address); nothing is freed.
            unsafe { m.free_pages(va2, 0) }
        },
    );

    // __GFP_ZERO clears a dirtied HighMem page (through a temporary mapping).
    // SAFETY: `p` was allocated above at order 0 and is not used again.
    unsafe { m.__free_pages(p, 0) };
    let q = m.alloc_pages(GFP_HIGHUSER | __GFP_ZERO, 0).unwrap();
    assert_eq!(
        pfn(&m, q),
        pfn(&m, p),
        "premise: the per-CPU list hands back the dirty page"
    );
    let va = m.kmap(q);
    assert!(is_zero(va, PAGE_SIZE), "__GFP_ZERO zeroes HighMem pages");
    m.kunmap(q);
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(q, 0) };
}

/// page_to_pfn / pfn_to_page / page_address / virt_to_page round-trip, and page_zone is
/// the zone whose span holds the frame.
#[test]
fn page_conversions_round_trip() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let base = m.platform().direct_map_base();
    let layout = m.config().kmem.layout;
    let mut held = Vec::new();
    for (gfp, order) in [
        (GFP_KERNEL, 0),
        (GFP_KERNEL, 3),
        (GFP_DMA, 0),
        (GFP_KERNEL, 10),
        (GFP_DMA, 5),
    ] {
        let p = m.alloc_pages(gfp, order).unwrap();
        let f = m.page_to_pfn(p);
        assert!(std::ptr::eq(m.pfn_to_page(f).unwrap(), p));
        let va = m.page_address(p).unwrap();
        assert_eq!(va.0, base + ((f.0 as usize) << PAGE_SHIFT));
        assert!(std::ptr::eq(m.virt_to_page(va).unwrap(), p));
        let last = VirtAddr(va.0 + PAGE_SIZE - 1);
        assert!(std::ptr::eq(m.virt_to_page(last).unwrap(), p));
        let z = m.page_zone(p);
        assert!(z.spans(f.0));
        assert_eq!(Some(z.ztype), layout.zone_of(f.0 << PAGE_SHIFT));
        held.push((p, order));
    }
    assert!(
        m.pfn_to_page(Pfn((64 * MIB) >> PAGE_SHIFT)).is_none(),
        "past the end of RAM"
    );
    free_all(&m, &mut held);
}

// ------------------------------------------------------------------------------- bad requests

/// Zone modifiers naming two zones fail with "invalid zone modifiers" and change nothing.
#[test]
fn bad_zone_combination_fails_and_changes_nothing() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    m.drain_all_pages();
    let before = snap(&m);
    for bad in [
        GFP_KERNEL | __GFP_DMA | __GFP_HIGHMEM,
        GFP_KERNEL | __GFP_DMA | __GFP_DMA32,
        GFP_KERNEL | __GFP_HIGHMEM | __GFP_DMA32,
        GFP_ATOMIC | __GFP_DMA | __GFP_DMA32 | __GFP_HIGHMEM,
    ] {
        let failures = m.alloc_failures();
        assert!(m.alloc_pages(bad, 0).is_none(), "{bad:?} fails");
        assert_eq!(m.alloc_failures(), failures + 1);
        let log = m.platform().take_log().join("\n");
        assert!(
            log.contains("invalid zone modifiers"),
            "{bad:?}: reported\n{log}"
        );
        assert_eq!(snap(&m), before, "{bad:?}: nothing changed");
    }
}

/// An order above MAX_PAGE_ORDER (10) fails with a WARNING, silently with __GFP_NOWARN.
#[test]
fn order_above_max_fails_with_warning_unless_nowarn() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    m.drain_all_pages();
    let before = snap(&m);
    assert!(m.alloc_pages(GFP_KERNEL, MAX_PAGE_ORDER + 1).is_none());
    let log = m.platform().take_log().join("\n");
    assert!(log.contains("WARNING") && log.contains("order:11"), "{log}");
    assert!(m.__get_free_pages(GFP_KERNEL, 12).is_none());
    assert!(m.alloc_pages_exact(8 << 20, GFP_KERNEL).is_none());
    assert!(m.platform().take_log().join("\n").contains("WARNING"));
    assert!(
        m.alloc_pages(GFP_KERNEL | __GFP_NOWARN, MAX_PAGE_ORDER + 1)
            .is_none()
    );
    assert!(
        m.platform().take_log().is_empty(),
        "__GFP_NOWARN: no report"
    );
    assert_eq!(snap(&m), before, "nothing changed");
    // The largest legal order works.
    let p = m.alloc_pages(GFP_KERNEL, MAX_PAGE_ORDER).unwrap();
    // SAFETY: allocated above at MAX_PAGE_ORDER, not used again.
    unsafe { m.__free_pages(p, MAX_PAGE_ORDER) };
}

// ------------------------------------------------------------------------------- watermarks

/// On a single-zone machine, each mask stops at its own level: GFP_NOWAIT and blocking
/// GFP_KERNEL at min, blocking __GFP_HIGH at min/2, GFP_ATOMIC at 3/8 of min, and
/// __GFP_MEMALLOC not before the zone is empty.
#[test]
fn watermarks_each_mask_stops_at_its_level() {
    let m = boot(one_zone(Some(2048)));
    let z = &m.zones()[DMA];
    assert_eq!(m.totalram_pages(), z.managed_pages, "only DMA is populated");
    let min = z.watermark[0];
    assert_eq!(min, 512, "min_free_kbytes 2048 = 512 pages, all in DMA");
    assert!(z.watermark[1] > min && z.watermark[2] > z.watermark[1]);
    assert_eq!(z.lowmem_reserve[NORMAL], 0, "no zone above DMA has memory");
    let min_high = min - min / 2; // __GFP_HIGH
    let min_atomic = min_high - min_high / 4; // __GFP_HIGH and cannot block
    assert_eq!((min_high, min_atomic), (256, 192));
    let mut held = Vec::new();

    // Above low, everything succeeds on the fast path; GFP_NOWAIT goes on down to min.
    let seen = descend(&m, DMA, GFP_NOWAIT | __GFP_NOWARN, 0, &mut held);
    assert!(seen[0] > z.watermark[1]);
    assert_stops_at(&seen, min, "GFP_NOWAIT");
    let seen = descend(
        &m,
        DMA,
        GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN,
        0,
        &mut held,
    );
    assert_stops_at(&seen, min, "GFP_KERNEL|__GFP_NORETRY");
    let gfp = GFP_KERNEL | __GFP_HIGH | __GFP_NORETRY | __GFP_NOWARN;
    let seen = descend(&m, DMA, gfp, 0, &mut held);
    assert_stops_at(&seen, min_high, "GFP_KERNEL|__GFP_HIGH");
    let seen = descend(&m, DMA, GFP_NOWAIT | __GFP_NOWARN, 0, &mut held);
    assert_eq!(seen, [min_high], "GFP_NOWAIT gets nothing below min");
    let seen = descend(&m, DMA, GFP_ATOMIC | __GFP_NOWARN, 0, &mut held);
    assert_stops_at(&seen, min_atomic, "GFP_ATOMIC");
    let gfp = GFP_NOWAIT | __GFP_MEMALLOC | __GFP_NOWARN;
    let seen = descend(&m, DMA, gfp, 0, &mut held);
    assert_stops_at(&seen, 0, "__GFP_MEMALLOC");
    let gfp = GFP_ATOMIC | __GFP_MEMALLOC | __GFP_NOMEMALLOC | __GFP_NOWARN;
    assert!(m.alloc_pages(gfp, 0).is_none());

    free_all(&m, &mut held);
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
}

/// For order > 0 the check is `free - (2^order - 1) > mark`: order-4 blocks (which bypass
/// the per-CPU lists) stop within 15 pages above each mask's level.
#[test]
fn watermarks_for_higher_orders_count_the_block() {
    let m = boot(one_zone(Some(2048)));
    let z = &m.zones()[DMA];
    let min = z.watermark[0];
    let min_atomic = (min - min / 2) - (min - min / 2) / 4;
    let mut held = Vec::new();
    for (gfp, mark) in [
        (GFP_NOWAIT | __GFP_NOWARN, min),
        (GFP_ATOMIC | __GFP_NOWARN, min_atomic),
    ] {
        let seen = descend(&m, DMA, gfp, 4, &mut held);
        let fail = *seen.last().unwrap();
        assert!(
            fail - 15 <= mark && mark < fail + 1,
            "{gfp:?}: failed with {fail} free, mark {mark}"
        );
        if let [.., ok, _] = seen[..] {
            assert_eq!(
                ok,
                fail + 16,
                "order-4 blocks do not touch the per-CPU lists"
            );
        }
    }
    free_all(&m, &mut held);
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
}

/// lowmem_reserve: an allocation that may use Normal and falls back into DMA may not take
/// DMA below min + lowmem_reserve[Normal]; a GFP_DMA allocation may.
#[test]
fn lowmem_reserve_protects_dma_from_gfp_kernel() {
    let m = boot(three_zones());
    let z = m.zones();
    let reserve = z[DMA].lowmem_reserve[NORMAL];
    assert_eq!(
        reserve,
        (z[DMA32].managed_pages + z[NORMAL].managed_pages) / 256
    );
    assert!(reserve > 0);
    m.drain_all_pages();
    let boot_state = snap(&m);

    let gfp = GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN;
    let mut held = Vec::new();
    for order in (0..=MAX_PAGE_ORDER).rev() {
        loop {
            m.drain_all_pages();
            let Some(p) = m.alloc_pages(gfp, order) else {
                break;
            };
            held.push((p, order));
        }
    }
    m.drain_all_pages();
    assert_eq!(z[NORMAL].free_pages(), z[NORMAL].watermark[0]);
    assert_eq!(
        z[DMA32].free_pages(),
        z[DMA32].watermark[0] + z[DMA32].lowmem_reserve[NORMAL]
    );
    assert_eq!(
        z[DMA].free_pages(),
        z[DMA].watermark[0] + reserve,
        "GFP_KERNEL leaves min + lowmem_reserve[Normal] in DMA"
    );
    // GFP_DMA's highest zone is DMA itself: no reserve applies.
    let p = m
        .alloc_pages(GFP_DMA | __GFP_NOWARN, 0)
        .expect("GFP_DMA may use the reserve");
    assert_eq!(zone_of(&m, p), DMA);
    held.push((p, 0));
    free_all(&m, &mut held);
    m.drain_all_pages();
    assert_eq!(snap(&m), boot_state);
}

/// Linux (since commit eae116d1f044, "Revert mm/page_alloc.c: don't show protection in
/// zone's ->lowmem_reserve[] for empty zone") keeps a lower zone's protection against an
/// empty upper zone: on a machine without Normal memory, GFP_KERNEL (whose highest zone is
/// Normal) still may not take DMA below min + DMA32's managed pages / 256.
#[test]
fn lowmem_reserve_applies_against_empty_upper_zones() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let z = m.zones();
    assert_eq!(z[NORMAL].managed_pages, 0, "premise: Normal is empty");
    let expected = z[DMA32].managed_pages / 256;
    assert!(expected > 0);
    assert_eq!(z[DMA].lowmem_reserve[DMA32], expected);
    assert_eq!(
        z[DMA].lowmem_reserve[NORMAL], expected,
        "protection against the (empty) Normal zone, as /proc/zoneinfo shows in Linux"
    );
    let gfp = GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN;
    let mut held = Vec::new();
    for order in (0..=MAX_PAGE_ORDER).rev() {
        loop {
            m.drain_all_pages();
            let Some(p) = m.alloc_pages(gfp, order) else {
                break;
            };
            held.push((p, order));
        }
    }
    m.drain_all_pages();
    let left = z[DMA].free_pages();
    free_all(&m, &mut held);
    assert_eq!(
        left,
        z[DMA].watermark[0] + expected,
        "GFP_KERNEL leaves DMA's reserve"
    );
}

// ------------------------------------------------------------------------------- slow path

/// On an exhausted machine, GFP_ATOMIC and GFP_NOWAIT fail at once without reclaiming;
/// GFP_KERNEL|__GFP_NORETRY and costly orders (> 3) fail after one reclaim round, with no
/// wait and no OOM report.
#[test]
fn slowpath_nonblocking_and_noretry_fail_fast() {
    // One round's wait is 2 s: any wait shows up as a blown time bound.
    let m = slow_machine(2_000_000_000, 16);
    let counter = CountingShrinker {
        scans: AtomicUsize::new(0),
    };
    // SAFETY: `counter` outlives its registration: it is unregistered below, before it drops.
    let id = unsafe { m.register_shrinker(&counter) }.unwrap();
    let mut held = exhaust(&m);
    for (gfp, order, rounds) in [
        (GFP_ATOMIC, 0, 0),
        (GFP_NOWAIT, 0, 0),
        (GFP_ATOMIC, 4, 0),
        (GFP_KERNEL | __GFP_NORETRY, 0, 1),
        (GFP_KERNEL | __GFP_NORETRY, 5, 1),
        (GFP_KERNEL, 4, 1),
        (GFP_KERNEL, 10, 1),
    ] {
        counter.scans.store(0, Ordering::Relaxed);
        m.platform().take_log();
        let t = Instant::now();
        let got = m.alloc_pages(gfp | __GFP_NOWARN, order);
        let took = t.elapsed();
        assert!(got.is_none(), "{gfp:?} order {order} fails");
        assert!(
            took < Duration::from_millis(400),
            "{gfp:?} order {order} waited {took:?}"
        );
        assert_eq!(
            counter.scans.load(Ordering::Relaxed),
            rounds,
            "{gfp:?} order {order}: reclaim rounds"
        );
        assert!(!m.platform().log_contains("oom-killer"), "{gfp:?}: no OOM");
    }
    m.unregister_shrinker(id);
    free_all(&m, &mut held);
}

/// __GFP_RETRY_MAYFAIL retries reclaim `reclaim_retries` times without progress (Linux's
/// `no_progress_loops > MAX_RECLAIM_RETRIES`, so retries + 1 rounds), then fails without
/// invoking the OOM killer — costly orders included.
#[test]
fn slowpath_retry_mayfail_fails_after_retries_without_oom() {
    let retries = 3;
    let m = slow_machine(1_000_000, retries);
    let counter = CountingShrinker {
        scans: AtomicUsize::new(0),
    };
    // SAFETY: `counter` outlives its registration: it is unregistered below, before it drops.
    let id = unsafe { m.register_shrinker(&counter) }.unwrap();
    let mut held = exhaust(&m);
    for order in [0, 4] {
        counter.scans.store(0, Ordering::Relaxed);
        m.platform().take_log();
        assert!(
            m.alloc_pages(GFP_KERNEL | __GFP_RETRY_MAYFAIL, order)
                .is_none()
        );
        assert_eq!(counter.scans.load(Ordering::Relaxed), retries as usize + 1);
        let log = m.platform().take_log().join("\n");
        assert!(
            !log.contains("oom-killer"),
            "no OOM for __GFP_RETRY_MAYFAIL\n{log}"
        );
        assert!(log.contains("page allocation failure"), "{log}");
    }
    m.unregister_shrinker(id);
    free_all(&m, &mut held);
}

/// Plain GFP_KERNEL on an exhausted machine retries, then reaches the OOM step (reported as
/// Linux does) and, with nothing to kill, fails.
#[test]
fn slowpath_gfp_kernel_ends_in_oom_report_and_fails() {
    let retries = 2;
    let m = slow_machine(1_000_000, retries);
    let counter = CountingShrinker {
        scans: AtomicUsize::new(0),
    };
    // SAFETY: `counter` outlives its registration: it is unregistered below, before it drops.
    let id = unsafe { m.register_shrinker(&counter) }.unwrap();
    let mut held = exhaust(&m);
    let failures = m.alloc_failures();
    assert!(m.alloc_pages(GFP_KERNEL, 0).is_none());
    assert_eq!(m.alloc_failures(), failures + 1);
    assert_eq!(counter.scans.load(Ordering::Relaxed), retries as usize + 1);
    let log = m.platform().take_log().join("\n");
    assert!(log.contains("invoked oom-killer"), "{log}");
    assert!(log.contains("Out of memory"), "{log}");
    m.unregister_shrinker(id);
    free_all(&m, &mut held);
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
}

/// __GFP_NOFAIL blocks until memory is freed by someone else, then succeeds.
#[test]
fn slowpath_nofail_waits_for_a_free_then_succeeds() {
    let m = boot(one_zone(None));
    let mut held = exhaust(&m);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            let p = m.alloc_pages(GFP_KERNEL | __GFP_NOFAIL, 0);
            done.store(true, Ordering::SeqCst);
            p.map(|p| pfn(&m, p))
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "__GFP_NOFAIL must wait for memory"
        );
        free_all(&m, &mut held);
        let got = b.join().unwrap().expect("__GFP_NOFAIL never fails");
        assert!(done.load(Ordering::SeqCst));
        let p = m.pfn_to_page(Pfn(got)).unwrap();
        // SAFETY: thread B allocated `p` at order 0 and dropped it; it is not used again.
        unsafe { m.__free_pages(p, 0) };
    });
    assert!(!m.platform().log_contains("page allocation failure"));
    assert_eq!(m.bad_page_reports(), 0);
}

/// Linux gives a __GFP_NOFAIL allocation that reclaim cannot satisfy access to half of the
/// min reserve (`__alloc_pages_cpuset_fallback(..., ALLOC_MIN_RESERVE, ...)` in
/// `__alloc_pages_slowpath`), so it makes progress when free memory sits between min/2 and
/// min. kmem has no OOM killer to free memory, which makes that access matter more.
#[test]
fn slowpath_nofail_may_use_half_the_min_reserve() {
    let m = boot(one_zone(Some(2048)));
    let min = m.zones()[DMA].watermark[0];
    // Exhaust the machine in single pages, so that the reserve can be refilled page by page.
    let mut held = exhaust_in_pages(&m);
    // Give back order-0 pages until DMA holds 3/4 of min: above min/2, below min.
    while m.zones()[DMA].free_pages() < min * 3 / 4 {
        let (p, order) = held.remove(0);
        // SAFETY: a live allocation of this test, not used again.
        unsafe { m.__free_pages(p, order) };
        m.drain_all_pages();
    }
    let free = m.zones()[DMA].free_pages();
    assert!(
        free > min / 2 && free < min,
        "premise: {free} free, min {min}"
    );
    let done = AtomicBool::new(false);
    let got_in_time = std::thread::scope(|s| {
        let b = s.spawn(|| {
            let p = m.alloc_pages(GFP_KERNEL | __GFP_NOFAIL, 0);
            done.store(true, Ordering::SeqCst);
            p.map(|p| pfn(&m, p))
        });
        let t = Instant::now();
        while !done.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let in_time = done.load(Ordering::SeqCst);
        // Unblock B whatever happened, so the test ends.
        free_all(&m, &mut held);
        let got = b.join().unwrap().expect("__GFP_NOFAIL never fails");
        let p = m.pfn_to_page(Pfn(got)).unwrap();
        // SAFETY: thread B allocated `p` at order 0; it is not used again.
        unsafe { m.__free_pages(p, 0) };
        in_time
    });
    assert!(
        got_in_time,
        "__GFP_NOFAIL succeeds with free between min/2 and min"
    );
}

/// A registered shrinker is called under pressure, and the pages it frees let a GFP_KERNEL
/// allocation succeed (without an OOM report).
#[test]
fn slowpath_shrinker_frees_pages_for_gfp_kernel() {
    let m = boot(one_zone(None));
    let min = m.zones()[DMA].watermark[0];
    let pool = PoolShrinker {
        m: &m,
        pool: Mutex::new(Vec::new()),
        scans: AtomicUsize::new(0),
    };
    for _ in 0..min + 64 {
        let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
        pool.pool.lock().unwrap().push((p, 0));
    }
    // SAFETY: `pool` outlives its registration: it is unregistered below, before it drops.
    let id = unsafe { m.register_shrinker(&pool) }.unwrap();
    let mut held = exhaust(&m);
    m.platform().take_log();
    let p = m
        .alloc_pages(GFP_KERNEL, 0)
        .expect("the shrinker's pages satisfy GFP_KERNEL");
    held.push((p, 0));
    assert!(
        pool.scans.load(Ordering::Relaxed) >= 1,
        "the shrinker was called"
    );
    assert!(pool.pool.lock().unwrap().len() < min + 64);
    let log = m.platform().take_log().join("\n");
    assert!(
        !log.contains("oom-killer") && !log.contains("allocation failure"),
        "{log}"
    );
    m.unregister_shrinker(id);
    free_all(&m, &mut held);
    free_all(&m, &mut pool.pool.lock().unwrap());
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
}

/// The failure report reads as Linux's: "page allocation failure: order:N,
/// mode:0x...(names)" and a per-zone free-area line "Node 0 DMA: n*4kB ... = NkB" that adds
/// up; __GFP_NOWARN suppresses it (the failure is still counted).
#[test]
fn slowpath_failure_report_format_and_nowarn() {
    let m = boot(one_zone(None));
    let mut held = exhaust_in_pages(&m);
    // Give some pages back, staying below min so the request still fails.
    let min = m.zones()[DMA].watermark[0];
    while m.zones()[DMA].free_pages() < min / 4 {
        let (p, order) = held.remove(0);
        // SAFETY: a live allocation of this test, not used again.
        unsafe { m.__free_pages(p, order) };
        m.drain_all_pages();
    }
    let free = m.zones()[DMA].free_pages();
    assert!(
        free > 0 && free < min,
        "premise: {free} free, below min {min}"
    );
    let free_kb = free * 4;
    m.platform().take_log();
    let gfp = GFP_KERNEL | __GFP_NORETRY;
    let failures = m.alloc_failures();
    assert!(m.alloc_pages(gfp, 2).is_none());
    assert_eq!(m.alloc_failures(), failures + 1);
    let log = m.platform().take_log();
    let head = format!("page allocation failure: order:2, mode:{:#x}(", gfp.bits());
    let line = log
        .iter()
        .find(|l| l.contains(&head))
        .unwrap_or_else(|| panic!("no {head:?} in {log:#?}"));
    assert!(line.contains("GFP_KERNEL|__GFP_NORETRY)"), "{line}");
    let area = log
        .iter()
        .find(|l| l.starts_with("Node 0 DMA: "))
        .unwrap_or_else(|| panic!("no free-area line in {log:#?}"));
    let (blocks, total) = area["Node 0 DMA: ".len()..].split_once(" = ").unwrap();
    let mut sum = 0;
    let mut orders = 0;
    for (o, tok) in blocks.split(' ').enumerate() {
        let (n, kb) = tok.split_once('*').unwrap();
        assert_eq!(kb, format!("{}kB", 4 << o), "{area}");
        sum += n.parse::<usize>().unwrap() * (4 << o);
        orders += 1;
    }
    assert_eq!(orders, NR_PAGE_ORDERS, "{area}");
    assert_eq!(total, format!("{sum}kB"), "{area}");
    assert_eq!(sum, free_kb, "{area}");

    assert!(m.alloc_pages(gfp | __GFP_NOWARN, 2).is_none());
    assert_eq!(m.alloc_failures(), failures + 2, "still counted");
    let log = m.platform().take_log().join("\n");
    assert!(
        !log.contains("page allocation failure"),
        "__GFP_NOWARN\n{log}"
    );
    free_all(&m, &mut held);
}

// ------------------------------------------------------------------------------- atomic context

/// A sleeping allocation in atomic context is reported ("sleeping function called from
/// invalid context"); GFP_ATOMIC and GFP_NOWAIT are not.
#[test]
fn atomic_context_sleeping_allocation_is_reported() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    const SPLAT: &str = "BUG: sleeping function called from invalid context";
    for order in [0, 4] {
        let g = m.platform().cpu_guard();
        let p = m.alloc_pages(GFP_KERNEL, order).expect("still allocates");
        // SAFETY: allocated above at `order`, not used again.
        unsafe { m.__free_pages(p, order) };
        drop(g);
        let log = m.platform().take_log().join("\n");
        assert!(log.contains(SPLAT), "order {order}\n{log}");
    }
    let g = m.platform().cpu_guard();
    for (gfp, order) in [
        (GFP_ATOMIC, 0),
        (GFP_ATOMIC, 4),
        (GFP_NOWAIT, 0),
        (GFP_NOWAIT, 2),
    ] {
        let p = m.alloc_pages(gfp, order).unwrap();
        // SAFETY: allocated above at `order`, not used again.
        unsafe { m.__free_pages(p, order) };
    }
    drop(g);
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(p, 0) };
    let log = m.platform().take_log().join("\n");
    assert!(!log.contains(SPLAT), "{log}");
}

// ------------------------------------------------------------------------------- per-CPU lists

/// An order-0 alloc/free pair is served by the CPU's list (the zone's free count does not
/// move); a free raises the CPU's count by one until the high mark, which it never exceeds
/// (a batch goes back to the buddy lists); drain_all_pages returns everything.
#[test]
fn pcp_lists_serve_order0_and_respect_high() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let zi = DMA32; // GFP_KERNEL's first populated zone on this machine
    let z = &m.zones()[zi];
    let cpu = m.platform().cpu_guard().cpu();
    let pcp = m.pcp(cpu, zi);
    let (high, batch) = (z.pcp_high, z.pcp_batch);
    assert!(high > batch && batch >= 1);

    // Warm-up, then pairs do not touch the buddy lists.
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    assert_eq!(zone_of(&m, p), zi);
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(p, 0) };
    let (free0, count0) = (z.free_pages(), pcp.count());
    assert!(count0 >= 1);
    for _ in 0..100 {
        let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
        assert_eq!(pcp.count(), count0 - 1);
        // SAFETY: allocated above at order 0, not used again.
        unsafe { m.__free_pages(p, 0) };
        assert_eq!((z.free_pages(), pcp.count()), (free0, count0));
    }

    // Frees pile up on the list up to the high mark.
    let n = 3 * high as usize;
    let mut pages: Vec<_> = (0..n)
        .map(|_| m.alloc_pages(GFP_KERNEL, 0).unwrap())
        .collect();
    m.drain_all_pages();
    assert_eq!(pcp.count(), 0);
    let mut drains = 0;
    for p in pages.drain(..) {
        let (free, count) = (z.free_pages(), pcp.count());
        // SAFETY: allocated above at order 0, not used again.
        unsafe { m.__free_pages(p, 0) };
        let now = pcp.count();
        assert!(now <= high, "pcp count {now} above high {high}");
        if count + 1 < high {
            assert_eq!(now, count + 1, "a free goes to the CPU's list");
            assert_eq!(z.free_pages(), free, "not to the buddy lists");
        } else {
            drains += 1;
            let moved = (count + 1 - now) as usize;
            assert!(moved >= batch as usize, "a batch goes back");
            assert_eq!(z.free_pages(), free + moved);
        }
    }
    assert!(drains >= 2);
    let (free, count) = (z.free_pages(), pcp.count());
    assert!(count > 0);
    assert_eq!(m.drain_all_pages(), count as usize);
    assert_eq!(z.free_pages(), free + count as usize);
    assert_eq!(pcp.count(), 0);
    assert_eq!(m.nr_pcp_pages(), 0);
    m.check_free_lists().unwrap();
}

// ------------------------------------------------------------------------------- buddy

/// Allocating splits the smallest large-enough block (one new free block at each order
/// between), freeing coalesces it back.
#[test]
fn buddy_split_and_coalesce() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let fresh = m.free_area_counts()[DMA];
    assert_eq!(
        fresh,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4],
        "premise: DMA is 4 order-10 blocks"
    );
    for order in [4, 7, 9, 10] {
        let p = m.alloc_pages(GFP_DMA, order).unwrap();
        let mut want = fresh;
        want[10] -= 1;
        for n in &mut want[order as usize..10] {
            *n += 1;
        }
        assert_eq!(m.free_area_counts()[DMA], want, "order {order} split");
        // SAFETY: allocated above at `order`, not used again.
        unsafe { m.__free_pages(p, order) };
        assert_eq!(m.free_area_counts()[DMA], fresh, "order {order} coalesced");
    }
    // Order 0 goes through the per-CPU list: drain to see the buddy lists alone.
    let p = m.alloc_pages(GFP_DMA, 0).unwrap();
    m.drain_all_pages();
    assert_eq!(m.free_area_counts()[DMA], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3]);
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(p, 0) };
    m.drain_all_pages();
    assert_eq!(m.free_area_counts()[DMA], fresh);
    m.check_free_lists().unwrap();
}

/// Two blocks of order k allocated in a row from a fresh zone are buddies
/// (pfn ^ (1 << k)), and freeing both (in either order) restores the fresh zone.
#[test]
fn buddy_consecutive_allocations_are_buddies() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let fresh = m.free_area_counts();
    for k in 0..MAX_PAGE_ORDER {
        let a = m.alloc_pages(GFP_DMA, k).unwrap();
        let b = m.alloc_pages(GFP_DMA, k).unwrap();
        let (pa, pb) = (pfn(&m, a), pfn(&m, b));
        assert_eq!(pa & ((1 << k) - 1), 0, "order-{k} block aligned");
        assert_eq!(
            pb,
            pa ^ (1 << k),
            "order {k}: {pa:#x} and {pb:#x} are buddies"
        );
        let (first, second) = if k % 2 == 0 { (a, b) } else { (b, a) };
        // SAFETY: both allocated above at order `k`, not used again.
        unsafe {
            m.__free_pages(first, k);
            m.__free_pages(second, k);
        }
        m.drain_all_pages();
        assert_eq!(m.free_area_counts(), fresh, "order {k}: coalesced");
    }
}

// ------------------------------------------------------------------------------- compound pages

/// __GFP_COMP: a head and tails; freeing the head with its order works, freeing a tail or
/// with the wrong order is reported and changes nothing.
#[test]
fn compound_pages_head_tails_and_bad_frees() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let p = m.alloc_pages(GFP_KERNEL | __GFP_COMP, 3).unwrap();
    let f = pfn(&m, p);
    assert!(p.is_head() && !p.is_tail());
    for i in 1..8 {
        let t = m.pfn_to_page(Pfn(f + i)).unwrap();
        assert!(t.is_tail() && !t.is_head(), "page {i} is a tail");
    }
    let outside = m.pfn_to_page(Pfn(f + 8)).unwrap();
    assert!(!outside.is_tail());
    let plain = m.alloc_pages(GFP_KERNEL, 3).unwrap();
    let pf = pfn(&m, plain);
    assert!(!plain.is_head());
    assert!((1..8).all(|i| !m.pfn_to_page(Pfn(pf + i)).unwrap().is_tail()));

    let tail = m.pfn_to_page(Pfn(f + 3)).unwrap();
    assert_rejected(&m, "freeing a tail", "tail", || {
        // SAFETY: rejected: a tail page is not an allocation; nothing is freed.
        unsafe { m.__free_pages(tail, 0) }
    });
    assert_rejected(&m, "freeing a tail at the head's order", "tail", || {
        // SAFETY: rejected as above.
        unsafe { m.__free_pages(tail, 3) }
    });
    assert_rejected(&m, "wrong order", "order", || {
        // SAFETY: rejected: the order does not match; nothing is freed.
        unsafe { m.__free_pages(p, 2) }
    });
    assert!(p.is_head() && tail.is_tail(), "still a live compound page");

    // SAFETY: both allocated above at order 3, not used again.
    unsafe {
        m.__free_pages(p, 3);
        m.__free_pages(plain, 3);
    }
    m.drain_all_pages();
    assert!((0..8).all(|i| {
        let q = m.pfn_to_page(Pfn(f + i)).unwrap();
        !q.is_tail() && !q.is_head()
    }));
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
    m.check_free_lists().unwrap();
}

// ------------------------------------------------------------------------------- alloc_pages_exact

/// alloc_pages_exact(5 pages) uses 5 pages of an order-3 block and frees the other 3; each
/// page may be freed alone; free_pages_exact returns the rest.
#[test]
fn alloc_pages_exact_uses_only_what_was_asked() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    assert!(m.alloc_pages_exact(0, GFP_KERNEL).is_none());
    m.drain_all_pages();
    let free0 = m.nr_free_pages();

    let va = m.alloc_pages_exact(5 * PAGE_SIZE, GFP_KERNEL).unwrap();
    // SAFETY: the 5 pages at `va` are ours.
    unsafe { va.as_ptr().write_bytes(0x5a, 5 * PAGE_SIZE) };
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), free0 - 5, "only 5 pages in use");
    let first = m.virt_to_page(va).unwrap();
    let f = pfn(&m, first);
    for i in 0..8 {
        let p = m.pfn_to_page(Pfn(f + i)).unwrap();
        assert_eq!(p.is_allocated(), i < 5, "page {i}");
        if i < 5 {
            assert_eq!(p.order(), 0, "page {i} is an order-0 allocation");
        }
    }
    let third = VirtAddr(va.0 + 2 * PAGE_SIZE);
    // SAFETY: page 2 of the exact allocation is an order-0 allocation, not used again.
    unsafe { m.free_page(third) };
    // SAFETY: pages 0-1 and 3-4 are ours and not used again.
    unsafe {
        m.free_pages_exact(va, 2 * PAGE_SIZE);
        m.free_pages_exact(VirtAddr(va.0 + 3 * PAGE_SIZE), 2 * PAGE_SIZE);
    }
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), free0);

    // A size that is not a whole number of pages is rounded up.
    let va = m.alloc_pages_exact(3 * PAGE_SIZE + 1, GFP_KERNEL).unwrap();
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), free0 - 4);
    // SAFETY: the 4 pages at `va` are ours and not used again.
    unsafe { m.free_pages_exact(va, 3 * PAGE_SIZE + 1) };
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), free0);
    assert_eq!(m.bad_page_reports(), 0);
    m.check_free_lists().unwrap();
}

// ------------------------------------------------------------------------------- zeroing

/// Allocates every page, dirties it, and frees it all again.
fn dirty_all_memory(m: &Machine) {
    let mut held = exhaust(m);
    for &(p, order) in &held {
        fill(m, p, order, 0xa5);
    }
    free_all(m, &mut held);
}

/// get_zeroed_page and __GFP_ZERO return zeros even from memory that was dirtied and freed;
/// without them the memory is not cleared.
#[test]
fn zeroing_get_zeroed_page_and_gfp_zero() {
    let m = boot(one_zone(None));
    dirty_all_memory(&m);
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    let va = m.page_address(p).unwrap();
    assert!(
        !is_zero(va, PAGE_SIZE),
        "premise: freed memory keeps its contents"
    );
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(p, 0) };
    let z = m.get_zeroed_page(GFP_KERNEL).unwrap();
    assert_eq!(z, va, "premise: the dirty page is handed out again");
    assert!(is_zero(z, PAGE_SIZE), "get_zeroed_page");
    for order in [2, 5] {
        let q = m.alloc_pages(GFP_KERNEL | __GFP_ZERO, order).unwrap();
        assert!(
            is_zero(m.page_address(q).unwrap(), PAGE_SIZE << order),
            "order {order}"
        );
        // SAFETY: allocated above at `order`, not used again.
        unsafe { m.__free_pages(q, order) };
    }
    let va = m.__get_free_pages(GFP_KERNEL | __GFP_ZERO, 3).unwrap();
    assert!(is_zero(va, PAGE_SIZE << 3));
    // SAFETY: both came from __get_free_pages at these orders and are not used again.
    unsafe {
        m.free_pages(va, 3);
        m.free_page(z);
    }
}

/// With init_on_free or init_on_alloc, every allocation reads as zeros.
#[test]
fn zeroing_init_on_free_and_init_on_alloc() {
    for (on_free, on_alloc) in [(true, false), (false, true)] {
        let mut cfg = one_zone(None);
        cfg.kmem.init_on_free = on_free;
        cfg.kmem.init_on_alloc = on_alloc;
        let m = boot(cfg);
        dirty_all_memory(&m);
        let mut held = Vec::new();
        for order in [0, 0, 3, 4] {
            let p = m.alloc_pages(GFP_KERNEL, order).unwrap();
            let va = m.page_address(p).unwrap();
            assert!(
                is_zero(va, PAGE_SIZE << order),
                "init_on_free={on_free} init_on_alloc={on_alloc} order {order}"
            );
            held.push((p, order));
        }
        free_all(&m, &mut held);
    }
}

// ------------------------------------------------------------------------------- bad input

/// Every kind of bad free is reported ("BUG: Bad page state") and changes nothing; after
/// all of it the allocator works and its accounting is back to the boot values.
#[test]
fn bad_input_is_reported_and_changes_nothing() {
    const HOLE: u64 = 32 * MIB;
    const RESERVED: u64 = 8 * MIB;
    let cfg = MachineConfig::x86_64(64 * MIB)
        .with_hole(HOLE, 4 * MIB)
        .with_reserved(RESERVED, MIB);
    let m = boot(cfg);
    let base = m.platform().direct_map_base();
    m.drain_all_pages();
    let boot_state = snap(&m);
    let mut cases = 0;

    // free_pages(0) is a silent no-op.
    // SAFETY: address 0 frees nothing.
    unsafe { m.free_pages(VirtAddr(0), 0) };
    assert!(m.platform().take_log().is_empty());
    assert_eq!(m.bad_page_reports(), 0);
    assert_eq!(snap(&m), boot_state);

    // Double free of an order-0 page sitting on the per-CPU list.
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    // SAFETY: allocated above at order 0, not used again.
    unsafe { m.__free_pages(p, 0) };
    assert_eq!(
        p.flag_names().to_string(),
        "pcp",
        "premise: on the per-CPU list"
    );
    assert_rejected(&m, "double free (pcp)", "double free", || {
        // SAFETY: rejected: the page is already free; nothing is freed.
        unsafe { m.__free_pages(p, 0) }
    });
    cases += 1;

    // Double free of an order-5 block, which went straight back to the buddy lists.
    let p = m.alloc_pages(GFP_KERNEL, 5).unwrap();
    // SAFETY: allocated above at order 5, not used again.
    unsafe { m.__free_pages(p, 5) };
    assert_rejected(&m, "double free (buddy)", "", || {
        // SAFETY: rejected: the block is already free; nothing is freed.
        unsafe { m.__free_pages(p, 5) }
    });
    cases += 1;

    // Wrong order.
    let p = m.alloc_pages(GFP_KERNEL, 2).unwrap();
    for wrong in [0, 1, 3] {
        assert_rejected(&m, "wrong order", "but allocated with order 2", || {
            // SAFETY: rejected: the order does not match; nothing is freed.
            unsafe { m.__free_pages(p, wrong) }
        });
        cases += 1;
    }
    // A page inside a live, non-compound allocation.
    let inner = m.pfn_to_page(Pfn(pfn(&m, p) + 1)).unwrap();
    assert_rejected(
        &m,
        "page inside an allocation",
        "not the first page",
        || {
            // SAFETY: rejected: not the head of an allocation; nothing is freed.
            unsafe { m.__free_pages(inner, 0) }
        },
    );
    cases += 1;
    assert!(p.is_allocated());
    // SAFETY: allocated above at order 2, not used again.
    unsafe { m.__free_pages(p, 2) };

    // Not page aligned.
    let va = m.__get_free_page(GFP_KERNEL).unwrap();
    assert_rejected(&m, "unaligned address", "not page aligned", || {
        // SAFETY: rejected: not page aligned; nothing is freed.
        unsafe { m.free_page(VirtAddr(va.0 + 8)) }
    });
    cases += 1;
    // SAFETY: `va` is a live order-0 allocation, not used again.
    unsafe { m.free_page(va) };

    // Addresses outside RAM.
    for addr in [base + (64 * MIB) as usize, base + (1 << 40), 0x1000] {
        assert_rejected(&m, "address outside RAM", "outside the direct map", || {
            // SAFETY: rejected: not a direct-map address of RAM; nothing is freed.
            unsafe { m.free_page(VirtAddr(addr)) }
        });
        cases += 1;
    }

    // Reserved pages: a boot reservation, and a hole.
    for (what, phys) in [
        ("reserved", RESERVED + 3 * PAGE_SIZE as u64),
        ("hole", HOLE + 5 * 4096),
    ] {
        let page = m.pfn_to_page(Pfn(phys >> PAGE_SHIFT)).unwrap();
        assert!(page.is_reserved(), "premise: {what} page is reserved");
        assert_rejected(&m, what, "reserved", || {
            // SAFETY: rejected: reserved pages are never freed; nothing is freed.
            unsafe { m.__free_pages(page, 0) }
        });
        assert_rejected(&m, what, "reserved", || {
            // SAFETY: as above, by address.
            unsafe { m.free_page(VirtAddr(base + phys as usize)) }
        });
        cases += 2;
    }

    // A page inside a free block, and the head of a free block.
    let head = (m.zones()[DMA32].start_pfn..)
        .map(|f| m.pfn_to_page(Pfn(f)).unwrap())
        .find(|p| p.is_buddy() && p.order() >= 1)
        .unwrap();
    let order = head.order();
    let inside = m.pfn_to_page(Pfn(pfn(&m, head) + 1)).unwrap();
    assert_rejected(&m, "page inside a free block", "not the first page", || {
        // SAFETY: rejected: the page is free; nothing is freed.
        unsafe { m.__free_pages(inside, 0) }
    });
    assert_rejected(&m, "head of a free block", "double free", || {
        // SAFETY: rejected: the block is free; nothing is freed.
        unsafe { m.__free_pages(head, order) }
    });
    cases += 2;

    assert_eq!(m.bad_page_reports(), cases);

    // Business as usual afterwards; accounting returns exactly to boot values.
    let mut held = Vec::new();
    for order in 0..=MAX_PAGE_ORDER {
        for gfp in [GFP_KERNEL, GFP_DMA, GFP_ATOMIC] {
            held.push((m.alloc_pages(gfp, order).unwrap(), order));
        }
    }
    free_all(&m, &mut held);
    m.drain_all_pages();
    assert_eq!(snap(&m), boot_state);
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
    assert_eq!(m.bad_page_reports(), cases, "no new reports");
}

// ------------------------------------------------------------------------------- boot

/// MemTotal is RAM minus reservations minus mem_map, the per-CPU sets and the first per-CPU
/// chunk; holes reduce the
/// present pages; zone spans and counts; 32-byte page descriptors.
#[test]
fn boot_accounting_with_hole_and_reservation() {
    let cfg = MachineConfig::x86_64(64 * MIB)
        .with_hole(32 * MIB, 4 * MIB)
        .with_reserved(8 * MIB, MIB)
        .with_cpus(2);
    let m = boot(cfg);
    let bi = *m.boot_info();
    let ram_pages = 60 * PAGES_PER_MIB;
    let entries = 64 * PAGES_PER_MIB; // holes have descriptors too

    assert_eq!(bi.page_desc_size, 32);
    assert!(bi.page_desc_size < 64, "half of Linux's struct page");
    assert_eq!(bi.mem_map_entries, entries);
    assert_eq!(bi.mem_map_bytes, entries * 32);
    assert_eq!(bi.present_pages, ram_pages);
    let cost = bi.mem_map_cost_per_page();
    assert!(
        (cost - 32.0 * 64.0 / 60.0).abs() < 1e-9,
        "cost per page {cost}"
    );
    println!("mem_map cost: {cost:.2} bytes per 4K page of RAM");

    let mem_map_pages = bi.mem_map_bytes.div_ceil(PAGE_SIZE);
    let pcp_pages = bi.pcp_bytes.div_ceil(PAGE_SIZE);
    // The first per-CPU chunk (a 64 KiB unit per CPU and its descriptor) is memblock's too.
    let percpu_pages = kmem::percpu::PercpuAllocator::first_chunk_size(2) / PAGE_SIZE;
    let expected = ram_pages - PAGES_PER_MIB - mem_map_pages - pcp_pages - percpu_pages;
    assert_eq!(m.totalram_pages(), expected, "MemTotal");
    assert_eq!(bi.managed_pages, expected);
    assert_eq!(bi.reserved_pages, ram_pages - expected);
    // Everything managed is free after boot, but for the kmalloc caches' descriptors.
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
    let caches = m.totalram_pages() - m.boot_free_pages();
    assert!(
        caches > 0 && caches < 200,
        "{caches} pages of cache descriptors"
    );
    let meminfo = m.proc_meminfo();
    let total: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(total, expected * 4, "MemTotal in kB");

    let z = m.zones();
    let dma_pages = 16 * PAGES_PER_MIB;
    assert_eq!(
        (z[DMA].start_pfn, z[DMA].spanned_pages, z[DMA].present_pages),
        (0, dma_pages, dma_pages)
    );
    assert_eq!(
        z[DMA].managed_pages,
        dma_pages - PAGES_PER_MIB,
        "the reservation is in DMA"
    );
    assert_eq!(z[DMA32].start_pfn, dma_pages as u64);
    assert_eq!(
        z[DMA32].spanned_pages,
        48 * PAGES_PER_MIB,
        "the span includes the hole"
    );
    assert_eq!(
        z[DMA32].present_pages,
        44 * PAGES_PER_MIB,
        "the hole is not present"
    );
    assert_eq!(
        z[DMA32].managed_pages,
        z[DMA32].present_pages - mem_map_pages - pcp_pages - percpu_pages,
        "mem_map, the per-CPU sets and the first chunk are at the top of memory"
    );
    assert_eq!((z[NORMAL].present_pages, z[NORMAL].managed_pages), (0, 0));
    assert!(z[NORMAL].configured && !z[HIGHMEM].configured);

    // Descriptors of holes, reservations and of mem_map's own frames are reserved.
    let hole = m.pfn_to_page(Pfn((33 * MIB) >> PAGE_SHIFT)).unwrap();
    assert!(hole.is_reserved());
    let desc = m.pfn_to_page(Pfn(0)).unwrap() as *const Page as usize;
    let mm_frame = m.virt_to_page(VirtAddr(desc)).unwrap();
    assert!(mm_frame.is_reserved() && zone_of(&m, mm_frame) == DMA32);
    assert!(!m.pfn_to_page(Pfn(0)).unwrap().is_reserved());
}

/// x86_32: the zones' spans, HighMem fully managed (boot allocations stay in low memory).
#[test]
fn boot_x86_32_zones() {
    let m = boot(MachineConfig::x86_32(GIB));
    let z = m.zones();
    assert_eq!(z[DMA].spanned_pages, 16 * PAGES_PER_MIB);
    assert_eq!(z[NORMAL].start_pfn, (16 * MIB) >> PAGE_SHIFT);
    assert_eq!(z[NORMAL].spanned_pages, 880 * PAGES_PER_MIB);
    assert_eq!(z[HIGHMEM].start_pfn, (896 * MIB) >> PAGE_SHIFT);
    assert_eq!(z[HIGHMEM].present_pages, 128 * PAGES_PER_MIB);
    assert_eq!(z[HIGHMEM].managed_pages, z[HIGHMEM].present_pages);
    assert!(
        z[NORMAL].managed_pages < z[NORMAL].present_pages,
        "mem_map is in low memory"
    );
    assert_eq!(m.boot_free_pages(), m.nr_free_pages());
    let hm = m.pfn_to_page(Pfn(z[HIGHMEM].start_pfn)).unwrap();
    assert!(m.page_address(hm).is_none());
    let nm = m.pfn_to_page(Pfn(z[HIGHMEM].start_pfn - 1)).unwrap();
    assert!(m.page_address(nm).is_some());
}
