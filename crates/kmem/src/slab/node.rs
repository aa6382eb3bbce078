//! Slabs and the node lists (`struct kmem_cache_node`).
//!
//! A slab is a (compound) allocation of `1 << order` pages holding `objects` objects. Its head
//! page descriptor says what it is: state `ALLOCATED | SLAB` (+`HEAD` for order > 0),
//! `private` = the cache, and `head` = the packed counters below; the list links of the
//! descriptor chain the slab into its cache's `partial` or `full` list.
//!
//! Counters (`Page::head` of a slab's head page):
//!
//! | bits | field |
//! |---|---|
//! | 0..16 | index of the first free object in the slab, `FREE_NONE` when none |
//! | 16..32 | `inuse`: objects out of the slab (allocated, or in some CPU's sheaf) |
//! | 32..40 | which list the slab is on |
//! | 48..64 | `objects`: the slab's capacity (on top: one shift reads it in `kfree`) |
//!
//! A free object holds the index of the next free object in 32 bits at the cache's `offset`.
//!
//! # Invariants (under `KmemCache::node`)
//!
//! * a slab with `inuse == objects` is on `full`, every other slab on `partial`;
//! * `inuse + |free chain| == objects` for every slab;
//! * `free_objects == Σ (objects - inuse)`, `total_objects == Σ objects`, `nr_slabs` = slabs.

use core::sync::atomic::Ordering::Relaxed;

use super::cache::KmemCache;
use crate::page_alloc::PageAlloc;
use crate::page_alloc::mem_map::MemMap;
use crate::page_alloc::page::NIL;
use crate::platform::Platform;

/// Empty free chain.
pub(crate) const FREE_NONE: u32 = 0xffff;
const LIST_NONE: u64 = 0;
const LIST_PARTIAL: u64 = 1;
const LIST_FULL: u64 = 2;

/// The capacity of the slab whose head descriptor is `page` (its packed `objects`), or 0
/// when `page` is not a slab's head: every other page keeps the top 16 bits of `head` clear
/// (a compound tail holds its head's 32-bit index, the page allocator clears the word when a
/// slab's pages go back), and a slab holds at least one object.
#[inline(always)]
pub(crate) fn slab_objects(page: &crate::page_alloc::page::Page) -> usize {
    page.head.load(Relaxed) >> 48
}

/// A slab's counters, unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) freelist: u32,
    pub(crate) inuse: u32,
    pub(crate) objects: u32,
    list: u64,
}

impl Counters {
    fn pack(self) -> usize {
        (self.freelist as u64
            | (self.inuse as u64) << 16
            | self.list << 32
            | (self.objects as u64) << 48) as usize
    }
    fn unpack(w: usize) -> Counters {
        let w = w as u64;
        Counters {
            freelist: (w & 0xffff) as u32,
            inuse: ((w >> 16) & 0xffff) as u32,
            objects: (w >> 48) as u32,
            list: (w >> 32) & 0xff,
        }
    }
}

/// The lists of one cache's slabs.
pub(crate) struct NodeLists {
    partial: u32, // first partial slab (mem_map index) or NIL
    full: u32,    // first full slab or NIL
    pub(crate) nr_partial: usize,
    pub(crate) nr_full: usize,
}

impl NodeLists {
    pub(crate) const fn new() -> NodeLists {
        NodeLists {
            partial: NIL,
            full: NIL,
            nr_partial: 0,
            nr_full: 0,
        }
    }
}

/// Slab-level operations, with the mem_map at hand. All take the node lock's data.
pub(crate) struct Slabs<'a, P: Platform> {
    pub(crate) pa: &'a PageAlloc<P>,
    pub(crate) s: &'a KmemCache,
}

impl<P: Platform> Slabs<'_, P> {
    fn mm(&self) -> &MemMap {
        self.pa.mem_map()
    }

    pub(crate) fn counters(&self, idx: u32) -> Counters {
        Counters::unpack(self.mm().at(idx).head.load(Relaxed))
    }

    fn set_counters(&self, idx: u32, c: Counters) {
        self.mm().at(idx).head.store(c.pack(), Relaxed);
    }

    /// Address of the slab whose head is `idx`.
    pub(crate) fn base(&self, idx: u32) -> usize {
        self.pa.idx_address(idx)
    }

    fn next_free(&self, base: usize, obj: u32) -> u32 {
        let p = base + obj as usize * self.s.size as usize + self.s.offset as usize;
        // SAFETY: `p` lies inside free object `obj` of a slab of this cache (offset <
        // size), which only the holder of the node lock touches; 4-byte aligned (offset and
        // size are multiples of 8, slabs page aligned).
        unsafe { (p as *const u32).read() }
    }

    fn set_next_free(&self, base: usize, obj: u32, next: u32) {
        let p = base + obj as usize * self.s.size as usize + self.s.offset as usize;
        // SAFETY: as in `next_free`; the object is free (being put on the chain).
        unsafe { (p as *mut u32).write(next) }
    }

    fn list_head(nl: &mut NodeLists, list: u64) -> &mut u32 {
        if list == LIST_PARTIAL {
            &mut nl.partial
        } else {
            &mut nl.full
        }
    }

    fn list_add(&self, nl: &mut NodeLists, idx: u32, list: u64) {
        let mm = self.mm();
        let head = Self::list_head(nl, list);
        let old = *head;
        let page = mm.at(idx);
        page.next.store(old, Relaxed);
        page.prev.store(NIL, Relaxed);
        if old != NIL {
            mm.at(old).prev.store(idx, Relaxed);
        }
        *head = idx;
        if list == LIST_PARTIAL {
            nl.nr_partial += 1;
        } else {
            nl.nr_full += 1;
        }
        let mut c = self.counters(idx);
        c.list = list;
        self.set_counters(idx, c);
    }

    fn list_del(&self, nl: &mut NodeLists, idx: u32) {
        let mm = self.mm();
        let mut c = self.counters(idx);
        let page = mm.at(idx);
        let (next, prev) = (page.next.load(Relaxed), page.prev.load(Relaxed));
        if prev == NIL {
            *Self::list_head(nl, c.list) = next;
        } else {
            mm.at(prev).next.store(next, Relaxed);
        }
        if next != NIL {
            mm.at(next).prev.store(prev, Relaxed);
        }
        if c.list == LIST_PARTIAL {
            nl.nr_partial -= 1;
        } else {
            nl.nr_full -= 1;
        }
        c.list = LIST_NONE;
        self.set_counters(idx, c);
    }

    /// Formats a new slab of `objects` objects at `idx`: the constructor on every object and
    /// the free chain through all of them. The slab is not published yet: no lock needed.
    pub(crate) fn init_slab(&self, idx: u32, objects: usize) {
        let s = self.s;
        let base = self.base(idx);
        let n = objects as u32;
        for i in 0..n {
            if let Some(ctor) = s.ctor {
                ctor((base + i as usize * s.size as usize) as *mut u8);
            }
            self.set_next_free(base, i, if i + 1 < n { i + 1 } else { FREE_NONE });
        }
        self.set_counters(
            idx,
            Counters {
                freelist: 0,
                inuse: 0,
                objects: n,
                list: LIST_NONE,
            },
        );
    }

    /// Puts a formatted slab on the partial list and into the cache's counters.
    pub(crate) fn publish_slab(&self, nl: &mut NodeLists, idx: u32) {
        let s = self.s;
        let n = self.counters(idx).objects as usize;
        self.list_add(nl, idx, LIST_PARTIAL);
        s.nr_slabs.store(s.nr_slabs.load(Relaxed) + 1, Relaxed);
        s.total_objects
            .store(s.total_objects.load(Relaxed) + n, Relaxed);
        s.free_objects
            .store(s.free_objects.load(Relaxed) + n, Relaxed);
    }

    /// Takes up to `out.len()` free objects from partial slabs (`get_partial` + freelist
    /// pops). Slabs that fill up move to `full`.
    pub(crate) fn take_objects(&self, nl: &mut NodeLists, out: &mut [*mut u8]) -> usize {
        let s = self.s;
        let mut got = 0;
        while got < out.len() && nl.partial != NIL {
            let idx = nl.partial;
            let base = self.base(idx);
            let mut c = self.counters(idx);
            while got < out.len() && c.freelist != FREE_NONE {
                let obj = c.freelist;
                c.freelist = self.next_free(base, obj);
                c.inuse += 1;
                out[got] = (base + obj as usize * s.size as usize) as *mut u8;
                got += 1;
            }
            self.set_counters(idx, c);
            if c.freelist == FREE_NONE {
                self.list_del(nl, idx);
                self.list_add(nl, idx, LIST_FULL);
            }
        }
        s.free_objects
            .store(s.free_objects.load(Relaxed) - got, Relaxed);
        got
    }

    /// Puts object `obj` back on slab `idx`'s chain. Returns `true` when the slab became
    /// empty and should be freed: it is then off every list (`discard_slab`'s condition:
    /// more than `min_partial` partial slabs, or `force`).
    pub(crate) fn return_object(
        &self,
        nl: &mut NodeLists,
        idx: u32,
        obj: u32,
        force_free_empty: bool,
    ) -> bool {
        let s = self.s;
        let base = self.base(idx);
        let mut c = self.counters(idx);
        self.set_next_free(base, obj, c.freelist);
        c.freelist = obj;
        c.inuse -= 1;
        self.set_counters(idx, c);
        s.free_objects
            .store(s.free_objects.load(Relaxed) + 1, Relaxed);
        if c.inuse + 1 == c.objects {
            // Was full.
            self.list_del(nl, idx);
            self.list_add(nl, idx, LIST_PARTIAL);
        }
        if c.inuse == 0 && (force_free_empty || nl.nr_partial > s.min_partial as usize) {
            self.unlink_empty(nl, idx);
            return true;
        }
        false
    }

    /// Takes an empty slab off the lists and out of the counters, before its pages go back.
    pub(crate) fn unlink_empty(&self, nl: &mut NodeLists, idx: u32) {
        let s = self.s;
        let c = self.counters(idx);
        debug_assert_eq!(c.inuse, 0);
        self.list_del(nl, idx);
        s.nr_slabs.store(s.nr_slabs.load(Relaxed) - 1, Relaxed);
        s.total_objects
            .store(s.total_objects.load(Relaxed) - c.objects as usize, Relaxed);
        s.free_objects
            .store(s.free_objects.load(Relaxed) - c.objects as usize, Relaxed);
    }

    /// Every slab on `partial` whose objects are all free.
    pub(crate) fn empty_partial_slabs(&self, nl: &NodeLists, out: &mut [u32]) -> usize {
        let mut n = 0;
        let mut idx = nl.partial;
        while idx != NIL && n < out.len() {
            if self.counters(idx).inuse == 0 {
                out[n] = idx;
                n += 1;
            }
            idx = self.mm().at(idx).next.load(Relaxed);
        }
        n
    }

    /// Calls `f(slab, counters)` for every slab of the cache (partial, then full).
    pub(crate) fn for_each_slab(&self, nl: &NodeLists, mut f: impl FnMut(u32, Counters)) {
        for head in [nl.partial, nl.full] {
            let mut idx = head;
            while idx != NIL {
                let next = self.mm().at(idx).next.load(Relaxed);
                f(idx, self.counters(idx));
                idx = next;
            }
        }
    }

    /// True when object `obj` of slab `idx` is on the slab's free chain (walks the chain).
    pub(crate) fn is_on_free_chain(&self, idx: u32, obj: u32) -> bool {
        let base = self.base(idx);
        let c = self.counters(idx);
        let mut i = c.freelist;
        let mut steps = 0;
        while i != FREE_NONE && steps <= c.objects {
            if i == obj {
                return true;
            }
            i = self.next_free(base, i);
            steps += 1;
        }
        false
    }

    /// Checks the invariants above (for tests).
    pub(crate) fn validate(&self, nl: &NodeLists) -> Result<(), &'static str> {
        let (mut slabs, mut total, mut free) = (0usize, 0usize, 0usize);
        let (mut partial, mut full) = (0usize, 0usize);
        let mut err = None;
        self.for_each_slab(nl, |idx, c| {
            slabs += 1;
            total += c.objects as usize;
            free += (c.objects - c.inuse) as usize;
            let mut chain = 0;
            let mut i = c.freelist;
            while i != FREE_NONE && chain <= c.objects {
                if i >= c.objects {
                    err = Some("free chain index out of range");
                    break;
                }
                chain += 1;
                i = self.next_free(self.base(idx), i);
            }
            if chain + c.inuse != c.objects {
                err = Some("inuse + free chain != objects");
            }
            match c.list {
                LIST_FULL if c.inuse == c.objects => full += 1,
                LIST_PARTIAL if c.inuse < c.objects => partial += 1,
                _ => err = Some("slab on the wrong list"),
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        let s = self.s;
        if partial != nl.nr_partial || full != nl.nr_full {
            return Err("list counts disagree");
        }
        if slabs != s.nr_slabs.load(Relaxed)
            || total != s.total_objects.load(Relaxed)
            || free != s.free_objects.load(Relaxed)
        {
            return Err("cache counters disagree with the slabs");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_round_trip() {
        let c = Counters {
            freelist: 0x1234,
            inuse: 0xfffe,
            objects: 0xffff,
            list: LIST_FULL,
        };
        assert_eq!(Counters::unpack(c.pack()), c);
    }
}
