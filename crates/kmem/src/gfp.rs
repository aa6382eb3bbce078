//! GFP ("get free pages") flags: what an allocation may do and where its memory may come from.
//!
//! The bit values are Linux's (`include/linux/gfp_types.h`), so a mask printed by kmem reads
//! the same as one printed by a kernel. Three groups:
//!
//! * **zone modifiers** (`__GFP_DMA`, `__GFP_HIGHMEM`, `__GFP_DMA32`, `__GFP_MOVABLE`): the
//!   highest zone the allocation may use, decoded by [`gfp_zone`];
//! * **action modifiers** (`__GFP_DIRECT_RECLAIM`, `__GFP_HIGH`, `__GFP_NOFAIL`, ...): whether
//!   the allocator may sleep, dip into reserves, retry or warn;
//! * **composites** (`GFP_KERNEL`, `GFP_ATOMIC`, ...): the masks callers actually pass.
//!
//! Of the zone-modifier combinations, those naming two zones at once (DMA with HIGHMEM, DMA with
//! DMA32, ...) are invalid; [`gfp_zone`] returns [`BadZoneModifiers`] for them instead of
//! picking one, and the page allocator reports and fails such a request.

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign, Not};

/// A GFP mask (`gfp_t`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Gfp(pub u32);

impl Gfp {
    /// The empty mask: no zone modifier, may not sleep, may not reclaim.
    pub const NONE: Gfp = Gfp(0);

    /// The raw bits.
    #[inline]
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// `self | other`, usable in `const` items.
    #[inline]
    pub const fn union(self, other: Gfp) -> Gfp {
        Gfp(self.0 | other.0)
    }

    /// `self & !other`, usable in `const` items.
    #[inline]
    pub const fn without(self, other: Gfp) -> Gfp {
        Gfp(self.0 & !other.0)
    }

    /// True when every bit of `other` is set in `self`.
    #[inline]
    pub const fn contains(self, other: Gfp) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when any bit of `other` is set in `self`.
    #[inline]
    pub const fn intersects(self, other: Gfp) -> bool {
        self.0 & other.0 != 0
    }
}

impl BitOr for Gfp {
    type Output = Gfp;
    #[inline]
    fn bitor(self, rhs: Gfp) -> Gfp {
        Gfp(self.0 | rhs.0)
    }
}

impl BitOrAssign for Gfp {
    #[inline]
    fn bitor_assign(&mut self, rhs: Gfp) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Gfp {
    type Output = Gfp;
    #[inline]
    fn bitand(self, rhs: Gfp) -> Gfp {
        Gfp(self.0 & rhs.0)
    }
}

impl Not for Gfp {
    type Output = Gfp;
    #[inline]
    fn not(self) -> Gfp {
        Gfp(!self.0)
    }
}

macro_rules! gfp_bits {
    ($($(#[$doc:meta])* $name:ident = $bit:expr, $label:literal;)*) => {
        $( $(#[$doc])* pub const $name: Gfp = Gfp(1 << $bit); )*
        /// Every single-bit flag with the name Linux's `%pGg` prints for it, lowest bit first.
        const FLAG_NAMES: &[(Gfp, &str)] = &[ $( ($name, $label), )* ];
    };
}

gfp_bits! {
    /// Allocate from ZONE_DMA (the first 16 MiB).
    __GFP_DMA = 0, "__GFP_DMA";
    /// HighMem pages are acceptable (they are not in the direct map).
    __GFP_HIGHMEM = 1, "__GFP_HIGHMEM";
    /// Allocate from ZONE_DMA32 (below 4 GiB).
    __GFP_DMA32 = 2, "__GFP_DMA32";
    /// The page may be migrated (user pages, page cache).
    __GFP_MOVABLE = 3, "__GFP_MOVABLE";
    /// Reclaimable slab (dentries, inodes): accounted as `SReclaimable`.
    __GFP_RECLAIMABLE = 4, "__GFP_RECLAIMABLE";
    /// High priority: may use half of the min watermark reserve.
    __GFP_HIGH = 5, "__GFP_HIGH";
    /// May start physical I/O.
    __GFP_IO = 6, "__GFP_IO";
    /// May call into the filesystem.
    __GFP_FS = 7, "__GFP_FS";
    /// Return zeroed memory.
    __GFP_ZERO = 8, "__GFP_ZERO";
    /// May enter direct reclaim (and so may sleep).
    __GFP_DIRECT_RECLAIM = 10, "__GFP_DIRECT_RECLAIM";
    /// May wake the background reclaimer when a low watermark is reached.
    __GFP_KSWAPD_RECLAIM = 11, "__GFP_KSWAPD_RECLAIM";
    /// The page will be written to (dirty-limit accounting).
    __GFP_WRITE = 12, "__GFP_WRITE";
    /// Do not print the allocation-failure report.
    __GFP_NOWARN = 13, "__GFP_NOWARN";
    /// Retry reclaim for a while, then fail rather than loop forever.
    __GFP_RETRY_MAYFAIL = 14, "__GFP_RETRY_MAYFAIL";
    /// Never fail: retry until memory is found.
    __GFP_NOFAIL = 15, "__GFP_NOFAIL";
    /// Try reclaim once, then fail.
    __GFP_NORETRY = 16, "__GFP_NORETRY";
    /// May use every reserve (for memory-freeing paths).
    __GFP_MEMALLOC = 17, "__GFP_MEMALLOC";
    /// Return a compound page (head plus tails) for orders above 0.
    __GFP_COMP = 18, "__GFP_COMP";
    /// Never use the emergency reserves, even from a `PF_MEMALLOC` context.
    __GFP_NOMEMALLOC = 19, "__GFP_NOMEMALLOC";
    /// Enforce the cpuset's memory policy (user allocations).
    __GFP_HARDWALL = 20, "__GFP_HARDWALL";
    /// Allocate from the given node only.
    __GFP_THISNODE = 21, "__GFP_THISNODE";
    /// Account the allocation to the memory cgroup.
    __GFP_ACCOUNT = 22, "__GFP_ACCOUNT";
}

/// The zone modifiers.
pub const GFP_ZONEMASK: Gfp = Gfp(__GFP_DMA.0 | __GFP_HIGHMEM.0 | __GFP_DMA32.0 | __GFP_MOVABLE.0);
/// Both reclaim flags.
pub const __GFP_RECLAIM: Gfp = __GFP_DIRECT_RECLAIM.union(__GFP_KSWAPD_RECLAIM);

/// Interrupt handlers and other atomic contexts: never sleeps, may dip to 3/8 of min.
pub const GFP_ATOMIC: Gfp = __GFP_HIGH.union(__GFP_KSWAPD_RECLAIM);
/// Ordinary kernel allocations: may sleep, reclaim, do I/O and call the filesystem.
pub const GFP_KERNEL: Gfp = __GFP_RECLAIM.union(__GFP_IO).union(__GFP_FS);
/// `GFP_KERNEL`, charged to the memory cgroup.
pub const GFP_KERNEL_ACCOUNT: Gfp = GFP_KERNEL.union(__GFP_ACCOUNT);
/// Never sleeps and gets no access to the reserves.
pub const GFP_NOWAIT: Gfp = __GFP_KSWAPD_RECLAIM;
/// May sleep, but starts no I/O.
pub const GFP_NOIO: Gfp = __GFP_RECLAIM;
/// May sleep and do I/O, but does not call into the filesystem.
pub const GFP_NOFS: Gfp = __GFP_RECLAIM.union(__GFP_IO);
/// Memory for user space that the kernel also touches.
pub const GFP_USER: Gfp = __GFP_RECLAIM
    .union(__GFP_IO)
    .union(__GFP_FS)
    .union(__GFP_HARDWALL);
/// ZONE_DMA memory.
pub const GFP_DMA: Gfp = __GFP_DMA;
/// ZONE_DMA32 memory.
pub const GFP_DMA32: Gfp = __GFP_DMA32;
/// User pages that the kernel does not need to reach directly: HighMem is fine.
pub const GFP_HIGHUSER: Gfp = GFP_USER.union(__GFP_HIGHMEM);
/// User pages that may also be migrated.
pub const GFP_HIGHUSER_MOVABLE: Gfp = GFP_HIGHUSER.union(__GFP_MOVABLE);

/// The memory zones, lowest first; the discriminant is the zone index (`enum zone_type`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[repr(u8)]
pub enum ZoneType {
    /// Memory reachable by ISA DMA: below 16 MiB.
    Dma = 0,
    /// Memory reachable by 32-bit DMA: below 4 GiB.
    Dma32 = 1,
    /// Ordinary memory, permanently in the direct map.
    Normal = 2,
    /// Memory outside the direct map (32-bit machines): reached through `kmap`.
    HighMem = 3,
}

/// Number of zone types.
pub const MAX_NR_ZONES: usize = 4;

impl ZoneType {
    /// Every zone type, lowest first.
    pub const ALL: [ZoneType; MAX_NR_ZONES] = [
        ZoneType::Dma,
        ZoneType::Dma32,
        ZoneType::Normal,
        ZoneType::HighMem,
    ];

    /// The name Linux prints in `/proc/zoneinfo` and `/proc/buddyinfo`.
    pub const fn name(self) -> &'static str {
        match self {
            ZoneType::Dma => "DMA",
            ZoneType::Dma32 => "DMA32",
            ZoneType::Normal => "Normal",
            ZoneType::HighMem => "HighMem",
        }
    }

    /// The zone with index `i`.
    pub const fn from_index(i: usize) -> Option<ZoneType> {
        match i {
            0 => Some(ZoneType::Dma),
            1 => Some(ZoneType::Dma32),
            2 => Some(ZoneType::Normal),
            3 => Some(ZoneType::HighMem),
            _ => None,
        }
    }

    /// The zone index.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A mask whose zone modifiers name more than one zone (Linux's `GFP_ZONE_BAD`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BadZoneModifiers(pub Gfp);

impl fmt::Display for BadZoneModifiers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid zone modifiers in gfp mask {:#x}({}): more than one zone requested",
            self.0.0, self.0
        )
    }
}

/// The highest zone an allocation with `gfp` may use (`gfp_zone()`).
///
/// Follows Linux's `GFP_ZONE_TABLE`: no modifier means Normal, `__GFP_DMA` means DMA,
/// `__GFP_DMA32` means DMA32, `__GFP_HIGHMEM` (with or without `__GFP_MOVABLE`) means HighMem,
/// and `__GFP_MOVABLE` alone means Normal. Zones absent from a machine's layout are skipped by
/// the caller, which starts its zonelist at the highest populated zone not above this one.
/// Combinations naming two zones are [`BadZoneModifiers`].
pub const fn gfp_zone(gfp: Gfp) -> Result<ZoneType, BadZoneModifiers> {
    let dma = gfp.0 & __GFP_DMA.0 != 0;
    let high = gfp.0 & __GFP_HIGHMEM.0 != 0;
    let dma32 = gfp.0 & __GFP_DMA32.0 != 0;
    match (dma, high, dma32) {
        (false, false, false) => Ok(ZoneType::Normal),
        (true, false, false) => Ok(ZoneType::Dma),
        (false, true, false) => Ok(ZoneType::HighMem),
        (false, false, true) => Ok(ZoneType::Dma32),
        _ => Err(BadZoneModifiers(gfp)),
    }
}

/// True when an allocation with `gfp` may sleep (`gfpflags_allow_blocking()`).
#[inline]
pub const fn gfpflags_allow_blocking(gfp: Gfp) -> bool {
    gfp.0 & __GFP_DIRECT_RECLAIM.0 != 0
}

/// True when `gfp` may not sleep and may use the atomic reserves (`gfp_has_io_fs` aside, this
/// is Linux's `gfp_mask & __GFP_HIGH && !blocking` test).
#[inline]
pub const fn gfp_is_atomic(gfp: Gfp) -> bool {
    gfp.0 & __GFP_HIGH.0 != 0 && !gfpflags_allow_blocking(gfp)
}

/// The composite masks `%pGg` prints by name, largest first.
const COMPOSITES: &[(Gfp, &str)] = &[
    (GFP_HIGHUSER_MOVABLE, "GFP_HIGHUSER_MOVABLE"),
    (GFP_HIGHUSER, "GFP_HIGHUSER"),
    (GFP_USER, "GFP_USER"),
    (GFP_KERNEL_ACCOUNT, "GFP_KERNEL_ACCOUNT"),
    (GFP_KERNEL, "GFP_KERNEL"),
    (GFP_NOFS, "GFP_NOFS"),
    (GFP_ATOMIC, "GFP_ATOMIC"),
    (GFP_NOIO, "GFP_NOIO"),
    (GFP_NOWAIT, "GFP_NOWAIT"),
    (GFP_DMA32, "GFP_DMA32"),
    (GFP_DMA, "GFP_DMA"),
];

/// A GFP mask could not be read ([`Gfp::parse`]): the part that is not a flag name or a
/// number.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParseGfpError<'a>(pub &'a str);

impl fmt::Display for ParseGfpError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "\"{}\" is not a GFP flag (expected names such as GFP_KERNEL, GFP_ATOMIC, \
             __GFP_ZERO joined by '|', or a number such as 0xcc0)",
            self.0
        )
    }
}

impl core::error::Error for ParseGfpError<'_> {}

impl Gfp {
    /// Reads a mask written as Linux prints one (`%pGg`): composite and single flag names
    /// (`GFP_KERNEL`, `__GFP_ZERO`, `__GFP_RECLAIM`, ...) and numbers (`0x100`, `256`) joined
    /// by `|`, with optional spaces around each part. `0` is the empty mask. Every mask's
    /// [`Display`](fmt::Display) form reads back as the same mask.
    ///
    /// ```
    /// use kmem::gfp::*;
    /// assert_eq!(Gfp::parse("GFP_KERNEL|__GFP_ZERO"), Ok(GFP_KERNEL | __GFP_ZERO));
    /// assert_eq!(Gfp::parse("0x820"), Ok(GFP_ATOMIC));
    /// assert!(Gfp::parse("GFP_KERNAL").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// [`ParseGfpError`] naming the first part that is neither a known name nor a number.
    pub fn parse(s: &str) -> Result<Gfp, ParseGfpError<'_>> {
        let mut mask = 0u32;
        for part in s.split('|') {
            let part = part.trim();
            let named = COMPOSITES
                .iter()
                .chain(FLAG_NAMES)
                .chain(&[(__GFP_RECLAIM, "__GFP_RECLAIM")])
                .find(|(_, name)| *name == part)
                .map(|(g, _)| g.0);
            let number = || match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => part.parse::<u32>().ok(),
            };
            mask |= named.or_else(number).ok_or(ParseGfpError(part))?;
        }
        Ok(Gfp(mask))
    }
}

impl fmt::Display for Gfp {
    /// Prints the mask as Linux's `%pGg` does: composite names first (`GFP_KERNEL`), then the
    /// remaining single flags, joined by `|`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0");
        }
        let mut rest = self.0;
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| -> fmt::Result {
            if !first {
                f.write_str("|")?;
            }
            first = false;
            Ok(())
        };
        for &(mask, name) in COMPOSITES {
            if mask.0 & rest == mask.0 && mask.0 & !self.0 == 0 {
                sep(f)?;
                f.write_str(name)?;
                rest &= !mask.0;
            }
        }
        for &(flag, name) in FLAG_NAMES {
            if rest & flag.0 != 0 {
                sep(f)?;
                f.write_str(name)?;
                rest &= !flag.0;
            }
        }
        if rest != 0 {
            sep(f)?;
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Gfp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}({})", self.0, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_values_are_linuxs() {
        assert_eq!(__GFP_DMA.bits(), 0x01);
        assert_eq!(__GFP_HIGHMEM.bits(), 0x02);
        assert_eq!(__GFP_DMA32.bits(), 0x04);
        assert_eq!(__GFP_MOVABLE.bits(), 0x08);
        assert_eq!(__GFP_RECLAIMABLE.bits(), 0x10);
        assert_eq!(__GFP_HIGH.bits(), 0x20);
        assert_eq!(__GFP_IO.bits(), 0x40);
        assert_eq!(__GFP_FS.bits(), 0x80);
        assert_eq!(__GFP_ZERO.bits(), 0x100);
        assert_eq!(__GFP_DIRECT_RECLAIM.bits(), 0x400);
        assert_eq!(__GFP_KSWAPD_RECLAIM.bits(), 0x800);
        assert_eq!(__GFP_NOWARN.bits(), 0x2000);
        assert_eq!(__GFP_RETRY_MAYFAIL.bits(), 0x4000);
        assert_eq!(__GFP_NOFAIL.bits(), 0x8000);
        assert_eq!(__GFP_NORETRY.bits(), 0x10000);
        assert_eq!(__GFP_MEMALLOC.bits(), 0x20000);
        assert_eq!(__GFP_COMP.bits(), 0x40000);
        assert_eq!(__GFP_NOMEMALLOC.bits(), 0x80000);
        assert_eq!(__GFP_HARDWALL.bits(), 0x100000);
    }

    #[test]
    fn composites_are_linuxs() {
        assert_eq!(GFP_KERNEL.bits(), 0xcc0);
        assert_eq!(GFP_ATOMIC.bits(), 0x820);
        assert_eq!(GFP_NOWAIT.bits(), 0x800);
        assert_eq!(GFP_NOIO.bits(), 0xc00);
        assert_eq!(GFP_NOFS.bits(), 0xc40);
        assert_eq!(GFP_USER.bits(), 0x100cc0);
        assert_eq!(GFP_HIGHUSER.bits(), 0x100cc2);
        assert_eq!(GFP_HIGHUSER_MOVABLE.bits(), 0x100cca);
        assert_eq!(GFP_DMA.bits(), 0x01);
        assert_eq!(GFP_DMA32.bits(), 0x04);
    }

    #[test]
    fn zone_choice() {
        assert_eq!(gfp_zone(GFP_KERNEL), Ok(ZoneType::Normal));
        assert_eq!(gfp_zone(GFP_ATOMIC), Ok(ZoneType::Normal));
        assert_eq!(gfp_zone(GFP_KERNEL | GFP_DMA), Ok(ZoneType::Dma));
        assert_eq!(gfp_zone(GFP_KERNEL | GFP_DMA32), Ok(ZoneType::Dma32));
        assert_eq!(gfp_zone(GFP_HIGHUSER), Ok(ZoneType::HighMem));
        assert_eq!(gfp_zone(GFP_HIGHUSER_MOVABLE), Ok(ZoneType::HighMem));
        assert_eq!(gfp_zone(GFP_KERNEL | __GFP_MOVABLE), Ok(ZoneType::Normal));
        assert_eq!(gfp_zone(GFP_DMA | __GFP_MOVABLE), Ok(ZoneType::Dma));
        assert_eq!(gfp_zone(GFP_DMA32 | __GFP_MOVABLE), Ok(ZoneType::Dma32));
    }

    #[test]
    fn bad_zone_combinations_are_reported() {
        for bad in [
            __GFP_DMA | __GFP_HIGHMEM,
            __GFP_DMA | __GFP_DMA32,
            __GFP_HIGHMEM | __GFP_DMA32,
            __GFP_DMA | __GFP_DMA32 | __GFP_HIGHMEM,
            __GFP_MOVABLE | __GFP_DMA | __GFP_HIGHMEM,
        ] {
            let err = gfp_zone(GFP_KERNEL | bad).unwrap_err();
            assert_eq!(err.0, GFP_KERNEL | bad);
            let mut buf = [0u8; 256];
            let text = crate::fmt_util::format_into(&mut buf, format_args!("{err}"));
            assert!(text.contains("invalid zone modifiers"), "{text}");
        }
    }

    #[test]
    fn blocking_rules() {
        assert!(gfpflags_allow_blocking(GFP_KERNEL));
        assert!(gfpflags_allow_blocking(GFP_USER));
        assert!(gfpflags_allow_blocking(GFP_NOIO));
        assert!(!gfpflags_allow_blocking(GFP_ATOMIC));
        assert!(!gfpflags_allow_blocking(GFP_NOWAIT));
        assert!(gfp_is_atomic(GFP_ATOMIC));
        assert!(!gfp_is_atomic(GFP_NOWAIT));
        assert!(!gfp_is_atomic(GFP_KERNEL | __GFP_HIGH));
    }

    #[test]
    fn parse_reads_what_display_prints() {
        assert_eq!(Gfp::parse("GFP_KERNEL"), Ok(GFP_KERNEL));
        assert_eq!(
            Gfp::parse("GFP_ATOMIC|__GFP_NOWARN"),
            Ok(GFP_ATOMIC | __GFP_NOWARN)
        );
        assert_eq!(
            Gfp::parse(" GFP_NOWAIT | __GFP_ZERO "),
            Ok(GFP_NOWAIT | __GFP_ZERO)
        );
        assert_eq!(Gfp::parse("0"), Ok(Gfp::NONE));
        assert_eq!(Gfp::parse("0xcc0"), Ok(GFP_KERNEL));
        assert_eq!(Gfp::parse("3264"), Ok(GFP_KERNEL));
        assert_eq!(Gfp::parse("__GFP_RECLAIM|__GFP_IO"), Ok(GFP_NOFS));
        assert_eq!(Gfp::parse("GFP_KERNAL"), Err(ParseGfpError("GFP_KERNAL")));
        assert_eq!(Gfp::parse("GFP_KERNEL|"), Err(ParseGfpError("")));
        assert_eq!(Gfp::parse("0x1g"), Err(ParseGfpError("0x1g")));
        assert_eq!(Gfp::parse("gfp_kernel"), Err(ParseGfpError("gfp_kernel")));
        let mut buf = [0u8; 1024];
        for bits in (0..1u32 << 23)
            .step_by(4099)
            .chain([0x100cca, 0xcc0 | 0x4000_0000])
        {
            let g = Gfp(bits);
            let text = crate::fmt_util::format_into(&mut buf, format_args!("{g}"));
            assert_eq!(Gfp::parse(text), Ok(g), "{text}");
        }
    }

    #[test]
    fn display_like_pgg() {
        let mut buf = [0u8; 256];
        assert_eq!(
            crate::fmt_util::format_into(&mut buf, format_args!("{}", GFP_KERNEL)),
            "GFP_KERNEL"
        );
        let mut buf = [0u8; 256];
        assert_eq!(
            crate::fmt_util::format_into(
                &mut buf,
                format_args!("{}", GFP_KERNEL | __GFP_ZERO | __GFP_COMP)
            ),
            "GFP_KERNEL|__GFP_ZERO|__GFP_COMP"
        );
        let mut buf = [0u8; 256];
        assert_eq!(
            crate::fmt_util::format_into(&mut buf, format_args!("{}", GFP_ATOMIC | __GFP_NOWARN)),
            "GFP_ATOMIC|__GFP_NOWARN"
        );
        let mut buf = [0u8; 256];
        assert_eq!(
            crate::fmt_util::format_into(&mut buf, format_args!("{}", GFP_HIGHUSER_MOVABLE)),
            "GFP_HIGHUSER_MOVABLE"
        );
    }
}
