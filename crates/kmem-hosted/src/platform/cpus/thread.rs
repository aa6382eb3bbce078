//! Per-thread state (the slots the fast path reads) and the guard type.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use kmem::platform::CpuGuard;

use super::{CpuSet, NO_CPU, NSLOTS, Seat, Shared, VCpu};

/// A thread's state on one machine.
pub(super) struct Slot {
    /// The machine's id; 0 for an empty slot.
    pub(super) id: Cell<u64>,
    /// This thread's seat on the machine (its owner token).
    pub(super) seat: Cell<*const Seat>,
    /// The [`token`](super::token) of the sticky vCPU, or 0 when none is known (always 0 in
    /// [`GuardMode::Cas`](super::GuardMode::Cas)). The value the fast path stores in the
    /// seat's `busy` and compares with its `grant`; the CPU is `sticky - 1`.
    pub(super) sticky: Cell<usize>,
    /// The sticky vCPU's index; when `sticky` is 0, the last one (tried first).
    pub(super) sticky_cpu: Cell<u32>,
    /// Live guards on the sticky vCPU.
    pub(super) sdepth: Cell<u32>,
    /// Live guards of this machine held by this thread (`in_atomic` when > 0).
    pub(super) count: Cell<u32>,
    /// The CPU of the guard that started the atomic section, for nested `cpu_guard`s
    /// (checked before use: `NO_CPU` or stale once that CPU's guards are gone).
    pub(super) cur: Cell<u32>,
    /// The vCPU tried after the last sticky one.
    pub(super) home: Cell<u32>,
    /// The machine's vCPUs (for dropping a locked guard).
    pub(super) vcpus: Cell<*const VCpu>,
    /// `id` while the fast path may run (no guard held, a sticky vCPU known), else 0: the
    /// fast path's single test. Kept by [`Slot::refresh`] whenever `id`, `count` or `sticky`
    /// changes (through `set_id`, `set_count`, `set_sticky`).
    pub(super) fast: Cell<u64>,
}

impl Slot {
    const fn empty() -> Slot {
        Slot {
            id: Cell::new(0),
            seat: Cell::new(core::ptr::null()),
            sticky: Cell::new(0),
            sticky_cpu: Cell::new(0),
            sdepth: Cell::new(0),
            count: Cell::new(0),
            cur: Cell::new(NO_CPU),
            home: Cell::new(0),
            vcpus: Cell::new(core::ptr::null()),
            fast: Cell::new(0),
        }
    }

    /// Recomputes `fast` from `id`, `count` and `sticky`.
    #[inline(always)]
    pub(super) fn refresh(&self) {
        let usable = self.count.get() == 0 && self.sticky.get() != 0;
        self.fast.set(if usable { self.id.get() } else { 0 });
    }

    /// Sets `count` (and `fast`).
    #[inline(always)]
    pub(super) fn set_count(&self, n: u32) {
        self.count.set(n);
        self.refresh();
    }

    /// Sets `sticky` (and `fast`).
    #[inline(always)]
    pub(super) fn set_sticky(&self, t: usize) {
        self.sticky.set(t);
        self.refresh();
    }

    /// Sets `id` (and `fast`).
    #[inline(always)]
    pub(super) fn set_id(&self, id: u64) {
        self.id.set(id);
        self.refresh();
    }

    pub(super) fn swap(&self, other: &Slot) {
        self.id.swap(&other.id);
        self.seat.swap(&other.seat);
        self.sticky.swap(&other.sticky);
        self.sticky_cpu.swap(&other.sticky_cpu);
        self.sdepth.swap(&other.sdepth);
        self.count.swap(&other.count);
        self.cur.swap(&other.cur);
        self.home.swap(&other.home);
        self.vcpus.swap(&other.vcpus);
        self.refresh();
        other.refresh();
    }
}

pub(super) struct ThreadState {
    /// `slots[0]` is the slot used last (the only one the fast path looks at); slow paths
    /// move a slot there when no guard points to either.
    pub(super) slots: [Slot; NSLOTS],
}

impl ThreadState {
    #[inline(always)]
    pub(super) fn first(&self) -> &Slot {
        &self.slots[0]
    }

    pub(super) fn find(&self, id: u64) -> Option<&Slot> {
        self.slots.iter().find(|s| s.id.get() == id)
    }
}

/// This thread's [`ThreadState`].
///
/// Returned as a reference rather than used inside `LocalKey::with`, whose closure result
/// travels through a `Result` on the stack: a guard returned that way is copied with
/// overlapping moves that stall store forwarding.
#[inline(always)]
pub(super) fn thread_state<'t>() -> &'t ThreadState {
    let t = THREAD.with(|t| t as *const ThreadState);
    // SAFETY: `THREAD` is const-initialized and has no destructor, so it is valid from the
    // thread's start to its end, and every caller uses the reference on this thread only,
    // for the duration of a call (guards keep a raw pointer, see `HostedGuard::drop`).
    unsafe { &*t }
}

thread_local! {
    /// Destructor-free, so that the fast path reaches it with no lazy-initialization check.
    pub(super) static THREAD: ThreadState = const {
        ThreadState {
            slots: [const { Slot::empty() }; NSLOTS],
        }
    };
    /// The seats this thread holds, given back when it exits. Touched on slow paths only.
    pub(super) static SEATS: Seats = const { Seats(RefCell::new(Vec::new())) };
}

/// A seat this thread holds, to give back when it exits.
pub(super) struct SeatRef {
    pub(super) id: u64,
    pub(super) shared: Weak<Shared>,
    pub(super) seat: *const Seat,
}

pub(super) struct Seats(pub(super) RefCell<Vec<SeatRef>>);

impl Seats {
    /// Gives back the seat (and vCPUs) this thread holds on machine `id`, if any.
    pub(super) fn remove(&self, id: u64) {
        let mut v = self.0.borrow_mut();
        if let Some(i) = v.iter().position(|r| r.id == id) {
            let r = v.swap_remove(i);
            drop(v);
            if let Some(shared) = r.shared.upgrade() {
                shared.release_seat(r.seat);
            }
        }
    }
}

impl Drop for Seats {
    fn drop(&mut self) {
        // Later code on this thread (other thread-locals' destructors) must not use seats
        // that are about to be recycled: forget them all.
        let _ = THREAD.try_with(|t| {
            for s in &t.slots {
                s.set_id(0);
            }
        });
        for r in self.0.get_mut().drain(..) {
            if let Some(shared) = r.shared.upgrade() {
                shared.release_seat(r.seat);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The guard
// ---------------------------------------------------------------------------------------------

/// A section on one virtual CPU of a [`HostedPlatform`](crate::platform::HostedPlatform).
///
/// While any guard on vCPU *c* lives, the thread that holds it is the only one in a section
/// on *c*. A thread's guards on one machine nest: the first one (from
/// [`Platform::cpu_guard`](kmem::platform::Platform::cpu_guard)) enters a vCPU, later ones
/// reuse it, report [`CpuGuard::nested`] and cost no atomic operation. A guard from
/// [`Platform::lock_cpu`](kmem::platform::Platform::lock_cpu) of another vCPU enters that
/// vCPU too (a thread may hold several); nested `cpu_guard`s keep running on the CPU of the
/// guard that started the atomic section. Guards may be dropped in any order. Not `Send`: a
/// guard is released by the thread that took it. See the module documentation of
/// `platform::cpus` for how sections exclude each other.
pub struct HostedGuard<'a> {
    /// This thread's slot for the machine (in its `THREAD` thread-local), tagged with
    /// [`TAG_STICKY`] and [`TAG_NESTED`]. Two scalars, so the guard travels in registers.
    slot: *const Slot,
    cpu: u32,
    _machine: PhantomData<&'a CpuSet>,
}

/// Tag of `HostedGuard::slot`: a guard on the sticky vCPU (else of a locked section).
const TAG_STICKY: usize = 1;
/// Tag of `HostedGuard::slot`: the guard was taken inside another one.
const TAG_NESTED: usize = 2;
const _: () = assert!(align_of::<Slot>() > TAG_STICKY | TAG_NESTED);

impl HostedGuard<'_> {
    #[inline(always)]
    pub(super) fn new(slot: &Slot, cpu: u32, sticky: bool, nested: bool) -> Self {
        let tag = if sticky { TAG_STICKY } else { 0 } | if nested { TAG_NESTED } else { 0 };
        HostedGuard {
            slot: (slot as *const Slot).map_addr(|a| a | tag),
            cpu,
            _machine: PhantomData,
        }
    }

    #[inline(always)]
    fn tag(&self) -> usize {
        self.slot.addr() & (TAG_STICKY | TAG_NESTED)
    }

    #[inline(always)]
    fn sticky(&self) -> bool {
        self.tag() & TAG_STICKY != 0
    }

    #[inline(never)]
    fn drop_locked(&self, s: &Slot) {
        // SAFETY: the slot's vCPU array is that of the machine this guard borrows, alive for
        // `'a`, and `cpu` is in bounds.
        let v = unsafe { &*s.vcpus.get().add(self.cpu as usize) };
        let depth = v.depth.load(Ordering::Relaxed) - 1;
        v.depth.store(depth, Ordering::Relaxed);
        if depth == 0 {
            v.owner.store(0, Ordering::Release);
            if s.cur.get() == self.cpu {
                s.cur.set(NO_CPU);
            }
        }
    }
}

impl CpuGuard for HostedGuard<'_> {
    #[inline(always)]
    fn cpu(&self) -> usize {
        self.cpu as usize
    }

    #[inline(always)]
    fn nested(&self) -> bool {
        self.tag() & TAG_NESTED != 0
    }
}

impl Drop for HostedGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: the slot lives in the `THREAD` thread-local of the thread that made this
        // guard; the guard is not `Send`, so this is that thread, whose const-initialized,
        // destructor-free thread-local stays valid until it exits. A slot with live guards
        // is never given to another machine, so it is still this guard's.
        let s = unsafe { &*self.slot.map_addr(|a| a & !(TAG_STICKY | TAG_NESTED)) };
        s.set_count(s.count.get() - 1);
        if self.sticky() {
            let depth = s.sdepth.get() - 1;
            s.sdepth.set(depth);
            if depth == 0 {
                // SAFETY: the slot's seat belongs to the machine this guard borrows.
                unsafe { &*s.seat.get() }.busy.store(0, Ordering::Release);
            }
        } else {
            self.drop_locked(s);
        }
    }
}

impl fmt::Debug for HostedGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostedGuard")
            .field("cpu", &self.cpu)
            .field("nested", &self.nested())
            .field("sticky", &self.sticky())
            .finish()
    }
}
