//! The vmalloc cases: virtually contiguous areas of many pages, behind [`VmSource`].
//!
//! * [`VmallocSource`]: kmem's `vmalloc(size)` / `vfree(p)` (order-0 pages taken one by one
//!   and mapped side by side in the vmalloc range, a guard page after; `vfree` unmaps and
//!   frees the pages at once and releases the address range lazily, a purge every
//!   `lazy_max_pages`);
//! * [`MmapSource`]: the host kernel's `mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE |
//!   MAP_ANONYMOUS)` / `munmap(p, size)`, through `rustix::mm`.
//!
//! The two do not do the same work: `vmalloc` takes its pages and maps them when called,
//! while `mmap` only reserves address space and the host kernel allocates (and zeroes) a page
//! at its first touch. So each runs twice: as is, and writing one byte to every page between
//! the allocation and the free ([`vm_pair_loop`] with `TOUCH`). In this hosted build kmem's
//! "mapping" of a page is a `MAP_FIXED` `mmap` of that page of the machine's memfd, and a
//! touch of it is a host minor fault on a page the memfd already holds (no zeroing).

use std::ffi::c_void;
use std::hint::black_box;
use std::ptr;

use kmem::Kmem;
use kmem_hosted::platform::HostedPlatform;
use rustix::mm::{MapFlags, ProtFlags};

use crate::source::PAGE_SIZE;

/// An allocator of virtually contiguous, writable areas of whole pages.
pub trait VmSource {
    /// Allocates `size` bytes (a multiple of [`PAGE_SIZE`]) and returns the address. Panics
    /// when the allocator fails: a benchmark that runs dry measures nothing.
    fn alloc(&mut self, size: usize) -> *mut u8;

    /// Frees an area.
    ///
    /// # Safety
    ///
    /// `p` must come from [`VmSource::alloc`] on this source with the same `size`, must not
    /// have been freed since, and nothing may use its memory afterwards.
    unsafe fn free(&mut self, p: *mut u8, size: usize);
}

/// kmem's `vmalloc(size)` / `vfree(p)`.
#[derive(Clone, Copy)]
pub struct VmallocSource<'m> {
    kmem: &'m Kmem<HostedPlatform>,
}

impl<'m> VmallocSource<'m> {
    /// Drives the vmalloc layer of `kmem` (for a machine `m`: `m.kmem()`).
    pub fn new(kmem: &'m Kmem<HostedPlatform>) -> VmallocSource<'m> {
        VmallocSource { kmem }
    }
}

impl VmSource for VmallocSource<'_> {
    #[inline(always)]
    fn alloc(&mut self, size: usize) -> *mut u8 {
        match self.kmem.vmalloc(size) {
            Some(p) => p.as_ptr(),
            None => panic!("kmem vmalloc: failed to allocate {size} bytes during a benchmark"),
        }
    }

    #[inline(always)]
    unsafe fn free(&mut self, p: *mut u8, _size: usize) {
        // SAFETY: by the caller's contract `p` starts a live vmalloc area of this machine,
        // freed only here, and nothing uses it afterwards.
        unsafe { self.kmem.vfree(p) };
    }
}

/// The host's `mmap(MAP_PRIVATE | MAP_ANONYMOUS)` / `munmap`.
#[derive(Clone, Copy, Default)]
pub struct MmapSource;

impl VmSource for MmapSource {
    #[inline(always)]
    fn alloc(&mut self, size: usize) -> *mut u8 {
        // SAFETY: a fresh mapping at an address of the kernel's choosing replaces nothing.
        let r = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                size,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        };
        match r {
            Ok(p) => p.cast(),
            Err(e) => panic!("mmap: failed to map {size} bytes during a benchmark: {e}"),
        }
    }

    #[inline(always)]
    unsafe fn free(&mut self, p: *mut u8, size: usize) {
        // SAFETY: by the caller's contract `p..p + size` is a mapping of ours that nothing
        // uses any more.
        if let Err(e) = unsafe { rustix::mm::munmap(p.cast::<c_void>(), size) } {
            panic!("munmap({p:p}, {size}) failed: {e}");
        }
    }
}

/// Writes one byte to each page of `p..p + size`.
///
/// # Safety
///
/// `p..p + size` must be writable memory of ours.
#[inline(always)]
pub unsafe fn touch_pages(p: *mut u8, size: usize) {
    let mut off = 0;
    while off < size {
        // SAFETY: `off < size`: inside the caller's writable range.
        unsafe { p.add(off).write_volatile(1) };
        off += PAGE_SIZE;
    }
}

/// Does `n` alloc+free pairs of `size` bytes on `src`; with `TOUCH`, writes one byte to every
/// page of each area in between.
#[inline(never)]
pub fn vm_pair_loop<S: VmSource, const TOUCH: bool>(src: &mut S, size: usize, n: u64) {
    for _ in 0..n {
        let p = black_box(src.alloc(size));
        if TOUCH {
            // SAFETY: `p` is a fresh writable area of `size` bytes.
            unsafe { touch_pages(p, size) };
        }
        // SAFETY: `p` was just allocated from `src` with `size` and is freed once.
        unsafe { src.free(p, size) };
    }
}
