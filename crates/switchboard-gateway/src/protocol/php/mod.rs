//! PHP values and the PHP functions the protocol depends on, byte-exact with PHP 8.
//!
//! Bodies with flag 0, sessions, `CMD_ON_WEBSOCKET_CONNECT` data and query
//! replies are PHP `serialize()` output; list-carrying `ext_data` is PHP
//! `json_encode()` output. A [`Value`] is what those carry: null, booleans,
//! integers, floats, binary strings and ordered arrays with integer or string
//! keys. Objects and references are refused on decode: GatewayWorker never
//! sends them and its own decoder forbids classes.
//!
//! - [`serialize`], [`to_bytes`], [`unserialize`], [`unserialize_prefix`]
//! - [`json_encode`], [`json_decode`] (`json_decode($s, true)`), [`to_json`] (a
//!   lossless view for logs and tests)
//! - [`array_replace_recursive`], used to merge sessions.

mod array;
mod de;
mod float;
mod json;
mod ser;

use bytes::Bytes;

pub use array::{Array, array_replace_recursive};
pub use de::{MAX_DEPTH, unserialize, unserialize_prefix};
pub(crate) use json::encode_str as encode_json_str;
pub use json::{JsonError, json_decode, json_encode, to_json};
pub use ser::{serialize, to_bytes};

/// An array key. PHP has only integer and string keys, and a string that reads
/// as a canonical decimal integer (`"5"`, `"-3"`, not `"05"` or `"-0"`) is
/// always stored as the integer: the `From` conversions apply that rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// An integer key.
    Int(i64),
    /// A string key (binary-safe). Build it with `Key::from` so numeric
    /// strings become [`Key::Int`], as in PHP.
    Str(Bytes),
}

impl Key {
    /// The key PHP uses for the string `s`: an integer for canonical decimal
    /// strings in `i64` range, the string itself otherwise.
    pub fn from_bytes(s: impl Into<Bytes>) -> Key {
        let s = s.into();
        match numeric_key(&s) {
            Some(i) => Key::Int(i),
            None => Key::Str(s),
        }
    }

    /// The key's string form, as PHP prints it (`5` for `Key::Int(5)`).
    pub fn to_bytes(&self) -> Bytes {
        match self {
            Key::Int(i) => Bytes::from(i.to_string()),
            Key::Str(s) => s.clone(),
        }
    }
}

/// PHP's `ZEND_HANDLE_NUMERIC_STR`: `-?(0|[1-9][0-9]*)` within `i64`, but not `-0`.
fn numeric_key(s: &[u8]) -> Option<i64> {
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    let canonical = match digits {
        [b'0'] => digits.len() == s.len(),
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Int(i) => write!(f, "{i}"),
            Key::Str(s) => f.write_str(&String::from_utf8_lossy(s)),
        }
    }
}

impl From<i64> for Key {
    fn from(i: i64) -> Self {
        Key::Int(i)
    }
}

impl From<u32> for Key {
    fn from(i: u32) -> Self {
        Key::Int(i.into())
    }
}

impl From<i32> for Key {
    fn from(i: i32) -> Self {
        Key::Int(i.into())
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Key::from_bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Key::from_bytes(s)
    }
}

impl From<&[u8]> for Key {
    fn from(s: &[u8]) -> Self {
        Key::from_bytes(Bytes::copy_from_slice(s))
    }
}

impl From<Bytes> for Key {
    fn from(s: Bytes) -> Self {
        Key::from_bytes(s)
    }
}

/// A PHP value as `serialize()` and `json_encode()` see it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A 64-bit integer.
    Int(i64),
    /// A double.
    Float(f64),
    /// A binary-safe string.
    Str(Bytes),
    /// An ordered array.
    Array(Array),
}

impl Value {
    /// PHP's `is_scalar()`: booleans, integers, floats and strings.
    pub fn is_scalar(&self) -> bool {
        matches!(
            self,
            Value::Bool(_) | Value::Int(_) | Value::Float(_) | Value::Str(_)
        )
    }

    /// PHP's `empty()`: null, `false`, `0`, `0.0`, `""`, `"0"` and `[]`.
    pub fn is_empty(&self) -> bool {
        match self {
            Value::Null => true,
            Value::Bool(b) => !b,
            Value::Int(i) => *i == 0,
            Value::Float(f) => *f == 0.0,
            Value::Str(s) => s.is_empty() || s.as_ref() == b"0",
            Value::Array(a) => a.is_empty(),
        }
    }

    /// A scalar's PHP string conversion (`(string) $v`): `42`, `0.1`, `1` for
    /// `true`, `""` for `false`; floats use PHP's default `precision` of 14
    /// significant digits. `None` for null and arrays, which are not scalars.
    pub fn scalar_to_bytes(&self) -> Option<Bytes> {
        match self {
            Value::Bool(true) => Some(Bytes::from_static(b"1")),
            Value::Bool(false) => Some(Bytes::new()),
            Value::Int(i) => Some(Bytes::from(i.to_string())),
            Value::Float(f) => {
                let mut out = Vec::new();
                float::write(&mut out, *f, float::Precision::Digits(14), b'E');
                Some(Bytes::from(out))
            }
            Value::Str(s) => Some(s.clone()),
            Value::Null | Value::Array(_) => None,
        }
    }

    /// The array, if this is one.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The string's bytes, if this is a string.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The string, if this is a UTF-8 string.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|s| std::str::from_utf8(s).ok())
    }

    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<i32> for Value {
    fn from(i: i32) -> Self {
        Value::Int(i.into())
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Self {
        Value::Int(i.into())
    }
}

impl From<u16> for Value {
    fn from(i: u16) -> Self {
        Value::Int(i.into())
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(Bytes::from(s))
    }
}

impl From<&[u8]> for Value {
    fn from(s: &[u8]) -> Self {
        Value::Str(Bytes::copy_from_slice(s))
    }
}

impl From<Vec<u8>> for Value {
    fn from(s: Vec<u8>) -> Self {
        Value::Str(Bytes::from(s))
    }
}

impl From<Bytes> for Value {
    fn from(s: Bytes) -> Self {
        Value::Str(s)
    }
}

impl From<Array> for Value {
    fn from(a: Array) -> Self {
        Value::Array(a)
    }
}

impl From<Key> for Value {
    fn from(k: Key) -> Self {
        match k {
            Key::Int(i) => Value::Int(i),
            Key::Str(s) => Value::Str(s),
        }
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Why `unserialize` refused its input. Offsets count bytes from the start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PhpError {
    /// The input ended inside a value, or is too short for what it declares.
    #[error("serialized data ends early")]
    UnexpectedEnd,
    /// A byte that the format does not allow there.
    #[error("malformed serialized data at offset {offset}")]
    Syntax {
        /// Where.
        offset: usize,
    },
    /// An object (`O:`, `C:`, `E:`); classes are never allowed.
    #[error("serialized object at offset {offset} refused")]
    Object {
        /// Where.
        offset: usize,
    },
    /// A reference (`r:`, `R:`).
    #[error("serialized reference at offset {offset} refused")]
    Reference {
        /// Where.
        offset: usize,
    },
    /// Arrays nested deeper than the limit.
    #[error("arrays nested deeper than {max}")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// Bytes after the value (PHP itself ignores them; see [`unserialize_prefix`]).
    #[error("trailing bytes after the value at offset {offset}")]
    Trailing {
        /// Where the value ended.
        offset: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numeric_keys_follow_php() {
        for (s, want) in [
            ("5", Some(5)),
            ("-5", Some(-5)),
            ("0", Some(0)),
            ("-0", None),
            ("05", None),
            ("+5", None),
            (" 5", None),
            ("", None),
            ("-", None),
            ("9223372036854775807", Some(i64::MAX)),
            ("-9223372036854775808", Some(i64::MIN)),
            ("9223372036854775808", None),
            ("1e3", None),
        ] {
            assert_eq!(numeric_key(s.as_bytes()), want, "{s:?}");
        }
        assert_eq!(Key::from("12"), Key::Int(12));
        assert_eq!(Key::from("x"), Key::Str(Bytes::from_static(b"x")));
    }

    #[test]
    fn scalars_convert_like_php_strings() {
        let cases: [(Value, &str); 8] = [
            (Value::Int(42), "42"),
            (Value::Bool(true), "1"),
            (Value::Bool(false), ""),
            (Value::Float(0.1 + 0.2), "0.3"),
            (Value::Float(1.0 / 3.0), "0.33333333333333"),
            (Value::Float(1e15), "1.0E+15"),
            (Value::Float(-0.0), "-0"),
            (Value::Float(f64::INFINITY), "INF"),
        ];
        for (v, want) in cases {
            assert_eq!(v.scalar_to_bytes().unwrap(), want.as_bytes(), "{v:?}");
        }
        assert_eq!(Value::Null.scalar_to_bytes(), None);
        assert!(Value::from("0").is_empty() && !Value::from("00").is_empty());
    }

    fn key() -> impl Strategy<Value = Key> {
        prop_oneof![
            any::<i64>().prop_map(Key::Int),
            prop::collection::vec(any::<u8>(), 0..10).prop_map(Key::from_bytes),
            "[0-9-]{1,4}".prop_map(Key::from),
        ]
    }

    /// Any value `unserialize` can return; floats are finite because NaN is not
    /// equal to itself.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::Float),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|pairs| Value::Array(pairs.into_iter().collect()))
        })
    }

    proptest! {
        #[test]
        fn serialize_round_trip(v in value()) {
            let bytes = to_bytes(&v);
            let back = unserialize(&bytes).unwrap();
            prop_assert_eq!(&back, &v);
            prop_assert_eq!(to_bytes(&back), bytes);
        }

        #[test]
        fn json_encoding_is_stable(v in value()) {
            // Floats may come back as integers and lists as lists, but
            // encoding what was decoded gives the same bytes.
            if let Ok(json) = json_encode(&v) {
                let back = json_decode(&json).unwrap();
                prop_assert_eq!(json_encode(&back).unwrap(), json);
            }
        }
    }

    #[test]
    fn scalars_emptiness_and_accessors_follow_php() {
        let scalars = [
            Value::Bool(true),
            Value::Int(3),
            Value::Float(0.5),
            Value::Str(Bytes::from_static(b"s")),
        ];
        for v in &scalars {
            assert!(v.is_scalar() && !v.is_empty(), "{v:?}");
        }
        assert!(!Value::Null.is_scalar() && !Value::Array(Array::new()).is_scalar());
        for v in [
            Value::Null,
            Value::Bool(false),
            Value::Int(0),
            Value::Float(0.0),
            Value::Str(Bytes::new()),
            Value::Str(Bytes::from_static(b"0")),
            Value::Array(Array::new()),
        ] {
            assert!(v.is_empty(), "{v:?}");
        }
        assert!(!Value::Str(Bytes::from_static(b"00")).is_empty());
        assert_eq!(Value::Int(-7).as_int(), Some(-7));
        assert_eq!(Value::Str(Bytes::from_static(b"7")).as_int(), None);
        assert_eq!(&Key::Int(-5).to_bytes()[..], b"-5");
        assert_eq!(
            &Key::from_bytes(Bytes::from_static(b"k")).to_bytes()[..],
            b"k"
        );
    }
}
