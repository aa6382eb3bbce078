//! Kernel command-line parsing: Linux's `memparse`, `next_arg`-style parameter splitting, and
//! the `kmem_reserve=<name>:<size>[@<align>]` parameter for buffers reserved at boot.
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
    match memparse(s) {
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
