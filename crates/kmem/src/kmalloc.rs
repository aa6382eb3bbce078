//! kmalloc: size classes over slab caches; large sizes straight from the page allocator.
//!
//! Classes 8, 16, 32, 64, 96, 128, 192, 256, 512, 1k, 2k, 4k and 8k, each in three types:
//! `kmalloc-*` (normal), `kmalloc-rcl-*` (`__GFP_RECLAIMABLE`) and `dma-kmalloc-*`
//! (`GFP_DMA`). A request up to 8 KiB is served by the smallest class that holds it
//! (`kmalloc_index`: a table for sizes up to 192, `fls` above); a larger one by a compound
//! page allocation marked as a large kmalloc, up to 4 MiB (`KMALLOC_MAX_SIZE`).
//!
//! Guarantees, as Linux's: at least 8-byte alignment, power-of-two sizes naturally aligned,
//! `size <= ksize(p) < 2 * size` for sizes of 8 and more, `kmalloc(0)` returns
//! [`ZERO_SIZE_PTR`], and `kfree` of null or `ZERO_SIZE_PTR` does nothing.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering::Relaxed};

use crate::addr::{MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, get_order};
use crate::gfp::{__GFP_COMP, __GFP_DMA, __GFP_RECLAIMABLE, __GFP_ZERO, Gfp};
use crate::page_alloc::PageAlloc;
use crate::page_alloc::page::pg;
use crate::platform::{LogLevel, Platform};
use crate::slab::{KmemCache, SlabAllocator, SlabFlags};

/// The smallest class.
pub const KMALLOC_MIN_SIZE: usize = 8;
/// log2 of the largest class.
pub const KMALLOC_SHIFT_HIGH: u32 = PAGE_SHIFT + 1;
/// The largest size served by a cache (8 KiB).
pub const KMALLOC_MAX_CACHE_SIZE: usize = 1 << KMALLOC_SHIFT_HIGH;
/// The largest size kmalloc serves (4 MiB: an order-10 block).
pub const KMALLOC_MAX_SIZE: usize = PAGE_SIZE << MAX_PAGE_ORDER;
/// What `kmalloc(0)` returns: not null, and faults if touched (Linux's `((void *)16)`).
pub const ZERO_SIZE_PTR: *mut u8 = 16 as *mut u8;

/// Class indices: 1 and 2 are the 96 and 192 byte classes, `i >= 3` is `1 << i`.
pub const NR_KMALLOC_INDEX: usize = KMALLOC_SHIFT_HIGH as usize + 1;

/// The cache types (`enum kmalloc_cache_type`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KmallocType {
    /// `kmalloc-*`.
    Normal = 0,
    /// `kmalloc-rcl-*`: `__GFP_RECLAIMABLE`.
    Reclaim = 1,
    /// `dma-kmalloc-*`: `GFP_DMA`.
    Dma = 2,
}

/// Number of cache types.
pub const NR_KMALLOC_TYPES: usize = 3;

/// `size_index`: class for sizes 1..=192 by `(size - 1) / 8`.
#[cfg(test)]
const SIZE_INDEX: [u8; 24] = [
    3, 4, 5, 5, 6, 6, 6, 6, 1, 1, 1, 1, 7, 7, 7, 7, 2, 2, 2, 2, 2, 2, 2, 2,
];

/// The class index serving `size` (1..=`KMALLOC_MAX_CACHE_SIZE`) (`kmalloc_index`).
#[inline(always)]
pub const fn kmalloc_index(size: usize) -> usize {
    // The power-of-two class from the top bit of `size - 1` (at least kmalloc-8), then the
    // two classes in between, kmalloc-96 and kmalloc-192: no table load on the fast path
    // (Linux's `size_index` table, `SIZE_INDEX` above, gives the same answers: a test checks
    // every size).
    let pow2 = (usize::BITS - (size - 1).leading_zeros()) as usize;
    let pow2 = if pow2 < 3 { 3 } else { pow2 };
    if size > 64 && size <= 96 {
        1
    } else if size > 128 && size <= 192 {
        2
    } else {
        pow2
    }
}

/// The object size of class `index` (`kmalloc_size`).
pub const fn kmalloc_size(index: usize) -> usize {
    match index {
        1 => 96,
        2 => 192,
        i => 1 << i,
    }
}

/// The cache type a mask selects (`kmalloc_type`).
#[inline(always)]
pub const fn kmalloc_type(gfp: Gfp) -> KmallocType {
    if gfp.0 & (__GFP_DMA.0 | __GFP_RECLAIMABLE.0) == 0 {
        KmallocType::Normal
    } else if gfp.0 & __GFP_DMA.0 != 0 {
        KmallocType::Dma
    } else {
        KmallocType::Reclaim
    }
}

/// How much `kmalloc(size)` really gives (`kmalloc_size_roundup`); `size` itself when it is
/// above `KMALLOC_MAX_SIZE` (the allocation would fail) and 0 for 0.
pub const fn kmalloc_size_roundup(size: usize) -> usize {
    if size == 0 {
        0
    } else if size <= KMALLOC_MAX_CACHE_SIZE {
        kmalloc_size(kmalloc_index(size))
    } else if size <= KMALLOC_MAX_SIZE {
        PAGE_SIZE << get_order(size)
    } else {
        size
    }
}

/// The cache name of class `index` of type `t` ("kmalloc-96", "dma-kmalloc-1k").
pub fn kmalloc_cache_name(t: KmallocType, index: usize, buf: &mut [u8; 24]) -> &str {
    let size = kmalloc_size(index);
    let prefix = match t {
        KmallocType::Normal => "kmalloc-",
        KmallocType::Reclaim => "kmalloc-rcl-",
        KmallocType::Dma => "dma-kmalloc-",
    };
    let mut w = crate::fmt_util::BufWriter::new(buf);
    let _ = if size >= 1024 {
        core::fmt::write(&mut w, format_args!("{prefix}{}k", size / 1024))
    } else {
        core::fmt::write(&mut w, format_args!("{prefix}{size}"))
    };
    let len = w.as_str().len();
    core::str::from_utf8(&buf[..len]).unwrap_or("kmalloc-?")
}

/// The kmalloc caches of one machine.
pub struct Kmalloc {
    caches: [[AtomicPtr<KmemCache>; NR_KMALLOC_INDEX]; NR_KMALLOC_TYPES],
}

impl Default for Kmalloc {
    fn default() -> Self {
        Self::new()
    }
}

impl Kmalloc {
    /// No caches yet: [`Kmalloc::create_caches`] makes them at boot.
    pub const fn new() -> Kmalloc {
        Kmalloc {
            caches: [const { [const { AtomicPtr::new(core::ptr::null_mut()) }; NR_KMALLOC_INDEX] };
                NR_KMALLOC_TYPES],
        }
    }

    /// `create_kmalloc_caches`: every class of every type. Returns `false` if memory ran out.
    pub fn create_caches<P: Platform>(&self, slab: &SlabAllocator, pa: &PageAlloc<P>) -> bool {
        for t in [KmallocType::Normal, KmallocType::Reclaim, KmallocType::Dma] {
            for index in 1..NR_KMALLOC_INDEX {
                let size = kmalloc_size(index);
                let mut flags = SlabFlags::KMALLOC;
                match t {
                    KmallocType::Normal => {}
                    KmallocType::Reclaim => flags = flags | SlabFlags::RECLAIM_ACCOUNT,
                    KmallocType::Dma => flags = flags | SlabFlags::CACHE_DMA,
                }
                let align = if size.is_power_of_two() { size } else { 8 };
                let mut buf = [0u8; 24];
                let name = kmalloc_cache_name(t, index, &mut buf);
                let Some(c) = slab.kmem_cache_create(pa, name, size, align, flags, None) else {
                    return false;
                };
                self.caches[t as usize][index].store(c as *const _ as *mut _, Relaxed);
            }
        }
        true
    }

    /// The cache of class `index` and type `t`, once created.
    pub fn cache(&self, t: KmallocType, index: usize) -> Option<&KmemCache> {
        let p = self.caches[t as usize][index].load(Relaxed);
        // SAFETY: kmalloc caches are created at boot and never destroyed.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Allocates `size` bytes (`kmalloc`).
    ///
    /// Context: may sleep with a sleeping `gfp`. Returns [`ZERO_SIZE_PTR`] for 0 bytes and
    /// `None` above `KMALLOC_MAX_SIZE` (reported unless `__GFP_NOWARN`) or without memory.
    #[inline(always)]
    pub fn kmalloc<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        size: usize,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        // `failslab`'s gate is `KMALLOC_MAX_CACHE_SIZE` while it is disarmed and 0 while it
        // is armed: one compare tells both that a cache serves `size` and that the failslab
        // hook has nothing to do.
        if size.wrapping_sub(1) < pa.faults().failslab.attr.gate() {
            // SAFETY: the gate is 0 or `KMALLOC_MAX_CACHE_SIZE` (`FailSlab::new` is the only
            // way to make the `FailSlab` of a `PageAlloc`, and a gate's open value never
            // changes), so `1 <= size <= KMALLOC_MAX_CACHE_SIZE`: `size` has a class.
            let cache = unsafe {
                core::hint::assert_unchecked(size.wrapping_sub(1) < KMALLOC_MAX_CACHE_SIZE);
                self.cache_for(size, gfp)
            };
            return slab.kmem_cache_alloc_nohook(pa, cache, gfp);
        }
        self.kmalloc_slow(slab, pa, size, gfp)
    }

    /// The cache serving `size` with `gfp`'s type.
    ///
    /// # Safety
    ///
    /// `1 <= size <= KMALLOC_MAX_CACHE_SIZE`.
    #[inline(always)]
    unsafe fn cache_for(&self, size: usize, gfp: Gfp) -> &KmemCache {
        debug_assert!(size.wrapping_sub(1) < KMALLOC_MAX_CACHE_SIZE);
        let p = self.caches[kmalloc_type(gfp) as usize][kmalloc_index(size)].load(Relaxed);
        // SAFETY: every class of every type is created at boot, before any kmalloc.
        unsafe { &*p }
    }

    #[cold]
    #[inline(never)]
    fn kmalloc_slow<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        size: usize,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        if size == 0 {
            return NonNull::new(ZERO_SIZE_PTR);
        }
        if size <= KMALLOC_MAX_CACHE_SIZE {
            // Failslab is armed (or was, a moment ago): the cache path with its hook.
            // SAFETY: `1 <= size <= KMALLOC_MAX_CACHE_SIZE`.
            let cache = unsafe { self.cache_for(size, gfp) };
            return slab.kmem_cache_alloc(pa, cache, gfp);
        }
        if size > KMALLOC_MAX_SIZE {
            if !gfp.contains(crate::gfp::__GFP_NOWARN) {
                pa.platform().log(
                    LogLevel::Warning,
                    format_args!(
                        "WARNING: kmalloc: size {size} above KMALLOC_MAX_SIZE ({KMALLOC_MAX_SIZE}), mode:{:#x}({gfp})",
                        gfp.bits()
                    ),
                );
            }
            return None;
        }
        // `__kmalloc_large_node`: a compound page marked as a large kmalloc.
        let order = get_order(size);
        let page = pa.alloc_pages(gfp.without(crate::gfp::__GFP_HIGHMEM) | __GFP_COMP, order)?;
        page.set_state(page.state() | pg::LARGE_KMALLOC);
        NonNull::new(pa.page_address(page)?.as_ptr())
    }

    /// Frees memory from [`Kmalloc::kmalloc`] (`kfree`). Null and [`ZERO_SIZE_PTR`] are no-ops.
    ///
    /// Context: any; never sleeps. A pointer kmalloc did not return is reported and ignored.
    ///
    /// # Safety
    ///
    /// If `p` is a live kmalloc allocation, nothing may use it after this call.
    #[inline(always)]
    pub unsafe fn kfree<P: Platform>(&self, slab: &SlabAllocator, pa: &PageAlloc<P>, p: *mut u8) {
        // Null and `ZERO_SIZE_PTR` need no test here: no slab page is ever mapped at
        // addresses `0..=ZERO_SIZE_PTR` (`PageAlloc::boot` reserves that frame when the
        // direct map would put one there), so the slab lookup refuses them and
        // `kfree_large` drops them.
        // SAFETY: the caller's contract.
        if !unsafe { slab.kfree_slab_object(pa, p) } {
            self.kfree_large(pa, p);
        }
    }

    #[cold]
    #[inline(never)]
    fn kfree_large<P: Platform>(&self, pa: &PageAlloc<P>, p: *mut u8) {
        if (p as usize) <= ZERO_SIZE_PTR as usize {
            return;
        }
        let page = pa.virt_to_page(crate::addr::VirtAddr(p as usize));
        match page {
            Some(page)
                if page.state() & pg::LARGE_KMALLOC != 0
                    && pa.page_address(page).is_some_and(|a| a.as_ptr() == p) =>
            {
                page.set_state(page.state() & !pg::LARGE_KMALLOC);
                // SAFETY: `page` heads a large kmalloc allocation of its recorded order.
                unsafe { pa.__free_pages(page, page.order()) };
            }
            _ => {
                let plat = pa.platform();
                let t = plat.current_task();
                plat.log(
                    LogLevel::Err,
                    format_args!(
                        "BUG: kfree: invalid pointer {p:p} (not from kmalloc) in {}",
                        t.comm()
                    ),
                );
                pa.count_bad_free();
            }
        }
    }

    /// How many bytes the allocation at `p` really has (`ksize`); 0 for null,
    /// `ZERO_SIZE_PTR` and pointers kmalloc did not return.
    pub fn ksize<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        p: *const u8,
    ) -> usize {
        if (p as usize) <= ZERO_SIZE_PTR as usize {
            return 0;
        }
        if let Some(r) = slab.lookup(pa, p as usize) {
            return r.cache.object_size();
        }
        match pa.virt_to_page(crate::addr::VirtAddr(p as usize)) {
            Some(page) if page.state() & pg::LARGE_KMALLOC != 0 => PAGE_SIZE << page.order(),
            _ => 0,
        }
    }

    /// `krealloc`: resizes in place while the allocation still fits, else moves; size 0 frees
    /// and returns [`ZERO_SIZE_PTR`]; null behaves as `kmalloc`. On failure the old
    /// allocation is untouched.
    ///
    /// # Safety
    ///
    /// `p` is null, `ZERO_SIZE_PTR` or a live kmalloc allocation; after a move it is freed.
    pub unsafe fn krealloc<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        p: *mut u8,
        new_size: usize,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        if new_size == 0 {
            // SAFETY: the caller's contract.
            unsafe { self.kfree(slab, pa, p) };
            return NonNull::new(ZERO_SIZE_PTR);
        }
        let ks = self.ksize(slab, pa, p);
        if ks >= new_size {
            // SAFETY: `p` is a live allocation of `ks` bytes.
            return NonNull::new(p);
        }
        let q = self.kmalloc(slab, pa, new_size, gfp)?;
        if ks > 0 {
            // SAFETY: both are live allocations, distinct, of at least `ks` bytes.
            unsafe {
                core::ptr::copy_nonoverlapping(p, q.as_ptr(), ks);
                self.kfree(slab, pa, p);
            }
        }
        Some(q)
    }

    /// `kmalloc_array`: `n * size` bytes, `None` on overflow.
    pub fn kmalloc_array<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        n: usize,
        size: usize,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        self.kmalloc(slab, pa, n.checked_mul(size)?, gfp)
    }

    /// `kcalloc`: zeroed `kmalloc_array`.
    pub fn kcalloc<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        n: usize,
        size: usize,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        self.kmalloc_array(slab, pa, n, size, gfp | __GFP_ZERO)
    }

    /// `kfree_sensitive`: zeroes the whole allocation (`ksize` bytes), then frees it.
    ///
    /// # Safety
    ///
    /// As [`Kmalloc::kfree`].
    pub unsafe fn kfree_sensitive<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        p: *mut u8,
    ) {
        let n = self.ksize(slab, pa, p);
        if n > 0 {
            // SAFETY: `p` is a live allocation of `n` bytes (caller's contract).
            unsafe { core::ptr::write_bytes(p, 0, n) };
        }
        // SAFETY: the caller's contract.
        unsafe { self.kfree(slab, pa, p) };
    }

    /// `kmemdup`: a kmalloc copy of `src`.
    pub fn kmemdup<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        src: &[u8],
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        let p = self.kmalloc(slab, pa, src.len().max(1), gfp)?;
        // SAFETY: `p` is a fresh allocation of at least `src.len()` bytes.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), p.as_ptr(), src.len()) };
        Some(p)
    }

    /// `kstrdup`: a NUL-terminated kmalloc copy of `s`.
    pub fn kstrdup<P: Platform>(
        &self,
        slab: &SlabAllocator,
        pa: &PageAlloc<P>,
        s: &str,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        let p = self.kmalloc(slab, pa, s.len() + 1, gfp)?;
        // SAFETY: `p` is a fresh allocation of `s.len() + 1` bytes.
        unsafe {
            core::ptr::copy_nonoverlapping(s.as_ptr(), p.as_ptr(), s.len());
            p.as_ptr().add(s.len()).write(0);
        }
        Some(p)
    }
}

const _: () = assert!(KMALLOC_MAX_CACHE_SIZE == 8192);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gfp::GFP_KERNEL;

    #[test]
    fn index_table_is_linuxs() {
        for size in 1..=192 {
            assert_eq!(
                kmalloc_index(size),
                SIZE_INDEX[(size - 1) / 8] as usize,
                "{size}"
            );
        }
        for size in 193..=KMALLOC_MAX_CACHE_SIZE {
            assert_eq!(
                kmalloc_size(kmalloc_index(size)),
                size.next_power_of_two(),
                "{size}"
            );
        }
        assert_eq!(kmalloc_index(1), 3);
        assert_eq!(kmalloc_index(8), 3);
        assert_eq!(kmalloc_index(9), 4);
        assert_eq!(kmalloc_index(24), 5);
        assert_eq!(kmalloc_index(64), 6);
        assert_eq!(kmalloc_index(65), 1);
        assert_eq!(kmalloc_index(96), 1);
        assert_eq!(kmalloc_index(97), 7);
        assert_eq!(kmalloc_index(128), 7);
        assert_eq!(kmalloc_index(129), 2);
        assert_eq!(kmalloc_index(192), 2);
        assert_eq!(kmalloc_index(193), 8);
        assert_eq!(kmalloc_index(256), 8);
        assert_eq!(kmalloc_index(257), 9);
        assert_eq!(kmalloc_index(4097), 13);
        assert_eq!(kmalloc_index(8192), 13);
    }

    #[test]
    fn classes_bound_waste() {
        for size in 8..=KMALLOC_MAX_CACHE_SIZE {
            let got = kmalloc_size(kmalloc_index(size));
            assert!(got >= size && got < 2 * size, "{size} -> {got}");
        }
        assert_eq!(kmalloc_size_roundup(0), 0);
        assert_eq!(kmalloc_size_roundup(100), 128);
        assert_eq!(kmalloc_size_roundup(8193), 16384);
        assert_eq!(
            kmalloc_size_roundup(KMALLOC_MAX_SIZE + 1),
            KMALLOC_MAX_SIZE + 1
        );
    }

    #[test]
    fn names() {
        let mut b = [0u8; 24];
        assert_eq!(
            kmalloc_cache_name(KmallocType::Normal, 1, &mut b),
            "kmalloc-96"
        );
        let mut b = [0u8; 24];
        assert_eq!(
            kmalloc_cache_name(KmallocType::Dma, 10, &mut b),
            "dma-kmalloc-1k"
        );
        let mut b = [0u8; 24];
        assert_eq!(
            kmalloc_cache_name(KmallocType::Reclaim, 13, &mut b),
            "kmalloc-rcl-8k"
        );
    }

    #[test]
    fn types() {
        assert_eq!(kmalloc_type(GFP_KERNEL), KmallocType::Normal);
        assert_eq!(kmalloc_type(GFP_KERNEL | __GFP_DMA), KmallocType::Dma);
        assert_eq!(
            kmalloc_type(GFP_KERNEL | __GFP_RECLAIMABLE),
            KmallocType::Reclaim
        );
        assert_eq!(
            kmalloc_type(GFP_KERNEL | __GFP_RECLAIMABLE | __GFP_DMA),
            KmallocType::Dma
        );
    }
}
