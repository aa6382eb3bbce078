//! Helpers shared by the integration tests: byte patterns written into allocations and
//! checked before they are freed, a watchdog that turns a hang into a failure, a small
//! deterministic generator, the property tests' configuration, booting (and the machine
//! shapes several files share), and the machine-state helpers (taking every page, shrinking
//! the kmalloc caches, checking the machine is back to boot, finding an object's page).

#![allow(dead_code)] // each test file uses its own subset

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kmem::addr::{NR_PAGE_ORDERS, Pfn, VirtAddr};
use kmem::gfp::{__GFP_MEMALLOC, __GFP_NOWARN, GFP_NOWAIT, ZoneType};
use kmem::kmalloc::{KmallocType, NR_KMALLOC_INDEX};
use kmem::page_alloc::page::Page;
use kmem::slab::KmemCache;
use kmem_hosted::{Machine, MachineConfig};
use proptest::test_runner::Config as ProptestConfig;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The `len` bytes at `p` as a slice.
#[allow(clippy::mut_from_ref)]
pub fn bytes<'a>(p: *mut u8, len: usize) -> &'a mut [u8] {
    // SAFETY: callers pass an allocation they own of at least `len` bytes, and drop the
    // slice before freeing it.
    unsafe { std::slice::from_raw_parts_mut(p, len) }
}

/// A byte pattern unique to `tag` at offset `i` (never 0, so zeroed memory never matches).
pub fn pat(tag: usize, i: usize) -> u8 {
    (tag.wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) % 251) as u8 | 1
}

/// Fills `len` bytes at `p` with `tag`'s pattern.
pub fn write_pat(p: *mut u8, len: usize, tag: usize) {
    for (i, b) in bytes(p, len).iter_mut().enumerate() {
        *b = pat(tag, i);
    }
}

/// Panics unless `len` bytes at `p` still hold `tag`'s pattern.
pub fn check_pat(p: *mut u8, len: usize, tag: usize) {
    let b = bytes(p, len);
    if let Some(i) = (0..len).find(|&i| b[i] != pat(tag, i)) {
        panic!(
            "{p:p} (tag {tag}) byte {i} is {:#x}, expected {:#x}",
            b[i],
            pat(tag, i)
        );
    }
}

/// Aborts the process if it is still alive after `limit`: a deadlock or livelock fails the
/// test run instead of hanging it. Dropping it disarms it.
pub struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    /// Arms a watchdog named `name`.
    pub fn new(name: &'static str, limit: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while !flag.load(Relaxed) {
                if t0.elapsed() > limit {
                    eprintln!("{name}: not done after {limit:?}: deadlock or livelock; aborting");
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// xorshift64*: a small deterministic generator (one per thread or per test).
pub struct Rng(u64);

impl Rng {
    /// A generator from any seed (0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Cases per property test: `PROPTEST_CASES`, or 64.
pub fn proptest_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

/// The property tests' configuration: [`proptest_cases`] cases, no failure persistence.
pub fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        cases: proptest_cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Boots `cfg` and empties the boot log.
pub fn boot(cfg: MachineConfig) -> Machine {
    let m = Machine::boot(cfg).expect("machine boots");
    m.platform().take_log();
    m
}

/// A 64 MiB x86_64 machine (DMA and DMA32 populated), 4 CPUs, its boot log emptied.
pub fn machine() -> Machine {
    boot(MachineConfig::x86_64(64 * MIB))
}

/// x86_64 with DMA (16 MiB), DMA32 (64 MiB just below 4 GiB) and Normal (64 MiB above it),
/// a hole in between. Physical memory is sparse: the hole costs only its descriptors.
pub fn three_zones() -> MachineConfig {
    MachineConfig {
        ram: vec![(0, 16 * MIB), (4 * GIB - 64 * MIB, 128 * MIB)],
        ..MachineConfig::x86_64(16 * MIB)
    }
}

/// The log since the last call, as one string.
pub fn log(m: &Machine) -> String {
    m.platform().take_log().join("\n")
}

/// Objects of `c` in use by callers: taken out of the slabs and not sitting in a CPU sheaf.
pub fn in_use(m: &Machine, c: &KmemCache) -> usize {
    c.objects_in_use(m.nr_cpus())
}

/// The head page of the slab (or compound page) holding the direct-map address `p`.
pub fn head_page(m: &Machine, p: *const u8) -> &Page {
    let mut page = m
        .virt_to_page(VirtAddr(p as usize))
        .expect("a direct-map address");
    let mut pfn = m.page_to_pfn(page).0;
    while page.is_tail() {
        pfn -= 1;
        page = m.pfn_to_page(Pfn(pfn)).expect("the head is RAM");
    }
    page
}

/// The zone of the page holding the direct-map address `p`.
pub fn zone_of(m: &Machine, p: *const u8) -> ZoneType {
    let page = m.virt_to_page(VirtAddr(p as usize)).expect("direct map");
    m.page_zone(page).ztype
}

/// Takes every free page of `m` as an order-0 allocation, reserves included, draining the
/// per-CPU lists until none is left on them either.
pub fn take_all_pages(m: &Machine) -> Vec<&Page> {
    let gfp = GFP_NOWAIT | __GFP_MEMALLOC | __GFP_NOWARN;
    let mut pages = Vec::new();
    loop {
        pages.extend(std::iter::from_fn(|| m.alloc_pages(gfp, 0)));
        // Pages other CPUs' lists kept come back to the buddy lists: take them too.
        m.drain_all_pages();
        if m.nr_free_pages() == 0 {
            return pages;
        }
    }
}

/// Gives every free slab of every kmalloc cache back to the page allocator.
pub fn shrink_kmalloc(m: &Machine) {
    for t in [KmallocType::Normal, KmallocType::Reclaim, KmallocType::Dma] {
        for i in 1..NR_KMALLOC_INDEX {
            if let Some(c) = m.kmalloc_caches().cache(t, i) {
                m.kmem_cache_shrink(c);
            }
        }
    }
}

/// Free blocks per zone and order, with the per-CPU lists drained.
pub fn areas(m: &Machine) -> Vec<[usize; NR_PAGE_ORDERS]> {
    m.drain_all_pages();
    m.free_area_counts()
}

/// The machine is as boot left it (`boot` from [`areas`] right after boot): with the
/// kmalloc caches shrunk and the per-CPU lists drained, it validates, its free pages are back
/// to their boot count and its free blocks are those of `boot`.
pub fn assert_back_to_boot(m: &Machine, boot: &[[usize; NR_PAGE_ORDERS]]) {
    shrink_kmalloc(m);
    m.drain_all_pages();
    m.validate().expect("free lists and slabs are consistent");
    assert_eq!(
        m.nr_free_pages(),
        m.boot_free_pages(),
        "free pages back to boot"
    );
    assert_eq!(m.free_area_counts(), boot, "buddyinfo back to boot");
}
