//! Typed lookaside caches: `KmemCache<T>` and `CacheBox`.

use core::fmt;
use core::mem::{self, ManuallyDrop};
use core::ptr::{self, NonNull};

use super::*;
use crate::Kmem;
use crate::gfp::{__GFP_ZERO, Gfp};
use crate::platform::Platform;
use crate::slab::{self, SlabFlags};

// ================================================================== typed caches

/// A type with a slab constructor: its caches construct every object once, when a slab is
/// populated, and get objects back in that constructed state.
///
/// See the module docs ("Constructors") for the contract.
pub trait Constructed: Sized {
    /// The constructed state. Runs when the cache gets a new slab, once per object, under
    /// the cache's lock: it must not sleep nor allocate from kmem, and it must not panic
    /// (a panic there aborts).
    fn construct() -> Self;

    /// Brings a used object back to its constructed state before it returns to the cache.
    /// The default builds a fresh one (`*self = Self::construct()`, dropping the old value);
    /// types whose users always leave them constructed may override it with something
    /// cheaper, even nothing.
    fn reset(&mut self) {
        *self = Self::construct();
    }
}

/// Aborts (a panic during unwinding) if dropped: a constructor must not unwind through the
/// slab layer, which calls it under the cache's lock in the middle of formatting a slab.
struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        panic!("kmem: a slab constructor panicked; constructors must not unwind");
    }
}

/// The core's constructor for `T`'s caches: stateless, one per `T`.
fn ctor_shim<T: Constructed>(obj: *mut u8) {
    let bomb = AbortOnUnwind;
    let x = T::construct();
    // SAFETY: the slab layer calls a cache's constructor with the start of one of its
    // objects, not handed out yet: `size_of::<T>().max(1)` writable bytes aligned to at least
    // `align_of::<T>()` (the cache was created with both; see `KmemCache::create`).
    unsafe { obj.cast::<T>().write(x) };
    mem::forget(bomb);
}

/// What a constructed cache needs at run time.
struct CtorFns<T> {
    construct: fn() -> T,
    reset: fn(&mut T),
}

/// A slab cache of `T` objects (`kmem_cache_create` for one type); destroyed on drop.
///
/// # Invariants
///
/// `cache` is a live cache of `kmem`, created for `T`'s size and alignment and not destroyed
/// before `self` is dropped. If `ctor` is `Some`, the cache's constructor is `ctor_shim::<T>`
/// and every free object of it holds a valid `T` in its constructed state.
pub struct KmemCache<'k, T, P: Platform> {
    kmem: &'k Kmem<P>,
    cache: NonNull<slab::KmemCache>,
    ctor: Option<CtorFns<T>>,
}

// SAFETY: the raw cache is `Sync` and may be used and destroyed from any CPU. Objects carry
// `T`s between threads (a constructed object freed on one CPU is handed out on another),
// hence `T: Send` for both.
unsafe impl<T: Send, P: Platform> Send for KmemCache<'_, T, P> where Kmem<P>: Sync {}
// SAFETY: as for `Send`; `&KmemCache` allocates, which creates or hands over `T`s.
unsafe impl<T: Send, P: Platform> Sync for KmemCache<'_, T, P> where Kmem<P>: Sync {}

impl<'k, T, P: Platform> KmemCache<'k, T, P> {
    /// Creates a cache named `name` for `T` (`kmem_cache_create(name, size_of::<T>(),
    /// align_of::<T>(), flags, NULL)`). Without a constructor the cache may be merged with
    /// a compatible one (pass `SlabFlags::NO_MERGE` to keep it apart).
    ///
    /// Context: may sleep. Errors: [`AllocError`] when the core refuses (no memory, `T`
    /// larger than a cache serves); with `SlabFlags::PANIC` the core panics instead.
    pub fn new(kmem: &'k Kmem<P>, name: &str, flags: SlabFlags) -> Result<Self, AllocError> {
        Self::create(kmem, name, flags, None)
    }

    /// Creates a cache whose objects are constructed by [`Constructed::construct`] when a
    /// slab is populated and reset by [`Constructed::reset`] when freed. Such a cache is
    /// never merged, and never poisoned (`SlabFlags::POISON` is dropped, as SLUB does for
    /// caches with a constructor: poison would overwrite the constructed state). Context and
    /// errors: as [`KmemCache::new`].
    pub fn new_constructed(
        kmem: &'k Kmem<P>,
        name: &str,
        flags: SlabFlags,
    ) -> Result<Self, AllocError>
    where
        T: Constructed,
    {
        let fns = CtorFns {
            construct: T::construct,
            reset: T::reset,
        };
        let flags = SlabFlags(flags.0 & !SlabFlags::POISON.0);
        Self::create(kmem, name, flags, Some((fns, ctor_shim::<T> as slab::Ctor)))
    }

    fn create(
        kmem: &'k Kmem<P>,
        name: &str,
        flags: SlabFlags,
        ctor: Option<(CtorFns<T>, slab::Ctor)>,
    ) -> Result<Self, AllocError> {
        let (fns, raw_ctor) = match ctor {
            Some((fns, raw)) => (Some(fns), Some(raw)),
            None => (None, None),
        };
        let size = mem::size_of::<T>().max(1);
        let cache = kmem
            .kmem_cache_create(name, size, mem::align_of::<T>(), flags, raw_ctor)
            .ok_or(AllocError)?;
        // INVARIANT: a live cache for `T`, with the constructor matching `ctor`.
        Ok(KmemCache {
            kmem,
            cache: NonNull::from(cache),
            ctor: fns,
        })
    }

    /// The raw cache, for its name and counters. Objects freed into it through the raw API
    /// must be objects of this cache holding, for a constructed cache, a valid constructed
    /// `T` (the typed layer hands such objects out as `&mut T`).
    pub fn raw(&self) -> &slab::KmemCache {
        // SAFETY: live until `self` is dropped (type invariant).
        unsafe { self.cache.as_ref() }
    }

    /// Whether the cache constructs its objects ([`KmemCache::new_constructed`]).
    pub fn is_constructed(&self) -> bool {
        self.ctor.is_some()
    }

    /// The `Kmem` the cache belongs to.
    pub fn kmem(&self) -> &'k Kmem<P> {
        self.kmem
    }

    /// Allocates an object holding `x`; see [`CacheBox::new`].
    pub fn alloc(&self, x: T, gfp: Gfp) -> Result<CacheBox<'_, T, P>, AllocError> {
        CacheBox::new(self, x, gfp)
    }

    /// Allocates an object in its constructed state; see [`CacheBox::new_constructed`].
    pub fn alloc_constructed(&self, gfp: Gfp) -> Result<CacheBox<'_, T, P>, AllocError>
    where
        T: Constructed,
    {
        CacheBox::new_constructed(self, gfp)
    }

    /// Returns the cache's free slabs to the page allocator (`kmem_cache_shrink`); the
    /// pages freed. Context: may wait for other CPUs' sections; never sleeps otherwise.
    pub fn shrink(&self) -> usize {
        self.kmem.kmem_cache_shrink(self.raw())
    }

    /// An uninitialised (or, for a constructed cache, constructed) object.
    fn alloc_raw(&self, gfp: Gfp) -> Result<NonNull<T>, AllocError> {
        let gfp = if self.ctor.is_some() {
            gfp.without(__GFP_ZERO)
        } else {
            gfp
        };
        let p = self
            .kmem
            .kmem_cache_alloc(self.raw(), gfp)
            .ok_or(AllocError)?;
        debug_assert!(p.as_ptr() as usize % mem::align_of::<T>() == 0);
        Ok(p.cast())
    }
}

impl<T, P: Platform> Drop for KmemCache<'_, T, P> {
    fn drop(&mut self) {
        // No `CacheBox` borrows the cache any more. Objects leaked on purpose (`mem::forget`,
        // `CacheBox::into_raw`) make the core report them and keep the cache: a leak, as in
        // Linux, never a use after free.
        // SAFETY: the cache is live and not used after this (type invariant; we are its
        // owner and this is its last use).
        unsafe { self.kmem.kmem_cache_destroy(self.cache.as_ref()) };
    }
}

impl<T, P: Platform> fmt::Debug for KmemCache<'_, T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmemCache")
            .field("name", &self.raw().name())
            .field("object_size", &self.raw().object_size())
            .field("constructed", &self.is_constructed())
            .finish()
    }
}

/// An object from a [`KmemCache<T>`](KmemCache), returned to it on drop.
///
/// # Invariants
///
/// `ptr` is a live object of `cache` holding a valid `T` that the box owns.
pub struct CacheBox<'c, T, P: Platform> {
    ptr: NonNull<T>,
    cache: &'c KmemCache<'c, T, P>,
}

// SAFETY: the box owns its `T`; freeing needs `&KmemCache` (`KmemCache: Sync` for `T: Send`).
unsafe impl<T: Send, P: Platform> Send for CacheBox<'_, T, P> where Kmem<P>: Sync {}
// SAFETY: `&CacheBox` only gives `&T`; the shared cache is `Sync` for `T: Send`.
unsafe impl<T: Send + Sync, P: Platform> Sync for CacheBox<'_, T, P> where Kmem<P>: Sync {}

impl<'c, T, P: Platform> CacheBox<'c, T, P> {
    /// An object of `cache` holding `x` (`kmem_cache_alloc` and a write). For a constructed
    /// cache, `x` replaces the constructed value (which is dropped) and is reset, not
    /// dropped, when the box goes.
    ///
    /// Context: may sleep if `gfp` allows blocking and the cache must grow. Errors:
    /// [`AllocError`] when no object can be had (`x` is dropped then).
    pub fn new(cache: &'c KmemCache<'c, T, P>, x: T, gfp: Gfp) -> Result<Self, AllocError> {
        let ptr = cache.alloc_raw(gfp)?;
        if cache.is_constructed() {
            // SAFETY: a constructed cache's objects hold a valid `T` (`KmemCache` invariant),
            // which we now own.
            unsafe { *ptr.as_ptr() = x };
        } else {
            // SAFETY: a fresh object of the cache: room for a `T`, aligned.
            unsafe { ptr.as_ptr().write(x) };
        }
        // INVARIANT: the object holds a valid `T`.
        Ok(CacheBox { ptr, cache })
    }

    /// An object of `cache` in its constructed state: as the cache's constructor left it
    /// (or the last user's [`Constructed::reset`]). On a cache made with
    /// [`KmemCache::new`], the object is constructed here with `T::construct()`.
    ///
    /// Context and errors: as [`CacheBox::new`].
    pub fn new_constructed(cache: &'c KmemCache<'c, T, P>, gfp: Gfp) -> Result<Self, AllocError>
    where
        T: Constructed,
    {
        let ptr = cache.alloc_raw(gfp)?;
        if !cache.is_constructed() {
            // SAFETY: a fresh object of the cache: room for a `T`, aligned.
            unsafe { ptr.as_ptr().write(T::construct()) };
        }
        // INVARIANT: either constructed by the cache or just now.
        Ok(CacheBox { ptr, cache })
    }

    /// Gives up ownership; the object stays allocated until [`CacheBox::from_raw`] takes it
    /// back. The cache can then be dropped while the object lives: it reports the object
    /// and stays (a leak). Safe, like `Box::into_raw`.
    pub fn into_raw(b: Self) -> *mut T {
        ManuallyDrop::new(b).ptr.as_ptr()
    }

    /// Takes back ownership of a pointer from [`CacheBox::into_raw`].
    ///
    /// # Safety
    ///
    /// `raw` came from `CacheBox::into_raw` of a box of this same `cache`, and is not used
    /// by anyone else (nor taken back twice) afterwards.
    pub unsafe fn from_raw(raw: *mut T, cache: &'c KmemCache<'c, T, P>) -> Self {
        // INVARIANT: the caller's contract.
        CacheBox {
            // SAFETY: `into_raw` never returns null.
            ptr: unsafe { NonNull::new_unchecked(raw) },
            cache,
        }
    }

    /// Moves the value out and returns the object to the cache (leaving a freshly
    /// constructed value in its place for a constructed cache).
    pub fn into_inner(b: Self) -> T {
        let b = ManuallyDrop::new(b);
        let x = match &b.cache.ctor {
            // SAFETY: the object holds a valid `T`; a constructed one replaces it.
            Some(f) => unsafe { ptr::replace(b.ptr.as_ptr(), (f.construct)()) },
            // SAFETY: the object holds a valid `T`, moved out; the memory is freed below.
            None => unsafe { b.ptr.as_ptr().read() },
        };
        // SAFETY: a live object of the cache, no longer used.
        unsafe {
            b.cache
                .kmem
                .kmem_cache_free(b.cache.raw(), b.ptr.as_ptr().cast())
        };
        x
    }

    /// The cache the object belongs to.
    pub fn cache(b: &Self) -> &'c KmemCache<'c, T, P> {
        b.cache
    }
}

/// Frees a cache object when dropped, so it goes back even if a destructor unwinds.
struct CacheFreeOnDrop<'a, T, P: Platform>(&'a KmemCache<'a, T, P>, *mut u8);

impl<T, P: Platform> Drop for CacheFreeOnDrop<'_, T, P> {
    fn drop(&mut self) {
        // SAFETY: built only over a live object of the cache that its owner gives up.
        unsafe { self.0.kmem.kmem_cache_free(self.0.raw(), self.1) }
    }
}

impl<T, P: Platform> Drop for CacheBox<'_, T, P> {
    fn drop(&mut self) {
        let _free = CacheFreeOnDrop(self.cache, self.ptr.as_ptr().cast());
        match &self.cache.ctor {
            // SAFETY: the box owns a valid `T`; it stays valid (reset has `&mut T`) and goes
            // back in its constructed state, as the cache's invariant demands.
            Some(f) => (f.reset)(unsafe { self.ptr.as_mut() }),
            // SAFETY: the box owns a valid `T`, dropped once, before the object is freed.
            None => unsafe { ptr::drop_in_place(self.ptr.as_ptr()) },
        }
    }
}

owning_box_impls!(CacheBox);
