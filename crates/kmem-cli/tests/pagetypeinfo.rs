//! `kmem proc pagetypeinfo`: Linux's layout, buddyinfo's numbers under `Unmovable`, and the
//! pageblock counts Linux prints for the same memory map.

mod common;
use common::kmem_stdout;

const SAMPLE: &str = include_str!("../../../testdata/proc-samples/pagetypeinfo");

/// The numbers after the label of a `Node ...` line.
fn numbers(line: &str, label_end: usize) -> Vec<u64> {
    line[label_end..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("number in {line:?}")))
        .collect()
}

#[test]
fn layout_matches_linux() {
    let ours = kmem_stdout(&["proc", "pagetypeinfo"]);
    let theirs: Vec<&str> = SAMPLE.lines().collect();
    let ours: Vec<&str> = ours.lines().collect();
    // The default machine has the sample's three zones: the same lines, the same columns.
    assert_eq!(ours.len(), theirs.len(), "{ours:#?}");
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a.len(), b.len(), "column widths: {a:?} vs {b:?}");
        let label = |l: &str| l.split_whitespace().take(6).collect::<Vec<_>>().join(" ");
        if b.starts_with("Node    0") {
            assert_eq!(label(a), label(b));
        } else if !b.starts_with("Node 0") {
            assert_eq!(a, b, "header lines are Linux's");
        }
    }
}

#[test]
fn free_blocks_are_buddyinfo_under_unmovable() {
    // Both files from one run: the demo's workload runs threads on several vCPUs, so two runs
    // need not leave the same free blocks.
    let both = kmem_stdout(&["--mem", "64M", "proc", "buddyinfo", "pagetypeinfo"]);
    let (buddy, info) = both
        .split_once("Page block order")
        .expect("buddyinfo, then pagetypeinfo");
    let mut zones = 0;
    for b in buddy.lines() {
        let zone = b.split_whitespace().nth(3).expect("zone name");
        let free = numbers(b, 22);
        let rows: Vec<&str> = info
            .lines()
            .filter(|l| {
                l.starts_with("Node    0")
                    && l.split_whitespace().nth(3) == Some(&format!("{zone},"))
            })
            .collect();
        assert_eq!(rows.len(), 5, "five migrate types for {zone}");
        for r in rows {
            let counts = numbers(r, 43);
            if r.contains("type    Unmovable") {
                assert_eq!(counts, free, "{zone}: Unmovable is buddyinfo");
            } else {
                assert!(counts.iter().all(|&c| c == 0), "{r}");
            }
        }
        zones += 1;
    }
    assert_eq!(zones, 2, "DMA and DMA32 on a 64 MiB machine");
}

#[test]
fn pageblocks_are_counted_as_linux_counts_them() {
    let blocks = |args: &[&str]| -> Vec<(String, Vec<u64>)> {
        kmem_stdout(args)
            .lines()
            .filter(|l| l.starts_with("Node 0, zone"))
            .map(|l| {
                let zone = l.split_whitespace().nth(3).unwrap().to_string();
                (zone, numbers(l, 22))
            })
            .collect()
    };
    // The default PC: RAM 4 KiB-640 KiB, 1 MiB-3 GiB and 4-5 GiB. Linux counts 8 blocks in
    // DMA, (3 GiB - 16 MiB) / 2 MiB in DMA32 (the PCI hole's sections are not online) and
    // 1 GiB / 2 MiB in Normal, all of them here under Unmovable.
    assert_eq!(
        blocks(&["proc", "pagetypeinfo"]),
        vec![
            ("DMA".into(), vec![8, 0, 0, 0, 0]),
            ("DMA32".into(), vec![1528, 0, 0, 0, 0]),
            ("Normal".into(), vec![512, 0, 0, 0, 0]),
        ]
    );
    assert_eq!(
        blocks(&["--mem", "64M", "proc", "pagetypeinfo"]),
        vec![
            ("DMA".into(), vec![8, 0, 0, 0, 0]),
            ("DMA32".into(), vec![24, 0, 0, 0, 0]),
        ]
    );
}
