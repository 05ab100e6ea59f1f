//! Sessions: opaque bytes to a gateway, PHP-serialized arrays to workers
//! (docs/GATEWAY-PROTOCOL.md §3.3, §3.7).
//!
//! A gateway stores each client's session string verbatim and echoes it in the
//! `ext_data` of every event; only `CMD_UPDATE_SESSION` makes it look inside.
//! A worker remembers `crc32` of the session it last saw as the session's
//! version and fetches the session again when an event carries another one.

use bytes::Bytes;

use super::php::{self, Array, PhpError, Value};

/// A session could not be read or merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Not PHP `serialize()` output.
    #[error("session is not PHP serialize() output")]
    Php(#[source] PhpError),
    /// A serialized value that is not an array (PHP throws on those).
    #[error("session is not an array")]
    NotAnArray,
}

/// The session version a worker keeps: PHP's `crc32($session)`.
pub fn version(session: &[u8]) -> u32 {
    crc32fast::hash(session)
}

/// Whether a stored session counts as absent to the gateway (PHP's `!$session`:
/// the empty string, and also `"0"`).
pub fn is_unset(stored: &[u8]) -> bool {
    stored.is_empty() || stored == b"0"
}

/// The session a worker sees in an event: `None` for the empty string,
/// otherwise the unserialized array.
pub fn decode(session: &[u8]) -> Result<Option<Array>, SessionError> {
    if session.is_empty() {
        return Ok(None);
    }
    as_array(session).map(Some)
}

/// The bytes a worker sends with `CMD_SET_SESSION`: empty for no session,
/// otherwise `serialize($session)`.
pub fn encode(session: Option<&Array>) -> Vec<u8> {
    session.map_or_else(Vec::new, |s| php::to_bytes(&Value::Array(s.clone())))
}

/// What a gateway stores after `CMD_UPDATE_SESSION`: `update` verbatim when no
/// session is stored, otherwise both unserialized, merged with
/// [`php::array_replace_recursive`] and serialized again.
///
/// On error the gateway keeps the stored session (PHP would throw).
pub fn merge_update(stored: &[u8], update: &[u8]) -> Result<Bytes, SessionError> {
    if is_unset(stored) {
        return Ok(Bytes::copy_from_slice(update));
    }
    let merged = php::array_replace_recursive(&as_array(stored)?, &as_array(update)?);
    Ok(Bytes::from(php::to_bytes(&Value::Array(merged))))
}

fn as_array(session: &[u8]) -> Result<Array, SessionError> {
    match php::unserialize(session).map_err(SessionError::Php)? {
        Value::Array(a) => Ok(a),
        _ => Err(SessionError::NotAnArray),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_like_the_gateway() {
        // plain.json, "update_session own {n:1}": the stored session grows a key.
        let stored = Bytes::from_static(br#"a:2:{s:3:"uid";s:5:"alice";s:5:"group";s:2:"g1";}"#);
        let merged = merge_update(&stored, br#"a:1:{s:1:"n";i:1;}"#).unwrap();
        assert_eq!(
            &merged[..],
            br#"a:3:{s:3:"uid";s:5:"alice";s:5:"group";s:2:"g1";s:1:"n";i:1;}"#
        );
        // Nothing stored: the update is stored as it came.
        assert_eq!(&merge_update(b"", b"junk").unwrap()[..], b"junk");
        assert_eq!(&merge_update(b"0", b"x").unwrap()[..], b"x");
        assert_eq!(
            merge_update(&stored, b"i:1;"),
            Err(SessionError::NotAnArray)
        );
        assert!(matches!(
            merge_update(&stored, b"a:1:{"),
            Err(SessionError::Php(_))
        ));
    }

    #[test]
    fn nothing_stored_is_the_empty_string_or_zero() {
        // Gateway.php, CMD_UPDATE_SESSION: `if (!$session)` stores the update
        // as it came; PHP's `!` is true for "" and "0", for no other string.
        let update = br#"a:1:{s:1:"n";i:1;}"#;
        for nothing in [&b""[..], b"0"] {
            assert!(is_unset(nothing));
            assert_eq!(&merge_update(nothing, update).unwrap()[..], update);
        }
        // "00" and " 0" are real sessions to PHP, here unreadable ones: the
        // update is refused and the stored bytes stay.
        for something in [&b"00"[..], b" 0"] {
            assert!(!is_unset(something));
            assert!(matches!(
                merge_update(something, update),
                Err(SessionError::Php(_))
            ));
        }
    }

    #[test]
    fn versions_and_codec() {
        // PHP 8.2: crc32(''), crc32('a:0:{}'), crc32('123456789').
        assert_eq!(version(b""), 0);
        assert_eq!(version(b"a:0:{}"), 2_723_407_904);
        assert_eq!(version(b"123456789"), 3_421_780_262);
        assert_eq!(decode(b""), Ok(None));
        let s: Array = [("uid", "bob")].into_iter().collect();
        assert_eq!(decode(&encode(Some(&s))), Ok(Some(s)));
        assert!(encode(None).is_empty());
        assert_eq!(
            decode(b"0"),
            Err(SessionError::Php(PhpError::Syntax { offset: 0 }))
        );
    }
}
