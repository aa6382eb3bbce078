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
//! * **Virtual CPUs** are owner words, one per cache line. A thread that gets a vCPU keeps it
//!   between sections, so [`Platform::cpu_guard`] is usually a plain store and a plain load
//!   (no atomic read-modify-write); another thread takes a vCPU away with a compare-and-swap
//!   and a `membarrier`, which is what makes the store-then-load safe. More threads than
//!   vCPUs work (slower). Without `membarrier`, each section takes its vCPU with a
//!   compare-and-swap instead ([`GuardMode`]). Guards nest without any atomic operation. See
//!   the `cpus` module and [`HostedGuard`].
//!
//! * **Sleeping** is a private futex; **relax** is a thread yield; the **log** is an in-memory
//!   ring of lines, optionally echoed to stderr.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use kmem::addr::{PAGE_SIZE, Pfn, VirtAddr};
use kmem::platform::{LogLevel, MapError, PageProt, Platform, TaskInfo};
use rustix::fs::MemfdFlags;
use rustix::mm::{MapFlags, ProtFlags};

mod cpus;

use cpus::CpuSet;
#[cfg(test)]
use cpus::NSLOTS;
pub use cpus::{GUARD_MODE_ENV, GuardMode, GuardStats, HostedGuard};

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
    cpus: CpuSet,
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

impl HostedPlatform {
    /// Builds a machine: creates and sizes the memfd, reserves the virtual region and maps the
    /// direct map. Also makes the core's spin loops yield the thread.
    ///
    /// The CPU guards are [`GuardMode::Biased`] when the kernel has `membarrier`, unless the
    /// environment variable [`GUARD_MODE_ENV`] is `cas`.
    pub fn new(spec: MemorySpec) -> io::Result<HostedPlatform> {
        let mode = GuardMode::from_env()
            .ok_or_else(|| invalid("KMEM_HOSTED_GUARD_MODE must be `biased` or `cas`"))?;
        HostedPlatform::with_guard_mode(spec, mode)
    }

    /// As [`HostedPlatform::new`], with the CPU guards' implementation chosen by the caller
    /// (the environment is not read). [`GuardMode::Biased`] falls back to
    /// [`GuardMode::Cas`] when `membarrier` is not available; see
    /// [`HostedPlatform::guard_mode`].
    pub fn with_guard_mode(spec: MemorySpec, mode: GuardMode) -> io::Result<HostedPlatform> {
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
            cpus: CpuSet::new(spec.nr_cpus, mode),
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

    /// How this machine's CPU guards work.
    pub fn guard_mode(&self) -> GuardMode {
        self.cpus.mode()
    }

    /// Counters of the CPU guards' slow paths.
    pub fn guard_stats(&self) -> GuardStats {
        self.cpus.stats()
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
}

impl fmt::Debug for HostedPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostedPlatform")
            .field("id", &self.cpus.id())
            .field("guard_mode", &self.cpus.mode())
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

thread_local! {
    /// xorshift64 state of `random_u64`; 0 until seeded.
    static RNG: Cell<u64> = const { Cell::new(0) };
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

    #[inline(always)]
    fn cpu_guard(&self) -> HostedGuard<'_> {
        self.cpus.guard()
    }

    #[inline(always)]
    unsafe fn this_cpu<R>(&self, f: impl FnOnce(usize, bool) -> R) -> R {
        // SAFETY: the caller's contract is the one `CpuSet::with_cpu` needs.
        unsafe { self.cpus.with_cpu(f) }
    }

    fn lock_cpu(&self, cpu: usize) -> HostedGuard<'_> {
        self.cpus.lock(cpu)
    }

    #[inline]
    fn in_atomic(&self) -> bool {
        self.cpus.in_atomic()
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

    fn vmalloc_range(&self) -> (VirtAddr, usize) {
        (VirtAddr(self.vmalloc_base), self.vmalloc_size)
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
        RNG.with(|rng| {
            let mut x = rng.get();
            if x == 0 {
                let tid = rustix::thread::gettid().as_raw_nonzero().get() as u64;
                x = splitmix64(monotonic_ns() ^ (tid << 32) ^ (rng as *const Cell<u64> as u64)) | 1;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            rng.set(x);
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
mod guard_tests;
#[cfg(test)]
mod tests;
