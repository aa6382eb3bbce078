//! The recorder as a program's global allocator: a small program's allocations (a growing
//! `Vec`, a `HashMap` of `String`s, a `Box`) become a trace that replays on a machine.

use std::collections::HashMap;

use kmem_hosted::recorder::Recorder;
use kmem_hosted::trace::{Op, Replayer, Trace};
use kmem_hosted::{Machine, MachineConfig};

#[global_allocator]
static RECORDER: Recorder<{ 1 << 20 }> = Recorder::new();

/// The program being recorded. Returns a checksum so nothing is optimised away.
#[inline(never)]
fn program() -> u64 {
    let mut v: Vec<u64> = Vec::new();
    for i in 0..5000 {
        v.push(i * 3);
    }
    let mut m: HashMap<String, Vec<u8>> = HashMap::new();
    for i in 0..300 {
        m.insert(format!("key-{i}"), vec![i as u8; i % 97 + 1]);
    }
    let boxed = Box::new([7u64; 64]);
    let sum = v.iter().sum::<u64>() + m.values().map(|b| b.len() as u64).sum::<u64>() + boxed[3];
    drop(m);
    drop(v);
    sum
}

#[test]
fn a_program_recorded_and_replayed() {
    RECORDER.start();
    let sum = program();
    let text = RECORDER.take();
    assert_eq!(
        sum,
        37_492_500 + (0..300).map(|i| i % 97 + 1).sum::<u64>() + 7
    );
    assert!(!RECORDER.truncated());

    let trace = Trace::parse(&text).expect("the recorder writes well-formed traces");
    let count = |f: fn(&Op) -> bool| trace.ops().iter().filter(|o| f(o)).count();
    let kmallocs = count(|o| matches!(o, Op::Kmalloc { .. }));
    let kreallocs = count(|o| matches!(o, Op::Krealloc { .. }));
    let kfrees = count(|o| matches!(o, Op::Kfree { .. }));
    // 300 keys and 300 values, the map's table (and its growth), the vector, the box.
    assert!(kmallocs >= 602, "{kmallocs} kmallocs");
    assert!(
        kreallocs >= 10,
        "the vector grew by reallocation: {kreallocs}"
    );
    assert_eq!(
        kfrees, kmallocs,
        "the program freed everything it allocated"
    );
    assert!(
        trace
            .ops()
            .iter()
            .any(|o| matches!(o, Op::Krealloc { size, .. } if *size == 8 * 8192)),
        "the Vec<u64> grew to 8192 elements by doubling"
    );

    let m = Machine::boot(MachineConfig::x86_64(128 << 20)).unwrap();
    let mut r = Replayer::new(&m, &trace);
    let s = *r.run_to_end();
    assert_eq!(s.ops as usize, trace.len());
    assert_eq!(s.failures, 0);
    assert_eq!(s.live, 0);
    assert!(s.peak_live_bytes >= 8 * 5000, "{s:?}");
    m.validate().unwrap();
}
