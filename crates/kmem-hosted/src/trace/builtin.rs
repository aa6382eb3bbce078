//! Built-in workloads, generated as trace text (deterministic: the same text every time).

use std::fmt::Write;

/// The built-in workloads: name and what each does.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "churn",
        "30 000 kmalloc/kfree/krealloc calls, 8 B to 64 KiB, up to 3 000 live; 80% GFP_KERNEL, \
         20% GFP_ATOMIC or GFP_NOWAIT; frees everything at the end",
    ),
    (
        "fragment",
        "pins every other page of 64 MiB of order-0 pages, then asks for order-3 and order-4 \
         blocks without sleeping; leaves the 32 MiB of pinned pages allocated",
    ),
    (
        "slab-heavy",
        "four caches (dentry, inode_cache, buffer_head, task_struct sizes) and 12 000 objects, \
         three quarters freed in random order; leaves the caches and a quarter of the objects",
    ),
    (
        "vmalloc",
        "600 vmalloc/vfree calls of 4 KiB to 4 MiB, up to 64 live, with kmalloc'd \
         bookkeeping; frees everything at the end",
    ),
];

/// splitmix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// True with `percent` percent.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Takes a random element out of `v` (order not kept).
    fn take<T>(&mut self, v: &mut Vec<T>) -> Option<T> {
        if v.is_empty() {
            return None;
        }
        let i = self.below(v.len() as u64) as usize;
        Some(v.swap_remove(i))
    }
}

/// The text of built-in workload `name`.
pub(super) fn generate(name: &str) -> Option<String> {
    let mut t = String::new();
    match name {
        "churn" => churn(&mut t),
        "fragment" => fragment(&mut t),
        "slab-heavy" => slab_heavy(&mut t),
        "vmalloc" => vmalloc(&mut t),
        _ => return None,
    }
    Some(t)
}

// `write!` into a `String` cannot fail.
macro_rules! line {
    ($t:expr, $($arg:tt)*) => {
        let _ = writeln!($t, $($arg)*);
    };
}

fn churn(t: &mut String) {
    let mut r = Rng(0xc4a1);
    line!(t, "# builtin:churn: kmalloc churn of a busy server");
    let mut live: Vec<(u64, u64)> = Vec::new(); // (id, size)
    let mut next = 0u64;
    for _ in 0..30_000 {
        let roll = r.below(100);
        if live.len() < 3000 && (roll < 55 || live.is_empty()) {
            let size = match r.below(100) {
                0..60 => 8 + r.below(249),
                60..90 => 256 + r.below(1793),
                90..98 => 2048 + r.below(6145),
                _ => 8192 + r.below(57345),
            };
            let gfp = match r.below(100) {
                0..80 => "GFP_KERNEL",
                80..95 => "GFP_ATOMIC",
                _ => "GFP_NOWAIT|__GFP_NOWARN",
            };
            let zero = if r.chance(20) { "|__GFP_ZERO" } else { "" };
            line!(t, "kmalloc k{next} {size} {gfp}{zero}");
            live.push((next, size));
            next += 1;
        } else if roll < 60 {
            let i = r.below(live.len() as u64) as usize;
            let size = (live[i].1 * 2).min(64 << 10);
            line!(t, "krealloc k{} {size} GFP_KERNEL", live[i].0);
            live[i].1 = size;
        } else if let Some((id, _)) = r.take(&mut live) {
            line!(t, "kfree k{id}");
        }
    }
    while let Some((id, _)) = r.take(&mut live) {
        line!(t, "kfree k{id}");
    }
}

fn fragment(t: &mut String) {
    let mut r = Rng(0xf4a9);
    line!(
        t,
        "# builtin:fragment: pin every other page, then ask for blocks"
    );
    const PAGES: u32 = 16384;
    for i in 0..PAGES {
        line!(t, "alloc_pages p{i} 0 GFP_NOWAIT|__GFP_NOWARN");
    }
    for i in (1..PAGES).step_by(2) {
        line!(t, "free_pages p{i}");
    }
    let mut blocks = Vec::new();
    for i in 0..256 {
        let order = if r.chance(50) { 3 } else { 4 };
        line!(
            t,
            "alloc_pages b{i} {order} GFP_ATOMIC|__GFP_NOWARN|__GFP_COMP"
        );
        blocks.push(i);
    }
    while let Some(i) = r.take(&mut blocks) {
        line!(t, "free_pages b{i}");
    }
}

fn slab_heavy(t: &mut String) {
    let mut r = Rng(0x51ab);
    line!(t, "# builtin:slab-heavy: lookaside caches under load");
    let caches = [
        ("dentry", 192, 0, "SLAB_RECLAIM_ACCOUNT"),
        (
            "inode_cache",
            600,
            0,
            "SLAB_HWCACHE_ALIGN|SLAB_RECLAIM_ACCOUNT",
        ),
        ("buffer_head", 104, 0, "SLAB_RECLAIM_ACCOUNT"),
        ("task_struct", 3200, 64, "SLAB_HWCACHE_ALIGN"),
    ];
    for (name, size, align, flags) in caches {
        line!(t, "cache_create {name} {size} {align} {flags}");
    }
    let mut live = Vec::new();
    for i in 0..12_000u32 {
        let c = match r.below(100) {
            0..40 => 0,
            40..65 => 1,
            65..95 => 2,
            _ => 3,
        };
        let gfp = if r.chance(10) {
            "GFP_ATOMIC"
        } else {
            "GFP_KERNEL"
        };
        line!(t, "cache_alloc o{i} {} {gfp}", caches[c].0);
        live.push(i);
    }
    for _ in 0..9_000 {
        if let Some(i) = r.take(&mut live) {
            line!(t, "cache_free o{i}");
        }
    }
}

fn vmalloc(t: &mut String) {
    let mut r = Rng(0x7a11);
    line!(t, "# builtin:vmalloc: virtually contiguous buffers");
    let mut live: Vec<u32> = Vec::new();
    for i in 0..600u32 {
        if live.len() < 64 && (live.is_empty() || r.chance(55)) {
            let size = 4096u64 << r.below(11); // 4 KiB .. 4 MiB
            let size = size - r.below(size / 2);
            line!(t, "vmalloc v{i} {size}");
            line!(t, "kmalloc m{i} 64 GFP_KERNEL");
            live.push(i);
        } else if let Some(j) = r.take(&mut live) {
            line!(t, "kfree m{j}");
            line!(t, "vfree v{j}");
        }
    }
    while let Some(j) = r.take(&mut live) {
        line!(t, "kfree m{j}");
        line!(t, "vfree v{j}");
    }
}
