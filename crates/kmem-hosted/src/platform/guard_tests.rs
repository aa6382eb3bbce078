//! Unit tests of the CPU guards (`cpus.rs`), each run with both [`GuardMode`]s.
use super::*;
use kmem::platform::CpuGuard;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const MODES: [GuardMode; 2] = [GuardMode::Biased, GuardMode::Cas];

fn machine_in(nr_cpus: usize, mode: GuardMode) -> HostedPlatform {
    let p = HostedPlatform::with_guard_mode(
        MemorySpec {
            phys_size: 16 * MIB,
            direct_map_size: 16 * MIB,
            kmap_pages: 16,
            vmalloc_size: 16 * MIB,
            nr_cpus,
        },
        mode,
    )
    .unwrap();
    if mode == GuardMode::Cas {
        assert_eq!(p.guard_mode(), GuardMode::Cas);
    }
    p
}

fn biased(p: &HostedPlatform) -> bool {
    p.guard_mode() == GuardMode::Biased
}

/// Per-vCPU counters touched only inside a section on their vCPU, with a gap between the
/// read and the write: two sections on one vCPU at once lose an increment.
struct PerCpu {
    count: Vec<UnsafeCell<u64>>,
    inside: Vec<AtomicBool>,
    overlaps: AtomicUsize,
}

// SAFETY: a cell is only accessed by the thread holding a guard on its vCPU; guards on one
// vCPU exclude each other (which is what the tests check, with `inside` as a witness).
unsafe impl Sync for PerCpu {}

impl PerCpu {
    fn new(n: usize) -> PerCpu {
        PerCpu {
            count: (0..n).map(|_| UnsafeCell::new(0)).collect(),
            inside: (0..n).map(|_| AtomicBool::new(false)).collect(),
            overlaps: AtomicUsize::new(0),
        }
    }

    /// Adds one to `cpu`'s counter; the caller holds a guard on `cpu`.
    fn bump(&self, cpu: usize, slow: bool) {
        let first = !self.inside[cpu].swap(true, Ordering::Relaxed);
        let c = self.count[cpu].get();
        // SAFETY: the caller holds a guard on `cpu`, so no other thread touches the cell.
        let v = unsafe { c.read_volatile() };
        if slow {
            std::thread::yield_now();
        } else {
            for _ in 0..20 {
                core::hint::spin_loop();
            }
        }
        // SAFETY: as above.
        unsafe { c.write_volatile(v + 1) };
        if first {
            self.inside[cpu].store(false, Ordering::Relaxed);
        }
    }

    fn total(&self) -> u64 {
        // SAFETY: called after every thread that bumps was joined.
        self.count.iter().map(|c| unsafe { *c.get() }).sum()
    }
}

#[test]
fn guard_modes() {
    let cas = machine_in(1, GuardMode::Cas);
    assert_eq!(cas.guard_mode(), GuardMode::Cas);
    let b = machine_in(1, GuardMode::Biased);
    let q = rustix::thread::membarrier_query();
    if q.contains_command(rustix::thread::MembarrierCommand::PrivateExpedited) {
        assert_eq!(b.guard_mode(), GuardMode::Biased);
    }
    assert!(format!("{b:?}").contains("guard_mode"));
}

const MODE_CHILD_ENV: &str = "KMEM_HOSTED_MODE_CHILD";

/// Run by `guard_mode_from_env` in a child process; does nothing in a normal test run.
#[test]
fn guard_mode_child() {
    let Some(expect) = std::env::var_os(MODE_CHILD_ENV) else {
        return;
    };
    let r = HostedPlatform::new(MemorySpec::flat(4 * MIB, 2));
    match expect.to_str().unwrap() {
        "cas" => {
            let p = r.unwrap();
            assert_eq!(p.guard_mode(), GuardMode::Cas);
            let g = p.cpu_guard();
            assert_eq!(p.guard_stats(), GuardStats::default());
            drop(g);
        }
        "error" => assert!(r.is_err()),
        e => panic!("unknown expectation {e}"),
    }
}

#[test]
fn guard_mode_from_env() {
    for (value, expect) in [("cas", "cas"), ("bogus", "error")] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "platform::guard_tests::guard_mode_child",
                "--test-threads=1",
            ])
            .env(GUARD_MODE_ENV, value)
            .env(MODE_CHILD_ENV, expect)
            .output()
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "child ({value}): {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn nest_and_set_in_atomic(mode: GuardMode) {
    let p = machine_in(2, mode);
    assert!(!p.in_atomic());
    {
        let g = p.cpu_guard();
        assert!(!g.nested());
        assert!(g.cpu() < 2);
        assert!(p.in_atomic());
        {
            let h = p.cpu_guard();
            assert!(h.nested());
            assert_eq!(h.cpu(), g.cpu());
        }
        assert!(p.in_atomic());
    }
    assert!(!p.in_atomic());
    let g = p.cpu_guard();
    assert!(!g.nested());
    drop(g);
    // Out-of-order drop.
    let g = p.cpu_guard();
    let h = p.cpu_guard();
    let cpu = g.cpu();
    drop(g);
    assert!(p.in_atomic());
    let i = p.cpu_guard();
    assert!(i.nested());
    assert_eq!(i.cpu(), cpu);
    drop(h);
    drop(i);
    assert!(!p.in_atomic());
    // The vCPU is free, or at least takeable: another thread can lock it at once.
    std::thread::scope(|s| {
        s.spawn(|| drop(p.lock_cpu(cpu)));
    });
    // And this thread gets a section again afterwards.
    let g = p.cpu_guard();
    assert!(!g.nested());
}

#[test]
fn guards_nest_and_set_in_atomic() {
    MODES.into_iter().for_each(nest_and_set_in_atomic);
}

fn lock_cpu_nests_and_takes(mode: GuardMode) {
    let p = machine_in(2, mode);
    let g = p.cpu_guard();
    let me = g.cpu();
    let other = 1 - me;
    let same = p.lock_cpu(me);
    assert!(same.nested());
    assert_eq!(same.cpu(), me);
    let o = p.lock_cpu(other);
    assert!(o.nested());
    assert_eq!(o.cpu(), other);
    let n = p.cpu_guard();
    assert_eq!(n.cpu(), me, "nesting stays on the outer CPU");
    let o2 = p.lock_cpu(other);
    assert!(o2.nested());
    drop((g, same, n, o2));
    assert!(p.in_atomic());
    // Only `other` is still held: a nested cpu_guard runs on it.
    let n = p.cpu_guard();
    assert_eq!(n.cpu(), other);
    drop(n);
    drop(o);
    assert!(!p.in_atomic());
    std::thread::scope(|s| {
        s.spawn(|| {
            let a = p.lock_cpu(0);
            assert!(!a.nested());
            drop(a);
            drop(p.lock_cpu(1));
        });
    });
    // lock_cpu alone: a following cpu_guard nests on that CPU.
    let l = p.lock_cpu(other);
    assert!(!l.nested());
    let n = p.cpu_guard();
    assert!(n.nested());
    assert_eq!(n.cpu(), other);
    // A section on this thread's own vCPU inside: later nested guards stay on `other`.
    let m = p.lock_cpu(me);
    assert!(m.nested());
    let n2 = p.cpu_guard();
    assert_eq!(n2.cpu(), other);
}

#[test]
fn lock_cpu_nests_and_takes_other_cpus() {
    MODES.into_iter().for_each(lock_cpu_nests_and_takes);
}

#[test]
fn two_machines_on_one_thread() {
    for mode in MODES {
        let a = machine_in(1, mode);
        let b = machine_in(1, mode);
        for _ in 0..3 {
            let ga = a.cpu_guard();
            assert!(a.in_atomic());
            assert!(!b.in_atomic());
            let gb = b.cpu_guard();
            assert!(!gb.nested(), "a guard of another machine is not nesting");
            assert!(b.in_atomic());
            drop(ga);
            assert!(!a.in_atomic());
            assert!(b.in_atomic());
            let ga = a.cpu_guard();
            assert!(!ga.nested());
            drop(gb);
            drop(ga);
        }
        // More machines than slots, used alternately.
        let many: Vec<_> = (0..NSLOTS + 3).map(|_| machine_in(1, mode)).collect();
        for _ in 0..2 {
            for m in &many {
                let g = m.cpu_guard();
                assert!(!g.nested());
                assert!(m.in_atomic());
                assert!(!a.in_atomic());
            }
        }
        // The evicted slots gave their vCPUs back: another thread steals only those of the
        // machines still in this thread's slots.
        std::thread::scope(|s| {
            s.spawn(|| {
                for m in &many {
                    drop(m.cpu_guard());
                }
            });
        });
        let steals: u64 = many.iter().map(|m| m.guard_stats().steals).sum();
        assert!(steals <= NSLOTS as u64, "{steals} steals");
    }
}

#[test]
fn two_threads_get_distinct_cpus() {
    for mode in MODES {
        let p = machine_in(2, mode);
        let barrier = Barrier::new(2);
        let cpus: Vec<usize> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let g = p.cpu_guard();
                        barrier.wait();
                        let c = g.cpu();
                        barrier.wait();
                        c
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_ne!(cpus[0], cpus[1]);
    }
}

#[test]
fn oversubscribed_threads_all_progress() {
    for mode in MODES {
        let p = machine_in(2, mode);
        let inside: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
        let done = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for i in 0..2000 {
                        let g = p.cpu_guard();
                        assert!(!inside[g.cpu()].swap(true, Ordering::Relaxed));
                        if i % 64 == 0 {
                            std::thread::yield_now();
                        }
                        inside[g.cpu()].store(false, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(done.load(Ordering::Relaxed), 3);
    }
}

#[test]
fn lock_cpu_excludes_the_owner() {
    for mode in MODES {
        let p = machine_in(2, mode);
        let counters = PerCpu::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..3000 {
                    let g = p.cpu_guard();
                    counters.bump(g.cpu(), i % 2 == 0);
                }
            });
            s.spawn(|| {
                for i in 0..3000 {
                    let g = p.lock_cpu(i % 2);
                    counters.bump(g.cpu(), i % 2 == 1);
                }
            });
        });
        assert_eq!(counters.overlaps.load(Ordering::Relaxed), 0);
        assert_eq!(counters.total(), 6000, "{mode:?}");
    }
}

#[test]
fn machines_on_parallel_threads_do_not_interfere() {
    for mode in MODES {
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let p = machine_in(1, mode);
                    for _ in 0..1000 {
                        let g = p.cpu_guard();
                        assert!(!g.nested());
                        assert_eq!(g.cpu(), 0);
                    }
                });
            }
        });
    }
}

/// More threads than vCPUs, mixing `cpu_guard`, nested guards and `lock_cpu`; every section
/// does a non-atomic read-modify-write of its vCPU's counter.
fn contention(mode: GuardMode, nr_cpus: usize, threads: usize, iters: usize) {
    run_contended(mode, nr_cpus, threads, |p, counters, t| {
        let mut n = 0;
        for i in 0..iters {
            let slow = (i + t) % 53 == 0;
            let g = if (i + t) % 9 == 0 {
                p.lock_cpu((i / 9 + t) % nr_cpus)
            } else {
                p.cpu_guard()
            };
            assert!(!g.nested());
            counters.bump(g.cpu(), slow);
            n += 1;
            if i % 5 == 0 {
                let h = p.cpu_guard();
                assert!(h.nested());
                assert_eq!(h.cpu(), g.cpu());
                counters.bump(h.cpu(), false);
                n += 1;
            }
            if t == 0 && i % 31 == 0 {
                // Another vCPU inside this section (as drain_all_pages under a guard).
                // One thread only: two threads doing this can deadlock (A holds c and
                // waits for d, B holds d and waits for c), with any guard scheme.
                let o = p.lock_cpu((g.cpu() + 1) % nr_cpus);
                counters.bump(o.cpu(), false);
                n += 1;
            }
            drop(g);
            assert!(!p.in_atomic());
        }
        n
    });
}

/// Runs `body(platform, counters, t)` on `threads` threads of a machine of `nr_cpus` vCPUs;
/// each returns how many increments it made. Then checks that no increment was lost, that no
/// two sections overlapped, and (biased mode) that every steal and revocation paid its
/// membarrier.
fn run_contended(
    mode: GuardMode,
    nr_cpus: usize,
    threads: usize,
    body: impl Fn(&HostedPlatform, &PerCpu, usize) -> usize + Sync,
) {
    let p = machine_in(nr_cpus, mode);
    let counters = PerCpu::new(nr_cpus);
    let expected = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (p, counters, expected, body) = (&p, &counters, &expected, &body);
            s.spawn(move || {
                let n = body(p, counters, t);
                expected.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    assert_eq!(counters.overlaps.load(Ordering::Relaxed), 0, "{mode:?}");
    assert_eq!(
        counters.total(),
        expected.load(Ordering::Relaxed) as u64,
        "{mode:?}, {nr_cpus} vCPUs: lost increments"
    );
    if biased(&p) {
        let st = p.guard_stats();
        assert!(st.membarriers >= st.steals + st.revokes, "{st:?}");
    }
}

#[test]
fn exclusive_under_contention() {
    for mode in MODES {
        contention(mode, 1, 3, 3000);
        contention(mode, 3, 7, 3000);
    }
}

/// `contention` with the closure fast path (`this_cpu`, the one the sheaves and per-CPU page
/// lists use) mixed with guards, nested guards and `lock_cpu`, more threads than vCPUs (so
/// vCPUs are stolen, and sticky vCPUs change seat after seat).
fn this_cpu_contention(mode: GuardMode, nr_cpus: usize, threads: usize, iters: usize) {
    run_contended(mode, nr_cpus, threads, |p, counters, t| {
        let mut n = 0;
        for i in 0..iters {
            match (i + t) % 11 {
                0 => {
                    let l = p.lock_cpu((i / 11 + t) % nr_cpus);
                    counters.bump(l.cpu(), (i + t) % 5 == 0);
                }
                1 | 2 => {
                    let g = p.cpu_guard();
                    counters.bump(g.cpu(), false);
                    let h = p.cpu_guard();
                    assert!(h.nested());
                    counters.bump(h.cpu(), false);
                    n += 1;
                }
                _ => {
                    // SAFETY: the closure takes no guard, does not ask `in_atomic` and does
                    // not sleep (`bump` without `slow` only spins).
                    unsafe {
                        p.this_cpu(|cpu, nested| {
                            assert!(!nested);
                            counters.bump(cpu, false);
                        })
                    };
                }
            }
            n += 1;
            assert!(!p.in_atomic());
            if i % 97 == 0 {
                std::thread::yield_now();
            }
        }
        n
    });
}

#[test]
fn this_cpu_exclusive_under_contention() {
    for mode in MODES {
        this_cpu_contention(mode, 1, 3, 5000);
        this_cpu_contention(mode, 2, 5, 5000);
        this_cpu_contention(mode, 3, 7, 5000);
    }
}

/// A thread's sticky vCPU is revoked, it moves to another one, that one is revoked too and it
/// moves back: each revocation takes exactly the vCPU the thread owns at the time (the one
/// it lost earlier needs none), and the thread never enters a vCPU someone else holds.
#[test]
fn sticky_vcpu_moves_after_revocations() {
    let p = machine_in(2, GuardMode::Biased);
    if !biased(&p) {
        return;
    }
    let barrier = Barrier::new(2);
    let held = [AtomicBool::new(false), AtomicBool::new(false)];
    let a_first = AtomicUsize::new(usize::MAX);
    let enter = |cpu: usize| assert!(!held[cpu].load(Ordering::SeqCst), "entered held {cpu}");
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            let first = p.cpu_guard().cpu();
            a_first.store(first, Ordering::SeqCst);
            barrier.wait(); // idle, owning `first`
            barrier.wait(); // main holds `first`
            let g = p.cpu_guard();
            let second = g.cpu();
            assert_ne!(second, first);
            enter(second);
            drop(g);
            for _ in 0..100 {
                // SAFETY: the closure takes no guard, asks nothing and does not sleep.
                let c = unsafe { p.this_cpu(|cpu, _| cpu) };
                assert_eq!(c, second);
            }
            barrier.wait(); // idle, owning `second`; main dropped `first`
            barrier.wait(); // main holds `second`
            for _ in 0..100 {
                // SAFETY: as above.
                let c = unsafe {
                    p.this_cpu(|cpu, _| {
                        enter(cpu);
                        cpu
                    })
                };
                assert_eq!(c, first, "the free vCPU");
            }
            barrier.wait();
            (first, second)
        });
        barrier.wait();
        // (This thread takes no guard of its own: it owns no vCPU, so A never steals.)
        let first = a_first.load(Ordering::SeqCst);
        let l = p.lock_cpu(first);
        held[first].store(true, Ordering::SeqCst);
        barrier.wait();
        barrier.wait();
        held[first].store(false, Ordering::SeqCst);
        drop(l);
        assert_eq!(p.guard_stats().revokes, 1);
        // A gave `first` up when it moved: taking it needs no revocation now.
        drop(p.lock_cpu(first));
        assert_eq!(p.guard_stats().revokes, 1);
        let second = 1 - first;
        let l = p.lock_cpu(second);
        held[second].store(true, Ordering::SeqCst);
        assert_eq!(p.guard_stats().revokes, 2);
        barrier.wait();
        barrier.wait();
        held[second].store(false, Ordering::SeqCst);
        drop(l);
        assert_eq!(a.join().unwrap(), (first, second));
    });
    let st = p.guard_stats();
    assert_eq!(st.steals, 0, "{st:?}");
    assert_eq!(st.membarriers, 2, "{st:?}");
}

/// `lock_cpu` of a vCPU whose owner thread is alive and idle: prompt, and excludes the owner
/// when it comes back.
fn lock_idle_owner(mode: GuardMode) {
    let p = machine_in(1, mode);
    let barrier = Barrier::new(2);
    let main_holds = AtomicBool::new(false);
    std::thread::scope(|s| {
        let owner = s.spawn(|| {
            drop(p.cpu_guard());
            barrier.wait(); // idle, still owning vCPU 0 (biased)
            barrier.wait(); // main holds vCPU 0
            let t0 = Instant::now();
            let g = p.cpu_guard();
            let waited = t0.elapsed();
            assert_eq!(g.cpu(), 0);
            assert!(
                !main_holds.load(Ordering::SeqCst),
                "owner entered a held vCPU"
            );
            waited
        });
        barrier.wait();
        let t0 = Instant::now();
        let l = p.lock_cpu(0);
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "lock_cpu waited for an idle owner"
        );
        assert!(!l.nested());
        main_holds.store(true, Ordering::SeqCst);
        barrier.wait();
        std::thread::sleep(Duration::from_millis(100));
        main_holds.store(false, Ordering::SeqCst);
        drop(l);
        let waited = owner.join().unwrap();
        assert!(
            waited >= Duration::from_millis(50),
            "owner waited {waited:?}"
        );
    });
    let st = p.guard_stats();
    if biased(&p) {
        assert_eq!(st.revokes, 1, "{st:?}");
        assert!(st.membarriers >= 1, "{st:?}");
    } else {
        assert_eq!(st, GuardStats::default());
    }
}

#[test]
fn lock_cpu_of_an_idle_owner() {
    MODES.into_iter().for_each(lock_idle_owner);
}

/// `lock_cpu` of another thread's idle vCPU while holding a guard of one's own.
fn lock_while_holding(mode: GuardMode) {
    let p = machine_in(2, mode);
    let barrier = Barrier::new(2);
    let main_holds = AtomicBool::new(false);
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            let c = p.cpu_guard().cpu();
            barrier.wait(); // idle
            barrier.wait(); // main holds both vCPUs
            let g = p.cpu_guard();
            assert!(!main_holds.load(Ordering::SeqCst), "entered a held vCPU");
            (c, g.cpu())
        });
        barrier.wait();
        let g = p.cpu_guard();
        let mine = g.cpu();
        let theirs = 1 - mine;
        let l = p.lock_cpu(theirs);
        assert!(l.nested());
        assert_eq!(l.cpu(), theirs);
        main_holds.store(true, Ordering::SeqCst);
        barrier.wait();
        std::thread::sleep(Duration::from_millis(50));
        main_holds.store(false, Ordering::SeqCst);
        drop(l);
        drop(g);
        let (c, _) = other.join().unwrap();
        assert_eq!(c, theirs);
    });
}

#[test]
fn lock_cpu_while_holding_a_guard() {
    MODES.into_iter().for_each(lock_while_holding);
}

#[test]
fn own_vcpu_needs_no_membarrier() {
    let p = machine_in(2, GuardMode::Biased);
    let c = p.cpu_guard().cpu();
    for _ in 0..100 {
        let l = p.lock_cpu(c);
        assert!(!l.nested());
        let g = p.cpu_guard();
        assert_eq!(g.cpu(), c);
        drop(l);
        drop(g);
        assert_eq!(p.cpu_guard().cpu(), c, "the vCPU stays this thread's");
    }
    assert_eq!(p.guard_stats(), GuardStats::default());
}

#[test]
fn thread_exit_releases_vcpus() {
    for mode in MODES {
        let p = machine_in(1, mode);
        // (Joined explicitly: a scope's end does not wait for thread-local destructors.)
        for _ in 0..5 {
            std::thread::scope(|s| {
                s.spawn(|| {
                    let g = p.cpu_guard();
                    assert_eq!(g.cpu(), 0);
                })
                .join()
                .unwrap();
            });
        }
        assert_eq!(p.guard_stats(), GuardStats::default(), "{mode:?}");
        if !biased(&p) {
            continue;
        }
        // A live, idle owner keeps its vCPU: the next thread has to steal it.
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| {
                drop(p.cpu_guard());
                barrier.wait();
                barrier.wait();
                // Lost it: takes it back on the slow path.
                assert_eq!(p.cpu_guard().cpu(), 0);
            });
            barrier.wait();
            s.spawn(|| drop(p.cpu_guard())).join().unwrap();
            barrier.wait();
        });
        let st = p.guard_stats();
        assert_eq!(st.steals, 1, "{st:?}");
        assert_eq!(st.membarriers, 1, "{st:?}");
    }
}

/// Guards created in one order and dropped in every other order, in both modes.
#[test]
fn any_drop_order() {
    for mode in MODES {
        let p = machine_in(3, mode);
        let mut perm = [0usize, 1, 2, 3, 4];
        // Heap's algorithm over the 120 orders.
        let mut c = [0usize; 5];
        let check = |order: &[usize; 5]| {
            let g = p.cpu_guard();
            let me = g.cpu();
            let other = (me + 1) % 3;
            let mut guards: Vec<Option<HostedGuard<'_>>> = vec![
                Some(g),
                Some(p.cpu_guard()),
                Some(p.lock_cpu(other)),
                Some(p.lock_cpu(me)),
                Some(p.lock_cpu(other)),
            ];
            let cpus = [me, me, other, me, other];
            for (k, &i) in order.iter().enumerate() {
                drop(guards[i].take().unwrap());
                let alive: Vec<usize> = (0..5).filter(|&j| guards[j].is_some()).collect();
                assert_eq!(p.in_atomic(), !alive.is_empty());
                if k == 2 {
                    let n = p.cpu_guard();
                    assert!(n.nested());
                    assert!(
                        alive.iter().any(|&j| cpus[j] == n.cpu()),
                        "nested on {} with {alive:?} alive",
                        n.cpu()
                    );
                }
            }
            assert!(!p.in_atomic());
            // Every vCPU can be taken by another thread, and by this one.
            std::thread::scope(|s| {
                s.spawn(|| {
                    for c in 0..3 {
                        drop(p.lock_cpu(c));
                    }
                });
            });
            let g = p.cpu_guard();
            assert!(!g.nested());
        };
        check(&perm);
        let mut i = 0;
        while i < 5 {
            if c[i] < i {
                if i % 2 == 0 {
                    perm.swap(0, i);
                } else {
                    perm.swap(c[i], i);
                }
                check(&perm);
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
    }
}

/// A thread keeps running after a machine it used is dropped, uses other machines, and
/// exits cleanly; the surviving machine's vCPU is free afterwards.
#[test]
fn thread_outlives_a_machine() {
    for mode in MODES {
        let keep = machine_in(1, mode);
        let gone = Mutex::new(Some(machine_in(2, mode)));
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                {
                    let m = gone.lock().unwrap();
                    let g = m.as_ref().unwrap().cpu_guard();
                    assert!(!g.nested());
                }
                barrier.wait();
                barrier.wait(); // `gone` was dropped
                // Fresh machines over and over: slots of dead machines get reused.
                for _ in 0..2 * NSLOTS {
                    let m = machine_in(1, mode);
                    drop(m.cpu_guard());
                    drop(keep.cpu_guard());
                }
                drop(keep.cpu_guard());
            });
            barrier.wait();
            drop(gone.lock().unwrap().take());
            barrier.wait();
            t.join().unwrap();
        });
        // The exited thread gave `keep`'s vCPU back.
        std::thread::scope(|s| {
            s.spawn(|| drop(keep.cpu_guard())).join().unwrap();
        });
        assert_eq!(keep.guard_stats().steals, 0, "{mode:?}");
        // And this thread can use it too, after a machine of its own was dropped.
        let tmp = machine_in(1, mode);
        drop(tmp.cpu_guard());
        drop(tmp);
        let g = keep.cpu_guard();
        assert!(!g.nested());
        assert!(!keep.in_atomic() || g.cpu() == 0);
    }
}
