//! The rules of kmalloc, one test each, as users of Linux's API rely on them: the size
//! classes (`ksize` between the size and twice it), alignment (8 bytes at least, natural for
//! powers of two, large kmallocs included), large sizes from the page allocator, the 4 MiB
//! limit, `ZERO_SIZE_PTR`, zeroing (`kzalloc`, `kcalloc`), overflow checks
//! (`kmalloc_array`), `krealloc`, `kfree_sensitive`, `kmemdup`/`kstrdup`, the cache types
//! (`GFP_DMA`, `__GFP_RECLAIMABLE`), atomic context, and bad frees.
//!
//! Every test boots its own small simulated machine ([`Machine`]).

mod common;
use common::{
    areas, assert_back_to_boot, boot, bytes, check_pat, head_page, in_use, log, machine, pat,
    shrink_kmalloc, three_zones, write_pat, zone_of,
};

use std::time::{Duration, Instant};

use kmem::addr::{PAGE_SIZE, VirtAddr, get_order};
use kmem::gfp::*;
use kmem::kmalloc::{
    KMALLOC_MAX_SIZE, KmallocType, NR_KMALLOC_INDEX, ZERO_SIZE_PTR, kmalloc_index, kmalloc_size,
};
use kmem::page_alloc::page::pg;
use kmem::platform::Platform;
use kmem::slab::KmemCache;
use kmem_hosted::{Machine, MachineConfig};

/// Linux's kmalloc classes.
const CLASSES: [usize; 13] = [
    8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192,
];

// ------------------------------------------------------------------------------- helpers

fn km(m: &Machine, size: usize) -> *mut u8 {
    m.kmalloc(size, GFP_KERNEL)
        .unwrap_or_else(|| panic!("kmalloc({size}) failed"))
        .as_ptr()
}

fn kfree(m: &Machine, p: *mut u8) {
    // SAFETY: callers pass a live kmalloc allocation they own and forget (or a pointer the
    // test expects to be rejected).
    unsafe { m.kfree(p) };
}

fn is_zero(p: *mut u8, len: usize) -> bool {
    bytes(p, len).iter().all(|&b| b == 0)
}

fn cache(m: &Machine, t: KmallocType, size: usize) -> &KmemCache {
    m.kmalloc_caches()
        .cache(t, kmalloc_index(size))
        .expect("kmalloc caches exist")
}

/// The name of the cache whose slab holds `p`.
fn cache_name(m: &Machine, p: *const u8) -> String {
    let head = head_page(m, p);
    assert!(head.state() & pg::SLAB != 0, "{p:p} is in a slab");
    let owner = head.private();
    let mut name = None;
    m.slab().for_each_cache(|c| {
        if c as *const KmemCache as usize == owner {
            name = Some(c.name().to_owned());
        }
    });
    name.expect("the owner is a listed cache")
}

/// Free pages with the per-CPU lists drained.
fn free_now(m: &Machine) -> usize {
    m.drain_all_pages();
    m.nr_free_pages()
}

/// Everything a bad free could change: free pages, per-class use, reports aside.
fn state(m: &Machine) -> (usize, Vec<(usize, usize, usize)>) {
    let mut caches = Vec::new();
    m.slab().for_each_cache(|c| {
        caches.push((c.total_objects(), c.free_objects(), c.nr_slabs()));
    });
    (free_now(m), caches)
}

/// Runs `bad`, which must be reported once (the log containing `what`) and change nothing.
fn assert_rejected(m: &Machine, what: &str, bad: impl FnOnce()) {
    m.platform().take_log();
    let before = state(m);
    let reports = m.bad_page_reports();
    bad();
    let text = log(m);
    assert!(text.contains(what), "{what:?} reported\n{text}");
    assert_eq!(m.bad_page_reports(), reports + 1, "{what}: one report");
    assert_eq!(state(m), before, "{what}: nothing changed");
    m.validate().expect("validate after a bad free");
}

// ------------------------------------------------------------------------------- classes

/// The classes exist, for every type, with Linux's names and sizes.
#[test]
fn every_class_of_every_type_exists() {
    let m = machine();
    let mut sizes = Vec::new();
    for (t, prefix) in [
        (KmallocType::Normal, "kmalloc-"),
        (KmallocType::Reclaim, "kmalloc-rcl-"),
        (KmallocType::Dma, "dma-kmalloc-"),
    ] {
        sizes.clear();
        for i in 1..NR_KMALLOC_INDEX {
            let c = m.kmalloc_caches().cache(t, i).expect("created at boot");
            let size = kmalloc_size(i);
            assert_eq!(c.object_size(), size);
            let suffix = if size >= 1024 {
                format!("{}k", size / 1024)
            } else {
                size.to_string()
            };
            assert_eq!(c.name(), format!("{prefix}{suffix}"));
            sizes.push(size);
        }
        sizes.sort_unstable();
        assert_eq!(sizes, CLASSES);
    }
}

/// `kmalloc(size)` for every size up to 8 KiB gives the smallest class that holds it, so
/// `size <= ksize < 2 * size` from 8 bytes on; every allocation is 8-byte aligned and
/// usable for `ksize` bytes.
#[test]
fn every_size_gets_the_smallest_class_that_fits() {
    let m = machine();
    let boot_areas = areas(&m);
    let mut live = Vec::new();
    for size in 1..=8192usize {
        let p = km(&m, size);
        let ks = m.ksize(p);
        let class = *CLASSES.iter().find(|&&c| c >= size).unwrap();
        assert_eq!(ks, class, "kmalloc({size}): ksize");
        if size >= 8 {
            assert!(ks >= size && ks < 2 * size, "kmalloc({size}): ksize {ks}");
        }
        assert_eq!(p as usize % 8, 0, "kmalloc({size}) = {p:p}: 8-byte aligned");
        if size.is_power_of_two() {
            assert_eq!(p as usize % size, 0, "kmalloc({size}) = {p:p}: natural");
        }
        assert_eq!(
            cache_name(&m, p),
            cache(&m, KmallocType::Normal, size).name()
        );
        write_pat(p, ks, size);
        live.push((p, ks, size));
        if live.len() == 16 {
            for (p, ks, tag) in live.drain(..) {
                check_pat(p, ks, tag);
                kfree(&m, p);
            }
        }
    }
    for (p, ks, tag) in live {
        check_pat(p, ks, tag);
        kfree(&m, p);
    }
    assert_eq!(m.platform().take_log(), Vec::<String>::new());
    assert_back_to_boot(&m, &boot_areas);
}

/// Power-of-two sizes are naturally aligned for every object of their class (not just a
/// slab's first), in every cache type.
#[test]
fn power_of_two_sizes_are_naturally_aligned() {
    let m = machine();
    for gfp in [
        GFP_KERNEL,
        GFP_KERNEL | GFP_DMA,
        GFP_KERNEL | __GFP_RECLAIMABLE,
    ] {
        for shift in 3..=13 {
            let size = 1usize << shift;
            let n = 3 * cache(&m, KmallocType::Normal, size).objects_per_slab();
            let objs: Vec<_> = (0..n)
                .map(|_| m.kmalloc(size, gfp).unwrap().as_ptr())
                .collect();
            for &p in &objs {
                assert_eq!(p as usize % size, 0, "kmalloc({size}, {gfp}) = {p:p}");
            }
            for p in objs {
                kfree(&m, p);
            }
        }
    }
}

// ------------------------------------------------------------------------------- large sizes

/// Above 8 KiB and up to 4 MiB, kmalloc takes `1 << get_order(size)` pages from the page
/// allocator: `ksize` is `PAGE_SIZE << order`, the block is naturally aligned, and kfree
/// gives the pages back.
#[test]
fn large_kmallocs_come_from_the_page_allocator() {
    let m = machine();
    let boot_areas = areas(&m);
    for size in [
        8193usize,
        12288,
        16384,
        20000,
        65536,
        100_000,
        1 << 20,
        (3 << 20) + 1,
        KMALLOC_MAX_SIZE,
    ] {
        let order = get_order(size);
        let before = free_now(&m);
        let p = km(&m, size);
        assert_eq!(
            before - free_now(&m),
            1 << order,
            "kmalloc({size}): {} pages taken",
            1 << order
        );
        assert_eq!(m.ksize(p), PAGE_SIZE << order, "kmalloc({size}): ksize");
        assert_eq!(
            p as usize % (PAGE_SIZE << order),
            0,
            "kmalloc({size}) = {p:p}: aligned to its block"
        );
        assert!(
            head_page(&m, p).state() & pg::SLAB == 0,
            "not from a slab cache"
        );
        write_pat(p, m.ksize(p), size);
        check_pat(p, m.ksize(p), size);
        kfree(&m, p);
        assert_eq!(free_now(&m), before, "kfree({size}) gives the pages back");
    }
    let p = km(&m, 16384);
    assert_eq!(p as usize % 16384, 0, "kmalloc(16384) is 16 KiB aligned");
    kfree(&m, p);
    assert!(m.platform().take_log().is_empty());
    assert_back_to_boot(&m, &boot_areas);
}

/// Above 4 MiB, kmalloc fails with a WARNING; with `__GFP_NOWARN` silently. Nothing is
/// allocated either way.
#[test]
fn above_kmalloc_max_size_fails_with_a_warning() {
    let m = machine();
    let before = free_now(&m);
    for size in [KMALLOC_MAX_SIZE + 1, 8 << 20, usize::MAX / 2] {
        assert!(m.kmalloc(size, GFP_KERNEL).is_none(), "kmalloc({size})");
        let text = log(&m);
        assert!(text.contains("WARNING"), "kmalloc({size}) warns\n{text}");
        assert!(m.kmalloc(size, GFP_KERNEL | __GFP_NOWARN).is_none());
        assert_eq!(
            m.platform().take_log(),
            Vec::<String>::new(),
            "kmalloc({size}, __GFP_NOWARN): no report"
        );
        assert!(m.kzalloc(size, GFP_KERNEL | __GFP_NOWARN).is_none());
    }
    assert_eq!(free_now(&m), before, "nothing allocated");
}

// ------------------------------------------------------------------------------- zero size

/// `kmalloc(0)` is `ZERO_SIZE_PTR`; `kfree` of it and of null does nothing.
#[test]
fn zero_size_and_null() {
    let m = machine();
    let before = state(&m);
    let reports = m.bad_page_reports();
    for gfp in [GFP_KERNEL, GFP_ATOMIC, GFP_KERNEL | GFP_DMA] {
        assert_eq!(m.kmalloc(0, gfp).unwrap().as_ptr(), ZERO_SIZE_PTR);
        assert_eq!(m.kzalloc(0, gfp).unwrap().as_ptr(), ZERO_SIZE_PTR);
    }
    assert_eq!(
        m.kcalloc(0, 100, GFP_KERNEL).unwrap().as_ptr(),
        ZERO_SIZE_PTR
    );
    assert_eq!(
        m.kmalloc_array(100, 0, GFP_KERNEL).unwrap().as_ptr(),
        ZERO_SIZE_PTR
    );
    assert_eq!(m.ksize(ZERO_SIZE_PTR), 0);
    assert_eq!(m.ksize(std::ptr::null()), 0);
    kfree(&m, ZERO_SIZE_PTR);
    kfree(&m, std::ptr::null_mut());
    // Everything up to ZERO_SIZE_PTR counts as null (Linux's ZERO_OR_NULL_PTR).
    kfree(&m, std::ptr::without_provenance_mut(8));
    // SAFETY: null and ZERO_SIZE_PTR are no-ops for kfree_sensitive too.
    unsafe {
        m.kfree_sensitive(ZERO_SIZE_PTR);
        m.kfree_sensitive(std::ptr::null_mut());
    }
    assert_eq!(m.bad_page_reports(), reports);
    assert!(m.platform().take_log().is_empty(), "no report");
    assert_eq!(state(&m), before, "nothing changed");
}

// ------------------------------------------------------------------------------- zeroing

/// `kzalloc` and `kcalloc` zero the whole allocation, also when it reuses dirty memory.
#[test]
fn kzalloc_and_kcalloc_zero_dirty_memory() {
    let m = machine();
    for size in [1usize, 8, 24, 100, 192, 1000, 4096, 8192, 20000, 65536] {
        let p = km(&m, size);
        let ks = m.ksize(p);
        bytes(p, ks).fill(0xff);
        kfree(&m, p);
        let z = m.kzalloc(size, GFP_KERNEL).unwrap().as_ptr();
        assert_eq!(z, p, "premise: kmalloc({size}) reuses the dirty memory");
        assert!(is_zero(z, m.ksize(z)), "kzalloc({size}) zeroed");
        bytes(z, ks).fill(0xee);
        kfree(&m, z);
        let c = m.kcalloc(1, size, GFP_KERNEL).unwrap().as_ptr();
        assert_eq!(c, p);
        assert!(is_zero(c, m.ksize(c)), "kcalloc(1, {size}) zeroed");
        kfree(&m, c);
    }
    let c = m.kcalloc(10, 100, GFP_KERNEL).unwrap().as_ptr();
    assert!(m.ksize(c) >= 1000 && is_zero(c, 1000));
    kfree(&m, c);
}

/// `kmalloc_array` and `kcalloc` return `None` when `n * size` overflows, and allocate
/// `n * size` bytes otherwise.
#[test]
fn kmalloc_array_and_kcalloc_check_overflow() {
    let m = machine();
    let before = free_now(&m);
    for (n, size) in [
        (usize::MAX, 2usize),
        (usize::MAX / 2 + 1, 2),
        (1 << 40, 1 << 30),
        (2, usize::MAX),
    ] {
        assert!(
            m.kmalloc_array(n, size, GFP_KERNEL).is_none(),
            "{n} x {size}"
        );
        assert!(m.kcalloc(n, size, GFP_KERNEL).is_none(), "{n} x {size}");
    }
    assert_eq!(free_now(&m), before);
    let p = m.kmalloc_array(33, 100, GFP_KERNEL).unwrap().as_ptr();
    assert!(m.ksize(p) >= 3300);
    write_pat(p, 3300, 1);
    kfree(&m, p);
}

// ------------------------------------------------------------------------------- krealloc

/// krealloc with GFP_KERNEL, which must succeed.
fn realloc(m: &Machine, p: *mut u8, size: usize) -> *mut u8 {
    // SAFETY: callers pass null, ZERO_SIZE_PTR or the live allocation krealloc or kmalloc
    // last returned, and do not use it after a move.
    unsafe { m.krealloc(p, size, GFP_KERNEL) }
        .unwrap_or_else(|| panic!("krealloc to {size}"))
        .as_ptr()
}

/// krealloc grows (contents kept), shrinks in place while the allocation still fits,
/// frees on size 0 (returning ZERO_SIZE_PTR) and acts as kmalloc on null.
#[test]
fn krealloc_grows_shrinks_frees() {
    let m = machine();
    let boot_areas = areas(&m);
    let p = realloc(&m, std::ptr::null_mut(), 50);
    assert!(m.ksize(p) >= 50, "null: acts as kmalloc");
    write_pat(p, 50, 5);
    // Within ksize: same pointer.
    let ks = m.ksize(p);
    let q = realloc(&m, p, ks);
    assert_eq!(q, p, "fits in ksize: in place");
    check_pat(q, 50, 5);
    // Grow: contents preserved.
    let mut cur = q;
    let mut len = 50;
    for new in [500usize, 3000, 8192, 20000, 100_000] {
        let n = realloc(&m, cur, new);
        assert!(m.ksize(n) >= new, "krealloc to {new}");
        check_pat(n, len, 5);
        write_pat(n, new, 5);
        cur = n;
        len = new;
    }
    // Shrink: in place while it fits.
    for new in [70_000usize, 9000, 100, 1] {
        let n = realloc(&m, cur, new);
        assert_eq!(n, cur, "shrinking to {new} stays in place");
        check_pat(n, new, 5);
    }
    // Size 0 frees.
    let c = cache(&m, KmallocType::Normal, 100);
    let s = km(&m, 100);
    let used = in_use(&m, c);
    let z = realloc(&m, s, 0);
    assert_eq!(z, ZERO_SIZE_PTR);
    assert_eq!(in_use(&m, c), used - 1, "krealloc(p, 0) freed p");
    let z = realloc(&m, z, 0);
    assert_eq!(z, ZERO_SIZE_PTR);
    let before = free_now(&m);
    let z = realloc(&m, cur, 0);
    assert_eq!(z, ZERO_SIZE_PTR);
    assert_eq!(
        free_now(&m),
        before + (1 << get_order(100_000)),
        "large freed"
    );
    // From ZERO_SIZE_PTR: a new allocation.
    let n = realloc(&m, ZERO_SIZE_PTR, 64);
    assert!(m.ksize(n) >= 64);
    kfree(&m, n);
    assert!(m.platform().take_log().is_empty());
    assert_back_to_boot(&m, &boot_areas);
}

/// A failed krealloc leaves the old allocation intact.
#[test]
fn failed_krealloc_keeps_the_old_allocation() {
    let m = machine();
    let p = km(&m, 100);
    write_pat(p, 100, 9);
    // SAFETY: `p` is live; on failure it is untouched.
    let r = unsafe { m.krealloc(p, KMALLOC_MAX_SIZE + 1, GFP_KERNEL | __GFP_NOWARN) };
    assert!(r.is_none());
    check_pat(p, 100, 9);
    assert_eq!(m.ksize(p), 128);
    kfree(&m, p);
}

// ------------------------------------------------------------------------------- sensitive, dup

/// `kfree_sensitive` zeroes the whole allocation before freeing it: the next allocation of
/// the same size (which gets the same memory) sees zeros.
#[test]
fn kfree_sensitive_zeroes() {
    let m = machine();
    for size in [24usize, 100, 1000, 8192, 16384] {
        let p = km(&m, size);
        let ks = m.ksize(p);
        bytes(p, ks).fill(0xaa);
        // SAFETY: `p` is a live kmalloc allocation, not used again.
        unsafe { m.kfree_sensitive(p) };
        let q = km(&m, size);
        assert_eq!(q, p, "premise: the same memory comes back");
        assert!(is_zero(q, ks), "kfree_sensitive({size}) zeroed {ks} bytes");
        kfree(&m, q);
    }
}

/// `kmemdup` copies bytes; `kstrdup` copies a string and NUL-terminates it.
#[test]
fn kmemdup_and_kstrdup_copy() {
    let m = machine();
    for len in [1usize, 7, 100, 5000, 30000] {
        let src: Vec<u8> = (0..len).map(|i| pat(len, i)).collect();
        let p = m.kmemdup(&src, GFP_KERNEL).unwrap().as_ptr();
        assert!(m.ksize(p) >= len);
        assert_eq!(bytes(p, len), &src[..]);
        kfree(&m, p);
    }
    for s in ["", "a", "hello, kernel", &"x".repeat(4095)] {
        let p = m.kstrdup(s, GFP_KERNEL).unwrap().as_ptr();
        assert!(m.ksize(p) > s.len());
        assert_eq!(&bytes(p, s.len())[..], s.as_bytes());
        assert_eq!(bytes(p, s.len() + 1)[s.len()], 0, "NUL-terminated");
        kfree(&m, p);
    }
}

// ------------------------------------------------------------------------------- types, zones

/// `GFP_DMA` kmallocs come from the `dma-kmalloc-*` caches, in ZONE_DMA (large ones from
/// ZONE_DMA pages); plain ones from `kmalloc-*`, Normal first.
#[test]
fn gfp_dma_kmallocs_come_from_dma_caches_in_zone_dma() {
    let m = boot(three_zones());
    let mut live = Vec::new();
    for size in [8usize, 96, 100, 192, 512, 3000, 8192] {
        for _ in 0..50 {
            let p = m.kmalloc(size, GFP_KERNEL | GFP_DMA).unwrap().as_ptr();
            assert_eq!(zone_of(&m, p), ZoneType::Dma, "GFP_DMA kmalloc({size})");
            let name = cache_name(&m, p);
            assert_eq!(name, cache(&m, KmallocType::Dma, size).name());
            assert!(name.starts_with("dma-kmalloc-"), "{name}");
            live.push(p);
            let p = km(&m, size);
            assert_eq!(zone_of(&m, p), ZoneType::Normal, "kmalloc({size})");
            assert!(cache_name(&m, p).starts_with("kmalloc-"));
            live.push(p);
        }
    }
    let p = m.kmalloc(16384, GFP_KERNEL | GFP_DMA).unwrap().as_ptr();
    assert_eq!(zone_of(&m, p), ZoneType::Dma, "large GFP_DMA kmalloc");
    live.push(p);
    let p = m.kmalloc(100, GFP_ATOMIC | GFP_DMA).unwrap().as_ptr();
    assert_eq!(zone_of(&m, p), ZoneType::Dma, "GFP_ATOMIC | GFP_DMA");
    live.push(p);
    for p in live {
        kfree(&m, p);
    }
}

/// `__GFP_RECLAIMABLE` kmallocs come from the `kmalloc-rcl-*` caches, whose slabs count as
/// SReclaimable.
#[test]
fn reclaimable_kmallocs_come_from_rcl_caches() {
    let m = machine();
    let before = m.slab().slab_pages();
    let mut live = Vec::new();
    for size in [16usize, 96, 256, 2048] {
        for _ in 0..100 {
            let p = m
                .kmalloc(size, GFP_KERNEL | __GFP_RECLAIMABLE)
                .unwrap()
                .as_ptr();
            let name = cache_name(&m, p);
            assert_eq!(name, cache(&m, KmallocType::Reclaim, size).name());
            assert!(name.starts_with("kmalloc-rcl-"), "{name}");
            live.push(p);
        }
    }
    let after = m.slab().slab_pages();
    assert!(after.0 > before.0, "SReclaimable grew");
    assert_eq!(after.1, before.1, "SUnreclaim unchanged");
    for p in live {
        kfree(&m, p);
    }
}

/// kmalloc with `__GFP_HIGHMEM` (on x86_32) still returns direct-mapped memory.
#[test]
fn kmalloc_memory_is_always_direct_mapped() {
    let m = boot(MachineConfig::x86_32(1 << 30));
    assert!(m.zones()[ZoneType::HighMem.index()].managed_pages > 0);
    for size in [64usize, 5000, 20000] {
        for gfp in [GFP_KERNEL | __GFP_HIGHMEM, GFP_HIGHUSER] {
            let p = m.kmalloc(size, gfp).unwrap().as_ptr();
            assert!(
                m.virt_to_page(VirtAddr(p as usize)).is_some(),
                "kmalloc({size}, {gfp}) in the direct map"
            );
            assert_ne!(zone_of(&m, p), ZoneType::HighMem);
            write_pat(p, size, size);
            check_pat(p, size, size);
            kfree(&m, p);
        }
    }
}

// ------------------------------------------------------------------------------- context

/// GFP_ATOMIC never sleeps: on an exhausted machine whose slow path would wait 5 s per
/// round, it fails at once; from atomic context it is not reported.
#[test]
fn gfp_atomic_never_sleeps() {
    let mut cfg = MachineConfig::x86_64(16 << 20);
    cfg.kmem.reclaim_wait_ns = 5_000_000_000;
    let m = boot(cfg);
    let boot_areas = areas(&m);
    {
        let _guard = m.platform().cpu_guard();
        let p = m.kmalloc(100, GFP_ATOMIC).expect("memory is free").as_ptr();
        let q = m
            .kmalloc(20000, GFP_ATOMIC)
            .expect("memory is free")
            .as_ptr();
        kfree(&m, p);
        kfree(&m, q);
    }
    assert!(
        !log(&m).contains("sleeping function"),
        "GFP_ATOMIC in atomic context is fine"
    );
    shrink_kmalloc(&m);
    let gfp = GFP_NOWAIT | __GFP_MEMALLOC | __GFP_NOWARN;
    let mut held = Vec::new();
    m.drain_all_pages();
    for order in (0..=10).rev() {
        while let Some(p) = m.alloc_pages(gfp, order) {
            held.push((p, order));
        }
    }
    let t0 = Instant::now();
    for size in [8usize, 100, 4096, 8192, 20000, 1 << 20] {
        assert!(
            m.kmalloc(size, GFP_ATOMIC | __GFP_NOWARN).is_none(),
            "kmalloc({size}, GFP_ATOMIC) fails"
        );
    }
    let dt = t0.elapsed();
    assert!(
        dt < Duration::from_secs(2),
        "GFP_ATOMIC took {dt:?}: it slept"
    );
    for (p, order) in held {
        // SAFETY: allocated above at `order`, not used again.
        unsafe { m.__free_pages(p, order) };
    }
    assert_back_to_boot(&m, &boot_areas);
}

/// A GFP_KERNEL kmalloc from atomic context (a CPU guard held) is reported as "sleeping
/// function called from invalid context", whether the object comes from the CPU's sheaf or
/// needs a new slab, and for large sizes.
#[test]
fn gfp_kernel_kmalloc_in_atomic_context_is_reported() {
    let m = machine();
    // Warm kmalloc-64's sheaf: the next allocation takes the fast path.
    let warm = km(&m, 64);
    kfree(&m, warm);
    m.platform().take_log();
    for size in [64usize, 100, 1000, 20000] {
        let p = {
            let _guard = m.platform().cpu_guard();
            m.kmalloc(size, GFP_KERNEL)
        };
        let text = log(&m);
        assert!(
            text.contains("sleeping function called from invalid context"),
            "kmalloc({size}, GFP_KERNEL) under a guard\n{text}"
        );
        if let Some(p) = p {
            kfree(&m, p.as_ptr());
        }
    }
    // Outside atomic context: no report.
    let p = km(&m, 64);
    kfree(&m, p);
    assert!(log(&m).is_empty());
}

// ------------------------------------------------------------------------------- bad frees

/// kfree of a pointer kmalloc never returned (on the stack, inside an object, inside a
/// large allocation, a `__get_free_pages` page) is reported as an invalid pointer and
/// changes nothing; so is a second kfree of the same pointer.
#[test]
fn bad_kfree_is_reported_and_changes_nothing() {
    let m = machine();
    let mut local = [0u8; 32];
    assert_rejected(&m, "invalid pointer", || kfree(&m, local.as_mut_ptr()));
    let small = km(&m, 100);
    write_pat(small, 100, 1);
    // An interior pointer: kfree must reject it.
    let inside = small.wrapping_add(16);
    assert_rejected(&m, "invalid pointer", || kfree(&m, inside));
    let large = km(&m, 20000);
    write_pat(large, 20000, 2);
    // Inside a large kmalloc: its second page, and a byte offset.
    let inside = large.wrapping_add(PAGE_SIZE);
    assert_rejected(&m, "invalid pointer", || kfree(&m, inside));
    let inside = large.wrapping_add(8);
    assert_rejected(&m, "invalid pointer", || kfree(&m, inside));
    let page = m.__get_free_pages(GFP_KERNEL, 0).unwrap();
    let pages = m.__get_free_pages(GFP_KERNEL, 2).unwrap();
    assert_rejected(&m, "invalid pointer", || kfree(&m, page.as_ptr()));
    assert_rejected(&m, "invalid pointer", || kfree(&m, pages.as_ptr()));
    assert_eq!(m.ksize(page.as_ptr()), 0);
    check_pat(small, 100, 1);
    check_pat(large, 20000, 2);
    m.platform().take_log();
    let reports = m.bad_page_reports();
    // SAFETY: the pages are still allocated (the kfrees were rejected) and not used again.
    unsafe {
        m.free_pages(page, 0);
        m.free_pages(pages, 2);
    }
    assert_eq!(
        m.bad_page_reports(),
        reports,
        "the pages were still allocated"
    );
    kfree(&m, small);
    assert_rejected(&m, "double free", || kfree(&m, small));
    kfree(&m, large);
    assert_rejected(&m, "invalid pointer", || kfree(&m, large));
    assert!(m.platform().take_log().is_empty());
}

/// `free_pages` on a large kmalloc's address is reported ("Bad page state") and frees
/// nothing: the allocation stays usable and kfree frees it.
#[test]
fn free_pages_on_a_large_kmalloc_is_reported() {
    let m = machine();
    let p = km(&m, 16384);
    write_pat(p, 16384, 3);
    assert_rejected(&m, "Bad page state", || {
        // SAFETY: the free is rejected (the page is a large kmalloc); nothing is freed.
        unsafe { m.free_pages(VirtAddr(p as usize), 2) }
    });
    check_pat(p, 16384, 3);
    assert_eq!(m.ksize(p), 16384);
    let before = free_now(&m);
    kfree(&m, p);
    assert_eq!(free_now(&m), before + 4);
    assert!(m.platform().take_log().is_empty());
}
