//! Unit tests of the parent module.
use super::*;
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn machine(nr_cpus: usize) -> HostedPlatform {
    HostedPlatform::new(MemorySpec {
        phys_size: 64 * MIB,
        direct_map_size: 64 * MIB,
        kmap_pages: 16,
        vmalloc_size: 16 * MIB,
        nr_cpus,
    })
    .unwrap()
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * PAGE_SIZE as u64
}

fn memfd_bytes(p: &HostedPlatform) -> u64 {
    rustix::fs::fstat(p.memfd()).unwrap().st_blocks as u64 * 512
}

#[test]
fn layout() {
    let p = machine(2);
    assert_eq!(p.direct_map_base() % DIRECT_MAP_ALIGN, 0);
    let (kva, kpages) = p.kmap_window();
    let (vva, vlen) = p.vmalloc_range();
    assert_eq!(kpages, 16);
    assert_eq!(vlen, 16 * MIB as usize);
    assert!(kva.0 >= p.direct_map_base() + 64 * MIB as usize + GUARD_GAP);
    assert!(vva.0 >= kva.0 + kpages * PAGE_SIZE + GUARD_GAP);
    let (rva, rlen) = p.region();
    assert!(vva.0 + vlen + GUARD_GAP <= rva.0 + rlen);
    assert_eq!(p.phys_ptr(0), Some(p.direct_map_base() as *mut u8));
    assert_eq!(p.phys_ptr(64 * MIB), None);
    assert!(HostedPlatform::new(MemorySpec::flat(4095, 1)).is_err());
    assert!(HostedPlatform::new(MemorySpec::flat(MIB, 0)).is_err());
    // x86_32-like: only the low part is direct mapped.
    let p = HostedPlatform::new(MemorySpec {
        direct_map_size: 16 * MIB,
        ..MemorySpec::flat(64 * MIB, 1)
    })
    .unwrap();
    assert_eq!(p.direct_map_size(), 16 * MIB);
    assert!(p.phys_ptr(16 * MIB - 1).is_some());
    assert!(p.phys_ptr(16 * MIB).is_none());
}

#[test]
fn memfd_is_sparse() {
    let rss0 = rss_bytes();
    let p = HostedPlatform::new(MemorySpec::flat(64 * GIB, 4)).unwrap();
    assert_eq!(p.phys_size(), 64 * GIB);
    assert_eq!(memfd_bytes(&p), 0);
    let ptr = p.phys_ptr(40 * GIB + 123).unwrap();
    // SAFETY: 40 GiB + 123 is inside the direct map of a 64 GiB machine.
    unsafe { ptr.write_volatile(0x5a) };
    // SAFETY: as above.
    assert_eq!(unsafe { ptr.read_volatile() }, 0x5a);
    assert!(
        memfd_bytes(&p) <= 2 * MIB,
        "memfd holds {}",
        memfd_bytes(&p)
    );
    // Other tests run alongside, so allow them some growth; 64 GiB would not fit.
    assert!(rss_bytes() < rss0 + 512 * MIB);
}

#[test]
fn kmap_shares_the_direct_map() {
    let p = machine(1);
    let phys = 5 * PAGE_SIZE as u64;
    let dm = p.phys_ptr(phys).unwrap();
    // SAFETY: the page at `phys` is direct mapped and this test owns the machine.
    unsafe { dm.add(8).write_volatile(0xab) };
    let (kva, n) = p.kmap_window();
    let va = VirtAddr(kva.0 + (n - 1) * PAGE_SIZE);
    // SAFETY: `va` is the last page of the kmap window; nothing is mapped there.
    unsafe { p.map_page(va, Pfn(phys >> 12), PageProt::KERNEL) }.unwrap();
    // SAFETY: `va` was just mapped read/write to the same frame.
    unsafe {
        assert_eq!(va.as_ptr().add(8).read_volatile(), 0xab);
        va.as_ptr().add(9).write_volatile(0xcd);
        assert_eq!(dm.add(9).read_volatile(), 0xcd);
    }
    // vmalloc range: two discontiguous frames side by side.
    let (vva, _) = p.vmalloc_range();
    for (i, pfn) in [7u64, 3].into_iter().enumerate() {
        let va = VirtAddr(vva.0 + i * PAGE_SIZE);
        // SAFETY: inside the vmalloc range, nothing there yet.
        unsafe { p.map_page(va, Pfn(pfn), PageProt::KERNEL) }.unwrap();
        // SAFETY: the direct map covers the frame.
        unsafe { p.phys_ptr(pfn << 12).unwrap().write_volatile(pfn as u8) };
    }
    // SAFETY: both pages are mapped.
    unsafe {
        assert_eq!(vva.as_ptr().read_volatile(), 7);
        assert_eq!(vva.as_ptr().add(PAGE_SIZE).read_volatile(), 3);
    }
    // SAFETY: the pages are ours and no longer used.
    unsafe {
        p.unmap_pages(vva, 2);
        p.unmap_pages(va, 1);
    }
}

#[test]
fn map_page_outside_windows_fails() {
    let p = machine(1);
    let (kva, n) = p.kmap_window();
    let (vva, vlen) = p.vmalloc_range();
    let bad = [
        VirtAddr(p.direct_map_base()),
        VirtAddr(kva.0 + 1),
        VirtAddr(kva.0 + n * PAGE_SIZE),
        VirtAddr(kva.0 - PAGE_SIZE),
        VirtAddr(vva.0 + vlen),
        VirtAddr(0x1000),
    ];
    for va in bad {
        // SAFETY: the call is refused before anything is mapped.
        let r = unsafe { p.map_page(va, Pfn(0), PageProt::KERNEL) };
        assert_eq!(r, Err(MapError), "{va:?}");
    }
    // Frame beyond physical memory.
    // SAFETY: refused, as above.
    let r = unsafe { p.map_page(kva, Pfn((64 * MIB) >> 12), PageProt::KERNEL) };
    assert_eq!(r, Err(MapError));
    // SAFETY: refused before anything is unmapped: the direct map stays.
    unsafe { p.unmap_pages(VirtAddr(p.direct_map_base()), 1) };
    assert!(p.log_contains("outside the kmap/vmalloc windows"));
    // SAFETY: the direct map is intact.
    unsafe { p.phys_ptr(0).unwrap().write_volatile(1) };
}

const FAULT_CHILD_ENV: &str = "KMEM_HOSTED_FAULT_CHILD";

/// Run by `unmapped_page_faults` in a child process; does nothing in a normal test run.
#[test]
fn fault_child() {
    if std::env::var_os(FAULT_CHILD_ENV).is_none() {
        return;
    }
    let p = machine(1);
    let (kva, _) = p.kmap_window();
    // SAFETY: the kmap window is ours and empty.
    unsafe { p.map_page(kva, Pfn(1), PageProt::KERNEL) }.unwrap();
    // SAFETY: just mapped read/write.
    unsafe { kva.as_ptr().write_volatile(1) };
    // SAFETY: nothing uses the page any more.
    unsafe { p.unmap_pages(kva, 1) };
    // SAFETY: not sound on purpose: this read must fault, and the process dies of SIGSEGV
    // before any value is produced.
    let v = unsafe { kva.as_ptr().read_volatile() };
    std::process::exit(100 + i32::from(v));
}

#[test]
fn unmapped_page_faults() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "platform::tests::fault_child",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(FAULT_CHILD_ENV, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(11), // SIGSEGV
        "child: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn wait_is_woken() {
    let p = Arc::new(machine(1));
    let word = Arc::new(AtomicU32::new(0));
    let t0 = Instant::now();
    let h = {
        let (p, word) = (p.clone(), word.clone());
        std::thread::spawn(move || {
            while word.load(Ordering::Acquire) == 0 {
                p.wait(&word, 0, 10_000_000_000);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    word.store(1, Ordering::Release);
    p.wake_all(&word);
    h.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn wait_times_out() {
    let p = machine(1);
    let word = AtomicU32::new(0);
    let t0 = p.now_ns();
    p.wait(&word, 0, 100_000_000);
    let dt = p.now_ns() - t0;
    assert!(dt >= 90_000_000, "woke after {dt} ns");
    assert!(dt < 2_000_000_000, "woke after {dt} ns");
    // A changed word returns at once.
    let t0 = Instant::now();
    p.wait(&word, 1, 5_000_000_000);
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[test]
fn log_capture() {
    let p = machine(1);
    p.log(LogLevel::Info, format_args!("hello {}", 5));
    p.log(LogLevel::Err, format_args!("BUG: bad page"));
    assert!(p.log_contains("hello 5"));
    assert!(!p.log_contains("goodbye"));
    assert_eq!(
        p.take_log_entries(),
        [
            (LogLevel::Info, "hello 5".to_string()),
            (LogLevel::Err, "BUG: bad page".to_string())
        ]
    );
    assert!(p.take_log().is_empty());
    for i in 0..LOG_CAPACITY + 5 {
        p.log(LogLevel::Debug, format_args!("line {i}"));
    }
    let log = p.take_log();
    assert_eq!(log.len(), LOG_CAPACITY);
    assert_eq!(log[0], "line 5");
}

#[test]
fn task_random_and_clock() {
    let p = machine(1);
    let (pid, comm) = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("kmem-worker-with-a-long-name".into())
            .spawn_scoped(s, || {
                let t = p.current_task();
                (t.pid, t.comm().to_string())
            })
            .unwrap()
            .join()
            .unwrap()
    });
    assert_eq!(comm, "kmem-worker-wit");
    assert_ne!(pid, rustix::thread::gettid().as_raw_nonzero().get() as u32);
    let a: Vec<u64> = (0..64).map(|_| p.random_u64()).collect();
    assert!(a.windows(2).all(|w| w[0] != w[1]));
    let t0 = p.now_ns();
    assert!(p.now_ns() >= t0);
}
