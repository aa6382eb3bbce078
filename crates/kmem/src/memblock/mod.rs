//! The boot-time allocator, as Linux's `mm/memblock.c`.
//!
//! Before any page descriptor exists, the kernel knows its memory only as a list of physical
//! ranges handed over by the boot loader. memblock keeps two such lists: `memory` (what RAM
//! exists) and `reserved` (what of it is taken: the kernel image, the initrd, firmware tables,
//! early allocations). Free memory is `memory − reserved`; an early allocation finds a free
//! range, top-down by default (bottom-up on request), and adds it to `reserved`. Later the page
//! allocator takes over every free page.
//!
//! # Invariants
//!
//! For each [`RegionArray`] with regions `r[0..cnt]`:
//!
//! - `cnt <= MEMBLOCK_REGIONS`, and `r[i].size > 0`, `r[i].base + r[i].size <= u64::MAX`;
//! - sorted and disjoint, never touching: `r[i].base + r[i].size < r[i+1].base`. Linux merges
//!   neighbours whose flags and node match; kmem has neither, so neighbours always merge;
//! - `total_size == Σ r[i].size`, and slots `cnt..` hold `Region::default()`.
//!
//! Every mutation checks for room *before* it writes, so an error leaves the state unchanged.
//!
//! # Differences from Linux
//!
//! The arrays never grow (Linux doubles them with `memblock_double_array`): a full array makes
//! the call fail with [`MemblockError::TooManyRegions`]. A range whose end wraps is an error
//! ([`MemblockError::Overflow`]) instead of being capped. There are no flags, no NUMA node ids.
//!
//! # Calling context
//!
//! Boot only, single-threaded: the caller owns the [`Memblock`] (`&mut self`), no locks.

use core::fmt;

use crate::addr::{PAGE_SIZE, align_down};

/// Capacity of each region array (Linux's `INIT_MEMBLOCK_REGIONS` is 128).
pub const MEMBLOCK_REGIONS: usize = 128;

/// `end` for [`Memblock::phys_alloc_range`]: "anywhere", clamped to the current limit.
pub const MEMBLOCK_ALLOC_ANYWHERE: u64 = u64::MAX;

/// `end` for [`Memblock::phys_alloc_range`]: "anywhere accessible", i.e. below the current limit.
pub const MEMBLOCK_ALLOC_ACCESSIBLE: u64 = 0;

/// Alignment used when an allocation asks for alignment 0 (Linux's `SMP_CACHE_BYTES`).
pub const SMP_CACHE_BYTES: u64 = 64;

const PAGE: u64 = PAGE_SIZE as u64;

/// One region `[base, base + size)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Region {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last byte: `base + size`.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    fn from_range(base: u64, end: u64) -> Self {
        Region {
            base,
            size: end - base,
        }
    }
}

/// Why a memblock update was refused. The state is unchanged in every case.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MemblockError {
    /// `base + size` wraps around the physical address space.
    Overflow,
    /// The region array has no room for the regions the update would create.
    TooManyRegions,
}

impl fmt::Display for MemblockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemblockError::Overflow => f.write_str("memblock: range end overflows"),
            MemblockError::TooManyRegions => f.write_str("memblock: too many regions"),
        }
    }
}

/// A sorted, merged, fixed-capacity list of regions (Linux's `struct memblock_type`).
#[derive(Clone, PartialEq, Eq)]
pub struct RegionArray {
    regions: [Region; MEMBLOCK_REGIONS], // r[0..cnt] sorted, disjoint, non-adjacent
    cnt: usize,                          // regions in use
    total_size: u64,                     // Σ r[i].size
}

impl RegionArray {
    const fn new() -> Self {
        RegionArray {
            regions: [Region { base: 0, size: 0 }; MEMBLOCK_REGIONS],
            cnt: 0,
            total_size: 0,
        }
    }

    /// The regions in use, ascending by base.
    pub fn as_slice(&self) -> &[Region] {
        &self.regions[..self.cnt]
    }

    /// Sum of the region sizes (`memblock_type.total_size`).
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    /// Number of regions (`memblock_type.cnt`).
    pub fn len(&self) -> usize {
        self.cnt
    }

    /// True when there is no region.
    pub fn is_empty(&self) -> bool {
        self.cnt == 0
    }

    /// True when `addr` lies inside some region (a binary search, as `memblock_search`).
    pub fn contains(&self, addr: u64) -> bool {
        let rs = self.as_slice();
        let i = rs.partition_point(|r| r.end() <= addr);
        i < rs.len() && rs[i].base <= addr
    }

    /// True when `[base, base + size)` intersects some region (`memblock_overlaps_region`).
    /// The end is capped at `u64::MAX`; an empty range intersects nothing.
    pub fn overlaps(&self, base: u64, size: u64) -> bool {
        if size == 0 {
            return false;
        }
        let end = base.saturating_add(size);
        let rs = self.as_slice();
        let i = rs.partition_point(|r| r.end() <= base);
        i < rs.len() && rs[i].base < end
    }

    /// Replaces `regions[start..start + remove]` with `new`, after checking for room.
    fn splice(&mut self, start: usize, remove: usize, new: &[Region]) -> Result<(), MemblockError> {
        let new_cnt = self.cnt - remove + new.len();
        if new_cnt > MEMBLOCK_REGIONS {
            return Err(MemblockError::TooManyRegions);
        }
        let removed: u64 = self.regions[start..start + remove]
            .iter()
            .map(|r| r.size)
            .sum();
        let added: u64 = new.iter().map(|r| r.size).sum();
        self.regions
            .copy_within(start + remove..self.cnt, start + new.len());
        self.regions[start..start + new.len()].copy_from_slice(new);
        if new_cnt < self.cnt {
            self.regions[new_cnt..self.cnt].fill(Region::default());
        }
        self.cnt = new_cnt;
        self.total_size = self.total_size - removed + added;
        debug_assert!(self.is_valid());
        Ok(())
    }

    /// `memblock_add_range`: the union with `[base, base + size)`; touching regions merge.
    fn add_range(&mut self, base: u64, size: u64) -> Result<(), MemblockError> {
        if size == 0 {
            return Ok(());
        }
        let end = base.checked_add(size).ok_or(MemblockError::Overflow)?;
        let rs = self.as_slice();
        // rs[i..j] overlap or touch [base, end].
        let i = rs.partition_point(|r| r.end() < base);
        let j = rs.partition_point(|r| r.base <= end);
        let (lo, hi) = if i < j {
            (rs[i].base.min(base), rs[j - 1].end().max(end))
        } else {
            (base, end)
        };
        self.splice(i, j - i, &[Region::from_range(lo, hi)])
    }

    /// `memblock_remove_range`: cuts `[base, base + size)` out, splitting a region if needed.
    fn remove_range(&mut self, base: u64, size: u64) -> Result<(), MemblockError> {
        if size == 0 {
            return Ok(());
        }
        let end = base.checked_add(size).ok_or(MemblockError::Overflow)?;
        let rs = self.as_slice();
        // rs[i..j] overlap [base, end).
        let i = rs.partition_point(|r| r.end() <= base);
        let j = rs.partition_point(|r| r.base < end);
        if i >= j {
            return Ok(());
        }
        let mut keep = [Region::default(); 2];
        let mut n = 0;
        if rs[i].base < base {
            keep[n] = Region::from_range(rs[i].base, base);
            n += 1;
        }
        if rs[j - 1].end() > end {
            keep[n] = Region::from_range(end, rs[j - 1].end());
            n += 1;
        }
        self.splice(i, j - i, &keep[..n])
    }

    /// The invariant walker: sorted, non-empty, non-touching regions; totals agree.
    fn is_valid(&self) -> bool {
        let rs = self.as_slice();
        self.cnt <= MEMBLOCK_REGIONS
            && rs
                .iter()
                .all(|r| r.size > 0 && r.base.checked_add(r.size).is_some())
            && rs.windows(2).all(|w| w[0].end() < w[1].base)
            && rs.iter().map(|r| r.size).sum::<u64>() == self.total_size
            && self.regions[self.cnt..]
                .iter()
                .all(|r| *r == Region::default())
    }

    fn dump(&self, name: &str, w: &mut impl fmt::Write) -> fmt::Result {
        writeln!(w, " {name}.cnt  = {:#x}", self.cnt)?;
        for (idx, r) in self.as_slice().iter().enumerate() {
            writeln!(
                w,
                " {name}[{idx:#x}]\t[{:#018x}-{:#018x}], {:#018x} bytes flags: 0x0",
                r.base,
                r.end() - 1,
                r.size
            )?;
        }
        Ok(())
    }
}

impl fmt::Debug for RegionArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.as_slice().iter().map(|r| r.base..r.end()))
            .finish()
    }
}

/// The boot-time allocator: memory and reserved ranges (Linux's `struct memblock`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Memblock {
    memory: RegionArray,   // RAM that exists
    reserved: RegionArray, // RAM that is taken; may extend beyond `memory`
    current_limit: u64,    // allocations end at or below this address
    bottom_up: bool,       // allocation direction; top-down by default
}

impl Default for Memblock {
    fn default() -> Self {
        Self::new()
    }
}

impl Memblock {
    /// An empty memblock: no memory, nothing reserved, no limit
    /// (`current_limit == MEMBLOCK_ALLOC_ANYWHERE`), top-down allocation.
    pub const fn new() -> Self {
        Memblock {
            memory: RegionArray::new(),
            reserved: RegionArray::new(),
            current_limit: MEMBLOCK_ALLOC_ANYWHERE,
            bottom_up: false,
        }
    }

    /// `memblock_add`: registers `[base, base + size)` as memory. Overlapping and adjacent
    /// ranges merge. Size 0 does nothing.
    ///
    /// # Errors
    /// [`MemblockError::Overflow`] when the end wraps, [`MemblockError::TooManyRegions`] when
    /// the range needs a new region and `memory` is full; the state is then unchanged.
    pub fn add(&mut self, base: u64, size: u64) -> Result<(), MemblockError> {
        self.memory.add_range(base, size)
    }

    /// `memblock_remove`: removes `[base, base + size)` from memory, splitting a region when
    /// the range falls inside it. Parts that are not memory are ignored.
    ///
    /// # Errors
    /// As [`Memblock::add`]; `TooManyRegions` only when a split needs one more region.
    pub fn remove(&mut self, base: u64, size: u64) -> Result<(), MemblockError> {
        self.memory.remove_range(base, size)
    }

    /// `memblock_reserve`: marks `[base, base + size)` as taken. The range need not be memory.
    ///
    /// # Errors
    /// As [`Memblock::add`], for the `reserved` array.
    pub fn reserve(&mut self, base: u64, size: u64) -> Result<(), MemblockError> {
        self.reserved.add_range(base, size)
    }

    /// `memblock_phys_free`: releases `[base, base + size)` from the reserved ranges, splitting
    /// a reservation when the range falls inside it.
    ///
    /// # Errors
    /// As [`Memblock::remove`], for the `reserved` array.
    pub fn free(&mut self, base: u64, size: u64) -> Result<(), MemblockError> {
        self.reserved.remove_range(base, size)
    }

    /// The memory regions.
    pub fn memory(&self) -> &RegionArray {
        &self.memory
    }

    /// The reserved regions.
    pub fn reserved(&self) -> &RegionArray {
        &self.reserved
    }

    /// `memblock_set_current_limit`: allocations will end at or below `limit`.
    pub fn set_current_limit(&mut self, limit: u64) {
        self.current_limit = limit;
    }

    /// `memblock_get_current_limit`.
    pub fn current_limit(&self) -> u64 {
        self.current_limit
    }

    /// `memblock_set_bottom_up`: allocate from low addresses up (`true`) or from the top down.
    pub fn set_bottom_up(&mut self, enable: bool) {
        self.bottom_up = enable;
    }

    /// `memblock_phys_alloc_range`: finds `size` free bytes (memory, not reserved) aligned to
    /// `align` inside `[start, end)`, reserves them and returns their base.
    ///
    /// - `align` 0 means [`SMP_CACHE_BYTES`] (Linux warns); otherwise it must be a power of two.
    /// - `end` is clamped to the current limit; `0` ([`MEMBLOCK_ALLOC_ACCESSIBLE`]) and
    ///   `u64::MAX` ([`MEMBLOCK_ALLOC_ANYWHERE`]) mean "up to the current limit".
    /// - As Linux, the first page is never handed out: `start` is raised to `PAGE_SIZE`.
    /// - Top-down (default) returns the highest fitting address, bottom-up the lowest.
    ///
    /// Returns `None`, with the state unchanged, when nothing fits, when `size` is 0, when
    /// `align` is not a power of two, or when `reserved` is full.
    pub fn phys_alloc_range(&mut self, size: u64, align: u64, start: u64, end: u64) -> Option<u64> {
        let align = if align == 0 { SMP_CACHE_BYTES } else { align };
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let end = if end == MEMBLOCK_ALLOC_ACCESSIBLE || end == MEMBLOCK_ALLOC_ANYWHERE {
            self.current_limit
        } else {
            end.min(self.current_limit)
        };
        let start = start.max(PAGE);
        let end = end.max(start);
        let base = self.find_in_range(size, align, start, end)?;
        self.reserve(base, size).ok()?;
        Some(base)
    }

    /// `memblock_phys_alloc`: [`Memblock::phys_alloc_range`] anywhere below the current limit.
    pub fn phys_alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        self.phys_alloc_range(size, align, 0, MEMBLOCK_ALLOC_ACCESSIBLE)
    }

    /// `memblock_find_in_range_node`: the free range, without reserving it.
    fn find_in_range(&self, size: u64, align: u64, start: u64, end: u64) -> Option<u64> {
        let top_down = !self.bottom_up;
        self.walk_free(top_down, |a, b| {
            let (a, b) = (a.clamp(start, end), b.clamp(start, end));
            if top_down {
                // __memblock_find_range_top_down
                let cand = align_down(b.checked_sub(size)?, align);
                (cand >= a).then_some(cand)
            } else {
                // __memblock_find_range_bottom_up
                let cand = a.checked_add(align - 1)? & !(align - 1);
                (cand < b && b - cand >= size).then_some(cand)
            }
        })
    }

    /// Calls `f(start, end)` on every free range (memory minus reserved), ascending or, with
    /// `reverse`, descending, until `f` returns `Some`. Ranges are maximal: neither array
    /// has touching regions, so no two yielded ranges touch.
    fn walk_free<T>(&self, reverse: bool, mut f: impl FnMut(u64, u64) -> Option<T>) -> Option<T> {
        let mem = self.memory.as_slice();
        let res = self.reserved.as_slice();
        for k in 0..mem.len() {
            let m = mem[if reverse { mem.len() - 1 - k } else { k }];
            // res[lo..hi] intersect m; the n + 1 gaps around them, clipped to m, are free.
            let lo = res.partition_point(|r| r.end() <= m.base);
            let hi = res.partition_point(|r| r.base < m.end());
            let n = hi - lo;
            for g in 0..=n {
                let g = if reverse { n - g } else { g };
                let a = g
                    .checked_sub(1)
                    .map_or(m.base, |i| res[lo + i].end().max(m.base));
                let b = res[lo..hi].get(g).map_or(m.end(), |r| r.base.min(m.end()));
                if let Some(t) = (a < b).then(|| f(a, b)).flatten() {
                    return Some(t);
                }
            }
        }
        None
    }

    /// `for_each_free_mem_range`: calls `f(base, end)` on every free range (memory minus
    /// reserved), ascending; `end` is exclusive.
    pub fn for_each_free_range(&self, mut f: impl FnMut(u64, u64)) {
        self.walk_free::<()>(false, |a, b| {
            f(a, b);
            None
        });
    }

    /// `memblock_phys_mem_size`: the sum of the memory region sizes.
    pub fn phys_mem_size(&self) -> u64 {
        self.memory.total_size()
    }

    /// `memblock_reserved_size`: the sum of the reserved region sizes.
    pub fn reserved_size(&self) -> u64 {
        self.reserved.total_size()
    }

    /// `memblock_start_of_DRAM`: the lowest memory address; 0 when there is no memory.
    pub fn start_of_dram(&self) -> u64 {
        self.memory.as_slice().first().map_or(0, |r| r.base)
    }

    /// `memblock_end_of_DRAM`: the end of the highest memory region; 0 when there is no memory.
    pub fn end_of_dram(&self) -> u64 {
        self.memory.as_slice().last().map_or(0, Region::end)
    }

    /// `memblock_is_region_memory`: true when `[base, base + size)` is entirely memory (the end
    /// capped at `u64::MAX`). Size 0 asks about `base` alone.
    pub fn is_region_memory(&self, base: u64, size: u64) -> bool {
        let rs = self.memory.as_slice();
        let i = rs.partition_point(|r| r.end() <= base);
        i < rs.len() && rs[i].base <= base && rs[i].end() >= base.saturating_add(size)
    }

    /// `memblock_is_region_reserved`: true when `[base, base + size)` intersects a reserved
    /// region. An empty range intersects nothing.
    pub fn is_region_reserved(&self, base: u64, size: u64) -> bool {
        self.reserved.overlaps(base, size)
    }

    /// `memblock_is_memory`: true when `addr` is inside a memory region.
    pub fn is_memory(&self, addr: u64) -> bool {
        self.memory.contains(addr)
    }

    /// `memblock_is_reserved`: true when `addr` is inside a reserved region.
    pub fn is_reserved(&self, addr: u64) -> bool {
        self.reserved.contains(addr)
    }

    /// `__memblock_dump_all`, as printed with `memblock=debug` (a tab follows each `[0x..]`
    /// index):
    ///
    /// ```text
    /// MEMBLOCK configuration:
    ///  memory size = 0x000000000009e000 reserved size = 0x0000000000001000
    ///  memory.cnt  = 0x1
    ///  memory[0x0] [0x0000000000001000-0x000000000009efff], 0x000000000009e000 bytes flags: 0x0
    ///  reserved.cnt  = 0x1
    ///  reserved[0x0] [0x0000000000001000-0x0000000000001fff], 0x0000000000001000 bytes flags: 0x0
    /// ```
    ///
    /// # Errors
    /// Only those of `w`.
    pub fn dump(&self, w: &mut impl fmt::Write) -> fmt::Result {
        writeln!(w, "MEMBLOCK configuration:")?;
        writeln!(
            w,
            " memory size = {:#018x} reserved size = {:#018x}",
            self.phys_mem_size(),
            self.reserved_size()
        )?;
        self.memory.dump("memory", w)?;
        self.reserved.dump("reserved", w)
    }
}

#[cfg(test)]
mod tests {
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
            let fits =
                |p: &usize| p % align == 0 && p + n <= hi && (*p..*p + n).all(|q| self.free(q));
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
}
