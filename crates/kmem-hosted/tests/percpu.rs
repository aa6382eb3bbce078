//! Per-CPU variables: static [`PerCpu`] and dynamic `alloc_percpu`, `this_cpu` arithmetic,
//! `percpu_counter`, the allocator's limits and its accounting (after Linux's
//! `lib/percpu_test.c` and `mm/percpu-km`'s `pcpu_alloc_test`).

mod common;
use common::{Rng, Watchdog, check_pat, write_pat};

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use kmem::addr::PAGE_SIZE;
use kmem::gfp::*;
use kmem::percpu::{
    PCPU_MIN_UNIT_SIZE, PCPU_UNIT_SIZE, PerCpu, PerCpuBox, PercpuAllocator, PercpuCounter,
    PercpuPtr,
};
use kmem::platform::Platform;
use kmem_hosted::{Machine, MachineConfig};

const MIB: u64 = 1 << 20;

fn machine(cpus: usize) -> Machine {
    Machine::boot(MachineConfig::x86_64(256 * MIB).with_cpus(cpus)).expect("boot")
}

fn meminfo_kb(m: &Machine, key: &str) -> u64 {
    let text = m.proc_meminfo();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in meminfo"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ------------------------------------------------------------------------------ statics

static INDEPENDENT: PerCpu<u64> = PerCpu::new(7);

#[test]
fn static_copies_are_independent() {
    let m = machine(4);
    let p = m.platform();
    for cpu in 0..4 {
        assert_eq!(
            *INDEPENDENT.per_cpu(p, cpu),
            7,
            "initial value on CPU {cpu}"
        );
        *INDEPENDENT.per_cpu(p, cpu) = 100 + cpu as u64;
    }
    for cpu in 0..4 {
        assert_eq!(*INDEPENDENT.per_cpu(p, cpu), 100 + cpu as u64);
    }
    // A this_cpu write changes exactly the running CPU's copy.
    let cpu = {
        let mut v = INDEPENDENT.get_cpu_var(p);
        *v += 1000;
        v.cpu()
    };
    INDEPENDENT.this_cpu_add(p, 5);
    for c in 0..4 {
        let want = if c == cpu {
            1105 + c as u64
        } else {
            100 + c as u64
        };
        assert_eq!(
            *INDEPENDENT.per_cpu(p, c),
            want,
            "CPU {c} (running on {cpu})"
        );
    }
    assert_eq!(INDEPENDENT.sum(p), 100 + 101 + 102 + 103 + 1005);
}

kmem::define_per_cpu! {
    /// A non-`Copy` per-CPU value: a small array.
    static ARRAYS: [u32; 8] = [0; 8];
}

#[test]
fn get_cpu_var_pins_the_cpu_and_is_exclusive() {
    let m = machine(2);
    let p = m.platform();
    {
        let mut a = ARRAYS.get_cpu_var(p);
        a[3] = 33;
        // Inside get_cpu_var the caller is in atomic context (preemption disabled).
        assert!(p.in_atomic());
        let cpu = a.cpu();
        drop(a);
        assert!(!p.in_atomic());
        assert_eq!(ARRAYS.per_cpu(p, cpu)[3], 33);
    }
    // Taking the same variable twice on one CPU would alias: it is reported as a bug, and
    // the unwinding releases both the CPU and the variable.
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _a = ARRAYS.get_cpu_var(p);
        let _b = ARRAYS.get_cpu_var(p);
    }));
    let msg = r.expect_err("nested get_cpu_var must panic");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("taken twice"), "{msg}");
    assert!(!p.in_atomic());
    ARRAYS.get_cpu_var(p)[0] = 1;
}

static BUSY: PerCpu<u64> = PerCpu::new(0);

#[test]
fn this_cpu_on_a_held_variable_is_refused() {
    let m = machine(2);
    let p = m.platform();
    let r = catch_unwind(AssertUnwindSafe(|| {
        let _v = BUSY.get_cpu_var(p);
        BUSY.this_cpu_inc(p);
    }));
    assert!(r.is_err());
    BUSY.this_cpu_inc(p);
    assert_eq!(BUSY.sum(p), 1);
}

static SHARED_BY_MACHINES: PerCpu<u32> = PerCpu::new(0);

#[test]
fn a_static_belongs_to_one_machine() {
    let a = machine(2);
    let b = machine(2);
    SHARED_BY_MACHINES.this_cpu_inc(a.platform());
    let r = catch_unwind(AssertUnwindSafe(|| {
        SHARED_BY_MACHINES.this_cpu_inc(b.platform())
    }));
    let msg = r.expect_err("second machine must be refused");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("two machines"), "{msg}");
    assert_eq!(SHARED_BY_MACHINES.sum(a.platform()), 1);
}

static L: PerCpu<i64> = PerCpu::new(0);
static UL: PerCpu<u64> = PerCpu::new(0);
static UI: PerCpu<u32> = PerCpu::new(0);

/// `lib/percpu_test.c`: this_cpu arithmetic on signed and unsigned counters wraps as C's.
#[test]
fn this_cpu_arithmetic_wraps_like_percpu_test() {
    let m = machine(2);
    let p = m.platform();
    // Stay on one CPU for the whole test, as percpu_test does with preempt_disable.
    let _pin = p.cpu_guard();

    L.this_cpu_write(p, 0);
    L.this_cpu_dec(p);
    assert_eq!(L.this_cpu_read(p), -1);
    L.this_cpu_add(p, 1);
    assert_eq!(L.this_cpu_read(p), 0);
    L.this_cpu_add(p, -1);
    assert_eq!(L.this_cpu_read(p), -1);
    L.this_cpu_write(p, i64::MAX);
    L.this_cpu_inc(p);
    assert_eq!(L.this_cpu_read(p), i64::MIN);

    UL.this_cpu_write(p, 0);
    UL.this_cpu_dec(p);
    assert_eq!(UL.this_cpu_read(p), u64::MAX);
    UL.this_cpu_inc(p);
    assert_eq!(UL.this_cpu_read(p), 0);
    // Adding the two's complement of 1 is a decrement (`this_cpu_add(ul, -(unsigned)1)`).
    UL.this_cpu_add(p, 1u64.wrapping_neg());
    assert_eq!(UL.this_cpu_read(p), u64::MAX);
    UL.this_cpu_sub(p, u64::MAX);
    assert_eq!(UL.this_cpu_read(p), 0);
    assert_eq!(UL.this_cpu_add_return(p, 3u64.wrapping_neg()), u64::MAX - 2);

    UI.this_cpu_write(p, 0);
    UI.this_cpu_sub(p, 1);
    assert_eq!(UI.this_cpu_read(p), u32::MAX);
    UI.this_cpu_add(p, 0xffff_fffe);
    assert_eq!(UI.this_cpu_read(p), 0xffff_fffd);
    assert_eq!(UI.this_cpu_add_return(p, 3), 0);
}

static TOTAL: PerCpu<u64> = PerCpu::new(0);

/// Two threads each add to their own CPU's copy with no lock: the sum is exact.
#[test]
fn two_threads_updating_their_own_copy_give_an_exact_total() {
    let _w = Watchdog::new("percpu two threads", Duration::from_secs(120));
    let m = machine(2);
    const N: u64 = 200_000;
    let dynamic: PerCpuBox<'_, _, u64> = PerCpuBox::new(m.kmem(), GFP_KERNEL).unwrap();
    let counter = PercpuCounter::new(m.kmem(), 0, GFP_KERNEL).unwrap();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (m, dynamic, counter) = (&m, &dynamic, &counter);
            s.spawn(move || {
                let p = m.platform();
                for i in 0..N {
                    TOTAL.this_cpu_inc(p);
                    dynamic.this_cpu_add(2);
                    counter.add(if t == 0 { 3 } else { -1 });
                    if i % 4096 == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
    assert_eq!(TOTAL.sum(m.platform()), 2 * N);
    assert_eq!(dynamic.sum(), 4 * N);
    assert_eq!(counter.sum(), 2 * N as i64);
    // The global count alone is within the batch of every CPU.
    let slack = i64::from(counter.batch()) * 2;
    assert!((counter.read() - 2 * N as i64).abs() < slack);
}

// ------------------------------------------------------------------------------ dynamic

#[test]
fn first_chunk_is_reserved_at_boot_and_shown_in_meminfo() {
    let m = machine(4);
    let pages = PCPU_UNIT_SIZE / PAGE_SIZE * 4;
    assert_eq!(m.kmem().percpu().stats().nr_chunks, 1);
    assert_eq!(m.kmem().percpu().nr_pages(), pages);
    assert_eq!(meminfo_kb(&m, "Percpu"), (pages * 4) as u64);
    assert!(m.platform().log_contains("percpu: Embedded 16 pages/cpu"));
    // The chunk came from memblock: a reserved range of exactly its size.
    let size = PercpuAllocator::chunk_size(4) as u64;
    assert!(
        m.memblock()
            .reserved()
            .as_slice()
            .iter()
            .any(|r| r.size >= size),
        "no reservation holds the first chunk"
    );
}

#[test]
fn copies_are_zeroed_and_independent() {
    let m = machine(4);
    let k = m.kmem();
    let a: PercpuPtr<[u64; 16]> = k.alloc_percpu().unwrap();
    for cpu in 0..4 {
        let c = a.per_cpu_ptr(cpu).as_ptr();
        // SAFETY: a live allocation of `[u64; 16]` in every unit; this thread is its only user.
        unsafe {
            assert_eq!(*c, [0; 16], "CPU {cpu}'s copy is not zeroed");
            (*c)[0] = cpu as u64 + 1;
        }
    }
    for cpu in 0..4 {
        // SAFETY: as above.
        assert_eq!(unsafe { (*a.per_cpu_ptr(cpu).as_ptr())[0] }, cpu as u64 + 1);
    }
    // Units are PCPU_UNIT_SIZE apart.
    assert_eq!(
        a.per_cpu_ptr(1).as_ptr() as usize - a.addr(),
        PCPU_UNIT_SIZE
    );
    // SAFETY: freed once, not used after.
    unsafe { k.free_percpu(a) };
    // The same area again: zeroed again in every unit.
    let b: PercpuPtr<[u64; 16]> = k.alloc_percpu().unwrap();
    assert_eq!(b, a.cast(), "first fit reuses the area");
    for cpu in 0..4 {
        // SAFETY: as above.
        assert_eq!(unsafe { *b.per_cpu_ptr(cpu).as_ptr() }, [0; 16]);
    }
    // SAFETY: freed once.
    unsafe { k.free_percpu(b) };
    k.validate().unwrap();
}

#[test]
fn illegal_sizes_and_alignments_are_refused_with_a_report() {
    let m = machine(2);
    let k = m.kmem();
    for (size, align) in [
        (0, 8),
        (PCPU_MIN_UNIT_SIZE + 1, 8),
        (64, 3),
        (64, 2 * PAGE_SIZE),
        (64, 0),
    ] {
        assert!(k.__alloc_percpu(size, align).is_none(), "{size}/{align}");
        assert!(
            m.platform().log_contains(&format!(
                "illegal size ({size}) or align ({align}) for percpu allocation"
            )),
            "{size}/{align}: {:?}",
            m.platform().take_log()
        );
    }
    // __GFP_NOWARN silences the report, not the refusal.
    m.platform().take_log();
    assert!(
        k.__alloc_percpu_gfp(0, 8, GFP_KERNEL | __GFP_NOWARN)
            .is_none()
    );
    assert!(!m.platform().log_contains("illegal size"));
    // The limits themselves are fine.
    let big = k.__alloc_percpu(PCPU_MIN_UNIT_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(big.addr() % PAGE_SIZE, 0);
    assert_eq!(
        k.percpu().alloc_size(big.addr() as *const u8),
        Some(PCPU_MIN_UNIT_SIZE)
    );
    // SAFETY: freed once.
    unsafe { k.free_percpu(big) };
    k.validate().unwrap();
}

#[test]
fn bad_frees_are_reported_and_change_nothing() {
    let m = machine(2);
    let k = m.kmem();
    let a = k.__alloc_percpu(64, 8).unwrap();
    let b = k.__alloc_percpu(64, 8).unwrap();
    let before = k.percpu().stats();
    let bad: [usize; 4] = [
        a.addr() + 4,           // inside an area
        b.addr() + 64,          // the free space past the last area
        a.addr() + 2,           // not on a 4-byte boundary
        0x1000_0000_0000_usize, // not per-CPU memory at all
    ];
    for (i, addr) in bad.into_iter().enumerate() {
        let p = PercpuPtr::<u8>::from_raw(std::ptr::NonNull::new(addr as *mut u8).unwrap());
        // SAFETY: none of these starts a live allocation: the allocator must refuse them.
        unsafe { k.free_percpu(p) };
        assert_eq!(k.percpu().bad_frees(), i + 1);
    }
    assert!(
        m.platform()
            .log_contains("Trying to free_percpu() bad or nonexistent area")
    );
    assert_eq!(k.percpu().stats(), before);
    // SAFETY: `a` is live, freed once here.
    unsafe { k.free_percpu(a) };
    // SAFETY: a double free: refused.
    unsafe { k.free_percpu(a) };
    assert_eq!(k.percpu().bad_frees(), 5);
    // `b` is intact and still freeable.
    assert_eq!(k.percpu().alloc_size(b.addr() as *const u8), Some(64));
    // SAFETY: freed once.
    unsafe { k.free_percpu(b) };
    assert_eq!(k.percpu().stats().nr_alloc, 0);
    k.validate().unwrap();
}

#[test]
fn chunks_are_created_on_demand_and_released() {
    let m = machine(2);
    let k = m.kmem();
    let boot_percpu_kb = meminfo_kb(&m, "Percpu");
    // Fill the first chunk with page-sized areas.
    let mut live = Vec::new();
    while k.percpu().stats().nr_chunks == 1 {
        live.push(k.__alloc_percpu(PAGE_SIZE, PAGE_SIZE).unwrap());
    }
    // The last one opened a second chunk (a vmalloc area of a unit per CPU).
    assert_eq!(live.len(), PCPU_UNIT_SIZE / PAGE_SIZE + 1);
    assert_eq!(meminfo_kb(&m, "Percpu"), 2 * boot_percpu_kb);
    let info = m.proc_vmallocinfo();
    assert!(info.contains("pcpu_create_chunk"), "{info}");
    // Fill the second one too; a third chunk appears.
    while k.percpu().stats().nr_chunks == 2 {
        live.push(k.__alloc_percpu(PAGE_SIZE, PAGE_SIZE).unwrap());
    }
    // An atomic allocation is served from existing chunks only: with every chunk full but the
    // newest, fill that one and the atomic request fails without creating a chunk.
    while k.percpu().largest_free() >= PAGE_SIZE {
        live.push(k.__alloc_percpu(PAGE_SIZE, PAGE_SIZE).unwrap());
    }
    let chunks = k.percpu().stats().nr_chunks;
    assert!(
        k.__alloc_percpu_gfp(PAGE_SIZE, PAGE_SIZE, GFP_ATOMIC)
            .is_none()
    );
    assert!(
        m.platform()
            .log_contains("atomic alloc failed, no space left")
    );
    assert_eq!(k.percpu().stats().nr_chunks, chunks);
    // GFP_KERNEL may create one.
    live.push(k.__alloc_percpu(PAGE_SIZE, PAGE_SIZE).unwrap());
    assert_eq!(k.percpu().stats().nr_chunks, chunks + 1);
    k.validate().unwrap();
    // Free everything: all dynamic chunks but one spare are released.
    for p in live {
        // SAFETY: each is live and freed once.
        unsafe { k.free_percpu(p) };
    }
    let s = k.percpu().stats();
    assert_eq!((s.nr_alloc, s.alloc_bytes), (0, 0));
    assert_eq!(s.nr_chunks, 2, "the first chunk and one empty spare");
    assert_eq!(meminfo_kb(&m, "Percpu"), 2 * boot_percpu_kb);
    assert_eq!(m.proc_vmallocinfo().matches("pcpu_create_chunk").count(), 1);
    k.validate().unwrap();
}

/// `pcpu_alloc_test`: thousands of live allocations of random size and alignment, every
/// copy written with a pattern, freed in random order; accounting back to zero.
#[test]
fn random_sizes_and_alignments_like_pcpu_alloc_test() {
    let _w = Watchdog::new("pcpu_alloc_test", Duration::from_secs(120));
    let m = machine(2);
    let k = m.kmem();
    let mut rng = Rng::new(0x5eed_1234_abcd_0001);
    let mut live: Vec<(PercpuPtr<u8>, usize, usize)> = Vec::new();
    let mut tag = 0;
    for round in 0..12_000 {
        if live.is_empty() || rng.below(5) < 3 || round < 3000 {
            // Mostly small, as real per-CPU data is; now and then up to 4 KiB.
            let size = if rng.below(16) == 0 {
                1 + rng.below(4096)
            } else {
                1 + rng.below(256)
            };
            let align = 1 << rng.below(13); // 1 .. 4096
            let p = k.__alloc_percpu(size, align).expect("alloc");
            assert_eq!(p.addr() % align, 0, "size {size} align {align}");
            assert!(k.percpu().alloc_size(p.addr() as *const u8).unwrap() >= size);
            tag += 1;
            for cpu in 0..2 {
                let c = p.per_cpu_ptr(cpu).as_ptr();
                // SAFETY: a live allocation of `size` bytes in every unit, ours alone.
                let fresh = unsafe { std::slice::from_raw_parts(c, size) };
                assert!(fresh.iter().all(|&b| b == 0));
                write_pat(c, size, tag * 2 + cpu);
            }
            live.push((p, size, tag));
        } else {
            let (p, size, t) = live.swap_remove(rng.below(live.len()));
            for cpu in 0..2 {
                check_pat(p.per_cpu_ptr(cpu).as_ptr(), size, t * 2 + cpu);
            }
            // SAFETY: live, freed once.
            unsafe { k.free_percpu(p) };
        }
    }
    assert!(live.len() > 2000, "{} live", live.len());
    assert!(k.percpu().stats().nr_chunks > 2);
    k.validate().unwrap();
    for (p, size, t) in live.drain(..) {
        for cpu in 0..2 {
            check_pat(p.per_cpu_ptr(cpu).as_ptr(), size, t * 2 + cpu);
        }
        // SAFETY: live, freed once.
        unsafe { k.free_percpu(p) };
    }
    let s = k.percpu().stats();
    assert_eq!((s.nr_alloc, s.alloc_bytes), (0, 0));
    assert!(s.nr_chunks <= 2);
    assert_eq!(k.percpu().free_bytes(), s.nr_chunks * PCPU_UNIT_SIZE);
    assert_eq!(k.percpu().bad_frees(), 0);
    k.validate().unwrap();
}

#[test]
fn concurrent_allocations_and_cross_thread_frees() {
    let _w = Watchdog::new("percpu concurrent", Duration::from_secs(120));
    let m = machine(4);
    let k = m.kmem();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, usize, usize)>();
    std::thread::scope(|s| {
        for t in 0..3usize {
            let tx = tx.clone();
            let m = &m;
            s.spawn(move || {
                let mut rng = Rng::new(0x1234_5678 + t as u64);
                for i in 0..3000usize {
                    let size = 4 + rng.below(500);
                    let p = m.kmem().__alloc_percpu(size, 8).expect("alloc");
                    let tag = t * 1_000_000 + i;
                    for cpu in 0..4 {
                        write_pat(p.per_cpu_ptr(cpu).as_ptr(), size, tag + cpu);
                    }
                    tx.send((p.addr(), size, tag)).unwrap();
                }
            });
        }
        drop(tx);
        let k = m.kmem();
        for (addr, size, tag) in rx {
            let p = PercpuPtr::<u8>::from_raw(std::ptr::NonNull::new(addr as *mut u8).unwrap());
            for cpu in 0..4 {
                check_pat(p.per_cpu_ptr(cpu).as_ptr(), size, tag + cpu);
            }
            // SAFETY: live, sent once, freed once.
            unsafe { k.free_percpu(p) };
        }
    });
    let s = k.percpu().stats();
    assert_eq!((s.nr_alloc, s.alloc_bytes, s.nr_alloc_total), (0, 0, 9000));
    assert_eq!(k.percpu().bad_frees(), 0);
    k.validate().unwrap();
}

#[test]
fn percpu_counter_read_sum_compare_set() {
    let m = machine(4);
    let c = PercpuCounter::new(m.kmem(), 10, GFP_KERNEL).unwrap();
    assert_eq!(c.batch(), 32, "max(32, 2 * nr_cpus)");
    assert_eq!((c.read(), c.sum()), (10, 10));
    // Below the batch the delta stays on this CPU: read() does not see it, sum() does.
    c.add(5);
    assert_eq!((c.read(), c.sum()), (10, 15));
    assert_eq!(c.compare(15), 0);
    assert_eq!(c.compare(14), 1);
    assert_eq!(c.compare(16), -1);
    // Far from rhs, compare decides from read() alone.
    assert_eq!(c.compare(100_000), -1);
    // Reaching the batch folds this CPU's delta into the global count.
    c.add(27);
    assert_eq!((c.read(), c.sum()), (42, 42));
    c.sub(100);
    assert_eq!(c.sum(), -58);
    assert_eq!(c.read_positive(), 0);
    assert_eq!(c.sum_positive(), 0);
    c.set(1000);
    assert_eq!((c.read(), c.sum()), (1000, 1000));
    c.inc();
    c.dec();
    c.dec();
    assert_eq!(c.sum(), 999);
    let allocs = m.kmem().percpu().stats().nr_alloc;
    drop(c);
    assert_eq!(
        m.kmem().percpu().stats().nr_alloc,
        allocs - 1,
        "destroy frees the deltas"
    );
}

#[test]
fn get_cpu_ptr_pins_and_the_box_frees_on_drop() {
    let m = machine(2);
    let k = m.kmem();
    let before = k.percpu().stats().nr_alloc;
    {
        let b: PerCpuBox<'_, _, [u8; 100]> = PerCpuBox::new(k, GFP_KERNEL).unwrap();
        {
            let c = b.get_cpu_ptr();
            assert!(m.platform().in_atomic());
            // SAFETY: this CPU's copy of a live allocation; pinned, so nobody else writes it.
            unsafe { (*c.as_ptr().as_ptr())[0] = 9 };
        }
        assert!(!m.platform().in_atomic());
        let sum: u32 = (0..2)
            // SAFETY: live copies, no concurrent writer.
            .map(|cpu| unsafe { (*b.as_ptr().per_cpu_ptr(cpu).as_ptr())[0] } as u32)
            .sum();
        assert_eq!(sum, 9);
        assert_eq!(k.percpu().stats().nr_alloc, before + 1);
    }
    assert_eq!(k.percpu().stats().nr_alloc, before);
}

#[test]
fn get_cpu_ptr_on_a_raw_pointer_gives_the_pinned_cpus_copy() {
    let m = machine(4);
    let k = m.kmem();
    let p: PercpuPtr<u64> = k.alloc_percpu().unwrap();
    {
        let c = k.get_cpu_ptr(p);
        assert!(m.platform().in_atomic(), "get_cpu_ptr disables preemption");
        assert_eq!(c.as_ptr(), p.per_cpu_ptr(c.cpu()));
        // SAFETY: this CPU's copy of a live allocation; pinned, nobody else writes it.
        unsafe { *c.as_ptr().as_ptr() = 77 };
    }
    assert!(!m.platform().in_atomic(), "put_cpu_ptr enables it again");
    // SAFETY: live copies, no concurrent writer.
    let total: u64 = (0..4)
        .map(|cpu| unsafe { *p.per_cpu_ptr(cpu).as_ptr() })
        .sum();
    assert_eq!(total, 77);
    // SAFETY: freed once.
    unsafe { k.free_percpu(p) };
}

#[test]
fn a_machine_without_room_for_the_first_chunk_does_not_boot() {
    // 1024 CPUs need a 64 MiB first chunk; the machine has 16 MiB.
    let err = Machine::boot(MachineConfig::x86_64(16 * MIB).with_cpus(1024))
        .err()
        .expect("no room for the per-CPU areas");
    let msg = err.to_string();
    assert!(msg.contains("failed to initialize percpu areas"), "{msg}");
    assert!(msg.contains("65544 KiB"), "{msg}");
}
