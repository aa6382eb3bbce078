//! A cache's description (`struct kmem_cache`): flags, object layout, slab order.
//!
//! # Object layout
//!
//! Objects sit `size` bytes apart from the start of the slab (`size >= object_size`, a
//! multiple of `align`). A free object inside a slab holds the index of the next free object
//! at byte `offset`: 0 for ordinary caches, or just past the object for caches whose free
//! objects must keep their contents (a constructor, `SLAB_TYPESAFE_BY_RCU`, `SLAB_POISON`),
//! as SLUB moves its free pointer out of such objects.

use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering::Relaxed};

use super::node::NodeLists;
use crate::addr::{PAGE_ALLOC_COSTLY_ORDER, PAGE_SIZE, get_order};
use crate::gfp::Gfp;
use crate::sync::SpinLock;

/// Slab cache flags (`slab_flags_t`), with Linux's classic bit values.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SlabFlags(pub u32);

impl SlabFlags {
    /// No flags.
    pub const NONE: SlabFlags = SlabFlags(0);
    /// `SLAB_CONSISTENCY_CHECKS`: full checks on alloc and free (debugging issue).
    pub const CONSISTENCY_CHECKS: SlabFlags = SlabFlags(0x0000_0100);
    /// `SLAB_RED_ZONE`: guard bytes around objects (debugging issue).
    pub const RED_ZONE: SlabFlags = SlabFlags(0x0000_0400);
    /// `SLAB_POISON`: fill freed objects with a pattern (debugging issue).
    pub const POISON: SlabFlags = SlabFlags(0x0000_0800);
    /// `SLAB_KMALLOC`: one of kmalloc's caches.
    pub const KMALLOC: SlabFlags = SlabFlags(0x0000_1000);
    /// `SLAB_HWCACHE_ALIGN`: align objects to cache lines.
    pub const HWCACHE_ALIGN: SlabFlags = SlabFlags(0x0000_2000);
    /// `SLAB_CACHE_DMA`: slabs from ZONE_DMA.
    pub const CACHE_DMA: SlabFlags = SlabFlags(0x0000_4000);
    /// `SLAB_CACHE_DMA32`: slabs from ZONE_DMA32.
    pub const CACHE_DMA32: SlabFlags = SlabFlags(0x0000_8000);
    /// `SLAB_STORE_USER`: record allocation and free sites (debugging issue).
    pub const STORE_USER: SlabFlags = SlabFlags(0x0001_0000);
    /// `SLAB_RECLAIM_ACCOUNT`: objects are reclaimable (`SReclaimable`).
    pub const RECLAIM_ACCOUNT: SlabFlags = SlabFlags(0x0002_0000);
    /// `SLAB_PANIC`: creation failure is fatal.
    pub const PANIC: SlabFlags = SlabFlags(0x0004_0000);
    /// `SLAB_TYPESAFE_BY_RCU`: slab pages are freed only after a grace period.
    pub const TYPESAFE_BY_RCU: SlabFlags = SlabFlags(0x0008_0000);
    /// `SLAB_NO_MERGE`: never merge this cache with another.
    pub const NO_MERGE: SlabFlags = SlabFlags(0x0100_0000);

    /// Flags that make a cache's objects special, so it is never merged (`SLAB_NEVER_MERGE`).
    pub const NEVER_MERGE: SlabFlags = SlabFlags(
        Self::RED_ZONE.0
            | Self::POISON.0
            | Self::STORE_USER.0
            | Self::CONSISTENCY_CHECKS.0
            | Self::TYPESAFE_BY_RCU.0
            | Self::NO_MERGE.0,
    );
    /// Flags that must agree for two caches to merge (`SLAB_MERGE_SAME`).
    pub const MERGE_SAME: SlabFlags =
        SlabFlags(Self::RECLAIM_ACCOUNT.0 | Self::CACHE_DMA.0 | Self::CACHE_DMA32.0);
    /// Debug flags (reserved for the debugging issue; accepted and recorded).
    pub const DEBUG: SlabFlags = SlabFlags(
        Self::RED_ZONE.0 | Self::POISON.0 | Self::STORE_USER.0 | Self::CONSISTENCY_CHECKS.0,
    );

    /// True when every bit of `other` is set.
    #[inline]
    pub const fn contains(self, other: SlabFlags) -> bool {
        self.0 & other.0 == other.0
    }
    /// True when any bit of `other` is set.
    #[inline]
    pub const fn intersects(self, other: SlabFlags) -> bool {
        self.0 & other.0 != 0
    }
}

impl core::ops::BitOr for SlabFlags {
    type Output = SlabFlags;
    fn bitor(self, rhs: SlabFlags) -> SlabFlags {
        SlabFlags(self.0 | rhs.0)
    }
}

impl fmt::Debug for SlabFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SlabFlags({:#x})", self.0)
    }
}

/// A constructor: brings a raw object into its constructed state (`void (*ctor)(void *)`).
pub type Ctor = fn(*mut u8);

/// Arguments of [`super::SlabAllocator::kmem_cache_create_args`] (`struct kmem_cache_args`).
#[derive(Clone, Copy, Debug, Default)]
pub struct KmemCacheArgs {
    /// Required alignment (0: the default, a word).
    pub align: usize,
    /// Objects per CPU sheaf (0: chosen by size).
    pub sheaf_capacity: usize,
    /// The constructor.
    pub ctor: Option<Ctor>,
}

/// Word size: the minimum alignment of every object (`ARCH_SLAB_MINALIGN`).
pub const MIN_ALIGN: usize = 8;
/// Cache-line size for `SLAB_HWCACHE_ALIGN`.
pub const CACHE_LINE: usize = 64;
/// Largest object a cache may hold: an order-3 slab with one object... SLUB allows
/// `KMALLOC_MAX_CACHE_SIZE`-sized objects in caches; kmem caps caches at 2 MiB.
pub const MAX_OBJECT_SIZE: usize = 2 << 20;
/// Longest name kept.
pub const NAME_LEN: usize = 32;
/// Slabs of at most this many objects keep their free list in 16-bit indices.
pub const MAX_OBJS_PER_SLAB: usize = 0xfffe;

/// `calculate_alignment`.
pub fn calculate_alignment(flags: SlabFlags, align: usize, size: usize) -> usize {
    let mut align = align.max(MIN_ALIGN);
    if flags.contains(SlabFlags::HWCACHE_ALIGN) {
        let mut ralign = CACHE_LINE;
        while size <= ralign / 2 {
            ralign /= 2;
        }
        align = align.max(ralign);
    }
    align.next_power_of_two()
}

/// Objects that fit in a slab of `order` (`order_objects`).
pub fn order_objects(order: u32, size: usize) -> usize {
    ((PAGE_SIZE << order) / size).min(MAX_OBJS_PER_SLAB)
}

/// `calc_slab_order`: the smallest order from `min_order` whose leftover is at most
/// `1/fract_leftover` of the slab.
fn calc_slab_order(size: usize, min_order: u32, max_order: u32, fract_leftover: usize) -> u32 {
    let mut order = min_order;
    while order <= max_order {
        let slab_size = PAGE_SIZE << order;
        if slab_size % size <= slab_size / fract_leftover {
            break;
        }
        order += 1;
    }
    order
}

/// `calculate_order`: the slab order that bounds waste, SLUB's way. `nr_cpus` sets the
/// minimum objects per slab (`4 * (fls(nr_cpus) + 1)`).
pub fn calculate_order(size: usize, nr_cpus: usize) -> u32 {
    let max_order = PAGE_ALLOC_COSTLY_ORDER;
    let fls = usize::BITS - nr_cpus.leading_zeros();
    let mut min_objects = 4 * (fls as usize + 1);
    let max_objects = order_objects(max_order, size);
    min_objects = min_objects.min(max_objects).max(1);
    let min_order = get_order(min_objects * size);
    for fraction in [16, 8, 4] {
        let order = calc_slab_order(size, min_order, max_order, fraction);
        if order <= max_order {
            return order;
        }
    }
    // Doesn't fit with bounded waste in a costly order: the smallest order that holds one.
    get_order(size)
}

/// Where a cache's sheaves start, in the same allocation as the `KmemCache` struct
/// (`kmem_cache_create`): one per possible CPU, then the barn's. The struct is padded to
/// one sheaf's size (it is a quarter of that; a cache's allocation is mostly its sheaves and
/// barn anyway), so sheaf `cpu` is at `cache + (cpu + 1) * 1 KiB`: with a platform that
/// numbers its CPUs from 1 internally (the hosted one) that is a shift and an add, with no
/// constant left to add before the slot accesses (2 to 3 instructions per kmalloc+kfree
/// pair, measured with `callgrind-pairs.sh`).
pub(crate) const SHEAVES_OFFSET: usize = size_of::<super::sheaf::Sheaf>();
const _: () = assert!(size_of::<KmemCache>() <= SHEAVES_OFFSET);

/// A slab cache. Created by [`super::SlabAllocator::kmem_cache_create`]; lives in pages of
/// its own (the struct, then one [`Sheaf`] per CPU).
#[repr(C)]
pub struct KmemCache {
    // Read on every allocation and free. The sheaves follow the struct (`SHEAVES_OFFSET`).
    pub(crate) sheaf_cap: u32, // objects a sheaf holds before a flush
    pub(crate) size: u32,      // distance between objects
    pub(crate) object_size: AtomicU32, // what the creators asked for (the largest, if merged)
    pub(crate) size_shift: u32, // trailing zeros of `size` (`size = odd << size_shift`)
    pub(crate) inv_size: u64,  // inverse of `size`'s odd part modulo 2^64 (`obj_index`)
    pub(crate) offset: u32,    // where a free object keeps its next index
    pub(crate) align: u32,
    pub(crate) order: u32,   // slab order
    pub(crate) objects: u32, // objects per slab
    pub(crate) min_partial: u32,
    pub(crate) flags: SlabFlags,
    pub(crate) gfp: Gfp, // zone and accounting flags for slab pages
    pub(crate) ctor: Option<Ctor>,
    /// Guards the slab lists; written counters below are changed under it.
    pub(crate) node: SpinLock<NodeLists>,
    pub(crate) nr_slabs: AtomicUsize,      // slabs allocated
    pub(crate) total_objects: AtomicUsize, // objects in those slabs
    pub(crate) free_objects: AtomicUsize,  // free objects inside slabs (not in sheaves)
    pub(crate) refcount: AtomicU32,        // creators sharing it (merging)
    pub(crate) next: AtomicPtr<KmemCache>, // cache list, under `SlabAllocator::caches`
    pub(crate) alloc_size: usize,          // bytes of the struct + sheaves allocation
    /// The barn: how many of its `BARN_SHEAVES` sheaves (after the CPUs' ones) are full.
    /// Guards those sheaves' contents.
    pub(crate) barn: SpinLock<usize>,
    pub(crate) nr_cpus: u32, // sheaves before the barn's
    name: [u8; NAME_LEN],
    name_len: u8,
}

// SAFETY: the sheaves after the struct are memory owned by the cache for its whole life;
// each sheaf is only touched under its CPU's guard. Everything else is atomics or locks.
unsafe impl Send for KmemCache {}
// SAFETY: as for `Send`.
unsafe impl Sync for KmemCache {}

impl KmemCache {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: &str,
        object_size: usize,
        align: usize,
        flags: SlabFlags,
        ctor: Option<Ctor>,
        sheaf_capacity: usize,
        nr_cpus: usize,
        gfp: Gfp,
    ) -> KmemCache {
        let align = calculate_alignment(flags, align, object_size);
        let keep_contents = ctor.is_some()
            || flags.intersects(SlabFlags(
                SlabFlags::TYPESAFE_BY_RCU.0 | SlabFlags::POISON.0,
            ));
        let base = object_size.max(MIN_ALIGN).next_multiple_of(MIN_ALIGN);
        let (offset, size) = if keep_contents {
            (base, (base + MIN_ALIGN).next_multiple_of(align))
        } else {
            (0, base.next_multiple_of(align))
        };
        let order = calculate_order(size, nr_cpus);
        let objects = order_objects(order, size);
        let cap = if sheaf_capacity != 0 {
            sheaf_capacity.min(super::sheaf::SHEAF_MAX)
        } else {
            super::sheaf::default_capacity(size)
        };
        let min_partial = ((usize::BITS - size.leading_zeros()) / 2).clamp(5, 10);
        let mut name_buf = [0u8; NAME_LEN];
        let mut len = name.len().min(NAME_LEN);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        name_buf[..len].copy_from_slice(&name.as_bytes()[..len]);
        KmemCache {
            sheaf_cap: cap as u32,
            size: size as u32,
            object_size: AtomicU32::new(object_size as u32),
            size_shift: size.trailing_zeros(),
            inv_size: inverse_mod_2_64((size >> size.trailing_zeros()) as u64),
            offset: offset as u32,
            align: align as u32,
            order,
            objects: objects as u32,
            min_partial,
            flags,
            gfp,
            ctor,
            node: SpinLock::new(NodeLists::new()),
            nr_slabs: AtomicUsize::new(0),
            total_objects: AtomicUsize::new(0),
            free_objects: AtomicUsize::new(0),
            refcount: AtomicU32::new(1),
            next: AtomicPtr::new(core::ptr::null_mut()),
            alloc_size: 0,
            barn: SpinLock::new(0),
            nr_cpus: 0,
            name: name_buf,
            name_len: len as u8,
        }
    }

    /// The cache's name.
    pub fn name(&self) -> &str {
        core::str::from_utf8(&self.name[..self.name_len as usize]).unwrap_or("?")
    }

    /// The size of the objects the creator asked for (`kmem_cache_size`).
    pub fn object_size(&self) -> usize {
        self.object_size.load(Relaxed) as usize
    }

    /// Bytes between objects in a slab (object, padding and free pointer).
    pub fn size(&self) -> usize {
        self.size as usize
    }

    /// The alignment every object has.
    pub fn align(&self) -> usize {
        self.align as usize
    }

    /// The slab order.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// Objects per slab.
    pub fn objects_per_slab(&self) -> usize {
        self.objects as usize
    }

    /// The flags the cache was created with.
    pub fn flags(&self) -> SlabFlags {
        self.flags
    }

    /// Slabs the cache holds now.
    pub fn nr_slabs(&self) -> usize {
        self.nr_slabs.load(Relaxed)
    }

    /// Objects in the cache's slabs, used or free.
    pub fn total_objects(&self) -> usize {
        self.total_objects.load(Relaxed)
    }

    /// Free objects inside slabs (objects cached in per-CPU sheaves count as in use, as
    /// SLUB counts its per-CPU objects).
    pub fn free_objects(&self) -> usize {
        self.free_objects.load(Relaxed)
    }

    /// Creators sharing this cache (more than one after merging).
    pub fn refcount(&self) -> u32 {
        self.refcount.load(Relaxed)
    }

    /// Index of the object at byte `offset` of a slab of `objects` objects, if `offset`
    /// starts one (`obj_to_index` plus SLUB's `check_valid_pointer`).
    ///
    /// One multiplication and one rotation, no division: with `size = d << k` (`d` odd,
    /// `inv` its inverse modulo 2^64), `x = (offset * inv) rotate_right k`.
    /// * `offset = i * size`: `offset * inv = i << k` (as `i * size < 2^64`), so `x = i`.
    /// * `offset` not a multiple of `2^k`: multiplying by the odd `inv` keeps its lowest set
    ///   bit below `k`, which the rotation moves to bit `64 - k` or above: `x >= 2^(64-k)`.
    /// * `offset = j << k` with `d` not dividing `j`: `x = j * inv mod 2^(64-k)`, and for an
    ///   odd `d`, `j * inv mod 2^n <= (2^n - 1) / d` exactly when `d` divides `j` (the
    ///   divisibility test of Granlund and Montgomery), so `x > (2^(64-k) - 1) / d`.
    ///
    /// For any size below 2^47 both bounds exceed 2^16, above any slab's `objects` (at most
    /// [`MAX_OBJS_PER_SLAB`]): `x < objects` is the whole test.
    #[inline(always)]
    pub(crate) fn obj_index(&self, offset: usize, objects: usize) -> Option<u32> {
        let x = (offset as u64)
            .wrapping_mul(self.inv_size)
            .rotate_right(self.size_shift);
        (x < objects as u64).then_some(x as u32)
    }
}

/// The inverse of odd `d` modulo 2^64, by Newton's iteration: `d * d = 1 (mod 8)`, and each
/// step doubles the bits that are right (3, 6, 12, 24, 48, 96).
const fn inverse_mod_2_64(d: u64) -> u64 {
    assert!(d & 1 == 1);
    let mut x = d;
    let mut i = 0;
    while i < 5 {
        x = x.wrapping_mul(2u64.wrapping_sub(d.wrapping_mul(x)));
        i += 1;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_rules() {
        assert_eq!(calculate_alignment(SlabFlags::NONE, 0, 24), 8);
        assert_eq!(calculate_alignment(SlabFlags::HWCACHE_ALIGN, 0, 100), 64);
        // Small objects with HWCACHE_ALIGN are packed on halves and quarters of lines.
        assert_eq!(calculate_alignment(SlabFlags::HWCACHE_ALIGN, 0, 20), 32);
        assert_eq!(calculate_alignment(SlabFlags::HWCACHE_ALIGN, 0, 8), 8);
        assert_eq!(calculate_alignment(SlabFlags::NONE, 256, 24), 256);
    }

    #[test]
    fn orders_bound_waste() {
        for size in [8, 16, 96, 192, 256, 700, 1024, 2048, 3000, 4096, 8192] {
            let order = calculate_order(size, 4);
            assert!(order <= PAGE_ALLOC_COSTLY_ORDER, "{size}: {order}");
            let slab = PAGE_SIZE << order;
            assert!(slab % size <= slab / 4, "{size}: waste {}", slab % size);
            assert!(slab / size >= 1);
        }
        // Linux's kmalloc-8k and kmalloc-4k slabs are order 3 on a small SMP machine.
        assert_eq!(calculate_order(8192, 4), 3);
        assert_eq!(calculate_order(8, 4), 0);
    }

    #[test]
    fn inverses_are_inverses() {
        for d in (1u64..20_000).step_by(2).chain([u64::MAX, (1 << 63) + 1]) {
            assert_eq!(d.wrapping_mul(inverse_mod_2_64(d)), 1, "{d}");
        }
    }

    #[test]
    fn obj_index_is_exact() {
        // Every byte offset of a slab, and past it, for sizes with odd parts of every kind.
        let sizes = [
            8usize, 16, 24, 40, 56, 96, 104, 192, 200, 256, 1000, 1032, 3000, 8192,
        ];
        for size in sizes
            .into_iter()
            .chain([MAX_OBJECT_SIZE - 8, MAX_OBJECT_SIZE])
        {
            let c = KmemCache::new("t", size, 0, SlabFlags::NONE, None, 0, 4, Gfp::NONE);
            let s = c.size();
            let n = c.objects_per_slab();
            let slab = PAGE_SIZE << c.order;
            let step = if slab > 1 << 16 { 8 } else { 1 };
            for off in (0..slab + 2 * s).step_by(step) {
                let want = (off % s == 0 && off / s < n).then_some((off / s) as u32);
                assert_eq!(c.obj_index(off, n), want, "size {s} offset {off}");
                // A fallback slab of fewer objects has no objects past its own count.
                let fewer = (n / 2).max(1);
                let want = want.filter(|&i| (i as usize) < fewer);
                assert_eq!(
                    c.obj_index(off, fewer),
                    want,
                    "size {s} offset {off} of {fewer}"
                );
            }
            for off in [
                usize::MAX,
                usize::MAX - 7,
                1 << 40,
                (1 << 40) + s,
                isize::MAX as usize,
            ] {
                assert_eq!(c.obj_index(off, n), None, "size {s} offset {off:#x}");
            }
            assert_eq!(
                c.obj_index(s, 1),
                None,
                "a one-object slab has no second object"
            );
        }
    }

    #[test]
    fn constructed_objects_keep_their_contents() {
        fn ctor(_: *mut u8) {}
        let c = KmemCache::new("t", 40, 0, SlabFlags::NONE, Some(ctor), 0, 4, Gfp::NONE);
        assert_eq!(c.offset, 40);
        assert_eq!(c.size(), 48);
        let c = KmemCache::new("t", 40, 0, SlabFlags::NONE, None, 0, 4, Gfp::NONE);
        assert_eq!(c.offset, 0);
        assert_eq!(c.size(), 40);
    }
}
