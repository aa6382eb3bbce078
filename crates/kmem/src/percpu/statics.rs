//! Static per-CPU variables: the `DEFINE_PER_CPU` role.
//!
//! Linux gathers `DEFINE_PER_CPU` variables into a linker section and copies it into every
//! unit of the first chunk at boot. A Rust `static` cannot be gathered that way in all three
//! of kmem's homes (a kernel, a simulated machine, a process allocator) without a linker
//! script, and one process may run several simulated machines. So a [`PerCpu<T>`] holds its
//! copies itself: [`NR_CPUS`] slots, each on its own cache line so that no two CPUs' copies
//! share one (the property the unit layout gives in Linux). The API is Linux's:
//!
//! * [`PerCpu::get_cpu_var`] pins the caller to its CPU and yields `&mut T` until the guard
//!   drops (`put_cpu_var`). Taking the same variable twice on one CPU (a nested
//!   `get_cpu_var` of it, or a `this_cpu_*` operation on it while it is held) would create
//!   two `&mut` to one copy; it is caught and reported as a bug (a panic).
//! * [`PerCpu::per_cpu`] is another CPU's copy: the caller runs on that CPU's behalf
//!   ([`Platform::lock_cpu`]) for as long as it holds the reference, so the access is
//!   exclusive. A slow path (sums, initialization), as `per_cpu()` is in Linux.
//! * `this_cpu_read/write/add/sub/inc/dec` on integer variables: a CPU section around a
//!   plain load and store (see the [module docs](super)).
//!
//! A variable is bound to the first machine (platform) that uses it; using it from another
//! machine in the same process is a bug and panics, because two machines' CPU 0s would
//! share the copy.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::ptr;
use core::sync::atomic::{AtomicPtr, Ordering};

use super::PcpuInt;
use crate::platform::{CpuGuard, Platform};

/// Copies a [`PerCpu`] has by default (`CONFIG_NR_CPUS`): machines with more CPUs need a
/// `PerCpu<T, N>` with a larger `N`.
pub const NR_CPUS: usize = 64;

/// One CPU's copy, alone on its cache line(s).
#[repr(C, align(64))]
pub struct PcpuSlot<T> {
    value: UnsafeCell<T>,
    borrowed: UnsafeCell<bool>, // a `get_cpu_var`/`per_cpu` reference is out
}

impl<T> PcpuSlot<T> {
    /// A slot holding `v` (for [`define_per_cpu!`](crate::define_per_cpu)).
    pub const fn new(v: T) -> PcpuSlot<T> {
        PcpuSlot {
            value: UnsafeCell::new(v),
            borrowed: UnsafeCell::new(false),
        }
    }
}

/// A static per-CPU variable (`DEFINE_PER_CPU(T, name)`): `N` copies, one per CPU id.
pub struct PerCpu<T, const N: usize = NR_CPUS> {
    owner: AtomicPtr<()>, // the platform this variable is bound to (null: not yet)
    slots: [PcpuSlot<T>; N],
}

// SAFETY: a copy is only reached by the task running on its CPU (inside a CPU section, which
// excludes every other task from that CPU) or by a task that took the CPU over with
// `lock_cpu`; both are exclusive, and `borrowed` catches reentry on the same CPU. The owner
// check keeps two machines from sharing a copy. So `T` moves between threads but is never
// shared: `Send` suffices.
unsafe impl<T: Send, const N: usize> Sync for PerCpu<T, N> {}

impl<T: Copy, const N: usize> PerCpu<T, N> {
    /// A variable whose every copy starts as `v`. Usable in a `static`.
    pub const fn new(v: T) -> Self {
        let mut slots = [const { core::mem::MaybeUninit::<PcpuSlot<T>>::uninit() }; N];
        let mut i = 0;
        while i < N {
            slots[i] = core::mem::MaybeUninit::new(PcpuSlot::new(v));
            i += 1;
        }
        PerCpu {
            owner: AtomicPtr::new(ptr::null_mut()),
            // SAFETY: every element was initialized by the loop; `MaybeUninit<S>` has the
            // layout of `S`, so the array reads as `[S; N]`, and `slots` is not used again
            // (its elements need no drop: `T: Copy`).
            slots: unsafe { ptr::read((&raw const slots).cast::<[PcpuSlot<T>; N]>()) },
        }
    }
}

impl<T, const N: usize> PerCpu<T, N> {
    /// A variable from its slots (for [`define_per_cpu!`](crate::define_per_cpu), which
    /// builds them from a constant expression for types that are not `Copy`).
    pub const fn from_slots(slots: [PcpuSlot<T>; N]) -> Self {
        PerCpu {
            owner: AtomicPtr::new(ptr::null_mut()),
            slots,
        }
    }

    /// Checks (and on first use records) that `p` is the machine this variable belongs to.
    #[inline(always)]
    fn bind<P: Platform>(&self, p: &P) {
        let me = (p as *const P).cast::<()>().cast_mut();
        if self.owner.load(Ordering::Relaxed) != me {
            self.bind_slow(me);
        }
    }

    #[cold]
    #[inline(never)]
    fn bind_slow(&self, me: *mut ()) {
        if let Err(other) =
            self.owner
                .compare_exchange(ptr::null_mut(), me, Ordering::Relaxed, Ordering::Relaxed)
        {
            assert!(
                other == me,
                "BUG: per-CPU variable used by two machines ({other:p} and {me:p})"
            );
        }
    }

    #[inline(always)]
    fn slot(&self, cpu: usize) -> &PcpuSlot<T> {
        match self.slots.get(cpu) {
            Some(s) => s,
            None => too_many_cpus(cpu, N),
        }
    }

    /// Marks `slot` borrowed, or panics if it is.
    fn take(slot: &PcpuSlot<T>, cpu: usize) {
        // SAFETY: `borrowed` is only touched by whoever holds `cpu` exclusively (a CPU
        // section or `lock_cpu`), which the caller does.
        let b = unsafe { &mut *slot.borrowed.get() };
        assert!(
            !*b,
            "BUG: per-CPU variable taken twice on CPU {cpu} (nested get_cpu_var)"
        );
        *b = true;
    }

    /// Pins the caller to its CPU and returns that CPU's copy (`get_cpu_var`); dropping the
    /// reference is `put_cpu_var`.
    ///
    /// Context: any. Panics if this CPU's copy is already taken (a nested `get_cpu_var` of
    /// the same variable), or if the variable belongs to another machine.
    pub fn get_cpu_var<'a, P: Platform>(&'a self, p: &'a P) -> PerCpuRef<'a, T, P::Guard<'a>> {
        self.bind(p);
        let guard = p.cpu_guard();
        let cpu = guard.cpu();
        let slot = self.slot(cpu);
        Self::take(slot, cpu);
        PerCpuRef { guard, slot, cpu }
    }

    /// CPU `cpu`'s copy (`per_cpu(var, cpu)`), exclusively: the caller runs on that CPU's
    /// behalf until the reference drops.
    ///
    /// Context: process context, a slow path; not while holding another CPU's guard. Panics
    /// if `cpu >= nr_cpu_ids` or the copy is taken.
    pub fn per_cpu<'a, P: Platform>(
        &'a self,
        p: &'a P,
        cpu: usize,
    ) -> PerCpuRef<'a, T, P::Guard<'a>> {
        assert!(cpu < p.nr_cpu_ids(), "per_cpu: CPU {cpu} does not exist");
        self.bind(p);
        let slot = self.slot(cpu);
        let guard = p.lock_cpu(cpu);
        Self::take(slot, cpu);
        PerCpuRef { guard, slot, cpu }
    }

    /// The copies, given exclusive access to the variable (no CPU can be using it).
    pub fn get_mut(&mut self, cpu: usize) -> &mut T {
        self.slots[cpu].value.get_mut()
    }
}

#[cold]
#[inline(never)]
fn too_many_cpus(cpu: usize, n: usize) -> ! {
    panic!("per-CPU variable has {n} copies but runs on CPU {cpu}: give it more (PerCpu<T, N>)")
}

/// Why a `this_cpu` operation could not run (reported after its CPU section ends).
enum Refused {
    Range(usize),
    Taken(usize),
}

impl<T: PcpuInt, const N: usize> PerCpu<T, N> {
    /// Runs `f` on this CPU's copy inside a CPU section.
    #[inline(always)]
    fn with_this<P: Platform, R>(&self, p: &P, f: impl FnOnce(*mut T) -> R) -> R {
        self.bind(p);
        // SAFETY: the closure loads and stores the copy and reads its flag: it takes no guard
        // and does not sleep. It does not panic either (refusals are reported after).
        let r = unsafe {
            p.this_cpu(|cpu, _| {
                let Some(slot) = self.slots.get(cpu) else {
                    return Err(Refused::Range(cpu));
                };
                // The flag of this CPU's slot, read inside its CPU section.
                if *slot.borrowed.get() {
                    return Err(Refused::Taken(cpu));
                }
                Ok(f(slot.value.get()))
            })
        };
        match r {
            Ok(v) => v,
            Err(Refused::Range(cpu)) => too_many_cpus(cpu, N),
            Err(Refused::Taken(cpu)) => {
                panic!("BUG: this_cpu operation on a per-CPU variable taken on CPU {cpu}")
            }
        }
    }

    /// `this_cpu_read`.
    #[inline]
    pub fn this_cpu_read<P: Platform>(&self, p: &P) -> T {
        // SAFETY: this CPU's copy, not borrowed, inside its CPU section: every access to a
        // copy of an integer variable other than through a `PerCpuRef` is atomic.
        self.with_this(p, |c| unsafe { T::load(c) })
    }

    /// `this_cpu_write`.
    #[inline]
    pub fn this_cpu_write<P: Platform>(&self, p: &P, v: T) {
        // SAFETY: as in `this_cpu_read`.
        self.with_this(p, |c| unsafe { T::store(c, v) })
    }

    /// `this_cpu_add`: no lock, no atomic read-modify-write; wraps.
    #[inline]
    pub fn this_cpu_add<P: Platform>(&self, p: &P, v: T) {
        // SAFETY: as in `this_cpu_read`.
        self.with_this(p, |c| unsafe { T::store(c, T::load(c).wrapping_add(v)) })
    }

    /// `this_cpu_add_return`: adds `v`, returns the new value.
    #[inline]
    pub fn this_cpu_add_return<P: Platform>(&self, p: &P, v: T) -> T {
        self.with_this(p, |c| {
            // SAFETY: as in `this_cpu_read`.
            unsafe {
                let n = T::load(c).wrapping_add(v);
                T::store(c, n);
                n
            }
        })
    }

    /// `this_cpu_sub`; wraps.
    #[inline]
    pub fn this_cpu_sub<P: Platform>(&self, p: &P, v: T) {
        // SAFETY: as in `this_cpu_read`.
        self.with_this(p, |c| unsafe { T::store(c, T::load(c).wrapping_sub(v)) })
    }

    /// `this_cpu_inc`.
    #[inline]
    pub fn this_cpu_inc<P: Platform>(&self, p: &P) {
        self.this_cpu_add(p, T::ONE)
    }

    /// `this_cpu_dec`.
    #[inline]
    pub fn this_cpu_dec<P: Platform>(&self, p: &P) {
        self.this_cpu_sub(p, T::ONE)
    }

    /// Every possible CPU's copy added up (wrapping), each read exclusively through
    /// [`PerCpu::per_cpu`]. A slow path.
    pub fn sum<P: Platform>(&self, p: &P) -> T {
        (0..p.nr_cpu_ids()).fold(T::ZERO, |s, cpu| s.wrapping_add(*self.per_cpu(p, cpu)))
    }
}

/// A CPU's copy of a [`PerCpu`] variable, held with that CPU pinned (`get_cpu_var`) or taken
/// over (`per_cpu`). Dropping it releases both.
pub struct PerCpuRef<'a, T, G: CpuGuard> {
    guard: G,
    slot: &'a PcpuSlot<T>,
    cpu: usize,
}

impl<T, G: CpuGuard> PerCpuRef<'_, T, G> {
    /// The CPU whose copy this is.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The guard pinning the CPU (for nested per-CPU work on the same CPU).
    pub fn guard(&self) -> &G {
        &self.guard
    }
}

impl<T, G: CpuGuard> Deref for PerCpuRef<'_, T, G> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the slot is marked borrowed by this reference and its CPU is held, so no
        // other reference to the value exists.
        unsafe { &*self.slot.value.get() }
    }
}

impl<T, G: CpuGuard> DerefMut for PerCpuRef<'_, T, G> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes this the only use.
        unsafe { &mut *self.slot.value.get() }
    }
}

impl<T, G: CpuGuard> Drop for PerCpuRef<'_, T, G> {
    fn drop(&mut self) {
        // SAFETY: the CPU is still held (the guard drops after this body).
        unsafe { *self.slot.borrowed.get() = false };
    }
}

/// Defines a static per-CPU variable (`DEFINE_PER_CPU`) from a constant expression, for
/// types that are not `Copy`:
///
/// ```
/// kmem::define_per_cpu! {
///     /// Requests served on each CPU.
///     pub static SERVED: [u64; 4] = [0; 4];
/// }
/// ```
#[macro_export]
macro_rules! define_per_cpu {
    ($(#[$m:meta])* $vis:vis static $name:ident : $t:ty = $init:expr ;) => {
        $(#[$m])*
        $vis static $name: $crate::percpu::PerCpu<$t> = $crate::percpu::PerCpu::from_slots(
            [const { $crate::percpu::statics::PcpuSlot::new($init) }; $crate::percpu::NR_CPUS],
        );
    };
}
