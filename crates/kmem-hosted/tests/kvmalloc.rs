//! `kvmalloc`, `kvfree`, `kvrealloc` and the contiguous view of a scatter/gather buffer.

use kmem::addr::PAGE_SIZE;
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem::platform::PageProt;
use kmem_hosted::{Machine, MachineConfig};

const MIB: usize = 1 << 20;

fn machine() -> Machine {
    Machine::boot(MachineConfig::x86_64(128 << 20).with_cpus(2)).unwrap()
}

/// Takes every free page, then gives back every other one: no block above order 0 is left.
fn fragment(m: &Machine) -> Vec<&Page> {
    let mut all = Vec::new();
    // `__GFP_MEMALLOC` ignores the watermarks: the reserves are taken too.
    while let Some(p) = m.alloc_pages(GFP_ATOMIC | __GFP_MEMALLOC | __GFP_NOWARN, 0) {
        all.push(p);
    }
    all.sort_by_key(|p| m.page_to_pfn(p).0);
    let mut kept = Vec::new();
    for p in all {
        if m.page_to_pfn(p).0 % 2 == 0 {
            // SAFETY: allocated above at order 0, not used again.
            unsafe { m.__free_pages(p, 0) };
        } else {
            kept.push(p);
        }
    }
    m.drain_all_pages();
    kept
}

fn unfragment(m: &Machine, kept: Vec<&Page>) {
    for p in kept {
        // SAFETY: allocated by `fragment` at order 0, not used again.
        unsafe { m.__free_pages(p, 0) };
    }
}

fn settle(m: &Machine) {
    m.vmalloc_space().vm_unmap_aliases(m.vm_ctx());
    let mut caches = Vec::new();
    m.slab()
        .for_each_cache(|c| caches.push(c as *const kmem::slab::KmemCache));
    for c in caches {
        // SAFETY: the machine's caches live as long as it does.
        m.kmem_cache_shrink(unsafe { &*c });
    }
    m.drain_all_pages();
}

#[test]
fn small_requests_come_from_kmalloc_and_never_fall_back() {
    let m = machine();
    let p = m.kvmalloc(100, GFP_KERNEL).unwrap();
    assert!(!m.is_vmalloc_addr(p.as_ptr()));
    assert_eq!(m.kvsize(p.as_ptr()), 128);
    // SAFETY: a live kvmalloc allocation, freed once.
    unsafe { m.kvfree(p.as_ptr()) };
    let kept = fragment(&m);
    // With only order-0 blocks free: a page is still kmalloc's (a one-page slab), two pages
    // (kmalloc-8k needs an order-1 slab at least) go to vmalloc.
    let a = m.kvmalloc(PAGE_SIZE, GFP_KERNEL).unwrap();
    assert!(!m.is_vmalloc_addr(a.as_ptr()));
    let b = m.kvmalloc(2 * PAGE_SIZE, GFP_KERNEL).unwrap();
    assert!(m.is_vmalloc_addr(b.as_ptr()));
    // SAFETY: both live, each freed once.
    unsafe {
        m.kvfree(a.as_ptr());
        m.kvfree(b.as_ptr());
    }
    unfragment(&m, kept);
}

#[test]
fn large_requests_fall_back_to_vmalloc_when_fragmented() {
    let m = machine();
    let free0 = m.boot_free_pages();
    // Unfragmented: 1 MiB is a large kmalloc (an order-8 block).
    let p = m.kvmalloc(MIB, GFP_KERNEL).unwrap();
    assert!(!m.is_vmalloc_addr(p.as_ptr()));
    assert!(m.virt_addr_valid(p.as_ptr()));
    // SAFETY: live, freed once.
    unsafe { m.kvfree(p.as_ptr()) };
    // Above KMALLOC_MAX_SIZE: vmalloc, silently.
    let _ = m.platform().take_log();
    let p = m.kvmalloc(8 * MIB, GFP_KERNEL).unwrap();
    assert!(m.is_vmalloc_addr(p.as_ptr()));
    assert_eq!(m.kvsize(p.as_ptr()), 8 * MIB);
    // SAFETY: live, freed once.
    unsafe { m.kvfree(p.as_ptr()) };
    // Fragmented: no order-8 block, so vmalloc serves 1 MiB; no failure report from the
    // quiet kmalloc attempt.
    let kept = fragment(&m);
    let p = m.kvzalloc(MIB, GFP_KERNEL).unwrap();
    assert!(m.is_vmalloc_addr(p.as_ptr()));
    // SAFETY: a live zeroed area of 1 MiB.
    let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), MIB) };
    assert!(s.iter().all(|&b| b == 0));
    assert!(
        !m.platform().log_contains("page allocation failure"),
        "{:?}",
        m.platform().take_log()
    );
    // Non-sleeping requests do not fall back.
    assert!(m.kvmalloc(MIB, GFP_ATOMIC | __GFP_NOWARN).is_none());
    // SAFETY: live, freed once.
    unsafe { m.kvfree(p.as_ptr()) };
    unfragment(&m, kept);
    settle(&m);
    assert_eq!(m.nr_free_pages(), free0);
    m.validate().unwrap();
}

#[test]
fn kvrealloc_moves_between_kmalloc_and_vmalloc_keeping_contents() {
    let m = machine();
    let free0 = m.boot_free_pages();
    let p = m.kvmalloc(3000, GFP_KERNEL).unwrap();
    // SAFETY: live allocation of at least 3000 bytes.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5a, 3000) };
    // Shrinks in place.
    // SAFETY: `p` is a live kvmalloc allocation.
    let q = unsafe { m.kvrealloc(p.as_ptr(), 2000, GFP_KERNEL) }.unwrap();
    assert_eq!(q, p);
    // Grows past KMALLOC_MAX_SIZE: moves into vmalloc, contents kept.
    // SAFETY: `q` is a live kvmalloc allocation.
    let r = unsafe { m.kvrealloc(q.as_ptr(), 6 * MIB, GFP_KERNEL) }.unwrap();
    assert!(m.is_vmalloc_addr(r.as_ptr()));
    // SAFETY: `r` is live and at least 6 MiB.
    let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), 6 * MIB) };
    assert!(s[..2000].iter().all(|&b| b == 0x5a));
    s[6 * MIB - 1] = 7;
    // And back down into kmalloc.
    // SAFETY: `r` is a live kvmalloc allocation.
    let t = unsafe { m.kvrealloc(r.as_ptr(), 100, GFP_KERNEL) }.unwrap();
    assert!(!m.is_vmalloc_addr(t.as_ptr()));
    // SAFETY: `t` is live and at least 100 bytes.
    let head = unsafe { std::slice::from_raw_parts(t.as_ptr(), 100) };
    assert!(head.iter().all(|&b| b == 0x5a));
    // SAFETY: live, freed once.
    unsafe { m.kvfree(t.as_ptr()) };
    settle(&m);
    assert_eq!(m.nr_free_pages(), free0);
}

#[test]
fn sg_buffer_reads_as_one_slice_through_vmap() {
    let m = machine();
    let free0 = m.boot_free_pages();
    let kept = fragment(&m);
    let size = 4 * MIB;
    let table = kmem::sg::sg_alloc_buffer(&m, size, GFP_KERNEL).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
    // SAFETY: the table's pages belong to the buffer we own.
    unsafe { kmem::sg::sg_copy_from_buffer(&m, &table, &data) };
    let view = m.sg_vmap(&table, PageProt::KERNEL).unwrap();
    assert!(m.is_vmalloc_addr(view.as_ptr()));
    // SAFETY: the view maps the buffer's `size` bytes.
    let s = unsafe { std::slice::from_raw_parts(view.as_ptr(), size) };
    assert!(
        s == &data[..],
        "the contiguous view reads what was copied in"
    );
    // SAFETY: the view was made by sg_vmap and is not used again.
    unsafe { m.vunmap(view.as_ptr()) };
    // SAFETY: the buffer came from sg_alloc_buffer and is not used again.
    unsafe { kmem::sg::sg_free_buffer(&m, table) };
    unfragment(&m, kept);
    settle(&m);
    assert_eq!(m.nr_free_pages(), free0);
    m.validate().unwrap();
}
