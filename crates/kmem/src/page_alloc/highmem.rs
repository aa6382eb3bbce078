//! `kmap`/`kunmap`: temporary kernel mappings of HighMem pages (the pkmap window).
//!
//! Low-memory pages are always in the direct map, so `kmap` returns their `page_address`.
//! A HighMem page gets one of `LAST_PKMAP` slots of the platform's kmap window: mapped on the
//! first `kmap`, shared (counted) by later ones, and left mapped when the count drops to zero
//! until the slot is reused (Linux flushes such slots lazily too).
//!
//! # Invariants (under `Kmap::slots`)
//!
//! * a slot with `count > 0` maps frame `pfn`, and no other slot maps that frame;
//! * `pfn == NO_PFN` for a slot never used.

use super::PageAlloc;
use super::page::Page;
use crate::addr::{PAGE_SIZE, Pfn, VirtAddr};
use crate::platform::{PageProt, Platform};
use crate::sync::{SpinLock, cpu_relax};

/// Most slots kmem uses (Linux's `LAST_PKMAP` with PAE).
pub const LAST_PKMAP: usize = 512;
const NO_PFN: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Slot {
    pfn: u64,   // frame mapped at this slot, or NO_PFN
    count: u32, // kmap()s not yet kunmap()ed
}

pub(crate) struct Kmap {
    base: VirtAddr, // first slot's address
    nr: usize,      // usable slots
    slots: SpinLock<[Slot; LAST_PKMAP]>,
}

impl Kmap {
    pub(crate) fn new(p: &impl Platform) -> Kmap {
        let (base, pages) = p.kmap_window();
        Kmap {
            base,
            nr: pages.min(LAST_PKMAP),
            slots: SpinLock::new(
                [Slot {
                    pfn: NO_PFN,
                    count: 0,
                }; LAST_PKMAP],
            ),
        }
    }
}

impl<P: Platform> PageAlloc<P> {
    /// Maps `page` into kernel virtual memory and returns its address (`kmap`).
    ///
    /// Low-memory pages need no mapping. A HighMem page takes a slot of the kmap window until
    /// the matching [`PageAlloc::kunmap`]; when every slot is busy, waits for one.
    /// Context: may wait (spins with the platform's relax hook) when the window is full.
    pub fn kmap(&self, page: &Page) -> VirtAddr {
        if let Some(va) = self.page_address(page) {
            return va;
        }
        let pfn = self.page_to_pfn(page).0;
        let km = &self.kmap;
        assert!(km.nr > 0, "kmap of a HighMem page without a kmap window");
        loop {
            let mut slots = km.slots.lock();
            if let Some(i) = slots[..km.nr].iter().position(|s| s.pfn == pfn) {
                slots[i].count += 1;
                return VirtAddr(km.base.0 + i * PAGE_SIZE);
            }
            // Prefer a never-used slot, then any idle one.
            let free = slots[..km.nr]
                .iter()
                .position(|s| s.pfn == NO_PFN)
                .or_else(|| slots[..km.nr].iter().position(|s| s.count == 0));
            if let Some(i) = free {
                let va = VirtAddr(km.base.0 + i * PAGE_SIZE);
                // SAFETY: `va` is slot `i` of the kmap window the platform gave us; the slot
                // is idle (count 0), so nothing uses its old mapping.
                let mapped = unsafe { self.platform.map_page(va, Pfn(pfn), PageProt::KERNEL) };
                assert!(mapped.is_ok(), "kmap: the platform failed to map a page");
                self.platform.flush_tlb_range(va, 1);
                slots[i] = Slot { pfn, count: 1 };
                return va;
            }
            drop(slots);
            cpu_relax();
        }
    }

    /// Ends a [`PageAlloc::kmap`] of `page` (`kunmap`). An unbalanced `kunmap` is reported
    /// and ignored.
    pub fn kunmap(&self, page: &Page) {
        if self.page_address(page).is_some() {
            return;
        }
        let pfn = self.page_to_pfn(page).0;
        let mut slots = self.kmap.slots.lock();
        match slots[..self.kmap.nr]
            .iter_mut()
            .find(|s| s.pfn == pfn && s.count > 0)
        {
            Some(s) => s.count -= 1,
            None => {
                drop(slots);
                self.bad_page(page, format_args!("kunmap of a page that is not kmapped"));
            }
        }
    }

    /// Slots of the kmap window currently in use (for tests and reports).
    pub fn kmap_slots_in_use(&self) -> usize {
        let slots = self.kmap.slots.lock();
        slots[..self.kmap.nr].iter().filter(|s| s.count > 0).count()
    }
}
