//! The typed layer (`kmem::boxed`) on a simulated machine: `KBox`, `KVec`, typed caches with
//! and without constructors, and `CacheBox`. Memory is checked to go back through the slab
//! counters (objects in use = total - free in slabs - free in CPU sheaves), failures to be
//! `Err` rather than panics, and alignment to hold for over-aligned types.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kmem::addr::PAGE_SIZE;
use kmem::boxed::{AllocError, CacheBox, Constructed, KBox, KVec, KmemCache};
use kmem::gfp::*;
use kmem::kmalloc::{KMALLOC_MAX_SIZE, KmallocType, kmalloc_index};
use kmem::slab::{self, SlabFlags};
use kmem_hosted::platform::HostedPlatform;
use kmem_hosted::{Machine, MachineConfig};

type Kb<'k, T> = KBox<'k, T, HostedPlatform>;
type Kv<'k, T> = KVec<'k, T, HostedPlatform>;
type Cache<'k, T> = KmemCache<'k, T, HostedPlatform>;

fn machine() -> Machine {
    Machine::boot(MachineConfig::x86_64(256 << 20)).unwrap()
}

/// Objects of `c` in use: in slabs, minus free in slabs, minus cached in CPU sheaves.
fn in_use(m: &Machine, c: &slab::KmemCache) -> usize {
    c.objects_in_use(m.nr_cpus())
}

/// Objects in use in the normal kmalloc cache serving `size`.
fn kmalloc_in_use(m: &Machine, size: usize) -> usize {
    let c = m
        .kmalloc_caches()
        .cache(KmallocType::Normal, kmalloc_index(size))
        .unwrap();
    in_use(m, c)
}

/// Objects in use over every normal kmalloc cache.
fn kmalloc_in_use_all(m: &Machine) -> usize {
    (1..kmem::kmalloc::NR_KMALLOC_INDEX)
        .map(|i| in_use(m, m.kmalloc_caches().cache(KmallocType::Normal, i).unwrap()))
        .sum()
}

/// Counts its drops in a shared counter.
#[derive(Debug)]
struct Counted<'a> {
    drops: &'a AtomicUsize,
    value: u64,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Relaxed);
    }
}

impl Clone for Counted<'_> {
    fn clone(&self) -> Self {
        Counted {
            drops: self.drops,
            value: self.value,
        }
    }
}

#[test]
fn kbox_of_plain_types() {
    let m = machine();
    let (b8, b128) = (kmalloc_in_use(&m, 8), kmalloc_in_use(&m, 100));
    let a = Kb::new(0xabu8, &m, GFP_KERNEL).unwrap();
    let b = Kb::new(0x0123_4567_89ab_cdefu64, &m, GFP_KERNEL).unwrap();
    let mut c = Kb::new([7u8; 100], &m, GFP_KERNEL).unwrap();
    c[99] = 9;
    assert_eq!((*a, *b, c[0], c[99]), (0xab, 0x0123_4567_89ab_cdef, 7, 9));
    assert_eq!(kmalloc_in_use(&m, 8), b8 + 2);
    assert_eq!(kmalloc_in_use(&m, 100), b128 + 1);
    assert_eq!(m.ksize(&*c as *const [u8; 100] as *const u8), 128);
    drop((a, b, c));
    assert_eq!(kmalloc_in_use(&m, 8), b8);
    assert_eq!(kmalloc_in_use(&m, 100), b128);
    m.validate().unwrap();
}

#[test]
fn kbox_drops_once_and_returns_memory() {
    let m = machine();
    let drops = AtomicUsize::new(0);
    let before = kmalloc_in_use(&m, size_of::<Counted>());
    let boxes: Vec<_> = (0..200)
        .map(|i| {
            let x = Counted {
                drops: &drops,
                value: i,
            };
            Kb::new(x, &m, GFP_KERNEL).unwrap()
        })
        .collect();
    assert_eq!(kmalloc_in_use(&m, size_of::<Counted>()), before + 200);
    assert!(boxes.iter().enumerate().all(|(i, b)| b.value == i as u64));
    assert_eq!(drops.load(Relaxed), 0);
    drop(boxes);
    assert_eq!(drops.load(Relaxed), 200);
    assert_eq!(kmalloc_in_use(&m, size_of::<Counted>()), before);
    // into_inner moves out without a drop, then frees.
    let b = Kb::new(
        Counted {
            drops: &drops,
            value: 5,
        },
        &m,
        GFP_KERNEL,
    )
    .unwrap();
    let x = KBox::into_inner(b);
    assert_eq!((x.value, drops.load(Relaxed)), (5, 200));
    assert_eq!(kmalloc_in_use(&m, size_of::<Counted>()), before);
    drop(x);
    assert_eq!(drops.load(Relaxed), 201);
}

#[repr(align(16))]
struct A16(#[allow(dead_code)] u8);

#[repr(align(64))]
struct A64 {
    bytes: [u8; 130], // size 192: kmalloc-192 is only 8-aligned by contract
}

#[repr(align(4096))]
struct A4k(u8);

#[test]
fn kbox_over_aligned() {
    let m = machine();
    assert_eq!(size_of::<A64>(), 192);
    let mut keep = Vec::new();
    for i in 0..64u8 {
        let a = Kb::new(A16(i), &m, GFP_KERNEL).unwrap();
        assert_eq!(&*a as *const A16 as usize % 16, 0);
        let b = Kb::new(A64 { bytes: [i; 130] }, &m, GFP_KERNEL).unwrap();
        let pb = &*b as *const A64 as usize;
        assert_eq!(pb % 64, 0, "A64 at {pb:#x}");
        // Rounded up to a power of two (naturally aligned by kmalloc).
        assert_eq!(m.ksize(pb as *const u8), 256);
        let c = Kb::new(A4k(i), &m, GFP_KERNEL).unwrap();
        assert_eq!(&*c as *const A4k as usize % 4096, 0);
        keep.push((a, b, c));
    }
    for (i, (_, b, c)) in keep.iter().enumerate() {
        assert!(b.bytes.iter().all(|&x| x == i as u8));
        assert_eq!(c.0, i as u8);
    }
    drop(keep);
    m.validate().unwrap();
}

#[test]
fn kbox_zero_sized() {
    #[repr(align(64))]
    struct Z64;
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct ZDrop;
    impl Drop for ZDrop {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Relaxed);
        }
    }
    let m = machine();
    let before = kmalloc_in_use_all(&m);
    let bad = m.bad_page_reports();
    {
        let unit = Kb::new((), &m, GFP_KERNEL).unwrap();
        let z = Kb::new(Z64, &m, GFP_KERNEL).unwrap();
        assert_eq!(&*z as *const Z64 as usize % 64, 0);
        let d = Kb::new(ZDrop, &m, GFP_KERNEL).unwrap();
        assert_eq!(kmalloc_in_use_all(&m), before);
        let raw = KBox::into_raw(d);
        // SAFETY: `raw` came from `into_raw` of a box of `m` just above.
        let d = unsafe { Kb::from_raw(raw, &m) };
        drop((unit, z, d));
    }
    assert_eq!(DROPS.load(Relaxed), 1);
    assert_eq!(kmalloc_in_use_all(&m), before);
    assert_eq!(m.bad_page_reports(), bad, "a ZST box freed something");
}

#[test]
fn kbox_raw_pin_uninit_and_formatting() {
    let m = machine();
    let b = Kb::new(41u32, &m, GFP_KERNEL).unwrap();
    assert_eq!(format!("{b} {b:?}"), "41 41");
    let raw = KBox::into_raw(b);
    assert_eq!(m.ksize(raw as *const u8), 8);
    // SAFETY: `raw` is live kmalloc memory owned by us, holding a u32.
    unsafe { *raw += 1 };
    // SAFETY: `raw` came from `into_raw` of a box of `m`, and is not used afterwards.
    let b = unsafe { Kb::from_raw(raw, &m) };
    assert_eq!(*b, 42);
    assert!(std::ptr::eq(KBox::kmem(&b), m.kmem()));

    let s = Kb::new(String::from("kmem"), &m, GFP_KERNEL).unwrap();
    assert_eq!(format!("{s}/{s:?}"), "kmem/\"kmem\"");

    let u = Kb::<[u64; 4]>::new_uninit(&m, GFP_KERNEL).unwrap();
    let u = KBox::write(u, [1, 2, 3, 4]);
    assert_eq!(u.iter().sum::<u64>(), 10);
    let mut z: Kb<MaybeUninit<u64>> = KBox::new_uninit(&m, GFP_KERNEL | __GFP_ZERO).unwrap();
    // SAFETY: `__GFP_ZERO` zeroed it, and 0 is a valid u64.
    assert_eq!(unsafe { z.assume_init_read() }, 0);
    z.write(7);
    // SAFETY: written just above.
    let z = unsafe { KBox::assume_init(z) };
    assert_eq!(*z, 7);

    struct Pinned {
        x: u64,
        _pin: std::marker::PhantomPinned,
    }
    let p = Kb::pin(
        Pinned {
            x: 3,
            _pin: std::marker::PhantomPinned,
        },
        &m,
        GFP_KERNEL,
    )
    .unwrap();
    let addr = &p.x as *const u64;
    let moved = p; // moving the Pin<KBox> does not move the value
    assert!(std::ptr::eq(&moved.x, addr));

    let leaked: &mut u64 = KBox::leak(Kb::new(9u64, &m, GFP_KERNEL).unwrap());
    *leaked += 1;
    // SAFETY: `leak` is `into_raw` plus a reborrow; we give the only reference back here.
    drop(unsafe { Kb::from_raw(leaked, &m) });
    assert_eq!(AllocError.to_string(), "memory allocation failed");
}

/// Takes every free page with a sleeping, non-retrying mask; gives back what it took.
struct Exhausted<'m> {
    m: &'m Machine,
    pages: Vec<(&'m kmem::page_alloc::page::Page, u32)>,
}

impl<'m> Exhausted<'m> {
    fn new(m: &'m Machine) -> Self {
        let mut pages = Vec::new();
        for order in (0..=10).rev() {
            while let Some(p) = m.alloc_pages(GFP_KERNEL | __GFP_NOWARN | __GFP_NORETRY, order) {
                pages.push((p, order));
            }
        }
        Exhausted { m, pages }
    }
}

impl Drop for Exhausted<'_> {
    fn drop(&mut self) {
        for &(p, order) in &self.pages {
            // SAFETY: allocated in `new` at `order`, not used.
            unsafe { self.m.__free_pages(p, order) };
        }
    }
}

#[test]
fn allocation_failure_is_err_not_panic() {
    let m = Machine::boot(MachineConfig::x86_64(64 << 20)).unwrap();
    let cache = Cache::<[u64; 32]>::new(&m, "boxed-oom", SlabFlags::NO_MERGE).unwrap();
    let mut v: Kv<u64> = KVec::new(&m);
    {
        let ex = Exhausted::new(&m);
        assert!(!ex.pages.is_empty());
        assert_eq!(
            Kb::new([0u8; 16384], &m, GFP_NOWAIT).err(),
            Some(AllocError)
        );
        assert!(Kv::<u32>::with_capacity(10_000, &m, GFP_NOWAIT).is_err());
        assert!(cache.alloc([1; 32], GFP_NOWAIT).is_err());
        // Small pushes may be served from partial slabs for a while; they fail cleanly.
        let mut failed = false;
        for i in 0..1_000_000u64 {
            if v.push(i, GFP_NOWAIT).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "a vector grew without memory");
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
    }
    // Memory is back: everything works again.
    let b = Kb::new([1u8; 16384], &m, GFP_KERNEL).unwrap();
    let o = cache.alloc([2; 32], GFP_KERNEL).unwrap();
    v.push(u64::MAX, GFP_KERNEL).unwrap();
    assert_eq!((b[16383], o[31]), (1, 2));
    drop((b, o, v));
    m.validate().unwrap();
}

#[test]
fn kvec_push_pop_truncate_clear_count_drops() {
    let m = machine();
    let drops = AtomicUsize::new(0);
    let mk = |value| Counted {
        drops: &drops,
        value,
    };
    let mut v: Kv<Counted> = KVec::new(&m);
    assert_eq!((v.len(), v.capacity(), v.is_empty()), (0, 0, true));
    for i in 0..100 {
        v.push(mk(i), GFP_KERNEL).unwrap();
    }
    assert_eq!(v.len(), 100);
    assert!(v.iter().enumerate().all(|(i, x)| x.value == i as u64));
    let last = v.pop().unwrap();
    assert_eq!((last.value, drops.load(Relaxed)), (99, 0));
    drop(last);
    assert_eq!(drops.load(Relaxed), 1);
    v.truncate(50);
    assert_eq!((v.len(), drops.load(Relaxed)), (50, 50));
    v.truncate(80); // longer: nothing happens
    assert_eq!(v.len(), 50);
    v[10].value = 1000;
    assert_eq!(v.as_slice()[10].value, 1000);
    let cap = v.capacity();
    v.clear();
    assert_eq!((v.len(), v.capacity(), drops.load(Relaxed)), (0, cap, 100));
    assert!(v.pop().is_none());
    v.push(mk(1), GFP_KERNEL).unwrap();
    v.push(mk(2), GFP_KERNEL).unwrap();
    drop(v);
    assert_eq!(drops.load(Relaxed), 102);
    m.validate().unwrap();
}

#[test]
fn kvec_extend_reserve_and_zst() {
    let m = machine();
    let drops = AtomicUsize::new(0);
    let src: Vec<Counted> = (0..10)
        .map(|value| Counted {
            drops: &drops,
            value,
        })
        .collect();
    let mut v: Kv<Counted> = KVec::new(&m);
    v.extend_from_slice(&src, GFP_KERNEL).unwrap();
    v.extend_from_slice(&src[..3], GFP_KERNEL).unwrap();
    let got: Vec<u64> = v.iter().map(|x| x.value).collect();
    assert_eq!(got, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]);
    v.reserve(1000, GFP_KERNEL).unwrap();
    assert!(v.capacity() >= 1013);
    let cap = v.capacity();
    v.reserve(cap - v.len(), GFP_KERNEL).unwrap();
    assert_eq!(v.capacity(), cap, "reserve within capacity reallocated");
    drop(v);
    assert_eq!(drops.load(Relaxed), 13);
    drop(src);

    // Zero-sized elements: unbounded capacity, no memory, drops still counted.
    static ZDROPS: AtomicUsize = AtomicUsize::new(0);
    struct Z;
    impl Drop for Z {
        fn drop(&mut self) {
            ZDROPS.fetch_add(1, Relaxed);
        }
    }
    let before = kmalloc_in_use_all(&m);
    let mut z: Kv<Z> = KVec::new(&m);
    assert_eq!(z.capacity(), usize::MAX);
    for _ in 0..1000 {
        z.push(Z, GFP_KERNEL).unwrap();
    }
    assert_eq!(kmalloc_in_use_all(&m), before);
    assert_eq!(z.reserve(usize::MAX, GFP_KERNEL), Err(AllocError));
    z.truncate(400);
    assert_eq!(ZDROPS.load(Relaxed), 600);
    drop(z);
    assert_eq!(ZDROPS.load(Relaxed), 1000);
}

#[test]
fn kvec_capacity_uses_ksize_slack() {
    let m = machine();
    let mut v: Kv<u8> = KVec::new(&m);
    v.push(1, GFP_KERNEL).unwrap();
    assert_eq!(v.capacity(), m.ksize(v.as_ptr()));
    assert_eq!(v.capacity(), 8);
    // 3 x 24 = 72 bytes: kmalloc-96, which holds 4.
    let w = Kv::<[u8; 24]>::with_capacity(3, &m, GFP_KERNEL).unwrap();
    assert_eq!(m.ksize(w.as_ptr() as *const u8), 96);
    assert_eq!(w.capacity(), 4);
    // 100 x 12 = 1200 bytes: kmalloc-2k, which holds 170.
    let mut x = Kv::<[u32; 3]>::with_capacity(100, &m, GFP_KERNEL).unwrap();
    assert_eq!(x.capacity(), 2048 / 12);
    let p = x.as_ptr();
    for i in 0..170 {
        x.push([i; 3], GFP_KERNEL).unwrap();
    }
    assert_eq!(x.as_ptr(), p, "slack not used: the buffer moved");
    x.push([0; 3], GFP_KERNEL).unwrap();
    assert_ne!(x.as_ptr(), p);
    assert_eq!(x.capacity(), m.ksize(x.as_ptr() as *const u8) / 12);
    assert!(
        x.iter()
            .take(170)
            .enumerate()
            .all(|(i, a)| *a == [i as u32; 3])
    );
    // No room left: push_within_capacity gives the value back.
    let mut y = Kv::<u64>::with_capacity(1, &m, GFP_KERNEL).unwrap();
    while y.len() < y.capacity() {
        y.push_within_capacity(5).unwrap();
    }
    assert_eq!(y.push_within_capacity(6), Err(6));
}

#[test]
fn kvec_grows_into_large_kmalloc() {
    let m = machine();
    let mut v: Kv<u32> = KVec::new(&m);
    for i in 0..100_000u32 {
        v.push(i.wrapping_mul(2_654_435_761), GFP_KERNEL).unwrap();
    }
    assert_eq!(v.len(), 100_000);
    assert!(
        v.iter()
            .enumerate()
            .all(|(i, &x)| x == (i as u32).wrapping_mul(2_654_435_761))
    );
    // 400 000 bytes: beyond the 8 KiB classes, a 512 KiB compound page block.
    assert_eq!(m.ksize(v.as_ptr() as *const u8), PAGE_SIZE << 7);
    assert_eq!(v.capacity(), (PAGE_SIZE << 7) / 4);
    let free = m.nr_free_pages();
    drop(v);
    assert!(m.nr_free_pages() >= free + 128);
    m.validate().unwrap();
}

#[test]
fn kvec_overflow_is_err() {
    let m = machine();
    assert_eq!(
        Kv::<u64>::with_capacity(usize::MAX / 4, &m, GFP_KERNEL).err(),
        Some(AllocError)
    );
    assert!(Kv::<u8>::with_capacity(usize::MAX, &m, GFP_KERNEL).is_err());
    assert!(Kv::<u8>::with_capacity(KMALLOC_MAX_SIZE + 1, &m, GFP_KERNEL | __GFP_NOWARN).is_err());
    let mut v: Kv<u64> = KVec::new(&m);
    v.push(1, GFP_KERNEL).unwrap();
    assert!(v.reserve(usize::MAX, GFP_KERNEL).is_err());
    assert!(
        v.reserve(usize::MAX / 8, GFP_KERNEL | __GFP_NOWARN)
            .is_err()
    );
    assert_eq!((v.len(), v[0]), (1, 1));
    // Up to KMALLOC_MAX_SIZE is served (doubling stops at the limit).
    let n = KMALLOC_MAX_SIZE / 8;
    let w = Kv::<u64>::with_capacity(n, &m, GFP_KERNEL).unwrap();
    assert_eq!(w.capacity(), n);
}

#[test]
fn kvec_over_aligned() {
    let m = machine();
    let mut v: Kv<A64> = KVec::new(&m);
    for i in 0..40u8 {
        v.push(A64 { bytes: [i; 130] }, GFP_KERNEL).unwrap();
        assert_eq!(v.as_ptr() as usize % 64, 0);
        assert!(m.ksize(v.as_ptr() as *const u8).is_power_of_two());
    }
    assert!(v.iter().enumerate().all(|(i, a)| a.bytes[129] == i as u8));
}

/// A constructed object: `magic` is set by the constructor and must survive reuse.
struct Inode {
    magic: u64,
    generation: u64,
    data: [u64; 6],
}

static INODE_CTORS: AtomicUsize = AtomicUsize::new(0);
static INODE_RESETS: AtomicUsize = AtomicUsize::new(0);
const MAGIC: u64 = 0xC0FF_EE00_1234_5678;

impl Constructed for Inode {
    fn construct() -> Self {
        INODE_CTORS.fetch_add(1, Relaxed);
        Inode {
            magic: MAGIC,
            generation: 0,
            data: [0; 6],
        }
    }
    // Cheaper than a fresh construction: only the per-use fields are cleared.
    fn reset(&mut self) {
        INODE_RESETS.fetch_add(1, Relaxed);
        self.data = [0; 6];
    }
}

#[test]
fn constructed_cache() {
    let m = machine();
    let cache = Cache::<Inode>::new_constructed(&m, "boxed_inode", SlabFlags::NONE).unwrap();
    assert!(cache.is_constructed());
    let raw = cache.raw();
    assert_eq!(raw.name(), "boxed_inode");
    let per_slab = raw.objects_per_slab();
    assert_eq!(INODE_CTORS.load(Relaxed), 0, "constructed before any slab");
    let n = 3 * per_slab + 1;
    let mut objs = Vec::new();
    for i in 0..n {
        let mut o = cache.alloc_constructed(GFP_KERNEL | __GFP_ZERO).unwrap();
        assert_eq!((o.magic, o.data), (MAGIC, [0; 6]));
        o.generation += 1;
        o.data = [i as u64; 6];
        objs.push(o);
    }
    let slabs = raw.nr_slabs();
    assert!(slabs >= 4);
    assert_eq!(INODE_CTORS.load(Relaxed), per_slab * slabs);
    assert_eq!(in_use(&m, raw), n);
    drop(objs);
    assert_eq!(INODE_RESETS.load(Relaxed), n);
    assert_eq!(in_use(&m, raw), 0);
    // Reused objects come back in their constructed state, without constructing again.
    let again: Vec<_> = (0..n)
        .map(|_| cache.alloc_constructed(GFP_KERNEL).unwrap())
        .collect();
    assert!(again.iter().all(|o| o.magic == MAGIC && o.data == [0; 6]));
    assert!(
        again.iter().any(|o| o.generation == 1),
        "objects not reused"
    );
    assert_eq!(raw.nr_slabs(), slabs);
    assert_eq!(INODE_CTORS.load(Relaxed), per_slab * slabs);
    drop(again);
    // `alloc(x)` on a constructed cache installs `x`; freeing resets it.
    let o = cache
        .alloc(
            Inode {
                magic: MAGIC,
                generation: 100,
                data: [9; 6],
            },
            GFP_KERNEL,
        )
        .unwrap();
    assert_eq!((o.generation, o.data), (100, [9; 6]));
    let o = CacheBox::into_inner(o);
    assert_eq!(o.generation, 100);
    assert_eq!(in_use(&m, raw), 0);
    drop(cache);
    assert!(m.slab().find_cache("boxed_inode").is_none());
    m.validate().unwrap();
}

/// A `Constructed` type used in a cache made without a constructor.
struct Plain(u64);

static PLAIN_DROPS: AtomicUsize = AtomicUsize::new(0);

impl Constructed for Plain {
    fn construct() -> Self {
        Plain(77)
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        PLAIN_DROPS.fetch_add(1, Relaxed);
    }
}

#[test]
fn cache_box_returns_objects() {
    let m = machine();
    let drops = AtomicUsize::new(0);
    let cache = Cache::<Counted>::new(&m, "boxed_counted", SlabFlags::NO_MERGE).unwrap();
    assert!(!cache.is_constructed());
    let raw = cache.raw();
    let boxes: Vec<_> = (0..500)
        .map(|value| {
            let x = Counted {
                drops: &drops,
                value,
            };
            CacheBox::new(&cache, x, GFP_KERNEL).unwrap()
        })
        .collect();
    assert_eq!(in_use(&m, raw), 500);
    assert!(boxes.iter().enumerate().all(|(i, b)| b.value == i as u64));
    assert!(format!("{:?}", boxes[3]).contains("value: 3"));
    drop(boxes);
    assert_eq!(drops.load(Relaxed), 500);
    assert_eq!(in_use(&m, raw), 0);
    assert!(raw.nr_slabs() > 0);
    assert!(cache.shrink() > 0);
    assert_eq!(raw.nr_slabs(), 0);
    // new_constructed on a plain cache constructs the value itself, and drops it on free.
    let plain = Cache::<Plain>::new(&m, "boxed_plain", SlabFlags::NO_MERGE).unwrap();
    let o = plain.alloc_constructed(GFP_KERNEL).unwrap();
    assert_eq!(o.0, 77);
    drop(o);
    assert_eq!(PLAIN_DROPS.load(Relaxed), 1);
    drop(cache);
    m.validate().unwrap();
}

#[test]
fn dropping_the_cache_destroys_it() {
    let m = machine();
    {
        let c = Cache::<[u64; 5]>::new(&m, "boxed_gone", SlabFlags::NO_MERGE).unwrap();
        let o = c.alloc([1; 5], GFP_KERNEL).unwrap();
        assert!(m.slab().find_cache("boxed_gone").is_some());
        assert_eq!(m.kmem_cache_size(c.raw()), 40);
        drop(o);
    }
    assert!(m.slab().find_cache("boxed_gone").is_none());

    // An object leaked on purpose keeps the cache alive (reported), never dangling.
    let leaked = {
        let c = Cache::<u64>::new(&m, "boxed_leak", SlabFlags::NO_MERGE).unwrap();
        CacheBox::into_raw(c.alloc(5, GFP_KERNEL).unwrap())
    };
    let log = m.platform().take_log().join("\n");
    assert!(log.contains("Objects remaining in boxed_leak"), "{log}");
    let raw = m.slab().find_cache("boxed_leak").expect("cache kept");
    // SAFETY: `leaked` is a live object of `raw` that nothing else uses.
    unsafe {
        assert_eq!(*leaked, 5);
        m.kmem_cache_free(raw, leaked.cast());
        assert!(m.kmem_cache_destroy(raw));
    }
    assert!(m.slab().find_cache("boxed_leak").is_none());
    m.validate().unwrap();
}

#[test]
fn two_threads_share_a_machine() {
    let m = machine();
    let cache = Cache::<[u32; 16]>::new(&m, "boxed_threads", SlabFlags::NO_MERGE).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(Kb<u64>, CacheBox<[u32; 16], _>)>();
    std::thread::scope(|s| {
        let (m, cache) = (&m, &cache);
        let producer = s.spawn(move || {
            let mut v: Kv<u64> = KVec::new(m);
            for i in 0..20_000u64 {
                let b = Kb::new(i, m, GFP_KERNEL).unwrap();
                v.push(*b, GFP_KERNEL).unwrap();
                if i % 4 == 0 {
                    let o = cache.alloc([i as u32; 16], GFP_KERNEL).unwrap();
                    tx.send((b, o)).unwrap(); // freed by the other thread
                }
            }
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
        });
        let consumer = s.spawn(move || {
            let mut n = 0u64;
            let mut local: Vec<Kb<[u8; 64]>> = Vec::new();
            for (b, o) in rx {
                assert_eq!(*b, n * 4);
                assert_eq!(o[15], (n * 4) as u32);
                local.push(Kb::new([n as u8; 64], m, GFP_KERNEL).unwrap());
                if local.len() > 100 {
                    local.clear();
                }
                n += 1;
            }
            assert_eq!(n, 5000);
        });
        producer.join().unwrap();
        consumer.join().unwrap();
    });
    assert_eq!(in_use(&m, cache.raw()), 0);
    m.validate().unwrap();
}
