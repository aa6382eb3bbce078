//! Memory pools (`mm/mempool.c`): allocations guaranteed to make progress under memory
//! pressure.
//!
//! A [`Mempool`] keeps a reserve of `min_nr` preallocated elements of one kind. An allocation
//! first asks the element's allocator ([`PoolSource`]) with a gentle mask (no direct reclaim,
//! no I/O, no emergency reserves, no retry, no warning); when that fails it takes an element
//! from the reserve; when the reserve is empty too, a caller that may sleep retries once with
//! its full mask and then sleeps until another task returns an element to the pool (or five
//! seconds pass) and starts over. A `GFP_KERNEL` [`Mempool::mempool_alloc`] therefore never
//! fails, provided elements are eventually freed; a non-sleeping one fails only when both the
//! allocator and the reserve are exhausted.
//!
//! [`Mempool::mempool_free`] refills the reserve first (waking sleepers) and hands the
//! element back to its allocator only when the reserve is full.
//!
//! The reserve is a fixed array of element pointers whose storage comes from `kmalloc_array`
//! (the core has no heap), guarded by a spinlock; sleepers wait on a futex-like word bumped
//! by every refill.
//!
//! Stock element sources mirror Linux's helpers: [`SlabSource`] (`mempool_alloc_slab`),
//! [`KmallocSource`] (`mempool_kmalloc`) and [`PageSource`] (`mempool_alloc_pages`, whose
//! elements are the pages' direct-map addresses).

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::addr::VirtAddr;
use crate::gfp::{
    __GFP_DIRECT_RECLAIM, __GFP_HIGHMEM, __GFP_IO, __GFP_NOMEMALLOC, __GFP_NORETRY, __GFP_NOWARN,
    __GFP_ZERO, GFP_KERNEL, Gfp, gfpflags_allow_blocking,
};
use crate::kmem::Kmem;
use crate::platform::{LogLevel, Platform};
use crate::slab::KmemCache;
use crate::sync::SpinLock;

/// How long a sleeping [`Mempool::mempool_alloc`] waits for a freed element before it tries
/// the allocator again (`io_schedule_timeout(5*HZ)`).
pub const MEMPOOL_WAIT_NS: u64 = 5_000_000_000;

/// Where a pool's elements come from and go back to (`mempool_alloc_t` / `mempool_free_t`
/// with their `pool_data`).
pub trait PoolSource<P: Platform> {
    /// Allocates one element with `gfp`; `None` on failure. Must not sleep unless `gfp`
    /// allows it.
    fn alloc(&self, kmem: &Kmem<P>, gfp: Gfp) -> Option<NonNull<u8>>;

    /// Gives `e` back to the allocator.
    ///
    /// # Safety
    ///
    /// `e` was returned by [`PoolSource::alloc`] of this source over the same `kmem`, is not
    /// used after this call and is freed once.
    unsafe fn free(&self, kmem: &Kmem<P>, e: NonNull<u8>);

    /// Whether a pool may be built over this source; a refusal is reported by the source.
    /// The default admits every source.
    fn admit(&self, kmem: &Kmem<P>) -> bool {
        let _ = kmem;
        true
    }
}

/// Elements are objects of a slab cache (`mempool_alloc_slab` / `mempool_free_slab`).
#[derive(Clone, Copy)]
pub struct SlabSource<'c>(pub &'c KmemCache);

impl<P: Platform> PoolSource<P> for SlabSource<'_> {
    fn alloc(&self, kmem: &Kmem<P>, gfp: Gfp) -> Option<NonNull<u8>> {
        kmem.kmem_cache_alloc(self.0, gfp)
    }

    /// A cache with a constructor is refused, with a warning (`mempool_alloc_slab`'s
    /// `VM_BUG_ON(mem->ctor)`): elements returned to the reserve are not reconstructed.
    fn admit(&self, kmem: &Kmem<P>) -> bool {
        if self.0.ctor.is_none() {
            return true;
        }
        kmem.platform().log(
            LogLevel::Warning,
            format_args!(
                "WARNING: mm/mempool.c: mempool_create_slab_pool: cache {} has a constructor",
                self.0.name()
            ),
        );
        false
    }

    unsafe fn free(&self, kmem: &Kmem<P>, e: NonNull<u8>) {
        // SAFETY: `e` is a live object of this cache (the caller's contract).
        unsafe { kmem.kmem_cache_free(self.0, e.as_ptr()) }
    }
}

/// Elements are `kmalloc` allocations of a fixed size (`mempool_kmalloc` / `mempool_kfree`).
#[derive(Clone, Copy, Debug)]
pub struct KmallocSource(pub usize);

impl<P: Platform> PoolSource<P> for KmallocSource {
    fn alloc(&self, kmem: &Kmem<P>, gfp: Gfp) -> Option<NonNull<u8>> {
        kmem.kmalloc(self.0, gfp)
    }

    unsafe fn free(&self, kmem: &Kmem<P>, e: NonNull<u8>) {
        // SAFETY: `e` is a live kmalloc allocation (the caller's contract).
        unsafe { kmem.kfree(e.as_ptr()) }
    }
}

/// Elements are blocks of `1 << order` pages, named by their direct-map address
/// (`mempool_alloc_pages` / `mempool_free_pages`). `__GFP_HIGHMEM` is never passed down: every
/// element must have an address.
#[derive(Clone, Copy, Debug)]
pub struct PageSource(pub u32);

impl<P: Platform> PoolSource<P> for PageSource {
    fn alloc(&self, kmem: &Kmem<P>, gfp: Gfp) -> Option<NonNull<u8>> {
        let page = kmem.alloc_pages(gfp.without(__GFP_HIGHMEM), self.0)?;
        match kmem
            .page_address(page)
            .and_then(|a| NonNull::new(a.as_ptr()))
        {
            Some(e) => Some(e),
            None => {
                // SAFETY: just allocated at this order, never handed out.
                unsafe { kmem.__free_pages(page, self.0) };
                None
            }
        }
    }

    unsafe fn free(&self, kmem: &Kmem<P>, e: NonNull<u8>) {
        let page = kmem
            .virt_to_page(VirtAddr(e.as_ptr() as usize))
            .expect("mempool: page element outside the direct map");
        // SAFETY: `e` names a live block of this order (the caller's contract).
        unsafe { kmem.__free_pages(page, self.0) }
    }
}

/// Why [`Mempool::mempool_resize`] failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MempoolError {
    /// `new_min_nr` was 0 (`-EINVAL`; Linux `BUG_ON`s).
    Inval,
    /// The larger reserve array could not be allocated (`-ENOMEM`).
    NoMem,
}

impl fmt::Display for MempoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MempoolError::Inval => "invalid pool size",
            MempoolError::NoMem => "out of memory",
        })
    }
}

/// The reserve: `curr_nr` elements in `elements[..curr_nr]`, room for `cap`.
struct Reserve {
    elements: *mut *mut u8,
    cap: usize,
    min_nr: usize,
    curr_nr: usize,
}

impl Reserve {
    /// `add_element`.
    fn add(&mut self, e: *mut u8) {
        assert!(self.curr_nr < self.cap, "mempool: reserve overflow");
        // SAFETY: `elements` holds `cap` slots and `curr_nr < cap`.
        unsafe { self.elements.add(self.curr_nr).write(e) };
        self.curr_nr += 1;
    }

    /// `remove_element`: the caller checked `curr_nr > 0`.
    fn remove(&mut self) -> *mut u8 {
        assert!(self.curr_nr > 0, "mempool: reserve underflow");
        self.curr_nr -= 1;
        // SAFETY: slots `..curr_nr + 1` were written by `add`.
        unsafe { self.elements.add(self.curr_nr).read() }
    }
}

/// A memory pool (`mempool_t`): a reserve of `min_nr` elements from `S` over one [`Kmem`].
///
/// Shared by reference between threads; [`Mempool::mempool_destroy`] or dropping it frees
/// the reserve.
pub struct Mempool<'k, P: Platform, S: PoolSource<P>> {
    kmem: &'k Kmem<P>,
    source: S,
    lock: SpinLock<Reserve>,
    /// Bumped on every refill; sleepers in `mempool_alloc` wait on it (`pool->wait`).
    wait: AtomicU32,
    /// The `__GFP_ZERO` misuse was reported.
    warned_zero: AtomicBool,
}

// SAFETY: the reserve's raw pointers are owned by the pool and reached only under `lock`;
// elements are plain memory handed between threads as with any allocator. `Kmem` is shared
// by reference (it is Sync when `P` is), and the source is required to be Send/Sync.
unsafe impl<P: Platform, S: PoolSource<P> + Send> Send for Mempool<'_, P, S> where Kmem<P>: Sync {}
// SAFETY: as for `Send`: every mutable state is behind the spinlock or atomic.
unsafe impl<P: Platform, S: PoolSource<P> + Sync> Sync for Mempool<'_, P, S> where Kmem<P>: Sync {}

/// A pool of slab objects.
pub type SlabPool<'k, P> = Mempool<'k, P, SlabSource<'k>>;
/// A pool of fixed-size kmalloc allocations.
pub type KmallocPool<'k, P> = Mempool<'k, P, KmallocSource>;
/// A pool of page blocks.
pub type PagePool<'k, P> = Mempool<'k, P, PageSource>;

/// `mempool_create`: a pool of `min_nr` preallocated elements from `source`, all or nothing
/// (allocated with `GFP_KERNEL`).
///
/// Context: process context, may sleep.
pub fn mempool_create<P: Platform, S: PoolSource<P>>(
    kmem: &Kmem<P>,
    min_nr: usize,
    source: S,
) -> Option<Mempool<'_, P, S>> {
    Mempool::create(kmem, min_nr, source, GFP_KERNEL)
}

/// `mempool_create_slab_pool`. Refused (with a warning) for a cache with a constructor, as
/// is any pool over such a cache ([`SlabSource`]'s `admit`): elements returned to the
/// reserve are not reconstructed.
pub fn mempool_create_slab_pool<'k, P: Platform>(
    kmem: &'k Kmem<P>,
    min_nr: usize,
    cache: &'k KmemCache,
) -> Option<SlabPool<'k, P>> {
    mempool_create(kmem, min_nr, SlabSource(cache))
}

/// `mempool_create_kmalloc_pool`: elements of `size` bytes from kmalloc.
pub fn mempool_create_kmalloc_pool<P: Platform>(
    kmem: &Kmem<P>,
    min_nr: usize,
    size: usize,
) -> Option<KmallocPool<'_, P>> {
    mempool_create(kmem, min_nr, KmallocSource(size))
}

/// `mempool_create_page_pool`: elements of `1 << order` pages (their direct-map address).
pub fn mempool_create_page_pool<P: Platform>(
    kmem: &Kmem<P>,
    min_nr: usize,
    order: u32,
) -> Option<PagePool<'_, P>> {
    mempool_create(kmem, min_nr, PageSource(order))
}

impl<'k, P: Platform, S: PoolSource<P>> Mempool<'k, P, S> {
    /// `mempool_create_node` with an explicit mask for the reserve array and the initial
    /// elements.
    pub fn create(kmem: &'k Kmem<P>, min_nr: usize, source: S, gfp: Gfp) -> Option<Self> {
        if !source.admit(kmem) {
            return None;
        }
        // Room for at least one element: a pool with `min_nr == 0` still parks a freed
        // element for a sleeper (see `mempool_free`).
        let cap = min_nr.max(1);
        let arr = kmem.kmalloc_array(cap, core::mem::size_of::<*mut u8>(), gfp)?;
        let pool = Mempool {
            kmem,
            source,
            lock: SpinLock::new(Reserve {
                elements: arr.as_ptr().cast(),
                cap,
                min_nr,
                curr_nr: 0,
            }),
            wait: AtomicU32::new(0),
            warned_zero: AtomicBool::new(false),
        };
        // First fill: all or nothing (dropping `pool` frees what it got).
        while pool.lock.lock().curr_nr < min_nr {
            let Some(e) = pool.source.alloc(kmem, gfp) else {
                // `mempool_exit`: not a short pool with elements outstanding, so no report.
                let mut r = pool.lock.lock();
                r.min_nr = r.curr_nr;
                return None;
            };
            pool.lock.lock().add(e.as_ptr());
        }
        Some(pool)
    }

    /// The machine the pool allocates from.
    pub fn kmem(&self) -> &'k Kmem<P> {
        self.kmem
    }

    /// The element source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// `pool->min_nr`: the reserve's target size.
    pub fn min_nr(&self) -> usize {
        self.lock.lock().min_nr
    }

    /// `pool->curr_nr`: elements in the reserve now.
    pub fn curr_nr(&self) -> usize {
        self.lock.lock().curr_nr
    }

    /// `mempool_is_saturated`: the reserve is full.
    pub fn is_saturated(&self) -> bool {
        let r = self.lock.lock();
        r.curr_nr >= r.min_nr
    }

    /// `mempool_alloc`: an element from the allocator, else from the reserve; a caller that
    /// may sleep (`__GFP_DIRECT_RECLAIM`) then retries with its full mask and finally sleeps
    /// until an element is freed, so it never gets `None`. Others get `None` once both are
    /// exhausted.
    ///
    /// Context: may sleep if `gfp` allows blocking.
    pub fn mempool_alloc(&self, gfp: Gfp) -> Option<NonNull<u8>> {
        if gfp.contains(__GFP_ZERO) {
            self.warn_zero();
        }
        let gfp = gfp | __GFP_NOMEMALLOC | __GFP_NORETRY | __GFP_NOWARN;
        let mut gfp_temp = gfp.without(__GFP_DIRECT_RECLAIM | __GFP_IO);
        let pf = self.kmem.platform();
        loop {
            if let Some(e) = self.source.alloc(self.kmem, gfp_temp) {
                return Some(e);
            }
            let seen;
            {
                let mut r = self.lock.lock();
                if r.curr_nr > 0 {
                    return NonNull::new(r.remove());
                }
                // The first round used a mask without direct reclaim or I/O: with the
                // reserve empty, retry at once with the caller's own.
                if gfp_temp != gfp {
                    drop(r);
                    gfp_temp = gfp;
                    continue;
                }
                // Must not sleep without __GFP_DIRECT_RECLAIM (nor in atomic context, where
                // the page allocator has already reported the bad mask).
                if !gfpflags_allow_blocking(gfp) || pf.in_atomic() {
                    return None;
                }
                // `prepare_to_wait` under the lock: a refill after this bumps the word.
                seen = self.wait.load(Ordering::Acquire);
            }
            pf.wait(&self.wait, seen, MEMPOOL_WAIT_NS);
        }
    }

    /// `VM_WARN_ON_ONCE(gfp_mask & __GFP_ZERO)`: an element from the reserve is not zeroed,
    /// so asking a pool for zeroed memory is a caller bug. Reported once per pool; the
    /// allocation goes on as in Linux.
    #[cold]
    fn warn_zero(&self) {
        if !self.warned_zero.swap(true, Ordering::Relaxed) {
            self.kmem.platform().log(
                LogLevel::Warning,
                format_args!(
                    "WARNING: mempool_alloc with __GFP_ZERO: elements from the reserve are not zeroed"
                ),
            );
        }
    }

    /// `mempool_free`: refills the reserve with `e` if it is below `min_nr` (waking
    /// sleepers), else gives `e` back to the allocator.
    ///
    /// # Safety
    ///
    /// `e` came from this pool's [`Mempool::mempool_alloc`] (or its source over the same
    /// machine), is freed once and not used afterwards.
    pub unsafe fn mempool_free(&self, e: NonNull<u8>) {
        {
            let mut r = self.lock.lock();
            // `min_nr == 0`: waiters could never be woken through the reserve, so an empty
            // reserve takes one element anyway.
            if r.curr_nr < r.min_nr || (r.min_nr == 0 && r.curr_nr == 0) {
                r.add(e.as_ptr());
                self.wait.fetch_add(1, Ordering::Release);
                drop(r);
                self.kmem.platform().wake_all(&self.wait);
                return;
            }
        }
        // SAFETY: `e` is one of this source's live elements (the caller's contract).
        unsafe { self.source.free(self.kmem, e) }
    }

    /// `mempool_resize`: changes `min_nr`. Shrinking frees surplus reserve elements at once;
    /// growing enlarges the reserve array and fills it with `GFP_KERNEL` allocations (an
    /// element that cannot be allocated now is left for `mempool_free` to supply, as Linux).
    /// Elements may be outstanding.
    ///
    /// Context: process context, may sleep.
    pub fn mempool_resize(&self, new_min_nr: usize) -> Result<(), MempoolError> {
        if new_min_nr == 0 {
            return Err(MempoolError::Inval);
        }
        let mut r = self.lock.lock();
        if new_min_nr <= r.min_nr {
            while new_min_nr < r.curr_nr {
                let e = r.remove();
                drop(r);
                if let Some(e) = NonNull::new(e) {
                    // SAFETY: a reserve element, owned by the pool and now by no one else.
                    unsafe { self.source.free(self.kmem, e) };
                }
                r = self.lock.lock();
            }
            r.min_nr = new_min_nr;
            return Ok(());
        }
        if new_min_nr > r.cap {
            drop(r);
            let arr = self
                .kmem
                .kmalloc_array(new_min_nr, core::mem::size_of::<*mut u8>(), GFP_KERNEL)
                .ok_or(MempoolError::NoMem)?;
            let new: *mut *mut u8 = arr.as_ptr().cast();
            r = self.lock.lock();
            let old = if new_min_nr <= r.cap {
                // Raced with another resize that made room already.
                new
            } else {
                // SAFETY: `new` has `new_min_nr > cap >= curr_nr` slots; the old array holds
                // `curr_nr` elements; the two do not overlap.
                unsafe { core::ptr::copy_nonoverlapping(r.elements, new, r.curr_nr) };
                let old = r.elements;
                r.elements = new;
                r.cap = new_min_nr;
                old
            };
            if new_min_nr > r.min_nr {
                r.min_nr = new_min_nr;
            }
            drop(r);
            // SAFETY: `old` is a kmalloc'ed array no longer referenced by the pool.
            unsafe { self.kmem.kfree(old.cast()) };
        } else {
            r.min_nr = new_min_nr;
            drop(r);
        }
        // Fill up to the new minimum.
        loop {
            if self.is_saturated() {
                return Ok(());
            }
            let Some(e) = self.source.alloc(self.kmem, GFP_KERNEL) else {
                return Ok(());
            };
            let mut r = self.lock.lock();
            if r.curr_nr < r.min_nr {
                r.add(e.as_ptr());
                self.wait.fetch_add(1, Ordering::Release);
                drop(r);
                self.kmem.platform().wake_all(&self.wait);
            } else {
                drop(r);
                // SAFETY: just allocated from the source, raced: give it back.
                unsafe { self.source.free(self.kmem, e) };
                return Ok(());
            }
        }
    }

    /// `mempool_destroy`: frees the reserve. Elements still outstanding are the caller's;
    /// a pool that is not full is reported.
    pub fn mempool_destroy(self) {
        drop(self)
    }
}

impl<P: Platform, S: PoolSource<P>> Drop for Mempool<'_, P, S> {
    fn drop(&mut self) {
        let r = self.lock.get_mut();
        // Linux BUG()s on a pool that is not full (`mempool_destroy` of old); here it is
        // reported and the reserve freed: outstanding elements stay the caller's.
        if r.curr_nr < r.min_nr {
            self.kmem.platform().log(
                LogLevel::Err,
                format_args!(
                    "mempool_destroy: pool not full ({} of {} elements): elements outstanding or never refilled",
                    r.curr_nr, r.min_nr
                ),
            );
        }
        while r.curr_nr > 0 {
            let e = r.remove();
            if let Some(e) = NonNull::new(e) {
                // SAFETY: a reserve element, owned by the pool alone.
                unsafe { self.source.free(self.kmem, e) };
            }
        }
        // SAFETY: the array was kmalloc'ed by `create` or `mempool_resize`, and is ours.
        unsafe { self.kmem.kfree(r.elements.cast()) };
    }
}
