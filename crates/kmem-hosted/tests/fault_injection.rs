//! Fault injection (`failslab=`, `fail_page_alloc=`): the hooks fail what Linux's would, spare
//! what Linux's filters spare, report as Linux does, and leave the allocators consistent.

use kmem::fault::FaultParams;
use kmem::gfp::*;
use kmem_hosted::{Machine, MachineConfig};

fn machine(failslab: FaultParams, fail_page_alloc: FaultParams) -> Machine {
    let mut cfg = MachineConfig::x86_64(256 << 20).with_cpus(2);
    cfg.kmem.failslab = failslab;
    cfg.kmem.fail_page_alloc = fail_page_alloc;
    let m = Machine::boot(cfg).unwrap();
    m.platform().take_log();
    m
}

const ALWAYS: FaultParams = FaultParams {
    interval: 1,
    probability: 100,
    space: 0,
    times: -1,
};

#[test]
fn disabled_by_default() {
    let m = Machine::boot(MachineConfig::x86_64(256 << 20)).unwrap();
    assert!(!m.faults().failslab.attr.armed());
    assert!(!m.faults().fail_page_alloc.attr.armed());
    let p = m.kmalloc(64, GFP_ATOMIC).expect("no injection by default");
    // SAFETY: just allocated, not used again.
    unsafe { m.kfree(p.as_ptr()) };
    let pg = m
        .alloc_pages(GFP_ATOMIC, 2)
        .expect("no injection by default");
    // SAFETY: as above.
    unsafe { m.__free_pages(pg, 2) };
}

#[test]
fn failslab_fails_atomic_slab_allocations_times_times() {
    let m = machine(FaultParams { times: 3, ..ALWAYS }, FaultParams::DISABLED);
    // ignore-gfp-wait (on by default): requests that may sleep are spared.
    let k = m.kmalloc(64, GFP_KERNEL).expect("GFP_KERNEL is spared");
    assert_eq!(m.faults().failslab.attr.injected(), 0);
    for i in 0..3 {
        assert!(m.kmalloc(64, GFP_ATOMIC).is_none(), "failure {i}");
    }
    assert_eq!(m.faults().failslab.attr.injected(), 3);
    assert!(!m.faults().failslab.attr.armed(), "times used up");
    let a = m.kmalloc(64, GFP_ATOMIC).expect("times exhausted");
    let log = m.platform().take_log();
    assert_eq!(
        log.iter()
            .filter(|l| *l == "FAULT_INJECTION: forcing a failure.")
            .count(),
        3,
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l == "name failslab, interval 1, probability 100, space 0, times 0"),
        "{log:#?}"
    );
    // SAFETY: both live, not used again.
    unsafe {
        m.kfree(k.as_ptr());
        m.kfree(a.as_ptr());
    }
    m.validate().unwrap();
}

#[test]
fn failslab_respects_nofail_nowarn_and_caches() {
    let m = machine(ALWAYS, FaultParams::DISABLED);
    let p = m
        .kmalloc(32, GFP_ATOMIC | __GFP_NOFAIL)
        .expect("__GFP_NOFAIL is never failed");
    assert!(m.kmalloc(32, GFP_ATOMIC | __GFP_NOWARN).is_none());
    assert!(
        !m.platform().log_contains("FAULT_INJECTION"),
        "__GFP_NOWARN fails silently"
    );
    let c = m
        .kmem_cache_create("fi_test", 100, 0, kmem::slab::SlabFlags::NONE, None)
        .unwrap();
    assert!(m.kmem_cache_alloc(c, GFP_NOWAIT).is_none());
    assert!(m.platform().log_contains("name failslab"));
    // The page allocator is not failslab's business.
    let pg = m.alloc_pages(GFP_ATOMIC, 1).expect("pages are not slab");
    // Large kmalloc comes from the page allocator, so failslab does not see it either.
    let big = m
        .kmalloc(64 << 10, GFP_ATOMIC)
        .expect("large kmalloc is pages");
    m.faults().failslab.set_ignore_gfp_reclaim(false);
    assert!(
        m.kmalloc(32, GFP_KERNEL).is_none(),
        "ignore-gfp-wait off: GFP_KERNEL fails too"
    );
    // SAFETY: all live, not used again.
    unsafe {
        m.kfree(p.as_ptr());
        m.kfree(big.as_ptr());
        m.__free_pages(pg, 1);
        assert!(m.kmem_cache_destroy(c));
    }
    m.validate().unwrap();
}

#[test]
fn fail_page_alloc_filters_as_linux() {
    let m = machine(FaultParams::DISABLED, ALWAYS);
    let (ignore_wait, ignore_highmem, min_order) = m.faults().fail_page_alloc.filters();
    assert!(ignore_wait && ignore_highmem);
    assert_eq!(min_order, 1);
    let p0 = m
        .alloc_pages(GFP_ATOMIC, 0)
        .expect("order 0 is below min-order");
    let pk = m.alloc_pages(GFP_KERNEL, 2).expect("may sleep: spared");
    let ph = m
        .alloc_pages(GFP_ATOMIC | __GFP_HIGHMEM, 2)
        .expect("__GFP_HIGHMEM: spared");
    let pn = m
        .alloc_pages(GFP_ATOMIC | __GFP_NOFAIL, 2)
        .expect("__GFP_NOFAIL: spared");
    assert_eq!(m.faults().fail_page_alloc.attr.injected(), 0);
    let failures_before = m.alloc_failures();
    assert!(m.alloc_pages(GFP_ATOMIC, 1).is_none());
    assert!(m.alloc_pages(GFP_NOWAIT, 3).is_none());
    assert_eq!(m.faults().fail_page_alloc.attr.injected(), 2);
    assert!(m.platform().log_contains("name fail_page_alloc"));
    assert!(
        !m.platform().log_contains("page allocation failure"),
        "an injected failure returns before the allocator reports anything"
    );
    assert_eq!(m.alloc_failures(), failures_before);
    m.faults().fail_page_alloc.set_min_order(0);
    m.faults().fail_page_alloc.set_ignore_gfp_reclaim(false);
    assert!(m.alloc_pages(GFP_KERNEL, 0).is_none());
    m.faults()
        .fail_page_alloc
        .attr
        .configure(FaultParams::DISABLED);
    // SAFETY: all live, not used again.
    unsafe {
        m.__free_pages(p0, 0);
        m.__free_pages(pk, 2);
        m.__free_pages(ph, 2);
        m.__free_pages(pn, 2);
    }
    m.validate().unwrap();
}

#[test]
fn fail_page_alloc_reaches_slab_growth() {
    let m = machine(FaultParams::DISABLED, FaultParams::DISABLED);
    let c = m
        .kmem_cache_create("fi_grow", 512, 0, kmem::slab::SlabFlags::NONE, None)
        .unwrap();
    let fpa = &m.faults().fail_page_alloc;
    fpa.set_min_order(0);
    fpa.set_ignore_gfp_reclaim(false);
    fpa.attr.configure(ALWAYS);
    assert!(
        m.kmem_cache_alloc(c, GFP_KERNEL).is_none(),
        "an empty cache needs a slab, and the slab's pages fail"
    );
    fpa.attr.configure(FaultParams::DISABLED);
    let o = m.kmem_cache_alloc(c, GFP_KERNEL).unwrap();
    // SAFETY: live, not used again; then no objects remain.
    unsafe {
        m.kmem_cache_free(c, o.as_ptr());
        assert!(m.kmem_cache_destroy(c));
    }
    m.validate().unwrap();
}

#[test]
fn interval_and_space_over_kmalloc() {
    let m = machine(
        FaultParams {
            interval: 4,
            probability: 100,
            space: 200,
            times: -1,
        },
        FaultParams::DISABLED,
    );
    // 64-byte objects: 200 > 64, 136 > 64, 72 > 64 pass on space; then every 4th fails.
    let results: Vec<bool> = (0..11)
        .map(|_| {
            let p = m.kmalloc(64, GFP_ATOMIC);
            if let Some(p) = p {
                // SAFETY: just allocated, not used again.
                unsafe { m.kfree(p.as_ptr()) };
            }
            p.is_none()
        })
        .collect();
    assert_eq!(
        results,
        [
            false, false, false, // space
            false, false, false, true, // interval 4
            false, false, false, true,
        ]
    );
}
