//! The register protocol: one JSON object per `\n`-terminated line (docs/GATEWAY-PROTOCOL.md §2).
//!
//! Gateways announce their inner address, workers and pushers ask for the
//! addresses, the register broadcasts them. PHP builds the connect lines by
//! string concatenation (values unescaped, spaces after the commas in
//! `gateway_connect`) and the broadcast with `json_encode`;
//! [`RegisterMessage::encode`] reproduces both byte for byte, and
//! [`RegisterMessage::decode`] accepts any JSON spelling, as PHP's
//! `json_decode` does.

use bytes::{Bytes, BytesMut};
use switchboard_core::framing::{self, Framing};
use tokio_util::codec::{Decoder, Encoder};

use super::php::{self, Array, Key, Value};
use super::stream;

/// The longest line accepted by default: workerman's `maxPackageSize`, 10 MiB.
pub const DEFAULT_MAX_LINE_LEN: usize = 10 * 1024 * 1024;

/// One register message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterMessage {
    /// Gateway → register, on every (re)connect: the gateway's inner address.
    GatewayConnect {
        /// `lanIp:lanPort`, the dotted quad client ids are built from.
        address: String,
        /// The cluster secret.
        secret_key: String,
    },
    /// Worker or pusher → register: asks for the gateway addresses.
    WorkerConnect {
        /// The cluster secret.
        secret_key: String,
    },
    /// Keep-alive to a non-local register; ignored.
    Ping,
    /// Register → workers: every registered gateway address, in registration order.
    BroadcastAddresses(Vec<String>),
}

/// A register line that PHP's register or worker would not act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// Not JSON. The register answers like [`RegisterError::MissingEvent`].
    #[error("register message is not JSON")]
    Malformed,
    /// No `event`, or an empty one: the PHP register sends an error line, then closes.
    #[error("register message has no event")]
    MissingEvent,
    /// An event nobody knows: the PHP register closes without a word.
    #[error("unknown register event {0:?}")]
    UnknownEvent(String),
    /// `gateway_connect` without an address: the PHP register closes.
    #[error("gateway_connect without an address")]
    MissingAddress,
    /// A member has the wrong type (a non-string secret can never match).
    #[error("register message member {0:?} has the wrong type")]
    InvalidField(&'static str),
}

impl RegisterError {
    /// Whether PHP's register answers with a "Bad request" line before closing
    /// (unparsable lines and missing events), rather than closing silently.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, RegisterError::Malformed | RegisterError::MissingEvent)
    }
}

impl RegisterMessage {
    /// The exact bytes PHP sends, trailing `\n` included.
    ///
    /// Connect lines insert the address and secret unescaped, as PHP does, so
    /// a `"`, `\` or newline in them yields a line nobody can parse.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = match self {
            RegisterMessage::GatewayConnect {
                address,
                secret_key,
            } => format!(
                r#"{{"event":"gateway_connect", "address":"{address}", "secret_key":"{secret_key}"}}"#
            )
            .into_bytes(),
            RegisterMessage::WorkerConnect { secret_key } => {
                format!(r#"{{"event":"worker_connect","secret_key":"{secret_key}"}}"#).into_bytes()
            }
            RegisterMessage::Ping => br#"{"event":"ping"}"#.to_vec(),
            RegisterMessage::BroadcastAddresses(addresses) => {
                let mut out = br#"{"event":"broadcast_addresses","addresses":["#.to_vec();
                for (i, a) in addresses.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    php::encode_json_str(&mut out, a);
                }
                out.extend_from_slice(b"]}");
                out
            }
        };
        out.push(b'\n');
        out
    }

    /// Reads one line (without or with its line ending) the way PHP's register
    /// and worker do: `addresses` may be a JSON array or, when PHP's
    /// `array_unique` left holes, an object whose values are taken in order.
    pub fn decode(line: &[u8]) -> Result<Self, RegisterError> {
        let data = php::json_decode(line).map_err(|_| RegisterError::Malformed)?;
        let Some(data) = data.as_array() else {
            return Err(RegisterError::MissingEvent);
        };
        let event = match data.get_str("event") {
            Some(e) if !e.is_empty() => e,
            _ => return Err(RegisterError::MissingEvent),
        };
        match event.as_str() {
            Some("gateway_connect") => {
                let address = match data.get_str("address") {
                    Some(a) if !a.is_empty() => {
                        a.as_str().ok_or(RegisterError::InvalidField("address"))?
                    }
                    _ => return Err(RegisterError::MissingAddress),
                };
                Ok(RegisterMessage::GatewayConnect {
                    address: address.to_owned(),
                    secret_key: secret(data)?,
                })
            }
            Some("worker_connect") => Ok(RegisterMessage::WorkerConnect {
                secret_key: secret(data)?,
            }),
            Some("ping") => Ok(RegisterMessage::Ping),
            Some("broadcast_addresses") => {
                let invalid = RegisterError::InvalidField("addresses");
                let addresses = data
                    .get_str("addresses")
                    .and_then(Value::as_array)
                    .ok_or(invalid.clone())?;
                addresses
                    .values()
                    .map(|a| a.as_str().map(str::to_owned).ok_or(invalid.clone()))
                    .collect::<Result<_, _>>()
                    .map(RegisterMessage::BroadcastAddresses)
            }
            _ => {
                let shown = match event {
                    Value::Str(s) => String::from_utf8_lossy(s).into_owned(),
                    other => php::to_json(other).to_string(),
                };
                Err(RegisterError::UnknownEvent(shown))
            }
        }
    }
}

/// `secret_key`, `""` when absent or null (PHP's `isset`).
fn secret(data: &Array) -> Result<String, RegisterError> {
    match data.get(&Key::from("secret_key")) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(v) => v
            .as_str()
            .map(str::to_owned)
            .ok_or(RegisterError::InvalidField("secret_key")),
    }
}

/// A line violation on a register connection. The connection cannot continue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// A line is longer than the maximum.
    #[error("line of {len} bytes or more exceeds the maximum of {max} bytes")]
    TooLong {
        /// Bytes seen (a lower bound).
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The stream ended inside a line.
    #[error("stream ended inside a line ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete line.
        buffered: usize,
    },
    /// Reading or writing the stream failed.
    #[error("i/o error on a register connection")]
    Io(#[from] std::io::Error),
}

/// Workerman's `Text` framing for a register connection: yields each line with
/// its trailing `\r` and `\n` characters removed (PHP's `rtrim($line, "\r\n")`)
/// and writes [`RegisterMessage`]s.
#[derive(Debug, Clone)]
pub struct LineDecoder {
    lines: framing::Decoder,
}

impl LineDecoder {
    /// A decoder refusing lines longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            lines: framing::Decoder::new(Framing::Line, max_len),
        }
    }
}

impl Default for LineDecoder {
    /// Workerman's limit: [`DEFAULT_MAX_LINE_LEN`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE_LEN)
    }
}

impl Decoder for LineDecoder {
    type Item = Bytes;
    type Error = LineError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, LineError> {
        let line = self
            .lines
            .decode(src)
            .map_err(|e| stream::framing_error(e, |len, max| LineError::TooLong { len, max }))?;
        // The line framing strips one `\r`; PHP strips them all.
        Ok(line.map(|mut line| {
            let keep = line.iter().rposition(|&b| b != b'\r').map_or(0, |i| i + 1);
            line.truncate(keep);
            line
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, LineError> {
        stream::decode_eof(self, src, |buffered| LineError::Truncated { buffered })
    }
}

impl Encoder<&RegisterMessage> for LineDecoder {
    type Error = LineError;

    fn encode(&mut self, msg: &RegisterMessage, dst: &mut BytesMut) -> Result<(), LineError> {
        dst.extend_from_slice(&msg.encode());
        Ok(())
    }
}

impl Encoder<RegisterMessage> for LineDecoder {
    type Error = LineError;

    fn encode(&mut self, msg: RegisterMessage, dst: &mut BytesMut) -> Result<(), LineError> {
        Encoder::<&RegisterMessage>::encode(self, &msg, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn php_bytes() {
        let gw = RegisterMessage::GatewayConnect {
            address: "127.0.0.1:12900".into(),
            secret_key: String::new(),
        };
        assert_eq!(gw.encode(), b"{\"event\":\"gateway_connect\", \"address\":\"127.0.0.1:12900\", \"secret_key\":\"\"}\n");
        let w = RegisterMessage::WorkerConnect {
            secret_key: "s3cret".into(),
        };
        assert_eq!(
            w.encode(),
            b"{\"event\":\"worker_connect\",\"secret_key\":\"s3cret\"}\n"
        );
        assert_eq!(RegisterMessage::Ping.encode(), b"{\"event\":\"ping\"}\n");
        let b =
            RegisterMessage::BroadcastAddresses(vec!["127.0.0.1:12900".into(), "a/b\u{e9}".into()]);
        assert_eq!(b.encode(), b"{\"event\":\"broadcast_addresses\",\"addresses\":[\"127.0.0.1:12900\",\"a\\/b\\u00e9\"]}\n");
        assert_eq!(
            RegisterMessage::BroadcastAddresses(vec![]).encode(),
            b"{\"event\":\"broadcast_addresses\",\"addresses\":[]}\n"
        );
        for m in [gw, w, RegisterMessage::Ping, b] {
            assert_eq!(RegisterMessage::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn lenient_reading() {
        // array_unique leaves holes: PHP sends an object; values count, in order.
        let m = RegisterMessage::decode(
            br#"{"event":"broadcast_addresses","addresses":{"0":"b:1","2":"a:1"}}"#,
        );
        assert_eq!(
            m,
            Ok(RegisterMessage::BroadcastAddresses(vec![
                "b:1".into(),
                "a:1".into()
            ]))
        );
        let m = RegisterMessage::decode(
            b" { \"secret_key\" : null ,\n \"event\" : \"worker_connect\" } \r\n",
        );
        assert_eq!(
            m,
            Ok(RegisterMessage::WorkerConnect {
                secret_key: String::new()
            })
        );
    }

    #[test]
    fn refusals() {
        use RegisterError::*;
        for (line, want) in [
            (&b"not json"[..], Malformed),
            (b"", Malformed),
            (b"{}", MissingEvent),
            (br#"{"event":""}"#, MissingEvent),
            (br#"{"event":"0"}"#, MissingEvent),
            (br#"{"event":null}"#, MissingEvent),
            (br#"["event"]"#, MissingEvent),
            (br#""event""#, MissingEvent),
            (br#"{"event":"hello"}"#, UnknownEvent("hello".into())),
            (br#"{"event":7}"#, UnknownEvent("7".into())),
            (br#"{"event":"gateway_connect"}"#, MissingAddress),
            (
                br#"{"event":"gateway_connect","address":""}"#,
                MissingAddress,
            ),
            (
                br#"{"event":"gateway_connect","address":5}"#,
                InvalidField("address"),
            ),
            (
                br#"{"event":"worker_connect","secret_key":1}"#,
                InvalidField("secret_key"),
            ),
            (
                br#"{"event":"broadcast_addresses"}"#,
                InvalidField("addresses"),
            ),
            (
                br#"{"event":"broadcast_addresses","addresses":[1]}"#,
                InvalidField("addresses"),
            ),
        ] {
            assert_eq!(
                RegisterMessage::decode(line),
                Err(want.clone()),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(
            Malformed.is_bad_request()
                && MissingEvent.is_bad_request()
                && !MissingAddress.is_bad_request()
        );
    }

    #[test]
    fn lines() {
        let mut d = LineDecoder::new(8);
        let mut buf = BytesMut::from(&b"a\r\r\nb\n\r\n"[..]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), &b"a"[..]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), &b"b"[..]);
        assert_eq!(d.decode(&mut buf).unwrap().unwrap(), &b""[..]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        let mut buf = BytesMut::from(&b"0123456789"[..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(LineError::TooLong { max: 8, .. })
        ));
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert!(matches!(
            d.decode_eof(&mut buf),
            Err(LineError::Truncated { buffered: 3 })
        ));
    }

    fn text() -> impl Strategy<Value = String> {
        // Connect lines are concatenated unescaped, so `"`, `\` and control characters are out.
        "[a-zA-Z0-9 .:_/é😀-]{0,20}"
    }

    fn message() -> impl Strategy<Value = RegisterMessage> {
        prop_oneof![
            (text(), text())
                .prop_filter("address must not be empty", |(a, _)| !a.is_empty()
                    && a != "0")
                .prop_map(|(address, secret_key)| RegisterMessage::GatewayConnect {
                    address,
                    secret_key
                }),
            text().prop_map(|secret_key| RegisterMessage::WorkerConnect { secret_key }),
            Just(RegisterMessage::Ping),
            prop::collection::vec(any::<String>(), 0..5)
                .prop_map(RegisterMessage::BroadcastAddresses),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msgs in prop::collection::vec(message(), 0..6), chunk in 1usize..40) {
            let mut wire = BytesMut::new();
            let mut codec = LineDecoder::default();
            for m in &msgs {
                codec.encode(m, &mut wire).unwrap();
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(line) = codec.decode(&mut buf).unwrap() {
                    got.push(RegisterMessage::decode(&line).unwrap());
                }
            }
            prop_assert_eq!(got, msgs);
        }
    }

    #[test]
    fn an_owned_message_is_encoded_like_a_borrowed_one() {
        let msg = RegisterMessage::WorkerConnect {
            secret_key: "k".into(),
        };
        let mut d = LineDecoder::new(DEFAULT_MAX_LINE_LEN);
        let mut out = BytesMut::new();
        Encoder::<RegisterMessage>::encode(&mut d, msg.clone(), &mut out).unwrap();
        assert_eq!(&out[..], &msg.encode()[..]);
        // workerman's maxPackageSize.
        assert_eq!(DEFAULT_MAX_LINE_LEN, 10_485_760);
    }
}
