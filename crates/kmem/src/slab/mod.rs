//! Lookaside caches (SLUB with per-CPU sheaves): `kmem_cache_create` and friends.
//!
//! A cache hands out objects of one size. Its objects live in slabs (page allocations, see
//! `node.rs`); each CPU keeps a *sheaf* of free object pointers ([`sheaf`]). The fast paths
//! push and pop the current CPU's sheaf under its CPU guard: no lock, no atomic
//! read-modify-write. A full sheaf is parked whole in the cache's *barn* (up to
//! `BARN_SHEAVES`), and an empty one takes a full sheaf from it, so objects freed on one CPU
//! reach another without touching the slabs; otherwise refills and flushes move half a sheaf
//! between the sheaf and the slabs under the cache's node lock. New slabs come from the page
//! allocator.
//!
//! # Lock order
//!
//! 1. a CPU guard (the sheaf of that CPU);
//! 2. `KmemCache::barn` (the full sheaves parked between CPUs; nothing is taken under it);
//! 2. `KmemCache::node` (the cache's slab lists and counters);
//! 3. the page allocator's locks (taken by slab allocation and freeing).
//!
//! `SlabAllocator::caches` (the cache list) is taken alone or before a node lock. Nothing
//! that may sleep (allocating a slab with `GFP_KERNEL`) runs under a guard or a node lock.
//!
//! # Finding an object's cache
//!
//! An object's address gives its page (direct map), the page its slab head (compound tails
//! point to their head), the head its cache (`page->private`) and its index
//! (`obj_to_index`, with a reciprocal multiply). `kfree` needs no size, and a free of a
//! pointer that is not the start of an object of that cache is reported and dropped.

pub mod cache;
pub(crate) mod node;
pub mod sheaf;
pub mod shrink;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering::Relaxed};

use cache::SHEAVES_OFFSET;
pub use cache::{Ctor, KmemCache, KmemCacheArgs, SlabFlags};
use node::Slabs;
use sheaf::{SHEAF_MAX, Sheaf};

use crate::addr::PAGE_SIZE;
use crate::gfp::{
    __GFP_DMA32, __GFP_RECLAIMABLE, __GFP_ZERO, GFP_DMA, GFP_KERNEL, GFP_ZONEMASK, Gfp,
    gfpflags_allow_blocking,
};
use crate::page_alloc::PageAlloc;
use crate::page_alloc::page::pg;
use crate::platform::{CpuGuard, LogLevel, Platform};
use crate::sync::SpinLock;

/// Where a free's pointer lies.
#[derive(Clone, Copy)]
pub(crate) struct ObjRef<'a> {
    pub(crate) cache: &'a KmemCache,
    pub(crate) slab: u32, // mem_map index of the slab's head page
    pub(crate) index: u32,
}

struct CacheList(*mut KmemCache);
// SAFETY: the list only links caches (Sync) and is only touched under its spinlock.
unsafe impl Send for CacheList {}

/// The slab layer of one machine: the list of caches and the merge policy.
pub struct SlabAllocator {
    caches: SpinLock<CacheList>, // `slab_caches`, newest first; guards the `next` links
    merge: AtomicBool,           // merge compatible caches (`slab_nomerge` turns it off)
}

impl Default for SlabAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl SlabAllocator {
    /// An empty slab layer; merging on (Linux's default).
    pub const fn new() -> SlabAllocator {
        SlabAllocator {
            caches: SpinLock::new(CacheList(core::ptr::null_mut())),
            merge: AtomicBool::new(true),
        }
    }

    /// Turns cache merging on or off (`slab_nomerge` / `slab_merge`).
    pub fn set_merge(&self, on: bool) {
        self.merge.store(on, Relaxed);
    }

    /// Calls `f` for every cache, newest first.
    pub fn for_each_cache(&self, mut f: impl FnMut(&KmemCache)) {
        let list = self.caches.lock();
        let mut p = list.0;
        while !p.is_null() {
            // SAFETY: caches on the list stay allocated until removed from it, which needs
            // the list lock we hold.
            let c = unsafe { &*p };
            f(c);
            p = c.next.load(Relaxed);
        }
    }

    /// Finds a cache by name.
    pub fn find_cache(&self, name: &str) -> Option<&KmemCache> {
        let mut found: *const KmemCache = core::ptr::null();
        self.for_each_cache(|c| {
            if found.is_null() && c.name() == name {
                found = c;
            }
        });
        // SAFETY: a listed cache lives until destroyed; the caller must not destroy it while
        // holding the reference (as with any `&KmemCache`).
        (!found.is_null()).then(|| unsafe { &*found })
    }

    // ------------------------------------------------------------------ creation

    /// Creates a cache of `size`-byte objects (`kmem_cache_create`).
    ///
    /// Context: may sleep. Returns `None` (after a report) for a size of 0 or above
    /// `MAX_OBJECT_SIZE`, an alignment that is not a power of two, or no memory; with
    /// `SLAB_PANIC` a failure panics, as in Linux. A compatible existing cache (no
    /// constructor, same zone and accounting flags, same rounded size) is returned instead of
    /// a new one unless merging is off or `SLAB_NO_MERGE` is given.
    pub fn kmem_cache_create<'a, P: Platform>(
        &'a self,
        pa: &PageAlloc<P>,
        name: &str,
        size: usize,
        align: usize,
        flags: SlabFlags,
        ctor: Option<Ctor>,
    ) -> Option<&'a KmemCache> {
        let args = KmemCacheArgs {
            align,
            ctor,
            ..KmemCacheArgs::default()
        };
        self.kmem_cache_create_args(pa, name, size, &args, flags)
    }

    /// Creates a cache from a [`KmemCacheArgs`] (`__kmem_cache_create_args`).
    pub fn kmem_cache_create_args<'a, P: Platform>(
        &'a self,
        pa: &PageAlloc<P>,
        name: &str,
        size: usize,
        args: &KmemCacheArgs,
        flags: SlabFlags,
    ) -> Option<&'a KmemCache> {
        let p = pa.platform();
        let bad = if size == 0 || size > cache::MAX_OBJECT_SIZE {
            Some("invalid object size")
        } else if args.align != 0 && !args.align.is_power_of_two() {
            Some("alignment is not a power of two")
        } else {
            None
        };
        if let Some(why) = bad {
            p.log(
                LogLevel::Err,
                format_args!(
                    "kmem_cache_create({name}) failed with error -22: {why} (size {size})"
                ),
            );
            return self.create_failed(flags, name);
        }
        let gfp = cache_gfp(flags);
        if crate::addr::get_order(size.max(args.align)) > crate::addr::MAX_PAGE_ORDER {
            p.log(
                LogLevel::Err,
                format_args!(
                    "kmem_cache_create({name}) failed with error -22: size {size} with alignment {} needs more than an order-{} slab",
                    args.align,
                    crate::addr::MAX_PAGE_ORDER
                ),
            );
            return self.create_failed(flags, name);
        }
        let proto = KmemCache::new(
            name,
            size,
            args.align,
            flags,
            args.ctor,
            args.sheaf_capacity,
            pa.nr_cpus(),
            gfp,
        );
        let mut list = self.caches.lock();
        if let Some(c) = self.find_mergeable(&list, &proto) {
            // `__kmem_cache_alias`: the shared cache serves the larger of the two sizes.
            c.refcount.store(c.refcount.load(Relaxed) + 1, Relaxed);
            c.object_size.fetch_max(size as u32, Relaxed);
            return Some(c);
        }
        drop(list);
        // The cache and its sheaves, in pages of their own.
        let header = SHEAVES_OFFSET;
        let bytes = header + (pa.nr_cpus() + sheaf::BARN_SHEAVES) * core::mem::size_of::<Sheaf>();
        let Some(va) = pa.alloc_pages_exact(bytes, GFP_KERNEL) else {
            p.log(
                LogLevel::Err,
                format_args!("kmem_cache_create({name}) failed with error -12"),
            );
            return self.create_failed(flags, name);
        };
        let base = va.as_ptr();
        // SAFETY: `base` is the direct-map address of `bytes` fresh bytes, page aligned; the
        // header fits before the sheaves (64-byte aligned, as `Sheaf` needs).
        let cache = unsafe {
            let sheaves = base.add(header) as *mut Sheaf;
            for i in 0..pa.nr_cpus() + sheaf::BARN_SHEAVES {
                sheaves.add(i).write(Sheaf::new());
            }
            let c = base as *mut KmemCache;
            c.write(proto);
            (*c).alloc_size = bytes;
            (*c).nr_cpus = pa.nr_cpus() as u32;
            &*c
        };
        list = self.caches.lock();
        cache.next.store(list.0, Relaxed);
        list.0 = cache as *const KmemCache as *mut KmemCache;
        Some(cache)
    }

    #[cold]
    fn create_failed(&self, flags: SlabFlags, name: &str) -> Option<&KmemCache> {
        if flags.contains(SlabFlags::PANIC) {
            panic!("kmem_cache_create: Failed to create slab '{name}'");
        }
        None
    }

    /// `find_mergeable`: an existing cache that can serve `proto`'s objects.
    fn find_mergeable<'a>(&self, list: &CacheList, proto: &KmemCache) -> Option<&'a KmemCache> {
        if !self.merge.load(Relaxed)
            || proto.ctor.is_some()
            || proto.flags.intersects(SlabFlags::NEVER_MERGE)
        {
            return None;
        }
        let mut p = list.0;
        while !p.is_null() {
            // SAFETY: listed caches are alive while the list lock is held (it is).
            let c = unsafe { &*p };
            p = c.next.load(Relaxed);
            if c.ctor.is_some()
                || c.flags.intersects(SlabFlags::NEVER_MERGE)
                || c.refcount.load(Relaxed) == 0
            {
                continue;
            }
            let same = SlabFlags::MERGE_SAME;
            if proto.size > c.size
                || (proto.flags.0 & same.0) != (c.flags.0 & same.0)
                || c.size as usize & (proto.align as usize - 1) != 0
                || (c.size - proto.size) as usize >= core::mem::size_of::<usize>()
            {
                continue;
            }
            // SAFETY: as above; the cache outlives the reference while it has creators.
            return Some(unsafe { &*(c as *const KmemCache) });
        }
        None
    }

    // ------------------------------------------------------------------ allocation

    /// Allocates an object (`kmem_cache_alloc`).
    ///
    /// Context: may sleep with a sleeping `gfp` when the cache must grow; never otherwise.
    /// The object is in its constructed state (if the cache has a constructor), zeroed with
    /// `__GFP_ZERO`. Zone modifiers in `gfp` are ignored: the cache's own apply.
    #[inline(always)]
    pub fn kmem_cache_alloc<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        let failslab = &pa.faults().failslab;
        if failslab.should_failslab(pa.platform(), || s.object_size(), gfp) {
            return None;
        }
        self.kmem_cache_alloc_nohook(pa, s, gfp)
    }

    /// [`Self::kmem_cache_alloc`] without the failslab hook, for `kmalloc`, whose size test
    /// already sends every request to a path with the hook while failslab is armed
    /// ([`crate::fault::FaultAttr::gate`]).
    #[inline(always)]
    pub(crate) fn kmem_cache_alloc_nohook<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        // SAFETY: the closure only pops this CPU's sheaf: it takes no guard and never sleeps.
        let (obj, nested) = unsafe {
            pa.platform()
                .this_cpu(|cpu, nested| (s.sheaf(cpu).pop(), nested))
        };
        let obj = match obj {
            Some(o) => o,
            None => self.alloc_slow(pa, s, gfp)?,
        };
        if nested && gfpflags_allow_blocking(gfp) {
            pa.report_atomic_sleep();
        }
        if gfp.contains(__GFP_ZERO) {
            if s.ctor.is_some() {
                // Zeroing would destroy the constructed state: Linux warns and ignores it.
                self.report_zero_with_ctor(pa, s);
            } else {
                // SAFETY: `obj` is a fresh object of `object_size` writable bytes.
                unsafe { core::ptr::write_bytes(obj, 0, s.object_size()) };
            }
        }
        // SAFETY: sheaves and slabs only hold non-null object addresses.
        Some(unsafe { NonNull::new_unchecked(obj) })
    }

    /// `kmem_cache_zalloc`: a zeroed object.
    pub fn kmem_cache_zalloc<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        self.kmem_cache_alloc(pa, s, gfp | __GFP_ZERO)
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        gfp: Gfp,
    ) -> Option<*mut u8> {
        // A full sheaf from the barn first: objects freed on other CPUs, in one copy.
        {
            let guard = pa.platform().cpu_guard();
            let mine = sheaf_of(s, &guard);
            if let Some(obj) = mine.pop() {
                return Some(obj); // the task moved to a CPU whose sheaf has objects
            }
            let mut full = s.barn.lock();
            if *full > 0 {
                *full -= 1;
                s.barn_sheaf(*full).move_all_to(mine);
                drop(full);
                if let Some(obj) = mine.pop() {
                    return Some(obj);
                }
            }
        }
        let slabs = Slabs { pa, s };
        let mut batch = [core::ptr::null_mut(); SHEAF_MAX];
        let want = (s.sheaf_cap as usize / 2 + 1).min(SHEAF_MAX);
        loop {
            let n = slabs.take_objects(&mut s.node.lock(), &mut batch[..want]);
            if n > 0 {
                let guard = pa.platform().cpu_guard();
                let sheaf = sheaf_of(s, &guard);
                let mut i = 1;
                while i < n && sheaf.push(batch[i], s.sheaf_cap) {
                    i += 1;
                }
                drop(guard);
                if i < n {
                    self.return_objects(pa, s, &batch[i..n]);
                }
                return Some(batch[0]);
            }
            let idx = self.new_slab(pa, s, gfp)?;
            let order = pa.mem_map().at(idx).order();
            // Objects are built (constructors run) before the slab is published, with no
            // lock held, as Linux does: a constructor may even allocate.
            slabs.init_slab(idx, cache::order_objects(order, s.size()));
            slabs.publish_slab(&mut s.node.lock(), idx);
        }
    }

    /// `allocate_slab`: pages for one more slab, the preferred order first (without retries
    /// or warnings), then the smallest order that holds an object. Returns the head's index.
    fn new_slab<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache, gfp: Gfp) -> Option<u32> {
        use crate::gfp::{__GFP_NORETRY, __GFP_NOWARN};
        let gfp = gfp.without(GFP_ZONEMASK).without(__GFP_ZERO) | s.gfp;
        let owner = s as *const KmemCache as usize;
        let min_order = crate::addr::get_order(s.size as usize);
        if s.order > min_order {
            let quiet = gfp | __GFP_NOWARN | __GFP_NORETRY;
            if let Some(idx) = pa.alloc_slab_pages(quiet, s.order, owner) {
                return Some(idx);
            }
        }
        pa.alloc_slab_pages(gfp, min_order.min(s.order), owner)
    }

    /// `kmem_cache_alloc_bulk`: fills `out` entirely, or allocates nothing and returns 0.
    pub fn kmem_cache_alloc_bulk<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        gfp: Gfp,
        out: &mut [*mut u8],
    ) -> usize {
        for i in 0..out.len() {
            match self.kmem_cache_alloc(pa, s, gfp) {
                Some(p) => out[i] = p.as_ptr(),
                None => {
                    for &p in &out[..i] {
                        // SAFETY: just allocated above from `s`, not handed out.
                        unsafe { self.free_to_cache(pa, s, p) };
                    }
                    out[..i].fill(core::ptr::null_mut());
                    return 0;
                }
            }
        }
        out.len()
    }

    // ------------------------------------------------------------------ freeing

    /// The common case of [`Self::slab_head`]: `p` lies in the first page of a slab (every
    /// order-0 slab), where the offset in the slab is the offset in the page. Returns the
    /// slab's head page, `p`'s offset and the slab's object count; `None` for anything else
    /// (a tail page of a bigger slab, or no slab at all).
    #[inline(always)]
    fn slab_head_fast<P: Platform>(
        pa: &PageAlloc<P>,
        p: usize,
    ) -> Option<(&crate::page_alloc::page::Page, usize, usize)> {
        let (page, offset) = pa.direct_page(p)?;
        // Only a slab's head has a non-zero object count in the top bits of its `head` word
        // (`node::slab_objects`): one load and one test.
        let objects = node::slab_objects(page);
        (objects != 0).then_some((page, offset, objects))
    }

    /// The head page of the slab holding address `p`, `p`'s offset in the slab and the
    /// slab's object count; `None` when `p` is not in a slab.
    #[inline(always)]
    fn slab_head<P: Platform>(
        pa: &PageAlloc<P>,
        p: usize,
    ) -> Option<(&crate::page_alloc::page::Page, usize, usize)> {
        Self::slab_head_fast(pa, p).or_else(|| Self::lookup_tail(pa, p))
    }

    /// The cache, slab and index of the object at `p`, if `p` starts an object of a slab.
    #[inline(always)]
    pub(crate) fn lookup<'a, P: Platform>(
        &self,
        pa: &'a PageAlloc<P>,
        p: usize,
    ) -> Option<ObjRef<'a>> {
        let (page, offset, objects) = Self::slab_head(pa, p)?;
        // SAFETY: a SLAB head's `private` is the cache that owns it (set before the slab was
        // published, cleared after it was unpublished), and a cache outlives its slabs.
        let cache = unsafe { &*(page.private() as *const KmemCache) };
        // Fallback slabs (smaller than the cache's order) hold fewer objects: check against
        // the slab's own count, as `check_valid_pointer` does.
        let index = cache.obj_index(offset, objects)?;
        Some(ObjRef {
            cache,
            slab: pa.mem_map().index_of(page),
            index,
        })
    }

    /// `slab_head` off its common case, out of line: `p` is not in a slab's head page; if it
    /// is in a tail page of a slab, the slab's head as `slab_head` returns it.
    #[cold]
    #[inline(never)]
    fn lookup_tail<P: Platform>(
        pa: &PageAlloc<P>,
        p: usize,
    ) -> Option<(&crate::page_alloc::page::Page, usize, usize)> {
        let (page, _) = pa.direct_page(p)?;
        if page.state() & pg::TAIL == 0 {
            return None;
        }
        let idx = page.head.load(Relaxed) as u32;
        let head = pa.mem_map().at(idx);
        let objects = node::slab_objects(head);
        if head.state() & pg::SLAB == 0 || objects == 0 {
            return None;
        }
        Some((head, p - pa.idx_address(idx), objects))
    }

    /// Frees an object of `s` (`kmem_cache_free`).
    ///
    /// Context: any; never sleeps. A pointer that is not an object of `s` (another cache's,
    /// not the start of an object, not from a slab) is reported and ignored; a naive double
    /// free (the same object freed twice in a row) is reported and ignored.
    ///
    /// # Safety
    ///
    /// If `obj` is a live object of `s`, nothing may use it after this call. For a cache with
    /// a constructor, the object must be back in its constructed state (Linux's contract).
    #[inline(always)]
    pub unsafe fn kmem_cache_free<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        obj: *mut u8,
    ) {
        // `cache_from_obj` first (the slab must be `s`'s), then `check_valid_pointer` with
        // `s`'s own geometry, which the caller already has at hand.
        if let Some((page, offset, objects)) = Self::slab_head_fast(pa, obj as usize) {
            if page.private() == s as *const KmemCache as usize
                && s.obj_index(offset, objects).is_some()
            {
                // SAFETY: `obj` is an object of `s` (checked above); the caller's contract.
                return unsafe { self.free_to_cache(pa, s, obj) };
            }
        }
        // SAFETY: the caller's contract.
        unsafe { self.kmem_cache_free_slow(pa, s, obj) }
    }

    /// `kmem_cache_free` off its common case, out of line (so the fast path keeps nothing
    /// alive for it): an object in a tail page of a bigger slab is freed; anything that is
    /// not an object of `s` is reported.
    ///
    /// # Safety
    ///
    /// As for [`Self::kmem_cache_free`].
    #[cold]
    #[inline(never)]
    unsafe fn kmem_cache_free_slow<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        obj: *mut u8,
    ) {
        match Self::slab_head(pa, obj as usize) {
            Some((page, offset, objects)) if page.private() == s as *const KmemCache as usize => {
                if s.obj_index(offset, objects).is_some() {
                    // SAFETY: `obj` is an object of `s` (checked above); the caller's contract.
                    unsafe { self.free_to_cache(pa, s, obj) }
                } else {
                    self.report_free(pa, s.name(), obj, format_args!("invalid object pointer"))
                }
            }
            Some((page, ..)) => {
                // SAFETY: a SLAB head's `private` is its cache, alive while it has slabs.
                let other = unsafe { &*(page.private() as *const KmemCache) };
                self.report_free(
                    pa,
                    s.name(),
                    obj,
                    format_args!(
                        "Wrong slab cache. {} but object is from {}",
                        s.name(),
                        other.name()
                    ),
                )
            }
            None => self.report_free(pa, s.name(), obj, format_args!("invalid object pointer")),
        }
    }

    /// Pushes an object known to belong to `s` onto this CPU's sheaf.
    ///
    /// # Safety
    ///
    /// `obj` starts an object of `s` that the caller owns.
    #[inline(always)]
    pub(crate) unsafe fn free_to_cache<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        obj: *mut u8,
    ) {
        // SAFETY: the closure only pushes onto this CPU's sheaf: no guard, no sleep.
        let pushed = unsafe {
            pa.platform()
                .this_cpu(|cpu, _| s.sheaf(cpu).push_checked(obj, s.sheaf_cap).is_ok())
        };
        if !pushed {
            self.free_slow(pa, s, obj);
        }
    }

    /// `kfree` of a slab object: finds the slab and its cache from the address, checks that
    /// `obj` starts an object, and frees it. Returns `false`, changing nothing, when `obj`
    /// is not an object of a slab.
    ///
    /// # Safety
    ///
    /// If `obj` is a live slab object, nothing may use it after this call.
    #[inline(always)]
    pub(crate) unsafe fn kfree_slab_object<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        obj: *mut u8,
    ) -> bool {
        let Some((page, offset, objects)) = Self::slab_head_fast(pa, obj as usize) else {
            // SAFETY: the caller's contract.
            return unsafe { self.kfree_slab_tail(pa, obj) };
        };
        // SAFETY: a SLAB head's `private` is the address of the cache that owns it (set
        // before the slab was published, cleared after it was unpublished), and a cache
        // outlives its slabs.
        let cache = unsafe { &*(page.private() as *const KmemCache) };
        if cache.obj_index(offset, objects).is_none() {
            return false;
        }
        // SAFETY: `obj` starts an object of `cache` (checked above); the caller's contract.
        unsafe { self.free_to_cache(pa, cache, obj) };
        true
    }

    /// `kfree_slab_object` off its common case, out of line: `obj` is not in a slab's first
    /// page; frees it if it starts an object in a tail page of a bigger slab.
    ///
    /// # Safety
    ///
    /// As for [`Self::kfree_slab_object`].
    #[cold]
    #[inline(never)]
    unsafe fn kfree_slab_tail<P: Platform>(&self, pa: &PageAlloc<P>, obj: *mut u8) -> bool {
        let Some(r) = self.lookup(pa, obj as usize) else {
            return false;
        };
        // SAFETY: `obj` starts an object of `r.cache` (`lookup`); the caller's contract.
        unsafe { self.free_to_cache(pa, r.cache, obj) };
        true
    }

    /// The sheaf refused `obj`: under a guard (perhaps on another CPU by now), reports a
    /// double free, or pushes it if there is room after all, or flushes the colder half of
    /// the full sheaf to the slabs (or parks it in the barn) and keeps `obj`.
    #[cold]
    #[inline(never)]
    fn free_slow<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache, obj: *mut u8) {
        let guard = pa.platform().cpu_guard();
        let sheaf = sheaf_of(s, &guard);
        match sheaf.push_checked(obj, s.sheaf_cap) {
            Ok(()) => return,
            Err(true) => {
                drop(guard);
                return self.report_free(pa, s.name(), obj, format_args!("double free detected"));
            }
            Err(false) => {}
        }
        // Park the full sheaf in the barn when it has room: another CPU will take it whole.
        {
            let mut full = s.barn.lock();
            if *full < sheaf::BARN_SHEAVES && sheaf.count() == s.sheaf_cap as usize {
                sheaf.move_all_to(s.barn_sheaf(*full));
                *full += 1;
                drop(full);
                let kept = sheaf.push(obj, s.sheaf_cap);
                debug_assert!(kept);
                return;
            }
        }
        let mut batch = [core::ptr::null_mut(); SHEAF_MAX];
        let half = (s.sheaf_cap as usize / 2).max(1);
        let n = sheaf.take_cold(&mut batch[..half]);
        let kept = sheaf.push(obj, s.sheaf_cap);
        drop(guard);
        let mut n = n;
        if !kept {
            batch[n] = obj;
            n += 1;
        }
        self.return_objects(pa, s, &batch[..n]);
    }

    /// Returns objects to their slabs, freeing slabs that become empty beyond `min_partial`.
    fn return_objects<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache, objs: &[*mut u8]) {
        self.return_objects_inner(pa, s, objs, false);
    }

    /// As `return_objects`; returns the pages of the slabs that were freed.
    fn return_objects_inner<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        objs: &[*mut u8],
        force_free_empty: bool,
    ) -> usize {
        let slabs = Slabs { pa, s };
        let mut to_free = [0u32; SHEAF_MAX];
        let mut nfree = 0;
        {
            let mut nl = s.node.lock();
            for &obj in objs {
                let Some(r) = self.lookup(pa, obj as usize) else {
                    continue;
                };
                if slabs.counters(r.slab).freelist == r.index {
                    drop(nl);
                    self.report_free(pa, s.name(), obj, format_args!("double free detected"));
                    nl = s.node.lock();
                    continue;
                }
                if slabs.return_object(&mut nl, r.slab, r.index, force_free_empty) {
                    to_free[nfree] = r.slab;
                    nfree += 1;
                }
            }
        }
        to_free[..nfree]
            .iter()
            .map(|&idx| self.discard_slab(pa, s, idx))
            .sum()
    }

    /// Frees an empty slab's pages (after a grace period for `SLAB_TYPESAFE_BY_RCU`);
    /// returns how many pages went back.
    fn discard_slab<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache, idx: u32) -> usize {
        if s.flags.contains(SlabFlags::TYPESAFE_BY_RCU) {
            pa.platform().synchronize_rcu();
        }
        let order = s.order_of_slab(pa, idx);
        pa.free_slab_pages(idx, order);
        1 << order
    }

    #[cold]
    fn report_zero_with_ctor<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache) {
        pa.platform().log(
            LogLevel::Warning,
            format_args!(
                "WARNING: kmem_cache_alloc({}): __GFP_ZERO on a cache with a constructor ignored",
                s.name()
            ),
        );
    }

    #[cold]
    fn report_free<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        cache: &str,
        obj: *mut u8,
        why: core::fmt::Arguments<'_>,
    ) {
        let p = pa.platform();
        let t = p.current_task();
        p.log(
            LogLevel::Err,
            format_args!("BUG {cache} (Not tainted): kmem_cache_free: {why}"),
        );
        p.log(
            LogLevel::Err,
            format_args!("INFO: Object {obj:p} freed by {} pid {}", t.comm(), t.pid),
        );
        pa.count_bad_free();
    }

    // ------------------------------------------------------------------ shrink, destroy

    /// Moves every CPU's sheaf of `s` back into the slabs.
    /// Returns the pages of the slabs freed on the way.
    fn flush_all_sheaves<P: Platform>(
        &self,
        pa: &PageAlloc<P>,
        s: &KmemCache,
        free_empty: bool,
    ) -> usize {
        let mut pages = 0;
        for cpu in 0..pa.nr_cpus() {
            let mut batch = [core::ptr::null_mut(); SHEAF_MAX];
            let guard = pa.platform().lock_cpu(cpu);
            let n = s.sheaf(cpu).take_cold(&mut batch);
            drop(guard);
            pages += self.return_objects_inner(pa, s, &batch[..n], free_empty);
        }
        loop {
            let mut batch = [core::ptr::null_mut(); SHEAF_MAX];
            let n = {
                let mut full = s.barn.lock();
                if *full == 0 {
                    break;
                }
                *full -= 1;
                s.barn_sheaf(*full).take_cold(&mut batch)
            };
            pages += self.return_objects_inner(pa, s, &batch[..n], free_empty);
        }
        pages
    }

    /// Gives every free slab of `s` back to the page allocator (`kmem_cache_shrink`),
    /// after emptying the CPUs' sheaves. Returns the pages freed. Context: may wait for
    /// other CPUs' sections; never sleeps otherwise.
    pub fn kmem_cache_shrink<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache) -> usize {
        let mut pages = self.flush_all_sheaves(pa, s, true);
        let slabs = Slabs { pa, s };
        loop {
            let mut empty = [0u32; SHEAF_MAX];
            let n = {
                let mut nl = s.node.lock();
                let n = slabs.empty_partial_slabs(&nl, &mut empty);
                for &idx in &empty[..n] {
                    slabs.unlink_empty(&mut nl, idx);
                }
                n
            };
            if n == 0 {
                break;
            }
            for &idx in &empty[..n] {
                pages += self.discard_slab(pa, s, idx);
            }
        }
        pages
    }

    /// Destroys a cache (`kmem_cache_destroy`). A merged cache only loses one creator.
    ///
    /// If objects are still allocated, reports "Objects remaining in NAME on
    /// __kmem_cache_shutdown()" with the objects, frees nothing still in use and keeps the
    /// cache (so the objects can still be freed later); returns `false` then.
    ///
    /// # Safety
    ///
    /// When this returns `true` and the cache had no other creator, `s` is freed: the caller
    /// must not use it again.
    pub unsafe fn kmem_cache_destroy<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache) -> bool {
        {
            let _list = self.caches.lock();
            let r = s.refcount.load(Relaxed);
            if r > 1 {
                s.refcount.store(r - 1, Relaxed);
                return true;
            }
            // Dying: `find_mergeable` skips caches with no creator, so no create can merge
            // into this one while it shuts down.
            s.refcount.store(0, Relaxed);
        }
        self.kmem_cache_shrink(pa, s);
        if s.nr_slabs() != 0 {
            self.report_leftovers(pa, s);
            let _list = self.caches.lock();
            s.refcount.store(1, Relaxed);
            return false;
        }
        {
            let mut list = self.caches.lock();
            let me = s as *const KmemCache as *mut KmemCache;
            if list.0 == me {
                list.0 = s.next.load(Relaxed);
            } else {
                let mut p = list.0;
                while !p.is_null() {
                    // SAFETY: listed caches are alive under the list lock.
                    let c = unsafe { &*p };
                    if c.next.load(Relaxed) == me {
                        c.next.store(s.next.load(Relaxed), Relaxed);
                        break;
                    }
                    p = c.next.load(Relaxed);
                }
            }
            s.refcount.store(0, Relaxed);
        }
        let va = crate::addr::VirtAddr(s as *const KmemCache as usize);
        let bytes = s.alloc_size;
        // SAFETY: the cache is unlisted, has no slabs, and the caller promises not to use it;
        // its memory came from `alloc_pages_exact(bytes)` in `kmem_cache_create_args`.
        unsafe { pa.free_pages_exact(va, bytes) };
        true
    }

    #[cold]
    fn report_leftovers<P: Platform>(&self, pa: &PageAlloc<P>, s: &KmemCache) {
        let p = pa.platform();
        p.log(
            LogLevel::Err,
            format_args!(
                "BUG {} (Not tainted): Objects remaining in {} on __kmem_cache_shutdown()",
                s.name(),
                s.name()
            ),
        );
        let slabs = Slabs { pa, s };
        let nl = s.node.lock();
        let mut listed = 0;
        slabs.for_each_slab(&nl, |idx, c| {
            let base = slabs.base(idx);
            p.log(
                LogLevel::Err,
                format_args!(
                    "Slab {:#x} objects={} used={} fp={:#x}",
                    base, c.objects, c.inuse, c.freelist
                ),
            );
            for i in 0..c.objects {
                if listed < 64 && !slabs.is_on_free_chain(idx, i) {
                    p.log(
                        LogLevel::Err,
                        format_args!(
                            "Object {:#x} @offset={}",
                            base + i as usize * s.size as usize,
                            i as usize * s.size as usize
                        ),
                    );
                    listed += 1;
                }
            }
        });
        drop(nl);
        p.log(
            LogLevel::Warning,
            format_args!(
                "kmem_cache_destroy {}: Slab cache still has objects",
                s.name()
            ),
        );
    }

    /// Checks every cache's slabs against its counters (for tests).
    pub fn validate<P: Platform>(&self, pa: &PageAlloc<P>) -> Result<(), &'static str> {
        let mut res = Ok(());
        self.for_each_cache(|s| {
            if res.is_ok() {
                res = Slabs { pa, s }.validate(&s.node.lock());
            }
        });
        res
    }

    /// Pages held by slabs: (reclaimable, unreclaimable), for `/proc/meminfo`.
    pub fn slab_pages(&self) -> (usize, usize) {
        let (mut r, mut u) = (0, 0);
        self.for_each_cache(|c| {
            let pages = c.nr_slabs() << c.order;
            if c.flags.contains(SlabFlags::RECLAIM_ACCOUNT) {
                r += pages;
            } else {
                u += pages;
            }
        });
        (r, u)
    }
}

impl KmemCache {
    /// This CPU's sheaf. The caller holds `cpu`'s guard (or reads racily for reports).
    #[inline(always)]
    pub(crate) fn sheaf(&self, cpu: usize) -> &Sheaf {
        debug_assert!(cpu < self.nr_cpus as usize);
        // SAFETY: `cpu` comes from a guard, below `nr_cpu_ids`, the CPU sheaves' count.
        unsafe { self.sheaf_at(cpu) }
    }

    /// Sheaf `i` of the barn. The caller holds the barn lock.
    #[inline]
    pub(crate) fn barn_sheaf(&self, i: usize) -> &Sheaf {
        assert!(i < sheaf::BARN_SHEAVES);
        // SAFETY: the barn's `BARN_SHEAVES` sheaves follow the `nr_cpus` CPU sheaves.
        unsafe { self.sheaf_at(self.nr_cpus as usize + i) }
    }

    /// Sheaf `i` of the cache's allocation: `SHEAVES_OFFSET` bytes after the struct, the
    /// CPUs' sheaves and then the barn's. Computed from the cache's address rather than kept
    /// in a field, so the fast paths do not wait for a load before they can reach their sheaf
    /// (in `kfree`, the cache's address itself comes from a load of the slab's descriptor),
    /// and as one integer sum, so the compiler folds the constant part into the displacement
    /// of every slot access. Direct-map addresses are handled as integers throughout the
    /// core: the cache's allocation, like every direct-map page, is reached by address.
    ///
    /// # Safety
    ///
    /// `i < nr_cpus + BARN_SHEAVES`: the cache was built with that many sheaves.
    #[inline(always)]
    unsafe fn sheaf_at(&self, i: usize) -> &Sheaf {
        let addr = self as *const KmemCache as usize + SHEAVES_OFFSET + i * size_of::<Sheaf>();
        // SAFETY: sheaf `i` lies in the cache's allocation (the caller's contract) and lives
        // as long as the cache.
        unsafe { &*(addr as *const Sheaf) }
    }

    /// Objects sitting in CPU sheaves, summed (racy; for reports).
    pub fn sheaf_objects(&self, nr_cpus: usize) -> usize {
        (0..nr_cpus).map(|c| self.sheaf(c).count()).sum()
    }

    /// Objects really in use: in the slabs' counts but in no sheaf and not in the barn
    /// (racy; for reports and tests).
    pub fn objects_in_use(&self, nr_cpus: usize) -> usize {
        let cached = self.free_objects() + self.sheaf_objects(nr_cpus) + self.barn_objects();
        self.total_objects().saturating_sub(cached)
    }

    /// Objects parked in the barn's full sheaves.
    pub fn barn_objects(&self) -> usize {
        let full = *self.barn.lock();
        (0..full).map(|i| self.barn_sheaf(i).count()).sum()
    }

    fn order_of_slab<P: Platform>(&self, pa: &PageAlloc<P>, idx: u32) -> u32 {
        pa.mem_map().at(idx).order()
    }
}

#[inline(always)]
fn sheaf_of<'a, G: CpuGuard>(s: &'a KmemCache, guard: &G) -> &'a Sheaf {
    s.sheaf(guard.cpu())
}

/// The page flags a cache's slabs are allocated with.
fn cache_gfp(flags: SlabFlags) -> Gfp {
    let mut gfp = Gfp::NONE;
    if flags.contains(SlabFlags::CACHE_DMA) {
        gfp |= GFP_DMA;
    }
    if flags.contains(SlabFlags::CACHE_DMA32) {
        gfp |= __GFP_DMA32;
    }
    if flags.contains(SlabFlags::RECLAIM_ACCOUNT) {
        gfp |= __GFP_RECLAIMABLE;
    }
    gfp
}

const _: () = assert!(PAGE_SIZE >= core::mem::size_of::<KmemCache>());
