//! Address-space management: `vmap_area`s in the free, busy and purge trees.
//!
//! Every byte of `[start, end)` of the vmalloc range belongs to exactly one area, which is
//!
//! * **free**: in the free tree, coalesced (no two free areas touch);
//! * **busy**: in the busy tree: handed out by [`Vmalloc::alloc_vmap_area`], its guard page
//!   included; it also carries the `vm_struct` fields (flags, page array, caller);
//! * **lazily freed**: in the purge tree, already unmapped, waiting for a purge to flush
//!   the TLB over it and merge it back into the free tree;
//! * **in transit**: unlinked from one tree and not yet linked into the next (a `vfree`
//!   between unlinking and queueing, a purge between detaching and merging). Counted in
//!   `in_transit`, so `Σ free + Σ busy + Σ purge == end - start` whenever it is 0.
//!
//! All three trees, the counters and the spare node are guarded by the vmap lock
//! (`Vmalloc::lock`). Nothing else is done under it: nodes are allocated before it is taken
//! and freed after it is dropped, so the lock is a leaf.

use core::ptr;
use core::sync::atomic::Ordering::Relaxed;

use super::tree::{Link, Tree};
use super::{Caller, GFP_RECLAIM_MASK, VM_UNINITIALIZED, VmCtx, VmFlags, Vmalloc};
use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::gfp::{__GFP_NOWARN, Gfp};
use crate::page_alloc::page::Page;
use crate::platform::{LogLevel, Platform};

/// One area of the vmalloc range (`struct vmap_area` with `struct vm_struct` folded in):
/// a slab object of the `vmap_area` cache, linked into one of the three trees.
#[repr(C)]
pub(crate) struct VmapArea {
    /// First byte (page aligned); the tree key.
    pub(crate) va_start: usize,
    /// One past the last byte (page aligned), the guard page included.
    pub(crate) va_end: usize,
    pub(crate) left: Link,  // tree links, or the `next` of a node list
    pub(crate) right: Link, // tree link
    pub(crate) subtree_max_size: usize, // largest size in this subtree
    pub(crate) height: u32, // AVL height of this subtree
    /// `VM_*` flags of a busy area; 0 when free or lazily freed.
    pub(crate) flags: u32,
    /// The page array (`vm_struct.pages`): `nr_pages` descriptors; null when none.
    pub(crate) pages: *mut *const Page,
    /// Entries of `pages` (mapped pages of a `vmap`, owned pages of a `vmalloc`).
    pub(crate) nr_pages: usize,
    /// Who asked for the area (`vm_struct.caller`).
    pub(crate) caller: Caller,
}

impl VmapArea {
    /// A node covering `[start, end)`, free.
    pub(crate) const fn new(start: usize, end: usize) -> VmapArea {
        VmapArea {
            va_start: start,
            va_end: end,
            left: ptr::null_mut(),
            right: ptr::null_mut(),
            subtree_max_size: end - start,
            height: 1,
            flags: 0,
            pages: ptr::null_mut(),
            nr_pages: 0,
            caller: Caller::Name("kmem"),
        }
    }

    /// Bytes covered.
    #[inline]
    pub(crate) fn size(&self) -> usize {
        self.va_end - self.va_start
    }

    /// True when `size` bytes aligned to `align` (a power of two) fit in this area
    /// (`is_within_this_va`).
    #[inline]
    pub(crate) fn fits(&self, size: usize, align: usize) -> bool {
        let Some(start) = self
            .va_start
            .checked_add(align - 1)
            .map(|s| s & !(align - 1))
        else {
            return false;
        };
        start.checked_add(size).is_some_and(|e| e <= self.va_end)
    }
}

/// What the vmap lock guards.
pub(crate) struct VmapState {
    /// Free areas, coalesced.
    pub(crate) free: Tree,
    /// Areas handed out.
    pub(crate) busy: Tree,
    /// Lazily freed areas, unmapped, not yet flushed and merged.
    pub(crate) purge: Tree,
    /// Pages covered by the purge tree (`vmap_lazy_nr`).
    pub(crate) lazy_pages: usize,
    /// Areas in no tree (see the module docs).
    pub(crate) in_transit: usize,
    /// One preloaded node for a split (`ne_fit_preload_node`), or null.
    pub(crate) spare: Link,
}

// SAFETY: the state owns the nodes it links (slab objects of the vmalloc range's cache) and
// is only reached through the vmap lock.
unsafe impl Send for VmapState {}

impl VmapState {
    pub(crate) const fn new() -> VmapState {
        VmapState {
            free: Tree::new(),
            busy: Tree::new(),
            purge: Tree::new(),
            lazy_pages: 0,
            in_transit: 0,
            spare: ptr::null_mut(),
        }
    }

    /// Keeps `n` as the spare node if there is none, else pushes it on `dead` (a list
    /// through `left`) for the caller to free after dropping the lock.
    ///
    /// # Safety
    ///
    /// `n` is a valid node in no tree, owned by the caller.
    unsafe fn retire(&mut self, n: Link, dead: &mut Link) {
        if self.spare.is_null() {
            self.spare = n;
        } else {
            // SAFETY: the caller owns `n`.
            unsafe { (*n).left = *dead };
            *dead = n;
        }
    }

    /// Carves `size` bytes at `align` out of the lowest free area that can hold them
    /// (`va_clip`). A split in the middle of an area needs a second node: `spare` if the
    /// caller brought one, else the state's own. Nodes no longer needed go to `dead`.
    pub(crate) fn clip(
        &mut self,
        size: usize,
        align: usize,
        spare: &mut Link,
        dead: &mut Link,
    ) -> Result<usize, ClipError> {
        let f = self.free.lowest_fit(size, align, PAGE_SIZE);
        if f.is_null() {
            return Err(ClipError::NoSpace);
        }
        // SAFETY: `f` is a node of the free tree (owned by this state, under the lock); the
        // edits below keep it between its in-order neighbours, and `update` follows each.
        unsafe {
            let start = (*f).va_start.next_multiple_of(align);
            let end = start + size;
            match (start == (*f).va_start, end == (*f).va_end) {
                (true, true) => {
                    // FL_FIT_TYPE: the whole area.
                    self.free.remove(f);
                    self.retire(f, dead);
                }
                (true, false) => {
                    // LE_FIT_TYPE: its left edge.
                    (*f).va_start = end;
                    self.free.update(f);
                }
                (false, true) => {
                    // RE_FIT_TYPE: its right edge.
                    (*f).va_end = start;
                    self.free.update(f);
                }
                (false, false) => {
                    // NE_FIT_TYPE: its middle; the left part gets a node of its own.
                    let l = if !spare.is_null() {
                        core::mem::replace(spare, ptr::null_mut())
                    } else if !self.spare.is_null() {
                        core::mem::replace(&mut self.spare, ptr::null_mut())
                    } else {
                        return Err(ClipError::NeedNode);
                    };
                    l.write(VmapArea::new((*f).va_start, start));
                    (*f).va_start = end;
                    self.free.update(f);
                    self.free.insert(l);
                }
            }
            Ok(start)
        }
    }

    /// Gives `n`'s range back to the free tree, merged with its free neighbours
    /// (`merge_or_add_vmap_area`). Nodes merged away go to `dead` (or the spare slot).
    ///
    /// # Safety
    ///
    /// `n` is a valid node in no tree, owned by the caller, whose range lies in the vmalloc
    /// range and overlaps no area of any tree.
    pub(crate) unsafe fn merge_free(&mut self, n: Link, dead: &mut Link) {
        // SAFETY: the caller's contract for `n`; `prev` and `next` are nodes of the free
        // tree. Extending `prev` to the right or `next` to the left keeps them between their
        // in-order neighbours, because `n` overlapped no area.
        unsafe {
            let (s, e) = ((*n).va_start, (*n).va_end);
            (*n).flags = 0;
            (*n).pages = ptr::null_mut();
            (*n).nr_pages = 0;
            let (prev, next) = self.free.neighbours(s);
            let join_prev = !prev.is_null() && (*prev).va_end == s;
            let join_next = !next.is_null() && (*next).va_start == e;
            match (join_prev, join_next) {
                (true, true) => {
                    // Unlink `next` before `prev` grows over it (the tree must never hold
                    // overlapping areas).
                    let end = (*next).va_end;
                    self.free.remove(next);
                    (*prev).va_end = end;
                    self.free.update(prev);
                    self.retire(next, dead);
                    self.retire(n, dead);
                }
                (true, false) => {
                    (*prev).va_end = e;
                    self.free.update(prev);
                    self.retire(n, dead);
                }
                (false, true) => {
                    (*next).va_start = s;
                    self.free.update(next);
                    self.retire(n, dead);
                }
                (false, false) => self.free.insert(n),
            }
        }
    }
}

/// Why [`VmapState::clip`] failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ClipError {
    /// No free area can hold the request.
    NoSpace,
    /// The fit splits an area in two and no spare node was at hand.
    NeedNode,
}

/// Why a busy area could not be unlinked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum UnlinkError {
    /// No busy area starts at the address (or it is still being set up).
    Nonexistent,
    /// The area owns its pages (`vmalloc`): only `vfree` may take it.
    OwnsPages,
}

impl Vmalloc {
    // ------------------------------------------------------------------ nodes

    /// A node from the `vmap_area` cache, or null. Never called under the vmap lock.
    pub(crate) fn alloc_node<P: Platform>(&self, cx: VmCtx<'_, P>, gfp: Gfp) -> Link {
        // SAFETY: the cache was created by `new` from the same slab layer and is never
        // destroyed.
        let cache = unsafe { self.cache.as_ref() };
        match cx
            .slab
            .kmem_cache_alloc(cx.pages, cache, gfp & GFP_RECLAIM_MASK)
        {
            Some(p) => p.as_ptr().cast(),
            None => ptr::null_mut(),
        }
    }

    /// Frees a list of nodes linked through `left`. Never called under the vmap lock.
    pub(crate) fn free_nodes<P: Platform>(&self, cx: VmCtx<'_, P>, mut list: Link) {
        // SAFETY: the cache outlives `self` (see `alloc_node`).
        let cache = unsafe { self.cache.as_ref() };
        while !list.is_null() {
            // SAFETY: list nodes are objects of `cache` owned by the caller, in no tree.
            unsafe {
                let next = (*list).left;
                cx.slab.kmem_cache_free(cx.pages, cache, list.cast());
                list = next;
            }
        }
    }

    /// Frees one node (null is fine). Never called under the vmap lock.
    pub(crate) fn free_node<P: Platform>(&self, cx: VmCtx<'_, P>, n: Link) {
        if !n.is_null() {
            // SAFETY: the caller owns `n`; a one-element list.
            unsafe { (*n).left = ptr::null_mut() };
            self.free_nodes(cx, n);
        }
    }

    // ------------------------------------------------------------------ allocation

    /// Reserves `size` bytes (page multiple, guard page included) aligned to `align` (a power
    /// of two, at least a page in effect) and links a busy area for them
    /// (`alloc_vmap_area`). When no free area fits, purges the lazily freed areas and tries
    /// once more; then reports (unless `__GFP_NOWARN`) and fails.
    ///
    /// Context: may sleep if `gfp` allows (node allocation). Returns the busy node and its
    /// start; the node stays the caller's to publish while `flags` has `VM_UNINITIALIZED`.
    /// Failures are not counted here: the callers count them.
    pub(crate) fn alloc_vmap_area<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        size: usize,
        align: usize,
        gfp: Gfp,
        flags: VmFlags,
        caller: Caller,
    ) -> Option<(Link, usize)> {
        debug_assert!(size > 0 && size % PAGE_SIZE == 0 && align.is_power_of_two());
        let va = self.alloc_node(cx, gfp);
        if va.is_null() {
            return None;
        }
        // Preload a node for a split (`preload_this_cpu_lock`) unless one is parked.
        let mut spare = if self.has_spare.load(Relaxed) {
            ptr::null_mut()
        } else {
            self.alloc_node(cx, gfp | __GFP_NOWARN)
        };
        let mut dead = ptr::null_mut();
        let mut purged = false;
        let result = loop {
            let mut st = self.lock.lock();
            match st.clip(size, align, &mut spare, &mut dead) {
                Ok(start) => {
                    // SAFETY: `va` is a fresh node we own; it covers a range just taken out
                    // of the free tree, so it overlaps nothing in the busy tree.
                    unsafe {
                        va.write(VmapArea::new(start, start + size));
                        (*va).flags = flags.0;
                        (*va).caller = caller;
                        st.busy.insert(va);
                    }
                    if st.spare.is_null() {
                        st.spare = core::mem::replace(&mut spare, ptr::null_mut());
                    }
                    self.has_spare.store(!st.spare.is_null(), Relaxed);
                    break Some((va, start));
                }
                Err(ClipError::NeedNode) => {
                    drop(st);
                    spare = self.alloc_node(cx, gfp);
                    if spare.is_null() {
                        break None;
                    }
                }
                Err(ClipError::NoSpace) => {
                    self.has_spare.store(!st.spare.is_null(), Relaxed);
                    drop(st);
                    if !purged {
                        purged = true;
                        self.purge(cx, true);
                        continue;
                    }
                    if !gfp.contains(__GFP_NOWARN) {
                        cx.pages.platform().log(
                            LogLevel::Warning,
                            format_args!(
                                "vmap allocation for size {size} failed: use vmalloc=<size> to increase size"
                            ),
                        );
                    }
                    break None;
                }
            }
        };
        self.free_node(cx, spare);
        self.free_nodes(cx, dead);
        if result.is_none() {
            self.free_node(cx, va);
        }
        result
    }

    // ------------------------------------------------------------------ freeing

    /// Unlinks the busy area starting at `addr` (`find_unlink_vmap_area`); with `any_kind`
    /// false, an area that owns its pages is refused. The caller owns the node afterwards and
    /// must hand it to [`Vmalloc::free_vmap_area_lazy`].
    pub(crate) fn unlink_busy(&self, addr: usize, any_kind: bool) -> Result<Link, UnlinkError> {
        let mut st = self.lock.lock();
        let n = st.busy.find(addr);
        if n.is_null() {
            return Err(UnlinkError::Nonexistent);
        }
        // SAFETY: `n` is a node of the busy tree, read under the lock.
        let (flags, pages) = unsafe { ((*n).flags, (*n).pages) };
        if flags & VM_UNINITIALIZED.0 != 0 {
            return Err(UnlinkError::Nonexistent);
        }
        if !any_kind && flags & super::VM_ALLOC.0 != 0 && !pages.is_null() {
            return Err(UnlinkError::OwnsPages);
        }
        // SAFETY: `n` is a node of the busy tree.
        unsafe { st.busy.remove(n) };
        st.in_transit += 1;
        Ok(n)
    }

    /// Unlinks `n`, a busy area still being set up by the caller (a failed `vmalloc`).
    pub(crate) fn unlink_own(&self, n: Link) {
        let mut st = self.lock.lock();
        // SAFETY: the caller set `n` up through `alloc_vmap_area` and, as the area is
        // still `VM_UNINITIALIZED`, nobody else may unlink it: it is in the busy tree.
        unsafe { st.busy.remove(n) };
        st.in_transit += 1;
    }

    /// Queues an unlinked, already unmapped area for a lazy TLB flush and release
    /// (`free_vmap_area_noflush`); purges when the queue exceeds `lazy_max_pages`.
    ///
    /// # Safety
    ///
    /// `n` came from [`Vmalloc::unlink_busy`] or [`Vmalloc::unlink_own`], and nothing maps
    /// or uses its range any more.
    pub(crate) unsafe fn free_vmap_area_lazy<P: Platform>(&self, cx: VmCtx<'_, P>, n: Link) {
        let mut st = self.lock.lock();
        // SAFETY: the caller owns `n`; its range left the busy tree and is in no other.
        let over = unsafe {
            (*n).flags = 0;
            (*n).pages = ptr::null_mut();
            (*n).nr_pages = 0;
            st.lazy_pages += (*n).size() / PAGE_SIZE;
            st.purge.insert(n);
            st.in_transit -= 1;
            st.lazy_pages > self.lazy_max
        };
        drop(st);
        if over {
            // Linux hands this to a worker; here the vfree that crosses the line purges,
            // unless a purge is already running.
            self.purge(cx, false);
        }
    }

    /// Flushes the TLB over every lazily freed area and merges them into the free tree
    /// (`__purge_vmap_area_lazy`). With `wait`, waits for a purge in progress first;
    /// otherwise gives up if one is running. Returns true when something was purged.
    ///
    /// Context: never sleeps; spins on the purge lock when `wait`.
    pub(crate) fn purge<P: Platform>(&self, cx: VmCtx<'_, P>, wait: bool) -> bool {
        let purging = if wait {
            self.purge_lock.lock()
        } else {
            match self.purge_lock.try_lock() {
                Some(g) => g,
                None => return false,
            }
        };
        let mut st = self.lock.lock();
        if st.purge.is_empty() {
            return false;
        }
        let first = st.purge.first();
        let last = st.purge.last();
        let count = st.purge.len();
        // SAFETY: `first` and `last` are nodes of the purge tree, read under the lock.
        let (lo, hi) = unsafe { ((*first).va_start, (*last).va_end) };
        let mut list = st.purge.take_list();
        st.in_transit += count;
        st.lazy_pages = 0;
        drop(st);

        // The page tables were cleared at free time; now make that visible everywhere,
        // once for the whole batch, before the ranges can be handed out again.
        cx.pages
            .platform()
            .flush_tlb_range(VirtAddr(lo), (hi - lo) / PAGE_SIZE);

        let mut dead = ptr::null_mut();
        let mut st = self.lock.lock();
        while !list.is_null() {
            // SAFETY: `list` holds the detached purge nodes, owned by us; each range left
            // every tree when it was queued, so it overlaps no area.
            unsafe {
                let next = (*list).left;
                st.merge_free(list, &mut dead);
                list = next;
            }
            st.in_transit -= 1;
        }
        self.has_spare.store(!st.spare.is_null(), Relaxed);
        drop(st);
        self.nr_purges.fetch_add(1, Relaxed);
        // Nodes go back to the slab layer (CPU guard, node lock) with no vmalloc lock held.
        drop(purging);
        self.free_nodes(cx, dead);
        true
    }
}
