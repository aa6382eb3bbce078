//! The `kmem` command as a user runs it.

mod common;
use common::kmem;
use predicates::prelude::*;

#[test]
fn demo_on_defaults_tells_the_whole_story() {
    kmem()
        .assert()
        .success()
        .stdout(predicate::str::contains("Zone ranges:"))
        .stdout(predicate::str::contains("from Normal"))
        .stdout(predicate::str::contains("from DMA32"))
        .stdout(predicate::str::contains("page allocation failure: order:0"))
        .stdout(predicate::str::contains("BUG: Bad page state"))
        .stdout(
            predicate::str::is_match(r"free pages back to their boot count \(\d+\): yes").unwrap(),
        )
        .stdout(predicate::str::contains("MemTotal:"))
        .stdout(predicate::str::contains("\x1b[").not());
}

#[test]
fn demo_on_x86_32_uses_highmem() {
    kmem()
        .args(["--layout", "x86_32", "--mem", "1536M", "--cpus", "2"])
        .assert()
        .success()
        .stdout(predicate::str::contains("from HighMem"))
        .stdout(predicate::str::contains("HighTotal:"));
}

#[test]
fn proc_files() {
    let out = kmem().args(["proc", "meminfo"]).assert().success();
    let text = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(text.starts_with("MemTotal:"), "{text}");
    kmem()
        .args(["proc", "slabinfo"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("slabinfo - version: 2.1\n"));
    kmem().args(["proc", "vmallocinfo"]).assert().success();
    kmem()
        .args(["proc", "buddyinfo"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("Node 0, zone      DMA "));
    kmem()
        .args(["--mem", "64M", "proc", "zoneinfo"])
        .assert()
        .success()
        .stdout(predicate::str::contains("Node 0, zone    DMA32"))
        .stdout(predicate::str::contains("  pagesets"));
}

#[test]
fn help_explains_itself() {
    kmem()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("buddyinfo"))
        .stdout(predicate::str::contains("--layout"));
}

#[test]
fn bad_arguments_are_clear_errors() {
    for args in [
        &["--mem", "lots"][..],
        &["--mem", "1K"],
        &["--mem", "8M"],
        &["--cpus", "0"],
        &["--layout", "sparc"],
        &["proc", "slabinfo-nope"],
        &["frobnicate"],
    ] {
        kmem()
            .args(args)
            .assert()
            .failure()
            .stderr(predicate::str::contains("error"))
            .stderr(predicate::str::contains("panicked").not())
            .stderr(predicate::str::contains("RUST_BACKTRACE").not());
    }
}
