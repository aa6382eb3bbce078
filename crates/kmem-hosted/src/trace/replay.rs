//! Replaying a [`Trace`] on a machine, one operation per [`Replayer::step`].

use std::ptr::NonNull;

use kmem::addr::PAGE_SIZE;
use kmem::page_alloc::page::Page;
use kmem::slab::KmemCache;

use super::{CacheId, Id, Op, Trace};
use crate::Machine;

/// What one operation did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// It ran: the allocation succeeded, the free freed.
    Done,
    /// The allocation failed (the id is left empty; its free will do nothing).
    Failed,
    /// A free of an id whose allocation had failed: nothing to do (`kfree(NULL)`).
    Nothing,
}

/// One replayed operation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Step {
    /// Its index in [`Trace::ops`].
    pub index: usize,
    /// Its source line.
    pub line: usize,
    /// The operation.
    pub op: Op,
    /// What it did.
    pub outcome: Outcome,
}

/// Counters of a replay so far.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Stats {
    /// Operations replayed.
    pub ops: u64,
    /// Allocating operations (`alloc_pages`, `kmalloc`, `krealloc`, `vmalloc`,
    /// `cache_create`, `cache_alloc`).
    pub allocs: u64,
    /// Freeing operations (`cache_destroy` included).
    pub frees: u64,
    /// Allocating operations that failed.
    pub failures: u64,
    /// Failures of `alloc_pages`.
    pub failed_pages: u64,
    /// Failures of `kmalloc` and `krealloc`.
    pub failed_kmalloc: u64,
    /// Failures of `vmalloc`.
    pub failed_vmalloc: u64,
    /// Failures of `cache_create` and `cache_alloc`.
    pub failed_cache: u64,
    /// Allocations live now (made and not yet freed; failed ones hold nothing and do not
    /// count).
    pub live: u64,
    /// Bytes the live allocations asked for (pages count `PAGE_SIZE << order`).
    pub live_bytes: u64,
    /// The most `live_bytes` reached.
    pub peak_live_bytes: u64,
    /// Pages the machine had in use beyond its boot state, as of the last step: free pages
    /// after boot minus free pages now (per-CPU lists count as free).
    pub pages_in_use: u64,
    /// The most `pages_in_use` reached.
    pub peak_pages_in_use: u64,
    /// The operation index at which `peak_pages_in_use` was reached.
    pub peak_at: usize,
}

/// What an id holds during a replay.
#[derive(Clone, Copy)]
enum Slot<'m> {
    Empty,
    Failed,
    Pages(&'m Page, u32),
    Kmalloc(NonNull<u8>, usize),
    Vmalloc(NonNull<u8>, usize),
    Object(NonNull<u8>, CacheId),
}

impl Slot<'_> {
    fn holds_memory(&self) -> bool {
        !matches!(self, Slot::Empty | Slot::Failed)
    }

    /// Bytes asked for; `object_sizes` are the sizes the trace created its caches with (a
    /// merged cache's own object size may be larger).
    fn bytes(&self, object_sizes: &[usize]) -> u64 {
        match *self {
            Slot::Empty | Slot::Failed => 0,
            Slot::Pages(_, order) => (PAGE_SIZE as u64) << order,
            Slot::Kmalloc(_, size) | Slot::Vmalloc(_, size) => size as u64,
            Slot::Object(_, c) => object_sizes[c.0 as usize] as u64,
        }
    }
}

/// Runs a [`Trace`] on a [`Machine`], one operation per [`Replayer::step`], and keeps
/// [`Stats`]. Also an [`Iterator`] of [`Step`]s.
///
/// The replayer borrows the machine for its whole life (the allocations it holds live in
/// that machine), so between steps the machine can be read (`/proc` reports, free pages) but
/// not dropped. A trace is checked when it is parsed, so a step cannot fail: allocations
/// that fail are [`Outcome::Failed`], counted, and the replay goes on. What the trace leaves
/// allocated stays allocated when the replayer is dropped (the machine's reports show it);
/// [`Replayer::release`] frees it.
pub struct Replayer<'m> {
    machine: &'m Machine,
    trace: &'m Trace,
    pos: usize,
    slots: Vec<Slot<'m>>,
    caches: Vec<Option<&'m KmemCache>>,
    object_sizes: Vec<usize>,
    stats: Stats,
    boot_free: usize,
}

impl<'m> Replayer<'m> {
    /// A replayer at the start of `trace`, on `machine`.
    pub fn new(machine: &'m Machine, trace: &'m Trace) -> Replayer<'m> {
        Replayer {
            machine,
            trace,
            pos: 0,
            slots: vec![Slot::Empty; trace.nr_ids()],
            caches: vec![None; trace.nr_caches()],
            object_sizes: vec![0; trace.nr_caches()],
            stats: Stats::default(),
            boot_free: machine.boot_free_pages(),
        }
    }

    /// The trace being replayed.
    pub fn trace(&self) -> &'m Trace {
        self.trace
    }

    /// The counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The index of the next operation (`trace().len()` when done).
    pub fn position(&self) -> usize {
        self.pos
    }

    /// True when every operation has run.
    pub fn finished(&self) -> bool {
        self.pos >= self.trace.len()
    }

    /// Runs the next operation; `None` when the trace is done.
    pub fn step(&mut self) -> Option<Step> {
        let index = self.pos;
        let op = *self.trace.ops().get(index)?;
        self.pos += 1;
        let outcome = self.run(op);
        let s = &mut self.stats;
        s.ops += 1;
        if op.allocates() {
            s.allocs += 1;
        } else {
            s.frees += 1;
        }
        if outcome == Outcome::Failed {
            s.failures += 1;
            match op {
                Op::AllocPages { .. } => s.failed_pages += 1,
                Op::Kmalloc { .. } | Op::Krealloc { .. } => s.failed_kmalloc += 1,
                Op::Vmalloc { .. } => s.failed_vmalloc += 1,
                _ => s.failed_cache += 1,
            }
        }
        s.peak_live_bytes = s.peak_live_bytes.max(s.live_bytes);
        let m = self.machine;
        let free = m.nr_free_pages() + m.nr_pcp_pages();
        s.pages_in_use = self.boot_free.saturating_sub(free) as u64;
        if s.pages_in_use > s.peak_pages_in_use {
            s.peak_pages_in_use = s.pages_in_use;
            s.peak_at = index;
        }
        Some(Step {
            index,
            line: self.trace.line(index),
            op,
            outcome,
        })
    }

    /// Runs every remaining operation; returns the counters.
    pub fn run_to_end(&mut self) -> &Stats {
        while self.step().is_some() {}
        &self.stats
    }

    /// Frees everything the trace left allocated and destroys the caches it left, so the
    /// machine is as the trace found it (up to caches' empty slabs and per-CPU lists), and
    /// rewinds to the start.
    pub fn release(&mut self) {
        for i in 0..self.slots.len() {
            let slot = std::mem::replace(&mut self.slots[i], Slot::Empty);
            self.free_slot(slot);
        }
        for c in self.caches.iter_mut() {
            if let Some(k) = c.take() {
                // SAFETY: every object of this cache was freed above; the trace's reference
                // is dropped here and never used again.
                unsafe { self.machine.kmem_cache_destroy(k) };
            }
        }
        self.pos = 0;
        self.stats.live = 0;
        self.stats.live_bytes = 0;
    }

    fn set(&mut self, id: Id, slot: Slot<'m>) {
        let s = &mut self.stats;
        let old = std::mem::replace(&mut self.slots[id.0 as usize], slot);
        let was_live = old.holds_memory();
        let is_live = slot.holds_memory();
        s.live = s.live + u64::from(is_live) - u64::from(was_live);
        s.live_bytes =
            s.live_bytes + slot.bytes(&self.object_sizes) - old.bytes(&self.object_sizes);
    }

    fn take(&mut self, id: Id) -> Slot<'m> {
        let slot = self.slots[id.0 as usize];
        self.set(id, Slot::Empty);
        slot
    }

    /// Frees what `slot` holds. The slot's allocation was made by this replayer on this
    /// machine, is live (the trace was checked), and the slot has been emptied, so nothing
    /// uses it again.
    fn free_slot(&self, slot: Slot<'m>) -> Outcome {
        let m = self.machine;
        match slot {
            Slot::Empty | Slot::Failed => return Outcome::Nothing,
            // SAFETY: a live allocation of `order` pages, no longer referenced (see above).
            Slot::Pages(page, order) => unsafe { m.__free_pages(page, order) },
            // SAFETY: a live kmalloc allocation, no longer referenced.
            Slot::Kmalloc(p, _) => unsafe { m.kfree(p.as_ptr()) },
            // SAFETY: the start of a live vmalloc area, no longer referenced.
            Slot::Vmalloc(p, _) => unsafe { m.vfree(p.as_ptr()) },
            Slot::Object(p, c) => match self.caches[c.0 as usize] {
                // SAFETY: a live object of cache `k`, no longer referenced.
                Some(k) => unsafe { m.kmem_cache_free(k, p.as_ptr()) },
                None => return Outcome::Nothing,
            },
        }
        Outcome::Done
    }

    fn outcome(ok: bool) -> Outcome {
        if ok { Outcome::Done } else { Outcome::Failed }
    }

    fn run(&mut self, op: Op) -> Outcome {
        let m = self.machine;
        match op {
            Op::AllocPages { id, order, gfp } => {
                let slot = m
                    .alloc_pages(gfp, order)
                    .map_or(Slot::Failed, |p| Slot::Pages(p, order));
                self.set(id, slot);
                Self::outcome(!matches!(slot, Slot::Failed))
            }
            Op::Kmalloc { id, size, gfp } => {
                let slot = m
                    .kmalloc(size, gfp)
                    .map_or(Slot::Failed, |p| Slot::Kmalloc(p, size));
                self.set(id, slot);
                Self::outcome(!matches!(slot, Slot::Failed))
            }
            Op::Krealloc { id, size, gfp } => {
                let old = match self.slots[id.0 as usize] {
                    Slot::Kmalloc(p, _) => p.as_ptr(),
                    _ => std::ptr::null_mut(),
                };
                // SAFETY: `old` is null or this id's live kmalloc allocation; on success it
                // is replaced by the result, on failure it stays as it was (Linux's rule).
                match unsafe { m.krealloc(old, size, gfp) } {
                    Some(p) => {
                        self.set(id, Slot::Kmalloc(p, size));
                        Outcome::Done
                    }
                    None => {
                        if old.is_null() {
                            self.set(id, Slot::Failed);
                        }
                        Outcome::Failed
                    }
                }
            }
            Op::Vmalloc { id, size } => {
                let slot = m
                    .vmalloc(size)
                    .map_or(Slot::Failed, |p| Slot::Vmalloc(p, size));
                self.set(id, slot);
                Self::outcome(!matches!(slot, Slot::Failed))
            }
            Op::CacheCreate {
                cache,
                size,
                align,
                flags,
            } => {
                let k = m.kmem_cache_create(self.trace.cache_name(cache), size, align, flags, None);
                self.caches[cache.0 as usize] = k;
                self.object_sizes[cache.0 as usize] = size;
                Self::outcome(k.is_some())
            }
            Op::CacheAlloc { id, cache, gfp } => {
                let slot = match self.caches[cache.0 as usize] {
                    Some(k) => m
                        .kmem_cache_alloc(k, gfp)
                        .map_or(Slot::Failed, |p| Slot::Object(p, cache)),
                    None => Slot::Failed, // the cache could not be created
                };
                self.set(id, slot);
                Self::outcome(!matches!(slot, Slot::Failed))
            }
            Op::FreePages { id } | Op::Kfree { id } | Op::Vfree { id } | Op::CacheFree { id } => {
                let slot = self.take(id);
                self.free_slot(slot)
            }
            Op::CacheDestroy { cache } => match self.caches[cache.0 as usize].take() {
                // SAFETY: the trace freed every object of the cache before destroying it
                // (checked at parse time); the reference is dropped here.
                Some(k) => Self::outcome(unsafe { m.kmem_cache_destroy(k) }),
                None => Outcome::Nothing,
            },
        }
    }
}

impl Iterator for Replayer<'_> {
    type Item = Step;
    fn next(&mut self) -> Option<Step> {
        self.step()
    }
}
