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
mod tests;
