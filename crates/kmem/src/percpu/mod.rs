//! Per-CPU memory (`mm/percpu.c`): one copy of a variable for every possible CPU.
//!
//! # Dynamic allocations
//!
//! `alloc_percpu` hands out an offset that is valid in every CPU's copy. Memory comes in
//! *chunks*; a chunk holds one *unit* of [`PCPU_UNIT_SIZE`] bytes per possible CPU, side by
//! side, so CPU `c`'s copy of an allocation at unit-0 address `a` is at
//! `a + c * PCPU_UNIT_SIZE` in every chunk ([`PercpuPtr::per_cpu_ptr`] is one multiply-add, the
//! role of Linux's `__per_cpu_offset[cpu]`). Inside a chunk an area allocator over two
//! bitmaps of 4-byte bits (`alloc_map`, `bound_map`) serves sizes from 4 bytes to
//! [`PCPU_MIN_UNIT_SIZE`] with alignments up to a page, first fit.
//!
//! * The **first chunk** is taken from memblock at boot ("embedded" in the direct map, as
//!   `pcpu_embed_first_chunk` does) and is never freed.
//! * **Dynamic chunks** are vmalloc areas of `nr_cpu_ids * PCPU_UNIT_SIZE` bytes, created when
//!   no chunk has room, for a caller that may sleep; an atomic (`GFP_ATOMIC`/`GFP_NOWAIT`)
//!   allocation is served only from existing chunks, as in Linux. When a dynamic chunk
//!   empties and another empty one is already kept, it is released (vfree); one empty
//!   chunk is kept to absorb churn (`pcpu_balance_free`).
//! * Every allocation is zeroed in every unit. `/proc/meminfo`'s `Percpu` counts the pages
//!   of all chunks in all units (kmem populates a chunk whole when it creates it).
//! * Limits as Linux's: size 0, a size above [`PCPU_MIN_UNIT_SIZE`], or an alignment that is
//!   not a power of two or is above a page is refused with "illegal size (N) or align (N)
//!   for percpu allocation". `free_percpu` of an address that does not start a live
//!   allocation is reported and changes nothing.
//!
//! # Static variables
//!
//! [`PerCpu<T>`] is the `DEFINE_PER_CPU` role: usable in a `static`, with `get_cpu_var`,
//! `per_cpu` and the `this_cpu_*` operations. See [`statics`] for why its copies live in
//! the static itself rather than in the first chunk.
//!
//! # `this_cpu` operations
//!
//! Integer types ([`PcpuInt`]) get `this_cpu_read/write/add/sub/inc/dec` on both kinds. Each
//! is a CPU section ([`Platform::this_cpu`]) around a plain load and a plain store: no lock
//! and no atomic read-modify-write, because no other task can run on this CPU meanwhile. The
//! load and store are relaxed atomics, which compile to ordinary moves and let another CPU
//! read the copy (`percpu_counter_sum`) without a data race. Arithmetic wraps, as C's
//! unsigned arithmetic does (`percpu_test`).

pub(crate) mod area;
pub mod counter;
pub mod statics;

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::addr::PAGE_SIZE;
use crate::gfp::{__GFP_NOWARN, Gfp, gfpflags_allow_blocking};
use crate::platform::{CpuGuard, LogLevel, Platform};
use crate::sync::SpinLock;
use crate::vmalloc::{Caller, VmCtx, Vmalloc};

use area::AreaMap;

pub use counter::PercpuCounter;
pub use statics::{NR_CPUS, PerCpu, PerCpuRef};

/// Granularity of per-CPU allocations, in bytes (`PCPU_MIN_ALLOC_SIZE`).
pub const PCPU_MIN_ALLOC_SIZE: usize = 4;

/// The largest per-CPU allocation, in bytes (`PCPU_MIN_UNIT_SIZE`: 32 KiB).
pub const PCPU_MIN_UNIT_SIZE: usize = 32 << 10;

/// Bytes of one CPU's unit in every chunk: the distance between two CPUs' copies.
pub const PCPU_UNIT_SIZE: usize = 64 << 10;

// ------------------------------------------------------------------------------ types

/// Types that are valid when all their bytes are zero: what `alloc_percpu::<T>()` may return
/// as a `T` (per-CPU memory is zeroed at allocation, as in Linux).
///
/// # Safety
///
/// The all-zero bit pattern must be a valid value of the type.
pub unsafe trait Zeroable {}

macro_rules! zeroable {
    ($($t:ty),*) => { $(
        // SAFETY: zero is a valid value of every integer, float, bool and atomic type.
        unsafe impl Zeroable for $t {}
    )* };
}

zeroable!(
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    bool,
    (),
    core::sync::atomic::AtomicU8,
    core::sync::atomic::AtomicU16,
    core::sync::atomic::AtomicU32,
    core::sync::atomic::AtomicU64,
    core::sync::atomic::AtomicUsize,
    core::sync::atomic::AtomicI8,
    core::sync::atomic::AtomicI16,
    core::sync::atomic::AtomicI32,
    core::sync::atomic::AtomicI64,
    core::sync::atomic::AtomicIsize,
    core::sync::atomic::AtomicBool
);

// SAFETY: an array of zeroable elements is zeroable element by element.
unsafe impl<T: Zeroable, const N: usize> Zeroable for [T; N] {}
// SAFETY: a null raw pointer is a valid raw pointer.
unsafe impl<T> Zeroable for *mut T {}
// SAFETY: as for `*mut T`.
unsafe impl<T> Zeroable for *const T {}
// SAFETY: `None` is represented by the null pointer (the niche of `NonNull`).
unsafe impl<T> Zeroable for Option<NonNull<T>> {}

/// Integer types with `this_cpu_*` arithmetic: loads and stores of one machine word or less.
///
/// # Safety
///
/// `load` and `store` must be single relaxed atomic accesses of the whole value.
pub unsafe trait PcpuInt: Copy + Eq + fmt::Debug + Send + 'static {
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Reads `*p` (a relaxed atomic load).
    ///
    /// # Safety
    ///
    /// `p` is valid and aligned, and every concurrent access to it is atomic.
    unsafe fn load(p: *const Self) -> Self;
    /// Writes `v` to `*p` (a relaxed atomic store).
    ///
    /// # Safety
    ///
    /// As for [`PcpuInt::load`].
    unsafe fn store(p: *mut Self, v: Self);
    /// `self + rhs`, wrapping.
    fn wrapping_add(self, rhs: Self) -> Self;
    /// `self - rhs`, wrapping.
    fn wrapping_sub(self, rhs: Self) -> Self;
}

macro_rules! pcpu_int {
    ($($t:ty => $a:ty),*) => { $(
        // SAFETY: `load`/`store` are one relaxed access through the matching atomic type,
        // which has the size and alignment of the integer.
        unsafe impl PcpuInt for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            #[inline(always)]
            unsafe fn load(p: *const Self) -> Self {
                // SAFETY: the caller's contract: valid, aligned, only atomic concurrent use.
                unsafe { <$a>::from_ptr(p as *mut Self) }.load(Relaxed)
            }
            #[inline(always)]
            unsafe fn store(p: *mut Self, v: Self) {
                // SAFETY: as in `load`.
                unsafe { <$a>::from_ptr(p) }.store(v, Relaxed)
            }
            #[inline(always)]
            fn wrapping_add(self, rhs: Self) -> Self {
                <$t>::wrapping_add(self, rhs)
            }
            #[inline(always)]
            fn wrapping_sub(self, rhs: Self) -> Self {
                <$t>::wrapping_sub(self, rhs)
            }
        }
    )* };
}

pcpu_int!(
    u8 => core::sync::atomic::AtomicU8,
    u16 => core::sync::atomic::AtomicU16,
    u32 => core::sync::atomic::AtomicU32,
    u64 => core::sync::atomic::AtomicU64,
    usize => core::sync::atomic::AtomicUsize,
    i8 => core::sync::atomic::AtomicI8,
    i16 => core::sync::atomic::AtomicI16,
    i32 => core::sync::atomic::AtomicI32,
    i64 => core::sync::atomic::AtomicI64,
    isize => core::sync::atomic::AtomicIsize
);

/// A dynamic per-CPU allocation (`T __percpu *`): the address of CPU 0's copy.
///
/// Plain data like a C pointer: it does not own the allocation (free it with
/// [`Kmem::free_percpu`](crate::Kmem::free_percpu), or use [`PerCpuBox`]), and reaching a
/// copy is pointer arithmetic that does not check the allocation is alive.
pub struct PercpuPtr<T> {
    addr: NonNull<u8>,
    _t: PhantomData<*mut T>,
}

impl<T> Clone for PercpuPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for PercpuPtr<T> {}

impl<T> PartialEq for PercpuPtr<T> {
    fn eq(&self, other: &Self) -> bool {
        self.addr == other.addr
    }
}

impl<T> Eq for PercpuPtr<T> {}

impl<T> fmt::Debug for PercpuPtr<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PercpuPtr({:p})", self.addr)
    }
}

// SAFETY: a `PercpuPtr` is an address; sending it is sending a number. Dereferencing it is
// unsafe and the caller's responsibility.
unsafe impl<T> Send for PercpuPtr<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for PercpuPtr<T> {}

impl<T> PercpuPtr<T> {
    /// The per-CPU pointer whose CPU-0 copy is at `addr` (what the allocator returned).
    #[inline(always)]
    pub fn from_raw(addr: NonNull<u8>) -> Self {
        PercpuPtr {
            addr,
            _t: PhantomData,
        }
    }

    /// CPU `cpu`'s copy (`per_cpu_ptr`). Only arithmetic: valid to dereference while the
    /// allocation lives and `cpu < nr_cpu_ids`.
    #[inline(always)]
    pub fn per_cpu_ptr(self, cpu: usize) -> NonNull<T> {
        // The copies are `PCPU_UNIT_SIZE` apart, in units allocated side by side.
        // The copies are `PCPU_UNIT_SIZE` apart, in units allocated side by side. Wrapping
        // arithmetic: an out-of-range `cpu` gives a wrong address, never undefined behaviour.
        let p = self
            .addr
            .as_ptr()
            .wrapping_add(cpu.wrapping_mul(PCPU_UNIT_SIZE));
        NonNull::new(p.cast()).expect("per_cpu_ptr: CPU number out of range")
    }

    /// The running CPU's copy (`this_cpu_ptr`), for the holder of a CPU section.
    #[inline(always)]
    pub fn this_cpu_ptr(self, guard: &impl CpuGuard) -> NonNull<T> {
        self.per_cpu_ptr(guard.cpu())
    }

    /// The same allocation seen as another type.
    #[inline(always)]
    pub fn cast<U>(self) -> PercpuPtr<U> {
        PercpuPtr {
            addr: self.addr,
            _t: PhantomData,
        }
    }

    /// CPU 0's copy as an address.
    #[inline(always)]
    pub fn addr(self) -> usize {
        self.addr.as_ptr() as usize
    }
}

impl<T: PcpuInt> PercpuPtr<T> {
    /// Runs `f` on this CPU's copy inside a CPU section.
    ///
    /// # Safety
    ///
    /// The allocation is live, holds `T`s, and every concurrent access to its copies is
    /// through these operations or other atomic accesses.
    #[inline(always)]
    unsafe fn with_this<P: Platform, R>(self, p: &P, f: impl FnOnce(*mut T) -> R) -> R {
        // SAFETY: the closure only loads and stores the copy: it takes no guard and does not
        // sleep, as `this_cpu` requires.
        unsafe { p.this_cpu(|cpu, _| f(self.per_cpu_ptr(cpu).as_ptr())) }
    }

    /// `this_cpu_read`.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::this_cpu_add`].
    #[inline(always)]
    pub unsafe fn this_cpu_read<P: Platform>(self, p: &P) -> T {
        // SAFETY: the caller's contract; the copy is this CPU's.
        unsafe { self.with_this(p, |c| T::load(c)) }
    }

    /// `this_cpu_write`.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::this_cpu_add`].
    #[inline(always)]
    pub unsafe fn this_cpu_write<P: Platform>(self, p: &P, v: T) {
        // SAFETY: as in `this_cpu_read`.
        unsafe { self.with_this(p, |c| T::store(c, v)) }
    }

    /// `this_cpu_add`: this CPU's copy plus `v`, wrapping; no lock, no atomic
    /// read-modify-write.
    ///
    /// # Safety
    ///
    /// The allocation is live, was made for `T` (size and alignment), and its copies are
    /// accessed concurrently only through these operations or atomic accesses.
    #[inline(always)]
    pub unsafe fn this_cpu_add<P: Platform>(self, p: &P, v: T) {
        // SAFETY: as in `this_cpu_read`: nothing else runs on this CPU during the section.
        unsafe { self.with_this(p, |c| T::store(c, T::load(c).wrapping_add(v))) }
    }

    /// `this_cpu_add_return`: adds `v` and returns the new value.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::this_cpu_add`].
    #[inline(always)]
    pub unsafe fn this_cpu_add_return<P: Platform>(self, p: &P, v: T) -> T {
        // SAFETY: as in `this_cpu_add`.
        unsafe {
            self.with_this(p, |c| {
                let n = T::load(c).wrapping_add(v);
                T::store(c, n);
                n
            })
        }
    }

    /// `this_cpu_sub`.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::this_cpu_add`].
    #[inline(always)]
    pub unsafe fn this_cpu_sub<P: Platform>(self, p: &P, v: T) {
        // SAFETY: as in `this_cpu_add`.
        unsafe { self.with_this(p, |c| T::store(c, T::load(c).wrapping_sub(v))) }
    }

    /// `this_cpu_inc`.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::this_cpu_add`].
    #[inline(always)]
    pub unsafe fn this_cpu_inc<P: Platform>(self, p: &P) {
        // SAFETY: as in `this_cpu_add`.
        unsafe { self.this_cpu_add(p, T::ONE) }
    }

    /// `this_cpu_dec`.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::this_cpu_add`].
    #[inline(always)]
    pub unsafe fn this_cpu_dec<P: Platform>(self, p: &P) {
        // SAFETY: as in `this_cpu_add`.
        unsafe { self.this_cpu_sub(p, T::ONE) }
    }

    /// CPU `cpu`'s copy, read from any CPU (`per_cpu(*ptr, cpu)` in a sum). It may be stale
    /// by the updates that CPU is making meanwhile.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::this_cpu_add`]; `cpu < nr_cpu_ids`.
    #[inline(always)]
    pub unsafe fn per_cpu_read(self, cpu: usize) -> T {
        // SAFETY: the caller's contract: live, in range, atomic accesses only.
        unsafe { T::load(self.per_cpu_ptr(cpu).as_ptr()) }
    }

    /// Sets CPU `cpu`'s copy from any CPU. Racy against that CPU's own updates (as
    /// `*per_cpu_ptr(p, cpu) = v` is in C): meant for initialization and quiet moments.
    ///
    /// # Safety
    ///
    /// See [`PercpuPtr::per_cpu_read`].
    #[inline(always)]
    pub unsafe fn per_cpu_write(self, cpu: usize, v: T) {
        // SAFETY: as in `per_cpu_read`.
        unsafe { T::store(self.per_cpu_ptr(cpu).as_ptr(), v) }
    }
}

// ------------------------------------------------------------------------------ chunks

/// Where a chunk's units came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkKind {
    /// The first chunk, from memblock at boot; never freed.
    First,
    /// A vmalloc area.
    Vmalloc,
}

/// A chunk: `nr_units` units of [`PCPU_UNIT_SIZE`] bytes from `base`, and the area map
/// they share. The first chunk's descriptor is boot memory after its units; a dynamic
/// chunk's is kmalloc memory.
struct Chunk {
    next: *mut Chunk,
    base: usize,
    kind: ChunkKind,
    map: AreaMap,
}

/// The chunk list (`pcpu_lock`'s data).
struct Chunks {
    head: *mut Chunk,    // the first chunk, then dynamic ones, newest after it
    nr_empty_spare: u32, // dynamic chunks with nothing allocated
}

// SAFETY: the list's chunks are kmalloc memory owned by the allocator; every access is under
// the lock that holds this value.
unsafe impl Send for Chunks {}

/// Statistics of the per-CPU allocator (`/sys/kernel/debug/percpu_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PercpuStats {
    /// Chunks, the first one included.
    pub nr_chunks: usize,
    /// Live allocations.
    pub nr_alloc: usize,
    /// Bytes allocated in one unit (the same in every unit).
    pub alloc_bytes: usize,
    /// Allocations made since boot.
    pub nr_alloc_total: usize,
    /// Pages of all chunks in all units: `Percpu` in `/proc/meminfo`.
    pub nr_pages: usize,
}

/// The per-CPU allocator of one machine.
pub struct PercpuAllocator {
    nr_units: usize,
    chunks: SpinLock<Chunks>,
    nr_chunks: AtomicUsize,
    nr_alloc: AtomicUsize,
    alloc_bytes: AtomicUsize,
    nr_alloc_total: AtomicUsize,
    bad_frees: AtomicUsize,
    failures: AtomicUsize,
}

// SAFETY: all state is atomics or behind the chunk lock.
unsafe impl Sync for PercpuAllocator {}
// SAFETY: as for `Sync`; the chunks are memory of the machine, not of a thread.
unsafe impl Send for PercpuAllocator {}

/// The vmalloc caller shown for dynamic chunks in `/proc/vmallocinfo`.
const CHUNK_CALLER: Caller = Caller::Name("pcpu_create_chunk");

impl PercpuAllocator {
    /// Bytes of one chunk: a unit per possible CPU.
    pub const fn chunk_size(nr_units: usize) -> usize {
        nr_units * PCPU_UNIT_SIZE
    }

    /// Bytes memblock must reserve at boot for the first chunk: its units, then its
    /// descriptor (page aligned), as Linux takes the first chunk's metadata from memblock too.
    pub const fn first_chunk_size(nr_units: usize) -> usize {
        Self::chunk_size(nr_units) + core::mem::size_of::<Chunk>().next_multiple_of(PAGE_SIZE)
    }

    /// Sets the allocator up over the first chunk (`pcpu_setup_first_chunk`): `nr_units`
    /// units from `first_base` (the direct-map address of [`Self::first_chunk_size`] bytes
    /// reserved at boot, page aligned), followed by the chunk's descriptor. Logs the
    /// "Embedded" boot line.
    ///
    /// # Safety
    ///
    /// `[first_base, first_base + first_chunk_size(nr_units))` is memory the allocator owns
    /// from now on, mapped for the life of the machine.
    pub unsafe fn new<P: Platform>(
        platform: &P,
        nr_units: usize,
        first_base: usize,
    ) -> PercpuAllocator {
        let chunk = (first_base + Self::chunk_size(nr_units)) as *mut Chunk;
        // SAFETY: the descriptor's pages follow the units inside the caller's reservation,
        // page aligned (so aligned for `Chunk`), and are ours alone.
        unsafe {
            chunk.write(Chunk {
                next: core::ptr::null_mut(),
                base: first_base,
                kind: ChunkKind::First,
                map: AreaMap::new(),
            })
        };
        let pages = PCPU_UNIT_SIZE / PAGE_SIZE;
        platform.log(
            LogLevel::Info,
            format_args!(
                "percpu: Embedded {pages} pages/cpu s0 r0 d{PCPU_UNIT_SIZE} u{PCPU_UNIT_SIZE}"
            ),
        );
        PercpuAllocator {
            nr_units,
            chunks: SpinLock::new(Chunks {
                head: chunk,
                nr_empty_spare: 0,
            }),
            nr_chunks: AtomicUsize::new(1),
            nr_alloc: AtomicUsize::new(0),
            alloc_bytes: AtomicUsize::new(0),
            nr_alloc_total: AtomicUsize::new(0),
            bad_frees: AtomicUsize::new(0),
            failures: AtomicUsize::new(0),
        }
    }

    /// A dynamic chunk's descriptor, in kmalloc memory, for units at `base`.
    fn new_chunk<P: Platform>(cx: VmCtx<'_, P>, gfp: Gfp, base: usize) -> Option<*mut Chunk> {
        let size = core::mem::size_of::<Chunk>();
        let p = cx.kmalloc.kmalloc(cx.slab, cx.pages, size, gfp)?;
        let chunk = p.as_ptr().cast::<Chunk>();
        debug_assert!(chunk.is_aligned());
        // SAFETY: `p` is a fresh kmalloc allocation of `size_of::<Chunk>()` bytes, aligned
        // to 8 (kmalloc's minimum), which is `Chunk`'s alignment.
        unsafe {
            chunk.write(Chunk {
                next: core::ptr::null_mut(),
                base,
                kind: ChunkKind::Vmalloc,
                map: AreaMap::new(),
            })
        };
        Some(chunk)
    }

    /// Units per chunk: `nr_cpu_ids`.
    pub fn nr_units(&self) -> usize {
        self.nr_units
    }

    /// Bad `free_percpu` calls reported.
    pub fn bad_frees(&self) -> usize {
        self.bad_frees.load(Relaxed)
    }

    /// Allocations that failed (refused requests included).
    pub fn failures(&self) -> usize {
        self.failures.load(Relaxed)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PercpuStats {
        let nr_chunks = self.nr_chunks.load(Relaxed);
        PercpuStats {
            nr_chunks,
            nr_alloc: self.nr_alloc.load(Relaxed),
            alloc_bytes: self.alloc_bytes.load(Relaxed),
            nr_alloc_total: self.nr_alloc_total.load(Relaxed),
            nr_pages: nr_chunks * self.nr_units * (PCPU_UNIT_SIZE / PAGE_SIZE),
        }
    }

    /// Pages of all chunks in all units (`pcpu_nr_pages`, the `Percpu` line of meminfo).
    pub fn nr_pages(&self) -> usize {
        self.stats().nr_pages
    }

    /// Free bytes in one unit of every chunk, added up.
    pub fn free_bytes(&self) -> usize {
        let chunks = self.chunks.lock();
        let mut sum = 0;
        let mut c = chunks.head;
        while !c.is_null() {
            // SAFETY: chunks on the list are live descriptors; the lock is held.
            let chunk = unsafe { &*c };
            sum += chunk.map.free_bytes();
            c = chunk.next;
        }
        sum
    }

    /// Checks the chunks against the counters (for tests): allocations and bytes per chunk
    /// add up to the totals, the chunk count matches, at most one dynamic chunk is empty
    /// beyond the kept spare. Only meaningful while no allocation or free runs.
    pub fn validate(&self) -> Result<(), &'static str> {
        let chunks = self.chunks.lock();
        let (mut n, mut allocs, mut used, mut empty) = (0, 0, 0, 0u32);
        let mut c = chunks.head;
        while !c.is_null() {
            // SAFETY: chunks on the list are live descriptors; the lock is held.
            let chunk = unsafe { &*c };
            n += 1;
            allocs += chunk.map.nr_alloc();
            used += PCPU_UNIT_SIZE - chunk.map.free_bytes();
            if chunk.kind == ChunkKind::Vmalloc && chunk.map.is_empty() {
                empty += 1;
            }
            c = chunk.next;
        }
        if n != self.nr_chunks.load(Relaxed) {
            return Err("percpu: chunk count differs from the chunk list");
        }
        if allocs != self.nr_alloc.load(Relaxed) || used != self.alloc_bytes.load(Relaxed) {
            return Err("percpu: allocation counters differ from the chunk maps");
        }
        if empty != chunks.nr_empty_spare || empty > 1 {
            return Err("percpu: more than one empty dynamic chunk kept");
        }
        Ok(())
    }

    /// The longest free run in any chunk, in bytes (the largest allocation that would
    /// succeed without a new chunk, alignment aside).
    pub fn largest_free(&self) -> usize {
        let chunks = self.chunks.lock();
        let mut best = 0;
        let mut c = chunks.head;
        while !c.is_null() {
            // SAFETY: chunks on the list are live descriptors; the lock is held.
            let chunk = unsafe { &*c };
            best = best.max(chunk.map.largest_free());
            c = chunk.next;
        }
        best * PCPU_MIN_ALLOC_SIZE
    }

    /// `pcpu_alloc`: `size` bytes aligned to `align` in every CPU's unit, zeroed.
    ///
    /// Context: may sleep when `gfp` allows blocking (a new chunk is a vmalloc area);
    /// otherwise never sleeps and only existing chunks serve. Refused with a report (unless
    /// `__GFP_NOWARN`): size 0 or above [`PCPU_MIN_UNIT_SIZE`], an alignment that is not a
    /// power of two or exceeds a page. A failure for lack of space is reported as Linux's
    /// "percpu: allocation failed".
    pub fn alloc<P: Platform>(
        &self,
        cx: VmCtx<'_, P>,
        vmalloc: &Vmalloc,
        size: usize,
        align: usize,
        gfp: Gfp,
    ) -> Option<NonNull<u8>> {
        let warn = !gfp.contains(__GFP_NOWARN);
        let platform = cx.pages.platform();
        if size == 0 || size > PCPU_MIN_UNIT_SIZE || align > PAGE_SIZE || !align.is_power_of_two() {
            self.failures.fetch_add(1, Relaxed);
            if warn {
                platform.log(
                    LogLevel::Warning,
                    format_args!(
                        "WARNING: illegal size ({size}) or align ({align}) for percpu allocation"
                    ),
                );
            }
            return None;
        }
        let size = size.next_multiple_of(PCPU_MIN_ALLOC_SIZE);
        let align = align.max(PCPU_MIN_ALLOC_SIZE);
        let bits = size / PCPU_MIN_ALLOC_SIZE;
        let align_bits = align / PCPU_MIN_ALLOC_SIZE;
        let is_atomic = !gfpflags_allow_blocking(gfp);
        let mut created = false;
        loop {
            if let Some(base) = self.alloc_area(bits, align_bits) {
                self.nr_alloc.fetch_add(1, Relaxed);
                self.nr_alloc_total.fetch_add(1, Relaxed);
                self.alloc_bytes.fetch_add(size, Relaxed);
                for cpu in 0..self.nr_units {
                    // SAFETY: the area `[base, base + size)` of every unit was just taken
                    // for this caller; units are mapped memory the allocator owns.
                    unsafe {
                        core::ptr::write_bytes((base + cpu * PCPU_UNIT_SIZE) as *mut u8, 0, size)
                    };
                }
                return NonNull::new(base as *mut u8);
            }
            let err = if is_atomic {
                "atomic alloc failed, no space left"
            } else if created {
                // A chunk made for us was taken by others first: Linux retries too, but
                // only a bounded number of times; one new chunk per call is the bound.
                "no space left after a new chunk"
            } else if self.create_chunk(cx, vmalloc, gfp) {
                created = true;
                continue;
            } else {
                "failed to allocate new chunk"
            };
            self.failures.fetch_add(1, Relaxed);
            if warn {
                platform.log(
                    LogLevel::Warning,
                    format_args!(
                        "percpu: allocation failed, size={size} align={align} atomic={}, {err}",
                        is_atomic as u8
                    ),
                );
            }
            return None;
        }
    }

    /// First fit over the chunks, under the lock: the unit-0 address of the area.
    fn alloc_area(&self, bits: usize, align_bits: usize) -> Option<usize> {
        let mut chunks = self.chunks.lock();
        let mut c = chunks.head;
        while !c.is_null() {
            // SAFETY: chunks on the list are live descriptors; the lock is held, so this is
            // the only reference.
            let chunk = unsafe { &mut *c };
            let was_empty = chunk.map.is_empty();
            if let Some(bit) = chunk.map.alloc(bits, align_bits) {
                if was_empty && chunk.kind == ChunkKind::Vmalloc {
                    chunks.nr_empty_spare -= 1;
                }
                return Some(chunk.base + bit * PCPU_MIN_ALLOC_SIZE);
            }
            c = chunk.next;
        }
        None
    }

    /// `pcpu_create_chunk`: a vmalloc area for the units and a descriptor, linked after the
    /// first chunk. False when either allocation fails.
    fn create_chunk<P: Platform>(&self, cx: VmCtx<'_, P>, vmalloc: &Vmalloc, gfp: Gfp) -> bool {
        let size = Self::chunk_size(self.nr_units);
        let gfp = gfp | __GFP_NOWARN;
        let Some(units) = vmalloc.__vmalloc_node(cx, size, PAGE_SIZE, gfp, CHUNK_CALLER) else {
            return false;
        };
        let Some(chunk) = Self::new_chunk(cx, gfp, units.as_ptr() as usize) else {
            // SAFETY: the area was just allocated and is not shared.
            unsafe { vmalloc.vfree(cx, units.as_ptr()) };
            return false;
        };
        let mut chunks = self.chunks.lock();
        // SAFETY: `head` is the first chunk, never freed; `chunk` is fresh. The lock is held.
        unsafe {
            (*chunk).next = (*chunks.head).next;
            (*chunks.head).next = chunk;
        }
        chunks.nr_empty_spare += 1;
        self.nr_chunks.fetch_add(1, Relaxed);
        true
    }

    /// `free_percpu`: gives back the allocation whose CPU-0 copy starts at `addr`. Null is a
    /// no-op; an address that does not start a live allocation is reported and ignored. A
    /// dynamic chunk left empty is released if another empty one is kept already.
    ///
    /// Context: any; never sleeps.
    ///
    /// # Safety
    ///
    /// If `addr` starts a live allocation, nothing may use any CPU's copy after this call.
    pub unsafe fn free<P: Platform>(&self, cx: VmCtx<'_, P>, vmalloc: &Vmalloc, addr: *mut u8) {
        if addr.is_null() {
            return;
        }
        let a = addr as usize;
        let mut release: *mut Chunk = core::ptr::null_mut();
        let freed = {
            let mut chunks = self.chunks.lock();
            let mut prev: *mut Chunk = core::ptr::null_mut();
            let mut c = chunks.head;
            while !c.is_null() {
                // SAFETY: chunks on the list are live descriptors; the lock is held.
                let chunk = unsafe { &*c };
                if chunk.base <= a && a < chunk.base + PCPU_UNIT_SIZE {
                    break;
                }
                prev = c;
                c = chunk.next;
            }
            if c.is_null() {
                None
            } else {
                // SAFETY: `c` is a live chunk on the list; the lock is held.
                let chunk = unsafe { &mut *c };
                let off = a - chunk.base;
                let freed = if off % PCPU_MIN_ALLOC_SIZE == 0 {
                    chunk.map.free(off / PCPU_MIN_ALLOC_SIZE)
                } else {
                    None
                };
                if freed.is_some() && chunk.map.is_empty() && chunk.kind == ChunkKind::Vmalloc {
                    if chunks.nr_empty_spare >= 1 {
                        // Unlink it; it is released below, outside the lock.
                        // SAFETY: `prev` is the live chunk before `c` (the first chunk is
                        // never released, so `c` is not the head and `prev` is non-null).
                        unsafe { (*prev).next = chunk.next };
                        release = c;
                    } else {
                        chunks.nr_empty_spare += 1;
                    }
                }
                freed
            }
        };
        let Some(bits) = freed else {
            self.bad_frees.fetch_add(1, Relaxed);
            cx.pages.platform().log(
                LogLevel::Err,
                format_args!("percpu: Trying to free_percpu() bad or nonexistent area {addr:p}"),
            );
            return;
        };
        self.nr_alloc.fetch_sub(1, Relaxed);
        self.alloc_bytes
            .fetch_sub(bits * PCPU_MIN_ALLOC_SIZE, Relaxed);
        if !release.is_null() {
            // SAFETY: the chunk was unlinked under the lock and is empty: nothing refers to
            // it or its units any more. Its units are the vmalloc area at `base`, its
            // descriptor a kmalloc allocation.
            unsafe {
                let base = (*release).base;
                vmalloc.vfree(cx, base as *const u8);
                cx.kmalloc.kfree(cx.slab, cx.pages, release.cast());
            }
            self.nr_chunks.fetch_sub(1, Relaxed);
        }
    }

    /// The size in bytes of the live allocation whose CPU-0 copy starts at `addr`.
    pub fn alloc_size(&self, addr: *const u8) -> Option<usize> {
        let a = addr as usize;
        let chunks = self.chunks.lock();
        let mut c = chunks.head;
        while !c.is_null() {
            // SAFETY: chunks on the list are live descriptors; the lock is held.
            let chunk = unsafe { &*c };
            if chunk.base <= a && a < chunk.base + PCPU_UNIT_SIZE {
                let off = a - chunk.base;
                if off % PCPU_MIN_ALLOC_SIZE != 0 {
                    return None;
                }
                return chunk
                    .map
                    .size_of(off / PCPU_MIN_ALLOC_SIZE)
                    .map(|b| b * PCPU_MIN_ALLOC_SIZE);
            }
            c = chunk.next;
        }
        None
    }
}

// ------------------------------------------------------------------------------ typed owner

/// A dynamic per-CPU `T` that frees itself on drop: `alloc_percpu::<T>()` with an owner.
///
/// Integer types get safe `this_cpu_*` operations and per-CPU reads; other types are reached
/// through [`PerCpuBox::get_cpu_ptr`]'s raw pointer.
pub struct PerCpuBox<'k, P: Platform, T> {
    kmem: &'k crate::Kmem<P>,
    ptr: PercpuPtr<T>,
}

impl<'k, P: Platform, T: Zeroable> PerCpuBox<'k, P, T> {
    /// `alloc_percpu_gfp::<T>(gfp)`: every CPU's copy zeroed. `None` on failure.
    pub fn new(kmem: &'k crate::Kmem<P>, gfp: Gfp) -> Option<Self> {
        let ptr = kmem.alloc_percpu_gfp::<T>(gfp)?;
        Some(PerCpuBox { kmem, ptr })
    }
}

impl<P: Platform, T> PerCpuBox<'_, P, T> {
    /// The raw per-CPU pointer (valid while `self` lives).
    pub fn as_ptr(&self) -> PercpuPtr<T> {
        self.ptr
    }

    /// Pins the caller to its CPU and returns that CPU's copy (`get_cpu_ptr`); dropping the
    /// result is `put_cpu_ptr`.
    pub fn get_cpu_ptr(&self) -> CpuPtr<'_, P, T> {
        CpuPtr::get(self.kmem.platform(), self.ptr)
    }
}

impl<P: Platform, T: PcpuInt> PerCpuBox<'_, P, T> {
    /// `this_cpu_read`.
    #[inline]
    pub fn this_cpu_read(&self) -> T {
        // SAFETY: `self` owns the live allocation, made for `T`; every access to it goes
        // through these atomic-access operations.
        unsafe { self.ptr.this_cpu_read(self.kmem.platform()) }
    }

    /// `this_cpu_write`.
    #[inline]
    pub fn this_cpu_write(&self, v: T) {
        // SAFETY: as in `this_cpu_read`.
        unsafe { self.ptr.this_cpu_write(self.kmem.platform(), v) }
    }

    /// `this_cpu_add` (wrapping).
    #[inline]
    pub fn this_cpu_add(&self, v: T) {
        // SAFETY: as in `this_cpu_read`.
        unsafe { self.ptr.this_cpu_add(self.kmem.platform(), v) }
    }

    /// `this_cpu_sub` (wrapping).
    #[inline]
    pub fn this_cpu_sub(&self, v: T) {
        // SAFETY: as in `this_cpu_read`.
        unsafe { self.ptr.this_cpu_sub(self.kmem.platform(), v) }
    }

    /// `this_cpu_inc`.
    #[inline]
    pub fn this_cpu_inc(&self) {
        // SAFETY: as in `this_cpu_read`.
        unsafe { self.ptr.this_cpu_inc(self.kmem.platform()) }
    }

    /// `this_cpu_dec`.
    #[inline]
    pub fn this_cpu_dec(&self) {
        // SAFETY: as in `this_cpu_read`.
        unsafe { self.ptr.this_cpu_dec(self.kmem.platform()) }
    }

    /// CPU `cpu`'s copy (panics if `cpu >= nr_cpu_ids`).
    pub fn per_cpu(&self, cpu: usize) -> T {
        assert!(cpu < self.kmem.nr_cpus(), "CPU {cpu} does not exist");
        // SAFETY: as in `this_cpu_read`; `cpu` is in range.
        unsafe { self.ptr.per_cpu_read(cpu) }
    }

    /// The copies of every possible CPU added up (wrapping).
    pub fn sum(&self) -> T {
        (0..self.kmem.nr_cpus()).fold(T::ZERO, |s, c| s.wrapping_add(self.per_cpu(c)))
    }
}

impl<P: Platform, T> Drop for PerCpuBox<'_, P, T> {
    fn drop(&mut self) {
        // SAFETY: `self` owns the allocation and is going away; nothing else refers to it
        // (the `CpuPtr`s borrow `self`).
        unsafe { self.kmem.free_percpu(self.ptr) }
    }
}

/// This CPU's copy of a per-CPU allocation, with the caller pinned to the CPU
/// (`get_cpu_ptr`). Dropping it is `put_cpu_ptr`.
pub struct CpuPtr<'a, P: Platform + 'a, T> {
    guard: P::Guard<'a>,
    ptr: NonNull<T>,
}

impl<'a, P: Platform, T> CpuPtr<'a, P, T> {
    /// Pins the caller to its CPU and takes `ptr`'s copy there (`get_cpu_ptr`).
    pub fn get(platform: &'a P, ptr: PercpuPtr<T>) -> Self {
        let guard = platform.cpu_guard();
        let ptr = ptr.this_cpu_ptr(&guard);
        CpuPtr { guard, ptr }
    }

    /// The CPU the caller is pinned to.
    pub fn cpu(&self) -> usize {
        self.guard.cpu()
    }

    /// The copy. Dereferencing it is the caller's business (it may be shared with remote
    /// readers of that CPU's copy).
    pub fn as_ptr(&self) -> NonNull<T> {
        self.ptr
    }
}
