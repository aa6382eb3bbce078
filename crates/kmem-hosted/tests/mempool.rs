//! Memory pools (`mm/mempool.c`): the reserve serves allocations the allocator refuses,
//! sleeping callers wait for a freed element, resizing, refused constructor caches, and
//! element conservation under concurrency; the typed pools of `kmem::boxed` (`KMempool`,
//! `PoolBox`): values give their element back on drop, are dropped once, come back when a
//! non-sleeping allocation fails, and are conserved by random multi-threaded sequences
//! (a property test; `PROPTEST_CASES` overrides its 64 cases).

mod common;

use std::collections::{BTreeSet, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use common::Watchdog;
use kmem::addr::PAGE_SIZE;
use kmem::boxed::{AllocError, KMempool, PoolBox};
use kmem::gfp::*;
use kmem::kmalloc::{KmallocType, kmalloc_index};
use kmem::mempool::{
    MempoolError, mempool_create_kmalloc_pool, mempool_create_page_pool, mempool_create_slab_pool,
};
use kmem::page_alloc::page::Page;
use kmem::slab::SlabFlags;
use kmem_hosted::platform::HostedPlatform;
use kmem_hosted::{Machine, MachineConfig};
use proptest::prelude::*;

fn small_machine() -> Machine {
    Machine::boot(MachineConfig::x86_64(32 << 20).with_cpus(4)).unwrap()
}

/// Takes every free page, watermark reserves included.
fn exhaust(m: &Machine) -> Vec<&Page> {
    let mut all = Vec::new();
    while let Some(p) = m.alloc_pages(GFP_ATOMIC | __GFP_MEMALLOC | __GFP_NOWARN, 0) {
        all.push(p);
    }
    all
}

fn release(m: &Machine, pages: Vec<&Page>) {
    for p in pages {
        // SAFETY: allocated by `exhaust` at order 0, freed once, never used.
        unsafe { m.__free_pages(p, 0) };
    }
}

/// Returns the kmalloc cache serving `size` bytes to the page allocator, and the per-CPU lists.
fn settle(m: &Machine, sizes: &[usize]) {
    for &size in sizes {
        let c = m
            .kmalloc_caches()
            .cache(KmallocType::Normal, kmalloc_index(size))
            .unwrap();
        m.kmem_cache_shrink(c);
    }
    m.drain_all_pages();
}

const PTR: usize = std::mem::size_of::<*mut u8>();

#[test]
fn reserve_serves_when_the_allocator_fails_then_atomic_fails_fast() {
    let m = small_machine();
    let pool = mempool_create_page_pool(m.kmem(), 4, 0).unwrap();
    assert_eq!((pool.curr_nr(), pool.min_nr()), (4, 4));
    let hog = exhaust(&m);
    assert!(m.alloc_pages(GFP_ATOMIC | __GFP_NOWARN, 0).is_none());
    let mut got = Vec::new();
    for i in 0..4 {
        let e = pool
            .mempool_alloc(GFP_ATOMIC)
            .expect("served from the reserve");
        // SAFETY: a whole page owned by us until it goes back to the pool.
        unsafe { e.as_ptr().write_bytes(i as u8, PAGE_SIZE) };
        got.push(e);
    }
    assert_eq!(pool.curr_nr(), 0);
    let t = Instant::now();
    assert!(pool.mempool_alloc(GFP_ATOMIC).is_none());
    assert!(pool.mempool_alloc(GFP_NOWAIT).is_none());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a non-sleeping alloc must not wait"
    );
    for e in got {
        // SAFETY: from this pool, freed once.
        unsafe { pool.mempool_free(e) };
    }
    assert_eq!(pool.curr_nr(), 4);
    release(&m, hog);
    pool.mempool_destroy();
    m.validate().unwrap();
}

#[test]
fn sleeping_alloc_waits_for_a_free() {
    let m = small_machine();
    let pool = mempool_create_page_pool(m.kmem(), 1, 0).unwrap();
    let hog = exhaust(&m);
    let e = pool.mempool_alloc(GFP_ATOMIC).unwrap();
    assert_eq!(pool.curr_nr(), 0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let got = pool
                .mempool_alloc(GFP_KERNEL)
                .expect("GFP_KERNEL never fails");
            done.store(true, Ordering::SeqCst);
            got.as_ptr() as usize
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "no element: the waiter must still sleep"
        );
        let t = Instant::now();
        // SAFETY: from this pool, freed once, not used afterwards.
        unsafe { pool.mempool_free(e) };
        let got = NonNull::new(waiter.join().unwrap() as *mut u8).unwrap();
        assert!(done.load(Ordering::SeqCst));
        // Woken by the free, not by the 5 s timeout.
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
        assert_eq!(got, e, "the freed element went to the waiter");
        // SAFETY: from this pool, freed once.
        unsafe { pool.mempool_free(got) };
    });
    assert_eq!(pool.curr_nr(), 1);
    release(&m, hog);
    drop(pool);
    m.validate().unwrap();
}

#[test]
fn resize_up_and_down_with_elements_outstanding() {
    let m = small_machine();
    let free0 = {
        settle(&m, &[100, 2 * PTR, 8 * PTR]);
        m.nr_free_pages()
    };
    let pool = mempool_create_kmalloc_pool(m.kmem(), 2, 100).unwrap();
    // The allocator serves while it can: the reserve stays full.
    let out: Vec<NonNull<u8>> = (0..3)
        .map(|_| pool.mempool_alloc(GFP_KERNEL).unwrap())
        .collect();
    assert_eq!(pool.curr_nr(), 2);
    assert_eq!(pool.mempool_resize(8), Ok(()));
    assert_eq!((pool.curr_nr(), pool.min_nr()), (8, 8));
    assert_eq!(pool.mempool_resize(0), Err(MempoolError::Inval));
    assert_eq!(pool.mempool_resize(3), Ok(()));
    assert_eq!((pool.curr_nr(), pool.min_nr()), (3, 3));
    // Growing within the array's capacity (8) needs no new array.
    assert_eq!(pool.mempool_resize(5), Ok(()));
    assert_eq!((pool.curr_nr(), pool.min_nr()), (5, 5));
    for e in out {
        // SAFETY: from this pool, freed once.
        unsafe { pool.mempool_free(e) };
    }
    assert_eq!(pool.curr_nr(), 5);
    pool.mempool_destroy();
    assert!(!m.platform().log_contains("mempool_destroy"));

    // Shrinking a drained reserve: outstanding elements refill only up to the new minimum.
    let pool = mempool_create_page_pool(m.kmem(), 4, 0).unwrap();
    let hog = exhaust(&m);
    let out: Vec<NonNull<u8>> = (0..4)
        .map(|_| pool.mempool_alloc(GFP_ATOMIC).unwrap())
        .collect();
    assert_eq!(pool.curr_nr(), 0);
    assert_eq!(pool.mempool_resize(2), Ok(()));
    assert_eq!((pool.curr_nr(), pool.min_nr()), (0, 2));
    for e in out {
        // SAFETY: from this pool, freed once.
        unsafe { pool.mempool_free(e) };
    }
    assert_eq!(pool.curr_nr(), 2);
    release(&m, hog);
    assert_eq!(pool.mempool_resize(6), Ok(()));
    assert_eq!((pool.curr_nr(), pool.min_nr()), (6, 6));
    drop(pool);
    settle(&m, &[100, 2 * PTR, 4 * PTR, 8 * PTR]);
    assert_eq!(m.nr_free_pages(), free0);
    m.validate().unwrap();
}

#[test]
fn slab_pools_refuse_constructor_caches() {
    fn ctor(p: *mut u8) {
        // SAFETY: the slab layer passes a whole object of the cache (64 bytes).
        unsafe { p.write_bytes(0x5a, 64) };
    }
    let m = small_machine();
    let with = m
        .kmem_cache_create("mp_ctor", 64, 8, SlabFlags::NONE, Some(ctor))
        .unwrap();
    m.platform().take_log();
    assert!(mempool_create_slab_pool(m.kmem(), 4, with).is_none());
    assert!(m.platform().log_contains("has a constructor"));
    // The general constructor with the slab source refuses it too, allocating nothing.
    m.platform().take_log();
    let in_use = with.objects_in_use(m.nr_cpus());
    assert!(kmem::mempool::mempool_create(m.kmem(), 4, kmem::mempool::SlabSource(with)).is_none());
    assert!(m.platform().log_contains("has a constructor"));
    assert_eq!(with.objects_in_use(m.nr_cpus()), in_use);

    let plain = m
        .kmem_cache_create("mp_plain", 64, 8, SlabFlags::NONE, None)
        .unwrap();
    let pool = mempool_create_slab_pool(m.kmem(), 4, plain).unwrap();
    assert_eq!(pool.curr_nr(), 4);
    let e = pool.mempool_alloc(GFP_KERNEL).unwrap();
    // SAFETY: a live 64-byte object.
    unsafe { e.as_ptr().write_bytes(1, 64) };
    // SAFETY: from this pool, freed once.
    unsafe { pool.mempool_free(e) };
    pool.mempool_destroy();
    m.validate().unwrap();
}

#[test]
fn destroying_a_short_pool_is_reported() {
    let m = small_machine();
    let pool = mempool_create_page_pool(m.kmem(), 2, 0).unwrap();
    let hog = exhaust(&m);
    let e = pool.mempool_alloc(GFP_ATOMIC).unwrap();
    m.platform().take_log();
    pool.mempool_destroy();
    assert!(m.platform().log_contains("mempool_destroy: pool not full"));
    release(&m, hog);
    // SAFETY: the element is ours after the pool is gone; an order-0 page.
    unsafe { m.free_pages(kmem::addr::VirtAddr(e.as_ptr() as usize), 0) };
    m.validate().unwrap();
}

/// `__GFP_ZERO` cannot be honoured by the reserve: the misuse is reported once per pool, as
/// Linux's `VM_WARN_ON_ONCE`, and the allocation still succeeds.
#[test]
fn zeroed_requests_are_reported_once() {
    let m = small_machine();
    let pool = mempool_create_kmalloc_pool(m.kmem(), 2, 128).unwrap();
    let a = pool.mempool_alloc(GFP_KERNEL | __GFP_ZERO).unwrap();
    let b = pool.mempool_alloc(GFP_KERNEL | __GFP_ZERO).unwrap();
    let log = m.platform().take_log().join("\n");
    assert_eq!(
        log.matches("mempool_alloc with __GFP_ZERO").count(),
        1,
        "{log}"
    );
    // SAFETY: both came from this pool and are freed once.
    unsafe {
        pool.mempool_free(a);
        pool.mempool_free(b);
    }
    pool.mempool_destroy();
    assert!(!m.platform().log_contains("pool not full"));
}

#[test]
fn elements_are_conserved_across_threads() {
    const MIN_NR: usize = 2;
    const THREADS: usize = 4;
    const ROUNDS: usize = 300;
    let m = small_machine();
    settle(&m, &[MIN_NR * PTR]);
    let free0 = m.nr_free_pages();
    let pool = mempool_create_page_pool(m.kmem(), MIN_NR, 0).unwrap();
    // Nearly exhausted: a few pages free, below the watermarks. Four threads each hold one
    // element at a time from a reserve of two: the others sleep until one is freed. (Holding
    // one element while waiting for a second from the same pool could deadlock, as in Linux.)
    let mut hog = exhaust(&m);
    for p in hog.drain(..4) {
        // SAFETY: allocated by `exhaust` at order 0, freed once.
        unsafe { m.__free_pages(p, 0) };
    }
    let allocs = AtomicUsize::new(0);
    let frees = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (pool, allocs, frees) = (&pool, &allocs, &frees);
            s.spawn(move || {
                for r in 0..ROUNDS {
                    let a = pool.mempool_alloc(GFP_KERNEL).unwrap();
                    allocs.fetch_add(1, Ordering::Relaxed);
                    let tag = (t * ROUNDS + r) as u64;
                    // SAFETY: a page owned by this thread until freed below.
                    unsafe { a.as_ptr().cast::<u64>().write(tag) };
                    std::thread::yield_now();
                    // SAFETY: still ours: no one else wrote the page.
                    assert_eq!(unsafe { a.as_ptr().cast::<u64>().read() }, tag);
                    // SAFETY: from this pool, freed once, not used afterwards.
                    unsafe { pool.mempool_free(a) };
                    frees.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert_eq!(allocs.load(Ordering::Relaxed), THREADS * ROUNDS);
    assert_eq!(
        allocs.load(Ordering::Relaxed),
        frees.load(Ordering::Relaxed)
    );
    assert_eq!(
        pool.curr_nr(),
        MIN_NR,
        "every element came back: the pool is full"
    );
    release(&m, hog);
    pool.mempool_destroy();
    assert!(!m.platform().log_contains("mempool_destroy"));
    settle(&m, &[MIN_NR * PTR]);
    assert_eq!(m.nr_free_pages(), free0);
    m.validate().unwrap();
}

// ============================================================================ typed pools

type Pool<'k, T> = KMempool<'k, T, HostedPlatform>;

/// Returns every normal kmalloc cache's free slabs to the page allocator, and the per-CPU
/// lists.
fn settle_all(m: &Machine) {
    for i in 1..kmem::kmalloc::NR_KMALLOC_INDEX {
        m.kmem_cache_shrink(m.kmalloc_caches().cache(KmallocType::Normal, i).unwrap());
    }
    m.drain_all_pages();
}

/// Counts its drops in a shared counter.
#[derive(Debug)]
struct Counted<'a> {
    drops: &'a AtomicUsize,
    tag: u64,
}

impl<'a> Counted<'a> {
    fn new(drops: &'a AtomicUsize, tag: u64) -> Self {
        Counted { drops, tag }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

/// Allocates `GFP_ATOMIC` values from `pool` until one fails; returns the boxes and the
/// value the failure handed back.
fn drain_atomic<'p, T>(
    pool: &'p Pool<'p, T>,
    mut value: impl FnMut(usize) -> T,
) -> (Vec<PoolBox<'p, T, HostedPlatform>>, T) {
    let mut held = Vec::new();
    for i in 0..100_000 {
        match pool.alloc(value(i), GFP_ATOMIC) {
            Ok(b) => held.push(b),
            Err(e) => return (held, e.into_inner()),
        }
    }
    panic!("GFP_ATOMIC allocations kept succeeding on an exhausted machine");
}

#[test]
fn typed_pool_drop_refills_the_reserve_first() {
    let m = small_machine();
    let pool: Pool<[u64; 8]> =
        KMempool::new_slab(m.kmem(), "tp_refill", SlabFlags::NO_MERGE, 3).unwrap();
    let cache = pool.cache().unwrap();
    let in_use = || cache.objects_in_use(m.nr_cpus());
    assert_eq!((pool.curr_nr(), pool.min_nr()), (3, 3));
    assert_eq!(
        in_use(),
        3,
        "the reserve's elements are objects of the pool's cache"
    );

    // With memory to spare the cache serves and the reserve stays full; a dropped value's
    // element goes back to the cache.
    let a = pool.alloc([7; 8], GFP_KERNEL).unwrap();
    assert_eq!(*a, [7; 8]);
    assert_eq!((pool.curr_nr(), in_use()), (3, 4));
    drop(a);
    assert_eq!((pool.curr_nr(), in_use()), (3, 3));

    // Exhausted: the cache's free objects, then the reserve, then failure.
    let hog = exhaust(&m);
    let (mut held, _) = drain_atomic(&pool, |i| [i as u64; 8]);
    assert_eq!(pool.curr_nr(), 0);
    assert!(held.len() > 3);
    for (i, b) in held.iter().enumerate() {
        assert_eq!(**b, [i as u64; 8], "values are intact and distinct");
    }
    let objects = in_use();
    // The first drops refill the reserve, one element each; then elements go to the cache.
    for curr in 1..=3 {
        held.pop();
        assert_eq!((pool.curr_nr(), in_use()), (curr, objects));
    }
    held.pop();
    assert_eq!((pool.curr_nr(), in_use()), (3, objects - 1));
    // Into the reserve and out again without dropping anything: `into_raw`/`from_raw` and
    // `into_inner` keep the element out, then give it back.
    let raw = PoolBox::into_raw(held.pop().unwrap());
    assert_eq!(in_use(), objects - 1, "into_raw keeps the element");
    // SAFETY: from `into_raw` of a box of this pool, taken back once.
    let b = unsafe { PoolBox::from_raw(raw, &pool) };
    assert!(std::ptr::eq(PoolBox::pool(&b), &pool));
    let n = held.len() as u64;
    assert_eq!(PoolBox::into_inner(b), [n; 8]);
    assert_eq!((pool.curr_nr(), in_use()), (3, objects - 2));
    drop(held);
    assert_eq!((pool.curr_nr(), in_use()), (3, 3));
    release(&m, hog);
    m.platform().take_log();
    drop(pool);
    assert!(!m.platform().log_contains("mempool_destroy"));
    assert!(!m.platform().log_contains("Objects remaining"));
    m.validate().unwrap();
}

#[test]
fn typed_pool_drops_each_value_exactly_once() {
    let m = small_machine();
    let drops = AtomicUsize::new(0);
    let pool: Pool<Counted> = KMempool::new(m.kmem(), 2).unwrap();
    let boxes: Vec<_> = (0..10)
        .map(|i| pool.alloc(Counted::new(&drops, i), GFP_KERNEL).unwrap())
        .collect();
    assert_eq!(
        drops.load(Ordering::SeqCst),
        0,
        "placing a value drops nothing"
    );
    let mut boxes = boxes.into_iter();
    for (i, b) in boxes.by_ref().take(5).enumerate() {
        assert_eq!(b.tag, i as u64);
        drop(b);
        assert_eq!(drops.load(Ordering::SeqCst), i + 1);
    }
    // `into_inner` moves the value out without dropping it; it drops once, later.
    let v = PoolBox::into_inner(boxes.next().unwrap());
    assert_eq!((v.tag, drops.load(Ordering::SeqCst)), (5, 5));
    drop(v);
    assert_eq!(drops.load(Ordering::SeqCst), 6);
    // A leaked-and-recovered box still drops its value once.
    let raw = PoolBox::into_raw(boxes.next().unwrap());
    assert_eq!(drops.load(Ordering::SeqCst), 6);
    // SAFETY: from `into_raw` of a box of this pool, taken back once.
    drop(unsafe { PoolBox::from_raw(raw, &pool) });
    assert_eq!(drops.load(Ordering::SeqCst), 7);
    drop(boxes);
    assert_eq!(drops.load(Ordering::SeqCst), 10);

    // A destructor that unwinds is run once and its element still goes back.
    struct Bomb<'a>(&'a AtomicUsize);
    impl Drop for Bomb<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("Bomb dropped");
        }
    }
    let bomb_drops = AtomicUsize::new(0);
    let bombs: Pool<Bomb> = KMempool::new(m.kmem(), 1).unwrap();
    let hog = exhaust(&m);
    let (held, back) = drain_atomic(&bombs, |_| Bomb(&bomb_drops));
    std::mem::forget(back);
    assert_eq!(bombs.curr_nr(), 0);
    let n = held.len();
    for b in held {
        assert!(catch_unwind(AssertUnwindSafe(|| drop(b))).is_err());
        assert_eq!(
            bombs.curr_nr(),
            1,
            "the element came back despite the panic"
        );
    }
    assert_eq!(bomb_drops.load(Ordering::SeqCst), n);
    release(&m, hog);

    // The reserve holds memory, not values: destroying the pools drops nothing.
    assert_eq!(pool.curr_nr(), 2);
    drop((pool, bombs));
    assert_eq!(drops.load(Ordering::SeqCst), 10);
    assert_eq!(bomb_drops.load(Ordering::SeqCst), n);
    m.validate().unwrap();
}

#[test]
fn typed_pool_atomic_failure_returns_the_value_and_kernel_waits() {
    let m = small_machine();
    let drops = AtomicUsize::new(0);
    let pool: Pool<Counted> = KMempool::new(m.kmem(), 2).unwrap();
    let hog = exhaust(&m);
    let (mut held, back) = drain_atomic(&pool, |i| Counted::new(&drops, i as u64));
    assert_eq!(pool.curr_nr(), 0);
    assert_eq!(
        back.tag,
        held.len() as u64,
        "the failed allocation's own value"
    );
    assert_eq!(drops.load(Ordering::SeqCst), 0, "handed back, not dropped");
    // Again, through the error type: the same value, whatever the non-sleeping mask.
    for gfp in [GFP_ATOMIC, GFP_NOWAIT] {
        let e = pool.alloc(Counted::new(&drops, 77), gfp).unwrap_err();
        assert_eq!(e.to_string(), "memory pool exhausted");
        assert_eq!(e.0.tag, 77);
        assert_eq!(AllocError::from(e), AllocError);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "dropped with the error, once"
        );
        drops.store(0, Ordering::SeqCst);
    }
    drop(back);
    drops.store(0, Ordering::SeqCst);

    // A sleeping allocation does not fail: it waits until a value is dropped and gets its
    // element.
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let b = pool
                .alloc(Counted::new(&drops, 1000), GFP_KERNEL)
                .expect("GFP_KERNEL never fails");
            done.store(true, Ordering::SeqCst);
            (&*b as *const Counted as usize, PoolBox::into_inner(b).tag)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "no element: the waiter must still sleep"
        );
        let last = held.pop().unwrap();
        let addr = &*last as *const Counted as usize;
        drop(last);
        let (got, tag) = waiter.join().unwrap();
        assert_eq!(
            (got, tag),
            (addr, 1000),
            "the dropped element went to the waiter"
        );
    });
    assert_eq!(drops.load(Ordering::SeqCst), 2);
    drop(held);
    assert_eq!(pool.curr_nr(), 2);
    release(&m, hog);
    drop(pool);
    m.validate().unwrap();
}

#[test]
fn typed_pool_creation_refuses_or_fails_whole() {
    /// Aligned beyond any block kmalloc or a slab can give (never constructed).
    #[repr(C, align(8388608))]
    struct TooAligned(u8);
    /// Over-aligned, but servable: kmalloc rounds the request, a slab aligns its objects.
    #[repr(C, align(256))]
    struct Aligned([u8; 40]);

    let m = small_machine();
    settle_all(&m);
    let free0 = m.nr_free_pages();
    m.platform().take_log();
    assert_eq!(Pool::<TooAligned>::new(m.kmem(), 1).err(), Some(AllocError));
    assert_eq!(
        Pool::<TooAligned>::new_slab(m.kmem(), "tp_huge", SlabFlags::NONE, 1).err(),
        Some(AllocError)
    );
    assert_eq!(
        Pool::<[u8; 8 << 20]>::new(m.kmem(), 1).err(),
        Some(AllocError)
    );
    assert!(
        m.platform().take_log().is_empty(),
        "refused before allocating"
    );
    assert_eq!(m.nr_free_pages(), free0);

    for slab in [false, true] {
        let pool: Pool<Aligned> = if slab {
            KMempool::new_slab(m.kmem(), "tp_aligned", SlabFlags::NONE, 4).unwrap()
        } else {
            KMempool::new(m.kmem(), 4).unwrap()
        };
        let hog = exhaust(&m);
        let (held, _) = drain_atomic(&pool, |i| Aligned([i as u8; 40]));
        assert!(held.len() >= 4);
        for (i, b) in held.iter().enumerate() {
            assert_eq!(&**b as *const Aligned as usize % 256, 0);
            assert_eq!(b.0, [i as u8; 40]);
        }
        drop(held);
        release(&m, hog);
        drop(pool);
    }

    // 64 elements of 1 MiB do not fit in 32 MiB: the pool fails after taking some, and
    // gives back everything, its cache included.
    for slab in [false, true] {
        let pool = if slab {
            Pool::<[u8; 1 << 20]>::new_slab(m.kmem(), "tp_big", SlabFlags::NONE, 64)
        } else {
            Pool::<[u8; 1 << 20]>::new(m.kmem(), 64)
        };
        assert_eq!(pool.err(), Some(AllocError));
        assert!(!m.proc_slabinfo().contains("tp_big"), "the cache is gone");
    }
    settle_all(&m);
    assert_eq!(m.nr_free_pages(), free0);
    m.validate().unwrap();
}

// ------------------------------------------------------------ typed pools: property test

/// Words of pattern in a [`Tracked`] value (with its id and ledger: 256 bytes).
const WORDS: usize = 30;
const THREADS: usize = 4;

/// The word `i` of value `id`'s pattern.
fn word(id: u64, i: usize) -> u64 {
    id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0x0101_0101_0101_0101)
}

/// What a conservation run observed, for all threads.
#[derive(Default)]
struct Ledger {
    /// Addresses of the elements holding live values.
    live: Mutex<BTreeSet<usize>>,
    /// Ids of the values dropped in their element.
    dropped: Mutex<HashSet<u64>>,
}

impl Ledger {
    /// Records a new element at `addr`: no live element may overlap it.
    fn placed(&self, addr: usize) {
        let size = std::mem::size_of::<Tracked>();
        let mut live = self.live.lock().unwrap();
        if let Some(&prev) = live.range(..=addr).next_back() {
            assert!(prev + size <= addr, "{addr:#x} overlaps live {prev:#x}");
        }
        if let Some(&next) = live.range(addr..).next() {
            assert!(addr + size <= next, "{addr:#x} overlaps live {next:#x}");
        }
        live.insert(addr);
    }
}

/// A value that checks, when dropped, that its pattern is intact, that its element was
/// live, and that it was not dropped before.
struct Tracked<'a> {
    id: u64,
    words: [u64; WORDS],
    ledger: &'a Ledger,
}

impl<'a> Tracked<'a> {
    fn new(id: u64, ledger: &'a Ledger) -> Self {
        Tracked {
            id,
            words: std::array::from_fn(|i| word(id, i)),
            ledger,
        }
    }

    fn check(&self) {
        for (i, &w) in self.words.iter().enumerate() {
            assert_eq!(
                w,
                word(self.id, i),
                "value {} word {i} overwritten",
                self.id
            );
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.check();
        let addr = self as *const Self as usize;
        let was_live = self.ledger.live.lock().unwrap().remove(&addr);
        assert!(was_live, "value {} dropped outside a live element", self.id);
        let first = self.ledger.dropped.lock().unwrap().insert(self.id);
        assert!(first, "value {} dropped twice", self.id);
    }
}

#[derive(Clone, Copy, Debug)]
enum Backing {
    Kmalloc,
    Slab,
    SlabNoMerge,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// `GFP_KERNEL`: first drops every value held and received (a task that sleeps for an
    /// element must hold none), and takes no hand-off while it sleeps.
    AllocKernel,
    /// `GFP_ATOMIC`: may fail, handing the value back.
    AllocAtomic,
    /// Drops the held value picked by the index (modulo), if any.
    Free(usize),
    /// Sends a held value to another thread (`1 + to % 3` threads further).
    HandOff { to: usize, which: usize },
    /// Takes in the values other threads sent.
    Receive,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::AllocKernel),
        3 => Just(Op::AllocAtomic),
        2 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(to, which)| Op::HandOff { to, which }),
        1 => Just(Op::Receive),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    backing: Backing,
    min_nr: usize,
    /// Pages given back after exhausting the machine (below every watermark).
    spare: usize,
    ops: [Vec<Op>; THREADS],
}

fn case_strategy(max_ops: usize) -> impl Strategy<Value = Case> {
    let ops = prop::array::uniform4(prop::collection::vec(op_strategy(), 0..max_ops));
    (
        prop_oneof![
            Just(Backing::Kmalloc),
            Just(Backing::Slab),
            Just(Backing::SlabNoMerge)
        ],
        1..=4usize,
        0..=6usize,
        ops,
    )
        .prop_map(|(backing, min_nr, spare, ops)| Case {
            backing,
            min_nr,
            spare,
            ops,
        })
}

type Elem<'p, 'l> = PoolBox<'p, Tracked<'l>, HostedPlatform>;

/// A thread's inbox: other threads send only while `open` (checked and sent under its lock),
/// so nothing reaches a thread that sleeps for an element or has finished.
struct Inbox<'p, 'l> {
    open: Mutex<bool>,
    tx: Sender<Elem<'p, 'l>>,
}

/// What a run counted.
#[derive(Default, Debug)]
struct Stats {
    /// Ids of the values placed in elements.
    placed: HashSet<u64>,
    atomic_failures: usize,
    kernel_allocs: usize,
}

/// Runs thread `t`'s operations.
fn run_thread<'p, 'l>(
    t: usize,
    ops: &[Op],
    pool: &'p Pool<'p, Tracked<'l>>,
    ledger: &'l Ledger,
    inboxes: &[Inbox<'p, 'l>],
    rx: Receiver<Elem<'p, 'l>>,
) -> Stats {
    let mut stats = Stats::default();
    let mut held: Vec<Elem> = Vec::new();
    let receive = |held: &mut Vec<Elem<'p, 'l>>, open: bool| {
        let mut gate = inboxes[t].open.lock().unwrap();
        held.extend(rx.try_iter());
        *gate = open;
    };
    for (seq, &op) in ops.iter().enumerate() {
        match op {
            Op::AllocKernel | Op::AllocAtomic => {
                let id = ((t as u64) << 32) | seq as u64;
                let kernel = matches!(op, Op::AllocKernel);
                if kernel {
                    receive(&mut held, false);
                    held.clear();
                }
                match pool.alloc(
                    Tracked::new(id, ledger),
                    if kernel { GFP_KERNEL } else { GFP_ATOMIC },
                ) {
                    Ok(b) => {
                        ledger.placed(&*b as *const Tracked as usize);
                        stats.placed.insert(id);
                        stats.kernel_allocs += kernel as usize;
                        held.push(b);
                    }
                    Err(e) => {
                        assert!(!kernel, "a GFP_KERNEL allocation failed");
                        let v = e.into_inner();
                        assert_eq!(v.id, id, "the failure handed back another value");
                        v.check();
                        // Never placed: not the ledger's to see dropped.
                        std::mem::forget(v);
                        stats.atomic_failures += 1;
                    }
                }
                if kernel {
                    *inboxes[t].open.lock().unwrap() = true;
                }
            }
            Op::Free(i) => {
                if !held.is_empty() {
                    held.swap_remove(i % held.len());
                }
            }
            Op::HandOff { to, which } => {
                if !held.is_empty() {
                    let b = held.swap_remove(which % held.len());
                    let target = &inboxes[(t + 1 + to % (THREADS - 1)) % THREADS];
                    let gate = target.open.lock().unwrap();
                    if *gate {
                        target.tx.send(b).unwrap();
                    } else {
                        held.push(b);
                    }
                }
            }
            Op::Receive => receive(&mut held, true),
        }
    }
    // Done: take in the last hand-offs, close the inbox for good and drop everything.
    receive(&mut held, false);
    drop(held);
    stats
}

/// Runs `case` on a fresh machine under memory pressure and checks that elements and values
/// are conserved; returns what the threads counted.
fn run_conservation(case: &Case) -> Stats {
    let m = small_machine();
    settle_all(&m);
    let free0 = m.nr_free_pages();
    let ledger = Ledger::default();
    let pool: Pool<Tracked> = match case.backing {
        Backing::Kmalloc => KMempool::new(m.kmem(), case.min_nr),
        Backing::Slab => KMempool::new_slab(m.kmem(), "tp_prop", SlabFlags::NONE, case.min_nr),
        Backing::SlabNoMerge => {
            KMempool::new_slab(m.kmem(), "tp_prop", SlabFlags::NO_MERGE, case.min_nr)
        }
    }
    .unwrap();
    assert_eq!(pool.curr_nr(), case.min_nr);
    let mut hog = exhaust(&m);
    release(&m, hog.drain(..case.spare.min(hog.len())).collect());

    let watchdog = Watchdog::new("typed_pool_conserves_elements", Duration::from_secs(30));
    let mut stats = Stats::default();
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| channel()).unzip();
    let inboxes: Vec<Inbox> = txs
        .into_iter()
        .map(|tx| Inbox {
            open: Mutex::new(true),
            tx,
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(t, rx)| {
                let (pool, ledger, inboxes) = (&pool, &ledger, &inboxes);
                let ops = &case.ops[t];
                s.spawn(move || run_thread(t, ops, pool, ledger, inboxes, rx))
            })
            .collect();
        for h in handles {
            let st = h.join().unwrap();
            stats.placed.extend(st.placed);
            stats.atomic_failures += st.atomic_failures;
            stats.kernel_allocs += st.kernel_allocs;
        }
    });
    drop(inboxes);
    drop(watchdog);

    assert!(ledger.live.lock().unwrap().is_empty(), "values still live");
    assert_eq!(
        *ledger.dropped.lock().unwrap(),
        stats.placed,
        "every value placed was dropped exactly once"
    );
    assert_eq!(
        pool.curr_nr(),
        pool.min_nr(),
        "every element came back: the reserve is full"
    );
    release(&m, hog);
    m.platform().take_log();
    drop(pool);
    assert!(!m.platform().log_contains("mempool_destroy"));
    assert!(!m.platform().log_contains("Objects remaining"));
    settle_all(&m);
    assert_eq!(m.nr_free_pages(), free0, "the pool's memory went back");
    m.validate().unwrap();
    stats
}

proptest! {
    #![proptest_config(common::proptest_config())]

    /// Random per-thread sequences of sleeping and atomic allocations, drops and hand-offs
    /// conserve elements and values.
    #[test]
    fn typed_pool_conserves_elements(case in case_strategy(64)) {
        run_conservation(&case);
    }
}

/// A fixed case that surely drains the pool: one thread takes values until `GFP_ATOMIC`
/// fails and hands them around, while the others sleep for elements.
#[test]
fn typed_pool_conserves_elements_when_drained() {
    let mut hoarder = vec![Op::AllocAtomic; 200];
    hoarder.extend((0..200).map(|i| Op::HandOff { to: i, which: i }));
    let sleeper: Vec<Op> = (0..60)
        .flat_map(|i| [Op::AllocKernel, Op::Receive, Op::Free(i)])
        .collect();
    let passer: Vec<Op> = (0..60)
        .flat_map(|i| {
            [
                Op::Receive,
                Op::AllocAtomic,
                Op::HandOff { to: i, which: i },
                Op::AllocKernel,
            ]
        })
        .collect();
    for backing in [Backing::Kmalloc, Backing::Slab, Backing::SlabNoMerge] {
        let case = Case {
            backing,
            min_nr: 2,
            spare: 0,
            ops: [
                hoarder.clone(),
                sleeper.clone(),
                passer.clone(),
                sleeper.clone(),
            ],
        };
        let stats = run_conservation(&case);
        assert!(
            stats.atomic_failures > 0,
            "{backing:?}: the pool was never drained"
        );
        assert_eq!(stats.kernel_allocs, 60 * 3, "{backing:?}: {stats:?}");
    }
}
