//! Does exactly K order-0 alloc+free pairs, after a warm-up, for instruction counting.
//!
//! ```text
//! kmem-pair [K] [--peer kmem|buddy|buddy-pow2|jemalloc|mimalloc|system] [--warmup W]
//!           [--buddy-frames N] [--guards]
//! ```
//!
//! K defaults to 1 000 000 and the allocator to kmem (`alloc_pages(GFP_KERNEL, 0)` /
//! `__free_pages(p, 0)` on a 256 MiB, 2-vCPU machine). `--peer` does the peer's pair instead:
//! `FrameAllocator::alloc(1)` / `dealloc(f, 1)` seeded with as many frames as kmem manages
//! (`buddy`) or with the largest power of two not above that (`buddy-pow2`: every pair splits
//! and merges all the way, about 6 000 instructions: use a smaller K under callgrind),
//! or a 4 KiB, 4 KiB-aligned `GlobalAlloc::alloc`/`dealloc`. The machine boots in every
//! mode, so that all modes share the same fixed start-up cost.
//!
//! # Instructions per pair under callgrind
//!
//! Run the same mode with K and with 2K pairs; the difference of the two totals is the cost
//! of K pairs alone (boot, warm-up and exit cancel out):
//!
//! ```text
//! cargo build --release -p kmem-bench
//! B=target/release/kmem-pair
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.k  $B 1000000 --peer kmem
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.2k $B 2000000 --peer kmem
//! callgrind_annotate /tmp/cg.k  | grep 'PROGRAM TOTALS'    # Ir(K)
//! callgrind_annotate /tmp/cg.2k | grep 'PROGRAM TOTALS'    # Ir(2K)
//! # instructions per pair = (Ir(2K) - Ir(K)) / K
//! ```
//!
//! `crates/kmem-bench/callgrind-pairs.sh` does this for every allocator. The kmalloc and
//! slab-cache pairs are counted by `kmem-kmalloc-pair`, a binary of its own: object-pair code
//! in this one would add call sites of the page allocator's `#[inline]` entry points here and
//! can change whether LLVM inlines them into this loop (it did: 185 -> 285 instructions). To see where the
//! instructions go, annotate the 2K run per function and per source line:
//!
//! ```text
//! valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file=/tmp/cg.2k $B 2000000
//! callgrind_annotate --inclusive=no /tmp/cg.2k | head -40
//! callgrind_annotate --auto=yes /tmp/cg.2k > /tmp/cg.txt   # per-line counts
//! ```
//!
//! `--guards` instead does K iterations of two empty `cpu_guard()` sections (what a kmem
//! pair takes: one in the allocation, one in the free), to price the hosted platform's
//! guard alone (count its instructions; its time is pessimistic, as nothing separates one
//! section's releasing store from the next section's locked compare-and-swap).
//! `--buddy-frames N` seeds the buddy peers with frames `0..N` (`buddy-pow2`: the largest
//! power of two not above N).
//!
//! Outside valgrind, the elapsed time per pair is printed on stderr (a rough figure: use
//! `kmem-bench` for measurements).
//!
//! The loop is `kmem_bench::workload::pair_loop::<…>`, `#[inline(never)]`: its inclusive
//! count divided by K + W (callgrind merges the warm-up's call and the measured one) is a
//! cross-check of the difference method.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use kmem::platform::Platform;
use kmem_bench::source::{self, BuddySource, KmemSource, PageSource};
use kmem_bench::workload::pair_loop;
use kmem_bench::{Allocator, harness};
use kmem_hosted::{Machine, MachineConfig};

/// K order-0 alloc+free pairs on kmem or a peer, for callgrind.
#[derive(Parser, Debug)]
#[command(name = "kmem-pair")]
struct Args {
    /// Pairs to do after the warm-up.
    #[arg(default_value_t = 1_000_000)]
    pairs: u64,
    /// The allocator: kmem, buddy, buddy-pow2, jemalloc, mimalloc or system.
    #[arg(long, default_value = "kmem", value_parser = parse_alloc)]
    peer: Allocator,
    /// Untimed pairs before the K pairs.
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
    /// Seed the buddy peer with frames 0..N (default: as many as kmem manages).
    #[arg(long, value_name = "N")]
    buddy_frames: Option<usize>,
    /// Instead of pairs, do K iterations of two empty kmem CPU-guard sections.
    #[arg(long)]
    guards: bool,
}

fn parse_alloc(s: &str) -> Result<Allocator, String> {
    Allocator::from_name(s).ok_or_else(|| {
        format!("unknown allocator {s:?} (kmem, buddy, buddy-pow2, jemalloc, mimalloc, system)")
    })
}

fn pairs<S: PageSource>(mut src: S, warmup: u64, k: u64) -> Duration {
    pair_loop(&mut src, warmup);
    let t = Instant::now();
    pair_loop(&mut src, k);
    t.elapsed()
}

/// `n` iterations of two empty guard sections on `p`.
#[inline(never)]
fn guard_loop<P: Platform>(p: &P, n: u64) {
    for _ in 0..n {
        drop(black_box(p.cpu_guard()));
        drop(black_box(p.cpu_guard()));
    }
}

fn guards<P: Platform>(p: &P, warmup: u64, k: u64) -> Duration {
    guard_loop(p, warmup);
    let t = Instant::now();
    guard_loop(p, k);
    t.elapsed()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let machine = match Machine::boot(MachineConfig::x86_64(256 << 20).with_cpus(2)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kmem-pair: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (w, k) = (args.warmup, args.pairs);
    let frames = args
        .buddy_frames
        .unwrap_or_else(|| machine.totalram_pages());
    let (what, elapsed) = if args.guards {
        ("kmem guard pairs", guards(machine.platform(), w, k))
    } else {
        let t = match args.peer {
            Allocator::Kmem => pairs(KmemSource::new(machine.pages()), w, k),
            Allocator::Buddy => pairs(BuddySource::new(frames), w, k),
            Allocator::BuddyPow2 => pairs(BuddySource::new(kmem_bench::pow2_floor(frames)), w, k),
            Allocator::Jemalloc => pairs(source::jemalloc(), w, k),
            Allocator::Mimalloc => pairs(source::mimalloc(), w, k),
            Allocator::System => pairs(source::system(), w, k),
            Allocator::Slabmalloc => {
                eprintln!("kmem-pair: slabmalloc has no page pair (see kmem-kmalloc-pair --cache)");
                return ExitCode::FAILURE;
            }
            Allocator::KmemTouch
            | Allocator::Mmap
            | Allocator::MmapTouch
            | Allocator::SharedAtomic
            | Allocator::ThreadLocal => {
                eprintln!(
                    "kmem-pair: {} has no page pair (vmalloc and per-CPU cases only)",
                    args.peer
                );
                return ExitCode::FAILURE;
            }
        };
        (args.peer.name(), t)
    };
    eprintln!(
        "kmem-pair: {k} {what} in {:.1} ms: {:.2} ns each",
        elapsed.as_secs_f64() * 1e3,
        harness::ns_per_op(elapsed, k)
    );
    if machine.bad_page_reports() != 0 {
        eprintln!("kmem-pair: kmem reported bad pages");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
