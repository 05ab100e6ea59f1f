//! switchboard's extensions to the GatewayWorker protocol.
//!
//! GatewayWorker has no way for a worker to leave without losing the events
//! already on their way to it, nor for the application to refuse a WebSocket
//! before the upgrade completes, nor to carry a binary frame. A switchboard
//! worker announces these extensions in its `CMD_WORKER_CONNECT` body (an
//! extra JSON key PHP gateways ignore); a switchboard gateway answers with
//! [`HELLO`] and from then on both sides may use them on that link. Nothing
//! here is ever sent to a peer that did not announce it, so PHP gateways and
//! PHP workers see only the standard protocol.
//!
//! Codes are chosen so that a frame is never mistaken for a query reply on a
//! worker link: a reply's fifth byte is the first byte of PHP `serialize`
//! output (`N b i d s a`), a frame's is its command.

use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchboard::core::{Frame, FrameKind};

/// The key a switchboard worker adds to its `CMD_WORKER_CONNECT` JSON body.
pub const ANNOUNCE_KEY: &str = "switchboard";
/// The extension revision announced.
pub const REVISION: u32 = 1;

/// G→W: this gateway speaks the extensions (reply to an announcing worker).
pub const HELLO: u8 = 240;
/// W→G: route no new events to this worker; answer with [`DRAINED`].
pub const DRAIN: u8 = 241;
/// G→W: no event follows on this link; the worker may close once it has
/// handled what it received.
pub const DRAINED: u8 = 242;
/// G→W: a client asks to connect; the body is a [`ConnectRequest`]. The
/// client is not visible to any push until the worker's [`VERDICT`].
pub const CONNECT: u8 = 243;
/// W→G: the application's decision on a [`CONNECT`]; the body is a [`Verdict`].
pub const VERDICT: u8 = 244;

/// Flag bit: the body is a binary frame (GatewayWorker uses bits 0 and 1 only).
pub const FLAG_BINARY: u8 = 0x80;

/// A client's connection request, as the gateway saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectRequest {
    /// Whether the client came over WebSocket (else raw TCP).
    pub websocket: bool,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The request path (WebSocket).
    pub path: String,
    /// The raw query string (WebSocket).
    pub query: String,
    /// Request headers (WebSocket), names lowercase.
    pub headers: Vec<(String, Bytes)>,
    /// The first frame of a TCP client, when the gateway waits for a hello.
    pub hello: Option<WireFrame>,
}

/// A frame with its kind, for the extension bodies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireFrame {
    /// Binary (else text).
    pub binary: bool,
    /// The payload.
    pub data: Bytes,
}

impl From<&Frame> for WireFrame {
    fn from(f: &Frame) -> Self {
        Self {
            binary: f.kind() == FrameKind::Binary,
            data: f.data().clone(),
        }
    }
}

impl WireFrame {
    /// Back to a frame; text that is not UTF-8 becomes binary.
    pub fn into_frame(self) -> Frame {
        to_frame(self.binary, self.data)
    }
}

/// A frame from a body and its binary flag; text that is not UTF-8 (possible
/// from a PHP sender) is delivered as binary rather than dropped.
pub fn to_frame(binary: bool, data: Bytes) -> Frame {
    if binary {
        return Frame::binary(data);
    }
    match Frame::text_bytes(data.clone()) {
        Ok(f) => f,
        Err(_) => Frame::binary(data),
    }
}

/// The application's decision on a connection request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Accept, with what to do before the connection is visible.
    Accept {
        /// The user to bind.
        user: Option<String>,
        /// Groups to join.
        groups: Vec<String>,
        /// The initial session.
        session: Vec<(String, String)>,
        /// Frames sent first.
        greeting: Vec<WireFrame>,
    },
    /// Refuse.
    Reject {
        /// HTTP status for a WebSocket upgrade.
        status: u16,
        /// Why.
        reason: String,
        /// A frame written to a TCP client before closing.
        reply: Option<WireFrame>,
    },
}

/// An extension body could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed extension body")]
pub struct ExtError(#[source] postcard::Error);

/// Encodes an extension body.
pub fn encode<T: Serialize>(v: &T) -> Bytes {
    // Serializing these plain structs into a Vec cannot fail.
    Bytes::from(postcard::to_allocvec(v).unwrap_or_default())
}

/// Decodes an extension body.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, ExtError> {
    postcard::from_bytes(b).map_err(ExtError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip() {
        let r = ConnectRequest {
            websocket: true,
            peer: Some("127.0.0.1:4000".parse().unwrap()),
            path: "/ws".into(),
            query: "uid=a".into(),
            headers: vec![("host".into(), Bytes::from_static(b"x"))],
            hello: None,
        };
        assert_eq!(decode::<ConnectRequest>(&encode(&r)).unwrap(), r);
        let v = Verdict::Accept {
            user: Some("a".into()),
            groups: vec!["g".into()],
            session: vec![],
            greeting: vec![WireFrame::from(&Frame::text("hi"))],
        };
        assert_eq!(decode::<Verdict>(&encode(&v)).unwrap(), v);
        assert!(decode::<Verdict>(b"\xff\xff").is_err());
    }

    #[test]
    fn extension_codes_never_look_like_a_reply() {
        // The first byte of any PHP serialize() output.
        for c in [HELLO, DRAIN, DRAINED, CONNECT, VERDICT] {
            assert!(!b"Nbidsa".contains(&c));
        }
    }

    #[test]
    fn text_that_is_not_utf8_becomes_binary() {
        assert_eq!(
            to_frame(false, Bytes::from_static(b"\xff")).kind(),
            FrameKind::Binary
        );
        assert_eq!(
            to_frame(false, Bytes::from_static(b"ok")).kind(),
            FrameKind::Text
        );
    }
}
