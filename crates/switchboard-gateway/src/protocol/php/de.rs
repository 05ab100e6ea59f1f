//! PHP `unserialize()` for the types GatewayWorker exchanges.
//!
//! The grammar is PHP 8's (`ext/standard/var_unserializer.re`), including its
//! leniencies: signs and leading zeros in integers (`i:+007;`), saturation of
//! out-of-range integers, `d:` in any `strtod` form PHP's grammar admits,
//! `S:` escaped strings, and numeric string keys becoming integer keys. A
//! repeated key keeps its first position and takes the last value, as in PHP.
//!
//! Untrusted input cannot make the decoder allocate much more than the input
//! size: element counts are checked against the bytes left before anything is
//! reserved, and nesting is bounded by [`MAX_DEPTH`].

use bytes::Bytes;

use super::array::Builder;
use super::{Key, PhpError, Value};

/// How many arrays may nest inside each other (PHP's own default is 4096;
/// sessions and replies use two or three).
pub const MAX_DEPTH: usize = 64;

/// The fewest bytes one array element can take: `i:0;` and `N;`.
const MIN_ELEMENT_LEN: usize = 6;

/// Never reserve room for more elements than this before they are parsed, so
/// that nested arrays claiming huge counts cannot multiply reservations.
const MAX_RESERVE: usize = 256;

/// PHP's `unserialize($input, ['allowed_classes' => false])`, strictly: the
/// whole input must be one value.
///
/// PHP 8.2 ignores bytes after the value; [`unserialize_prefix`] does the same
/// and says where the value ended.
pub fn unserialize(input: &[u8]) -> Result<Value, PhpError> {
    let (value, end) = unserialize_prefix(input)?;
    if end != input.len() {
        return Err(PhpError::Trailing { offset: end });
    }
    Ok(value)
}

/// Decodes the value at the start of `input` and returns it with the number of
/// bytes it took, ignoring the rest as PHP does.
pub fn unserialize_prefix(input: &[u8]) -> Result<(Value, usize), PhpError> {
    let mut p = Parser { input, pos: 0 };
    let value = p.value(0)?;
    Ok((value, p.pos))
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Result<u8, PhpError> {
        self.input
            .get(self.pos)
            .copied()
            .ok_or(PhpError::UnexpectedEnd)
    }

    fn syntax(&self) -> PhpError {
        PhpError::Syntax { offset: self.pos }
    }

    /// Consumes `b` or fails.
    fn expect(&mut self, b: u8) -> Result<(), PhpError> {
        if self.peek()? != b {
            return Err(self.syntax());
        }
        self.pos += 1;
        Ok(())
    }

    /// Consumes ASCII digits and returns them (possibly none).
    fn digits(&mut self) -> &'a [u8] {
        let input = self.input;
        let start = self.pos;
        while input.get(self.pos).is_some_and(u8::is_ascii_digit) {
            self.pos += 1;
        }
        &input[start..self.pos]
    }

    /// One or more ASCII digits (`[0-9]+`).
    fn some_digits(&mut self) -> Result<&'a [u8], PhpError> {
        let at = self.pos;
        match self.digits() {
            [] if at == self.input.len() => Err(PhpError::UnexpectedEnd),
            [] => Err(PhpError::Syntax { offset: at }),
            digits => Ok(digits),
        }
    }

    /// An unsigned count or length (`[0-9]+`); overflow is an error, as in PHP.
    fn count(&mut self) -> Result<usize, PhpError> {
        let at = self.pos;
        self.some_digits()?
            .iter()
            .try_fold(0usize, |n, d| {
                n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
            })
            .ok_or(PhpError::Syntax { offset: at })
    }

    fn value(&mut self, depth: usize) -> Result<Value, PhpError> {
        let at = self.pos;
        let tag = self.peek()?;
        if tag == b'N' {
            self.pos += 1;
            self.expect(b';')?;
            return Ok(Value::Null);
        }
        if !matches!(tag, b'b' | b'i' | b'd' | b's' | b'S' | b'a') {
            return Err(match tag {
                b'O' | b'C' | b'E' => PhpError::Object { offset: at },
                b'r' | b'R' => PhpError::Reference { offset: at },
                _ => self.syntax(),
            });
        }
        self.pos += 1;
        self.expect(b':')?;
        let value = match tag {
            b'b' => {
                let b = match self.peek()? {
                    b'0' => false,
                    b'1' => true,
                    _ => return Err(self.syntax()),
                };
                self.pos += 1;
                Value::Bool(b)
            }
            b'i' => Value::Int(self.int()?),
            b'd' => Value::Float(self.float()?),
            b's' => return self.string().map(Value::Str),
            b'S' => return self.escaped_string().map(Value::Str),
            _ => return self.array(depth + 1).map(Value::Array),
        };
        self.expect(b';')?;
        Ok(value)
    }

    /// `[+-]?[0-9]+`, saturating at the `i64` bounds like PHP's `strtol`.
    fn int(&mut self) -> Result<i64, PhpError> {
        let negative = match self.peek()? {
            b'-' => true,
            b'+' => false,
            _ => {
                return self.magnitude().map(|m| m.min(i64::MAX as u64) as i64);
            }
        };
        self.pos += 1;
        let m = self.magnitude()?;
        Ok(if negative {
            0i64.saturating_sub_unsigned(m)
        } else {
            m.min(i64::MAX as u64) as i64
        })
    }

    /// `[0-9]+` as a saturating `u64`.
    fn magnitude(&mut self) -> Result<u64, PhpError> {
        Ok(self.some_digits()?.iter().fold(0u64, |n, d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        }))
    }

    /// `NAN`, `-?INF`, or `[+-]?` then `digits`, `digits.`, `.digits` or
    /// `digits.digits`, then an optional `[eE][+-]?digits`.
    fn float(&mut self) -> Result<f64, PhpError> {
        let start = self.pos;
        let rest = &self.input[start..];
        for (text, v) in [
            (&b"NAN"[..], f64::NAN),
            (b"INF", f64::INFINITY),
            (b"-INF", f64::NEG_INFINITY),
        ] {
            if rest.starts_with(text) {
                self.pos += text.len();
                return Ok(v);
            }
        }
        if matches!(self.peek()?, b'+' | b'-') {
            self.pos += 1;
        }
        let mut mantissa = self.digits().len();
        if self.peek()? == b'.' {
            self.pos += 1;
            mantissa += self.digits().len();
        }
        if mantissa == 0 {
            return Err(self.syntax());
        }
        if matches!(self.peek()?, b'e' | b'E') {
            self.pos += 1;
            if matches!(self.peek()?, b'+' | b'-') {
                self.pos += 1;
            }
            if self.digits().is_empty() {
                return Err(self.syntax());
            }
        }
        // The bytes just checked are ASCII in a grammar Rust's parser accepts too.
        std::str::from_utf8(&self.input[start..self.pos])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(PhpError::Syntax { offset: start })
    }

    /// The declared length, `:"`, then checks that `len` bytes and `";` follow.
    fn string_len(&mut self) -> Result<usize, PhpError> {
        let len = self.count()?;
        self.expect(b':')?;
        self.expect(b'"')?;
        // `len + 2` bytes must remain; compared this way it cannot overflow.
        if self.input.len() - self.pos < len || self.input.len() - self.pos - len < 2 {
            return Err(PhpError::UnexpectedEnd);
        }
        Ok(len)
    }

    fn string_end(&mut self) -> Result<(), PhpError> {
        self.expect(b'"')?;
        self.expect(b';')
    }

    /// `s:LEN:"bytes";`
    fn string(&mut self) -> Result<Bytes, PhpError> {
        let len = self.string_len()?;
        let s = Bytes::copy_from_slice(&self.input[self.pos..self.pos + len]);
        self.pos += len;
        self.string_end()?;
        Ok(s)
    }

    /// `S:LEN:"…";` where `\xx` (two hex digits) stands for one byte and LEN
    /// counts decoded bytes. `serialize` never writes it, PHP still reads it.
    fn escaped_string(&mut self) -> Result<Bytes, PhpError> {
        let len = self.count()?;
        self.expect(b':')?;
        self.expect(b'"')?;
        // Each decoded byte takes at least one input byte.
        if self.input.len() - self.pos < len {
            return Err(PhpError::UnexpectedEnd);
        }
        let mut s = Vec::with_capacity(len);
        for _ in 0..len {
            match self.peek()? {
                b'\\' => {
                    let hex = self
                        .input
                        .get(self.pos + 1..self.pos + 3)
                        .ok_or(PhpError::UnexpectedEnd)?;
                    let byte = std::str::from_utf8(hex)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                        .filter(|_| hex.iter().all(u8::is_ascii_hexdigit))
                        .ok_or(PhpError::Syntax { offset: self.pos })?;
                    s.push(byte);
                    self.pos += 3;
                }
                b => {
                    s.push(b);
                    self.pos += 1;
                }
            }
        }
        self.string_end()?;
        Ok(Bytes::from(s))
    }

    /// `a:N:{` then N key/value pairs then `}`.
    fn array(&mut self, depth: usize) -> Result<super::Array, PhpError> {
        if depth > MAX_DEPTH {
            return Err(PhpError::TooDeep { max: MAX_DEPTH });
        }
        let n = self.count()?;
        self.expect(b':')?;
        self.expect(b'{')?;
        // N elements and the `}` cannot fit in fewer bytes than this.
        let left = self.input.len() - self.pos;
        if n > left.saturating_sub(1) / MIN_ELEMENT_LEN {
            return Err(PhpError::UnexpectedEnd);
        }
        let mut out = Builder::with_capacity(n.min(MAX_RESERVE));
        for _ in 0..n {
            let key = self.key()?;
            let value = self.value(depth)?;
            out.insert(key, value);
        }
        self.expect(b'}')?;
        Ok(out.finish())
    }

    /// An array key: `i:…;`, `s:…;` or `S:…;`, numeric strings becoming integers.
    fn key(&mut self) -> Result<Key, PhpError> {
        let at = self.pos;
        match self.peek()? {
            b'i' | b's' | b'S' => match self.value(0)? {
                Value::Int(i) => Ok(Key::Int(i)),
                Value::Str(s) => Ok(Key::from_bytes(s)),
                _ => Err(PhpError::Syntax { offset: at }),
            },
            _ => Err(self.syntax()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::to_bytes;
    use super::*;

    fn round(s: &str) -> Result<String, PhpError> {
        unserialize(s.as_bytes()).map(|v| String::from_utf8(to_bytes(&v)).unwrap())
    }

    #[test]
    fn php_leniencies() {
        // Each pair: input and PHP 8.2's serialize(unserialize(input)).
        for (input, want) in [
            ("i:-99999999999999999999;", "i:-9223372036854775808;"),
            ("i:9223372036854775808;", "i:9223372036854775807;"),
            ("i:-0;", "i:0;"),
            ("i:+5;", "i:5;"),
            ("i:0001;", "i:1;"),
            ("d:1.e5;", "d:100000;"),
            ("d:.5e-3;", "d:0.0005;"),
            ("d:1e+5;", "d:100000;"),
            ("d:0001.5;", "d:1.5;"),
            ("d:+1;", "d:1;"),
            ("d:-INF;", "d:-INF;"),
            ("d:1e400;", "d:INF;"),
            ("s:02:\"ab\";", "s:2:\"ab\";"),
            ("a:01:{i:0;N;}", "a:1:{i:0;N;}"),
            ("S:2:\"\\61b\";", "s:2:\"ab\";"),
            ("a:1:{s:2:\"-5\";N;}", "a:1:{i:-5;N;}"),
            ("a:1:{s:2:\"05\";N;}", "a:1:{s:2:\"05\";N;}"),
            ("a:1:{s:2:\"-0\";N;}", "a:1:{s:2:\"-0\";N;}"),
            ("a:2:{i:1;i:1;i:1;i:2;}", "a:1:{i:1;i:2;}"),
        ] {
            assert_eq!(round(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refusals() {
        // Everything PHP 8.2 refuses, plus objects and references, which it
        // would accept but GatewayWorker never sends.
        for input in [
            "",
            "i:;",
            "d:;",
            "d:1.5e;",
            "d:-NAN;",
            "d:+INF;",
            "d:.e5;",
            "d:0x1A;",
            "d: 1;",
            "i: 1;",
            "b:01;",
            "b:2;",
            "s:3:\"ab\";",
            "s:2:\"ab\"",
            "a:1:{d:1.5;N;}",
            "a:1:{b:1;N;}",
            "a:1:{N;N;}",
            "a:2:{i:0;N;}",
            "s:+2:\"ab\";",
            "a:+1:{i:0;N;}",
            "d:1_0;",
            "x",
            "N",
            "S:1:\"\\6g\";",
            "s:99999999999999999999999:\"\";",
        ] {
            assert!(unserialize(input.as_bytes()).is_err(), "{input:?}");
        }
        let obj = unserialize(b"a:1:{i:0;O:8:\"stdClass\":0:{}}");
        assert_eq!(obj, Err(PhpError::Object { offset: 9 }));
        assert_eq!(
            unserialize(b"C:1:\"a\":0:{}"),
            Err(PhpError::Object { offset: 0 })
        );
        assert_eq!(
            unserialize(b"a:1:{i:0;R:1;}"),
            Err(PhpError::Reference { offset: 9 })
        );
        assert_eq!(unserialize(b"r:1;"), Err(PhpError::Reference { offset: 0 }));
        assert_eq!(unserialize(b"i:1;x"), Err(PhpError::Trailing { offset: 4 }));
        assert_eq!(unserialize_prefix(b"i:1;x"), Ok((Value::Int(1), 4)));
    }

    #[test]
    fn huge_counts_and_lengths_fail_before_allocating() {
        assert_eq!(unserialize(b"a:999999999:{"), Err(PhpError::UnexpectedEnd));
        assert_eq!(unserialize(b"s:999999999:\""), Err(PhpError::UnexpectedEnd));
        assert_eq!(unserialize(b"S:999999999:\""), Err(PhpError::UnexpectedEnd));
        // A count that fits the input but is not backed by elements.
        assert_eq!(
            unserialize(b"a:2:{i:0;N;N;N;N;N;}"),
            Err(PhpError::Syntax { offset: 11 })
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let nested = |n: usize| "a:1:{i:0;".repeat(n) + "N;" + &"}".repeat(n);
        assert!(unserialize(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            unserialize(nested(MAX_DEPTH + 1).as_bytes()),
            Err(PhpError::TooDeep { max: MAX_DEPTH })
        );
        // A bomb far deeper than the stack could take fails fast.
        let bomb = "a:1:{i:0;".repeat(1_000_000);
        assert_eq!(
            unserialize(bomb.as_bytes()),
            Err(PhpError::TooDeep { max: MAX_DEPTH })
        );
    }

    #[test]
    fn missing_digits_at_the_end_are_an_end_not_a_syntax_error() {
        assert_eq!(unserialize(b"s:"), Err(PhpError::UnexpectedEnd));
        assert_eq!(unserialize(b"s:x"), Err(PhpError::Syntax { offset: 2 }));
    }

    #[test]
    fn declared_lengths_past_the_input_are_refused_before_reading() {
        for input in [
            &b"s:5:\"ab"[..],
            b"s:2:\"ab",
            b"s:99999999999:\"x\";",
            b"S:99999999999:\"x\";",
            b"a:5:{}",
        ] {
            assert_eq!(
                unserialize(input),
                Err(PhpError::UnexpectedEnd),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
