//! procps reads kmem's `/proc` files: `free` our meminfo, `slabtop` our slabinfo.
//!
//! Each test first checks the file field by field against what procps' parsers read
//! (`library/meminfo.c`: `Key:` then a number read with `strtoul`, the whole file in one
//! 8 KiB read; `library/slabinfo.c`: the `slabinfo - version: 2.1` line, `#` lines skipped,
//! then `sscanf("%128s %u %u %u %u %u : tunables %*u %*u %*u : slabdata %u %u %*u")`), and
//! works out what `free` and `slabtop` must print from that. Then, where `unshare -rm`,
//! `free` and `slabtop` are available (Debian: util-linux, procps), it bind-mounts the files
//! over `/proc/meminfo` and `/proc/slabinfo` in a private user and mount namespace, runs
//! the real tools and compares. Where they are not, it says so on stderr and skips that part.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command as Process;

mod common;
use common::kmem_stdout;

/// Writes `text` to a fresh temporary file named `name`.
fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kmem-procps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `script` with the files bind-mounted over their `/proc` names, in a private user and
/// mount namespace; `None` (after saying why) when that cannot be done here.
fn with_proc_files(files: &[(&PathBuf, &str)], script: &str, test: &str) -> Option<String> {
    for tool in ["unshare", "free", "slabtop"] {
        if Process::new(tool).arg("--version").output().is_err() {
            eprintln!("SKIPPED {test} (comparison with procps): `{tool}` is not installed");
            return None;
        }
    }
    let probe = Process::new("unshare").args(["-rm", "true"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED {test} (comparison with procps): `unshare -rm` is not allowed here: {probe:?}"
        );
        return None;
    }
    let mut sh = String::from("set -e; ");
    for (file, proc_name) in files {
        sh.push_str(&format!(
            "mount --bind '{}' /proc/{proc_name}; ",
            file.display()
        ));
    }
    sh.push_str(script);
    let out = Process::new("unshare")
        .args(["-rm", "sh", "-c", &sh])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && err.contains("mount") {
        eprintln!("SKIPPED {test} (comparison with procps): cannot bind-mount over /proc: {err}");
        return None;
    }
    assert!(out.status.success(), "{sh}: {out:?}");
    Some(String::from_utf8(out.stdout).unwrap())
}

/// meminfo as procps reads it: every line `Key:` then an unsigned number (and ` kB` where
/// the unit is kB); keys appear once; the file fits procps' one 8 KiB read.
fn parse_meminfo(text: &str) -> BTreeMap<String, u64> {
    assert!(
        text.len() < 8192,
        "procps reads /proc/meminfo in one 8 KiB read"
    );
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let (key, rest) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("no ':' in {line:?}"));
        assert!(
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_()".contains(c)),
            "{line:?}"
        );
        let value = rest.trim_start();
        assert!(
            rest.len() > value.len(),
            "whitespace after the colon: {line:?}"
        );
        let digits = value.strip_suffix(" kB").unwrap_or(value);
        assert!(
            digits.chars().all(|c| c.is_ascii_digit()) && !digits.is_empty(),
            "{line:?}"
        );
        let unit_kb = value.ends_with(" kB");
        assert_eq!(
            unit_kb,
            !key.starts_with("HugePages_"),
            "units as Linux: {line:?}"
        );
        assert!(
            map.insert(key.to_string(), digits.parse().unwrap())
                .is_none(),
            "{key} twice"
        );
    }
    map
}

#[test]
fn free_reads_our_meminfo() {
    let text = kmem_stdout(&["--mem", "256M", "proc", "meminfo"]);
    let m = parse_meminfo(&text);
    for key in [
        "MemTotal",
        "MemFree",
        "MemAvailable",
        "Buffers",
        "Cached",
        "SwapCached",
        "Shmem",
        "SReclaimable",
        "SUnreclaim",
        "Slab",
        "SwapTotal",
        "SwapFree",
    ] {
        assert!(m.contains_key(key), "free needs {key}");
    }
    // What procps derives: cached = Cached + SReclaimable; available as read unless above
    // the total; used = total - available.
    let total = m["MemTotal"];
    let available = if m["MemAvailable"] > total {
        m["MemFree"]
    } else {
        m["MemAvailable"]
    };
    let buff_cache = m["Buffers"] + m["Cached"] + m["SReclaimable"];
    assert!(total > 200 * 1024 && m["MemFree"] <= total && available <= total);
    assert_eq!(m["Slab"], m["SReclaimable"] + m["SUnreclaim"]);

    let file = temp_file("meminfo", &text);
    let Some(out) = with_proc_files(&[(&file, "meminfo")], "free -k", "free_reads_our_meminfo")
    else {
        return;
    };
    let mem: Vec<u64> = out
        .lines()
        .find(|l| l.starts_with("Mem:"))
        .unwrap_or_else(|| panic!("a Mem: line in {out}"))
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // total used free shared buff/cache available
    assert_eq!(mem[0], total, "total\n{out}");
    assert_eq!(mem[1], total - available, "used\n{out}");
    assert_eq!(mem[2], m["MemFree"], "free\n{out}");
    assert_eq!(mem[3], m["Shmem"], "shared\n{out}");
    assert_eq!(mem[4], buff_cache, "buff/cache\n{out}");
    assert_eq!(mem[5], available, "available\n{out}");
    let swap = out.lines().find(|l| l.starts_with("Swap:")).unwrap();
    assert_eq!(
        swap.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["0", "0", "0"]
    );
}

/// One cache as procps' slabinfo parser reads it.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    active: u64,
    objs: u64,
    obj_size: u64,
    per_slab: u64,
    pages_per_slab: u64,
    active_slabs: u64,
    slabs: u64,
}

/// slabinfo as procps reads it (see the module docs).
fn parse_slabinfo(text: &str) -> Vec<Node> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("slabinfo - version: 2.1"));
    let mut nodes = Vec::new();
    for line in lines.filter(|l| !l.starts_with('#')) {
        let t: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(t.len(), 16, "{line:?}");
        let u = |i: usize| -> u64 {
            let v: u64 = t[i]
                .parse()
                .unwrap_or_else(|_| panic!("%u at {i}: {line:?}"));
            assert!(v <= u64::from(u32::MAX), "{line:?}");
            v
        };
        assert!(t[0].len() < 128, "%128s: {line:?}");
        assert_eq!(
            (t[6], t[7], t[11], t[12]),
            (":", "tunables", ":", "slabdata"),
            "{line:?}"
        );
        for i in [8, 9, 10, 15] {
            u(i);
        }
        nodes.push(Node {
            name: t[0].to_string(),
            active: u(1),
            objs: u(2),
            obj_size: u(3),
            per_slab: u(4),
            pages_per_slab: u(5),
            active_slabs: u(13),
            slabs: u(14),
        });
    }
    nodes
}

/// slabtop's row of a node (procps' arithmetic and `printf` format).
fn slabtop_row(n: &Node) -> String {
    let use_pct = (100 * n.active).checked_div(n.objs).unwrap_or(0);
    let cache_size = n.slabs * n.pages_per_slab * 4096;
    format!(
        "{:6} {:6} {:3}% {:7.2}K {:6} {:8} {:9}K {:<23}",
        n.objs,
        n.active,
        use_pct,
        n.obj_size as f64 / 1024.0,
        n.slabs,
        n.per_slab,
        cache_size / 1024,
        n.name
    )
}

/// slabtop's summary lines of the nodes.
fn slabtop_summary(nodes: &[Node]) -> Vec<String> {
    let sum = |f: fn(&Node) -> u64| -> u64 { nodes.iter().map(f).sum() };
    let (aobjs, objs) = (sum(|n| n.active), sum(|n| n.objs));
    let (aslabs, slabs) = (sum(|n| n.active_slabs), sum(|n| n.slabs));
    let acaches = nodes.iter().filter(|n| n.objs > 0).count() as u64;
    let caches = nodes.len() as u64;
    let active_size = sum(|n| n.active * n.obj_size);
    let total_size = sum(|n| n.objs * n.obj_size);
    let min = nodes.iter().map(|n| n.obj_size).min().unwrap();
    let max = nodes.iter().map(|n| n.obj_size).max().unwrap();
    let avg = total_size / objs;
    let pct = |a: u64, b: u64| 100.0 * a as f64 / b as f64;
    let k = |b: u64| b as f64 / 1024.0;
    vec![
        format!(
            " {:<35}: {aobjs} / {objs} ({:.1}%)",
            "Active / Total Objects (% used)",
            pct(aobjs, objs)
        ),
        format!(
            " {:<35}: {aslabs} / {slabs} ({:.1}%)",
            "Active / Total Slabs (% used)",
            pct(aslabs, slabs)
        ),
        format!(
            " {:<35}: {acaches} / {caches} ({:.1}%)",
            "Active / Total Caches (% used)",
            pct(acaches, caches)
        ),
        format!(
            " {:<35}: {:.2}K / {:.2}K ({:.1}%)",
            "Active / Total Size (% used)",
            k(active_size),
            k(total_size),
            pct(active_size, total_size)
        ),
        format!(
            " {:<35}: {:.2}K / {:.2}K / {:.2}K",
            "Minimum / Average / Maximum Object",
            k(min),
            k(avg),
            k(max)
        ),
    ]
}

#[test]
fn slabtop_reads_our_slabinfo() {
    let text = kmem_stdout(&["--mem", "256M", "proc", "slabinfo"]);
    let nodes = parse_slabinfo(&text);
    assert!(nodes.len() > 30, "the kmalloc caches at least");
    for name in [
        "kmalloc-8",
        "kmalloc-8k",
        "kmalloc-rcl-192",
        "dma-kmalloc-64",
        "vmap_area",
    ] {
        assert!(nodes.iter().any(|n| n.name == name), "{name}");
    }
    for n in &nodes {
        assert!(
            n.active <= n.objs && n.objs == n.slabs * n.per_slab,
            "{n:?}"
        );
        assert!(n.per_slab * n.obj_size <= n.pages_per_slab * 4096, "{n:?}");
        assert!(n.pages_per_slab.is_power_of_two() && n.active_slabs == n.slabs);
    }
    assert!(nodes.iter().any(|n| n.active > 0), "live objects to show");
    let summary = slabtop_summary(&nodes);
    let mut rows: Vec<(u64, String)> = nodes
        .iter()
        .map(|n| (n.slabs * n.pages_per_slab * 4096, slabtop_row(n)))
        .collect();

    let file = temp_file("slabinfo", &text);
    let Some(out) = with_proc_files(
        &[(&file, "slabinfo")],
        "slabtop -o -s c",
        "slabtop_reads_our_slabinfo",
    ) else {
        return;
    };
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..5], &summary[..], "summary\n{out}");
    assert_eq!(lines[5], "");
    assert_eq!(
        lines[6].trim_end(),
        "  OBJS ACTIVE  USE OBJ SIZE  SLABS OBJ/SLAB CACHE SIZE NAME"
    );
    // Every cache, as computed above; by cache size, largest first (equal sizes in any
    // order: procps sorts with qsort).
    let theirs: Vec<&str> = lines[7..].to_vec();
    let mut sorted_theirs: Vec<&str> = theirs.clone();
    sorted_theirs.sort();
    let mut ours: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    ours.sort();
    assert_eq!(sorted_theirs, ours, "rows\n{out}");
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    let size_of = |row: &str| -> u64 {
        row.split_whitespace()
            .nth(6)
            .unwrap()
            .trim_end_matches('K')
            .parse()
            .unwrap()
    };
    let sizes: Vec<u64> = theirs.iter().map(|r| size_of(r)).collect();
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
    assert_eq!(sizes[0], rows[0].0 / 1024);
}
