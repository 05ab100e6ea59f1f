//! GatewayProtocol frames: the messages on worker links and query sockets (docs/GATEWAY-PROTOCOL.md §3.1).
//!
//! A frame is a 28-byte big-endian header, `ext_data` and a body:
//!
//! ```text
//! pack_len u32 | cmd u8 | local_ip u32 | local_port u16 | client_ip u32 | client_port u16
//! | connection_id u32 | flag u8 | gateway_port u16 | ext_len u32 | ext_data | body
//! ```
//!
//! `pack_len` counts the whole frame. The codec keeps `ext_data` and the body
//! as raw bytes: whether the body is a scalar's string form or PHP
//! `serialize()` output depends on [`cmd::FLAG_BODY_IS_SCALAR`], and what
//! `ext_data` holds depends on the command. [`Frame::body_value`] applies PHP's
//! rule when a caller wants the value.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::php::{self, PhpError, Value};
use super::{ClientId, auth, cmd, stream};

/// Length of the fixed header.
pub const HEAD_LEN: usize = 28;

/// The largest frame accepted by default: workerman's `maxPackageSize`, 10 MiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 10 * 1024 * 1024;

/// The header fields of a frame, except the two lengths, which encoding derives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// The command (see [`cmd`]).
    pub cmd: u8,
    /// The gateway's lanIp as a big-endian `u32`; 0 in frames toward a gateway.
    pub local_ip: u32,
    /// The gateway's inner port; 0 in frames toward a gateway.
    pub local_port: u16,
    /// The client's IPv4 address (0 if not IPv4).
    pub client_ip: u32,
    /// The client's port.
    pub client_port: u16,
    /// The gateway-local connection id of the client.
    pub connection_id: u32,
    /// Flag bits ([`cmd::FLAG_BODY_IS_SCALAR`], [`cmd::FLAG_NOT_CALL_ENCODE`]).
    pub flag: u8,
    /// The gateway's client-facing port; 0 in frames toward a gateway.
    pub gateway_port: u16,
}

impl Header {
    /// PHP's `GatewayProtocol::$empty` with `cmd` set: what workers and pushers
    /// start every frame toward a gateway from.
    pub fn to_gateway(cmd: u8) -> Self {
        Self {
            cmd,
            ..Self::default()
        }
    }

    /// The client id this header names.
    pub fn client_id(&self) -> ClientId {
        ClientId::from_header(self)
    }

    /// Whether the body is a scalar's string form rather than `serialize()` output.
    pub fn body_is_scalar(&self) -> bool {
        self.flag & cmd::FLAG_BODY_IS_SCALAR != 0
    }

    /// Whether the gateway must write the body without its client protocol's encoder.
    pub fn is_raw(&self) -> bool {
        self.flag & cmd::FLAG_NOT_CALL_ENCODE != 0
    }
}

/// One GatewayProtocol frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: Header,
    /// Command-specific data (docs/GATEWAY-PROTOCOL.md §3.4): a session, a uid or group, or JSON.
    pub ext_data: Bytes,
    /// The payload, raw: see [`Header::body_is_scalar`].
    pub body: Bytes,
}

impl Frame {
    /// A frame toward a gateway with a string body, built like PHP's
    /// `Lib\Gateway`: all-zero template, `cmd`, `connection_id`, and flag
    /// [`cmd::FLAG_BODY_IS_SCALAR`] because a string is a scalar.
    pub fn to_gateway(
        cmd: u8,
        connection_id: u32,
        ext_data: impl Into<Bytes>,
        body: impl Into<Bytes>,
    ) -> Self {
        Self {
            header: Header {
                connection_id,
                flag: cmd::FLAG_BODY_IS_SCALAR,
                ..Header::to_gateway(cmd)
            },
            ext_data: ext_data.into(),
            body: body.into(),
        }
    }

    /// A frame toward a gateway with any PHP value as body, as
    /// `GatewayProtocol::encode` does it: a scalar is sent as its string form
    /// with [`cmd::FLAG_BODY_IS_SCALAR`] (`42` → `"42"`), null and arrays as
    /// `serialize()` output with the flag clear (`closeClient` without a
    /// message sends `N;`).
    pub fn to_gateway_value(
        cmd: u8,
        connection_id: u32,
        ext_data: impl Into<Bytes>,
        body: &Value,
    ) -> Self {
        let header = Header {
            connection_id,
            ..Header::to_gateway(cmd)
        };
        Self::from_value(header, ext_data, body)
    }

    /// An event about one client from a gateway to a worker, as
    /// `Gateway::sendToWorker` builds it: the header stored for the client at
    /// connect time with `cmd` set, the client's session as `ext_data`, and a
    /// string body (flag [`cmd::FLAG_BODY_IS_SCALAR`]). For
    /// `CMD_ON_WEBSOCKET_CONNECT`, whose body is an array, use [`Frame::from_value`].
    pub fn to_worker(
        cmd: u8,
        client: Header,
        session: impl Into<Bytes>,
        body: impl Into<Bytes>,
    ) -> Self {
        Self {
            header: Header {
                cmd,
                flag: client.flag | cmd::FLAG_BODY_IS_SCALAR,
                ..client
            },
            ext_data: session.into(),
            body: body.into(),
        }
    }

    /// A frame whose body is any PHP value, encoded as
    /// `GatewayProtocol::encode` does: a scalar as its string form with
    /// [`cmd::FLAG_BODY_IS_SCALAR`] set, null and arrays as `serialize()` output
    /// with it clear. The header's other flag bits are kept.
    pub fn from_value(header: Header, ext_data: impl Into<Bytes>, body: &Value) -> Self {
        let (flag, body) = match body.scalar_to_bytes() {
            Some(s) => (header.flag | cmd::FLAG_BODY_IS_SCALAR, s),
            None => (
                header.flag & !cmd::FLAG_BODY_IS_SCALAR,
                Bytes::from(php::to_bytes(body)),
            ),
        };
        Self {
            header: Header { flag, ..header },
            ext_data: ext_data.into(),
            body,
        }
    }

    /// The first frame of a worker link: `CMD_WORKER_CONNECT` with the worker's
    /// key (`"<name>:<process index>"`) and the cluster secret.
    pub fn worker_connect(worker_key: &str, secret_key: &str) -> Self {
        let body = auth::WorkerConnect {
            worker_key: worker_key.to_owned(),
            secret_key: secret_key.to_owned(),
        }
        .encode();
        Self::to_gateway(cmd::WORKER_CONNECT, 0, Bytes::new(), body)
    }

    /// `CMD_GATEWAY_CLIENT_CONNECT`, which authorizes a non-worker connection;
    /// PHP sends it before every request when a secret is set.
    pub fn gateway_client_connect(secret_key: &str) -> Self {
        let body = auth::GatewayClientConnect {
            secret_key: secret_key.to_owned(),
        }
        .encode();
        Self::to_gateway(cmd::GATEWAY_CLIENT_CONNECT, 0, Bytes::new(), body)
    }

    /// A gateway's keep-alive on a worker link: `CMD_PING`, all zero, flag 1.
    pub fn ping() -> Self {
        Self::to_gateway(cmd::PING, 0, Bytes::new(), Bytes::new())
    }

    /// The body as PHP's decoder returns it: the raw string when the body is
    /// a scalar, otherwise `unserialize(body)`.
    pub fn body_value(&self) -> Result<Value, PhpError> {
        if self.header.body_is_scalar() {
            Ok(Value::Str(self.body.clone()))
        } else {
            php::unserialize(&self.body)
        }
    }

    /// The client id the header names.
    pub fn client_id(&self) -> ClientId {
        self.header.client_id()
    }

    /// The encoded size: header, `ext_data` and body.
    pub fn encoded_len(&self) -> usize {
        HEAD_LEN + self.ext_data.len() + self.body.len()
    }

    /// Appends the encoded frame, `pack_len` and `ext_len` included, to `dst`.
    ///
    /// # Panics
    ///
    /// If the frame is longer than `u32::MAX` bytes, which the format cannot
    /// express. The [`Encoder`] impls of [`FrameDecoder`] return an error
    /// instead, for anything over their `max_frame_len`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let pack_len = u32::try_from(self.encoded_len()).expect("frame longer than u32::MAX");
        // ext_data is shorter than the whole frame, so it fits too.
        let ext_len = self.ext_data.len() as u32;
        let h = &self.header;
        dst.reserve(self.encoded_len());
        dst.put_u32(pack_len);
        dst.put_u8(h.cmd);
        dst.put_u32(h.local_ip);
        dst.put_u16(h.local_port);
        dst.put_u32(h.client_ip);
        dst.put_u16(h.client_port);
        dst.put_u32(h.connection_id);
        dst.put_u8(h.flag);
        dst.put_u16(h.gateway_port);
        dst.put_u32(ext_len);
        dst.put_slice(&self.ext_data);
        dst.put_slice(&self.body);
    }
}

/// A frame the codec refuses. The connection cannot continue after it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// `pack_len` is smaller than the header itself.
    #[error("frame length {pack_len} is shorter than the {HEAD_LEN}-byte header")]
    FrameTooShort {
        /// The declared length.
        pack_len: u32,
    },
    /// A frame is longer than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLong {
        /// The frame's length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// `ext_len` does not fit in the frame.
    #[error("ext_data length {ext_len} exceeds the {room} bytes after the header")]
    ExtTooLong {
        /// The declared `ext_len`.
        ext_len: u32,
        /// `pack_len - 28`.
        room: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame.
        buffered: usize,
    },
    /// Reading or writing the stream failed.
    #[error("i/o error on a gateway connection")]
    Io(#[from] std::io::Error),
}

/// A streaming frame decoder (and encoder) for one connection.
///
/// Validation happens as soon as the bytes for it are there: the length once
/// 4 bytes arrived, `ext_len` once the header did. Nothing is reserved on the
/// strength of a declared length, and each call does constant work until a
/// whole frame is buffered, then slices it without copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameDecoder {
    /// Frames longer than this are refused, whole-frame length included.
    pub max_frame_len: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames over `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        Self { max_frame_len }
    }
}

impl Default for FrameDecoder {
    /// Workerman's limit: [`DEFAULT_MAX_FRAME_LEN`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        let Some(len) = src.get(..4) else {
            return Ok(None);
        };
        let pack_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        if (pack_len as usize) < HEAD_LEN {
            return Err(ProtocolError::FrameTooShort { pack_len });
        }
        if pack_len as usize > self.max_frame_len {
            return Err(ProtocolError::FrameTooLong {
                len: pack_len as usize,
                max: self.max_frame_len,
            });
        }
        if src.len() < HEAD_LEN {
            return Ok(None);
        }
        let ext_len = u32::from_be_bytes([src[24], src[25], src[26], src[27]]);
        let room = pack_len - HEAD_LEN as u32;
        if ext_len > room {
            return Err(ProtocolError::ExtTooLong { ext_len, room });
        }
        if src.len() < pack_len as usize {
            return Ok(None);
        }
        let mut frame = src.split_to(pack_len as usize).freeze();
        let mut h = frame.split_to(HEAD_LEN);
        h.advance(4);
        let header = Header {
            cmd: h.get_u8(),
            local_ip: h.get_u32(),
            local_port: h.get_u16(),
            client_ip: h.get_u32(),
            client_port: h.get_u16(),
            connection_id: h.get_u32(),
            flag: h.get_u8(),
            gateway_port: h.get_u16(),
        };
        let ext_data = frame.split_to(ext_len as usize);
        Ok(Some(Frame {
            header,
            ext_data,
            body: frame,
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        stream::decode_eof(self, src, |buffered| ProtocolError::Truncated { buffered })
    }
}

impl Encoder<&Frame> for FrameDecoder {
    type Error = ProtocolError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let len = frame.encoded_len();
        if len > self.max_frame_len || u32::try_from(len).is_err() {
            return Err(ProtocolError::FrameTooLong {
                len,
                max: self.max_frame_len,
            });
        }
        frame.encode(dst);
        Ok(())
    }
}

impl Encoder<Frame> for FrameDecoder {
    type Error = ProtocolError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        Encoder::<&Frame>::encode(self, &frame, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(
        d: &mut FrameDecoder,
        input: &[u8],
        chunk: usize,
    ) -> Result<Vec<Frame>, ProtocolError> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(f) = d.decode(&mut buf)? {
                out.push(f);
            }
        }
        if let Some(f) = d.decode_eof(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    fn wire(frames: &[Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out);
        }
        out
    }

    #[test]
    fn php_template_frames() {
        // synthetic.json: CMD_PING, sendToClient($cid, "raw", true), an int body, an array body.
        let hex = |f: &Frame| {
            wire(std::slice::from_ref(f))
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        assert_eq!(
            hex(&Frame::ping()),
            "0000001cc90000000000000000000000000000000001000000000000"
        );
        let mut raw = Frame::to_gateway(cmd::SEND_TO_ONE, 7, "", "raw");
        raw.header.flag |= cmd::FLAG_NOT_CALL_ENCODE;
        assert_eq!(
            hex(&raw),
            "0000001f050000000000000000000000000000000703000000000000726177"
        );
        let int = Frame::to_gateway_value(cmd::SEND_TO_ONE, 7, "", &Value::Int(42));
        assert_eq!(
            hex(&int),
            "0000001e0500000000000000000000000000000007010000000000003432"
        );
        let arr: php::Array = [("a", 1)].into_iter().collect();
        let arr = Frame::to_gateway_value(cmd::SEND_TO_ONE, 7, "", &Value::Array(arr));
        assert_eq!(
            hex(&arr),
            "0000002e050000000000000000000000000000000700000000000000613a313a7b733a313a2261223b693a313b7d"
        );
        assert_eq!(
            arr.body_value().unwrap().as_array().unwrap().get_str("a"),
            Some(&Value::Int(1))
        );
        let kick = Frame::to_gateway_value(cmd::KICK, 3, "", &Value::Null);
        assert_eq!((kick.header.flag, &kick.body[..]), (0, &b"N;"[..]));
    }

    #[test]
    fn events_to_workers() {
        // plain.json: CMD_ON_CONNECT for alice, then her CMD_ON_MESSAGE with a session.
        let client = Header {
            local_ip: 0x7f00_0001,
            local_port: 12900,
            client_ip: 0x7f00_0001,
            client_port: 60772,
            connection_id: 1,
            gateway_port: 13002,
            ..Header::default()
        };
        let connect = Frame::to_worker(cmd::ON_CONNECT, client, "", "");
        let hex = wire(std::slice::from_ref(&connect))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(
            hex,
            "0000001c017f00000132647f000001ed64000000010132ca00000000"
        );
        let msg = Frame::to_worker(cmd::ON_MESSAGE, client, "a:0:{}", "hi");
        assert_eq!(
            (msg.header.flag, msg.client_id().to_string().as_str()),
            (1, "7f000001326400000001")
        );
        let data: php::Array = [("get", php::Array::new())].into_iter().collect();
        let ws = Frame::from_value(
            Header {
                cmd: cmd::ON_WEBSOCKET_CONNECT,
                ..client
            },
            "",
            &Value::Array(data),
        );
        assert_eq!(
            (ws.header.flag, &ws.body[..]),
            (0, &br#"a:1:{s:3:"get";a:0:{}}"#[..])
        );
    }

    #[test]
    fn refuses_bad_lengths() {
        let mut d = FrameDecoder::default();
        // pack_len < 28 is refused as soon as its 4 bytes are there.
        let mut buf = BytesMut::from(&[0, 0, 0, 27][..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(ProtocolError::FrameTooShort { pack_len: 27 })
        ));
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(ProtocolError::FrameTooShort { pack_len: 0 })
        ));
        // A huge pack_len is refused without reserving anything for it.
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        let cap = buf.capacity();
        assert!(matches!(
            d.decode(&mut buf),
            Err(ProtocolError::FrameTooLong {
                len: 0xffff_ffff,
                max: DEFAULT_MAX_FRAME_LEN
            })
        ));
        assert_eq!(buf.capacity(), cap);
        // A frame within u32 but over a configured limit.
        let mut small = FrameDecoder::new(100);
        let mut buf = wire(&[Frame::to_gateway(cmd::SEND_TO_ONE, 1, "", vec![b'x'; 73])]);
        assert!(matches!(
            small.decode(&mut buf),
            Err(ProtocolError::FrameTooLong { len: 101, max: 100 })
        ));
        // ext_len larger than what follows the header.
        let mut buf = wire(&[Frame::to_gateway(cmd::BIND_UID, 1, "bob", "")]);
        buf[27] = 4;
        assert!(matches!(
            d.decode(&mut buf),
            Err(ProtocolError::ExtTooLong {
                ext_len: 4,
                room: 3
            })
        ));
        // A stream that ends inside a frame.
        let mut buf = wire(&[Frame::ping()]);
        buf.truncate(20);
        assert!(matches!(
            d.decode_eof(&mut buf),
            Err(ProtocolError::Truncated { buffered: 20 })
        ));
        // The encoder refuses what a peer with the same limit would refuse.
        let big = Frame::to_gateway(cmd::SEND_TO_ONE, 1, "", vec![b'x'; 73]);
        assert!(matches!(
            small.encode(&big, &mut BytesMut::new()),
            Err(ProtocolError::FrameTooLong { len: 101, max: 100 })
        ));
    }

    #[test]
    fn zero_length_parts_and_exact_fit() {
        // A frame of exactly the limit is encoded; one byte more is refused,
        // owned or borrowed.
        let f = Frame::to_gateway(cmd::SEND_TO_ONE, 1, "", "x");
        let mut d = FrameDecoder::new(HEAD_LEN + 1);
        let mut out = BytesMut::new();
        Encoder::<Frame>::encode(&mut d, f.clone(), &mut out).unwrap();
        assert_eq!(out.len(), HEAD_LEN + 1, "the owned frame is written");
        let big = Frame::to_gateway(cmd::SEND_TO_ONE, 1, "", "xy");
        assert!(matches!(
            Encoder::<Frame>::encode(&mut d, big, &mut out),
            Err(ProtocolError::FrameTooLong { .. })
        ));
        // workerman's maxPackageSize.
        assert_eq!(DEFAULT_MAX_FRAME_LEN, 10_485_760);
        let f = Frame::to_gateway(cmd::SEND_TO_ONE, 1, "", "");
        let got = decode_all(
            &mut FrameDecoder::new(HEAD_LEN),
            &wire(std::slice::from_ref(&f)),
            1,
        )
        .unwrap();
        assert_eq!(got, [f]);
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        (
            (
                any::<u8>(),
                any::<u32>(),
                any::<u16>(),
                any::<u32>(),
                any::<u16>(),
            ),
            (any::<u32>(), any::<u8>(), any::<u16>()),
            prop::collection::vec(any::<u8>(), 0..40),
            prop::collection::vec(any::<u8>(), 0..80),
        )
            .prop_map(
                |(
                    (cmd, local_ip, local_port, client_ip, client_port),
                    (connection_id, flag, gateway_port),
                    ext,
                    body,
                )| Frame {
                    header: Header {
                        cmd,
                        local_ip,
                        local_port,
                        client_ip,
                        client_port,
                        connection_id,
                        flag,
                        gateway_port,
                    },
                    ext_data: Bytes::from(ext),
                    body: Bytes::from(body),
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip_in_any_chunks(frames in prop::collection::vec(arb_frame(), 0..8), chunk in 1usize..64) {
            let bytes = wire(&frames);
            let got = decode_all(&mut FrameDecoder::default(), &bytes, chunk).unwrap();
            prop_assert_eq!(&got, &frames);
            // Re-encoding reproduces the stream byte for byte.
            prop_assert_eq!(wire(&got), bytes);
        }

        #[test]
        fn arbitrary_input_is_bounded(input in prop::collection::vec(any::<u8>(), 0..400), chunk in 1usize..32) {
            let max = 64;
            let mut d = FrameDecoder::new(max);
            let mut buf = BytesMut::new();
            'feed: for piece in input.chunks(chunk) {
                buf.extend_from_slice(piece);
                loop {
                    match d.decode(&mut buf) {
                        Ok(Some(f)) => prop_assert!(f.encoded_len() <= max),
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                // At most one incomplete frame plus the last chunk is held.
                prop_assert!(buf.len() < max + chunk);
            }
        }
    }

    #[test]
    fn the_scalar_flag_is_set_or_cleared_and_other_bits_kept() {
        const OTHER: u8 = 0x40;
        let client = Header {
            flag: OTHER | cmd::FLAG_BODY_IS_SCALAR,
            ..Header::default()
        };
        let f = Frame::to_worker(cmd::ON_MESSAGE, client, "", "hi");
        assert_eq!(
            f.header.flag,
            OTHER | cmd::FLAG_BODY_IS_SCALAR,
            "set stays set"
        );
        let f = Frame::from_value(client, "", &Value::Int(1));
        assert_eq!(f.header.flag, OTHER | cmd::FLAG_BODY_IS_SCALAR);
        let f = Frame::from_value(client, "", &Value::Null);
        assert_eq!(f.header.flag, OTHER, "cleared for serialize() output");
        assert_eq!(&f.body[..], b"N;");
    }
}
