//! [`Machine`]: a simulated computer running kmem.
//!
//! A machine is a physical memory map (RAM ranges with holes, boot reservations), a number of
//! virtual CPUs and a kmem [`Config`]. [`Machine::boot`] creates the [`HostedPlatform`]
//! (memfd-backed physical memory, the direct map, kmap and vmalloc windows), registers the
//! memory map with memblock as firmware would, and boots kmem over it.
//!
//! [`MachineConfig::default`] is a small PC: x86_64 zones, 4 CPUs, RAM at 0–640 KiB,
//! 1 MiB–3 GiB and 4–5 GiB (a PCI hole below 4 GiB), the first page and a 32 MiB kernel image
//! at 16 MiB reserved. Physical memory is sparse: only what is touched costs host memory.
//!
//! # Boot buffers
//!
//! [`MachineConfig::boot_buffers`] lists large buffers to set aside at boot, as a kernel does
//! for `kmem_reserve=<name>:<size>[@<align>]` on its command line (parsed by
//! [`kmem::cmdline::parse_reserve`]). Each is carved out of memblock below the low-memory
//! limit *before* the buddy allocator takes memory over, so it is physically contiguous,
//! direct-mapped, of any size (far above the 4 MiB a buddy block can have), and never seen by
//! the page allocator: it stays reserved in memblock and is not counted in `MemTotal`. A
//! driver finds its buffer with [`Machine::boot_buffer`]. As in Linux, only code present at
//! boot can have memory reserved this way: after boot the call only returns what was
//! reserved then.

use std::fmt;
use std::ops::Deref;

use kmem::Kmem;
use kmem::addr::{PAGE_SHIFT, PAGE_SIZE, Pfn, PhysAddr, VirtAddr};
use kmem::config::{Config, ZoneLayout};
use kmem::memblock::Memblock;
use kmem::page_alloc::BootError;
use kmem::platform::{LogLevel, Platform};
use kmem::report;

use crate::platform::{HostedPlatform, MemorySpec};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A machine's description.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// RAM ranges `(base, size)`, as an e820 map lists them.
    pub ram: Vec<(u64, u64)>,
    /// Ranges reserved before the page allocator starts `(base, size)`: firmware, the kernel
    /// image, boot-time buffers.
    pub reserved: Vec<(u64, u64)>,
    /// Number of virtual CPUs.
    pub nr_cpus: usize,
    /// Size of the kmap window, in pages.
    pub kmap_pages: usize,
    /// Size of the vmalloc range, in bytes.
    pub vmalloc_size: u64,
    /// The core's configuration (zone layout and tunables).
    pub kmem: Config,
    /// Buffers reserved at boot, `(name, size, align)` in bytes: physically contiguous,
    /// direct-mapped, taken from memblock before the buddy allocator starts (see the
    /// [module docs](self)). The size is rounded up to whole pages and the alignment (a power
    /// of two; 0 means a page) raised to at least a page. Empty by default.
    pub boot_buffers: Vec<(String, u64, u64)>,
    /// The kernel command line this configuration was made from
    /// ([`MachineConfig::with_cmdline`]), with what it asked for that the fields above do not
    /// hold; its log lines are the first the machine prints. `None` by default.
    pub boot_params: Option<crate::boot_params::BootParams>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            ram: vec![(0x1000, 0x9f000), (MIB, 3 * GIB - MIB), (4 * GIB, GIB)],
            reserved: vec![(16 * MIB, 32 * MIB)],
            nr_cpus: 4,
            kmap_pages: 512,
            vmalloc_size: GIB,
            kmem: Config::default(),
            boot_buffers: Vec::new(),
            boot_params: None,
        }
    }
}

impl MachineConfig {
    /// An x86_64 machine with `ram` bytes of RAM from address 0 up, no holes, no reservation.
    pub fn x86_64(ram: u64) -> MachineConfig {
        MachineConfig {
            ram: vec![(0, ram)],
            reserved: Vec::new(),
            ..MachineConfig::default()
        }
    }

    /// An x86_32 machine (DMA, Normal below 896 MiB, HighMem above) with `ram` bytes of RAM.
    pub fn x86_32(ram: u64) -> MachineConfig {
        let mut c = MachineConfig::x86_64(ram);
        c.kmem.layout = ZoneLayout::X86_32;
        c
    }

    /// The same machine with `n` CPUs.
    pub fn with_cpus(mut self, n: usize) -> MachineConfig {
        self.nr_cpus = n;
        self
    }

    /// The same machine with `[base, base + size)` reserved at boot.
    pub fn with_reserved(mut self, base: u64, size: u64) -> MachineConfig {
        self.reserved.push((base, size));
        self
    }

    /// The same machine with `[base, base + size)` removed from RAM (a hole).
    pub fn with_hole(mut self, base: u64, size: u64) -> MachineConfig {
        let end = base + size;
        self.ram = self
            .ram
            .iter()
            .flat_map(|&(b, s)| {
                let e = b + s;
                let mut parts = Vec::new();
                if b < base.min(e) {
                    parts.push((b, base.min(e) - b));
                }
                if end.max(b) < e {
                    parts.push((end.max(b), e - end.max(b)));
                }
                parts
            })
            .collect();
        self
    }

    /// The same machine with a boot buffer `name` of `size` bytes aligned to `align`
    /// (`kmem_reserve=name:size@align`); see [`MachineConfig::boot_buffers`].
    pub fn with_boot_buffer(mut self, name: &str, size: u64, align: u64) -> MachineConfig {
        self.boot_buffers.push((name.to_string(), size, align));
        self
    }

    /// Sum of the RAM ranges, in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|r| r.1).sum()
    }
}

/// Why a machine did not boot.
#[derive(Debug)]
pub enum MachineError {
    /// The host refused the memory or mappings.
    Host(std::io::Error),
    /// The memory map could not be registered with memblock.
    Memblock(String),
    /// kmem's boot failed.
    Boot(BootError),
}

impl fmt::Display for MachineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MachineError::Host(e) => write!(f, "host: {e}"),
            MachineError::Memblock(e) => write!(f, "memblock: {e}"),
            MachineError::Boot(e) => write!(f, "boot: {e}"),
        }
    }
}

impl std::error::Error for MachineError {}

/// A buffer reserved at boot ([`MachineConfig::boot_buffers`]): `size` bytes at physical
/// address `phys`, physically contiguous, mapped at `virt` in the direct map.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BootBuffer {
    /// First byte, physical (page aligned, at least as aligned as asked).
    pub phys: PhysAddr,
    /// First byte in the direct map.
    pub virt: VirtAddr,
    /// Size in bytes, as asked (the reservation is rounded up to whole pages).
    pub size: usize,
}

impl BootBuffer {
    /// The first byte as a pointer (the buffer is `size` bytes, valid for the machine's life).
    pub fn as_ptr(&self) -> *mut u8 {
        self.virt.as_ptr()
    }

    /// The frames it covers, `[first, end)`.
    pub fn pfns(&self) -> std::ops::Range<u64> {
        let first = self.phys.pfn().0;
        first..first + self.size.div_ceil(PAGE_SIZE) as u64
    }
}

/// A booted simulated machine. Dereferences to its [`Kmem`].
pub struct Machine {
    kmem: Box<Kmem<HostedPlatform>>,
    memblock: Memblock,
    config: MachineConfig,
    boot_buffers: Vec<(String, BootBuffer)>,
}

impl Machine {
    /// Boots a machine: host memory and mappings, memblock, then kmem.
    pub fn boot(config: MachineConfig) -> Result<Machine, MachineError> {
        let top = config.ram.iter().map(|&(b, s)| b + s).max().unwrap_or(0);
        let phys_size = top.next_multiple_of(4096).max(4096);
        let spec = MemorySpec {
            phys_size,
            direct_map_size: phys_size.min(config.kmem.layout.lowmem_end()),
            kmap_pages: config.kmap_pages,
            vmalloc_size: config.vmalloc_size,
            nr_cpus: config.nr_cpus,
        };
        let platform = HostedPlatform::new(spec).map_err(MachineError::Host)?;
        for line in config.boot_params.iter().flat_map(|b| b.log()) {
            platform.log(LogLevel::Info, format_args!("{line}"));
        }
        let mut memblock = Memblock::new();
        for &(b, s) in &config.ram {
            memblock
                .add(b, s)
                .map_err(|e| MachineError::Memblock(format!("add {b:#x}+{s:#x}: {e}")))?;
        }
        for &(b, s) in &config.reserved {
            memblock
                .reserve(b, s)
                .map_err(|e| MachineError::Memblock(format!("reserve {b:#x}+{s:#x}: {e}")))?;
        }
        let reserved = reserve_boot_buffers(&mut memblock, &config, &platform);
        let kmem = Kmem::boot(&mut memblock, config.kmem, platform).map_err(MachineError::Boot)?;
        let kmem = Box::new(kmem);
        // SAFETY: the subsystem is boxed and owned by the machine: it stays at this address
        // until the machine is dropped.
        unsafe { kmem.late_init() };
        let boot_buffers = reserved
            .into_iter()
            .filter_map(|(name, phys, size)| {
                let page = kmem.pfn_to_page(Pfn(phys >> PAGE_SHIFT))?;
                let virt = kmem.page_address(page)?;
                let size = usize::try_from(size).ok()?;
                Some((
                    name,
                    BootBuffer {
                        phys: PhysAddr(phys),
                        virt,
                        size,
                    },
                ))
            })
            .collect();
        Ok(Machine {
            kmem,
            memblock,
            config,
            boot_buffers,
        })
    }

    /// The buffer reserved at boot under `name` ([`MachineConfig::boot_buffers`]), or `None`
    /// if none was asked for or the reservation failed (reported in the boot log).
    ///
    /// Only code present at boot can ask for a reservation, as in Linux: once the buddy
    /// allocator owns memory, a large physically contiguous range can no longer be promised,
    /// so after boot this only returns what was reserved then. The buffer lives as long as
    /// the machine; its contents are the caller's (not zeroed).
    pub fn boot_buffer(&self, name: &str) -> Option<BootBuffer> {
        self.boot_buffers
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, b)| b)
    }

    /// Every buffer reserved at boot, with its name, in the order asked for.
    pub fn boot_buffers(&self) -> impl Iterator<Item = (&str, BootBuffer)> {
        self.boot_buffers.iter().map(|(n, b)| (n.as_str(), *b))
    }

    /// Boots [`MachineConfig::default`].
    pub fn boot_default() -> Result<Machine, MachineError> {
        Machine::boot(MachineConfig::default())
    }

    /// The kmem instance.
    pub fn kmem(&self) -> &Kmem<HostedPlatform> {
        &self.kmem
    }

    /// The platform: memory, CPUs, log.
    pub fn platform(&self) -> &HostedPlatform {
        self.kmem.platform()
    }

    /// memblock as boot left it (its reservations include `mem_map`).
    pub fn memblock(&self) -> &Memblock {
        &self.memblock
    }

    /// The configuration this machine booted with.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// `/proc/buddyinfo`.
    pub fn proc_buddyinfo(&self) -> String {
        let mut s = String::new();
        report::buddyinfo(self.kmem.pages(), &mut s).expect("String never fails");
        s
    }

    /// `/proc/zoneinfo`.
    pub fn proc_zoneinfo(&self) -> String {
        let mut s = String::new();
        report::zoneinfo(self.kmem.pages(), &mut s).expect("String never fails");
        s
    }

    /// `/proc/meminfo`.
    pub fn proc_meminfo(&self) -> String {
        let mut s = String::new();
        report::meminfo(&self.kmem, &mut s).expect("String never fails");
        s
    }

    /// `/proc/slabinfo`.
    pub fn proc_slabinfo(&self) -> String {
        let mut s = String::new();
        report::slabinfo(self.kmem.pages(), self.kmem.slab(), &mut s).expect("String never fails");
        s
    }

    /// `/proc/vmallocinfo`.
    pub fn proc_vmallocinfo(&self) -> String {
        let mut s = String::new();
        report::vmallocinfo(&self.kmem, &mut s).expect("String never fails");
        s
    }

    /// `/proc/pagetypeinfo` (see [`report::pagetypeinfo`] for how kmem, which has no
    /// migrate types, renders it).
    pub fn proc_pagetypeinfo(&self) -> String {
        let mut s = String::new();
        report::pagetypeinfo(self.kmem.pages(), &self.memblock, &mut s)
            .expect("String never fails");
        s
    }

    /// The report named as under `/proc` ("buddyinfo", "zoneinfo", "meminfo", "slabinfo",
    /// "vmallocinfo", "pagetypeinfo").
    pub fn proc(&self, name: &str) -> Option<String> {
        match name {
            "pagetypeinfo" => Some(self.proc_pagetypeinfo()),
            "vmallocinfo" => Some(self.proc_vmallocinfo()),
            "buddyinfo" => Some(self.proc_buddyinfo()),
            "zoneinfo" => Some(self.proc_zoneinfo()),
            "meminfo" => Some(self.proc_meminfo()),
            "slabinfo" => Some(self.proc_slabinfo()),
            _ => None,
        }
    }

    /// Free blocks per order of every zone, indexed `[zone][order]` (buddyinfo as numbers).
    pub fn free_area_counts(&self) -> Vec<[usize; kmem::addr::NR_PAGE_ORDERS]> {
        self.kmem
            .zones()
            .iter()
            .map(|z| std::array::from_fn(|o| z.nr_free(o as u32)))
            .collect()
    }
}

/// Reserves the boot buffers in memblock, top-down below the low-memory limit, before the
/// page allocator exists. Returns `(name, phys, size)` of each one reserved; a buffer that
/// cannot be placed (or whose name repeats an earlier one) is reported in the log and
/// skipped, as Linux reports a failed boot reservation and boots on.
fn reserve_boot_buffers(
    memblock: &mut Memblock,
    config: &MachineConfig,
    platform: &HostedPlatform,
) -> Vec<(String, u64, u64)> {
    let page = PAGE_SIZE as u64;
    let limit = config.kmem.layout.lowmem_end();
    let mut done: Vec<(String, u64, u64)> = Vec::new();
    for (name, size, align) in &config.boot_buffers {
        let (size, align) = (*size, *align);
        let why = if done.iter().any(|(n, _, _)| n == name) {
            Some("the name is already reserved")
        } else if size == 0 {
            Some("size 0")
        } else if align != 0 && !align.is_power_of_two() {
            Some("the alignment is not a power of two")
        } else {
            None
        };
        let bytes = size.checked_next_multiple_of(page);
        let base = match (why, bytes) {
            (None, Some(bytes)) => memblock.phys_alloc_range(bytes, align.max(page), 0, limit),
            _ => None,
        };
        match (base, bytes) {
            (Some(base), Some(bytes)) => {
                platform.log(
                    LogLevel::Info,
                    format_args!(
                        "kmem_reserve: {name}: reserved {size:#x} bytes at [mem {base:#018x}-{:#018x}]",
                        base + bytes - 1
                    ),
                );
                done.push((name.clone(), base, size));
            }
            _ => platform.log(
                LogLevel::Err,
                format_args!(
                    "kmem_reserve: {name}: cannot reserve {size:#x} bytes aligned to {align:#x} below {limit:#x}: {}",
                    why.unwrap_or("no suitable area found")
                ),
            ),
        }
    }
    done
}

impl Deref for Machine {
    type Target = Kmem<HostedPlatform>;
    fn deref(&self) -> &Kmem<HostedPlatform> {
        &self.kmem
    }
}
