//! Side-by-side benchmarks of kmem against peer allocators, in the same process and run.
//!
//! Page-allocator cases:
//!
//! * [`Case::Order0Pair`]: one order-0 allocation and its free (`alloc_pages(GFP_KERNEL, 0)`
//!   then `__free_pages(p, 0)` for kmem; `alloc(1)`/`dealloc(f, 1)` for
//!   `buddy_system_allocator`'s `FrameAllocator`; a 4 KiB, 4 KiB-aligned `alloc`/`dealloc`
//!   through `GlobalAlloc` for jemalloc, mimalloc and the system allocator).
//! * [`Case::Churn`]: a working set of live blocks of orders `0..=3` (mostly 0); each step
//!   frees a random live block and allocates one of a random order in its place. The
//!   operation sequence comes from a fixed-seed xorshift and is the same for every allocator.
//!   `malloc`-style peers allocate `4096 << order` bytes, 4096-aligned.
//!
//! Slab and kmalloc cases (kmem against jemalloc, mimalloc and the system allocator through
//! `GlobalAlloc` with `Layout::from_size_align(size, 8)`; see [`objsource`]):
//!
//! * [`Case::KmallocPair16`], [`Case::KmallocPair64`], [`Case::KmallocPair256`],
//!   [`Case::KmallocPair1024`]: one `kmalloc(size, GFP_KERNEL)` and its `kfree` per operation.
//! * [`Case::KmallocChurn`]: a working set of [`Options::kmalloc_working_set`] live objects of
//!   sizes uniform in `8..=8192`; each step frees a random live object and allocates one of a
//!   random size in its place (fixed-seed xorshift, the same sequence for every allocator).
//! * [`Case::CachePair256`]: one `kmem_cache_alloc`/`kmem_cache_free` of a dedicated
//!   (`SLAB_NO_MERGE`) 256-byte cache per operation; peers: the `slabmalloc` crate's
//!   `SCAllocator<ObjectPage>` of 256-byte objects (fed 4 KiB pages from the system
//!   allocator), and 256-byte `GlobalAlloc` pairs.
//! * [`Case::CrossFree`]: two threads freeing each other's 64-byte objects: each allocates a
//!   batch, hands it to the other through a lock-free ring ([`crossfree`]) and frees the
//!   batch it receives. One operation is one object allocated on one thread and freed on the
//!   other; ns/op is wall time over the objects of both threads.
//!
//! vmalloc cases (see [`vmwork`]):
//!
//! * [`Case::Vmalloc64k`], [`Case::Vmalloc1m`]: one `vmalloc(size)` and its `vfree` per
//!   operation, 64 KiB and 1 MiB, nothing touched inside the area ([`Allocator::Kmem`]);
//!   peer: `mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS)` and its
//!   `munmap` ([`Allocator::Mmap`]). `vmalloc` takes and maps its pages when called, `mmap`
//!   only when a page is first touched, so both also run writing one byte to every page
//!   between the allocation and the free ([`Allocator::KmemTouch`], [`Allocator::MmapTouch`]):
//!   the table's ratios are against the untouched kmem pair, and a "like for like" line
//!   gives `mmap / kmem` and `mmap+touch / kmem+touch`. Every allocator runs the same number
//!   of pairs per sample ([`Options::vmalloc_sample_bytes`] over the size). There is no
//!   target.
//!
//! Per-CPU case (see [`percpuwork`]):
//!
//! * [`Case::ThisCpuInc`]: two threads increment a counter at the same time: kmem's
//!   `this_cpu_inc` on an `alloc_percpu::<u64>()` ([`Allocator::Kmem`]; each thread on its own
//!   vCPU adds to its own copy), against one shared `AtomicU64::fetch_add`
//!   ([`Allocator::SharedAtomic`], the target's peer) and a `thread_local!` cell
//!   ([`Allocator::ThreadLocal`], a floor: no CPU section at all). One operation is one
//!   increment on each thread; every sample checks the total.
//!
//! The harness ([`harness`]) warms every allocator up, then runs `rounds` rounds; in each
//! round every allocator runs one timed sample, one after the other (kmem, then each peer), so
//! drift on a shared machine affects all alike. The result per allocator is the median of its
//! per-round ns/op; ratios are `peer / kmem` (above 1: kmem is faster). Each case runs the
//! allocators of [`Case::allocators`] that [`Options::allocators`] selects.
//!
//! [`run`] returns a [`Report`], printable as a table (`Display`) or as CSV
//! ([`Report::to_csv`]). The `kmem-bench` binary runs it with defaults; `kmem-pair` does a
//! fixed number of pairs (order-0, kmalloc or cache) for instruction counting under
//! callgrind (`callgrind-pairs.sh`).
//!
//! kmem runs on a [`Machine`] booted for each case (by default 256 MiB, 2 vCPUs); the
//! benchmarking thread takes a vCPU at its first allocation and keeps it, as a pinned kernel
//! thread would (the cross-free worker takes the other). `buddy_system_allocator` is seeded
//! with as many frames as kmem manages ([`Allocator::Buddy`]) and, as a second row, with the
//! largest power of two of frames not above that ([`Allocator::BuddyPow2`]): its pair cost
//! depends on that seeding (an odd count leaves a free order-0 block, and a pair is a set
//! remove and insert; a single block makes every pair split and merge all the way). The
//! targets use [`Allocator::Buddy`].
//!
//! After each case every object, block and area is freed, vmalloc's lazily freed ranges are
//! purged, the kmalloc and `vmap_area` caches are shrunk and the per-CPU page lists drained:
//! kmem's free page count must be back where it started, its free lists, slabs and vmap
//! trees consistent, and no bad free reported.

pub mod crossfree;
pub mod harness;
pub mod objsource;
pub mod objwork;
pub mod percpuwork;
pub mod report;
pub mod source;
pub mod vmwork;
pub mod workload;

use std::fmt;
use std::hint::black_box;
use std::time::Duration;

use kmem::kmalloc::{KmallocType, NR_KMALLOC_INDEX};
use kmem::slab::SlabFlags;
use kmem_hosted::{Machine, MachineConfig, MachineError};

use harness::{FixedSampler, Sampler, TimedSampler, churn_sampler, median, pair_sampler};
use objsource::{KmallocSource, KmemCacheSource, ObjSource, SlabmallocSource};
use objwork::{ObjChurn, obj_pair_loop};
pub use report::{CaseReport, Environment, Measurement, Report, Target};
use source::{BuddySource, KmemSource, PageSource};
use vmwork::{MmapSource, VmSource, VmallocSource, vm_pair_loop};
use workload::Churn;

/// A benchmark case.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Case {
    /// One order-0 alloc+free pair per operation.
    Order0Pair,
    /// One free of a random live block and one allocation of a random order per operation.
    Churn,
    /// One 16-byte kmalloc+kfree pair per operation.
    KmallocPair16,
    /// One 64-byte kmalloc+kfree pair per operation.
    KmallocPair64,
    /// One 256-byte kmalloc+kfree pair per operation.
    KmallocPair256,
    /// One 1024-byte kmalloc+kfree pair per operation.
    KmallocPair1024,
    /// One free of a random live object and one kmalloc of a random size (8..=8192) per
    /// operation, over a working set of live objects.
    KmallocChurn,
    /// One kmem_cache_alloc+kmem_cache_free pair of a 256-byte cache per operation.
    CachePair256,
    /// One 64-byte object allocated on one thread and freed on the other per operation.
    CrossFree,
    /// One 64 KiB vmalloc+vfree pair per operation (peers: mmap+munmap).
    Vmalloc64k,
    /// One 1 MiB vmalloc+vfree pair per operation (peers: mmap+munmap).
    Vmalloc1m,
    /// One `this_cpu_inc` on each of two threads at once per operation (peers: a shared
    /// `AtomicU64::fetch_add`, a thread-local cell).
    ThisCpuInc,
}

/// Object size of [`Case::CachePair256`].
pub const CACHE_OBJECT_SIZE: usize = 256;
/// Object size of [`Case::CrossFree`].
pub const CROSS_FREE_SIZE: usize = 64;

const PAGE_PEERS: &[Allocator] = &[
    Allocator::Kmem,
    Allocator::Buddy,
    Allocator::BuddyPow2,
    Allocator::Jemalloc,
    Allocator::Mimalloc,
    Allocator::System,
];
const MALLOC_PEERS: &[Allocator] = &[
    Allocator::Kmem,
    Allocator::Jemalloc,
    Allocator::Mimalloc,
    Allocator::System,
];
const CACHE_PEERS: &[Allocator] = &[
    Allocator::Kmem,
    Allocator::Slabmalloc,
    Allocator::Jemalloc,
    Allocator::Mimalloc,
    Allocator::System,
];
const PERCPU_PEERS: &[Allocator] = &[
    Allocator::Kmem,
    Allocator::SharedAtomic,
    Allocator::ThreadLocal,
];
const VMALLOC_PEERS: &[Allocator] = &[
    Allocator::Kmem,
    Allocator::KmemTouch,
    Allocator::Mmap,
    Allocator::MmapTouch,
];

impl Case {
    /// Every case, in report order.
    pub const ALL: [Case; 12] = [
        Case::Order0Pair,
        Case::Churn,
        Case::KmallocPair16,
        Case::KmallocPair64,
        Case::KmallocPair256,
        Case::KmallocPair1024,
        Case::KmallocChurn,
        Case::CachePair256,
        Case::CrossFree,
        Case::Vmalloc64k,
        Case::Vmalloc1m,
        Case::ThisCpuInc,
    ];

    /// The page-allocator cases.
    pub const PAGE: [Case; 2] = [Case::Order0Pair, Case::Churn];

    /// The slab and kmalloc cases.
    pub const SLAB: [Case; 7] = [
        Case::KmallocPair16,
        Case::KmallocPair64,
        Case::KmallocPair256,
        Case::KmallocPair1024,
        Case::KmallocChurn,
        Case::CachePair256,
        Case::CrossFree,
    ];

    /// The vmalloc cases.
    pub const VMALLOC: [Case; 2] = [Case::Vmalloc64k, Case::Vmalloc1m];

    /// The per-CPU cases.
    pub const PERCPU: [Case; 1] = [Case::ThisCpuInc];

    /// Short name, as in the table, the CSV and `--case`.
    pub fn name(self) -> &'static str {
        match self {
            Case::Order0Pair => "order0-pair",
            Case::Churn => "churn",
            Case::KmallocPair16 => "kmalloc-pair-16",
            Case::KmallocPair64 => "kmalloc-pair-64",
            Case::KmallocPair256 => "kmalloc-pair-256",
            Case::KmallocPair1024 => "kmalloc-pair-1024",
            Case::KmallocChurn => "kmalloc-churn",
            Case::CachePair256 => "cache-pair-256",
            Case::CrossFree => "cross-free",
            Case::Vmalloc64k => "vmalloc-64k",
            Case::Vmalloc1m => "vmalloc-1m",
            Case::ThisCpuInc => "this-cpu-inc",
        }
    }

    /// The case named `name` (see [`Case::name`]).
    pub fn from_name(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The cases `name` stands for: one case by name, or a group: `page` ([`Case::PAGE`]),
    /// `slab` ([`Case::SLAB`]), `vmalloc` ([`Case::VMALLOC`]), `percpu` ([`Case::PERCPU`])
    /// or `all`.
    pub fn group(name: &str) -> Option<Vec<Case>> {
        match name {
            "all" => Some(Case::ALL.to_vec()),
            "page" => Some(Case::PAGE.to_vec()),
            "slab" => Some(Case::SLAB.to_vec()),
            "vmalloc" => Some(Case::VMALLOC.to_vec()),
            "percpu" => Some(Case::PERCPU.to_vec()),
            _ => Case::from_name(name).map(|c| vec![c]),
        }
    }

    /// The size of a kmalloc pair case.
    pub fn kmalloc_pair_size(self) -> Option<usize> {
        match self {
            Case::KmallocPair16 => Some(16),
            Case::KmallocPair64 => Some(64),
            Case::KmallocPair256 => Some(256),
            Case::KmallocPair1024 => Some(1024),
            _ => None,
        }
    }

    /// The area size of a vmalloc case.
    pub fn vmalloc_size(self) -> Option<usize> {
        match self {
            Case::Vmalloc64k => Some(64 << 10),
            Case::Vmalloc1m => Some(1 << 20),
            _ => None,
        }
    }

    /// True for the page-allocator cases.
    pub fn is_page(self) -> bool {
        matches!(self, Case::Order0Pair | Case::Churn)
    }

    /// True for the slab and kmalloc cases.
    pub fn is_slab(self) -> bool {
        !self.is_page() && !self.is_vmalloc() && !self.is_percpu()
    }

    /// True for the per-CPU cases.
    pub fn is_percpu(self) -> bool {
        self == Case::ThisCpuInc
    }

    /// True for the vmalloc cases.
    pub fn is_vmalloc(self) -> bool {
        self.vmalloc_size().is_some()
    }

    /// The allocators this case can run, kmem first.
    pub fn allocators(self) -> &'static [Allocator] {
        match self {
            Case::Order0Pair | Case::Churn => PAGE_PEERS,
            Case::CachePair256 => CACHE_PEERS,
            Case::Vmalloc64k | Case::Vmalloc1m => VMALLOC_PEERS,
            Case::ThisCpuInc => PERCPU_PEERS,
            _ => MALLOC_PEERS,
        }
    }

    /// Whether this case can run `a`.
    pub fn runs(self, a: Allocator) -> bool {
        self.allocators().contains(&a)
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An allocator under test.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Allocator {
    /// kmem on a hosted machine (its page allocator, kmalloc, a slab cache or vmalloc, per
    /// case).
    Kmem,
    /// kmem's vmalloc+vfree writing one byte to every page in between (vmalloc cases only).
    KmemTouch,
    /// `buddy_system_allocator::FrameAllocator` (default `ORDER`), seeded with frames `0..n`
    /// where `n` is the number of frames kmem manages.
    Buddy,
    /// The same, seeded with the largest power of two of frames not above `n`: one free
    /// block, so every order-0 pair of the pair case splits and merges all the way.
    BuddyPow2,
    /// The `slabmalloc` crate's `SCAllocator<ObjectPage>` (cache case only).
    Slabmalloc,
    /// jemalloc through `tikv-jemallocator`.
    Jemalloc,
    /// mimalloc through the `mimalloc` crate.
    Mimalloc,
    /// The system allocator (`std::alloc::System`: glibc on Linux).
    System,
    /// The host's `mmap(MAP_PRIVATE | MAP_ANONYMOUS)`+`munmap` (vmalloc cases only).
    Mmap,
    /// The same, writing one byte to every page in between (vmalloc cases only).
    MmapTouch,
    /// One `AtomicU64` shared by the threads, `fetch_add(1, Relaxed)` (per-CPU case only).
    SharedAtomic,
    /// A `thread_local!` `Cell<u64>` per thread (per-CPU case only).
    ThreadLocal,
}

impl Allocator {
    /// Every allocator, kmem first, in report order.
    pub const ALL: [Allocator; 12] = [
        Allocator::Kmem,
        Allocator::KmemTouch,
        Allocator::Buddy,
        Allocator::BuddyPow2,
        Allocator::Slabmalloc,
        Allocator::Jemalloc,
        Allocator::Mimalloc,
        Allocator::System,
        Allocator::Mmap,
        Allocator::MmapTouch,
        Allocator::SharedAtomic,
        Allocator::ThreadLocal,
    ];

    /// Short name, as in the table and the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Allocator::Kmem => "kmem",
            Allocator::KmemTouch => "kmem+touch",
            Allocator::Buddy => "buddy_system_allocator",
            Allocator::BuddyPow2 => "buddy-pow2",
            Allocator::Slabmalloc => "slabmalloc",
            Allocator::Jemalloc => "jemalloc",
            Allocator::Mimalloc => "mimalloc",
            Allocator::System => "system",
            Allocator::Mmap => "mmap",
            Allocator::MmapTouch => "mmap+touch",
            Allocator::SharedAtomic => "atomic-fetch-add",
            Allocator::ThreadLocal => "thread-local",
        }
    }

    /// The allocator named `name` (see [`Allocator::name`]; "buddy" also works).
    pub fn from_name(name: &str) -> Option<Allocator> {
        if name == "buddy" {
            return Some(Allocator::Buddy);
        }
        Allocator::ALL.into_iter().find(|a| a.name() == name)
    }
}

impl fmt::Display for Allocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to run, and how long.
#[derive(Clone, Debug)]
pub struct Options {
    /// Timed rounds per case; each allocator's result is the median over them.
    pub rounds: usize,
    /// Pair cases: warm-up time per allocator (also used to calibrate the sample size).
    pub warmup_time: Duration,
    /// Pair cases: target duration of one timed sample.
    pub sample_time: Duration,
    /// Page churn: blocks in the working set.
    pub working_set: usize,
    /// Both churns: untimed steps after filling the working set.
    pub churn_warmup_steps: u64,
    /// Both churns: steps per timed sample (the same for every allocator).
    pub churn_steps: u64,
    /// kmalloc churn: objects in the working set.
    pub kmalloc_working_set: usize,
    /// Cross-free: objects per batch handed from one thread to the other.
    pub cross_batch: usize,
    /// Cross-free: batches each ring holds (how far a thread may run ahead).
    pub cross_ring: usize,
    /// Cross-free: untimed batches per thread.
    pub cross_warmup_batches: u64,
    /// Cross-free: batches per thread per timed sample (the same for every allocator).
    pub cross_batches: u64,
    /// vmalloc cases: bytes allocated (and freed) per allocator during warm-up; pairs =
    /// this / the case's size (at least 1).
    pub vmalloc_warmup_bytes: usize,
    /// vmalloc cases: bytes allocated (and freed) per timed sample; pairs = this / the
    /// case's size (at least 1), the same for every allocator.
    pub vmalloc_sample_bytes: usize,
    /// Per-CPU case: increments per thread during warm-up.
    pub percpu_warmup_incs: u64,
    /// Per-CPU case: increments per thread per timed sample (the same for every counter).
    pub percpu_incs: u64,
    /// Seed of the churns' operation sequences.
    pub seed: u64,
    /// RAM of kmem's machine, in bytes.
    pub machine_ram: u64,
    /// vCPUs of kmem's machine.
    pub machine_cpus: usize,
    /// Frames given to `buddy_system_allocator` (`0..n`); `None`: as many as kmem manages.
    /// Its pair cost depends on this: with a free order-0 block (an odd count) a pair is a
    /// remove and an insert; with a power of two, every pair splits and merges all the way.
    pub buddy_frames: Option<usize>,
    /// Cases to run, in order.
    pub cases: Vec<Case>,
    /// Allocators to run, in the order they run within a round (ratios need
    /// [`Allocator::Kmem`]); each case runs those it supports ([`Case::allocators`]).
    pub allocators: Vec<Allocator>,
}

impl Default for Options {
    /// The full run: 7 rounds of 20 ms pair samples, 200 000 churn steps, 2 000 cross-free
    /// batches of 64 objects per thread and 128 MiB of vmalloc pairs (2 048 of 64 KiB, 128 of
    /// 1 MiB) per sample.
    fn default() -> Options {
        Options {
            rounds: 7,
            warmup_time: Duration::from_millis(50),
            sample_time: Duration::from_millis(20),
            working_set: 1000,
            churn_warmup_steps: 100_000,
            churn_steps: 200_000,
            kmalloc_working_set: 10_000,
            cross_batch: 64,
            cross_ring: 4,
            cross_warmup_batches: 1000,
            cross_batches: 2000,
            vmalloc_warmup_bytes: 64 << 20,
            vmalloc_sample_bytes: 128 << 20,
            percpu_warmup_incs: 1_000_000,
            percpu_incs: 4_000_000,
            seed: 0x6b6d_656d_6265_6e63,
            machine_ram: 256 << 20,
            machine_cpus: 2,
            buddy_frames: None,
            cases: Case::ALL.to_vec(),
            allocators: Allocator::ALL.to_vec(),
        }
    }
}

impl Options {
    /// A short run for CI smoke tests: 3 rounds, a tenth to a twentieth of the work (a
    /// thirty-second for vmalloc: 64 pairs of 64 KiB, 4 of 1 MiB per sample) (every case,
    /// well under 2 s in a release build).
    pub fn quick() -> Options {
        Options {
            rounds: 3,
            warmup_time: Duration::from_millis(3),
            sample_time: Duration::from_millis(2),
            churn_warmup_steps: 5_000,
            churn_steps: 10_000,
            cross_warmup_batches: 20,
            cross_batches: 50,
            vmalloc_warmup_bytes: 1 << 20,
            vmalloc_sample_bytes: 4 << 20,
            percpu_warmup_incs: 20_000,
            percpu_incs: 100_000,
            ..Options::default()
        }
    }
}

/// Progress events, passed to the callback of [`run_with_progress`].
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// A case starts (its machine has booted).
    CaseStarted {
        /// The case.
        case: Case,
    },
    /// An allocator is warmed up.
    WarmedUp {
        /// The case.
        case: Case,
        /// The allocator.
        allocator: Allocator,
        /// Operations it will run per timed sample.
        ops_per_round: u64,
    },
    /// A timed sample ended.
    Sample {
        /// The case.
        case: Case,
        /// The allocator.
        allocator: Allocator,
        /// Round number, from 0.
        round: usize,
        /// Rounds in all.
        rounds: usize,
        /// The sample's result.
        ns_per_op: f64,
    },
}

/// Why a benchmark run failed.
#[derive(Debug)]
pub enum BenchError {
    /// kmem's machine did not boot.
    Boot(MachineError),
    /// kmem's state was inconsistent after a case (free lists, counters or bad-page reports).
    Kmem(String),
    /// The options make no sense (no round, an empty working set, ...).
    Options(&'static str),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Boot(e) => write!(f, "booting kmem's machine: {e}"),
            BenchError::Kmem(e) => write!(f, "kmem after the benchmark: {e}"),
            BenchError::Options(e) => write!(f, "bad options: {e}"),
        }
    }
}

impl std::error::Error for BenchError {}

/// Runs every selected case against every selected allocator; see the crate docs.
pub fn run(opts: &Options) -> Result<Report, BenchError> {
    run_with_progress(opts, |_| {})
}

fn check_options(opts: &Options) -> Result<(), BenchError> {
    if opts.rounds == 0 {
        return Err(BenchError::Options("rounds must be at least 1"));
    }
    if opts.working_set == 0 || opts.working_set > u32::MAX as usize {
        return Err(BenchError::Options("working set out of range"));
    }
    if opts.kmalloc_working_set == 0 || opts.kmalloc_working_set > u32::MAX as usize {
        return Err(BenchError::Options("kmalloc working set out of range"));
    }
    if opts.cross_batch == 0 || opts.cross_batch > 1 << 16 {
        return Err(BenchError::Options(
            "cross-free batch out of range (1..=65536)",
        ));
    }
    if opts.cross_ring == 0 || opts.cross_ring > 1 << 10 {
        return Err(BenchError::Options(
            "cross-free ring out of range (1..=1024)",
        ));
    }
    Ok(())
}

/// As [`run`], calling `progress` after each step (for a progress display).
pub fn run_with_progress(
    opts: &Options,
    mut progress: impl FnMut(&Progress),
) -> Result<Report, BenchError> {
    check_options(opts)?;
    let config = MachineConfig::x86_64(opts.machine_ram).with_cpus(opts.machine_cpus);
    let mut env = None;
    let mut cases = Vec::new();
    for &case in &opts.cases {
        let machine = Machine::boot(config.clone()).map_err(BenchError::Boot)?;
        let kmem_frames = machine.totalram_pages();
        let frames = opts.buddy_frames.unwrap_or(kmem_frames);
        settle(&machine);
        let free_at_boot = machine.nr_free_pages();
        env.get_or_insert_with(|| Environment::new(opts, kmem_frames));
        progress(&Progress::CaseStarted { case });
        cases.push(run_case(case, opts, &machine, frames, &mut progress)?);
        check_machine(&machine, free_at_boot)?;
    }
    let env = match env {
        Some(e) => e,
        None => {
            let machine = Machine::boot(config).map_err(BenchError::Boot)?;
            Environment::new(opts, machine.totalram_pages())
        }
    };
    Ok(Report::new(opts.clone(), env, cases))
}

/// Boxes the page-case sampler of `case` over `src`.
fn page_sampler<'a, S: PageSource + 'a>(
    case: Case,
    src: S,
    opts: &Options,
) -> Box<dyn Sampler + 'a> {
    match case {
        Case::Churn => Box::new(churn_sampler(
            Churn::new(src, opts.working_set, opts.seed),
            opts.churn_warmup_steps,
            opts.churn_steps,
        )),
        _ => Box::new(pair_sampler(src, opts.warmup_time, opts.sample_time)),
    }
}

/// Boxes the single-thread object-case sampler of `case` over `src`.
fn obj_sampler<'a, S: ObjSource + 'a>(
    case: Case,
    mut src: S,
    opts: &Options,
) -> Box<dyn Sampler + 'a> {
    match case {
        Case::KmallocChurn => {
            let mut churn = ObjChurn::new(src, opts.kmalloc_working_set, opts.seed);
            Box::new(FixedSampler::new(
                move |n| churn.run(n),
                opts.churn_warmup_steps,
                opts.churn_steps,
                1,
            ))
        }
        _ => {
            let size = case.kmalloc_pair_size().unwrap_or(CACHE_OBJECT_SIZE);
            Box::new(TimedSampler::new(
                move |n| obj_pair_loop(&mut src, black_box(size), n),
                opts.warmup_time,
                opts.sample_time,
            ))
        }
    }
}

/// Boxes the vmalloc-case sampler of `case` over `src` (with `TOUCH`: one byte written per
/// page): a fixed number of pairs per sample, the same for every allocator.
fn vm_sampler<'a, S: VmSource + 'a, const TOUCH: bool>(
    case: Case,
    mut src: S,
    opts: &Options,
) -> Box<dyn Sampler + 'a> {
    let size = case.vmalloc_size().expect("a vmalloc case");
    let pairs = |bytes: usize| (bytes / size).max(1) as u64;
    Box::new(FixedSampler::new(
        move |n| vm_pair_loop::<S, TOUCH>(&mut src, black_box(size), n),
        pairs(opts.vmalloc_warmup_bytes),
        pairs(opts.vmalloc_sample_bytes),
        1,
    ))
}

/// Boxes the cross-free sampler over `a` (this thread) and `b` (a worker in `scope`).
fn cross_sampler<'scope, 'env, S: ObjSource + Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    a: S,
    b: S,
    opts: &Options,
) -> Box<dyn Sampler + 'scope> {
    let params = crossfree::CrossFreeParams {
        size: CROSS_FREE_SIZE,
        batch: opts.cross_batch,
        ring: opts.cross_ring,
        warmup_batches: opts.cross_warmup_batches,
        batches: opts.cross_batches,
    };
    Box::new(crossfree::cross_free_sampler(scope, a, b, params))
}

fn run_case(
    case: Case,
    opts: &Options,
    machine: &Machine,
    frames: usize,
    progress: &mut impl FnMut(&Progress),
) -> Result<CaseReport, BenchError> {
    let allocators: Vec<Allocator> = opts
        .allocators
        .iter()
        .copied()
        .filter(|&a| case.runs(a))
        .collect();
    let kmem = machine.kmem();
    let report = match case {
        Case::Order0Pair | Case::Churn => {
            let samplers = allocators
                .iter()
                .map(|&a| {
                    let s = match a {
                        Allocator::Kmem => {
                            page_sampler(case, KmemSource::new(machine.pages()), opts)
                        }
                        Allocator::Buddy => page_sampler(case, BuddySource::new(frames), opts),
                        Allocator::BuddyPow2 => {
                            page_sampler(case, BuddySource::new(pow2_floor(frames)), opts)
                        }
                        Allocator::Jemalloc => page_sampler(case, source::jemalloc(), opts),
                        Allocator::Mimalloc => page_sampler(case, source::mimalloc(), opts),
                        Allocator::System => page_sampler(case, source::system(), opts),
                        _ => unreachable!("{a} does not run {case}"),
                    };
                    (a, s)
                })
                .collect();
            measure(case, samplers, opts, progress)
        }
        Case::Vmalloc64k | Case::Vmalloc1m => {
            let samplers = allocators
                .iter()
                .map(|&a| {
                    let s = match a {
                        Allocator::Kmem => {
                            vm_sampler::<_, false>(case, VmallocSource::new(kmem), opts)
                        }
                        Allocator::KmemTouch => {
                            vm_sampler::<_, true>(case, VmallocSource::new(kmem), opts)
                        }
                        Allocator::Mmap => vm_sampler::<_, false>(case, MmapSource, opts),
                        Allocator::MmapTouch => vm_sampler::<_, true>(case, MmapSource, opts),
                        _ => unreachable!("{a} does not run {case}"),
                    };
                    (a, s)
                })
                .collect();
            // Every area is freed when the samplers are dropped; `check_machine` then purges
            // the lazily freed ranges.
            measure(case, samplers, opts, progress)
        }
        Case::ThisCpuInc => {
            let kmem_counter = percpuwork::KmemCounter::new(machine);
            let atomic = percpuwork::SharedAtomic::default();
            let local = percpuwork::ThreadLocal::default();
            let (warm, incs) = (opts.percpu_warmup_incs, opts.percpu_incs);
            let samplers = allocators
                .iter()
                .map(|&a| {
                    let s: Box<dyn Sampler + '_> = match a {
                        Allocator::Kmem => Box::new(FixedSampler::new(
                            |n| percpuwork::two_threads_plain(&kmem_counter, n),
                            warm,
                            incs,
                            1,
                        )),
                        Allocator::SharedAtomic => Box::new(FixedSampler::new(
                            |n| percpuwork::two_threads_plain(&atomic, n),
                            warm,
                            incs,
                            1,
                        )),
                        Allocator::ThreadLocal => Box::new(FixedSampler::new(
                            |n| percpuwork::two_threads_local(&local, n),
                            warm,
                            incs,
                            1,
                        )),
                        _ => unreachable!("{a} does not run {case}"),
                    };
                    (a, s)
                })
                .collect();
            measure(case, samplers, opts, progress)
        }
        Case::CrossFree => std::thread::scope(|scope| {
            let samplers = allocators
                .iter()
                .map(|&a| {
                    let s = match a {
                        Allocator::Kmem => cross_sampler(
                            scope,
                            KmallocSource::new(kmem),
                            KmallocSource::new(kmem),
                            opts,
                        ),
                        Allocator::Jemalloc => {
                            cross_sampler(scope, source::jemalloc(), source::jemalloc(), opts)
                        }
                        Allocator::Mimalloc => {
                            cross_sampler(scope, source::mimalloc(), source::mimalloc(), opts)
                        }
                        Allocator::System => {
                            cross_sampler(scope, source::system(), source::system(), opts)
                        }
                        _ => unreachable!("{a} does not run {case}"),
                    };
                    (a, s)
                })
                .collect();
            // The samplers (and so the workers' command channels) are dropped inside
            // `measure`: the workers end before the scope joins them.
            measure(case, samplers, opts, progress)
        }),
        _ => {
            let cache = if case == Case::CachePair256 {
                let c = kmem.kmem_cache_create(
                    "bench-256",
                    CACHE_OBJECT_SIZE,
                    8,
                    SlabFlags::NO_MERGE,
                    None,
                );
                Some(c.ok_or(BenchError::Kmem(
                    "kmem_cache_create(bench-256) failed".into(),
                ))?)
            } else {
                None
            };
            let samplers = allocators
                .iter()
                .map(|&a| {
                    let s = match a {
                        Allocator::Kmem => match cache {
                            Some(c) => obj_sampler(case, KmemCacheSource::new(kmem, c), opts),
                            None => obj_sampler(case, KmallocSource::new(kmem), opts),
                        },
                        Allocator::Slabmalloc => {
                            obj_sampler(case, SlabmallocSource::new(CACHE_OBJECT_SIZE), opts)
                        }
                        Allocator::Jemalloc => obj_sampler(case, source::jemalloc(), opts),
                        Allocator::Mimalloc => obj_sampler(case, source::mimalloc(), opts),
                        Allocator::System => obj_sampler(case, source::system(), opts),
                        _ => unreachable!("{a} does not run {case}"),
                    };
                    (a, s)
                })
                .collect();
            let report = measure(case, samplers, opts, progress);
            if let Some(c) = cache {
                // SAFETY: every object was freed when the samplers were dropped, and nothing
                // uses the cache after this.
                if !unsafe { kmem.kmem_cache_destroy(c) } {
                    return Err(BenchError::Kmem(
                        "kmem_cache_destroy(bench-256): objects remain".into(),
                    ));
                }
            }
            report
        }
    };
    Ok(report)
}

/// Warms every sampler up, runs the rounds and drops the samplers (freeing what they hold).
fn measure(
    case: Case,
    mut samplers: Vec<(Allocator, Box<dyn Sampler + '_>)>,
    opts: &Options,
    progress: &mut impl FnMut(&Progress),
) -> CaseReport {
    let mut ops = Vec::new();
    for (allocator, s) in &mut samplers {
        let ops_per_round = s.warm_up();
        ops.push(ops_per_round);
        progress(&Progress::WarmedUp {
            case,
            allocator: *allocator,
            ops_per_round,
        });
    }
    let mut samples = vec![Vec::with_capacity(opts.rounds); samplers.len()];
    for round in 0..opts.rounds {
        for (i, (allocator, s)) in samplers.iter_mut().enumerate() {
            let ns_per_op = s.sample();
            samples[i].push(ns_per_op);
            progress(&Progress::Sample {
                case,
                allocator: *allocator,
                round,
                rounds: opts.rounds,
                ns_per_op,
            });
        }
    }
    let results = samplers
        .into_iter()
        .zip(samples)
        .zip(ops)
        .map(
            |(((allocator, _), samples_ns), ops_per_round)| Measurement {
                allocator,
                median_ns: median(&samples_ns),
                min_ns: samples_ns.iter().copied().fold(f64::INFINITY, f64::min),
                max_ns: samples_ns.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ops_per_round,
                samples_ns,
            },
        )
        .collect();
    CaseReport { case, results }
}

/// The largest power of two not above `n` (0 for 0).
pub fn pow2_floor(n: usize) -> usize {
    match n {
        0 => 0,
        n => 1 << n.ilog2(),
    }
}

/// Returns what kmem caches on the side: purges vmalloc's lazily freed ranges
/// (`vm_unmap_aliases`), shrinks every kmalloc cache and the `vmap_area` cache (which flushes
/// every CPU's sheaves and frees empty slabs), then drains the per-CPU page lists.
pub fn settle(machine: &Machine) {
    let vmalloc = machine.vmalloc_space();
    vmalloc.vm_unmap_aliases(machine.vm_ctx());
    machine.kmem_cache_shrink(vmalloc.area_cache());
    let caches = machine.kmalloc_caches();
    for t in [KmallocType::Normal, KmallocType::Reclaim, KmallocType::Dma] {
        for index in 1..NR_KMALLOC_INDEX {
            if let Some(c) = caches.cache(t, index) {
                machine.kmem_cache_shrink(c);
            }
        }
    }
    machine.drain_all_pages();
}

/// After a case (every block and object freed): kmem's lists, slabs and counters must be
/// intact.
fn check_machine(machine: &Machine, free_at_boot: usize) -> Result<(), BenchError> {
    settle(machine);
    machine
        .validate()
        .map_err(|e| BenchError::Kmem(e.to_string()))?;
    let free = machine.nr_free_pages();
    if free != free_at_boot {
        return Err(BenchError::Kmem(format!(
            "{free} pages free after every block was freed, {free_at_boot} at boot"
        )));
    }
    match machine.bad_page_reports() {
        0 => Ok(()),
        n => Err(BenchError::Kmem(format!(
            "{n} bad-page or bad-free reports"
        ))),
    }
}

#[cfg(test)]
mod tests;
