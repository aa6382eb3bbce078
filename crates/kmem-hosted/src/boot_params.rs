//! Booting a [`MachineConfig`] with a kernel command line.
//!
//! [`MachineConfig::with_cmdline`] reads the line as Linux's `parse_args` does (parameters
//! separated by spaces, double quotes, `-` and `_` equal in names, `--` ending the kernel's
//! part), parses each memory-management parameter with [`kmem::cmdline::parse_param`], and
//! maps it onto the machine:
//!
//! | parameter | effect |
//! |---|---|
//! | `mem=nn[KMG]` | RAM above physical address `nn` is removed from the memory map (x86's e820 trim) |
//! | `memmap=nn@ss` | `[ss, ss+nn)` is added as RAM |
//! | `memmap=nn$ss`, `nn!ss`, `nn#ss` | `[ss, ss+nn)` is reserved, protected or ACPI data: not RAM |
//! | `memmap=nn`, `memmap=exactmap` | as `mem=nn`; forget the firmware's map |
//! | `nr_cpus=n` | at most `n` CPUs (0, or more than the machine has: ignored, as in Linux) |
//! | `vmalloc=nn[KMG]` | the vmalloc range's size (Linux takes it on 32-bit x86 only) |
//! | `slab_nomerge`, `slab_merge` | [`Config::slab_merge`](kmem::config::Config::slab_merge) |
//! | `init_on_alloc=`, `init_on_free=` | zero pages as they are allocated / freed |
//! | `failslab=`, `fail_page_alloc=` | fault injection ([`kmem::fault`]) |
//! | `sysctl.vm.min_free_kbytes=n`, `min_free_kbytes=n` | the watermarks' base |
//! | `kmem_reserve=name:size[@align]` | a boot buffer ([`MachineConfig::boot_buffers`]) |
//! | `slab_debug=`/`slub_debug=`, `page_poison=`, `debug_pagealloc=` | parsed and validated, kept in [`BootParams`], and logged as accepted but not built in: kmem has no slab debugging, page poisoning or page unmapping |
//!
//! Parameters Linux knows but that concern nothing kmem models (`console=`, `quiet`,
//! `root=`, module parameters such as `usbcore.autosuspend=1`, ...) are accepted and listed
//! in one log line. Anything else is unknown: as Linux, the boot log says `Unknown kernel
//! command line parameters "foo=1 bar", will be passed to user space.` (parameters with a
//! value first, then those without). A malformed value of a known parameter is an error.
//!
//! The lines a kernel prints while taking its command line (`Kernel command line: ...`, the
//! `e820: remove` and `user-defined physical RAM map:` lines of `mem=`/`memmap=`, the
//! `mem auto-init:` summary, ...) are kept in [`BootParams::log`] and written to the
//! machine's log first thing at boot.

use std::fmt;

use kmem::addr::PAGE_SIZE;
use kmem::cmdline::{Memmap, Param, SlubDebug, memmap_entries, params, parse_param};

use crate::machine::MachineConfig;

/// A command line a machine was configured with, and what it asked for that the machine's
/// fields do not hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootParams {
    /// The command line as given.
    pub cmdline: String,
    /// `slab_debug=`/`slub_debug=` as given: `Some(None)` for the parameter without a value
    /// (full debugging), `Some(Some(v))` with one. Validated; not acted on (see the module
    /// docs).
    pub slub_debug: Option<Option<String>>,
    /// `page_poison=`, if given (not acted on).
    pub page_poison: Option<bool>,
    /// `debug_pagealloc=`, if given (not acted on).
    pub debug_pagealloc: Option<bool>,
    /// Parameters kmem does not know, as written: Linux passes them to user space.
    pub unknown: Vec<String>,
    /// Parameters a kernel knows that kmem does not model, as written.
    pub not_modelled: Vec<String>,
    /// What follows `--`: the init process's arguments.
    pub init_args: Vec<String>,
    log: Vec<String>,
}

impl BootParams {
    /// The lines the kernel logs while taking the command line, in order.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// The parsed `slab_debug=` parameter, if given.
    pub fn slub_debug(&self) -> Option<SlubDebug<'_>> {
        self.slub_debug
            .as_ref()
            .map(|v| SlubDebug::new(v.as_deref()))
    }
}

/// A command line that cannot be booted: a malformed value, or a memory map left empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdlineError(String);

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CmdlineError {}

/// What an e820 range holds, for the `user-defined physical RAM map:` listing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum E820 {
    Ram,
    Reserved,
    Acpi,
    Protected,
}

impl E820 {
    fn name(self) -> &'static str {
        match self {
            E820::Ram => "usable",
            E820::Reserved => "reserved",
            E820::Acpi => "ACPI data",
            E820::Protected => "persistent (type 12)",
        }
    }
}

/// `[start, end)` ranges of RAM, kept sorted and merged.
fn add_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    ranges.push((start, end));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    *ranges = merged;
}

/// Removes `[start, end)` from `ranges`.
fn remove_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    *ranges = ranges
        .iter()
        .flat_map(|&(s, e)| {
            let mut parts = Vec::new();
            if s < start.min(e) {
                parts.push((s, start.min(e)));
            }
            if end.max(s) < e {
                parts.push((end.max(s), e));
            }
            parts
        })
        .collect();
}

impl MachineConfig {
    /// This machine booted with kernel command line `cmdline`: the parameters are parsed and
    /// mapped onto the configuration (see the [module docs](self) for the table), and
    /// [`MachineConfig::boot_params`] keeps the line, what is not acted on, and the log lines
    /// the machine prints first at boot.
    ///
    /// ```
    /// use kmem_hosted::MachineConfig;
    /// let cfg = MachineConfig::x86_64(2 << 30)
    ///     .with_cmdline("mem=1G slab_nomerge init_on_free=1 foo=bar")
    ///     .unwrap();
    /// assert_eq!(cfg.ram_bytes(), 1 << 30);
    /// assert!(!cfg.kmem.slab_merge && cfg.kmem.init_on_free);
    /// let bp = cfg.boot_params.as_ref().unwrap();
    /// assert_eq!(bp.unknown, ["foo=bar"]);
    /// assert!(MachineConfig::default().with_cmdline("mem=lots").is_err());
    /// ```
    ///
    /// # Errors
    ///
    /// A known parameter with a missing or malformed value (the message names it and says
    /// what was expected), or a memory map with no RAM left.
    pub fn with_cmdline(mut self, cmdline: &str) -> Result<MachineConfig, CmdlineError> {
        let mut bp = BootParams {
            cmdline: cmdline.to_string(),
            ..BootParams::default()
        };
        let mut log = vec![format!("Kernel command line: {cmdline}")];
        let mut ram: Vec<(u64, u64)> = Vec::new();
        for &(b, s) in &self.ram {
            add_range(&mut ram, b, b.saturating_add(s));
        }
        let mut other: Vec<(u64, u64, E820)> = Vec::new();
        let mut userdef = false;
        let mut notes: Vec<String> = Vec::new();
        let mut unknown_env: Vec<String> = Vec::new();
        let mut unknown_argv: Vec<String> = Vec::new();
        let mut it = params(cmdline);
        let written = |name: &str, value: Option<&str>| match value {
            Some(v) => format!("{name}={v}"),
            None => name.to_string(),
        };
        let trim_above = |ram: &mut Vec<(u64, u64)>, log: &mut Vec<String>, limit: u64| {
            log.push(format!(
                "e820: remove [mem {limit:#010x}-{:#010x}] usable",
                u64::MAX - 1
            ));
            remove_range(ram, limit, u64::MAX);
        };
        for (name, value) in it.by_ref() {
            if name == "--" && value.is_none() {
                break;
            }
            let param = parse_param(name, value).map_err(|e| CmdlineError(e.to_string()))?;
            let Some(param) = param else {
                // `unknown_bootoption`: with a value to init's environment, else its argv.
                match value {
                    Some(_) => unknown_env.push(written(name, value)),
                    None => unknown_argv.push(name.to_string()),
                }
                continue;
            };
            match param {
                Param::Mem(limit) => {
                    userdef = true;
                    trim_above(&mut ram, &mut log, limit);
                }
                Param::Memmap(v) => {
                    userdef = true;
                    for e in memmap_entries(v) {
                        match e.map_err(|e| CmdlineError(format!("{name}={v}: {e}")))? {
                            Memmap::Exactmap => {
                                ram.clear();
                                other.clear();
                            }
                            Memmap::Limit(limit) => trim_above(&mut ram, &mut log, limit),
                            Memmap::Ram { start, size } => add_range(&mut ram, start, start + size),
                            Memmap::Reserved { start, size } => {
                                other.push((start, start + size, E820::Reserved))
                            }
                            Memmap::Acpi { start, size } => {
                                other.push((start, start + size, E820::Acpi))
                            }
                            Memmap::Protected { start, size } => {
                                other.push((start, start + size, E820::Protected))
                            }
                        }
                    }
                }
                Param::NrCpus(n) => {
                    if n > 0 && n < self.nr_cpus as u64 {
                        self.nr_cpus = n as usize;
                    }
                }
                Param::Vmalloc(size) => {
                    self.vmalloc_size = size.next_multiple_of(PAGE_SIZE as u64);
                }
                Param::SlabMerge(on) => self.kmem.slab_merge = on,
                Param::SlubDebug(d) => {
                    for b in d.blocks() {
                        for c in b.unknown_options() {
                            notes.push(format!("slab_debug option '{c}' unknown. skipped"));
                        }
                    }
                    let mut parts: Vec<String> = d
                        .blocks()
                        .filter_map(|b| Some(format!("{} on {}", b.flags, b.slabs?)))
                        .collect();
                    let global = d.global();
                    if !global.is_empty() || parts.is_empty() {
                        let every = if parts.is_empty() {
                            "every"
                        } else {
                            "every other"
                        };
                        parts.push(format!("{global} on {every} cache"));
                    }
                    let what = parts.join(", ");
                    notes.push(format!(
                        "{}: accepted ({what}), but kmem has no slab debugging built in \
                         (no consistency checks, red zones, poisoning, user tracking or \
                         tracing): ignored",
                        written(name, value)
                    ));
                    bp.slub_debug = Some(value.map(str::to_string));
                }
                Param::InitOnAlloc(on) => self.kmem.init_on_alloc = on,
                Param::InitOnFree(on) => self.kmem.init_on_free = on,
                Param::PagePoison(on) => {
                    if on {
                        notes.push(format!(
                            "{}: accepted, but kmem has no page poisoning built in: ignored",
                            written(name, value)
                        ));
                    }
                    bp.page_poison = Some(on);
                }
                Param::DebugPagealloc(on) => {
                    if on {
                        notes.push(format!(
                            "{}: accepted, but kmem has no debug_pagealloc built in (freed \
                             pages stay mapped): ignored",
                            written(name, value)
                        ));
                    }
                    bp.debug_pagealloc = Some(on);
                }
                Param::Failslab(p) => self.kmem.failslab = p,
                Param::FailPageAlloc(p) => self.kmem.fail_page_alloc = p,
                Param::MinFreeKbytes(kb) => self.kmem.min_free_kbytes = Some(kb),
                Param::KmemReserve { name, size, align } => {
                    self.boot_buffers.push((name.to_string(), size, align));
                }
                Param::NotModelled => bp.not_modelled.push(written(name, value)),
            }
        }
        bp.init_args = it.map(|(n, v)| written(n, v)).collect();

        if userdef {
            // e820__update_table: a range that is not RAM wins over RAM.
            for &(s, e, _) in &other {
                remove_range(&mut ram, s, e);
            }
            let mut map: Vec<(u64, u64, E820)> =
                ram.iter().map(|&(s, e)| (s, e, E820::Ram)).collect();
            map.extend(other.iter().copied().filter(|&(s, e, _)| s < e));
            map.sort_unstable();
            log.push("user-defined physical RAM map:".to_string());
            for (s, e, t) in map {
                log.push(format!(
                    "user: [mem {s:#018x}-{:#018x}] {}",
                    e - 1,
                    t.name()
                ));
            }
            if ram.is_empty() {
                return Err(CmdlineError(format!(
                    "\"{cmdline}\" leaves the memory map without RAM"
                )));
            }
            self.ram = ram.iter().map(|&(s, e)| (s, e - s)).collect();
        }
        log.extend(notes);
        if !unknown_env.is_empty() || !unknown_argv.is_empty() {
            unknown_env.extend(unknown_argv.iter().cloned());
            log.push(format!(
                "Unknown kernel command line parameters \"{}\", will be passed to user space.",
                unknown_env.join(" ")
            ));
        }
        bp.unknown = unknown_env;
        if !bp.not_modelled.is_empty() {
            log.push(format!(
                "kmem: parameters without effect on this machine: {}",
                bp.not_modelled.join(" ")
            ));
        }
        let on = |b: bool| if b { "on" } else { "off" };
        log.push(format!(
            "mem auto-init: stack:off, heap alloc:{}, heap free:{}",
            on(self.kmem.init_on_alloc),
            on(self.kmem.init_on_free)
        ));
        if self.kmem.init_on_free {
            log.push("mem auto-init: clearing system memory may take some time...".to_string());
        }
        bp.log = log;
        self.boot_params = Some(bp);
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmem::fault::FaultParams;

    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    fn boot(cmdline: &str) -> MachineConfig {
        MachineConfig::default().with_cmdline(cmdline).unwrap()
    }

    fn log(cfg: &MachineConfig) -> Vec<String> {
        cfg.boot_params.as_ref().unwrap().log().to_vec()
    }

    fn error(cmdline: &str) -> String {
        MachineConfig::default()
            .with_cmdline(cmdline)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn empty_line_changes_nothing() {
        let cfg = boot("");
        let def = MachineConfig::default();
        assert_eq!(cfg.ram, def.ram);
        assert_eq!(cfg.nr_cpus, def.nr_cpus);
        let l = log(&cfg);
        assert_eq!(l[0], "Kernel command line: ");
        assert!(!l.iter().any(|l| l.contains("Unknown")));
        assert!(!l.iter().any(|l| l.contains("user-defined")));
    }

    #[test]
    fn mem_trims_the_map_at_an_address() {
        // The default PC: 0x1000-0xa0000, 1 MiB-3 GiB, 4-5 GiB.
        let cfg = boot("mem=1G");
        assert_eq!(cfg.ram, [(0x1000, 0x9f000), (M, G - M)]);
        let l = log(&cfg);
        assert!(l.contains(&"e820: remove [mem 0x40000000-0xfffffffffffffffe] usable".into()));
        assert!(l.contains(&"user-defined physical RAM map:".into()));
        assert!(l.contains(&"user: [mem 0x0000000000100000-0x000000003fffffff] usable".into()));
        // An address limit, not an amount: 4 GiB keeps what lies below 4 GiB (3 GiB - 636 KiB).
        let cfg = boot("mem=4G");
        assert_eq!(cfg.ram, [(0x1000, 0x9f000), (M, 3 * G - M)]);
        // Larger than the machine: nothing removed.
        assert_eq!(boot("mem=64G").ram, MachineConfig::default().ram);
        assert_eq!(
            error("mem=0"),
            "mem=0: mem 0 is not allowed",
            "Linux refuses it rather than remove all memory"
        );
        assert!(error("mem=1Q").starts_with("mem=1Q: mem \"1Q\": unexpected \"Q\""));
        assert!(error("mem").starts_with("mem: a value is required"));
        // The default PC's RAM starts at 4 KiB: mem=4K keeps none of it.
        assert!(error("mem=4K").contains("leaves the memory map without RAM"));
    }

    #[test]
    fn memmap_adds_reserves_and_replaces() {
        let cfg = boot("memmap=1G@8G memmap=64M$1G,16M!2G");
        assert_eq!(
            cfg.ram,
            [
                (0x1000, 0x9f000),
                (M, G - M),
                (G + 64 * M, G - 64 * M),
                (2 * G + 16 * M, G - 16 * M),
                (4 * G, G),
                (8 * G, G),
            ]
        );
        let l = log(&cfg);
        assert!(l.contains(&"user: [mem 0x0000000040000000-0x0000000043ffffff] reserved".into()));
        assert!(l.contains(
            &"user: [mem 0x0000000080000000-0x0000000080ffffff] persistent (type 12)".into()
        ));
        let cfg = boot("memmap=exactmap memmap=640K@0 memmap=255M@1M");
        assert_eq!(cfg.ram, [(0, 640 << 10), (M, 255 * M)]);
        let cfg = boot("memmap=2G");
        assert_eq!(cfg.ram_bytes(), 2 * G - M + 0x9f000, "memmap=nn is mem=nn");
        assert!(error("memmap=64M%1G").contains("expected exactmap"));
        assert!(error("memmap=exactmap").contains("without RAM"));
    }

    #[test]
    fn cpus_vmalloc_slab_init() {
        let cfg = boot("nr_cpus=2 vmalloc=100000 slab_nomerge init_on_alloc=1 init_on_free=y");
        assert_eq!(cfg.nr_cpus, 2);
        assert_eq!(cfg.vmalloc_size, 102400, "rounded up to pages");
        assert!(!cfg.kmem.slab_merge);
        assert!(cfg.kmem.init_on_alloc && cfg.kmem.init_on_free);
        let l = log(&cfg);
        assert!(l.contains(&"mem auto-init: stack:off, heap alloc:on, heap free:on".into()));
        assert!(l.contains(&"mem auto-init: clearing system memory may take some time...".into()));
        assert_eq!(boot("nr_cpus=0").nr_cpus, 4, "0 is ignored, as in Linux");
        assert_eq!(boot("nr_cpus=64").nr_cpus, 4, "cannot add CPUs");
        assert!(
            boot("slab_nomerge slab_merge").kmem.slab_merge,
            "the last one wins"
        );
        assert!(error("nr_cpus=-1").contains("not a number"));
        assert!(error("init_on_alloc=2").contains("not a boolean"));
    }

    #[test]
    fn faults_and_min_free() {
        let cfg =
            boot("failslab=1,100,0,-1 fail_page_alloc=10,50,4096,3 sysctl.vm.min_free_kbytes=2048");
        assert_eq!(
            cfg.kmem.failslab,
            FaultParams {
                interval: 1,
                probability: 100,
                space: 0,
                times: -1
            }
        );
        assert_eq!(cfg.kmem.fail_page_alloc.times, 3);
        assert_eq!(cfg.kmem.min_free_kbytes, Some(2048));
        assert_eq!(boot("min_free_kbytes=99").kmem.min_free_kbytes, Some(99));
        assert_eq!(
            error("failslab=1,100"),
            "failslab=1,100: \"1,100\": expected <interval>,<probability>,<space>,<times> in \
             decimal, e.g. 1,100,0,-1"
        );
    }

    #[test]
    fn debug_options_are_parsed_and_said_to_be_absent() {
        let cfg = boot("slub_debug=FZPU,kmalloc-*;A page_poison=1 debug_pagealloc=on");
        let bp = cfg.boot_params.as_ref().unwrap();
        let d = bp.slub_debug().unwrap();
        assert_eq!(d.flags_for("kmalloc-64").to_string(), "FZPU");
        assert_eq!(d.flags_for("dentry").to_string(), "A");
        assert_eq!(bp.page_poison, Some(true));
        assert_eq!(bp.debug_pagealloc, Some(true));
        let l = log(&cfg);
        assert!(
            l.iter().any(|l| l.starts_with(
                "slub_debug=FZPU,kmalloc-*;A: accepted (FZPU on kmalloc-*, A on every other \
                 cache), but kmem has no slab debugging built in"
            )),
            "{l:#?}"
        );
        assert!(
            l.iter()
                .any(|l| l.starts_with("page_poison=1: accepted, but kmem has no page poisoning"))
        );
        assert!(l.iter().any(|l| {
            l.starts_with("debug_pagealloc=on: accepted, but kmem has no debug_pagealloc")
        }));
        let l = log(&boot("slab_debug"));
        assert!(
            l.iter()
                .any(|l| l.starts_with("slab_debug: accepted (FZPU on every cache)"))
        );
        let l = log(&boot("slab_debug=Fx"));
        assert!(
            l.contains(&"slab_debug option 'x' unknown. skipped".into()),
            "{l:#?}"
        );
        assert!(
            !log(&boot("page_poison=0"))
                .iter()
                .any(|l| l.starts_with("page_poison")),
            "off is what kmem does anyway"
        );
    }

    #[test]
    fn unknown_parameters_are_passed_on_as_linux_says() {
        let cfg =
            boot("bar foo=1 console=ttyS0 quiet \"baz=a b\" usbcore.autosuspend=-1 -- init1 x=2");
        let bp = cfg.boot_params.as_ref().unwrap();
        assert_eq!(bp.unknown, ["foo=1", "baz=a b", "bar"]);
        assert_eq!(
            bp.not_modelled,
            ["console=ttyS0", "quiet", "usbcore.autosuspend=-1"]
        );
        assert_eq!(bp.init_args, ["init1", "x=2"]);
        let l = log(&cfg);
        assert!(
            l.contains(
                &"Unknown kernel command line parameters \"foo=1 baz=a b bar\", will be passed to user space."
                    .into()
            ),
            "{l:#?}"
        );
        assert!(l.contains(
            &"kmem: parameters without effect on this machine: console=ttyS0 quiet usbcore.autosuspend=-1".into()
        ));
        // Names match with '-' and '_' alike.
        assert!(!boot("slab-nomerge").kmem.slab_merge);
    }

    #[test]
    fn reserves() {
        let cfg = boot("kmem_reserve=fb:64M@2M kmem-reserve=ring:1M");
        assert_eq!(
            cfg.boot_buffers,
            [
                ("fb".to_string(), 64 * M, 2 * M),
                ("ring".to_string(), M, 4096)
            ]
        );
        assert!(error("kmem_reserve=fb").contains("expected <name>:<size>"));
    }
}
