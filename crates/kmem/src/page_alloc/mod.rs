//! The page allocator: zones, the buddy allocator and per-CPU page lists.
//!
//! An allocation walks the zonelist from the highest zone its GFP mask allows down to DMA
//! (`get_page_from_freelist`); in each zone it checks the watermark, then takes a block from
//! the current CPU's list (orders `0..=3`) or from the buddy lists under the zone lock. When
//! every zone is below its mark, the slow path ([`slowpath`]) lowers the mark as the mask
//! entitles, reclaims (shrinkers, draining per-CPU lists) and waits for frees.
//!
//! # Lock order
//!
//! 1. a CPU guard ([`Platform::cpu_guard`] / [`Platform::lock_cpu`]): guards that CPU's lists;
//! 2. `Zone::lock`: guards the zone's free lists and counters.
//!
//! A zone lock is never held while taking a CPU guard. Shrinkers run with no lock held.
//!
//! # Descriptor states
//!
//! See [`page`]: every page is reserved, a free buddy head, on a per-CPU list, an allocation
//! head, a compound tail, or an anonymous part of a free block or allocation. Frees check the
//! state, so a double free, a wrong order or a stray pointer is reported ([`check`]) and
//! changes nothing.

mod boot;
pub mod check;
mod highmem;
pub mod mem_map;
pub mod page;
pub mod pcp;
pub mod slowpath;
pub mod zone;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub use boot::{BootError, BootInfo};
use mem_map::MemMap;
use page::{Page, pg};
use pcp::{PCP_MAX_ORDER, PerCpuPages};
pub use slowpath::Shrinker;
use zone::{Wmark, Zone};

use crate::addr::{MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, Pfn, VirtAddr, get_order};
use crate::config::Config;
use crate::gfp::{
    __GFP_COMP, __GFP_HIGHMEM, __GFP_ZERO, GFP_ZONEMASK, Gfp, MAX_NR_ZONES, gfpflags_allow_blocking,
};
use crate::platform::{CpuGuard, Platform};

/// Allocation flags derived from the GFP mask (`ALLOC_*` in `mm/internal.h`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AllocFlags(pub u32);

impl AllocFlags {
    /// Check against the min watermark.
    pub const WMARK_MIN: u32 = Wmark::Min as u32;
    /// Check against the low watermark (the fast path).
    pub const WMARK_LOW: u32 = Wmark::Low as u32;
    /// Mask of the watermark index.
    pub const WMARK_MASK: u32 = 3;
    /// Skip the watermark check (`__GFP_MEMALLOC`).
    pub const NO_WATERMARKS: u32 = 4;
    /// OOM victim: may use half of what is left below the mark.
    pub const OOM: u32 = 8;
    /// `__GFP_HIGH`: may use half of the min reserve.
    pub const MIN_RESERVE: u32 = 0x20;
    /// Cannot block (`GFP_ATOMIC`): with `MIN_RESERVE`, a further quarter.
    pub const NON_BLOCK: u32 = 0x100;

    const fn wmark(self) -> usize {
        (self.0 & Self::WMARK_MASK) as usize
    }
    const fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
}

/// Index value meaning "invalid zone modifiers" in the zone table.
const BAD_ZONE: u8 = u8::MAX;

/// The zones an allocation may use, best first (`struct zonelist`): the populated zones at or
/// below its highest zone, highest first. Precomputed at boot for each highest zone, so the
/// fast path never looks at an empty zone.
#[derive(Clone, Copy, Default)]
struct Zonelist {
    zones: [u8; MAX_NR_ZONES], // zone indices, highest first
    len: u8,                   // entries in use
}

/// The page allocator of one machine.
pub struct PageAlloc<P: Platform> {
    platform: P,
    config: Config,
    mm: MemMap,
    zones: [Zone; MAX_NR_ZONES],
    /// Highest zone to search for each value of the four zone-modifier bits, after Linux's
    /// `OPT_ZONE_*` substitution for zones this layout lacks; `BAD_ZONE` for invalid masks.
    zone_table: [u8; 16],
    /// The zonelist for each highest zone.
    zonelists: [Zonelist; MAX_NR_ZONES],
    pcp: NonNull<PerCpuPages>, // nr_cpus * MAX_NR_ZONES, row per CPU
    nr_cpus: usize,
    direct_map_base: usize,
    lowmem_end_pfn: u64, // frames below this are in the direct map
    mm_vbase: usize,     // direct-map address of mem_map's first frame (may be notional)
    direct_bytes: usize, // bytes of RAM in the direct map from mm_vbase (lowmem)
    // mem_map's address minus (mm_vbase >> PAGE_SHIFT) descriptors (wrapping): the descriptor
    // of direct-map address a is at vmemmap + (a >> PAGE_SHIFT) * size_of::<Page>()
    vmemmap: usize,
    pub(crate) reclaim: slowpath::Reclaim,
    kmap: highmem::Kmap,
    bad_pages: AtomicUsize,
    alloc_failures: AtomicUsize,
    info: BootInfo,
    faults: crate::fault::Faults,
}

// SAFETY: `pcp` points into memory owned by this allocator for its whole life, and each CPU's
// row is only touched under that CPU's guard; everything else is atomics or locks.
unsafe impl<P: Platform> Send for PageAlloc<P> {}
// SAFETY: as for `Send`.
unsafe impl<P: Platform> Sync for PageAlloc<P> {}

impl<P: Platform> PageAlloc<P> {
    // ---------------------------------------------------------------- accessors

    /// The platform this allocator runs on.
    #[inline]
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// The boot configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The page descriptor array.
    pub fn mem_map(&self) -> &MemMap {
        &self.mm
    }

    /// All zones, indexed by [`crate::gfp::ZoneType`] (unconfigured ones included).
    pub fn zones(&self) -> &[Zone; MAX_NR_ZONES] {
        &self.zones
    }

    /// Number of possible CPUs.
    pub fn nr_cpus(&self) -> usize {
        self.nr_cpus
    }

    /// What boot measured: memory sizes and the cost of `mem_map`.
    pub fn boot_info(&self) -> &BootInfo {
        &self.info
    }

    /// CPU `cpu`'s lists for zone `zone` (for reports: reads are racy).
    #[inline]
    pub fn pcp(&self, cpu: usize, zone: usize) -> &PerCpuPages {
        assert!(cpu < self.nr_cpus && zone < MAX_NR_ZONES);
        // SAFETY: the array has `nr_cpus * MAX_NR_ZONES` initialised entries (boot) living as
        // long as `self`; the index is in bounds by the assert above.
        unsafe { &*self.pcp.as_ptr().add(cpu * MAX_NR_ZONES + zone) }
    }

    /// The current CPU's lists for zone `zone`: the guard proves which CPU that is.
    #[inline(always)]
    fn this_pcp(&self, guard: &P::Guard<'_>, zone: usize) -> &PerCpuPages {
        self.pcp_of(guard.cpu(), zone)
    }

    /// CPU `cpu`'s lists for zone `zone`, for a caller running on that CPU (in a guard
    /// section or a `this_cpu` closure).
    #[inline(always)]
    fn pcp_of(&self, cpu: usize, zone: usize) -> &PerCpuPages {
        debug_assert!(cpu < self.nr_cpus && zone < MAX_NR_ZONES);
        // SAFETY: a guard's CPU is below `nr_cpu_ids()` (platform contract) and `zone` is a
        // zone index, so the entry is inside the `nr_cpus * MAX_NR_ZONES` array built at boot.
        unsafe { &*self.pcp.as_ptr().add(cpu * MAX_NR_ZONES + zone) }
    }

    /// Free pages in all buddy lists (`NR_FREE_PAGES`; per-CPU lists not included).
    pub fn nr_free_pages(&self) -> usize {
        self.zones.iter().map(Zone::free_pages).sum()
    }

    /// Pages managed by the buddy allocator (`totalram_pages`).
    pub fn totalram_pages(&self) -> usize {
        self.zones.iter().map(|z| z.managed_pages).sum()
    }

    /// Pages sitting on per-CPU lists, over all CPUs and zones.
    pub fn nr_pcp_pages(&self) -> usize {
        (0..self.nr_cpus)
            .flat_map(|c| (0..MAX_NR_ZONES).map(move |z| (c, z)))
            .map(|(c, z)| self.pcp(c, z).count() as usize)
            .sum()
    }

    /// The fault-injection points (`failslab`, `fail_page_alloc`).
    pub fn faults(&self) -> &crate::fault::Faults {
        &self.faults
    }

    /// Bad-page reports made so far (each also logged).
    pub fn bad_page_reports(&self) -> usize {
        self.bad_pages.load(Relaxed)
    }

    /// Allocation failures so far (reported or not).
    pub fn alloc_failures(&self) -> usize {
        self.alloc_failures.load(Relaxed)
    }

    // ---------------------------------------------------------------- conversions

    /// The zone of `page` (`page_zone`).
    #[inline]
    pub fn page_zone(&self, page: &Page) -> &Zone {
        &self.zones[page.zone_index()]
    }

    /// The frame of `page` (`page_to_pfn`).
    #[inline]
    pub fn page_to_pfn(&self, page: &Page) -> Pfn {
        self.mm.page_to_pfn(page)
    }

    /// The descriptor of `pfn` (`pfn_to_page`), if it is a frame between the lowest and the
    /// highest frame of RAM (holes included: their pages are reserved).
    #[inline]
    pub fn pfn_to_page(&self, pfn: Pfn) -> Option<&Page> {
        self.mm.pfn_to_page(pfn)
    }

    /// The direct-map address of `page` (`page_address`); `None` for HighMem pages, which
    /// must be reached through [`PageAlloc::kmap`].
    #[inline]
    pub fn page_address(&self, page: &Page) -> Option<VirtAddr> {
        let pfn = self.mm.page_to_pfn(page).0;
        (pfn < self.lowmem_end_pfn)
            .then(|| VirtAddr(self.direct_map_base + ((pfn as usize) << PAGE_SHIFT)))
    }

    /// The descriptor of the page holding direct-map address `addr` (`virt_to_page`); `None`
    /// outside the direct map of RAM.
    #[inline]
    pub fn virt_to_page(&self, addr: VirtAddr) -> Option<&Page> {
        let off = addr.0.checked_sub(self.direct_map_base)?;
        let pfn = (off >> PAGE_SHIFT) as u64;
        if pfn >= self.lowmem_end_pfn {
            return None;
        }
        self.mm.pfn_to_page(Pfn(pfn))
    }

    // ---------------------------------------------------------------- allocation

    /// Allocates `1 << order` physically contiguous pages (`alloc_pages`).
    ///
    /// Context: may sleep if `gfp` allows direct reclaim (`GFP_KERNEL`); never sleeps for
    /// `GFP_ATOMIC`/`GFP_NOWAIT`. Returns the first page's descriptor, or `None` (reported
    /// unless `__GFP_NOWARN`). HighMem pages are returned only with `__GFP_HIGHMEM`.
    #[inline(always)]
    pub fn alloc_pages(&self, gfp: Gfp, order: u32) -> Option<&Page> {
        let highest = self.zone_table[(gfp.bits() & GFP_ZONEMASK.bits()) as usize];
        if highest == BAD_ZONE || order > MAX_PAGE_ORDER {
            return self.alloc_invalid(gfp, order);
        }
        if self
            .faults
            .fail_page_alloc
            .should_fail_alloc_page(&self.platform, gfp, order)
        {
            return None;
        }
        let highest = highest as usize;
        let flags = AllocFlags(AllocFlags::WMARK_LOW);
        let idx = match self.get_page_from_freelist(gfp, order, highest, flags) {
            Some(idx) => idx,
            None => self.alloc_pages_slowpath(gfp, order, highest)?,
        };
        Some(self.prep_new_page(idx, order, gfp))
    }

    /// Allocates one page (`alloc_page`).
    #[inline]
    pub fn alloc_page(&self, gfp: Gfp) -> Option<&Page> {
        self.alloc_pages(gfp, 0)
    }

    /// Allocates `1 << order` pages and returns their direct-map address
    /// (`__get_free_pages`). `__GFP_HIGHMEM` is ignored: the pages must have an address.
    #[inline]
    pub fn __get_free_pages(&self, gfp: Gfp, order: u32) -> Option<VirtAddr> {
        let page = self.alloc_pages(gfp.without(__GFP_HIGHMEM), order)?;
        self.page_address(page)
    }

    /// One page's address (`__get_free_page`).
    #[inline]
    pub fn __get_free_page(&self, gfp: Gfp) -> Option<VirtAddr> {
        self.__get_free_pages(gfp, 0)
    }

    /// One zeroed page's address (`get_zeroed_page`).
    pub fn get_zeroed_page(&self, gfp: Gfp) -> Option<VirtAddr> {
        self.__get_free_pages(gfp | __GFP_ZERO, 0)
    }

    /// Allocates exactly `size` bytes' worth of pages, rounded up to whole pages, and frees
    /// the rest of the power-of-two block (`alloc_pages_exact`). Each page of the result is
    /// an order-0 allocation, so it may also be freed page by page. `__GFP_COMP` and
    /// `__GFP_HIGHMEM` are ignored.
    pub fn alloc_pages_exact(&self, size: usize, gfp: Gfp) -> Option<VirtAddr> {
        if size == 0 {
            return None;
        }
        let order = get_order(size);
        let gfp = gfp.without(__GFP_COMP).without(__GFP_HIGHMEM);
        let page = self.alloc_pages(gfp, order)?;
        let idx = self.mm.index_of(page);
        let used = size.div_ceil(PAGE_SIZE) as u32;
        // `split_page`: every page becomes its own order-0 allocation.
        for i in 0..used {
            let p = self.mm.at(idx + i);
            p.set_order(0);
            p.set_state(pg::ALLOCATED);
        }
        for i in used..(1 << order) {
            let p = self.mm.at(idx + i);
            p.set_order(0);
            self.free_block(idx + i, 0, p.zone_index());
        }
        self.page_address(page)
    }

    /// Walks the zonelist of `highest` and takes a block from the first zone whose
    /// watermark allows it (`get_page_from_freelist`). Inlined so that the fast path's
    /// constant `flags` fold the reserve arithmetic away.
    #[inline(always)]
    fn get_page_from_freelist(
        &self,
        gfp: Gfp,
        order: u32,
        highest: usize,
        flags: AllocFlags,
    ) -> Option<u32> {
        let zl = &self.zonelists[highest];
        for &zi in &zl.zones[..zl.len as usize] {
            let zi = zi as usize;
            let zone = &self.zones[zi];
            if !flags.has(AllocFlags::NO_WATERMARKS)
                && !zone_watermark_ok(zone, order, zone.watermark[flags.wmark()], highest, flags)
            {
                continue;
            }
            let got = if order <= PCP_MAX_ORDER {
                self.rmqueue_pcplist(zone, zi, order, gfp)
            } else {
                self.rmqueue_buddy(zone, order, gfp)
            };
            if got.is_some() {
                return got;
            }
        }
        None
    }

    #[inline(always)]
    fn rmqueue_pcplist(&self, zone: &Zone, zi: usize, order: u32, gfp: Gfp) -> Option<u32> {
        // SAFETY: the closure touches this CPU's lists and, to refill them, the zone lock: it
        // takes no guard and never sleeps.
        let (got, nested) = unsafe {
            self.platform.this_cpu(|cpu, nested| {
                let pcp = self.pcp_of(cpu, zi);
                let got = match pcp.pop(&self.mm, order) {
                    Some(idx) => Some(idx),
                    None => pcp.refill_and_pop(zone, &self.mm, order),
                };
                (got, nested)
            })
        };
        if nested && gfpflags_allow_blocking(gfp) {
            self.report_atomic_sleep();
        }
        got
    }

    #[cold]
    fn rmqueue_buddy(&self, zone: &Zone, order: u32, gfp: Gfp) -> Option<u32> {
        if gfpflags_allow_blocking(gfp) && self.platform.in_atomic() {
            self.report_atomic_sleep();
        }
        let mut fl = zone.lock.lock();
        zone.rmqueue_smallest(&mut fl, &self.mm, order)
    }

    /// Turns a block taken off a list into an allocation (`prep_new_page`).
    #[inline]
    fn prep_new_page(&self, idx: u32, order: u32, gfp: Gfp) -> &Page {
        let page = self.mm.at(idx);
        page.set_order(order);
        if order > 0 && gfp.contains(__GFP_COMP) {
            page.set_state(pg::ALLOCATED | pg::HEAD);
            for i in 1..(1u32 << order) {
                let tail = self.mm.at(idx + i);
                tail.head.store(idx as usize, Relaxed);
                tail.set_state(pg::TAIL);
            }
        } else {
            page.set_state(pg::ALLOCATED);
        }
        if gfp.contains(__GFP_ZERO) || self.config.init_on_alloc {
            self.clear_pages(page, order);
        }
        page
    }

    /// Zeroes `1 << order` pages from `page` on, through the direct map or `kmap`.
    fn clear_pages(&self, page: &Page, order: u32) {
        let idx = self.mm.index_of(page);
        for i in 0..(1u32 << order) {
            let p = self.mm.at(idx + i);
            let (va, mapped) = match self.page_address(p) {
                Some(va) => (va, false),
                None => (self.kmap(p), true),
            };
            // SAFETY: `va` maps the page `p`, which the caller owns (it is being allocated or
            // freed), for PAGE_SIZE writable bytes.
            unsafe { core::ptr::write_bytes(va.as_ptr(), 0, PAGE_SIZE) };
            if mapped {
                self.kunmap(p);
            }
        }
    }

    // ---------------------------------------------------------------- freeing

    /// Frees `1 << order` pages allocated by [`PageAlloc::alloc_pages`] (`__free_pages`).
    ///
    /// Context: any; never sleeps. A page that is not the head of a live allocation of this
    /// order is reported ("BUG: Bad page state") and nothing is freed.
    ///
    /// # Safety
    ///
    /// If the page is a live allocation, nothing may use its memory after this call.
    #[inline(always)]
    pub unsafe fn __free_pages(&self, page: &Page, order: u32) {
        let Some(idx) = self.mm.checked_index(page) else {
            return self.bad_address(page as *const Page as usize, "not a page descriptor");
        };
        let flags = page.flags();
        let state = flags & pg::STATE_MASK;
        if state & !pg::HEAD != pg::ALLOCATED || page.order() != order {
            return self.free_pages_check_failed(page, order);
        }
        if state & pg::HEAD != 0 && !self.free_tail_pages(idx, order) {
            return;
        }
        if self.config.init_on_free {
            self.clear_pages(page, order);
        }
        self.free_block(idx, order, (flags >> pg::ZONE_SHIFT) as usize);
    }

    /// Frees pages allocated by [`PageAlloc::__get_free_pages`] (`free_pages`); address 0 is
    /// a no-op.
    ///
    /// Context: any; never sleeps. An address that is not page aligned, or not a direct-map
    /// address of RAM, is reported and nothing is freed.
    ///
    /// # Safety
    ///
    /// As [`PageAlloc::__free_pages`].
    pub unsafe fn free_pages(&self, addr: VirtAddr, order: u32) {
        if addr.0 == 0 {
            return;
        }
        if !addr.is_page_aligned() {
            return self.bad_address(addr.0, "address not page aligned");
        }
        match self.virt_to_page(addr) {
            // SAFETY: the caller's contract is ours.
            Some(page) => unsafe { self.__free_pages(page, order) },
            None => self.bad_address(addr.0, "address outside the direct map of RAM"),
        }
    }

    /// Frees one page by address (`free_page`).
    ///
    /// # Safety
    ///
    /// As [`PageAlloc::__free_pages`].
    pub unsafe fn free_page(&self, addr: VirtAddr) {
        // SAFETY: the caller's contract is ours.
        unsafe { self.free_pages(addr, 0) }
    }

    /// Frees memory from [`PageAlloc::alloc_pages_exact`] (`free_pages_exact`).
    ///
    /// # Safety
    ///
    /// As [`PageAlloc::__free_pages`], for each page of `addr..addr + size`.
    pub unsafe fn free_pages_exact(&self, addr: VirtAddr, size: usize) {
        let pages = size.div_ceil(PAGE_SIZE);
        for i in 0..pages {
            // SAFETY: the caller's contract covers every page of the range.
            unsafe { self.free_pages(VirtAddr(addr.0 + i * PAGE_SIZE), 0) };
        }
    }

    /// Puts an owned block back: on this CPU's list for low orders (draining a batch above
    /// the high mark), else straight into the buddy lists. Wakes allocators waiting for memory.
    #[inline(always)]
    fn free_block(&self, idx: u32, order: u32, zi: usize) {
        let zone = &self.zones[zi];
        if order <= PCP_MAX_ORDER {
            // SAFETY: the closure touches this CPU's lists and, to drain them, the zone lock:
            // it takes no guard and never sleeps.
            unsafe {
                self.platform.this_cpu(|cpu, _| {
                    let pcp = self.pcp_of(cpu, zi);
                    pcp.push(&self.mm, idx, order);
                    if pcp.count() >= zone.pcp_high {
                        pcp.drain(zone, &self.mm, zone.pcp_batch);
                    }
                })
            };
        } else {
            self.mm.at(idx).set_state(0);
            let mut fl = zone.lock.lock();
            zone.free_one_page(&mut fl, &self.mm, idx, order);
        }
        if self.reclaim.waiters.load(Relaxed) != 0 {
            self.wake_waiters();
        }
    }

    /// Empties every CPU's lists into the buddy lists (`drain_all_pages`). Returns the
    /// number of pages moved. Context: may wait for other CPUs' sections to end.
    pub fn drain_all_pages(&self) -> usize {
        let mut moved = 0;
        for cpu in 0..self.nr_cpus {
            let _guard = self.platform.lock_cpu(cpu);
            for (zi, zone) in self.zones.iter().enumerate() {
                let pcp = self.pcp(cpu, zi);
                moved += pcp.drain(zone, &self.mm, u32::MAX) as usize;
            }
        }
        moved
    }

    /// Empties the current CPU's lists (`drain_local_pages`).
    pub fn drain_local_pages(&self) -> usize {
        let guard = self.platform.cpu_guard();
        let mut moved = 0;
        for (zi, zone) in self.zones.iter().enumerate() {
            moved += self.this_pcp(&guard, zi).drain(zone, &self.mm, u32::MAX) as usize;
        }
        moved
    }

    // ---------------------------------------------------------------- for the slab layer

    /// Direct-map address of the page at `mem_map` index `idx` (low memory only).
    #[inline(always)]
    pub(crate) fn idx_address(&self, idx: u32) -> usize {
        self.mm_vbase.wrapping_add((idx as usize) << PAGE_SHIFT)
    }

    /// The descriptor of the page holding direct-map address `addr` and `addr`'s offset in
    /// that page, if it is RAM. The descriptor's address is computed from `addr` alone
    /// (`vmemmap`-style: the shift of `addr` added to a biased base), so the range check is
    /// off the load's dependency chain.
    #[inline(always)]
    pub(crate) fn direct_page(&self, addr: usize) -> Option<(&Page, usize)> {
        if addr.wrapping_sub(self.mm_vbase) >= self.direct_bytes {
            return None;
        }
        let desc = self
            .vmemmap
            .wrapping_add((addr >> PAGE_SHIFT) * core::mem::size_of::<Page>());
        // SAFETY: `addr` is in the direct map's RAM (checked above), so its frame has a
        // descriptor in `mem_map`, at `vmemmap + (addr >> PAGE_SHIFT) * size_of::<Page>()` (the
        // definition of `vmemmap`); the array lives as long as `self`.
        let page = unsafe { &*(desc as *const Page) };
        Some((page, addr & (crate::addr::PAGE_SIZE - 1)))
    }

    /// Allocates a slab: `1 << order` low-memory pages (compound above order 0), marked
    /// `SLAB` and owned by `owner`. Returns the head's `mem_map` index.
    pub(crate) fn alloc_slab_pages(&self, gfp: Gfp, order: u32, owner: usize) -> Option<u32> {
        let gfp = gfp.without(__GFP_HIGHMEM).without(__GFP_ZERO);
        let gfp = if order > 0 { gfp | __GFP_COMP } else { gfp };
        let page = self.alloc_pages(gfp, order)?;
        page.set_private(owner);
        page.set_state(page.state() | pg::SLAB);
        Some(self.mm.index_of(page))
    }

    /// Counts a bad free reported by a layer above (it shows in `bad_page_reports`).
    pub(crate) fn count_bad_free(&self) {
        self.bad_pages.fetch_add(1, Relaxed);
    }

    /// Gives a slab's pages back (`__free_slab`).
    pub(crate) fn free_slab_pages(&self, idx: u32, order: u32) {
        let page = self.mm.at(idx);
        // The object count in `head` first: it is what `kfree`'s lookup tests.
        page.head.store(0, Relaxed);
        page.set_state(page.state() & !pg::SLAB);
        page.set_private(0);
        // SAFETY: the slab layer owns this allocation of `order` and no longer uses it.
        unsafe { self.__free_pages(page, order) };
    }

    /// Checks every zone's free lists and counters (see [`zone`]); returns the total of free
    /// pages found. For tests.
    pub fn check_free_lists(&self) -> Result<usize, &'static str> {
        let mut total = 0;
        for z in &self.zones {
            total += z.check_free_lists(&self.mm)?;
        }
        Ok(total)
    }
}

/// The watermark test (`__zone_watermark_ok`): may an allocation of `order` with `flags`
/// take pages from `zone`, whose highest allowed zone is `highest`?
///
/// Free pages must stay above `mark` (lowered for reserve-entitled allocations: by half for
/// `__GFP_HIGH`, by a further quarter for non-blocking ones, by half again for an OOM victim)
/// plus the zone's `lowmem_reserve[highest]`; for `order > 0` a block of at least that order
/// must also exist.
#[inline]
pub fn zone_watermark_ok(
    zone: &Zone,
    order: u32,
    mark: usize,
    highest: usize,
    flags: AllocFlags,
) -> bool {
    let free = zone.free_pages() as isize - ((1isize << order) - 1);
    let mut min = mark as isize;
    if flags.has(AllocFlags::MIN_RESERVE) {
        min -= min / 2;
        if flags.has(AllocFlags::NON_BLOCK) {
            min -= min / 4;
        }
    }
    if flags.has(AllocFlags::OOM) {
        min -= min / 2;
    }
    if free <= min + zone.lowmem_reserve[highest] as isize {
        return false;
    }
    if order == 0 {
        return true;
    }
    (order..=MAX_PAGE_ORDER).any(|o| zone.nr_free(o) != 0)
}
