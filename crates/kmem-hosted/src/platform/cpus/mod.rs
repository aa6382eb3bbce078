//! Virtual CPUs and their guards: biased ("sticky") ownership with an asymmetric fence.
//!
//! # State
//!
//! * A **vCPU** ([`VCpu`], alone on its cache lines) has an `owner` word: 0 when free, the
//!   address of a *seat* (below) when a thread owns it *stickily* (a *plain* owner), or a
//!   seat's address with bit 0 ([`LOCKED`]) set while a thread holds it in a *locked* section
//!   (a `lock_cpu` of a vCPU that was not the caller's, a section taken over from another
//!   thread that is still being waited for, or any section in [`GuardMode::Cas`]). Locked
//!   sections count their guards in `depth`, touched only by the holder. `owner` is the
//!   authority on who has a vCPU; it changes only by compare-and-swap, or by plain stores of
//!   the thread that holds it locked.
//! * A **seat** ([`Seat`], also alone on its cache lines) is one thread's identity on one
//!   machine. Two words, on one cache line, name vCPUs by their *token* `cpu + 1` (never 0):
//!   * `busy` is the token of the seat's sticky vCPU while its thread is inside a section
//!     on it (or trying to enter one), else 0. Only the seat's thread writes it.
//!   * `grant` is the token of the vCPU the seat owns stickily, else 0: what the fast path
//!     checks instead of the vCPU's `owner`. The seat's thread sets it (only as described
//!     under *Grants*); a revoker that takes that vCPU from the seat clears it.
//!
//!   Seats belong to the machine (they are freed with it) and are recycled when their thread
//!   exits.
//! * A thread keeps, per machine, a [`Slot`] in a `const`, destructor-free thread-local: the
//!   machine id, its seat, its sticky vCPU's token (`sticky`, 0 for none) and index, and
//!   guard counts (`sdepth` for guards on the sticky vCPU, `count` for all guards of the
//!   machine, which is `in_atomic`).
//!
//! # The fast path
//!
//! A thread that got a vCPU *keeps* it when its section ends. Its next `cpu_guard` (or
//! `this_cpu`), with `t` the slot's `sticky` token, does
//!
//! ```text
//! seat.busy = t                (plain store, Release)
//! compiler fence
//! if seat.grant == t           (plain load, Acquire)  -> inside the section on t - 1
//! ```
//!
//! and the guard's drop stores `seat.busy = 0` (Release). Nested guards only touch the
//! thread-local counts. No atomic read-modify-write, no hardware fence, and no access to the
//! vCPU: both words are on the seat's cache line, which only revocations write besides the
//! thread itself.
//!
//! # Grants
//!
//! Invariants (G), for every seat X and vCPU c:
//!
//! 1. if `c.owner == X` (plain), then `X.grant == c + 1`;
//! 2. if `X.grant == c + 1` while X's thread is outside its own acquiring step below, then
//!    `c.owner == X`, or a revoker has replaced `c.owner == X` and has not yet cleared the
//!    grant (so it has not started its membarrier either).
//!
//! So a seat owns at most one vCPU plainly, and it is the sticky vCPU of its slot. They hold
//! because of three rules:
//!
//! * **Granting happens before owning.** X sets `X.grant = c + 1` only while it does not own
//!   `c` and just before making itself its plain owner: before its `CAS(c.owner, 0, X)`
//!   (AcqRel; on failure X puts `grant` back to 0), or after a steal, before its
//!   `c.owner = X` (Release). A revoker reads `owner == X` with Acquire, so X's grant store
//!   happens before the revoker's clear, and the clear wins.
//! * **Clearing happens after disowning.** A revoker clears X's grant only after its CAS took
//!   `c` from X, and only if it still names `c` (`CAS(X.grant, c + 1, 0)`): a later grant of
//!   another vCPU is not its to clear. While it holds `c` locked nobody else can own `c`, so
//!   the grant it clears cannot be a newer one of `c`. Thread exit (`release_seat`) disowns
//!   every vCPU of the seat and then clears its grant.
//! * X never re-grants a vCPU it already owns (a grant store could land after a revoker's
//!   clear); it checks the grant through the fast-path protocol instead (`try_sticky`).
//!
//! # Revocation
//!
//! Another thread R takes a vCPU `c` owned by seat X (to *steal* it when every vCPU has an
//! owner, or for `lock_cpu(c)`) by
//!
//! 1. `CAS(c.owner, X, R | LOCKED)` (Acquire): nobody can grant `c` to itself any more;
//! 2. `CAS(X.grant, c + 1, 0)`: X's later sections on `c` fail their grant check;
//! 3. `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`;
//! 4. waiting until `X.busy != c + 1` (Acquire): X has left the section it was in.
//!
//! R then has `c` to itself. A `lock_cpu` section gives `c` back on drop (`owner = 0`), and
//! X finds it again with a compare-and-swap on its slow path (granting first); a steal
//! becomes R's sticky vCPU (`R.busy = c + 1`, `R.grant = c + 1`, then `owner = R`, Release).
//!
//! **Why this is exclusive.** X's fast path is *store `busy`; load `grant`*, with only a
//! compiler fence between them, so the CPU may let the load pass the store. The membarrier
//! makes every thread of the process that is running during the call execute a full memory
//! barrier (threads not running have passed through the scheduler, which is one). Take X's
//! section entry and the point where that barrier lands in X's instruction stream:
//!
//! * if the barrier lands after X's `busy` store, the store is visible to everyone when the
//!   membarrier returns, so R's step 4 reads `c + 1` (or the 0 that X stores on leaving) and
//!   waits for X to leave;
//! * if it lands before the store, X's `grant` load comes after the barrier, which comes after
//!   R's step 2 (the membarrier is called after it and orders it): X reads R's 0, or a value
//!   X stored later itself, which is never `c + 1` while R holds `c` (by (G)), and bails out
//!   to its slow path without touching the per-CPU data.
//!
//! Either way no section of X on `c` overlaps R's. If R's step 2 finds no grant of `c` to
//! clear (X's thread exited and released the seat), X's grant already does not name `c`,
//! and while R holds `c` locked X cannot grant it to itself again: its acquiring CAS fails
//! and it puts the grant back to 0 before it tries any section. X's drop stores `busy = 0`
//! with Release and R reads it with Acquire, so X's writes in its section happen before R's;
//! sections of X after it got `c` back are ordered after R's by the compare-and-swap that
//! got it (Acquire against R's release of `c`). Because only X writes X's `busy`, a stale
//! thread (whose vCPU was revoked while it was idle) cannot clear the `busy` of the new
//! owner: its failed attempt writes its own seat only. A thread is in a sticky section on at
//! most one vCPU per machine (nested `cpu_guard`s reuse it, and it picks a new sticky vCPU
//! only when it holds no guard of the machine), so one `busy` word per seat is enough;
//! holding the token rather than 1 keeps a revoker of `c` from waiting for the thread's
//! sections on another vCPU.
//!
//! A locked owner (bit 0) is never revoked: others wait for it to become 0 (`lock_cpu`) or
//! look elsewhere (`cpu_guard`). Seat recycling cannot fool a revoker: a recycled seat's
//! `busy` is `c + 1` only when its new thread owns `c`, which needs `c`'s owner to pass
//! through 0 or a plain owner, and a revoker holds it locked while it waits; its `grant` was
//! cleared before the seat went back to the pool, and a revoker's late clear of it can only
//! name the vCPU that revoker holds locked.
//!
//! # Slow paths
//!
//! `cpu_guard` with no usable sticky vCPU tries, with a compare-and-swap from 0, its last
//! sticky vCPU, its home (round-robin at first use), then the others; if all are owned it
//! steals one, preferring owners that look idle, home first. So more threads than vCPUs
//! work, at the price of a membarrier per steal.
//!
//! # Without membarrier
//!
//! When `membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)` is not available (or
//! [`GuardMode::Cas`] is asked for), every `cpu_guard` section is a locked section: one
//! compare-and-swap to enter (on the home vCPU, then the others), one store to leave, no
//! sticky ownership, no membarrier. The mode is fixed when the machine is made.
//!
//! # Thread exit
//!
//! A second thread-local, with a destructor, lists the thread's seats with a `Weak` reference
//! to their machine. It is touched only when a slot is created or reused. On thread exit it
//! gives back every vCPU the thread owns (CAS seat -> 0) and recycles the seats of machines
//! that are still alive; the fast path never touches it.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering, compiler_fence};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use kmem::platform::CpuGuard as _;
use rustix::thread::MembarrierCommand;

mod thread;

pub use thread::HostedGuard;
use thread::{SEATS, SeatRef, Slot, THREAD, ThreadState, thread_state};

/// How a machine's CPU guards are implemented.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum GuardMode {
    /// Sticky vCPU ownership with an asymmetric fence: the fast path has no atomic
    /// read-modify-write. Needs `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`.
    Biased,
    /// Every section takes its vCPU with a compare-and-swap and frees it when it ends.
    Cas,
}

/// Environment variable read by [`HostedPlatform::new`](super::HostedPlatform::new):
/// `cas` forces [`GuardMode::Cas`], `biased` (or unset) asks for [`GuardMode::Biased`].
pub const GUARD_MODE_ENV: &str = "KMEM_HOSTED_GUARD_MODE";

impl GuardMode {
    /// The mode [`GUARD_MODE_ENV`] asks for; `None` for an unknown value.
    pub fn from_env() -> Option<GuardMode> {
        match std::env::var(GUARD_MODE_ENV) {
            Err(_) => Some(GuardMode::Biased),
            Ok(v) => match v.as_str() {
                "" | "biased" => Some(GuardMode::Biased),
                "cas" => Some(GuardMode::Cas),
                _ => None,
            },
        }
    }
}

/// Counters of a machine's guard slow paths (for tests and tuning).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct GuardStats {
    /// `cpu_guard`s that took a vCPU owned by another thread (every vCPU had an owner).
    pub steals: u64,
    /// `lock_cpu`s that took a vCPU owned by another thread.
    pub revokes: u64,
    /// `membarrier` calls (one per steal or revoke).
    pub membarriers: u64,
}

/// Bit 0 of `VCpu::owner`: the owner holds the vCPU in a locked section.
const LOCKED: u64 = 1;
/// Most machines a thread can hold guards of at the same time (a power of two).
pub(super) const NSLOTS: usize = 8;
/// `Slot::cur` when unknown.
const NO_CPU: u32 = u32::MAX;
/// Spins before a waiter starts yielding.
const SPINS: u32 = 64;

/// A virtual CPU, alone on its cache lines.
#[repr(align(128))]
struct VCpu {
    /// 0 (free), a seat address (sticky owner) or a seat address | [`LOCKED`].
    owner: AtomicU64,
    /// Live guards of the locked section; read and written only by its holder.
    depth: AtomicU32,
}

/// A thread's identity on one machine, alone on its cache lines.
#[repr(align(128))]
struct Seat {
    /// The [`token`] of the seat's sticky vCPU while its thread is in a section on it, else
    /// 0. Written only by that thread.
    busy: AtomicUsize,
    /// The [`token`] of the vCPU this seat owns stickily, else 0: what the fast path checks
    /// after storing `busy` (see the module documentation for who writes it and when). Next
    /// to `busy`, so the fast path touches one cache line of shared memory.
    grant: AtomicUsize,
    /// Index in `SeatPool::all`.
    index: usize,
}

/// The value `busy` and `grant` hold for vCPU `cpu`: `cpu + 1`, never 0.
#[inline(always)]
fn token(cpu: usize) -> usize {
    cpu + 1
}

#[derive(Default)]
struct SeatPool {
    /// Every seat ever made for the machine (boxed: their addresses are owner values and
    /// must not move when the vector grows).
    #[allow(clippy::vec_box, reason = "seat addresses must stay put")]
    all: Vec<Box<Seat>>,
    /// Indices of seats whose thread exited or moved on.
    free: Vec<usize>,
}

/// The shared part of a machine's vCPUs; threads hold `Weak` references to it.
struct Shared {
    mode: GuardMode,
    vcpus: Box<[VCpu]>,
    next_home: AtomicUsize,
    seats: Mutex<SeatPool>,
    steals: AtomicU64,
    revokes: AtomicU64,
    membarriers: AtomicU64,
}

impl Shared {
    fn alloc_seat(&self) -> *const Seat {
        let mut pool = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
        let i = match pool.free.pop() {
            Some(i) => i,
            None => {
                let i = pool.all.len();
                pool.all.push(Box::new(Seat {
                    busy: AtomicUsize::new(0),
                    grant: AtomicUsize::new(0),
                    index: i,
                }));
                i
            }
        };
        &*pool.all[i]
    }

    /// Gives back every vCPU `seat` owns and recycles the seat. Called on the seat's own
    /// thread, which holds no guard of this machine and forgets the seat.
    fn release_seat(&self, seat: *const Seat) {
        let me = seat as u64;
        for v in self.vcpus.iter() {
            let _ = v
                .owner
                .compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed);
        }
        // SAFETY: `seat` came from `alloc_seat` of this `Shared`, whose pool keeps every seat
        // until it is dropped.
        let seat = unsafe { &*seat };
        // The seat owns no vCPU any more, so its grant goes (a revoker that took one of its
        // vCPUs before the loop above may clear it too: both write 0). The next thread to get
        // the seat sees this store through the pool's mutex.
        seat.grant.store(0, Ordering::Relaxed);
        let mut pool = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
        pool.free.push(seat.index);
    }

    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`: a full barrier on every running
    /// thread of the process.
    fn membarrier(&self) {
        self.membarriers.fetch_add(1, Ordering::Relaxed);
        rustix::thread::membarrier(MembarrierCommand::PrivateExpedited)
            .expect("kmem-hosted: membarrier failed after registration");
    }

    /// Steps 2 to 4 of a revocation: `owner` (a plain seat address) was just replaced on
    /// vCPU `cpu` by this thread's seat | [`LOCKED`]; takes the seat's grant of `cpu` away
    /// and waits until the seat's thread is out of any section on `cpu`.
    fn wait_revoked(&self, owner: u64, cpu: usize) {
        // SAFETY: plain owner values are addresses of seats of this machine's pool, which
        // keeps them until the machine is dropped; `self` is borrowed, so it is alive.
        let seat = unsafe { &*(owner as *const Seat) };
        let t = token(cpu);
        // Only a grant of `cpu` goes: the seat may already hold a later grant of another
        // vCPU (or none), which is not ours to clear. SeqCst (a locked instruction): the
        // clear precedes the membarrier below in every thread's view.
        let _ = seat
            .grant
            .compare_exchange(t, 0, Ordering::SeqCst, Ordering::Relaxed);
        self.membarrier();
        let mut spins = 0;
        while seat.busy.load(Ordering::Acquire) == t {
            backoff(&mut spins);
        }
    }
}

/// Processes register once for `MEMBARRIER_CMD_PRIVATE_EXPEDITED`; false when the kernel
/// (or a sandbox) refuses.
fn membarrier_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let q = rustix::thread::membarrier_query();
        q.contains_command(MembarrierCommand::PrivateExpedited)
            && q.contains_command(MembarrierCommand::RegisterPrivateExpedited)
            && rustix::thread::membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
    })
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < SPINS {
        core::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

// ---------------------------------------------------------------------------------------------
// A machine's vCPUs
// ---------------------------------------------------------------------------------------------

/// The vCPUs of one machine, as seen by its [`HostedPlatform`](super::HostedPlatform).
pub(super) struct CpuSet {
    /// The machine's id, unique in the process and never reused.
    id: u64,
    /// [`GuardMode::Cas`] (read on the fast path only once the sticky check failed).
    cas: bool,
    shared: Arc<Shared>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl CpuSet {
    /// `nr_cpus` free vCPUs; `mode` falls back to [`GuardMode::Cas`] without membarrier.
    pub(super) fn new(nr_cpus: usize, mode: GuardMode) -> CpuSet {
        let mode = match mode {
            GuardMode::Biased if membarrier_ready() => GuardMode::Biased,
            _ => GuardMode::Cas,
        };
        CpuSet {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cas: mode == GuardMode::Cas,
            shared: Arc::new(Shared {
                mode,
                vcpus: (0..nr_cpus)
                    .map(|_| VCpu {
                        owner: AtomicU64::new(0),
                        depth: AtomicU32::new(0),
                    })
                    .collect(),
                next_home: AtomicUsize::new(0),
                seats: Mutex::new(SeatPool::default()),
                steals: AtomicU64::new(0),
                revokes: AtomicU64::new(0),
                membarriers: AtomicU64::new(0),
            }),
        }
    }

    pub(super) fn id(&self) -> u64 {
        self.id
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.shared.vcpus.len()
    }

    pub(super) fn mode(&self) -> GuardMode {
        self.shared.mode
    }

    pub(super) fn stats(&self) -> GuardStats {
        let s = &self.shared;
        GuardStats {
            steals: s.steals.load(Ordering::Relaxed),
            revokes: s.revokes.load(Ordering::Relaxed),
            membarriers: s.membarriers.load(Ordering::Relaxed),
        }
    }

    /// The biased fast path shared by `guard` and `with_cpu`: when this thread's front slot
    /// is this machine's, holds no guard and its seat still has the grant of its sticky
    /// vCPU, marks the seat busy on it and returns the seat and the CPU. `None` (seat
    /// possibly marked busy for a vCPU it lost: the slow paths set it right) sends the
    /// caller to the slow path.
    ///
    /// Three loads from the thread-local slot, one store and one load on the seat's line;
    /// the vCPU is not touched.
    #[inline(always)]
    fn sticky_fast<'t>(&self, s: &'t Slot) -> Option<(&'t Seat, usize)> {
        // `fast` is this machine's id only when the slot is this machine's, holds no guard
        // and knows a sticky vCPU, so `sticky` is a token, not 0 (`Slot::refresh`).
        if s.fast.get() != self.id {
            return None;
        }
        let seat = s.seat.get();
        let t = s.sticky.get();
        // SAFETY: the slot is this machine's (ids are never reused) and the machine is alive
        // (`self` borrows it), so its seat points into the machine's live seat pool, which
        // keeps it until the machine is dropped.
        let seat = unsafe { &*seat };
        seat.busy.store(t, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
        // `t - 1` wrapping (`t` is never 0 here): the caller's index arithmetic folds the
        // `- 1` into an address displacement.
        (seat.grant.load(Ordering::Acquire) == t).then_some((seat, t.wrapping_sub(1)))
    }

    /// `cpu_guard`. Fast path: [`CpuSet::sticky_fast`], then the guard's bookkeeping.
    #[inline(always)]
    pub(super) fn guard(&self) -> HostedGuard<'_> {
        let t = thread_state();
        let s = t.first();
        if let Some((_, cpu)) = self.sticky_fast(s) {
            s.sdepth.set(1);
            s.set_count(1);
            s.cur.set(cpu as u32);
            return HostedGuard::new(s, cpu as u32, true, false);
        }
        self.guard_slow(t)
    }

    /// `this_cpu`: the guard's fast path without its bookkeeping. While `f` runs, the seat's
    /// `busy` names the sticky vCPU exactly as during a guard section (so revokers wait for
    /// it); the slot's counts are not touched, which is why `f` may not take a guard or ask
    /// `in_atomic` (the caller's contract). Anything else goes through a real guard.
    ///
    /// # Safety
    ///
    /// `f` takes no guard of any machine, does not call `in_atomic` and does not sleep.
    #[inline(always)]
    pub(super) unsafe fn with_cpu<R>(&self, f: impl FnOnce(usize, bool) -> R) -> R {
        let t = thread_state();
        if let Some((seat, cpu)) = self.sticky_fast(t.first()) {
            let r = f(cpu, false);
            seat.busy.store(0, Ordering::Release);
            return r;
        }
        let g = self.guard_slow(t);
        f(g.cpu(), g.nested())
    }

    /// Out of line: everything but the [`GuardMode::Biased`] fast path. In
    /// [`GuardMode::Cas`], first one compare-and-swap on the home vCPU when the front slot is
    /// this machine's and holds no guard.
    #[inline(never)]
    fn guard_slow(&self, t: &ThreadState) -> HostedGuard<'_> {
        if self.cas {
            let s = t.first();
            if s.id.get() == self.id && s.count.get() == 0 {
                let cpu = s.home.get() as usize;
                let me = s.seat.get() as u64 | LOCKED;
                if let Some(v) = self.shared.vcpus.get(cpu) {
                    if v.owner
                        .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        return self.enter_locked(s, cpu);
                    }
                }
            }
        }
        self.guard_slower(t)
    }

    /// `lock_cpu(cpu)`.
    pub(super) fn lock(&self, cpu: usize) -> HostedGuard<'_> {
        assert!(
            cpu < self.len(),
            "lock_cpu({cpu}) on a machine with {} CPUs",
            self.len()
        );
        let t = thread_state();
        let s = self.slot(t);
        let c = cpu as u32;
        // In a section on the sticky vCPU `cpu` (revoked or not, it is ours until the
        // section ends): nest.
        if s.sdepth.get() > 0 && s.sticky_cpu.get() == c {
            return self.nest_sticky(s);
        }
        let v = &self.shared.vcpus[cpu];
        let me = s.seat.get() as u64;
        if v.owner.load(Ordering::Relaxed) == me | LOCKED {
            return self.nest_locked(s, cpu);
        }
        // Our own sticky vCPU: an ordinary sticky section.
        if s.sticky_cpu.get() == c {
            if let Some(g) = self.try_sticky(s) {
                return g;
            }
        }
        let mut spins = 0;
        loop {
            let o = v.owner.load(Ordering::Relaxed);
            if o & LOCKED != 0 {
                backoff(&mut spins);
                continue;
            }
            if v.owner
                .compare_exchange(o, me | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                if o == me {
                    // Our own plain ownership of a vCPU that is not our sticky one (which the
                    // invariants rule out, see the module documentation): drop its grant, as
                    // a revoker would. This thread is in no section on `cpu` (that case
                    // nested above), so no wait.
                    // SAFETY: the slot's seat is this live machine's.
                    let seat = unsafe { &*s.seat.get() };
                    let _ = seat.grant.compare_exchange(
                        token(cpu),
                        0,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                } else if o != 0 {
                    self.shared.revokes.fetch_add(1, Ordering::Relaxed);
                    self.shared.wait_revoked(o, cpu);
                }
                break;
            }
        }
        self.enter_locked(s, cpu)
    }

    /// `in_atomic`: this thread holds a guard of this machine.
    #[inline]
    pub(super) fn in_atomic(&self) -> bool {
        let t = thread_state();
        let s = t.first();
        if s.id.get() == self.id {
            s.count.get() > 0
        } else {
            t.find(self.id).is_some_and(|s| s.count.get() > 0)
        }
    }

    /// This thread's slot for this machine, made (with a seat and a home vCPU) at first
    /// use; moved to the front (for the fast path) when no guard points to it or the front.
    fn slot<'t>(&self, t: &'t ThreadState) -> &'t Slot {
        let first = t.first();
        if first.id.get() == self.id {
            return first;
        }
        let i = match t.slots.iter().position(|s| s.id.get() == self.id) {
            Some(i) => i,
            None => self.new_slot(t),
        };
        let s = &t.slots[i];
        if first.count.get() == 0 && s.count.get() == 0 {
            first.swap(s);
            first
        } else {
            s
        }
    }

    #[cold]
    #[inline(never)]
    fn new_slot(&self, t: &ThreadState) -> usize {
        let i = t
            .slots
            .iter()
            .position(|s| s.id.get() == 0)
            .or_else(|| t.slots.iter().rposition(|s| s.count.get() == 0))
            .unwrap_or_else(|| {
                panic!("kmem-hosted: a thread holds guards of more than {NSLOTS} machines")
            });
        let s = &t.slots[i];
        let old = s.id.replace(0);
        s.refresh();
        if old != 0 {
            // Give back the vCPU and the seat of the machine this slot served, if alive.
            let _ = SEATS.try_with(|r| r.remove(old));
        }
        let seat = self.shared.alloc_seat();
        // If this thread is exiting (its seat list is gone), the seat stays with the machine
        // and any vCPU it gets stays owned until someone steals it.
        let _ = SEATS.try_with(|r| {
            r.0.borrow_mut().push(SeatRef {
                id: self.id,
                shared: Arc::downgrade(&self.shared),
                seat,
            })
        });
        let home = (self.shared.next_home.fetch_add(1, Ordering::Relaxed) % self.len()) as u32;
        s.seat.set(seat);
        s.set_sticky(0);
        s.sticky_cpu.set(home);
        s.sdepth.set(0);
        s.set_count(0);
        s.cur.set(NO_CPU);
        s.home.set(home);
        s.vcpus.set(self.shared.vcpus.as_ptr());
        s.set_id(self.id);
        i
    }

    #[cold]
    #[inline(never)]
    fn guard_slower(&self, t: &ThreadState) -> HostedGuard<'_> {
        let s = self.slot(t);
        if s.count.get() > 0 {
            return self.guard_nested(s);
        }
        match self.shared.mode {
            GuardMode::Cas => self.acquire_locked(s),
            GuardMode::Biased => match self.try_sticky(s) {
                Some(g) => g,
                None => self.acquire_sticky(s),
            },
        }
    }

    /// A nested `cpu_guard`: on the CPU of the guard that started the atomic section if it
    /// is still held, else on the sticky vCPU if held, else on some locked vCPU held.
    #[inline(never)]
    fn guard_nested(&self, s: &Slot) -> HostedGuard<'_> {
        let me = s.seat.get() as u64;
        let held = |c: u32| {
            self.shared
                .vcpus
                .get(c as usize)
                .is_some_and(|v| v.owner.load(Ordering::Relaxed) == me | LOCKED)
        };
        let cur = s.cur.get();
        let sticky = s.sdepth.get() > 0;
        if sticky && cur == s.sticky_cpu.get() {
            return self.nest_sticky(s);
        }
        if held(cur) {
            return self.nest_locked(s, cur as usize);
        }
        if sticky {
            s.cur.set(s.sticky_cpu.get());
            return self.nest_sticky(s);
        }
        let cpu = (0..self.len() as u32)
            .find(|&c| held(c))
            .expect("kmem-hosted: thread counts guards but holds no vCPU");
        s.cur.set(cpu);
        self.nest_locked(s, cpu as usize)
    }

    fn nest_sticky(&self, s: &Slot) -> HostedGuard<'_> {
        s.sdepth.set(s.sdepth.get() + 1);
        let count = s.count.get();
        s.set_count(count + 1);
        HostedGuard::new(s, s.sticky_cpu.get(), true, count > 0)
    }

    fn nest_locked(&self, s: &Slot, cpu: usize) -> HostedGuard<'_> {
        let v = &self.shared.vcpus[cpu];
        v.depth
            .store(v.depth.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let count = s.count.get();
        s.set_count(count + 1);
        HostedGuard::new(s, cpu as u32, false, count > 0)
    }

    /// A locked section on `cpu`, whose owner word this thread just set to `seat | LOCKED`.
    fn enter_locked(&self, s: &Slot, cpu: usize) -> HostedGuard<'_> {
        let v = &self.shared.vcpus[cpu];
        v.depth.store(1, Ordering::Relaxed);
        let count = s.count.get();
        if count == 0 {
            s.cur.set(cpu as u32);
        }
        s.set_count(count + 1);
        HostedGuard::new(s, cpu as u32, false, count > 0)
    }

    /// The fast path's protocol on the sticky vCPU, out of line. On failure the vCPU is
    /// forgotten (it was revoked). The thread holds no guard on its sticky vCPU.
    fn try_sticky(&self, s: &Slot) -> Option<HostedGuard<'_>> {
        let t = s.sticky.get();
        if t == 0 {
            return None;
        }
        debug_assert_eq!(t, token(s.sticky_cpu.get() as usize));
        // SAFETY: as in `sticky_fast`: the slot's seat is this live machine's.
        let seat = unsafe { &*s.seat.get() };
        seat.busy.store(t, Ordering::Release);
        compiler_fence(Ordering::SeqCst);
        if seat.grant.load(Ordering::Acquire) == t {
            Some(self.enter_sticky(s, (t - 1) as u32))
        } else {
            seat.busy.store(0, Ordering::Release);
            s.set_sticky(0);
            None
        }
    }

    /// A sticky section on `cpu`: `busy` names it and the grant check passed (or this
    /// thread just gave itself the vCPU after a steal).
    fn enter_sticky(&self, s: &Slot, cpu: u32) -> HostedGuard<'_> {
        s.set_sticky(token(cpu as usize));
        s.sticky_cpu.set(cpu);
        s.sdepth.set(1);
        let count = s.count.get();
        if count == 0 {
            s.cur.set(cpu);
        }
        s.set_count(count + 1);
        HostedGuard::new(s, cpu, true, count > 0)
    }

    /// [`GuardMode::Biased`] `cpu_guard` without a sticky vCPU: a free vCPU (the last sticky
    /// one first, then home, then the others), else a stolen one. Holds no guard.
    fn acquire_sticky(&self, s: &Slot) -> HostedGuard<'_> {
        let n = self.len();
        let seat = s.seat.get();
        let me = seat as u64;
        // SAFETY: the slot's seat is this live machine's.
        let seat_r = unsafe { &*seat };
        let order = |k: usize| {
            let c = match k {
                0 => s.sticky_cpu.get() as usize,
                1 => s.home.get() as usize,
                _ => (s.home.get() as usize + k - 1) % n,
            };
            (c, &self.shared.vcpus[c])
        };
        loop {
            for k in 0..=n {
                let (c, v) = order(k);
                let t = token(c);
                let o = v.owner.load(Ordering::Relaxed);
                let owned = if o == me {
                    // Already ours (the invariants say it is then our sticky vCPU, whose
                    // grant `try_sticky` checks): never grant it here, a revoker may have
                    // just taken it.
                    true
                } else if o == 0 {
                    // The grant goes first, then the owner, with Release: a revoker that
                    // later reads `owner == me` (Acquire) clears the grant after this store.
                    seat_r.grant.store(t, Ordering::Relaxed);
                    let won = v
                        .owner
                        .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok();
                    if !won {
                        // Not ours: no grant (no revoker clears one it did not take).
                        seat_r.grant.store(0, Ordering::Relaxed);
                    }
                    won
                } else {
                    false
                };
                if owned {
                    s.set_sticky(t);
                    s.sticky_cpu.set(c as u32);
                    if let Some(g) = self.try_sticky(s) {
                        return g;
                    }
                }
            }
            // Every vCPU is owned: steal one, from an owner that looks idle if possible.
            for look_idle in [true, false] {
                for k in 1..=n {
                    let (c, v) = order(k);
                    let o = v.owner.load(Ordering::Relaxed);
                    if o == 0 || o & LOCKED != 0 || o == me {
                        continue;
                    }
                    if look_idle {
                        // SAFETY: a plain owner is the address of a seat of this machine,
                        // kept until the machine is dropped.
                        let busy = unsafe { &(*(o as *const Seat)).busy };
                        if busy.load(Ordering::Relaxed) == token(c) {
                            continue;
                        }
                    }
                    if v.owner
                        .compare_exchange(o, me | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        self.shared.steals.fetch_add(1, Ordering::Relaxed);
                        self.shared.wait_revoked(o, c);
                        // Busy and granted before the vCPU becomes a plain owner's (Release):
                        // a revoker that takes it from us then sees both.
                        seat_r.busy.store(token(c), Ordering::Release);
                        seat_r.grant.store(token(c), Ordering::Relaxed);
                        v.owner.store(me, Ordering::Release);
                        return self.enter_sticky(s, c as u32);
                    }
                }
            }
            std::thread::yield_now();
        }
    }

    /// [`GuardMode::Cas`] `cpu_guard`: a free vCPU, home first, in a locked section.
    fn acquire_locked(&self, s: &Slot) -> HostedGuard<'_> {
        let n = self.len();
        let home = s.home.get() as usize;
        let me = s.seat.get() as u64 | LOCKED;
        loop {
            for k in 0..n {
                let c = (home + k) % n;
                let owner = &self.shared.vcpus[c].owner;
                if owner.load(Ordering::Relaxed) == 0
                    && owner
                        .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    return self.enter_locked(s, c);
                }
            }
            std::thread::yield_now();
        }
    }
}

impl Drop for CpuSet {
    fn drop(&mut self) {
        // Free this thread's slot and seat entry at once (no guard lives: they borrow the
        // machine). Other threads' entries go when their slot is reused or they exit.
        let id = self.id;
        let _ = THREAD.try_with(|t| {
            for s in &t.slots {
                if s.id.get() == id {
                    s.set_id(0);
                }
            }
        });
        let _ = SEATS.try_with(|r| {
            if let Ok(mut v) = r.0.try_borrow_mut() {
                v.retain(|r| r.id != id);
            }
        });
    }
}
