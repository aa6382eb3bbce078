//! Records this program's heap traffic as a kmem trace.
//!
//! ```text
//! cargo run -p kmem-hosted --example record -- program.trace
//! kmem run program.trace --proc slabinfo
//! ```
//!
//! The "program" is a word count over generated text: a `HashMap<String, usize>` that grows,
//! a `Vec` of its entries sorted, and strings built and dropped along the way.

use std::collections::HashMap;
use std::fs::File;
use std::process::ExitCode;

use kmem_hosted::recorder::Recorder;

#[global_allocator]
static RECORDER: Recorder = Recorder::new();

fn program() -> usize {
    let words = [
        "page", "slab", "zone", "buddy", "order", "gfp", "vmalloc", "sheaf",
    ];
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..20_000usize {
        let w = format!("{}-{}", words[i % words.len()], i % 257);
        *counts.entry(w).or_default() += 1;
    }
    let mut top: Vec<(String, usize)> = counts.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.len()
}

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: record <output.trace>");
        return ExitCode::FAILURE;
    };
    let file = match File::create(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("record: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    RECORDER.start_to_file(file);
    let n = program();
    RECORDER.stop();
    if RECORDER.write_failed() {
        eprintln!("record: writing {path} failed");
        return ExitCode::FAILURE;
    }
    eprintln!("record: {n} distinct words; trace written to {path}");
    ExitCode::SUCCESS
}
