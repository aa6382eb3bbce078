//! The `kmem` command: boot a simulated machine, run a workload on it, print its `/proc`.
//!
//! `kmem` with no arguments boots the default machine, runs the demo (the allocators, then
//! LDD3 chapter 8's sample drivers rebuilt on kmem) and prints the reports. `kmem proc NAME` prints one report after the demo workload.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kmem::config::ZoneLayout;
use kmem_hosted::{Machine, MachineConfig};

mod bench;
mod boot;
mod demo;
mod plot;
mod sampler;
mod top;

/// kmem: the Linux kernel's memory allocators on a simulated machine.
///
/// With no command, boots the default machine (x86_64 zones, 4 CPUs, about 4 GiB of RAM with a
/// PCI hole), runs a short workload (pages of every order and zone, fragmentation, an
/// allocation failure, a lookaside cache with a constructor, kmalloc of every class, bad
/// frees; LDD3's scullc, scullp and scullv drivers with per-CPU statistics, a mempool serving
/// requests while memory is exhausted, a scatter/gather buffer on fragmented memory; freeing
/// everything) and prints /proc/buddyinfo, /proc/slabinfo and /proc/meminfo as Linux would.
#[derive(Parser, Debug)]
#[command(name = "kmem", version, about, long_about)]
struct Cli {
    /// Machine RAM, e.g. 512M or 2G (one range from address 0; default: the PC layout).
    #[arg(long, value_parser = parse_size, global = true)]
    mem: Option<u64>,
    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=1024), global = true)]
    cpus: u16,
    /// Zone layout.
    #[arg(long, value_enum, default_value_t = Layout::X86_64, global = true)]
    layout: Layout,
    /// Print the kernel log lines (boot messages, reports) as they happen.
    #[arg(long, global = true)]
    dmesg: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot, run the demo workload and print its narration and reports (the default).
    Demo,
    /// Boot, run the demo workload quietly, then print one /proc file.
    Proc {
        /// Which files, printed one after the other as `cat` would (all from the same moment).
        #[arg(value_enum, required = true)]
        files: Vec<ProcFile>,
    },
    /// A live, slabtop-like view of the caches, zones and free blocks per order while a
    /// workload runs (q quits, a b c l v n o p s u sort); prints plain slabtop -o frames when
    /// standard output is not a terminal.
    Top {
        #[command(flatten)]
        top: top::TopArgs,
        #[command(flatten)]
        workload: sampler::WorkloadArgs,
    },
    /// Run a workload and chart free blocks per order, slab memory and the fragmentation
    /// index per order over time (PNG and/or SVG).
    Plot {
        #[command(flatten)]
        plot: plot::PlotArgs,
        #[command(flatten)]
        workload: sampler::WorkloadArgs,
    },
    /// Run the benchmarks of kmem against peer allocators and print the comparison table
    /// (boots its own machines: 256 MiB or --mem, 2 vCPUs).
    Bench(bench::BenchArgs),
    /// Boot with a kernel command line (mem=, memmap=, nr_cpus=, slab_nomerge, slab_debug=,
    /// init_on_free=, failslab=, ...), print the boot log, then /proc/meminfo or a run.
    Boot(boot::BootArgs),
    /// Replay a trace file or a built-in workload (builtin:churn, ...) and print a summary.
    Run(boot::RunArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProcFile {
    Buddyinfo,
    Zoneinfo,
    Meminfo,
    Slabinfo,
    Vmallocinfo,
    Pagetypeinfo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Layout {
    /// DMA < 16 MiB, DMA32 < 4 GiB, Normal above.
    #[value(name = "x86_64")]
    X86_64,
    /// DMA < 16 MiB, Normal < 896 MiB, HighMem above.
    #[value(name = "x86_32")]
    X86_32,
}

/// Parses `512M`, `2G`, `65536K` or a byte count.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M, 2G)"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < (16 << 20) {
        return Err(format!(
            "'{s}' is too small: the demo machine needs at least 16M of RAM"
        ));
    }
    Ok(bytes)
}

fn machine_config(cli: &Cli) -> MachineConfig {
    let mut cfg = match cli.mem {
        Some(bytes) => MachineConfig::x86_64(bytes),
        None => MachineConfig::default(),
    };
    if cli.layout == Layout::X86_32 {
        cfg.kmem.layout = ZoneLayout::X86_32;
        if cli.mem.is_none() {
            // A 32-bit PC: 2 GiB, so there is HighMem above 896 MiB.
            cfg.ram = vec![(0x1000, 0x9f000), (1 << 20, (2 << 30) - (1 << 20))];
        }
    }
    cfg.nr_cpus = usize::from(cli.cpus);
    cfg
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Bench(args)) = &cli.command {
        return match bench::run(args, cli.mem, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kmem: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(code) = boot::dispatch(&cli) {
        return code;
    }
    let machine = match Machine::boot(machine_config(&cli)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kmem: the machine did not boot: {e}");
            return ExitCode::FAILURE;
        }
    };
    machine.platform().set_log_echo(cli.dmesg);
    let out = std::io::stdout();
    let color = out.is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let mut out = out.lock();
    let result = match cli.command.unwrap_or(Command::Demo) {
        Command::Demo => demo::run(&machine, &mut out, color),
        Command::Proc { files } => demo::workload(&machine, &mut demo::Quiet).and_then(|()| {
            for file in files {
                let name = match file {
                    ProcFile::Buddyinfo => "buddyinfo",
                    ProcFile::Zoneinfo => "zoneinfo",
                    ProcFile::Meminfo => "meminfo",
                    ProcFile::Slabinfo => "slabinfo",
                    ProcFile::Vmallocinfo => "vmallocinfo",
                    ProcFile::Pagetypeinfo => "pagetypeinfo",
                };
                let text = machine.proc(name).expect("known report");
                out.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
            }
            Ok(())
        }),
        Command::Top { top, workload } => {
            let is_terminal = std::io::stdout().is_terminal();
            sampler::with_workload(&machine, &workload, |w| {
                top::run(&machine, w, &top, &mut out, is_terminal)
            })
        }
        Command::Plot { plot, workload } => sampler::with_workload(&machine, &workload, |w| {
            plot::run(&machine, w, &plot, &mut out)
        }),
        Command::Bench(_) => Err("kmem bench runs before the machine boots".into()),
        Command::Boot(_) | Command::Run(_) => {
            Err("kmem boot and run boot their own machine".into())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kmem: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("33554432"), Ok(32 << 20));
        assert!(parse_size("1K").is_err());
        assert!(parse_size("8M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
