//! Model-based property tests of the page allocator.
//!
//! Random sequences of operations — allocations of orders `0..=10` (weighted toward small
//! orders) with a random GFP mask, frees of random live blocks, and drains of the per-CPU
//! lists — run on several machine shapes:
//!
//! * a small x86_64 machine (24–64 MiB: DMA and DMA32);
//! * an x86_64 machine with holes in its memory map and boot reservations;
//! * an x86_32 machine with 64 MiB of HighMem (pages reached through `kmap`);
//! * an x86_64 machine whose RAM spans 4 GiB (DMA, DMA32 and Normal populated; the flat
//!   `mem_map` of the whole span, 32 MiB, must fit in the low RAM).
//!
//! Besides single allocations, a `Fill` operation allocates blocks until one fails, so cases
//! also run near the watermarks, into the atomic reserves and through allocation failures.
//!
//! Every operation is checked against a model, a map of the live blocks
//! `pfn -> (order, zone, gfp)`:
//!
//! * no two live blocks overlap, and every page of a block is RAM that was neither a hole
//!   nor reserved at boot;
//! * a block lies in one zone, a zone its mask allows (`__GFP_DMA`: DMA only; no
//!   `__GFP_HIGHMEM`: never HighMem; `__GFP_DMA32` on x86_64: never above DMA32), and each
//!   page's zone agrees with the physical layout;
//! * the zonelist is walked from the highest allowed zone down: when that zone is well above
//!   its high watermark and has a block of the order, the block comes from it (DMA is not
//!   used while DMA32 has room);
//! * the descriptors are in the states `page.rs` lists: an allocation head (`HEAD` too with
//!   `__GFP_COMP`), then compound tails or anonymous pages;
//! * `__GFP_ZERO` blocks read zero (HighMem pages through `kmap`);
//! * each block is filled with a pattern derived from its frame numbers, which must be intact
//!   when it is freed (no other allocation handed out or zeroed its pages);
//! * an order-0 `GFP_ATOMIC` allocation succeeds while more than half of the zones it may use
//!   is free;
//! * every 16 operations: `check_free_lists()` passes and the page accounting (buddy free +
//!   per-CPU lists + live blocks) matches boot, per zone;
//! * at the end, with everything freed and the per-CPU lists drained, `nr_free_pages` and the
//!   buddyinfo numbers are exactly those right after boot (`boot_free_pages`), and nothing
//!   was reported.
//!
//! `PROPTEST_CASES` overrides the number of cases (64 by default).

mod common;
use std::collections::BTreeMap;

use kmem::addr::{MAX_PAGE_ORDER, PAGE_SIZE, Pfn, VirtAddr};
use kmem::config::ZoneLayout;
use kmem::gfp::*;
use kmem::page_alloc::page::{Page, pg};
use kmem::page_alloc::zone::Wmark;
use kmem_hosted::{Machine, MachineConfig};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const WORDS: usize = PAGE_SIZE / 8;
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

// ------------------------------------------------------------------------------ machines

/// The shape of the machine a case runs on.
#[derive(Clone, Debug)]
enum Shape {
    /// x86_64 with `mib` MiB of RAM from 0: DMA and DMA32.
    Small { mib: u64 },
    /// x86_64, 64 MiB, with the classic 640K–1M hole, a second hole of `hole_pages` pages at
    /// page `hole_at` and a reservation of `res_pages` pages at page `res_at`.
    Holes {
        hole_at: u64,
        hole_pages: u64,
        res_at: u64,
        res_pages: u64,
    },
    /// x86_32, 960 MiB: DMA, Normal up to 896 MiB, 64 MiB of HighMem.
    X86_32,
    /// x86_64 with 64 MiB at 0 and 24 MiB at 4 GiB: DMA, DMA32 and Normal.
    Above4G,
}

impl Shape {
    fn config(&self) -> MachineConfig {
        let mut c = match *self {
            Shape::Small { mib } => MachineConfig::x86_64(mib * MIB),
            Shape::Holes {
                hole_at,
                hole_pages,
                res_at,
                res_pages,
            } => MachineConfig::x86_64(64 * MIB)
                .with_hole(640 << 10, 384 << 10)
                .with_hole(hole_at * PAGE_SIZE as u64, hole_pages * PAGE_SIZE as u64)
                .with_reserved(res_at * PAGE_SIZE as u64, res_pages * PAGE_SIZE as u64),
            Shape::X86_32 => MachineConfig::x86_32(960 * MIB),
            Shape::Above4G => MachineConfig {
                ram: vec![(0, 64 * MIB), (4 * GIB, 24 * MIB)],
                ..MachineConfig::x86_64(0)
            },
        };
        c.nr_cpus = 2;
        c.kmem.reclaim_retries = 1;
        c.kmem.reclaim_wait_ns = 1_000;
        c
    }
}

fn shape_strategy() -> impl Strategy<Value = Shape> {
    const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE as u64;
    prop_oneof![
        (24u64..=64).prop_map(|mib| Shape::Small { mib }),
        (
            (17 * PAGES_PER_MIB)..(30 * PAGES_PER_MIB),
            1u64..(6 * PAGES_PER_MIB),
            (40 * PAGES_PER_MIB)..(50 * PAGES_PER_MIB),
            1u64..(6 * PAGES_PER_MIB),
        )
            .prop_map(|(hole_at, hole_pages, res_at, res_pages)| Shape::Holes {
                hole_at,
                hole_pages,
                res_at,
                res_pages,
            }),
        Just(Shape::X86_32),
        Just(Shape::Above4G),
    ]
}

// ------------------------------------------------------------------------------ operations

/// The GFP masks the allocations draw from (each with `__GFP_NOWARN`).
#[derive(Clone, Copy, Debug)]
enum Mask {
    KernelNoRetry,
    Atomic,
    NoWait,
    DmaAtomic,
    DmaKernelNoRetry,
    Dma32KernelNoRetry,
    HighUserNoRetry,
}

impl Mask {
    fn gfp(self) -> Gfp {
        let g = match self {
            Mask::KernelNoRetry => GFP_KERNEL | __GFP_NORETRY,
            Mask::Atomic => GFP_ATOMIC,
            Mask::NoWait => GFP_NOWAIT,
            Mask::DmaAtomic => GFP_ATOMIC | GFP_DMA,
            Mask::DmaKernelNoRetry => GFP_KERNEL | GFP_DMA | __GFP_NORETRY,
            Mask::Dma32KernelNoRetry => GFP_KERNEL | GFP_DMA32 | __GFP_NORETRY,
            Mask::HighUserNoRetry => GFP_HIGHUSER | __GFP_NORETRY,
        };
        g | __GFP_NOWARN
    }
}

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        order: u32,
        mask: Mask,
        zero: bool,
        comp: bool,
    },
    /// Frees the live block at this position (modulo their number) of the model, in pfn
    /// order.
    Free(usize),
    /// Allocates blocks of `order` until one fails or `FILL_PAGES` pages were taken: puts
    /// the machine under pressure (watermarks, reserves, failures).
    Fill {
        order: u32,
        mask: Mask,
    },
    DrainAll,
    DrainLocal,
}

/// Most pages one [`Op::Fill`] allocates (64 MiB: all of a small machine, all of HighMem).
const FILL_PAGES: u64 = 16 << 10;

fn order_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        10 => Just(0u32),
        8 => 1u32..=3,
        3 => 4u32..=6,
        1 => 7u32..=10,
    ]
}

fn mask_strategy() -> impl Strategy<Value = Mask> {
    prop_oneof![
        4 => Just(Mask::KernelNoRetry),
        3 => Just(Mask::Atomic),
        2 => Just(Mask::NoWait),
        1 => Just(Mask::DmaAtomic),
        1 => Just(Mask::DmaKernelNoRetry),
        2 => Just(Mask::Dma32KernelNoRetry),
        2 => Just(Mask::HighUserNoRetry),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (order_strategy(), mask_strategy(), any::<bool>(), any::<bool>()).prop_map(
            |(order, mask, zero, comp)| Op::Alloc { order, mask, zero, comp }
        ),
        9 => any::<usize>().prop_map(Op::Free),
        1 => (2u32..=10, mask_strategy()).prop_map(|(order, mask)| Op::Fill { order, mask }),
        1 => Just(Op::DrainAll),
        1 => Just(Op::DrainLocal),
    ]
}

// ------------------------------------------------------------------------------ the model

#[derive(Clone, Copy, Debug)]
struct Live {
    order: u32,
    zone: usize,
    gfp: Gfp,
}

/// The word every 8-byte slot of frame `pfn` holds while its block is live.
fn pattern(pfn: u64) -> u64 {
    let mut z = pfn.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31) | 1
}

/// Runs `f` on a mapping of `page` (its direct-map address, or a `kmap` for HighMem).
fn with_mapped<R>(m: &Machine, page: &Page, f: impl FnOnce(VirtAddr) -> R) -> R {
    match m.page_address(page) {
        Some(va) => f(va),
        None => {
            let va = m.kmap(page);
            let r = f(va);
            m.kunmap(page);
            r
        }
    }
}

struct Harness<'m> {
    m: &'m Machine,
    layout: ZoneLayout,
    live: BTreeMap<u64, Live>,
    /// Per zone: pages in live blocks.
    live_pages: [usize; MAX_NR_ZONES],
    /// Per zone: pages free at boot (buddy lists; the per-CPU lists are empty then).
    boot_free: Vec<usize>,
    boot_counts: Vec<[usize; kmem::addr::NR_PAGE_ORDERS]>,
    boot_nr_free: usize,
}

impl<'m> Harness<'m> {
    fn new(m: &'m Machine) -> Harness<'m> {
        m.drain_all_pages();
        assert_eq!(m.nr_pcp_pages(), 0);
        m.check_free_lists().expect("free lists after boot");
        Harness {
            m,
            layout: m.config().kmem.layout,
            live: BTreeMap::new(),
            live_pages: [0; MAX_NR_ZONES],
            boot_free: m.zones().iter().map(|z| z.free_pages()).collect(),
            boot_counts: m.free_area_counts(),
            boot_nr_free: m.nr_free_pages(),
        }
    }

    fn page(&self, pfn: u64) -> &'m Page {
        self.m.pfn_to_page(Pfn(pfn)).expect("pfn in mem_map")
    }

    /// The highest zone `gfp` may use on this machine (`gfp_zone` with absent zones meaning
    /// Normal, as Linux's `OPT_ZONE_*`).
    fn highest_zone(&self, gfp: Gfp) -> usize {
        let z = gfp_zone(gfp).expect("valid zone modifiers");
        if self.layout.has(z) {
            z.index()
        } else {
            ZoneType::Normal.index()
        }
    }

    fn is_ram(&self, phys: u64) -> bool {
        self.m
            .config()
            .ram
            .iter()
            .any(|&(b, s)| phys >= b && phys + PAGE_SIZE as u64 <= b + s)
    }

    fn is_boot_reserved(&self, phys: u64) -> bool {
        self.m
            .config()
            .reserved
            .iter()
            .any(|&(b, s)| phys < b + s && b < phys + PAGE_SIZE as u64)
    }

    /// Allocates one block and checks it against the model; returns false on failure.
    fn alloc(&mut self, order: u32, gfp: Gfp) -> bool {
        let m = self.m;
        let highest = self.highest_zone(gfp);
        // Pages of the zones this mask may use, and how many of them are free (not live).
        let usable: usize = (0..=highest).map(|z| m.zones()[z].managed_pages).sum();
        let used: usize = (0..=highest).map(|z| self.live_pages[z]).sum();
        let mostly_free = 2 * (usable - used) > usable;
        // The zonelist is walked from the highest allowed zone down: when the first populated
        // zone is comfortably above its high watermark (plus the reserve it keeps back from
        // this mask) and has a block of the order, the block must come from it.
        let first = (0..=highest)
            .rev()
            .find(|&z| m.zones()[z].managed_pages > 0)
            .expect("a populated zone");
        let fz = &m.zones()[first];
        let preferred = (fz.free_pages()
            > fz.wmark(Wmark::High) + fz.lowmem_reserve[highest] + (1 << order))
            && (order..=MAX_PAGE_ORDER).any(|o| fz.nr_free(o) > 0);

        let Some(page) = m.alloc_pages(gfp, order) else {
            assert!(
                !(order == 0 && gfp_is_atomic(gfp) && mostly_free),
                "order-0 {gfp:?} failed with {} of {usable} usable pages free",
                usable - used
            );
            return false;
        };
        let pfn = m.page_to_pfn(page).0;
        let n = 1u64 << order;
        assert_eq!(pfn % n, 0, "block {pfn:#x} not aligned to order {order}");
        assert!(page.is_allocated(), "head {pfn:#x} not marked allocated");
        assert_eq!(page.order(), order);

        // No overlap with a live block.
        if let Some((&p, l)) = self.live.range(..=pfn).next_back() {
            assert!(
                p + (1 << l.order) <= pfn,
                "block {pfn:#x}/{order} overlaps live block {p:#x}/{}",
                l.order
            );
        }
        if let Some((&p, l)) = self.live.range(pfn..).next() {
            assert!(
                pfn + n <= p,
                "block {pfn:#x}/{order} overlaps live block {p:#x}/{}",
                l.order
            );
        }

        // Zones.
        let zone = page.zone_index();
        assert!(
            zone <= highest,
            "{gfp:?} block {pfn:#x} in zone {zone} above {highest}"
        );
        assert!(m.zones()[zone].managed_pages > 0);
        if gfp.contains(__GFP_DMA) {
            assert_eq!(zone, ZoneType::Dma.index(), "__GFP_DMA block {pfn:#x}");
        }
        if !gfp.contains(__GFP_HIGHMEM) {
            assert_ne!(zone, ZoneType::HighMem.index(), "{gfp:?} block {pfn:#x}");
        }
        if gfp.contains(__GFP_DMA32) && self.layout.has(ZoneType::Dma32) {
            assert!(zone <= ZoneType::Dma32.index(), "{gfp:?} block {pfn:#x}");
        }
        assert!(std::ptr::eq(m.page_zone(page), &m.zones()[zone]));
        if preferred {
            assert_eq!(
                zone, first,
                "{gfp:?} order-{order} block from zone {zone} while zone {first} has room"
            );
        }

        let comp = order > 0 && gfp.contains(__GFP_COMP);
        assert_eq!(page.is_head(), comp, "head flag of {gfp:?} block");
        // The descriptor states of `page.rs`: an allocation head, then compound tails or
        // anonymous pages.
        let head_state = if comp {
            pg::ALLOCATED | pg::HEAD
        } else {
            pg::ALLOCATED
        };
        let tail_state = if comp { pg::TAIL } else { 0 };
        assert_eq!(
            page.state(),
            head_state,
            "head {pfn:#x}: {}",
            page.flag_names()
        );
        for i in 0..n {
            let p = self.page(pfn + i);
            let phys = (pfn + i) * PAGE_SIZE as u64;
            assert_eq!(m.page_to_pfn(p).0, pfn + i);
            assert_eq!(p.zone_index(), zone, "block {pfn:#x} crosses zones");
            assert!(m.zones()[zone].spans(pfn + i));
            assert_eq!(
                self.layout.zone_of(phys).map(ZoneType::index),
                Some(zone),
                "page {:#x} tagged with the wrong zone",
                pfn + i
            );
            assert!(!p.is_reserved(), "reserved page {:#x} allocated", pfn + i);
            assert!(!p.is_buddy(), "page {:#x} still a free buddy", pfn + i);
            assert!(self.is_ram(phys), "page {:#x} is not RAM", pfn + i);
            assert!(
                !self.is_boot_reserved(phys),
                "page {:#x} was reserved at boot",
                pfn + i
            );
            assert!(
                !m.memblock().is_reserved(phys),
                "page {:#x} is memblock-reserved",
                pfn + i
            );
            if i > 0 {
                assert_eq!(
                    p.state(),
                    tail_state,
                    "page {:#x} of block {pfn:#x}/{order}: {}",
                    pfn + i,
                    p.flag_names()
                );
            }
            let expect_zero = gfp.contains(__GFP_ZERO);
            let word = pattern(pfn + i);
            with_mapped(m, p, |va| {
                if let Some(dm) = m.page_address(p) {
                    assert_eq!(dm, va);
                    let back = m
                        .virt_to_page(va)
                        .expect("virt_to_page of a direct-map page");
                    assert!(std::ptr::eq(back, p));
                } else {
                    assert_eq!(zone, ZoneType::HighMem.index());
                }
                // SAFETY: `va` maps page `p`, part of the block just allocated and owned by
                // this test, for PAGE_SIZE bytes.
                let bytes = unsafe { std::slice::from_raw_parts_mut(va.as_ptr(), PAGE_SIZE) };
                if expect_zero {
                    assert!(
                        bytes[..] == ZERO_PAGE[..],
                        "__GFP_ZERO page {:#x} not zeroed",
                        pfn + i
                    );
                }
                // SAFETY: as above; the direct map and kmap addresses are page aligned.
                let words = unsafe { std::slice::from_raw_parts_mut(va.as_ptr().cast(), WORDS) };
                words.copy_from_slice(&[word; WORDS]);
            });
        }
        self.live.insert(pfn, Live { order, zone, gfp });
        self.live_pages[zone] += 1 << order;
        true
    }

    fn verify_pattern(&self, pfn: u64, l: &Live) {
        for i in 0..(1u64 << l.order) {
            let p = self.page(pfn + i);
            let word = pattern(pfn + i);
            with_mapped(self.m, p, |va| {
                // SAFETY: `va` maps page `p` of a live block owned by this test.
                let words = unsafe { std::slice::from_raw_parts(va.as_ptr().cast::<u64>(), WORDS) };
                if words != [word; WORDS] {
                    let bad = words
                        .iter()
                        .position(|&w| w != word)
                        .expect("a word differs");
                    panic!(
                        "live block {pfn:#x}/{} ({:?}, zone {}): page {:#x} word {bad} is \
                         {:#x}, expected {word:#x}",
                        l.order,
                        l.gfp,
                        l.zone,
                        pfn + i,
                        words[bad]
                    );
                }
            });
        }
    }

    fn free(&mut self, pfn: u64) {
        let l = self.live.remove(&pfn).expect("live block");
        self.live_pages[l.zone] -= 1 << l.order;
        self.verify_pattern(pfn, &l);
        let page = self.page(pfn);
        assert!(page.is_allocated());
        // SAFETY: `page` heads a live block of order `l.order` allocated by this test; the
        // model entry is gone, so nothing touches its memory again.
        unsafe { self.m.__free_pages(page, l.order) };
        assert!(
            !page.is_allocated(),
            "block {pfn:#x} still allocated after free"
        );
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Alloc {
                order,
                mask,
                zero,
                comp,
            } => {
                let mut gfp = mask.gfp();
                if zero {
                    gfp |= __GFP_ZERO;
                }
                if comp {
                    gfp |= __GFP_COMP;
                }
                self.alloc(order, gfp);
            }
            Op::Fill { order, mask } => {
                let mut pages = 0;
                while pages < FILL_PAGES && self.alloc(order, mask.gfp()) {
                    pages += 1 << order;
                }
            }
            Op::Free(ix) => {
                if !self.live.is_empty() {
                    let pfn = *self
                        .live
                        .keys()
                        .nth(ix % self.live.len())
                        .expect("index in range");
                    self.free(pfn);
                }
            }
            Op::DrainAll => {
                self.m.drain_all_pages();
                assert_eq!(self.m.nr_pcp_pages(), 0);
            }
            Op::DrainLocal => {
                self.m.drain_local_pages();
            }
        }
    }

    /// Free lists, and the accounting of each zone: buddy + per-CPU + live == boot.
    fn checkpoint(&self) {
        let m = self.m;
        m.check_free_lists().expect("check_free_lists");
        for (zi, z) in m.zones().iter().enumerate() {
            let pcp: usize = (0..m.nr_cpus())
                .map(|c| m.pcp(c, zi).count() as usize)
                .sum();
            let live = self.live_pages[zi];
            assert_eq!(
                z.free_pages() + pcp + live,
                self.boot_free[zi],
                "zone {}: {} free + {pcp} per-CPU + {live} live != {} at boot",
                z.name(),
                z.free_pages(),
                self.boot_free[zi]
            );
        }
        assert_eq!(m.kmap_slots_in_use(), 0);
    }

    fn finish(mut self) {
        let pfns: Vec<u64> = self.live.keys().copied().collect();
        for pfn in pfns {
            self.free(pfn);
        }
        let m = self.m;
        m.shrink_slab();
        m.drain_all_pages();
        assert_eq!(m.nr_pcp_pages(), 0);
        m.check_free_lists().expect("check_free_lists at the end");
        assert_eq!(m.nr_free_pages(), self.boot_nr_free, "nr_free_pages");
        assert_eq!(m.nr_free_pages(), m.boot_free_pages(), "boot_free_pages");
        assert_eq!(
            m.free_area_counts(),
            self.boot_counts,
            "buddyinfo differs from boot:\n{}",
            m.proc_buddyinfo()
        );
        assert_eq!(m.bad_page_reports(), 0);
        let log = m.platform().take_log();
        let bad: Vec<&String> = log
            .iter()
            .filter(|l| l.contains("BUG") || l.contains("WARNING") || l.contains("invalid"))
            .collect();
        assert!(bad.is_empty(), "unexpected reports: {bad:#?}");
    }
}

fn run(shape: &Shape, ops: &[Op]) {
    let m = Machine::boot(shape.config()).expect("machine boots");
    let mut h = Harness::new(&m);
    for (i, op) in ops.iter().enumerate() {
        h.apply(op);
        if i % 16 == 15 {
            h.checkpoint();
        }
    }
    h.checkpoint();
    h.finish();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::proptest_cases(), ..ProptestConfig::default() })]

    /// Random alloc/free/drain sequences agree with the model on every machine shape.
    #[test]
    fn page_allocator_matches_model(
        shape in shape_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..200),
    ) {
        run(&shape, &ops);
    }
}

/// Each shape boots, and a fixed sequence (every mask, big and small orders, frees in both
/// directions) passes, so that every shape is covered whatever the random cases draw.
#[test]
fn every_shape_fixed_sequence() {
    let shapes = [
        Shape::Small { mib: 24 },
        Shape::Holes {
            hole_at: 5000,
            hole_pages: 37,
            res_at: 11_000,
            res_pages: 129,
        },
        Shape::X86_32,
        Shape::Above4G,
    ];
    let masks = [
        Mask::KernelNoRetry,
        Mask::Atomic,
        Mask::NoWait,
        Mask::DmaAtomic,
        Mask::DmaKernelNoRetry,
        Mask::Dma32KernelNoRetry,
        Mask::HighUserNoRetry,
    ];
    let mut ops = Vec::new();
    for (k, &mask) in masks.iter().enumerate() {
        for order in [0, 3, 0, 10, 1, 5] {
            ops.push(Op::Alloc {
                order,
                mask,
                zero: k % 2 == 0,
                comp: order % 2 == 1,
            });
        }
    }
    for i in 0..ops.len() {
        // Frees from the front, the back and the middle.
        ops.push(Op::Free(i * 7919 % 1000));
        if i % 9 == 0 {
            ops.push(Op::DrainAll);
        }
    }
    for shape in &shapes {
        run(shape, &ops);
    }
}
