//! `/proc/vmallocinfo` and the invariant walker.
//!
//! The report is written one area at a time: each line is a snapshot taken under the vmap
//! lock (the next busy area at or after a cursor, `O(log n)`), and the lock is dropped before
//! the line is written, so the writer may allocate (even from vmalloc) without deadlocking.
//! Areas being set up (`VM_UNINITIALIZED`) are skipped, as Linux skips them.

use core::fmt::{self, Write};

use super::area::VmapArea;
use super::tree::{Link, Tree};
use super::{
    Caller, VM_ALLOC, VM_IOREMAP, VM_MAP, VM_UNINITIALIZED, VM_USERMAP, VmFlags, VmStruct, Vmalloc,
};
use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::page_alloc::PageAlloc;
use crate::platform::Platform;

/// One line's worth of a busy area.
struct Line {
    start: usize,
    size: usize,
    flags: VmFlags,
    nr_pages: usize,
    caller: Caller,
    vpages: bool,
}

impl Vmalloc {
    /// A [`VmStruct`] copy of a busy node.
    pub(crate) fn snapshot(n: &VmapArea) -> VmStruct {
        let flags = VmFlags(n.flags);
        VmStruct {
            addr: VirtAddr(n.va_start),
            size: n.size(),
            flags,
            nr_pages: if flags.contains(VM_ALLOC) {
                n.nr_pages
            } else {
                0
            },
            caller: n.caller,
        }
    }

    /// The first initialized busy area starting at or after `cursor`.
    fn next_busy(&self, cursor: usize) -> Option<Line> {
        let st = self.lock.lock();
        let mut n: Link = st.busy.first_from(cursor);
        // SAFETY: `n` is null or a node of the busy tree, read under the lock.
        while let Some(a) = unsafe { n.as_ref() } {
            if a.flags & VM_UNINITIALIZED.0 == 0 {
                let s = Self::snapshot(a);
                return Some(Line {
                    start: a.va_start,
                    size: a.size(),
                    flags: s.flags,
                    nr_pages: s.nr_pages,
                    caller: a.caller,
                    vpages: s.flags.contains(VM_ALLOC) && self.is_vmalloc_addr(a.pages.cast()),
                });
            }
            n = st.busy.first_from(a.va_start + 1);
        }
        None
    }

    /// The first lazily freed range starting at or after `cursor`: `(start, size)`.
    fn next_unpurged(&self, cursor: usize) -> Option<(usize, usize)> {
        let st = self.lock.lock();
        let n = st.purge.first_from(cursor);
        // SAFETY: `n` is null or a node of the purge tree, read under the lock.
        unsafe { n.as_ref() }.map(|a| (a.va_start, a.size()))
    }

    /// Writes `/proc/vmallocinfo`: every busy area in address order, then every lazily freed
    /// one ("unpurged vm_area"), in Linux's format:
    ///
    /// ```text
    /// 0x<start>-0x<end> <size, %7ld> <caller>[ pages=N][ ioremap][ vmalloc][ vmap][ user][ vpages][ N0=N]
    /// 0x<start>-0x<end> <size, %7ld> unpurged vm_area
    /// ```
    ///
    /// Addresses are printed in full (as `%pK` shows them to root). Sizes include the guard
    /// page. `pages=` and `N0=` appear for `vmalloc` areas (the pages they own); `vpages`
    /// when their page array is itself vmalloc'ed.
    ///
    /// Context: process context; takes the vmap lock once per line, never while writing.
    pub fn vmallocinfo<P: Platform>(&self, pa: &PageAlloc<P>, w: &mut impl Write) -> fmt::Result {
        let _ = pa; // one node: every page is on N0
        let width = 2 * core::mem::size_of::<usize>();
        let mut cursor = 0;
        while let Some(l) = self.next_busy(cursor) {
            cursor = l.start + 1;
            write!(
                w,
                "0x{:0width$x}-0x{:0width$x} {:7} {}",
                l.start,
                l.start + l.size,
                l.size,
                l.caller
            )?;
            if l.nr_pages != 0 {
                write!(w, " pages={}", l.nr_pages)?;
            }
            for (flag, name) in [
                (VM_IOREMAP, " ioremap"),
                (VM_ALLOC, " vmalloc"),
                (VM_MAP, " vmap"),
                (VM_USERMAP, " user"),
            ] {
                if l.flags.contains(flag) {
                    w.write_str(name)?;
                }
            }
            if l.vpages {
                w.write_str(" vpages")?;
            }
            if l.nr_pages != 0 {
                write!(w, " N0={}", l.nr_pages)?;
            }
            w.write_char('\n')?;
        }
        let mut cursor = 0;
        while let Some((start, size)) = self.next_unpurged(cursor) {
            cursor = start + 1;
            writeln!(
                w,
                "0x{:0width$x}-0x{:0width$x} {:7} unpurged vm_area",
                start,
                start + size,
                size
            )?;
        }
        Ok(())
    }

    /// Checks every invariant of the layer (for tests): each tree's shape and order, that
    /// areas of different trees never overlap, that no two free areas touch, that the lazy
    /// counter matches the purge tree, and — when no area is between trees — that the three
    /// trees cover the whole range.
    ///
    /// Context: takes the vmap lock for the whole walk (`O(n log n)`).
    pub fn validate(&self) -> Result<(), &'static str> {
        let st = self.lock.lock();
        let (lo, hi) = (self.start, self.end);
        st.free.check(lo, hi)?;
        st.busy.check(lo, hi)?;
        st.purge.check(lo, hi)?;
        let trees: [&Tree; 3] = [&st.free, &st.busy, &st.purge];
        let mut cursor = lo;
        let mut last_end = lo;
        let mut last_free = false;
        let mut lazy = 0;
        loop {
            // The lowest area of any tree at or after the cursor.
            let mut best: Option<(usize, &VmapArea)> = None;
            for (i, t) in trees.iter().enumerate() {
                // SAFETY: null or a node of that tree, read under the lock.
                if let Some(a) = unsafe { t.first_from(cursor).as_ref() } {
                    if best.is_none_or(|(_, b)| a.va_start < b.va_start) {
                        best = Some((i, a));
                    }
                }
            }
            let Some((i, a)) = best else { break };
            if a.va_start < last_end {
                return Err("vmalloc: areas of different trees overlap");
            }
            if st.in_transit == 0 && a.va_start != last_end {
                return Err("vmalloc: a hole in the range belongs to no area");
            }
            let free = i == 0;
            if free && last_free && a.va_start == last_end {
                return Err("vmalloc: two free areas touch");
            }
            if i == 1 && a.flags & VM_UNINITIALIZED.0 == 0 && a.flags & VM_ALLOC.0 != 0 {
                if a.pages.is_null() || a.nr_pages == 0 {
                    return Err("vmalloc: a vmalloc area without pages");
                }
                if a.nr_pages * PAGE_SIZE > a.size() {
                    return Err("vmalloc: more pages than the area holds");
                }
            }
            if i != 1 && (a.flags != 0 || !a.pages.is_null()) {
                return Err("vmalloc: a free or queued area keeps vm_struct fields");
            }
            if i == 2 {
                lazy += a.size() / PAGE_SIZE;
            }
            last_free = free;
            last_end = a.va_end;
            cursor = a.va_start + 1;
        }
        if st.in_transit == 0 && last_end != hi {
            return Err("vmalloc: the end of the range belongs to no area");
        }
        if lazy != st.lazy_pages {
            return Err("vmalloc: lazy page count does not match the purge tree");
        }
        Ok(())
    }
}
