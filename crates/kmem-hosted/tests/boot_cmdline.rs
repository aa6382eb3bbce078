//! Machines booted with a kernel command line: the parameters reach the allocators, and the
//! log says what a kernel would.

use kmem::gfp::*;
use kmem::platform::Platform;
use kmem_hosted::{Machine, MachineConfig};

fn boot(cfg: MachineConfig, cmdline: &str) -> Machine {
    Machine::boot(cfg.with_cmdline(cmdline).unwrap()).unwrap()
}

fn meminfo_kb(m: &Machine, field: &str) -> u64 {
    let text = m.proc_meminfo();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn mem_limits_memtotal_and_the_log_comes_first() {
    let full = Machine::boot_default().unwrap();
    let m = boot(MachineConfig::default(), "mem=1G foo=1");
    let total = meminfo_kb(&m, "MemTotal");
    assert!(total < 1 << 20, "{total} kB under mem=1G");
    assert!(total > 900 << 10, "{total} kB");
    assert!(meminfo_kb(&full, "MemTotal") > 3 << 20);
    let log = m.platform().take_log();
    assert_eq!(log[0], "Kernel command line: mem=1G foo=1");
    assert!(log.contains(
        &"Unknown kernel command line parameters \"foo=1\", will be passed to user space.".into()
    ));
    m.validate().unwrap();
}

#[test]
fn memmap_reserved_range_is_a_hole() {
    let cfg = MachineConfig::x86_64(512 << 20);
    let plain = Machine::boot(cfg.clone()).unwrap();
    let m = boot(cfg, "memmap=64M$256M");
    let lost = meminfo_kb(&plain, "MemTotal") - meminfo_kb(&m, "MemTotal");
    assert!(lost >= 64 << 10, "{lost} kB");
    assert!(
        lost < 66 << 10,
        "{lost} kB (plus at most a little of mem_map)"
    );
    // No page of the reserved range is ever handed out.
    let pfns = (256u64 << 20 >> 12)..(320u64 << 20 >> 12);
    let mut got = Vec::new();
    while let Some(p) = m.alloc_pages(GFP_KERNEL | __GFP_NOWARN | __GFP_NORETRY, 0) {
        assert!(!pfns.contains(&m.page_to_pfn(p).0));
        got.push(p);
    }
    for p in got {
        // SAFETY: allocated above, not used.
        unsafe { m.__free_pages(p, 0) };
    }
}

#[test]
fn cpus_vmalloc_and_merging() {
    let m = boot(
        MachineConfig::x86_64(256 << 20).with_cpus(4),
        "nr_cpus=2 vmalloc=64M slab_nomerge",
    );
    assert_eq!(m.platform().nr_cpu_ids(), 2);
    assert_eq!(meminfo_kb(&m, "VmallocTotal"), 64 << 10);
    let a = m
        .kmem_cache_create("merge_a", 96, 0, kmem::slab::SlabFlags::NONE, None)
        .unwrap();
    let b = m
        .kmem_cache_create("merge_b", 96, 0, kmem::slab::SlabFlags::NONE, None)
        .unwrap();
    assert!(!std::ptr::eq(a, b), "slab_nomerge: two caches");
    // SAFETY: empty caches, not used again.
    unsafe {
        assert!(m.kmem_cache_destroy(a));
        assert!(m.kmem_cache_destroy(b));
    }
}

#[test]
fn init_on_free_zeroes_freed_pages() {
    let m = boot(MachineConfig::x86_64(64 << 20), "init_on_free=1");
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    let va = m.page_address(p).unwrap();
    // SAFETY: a live order-0 page; written, freed, then only read through the direct map,
    // which stays mapped.
    unsafe {
        va.as_ptr().write_bytes(0xa5, 4096);
        m.__free_pages(p, 0);
        assert!(
            std::slice::from_raw_parts(va.as_ptr(), 4096)
                .iter()
                .all(|&b| b == 0)
        );
    }
}

#[test]
fn failslab_from_the_command_line() {
    let m = boot(MachineConfig::x86_64(64 << 20), "failslab=1,100,0,2");
    assert!(m.kmalloc(128, GFP_ATOMIC).is_none());
    assert!(m.kmalloc(128, GFP_ATOMIC).is_none());
    let p = m.kmalloc(128, GFP_ATOMIC).expect("times=2 used up");
    // SAFETY: live, not used again.
    unsafe { m.kfree(p.as_ptr()) };
    assert_eq!(m.faults().failslab.attr.injected(), 2);
}

#[test]
fn kmem_reserve_from_the_command_line() {
    let m = boot(MachineConfig::x86_64(256 << 20), "kmem_reserve=fb:8M@2M");
    let b = m.boot_buffer("fb").unwrap();
    assert_eq!(b.size, 8 << 20);
    assert_eq!(b.phys.0 % (2 << 20), 0);
}
