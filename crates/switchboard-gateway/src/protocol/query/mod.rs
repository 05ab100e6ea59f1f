//! Query sockets: how gateways answer requests, and the JSON `ext_data` of
//! commands that carry lists (docs/GATEWAY-PROTOCOL.md §3.4, §4).
//!
//! A reply is not a frame: it is a big-endian `u32` length and that many bytes
//! of PHP `serialize()` output, written on the connection that asked. Integer
//! keys in replies are connection ids.

mod ext;

use bytes::{BufMut, Bytes, BytesMut};
use switchboard_core::framing::{self, Framing};
use tokio_util::codec::Decoder;

use super::php::{self, PhpError, Value};
use super::stream;

pub use ext::{Condition, ExtError, Id, IdList, Select, SendToAll, SendToGroup};

/// `ext_data` of `CMD_SEND_TO_UID`: the uids to send to.
pub type SendToUid = IdList;
/// `ext_data` of `CMD_BATCH_GET_CLIENT_ID_BY_UID`: the uids to look up.
pub type BatchGetClientIdByUid = IdList;
/// `ext_data` of `CMD_BATCH_GET_CLIENT_COUNT_BY_GROUP`: the groups to count.
pub type BatchGetClientCountByGroup = IdList;

/// The largest reply accepted by default: workerman's `maxPackageSize`, 10 MiB.
pub const DEFAULT_MAX_REPLY_LEN: usize = 10 * 1024 * 1024;

/// A reply as a gateway writes it: `pack('N', strlen($s)) . $s` with
/// `$s = serialize($value)`.
pub fn encode_reply(value: &Value) -> Bytes {
    encode_reply_raw(&php::to_bytes(value))
}

/// A reply around bytes that already are `serialize()` output:
/// `CMD_GET_SESSION_BY_CLIENT_ID` answers with the stored session string itself.
///
/// # Panics
///
/// If `serialized` is longer than `u32::MAX` bytes, which the format cannot express.
pub fn encode_reply_raw(serialized: &[u8]) -> Bytes {
    let len = u32::try_from(serialized.len()).expect("reply longer than u32::MAX");
    let mut out = BytesMut::with_capacity(4 + serialized.len());
    out.put_u32(len);
    out.put_slice(serialized);
    out.freeze()
}

/// A reply that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// A reply is longer than the maximum.
    #[error("reply of {len} bytes exceeds the maximum of {max} bytes")]
    TooLong {
        /// The declared length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The payload is not a serialized value.
    #[error("reply payload is not PHP serialize() output")]
    Php(#[source] PhpError),
    /// The stream ended inside a reply.
    #[error("stream ended inside a reply ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete reply.
        buffered: usize,
    },
    /// Reading the stream failed.
    #[error("i/o error on a query socket")]
    Io(#[from] std::io::Error),
}

/// Reads replies on a query socket, yielding each as a [`php::Value`].
#[derive(Debug, Clone)]
pub struct ReplyDecoder {
    lengths: framing::Decoder,
}

impl ReplyDecoder {
    /// A decoder refusing replies longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            lengths: framing::Decoder::new(Framing::Length, max_len),
        }
    }
}

impl Default for ReplyDecoder {
    /// Workerman's limit: [`DEFAULT_MAX_REPLY_LEN`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_REPLY_LEN)
    }
}

impl Decoder for ReplyDecoder {
    type Item = Value;
    type Error = ReplyError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Value>, ReplyError> {
        let payload = self
            .lengths
            .decode(src)
            .map_err(|e| stream::framing_error(e, |len, max| ReplyError::TooLong { len, max }))?;
        payload
            .map(|p| php::unserialize(&p).map_err(ReplyError::Php))
            .transpose()
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Value>, ReplyError> {
        stream::decode_eof(self, src, |buffered| ReplyError::Truncated { buffered })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        // Captured: IS_ONLINE answers i:1; GET_CLIENT_ID_BY_UID for nobody a:0:{}.
        assert_eq!(&encode_reply(&Value::Int(1))[..], b"\0\0\0\x04i:1;");
        let mut buf = BytesMut::from(&b"\0\0\0\x06a:0:{}\0\0\0\x04i:1;\0\0"[..]);
        let mut d = ReplyDecoder::default();
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Value::Array(php::Array::new()))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Some(Value::Int(1)));
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert!(matches!(
            d.decode_eof(&mut buf),
            Err(ReplyError::Truncated { buffered: 2 })
        ));
        let mut buf = BytesMut::from(&b"\0\0\0\x02i:"[..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(ReplyError::Php(PhpError::UnexpectedEnd))
        ));
        let mut buf = BytesMut::from(&b"\xff\xff\xff\xff"[..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(ReplyError::TooLong { .. })
        ));
        assert_eq!(&encode_reply_raw(b"N;")[..], b"\0\0\0\x02N;");
    }

    #[test]
    fn the_reply_limit_is_workermans() {
        assert_eq!(DEFAULT_MAX_REPLY_LEN, 10_485_760);
    }
}
