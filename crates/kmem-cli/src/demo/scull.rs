//! LDD3's scull devices as chapter 8 rebuilds them: scullc, scullp and scullv.
//!
//! A scull device is memory that reads and writes like a file. Its data is a list of
//! *quantum sets* (`struct scull_qset`): each set holds an array of `qset` pointers to
//! *quanta* of `quantum` bytes, so byte `pos` lives in set `pos / (quantum * qset)`, slot
//! `pos % (quantum * qset) / quantum`, at offset `pos % quantum` of that quantum. The sets and
//! their pointer arrays come from kmalloc; the three chapter-8 drivers differ only in where a
//! quantum comes from ([`Quanta`]):
//!
//! * **scullc**: a lookaside cache, `kmem_cache_create("scullc", quantum, 0,
//!   SLAB_HWCACHE_ALIGN, NULL)` ([`CacheQuanta`]);
//! * **scullp**: whole pages, `__get_free_pages(GFP_KERNEL, order)` ([`PageQuanta`]);
//! * **scullv**: virtually contiguous memory, `vmalloc(PAGE_SIZE << order)`
//!   ([`VmallocQuanta`]).
//!
//! [`Scull::read`] and [`Scull::write`] behave as the driver's `read` and `write` methods
//! with an explicit file position: a call moves at most up to the end of the quantum the
//! position falls in (the caller loops, as user space does), a write allocates the set, the
//! pointer array and the quantum it needs (zeroed), a read stops at the end of the data and
//! returns 0 there or in a hole that was never written ("don't fill holes"). One lock
//! serializes the calls, as the driver's semaphore does. Every call also counts itself in the
//! device's per-CPU statistics ([`Scull::ops`], [`Scull::bytes`]), outside the lock.

use std::ptr::{self, NonNull};
use std::sync::{Mutex, MutexGuard, PoisonError};

use kmem::Kmem;
use kmem::addr::{PAGE_SIZE, VirtAddr};
use kmem::gfp::GFP_KERNEL;
use kmem::percpu::{PerCpuBox, PercpuCounter};
use kmem::slab::KmemCache;
use kmem_hosted::platform::HostedPlatform;

/// The subsystem the devices allocate from.
pub type K = Kmem<HostedPlatform>;

/// LDD3's default quantum for scull and scullc (`SCULL_QUANTUM`, `SCULLC_QUANTUM`).
pub const SCULLC_QUANTUM: usize = 4000;
/// LDD3's quantum sets for the chapter-8 drivers (`SCULLC_QSET`, `SCULLP_QSET`,
/// `SCULLV_QSET`).
pub const SCULL_QSET: usize = 500;
/// LDD3's `scullp_order`: one page per quantum.
pub const SCULLP_ORDER: u32 = 0;
/// LDD3's `scullv_order`: 16 pages per quantum.
pub const SCULLV_ORDER: u32 = 4;

/// Where a device's quanta come from.
pub trait Quanta {
    /// Bytes per quantum.
    fn quantum(&self) -> usize;

    /// One zeroed quantum (`GFP_KERNEL`: may sleep), or `None` when memory runs out.
    fn alloc(&self, k: &K) -> Option<NonNull<u8>>;

    /// Gives a quantum back.
    ///
    /// # Safety
    ///
    /// `q` came from [`Quanta::alloc`] of this source on `k`, is freed once and not used
    /// afterwards.
    unsafe fn free(&self, k: &K, q: NonNull<u8>);
}

/// scullc's quanta: objects of a lookaside cache, one quantum each.
#[derive(Clone, Copy)]
pub struct CacheQuanta<'c> {
    cache: &'c KmemCache,
    quantum: usize,
}

impl<'c> CacheQuanta<'c> {
    /// Quanta of `quantum` bytes from `cache`, whose objects hold at least that many (the
    /// driver's `scullc_quantum`: a merged cache may have larger objects). `None` if they
    /// do not.
    pub fn new(cache: &'c KmemCache, quantum: usize) -> Option<Self> {
        (quantum > 0 && quantum <= cache.object_size()).then_some(CacheQuanta { cache, quantum })
    }

    /// The cache.
    pub fn cache(&self) -> &'c KmemCache {
        self.cache
    }
}

impl Quanta for CacheQuanta<'_> {
    fn quantum(&self) -> usize {
        self.quantum
    }

    fn alloc(&self, k: &K) -> Option<NonNull<u8>> {
        let q = k.kmem_cache_alloc(self.cache, GFP_KERNEL)?;
        // SAFETY: a fresh object of at least `quantum` bytes (checked in `new`), ours alone.
        unsafe { ptr::write_bytes(q.as_ptr(), 0, self.quantum) };
        Some(q)
    }

    unsafe fn free(&self, k: &K, q: NonNull<u8>) {
        // SAFETY: `q` is a live object of this cache (the caller's contract).
        unsafe { k.kmem_cache_free(self.cache, q.as_ptr()) }
    }
}

/// scullp's quanta: blocks of `1 << order` pages from the page allocator.
#[derive(Clone, Copy, Debug)]
pub struct PageQuanta {
    /// `scullp_order`.
    pub order: u32,
}

impl Quanta for PageQuanta {
    fn quantum(&self) -> usize {
        PAGE_SIZE << self.order
    }

    fn alloc(&self, k: &K) -> Option<NonNull<u8>> {
        let q = NonNull::new(k.__get_free_pages(GFP_KERNEL, self.order)?.as_ptr())?;
        // SAFETY: a fresh block of `1 << order` direct-mapped pages, ours alone.
        unsafe { ptr::write_bytes(q.as_ptr(), 0, self.quantum()) };
        Some(q)
    }

    unsafe fn free(&self, k: &K, q: NonNull<u8>) {
        // SAFETY: `q` heads a live block of this order (the caller's contract).
        unsafe { k.free_pages(VirtAddr(q.as_ptr() as usize), self.order) }
    }
}

/// scullv's quanta: vmalloc areas of `PAGE_SIZE << order` bytes.
#[derive(Clone, Copy, Debug)]
pub struct VmallocQuanta {
    /// `scullv_order`.
    pub order: u32,
}

impl Quanta for VmallocQuanta {
    fn quantum(&self) -> usize {
        PAGE_SIZE << self.order
    }

    fn alloc(&self, k: &K) -> Option<NonNull<u8>> {
        let q = k.vmalloc(self.quantum())?;
        // SAFETY: a fresh vmalloc area of `quantum()` bytes, ours alone.
        unsafe { ptr::write_bytes(q.as_ptr(), 0, self.quantum()) };
        Some(q)
    }

    unsafe fn free(&self, k: &K, q: NonNull<u8>) {
        // SAFETY: `q` starts a live area (the caller's contract).
        unsafe { k.vfree(q.as_ptr()) }
    }
}

/// `struct scull_qset`: a node of the device's list, allocated with kmalloc.
#[repr(C)]
struct ScullQset {
    /// `qset` quantum pointers (kmalloc'ed), or null until the set is first written.
    data: *mut *mut u8,
    /// The next set, or null.
    next: *mut ScullQset,
}

/// What the device lock protects: the list and the data size.
struct State {
    data: *mut ScullQset,
    size: usize,
}

// SAFETY: the list is plain kmem memory owned by the device and reached only under its lock.
unsafe impl Send for State {}

/// The driver's write failed for lack of memory (`-ENOMEM`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Enomem;

impl std::fmt::Display for Enomem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("out of memory (ENOMEM)")
    }
}

/// A scull device whose quanta come from `Q`, with per-CPU statistics of its calls.
pub struct Scull<'k, Q: Quanta> {
    kmem: &'k K,
    quanta: Q,
    qset: usize,
    state: Mutex<State>,
    ops: PerCpuBox<'k, HostedPlatform, u64>,
    bytes: PercpuCounter<'k, HostedPlatform>,
}

impl<'k, Q: Quanta> Scull<'k, Q> {
    /// An empty device of `qset` quanta per set (at least 1); `None` if its statistics cannot
    /// be allocated.
    pub fn new(kmem: &'k K, quanta: Q, qset: usize) -> Option<Self> {
        Some(Scull {
            ops: PerCpuBox::new(kmem, GFP_KERNEL)?,
            bytes: PercpuCounter::new(kmem, 0, GFP_KERNEL)?,
            kmem,
            quanta,
            qset: qset.max(1),
            state: Mutex::new(State {
                data: ptr::null_mut(),
                size: 0,
            }),
        })
    }

    /// Bytes per quantum.
    pub fn quantum(&self) -> usize {
        self.quanta.quantum()
    }

    /// Quanta per set.
    pub fn qset(&self) -> usize {
        self.qset
    }

    /// The quantum source.
    pub fn quanta(&self) -> &Q {
        &self.quanta
    }

    /// Calls made, per CPU (`this_cpu_inc` on every read and write).
    pub fn ops(&self) -> &PerCpuBox<'k, HostedPlatform, u64> {
        &self.ops
    }

    /// Bytes moved by reads and writes (a `percpu_counter`).
    pub fn bytes(&self) -> &PercpuCounter<'k, HostedPlatform> {
        &self.bytes
    }

    /// The data size: one past the highest byte written.
    pub fn size(&self) -> usize {
        self.lock().size
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves the list consistent (it only ever grows by whole
        // zeroed nodes), so a poisoned lock is taken as is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn account(&self, n: usize) {
        self.ops.this_cpu_inc();
        self.bytes.add(n as i64);
    }

    /// `(set, slot, offset)` of byte `pos`.
    fn locate(&self, pos: usize) -> (usize, usize, usize) {
        let quantum = self.quantum();
        let itemsize = quantum * self.qset;
        let rest = pos % itemsize;
        (pos / itemsize, rest / quantum, rest % quantum)
    }

    /// Reads from `pos` into `buf`, at most up to the end of the quantum `pos` falls in and
    /// of the data. Returns the bytes read: 0 at or past the end of the data, or in a hole.
    pub fn read(&self, pos: usize, buf: &mut [u8]) -> usize {
        let n = {
            let st = self.lock();
            self.read_locked(&st, pos, buf)
        };
        self.account(n);
        n
    }

    fn read_locked(&self, st: &State, pos: usize, buf: &mut [u8]) -> usize {
        if pos >= st.size {
            return 0;
        }
        let count = buf.len().min(st.size - pos);
        let (item, s_pos, q_pos) = self.locate(pos);
        // Every set up to the one of the last byte written exists: a write creates the list
        // up to its set.
        let mut dptr = st.data;
        for _ in 0..item {
            if dptr.is_null() {
                return 0;
            }
            // SAFETY: a live node of the list, which the lock protects.
            dptr = unsafe { (*dptr).next };
        }
        if dptr.is_null() {
            return 0;
        }
        // SAFETY: as above; `data`, when set, holds `qset` slots and `s_pos < qset`.
        let quantum = unsafe {
            let data = (*dptr).data;
            if data.is_null() {
                return 0; // don't fill holes
            }
            *data.add(s_pos)
        };
        if quantum.is_null() {
            return 0;
        }
        let count = count.min(self.quantum() - q_pos);
        // SAFETY: the quantum holds `quantum()` bytes and `q_pos + count` does not pass its
        // end; `buf` holds at least `count` bytes and is not kmem memory of the device.
        unsafe { ptr::copy_nonoverlapping(quantum.add(q_pos), buf.as_mut_ptr(), count) };
        count
    }

    /// Writes `buf` at `pos`, at most up to the end of the quantum `pos` falls in, allocating
    /// the sets, pointer array and quantum it needs. Returns the bytes written, or [`Enomem`]
    /// when an allocation failed (what was allocated before stays, as in the driver).
    pub fn write(&self, pos: usize, buf: &[u8]) -> Result<usize, Enomem> {
        let r = {
            let mut st = self.lock();
            self.write_locked(&mut st, pos, buf)
        };
        self.account(*r.as_ref().unwrap_or(&0));
        r
    }

    fn write_locked(&self, st: &mut State, pos: usize, buf: &[u8]) -> Result<usize, Enomem> {
        let (item, s_pos, q_pos) = self.locate(pos);
        let dptr = self.follow(st, item).ok_or(Enomem)?;
        // SAFETY: `dptr` is a live node of the list, which the lock protects; its `data`,
        // once set, holds `qset` slots and `s_pos < qset`.
        let slot = unsafe {
            if (*dptr).data.is_null() {
                let data = self
                    .kmem
                    .kcalloc(self.qset, size_of::<*mut u8>(), GFP_KERNEL)
                    .ok_or(Enomem)?;
                (*dptr).data = data.as_ptr().cast();
            }
            (*dptr).data.add(s_pos)
        };
        // SAFETY: `slot` is one of the node's slots, under the lock.
        let mut quantum = unsafe { *slot };
        if quantum.is_null() {
            quantum = self.quanta.alloc(self.kmem).ok_or(Enomem)?.as_ptr();
            // SAFETY: as above.
            unsafe { *slot = quantum };
        }
        let count = buf.len().min(self.quantum() - q_pos);
        // SAFETY: the quantum holds `quantum()` bytes and `q_pos + count` does not pass its
        // end; `buf` is caller memory, not the quantum.
        unsafe { ptr::copy_nonoverlapping(buf.as_ptr(), quantum.add(q_pos), count) };
        st.size = st.size.max(pos + count);
        Ok(count)
    }

    /// `scull_follow`: the `n`th set, creating (zeroed) the sets up to it.
    fn follow(&self, st: &mut State, n: usize) -> Option<*mut ScullQset> {
        if st.data.is_null() {
            st.data = self.new_qset()?;
        }
        let mut qs = st.data;
        for _ in 0..n {
            // SAFETY: a live node of the list, under the lock.
            unsafe {
                if (*qs).next.is_null() {
                    (*qs).next = self.new_qset()?;
                }
                qs = (*qs).next;
            }
        }
        Some(qs)
    }

    fn new_qset(&self) -> Option<*mut ScullQset> {
        let p = self
            .kmem
            .kzalloc(size_of::<ScullQset>(), GFP_KERNEL)?
            .cast::<ScullQset>();
        // kmalloc blocks are aligned to at least 8 bytes: room for an aligned `ScullQset`,
        // and all-zero is a valid empty one.
        debug_assert!(p.as_ptr().is_aligned());
        Some(p.as_ptr())
    }

    /// `(sets, quanta)` the device holds now.
    pub fn footprint(&self) -> (usize, usize) {
        let st = self.lock();
        let (mut sets, mut quanta) = (0, 0);
        let mut dptr = st.data;
        while !dptr.is_null() {
            sets += 1;
            // SAFETY: live nodes and arrays of the list, under the lock.
            unsafe {
                let data = (*dptr).data;
                if !data.is_null() {
                    quanta += (0..self.qset)
                        .filter(|&i| !(*data.add(i)).is_null())
                        .count();
                }
                dptr = (*dptr).next;
            }
        }
        (sets, quanta)
    }

    /// `scull_trim`: frees every quantum, pointer array and set; the size goes back to 0.
    pub fn trim(&self) {
        let mut st = self.lock();
        let mut dptr = st.data;
        while !dptr.is_null() {
            // SAFETY: every node, array and quantum of the list is live and owned by the
            // device; each is freed once here and unlinked before the lock is released.
            unsafe {
                let data = (*dptr).data;
                if !data.is_null() {
                    for i in 0..self.qset {
                        if let Some(q) = NonNull::new(*data.add(i)) {
                            self.quanta.free(self.kmem, q);
                        }
                    }
                    self.kmem.kfree(data.cast());
                }
                let next = (*dptr).next;
                self.kmem.kfree(dptr.cast());
                dptr = next;
            }
        }
        st.data = ptr::null_mut();
        st.size = 0;
    }
}

impl<Q: Quanta> Drop for Scull<'_, Q> {
    fn drop(&mut self) {
        self.trim();
    }
}

/// Writes all of `buf` at `pos` as user space does: calls [`Scull::write`] until done.
/// Returns the number of calls.
pub fn write_all<Q: Quanta>(
    dev: &Scull<'_, Q>,
    mut pos: usize,
    mut buf: &[u8],
) -> Result<u64, Enomem> {
    let mut calls = 0;
    while !buf.is_empty() {
        let n = dev.write(pos, buf)?;
        calls += 1;
        pos += n;
        buf = &buf[n..];
    }
    Ok(calls)
}

/// Reads into `buf` from `pos` as user space does: calls [`Scull::read`] until `buf` is full
/// or a call returns 0. Returns `(bytes read, calls)`.
pub fn read_full<Q: Quanta>(dev: &Scull<'_, Q>, mut pos: usize, buf: &mut [u8]) -> (usize, u64) {
    let (mut done, mut calls) = (0, 0);
    while done < buf.len() {
        let n = dev.read(pos, &mut buf[done..]);
        calls += 1;
        if n == 0 {
            break;
        }
        done += n;
        pos += n;
    }
    (done, calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmem::slab::SlabFlags;
    use kmem_hosted::{Machine, MachineConfig};

    fn machine() -> Machine {
        Machine::boot(MachineConfig::x86_64(64 << 20).with_cpus(2)).expect("boot")
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 8) as u8)
            .collect()
    }

    /// A scullc-like device with tiny quanta so that short buffers cross boundaries: 100-byte
    /// quanta, 4 per set (a set covers 400 bytes).
    fn with_small_device(f: impl FnOnce(&Machine, &Scull<'_, CacheQuanta<'_>>)) {
        let m = machine();
        // Not merged with kmalloc-128, so that its objects are the device's alone.
        let flags = SlabFlags::HWCACHE_ALIGN | SlabFlags::NO_MERGE;
        let cache = m
            .kmem_cache_create("scull_test", 100, 0, flags, None)
            .unwrap();
        {
            let quanta = CacheQuanta::new(cache, 100).unwrap();
            let dev = Scull::new(m.kmem(), quanta, 4).unwrap();
            assert_eq!((dev.quantum(), dev.qset()), (100, 4));
            f(&m, &dev);
        }
        assert_eq!(cache.objects_in_use(m.nr_cpus()), 0, "trim on drop");
        // SAFETY: the device is gone and freed every object.
        assert!(unsafe { m.kmem_cache_destroy(cache) });
    }

    #[test]
    fn a_call_stops_at_the_end_of_its_quantum() {
        with_small_device(|_, dev| {
            let data = pattern(50, 1);
            // 95..145 crosses the first quantum's end at 100: the write stops there.
            assert_eq!(dev.write(95, &data), Ok(5));
            assert_eq!(dev.size(), 100);
            assert_eq!(dev.write(100, &data[5..]), Ok(45));
            assert_eq!(dev.size(), 145);
            let mut buf = [0u8; 50];
            assert_eq!(
                dev.read(95, &mut buf),
                5,
                "read stops at the quantum's end too"
            );
            assert_eq!(dev.read(100, &mut buf[5..]), 45);
            assert_eq!(&buf[..], &data[..]);
            // The bytes before 95 were never written: the quantum was zeroed.
            let mut head = [0xffu8; 95];
            assert_eq!(dev.read(0, &mut head), 95);
            assert!(head.iter().all(|&b| b == 0));
            assert_eq!(dev.footprint(), (1, 2));
        });
    }

    #[test]
    fn data_crossing_sets_reads_back_whole() {
        with_small_device(|_, dev| {
            // 370..1230 spans sets 0, 1, 2 and 3 (400 bytes each) and many quanta.
            let data = pattern(860, 7);
            let calls = write_all(dev, 370, &data).unwrap();
            // 30 bytes to the end of quantum 3, then 8 whole quanta, then 30 bytes.
            assert_eq!(calls, 10);
            assert_eq!(dev.size(), 1230);
            assert_eq!(dev.footprint(), (4, 10));
            let mut buf = vec![0u8; 860];
            assert_eq!(read_full(dev, 370, &mut buf), (860, 10));
            assert_eq!(buf, data);
            // An offset inside a later set, across the set boundary at 800.
            let mut mid = [0u8; 30];
            assert_eq!(read_full(dev, 790, &mut mid).0, 30);
            assert_eq!(&mid[..], &data[790 - 370..820 - 370]);
        });
    }

    #[test]
    fn reads_are_short_at_the_end_of_the_data_and_zero_past_it() {
        with_small_device(|_, dev| {
            let data = pattern(250, 3);
            write_all(dev, 0, &data).unwrap();
            let mut buf = [0u8; 100];
            // 240..250 is the last 10 bytes, inside quantum 2 (200..300).
            assert_eq!(dev.read(240, &mut buf), 10);
            assert_eq!(&buf[..10], &data[240..]);
            assert_eq!(dev.read(250, &mut buf), 0, "at the end");
            assert_eq!(dev.read(10_000, &mut buf), 0, "past the end");
            let mut all = vec![0u8; 1000];
            assert_eq!(read_full(dev, 0, &mut all), (250, 4), "3 quanta, then EOF");
            assert_eq!(&all[..250], &data[..]);
        });
    }

    #[test]
    fn holes_read_as_end_of_file() {
        with_small_device(|_, dev| {
            // Only quantum 1 of set 2 (900..1000) is written: sets 0 and 1 exist without
            // pointer arrays, quantum 0 of set 2 was never allocated.
            assert_eq!(dev.write(950, b"hello"), Ok(5));
            assert_eq!(dev.size(), 955);
            assert_eq!(dev.footprint(), (3, 1));
            let mut buf = [0u8; 16];
            assert_eq!(dev.read(0, &mut buf), 0, "set 0 has no quanta");
            assert_eq!(dev.read(810, &mut buf), 0, "quantum 0 of set 2 is a hole");
            assert_eq!(dev.read(940, &mut buf), 15, "up to the end of the data");
            assert_eq!(&buf[10..15], b"hello");
            assert_eq!(dev.read(950, &mut buf), 5);
            assert_eq!(&buf[..5], b"hello");
        });
    }

    #[test]
    fn overwrites_keep_the_quanta_and_trim_frees_everything() {
        with_small_device(|m, dev| {
            let cache = dev.quanta().cache();
            write_all(dev, 0, &pattern(1000, 1)).unwrap();
            assert_eq!(cache.objects_in_use(m.nr_cpus()), 10);
            let data = pattern(1000, 2);
            write_all(dev, 0, &data).unwrap();
            assert_eq!(dev.footprint(), (3, 10), "an overwrite allocates nothing");
            let mut buf = vec![0u8; 1000];
            read_full(dev, 0, &mut buf);
            assert_eq!(buf, data);
            dev.trim();
            assert_eq!((dev.size(), dev.footprint()), (0, (0, 0)));
            assert_eq!(dev.read(0, &mut buf), 0);
            assert_eq!(cache.objects_in_use(m.nr_cpus()), 0);
            m.validate().unwrap();
        });
    }

    #[test]
    fn every_call_is_counted_on_its_cpu() {
        with_small_device(|m, dev| {
            let calls = write_all(dev, 0, &pattern(450, 5)).unwrap();
            let mut buf = vec![0u8; 450];
            let (n, reads) = read_full(dev, 0, &mut buf);
            assert_eq!(n, 450);
            assert_eq!(dev.ops().sum(), calls + reads);
            assert_eq!(dev.bytes().sum(), 900);
            let per_cpu: u64 = (0..m.nr_cpus()).map(|c| dev.ops().per_cpu(c)).sum();
            assert_eq!(per_cpu, calls + reads);
        });
    }

    #[test]
    fn a_merged_cache_keeps_the_drivers_quantum() {
        let m = machine();
        // 100 bytes, cache-line aligned: merged with kmalloc-128, whose objects are larger.
        let cache = m
            .kmem_cache_create("scull_merged", 100, 0, SlabFlags::HWCACHE_ALIGN, None)
            .unwrap();
        assert!(
            cache.object_size() > 100,
            "merged into a cache of larger objects"
        );
        assert!(CacheQuanta::new(cache, cache.object_size() + 1).is_none());
        {
            let dev = Scull::new(m.kmem(), CacheQuanta::new(cache, 100).unwrap(), 4).unwrap();
            assert_eq!(dev.quantum(), 100);
            assert_eq!(dev.write(95, &[1; 10]), Ok(5), "the quantum ends at 100");
        }
        // SAFETY: the device is gone; the cache is not used again.
        unsafe { m.kmem_cache_destroy(cache) };
    }

    #[test]
    fn page_and_vmalloc_quanta_read_back() {
        let m = machine();
        let data = pattern(3 * PAGE_SIZE + 123, 9);
        {
            let dev = Scull::new(m.kmem(), PageQuanta { order: 1 }, 2).unwrap();
            assert_eq!(dev.quantum(), 2 * PAGE_SIZE);
            assert_eq!(write_all(&dev, 77, &data).unwrap(), 2);
            let mut buf = vec![0u8; data.len()];
            assert_eq!(read_full(&dev, 77, &mut buf).0, data.len());
            assert_eq!(buf, data);
            assert_eq!(dev.footprint(), (1, 2));
        }
        let vmalloc = m.vmalloc_space();
        let before = vmalloc.vmalloc_nr_pages();
        {
            let dev = Scull::new(m.kmem(), VmallocQuanta { order: 0 }, 3).unwrap();
            write_all(&dev, PAGE_SIZE - 1, &data).unwrap();
            assert_eq!(dev.footprint(), (2, 5));
            assert_eq!(vmalloc.vmalloc_nr_pages(), before + 5);
            let mut buf = vec![0u8; data.len()];
            assert_eq!(read_full(&dev, PAGE_SIZE - 1, &mut buf).0, data.len());
            assert_eq!(buf, data);
        }
        assert_eq!(
            vmalloc.vmalloc_nr_pages(),
            before,
            "trim vfree'd every quantum"
        );
        m.validate().unwrap();
    }
}
