//! `kvmalloc` and friends: kmalloc first, vmalloc as the fallback; and a contiguous virtual
//! view of a scatter/gather table.
//!
//! As Linux's `kvmalloc_node`: requests above a page try kmalloc without warnings and without
//! retrying hard (`__GFP_NOWARN | __GFP_NORETRY`, unless the caller asked for
//! `__GFP_RETRY_MAYFAIL`; `__GFP_NOFAIL` is left to the vmalloc fallback), then vmalloc.
//! Requests of a page or less, and requests that may not sleep, never fall back. `kvfree`
//! tells the two apart by address (`is_vmalloc_addr`).

use core::ptr::NonNull;

use crate::Kmem;
use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::gfp::{
    __GFP_NOFAIL, __GFP_NORETRY, __GFP_NOWARN, __GFP_RETRY_MAYFAIL, __GFP_ZERO, Gfp,
    gfpflags_allow_blocking,
};
use crate::page_alloc::page::Page;
use crate::platform::{PageProt, Platform};
use crate::sg::SgTable;
use crate::vmalloc::VM_MAP;

/// `kmalloc_gfp_adjust`: how kvmalloc's kmalloc attempt is made.
pub const fn kmalloc_gfp_adjust(gfp: Gfp, size: usize) -> Gfp {
    if size <= PAGE_SIZE {
        return gfp;
    }
    let mut g = gfp.union(__GFP_NOWARN);
    if !g.contains(__GFP_RETRY_MAYFAIL) {
        g = g.union(__GFP_NORETRY);
    }
    g.without(__GFP_NOFAIL)
}

impl<P: Platform> Kmem<P> {
    /// `kvmalloc`: `size` bytes from kmalloc, or from vmalloc when kmalloc cannot (or should
    /// not try hard to) provide them physically contiguous.
    ///
    /// Context: may sleep with a sleeping `gfp`; a non-sleeping `gfp` never falls back.
    #[track_caller]
    pub fn kvmalloc(&self, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        if let Some(p) = self.kmalloc(size, kmalloc_gfp_adjust(gfp, size)) {
            return Some(p);
        }
        if size <= PAGE_SIZE || !gfpflags_allow_blocking(gfp) || size > i32::MAX as usize {
            return None;
        }
        self.__vmalloc(size, gfp)
    }

    /// `kvzalloc`: zeroed `kvmalloc`.
    #[track_caller]
    pub fn kvzalloc(&self, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        self.kvmalloc(size, gfp | __GFP_ZERO)
    }

    /// Usable bytes of a `kvmalloc` allocation (`ksize` or the vmalloc area's size).
    pub fn kvsize(&self, p: *const u8) -> usize {
        if self.is_vmalloc_addr(p) {
            self.vmalloc_space()
                .find_vm_area(p)
                .map_or(0, |a| a.get_vm_area_size())
        } else {
            self.ksize(p)
        }
    }

    /// `kvfree`: frees memory from `kvmalloc` (or kmalloc, or vmalloc) with the right call.
    ///
    /// # Safety
    ///
    /// `p` is null or a live allocation of one of those; nothing uses it afterwards.
    pub unsafe fn kvfree(&self, p: *mut u8) {
        if self.is_vmalloc_addr(p) {
            // SAFETY: the caller's contract; the address is in the vmalloc range.
            unsafe { self.vfree(p) }
        } else {
            // SAFETY: the caller's contract; anything else is kmalloc's.
            unsafe { self.kfree(p) }
        }
    }

    /// `kvrealloc`: resizes a `kvmalloc` allocation, in place while it fits, else by moving
    /// it (contents kept up to the smaller size; the tail zeroed with `__GFP_ZERO`). On
    /// failure the old allocation is untouched.
    ///
    /// # Safety
    ///
    /// `p` is null or a live `kvmalloc` allocation; after a move it is freed.
    #[track_caller]
    pub unsafe fn kvrealloc(&self, p: *mut u8, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        let old = if p.is_null() { 0 } else { self.kvsize(p) };
        if !p.is_null() && size <= old && !self.is_vmalloc_addr(p) {
            // SAFETY: `p` is a live kmalloc allocation (caller's contract) that still fits.
            return unsafe { self.krealloc(p, size, gfp) };
        }
        let q = self.kvmalloc(size, gfp)?;
        if !p.is_null() {
            let keep = old.min(size);
            // SAFETY: both are live, distinct allocations of at least `keep` bytes; `p` is
            // freed once, after the copy (caller's contract).
            unsafe {
                core::ptr::copy_nonoverlapping(p, q.as_ptr(), keep);
                self.kvfree(p);
            }
        }
        Some(q)
    }

    /// Maps every page of `table` into one contiguous virtual range (`vmap`), so a
    /// scatter/gather buffer reads as one slice. Every entry but the last must start at
    /// offset 0 and cover whole pages. Undo with [`Kmem::vunmap`].
    ///
    /// Context: may sleep (the page list is a `kvmalloc`).
    #[track_caller]
    pub fn sg_vmap(&self, table: &SgTable, prot: PageProt) -> Option<NonNull<u8>> {
        let n = table.nents();
        let mut pages = 0usize;
        for (i, sg) in table.iter().enumerate() {
            let whole = sg.offset() == 0 && sg.length() % PAGE_SIZE == 0;
            if !whole && i + 1 != n {
                return None;
            }
            pages += (sg.offset() + sg.length()).div_ceil(PAGE_SIZE);
        }
        if pages == 0 {
            return None;
        }
        let bytes = pages.checked_mul(core::mem::size_of::<&Page>())?;
        let list = self.kvmalloc(bytes, crate::gfp::GFP_KERNEL)?;
        let slots = list.as_ptr() as *mut &Page;
        let mut k = 0;
        for sg in table.iter() {
            for j in 0..(sg.offset() + sg.length()).div_ceil(PAGE_SIZE) {
                let Some(page) = self.pfn_to_page(crate::addr::Pfn(sg.pfn().0 + j as u64)) else {
                    // SAFETY: `list` came from kvmalloc above and is not used again.
                    unsafe { self.kvfree(list.as_ptr()) };
                    return None;
                };
                // SAFETY: `k < pages`, the number of slots `list` was sized for; each slot is
                // written once before the slice below reads it.
                unsafe { slots.add(k).write(page) };
                k += 1;
            }
        }
        // SAFETY: all `pages` slots were initialised above; the memory stays valid until
        // the kvfree below, after vmap no longer needs the slice.
        let slice = unsafe { core::slice::from_raw_parts(slots, pages) };
        let mapped = self.vmap(slice, VM_MAP, prot);
        // SAFETY: `list` came from kvmalloc above and is not used again.
        unsafe { self.kvfree(list.as_ptr()) };
        mapped
    }

    /// True when `addr` is in the direct map of RAM (`virt_addr_valid`).
    pub fn virt_addr_valid(&self, addr: *const u8) -> bool {
        self.virt_to_page(VirtAddr(addr as usize)).is_some()
    }
}
