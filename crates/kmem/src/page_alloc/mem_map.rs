//! `mem_map`: the flat array of page descriptors, from the lowest to the highest frame of RAM.
//!
//! Index `i` describes frame `base_pfn + i`. The array lives in memory carved out of memblock
//! at boot and is never freed; its descriptors for holes stay reserved forever.

use core::ptr::NonNull;

use super::page::Page;
use crate::addr::Pfn;

/// The page descriptor array.
pub struct MemMap {
    pages: NonNull<Page>, // first descriptor, in the direct map
    base_pfn: u64,        // frame described by index 0
    len: usize,           // descriptors in the array
}

// SAFETY: the descriptors are made of atomics only (see `page.rs`), so shared access from any
// thread is sound; the array lives as long as the allocator that owns this `MemMap`.
unsafe impl Send for MemMap {}
// SAFETY: as for `Send`: all access to descriptors goes through atomics.
unsafe impl Sync for MemMap {}

impl MemMap {
    /// Wraps an initialised array.
    ///
    /// # Safety
    ///
    /// `pages` must point to `len` initialised descriptors that stay valid, and are not
    /// otherwise written non-atomically, for as long as the returned value is used.
    pub(crate) unsafe fn new(pages: NonNull<Page>, base_pfn: u64, len: usize) -> MemMap {
        MemMap {
            pages,
            base_pfn,
            len,
        }
    }

    /// Number of descriptors.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the array is empty (a machine with no RAM).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first frame described.
    #[inline]
    pub fn base_pfn(&self) -> u64 {
        self.base_pfn
    }

    /// One past the last frame described.
    #[inline]
    pub fn end_pfn(&self) -> u64 {
        self.base_pfn + self.len as u64
    }

    /// The descriptor at index `i`.
    #[inline]
    pub(crate) fn at(&self, i: u32) -> &Page {
        debug_assert!((i as usize) < self.len);
        // SAFETY: callers pass indices taken from descriptors or from `index_of`/`pfn_index`,
        // all `< len`; the array is valid for our lifetime (constructor contract).
        unsafe { &*self.pages.as_ptr().add(i as usize) }
    }

    /// The index of frame `pfn`, if it is described.
    #[inline]
    pub(crate) fn pfn_index(&self, pfn: u64) -> Option<u32> {
        let i = pfn.wrapping_sub(self.base_pfn);
        (i < self.len as u64).then_some(i as u32)
    }

    /// The descriptor of frame `pfn` (`pfn_to_page`), if `pfn` is in the array.
    #[inline]
    pub fn pfn_to_page(&self, pfn: Pfn) -> Option<&Page> {
        self.pfn_index(pfn.0).map(|i| self.at(i))
    }

    /// The index of `page`, which must be a descriptor of this array.
    #[inline]
    pub(crate) fn index_of(&self, page: &Page) -> u32 {
        let off = (page as *const Page as usize).wrapping_sub(self.pages.as_ptr() as usize);
        let i = off / core::mem::size_of::<Page>();
        debug_assert!(i < self.len && off % core::mem::size_of::<Page>() == 0);
        i as u32
    }

    /// The index of `page` if it is a descriptor of this array.
    #[inline]
    pub(crate) fn checked_index(&self, page: &Page) -> Option<u32> {
        let off = (page as *const Page as usize).wrapping_sub(self.pages.as_ptr() as usize);
        let i = off / core::mem::size_of::<Page>();
        (off % core::mem::size_of::<Page>() == 0 && i < self.len).then_some(i as u32)
    }

    /// True when `page` is a descriptor of this array.
    pub fn contains(&self, page: &Page) -> bool {
        self.checked_index(page).is_some()
    }

    /// The frame of `page` (`page_to_pfn`).
    #[inline]
    pub fn page_to_pfn(&self, page: &Page) -> Pfn {
        Pfn(self.base_pfn + self.index_of(page) as u64)
    }
}
