//! Per-CPU sheaves: the slab fast path.
//!
//! A sheaf is an array of free object pointers owned by one CPU for one cache. Allocation pops
//! the last pointer, free pushes one: no lock, no atomic read-modify-write, nothing written
//! into the object. An empty sheaf is refilled with half its capacity from the cache's slabs,
//! a full one flushes half back (`node.rs`); both under the cache's node lock.
//!
//! This is the design Linux is moving SLUB to ("sheaves", 6.18): a free from another CPU lands
//! in *that* CPU's sheaf, so cross-CPU frees never touch the owner's fast path, and no
//! per-slab lockless freelist (with its `cmpxchg_double`) is needed.
//!
//! # Invariants (under the CPU's guard)
//!
//! `count <= cap <= SHEAF_MAX`; `objs[..count]` are distinct free objects of the cache,
//! counted as in use by their slabs.

use core::sync::atomic::{AtomicPtr, Ordering::Relaxed};

/// Most objects a sheaf holds: a header word and 127 pointers make 1 KiB.
pub const SHEAF_MAX: usize = 127;

/// Full sheaves a cache's barn holds (Linux's per-node barn of sheaves): a CPU whose sheaf
/// is full parks it there, a CPU whose sheaf is empty takes one, so objects freed on one CPU
/// reach another in whole sheaves, without touching the slabs.
pub const BARN_SHEAVES: usize = 8;

/// The default capacity for objects of `size` bytes: smaller sheaves for bigger objects, so a
/// sheaf never hides much memory.
pub fn default_capacity(size: usize) -> usize {
    match size {
        0..=256 => SHEAF_MAX,
        257..=1024 => 32,
        1025..=4096 => 8,
        _ => 4,
    }
}

/// One CPU's sheaf of one cache.
///
/// Slot 0 holds the count (as an address without provenance) and slots `1..=count` the
/// objects, so the top object is always `slots[count]`: for an empty sheaf that is the count
/// itself, 0, which no object address equals. The double-free check on the push path is
/// therefore one load and one compare, with no test for emptiness.
#[repr(C, align(64))]
pub struct Sheaf {
    slots: [AtomicPtr<u8>; SHEAF_MAX + 1],
}

const _: () = assert!(core::mem::size_of::<Sheaf>() == 1024);

impl Sheaf {
    /// An empty sheaf.
    pub(crate) const fn new() -> Sheaf {
        Sheaf {
            slots: [const { AtomicPtr::new(core::ptr::null_mut()) }; SHEAF_MAX + 1],
        }
    }

    #[inline(always)]
    fn load_count(&self) -> usize {
        self.slots[0].load(Relaxed).addr()
    }

    #[inline(always)]
    fn store_count(&self, n: usize) {
        self.slots[0].store(core::ptr::without_provenance_mut(n), Relaxed);
    }

    /// Objects in the sheaf (racy read for reports).
    #[inline(always)]
    pub fn count(&self) -> usize {
        self.load_count()
    }

    /// Pops an object. Caller holds this CPU's guard.
    #[inline(always)]
    pub(crate) fn pop(&self) -> Option<*mut u8> {
        let n = self.load_count();
        if n == 0 {
            return None;
        }
        self.store_count(n - 1);
        // SAFETY: `1 <= n <= SHEAF_MAX`: an object slot.
        Some(unsafe { self.slots.get_unchecked(n) }.load(Relaxed))
    }

    /// Pushes `obj` if the sheaf holds fewer than `cap` objects. Caller holds the guard.
    #[inline(always)]
    pub(crate) fn push(&self, obj: *mut u8, cap: u32) -> bool {
        let n = self.load_count();
        if n >= cap as usize {
            return false;
        }
        // SAFETY: `n < cap <= SHEAF_MAX`, so `n + 1` is an object slot.
        unsafe { self.slots.get_unchecked(n + 1) }.store(obj, Relaxed);
        self.store_count(n + 1);
        true
    }

    /// Pushes `obj` unless it is already on top (a naive double free: `Err(true)`) or the
    /// sheaf holds `cap` objects (`Err(false)`). `obj` is not null. Caller holds the guard.
    #[inline(always)]
    pub(crate) fn push_checked(&self, obj: *mut u8, cap: u32) -> Result<(), bool> {
        let n = self.load_count();
        // SAFETY: `n <= SHEAF_MAX`: the top object, or the count (0) when empty.
        if unsafe { self.slots.get_unchecked(n) }.load(Relaxed) == obj {
            return Err(true);
        }
        if n >= cap as usize {
            return Err(false);
        }
        // SAFETY: `n < cap <= SHEAF_MAX`, so `n + 1` is an object slot.
        unsafe { self.slots.get_unchecked(n + 1) }.store(obj, Relaxed);
        self.store_count(n + 1);
        Ok(())
    }

    /// Moves every object of `self` into `dst` (empty), leaving `self` empty. The caller
    /// holds what guards both (a CPU guard and the barn lock).
    pub(crate) fn move_all_to(&self, dst: &Sheaf) {
        let n = self.load_count();
        debug_assert_eq!(dst.count(), 0);
        for i in 1..=n {
            dst.slots[i].store(self.slots[i].load(Relaxed), Relaxed);
        }
        dst.store_count(n);
        self.store_count(0);
    }

    /// Takes up to `out.len()` objects from the bottom (the coldest), keeping the order of the
    /// rest. Returns how many. Caller holds the guard.
    pub(crate) fn take_cold(&self, out: &mut [*mut u8]) -> usize {
        let n = self.load_count();
        let k = out.len().min(n);
        for (i, slot) in out.iter_mut().enumerate().take(k) {
            *slot = self.slots[1 + i].load(Relaxed);
        }
        for i in k..n {
            self.slots[1 + i - k].store(self.slots[1 + i].load(Relaxed), Relaxed);
        }
        self.store_count(n - k);
        k
    }
}
