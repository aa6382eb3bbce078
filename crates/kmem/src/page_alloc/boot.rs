//! Boot: from memblock's memory map to a running buddy allocator.
//!
//! The kernel's order (`mm_core_init` and friends):
//!
//! 1. cap memblock allocations at the end of low memory (the direct map);
//! 2. allocate `mem_map` (one [`Page`] per frame between the lowest and highest frame of RAM)
//!    and the per-CPU page sets from memblock, and mark every descriptor reserved;
//! 3. size the zones (spanned, present, managed) and compute `min_free_kbytes`, the
//!    watermarks, `lowmem_reserve` and the per-CPU batch and high marks;
//! 4. `memblock_free_all`: free every unreserved range into the buddy lists, in the largest
//!    aligned blocks that fit, never across a zone boundary.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::AtomicUsize;

use super::mem_map::MemMap;
use super::page::Page;
use super::pcp::PerCpuPages;
use super::slowpath::Reclaim;
use super::zone::Zone;
use super::{BAD_ZONE, PageAlloc, highmem};
use crate::addr::{MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE};
use crate::config::Config;
use crate::gfp::{Gfp, MAX_NR_ZONES, ZoneType, gfp_zone};
use crate::memblock::Memblock;
use crate::platform::{LogLevel, Platform};

/// Why boot failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BootError {
    /// The zone layout is inconsistent.
    BadLayout(&'static str),
    /// memblock holds no memory.
    NoMemory,
    /// memblock could not provide `mem_map` or the per-CPU page sets below the lowmem limit.
    NoBootMemory,
    /// More than 2^32 - 1 frames between the lowest and highest frame of RAM.
    TooManyFrames,
    /// The platform reports no CPU.
    NoCpus,
    /// memblock could not provide the first per-CPU chunk (this many bytes: a 64 KiB unit
    /// per possible CPU) below the lowmem limit (Linux panics: "Failed to initialize percpu
    /// areas").
    NoPercpuMemory(usize),
    /// The boot caches (kmalloc's classes, vmalloc's area tree) could not be allocated.
    NoEarlyCaches,
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::BadLayout(why) => write!(f, "bad zone layout: {why}"),
            BootError::NoMemory => f.write_str("no memory registered with memblock"),
            BootError::NoBootMemory => {
                f.write_str("memblock could not allocate mem_map or the per-CPU page sets")
            }
            BootError::TooManyFrames => f.write_str("physical address span too large"),
            BootError::NoCpus => f.write_str("the platform reports no CPU"),
            BootError::NoPercpuMemory(bytes) => write!(
                f,
                "failed to initialize percpu areas: memblock has no {} KiB below the lowmem \
                 limit for the first chunk (a 64 KiB unit per CPU)",
                bytes >> 10
            ),
            BootError::NoEarlyCaches => {
                f.write_str("the kmalloc caches or the vmalloc area tree could not be allocated")
            }
        }
    }
}

/// What boot measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    /// Size of one page descriptor, in bytes (Linux: 64).
    pub page_desc_size: usize,
    /// Descriptors in `mem_map` (frames from the lowest to the highest of RAM, holes included).
    pub mem_map_entries: usize,
    /// Bytes of memory taken by `mem_map`.
    pub mem_map_bytes: usize,
    /// Bytes taken by the per-CPU page sets.
    pub pcp_bytes: usize,
    /// Frames of RAM (`present`, all zones).
    pub present_pages: usize,
    /// Frames handed to the buddy allocator (`managed`, all zones).
    pub managed_pages: usize,
    /// Frames of RAM kept by memblock reservations (`present - managed`).
    pub reserved_pages: usize,
    /// The `min_free_kbytes` in force.
    pub min_free_kbytes: u64,
}

impl BootInfo {
    /// `mem_map` bytes per 4 KiB page of RAM (holes' descriptors included).
    pub fn mem_map_cost_per_page(&self) -> f64 {
        if self.present_pages == 0 {
            return 0.0;
        }
        self.mem_map_bytes as f64 / self.present_pages as f64
    }
}

fn pfn_up(phys: u64) -> u64 {
    phys.div_ceil(PAGE_SIZE as u64)
}

fn pfn_down(phys: u64) -> u64 {
    phys >> PAGE_SHIFT
}

/// Integer square root (`int_sqrt`).
fn int_sqrt(x: u64) -> u64 {
    if x < 2 {
        return x;
    }
    // Newton's iteration from above: decreasing until it settles on floor(sqrt(x)).
    let mut r = x;
    let mut y = (r + x / r) / 2;
    while y < r {
        r = y;
        y = (r + x / r) / 2;
    }
    r
}

/// `rounddown_pow_of_two`.
fn rounddown_pow2(x: u64) -> u64 {
    if x == 0 {
        0
    } else {
        1 << (63 - x.leading_zeros())
    }
}

impl<P: Platform> PageAlloc<P> {
    /// Boots the page allocator over `memblock`'s memory map.
    ///
    /// `memblock` keeps describing memory afterwards (reserved ranges stay reserved; its
    /// free ranges now belong to the buddy allocator and must not be allocated from it).
    /// Context: boot, single-threaded.
    pub fn boot(memblock: &mut Memblock, config: Config, platform: P) -> Result<Self, BootError> {
        let layout = config.layout;
        layout.validate().map_err(BootError::BadLayout)?;
        let nr_cpus = platform.nr_cpu_ids();
        if nr_cpus == 0 {
            return Err(BootError::NoCpus);
        }
        if memblock.phys_mem_size() == 0 {
            return Err(BootError::NoMemory);
        }
        let lowmem_end = layout.lowmem_end();
        memblock.set_current_limit(memblock.current_limit().min(lowmem_end));

        // The frames described: lowest to highest of RAM, but nothing above the last zone.
        let top = layout.end.iter().flatten().copied().max().unwrap_or(0);
        let base_pfn = pfn_down(memblock.start_of_dram());
        let end_pfn = pfn_up(memblock.end_of_dram().min(top));
        let entries = end_pfn.saturating_sub(base_pfn);
        if entries >= u32::MAX as u64 {
            return Err(BootError::TooManyFrames);
        }
        let entries = entries as usize;
        let dm = platform.direct_map_base();
        // Nothing may be allocated at virtual addresses `0..PAGE_SIZE`: `kfree` relies on
        // the slab lookup refusing null and `ZERO_SIZE_PTR`. Only a direct map at 0 (an
        // identity map) puts a frame there, frame 0, which x86 Linux reserves too.
        if dm == 0 && memblock.start_of_dram() == 0 {
            memblock
                .reserve(0, PAGE_SIZE as u64)
                .map_err(|_| BootError::NoBootMemory)?;
        }

        // mem_map, from memblock, every descriptor reserved and tagged with its zone.
        let mm_bytes = entries * core::mem::size_of::<Page>();
        let mm_phys = memblock
            .phys_alloc(
                mm_bytes.max(1).next_multiple_of(PAGE_SIZE) as u64,
                PAGE_SIZE as u64,
            )
            .ok_or(BootError::NoBootMemory)?;
        let mm_ptr = (dm + mm_phys as usize) as *mut Page;
        for z in ZoneType::ALL {
            let Some((s, e)) = layout.span(z) else {
                continue;
            };
            let (s, e) = (pfn_down(s).max(base_pfn), pfn_up(e).min(end_pfn));
            for pfn in s..e.max(s) {
                // SAFETY: `mm_ptr` points to `entries` descriptors' worth of memory that
                // memblock just reserved for us in the direct map; `pfn - base_pfn < entries`.
                unsafe {
                    mm_ptr
                        .add((pfn - base_pfn) as usize)
                        .write(Page::new_reserved(z as u32))
                };
            }
        }
        // SAFETY: every entry was written above (zone spans cover [0, top) without gaps and
        // `end_pfn <= top`); the memory stays reserved in memblock forever.
        let mm =
            unsafe { MemMap::new(NonNull::new(mm_ptr).expect("direct map"), base_pfn, entries) };

        // Per-CPU page sets.
        let pcp_count = nr_cpus * MAX_NR_ZONES;
        let pcp_bytes = pcp_count * core::mem::size_of::<PerCpuPages>();
        let pcp_phys = memblock
            .phys_alloc(pcp_bytes as u64, 64)
            .ok_or(BootError::NoBootMemory)?;
        let pcp_ptr = (dm + pcp_phys as usize) as *mut PerCpuPages;
        for i in 0..pcp_count {
            // SAFETY: memblock reserved `pcp_bytes` bytes, 64-aligned (PerCpuPages' alignment),
            // in the direct map for us; `i < pcp_count`.
            unsafe { pcp_ptr.add(i).write(PerCpuPages::new()) };
        }

        // Zones: spans, present and managed pages.
        let mut zones = ZoneType::ALL.map(|z| Zone::new(z, layout.has(z)));
        for zone in zones.iter_mut() {
            let Some((s, e)) = layout.span(zone.ztype) else {
                continue;
            };
            let (zs, ze) = (pfn_down(s), pfn_up(e));
            let (start, end) = (zs.max(base_pfn), ze.min(end_pfn));
            if end > start {
                zone.start_pfn = start;
                zone.spanned_pages = (end - start) as usize;
            } else {
                zone.start_pfn = zs.min(end_pfn);
            }
            zone.present_pages = memblock
                .memory()
                .as_slice()
                .iter()
                .map(|r| overlap_pages(pfn_up(r.base), pfn_down(r.end()), start, end))
                .sum();
            let mut managed = 0;
            memblock.for_each_free_range(|b, e| {
                managed += overlap_pages(pfn_up(b), pfn_down(e), start, end);
            });
            zone.managed_pages = managed;
        }

        let min_free_kbytes = config.min_free_kbytes.unwrap_or_else(|| {
            let lowmem_kb: usize = zones
                .iter()
                .filter(|z| z.ztype != ZoneType::HighMem)
                .map(|z| z.managed_pages * (PAGE_SIZE / 1024))
                .sum();
            int_sqrt(lowmem_kb as u64 * 16).clamp(128, 262_144)
        });
        setup_watermarks(&mut zones, min_free_kbytes, config.watermark_scale_factor);
        setup_lowmem_reserve(&mut zones, &config.lowmem_reserve_ratio);
        for zone in zones.iter_mut() {
            setup_pcp(zone, nr_cpus);
        }

        let mut zone_table = [BAD_ZONE; 16];
        for (bits, slot) in zone_table.iter_mut().enumerate() {
            if let Ok(z) = gfp_zone(Gfp(bits as u32)) {
                // OPT_ZONE_DMA, OPT_ZONE_DMA32, OPT_ZONE_HIGHMEM: absent zones mean Normal.
                let z = if layout.has(z) { z } else { ZoneType::Normal };
                *slot = z as u8;
            }
        }

        let zonelists = core::array::from_fn(|highest| {
            let mut zl = super::Zonelist::default();
            for zi in (0..=highest).rev() {
                if zones[zi].managed_pages != 0 {
                    zl.zones[zl.len as usize] = zi as u8;
                    zl.len += 1;
                }
            }
            zl
        });
        let present: usize = zones.iter().map(|z| z.present_pages).sum();
        let managed: usize = zones.iter().map(|z| z.managed_pages).sum();
        let info = BootInfo {
            page_desc_size: core::mem::size_of::<Page>(),
            mem_map_entries: entries,
            mem_map_bytes: mm_bytes,
            pcp_bytes,
            present_pages: present,
            managed_pages: managed,
            reserved_pages: present - managed,
            min_free_kbytes,
        };
        let kmap = highmem::Kmap::new(&platform);
        let lowmem_end_pfn = pfn_down(lowmem_end.min(end_pfn << PAGE_SHIFT)).min(end_pfn);
        let pa = PageAlloc {
            direct_map_base: dm,
            lowmem_end_pfn,
            mm_vbase: dm.wrapping_add((base_pfn as usize) << PAGE_SHIFT),
            direct_bytes: (lowmem_end_pfn.saturating_sub(base_pfn) as usize) << PAGE_SHIFT,
            vmemmap: (mm_ptr as usize).wrapping_sub(
                (dm.wrapping_add((base_pfn as usize) << PAGE_SHIFT) >> PAGE_SHIFT)
                    .wrapping_mul(core::mem::size_of::<Page>()),
            ),
            platform,
            config,
            mm,
            zones,
            zone_table,
            zonelists,
            // SAFETY: `pcp_ptr` is the direct-map address of memory memblock reserved above.
            pcp: unsafe { NonNull::new_unchecked(pcp_ptr) },
            nr_cpus,
            reclaim: Reclaim::new(),
            kmap,
            bad_pages: AtomicUsize::new(0),
            alloc_failures: AtomicUsize::new(0),
            info,
            faults: crate::fault::Faults::new(config.failslab, config.fail_page_alloc),
        };
        pa.free_all_boot_memory(memblock);
        pa.log_boot();
        Ok(pa)
    }

    /// `memblock_free_all`: every free range into the buddy lists.
    fn free_all_boot_memory(&self, memblock: &Memblock) {
        memblock.for_each_free_range(|b, e| {
            let (s, e) = (pfn_up(b), pfn_down(e));
            for zone in &self.zones {
                let (zs, ze) = (s.max(zone.start_pfn), e.min(zone.end_pfn()));
                if ze > zs && zone.spanned_pages != 0 {
                    self.free_range_to_zone(zone, zs, ze);
                }
            }
        });
    }

    fn free_range_to_zone(&self, zone: &Zone, start: u64, end: u64) {
        let mut fl = zone.lock.lock();
        let mut pfn = start;
        while pfn < end {
            let mut order = (pfn.trailing_zeros()).min(MAX_PAGE_ORDER);
            while pfn + (1 << order) > end {
                order -= 1;
            }
            let idx = self.mm.pfn_index(pfn).expect("free range inside mem_map");
            for i in 0..(1u32 << order) {
                self.mm.at(idx + i).set_state(0); // `__ClearPageReserved`
            }
            zone.free_one_page(&mut fl, &self.mm, idx, order);
            pfn += 1 << order;
        }
    }

    fn log_boot(&self) {
        let p = &self.platform;
        p.log(LogLevel::Info, format_args!("Zone ranges:"));
        for z in self.zones.iter().filter(|z| z.configured) {
            if z.spanned_pages == 0 {
                p.log(LogLevel::Info, format_args!("  {:<8} empty", z.name()));
            } else {
                p.log(
                    LogLevel::Info,
                    format_args!(
                        "  {:<8} [mem {:#018x}-{:#018x}]",
                        z.name(),
                        z.start_pfn << PAGE_SHIFT,
                        (z.end_pfn() << PAGE_SHIFT) - 1
                    ),
                );
            }
        }
        let i = &self.info;
        p.log(
            LogLevel::Info,
            format_args!(
                "mem_map: {} page descriptors of {} bytes, {}K ({:.1} bytes per 4K page of RAM)",
                i.mem_map_entries,
                i.page_desc_size,
                i.mem_map_bytes / 1024,
                i.mem_map_cost_per_page()
            ),
        );
        p.log(
            LogLevel::Info,
            format_args!(
                "Memory: {}K/{}K available ({}K reserved)",
                i.managed_pages * 4,
                i.present_pages * 4,
                i.reserved_pages * 4
            ),
        );
    }
}

fn overlap_pages(a: u64, b: u64, c: u64, d: u64) -> usize {
    let (s, e) = (a.max(c), b.min(d));
    e.saturating_sub(s) as usize
}

/// `__setup_per_zone_wmarks`.
fn setup_watermarks(zones: &mut [Zone; MAX_NR_ZONES], min_free_kbytes: u64, scale: u32) {
    let pages_min = min_free_kbytes >> (PAGE_SHIFT - 10);
    let lowmem_pages: u64 = zones
        .iter()
        .filter(|z| z.ztype != ZoneType::HighMem)
        .map(|z| z.managed_pages as u64)
        .sum();
    for zone in zones.iter_mut() {
        let managed = zone.managed_pages as u64;
        let tmp = (pages_min * managed).checked_div(lowmem_pages).unwrap_or(0);
        let min = if zone.ztype == ZoneType::HighMem {
            (managed / 1024).clamp(32, 128)
        } else {
            tmp
        };
        let step = (tmp >> 2).max(managed * scale as u64 / 10_000);
        zone.watermark = [
            min as usize,
            (min + step) as usize,
            (min + 2 * step) as usize,
            (min + 3 * step) as usize,
        ];
    }
}

/// `setup_per_zone_lowmem_reserve`.
fn setup_lowmem_reserve(zones: &mut [Zone; MAX_NR_ZONES], ratio: &[u32; MAX_NR_ZONES]) {
    let managed: [usize; MAX_NR_ZONES] = core::array::from_fn(|i| zones[i].managed_pages);
    for i in 0..MAX_NR_ZONES {
        let clear = ratio[i] == 0 || managed[i] == 0;
        let mut upper = 0;
        zones[i].lowmem_reserve = [0; MAX_NR_ZONES];
        for (j, &m) in managed.iter().enumerate().skip(i + 1) {
            upper += m;
            // Linux counts empty upper zones too (eae116d1f044 reverted skipping them): a
            // 2 GiB x86_64 machine still protects DMA from GFP_KERNEL's Normal-first walk.
            if !clear {
                zones[i].lowmem_reserve[j] = upper / ratio[i] as usize;
            }
        }
    }
}

/// `zone_batchsize` and `zone_highsize` (with `percpu_pagelist_high_fraction` = 0).
fn setup_pcp(zone: &mut Zone, nr_cpus: usize) {
    let managed = zone.managed_pages as u64;
    let mut batch = (managed >> 10).min((1 << 20) / PAGE_SIZE as u64) / 4;
    if batch < 1 {
        batch = 1;
    }
    let batch = (rounddown_pow2(batch + batch / 2) - 1).max(1);
    let high = (zone.wmark(super::zone::Wmark::Low) as u64 / nr_cpus as u64).max(batch << 2);
    let high_max = (managed / 8 / nr_cpus as u64).max(batch << 2);
    zone.pcp_batch = batch as u32;
    zone.pcp_high = high.min(u32::MAX as u64) as u32;
    zone.pcp_high_max = high_max.min(u32::MAX as u64) as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_sample_figures() {
        // /proc/zoneinfo of a 24 GiB machine: DMA32 managed 772915 -> batch 63,
        // min 8182 -> low 10227; DMA managed 3840 gets protection 3019 against DMA32.
        let mut zones = ZoneType::ALL.map(|z| Zone::new(z, z != ZoneType::HighMem));
        zones[0].managed_pages = 3840;
        zones[1].managed_pages = 772_915;
        zones[2].managed_pages = 819_200;
        setup_lowmem_reserve(&mut zones, &[256, 256, 32, 0]);
        assert_eq!(zones[0].lowmem_reserve[..3], [0, 3019, 6219]);
        assert_eq!(zones[1].lowmem_reserve[..3], [0, 0, 3200]);
        // An empty upper zone still counts (the sample's Movable column): 6219, not 0.
        assert_eq!(zones[0].lowmem_reserve[3], 6219);
        zones[2].managed_pages = 0;
        setup_lowmem_reserve(&mut zones, &[256, 256, 32, 0]);
        assert_eq!(zones[0].lowmem_reserve[..3], [0, 3019, 3019]);
        setup_pcp(&mut zones[1], 2);
        assert_eq!(zones[1].pcp_batch, 63);
        assert_eq!(zones[1].pcp_high_max, 48307);
        assert_eq!(int_sqrt(99), 9);
        assert_eq!(int_sqrt(100), 10);
        assert_eq!(rounddown_pow2(96), 64);
    }

    #[test]
    fn watermark_steps() {
        let mut zones = ZoneType::ALL.map(|z| Zone::new(z, z != ZoneType::HighMem));
        zones[1].managed_pages = 772_915;
        // min_free_kbytes chosen so DMA32's share is 8182 pages when it is the only zone.
        setup_watermarks(&mut zones, 8182 * 4 + 3, 10);
        assert_eq!(zones[1].watermark[0], 8182);
        assert_eq!(zones[1].watermark[1], 10227);
        assert_eq!(zones[1].watermark[2], 12272);
        assert_eq!(zones[1].watermark[3], 14317);
    }
}
