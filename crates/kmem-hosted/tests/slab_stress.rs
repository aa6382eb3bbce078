//! Multi-threaded stress tests of the slab layer and kmalloc, with cross-CPU frees.
//!
//! A machine of 4 vCPUs is shared by several threads (`std::thread::scope` borrows it).
//! Objects — kmallocs of random sizes (slab classes and large kmallocs) and objects of
//! shared caches, one with a constructor — are filled with a pattern unique to the object,
//! sent as `(address, size, kind, tag)` over `std::sync::mpsc` channels, verified by the
//! receiving thread and freed there: a free lands in another CPU's sheaf than the one the
//! object came from, so sheaves flush to slabs that other CPUs are refilling from.
//!
//! * [`producer_consumer_cross_cpu_frees`]: two producer/consumer pairs; the producers also
//!   free some objects themselves.
//! * [`two_threads_free_each_others_objects`]: two threads swap batches every round and free
//!   each other's objects at the same time.
//! * [`shrink_races_with_allocation`]: one thread shrinks the caches over and over while
//!   others allocate and free.
//! * [`create_destroy_races_with_merging`]: three threads create, use and destroy caches
//!   that merge into one, concurrently.
//!
//! Each ends with everything freed: with the created caches destroyed, the kmalloc caches
//! shrunk and the per-CPU page lists drained, `nr_free_pages` and the buddyinfo numbers
//! equal their values right after boot, `validate()` passes and nothing was reported. The
//! `*_soak` variants (`#[ignore]`) run ten times as many operations.

mod common;
use common::{Rng, Watchdog};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::{Barrier, LazyLock};
use std::time::{Duration, Instant};

use kmem::addr::NR_PAGE_ORDERS;
use kmem::gfp::*;
use kmem::kmalloc::{KmallocType, NR_KMALLOC_INDEX};
use kmem::slab::{KmemCache, SlabFlags};
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;
const MAX_KMALLOC: usize = 20_000;
/// Size of the shared plain cache's objects.
const PLAIN_SIZE: usize = 200;
/// Size of the shared constructed cache's objects.
const CTOR_SIZE: usize = 72;
const CTOR_MAGIC: [u8; 8] = *b"ctor-ok!";

/// Bytes an object's pattern is cut from: `PATTERN[tag % 251..][..len]`, so that writing
/// and checking are `memcpy` and `memcmp`.
static PATTERN: LazyLock<Vec<u8>> = LazyLock::new(|| {
    (0..(32 << 10) + 512)
        .map(|i| ((i * 13 + i / 251) % 251) as u8 | 0x80)
        .collect()
});

fn ctor(p: *mut u8) {
    // SAFETY: the slab layer passes a fresh object of the constructed cache (CTOR_SIZE
    // bytes).
    unsafe { p.copy_from_nonoverlapping(CTOR_MAGIC.as_ptr(), 8) };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Kmalloc,
    Plain,
    Ctor,
}

/// A live object as it travels between threads.
#[derive(Clone, Copy, Debug)]
struct Obj {
    addr: usize,
    len: usize,
    kind: Kind,
    tag: usize,
}

/// The two shared caches.
#[derive(Clone, Copy)]
struct Caches<'m> {
    plain: &'m KmemCache,
    ctor: &'m KmemCache,
}

#[allow(clippy::mut_from_ref)]
fn bytes<'a>(addr: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: callers pass a live object owned by the calling thread (allocated here or
    // received over a channel), at least `len` bytes long; the slice is dropped before the
    // object is freed or sent away.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

fn pattern(tag: usize, len: usize) -> &'static [u8] {
    &PATTERN[tag % 251..][..len]
}

fn random_kmalloc_size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..70 => 1 + rng.below(512),
        70..95 => 513 + rng.below(8192 - 512),
        _ => 8193 + rng.below(MAX_KMALLOC - 8192),
    }
}

/// Allocates an object of a random kind, checks it and writes its pattern.
fn alloc_obj(m: &Machine, cs: Caches<'_>, rng: &mut Rng, tag: usize) -> Obj {
    let (kind, len, p) = match rng.below(10) {
        0..5 => {
            let size = random_kmalloc_size(rng);
            let p = m.kmalloc(size, GFP_KERNEL).expect("kmalloc");
            let ks = m.ksize(p.as_ptr());
            assert!(ks >= size, "ksize {ks} < {size}");
            (Kind::Kmalloc, ks, p)
        }
        5..8 => (
            Kind::Plain,
            PLAIN_SIZE,
            m.kmem_cache_alloc(cs.plain, GFP_KERNEL).expect("alloc"),
        ),
        _ => {
            let p = m.kmem_cache_alloc(cs.ctor, GFP_KERNEL).expect("alloc");
            assert_eq!(
                &bytes(p.as_ptr() as usize, 8)[..],
                &CTOR_MAGIC[..],
                "{p:p}: not in its constructed state"
            );
            (Kind::Ctor, CTOR_SIZE, p)
        }
    };
    let addr = p.as_ptr() as usize;
    assert_eq!(addr % 8, 0);
    bytes(addr, len).copy_from_slice(pattern(tag, len));
    Obj {
        addr,
        len,
        kind,
        tag,
    }
}

fn verify(o: &Obj) {
    let b = bytes(o.addr, o.len);
    let want = pattern(o.tag, o.len);
    if b != want {
        let i = (0..o.len).find(|&i| b[i] != want[i]).unwrap();
        panic!(
            "object {:#x}+{} ({:?}, tag {}) changed at byte {i}: {:#x}, expected {:#x}",
            o.addr, o.len, o.kind, o.tag, b[i], want[i]
        );
    }
}

/// Verifies and frees an object (restoring a constructed object's state first).
fn free_obj(m: &Machine, cs: Caches<'_>, o: Obj) {
    verify(&o);
    match o.kind {
        // SAFETY: `o` is a live kmalloc allocation owned by this thread, forgotten here.
        Kind::Kmalloc => unsafe { m.kfree(o.addr as *mut u8) },
        // SAFETY: `o` is a live object of the plain cache owned by this thread.
        Kind::Plain => unsafe { m.kmem_cache_free(cs.plain, o.addr as *mut u8) },
        Kind::Ctor => {
            bytes(o.addr, 8).copy_from_slice(&CTOR_MAGIC);
            // SAFETY: `o` is a live object of the constructed cache owned by this thread,
            // back in its constructed state.
            unsafe { m.kmem_cache_free(cs.ctor, o.addr as *mut u8) }
        }
    }
}

/// A 4-vCPU machine with the two shared caches, and what boot left.
fn setup(m: &Machine) -> (Caches<'_>, Vec<[usize; NR_PAGE_ORDERS]>) {
    m.platform().take_log();
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
    let areas = m.free_area_counts();
    let plain = m
        .kmem_cache_create("stress-plain", PLAIN_SIZE, 0, SlabFlags::NO_MERGE, None)
        .expect("create");
    let ctor = m
        .kmem_cache_create("stress-ctor", CTOR_SIZE, 0, SlabFlags::NONE, Some(ctor))
        .expect("create");
    (Caches { plain, ctor }, areas)
}

fn machine() -> Machine {
    Machine::boot(MachineConfig::x86_64(128 * MIB).with_cpus(4)).expect("boot")
}

/// Everything freed: destroys the shared caches, shrinks the kmalloc caches, and checks the
/// machine is as boot left it.
fn assert_back_to_boot(m: &Machine, cs: Caches<'_>, areas: &[[usize; NR_PAGE_ORDERS]]) {
    m.validate().expect("validate after the run");
    for c in [cs.plain, cs.ctor] {
        assert_eq!(
            c.objects_in_use(m.nr_cpus()),
            0,
            "{}: no object in use",
            c.name()
        );
        // SAFETY: every object was freed; the caches are not used again.
        assert!(unsafe { m.kmem_cache_destroy(c) }, "destroy {}", c.name());
    }
    for t in [KmallocType::Normal, KmallocType::Reclaim, KmallocType::Dma] {
        for i in 1..NR_KMALLOC_INDEX {
            let c = m.kmalloc_caches().cache(t, i).expect("kmalloc cache");
            m.kmem_cache_shrink(c);
            assert_eq!(c.nr_slabs(), 0, "{}: empty after shrink", c.name());
        }
    }
    m.drain_all_pages();
    m.validate().expect("validate at the end");
    assert_eq!(m.nr_free_pages(), m.boot_free_pages(), "all memory back");
    assert_eq!(m.free_area_counts(), areas, "buddyinfo as after boot");
    assert_eq!(m.bad_page_reports(), 0);
    let log = m.platform().take_log();
    assert!(log.is_empty(), "reports: {log:#?}");
}

// ------------------------------------------------------------------------------- producer/consumer

fn producer(
    m: &Machine,
    cs: Caches<'_>,
    me: usize,
    ops: usize,
    tx: SyncSender<Obj>,
    sent: &AtomicUsize,
) {
    let mut rng = Rng::new(me as u64 + 1);
    let mut mine: Vec<Obj> = Vec::new();
    for i in 0..ops {
        let tag = (me << 40) | i;
        let o = alloc_obj(m, cs, &mut rng, tag);
        match rng.below(4) {
            0 => mine.push(o),
            _ => {
                tx.send(o).expect("consumer alive");
                sent.fetch_add(1, Relaxed);
            }
        }
        if mine.len() > 32 || (rng.below(8) == 0 && !mine.is_empty()) {
            let k = rng.below(mine.len());
            free_obj(m, cs, mine.swap_remove(k));
        }
    }
    for o in mine {
        free_obj(m, cs, o);
    }
}

fn consumer(m: &Machine, cs: Caches<'_>, rx: Receiver<Obj>, freed: &AtomicUsize) {
    while let Ok(o) = rx.recv() {
        free_obj(m, cs, o);
        freed.fetch_add(1, Relaxed);
    }
}

fn producer_consumer(ops: usize) {
    let m = machine();
    let (cs, areas) = setup(&m);
    let t0 = Instant::now();
    let watchdog = Watchdog::new("producer_consumer", Duration::from_secs(120));
    let (sent, freed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for pair in 0..2 {
            let (tx, rx) = sync_channel(256);
            let (m, sent, freed) = (&m, &sent, &freed);
            std::thread::Builder::new()
                .name(format!("producer-{pair}"))
                .spawn_scoped(s, move || producer(m, cs, pair, ops, tx, sent))
                .expect("spawn");
            std::thread::Builder::new()
                .name(format!("consumer-{pair}"))
                .spawn_scoped(s, move || consumer(m, cs, rx, freed))
                .expect("spawn");
        }
    });
    drop(watchdog);
    println!(
        "producer_consumer: {} sent, {} freed remotely, {:?}",
        sent.load(Relaxed),
        freed.load(Relaxed),
        t0.elapsed()
    );
    assert_eq!(sent.load(Relaxed), freed.load(Relaxed));
    assert!(sent.load(Relaxed) > ops);
    assert_back_to_boot(&m, cs, &areas);
}

/// Two producers allocate kmallocs of random sizes and objects of two shared caches, write
/// patterns and send most of them to their consumers, which verify and free them on other
/// CPUs. Everything ends as it began.
#[test]
fn producer_consumer_cross_cpu_frees() {
    producer_consumer(1_000_000);
}

/// [`producer_consumer_cross_cpu_frees`] with ten times the operations.
#[test]
#[ignore = "soak: long; run with --ignored"]
fn producer_consumer_cross_cpu_frees_soak() {
    producer_consumer(10_000_000);
}

// ------------------------------------------------------------------------------- swapping

fn swapper(
    m: &Machine,
    cs: Caches<'_>,
    me: usize,
    rounds: usize,
    tx: std::sync::mpsc::Sender<Vec<Obj>>,
    rx: Receiver<Vec<Obj>>,
    start: &Barrier,
) {
    let mut rng = Rng::new(100 + me as u64);
    start.wait();
    for r in 0..rounds {
        let n = 1 + rng.below(48);
        let batch: Vec<Obj> = (0..n)
            .map(|i| alloc_obj(m, cs, &mut rng, (me << 40) | (r << 8) | i))
            .collect();
        tx.send(batch).expect("peer alive");
        let theirs = rx.recv().expect("peer sends every round");
        for o in theirs {
            free_obj(m, cs, o);
        }
    }
}

fn swapping(rounds: usize) {
    let m = machine();
    let (cs, areas) = setup(&m);
    let t0 = Instant::now();
    let watchdog = Watchdog::new(
        "two_threads_free_each_others_objects",
        Duration::from_secs(120),
    );
    let start = Barrier::new(2);
    let (tx_a, rx_b) = channel();
    let (tx_b, rx_a) = channel();
    std::thread::scope(|s| {
        let (m, start) = (&m, &start);
        std::thread::Builder::new()
            .name("swap-a".into())
            .spawn_scoped(s, move || swapper(m, cs, 0, rounds, tx_a, rx_a, start))
            .expect("spawn");
        std::thread::Builder::new()
            .name("swap-b".into())
            .spawn_scoped(s, move || swapper(m, cs, 1, rounds, tx_b, rx_b, start))
            .expect("spawn");
    });
    drop(watchdog);
    println!(
        "two_threads_free_each_others_objects: {rounds} rounds, {:?}",
        t0.elapsed()
    );
    assert_back_to_boot(&m, cs, &areas);
}

/// Two threads each allocate a batch per round, swap batches and free each other's objects
/// at the same time.
#[test]
fn two_threads_free_each_others_objects() {
    swapping(40_000);
}

/// [`two_threads_free_each_others_objects`] with ten times the rounds.
#[test]
#[ignore = "soak: long; run with --ignored"]
fn two_threads_free_each_others_objects_soak() {
    swapping(400_000);
}

// ------------------------------------------------------------------------------- shrinking

fn shrink_race(ops: usize) {
    let m = machine();
    let (cs, areas) = setup(&m);
    let t0 = Instant::now();
    let watchdog = Watchdog::new("shrink_races_with_allocation", Duration::from_secs(120));
    let done = AtomicBool::new(false);
    let shrinks = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let (m, done, shrinks) = (&m, &done, &shrinks);
        std::thread::Builder::new()
            .name("shrinker".into())
            .spawn_scoped(s, move || {
                while !done.load(Relaxed) {
                    for c in [cs.plain, cs.ctor] {
                        m.kmem_cache_shrink(c);
                    }
                    let k = m.kmalloc_caches().cache(KmallocType::Normal, 8).unwrap();
                    m.kmem_cache_shrink(k);
                    shrinks.fetch_add(1, Relaxed);
                    std::thread::yield_now();
                }
            })
            .expect("spawn");
        let workers: Vec<_> = (0..3)
            .map(|me| {
                std::thread::Builder::new()
                    .name(format!("worker-{me}"))
                    .spawn_scoped(s, move || {
                        let mut rng = Rng::new(200 + me as u64);
                        let mut live: Vec<Obj> = Vec::new();
                        for i in 0..ops {
                            if live.len() < 64 && rng.below(2) == 0 {
                                live.push(alloc_obj(m, cs, &mut rng, (me << 40) | i));
                            } else if !live.is_empty() {
                                let k = rng.below(live.len());
                                free_obj(m, cs, live.swap_remove(k));
                            }
                        }
                        for o in live {
                            free_obj(m, cs, o);
                        }
                    })
                    .expect("spawn")
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        done.store(true, Relaxed);
    });
    drop(watchdog);
    println!(
        "shrink_races_with_allocation: {} shrink rounds, {:?}",
        shrinks.load(Relaxed),
        t0.elapsed()
    );
    assert!(shrinks.load(Relaxed) > 0);
    assert_back_to_boot(&m, cs, &areas);
}

/// One thread shrinks the shared caches (and kmalloc-256) in a loop while three threads
/// allocate and free: slabs are freed and made again under the allocators' feet.
#[test]
fn shrink_races_with_allocation() {
    shrink_race(1_000_000);
}

/// [`shrink_races_with_allocation`] with ten times the operations.
#[test]
#[ignore = "soak: long; run with --ignored"]
fn shrink_races_with_allocation_soak() {
    shrink_race(10_000_000);
}

// ------------------------------------------------------------------------------- create/destroy

fn create_destroy_race(iterations: usize) {
    let m = machine();
    m.platform().take_log();
    m.drain_all_pages();
    let areas = m.free_area_counts();
    let t0 = Instant::now();
    let watchdog = Watchdog::new("create_destroy_races_with_merging", Duration::from_secs(30));
    let refused = AtomicUsize::new(0);
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        for me in 0..3usize {
            let (m, refused, start) = (&m, &refused, &start);
            std::thread::Builder::new()
                .name(format!("creator-{me}"))
                .spawn_scoped(s, move || {
                    let name = format!("race-{me}");
                    start.wait();
                    for i in 0..iterations {
                        // Same size, no constructor: the three creators share one cache.
                        let c = m
                            .kmem_cache_create(&name, PLAIN_SIZE, 0, SlabFlags::NONE, None)
                            .expect("create");
                        let p = m.kmem_cache_alloc(c, GFP_KERNEL).expect("alloc");
                        let tag = (me << 40) | i;
                        bytes(p.as_ptr() as usize, PLAIN_SIZE)
                            .copy_from_slice(pattern(tag, PLAIN_SIZE));
                        verify(&Obj {
                            addr: p.as_ptr() as usize,
                            len: PLAIN_SIZE,
                            kind: Kind::Plain,
                            tag,
                        });
                        // SAFETY: `p` is a live object of `c`, freed once.
                        unsafe { m.kmem_cache_free(c, p.as_ptr()) };
                        // SAFETY: this creator holds no object of `c` and drops it here.
                        if !unsafe { m.kmem_cache_destroy(c) } {
                            refused.fetch_add(1, Relaxed);
                        }
                    }
                })
                .expect("spawn");
        }
    });
    drop(watchdog);
    println!(
        "create_destroy_races_with_merging: {} refused destroys, {:?}",
        refused.load(Relaxed),
        t0.elapsed()
    );
    let log = m.platform().take_log();
    assert!(log.is_empty(), "reports: {:#?}", &log[..log.len().min(20)]);
    assert_eq!(
        refused.load(Relaxed),
        0,
        "every destroy succeeds: each creator freed its objects"
    );
    m.validate().expect("validate");
    let mut left = Vec::new();
    m.slab().for_each_cache(|c| {
        if c.name().starts_with("race-") {
            left.push((c.name().to_owned(), c.refcount(), c.nr_slabs()));
        }
    });
    assert!(left.is_empty(), "caches left: {left:?}");
    for t in [KmallocType::Normal, KmallocType::Reclaim, KmallocType::Dma] {
        for i in 1..NR_KMALLOC_INDEX {
            m.kmem_cache_shrink(m.kmalloc_caches().cache(t, i).expect("kmalloc cache"));
        }
    }
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), m.boot_free_pages(), "all memory back");
    assert_eq!(m.free_area_counts(), areas);
}

/// Three threads create a cache each (all three merge into one), allocate, free and destroy
/// it, over and over: a destroy by the last creator must not race with a create that merges
/// into the dying cache. Every destroy succeeds and nothing is reported or lost.
#[test]
fn create_destroy_races_with_merging() {
    create_destroy_race(300_000);
}
