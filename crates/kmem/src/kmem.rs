//! [`Kmem`]: the whole subsystem of one machine, booted in the kernel's order.
//!
//! Today it holds the page allocator; the slab caches, kmalloc, vmalloc and per-CPU areas
//! join it as their floors are built. It dereferences to the page allocator, so the
//! kernel-named API reads as in a kernel: `kmem.alloc_pages(GFP_KERNEL, 0)`.

use core::ops::Deref;

use crate::config::Config;
use crate::memblock::Memblock;
use crate::page_alloc::{BootError, PageAlloc};
use crate::platform::Platform;

/// The memory-allocation subsystem of one machine.
pub struct Kmem<P: Platform> {
    pages: PageAlloc<P>,
}

impl<P: Platform> Kmem<P> {
    /// Boots the subsystem over `memblock`'s memory map: `mem_map` and the zones, then the
    /// hand-over of every unreserved page to the buddy allocator.
    ///
    /// Context: boot, single-threaded. `memblock` must describe RAM reachable through
    /// `platform`'s direct map below the layout's low-memory end.
    pub fn boot(memblock: &mut Memblock, config: Config, platform: P) -> Result<Self, BootError> {
        Ok(Kmem {
            pages: PageAlloc::boot(memblock, config, platform)?,
        })
    }

    /// The page allocator.
    pub fn pages(&self) -> &PageAlloc<P> {
        &self.pages
    }
}

impl<P: Platform> Deref for Kmem<P> {
    type Target = PageAlloc<P>;
    fn deref(&self) -> &PageAlloc<P> {
        &self.pages
    }
}
