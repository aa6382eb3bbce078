//! The slab layer and vmalloc on their own: a lookaside cache with a constructor, every
//! kmalloc class, the bad-free reports, and a vmalloc area of scattered pages.

use std::time::Instant;

use kmem::addr::PAGE_SIZE;
use kmem::gfp::*;
use kmem_hosted::Machine;

use super::Narrator;

/// The object size of the cache with a constructor: a scull quantum.
const QUANTUM: usize = 4000;

fn quantum_ctor(p: *mut u8) {
    // SAFETY: the slab layer passes a fresh object of QUANTUM bytes.
    unsafe { core::ptr::write_bytes(p, 0, QUANTUM) };
    CTOR_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

static CTOR_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Lookaside caches and kmalloc: a cache with a constructor, every kmalloc class, a large
/// kmalloc, the bad-free reports; leaves nothing allocated.
pub fn slab_tour(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    use kmem::slab::SlabFlags;
    use std::sync::atomic::Ordering::Relaxed;

    n.heading(
        "A lookaside cache with a constructor: kmem_cache_create(\"quantum_ctor\", 4000, ctor)",
    );
    let cache = m
        .kmem_cache_create(
            "quantum_ctor",
            QUANTUM,
            0,
            SlabFlags::HWCACHE_ALIGN,
            Some(quantum_ctor),
        )
        .ok_or("kmem_cache_create failed")?;
    let ctor_before = CTOR_CALLS.load(Relaxed);
    let mut quanta = Vec::new();
    let t = Instant::now();
    for i in 0..64u8 {
        let q = m
            .kmem_cache_alloc(cache, GFP_KERNEL)
            .ok_or("kmem_cache_alloc failed")?;
        // SAFETY: a live object of QUANTUM bytes.
        unsafe { core::ptr::write_bytes(q.as_ptr(), i, QUANTUM) };
        quanta.push(q);
    }
    let alloc_ns = t.elapsed().as_nanos() as f64 / 64.0;
    let ctors = CTOR_CALLS.load(Relaxed) - ctor_before;
    n.say(format_args!(
        "  64 quanta allocated ({alloc_ns:.0} ns each): {} objects per {}-page slab, {} slabs, constructor ran {ctors} times",
        cache.objects_per_slab(),
        1 << cache.order(),
        cache.nr_slabs(),
    ));
    if ctors != cache.objects_per_slab() * cache.nr_slabs() {
        return Err("the constructor did not run exactly once per object of each new slab".into());
    }
    for (i, q) in quanta.iter().enumerate() {
        // SAFETY: each quantum is live and was filled with its index above.
        let ok = unsafe { std::slice::from_raw_parts(q.as_ptr(), QUANTUM) }
            .iter()
            .all(|&b| b == i as u8);
        if !ok {
            return Err(format!("quantum {i} did not read back what was written"));
        }
        // Return it constructed (zeroed), as the cache's contract asks.
        // SAFETY: as above; it is not used after the free.
        unsafe {
            core::ptr::write_bytes(q.as_ptr(), 0, QUANTUM);
            m.kmem_cache_free(cache, q.as_ptr());
        }
    }
    n.say(format_args!(
        "  all 64 read back what was written, and went back to the cache"
    ));
    for line in m
        .proc_slabinfo()
        .lines()
        .filter(|l| l.starts_with("quantum_ctor "))
    {
        n.say(format_args!("  | {line}"));
    }

    n.heading("kmalloc: every size class, and a large allocation");
    let mut ptrs = Vec::new();
    for size in [
        1usize, 8, 13, 64, 65, 100, 192, 300, 1000, 3000, 8192, 100_000,
    ] {
        let p = m
            .kmalloc(size, GFP_KERNEL)
            .ok_or_else(|| format!("kmalloc({size}) failed"))?;
        let ks = m.ksize(p.as_ptr());
        if ks < size {
            return Err(format!("ksize({size}) = {ks}"));
        }
        ptrs.push((size, ks, p));
    }
    let line: Vec<String> = ptrs.iter().map(|(s, k, _)| format!("{s}->{k}")).collect();
    n.say(format_args!("  kmalloc(size) -> ksize: {}", line.join(" ")));
    let info = m.proc_slabinfo();
    for l in info.lines().skip(2) {
        let active: usize = l[18..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if active > 0 && l.starts_with("kmalloc-") {
            n.say(format_args!("  | {l}"));
        }
    }
    for (_, _, p) in ptrs {
        // SAFETY: each pointer is a live kmalloc allocation, freed once.
        unsafe { m.kfree(p.as_ptr()) };
    }

    n.heading("Bad frees are reported, and change nothing");
    let _ = m.platform().take_log();
    let p = m.kmalloc(64, GFP_KERNEL).ok_or("kmalloc failed")?;
    // SAFETY: bad input on purpose: an object freed to the wrong cache, then a double free;
    // the allocator rejects both without touching memory.
    unsafe {
        m.kmem_cache_free(cache, p.as_ptr());
        m.kfree(p.as_ptr());
        m.kfree(p.as_ptr());
    }
    let report = m.platform().take_log();
    if report.len() < 2 {
        return Err("the bad frees were not reported".into());
    }
    for line in report.iter().filter(|l| l.starts_with("BUG")) {
        n.say(format_args!("  | {line}"));
    }
    m.validate()?;

    // SAFETY: every object was freed above; the cache is not used again.
    if !unsafe { m.kmem_cache_destroy(cache) } {
        return Err("kmem_cache_destroy found objects left".into());
    }
    Ok(())
}

/// vmalloc and a scatter/gather buffer: virtually contiguous memory from scattered pages.
pub fn vmalloc_tour(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    n.heading("vmalloc: 1 MiB, virtually contiguous, physically scattered");
    let size = 1 << 20;
    let p = m.vmalloc(size).ok_or("vmalloc failed")?;
    // SAFETY: a live vmalloc area of `size` bytes.
    let buf = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    if buf.iter().enumerate().any(|(i, &b)| b != (i % 251) as u8) {
        return Err("the vmalloc area did not read back what was written".into());
    }
    let pfns: Vec<u64> = (0..size / PAGE_SIZE)
        .filter_map(|i| m.vmalloc_to_pfn(buf[i * PAGE_SIZE..].as_ptr()).map(|f| f.0))
        .collect();
    let runs = 1 + pfns.windows(2).filter(|w| w[1] != w[0] + 1).count();
    n.say(format_args!(
        "  {} pages at {:p}: {} physically contiguous runs, read back intact",
        pfns.len(),
        p.as_ptr(),
        runs
    ));
    for line in m.proc_vmallocinfo().lines() {
        n.say(format_args!("  | {line}"));
    }
    // SAFETY: `p` is the live area allocated above, not used after this.
    unsafe { m.vfree(p.as_ptr()) };
    m.vmalloc_space().vm_unmap_aliases(m.vm_ctx());
    Ok(())
}
