//! `kmem boot --cmdline ...` and `kmem run <trace>` as a user runs them.

use std::path::PathBuf;

mod common;
use assert_cmd::Command;
use common::kmem;
use predicates::prelude::*;

fn stdout(cmd: &mut Command) -> String {
    let out = cmd.assert().success();
    String::from_utf8(out.get_output().stdout.clone()).unwrap()
}

/// A trace file in the temporary directory, removed when dropped.
struct TraceFile(PathBuf);

impl TraceFile {
    fn new(name: &str, text: &str) -> TraceFile {
        let path = std::env::temp_dir().join(format!("kmem-{}-{name}.trace", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TraceFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TraceFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The number after `field:` in a meminfo text, in kB.
fn meminfo_kb(text: &str, field: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The summary line starting with `key` (e.g. "failures"), without the key.
fn summary<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(key).map(str::trim))
        .unwrap_or_else(|| panic!("no {key} line in {text}"))
}

#[test]
fn boot_prints_the_command_line_log_and_meminfo() {
    let text = stdout(kmem().args([
        "boot",
        "--cmdline",
        "mem=1G foo=1 bar slab_nomerge console=ttyS0",
    ]));
    assert!(
        text.starts_with(
            "== Boot\n  Kernel command line: mem=1G foo=1 bar slab_nomerge console=ttyS0\n"
        ),
        "{text}"
    );
    assert!(text.contains("  e820: remove [mem 0x40000000-0xfffffffffffffffe] usable\n"));
    assert!(text.contains("  user-defined physical RAM map:\n"));
    assert!(text.contains(
        "  Unknown kernel command line parameters \"foo=1 bar\", will be passed to user space.\n"
    ));
    assert!(text.contains("  kmem: parameters without effect on this machine: console=ttyS0\n"));
    assert!(text.contains("== /proc/meminfo\nMemTotal:"));
}

#[test]
fn mem_changes_memtotal() {
    let full = meminfo_kb(&stdout(kmem().args(["boot"])), "MemTotal");
    let limited = meminfo_kb(
        &stdout(kmem().args(["boot", "--cmdline", "mem=512M"])),
        "MemTotal",
    );
    assert!(
        full > 3 << 20,
        "the default machine has about 4 GiB: {full} kB"
    );
    assert!(limited <= 512 << 10, "mem=512M: {limited} kB");
    // All of it but the default machine's 32 MiB kernel image and mem_map.
    assert!(limited > 464 << 10, "mem=512M: {limited} kB");
    // mem= trims the hardware the other options describe.
    let small = meminfo_kb(
        &stdout(kmem().args(["--mem", "256M", "boot", "--cmdline", "mem=128M"])),
        "MemTotal",
    );
    assert!(small <= 128 << 10 && small > 110 << 10, "{small} kB");
}

#[test]
fn other_parameters_reach_the_machine() {
    let text = stdout(kmem().args(["boot", "--cmdline", "vmalloc=64M"]));
    assert_eq!(meminfo_kb(&text, "VmallocTotal"), 64 << 10);
    let text = stdout(kmem().args(["boot", "--cmdline", "init_on_alloc=1 init_on_free=1"]));
    assert!(text.contains("mem auto-init: stack:off, heap alloc:on, heap free:on"));
    // slab_nomerge: the trace's caches get their own slabinfo lines instead of being merged
    // into the kmalloc caches.
    let merged = stdout(kmem().args(["run", "builtin:slab-heavy", "--proc", "slabinfo"]));
    let separate = stdout(kmem().args([
        "boot",
        "--cmdline",
        "slab_nomerge",
        "run",
        "builtin:slab-heavy",
        "--proc",
        "slabinfo",
    ]));
    assert!(
        !merged.lines().any(|l| l.starts_with("dentry ")),
        "{merged}"
    );
    assert!(
        separate.lines().any(|l| l.starts_with("dentry ")),
        "{separate}"
    );
    assert!(separate.lines().any(|l| l.starts_with("inode_cache ")));
}

#[test]
fn debugging_options_are_accepted_but_said_to_be_absent() {
    let text = stdout(kmem().args([
        "boot",
        "--cmdline",
        "slub_debug=FZPU,dentry page_poison=1 debug_pagealloc=on slab_debug=Fq",
    ]));
    assert!(text.contains(
        "slub_debug=FZPU,dentry: accepted (FZPU on dentry), but kmem has no slab debugging built in"
    ), "{text}");
    assert!(text.contains("page_poison=1: accepted, but kmem has no page poisoning built in"));
    assert!(
        text.contains("debug_pagealloc=on: accepted, but kmem has no debug_pagealloc built in")
    );
    assert!(
        text.contains("slab_debug option 'q' unknown. skipped"),
        "Linux's own line"
    );
    assert!(!text.contains("Unknown kernel command line"));
}

#[test]
fn malformed_values_are_clear_errors() {
    for (cmdline, says) in [
        ("mem=lots", "mem=lots: mem \"lots\" is not a number"),
        ("mem=0", "mem=0: mem 0 is not allowed"),
        ("mem", "mem: a value is required"),
        ("memmap=1G%2G", "memmap=1G%2G: \"1G%2G\": expected exactmap"),
        (
            "nr_cpus=two",
            "nr_cpus=two: nr_cpus \"two\" is not a number",
        ),
        ("vmalloc=0", "vmalloc=0: vmalloc 0 is not allowed"),
        (
            "init_on_free=maybe",
            "init_on_free=maybe: \"maybe\" is not a boolean",
        ),
        ("page_poison=", "page_poison=: \"\" is not a boolean"),
        (
            "failslab=1,100",
            "failslab=1,100: \"1,100\": expected <interval>,<probability>,<space>,<times>",
        ),
        (
            "fail_page_alloc=1,x,0,1",
            "expected <interval>,<probability>,<space>,<times>",
        ),
        ("sysctl.vm.min_free_kbytes=lots", "is not a number"),
        ("kmem_reserve=fb", "expected <name>:<size>[@<align>]"),
        ("memmap=exactmap", "leaves the memory map without RAM"),
    ] {
        for args in [
            vec!["boot", "--cmdline", cmdline],
            vec!["boot", "--cmdline", cmdline, "run", "builtin:churn"],
        ] {
            kmem()
                .args(&args)
                .assert()
                .failure()
                .stdout(predicate::str::is_empty())
                .stderr(predicate::str::starts_with(
                    "kmem: bad kernel command line: ",
                ))
                .stderr(predicate::str::contains(says))
                .stderr(predicate::str::contains("panicked").not())
                .stderr(predicate::str::contains("RUST_BACKTRACE").not());
        }
    }
}

#[test]
fn failslab_failures_are_counted() {
    let mut text = String::new();
    for i in 0..10 {
        text.push_str(&format!("kmalloc a{i} 64 GFP_ATOMIC\n"));
    }
    text.push_str("kmalloc k1 64 GFP_KERNEL\nkmalloc k2 64 GFP_KERNEL\n");
    for i in 0..10 {
        text.push_str(&format!("kfree a{i}\n"));
    }
    let t = TraceFile::new("failslab", &text);
    let out = stdout(kmem().args(["boot", "--cmdline", "failslab=1,100,0,4", "run", t.path()]));
    assert_eq!(
        summary(&out, "failures"),
        "4 (kmalloc 4)",
        "times=4; GFP_KERNEL spared"
    );
    assert_eq!(
        summary(&out, "injected"),
        "4 (failslab 4, fail_page_alloc 0)"
    );
    assert_eq!(summary(&out, "live"), "2 allocations, 128 B asked for");
    assert!(
        summary(&out, "log").starts_with("8 kernel log lines"),
        "two per failure: {out}"
    );
    // Every 3rd eligible one: 3 of the 10.
    let out = stdout(kmem().args(["boot", "--cmdline", "failslab=3,100,0,-1", "run", t.path()]));
    assert_eq!(summary(&out, "failures"), "3 (kmalloc 3)");
    // Without the parameter, nothing fails.
    let out = stdout(kmem().args(["run", t.path()]));
    assert_eq!(summary(&out, "failures"), "0");
    assert!(!out.contains("injected"));
    // A built-in workload under failslab: its atomic allocations fail, and each failure
    // counted is one failslab injected.
    let out = stdout(kmem().args([
        "boot",
        "--cmdline",
        "failslab=1,100,0,-1",
        "run",
        "builtin:churn",
    ]));
    let failures: u64 = summary(&out, "failures")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(failures > 1000, "{out}");
    assert_eq!(
        summary(&out, "injected"),
        format!("{failures} (failslab {failures}, fail_page_alloc 0)")
    );
}

#[test]
fn fail_page_alloc_failures_are_counted() {
    let t = TraceFile::new(
        "fail_page_alloc",
        "alloc_pages p0 0 GFP_ATOMIC\nalloc_pages p1 1 GFP_ATOMIC\nalloc_pages p2 2 GFP_NOWAIT\n\
         alloc_pages p3 2 GFP_KERNEL\nalloc_pages p4 2 GFP_ATOMIC|__GFP_NOFAIL\n",
    );
    let out = stdout(kmem().args([
        "boot",
        "--cmdline",
        "fail_page_alloc=1,100,0,-1",
        "run",
        t.path(),
    ]));
    // Order 0 (below min-order), GFP_KERNEL (may sleep) and __GFP_NOFAIL are spared.
    assert_eq!(summary(&out, "failures"), "2 (alloc_pages 2)", "{out}");
    assert_eq!(
        summary(&out, "injected"),
        "2 (failslab 0, fail_page_alloc 2)"
    );
}

#[test]
fn every_builtin_runs() {
    for name in ["churn", "fragment", "slab-heavy", "vmalloc"] {
        let out = stdout(kmem().args(["--mem", "512M", "run", &format!("builtin:{name}")]));
        assert!(
            out.starts_with(&format!("\n== Run builtin:{name} (")),
            "{out}"
        );
        let ops: u64 = summary(&out, "ops")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(ops > 1000, "{name}: {out}");
        assert_eq!(summary(&out, "failures"), "0", "{name} on 512 MiB: {out}");
        assert!(summary(&out, "peak").contains("of pages in use"));
    }
    let out = stdout(kmem().args([
        "run",
        "builtin:fragment",
        "--proc",
        "buddyinfo",
        "--proc",
        "meminfo",
    ]));
    assert_eq!(
        summary(&out, "live"),
        "8192 allocations, 32.0 MiB asked for"
    );
    assert!(out.contains("== /proc/buddyinfo\nNode 0, zone      DMA"));
    assert!(out.contains("== /proc/meminfo\nMemTotal:"));
}

#[test]
fn traces_from_files_and_stdin() {
    let t = TraceFile::new(
        "ok",
        "# comment\ncache_create c 100 0 SLAB_NO_MERGE\ncache_alloc o c GFP_KERNEL\n\
         vmalloc v 1M\nkmalloc k 100 GFP_KERNEL|__GFP_ZERO\nkrealloc k 5000 GFP_KERNEL\n",
    );
    let out = stdout(kmem().args(["run", t.path(), "--proc", "slabinfo"]));
    assert!(out.contains(&format!("== Run {} (5 ops)", t.path())));
    assert_eq!(summary(&out, "ops"), "5 (5 allocations, 0 frees)");
    assert_eq!(summary(&out, "live"), "3 allocations, 1.0 MiB asked for");
    assert!(
        out.lines()
            .any(|l| l.starts_with("c ") && l.contains(" 104 ")),
        "{out}"
    );
    let out = stdout(
        kmem()
            .args(["run", "-"])
            .write_stdin("kmalloc a 8 GFP_KERNEL\nkfree a\n"),
    );
    assert_eq!(summary(&out, "ops"), "2 (1 allocations, 1 frees)");
}

#[test]
fn malformed_traces_are_clear_errors() {
    let t = TraceFile::new("bad", "kmalloc a 8 GFP_KERNEL\n\nkmallok b 8 GFP_KERNEL\n");
    for args in [
        vec!["run", t.path()],
        vec!["boot", "--cmdline", "mem=1G", "run", t.path()],
    ] {
        kmem()
            .args(&args)
            .assert()
            .failure()
            .stdout(predicate::str::is_empty())
            .stderr(predicate::str::contains(format!(
                "kmem: {}:3: unknown op \"kmallok\"",
                t.path()
            )))
            .stderr(predicate::str::contains("panicked").not());
    }
    let cases = [
        ("kfree x\n", ":1: id x is not live"),
        (
            "kmalloc a 8 GFP_KERNAL\n",
            ":1: \"GFP_KERNAL\" is not a GFP flag",
        ),
        (
            "alloc_pages a 12 GFP_KERNEL\n",
            ":1: order \"12\" is not 0 to 10",
        ),
        ("kmalloc a 8\n", ":1: kmalloc takes 3 fields"),
        (
            "cache_create c 64 0 0\ncache_alloc o c GFP_KERNEL\ncache_destroy c\n",
            ":3: cache c still has 1 live object",
        ),
    ];
    for (text, says) in cases {
        let t = TraceFile::new("bad2", text);
        kmem()
            .args(["run", t.path()])
            .assert()
            .failure()
            .stderr(predicate::str::contains(says))
            .stderr(predicate::str::contains("panicked").not());
    }
    kmem()
        .args(["run", "/nonexistent/kmem.trace"])
        .assert()
        .failure()
        .stderr(predicate::str::starts_with(
            "kmem: cannot read the trace /nonexistent/kmem.trace:",
        ));
    kmem()
        .args(["run", "builtin:nope"])
        .assert()
        .failure()
        .stderr("kmem: no built-in workload \"nope\" (there are: churn, fragment, slab-heavy, vmalloc)\n");
    kmem()
        .args(["run", "builtin:churn", "--proc", "nope"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("error"))
        .stderr(predicate::str::contains("panicked").not());
}

#[test]
fn help_documents_the_format_and_the_parameters() {
    kmem()
        .args(["run", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("alloc_pages   <id> <order> <gfp>"))
        .stdout(predicate::str::contains("cache_destroy <name>"))
        .stdout(predicate::str::contains("slab-heavy"));
    kmem()
        .args(["boot", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "failslab=<interval>,<probability>,<space>,<times>",
        ))
        .stdout(predicate::str::contains("mem=nn[KMG]"));
    kmem()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("boot"))
        .stdout(predicate::str::contains("run"));
}
