//! Helpers shared by the CLI tests.

#![allow(dead_code)] // each test file uses its own subset

use assert_cmd::Command;

/// The `kmem` binary of this build.
pub fn kmem() -> Command {
    Command::cargo_bin("kmem").expect("the kmem binary is built")
}

/// Runs `kmem args...`, asserts it succeeded, and returns its standard output.
pub fn kmem_stdout(args: &[&str]) -> String {
    let out = kmem().args(args).output().expect("kmem runs");
    assert!(out.status.success(), "kmem {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
