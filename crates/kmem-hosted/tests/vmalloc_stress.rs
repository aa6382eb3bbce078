//! Multi-threaded stress of vmalloc on a small range, where purges are frequent.
//!
//! Four threads allocate (`vmalloc`, `vzalloc`, `vmap`, `get_vm_area`), fill, check and free
//! areas in a 16 MiB range: lazily freed ranges fill it within a few hundred frees, so
//! allocations keep running into "no room", purging and retrying while other threads free
//! (queueing more) and purge too. A fifth thread reads `/proc/vmallocinfo` (checking that
//! its lines never overlap), looks areas up and forces purges. No allocation may fail (the
//! live set is far below the range), nothing may be reported, and at the end everything is
//! back: free pages as before, one free area covering the range.
//!
//! * [`threads_churn_with_purges`]: the timed test (a few seconds in debug);
//! * [`threads_churn_with_purges_soak`]: ten times as long, `#[ignore]`.

mod common;
use common::{Rng, shrink_kmalloc};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use kmem::addr::PAGE_SIZE;
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem::platform::PageProt;
use kmem::vmalloc::*;
use kmem_hosted::platform::HostedPlatform;
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;
const PAGE: usize = PAGE_SIZE;

fn cx(m: &Machine) -> VmCtx<'_, HostedPlatform> {
    VmCtx::new(m.pages(), m.slab(), m.kmalloc_caches())
}

/// Purges, shrinks the caches vmalloc uses, drains the per-CPU lists: free pages.
fn settled_free(m: &Machine, vm: &Vmalloc) -> usize {
    vm.vm_unmap_aliases(cx(m));
    shrink_kmalloc(m);
    m.kmem_cache_shrink(vm.area_cache());
    m.drain_all_pages();
    m.nr_free_pages()
}

/// One live area of a worker: what it is, where, how big, its pattern tag, and the pages of
/// a vmap (which the worker owns).
enum Kind<'a> {
    Vmalloc,
    Vmap(Vec<&'a Page>),
    Reserved(VmStruct),
}

struct Live<'a> {
    kind: Kind<'a>,
    addr: usize,
    len: usize,
    tag: u8,
}

fn fill(addr: usize, len: usize, tag: u8) {
    // SAFETY: a live, mapped area of the worker, `len` bytes long.
    unsafe { std::ptr::write_bytes(addr as *mut u8, tag, len) };
}

fn check(addr: usize, len: usize, tag: u8) {
    // SAFETY: as in `fill`.
    let b = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    assert!(
        b.iter().all(|&x| x == tag),
        "area {addr:#x} lost its pattern {tag:#x}"
    );
}

fn worker<'a>(m: &'a Machine, vm: &Vmalloc, seed: u64, ops: usize) {
    let mut rng = Rng::new(seed);
    let mut live: Vec<Live<'a>> = Vec::new();
    for i in 0..ops {
        if live.len() < 12 && (live.is_empty() || rng.below(2) == 0) {
            let pages = 1 + rng.below(16);
            let len = pages * PAGE;
            let tag = (i % 250) as u8 + 1;
            let l = match rng.below(4) {
                0 | 1 => {
                    let p = vm.vmalloc(cx(m), len).expect("vmalloc never fails here");
                    Live {
                        kind: Kind::Vmalloc,
                        addr: p.as_ptr() as usize,
                        len,
                        tag,
                    }
                }
                2 => {
                    let ps: Vec<&Page> = (0..pages)
                        .map(|_| m.alloc_page(GFP_KERNEL).unwrap())
                        .collect();
                    let p = vm.vmap(cx(m), &ps, VM_MAP, PageProt::KERNEL).expect("vmap");
                    Live {
                        kind: Kind::Vmap(ps),
                        addr: p.as_ptr() as usize,
                        len,
                        tag,
                    }
                }
                _ => {
                    let a = vm
                        .get_vm_area(cx(m), len, VmFlags::NONE)
                        .expect("get_vm_area");
                    Live {
                        kind: Kind::Reserved(a),
                        addr: a.addr.0,
                        len: 0,
                        tag,
                    }
                }
            };
            fill(l.addr, l.len, l.tag);
            live.push(l);
        } else {
            let l = live.swap_remove(rng.below(live.len()));
            release(m, vm, l);
        }
    }
    for l in live {
        release(m, vm, l);
    }
}

fn release(m: &Machine, vm: &Vmalloc, l: Live<'_>) {
    check(l.addr, l.len, l.tag);
    let found = vm
        .find_vm_area((l.addr + l.len / 2) as *const u8)
        .expect("still busy");
    assert_eq!(found.addr.0, l.addr);
    match l.kind {
        // SAFETY: our area, no longer used.
        Kind::Vmalloc => unsafe { vm.vfree(cx(m), l.addr as *const u8) },
        Kind::Vmap(ps) => {
            // SAFETY: our mapping, no longer used.
            unsafe { vm.vunmap(cx(m), l.addr as *const u8) };
            for p in ps {
                // SAFETY: allocated by this worker, unmapped above.
                unsafe { m.__free_pages(p, 0) };
            }
        }
        // SAFETY: nothing was mapped in the reservation.
        Kind::Reserved(a) => unsafe { vm.free_vm_area(cx(m), a) },
    }
}

/// Reads the report over and over: lines parse into non-overlapping ranges in address
/// order (busy part); purges now and then.
fn observer(m: &Machine, vm: &Vmalloc, stop: &AtomicBool) -> usize {
    let mut rounds = 0;
    while !stop.load(Relaxed) {
        let mut s = String::new();
        vm.vmallocinfo(m.pages(), &mut s).unwrap();
        let mut last_end = 0u64;
        for l in s.lines().filter(|l| !l.ends_with("unpurged vm_area")) {
            let start = u64::from_str_radix(&l[2..18], 16).unwrap();
            let end = u64::from_str_radix(&l[21..37], 16).unwrap();
            assert!(start >= last_end && end > start, "overlap in\n{s}");
            last_end = end;
        }
        if rounds % 4 == 0 {
            vm.vm_unmap_aliases(cx(m));
        }
        vm.validate().expect("invariants hold at any time");
        rounds += 1;
        std::thread::yield_now();
    }
    rounds
}

fn run(ops: usize) {
    let m = Machine::boot(MachineConfig {
        vmalloc_size: 16 * MIB,
        ..MachineConfig::x86_64(128 * MIB)
    })
    .expect("machine boots");
    let vm = m.vmalloc_space();
    let base = settled_free(&m, vm);
    m.platform().take_log();
    let stop = AtomicBool::new(false);
    let start = Barrier::new(5);
    let rounds = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|w| {
                let (m, start) = (&m, &start);
                s.spawn(move || {
                    start.wait();
                    worker(m, vm, 0x5eed_7000 + w, ops);
                })
            })
            .collect();
        let obs = s.spawn(|| {
            start.wait();
            observer(&m, vm, &stop)
        });
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Relaxed);
        obs.join().unwrap()
    });
    let purges = vm.nr_purges();
    assert!(purges > 10, "purges: {purges}");
    assert_eq!(vm.alloc_failures(), 0);
    let log = m.platform().take_log().join("\n");
    assert_eq!(log, "", "nothing reported");
    assert_eq!(settled_free(&m, vm), base, "free pages are back");
    vm.validate().unwrap();
    m.validate().unwrap();
    assert_eq!(vm.nr_busy_areas(), 0);
    assert_eq!(vm.nr_free_areas(), 1);
    assert_eq!(vm.largest_free_area(), vm.range().1);
    eprintln!("vmalloc stress: {ops} ops x 4 threads, {purges} purges, {rounds} report rounds");
}

/// Four workers and an observer on a 16 MiB range (see the module docs).
#[test]
fn threads_churn_with_purges() {
    run(8000);
}

/// [`threads_churn_with_purges`], ten times as long.
#[test]
#[ignore]
fn threads_churn_with_purges_soak() {
    run(30_000);
}
