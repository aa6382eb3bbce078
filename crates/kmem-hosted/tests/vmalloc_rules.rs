//! The rules of vmalloc, in the spirit of Linux's `lib/test_vmalloc.c`, one test each:
//!
//! * churn: fixed-size and random-size (1–100 pages) allocations with patterns checked;
//!   15 000 live areas with churn (the trees stay `O(log n)`); several threads at once;
//! * address space: full fit after fragmenting the range, aligned areas (`__get_vm_area`,
//!   `VM_IOREMAP`), `VM_NO_GUARD`, exhaustion (reported, `None`), purge-and-retry of lazily
//!   freed ranges, the `lazy_max_pages` threshold;
//! * pages: physically scattered yet one virtual buffer, HighMem pages on x86_32,
//!   `vmalloc_to_page`/`vmalloc_to_pfn` round trips, `vmap`/`vunmap`, zeroing;
//! * faults: touching a guard page, or an area after `vfree`, kills a child process with
//!   SIGSEGV (the test re-executes itself with `--exact`);
//! * bad input: `vfree` of what is not an area's start is reported and changes nothing;
//! * non-sleeping allocations on an exhausted machine fail at once and leak nothing;
//! * accounting: after freeing and purging, free pages are exactly back where they were;
//! * `/proc/vmallocinfo` lines parse like Linux's sample.
//!
//! Every test boots its own machine and uses its vmalloc layer (`Kmem::vmalloc_space`).
//! Tests that map many pages take [`HEAVY`], so that parallel
//! tests stay below the host's `vm.max_map_count` (each mapped page can be a host mapping).

mod common;
use common::{Rng, bytes, check_pat, pat, shrink_kmalloc, write_pat};

use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kmem::addr::{PAGE_SIZE, Pfn, VirtAddr};
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem::platform::{PageProt, Platform};
use kmem::vmalloc::*;
use kmem_hosted::platform::HostedPlatform;
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;
const PAGE: usize = PAGE_SIZE;
/// Environment variable that turns `guard_page_child` into a faulting child.
const CHILD_ENV: &str = "KMEM_VMALLOC_CHILD";

/// Serializes the tests that map thousands of pages.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(PoisonError::into_inner)
}

// ------------------------------------------------------------------------------- harness

/// A booted machine with its vmalloc layer, and the free pages of the settled machine
/// right after the layer was set up.
struct T {
    m: Machine,
    base: usize,
}

impl T {
    /// The machine's vmalloc layer (the one instance over its range).
    fn vm(&self) -> &Vmalloc {
        self.m.vmalloc_space()
    }

    fn boot(cfg: MachineConfig) -> T {
        let m = Machine::boot(cfg).expect("machine boots");
        let mut t = T { m, base: 0 };
        t.base = t.settled_free();
        t.m.platform().take_log();
        t
    }

    /// A 64 MiB x86_64 machine with 4 CPUs and 1 GiB of vmalloc space.
    fn small() -> T {
        T::boot(MachineConfig::x86_64(64 * MIB))
    }

    /// A 64 MiB machine with `vmalloc` bytes of vmalloc space.
    fn with_range(vmalloc: u64) -> T {
        T::boot(MachineConfig {
            vmalloc_size: vmalloc,
            ..MachineConfig::x86_64(64 * MIB)
        })
    }

    fn cx(&self) -> VmCtx<'_, HostedPlatform> {
        VmCtx::new(self.m.pages(), self.m.slab(), self.m.kmalloc_caches())
    }

    #[track_caller]
    fn vmalloc(&self, size: usize) -> *mut u8 {
        self.vm()
            .vmalloc(self.cx(), size)
            .unwrap_or_else(|| panic!("vmalloc({size}) failed:\n{}", self.log()))
            .as_ptr()
    }

    fn vfree(&self, p: *const u8) {
        // SAFETY: callers pass an area they own and no longer use, or an address the test
        // expects to be rejected.
        unsafe { self.vm().vfree(self.cx(), p) };
    }

    fn area(&self, size: usize, flags: VmFlags) -> VmStruct {
        self.vm()
            .get_vm_area(self.cx(), size, flags)
            .unwrap_or_else(|| panic!("get_vm_area({size}) failed:\n{}", self.log()))
    }

    fn free_area(&self, a: VmStruct) {
        // SAFETY: nothing is mapped in the test's reservations, or the test no longer uses
        // what it mapped.
        unsafe { self.vm().free_vm_area(self.cx(), a) };
    }

    fn log(&self) -> String {
        self.m.platform().take_log().join("\n")
    }

    fn info(&self) -> String {
        let mut s = String::new();
        self.vm().vmallocinfo(self.m.pages(), &mut s).unwrap();
        s
    }

    /// Purges, shrinks the caches vmalloc uses, drains the per-CPU lists: free pages.
    fn settled_free(&self) -> usize {
        self.vm().vm_unmap_aliases(self.cx());
        shrink_kmalloc(&self.m);
        self.m.kmem_cache_shrink(self.vm().area_cache());
        self.m.drain_all_pages();
        self.m.nr_free_pages()
    }

    /// Everything is freed: no area, no vmalloc page, free pages back to `base`, the
    /// invariants hold and nothing was reported.
    fn assert_clean(&self) {
        assert_eq!(self.settled_free(), self.base, "free pages are back");
        self.vm().validate().expect("vmalloc invariants");
        self.m.validate().expect("allocator invariants");
        assert_eq!(self.vm().nr_busy_areas(), 0);
        assert_eq!(self.vm().vmalloc_nr_pages(), 0);
        assert_eq!(
            self.vm().nr_free_areas(),
            1,
            "the range is one free area again"
        );
        assert_eq!(self.vm().largest_free_area(), self.vm().range().1);
        let log = self.log();
        assert!(!log.contains("BUG"), "unexpected report:\n{log}");
    }

    /// `n` order-0 pages taken with `GFP_KERNEL`, which must be allocated.
    fn alloc_pages(&self, n: usize) -> Vec<&Page> {
        (0..n)
            .map(|_| self.m.alloc_page(GFP_KERNEL).unwrap())
            .collect()
    }

    /// Frees order-0 `pages`.
    fn free_pages<'a>(&self, pages: impl IntoIterator<Item = &'a Page>) {
        for p in pages {
            // SAFETY: callers pass order-0 pages they allocated, no longer use and no longer
            // have mapped.
            unsafe { self.m.__free_pages(p, 0) };
        }
    }

    /// `vmap` of `pages`, which must succeed.
    fn vmap(&self, pages: &[&Page]) -> *mut u8 {
        self.vm()
            .vmap(self.cx(), pages, VM_MAP, PageProt::KERNEL)
            .unwrap()
            .as_ptr()
    }

    /// The frames behind `n` pages at `p`.
    fn pfns(&self, p: *const u8, n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| {
                let va = p.wrapping_add(i * PAGE);
                self.vm().vmalloc_to_pfn(self.cx(), va).expect("mapped").0
            })
            .collect()
    }
}

/// Asserts the page at `va` holds page `i` of a buffer filled with `tag`'s pattern.
fn assert_page_pat(va: *mut u8, tag: usize, i: usize) {
    let expect: Vec<u8> = (0..PAGE).map(|j| pat(tag, i * PAGE + j)).collect();
    assert_eq!(bytes(va, PAGE), &expect[..], "page {i}");
}

// ------------------------------------------------------------------------------- basics

/// vmalloc gives a page-aligned address in the vmalloc range that reads and writes as one
/// buffer; `find_vm_area` describes it (size with the guard page, `VM_ALLOC`, its pages);
/// vfree takes it all back.
#[test]
fn vmalloc_basic_round_trip() {
    let t = T::small();
    let size = 3 * PAGE + 100;
    let p = t.vmalloc(size);
    assert!(t.vm().is_vmalloc_addr(p));
    assert_eq!(p as usize % PAGE, 0);
    let (start, len) = t.m.platform().vmalloc_range();
    assert!(p as usize >= start.0 && (p as usize) + 5 * PAGE <= start.0 + len);
    write_pat(p, 4 * PAGE, 1);
    check_pat(p, 4 * PAGE, 1);
    let a = t
        .vm()
        .find_vm_area(p.wrapping_add(2 * PAGE + 7))
        .expect("area");
    assert_eq!(a.addr.0, p as usize);
    assert_eq!(a.size, 5 * PAGE, "four pages and a guard page");
    assert_eq!(a.get_vm_area_size(), 4 * PAGE);
    assert!(a.flags.contains(VM_ALLOC));
    assert_eq!(a.nr_pages, 4);
    assert_eq!(t.vm().vmalloc_nr_pages(), 4);
    let direct = t.m.__get_free_page(GFP_KERNEL).unwrap();
    assert!(!t.vm().is_vmalloc_addr(direct.as_ptr()));
    // SAFETY: allocated just above, unused.
    unsafe { t.m.free_page(direct) };
    t.vfree(p);
    assert!(t.vm().find_vm_area(p).is_none());
    assert_eq!(t.vm().vmalloc_nr_pages(), 0);
    assert!(t.vm().lazy_pages() >= 5, "the range waits for a purge");
    t.vfree(std::ptr::null());
    t.assert_clean();
}

/// `vmalloc(0)` and sizes beyond RAM fail with Linux's report; `__GFP_NOWARN` silences it.
#[test]
fn zero_and_oversized_requests_fail() {
    let t = T::small();
    assert!(t.vm().vmalloc(t.cx(), 0).is_none());
    assert!(
        t.log()
            .contains("vmalloc error: size 0, exceeds total pages")
    );
    let too_big = (t.m.totalram_pages() + 1) * PAGE;
    assert!(t.vm().vmalloc(t.cx(), too_big).is_none());
    assert!(t.log().contains(&format!(
        "vmalloc error: size {too_big}, exceeds total pages"
    )));
    assert!(
        t.vm()
            .__vmalloc(t.cx(), 0, GFP_KERNEL | __GFP_NOWARN)
            .is_none()
    );
    assert_eq!(t.log(), "");
    assert!(t.vm().vmap(t.cx(), &[], VM_MAP, PageProt::KERNEL).is_none());
    t.assert_clean();
}

// ------------------------------------------------------------------------------- churn

/// `fix_size_alloc_test`: many allocations of one size, each written and checked, with a
/// small live set freed in random order.
#[test]
fn fixed_size_churn() {
    let t = T::small();
    let mut rng = Rng::new(0x5eed_0001);
    let mut live: Vec<(*mut u8, usize)> = Vec::new();
    for i in 0..2000 {
        let p = t.vmalloc(3 * PAGE);
        write_pat(p, 3 * PAGE, i);
        live.push((p, i));
        if live.len() > 16 || rng.below(2) == 0 {
            let (q, tag) = live.swap_remove(rng.below(live.len()));
            check_pat(q, 3 * PAGE, tag);
            t.vfree(q);
        }
    }
    for (q, tag) in live.drain(..) {
        check_pat(q, 3 * PAGE, tag);
        t.vfree(q);
    }
    t.assert_clean();
}

/// `random_size_alloc_test`: sizes of 1–100 pages (plus odd bytes), up to 64 live, every
/// buffer checked before it is freed; the invariants hold throughout.
#[test]
fn random_size_churn() {
    let _heavy = heavy();
    let t = T::small();
    let mut rng = Rng::new(0x5eed_0002);
    let mut live: Vec<(*mut u8, usize, usize)> = Vec::new();
    for i in 0..1500 {
        if live.len() < 64 && (live.is_empty() || rng.below(3) != 0) {
            let size = (1 + rng.below(100)) * PAGE - rng.below(PAGE);
            let p = t.vmalloc(size);
            write_pat(p, size, i);
            live.push((p, size, i));
        } else {
            let (p, size, tag) = live.swap_remove(rng.below(live.len()));
            check_pat(p, size, tag);
            t.vfree(p);
        }
        if i % 250 == 0 {
            t.vm().validate().expect("invariants during churn");
        }
    }
    for (p, size, tag) in live.drain(..) {
        check_pat(p, size, tag);
        t.vfree(p);
    }
    t.assert_clean();
}

/// `long_busy_list_alloc_test`: 15 000 live areas; allocations and frees among them stay
/// fast (the trees are balanced: lookups are `O(log n)`), `vmalloc_to_page` finds the right
/// page in any of them, and lazily freed ranges get purged on the way.
#[test]
fn long_busy_list_with_churn() {
    let _heavy = heavy();
    let t = T::boot(MachineConfig::x86_64(128 * MIB));
    const LIVE: usize = 15_000;
    let mut rng = Rng::new(0x5eed_0003);
    let started = Instant::now();
    let mut live: Vec<(*mut u8, u8)> = (0..LIVE)
        .map(|i| {
            let p = t.vmalloc(PAGE);
            // SAFETY: a fresh one-page area.
            unsafe { p.write(i as u8) };
            (p, i as u8)
        })
        .collect();
    let fill = started.elapsed();
    assert_eq!(t.vm().nr_busy_areas(), LIVE);
    t.vm().validate().expect("invariants with 15 000 areas");

    let started = Instant::now();
    const CHURN: usize = 15_000;
    for i in 0..CHURN {
        let k = rng.below(live.len());
        let (p, tag) = live[k];
        // SAFETY: `p` is a live one-page area of ours.
        assert_eq!(unsafe { p.read() }, tag);
        let page = t.vm().vmalloc_to_page(t.cx(), p).expect("busy area");
        let direct = t.m.page_address(page).expect("x86_64: lowmem");
        // SAFETY: the same frame through the direct map.
        assert_eq!(unsafe { direct.as_ptr().read() }, tag);
        t.vfree(p);
        let q = t.vmalloc(PAGE);
        // SAFETY: a fresh one-page area.
        unsafe { q.write(i as u8) };
        live[k] = (q, i as u8);
    }
    let churn = started.elapsed();
    let started = Instant::now();
    for &(p, _) in &live {
        let a = t.vm().find_vm_area(p.wrapping_add(100)).expect("busy");
        assert_eq!(a.addr.0, p as usize);
    }
    let lookup = started.elapsed();
    assert_eq!(t.vm().nr_busy_areas(), LIVE);
    assert!(t.vm().nr_purges() > 0, "{} pages freed lazily", CHURN * 2);
    t.vm().validate().expect("invariants after churn");
    eprintln!(
        "long busy list: {LIVE} vmallocs in {fill:?} ({:.1} us each); {CHURN} vfree+vmalloc pairs among them in {churn:?} ({:.1} us each); {} purges; {LIVE} find_vm_area in {lookup:?} ({:.0} ns each)",
        fill.as_secs_f64() * 1e6 / LIVE as f64,
        churn.as_secs_f64() * 1e6 / CHURN as f64,
        t.vm().nr_purges(),
        lookup.as_secs_f64() * 1e9 / LIVE as f64
    );
    for (p, tag) in live.drain(..) {
        // SAFETY: a live area of ours.
        assert_eq!(unsafe { p.read() }, tag);
        t.vfree(p);
    }
    t.assert_clean();
}

/// Four threads allocate, check and free concurrently; frees are also done by other
/// threads than the allocating one.
#[test]
fn concurrent_vmalloc_vfree() {
    let _heavy = heavy();
    let t = T::small();
    let handoff: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for th in 0..4usize {
            let (t, handoff) = (&t, &handoff);
            s.spawn(move || {
                let mut rng = Rng::new(0x5eed_0100 + th as u64);
                let mut mine: Vec<(usize, usize, usize)> = Vec::new();
                for i in 0..400 {
                    let tag = th * 1_000_000 + i;
                    let size = (1 + rng.below(16)) * PAGE;
                    let p = t.vmalloc(size);
                    write_pat(p, size, tag);
                    mine.push((p as usize, size, tag));
                    if rng.below(4) == 0 {
                        let x = mine.swap_remove(rng.below(mine.len()));
                        handoff.lock().unwrap().push(x);
                    }
                    if mine.len() > 8 {
                        let (p, size, tag) = mine.swap_remove(rng.below(mine.len()));
                        check_pat(p as *mut u8, size, tag);
                        t.vfree(p as *const u8);
                    }
                    let other = handoff.lock().unwrap().pop();
                    if let Some((p, size, tag)) = other {
                        check_pat(p as *mut u8, size, tag);
                        t.vfree(p as *const u8);
                    }
                }
                for (p, size, tag) in mine {
                    check_pat(p as *mut u8, size, tag);
                    t.vfree(p as *const u8);
                }
            });
        }
    });
    for (p, size, tag) in handoff.into_inner().unwrap() {
        check_pat(p as *mut u8, size, tag);
        t.vfree(p as *const u8);
    }
    t.assert_clean();
}

// ------------------------------------------------------------------------------- address space

/// `full_fit_alloc_test`: fill a 16 MiB range with one-page areas, free every other one:
/// 2048 holes of two pages, none of which holds a two-page area (three with its guard),
/// yet each takes a one-page area again. Once everything is freed and purged, one area of
/// the whole range (less its guard page) fits exactly.
#[test]
fn full_fit_after_fragmenting() {
    let t = T::with_range(16 * MIB);
    let range = t.vm().range().1;
    let mut areas = Vec::new();
    while let Some(a) = t.vm().get_vm_area(t.cx(), PAGE, VmFlags::NONE) {
        areas.push(a);
    }
    assert_eq!(areas.len(), range / (2 * PAGE));
    assert!(t.log().contains("vmap allocation for size 8192 failed"));
    for a in areas.iter().step_by(2) {
        t.free_area(*a);
    }
    t.vm().vm_unmap_aliases(t.cx());
    assert_eq!(t.vm().nr_free_areas(), areas.len() / 2);
    assert_eq!(t.vm().largest_free_area(), 2 * PAGE);
    t.vm().validate().unwrap();
    assert!(
        t.vm()
            .get_vm_area(t.cx(), 2 * PAGE, VmFlags::NONE)
            .is_none()
    );
    assert!(t.log().contains("vmap allocation for size 12288 failed"));
    let refill: Vec<VmStruct> = (0..areas.len() / 2)
        .map(|_| t.area(PAGE, VmFlags::NONE))
        .collect();
    assert_eq!(t.vm().nr_free_areas(), 0);
    for a in refill
        .into_iter()
        .chain(areas.into_iter().skip(1).step_by(2))
    {
        t.free_area(a);
    }
    t.vm().vm_unmap_aliases(t.cx());
    assert_eq!(t.vm().largest_free_area(), range);
    let whole = t.area(range - PAGE, VmFlags::NONE);
    assert_eq!(whole.addr, t.vm().range().0);
    assert_eq!(whole.size, range);
    assert_eq!(t.vm().nr_free_areas(), 0);
    t.free_area(whole);
    t.assert_clean();
}

/// `align_shift_alloc_test`/`fix_align_alloc_test`: `__get_vm_area` with alignments from a
/// page to 8 MiB, interleaved with one-page areas that misalign the free space; every start
/// is aligned, and a bad alignment is reported. `VM_IOREMAP` areas are aligned to their
/// size rounded up to a power of two, at most 128 pages.
#[test]
fn aligned_allocations() {
    let t = T::small();
    let mut rng = Rng::new(0x5eed_0004);
    let mut all = Vec::new();
    for round in 0..4 {
        for shift in 0..=11 {
            all.push(t.area(PAGE, VmFlags::NONE));
            let align = PAGE << shift;
            let size = (1 + rng.below(5)) * PAGE;
            let caller = Caller::Name("aligned_allocations");
            let a = t
                .vm()
                .__get_vm_area(t.cx(), size, align, VmFlags::NONE, caller);
            let a = a.unwrap_or_else(|| panic!("round {round} align {align:#x}: {}", t.log()));
            assert_eq!(a.addr.0 % align, 0, "align {align:#x}");
            all.push(a);
        }
    }
    // vmalloc with an alignment too.
    let p = t
        .vm()
        .__vmalloc_node(t.cx(), 3 * PAGE, 1 << 21, GFP_KERNEL, Caller::here());
    let p = p.expect("aligned vmalloc").as_ptr();
    assert_eq!(p as usize % (1 << 21), 0);
    write_pat(p, 3 * PAGE, 4);
    check_pat(p, 3 * PAGE, 4);
    t.vm().validate().unwrap();
    for (size, align) in [(5 * PAGE, 8 * PAGE), (PAGE, PAGE), (1 << 20, 128 * PAGE)] {
        let a = t.area(size, VM_IOREMAP);
        assert_eq!(a.addr.0 % align, 0, "ioremap of {size:#x}");
        all.push(a);
    }
    let caller = Caller::Name("bad_align");
    assert!(
        t.vm()
            .__get_vm_area(t.cx(), PAGE, 3 * PAGE, VmFlags::NONE, caller)
            .is_none()
    );
    assert!(t.log().contains("alignment 0x3000 is not a power of two"));
    t.vfree(p);
    for a in all {
        t.free_area(a);
    }
    t.assert_clean();
}

/// `VM_NO_GUARD` areas have no guard page: two of them in an empty range are adjacent.
#[test]
fn no_guard_areas_are_adjacent() {
    let t = T::small();
    let a = t.area(2 * PAGE, VM_NO_GUARD);
    let b = t.area(PAGE, VM_NO_GUARD);
    let c = t.area(PAGE, VmFlags::NONE);
    let d = t.area(PAGE, VmFlags::NONE);
    assert_eq!(a.size, 2 * PAGE);
    assert_eq!(b.addr.0, a.addr.0 + 2 * PAGE);
    assert_eq!(c.addr.0, b.addr.0 + PAGE);
    assert_eq!(d.addr.0, c.addr.0 + 2 * PAGE, "c has a guard page");
    for x in [a, b, c, d] {
        t.free_area(x);
    }
    t.assert_clean();
}

/// When the range is exhausted, vmalloc reports as Linux does ("vmap allocation for size N
/// failed: use vmalloc=<size> to increase size", then "vmalloc error: ... vm_struct
/// allocation failed") and returns `None`; `__GFP_NOWARN` fails silently. Nothing leaks.
#[test]
fn range_exhaustion_reports_and_fails() {
    let t = T::with_range(8 * MIB);
    let size = 16 << 20;
    assert!(t.vm().vmalloc(t.cx(), size).is_none());
    let log = t.log();
    assert!(
        log.contains(&format!(
            "vmap allocation for size {} failed: use vmalloc=<size> to increase size",
            size + PAGE
        )),
        "{log}"
    );
    assert!(log.contains(&format!(
        "vmalloc error: size {size}, vm_struct allocation failed"
    )));
    assert!(
        log.contains("mode:0xcc0(GFP_KERNEL), nodemask=(null)"),
        "{log}"
    );
    assert!(
        t.vm()
            .__vmalloc(t.cx(), size, GFP_KERNEL | __GFP_NOWARN)
            .is_none()
    );
    assert_eq!(t.log(), "", "__GFP_NOWARN is silent");
    // An area that does fit still works (its 1023-entry page array needs two pages of
    // vmalloc space too).
    let p = t.vmalloc(4 * MIB as usize - PAGE);
    t.vfree(p);
    assert!(t.vm().alloc_failures() >= 2);
    t.assert_clean();
}

/// A lazily freed range is not free yet, but an allocation that finds no room purges and
/// retries: it succeeds without any failure report.
#[test]
fn purge_and_retry_reuses_lazily_freed_range() {
    let t = T::with_range(16 * MIB);
    let chunk = 4 * MIB as usize;
    let areas: Vec<VmStruct> = (0..4)
        .map(|_| t.area(chunk - PAGE, VmFlags::NONE))
        .collect();
    assert_eq!(t.vm().largest_free_area(), 0);
    let purges = t.vm().nr_purges();
    t.free_area(areas[1]);
    assert_eq!(
        t.vm().lazy_pages(),
        chunk / PAGE,
        "freed lazily, below lazy_max_pages"
    );
    assert_eq!(t.vm().nr_purges(), purges);
    assert_eq!(t.vm().largest_free_area(), 0, "not free until purged");
    assert!(t.info().contains(&format!(
        "0x{:016x}-0x{:016x} {chunk:7} unpurged vm_area",
        areas[1].addr.0,
        areas[1].addr.0 + chunk
    )));
    let again = t.area(chunk - PAGE, VmFlags::NONE);
    assert_eq!(again.addr, areas[1].addr, "the purged range is reused");
    assert_eq!(t.vm().nr_purges(), purges + 1);
    assert_eq!(t.vm().lazy_pages(), 0);
    assert_eq!(t.log(), "", "no failure was reported");
    for a in [areas[0], again, areas[2], areas[3]] {
        t.free_area(a);
    }
    t.assert_clean();
}

/// Lazily freed ranges are purged once they exceed `lazy_max_pages` (32 MiB times
/// `fls(nr_cpus)`: 96 MiB with 4 CPUs), by the free that crosses the line.
#[test]
fn lazy_threshold_triggers_purge() {
    let t = T::small();
    let max = t.vm().lazy_max_pages();
    assert_eq!(max, 3 * (32 << 20) / PAGE, "fls(4) = 3");
    let chunk = 4 * MIB as usize;
    let n = max / (chunk / PAGE) + 2;
    let areas: Vec<VmStruct> = (0..n)
        .map(|_| t.area(chunk - PAGE, VmFlags::NONE))
        .collect();
    let purges = t.vm().nr_purges();
    let mut crossed = None;
    for (i, a) in areas.iter().enumerate() {
        t.free_area(*a);
        if t.vm().nr_purges() != purges && crossed.is_none() {
            crossed = Some(i);
            assert_eq!(t.vm().lazy_pages(), 0);
        }
        if crossed.is_none() {
            assert_eq!(t.vm().lazy_pages(), (i + 1) * chunk / PAGE);
            assert!(t.vm().lazy_pages() <= max);
        }
    }
    let i = crossed.expect("a purge ran");
    assert!((i + 1) * chunk / PAGE > max && i * chunk / PAGE <= max);
    assert_eq!(t.vm().nr_purges(), purges + 1);
    t.assert_clean();
}

// ------------------------------------------------------------------------------- pages

/// The pages behind one area come one at a time from the page allocator: with physical
/// memory fragmented they are not contiguous, yet the area reads and writes as one buffer,
/// and each page's direct-map view holds its slice of the buffer.
#[test]
fn pages_are_scattered_but_virtually_contiguous() {
    let t = T::small();
    // Fragment: take 1024 pages, give back every other one.
    let held = t.alloc_pages(1024);
    t.free_pages(held.iter().step_by(2).copied());
    let n = 64;
    let p = t.vmalloc(n * PAGE);
    let pfns = t.pfns(p, n);
    let contiguous = pfns.windows(2).filter(|w| w[1] == w[0] + 1).count();
    assert!(contiguous < n / 2, "pfns {pfns:?}");
    assert_eq!(
        pfns.iter().collect::<HashSet<_>>().len(),
        n,
        "distinct frames"
    );
    write_pat(p, n * PAGE, 7);
    for (i, &pfn) in pfns.iter().enumerate() {
        let page = t.m.pfn_to_page(Pfn(pfn)).unwrap();
        let direct = t.m.page_address(page).unwrap().as_ptr();
        assert_page_pat(direct, 7, i);
    }
    // A write through the direct map shows in the vmalloc view.
    let page = t.m.pfn_to_page(Pfn(pfns[10])).unwrap();
    // SAFETY: the frame of page 10 of our area.
    unsafe { t.m.page_address(page).unwrap().as_ptr().add(5).write(0xee) };
    assert_eq!(bytes(p, n * PAGE)[10 * PAGE + 5], 0xee);
    t.vfree(p);
    t.free_pages(held.iter().skip(1).step_by(2).copied());
    t.assert_clean();
}

/// On x86_32, vmalloc takes HighMem pages first (`__GFP_HIGHMEM`): they have no direct-map
/// address, yet the area works, `kmap` of a page shows the same bytes, and `vzalloc` zeroes
/// them. `GFP_DMA` restricts the pages to ZONE_DMA.
#[test]
fn highmem_pages_on_x86_32() {
    let t = T::boot(MachineConfig::x86_32(1 << 30));
    let n = 256;
    let p = t.vmalloc(n * PAGE);
    write_pat(p, n * PAGE, 9);
    for i in 0..n {
        let page = t
            .vm()
            .vmalloc_to_page(t.cx(), p.wrapping_add(i * PAGE))
            .unwrap();
        assert_eq!(t.m.page_zone(page).ztype, ZoneType::HighMem, "page {i}");
        assert!(t.m.page_address(page).is_none());
        if i % 37 == 0 {
            let va = t.m.kmap(page).as_ptr();
            assert_page_pat(va, 9, i);
            t.m.kunmap(page);
        }
    }
    check_pat(p, n * PAGE, 9);
    t.vfree(p);
    let z = t.vm().vzalloc(t.cx(), n * PAGE).unwrap().as_ptr();
    assert!(
        bytes(z, n * PAGE).iter().all(|&b| b == 0),
        "vzalloc zeroes HighMem pages"
    );
    t.vfree(z);
    let d = t
        .vm()
        .__vmalloc(t.cx(), 4 * PAGE, GFP_KERNEL | GFP_DMA)
        .unwrap()
        .as_ptr();
    for i in 0..4 {
        let page = t
            .vm()
            .vmalloc_to_page(t.cx(), d.wrapping_add(i * PAGE))
            .unwrap();
        assert_eq!(t.m.page_zone(page).ztype, ZoneType::Dma);
    }
    t.vfree(d);
    t.assert_clean();
}

/// `vmalloc_to_page` and `vmalloc_to_pfn` agree with each other and with the memory: a
/// write through `kmap(vmalloc_to_page(addr))` is seen at `addr`. The guard page, addresses
/// outside any area and freed areas have no page.
#[test]
fn vmalloc_to_page_round_trip() {
    let t = T::small();
    let n = 10;
    let p = t.vmalloc(n * PAGE);
    for off in (0..n * PAGE).step_by(PAGE / 4 + 3) {
        let a = p.wrapping_add(off);
        let page = t.vm().vmalloc_to_page(t.cx(), a).expect("mapped");
        let pfn = t.vm().vmalloc_to_pfn(t.cx(), a).unwrap();
        assert_eq!(t.m.page_to_pfn(page), pfn);
        let va = t.m.kmap(page).as_ptr();
        // SAFETY: the frame behind `a`; the offset stays inside the page.
        unsafe { va.add(off % PAGE).write((off % 251) as u8) };
        t.m.kunmap(page);
        // SAFETY: `a` is inside our live area.
        assert_eq!(unsafe { a.read() }, (off % 251) as u8);
    }
    assert!(
        t.vm()
            .vmalloc_to_page(t.cx(), p.wrapping_add(n * PAGE))
            .is_none(),
        "guard"
    );
    assert!(t.vm().vmalloc_to_page(t.cx(), p.wrapping_sub(1)).is_none());
    let (start, len) = t.vm().range();
    assert!(
        t.vm()
            .vmalloc_to_page(t.cx(), (start.0 + len - 1) as *const u8)
            .is_none()
    );
    let r = t.area(PAGE, VmFlags::NONE);
    assert!(
        t.vm().vmalloc_to_page(t.cx(), r.as_ptr()).is_none(),
        "no page array"
    );
    t.free_area(r);
    t.vfree(p);
    assert!(t.vm().vmalloc_to_page(t.cx(), p).is_none(), "freed");
    t.assert_clean();
}

/// `vmap` maps the caller's pages side by side (`vmalloc_to_page` finds them);
/// `vunmap` removes the mapping and leaves the pages and their contents to the caller.
#[test]
fn vmap_and_vunmap() {
    let t = T::small();
    let pages = t.alloc_pages(8);
    let p = t.vmap(&pages);
    write_pat(p, 8 * PAGE, 11);
    for (i, page) in pages.iter().enumerate() {
        let got = t
            .vm()
            .vmalloc_to_page(t.cx(), p.wrapping_add(i * PAGE))
            .unwrap();
        assert!(std::ptr::eq(got, *page));
    }
    let a = t.vm().find_vm_area(p).unwrap();
    assert!(a.flags.contains(VM_MAP) && !a.flags.contains(VM_ALLOC));
    assert_eq!(a.nr_pages, 0, "a vmap area owns no pages");
    assert_eq!(t.vm().vmalloc_nr_pages(), 0);
    // vfree is for vmalloc; vunmap of a vmalloc area is refused.
    let v = t.vmalloc(PAGE);
    // SAFETY: rejected, changes nothing.
    unsafe { t.vm().vunmap(t.cx(), v) };
    assert!(
        t.log()
            .contains("Trying to vunmap() vmalloc()ed area: use vfree()")
    );
    assert!(t.vm().find_vm_area(v).is_some());
    t.vfree(v);
    // SAFETY: our mapping, no longer used.
    unsafe { t.vm().vunmap(t.cx(), p) };
    assert!(t.vm().find_vm_area(p).is_none());
    for (i, page) in pages.iter().enumerate() {
        assert!(page.is_allocated(), "the pages stay the caller's");
        let direct = t.m.page_address(page).unwrap().as_ptr();
        assert_page_pat(direct, 11, i);
        // SAFETY: allocated above, unmapped now.
        unsafe { t.m.__free_pages(page, 0) };
    }
    t.assert_clean();
}

/// `vzalloc` and `vmalloc_user` hand out zeroed memory even where earlier areas left data;
/// `vmalloc_user` areas are `VM_USERMAP`.
#[test]
fn vzalloc_and_vmalloc_user_are_zeroed() {
    let t = T::small();
    let n = 32 * PAGE;
    for round in 0..4 {
        let dirty = t.vmalloc(n);
        bytes(dirty, n).fill(0xa5);
        t.vfree(dirty);
        t.vm().vm_unmap_aliases(t.cx());
        let z = if round % 2 == 0 {
            t.vm().vzalloc(t.cx(), n)
        } else {
            t.vm().vmalloc_user(t.cx(), n)
        };
        let z = z.unwrap().as_ptr();
        assert!(bytes(z, n).iter().all(|&b| b == 0), "round {round}");
        let a = t.vm().find_vm_area(z).unwrap();
        assert_eq!(a.flags.contains(VM_USERMAP), round % 2 == 1);
        t.vfree(z);
    }
    t.assert_clean();
}

// ------------------------------------------------------------------------------- faults

/// Child half of [`guard_page_touch_faults`]: does nothing unless [`CHILD_ENV`] is set.
#[test]
fn guard_page_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let t = T::small();
    let p = t.vmalloc(2 * PAGE);
    write_pat(p, 2 * PAGE, 3);
    match mode.as_str() {
        // SAFETY: deliberately touching the guard page, which must fault.
        "guard" => unsafe { p.add(2 * PAGE).write_volatile(1) },
        "after_vfree" => {
            t.vfree(p);
            // SAFETY: deliberately touching a freed area, which must fault.
            unsafe { p.write_volatile(1) }
        }
        // The control: the last byte of the area is fine.
        "in_bounds" => check_pat(p, 2 * PAGE, 3),
        _ => panic!("unknown mode {mode}"),
    }
    assert_eq!(mode, "in_bounds", "the touch should have faulted");
}

/// Touching the guard page after an area, or an area after `vfree`, faults: a child
/// process doing it dies of SIGSEGV (or SIGBUS); the in-bounds control exits cleanly.
#[test]
fn guard_page_touch_faults() {
    let exe = std::env::current_exe().expect("test binary");
    let run = |mode: &str| {
        Command::new(&exe)
            .args(["--exact", "guard_page_child", "--test-threads=1"])
            .env(CHILD_ENV, mode)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("child runs")
    };
    for mode in ["guard", "after_vfree"] {
        let st = run(mode);
        assert!(
            matches!(st.signal(), Some(11) | Some(7)),
            "{mode}: the child should die of SIGSEGV/SIGBUS, got {st:?}"
        );
    }
    assert!(run("in_bounds").success());
}

// ------------------------------------------------------------------------------- bad input

/// Everything a bad free could change: free pages, busy areas, the report, the counters.
fn state(t: &T) -> (usize, usize, String, usize) {
    (
        t.settled_free(),
        t.vm().nr_busy_areas(),
        t.info(),
        t.vm().vmalloc_nr_pages(),
    )
}

/// `vfree` of a null pointer does nothing; of an address that is not the start of a live
/// area (a kmalloc pointer, a direct-map page, the middle of an area, a freed area) it
/// reports "Trying to vfree() nonexistent vm area"; of an unaligned address "Trying to
/// vfree() bad address". None of them changes anything.
#[test]
fn vfree_bad_input_is_reported_and_changes_nothing() {
    let t = T::small();
    let p = t.vmalloc(4 * PAGE);
    write_pat(p, 4 * PAGE, 5);
    let gone = t.vmalloc(PAGE);
    t.vfree(gone);
    let k = t.m.kmalloc(64, GFP_KERNEL).unwrap().as_ptr();
    let direct = t.m.__get_free_page(GFP_KERNEL).unwrap().as_ptr();
    let before = state(&t);
    t.log();
    t.vfree(std::ptr::null());
    assert_eq!(t.log(), "", "vfree(NULL) is a no-op");
    let cases: [(*const u8, &str); 6] = [
        (k, "nonexistent vm area"),
        (direct, "nonexistent vm area"),
        (p.wrapping_add(PAGE), "nonexistent vm area"),
        (p.wrapping_add(3), "bad address"),
        (gone, "nonexistent vm area"),
        (0x1000 as *const u8, "nonexistent vm area"),
    ];
    let bad = t.vm().bad_frees();
    for (addr, what) in cases {
        t.vfree(addr);
        let log = t.log();
        assert!(
            log.contains(&format!(
                "Trying to vfree() {what} ({:016x})",
                addr as usize
            )),
            "{addr:p}: {log}"
        );
        assert_eq!(state(&t), before, "{addr:p} changed something");
    }
    assert_eq!(t.vm().bad_frees(), bad + cases.len());
    // SAFETY: rejected: not a vmap area.
    unsafe { t.vm().vunmap(t.cx(), p.wrapping_add(PAGE)) };
    assert!(t.log().contains("Trying to vunmap() nonexistent vm area"));
    let stale = t.area(PAGE, VmFlags::NONE);
    t.free_area(stale);
    t.free_area(stale);
    assert!(
        t.log()
            .contains("Trying to free_vm_area() nonexistent vm area")
    );
    assert_eq!(state(&t), before);
    check_pat(p, 4 * PAGE, 5);
    t.vfree(p);
    // SAFETY: our kmalloc and page.
    unsafe {
        t.m.kfree(k);
        t.m.free_page(VirtAddr(direct as usize));
    }
    t.assert_clean();
}

/// With memory exhausted, a `GFP_ATOMIC` vmalloc from atomic context (a CPU guard held)
/// fails at once without sleeping and without a "sleeping function" report, gives back
/// every page it took, and leaks nothing; `GFP_NOWAIT | __GFP_NOWARN` fails silently.
#[test]
fn atomic_vmalloc_on_exhausted_machine_fails_cleanly() {
    let t = T::small();
    let mut held = Vec::new();
    while let Some(p) = t.m.alloc_page(GFP_ATOMIC | __GFP_NOWARN) {
        held.push(p);
    }
    // A few pages back, so the attempt gets some pages before it runs out.
    t.free_pages(held.drain(..6));
    let before = t.settled_free();
    t.log();
    let started = Instant::now();
    {
        let _atomic = t.m.platform().cpu_guard();
        assert!(t.vm().__vmalloc(t.cx(), 64 * PAGE, GFP_ATOMIC).is_none());
        assert!(
            t.vm()
                .__vmalloc(t.cx(), 64 * PAGE, GFP_NOWAIT | __GFP_NOWARN)
                .is_none()
        );
    }
    assert!(started.elapsed() < Duration::from_secs(2), "did not block");
    let log = t.log();
    assert!(
        log.contains("failed to allocate pages"),
        "some pages, then none:\n{log}"
    );
    assert_eq!(
        log.matches("vmalloc error").count(),
        1,
        "only the GFP_ATOMIC attempt reports:\n{log}"
    );
    assert!(!log.contains("sleeping function"), "{log}");
    assert_eq!(t.vm().nr_busy_areas(), 0);
    assert_eq!(t.settled_free(), before, "every page taken was given back");
    t.free_pages(held);
    t.assert_clean();
}

// ------------------------------------------------------------------------------- accounting

/// A mix of every kind of area — vmalloc of many sizes (one with a vmalloc'ed page array),
/// vzalloc, vmalloc_user, vmap, get_vm_area — is counted in `VmallocUsed` while alive; once
/// everything is freed and purged, free pages are exactly what they were before.
#[test]
fn accounting_returns_exactly() {
    let t = T::small();
    let sizes = [1, 2, 3, 17, 100, 513, 600];
    let ps: Vec<*mut u8> = sizes.iter().map(|&n| t.vmalloc(n * PAGE)).collect();
    let z = t.vm().vzalloc(t.cx(), 5 * PAGE).unwrap().as_ptr();
    let u = t.vm().vmalloc_user(t.cx(), 7 * PAGE).unwrap().as_ptr();
    let pages = t.alloc_pages(3);
    let v = t.vmap(&pages);
    let r = t.area(9 * PAGE, VM_IOREMAP);
    let owned: usize = sizes.iter().sum::<usize>() + 5 + 7;
    // The 513- and 600-page areas have vmalloc'ed page arrays of 2 pages each.
    assert_eq!(t.vm().vmalloc_nr_pages(), owned + 2 + 2);
    assert_eq!(t.vm().nr_busy_areas(), sizes.len() + 2 + 2 + 1 + 1);
    assert_eq!(t.vm().vmalloc_total_kb(), (t.vm().range().1 / 1024) as u64);
    let used_free = t.settled_free();
    assert!(used_free <= t.base - owned);
    for p in ps.into_iter().chain([z, u]) {
        t.vfree(p);
    }
    // SAFETY: our mapping.
    unsafe { t.vm().vunmap(t.cx(), v) };
    t.free_area(r);
    t.free_pages(pages);
    t.assert_clean();
}

// ------------------------------------------------------------------------------- vmallocinfo

/// A parsed `/proc/vmallocinfo` line.
#[derive(Debug)]
struct InfoLine {
    start: u64,
    end: u64,
    size: u64,
    caller: String,
    pages: Option<u64>,
    words: Vec<String>,
    n0: Option<u64>,
}

/// Parses a line the way Linux prints it: `0x%pK-0x%pK %7ld`, then the caller and the
/// attributes, or `unpurged vm_area`. Panics on a malformed line.
fn parse_line(l: &str) -> InfoLine {
    let hex = |s: &str| {
        assert_eq!(s.len(), 16, "{l:?}: 16 hex digits");
        u64::from_str_radix(s, 16).unwrap_or_else(|_| panic!("{l:?}: hex"))
    };
    assert!(
        l.starts_with("0x") && &l[18..21] == "-0x" && &l[37..38] == " ",
        "{l:?}"
    );
    let (start, end) = (hex(&l[2..18]), hex(&l[21..37]));
    let rest = &l[38..];
    let digits = rest.trim_start().split(' ').next().unwrap();
    let size: u64 = digits.parse().unwrap_or_else(|_| panic!("{l:?}: size"));
    let field = rest.len() - rest.trim_start().len() + digits.len();
    assert_eq!(field, digits.len().max(7), "{l:?}: %7ld");
    let mut words = rest[field..].split(' ');
    assert_eq!(words.next(), Some(""), "{l:?}: one space after the size");
    let caller = words.next().expect("caller").to_string();
    let mut line = InfoLine {
        start,
        end,
        size,
        caller,
        pages: None,
        words: Vec::new(),
        n0: None,
    };
    for w in words {
        if let Some(n) = w.strip_prefix("pages=") {
            line.pages = Some(n.parse().unwrap());
        } else if let Some(n) = w.strip_prefix("N0=") {
            line.n0 = Some(n.parse().unwrap());
        } else if !w.starts_with("phys=") {
            assert!(!w.is_empty(), "{l:?}: double space");
            line.words.push(w.to_string());
        }
    }
    line
}

/// The parser accepts every line of Linux's sample, and every line kmem writes: sizes with
/// the guard page, `pages=`/`N0=` for vmalloc areas, `vpages` for a vmalloc'ed page array,
/// `vmap`, `user`, `ioremap`, the caller (name or `file.rs:line`), `unpurged vm_area` for
/// lazily freed ranges, in address order.
#[test]
fn vmallocinfo_lines_parse() {
    let sample = include_str!("../../../testdata/proc-samples/vmallocinfo");
    for l in sample.lines() {
        let p = parse_line(l);
        assert!(p.size % PAGE as u64 == 0);
        if p.words.contains(&"vmalloc".to_string()) {
            assert_eq!(p.pages, p.n0);
            assert_eq!(p.size, (p.pages.unwrap() + 1) * PAGE as u64, "{l}");
        }
    }

    let t = T::small();
    let named = Caller::Name("test_caller");
    let a = t
        .vm()
        .__vmalloc_node(t.cx(), 4 * PAGE, 1, GFP_KERNEL, named)
        .unwrap()
        .as_ptr();
    let (b, line) = (t.vmalloc(513 * PAGE), line!());
    let u = t.vm().vmalloc_user(t.cx(), PAGE).unwrap().as_ptr();
    let pages = t.alloc_pages(2);
    let v = t.vmap(&pages);
    let r = t.area(3 * PAGE, VM_IOREMAP);
    let gone = t.vmalloc(2 * PAGE);
    t.vfree(gone);

    let info = t.info();
    let lines: Vec<InfoLine> = info.lines().map(parse_line).collect();
    let find = |p: *const u8| {
        lines
            .iter()
            .find(|l| l.start == p as u64)
            .unwrap_or_else(|| panic!("{p:p} in\n{info}"))
    };
    for l in &lines {
        assert_eq!(l.end - l.start, l.size);
    }
    let la = find(a);
    assert_eq!(
        (la.size, la.caller.as_str()),
        (5 * PAGE as u64, "test_caller")
    );
    assert_eq!((la.pages, la.n0), (Some(4), Some(4)));
    assert_eq!(la.words, ["vmalloc"]);
    let lb = find(b);
    assert_eq!(lb.caller, format!("vmalloc_rules.rs:{line}"));
    assert_eq!(
        lb.words,
        ["vmalloc", "vpages"],
        "513 pointers need two pages"
    );
    assert_eq!(lb.pages, Some(513));
    assert_eq!(find(u).words, ["vmalloc", "user"]);
    let lv = find(v);
    assert_eq!(
        (lv.words.as_slice(), lv.pages, lv.n0),
        (&["vmap".to_string()][..], None, None)
    );
    assert_eq!(find(r.as_ptr()).words, ["ioremap"]);
    let unpurged = find(gone);
    assert_eq!(unpurged.caller, "unpurged");
    assert_eq!(unpurged.words, ["vm_area"]);
    // Busy areas in address order, then the unpurged ones.
    let busy: Vec<u64> = lines
        .iter()
        .filter(|l| l.caller != "unpurged")
        .map(|l| l.start)
        .collect();
    let mut sorted = busy.clone();
    sorted.sort();
    assert_eq!(busy, sorted);
    // The 513-page area's page array is a vmalloc area of its own (2 pages).
    let arrays: BTreeMap<u64, u64> = lines
        .iter()
        .filter(|l| l.pages == Some(2) && l.caller.starts_with("vmalloc_rules.rs:"))
        .map(|l| (l.start, l.size))
        .collect();
    assert_eq!(arrays.len(), 1, "{info}");

    for p in [a, b, u] {
        t.vfree(p);
    }
    // SAFETY: our mapping.
    unsafe { t.vm().vunmap(t.cx(), v) };
    t.free_area(r);
    t.free_pages(pages);
    t.vm().vm_unmap_aliases(t.cx());
    assert_eq!(t.info(), "", "nothing busy, nothing unpurged");
    t.assert_clean();
}
