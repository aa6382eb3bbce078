//! LDD3 chapter 8's sample drivers on kmem: the same data set written to scullc, scullp
//! (order 0 and 2) and scullv through `write`, read back through `read` by two threads (on
//! vCPUs of their own when the machine has enough), verified byte for byte, with throughput
//! and the memory the machine accounts to each; then the devices' per-CPU statistics.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use kmem::addr::PAGE_SIZE;
use kmem::platform::{CpuGuard, Platform};
use kmem::slab::SlabFlags;
use kmem_hosted::Machine;

use super::scull::{
    CacheQuanta, PageQuanta, Quanta, SCULL_QSET, SCULLC_QUANTUM, SCULLP_ORDER, SCULLV_ORDER, Scull,
    VmallocQuanta, read_full, write_all,
};
use super::{Narrator, Progress, Unit, mib_per_s, pattern};

/// Threads doing a device's reads and writes, each on its own half of the data.
const THREADS: usize = 2;
/// Bytes a user-space call asks for (`dd bs=16k`); the driver moves at most a quantum.
const CALL: usize = 16 << 10;
/// The data set on machines of 64 MiB and more; smaller ones get 1/16 of their RAM.
const DATA: usize = 4 << 20;

/// What one device's run measured.
struct Io {
    write_calls: u64,
    read_calls: u64,
    write_time: Duration,
    read_time: Duration,
    cpus: Vec<usize>,
}

/// A device's per-CPU statistics, read before it goes.
struct Stats {
    name: String,
    per_cpu: Vec<u64>,
    sum: u64,
    calls: u64,
    bytes: i64,
}

/// A worker's place in the phases of [`exercise`]: it waits at the barrier once per phase,
/// and for the phases it has not reached when it goes (even by a panic), so the main thread
/// never waits for it forever.
struct Phases<'a> {
    barrier: &'a Barrier,
    left: u32,
}

impl Phases<'_> {
    fn next(&mut self) {
        if self.left > 0 {
            self.left -= 1;
            self.barrier.wait();
        }
    }
}

impl Drop for Phases<'_> {
    fn drop(&mut self) {
        while self.left > 0 {
            self.next();
        }
    }
}

/// "1 page", "4 pages".
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The data set's size on `m`.
fn data_len(m: &Machine) -> usize {
    (m.totalram_pages() * PAGE_SIZE / 16).min(DATA) / PAGE_SIZE * PAGE_SIZE
}

/// Writes `data` to `dev` from [`THREADS`] threads, each its own part, then (once every
/// write is done) reads it back with the same threads, and checks it.
fn exercise<Q: Quanta + Sync>(
    m: &Machine,
    dev: &Scull<'_, Q>,
    data: &[u8],
    progress: &Progress,
) -> Result<Io, String> {
    let part = data.len().div_ceil(THREADS);
    let mut back = vec![0u8; data.len()];
    let nr_parts = data.len().div_ceil(part);
    // All writes end before any read starts; the main thread times both phases.
    let phase = Barrier::new(nr_parts + 1);
    let mut write_time = Duration::ZERO;
    let mut read_time = Duration::ZERO;
    let start = Instant::now();
    let results = std::thread::scope(|s| {
        let phase = &phase;
        let workers: Vec<_> = data
            .chunks(part)
            .zip(back.chunks_mut(part))
            .enumerate()
            .map(|(t, (mine, into))| {
                s.spawn(move || {
                    let mut phases = Phases {
                        barrier: phase,
                        left: 2,
                    };
                    let cpu = m.platform().cpu_guard().cpu();
                    let base = t * part;
                    let mut writes = Ok(0);
                    for (i, buf) in mine.chunks(CALL).enumerate() {
                        match write_all(dev, base + i * CALL, buf) {
                            Ok(c) => writes = writes.map(|w| w + c),
                            Err(e) => {
                                writes = Err(format!("write at {}: {e}", base + i * CALL));
                                break;
                            }
                        }
                        progress.inc(buf.len() as u64);
                    }
                    phases.next(); // writes done
                    phases.next(); // reads may start
                    let writes = writes?;
                    let (mut reads, mut pos) = (0, base);
                    for buf in into.chunks_mut(CALL) {
                        let (got, calls) = read_full(dev, pos, buf);
                        reads += calls;
                        if got != buf.len() {
                            return Err(format!("read at {pos}: {got} of {} bytes", buf.len()));
                        }
                        pos += got;
                        progress.inc(got as u64);
                    }
                    // The reader of the last part reads once more: end of file.
                    if t == nr_parts - 1 {
                        reads += 1;
                        if dev.read(pos, &mut [0u8; 1]) != 0 {
                            return Err(format!("a read at the end ({pos}) returned data"));
                        }
                    }
                    Ok((writes, reads, cpu))
                })
            })
            .collect();
        phase.wait();
        write_time = start.elapsed();
        let size = dev.size();
        let read_start = Instant::now();
        phase.wait();
        let results = workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect::<Result<Vec<_>, String>>();
        read_time = read_start.elapsed();
        results.map(|r| (r, size))
    });
    let (results, size) = results?;
    if size != data.len() {
        return Err(format!(
            "{} bytes written, the device holds {size}",
            data.len()
        ));
    }
    if let Some(i) = (0..data.len()).find(|&i| back[i] != data[i]) {
        return Err(format!(
            "byte {i} read back as {:#04x}, written as {:#04x}",
            back[i], data[i]
        ));
    }
    Ok(Io {
        write_calls: results.iter().map(|r| r.0).sum(),
        read_calls: results.iter().map(|r| r.1).sum(),
        write_time,
        read_time,
        cpus: results.iter().map(|r| r.2).collect(),
    })
}

/// Prints what `exercise` measured and keeps the device's statistics.
fn report<Q: Quanta>(
    m: &Machine,
    n: &mut impl Narrator,
    name: &str,
    dev: &Scull<'_, Q>,
    len: usize,
    io: &Io,
    stats: &mut Vec<Stats>,
) {
    n.say(format_args!(
        "  {name}: wrote {len} bytes, read back {len} bytes, verified"
    ));
    let mut cpus = io.cpus.clone();
    cpus.sort_unstable();
    cpus.dedup();
    let cpus: Vec<String> = cpus.iter().map(|c| format!("cpu{c}")).collect();
    n.say(format_args!(
        "    {THREADS} threads ({}), {} KiB per call: write {} calls, {:.0} MiB/s; read {} calls, {:.0} MiB/s",
        cpus.join(", "),
        CALL >> 10,
        io.write_calls,
        mib_per_s(len, io.write_time.as_secs_f64()),
        io.read_calls,
        mib_per_s(len, io.read_time.as_secs_f64()),
    ));
    let ops = dev.ops();
    let per_cpu: Vec<u64> = (0..m.nr_cpus()).map(|c| ops.per_cpu(c)).collect();
    stats.push(Stats {
        name: name.to_string(),
        sum: ops.sum(),
        per_cpu,
        calls: io.write_calls + io.read_calls,
        bytes: dev.bytes().sum(),
    });
}

/// The drivers' tour; leaves nothing allocated but empty slabs in the kmalloc caches.
pub fn tour(m: &Machine, n: &mut impl Narrator) -> Result<(), String> {
    let len = data_len(m);
    let data = pattern(len, 0x5c011);
    let mut stats = Vec::new();
    let k = m.kmem();

    n.heading(
        "scullc: quanta from a lookaside cache, kmem_cache_create(\"scullc\", 4000, 0, SLAB_HWCACHE_ALIGN, NULL)",
    );
    n.say(format_args!(
        "  each device: {} kB written with write() and read back with read() by {THREADS} threads; a call moves at most to the end of its quantum",
        len / 1024
    ));
    let cache = m
        .kmem_cache_create("scullc", SCULLC_QUANTUM, 0, SlabFlags::HWCACHE_ALIGN, None)
        .ok_or("kmem_cache_create(\"scullc\") failed")?;
    {
        let quanta = CacheQuanta::new(cache, SCULLC_QUANTUM).ok_or("scullc: objects too small")?;
        let dev = Scull::new(k, quanta, SCULL_QSET).ok_or("scullc: no memory")?;
        let io = exercise(
            m,
            &dev,
            &data,
            &n.progress("scullc", 2 * len as u64, Unit::Bytes),
        )?;
        report(m, n, "scullc", &dev, len, &io, &mut stats);
        let (sets, quanta) = dev.footprint();
        let cache = dev.quanta().cache();
        let pages = cache.nr_slabs() << cache.order();
        n.say(format_args!(
            "    {quanta} quanta in {sets} qsets of {}; the cache holds {} slabs of {} pages, {} objects of {} bytes: {} kB",
            dev.qset(),
            cache.nr_slabs(),
            1 << cache.order(),
            cache.objects_per_slab(),
            cache.size(),
            pages * PAGE_SIZE / 1024,
        ));
        for line in m
            .proc_slabinfo()
            .lines()
            .filter(|l| l.starts_with("scullc "))
        {
            n.say(format_args!("    | {line}"));
        }
        dev.trim();
        let left = cache.objects_in_use(m.nr_cpus());
        if left != 0 {
            return Err(format!("scullc: {left} objects in use after trim"));
        }
    }
    // SAFETY: the device is gone and every quantum went back; the cache is not used again.
    if !unsafe { m.kmem_cache_destroy(cache) } {
        return Err("kmem_cache_destroy(\"scullc\") found objects left".into());
    }
    n.say(format_args!(
        "    trim: every quantum back to the cache; kmem_cache_destroy(\"scullc\")"
    ));

    n.heading("scullp: quanta of whole pages, __get_free_pages(GFP_KERNEL, scullp_order)");
    for order in [SCULLP_ORDER, 2] {
        let name = format!("scullp/{order}");
        m.drain_all_pages();
        let free_before = m.nr_free_pages();
        let dev = Scull::new(k, PageQuanta { order }, SCULL_QSET).ok_or("scullp: no memory")?;
        let io = exercise(
            m,
            &dev,
            &data,
            &n.progress(&name, 2 * len as u64, Unit::Bytes),
        )?;
        report(
            m,
            n,
            &format!("scullp order {order}"),
            &dev,
            len,
            &io,
            &mut stats,
        );
        // The name in the table is the short one.
        if let Some(s) = stats.last_mut() {
            s.name = name;
        }
        m.drain_all_pages();
        let taken = free_before.saturating_sub(m.nr_free_pages());
        let (sets, quanta) = dev.footprint();
        let quanta_pages = quanta << order;
        let rest = taken.saturating_sub(quanta_pages) * PAGE_SIZE / 1024;
        n.say(format_args!(
            "    {quanta} quanta of {} in {sets} {}; MemFree down {} kB: {} kB of quanta, {}",
            plural(1 << order, "page"),
            if sets == 1 { "qset" } else { "qsets" },
            taken * PAGE_SIZE / 1024,
            quanta_pages * PAGE_SIZE / 1024,
            if rest == 0 {
                "the qsets and pointer arrays fit in kmalloc slabs already there".to_string()
            } else {
                format!("{rest} kB of kmalloc slabs for the qsets and pointer arrays")
            },
        ));
        if taken < quanta_pages {
            return Err(format!(
                "scullp: MemFree went down by {taken} pages for {quanta_pages} pages of quanta"
            ));
        }
        drop(dev);
        n.say(format_args!("    trim: free_pages() of every quantum"));
    }

    n.heading("scullv: quanta from vmalloc(PAGE_SIZE << scullv_order), order 4");
    {
        let vmalloc = m.vmalloc_space();
        let used_before = vmalloc.vmalloc_nr_pages();
        let quanta = VmallocQuanta {
            order: SCULLV_ORDER,
        };
        let dev = Scull::new(k, quanta, SCULL_QSET).ok_or("scullv: no memory")?;
        let io = exercise(
            m,
            &dev,
            &data,
            &n.progress("scullv", 2 * len as u64, Unit::Bytes),
        )?;
        report(m, n, "scullv", &dev, len, &io, &mut stats);
        let (sets, quanta) = dev.footprint();
        let used = vmalloc.vmalloc_nr_pages() - used_before;
        n.say(format_args!(
            "    {quanta} quanta of {} in {sets} {}; VmallocUsed up {} kB, in {quanta} areas like:",
            plural(1 << SCULLV_ORDER, "page"),
            if sets == 1 { "qset" } else { "qsets" },
            used * PAGE_SIZE / 1024,
        ));
        if used != quanta << SCULLV_ORDER {
            return Err(format!(
                "scullv: VmallocUsed grew by {used} pages for {quanta} quanta"
            ));
        }
        let info = m.proc_vmallocinfo();
        if let Some(line) = info.lines().find(|l| l.contains("scull.rs")) {
            n.say(format_args!("    | {line}"));
        }
        dev.trim();
        let after = vmalloc.vmalloc_nr_pages();
        if after != used_before {
            return Err(format!(
                "scullv: VmallocUsed {after} pages after trim, {used_before} before"
            ));
        }
        n.say(format_args!(
            "    trim: vfree() of every quantum; VmallocUsed back to {} kB",
            after * PAGE_SIZE / 1024
        ));
    }
    percpu_stats(m, n, &stats, len)
}

/// The devices' per-CPU call counters: each CPU's copy, their sum, and the calls made.
fn percpu_stats(
    m: &Machine,
    n: &mut impl Narrator,
    stats: &[Stats],
    len: usize,
) -> Result<(), String> {
    n.heading("Per-CPU statistics: every read and write did this_cpu_inc on its device's counter");
    n.say(format_args!(
        "  calls per CPU (alloc_percpu'd u64: no lock, no shared cache line); bytes in a percpu_counter"
    ));
    // Every CPU when there are few; else those that counted something.
    let cpus: Vec<usize> = (0..m.nr_cpus())
        .filter(|&c| m.nr_cpus() <= 8 || stats.iter().any(|s| s.per_cpu[c] != 0))
        .collect();
    let mut header = format!("  {:<10}", "device");
    for c in &cpus {
        header += &format!(" {:>7}", format!("cpu{c}"));
    }
    n.say(format_args!(
        "{header} | {:>7} {:>10} {:>10}",
        "sum", "calls made", "bytes"
    ));
    for s in stats {
        let mut row = format!("  {:<10}", s.name);
        for &c in &cpus {
            row += &format!(" {:>7}", s.per_cpu[c]);
        }
        n.say(format_args!(
            "{row} | {:>7} {:>10} {:>10}",
            s.sum, s.calls, s.bytes
        ));
        if s.sum != s.calls || s.per_cpu.iter().sum::<u64>() != s.sum {
            return Err(format!(
                "{}: per-CPU copies add up to {}, {} calls were made",
                s.name, s.sum, s.calls
            ));
        }
        if s.bytes != 2 * len as i64 {
            return Err(format!(
                "{}: the percpu_counter holds {} bytes, {} were moved",
                s.name,
                s.bytes,
                2 * len
            ));
        }
    }
    if cpus.len() < m.nr_cpus() {
        n.say(format_args!("  (the other CPUs' copies are 0)"));
    }
    n.say(format_args!(
        "  the per-CPU copies add up exactly to the calls made; percpu_counter_sum() to the {} bytes written and read",
        2 * len
    ));
    Ok(())
}
