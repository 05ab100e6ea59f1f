//! Frames: what a connection sends and receives, independent of its transport.
//!
//! A frame is a kind (text or binary) and a [`Bytes`] payload. Cloning one is a
//! reference-count increment, so a push encodes its payload once and shares it
//! with every recipient.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Whether a frame is text (valid UTF-8) or binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum FrameKind {
    /// UTF-8 text: a WebSocket text frame.
    #[default]
    Text,
    /// Arbitrary bytes: a WebSocket binary frame.
    Binary,
}

/// The payload was declared text but is not UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("text frame payload is not valid UTF-8")]
pub struct NotUtf8;

/// One message to or from a connection.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    kind: FrameKind,
    data: Bytes,
}

impl Frame {
    /// A text frame. Always valid UTF-8, so transports never check it again.
    pub fn text(s: impl Into<String>) -> Self {
        Self {
            kind: FrameKind::Text,
            data: Bytes::from(s.into()),
        }
    }

    /// A text frame from bytes, checked once here.
    pub fn text_bytes(data: Bytes) -> Result<Self, NotUtf8> {
        std::str::from_utf8(&data).map_err(|_| NotUtf8)?;
        Ok(Self {
            kind: FrameKind::Text,
            data,
        })
    }

    /// A binary frame.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self {
            kind: FrameKind::Binary,
            data: data.into(),
        }
    }

    /// A frame of the given kind; text is checked for UTF-8.
    pub fn new(kind: FrameKind, data: Bytes) -> Result<Self, NotUtf8> {
        match kind {
            FrameKind::Text => Self::text_bytes(data),
            FrameKind::Binary => Ok(Self::binary(data)),
        }
    }

    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        self.kind
    }

    /// The payload.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The payload as text, for a text frame.
    pub fn as_text(&self) -> Option<&str> {
        match self.kind {
            // Invariant: every constructor of a text frame checked UTF-8.
            FrameKind::Text => std::str::from_utf8(&self.data).ok(),
            FrameKind::Binary => None,
        }
    }

    /// The payload length in bytes.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Consumes the frame into its payload.
    pub fn into_data(self) -> Bytes {
        self.data
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.as_text() {
            Some(t) => write!(f, "Text({t:?})"),
            None => write!(f, "Binary({} bytes)", self.data.len()),
        }
    }
}

impl Serialize for Frame {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.kind, &self.data).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Frame {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, data) = <(FrameKind, Bytes)>::deserialize(d)?;
        Frame::new(kind, data).map_err(serde::de::Error::custom)
    }
}

/// What a push carries: either a complete frame, or bytes whose kind is the
/// hub's default frame kind (GatewayWorker's `default_opcode`).
#[derive(Debug, Clone)]
pub enum Payload {
    /// A frame whose kind is fixed.
    Frame(Frame),
    /// Bytes sent with the hub's default kind; if that is text they must be UTF-8.
    Default(Bytes),
}

impl Payload {
    /// Resolves the payload against the hub's default kind.
    pub fn into_frame(self, default: FrameKind) -> Result<Frame, NotUtf8> {
        match self {
            Payload::Frame(f) => Ok(f),
            Payload::Default(b) => Frame::new(default, b),
        }
    }
}

impl From<Frame> for Payload {
    fn from(f: Frame) -> Self {
        Payload::Frame(f)
    }
}
impl From<&str> for Payload {
    fn from(s: &str) -> Self {
        Payload::Default(Bytes::copy_from_slice(s.as_bytes()))
    }
}
impl From<String> for Payload {
    fn from(s: String) -> Self {
        Payload::Default(Bytes::from(s))
    }
}
impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::Default(b)
    }
}
impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Payload::Default(Bytes::from(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_checked_once() {
        assert!(Frame::text_bytes(Bytes::from_static(b"\xff")).is_err());
        assert_eq!(Frame::text("hé").as_text(), Some("hé"));
        assert_eq!(Frame::binary(vec![0xff]).as_text(), None);
        let p: Payload = Bytes::from_static(b"\xff").into();
        assert!(p.clone().into_frame(FrameKind::Text).is_err());
        assert_eq!(
            p.into_frame(FrameKind::Binary).unwrap().kind(),
            FrameKind::Binary
        );
    }

    #[test]
    fn clones_share_the_payload() {
        let f = Frame::text("x".repeat(100));
        let g = f.clone();
        assert_eq!(f.data().as_ptr(), g.data().as_ptr());
    }

    #[test]
    fn accessors_see_the_payload() {
        let f = Frame::binary(vec![1, 2, 3]);
        assert_eq!((f.len(), f.is_empty()), (3, false));
        assert_eq!(&f.data()[..], &[1, 2, 3]);
        assert_eq!(&f.into_data()[..], &[1, 2, 3]);
        let e = Frame::text("");
        assert_eq!((e.len(), e.is_empty()), (0, true));
    }
}
