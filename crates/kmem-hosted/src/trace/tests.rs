use super::*;
use crate::{Machine, MachineConfig};
use kmem::gfp::*;

fn err(text: &str) -> TraceError {
    Trace::parse(text).expect_err("malformed")
}

/// Free pages once the per-CPU lists are drained and every cache has given back its empty
/// slabs.
fn settled_free_pages(m: &Machine) -> usize {
    let mut names = Vec::new();
    m.slab()
        .for_each_cache(|c| names.push(c.name().to_string()));
    for n in names {
        if let Some(c) = m.slab().find_cache(&n) {
            m.kmem_cache_shrink(c);
        }
    }
    m.drain_all_pages();
    m.nr_free_pages()
}

fn machine(cmdline: &str) -> Machine {
    let cfg = MachineConfig::x86_64(256 << 20)
        .with_cpus(2)
        .with_cmdline(cmdline)
        .unwrap();
    Machine::boot(cfg).unwrap()
}

const ALL_OPS: &str = "\
# every op once
cache_create skbuff_head 232 0 SLAB_HWCACHE_ALIGN|SLAB_RECLAIM_ACCOUNT
cache_alloc  skb1 skbuff_head GFP_ATOMIC   # trailing comment
kmalloc\tdata1\t2K\tGFP_ATOMIC|__GFP_NOWARN

alloc_pages  frag1 2 GFP_ATOMIC|__GFP_COMP
vmalloc      area 0x10000
krealloc     data1 4096 GFP_KERNEL
kfree        data1
cache_free   skb1
free_pages   frag1
vfree        area
cache_destroy skbuff_head
";

#[test]
fn parses_every_op() {
    let t = Trace::parse(ALL_OPS).unwrap();
    assert_eq!(t.len(), 11);
    assert_eq!(t.line(0), 2);
    assert_eq!(t.line(3), 6, "blank lines and comments count as lines");
    assert_eq!(
        t.ops()[1],
        Op::CacheAlloc {
            id: Id(0),
            cache: CacheId(0),
            gfp: GFP_ATOMIC
        }
    );
    assert_eq!(
        t.ops()[2],
        Op::Kmalloc {
            id: Id(1),
            size: 2048,
            gfp: GFP_ATOMIC | __GFP_NOWARN
        }
    );
    assert_eq!(
        t.ops()[3],
        Op::AllocPages {
            id: Id(2),
            order: 2,
            gfp: GFP_ATOMIC | __GFP_COMP
        }
    );
    assert_eq!(
        t.ops()[4],
        Op::Vmalloc {
            id: Id(3),
            size: 65536
        }
    );
    assert_eq!(
        t.ops()[0],
        Op::CacheCreate {
            cache: CacheId(0),
            size: 232,
            align: 0,
            flags: kmem::slab::SlabFlags(
                kmem::slab::SlabFlags::HWCACHE_ALIGN.0 | kmem::slab::SlabFlags::RECLAIM_ACCOUNT.0
            )
        }
    );
    assert_eq!(t.id_name(Id(1)), "data1");
    assert_eq!(t.cache_name(CacheId(0)), "skbuff_head");
    // The text form reads back as the same trace.
    let text = t.to_string();
    assert!(text.starts_with(
        "cache_create skbuff_head 232 0 SLAB_HWCACHE_ALIGN|SLAB_RECLAIM_ACCOUNT\n\
         cache_alloc skb1 skbuff_head GFP_ATOMIC\n\
         kmalloc data1 2048 GFP_ATOMIC|__GFP_NOWARN\n"
    ));
    assert_eq!(Trace::parse(&text).unwrap().ops(), t.ops());
    assert!(Trace::parse("").unwrap().is_empty());
    assert!(Trace::parse("# nothing\n\n   \n").unwrap().is_empty());
}

#[test]
fn ids_may_be_reused_after_a_free() {
    let t =
        Trace::parse("kmalloc a 8 GFP_KERNEL\nkfree a\nalloc_pages a 0 GFP_KERNEL\nfree_pages a\n")
            .unwrap();
    assert_eq!(t.nr_ids(), 1);
}

#[test]
fn malformed_lines_are_named() {
    let cases: &[(&str, usize, &str)] = &[
        ("kmallok a 8 GFP_KERNEL", 1, "unknown op \"kmallok\""),
        (
            "\n\nkmalloc a 8",
            3,
            "kmalloc takes 3 fields (kmalloc <id> <size> <gfp>), found 2",
        ),
        ("kfree a b", 1, "kfree takes 1 field (kfree <id>), found 2"),
        (
            "kmalloc a lots GFP_KERNEL",
            1,
            "size: number \"lots\" is not a number",
        ),
        (
            "kmalloc a 8Q GFP_KERNEL",
            1,
            "size \"8Q\": unexpected \"Q\"",
        ),
        (
            "kmalloc a 8 GFP_KERNAL",
            1,
            "\"GFP_KERNAL\" is not a GFP flag",
        ),
        (
            "alloc_pages a 11 GFP_KERNEL",
            1,
            "order \"11\" is not 0 to 10",
        ),
        (
            "alloc_pages a -1 GFP_KERNEL",
            1,
            "order \"-1\" is not 0 to 10",
        ),
        (
            "kmalloc a 8 GFP_KERNEL\nkmalloc a 8 GFP_KERNEL",
            2,
            "id a is already live (allocated at line 1)",
        ),
        ("kfree a", 1, "id a is not live"),
        (
            "kmalloc a 8 GFP_KERNEL\nkfree a\nkfree a",
            3,
            "id a is not live",
        ),
        (
            "alloc_pages a 0 GFP_KERNEL\nkfree a",
            2,
            "id a is pages (free it with free_pages), allocated at line 1",
        ),
        (
            "kmalloc a 8 GFP_KERNEL\nvfree a",
            2,
            "id a is a kmalloc allocation (free it with kfree)",
        ),
        (
            "vmalloc a 8\ncache_free a",
            2,
            "id a is a vmalloc area (free it with vfree)",
        ),
        ("krealloc a 8 GFP_KERNEL", 1, "id a is not live"),
        (
            "vmalloc a 4096\nkrealloc a 8 GFP_KERNEL",
            2,
            "id a is a vmalloc area",
        ),
        (
            "cache_alloc a nosuch GFP_KERNEL",
            1,
            "no cache nosuch (create it with cache_create first)",
        ),
        (
            "cache_create c 64 0 0\ncache_create c 64 0 0",
            2,
            "cache c already exists (created at line 1)",
        ),
        (
            "cache_create c 64 0 SLAB_PANIC",
            1,
            "\"SLAB_PANIC\" is not a slab flag",
        ),
        (
            "cache_create c 64 0 0x40000",
            1,
            "bits 0x40000 are not flags a trace may use",
        ),
        (
            "cache_create c 64 3 0",
            1,
            "align 3 is not 0 or a power of two",
        ),
        ("cache_create c/d 64 0 0", 1, "cache name \"c/d\""),
        (
            "cache_create abcdefghijabcdefghijabcdefghij_xx 64 0 0",
            1,
            "at most 31",
        ),
        (
            "cache_create c 64 0 0\ncache_alloc o c GFP_KERNEL\ncache_destroy c",
            3,
            "cache c still has 1 live object (e.g. id o from line 2)",
        ),
        (
            "cache_create c 64 0 0\ncache_destroy c\ncache_alloc o c GFP_KERNEL",
            3,
            "no cache c",
        ),
        ("cache_destroy c", 1, "no cache c"),
    ];
    for (text, line, msg) in cases {
        let e = err(text);
        assert_eq!(e.line, *line, "{text:?}: {e}");
        assert!(e.message.contains(msg), "{text:?}: {e}");
        assert!(e.to_string().starts_with(&format!("line {line}: ")));
    }
}

#[test]
fn replays_and_counts() {
    let m = machine("");
    let free0 = settled_free_pages(&m);
    let t = Trace::parse(ALL_OPS).unwrap();
    let mut r = Replayer::new(&m, &t);
    let steps: Vec<Step> = r.by_ref().collect();
    assert_eq!(steps.len(), 11);
    assert!(
        steps.iter().all(|s| s.outcome == Outcome::Done),
        "{steps:?}"
    );
    assert_eq!(steps[5].line, 8);
    let s = *r.stats();
    assert_eq!((s.ops, s.allocs, s.frees, s.failures), (11, 6, 5, 0));
    assert_eq!(s.live, 0);
    assert_eq!(s.live_bytes, 0);
    // skb 232 + 2048 + 16 KiB of pages + 64 KiB of vmalloc, then the krealloc to 4096.
    assert_eq!(s.peak_live_bytes, 232 + 4096 + 16384 + 65536);
    assert!(s.peak_pages_in_use >= 4 + 16, "{s:?}");
    assert!(r.finished());
    assert!(r.step().is_none());
    drop(r);
    m.validate().unwrap();
    assert_eq!(settled_free_pages(&m), free0, "everything came back");
}

#[test]
fn failures_are_counted_and_their_frees_do_nothing() {
    let m = machine("failslab=1,100,0,-1");
    let t = Trace::parse(
        "kmalloc a 64 GFP_ATOMIC\nkmalloc b 64 GFP_KERNEL\nkfree a\nkfree b\n\
         kmalloc c 64 GFP_ATOMIC\nkrealloc c 128 GFP_ATOMIC\nkfree c\n",
    )
    .unwrap();
    let mut r = Replayer::new(&m, &t);
    let outcomes: Vec<Outcome> = r.by_ref().map(|s| s.outcome).collect();
    use Outcome::*;
    assert_eq!(
        outcomes,
        [Failed, Done, Nothing, Done, Failed, Failed, Nothing],
        "failslab spares GFP_KERNEL by default"
    );
    let s = r.stats();
    assert_eq!(s.failures, 3);
    assert_eq!(s.failed_kmalloc, 3);
    assert_eq!(m.faults().failslab.attr.injected(), 3);
}

#[test]
fn krealloc_failure_keeps_the_old_block() {
    let m = machine("");
    // 8 MiB is above KMALLOC_MAX_SIZE: the krealloc fails and the 64 bytes stay live.
    let t =
        Trace::parse("kmalloc a 64 GFP_KERNEL\nkrealloc a 8M GFP_KERNEL|__GFP_NOWARN\n").unwrap();
    let mut r = Replayer::new(&m, &t);
    r.run_to_end();
    assert_eq!(r.stats().failures, 1);
    assert_eq!(r.stats().live, 1);
    assert_eq!(r.stats().live_bytes, 64);
    r.release();
    assert_eq!(r.stats().live, 0);
    m.validate().unwrap();
}

#[test]
fn release_frees_what_the_trace_left() {
    let m = machine("");
    let free0 = settled_free_pages(&m);
    let t = Trace::parse(
        "alloc_pages a 3 GFP_KERNEL\nvmalloc v 1M\ncache_create c 100 0 SLAB_NO_MERGE\n\
         cache_alloc o c GFP_KERNEL\nkmalloc k 20000 GFP_KERNEL\n",
    )
    .unwrap();
    let mut r = Replayer::new(&m, &t);
    r.run_to_end();
    assert_eq!(r.stats().live, 4);
    assert!(m.slab().find_cache("c").is_some());
    r.release();
    assert_eq!(r.position(), 0);
    assert!(m.slab().find_cache("c").is_none(), "the cache is destroyed");
    assert_eq!(settled_free_pages(&m), free0);
    // Replaying again after a release works the same.
    r.run_to_end();
    assert_eq!(r.stats().live, 4);
    r.release();
    m.validate().unwrap();
}

#[test]
fn builtins_parse_replay_and_leave_what_they_say() {
    let m = machine("");
    for (name, _) in BUILTINS {
        let t = Trace::builtin(name).unwrap();
        assert!(t.len() > 1000, "{name}: {} ops", t.len());
        let again = Trace::builtin(name).unwrap();
        assert_eq!(t.ops(), again.ops(), "{name} is deterministic");
        let mut r = Replayer::new(&m, &t);
        let s = *r.run_to_end();
        assert_eq!(s.ops as usize, t.len());
        assert_eq!(s.failures, 0, "{name} on 256 MiB: {s:?}");
        match *name {
            "churn" | "vmalloc" => assert_eq!(s.live, 0, "{name}"),
            "fragment" => {
                assert_eq!(s.live, 8192);
                assert_eq!(s.live_bytes, 8192 * 4096);
            }
            "slab-heavy" => assert_eq!(s.live, 3000),
            other => panic!("untested builtin {other}"),
        }
        assert!(s.peak_pages_in_use > 0);
        r.release();
        m.validate().unwrap();
    }
    assert!(Trace::builtin("nope").is_none());
}
