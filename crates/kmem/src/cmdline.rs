//! Kernel command-line parsing: Linux's `memparse`, `next_arg`-style parameter splitting, the
//! `kmem_reserve=<name>:<size>[@<align>]` parameter for buffers reserved at boot, and the
//! memory-management parameters of a kernel ([`parse_param`]): `mem=`, `memmap=`, `nr_cpus=`,
//! `vmalloc=`, `slab_nomerge`/`slab_merge`, `slab_debug=`/`slub_debug=` (with Linux's
//! option letters and cache lists, [`SlubDebug`]), `init_on_alloc=`, `init_on_free=`,
//! `page_poison=`, `debug_pagealloc=`, `failslab=`, `fail_page_alloc=` (fault attributes,
//! [`parse_fault_attr`]) and `sysctl.vm.min_free_kbytes=`. Values are parsed as Linux parses
//! them (`kstrtobool`, `memparse`, `sscanf`), but a malformed value is an error here where
//! Linux often warns and goes on. Mapping the parameters onto a machine is the caller's
//! business (the hosted `MachineConfig::with_cmdline`).
//!
//! A driver that needs a large physically contiguous buffer asks for it on the command line,
//! so that it is carved out of memblock before the buddy allocator takes memory over (see the
//! hosted `Machine`'s boot buffers):
//!
//! ```text
//! kmem_reserve=framebuffer:64M@2M kmem_reserve=dma_ring:0x100000
//! ```
//!
//! Sizes follow `memparse`: a number in C notation (`0x` hex, a leading `0` octal, else
//! decimal) optionally followed by one of `K`, `M`, `G`, `T`, `P`, `E` (either case), each a
//! factor of 1024 more. Unlike Linux's, this `memparse` reports a missing number and
//! overflow instead of returning 0 or a wrapped value. Everything here borrows from the input;
//! nothing allocates.

use core::fmt;

use crate::addr::PAGE_SIZE;
use crate::fault::FaultParams;

/// The parameter name for boot-time reservations.
pub const KMEM_RESERVE: &str = "kmem_reserve";

/// The alignment of a reservation that gives none: a page.
pub const DEFAULT_RESERVE_ALIGN: u64 = PAGE_SIZE as u64;

/// Why a command-line value was refused. `what` names the field ("size", "align").
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CmdlineError<'a> {
    /// No digits where a number was expected.
    NotANumber {
        /// The field.
        what: &'static str,
        /// The text found there.
        text: &'a str,
    },
    /// The number, with its suffix, does not fit in 64 bits.
    Overflow {
        /// The field.
        what: &'static str,
        /// The number's text.
        text: &'a str,
    },
    /// Characters left after a value.
    Trailing {
        /// The field.
        what: &'static str,
        /// The whole field's text.
        text: &'a str,
        /// What is left after the value.
        rest: &'a str,
    },
    /// `kmem_reserve` without the `:` between name and size.
    MissingColon(&'a str),
    /// An empty name.
    EmptyName,
    /// A name with a character other than ASCII letters, digits, `_`, `-` and `.`.
    BadName(&'a str),
    /// A size of 0.
    ZeroSize,
    /// An alignment that is not a power of two.
    BadAlign(u64),
    /// A parameter that takes a value was given none (`mem` instead of `mem=1G`).
    MissingValue,
    /// Not a boolean as `kstrtobool` reads one.
    BadBool(&'a str),
    /// Not `<interval>,<probability>,<space>,<times>` (`failslab=`, `fail_page_alloc=`).
    BadFaultAttr(&'a str),
    /// A value of 0 where that would be meaningless (`mem=0` would remove all memory).
    Zero {
        /// The field.
        what: &'static str,
    },
    /// A `memmap=` entry that is not `exactmap`, `nn[KMG]`, `nn@ss`, `nn#ss`, `nn$ss` or
    /// `nn!ss`.
    BadMemmap(&'a str),
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CmdlineError::NotANumber { what, text } => {
                write!(f, "{what} \"{text}\" is not a number")?;
                if what != "number" {
                    write!(f, " (expected e.g. 4096, 0x1000, 64M)")?;
                }
                Ok(())
            }
            CmdlineError::Overflow { what, text } => {
                write!(f, "{what} \"{text}\" does not fit in 64 bits")
            }
            CmdlineError::Trailing { what, text, rest } => write!(
                f,
                "{what} \"{text}\": unexpected \"{rest}\" after the number \
                 (a size takes one suffix of K, M, G, T, P or E)"
            ),
            CmdlineError::MissingColon(s) => write!(
                f,
                "\"{s}\": expected <name>:<size>[@<align>], e.g. framebuffer:64M@2M"
            ),
            CmdlineError::EmptyName => write!(f, "the reservation has an empty name"),
            CmdlineError::BadName(s) => write!(
                f,
                "name \"{s}\" may only hold ASCII letters, digits, '_', '-' and '.'"
            ),
            CmdlineError::ZeroSize => write!(f, "size 0: nothing to reserve"),
            CmdlineError::BadAlign(a) => {
                write!(f, "align {a:#x} is not a power of two")
            }
            CmdlineError::MissingValue => write!(f, "a value is required"),
            CmdlineError::BadBool(s) => write!(
                f,
                "\"{s}\" is not a boolean (expected 1/0, y/n, on/off or true/false)"
            ),
            CmdlineError::BadFaultAttr(s) => write!(
                f,
                "\"{s}\": expected <interval>,<probability>,<space>,<times> in decimal, \
                 e.g. 1,100,0,-1"
            ),
            CmdlineError::Zero { what } => write!(f, "{what} 0 is not allowed"),
            CmdlineError::BadMemmap(s) => write!(
                f,
                "\"{s}\": expected exactmap, nn[KMG], nn[KMG]@ss[KMG] (RAM), nn[KMG]$ss[KMG] \
                 (reserved), nn[KMG]!ss[KMG] (protected) or nn[KMG]#ss[KMG] (ACPI data)"
            ),
        }
    }
}

impl core::error::Error for CmdlineError<'_> {}

/// Parses the leading unsigned number of `s` as `simple_strtoull(s, &end, 0)` does: `0x`
/// followed by a hex digit means hex, another leading `0` octal, else decimal. Returns the
/// value and the rest of `s`.
fn strtoull(s: &str) -> Result<(u64, &str), CmdlineError<'_>> {
    let b = s.as_bytes();
    let (radix, start) =
        if b.len() >= 3 && b[0] == b'0' && (b[1] | 0x20) == b'x' && b[2].is_ascii_hexdigit() {
            (16, 2)
        } else if b.first() == Some(&b'0') {
            (8, 0)
        } else {
            (10, 0)
        };
    let digits = b[start..]
        .iter()
        .take_while(|c| (**c as char).is_digit(radix))
        .count();
    if digits == 0 {
        return Err(CmdlineError::NotANumber {
            what: "number",
            text: s,
        });
    }
    let end = start + digits;
    let mut v: u64 = 0;
    for &c in &b[start..end] {
        let d = (c as char).to_digit(radix).unwrap_or(0) as u64;
        v = v
            .checked_mul(radix as u64)
            .and_then(|v| v.checked_add(d))
            .ok_or(CmdlineError::Overflow {
                what: "number",
                text: &s[..end],
            })?;
    }
    Ok((v, &s[end..]))
}

/// `memparse`: a size with an optional binary suffix (`K`, `M`, `G`, `T`, `P`, `E`, either
/// case). Returns the value and the rest of `s` after the number and its suffix, which the
/// caller checks (as Linux's callers check `retptr`).
///
/// ```
/// use kmem::cmdline::memparse;
/// assert_eq!(memparse("64M@2M"), Ok((64 << 20, "@2M")));
/// assert_eq!(memparse("0x1000"), Ok((4096, "")));
/// ```
///
/// # Errors
///
/// [`CmdlineError::NotANumber`] when `s` does not start with a digit,
/// [`CmdlineError::Overflow`] when the value (after the suffix) exceeds `u64::MAX`.
pub fn memparse(s: &str) -> Result<(u64, &str), CmdlineError<'_>> {
    let (v, rest) = strtoull(s)?;
    let shift = match rest.as_bytes().first().map(u8::to_ascii_uppercase) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'P') => 50,
        Some(b'E') => 60,
        _ => return Ok((v, rest)),
    };
    let num = &s[..s.len() - rest.len() + 1];
    if v.leading_zeros() < shift {
        return Err(CmdlineError::Overflow {
            what: "number",
            text: num,
        });
    }
    Ok((v << shift, &rest[1..]))
}

/// A whole field as a size: [`memparse`] with nothing left over. `what` names the field
/// in errors.
fn parse_size<'a>(what: &'static str, s: &'a str) -> Result<u64, CmdlineError<'a>> {
    whole(what, s, memparse(s))
}

/// The value of a field parsed by `parsed`, which must have consumed all of `s`; errors name
/// the field as `what`.
fn whole<'a>(
    what: &'static str,
    s: &'a str,
    parsed: Result<(u64, &'a str), CmdlineError<'a>>,
) -> Result<u64, CmdlineError<'a>> {
    match parsed {
        Ok((v, "")) => Ok(v),
        Ok((_, rest)) => Err(CmdlineError::Trailing {
            what,
            text: s,
            rest,
        }),
        Err(CmdlineError::NotANumber { .. }) => Err(CmdlineError::NotANumber { what, text: s }),
        Err(CmdlineError::Overflow { text, .. }) => Err(CmdlineError::Overflow { what, text }),
        Err(e) => Err(e),
    }
}

/// Parses the value of `kmem_reserve=`: `<name>:<size>[@<align>]`. Returns the name, the size
/// and the alignment ([`DEFAULT_RESERVE_ALIGN`], a page, when none is given).
///
/// The name is non-empty ASCII letters, digits, `_`, `-` and `.`; the size is non-zero; the
/// alignment is a power of two (the machine rounds it up to a page).
///
/// ```
/// use kmem::cmdline::parse_reserve;
/// assert_eq!(parse_reserve("framebuffer:64M@2M"), Ok(("framebuffer", 64 << 20, 2 << 20)));
/// assert_eq!(parse_reserve("ring:0x10000"), Ok(("ring", 0x10000, 4096)));
/// assert!(parse_reserve("ring:64Q").is_err());
/// ```
///
/// # Errors
///
/// A [`CmdlineError`] naming what is wrong: [`MissingColon`](CmdlineError::MissingColon),
/// [`EmptyName`](CmdlineError::EmptyName), [`BadName`](CmdlineError::BadName), a size or
/// alignment that is [not a number](CmdlineError::NotANumber),
/// [overflows](CmdlineError::Overflow) or is [followed by junk](CmdlineError::Trailing),
/// [`ZeroSize`](CmdlineError::ZeroSize), [`BadAlign`](CmdlineError::BadAlign).
pub fn parse_reserve(s: &str) -> Result<(&str, u64, u64), CmdlineError<'_>> {
    let (name, spec) = s.split_once(':').ok_or(CmdlineError::MissingColon(s))?;
    if name.is_empty() {
        return Err(CmdlineError::EmptyName);
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    {
        return Err(CmdlineError::BadName(name));
    }
    let (size, align) = match spec.split_once('@') {
        Some((size, align)) => (size, Some(align)),
        None => (spec, None),
    };
    let size = parse_size("size", size)?;
    if size == 0 {
        return Err(CmdlineError::ZeroSize);
    }
    let align = match align {
        Some(a) => parse_size("align", a)?,
        None => DEFAULT_RESERVE_ALIGN,
    };
    if !align.is_power_of_two() {
        return Err(CmdlineError::BadAlign(align));
    }
    Ok((name, size, align))
}

/// `parameq`: parameter names compare with `-` and `_` equal.
pub fn parameq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let n = |c: u8| if c == b'-' { b'_' } else { c };
            n(x) == n(y)
        })
}

/// Splits a command line into parameters, as Linux's `next_arg`: whitespace separates them
/// unless inside double quotes; each is `key` or `key=value`, quotes around the value (or
/// around the whole parameter) removed.
pub fn params(cmdline: &str) -> Params<'_> {
    Params { rest: cmdline }
}

/// Iterator over the parameters of a command line ([`params`]): `(key, value)`.
#[derive(Clone, Debug)]
pub struct Params<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Params<'a> {
    type Item = (&'a str, Option<&'a str>);
    fn next(&mut self) -> Option<Self::Item> {
        let s = self.rest.trim_start();
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let mut in_quote = false;
        let mut end = s.len();
        for (i, c) in s.char_indices() {
            if c.is_whitespace() && !in_quote {
                end = i;
                break;
            }
            if c == '"' {
                in_quote = !in_quote;
            }
        }
        let (mut arg, rest) = s.split_at(end);
        self.rest = rest;
        // `"key=value with spaces"`: drop the opening quote (the closing one goes below).
        let quoted_whole = arg.starts_with('"');
        if quoted_whole {
            arg = &arg[1..];
        }
        let strip_close = |v: &'a str| v.strip_suffix('"').unwrap_or(v);
        Some(match arg.split_once('=') {
            Some((k, v)) => {
                let v = match v.strip_prefix('"') {
                    Some(inner) => strip_close(inner),
                    None if quoted_whole => strip_close(v),
                    None => v,
                };
                (k, Some(v))
            }
            None if quoted_whole => (strip_close(arg), None),
            None => (arg, None),
        })
    }
}

/// Every `kmem_reserve=` parameter of `cmdline`, parsed with [`parse_reserve`], in order.
/// A `kmem_reserve` without a value gives [`CmdlineError::MissingColon`].
pub fn reserves(
    cmdline: &str,
) -> impl Iterator<Item = Result<(&str, u64, u64), CmdlineError<'_>>> + '_ {
    params(cmdline)
        .filter(|(k, _)| parameq(k, KMEM_RESERVE))
        .map(|(_, v)| parse_reserve(v.unwrap_or("")))
}

// ---------------------------------------------------------------------- boot parameters

/// `kstrtobool`: `1`, `y`, `Y`, `t`, `T`, `on` are true; `0`, `n`, `N`, `f`, `F`, `off`
/// false. As in Linux only the first character (two for `on`/`off`) counts, so `yes` and
/// `true` are true.
pub fn kstrtobool(s: &str) -> Option<bool> {
    let b = s.as_bytes();
    match b.first()? {
        b'y' | b'Y' | b't' | b'T' | b'1' => Some(true),
        b'n' | b'N' | b'f' | b'F' | b'0' => Some(false),
        b'o' | b'O' => match b.get(1)? {
            b'n' | b'N' => Some(true),
            b'f' | b'F' => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A decimal number with an optional sign, the whole of `s` (`%d` of `sscanf`, strict).
fn decimal_i64(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A decimal number without sign, the whole of `s` (`%lu`, strict).
fn decimal_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A whole field as a C-notation number (`simple_strtoull(s, &end, 0)` with nothing left).
fn parse_number<'a>(what: &'static str, s: &'a str) -> Result<u64, CmdlineError<'a>> {
    whole(what, s, strtoull(s))
}

/// `setup_fault_attr`: `<interval>,<probability>,<space>,<times>`, four decimal numbers
/// (interval and probability unsigned, space and times signed; times `-1` means without
/// limit). Unlike Linux, which warns and ignores the parameter, anything else is an error.
///
/// ```
/// use kmem::cmdline::parse_fault_attr;
/// let p = parse_fault_attr("10,50,0,-1").unwrap();
/// assert_eq!((p.interval, p.probability, p.space, p.times), (10, 50, 0, -1));
/// assert!(parse_fault_attr("10,50").is_err());
/// ```
///
/// # Errors
///
/// [`CmdlineError::BadFaultAttr`] with the text.
pub fn parse_fault_attr(s: &str) -> Result<FaultParams, CmdlineError<'_>> {
    let bad = CmdlineError::BadFaultAttr(s);
    let mut it = s.split(',');
    let mut field = || it.next().ok_or(bad);
    let interval = decimal_u64(field()?).ok_or(bad)?;
    let probability = decimal_u64(field()?).ok_or(bad)?;
    let space = decimal_i64(field()?).and_then(|v| i32::try_from(v).ok());
    let times = decimal_i64(field()?).and_then(|v| i32::try_from(v).ok());
    if it.next().is_some() {
        return Err(bad);
    }
    Ok(FaultParams {
        interval,
        probability,
        space: space.ok_or(bad)?,
        times: times.ok_or(bad)?,
    })
}

/// `mem=nn[KMG]` (x86 `parse_memopt`): RAM above physical address `nn` is removed from the
/// memory map. Returns the limit.
///
/// # Errors
///
/// Not a size, junk after it, or 0 (which Linux refuses so as not to remove all memory).
pub fn parse_mem(s: &str) -> Result<u64, CmdlineError<'_>> {
    let v = parse_size("mem", s)?;
    if v == 0 {
        return Err(CmdlineError::Zero { what: "mem" });
    }
    Ok(v)
}

/// One entry of `memmap=` (x86 `parse_memmap_one`); entries are separated by commas.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Memmap {
    /// `exactmap`: forget the firmware's map; the following entries define all of it.
    Exactmap,
    /// `nn[KMG]`: as `mem=nn`, remove RAM above address `nn`.
    Limit(u64),
    /// `nn[KMG]@ss[KMG]`: `[ss, ss + nn)` is usable RAM.
    Ram {
        /// First byte.
        start: u64,
        /// Bytes.
        size: u64,
    },
    /// `nn[KMG]#ss[KMG]`: `[ss, ss + nn)` holds ACPI data (not RAM for the allocator).
    Acpi {
        /// First byte.
        start: u64,
        /// Bytes.
        size: u64,
    },
    /// `nn[KMG]$ss[KMG]`: `[ss, ss + nn)` is reserved (not RAM for the allocator).
    Reserved {
        /// First byte.
        start: u64,
        /// Bytes.
        size: u64,
    },
    /// `nn[KMG]!ss[KMG]`: `[ss, ss + nn)` is protected (persistent) memory, not RAM.
    Protected {
        /// First byte.
        start: u64,
        /// Bytes.
        size: u64,
    },
}

fn parse_memmap_one(s: &str) -> Result<Memmap, CmdlineError<'_>> {
    if s == "exactmap" {
        return Ok(Memmap::Exactmap);
    }
    let (size, rest) = match memparse(s) {
        Ok(v) => v,
        Err(CmdlineError::NotANumber { .. }) => return Err(CmdlineError::BadMemmap(s)),
        Err(CmdlineError::Overflow { text, .. }) => {
            return Err(CmdlineError::Overflow { what: "size", text });
        }
        Err(e) => return Err(e),
    };
    let Some(sep) = rest.chars().next() else {
        return Ok(Memmap::Limit(size));
    };
    let start = match sep {
        '@' | '#' | '$' | '!' => parse_size("start", &rest[1..])?,
        _ => return Err(CmdlineError::BadMemmap(s)),
    };
    if start.checked_add(size).is_none() {
        return Err(CmdlineError::Overflow {
            what: "range",
            text: s,
        });
    }
    Ok(match sep {
        '@' => Memmap::Ram { start, size },
        '#' => Memmap::Acpi { start, size },
        '$' => Memmap::Reserved { start, size },
        _ => Memmap::Protected { start, size },
    })
}

/// The entries of a `memmap=` value, parsed, in order.
///
/// ```
/// use kmem::cmdline::{Memmap, memmap_entries};
/// let e: Vec<_> = memmap_entries("exactmap,640K@0,1G$2G").collect();
/// assert_eq!(e[0], Ok(Memmap::Exactmap));
/// assert_eq!(e[1], Ok(Memmap::Ram { start: 0, size: 640 << 10 }));
/// assert_eq!(e[2], Ok(Memmap::Reserved { start: 2 << 30, size: 1 << 30 }));
/// ```
pub fn memmap_entries(s: &str) -> impl Iterator<Item = Result<Memmap, CmdlineError<'_>>> + '_ {
    s.split(',').map(parse_memmap_one)
}

/// `slab_debug=` / `slub_debug=` flags, with Linux's `slab_flags_t` bit values.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct SlubDebugFlags(pub u32);

impl SlubDebugFlags {
    /// `F`: `SLAB_CONSISTENCY_CHECKS`.
    pub const CONSISTENCY_CHECKS: u32 = 0x0000_0100;
    /// `Z`: `SLAB_RED_ZONE`.
    pub const RED_ZONE: u32 = 0x0000_0400;
    /// `P`: `SLAB_POISON`.
    pub const POISON: u32 = 0x0000_0800;
    /// `U`: `SLAB_STORE_USER`.
    pub const STORE_USER: u32 = 0x0001_0000;
    /// `T`: `SLAB_TRACE`.
    pub const TRACE: u32 = 0x0020_0000;
    /// `A`: `SLAB_FAILSLAB` (the cache may be singled out by failslab's `cache-filter`).
    pub const FAILSLAB: u32 = 0x0200_0000;
    /// `DEBUG_DEFAULT_FLAGS`: `FZPU`, what `slab_debug` alone turns on.
    pub const DEFAULT: SlubDebugFlags =
        SlubDebugFlags(Self::CONSISTENCY_CHECKS | Self::RED_ZONE | Self::POISON | Self::STORE_USER);

    const LETTERS: [(u8, u32); 6] = [
        (b'F', Self::CONSISTENCY_CHECKS),
        (b'Z', Self::RED_ZONE),
        (b'P', Self::POISON),
        (b'U', Self::STORE_USER),
        (b'T', Self::TRACE),
        (b'A', Self::FAILSLAB),
    ];

    /// True when no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for SlubDebugFlags {
    /// The letters, in `FZPUTA` order; `-` for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("-");
        }
        for (c, bit) in Self::LETTERS {
            if self.0 & bit != 0 {
                write!(f, "{}", c as char)?;
            }
        }
        Ok(())
    }
}

/// One `;`-separated block of a `slab_debug=` value: options, then optionally `,` and a
/// comma-separated list of cache names (a `*` ends a prefix match).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlubDebugBlock<'a> {
    /// The block's flags.
    pub flags: SlubDebugFlags,
    /// The option letters as written (`FZ`, `-`, empty for "full debugging").
    pub options: &'a str,
    /// The cache list, if any.
    pub slabs: Option<&'a str>,
    /// `O`: do not debug caches whose minimum order debugging would raise.
    pub higher_order_disable: bool,
}

impl<'a> SlubDebugBlock<'a> {
    /// Option characters Linux does not know (it logs "slab_debug option 'c' unknown.
    /// skipped" for each and goes on).
    pub fn unknown_options(self) -> impl Iterator<Item = char> + 'a {
        self.options.chars().filter(|c| {
            !matches!(
                c.to_ascii_lowercase(),
                '-' | 'f' | 'z' | 'p' | 'u' | 't' | 'a' | 'o'
            )
        })
    }

    /// True when cache `name` is in the block's list (Linux's `kmem_cache_flags` match:
    /// a name equal to an entry, or starting with the part of an entry before a `*`).
    pub fn matches(&self, name: &str) -> bool {
        let Some(list) = self.slabs else {
            return false;
        };
        list.split(',').any(|entry| match entry.find('*') {
            Some(glob) => name.starts_with(&entry[..glob]),
            None => name == entry,
        })
    }
}

/// `parse_slub_debug_flags` on one block; returns it and the rest after its `;`s.
fn slub_debug_block(s: &str) -> (SlubDebugBlock<'_>, Option<&str>) {
    let s = s.trim_start_matches(';');
    let (block, rest) = match s.find(';') {
        Some(i) => (&s[..i], Some(s[i..].trim_start_matches(';'))),
        None => (s, None),
    };
    let rest = rest.filter(|r| !r.is_empty());
    let (options, slabs) = match block.split_once(',') {
        Some((o, l)) => (o, Some(l)),
        None => (block, None),
    };
    let mut flags = 0;
    let mut higher_order_disable = false;
    if options.is_empty() && slabs.is_some() {
        // No options but a list: full debugging for those caches.
        flags = SlubDebugFlags::DEFAULT.0;
    }
    for c in options.chars() {
        match c.to_ascii_uppercase() {
            '-' => flags = 0,
            'O' => higher_order_disable = true,
            u => {
                if let Some(&(_, bit)) = SlubDebugFlags::LETTERS
                    .iter()
                    .find(|(l, _)| *l as char == u)
                {
                    flags |= bit;
                }
            }
        }
    }
    let b = SlubDebugBlock {
        flags: SlubDebugFlags(flags),
        options,
        slabs,
        higher_order_disable,
    };
    (b, rest)
}

/// A `slab_debug` (or `slub_debug`) parameter, as `setup_slub_debug` reads it:
/// `slab_debug` alone turns `FZPU` on for every cache; `slab_debug=<options>[,<caches>][;...]`
/// sets the global flags (a block without a cache list) and per-cache flags (blocks with one).
///
/// ```
/// use kmem::cmdline::{SlubDebug, SlubDebugFlags};
/// let d = SlubDebug::new(Some("FZ;P,kmalloc-*,dentry"));
/// assert_eq!(d.global().to_string(), "FZ");
/// assert_eq!(d.flags_for("kmalloc-64").to_string(), "P");
/// assert_eq!(d.flags_for("inode_cache").to_string(), "FZ");
/// assert_eq!(SlubDebug::new(None).global(), SlubDebugFlags::DEFAULT);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SlubDebug<'a> {
    value: Option<&'a str>,
}

impl<'a> SlubDebug<'a> {
    /// The parameter with its value (`None` for `slab_debug` alone).
    pub fn new(value: Option<&'a str>) -> SlubDebug<'a> {
        SlubDebug { value }
    }

    /// The value as given.
    pub fn value(&self) -> Option<&'a str> {
        self.value
    }

    /// The blocks, in order (none for `slab_debug` alone or with an empty value).
    pub fn blocks(&self) -> impl Iterator<Item = SlubDebugBlock<'a>> + 'a {
        let mut rest = self.value.filter(|v| !v.is_empty());
        core::iter::from_fn(move || {
            let (b, r) = slub_debug_block(rest?);
            rest = r;
            Some(b)
        })
    }

    /// The flags of caches no list names (Linux's `slub_debug` after boot).
    pub fn global(&self) -> SlubDebugFlags {
        if self.value.is_none_or(str::is_empty) {
            return SlubDebugFlags::DEFAULT;
        }
        let mut global = None;
        for b in self.blocks() {
            if b.slabs.is_none() {
                global = Some(b.flags);
            }
        }
        // Blocks with lists only: the global flags stay as they were (off).
        global.unwrap_or_default()
    }

    /// The flags cache `name` gets (`kmem_cache_flags`): those of the first block whose
    /// list names it, else the global ones.
    pub fn flags_for(&self, name: &str) -> SlubDebugFlags {
        self.blocks()
            .find(|b| b.matches(name))
            .map_or_else(|| self.global(), |b| b.flags)
    }

    /// True when any cache gets a flag.
    pub fn enabled(&self) -> bool {
        !self.global().is_empty()
            || self
                .blocks()
                .any(|b| b.slabs.is_some() && !b.flags.is_empty())
    }
}

/// A kernel parameter kmem understands, with its value parsed ([`parse_param`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Param<'a> {
    /// `mem=nn[KMG]`: remove RAM above this physical address.
    Mem(u64),
    /// `memmap=...`: the value, every entry valid (see [`memmap_entries`]).
    Memmap(&'a str),
    /// `nr_cpus=n`: at most this many CPUs (0: no limit, as Linux ignores it).
    NrCpus(u64),
    /// `vmalloc=nn[KMG]`: the size of the vmalloc range.
    Vmalloc(u64),
    /// `slab_merge` (true) or `slab_nomerge` (false), also spelt `slub_*`.
    SlabMerge(bool),
    /// `slab_debug[=...]` / `slub_debug[=...]`.
    SlubDebug(SlubDebug<'a>),
    /// `init_on_alloc=<bool>`.
    InitOnAlloc(bool),
    /// `init_on_free=<bool>`.
    InitOnFree(bool),
    /// `page_poison=<bool>`.
    PagePoison(bool),
    /// `debug_pagealloc=<bool>`.
    DebugPagealloc(bool),
    /// `failslab=<interval>,<probability>,<space>,<times>`.
    Failslab(FaultParams),
    /// `fail_page_alloc=<interval>,<probability>,<space>,<times>`.
    FailPageAlloc(FaultParams),
    /// `sysctl.vm.min_free_kbytes=n` (also `min_free_kbytes=n`).
    MinFreeKbytes(u64),
    /// `kmem_reserve=<name>:<size>[@<align>]` (see [`parse_reserve`]).
    KmemReserve {
        /// The buffer's name.
        name: &'a str,
        /// Bytes.
        size: u64,
        /// Alignment.
        align: u64,
    },
    /// A parameter Linux knows that concerns nothing kmem models (`console=`, `quiet`,
    /// `root=`, ...), or a module parameter (`name.param=value`): accepted, not used.
    NotModelled,
}

/// Parameters of a kernel that kmem accepts without modelling them.
const NOT_MODELLED: &[&str] = &[
    "console",
    "earlycon",
    "earlyprintk",
    "quiet",
    "debug",
    "loglevel",
    "ignore_loglevel",
    "root",
    "rootfstype",
    "rootflags",
    "rootwait",
    "ro",
    "rw",
    "init",
    "rdinit",
    "panic",
    "nokaslr",
    "maxcpus",
    "nosmp",
    "noapic",
    "acpi",
    "splash",
];

/// Why a parameter's value was refused: the parameter as written and the reason.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParamError<'a> {
    /// The parameter's name as written.
    pub name: &'a str,
    /// Its value, if any.
    pub value: Option<&'a str>,
    /// What is wrong.
    pub error: CmdlineError<'a>,
}

impl fmt::Display for ParamError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value {
            Some(v) => write!(f, "{}={v}: {}", self.name, self.error),
            None => write!(f, "{}: {}", self.name, self.error),
        }
    }
}

impl core::error::Error for ParamError<'_> {}

/// True when `name` is a sysctl given on the command line as `sysctl.<path>` with `path`
/// (in `.` or `/` notation) equal to `sysctl`, e.g. `sysctl.vm.min_free_kbytes`.
fn is_sysctl(name: &str, sysctl: &str) -> bool {
    let Some(path) = name
        .strip_prefix("sysctl.")
        .or_else(|| name.strip_prefix("sysctl/"))
    else {
        return false;
    };
    path.len() == sysctl.len()
        && path.bytes().zip(sysctl.bytes()).all(|(a, b)| {
            let n = |c: u8| match c {
                b'/' => b'.',
                b'-' => b'_',
                c => c,
            };
            n(a) == n(b)
        })
}

/// Recognises and parses one parameter (`name` and `value` as [`params`] yields them).
/// `Ok(None)`: kmem does not know it (Linux would pass it to user space).
///
/// ```
/// use kmem::cmdline::{Param, parse_param};
/// assert_eq!(parse_param("mem", Some("1G")), Ok(Some(Param::Mem(1 << 30))));
/// assert_eq!(parse_param("slab-nomerge", None), Ok(Some(Param::SlabMerge(false))));
/// assert_eq!(parse_param("frobnicate", Some("1")), Ok(None));
/// assert!(parse_param("init_on_free", Some("maybe")).is_err());
/// ```
///
/// # Errors
///
/// A known parameter with a missing or malformed value.
pub fn parse_param<'a>(
    name: &'a str,
    value: Option<&'a str>,
) -> Result<Option<Param<'a>>, ParamError<'a>> {
    let err = |error| ParamError { name, value, error };
    let need = || value.ok_or(err(CmdlineError::MissingValue));
    let boolean = || {
        let v = need()?;
        kstrtobool(v).ok_or(err(CmdlineError::BadBool(v)))
    };
    let is = |known: &str| parameq(name, known);
    let p = if is("mem") {
        let v = need()?;
        if v == "nopentium" {
            Param::NotModelled
        } else {
            Param::Mem(parse_mem(v).map_err(err)?)
        }
    } else if is("memmap") {
        let v = need()?;
        for e in memmap_entries(v) {
            e.map_err(err)?;
        }
        Param::Memmap(v)
    } else if is("nr_cpus") {
        Param::NrCpus(parse_number("nr_cpus", need()?).map_err(err)?)
    } else if is("vmalloc") {
        let v = parse_size("vmalloc", need()?).map_err(err)?;
        if v == 0 {
            return Err(err(CmdlineError::Zero { what: "vmalloc" }));
        }
        Param::Vmalloc(v)
    } else if is("slab_nomerge") || is("slub_nomerge") {
        Param::SlabMerge(false)
    } else if is("slab_merge") || is("slub_merge") {
        Param::SlabMerge(true)
    } else if is("slab_debug") || is("slub_debug") {
        Param::SlubDebug(SlubDebug::new(value))
    } else if is("init_on_alloc") {
        Param::InitOnAlloc(boolean()?)
    } else if is("init_on_free") {
        Param::InitOnFree(boolean()?)
    } else if is("page_poison") {
        Param::PagePoison(boolean()?)
    } else if is("debug_pagealloc") {
        Param::DebugPagealloc(boolean()?)
    } else if is("failslab") {
        Param::Failslab(parse_fault_attr(need()?).map_err(err)?)
    } else if is("fail_page_alloc") {
        Param::FailPageAlloc(parse_fault_attr(need()?).map_err(err)?)
    } else if is("min_free_kbytes") || is_sysctl(name, "vm.min_free_kbytes") {
        let v = need()?;
        let kb = decimal_u64(v).ok_or(err(CmdlineError::NotANumber {
            what: "min_free_kbytes",
            text: v,
        }))?;
        Param::MinFreeKbytes(kb)
    } else if is(KMEM_RESERVE) {
        let (name, size, align) = parse_reserve(value.unwrap_or("")).map_err(err)?;
        Param::KmemReserve { name, size, align }
    } else if NOT_MODELLED.iter().any(|k| is(k)) || name.contains('.') {
        Param::NotModelled
    } else {
        return Ok(None);
    };
    Ok(Some(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    #[test]
    fn memparse_numbers_and_suffixes() {
        assert_eq!(memparse("4096"), Ok((4096, "")));
        assert_eq!(memparse("0"), Ok((0, "")));
        assert_eq!(memparse("4k"), Ok((4 * K, "")));
        assert_eq!(memparse("4K"), Ok((4 * K, "")));
        assert_eq!(memparse("64M"), Ok((64 * M, "")));
        assert_eq!(memparse("64m"), Ok((64 * M, "")));
        assert_eq!(memparse("3G"), Ok((3 * G, "")));
        assert_eq!(memparse("2T"), Ok((2 << 40, "")));
        assert_eq!(memparse("1P"), Ok((1 << 50, "")));
        assert_eq!(memparse("15E"), Ok((15 << 60, "")));
        assert_eq!(memparse("0x1000"), Ok((0x1000, "")));
        assert_eq!(memparse("0X10M"), Ok((16 * M, "")));
        assert_eq!(memparse("0xffffffffffffffff"), Ok((u64::MAX, "")));
        assert_eq!(
            memparse("010"),
            Ok((8, "")),
            "a leading 0 is octal, as in C"
        );
        assert_eq!(memparse("08"), Ok((0, "8")), "8 is not an octal digit");
        assert_eq!(
            memparse("0x"),
            Ok((0, "x")),
            "0x without a hex digit is the number 0"
        );
        assert_eq!(memparse("64M@2M"), Ok((64 * M, "@2M")));
        assert_eq!(memparse("12Q"), Ok((12, "Q")), "the caller checks the rest");
        assert_eq!(memparse("1KK"), Ok((K, "K")), "one suffix only");
    }

    #[test]
    fn memparse_errors() {
        for s in ["", "K", "abc", "-1", "+1", " 1", "@4K"] {
            assert_eq!(
                memparse(s),
                Err(CmdlineError::NotANumber {
                    what: "number",
                    text: s
                }),
                "{s:?}"
            );
        }
        assert_eq!(
            memparse("18446744073709551616"),
            Err(CmdlineError::Overflow {
                what: "number",
                text: "18446744073709551616"
            })
        );
        assert_eq!(
            memparse("16E"),
            Err(CmdlineError::Overflow {
                what: "number",
                text: "16E"
            })
        );
        assert_eq!(
            memparse("0x400000000000000k"),
            Err(CmdlineError::Overflow {
                what: "number",
                text: "0x400000000000000k"
            })
        );
        assert_eq!(
            memparse("0x3fffffffffffffk"),
            Ok((0x3fffffffffffff << 10, ""))
        );
    }

    #[test]
    fn reserve_values() {
        assert_eq!(parse_reserve("fb:64M"), Ok(("fb", 64 * M, 4096)));
        assert_eq!(parse_reserve("fb:64M@2M"), Ok(("fb", 64 * M, 2 * M)));
        assert_eq!(
            parse_reserve("dma_ring-0.rx:0x4000000@0x200000"),
            Ok(("dma_ring-0.rx", 64 * M, 2 * M))
        );
        assert_eq!(parse_reserve("x:1@1"), Ok(("x", 1, 1)));
        assert_eq!(
            parse_reserve("a:b:1M"),
            Err(CmdlineError::NotANumber {
                what: "size",
                text: "b:1M"
            }),
            "the name ends at the first colon"
        );
    }

    #[test]
    fn reserve_errors_are_clear() {
        let cases: &[(&str, CmdlineError<'_>, &str)] = &[
            (
                "fb",
                CmdlineError::MissingColon("fb"),
                "\"fb\": expected <name>:<size>[@<align>], e.g. framebuffer:64M@2M",
            ),
            (
                ":64M",
                CmdlineError::EmptyName,
                "the reservation has an empty name",
            ),
            (
                "f b:1M",
                CmdlineError::BadName("f b"),
                "name \"f b\" may only hold ASCII letters, digits, '_', '-' and '.'",
            ),
            (
                "fb:",
                CmdlineError::NotANumber {
                    what: "size",
                    text: "",
                },
                "size \"\" is not a number (expected e.g. 4096, 0x1000, 64M)",
            ),
            (
                "fb:lots",
                CmdlineError::NotANumber {
                    what: "size",
                    text: "lots",
                },
                "size \"lots\" is not a number (expected e.g. 4096, 0x1000, 64M)",
            ),
            (
                "fb:64Q",
                CmdlineError::Trailing {
                    what: "size",
                    text: "64Q",
                    rest: "Q",
                },
                "size \"64Q\": unexpected \"Q\" after the number (a size takes one suffix of K, M, G, T, P or E)",
            ),
            (
                "fb:64MB",
                CmdlineError::Trailing {
                    what: "size",
                    text: "64MB",
                    rest: "B",
                },
                "size \"64MB\": unexpected \"B\" after the number (a size takes one suffix of K, M, G, T, P or E)",
            ),
            ("fb:0", CmdlineError::ZeroSize, "size 0: nothing to reserve"),
            (
                "fb:99999999999G",
                CmdlineError::Overflow {
                    what: "size",
                    text: "99999999999G",
                },
                "size \"99999999999G\" does not fit in 64 bits",
            ),
            (
                "fb:1M@3K",
                CmdlineError::BadAlign(3 * K),
                "align 0xc00 is not a power of two",
            ),
            (
                "fb:1M@0",
                CmdlineError::BadAlign(0),
                "align 0x0 is not a power of two",
            ),
            (
                "fb:1M@",
                CmdlineError::NotANumber {
                    what: "align",
                    text: "",
                },
                "align \"\" is not a number (expected e.g. 4096, 0x1000, 64M)",
            ),
            (
                "fb:1M@2M@4M",
                CmdlineError::Trailing {
                    what: "align",
                    text: "2M@4M",
                    rest: "@4M",
                },
                "align \"2M@4M\": unexpected \"@4M\" after the number (a size takes one suffix of K, M, G, T, P or E)",
            ),
        ];
        for (input, err, msg) in cases {
            let got = parse_reserve(input);
            assert_eq!(got, Err(*err), "{input:?}");
            assert_eq!(got.unwrap_err().to_string(), *msg, "{input:?}");
        }
    }

    #[test]
    fn command_lines() {
        let line = "  console=ttyS0 quiet kmem-reserve=fb:64M@2M  foo=\"a b\" \"bar=c d\" \
                    kmem_reserve=ring:1M kmem_reserve kmem_reserve=bad:1X";
        let ps: Vec<_> = params(line).collect();
        assert_eq!(
            ps,
            [
                ("console", Some("ttyS0")),
                ("quiet", None),
                ("kmem-reserve", Some("fb:64M@2M")),
                ("foo", Some("a b")),
                ("bar", Some("c d")),
                ("kmem_reserve", Some("ring:1M")),
                ("kmem_reserve", None),
                ("kmem_reserve", Some("bad:1X")),
            ]
        );
        let rs: Vec<_> = reserves(line).collect();
        assert_eq!(rs.len(), 4);
        assert_eq!(rs[0], Ok(("fb", 64 * M, 2 * M)));
        assert_eq!(rs[1], Ok(("ring", M, 4096)));
        assert_eq!(rs[2], Err(CmdlineError::MissingColon("")));
        assert!(matches!(
            rs[3],
            Err(CmdlineError::Trailing { rest: "X", .. })
        ));
        assert!(parameq("kmem-reserve", "kmem_reserve"));
        assert!(!parameq("kmem_reserv", "kmem_reserve"));
        assert_eq!(params("").count(), 0);
        assert_eq!(params("   ").count(), 0);
    }
}

#[cfg(test)]
mod boot_param_tests {
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    fn p(name: &str, value: Option<&str>) -> Option<Param<'static>> {
        let name: &'static str = std::boxed::Box::leak(name.into());
        let value: Option<&'static str> = value.map(|v| &*std::boxed::Box::leak(v.into()));
        parse_param(name, value).unwrap()
    }

    fn err(name: &str, value: Option<&str>) -> std::string::String {
        parse_param(name, value).unwrap_err().to_string()
    }

    #[test]
    fn booleans_as_kstrtobool() {
        for t in ["1", "y", "Y", "yes", "t", "true", "on", "ON", "1x"] {
            assert_eq!(kstrtobool(t), Some(true), "{t}");
        }
        for f in ["0", "n", "no", "f", "false", "off", "OFF", "N"] {
            assert_eq!(kstrtobool(f), Some(false), "{f}");
        }
        for bad in ["", "2", "maybe", "o", "ox", "-1"] {
            assert_eq!(kstrtobool(bad), None, "{bad}");
        }
    }

    #[test]
    fn mem() {
        assert_eq!(p("mem", Some("1G")), Some(Param::Mem(G)));
        assert_eq!(p("mem", Some("0x20000000")), Some(Param::Mem(512 * M)));
        assert_eq!(p("mem", Some("nopentium")), Some(Param::NotModelled));
        assert_eq!(err("mem", None), "mem: a value is required");
        assert_eq!(err("mem", Some("0")), "mem=0: mem 0 is not allowed");
        assert_eq!(
            err("mem", Some("lots")),
            "mem=lots: mem \"lots\" is not a number (expected e.g. 4096, 0x1000, 64M)"
        );
        assert!(err("mem", Some("1GB")).contains("unexpected \"B\""));
    }

    #[test]
    fn memmap() {
        let all: Vec<_> = memmap_entries("exactmap,640K@0,3G@1M,64M$3G,1G!4G,4K#5G,2G").collect();
        assert_eq!(
            all,
            [
                Ok(Memmap::Exactmap),
                Ok(Memmap::Ram {
                    start: 0,
                    size: 640 << 10
                }),
                Ok(Memmap::Ram {
                    start: M,
                    size: 3 * G
                }),
                Ok(Memmap::Reserved {
                    start: 3 * G,
                    size: 64 * M
                }),
                Ok(Memmap::Protected {
                    start: 4 * G,
                    size: G
                }),
                Ok(Memmap::Acpi {
                    start: 5 * G,
                    size: 4096
                }),
                Ok(Memmap::Limit(2 * G)),
            ]
        );
        assert_eq!(p("memmap", Some("64M$3G")), Some(Param::Memmap("64M$3G")));
        assert!(err("memmap", Some("64M%3G")).contains("expected exactmap"));
        assert!(err("memmap", Some("64M@")).contains("start \"\" is not a number"));
        assert!(err("memmap", Some("64M@1G,x")).contains("\"x\": expected exactmap"));
        assert!(err("memmap", Some("64M@1Gx")).contains("unexpected \"x\""));
        assert!(err("memmap", Some("16E@16E")).contains("does not fit"));
        assert_eq!(err("memmap", None), "memmap: a value is required");
    }

    #[test]
    fn cpus_vmalloc_merge() {
        assert_eq!(p("nr_cpus", Some("2")), Some(Param::NrCpus(2)));
        assert_eq!(p("nr-cpus", Some("0x10")), Some(Param::NrCpus(16)));
        assert_eq!(p("nr_cpus", Some("0")), Some(Param::NrCpus(0)));
        assert!(err("nr_cpus", Some("two")).contains("nr_cpus \"two\" is not a number"));
        assert!(err("nr_cpus", Some("2x")).contains("unexpected \"x\""));
        assert_eq!(p("vmalloc", Some("256M")), Some(Param::Vmalloc(256 * M)));
        assert_eq!(
            err("vmalloc", Some("0")),
            "vmalloc=0: vmalloc 0 is not allowed"
        );
        assert!(err("vmalloc", Some("big")).contains("not a number"));
        assert_eq!(p("slab_nomerge", None), Some(Param::SlabMerge(false)));
        assert_eq!(p("slub_nomerge", None), Some(Param::SlabMerge(false)));
        assert_eq!(p("slab_merge", None), Some(Param::SlabMerge(true)));
        assert_eq!(
            p("slab_nomerge", Some("whatever")),
            Some(Param::SlabMerge(false)),
            "a value is ignored, as by __setup"
        );
    }

    #[test]
    fn booleans_params() {
        assert_eq!(
            p("init_on_alloc", Some("1")),
            Some(Param::InitOnAlloc(true))
        );
        assert_eq!(
            p("init_on_free", Some("off")),
            Some(Param::InitOnFree(false))
        );
        assert_eq!(p("page_poison", Some("on")), Some(Param::PagePoison(true)));
        assert_eq!(
            p("debug_pagealloc", Some("n")),
            Some(Param::DebugPagealloc(false))
        );
        assert_eq!(
            err("init_on_free", Some("maybe")),
            "init_on_free=maybe: \"maybe\" is not a boolean (expected 1/0, y/n, on/off or true/false)"
        );
        assert_eq!(err("page_poison", None), "page_poison: a value is required");
        assert!(err("debug_pagealloc", Some("")).contains("not a boolean"));
    }

    #[test]
    fn fault_attrs() {
        assert_eq!(
            p("failslab", Some("1,100,0,-1")),
            Some(Param::Failslab(FaultParams {
                interval: 1,
                probability: 100,
                space: 0,
                times: -1
            }))
        );
        assert_eq!(
            p("fail_page_alloc", Some("10,5,4096,+3")),
            Some(Param::FailPageAlloc(FaultParams {
                interval: 10,
                probability: 5,
                space: 4096,
                times: 3
            }))
        );
        for bad in [
            "",
            "1",
            "1,2,3",
            "1,2,3,4,5",
            "a,2,3,4",
            "1,-2,3,4",
            "1,2,3,x",
            "1,2,3,4 ",
            "1,2,99999999999,4",
            "0x1,2,3,4",
        ] {
            assert!(
                err("failslab", Some(bad))
                    .contains("expected <interval>,<probability>,<space>,<times>"),
                "{bad:?}"
            );
        }
        assert_eq!(
            err("fail_page_alloc", None),
            "fail_page_alloc: a value is required"
        );
    }

    #[test]
    fn min_free_kbytes_and_sysctl() {
        assert_eq!(
            p("min_free_kbytes", Some("8192")),
            Some(Param::MinFreeKbytes(8192))
        );
        assert_eq!(
            p("sysctl.vm.min_free_kbytes", Some("1024")),
            Some(Param::MinFreeKbytes(1024))
        );
        assert_eq!(
            p("sysctl/vm/min-free-kbytes", Some("1024")),
            Some(Param::MinFreeKbytes(1024))
        );
        assert!(err("min_free_kbytes", Some("8M")).contains("not a number"));
        assert_eq!(
            p("sysctl.vm.swappiness", Some("10")),
            Some(Param::NotModelled)
        );
    }

    #[test]
    fn reserve_unknown_and_not_modelled() {
        assert_eq!(
            p("kmem_reserve", Some("fb:64M@2M")),
            Some(Param::KmemReserve {
                name: "fb",
                size: 64 * M,
                align: 2 * M
            })
        );
        assert!(err("kmem_reserve", None).contains("expected <name>:<size>"));
        assert_eq!(p("console", Some("ttyS0")), Some(Param::NotModelled));
        assert_eq!(p("quiet", None), Some(Param::NotModelled));
        assert_eq!(
            p("usbcore.autosuspend", Some("-1")),
            Some(Param::NotModelled)
        );
        assert_eq!(p("foo", Some("1")), None);
        assert_eq!(p("bar", None), None);
        assert_eq!(p("memx", Some("1G")), None, "names match whole");
    }

    #[test]
    fn slub_debug_syntax() {
        let f = |s: Option<&'static str>| SlubDebug::new(s).global().to_string();
        assert_eq!(f(None), "FZPU", "slab_debug alone: full debugging");
        assert_eq!(f(Some("")), "FZPU");
        assert_eq!(f(Some("FZPU")), "FZPU");
        assert_eq!(f(Some("fzpu")), "FZPU", "letters in either case");
        assert_eq!(f(Some("F")), "F");
        assert_eq!(f(Some("TA")), "TA");
        assert_eq!(f(Some("-")), "-");
        assert_eq!(f(Some("FZ-P")), "P", "'-' clears what came before");
        assert_eq!(f(Some("O")), "-");
        assert_eq!(
            f(Some(",dentry")),
            "-",
            "a list alone leaves the global flags off"
        );
        assert_eq!(f(Some("F,dentry;Z")), "Z");

        let d = SlubDebug::new(Some(",dentry"));
        assert_eq!(d.flags_for("dentry").to_string(), "FZPU");
        assert_eq!(d.flags_for("inode_cache").to_string(), "-");
        assert!(d.enabled());

        let d = SlubDebug::new(Some("U;;FZ,kmalloc-*,dentry;P,inode_cache"));
        let blocks: Vec<_> = d.blocks().collect();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[1].slabs, Some("kmalloc-*,dentry"));
        assert_eq!(d.global().to_string(), "U");
        assert_eq!(d.flags_for("kmalloc-64").to_string(), "FZ");
        assert_eq!(d.flags_for("dentry").to_string(), "FZ");
        assert_eq!(
            d.flags_for("dentry2").to_string(),
            "U",
            "no glob: exact name"
        );
        assert_eq!(d.flags_for("inode_cache").to_string(), "P");
        assert_eq!(d.flags_for("vmap_area").to_string(), "U");

        let d = SlubDebug::new(Some("FXq,foo"));
        let unknown: Vec<char> = d.blocks().flat_map(|b| b.unknown_options()).collect();
        assert_eq!(unknown, ['X', 'q']);
        assert_eq!(d.flags_for("foo").to_string(), "F");
        assert!(
            SlubDebug::new(Some("O"))
                .blocks()
                .next()
                .unwrap()
                .higher_order_disable
        );
        assert!(!SlubDebug::new(Some("-")).enabled());
        assert_eq!(
            p("slub_debug", Some("FZPU")),
            Some(Param::SlubDebug(SlubDebug::new(Some("FZPU"))))
        );
        assert_eq!(
            p("slab_debug", None),
            Some(Param::SlubDebug(SlubDebug::new(None)))
        );
    }
}
