//! vmalloc: virtually contiguous memory from physically scattered pages (`mm/vmalloc.c`).
//!
//! `vmalloc(size)` takes order-0 pages one at a time (`GFP_KERNEL | __GFP_HIGHMEM`: HighMem
//! pages are welcome, they need no direct-map address) and maps them side by side in the
//! platform's vmalloc range ([`Platform::vmalloc_range`]) with [`Platform::map_page`]; an
//! unmapped guard page follows every area, so running off its end faults. `vmap` maps pages
//! the caller already has; `get_vm_area` only reserves address space.
//!
//! # Address space: `vmap_area`s in three trees
//!
//! The range is cut into areas (`area.rs`), each a node of one of three AVL trees (`tree.rs`)
//! keyed by start address and guarded by the **vmap lock**:
//!
//! * the **free** tree, augmented with each subtree's largest free size, so the
//!   lowest-address area that fits `(size, align)` is found in `O(log n)`; freed ranges are
//!   merged with their free neighbours;
//! * the **busy** tree: areas handed out, found by address in `O(log n)` (`vfree`,
//!   `vmalloc_to_page`, `find_vm_area`). A busy node also holds what Linux keeps in the
//!   separate `vm_struct`: flags, page array, caller;
//! * the **purge** tree: lazily freed areas (below).
//!
//! Nodes are objects of a slab cache, `vmap_area`, created by [`Vmalloc::new`]: the core has
//! no heap. A split of a free area in two needs a second node; it is allocated *before* the
//! lock is taken (Linux's `ne_fit_preload_node`), and one spare is kept parked in the locked
//! state, refilled by merges, so most allocations allocate one node.
//!
//! # Laziness
//!
//! `vfree` unlinks the busy area, clears its page-table entries at once
//! ([`Platform::unmap_pages`]), frees its pages and page array, and queues the range in the
//! purge tree: only the TLB flush and the release of the range are deferred. When the queued
//! ranges exceed [`Vmalloc::lazy_max_pages`] (32 MiB times `fls(nr_cpus)`, Linux's
//! `lazy_max_pages()`), the `vfree` that crossed the line purges: one
//! [`Platform::flush_tlb_range`] over the whole batch, then every range merges back into the
//! free tree. An allocation that finds no room purges and retries once before it fails with
//! "vmap allocation for size N failed: use `vmalloc=<size>` to increase size".
//!
//! # Invariants
//!
//! * every byte of the range is in exactly one area: free, busy, queued, or in transit
//!   between trees (counted): `Σ free + Σ busy + Σ purge == range` when nothing is in transit;
//! * no two free areas touch; a busy area's pages are mapped at `va_start + i * PAGE_SIZE`
//!   for `i < nr_pages` and nothing else of it is mapped (its guard page never is);
//! * a queued or free range is unmapped; it is handed out again only after the TLB flush of
//!   the purge that freed it;
//! * `VM_UNINITIALIZED` marks a busy area whose pages are still being allocated and mapped:
//!   only its allocating task touches it; `vfree` and the reports skip it.
//!
//! # Lock order
//!
//! 0. a CPU guard, if the caller holds one (a `GFP_ATOMIC` allocation in atomic context);
//! 1. `purge_lock`: serializes purges; the TLB flush runs under it, not under the vmap lock;
//! 2. the vmap lock (`lock`): trees, lazy counter, spare node.
//!
//! Both vmalloc locks are leaves with respect to the rest of kmem: no allocation, free or
//! mapping happens under either (nodes are preloaded before the lock and freed after it),
//! so no CPU guard, slab node lock, zone lock or kmap lock is ever taken while one is held,
//! and they may be taken in any context. In particular a sleeping allocation (pages, nodes,
//! page arrays with `GFP_KERNEL`) always runs with no vmalloc lock held.
//!
//! # Deviations from Linux
//!
//! * `vfree` must be given the area's start; Linux also frees the area around a page-aligned
//!   address inside it. `vunmap`/`free_vm_area` of an area that owns its pages (a
//!   `vmalloc`) is refused instead of leaking the pages.
//! * A `vmap` area keeps a copy of its page array, so `vmalloc_to_page` works on it without
//!   walking page tables (the core has no page-table walker).
//! * Purges run synchronously in the `vfree` that crosses the threshold, not in a worker.
//! * `__GFP_NOFAIL` does not loop on exhausted address space (pages are still `NOFAIL`).
//! * The `vmap_area` cache is `SLAB_NO_MERGE` (Linux lets it merge): other caches never
//!   share it, so their object counts never include vmalloc's nodes.
//! * The caller in `/proc/vmallocinfo` is `file.rs:line` (`#[track_caller]`) or a name the
//!   caller passes, instead of `symbol+0xoff/0xsize`.

mod area;
mod info;
mod pages;
mod tree;
#[cfg(test)]
mod tree_tests;

use core::fmt;
use core::ops::BitOr;
use core::panic::Location;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use area::VmapState;

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::gfp::{
    __GFP_FS, __GFP_HIGH, __GFP_IO, __GFP_MEMALLOC, __GFP_NOFAIL, __GFP_NOMEMALLOC, __GFP_NORETRY,
    __GFP_NOWARN, __GFP_RECLAIM, __GFP_RETRY_MAYFAIL, Gfp,
};
use crate::kmalloc::Kmalloc;
use crate::page_alloc::PageAlloc;
use crate::platform::Platform;
use crate::slab::{KmemCache, SlabAllocator, SlabFlags};
use crate::sync::SpinLock;

/// The GFP bits that carry over to the allocations vmalloc makes for itself (nodes, page
/// arrays): Linux's `GFP_RECLAIM_MASK` (no zone modifiers, no `__GFP_ZERO`).
pub(crate) const GFP_RECLAIM_MASK: Gfp = __GFP_RECLAIM
    .union(__GFP_HIGH)
    .union(__GFP_IO)
    .union(__GFP_FS)
    .union(__GFP_NOWARN)
    .union(__GFP_RETRY_MAYFAIL)
    .union(__GFP_NOFAIL)
    .union(__GFP_NORETRY)
    .union(__GFP_MEMALLOC)
    .union(__GFP_NOMEMALLOC);

// ------------------------------------------------------------------------------ flags

/// `vm_struct` flags (`VM_*` in `include/linux/vmalloc.h`, same values).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VmFlags(pub u32);

impl VmFlags {
    /// No flag.
    pub const NONE: VmFlags = VmFlags(0);

    /// True when every bit of `other` is set.
    #[inline]
    pub const fn contains(self, other: VmFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// `self & !other`.
    #[inline]
    pub const fn without(self, other: VmFlags) -> VmFlags {
        VmFlags(self.0 & !other.0)
    }
}

impl BitOr for VmFlags {
    type Output = VmFlags;
    #[inline]
    fn bitor(self, rhs: VmFlags) -> VmFlags {
        VmFlags(self.0 | rhs.0)
    }
}

impl fmt::Debug for VmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmFlags({:#x})", self.0)
    }
}

/// `ioremap()` and friends: the area maps device memory (aligned to its size, up to 128
/// pages).
pub const VM_IOREMAP: VmFlags = VmFlags(0x0000_0001);
/// `vmalloc()`: the area owns its pages.
pub const VM_ALLOC: VmFlags = VmFlags(0x0000_0002);
/// `vmap()`: the area maps pages its caller owns.
pub const VM_MAP: VmFlags = VmFlags(0x0000_0004);
/// Suitable for mapping into user space (`vmalloc_user`, zeroed).
pub const VM_USERMAP: VmFlags = VmFlags(0x0000_0008);
/// The area is still being set up (`vmalloc` between reserving and mapping).
pub const VM_UNINITIALIZED: VmFlags = VmFlags(0x0000_0020);
/// No guard page after the area (Linux: "***DANGEROUS***").
pub const VM_NO_GUARD: VmFlags = VmFlags(0x0000_0040);

/// Largest natural alignment of an `ioremap` area: 128 pages (`IOREMAP_MAX_ORDER`).
pub const IOREMAP_MAX_ORDER: u32 = 7 + crate::addr::PAGE_SHIFT;

// ------------------------------------------------------------------------------ caller

/// Who asked for an area, shown in `/proc/vmallocinfo` (`vm_struct.caller`).
///
/// The kernel records a return address and prints its symbol; kmem has no symbols, so it
/// records the source location of the call (the public functions are `#[track_caller]`)
/// or a name the caller passes to a `*_caller` function.
#[derive(Clone, Copy, Debug)]
pub enum Caller {
    /// A name given by the caller (no spaces, to keep the report parseable).
    Name(&'static str),
    /// The source location of the call.
    Location(&'static Location<'static>),
}

impl Caller {
    /// The location of the call to the function this is called in (through
    /// `#[track_caller]` functions).
    #[track_caller]
    #[inline]
    pub fn here() -> Caller {
        Caller::Location(Location::caller())
    }
}

impl fmt::Display for Caller {
    /// `name`, or `file.rs:line` (the file's last path component).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Name(n) => f.write_str(n),
            Caller::Location(l) => {
                let file = l.file();
                let base = file.rsplit(['/', '\\']).next().unwrap_or(file);
                write!(f, "{base}:{}", l.line())
            }
        }
    }
}

// ------------------------------------------------------------------------------ vm_struct

/// A snapshot of a busy area (`struct vm_struct`), as [`Vmalloc::get_vm_area`] and
/// [`Vmalloc::find_vm_area`] return it. The area itself stays in the vmalloc layer; this copy
/// does not keep it alive.
#[derive(Clone, Copy, Debug)]
pub struct VmStruct {
    /// First byte of the area.
    pub addr: VirtAddr,
    /// Bytes reserved, the guard page included (`vm_struct.size`).
    pub size: usize,
    /// `VM_*` flags.
    pub flags: VmFlags,
    /// Pages the area owns (`vmalloc`), else 0.
    pub nr_pages: usize,
    /// Who asked for it.
    pub caller: Caller,
}

impl VmStruct {
    /// The first byte as a pointer.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Usable bytes: the size without the guard page (`get_vm_area_size`).
    #[inline]
    pub fn get_vm_area_size(&self) -> usize {
        if self.flags.contains(VM_NO_GUARD) {
            self.size
        } else {
            self.size - PAGE_SIZE
        }
    }
}

// ------------------------------------------------------------------------------ context

/// The layers vmalloc builds on, borrowed for one call: the page allocator (pages), the slab
/// layer (area nodes) and kmalloc (small page arrays).
///
/// Every call on a [`Vmalloc`] must pass the layers of the machine it was created on.
pub struct VmCtx<'a, P: Platform> {
    /// The page allocator.
    pub pages: &'a PageAlloc<P>,
    /// The slab layer that holds the `vmap_area` cache.
    pub slab: &'a SlabAllocator,
    /// The kmalloc caches (over `slab`).
    pub kmalloc: &'a Kmalloc,
}

impl<'a, P: Platform> VmCtx<'a, P> {
    /// Bundles the three layers.
    #[inline]
    pub fn new(pages: &'a PageAlloc<P>, slab: &'a SlabAllocator, kmalloc: &'a Kmalloc) -> Self {
        VmCtx {
            pages,
            slab,
            kmalloc,
        }
    }
}

impl<P: Platform> Clone for VmCtx<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Platform> Copy for VmCtx<'_, P> {}

// ------------------------------------------------------------------------------ Vmalloc

/// The vmalloc layer of one machine: its range, the `vmap_area` trees and counters.
pub struct Vmalloc {
    start: usize,                     // VMALLOC_START, page aligned
    end: usize,                       // VMALLOC_END, page aligned
    cache: NonNull<KmemCache>,        // the `vmap_area` cache: every tree node
    lock: SpinLock<VmapState>,        // the vmap lock: trees, lazy counters, spare node
    purge_lock: SpinLock<()>,         // held across a whole purge (before `lock`)
    has_spare: AtomicBool,            // `lock`'s spare node is present (racy hint)
    lazy_max: usize,                  // lazy_max_pages()
    nr_vmalloc_pages: AtomicUsize,    // pages owned by vmalloc areas (`VmallocUsed`)
    nr_purges: AtomicUsize,           // purges done
    bad_frees: AtomicUsize,           // bad vfree/vunmap/free_vm_area calls reported
    pub(crate) failures: AtomicUsize, // failed allocations (address space, pages, arrays)
}

// SAFETY: the cache pointer refers to a slab cache that lives as long as the slab layer and
// is itself `Sync`; everything else is atomics or behind the vmap lock.
unsafe impl Send for Vmalloc {}
// SAFETY: as for `Send`.
unsafe impl Sync for Vmalloc {}

impl Vmalloc {
    /// Sets up vmalloc over `range` (`vmalloc_init`): creates the `vmap_area` cache and one
    /// free area covering the page-aligned part of the range.
    ///
    /// Context: boot, after the slab layer and kmalloc; may sleep. A range of size 0 (a
    /// platform without one) gives a layer whose allocations all fail. Returns `None` when
    /// the cache or the first node cannot be allocated.
    pub fn new<P: Platform>(range: (VirtAddr, usize), cx: VmCtx<'_, P>) -> Option<Vmalloc> {
        let (base, size) = range;
        let start = base.0.checked_next_multiple_of(PAGE_SIZE)?;
        let end = base.0.checked_add(size)? & !(PAGE_SIZE - 1);
        let end = end.max(start);
        let cache = cx.slab.kmem_cache_create(
            cx.pages,
            "vmap_area",
            core::mem::size_of::<area::VmapArea>(),
            core::mem::align_of::<area::VmapArea>(),
            // Never shared: no other cache's objects are counted with the nodes (and the
            // nodes show in slabinfo as `vmap_area`).
            SlabFlags::NO_MERGE,
            None,
        )?;
        let nr_cpus = cx.pages.nr_cpus();
        let fls = (usize::BITS - nr_cpus.leading_zeros()) as usize;
        let vm = Vmalloc {
            start,
            end,
            cache: NonNull::from(cache),
            lock: SpinLock::new(VmapState::new()),
            purge_lock: SpinLock::new(()),
            has_spare: AtomicBool::new(false),
            lazy_max: fls * ((32 << 20) / PAGE_SIZE),
            nr_vmalloc_pages: AtomicUsize::new(0),
            nr_purges: AtomicUsize::new(0),
            bad_frees: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
        };
        if end > start {
            let n = vm.alloc_node(cx, crate::gfp::GFP_KERNEL);
            if n.is_null() {
                return None;
            }
            // SAFETY: `n` is a fresh node we own, covering the whole (empty) range.
            unsafe {
                n.write(area::VmapArea::new(start, end));
                vm.lock.lock().free.insert(n);
            }
        }
        Some(vm)
    }

    /// The managed range: first address and size in bytes (`VMALLOC_START`,
    /// `VMALLOC_END - VMALLOC_START`).
    pub fn range(&self) -> (VirtAddr, usize) {
        (VirtAddr(self.start), self.end - self.start)
    }

    /// True when `addr` lies in the vmalloc range (`is_vmalloc_addr`). Context: any.
    #[inline]
    pub fn is_vmalloc_addr(&self, addr: *const u8) -> bool {
        let a = addr as usize;
        a >= self.start && a < self.end
    }

    /// Pages of lazily freed ranges that trigger a purge (`lazy_max_pages`): 32 MiB worth
    /// times `fls(nr_cpus)`.
    pub fn lazy_max_pages(&self) -> usize {
        self.lazy_max
    }

    // ------------------------------------------------------------------ vmalloc family

    /// Allocates `size` bytes of virtually contiguous memory (`vmalloc`): `GFP_KERNEL`
    /// pages, HighMem welcome, mapped `PAGE_KERNEL`, a guard page after.
    ///
    /// Context: may sleep; process context. Returns `None` (with a "vmalloc error" report)
    /// for size 0, more than RAM, no address space or no memory.
    #[track_caller]
    pub fn vmalloc<P: Platform>(&self, cx: VmCtx<'_, P>, size: usize) -> Option<NonNull<u8>> {
        self.__vmalloc_node(cx, size, 1, crate::gfp::GFP_KERNEL, Caller::here())
    }

    /// `vmalloc` with zeroed memory (`vzalloc`). Context: may sleep.
    #[track_caller]
    pub fn vzalloc<P: Platform>(&self, cx: VmCtx<'_, P>, size: usize) -> Option<NonNull<u8>> {
        let gfp = crate::gfp::GFP_KERNEL | crate::gfp::__GFP_ZERO;
        self.__vmalloc_node(cx, size, 1, gfp, Caller::here())
    }

    /// Zeroed memory meant to be mapped into user space (`vmalloc_user`): the area is marked
    /// `VM_USERMAP`. Context: may sleep.
    #[track_caller]
    pub fn vmalloc_user<P: Platform>(&self, cx: VmCtx<'_, P>, size: usize) -> Option<NonNull<u8>> {
        let gfp = crate::gfp::GFP_KERNEL | crate::gfp::__GFP_ZERO;
        let prot = crate::platform::PageProt::KERNEL;
        self.__vmalloc_node_range(cx, size, PAGE_SIZE, gfp, prot, VM_USERMAP, Caller::here())
    }

    /// `vmalloc_node`: kmem has one node; same as [`Vmalloc::vmalloc`].
    #[track_caller]
    pub fn vmalloc_node<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        node: i32,
    ) -> Option<NonNull<u8>> {
        let _ = node;
        self.__vmalloc_node(cx, size, 1, crate::gfp::GFP_KERNEL, Caller::here())
    }

    /// `vmalloc` with the caller's GFP mask (`__vmalloc`).
    ///
    /// Context: sleeps only if `gfp` allows it: with `GFP_ATOMIC`/`GFP_NOWAIT` it never
    /// sleeps, and either succeeds or fails cleanly (every page taken is given back).
    /// `__GFP_ZERO` zeroes, `__GFP_NOWARN` silences the failure reports, `GFP_DMA`/`GFP_DMA32`
    /// restrict the pages' zone (otherwise `__GFP_HIGHMEM` is added).
    #[track_caller]
    pub fn __vmalloc<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        self.__vmalloc_node(cx, size, 1, gfp, Caller::here())
    }

    /// `__vmalloc_node`: `__vmalloc` with an alignment for the start of the area (a power of
    /// two) and an explicit caller.
    pub fn __vmalloc_node<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        align: usize,
        gfp: Gfp,
        caller: Caller,
    ) -> Option<NonNull<u8>> {
        let prot = crate::platform::PageProt::KERNEL;
        self.__vmalloc_node_range(cx, size, align, gfp, prot, VmFlags::NONE, caller)
    }

    /// The general allocator behind the family (`__vmalloc_node_range`): `size` bytes
    /// aligned to `align`, pages from `gfp`, mapped with `prot`, area flags `VM_ALLOC |
    /// vm_flags` (`VM_NO_GUARD` drops the guard page, `VM_USERMAP` marks user memory).
    ///
    /// Context: as [`Vmalloc::__vmalloc`].
    #[allow(clippy::too_many_arguments)]
    pub fn __vmalloc_node_range<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        align: usize,
        gfp: Gfp,
        prot: crate::platform::PageProt,
        vm_flags: VmFlags,
        caller: Caller,
    ) -> Option<NonNull<u8>> {
        self.vmalloc_area(cx, size, align, gfp, prot, vm_flags, caller)
    }

    /// Frees memory from the `vmalloc` family (`vfree`); null is a no-op.
    ///
    /// The mapping is removed and the pages are freed at once; the address range is released
    /// lazily. An address that is not page aligned ("Trying to vfree() bad address") or does
    /// not start a live area ("Trying to vfree() nonexistent vm area") — a double free, a
    /// pointer from elsewhere — is reported and changes nothing. A `vmap` area is unmapped
    /// (its pages stay the caller's).
    ///
    /// Context: any but NMI; never sleeps (it may purge lazily freed ranges).
    ///
    /// # Safety
    ///
    /// If `addr` starts a live area, nothing may use its memory after this call.
    pub unsafe fn vfree<P: Platform>(&self, cx: VmCtx<'_, P>, addr: *const u8) {
        // SAFETY: the caller's contract.
        unsafe { self.remove_vm_area(cx, addr, pages::Remove::Vfree) }
    }

    /// Maps `pages` side by side into a fresh area (`vmap`), with `prot` and area `flags`
    /// (usually [`VM_MAP`]; `VM_ALLOC` is ignored: the pages stay the caller's). HighMem
    /// pages are fine.
    ///
    /// Context: may sleep. Returns `None` for no pages, more pages than RAM, or no address
    /// space or memory (for the page-array copy).
    #[track_caller]
    pub fn vmap<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        pages: &[&crate::page_alloc::page::Page],
        flags: VmFlags,
        prot: crate::platform::PageProt,
    ) -> Option<NonNull<u8>> {
        self.vmap_caller(cx, pages, flags, prot, Caller::here())
    }

    /// Removes a [`Vmalloc::vmap`] mapping (`vunmap`); the pages stay the caller's; null is a
    /// no-op. A bad address, or a `vmalloc` area (use `vfree`), is reported and changes
    /// nothing.
    ///
    /// Context: process context; never sleeps here.
    ///
    /// # Safety
    ///
    /// If `addr` starts a live area, nothing may use the mapping after this call.
    pub unsafe fn vunmap<P: Platform>(&self, cx: VmCtx<'_, P>, addr: *const u8) {
        // SAFETY: the caller's contract.
        unsafe { self.remove_vm_area(cx, addr, pages::Remove::Vunmap) }
    }

    /// Reserves `size` bytes of the vmalloc range, plus a guard page unless `VM_NO_GUARD`
    /// (`get_vm_area`). Nothing is mapped: the caller maps what it likes with
    /// [`Platform::map_page`] and releases with [`Vmalloc::free_vm_area`]. `VM_IOREMAP`
    /// areas are aligned to their size (up to 128 pages).
    ///
    /// Context: may sleep. Returns `None` for size 0 or no address space (reported).
    #[track_caller]
    pub fn get_vm_area<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        flags: VmFlags,
    ) -> Option<VmStruct> {
        self.__get_vm_area(cx, size, 1, flags, Caller::here())
    }

    /// `get_vm_area_caller`: [`Vmalloc::get_vm_area`] with an explicit caller.
    pub fn get_vm_area_caller<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        flags: VmFlags,
        caller: Caller,
    ) -> Option<VmStruct> {
        self.__get_vm_area(cx, size, 1, flags, caller)
    }

    /// `__get_vm_area_node`: [`Vmalloc::get_vm_area`] with the start aligned to `align` (a
    /// power of two; smaller than a page means a page). A bad alignment is reported.
    ///
    /// Context: may sleep.
    pub fn __get_vm_area<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        align: usize,
        flags: VmFlags,
        caller: Caller,
    ) -> Option<VmStruct> {
        self.get_vm_area_node(cx, size, align, flags, crate::gfp::GFP_KERNEL, caller)
    }

    /// Releases an area from [`Vmalloc::get_vm_area`] (`free_vm_area`): whatever the caller
    /// mapped in it is unmapped, the range is released lazily. A stale or foreign area, or a
    /// `vmalloc` area (use `vfree`), is reported and changes nothing.
    ///
    /// Context: never sleeps here.
    ///
    /// # Safety
    ///
    /// Nothing may use the area's mappings after this call.
    pub unsafe fn free_vm_area<P: Platform>(&self, cx: VmCtx<'_, P>, area: VmStruct) {
        // SAFETY: the caller's contract.
        unsafe { self.remove_vm_area(cx, area.as_ptr(), pages::Remove::FreeVmArea) }
    }

    /// The busy area containing `addr`, as a snapshot (`find_vm_area`). Context: any.
    pub fn find_vm_area(&self, addr: *const u8) -> Option<VmStruct> {
        let st = self.lock.lock();
        let n = st.busy.find_containing(addr as usize);
        // SAFETY: `n` is null or a node of the busy tree, read under the lock.
        let n = unsafe { n.as_ref()? };
        if n.flags & VM_UNINITIALIZED.0 != 0 {
            return None;
        }
        Some(Self::snapshot(n))
    }

    /// The page mapped at `addr` in a `vmalloc` or `vmap` area (`vmalloc_to_page`); `None`
    /// for a guard page, an area without a page array (`get_vm_area`) or an address outside
    /// any busy area. Context: any.
    pub fn vmalloc_to_page<'a, P: Platform>(
        &self,
        cx: VmCtx<'a, P>,
        addr: *const u8,
    ) -> Option<&'a crate::page_alloc::page::Page> {
        let _ = cx; // it only ties the result to the page allocator's lifetime
        let a = addr as usize;
        let st = self.lock.lock();
        let n = st.busy.find_containing(a);
        // SAFETY: `n` is null or a node of the busy tree, read under the lock.
        let n = unsafe { n.as_ref()? };
        if n.flags & VM_UNINITIALIZED.0 != 0 || n.pages.is_null() {
            return None;
        }
        let i = (a - n.va_start) / PAGE_SIZE;
        if i >= n.nr_pages {
            return None;
        }
        // SAFETY: a published area's array has `nr_pages` entries and lives while the area
        // is busy (we hold the lock); each entry is a descriptor of `cx.pages`' `mem_map`,
        // which lives as long as `cx.pages`.
        Some(unsafe { &**n.pages.add(i) })
    }

    /// The frame mapped at `addr` (`vmalloc_to_pfn`); `None` where
    /// [`Vmalloc::vmalloc_to_page`] is.
    pub fn vmalloc_to_pfn<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        addr: *const u8,
    ) -> Option<crate::addr::Pfn> {
        self.vmalloc_to_page(cx, addr)
            .map(|p| cx.pages.page_to_pfn(p))
    }

    /// Purges every lazily freed range now (`vm_unmap_aliases`): one TLB flush, then the
    /// ranges are free again. Also gives back the node kept for splits, so that a quiet
    /// layer holds exactly one node per area. Returns true when there was something to
    /// purge.
    ///
    /// Context: never sleeps; waits for a purge in progress.
    pub fn vm_unmap_aliases<P: Platform>(&self, cx: VmCtx<'_, P>) -> bool {
        let purged = self.purge(cx, true);
        let spare = {
            let mut st = self.lock.lock();
            self.has_spare.store(false, Relaxed);
            core::mem::replace(&mut st.spare, core::ptr::null_mut())
        };
        self.free_node(cx, spare);
        purged
    }

    // ------------------------------------------------------------------ figures

    /// `VmallocTotal` of `/proc/meminfo`, in kB: the size of the range.
    pub fn vmalloc_total_kb(&self) -> u64 {
        ((self.end - self.start) / 1024) as u64
    }

    /// `VmallocUsed` of `/proc/meminfo`, in pages: pages owned by `vmalloc` areas
    /// (`vmalloc_nr_pages`).
    pub fn vmalloc_nr_pages(&self) -> usize {
        self.nr_vmalloc_pages.load(Relaxed)
    }

    /// Busy areas (`vmalloc`, `vmap`, `get_vm_area`), set-up ones included.
    pub fn nr_busy_areas(&self) -> usize {
        self.lock.lock().busy.len()
    }

    /// Free areas (fragments of the free address space).
    pub fn nr_free_areas(&self) -> usize {
        self.lock.lock().free.len()
    }

    /// Bytes of the largest free area (what the largest allocation, guard page included,
    /// could get without a purge).
    pub fn largest_free_area(&self) -> usize {
        self.lock.lock().free.max_size()
    }

    /// Pages of lazily freed ranges waiting for a purge (`vmap_lazy_nr`).
    pub fn lazy_pages(&self) -> usize {
        self.lock.lock().lazy_pages
    }

    /// Purges done so far.
    pub fn nr_purges(&self) -> usize {
        self.nr_purges.load(Relaxed)
    }

    /// Bad `vfree`/`vunmap`/`free_vm_area` calls reported so far.
    pub fn bad_frees(&self) -> usize {
        self.bad_frees.load(Relaxed)
    }

    /// Failed allocations so far (address space, pages, page arrays, mappings).
    pub fn alloc_failures(&self) -> usize {
        self.failures.load(Relaxed)
    }

    /// The `vmap_area` cache (for reports and tests).
    pub fn area_cache(&self) -> &KmemCache {
        // SAFETY: created by `new`, never destroyed.
        unsafe { self.cache.as_ref() }
    }
}
