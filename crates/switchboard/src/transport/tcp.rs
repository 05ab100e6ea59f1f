//! Raw TCP connections with line or length-prefixed framing.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchboard_core::Frame;
use switchboard_core::framing::{self, Decoder, Framing, FramingError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::conn::{self, Flushed, Incoming, Wire};
use crate::handler::{CloseReason, ConnectInfo, Decision, Transport};
use crate::hub::Hub;
use crate::outbox::{Batch, Outbox};
use crate::stats::Counters;
use std::sync::Arc;
use switchboard_core::ConnId;

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
/// Queued frames are framed into one buffer up to about this size before a
/// write, so a burst leaves in few system calls.
const WRITE_CHUNK: usize = 64 * 1024;

/// The byte stream under a TCP connection: the socket itself, or TLS over it
/// (see [`crate::tls`]). Readiness-based, like the socket: `try_` calls that
/// never wait, and separate waits for room or data, so that an idle
/// connection holds no buffer and no waiter.
pub(crate) trait Io: Send + 'static {
    /// Waits until a read may find something.
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads what is there into `buf`'s spare room; `WouldBlock` when nothing is.
    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize>;
    /// Writes what the stream takes now; `WouldBlock` when it takes nothing.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Sends what the stream holds of what it took (TLS records), without
    /// waiting: whether it is all out.
    fn try_flush(&mut self) -> io::Result<bool> {
        Ok(true)
    }
    /// Waits until the stream may take more.
    fn writable(&mut self) -> impl Future<Output = io::Result<()>> + Send;
    /// Ends the write side (a TLS close_notify first).
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

impl Io for TcpStream {
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        let n = super::read_once(self, room, |s| s.recv(spare))?;
        #[allow(unsafe_code)]
        // SAFETY: `recv` initialised the first `n` bytes of the spare
        // capacity (as `TcpStream::try_read_buf` relies on too).
        unsafe {
            buf.set_len(buf.len() + n);
        }
        Ok(n)
    }
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
    fn writable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::writable(self)
    }
    fn shutdown(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        AsyncWriteExt::shutdown(self)
    }
}

pub(crate) struct TcpWire<S = TcpStream> {
    stream: S,
    framing: Framing,
    decoder: Decoder,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl<S: Io> TcpWire<S> {
    fn new(stream: S, framing: Framing, max: usize) -> Self {
        Self {
            stream,
            framing,
            decoder: Decoder::new(framing, max),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        }
    }

    /// Writes what `wbuf` holds, as far as the socket takes it now.
    /// `Ok(false)` when the socket is full.
    fn write_buffered(&mut self) -> Result<bool, CloseReason> {
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(0) => return Err(CloseReason::Io("connection closed while writing".into())),
                Ok(n) => {
                    let _ = self.wbuf.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(CloseReason::Io(e.to_string())),
            }
        }
        if !self
            .stream
            .try_flush()
            .map_err(|e| CloseReason::Io(e.to_string()))?
        {
            return Ok(false);
        }
        // A burst can leave a large buffer behind; an idle connection should
        // not keep it.
        if self.wbuf.capacity() > 2 * WRITE_CHUNK {
            self.wbuf = BytesMut::new();
        }
        Ok(true)
    }

    /// Frames `frames` into `wbuf`; returns how many could not be framed.
    fn encode(&mut self, frames: impl IntoIterator<Item = Frame>) -> u32 {
        let mut skipped = 0;
        for frame in frames {
            if framing::encode(self.framing, frame.data(), &mut self.wbuf).is_err() {
                skipped += 1;
                tracing::warn!(
                    len = frame.len(),
                    "frame cannot be framed for this connection; dropped"
                );
            }
        }
        skipped
    }

    /// Writes `wbuf` to the end, waiting for room (handshake replies).
    async fn write_all(&mut self) -> Result<(), CloseReason> {
        while !self.write_buffered()? {
            self.writable().await?;
        }
        Ok(())
    }
}

fn inbound_frame(data: Bytes) -> Frame {
    // TCP has no frame kinds: UTF-8 payloads are text, anything else binary.
    Frame::text_bytes(data.clone()).unwrap_or_else(|_| Frame::binary(data))
}

impl<S: Io> Wire for TcpWire<S> {
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

    fn try_flush(&mut self, outbox: &Outbox) -> Result<Flushed, CloseReason> {
        // Frames count as written once framed into the write buffer: it is
        // bounded, and written out before more is taken.
        let mut f = Flushed::BLOCKED;
        let mut frames = Batch::default();
        loop {
            if !self.write_buffered()? {
                return Ok(f);
            }
            // Take more only once the buffer is out, and only up to a chunk:
            // what is buffered here stays bounded.
            while self.wbuf.len() < WRITE_CHUNK {
                outbox.take(&mut frames);
                if frames.is_empty() {
                    break;
                }
                let taken = frames.len() as u32;
                let skipped = self.encode(&mut frames);
                f.skipped += skipped;
                f.written += taken - skipped;
            }
            if self.wbuf.is_empty() {
                f.done = true;
                return Ok(f);
            }
        }
    }

    async fn writable(&mut self) -> Result<(), CloseReason> {
        self.stream
            .writable()
            .await
            .map_err(|e| CloseReason::Io(e.to_string()))
    }

    fn ping(&mut self) -> Result<(), CloseReason> {
        Ok(())
    }

    fn notify(&mut self, frame: &Frame) {
        // Appended whole after what is buffered, like a ping.
        let _ = framing::encode(self.framing, frame.data(), &mut self.wbuf);
    }

    async fn close(&mut self, _outbox: &Outbox, reason: &CloseReason) {
        if !matches!(reason, CloseReason::Io(_) | CloseReason::Client { .. }) {
            let _ = self.stream.shutdown().await;
        }
    }
}

/// The TCP-ping variant: sends the configured ping frame every heartbeat.
struct PingingWire<S> {
    inner: TcpWire<S>,
    ping: Bytes,
}

impl<S: Io> Wire for PingingWire<S> {
    fn recv(&mut self) -> impl std::future::Future<Output = Incoming> + Send {
        self.inner.recv()
    }
    fn try_flush(&mut self, outbox: &Outbox) -> Result<Flushed, CloseReason> {
        self.inner.try_flush(outbox)
    }
    fn writable(&mut self) -> impl std::future::Future<Output = Result<(), CloseReason>> + Send {
        self.inner.writable()
    }
    fn ping(&mut self) -> Result<(), CloseReason> {
        // Appended whole after what is buffered: frames never interleave.
        let _ = framing::encode(self.inner.framing, &self.ping, &mut self.inner.wbuf);
        Ok(())
    }
    fn notify(&mut self, frame: &Frame) {
        self.inner.notify(frame)
    }
    fn close(
        &mut self,
        outbox: &Outbox,
        reason: &CloseReason,
    ) -> impl std::future::Future<Output = ()> + Send {
        self.inner.close(outbox, reason)
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
    let handshake_timeout = hub.limits().handshake_timeout;
    open(hub, stream, peer, opts, handshake_timeout).await;
}

/// Accepts one TCP connection over TLS: the TLS handshake, then as
/// [`handle`], the whole within the handshake timeout.
#[cfg(feature = "tls")]
pub(crate) async fn handle_tls(
    hub: Hub,
    stream: TcpStream,
    peer: SocketAddr,
    opts: TcpOptions,
    tls: crate::tls::Tls,
) {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let started = tokio::time::Instant::now();
    let Some(stream) = tls.accept(&hub, stream).await else {
        return;
    };
    let left = hub
        .limits()
        .handshake_timeout
        .saturating_sub(started.elapsed());
    open(hub, crate::tls::TlsIo::new(stream), peer, opts, left).await;
}

/// The optional hello, the application's decision within `handshake_timeout`,
/// then the connection's life.
async fn open<S: Io>(
    hub: Hub,
    stream: S,
    peer: SocketAddr,
    opts: TcpOptions,
    handshake_timeout: Duration,
) {
    let limits = hub.limits();
    let mut wire = TcpWire::new(stream, opts.framing, limits.max_message_size);

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
                wire.encode([reply]);
                let _ = tokio::time::timeout(limits.close_timeout, wire.write_all()).await;
            }
            wire.stream.shutdown().await.ok();
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
    let outbox = hub.open(&conn, accept, Transport::Tcp);
    // A task of its own: the long-lived task is exactly the connection's
    // driver, without the handshake's state.
    match limits.tcp_ping.clone() {
        Some(ping) => spawn(&hub, conn, outbox, PingingWire { inner: wire, ping }),
        None => spawn(&hub, conn, outbox, wire),
    }
}

fn spawn<W: Wire + 'static>(hub: &Hub, conn: ConnId, outbox: Arc<Outbox>, wire: W) {
    hub.spawn_conn(conn::run(
        hub.clone(),
        conn,
        outbox,
        wire,
        Transport::Tcp,
        false,
    ));
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;
    use crate::config::SlowConsumer;
    use crate::outbox::Caps;
    use tokio::io::AsyncBufReadExt;

    /// rustls takes plaintext when the socket is full: a flush that counted
    /// that as written would leave the end of a burst in rustls, unsent,
    /// until the next write. (Run with `--features tls`.)
    #[tokio::test]
    async fn a_tls_flush_is_done_only_once_rustls_has_sent_everything() {
        let (io, client) = crate::tls::tests::pair().await;
        let mut wire = TcpWire::new(io, Framing::Line, 1 << 20);
        let outbox = Outbox::new(Caps {
            frames: 1 << 20,
            bytes: usize::MAX,
            policy: SlowConsumer::Close,
            idle_ms: 0,
        });
        let line = |i: usize| format!("{i:05}{}", "x".repeat(4000));
        // The client does not read: the socket fills, then rustls' buffer.
        let mut sent = 0;
        loop {
            outbox.push(&Frame::text(line(sent)));
            sent += 1;
            assert!(sent < 100_000, "the socket never filled");
            if !wire.try_flush(&outbox).unwrap().done {
                break;
            }
            assert!(
                !wire.stream.holds_records(),
                "flush {sent} said done with TLS records unsent"
            );
        }
        let reader = tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(client).lines();
            let mut got = Vec::new();
            while got.len() < sent {
                got.push(lines.next_line().await.unwrap().unwrap());
            }
            got
        });
        loop {
            if wire.try_flush(&outbox).unwrap().done {
                break;
            }
            wire.writable().await.unwrap();
        }
        assert!(!wire.stream.holds_records());
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("every line arrives")
            .unwrap();
        for (i, l) in got.iter().enumerate() {
            assert_eq!(*l, line(i), "line {i} whole and in order");
        }
    }
}
