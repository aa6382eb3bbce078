//! Zones: a range of frames with its own buddy free lists, watermarks and reserves.
//!
//! # Invariants (under `Zone::lock`)
//!
//! * `free_pages == Σ_order nr_free[order] << order` — pages on per-CPU lists are *not* free
//!   (as in Linux, they count as allocated until drained);
//! * every page in `free_list[o]` is `BUDDY` with order `o`, lies in this zone, and starts a
//!   block aligned to `1 << o` frames;
//! * no free block's buddy (`pfn ^ (1 << o)`) is also a free block of order `o` (they would
//!   have been merged).
//!
//! `free_pages` and `nr_free` are atomics so that the watermark check can read them without
//! the lock; they are only written with the lock held.

use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::mem_map::MemMap;
use super::page::{NIL, Page, pg};
use crate::addr::{MAX_PAGE_ORDER, NR_PAGE_ORDERS};
use crate::gfp::{MAX_NR_ZONES, ZoneType};
use crate::sync::SpinLock;

/// Watermark indices (`enum zone_watermarks`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wmark {
    /// `WMARK_MIN`: below it only reserve-entitled allocations succeed.
    Min = 0,
    /// `WMARK_LOW`: the fast path's mark.
    Low = 1,
    /// `WMARK_HIGH`: where background reclaim would stop.
    High = 2,
    /// `WMARK_PROMO`: reported only.
    Promo = 3,
}

/// The lock-protected part of a zone: the heads of the buddy free lists.
pub(crate) struct FreeLists {
    head: [u32; NR_PAGE_ORDERS], // first block of each order's list, or NIL
}

/// A memory zone.
pub struct Zone {
    /// Which zone this is.
    pub ztype: ZoneType,
    /// Configured in the layout (Linux prints configured zones, populated or not).
    pub configured: bool,
    /// First frame of the zone's span (`zone_start_pfn`).
    pub start_pfn: u64,
    /// Frames spanned, holes included.
    pub spanned_pages: usize,
    /// Frames of RAM in the span.
    pub present_pages: usize,
    /// Frames handed to the buddy allocator (present minus boot reservations).
    pub managed_pages: usize,
    /// `_watermark[min, low, high, promo]`, in pages.
    pub watermark: [usize; 4],
    /// `lowmem_reserve[z]`: pages kept back from allocations whose highest zone is `z`.
    pub lowmem_reserve: [usize; MAX_NR_ZONES],
    /// Per-CPU list refill/drain batch, in pages.
    pub pcp_batch: u32,
    /// Per-CPU list high mark, in pages: above it a free drains a batch.
    pub pcp_high: u32,
    /// Upper bound Linux lets `high` grow to (`high_max`, reported only).
    pub pcp_high_max: u32,
    /// Free pages in the buddy lists (`NR_FREE_PAGES`). Written under `lock`.
    free_pages: AtomicUsize,
    /// Blocks per order (`free_area[o].nr_free`). Written under `lock`.
    nr_free: [AtomicUsize; NR_PAGE_ORDERS],
    /// Guards the free lists and the two counters above.
    pub(crate) lock: SpinLock<FreeLists>,
}

impl Zone {
    /// An empty zone of type `ztype` (filled in at boot).
    pub(crate) fn new(ztype: ZoneType, configured: bool) -> Zone {
        Zone {
            ztype,
            configured,
            start_pfn: 0,
            spanned_pages: 0,
            present_pages: 0,
            managed_pages: 0,
            watermark: [0; 4],
            lowmem_reserve: [0; MAX_NR_ZONES],
            pcp_batch: 1,
            pcp_high: 0,
            pcp_high_max: 0,
            free_pages: AtomicUsize::new(0),
            nr_free: [const { AtomicUsize::new(0) }; NR_PAGE_ORDERS],
            lock: SpinLock::new(FreeLists {
                head: [NIL; NR_PAGE_ORDERS],
            }),
        }
    }

    /// The zone's name ("DMA", "Normal", ...).
    pub fn name(&self) -> &'static str {
        self.ztype.name()
    }

    /// True when the zone has memory (`populated_zone`).
    #[inline]
    pub fn populated(&self) -> bool {
        self.present_pages != 0
    }

    /// Free pages in the buddy lists (racy read without the lock).
    #[inline]
    pub fn free_pages(&self) -> usize {
        self.free_pages.load(Relaxed)
    }

    /// Free blocks of `order` (racy read without the lock).
    #[inline]
    pub fn nr_free(&self, order: u32) -> usize {
        self.nr_free[order as usize].load(Relaxed)
    }

    /// A watermark, in pages.
    #[inline]
    pub fn wmark(&self, w: Wmark) -> usize {
        self.watermark[w as usize]
    }

    /// One past the last frame of the span.
    pub fn end_pfn(&self) -> u64 {
        self.start_pfn + self.spanned_pages as u64
    }

    /// True when `pfn` lies in the zone's span.
    pub fn spans(&self, pfn: u64) -> bool {
        pfn >= self.start_pfn && pfn < self.end_pfn()
    }

    fn add_free(&self, delta: usize) {
        self.free_pages.store(self.free_pages() + delta, Relaxed);
    }

    fn sub_free(&self, delta: usize) {
        self.free_pages.store(self.free_pages() - delta, Relaxed);
    }

    fn list_add(&self, fl: &mut FreeLists, mm: &MemMap, idx: u32, order: u32) {
        let page = mm.at(idx);
        let old = fl.head[order as usize];
        page.next.store(old, Relaxed);
        page.prev.store(NIL, Relaxed);
        if old != NIL {
            mm.at(old).prev.store(idx, Relaxed);
        }
        fl.head[order as usize] = idx;
        page.set_order(order);
        page.set_state(pg::BUDDY);
        let n = &self.nr_free[order as usize];
        n.store(n.load(Relaxed) + 1, Relaxed);
    }

    fn list_del(&self, fl: &mut FreeLists, mm: &MemMap, idx: u32, order: u32) {
        let page = mm.at(idx);
        let (next, prev) = (page.next.load(Relaxed), page.prev.load(Relaxed));
        if prev == NIL {
            fl.head[order as usize] = next;
        } else {
            mm.at(prev).next.store(next, Relaxed);
        }
        if next != NIL {
            mm.at(next).prev.store(prev, Relaxed);
        }
        page.next.store(NIL, Relaxed);
        page.prev.store(NIL, Relaxed);
        page.set_state(0);
        let n = &self.nr_free[order as usize];
        n.store(n.load(Relaxed) - 1, Relaxed);
    }

    /// Frees the block of `1 << order` frames starting at `mem_map` index `idx` into the buddy
    /// lists, merging it with free buddies (`__free_one_page`).
    ///
    /// The caller holds `lock` (passing its data as `fl`) and owns the block: no descriptor of
    /// it is on any list.
    pub(crate) fn free_one_page(&self, fl: &mut FreeLists, mm: &MemMap, idx: u32, order: u32) {
        let mut idx = idx;
        let mut order = order;
        let base = mm.base_pfn();
        self.add_free(1 << order);
        while order < MAX_PAGE_ORDER {
            let pfn = base + idx as u64;
            let buddy_pfn = pfn ^ (1 << order);
            let Some(bidx) = mm.pfn_index(buddy_pfn) else {
                break;
            };
            let buddy = mm.at(bidx);
            // `page_is_buddy`: a free block head of the same order in the same zone.
            if buddy.state() != pg::BUDDY
                || buddy.order() != order
                || buddy.zone_index() != self.ztype.index()
            {
                break;
            }
            self.list_del(fl, mm, bidx, order);
            idx = idx.min(bidx);
            order += 1;
        }
        self.list_add(fl, mm, idx, order);
    }

    /// Takes a block of `order` from the smallest list that has one, splitting what is left
    /// back into the lists (`__rmqueue_smallest` + `expand`). Returns its `mem_map` index; the
    /// head's state is cleared (the caller sets the new state).
    pub(crate) fn rmqueue_smallest(
        &self,
        fl: &mut FreeLists,
        mm: &MemMap,
        order: u32,
    ) -> Option<u32> {
        for current in order..=MAX_PAGE_ORDER {
            let idx = fl.head[current as usize];
            if idx == NIL {
                continue;
            }
            self.list_del(fl, mm, idx, current);
            // `expand`: give back the upper halves, largest first.
            let mut high = current;
            while high > order {
                high -= 1;
                self.list_add(fl, mm, idx + (1 << high), high);
            }
            self.sub_free(1 << order);
            return Some(idx);
        }
        None
    }

    /// Walks the free lists and checks the invariants above, returning the number of free
    /// pages found. For tests and debug builds; takes the lock.
    pub fn check_free_lists(&self, mm: &MemMap) -> Result<usize, &'static str> {
        let fl = self.lock.lock();
        let mut total = 0usize;
        for order in 0..=MAX_PAGE_ORDER {
            let mut idx = fl.head[order as usize];
            let mut prev = NIL;
            let mut count = 0usize;
            while idx != NIL {
                let p: &Page = mm.at(idx);
                if p.state() != pg::BUDDY || p.order() != order {
                    return Err("free list holds a page that is not a buddy of its order");
                }
                if p.prev.load(Relaxed) != prev {
                    return Err("free list back link broken");
                }
                if p.zone_index() != self.ztype.index() {
                    return Err("free block in the wrong zone");
                }
                let pfn = mm.base_pfn() + idx as u64;
                if pfn & ((1 << order) - 1) != 0 {
                    return Err("free block not aligned to its order");
                }
                if order < MAX_PAGE_ORDER {
                    if let Some(b) = mm.pfn_index(pfn ^ (1 << order)) {
                        let bp = mm.at(b);
                        if bp.state() == pg::BUDDY
                            && bp.order() == order
                            && bp.zone_index() == self.ztype.index()
                        {
                            return Err("two free buddies left unmerged");
                        }
                    }
                }
                count += 1;
                prev = idx;
                idx = p.next.load(Relaxed);
            }
            if count != self.nr_free(order) {
                return Err("nr_free disagrees with the list length");
            }
            total += count << order;
        }
        if total != self.free_pages() {
            return Err("free_pages disagrees with the lists");
        }
        Ok(total)
    }
}
