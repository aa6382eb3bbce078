//! The slab shrinker: under memory pressure, free slabs go back to the page allocator.
//!
//! Registered with the page allocator by [`crate::Kmem::late_init`], once the subsystem
//! sits at its final address (the shrinker points into it).

use core::sync::atomic::{AtomicPtr, Ordering::Acquire, Ordering::Release};

use super::SlabAllocator;
use crate::page_alloc::{PageAlloc, Shrinker};
use crate::platform::Platform;

/// Shrinks every cache when direct reclaim asks.
pub struct SlabShrinker<P: Platform> {
    pa: AtomicPtr<PageAlloc<P>>,
    slab: AtomicPtr<SlabAllocator>,
}

impl<P: Platform> Default for SlabShrinker<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Platform> SlabShrinker<P> {
    /// A shrinker not yet bound to an allocator (it reclaims nothing).
    pub const fn new() -> Self {
        SlabShrinker {
            pa: AtomicPtr::new(core::ptr::null_mut()),
            slab: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    /// Binds the shrinker.
    ///
    /// # Safety
    ///
    /// `pa` and `slab` must stay at their addresses, alive, for as long as the shrinker is
    /// registered.
    pub unsafe fn bind(&self, pa: &PageAlloc<P>, slab: &SlabAllocator) {
        self.pa.store(pa as *const _ as *mut _, Release);
        self.slab.store(slab as *const _ as *mut _, Release);
    }

    fn parts(&self) -> Option<(&PageAlloc<P>, &SlabAllocator)> {
        let pa = self.pa.load(Acquire);
        let slab = self.slab.load(Acquire);
        if pa.is_null() || slab.is_null() {
            return None;
        }
        // SAFETY: `bind`'s contract keeps both alive and in place while registered.
        Some(unsafe { (&*pa, &*slab) })
    }
}

impl<P: Platform> Shrinker for SlabShrinker<P> {
    fn name(&self) -> &str {
        "slab"
    }

    fn count_objects(&self) -> usize {
        let Some((pa, slab)) = self.parts() else {
            return 0;
        };
        let mut n = 0;
        slab.for_each_cache(|c| {
            n += c.free_objects() + c.sheaf_objects(pa.nr_cpus()) + c.barn_objects()
        });
        n
    }

    fn scan_objects(&self, _nr_to_scan: usize) -> usize {
        let Some((pa, slab)) = self.parts() else {
            return 0;
        };
        // Shrinking under the cache list lock keeps every cache alive meanwhile:
        // `kmem_cache_destroy` unlinks a cache under that lock before freeing it.
        let mut freed = 0;
        slab.for_each_cache(|c| freed += slab.kmem_cache_shrink(pa, c));
        freed
    }
}
