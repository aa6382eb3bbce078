//! The results of a run: per-case measurements, ratios against kmem, and the targets.

use std::fmt::{self, Write as _};

use crate::{Allocator, Case, Options};

/// Where the run happened.
#[derive(Clone, Debug)]
pub struct Environment {
    /// RAM of kmem's machine, in bytes.
    pub machine_ram: u64,
    /// vCPUs of kmem's machine.
    pub machine_cpus: usize,
    /// Frames kmem manages (`totalram_pages`).
    pub kmem_frames: usize,
    /// Frames `buddy_system_allocator` was seeded with (by default as many as kmem manages).
    pub buddy_frames: usize,
    /// CPUs the host offers this process.
    pub host_cpus: usize,
    /// Whether this is an optimised build (debug-build numbers mean little).
    pub optimized: bool,
}

impl Environment {
    pub(crate) fn new(opts: &Options, kmem_frames: usize) -> Environment {
        Environment {
            machine_ram: opts.machine_ram,
            machine_cpus: opts.machine_cpus,
            kmem_frames,
            buddy_frames: opts.buddy_frames.unwrap_or(kmem_frames),
            host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            optimized: !cfg!(debug_assertions),
        }
    }
}

/// One allocator's result in one case.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// The allocator.
    pub allocator: Allocator,
    /// Median over the rounds of ns per operation.
    pub median_ns: f64,
    /// Fastest round.
    pub min_ns: f64,
    /// Slowest round.
    pub max_ns: f64,
    /// Operations per timed sample.
    pub ops_per_round: u64,
    /// ns per operation of each round, in order.
    pub samples_ns: Vec<f64>,
}

impl Measurement {
    /// Millions of operations per second at the median.
    pub fn mops_per_s(&self) -> f64 {
        1e3 / self.median_ns
    }
}

/// One case's results, in the order the allocators ran.
#[derive(Clone, Debug)]
pub struct CaseReport {
    /// The case.
    pub case: Case,
    /// One measurement per allocator.
    pub results: Vec<Measurement>,
}

impl CaseReport {
    /// The measurement of `a`, if it ran.
    pub fn get(&self, a: Allocator) -> Option<&Measurement> {
        self.results.iter().find(|m| m.allocator == a)
    }

    /// `a`'s median over kmem's (above 1: kmem is faster), if both ran.
    pub fn ratio(&self, a: Allocator) -> Option<f64> {
        self.ratio_to(a, Allocator::Kmem)
    }

    /// `a`'s median over `base`'s, if both ran.
    pub fn ratio_to(&self, a: Allocator, base: Allocator) -> Option<f64> {
        let b = self.get(base)?.median_ns;
        Some(self.get(a)?.median_ns / b)
    }

    /// The like-for-like ratios of a vmalloc case, where both sides ran: `(peer, kmem side,
    /// peer / kmem side)` for `mmap / kmem` and `mmap+touch / kmem+touch`.
    pub fn like_for_like(&self) -> Vec<(Allocator, Allocator, f64)> {
        [
            (Allocator::Mmap, Allocator::Kmem),
            (Allocator::MmapTouch, Allocator::KmemTouch),
        ]
        .into_iter()
        .filter_map(|(p, k)| Some((p, k, self.ratio_to(p, k)?)))
        .collect()
    }
}

/// A performance target: in `case`, the best (fastest) of `peers` must take at least
/// `min_ratio` times kmem's median.
#[derive(Clone, Debug)]
pub struct Target {
    /// What the target says, for people.
    pub description: &'static str,
    /// The case.
    pub case: Case,
    /// The peers compared with; the fastest of those that ran counts.
    pub peers: &'static [Allocator],
    /// The least acceptable `peer / kmem` ratio.
    pub min_ratio: f64,
    /// The measured ratio against the fastest peer, if kmem and a peer ran.
    pub ratio: Option<f64>,
    /// The peer the ratio was measured against.
    pub best: Option<Allocator>,
}

/// The peers of the slab targets: "no slower than the best of mimalloc and jemalloc".
const BEST_MALLOC: &[Allocator] = &[Allocator::Mimalloc, Allocator::Jemalloc];

impl Target {
    fn new(description: &'static str, case: Case, peers: &'static [Allocator], min: f64) -> Self {
        Target {
            description,
            case,
            peers,
            min_ratio: min,
            ratio: None,
            best: None,
        }
    }

    /// The project's targets, unmeasured.
    pub fn all() -> Vec<Target> {
        let slab = "no slower than the best of mimalloc and jemalloc";
        vec![
            Target::new(
                "order-0 pair at least 20x faster than buddy_system_allocator",
                Case::Order0Pair,
                &[Allocator::Buddy],
                20.0,
            ),
            Target::new(
                "order-0 pair no slower than jemalloc's 4 KiB pair",
                Case::Order0Pair,
                &[Allocator::Jemalloc],
                1.0,
            ),
            Target::new(slab, Case::KmallocPair16, BEST_MALLOC, 1.0),
            Target::new(slab, Case::KmallocPair64, BEST_MALLOC, 1.0),
            Target::new(slab, Case::KmallocPair256, BEST_MALLOC, 1.0),
            Target::new(slab, Case::KmallocPair1024, BEST_MALLOC, 1.0),
            Target::new(slab, Case::KmallocChurn, BEST_MALLOC, 1.0),
            Target::new(slab, Case::CachePair256, BEST_MALLOC, 1.0),
            Target::new(slab, Case::CrossFree, BEST_MALLOC, 1.0),
            Target::new(
                "this_cpu_inc on two threads faster than a shared AtomicU64::fetch_add",
                Case::ThisCpuInc,
                &[Allocator::SharedAtomic],
                1.0,
            ),
        ]
    }

    /// Measures the target on `c` (a report of its case).
    fn measure(&mut self, c: &CaseReport) {
        let best = self
            .peers
            .iter()
            .filter_map(|&p| Some((p, c.ratio(p)?)))
            .min_by(|x, y| x.1.total_cmp(&y.1));
        self.best = best.map(|b| b.0);
        self.ratio = best.map(|b| b.1);
    }

    /// Whether the target is met; `None` when it was not measured.
    pub fn met(&self) -> Option<bool> {
        self.ratio.map(|r| r >= self.min_ratio)
    }
}

/// The instruction-count target of kmem's kmalloc fast path, checked under callgrind by
/// `callgrind-pairs.sh --kmalloc 64` (not by the timed run).
pub const KMALLOC_PAIR_MAX_INSTRUCTIONS: u64 = 40;

/// A run's results.
#[derive(Clone, Debug)]
pub struct Report {
    /// The options it ran with.
    pub options: Options,
    /// Where it ran.
    pub environment: Environment,
    /// One report per case, in the order run.
    pub cases: Vec<CaseReport>,
    /// The targets of the cases that ran, with their measured ratios.
    pub targets: Vec<Target>,
}

impl Report {
    pub(crate) fn new(
        options: Options,
        environment: Environment,
        cases: Vec<CaseReport>,
    ) -> Report {
        let targets = Target::all()
            .into_iter()
            .filter_map(|mut t| {
                t.measure(cases.iter().find(|c| c.case == t.case)?);
                Some(t)
            })
            .collect();
        Report {
            options,
            environment,
            cases,
            targets,
        }
    }

    /// The case report of `case`, if it ran.
    pub fn case(&self, case: Case) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.case == case)
    }

    /// True when every measured target is met.
    pub fn targets_met(&self) -> bool {
        self.targets.iter().all(|t| t.met() != Some(false))
    }

    /// The measurements as CSV, one row per case and allocator, with a header:
    /// `case,allocator,median_ns,min_ns,max_ns,ops_per_round,rounds,ratio_vs_kmem,mops_per_s`
    /// (`mops_per_s`: millions of operations per second at the median).
    pub fn to_csv(&self) -> String {
        let mut s = String::from(
            "case,allocator,median_ns,min_ns,max_ns,ops_per_round,rounds,ratio_vs_kmem,mops_per_s\n",
        );
        for c in &self.cases {
            for m in &c.results {
                let ratio = c
                    .ratio(m.allocator)
                    .map_or(String::new(), |r| format!("{r:.4}"));
                let _ = writeln!(
                    s,
                    "{},{},{:.3},{:.3},{:.3},{},{},{},{:.3}",
                    c.case,
                    m.allocator,
                    m.median_ns,
                    m.min_ns,
                    m.max_ns,
                    m.ops_per_round,
                    m.samples_ns.len(),
                    ratio,
                    m.mops_per_s()
                );
            }
        }
        s
    }
}

/// A ratio for the table: two decimals, or two significant digits below 0.1 (so that a
/// ratio of a few thousandths does not print as 0.00x).
fn fmt_ratio(r: f64) -> String {
    if !(r > 0.0 && r < 0.0995) {
        return format!("{r:.2}x");
    }
    let decimals = (1 - r.log10().floor() as i32).clamp(2, 9) as usize;
    format!("{r:.decimals$}x")
}

fn case_title(case: Case, opts: &Options) -> String {
    match case {
        Case::Order0Pair => "order-0 alloc+free pair (malloc peers: 4 KiB, 4 KiB-aligned)".into(),
        Case::Churn => format!(
            "random churn, {} live blocks, orders 0..=3 (11/16 order 0), one free + one alloc per op",
            opts.working_set
        ),
        Case::KmallocPair16
        | Case::KmallocPair64
        | Case::KmallocPair256
        | Case::KmallocPair1024 => format!(
            "kmalloc({0}, GFP_KERNEL)+kfree pair (peers: GlobalAlloc {0} bytes, align 8)",
            case.kmalloc_pair_size().unwrap_or(0)
        ),
        Case::KmallocChurn => format!(
            "kmalloc churn, {} live objects, sizes uniform in 8..=8192, one free + one alloc per op",
            opts.kmalloc_working_set
        ),
        Case::CachePair256 => format!(
            "kmem_cache_alloc+free pair, {0}-byte cache (slabmalloc: SCAllocator<ObjectPage> of \
             {0}; others: GlobalAlloc {0} bytes, align 8)",
            crate::CACHE_OBJECT_SIZE
        ),
        Case::CrossFree => format!(
            "cross-thread free, {}-byte objects: 2 threads each allocate batches of {} and free \
             the other's (ring of {}); op = one object allocated on one thread, freed on the other",
            crate::CROSS_FREE_SIZE,
            opts.cross_batch,
            opts.cross_ring
        ),
        Case::ThisCpuInc => "this_cpu_inc of an alloc_percpu u64 on 2 threads at once \
             (atomic-fetch-add: one shared AtomicU64; thread-local: a thread_local Cell); \
             op = one increment on each thread"
            .into(),
        Case::Vmalloc64k | Case::Vmalloc1m => {
            let size = case.vmalloc_size().unwrap_or(0);
            let size = if size >= 1 << 20 {
                format!("{} MiB", size >> 20)
            } else {
                format!("{} KiB", size >> 10)
            };
            format!(
                "vmalloc({size})+vfree pair, nothing touched (mmap: mmap(MAP_PRIVATE|MAP_ANONYMOUS)\
                 +munmap of {size}; +touch: one byte written to every page in between)"
            )
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.environment;
        writeln!(
            f,
            "kmem-bench: median of {} rounds; ratio = peer / kmem (above 1: kmem is faster)",
            self.options.rounds
        )?;
        writeln!(
            f,
            "kmem machine: {} MiB, {} vCPUs, {} managed frames; host: {} CPUs{}",
            e.machine_ram >> 20,
            e.machine_cpus,
            e.kmem_frames,
            e.host_cpus,
            if e.optimized {
                ""
            } else {
                "; DEBUG BUILD: numbers are not meaningful"
            }
        )?;
        if self.cases.iter().any(|c| c.case.is_page()) {
            let pow2 = crate::pow2_floor(e.buddy_frames);
            writeln!(
                f,
                "buddy_system_allocator: FrameAllocator seeded with frames 0..{}; buddy-pow2: the \
                 same with 0..{pow2} (one block: each order-0 pair splits and merges {} levels)",
                e.buddy_frames,
                pow2.max(1).ilog2()
            )?;
        }
        for c in &self.cases {
            writeln!(f)?;
            writeln!(f, "{}: {}", c.case, case_title(c.case, &self.options))?;
            writeln!(
                f,
                "  {:<24} {:>12} {:>10} {:>10} {:>10} {:>13} {:>10}",
                "allocator", "ns/op (med)", "min", "max", "Mops/s", "ops/round", "vs kmem"
            )?;
            for m in &c.results {
                let ratio = c.ratio(m.allocator).map_or("-".into(), fmt_ratio);
                writeln!(
                    f,
                    "  {:<24} {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>13} {:>10}",
                    m.allocator.name(),
                    m.median_ns,
                    m.min_ns,
                    m.max_ns,
                    m.mops_per_s(),
                    m.ops_per_round,
                    ratio
                )?;
            }
            let like = c.like_for_like();
            if !like.is_empty() {
                let parts: Vec<String> = like
                    .iter()
                    .map(|(p, k, r)| format!("{p} / {k} = {}", fmt_ratio(*r)))
                    .collect();
                writeln!(f, "  like for like: {}", parts.join("; "))?;
            }
        }
        writeln!(f)?;
        for t in &self.targets {
            let (ratio, verdict) = match (t.ratio, t.met()) {
                (Some(r), Some(true)) => (format!("{r:.2}x"), "met"),
                (Some(r), _) => (format!("{r:.2}x"), "NOT MET"),
                (None, _) => ("-".into(), "not measured"),
            };
            let against = t.best.map_or(String::new(), |b| format!(" vs {b}"));
            writeln!(
                f,
                "target: kmem {}: {} (need >= {:.0}x, measured {ratio}{against}): {verdict}",
                t.case, t.description, t.min_ratio
            )?;
        }
        Ok(())
    }
}
