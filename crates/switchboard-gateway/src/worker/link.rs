//! One worker's link to one gateway.
//!
//! Commands go out through a bounded queue and a writer task that batches
//! them. Queries go out on the same link, after the commands written before
//! them, so a query sees the effect of this worker's earlier commands (a
//! `join` then a `group_count` answer consistently). A gateway writes a
//! query's reply on the connection the query came on; replies come back in
//! order and are told apart from event frames by their fifth byte (see
//! [`crate::ext`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Buf, Bytes, BytesMut};
use switchboard::core::NodeId;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::codec::Decoder;

use crate::protocol::frame::{Frame as GwFrame, FrameDecoder, Header};
use crate::protocol::php::{self, Value};
use crate::protocol::{ProtocolError, cmd};

/// The byte stream of a worker link broke the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum LinkStreamError {
    /// A bad frame.
    #[error(transparent)]
    Frame(#[from] ProtocolError),
    /// A reply longer than the largest frame.
    #[error("reply of {0} bytes is too long")]
    ReplyTooLong(usize),
    /// A reply that is not PHP `serialize` output.
    #[error("undecodable reply")]
    BadReply(#[source] crate::protocol::php::PhpError),
    /// The socket failed.
    #[error("i/o error on a gateway link")]
    Io(#[from] std::io::Error),
}

/// Frames queued to one gateway. The application's pushes must never wait,
/// so a full queue drops (counted in `publish_dropped`); this is sized for a
/// burst of 1,000 clients × 100 pushes, each to every gateway, at about
/// 150 bytes a frame (10 MB at most).
pub(super) const LINK_QUEUE: usize = 64 * 1024;

/// A query on a link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkError {
    /// The link is gone or its queue is full.
    Unavailable,
}

/// What arrives on a worker link.
#[derive(Debug)]
pub(super) enum Incoming {
    /// A frame (a client event, a ping, an extension).
    Frame(GwFrame),
    /// The reply to the oldest outstanding query.
    Reply(Value),
}

/// Splits a worker link's byte stream into frames and query replies.
#[derive(Debug)]
pub(super) struct LinkDecoder {
    frames: FrameDecoder,
    max: usize,
}

impl LinkDecoder {
    pub(super) fn new(max: usize) -> Self {
        Self {
            frames: FrameDecoder::new(max),
            max,
        }
    }
}

/// Whether a message's fifth byte starts PHP `serialize` output (a reply).
fn is_reply(b: u8) -> bool {
    matches!(b, b'N' | b'b' | b'i' | b'd' | b's' | b'a')
}

impl Decoder for LinkDecoder {
    type Item = Incoming;
    type Error = LinkStreamError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, LinkStreamError> {
        if src.len() < 5 {
            return Ok(None);
        }
        if !is_reply(src[4]) {
            return Ok(self.frames.decode(src)?.map(Incoming::Frame));
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max {
            return Err(LinkStreamError::ReplyTooLong(len));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let payload = src.split_to(len);
        let value = php::unserialize(&payload).map_err(LinkStreamError::BadReply)?;
        Ok(Some(Incoming::Reply(value)))
    }
}

/// A live link, as the rest of the worker sees it.
#[derive(Debug)]
pub(super) struct Link {
    /// The gateway's node id.
    pub(super) node: NodeId,
    tx: mpsc::Sender<Bytes>,
    /// Outstanding queries, oldest first. Locked while a query is queued, so
    /// the order of this list is the order on the wire.
    replies: Mutex<VecDeque<oneshot::Sender<Value>>>,
    /// The gateway speaks the switchboard extensions.
    pub(super) negotiated: AtomicBool,
    /// The gateway confirmed a drain: no event follows.
    pub(super) drained: AtomicBool,
    pub(super) drained_notify: Notify,
    pub(super) dropped: AtomicU64,
}

impl Link {
    pub(super) fn new(node: NodeId, tx: mpsc::Sender<Bytes>) -> Self {
        Self {
            node,
            tx,
            replies: Mutex::new(VecDeque::new()),
            negotiated: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            drained_notify: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues bytes (one or more frames) to the gateway; never waits.
    pub(super) fn send(&self, bytes: Bytes) -> bool {
        let ok = self.tx.try_send(bytes).is_ok();
        if !ok {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Queues `frames` ending with a query, and waits for the reply.
    pub(super) async fn query(&self, frames: Bytes) -> Result<Value, LinkError> {
        let rx = {
            let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
            let (tx, rx) = oneshot::channel();
            if self.tx.try_send(frames).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Err(LinkError::Unavailable);
            }
            replies.push_back(tx);
            rx
        };
        rx.await.map_err(|_| LinkError::Unavailable)
    }

    /// Hands a reply to the oldest outstanding query.
    pub(super) fn reply(&self, v: Value) {
        let waiter = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        match waiter {
            Some(w) => {
                let _ = w.send(v);
            }
            None => tracing::warn!(gateway = %self.node, "a reply nobody asked for: ignored"),
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A frame toward a gateway: GatewayWorker's all-zero template with `cmd`,
/// `connection_id`, `flag`, `ext_data` and `body` set.
pub(super) fn frame(
    out: &mut BytesMut,
    cmd: u8,
    conn: u32,
    flag: u8,
    ext_data: Bytes,
    body: Bytes,
) {
    GwFrame {
        header: Header {
            cmd,
            connection_id: conn,
            flag,
            ..Header::default()
        },
        ext_data,
        body,
    }
    .encode(out);
}

/// One frame toward a gateway, as bytes.
pub(super) fn one(cmd: u8, conn: u32, flag: u8, ext_data: Bytes, body: Bytes) -> Bytes {
    let mut out = BytesMut::new();
    frame(&mut out, cmd, conn, flag, ext_data, body);
    out.freeze()
}

/// A frame whose body is an empty scalar.
pub(super) fn plain(cmd: u8, conn: u32, ext_data: Bytes) -> Bytes {
    one(cmd, conn, cmd::FLAG_BODY_IS_SCALAR, ext_data, Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_frames_are_told_apart() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&plain(cmd::ON_CONNECT, 7, Bytes::new()));
        buf.extend_from_slice(&[0, 0, 0, 4]);
        buf.extend_from_slice(b"i:1;");
        buf.extend_from_slice(&plain(cmd::ON_CLOSE, 7, Bytes::new()));
        let mut d = LinkDecoder::new(1 << 20);
        let mut got = Vec::new();
        // Fed one byte at a time: every split point is handled.
        let mut src = BytesMut::new();
        for b in buf {
            src.extend_from_slice(&[b]);
            while let Some(i) = d.decode(&mut src).unwrap() {
                got.push(i);
            }
        }
        assert!(matches!(&got[0], Incoming::Frame(f) if f.header.cmd == cmd::ON_CONNECT));
        assert!(matches!(&got[1], Incoming::Reply(Value::Int(1))));
        assert!(matches!(&got[2], Incoming::Frame(f) if f.header.cmd == cmd::ON_CLOSE));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn a_huge_reply_length_is_refused_before_it_arrives() {
        let mut src = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, b'a'][..]);
        assert!(LinkDecoder::new(1 << 20).decode(&mut src).is_err());
    }
}
