//! Formatting without an allocator: a fixed buffer that implements [`core::fmt::Write`].

use core::fmt;

/// A `fmt::Write` sink over a byte buffer; output past the end is dropped and remembered.
pub struct BufWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    truncated: bool,
}

impl<'a> BufWriter<'a> {
    /// A writer that fills `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        BufWriter {
            buf,
            len: 0,
            truncated: false,
        }
    }

    /// What has been written so far (cut at a character boundary if the buffer overflowed).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.buf[..self.len]) {
            Ok(s) => s,
            Err(e) => {
                // Only a truncated multi-byte character can be invalid: cut before it.
                let valid = e.valid_up_to();
                core::str::from_utf8(&self.buf[..valid]).unwrap_or_default()
            }
        }
    }

    /// True when some output did not fit.
    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

impl fmt::Write for BufWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.truncated = true;
        }
        Ok(())
    }
}

/// Formats `args` into `buf` and returns the text (truncated if it does not fit).
pub fn format_into<'a>(buf: &'a mut [u8], args: fmt::Arguments<'_>) -> &'a str {
    let mut w = BufWriter::new(buf);
    let _ = fmt::write(&mut w, args);
    let len = w.as_str().len();
    // SAFETY: `as_str` validated `buf[..len]` as UTF-8 just above, and the writer is gone.
    unsafe { core::str::from_utf8_unchecked(&buf[..len]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn truncates_at_char_boundary() {
        let mut buf = [0u8; 5];
        let mut w = BufWriter::new(&mut buf);
        write!(w, "abcdé€").unwrap();
        assert!(w.truncated());
        assert_eq!(w.as_str(), "abcd");
    }
}
