//! Per-CPU page lists (`struct per_cpu_pages`): the order-0..=3 fast path.
//!
//! Each CPU has, for each zone, one LIFO stack of free blocks per order `0..=PCP_MAX_ORDER`.
//! An allocation pops from the stack of the current CPU, a free pushes onto it; only when a
//! stack is empty (refill: `batch` pages from the buddy lists) or the CPU holds more than
//! `high` pages (drain: `batch` pages back) is the zone lock taken.
//!
//! # Invariants (under the CPU's guard)
//!
//! * `count == Σ blocks on the stacks << their order`;
//! * every block on stack `o` is `PCP` with order `o`, lies in this zone, and is linked through
//!   `Page::next`.
//!
//! Only the CPU's guard holder touches the stacks: the owning CPU on its fast path, or a
//! drainer that took the guard with `Platform::lock_cpu`. The fields are atomics so that
//! reports may read `count` racily; writes are plain `Relaxed` stores.

use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use super::mem_map::MemMap;
use super::page::{NIL, pg};
use super::zone::Zone;

/// The highest order kept on per-CPU lists (`PAGE_ALLOC_COSTLY_ORDER`).
pub const PCP_MAX_ORDER: u32 = 3;
const NR_PCP_LISTS: usize = PCP_MAX_ORDER as usize + 1;

/// One CPU's lists for one zone.
#[repr(C, align(64))]
pub struct PerCpuPages {
    lists: [AtomicU32; NR_PCP_LISTS], // stack heads, mem_map indices or NIL
    count: AtomicU32,                 // pages on the stacks
}

impl PerCpuPages {
    /// Empty lists.
    pub(crate) const fn new() -> PerCpuPages {
        PerCpuPages {
            lists: [const { AtomicU32::new(NIL) }; NR_PCP_LISTS],
            count: AtomicU32::new(0),
        }
    }

    /// Pages on this CPU's lists (racy read).
    #[inline]
    pub fn count(&self) -> u32 {
        self.count.load(Relaxed)
    }

    /// Pops a block of `order`. Caller holds this CPU's guard.
    #[inline]
    pub(crate) fn pop(&self, mm: &MemMap, order: u32) -> Option<u32> {
        let list = &self.lists[order as usize];
        let idx = list.load(Relaxed);
        if idx == NIL {
            return None;
        }
        let page = mm.at(idx);
        list.store(page.next.load(Relaxed), Relaxed);
        self.count.store(self.count() - (1 << order), Relaxed);
        Some(idx)
    }

    /// Pushes a block of `order` whose head is owned by the caller. Caller holds the guard.
    #[inline]
    pub(crate) fn push(&self, mm: &MemMap, idx: u32, order: u32) {
        let list = &self.lists[order as usize];
        let page = mm.at(idx);
        page.next.store(list.load(Relaxed), Relaxed);
        page.set_order(order);
        page.set_state(pg::PCP);
        list.store(idx, Relaxed);
        self.count.store(self.count() + (1 << order), Relaxed);
    }

    /// Moves up to `batch` pages' worth of blocks of `order` from the buddy lists onto this
    /// CPU's stack (`rmqueue_bulk`), then pops one. Takes the zone lock. Caller holds the guard.
    #[cold]
    #[inline(never)]
    pub(crate) fn refill_and_pop(&self, zone: &Zone, mm: &MemMap, order: u32) -> Option<u32> {
        let blocks = (zone.pcp_batch >> order).max(2) as usize;
        let mut fl = zone.lock.lock();
        for _ in 0..blocks {
            let Some(idx) = zone.rmqueue_smallest(&mut fl, mm, order) else {
                break;
            };
            self.push(mm, idx, order);
        }
        drop(fl);
        self.pop(mm, order)
    }

    /// Gives at least `pages` pages (or all) back to the buddy lists, taking blocks from each
    /// order in turn (`free_pcppages_bulk`). Returns pages freed. Takes the zone lock.
    #[cold]
    #[inline(never)]
    pub(crate) fn drain(&self, zone: &Zone, mm: &MemMap, pages: u32) -> u32 {
        if self.count() == 0 {
            return 0;
        }
        let mut fl = zone.lock.lock();
        let mut freed = 0;
        while freed < pages && self.count() > 0 {
            for order in 0..=PCP_MAX_ORDER {
                if let Some(idx) = self.pop(mm, order) {
                    mm.at(idx).set_state(0);
                    zone.free_one_page(&mut fl, mm, idx, order);
                    freed += 1 << order;
                }
            }
        }
        freed
    }

    /// Blocks on the stack of `order` (walks the list; for reports and tests).
    pub fn blocks(&self, mm: &MemMap, order: u32) -> usize {
        let mut n = 0;
        let mut idx = self.lists[order as usize].load(Relaxed);
        while idx != NIL {
            n += 1;
            idx = mm.at(idx).next.load(Relaxed);
        }
        n
    }
}
