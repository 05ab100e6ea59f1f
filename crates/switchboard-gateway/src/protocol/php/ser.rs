//! PHP `serialize()`.

use std::io::Write;

use super::float::{self, Precision};
use super::{Key, Value};

/// Appends PHP's `serialize($value)` to `out`.
///
/// Floats use `serialize_precision = -1` (`d:0.1;`, `d:2;`, `d:1.0E+25;`,
/// `d:INF;`); strings are written by byte length. Nesting is as deep as the
/// value: values from [`unserialize`](super::unserialize) are bounded by its
/// depth limit.
pub fn serialize(value: &Value, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail, so the `write!` results are ignored.
    match value {
        Value::Null => out.extend_from_slice(b"N;"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"b:1;" } else { b"b:0;" }),
        Value::Int(i) => {
            let _ = write!(out, "i:{i};");
        }
        Value::Float(f) => {
            out.extend_from_slice(b"d:");
            float::write(out, *f, Precision::Shortest, b'E');
            out.push(b';');
        }
        Value::Str(s) => write_str(out, s),
        Value::Array(a) => {
            let _ = write!(out, "a:{}:{{", a.len());
            for (k, v) in a {
                match k {
                    Key::Int(i) => {
                        let _ = write!(out, "i:{i};");
                    }
                    Key::Str(s) => write_str(out, s),
                }
                serialize(v, out);
            }
            out.push(b'}');
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    let _ = write!(out, "s:{}:\"", s.len());
    out.extend_from_slice(s);
    out.extend_from_slice(b"\";");
}

/// PHP's `serialize($value)` as a new buffer.
pub fn to_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    serialize(value, &mut out);
    out
}
