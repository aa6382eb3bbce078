//! `KBox`: a kmalloc-backed box.

use core::marker::PhantomData;
use core::mem::{self, ManuallyDrop, MaybeUninit};
use core::pin::Pin;
use core::ptr::{self, NonNull};

use super::*;
use crate::Kmem;
use crate::gfp::Gfp;
use crate::platform::Platform;

// ================================================================== KBox

/// One `T` in kmalloc memory, freed on drop (Rust-for-Linux's `KBox`).
///
/// # Invariants
///
/// `ptr` points to a valid `T` that the box owns; unless `T` is zero-sized, `ptr` is a live
/// kmalloc allocation of `kmem` (of [`kmalloc_request`]`(size_of::<T>(), align_of::<T>())`
/// bytes), else it is dangling and aligned.
pub struct KBox<'k, T, P: Platform> {
    ptr: NonNull<T>,
    kmem: &'k Kmem<P>,
    _owns: PhantomData<T>,
}

// SAFETY: a `KBox` owns its `T` like a `Box`; the memory may be freed from any CPU, and the
// shared `&Kmem` requires `Kmem: Sync`.
unsafe impl<T: Send, P: Platform> Send for KBox<'_, T, P> where Kmem<P>: Sync {}
// SAFETY: `&KBox` only gives `&T`.
unsafe impl<T: Sync, P: Platform> Sync for KBox<'_, T, P> where Kmem<P>: Sync {}

// The value is behind a pointer: moving the box never moves it (as for `Box`).
impl<T, P: Platform> Unpin for KBox<'_, T, P> {}

impl<'k, T, P: Platform> KBox<'k, T, P> {
    /// Moves `x` into fresh kmalloc memory of `kmem`.
    ///
    /// Context: may sleep if `gfp` allows blocking. Errors: [`AllocError`] when kmalloc
    /// fails (`x` is dropped then). Zero-sized `T` never allocates and never fails.
    pub fn new(x: T, kmem: &'k Kmem<P>, gfp: Gfp) -> Result<Self, AllocError> {
        Ok(KBox::write(KBox::new_uninit(kmem, gfp)?, x))
    }

    /// Uninitialised kmalloc memory for a `T`; fill it with [`KBox::write`].
    ///
    /// Context and errors: as [`KBox::new`].
    pub fn new_uninit(
        kmem: &'k Kmem<P>,
        gfp: Gfp,
    ) -> Result<KBox<'k, MaybeUninit<T>, P>, AllocError> {
        let ptr = if mem::size_of::<T>() == 0 {
            dangling()
        } else {
            kmalloc_aligned(kmem, mem::size_of::<T>(), mem::align_of::<T>(), gfp)?.cast()
        };
        // INVARIANT: fresh memory for a `T` (any bytes are a valid `MaybeUninit<T>`).
        Ok(KBox {
            ptr,
            kmem,
            _owns: PhantomData,
        })
    }

    /// [`KBox::new`], pinned: the value will not move until it is dropped.
    pub fn pin(x: T, kmem: &'k Kmem<P>, gfp: Gfp) -> Result<Pin<Self>, AllocError> {
        Ok(KBox::into_pin(KBox::new(x, kmem, gfp)?))
    }

    /// Pins the box's value in place.
    pub fn into_pin(b: Self) -> Pin<Self> {
        // SAFETY: the value lives behind the pointer and nothing moves it while the box
        // lives; the box frees it only after dropping it in place. Once pinned, the API gives
        // no `&mut T` (`Pin<KBox>` derefs mutably only for `T: Unpin`).
        unsafe { Pin::new_unchecked(b) }
    }

    /// Gives up ownership: the caller gets the raw pointer and must eventually hand it to
    /// [`KBox::from_raw`] (with the same `kmem`), or the value and its memory leak.
    ///
    /// Safe, like `Box::into_raw`: leaking is not unsafe.
    pub fn into_raw(b: Self) -> *mut T {
        ManuallyDrop::new(b).ptr.as_ptr()
    }

    /// Takes back ownership of a pointer from [`KBox::into_raw`].
    ///
    /// # Safety
    ///
    /// `raw` came from `KBox::<T, P>::into_raw` of a box of this same `kmem`, and is not
    /// used by anyone else (nor taken back twice) afterwards.
    pub unsafe fn from_raw(raw: *mut T, kmem: &'k Kmem<P>) -> Self {
        // INVARIANT: the caller's contract gives back what `into_raw` gave out.
        KBox {
            // SAFETY: `into_raw` never returns null.
            ptr: unsafe { NonNull::new_unchecked(raw) },
            kmem,
            _owns: PhantomData,
        }
    }

    /// Moves the value out and frees the memory.
    pub fn into_inner(b: Self) -> T {
        let b = ManuallyDrop::new(b);
        // SAFETY: the box owns a valid `T`; the memory is freed below without dropping it.
        let x = unsafe { b.ptr.as_ptr().read() };
        drop(KfreeOnDrop(b.kmem, Self::kfree_ptr(b.ptr)));
        x
    }

    /// Leaks the box: the value lives (and stays allocated) as long as `kmem` is borrowed.
    pub fn leak(b: Self) -> &'k mut T
    where
        T: 'k,
    {
        // SAFETY: the box owned a valid `T` whose memory is never freed now.
        unsafe { &mut *KBox::into_raw(b) }
    }

    /// The `Kmem` the box's memory belongs to.
    pub fn kmem(b: &Self) -> &'k Kmem<P> {
        b.kmem
    }

    /// What to hand to `kfree` for `ptr`: null (a no-op) for zero-sized types.
    fn kfree_ptr(ptr: NonNull<T>) -> *mut u8 {
        if mem::size_of::<T>() == 0 {
            ptr::null_mut()
        } else {
            ptr.as_ptr().cast()
        }
    }
}

impl<'k, T, P: Platform> KBox<'k, MaybeUninit<T>, P> {
    /// Initialises the memory with `x`.
    pub fn write(b: Self, x: T) -> KBox<'k, T, P> {
        let b = ManuallyDrop::new(b);
        // SAFETY: the box owns memory for a `T`.
        unsafe { b.ptr.as_ptr().cast::<T>().write(x) };
        // INVARIANT: now initialised; ownership moves to the new box.
        KBox {
            ptr: b.ptr.cast(),
            kmem: b.kmem,
            _owns: PhantomData,
        }
    }

    /// Treats the memory as initialised.
    ///
    /// # Safety
    ///
    /// The memory holds a valid `T`.
    pub unsafe fn assume_init(b: Self) -> KBox<'k, T, P> {
        let b = ManuallyDrop::new(b);
        // INVARIANT: the caller's contract.
        KBox {
            ptr: b.ptr.cast(),
            kmem: b.kmem,
            _owns: PhantomData,
        }
    }
}

owning_box_impls!(KBox);

impl<T, P: Platform> Drop for KBox<'_, T, P> {
    fn drop(&mut self) {
        let _free = KfreeOnDrop(self.kmem, Self::kfree_ptr(self.ptr));
        // SAFETY: the box owns a valid `T`, dropped once; the memory is freed after it.
        unsafe { ptr::drop_in_place(self.ptr.as_ptr()) };
    }
}
