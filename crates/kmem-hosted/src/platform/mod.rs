//! The hosted platform: a simulated machine in one user-space process.
//!
//! * **Physical memory** is a memfd of `phys_size` bytes (sparse: a page costs memory only once
//!   it is touched). One contiguous virtual region is reserved for the whole machine:
//!
//!   ```text
//!   base (1 GiB aligned)
//!   | direct map: memfd [0, direct_map_size), read/write, shared
//!   | guard gap (PROT_NONE)
//!   | kmap window: kmap_pages pages, PROT_NONE until `map_page`
//!   | guard gap
//!   | vmalloc range: PROT_NONE until `map_page`
//!   | guard gap
//!   ```
//!
//!   `map_page` maps one page of the memfd over the reservation with `mmap(MAP_FIXED)`;
//!   `unmap_pages` puts a `PROT_NONE` reservation back, so a later touch faults.
//!
//! * **Virtual CPUs** are lock words, one per cache line. A thread has a *home* vCPU per machine
//!   (round-robin at its first use); [`Platform::cpu_guard`] takes the home vCPU with one
//!   uncontended compare-and-swap and gives it back with a plain release store. If the home
//!   vCPU is taken (more threads than vCPUs), the others are tried in turn, yielding between
//!   rounds. Guards nest without any atomic operation. See [`HostedGuard`].
//!
//! * **Sleeping** is a private futex; **relax** is a thread yield; the **log** is an in-memory
//!   ring of lines, optionally echoed to stderr.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use kmem::addr::{PAGE_SIZE, Pfn, VirtAddr};
use kmem::platform::{CpuGuard, LogLevel, MapError, PageProt, Platform, TaskInfo};
use rustix::fs::MemfdFlags;
use rustix::mm::{MapFlags, ProtFlags};

/// Alignment of the direct map's start, so that naturally aligned physical blocks are
/// naturally aligned virtually too (as with a kernel's `PAGE_OFFSET`).
const DIRECT_MAP_ALIGN: usize = if usize::BITS >= 64 { 1 << 30 } else { 4 << 20 };
/// Alignment of each section of the reservation.
const SECTION_ALIGN: usize = 2 << 20;
/// Unmapped (PROT_NONE) gap after each section.
const GUARD_GAP: usize = 2 << 20;
/// Most lines the in-memory log keeps; older ones are dropped.
pub const LOG_CAPACITY: usize = 10_000;
/// Most vCPUs a machine may have.
pub const MAX_CPUS: usize = 4096;

/// The shape of a simulated machine's memory and CPUs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemorySpec {
    /// Bytes of physical address space: the memfd's length (sparse). A multiple of the page
    /// size.
    pub phys_size: u64,
    /// Bytes of `[0, direct_map_size)` mapped at the direct map: `phys_size` on x86_64,
    /// 896 MiB on x86_32. Clamped to `phys_size`; a multiple of the page size.
    pub direct_map_size: u64,
    /// Size of the kmap window in pages (`LAST_PKMAP`), e.g. 1024.
    pub kmap_pages: usize,
    /// Bytes of virtual address space reserved for vmalloc, e.g. 1 GiB (rounded up to a page).
    pub vmalloc_size: u64,
    /// Number of virtual CPUs, `1..=MAX_CPUS`.
    pub nr_cpus: usize,
}

impl MemorySpec {
    /// A 64-bit machine: everything direct mapped, a 1024-page kmap window and 1 GiB of
    /// vmalloc space.
    pub const fn flat(phys_size: u64, nr_cpus: usize) -> MemorySpec {
        MemorySpec {
            phys_size,
            direct_map_size: phys_size,
            kmap_pages: 1024,
            vmalloc_size: 1 << 30,
            nr_cpus,
        }
    }
}

/// A virtual CPU: its lock word, alone on its cache lines.
#[repr(align(128))]
struct VCpu {
    /// Token of the thread holding this vCPU, 0 when free.
    owner: AtomicU64,
    /// Number of live guards on this vCPU; read and written only by its owner.
    depth: AtomicU32,
}

/// The reserved virtual region; unmapped on drop.
struct Region {
    base: usize,
    len: usize,
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `base..base + len` is a mapping this `Region` created and owns; the platform
        // that owned it is being dropped, so nothing borrows it any more.
        let _ = unsafe { rustix::mm::munmap(self.base as *mut c_void, self.len) };
    }
}

/// The simulated machine: memfd physical memory, real mappings, virtual CPUs, futex sleeps
/// and a log buffer. Implements [`Platform`].
pub struct HostedPlatform {
    id: u64,
    cpus: Box<[VCpu]>,
    next_home: AtomicUsize,
    phys_size: u64,
    direct_map_size: u64,
    direct_map_base: usize,
    kmap_base: usize,
    kmap_pages: usize,
    vmalloc_base: usize,
    vmalloc_size: usize,
    log: Mutex<VecDeque<(LogLevel, String)>>,
    echo: AtomicBool,
    // Dropped after every other field: the mappings go before the memfd closes.
    region: Region,
    memfd: OwnedFd,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn align_up(x: usize, a: usize) -> Option<usize> {
    Some(x.checked_add(a - 1)? & !(a - 1))
}

static NEXT_PLATFORM_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

impl HostedPlatform {
    /// Builds a machine: creates and sizes the memfd, reserves the virtual region and maps the
    /// direct map. Also makes the core's spin loops yield the thread.
    pub fn new(spec: MemorySpec) -> io::Result<HostedPlatform> {
        let page = PAGE_SIZE as u64;
        if spec.phys_size == 0 || spec.phys_size % page != 0 {
            return Err(invalid(
                "phys_size must be a nonzero multiple of the page size",
            ));
        }
        let direct_map_size = spec.direct_map_size.min(spec.phys_size);
        if direct_map_size % page != 0 {
            return Err(invalid(
                "direct_map_size must be a multiple of the page size",
            ));
        }
        if spec.nr_cpus == 0 || spec.nr_cpus > MAX_CPUS {
            return Err(invalid("nr_cpus must be in 1..=MAX_CPUS"));
        }
        let too_big = || invalid("memory spec does not fit the address space");
        let dm_bytes = usize::try_from(direct_map_size).map_err(|_| too_big())?;
        let vm_bytes = usize::try_from(spec.vmalloc_size)
            .ok()
            .and_then(|v| align_up(v, PAGE_SIZE))
            .ok_or_else(too_big)?;
        let kmap_bytes = spec.kmap_pages.checked_mul(PAGE_SIZE).ok_or_else(too_big)?;

        let dm_len = align_up(dm_bytes, SECTION_ALIGN).ok_or_else(too_big)?;
        let kmap_len = align_up(kmap_bytes, SECTION_ALIGN).ok_or_else(too_big)?;
        let vm_len = align_up(vm_bytes, SECTION_ALIGN).ok_or_else(too_big)?;
        let kmap_off = dm_len + GUARD_GAP;
        let vm_off = kmap_off
            .checked_add(kmap_len + GUARD_GAP)
            .ok_or_else(too_big)?;
        let total = vm_off
            .checked_add(vm_len)
            .and_then(|t| t.checked_add(GUARD_GAP))
            .ok_or_else(too_big)?;
        let reserve = total.checked_add(DIRECT_MAP_ALIGN).ok_or_else(too_big)?;

        let memfd = rustix::fs::memfd_create("kmem-phys", MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&memfd, spec.phys_size)?;

        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing replaces
        // nothing.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                core::ptr::null_mut(),
                reserve,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }? as usize;
        let base = align_up(raw, DIRECT_MAP_ALIGN).ok_or_else(too_big)?;
        let head = base - raw;
        let tail = reserve - head - total;
        if head > 0 {
            // SAFETY: `raw..base` is the unaligned head of the mapping just made; nothing
            // refers to it.
            unsafe { rustix::mm::munmap(raw as *mut c_void, head) }?;
        }
        if tail > 0 {
            // SAFETY: `base + total..raw + reserve` is the tail of the mapping just made;
            // nothing refers to it.
            unsafe { rustix::mm::munmap((base + total) as *mut c_void, tail) }?;
        }
        let region = Region { base, len: total };

        if dm_bytes > 0 {
            // SAFETY: `base..base + dm_bytes` lies inside the reservation this function owns
            // (`dm_bytes <= dm_len < total`), so MAP_FIXED replaces only our own PROT_NONE
            // pages; the memfd is at least `dm_bytes` long.
            unsafe {
                rustix::mm::mmap(
                    base as *mut c_void,
                    dm_bytes,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::FIXED,
                    &memfd,
                    0,
                )
            }?;
        }

        kmem::sync::set_relax_hook(std::thread::yield_now);

        Ok(HostedPlatform {
            id: NEXT_PLATFORM_ID.fetch_add(1, Ordering::Relaxed),
            cpus: (0..spec.nr_cpus)
                .map(|_| VCpu {
                    owner: AtomicU64::new(0),
                    depth: AtomicU32::new(0),
                })
                .collect(),
            next_home: AtomicUsize::new(0),
            phys_size: spec.phys_size,
            direct_map_size,
            direct_map_base: base,
            kmap_base: base + kmap_off,
            kmap_pages: spec.kmap_pages,
            vmalloc_base: base + vm_off,
            vmalloc_size: vm_bytes,
            log: Mutex::new(VecDeque::new()),
            echo: AtomicBool::new(false),
            region,
            memfd,
        })
    }

    /// Bytes of physical address space (the memfd's length).
    pub fn phys_size(&self) -> u64 {
        self.phys_size
    }

    /// Bytes of physical memory reachable through the direct map, from physical address 0.
    pub fn direct_map_size(&self) -> u64 {
        self.direct_map_size
    }

    /// The memfd holding physical memory (offset = physical address).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// The reserved vmalloc range: its first address and its length in bytes.
    pub fn vmalloc_range(&self) -> (VirtAddr, usize) {
        (VirtAddr(self.vmalloc_base), self.vmalloc_size)
    }

    /// The whole reserved region (direct map, kmap window, vmalloc range and the gaps
    /// between them): its first address and its length in bytes.
    pub fn region(&self) -> (VirtAddr, usize) {
        (VirtAddr(self.region.base), self.region.len)
    }

    /// The direct-map address of physical address `phys`, or `None` if `phys` is not direct
    /// mapped (HighMem, or beyond physical memory).
    pub fn phys_ptr(&self, phys: u64) -> Option<*mut u8> {
        (phys < self.direct_map_size).then(|| (self.direct_map_base + phys as usize) as *mut u8)
    }

    /// Turns echoing log lines to stderr (with a `[kmem] ` prefix) on or off. Off by default.
    pub fn set_log_echo(&self, on: bool) {
        self.echo.store(on, Ordering::Relaxed);
    }

    /// Removes and returns every line logged so far (at most [`LOG_CAPACITY`], oldest first).
    pub fn take_log(&self) -> Vec<String> {
        self.take_log_entries()
            .into_iter()
            .map(|(_, line)| line)
            .collect()
    }

    /// As [`HostedPlatform::take_log`], with each line's level.
    pub fn take_log_entries(&self) -> Vec<(LogLevel, String)> {
        self.log_buf().drain(..).collect()
    }

    /// True when a line still in the log contains `needle`.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log_buf().iter().any(|(_, line)| line.contains(needle))
    }

    fn log_buf(&self) -> std::sync::MutexGuard<'_, VecDeque<(LogLevel, String)>> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True when `va..va + npages` pages lie inside the kmap window or the vmalloc range.
    fn in_windows(&self, va: usize, npages: usize) -> bool {
        let Some(len) = npages.checked_mul(PAGE_SIZE) else {
            return false;
        };
        let inside = |start: usize, size: usize| {
            va >= start && va.checked_add(len).is_some_and(|end| end <= start + size)
        };
        va % PAGE_SIZE == 0
            && (inside(self.kmap_base, self.kmap_pages * PAGE_SIZE)
                || inside(self.vmalloc_base, self.vmalloc_size))
    }

    /// The next home vCPU, round-robin.
    fn assign_home(&self) -> u32 {
        (self.next_home.fetch_add(1, Ordering::Relaxed) % self.cpus.len()) as u32
    }

    #[inline]
    fn guard(&self, cpu: u32, slot: usize, nested: bool) -> HostedGuard<'_> {
        HostedGuard {
            platform: self,
            cpu,
            slot: slot as u8,
            nested,
            _not_send: PhantomData,
        }
    }

    /// Slow path of `cpu_guard`: the home vCPU is taken; tries the others in turn, then again
    /// from home, yielding between rounds.
    #[cold]
    #[inline(never)]
    fn acquire_any(&self, token: u64, home: u32) -> u32 {
        let n = self.cpus.len();
        loop {
            for k in 1..=n {
                let cpu = (home as usize + k) % n;
                let owner = &self.cpus[cpu].owner;
                if owner.load(Ordering::Relaxed) == 0
                    && owner
                        .compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    return cpu as u32;
                }
            }
            std::thread::yield_now();
        }
    }

    /// Some vCPU this thread holds (it holds at least one): for nesting after the outermost
    /// guard was dropped first.
    #[cold]
    #[inline(never)]
    fn find_owned(&self, token: u64) -> u32 {
        let cpu = self
            .cpus
            .iter()
            .position(|v| v.owner.load(Ordering::Relaxed) == token)
            .expect("kmem-hosted: thread counts guards but holds no vCPU");
        cpu as u32
    }
}

impl fmt::Debug for HostedPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostedPlatform")
            .field("id", &self.id)
            .field("nr_cpus", &self.cpus.len())
            .field("phys_size", &self.phys_size)
            .field(
                "direct_map_base",
                &format_args!("{:#x}", self.direct_map_base),
            )
            .field("direct_map_size", &self.direct_map_size)
            .field("kmap_base", &format_args!("{:#x}", self.kmap_base))
            .field("kmap_pages", &self.kmap_pages)
            .field("vmalloc_base", &format_args!("{:#x}", self.vmalloc_base))
            .field("vmalloc_size", &self.vmalloc_size)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Per-thread state
// ---------------------------------------------------------------------------------------------

/// Most machines a thread can hold guards of at the same time.
const NSLOTS: usize = 8;
/// `Slot::cur` when unknown.
const NO_CPU: u32 = u32::MAX;

/// A thread's state on one machine.
struct Slot {
    /// The machine's id; 0 for an empty slot.
    id: Cell<u64>,
    /// The vCPU `cpu_guard` tries first.
    home: Cell<u32>,
    /// The CPU nested `cpu_guard`s run on: that of the guard which started the atomic
    /// section, or `NO_CPU` once it was released (then found again by a scan).
    cur: Cell<u32>,
    /// Live guards of this machine held by this thread (`in_atomic` when > 0).
    count: Cell<u32>,
}

struct ThreadState {
    /// This thread's owner token (nonzero once assigned, unique in the process).
    token: Cell<u64>,
    /// The slot used last.
    last: Cell<usize>,
    /// xorshift64 state; 0 until seeded.
    rng: Cell<u64>,
    slots: [Slot; NSLOTS],
}

impl ThreadState {
    const fn new() -> ThreadState {
        ThreadState {
            token: Cell::new(0),
            last: Cell::new(0),
            rng: Cell::new(0),
            slots: [const {
                Slot {
                    id: Cell::new(0),
                    home: Cell::new(0),
                    cur: Cell::new(NO_CPU),
                    count: Cell::new(0),
                }
            }; NSLOTS],
        }
    }

    /// This thread's slot for `p`, assigning one (and a home vCPU) at first use.
    #[inline]
    fn slot(&self, p: &HostedPlatform) -> usize {
        let i = self.last.get();
        if self.slots[i].id.get() == p.id {
            i
        } else {
            self.slot_slow(p)
        }
    }

    /// This thread's slot for `p`, if it has one.
    fn find(&self, id: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.id.get() == id)
    }

    #[cold]
    #[inline(never)]
    fn slot_slow(&self, p: &HostedPlatform) -> usize {
        if self.token.get() == 0 {
            self.token.set(NEXT_TOKEN.fetch_add(1, Ordering::Relaxed));
        }
        let i = match self.find(p.id) {
            Some(i) => i,
            None => {
                let i = self
                    .slots
                    .iter()
                    .position(|s| s.id.get() == 0)
                    .or_else(|| self.slots.iter().position(|s| s.count.get() == 0))
                    .unwrap_or_else(|| {
                        panic!("kmem-hosted: a thread holds guards of more than {NSLOTS} machines")
                    });
                let s = &self.slots[i];
                s.id.set(p.id);
                s.home.set(p.assign_home());
                s.cur.set(NO_CPU);
                s.count.set(0);
                i
            }
        };
        self.last.set(i);
        i
    }
}

thread_local! {
    static THREAD: ThreadState = const { ThreadState::new() };
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

// ---------------------------------------------------------------------------------------------
// The guard
// ---------------------------------------------------------------------------------------------

/// A section on one virtual CPU of a [`HostedPlatform`].
///
/// While any guard on vCPU *c* lives, the thread that holds it owns *c*: no other thread gets
/// a guard on *c* until every guard on *c* is dropped. A thread's guards on one machine nest:
/// the first one (from [`Platform::cpu_guard`]) takes a vCPU, later ones reuse it, report
/// [`CpuGuard::nested`] and cost no atomic operation. A guard from [`Platform::lock_cpu`] of
/// another vCPU takes that vCPU too (a thread may hold several); nested `cpu_guard`s keep
/// running on the CPU of the guard that started the atomic section. Guards may be dropped in
/// any order. Not `Send`: a guard is released by the thread that took it.
pub struct HostedGuard<'a> {
    platform: &'a HostedPlatform,
    cpu: u32,
    slot: u8,
    nested: bool,
    _not_send: PhantomData<*mut ()>,
}

impl CpuGuard for HostedGuard<'_> {
    #[inline]
    fn cpu(&self) -> usize {
        self.cpu as usize
    }

    #[inline]
    fn nested(&self) -> bool {
        self.nested
    }
}

impl Drop for HostedGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        let v = &self.platform.cpus[self.cpu as usize];
        let depth = v.depth.load(Ordering::Relaxed) - 1;
        v.depth.store(depth, Ordering::Relaxed);
        if depth == 0 {
            v.owner.store(0, Ordering::Release);
        }
        THREAD.with(|t| {
            let s = &t.slots[self.slot as usize];
            s.count.set(s.count.get() - 1);
            if depth == 0 && s.cur.get() == self.cpu {
                s.cur.set(NO_CPU);
            }
        });
    }
}

impl fmt::Debug for HostedGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostedGuard")
            .field("cpu", &self.cpu)
            .field("nested", &self.nested)
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Platform
// ---------------------------------------------------------------------------------------------

fn to_prot(prot: PageProt) -> ProtFlags {
    if prot.contains(PageProt::WRITE) {
        ProtFlags::READ | ProtFlags::WRITE
    } else if prot.contains(PageProt::READ) {
        ProtFlags::READ
    } else {
        ProtFlags::empty()
    }
}

impl Platform for HostedPlatform {
    type Guard<'a> = HostedGuard<'a>;

    #[inline]
    fn nr_cpu_ids(&self) -> usize {
        self.cpus.len()
    }

    #[inline]
    fn cpu_guard(&self) -> HostedGuard<'_> {
        THREAD.with(|t| {
            let si = t.slot(self);
            let s = &t.slots[si];
            let count = s.count.get();
            if count == 0 {
                let token = t.token.get();
                let home = s.home.get();
                let cpu = if self.cpus[home as usize]
                    .owner
                    .compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    home
                } else {
                    self.acquire_any(token, home)
                };
                self.cpus[cpu as usize].depth.store(1, Ordering::Relaxed);
                s.cur.set(cpu);
                s.count.set(1);
                self.guard(cpu, si, false)
            } else {
                let mut cpu = s.cur.get();
                if cpu == NO_CPU {
                    cpu = self.find_owned(t.token.get());
                    s.cur.set(cpu);
                }
                let v = &self.cpus[cpu as usize];
                v.depth
                    .store(v.depth.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                s.count.set(count + 1);
                self.guard(cpu, si, true)
            }
        })
    }

    fn lock_cpu(&self, cpu: usize) -> HostedGuard<'_> {
        assert!(
            cpu < self.cpus.len(),
            "lock_cpu({cpu}) on a machine with {} CPUs",
            self.cpus.len()
        );
        THREAD.with(|t| {
            let si = t.slot(self);
            let s = &t.slots[si];
            let token = t.token.get();
            let count = s.count.get();
            let v = &self.cpus[cpu];
            if v.owner.load(Ordering::Relaxed) == token {
                // Only this thread ever stores its token, so this is not a stale read.
                v.depth
                    .store(v.depth.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            } else {
                let mut spins = 0u32;
                while v
                    .owner
                    .compare_exchange_weak(0, token, Ordering::Acquire, Ordering::Relaxed)
                    .is_err()
                {
                    spins += 1;
                    if spins < 64 {
                        core::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
                v.depth.store(1, Ordering::Relaxed);
            }
            if s.cur.get() == NO_CPU {
                s.cur.set(cpu as u32);
            }
            s.count.set(count + 1);
            self.guard(cpu as u32, si, count > 0)
        })
    }

    #[inline]
    fn in_atomic(&self) -> bool {
        THREAD.with(|t| {
            let i = t.last.get();
            let i = if t.slots[i].id.get() == self.id {
                i
            } else {
                match t.find(self.id) {
                    Some(i) => i,
                    None => return false,
                }
            };
            t.slots[i].count.get() > 0
        })
    }

    fn wait(&self, word: &AtomicU32, expected: u32, timeout_ns: u64) {
        let ts = rustix::time::Timespec {
            tv_sec: (timeout_ns / 1_000_000_000) as i64,
            tv_nsec: (timeout_ns % 1_000_000_000) as i64,
        };
        let timeout = (timeout_ns != u64::MAX).then_some(&ts);
        // EAGAIN (the word changed), ETIMEDOUT and EINTR all mean "re-check": ignore them.
        let _ = rustix::thread::futex::wait(
            word,
            rustix::thread::futex::Flags::PRIVATE,
            expected,
            timeout,
        );
    }

    fn wake_all(&self, word: &AtomicU32) {
        let _ = rustix::thread::futex::wake(
            word,
            rustix::thread::futex::Flags::PRIVATE,
            i32::MAX as u32,
        );
    }

    #[inline]
    fn relax(&self) {
        std::thread::yield_now();
    }

    #[inline]
    fn direct_map_base(&self) -> usize {
        self.direct_map_base
    }

    fn kmap_window(&self) -> (VirtAddr, usize) {
        (VirtAddr(self.kmap_base), self.kmap_pages)
    }

    unsafe fn map_page(&self, va: VirtAddr, pfn: Pfn, prot: PageProt) -> Result<(), MapError> {
        if !self.in_windows(va.0, 1) {
            return Err(MapError);
        }
        let offset = pfn
            .0
            .checked_mul(PAGE_SIZE as u64)
            .filter(|&o| o < self.phys_size)
            .ok_or(MapError)?;
        // SAFETY: `va..va + PAGE_SIZE` lies inside the kmap window or the vmalloc range of our
        // own reservation (checked above), so MAP_FIXED replaces only a page of those windows,
        // which the caller guarantees nothing relies on; `offset` is inside the memfd.
        unsafe {
            rustix::mm::mmap(
                va.0 as *mut c_void,
                PAGE_SIZE,
                to_prot(prot),
                MapFlags::SHARED | MapFlags::FIXED,
                &self.memfd,
                offset,
            )
        }
        .map(|_| ())
        .map_err(|_| MapError)
    }

    unsafe fn unmap_pages(&self, va: VirtAddr, npages: usize) {
        if npages == 0 {
            return;
        }
        if !self.in_windows(va.0, npages) {
            self.log(
                LogLevel::Err,
                format_args!(
                    "kmem-hosted: unmap_pages({:#x}, {npages}) outside the kmap/vmalloc windows",
                    va.0
                ),
            );
            return;
        }
        // SAFETY: the range lies inside the kmap window or the vmalloc range of our own
        // reservation (checked above); the caller guarantees no one uses it. A fresh PROT_NONE
        // reservation takes its place, so the address space stays ours and a touch faults.
        let r = unsafe {
            rustix::mm::mmap_anonymous(
                va.0 as *mut c_void,
                npages * PAGE_SIZE,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        };
        if let Err(e) = r {
            self.log(
                LogLevel::Err,
                format_args!(
                    "kmem-hosted: unmap_pages({:#x}, {npages}) failed: {e}",
                    va.0
                ),
            );
        }
    }

    fn random_u64(&self) -> u64 {
        THREAD.with(|t| {
            let mut x = t.rng.get();
            if x == 0 {
                let tid = rustix::thread::gettid().as_raw_nonzero().get() as u64;
                x = splitmix64(monotonic_ns() ^ (tid << 32) ^ (t as *const ThreadState as u64)) | 1;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            t.rng.set(x);
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        })
    }

    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }

    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>) {
        let line = fmt::format(args);
        if self.echo.load(Ordering::Relaxed) {
            eprintln!("[kmem] {line}");
        }
        let mut log = self.log_buf();
        if log.len() >= LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back((level, line));
    }

    fn current_task(&self) -> TaskInfo {
        let pid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("kmem-test");
        let mut n = name.len().min(15);
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        let mut comm = [0u8; 16];
        comm[..n].copy_from_slice(&name.as_bytes()[..n]);
        TaskInfo { pid, comm }
    }
}

#[cfg(test)]
mod tests;
