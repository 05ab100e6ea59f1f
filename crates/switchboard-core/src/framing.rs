//! Message framing for raw TCP connections, as pure functions over buffers.
//!
//! Two framings are supported: newline-delimited (`\n`, an optional `\r` before
//! it is stripped) and a u32 big-endian length prefix. Decoders take bytes from
//! the front of a buffer and enforce the maximum message size before buffering
//! more than that, so a peer cannot make a connection hold unbounded memory.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// How messages are delimited on a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// One message per line, terminated by `\n`.
    #[default]
    Line,
    /// A u32 big-endian length, then that many bytes.
    Length,
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Framing::Line => "line",
            Framing::Length => "length",
        })
    }
}

impl std::str::FromStr for Framing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "line" => Ok(Framing::Line),
            "length" => Ok(Framing::Length),
            other => Err(format!("unknown framing {other:?}: use line or length")),
        }
    }
}

/// A framing violation. The connection cannot continue after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// A message is longer than the configured maximum.
    #[error("message of {len} bytes or more exceeds the maximum of {max} bytes")]
    TooLong {
        /// Bytes seen (a lower bound for line framing).
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A line-framed message to send contains a newline, which would split it.
    #[error("message contains a newline and cannot be line-framed")]
    NewlineInMessage,
}

/// A decoder for one connection: remembers how far a line has been scanned so
/// a slow sender does not make decoding quadratic.
#[derive(Debug, Clone)]
pub struct Decoder {
    framing: Framing,
    max: usize,
    scanned: usize,
}

impl Decoder {
    /// A decoder refusing messages longer than `max` bytes.
    pub fn new(framing: Framing, max: usize) -> Self {
        Self {
            framing,
            max,
            scanned: 0,
        }
    }

    /// Takes the next complete message from the front of `buf`, if any.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
        match self.framing {
            Framing::Line => self.decode_line(buf),
            Framing::Length => decode_length(buf, self.max),
        }
    }

    fn decode_line(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
        let start = self.scanned.min(buf.len());
        match buf[start..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let end = start + i;
                self.scanned = 0;
                let mut line = buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                if line.len() > self.max {
                    return Err(FramingError::TooLong {
                        len: line.len(),
                        max: self.max,
                    });
                }
                Ok(Some(line.freeze()))
            }
            None => {
                self.scanned = buf.len();
                // One byte of slack for a `\r` before the `\n`.
                if buf.len() > self.max + 1 {
                    return Err(FramingError::TooLong {
                        len: buf.len(),
                        max: self.max,
                    });
                }
                Ok(None)
            }
        }
    }
}

fn decode_length(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FramingError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FramingError::TooLong { len, max });
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Appends one framed message to `out`.
pub fn encode(framing: Framing, msg: &[u8], out: &mut BytesMut) -> Result<(), FramingError> {
    match framing {
        Framing::Line => {
            if msg.contains(&b'\n') {
                return Err(FramingError::NewlineInMessage);
            }
            out.reserve(msg.len() + 1);
            out.put_slice(msg);
            out.put_u8(b'\n');
        }
        Framing::Length => {
            let len = u32::try_from(msg.len()).map_err(|_| FramingError::TooLong {
                len: msg.len(),
                max: u32::MAX as usize,
            })?;
            out.reserve(msg.len() + 4);
            out.put_u32(len);
            out.put_slice(msg);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(
        framing: Framing,
        max: usize,
        input: &[u8],
        chunk: usize,
    ) -> Result<Vec<Bytes>, FramingError> {
        let mut d = Decoder::new(framing, max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(m) = d.decode(&mut buf)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    #[test]
    fn lines() {
        let got = all(Framing::Line, 10, b"a\r\nbc\n\n", 1).unwrap();
        assert_eq!(got, [&b"a"[..], b"bc", b""]);
        assert!(matches!(
            all(Framing::Line, 3, b"abcdef\n", 2),
            Err(FramingError::TooLong { max: 3, .. })
        ));
        assert!(all(Framing::Line, 3, b"abc\r\n", 1).is_ok());
        let mut out = BytesMut::new();
        assert_eq!(
            encode(Framing::Line, b"a\nb", &mut out),
            Err(FramingError::NewlineInMessage)
        );
    }

    #[test]
    fn length_prefixed() {
        let got = all(Framing::Length, 10, b"\0\0\0\x02hi\0\0\0\0", 3).unwrap();
        assert_eq!(got, [&b"hi"[..], b""]);
        assert_eq!(
            all(Framing::Length, 10, b"\0\0\0\x0bxxxxxxxxxxx", 64),
            Err(FramingError::TooLong { len: 11, max: 10 })
        );
        // A huge declared length is refused before anything is buffered for it.
        let mut buf = BytesMut::from(&b"\xff\xff\xff\xff"[..]);
        assert!(
            Decoder::new(Framing::Length, 1 << 20)
                .decode(&mut buf)
                .is_err()
        );
    }

    proptest! {
        #[test]
        fn round_trip(msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..50), 0..20),
                      chunk in 1usize..64, length in any::<bool>()) {
            let framing = if length { Framing::Length } else { Framing::Line };
            let msgs: Vec<Vec<u8>> = if length { msgs } else {
                // Line framing cannot carry `\n`, and a trailing `\r` is taken as part of a CRLF.
                msgs.into_iter().map(|m| m.into_iter().filter(|&b| b != b'\n' && b != b'\r').collect()).collect()
            };
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode(framing, m, &mut wire).unwrap();
            }
            let got = all(framing, 64, &wire, chunk).unwrap();
            prop_assert_eq!(got.iter().map(|b| b.to_vec()).collect::<Vec<_>>(), msgs);
        }

        #[test]
        fn decoder_is_bounded(input in prop::collection::vec(any::<u8>(), 0..300), chunk in 1usize..32, length in any::<bool>()) {
            let framing = if length { Framing::Length } else { Framing::Line };
            let max = 16;
            let mut d = Decoder::new(framing, max);
            let mut buf = BytesMut::new();
            'outer: for piece in input.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match d.decode(&mut buf) {
                        Ok(Some(m)) => prop_assert!(m.len() <= max),
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
                // Never more than one maximal message plus a header and the last chunk is held.
                prop_assert!(buf.len() <= max + 4 + chunk);
            }
        }
    }

    #[test]
    fn framing_names_round_trip() {
        for f in [Framing::Line, Framing::Length] {
            assert_eq!(f.to_string().parse::<Framing>(), Ok(f));
        }
        assert_eq!(Framing::Length.to_string(), "length");
        assert!("lines".parse::<Framing>().unwrap_err().contains("lines"));
    }

    #[test]
    fn a_length_prefixed_message_of_exactly_the_maximum_is_taken() {
        let got = all(Framing::Length, 3, b"\0\0\0\x03abc", 64).unwrap();
        assert_eq!(got, [&b"abc"[..]]);
        // A partial message reserves room for the whole of it, once.
        let mut buf = BytesMut::from(&b"\0\0\0\x40ab"[..]);
        let mut d = Decoder::new(Framing::Length, 1 << 10);
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert!(buf.capacity() >= 4 + 0x40, "{}", buf.capacity());
        assert_eq!(
            buf.len(),
            6,
            "nothing is consumed before the message is whole"
        );
    }
}
