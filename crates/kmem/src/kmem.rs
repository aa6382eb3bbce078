//! [`Kmem`]: the whole subsystem of one machine, booted in the kernel's order.
//!
//! It holds the page allocator, the slab layer and the kmalloc caches, and offers the
//! kernel-named API over them (`kmalloc`, `kmem_cache_alloc`, ...). It dereferences to the
//! page allocator, so page-level calls read as in a kernel too: `kmem.alloc_pages(GFP_KERNEL, 0)`.

use core::ops::Deref;
use core::ptr::NonNull;

use crate::addr::Pfn;
use crate::config::Config;
use crate::gfp::Gfp;
use crate::kmalloc::Kmalloc;
use crate::memblock::Memblock;
use crate::page_alloc::page::Page;
use crate::page_alloc::{BootError, PageAlloc};
use crate::percpu::{PercpuAllocator, PercpuPtr, Zeroable};
use crate::platform::PageProt;
use crate::platform::Platform;
use crate::slab::shrink::SlabShrinker;
use crate::slab::{Ctor, KmemCache, KmemCacheArgs, SlabAllocator, SlabFlags};
use crate::vmalloc::{VmCtx, VmFlags, VmStruct, Vmalloc};

/// The memory-allocation subsystem of one machine.
pub struct Kmem<P: Platform> {
    pages: PageAlloc<P>,
    slab: SlabAllocator,
    kmalloc: Kmalloc,
    shrinker: SlabShrinker<P>,
    vmalloc: Vmalloc,
    percpu: PercpuAllocator,
    boot_free_pages: usize,
}

impl<P: Platform> Kmem<P> {
    /// Boots the subsystem over `memblock`'s memory map: `mem_map` and the zones, the
    /// hand-over of every unreserved page to the buddy allocator, then the kmalloc caches.
    ///
    /// Context: boot, single-threaded. `memblock` must describe RAM reachable through
    /// `platform`'s direct map below the layout's low-memory end. Call [`Kmem::late_init`]
    /// once the value sits where it will stay.
    pub fn boot(memblock: &mut Memblock, config: Config, platform: P) -> Result<Self, BootError> {
        // `setup_per_cpu_areas`: the first per-CPU chunk, a unit per possible CPU, embedded
        // in low memory before the buddy allocator takes the rest over.
        let nr_units = platform.nr_cpu_ids();
        let first_chunk = memblock
            .phys_alloc_range(
                PercpuAllocator::first_chunk_size(nr_units) as u64,
                crate::addr::PAGE_SIZE as u64,
                0,
                config.layout.lowmem_end(),
            )
            .ok_or(BootError::NoPercpuMemory(
                PercpuAllocator::first_chunk_size(nr_units),
            ))?;
        let pages = PageAlloc::boot(memblock, config, platform)?;
        let slab = SlabAllocator::new();
        slab.set_merge(config.slab_merge);
        let kmalloc = Kmalloc::new();
        if !kmalloc.create_caches(&slab, &pages) {
            return Err(BootError::NoEarlyCaches);
        }
        // `vmalloc_init`: the vmap_area cache and one free area over the platform's range.
        let vmalloc = Vmalloc::new(
            pages.platform().vmalloc_range(),
            VmCtx::new(&pages, &slab, &kmalloc),
        )
        .ok_or(BootError::NoEarlyCaches)?;
        let first_base = pages.platform().direct_map_base() + first_chunk as usize;
        // SAFETY: the first chunk was reserved in memblock above, so the page allocator never
        // hands it out; it lies below the low-memory end, in the direct map, for good.
        let percpu = unsafe { PercpuAllocator::new(pages.platform(), nr_units, first_base) };
        // Boot leaves no page on a per-CPU list: the free lists hold all free memory.
        pages.drain_all_pages();
        let boot_free_pages = pages.nr_free_pages();
        Ok(Kmem {
            boot_free_pages,
            pages,
            slab,
            kmalloc,
            shrinker: SlabShrinker::new(),
            vmalloc,
            percpu,
        })
    }

    /// Late initcalls: registers the slab shrinker with the page allocator, so memory pressure
    /// returns free slabs. Idempotent in effect only once; call it once.
    ///
    /// # Safety
    ///
    /// `self` must not move or be dropped while the page allocator may reclaim, i.e. for the
    /// rest of its life (box it, or keep it in a `static`).
    pub unsafe fn late_init(&self) {
        // SAFETY: the caller pins `self`, which owns all three parts.
        unsafe {
            self.shrinker.bind(&self.pages, &self.slab);
            self.pages.register_shrinker(&self.shrinker);
        }
    }

    /// Free pages right after boot: managed pages minus what boot itself kept (the kmalloc
    /// caches' descriptors). A machine whose allocations are all freed, caches shrunk and
    /// per-CPU lists drained returns to this figure.
    pub fn boot_free_pages(&self) -> usize {
        self.boot_free_pages
    }

    /// The page allocator.
    pub fn pages(&self) -> &PageAlloc<P> {
        &self.pages
    }

    /// The slab layer.
    pub fn slab(&self) -> &SlabAllocator {
        &self.slab
    }

    /// The kmalloc caches.
    pub fn kmalloc_caches(&self) -> &Kmalloc {
        &self.kmalloc
    }

    // ------------------------------------------------------------------ slab caches

    /// `kmem_cache_create`; see [`SlabAllocator::kmem_cache_create`].
    pub fn kmem_cache_create(
        &self,
        name: &str,
        size: usize,
        align: usize,
        flags: SlabFlags,
        ctor: Option<Ctor>,
    ) -> Option<&KmemCache> {
        self.slab
            .kmem_cache_create(&self.pages, name, size, align, flags, ctor)
    }

    /// `kmem_cache_create` with `kmem_cache_args`.
    pub fn kmem_cache_create_args(
        &self,
        name: &str,
        size: usize,
        args: &KmemCacheArgs,
        flags: SlabFlags,
    ) -> Option<&KmemCache> {
        self.slab
            .kmem_cache_create_args(&self.pages, name, size, args, flags)
    }

    /// `kmem_cache_alloc`; see [`SlabAllocator::kmem_cache_alloc`].
    #[inline(always)]
    pub fn kmem_cache_alloc(&self, s: &KmemCache, gfp: Gfp) -> Option<NonNull<u8>> {
        self.slab.kmem_cache_alloc(&self.pages, s, gfp)
    }

    /// `kmem_cache_zalloc`.
    pub fn kmem_cache_zalloc(&self, s: &KmemCache, gfp: Gfp) -> Option<NonNull<u8>> {
        self.slab.kmem_cache_zalloc(&self.pages, s, gfp)
    }

    /// `kmem_cache_free`; see [`SlabAllocator::kmem_cache_free`].
    ///
    /// # Safety
    ///
    /// If `obj` is a live object of `s`, nothing may use it after this call.
    #[inline(always)]
    pub unsafe fn kmem_cache_free(&self, s: &KmemCache, obj: *mut u8) {
        // SAFETY: the caller's contract.
        unsafe { self.slab.kmem_cache_free(&self.pages, s, obj) }
    }

    /// `kmem_cache_alloc_bulk`: all of `out`, or nothing (returns 0).
    pub fn kmem_cache_alloc_bulk(&self, s: &KmemCache, gfp: Gfp, out: &mut [*mut u8]) -> usize {
        self.slab.kmem_cache_alloc_bulk(&self.pages, s, gfp, out)
    }

    /// `kmem_cache_free_bulk`.
    ///
    /// # Safety
    ///
    /// As [`Kmem::kmem_cache_free`], for every pointer.
    pub unsafe fn kmem_cache_free_bulk(&self, s: &KmemCache, objs: &[*mut u8]) {
        for &o in objs {
            // SAFETY: the caller's contract.
            unsafe { self.slab.kmem_cache_free(&self.pages, s, o) };
        }
    }

    /// `kmem_cache_shrink`: returns the pages given back.
    pub fn kmem_cache_shrink(&self, s: &KmemCache) -> usize {
        self.slab.kmem_cache_shrink(&self.pages, s)
    }

    /// `kmem_cache_destroy`; see [`SlabAllocator::kmem_cache_destroy`].
    ///
    /// # Safety
    ///
    /// When it returns `true`, `s` may be freed: do not use it again.
    pub unsafe fn kmem_cache_destroy(&self, s: &KmemCache) -> bool {
        // SAFETY: the caller's contract.
        unsafe { self.slab.kmem_cache_destroy(&self.pages, s) }
    }

    /// `kmem_cache_size`: the object size the cache was created for.
    pub fn kmem_cache_size(&self, s: &KmemCache) -> usize {
        s.object_size()
    }

    // ------------------------------------------------------------------ kmalloc

    /// `kmalloc`; see [`Kmalloc::kmalloc`].
    #[inline(always)]
    pub fn kmalloc(&self, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        self.kmalloc.kmalloc(&self.slab, &self.pages, size, gfp)
    }

    /// `kzalloc`: zeroed `kmalloc`.
    #[inline(always)]
    pub fn kzalloc(&self, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        self.kmalloc(size, gfp | crate::gfp::__GFP_ZERO)
    }

    /// `kmalloc_array`: `None` when `n * size` overflows.
    pub fn kmalloc_array(&self, n: usize, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        self.kmalloc
            .kmalloc_array(&self.slab, &self.pages, n, size, gfp)
    }

    /// `kcalloc`: zeroed `kmalloc_array`.
    pub fn kcalloc(&self, n: usize, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        self.kmalloc.kcalloc(&self.slab, &self.pages, n, size, gfp)
    }

    /// `kfree`; see [`Kmalloc::kfree`].
    ///
    /// # Safety
    ///
    /// If `p` is a live kmalloc allocation, nothing may use it after this call.
    #[inline(always)]
    pub unsafe fn kfree(&self, p: *mut u8) {
        // SAFETY: the caller's contract.
        unsafe { self.kmalloc.kfree(&self.slab, &self.pages, p) }
    }

    /// `ksize`: the usable size of a kmalloc allocation.
    pub fn ksize(&self, p: *const u8) -> usize {
        self.kmalloc.ksize(&self.slab, &self.pages, p)
    }

    /// `krealloc`; see [`Kmalloc::krealloc`].
    ///
    /// # Safety
    ///
    /// `p` is null, `ZERO_SIZE_PTR` or a live kmalloc allocation.
    pub unsafe fn krealloc(&self, p: *mut u8, new_size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        // SAFETY: the caller's contract.
        unsafe {
            self.kmalloc
                .krealloc(&self.slab, &self.pages, p, new_size, gfp)
        }
    }

    /// `kfree_sensitive`: zero, then free.
    ///
    /// # Safety
    ///
    /// As [`Kmem::kfree`].
    pub unsafe fn kfree_sensitive(&self, p: *mut u8) {
        // SAFETY: the caller's contract.
        unsafe { self.kmalloc.kfree_sensitive(&self.slab, &self.pages, p) }
    }

    /// `kmemdup`.
    pub fn kmemdup(&self, src: &[u8], gfp: Gfp) -> Option<NonNull<u8>> {
        self.kmalloc.kmemdup(&self.slab, &self.pages, src, gfp)
    }

    /// `kstrdup`: NUL-terminated copy.
    pub fn kstrdup(&self, s: &str, gfp: Gfp) -> Option<NonNull<u8>> {
        self.kmalloc.kstrdup(&self.slab, &self.pages, s, gfp)
    }

    // ------------------------------------------------------------------ vmalloc

    /// The vmalloc layer: `/proc/vmallocinfo`, `VmallocTotal`/`VmallocUsed`, statistics,
    /// and the calls not forwarded below (`__vmalloc_node_range`, `find_vm_area`, ...).
    pub fn vmalloc_space(&self) -> &Vmalloc {
        &self.vmalloc
    }

    /// The layers vmalloc builds on, for calls made on [`Kmem::vmalloc_space`].
    #[inline]
    pub fn vm_ctx(&self) -> VmCtx<'_, P> {
        VmCtx::new(&self.pages, &self.slab, &self.kmalloc)
    }

    /// `vmalloc`; see [`Vmalloc::vmalloc`].
    #[track_caller]
    pub fn vmalloc(&self, size: usize) -> Option<NonNull<u8>> {
        self.vmalloc.vmalloc(self.vm_ctx(), size)
    }

    /// `vzalloc`; see [`Vmalloc::vzalloc`].
    #[track_caller]
    pub fn vzalloc(&self, size: usize) -> Option<NonNull<u8>> {
        self.vmalloc.vzalloc(self.vm_ctx(), size)
    }

    /// `vmalloc_user`; see [`Vmalloc::vmalloc_user`].
    #[track_caller]
    pub fn vmalloc_user(&self, size: usize) -> Option<NonNull<u8>> {
        self.vmalloc.vmalloc_user(self.vm_ctx(), size)
    }

    /// `__vmalloc`; see [`Vmalloc::__vmalloc`].
    #[track_caller]
    pub fn __vmalloc(&self, size: usize, gfp: Gfp) -> Option<NonNull<u8>> {
        self.vmalloc.__vmalloc(self.vm_ctx(), size, gfp)
    }

    /// `vfree`; see [`Vmalloc::vfree`].
    ///
    /// # Safety
    ///
    /// If `addr` starts a live area, nothing may use its memory after this call.
    pub unsafe fn vfree(&self, addr: *const u8) {
        // SAFETY: the caller's contract.
        unsafe { self.vmalloc.vfree(self.vm_ctx(), addr) }
    }

    /// `vmap`; see [`Vmalloc::vmap`].
    #[track_caller]
    pub fn vmap(&self, pages: &[&Page], flags: VmFlags, prot: PageProt) -> Option<NonNull<u8>> {
        self.vmalloc.vmap(self.vm_ctx(), pages, flags, prot)
    }

    /// `vunmap`; see [`Vmalloc::vunmap`].
    ///
    /// # Safety
    ///
    /// If `addr` starts a live area, nothing may use the mapping after this call.
    pub unsafe fn vunmap(&self, addr: *const u8) {
        // SAFETY: the caller's contract.
        unsafe { self.vmalloc.vunmap(self.vm_ctx(), addr) }
    }

    /// `vmalloc_to_page`; see [`Vmalloc::vmalloc_to_page`].
    pub fn vmalloc_to_page(&self, addr: *const u8) -> Option<&Page> {
        self.vmalloc.vmalloc_to_page(self.vm_ctx(), addr)
    }

    /// `vmalloc_to_pfn`; see [`Vmalloc::vmalloc_to_pfn`].
    pub fn vmalloc_to_pfn(&self, addr: *const u8) -> Option<Pfn> {
        self.vmalloc.vmalloc_to_pfn(self.vm_ctx(), addr)
    }

    /// `is_vmalloc_addr`.
    #[inline]
    pub fn is_vmalloc_addr(&self, addr: *const u8) -> bool {
        self.vmalloc.is_vmalloc_addr(addr)
    }

    /// `get_vm_area`; see [`Vmalloc::get_vm_area`].
    #[track_caller]
    pub fn get_vm_area(&self, size: usize, flags: VmFlags) -> Option<VmStruct> {
        self.vmalloc.get_vm_area(self.vm_ctx(), size, flags)
    }

    /// `free_vm_area`; see [`Vmalloc::free_vm_area`].
    ///
    /// # Safety
    ///
    /// Nothing may use the area's mappings after this call.
    pub unsafe fn free_vm_area(&self, area: VmStruct) {
        // SAFETY: the caller's contract.
        unsafe { self.vmalloc.free_vm_area(self.vm_ctx(), area) }
    }

    // ------------------------------------------------------------------ per-CPU memory

    /// The per-CPU allocator: statistics (`Percpu` in meminfo) and chunk state.
    pub fn percpu(&self) -> &PercpuAllocator {
        &self.percpu
    }

    /// `alloc_percpu::<T>()`: a zeroed `T` for every possible CPU, with `GFP_KERNEL`.
    ///
    /// Context: may sleep. See [`PercpuAllocator::alloc`] for limits and reports.
    pub fn alloc_percpu<T: Zeroable>(&self) -> Option<PercpuPtr<T>> {
        self.alloc_percpu_gfp(crate::gfp::GFP_KERNEL)
    }

    /// `alloc_percpu_gfp::<T>(gfp)`: an atomic `gfp` is served from existing chunks only.
    pub fn alloc_percpu_gfp<T: Zeroable>(&self, gfp: Gfp) -> Option<PercpuPtr<T>> {
        let p = self.__alloc_percpu_gfp(
            core::mem::size_of::<T>().max(1),
            core::mem::align_of::<T>(),
            gfp,
        )?;
        Some(p.cast())
    }

    /// `__alloc_percpu(size, align)` with `GFP_KERNEL`.
    pub fn __alloc_percpu(&self, size: usize, align: usize) -> Option<PercpuPtr<u8>> {
        self.__alloc_percpu_gfp(size, align, crate::gfp::GFP_KERNEL)
    }

    /// `__alloc_percpu_gfp(size, align, gfp)`; see [`PercpuAllocator::alloc`].
    pub fn __alloc_percpu_gfp(&self, size: usize, align: usize, gfp: Gfp) -> Option<PercpuPtr<u8>> {
        let p = self
            .percpu
            .alloc(self.vm_ctx(), &self.vmalloc, size, align, gfp)?;
        Some(PercpuPtr::from_raw(p))
    }

    /// `get_cpu_ptr(ptr)`: pins the caller to its CPU and returns that CPU's copy; dropping
    /// the result is `put_cpu_ptr`. Dereferencing the copy is the caller's business.
    pub fn get_cpu_ptr<T>(&self, ptr: PercpuPtr<T>) -> crate::percpu::CpuPtr<'_, P, T> {
        crate::percpu::CpuPtr::get(self.pages.platform(), ptr)
    }

    /// `free_percpu`; see [`PercpuAllocator::free`].
    ///
    /// # Safety
    ///
    /// If `ptr` is a live allocation, no CPU's copy may be used after this call.
    pub unsafe fn free_percpu<T>(&self, ptr: PercpuPtr<T>) {
        // SAFETY: the caller's contract.
        unsafe {
            self.percpu
                .free(self.vm_ctx(), &self.vmalloc, ptr.addr() as *mut u8)
        }
    }

    /// Checks the page allocator's free lists and every cache's slabs (for tests).
    pub fn validate(&self) -> Result<(), &'static str> {
        self.pages.check_free_lists()?;
        self.vmalloc.validate()?;
        self.percpu.validate()?;
        self.slab.validate(&self.pages)
    }
}

impl<P: Platform> Deref for Kmem<P> {
    type Target = PageAlloc<P>;
    fn deref(&self) -> &PageAlloc<P> {
        &self.pages
    }
}
