//! The object allocators under test (the slab and kmalloc cases), behind [`ObjSource`].
//!
//! Each source hands out objects of a byte size and takes them back with that size:
//!
//! * [`KmallocSource`]: kmem's `kmalloc(size, GFP_KERNEL)` / `kfree(p)` (the size is not
//!   passed to `kfree`: kmem finds the cache through the page descriptor);
//! * [`KmemCacheSource`]: kmem's `kmem_cache_alloc(s, GFP_KERNEL)` / `kmem_cache_free(s, p)`
//!   on a cache of one object size (the size argument is ignored);
//! * [`GlobalAllocSource`] (also a [`PageSource`](crate::source::PageSource)): jemalloc,
//!   mimalloc or the system allocator through [`GlobalAlloc`] with
//!   `Layout::from_size_align(size, 8)`;
//! * [`SlabmallocSource`]: the `slabmalloc` crate's `SCAllocator<ObjectPage>` for one object
//!   size, refilled with zeroed 4 KiB pages from the system allocator when it runs dry.
//!
//! As with page sources, the workloads are generic over the source, so every allocator gets
//! its own compiled loop.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;

use kmem::Kmem;
use kmem::gfp::GFP_KERNEL;
use kmem::slab::KmemCache;
use kmem_hosted::platform::HostedPlatform;
use slabmalloc::{AllocationError, ObjectPage, SCAllocator};

use crate::source::GlobalAllocSource;

/// Alignment asked of the `malloc`-style peers in the object cases (kmalloc guarantees 8).
pub const OBJ_ALIGN: usize = 8;

/// An allocator of objects, as the slab benchmarks drive it.
pub trait ObjSource {
    /// Allocates `size` bytes (`1..=8192`) and returns the address. Panics when the allocator
    /// is out of memory: a benchmark that runs dry measures nothing.
    fn alloc(&mut self, size: usize) -> *mut u8;

    /// Frees an object.
    ///
    /// # Safety
    ///
    /// `p` must come from [`ObjSource::alloc`] on this source (or, for sources that say so,
    /// on another source of the same allocator) with the same `size`, and must not have been
    /// freed since.
    unsafe fn free(&mut self, p: *mut u8, size: usize);
}

/// kmem's kmalloc: `kmalloc(size, GFP_KERNEL)` / `kfree(p)`. Objects may be freed through any
/// `KmallocSource` of the same machine, on any thread.
#[derive(Clone, Copy)]
pub struct KmallocSource<'m> {
    kmem: &'m Kmem<HostedPlatform>,
}

impl<'m> KmallocSource<'m> {
    /// Drives the kmalloc caches of `kmem` (for a machine `m`: `m.kmem()`).
    pub fn new(kmem: &'m Kmem<HostedPlatform>) -> KmallocSource<'m> {
        KmallocSource { kmem }
    }
}

impl ObjSource for KmallocSource<'_> {
    #[inline(always)]
    fn alloc(&mut self, size: usize) -> *mut u8 {
        match self.kmem.kmalloc(size, GFP_KERNEL) {
            Some(p) => p.as_ptr(),
            None => out_of_memory("kmem kmalloc", size),
        }
    }

    #[inline(always)]
    unsafe fn free(&mut self, p: *mut u8, _size: usize) {
        // SAFETY: by the caller's contract `p` is a live kmalloc allocation of this machine,
        // freed only here.
        unsafe { self.kmem.kfree(p) };
    }
}

/// kmem's `kmem_cache_alloc(s, GFP_KERNEL)` / `kmem_cache_free(s, p)` on one cache.
#[derive(Clone, Copy)]
pub struct KmemCacheSource<'m> {
    kmem: &'m Kmem<HostedPlatform>,
    cache: &'m KmemCache,
}

impl<'m> KmemCacheSource<'m> {
    /// Drives `cache`, a cache of `kmem`.
    pub fn new(kmem: &'m Kmem<HostedPlatform>, cache: &'m KmemCache) -> KmemCacheSource<'m> {
        KmemCacheSource { kmem, cache }
    }
}

impl ObjSource for KmemCacheSource<'_> {
    #[inline(always)]
    fn alloc(&mut self, size: usize) -> *mut u8 {
        debug_assert!(size <= self.cache.object_size());
        match self.kmem.kmem_cache_alloc(self.cache, GFP_KERNEL) {
            Some(p) => p.as_ptr(),
            None => out_of_memory("kmem kmem_cache_alloc", size),
        }
    }

    #[inline(always)]
    unsafe fn free(&mut self, p: *mut u8, _size: usize) {
        // SAFETY: by the caller's contract `p` is a live object of `cache`, freed only here.
        unsafe { self.kmem.kmem_cache_free(self.cache, p) };
    }
}

#[inline(always)]
fn obj_layout(size: usize) -> Layout {
    // Sizes are at most 8192 here, far below isize::MAX; 8 is a power of two.
    match Layout::from_size_align(size, OBJ_ALIGN) {
        Ok(l) => l,
        Err(_) => unreachable!("object layouts are valid"),
    }
}

impl<A: GlobalAlloc> ObjSource for GlobalAllocSource<A> {
    #[inline(always)]
    fn alloc(&mut self, size: usize) -> *mut u8 {
        // SAFETY: callers ask for at least one byte.
        let p = unsafe { self.allocator().alloc(obj_layout(size)) };
        if p.is_null() {
            out_of_memory(self.name(), size);
        }
        p
    }

    #[inline(always)]
    unsafe fn free(&mut self, p: *mut u8, size: usize) {
        // SAFETY: by the caller's contract `p` was returned by `alloc` of this allocator with
        // the layout of `size`, and is freed once.
        unsafe { self.allocator().dealloc(p, obj_layout(size)) };
    }
}

/// `S` with the size fixed at compile time: `alloc(_)` and `free(p, _)` pass `N` to `S`, so
/// the size dispatch folds away as it does for a kernel's `kmalloc(sizeof(*p))`. Used by
/// `kmem-pair --const-size`.
pub struct ConstSize<S, const N: usize>(pub S);

impl<S: ObjSource, const N: usize> ObjSource for ConstSize<S, N> {
    #[inline(always)]
    fn alloc(&mut self, _size: usize) -> *mut u8 {
        self.0.alloc(N)
    }

    #[inline(always)]
    unsafe fn free(&mut self, p: *mut u8, _size: usize) {
        // SAFETY: the caller's contract, with the one size this wrapper ever allocates.
        unsafe { self.0.free(p, N) };
    }
}

/// Bytes in a `slabmalloc` `ObjectPage` (its alignment too).
const SLABMALLOC_PAGE: usize = 4096;

/// `slabmalloc::SCAllocator<ObjectPage>` for objects of one size (at most 4016 bytes), fed
/// zeroed, 4 KiB-aligned pages from the system allocator when it reports `OutOfMemory`.
///
/// `SCAllocator` is not thread-safe (allocation takes `&mut self`), so this source is only
/// used from one thread. Dropping it frees every page it was given: free every object first.
pub struct SlabmallocSource {
    sc: SCAllocator<'static, ObjectPage<'static>>,
    size: usize,
    pages: Vec<*mut u8>,
}

impl SlabmallocSource {
    /// An empty allocator of `size`-byte objects.
    pub fn new(size: usize) -> SlabmallocSource {
        assert!(
            (1..=4016).contains(&size),
            "slabmalloc's ObjectPage holds objects of 1..=4016 bytes"
        );
        SlabmallocSource {
            sc: SCAllocator::new(size),
            size,
            pages: Vec::new(),
        }
    }

    /// Pages handed to the allocator so far.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    #[cold]
    #[inline(never)]
    fn refill_and_alloc(&mut self, layout: Layout) -> *mut u8 {
        let page_layout = Layout::from_size_align(SLABMALLOC_PAGE, SLABMALLOC_PAGE)
            .unwrap_or_else(|_| unreachable!("a page layout is valid"));
        // SAFETY: the layout has a nonzero size.
        let page = unsafe { System.alloc_zeroed(page_layout) };
        if page.is_null() {
            out_of_memory("slabmalloc (its page provider)", self.size);
        }
        self.pages.push(page);
        // SAFETY: `page` is a fresh, zeroed, 4 KiB-aligned block of 4 KiB: a valid empty
        // `ObjectPage` (all-zero bitfield and links), used only through `sc` until `self` is
        // dropped, which drops `sc` before freeing the page (see `Drop`). The `'static` is a
        // lie that never escapes this struct.
        unsafe { self.sc.refill(&mut *(page as *mut ObjectPage<'static>)) };
        match self.sc.allocate(layout) {
            Ok(p) => p.as_ptr(),
            Err(_) => out_of_memory("slabmalloc", self.size),
        }
    }
}

impl ObjSource for SlabmallocSource {
    #[inline(always)]
    fn alloc(&mut self, _size: usize) -> *mut u8 {
        let layout = obj_layout(self.size);
        match self.sc.allocate(layout) {
            Ok(p) => p.as_ptr(),
            Err(AllocationError::OutOfMemory) => self.refill_and_alloc(layout),
            Err(AllocationError::InvalidLayout) => out_of_memory("slabmalloc", self.size),
        }
    }

    #[inline(always)]
    unsafe fn free(&mut self, p: *mut u8, _size: usize) {
        // SAFETY: `p` came from `alloc`, which never returns null.
        let p = unsafe { NonNull::new_unchecked(p) };
        if let Err(e) = self.sc.deallocate(p, obj_layout(self.size)) {
            panic!("slabmalloc: deallocate({p:p}) failed: {e:?}");
        }
    }
}

impl Drop for SlabmallocSource {
    fn drop(&mut self) {
        // Forget the allocator's links into the pages before freeing them.
        self.sc = SCAllocator::new(self.size);
        let page_layout = Layout::from_size_align(SLABMALLOC_PAGE, SLABMALLOC_PAGE)
            .unwrap_or_else(|_| unreachable!("a page layout is valid"));
        for p in self.pages.drain(..) {
            // SAFETY: each page came from `System.alloc_zeroed(page_layout)` and nothing
            // refers to it any more.
            unsafe { System.dealloc(p, page_layout) };
        }
    }
}

#[cold]
#[inline(never)]
fn out_of_memory(name: &str, size: usize) -> ! {
    panic!("{name}: out of memory allocating {size} bytes during a benchmark")
}
