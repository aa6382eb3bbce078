//! The rules of the slab layer, one test each, as users of Linux's `kmem_cache_*` API rely
//! on them: object size and alignment, constructors (run once per object when a slab is
//! populated, objects returned in their constructed state), zeroing, bulk allocation (all or
//! nothing), shrinking and destroying (memory goes back; live objects are reported and kept),
//! cache merging, zone and accounting flags (`SLAB_CACHE_DMA`, `SLAB_CACHE_DMA32`,
//! `SLAB_RECLAIM_ACCOUNT` in `/proc/meminfo`), bad input (wrong cache, interior pointers,
//! double frees, bad sizes and alignments), the slab shrinker under memory pressure, and
//! `/proc/slabinfo`.
//!
//! Every test boots its own small simulated machine ([`Machine`]) and, where it can, ends by
//! checking that the machine is back to its boot state: every cache it created destroyed,
//! the kmalloc caches shrunk and the per-CPU page lists drained, `nr_free_pages` equals
//! `boot_free_pages()`.

mod common;
use common::{
    areas, assert_back_to_boot, boot, bytes, check_pat, head_page, in_use, log, machine, pat,
    take_all_pages, three_zones, write_pat, zone_of,
};

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kmem::addr::PAGE_SIZE;
use kmem::gfp::*;
use kmem::kmalloc::KmallocType;
use kmem::page_alloc::page::{Page, pg};
use kmem::slab::{KmemCache, KmemCacheArgs, SlabFlags};
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------------------- helpers

/// Creates a cache that must be created.
fn create<'m>(
    m: &'m Machine,
    name: &str,
    size: usize,
    align: usize,
    flags: SlabFlags,
    ctor: Option<fn(*mut u8)>,
) -> &'m KmemCache {
    m.kmem_cache_create(name, size, align, flags, ctor)
        .unwrap_or_else(|| panic!("kmem_cache_create({name}, {size}, {align}) failed"))
}

/// Destroys a cache that must be destroyed.
fn destroy(m: &Machine, c: &KmemCache) {
    let name = c.name().to_owned();
    // SAFETY: the test holds no object of `c` and does not use `c` after this call.
    assert!(unsafe { m.kmem_cache_destroy(c) }, "destroy {name}");
}

/// An object of `c` that must be allocated.
fn alloc(m: &Machine, c: &KmemCache) -> *mut u8 {
    m.kmem_cache_alloc(c, GFP_KERNEL)
        .unwrap_or_else(|| panic!("{}: allocation failed", c.name()))
        .as_ptr()
}

/// Frees an object of `c`.
fn free(m: &Machine, c: &KmemCache, p: *mut u8) {
    // SAFETY: callers pass a live object of `c` that they own and forget.
    unsafe { m.kmem_cache_free(c, p) };
}

/// `n` objects of `c` that must be allocated.
fn alloc_n(m: &Machine, c: &KmemCache, n: usize) -> Vec<*mut u8> {
    (0..n).map(|_| alloc(m, c)).collect()
}

/// Frees every object of `c` in `objs`.
fn free_all(m: &Machine, c: &KmemCache, objs: impl IntoIterator<Item = *mut u8>) {
    for p in objs {
        free(m, c, p);
    }
}

/// The cache owning the slab object at `p` (its address), asserting it is in a slab.
fn owner(m: &Machine, p: *const u8) -> usize {
    let head = head_page(m, p);
    assert!(head.state() & pg::SLAB != 0, "{p:p} is not in a slab");
    head.private()
}

fn addr(c: &KmemCache) -> usize {
    c as *const KmemCache as usize
}

/// Asserts that no two `(address, length)` ranges overlap.
fn assert_disjoint(objs: &[(usize, usize)]) {
    let mut v = objs.to_vec();
    v.sort_unstable();
    for w in v.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "objects overlap: {:#x}+{} and {:#x}+{}",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
}

/// Takes every free page (orders 10 down to 0, ignoring the watermarks).
fn exhaust(m: &Machine) -> Vec<(&Page, u32)> {
    let gfp = GFP_NOWAIT | __GFP_MEMALLOC | __GFP_NOWARN;
    let mut held = Vec::new();
    m.drain_all_pages();
    for order in (0..=10).rev() {
        while let Some(p) = m.alloc_pages(gfp, order) {
            held.push((p, order));
        }
    }
    assert_eq!(m.nr_free_pages(), 0, "exhausted");
    held
}

fn release(m: &Machine, held: Vec<(&Page, u32)>) {
    for (p, order) in held {
        // SAFETY: each block was allocated by `exhaust` (or the test) at `order`, unused.
        unsafe { m.__free_pages(p, order) };
    }
}

/// `/proc/meminfo` field `key` in kB.
fn meminfo_kb(m: &Machine, key: &str) -> usize {
    let info = m.proc_meminfo();
    let line = info
        .lines()
        .find(|l| l.split(':').next() == Some(key))
        .unwrap_or_else(|| panic!("no {key} in meminfo:\n{info}"));
    let mut w = line.split_whitespace();
    w.next();
    let v = w.next().unwrap().parse().unwrap();
    assert_eq!(w.next(), Some("kB"), "{line}");
    v
}

// ------------------------------------------------------------------------------- size, alignment

/// `kmem_cache_size` is the size asked for; every object is aligned as asked (at least to a
/// word), is at least that big, and objects never overlap.
#[test]
fn objects_have_the_size_and_alignment_asked_for() {
    let m = machine();
    let boot_areas = areas(&m);
    for (i, &size) in [1usize, 7, 24, 100, 333, 1000, 2048, 4000]
        .iter()
        .enumerate()
    {
        for &align in &[0usize, 8, 16, 64, 256] {
            let name = format!("sz{size}-al{align}");
            let c = create(&m, &name, size, align, SlabFlags::NO_MERGE, None);
            assert_eq!(m.kmem_cache_size(c), size, "{name}: kmem_cache_size");
            assert_eq!(c.name(), name);
            let want = align.max(8);
            assert_eq!(c.align() % want, 0, "{name}: cache alignment {}", c.align());
            assert!(c.size() >= size);
            let mut objs = Vec::new();
            for k in 0..40 {
                let p = alloc(&m, c);
                assert_eq!(p as usize % want, 0, "{name}: object {p:p} misaligned");
                write_pat(p, size, i * 1000 + k);
                objs.push(p);
            }
            let ranges: Vec<_> = objs.iter().map(|&p| (p as usize, size)).collect();
            assert_disjoint(&ranges);
            for (k, &p) in objs.iter().enumerate() {
                check_pat(p, size, i * 1000 + k);
                assert_eq!(owner(&m, p), addr(c), "{name}: object in one of its slabs");
                free(&m, c, p);
            }
            destroy(&m, c);
        }
    }
    assert_back_to_boot(&m, &boot_areas);
}

/// `SLAB_HWCACHE_ALIGN` puts objects above 32 bytes on cache-line (64-byte) boundaries.
#[test]
fn hwcache_align_gives_cache_line_alignment_above_32_bytes() {
    let m = machine();
    for size in [33usize, 40, 64, 65, 100, 200, 1000] {
        let flags = SlabFlags::HWCACHE_ALIGN | SlabFlags::NO_MERGE;
        let c = create(&m, "hw", size, 0, flags, None);
        assert_eq!(m.kmem_cache_size(c), size);
        let objs = alloc_n(&m, c, 20);
        for &p in &objs {
            assert_eq!(p as usize % 64, 0, "size {size}: {p:p} not on a cache line");
        }
        free_all(&m, c, objs);
        destroy(&m, c);
    }
}

// ------------------------------------------------------------------------------- constructors

static COUNT_CALLS: AtomicUsize = AtomicUsize::new(0);

fn counting_ctor(p: *mut u8) {
    COUNT_CALLS.fetch_add(1, Relaxed);
    // SAFETY: the slab layer passes a fresh object of the cache (48 bytes).
    unsafe { p.write_bytes(0x5a, 48) };
}

/// The constructor runs once per object when a slab is populated: after allocating from a
/// fresh cache, calls = objects per slab × slabs; freeing and allocating again makes no new
/// call while no new slab is made.
#[test]
fn ctor_runs_once_per_object_when_a_slab_is_populated() {
    let m = machine();
    let boot_areas = areas(&m);
    let c = create(
        &m,
        "ctor-count",
        48,
        0,
        SlabFlags::NONE,
        Some(counting_ctor),
    );
    assert_eq!(
        COUNT_CALLS.load(Relaxed),
        0,
        "no call before any allocation"
    );
    let per = c.objects_per_slab();
    let n = 2 * per + 3;
    let objs = alloc_n(&m, c, n);
    let slabs = c.nr_slabs();
    assert!(slabs >= 3, "premise: several slabs ({slabs})");
    assert_eq!(
        COUNT_CALLS.load(Relaxed),
        per * slabs,
        "one call per object of every slab made"
    );
    free_all(&m, c, objs.iter().copied());
    assert_eq!(c.nr_slabs(), slabs, "premise: the empty slabs are kept");
    assert_eq!(COUNT_CALLS.load(Relaxed), per * slabs, "no call on free");
    let objs = alloc_n(&m, c, n);
    assert_eq!(c.nr_slabs(), slabs, "premise: no new slab");
    assert_eq!(
        COUNT_CALLS.load(Relaxed),
        per * slabs,
        "no call when objects are reused"
    );
    // One more slab: exactly one slab's worth of calls more.
    let mut more = Vec::new();
    while c.nr_slabs() == slabs {
        more.push(alloc(&m, c));
    }
    assert_eq!(COUNT_CALLS.load(Relaxed), per * (slabs + 1));
    free_all(&m, c, objs.into_iter().chain(more));
    destroy(&m, c);
    assert_back_to_boot(&m, &boot_areas);
}

const CTOR_SIZE: usize = 120;

fn pattern_ctor(p: *mut u8) {
    // SAFETY: the slab layer passes a fresh object of the cache (CTOR_SIZE bytes).
    let obj = unsafe { std::slice::from_raw_parts_mut(p, CTOR_SIZE) };
    for (i, b) in obj.iter_mut().enumerate() {
        *b = pat(0xc7, i);
    }
}

/// Objects come back in their constructed state: freed unmodified, they are handed out
/// again with the constructor's pattern intact, whether they went through the CPU's sheaf
/// only or back to their slab's free list.
#[test]
fn freed_objects_keep_their_constructed_state() {
    let m = machine();
    let boot_areas = areas(&m);
    let c = create(
        &m,
        "ctor-state",
        CTOR_SIZE,
        0,
        SlabFlags::NONE,
        Some(pattern_ctor),
    );
    let p = alloc(&m, c);
    check_pat(p, CTOR_SIZE, 0xc7);
    free(&m, c, p);
    let q = alloc(&m, c);
    assert_eq!(q, p, "premise: the sheaf's top object comes back");
    check_pat(q, CTOR_SIZE, 0xc7);
    free(&m, c, q);

    // Enough objects that frees flush sheaves into the slabs' free lists.
    let n = 5 * c.objects_per_slab();
    let objs = alloc_n(&m, c, n);
    for &p in &objs {
        check_pat(p, CTOR_SIZE, 0xc7);
    }
    free_all(&m, c, objs.iter().rev().copied());
    let again = alloc_n(&m, c, n);
    for &p in &again {
        check_pat(p, CTOR_SIZE, 0xc7);
    }
    free_all(&m, c, again);
    // After a shrink, new slabs are constructed again.
    m.kmem_cache_shrink(c);
    assert_eq!(c.nr_slabs(), 0);
    let p = alloc(&m, c);
    check_pat(p, CTOR_SIZE, 0xc7);
    free(&m, c, p);
    destroy(&m, c);
    assert_back_to_boot(&m, &boot_areas);
}

/// `__GFP_ZERO` on a cache with a constructor would destroy the constructed state: it is
/// reported and ignored, and the object comes in its constructed state.
#[test]
fn zalloc_on_a_constructed_cache_is_reported_and_ignored() {
    let m = machine();
    let c = create(
        &m,
        "ctor-zalloc",
        CTOR_SIZE,
        0,
        SlabFlags::NONE,
        Some(pattern_ctor),
    );
    let p = m.kmem_cache_zalloc(c, GFP_KERNEL).unwrap().as_ptr();
    let text = log(&m);
    assert!(
        text.contains("__GFP_ZERO on a cache with a constructor ignored"),
        "reported\n{text}"
    );
    check_pat(p, CTOR_SIZE, 0xc7);
    free(&m, c, p);
    let q = m.kmem_cache_alloc(c, GFP_KERNEL).unwrap().as_ptr();
    assert!(log(&m).is_empty(), "a plain allocation is not reported");
    check_pat(q, CTOR_SIZE, 0xc7);
    free(&m, c, q);
    destroy(&m, c);
}

/// `kmem_cache_zalloc` zeroes objects that were dirty when freed.
#[test]
fn zalloc_zeroes_dirty_objects() {
    let m = machine();
    let c = create(&m, "zalloc", 200, 0, SlabFlags::NONE, None);
    let objs = alloc_n(&m, c, 100);
    for &p in &objs {
        bytes(p, 200).fill(0xff);
    }
    free_all(&m, c, objs.iter().rev().copied());
    let z: Vec<_> = (0..100)
        .map(|_| m.kmem_cache_zalloc(c, GFP_KERNEL).unwrap().as_ptr())
        .collect();
    assert!(z.contains(&objs[0]), "premise: dirty objects are reused");
    for &p in &z {
        assert!(bytes(p, 200).iter().all(|&b| b == 0), "{p:p} not zeroed");
    }
    free_all(&m, c, z);
    destroy(&m, c);
}

// ------------------------------------------------------------------------------- bulk

/// `kmem_cache_alloc_bulk` fills the whole array or allocates nothing: on an exhausted
/// machine, a request larger than what the cache has at hand returns 0 and leaves no object
/// allocated; a request it can serve succeeds. Afterwards everything goes back.
#[test]
fn alloc_bulk_is_all_or_nothing() {
    let m = boot(MachineConfig::x86_64(16 << 20));
    let boot_areas = areas(&m);
    let c = create(&m, "bulk", 512, 0, SlabFlags::NO_MERGE, None);
    let first = alloc(&m, c);
    assert_eq!(c.nr_slabs(), 1);
    let held = exhaust(&m);
    let at_hand = c.total_objects() - 1;
    assert!(at_hand >= 2, "premise: the slab has free objects");
    let gfp = GFP_NOWAIT | __GFP_NOWARN;

    let mut out = vec![std::ptr::null_mut(); at_hand + 1];
    assert_eq!(m.kmem_cache_alloc_bulk(c, gfp, &mut out), 0, "fails");
    assert!(out.iter().all(|p| p.is_null()), "nothing handed out");
    assert_eq!(
        in_use(&m, c),
        1,
        "nothing leaked: only the first object is in use"
    );
    assert_eq!(c.nr_slabs(), 1);
    m.validate().unwrap();

    let mut out = vec![std::ptr::null_mut(); at_hand];
    assert_eq!(m.kmem_cache_alloc_bulk(c, gfp, &mut out), at_hand, "fits");
    assert!(out.iter().all(|p| !p.is_null()));
    let mut ranges: Vec<_> = out.iter().map(|&p| (p as usize, 512)).collect();
    ranges.push((first as usize, 512));
    assert_disjoint(&ranges);
    assert_eq!(in_use(&m, c), at_hand + 1);
    // SAFETY: every pointer of `out` is a live object of `c` owned by this test.
    unsafe { m.kmem_cache_free_bulk(c, &out) };
    free(&m, c, first);
    assert_eq!(in_use(&m, c), 0);
    release(&m, held);
    assert_eq!(m.platform().take_log(), Vec::<String>::new(), "no report");
    destroy(&m, c);
    assert_back_to_boot(&m, &boot_areas);
}

/// A bulk allocation gives distinct objects; `kmem_cache_free_bulk` returns them all.
#[test]
fn bulk_alloc_and_free() {
    let m = machine();
    let c = create(&m, "bulk2", 96, 0, SlabFlags::NO_MERGE, None);
    let mut out = vec![std::ptr::null_mut(); 300];
    assert_eq!(m.kmem_cache_alloc_bulk(c, GFP_KERNEL, &mut out), 300);
    let ranges: Vec<_> = out.iter().map(|&p| (p as usize, 96)).collect();
    assert_disjoint(&ranges);
    for (k, &p) in out.iter().enumerate() {
        write_pat(p, 96, k);
    }
    for (k, &p) in out.iter().enumerate() {
        check_pat(p, 96, k);
    }
    assert_eq!(in_use(&m, c), 300);
    // SAFETY: every pointer of `out` is a live object of `c` owned by this test.
    unsafe { m.kmem_cache_free_bulk(c, &out) };
    assert_eq!(in_use(&m, c), 0);
    m.kmem_cache_shrink(c);
    assert_eq!(c.nr_slabs(), 0);
    destroy(&m, c);
}

// ------------------------------------------------------------------------------- shrink, destroy

/// `kmem_cache_shrink` gives free slabs back: the pages it reports reach the free lists
/// and the cache is left without slabs.
#[test]
fn shrink_returns_free_slabs_to_the_page_allocator() {
    let m = machine();
    let c = create(&m, "shrink", 512, 0, SlabFlags::NO_MERGE, None);
    let objs = alloc_n(&m, c, 1000);
    free_all(&m, c, objs);
    let slabs = c.nr_slabs();
    assert!(slabs > 0, "premise: empty slabs are kept");
    m.drain_all_pages();
    let before = m.nr_free_pages();
    let freed = m.kmem_cache_shrink(c);
    m.drain_all_pages();
    assert_eq!(c.nr_slabs(), 0, "no slab left");
    assert_eq!(c.total_objects(), 0);
    assert_eq!(freed, slabs << c.order(), "pages reported");
    assert_eq!(m.nr_free_pages(), before + freed, "pages in the free lists");

    // With live objects, only the free slabs go.
    let objs = alloc_n(&m, c, 100);
    m.kmem_cache_shrink(c);
    assert!(c.nr_slabs() > 0);
    assert_eq!(in_use(&m, c), 100);
    free_all(&m, c, objs);
    m.kmem_cache_shrink(c);
    assert_eq!(c.nr_slabs(), 0);
    destroy(&m, c);
}

/// Destroying empty caches gives back all their memory (slabs and descriptors): with the
/// kmalloc caches shrunk, the machine is back at its boot state.
#[test]
fn destroying_every_cache_returns_all_memory() {
    let m = machine();
    let boot_areas = areas(&m);
    let specs: [(usize, usize, SlabFlags); 6] = [
        (24, 0, SlabFlags::NONE),
        (200, 64, SlabFlags::HWCACHE_ALIGN),
        (700, 0, SlabFlags::RECLAIM_ACCOUNT),
        (3000, 256, SlabFlags::NO_MERGE),
        (96, 0, SlabFlags::CACHE_DMA),
        (5000, 0, SlabFlags::NONE),
    ];
    let caches: Vec<_> = specs
        .iter()
        .enumerate()
        .map(|(i, &(size, align, flags))| create(&m, &format!("c{i}"), size, align, flags, None))
        .collect();
    let mut live = Vec::new();
    for (c, &(size, ..)) in caches.iter().zip(&specs) {
        for k in 0..150 {
            let p = alloc(&m, c);
            write_pat(p, size, k);
            live.push((*c, p));
        }
    }
    for &(c, p) in live.iter().rev() {
        free(&m, c, p);
    }
    for c in caches {
        destroy(&m, c);
    }
    assert!(m.platform().take_log().is_empty(), "no report");
    assert_back_to_boot(&m, &boot_areas);
}

/// Destroying a cache with live objects reports "Objects remaining" and each live object,
/// returns false and frees nothing in use: the objects keep their contents and can be freed
/// later, after which the cache is destroyed normally.
#[test]
fn destroy_with_live_objects_reports_and_keeps_them() {
    let m = machine();
    let boot_areas = areas(&m);
    let c = create(&m, "leaky", 64, 0, SlabFlags::NO_MERGE, None);
    let objs = alloc_n(&m, c, 40);
    let (gone, kept) = objs.split_at(35);
    free_all(&m, c, gone.iter().copied());
    for (k, &p) in kept.iter().enumerate() {
        write_pat(p, 64, k);
    }
    let slab_pages = c.nr_slabs() << c.order();
    // SAFETY: `c` has live objects, so it is not freed (the call returns false).
    let destroyed = unsafe { m.kmem_cache_destroy(c) };
    assert!(!destroyed, "a cache with live objects is not destroyed");
    let text = log(&m);
    assert!(
        text.contains("Objects remaining in leaky on __kmem_cache_shutdown()"),
        "{text}"
    );
    for &p in kept {
        assert!(
            text.contains(&format!("Object {:#x}", p as usize)),
            "object {p:p} listed\n{text}"
        );
    }
    let listed = text.lines().filter(|l| l.starts_with("Object 0x")).count();
    assert_eq!(listed, kept.len(), "only live objects are listed\n{text}");
    assert!(c.nr_slabs() > 0 && c.nr_slabs() << c.order() <= slab_pages);
    for (k, &p) in kept.iter().enumerate() {
        assert_eq!(owner(&m, p), addr(c), "still in a slab of the cache");
        check_pat(p, 64, k);
        write_pat(p, 64, k + 100);
    }
    // Something else allocated meanwhile does not land on them.
    let other: Vec<_> = (0..50)
        .map(|_| m.kmalloc(64, GFP_KERNEL).unwrap().as_ptr())
        .collect();
    for (k, &p) in kept.iter().enumerate() {
        check_pat(p, 64, k + 100);
    }
    let mut ranges: Vec<_> = other.iter().map(|&p| (p as usize, 64)).collect();
    ranges.extend(kept.iter().map(|&p| (p as usize, 64)));
    assert_disjoint(&ranges);
    for p in other {
        // SAFETY: `p` came from kmalloc above and is not used again.
        unsafe { m.kfree(p) };
    }
    // The objects can still be allocated and freed; then the cache goes.
    let p = alloc(&m, c);
    free(&m, c, p);
    free_all(&m, c, kept.iter().copied());
    m.validate().unwrap();
    destroy(&m, c);
    assert!(m.platform().take_log().is_empty());
    assert_back_to_boot(&m, &boot_areas);
}

// ------------------------------------------------------------------------------- merging

/// Two caches of compatible sizes, without constructors, share one `KmemCache`; destroying
/// one creator leaves the cache working for the other.
#[test]
fn compatible_caches_merge() {
    let m = machine();
    let boot_areas = areas(&m);
    let a = create(&m, "merge-a", 200, 0, SlabFlags::NONE, None);
    assert_eq!(
        a.refcount(),
        1,
        "premise: no kmalloc cache matches 200 bytes"
    );
    let b = create(&m, "merge-b", 196, 0, SlabFlags::NONE, None);
    assert!(std::ptr::eq(a, b), "merged");
    assert_eq!(a.refcount(), 2);
    let slabinfo = m.proc_slabinfo();
    assert!(slabinfo.contains("merge-a "));
    assert!(!slabinfo.contains("merge-b"), "one cache, listed once");
    let p = alloc(&m, b);
    let q = alloc(&m, a);
    assert_ne!(p, q);
    free(&m, a, p);
    free(&m, b, q);
    destroy(&m, b);
    assert_eq!(a.refcount(), 1);
    let objs: Vec<_> = (0..100).map(|_| alloc(&m, a)).collect();
    for (k, &p) in objs.iter().enumerate() {
        write_pat(p, 200, k);
    }
    for (k, &p) in objs.iter().enumerate() {
        check_pat(p, 200, k);
        free(&m, a, p);
    }
    destroy(&m, a);
    assert_back_to_boot(&m, &boot_areas);
}

/// Caches are not merged when either has `SLAB_NO_MERGE` or a constructor, when their
/// `SLAB_RECLAIM_ACCOUNT` or `SLAB_CACHE_DMA` flags differ, or on a machine booted with
/// `slab_merge = false`.
#[test]
fn incompatible_caches_do_not_merge() {
    fn noop(_: *mut u8) {}
    let m = machine();
    let boot_areas = areas(&m);
    let base = create(&m, "base", 200, 0, SlabFlags::NONE, None);
    type Case = (&'static str, SlabFlags, Option<fn(*mut u8)>);
    let cases: [Case; 5] = [
        ("no-merge", SlabFlags::NO_MERGE, None),
        ("ctor", SlabFlags::NONE, Some(noop)),
        ("reclaim", SlabFlags::RECLAIM_ACCOUNT, None),
        ("dma", SlabFlags::CACHE_DMA, None),
        ("dma32", SlabFlags::CACHE_DMA32, None),
    ];
    for (name, flags, ctor) in cases {
        let c = create(&m, name, 200, 0, flags, ctor);
        assert!(!std::ptr::eq(c, base), "{name}: not merged");
        assert_eq!(c.refcount(), 1, "{name}");
        assert_eq!(base.refcount(), 1, "{name}");
        destroy(&m, c);
    }
    // A cache with NO_MERGE is not a merge target either.
    let lone = create(&m, "lone", 328, 0, SlabFlags::NO_MERGE, None);
    let other = create(&m, "other", 328, 0, SlabFlags::NONE, None);
    assert!(!std::ptr::eq(lone, other));
    // ... nor one with a constructor.
    let with_ctor = create(&m, "with-ctor", 456, 0, SlabFlags::NONE, Some(noop));
    let plain = create(&m, "plain", 456, 0, SlabFlags::NONE, None);
    assert!(!std::ptr::eq(with_ctor, plain));
    for c in [lone, other, with_ctor, plain, base] {
        destroy(&m, c);
    }
    assert_back_to_boot(&m, &boot_areas);

    let mut cfg = MachineConfig::x86_64(64 * MIB);
    cfg.kmem.slab_merge = false;
    let m = boot(cfg);
    let a = create(&m, "a", 200, 0, SlabFlags::NONE, None);
    let b = create(&m, "b", 200, 0, SlabFlags::NONE, None);
    assert!(!std::ptr::eq(a, b), "slab_nomerge: not merged");
    let k = create(&m, "k64", 64, 0, SlabFlags::NONE, None);
    let k64 = m.kmalloc_caches().cache(KmallocType::Normal, 6).unwrap();
    assert!(
        !std::ptr::eq(k, k64),
        "slab_nomerge: not merged with kmalloc-64"
    );
    for c in [a, b, k] {
        destroy(&m, c);
    }
}

/// A merged cache serves its largest creator: Linux raises the shared cache's object size
/// to the largest size asked for (`__kmem_cache_alias`), so `kmem_cache_size` and
/// `kmem_cache_zalloc` cover every creator's whole object.
#[test]
fn merged_cache_serves_the_larger_creator() {
    let m = machine();
    let small = create(&m, "small", 193, 0, SlabFlags::NONE, None);
    let big = create(&m, "big", 200, 0, SlabFlags::NONE, None);
    assert!(std::ptr::eq(small, big), "premise: merged");
    assert!(
        m.kmem_cache_size(big) >= 200,
        "kmem_cache_size is {} for a 200-byte creator",
        m.kmem_cache_size(big)
    );
    let p = alloc(&m, big);
    bytes(p, 200).fill(0xff);
    free(&m, big, p);
    let z = m.kmem_cache_zalloc(big, GFP_KERNEL).unwrap().as_ptr();
    assert_eq!(z, p, "premise: the dirty object comes back");
    let b = bytes(z, 200);
    let dirty: Vec<usize> = (0..200).filter(|&i| b[i] != 0).collect();
    assert!(dirty.is_empty(), "zalloc left bytes {dirty:?} dirty");
    free(&m, big, z);
}

// ------------------------------------------------------------------------------- zones, accounting

/// `SLAB_CACHE_DMA` objects live in ZONE_DMA, `SLAB_CACHE_DMA32` objects in DMA32 (or DMA),
/// and ordinary objects in Normal on a machine that has it.
#[test]
fn dma_caches_take_their_zone() {
    let m = boot(three_zones());
    for zt in [ZoneType::Dma, ZoneType::Dma32, ZoneType::Normal] {
        assert!(m.zones()[zt.index()].managed_pages > 0, "premise: {zt:?}");
    }
    let dma = create(&m, "dma", 300, 0, SlabFlags::CACHE_DMA, None);
    let dma32 = create(&m, "dma32", 300, 0, SlabFlags::CACHE_DMA32, None);
    let normal = create(&m, "normal", 300, 0, SlabFlags::NONE, None);
    assert!(!std::ptr::eq(dma, dma32) && !std::ptr::eq(dma, normal));
    let mut held = Vec::new();
    for _ in 0..200 {
        let p = alloc(&m, dma);
        assert_eq!(zone_of(&m, p), ZoneType::Dma, "SLAB_CACHE_DMA");
        held.push((dma, p));
        let p = alloc(&m, dma32);
        let z = zone_of(&m, p);
        assert!(
            z == ZoneType::Dma32 || z == ZoneType::Dma,
            "SLAB_CACHE_DMA32 object in {z:?}"
        );
        held.push((dma32, p));
        let p = alloc(&m, normal);
        assert_eq!(
            zone_of(&m, p),
            ZoneType::Normal,
            "no zone flag: Normal first"
        );
        held.push((normal, p));
    }
    // Zone modifiers in the allocation mask do not override the cache's zone.
    let p = m
        .kmem_cache_alloc(normal, GFP_KERNEL | GFP_DMA)
        .unwrap()
        .as_ptr();
    assert_eq!(zone_of(&m, p), ZoneType::Normal);
    held.push((normal, p));
    for (c, p) in held {
        free(&m, c, p);
    }
    for c in [dma, dma32, normal] {
        destroy(&m, c);
    }
}

/// `SLAB_RECLAIM_ACCOUNT` slabs count as SReclaimable in `/proc/meminfo`, other slabs as
/// SUnreclaim, and Slab is their sum.
#[test]
fn reclaim_account_slabs_are_sreclaimable() {
    let m = machine();
    let kb = |pages: usize| pages * PAGE_SIZE / 1024;
    let r0 = meminfo_kb(&m, "SReclaimable");
    let u0 = meminfo_kb(&m, "SUnreclaim");
    assert_eq!(meminfo_kb(&m, "Slab"), r0 + u0);

    let rcl = create(&m, "rcl", 500, 0, SlabFlags::RECLAIM_ACCOUNT, None);
    let objs: Vec<_> = (0..200).map(|_| alloc(&m, rcl)).collect();
    let pages = rcl.nr_slabs() << rcl.order();
    assert!(pages > 0);
    assert_eq!(meminfo_kb(&m, "SReclaimable"), r0 + kb(pages));
    assert_eq!(meminfo_kb(&m, "SUnreclaim"), u0);
    assert_eq!(meminfo_kb(&m, "KReclaimable"), r0 + kb(pages));

    let un = create(&m, "unrcl", 500, 0, SlabFlags::NO_MERGE, None);
    let objs2: Vec<_> = (0..300).map(|_| alloc(&m, un)).collect();
    let pages2 = un.nr_slabs() << un.order();
    assert_eq!(meminfo_kb(&m, "SReclaimable"), r0 + kb(pages));
    assert_eq!(meminfo_kb(&m, "SUnreclaim"), u0 + kb(pages2));
    assert_eq!(meminfo_kb(&m, "Slab"), r0 + u0 + kb(pages + pages2));

    for p in objs {
        free(&m, rcl, p);
    }
    for p in objs2 {
        free(&m, un, p);
    }
    m.kmem_cache_shrink(rcl);
    m.kmem_cache_shrink(un);
    assert_eq!(meminfo_kb(&m, "SReclaimable"), r0);
    assert_eq!(meminfo_kb(&m, "SUnreclaim"), u0);
    destroy(&m, rcl);
    destroy(&m, un);
}

// ------------------------------------------------------------------------------- bad input

/// Runs `bad`, which must be reported once (the log mentioning `what`) and change nothing
/// in `c`'s counters or the machine's free memory.
fn assert_bad_free(m: &Machine, c: &KmemCache, what: &str, bad: impl FnOnce()) {
    m.platform().take_log();
    let reports = m.bad_page_reports();
    let before = (
        c.total_objects(),
        c.free_objects(),
        in_use(m, c),
        c.nr_slabs(),
    );
    bad();
    let text = log(m);
    assert!(text.contains(what), "{what:?} reported\n{text}");
    assert_eq!(m.bad_page_reports(), reports + 1, "{what}: counted once");
    let after = (
        c.total_objects(),
        c.free_objects(),
        in_use(m, c),
        c.nr_slabs(),
    );
    assert_eq!(after, before, "{what}: nothing changed");
    m.validate().expect("validate after a bad free");
}

/// Freeing an object to the wrong cache, a pointer into an object, a pointer that is not
/// from a slab, or an object twice in a row: each is reported and ignored; later
/// allocations never overlap live objects.
#[test]
fn bad_frees_are_reported_and_ignored() {
    let m = machine();
    let boot_areas = areas(&m);
    let a = create(&m, "cache-a", 100, 0, SlabFlags::NO_MERGE, None);
    let b = create(&m, "cache-b", 300, 0, SlabFlags::NO_MERGE, None);
    let mut live: Vec<*mut u8> = (0..30).map(|_| alloc(&m, a)).collect();
    for (k, &p) in live.iter().enumerate() {
        write_pat(p, 100, k);
    }
    let p = live[7];

    assert_bad_free(&m, a, "Wrong slab cache", || free(&m, b, p));
    assert_bad_free(&m, a, "cache-a", || free(&m, b, p));
    // Pointers into an object are not objects: the frees are rejected.
    let inside = p.wrapping_add(8);
    assert_bad_free(&m, a, "kmem_cache_free", || free(&m, a, inside));
    let inside = p.wrapping_add(1);
    assert_bad_free(&m, a, "kmem_cache_free", || free(&m, a, inside));
    let page = m.__get_free_page(GFP_KERNEL).unwrap();
    assert_bad_free(&m, a, "kmem_cache_free", || free(&m, a, page.as_ptr()));
    // SAFETY: `page` came from __get_free_page and is not used again.
    unsafe { m.free_page(page) };
    let mut local = [0u8; 64];
    assert_bad_free(&m, a, "kmem_cache_free", || free(&m, a, local.as_mut_ptr()));
    // A kmalloc object is not an object of `a` either.
    let k = m.kmalloc(100, GFP_KERNEL).unwrap().as_ptr();
    assert_bad_free(&m, a, "Wrong slab cache", || free(&m, a, k));
    // SAFETY: `k` came from kmalloc above.
    unsafe { m.kfree(k) };

    for (k, &p) in live.iter().enumerate() {
        check_pat(p, 100, k);
    }

    // A double free: the second free is reported and dropped.
    let victim = live.swap_remove(3);
    free(&m, a, victim);
    assert_bad_free(&m, a, "double free", || free(&m, a, victim));
    let x = alloc(&m, a);
    let y = alloc(&m, a);
    assert_ne!(x, y, "an object is handed out once");
    live.push(x);
    live.push(y);

    // Later allocations never overlap live objects.
    for _ in 0..300 {
        live.push(alloc(&m, a));
    }
    let ranges: Vec<_> = live.iter().map(|&p| (p as usize, 100)).collect();
    assert_disjoint(&ranges);
    m.validate().unwrap();
    for p in live {
        free(&m, a, p);
    }
    destroy(&m, a);
    destroy(&m, b);
    assert_back_to_boot(&m, &boot_areas);
}

/// A cache of size 0, above the maximum, or with an alignment that is not a power of two
/// is not created, and the failure is reported.
#[test]
fn bad_create_fails_with_a_report() {
    let m = machine();
    m.drain_all_pages();
    let free0 = m.nr_free_pages();
    for (size, align) in [(0usize, 0usize), (64, 3), (64, 24), (usize::MAX / 2, 0)] {
        assert!(
            m.kmem_cache_create("bad", size, align, SlabFlags::NONE, None)
                .is_none(),
            "size {size} align {align} refused"
        );
        let text = log(&m);
        assert!(
            text.contains("kmem_cache_create(bad) failed"),
            "size {size} align {align}: reported\n{text}"
        );
    }
    let args = KmemCacheArgs {
        align: 3,
        ..KmemCacheArgs::default()
    };
    assert!(
        m.kmem_cache_create_args("bad", 64, &args, SlabFlags::NONE)
            .is_none()
    );
    assert!(log(&m).contains("failed"));
    assert!(!m.proc_slabinfo().contains("bad "), "not listed");
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), free0, "nothing allocated");
}

/// When the page allocator falls back to a smaller slab than the cache's order (memory is
/// fragmented), the slab holds fewer objects; a free of an address past its last object
/// must be rejected like any pointer that is not an object.
#[test]
fn free_past_the_end_of_a_fallback_slab_is_rejected() {
    let m = boot(MachineConfig::x86_64(32 * MIB));
    let c = create(&m, "frag", 1000, 0, SlabFlags::NO_MERGE, None);
    assert!(
        c.order() > 0,
        "premise: the cache's slabs are order {}",
        c.order()
    );
    // Fragment memory: every page taken, then every other one given back.
    let pages = take_all_pages(&m);
    let (even, odd): (Vec<&Page>, Vec<&Page>) =
        pages.into_iter().partition(|p| m.page_to_pfn(p).0 % 2 == 0);
    release(&m, even.into_iter().map(|p| (p, 0)).collect());
    m.drain_all_pages();
    let p = m
        .kmem_cache_alloc(c, GFP_NOWAIT | __GFP_NOWARN)
        .expect("an order-0 slab")
        .as_ptr();
    let head = head_page(&m, p);
    assert_eq!(head.order(), 0, "premise: a fallback slab");
    let per = PAGE_SIZE / c.size();
    assert!(per < c.objects_per_slab());
    let base = m.page_address(head).unwrap().as_ptr();
    assert!(
        per * c.size() + c.size() > PAGE_SIZE,
        "premise: no room for another"
    );
    // SAFETY: the address stays inside the slab's page; it is only passed to a free that must
    // reject it.
    let past = unsafe { base.add(per * c.size()) };
    assert_bad_free(&m, c, "kmem_cache_free", || free(&m, c, past));
    free(&m, c, p);
    release(&m, odd.into_iter().map(|p| (p, 0)).collect());
    destroy(&m, c);
}

/// `kmem_cache_shrink` reports the pages it gave back, also for slabs smaller than the
/// cache's order (made when memory was fragmented).
#[test]
fn shrink_counts_the_pages_of_fallback_slabs() {
    let m = boot(MachineConfig::x86_64(32 * MIB));
    let c = create(&m, "frag2", 1000, 0, SlabFlags::NO_MERGE, None);
    assert!(c.order() > 0);
    let pages = take_all_pages(&m);
    let (even, odd): (Vec<&Page>, Vec<&Page>) =
        pages.into_iter().partition(|p| m.page_to_pfn(p).0 % 2 == 0);
    release(&m, even.into_iter().map(|p| (p, 0)).collect());
    m.drain_all_pages();
    let p = m
        .kmem_cache_alloc(c, GFP_NOWAIT | __GFP_NOWARN)
        .unwrap()
        .as_ptr();
    assert_eq!(head_page(&m, p).order(), 0, "premise: a fallback slab");
    assert_eq!(c.nr_slabs(), 1);
    free(&m, c, p);
    m.drain_all_pages();
    let before = m.nr_free_pages();
    let freed = m.kmem_cache_shrink(c);
    m.drain_all_pages();
    let gained = m.nr_free_pages() - before;
    assert_eq!(gained, 1, "one page went back");
    assert_eq!(freed, gained, "kmem_cache_shrink says {freed}");
    release(&m, odd.into_iter().map(|p| (p, 0)).collect());
    destroy(&m, c);
}

// ------------------------------------------------------------------------------- shrinker

/// Under memory pressure, a GFP_KERNEL page allocation that needs the memory held by empty
/// slabs succeeds: direct reclaim runs the slab shrinker (registered at boot), which gives
/// the empty slabs back.
#[test]
fn shrinker_gives_empty_slabs_back_under_pressure() {
    let mut cfg = MachineConfig::x86_64(16 << 20);
    cfg.kmem.reclaim_retries = 1;
    cfg.kmem.reclaim_wait_ns = 1_000_000;
    let m = boot(cfg);
    let boot_areas = areas(&m);
    let c = create(&m, "pressure", 4096, 0, SlabFlags::NO_MERGE, None);
    let objs = alloc_n(&m, c, 600);
    free_all(&m, c, objs);
    let cached = c.nr_slabs() << c.order();
    assert!(
        cached >= 8,
        "premise: empty slabs stay cached ({cached} pages)"
    );

    // Take everything GFP_NOWAIT may take (down to the min watermark), with nothing left on
    // the per-CPU lists.
    let mut held = Vec::new();
    loop {
        while let Some(p) = m.alloc_pages(GFP_NOWAIT | __GFP_NOWARN, 0) {
            held.push((p, 0));
        }
        if m.drain_all_pages() == 0 {
            break;
        }
    }
    assert!(m.alloc_pages(GFP_NOWAIT | __GFP_NOWARN, 0).is_none());
    m.platform().take_log();

    // Without the slabs' pages, these would fail (or go to the OOM reserve).
    for i in 0..cached {
        let p = m
            .alloc_pages(GFP_KERNEL | __GFP_NOWARN, 0)
            .unwrap_or_else(|| panic!("GFP_KERNEL page {i} of {cached} failed"));
        held.push((p, 0));
    }
    assert_eq!(c.nr_slabs(), 0, "the shrinker emptied the cache");
    let text = log(&m);
    assert!(!text.contains("oom-killer"), "no OOM\n{text}");
    release(&m, held);
    destroy(&m, c);
    assert_back_to_boot(&m, &boot_areas);
}

// ------------------------------------------------------------------------------- slabinfo

/// One parsed line of `/proc/slabinfo`.
#[derive(Debug, Clone, PartialEq)]
struct SlabLine {
    name: String,
    active: usize,
    num: usize,
    objsize: usize,
    per_slab: usize,
    pages_per_slab: usize,
    active_slabs: usize,
    num_slabs: usize,
}

fn parse_slabinfo(text: &str) -> Vec<SlabLine> {
    let mut out = Vec::new();
    for line in text.lines().skip(2) {
        let w: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(w.len(), 16, "16 fields: {line:?}");
        let n = |i: usize| -> usize {
            w[i].parse()
                .unwrap_or_else(|_| panic!("field {i} of {line:?} is a number"))
        };
        assert_eq!(&w[6..10], [":", "tunables", "0", "0"], "{line:?}");
        assert_eq!(&w[10..13], ["0", ":", "slabdata"], "{line:?}");
        assert_eq!(w[15], "0", "sharedavail: {line:?}");
        let l = SlabLine {
            name: w[0].to_owned(),
            active: n(1),
            num: n(2),
            objsize: n(3),
            per_slab: n(4),
            pages_per_slab: n(5),
            active_slabs: n(13),
            num_slabs: n(14),
        };
        assert!(l.active <= l.num, "active_objs <= num_objs: {line:?}");
        assert_eq!(l.num, l.per_slab * l.num_slabs, "num_objs: {line:?}");
        assert_eq!(l.active_slabs, l.num_slabs, "{line:?}");
        assert!(l.pages_per_slab.is_power_of_two(), "{line:?}");
        assert!(
            l.per_slab * l.objsize <= l.pages_per_slab * PAGE_SIZE,
            "{line:?}"
        );
        out.push(l);
    }
    out
}

fn slab_line(m: &Machine, name: &str) -> SlabLine {
    parse_slabinfo(&m.proc_slabinfo())
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("{name} in slabinfo"))
}

/// `/proc/slabinfo` has Linux's 2.1 header, every line parses, the kmalloc caches are
/// listed, and a new cache shows its object size and slab shape; its counts follow
/// allocations and frees.
#[test]
fn slabinfo_lists_caches_in_linux_format() {
    let sample = std::fs::read_to_string(format!(
        "{}/../../testdata/proc-samples/slabinfo",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("the slabinfo sample");
    let m = machine();
    let text = m.proc_slabinfo();
    let head: Vec<&str> = text.lines().take(2).collect();
    let want: Vec<&str> = sample.lines().take(2).collect();
    assert_eq!(head, want, "header lines");
    let lines = parse_slabinfo(&text);
    for name in [
        "kmalloc-8",
        "kmalloc-96",
        "kmalloc-192",
        "kmalloc-8k",
        "kmalloc-rcl-64",
        "dma-kmalloc-1k",
    ] {
        let l = lines
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("{name} listed"));
        assert_eq!(l.num, 0, "{name}: no slab after boot");
    }

    let c = create(&m, "my_cache", 100, 0, SlabFlags::NO_MERGE, None);
    let l = slab_line(&m, "my_cache");
    assert_eq!(l.objsize, c.size());
    assert!(l.objsize >= 100);
    assert_eq!(l.per_slab, c.objects_per_slab());
    assert_eq!(l.pages_per_slab, 1 << c.order());
    assert_eq!((l.active, l.num, l.num_slabs), (0, 0, 0));

    let n = 3 * c.objects_per_slab() + 1;
    let objs = alloc_n(&m, c, n);
    let l = slab_line(&m, "my_cache");
    assert_eq!(l.num_slabs, c.nr_slabs());
    assert!(l.num_slabs >= 4);
    assert!(l.active >= n, "active {} >= {n}", l.active);
    assert!(l.active <= n + c.sheaf_objects(m.nr_cpus()) + c.barn_objects());
    free_all(&m, c, objs);
    let l = slab_line(&m, "my_cache");
    assert!(
        l.active <= c.sheaf_objects(m.nr_cpus()) + c.barn_objects(),
        "freed: {l:?}"
    );
    m.kmem_cache_shrink(c);
    let l = slab_line(&m, "my_cache");
    assert_eq!((l.active, l.num, l.num_slabs), (0, 0, 0));
    parse_slabinfo(&m.proc_slabinfo());
    destroy(&m, c);
    assert!(!m.proc_slabinfo().contains("my_cache"), "destroyed: gone");
}

/// An alignment no slab can honour (above the largest block, 4 MiB) makes the create fail
/// with a report, as Linux's `calculate_sizes` does; the largest one that fits works.
#[test]
fn create_with_an_unservable_alignment_fails() {
    let m = machine();
    let c = create(&m, "align-4m", 8, 4 << 20, SlabFlags::NO_MERGE, None);
    let p = alloc(&m, c);
    assert_eq!(p as usize % (4 << 20), 0);
    free(&m, c, p);
    destroy(&m, c);
    let c = m.kmem_cache_create("align-8m", 8, 8 << 20, SlabFlags::NO_MERGE, None);
    let text = log(&m);
    if let Some(c) = c {
        let p = m.kmem_cache_alloc(c, GFP_KERNEL | __GFP_NOWARN);
        panic!(
            "created a cache of order {} whose allocations fail ({p:?})",
            c.order()
        );
    }
    assert!(
        text.contains("kmem_cache_create(align-8m) failed"),
        "{text}"
    );
}

/// `kfree` frees an object of any cache, not only kmalloc's (as Linux allows since 6.4).
#[test]
fn kfree_frees_objects_of_any_cache() {
    let m = machine();
    let c = create(&m, "kfreeable", 300, 0, SlabFlags::NO_MERGE, None);
    let objs = alloc_n(&m, c, 50);
    assert_eq!(in_use(&m, c), 50);
    assert!(m.ksize(objs[0]) >= 300);
    for p in objs {
        // SAFETY: `p` is a live object of `c`, not used again.
        unsafe { m.kfree(p) };
    }
    assert_eq!(in_use(&m, c), 0);
    assert!(m.platform().take_log().is_empty());
    destroy(&m, c);
}

// ------------------------------------------------------------------------------- more flags, args

/// `kmem_cache_create_args` honours `sheaf_capacity`: a CPU's sheaf never holds more, and
/// caches with tiny or large sheaves allocate and free correctly.
#[test]
fn sheaf_capacity_is_honoured() {
    let m = machine();
    let boot_areas = areas(&m);
    for cap in [1usize, 2, 7, 31, 127, 1000] {
        let args = KmemCacheArgs {
            sheaf_capacity: cap,
            ..KmemCacheArgs::default()
        };
        let c = m
            .kmem_cache_create_args("sheaves", 128, &args, SlabFlags::NO_MERGE)
            .expect("create");
        let mut objs = Vec::new();
        for k in 0..500 {
            let p = alloc(&m, c);
            write_pat(p, 128, k);
            objs.push(p);
            assert!(
                c.sheaf_objects(m.nr_cpus()) <= cap.min(kmem::slab::sheaf::SHEAF_MAX) * m.nr_cpus()
            );
        }
        let ranges: Vec<_> = objs.iter().map(|&p| (p as usize, 128)).collect();
        assert_disjoint(&ranges);
        for (k, &p) in objs.iter().enumerate() {
            check_pat(p, 128, k);
            free(&m, c, p);
            assert!(
                c.sheaf_objects(m.nr_cpus()) <= cap.min(kmem::slab::sheaf::SHEAF_MAX) * m.nr_cpus(),
                "capacity {cap}: sheaf holds {}",
                c.sheaf_objects(m.nr_cpus())
            );
        }
        assert_eq!(in_use(&m, c), 0);
        m.validate().unwrap();
        destroy(&m, c);
    }
    assert_back_to_boot(&m, &boot_areas);
}

/// `SLAB_TYPESAFE_BY_RCU`: a freed object keeps its contents (the allocator stores nothing
/// in it, so RCU readers still see an object of the type), and the cache never merges.
#[test]
fn typesafe_by_rcu_objects_keep_their_contents_when_freed() {
    let m = machine();
    let c = create(&m, "rcu", 64, 0, SlabFlags::TYPESAFE_BY_RCU, None);
    let k64 = m.kmalloc_caches().cache(KmallocType::Normal, 6).unwrap();
    assert!(!std::ptr::eq(c, k64), "not merged with kmalloc-64");
    // More objects than a CPU's sheaf and the barn hold together.
    let n = (1 + kmem::slab::sheaf::BARN_SHEAVES) * kmem::slab::sheaf::SHEAF_MAX + 300;
    let objs = alloc_n(&m, c, n);
    for (k, &p) in objs.iter().enumerate() {
        write_pat(p, 64, k);
    }
    // Enough frees that sheaves flush objects back onto their slabs' free chains.
    free_all(&m, c, objs.iter().copied());
    assert!(
        c.free_objects() > 0,
        "premise: objects are back in their slabs"
    );
    for (k, &p) in objs.iter().enumerate() {
        // Reading a freed object of a SLAB_TYPESAFE_BY_RCU cache is what RCU readers do.
        check_pat(p, 64, k);
    }
    m.kmem_cache_shrink(c);
    assert_eq!(c.nr_slabs(), 0);
    destroy(&m, c);
}

/// `SLAB_PANIC`: a failed create panics, as in Linux.
#[test]
#[should_panic(expected = "kmem_cache_create")]
fn slab_panic_makes_a_failed_create_panic() {
    let m = machine();
    let _ = m.kmem_cache_create("doomed", 0, 0, SlabFlags::PANIC, None);
}

static CTOR_MACHINE: std::sync::atomic::AtomicPtr<Machine> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static CTOR_ALLOCATED: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// A constructor that allocates: it stores a kmalloc'd buffer's address in the object.
fn allocating_ctor(p: *mut u8) {
    let m = CTOR_MACHINE.load(Relaxed);
    // SAFETY: the test publishes its machine before creating the cache and keeps it alive
    // until the cache is destroyed.
    let m = unsafe { &*m };
    let buf = m.kmalloc(32, GFP_KERNEL).expect("kmalloc in a constructor");
    CTOR_ALLOCATED.lock().unwrap().push(buf.as_ptr() as usize);
    // SAFETY: `p` is a fresh object of the cache (16 bytes, 8-aligned).
    unsafe { p.cast::<usize>().write(buf.as_ptr() as usize) };
}

/// Constructors run with no slab lock held, so a constructor may allocate (even from
/// kmalloc) without deadlocking.
#[test]
fn a_constructor_may_allocate() {
    let m = machine();
    let boot_areas = areas(&m);
    CTOR_MACHINE.store(&m as *const Machine as *mut Machine, Relaxed);
    let c = create(
        &m,
        "alloc-ctor",
        16,
        0,
        SlabFlags::NONE,
        Some(allocating_ctor),
    );
    let objs: Vec<_> = (0..3 * c.objects_per_slab())
        .map(|_| alloc(&m, c))
        .collect();
    let made = CTOR_ALLOCATED.lock().unwrap().clone();
    assert_eq!(made.len(), c.objects_per_slab() * c.nr_slabs());
    for &p in &objs {
        // SAFETY: `p` is a live, constructed object of 16 bytes.
        let buf = unsafe { p.cast::<usize>().read() };
        assert!(
            made.contains(&buf),
            "the object holds its constructor's buffer"
        );
        assert!(m.ksize(buf as *const u8) >= 32);
    }
    free_all(&m, c, objs);
    destroy(&m, c);
    for buf in CTOR_ALLOCATED.lock().unwrap().drain(..) {
        // SAFETY: each buffer came from kmalloc in the constructor and is not used again.
        unsafe { m.kfree(buf as *mut u8) };
    }
    CTOR_MACHINE.store(std::ptr::null_mut(), Relaxed);
    assert!(m.platform().take_log().is_empty());
    assert_back_to_boot(&m, &boot_areas);
}
