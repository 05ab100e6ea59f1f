//! Sessions between switchboard's form (string keys and values) and
//! GatewayWorker's (a PHP-serialized array stored verbatim by the gateway).

use bytes::Bytes;
use switchboard::core::Session;

use crate::protocol::php::{self, Array, Key, Value};

/// A session as GatewayWorker stores it: `serialize(array(key => value, …))`.
pub(crate) fn to_php<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Bytes {
    let mut a = Array::new();
    for (k, v) in pairs {
        a.insert(
            Key::from_bytes(Bytes::copy_from_slice(k.as_bytes())),
            Value::Str(Bytes::copy_from_slice(v.as_bytes())),
        );
    }
    Bytes::from(php::to_bytes(&Value::Array(a)))
}

/// The text form of a PHP scalar, as PHP's string conversion gives it;
/// arrays as their serialized form.
fn scalar_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => if *b { "1" } else { "" }.to_owned(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) => String::from_utf8_lossy(s).into_owned(),
        other => String::from_utf8_lossy(&php::to_bytes(other)).into_owned(),
    }
}

/// A PHP session array as a switchboard session: keys and values as text.
pub(crate) fn from_php(v: &Value) -> Session {
    let mut s = Session::new();
    if let Value::Array(a) = v {
        for (k, v) in a.iter() {
            let key = match k {
                Key::Int(i) => i.to_string(),
                Key::Str(b) => String::from_utf8_lossy(b).into_owned(),
            };
            s.insert(key, scalar_text(v));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_round_trip_through_php() {
        let b = to_php([("uid", "alice"), ("7", "x")]);
        assert_eq!(&b[..], br#"a:2:{s:3:"uid";s:5:"alice";i:7;s:1:"x";}"#);
        let s = from_php(&php::unserialize(&b).unwrap());
        assert_eq!(s.get("uid").map(String::as_str), Some("alice"));
        assert_eq!(s.get("7").map(String::as_str), Some("x"));
    }
}
