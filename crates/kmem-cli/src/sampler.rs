//! Snapshots of a running machine, and the workloads that drive it (for `kmem top` and
//! `kmem plot`).
//!
//! A [`Snapshot`] holds what `slabtop`, `/proc/buddyinfo`, `/proc/meminfo` and the kernel's
//! `extfrag_index` show: per cache the slabtop columns, per zone the free pages and free
//! blocks per order with the fragmentation index of every order, and the slab memory. It is
//! read from the core's accessors (the same ones the `/proc` reports use), not by parsing
//! report text.
//!
//! # Workloads
//!
//! A [`Workload`] is anything that advances a machine one step at a time: `step` does one
//! step's worth of work and returns `false` once the workload is over; `finish` gives back
//! whatever the workload still holds. A closure `FnMut(&Machine) -> bool` is a workload.
//! [`Churn`] is the built-in one: a seeded random churn of pages of mixed orders, kmalloc
//! objects of mixed sizes and objects of a lookaside cache, whose working sets grow and
//! shrink over time. [`TraceWorkload`] plugs a trace (a file, standard input or one of
//! `kmem_hosted::trace`'s built-in workloads) in at the same seam, a batch of operations per
//! step. [`with_workload`] builds the one the command line asks for (`--trace` or the churn)
//! and hands it to `kmem top` or `kmem plot`, which take a `&mut dyn Workload`: another kind
//! of workload only needs a `Workload` implementation and a case there.

use std::ptr::NonNull;

use kmem::addr::{NR_PAGE_ORDERS, PAGE_SIZE, Pfn};
use kmem::gfp::{__GFP_NORETRY, __GFP_NOWARN, __GFP_RECLAIMABLE, GFP_KERNEL, Gfp};
use kmem::report::MemInfo;
use kmem::slab::{KmemCache, SlabFlags};
use kmem_hosted::Machine;
use kmem_hosted::trace::{BUILTINS, Replayer, Trace};

/// One slab cache, as `slabtop` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheStat {
    /// The cache's name.
    pub name: String,
    /// Objects in use (`active_objs` of `/proc/slabinfo`: objects in CPU sheaves count).
    pub active_objs: usize,
    /// Objects in the cache's slabs (`num_objs`).
    pub num_objs: usize,
    /// Object size in bytes, padding included (`objsize`).
    pub obj_size: usize,
    /// Objects per slab (`objperslab`).
    pub objs_per_slab: usize,
    /// Pages per slab (`pagesperslab`).
    pub pages_per_slab: usize,
    /// Slabs (`num_slabs`).
    pub slabs: usize,
    /// Accounted as reclaimable (`SLAB_RECLAIM_ACCOUNT`): counts in `SReclaimable`.
    pub reclaimable: bool,
}

impl CacheStat {
    /// Bytes of the cache's slabs (slabtop's CACHE SIZE: slabs × pages per slab × page size).
    pub fn cache_size(&self) -> u64 {
        (self.slabs * self.pages_per_slab * PAGE_SIZE) as u64
    }

    /// Percentage of the objects in use (slabtop's USE), 0 for an empty cache.
    pub fn use_percent(&self) -> u32 {
        (self.active_objs * 100)
            .checked_div(self.num_objs)
            .map_or(0, |p| p as u32)
    }
}

/// One populated zone's free memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneStat {
    /// The zone's name ("DMA", "Normal", ...).
    pub name: &'static str,
    /// Pages handed to the buddy allocator.
    pub managed: usize,
    /// Free pages in the buddy lists.
    pub free_pages: usize,
    /// Free blocks per order (a `/proc/buddyinfo` line).
    pub free_blocks: [usize; NR_PAGE_ORDERS],
}

impl ZoneStat {
    /// The kernel's fragmentation index of every order (see [`fragmentation_index`]).
    pub fn extfrag(&self) -> [i32; NR_PAGE_ORDERS] {
        std::array::from_fn(|o| fragmentation_index(&self.free_blocks, o as u32))
    }
}

/// The kernel's external fragmentation index of a zone for an allocation of `order`
/// (`fragmentation_index` in `mm/vmstat.c`, as `/sys/kernel/debug/extfrag/extfrag_index`
/// shows it divided by 1000), from the zone's free blocks per order.
///
/// * `0` when the zone has no free block at all;
/// * `-1000` when a free block of `order` or larger exists (the request would succeed);
/// * otherwise `1000 - (1000 + free_pages * 1000 / requested) / free_blocks_total`, in
///   integer arithmetic as the kernel does: towards 1000 the request fails because memory is
///   fragmented, towards 0 because memory is short. (With few small blocks the kernel's
///   formula goes below 0, e.g. -500 for an order-1 request and a single free page; it is
///   reproduced as is.)
///
/// An order above `MAX_PAGE_ORDER` gives 0, as the kernel's warning path does.
pub fn fragmentation_index(free_blocks: &[usize], order: u32) -> i32 {
    if order as usize >= NR_PAGE_ORDERS {
        return 0;
    }
    let requested = 1u64 << order;
    let (mut free_pages, mut total, mut suitable) = (0u64, 0u64, 0u64);
    for (o, &blocks) in free_blocks.iter().enumerate().take(NR_PAGE_ORDERS) {
        let blocks = blocks as u64;
        total += blocks;
        free_pages += blocks << o;
        if o as u32 >= order {
            suitable += blocks << (o as u32 - order);
        }
    }
    if total == 0 {
        return 0;
    }
    if suitable != 0 {
        return -1000;
    }
    1000 - ((1000 + free_pages * 1000 / requested) / total) as i32
}

/// What a machine looks like at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Workload steps done when it was taken.
    pub step: u64,
    /// Every slab cache, in `/proc/slabinfo` order.
    pub caches: Vec<CacheStat>,
    /// Every populated zone, lowest first.
    pub zones: Vec<ZoneStat>,
    /// `MemTotal`, in pages.
    pub mem_total: usize,
    /// `MemFree`, in pages.
    pub mem_free: usize,
    /// `MemAvailable`, in pages.
    pub mem_available: usize,
    /// `SReclaimable`, in pages.
    pub slab_reclaimable: usize,
    /// `SUnreclaim`, in pages.
    pub slab_unreclaimable: usize,
    /// Page allocations that failed since boot.
    pub alloc_failures: usize,
}

impl Snapshot {
    /// Reads `m` now; `step` is the number of workload steps done.
    pub fn take(m: &Machine, step: u64) -> Snapshot {
        let mut caches = Vec::new();
        m.slab().for_each_cache(|c| {
            let num = c.total_objects();
            caches.push(CacheStat {
                name: c.name().to_string(),
                active_objs: num - c.free_objects().min(num),
                num_objs: num,
                obj_size: c.size(),
                objs_per_slab: c.objects_per_slab(),
                pages_per_slab: 1 << c.order(),
                slabs: c.nr_slabs(),
                reclaimable: c.flags().contains(SlabFlags::RECLAIM_ACCOUNT),
            });
        });
        let zones = m
            .zones()
            .iter()
            .filter(|z| z.configured && z.populated())
            .map(|z| ZoneStat {
                name: z.name(),
                managed: z.managed_pages,
                free_pages: z.free_pages(),
                free_blocks: std::array::from_fn(|o| z.nr_free(o as u32)),
            })
            .collect();
        let info = MemInfo::of(m.kmem());
        Snapshot {
            step,
            caches,
            zones,
            mem_total: info.total,
            mem_free: info.free,
            mem_available: info.available,
            slab_reclaimable: info.slab_reclaimable,
            slab_unreclaimable: info.slab_unreclaimable,
            alloc_failures: m.alloc_failures(),
        }
    }

    /// `Slab` (reclaimable and not), in pages.
    pub fn slab_pages(&self) -> usize {
        self.slab_reclaimable + self.slab_unreclaimable
    }
}

/// Something that advances a machine one step at a time (see the [module docs](self)).
pub trait Workload {
    /// Does one step on `m`; returns `false` when the workload is over (this step did
    /// nothing).
    fn step(&mut self, m: &Machine) -> bool;

    /// Gives back everything the workload still holds on `m` (called once, at the end or
    /// when the user stops early). An error says what was found wrong.
    fn finish(&mut self, m: &Machine) -> Result<(), String> {
        let _ = m;
        Ok(())
    }

    /// A short description for titles ("churn, seed 1").
    fn describe(&self) -> String {
        "workload".into()
    }
}

impl<F: FnMut(&Machine) -> bool> Workload for F {
    fn step(&mut self, m: &Machine) -> bool {
        self(m)
    }
}

/// Settings of [`Churn`].
#[derive(Clone, Debug)]
pub struct ChurnConfig {
    /// Steps before the workload is over.
    pub steps: u64,
    /// Seed of the random sequence (the same seed on the same machine gives the same run).
    pub seed: u64,
    /// Steps per full wave of the working sets.
    pub period: u64,
}

impl Default for ChurnConfig {
    fn default() -> ChurnConfig {
        ChurnConfig {
            steps: 300,
            seed: 1,
            period: 100,
        }
    }
}

/// The command-line options of the built-in workload (`kmem top`, `kmem plot`).
#[derive(clap::Args, Debug, Clone)]
pub struct WorkloadArgs {
    /// Steps of the built-in churn workload (pages, kmalloc and a lookaside cache whose
    /// working sets grow and shrink in waves).
    #[arg(long, value_name = "N", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub steps: u64,
    /// Seed of the churn's random sequence.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Steps per full wave of the churn's working sets.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=10_000_000))]
    pub period: u64,
    /// Replay a trace instead of the churn: a trace file, `-` for standard input, or
    /// `builtin:NAME` (see `kmem run --help` for the format and the built-in workloads).
    #[arg(long, value_name = "TRACE")]
    pub trace: Option<String>,
    /// With --trace: operations per step (default: the trace's length / 300, at least 1).
    #[arg(long, value_name = "N", requires = "trace", value_parser = clap::value_parser!(u64).range(1..))]
    pub ops_per_step: Option<u64>,
}

impl WorkloadArgs {
    /// The churn these options describe.
    pub fn config(&self) -> ChurnConfig {
        ChurnConfig {
            steps: self.steps,
            seed: self.seed,
            period: self.period,
        }
    }
}

/// Reads and checks a trace: a file, `-` (standard input) or `builtin:NAME`.
pub fn load_trace(source: &str) -> Result<Trace, String> {
    if let Some(name) = source.strip_prefix("builtin:") {
        return Trace::builtin(name).ok_or_else(|| {
            let names: Vec<&str> = BUILTINS.iter().map(|(n, _)| *n).collect();
            format!(
                "no built-in workload \"{name}\" (there are: {})",
                names.join(", ")
            )
        });
    }
    let (name, text) = if source == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| format!("cannot read the trace from standard input: {e}"))?;
        ("<stdin>", s)
    } else {
        let s = std::fs::read_to_string(source)
            .map_err(|e| format!("cannot read the trace {source}: {e}"))?;
        (source, s)
    };
    Trace::parse(&text).map_err(|e| format!("{name}:{}: {}", e.line, e.message))
}

/// A trace replayed as a workload: `ops_per_step` operations per step; `finish` frees what
/// the trace left allocated.
pub struct TraceWorkload<'m> {
    replayer: Replayer<'m>,
    machine: &'m Machine,
    ops_per_step: u64,
    name: String,
}

impl<'m> TraceWorkload<'m> {
    /// `trace` on `m`, `ops_per_step` operations per step (at least 1).
    pub fn new(m: &'m Machine, trace: &'m Trace, ops_per_step: u64, name: &str) -> Self {
        TraceWorkload {
            replayer: Replayer::new(m, trace),
            machine: m,
            ops_per_step: ops_per_step.max(1),
            name: name.to_string(),
        }
    }
}

impl Workload for TraceWorkload<'_> {
    fn step(&mut self, m: &Machine) -> bool {
        if self.replayer.finished() || !std::ptr::eq(m, self.machine) {
            return false;
        }
        for _ in 0..self.ops_per_step {
            if self.replayer.step().is_none() {
                break;
            }
        }
        true
    }

    fn finish(&mut self, m: &Machine) -> Result<(), String> {
        if !std::ptr::eq(m, self.machine) {
            return Err("the trace was given another machine than its own".into());
        }
        self.replayer.release();
        Ok(())
    }

    fn describe(&self) -> String {
        let stats = self.replayer.stats();
        format!(
            "trace {}, op {}/{}, {} failed allocations",
            self.name,
            stats.ops,
            self.replayer.trace().len(),
            stats.failures
        )
    }
}

/// Builds the workload `args` ask for on `m` (the trace of `--trace`, or the churn) and runs
/// `f` with it.
pub fn with_workload(
    m: &Machine,
    args: &WorkloadArgs,
    f: impl FnOnce(&mut dyn Workload) -> Result<(), String>,
) -> Result<(), String> {
    match &args.trace {
        Some(source) => {
            let trace = load_trace(source)?;
            let ops = args
                .ops_per_step
                .unwrap_or_else(|| (trace.len() as u64).div_ceil(300));
            f(&mut TraceWorkload::new(m, &trace, ops, source))
        }
        None => f(&mut Churn::new(m, args.config())?),
    }
}

/// Name of [`Churn`]'s lookaside cache.
pub const CHURN_CACHE: &str = "churn_dentry";
/// Object size of [`Churn`]'s lookaside cache.
pub const CHURN_OBJECT_SIZE: usize = 192;

/// The built-in workload: a seeded random churn over pages, kmalloc and a lookaside cache.
///
/// Each step moves three working sets towards targets that follow slow waves of different
/// periods (so memory fills, drains and fragments over time), and churns each set by
/// freeing random members and allocating new ones:
///
/// * pages of orders 0 to 9 (mostly small; now and then 2 MiB), up to 85% of the memory
///   free at the start, with `GFP_KERNEL | __GFP_NOWARN | __GFP_NORETRY` (a failure is
///   counted, not reported); freeing random blocks among the others fragments the free
///   lists, and the large requests use up the large free blocks;
/// * kmalloc objects of sizes 8 to 8192 bytes (log-uniform), a quarter of them
///   `__GFP_RECLAIMABLE` (the `kmalloc-rcl-*` caches), up to about 3% of memory;
/// * objects of [`CHURN_CACHE`], a reclaimable (`SLAB_RECLAIM_ACCOUNT`), unmerged
///   (`SLAB_NO_MERGE`, so it shows under its own name) lookaside cache of
///   [`CHURN_OBJECT_SIZE`]-byte objects, up to about 5% of memory, shrunk
///   (`kmem_cache_shrink`) whenever its population falls, as a shrinker would.
pub struct Churn {
    cfg: ChurnConfig,
    rng: u64,
    step: u64,
    free_at_start: usize,
    pages: Vec<(Pfn, u32)>,
    live_pages: usize,
    kmallocs: Vec<NonNull<u8>>,
    objs: Vec<NonNull<u8>>,
    cache: Option<NonNull<KmemCache>>,
    /// The machine everything above lives on (its kmem instance), to refuse another one.
    owner: *const kmem::Kmem<kmem_hosted::platform::HostedPlatform>,
    failures: u64,
}

/// Relative weights of page orders 0..=9 (order 9: 2 MiB, a huge page's worth).
const ORDER_WEIGHTS: [u32; 10] = [46, 18, 12, 9, 6, 4, 2, 1, 1, 1];
const PAGE_GFP: Gfp = GFP_KERNEL.union(__GFP_NOWARN).union(__GFP_NORETRY);

impl Churn {
    /// A churn on `m` (creates its lookaside cache).
    pub fn new(m: &Machine, cfg: ChurnConfig) -> Result<Churn, String> {
        let cache = m
            .kmem_cache_create(
                CHURN_CACHE,
                CHURN_OBJECT_SIZE,
                0,
                SlabFlags::RECLAIM_ACCOUNT | SlabFlags::HWCACHE_ALIGN | SlabFlags::NO_MERGE,
                None,
            )
            .ok_or_else(|| format!("kmem_cache_create({CHURN_CACHE}) failed"))?;
        Ok(Churn {
            rng: cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            cfg,
            step: 0,
            free_at_start: m.nr_free_pages(),
            pages: Vec::new(),
            live_pages: 0,
            kmallocs: Vec::new(),
            objs: Vec::new(),
            cache: Some(NonNull::from(cache)),
            owner: m.kmem(),
            failures: 0,
        })
    }

    /// xorshift64*.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// A wave in [0, 1] of `period_scale` times the configured period, shifted by `phase`.
    fn wave(&self, period_scale: f64, phase: f64) -> f64 {
        let period = self.cfg.period.max(1) as f64 * period_scale;
        let x = self.step as f64 / period * std::f64::consts::TAU + phase;
        0.5 - 0.5 * x.cos()
    }

    /// True when `m` is the machine this churn was created on.
    fn owned_by(&self, m: &Machine) -> bool {
        std::ptr::eq(self.owner, m.kmem())
    }

    fn cache<'m>(&self, m: &'m Machine) -> Option<&'m KmemCache> {
        if !self.owned_by(m) {
            return None;
        }
        // SAFETY: the cache was created on `m` (checked above), which outlives the borrow,
        // and is only destroyed in `finish`, which clears `self.cache` first.
        self.cache.map(|c| unsafe { c.as_ref() })
    }

    fn alloc_block(&mut self, m: &Machine) {
        let mut pick = self.below(ORDER_WEIGHTS.iter().sum::<u32>() as usize) as u32;
        let mut order = 0;
        for (o, &w) in ORDER_WEIGHTS.iter().enumerate() {
            if pick < w {
                order = o as u32;
                break;
            }
            pick -= w;
        }
        match m.alloc_pages(PAGE_GFP, order) {
            Some(p) => {
                self.pages.push((m.page_to_pfn(p), order));
                self.live_pages += 1 << order;
            }
            None => self.failures += 1,
        }
    }

    fn free_block(&mut self, m: &Machine) {
        if self.pages.is_empty() {
            return;
        }
        let i = self.below(self.pages.len());
        let (pfn, order) = self.pages.swap_remove(i);
        let page = m.pfn_to_page(pfn).expect("a live block's frame");
        // SAFETY: `page` heads a live block of `order` this workload allocated; it is
        // removed from the list, so it is freed once.
        unsafe { m.__free_pages(page, order) };
        self.live_pages -= 1 << order;
    }

    fn kmalloc_one(&mut self, m: &Machine) {
        // Log-uniform in 8..=8192: 2^(3 + 10 * u).
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let size = (2f64.powf(3.0 + 10.0 * u) as usize).clamp(8, 8192);
        let gfp = if self.below(4) == 0 {
            GFP_KERNEL | __GFP_RECLAIMABLE
        } else {
            GFP_KERNEL
        };
        match m.kmalloc(size, gfp | __GFP_NOWARN) {
            Some(p) => self.kmallocs.push(p),
            None => self.failures += 1,
        }
    }

    fn kfree_one(&mut self, m: &Machine) {
        if self.kmallocs.is_empty() {
            return;
        }
        let i = self.below(self.kmallocs.len());
        let p = self.kmallocs.swap_remove(i);
        // SAFETY: a live kmalloc object of this workload, removed from the list.
        unsafe { m.kfree(p.as_ptr()) };
    }

    fn obj_alloc(&mut self, m: &Machine) {
        let Some(cache) = self.cache(m) else { return };
        match m.kmem_cache_alloc(cache, GFP_KERNEL | __GFP_NOWARN) {
            Some(p) => self.objs.push(p),
            None => self.failures += 1,
        }
    }

    fn obj_free(&mut self, m: &Machine) {
        let Some(cache) = self.cache(m) else { return };
        if self.objs.is_empty() {
            return;
        }
        let i = self.below(self.objs.len());
        let p = self.objs.swap_remove(i);
        // SAFETY: a live object of `cache`, removed from the list.
        unsafe { m.kmem_cache_free(cache, p.as_ptr()) };
    }
}

impl Workload for Churn {
    fn step(&mut self, m: &Machine) -> bool {
        if self.step >= self.cfg.steps || !self.owned_by(m) {
            return false;
        }
        let free0 = self.free_at_start;
        // Moves per step: a twentieth of the range, so a half wave takes about ten steps.
        let page_target = (0.85 * free0 as f64 * (0.1 + 0.9 * self.wave(1.0, 0.0))) as usize;
        let page_moves = free0 / 20;
        let mut budget = page_moves;
        while self.live_pages < page_target && budget > 0 {
            self.alloc_block(m);
            budget = budget.saturating_sub(1 << self.pages.last().map_or(0, |b| b.1));
        }
        budget = page_moves;
        while self.live_pages > page_target && budget > 0 {
            self.free_block(m);
            budget -= 1;
        }
        // Churn: replace a fiftieth of the blocks.
        for _ in 0..self.pages.len() / 50 {
            self.free_block(m);
            self.alloc_block(m);
        }

        let bytes = free0 * PAGE_SIZE;
        let kmalloc_max = bytes * 3 / 100 / 1200; // about 1.2 KiB on average per object
        let kmalloc_target = (kmalloc_max as f64 * self.wave(0.7, 1.0)) as usize;
        let moves = kmalloc_max / 8 + 1;
        for _ in 0..moves {
            match self.kmallocs.len().cmp(&kmalloc_target) {
                std::cmp::Ordering::Less => self.kmalloc_one(m),
                std::cmp::Ordering::Greater => self.kfree_one(m),
                std::cmp::Ordering::Equal => break,
            }
        }
        for _ in 0..self.kmallocs.len() / 20 {
            self.kfree_one(m);
            self.kmalloc_one(m);
        }

        let obj_max = bytes * 5 / 100 / CHURN_OBJECT_SIZE;
        let obj_target = (obj_max as f64 * self.wave(1.6, 2.0)) as usize;
        let before = self.objs.len();
        for _ in 0..obj_max / 8 + 1 {
            match self.objs.len().cmp(&obj_target) {
                std::cmp::Ordering::Less => self.obj_alloc(m),
                std::cmp::Ordering::Greater => self.obj_free(m),
                std::cmp::Ordering::Equal => break,
            }
        }
        if self.objs.len() < before {
            if let Some(cache) = self.cache(m) {
                m.kmem_cache_shrink(cache);
            }
        }
        self.step += 1;
        true
    }

    fn finish(&mut self, m: &Machine) -> Result<(), String> {
        if !self.owned_by(m) {
            return Err("the churn was given another machine than its own".into());
        }
        while !self.pages.is_empty() {
            self.free_block(m);
        }
        while !self.kmallocs.is_empty() {
            self.kfree_one(m);
        }
        while !self.objs.is_empty() {
            self.obj_free(m);
        }
        if let Some(cache) = self.cache(m) {
            self.cache = None;
            // SAFETY: every object of the cache was freed above, and `self.cache` is cleared
            // so nothing uses it after this.
            if !unsafe { m.kmem_cache_destroy(cache) } {
                return Err(format!(
                    "kmem_cache_destroy({CHURN_CACHE}) found objects left"
                ));
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "churn, seed {}, step {}/{}, {} failed allocations",
            self.cfg.seed, self.step, self.cfg.steps, self.failures
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmem_hosted::MachineConfig;

    /// Blocks per order with `n` free blocks of `order`.
    fn blocks(list: &[(usize, usize)]) -> [usize; NR_PAGE_ORDERS] {
        let mut b = [0; NR_PAGE_ORDERS];
        for &(order, n) in list {
            b[order] = n;
        }
        b
    }

    #[test]
    fn fragmentation_index_matches_the_kernel_formula_by_hand() {
        // No free block at all: 0.
        assert_eq!(fragmentation_index(&[0; NR_PAGE_ORDERS], 3), 0);
        // A suitable block exists (order 4 serves order 3): -1000.
        assert_eq!(fragmentation_index(&blocks(&[(4, 1)]), 3), -1000);
        assert_eq!(fragmentation_index(&blocks(&[(0, 5), (3, 1)]), 3), -1000);
        // 64 free order-0 pages, order-3 request: requested 8, free_pages 64, total 64:
        // 1000 - (1000 + 64000 / 8) / 64 = 1000 - 9000 / 64 = 1000 - 140 = 860.
        assert_eq!(fragmentation_index(&blocks(&[(0, 64)]), 3), 860);
        // 10 order-0 and 10 order-1 blocks, order-2 request: free_pages 30, total 20:
        // 1000 - (1000 + 30000 / 4) / 20 = 1000 - 8500 / 20 = 1000 - 425 = 575.
        assert_eq!(fragmentation_index(&blocks(&[(0, 10), (1, 10)]), 2), 575);
        // 1000 order-2 blocks, order-10 request: free_pages 4000, total 1000:
        // 1000 - (1000 + 4000000 / 1024) / 1000 = 1000 - 4906 / 1000 = 1000 - 4 = 996.
        assert_eq!(fragmentation_index(&blocks(&[(2, 1000)]), 10), 996);
        // One free page, order-1 request: 1000 - (1000 + 500) / 1 = -500 (the kernel's
        // formula leaves [0, 1000] here, and so does this one).
        assert_eq!(fragmentation_index(&blocks(&[(0, 1)]), 1), -500);
        // Order 0 always succeeds when anything is free.
        assert_eq!(fragmentation_index(&blocks(&[(0, 1)]), 0), -1000);
        // Beyond MAX_PAGE_ORDER: 0.
        assert_eq!(fragmentation_index(&blocks(&[(0, 64)]), 11), 0);
    }

    #[test]
    fn zone_extfrag_is_the_index_per_order() {
        let z = ZoneStat {
            name: "Normal",
            managed: 0,
            free_pages: 0,
            free_blocks: blocks(&[(0, 64), (2, 3)]),
        };
        let e = z.extfrag();
        assert_eq!(&e[..3], &[-1000, -1000, -1000]);
        // Order 3: free_pages 76, total 67: 1000 - (1000 + 76000 / 8) / 67 = 1000 - 156.
        assert_eq!(e[3], 844);
        // Order 10: 1000 - (1000 + 76000 / 1024) / 67 = 1000 - 1074 / 67 = 1000 - 16.
        assert_eq!(e[10], 984);
    }

    #[test]
    fn snapshot_agrees_with_the_proc_files() {
        let m = Machine::boot(MachineConfig::x86_64(64 << 20)).unwrap();
        let mut churn = Churn::new(&m, ChurnConfig::default()).unwrap();
        for _ in 0..20 {
            assert!(churn.step(&m));
        }
        let s = Snapshot::take(&m, 20);
        let buddy = m.proc_buddyinfo();
        for (z, line) in s.zones.iter().zip(buddy.lines()) {
            let counts: Vec<usize> = line[22..]
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            assert_eq!(counts, z.free_blocks, "{line}");
            assert!(line.contains(z.name));
        }
        assert_eq!(s.zones.len(), buddy.lines().count());
        let slabinfo = m.proc_slabinfo();
        let rows: Vec<&str> = slabinfo.lines().skip(2).collect();
        assert_eq!(rows.len(), s.caches.len());
        for (c, row) in s.caches.iter().zip(rows) {
            let f: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(f[0], c.name);
            let n = |i: usize| f[i].parse::<usize>().unwrap();
            assert_eq!(
                (n(1), n(2), n(3), n(4), n(5), n(14)),
                (
                    c.active_objs,
                    c.num_objs,
                    c.obj_size,
                    c.objs_per_slab,
                    c.pages_per_slab,
                    c.slabs
                ),
                "{row}"
            );
        }
        let churn_cache = s.caches.iter().find(|c| c.name == CHURN_CACHE).unwrap();
        assert!(churn_cache.reclaimable && churn_cache.active_objs > 0);
        let meminfo = m.proc_meminfo();
        let kb = |key: &str| -> usize {
            let line = meminfo.lines().find(|l| l.starts_with(key)).unwrap();
            line[key.len()..]
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse()
                .unwrap()
        };
        assert_eq!(kb("MemFree:"), s.mem_free * 4);
        assert_eq!(kb("SReclaimable:"), s.slab_reclaimable * 4);
        assert_eq!(kb("SUnreclaim:"), s.slab_unreclaimable * 4);
        assert_eq!(kb("Slab:"), s.slab_pages() * 4);
        churn.finish(&m).unwrap();
    }

    #[test]
    fn churn_grows_shrinks_fragments_and_gives_everything_back() {
        let m = Machine::boot(MachineConfig::x86_64(64 << 20)).unwrap();
        kmem_bench::settle(&m);
        let free_before = m.nr_free_pages();
        let cfg = ChurnConfig {
            steps: 120,
            seed: 7,
            period: 60,
        };
        let mut churn = Churn::new(&m, cfg).unwrap();
        let mut snaps = vec![Snapshot::take(&m, 0)];
        let mut steps = 0;
        while churn.step(&m) {
            steps += 1;
            snaps.push(Snapshot::take(&m, steps));
        }
        assert_eq!(steps, 120, "the workload ends after its steps");
        assert!(!churn.step(&m), "and stays over");
        let free: Vec<usize> = snaps.iter().map(|s| s.mem_free).collect();
        let slab: Vec<usize> = snaps.iter().map(|s| s.slab_reclaimable).collect();
        let (fmin, fmax) = (free.iter().min().unwrap(), free.iter().max().unwrap());
        // Memory fills to well over half, and drains again.
        assert!(*fmin < free_before / 2, "min free {fmin} of {free_before}");
        let after_low = free.iter().position(|f| f == fmin).unwrap();
        assert!(free[after_low..].iter().any(|f| f > &(fmin * 2)));
        assert!(*fmax > free_before / 2);
        // Reclaimable slab memory rises and falls (the lookaside cache grows and shrinks).
        let fell = (0..slab.len())
            .any(|i| slab[i] > slab[0] + 100 && slab[i..].iter().any(|&later| later < slab[i] / 2));
        assert!(fell, "{slab:?}");
        // At some point a large block cannot be had although memory is free: the index of
        // some order is positive while pages are free.
        let fragmented = snaps.iter().any(|s| {
            s.zones
                .iter()
                .any(|z| z.free_pages > 0 && z.extfrag().iter().any(|&i| i > 0))
        });
        assert!(fragmented, "the churn never fragmented a zone");
        churn.finish(&m).unwrap();
        kmem_bench::settle(&m);
        m.validate().unwrap();
        assert_eq!(m.nr_free_pages(), free_before, "everything given back");
        assert_eq!(m.bad_page_reports(), 0);
        assert!(m.slab().find_cache(CHURN_CACHE).is_none());
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let run = |seed| {
            let m = Machine::boot(MachineConfig::x86_64(32 << 20)).unwrap();
            let cfg = ChurnConfig {
                steps: 30,
                seed,
                period: 20,
            };
            let mut churn = Churn::new(&m, cfg).unwrap();
            while churn.step(&m) {}
            let s = Snapshot::take(&m, 30);
            churn.finish(&m).unwrap();
            (s.zones, s.caches)
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3).0, run(4).0);
    }

    #[test]
    fn a_churn_refuses_another_machine() {
        let m = Machine::boot(MachineConfig::x86_64(32 << 20)).unwrap();
        let other = Machine::boot(MachineConfig::x86_64(32 << 20)).unwrap();
        let mut churn = Churn::new(&m, ChurnConfig::default()).unwrap();
        assert!(churn.step(&m));
        let free = other.nr_free_pages();
        assert!(!churn.step(&other), "no step on a machine it does not own");
        assert!(churn.finish(&other).is_err());
        assert_eq!(
            other.nr_free_pages(),
            free,
            "nothing done on the other machine"
        );
        churn.finish(&m).unwrap();
    }

    #[test]
    fn a_trace_is_a_workload() {
        let m = Machine::boot(MachineConfig::x86_64(64 << 20)).unwrap();
        kmem_bench::settle(&m);
        let free = m.nr_free_pages();
        let trace = Trace::parse(
            "kmalloc a 64 GFP_KERNEL\nalloc_pages p 2 GFP_KERNEL\nkmalloc b 3000 GFP_KERNEL\nkfree a\nvmalloc v 64K\n",
        )
        .unwrap();
        let mut w = TraceWorkload::new(&m, &trace, 2, "test");
        assert!(w.step(&m));
        let in_use = free - (m.nr_free_pages() + m.nr_pcp_pages());
        assert!(in_use > 4, "the order-2 block and a slab: {in_use}");
        assert!(w.describe().starts_with("trace test, op 2/5"));
        assert!(w.step(&m) && w.step(&m), "2 + 2 + 1 operations");
        assert!(!w.step(&m), "over");
        w.finish(&m).unwrap();
        kmem_bench::settle(&m);
        assert_eq!(m.nr_free_pages(), free, "finish frees what the trace left");
        let other = Machine::boot(MachineConfig::x86_64(32 << 20)).unwrap();
        let mut w = TraceWorkload::new(&m, &trace, 1, "test");
        assert!(!w.step(&other) && w.finish(&other).is_err());
    }

    #[test]
    fn traces_load_from_builtins_and_files_with_clear_errors() {
        assert!(load_trace("builtin:fragment").unwrap().len() > 100);
        let e = load_trace("builtin:nope").unwrap_err();
        assert!(
            e.contains("no built-in workload \"nope\"") && e.contains("churn"),
            "{e}"
        );
        let e = load_trace("/nonexistent/trace").unwrap_err();
        assert!(
            e.starts_with("cannot read the trace /nonexistent/trace"),
            "{e}"
        );
        let path = std::env::temp_dir().join(format!("kmem-sampler-trace-{}", std::process::id()));
        std::fs::write(&path, "kmalloc a 64 GFP_KERNEL\nfrobnicate a\n").unwrap();
        let e = load_trace(path.to_str().unwrap()).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains(":2: "), "the line of the error: {e}");
    }

    #[test]
    fn a_closure_is_a_workload() {
        let m = Machine::boot(MachineConfig::x86_64(32 << 20)).unwrap();
        let mut n = 0;
        let mut w = |_: &Machine| {
            n += 1;
            n < 3
        };
        let w: &mut dyn Workload = &mut w;
        assert!(w.step(&m) && w.step(&m) && !w.step(&m));
        assert!(w.finish(&m).is_ok());
    }
}
