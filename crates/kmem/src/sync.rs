//! Locks for the core: a test-and-test-and-set spinlock behind [`lock_api`].
//!
//! Kernel locks in the core are short, never held across a sleep, and taken in a fixed order
//! (documented by each module that takes more than one). The spin loop calls a relax hook that
//! a hosted platform sets to yield the thread, so a preempted holder is not spun on for a whole
//! time slice.

use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

/// The raw spinlock: one byte, `true` while held.
pub struct RawSpinLock {
    locked: AtomicBool,
}

fn default_relax() {
    core::hint::spin_loop();
}

static RELAX_HOOK: AtomicPtr<()> = AtomicPtr::new(default_relax as fn() as *mut ());

/// Sets the function spin loops call while they wait (a hosted platform passes a yield).
pub fn set_relax_hook(f: fn()) {
    RELAX_HOOK.store(f as *mut (), Ordering::Relaxed);
}

/// Calls the relax hook once: the body of every spin-wait loop in the core.
#[inline]
pub fn cpu_relax() {
    let p = RELAX_HOOK.load(Ordering::Relaxed);
    // SAFETY: RELAX_HOOK only ever holds a value cast from a `fn()` (its initializer and
    // `set_relax_hook`), so casting it back yields that function pointer.
    let f: fn() = unsafe { core::mem::transmute::<*mut (), fn()>(p) };
    f();
}

// SAFETY: `lock` returns only after swapping `locked` from false to true with Acquire, and
// `unlock` stores false with Release, so at most one holder exists and its writes happen
// before the next holder's reads.
unsafe impl lock_api::RawMutex for RawSpinLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawSpinLock = RawSpinLock {
        locked: AtomicBool::new(false),
    };

    type GuardMarker = lock_api::GuardSend;

    #[inline]
    fn lock(&self) {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            let mut spins = 0u32;
            while self.locked.load(Ordering::Relaxed) {
                spins += 1;
                if spins < 64 {
                    core::hint::spin_loop();
                } else {
                    cpu_relax();
                }
            }
        }
    }

    #[inline]
    fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    #[inline]
    unsafe fn unlock(&self) {
        self.locked.store(false, Ordering::Release);
    }

    #[inline]
    fn is_locked(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

/// A spinlock protecting a `T` (`spinlock_t` with its data).
pub type SpinLock<T> = lock_api::Mutex<RawSpinLock, T>;
/// The guard of a [`SpinLock`].
pub type SpinLockGuard<'a, T> = lock_api::MutexGuard<'a, RawSpinLock, T>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_excludes() {
        let l = SpinLock::new(5);
        let g = l.lock();
        assert!(l.try_lock().is_none());
        drop(g);
        *l.lock() += 1;
        assert_eq!(*l.lock(), 6);
    }
}
