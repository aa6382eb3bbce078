//! Scatter/gather tables and large buffers (`kmem::sg`) on simulated machines: table layout
//! and chaining, merging contiguous pages, copies through `kmap` for HighMem, and
//! `sg_alloc_buffer` on unfragmented and fragmented memory, down to the exact boot accounting.

mod common;
use common::{areas, boot, shrink_kmalloc};

use kmem::addr::{MAX_PAGE_ORDER, NR_PAGE_ORDERS, PAGE_SIZE, Pfn, get_order};
use kmem::gfp::*;
use kmem::page_alloc::page::Page;
use kmem::sg::*;
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

/// xorshift64*: reproducible pseudo-random bytes without a dependency.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        v.extend_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Everything freed: the machine is exactly as boot left it, with no bad free and no kmap
/// left.
fn assert_back_to_boot(m: &Machine, boot_areas: &[[usize; NR_PAGE_ORDERS]]) {
    common::assert_back_to_boot(m, boot_areas);
    assert_eq!(m.bad_page_reports(), 0, "no bad free");
    assert_eq!(m.kmap_slots_in_use(), 0, "every kmap was undone");
}

/// Free blocks of order `>= order` over all zones.
fn blocks_at_least(m: &Machine, order: usize) -> usize {
    areas(m)
        .iter()
        .map(|z| z[order..].iter().sum::<usize>())
        .sum()
}

/// `(pfn, offset, length)` of every entry.
fn entries(t: &SgTable) -> Vec<(u64, usize, usize)> {
    t.iter()
        .map(|sg| (sg.pfn().0, sg.offset(), sg.length()))
        .collect()
}

/// Checks a buffer's shape: blocks at offset 0, aligned to their order, lengths adding up.
fn check_buffer_shape(m: &Machine, t: &SgTable, size: usize) {
    assert_eq!(t.total_length(), size);
    assert_eq!(sg_nents(t), t.nents());
    let n = t.nents();
    for (i, sg) in t.iter().enumerate() {
        assert_eq!(sg.offset(), 0);
        let order = get_order(sg.length());
        assert!(order <= MAX_PAGE_ORDER);
        if i + 1 < n {
            assert_eq!(
                sg.length(),
                PAGE_SIZE << order,
                "only the last entry is partial"
            );
        }
        assert_eq!(
            sg.pfn().0 % (1 << order),
            0,
            "a buddy block is aligned to its order"
        );
        let page = sg_page(m, sg).expect("entry in RAM");
        assert_eq!(page.order(), order, "the entry is one block of its order");
        assert_eq!(sg.is_last(), i + 1 == n);
    }
}

/// Writes random bytes into the table and reads them back.
fn round_trip(m: &Machine, t: &SgTable, seed: u64) {
    let size = t.total_length();
    let data = random_bytes(size, seed);
    // SAFETY: the table is a buffer (or pages) this test owns; nothing else touches it.
    let n = unsafe { sg_copy_from_buffer(m, t, &data) };
    assert_eq!(n, size);
    let mut back = vec![0u8; size];
    // SAFETY: as above.
    let n = unsafe { sg_copy_to_buffer(m, t, &mut back) };
    assert_eq!(n, size);
    assert!(back == data, "the bytes round-trip");
    // A window across entry boundaries, with skip.
    if size > 3 * PAGE_SIZE {
        let skip = PAGE_SIZE / 2 + 17;
        let mut w = vec![0u8; 2 * PAGE_SIZE + 5];
        // SAFETY: as above.
        let n = unsafe { sg_pcopy_to_buffer(m, t, &mut w, skip) };
        assert_eq!(n, w.len());
        assert!(w[..] == data[skip..skip + w.len()]);
    }
    // A buffer longer than the table copies only what the table holds.
    let mut long = vec![0u8; size + 100];
    // SAFETY: as above.
    assert_eq!(unsafe { sg_copy_to_buffer(m, t, &mut long) }, size);
    assert_eq!(m.kmap_slots_in_use(), 0);
}

/// Takes every free page of the machine as order-0 allocations (no watermark), then frees
/// the even frames: what is free is then single pages whose buddies are all held, so no free
/// block of order 1 or more remains. Returns the pages still held.
fn fragment(m: &Machine) -> Vec<&Page> {
    let gfp = GFP_ATOMIC | __GFP_MEMALLOC | __GFP_NOWARN;
    let mut all = Vec::new();
    while let Some(p) = m.alloc_pages(gfp, 0) {
        all.push(p);
    }
    m.drain_all_pages();
    assert_eq!(m.nr_free_pages(), 0, "everything is taken");
    let (even, odd): (Vec<&Page>, Vec<&Page>) =
        all.into_iter().partition(|p| m.page_to_pfn(p).0 % 2 == 0);
    for p in even {
        // SAFETY: an order-0 page allocated above, not used.
        unsafe { m.__free_pages(p, 0) };
    }
    m.drain_all_pages();
    odd
}

// ------------------------------------------------------------------------------ tables

/// `sg_alloc_table`: zeroed entries, the last marked; one kmalloc chunk for small tables,
/// a page for 256, chained pages beyond; freeing gives everything back.
#[test]
fn tables_of_every_shape_chain_and_free() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let boot_areas = areas(&m);
    assert!(sg_alloc_table(&m, 0, GFP_KERNEL).is_none());
    for n in [1, 2, 100, 255, 256, 257, 511, 512, 1000, 5000] {
        let mut t = sg_alloc_table(&m, n, GFP_KERNEL).expect("table");
        assert_eq!(t.nents(), n);
        assert_eq!(sg_nents(&t), n);
        assert_eq!(
            t.nr_chunks(),
            if n <= 256 { 1 } else { (n - 1).div_ceil(255) }
        );
        assert_eq!(t.total_length(), 0);
        assert!(t.iter().all(|sg| sg.length() == 0 && sg.pfn() == Pfn(0)));
        assert_eq!(t.iter().filter(|sg| sg.is_last()).count(), 1);
        // Every slot is distinct and writable.
        for (i, sg) in t.iter_mut().enumerate() {
            sg.set_pfn(Pfn(i as u64 * 3), i + 1, i % PAGE_SIZE);
        }
        for (i, sg) in t.iter().enumerate() {
            assert_eq!(
                (sg.pfn(), sg.length(), sg.offset()),
                (Pfn(i as u64 * 3), i + 1, i % PAGE_SIZE)
            );
        }
        assert!(
            t.iter().last().unwrap().is_last(),
            "set_pfn keeps the end mark"
        );
        assert_eq!(t.total_length(), n * (n + 1) / 2);
        assert_eq!(sg_nents_for_len(&t, 1), Some(1));
        assert_eq!(sg_nents_for_len(&t, n * (n + 1) / 2), Some(n));
        assert_eq!(sg_nents_for_len(&t, n * (n + 1) / 2 + 1), None);
        sg_free_table(&m, t);
    }
    assert_back_to_boot(&m, &boot_areas);
}

/// `sg_alloc_table_from_pages` merges physically contiguous neighbours, splits at
/// discontinuities and at `max_segment`, and honours offset and size.
#[test]
fn from_pages_merges_contiguous_pages() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let boot_areas = areas(&m);
    // Two order-3 blocks (8 contiguous pages each) and two single pages.
    let a = m.alloc_pages(GFP_KERNEL, 3).unwrap();
    let b = m.alloc_pages(GFP_KERNEL, 3).unwrap();
    let s1 = m.alloc_page(GFP_KERNEL).unwrap();
    let s2 = m.alloc_page(GFP_KERNEL).unwrap();
    let pa = m.page_to_pfn(a).0;
    let pb = m.page_to_pfn(b).0;
    let page = |pfn: u64| m.pfn_to_page(Pfn(pfn)).unwrap();
    let mut pages: Vec<&Page> = (0..8).map(|i| page(pa + i)).collect();
    pages.push(s1);
    pages.extend((0..8).map(|i| page(pb + i)));
    pages.push(s2);
    let contiguous = |x: u64, y: u64| y == x + 1;
    let ps1 = m.page_to_pfn(s1).0;
    // The expected runs, computed from the frame numbers.
    let pfns: Vec<u64> = pages.iter().map(|p| m.page_to_pfn(p).0).collect();
    let mut runs = vec![(pfns[0], 1usize)];
    for w in pfns.windows(2) {
        if contiguous(w[0], w[1]) {
            runs.last_mut().unwrap().1 += 1;
        } else {
            runs.push((w[1], 1));
        }
    }
    assert!(runs.len() <= 4 && runs.len() >= 2, "{runs:?}");
    let size = pages.len() * PAGE_SIZE;
    let t = sg_alloc_table_from_pages(&m, &pages, 0, size, GFP_KERNEL).unwrap();
    let want: Vec<_> = runs.iter().map(|&(p, n)| (p, 0, n * PAGE_SIZE)).collect();
    assert_eq!(entries(&t), want);
    assert_eq!(t.total_length(), size);
    round_trip(&m, &t, 1);
    sg_free_table(&m, t);

    // Offset into the first page, size ending inside the 8th page: only block `a` is used.
    let t = sg_alloc_table_from_pages(&m, &pages, 100, 7 * PAGE_SIZE, GFP_KERNEL).unwrap();
    assert_eq!(entries(&t), [(pa, 100, 7 * PAGE_SIZE)]);
    sg_free_table(&m, t);
    // An offset of whole pages skips them.
    let t = sg_alloc_table_from_pages(&m, &pages, 8 * PAGE_SIZE + 5, 10, GFP_KERNEL).unwrap();
    assert_eq!(entries(&t), [(ps1, 5, 10)]);
    sg_free_table(&m, t);
    // max_segment of 3 pages splits the 8-page runs 3 + 3 + 2.
    let t = sg_alloc_table_from_pages_segment(
        &m,
        &pages[..8],
        0,
        8 * PAGE_SIZE,
        3 * PAGE_SIZE,
        GFP_KERNEL,
    )
    .unwrap();
    assert_eq!(
        entries(&t),
        [
            (pa, 0, 3 * PAGE_SIZE),
            (pa + 3, 0, 3 * PAGE_SIZE),
            (pa + 6, 0, 2 * PAGE_SIZE)
        ]
    );
    sg_free_table(&m, t);
    // Bad ranges.
    assert!(sg_alloc_table_from_pages(&m, &pages, 0, 0, GFP_KERNEL).is_none());
    assert!(sg_alloc_table_from_pages(&m, &pages, 1, size, GFP_KERNEL).is_none());
    assert!(sg_alloc_table_from_pages(&m, &[], 0, 1, GFP_KERNEL).is_none());
    assert!(
        sg_alloc_table_from_pages_segment(&m, &pages, 0, size, PAGE_SIZE - 1, GFP_KERNEL).is_none()
    );

    // SAFETY: the test's own allocations, not used again.
    unsafe {
        m.__free_pages(a, 3);
        m.__free_pages(b, 3);
        m.__free_pages(s1, 0);
        m.__free_pages(s2, 0);
    }
    assert_back_to_boot(&m, &boot_areas);
}

/// 600 pages none of which is contiguous with the next: 600 entries over three chained
/// chunks, iterated in order, copied through.
#[test]
fn from_pages_long_table_is_chained() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let boot_areas = areas(&m);
    let blocks: Vec<&Page> = (0..600)
        .map(|_| m.alloc_pages(GFP_KERNEL, 1).unwrap())
        .collect();
    // The first page of each order-1 block: never contiguous with the next one's.
    let t = sg_alloc_table_from_pages(&m, &blocks, 0, 600 * PAGE_SIZE, GFP_KERNEL).unwrap();
    assert_eq!(t.nents(), 600);
    assert_eq!(t.nr_chunks(), 3);
    let got: Vec<u64> = t.iter().map(|sg| sg.pfn().0).collect();
    let want: Vec<u64> = blocks.iter().map(|p| m.page_to_pfn(p).0).collect();
    assert_eq!(got, want);
    round_trip(&m, &t, 2);
    sg_free_table(&m, t);
    for p in blocks {
        // SAFETY: the test's own order-1 allocation.
        unsafe { m.__free_pages(p, 1) };
    }
    assert_back_to_boot(&m, &boot_areas);
}

// ------------------------------------------------------------------------ large buffers

/// Unfragmented memory: the buffer takes the largest blocks, so few entries; sizes that are
/// not a power of two are covered exactly, without waste.
#[test]
fn buffer_on_unfragmented_machine_uses_the_highest_orders() {
    let m = boot(MachineConfig::x86_64(128 * MIB));
    let boot_areas = areas(&m);
    let free0 = m.nr_free_pages();
    let slab0 = m.slab().slab_pages().0 + m.slab().slab_pages().1;
    let size = 8 * MIB_USIZE;
    let t = sg_alloc_buffer(&m, size, GFP_KERNEL).expect("8 MiB");
    check_buffer_shape(&m, &t, size);
    assert_eq!(t.nents(), 2, "two order-10 blocks: {:?}", entries(&t));
    assert!(
        t.iter()
            .all(|sg| sg.length() == PAGE_SIZE << MAX_PAGE_ORDER)
    );
    round_trip(&m, &t, 3);
    // SAFETY: the buffer came from sg_alloc_buffer and is not used again.
    unsafe { sg_free_buffer(&m, t) };

    // 8 MiB + 12 KiB + 100 bytes: 2052 pages = 1024 + 1024 + 4, the last block partly used.
    let size = 8 * MIB_USIZE + 12 * 1024 + 100;
    let t = sg_alloc_buffer(&m, size, GFP_KERNEL).expect("odd size");
    check_buffer_shape(&m, &t, size);
    let lens: Vec<usize> = t.iter().map(|sg| sg.length()).collect();
    assert_eq!(lens, [4 * MIB_USIZE, 4 * MIB_USIZE, 12 * 1024 + 100]);
    let pages: usize = t.iter().map(|sg| 1 << get_order(sg.length())).sum();
    assert_eq!(pages, 2052, "exactly the pages covering the size");
    m.drain_all_pages();
    let (r, u) = m.slab().slab_pages();
    assert_eq!(
        free0 - m.nr_free_pages() - (r + u - slab0),
        2052,
        "the buffer takes 2052 pages, its entry array a kmalloc object"
    );
    round_trip(&m, &t, 4);
    // SAFETY: as above.
    unsafe { sg_free_buffer(&m, t) };

    // 7 pages: orders 2, 1, 0.
    let t = sg_alloc_buffer(&m, 7 * PAGE_SIZE, GFP_KERNEL).unwrap();
    let orders: Vec<u32> = t.iter().map(|sg| get_order(sg.length())).collect();
    assert_eq!(orders, [2, 1, 0]);
    // SAFETY: as above.
    unsafe { sg_free_buffer(&m, t) };

    // One byte: one page.
    let t = sg_alloc_buffer(&m, 1, GFP_KERNEL | __GFP_ZERO).unwrap();
    assert_eq!(entries(&t).len(), 1);
    let mut b = [0xffu8; 1];
    // SAFETY: as above.
    assert_eq!(unsafe { sg_copy_to_buffer(&m, &t, &mut b) }, 1);
    assert_eq!(b, [0], "__GFP_ZERO zeroes the blocks");
    // SAFETY: as above.
    unsafe { sg_free_buffer(&m, t) };
    assert!(sg_alloc_buffer(&m, 0, GFP_KERNEL).is_none());
    assert_back_to_boot(&m, &boot_areas);
}

/// The fragmented machine: every free page is a single page whose buddy is held, so
/// `alloc_pages` of any order above 0 fails, yet `sg_alloc_buffer` gets 8 MiB of order-0
/// pages; the bytes round-trip; freeing it all returns exactly the boot accounting.
#[test]
fn buffer_on_fragmented_machine_falls_back_to_order_0() {
    let m = boot(MachineConfig::x86_64(128 * MIB));
    let boot_areas = areas(&m);
    let held = fragment(&m);
    assert_eq!(
        blocks_at_least(&m, 1),
        0,
        "no free block of order 1 or more"
    );
    let free = m.nr_free_pages();
    assert!(
        free * PAGE_SIZE > 40 * MIB_USIZE,
        "about half the memory is free: {free} pages"
    );
    assert!(m.alloc_pages(GFP_NOWAIT | __GFP_NOWARN, 1).is_none());
    assert!(
        m.alloc_pages(GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN, 3)
            .is_none()
    );
    assert!(
        m.alloc_pages(
            GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN,
            get_order(8 * MIB_USIZE).min(MAX_PAGE_ORDER)
        )
        .is_none(),
        "a large contiguous allocation fails"
    );
    assert!(
        m.kmalloc(2 * PAGE_SIZE * 4, GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN)
            .is_none()
    );
    m.platform().take_log();

    let size = 8 * MIB_USIZE;
    let t = sg_alloc_buffer(&m, size, GFP_KERNEL).expect("8 MiB from single pages");
    check_buffer_shape(&m, &t, size);
    assert_eq!(t.nents(), size / PAGE_SIZE, "2048 order-0 entries");
    assert!(t.iter().all(|sg| sg.length() == PAGE_SIZE));
    assert_eq!(
        t.nr_chunks(),
        9,
        "2048 entries: 8 chained pages of 255 and 8 more"
    );
    let log = m.platform().take_log();
    assert!(
        !log.iter().any(|l| l.contains("page allocation failure")),
        "high-order attempts are __GFP_NOWARN: {log:?}"
    );
    round_trip(&m, &t, 5);
    // SAFETY: the buffer came from sg_alloc_buffer and is not used again.
    unsafe { sg_free_buffer(&m, t) };
    for p in held {
        // SAFETY: the pages `fragment` kept, order 0.
        unsafe { m.__free_pages(p, 0) };
    }
    assert_back_to_boot(&m, &boot_areas);
}

/// All or nothing: a buffer larger than free memory fails and leaves nothing allocated.
#[test]
fn buffer_larger_than_memory_fails_cleanly() {
    let m = boot(MachineConfig::x86_64(64 * MIB));
    let boot_areas = areas(&m);
    let held = fragment(&m);
    let free = m.nr_free_pages();
    let before = areas(&m);
    let t = sg_alloc_buffer(&m, (free + 100) * PAGE_SIZE, GFP_NOWAIT | __GFP_NOWARN);
    assert!(t.is_none());
    shrink_kmalloc(&m);
    assert_eq!(areas(&m), before, "everything taken was given back");
    assert_eq!(m.nr_free_pages(), free);
    for p in held {
        // SAFETY: the pages `fragment` kept, order 0.
        unsafe { m.__free_pages(p, 0) };
    }
    assert_back_to_boot(&m, &boot_areas);
}

/// 64 MiB on a 256 MiB machine with no order-10 block left (every other order-9 block
/// held): `alloc_pages` of 4 MiB fails, the buffer comes in 2 MiB blocks.
#[test]
fn buffer_of_64_mib_without_any_order_10_block() {
    let m = boot(MachineConfig::x86_64(256 * MIB));
    let boot_areas = areas(&m);
    let gfp = GFP_ATOMIC | __GFP_MEMALLOC | __GFP_NOWARN;
    let mut all = Vec::new();
    while let Some(p) = m.alloc_pages(gfp, 9) {
        all.push(p);
    }
    m.drain_all_pages();
    assert_eq!(blocks_at_least(&m, 9), 0);
    // Free the order-9 blocks in the lower half of each order-10 pair: their buddies are held.
    let (free_these, held): (Vec<&Page>, Vec<&Page>) = all
        .into_iter()
        .partition(|p| m.page_to_pfn(p).0 & (1 << 9) == 0);
    for p in free_these {
        // SAFETY: an order-9 block allocated above.
        unsafe { m.__free_pages(p, 9) };
    }
    m.drain_all_pages();
    assert_eq!(blocks_at_least(&m, 10), 0, "no order-10 block left");
    assert!(
        m.nr_free_pages() * PAGE_SIZE > 100 * MIB_USIZE,
        "yet over 100 MiB free"
    );
    assert!(
        m.alloc_pages(GFP_KERNEL | __GFP_NORETRY | __GFP_NOWARN, MAX_PAGE_ORDER)
            .is_none(),
        "no 4 MiB contiguous block"
    );
    assert!(
        m.alloc_pages(GFP_KERNEL | __GFP_NOWARN, 14).is_none(),
        "64 MiB at once: never"
    );

    let size = 64 * MIB_USIZE;
    let t = sg_alloc_buffer(&m, size, GFP_KERNEL).expect("64 MiB buffer");
    check_buffer_shape(&m, &t, size);
    assert_eq!(t.nents(), 32, "32 blocks of 2 MiB");
    assert!(t.iter().all(|sg| sg.length() == 2 * MIB_USIZE));
    round_trip(&m, &t, 6);
    // SAFETY: the buffer came from sg_alloc_buffer and is not used again.
    unsafe { sg_free_buffer(&m, t) };
    for p in held {
        // SAFETY: the order-9 blocks kept above.
        unsafe { m.__free_pages(p, 9) };
    }
    assert_back_to_boot(&m, &boot_areas);
}

// ------------------------------------------------------------------------------ HighMem

/// On x86_32, a buffer of HighMem pages (no direct-map address) is filled and read through
/// `kmap`; a table from HighMem pages mixed with low pages too.
#[test]
fn highmem_pages_are_copied_through_kmap() {
    let m = boot(MachineConfig::x86_32(1024 * MIB));
    let boot_areas = areas(&m);
    let size = 8 * MIB_USIZE + 300;
    let t = sg_alloc_buffer(&m, size, GFP_HIGHUSER).expect("HighMem buffer");
    check_buffer_shape(&m, &t, size);
    for sg in &t {
        let page = sg_page(&m, sg).unwrap();
        assert!(m.page_address(page).is_none(), "the block is HighMem");
        assert!(sg_virt(&m, sg).is_none());
    }
    round_trip(&m, &t, 7);
    // SAFETY: the buffer came from sg_alloc_buffer and is not used again.
    unsafe { sg_free_buffer(&m, t) };

    // Single pages, HighMem and low memory alternating.
    let mut pages = Vec::new();
    for i in 0..40 {
        let gfp = if i % 2 == 0 { GFP_HIGHUSER } else { GFP_KERNEL };
        pages.push(m.alloc_page(gfp).unwrap());
    }
    assert!(pages.iter().any(|p| m.page_address(p).is_none()));
    assert!(pages.iter().any(|p| m.page_address(p).is_some()));
    let t = sg_alloc_table_from_pages(&m, &pages, 10, 40 * PAGE_SIZE - 20, GFP_KERNEL).unwrap();
    assert_eq!(t.total_length(), 40 * PAGE_SIZE - 20);
    round_trip(&m, &t, 8);
    // The bytes really are in the pages: read one HighMem page through kmap directly.
    let data = random_bytes(40 * PAGE_SIZE - 20, 8);
    let hp = pages[2];
    assert!(m.page_address(hp).is_none());
    let va = m.kmap(hp);
    // SAFETY: `va` maps the test's page for PAGE_SIZE bytes.
    let got = unsafe { std::slice::from_raw_parts(va.as_ptr(), PAGE_SIZE) }.to_vec();
    m.kunmap(hp);
    let start = 2 * PAGE_SIZE - 10;
    assert!(got[..] == data[start..start + PAGE_SIZE]);
    sg_free_table(&m, t);
    for p in pages {
        // SAFETY: the test's own pages.
        unsafe { m.__free_pages(p, 0) };
    }
    assert_back_to_boot(&m, &boot_areas);
}
