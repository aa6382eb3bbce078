//! Model-based property tests of the slab layer and kmalloc.
//!
//! Random sequences of operations run on a small machine (x86_64, 64 MiB, 4 CPUs):
//!
//! * `kmem_cache_create` of sizes `1..=4096`, alignments 0/8/16/64/256, with or without a
//!   constructor, flags among none, `SLAB_HWCACHE_ALIGN`, `SLAB_RECLAIM_ACCOUNT`,
//!   `SLAB_NO_MERGE` (so caches merge with each other and with the kmalloc caches);
//! * `kmem_cache_alloc` / `kmem_cache_zalloc`, `kmalloc` / `kzalloc` of sizes `1..=20000`
//!   (slab classes and large kmallocs), bulk allocations and frees;
//! * frees of random live objects (`kmem_cache_free`, `kfree`), `kmem_cache_shrink`, and
//!   `kmem_cache_destroy`.
//!
//! Every operation is checked against a model, the set of live objects
//! `address -> (length, pattern, origin)`:
//!
//! * no two live objects overlap (byte ranges `[p, p + size)`; `ksize` bytes for kmalloc);
//! * each object's contents (a pattern written at allocation) are intact until it is freed;
//! * objects are aligned as asked (at least 8 bytes; a cache line with `SLAB_HWCACHE_ALIGN`
//!   above 32 bytes; power-of-two kmallocs naturally);
//! * zeroing allocations read zero; objects of a cache with a constructor are handed out in
//!   their constructed state (the model restores that state before freeing, as the API
//!   requires);
//! * a bulk allocation gives all its objects or none;
//! * `kmem_cache_destroy` of a cache whose last creator still has live objects returns
//!   false and reports "Objects remaining"; otherwise it succeeds;
//! * every 16 operations `validate()` passes and each live object's ends are checked;
//! * at the end, with everything freed, every created cache destroyed, the kmalloc caches
//!   shrunk and the per-CPU lists drained, `nr_free_pages == boot_free_pages()` and the
//!   buddyinfo numbers equal those right after boot, and nothing was reported.
//!
//! `PROPTEST_CASES` overrides the number of cases (64 by default). Failing cases are not
//! persisted to files; proptest prints the minimal sequence.

mod common;
use std::collections::BTreeMap;
use std::sync::LazyLock;

use kmem::addr::{NR_PAGE_ORDERS, Pfn, VirtAddr};
use kmem::gfp::*;
use kmem::kmalloc::{KmallocType, NR_KMALLOC_INDEX};
use kmem::page_alloc::page::pg;
use kmem::slab::{KmemCache, SlabFlags};
use kmem_hosted::{Machine, MachineConfig};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const MAX_KMALLOC: usize = 20_000;
/// What a constructor writes at the start of each object (its first 8 bytes).
const CTOR_MAGIC: [u8; 8] = *b"CtOrMaGi";
/// Tolerates the known merge bug (see `merged_cache_serves_the_larger_creator` in
/// `slab_rules.rs`): a merged cache's object size stays the first creator's, so a zeroing
/// allocation may clear only `kmem_cache_size` bytes of a larger creator's object. Set to
/// `true` to check the whole requested size.
const STRICT_MERGED_ZALLOC: bool = true;

/// A byte sequence long enough for every object and every pattern offset: an object's
/// pattern is `PATTERN[tag % 251..][..len]`, written and compared with `memcpy`/`memcmp`.
static PATTERN: LazyLock<Vec<u8>> = LazyLock::new(|| {
    (0..MAX_KMALLOC * 2 + 512)
        .map(|i| ((i * 7 + i / 251) % 253) as u8 | 1)
        .collect()
});
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

fn ctor(p: *mut u8) {
    // SAFETY: the slab layer passes a fresh object; every slot is at least 8 bytes (the
    // minimum object size), and caches with a constructor keep their free pointer past the
    // object, so the first 8 bytes of the slot belong to the object.
    unsafe { p.copy_from_nonoverlapping(CTOR_MAGIC.as_ptr(), 8) };
}

// ------------------------------------------------------------------------------ operations

#[derive(Clone, Copy, Debug)]
enum Flag {
    None,
    HwcacheAlign,
    ReclaimAccount,
    NoMerge,
}

impl Flag {
    fn flags(self) -> SlabFlags {
        match self {
            Flag::None => SlabFlags::NONE,
            Flag::HwcacheAlign => SlabFlags::HWCACHE_ALIGN,
            Flag::ReclaimAccount => SlabFlags::RECLAIM_ACCOUNT,
            Flag::NoMerge => SlabFlags::NO_MERGE,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        size: usize,
        align: usize,
        ctor: bool,
        flag: Flag,
    },
    /// Allocates from the `cache % n`-th live cache handle.
    Alloc {
        cache: usize,
        zero: bool,
    },
    Kmalloc {
        size: usize,
        zero: bool,
    },
    /// Frees the `which % n`-th live object.
    Free {
        which: usize,
    },
    AllocBulk {
        cache: usize,
        n: usize,
    },
    /// Frees up to `n` objects of one cache handle with `kmem_cache_free_bulk`.
    FreeBulk {
        cache: usize,
        n: usize,
    },
    Shrink {
        cache: usize,
    },
    Destroy {
        cache: usize,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let create = (
        1usize..=4096,
        prop::sample::select(vec![0usize, 8, 16, 64, 256]),
        prop::bool::weighted(0.3),
        prop::sample::select(vec![
            Flag::None,
            Flag::HwcacheAlign,
            Flag::ReclaimAccount,
            Flag::NoMerge,
        ]),
    )
        .prop_map(|(size, align, ctor, flag)| Op::Create {
            size,
            align,
            ctor,
            flag,
        });
    let kmalloc_size = prop_oneof![
        8 => 1usize..=8192,
        1 => 8193usize..=MAX_KMALLOC,
    ];
    prop_oneof![
        3 => create,
        25 => (any::<usize>(), prop::bool::weighted(0.25))
            .prop_map(|(cache, zero)| Op::Alloc { cache, zero }),
        12 => (kmalloc_size, prop::bool::weighted(0.25))
            .prop_map(|(size, zero)| Op::Kmalloc { size, zero }),
        30 => any::<usize>().prop_map(|which| Op::Free { which }),
        3 => (any::<usize>(), 1usize..=40).prop_map(|(cache, n)| Op::AllocBulk { cache, n }),
        3 => (any::<usize>(), 1usize..=40).prop_map(|(cache, n)| Op::FreeBulk { cache, n }),
        2 => any::<usize>().prop_map(|cache| Op::Shrink { cache }),
        2 => any::<usize>().prop_map(|cache| Op::Destroy { cache }),
    ]
}

// ------------------------------------------------------------------------------ the model

/// A cache handle the test created (and has not destroyed).
struct Handle<'m> {
    c: &'m KmemCache,
    size: usize,
    align: usize,
    ctor: bool,
    flags: SlabFlags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// From the cache handle with this id.
    Cache(u64),
    Kmalloc,
}

#[derive(Clone, Copy, Debug)]
struct Obj {
    /// Bytes the model owns: the requested size (`ksize` for kmalloc).
    len: usize,
    tag: usize,
    origin: Origin,
    /// The cache owning the slab (its address), 0 for a large kmalloc.
    owner: usize,
    /// Bytes the allocator must zero on a zeroing allocation, and restore for a constructor.
    ctor: bool,
}

struct Harness<'m> {
    m: &'m Machine,
    /// Live handles by id.
    handles: BTreeMap<u64, Handle<'m>>,
    next_handle: u64,
    live: BTreeMap<usize, Obj>,
    next_tag: usize,
    boot_areas: Vec<[usize; NR_PAGE_ORDERS]>,
}

fn pattern(tag: usize, len: usize) -> &'static [u8] {
    &PATTERN[tag % 251..][..len]
}

#[allow(clippy::mut_from_ref)]
fn bytes<'a>(p: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: the harness only passes live objects it owns (checked against the model), at
    // least `len` bytes long; the slice is dropped before the object is freed.
    unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) }
}

impl<'m> Harness<'m> {
    fn new(m: &'m Machine) -> Harness<'m> {
        m.drain_all_pages();
        assert_eq!(m.nr_free_pages(), m.boot_free_pages(), "boot state");
        Harness {
            m,
            handles: BTreeMap::new(),
            next_handle: 0,
            live: BTreeMap::new(),
            next_tag: 1,
            boot_areas: m.free_area_counts(),
        }
    }

    fn handle_id(&self, k: usize) -> Option<u64> {
        if self.handles.is_empty() {
            return None;
        }
        self.handles.keys().nth(k % self.handles.len()).copied()
    }

    /// The slab owner of `p` (its cache's address), or 0 when `p` is not in a slab.
    fn owner(&self, p: usize) -> usize {
        let m = self.m;
        let mut page = m.virt_to_page(VirtAddr(p)).expect("a direct-map address");
        let mut pfn = m.page_to_pfn(page).0;
        while page.is_tail() {
            pfn -= 1;
            page = m.pfn_to_page(Pfn(pfn)).expect("RAM");
        }
        if page.state() & pg::SLAB != 0 {
            page.private()
        } else {
            0
        }
    }

    /// Takes a new object into the model: no overlap, alignment, zeroing or constructed
    /// state, then writes its pattern.
    fn adopt(
        &mut self,
        p: usize,
        len: usize,
        align: usize,
        origin: Origin,
        zero: usize,
        ctor: bool,
    ) {
        assert_ne!(p, 0);
        assert_eq!(
            p % align,
            0,
            "{p:#x} ({len} bytes, {origin:?}) not {align}-aligned"
        );
        if let Some((&q, o)) = self.live.range(..p + len).next_back() {
            assert!(
                q + o.len <= p,
                "new object {p:#x}+{len} overlaps live {q:#x}+{} ({:?})",
                o.len,
                o.origin
            );
        }
        if zero > 0 {
            assert!(
                bytes(p, zero) == &ZEROS[..zero],
                "zeroing allocation {p:#x} ({origin:?}) not zero in its first {zero} bytes"
            );
        } else if ctor {
            let n = len.min(8);
            assert_eq!(
                bytes(p, n),
                &CTOR_MAGIC[..n],
                "{p:#x}: not in its constructed state"
            );
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        bytes(p, len).copy_from_slice(pattern(tag, len));
        let owner = self.owner(p);
        if let Origin::Cache(id) = origin {
            assert_eq!(owner, self.handles[&id].c as *const KmemCache as usize);
        }
        self.live.insert(
            p,
            Obj {
                len,
                tag,
                origin,
                owner,
                ctor,
            },
        );
    }

    fn check(&self, p: usize, o: &Obj) {
        if bytes(p, o.len) != pattern(o.tag, o.len) {
            let b = bytes(p, o.len);
            let want = pattern(o.tag, o.len);
            let i = (0..o.len).find(|&i| b[i] != want[i]).unwrap();
            panic!(
                "live object {p:#x}+{} ({:?}) changed at byte {i}: {:#x}, expected {:#x}",
                o.len, o.origin, b[i], want[i]
            );
        }
    }

    /// Removes `p` from the model after checking it, and restores its constructed state.
    fn release(&mut self, p: usize) -> Obj {
        let o = self.live.remove(&p).expect("a live object");
        self.check(p, &o);
        if o.ctor {
            let n = o.len.min(8);
            bytes(p, n).copy_from_slice(&CTOR_MAGIC[..n]);
        }
        o
    }

    fn alignment(h: &Handle<'_>) -> usize {
        let mut a = h.align.max(8);
        if h.flags.contains(SlabFlags::HWCACHE_ALIGN) && h.size > 32 {
            a = a.max(64);
        }
        a
    }

    /// Bytes a zeroing allocation from `h` must clear.
    fn zero_len(h: &Handle<'_>) -> usize {
        if STRICT_MERGED_ZALLOC {
            h.size
        } else {
            h.size.min(h.c.object_size())
        }
    }

    fn step(&mut self, op: &Op) {
        let m = self.m;
        match *op {
            Op::Create {
                size,
                align,
                ctor: with_ctor,
                flag,
            } => {
                let name = format!("model-{}", self.next_handle);
                let flags = flag.flags();
                let c = m
                    .kmem_cache_create(
                        &name,
                        size,
                        align,
                        flags,
                        with_ctor.then_some(ctor as fn(*mut u8)),
                    )
                    .unwrap_or_else(|| panic!("create {name} ({size}, {align}, {flags:?})"));
                if with_ctor || flags.contains(SlabFlags::NO_MERGE) {
                    assert_eq!(c.name(), name, "never merged");
                    assert_eq!(c.refcount(), 1);
                    assert_eq!(m.kmem_cache_size(c), size);
                }
                assert!(c.size() >= size);
                self.handles.insert(
                    self.next_handle,
                    Handle {
                        c,
                        size,
                        align,
                        ctor: with_ctor,
                        flags,
                    },
                );
                self.next_handle += 1;
            }
            Op::Alloc { cache, zero } => {
                let Some(id) = self.handle_id(cache) else {
                    return;
                };
                let h = &self.handles[&id];
                let p = if zero {
                    m.kmem_cache_zalloc(h.c, GFP_KERNEL)
                } else {
                    m.kmem_cache_alloc(h.c, GFP_KERNEL)
                }
                .expect("cache allocation")
                .as_ptr() as usize;
                let (len, align, ctor) = (h.size, Self::alignment(h), h.ctor);
                // __GFP_ZERO on a cache with a constructor is reported and ignored: the
                // object comes in its constructed state.
                let z = if zero && !ctor { Self::zero_len(h) } else { 0 };
                if zero && ctor {
                    let log = m.platform().take_log().join("\n");
                    assert!(
                        log.contains("__GFP_ZERO on a cache with a constructor ignored"),
                        "zalloc on a constructed cache reported\n{log}"
                    );
                }
                self.adopt(p, len, align, Origin::Cache(id), z, ctor);
            }
            Op::Kmalloc { size, zero } => {
                let p = if zero {
                    m.kzalloc(size, GFP_KERNEL)
                } else {
                    m.kmalloc(size, GFP_KERNEL)
                }
                .expect("kmalloc")
                .as_ptr() as usize;
                let ks = m.ksize(p as *const u8);
                assert!(ks >= size, "ksize {ks} < {size}");
                if size >= 8 {
                    assert!(ks < 2 * size, "ksize {ks} for {size}");
                }
                let align = if size.is_power_of_two() {
                    size.max(8)
                } else {
                    8
                };
                self.adopt(
                    p,
                    ks,
                    align,
                    Origin::Kmalloc,
                    if zero { ks } else { 0 },
                    false,
                );
            }
            Op::Free { which } => {
                if self.live.is_empty() {
                    return;
                }
                let p = *self.live.keys().nth(which % self.live.len()).unwrap();
                let o = self.release(p);
                match o.origin {
                    // SAFETY: `p` is a live object of that handle's cache (the model says so),
                    // forgotten here.
                    Origin::Cache(id) => unsafe {
                        m.kmem_cache_free(self.handles[&id].c, p as *mut u8)
                    },
                    // SAFETY: `p` is a live kmalloc allocation, forgotten here.
                    Origin::Kmalloc => unsafe { m.kfree(p as *mut u8) },
                }
            }
            Op::AllocBulk { cache, n } => {
                let Some(id) = self.handle_id(cache) else {
                    return;
                };
                let h = &self.handles[&id];
                let mut out = vec![std::ptr::null_mut(); n];
                assert_eq!(
                    m.kmem_cache_alloc_bulk(h.c, GFP_KERNEL, &mut out),
                    n,
                    "bulk of {n}"
                );
                let (len, align, ctor) = (h.size, Self::alignment(h), h.ctor);
                for p in out {
                    self.adopt(p as usize, len, align, Origin::Cache(id), 0, ctor);
                }
            }
            Op::FreeBulk { cache, n } => {
                let Some(id) = self.handle_id(cache) else {
                    return;
                };
                let ps: Vec<usize> = self
                    .live
                    .iter()
                    .filter(|(_, o)| o.origin == Origin::Cache(id))
                    .map(|(&p, _)| p)
                    .take(n)
                    .collect();
                for &p in &ps {
                    self.release(p);
                }
                let ptrs: Vec<*mut u8> = ps.iter().map(|&p| p as *mut u8).collect();
                // SAFETY: every pointer is a live object of the handle's cache, forgotten here.
                unsafe { m.kmem_cache_free_bulk(self.handles[&id].c, &ptrs) };
            }
            Op::Shrink { cache } => {
                let Some(id) = self.handle_id(cache) else {
                    return;
                };
                let c = self.handles[&id].c;
                m.kmem_cache_shrink(c);
                let addr = c as *const KmemCache as usize;
                let objs = self.live.values().filter(|o| o.owner == addr).count();
                if objs == 0 {
                    assert_eq!(c.nr_slabs(), 0, "{}: shrunk empty", c.name());
                } else {
                    assert!(c.total_objects() - c.free_objects() >= objs);
                }
            }
            Op::Destroy { cache } => {
                let Some(id) = self.handle_id(cache) else {
                    return;
                };
                self.destroy(id);
            }
        }
    }

    fn destroy(&mut self, id: u64) {
        let m = self.m;
        let c = self.handles[&id].c;
        let addr = c as *const KmemCache as usize;
        let mine = self
            .live
            .values()
            .filter(|o| o.origin == Origin::Cache(id))
            .count();
        let in_cache = self.live.values().filter(|o| o.owner == addr).count();
        let refs = c.refcount();
        if mine > 0 && refs > 1 {
            // Destroying an alias that still has objects: a caller bug the allocator cannot
            // see; the model does not do it.
            return;
        }
        let name = c.name().to_owned();
        m.platform().take_log();
        // SAFETY: when this returns true, the handle is dropped below and not used again.
        let ok = unsafe { m.kmem_cache_destroy(c) };
        let log = m.platform().take_log().join("\n");
        if refs == 1 && in_cache > 0 {
            assert!(
                !ok,
                "{name}: destroy with {in_cache} live objects returns false"
            );
            assert!(
                log.contains(&format!(
                    "Objects remaining in {name} on __kmem_cache_shutdown()"
                )),
                "{name}: reported\n{log}"
            );
            let listed = log.lines().filter(|l| l.starts_with("Object 0x")).count();
            assert_eq!(
                listed,
                in_cache.min(64),
                "{name}: live objects listed\n{log}"
            );
            for (&p, o) in &self.live {
                if o.owner == addr {
                    self.check(p, o);
                }
            }
        } else {
            assert!(ok, "{name}: destroy succeeds\n{log}");
            assert!(log.is_empty(), "{name}: no report\n{log}");
            self.handles.remove(&id);
        }
    }

    /// Every 16 operations: the slab lists are consistent and live objects' ends intact.
    fn checkpoint(&self) {
        let m = self.m;
        m.validate().expect("validate");
        // Each cache's objects in use (out of its slabs, not in a CPU sheaf) are the model's.
        let mut caches: Vec<&KmemCache> = self.handles.values().map(|h| h.c).collect();
        for t in [KmallocType::Normal, KmallocType::Reclaim, KmallocType::Dma] {
            for i in 1..NR_KMALLOC_INDEX {
                caches.push(m.kmalloc_caches().cache(t, i).expect("kmalloc cache"));
            }
        }
        for c in caches {
            let addr = c as *const KmemCache as usize;
            let model = self.live.values().filter(|o| o.owner == addr).count();
            let in_use = c.objects_in_use(m.nr_cpus());
            assert_eq!(in_use, model, "{}: objects in use", c.name());
        }
        for (&p, o) in &self.live {
            let want = pattern(o.tag, o.len);
            let n = o.len.min(8);
            assert_eq!(&bytes(p, o.len)[..n], &want[..n], "{p:#x} head");
            assert_eq!(
                &bytes(p, o.len)[o.len - n..],
                &want[o.len - n..],
                "{p:#x} tail"
            );
        }
    }

    fn finish(mut self) {
        let m = self.m;
        let ps: Vec<usize> = self.live.keys().copied().collect();
        for p in ps {
            let o = self.release(p);
            match o.origin {
                // SAFETY: a live object of the handle's cache, forgotten here.
                Origin::Cache(id) => unsafe {
                    m.kmem_cache_free(self.handles[&id].c, p as *mut u8)
                },
                // SAFETY: a live kmalloc allocation, forgotten here.
                Origin::Kmalloc => unsafe { m.kfree(p as *mut u8) },
            }
        }
        let ids: Vec<u64> = self.handles.keys().copied().collect();
        for id in ids {
            self.destroy(id);
            assert!(!self.handles.contains_key(&id), "destroyed at the end");
        }
        for t in [KmallocType::Normal, KmallocType::Reclaim, KmallocType::Dma] {
            for i in 1..NR_KMALLOC_INDEX {
                let c = m.kmalloc_caches().cache(t, i).expect("kmalloc cache");
                m.kmem_cache_shrink(c);
                assert_eq!(c.nr_slabs(), 0, "{} empty", c.name());
            }
        }
        m.drain_all_pages();
        m.validate().expect("validate at the end");
        assert_eq!(m.nr_free_pages(), m.boot_free_pages(), "all memory back");
        assert_eq!(
            m.free_area_counts(),
            self.boot_areas,
            "buddyinfo as after boot"
        );
        assert_eq!(m.bad_page_reports(), 0);
        let log = m.platform().take_log();
        assert!(log.is_empty(), "reports: {log:#?}");
    }
}

fn run(ops: &[Op]) {
    let m = Machine::boot(MachineConfig::x86_64(64 * MIB)).expect("boot");
    m.platform().take_log();
    let mut h = Harness::new(&m);
    for (i, op) in ops.iter().enumerate() {
        h.step(op);
        if i % 16 == 15 {
            h.checkpoint();
        }
    }
    h.checkpoint();
    h.finish();
}

proptest! {
    #![proptest_config(common::proptest_config())]

    /// Random cache and kmalloc sequences agree with the model.
    #[test]
    fn slab_matches_model(ops in prop::collection::vec(op_strategy(), 1..300)) {
        run(&ops);
    }
}

/// A fixed sequence covering every operation: merged and unmerged caches, constructors,
/// a destroy refused for live objects, bulk operations, large kmallocs.
#[test]
fn fixed_sequence() {
    let mut ops = Vec::new();
    for (k, &(size, align, ctor, flag)) in [
        (200usize, 0usize, false, Flag::None),
        (196, 8, false, Flag::None),
        (64, 0, false, Flag::None),
        (120, 16, true, Flag::None),
        (1000, 256, false, Flag::HwcacheAlign),
        (33, 0, false, Flag::HwcacheAlign),
        (500, 64, false, Flag::ReclaimAccount),
        (4096, 0, false, Flag::NoMerge),
        (1, 0, true, Flag::NoMerge),
    ]
    .iter()
    .enumerate()
    {
        ops.push(Op::Create {
            size,
            align,
            ctor,
            flag,
        });
        for j in 0..20 {
            ops.push(Op::Alloc {
                cache: k,
                zero: j % 3 == 0,
            });
        }
        ops.push(Op::AllocBulk { cache: k, n: 33 });
    }
    for size in [1usize, 8, 100, 192, 4096, 8192, 8193, 16384, MAX_KMALLOC] {
        ops.push(Op::Kmalloc { size, zero: false });
        ops.push(Op::Kmalloc { size, zero: true });
    }
    for k in 0..9 {
        ops.push(Op::Destroy { cache: k });
        ops.push(Op::FreeBulk { cache: k, n: 40 });
        ops.push(Op::Shrink { cache: k });
    }
    for w in 0..200 {
        ops.push(Op::Free { which: w * 7 });
    }
    for k in 0..9 {
        ops.push(Op::Shrink { cache: k });
        ops.push(Op::Destroy { cache: k });
    }
    run(&ops);
}
