//! The area allocator inside one chunk (`pcpu_alloc_area` / `pcpu_free_area`).
//!
//! A unit of [`PCPU_UNIT_SIZE`] bytes is cut into [`PCPU_MIN_ALLOC_SIZE`]-byte bits. Two
//! bitmaps describe it, as in Linux:
//!
//! * `alloc`: a bit is set while the 4 bytes it stands for belong to an allocation;
//! * `bound`: a bit is set at the first bit of every allocation and at the bit just past it
//!   (so the size of an allocation is the distance from its start to the next bound bit).
//!
//! Allocation is first fit from the lowest free bit, with the start aligned to the request's
//! alignment (at most a page; the unit itself is page aligned). A free checks that its offset
//! starts a live allocation before clearing anything, so a double free or a pointer into the
//! middle of an area is refused with the maps unchanged.

use super::{PCPU_MIN_ALLOC_SIZE, PCPU_UNIT_SIZE};

/// Bits in a chunk's maps: one per [`PCPU_MIN_ALLOC_SIZE`] bytes of a unit.
pub(crate) const MAP_BITS: usize = PCPU_UNIT_SIZE / PCPU_MIN_ALLOC_SIZE;
const WORDS: usize = MAP_BITS / 64;

/// The allocation state of one chunk (the same for every unit: one offset is valid in all).
pub(crate) struct AreaMap {
    alloc: [u64; WORDS],
    bound: [u64; WORDS + 1], // one bit more: the bound just past an area that ends the unit
    free_bits: usize,
    first_free: usize, // no free bit below this one
    nr_alloc: usize,
}

#[inline]
fn get(map: &[u64], bit: usize) -> bool {
    map[bit / 64] & (1 << (bit % 64)) != 0
}

#[inline]
fn set(map: &mut [u64], bit: usize) {
    map[bit / 64] |= 1 << (bit % 64);
}

/// Sets (`value`) or clears bits `[start, end)`, a word at a time.
fn fill(map: &mut [u64], start: usize, end: usize, value: bool) {
    let mut bit = start;
    while bit < end {
        let w = bit / 64;
        let lo = bit % 64;
        let hi = (end - w * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        if value {
            map[w] |= mask;
        } else {
            map[w] &= !mask;
        }
        bit = w * 64 + hi;
    }
}

/// The first bit at or above `from` whose value is `value`, or `limit` if none below it.
fn find_next(map: &[u64], from: usize, limit: usize, value: bool) -> usize {
    if from >= limit {
        return limit;
    }
    let mut w = from / 64;
    let invert = if value { 0 } else { u64::MAX };
    let mut word = (map[w] ^ invert) & (u64::MAX << (from % 64));
    loop {
        if word != 0 {
            return (w * 64 + word.trailing_zeros() as usize).min(limit);
        }
        w += 1;
        if w * 64 >= limit {
            return limit;
        }
        word = map[w] ^ invert;
    }
}

impl AreaMap {
    /// An empty map: every bit free.
    pub(crate) const fn new() -> AreaMap {
        AreaMap {
            alloc: [0; WORDS],
            bound: [0; WORDS + 1],
            free_bits: MAP_BITS,
            first_free: 0,
            nr_alloc: 0,
        }
    }

    /// Free bytes in the unit.
    pub(crate) fn free_bytes(&self) -> usize {
        self.free_bits * PCPU_MIN_ALLOC_SIZE
    }

    /// Live allocations.
    pub(crate) fn nr_alloc(&self) -> usize {
        self.nr_alloc
    }

    /// True when nothing is allocated.
    pub(crate) fn is_empty(&self) -> bool {
        self.nr_alloc == 0
    }

    /// Finds and takes `bits` bits whose first is a multiple of `align_bits` (a power of two).
    /// Returns the first bit, or `None` when no free run fits.
    pub(crate) fn alloc(&mut self, bits: usize, align_bits: usize) -> Option<usize> {
        debug_assert!(bits > 0 && bits <= MAP_BITS && align_bits.is_power_of_two());
        if bits > self.free_bits {
            return None;
        }
        let mut pos = self.first_free;
        let start = loop {
            let free = find_next(&self.alloc, pos, MAP_BITS, false);
            let start = free.next_multiple_of(align_bits);
            if start + bits > MAP_BITS {
                return None;
            }
            if get(&self.alloc, start) {
                // Aligning moved the start into a used run: look past it.
                pos = start;
                continue;
            }
            let end = find_next(&self.alloc, start, start + bits, true);
            if end == start + bits {
                break start;
            }
            pos = end;
        };
        fill(&mut self.alloc, start, start + bits, true);
        set(&mut self.bound, start);
        fill(&mut self.bound, start + 1, start + bits, false);
        set(&mut self.bound, start + bits);
        self.free_bits -= bits;
        self.nr_alloc += 1;
        if start == self.first_free {
            self.first_free = find_next(&self.alloc, start + bits, MAP_BITS, false);
        }
        Some(start)
    }

    /// Frees the allocation starting at bit `start`; returns its size in bits, or `None`
    /// (changing nothing) when `start` does not begin a live allocation.
    pub(crate) fn free(&mut self, start: usize) -> Option<usize> {
        if start >= MAP_BITS || !get(&self.bound, start) || !get(&self.alloc, start) {
            return None;
        }
        let end = find_next(&self.bound, start + 1, MAP_BITS, true);
        let bits = end - start;
        // The bound bits stay: `start`'s may be the end of the area before this one, and
        // stale ones inside free space are cleared when an allocation covers them.
        fill(&mut self.alloc, start, end, false);
        self.free_bits += bits;
        self.nr_alloc -= 1;
        self.first_free = self.first_free.min(start);
        Some(bits)
    }

    /// The size in bits of the live allocation starting at `start`, if there is one.
    pub(crate) fn size_of(&self, start: usize) -> Option<usize> {
        if start >= MAP_BITS || !get(&self.bound, start) || !get(&self.alloc, start) {
            return None;
        }
        Some(find_next(&self.bound, start + 1, MAP_BITS, true) - start)
    }

    /// The longest run of free bits (`contig_hint`), by a scan.
    pub(crate) fn largest_free(&self) -> usize {
        let mut best = 0;
        let mut pos = 0;
        while pos < MAP_BITS {
            let start = find_next(&self.alloc, pos, MAP_BITS, false);
            let end = find_next(&self.alloc, start, MAP_BITS, true);
            best = best.max(end - start);
            pos = end;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn first_fit_with_alignment() {
        let mut m = AreaMap::new();
        assert_eq!(m.alloc(1, 1), Some(0));
        assert_eq!(m.alloc(3, 1), Some(1));
        // Aligned to 16 bytes (4 bits): the next multiple of 4 at or above bit 4.
        assert_eq!(m.alloc(2, 4), Some(4));
        assert_eq!(m.alloc(1, 1), Some(6));
        assert_eq!(m.nr_alloc(), 4);
        assert_eq!(m.free_bytes(), PCPU_UNIT_SIZE - 7 * 4);
        // Freeing the second area makes bits 1..4 the first fit again.
        assert_eq!(m.free(1), Some(3));
        assert_eq!(m.alloc(2, 1), Some(1));
        assert_eq!(m.alloc(2, 1), Some(7));
        assert_eq!(m.alloc(1, 1), Some(3));
    }

    #[test]
    fn free_checks_its_offset() {
        let mut m = AreaMap::new();
        let a = m.alloc(8, 1).unwrap();
        let b = m.alloc(8, 1).unwrap();
        assert_eq!(m.free(a + 1), None, "interior bit");
        assert_eq!(m.free(a), Some(8));
        assert_eq!(m.free(a), None, "double free");
        // The bound just past `a` is `b`'s start: still a live allocation, of its own size.
        assert_eq!(m.size_of(b), Some(8));
        assert_eq!(m.free(b + 8), None, "the stale bound past the last area");
        assert_eq!(m.free(MAP_BITS), None);
        assert_eq!(m.free(b), Some(8));
        assert!(m.is_empty());
        assert_eq!(m.free_bytes(), PCPU_UNIT_SIZE);
    }

    #[test]
    fn interior_stale_bounds_do_not_split_a_new_area() {
        let mut m = AreaMap::new();
        let a: Vec<usize> = (0..4).map(|_| m.alloc(2, 1).unwrap()).collect();
        for &s in &a {
            m.free(s).unwrap();
        }
        // One area over the four old ones: its size must be 8 bits, not 2.
        let big = m.alloc(8, 1).unwrap();
        assert_eq!(big, 0);
        assert_eq!(m.size_of(big), Some(8));
        assert_eq!(m.free(big), Some(8));
    }

    #[test]
    fn fills_the_whole_unit_and_no_more() {
        let mut m = AreaMap::new();
        assert_eq!(m.alloc(MAP_BITS, 1024), Some(0));
        assert_eq!(m.alloc(1, 1), None);
        assert_eq!(m.free(0), Some(MAP_BITS));
        assert_eq!(m.largest_free(), MAP_BITS);
        // Page-aligned pieces: 16 of 4 KiB.
        for i in 0..PCPU_UNIT_SIZE / 4096 {
            assert_eq!(m.alloc(1, 1024), Some(i * 1024));
        }
        assert_eq!(m.alloc(1, 1024), None);
        assert_eq!(m.largest_free(), 1023);
        assert_eq!(m.alloc(1023, 1), Some(1));
    }

    #[test]
    fn random_against_a_model() {
        // A byte-per-bit model; a simple generator keeps the test deterministic.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut m = AreaMap::new();
        let mut model = std::vec![false; MAP_BITS];
        let mut live: Vec<(usize, usize)> = Vec::new();
        for _ in 0..6_000 {
            if live.is_empty() || rnd(3) != 0 {
                let bits = 1 + rnd(64);
                let align = 1 << rnd(6);
                match m.alloc(bits, align) {
                    Some(s) => {
                        assert_eq!(s % align, 0);
                        assert!(model[s..s + bits].iter().all(|&u| !u), "overlap at {s}");
                        // First fit: no aligned free run of this size lies below `s`.
                        let mut t = 0;
                        while t < s {
                            assert!(model[t..t + bits].iter().any(|&u| u), "fit at {t} < {s}");
                            t += align;
                        }
                        model[s..s + bits].iter_mut().for_each(|u| *u = true);
                        live.push((s, bits));
                    }
                    None => {
                        let mut t = 0;
                        while t + bits <= MAP_BITS {
                            assert!(model[t..t + bits].iter().any(|&u| u), "missed fit at {t}");
                            t += align;
                        }
                    }
                }
            } else {
                let (s, bits) = live.swap_remove(rnd(live.len()));
                assert_eq!(m.free(s), Some(bits));
                model[s..s + bits].iter_mut().for_each(|u| *u = false);
            }
            let used = model.iter().filter(|&&u| u).count();
            assert_eq!(m.free_bytes(), (MAP_BITS - used) * PCPU_MIN_ALLOC_SIZE);
        }
        for (s, bits) in live {
            assert_eq!(m.free(s), Some(bits));
        }
        assert!(m.is_empty());
        assert_eq!(m.largest_free(), MAP_BITS);
    }
}
