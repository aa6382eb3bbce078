//! Does exactly K kmalloc+kfree (or slab-cache) pairs, after a warm-up, for instruction
//! counting.
//!
//! ```text
//! kmem-kmalloc-pair [K] [--peer kmem|slabmalloc|jemalloc|mimalloc|system]
//!                   [--kmalloc SIZE | --cache SIZE] [--const-size] [--warmup W]
//! ```
//!
//! K defaults to 1 000 000, the allocator to kmem and the mode to `--kmalloc 64`.
//!
//! * `--kmalloc SIZE` (1..=8192): kmem does `kmalloc(SIZE, GFP_KERNEL)` + `kfree(p)` on a
//!   256 MiB, 2-vCPU machine; jemalloc, mimalloc and system a `GlobalAlloc::alloc`/`dealloc`
//!   of `Layout::from_size_align(SIZE, 8)` (Rust's global-allocator path, as a Rust program
//!   would call them).
//! * `--cache SIZE` (1..=4016): kmem does `kmem_cache_alloc`/`kmem_cache_free` on a dedicated
//!   (`SLAB_NO_MERGE`) cache of SIZE-byte objects; `slabmalloc` an `SCAllocator<ObjectPage>`
//!   of SIZE-byte objects (pages from the system allocator); the `GlobalAlloc` peers as above.
//! * `--const-size` (SIZE 16, 64, 256 or 1024): the size is a compile-time constant in the
//!   loop, as in a kernel's `kmalloc(sizeof(*p))`: kmem's size-class dispatch folds away.
//!   Without it the size is a runtime value (the loop may still hoist what depends only on
//!   it).
//!
//! The machine boots in every mode, so that all share the same fixed start-up cost. The loop
//! is `kmem_bench::objwork::obj_pair_loop::<…>` (`#[inline(never)]`), in which kmem's fast
//! paths are fully inlined.
//!
//! # Instructions per pair under callgrind
//!
//! As for `kmem-pair`: run K and 2K pairs; `(Ir(2K) - Ir(K)) / K` is one pair.
//!
//! ```text
//! cargo build --release -p kmem-bench
//! bash crates/kmem-bench/callgrind-pairs.sh --kmalloc 64         # kmem and the peers
//! B=target/release/kmem-kmalloc-pair
//! valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file=/tmp/cg.k $B 1000000
//! callgrind_annotate --auto=yes /tmp/cg.k > /tmp/cg.txt   # per source line
//! ```
//!
//! Outside valgrind, the elapsed time per pair is printed on stderr (a rough figure: use
//! `kmem-bench --case kmalloc-pair-64` for measurements).

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use kmem::slab::SlabFlags;
use kmem_bench::objsource::{
    ConstSize, KmallocSource, KmemCacheSource, ObjSource, SlabmallocSource,
};
use kmem_bench::objwork::obj_pair_loop;
use kmem_bench::{Allocator, harness, source};
use kmem_hosted::{Machine, MachineConfig};

/// K kmalloc+kfree or cache alloc+free pairs on kmem or a peer, for callgrind.
#[derive(Parser, Debug)]
#[command(name = "kmem-kmalloc-pair")]
struct Args {
    /// Pairs to do after the warm-up.
    #[arg(default_value_t = 1_000_000)]
    pairs: u64,
    /// The allocator: kmem, slabmalloc (--cache only), jemalloc, mimalloc or system.
    #[arg(long, default_value = "kmem", value_parser = parse_alloc)]
    peer: Allocator,
    /// kmalloc(SIZE)+kfree pairs (the default, with 64); GlobalAlloc peers: SIZE bytes,
    /// align 8.
    #[arg(long, value_name = "SIZE", conflicts_with = "cache",
          value_parser = clap::value_parser!(u64).range(1..=8192))]
    kmalloc: Option<u64>,
    /// kmem_cache_alloc+free pairs of a SIZE-byte cache (slabmalloc: an SCAllocator of SIZE;
    /// GlobalAlloc peers: SIZE bytes, align 8).
    #[arg(long, value_name = "SIZE", value_parser = clap::value_parser!(u64).range(1..=4016))]
    cache: Option<u64>,
    /// The size is a compile-time constant in the pair loop; SIZE must be 16, 64, 256 or 1024.
    #[arg(long)]
    const_size: bool,
    /// Untimed pairs before the K pairs.
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
}

fn parse_alloc(s: &str) -> Result<Allocator, String> {
    Allocator::from_name(s).ok_or_else(|| {
        format!("unknown allocator {s:?} (kmem, slabmalloc, jemalloc, mimalloc, system)")
    })
}

fn obj_pairs<S: ObjSource>(mut src: S, size: usize, warmup: u64, k: u64) -> Duration {
    let size = black_box(size);
    obj_pair_loop(&mut src, size, warmup);
    let t = Instant::now();
    obj_pair_loop(&mut src, size, k);
    t.elapsed()
}

/// As [`obj_pairs`], with `size` a compile-time constant (16, 64, 256 or 1024).
fn const_pairs<S: ObjSource>(src: S, size: usize, warmup: u64, k: u64) -> Option<Duration> {
    Some(match size {
        16 => obj_pairs(ConstSize::<S, 16>(src), size, warmup, k),
        64 => obj_pairs(ConstSize::<S, 64>(src), size, warmup, k),
        256 => obj_pairs(ConstSize::<S, 256>(src), size, warmup, k),
        1024 => obj_pairs(ConstSize::<S, 1024>(src), size, warmup, k),
        _ => return None,
    })
}

/// The pairs of `src`, with a runtime or a constant size.
fn any_pairs<S: ObjSource>(
    src: S,
    size: usize,
    constant: bool,
    w: u64,
    k: u64,
) -> Option<Duration> {
    if constant {
        const_pairs(src, size, w, k)
    } else {
        Some(obj_pairs(src, size, w, k))
    }
}

/// The pairs of `peer`; `None` when it has no such pair.
fn run(
    machine: &Machine,
    peer: Allocator,
    size: usize,
    cache: bool,
    constant: bool,
    (w, k): (u64, u64),
) -> Option<Duration> {
    let kmem = machine.kmem();
    match peer {
        Allocator::Kmem if cache => {
            let c = kmem.kmem_cache_create("pair-cache", size, 8, SlabFlags::NO_MERGE, None)?;
            any_pairs(KmemCacheSource::new(kmem, c), size, constant, w, k)
        }
        Allocator::Kmem => any_pairs(KmallocSource::new(kmem), size, constant, w, k),
        Allocator::Slabmalloc if cache => {
            any_pairs(SlabmallocSource::new(size), size, constant, w, k)
        }
        Allocator::Jemalloc => any_pairs(source::jemalloc(), size, constant, w, k),
        Allocator::Mimalloc => any_pairs(source::mimalloc(), size, constant, w, k),
        Allocator::System => any_pairs(source::system(), size, constant, w, k),
        _ => None,
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let machine = match Machine::boot(MachineConfig::x86_64(256 << 20).with_cpus(2)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("kmem-kmalloc-pair: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (size, cache) = match (args.kmalloc, args.cache) {
        (_, Some(s)) => (s as usize, true),
        (Some(s), None) => (s as usize, false),
        (None, None) => (64, false),
    };
    let kind = if cache { "cache" } else { "kmalloc" };
    let c = args.const_size;
    let k = args.pairs;
    let Some(elapsed) = run(&machine, args.peer, size, cache, c, (args.warmup, k)) else {
        let what = if c { " constant-size" } else { "" };
        eprintln!(
            "kmem-kmalloc-pair: {} has no{what} {kind}({size}) pair",
            args.peer
        );
        return ExitCode::FAILURE;
    };
    eprintln!(
        "kmem-kmalloc-pair: {k} {} {kind}({size}) pairs in {:.1} ms: {:.2} ns each",
        args.peer,
        elapsed.as_secs_f64() * 1e3,
        harness::ns_per_op(elapsed, k)
    );
    if machine.bad_page_reports() != 0 {
        eprintln!("kmem-kmalloc-pair: kmem reported bad pages or bad frees");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
