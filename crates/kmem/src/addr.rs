//! Addresses and page-frame numbers.
//!
//! `PhysAddr` is a physical address, `Pfn` a page-frame number (`phys >> PAGE_SHIFT`) and
//! `VirtAddr` a kernel virtual address. The direct map (`phys + direct_map_base`) covers low
//! memory only; the conversion lives with the page allocator, which knows the layout.

use core::fmt;

/// log2 of the page size.
pub const PAGE_SHIFT: u32 = 12;
/// The page size: 4 KiB.
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;
/// Mask of the in-page offset bits, inverted (`PAGE_MASK` in Linux).
pub const PAGE_MASK: usize = !(PAGE_SIZE - 1);
/// The largest buddy order: blocks of `1 << MAX_PAGE_ORDER` pages (4 MiB).
pub const MAX_PAGE_ORDER: u32 = 10;
/// Number of orders, `0..=MAX_PAGE_ORDER`.
pub const NR_PAGE_ORDERS: usize = MAX_PAGE_ORDER as usize + 1;
/// Orders above this are "costly" (`PAGE_ALLOC_COSTLY_ORDER`): reclaim tries less hard.
pub const PAGE_ALLOC_COSTLY_ORDER: u32 = 3;

/// A physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct PhysAddr(pub u64);

/// A page-frame number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Pfn(pub u64);

/// A kernel virtual address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct VirtAddr(pub usize);

impl PhysAddr {
    /// The frame this address lies in (`PHYS_PFN`).
    #[inline]
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
    /// True when the address is page aligned.
    #[inline]
    pub const fn is_page_aligned(self) -> bool {
        self.0 & (PAGE_SIZE as u64 - 1) == 0
    }
}

impl Pfn {
    /// The first byte of the frame (`PFN_PHYS`).
    #[inline]
    pub const fn phys(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }
    /// The buddy of this frame at `order`: `pfn ^ (1 << order)`.
    #[inline]
    pub const fn buddy(self, order: u32) -> Pfn {
        Pfn(self.0 ^ (1 << order))
    }
}

impl VirtAddr {
    /// The address as a raw pointer.
    #[inline]
    pub const fn as_ptr(self) -> *mut u8 {
        self.0 as *mut u8
    }
    /// True when the address is page aligned.
    #[inline]
    pub const fn is_page_aligned(self) -> bool {
        self.0 & (PAGE_SIZE - 1) == 0
    }
}

/// The smallest order whose block holds `size` bytes (`get_order`); `size == 0` gives 0.
#[inline]
pub const fn get_order(size: usize) -> u32 {
    if size <= PAGE_SIZE {
        return 0;
    }
    usize::BITS - ((size - 1) >> PAGE_SHIFT).leading_zeros()
}

/// `x` rounded up to a multiple of `align` (a power of two).
#[inline]
pub const fn align_up(x: u64, align: u64) -> u64 {
    (x + align - 1) & !(align - 1)
}

/// `x` rounded down to a multiple of `align` (a power of two).
#[inline]
pub const fn align_down(x: u64, align: u64) -> u64 {
    x & !(align - 1)
}

macro_rules! hex_fmt {
    ($($t:ty),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:#x})"), self.0)
            }
        }
        impl fmt::LowerHex for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    )*};
}
hex_fmt!(PhysAddr, Pfn, VirtAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        assert_eq!(get_order(0), 0);
        assert_eq!(get_order(1), 0);
        assert_eq!(get_order(4096), 0);
        assert_eq!(get_order(4097), 1);
        assert_eq!(get_order(8192), 1);
        assert_eq!(get_order(8193), 2);
        assert_eq!(get_order(4 << 20), 10);
    }

    #[test]
    fn buddies() {
        assert_eq!(Pfn(0x1000).buddy(0), Pfn(0x1001));
        assert_eq!(Pfn(0x1001).buddy(0), Pfn(0x1000));
        assert_eq!(Pfn(0x1000).buddy(3), Pfn(0x1008));
        assert_eq!(Pfn(0x1400).buddy(10), Pfn(0x1000));
        assert_eq!(PhysAddr(0x12345678).pfn(), Pfn(0x12345));
        assert_eq!(Pfn(0x12345).phys(), PhysAddr(0x12345000));
        assert!(PhysAddr(0x2000).is_page_aligned());
        assert!(!VirtAddr(0x2001).is_page_aligned());
        assert_eq!(align_up(0x1001, 0x1000), 0x2000);
        assert_eq!(align_down(0x1fff, 0x1000), 0x1000);
    }
}
