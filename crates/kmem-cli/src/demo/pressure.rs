//! Memory pressure: a mempool-backed request path that keeps going on a machine with no free
//! memory, then a scatter/gather buffer on memory where no free block is larger than a page.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::sync_channel;

use kmem::addr::{MAX_PAGE_ORDER, PAGE_SIZE};
use kmem::boxed::KMempool;
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem::platform::{CpuGuard, Platform};
use kmem::sg::{sg_alloc_buffer, sg_copy_from_buffer, sg_copy_to_buffer, sg_free_buffer};
use kmem_hosted::Machine;
use kmem_hosted::platform::HostedPlatform;

use super::{Narrator, Unit, pattern, shrink_all};

/// A request as a block driver keeps one per I/O in flight: what it must be able to allocate
/// to make progress (and so, eventually, give memory back) when memory is short.
#[repr(C)]
struct Request {
    id: u64,
    sector: u64,
    payload: [u8; 240],
}

impl Request {
    fn new(id: u64) -> Request {
        Request {
            id,
            sector: id * 8,
            payload: std::array::from_fn(|i| (id as u8).wrapping_add(i as u8)),
        }
    }

    /// The request still holds what [`Request::new`] put in it.
    fn intact(&self) -> bool {
        self.sector == self.id * 8
            && self
                .payload
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (self.id as u8).wrapping_add(i as u8))
    }
}

/// Requests the pool keeps in reserve (`min_nr`).
const RESERVE: usize = 16;
/// Requests pushed through the pool while memory is exhausted.
const REQUESTS: u64 = 10_000;
/// Pages taken before memory runs out, to be freed as a checkerboard later (on machines of
/// 512 MiB and more; smaller ones take 1/8 of their RAM).
const FRAG_PAGES: usize = 16384;
/// The scatter/gather buffer, at most.
const SG_BYTES: usize = 8 << 20;

/// "8 MiB", "499 kB".
fn size_str(bytes: usize) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} kB", bytes / 1024)
    }
}

/// Takes every free page of every zone, reserves included, largest blocks first.
fn exhaust(m: &Machine) -> Vec<(&Page, u32)> {
    let gfp = GFP_ATOMIC | __GFP_HIGHMEM | __GFP_MEMALLOC | __GFP_NOWARN;
    let mut hog = Vec::new();
    for order in (0..=MAX_PAGE_ORDER).rev() {
        while let Some(p) = m.alloc_pages(gfp, order) {
            hog.push((p, order));
        }
    }
    hog
}

/// The pressure tour; leaves nothing allocated but empty slabs in the kmalloc caches.
pub fn tour(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    let k = m.kmem();
    let size = size_of::<Request>();
    n.heading("Out of memory: a mempool keeps the request path going");
    // A clean start: no free slab or per-CPU page hides memory from the count below.
    shrink_all(m);
    m.drain_all_pages();
    let pool: KMempool<'_, Request, HostedPlatform> =
        KMempool::new(k, RESERVE).map_err(|_| "mempool_create_kmalloc_pool failed")?;
    n.say(format_args!(
        "  mempool_create_kmalloc_pool({RESERVE}, {size}): {} requests reserved",
        pool.curr_nr()
    ));

    // Taken now, while memory is plentiful; freed as a checkerboard for the sg buffer.
    let frag_pages = FRAG_PAGES.min(m.totalram_pages() / 8);
    let mut frag = Vec::with_capacity(frag_pages);
    for _ in 0..frag_pages {
        frag.push(
            m.alloc_pages(GFP_KERNEL, 0)
                .ok_or("the pages to fragment could not be allocated")?,
        );
    }

    let hog = exhaust(m);
    n.say(format_args!(
        "  every free page taken: alloc_pages(GFP_ATOMIC|__GFP_HIGHMEM|__GFP_MEMALLOC|__GFP_NOWARN, order)"
    ));
    let mut objs = Vec::new();
    while let Some(p) = m.kmalloc(size, GFP_ATOMIC | __GFP_NOWARN) {
        objs.push(p);
    }
    let hog_pages: usize = hog.iter().map(|&(_, o)| 1usize << o).sum();
    n.say(format_args!(
        "  from order {MAX_PAGE_ORDER} down, each until it fails: {hog_pages} pages in {} blocks{}; MemFree {} kB",
        hog.len(),
        if objs.is_empty() {
            String::new()
        } else {
            format!(", and the {} free objects of kmalloc-{size}", objs.len())
        },
        m.nr_free_pages() * PAGE_SIZE / 1024,
    ));
    let _ = m.platform().take_log();
    if let Some(p) = m.kmalloc(size, GFP_ATOMIC) {
        // SAFETY: just allocated, not used.
        unsafe { m.kfree(p.as_ptr()) };
        return Err("kmalloc succeeded on a machine with no free memory".into());
    }
    let report = m.platform().take_log();
    let first = report
        .iter()
        .find(|l| l.contains("page allocation failure"))
        .ok_or("no allocation-failure report for kmalloc")?;
    n.say(format_args!("  kmalloc({size}, GFP_ATOMIC) fails:"));
    n.say(format_args!("  | {first}"));

    // A caller that may not sleep gets the reserve, then a refusal.
    let mut held = Vec::new();
    let refused = loop {
        match pool.alloc(Request::new(held.len() as u64), GFP_ATOMIC) {
            Ok(r) => held.push(r),
            Err(e) => break e.into_inner(),
        }
        if held.len() > RESERVE {
            return Err("the pool served more GFP_ATOMIC requests than it reserves".into());
        }
    };
    if held.len() != RESERVE || refused.id != RESERVE as u64 {
        return Err(format!(
            "GFP_ATOMIC: {} requests served from a reserve of {RESERVE}",
            held.len()
        ));
    }
    drop(held);
    n.say(format_args!(
        "  GFP_ATOMIC: {RESERVE} requests served from the reserve, the next refused at once (it may not sleep) and handed back"
    ));

    // A submitter that may sleep and a completion on another CPU: each completion refills
    // the reserve and wakes the submitter.
    let progress = n.progress("requests", REQUESTS, Unit::Items);
    let in_flight = AtomicUsize::new(0);
    let max_in_flight = AtomicUsize::new(0);
    let (tx, rx) = sync_channel(RESERVE);
    let (submitted, completed) = std::thread::scope(|s| {
        let (pool, in_flight, max_in_flight, progress) =
            (&pool, &in_flight, &max_in_flight, &progress);
        let submitter = s.spawn(move || {
            let cpu = m.platform().cpu_guard().cpu();
            let mut empty = 0;
            for id in 0..REQUESTS {
                // Racy, as a statistic may be: a completion may refill it right after.
                empty += u64::from(pool.curr_nr() == 0);
                let r = pool
                    .alloc(Request::new(id), GFP_NOIO)
                    .map_err(|_| "a GFP_NOIO request failed")?;
                let now = in_flight.fetch_add(1, Relaxed) + 1;
                max_in_flight.fetch_max(now, Relaxed);
                tx.send(r).map_err(|_| "the completion side went away")?;
            }
            Ok::<_, String>((REQUESTS, empty, cpu))
        });
        let completion = s.spawn(move || {
            let cpu = m.platform().cpu_guard().cpu();
            let (mut done, mut damaged) = (0u64, 0u64);
            for r in rx {
                damaged += u64::from(!r.intact());
                // Counted out before the element goes back, so the count never runs ahead.
                in_flight.fetch_sub(1, Relaxed);
                drop(r);
                done += 1;
                progress.inc(1);
            }
            (done, damaged, cpu)
        });
        let submitted = submitter
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        let completed = completion
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        (submitted, completed)
    });
    drop(progress);
    let (requests, empty, sub_cpu) = submitted?;
    let (done, damaged, comp_cpu) = completed;
    if done != requests || damaged != 0 {
        return Err(format!(
            "{requests} requests submitted, {done} completed, {damaged} damaged"
        ));
    }
    if let Some(p) = m.kmalloc(size, GFP_ATOMIC | __GFP_NOWARN) {
        // SAFETY: just allocated, not used.
        unsafe { m.kfree(p.as_ptr()) };
        return Err("kmalloc succeeded again while memory was exhausted".into());
    }
    n.say(format_args!(
        "  GFP_NOIO, submitter on cpu{sub_cpu}, completion on cpu{comp_cpu}: kmalloc failed while {done} requests were served"
    ));
    n.say(format_args!(
        "  at most {} in flight; the submitter found the reserve empty {empty} times, and mempool_alloc then waits for a completion instead of failing",
        max_in_flight.load(Relaxed)
    ));

    n.heading("Fragmented memory: a scatter/gather buffer larger than any free block");
    // Free the pages taken earlier, but never two buddies (frames `pfn` and `pfn ^ 1`):
    // with every other page in use, no free page can merge into a larger block.
    let taken = frag.len();
    let mut kept = Vec::new();
    let mut freed_pfns = HashSet::new();
    for p in frag {
        let pfn = m.page_to_pfn(p).0;
        if freed_pfns.contains(&(pfn ^ 1)) {
            kept.push(p);
        } else {
            // SAFETY: an order-0 page allocated above, freed once, never used.
            unsafe { m.__free_pages(p, 0) };
            freed_pfns.insert(pfn);
        }
    }
    let freed = freed_pfns.len();
    m.drain_all_pages();
    n.block(&m.proc_buddyinfo());
    let largest = m
        .free_area_counts()
        .iter()
        .filter_map(|orders| orders.iter().rposition(|&c| c > 0))
        .max()
        .ok_or("no free block at all")?;
    let sg_bytes = SG_BYTES.min(freed * PAGE_SIZE / 4);
    if sg_bytes <= PAGE_SIZE << largest {
        return Err(format!(
            "the largest free block (order {largest}) is not smaller than the buffer ({sg_bytes} bytes, {freed} pages freed)"
        ));
    }
    let table = sg_alloc_buffer(k, sg_bytes, GFP_KERNEL)
        .ok_or_else(|| format!("sg_alloc_buffer({sg_bytes}) failed with {freed} pages free"))?;
    let data = pattern(sg_bytes, 0x5ca7);
    let mut back = vec![0u8; sg_bytes];
    // SAFETY: the buffer is ours alone until it is freed below.
    let (wrote, read) = unsafe {
        (
            sg_copy_from_buffer(k.pages(), &table, &data),
            sg_copy_to_buffer(k.pages(), &table, &mut back),
        )
    };
    let largest_entry = table.iter().map(|e| e.length()).max().unwrap_or(0);
    let (nents, chunks) = (table.nents(), table.nr_chunks());
    // SAFETY: the table came from sg_alloc_buffer above, unchanged, and is not used again.
    unsafe { sg_free_buffer(k, table) };
    if wrote != sg_bytes || read != sg_bytes || back != data {
        return Err("the scatter/gather buffer did not read back what was written".into());
    }
    n.say(format_args!(
        "  {freed} of {taken} pages taken earlier freed, never two buddies: the largest free block is order {largest} ({} kB)",
        (PAGE_SIZE << largest) / 1024
    ));
    n.say(format_args!(
        "  sg_alloc_buffer({}, GFP_KERNEL): {nents} entries of at most {} kB in {}",
        size_str(sg_bytes),
        largest_entry / 1024,
        if chunks == 1 {
            "one chunk".to_string()
        } else {
            format!("{chunks} chained chunks")
        },
    ));
    n.say(format_args!(
        "  written and read back through sg_copy_from_buffer/sg_copy_to_buffer, verified"
    ));

    for p in kept {
        // SAFETY: order-0 pages allocated above, freed once, never used.
        unsafe { m.__free_pages(p, 0) };
    }
    for (p, order) in hog {
        // SAFETY: each heads a live block of `order` pages taken by `exhaust`, freed once.
        unsafe { m.__free_pages(p, order) };
    }
    for p in objs {
        // SAFETY: live kmalloc allocations made above, freed once, never used.
        unsafe { m.kfree(p.as_ptr()) };
    }
    drop(pool);
    m.drain_all_pages();
    n.say(format_args!(
        "  everything released, the pool destroyed: MemFree {} kB",
        m.nr_free_pages() * PAGE_SIZE / 1024
    ));
    Ok(())
}
