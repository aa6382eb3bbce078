//! `kmem boot --cmdline "..." [run ...]` and `kmem run <trace>`: a machine booted with a
//! kernel command line, and traces replayed on it.
//!
//! The command line is taken by [`MachineConfig::with_cmdline`] (the mapping table is in
//! `kmem_hosted::boot_params`); traces are parsed and replayed by `kmem_hosted::trace`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use kmem_hosted::trace::{BUILTINS, Replayer, Stats, Trace};
use kmem_hosted::{Machine, MachineConfig};

use crate::{Cli, Command, ProcFile};

/// The parameters `kmem boot --cmdline` acts on, for its help text.
const CMDLINE_HELP: &str = "\
Kernel parameters (names match with '-' and '_' alike):
  mem=nn[KMG]             remove RAM above physical address nn (as x86 trims its e820 map)
  memmap=nn[KMG]@ss[KMG]  add RAM; nn$ss reserves, nn!ss protects, nn#ss is ACPI data;
                          memmap=exactmap forgets the firmware map; entries may be joined by ','
  nr_cpus=n               at most n CPUs (0, or more than --cpus, is ignored as by Linux)
  vmalloc=nn[KMG]         size of the vmalloc range
  slab_nomerge, slab_merge
  init_on_alloc=<bool>, init_on_free=<bool>
  failslab=<interval>,<probability>,<space>,<times>
  fail_page_alloc=<interval>,<probability>,<space>,<times>
                          fault injection; as in Linux, allocations that may sleep are spared
                          (ignore-gfp-wait), and fail_page_alloc spares order 0 and
                          __GFP_HIGHMEM; times -1 means without limit
  sysctl.vm.min_free_kbytes=n (or min_free_kbytes=n)
  kmem_reserve=<name>:<size>[@<align>]   a physically contiguous buffer set aside at boot
  slab_debug[=<flags>[,<caches>][;...]] (or slub_debug), page_poison=<bool>,
  debug_pagealloc=<bool>  parsed and checked, but kmem has none of that debugging: the boot
                          log says so
Other parameters a kernel knows (console=, quiet, root=, module.param=...) are accepted
without effect; unknown ones are reported as Linux does (\"Unknown kernel command line
parameters ..., will be passed to user space.\"). A malformed value is an error.

Examples:
  kmem boot --cmdline \"mem=1G slab_nomerge\"
  kmem boot --cmdline \"failslab=1,10,0,-1 init_on_free=1\" run builtin:churn --proc slabinfo";

/// `kmem boot`.
#[derive(Args, Debug)]
#[command(after_long_help = CMDLINE_HELP)]
pub struct BootArgs {
    /// The kernel command line, e.g. "mem=1G slab_nomerge failslab=1,10,0,-1".
    #[arg(long, default_value = "", value_name = "PARAMS")]
    cmdline: String,
    #[command(subcommand)]
    then: Option<BootCommand>,
}

/// What to do on the booted machine.
#[derive(Subcommand, Debug)]
enum BootCommand {
    /// Replay a trace file or a built-in workload and print a summary (see `kmem run --help`
    /// for the trace format).
    Run(RunArgs),
}

/// `kmem run`.
#[derive(Args, Debug)]
#[command(after_long_help = run_help())]
pub struct RunArgs {
    /// A trace file, `-` for standard input, or `builtin:NAME` (churn, fragment, slab-heavy,
    /// vmalloc).
    #[arg(value_name = "TRACE")]
    trace: String,
    /// Print this /proc file after the run (may be repeated).
    #[arg(long = "proc", value_enum, value_name = "FILE")]
    procs: Vec<ProcFile>,
}

/// The trace format and the built-in workloads, for `kmem run --help`.
fn run_help() -> String {
    let mut s = String::from("Trace format:\n\n");
    for line in kmem_hosted::trace::FORMAT.lines() {
        if !line.starts_with("```") {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    s.push_str("\nBuilt-in workloads (builtin:NAME):\n");
    for (name, what) in BUILTINS {
        s.push_str(&format!("  {name:<11} {what}\n"));
    }
    s.push_str(
        "\nThe summary counts operations, failed allocations (by kind, and those injected by \
         failslab/fail_page_alloc), what is still live, and the peaks: bytes asked for, and \
         pages in use beyond the boot state.",
    );
    s
}

/// Runs `kmem boot` and `kmem run`; `None` for other commands.
pub fn dispatch(cli: &Cli) -> Option<ExitCode> {
    let result = match &cli.command {
        Some(Command::Boot(args)) => boot(cli, args),
        Some(Command::Run(args)) => run_plain(cli, args),
        _ => return None,
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmem: {e}");
            ExitCode::FAILURE
        }
    })
}

fn boot_machine(cfg: MachineConfig, dmesg: bool) -> Result<Machine, String> {
    let m = Machine::boot(cfg).map_err(|e| format!("the machine did not boot: {e}"))?;
    m.platform().set_log_echo(dmesg);
    Ok(m)
}

fn boot(cli: &Cli, args: &BootArgs) -> Result<(), String> {
    let cfg = crate::machine_config(cli)
        .with_cmdline(&args.cmdline)
        .map_err(|e| format!("bad kernel command line: {e}"))?;
    // Read the trace before booting, so a bad trace is reported without a boot log.
    let trace = match &args.then {
        Some(BootCommand::Run(run)) => Some(crate::sampler::load_trace(&run.trace)?),
        None => None,
    };
    let m = boot_machine(cfg, cli.dmesg)?;
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| format!("writing the output: {e}");
    writeln!(out, "== Boot").map_err(io)?;
    for line in m.platform().take_log() {
        writeln!(out, "  {line}").map_err(io)?;
    }
    match (&args.then, trace) {
        (Some(BootCommand::Run(run)), Some(trace)) => replay(&m, &trace, run, cli.dmesg, &mut out),
        _ => {
            writeln!(out, "\n== /proc/meminfo").map_err(io)?;
            out.write_all(m.proc_meminfo().as_bytes()).map_err(io)
        }
    }
}

fn run_plain(cli: &Cli, args: &RunArgs) -> Result<(), String> {
    let trace = crate::sampler::load_trace(&args.trace)?;
    let m = boot_machine(crate::machine_config(cli), cli.dmesg)?;
    m.platform().take_log();
    replay(&m, &trace, args, cli.dmesg, &mut std::io::stdout().lock())
}

/// `1536` -> `1.5 KiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The summary lines of a finished replay.
fn summary(m: &Machine, r: &Replayer<'_>, secs: f64) -> Vec<String> {
    let s: &Stats = r.stats();
    let mut lines = vec![format!(
        "ops        {} ({} allocations, {} frees)",
        s.ops, s.allocs, s.frees
    )];
    let kinds: Vec<String> = [
        ("alloc_pages", s.failed_pages),
        ("kmalloc", s.failed_kmalloc),
        ("vmalloc", s.failed_vmalloc),
        ("cache", s.failed_cache),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k} {n}"))
    .collect();
    lines.push(if kinds.is_empty() {
        format!("failures   {}", s.failures)
    } else {
        format!("failures   {} ({})", s.failures, kinds.join(", "))
    });
    let f = m.faults();
    let (slab, pages) = (
        f.failslab.attr.injected(),
        f.fail_page_alloc.attr.injected(),
    );
    if slab > 0
        || pages > 0
        || f.failslab.attr.params().enabled()
        || f.fail_page_alloc.attr.params().enabled()
    {
        lines.push(format!(
            "injected   {} (failslab {slab}, fail_page_alloc {pages})",
            slab + pages
        ));
    }
    lines.push(format!(
        "live       {} allocations, {} asked for",
        s.live,
        bytes(s.live_bytes)
    ));
    let peak_line = if s.ops > 0 {
        format!(" (at line {})", r.trace().line(s.peak_at))
    } else {
        String::new()
    };
    lines.push(format!(
        "peak       {} asked for; {} of pages in use{peak_line}",
        bytes(s.peak_live_bytes),
        bytes(s.peak_pages_in_use * kmem::addr::PAGE_SIZE as u64)
    ));
    let rate = if secs > 0.0 { s.ops as f64 / secs } else { 0.0 };
    lines.push(format!("time       {secs:.3} s ({rate:.0} ops/s)"));
    lines
}

fn replay(
    m: &Machine,
    trace: &Trace,
    args: &RunArgs,
    dmesg: bool,
    out: &mut impl Write,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("writing the output: {e}");
    let mut r = Replayer::new(m, trace);
    let t = Instant::now();
    r.run_to_end();
    let secs = t.elapsed().as_secs_f64();
    let log = m.platform().take_log();
    writeln!(out, "\n== Run {} ({} ops)", args.trace, trace.len()).map_err(io)?;
    for line in summary(m, &r, secs) {
        writeln!(out, "  {line}").map_err(io)?;
    }
    if !log.is_empty() {
        writeln!(
            out,
            "  log        {} kernel log lines{}",
            log.len(),
            if dmesg { "" } else { " (--dmesg prints them)" }
        )
        .map_err(io)?;
    }
    for file in &args.procs {
        let name = file
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .ok_or("a /proc file without a name")?;
        let text = m
            .proc(&name)
            .ok_or_else(|| format!("the machine has no /proc/{name}"))?;
        writeln!(out, "\n== /proc/{name}").map_err(io)?;
        out.write_all(text.as_bytes()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn help_lists_the_format_and_builtins() {
        let h = run_help();
        assert!(h.contains("alloc_pages   <id> <order> <gfp>"));
        assert!(!h.contains("```"));
        for (name, _) in BUILTINS {
            assert!(h.contains(name));
        }
    }
}
