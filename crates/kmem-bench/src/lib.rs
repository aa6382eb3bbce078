//! Side-by-side benchmarks of kmem's page allocator against peer allocators.
//!
//! Two cases, each run against every selected allocator in the same process and the same run:
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
//! The harness ([`harness`]) warms every allocator up, then runs `rounds` rounds; in each
//! round every allocator runs one timed sample, one after the other (kmem, then each peer), so
//! drift on a shared machine affects all alike. The result per allocator is the median of its
//! per-round ns/op; ratios are `peer / kmem` (above 1: kmem is faster).
//!
//! [`run`] returns a [`Report`], printable as a table (`Display`) or as CSV
//! ([`Report::to_csv`]). The `kmem-bench` binary runs it with defaults; `kmem-pair` does a
//! fixed number of pairs for instruction counting under callgrind.
//!
//! kmem runs on a [`Machine`] booted for each case (by default 256 MiB, 2 vCPUs); the
//! benchmarking thread takes a vCPU at its first allocation and keeps it, as a pinned kernel
//! thread would. `buddy_system_allocator` is seeded with as many frames as kmem manages
//! ([`Allocator::Buddy`]) and, as a second row, with the largest power of two of frames not
//! above that ([`Allocator::BuddyPow2`]): its pair cost depends on that seeding (an odd count
//! leaves a free order-0 block, and a pair is a set remove and insert; a single block makes
//! every pair split and merge all the way). The targets use [`Allocator::Buddy`].

pub mod harness;
pub mod report;
pub mod source;
pub mod workload;

use std::fmt;
use std::time::Duration;

use kmem_hosted::{Machine, MachineConfig, MachineError};

use harness::{ChurnSampler, PairSampler, Sampler, median};
pub use report::{CaseReport, Environment, Measurement, Report, Target};
use source::{BuddySource, KmemSource, PageSource};
use workload::Churn;

/// A benchmark case.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Case {
    /// One order-0 alloc+free pair per operation.
    Order0Pair,
    /// One free of a random live block and one allocation of a random order per operation.
    Churn,
}

impl Case {
    /// Every case, in report order.
    pub const ALL: [Case; 2] = [Case::Order0Pair, Case::Churn];

    /// Short name, as in the table and the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Case::Order0Pair => "order0-pair",
            Case::Churn => "churn",
        }
    }

    /// The case named `name` (see [`Case::name`]).
    pub fn from_name(name: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == name)
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
    /// kmem's page allocator on a hosted machine.
    Kmem,
    /// `buddy_system_allocator::FrameAllocator` (default `ORDER`), seeded with frames `0..n`
    /// where `n` is the number of frames kmem manages.
    Buddy,
    /// The same, seeded with the largest power of two of frames not above `n`: one free
    /// block, so every order-0 pair of the pair case splits and merges all the way.
    BuddyPow2,
    /// jemalloc through `tikv-jemallocator`.
    Jemalloc,
    /// mimalloc through the `mimalloc` crate.
    Mimalloc,
    /// The system allocator (`std::alloc::System`: glibc on Linux).
    System,
}

impl Allocator {
    /// Every allocator, kmem first, in report order.
    pub const ALL: [Allocator; 6] = [
        Allocator::Kmem,
        Allocator::Buddy,
        Allocator::BuddyPow2,
        Allocator::Jemalloc,
        Allocator::Mimalloc,
        Allocator::System,
    ];

    /// Short name, as in the table and the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Allocator::Kmem => "kmem",
            Allocator::Buddy => "buddy_system_allocator",
            Allocator::BuddyPow2 => "buddy-pow2",
            Allocator::Jemalloc => "jemalloc",
            Allocator::Mimalloc => "mimalloc",
            Allocator::System => "system",
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
    /// Order-0 pair: warm-up time per allocator (also used to calibrate the sample size).
    pub warmup_time: Duration,
    /// Order-0 pair: target duration of one timed sample.
    pub sample_time: Duration,
    /// Churn: blocks in the working set.
    pub working_set: usize,
    /// Churn: untimed steps after filling the working set.
    pub churn_warmup_steps: u64,
    /// Churn: steps per timed sample (the same for every allocator).
    pub churn_steps: u64,
    /// Seed of the churn's operation sequence.
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
    /// Allocators to run, in the order they run within a round (ratios need [`Allocator::Kmem`]).
    pub allocators: Vec<Allocator>,
}

impl Default for Options {
    /// The full run: 7 rounds of 20 ms pair samples and 200 000 churn steps.
    fn default() -> Options {
        Options {
            rounds: 7,
            warmup_time: Duration::from_millis(50),
            sample_time: Duration::from_millis(20),
            working_set: 1000,
            churn_warmup_steps: 100_000,
            churn_steps: 200_000,
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
    /// A short run for CI smoke tests: 3 rounds, about a tenth of the work.
    pub fn quick() -> Options {
        Options {
            rounds: 3,
            warmup_time: Duration::from_millis(5),
            sample_time: Duration::from_millis(2),
            churn_warmup_steps: 5_000,
            churn_steps: 10_000,
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

/// As [`run`], calling `progress` after each step (for a progress display).
pub fn run_with_progress(
    opts: &Options,
    mut progress: impl FnMut(&Progress),
) -> Result<Report, BenchError> {
    if opts.rounds == 0 {
        return Err(BenchError::Options("rounds must be at least 1"));
    }
    if opts.working_set == 0 || opts.working_set > u32::MAX as usize {
        return Err(BenchError::Options("working set out of range"));
    }
    let config = MachineConfig::x86_64(opts.machine_ram).with_cpus(opts.machine_cpus);
    let mut env = None;
    let mut cases = Vec::new();
    for &case in &opts.cases {
        let machine = Machine::boot(config.clone()).map_err(BenchError::Boot)?;
        let kmem_frames = machine.totalram_pages();
        let frames = opts.buddy_frames.unwrap_or(kmem_frames);
        machine.drain_all_pages();
        let free_at_boot = machine.nr_free_pages();
        env.get_or_insert_with(|| Environment::new(opts, kmem_frames));
        progress(&Progress::CaseStarted { case });
        cases.push(run_case(case, opts, &machine, frames, &mut progress));
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

/// Boxes the sampler of `case` over `src`.
fn sampler<'a, S: PageSource + 'a>(case: Case, src: S, opts: &Options) -> Box<dyn Sampler + 'a> {
    match case {
        Case::Order0Pair => Box::new(PairSampler::new(src, opts.warmup_time, opts.sample_time)),
        Case::Churn => Box::new(ChurnSampler::new(
            Churn::new(src, opts.working_set, opts.seed),
            opts.churn_warmup_steps,
            opts.churn_steps,
        )),
    }
}

fn run_case(
    case: Case,
    opts: &Options,
    machine: &Machine,
    frames: usize,
    progress: &mut impl FnMut(&Progress),
) -> CaseReport {
    let mut samplers: Vec<(Allocator, Box<dyn Sampler + '_>)> = opts
        .allocators
        .iter()
        .map(|&a| {
            let s = match a {
                Allocator::Kmem => sampler(case, KmemSource::new(machine.pages()), opts),
                Allocator::Buddy => sampler(case, BuddySource::new(frames), opts),
                Allocator::BuddyPow2 => sampler(case, BuddySource::new(pow2_floor(frames)), opts),
                Allocator::Jemalloc => sampler(case, source::jemalloc(), opts),
                Allocator::Mimalloc => sampler(case, source::mimalloc(), opts),
                Allocator::System => sampler(case, source::system(), opts),
            };
            (a, s)
        })
        .collect();
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
        .iter()
        .zip(samples)
        .zip(ops)
        .map(
            |(((allocator, _), samples_ns), ops_per_round)| Measurement {
                allocator: *allocator,
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

/// After a case (every block freed): kmem's lists and counters must be intact.
fn check_machine(machine: &Machine, free_at_boot: usize) -> Result<(), BenchError> {
    machine.drain_all_pages();
    machine
        .check_free_lists()
        .map_err(|e| BenchError::Kmem(e.to_string()))?;
    let free = machine.nr_free_pages();
    if free != free_at_boot {
        return Err(BenchError::Kmem(format!(
            "{free} pages free after every block was freed, {free_at_boot} at boot"
        )));
    }
    match machine.bad_page_reports() {
        0 => Ok(()),
        n => Err(BenchError::Kmem(format!("{n} bad-page reports"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{CHURN_ORDERS, XorShift64};

    /// A run small enough for a debug-build unit test.
    fn tiny() -> Options {
        Options {
            rounds: 3,
            warmup_time: Duration::from_micros(200),
            sample_time: Duration::from_micros(100),
            working_set: 64,
            churn_warmup_steps: 100,
            churn_steps: 200,
            machine_ram: 32 << 20,
            ..Options::default()
        }
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
        // An outlier moves the mean, not the median.
        assert_eq!(median(&[10.0, 11.0, 1000.0, 9.0, 10.5]), 10.5);
    }

    #[test]
    fn pow2_floor_and_names() {
        assert_eq!(pow2_floor(0), 0);
        assert_eq!(pow2_floor(1), 1);
        assert_eq!(pow2_floor(65023), 32768);
        assert_eq!(pow2_floor(65536), 65536);
        for a in Allocator::ALL {
            assert_eq!(Allocator::from_name(a.name()), Some(a));
        }
        for c in Case::ALL {
            assert_eq!(Case::from_name(c.name()), Some(c));
        }
        assert_eq!(Allocator::from_name("buddy"), Some(Allocator::Buddy));
        assert_eq!(Allocator::from_name("tcmalloc"), None);
    }

    #[test]
    fn xorshift_is_deterministic_and_orders_mostly_zero() {
        let mut a = XorShift64::new(42);
        let mut b = XorShift64::new(42);
        let mut per_order = [0usize; 4];
        for _ in 0..16_000 {
            let x = a.next();
            assert_eq!(x, b.next());
            per_order[CHURN_ORDERS[(x >> 60) as usize] as usize] += 1;
        }
        assert!(per_order[0] > 10_000 && per_order.iter().all(|&n| n > 0));
        assert_ne!(XorShift64::new(0).next(), 0);
    }

    #[test]
    fn churn_keeps_its_working_set_and_frees_it() {
        let mut churn = Churn::new(source::system(), 100, 7);
        churn.run(1000);
        assert_eq!(churn.live_per_order().iter().sum::<usize>(), 100);
        let machine = Machine::boot(MachineConfig::x86_64(32 << 20).with_cpus(2)).unwrap();
        machine.drain_all_pages();
        let free = machine.nr_free_pages();
        {
            let mut churn = Churn::new(KmemSource::new(machine.pages()), 100, 7);
            churn.run(1000);
        }
        check_machine(&machine, free).unwrap();
        assert!(machine.nr_free_pages() == free);
    }

    #[test]
    fn tiny_run_completes_with_finite_positive_numbers() {
        let opts = tiny();
        let mut samples = 0;
        let report = run_with_progress(&opts, |p| {
            if let Progress::Sample { ns_per_op, .. } = p {
                assert!(ns_per_op.is_finite() && *ns_per_op > 0.0);
                samples += 1;
            }
        })
        .unwrap();
        let n_alloc = Allocator::ALL.len();
        assert_eq!(samples, Case::ALL.len() * n_alloc * opts.rounds);
        assert_eq!(report.cases.len(), Case::ALL.len());
        for c in &report.cases {
            assert_eq!(c.results.len(), n_alloc);
            for m in &c.results {
                assert_eq!(m.samples_ns.len(), opts.rounds);
                for x in [m.median_ns, m.min_ns, m.max_ns] {
                    assert!(x.is_finite() && x > 0.0, "{} {}: {x}", c.case, m.allocator);
                }
                assert!(m.min_ns <= m.median_ns && m.median_ns <= m.max_ns);
                let r = c.ratio(m.allocator).unwrap();
                assert!(r.is_finite() && r > 0.0);
            }
            assert_eq!(c.ratio(Allocator::Kmem), Some(1.0));
        }
        let churn = report.case(Case::Churn).unwrap();
        assert!(churn.results.iter().all(|m| m.ops_per_round == 200));
        assert!(report.targets.iter().all(|t| t.ratio.is_some()));
        let csv = report.to_csv();
        assert_eq!(csv.lines().count(), 1 + Case::ALL.len() * n_alloc);
        assert!(csv.starts_with("case,allocator,median_ns,"));
        let table = report.to_string();
        assert!(table.contains("order0-pair") && table.contains("jemalloc"));
        assert_eq!(table.matches("target: ").count(), 2);
    }

    #[test]
    fn ratios_need_kmem_and_bad_options_are_refused() {
        let opts = Options {
            cases: vec![Case::Order0Pair],
            allocators: vec![Allocator::Jemalloc],
            ..tiny()
        };
        let report = run(&opts).unwrap();
        assert_eq!(report.cases[0].ratio(Allocator::Jemalloc), None);
        assert!(report.targets.iter().all(|t| t.met().is_none()));
        assert!(report.targets_met());
        let bad = Options {
            rounds: 0,
            ..tiny()
        };
        assert!(matches!(run(&bad), Err(BenchError::Options(_))));
    }
}
