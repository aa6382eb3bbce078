//! Boot configuration: the zone layout and the tunables a kernel takes from its command line
//! or sysctls (`min_free_kbytes`, `lowmem_reserve_ratio`, `watermark_scale_factor`, ...).
//!
//! [`Config::default`] is the x86_64 layout with Linux's default tunables.

use crate::fault::FaultParams;
use crate::gfp::{MAX_NR_ZONES, ZoneType};

/// Where each zone ends in physical memory.
///
/// Zone `i` spans from the end of the previous *configured* zone to `end[i]` (exclusive);
/// `None` means the zone is not configured on this architecture (no HighMem on x86_64, no DMA32
/// on x86_32). Memory above the last configured zone's end is not used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ZoneLayout {
    /// A name for reports ("x86_64", "x86_32", "custom").
    pub name: &'static str,
    /// Exclusive physical end of each zone, indexed by [`ZoneType`].
    pub end: [Option<u64>; MAX_NR_ZONES],
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

impl ZoneLayout {
    /// x86_64: DMA below 16 MiB, DMA32 below 4 GiB, Normal above; no HighMem.
    pub const X86_64: ZoneLayout = ZoneLayout {
        name: "x86_64",
        end: [Some(16 * MIB), Some(4 * GIB), Some(u64::MAX), None],
    };

    /// x86_32: DMA below 16 MiB, Normal below 896 MiB (the direct map), HighMem above.
    pub const X86_32: ZoneLayout = ZoneLayout {
        name: "x86_32",
        end: [Some(16 * MIB), None, Some(896 * MIB), Some(u64::MAX)],
    };

    /// True when zone `z` exists in this layout.
    pub const fn has(&self, z: ZoneType) -> bool {
        self.end[z as usize].is_some()
    }

    /// The physical range `[start, end)` of zone `z`, if configured.
    pub fn span(&self, z: ZoneType) -> Option<(u64, u64)> {
        let end = self.end[z.index()]?;
        let start = self.end[..z.index()]
            .iter()
            .rev()
            .find_map(|e| *e)
            .unwrap_or(0);
        Some((start, end))
    }

    /// The zone that physical address `phys` belongs to.
    pub fn zone_of(&self, phys: u64) -> Option<ZoneType> {
        ZoneType::ALL
            .into_iter()
            .find(|&z| self.span(z).is_some_and(|(s, e)| phys >= s && phys < e))
    }

    /// Where low memory ends: the start of HighMem, or everything when there is none. The
    /// direct map covers `[0, lowmem_end)`; memblock allocations stay below it.
    pub fn lowmem_end(&self) -> u64 {
        match self.span(ZoneType::HighMem) {
            Some((start, _)) => start,
            None => u64::MAX,
        }
    }

    /// Checks that configured zones end in increasing order.
    pub fn validate(&self) -> Result<(), &'static str> {
        let mut prev = 0;
        for e in self.end.iter().flatten() {
            if *e <= prev {
                return Err("zone ends must increase");
            }
            prev = *e;
        }
        if !self.has(ZoneType::Normal) {
            return Err("ZONE_NORMAL must be configured");
        }
        Ok(())
    }
}

/// Boot-time configuration of the allocator core.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Zone bounds.
    pub layout: ZoneLayout,
    /// `vm.min_free_kbytes`; `None` computes Linux's default (`sqrt(lowmem_kbytes * 16)`,
    /// clamped to 128..=262144).
    pub min_free_kbytes: Option<u64>,
    /// `vm.lowmem_reserve_ratio`, indexed by zone: Linux's 256, 256, 32, 0.
    pub lowmem_reserve_ratio: [u32; MAX_NR_ZONES],
    /// `vm.watermark_scale_factor` (in 1/10000 of a zone): Linux's 10.
    pub watermark_scale_factor: u32,
    /// Reclaim rounds without progress before a `__GFP_RETRY_MAYFAIL` (or, lacking an OOM
    /// killer, any non-`__GFP_NOFAIL`) allocation fails: Linux's `MAX_RECLAIM_RETRIES` (16).
    pub reclaim_retries: u32,
    /// How long one round of the slow path waits for a free before retrying, in ns.
    pub reclaim_wait_ns: u64,
    /// Zero every page as it is freed (`init_on_free=1`).
    pub init_on_free: bool,
    /// Zero every page as it is allocated (`init_on_alloc=1`).
    pub init_on_alloc: bool,
    /// Merge compatible slab caches (Linux's default; `slab_nomerge` turns it off).
    pub slab_merge: bool,
    /// `failslab=<interval>,<probability>,<space>,<times>`: fault injection into slab
    /// allocations (see [`crate::fault`]); disabled by default.
    pub failslab: FaultParams,
    /// `fail_page_alloc=<interval>,<probability>,<space>,<times>`: fault injection into the
    /// page allocator (see [`crate::fault`]); disabled by default.
    pub fail_page_alloc: FaultParams,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            layout: ZoneLayout::X86_64,
            min_free_kbytes: None,
            lowmem_reserve_ratio: [256, 256, 32, 0],
            watermark_scale_factor: 10,
            reclaim_retries: 16,
            reclaim_wait_ns: 2_000_000,
            init_on_free: false,
            init_on_alloc: false,
            slab_merge: true,
            failslab: FaultParams::DISABLED,
            fail_page_alloc: FaultParams::DISABLED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stock_layouts() {
        let l = ZoneLayout::X86_64;
        l.validate().unwrap();
        assert_eq!(l.span(ZoneType::Dma), Some((0, 16 * MIB)));
        assert_eq!(l.span(ZoneType::Dma32), Some((16 * MIB, 4 * GIB)));
        assert_eq!(l.span(ZoneType::Normal), Some((4 * GIB, u64::MAX)));
        assert_eq!(l.span(ZoneType::HighMem), None);
        assert_eq!(l.lowmem_end(), u64::MAX);
        assert_eq!(l.zone_of(5 * GIB), Some(ZoneType::Normal));

        let l = ZoneLayout::X86_32;
        l.validate().unwrap();
        assert_eq!(l.span(ZoneType::Normal), Some((16 * MIB, 896 * MIB)));
        assert_eq!(l.span(ZoneType::HighMem), Some((896 * MIB, u64::MAX)));
        assert_eq!(l.lowmem_end(), 896 * MIB);
        assert_eq!(l.zone_of(0), Some(ZoneType::Dma));
        assert_eq!(l.zone_of(1 << 30), Some(ZoneType::HighMem));
    }

    #[test]
    fn bad_layouts() {
        let mut l = ZoneLayout::X86_64;
        l.end[1] = Some(MIB);
        assert!(l.validate().is_err());
        l = ZoneLayout::X86_64;
        l.end[2] = None;
        assert!(l.validate().is_err());
    }
}
