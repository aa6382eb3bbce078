//! Workloads as data: a line-oriented trace of allocator calls, checked as a whole, and a
//! [`Replayer`] that runs it on a [`Machine`](crate::Machine) one operation at a time.
//!
//! # The format
//!
#![doc = include_str!("format.md")]
//!
//! # Use
//!
//! ```
//! use kmem_hosted::Machine;
//! use kmem_hosted::trace::{Replayer, Trace};
//!
//! let trace = Trace::parse("kmalloc a 64 GFP_KERNEL\nalloc_pages p 2 GFP_ATOMIC\nkfree a\n").unwrap();
//! let m = Machine::boot(kmem_hosted::MachineConfig::x86_64(64 << 20)).unwrap();
//! let mut r = Replayer::new(&m, &trace);
//! while let Some(step) = r.step() {
//!     // Between steps the machine can be looked at: m.proc("buddyinfo"), m.nr_free_pages()...
//!     let _ = (step.line, step.outcome);
//! }
//! assert_eq!(r.stats().ops, 3);
//! assert_eq!(r.stats().live, 1); // the pages are still allocated
//! r.release(); // frees what the trace left live
//! ```
//!
//! [`Trace::builtin`] generates the named workloads (`churn`, `fragment`, `slab-heavy`,
//! `vmalloc`) as traces, so they run through the same parser and replayer as a file; the
//! [recorder](crate::recorder) writes a real program's allocations in this format.

mod builtin;
mod replay;

use std::collections::HashMap;
use std::fmt;

use kmem::addr::MAX_PAGE_ORDER;
use kmem::cmdline::memparse;
use kmem::gfp::Gfp;
use kmem::slab::SlabFlags;

pub use builtin::BUILTINS;
pub use replay::{Outcome, Replayer, Stats, Step};

/// The format description (the text above), for `--help` texts.
pub const FORMAT: &str = include_str!("format.md");

/// An allocation's id in a trace: an index into [`Trace::id_name`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Id(pub u32);

/// A cache's id in a trace: an index into [`Trace::cache_name`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct CacheId(pub u32);

/// One operation of a trace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Op {
    /// `alloc_pages <id> <order> <gfp>`.
    AllocPages {
        /// The allocation.
        id: Id,
        /// `0..=MAX_PAGE_ORDER`.
        order: u32,
        /// The mask.
        gfp: Gfp,
    },
    /// `free_pages <id>`.
    FreePages {
        /// The allocation.
        id: Id,
    },
    /// `kmalloc <id> <size> <gfp>`.
    Kmalloc {
        /// The allocation.
        id: Id,
        /// Bytes.
        size: usize,
        /// The mask.
        gfp: Gfp,
    },
    /// `krealloc <id> <size> <gfp>`.
    Krealloc {
        /// The allocation (a live kmalloc).
        id: Id,
        /// New size in bytes.
        size: usize,
        /// The mask.
        gfp: Gfp,
    },
    /// `kfree <id>`.
    Kfree {
        /// The allocation.
        id: Id,
    },
    /// `vmalloc <id> <size>`.
    Vmalloc {
        /// The allocation.
        id: Id,
        /// Bytes.
        size: usize,
    },
    /// `vfree <id>`.
    Vfree {
        /// The allocation.
        id: Id,
    },
    /// `cache_create <name> <size> <align> <flags>`.
    CacheCreate {
        /// The cache.
        cache: CacheId,
        /// Object size.
        size: usize,
        /// Alignment (0: the default).
        align: usize,
        /// Flags.
        flags: SlabFlags,
    },
    /// `cache_alloc <id> <name> <gfp>`.
    CacheAlloc {
        /// The allocation.
        id: Id,
        /// The cache.
        cache: CacheId,
        /// The mask.
        gfp: Gfp,
    },
    /// `cache_free <id>`.
    CacheFree {
        /// The allocation (an object of a cache).
        id: Id,
    },
    /// `cache_destroy <name>`.
    CacheDestroy {
        /// The cache.
        cache: CacheId,
    },
}

impl Op {
    /// The op's name as written in a trace.
    pub fn name(&self) -> &'static str {
        match self {
            Op::AllocPages { .. } => "alloc_pages",
            Op::FreePages { .. } => "free_pages",
            Op::Kmalloc { .. } => "kmalloc",
            Op::Krealloc { .. } => "krealloc",
            Op::Kfree { .. } => "kfree",
            Op::Vmalloc { .. } => "vmalloc",
            Op::Vfree { .. } => "vfree",
            Op::CacheCreate { .. } => "cache_create",
            Op::CacheAlloc { .. } => "cache_alloc",
            Op::CacheFree { .. } => "cache_free",
            Op::CacheDestroy { .. } => "cache_destroy",
        }
    }

    /// True for the ops that allocate (and so may fail).
    pub fn allocates(&self) -> bool {
        matches!(
            self,
            Op::AllocPages { .. }
                | Op::Kmalloc { .. }
                | Op::Krealloc { .. }
                | Op::Vmalloc { .. }
                | Op::CacheCreate { .. }
                | Op::CacheAlloc { .. }
        )
    }
}

/// A malformed trace: the line (1-based) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError {
    /// The line, counted from 1.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for TraceError {}

/// A checked trace: operations with the line each came from, and the names of its ids and
/// caches. Made by [`Trace::parse`] or [`Trace::builtin`]; every trace is well formed (see
/// the [module docs](self)), so replaying it cannot meet a free of something not allocated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    ops: Vec<Op>,
    lines: Vec<u32>,
    ids: Vec<String>,
    caches: Vec<String>,
}

/// The slab flags a trace may name.
const SLAB_FLAG_NAMES: &[(&str, SlabFlags)] = &[
    ("SLAB_HWCACHE_ALIGN", SlabFlags::HWCACHE_ALIGN),
    ("SLAB_RECLAIM_ACCOUNT", SlabFlags::RECLAIM_ACCOUNT),
    ("SLAB_CACHE_DMA", SlabFlags::CACHE_DMA),
    ("SLAB_CACHE_DMA32", SlabFlags::CACHE_DMA32),
    ("SLAB_TYPESAFE_BY_RCU", SlabFlags::TYPESAFE_BY_RCU),
    ("SLAB_NO_MERGE", SlabFlags::NO_MERGE),
    ("SLAB_RED_ZONE", SlabFlags::RED_ZONE),
    ("SLAB_POISON", SlabFlags::POISON),
    ("SLAB_STORE_USER", SlabFlags::STORE_USER),
    ("SLAB_CONSISTENCY_CHECKS", SlabFlags::CONSISTENCY_CHECKS),
];

/// Longest cache name a trace may use (kmem keeps 31 characters and a NUL).
const MAX_CACHE_NAME: usize = kmem::slab::cache::NAME_LEN - 1;

fn parse_flags(s: &str) -> Result<SlabFlags, String> {
    let mut flags = 0;
    for part in s.split('|') {
        if let Some(&(_, f)) = SLAB_FLAG_NAMES.iter().find(|(n, _)| *n == part) {
            flags |= f.0;
        } else if let Ok((v, "")) = memparse(part) {
            let known = SLAB_FLAG_NAMES.iter().fold(0, |a, (_, f)| a | f.0);
            if v & !u64::from(known) != 0 {
                return Err(format!(
                    "flags {part}: bits {:#x} are not flags a trace may use",
                    v & !u64::from(known)
                ));
            }
            flags |= v as u32;
        } else {
            let names: Vec<&str> = SLAB_FLAG_NAMES.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "\"{part}\" is not a slab flag (expected 0 or {} joined by '|')",
                names.join(", ")
            ));
        }
    }
    Ok(SlabFlags(flags))
}

fn parse_bytes(what: &str, s: &str) -> Result<usize, String> {
    match memparse(s) {
        Ok((v, "")) => usize::try_from(v).map_err(|_| format!("{what} {s} is too large")),
        Ok((_, rest)) => Err(format!(
            "{what} \"{s}\": unexpected \"{rest}\" after the number (e.g. 4096, 0x1000, 4K)"
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// What a live id holds, while checking a trace.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pages,
    Kmalloc,
    Vmalloc,
    Object(CacheId),
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Kind::Pages => "pages (free it with free_pages)",
            Kind::Kmalloc => "a kmalloc allocation (free it with kfree)",
            Kind::Vmalloc => "a vmalloc area (free it with vfree)",
            Kind::Object(_) => "a cache object (free it with cache_free)",
        }
    }
}

struct Checker {
    trace: Trace,
    id_index: HashMap<String, Id>,
    cache_index: HashMap<String, CacheId>,
    live: Vec<Option<(Kind, u32)>>, // per id: what and since which line
    cache_live: Vec<Option<(u32, usize)>>, // per cache: created at line, live objects
}

impl Checker {
    fn id(&mut self, name: &str) -> Id {
        if let Some(&id) = self.id_index.get(name) {
            return id;
        }
        let id = Id(self.trace.ids.len() as u32);
        self.trace.ids.push(name.to_string());
        self.live.push(None);
        self.id_index.insert(name.to_string(), id);
        id
    }

    fn cache(&mut self, name: &str) -> CacheId {
        if let Some(&c) = self.cache_index.get(name) {
            return c;
        }
        let c = CacheId(self.trace.caches.len() as u32);
        self.trace.caches.push(name.to_string());
        self.cache_live.push(None);
        self.cache_index.insert(name.to_string(), c);
        c
    }

    /// An allocation into `name`, which must not be live.
    fn begin(&mut self, name: &str, kind: Kind, line: u32) -> Result<Id, String> {
        let id = self.id(name);
        if let Some((_, since)) = self.live[id.0 as usize] {
            return Err(format!(
                "id {name} is already live (allocated at line {since}); free it first"
            ));
        }
        self.live[id.0 as usize] = Some((kind, line));
        if let Kind::Object(c) = kind {
            if let Some(created) = &mut self.cache_live[c.0 as usize] {
                created.1 += 1;
            }
        }
        Ok(id)
    }

    /// A free (or `krealloc`, `end == false`) of `name`, which must be live and of `kind`.
    fn end(&mut self, name: &str, kind: Kind, end: bool) -> Result<Id, String> {
        let id = self.id_index.get(name).copied();
        let live = id.and_then(|id| self.live[id.0 as usize]);
        let Some((have, since)) = live else {
            return Err(format!(
                "id {name} is not live (never allocated, or already freed)"
            ));
        };
        let id = id.unwrap_or(Id(0));
        let same = match (have, kind) {
            (Kind::Object(_), Kind::Object(_)) => true,
            (a, b) => a == b,
        };
        if !same {
            return Err(format!(
                "id {name} is {}, allocated at line {since}",
                have.describe()
            ));
        }
        if end {
            self.live[id.0 as usize] = None;
            if let Kind::Object(c) = have {
                if let Some(created) = &mut self.cache_live[c.0 as usize] {
                    created.1 -= 1;
                }
            }
        }
        Ok(id)
    }

    fn existing_cache(&self, name: &str) -> Result<CacheId, String> {
        self.cache_index
            .get(name)
            .copied()
            .filter(|c| self.cache_live[c.0 as usize].is_some())
            .ok_or_else(|| format!("no cache {name} (create it with cache_create first)"))
    }

    fn parse_line(&mut self, fields: &[&str], line: u32) -> Result<Op, String> {
        let op = fields[0];
        let args = &fields[1..];
        let want = |n: usize, usage: &str| -> Result<(), String> {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "{op} takes {n} field{} ({op} {usage}), found {}",
                    if n == 1 { "" } else { "s" },
                    args.len()
                ))
            }
        };
        let gfp = |s: &str| Gfp::parse(s).map_err(|e| e.to_string());
        Ok(match op {
            "alloc_pages" => {
                want(3, "<id> <order> <gfp>")?;
                let order = args[1]
                    .parse::<u32>()
                    .ok()
                    .filter(|o| *o <= MAX_PAGE_ORDER)
                    .ok_or_else(|| format!("order \"{}\" is not 0 to {MAX_PAGE_ORDER}", args[1]))?;
                let gfp = gfp(args[2])?;
                let id = self.begin(args[0], Kind::Pages, line)?;
                Op::AllocPages { id, order, gfp }
            }
            "free_pages" => {
                want(1, "<id>")?;
                Op::FreePages {
                    id: self.end(args[0], Kind::Pages, true)?,
                }
            }
            "kmalloc" | "krealloc" => {
                want(3, "<id> <size> <gfp>")?;
                let size = parse_bytes("size", args[1])?;
                let gfp = gfp(args[2])?;
                if op == "kmalloc" {
                    let id = self.begin(args[0], Kind::Kmalloc, line)?;
                    Op::Kmalloc { id, size, gfp }
                } else {
                    let id = self.end(args[0], Kind::Kmalloc, false)?;
                    Op::Krealloc { id, size, gfp }
                }
            }
            "kfree" => {
                want(1, "<id>")?;
                Op::Kfree {
                    id: self.end(args[0], Kind::Kmalloc, true)?,
                }
            }
            "vmalloc" => {
                want(2, "<id> <size>")?;
                let size = parse_bytes("size", args[1])?;
                let id = self.begin(args[0], Kind::Vmalloc, line)?;
                Op::Vmalloc { id, size }
            }
            "vfree" => {
                want(1, "<id>")?;
                Op::Vfree {
                    id: self.end(args[0], Kind::Vmalloc, true)?,
                }
            }
            "cache_create" => {
                want(4, "<name> <size> <align> <flags>")?;
                let name = args[0];
                if name.len() > MAX_CACHE_NAME
                    || !name
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"_-.:".contains(&c))
                {
                    return Err(format!(
                        "cache name \"{name}\": use at most {MAX_CACHE_NAME} letters, digits, \
                         '_', '-', '.' or ':'"
                    ));
                }
                let size = parse_bytes("size", args[1])?;
                let align = parse_bytes("align", args[2])?;
                if align != 0 && !align.is_power_of_two() {
                    return Err(format!("align {align} is not 0 or a power of two"));
                }
                let flags = parse_flags(args[3])?;
                let cache = self.cache(name);
                if let Some((since, _)) = self.cache_live[cache.0 as usize] {
                    return Err(format!(
                        "cache {name} already exists (created at line {since})"
                    ));
                }
                self.cache_live[cache.0 as usize] = Some((line, 0));
                Op::CacheCreate {
                    cache,
                    size,
                    align,
                    flags,
                }
            }
            "cache_alloc" => {
                want(3, "<id> <name> <gfp>")?;
                let cache = self.existing_cache(args[1])?;
                let gfp = gfp(args[2])?;
                let id = self.begin(args[0], Kind::Object(cache), line)?;
                Op::CacheAlloc { id, cache, gfp }
            }
            "cache_free" => {
                want(1, "<id>")?;
                Op::CacheFree {
                    id: self.end(args[0], Kind::Object(CacheId(0)), true)?,
                }
            }
            "cache_destroy" => {
                want(1, "<name>")?;
                let cache = self.existing_cache(args[0])?;
                if let Some((_, n)) = self.cache_live[cache.0 as usize].filter(|c| c.1 > 0) {
                    let (id, since) = self
                        .live
                        .iter()
                        .enumerate()
                        .find_map(|(i, l)| match l {
                            Some((Kind::Object(c), since)) if *c == cache => Some((i, *since)),
                            _ => None,
                        })
                        .unwrap_or((0, 0));
                    return Err(format!(
                        "cache {} still has {n} live object{} (e.g. id {} from line {since}); \
                         free them with cache_free first",
                        args[0],
                        if n == 1 { "" } else { "s" },
                        self.trace.ids[id]
                    ));
                }
                self.cache_live[cache.0 as usize] = None;
                Op::CacheDestroy { cache }
            }
            _ => {
                return Err(format!(
                    "unknown op \"{op}\" (expected alloc_pages, free_pages, kmalloc, krealloc, \
                     kfree, vmalloc, vfree, cache_create, cache_alloc, cache_free or \
                     cache_destroy)"
                ));
            }
        })
    }
}

impl Trace {
    /// Parses and checks a trace (see the [module docs](self) for the format).
    ///
    /// # Errors
    ///
    /// The first malformed line: unknown op, wrong number of fields, bad number, mask or
    /// flags, an id allocated while live or freed while not live or with the wrong op, an
    /// unknown or duplicate cache, a cache destroyed with live objects.
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut c = Checker {
            trace: Trace::default(),
            id_index: HashMap::new(),
            cache_index: HashMap::new(),
            live: Vec::new(),
            cache_live: Vec::new(),
        };
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split_once('#').map_or(raw, |(c, _)| c);
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            let line32 = u32::try_from(line).map_err(|_| TraceError {
                line,
                message: "a trace may have at most 4294967295 lines".to_string(),
            })?;
            let op = c
                .parse_line(&fields, line32)
                .map_err(|message| TraceError { line, message })?;
            c.trace.ops.push(op);
            c.trace.lines.push(line32);
        }
        Ok(c.trace)
    }

    /// A built-in workload by name (see [`BUILTINS`]), generated as a trace.
    pub fn builtin(name: &str) -> Option<Trace> {
        let text = builtin::generate(name)?;
        Some(Trace::parse(&text).expect("built-in workloads are well formed"))
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when the trace has no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The source line of operation `index` (1-based).
    pub fn line(&self, index: usize) -> usize {
        self.lines[index] as usize
    }

    /// The name an id was written with.
    pub fn id_name(&self, id: Id) -> &str {
        &self.ids[id.0 as usize]
    }

    /// Number of distinct ids.
    pub fn nr_ids(&self) -> usize {
        self.ids.len()
    }

    /// The name a cache was written with.
    pub fn cache_name(&self, c: CacheId) -> &str {
        &self.caches[c.0 as usize]
    }

    /// Number of distinct caches.
    pub fn nr_caches(&self) -> usize {
        self.caches.len()
    }

    /// Operation `index` written as a trace line.
    pub fn display_op(&self, index: usize) -> impl fmt::Display + '_ {
        OpLine {
            trace: self,
            op: self.ops[index],
        }
    }
}

struct OpLine<'a> {
    trace: &'a Trace,
    op: Op,
}

impl fmt::Display for OpLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.trace;
        let name = self.op.name();
        match self.op {
            Op::AllocPages { id, order, gfp } => {
                write!(f, "{name} {} {order} {gfp}", t.id_name(id))
            }
            Op::Kmalloc { id, size, gfp } | Op::Krealloc { id, size, gfp } => {
                write!(f, "{name} {} {size} {gfp}", t.id_name(id))
            }
            Op::Vmalloc { id, size } => write!(f, "{name} {} {size}", t.id_name(id)),
            Op::FreePages { id } | Op::Kfree { id } | Op::Vfree { id } | Op::CacheFree { id } => {
                write!(f, "{name} {}", t.id_name(id))
            }
            Op::CacheCreate {
                cache,
                size,
                align,
                flags,
            } => {
                write!(f, "{name} {} {size} {align} ", t.cache_name(cache))?;
                if flags.0 == 0 {
                    return f.write_str("0");
                }
                let mut first = true;
                for (n, fl) in SLAB_FLAG_NAMES {
                    if flags.contains(*fl) {
                        f.write_str(if first { "" } else { "|" })?;
                        f.write_str(n)?;
                        first = false;
                    }
                }
                Ok(())
            }
            Op::CacheAlloc { id, cache, gfp } => {
                write!(f, "{name} {} {} {gfp}", t.id_name(id), t.cache_name(cache))
            }
            Op::CacheDestroy { cache } => write!(f, "{name} {}", t.cache_name(cache)),
        }
    }
}

impl fmt::Display for Trace {
    /// The trace in its text form, one op per line (comments and blank lines dropped):
    /// parsing it gives the same operations.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for i in 0..self.ops.len() {
            writeln!(f, "{}", self.display_op(i))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
