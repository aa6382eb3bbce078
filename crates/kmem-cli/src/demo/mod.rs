//! The demo: a tour of the whole memory-allocation subsystem on a booted machine.
//!
//! It starts with the page allocator (every zone and kind of mask, fragmentation, an
//! allocation failure, a double free), vmalloc and the slab layer, then runs LDD3 chapter 8's
//! sample drivers rebuilt on kmem ([`scull`]: scullc, scullp, scullv) from two threads with
//! per-CPU statistics, keeps a mempool-backed request path going on a machine with no free
//! memory, builds a scatter/gather buffer where no free block is larger than a page, frees
//! everything and checks that as many pages are free as after boot.
//!
//! Every step checks what it shows (zones chosen, zeroed pages, the failure report, data read
//! back byte for byte, sums of per-CPU counters, free pages back to their boot count); a check
//! that fails ends the demo with an error, so `kmem` exits non-zero rather than print a wrong
//! story.

use std::fmt::Arguments;
use std::io::{IsTerminal, Write};
use std::time::Instant;

use kmem::addr::{PAGE_SIZE, Pfn};
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem_hosted::Machine;

mod caches;
mod drivers;
mod pressure;
mod progress;
pub mod scull;

pub use progress::{Progress, Unit};

/// Where the demo's narration goes.
pub trait Narrator {
    /// A section heading.
    fn heading(&mut self, text: &str);
    /// A line of narration.
    fn say(&mut self, args: Arguments<'_>);
    /// A block of report text, printed as is.
    fn block(&mut self, text: &str);
    /// A progress bar for a step of `total` units named `what` (hidden unless overridden).
    fn progress(&mut self, what: &str, total: u64, unit: Unit) -> Progress {
        let _ = (what, total, unit);
        Progress::hidden()
    }
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
    /// Standard error is a terminal: progress bars may be drawn there.
    bars: bool,
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
    fn progress(&mut self, what: &str, total: u64, unit: Unit) -> Progress {
        // Whatever was narrated so far is on the screen before a bar can appear under it.
        let r = self.out.flush();
        self.emit(r);
        if self.bars {
            Progress::on_stderr(what, total, unit)
        } else {
            Progress::hidden()
        }
    }
}

/// Runs the demo on `machine`, narrating to `out` (with colour if `color`), and ends with the
/// `/proc` reports. Progress bars go to standard error when it is a terminal.
pub fn run(machine: &Machine, out: &mut impl Write, color: bool) -> Result<(), String> {
    let mut n = Console {
        out,
        color,
        bars: std::io::stderr().is_terminal(),
        error: None,
    };
    workload(machine, &mut n)?;
    n.heading("/proc/slabinfo (caches holding slabs)");
    n.block(&slabinfo_in_use(machine));
    n.heading("/proc/meminfo");
    n.block(&machine.proc_meminfo());
    match n.error {
        Some(e) => Err(format!("writing the output: {e}")),
        None => Ok(()),
    }
}

/// `/proc/slabinfo`'s header and the lines of the caches that hold slabs.
fn slabinfo_in_use(m: &Machine) -> String {
    let info = m.proc_slabinfo();
    let mut out = String::new();
    for (i, line) in info.lines().enumerate() {
        // `num_slabs` is the second field after "slabdata".
        let slabs = line
            .split(" : slabdata ")
            .nth(1)
            .and_then(|d| d.split_whitespace().nth(1))
            .and_then(|v| v.parse::<usize>().ok());
        if i < 2 || slabs.is_some_and(|s| s > 0) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Pages held by slabs (meminfo's `Slab`).
fn slab_pages(m: &Machine) -> usize {
    let (reclaimable, unreclaimable) = m.slab().slab_pages();
    reclaimable + unreclaimable
}

/// Every cache's empty slabs and cached objects given back to the page allocator.
pub(crate) fn shrink_all(m: &Machine) {
    let mut caches = Vec::new();
    m.slab()
        .for_each_cache(|c| caches.push(c as *const kmem::slab::KmemCache));
    for c in caches {
        // SAFETY: the demo destroys its own caches only after this returns, and the kmalloc
        // caches live as long as the machine: every cache listed is alive.
        m.kmem_cache_shrink(unsafe { &*c });
    }
}

/// `len` bytes of a deterministic pattern (xorshift64 from `seed`).
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Mebibytes per second for `bytes` in `secs`.
pub(crate) fn mib_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

fn zone_name(m: &Machine, p: &Page) -> &'static str {
    m.page_zone(p).name()
}

/// The whole tour (page allocator, vmalloc, slab layer, the scull drivers, memory pressure),
/// narrated to `n`. Leaves the machine as it booted; `kmem proc` runs it quietly.
pub fn workload(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    n.heading("Boot");
    for line in m.platform().take_log() {
        n.say(format_args!("  {line}"));
    }
    let boot_buddy = m.free_area_counts();
    let boot_free = m.nr_free_pages();
    let boot_slab = slab_pages(m);
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
    let mut dma_pages = Vec::new();
    while let Some(p) = m.alloc_pages(GFP_KERNEL | GFP_DMA | __GFP_NOWARN | __GFP_NORETRY, 0) {
        dma_pages.push(m.page_to_pfn(p));
    }
    let dma = dma_pages.len();
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
    let pfn = dma_pages.pop().ok_or("no DMA page to free twice")?;
    let (p, order) = (m.pfn_to_page(pfn).ok_or("lost a page")?, 0);
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
    // ZONE_DMA back: on a small machine it is most of the memory the next steps need.
    for pfn in dma_pages {
        let p = m.pfn_to_page(pfn).ok_or("lost a page")?;
        // SAFETY: each heads a live order-0 allocation made above, freed once.
        unsafe { m.__free_pages(p, 0) };
    }

    caches::vmalloc_tour(m, n)?;
    caches::slab_tour(m, n)?;
    drivers::tour(m, n)?;
    pressure::tour(m, n)?;

    // Free everything: the free lists must be exactly as after boot.
    n.heading("Freeing everything");
    for (pfn, order) in live.drain(..) {
        let p = m.pfn_to_page(pfn).ok_or("lost a page")?;
        // SAFETY: each entry heads a live allocation of `order` made above.
        unsafe { m.__free_pages(p, order) };
    }
    // SAFETY: `zp` came from get_zeroed_page above and is not used after this.
    unsafe { m.free_page(zp) };
    // Lazily freed vmap areas purged, every cache's free slabs and cached objects returned.
    m.vmalloc_space().vm_unmap_aliases(m.vm_ctx());
    shrink_all(m);
    let drained = m.drain_all_pages();
    m.validate()?;
    let free = m.nr_free_pages();
    n.say(format_args!(
        "  {drained} pages drained from per-CPU lists; free pages back to their boot count ({boot_free}): {}",
        if free == boot_free { "yes" } else { "NO" }
    ));
    if free != boot_free {
        return Err(format!(
            "{free} pages free after freeing everything, {boot_free} after boot"
        ));
    }
    let slab = slab_pages(m);
    if slab != boot_slab {
        return Err(format!("{slab} slab pages left, {boot_slab} after boot"));
    }
    if m.free_area_counts() == boot_buddy {
        n.say(format_args!("  buddyinfo back to its boot state: yes"));
    } else {
        // As many pages in use as after boot, slab pages included; but slab objects that
        // live from boot on (the vmap_area tree's nodes) may now sit in a slab page allocated
        // later, whose buddies are split where boot's page was not.
        n.say(format_args!(
            "  buddyinfo: the same pages free, split differently: the objects slabs kept since boot now sit in {} allocated later",
            if slab == 1 {
                "a page".to_string()
            } else {
                format!("{slab} pages")
            },
        ));
    }
    n.heading("/proc/buddyinfo");
    n.block(&m.proc_buddyinfo());
    Ok(())
}
