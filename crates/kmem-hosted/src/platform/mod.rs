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
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Barrier};
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn machine(nr_cpus: usize) -> HostedPlatform {
        HostedPlatform::new(MemorySpec {
            phys_size: 64 * MIB,
            direct_map_size: 64 * MIB,
            kmap_pages: 16,
            vmalloc_size: 16 * MIB,
            nr_cpus,
        })
        .unwrap()
    }

    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * PAGE_SIZE as u64
    }

    fn memfd_bytes(p: &HostedPlatform) -> u64 {
        rustix::fs::fstat(p.memfd()).unwrap().st_blocks as u64 * 512
    }

    #[test]
    fn layout() {
        let p = machine(2);
        assert_eq!(p.direct_map_base() % DIRECT_MAP_ALIGN, 0);
        let (kva, kpages) = p.kmap_window();
        let (vva, vlen) = p.vmalloc_range();
        assert_eq!(kpages, 16);
        assert_eq!(vlen, 16 * MIB as usize);
        assert!(kva.0 >= p.direct_map_base() + 64 * MIB as usize + GUARD_GAP);
        assert!(vva.0 >= kva.0 + kpages * PAGE_SIZE + GUARD_GAP);
        let (rva, rlen) = p.region();
        assert!(vva.0 + vlen + GUARD_GAP <= rva.0 + rlen);
        assert_eq!(p.phys_ptr(0), Some(p.direct_map_base() as *mut u8));
        assert_eq!(p.phys_ptr(64 * MIB), None);
        assert!(HostedPlatform::new(MemorySpec::flat(4095, 1)).is_err());
        assert!(HostedPlatform::new(MemorySpec::flat(MIB, 0)).is_err());
        // x86_32-like: only the low part is direct mapped.
        let p = HostedPlatform::new(MemorySpec {
            direct_map_size: 16 * MIB,
            ..MemorySpec::flat(64 * MIB, 1)
        })
        .unwrap();
        assert_eq!(p.direct_map_size(), 16 * MIB);
        assert!(p.phys_ptr(16 * MIB - 1).is_some());
        assert!(p.phys_ptr(16 * MIB).is_none());
    }

    #[test]
    fn memfd_is_sparse() {
        let rss0 = rss_bytes();
        let p = HostedPlatform::new(MemorySpec::flat(64 * GIB, 4)).unwrap();
        assert_eq!(p.phys_size(), 64 * GIB);
        assert_eq!(memfd_bytes(&p), 0);
        let ptr = p.phys_ptr(40 * GIB + 123).unwrap();
        // SAFETY: 40 GiB + 123 is inside the direct map of a 64 GiB machine.
        unsafe { ptr.write_volatile(0x5a) };
        // SAFETY: as above.
        assert_eq!(unsafe { ptr.read_volatile() }, 0x5a);
        assert!(
            memfd_bytes(&p) <= 2 * MIB,
            "memfd holds {}",
            memfd_bytes(&p)
        );
        // Other tests run alongside, so allow them some growth; 64 GiB would not fit.
        assert!(rss_bytes() < rss0 + 512 * MIB);
    }

    #[test]
    fn kmap_shares_the_direct_map() {
        let p = machine(1);
        let phys = 5 * PAGE_SIZE as u64;
        let dm = p.phys_ptr(phys).unwrap();
        // SAFETY: the page at `phys` is direct mapped and this test owns the machine.
        unsafe { dm.add(8).write_volatile(0xab) };
        let (kva, n) = p.kmap_window();
        let va = VirtAddr(kva.0 + (n - 1) * PAGE_SIZE);
        // SAFETY: `va` is the last page of the kmap window; nothing is mapped there.
        unsafe { p.map_page(va, Pfn(phys >> 12), PageProt::KERNEL) }.unwrap();
        // SAFETY: `va` was just mapped read/write to the same frame.
        unsafe {
            assert_eq!(va.as_ptr().add(8).read_volatile(), 0xab);
            va.as_ptr().add(9).write_volatile(0xcd);
            assert_eq!(dm.add(9).read_volatile(), 0xcd);
        }
        // vmalloc range: two discontiguous frames side by side.
        let (vva, _) = p.vmalloc_range();
        for (i, pfn) in [7u64, 3].into_iter().enumerate() {
            let va = VirtAddr(vva.0 + i * PAGE_SIZE);
            // SAFETY: inside the vmalloc range, nothing there yet.
            unsafe { p.map_page(va, Pfn(pfn), PageProt::KERNEL) }.unwrap();
            // SAFETY: the direct map covers the frame.
            unsafe { p.phys_ptr(pfn << 12).unwrap().write_volatile(pfn as u8) };
        }
        // SAFETY: both pages are mapped.
        unsafe {
            assert_eq!(vva.as_ptr().read_volatile(), 7);
            assert_eq!(vva.as_ptr().add(PAGE_SIZE).read_volatile(), 3);
        }
        // SAFETY: the pages are ours and no longer used.
        unsafe {
            p.unmap_pages(vva, 2);
            p.unmap_pages(va, 1);
        }
    }

    #[test]
    fn map_page_outside_windows_fails() {
        let p = machine(1);
        let (kva, n) = p.kmap_window();
        let (vva, vlen) = p.vmalloc_range();
        let bad = [
            VirtAddr(p.direct_map_base()),
            VirtAddr(kva.0 + 1),
            VirtAddr(kva.0 + n * PAGE_SIZE),
            VirtAddr(kva.0 - PAGE_SIZE),
            VirtAddr(vva.0 + vlen),
            VirtAddr(0x1000),
        ];
        for va in bad {
            // SAFETY: the call is refused before anything is mapped.
            let r = unsafe { p.map_page(va, Pfn(0), PageProt::KERNEL) };
            assert_eq!(r, Err(MapError), "{va:?}");
        }
        // Frame beyond physical memory.
        // SAFETY: refused, as above.
        let r = unsafe { p.map_page(kva, Pfn((64 * MIB) >> 12), PageProt::KERNEL) };
        assert_eq!(r, Err(MapError));
        // SAFETY: refused before anything is unmapped: the direct map stays.
        unsafe { p.unmap_pages(VirtAddr(p.direct_map_base()), 1) };
        assert!(p.log_contains("outside the kmap/vmalloc windows"));
        // SAFETY: the direct map is intact.
        unsafe { p.phys_ptr(0).unwrap().write_volatile(1) };
    }

    const FAULT_CHILD_ENV: &str = "KMEM_HOSTED_FAULT_CHILD";

    /// Run by `unmapped_page_faults` in a child process; does nothing in a normal test run.
    #[test]
    fn fault_child() {
        if std::env::var_os(FAULT_CHILD_ENV).is_none() {
            return;
        }
        let p = machine(1);
        let (kva, _) = p.kmap_window();
        // SAFETY: the kmap window is ours and empty.
        unsafe { p.map_page(kva, Pfn(1), PageProt::KERNEL) }.unwrap();
        // SAFETY: just mapped read/write.
        unsafe { kva.as_ptr().write_volatile(1) };
        // SAFETY: nothing uses the page any more.
        unsafe { p.unmap_pages(kva, 1) };
        // SAFETY: not sound on purpose: this read must fault, and the process dies of SIGSEGV
        // before any value is produced.
        let v = unsafe { kva.as_ptr().read_volatile() };
        std::process::exit(100 + i32::from(v));
    }

    #[test]
    fn unmapped_page_faults() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "platform::tests::fault_child",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(FAULT_CHILD_ENV, "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(11), // SIGSEGV
            "child: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn guards_nest_and_set_in_atomic() {
        let p = machine(2);
        assert!(!p.in_atomic());
        {
            let g = p.cpu_guard();
            assert!(!g.nested());
            assert!(g.cpu() < 2);
            assert!(p.in_atomic());
            {
                let h = p.cpu_guard();
                assert!(h.nested());
                assert_eq!(h.cpu(), g.cpu());
            }
            assert!(p.in_atomic());
        }
        assert!(!p.in_atomic());
        let g = p.cpu_guard();
        assert!(!g.nested());
        drop(g);
        // Out-of-order drop.
        let g = p.cpu_guard();
        let h = p.cpu_guard();
        let cpu = g.cpu();
        drop(g);
        assert!(p.in_atomic());
        let i = p.cpu_guard();
        assert!(i.nested());
        assert_eq!(i.cpu(), cpu);
        drop(h);
        drop(i);
        assert!(!p.in_atomic());
        // The vCPU is really free: another thread can lock it at once.
        std::thread::scope(|s| {
            s.spawn(|| drop(p.lock_cpu(cpu)));
        });
    }

    #[test]
    fn lock_cpu_nests_and_takes_other_cpus() {
        let p = machine(2);
        let g = p.cpu_guard();
        let me = g.cpu();
        let other = 1 - me;
        let same = p.lock_cpu(me);
        assert!(same.nested());
        assert_eq!(same.cpu(), me);
        let o = p.lock_cpu(other);
        assert!(o.nested());
        assert_eq!(o.cpu(), other);
        let n = p.cpu_guard();
        assert_eq!(n.cpu(), me, "nesting stays on the outer CPU");
        let o2 = p.lock_cpu(other);
        assert!(o2.nested());
        drop((g, same, n, o2));
        assert!(p.in_atomic());
        // Only `other` is still held: a nested cpu_guard runs on it.
        let n = p.cpu_guard();
        assert_eq!(n.cpu(), other);
        drop(n);
        drop(o);
        assert!(!p.in_atomic());
        std::thread::scope(|s| {
            s.spawn(|| {
                let a = p.lock_cpu(0);
                assert!(!a.nested());
                drop(a);
                drop(p.lock_cpu(1));
            });
        });
        // lock_cpu alone: a following cpu_guard nests on that CPU.
        let l = p.lock_cpu(other);
        assert!(!l.nested());
        let n = p.cpu_guard();
        assert!(n.nested());
        assert_eq!(n.cpu(), other);
    }

    #[test]
    fn two_machines_on_one_thread() {
        let a = machine(1);
        let b = machine(1);
        for _ in 0..3 {
            let ga = a.cpu_guard();
            assert!(a.in_atomic());
            assert!(!b.in_atomic());
            let gb = b.cpu_guard();
            assert!(!gb.nested(), "a guard of another machine is not nesting");
            assert!(b.in_atomic());
            drop(ga);
            assert!(!a.in_atomic());
            assert!(b.in_atomic());
            let ga = a.cpu_guard();
            assert!(!ga.nested());
            drop(gb);
            drop(ga);
        }
        // More machines than slots, used alternately.
        let many: Vec<_> = (0..NSLOTS + 3).map(|_| machine(1)).collect();
        for _ in 0..2 {
            for m in &many {
                let g = m.cpu_guard();
                assert!(!g.nested());
                assert!(m.in_atomic());
                assert!(!a.in_atomic());
            }
        }
    }

    #[test]
    fn two_threads_get_distinct_cpus() {
        let p = machine(2);
        let barrier = Barrier::new(2);
        let cpus: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let g = p.cpu_guard();
                        barrier.wait();
                        let c = g.cpu();
                        barrier.wait();
                        c
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_ne!(cpus[0], cpus[1]);
    }

    #[test]
    fn oversubscribed_threads_all_progress() {
        let p = machine(2);
        let inside: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
        let done = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for i in 0..2000 {
                        let g = p.cpu_guard();
                        assert!(!inside[g.cpu()].swap(true, Ordering::Relaxed));
                        if i % 64 == 0 {
                            std::thread::yield_now();
                        }
                        inside[g.cpu()].store(false, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn lock_cpu_excludes_the_owner() {
        let p = machine(2);
        let inside: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
        let overlaps = AtomicUsize::new(0);
        let section = |cpu: usize| {
            if inside[cpu].swap(true, Ordering::Relaxed) {
                overlaps.fetch_add(1, Ordering::Relaxed);
            }
            for _ in 0..50 {
                core::hint::spin_loop();
            }
            std::thread::yield_now();
            inside[cpu].store(false, Ordering::Relaxed);
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..3000 {
                    let g = p.cpu_guard();
                    section(g.cpu());
                }
            });
            s.spawn(|| {
                for i in 0..3000 {
                    let g = p.lock_cpu(i % 2);
                    section(g.cpu());
                }
            });
        });
        assert_eq!(overlaps.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn machines_on_parallel_threads_do_not_interfere() {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let p = machine(1);
                    for _ in 0..1000 {
                        let g = p.cpu_guard();
                        assert!(!g.nested());
                        assert_eq!(g.cpu(), 0);
                    }
                });
            }
        });
    }

    #[test]
    fn wait_is_woken() {
        let p = Arc::new(machine(1));
        let word = Arc::new(AtomicU32::new(0));
        let t0 = Instant::now();
        let h = {
            let (p, word) = (p.clone(), word.clone());
            std::thread::spawn(move || {
                while word.load(Ordering::Acquire) == 0 {
                    p.wait(&word, 0, 10_000_000_000);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        word.store(1, Ordering::Release);
        p.wake_all(&word);
        h.join().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wait_times_out() {
        let p = machine(1);
        let word = AtomicU32::new(0);
        let t0 = p.now_ns();
        p.wait(&word, 0, 100_000_000);
        let dt = p.now_ns() - t0;
        assert!(dt >= 90_000_000, "woke after {dt} ns");
        assert!(dt < 2_000_000_000, "woke after {dt} ns");
        // A changed word returns at once.
        let t0 = Instant::now();
        p.wait(&word, 1, 5_000_000_000);
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn log_capture() {
        let p = machine(1);
        p.log(LogLevel::Info, format_args!("hello {}", 5));
        p.log(LogLevel::Err, format_args!("BUG: bad page"));
        assert!(p.log_contains("hello 5"));
        assert!(!p.log_contains("goodbye"));
        assert_eq!(
            p.take_log_entries(),
            [
                (LogLevel::Info, "hello 5".to_string()),
                (LogLevel::Err, "BUG: bad page".to_string())
            ]
        );
        assert!(p.take_log().is_empty());
        for i in 0..LOG_CAPACITY + 5 {
            p.log(LogLevel::Debug, format_args!("line {i}"));
        }
        let log = p.take_log();
        assert_eq!(log.len(), LOG_CAPACITY);
        assert_eq!(log[0], "line 5");
    }

    #[test]
    fn task_random_and_clock() {
        let p = machine(1);
        let (pid, comm) = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("kmem-worker-with-a-long-name".into())
                .spawn_scoped(s, || {
                    let t = p.current_task();
                    (t.pid, t.comm().to_string())
                })
                .unwrap()
                .join()
                .unwrap()
        });
        assert_eq!(comm, "kmem-worker-wit");
        assert_ne!(pid, rustix::thread::gettid().as_raw_nonzero().get() as u32);
        let a: Vec<u64> = (0..64).map(|_| p.random_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] != w[1]));
        let t0 = p.now_ns();
        assert!(p.now_ns() >= t0);
    }
}
