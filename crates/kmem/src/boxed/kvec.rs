//! `KVec`: a kmalloc-backed vector.

use core::fmt;
use core::marker::PhantomData;
use core::mem::{self};
use core::ops::{Deref, DerefMut};
use core::ptr::{self, NonNull};

use super::*;
use crate::Kmem;
use crate::gfp::Gfp;
use crate::kmalloc::KMALLOC_MAX_SIZE;
use crate::platform::Platform;

// ================================================================== KVec

/// A growable array in kmalloc memory (Rust-for-Linux's `KVec`).
///
/// # Invariants
///
/// `len <= cap`; elements `[0, len)` are initialised and owned. For a zero-sized `T`,
/// `cap == usize::MAX` and nothing is allocated. Otherwise `cap == 0` with a dangling `ptr`,
/// or `ptr` is a live kmalloc allocation of `kmem` aligned for `T` whose `ksize` is at
/// least `cap * size_of::<T>()` (`cap` is `ksize / size_of::<T>()`).
pub struct KVec<'k, T, P: Platform> {
    ptr: NonNull<T>,
    len: usize,
    cap: usize,
    kmem: &'k Kmem<P>,
    _owns: PhantomData<T>,
}

// SAFETY: a `KVec` owns its elements like a `Vec`; see `KBox`.
unsafe impl<T: Send, P: Platform> Send for KVec<'_, T, P> where Kmem<P>: Sync {}
// SAFETY: `&KVec` only gives `&[T]`.
unsafe impl<T: Sync, P: Platform> Sync for KVec<'_, T, P> where Kmem<P>: Sync {}

impl<'k, T, P: Platform> KVec<'k, T, P> {
    const IS_ZST: bool = mem::size_of::<T>() == 0;

    /// An empty vector; allocates nothing until the first element.
    pub const fn new(kmem: &'k Kmem<P>) -> Self {
        KVec {
            ptr: dangling(),
            len: 0,
            cap: if Self::IS_ZST { usize::MAX } else { 0 },
            kmem,
            _owns: PhantomData,
        }
    }

    /// An empty vector with room for at least `n` elements.
    ///
    /// Context: may sleep if `gfp` allows blocking. Errors: [`AllocError`] when
    /// `n * size_of::<T>()` overflows or kmalloc fails.
    pub fn with_capacity(n: usize, kmem: &'k Kmem<P>, gfp: Gfp) -> Result<Self, AllocError> {
        let mut v = KVec::new(kmem);
        v.reserve_exact(n, gfp)?;
        Ok(v)
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements the vector holds without reallocating: all the allocation's `ksize` allows.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: `[0, len)` are initialised and owned; `ptr` is aligned and non-null.
        unsafe { core::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The elements, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as `as_slice`, borrowed mutably through `self`.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer's address (dangling while nothing is allocated).
    pub fn as_ptr(&self) -> *const T {
        self.ptr.as_ptr()
    }

    /// Appends `x`, growing (doubling) the buffer if it is full.
    ///
    /// Context: may sleep if `gfp` allows blocking and the buffer must grow. Errors:
    /// [`AllocError`] when growing fails; `x` is dropped and the vector is unchanged.
    pub fn push(&mut self, x: T, gfp: Gfp) -> Result<(), AllocError> {
        if self.len == self.cap {
            self.grow(1, gfp)?;
        }
        // SAFETY: `len < cap` now (`grow` made room).
        unsafe { self.push_unchecked(x) };
        Ok(())
    }

    /// Appends `x` if there is room, without allocating; gives `x` back otherwise.
    ///
    /// Context: any; never sleeps.
    pub fn push_within_capacity(&mut self, x: T) -> Result<(), T> {
        if self.len == self.cap {
            return Err(x);
        }
        // SAFETY: `len < cap`, checked above.
        unsafe { self.push_unchecked(x) };
        Ok(())
    }

    /// # Safety
    ///
    /// `len < cap`.
    unsafe fn push_unchecked(&mut self, x: T) {
        // SAFETY: slot `len` is inside the buffer (caller) and not initialised.
        unsafe { self.ptr.as_ptr().add(self.len).write(x) };
        self.len += 1;
    }

    /// Removes and returns the last element.
    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: slot `len` was initialised and is no longer counted as an element.
        Some(unsafe { self.ptr.as_ptr().add(self.len).read() })
    }

    /// Drops every element past the first `n` (nothing if there are at most `n`). Keeps the
    /// buffer.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.len {
            return;
        }
        let tail = ptr::slice_from_raw_parts_mut(
            // SAFETY: `n < len`, so the tail starts inside the buffer.
            unsafe { self.ptr.as_ptr().add(n) },
            self.len - n,
        );
        // Shorten first: if a destructor unwinds, the rest is not dropped twice.
        self.len = n;
        // SAFETY: the tail's elements were initialised and are no longer counted.
        unsafe { ptr::drop_in_place(tail) };
    }

    /// Drops every element. Keeps the buffer.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Makes room for at least `n` more elements, growing as `push` does (at least doubling).
    ///
    /// Context: may sleep if `gfp` allows blocking. Errors: [`AllocError`] on overflow or
    /// when kmalloc fails; the vector is unchanged then.
    pub fn reserve(&mut self, n: usize, gfp: Gfp) -> Result<(), AllocError> {
        if self.cap - self.len >= n {
            return Ok(());
        }
        self.grow(n, gfp)
    }

    /// Makes room for at least `n` more elements, asking for no more than that (kmalloc may
    /// still give more; the capacity then says so). Context and errors: as [`KVec::reserve`].
    pub fn reserve_exact(&mut self, n: usize, gfp: Gfp) -> Result<(), AllocError> {
        if self.cap - self.len >= n {
            return Ok(());
        }
        let required = self.len.checked_add(n).ok_or(AllocError)?;
        self.realloc(required, gfp)
    }

    /// Appends clones of `other`'s elements.
    ///
    /// Context: may sleep if `gfp` allows blocking. Errors: [`AllocError`] when growing
    /// fails; nothing is appended then.
    pub fn extend_from_slice(&mut self, other: &[T], gfp: Gfp) -> Result<(), AllocError>
    where
        T: Clone,
    {
        self.reserve(other.len(), gfp)?;
        for x in other {
            // SAFETY: `reserve` made room for all of `other`; `len` counts each clone as it
            // lands, so an unwinding `clone` leaves a consistent vector.
            unsafe { self.push_unchecked(x.clone()) };
        }
        Ok(())
    }

    /// Grows to hold `len + additional` elements: at least double the capacity, but not past
    /// what kmalloc serves when the requirement itself fits (`KMALLOC_MAX_SIZE`).
    #[cold]
    fn grow(&mut self, additional: usize, gfp: Gfp) -> Result<(), AllocError> {
        let required = self.len.checked_add(additional).ok_or(AllocError)?;
        let size = mem::size_of::<T>();
        if Self::IS_ZST {
            // `cap` is `usize::MAX`: only an overflowing request gets here.
            return Err(AllocError);
        }
        let min = if size <= 1024 { 4 } else { 1 };
        let doubled = self
            .cap
            .saturating_mul(2)
            .min(KMALLOC_MAX_SIZE / size)
            .max(min);
        self.realloc(required.max(doubled), gfp)
    }

    /// Moves the elements to a buffer of at least `new_cap` elements with `krealloc`.
    fn realloc(&mut self, new_cap: usize, gfp: Gfp) -> Result<(), AllocError> {
        let (size, align) = (mem::size_of::<T>(), mem::align_of::<T>());
        if new_cap <= self.cap {
            return Ok(());
        }
        if Self::IS_ZST {
            // `cap` is `usize::MAX`: unreachable, but never divide by a zero size below.
            return Err(AllocError);
        }
        let bytes = new_cap.checked_mul(size).ok_or(AllocError)?;
        let req = kmalloc_request(bytes, align).ok_or(AllocError)?;
        let old: *mut u8 = if self.cap == 0 {
            ptr::null_mut()
        } else {
            self.ptr.as_ptr().cast()
        };
        // SAFETY: `old` is null or our live kmalloc allocation (type invariant). On success
        // krealloc has moved the bytes (the elements, bitwise) and freed `old` if it moved;
        // on failure `old` is untouched.
        let new = unsafe { self.kmem.krealloc(old, req, gfp) }.ok_or(AllocError)?;
        debug_assert!(
            new.as_ptr() as usize % align == 0,
            "kmalloc broke alignment"
        );
        // INVARIANT: `ksize >= req >= bytes`, so the new capacity covers `new_cap >= len`.
        self.ptr = new.cast();
        self.cap = self.kmem.ksize(new.as_ptr()) / size;
        Ok(())
    }
}

impl<T, P: Platform> Deref for KVec<'_, T, P> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T, P: Platform> DerefMut for KVec<'_, T, P> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.as_mut_slice()
    }
}

impl<'a, T, P: Platform> IntoIterator for &'a KVec<'_, T, P> {
    type Item = &'a T;
    type IntoIter = core::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl<'a, T, P: Platform> IntoIterator for &'a mut KVec<'_, T, P> {
    type Item = &'a mut T;
    type IntoIter = core::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_mut_slice().iter_mut()
    }
}

impl<T, P: Platform> Drop for KVec<'_, T, P> {
    fn drop(&mut self) {
        let buf = if Self::IS_ZST || self.cap == 0 {
            ptr::null_mut()
        } else {
            self.ptr.as_ptr().cast()
        };
        let _free = KfreeOnDrop(self.kmem, buf);
        // SAFETY: the elements are initialised and owned, dropped once, before the buffer.
        unsafe { ptr::drop_in_place(self.as_mut_slice()) };
    }
}

impl<T: fmt::Debug, P: Platform> fmt::Debug for KVec<'_, T, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_slice(), f)
    }
}
