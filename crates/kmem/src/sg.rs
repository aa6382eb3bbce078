//! Scatter/gather tables (Linux's `struct sg_table` / `struct scatterlist`) and the
//! large-buffer allocator drivers build on them.
//!
//! A scatter/gather table describes a buffer made of physically contiguous pieces: each
//! entry ([`Scatterlist`]) is a frame number, an offset into it and a length. A device that
//! does scatter/gather DMA walks the entries; the CPU reaches them page by page, through the
//! direct map or, for HighMem pages, through `kmap` ([`sg_copy_from_buffer`],
//! [`sg_copy_to_buffer`]).
//!
//! # The entry array, without a heap
//!
//! The array itself is kmem memory, laid out as Linux's `__sg_alloc_table` lays it out:
//!
//! * entries are 16 bytes, so a page holds [`SG_MAX_SINGLE_ALLOC`] (256) of them;
//! * a table of up to 256 entries is one *chunk*: a page when it has exactly 256 entries,
//!   otherwise a `kmalloc_array` (Linux's `sg_kmalloc`);
//! * a longer table is a chain of chunks: every chunk but the last is a full page whose last
//!   slot is a *chain link* to the next chunk (so it carries 255 entries); the last chunk
//!   holds the rest (at most 256), a page if it is full and `kmalloc`ed otherwise. The last
//!   entry carries the end mark.
//!
//! An entry's `page_link` word holds the frame number shifted left by two with the end mark
//! in bit 1 ([`SG_END`]), or, for a chain link, the next chunk's address with bit 0 set
//! ([`SG_CHAIN`]), as Linux packs `page_link`. Chain links are never shown to users:
//! iteration ([`SgTable::iter`], Linux's `for_each_sg`) steps over them.
//!
//! # Large buffers
//!
//! [`sg_alloc_buffer`] covers `size` bytes with the largest blocks the buddy allocator still
//! has: it starts at `min(MAX_PAGE_ORDER, get_order(size))`, asks for orders above 0 with
//! `__GFP_NORETRY | __GFP_NOWARN` (a failure there is cheap and expected), and steps down
//! one order whenever a request fails, never going back up. Each block becomes one entry, so
//! a fragmented machine gives more, smaller entries, and a buffer far larger than any block
//! (64 MiB, where blocks stop at 4 MiB) is still obtained. The blocks are powers of two that
//! add up exactly to the page-rounded size, nothing is wasted. It is all or nothing: when
//! even order 0 fails, everything taken so far is given back. [`sg_free_buffer`] frees the
//! blocks and the table.
//!
//! # Calling context
//!
//! Allocation functions may sleep when `gfp` allows it. Copies `kmap` HighMem pages and never
//! sleep otherwise. A table is owned by one user at a time (`&mut` to change its entries);
//! it is `Send` and `Sync` like any owned plain data.

use core::ptr::NonNull;

use crate::Kmem;
use crate::addr::{MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, Pfn, PhysAddr, VirtAddr, get_order};
use crate::gfp::{
    __GFP_COMP, __GFP_NOFAIL, __GFP_NORETRY, __GFP_NOWARN, __GFP_RETRY_MAYFAIL, __GFP_ZERO,
    GFP_ZONEMASK, Gfp,
};
use crate::page_alloc::PageAlloc;
use crate::page_alloc::page::Page;
use crate::platform::{LogLevel, Platform};

/// `page_link` bit 0: the entry is a link to the next chunk, not a piece of the buffer.
pub const SG_CHAIN: u64 = 0x01;
/// `page_link` bit 1: the entry is the table's last.
pub const SG_END: u64 = 0x02;
const SG_LINK_MASK: u64 = SG_CHAIN | SG_END;

/// Entries that fit in one page (`SG_MAX_SINGLE_ALLOC`): a chunk is never larger.
pub const SG_MAX_SINGLE_ALLOC: usize = PAGE_SIZE / core::mem::size_of::<Scatterlist>();

/// The longest entry [`sg_alloc_table_from_pages`] makes by default: `u32::MAX` rounded down
/// to a page, as Linux's `UINT_MAX` segment limit.
pub const SG_MAX_SEGMENT: usize = (u32::MAX as usize) & !(PAGE_SIZE - 1);

/// One entry of a scatter/gather table (`struct scatterlist`): `length` bytes starting
/// `offset` bytes into frame `pfn` (the bytes may run on into the following frames).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scatterlist {
    page_link: u64, // pfn << 2 | SG_END, or next chunk's address | SG_CHAIN
    offset: u32,
    length: u32,
}

const _: () = assert!(core::mem::size_of::<Scatterlist>() == 16);

impl Scatterlist {
    /// The first frame of the entry (`page_to_pfn(sg_page(sg))`).
    #[inline]
    pub fn pfn(&self) -> Pfn {
        Pfn(self.page_link >> 2)
    }

    /// Byte offset into the first frame.
    #[inline]
    pub fn offset(&self) -> usize {
        self.offset as usize
    }

    /// Length in bytes.
    #[inline]
    pub fn length(&self) -> usize {
        self.length as usize
    }

    /// The physical address of the entry's first byte (`sg_phys`).
    #[inline]
    pub fn phys(&self) -> PhysAddr {
        PhysAddr(self.pfn().phys().0 + self.offset as u64)
    }

    /// True for the table's last entry (`sg_is_last`).
    #[inline]
    pub fn is_last(&self) -> bool {
        self.page_link & SG_END != 0
    }

    #[inline]
    fn is_chain(&self) -> bool {
        self.page_link & SG_CHAIN != 0
    }

    /// The next chunk of a chain link (`sg_chain_ptr`).
    #[inline]
    fn chain_ptr(&self) -> *mut Scatterlist {
        debug_assert!(self.is_chain());
        (self.page_link & !SG_LINK_MASK) as usize as *mut Scatterlist
    }

    /// Points the entry at `length` bytes from `offset` into frame `pfn`, keeping the end
    /// mark (`sg_set_page` with a frame number).
    ///
    /// Offsets and lengths are 32-bit as in Linux; larger values are clamped to `u32::MAX`.
    #[inline]
    pub fn set_pfn(&mut self, pfn: Pfn, length: usize, offset: usize) {
        self.page_link = (pfn.0 << 2) | (self.page_link & SG_END);
        self.offset = u32::try_from(offset).unwrap_or(u32::MAX);
        self.length = u32::try_from(length).unwrap_or(u32::MAX);
    }

    fn mark_end(&mut self) {
        self.page_link |= SG_END;
    }
}

impl core::fmt::Debug for Scatterlist {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "sg(pfn {:#x} offset {:#x} length {:#x}{})",
            self.pfn().0,
            self.offset,
            self.length,
            if self.is_last() { " end" } else { "" }
        )
    }
}

/// `sg_set_page`: points `sg` at `len` bytes from `offset` into `page` (and the pages after
/// it), keeping the end mark.
pub fn sg_set_page<P: Platform>(
    pa: &PageAlloc<P>,
    sg: &mut Scatterlist,
    page: &Page,
    len: usize,
    offset: usize,
) {
    sg.set_pfn(pa.page_to_pfn(page), len, offset);
}

/// `sg_page`: the descriptor of the entry's first frame; `None` if the frame is outside RAM.
pub fn sg_page<'a, P: Platform>(pa: &'a PageAlloc<P>, sg: &Scatterlist) -> Option<&'a Page> {
    pa.pfn_to_page(sg.pfn())
}

/// `sg_virt`: the direct-map address of the entry's first byte; `None` for HighMem (reach
/// those pages through `kmap`, as the copy functions do).
pub fn sg_virt<P: Platform>(pa: &PageAlloc<P>, sg: &Scatterlist) -> Option<VirtAddr> {
    let va = pa.page_address(sg_page(pa, sg)?)?;
    Some(VirtAddr(va.0 + sg.offset()))
}

/// A scatter/gather table (`struct sg_table`): a chain of entry chunks in kmem memory.
///
/// It owns its entry array (free it with [`sg_free_table`], or [`sg_free_buffer`] for
/// tables from [`sg_alloc_buffer`], which also own their pages); dropping it without doing
/// so leaks the array, as forgetting `sg_free_table` does in a kernel. It does not own the
/// pages its entries describe, except for a buffer's.
#[must_use = "an SgTable must be freed with sg_free_table or sg_free_buffer"]
pub struct SgTable {
    sgl: NonNull<Scatterlist>, // first chunk
    nents: usize,              // entries, chain links excluded (`orig_nents`)
    tail_alloc: usize,         // entries allocated in the last chunk
}

// SAFETY: the table exclusively owns its chunks (plain data, no interior mutability); it can
// move between threads and be read from several as a `Box<[Scatterlist]>` could.
unsafe impl Send for SgTable {}
// SAFETY: as for `Send`: `&SgTable` gives read-only access to the entries.
unsafe impl Sync for SgTable {}

impl SgTable {
    /// Number of entries (`orig_nents`; kmem has no DMA mapping, so also `nents`).
    pub fn nents(&self) -> usize {
        self.nents
    }

    /// The entries in order, following chain links (`for_each_sg`).
    pub fn iter(&self) -> SgIter<'_> {
        SgIter {
            cur: self.sgl.as_ptr(),
            left: self.nents,
            _table: core::marker::PhantomData,
        }
    }

    /// The entries in order, for changing them (`for_each_sg` with `sg_set_page`).
    pub fn iter_mut(&mut self) -> SgIterMut<'_> {
        SgIterMut {
            cur: self.sgl.as_ptr(),
            left: self.nents,
            _table: core::marker::PhantomData,
        }
    }

    /// The first entry (`table->sgl`).
    pub fn first(&self) -> &Scatterlist {
        // SAFETY: a table has at least one entry, in its first chunk, owned by `self`.
        unsafe { self.sgl.as_ref() }
    }

    /// Sum of the entries' lengths: the bytes the table describes.
    pub fn total_length(&self) -> usize {
        self.iter().map(Scatterlist::length).sum()
    }

    /// Number of chunks the entry array takes (1 for up to [`SG_MAX_SINGLE_ALLOC`] entries).
    pub fn nr_chunks(&self) -> usize {
        nr_chunks(self.nents)
    }
}

impl<'a> IntoIterator for &'a SgTable {
    type Item = &'a Scatterlist;
    type IntoIter = SgIter<'a>;
    fn into_iter(self) -> SgIter<'a> {
        self.iter()
    }
}

impl core::fmt::Debug for SgTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SgTable")
            .field("nents", &self.nents)
            .field("total_length", &self.total_length())
            .finish()
    }
}

/// Steps from entry `cur` to the next (`sg_next` without the end check): the next slot, or
/// the chunk a chain link in that slot points to.
///
/// # Safety
///
/// `cur` is an entry of a table that has an entry after it.
#[inline]
unsafe fn sg_step(cur: *mut Scatterlist) -> *mut Scatterlist {
    // SAFETY: a non-last entry is followed, in the same chunk, by an entry or a chain link.
    let next = unsafe { cur.add(1) };
    // SAFETY: `next` is a slot of the chunk (see above), initialised at allocation.
    let e = unsafe { *next };
    if e.is_chain() { e.chain_ptr() } else { next }
}

/// Iterator over a table's entries ([`SgTable::iter`]).
pub struct SgIter<'a> {
    cur: *mut Scatterlist,
    left: usize,
    _table: core::marker::PhantomData<&'a SgTable>,
}

impl<'a> Iterator for SgIter<'a> {
    type Item = &'a Scatterlist;
    fn next(&mut self) -> Option<&'a Scatterlist> {
        if self.left == 0 {
            return None;
        }
        // SAFETY: `left > 0`: `cur` is an entry of the borrowed table, which outlives 'a and
        // is not changed while shared.
        let e = unsafe { &*self.cur };
        self.left -= 1;
        if self.left > 0 && !e.is_last() {
            // SAFETY: there is an entry after `cur`.
            self.cur = unsafe { sg_step(self.cur) };
        } else {
            self.left = 0;
        }
        Some(e)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// Iterator over a table's entries for changing them ([`SgTable::iter_mut`]).
pub struct SgIterMut<'a> {
    cur: *mut Scatterlist,
    left: usize,
    _table: core::marker::PhantomData<&'a mut SgTable>,
}

impl<'a> Iterator for SgIterMut<'a> {
    type Item = &'a mut Scatterlist;
    fn next(&mut self) -> Option<&'a mut Scatterlist> {
        if self.left == 0 {
            return None;
        }
        let cur = self.cur;
        self.left -= 1;
        // SAFETY: `cur` is an entry of the table, which is borrowed mutably for 'a.
        let last = unsafe { (*cur).is_last() };
        if self.left > 0 && !last {
            // SAFETY: there is an entry after `cur`; the step reads the slot after it (an
            // entry not yet handed out, or a chain link), never one already yielded.
            self.cur = unsafe { sg_step(cur) };
        } else {
            self.left = 0;
        }
        // SAFETY: each entry is yielded once, so the `&mut` references never alias; the
        // table is borrowed mutably for 'a. Setters cannot touch the chain or end bits.
        Some(unsafe { &mut *cur })
    }
}

/// `sg_nents`: the entries counted by walking to the end mark.
pub fn sg_nents(table: &SgTable) -> usize {
    table.iter().count()
}

/// `sg_nents_for_len`: how many entries the first `len` bytes take; `None` if the table is
/// shorter than `len`.
pub fn sg_nents_for_len(table: &SgTable, len: usize) -> Option<usize> {
    if len == 0 {
        return Some(0);
    }
    let mut total = 0;
    for (i, sg) in table.iter().enumerate() {
        total += sg.length();
        if total >= len {
            return Some(i + 1);
        }
    }
    None
}

// ------------------------------------------------------------------------------ the array

fn nr_chunks(nents: usize) -> usize {
    if nents <= SG_MAX_SINGLE_ALLOC {
        1
    } else {
        (nents - 1).div_ceil(SG_MAX_SINGLE_ALLOC - 1)
    }
}

/// The mask for the entry array: the caller's, minus zone modifiers (the array must be in
/// the direct map, and need not be DMA-able), `__GFP_COMP` and `__GFP_ZERO` (it is set up
/// here).
fn array_gfp(gfp: Gfp) -> Gfp {
    gfp.without(GFP_ZONEMASK)
        .without(__GFP_COMP)
        .without(__GFP_ZERO)
}

/// `sg_kmalloc`: a chunk of `nents` zeroed entries; a page for a full chunk, else kmalloc.
fn sg_kmalloc<P: Platform>(kmem: &Kmem<P>, nents: usize, gfp: Gfp) -> Option<NonNull<Scatterlist>> {
    debug_assert!((1..=SG_MAX_SINGLE_ALLOC).contains(&nents));
    let p = if nents == SG_MAX_SINGLE_ALLOC {
        NonNull::new(kmem.__get_free_page(gfp)?.as_ptr())?
    } else {
        kmem.kmalloc_array(nents, core::mem::size_of::<Scatterlist>(), gfp)?
    };
    let p = p.cast::<Scatterlist>();
    // SAFETY: `p` is a fresh allocation of at least `nents` entries, aligned to 8 (kmalloc's
    // minimum) or a page, which `Scatterlist` (alignment 8) accepts.
    unsafe { core::ptr::write_bytes(p.as_ptr(), 0, nents) };
    Some(p)
}

/// `sg_kfree`: frees a chunk from [`sg_kmalloc`] of `nents` entries.
///
/// # Safety
///
/// `p` is such a chunk, not used after this call.
unsafe fn sg_kfree<P: Platform>(kmem: &Kmem<P>, p: *mut Scatterlist, nents: usize) {
    if nents == SG_MAX_SINGLE_ALLOC {
        // SAFETY: a full chunk is a page from `__get_free_page`; the caller's contract.
        unsafe { kmem.free_page(VirtAddr(p as usize)) };
    } else {
        // SAFETY: a partial chunk is a kmalloc allocation; the caller's contract.
        unsafe { kmem.kfree(p.cast()) };
    }
}

/// Frees the chunks of a table with `nents` entries starting at `sgl` whose last chunk has
/// `tail_alloc` slots (`__sg_free_table`).
///
/// # Safety
///
/// The chunks form such a table and are not used after this call.
unsafe fn free_chunks<P: Platform>(
    kmem: &Kmem<P>,
    sgl: *mut Scatterlist,
    nents: usize,
    tail_alloc: usize,
) {
    let mut chunk = sgl;
    let mut left = nents;
    while left > SG_MAX_SINGLE_ALLOC {
        // SAFETY: a chunk with more entries after it is a full page whose last slot is the
        // chain link.
        let link = unsafe { *chunk.add(SG_MAX_SINGLE_ALLOC - 1) };
        debug_assert!(link.is_chain());
        // SAFETY: the chunk is a page of this table; the caller's contract.
        unsafe { sg_kfree(kmem, chunk, SG_MAX_SINGLE_ALLOC) };
        chunk = link.chain_ptr();
        left -= SG_MAX_SINGLE_ALLOC - 1;
    }
    // SAFETY: the last chunk has `tail_alloc` slots; the caller's contract.
    unsafe { sg_kfree(kmem, chunk, tail_alloc) };
}

/// `sg_alloc_table`: a table of `nents` entries, zeroed (no frame, length 0), the last one
/// marked as the end. Chunks are chained as described in the [module docs](self).
///
/// Context: may sleep if `gfp` allows. Returns `None` for `nents == 0` or without memory
/// (everything allocated so far is freed).
pub fn sg_alloc_table<P: Platform>(kmem: &Kmem<P>, nents: usize, gfp: Gfp) -> Option<SgTable> {
    if nents == 0 {
        return None;
    }
    let gfp = array_gfp(gfp);
    let mut first: Option<NonNull<Scatterlist>> = None;
    let mut prev: *mut Scatterlist = core::ptr::null_mut();
    let mut left = nents;
    let mut done = 0;
    loop {
        let (alloc, used) = if left > SG_MAX_SINGLE_ALLOC {
            (SG_MAX_SINGLE_ALLOC, SG_MAX_SINGLE_ALLOC - 1)
        } else {
            (left, left)
        };
        let Some(chunk) = sg_kmalloc(kmem, alloc, gfp) else {
            if let Some(f) = first {
                // The chunks so far are a table whose last chunk is a full page whose last
                // slot is still empty: free them as a table of `done` entries plus that slot.
                // SAFETY: they were allocated just above and not handed out.
                unsafe { free_chunks(kmem, f.as_ptr(), done + 1, SG_MAX_SINGLE_ALLOC) };
            }
            return None;
        };
        let chunk = chunk.as_ptr();
        match first {
            None => first = NonNull::new(chunk),
            Some(_) => {
                // `sg_chain`: the previous chunk's last slot links to this one.
                // SAFETY: `prev` is a full page chunk of this table; its last slot is free.
                unsafe {
                    (*prev.add(SG_MAX_SINGLE_ALLOC - 1)).page_link =
                        chunk as usize as u64 | SG_CHAIN;
                }
            }
        }
        left -= used;
        done += used;
        if left == 0 {
            // SAFETY: `used >= 1` slots of `chunk` are entries.
            unsafe { (*chunk.add(used - 1)).mark_end() };
            return Some(SgTable {
                sgl: first?,
                nents,
                tail_alloc: alloc,
            });
        }
        prev = chunk;
    }
}

/// `sg_free_table`: frees the entry array (not the pages it describes).
///
/// Context: any; never sleeps.
pub fn sg_free_table<P: Platform>(kmem: &Kmem<P>, table: SgTable) {
    // SAFETY: the table owns its chunks, laid out by this module; it is consumed here.
    unsafe { free_chunks(kmem, table.sgl.as_ptr(), table.nents, table.tail_alloc) };
}

/// Appends entries one at a time, growing the array by page chunks (for tables whose length
/// is not known in advance), then trims the last chunk to a kmalloc of the right size.
struct Builder {
    first: *mut Scatterlist,
    prev: *mut Scatterlist, // chunk before `cur`, or null
    cur: *mut Scatterlist,  // last chunk (a page while building)
    used: usize,            // slots of `cur` holding entries
    nents: usize,
    tail_alloc: usize,
}

impl Builder {
    const fn new() -> Builder {
        Builder {
            first: core::ptr::null_mut(),
            prev: core::ptr::null_mut(),
            cur: core::ptr::null_mut(),
            used: 0,
            nents: 0,
            tail_alloc: 0,
        }
    }

    /// Appends `e`; `false` if a chunk was needed and could not be had (nothing changed).
    fn push<P: Platform>(&mut self, kmem: &Kmem<P>, e: Scatterlist, gfp: Gfp) -> bool {
        if self.cur.is_null() {
            let Some(c) = sg_kmalloc(kmem, SG_MAX_SINGLE_ALLOC, gfp) else {
                return false;
            };
            self.first = c.as_ptr();
            self.cur = c.as_ptr();
            self.tail_alloc = SG_MAX_SINGLE_ALLOC;
        } else if self.used == SG_MAX_SINGLE_ALLOC {
            // Full: the last entry moves to a new chunk, its slot becomes the chain link.
            let Some(c) = sg_kmalloc(kmem, SG_MAX_SINGLE_ALLOC, gfp) else {
                return false;
            };
            let c = c.as_ptr();
            // SAFETY: `cur` is a full page chunk of ours; `c` a fresh one.
            unsafe {
                let last = self.cur.add(SG_MAX_SINGLE_ALLOC - 1);
                *c = *last;
                (*last).page_link = c as usize as u64 | SG_CHAIN;
                (*last).offset = 0;
                (*last).length = 0;
            }
            self.prev = self.cur;
            self.cur = c;
            self.used = 1;
        }
        // SAFETY: `used < SG_MAX_SINGLE_ALLOC` slots of the page chunk `cur` are in use.
        unsafe { *self.cur.add(self.used) = e };
        self.used += 1;
        self.nents += 1;
        true
    }

    /// Marks the end and returns the table (`None` if empty). With `trim`, a last chunk not
    /// full is moved to a kmalloc of its size when one can be had (it stays a page if not).
    fn finish<P: Platform>(mut self, kmem: &Kmem<P>, gfp: Gfp, trim: bool) -> Option<SgTable> {
        if self.nents == 0 {
            return None;
        }
        // SAFETY: `used >= 1` slots of `cur` are entries.
        unsafe { (*self.cur.add(self.used - 1)).mark_end() };
        let small = if trim && self.used < SG_MAX_SINGLE_ALLOC {
            sg_kmalloc(kmem, self.used, gfp)
        } else {
            None
        };
        if let Some(small) = small {
            let small = small.as_ptr();
            // SAFETY: both chunks are ours and distinct; `small` has `used` slots. The link
            // to `cur` is in `prev`'s last slot (or `cur` is `first`).
            unsafe {
                core::ptr::copy_nonoverlapping(self.cur, small, self.used);
                if self.prev.is_null() {
                    self.first = small;
                } else {
                    (*self.prev.add(SG_MAX_SINGLE_ALLOC - 1)).page_link =
                        small as usize as u64 | SG_CHAIN;
                }
                sg_kfree(kmem, self.cur, SG_MAX_SINGLE_ALLOC);
            }
            self.cur = small;
            self.tail_alloc = self.used;
        }
        Some(SgTable {
            sgl: NonNull::new(self.first)?,
            nents: self.nents,
            tail_alloc: self.tail_alloc,
        })
    }
}

// ------------------------------------------------------------------------ building tables

/// `sg_alloc_table_from_pages`: a table describing `size` bytes starting `offset` bytes into
/// `pages[0]`, one entry per run of physically contiguous pages (merged as Linux merges
/// them), each at most [`SG_MAX_SEGMENT`] bytes. See
/// [`sg_alloc_table_from_pages_segment`].
pub fn sg_alloc_table_from_pages<P: Platform>(
    kmem: &Kmem<P>,
    pages: &[&Page],
    offset: usize,
    size: usize,
    gfp: Gfp,
) -> Option<SgTable> {
    sg_alloc_table_from_pages_segment(kmem, pages, offset, size, SG_MAX_SEGMENT, gfp)
}

/// `sg_alloc_table_from_pages_segment`: as [`sg_alloc_table_from_pages`], with entries of at
/// most `max_segment` bytes (rounded down to whole pages).
///
/// Only the pages the range `[offset, offset + size)` touches are used (an `offset` of a
/// page or more skips whole pages). The table does not own the pages: [`sg_free_table`]
/// frees only the array. HighMem pages are fine (the copy functions `kmap` them).
///
/// Returns `None` for an empty range, a range beyond the pages given, a `max_segment` below
/// a page, or without memory.
pub fn sg_alloc_table_from_pages_segment<P: Platform>(
    kmem: &Kmem<P>,
    pages: &[&Page],
    offset: usize,
    size: usize,
    max_segment: usize,
    gfp: Gfp,
) -> Option<SgTable> {
    let max_segment = max_segment.min(SG_MAX_SEGMENT) & !(PAGE_SIZE - 1);
    if size == 0 || max_segment == 0 {
        return None;
    }
    // Whole pages before the start are not part of the range.
    let pages = pages.get(offset >> PAGE_SHIFT..)?;
    let offset = offset & (PAGE_SIZE - 1);
    let n_pages = offset.checked_add(size)?.div_ceil(PAGE_SIZE);
    if n_pages > pages.len() {
        return None;
    }
    let pa = kmem.pages();
    let pfns = |i: usize| pa.page_to_pfn(pages[i]).0;
    // The end of the run starting at page `cur` (Linux's inner loop).
    let run_end = |cur: usize| {
        let mut seg_len = 0;
        let mut j = cur + 1;
        while j < n_pages {
            seg_len += PAGE_SIZE;
            if seg_len >= max_segment || pfns(j) != pfns(j - 1) + 1 {
                break;
            }
            j += 1;
        }
        j
    };
    let mut chunks = 0;
    let mut cur = 0;
    while cur < n_pages {
        chunks += 1;
        cur = run_end(cur);
    }
    let mut table = sg_alloc_table(kmem, chunks, gfp)?;
    let (mut cur, mut offset, mut size) = (0, offset, size);
    for sg in table.iter_mut() {
        let j = run_end(cur);
        let chunk_size = ((j - cur) << PAGE_SHIFT) - offset;
        sg.set_pfn(Pfn(pfns(cur)), size.min(chunk_size), offset);
        size = size.saturating_sub(chunk_size);
        offset = 0;
        cur = j;
    }
    Some(table)
}

/// The largest order whose block fits in `pages` pages (`pages >= 1`).
fn floor_order(pages: usize) -> u32 {
    usize::BITS - 1 - pages.leading_zeros()
}

/// Allocates a buffer of `size` bytes as a scatter/gather table of physically contiguous
/// blocks, largest first (see the [module docs](self)).
///
/// Orders above 0 are requested with `gfp | __GFP_NORETRY | __GFP_NOWARN` (and without
/// `__GFP_NOFAIL`/`__GFP_RETRY_MAYFAIL`): when one fails the next request is one order
/// lower, and later requests never go back up. Order 0 uses `gfp` as given. With
/// `__GFP_HIGHMEM` the pages may be HighMem; with `__GFP_ZERO` they are zeroed. The entry
/// array comes from kmem (pages and kmalloc, never HighMem).
///
/// Each entry is one block of `get_order(entry.length())` pages at offset 0; only the last
/// entry may end inside its last page. Blocks are not merged even when adjacent, so that
/// [`sg_free_buffer`] can give each back whole.
///
/// Context: may sleep if `gfp` allows. Returns `None` for size 0 or when memory runs out, in
/// which case every block and chunk taken is freed (all or nothing).
pub fn sg_alloc_buffer<P: Platform>(kmem: &Kmem<P>, size: usize, gfp: Gfp) -> Option<SgTable> {
    if size == 0 {
        return None;
    }
    let pa = kmem.pages();
    let agfp = array_gfp(gfp);
    let high_gfp =
        gfp.without(__GFP_NOFAIL).without(__GFP_RETRY_MAYFAIL) | __GFP_NORETRY | __GFP_NOWARN;
    let mut order = MAX_PAGE_ORDER.min(get_order(size));
    let mut left = size;
    let mut b = Builder::new();
    while left > 0 {
        order = order.min(floor_order(left.div_ceil(PAGE_SIZE)));
        let page = loop {
            let g = if order > 0 { high_gfp } else { gfp };
            match pa.alloc_pages(g, order) {
                Some(p) => break Some(p),
                None if order > 0 => order -= 1,
                None => break None,
            }
        };
        let pushed = page.is_some_and(|page| {
            let len = left.min(PAGE_SIZE << order);
            let mut e = Scatterlist::default();
            e.set_pfn(pa.page_to_pfn(page), len, 0);
            let ok = b.push(kmem, e, agfp);
            if ok {
                left -= len;
            } else {
                // SAFETY: the block was allocated just above and never handed out.
                unsafe { pa.__free_pages(page, order) };
            }
            ok
        });
        if !pushed {
            if let Some(table) = b.finish(kmem, agfp, false) {
                // SAFETY: the table was built here from blocks allocated here, unchanged.
                unsafe { sg_free_buffer(kmem, table) };
            }
            return None;
        }
    }
    b.finish(kmem, agfp, true)
}

/// Frees a buffer from [`sg_alloc_buffer`]: every block, then the entry array.
///
/// Context: any; never sleeps.
///
/// # Safety
///
/// `table` comes from [`sg_alloc_buffer`] on this `kmem`, its entries unchanged, and nothing
/// uses the buffer's memory after this call.
pub unsafe fn sg_free_buffer<P: Platform>(kmem: &Kmem<P>, table: SgTable) {
    let pa = kmem.pages();
    for sg in table.iter() {
        let order = get_order(sg.length());
        match pa.pfn_to_page(sg.pfn()) {
            // SAFETY: each entry is one block of `order` pages allocated by
            // `sg_alloc_buffer` (the caller's contract).
            Some(page) => unsafe { pa.__free_pages(page, order) },
            None => report(pa, "sg_free_buffer", sg),
        }
    }
    sg_free_table(kmem, table);
}

// ------------------------------------------------------------------------------- copying

#[cold]
fn report<P: Platform>(pa: &PageAlloc<P>, what: &str, sg: &Scatterlist) {
    let t = pa.platform().current_task();
    pa.platform().log(
        LogLevel::Err,
        format_args!(
            "BUG: {what}: entry {sg:?} is outside RAM (pfn {:#x}) in {}",
            sg.pfn().0,
            t.comm()
        ),
    );
}

/// `sg_copy_buffer`: copies between `buf` and the table's bytes, skipping the first `skip`
/// bytes of the table; `to_buffer` copies from the table into `buf`. Returns the bytes
/// copied: `buf.len()`, or less when the table ends first. Each page is reached through
/// `kmap` (its direct-map address for low memory), one page at a time.
///
/// An entry outside RAM is reported and ends the copy.
///
/// # Safety
///
/// The bytes the copied part of the table describes are memory the caller may access:
/// nothing else writes them during the copy, and nothing else reads them while copying
/// into them (`to_buffer == false`).
unsafe fn sg_copy_buffer<P: Platform>(
    pa: &PageAlloc<P>,
    table: &SgTable,
    buf: *mut u8,
    buflen: usize,
    mut skip: usize,
    to_buffer: bool,
) -> usize {
    let mut done = 0;
    for sg in table.iter() {
        if done == buflen {
            break;
        }
        let mut len = sg.length();
        if skip >= len {
            skip -= len;
            continue;
        }
        let mut off = sg.offset() + skip;
        len -= skip;
        skip = 0;
        while len > 0 && done < buflen {
            let pfn = Pfn(sg.pfn().0 + (off >> PAGE_SHIFT) as u64);
            let in_page = off & (PAGE_SIZE - 1);
            let n = (PAGE_SIZE - in_page).min(len).min(buflen - done);
            let Some(page) = pa.pfn_to_page(pfn) else {
                report(pa, "sg_copy_buffer", sg);
                return done;
            };
            let va = pa.kmap(page);
            // SAFETY: `va` maps `page` for PAGE_SIZE bytes and `in_page + n <= PAGE_SIZE`;
            // `buf + done .. + n` is inside the caller's buffer (`done + n <= buflen`); the
            // two do not overlap (the buffer is the caller's, the page the table's, by the
            // caller's contract), and the caller may access the page.
            unsafe {
                let p = va.as_ptr().add(in_page);
                if to_buffer {
                    core::ptr::copy_nonoverlapping(p, buf.add(done), n);
                } else {
                    core::ptr::copy_nonoverlapping(buf.add(done), p, n);
                }
            }
            pa.kunmap(page);
            off += n;
            len -= n;
            done += n;
        }
    }
    done
}

/// `sg_copy_from_buffer`: copies `buf` into the table's bytes, from the start. Returns the
/// bytes copied (less than `buf.len()` when the table is shorter).
///
/// # Safety
///
/// The caller owns the memory the table describes (a buffer from [`sg_alloc_buffer`], or
/// pages it allocated), and nothing else accesses it during the copy.
pub unsafe fn sg_copy_from_buffer<P: Platform>(
    pa: &PageAlloc<P>,
    table: &SgTable,
    buf: &[u8],
) -> usize {
    // SAFETY: the caller's contract; the table's memory is only written.
    unsafe { sg_copy_buffer(pa, table, buf.as_ptr().cast_mut(), buf.len(), 0, false) }
}

/// `sg_copy_to_buffer`: copies the table's bytes, from the start, into `buf`. Returns the
/// bytes copied (less than `buf.len()` when the table is shorter).
///
/// # Safety
///
/// Nothing writes the memory the table describes during the copy.
pub unsafe fn sg_copy_to_buffer<P: Platform>(
    pa: &PageAlloc<P>,
    table: &SgTable,
    buf: &mut [u8],
) -> usize {
    // SAFETY: the caller's contract; `buf` is written, the table's memory only read.
    unsafe { sg_copy_buffer(pa, table, buf.as_mut_ptr(), buf.len(), 0, true) }
}

/// `sg_pcopy_from_buffer`: as [`sg_copy_from_buffer`], starting `skip` bytes into the table.
///
/// # Safety
///
/// As [`sg_copy_from_buffer`].
pub unsafe fn sg_pcopy_from_buffer<P: Platform>(
    pa: &PageAlloc<P>,
    table: &SgTable,
    buf: &[u8],
    skip: usize,
) -> usize {
    // SAFETY: the caller's contract; the table's memory is only written.
    unsafe { sg_copy_buffer(pa, table, buf.as_ptr().cast_mut(), buf.len(), skip, false) }
}

/// `sg_pcopy_to_buffer`: as [`sg_copy_to_buffer`], starting `skip` bytes into the table.
///
/// # Safety
///
/// As [`sg_copy_to_buffer`].
pub unsafe fn sg_pcopy_to_buffer<P: Platform>(
    pa: &PageAlloc<P>,
    table: &SgTable,
    buf: &mut [u8],
    skip: usize,
) -> usize {
    // SAFETY: the caller's contract; `buf` is written, the table's memory only read.
    unsafe { sg_copy_buffer(pa, table, buf.as_mut_ptr(), buf.len(), skip, true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_layout() {
        assert_eq!(SG_MAX_SINGLE_ALLOC, 256);
        let mut e = Scatterlist::default();
        e.set_pfn(Pfn(0x12345), 0x3000, 0x10);
        assert_eq!(e.pfn(), Pfn(0x12345));
        assert_eq!(e.phys(), PhysAddr(0x12345010));
        assert_eq!((e.offset(), e.length()), (0x10, 0x3000));
        assert!(!e.is_last());
        e.mark_end();
        e.set_pfn(Pfn(7), 1, 0);
        assert!(e.is_last(), "set_pfn keeps the end mark");
        assert_eq!(e.pfn(), Pfn(7));
    }

    #[test]
    fn chunk_counts() {
        assert_eq!(nr_chunks(1), 1);
        assert_eq!(nr_chunks(256), 1);
        assert_eq!(nr_chunks(257), 2);
        assert_eq!(nr_chunks(255 + 256), 2);
        assert_eq!(nr_chunks(255 + 257), 3);
        assert_eq!(floor_order(1), 0);
        assert_eq!(floor_order(3), 1);
        assert_eq!(floor_order(1024), 10);
        assert_eq!(floor_order(2047), 10);
    }
}
