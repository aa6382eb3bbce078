//! Unit tests of the parent module.
use super::{MemblockError::*, *};
use std::{string::String, vec::Vec};

const P: u64 = PAGE;

fn ranges(a: &RegionArray) -> Vec<(u64, u64)> {
    a.as_slice().iter().map(|r| (r.base, r.end())).collect()
}

fn free_ranges(m: &Memblock) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    m.for_each_free_range(|a, b| v.push((a, b)));
    v
}

/// A memblock with memory and reserved ranges given as `(base, end)`.
fn mb(mem: &[(u64, u64)], res: &[(u64, u64)]) -> Memblock {
    let mut m = Memblock::new();
    mem.iter().for_each(|&(a, b)| m.add(a, b - a).unwrap());
    res.iter().for_each(|&(a, b)| m.reserve(a, b - a).unwrap());
    m
}

/// Memory `[0x1000, 0x100000)` plus `[0x200000, 0x300000)`.
fn two_banks() -> Memblock {
    mb(&[(0x1000, 0x10_0000), (0x20_0000, 0x30_0000)], &[])
}

#[test]
fn new_is_empty() {
    let m = Memblock::default();
    assert!(m.memory().is_empty() && m.reserved().is_empty());
    assert_eq!(m.current_limit(), MEMBLOCK_ALLOC_ANYWHERE);
    assert_eq!((m.start_of_dram(), m.end_of_dram()), (0, 0));
    assert_eq!((m.phys_mem_size(), m.reserved_size()), (0, 0));
    assert!(!m.is_memory(0) && !m.is_reserved(0) && free_ranges(&m).is_empty());
}

#[test]
fn add_keeps_disjoint_ranges_sorted() {
    let mut m = Memblock::new();
    for (a, b) in [(5, 6), (1, 2), (9, 11), (3, 4)] {
        m.add(a * P, (b - a) * P).unwrap();
    }
    let want = [(1, 2), (3, 4), (5, 6), (9, 11)].map(|(a, b)| (a * P, b * P));
    assert_eq!(ranges(m.memory()), want);
    assert_eq!(m.phys_mem_size(), 0x5000);
    assert_eq!((m.start_of_dram(), m.end_of_dram()), (0x1000, 0xb000));
}

#[test]
fn add_merges_overlap_adjacency_containment() {
    let mut m = mb(&[(0x1000, 0x3000)], &[]);
    m.add(0x2000, 0x2000).unwrap(); // overlap
    assert_eq!(ranges(m.memory()), [(0x1000, 0x4000)]);
    m.add(0x4000, 0x1000).unwrap(); // adjacent above
    m.add(0x0, 0x1000).unwrap(); // adjacent below
    m.add(0x2000, 0x100).unwrap(); // contained
    assert_eq!(ranges(m.memory()), [(0x0, 0x5000)]);
    m.add(0x8000, 0x1000).unwrap();
    m.add(0xa000, 0x1000).unwrap();
    assert_eq!(m.memory().len(), 3);
    m.add(0x4800, 0x6000).unwrap(); // swallows two, touches the first
    assert_eq!(ranges(m.memory()), [(0x0, 0xb000)]);
    m.add(0x0, 0x10_0000).unwrap(); // contains everything
    assert_eq!(ranges(m.memory()), [(0x0, 0x10_0000)]);
    assert_eq!(m.phys_mem_size(), 0x10_0000);
}

#[test]
fn zero_size_and_overflow_change_nothing() {
    let mut m = two_banks();
    let before = m.clone();
    assert_eq!(m.add(0x50_0000, 0).and(m.reserve(0x50_0000, 0)), Ok(()));
    assert_eq!(m.remove(0x2000, 0).and(m.free(0x2000, 0)), Ok(()));
    assert_eq!(m.add(u64::MAX - 0xfff, 0x2000), Err(Overflow));
    assert_eq!(m.remove(0x1000, u64::MAX), Err(Overflow));
    assert_eq!(m.reserve(2, u64::MAX - 1), Err(Overflow));
    assert_eq!(m.free(u64::MAX, 1), Err(Overflow));
    assert_eq!(m, before);
    m.add(u64::MAX - 0x1000, 0x1000).unwrap(); // the top is fine if the end does not wrap
    assert_eq!(m.end_of_dram(), u64::MAX);
}

#[test]
fn remove_splits_and_spans() {
    let mut m = mb(&[(0x0, 0x10000)], &[]);
    m.remove(0x4000, 0x1000).unwrap(); // split
    assert_eq!(ranges(m.memory()), [(0x0, 0x4000), (0x5000, 0x10000)]);
    m.remove(0x0, 0x1000).unwrap(); // trim the front
    m.remove(0xf000, 0x2000).unwrap(); // trim the back, past the end
    assert_eq!(ranges(m.memory()), [(0x1000, 0x4000), (0x5000, 0xf000)]);
    m.add(0x20000, 0x1000).unwrap();
    m.remove(0x3000, 0x1_d800).unwrap(); // spans three regions, cuts two
    assert_eq!(ranges(m.memory()), [(0x1000, 0x3000), (0x2_0800, 0x2_1000)]);
    assert_eq!(m.phys_mem_size(), 0x2800);
    m.remove(0x0, 0x100000).unwrap(); // everything
    assert!(m.memory().is_empty() && m.phys_mem_size() == 0);
    m.remove(0x0, 0x1000).unwrap(); // nothing to remove is fine
}

#[test]
fn reserve_and_free_are_symmetric() {
    let mut m = two_banks();
    m.reserve(0x1000, 0x1000).unwrap();
    m.reserve(0x3000, 0x1000).unwrap();
    m.reserve(0x2000, 0x1000).unwrap(); // bridges
    m.reserve(0x40_0000, 0x1000).unwrap(); // outside memory is allowed
    assert_eq!(
        ranges(m.reserved()),
        [(0x1000, 0x4000), (0x40_0000, 0x40_1000)]
    );
    assert_eq!(m.reserved_size(), 0x4000);
    m.free(0x2000, 0x800).unwrap(); // part of a reservation: split
    let want = [(0x1000, 0x2000), (0x2800, 0x4000), (0x40_0000, 0x40_1000)];
    assert_eq!(ranges(m.reserved()), want);
    assert!(m.is_reserved(0x1fff) && !m.is_reserved(0x2000) && m.is_reserved(0x2800));
    m.free(0x2800, 0x17ff).unwrap(); // leaves a single byte
    assert!(m.is_reserved(0x3fff) && !m.is_reserved(0x3ffe) && m.reserved_size() == 0x2001);
    m.free(0x0, 0x50_0000).unwrap();
    assert!(m.reserved().is_empty());
    assert_eq!(m.memory(), two_banks().memory());
}

#[test]
fn queries() {
    let m = mb(
        &[(0x1000, 0x10_0000), (0x20_0000, 0x30_0000)],
        &[(0x8000, 0xa000)],
    );
    assert!(m.is_memory(0x1000) && m.is_memory(0xf_ffff) && !m.is_memory(0x10_0000));
    assert!(!m.is_memory(0xfff) && m.is_memory(0x2f_ffff) && !m.is_memory(0x30_0000));
    assert!(m.is_region_memory(0x1000, 0xff000) && !m.is_region_memory(0x1000, 0xff001));
    assert!(!m.is_region_memory(0xf_f000, 0x20_0000)); // spans the hole
    assert!(m.is_region_memory(0x2000, 0));
    assert!(m.is_region_reserved(0x7000, 0x1001) && !m.is_region_reserved(0x7000, 0x1000));
    assert!(!m.is_region_reserved(0xa000, 0x1000) && !m.is_region_reserved(0x8000, 0));
    assert!(m.is_region_reserved(0x9fff, u64::MAX)); // end capped
    assert!(m.reserved().overlaps(0x0, 0x9000) && !m.reserved().overlaps(0xa000, 1));
}

#[test]
fn top_down_gives_highest_aligned() {
    let mut m = two_banks();
    assert_eq!(m.phys_alloc(0x1000, 0x1000), Some(0x2f_f000));
    assert_eq!(m.phys_alloc(0x1000, 0x10_0000), Some(0x20_0000));
    // An unaligned limit inside bank 0: free below it is [0x1000, 0xf_f880).
    m.set_current_limit(0xf_f880);
    assert_eq!(m.phys_alloc(0x100, 0), Some(0xf_f780)); // align 0 means 64
    assert_eq!(m.phys_alloc(0x3000, 0x4000), Some(0xf_c000));
    // [0xf_f000, 0xf_f780) is free but too small for 0x800 at 0x1000 alignment.
    assert_eq!(m.phys_alloc(0x800, 0x1000), Some(0xf_b000));
    let want = [
        (0xf_b000, 0xf_b800),
        (0xf_c000, 0xf_f000),
        (0xf_f780, 0xf_f880),
    ];
    assert_eq!(ranges(m.reserved())[..3], want);
    assert_eq!(
        ranges(m.reserved())[3..],
        [(0x20_0000, 0x20_1000), (0x2f_f000, 0x30_0000)]
    );
}

#[test]
fn bottom_up_gives_lowest_aligned_and_skips_page_zero() {
    let mut m = mb(&[(0x0, 0x10_0000)], &[]);
    m.set_bottom_up(true);
    assert_eq!(m.phys_alloc(0x10, 8), Some(0x1000)); // the first page is never used
    assert_eq!(m.phys_alloc(0x10, 8), Some(0x1010)); // right after
    assert_eq!(m.phys_alloc(0x1000, 0x4000), Some(0x4000));
    assert_eq!(m.phys_alloc_range(0x100, 0x100, 0x8080, 0), Some(0x8100));
}

#[test]
fn alloc_respects_range_and_limit() {
    let mut m = two_banks();
    assert_eq!(m.phys_alloc_range(P, P, 0x3000, 0x8000), Some(0x7000));
    assert_eq!(m.phys_alloc_range(P, P, 0x3000, 0x7800), Some(0x6000));
    // [0x3000, 0x6000) is free: 0x3000 bytes fit, 0x3001 do not.
    assert_eq!(m.phys_alloc_range(0x3001, 1, 0x3000, 0x6000), None);
    assert_eq!(m.phys_alloc_range(0x3000, 1, 0x3000, 0x6000), Some(0x3000));
    m.set_current_limit(0x5_0000);
    let anywhere = MEMBLOCK_ALLOC_ANYWHERE;
    assert_eq!(m.phys_alloc_range(P, P, 0, anywhere), Some(0x4_f000));
    assert_eq!(m.phys_alloc_range(P, P, 0x20_0000, 0x30_0000), None); // above the limit
    m.set_bottom_up(true);
    assert_eq!(m.phys_alloc_range(P, P, 0x4_0000, 0), Some(0x4_0000));
    assert_eq!(m.phys_alloc_range(P, P, 0x6_0000, 0), None); // start above the limit
    assert_eq!(m.phys_alloc(P, 3), None); // not a power of two
    assert_eq!(m.phys_alloc(0, P), None);
}

#[test]
fn alloc_skips_reserved_and_memory_holes() {
    // Free: [0x1000, 0x4000), [0x6000, 0x8000), [0x9000, 0xa000).
    let mut m = mb(&[(0x1000, 0x4000), (0x6000, 0xa000)], &[(0x8000, 0x9000)]);
    assert_eq!(m.phys_alloc(0x2000, P), Some(0x6000)); // the top piece is too small
    assert_eq!(m.phys_alloc(0x3000, P), Some(0x1000)); // spans no hole
    assert_eq!(m.phys_alloc(0x2000, P), None);
    assert_eq!(m.phys_alloc(0x1000, P), Some(0x9000));
    assert!(free_ranges(&m).is_empty());
}

#[test]
fn failed_alloc_leaves_state_unchanged() {
    let mut m = two_banks();
    m.reserve(0x10_0000 - 0x8000, 0x8000).unwrap();
    let before = m.clone();
    assert_eq!(m.phys_alloc(0x20_0000, P), None);
    assert_eq!(m.phys_alloc_range(P, P, 0x30_0000, 0x40_0000), None);
    assert_eq!(m, before);
}

#[test]
fn too_many_regions_leaves_state_unchanged() {
    let mut m = Memblock::new();
    for i in 0..MEMBLOCK_REGIONS as u64 {
        m.add(i * 2 * P, P).unwrap();
        m.reserve(i * 2 * P, P).unwrap();
    }
    let before = m.clone();
    let top = MEMBLOCK_REGIONS as u64 * 2 * P;
    assert_eq!(m.add(top, P), Err(TooManyRegions));
    assert_eq!(m.reserve(top + P, P), Err(TooManyRegions));
    // Splitting needs one more region, too.
    assert_eq!(m.remove(P / 2, 1), Err(TooManyRegions));
    assert_eq!(m.free(P / 2, 1), Err(TooManyRegions));
    assert_eq!(m, before);
    // Updates that need no new region still work on a full array.
    m.add(top - P, P).unwrap(); // adjacent: merges
    m.remove(0, P).unwrap(); // a whole region: one fewer
    assert_eq!(m.memory().len(), MEMBLOCK_REGIONS - 1);
    m.free(2 * P, P / 2).unwrap(); // trims a region
    assert_eq!(m.reserved().len(), MEMBLOCK_REGIONS);
    // An allocation whose reservation needs a new region fails cleanly.
    m.remove(0, 4 * P).unwrap();
    m.add(top + 4 * P, 4 * P).unwrap();
    let before = m.clone();
    assert_eq!(m.phys_alloc(P, P), None);
    assert_eq!(m, before);
}

#[test]
fn free_ranges_with_holes_and_reservations() {
    let res = [
        (0x0, 0x2000),    // overlaps the start of memory
        (0x8000, 0x9000), // merges with the next one
        (0x9000, 0xa000),
        (0xf_f000, 0x20_1000),  // the end of bank 0 and the start of bank 1
        (0x2f_f000, 0x30_0000), // the end of bank 1
        (0x50_0000, 0x50_1000), // no memory there
    ];
    let m = mb(&[(0x1000, 0x10_0000), (0x20_0000, 0x30_0000)], &res);
    let want = [(0x2000, 0x8000), (0xa000, 0xf_f000), (0x20_1000, 0x2f_f000)];
    assert_eq!(free_ranges(&m), want);
    assert_eq!(m.reserved().len(), 5);
}

#[test]
fn dump_format() {
    let m = mb(
        &[(0x1000, 0x9f000), (0x10_0000, 0x20_0000)],
        &[(0x1000, 0x2000)],
    );
    let mut s = String::new();
    m.dump(&mut s).unwrap();
    let want = "MEMBLOCK configuration:\n \
        memory size = 0x000000000019e000 reserved size = 0x0000000000001000\n \
        memory.cnt  = 0x2\n \
        memory[0x0]\t[0x0000000000001000-0x000000000009efff], 0x000000000009e000 bytes flags: 0x0\n \
        memory[0x1]\t[0x0000000000100000-0x00000000001fffff], 0x0000000000100000 bytes flags: 0x0\n \
        reserved.cnt  = 0x1\n \
        reserved[0x0]\t[0x0000000000001000-0x0000000000001fff], 0x0000000000001000 bytes flags: 0x0\n";
    assert_eq!(s, want);
    let mut s = String::new();
    Memblock::new().dump(&mut s).unwrap();
    assert!(s.ends_with(" memory.cnt  = 0x0\n reserved.cnt  = 0x0\n"));
    assert_eq!(
        std::format!("{TooManyRegions}"),
        "memblock: too many regions"
    );
}

/// xorshift64: a tiny deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const NPAGES: usize = 256;

/// The model: one flag per page for `memory`, one for `reserved`.
struct Model {
    mem: [bool; NPAGES],
    res: [bool; NPAGES],
}

impl Model {
    fn free(&self, p: usize) -> bool {
        self.mem[p] && !self.res[p]
    }

    /// The page `phys_alloc_range` must return: the first page is never allocated.
    fn expect(&self, n: usize, align: usize, lo: usize, hi: usize, up: bool) -> Option<usize> {
        let fits = |p: &usize| p % align == 0 && p + n <= hi && (*p..*p + n).all(|q| self.free(q));
        let mut cands = lo.max(1)..hi;
        if up {
            cands.find(fits)
        } else {
            cands.rev().find(fits)
        }
    }

    fn check(&self, m: &Memblock) {
        assert!(m.memory().is_valid() && m.reserved().is_valid());
        for p in 0..NPAGES {
            let a = p as u64 * P;
            for addr in [a, a + P / 2, a + P - 1] {
                assert_eq!(m.is_memory(addr), self.mem[p], "is_memory({addr:#x})");
                assert_eq!(m.is_reserved(addr), self.res[p], "is_reserved({addr:#x})");
            }
            assert_eq!(m.is_region_memory(a, P), self.mem[p]);
            assert_eq!(m.is_region_reserved(a, P), self.res[p]);
        }
        let count = |v: &[bool; NPAGES]| v.iter().filter(|b| **b).count() as u64 * P;
        assert_eq!(
            (m.phys_mem_size(), m.reserved_size()),
            (count(&self.mem), count(&self.res))
        );
        let mut want: Vec<(u64, u64)> = Vec::new();
        for p in (0..NPAGES).filter(|&p| self.free(p)) {
            match want.last_mut() {
                Some(last) if last.1 == p as u64 * P => last.1 += P,
                _ => want.push((p as u64 * P, (p as u64 + 1) * P)),
            }
        }
        assert_eq!(free_ranges(m), want);
    }

    /// One random `phys_alloc_range`, checked against `expect`; true when it allocated.
    fn alloc(&mut self, m: &mut Memblock, rng: &mut Rng, limit: usize) -> bool {
        let before = m.clone();
        let (n, align, lo) = (1 + rng.below(8), 1 << rng.below(4), rng.below(NPAGES));
        let (end, hi) = match rng.below(4) {
            0 => (MEMBLOCK_ALLOC_ACCESSIBLE, NPAGES),
            1 => (MEMBLOCK_ALLOC_ANYWHERE, NPAGES),
            _ => {
                let hi = lo + 1 + rng.below(NPAGES);
                (hi as u64 * P, hi)
            }
        };
        let up = m.bottom_up;
        let want = self.expect(n, align, lo, hi.min(limit), up);
        let got = m.phys_alloc_range(n as u64 * P, align as u64 * P, lo as u64 * P, end);
        let what = std::format!("{n} pages align {align} in [{lo}, {hi}) up={up}");
        match (got, want) {
            (Some(g), Some(w)) => {
                assert_eq!(g, w as u64 * P, "{what}");
                self.res[w..w + n].fill(true);
            }
            (None, Some(_)) => assert_eq!(m.reserved().len(), MEMBLOCK_REGIONS, "{what}"),
            (got, None) => assert_eq!(got, None, "{what}"),
        }
        if got.is_none() {
            assert_eq!(*m, before);
        }
        got.is_some()
    }
}

#[test]
fn randomized_against_page_bitmap() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut allocated, mut refused) = (0, 0);
    for _round in 0..40 {
        let mut m = Memblock::new();
        let mut model = Model {
            mem: [false; NPAGES],
            res: [false; NPAGES],
        };
        let mut limit = NPAGES;
        for _step in 0..300 {
            let first = rng.below(NPAGES);
            let len = (1 + rng.below(24)).min(NPAGES - first);
            let (base, size) = (first as u64 * P, len as u64 * P);
            let before = m.clone();
            let (res, flags, set) = match rng.below(10) {
                0..=2 => (m.add(base, size), &mut model.mem, true),
                3 => (m.remove(base, size), &mut model.mem, false),
                4 | 5 => (m.reserve(base, size), &mut model.res, true),
                6 => (m.free(base, size), &mut model.res, false),
                _ => {
                    if rng.below(8) == 0 {
                        m.set_bottom_up(rng.below(2) == 0);
                        limit = rng.below(NPAGES + 1);
                        let l = if limit == NPAGES {
                            u64::MAX
                        } else {
                            limit as u64 * P
                        };
                        m.set_current_limit(l);
                    }
                    if model.alloc(&mut m, &mut rng, limit) {
                        allocated += 1;
                    } else {
                        refused += 1;
                    }
                    model.check(&m);
                    continue;
                }
            };
            match res {
                Ok(()) => flags[first..first + len].fill(set),
                Err(e) => assert_eq!((e, &m), (TooManyRegions, &before)),
            }
            model.check(&m);
        }
    }
    assert!(allocated > 100 && refused > 100);
}
