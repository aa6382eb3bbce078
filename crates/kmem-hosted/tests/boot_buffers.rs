//! Buffers reserved at boot (`MachineConfig::boot_buffers`, `kmem_reserve=` on a kernel
//! command line): physically contiguous, direct-mapped, larger than any buddy block, kept
//! out of the page allocator (reserved in memblock, not in `MemTotal`), and intact however
//! hard the allocators are churned.

mod common;
use common::boot;

use kmem::addr::{MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE, Pfn, VirtAddr};
use kmem::cmdline;
use kmem::gfp::*;
use kmem::page_alloc::page::{Page, pg};
use kmem_hosted::machine::BootBuffer;
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The `MemTotal:` figure of `/proc/meminfo`, in kB.
fn mem_total_kb(m: &Machine) -> u64 {
    let info = m.proc_meminfo();
    let line = info
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .expect("MemTotal line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The buffer's bytes.
fn bytes(b: &BootBuffer) -> &[u8] {
    // SAFETY: a boot buffer is `size` bytes of direct-mapped memory reserved for the whole
    // machine's life; this test is its only user and does not write it while reading.
    unsafe { std::slice::from_raw_parts(b.as_ptr(), b.size) }
}

/// Writes `f(i)` to byte `i` of the buffer.
fn fill(b: &BootBuffer, f: impl Fn(usize) -> u8) {
    for i in 0..b.size {
        // SAFETY: `i < size`: inside the buffer, which this test alone uses.
        unsafe { b.as_ptr().add(i).write(f(i)) };
    }
}

fn pattern(i: usize) -> u8 {
    (i as u8) ^ ((i >> 8) as u8).wrapping_mul(31) ^ ((i >> 16) as u8).wrapping_mul(7)
}

/// The buffer is one physically contiguous, direct-mapped, reserved range.
fn check_contiguous_reserved(m: &Machine, b: &BootBuffer) {
    assert!(b.phys.is_page_aligned());
    for (i, pfn) in b.pfns().enumerate() {
        let page = m.pfn_to_page(Pfn(pfn)).expect("frame in RAM");
        assert_ne!(page.state() & pg::RESERVED, 0, "frame {pfn:#x} is reserved");
        assert_eq!(
            m.page_address(page),
            Some(VirtAddr(b.virt.0 + (i << PAGE_SHIFT))),
            "frame {pfn:#x} sits in the direct map, right after the previous one"
        );
    }
    let mb = m.memblock();
    assert!(mb.is_region_memory(b.phys.0, b.size as u64));
    assert!(mb.is_region_reserved(b.phys.0, b.size as u64));
    // Wholly inside one reserved region.
    assert!(
        mb.reserved()
            .as_slice()
            .iter()
            .any(|r| r.base <= b.phys.0 && b.phys.0 + b.size as u64 <= r.end()),
        "one reserved region covers the buffer"
    );
}

/// Allocates everything it can in blocks of every order and in kmalloc objects, writes
/// every byte it got, checks none of it lies in `avoid` (a frame range), frees it all.
/// Returns the bytes written.
fn churn(m: &Machine, avoid: std::ops::Range<u64>, round: usize) -> usize {
    let gfp = GFP_NOWAIT | __GFP_NOWARN;
    let mut written = 0;
    let mut pages: Vec<(&Page, u32)> = Vec::new();
    let mut objs: Vec<*mut u8> = Vec::new();
    let mut i = 0usize;
    loop {
        i += 1;
        let order = ((i * 7 + round) % (MAX_PAGE_ORDER as usize + 1)) as u32;
        let got_page = match m.alloc_pages(gfp, order) {
            Some(p) => {
                let pfn = m.page_to_pfn(p).0;
                let end = pfn + (1 << order);
                assert!(
                    end <= avoid.start || pfn >= avoid.end,
                    "allocation inside the boot buffer"
                );
                let va = m
                    .page_address(p)
                    .expect("x86_64: all memory is direct-mapped");
                let len = PAGE_SIZE << order;
                // SAFETY: the block was just allocated by this test, `len` bytes.
                unsafe { std::ptr::write_bytes(va.as_ptr(), 0xa5 ^ round as u8, len) };
                written += len;
                pages.push((p, order));
                true
            }
            None => false,
        };
        let size = [8, 96, 192, 1000, 4096, 8192, 20000][i % 7];
        let got_obj = match m.kmalloc(size, gfp) {
            Some(o) => {
                let pfn = m
                    .virt_to_page(VirtAddr(o.as_ptr() as usize))
                    .map(|p| m.page_to_pfn(p).0);
                assert!(pfn.is_some_and(|pfn| !avoid.contains(&pfn)));
                // SAFETY: a fresh kmalloc object of at least `size` bytes.
                unsafe { std::ptr::write_bytes(o.as_ptr(), 0x5a, size) };
                written += size;
                objs.push(o.as_ptr());
                true
            }
            None => false,
        };
        if !got_page && !got_obj && order == 0 {
            break;
        }
    }
    // Free in an interleaved order, to make the buddy allocator merge hard.
    for (k, (p, order)) in pages.iter().enumerate() {
        if k % 2 == round % 2 {
            // SAFETY: the test's own allocation of `order`.
            unsafe { m.__free_pages(p, *order) };
        }
    }
    for o in objs {
        // SAFETY: the test's own kmalloc object.
        unsafe { m.kfree(o) };
    }
    for (k, (p, order)) in pages.iter().enumerate() {
        if k % 2 != round % 2 {
            // SAFETY: the test's own allocation of `order`.
            unsafe { m.__free_pages(p, *order) };
        }
    }
    written
}

/// A 64 MiB buffer (16 times the largest buddy block) on a 256 MiB machine: contiguous,
/// direct-mapped, reserved in memblock; `MemTotal` is smaller by exactly its pages; its
/// contents survive the allocators being churned through all of memory.
#[test]
fn reservation_larger_than_any_block_survives_churn() {
    let size = 64 * MIB;
    let plain = boot(MachineConfig::x86_64(256 * MIB));
    let m = boot(MachineConfig::x86_64(256 * MIB).with_boot_buffer("fb", size, 2 * MIB));
    let b = m.boot_buffer("fb").expect("reserved");
    assert_eq!(b.size as u64, size);
    assert!(
        size > (PAGE_SIZE as u64) << MAX_PAGE_ORDER,
        "more than a buddy block"
    );
    assert_eq!(b.phys.0 % (2 * MIB), 0, "aligned as asked");
    check_contiguous_reserved(&m, &b);
    assert!(
        m.boot_buffer("other").is_none(),
        "nothing is reserved after boot"
    );
    assert_eq!(m.boot_buffers().count(), 1);

    // Accounting: exactly the buffer's pages are missing from the page allocator.
    let pages = (size as usize) / PAGE_SIZE;
    assert_eq!(plain.totalram_pages() - m.totalram_pages(), pages);
    assert_eq!(mem_total_kb(&plain) - mem_total_kb(&m), size / 1024);
    assert_eq!(
        m.memblock().reserved_size() - plain.memblock().reserved_size(),
        size,
        "memblock holds the reservation"
    );

    // Fill with a pattern, churn, verify.
    fill(&b, pattern);
    let mut written = 0;
    for round in 0..3 {
        written += churn(&m, b.pfns(), round);
        m.drain_all_pages();
        m.validate().expect("allocator consistent");
    }
    assert!(
        written as u64 > 3 * 150 * MIB,
        "the churn went through memory: {written} bytes"
    );
    let buf = bytes(&b);
    let bad = buf
        .iter()
        .enumerate()
        .filter(|&(i, &x)| x != pattern(i))
        .count();
    assert_eq!(bad, 0, "the boot buffer is intact");
    check_contiguous_reserved(&m, &b);
    // Nothing leaked: the machine is back at its boot figure.
    for i in 1..kmem::kmalloc::NR_KMALLOC_INDEX {
        if let Some(c) = m
            .kmalloc_caches()
            .cache(kmem::kmalloc::KmallocType::Normal, i)
        {
            m.kmem_cache_shrink(c);
        }
    }
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), m.boot_free_pages());
}

/// On x86_32 the buffer goes below the 896 MiB low-memory limit, so it is in the direct map
/// even on a machine whose memory is mostly HighMem.
#[test]
fn reservation_on_x86_32_is_below_the_lowmem_limit() {
    let m = boot(MachineConfig::x86_32(2 * GIB).with_boot_buffer("dma", 64 * MIB, 0));
    let b = m.boot_buffer("dma").unwrap();
    assert!(b.phys.0 + 64 * MIB <= 896 * MIB);
    check_contiguous_reserved(&m, &b);
    fill(&b, |_| 0x77);
    assert!(bytes(&b).iter().all(|&x| x == 0x77));
}

/// Reservations come from a command line (`kmem_reserve=`), several at once, disjoint; an
/// impossible one is reported and skipped, and the machine boots without it.
#[test]
fn reservations_from_a_command_line() {
    let line = "quiet kmem_reserve=fb:32M@4M kmem-reserve=ring:100K kmem_reserve=huge:1G \
                kmem_reserve=fb:1M";
    let mut cfg = MachineConfig::x86_64(256 * MIB);
    for r in cmdline::reserves(line) {
        let (name, size, align) = r.expect("well formed");
        cfg = cfg.with_boot_buffer(name, size, align);
    }
    let m = Machine::boot(cfg).expect("boots even though a reservation cannot be made");
    let log = m.platform().take_log();
    let fb = m.boot_buffer("fb").unwrap();
    let ring = m.boot_buffer("ring").unwrap();
    assert_eq!(fb.size as u64, 32 * MIB);
    assert_eq!(fb.phys.0 % (4 * MIB), 0);
    assert_eq!(
        ring.size,
        100 * 1024,
        "the size asked for; the reservation is 25 pages"
    );
    assert_eq!(ring.pfns().count(), 25);
    check_contiguous_reserved(&m, &fb);
    check_contiguous_reserved(&m, &ring);
    let (f, r) = (fb.pfns(), ring.pfns());
    assert!(f.end <= r.start || r.end <= f.start, "disjoint");
    assert!(m.boot_buffer("huge").is_none());
    assert_eq!(m.boot_buffers().count(), 2);
    let line_of = |s: &str| {
        log.iter()
            .find(|l| l.contains(s))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        line_of("kmem_reserve: huge").contains("cannot reserve 0x40000000 bytes"),
        "{log:?}"
    );
    assert!(line_of("kmem_reserve: fb: cannot").contains("the name is already reserved"));
    assert!(line_of("kmem_reserve: ring: reserved").contains("0x19000 bytes"));

    // A malformed command line is refused with a clear message.
    let err = cmdline::reserves("kmem_reserve=fb:64MB")
        .next()
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "size \"64MB\": unexpected \"B\" after the number (a size takes one suffix of K, M, G, T, P or E)"
    );
}
