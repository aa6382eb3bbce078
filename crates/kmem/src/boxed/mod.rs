//! Typed owners over kmem (floor 8), in the style of Rust-for-Linux's `rust/kernel/alloc`.
//!
//! * [`KBox<T>`](KBox): one `T` in kmalloc memory (`KBox::new(x, &kmem, GFP_KERNEL)?`).
//! * [`KVec<T>`](KVec): a growable array in kmalloc memory, grown with `krealloc`; its
//!   capacity is what `ksize` says the allocation holds, so kmalloc's slack is used.
//! * [`KmemCache<T>`](KmemCache): a typed slab cache, optionally with a constructor
//!   ([`Constructed`]); [`CacheBox<T>`](CacheBox): one object from it.
//!
//! There is no `alloc` crate and no global allocator: every owner borrows the [`Kmem`] it
//! came from (`'k`) and gives its memory back to it on drop. A [`CacheBox`] borrows its
//! [`KmemCache`] (`'c`), so a cache cannot be destroyed while one of its objects is alive.
//! Allocation is fallible and takes the caller's [`Gfp`]: each call may sleep exactly when its
//! `gfp` allows blocking (`GFP_KERNEL` may, `GFP_ATOMIC`/`GFP_NOWAIT` never). Failure is
//! [`AllocError`], never a panic; sizes that overflow are failures too.
//!
//! # Alignment
//!
//! kmalloc aligns every allocation to at least [`KMALLOC_MIN_ALIGN`] (8) bytes and every
//! power-of-two size naturally: the power-of-two classes are caches created with
//! `align == size`, and sizes above the classes are buddy blocks of `2^order` pages, which the
//! direct map keeps naturally aligned. So a type with `align_of::<T>() > 8` asks for its size
//! rounded up to a power of two that is at least its alignment ([`kmalloc_request`]); that
//! power of two is a multiple of the alignment, hence so is the address. Zero-sized types
//! allocate nothing: they live at a dangling, aligned address and are never freed.
//!
//! # Constructors
//!
//! A Linux slab constructor runs once per object when a slab is populated, not on every
//! allocation; the contract is that an object goes back to the cache *in its constructed
//! state*, so the next user receives it ready. The core's [`Ctor`](crate::slab::Ctor) is a
//! plain `fn(*mut u8)` without state, so the typed layer takes the constructor from a trait:
//! for `T: Constructed` it passes `ctor_shim::<T>`, one stateless function per `T`, which
//! writes `T::construct()` into the fresh object. From then on every free object of such a
//! cache holds a valid `T` (this is what makes handing it out as `&mut T` sound):
//!
//! * [`CacheBox::new_constructed`] hands out the object as it is, without writing;
//! * a [`CacheBox`] of a constructed cache is *not* dropped when it is freed: the cache calls
//!   [`Constructed::reset`] (by default `*self = T::construct()`), which must bring the object
//!   back to its constructed state, then frees it. `T`'s destructor never runs for objects
//!   that stay in a constructed cache, also not when the cache is destroyed (Linux has no
//!   destructors either): a constructed state that owns resources leaks them then;
//! * `__GFP_ZERO` is ignored for constructed caches (zeroing would destroy the constructed
//!   state; Linux warns about `kmem_cache_zalloc` on a cache with a constructor).
//!
//! # Example
//!
//! ```
//! use kmem::Kmem;
//! use kmem::boxed::{AllocError, KBox, KVec};
//! use kmem::gfp::GFP_KERNEL;
//! use kmem::platform::Platform;
//!
//! fn sum_of_squares<P: Platform>(kmem: &Kmem<P>, n: u64) -> Result<u64, AllocError> {
//!     let mut v = KVec::new(kmem);
//!     for i in 0..n {
//!         v.push(i * i, GFP_KERNEL)?;
//!     }
//!     let total = KBox::new(v.iter().sum::<u64>(), kmem, GFP_KERNEL)?;
//!     Ok(*total)
//! }
//! ```
//!
//! A [`CacheBox`] cannot outlive its cache:
//!
//! ```compile_fail
//! use kmem::Kmem;
//! use kmem::boxed::KmemCache;
//! use kmem::gfp::GFP_KERNEL;
//! use kmem::platform::Platform;
//! use kmem::slab::SlabFlags;
//!
//! fn dangling<P: Platform>(kmem: &Kmem<P>) {
//!     let obj;
//!     {
//!         let cache = KmemCache::<u64, P>::new(kmem, "x", SlabFlags::NONE).unwrap();
//!         obj = cache.alloc(1, GFP_KERNEL).unwrap();
//!     } // error: `cache` dropped while borrowed
//!     drop(obj);
//! }
//! ```

use core::fmt;
use core::ptr::NonNull;

use crate::Kmem;
use crate::gfp::Gfp;
use crate::platform::Platform;

/// The alignment every kmalloc allocation has (`ARCH_KMALLOC_MINALIGN`).
pub const KMALLOC_MIN_ALIGN: usize = 8;

/// An allocation failed: no memory for the request, or a size that overflows or exceeds
/// what the allocator serves. Mirrors `core::alloc::AllocError` (unstable).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct AllocError;

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("memory allocation failed")
    }
}

impl core::error::Error for AllocError {}

/// The kmalloc size to request for `size` bytes aligned to `align` (a power of two): `size`
/// itself up to [`KMALLOC_MIN_ALIGN`], else the power of two at least `max(size, align)`
/// (see the module docs). `None` if that overflows.
pub const fn kmalloc_request(size: usize, align: usize) -> Option<usize> {
    if align <= KMALLOC_MIN_ALIGN {
        Some(size)
    } else if size > align {
        size.checked_next_power_of_two()
    } else {
        Some(align)
    }
}

/// A dangling pointer aligned for `T`: where zero-sized values and empty vectors live.
pub(crate) const fn dangling<T>() -> NonNull<T> {
    NonNull::dangling()
}

/// kmalloc memory for a `T`-aligned block of `size` bytes (`size > 0`).
pub(crate) fn kmalloc_aligned<P: Platform>(
    kmem: &Kmem<P>,
    size: usize,
    align: usize,
    gfp: Gfp,
) -> Result<NonNull<u8>, AllocError> {
    let req = kmalloc_request(size, align).ok_or(AllocError)?;
    let p = kmem.kmalloc(req, gfp).ok_or(AllocError)?;
    debug_assert!(p.as_ptr() as usize % align == 0, "kmalloc broke alignment");
    Ok(p)
}

/// Frees a kmalloc block when dropped, so memory goes back even if a destructor unwinds.
pub(crate) struct KfreeOnDrop<'a, P: Platform>(&'a Kmem<P>, *mut u8);

impl<P: Platform> Drop for KfreeOnDrop<'_, P> {
    fn drop(&mut self) {
        // SAFETY: built only over a live kmalloc block (or null) that its creator gives up.
        unsafe { self.0.kfree(self.1) }
    }
}

/// `Deref`, `DerefMut`, `Debug` and `Display` for an owning box `$Box<'_, T, P>` whose
/// `ptr: NonNull<T>` field points to a valid `T` it owns (the type invariant of `KBox`,
/// `CacheBox` and `PoolBox`).
macro_rules! owning_box_impls {
    ($Box:ident) => {
        impl<T, P: Platform> core::ops::Deref for $Box<'_, T, P> {
            type Target = T;
            fn deref(&self) -> &T {
                // SAFETY: the box owns a valid `T` (type invariant).
                unsafe { self.ptr.as_ref() }
            }
        }

        impl<T, P: Platform> core::ops::DerefMut for $Box<'_, T, P> {
            fn deref_mut(&mut self) -> &mut T {
                // SAFETY: the box owns a valid `T`, borrowed mutably through `self`.
                unsafe { self.ptr.as_mut() }
            }
        }

        impl<T: core::fmt::Debug, P: Platform> core::fmt::Debug for $Box<'_, T, P> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(&**self, f)
            }
        }

        impl<T: core::fmt::Display, P: Platform> core::fmt::Display for $Box<'_, T, P> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Display::fmt(&**self, f)
            }
        }
    };
}

mod cache;
mod kbox;
mod kvec;
mod pool;

pub use cache::{CacheBox, Constructed, KmemCache};
pub use kbox::KBox;
pub use kvec::KVec;
pub use pool::{KMempool, PoolAllocError, PoolBox};
