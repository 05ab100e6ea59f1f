//! Raw TCP connections with line or length-prefixed framing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchboard_core::Frame;
use switchboard_core::framing::{self, Decoder, Framing, FramingError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conn::{self, Incoming, Wire};
use crate::handler::{CloseReason, ConnectInfo, Decision, Transport};
use crate::hub::Hub;
use crate::stats::Counters;

/// How a TCP listener frames messages and opens connections.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct TcpOptions {
    /// Message framing.
    pub framing: Framing,
    /// Whether the client's first frame is a hello passed to
    /// [`Handler::on_connect`](crate::Handler::on_connect) in
    /// [`ConnectInfo::hello`]; it must arrive within the handshake timeout.
    pub hello: bool,
}

impl TcpOptions {
    /// Options with this framing, without a hello.
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            hello: false,
        }
    }

    /// Expect a hello frame before accepting.
    pub fn with_hello(mut self) -> Self {
        self.hello = true;
        self
    }
}

/// Grow the read buffer by this much when it is full.
const READ_CHUNK: usize = 4096;

pub(crate) struct TcpWire {
    stream: TcpStream,
    framing: Framing,
    decoder: Decoder,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl TcpWire {
    fn new(stream: TcpStream, framing: Framing, max: usize) -> Self {
        Self {
            stream,
            framing,
            decoder: Decoder::new(framing, max),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        }
    }

    async fn write_buffered(&mut self) -> Result<(), CloseReason> {
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        // A burst can leave a large buffer behind; an idle connection should not keep it.
        if self.wbuf.capacity() > 64 * 1024 {
            self.wbuf = BytesMut::new();
        }
        r.map_err(|e| CloseReason::Io(e.to_string()))
    }
}

fn inbound_frame(data: Bytes) -> Frame {
    // TCP has no frame kinds: UTF-8 payloads are text, anything else binary.
    Frame::text_bytes(data.clone()).unwrap_or_else(|_| Frame::binary(data))
}

impl Wire for TcpWire {
    async fn recv(&mut self) -> Incoming {
        loop {
            match self.decoder.decode(&mut self.rbuf) {
                Ok(Some(msg)) => return Incoming::Frame(inbound_frame(msg)),
                // Nothing buffered: an idle connection should not hold a read
                // buffer (most connections are idle most of the time).
                Ok(None) if self.rbuf.is_empty() && self.rbuf.capacity() > 0 => {
                    self.rbuf = BytesMut::new()
                }
                Ok(None) => {}
                Err(FramingError::TooLong { .. }) => return Incoming::Closed(CloseReason::TooBig),
                Err(e) => return Incoming::Closed(CloseReason::Protocol(e.to_string())),
            }
            // Wait for data before taking a buffer for it: an idle
            // connection holds none.
            if let Err(e) = self.stream.readable().await {
                return Incoming::Closed(CloseReason::Io(e.to_string()));
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => {
                    return Incoming::Closed(CloseReason::Client {
                        code: None,
                        reason: String::new(),
                    });
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Incoming::Closed(CloseReason::Io(e.to_string())),
            }
        }
    }

    async fn send_batch(&mut self, batch: &mut VecDeque<Frame>) -> Result<u32, CloseReason> {
        let mut skipped = 0;
        for frame in batch.drain(..) {
            if framing::encode(self.framing, frame.data(), &mut self.wbuf).is_err() {
                skipped += 1;
                tracing::warn!(
                    len = frame.len(),
                    "frame cannot be framed for this connection; dropped"
                );
            }
        }
        self.write_buffered().await?;
        Ok(skipped)
    }

    async fn ping(&mut self) -> Result<(), CloseReason> {
        Ok(())
    }

    async fn close(&mut self, reason: &CloseReason) {
        if !matches!(reason, CloseReason::Io(_) | CloseReason::Client { .. }) {
            let _ = self.stream.shutdown().await;
        }
    }
}

/// The TCP-ping variant: sends the configured ping frame every heartbeat.
struct PingingWire {
    inner: TcpWire,
    ping: Bytes,
}

impl Wire for PingingWire {
    fn recv(&mut self) -> impl std::future::Future<Output = Incoming> + Send {
        self.inner.recv()
    }
    fn send_batch(
        &mut self,
        batch: &mut VecDeque<Frame>,
    ) -> impl std::future::Future<Output = Result<u32, CloseReason>> + Send {
        self.inner.send_batch(batch)
    }
    async fn ping(&mut self) -> Result<(), CloseReason> {
        let _ = framing::encode(self.inner.framing, &self.ping, &mut self.inner.wbuf);
        self.inner.write_buffered().await
    }
    fn close(&mut self, reason: &CloseReason) -> impl std::future::Future<Output = ()> + Send {
        self.inner.close(reason)
    }
}

fn set_keepalive(stream: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!(%error, "cannot enable TCP keepalive");
    }
}

/// Accepts one TCP connection: optional hello, the application's decision, then
/// the connection's life.
pub(crate) async fn handle(hub: Hub, stream: TcpStream, peer: SocketAddr, opts: TcpOptions) {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let limits = hub.limits();
    let mut wire = TcpWire::new(stream, opts.framing, limits.max_message_size);
    let handshake_timeout = limits.handshake_timeout;

    let opened = tokio::time::timeout(handshake_timeout, async {
        let hello = if opts.hello {
            match wire.recv().await {
                Incoming::Frame(f) => Some(f),
                _ => return None,
            }
        } else {
            None
        };
        let info = ConnectInfo {
            conn: hub.next_conn_id(),
            transport: Transport::Tcp,
            peer: Some(peer),
            path: String::new(),
            query: String::new(),
            headers: http::HeaderMap::new(),
            hello,
        };
        let decision = hub.handler().on_connect(&hub, &info).await;
        Some((info.conn, decision))
    })
    .await;

    let (conn, accept) = match opened {
        Ok(Some((conn, Decision::Accept(a)))) => (conn, a),
        Ok(Some((_, Decision::Reject(r)))) => {
            Counters::add(&hub.counters().rejected, 1);
            if let Some(reply) = r.reply {
                let mut one = VecDeque::from([reply]);
                let _ = tokio::time::timeout(limits.close_timeout, wire.send_batch(&mut one)).await;
            }
            wire.close(&CloseReason::Kicked(r.reason)).await;
            return;
        }
        Ok(None) | Err(_) => {
            Counters::add(&hub.counters().rejected, 1);
            return;
        }
    };
    if hub.is_closing() {
        return;
    }
    let outbox = hub.open(&conn, accept);
    // A task of its own: the long-lived task is exactly the connection's
    // driver, without the handshake's state.
    match limits.tcp_ping.clone() {
        Some(ping) => {
            let wire = PingingWire { inner: wire, ping };
            hub.spawn_conn(conn::run(hub.clone(), conn, outbox, wire, Transport::Tcp));
        }
        None => hub.spawn_conn(conn::run(hub.clone(), conn, outbox, wire, Transport::Tcp)),
    }
}
