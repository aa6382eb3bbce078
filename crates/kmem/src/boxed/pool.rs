//! Typed memory pools: `KMempool<T>` and `PoolBox`, whose values give their element back to
//! the pool when dropped.
//!
//! A [`KMempool<T>`](KMempool) is a [`Mempool`] whose elements are memory for one `T` each,
//! from one of two backings chosen at creation:
//!
//! * [`KMempool::new`]: kmalloc blocks of [`kmalloc_request`]`(size_of::<T>(),
//!   align_of::<T>())` bytes (`mempool_create_kmalloc_pool`), shared with every other kmalloc
//!   user of that size class;
//! * [`KMempool::new_slab`]: objects of a slab cache created for `T` and owned by the pool
//!   (`mempool_create_slab_pool` over `KMEM_CACHE(T)`), destroyed after the pool. The cache
//!   has no constructor: elements parked in the reserve are not reconstructed, so the typed
//!   layer writes every value itself.
//!
//! [`KMempool::alloc`] takes the value, gets an element with the pool's algorithm and moves
//! the value in. It keeps the raw pool's promise: with a mask that may sleep (`GFP_KERNEL`)
//! it does not fail but waits for an element to be freed; a non-sleeping mask (`GFP_ATOMIC`,
//! `GFP_NOWAIT`) fails once the allocator and the reserve are both exhausted, and the error
//! ([`PoolAllocError`]) hands the value back untouched. As with the raw pool, a task that
//! holds an element and sleeps for another from the same pool can deadlock once every
//! element is held by such tasks.
//!
//! A [`PoolBox`] owns its value and borrows its pool, so a pool cannot be destroyed while
//! one of its values is alive. Dropping the box drops the value in place, exactly once, and
//! returns the element with `mempool_free` (refilling the reserve first), also when the
//! value's destructor unwinds. The reserve holds bare memory, never values: destroying the
//! pool drops nothing.
//!
//! # Size and alignment
//!
//! Both backings serve the same requests: a zero-sized `T` still takes a one-byte element
//! (so the reserve guarantees progress as for any other type); a `T` aligned above
//! [`KMALLOC_MIN_ALIGN`] gets a power-of-two kmalloc block at least as large as its
//! alignment, or a slab cache created with that alignment. Creation refuses, with
//! [`AllocError`] and before allocating anything, a `T` for which that request exceeds
//! [`KMALLOC_MAX_SIZE`]: no kmalloc block or slab would be large or aligned enough.
//! Creation is all or nothing: if the `min_nr` preallocated elements cannot all be had, what
//! was allocated (and a slab backing's cache) is given back.

use core::fmt;
use core::marker::PhantomData;
use core::mem::{self, ManuallyDrop};
use core::ptr::{self, NonNull};

use super::*;
use crate::Kmem;
use crate::gfp::{GFP_KERNEL, Gfp};
use crate::kmalloc::KMALLOC_MAX_SIZE;
use crate::mempool::{Mempool, MempoolError, PoolSource};
use crate::platform::Platform;
use crate::slab::{self, SlabFlags};

// ================================================================== element source

/// Where a typed pool's elements come from.
#[derive(Clone, Copy)]
enum TypedSource {
    /// kmalloc blocks of this many bytes.
    Kmalloc(usize),
    /// Objects of a cache owned by the [`KMempool`], live until the pool is dropped.
    Slab(NonNull<slab::KmemCache>),
}

// SAFETY: a raw cache is `Send + Sync` and may be used from any CPU; the pointer is only
// dereferenced while the owning `KMempool` keeps the cache alive.
unsafe impl Send for TypedSource {}
// SAFETY: as for `Send`; the source itself is never mutated.
unsafe impl Sync for TypedSource {}

impl<P: Platform> PoolSource<P> for TypedSource {
    fn alloc(&self, kmem: &Kmem<P>, gfp: Gfp) -> Option<NonNull<u8>> {
        match *self {
            TypedSource::Kmalloc(size) => kmem.kmalloc(size, gfp),
            // SAFETY: the cache outlives the pool that calls its source (`KMempool` drops
            // the pool before destroying the cache).
            TypedSource::Slab(c) => kmem.kmem_cache_alloc(unsafe { c.as_ref() }, gfp),
        }
    }

    unsafe fn free(&self, kmem: &Kmem<P>, e: NonNull<u8>) {
        match *self {
            // SAFETY: `e` is a live kmalloc block from `alloc` (the caller's contract).
            TypedSource::Kmalloc(_) => unsafe { kmem.kfree(e.as_ptr()) },
            // SAFETY: `e` is a live object of the cache, which is alive (see `alloc`).
            TypedSource::Slab(c) => unsafe { kmem.kmem_cache_free(c.as_ref(), e.as_ptr()) },
        }
    }
}

// ================================================================== KMempool

/// A memory pool of `T`s: a reserve of `min_nr` elements, each memory for one `T`, from
/// kmalloc ([`KMempool::new`]) or from a slab cache of its own ([`KMempool::new_slab`]).
///
/// [`KMempool::alloc`] moves a value into an element and returns a [`PoolBox`], which drops
/// the value and returns the element when it goes. A sleeping (`GFP_KERNEL`) allocation
/// never fails, it waits for an element; a non-sleeping one fails when the allocator and the
/// reserve are both exhausted, and hands the value back. Creation refuses a `T` whose size
/// or alignment no kmalloc block or slab object can serve (above `KMALLOC_MAX_SIZE`), and
/// fails whole if the reserve cannot be filled.
///
/// Shared by reference between threads (it is `Sync` whatever `T`: the reserve holds bare
/// memory, and each value stays with the [`PoolBox`] that owns it).
///
/// # Invariants
///
/// `pool`'s elements are blocks of at least `size_of::<T>()` bytes aligned for `T`; its
/// source is `TypedSource::Slab` exactly when the pool owns a cache created for `T`,
/// destroyed in `drop` after `pool`. `pool` is dropped only there.
pub struct KMempool<'k, T, P: Platform> {
    pool: ManuallyDrop<Mempool<'k, P, TypedSource>>,
    _elements: PhantomData<fn() -> T>,
}

impl<'k, T, P: Platform> KMempool<'k, T, P> {
    /// The bytes an element takes: what kmalloc is asked for, and what a slab cache's
    /// objects must hold with `T`'s alignment. `None` if no allocation can serve `T`.
    const REQUEST: Option<usize> = match kmalloc_request(
        if mem::size_of::<T>() == 0 {
            1
        } else {
            mem::size_of::<T>()
        },
        mem::align_of::<T>(),
    ) {
        Some(req) if req <= KMALLOC_MAX_SIZE => Some(req),
        _ => None,
    };

    /// A pool of `min_nr` preallocated elements from kmalloc
    /// (`mempool_create_kmalloc_pool`).
    ///
    /// Context: process context, may sleep. Errors: [`AllocError`] if kmalloc cannot serve
    /// `T`'s size and alignment, or if the reserve or any of its elements cannot be allocated
    /// (nothing is kept then).
    pub fn new(kmem: &'k Kmem<P>, min_nr: usize) -> Result<Self, AllocError> {
        let size = Self::REQUEST.ok_or(AllocError)?;
        let pool = Mempool::create(kmem, min_nr, TypedSource::Kmalloc(size), GFP_KERNEL)
            .ok_or(AllocError)?;
        // INVARIANT: kmalloc blocks of `kmalloc_request` bytes hold an aligned `T` (see the
        // `boxed` module docs, "Alignment"); no cache.
        Ok(KMempool {
            pool: ManuallyDrop::new(pool),
            _elements: PhantomData,
        })
    }

    /// A pool of `min_nr` preallocated elements from a new slab cache named `name`, created
    /// for `T` (`kmem_cache_create(name, size_of::<T>(), align_of::<T>(), flags, NULL)`) and
    /// destroyed with the pool. Without `SlabFlags::NO_MERGE` the cache may be merged with
    /// a compatible one.
    ///
    /// Context: process context, may sleep. Errors: [`AllocError`] if no slab can serve `T`'s
    /// size and alignment, if the cache cannot be created, or if the reserve or any of its
    /// elements cannot be allocated (the cache is destroyed again then). With
    /// `SlabFlags::PANIC` a failure to create the cache panics instead.
    pub fn new_slab(
        kmem: &'k Kmem<P>,
        name: &str,
        flags: SlabFlags,
        min_nr: usize,
    ) -> Result<Self, AllocError> {
        Self::REQUEST.ok_or(AllocError)?;
        let cache = kmem
            .kmem_cache_create(
                name,
                mem::size_of::<T>().max(1),
                mem::align_of::<T>(),
                flags,
                None,
            )
            .ok_or(AllocError)?;
        let source = TypedSource::Slab(NonNull::from(cache));
        match Mempool::create(kmem, min_nr, source, GFP_KERNEL) {
            // INVARIANT: a cache created for `T`'s size and alignment, owned by the pool.
            Some(pool) => Ok(KMempool {
                pool: ManuallyDrop::new(pool),
                _elements: PhantomData,
            }),
            None => {
                // SAFETY: the failed pool gave its elements back; no one else knows the
                // cache, which is not used again.
                unsafe { kmem.kmem_cache_destroy(cache) };
                Err(AllocError)
            }
        }
    }

    /// Moves `value` into an element of the pool (`mempool_alloc` and a write).
    ///
    /// Context: may sleep if `gfp` allows blocking; then it waits for an element to be
    /// returned rather than fail (unless called in atomic context, where sleeping is not
    /// allowed). Errors: [`PoolAllocError`] holding `value`, not dropped, when a caller that
    /// may not sleep finds both the allocator and the reserve exhausted.
    pub fn alloc(&self, value: T, gfp: Gfp) -> Result<PoolBox<'_, T, P>, PoolAllocError<T>> {
        let Some(e) = self.pool.mempool_alloc(gfp) else {
            return Err(PoolAllocError(value));
        };
        let ptr = e.cast::<T>();
        debug_assert!(ptr.as_ptr().is_aligned(), "mempool element misaligned");
        // SAFETY: a fresh element of the pool, owned by us: room for an aligned `T` (type
        // invariant).
        unsafe { ptr.as_ptr().write(value) };
        // INVARIANT: the element holds the value, owned by the box.
        Ok(PoolBox {
            ptr,
            pool: self,
            _owns: PhantomData,
        })
    }

    /// `pool->min_nr`: the reserve's target size.
    pub fn min_nr(&self) -> usize {
        self.pool.min_nr()
    }

    /// `pool->curr_nr`: elements in the reserve now.
    pub fn curr_nr(&self) -> usize {
        self.pool.curr_nr()
    }

    /// `mempool_is_saturated`: the reserve is full.
    pub fn is_saturated(&self) -> bool {
        self.pool.is_saturated()
    }

    /// `mempool_resize`; see [`Mempool::mempool_resize`]. Values may be alive.
    ///
    /// Context: process context, may sleep.
    pub fn resize(&self, new_min_nr: usize) -> Result<(), MempoolError> {
        self.pool.mempool_resize(new_min_nr)
    }

    /// The slab cache the pool owns ([`KMempool::new_slab`]), for its name and counters;
    /// `None` for a kmalloc pool. Nothing may be freed into it but through the pool.
    pub fn cache(&self) -> Option<&slab::KmemCache> {
        match *self.pool.source() {
            TypedSource::Kmalloc(_) => None,
            // SAFETY: the cache lives until the pool is dropped (type invariant).
            TypedSource::Slab(c) => Some(unsafe { c.as_ref() }),
        }
    }

    /// The machine the pool allocates from.
    pub fn kmem(&self) -> &'k Kmem<P> {
        self.pool.kmem()
    }
}

impl<T, P: Platform> Drop for KMempool<'_, T, P> {
    fn drop(&mut self) {
        let kmem = self.pool.kmem();
        let source = *self.pool.source();
        // No `PoolBox` borrows the pool any more. Values leaked on purpose (`mem::forget`,
        // `PoolBox::into_raw`) make the pool report that it is not full and the cache report
        // its remaining objects and stay: a leak, never a use after free.
        // SAFETY: dropped once, here, and not used afterwards (type invariant).
        unsafe { ManuallyDrop::drop(&mut self.pool) };
        if let TypedSource::Slab(c) = source {
            // SAFETY: the pool that used the cache is gone; the cache is ours and this is its
            // last use.
            unsafe { kmem.kmem_cache_destroy(c.as_ref()) };
        }
    }
}

impl<T, P: Platform> fmt::Debug for KMempool<'_, T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KMempool")
            .field("cache", &self.cache().map(|c| c.name()))
            .field("min_nr", &self.min_nr())
            .field("curr_nr", &self.curr_nr())
            .finish()
    }
}

// ================================================================== PoolAllocError

/// [`KMempool::alloc`] failed: a caller that may not sleep found the allocator and the
/// reserve exhausted. Holds the value, which was not dropped.
pub struct PoolAllocError<T>(pub T);

impl<T> PoolAllocError<T> {
    /// The value that could not be placed.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for PoolAllocError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PoolAllocError(..)")
    }
}

impl<T> fmt::Display for PoolAllocError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("memory pool exhausted")
    }
}

impl<T> core::error::Error for PoolAllocError<T> {}

impl<T> From<PoolAllocError<T>> for AllocError {
    fn from(_: PoolAllocError<T>) -> AllocError {
        AllocError
    }
}

// ================================================================== PoolBox

/// A value in an element of a [`KMempool`]; dropping it drops the value and returns the
/// element to the pool.
///
/// # Invariants
///
/// `ptr` is an element of `pool`, from its `mempool_alloc`, holding a valid `T` that the box
/// owns.
pub struct PoolBox<'p, T, P: Platform> {
    ptr: NonNull<T>,
    pool: &'p KMempool<'p, T, P>,
    _owns: PhantomData<T>,
}

// SAFETY: the box owns its `T` like a `Box`; the element may be returned from any CPU
// through the shared pool, which is `Sync` when `Kmem` is.
unsafe impl<T: Send, P: Platform> Send for PoolBox<'_, T, P> where Kmem<P>: Sync {}
// SAFETY: `&PoolBox` only gives `&T`.
unsafe impl<T: Sync, P: Platform> Sync for PoolBox<'_, T, P> where Kmem<P>: Sync {}

// The value is behind a pointer: moving the box never moves it (as for `Box`).
impl<T, P: Platform> Unpin for PoolBox<'_, T, P> {}

impl<'p, T, P: Platform> PoolBox<'p, T, P> {
    /// Moves the value out and returns the element to the pool.
    pub fn into_inner(b: Self) -> T {
        let b = ManuallyDrop::new(b);
        let _free = ReturnOnDrop(b.pool, b.ptr.cast());
        // SAFETY: the box owns a valid `T`, moved out; the element goes back without it.
        unsafe { b.ptr.as_ptr().read() }
    }

    /// Gives up ownership; the element stays out of the pool until [`PoolBox::from_raw`]
    /// takes it back. Safe, like `Box::into_raw`: leaking is not unsafe.
    pub fn into_raw(b: Self) -> *mut T {
        ManuallyDrop::new(b).ptr.as_ptr()
    }

    /// Takes back ownership of a pointer from [`PoolBox::into_raw`].
    ///
    /// # Safety
    ///
    /// `raw` came from `PoolBox::into_raw` of a box of this same `pool`, and is not used by
    /// anyone else (nor taken back twice) afterwards.
    pub unsafe fn from_raw(raw: *mut T, pool: &'p KMempool<'p, T, P>) -> Self {
        // INVARIANT: the caller's contract gives back what `into_raw` gave out.
        PoolBox {
            // SAFETY: `into_raw` never returns null.
            ptr: unsafe { NonNull::new_unchecked(raw) },
            pool,
            _owns: PhantomData,
        }
    }

    /// The pool the element belongs to.
    pub fn pool(b: &Self) -> &'p KMempool<'p, T, P> {
        b.pool
    }
}

/// Returns an element to its pool when dropped, so it goes back even if a destructor
/// unwinds.
struct ReturnOnDrop<'a, T, P: Platform>(&'a KMempool<'a, T, P>, NonNull<u8>);

impl<T, P: Platform> Drop for ReturnOnDrop<'_, T, P> {
    fn drop(&mut self) {
        // SAFETY: built only over an element of the pool, from its `mempool_alloc`, that its
        // owner gives up (holding no value any more).
        unsafe { self.0.pool.mempool_free(self.1) }
    }
}

impl<T, P: Platform> Drop for PoolBox<'_, T, P> {
    fn drop(&mut self) {
        let _free = ReturnOnDrop(self.pool, self.ptr.cast());
        // SAFETY: the box owns a valid `T`, dropped once; the element goes back after it.
        unsafe { ptr::drop_in_place(self.ptr.as_ptr()) };
    }
}

owning_box_impls!(PoolBox);
