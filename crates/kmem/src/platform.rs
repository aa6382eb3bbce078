//! The platform trait: everything the core needs from its surroundings.
//!
//! The core never names an operating system. A kernel implements [`Platform`] with its
//! scheduler, page tables and console; `kmem-hosted` implements it with threads as virtual
//! CPUs, futexes, a memfd mapped with `mmap(MAP_FIXED)` and a log buffer.
//!
//! # CPUs and preemption
//!
//! Per-CPU data (page lists, later slab and percpu areas) is reached only through a
//! [`CpuGuard`]: while a guard lives, its holder is the only code running on that CPU, exactly
//! as preemption and interrupts being disabled guarantee in a kernel. Guards nest (the inner one
//! reports [`CpuGuard::nested`]), which is how the core tells atomic context from process
//! context. [`Platform::lock_cpu`] obtains the guard of a *given* CPU; the core uses it only on
//! slow paths (draining another CPU's lists), where a kernel would run the work on that CPU.
//!
//! # Sleeping
//!
//! Sleeping is futex-shaped: [`Platform::wait`] sleeps while a word still holds the value the
//! caller saw, [`Platform::wake_all`] wakes the sleepers on a word. A platform that cannot sleep
//! (a single-CPU boot kernel) may return from `wait` at once; callers always re-check.

use core::fmt;
use core::sync::atomic::AtomicU32;

use crate::addr::{Pfn, VirtAddr};

/// Protection of a page mapping.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PageProt(pub u32);

impl PageProt {
    /// Readable.
    pub const READ: PageProt = PageProt(1);
    /// Writable (implies readable on every platform kmem knows).
    pub const WRITE: PageProt = PageProt(2);
    /// Reachable from user space (`vmalloc_user`).
    pub const USER: PageProt = PageProt(4);
    /// Uncached (`pgprot_noncached`).
    pub const NOCACHE: PageProt = PageProt(8);
    /// Ordinary kernel data: `PAGE_KERNEL`.
    pub const KERNEL: PageProt = PageProt(1 | 2);

    /// True when every bit of `other` is set.
    pub const fn contains(self, other: PageProt) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Mapping a page failed (the platform ran out of page-table memory, or the range is not one
/// the platform manages).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MapError;

/// Severity of a log line, as the kernel's `KERN_*` levels.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum LogLevel {
    /// `KERN_ERR`: bugs and bad input ("BUG: Bad page state").
    Err = 3,
    /// `KERN_WARNING`: allocation failures.
    Warning = 4,
    /// `KERN_INFO`: boot messages.
    Info = 6,
    /// `KERN_DEBUG`.
    Debug = 7,
}

/// Who is running, for reports ("in process X pid: N").
#[derive(Clone, Copy, Debug)]
pub struct TaskInfo {
    /// Process/thread id.
    pub pid: u32,
    /// The task's name, NUL padded (`comm`, 16 bytes as in Linux).
    pub comm: [u8; 16],
}

impl TaskInfo {
    /// The name as text.
    pub fn comm(&self) -> &str {
        let len = self.comm.iter().position(|&b| b == 0).unwrap_or(16);
        core::str::from_utf8(&self.comm[..len]).unwrap_or("?")
    }
}

/// A section pinned to one CPU, with preemption (and on a kernel, interrupts) disabled.
///
/// Dropping the guard ends the section.
pub trait CpuGuard {
    /// The CPU this section runs on, `< nr_cpu_ids()`.
    fn cpu(&self) -> usize;
    /// True when this guard was taken inside another one: the caller is in atomic context.
    fn nested(&self) -> bool;
}

/// What the core needs from the machine it runs on.
///
/// Implementations must be cheap on the paths marked *fast*: they are called on every
/// allocation.
pub trait Platform: Send + Sync {
    /// The guard type of [`Platform::cpu_guard`].
    type Guard<'a>: CpuGuard
    where
        Self: 'a;

    /// Number of possible CPUs; CPU ids are `0..nr_cpu_ids()`.
    fn nr_cpu_ids(&self) -> usize;

    /// *Fast.* Pins the caller to its current CPU and disables preemption (`get_cpu()`).
    fn cpu_guard(&self) -> Self::Guard<'_>;

    /// *Fast.* Runs `f(cpu, nested)` pinned to the current CPU with preemption disabled: the
    /// closure form of [`Platform::cpu_guard`] for the allocators' innermost fast paths,
    /// which a platform may implement with less bookkeeping than a guard. `nested` is true
    /// when the caller was already in atomic context.
    ///
    /// # Safety
    ///
    /// `f` must not take a CPU guard (`cpu_guard`, `lock_cpu`, `this_cpu`), call
    /// `in_atomic`, or sleep: a platform may run it without recording the section.
    #[inline(always)]
    unsafe fn this_cpu<R>(&self, f: impl FnOnce(usize, bool) -> R) -> R {
        let g = self.cpu_guard();
        f(g.cpu(), g.nested())
    }

    /// Runs on behalf of `cpu`: returns that CPU's guard, waiting until its current holder
    /// leaves its section. Used on slow paths only (draining a remote CPU's lists).
    ///
    /// Context: process context. Must not be called while holding a guard of another CPU:
    /// two tasks doing so could wait for each other (the core never does).
    fn lock_cpu(&self, cpu: usize) -> Self::Guard<'_>;

    /// True when the caller may not sleep: it holds a [`CpuGuard`] or a platform lock that
    /// forbids sleeping (`in_atomic()`).
    fn in_atomic(&self) -> bool;

    /// Sleeps while `word == expected`, for at most `timeout_ns` nanoseconds. May return early
    /// (spuriously); callers re-check their condition.
    fn wait(&self, word: &AtomicU32, expected: u32, timeout_ns: u64);

    /// Wakes every task sleeping in [`Platform::wait`] on `word`.
    fn wake_all(&self, word: &AtomicU32);

    /// Busy-wait hint for spin loops (a pause instruction, or a yield on a hosted platform).
    fn relax(&self) {
        core::hint::spin_loop();
    }

    /// The virtual address at which physical address 0 is mapped (`PAGE_OFFSET`): low memory
    /// `phys` is at `direct_map_base() + phys`. It must be aligned to at least 4 MiB (the
    /// largest buddy block), so that naturally aligned physical blocks, and the kmalloc
    /// objects inside them, are naturally aligned virtually too.
    fn direct_map_base(&self) -> usize;

    /// The virtual window for `kmap` of HighMem pages: its first address and its size in
    /// pages (`PKMAP_BASE`, `LAST_PKMAP`). A machine without HighMem may return zero pages.
    fn kmap_window(&self) -> (VirtAddr, usize);

    /// The virtual range for vmalloc and vmap (`VMALLOC_START`, `VMALLOC_END`): its first
    /// address and its size in bytes. Unmapped until the core maps pages into it. A platform
    /// without one returns a size of 0.
    fn vmalloc_range(&self) -> (VirtAddr, usize) {
        (VirtAddr(0), 0)
    }

    /// Maps the frame `pfn` at `va` (page aligned, inside a window this platform handed out),
    /// replacing any previous mapping there.
    ///
    /// # Safety
    ///
    /// `va` must lie in a window the platform gave the core (`kmap_window`, the vmalloc range)
    /// and nothing may be relying on what was mapped there before.
    unsafe fn map_page(&self, va: VirtAddr, pfn: Pfn, prot: PageProt) -> Result<(), MapError>;

    /// Removes the mappings of `npages` pages at `va`; a later touch faults.
    ///
    /// # Safety
    ///
    /// As [`Platform::map_page`]: the range is the core's, and no one uses it any more.
    unsafe fn unmap_pages(&self, va: VirtAddr, npages: usize);

    /// Makes earlier unmaps of `va..va + npages * PAGE_SIZE` visible to every CPU
    /// (`flush_tlb_kernel_range`). The default does nothing (a platform whose unmap is already
    /// global).
    fn flush_tlb_range(&self, va: VirtAddr, npages: usize) {
        let _ = (va, npages);
    }

    /// Waits for an RCU grace period (`synchronize_rcu`): every reader section that began
    /// before the call has ended. Used before freeing `SLAB_TYPESAFE_BY_RCU` slabs. The default
    /// suits a platform without RCU readers (nothing to wait for).
    fn synchronize_rcu(&self) {}

    /// A random number (freelist randomization, hardening). Need not be cryptographic.
    fn random_u64(&self) -> u64;

    /// A monotonic clock in nanoseconds.
    fn now_ns(&self) -> u64;

    /// Writes one line of a report (no trailing newline) to the log (`printk`).
    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>);

    /// The running task, for reports.
    fn current_task(&self) -> TaskInfo;
}
