//! Multi-threaded stress tests of the page allocator.
//!
//! Several threads share a machine of 4 vCPUs — more threads than vCPUs, so vCPUs are shared
//! (a thread whose home vCPU is busy runs on another one) — and do random allocations and
//! frees of orders `0..=4` (mostly 0). Each block is filled with a pattern unique to the
//! block and its frames, and the pattern is checked before the block is freed: no block was
//! handed out twice or zeroed while live. A fraction of the blocks are sent to another thread
//! (as `(pfn, order, tag)` over a bounded `std::sync::mpsc` channel, found again with
//! `pfn_to_page`) and freed there, so pages go to another CPU's per-CPU list than the one
//! they came from. Meanwhile one thread drains every CPU's lists and checks the free lists
//! now and then, and the others drain their own.
//!
//! * [`cross_cpu_alloc_free`]: a roomy machine (128 MiB, at most ~7K pages out): order-0
//!   allocations must all succeed, higher orders may fail only rarely (fragmentation).
//! * [`sleeping_allocations_under_pressure`]: a machine first filled to its min watermark,
//!   then `GFP_KERNEL` allocations compete for a few dozen pages: the slow path (draining
//!   the per-CPU lists, waiting for frees, the OOM report) runs concurrently. Failures are
//!   allowed; the test must finish.
//!
//! Both end with everything freed and drained: `check_free_lists()` passes, nothing was
//! reported as a bug, and `nr_free_pages` and the buddyinfo numbers equal their values right
//! after boot. A watchdog aborts the run if a test hangs (a deadlock, or a cycle in a
//! corrupted list).
//! The `*_soak` variants (`#[ignore]`) run ten times as many operations.

mod common;
use common::{Rng, Watchdog};

use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use kmem::addr::{NR_PAGE_ORDERS, PAGE_SIZE, Pfn};
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;
const WORDS: usize = PAGE_SIZE / 8;
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// A live block: its first frame, order, and the tag its pattern was made from.
#[derive(Clone, Copy, Debug)]
struct Block {
    pfn: u64,
    order: u32,
    tag: u64,
}

/// The word every 8-byte slot of frame `pfn` of a block tagged `tag` holds.
fn pattern(tag: u64, pfn: u64) -> u64 {
    let mut z = (pfn ^ tag.rotate_left(29)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31) | 1
}

fn page_of(m: &Machine, pfn: u64) -> &Page {
    m.pfn_to_page(Pfn(pfn)).expect("pfn in mem_map")
}

/// The words of frame `pfn` (a page of a block this thread owns, in the direct map).
#[allow(clippy::mut_from_ref)]
fn words(m: &Machine, pfn: u64) -> &mut [u64] {
    let va = m
        .page_address(page_of(m, pfn))
        .expect("x86_64: every page is in the direct map");
    // SAFETY: `va` is the page-aligned direct-map address of frame `pfn`, a page of a live
    // block owned by the calling thread; nothing else accesses it until the block is freed or
    // sent away, and the returned slice is dropped before that.
    unsafe { std::slice::from_raw_parts_mut(va.as_ptr().cast::<u64>(), WORDS) }
}

/// Takes a freshly allocated block: checks it, zero-checks it if asked, writes its pattern.
fn adopt_new(m: &Machine, page: &Page, order: u32, gfp: Gfp, tag: u64) -> Block {
    let pfn = m.page_to_pfn(page).0;
    assert_eq!(
        pfn % (1 << order),
        0,
        "block {pfn:#x} misaligned for order {order}"
    );
    assert!(page.is_allocated());
    assert_eq!(page.order(), order);
    assert!(!gfp.contains(__GFP_DMA) || page.zone_index() == ZoneType::Dma.index());
    for i in 0..(1u64 << order) {
        let w = words(m, pfn + i);
        if gfp.contains(__GFP_ZERO) {
            // SAFETY: `w` is one page: WORDS u64s are PAGE_SIZE bytes.
            let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), PAGE_SIZE) };
            assert!(
                bytes == ZERO_PAGE,
                "__GFP_ZERO page {:#x} not zeroed",
                pfn + i
            );
        }
        w.copy_from_slice(&[pattern(tag, pfn + i); WORDS]);
    }
    Block { pfn, order, tag }
}

fn verify(m: &Machine, b: &Block) {
    for i in 0..(1u64 << b.order) {
        let want = pattern(b.tag, b.pfn + i);
        let w = words(m, b.pfn + i);
        if *w != [want; WORDS] {
            let bad = w.iter().position(|&x| x != want).expect("a word differs");
            panic!(
                "block {:#x}/{} (tag {:#x}): page {:#x} word {bad} is {:#x}, expected {want:#x}",
                b.pfn,
                b.order,
                b.tag,
                b.pfn + i,
                w[bad]
            );
        }
    }
}

fn free(m: &Machine, b: Block) {
    verify(m, &b);
    let page = page_of(m, b.pfn);
    assert!(
        page.is_allocated(),
        "block {:#x} not allocated at free",
        b.pfn
    );
    // SAFETY: `page` heads a live block of order `b.order` owned by this thread (allocated
    // here or received over a channel); it is forgotten after this call.
    unsafe { m.__free_pages(page, b.order) };
}

/// What boot left, to compare the end with.
struct Baseline {
    nr_free: usize,
    counts: Vec<[usize; NR_PAGE_ORDERS]>,
}

fn baseline(m: &Machine) -> Baseline {
    m.drain_all_pages();
    m.check_free_lists().expect("free lists after boot");
    Baseline {
        nr_free: m.nr_free_pages(),
        counts: m.free_area_counts(),
    }
}

/// Checks the end state against boot; returns the log (already checked for bug reports).
fn assert_back_to_boot(m: &Machine, b: &Baseline) -> Vec<String> {
    m.shrink_slab();
    m.drain_all_pages();
    assert_eq!(m.nr_pcp_pages(), 0);
    m.check_free_lists().expect("check_free_lists at the end");
    assert_eq!(
        m.nr_free_pages(),
        b.nr_free,
        "nr_free_pages differs from boot"
    );
    assert_eq!(m.nr_free_pages(), m.boot_free_pages(), "boot_free_pages");
    assert_eq!(
        m.free_area_counts(),
        b.counts,
        "buddyinfo differs from boot:\n{}",
        m.proc_buddyinfo()
    );
    assert_eq!(m.bad_page_reports(), 0, "bad page reports");
    let log = m.platform().take_log();
    let bugs: Vec<&String> = log.iter().filter(|l| l.contains("BUG")).collect();
    assert!(bugs.is_empty(), "reports: {bugs:#?}");
    log
}

/// Most blocks waiting in one thread's channel. A thread descheduled for long must not let
/// its peers' blocks pile up there without bound (they would exhaust the machine): a sender
/// finding the channel full frees the block itself.
const IN_FLIGHT: usize = 64;

/// How one stress run behaves.
#[derive(Clone, Copy)]
struct Plan {
    threads: usize,
    ops: usize,
    /// Most blocks a thread holds.
    max_live: usize,
    /// Masks drawn from.
    masks: &'static [Gfp],
    /// Memory stays mostly free: order-0 allocations must succeed, and higher orders may
    /// fail only through fragmentation (counted; asserted rare by the caller).
    strict: bool,
}

/// Counters over all threads.
#[derive(Default)]
struct Stats {
    allocs: AtomicUsize,
    failures: AtomicUsize,
    /// Failures of orders above 0.
    high_order_failures: AtomicUsize,
    local_frees: AtomicUsize,
    sent: AtomicUsize,
    drains: AtomicUsize,
}

fn random_order(rng: &mut Rng) -> u32 {
    match rng.below(100) {
        0..70 => 0,
        70..80 => 1,
        80..90 => 2,
        90..95 => 3,
        _ => 4,
    }
}

/// One thread's work: `plan.ops` random operations, then everything it holds or receives
/// is freed.
fn worker(
    m: &Machine,
    me: usize,
    plan: Plan,
    rx: Receiver<Block>,
    peers: Vec<SyncSender<Block>>,
    stats: &Stats,
    start: &Barrier,
) {
    start.wait();
    let mut rng = Rng::new(me as u64 + 1);
    let mut live: Vec<Block> = Vec::new();
    let mut seq = 0u64;
    for op in 0..plan.ops {
        // Blocks from other threads: verified on arrival, then freed here (a cross-CPU free)
        // or kept for later.
        while let Ok(b) = rx.try_recv() {
            verify(m, &b);
            if rng.below(2) == 0 || live.len() >= plan.max_live {
                free(m, b);
            } else {
                live.push(b);
            }
        }
        match rng.below(100) {
            0..50 if live.len() < plan.max_live => {
                let order = random_order(&mut rng);
                let mut gfp = plan.masks[rng.below(plan.masks.len())];
                if rng.below(4) == 0 {
                    gfp |= __GFP_ZERO;
                }
                if order > 0 && rng.below(3) == 0 {
                    gfp |= __GFP_COMP;
                }
                match m.alloc_pages(gfp, order) {
                    Some(page) => {
                        seq += 1;
                        let tag = ((me as u64) << 48) | seq;
                        live.push(adopt_new(m, page, order, gfp, tag));
                        stats.allocs.fetch_add(1, Relaxed);
                    }
                    None => {
                        assert!(
                            !(plan.strict && order == 0),
                            "thread {me}: {gfp:?} order 0 failed with memory mostly free:\n{}",
                            m.proc_buddyinfo()
                        );
                        stats.failures.fetch_add(1, Relaxed);
                        if order > 0 {
                            stats.high_order_failures.fetch_add(1, Relaxed);
                        }
                    }
                }
            }
            0..80 if !live.is_empty() => {
                let b = live.swap_remove(rng.below(live.len()));
                free(m, b);
                stats.local_frees.fetch_add(1, Relaxed);
            }
            0..96 if !live.is_empty() => {
                let b = live.swap_remove(rng.below(live.len()));
                verify(m, &b);
                let to = (me + 1 + rng.below(peers.len() - 1)) % peers.len();
                match peers[to].try_send(b) {
                    Ok(()) => {
                        stats.sent.fetch_add(1, Relaxed);
                    }
                    Err(TrySendError::Full(b)) => {
                        free(m, b);
                        stats.local_frees.fetch_add(1, Relaxed);
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        unreachable!("receivers live until every sender is gone")
                    }
                }
            }
            96.. if me == 0 && op % 4 == 0 => {
                m.drain_all_pages();
                m.check_free_lists()
                    .expect("check_free_lists while running");
                stats.drains.fetch_add(1, Relaxed);
            }
            96.. => {
                m.drain_local_pages();
            }
            _ => {}
        }
    }
    for b in live {
        free(m, b);
    }
    drop(peers);
    // Every other thread drops its senders when done: `recv` fails once all have.
    while let Ok(b) = rx.recv() {
        free(m, b);
    }
}

fn run(m: &Machine, plan: Plan) -> Stats {
    let stats = Stats::default();
    let start = Barrier::new(plan.threads);
    let (txs, rxs): (Vec<SyncSender<Block>>, Vec<Receiver<Block>>) =
        (0..plan.threads).map(|_| sync_channel(IN_FLIGHT)).unzip();
    std::thread::scope(|s| {
        for (me, rx) in rxs.into_iter().enumerate() {
            let peers = txs.clone();
            let (stats, start) = (&stats, &start);
            std::thread::Builder::new()
                .name(format!("stress-{me}"))
                .spawn_scoped(s, move || worker(m, me, plan, rx, peers, stats, start))
                .expect("spawn");
        }
        drop(txs);
    });
    stats
}

fn report(name: &str, m: &Machine, stats: &Stats, t0: Instant) {
    println!(
        "{name}: {} allocs, {} failures ({} above order 0), {} local frees, {} sent, \
         {} drains, {:?}; alloc_failures {}",
        stats.allocs.load(Relaxed),
        stats.failures.load(Relaxed),
        stats.high_order_failures.load(Relaxed),
        stats.local_frees.load(Relaxed),
        stats.sent.load(Relaxed),
        stats.drains.load(Relaxed),
        t0.elapsed(),
        m.alloc_failures(),
    );
}

/// Boots a 4-vCPU x86_64 machine of `ram` bytes whose slow path retries twice, `wait_ns`
/// apart.
fn boot(ram: u64, wait_ns: u64) -> Machine {
    let mut cfg = MachineConfig::x86_64(ram).with_cpus(4);
    cfg.kmem.reclaim_retries = 2;
    cfg.kmem.reclaim_wait_ns = wait_ns;
    Machine::boot(cfg).expect("boot")
}

/// Runs `plan` on `m` under a watchdog named `name` that aborts after `limit`, then prints
/// the run's report.
fn watched_run(name: &'static str, m: &Machine, limit: Duration, plan: Plan) -> Stats {
    let t0 = Instant::now();
    let watchdog = Watchdog::new(name, limit);
    let stats = run(m, plan);
    drop(watchdog);
    report(name, m, &stats, t0);
    stats
}

/// Masks of [`cross_cpu_alloc_free`]: at order 0 none may fail with this much memory free.
const CROSS_CPU_MASKS: &[Gfp] = &[
    GFP_KERNEL,
    GFP_KERNEL,
    GFP_ATOMIC.union(__GFP_NOWARN),
    GFP_NOWAIT.union(__GFP_NOWARN),
    GFP_KERNEL.union(GFP_DMA32),
];

fn cross_cpu(ops: usize) {
    let m = boot(128 * MIB, 100_000);
    let base = baseline(&m);
    let stats = watched_run(
        "cross_cpu_alloc_free",
        &m,
        Duration::from_secs(60 * ops as u64 / 30_000),
        Plan {
            threads: 6,
            ops,
            max_live: 48,
            masks: CROSS_CPU_MASKS,
            strict: true,
        },
    );
    assert!(stats.sent.load(Relaxed) > 0);
    // At most 6 * (48 + 64) blocks of 16 pages and the per-CPU lists are out of 28K pages:
    // a higher-order allocation fails only if fragmentation left no block of its order.
    let high = stats.high_order_failures.load(Relaxed);
    assert!(
        high * 100 <= stats.allocs.load(Relaxed),
        "{high} higher-order allocations failed with memory mostly free"
    );
    assert_back_to_boot(&m, &base);
}

/// Six threads on four vCPUs allocate, free locally and free each other's blocks; with 128
/// MiB and at most a few thousand pages live, every allocation succeeds.
#[test]
fn cross_cpu_alloc_free() {
    cross_cpu(30_000);
}

/// [`cross_cpu_alloc_free`] with ten times the operations.
#[test]
#[ignore = "soak: long; run with --ignored"]
fn cross_cpu_alloc_free_soak() {
    cross_cpu(300_000);
}

/// Masks of [`sleeping_allocations_under_pressure`]: mostly sleeping ones.
const PRESSURE_MASKS: &[Gfp] = &[
    GFP_KERNEL.union(__GFP_NOWARN),
    GFP_KERNEL.union(__GFP_NOWARN),
    GFP_KERNEL.union(__GFP_NOWARN),
    GFP_KERNEL.union(__GFP_NORETRY).union(__GFP_NOWARN),
    GFP_KERNEL.union(__GFP_RETRY_MAYFAIL).union(__GFP_NOWARN),
    GFP_ATOMIC.union(__GFP_NOWARN),
];

fn pressure(ops: usize) {
    let m = boot(24 * MIB, 200_000);
    let base = baseline(&m);

    // Ballast: fill the machine down to its min watermark (GFP_NOWAIT may not go lower),
    // then give a few dozen pages back.
    let mut ballast: Vec<(&Page, u32)> = Vec::new();
    for order in [3, 0] {
        while let Some(p) = m.alloc_pages(GFP_NOWAIT | __GFP_NOWARN, order) {
            ballast.push((p, order));
        }
    }
    let mut slack = 0;
    while slack < 48 {
        let (p, order) = ballast.pop().expect("ballast");
        // SAFETY: `p` was allocated above at `order` and is not used again.
        unsafe { m.__free_pages(p, order) };
        slack += 1 << order;
    }
    let stats = watched_run(
        "sleeping_allocations_under_pressure",
        &m,
        Duration::from_secs(60 * ops as u64 / 15_000),
        Plan {
            threads: 6,
            ops,
            max_live: 12,
            masks: PRESSURE_MASKS,
            strict: false,
        },
    );
    assert!(
        stats.failures.load(Relaxed) > 0,
        "no allocation failed: the machine was not under pressure"
    );
    assert!(stats.allocs.load(Relaxed) > 0);
    for (p, order) in ballast {
        // SAFETY: each ballast block was allocated above at `order` and is not used again.
        unsafe { m.__free_pages(p, order) };
    }
    let log = assert_back_to_boot(&m, &base);
    let ooms = log
        .iter()
        .filter(|l| l.contains("invoked oom-killer"))
        .count();
    println!("  OOM reports (slow path out of retries) among the last log lines: {ooms}");
}

/// `GFP_KERNEL` allocations from six threads on a machine at its min watermark: the slow
/// path drains, waits and gives up concurrently; everything ends as it began.
#[test]
fn sleeping_allocations_under_pressure() {
    pressure(15_000);
}

/// [`sleeping_allocations_under_pressure`] with ten times the operations.
#[test]
#[ignore = "soak: long; run with --ignored"]
fn sleeping_allocations_under_pressure_soak() {
    pressure(150_000);
}
