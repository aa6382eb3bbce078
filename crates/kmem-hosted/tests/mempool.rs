//! Memory pools (`mm/mempool.c`): the reserve serves allocations the allocator refuses,
//! sleeping callers wait for a freed element, resizing, refused constructor caches, and
//! element conservation under concurrency.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kmem::addr::PAGE_SIZE;
use kmem::gfp::*;
use kmem::kmalloc::{KmallocType, kmalloc_index};
use kmem::mempool::{
    MempoolError, mempool_create_kmalloc_pool, mempool_create_page_pool, mempool_create_slab_pool,
};
use kmem::page_alloc::page::Page;
use kmem::slab::SlabFlags;
use kmem_hosted::{Machine, MachineConfig};

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
