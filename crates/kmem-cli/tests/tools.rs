//! `kmem top`, `kmem plot` and `kmem bench` as a user runs them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use predicates::prelude::*;

fn kmem() -> Command {
    Command::cargo_bin("kmem").expect("the kmem binary is built")
}

fn stdout_of(args: &[&str]) -> String {
    let out = kmem().args(args).output().expect("kmem runs");
    assert!(out.status.success(), "kmem {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kmem-tools-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const HEADINGS: &str = "  OBJS ACTIVE  USE OBJ SIZE  SLABS OBJ/SLAB CACHE SIZE NAME";

/// The cache rows of plain `kmem top` frames, frame by frame: (name, cache size in K).
fn frames(text: &str) -> Vec<Vec<(String, u64)>> {
    let mut frames = Vec::new();
    let mut rows: Option<Vec<(String, u64)>> = None;
    for line in text.lines() {
        if line.starts_with(HEADINGS) {
            rows = Some(Vec::new());
        } else if line.is_empty() {
            if let Some(r) = rows.take() {
                frames.push(r);
            }
        } else if let Some(r) = rows.as_mut() {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 8, "a slabtop row: {line:?}");
            let size = f[6].trim_end_matches('K').parse().expect("cache size");
            r.push((f[7].to_string(), size));
        }
    }
    frames
}

#[test]
fn top_prints_one_slabtop_frame_when_not_a_terminal() {
    let text = stdout_of(&["--mem", "64M", "top", "--steps-per-frame", "30"]);
    assert!(
        text.starts_with(" Active / Total Objects (% used)    : "),
        "{text}"
    );
    assert_eq!(
        text.matches("Active / Total Objects").count(),
        1,
        "one frame"
    );
    assert!(text.contains(" Minimum / Average / Maximum Object : "));
    let f = frames(&text);
    assert_eq!(f.len(), 1);
    // The workload's lookaside cache and the kmalloc caches, every one of them listed.
    for name in ["churn_dentry", "kmalloc-64", "kmalloc-rcl-192", "vmap_area"] {
        assert!(f[0].iter().any(|(n, _)| n == name), "{name} in {text}");
    }
    let slabinfo_rows = stdout_of(&["--mem", "64M", "proc", "slabinfo"])
        .lines()
        .count()
        - 2;
    assert_eq!(
        f[0].len(),
        slabinfo_rows + 1,
        "every cache, and the churn's"
    );
    // Zones with free blocks and the fragmentation index per order; no escape codes.
    assert!(text.contains(" DMA32 ") && text.contains("extfrag"));
    assert!(text.contains("workload: churn, seed 1, step 30/300"));
    assert!(!text.contains('\x1b'));
}

#[test]
fn top_honours_iterations_and_sort_keys() {
    let text = stdout_of(&[
        "--mem", "64M", "top", "-n", "3", "--delay", "0", "--sort", "n", "--steps", "50",
    ]);
    let f = frames(&text);
    assert_eq!(f.len(), 3, "three frames");
    for rows in &f {
        let names: Vec<&String> = rows.iter().map(|r| &r.0).collect();
        assert!(names.windows(2).all(|w| w[0] <= w[1]), "by name: {names:?}");
    }
    assert!(text.contains("step 3/50"));
    let text = stdout_of(&[
        "--mem",
        "64M",
        "top",
        "--once",
        "-s",
        "c",
        "--steps-per-frame",
        "20",
    ]);
    let f = frames(&text);
    let sizes: Vec<u64> = f[0].iter().map(|r| r.1).collect();
    assert!(
        sizes.windows(2).all(|w| w[0] >= w[1]),
        "by cache size: {sizes:?}"
    );
    assert!(sizes[0] > 0);
    assert!(text.contains("sorted by cache size"));
}

#[test]
fn top_and_plot_replay_a_trace() {
    let dir = temp_dir("trace");
    let trace = dir.join("t.trace");
    let mut text = String::from("cache_create c 500 0 SLAB_HWCACHE_ALIGN|SLAB_NO_MERGE\n");
    for i in 0..400 {
        text.push_str(&format!("cache_alloc o{i} c GFP_KERNEL\n"));
    }
    std::fs::write(&trace, text).unwrap();
    let out = stdout_of(&[
        "--mem",
        "64M",
        "top",
        "--once",
        "--trace",
        trace.to_str().unwrap(),
        "--ops-per-step",
        "200",
    ]);
    let f = frames(&out);
    let c = f[0]
        .iter()
        .find(|(n, _)| n == "c")
        .expect("the trace's cache is listed");
    assert!(c.1 > 0, "{out}");
    assert!(out.contains(&format!("workload: trace {}, op 200/401", trace.display())));
    let charts = dir.join("charts");
    let out = stdout_of(&[
        "--mem",
        "64M",
        "plot",
        "--out",
        charts.to_str().unwrap(),
        "--format",
        "svg",
        "--trace",
        "builtin:slab-heavy",
    ]);
    assert!(out.contains("steps of trace builtin:slab-heavy"), "{out}");
    assert_eq!(svg_root(&charts.join("slab-memory.svg")).0, "svg");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `shell` under `script` (a pseudo-terminal) with `keys` typed after `after`.
fn in_a_terminal(shell: &str, keys: &str, after: Duration) -> Option<(String, Duration)> {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        return None;
    }
    let start = Instant::now();
    let mut child = std::process::Command::new("script")
        .args(["-qec", shell, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let keys = keys.to_string();
    let typist = std::thread::spawn(move || {
        for k in keys.chars() {
            std::thread::sleep(after);
            let _ = std::io::Write::write_all(&mut stdin, k.to_string().as_bytes());
        }
        // Keep stdin open a little, as a user at the keyboard would.
        std::thread::sleep(Duration::from_millis(500));
    });
    let out = child.wait_with_output().ok()?;
    let elapsed = start.elapsed();
    typist.join().ok()?;
    assert!(out.status.success(), "{out:?}");
    Some((String::from_utf8_lossy(&out.stdout).into_owned(), elapsed))
}

#[test]
fn top_draws_on_a_terminal_sorts_on_a_key_and_quits_on_q() {
    let bin = assert_cmd::cargo::cargo_bin("kmem");
    let shell = format!(
        "stty cols 120 rows 40; {} --mem 64M top --delay 60",
        bin.display()
    );
    let Some((screen, elapsed)) = in_a_terminal(&shell, "nq", Duration::from_millis(1500)) else {
        eprintln!("SKIPPED: top_draws_on_a_terminal...: `script` (util-linux) is not available");
        return;
    };
    // The alternate screen is entered and left again; `q` ended the view long before the
    // 60 s refresh.
    assert!(screen.contains("\x1b[?1049h") && screen.contains("\x1b[?1049l"));
    // The last frame, as the terminal showed it: re-sorted by name after `n`.
    let last = replay(&screen, 120, 40);
    let footer = last.last().unwrap();
    assert!(footer.contains("sort: n (name)"), "{last:#?}");
    assert!(last[0].starts_with(" Active / Total Objects (% used)    : "));
    let names: Vec<&str> = last
        .iter()
        .skip_while(|l| !l.starts_with("  OBJS ACTIVE"))
        .skip(1)
        .take_while(|l| l != &footer)
        .filter_map(|l| l.split_whitespace().nth(7))
        .collect();
    assert!(
        names.len() > 10 && names.contains(&"churn_dentry"),
        "{last:#?}"
    );
    assert!(names.windows(2).all(|w| w[0] <= w[1]), "by name: {names:?}");
    assert!(
        elapsed < Duration::from_secs(30),
        "q quit after {elapsed:?}"
    );
}

/// The screen a terminal of `cols` × `rows` shows after `output` (cursor moves and text;
/// other escape sequences ignored), up to where the alternate screen is left.
fn replay(output: &str, cols: usize, rows: usize) -> Vec<String> {
    let mut grid = vec![vec![' '; cols]; rows];
    let (mut r, mut c) = (0usize, 0usize);
    let mut it = output.chars().peekable();
    while let Some(ch) = it.next() {
        if ch != '\x1b' {
            if ch == '\r' {
                c = 0;
            } else if ch == '\n' {
                r = (r + 1).min(rows - 1);
            } else if !ch.is_control() && r < rows && c < cols {
                grid[r][c] = ch;
                c += 1;
            }
            continue;
        }
        if it.peek() != Some(&'[') {
            it.next();
            continue;
        }
        it.next();
        let mut params = String::new();
        let fin = loop {
            match it.next() {
                Some(p) if !p.is_ascii_alphabetic() => params.push(p),
                other => break other,
            }
        };
        match fin {
            Some('H') => {
                let mut p = params.split(';').map(|v| v.parse::<usize>().unwrap_or(1));
                r = p.next().unwrap_or(1).saturating_sub(1);
                c = p.next().unwrap_or(1).saturating_sub(1);
            }
            Some('l') if params == "?1049" => break,
            Some('J') if params == "2" => grid = vec![vec![' '; cols]; rows],
            _ => {}
        }
    }
    grid.into_iter().map(|l| l.into_iter().collect()).collect()
}

/// The PNG's width and height, after checking its signature, IHDR chunk and CRC.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{}: PNG signature",
        path.display()
    );
    assert_eq!(&b[8..16], b"\0\0\0\x0dIHDR", "IHDR first, 13 bytes");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    assert_eq!(crc32(&b[12..29]), be(29), "IHDR CRC");
    assert_eq!((b[24], b[25]), (8, 2), "8-bit RGB");
    assert!(
        b.ends_with(b"\0\0\0\0IEND\xae\x42\x60\x82"),
        "ends with IEND"
    );
    (be(16), be(20))
}

/// CRC-32 as PNG computes it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &byte in data {
        c ^= u32::from(byte);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// The root element's name and its width and height attributes, after checking that the
/// document's tags nest properly.
fn svg_root(path: &Path) -> (String, String, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut stack: Vec<String> = Vec::new();
    let mut root = None;
    let mut rest = text.as_str();
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').expect("a tag ends");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "tags nest");
            continue;
        }
        let name = tag.split_whitespace().next().unwrap().trim_end_matches('/');
        if root.is_none() {
            assert!(stack.is_empty());
            root = Some(tag.to_string());
        } else {
            assert!(!stack.is_empty(), "one root element");
        }
        if !tag.ends_with('/') {
            stack.push(name.to_string());
        }
    }
    assert!(stack.is_empty(), "every tag closed: {stack:?}");
    let root = root.expect("a root element");
    let attr = |a: &str| -> String {
        let key = format!(" {a}=\"");
        let i = root.find(&key).unwrap_or_else(|| panic!("{a} in {root}")) + key.len();
        root[i..i + root[i..].find('"').unwrap()].to_string()
    };
    let name = root.split_whitespace().next().unwrap().to_string();
    assert_eq!(attr("xmlns"), "http://www.w3.org/2000/svg");
    (name, attr("width"), attr("height"))
}

#[test]
fn plot_writes_valid_pngs_of_the_requested_size() {
    let dir = temp_dir("png");
    let out = stdout_of(&[
        "--mem",
        "64M",
        "plot",
        "--out",
        dir.to_str().unwrap(),
        "--steps",
        "40",
        "--width",
        "640",
        "--height",
        "420",
    ]);
    for stem in ["free-blocks", "slab-memory", "extfrag"] {
        let p = dir.join(format!("{stem}.png"));
        assert!(out.contains(&format!("wrote {}", p.display())), "{out}");
        assert_eq!(png_size(&p), (640, 420), "{stem}");
        assert!(!dir.join(format!("{stem}.svg")).exists());
    }
    assert!(out.contains("40 steps of churn"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn plot_writes_valid_svgs_and_both_formats() {
    let dir = temp_dir("svg");
    let d = dir.join("nested/charts");
    stdout_of(&[
        "--mem",
        "32M",
        "plot",
        "--out",
        d.to_str().unwrap(),
        "--format",
        "svg",
        "--steps",
        "20",
        "--width",
        "800",
        "--height",
        "500",
    ]);
    for stem in ["free-blocks", "slab-memory", "extfrag"] {
        let p = d.join(format!("{stem}.svg"));
        assert_eq!(svg_root(&p), ("svg".into(), "800".into(), "500".into()));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("workload step"), "axis label drawn as text");
    }
    let text = std::fs::read_to_string(d.join("free-blocks.svg")).unwrap();
    assert!(text.contains("DMA32: free blocks per order") && text.contains("order 10"));
    let both = dir.join("both");
    stdout_of(&[
        "--mem",
        "32M",
        "plot",
        "--out",
        both.to_str().unwrap(),
        "--format",
        "both",
        "--steps",
        "10",
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&both)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "extfrag.png",
            "extfrag.svg",
            "free-blocks.png",
            "free-blocks.svg",
            "slab-memory.png",
            "slab-memory.svg"
        ]
    );
    assert_eq!(
        png_size(&both.join("extfrag.png")),
        (1200, 800),
        "the default size"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_quick_prints_the_comparison_table() {
    let out = kmem()
        .args([
            "bench",
            "--quick",
            "--case",
            "order0-pair",
            "--case",
            "kmalloc-pair-64",
            "--alloc",
            "kmem",
            "--alloc",
            "buddy",
            "--alloc",
            "system",
            "--rounds",
            "2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("median of 2 rounds; ratio = peer / kmem"),
        "{text}"
    );
    assert!(text.contains("\norder0-pair: ") && text.contains("\nkmalloc-pair-64: "));
    assert!(text.contains("vs kmem"));
    // kmem against itself is 1.00x; the peers have a ratio each.
    let row = |case: &str, alloc: &str| -> String {
        let section = &text[text.find(&format!("\n{case}: ")).unwrap()..];
        section
            .lines()
            .find(|l| l.split_whitespace().next() == Some(alloc))
            .unwrap_or_else(|| panic!("{alloc} row in {case}: {text}"))
            .to_string()
    };
    assert!(row("order0-pair", "kmem").ends_with(" 1.00x"));
    for (case, alloc) in [
        ("order0-pair", "buddy_system_allocator"),
        ("order0-pair", "system"),
        ("kmalloc-pair-64", "system"),
    ] {
        let r = row(case, alloc);
        let ratio: f64 = r
            .split_whitespace()
            .last()
            .unwrap()
            .trim_end_matches('x')
            .parse()
            .unwrap();
        assert!(ratio > 0.0, "{r}");
    }
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("jemalloc")),
        "only the allocators asked for"
    );
    assert!(text.contains("target: kmem order0-pair"));
    // No progress bar when standard error is not a terminal.
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains('\r') && !err.contains("round"), "{err}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let dir = temp_dir("bad");
    let file = dir.join("a-file");
    std::fs::write(&file, "").unwrap();
    let under_file = file.join("charts");
    for (args, says) in [
        (vec!["top", "--sort", "x"], "unknown sort key 'x'"),
        (vec!["top", "--delay", "-1"], "delay"),
        (vec!["top", "--delay", "soon"], "not a delay"),
        (vec!["top", "--iterations", "0"], "iterations"),
        (vec!["top", "--steps", "0"], "steps"),
        (vec!["plot"], "--out"),
        (vec!["plot", "--out", "x", "--format", "gif"], "gif"),
        (vec!["plot", "--out", "x", "--width", "10"], "width"),
        (
            vec!["top", "--trace", "builtin:nope"],
            "no built-in workload \"nope\"",
        ),
        (
            vec!["top", "--trace", "/nonexistent/trace"],
            "cannot read the trace",
        ),
        (vec!["top", "--ops-per-step", "3"], "--trace"),
        (vec!["bench", "--case", "nope"], "unknown case 'nope'"),
        (
            vec!["bench", "--alloc", "tcmalloc"],
            "unknown allocator 'tcmalloc'",
        ),
        (vec!["bench", "--rounds", "0"], "rounds"),
        (
            vec!["bench", "--quick", "--alloc", "system"],
            "must include kmem",
        ),
        (
            vec![
                "--mem",
                "32M",
                "plot",
                "--out",
                under_file.to_str().unwrap(),
            ],
            "cannot create",
        ),
    ] {
        kmem()
            .args(&args)
            .assert()
            .failure()
            .stderr(predicate::str::contains(says))
            .stderr(predicate::str::contains("panicked").not())
            .stderr(predicate::str::contains("RUST_BACKTRACE").not());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn help_lists_the_tools() {
    kmem()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("top"))
        .stdout(predicate::str::contains("plot"))
        .stdout(predicate::str::contains("bench"));
    kmem()
        .args(["top", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("u (utilization)"))
        .stdout(predicate::str::contains("--steps-per-frame"));
}
