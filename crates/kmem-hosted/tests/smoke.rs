//! Smoke tests: the default and an x86_32 machine boot, allocate and report.
use kmem::gfp::*;
use kmem_hosted::{Machine, MachineConfig};

#[test]
fn default_machine_boots_and_allocates() {
    let m = Machine::boot_default().unwrap();
    for l in m.platform().take_log() {
        println!("{l}");
    }
    let free0 = m.nr_free_pages();
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    let va = m.page_address(p).unwrap();
    // SAFETY: `p` is a live order-0 allocation and `va` its direct-map address.
    unsafe { va.as_ptr().write_bytes(0xab, 4096) };
    // SAFETY: `p` was allocated above at order 0 and is not used again.
    unsafe { m.__free_pages(p, 0) };
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), free0);
    m.check_free_lists().unwrap();
    print!("{}", m.proc_buddyinfo());
    print!("{}", m.proc_meminfo());
    print!("{}", m.proc_zoneinfo());
}

#[test]
fn x86_32_highmem() {
    let m = Machine::boot(MachineConfig::x86_32(2 << 30)).unwrap();
    for l in m.platform().take_log() {
        println!("{l}");
    }
    let p = m.alloc_pages(GFP_HIGHUSER | __GFP_ZERO, 0).unwrap();
    assert!(m.page_address(p).is_none());
    let va = m.kmap(p);
    // SAFETY: `va` is the kmap of the live page `p`.
    unsafe { assert_eq!(*va.as_ptr(), 0) };
    m.kunmap(p);
    // SAFETY: `p` was allocated above at order 0 and is not used again.
    unsafe { m.__free_pages(p, 0) };
    print!("{}", m.proc_meminfo());
}
