//! The body of `CMD_ON_WEBSOCKET_CONNECT` (docs/GATEWAY-PROTOCOL.md §3.6).
//!
//! After a WebSocket handshake a PHP gateway on workerman 4 sends
//! `serialize(['get' => $_GET, 'server' => $_SERVER, 'cookie' => $_COOKIE])`
//! as filled by workerman's handshake parser: `REQUEST_METHOD`, `REQUEST_URI`,
//! `SERVER_PROTOCOL`, then one `HTTP_<NAME>` per header line in order (with
//! `SERVER_NAME`/`SERVER_PORT` right after `HTTP_HOST`), then `QUERY_STRING`.
//! `get` and `cookie` are PHP `parse_str` results. [`connect_body`] builds the
//! same array from a handshake request.

use bytes::Bytes;

use super::php::{Array, Key, Value};

/// PHP's `max_input_nesting_level`: deeper `a[b][c]…` names are dropped.
const MAX_NESTING: usize = 64;

/// The `CMD_ON_WEBSOCKET_CONNECT` data for a handshake request, as workerman 4
/// builds it: `method`, `uri` and `protocol` from the request line (`GET`,
/// `/?uid=alice`, `HTTP/1.1`) and the header lines in the order received.
/// Serialize it with [`php::to_bytes`](super::php::to_bytes) for the body.
pub fn connect_body<N, V>(
    method: &str,
    uri: &str,
    protocol: &str,
    headers: impl IntoIterator<Item = (N, V)>,
) -> Value
where
    N: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut server = Array::new();
    server.insert("REQUEST_METHOD", method);
    server.insert("REQUEST_URI", uri);
    server.insert("SERVER_PROTOCOL", protocol);
    let mut cookie = Array::new();
    for (name, value) in headers {
        let name: Vec<u8> = name
            .as_ref()
            .iter()
            .map(|&b| {
                if b == b'-' {
                    b'_'
                } else {
                    b.to_ascii_uppercase()
                }
            })
            .collect();
        let value = php_trim(value.as_ref());
        server.insert(Key::from_bytes([&b"HTTP_"[..], &name].concat()), value);
        match &name[..] {
            b"HOST" => {
                let mut parts = value.split(|&b| b == b':');
                server.insert("SERVER_NAME", parts.next().unwrap_or_default());
                if let Some(port) = parts.next() {
                    server.insert("SERVER_PORT", port);
                }
            }
            // Each Cookie line replaces the cookies, as in workerman.
            b"COOKIE" => cookie = parse_str(&replace(value, b"; ", b"&")),
            _ => {}
        }
    }
    let query = query_string(uri);
    server.insert("QUERY_STRING", query);
    let mut body = Array::new();
    body.insert("get", parse_str(query.as_bytes()));
    body.insert("server", server);
    body.insert("cookie", cookie);
    Value::Array(body)
}

/// `parse_url($uri, PHP_URL_QUERY)`, or `""`: after the first `?`, before any `#`.
fn query_string(uri: &str) -> &str {
    let uri = uri.split('#').next().unwrap_or_default();
    uri.split_once('?').map_or("", |(_, q)| q)
}

/// PHP's `trim()`: strips spaces, tabs, newlines, NUL and vertical tabs at both ends.
fn php_trim(s: &[u8]) -> &[u8] {
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\0' | 0x0b);
    let start = s.iter().position(|b| !blank(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !blank(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

fn replace(s: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut rest = s;
    while !rest.is_empty() {
        if rest.starts_with(from) {
            out.extend_from_slice(to);
            rest = &rest[from.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// PHP's `urldecode`: `+` is a space, `%XX` a byte; a stray `%` stays.
pub fn urldecode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() && hex(s[i + 1]).is_some() && hex(s[i + 2]).is_some() => {
                // Both are hex digits, so the byte is below 256.
                out.push(((hex(s[i + 1]).unwrap_or(0) << 4) | hex(s[i + 2]).unwrap_or(0)) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// PHP's `parse_str($query, $result)`: `&`-separated `name=value` pairs,
/// URL-decoded, with PHP's variable-name rules: leading spaces dropped, ` `
/// and `.` in the base name become `_`, `a[b][]=v` builds nested arrays, a
/// name with an unclosed `[` keeps it as `_`, and names nested deeper than 64
/// levels are dropped.
pub fn parse_str(query: &[u8]) -> Array {
    let mut out = Array::new();
    for pair in query.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        register(&mut out, &urldecode(name), Value::from(urldecode(value)));
    }
    out
}

/// PHP's `php_register_variable_ex` for one decoded `name` and `value`.
fn register(root: &mut Array, name: &[u8], value: Value) {
    // Names are C strings to PHP: a NUL ends them.
    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
    let name = &name[name.iter().position(|&b| b != b' ').unwrap_or(name.len())..];
    let mangle = |b: &u8| if matches!(b, b' ' | b'.') { b'_' } else { *b };
    let bracket = name.iter().position(|&b| b == b'[').unwrap_or(name.len());
    let mut base: Vec<u8> = name[..bracket].iter().map(mangle).collect();
    if base.is_empty() {
        return;
    }
    // `None` stands for `[]`: the next integer key.
    let mut path: Vec<Option<Bytes>> = Vec::new();
    let mut rest = &name[bracket..];
    while let Some(after) = rest.strip_prefix(b"[") {
        if path.len() == MAX_NESTING {
            root.remove(&Key::from_bytes(base));
            return;
        }
        let Some(close) = after.iter().position(|&b| b == b']') else {
            // Not an index: at the first level the `[` and the rest join the
            // name; deeper, the unclosed part is ignored.
            if path.is_empty() {
                base.push(b'_');
                base.extend(
                    after
                        .iter()
                        .map(|b| if *b == b'[' { b'_' } else { mangle(b) }),
                );
            }
            break;
        };
        path.push((close > 0).then(|| Bytes::copy_from_slice(&after[..close])));
        rest = &after[close + 1..];
    }
    let mut slot = root;
    let mut key = Some(Bytes::from(base));
    for next in path {
        let Value::Array(inner) = slot_entry(slot, key, Value::Array(Array::new()), false) else {
            return;
        };
        slot = inner;
        key = next;
    }
    slot_entry(slot, key, value, true);
}

/// The value under `key` in `array` (`None`: a new next-integer key). When
/// `replace` is false an existing array is kept and anything else replaced by
/// `value`; when true the slot is set to `value`.
fn slot_entry(array: &mut Array, key: Option<Bytes>, value: Value, replace: bool) -> &mut Value {
    let key = match key {
        Some(k) => Key::from_bytes(k),
        None => Key::Int(next_index(array)),
    };
    let keep = !replace && matches!(array.get(&key), Some(Value::Array(_)));
    if !keep {
        array.insert(key.clone(), value);
    }
    // Present: either kept or just inserted.
    array.get_mut(&key).expect("key was just inserted")
}

/// PHP's next free integer key for arrays built by insertion only: one past the
/// largest integer key, or 0.
fn next_index(array: &Array) -> i64 {
    array
        .keys()
        .filter_map(|k| match k {
            Key::Int(i) => Some(*i),
            Key::Str(_) => None,
        })
        .max()
        .map_or(0, |i| i.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::super::php::to_bytes;
    use super::*;

    fn parsed(q: &str) -> String {
        String::from_utf8(to_bytes(&Value::Array(parse_str(q.as_bytes())))).unwrap()
    }

    #[test]
    fn parse_str_like_php() {
        // PHP 8.2: serialize of parse_str's result.
        for (q, want) in [
            (
                "uid=alice&group=g1",
                r#"a:2:{s:3:"uid";s:5:"alice";s:5:"group";s:2:"g1";}"#,
            ),
            (
                "a[-5]=x&a[]=y",
                r#"a:1:{s:1:"a";a:2:{i:-5;s:1:"x";i:-4;s:1:"y";}}"#,
            ),
            (
                "a[5]=x&a[2]=z&a[]=y",
                r#"a:1:{s:1:"a";a:3:{i:5;s:1:"x";i:2;s:1:"z";i:6;s:1:"y";}}"#,
            ),
            ("a[b=1", r#"a:1:{s:3:"a_b";s:1:"1";}"#),
            ("a[b][c=1", r#"a:1:{s:1:"a";a:1:{s:1:"b";s:1:"1";}}"#),
            (
                "a[][]=1&a[][]=2",
                r#"a:1:{s:1:"a";a:2:{i:0;a:1:{i:0;s:1:"1";}i:1;a:1:{i:0;s:1:"2";}}}"#,
            ),
            ("a.b c=1", r#"a:1:{s:5:"a_b_c";s:1:"1";}"#),
            (" a=1", r#"a:1:{s:1:"a";s:1:"1";}"#),
            ("a[ x.y ]=1", r#"a:1:{s:1:"a";a:1:{s:5:" x.y ";s:1:"1";}}"#),
            ("a=1&a[x]=2", r#"a:1:{s:1:"a";a:1:{s:1:"x";s:1:"2";}}"#),
            ("a[x]=1&a=2", r#"a:1:{s:1:"a";s:1:"2";}"#),
            ("a%00b=1", r#"a:1:{s:1:"a";s:1:"1";}"#),
            ("=x", "a:0:{}"),
            ("a&b=&=c", r#"a:2:{s:1:"a";s:0:"";s:1:"b";s:0:"";}"#),
            ("a[b]c=1", r#"a:1:{s:1:"a";a:1:{s:1:"b";s:1:"1";}}"#),
            ("a[b]][c]=1", r#"a:1:{s:1:"a";a:1:{s:1:"b";s:1:"1";}}"#),
            ("a[[b]]=1", r#"a:1:{s:1:"a";a:1:{s:2:"[b";s:1:"1";}}"#),
            ("x=1+2%2B3%zz%4", r#"a:1:{s:1:"x";s:10:"1 2+3%zz%4";}"#),
            (
                "5=a&05=b&-0=c",
                r#"a:3:{i:5;s:1:"a";s:2:"05";s:1:"b";s:2:"-0";s:1:"c";}"#,
            ),
            ("a[[]=1", r#"a:1:{s:1:"a";a:1:{s:1:"[";s:1:"1";}}"#),
            ("a[.]=1", r#"a:1:{s:1:"a";a:1:{s:1:".";s:1:"1";}}"#),
            ("..=1", r#"a:1:{s:2:"__";s:1:"1";}"#),
            ("[a]=1", "a:0:{}"),
            ("a]=1", r#"a:1:{s:2:"a]";s:1:"1";}"#),
        ] {
            assert_eq!(parsed(q), want, "{q}");
        }
        let deep = |n: usize| format!("a=1&a{}=1&b=2", "[x]".repeat(n));
        assert!(parsed(&deep(64)).contains(r#"s:1:"a";a:1:{s:1:"x";"#));
        assert_eq!(parsed(&deep(65)), r#"a:1:{s:1:"b";s:1:"2";}"#);
        assert_eq!(urldecode(b"a=%00b"), b"a=\0b");
    }

    #[test]
    fn body_like_workerman_4() {
        let body = connect_body(
            "GET",
            "/?uid=alice&group=g1#x",
            "HTTP/1.1",
            [
                ("Host", " 127.0.0.1:13002 "),
                ("Cookie", "a=1; b=2"),
                ("X-Thing", "v"),
                ("cookie", "c=3"),
            ],
        );
        assert_eq!(
            String::from_utf8(to_bytes(&body)).unwrap(),
            concat!(
                r#"a:3:{s:3:"get";a:2:{s:3:"uid";s:5:"alice";s:5:"group";s:2:"g1";}"#,
                r#"s:6:"server";a:9:{s:14:"REQUEST_METHOD";s:3:"GET";s:11:"REQUEST_URI";s:22:"/?uid=alice&group=g1#x";"#,
                r#"s:15:"SERVER_PROTOCOL";s:8:"HTTP/1.1";s:9:"HTTP_HOST";s:15:"127.0.0.1:13002";"#,
                r#"s:11:"SERVER_NAME";s:9:"127.0.0.1";s:11:"SERVER_PORT";s:5:"13002";"#,
                r#"s:11:"HTTP_COOKIE";s:3:"c=3";s:12:"HTTP_X_THING";s:1:"v";"#,
                r#"s:12:"QUERY_STRING";s:18:"uid=alice&group=g1";}"#,
                r#"s:6:"cookie";a:1:{s:1:"c";s:1:"3";}}"#,
            )
        );
        let bare = connect_body("GET", "/", "HTTP/1.1", Vec::<(&str, &str)>::new());
        let server = bare
            .as_array()
            .unwrap()
            .get_str("server")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(server.get_str("QUERY_STRING"), Some(&Value::from("")));
    }
}
