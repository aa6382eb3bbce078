//! Runs kmem's page-allocator, slab, kmalloc and vmalloc benchmarks against the peers and
//! prints the table.
//!
//! ```text
//! cargo run --release -p kmem-bench                         # full run (about a minute)
//! cargo run --release -p kmem-bench -- --quick              # CI smoke run (under 2 s)
//! cargo run --release -p kmem-bench -- --csv bench.csv      # also write the CSV
//! cargo run --release -p kmem-bench -- --case order0-pair --alloc kmem --alloc jemalloc
//! cargo run --release -p kmem-bench -- --case slab          # every slab/kmalloc case
//! cargo run --release -p kmem-bench -- --case kmalloc-pair-64 --case cross-free
//! cargo run --release -p kmem-bench -- --case vmalloc       # vmalloc against mmap
//! ```
//!
//! Cases: order0-pair, churn (group `page`); kmalloc-pair-16, kmalloc-pair-64,
//! kmalloc-pair-256, kmalloc-pair-1024, kmalloc-churn, cache-pair-256, cross-free (group
//! `slab`); vmalloc-64k, vmalloc-1m (group `vmalloc`); this-cpu-inc (group `percpu`); `all`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kmem_bench::{Allocator, Case, Options, Progress};

/// kmem's page allocator, kmalloc, slab caches, vmalloc and per-CPU counters against
/// buddy_system_allocator, slabmalloc, jemalloc, mimalloc, the system allocator, mmap and
/// shared atomics, in the same run.
#[derive(Parser, Debug)]
#[command(name = "kmem-bench")]
struct Args {
    /// A short run (3 rounds, about a tenth of the work): a CI smoke test.
    #[arg(long)]
    quick: bool,
    /// Also write the results as CSV to PATH.
    #[arg(long, value_name = "PATH")]
    csv: Option<PathBuf>,
    /// Rounds (default 7, 3 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Run only these cases (order0-pair, churn, kmalloc-pair-16, kmalloc-pair-64,
    /// kmalloc-pair-256, kmalloc-pair-1024, kmalloc-churn, cache-pair-256, cross-free,
    /// vmalloc-64k, vmalloc-1m, this-cpu-inc) or groups (page, slab, vmalloc, percpu, all);
    /// repeatable.
    #[arg(long = "case", value_parser = parse_case)]
    cases: Vec<Vec<Case>>,
    /// Run only these allocators (kmem, kmem+touch, buddy, buddy-pow2, slabmalloc, jemalloc,
    /// mimalloc, system, mmap, mmap+touch, atomic-fetch-add, thread-local); repeatable. Each
    /// case runs those it supports.
    #[arg(long = "alloc", value_parser = parse_alloc)]
    allocators: Vec<Allocator>,
    /// Cross-free: objects per batch (default 64).
    #[arg(long, value_name = "N")]
    cross_batch: Option<usize>,
    /// Cross-free: batches per thread per timed sample (default 2000, 50 with --quick).
    #[arg(long, value_name = "N")]
    cross_batches: Option<u64>,
    /// kmalloc churn: live objects (default 10000).
    #[arg(long, value_name = "N")]
    kmalloc_working_set: Option<usize>,
    /// Seed buddy_system_allocator with frames 0..N instead of as many as kmem manages.
    #[arg(long, value_name = "N")]
    buddy_frames: Option<usize>,
    /// No progress on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Exit with status 2 when a target is not met.
    #[arg(long)]
    check_targets: bool,
}

fn parse_case(s: &str) -> Result<Vec<Case>, String> {
    Case::group(s).ok_or_else(|| {
        let names: Vec<&str> = Case::ALL.iter().map(|c| c.name()).collect();
        format!(
            "unknown case {s:?} ({}, or a group: page, slab, vmalloc, percpu, all)",
            names.join(", ")
        )
    })
}

fn parse_alloc(s: &str) -> Result<Allocator, String> {
    Allocator::from_name(s).ok_or_else(|| {
        format!(
            "unknown allocator {s:?} (kmem, kmem+touch, buddy, buddy-pow2, slabmalloc, jemalloc, \
             mimalloc, system, mmap, mmap+touch, atomic-fetch-add, thread-local)"
        )
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut opts = if args.quick {
        Options::quick()
    } else {
        Options::default()
    };
    if let Some(r) = args.rounds {
        opts.rounds = r;
    }
    if args.buddy_frames.is_some() {
        opts.buddy_frames = args.buddy_frames;
    }
    if !args.cases.is_empty() {
        opts.cases = Vec::new();
        for c in args.cases.iter().flatten() {
            if !opts.cases.contains(c) {
                opts.cases.push(*c);
            }
        }
    }
    if let Some(n) = args.cross_batch {
        opts.cross_batch = n;
    }
    if let Some(n) = args.cross_batches {
        opts.cross_batches = n;
    }
    if let Some(n) = args.kmalloc_working_set {
        opts.kmalloc_working_set = n;
    }
    if !args.allocators.is_empty() {
        opts.allocators = args.allocators.clone();
    }
    if cfg!(debug_assertions) {
        eprintln!("kmem-bench: warning: debug build; use --release for meaningful numbers");
    }
    let quiet = args.quiet;
    let report = kmem_bench::run_with_progress(&opts, |p| {
        if quiet {
            return;
        }
        match *p {
            Progress::CaseStarted { case } => eprintln!("{case}:"),
            Progress::WarmedUp {
                allocator,
                ops_per_round,
                ..
            } => eprintln!("  warmed up {allocator}: {ops_per_round} ops per round"),
            Progress::Sample {
                allocator,
                round,
                rounds,
                ns_per_op,
                ..
            } => eprintln!(
                "  round {}/{rounds} {allocator:<24} {ns_per_op:>10.2} ns/op",
                round + 1
            ),
        }
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kmem-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{report}");
    let _ = std::io::stdout().flush();
    if let Some(path) = &args.csv {
        if let Err(e) = std::fs::write(path, report.to_csv()) {
            eprintln!("kmem-bench: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if args.check_targets && !report.targets_met() {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
