//! Unit tests of the harness, the sources and the cases (a tiny run of every case).

use super::*;
use crate::workload::{CHURN_ORDERS, XorShift64};

/// A run small enough for a debug-build unit test.
fn tiny() -> Options {
    Options {
        rounds: 3,
        warmup_time: Duration::from_micros(200),
        sample_time: Duration::from_micros(100),
        working_set: 64,
        churn_warmup_steps: 100,
        churn_steps: 200,
        kmalloc_working_set: 64,
        cross_batch: 8,
        cross_ring: 2,
        cross_warmup_batches: 10,
        cross_batches: 20,
        vmalloc_warmup_bytes: 256 << 10,
        vmalloc_sample_bytes: 1 << 20,
        machine_ram: 32 << 20,
        ..Options::default()
    }
}

#[test]
fn median_of_odd_even_and_empty() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    assert_eq!(median(&[7.0]), 7.0);
    assert!(median(&[]).is_nan());
    // An outlier moves the mean, not the median.
    assert_eq!(median(&[10.0, 11.0, 1000.0, 9.0, 10.5]), 10.5);
}

#[test]
fn pow2_floor_and_names() {
    assert_eq!(pow2_floor(0), 0);
    assert_eq!(pow2_floor(1), 1);
    assert_eq!(pow2_floor(65023), 32768);
    assert_eq!(pow2_floor(65536), 65536);
    for a in Allocator::ALL {
        assert_eq!(Allocator::from_name(a.name()), Some(a));
    }
    for c in Case::ALL {
        assert_eq!(Case::from_name(c.name()), Some(c));
        assert_eq!(Case::group(c.name()), Some(vec![c]));
        assert_eq!(c.is_slab(), Case::SLAB.contains(&c));
        assert_eq!(c.is_page(), Case::PAGE.contains(&c));
        assert_eq!(c.is_vmalloc(), Case::VMALLOC.contains(&c));
        assert_eq!(c.is_percpu(), Case::PERCPU.contains(&c));
        assert_eq!(
            [c.is_page(), c.is_slab(), c.is_vmalloc(), c.is_percpu()]
                .iter()
                .filter(|&&x| x)
                .count(),
            1
        );
        assert_eq!(c.allocators()[0], Allocator::Kmem);
    }
    assert_eq!(Case::group("slab"), Some(Case::SLAB.to_vec()));
    assert_eq!(Case::group("page"), Some(Case::PAGE.to_vec()));
    assert_eq!(Case::group("all"), Some(Case::ALL.to_vec()));
    assert_eq!(
        Case::group("vmalloc"),
        Some(vec![Case::Vmalloc64k, Case::Vmalloc1m])
    );
    assert_eq!(Case::Vmalloc64k.vmalloc_size(), Some(64 << 10));
    assert_eq!(Case::Vmalloc1m.vmalloc_size(), Some(1 << 20));
    assert_eq!(Case::CrossFree.vmalloc_size(), None);
    assert!(Case::Vmalloc1m.runs(Allocator::MmapTouch));
    assert!(!Case::Vmalloc1m.runs(Allocator::Jemalloc));
    assert!(!Case::Order0Pair.runs(Allocator::Mmap));
    assert_eq!(
        Allocator::from_name("kmem+touch"),
        Some(Allocator::KmemTouch)
    );
    assert_eq!(Case::KmallocPair1024.kmalloc_pair_size(), Some(1024));
    assert!(Case::CachePair256.runs(Allocator::Slabmalloc));
    assert!(!Case::KmallocPair64.runs(Allocator::Slabmalloc));
    assert!(!Case::CrossFree.runs(Allocator::Buddy));
    assert_eq!(Allocator::from_name("buddy"), Some(Allocator::Buddy));
    assert_eq!(Allocator::from_name("tcmalloc"), None);
}

#[test]
fn xorshift_is_deterministic_and_orders_mostly_zero() {
    let mut a = XorShift64::new(42);
    let mut b = XorShift64::new(42);
    let mut per_order = [0usize; 4];
    for _ in 0..16_000 {
        let x = a.next();
        assert_eq!(x, b.next());
        per_order[CHURN_ORDERS[(x >> 60) as usize] as usize] += 1;
    }
    assert!(per_order[0] > 10_000 && per_order.iter().all(|&n| n > 0));
    assert_ne!(XorShift64::new(0).next(), 0);
}

#[test]
fn churn_keeps_its_working_set_and_frees_it() {
    let mut churn = Churn::new(source::system(), 100, 7);
    churn.run(1000);
    assert_eq!(churn.live_per_order().iter().sum::<usize>(), 100);
    let machine = Machine::boot(MachineConfig::x86_64(32 << 20).with_cpus(2)).unwrap();
    machine.drain_all_pages();
    let free = machine.nr_free_pages();
    {
        let mut churn = Churn::new(KmemSource::new(machine.pages()), 100, 7);
        churn.run(1000);
    }
    check_machine(&machine, free).unwrap();
    assert!(machine.nr_free_pages() == free);
}

#[test]
fn tiny_run_completes_with_finite_positive_numbers() {
    let opts = tiny();
    let mut samples = 0;
    let report = run_with_progress(&opts, |p| {
        if let Progress::Sample { ns_per_op, .. } = p {
            assert!(ns_per_op.is_finite() && *ns_per_op > 0.0);
            samples += 1;
        }
    })
    .unwrap();
    let runs: usize = Case::ALL.iter().map(|c| c.allocators().len()).sum();
    assert_eq!(samples, runs * opts.rounds);
    assert_eq!(report.cases.len(), Case::ALL.len());
    for c in &report.cases {
        assert_eq!(c.results.len(), c.case.allocators().len());
        for m in &c.results {
            assert_eq!(m.samples_ns.len(), opts.rounds);
            for x in [m.median_ns, m.min_ns, m.max_ns] {
                assert!(x.is_finite() && x > 0.0, "{} {}: {x}", c.case, m.allocator);
            }
            assert!(m.min_ns <= m.median_ns && m.median_ns <= m.max_ns);
            let r = c.ratio(m.allocator).unwrap();
            assert!(r.is_finite() && r > 0.0);
        }
        assert_eq!(c.ratio(Allocator::Kmem), Some(1.0));
    }
    for case in [Case::Churn, Case::KmallocChurn] {
        let churn = report.case(case).unwrap();
        assert!(churn.results.iter().all(|m| m.ops_per_round == 200));
    }
    for (case, pairs) in [(Case::Vmalloc64k, 16), (Case::Vmalloc1m, 1)] {
        let c = report.case(case).unwrap();
        assert!(c.results.iter().all(|m| m.ops_per_round == pairs));
        assert_eq!(c.like_for_like().len(), 2);
    }
    let cross = report.case(Case::CrossFree).unwrap();
    assert!(cross.results.iter().all(|m| m.ops_per_round == 2 * 20 * 8));
    assert!(report.targets.iter().all(|t| t.ratio.is_some()));
    assert_eq!(report.targets.len(), Target::all().len());
    let slab_targets = report.targets.iter().filter(|t| t.case.is_slab());
    assert!(slab_targets.clone().count() == Case::SLAB.len());
    assert!(
        slab_targets
            .clone()
            .all(|t| matches!(t.best, Some(Allocator::Mimalloc | Allocator::Jemalloc)))
    );
    let csv = report.to_csv();
    assert_eq!(csv.lines().count(), 1 + runs);
    assert!(csv.starts_with("case,allocator,median_ns,"));
    let table = report.to_string();
    assert!(table.contains("order0-pair") && table.contains("jemalloc"));
    assert!(table.contains("cross-free") && table.contains("slabmalloc"));
    assert!(table.contains("vmalloc-1m") && table.contains("mmap+touch / kmem+touch = "));
    assert_eq!(table.matches("target: ").count(), Target::all().len());
}

#[test]
fn ratios_need_kmem_and_bad_options_are_refused() {
    let opts = Options {
        cases: vec![Case::Order0Pair],
        allocators: vec![Allocator::Jemalloc],
        ..tiny()
    };
    let report = run(&opts).unwrap();
    assert_eq!(report.cases[0].ratio(Allocator::Jemalloc), None);
    assert!(report.targets.iter().all(|t| t.met().is_none()));
    assert!(report.targets_met());
    let bad = Options {
        rounds: 0,
        ..tiny()
    };
    assert!(matches!(run(&bad), Err(BenchError::Options(_))));
    let bad = Options {
        cross_batch: 0,
        ..tiny()
    };
    assert!(matches!(run(&bad), Err(BenchError::Options(_))));
}

#[test]
fn slab_cases_alone_report_only_their_targets() {
    let opts = Options {
        cases: vec![Case::KmallocPair64, Case::CachePair256],
        allocators: vec![Allocator::Kmem, Allocator::Slabmalloc, Allocator::Mimalloc],
        ..tiny()
    };
    let report = run(&opts).unwrap();
    let pair = report.case(Case::KmallocPair64).unwrap();
    let names: Vec<_> = pair.results.iter().map(|m| m.allocator).collect();
    assert_eq!(names, [Allocator::Kmem, Allocator::Mimalloc]);
    let cache = report.case(Case::CachePair256).unwrap();
    assert_eq!(cache.results.len(), 3);
    assert_eq!(report.targets.len(), 2);
    assert!(
        report
            .targets
            .iter()
            .all(|t| t.best == Some(Allocator::Mimalloc))
    );
}

#[test]
fn kmalloc_churn_sizes_cover_the_range_and_free_everything() {
    let (mut lo, mut hi) = (usize::MAX, 0);
    let mut rng = XorShift64::new(3);
    for _ in 0..100_000 {
        let s = objwork::churn_size(rng.next());
        lo = lo.min(s);
        hi = hi.max(s);
    }
    assert!((objwork::CHURN_MIN_SIZE..16).contains(&lo), "{lo}");
    assert!(hi <= objwork::CHURN_MAX_SIZE && hi > 8180, "{hi}");
    assert_eq!(objwork::churn_size(0), objwork::CHURN_MIN_SIZE);
    assert_eq!(objwork::churn_size(u64::MAX), objwork::CHURN_MAX_SIZE);

    let machine = Machine::boot(MachineConfig::x86_64(32 << 20).with_cpus(2)).unwrap();
    settle(&machine);
    let free = machine.nr_free_pages();
    {
        let mut churn = ObjChurn::new(KmallocSource::new(machine.kmem()), 200, 9);
        churn.run(2000);
        assert_eq!(churn.len(), 200);
        assert!(churn.live_bytes() > 200 * 8);
    }
    check_machine(&machine, free).unwrap();
    let mut churn = ObjChurn::new(source::system(), 50, 9);
    churn.run(100);
}

#[test]
fn slabmalloc_source_refills_and_reuses_pages() {
    let mut s = SlabmallocSource::new(CACHE_OBJECT_SIZE);
    let objs: Vec<*mut u8> = (0..100).map(|_| s.alloc(CACHE_OBJECT_SIZE)).collect();
    // (4096 - 80) / 256 = 15 objects a page.
    assert_eq!(s.pages(), 100usize.div_ceil(15));
    for &p in &objs {
        assert_eq!(p as usize % 8, 0);
        // SAFETY: each object is 256 bytes, live and ours.
        unsafe { p.write_bytes(0xa5, CACHE_OBJECT_SIZE) };
    }
    let mut sorted = objs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), objs.len());
    for &p in &objs {
        // SAFETY: allocated above, freed once.
        unsafe { s.free(p, CACHE_OBJECT_SIZE) };
    }
    let pages = s.pages();
    obj_pair_loop(&mut s, CACHE_OBJECT_SIZE, 1000);
    assert_eq!(s.pages(), pages);
}

#[test]
fn cross_free_runs_on_kmem_and_leaves_nothing_behind() {
    let machine = Machine::boot(MachineConfig::x86_64(32 << 20).with_cpus(2)).unwrap();
    settle(&machine);
    let free = machine.nr_free_pages();
    let kmem = machine.kmem();
    std::thread::scope(|scope| {
        let params = crossfree::CrossFreeParams {
            size: CROSS_FREE_SIZE,
            batch: 40,
            ring: 3,
            warmup_batches: 5,
            batches: 50,
        };
        let mut s = crossfree::cross_free_sampler(
            scope,
            KmallocSource::new(kmem),
            KmallocSource::new(kmem),
            params,
        );
        assert_eq!(s.warm_up(), 2 * 50 * 40);
        assert!(s.sample() > 0.0);
    });
    check_machine(&machine, free).unwrap();
}

#[test]
fn vm_sources_pair_touch_and_give_everything_back() {
    let machine = Machine::boot(MachineConfig::x86_64(32 << 20).with_cpus(2)).unwrap();
    settle(&machine);
    let free = machine.nr_free_pages();
    let vmalloc = machine.vmalloc_space();
    let size = 64 << 10;
    let mut k = VmallocSource::new(machine.kmem());
    let p = k.alloc(size);
    assert!(machine.is_vmalloc_addr(p));
    assert_eq!(vmalloc.vmalloc_nr_pages(), size / source::PAGE_SIZE);
    // SAFETY: a live 64 KiB area of ours.
    unsafe { vmwork::touch_pages(p, size) };
    // SAFETY: the byte at each page start was written by `touch_pages`.
    assert_eq!(unsafe { p.add(size - source::PAGE_SIZE).read() }, 1);
    // SAFETY: allocated above, freed once.
    unsafe { k.free(p, size) };
    assert_eq!(vmalloc.vmalloc_nr_pages(), 0);
    // 70 MiB of 1 MiB pairs: more than `lazy_max_pages` (64 MiB at 2 CPUs), so one purge.
    let purges = vmalloc.nr_purges();
    vm_pair_loop::<_, true>(&mut k, 1 << 20, 70);
    assert!(vmalloc.nr_purges() > purges);
    vm_pair_loop::<_, false>(&mut k, size, 100);
    check_machine(&machine, free).unwrap();
    assert_eq!(vmalloc.lazy_pages(), 0);
    assert_eq!(vmalloc.bad_frees(), 0);

    let mut m = MmapSource;
    let p = m.alloc(size);
    // SAFETY: a fresh 64 KiB mapping of ours.
    unsafe { vmwork::touch_pages(p, size) };
    // SAFETY: mapped above, unmapped once.
    unsafe { m.free(p, size) };
    vm_pair_loop::<_, true>(&mut m, 1 << 20, 3);
    vm_pair_loop::<_, false>(&mut m, 1 << 20, 3);
}

#[test]
fn small_ratios_keep_two_significant_digits() {
    let r = report::CaseReport {
        case: Case::Vmalloc1m,
        results: [(Allocator::Kmem, 800_000.0), (Allocator::Mmap, 3_000.0)]
            .into_iter()
            .map(|(allocator, ns)| Measurement {
                allocator,
                median_ns: ns,
                min_ns: ns,
                max_ns: ns,
                ops_per_round: 1,
                samples_ns: vec![ns],
            })
            .collect(),
    };
    let like = r.like_for_like();
    assert_eq!(like.len(), 1);
    assert_eq!((like[0].0, like[0].1), (Allocator::Mmap, Allocator::Kmem));
    let report = Report::new(tiny(), Environment::new(&tiny(), 1), vec![r]);
    let table = report.to_string();
    assert!(table.contains("0.0037x"), "{table}");
    assert!(
        table.contains("like for like: mmap / kmem = 0.0037x"),
        "{table}"
    );
    assert!(report.targets.is_empty());
}
