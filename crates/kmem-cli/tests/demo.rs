//! The default command's tour through LDD3 chapter 8's drivers, as a user runs it: every
//! driver reads back what it wrote, the mempool serves requests while kmalloc fails, the
//! per-CPU counters add up exactly, the scatter/gather buffer is built on fragmented memory,
//! and nothing but plain text reaches a pipe.

use assert_cmd::Command;

/// Runs `kmem` with `args`, checks it succeeded, and returns its standard output.
fn demo(args: &[&str]) -> String {
    let out = Command::cargo_bin("kmem")
        .expect("the kmem binary is built")
        .args(args)
        .env_remove("NO_COLOR")
        .output()
        .expect("kmem runs");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kmem {args:?} failed: {stderr}\n{stdout}"
    );
    stdout
}

/// The lines of the section whose heading contains `title`, up to the next heading.
fn section<'a>(out: &'a str, title: &str) -> Vec<&'a str> {
    let mut lines = out
        .lines()
        .skip_while(|l| !(l.starts_with("== ") && l.contains(title)));
    assert!(lines.next().is_some(), "no section {title:?} in:\n{out}");
    lines.take_while(|l| !l.starts_with("== ")).collect()
}

/// The number right after `prefix` in `line`.
fn number_after(line: &str, prefix: &str) -> Option<u64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[test]
fn every_driver_reads_back_what_it_wrote() {
    let out = demo(&[]);
    for driver in ["scullc", "scullp order 0", "scullp order 2", "scullv"] {
        let line = format!("  {driver}: wrote 4194304 bytes, read back 4194304 bytes, verified");
        assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
    }
    // The memory each driver held, as the machine accounts it, and given back.
    assert!(out.contains("1049 quanta in 3 qsets of 500"), "{out}");
    assert!(out.contains("kmem_cache_destroy(\"scullc\")"), "{out}");
    assert!(
        out.contains("1024 quanta of 1 page in 3 qsets; MemFree down"),
        "{out}"
    );
    assert!(
        out.contains("256 quanta of 4 pages in 1 qset; MemFree down"),
        "{out}"
    );
    assert!(
        out.contains("64 quanta of 16 pages in 1 qset; VmallocUsed up 4096 kB"),
        "{out}"
    );
    assert!(out.contains("VmallocUsed back to 0 kB"), "{out}");
    assert!(out.contains("free pages back to their boot count"), "{out}");
}

#[test]
fn the_mempool_serves_requests_while_kmalloc_fails() {
    let out = demo(&[]);
    let lines = section(&out, "Out of memory");
    let text = lines.join("\n");
    assert!(text.contains("MemFree 0 kB"), "{text}");
    let fails = lines
        .iter()
        .position(|l| l.contains("kmalloc(256, GFP_ATOMIC) fails"))
        .unwrap_or_else(|| panic!("no kmalloc failure in:\n{text}"));
    assert!(
        lines[fails + 1].contains("page allocation failure: order:0"),
        "the failure report follows: {text}"
    );
    assert!(
        text.contains("GFP_ATOMIC: 16 requests served from the reserve, the next refused"),
        "{text}"
    );
    let served = lines
        .iter()
        .find_map(|l| number_after(l, "kmalloc failed while "))
        .unwrap_or_else(|| panic!("no served count in:\n{text}"));
    assert_eq!(served, 10_000, "{text}");
    let in_flight = lines
        .iter()
        .find_map(|l| number_after(l, "at most "))
        .unwrap_or_else(|| panic!("no in-flight count in:\n{text}"));
    assert!((1..=16).contains(&in_flight), "{text}");
}

#[test]
fn per_cpu_counters_add_up_to_the_calls_made() {
    let out = demo(&[]);
    let lines = section(&out, "Per-CPU statistics");
    let header = lines
        .iter()
        .position(|l| l.trim_start().starts_with("device") && l.contains("calls made"))
        .unwrap_or_else(|| panic!("no table in:\n{}", lines.join("\n")));
    let cpus = lines[header]
        .split('|')
        .next()
        .unwrap()
        .split_whitespace()
        .count()
        - 1;
    assert_eq!(cpus, 4, "a column per CPU of the default machine");
    let rows: Vec<&str> = lines[header + 1..]
        .iter()
        .copied()
        .take_while(|l| l.contains('|'))
        .collect();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, ["scullc", "scullp/0", "scullp/2", "scullv"]);
    for row in rows {
        let (left, right) = row.split_once('|').unwrap();
        let per_cpu: Vec<u64> = left
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        let right: Vec<u64> = right
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        let [sum, calls, bytes] = right[..] else {
            panic!("sum, calls and bytes expected in {row:?}")
        };
        assert_eq!(per_cpu.iter().sum::<u64>(), sum, "{row}");
        assert_eq!(sum, calls, "the sum is exact: {row}");
        assert!(
            calls > 2 * 256,
            "a call per quantum at least, both ways: {row}"
        );
        assert_eq!(bytes, 2 * 4194304, "written and read: {row}");
        // Two threads did the calls, each on its own vCPU.
        let busy = per_cpu.iter().filter(|&&c| c > 0).count();
        assert!((1..=2).contains(&busy), "{row}");
    }
}

#[test]
fn the_sg_buffer_is_larger_than_any_free_block() {
    let out = demo(&[]);
    let lines = section(&out, "scatter/gather");
    let text = lines.join("\n");
    let buddy: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("Node 0"))
        .collect();
    assert_eq!(buddy.len(), 3, "buddyinfo of the three zones: {text}");
    for l in &buddy {
        // Nothing free above order 0.
        let counts: Vec<u64> = l
            .split_whitespace()
            .skip(4)
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(counts[1..].iter().all(|&c| c == 0), "{l}");
    }
    assert!(
        text.contains("the largest free block is order 0 (4 kB)"),
        "{text}"
    );
    assert!(
        text.contains("sg_alloc_buffer(8 MiB, GFP_KERNEL): 2048 entries of at most 4 kB"),
        "{text}"
    );
    assert!(text.contains("verified"), "{text}");
}

#[test]
fn small_machines_and_one_cpu_run_the_whole_tour() {
    for args in [&["--mem", "16M"][..], &["--mem", "64M", "--cpus", "1"]] {
        let out = demo(args);
        let verified: Vec<&str> = out
            .lines()
            .filter(|l| l.ends_with(" bytes, verified"))
            .collect();
        assert_eq!(verified.len(), 4, "{args:?}: {out}");
        for l in verified {
            let wrote = number_after(l, "wrote ").unwrap();
            assert_eq!(number_after(l, "read back "), Some(wrote), "{l}");
            assert!(wrote > 0);
        }
        assert!(
            out.contains("largest free block is order 0"),
            "{args:?}: {out}"
        );
        assert!(
            out.contains("free pages back to their boot count"),
            "{args:?}: {out}"
        );
    }
}

#[test]
fn output_to_a_pipe_is_plain_text() {
    let out = Command::cargo_bin("kmem")
        .expect("the kmem binary is built")
        .env_remove("NO_COLOR")
        .output()
        .expect("kmem runs");
    assert!(out.status.success());
    assert!(!out.stdout.is_empty());
    assert!(!out.stdout.contains(&0x1b), "no escape sequence on stdout");
    assert!(!out.stderr.contains(&0x1b), "no progress bar on stderr");
}
