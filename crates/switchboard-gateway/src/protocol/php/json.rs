//! PHP's `json_encode` and `json_decode($json, true)`, and a JSON view of values.
//!
//! `json_encode` with default flags escapes `/` as `\/` and every non-ASCII
//! character as `\uXXXX` (UTF-16, lowercase hex), writes arrays whose keys are
//! `0..n-1` in order as JSON arrays and every other array as an object, and
//! fails on strings that are not UTF-8 and on infinite or NaN floats.
//! `json_decode` keeps object member order and turns numeric member names into
//! integer keys, as PHP arrays do.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

use super::array::Builder;
use super::float::{self, Precision};
use super::{Array, Key, Value};

/// PHP's `json_encode` depth limit.
const MAX_ENCODE_DEPTH: usize = 512;

/// `json_encode` or `json_decode` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// A string or key to encode is not UTF-8 (PHP's `JSON_ERROR_UTF8`).
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// An infinite or NaN float (PHP's `JSON_ERROR_INF_OR_NAN`).
    #[error("infinite or NaN float")]
    NonFinite,
    /// Arrays nested deeper than PHP's limit of 512.
    #[error("arrays nested deeper than {MAX_ENCODE_DEPTH}")]
    TooDeep,
    /// The input is not JSON.
    #[error("malformed JSON")]
    Syntax(#[source] serde_json::Error),
}

/// PHP's `json_encode($value)` with default flags.
pub fn json_encode(value: &Value) -> Result<Vec<u8>, JsonError> {
    let mut out = Vec::new();
    encode_value(&mut out, value, 0)?;
    Ok(out)
}

fn encode_value(out: &mut Vec<u8>, value: &Value, depth: usize) -> Result<(), JsonError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Float(f) if f.is_finite() => float::write(out, *f, Precision::Shortest, b'e'),
        Value::Float(_) => return Err(JsonError::NonFinite),
        Value::Str(s) => {
            encode_str(
                out,
                std::str::from_utf8(s).map_err(|_| JsonError::InvalidUtf8)?,
            );
        }
        Value::Array(a) => {
            if depth >= MAX_ENCODE_DEPTH {
                return Err(JsonError::TooDeep);
            }
            let list = a.is_list();
            out.push(if list { b'[' } else { b'{' });
            for (i, (k, v)) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                if !list {
                    match k {
                        Key::Int(n) => {
                            out.push(b'"');
                            out.extend_from_slice(n.to_string().as_bytes());
                            out.push(b'"');
                        }
                        Key::Str(s) => encode_str(
                            out,
                            std::str::from_utf8(s).map_err(|_| JsonError::InvalidUtf8)?,
                        ),
                    }
                    out.push(b':');
                }
                encode_value(out, v, depth + 1)?;
            }
            out.push(if list { b']' } else { b'}' });
        }
    }
    Ok(())
}

/// Appends `s` as a JSON string the way PHP escapes it by default.
pub(crate) fn encode_str(out: &mut Vec<u8>, s: &str) {
    fn u16_escape(out: &mut Vec<u8>, unit: u16) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(b"\\u");
        for shift in [12, 8, 4, 0] {
            out.push(HEX[usize::from((unit >> shift) & 0xf)]);
        }
    }
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '/' => out.extend_from_slice(b"\\/"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            // ASCII is one byte; DEL (0x7f) is not escaped by PHP.
            c if c.is_ascii() && c >= ' ' => out.push(c as u8),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    u16_escape(out, *unit);
                }
            }
        }
    }
    out.push(b'"');
}

/// PHP's `json_decode($json, true)`: objects become arrays in member order,
/// numeric member names become integer keys, a repeated name keeps its first
/// position and takes the last value, integers beyond `i64` become floats.
///
/// One known difference: the number `-0` reads as the float `-0.0` where PHP
/// reads the integer `0`, because serde_json does not say whether a number
/// had a fraction. Nesting deeper than serde_json's 128 levels is refused
/// (PHP allows 512).
pub fn json_decode(json: &[u8]) -> Result<Value, JsonError> {
    serde_json::from_slice::<PhpJson>(json)
        .map(|v| v.0)
        .map_err(JsonError::Syntax)
}

/// A [`Value`] read from JSON through serde, keeping object member order.
struct PhpJson(Value);

impl<'de> Deserialize<'de> for PhpJson {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PhpVisitor).map(PhpJson)
    }
}

struct PhpVisitor;

impl<'de> Visitor<'de> for PhpVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(i64::try_from(u).map_or(Value::Float(u as f64), Value::Int))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Float(f))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::from(s))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::from(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut values = Vec::new();
        while let Some(PhpJson(v)) = seq.next_element()? {
            values.push(v);
        }
        Ok(Value::Array(Array::list(values)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Builder::with_capacity(0);
        while let Some((k, PhpJson(v))) = map.next_entry::<String, PhpJson>()? {
            out.insert(Key::from(k), v);
        }
        Ok(Value::Array(out.finish()))
    }
}

/// A JSON view of a value for logs and tests, in the notation of the
/// protocol's test vectors: lists as arrays, arrays whose keys are all strings
/// as objects, other arrays as `{"$php_array": [[key, value], …]}`.
/// Non-UTF-8 strings become `{"$php_bytes": "<hex>"}` and non-finite floats
/// `{"$php_float": "INF"}`, so nothing is lost but the member order of objects,
/// which `serde_json::Map` does not keep unless its `preserve_order` feature is on.
pub fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    let tagged = |tag: &str, v: J| J::Object([(tag.to_owned(), v)].into_iter().collect());
    match value {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or_else(
            || {
                let mut text = Vec::new();
                float::write(&mut text, *f, Precision::Shortest, b'E');
                tagged(
                    "$php_float",
                    J::String(String::from_utf8_lossy(&text).into()),
                )
            },
            J::Number,
        ),
        Value::Str(s) => match std::str::from_utf8(s) {
            Ok(s) => J::String(s.to_owned()),
            Err(_) => tagged("$php_bytes", J::String(hex(s))),
        },
        Value::Array(a) if a.is_list() => J::Array(a.values().map(to_json).collect()),
        Value::Array(a) => {
            let object: Option<serde_json::Map<String, J>> = a
                .iter()
                .map(|(k, v)| match k {
                    Key::Str(s) => std::str::from_utf8(s)
                        .ok()
                        .map(|s| (s.to_owned(), to_json(v))),
                    Key::Int(_) => None,
                })
                .collect();
            object.map_or_else(
                || {
                    let pairs = a
                        .iter()
                        .map(|(k, v)| J::Array(vec![to_json(&Value::from(k.clone())), to_json(v)]))
                        .collect();
                    tagged("$php_array", J::Array(pairs))
                },
                J::Object,
            )
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &Value) -> String {
        String::from_utf8(json_encode(v).unwrap()).unwrap()
    }

    #[test]
    fn encodes_like_php() {
        // PHP 8.2: json_encode(["a/b", "é", "😀", "\x01\t\"\\", "\x7f"])
        let v = Value::Array(Array::list(["a/b", "é", "😀", "\x01\t\"\\", "\x7f"]));
        assert_eq!(
            enc(&v),
            r#"["a\/b","\u00e9","\ud83d\ude00","\u0001\t\"\\",""#.to_owned() + "\x7f\"]"
        );
        let m = |pairs: &[(i64, i64)]| Value::Array(pairs.iter().copied().collect());
        assert_eq!(enc(&m(&[(0, 0)])), "[0]");
        assert_eq!(enc(&m(&[(1, 1)])), r#"{"1":1}"#);
        assert_eq!(enc(&m(&[])), "[]");
        assert_eq!(enc(&Value::Float(1.0)), "1");
        assert_eq!(enc(&Value::Float(1e25)), "1.0e+25");
        assert_eq!(
            enc(&Value::from("\u{8}\u{c}\n\r\t\u{1f}\0")),
            r#""\b\f\n\r\t\u001f\u0000""#
        );
        assert!(matches!(
            json_encode(&Value::from(&b"\xff"[..])),
            Err(JsonError::InvalidUtf8)
        ));
        assert!(matches!(
            json_encode(&Value::Float(f64::NAN)),
            Err(JsonError::NonFinite)
        ));
    }

    #[test]
    fn decodes_like_php_assoc() {
        let v = json_decode(br#"{"2":"b","0":"a","x":{"5":1},"2":"c","big":18446744073709551615}"#)
            .unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(
            a.keys().cloned().collect::<Vec<_>>(),
            [Key::Int(2), Key::Int(0), Key::from("x"), Key::from("big")]
        );
        assert_eq!(a.get(&Key::Int(2)), Some(&Value::from("c")));
        assert_eq!(
            a.get_str("big"),
            Some(&Value::Float(18446744073709551615.0))
        );
        assert_eq!(
            json_decode(b"[1, \"x\", null, true, 1.5]").unwrap(),
            Value::Array(Array::list([
                Value::Int(1),
                Value::from("x"),
                Value::Null,
                Value::Bool(true),
                Value::Float(1.5)
            ]))
        );
        // Floats are read correctly rounded, as PHP's strtod does.
        assert_eq!(
            json_decode(b"9.528458136547249e+121").unwrap(),
            Value::Float(9.528458136547249e+121)
        );
        assert!(json_decode(b"{").is_err());
        assert!(json_decode(b"[1] x").is_err());
    }

    #[test]
    fn json_view() {
        let sessions: Array = [(1, "a:0:{}")].into_iter().collect();
        assert_eq!(
            to_json(&Value::Array(sessions)),
            serde_json::json!({"$php_array": [[1, "a:0:{}"]]})
        );
        assert_eq!(
            to_json(&Value::from(&b"\xff"[..])),
            serde_json::json!({"$php_bytes": "ff"})
        );
        assert_eq!(
            to_json(&Value::Float(f64::INFINITY)),
            serde_json::json!({"$php_float": "INF"})
        );
    }

    #[test]
    fn arrays_nest_as_deep_as_php_allows_and_no_deeper() {
        fn nested(levels: usize) -> Value {
            let mut v = Value::Int(1);
            for _ in 0..levels {
                let mut a = Array::new();
                a.insert(0, v);
                v = Value::Array(a);
            }
            v
        }
        // PHP's json_encode: 512 levels of arrays encode, 513 do not.
        assert!(json_encode(&nested(MAX_ENCODE_DEPTH)).is_ok());
        assert!(matches!(
            json_encode(&nested(MAX_ENCODE_DEPTH + 1)),
            Err(JsonError::TooDeep)
        ));
    }
}
