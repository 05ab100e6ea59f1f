//! The PHP functions the codec reimplements, checked against what PHP 8.2
//! itself answered (`tests/php/fixtures.json`, written by
//! `tests/php/fixtures.php`): float formatting in `serialize`, `json_encode`
//! and string casts for 2000 doubles, `json_encode` string escaping,
//! `parse_str`, `unserialize` edge cases, `array_replace_recursive` and
//! `json_decode`.

use std::path::Path;

use serde_json::Value as J;
use switchboard_gateway::protocol::php::{self, Value};
use switchboard_gateway::protocol::websocket;

fn fixtures() -> J {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/php/fixtures.json");
    serde_json::from_slice(&std::fs::read(path).expect("fixtures.json")).expect("JSON")
}

fn rows<'a>(f: &'a J, name: &str) -> &'a Vec<J> {
    let rows = f[name].as_array().expect(name);
    assert!(!rows.is_empty(), "{name} is empty");
    rows
}

fn s(v: &J) -> &str {
    v.as_str().expect("string")
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).expect("UTF-8")
}

#[test]
fn floats_print_like_php() {
    let f = fixtures();
    for row in rows(&f, "floats") {
        let bits: [u8; 8] = unhex(s(&row[0])).try_into().expect("8 bytes");
        let v = Value::Float(f64::from_be_bytes(bits));
        assert_eq!(text(php::to_bytes(&v)), s(&row[1]), "serialize {v:?}");
        assert_eq!(
            text(php::json_encode(&v).expect("finite")),
            s(&row[2]),
            "json_encode {v:?}"
        );
        assert_eq!(
            text(v.scalar_to_bytes().expect("scalar").to_vec()),
            s(&row[3]),
            "(string) {v:?}"
        );
        // And unserialize reads PHP's text back to the same double.
        assert_eq!(php::unserialize(s(&row[1]).as_bytes()), Ok(v));
    }
}

#[test]
fn json_strings_escape_like_php() {
    let f = fixtures();
    for row in rows(&f, "json_strings") {
        let v = Value::from(unhex(s(&row[0])));
        assert_eq!(text(php::json_encode(&v).expect("UTF-8")), s(&row[1]));
    }
}

#[test]
fn parse_str_like_php() {
    let f = fixtures();
    for row in rows(&f, "parse_str") {
        let got = php::to_bytes(&Value::Array(websocket::parse_str(s(&row[0]).as_bytes())));
        assert_eq!(text(got), s(&row[1]), "parse_str {:?}", s(&row[0]));
    }
}

#[test]
fn unserialize_like_php() {
    let f = fixtures();
    for row in rows(&f, "unserialize") {
        let input = s(&row[0]).as_bytes();
        // PHP ignores what follows the value; the prefix decoder does too.
        let got = php::unserialize_prefix(input).map(|(v, _)| text(php::to_bytes(&v)));
        match row[1].as_str() {
            Some(want) => assert_eq!(got.as_deref(), Ok(want), "unserialize {:?}", s(&row[0])),
            None => assert!(got.is_err(), "unserialize {:?} should fail", s(&row[0])),
        }
    }
}

#[test]
fn array_replace_recursive_like_php() {
    let f = fixtures();
    for row in rows(&f, "array_replace_recursive") {
        let array = |v: &J| match php::unserialize(s(v).as_bytes()) {
            Ok(Value::Array(a)) => a,
            other => panic!("not an array: {other:?}"),
        };
        let merged = php::array_replace_recursive(&array(&row[0]), &array(&row[1]));
        assert_eq!(text(php::to_bytes(&Value::Array(merged))), s(&row[2]));
    }
}

#[test]
fn json_decode_like_php() {
    let f = fixtures();
    for row in rows(&f, "json_decode") {
        let v = php::json_decode(s(&row[0]).as_bytes()).expect("JSON");
        assert_eq!(
            text(php::to_bytes(&v)),
            s(&row[1]),
            "json_decode {:?}",
            s(&row[0])
        );
        assert_eq!(
            text(php::json_encode(&v).expect("encodes")),
            s(&row[2]),
            "json_encode {:?}",
            s(&row[0])
        );
    }
}
