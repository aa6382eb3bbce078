//! The `/proc` reports have Linux's exact shape: compared line by line with real files from a
//! Linux 6.18 machine (`testdata/proc-samples`), numbers aside.

use kmem::gfp::GFP_KERNEL;
use kmem_hosted::{Machine, MachineConfig};

const GIB: u64 = 1 << 30;

fn sample(name: &str) -> String {
    let path = format!(
        "{}/../../testdata/proc-samples/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A line with every number replaced by `N` and the protection tuple (whose length is the
/// number of configured zones) folded. For left-aligned reports (zoneinfo), whose padding
/// is literal.
fn shape(line: &str) -> String {
    if let Some(i) = line.find("protection: (") {
        return format!("{}protection: (...)", &line[..i]);
    }
    let mut out = String::new();
    for c in line.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The words of a line, numbers as `#`: for right-aligned reports, whose padding depends on
/// the numbers' widths (their columns are checked with [`number_ends`]).
fn words(line: &str) -> Vec<String> {
    line.split_whitespace()
        .map(|w| {
            if w.bytes().all(|b| b.is_ascii_digit()) {
                "#".to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect()
}

/// Byte columns where each number of a right-aligned report ends.
fn number_ends(line: &str) -> Vec<usize> {
    let b = line.as_bytes();
    (0..b.len())
        .filter(|&i| b[i].is_ascii_digit() && (i + 1 == b.len() || !b[i + 1].is_ascii_digit()))
        .collect()
}

/// A 2-CPU x86_64 machine with DMA, DMA32 and Normal populated, like the sample's.
fn machine_like_sample() -> Machine {
    let cfg = MachineConfig {
        ram: vec![(0x1000, 0x9f000), (1 << 20, 2 * GIB), (4 * GIB, GIB / 4)],
        reserved: vec![],
        ..MachineConfig::default()
    }
    .with_cpus(2);
    Machine::boot(cfg).unwrap()
}

#[test]
fn zoneinfo_has_linux_shape() {
    let m = machine_like_sample();
    // Put something on a per-CPU list so counts are not all zero.
    let p = m.alloc_pages(GFP_KERNEL, 0).unwrap();
    // SAFETY: `p` was just allocated at order 0 and is not used again.
    unsafe { m.__free_pages(p, 0) };
    let ours = m.proc_zoneinfo();
    let theirs = sample("zoneinfo");
    // The sample's kernel also has the Movable and Device zones; kmem's x86_64 layout stops at
    // Normal, exactly where the sample's third zone ends.
    let theirs = &theirs[..theirs.find("Node 0, zone  Movable").unwrap()];
    let a: Vec<String> = ours.lines().map(shape).collect();
    let b: Vec<String> = theirs.lines().map(shape).collect();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "zoneinfo line {i} differs");
    }
    assert_eq!(a.len(), b.len(), "zoneinfo line count");
}

#[test]
fn buddyinfo_has_linux_shape() {
    let m = machine_like_sample();
    let ours = m.proc_buddyinfo();
    let theirs = sample("buddyinfo");
    assert_eq!(ours.lines().count(), theirs.lines().count());
    for (x, y) in ours.lines().zip(theirs.lines()) {
        // Fixed-width columns: numbers end in the same columns, and the same text once numbers
        // are folded.
        assert_eq!(x.len(), y.len(), "{x:?} vs {y:?}");
        assert_eq!(number_ends(x), number_ends(y), "{x:?} vs {y:?}");
        assert_eq!(words(x), words(y));
    }
    assert!(ours.ends_with(" \n"), "Linux ends each line with a space");
}

#[test]
fn meminfo_has_linux_shape_and_true_numbers() {
    let m = machine_like_sample();
    let ours = m.proc_meminfo();
    let theirs = sample("meminfo");
    let a: Vec<Vec<String>> = ours.lines().map(words).collect();
    let b: Vec<Vec<String>> = theirs.lines().map(words).collect();
    assert_eq!(a, b);
    for (x, y) in ours.lines().zip(theirs.lines()) {
        // `%8lu kB` after a 16-column label: where the sample's number fits in 8 columns, ours
        // must end in the same column.
        if y.len() <= 27 && x.len() <= 27 {
            assert_eq!(
                number_ends(x).last(),
                number_ends(y).last(),
                "{x:?} vs {y:?}"
            );
        }
    }
    let field = |name: &str| -> u64 {
        let line = ours.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(field("MemTotal:"), m.totalram_pages() as u64 * 4);
    assert_eq!(field("MemFree:"), m.nr_free_pages() as u64 * 4);
    assert!(field("MemAvailable:") < field("MemFree:"));
    let before = field("MemFree:");
    let p = m.alloc_pages(GFP_KERNEL, 4).unwrap();
    let ours2 = m.proc_meminfo();
    let free2: u64 = ours2.lines().nth(1).unwrap()[9..]
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        free2,
        before - 64,
        "an order-4 allocation takes 64 kB from MemFree"
    );
    // SAFETY: `p` was just allocated at order 4 and is not used again.
    unsafe { m.__free_pages(p, 4) };
}

#[test]
fn highmem_machine_reports_high_and_low() {
    let m = Machine::boot(MachineConfig::x86_32(GIB + GIB / 2)).unwrap();
    let text = m.proc_meminfo();
    let get = |name: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .unwrap()
    };
    let high = &m.zones()[kmem::gfp::ZoneType::HighMem.index()];
    assert_eq!(get("HighTotal:"), high.managed_pages as u64 * 4);
    assert_eq!(get("HighFree:"), high.free_pages() as u64 * 4);
    assert_eq!(get("LowTotal:") + get("HighTotal:"), get("MemTotal:"));
    assert_eq!(get("LowFree:") + get("HighFree:"), get("MemFree:"));
    // The HighMem lines sit right after Mlocked, as in Linux.
    let labels: Vec<&str> = text.lines().map(|l| l.split(':').next().unwrap()).collect();
    let i = labels.iter().position(|l| *l == "Mlocked").unwrap();
    assert_eq!(
        labels[i + 1..i + 5],
        ["HighTotal", "HighFree", "LowTotal", "LowFree"]
    );
    assert!(m.proc_zoneinfo().contains("Node 0, zone  HighMem"));
}
