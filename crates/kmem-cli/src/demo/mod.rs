//! The demo workload: a tour of the page allocator on a booted machine.
//!
//! Every step checks what it shows (zones chosen, zeroed pages, the failure report, the
//! bad-free report, buddyinfo back to its boot state); a check that fails ends the demo with an
//! error, so `kmem` exits non-zero rather than print a wrong story.

use std::fmt::Arguments;
use std::io::Write;
use std::time::Instant;

use kmem::addr::{PAGE_SIZE, Pfn};
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem_hosted::Machine;

/// Where the demo's narration goes.
pub trait Narrator {
    /// A section heading.
    fn heading(&mut self, text: &str);
    /// A line of narration.
    fn say(&mut self, args: Arguments<'_>);
    /// A block of report text, printed as is.
    fn block(&mut self, text: &str);
}

/// Discards the narration (`kmem proc`).
pub struct Quiet;

impl Narrator for Quiet {
    fn heading(&mut self, _: &str) {}
    fn say(&mut self, _: Arguments<'_>) {}
    fn block(&mut self, _: &str) {}
}

struct Console<'a, W: Write> {
    out: &'a mut W,
    color: bool,
    error: Option<std::io::Error>,
}

impl<W: Write> Console<'_, W> {
    fn emit(&mut self, r: std::io::Result<()>) {
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }
}

impl<W: Write> Narrator for Console<'_, W> {
    fn heading(&mut self, text: &str) {
        let r = if self.color {
            writeln!(self.out, "\n\x1b[1;36m== {text}\x1b[0m")
        } else {
            writeln!(self.out, "\n== {text}")
        };
        self.emit(r);
    }
    fn say(&mut self, args: Arguments<'_>) {
        let r = writeln!(self.out, "{args}");
        self.emit(r);
    }
    fn block(&mut self, text: &str) {
        let r = self.out.write_all(text.as_bytes());
        self.emit(r);
    }
}

/// Runs the demo on `machine`, narrating to `out`, and ends with the `/proc` reports.
pub fn run(machine: &Machine, out: &mut impl Write, color: bool) -> Result<(), String> {
    let mut n = Console {
        out,
        color,
        error: None,
    };
    workload(machine, &mut n)?;
    n.heading("/proc/meminfo");
    n.block(&machine.proc_meminfo());
    match n.error {
        Some(e) => Err(format!("writing the output: {e}")),
        None => Ok(()),
    }
}

fn zone_name(m: &Machine, p: &Page) -> &'static str {
    m.page_zone(p).name()
}

/// The page-allocator workload, narrated to `n`. Leaves the machine as it booted.
pub fn workload(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    n.heading("Boot");
    for line in m.platform().take_log() {
        n.say(format_args!("  {line}"));
    }
    let boot_buddy = m.free_area_counts();
    let boot_free = m.nr_free_pages();
    n.heading("/proc/buddyinfo after boot");
    n.block(&m.proc_buddyinfo());

    // Allocations of every kind, remembered as (pfn, order) to free later.
    n.heading("Allocating");
    let mut live: Vec<(Pfn, u32)> = Vec::new();
    let mut take = |gfp: Gfp, order: u32, count: usize, what: &str| -> Result<(), String> {
        let t = Instant::now();
        let mut zones = std::collections::BTreeMap::new();
        for _ in 0..count {
            let p = m
                .alloc_pages(gfp, order)
                .ok_or_else(|| format!("{what}: allocation failed"))?;
            *zones.entry(zone_name(m, p)).or_insert(0usize) += 1;
            live.push((m.page_to_pfn(p), order));
        }
        let ns = t.elapsed().as_nanos() as f64 / count as f64;
        let from: Vec<String> = zones.iter().map(|(z, c)| format!("{c} from {z}")).collect();
        n.say(format_args!(
            "  {what:<44} {count:>5} x order {order}: {} ({ns:.0} ns each)",
            from.join(", ")
        ));
        Ok(())
    };
    // Sized for machines of 64 MiB and more; smaller ones get proportionally less.
    let scale = |n: usize| (n * m.totalram_pages() / 16384).clamp(1, n);
    let kernel_pages = scale(4096);
    let steps: [(Gfp, u32, usize, &str); 6] = [
        (GFP_KERNEL, 0, kernel_pages, "GFP_KERNEL (may sleep)"),
        (
            GFP_ATOMIC,
            0,
            scale(256),
            "GFP_ATOMIC (never sleeps, may use reserves)",
        ),
        (
            GFP_KERNEL | __GFP_DMA32,
            3,
            scale(64),
            "GFP_KERNEL|__GFP_DMA32 (below 4 GiB)",
        ),
        (
            GFP_KERNEL | GFP_DMA,
            0,
            16,
            "GFP_KERNEL|GFP_DMA (below 16 MiB)",
        ),
        (
            GFP_HIGHUSER,
            0,
            scale(64),
            "GFP_HIGHUSER (HighMem if the machine has it)",
        ),
        (
            GFP_KERNEL | __GFP_COMP,
            9,
            scale(8),
            "GFP_KERNEL|__GFP_COMP (2 MiB compound)",
        ),
    ];
    for (gfp, order, count, what) in steps {
        take(gfp, order, count, what)?;
    }

    let zp = m
        .get_zeroed_page(GFP_KERNEL)
        .ok_or("get_zeroed_page failed")?;
    // SAFETY: `zp` is the direct-map address of a live page we own.
    let page = unsafe { std::slice::from_raw_parts(zp.as_ptr(), PAGE_SIZE) };
    if page.iter().any(|&b| b != 0) {
        return Err("get_zeroed_page returned a page that is not zero".into());
    }
    n.say(format_args!(
        "  get_zeroed_page: {zp:?}, all {PAGE_SIZE} bytes zero"
    ));

    // Fragment: free every other order-0 page.
    n.heading("Fragmenting: freeing every other GFP_KERNEL page");
    let mut kept = Vec::new();
    for (i, &(pfn, order)) in live.iter().enumerate() {
        if order == 0 && i < kernel_pages && i % 2 == 0 {
            let p = m.pfn_to_page(pfn).ok_or("lost a page")?;
            // SAFETY: `p` heads a live allocation of `order` made above, not used again.
            unsafe { m.__free_pages(p, order) };
        } else {
            kept.push((pfn, order));
        }
    }
    live = kept;
    m.drain_all_pages();
    n.block(&m.proc_buddyinfo());

    // An allocation failure: exhaust ZONE_DMA, then ask once more without __GFP_NOWARN.
    n.heading("Exhausting ZONE_DMA: GFP_DMA fails and the kernel's report is printed");
    let mut dma = 0;
    while let Some(p) = m.alloc_pages(GFP_KERNEL | GFP_DMA | __GFP_NOWARN | __GFP_NORETRY, 0) {
        live.push((m.page_to_pfn(p), 0));
        dma += 1;
    }
    let _ = m.platform().take_log();
    if m.alloc_pages(GFP_NOWAIT | GFP_DMA, 0).is_some() {
        return Err("GFP_DMA succeeded on an exhausted ZONE_DMA".into());
    }
    n.say(format_args!(
        "  took {dma} more DMA pages; the next GFP_NOWAIT|GFP_DMA page:"
    ));
    let report = m.platform().take_log();
    if !report
        .iter()
        .any(|l| l.contains("page allocation failure: order:0"))
    {
        return Err("no allocation-failure report".into());
    }
    for line in report.iter().take(4) {
        n.say(format_args!("  | {line}"));
    }

    // Bad input: a double free is reported and changes nothing.
    n.heading("A double free is reported, and changes nothing");
    let (pfn, order) = live.pop().ok_or("nothing live")?;
    let p = m.pfn_to_page(pfn).ok_or("lost a page")?;
    // SAFETY: `p` heads a live allocation; the second free below is the bad input under
    // demonstration and is rejected by the allocator without touching the page.
    unsafe {
        m.__free_pages(p, order);
        m.__free_pages(p, order);
    }
    let report = m.platform().take_log();
    if !report.iter().any(|l| l.contains("BUG: Bad page state")) {
        return Err("the double free was not reported".into());
    }
    for line in report.iter().take(4) {
        n.say(format_args!("  | {line}"));
    }

    vmalloc_tour(m, n)?;
    slab_tour(m, n)?;

    // Free everything: the free lists must be exactly as after boot.
    n.heading("Freeing everything");
    for (pfn, order) in live.drain(..) {
        let p = m.pfn_to_page(pfn).ok_or("lost a page")?;
        // SAFETY: each entry heads a live allocation of `order` made above.
        unsafe { m.__free_pages(p, order) };
    }
    // SAFETY: `zp` came from get_zeroed_page above and is not used after this.
    unsafe { m.free_page(zp) };
    let drained = m.drain_all_pages();
    m.validate()?;
    let same = m.free_area_counts() == boot_buddy && m.nr_free_pages() == boot_free;
    n.say(format_args!(
        "  {drained} pages drained from per-CPU lists; buddyinfo back to its boot state: {}",
        if same { "yes" } else { "NO" }
    ));
    if !same {
        return Err("buddyinfo differs from its boot state after freeing everything".into());
    }
    n.heading("/proc/buddyinfo");
    n.block(&m.proc_buddyinfo());
    Ok(())
}

/// A quantum of a scull-like device: a constructed object from a lookaside cache.
const QUANTUM: usize = 4000;

fn quantum_ctor(p: *mut u8) {
    // SAFETY: the slab layer passes a fresh object of QUANTUM bytes.
    unsafe { core::ptr::write_bytes(p, 0, QUANTUM) };
    CTOR_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

static CTOR_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Lookaside caches and kmalloc: a cache with a constructor, every kmalloc class, a large
/// kmalloc, the bad-free reports; leaves nothing allocated and the caches shrunk.
fn slab_tour(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    use kmem::slab::SlabFlags;
    use std::sync::atomic::Ordering::Relaxed;

    n.heading("A lookaside cache: kmem_cache_create(\"scullc\", 4000, ctor)");
    let cache = m
        .kmem_cache_create(
            "scullc",
            QUANTUM,
            0,
            SlabFlags::HWCACHE_ALIGN,
            Some(quantum_ctor),
        )
        .ok_or("kmem_cache_create failed")?;
    let ctor_before = CTOR_CALLS.load(Relaxed);
    let mut quanta = Vec::new();
    let t = Instant::now();
    for i in 0..64u8 {
        let q = m
            .kmem_cache_alloc(cache, GFP_KERNEL)
            .ok_or("kmem_cache_alloc failed")?;
        // SAFETY: a live object of QUANTUM bytes.
        unsafe { core::ptr::write_bytes(q.as_ptr(), i, QUANTUM) };
        quanta.push(q);
    }
    let alloc_ns = t.elapsed().as_nanos() as f64 / 64.0;
    let ctors = CTOR_CALLS.load(Relaxed) - ctor_before;
    n.say(format_args!(
        "  64 quanta allocated ({alloc_ns:.0} ns each): {} objects per {}-page slab, {} slabs, constructor ran {ctors} times",
        cache.objects_per_slab(),
        1 << cache.order(),
        cache.nr_slabs(),
    ));
    if ctors != cache.objects_per_slab() * cache.nr_slabs() {
        return Err("the constructor did not run exactly once per object of each new slab".into());
    }
    for (i, q) in quanta.iter().enumerate() {
        // SAFETY: each quantum is live and was filled with its index above.
        let ok = unsafe { std::slice::from_raw_parts(q.as_ptr(), QUANTUM) }
            .iter()
            .all(|&b| b == i as u8);
        if !ok {
            return Err(format!("quantum {i} did not read back what was written"));
        }
        // Return it constructed (zeroed), as the cache's contract asks.
        // SAFETY: as above; it is not used after the free.
        unsafe {
            core::ptr::write_bytes(q.as_ptr(), 0, QUANTUM);
            m.kmem_cache_free(cache, q.as_ptr());
        }
    }
    n.say(format_args!(
        "  all 64 read back what was written, and went back to the cache"
    ));
    for line in m
        .proc_slabinfo()
        .lines()
        .filter(|l| l.starts_with("scullc "))
    {
        n.say(format_args!("  | {line}"));
    }

    n.heading("kmalloc: every size class, and a large allocation");
    let mut ptrs = Vec::new();
    for size in [
        1usize, 8, 13, 64, 65, 100, 192, 300, 1000, 3000, 8192, 100_000,
    ] {
        let p = m
            .kmalloc(size, GFP_KERNEL)
            .ok_or_else(|| format!("kmalloc({size}) failed"))?;
        let ks = m.ksize(p.as_ptr());
        if ks < size {
            return Err(format!("ksize({size}) = {ks}"));
        }
        ptrs.push((size, ks, p));
    }
    let line: Vec<String> = ptrs.iter().map(|(s, k, _)| format!("{s}->{k}")).collect();
    n.say(format_args!("  kmalloc(size) -> ksize: {}", line.join(" ")));
    let info = m.proc_slabinfo();
    for l in info.lines().skip(2) {
        let active: usize = l[18..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if active > 0 && l.starts_with("kmalloc-") {
            n.say(format_args!("  | {l}"));
        }
    }
    for (_, _, p) in ptrs {
        // SAFETY: each pointer is a live kmalloc allocation, freed once.
        unsafe { m.kfree(p.as_ptr()) };
    }

    n.heading("Bad frees are reported, and change nothing");
    let _ = m.platform().take_log();
    let p = m.kmalloc(64, GFP_KERNEL).ok_or("kmalloc failed")?;
    // SAFETY: bad input on purpose: an object freed to the wrong cache, then a double free;
    // the allocator rejects both without touching memory.
    unsafe {
        m.kmem_cache_free(cache, p.as_ptr());
        m.kfree(p.as_ptr());
        m.kfree(p.as_ptr());
    }
    let report = m.platform().take_log();
    if report.len() < 2 {
        return Err("the bad frees were not reported".into());
    }
    for line in report.iter().filter(|l| l.starts_with("BUG")) {
        n.say(format_args!("  | {line}"));
    }
    m.validate()?;

    // SAFETY: every object was freed above; the cache is not used again.
    if !unsafe { m.kmem_cache_destroy(cache) } {
        return Err("kmem_cache_destroy found objects left".into());
    }
    let mut caches = Vec::new();
    m.slab()
        .for_each_cache(|c| caches.push(c as *const kmem::slab::KmemCache));
    for c in caches {
        // SAFETY: kmalloc caches live as long as the machine.
        m.kmem_cache_shrink(unsafe { &*c });
    }
    Ok(())
}

/// vmalloc and a scatter/gather buffer: virtually contiguous memory from scattered pages.
fn vmalloc_tour(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    n.heading("vmalloc: 1 MiB, virtually contiguous, physically scattered");
    let size = 1 << 20;
    let p = m.vmalloc(size).ok_or("vmalloc failed")?;
    // SAFETY: a live vmalloc area of `size` bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    if buf.iter().enumerate().any(|(i, &b)| b != (i % 251) as u8) {
        return Err("the vmalloc area did not read back what was written".into());
    }
    let pfns: Vec<u64> = (0..size / PAGE_SIZE)
        .filter_map(|i| m.vmalloc_to_pfn(buf[i * PAGE_SIZE..].as_ptr()).map(|f| f.0))
        .collect();
    let runs = 1 + pfns.windows(2).filter(|w| w[1] != w[0] + 1).count();
    n.say(format_args!(
        "  {} pages at {:p}: {} physically contiguous runs, read back intact",
        pfns.len(),
        p.as_ptr(),
        runs
    ));
    for line in m.proc_vmallocinfo().lines() {
        n.say(format_args!("  | {line}"));
    }
    // SAFETY: `p` is the live area allocated above, not used after this.
    unsafe { m.vfree(p.as_ptr()) };
    m.vmalloc_space().vm_unmap_aliases(m.vm_ctx());
    Ok(())
}
