//! The page descriptor (`struct page`) and its flags.
//!
//! One [`Page`] describes each 4 KiB frame between the lowest and highest frame of RAM (a flat
//! `mem_map`, holes included). It is 32 bytes, half of Linux's 64: the list links are 32-bit
//! indices into `mem_map` rather than pointers, and the zone lives in the flag word.
//!
//! A page is in exactly one of these states, told by its flags:
//!
//! | state | flags | `order` means | links |
//! |---|---|---|---|
//! | reserved (memblock, holes) | `RESERVED` | — | unused |
//! | free block head in the buddy lists | `BUDDY` | block order | zone free list |
//! | on a per-CPU list | `PCP` | block order | pcp stack (`next` only) |
//! | head of an allocation | `ALLOCATED` (+`HEAD` if compound) | allocation order | unused |
//! | tail of a compound allocation | `TAIL` | — | `head` = index of the head |
//! | inside a free block or a non-compound allocation | none | — | unused |
//!
//! Every field is an atomic used with `Relaxed` ordering: the fields are guarded by the zone
//! lock (buddy state), the CPU guard (per-CPU state) or by ownership of the page (allocated
//! state), and the atomics only make racy *reads* (reports, the watermark check) well defined.
//! They compile to plain loads and stores.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};

/// End-of-list marker for the 32-bit `mem_map` indices.
pub(crate) const NIL: u32 = u32::MAX;

/// Page flag bits (the low bits of [`Page::flags`]).
pub mod pg {
    /// Never handed to the buddy allocator: memblock-reserved memory or a hole.
    pub const RESERVED: u32 = 1 << 0;
    /// Head of a free block in the zone's buddy lists (`PageBuddy`).
    pub const BUDDY: u32 = 1 << 1;
    /// On a per-CPU page list.
    pub const PCP: u32 = 1 << 2;
    /// Head of a live allocation; `order` is its order.
    pub const ALLOCATED: u32 = 1 << 3;
    /// Head of a compound page (`PageHead`).
    pub const HEAD: u32 = 1 << 4;
    /// Tail of a compound page (`PageTail`); `head` holds the head's index.
    pub const TAIL: u32 = 1 << 5;
    /// Owned by the slab allocator (`PageSlab`).
    pub const SLAB: u32 = 1 << 6;
    /// Head of a large kmalloc allocation (`PageLargeKmalloc`).
    pub const LARGE_KMALLOC: u32 = 1 << 7;
    /// Mask of the state bits (everything below the zone field).
    pub const STATE_MASK: u32 = (1 << 24) - 1;
    /// Where the zone index is kept.
    pub const ZONE_SHIFT: u32 = 28;
}

/// A page descriptor: one per frame of `mem_map`.
#[repr(C)]
pub struct Page {
    /// `pg::*` state bits, zone index at `pg::ZONE_SHIFT`.
    flags: AtomicU32,
    /// Buddy, per-CPU or allocation order, per the state table above.
    order: AtomicU32,
    /// Next page in a list (`mem_map` index), or `NIL`.
    pub(crate) next: AtomicU32,
    /// Previous page in a doubly linked list, or `NIL`.
    pub(crate) prev: AtomicU32,
    /// Compound tail: index of the head (below 2^32). Owners above the page allocator (slab)
    /// may use it while they own the page; only a slab's head page sets its top 16 bits
    /// (`kfree` relies on that), and the page allocator clears it when the slab goes back.
    pub(crate) head: AtomicUsize,
    /// A word for the page's owner (slab: the cache; others: `page->private`).
    pub(crate) private: AtomicUsize,
}

const _: () = assert!(core::mem::size_of::<Page>() == 32);

impl Page {
    /// A descriptor as `memmap_init` leaves it: reserved, in zone `zone`, unlinked.
    pub(crate) const fn new_reserved(zone: u32) -> Page {
        Page {
            flags: AtomicU32::new(pg::RESERVED | (zone << pg::ZONE_SHIFT)),
            order: AtomicU32::new(0),
            next: AtomicU32::new(NIL),
            prev: AtomicU32::new(NIL),
            head: AtomicUsize::new(0),
            private: AtomicUsize::new(0),
        }
    }

    /// The raw flag word.
    #[inline]
    pub fn flags(&self) -> u32 {
        self.flags.load(Relaxed)
    }

    /// The state bits (`pg::*`) without the zone.
    #[inline]
    pub fn state(&self) -> u32 {
        self.flags() & pg::STATE_MASK
    }

    /// Replaces the state bits, keeping the zone.
    #[inline]
    pub(crate) fn set_state(&self, state: u32) {
        let zone = self.flags() & !pg::STATE_MASK;
        self.flags.store(zone | state, Relaxed);
    }

    /// Index of the zone this page belongs to.
    #[inline]
    pub fn zone_index(&self) -> usize {
        (self.flags() >> pg::ZONE_SHIFT) as usize
    }

    /// The order recorded with the current state.
    #[inline]
    pub fn order(&self) -> u32 {
        self.order.load(Relaxed)
    }

    #[inline]
    pub(crate) fn set_order(&self, order: u32) {
        self.order.store(order, Relaxed);
    }

    /// True for memblock-reserved pages and holes (`PageReserved`).
    #[inline]
    pub fn is_reserved(&self) -> bool {
        self.flags() & pg::RESERVED != 0
    }

    /// True for the head of a free buddy block (`PageBuddy`).
    #[inline]
    pub fn is_buddy(&self) -> bool {
        self.flags() & pg::BUDDY != 0
    }

    /// True for the head of a compound page (`PageHead`).
    #[inline]
    pub fn is_head(&self) -> bool {
        self.flags() & pg::HEAD != 0
    }

    /// True for a compound tail (`PageTail`).
    #[inline]
    pub fn is_tail(&self) -> bool {
        self.flags() & pg::TAIL != 0
    }

    /// True for the head of a live allocation.
    #[inline]
    pub fn is_allocated(&self) -> bool {
        self.flags() & pg::ALLOCATED != 0
    }

    /// The owner's word (`page->private`); meaningful only to the page's owner.
    #[inline]
    pub fn private(&self) -> usize {
        self.private.load(Relaxed)
    }

    /// Sets the owner's word. Only the page's owner may call this.
    #[inline]
    pub fn set_private(&self, v: usize) {
        self.private.store(v, Relaxed);
    }

    /// Names of the set state bits, as Linux's `%pGp` prints page flags.
    pub fn flag_names(&self) -> FlagNames {
        FlagNames(self.state())
    }
}

/// Display helper for page flags: `reserved|buddy`.
pub struct FlagNames(u32);

impl core::fmt::Display for FlagNames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const NAMES: &[(u32, &str)] = &[
            (pg::RESERVED, "reserved"),
            (pg::BUDDY, "buddy"),
            (pg::PCP, "pcp"),
            (pg::ALLOCATED, "allocated"),
            (pg::HEAD, "head"),
            (pg::TAIL, "tail"),
            (pg::SLAB, "slab"),
            (pg::LARGE_KMALLOC, "large_kmalloc"),
        ];
        let mut first = true;
        for &(bit, name) in NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                first = false;
                f.write_str(name)?;
            }
        }
        Ok(())
    }
}
