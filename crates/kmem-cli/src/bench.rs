//! `kmem bench`: the benchmark suite of `kmem-bench`, with a progress bar.
//!
//! Runs the cases of [`kmem_bench`] (kmem's page allocator, kmalloc, slab caches and vmalloc
//! against their peers, in the same process and run) and prints the comparison table with
//! the ratios (`peer / kmem`: above 1, kmem is faster) and the targets. A progress bar is
//! drawn on standard error when it is a terminal.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kmem_bench::{Allocator, Case, Options, Progress};

/// `kmem bench`'s options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Run only these cases or groups of cases (page, slab, vmalloc, percpu, all);
    /// repeatable. An unknown name lists every case.
    #[arg(long = "case", value_name = "CASE", value_parser = parse_case)]
    pub cases: Vec<Vec<Case>>,
    /// Run only these allocators (kmem, buddy, jemalloc, mimalloc, system, mmap, ...);
    /// repeatable; kmem must be one of them. Each case runs those it supports. An unknown
    /// name lists every allocator.
    #[arg(long = "alloc", value_name = "ALLOCATOR", value_parser = parse_alloc)]
    pub allocators: Vec<Allocator>,
    /// A short run (3 rounds, a tenth to a thirtieth of the work): a smoke test.
    #[arg(long)]
    pub quick: bool,
    /// Timed rounds per case (default 7, 3 with --quick).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub rounds: Option<u64>,
    /// Also write the results as CSV to PATH.
    #[arg(long, value_name = "PATH")]
    pub csv: Option<PathBuf>,
}

fn parse_case(s: &str) -> Result<Vec<Case>, String> {
    Case::group(s).ok_or_else(|| {
        let names: Vec<&str> = Case::ALL.iter().map(|c| c.name()).collect();
        format!(
            "unknown case '{s}' (use {}, or a group: page, slab, vmalloc, percpu, all)",
            names.join(", ")
        )
    })
}

fn parse_alloc(s: &str) -> Result<Allocator, String> {
    Allocator::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Allocator::ALL.iter().map(|a| a.name()).collect();
        format!("unknown allocator '{s}' (use {})", names.join(", "))
    })
}

/// The options `args` ask for; `mem` is the global `--mem` (the benchmark machine's RAM).
pub fn options(args: &BenchArgs, mem: Option<u64>) -> Options {
    let mut opts = if args.quick {
        Options::quick()
    } else {
        Options::default()
    };
    if let Some(r) = args.rounds {
        opts.rounds = r as usize;
    }
    if let Some(m) = mem {
        opts.machine_ram = m;
    }
    if !args.cases.is_empty() {
        opts.cases.clear();
        for c in args.cases.iter().flatten() {
            if !opts.cases.contains(c) {
                opts.cases.push(*c);
            }
        }
    }
    if !args.allocators.is_empty() {
        opts.allocators.clear();
        for &a in &args.allocators {
            if !opts.allocators.contains(&a) {
                opts.allocators.push(a);
            }
        }
    }
    opts
}

/// Progress steps of a run: per case, one warm-up and one sample per round for every
/// allocator it runs.
pub fn total_steps(opts: &Options) -> u64 {
    opts.cases
        .iter()
        .map(|c| {
            let allocators = opts.allocators.iter().filter(|&&a| c.runs(a)).count();
            (allocators * (1 + opts.rounds)) as u64
        })
        .sum()
}

/// Runs `kmem bench`: the table goes to `out`, the progress bar to standard error (when it
/// is a terminal).
pub fn run(args: &BenchArgs, mem: Option<u64>, out: &mut impl Write) -> Result<(), String> {
    let opts = options(args, mem);
    if !opts.allocators.contains(&Allocator::Kmem) {
        return Err("--alloc must include kmem (the ratios are against it)".into());
    }
    if cfg!(debug_assertions) {
        eprintln!("kmem bench: warning: debug build; use --release for meaningful numbers");
    }
    let bar = if std::io::stderr().is_terminal() {
        let bar =
            ProgressBar::with_draw_target(Some(total_steps(&opts)), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .map_err(|e| e.to_string())?,
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let report = kmem_bench::run_with_progress(&opts, |p| match *p {
        Progress::CaseStarted { case } => bar.set_message(case.name()),
        Progress::WarmedUp {
            case, allocator, ..
        } => {
            bar.set_message(format!("{case}: {allocator} warmed up"));
            bar.inc(1);
        }
        Progress::Sample {
            case,
            allocator,
            round,
            rounds,
            ..
        } => {
            bar.set_message(format!("{case}: {allocator} round {}/{rounds}", round + 1));
            bar.inc(1);
        }
    });
    bar.finish_and_clear();
    let report = report.map_err(|e| e.to_string())?;
    write!(out, "{report}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the output: {e}"))?;
    if let Some(path) = &args.csv {
        std::fs::write(path, report.to_csv())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cases: &[&str], allocs: &[&str], quick: bool) -> BenchArgs {
        BenchArgs {
            cases: cases.iter().map(|c| parse_case(c).unwrap()).collect(),
            allocators: allocs.iter().map(|a| parse_alloc(a).unwrap()).collect(),
            quick,
            rounds: None,
            csv: None,
        }
    }

    #[test]
    fn options_follow_the_arguments() {
        let o = options(
            &args(&["slab", "kmalloc-pair-64"], &["kmem", "system"], true),
            Some(64 << 20),
        );
        assert_eq!(o.cases, Case::SLAB.to_vec(), "groups expand, repeats drop");
        assert_eq!(o.allocators, vec![Allocator::Kmem, Allocator::System]);
        assert_eq!(o.rounds, 3);
        assert_eq!(o.machine_ram, 64 << 20);
        let o = options(&args(&[], &[], false), None);
        assert_eq!(o.cases, Case::ALL.to_vec());
        assert_eq!(o.rounds, 7);
    }

    #[test]
    fn progress_counts_every_warm_up_and_sample() {
        let mut o = options(
            &args(
                &["order0-pair", "vmalloc-64k"],
                &["kmem", "buddy", "mmap"],
                true,
            ),
            None,
        );
        o.rounds = 2;
        // order0-pair runs kmem and buddy; vmalloc-64k runs kmem and mmap: 4 × (1 + 2).
        assert_eq!(total_steps(&o), 12);
        let mut seen = 0;
        o.warmup_time = std::time::Duration::from_millis(1);
        o.sample_time = std::time::Duration::from_millis(1);
        o.vmalloc_warmup_bytes = 1 << 20;
        o.vmalloc_sample_bytes = 1 << 20;
        kmem_bench::run_with_progress(&o, |p| {
            if !matches!(p, Progress::CaseStarted { .. }) {
                seen += 1;
            }
        })
        .unwrap();
        assert_eq!(seen, 12);
    }

    #[test]
    fn unknown_names_are_explained() {
        let e = parse_case("fast").unwrap_err();
        assert!(
            e.contains("unknown case 'fast'") && e.contains("order0-pair"),
            "{e}"
        );
        let e = parse_alloc("tcmalloc").unwrap_err();
        assert!(
            e.contains("unknown allocator 'tcmalloc'") && e.contains("jemalloc"),
            "{e}"
        );
    }
}
