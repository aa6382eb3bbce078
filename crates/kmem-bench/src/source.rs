//! The allocators under test, behind one small interface: [`PageSource`].
//!
//! Each source hands out blocks of `1 << order` pages and takes them back. A block is named by
//! an opaque `usize` handle: a `*const Page` for kmem, a frame number for
//! `buddy_system_allocator`, an address for the `malloc`-style peers. The workload loops in
//! [`crate::workload`] are generic over the source, so each peer's loop is compiled on its
//! own and no indirect call sits between the timer and the allocator.

use std::alloc::{GlobalAlloc, Layout, System};

use buddy_system_allocator::FrameAllocator;
use kmem::gfp::GFP_KERNEL;
use kmem::page_alloc::PageAlloc;
use kmem::page_alloc::page::Page;
use kmem_hosted::platform::HostedPlatform;
use mimalloc::MiMalloc;
use tikv_jemallocator::Jemalloc;

/// Bytes in a page: the unit every source allocates in.
pub const PAGE_SIZE: usize = 4096;

/// An allocator of page blocks, as the benchmarks drive it.
pub trait PageSource {
    /// Allocates a block of `1 << order` pages and returns its handle. Panics when the
    /// allocator is out of memory: a benchmark that runs dry measures nothing.
    fn alloc(&mut self, order: u32) -> usize;

    /// Frees a block.
    ///
    /// # Safety
    ///
    /// `handle` must come from [`PageSource::alloc`] on this source with the same `order`,
    /// and must not have been freed since.
    unsafe fn free(&mut self, handle: usize, order: u32);
}

/// kmem's page allocator: `alloc_pages(GFP_KERNEL, order)` / `__free_pages(page, order)`.
pub struct KmemSource<'m> {
    pages: &'m PageAlloc<HostedPlatform>,
}

impl<'m> KmemSource<'m> {
    /// Drives the page allocator `pages` (for a machine `m`: `m.pages()`).
    pub fn new(pages: &'m PageAlloc<HostedPlatform>) -> KmemSource<'m> {
        KmemSource { pages }
    }
}

impl PageSource for KmemSource<'_> {
    #[inline(always)]
    fn alloc(&mut self, order: u32) -> usize {
        match self.pages.alloc_pages(GFP_KERNEL, order) {
            Some(page) => page as *const Page as usize,
            None => out_of_memory("kmem", order),
        }
    }

    #[inline(always)]
    unsafe fn free(&mut self, handle: usize, order: u32) {
        // SAFETY: by the caller's contract `handle` is a `&Page` that `alloc_pages` returned
        // from this allocator (descriptors live as long as the allocator), freed only here.
        unsafe { self.pages.__free_pages(&*(handle as *const Page), order) };
    }
}

/// `buddy_system_allocator::FrameAllocator` with the crate's default `ORDER`:
/// `alloc(1 << order)` / `dealloc(frame, 1 << order)`.
pub struct BuddySource {
    frames: FrameAllocator,
}

impl BuddySource {
    /// A frame allocator holding frames `0..nr_frames`, added with one `add_frame` call.
    pub fn new(nr_frames: usize) -> BuddySource {
        let mut frames = FrameAllocator::new();
        frames.add_frame(0, nr_frames);
        BuddySource { frames }
    }
}

impl PageSource for BuddySource {
    #[inline(always)]
    fn alloc(&mut self, order: u32) -> usize {
        match self.frames.alloc(1 << order) {
            Some(frame) => frame,
            None => out_of_memory("buddy_system_allocator", order),
        }
    }

    #[inline(always)]
    unsafe fn free(&mut self, handle: usize, order: u32) {
        self.frames.dealloc(handle, 1 << order);
    }
}

/// A `malloc`-style allocator through [`GlobalAlloc`]: `4096 << order` bytes, 4096-aligned.
pub struct GlobalAllocSource<A: GlobalAlloc> {
    alloc: A,
    name: &'static str,
}

impl<A: GlobalAlloc> GlobalAllocSource<A> {
    /// Drives `alloc` (named `name` in panics).
    pub fn new(alloc: A, name: &'static str) -> GlobalAllocSource<A> {
        GlobalAllocSource { alloc, name }
    }

    /// The allocator.
    #[inline(always)]
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// jemalloc (`tikv-jemallocator`).
pub fn jemalloc() -> GlobalAllocSource<Jemalloc> {
    GlobalAllocSource::new(Jemalloc, "jemalloc")
}

/// mimalloc (the `mimalloc` crate).
pub fn mimalloc() -> GlobalAllocSource<MiMalloc> {
    GlobalAllocSource::new(MiMalloc, "mimalloc")
}

/// The system allocator (glibc `malloc` on Linux).
pub fn system() -> GlobalAllocSource<System> {
    GlobalAllocSource::new(System, "system")
}

#[inline(always)]
fn block_layout(order: u32) -> Layout {
    // 4096 << order with order <= 3 is far below isize::MAX and a multiple of the alignment.
    match Layout::from_size_align(PAGE_SIZE << order, PAGE_SIZE) {
        Ok(l) => l,
        Err(_) => unreachable!("page-block layouts are valid"),
    }
}

impl<A: GlobalAlloc> PageSource for GlobalAllocSource<A> {
    #[inline(always)]
    fn alloc(&mut self, order: u32) -> usize {
        // SAFETY: the layout has a nonzero size.
        let p = unsafe { self.alloc.alloc(block_layout(order)) };
        if p.is_null() {
            out_of_memory(self.name, order);
        }
        p as usize
    }

    #[inline(always)]
    unsafe fn free(&mut self, handle: usize, order: u32) {
        // SAFETY: by the caller's contract `handle` was returned by `alloc` on this allocator
        // with the layout of `order`, and is freed once.
        unsafe { self.alloc.dealloc(handle as *mut u8, block_layout(order)) };
    }
}

#[cold]
#[inline(never)]
fn out_of_memory(name: &str, order: u32) -> ! {
    panic!("{name}: out of memory allocating an order-{order} block during a benchmark")
}
