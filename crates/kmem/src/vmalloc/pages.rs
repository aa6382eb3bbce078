//! The pages behind areas: allocating and mapping them (`__vmalloc_area_node`), `vmap`,
//! and taking areas down again (`vfree`, `vunmap`, `free_vm_area`).
//!
//! An area's page array (`vm_struct.pages`) lives in kmem memory too: kmalloc up to a page
//! of pointers (512 pages), a nested `vmalloc` above (shown as `vpages` in
//! `/proc/vmallocinfo`), as in Linux.
//!
//! Setting an area up happens outside the vmap lock, in this order: reserve the range (the
//! busy node is `VM_UNINITIALIZED`), allocate the page array, allocate the pages one by one,
//! map them, then publish pages and flags under the lock. Any failure undoes the steps done
//! so far: the pages go back to the page allocator, the array to kmalloc (or vmalloc), the
//! range to the purge tree, so a failed allocation leaks nothing.

use core::ptr::{self, NonNull};
use core::sync::atomic::Ordering::Relaxed;

use super::area::VmapArea;
use super::tree::Link;
use super::{
    Caller, GFP_RECLAIM_MASK, IOREMAP_MAX_ORDER, VM_ALLOC, VM_IOREMAP, VM_NO_GUARD,
    VM_UNINITIALIZED, VmCtx, VmFlags, VmStruct, Vmalloc,
};
use crate::addr::{PAGE_SHIFT, PAGE_SIZE, VirtAddr};
use crate::gfp::{__GFP_COMP, __GFP_HIGHMEM, __GFP_NOWARN, GFP_DMA, GFP_DMA32, GFP_KERNEL, Gfp};
use crate::page_alloc::page::Page;
use crate::platform::{CpuGuard, LogLevel, PageProt, Platform};

/// Which API is taking an area down (for the checks and the reports).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Remove {
    /// `vfree`: any area; pages of a `vmalloc` area are freed.
    Vfree,
    /// `vunmap`: not an area that owns its pages.
    Vunmap,
    /// `free_vm_area`: not an area that owns its pages.
    FreeVmArea,
}

impl Remove {
    fn name(self) -> &'static str {
        match self {
            Remove::Vfree => "vfree",
            Remove::Vunmap => "vunmap",
            Remove::FreeVmArea => "free_vm_area",
        }
    }
}

/// Bytes of guard after an area with `flags`.
#[inline]
fn guard_size(flags: VmFlags) -> usize {
    if flags.contains(VM_NO_GUARD) {
        0
    } else {
        PAGE_SIZE
    }
}

/// How much of a failed set-up to undo.
struct Undo {
    node: Link,
    start: usize,
    pages: *mut *const Page, // the page array, or null
    owned: usize,            // pages of the array to free (0 for vmap)
    mapped: bool,            // some pages may be mapped
    usable: usize,           // bytes without the guard page
}

impl Undo {
    /// A fresh area of `usable` bytes (without its guard page) at `start`: no page array yet,
    /// nothing owned, nothing mapped.
    fn new(node: Link, start: usize, usable: usize) -> Undo {
        Undo {
            node,
            start,
            pages: ptr::null_mut(),
            owned: 0,
            mapped: false,
            usable,
        }
    }
}

impl Vmalloc {
    /// `__vmalloc_node_range` + `__vmalloc_area_node`; see [`Vmalloc::__vmalloc_node_range`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn vmalloc_area<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        align: usize,
        gfp: Gfp,
        prot: PageProt,
        vm_flags: VmFlags,
        caller: Caller,
    ) -> Option<NonNull<u8>> {
        let pa = cx.pages;
        let real_size = size;
        let size = match size.checked_next_multiple_of(PAGE_SIZE) {
            Some(s) if s != 0 && s / PAGE_SIZE <= pa.totalram_pages() => s,
            _ => {
                self.failures.fetch_add(1, Relaxed);
                self.warn_alloc(
                    cx,
                    gfp,
                    format_args!("vmalloc error: size {real_size}, exceeds total pages"),
                );
                return None;
            }
        };
        let align = align.max(1);
        if !align.is_power_of_two() {
            return self.bad_align(cx, align);
        }
        let vm_flags = vm_flags.without(VM_UNINITIALIZED);
        let flags = VM_ALLOC | VM_UNINITIALIZED | vm_flags;
        let total = size + guard_size(vm_flags);
        let Some((node, start)) = self.alloc_vmap_area(cx, total, align, gfp, flags, caller) else {
            self.failures.fetch_add(1, Relaxed);
            self.warn_alloc(
                cx,
                gfp,
                format_args!("vmalloc error: size {real_size}, vm_struct allocation failed"),
            );
            return None;
        };
        let nr = size / PAGE_SIZE;
        let mut undo = Undo::new(node, start, size);
        undo.pages = self.alloc_page_array(cx, nr, gfp, caller);
        if undo.pages.is_null() {
            self.warn_alloc(
                cx,
                gfp,
                format_args!(
                    "vmalloc error: size {}, failed to allocated page array size {}",
                    nr * PAGE_SIZE,
                    nr * core::mem::size_of::<*const Page>()
                ),
            );
            return self.undo(cx, undo);
        }

        // Pages one at a time: physically scattered, HighMem first unless a DMA zone is
        // asked for. The page allocator's own report is silenced: ours follows.
        let mut page_gfp = gfp.without(__GFP_COMP) | __GFP_NOWARN;
        if !gfp.intersects(GFP_DMA | GFP_DMA32) {
            page_gfp |= __GFP_HIGHMEM;
        }
        while undo.owned < nr {
            let Some(page) = pa.alloc_page(page_gfp) else {
                break;
            };
            // SAFETY: the array has `nr` entries and `owned < nr`.
            unsafe { undo.pages.add(undo.owned).write(page) };
            undo.owned += 1;
        }
        if undo.owned < nr {
            self.warn_alloc(
                cx,
                gfp,
                format_args!(
                    "vmalloc error: size {}, failed to allocate pages",
                    undo.owned * PAGE_SIZE
                ),
            );
            return self.undo(cx, undo);
        }
        undo.mapped = true;
        if !self.map_pages(cx, start, undo.pages, nr, prot) {
            self.warn_alloc(
                cx,
                gfp,
                format_args!("vmalloc error: size {size}, failed to map pages"),
            );
            return self.undo(cx, undo);
        }
        self.publish(node, undo.pages, nr);
        self.nr_vmalloc_pages.fetch_add(nr, Relaxed);
        NonNull::new(start as *mut u8)
    }

    /// `vmap` with an explicit caller; see [`Vmalloc::vmap`].
    pub(crate) fn vmap_caller<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        pages: &[&Page],
        flags: VmFlags,
        prot: PageProt,
        caller: Caller,
    ) -> Option<NonNull<u8>> {
        let count = pages.len();
        if count == 0 || count > cx.pages.totalram_pages() {
            return None;
        }
        let flags = flags.without(VM_ALLOC).without(VM_UNINITIALIZED);
        let size = count * PAGE_SIZE;
        let total = size + guard_size(flags);
        let Some((node, start)) = self.alloc_vmap_area(
            cx,
            total,
            PAGE_SIZE,
            GFP_KERNEL,
            flags | VM_UNINITIALIZED,
            caller,
        ) else {
            self.failures.fetch_add(1, Relaxed);
            return None;
        };
        let mut undo = Undo::new(node, start, size);
        undo.pages = self.alloc_page_array(cx, count, GFP_KERNEL, caller);
        if undo.pages.is_null() {
            return self.undo(cx, undo);
        }
        for (i, &p) in pages.iter().enumerate() {
            // SAFETY: the array has `count` entries.
            unsafe { undo.pages.add(i).write(p) };
        }
        undo.mapped = true;
        if !self.map_pages(cx, start, undo.pages, count, prot) {
            return self.undo(cx, undo);
        }
        self.publish(node, undo.pages, count);
        NonNull::new(start as *mut u8)
    }

    /// `__get_vm_area_node`; see [`Vmalloc::__get_vm_area`].
    pub(crate) fn get_vm_area_node<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        align: usize,
        flags: VmFlags,
        gfp: Gfp,
        caller: Caller,
    ) -> Option<VmStruct> {
        let size = size
            .checked_next_multiple_of(PAGE_SIZE)
            .filter(|&s| s != 0)?;
        let mut align = align.max(1);
        if !align.is_power_of_two() {
            return self.bad_align(cx, align);
        }
        if flags.contains(VM_IOREMAP) {
            let order = size
                .next_power_of_two()
                .trailing_zeros()
                .clamp(PAGE_SHIFT, IOREMAP_MAX_ORDER);
            align = 1 << order;
        }
        let flags = flags.without(VM_UNINITIALIZED);
        let total = size.checked_add(guard_size(flags))?;
        let Some((_, start)) = self.alloc_vmap_area(cx, total, align, gfp, flags, caller) else {
            self.failures.fetch_add(1, Relaxed);
            return None;
        };
        Some(VmStruct {
            addr: VirtAddr(start),
            size: total,
            flags,
            nr_pages: 0,
            caller,
        })
    }

    #[cold]
    fn bad_align<P: Platform, T>(&self, cx: VmCtx<'_, P>, align: usize) -> Option<T> {
        self.failures.fetch_add(1, Relaxed);
        cx.pages.platform().log(
            LogLevel::Err,
            format_args!("vmalloc: alignment {align:#x} is not a power of two"),
        );
        None
    }

    // ------------------------------------------------------------------ helpers

    /// A page array of `nr` entries: kmalloc up to a page, a nested vmalloc above. Null on
    /// failure.
    fn alloc_page_array<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        nr: usize,
        gfp: Gfp,
        caller: Caller,
    ) -> *mut *const Page {
        let Some(bytes) = nr.checked_mul(core::mem::size_of::<*const Page>()) else {
            return ptr::null_mut();
        };
        let nested = gfp & GFP_RECLAIM_MASK;
        let p = if bytes > PAGE_SIZE {
            let prot = PageProt::KERNEL;
            self.vmalloc_area(cx, bytes, 1, nested, prot, VmFlags::NONE, caller)
        } else {
            cx.kmalloc.kmalloc(cx.slab, cx.pages, bytes, nested)
        };
        p.map_or(ptr::null_mut(), |p| p.as_ptr().cast())
    }

    /// Frees a page array from [`Vmalloc::alloc_page_array`].
    ///
    /// # Safety
    ///
    /// `array` is such an array, no longer used.
    unsafe fn free_page_array<P: Platform>(&self, cx: VmCtx<'_, P>, array: *mut *const Page) {
        let p = array.cast::<u8>();
        if self.is_vmalloc_addr(p) {
            // SAFETY: the caller's contract: a nested vmalloc we own.
            unsafe { self.remove_vm_area(cx, p, Remove::Vfree) };
        } else {
            // SAFETY: the caller's contract: a kmalloc allocation we own.
            unsafe { cx.kmalloc.kfree(cx.slab, cx.pages, p) };
        }
    }

    /// Maps `nr` pages of `array` at `start`, side by side; false if the platform refused.
    fn map_pages<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        start: usize,
        array: *mut *const Page,
        nr: usize,
        prot: PageProt,
    ) -> bool {
        let pa = cx.pages;
        for i in 0..nr {
            // SAFETY: the array holds `nr` descriptors of `pa`'s `mem_map`.
            let page = unsafe { &**array.add(i) };
            let va = VirtAddr(start + i * PAGE_SIZE);
            // SAFETY: `va` lies in the vmalloc range, inside a busy area still being set up
            // by us (`VM_UNINITIALIZED`): nothing else maps or uses it, and it was unmapped
            // when its range was last freed.
            if unsafe { pa.platform().map_page(va, pa.page_to_pfn(page), prot) }.is_err() {
                return false;
            }
        }
        true
    }

    /// Makes a set-up area visible: its page array, and the end of `VM_UNINITIALIZED`
    /// (`clear_vm_uninitialized_flag`).
    fn publish(&self, node: Link, array: *mut *const Page, nr: usize) {
        let _st = self.lock.lock();
        // SAFETY: `node` is our busy, still uninitialized area: nobody else unlinks it; the
        // lock orders these writes before any reader's.
        unsafe {
            (*node).pages = array;
            (*node).nr_pages = nr;
            (*node).flags &= !VM_UNINITIALIZED.0;
        }
    }

    /// Undoes a failed set-up; always returns `None`.
    fn undo<P: Platform, T>(&self, cx: VmCtx<'_, P>, u: Undo) -> Option<T> {
        self.failures.fetch_add(1, Relaxed);
        self.unlink_own(u.node);
        let pa = cx.pages;
        if u.mapped {
            // SAFETY: the range is ours (unlinked above) and nothing uses it.
            unsafe {
                pa.platform()
                    .unmap_pages(VirtAddr(u.start), u.usable / PAGE_SIZE)
            };
        }
        if !u.pages.is_null() {
            for i in 0..u.owned {
                // SAFETY: the first `owned` entries are pages we allocated, never handed
                // out, now unmapped.
                unsafe { pa.__free_pages(&**u.pages.add(i), 0) };
            }
            // SAFETY: our array, no longer used.
            unsafe { self.free_page_array(cx, u.pages) };
        }
        // SAFETY: unlinked above, unmapped, unused.
        unsafe { self.free_vmap_area_lazy(cx, u.node) };
        None
    }

    /// Takes the area starting at `addr` down (`remove_vm_area` and the rest of `vfree`,
    /// `vunmap`, `free_vm_area`).
    ///
    /// # Safety
    ///
    /// If `addr` starts a live area, nothing may use it after this call.
    pub(crate) unsafe fn remove_vm_area<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        addr: *const u8,
        how: Remove,
    ) {
        if addr.is_null() {
            return;
        }
        let a = addr as usize;
        if a % PAGE_SIZE != 0 {
            return self.bad_free(cx, how, a, "bad address");
        }
        let n = match self.unlink_busy(a, how == Remove::Vfree) {
            Ok(n) => n,
            Err(super::area::UnlinkError::Nonexistent) => {
                return self.bad_free(cx, how, a, "nonexistent vm area");
            }
            Err(super::area::UnlinkError::OwnsPages) => {
                return self.bad_free(cx, how, a, "vmalloc()ed area: use vfree()");
            }
        };
        // SAFETY: `n` was unlinked by us: we own it until it is queued below.
        let area: &VmapArea = unsafe { &*n };
        let (start, flags, array, nr) = (
            area.va_start,
            VmFlags(area.flags),
            area.pages,
            area.nr_pages,
        );
        let usable = area.size() - guard_size(flags);
        let pa = cx.pages;
        // Clear the page-table entries now; the TLB flush waits for the purge.
        // SAFETY: the range is ours (unlinked) and the caller no longer uses it.
        unsafe {
            pa.platform()
                .unmap_pages(VirtAddr(start), usable / PAGE_SIZE)
        };
        if !array.is_null() {
            if flags.contains(VM_ALLOC) {
                for i in 0..nr {
                    // SAFETY: a vmalloc area owns the `nr` pages of its array, unmapped
                    // above.
                    unsafe { pa.__free_pages(&**array.add(i), 0) };
                }
                self.nr_vmalloc_pages.fetch_sub(nr, Relaxed);
            }
            // SAFETY: the array belonged to the area, which is gone.
            unsafe { self.free_page_array(cx, array) };
        }
        // SAFETY: unlinked, unmapped, unused.
        unsafe { self.free_vmap_area_lazy(cx, n) };
    }

    // ------------------------------------------------------------------ reports

    /// "Trying to vfree() bad address (%p)" and friends (a `WARN`): counted, logged, and
    /// nothing else happens.
    #[cold]
    fn bad_free<P: Platform>(&self, cx: VmCtx<'_, P>, how: Remove, addr: usize, what: &str) {
        self.bad_frees.fetch_add(1, Relaxed);
        let p = cx.pages.platform();
        let t = p.current_task();
        let cpu = p.cpu_guard().cpu();
        p.log(
            LogLevel::Err,
            format_args!("Trying to {}() {what} ({addr:016x})", how.name()),
        );
        p.log(
            LogLevel::Err,
            format_args!(
                "WARNING: CPU: {cpu} PID: {} Comm: {} at mm/vmalloc.c {}",
                t.pid,
                t.comm(),
                how.name()
            ),
        );
    }

    /// `warn_alloc` for vmalloc: "comm: vmalloc error: ..., mode:0x..(...), nodemask=(null)",
    /// the task line and `Mem-Info`, unless `__GFP_NOWARN`.
    #[cold]
    pub(crate) fn warn_alloc<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        gfp: Gfp,
        msg: core::fmt::Arguments<'_>,
    ) {
        if gfp.contains(__GFP_NOWARN) {
            return;
        }
        let p = cx.pages.platform();
        let t = p.current_task();
        p.log(
            LogLevel::Warning,
            format_args!(
                "{}: {msg}, mode:{:#x}({gfp}), nodemask=(null)",
                t.comm(),
                gfp.bits()
            ),
        );
        let cpu = p.cpu_guard().cpu();
        p.log(
            LogLevel::Warning,
            format_args!("CPU: {cpu} PID: {} Comm: {}", t.pid, t.comm()),
        );
        cx.pages.show_free_areas();
    }
}
