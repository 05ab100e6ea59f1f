//! WebSocket connections: the HTTP upgrade (shared by the standalone server and
//! the axum integration) and the frame I/O, through tungstenite.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use std::io::IoSlice;
use switchboard_core::{Frame, FrameKind};

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::config::Limits;
use crate::conn::{self, Flushed, Incoming, Wire};
use crate::handler::{Accept, CloseReason, ConnectInfo, Decision, Transport};
use crate::hub::Hub;
use crate::outbox::{Batch, Outbox};
use crate::stats::Counters;
use std::sync::Arc;
use switchboard_core::ConnId;

/// Bytes of the per-connection read buffer. tungstenite allocates it eagerly,
/// so it is kept small: most messages of a push system are small, and larger
/// ones are read in several steps.
const READ_BUFFER: usize = 256;
/// Queued writes are buffered up to this size before a write to the socket,
/// so a batch of frames leaves in one system call.
const WRITE_BUFFER: usize = 64 * 1024;

type Body = axum::body::Body;

pub(crate) fn plain(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Body::from(text.into()));
    *r.status_mut() = status;
    r
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Handles a WebSocket upgrade request: asks the application whether to accept
/// it, answers `101 Switching Protocols`, and runs the connection once the
/// upgrade completes. Mount it in any axum router with
/// [`crate::axum::route`]; the standalone server uses it too.
///
/// The client address is taken from axum's `ConnectInfo<SocketAddr>` request
/// extension when present.
pub async fn upgrade<B>(hub: Hub, mut req: Request<B>) -> Response<Body> {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let admitted = match admit(&hub, &mut req, peer).await {
        Ok(a) => a,
        Err(response) => return response,
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "connection cannot be upgraded",
        );
    };
    let Admitted {
        conn,
        accept,
        accept_key,
    } = admitted;
    let task_hub = hub.clone();
    hub.spawn_conn(async move {
        let hub = task_hub;
        match on_upgrade.await {
            // A plain TCP connection (the standalone server, axum::serve):
            // take the socket back so that writes can bypass tungstenite.
            Ok(upgraded) => match super::http::into_tcp(upgraded) {
                Ok((stream, leftover)) => {
                    let outbox = hub.open(&conn, accept, Transport::WebSocket);
                    run_fast(&hub, conn, outbox, Sock::new(stream), leftover, false);
                }
                // Any other transport (TLS, a custom listener): tungstenite alone.
                // Boxed: the rare path must not size every connection's task.
                Err(upgraded) => {
                    Box::pin(async move {
                        let ws = WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            Some(ws_config(hub.limits())),
                        )
                        .await;
                        let outbox = hub.open(&conn, accept, Transport::WebSocket);
                        let wire = WsWire {
                            ws,
                            pending: VecDeque::new(),
                        };
                        conn::run(hub, conn, outbox, wire, Transport::WebSocket, false).await;
                    })
                    .await;
                }
            },
            Err(error) => {
                Counters::add(&hub.counters().rejected, 1);
                tracing::debug!(%error, "websocket upgrade failed");
            }
        }
    });

    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept_key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// A connection the application accepted, before the `101` goes out.
pub(crate) struct Admitted {
    pub(crate) conn: ConnId,
    pub(crate) accept: Accept,
    /// The `Sec-WebSocket-Accept` value.
    pub(crate) accept_key: String,
}

/// Whether a `Sec-WebSocket-Key` is what RFC 6455 §4.1 asks for: 16 bytes,
/// base64-encoded.
fn is_websocket_key(key: &[u8]) -> bool {
    use base64::Engine as _;
    // 16 bytes encode to 24 characters; checked first so that a long header
    // is never decoded.
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// Checks an upgrade request and asks the application about it; the error is
/// the response to send instead of `101`. Shared by the hyper path and the
/// listener's own (see [`super::http`]).
pub(crate) async fn admit<B>(
    hub: &Hub,
    req: &mut Request<B>,
    peer: Option<SocketAddr>,
) -> Result<Admitted, Response<Body>> {
    if hub.is_closing() {
        return Err(plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down"));
    }
    // RFC 6455 §4.1: the opening handshake is an HTTP/1.1 (or later) request.
    if req.version() < http::Version::HTTP_11 {
        return Err(plain(
            StatusCode::BAD_REQUEST,
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    let headers = req.headers();
    if req.method() != Method::GET
        || !has_token(headers, header::CONNECTION, "upgrade")
        || !has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(plain(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade request",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut r = plain(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(r);
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key"));
    };
    if !is_websocket_key(key.as_bytes()) {
        return Err(plain(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    let accept_key = derive_accept_key(key.as_bytes());

    let info = ConnectInfo {
        conn: hub.next_conn_id(),
        transport: Transport::WebSocket,
        peer,
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or_default().to_owned(),
        headers: std::mem::take(req.headers_mut()),
        hello: None,
    };
    let decision = tokio::time::timeout(
        hub.limits().handshake_timeout,
        hub.handler().on_connect(hub, &info),
    )
    .await;
    match decision {
        Ok(Decision::Accept(accept)) => Ok(Admitted {
            conn: info.conn,
            accept,
            accept_key,
        }),
        Ok(Decision::Reject(r)) => {
            Counters::add(&hub.counters().rejected, 1);
            Err(plain(r.status, r.reason))
        }
        Err(_) => {
            Counters::add(&hub.counters().rejected, 1);
            Err(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "connection handler timed out",
            ))
        }
    }
}

/// tungstenite's settings for a connection under these limits.
fn ws_config(limits: &Limits) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + limits.outbox_bytes + limits.max_message_size)
        .max_message_size(Some(limits.max_message_size))
        .max_frame_size(Some(limits.max_message_size))
}

/// Runs an upgraded plain-TCP connection in a task of its own: the
/// connection's long-lived task is exactly its driver, without the
/// handshake's state. `leftover` is what the client sent after its request;
/// `settled`: the caller waited for the backplane already (see `conn::run`).
fn run_fast(
    hub: &Hub,
    conn: ConnId,
    outbox: Arc<Outbox>,
    sock: Sock,
    leftover: Vec<u8>,
    settled: bool,
) {
    let ws = tokio_tungstenite::tungstenite::WebSocket::from_partially_read(
        sock,
        leftover,
        Role::Server,
        Some(ws_config(hub.limits())),
    );
    let driver = conn::run(
        hub.clone(),
        conn,
        outbox,
        FastWire::new(ws),
        Transport::WebSocket,
        settled,
    );
    hub.spawn_conn(driver);
}

/// The listener's own upgrade: writes the `101` and the connection's first
/// frames (its greeting) in one system call, then runs the connection.
pub(crate) async fn accept_direct(
    hub: &Hub,
    stream: TcpStream,
    admitted: Admitted,
    leftover: Vec<u8>,
) {
    let Admitted {
        conn,
        accept,
        accept_key,
    } = admitted;
    // Registered before the write: from here pushes queue behind the greeting.
    let outbox = hub.open(&conn, accept, Transport::WebSocket);
    // The greeting waits until the cluster can reach the connection (see
    // `conn::run`); so does the `101`, which goes with it. Boxed: rare to wait,
    // and kept out of the handshake task's size.
    Box::pin(hub.settle()).await;
    let mut sock = Sock::new(stream);
    if let Some(rest) = greet(hub, &mut sock, &outbox, &accept_key) {
        // The socket would not take the whole response at once (unheard of
        // for a fresh connection); the driver sends the greeting after it.
        // (A failed write: the driver finds the socket broken.)
        let _ = Box::pin(sock.stream.write_all(&rest)).await;
    }
    run_fast(hub, conn, outbox, sock, leftover, true);
}

/// Writes the `101` and what the outbox holds, in one `writev` when the
/// socket takes it all (the frames it does not take stay queued). Returns
/// the part of the response still to write, if any.
fn greet(hub: &Hub, sock: &mut Sock, outbox: &Outbox, accept_key: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; 160];
    let head = {
        let mut w = &mut buf[..];
        // 97 bytes and a 28-byte key: always fits.
        let _ = io::Write::write_all(
            &mut w,
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: ",
        );
        let _ = io::Write::write_all(&mut w, accept_key.as_bytes());
        let _ = io::Write::write_all(&mut w, b"\r\n\r\n");
        let left = w.len();
        &buf[..160 - left]
    };
    let mut batch = Batch::default();
    outbox.take(&mut batch);
    match write_frames(&sock.stream, head, batch.iter(), 0) {
        Ok(w) if w.head_left == 0 => {
            batch.consume(w.done);
            Counters::add(&hub.counters().written, w.done as u64);
            sock.data_partial = w.rest > 0;
            outbox.put_back(batch, w.rest);
            None
        }
        Ok(w) => {
            outbox.put_back(batch, 0);
            Some(head[head.len() - w.head_left..].to_vec())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            outbox.put_back(batch, 0);
            Some(head.to_vec())
        }
        Err(error) => {
            // The driver finds the socket broken and ends the connection the
            // usual way (the application hears of it).
            tracing::debug!(%error, "websocket handshake write failed");
            outbox.put_back(batch, 0);
            None
        }
    }
}

struct WsWire<S> {
    ws: WebSocketStream<S>,
    /// Messages taken from the outbox and not yet accepted by tungstenite.
    pending: VecDeque<Message>,
}

fn map_message(m: Option<Result<Message, WsError>>) -> Incoming {
    match m {
        None => Incoming::Closed(CloseReason::Client {
            code: None,
            reason: String::new(),
        }),
        Some(Ok(Message::Text(t))) => match Frame::text_bytes(Bytes::from(t)) {
            Ok(f) => Incoming::Frame(f),
            Err(_) => Incoming::Closed(CloseReason::InvalidUtf8),
        },
        Some(Ok(Message::Binary(b))) => Incoming::Frame(Frame::binary(b)),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Incoming::Alive,
        Some(Ok(Message::Close(cf))) => Incoming::Closed(CloseReason::Client {
            code: cf.as_ref().map(|c| c.code.into()),
            reason: cf.map(|c| c.reason.to_string()).unwrap_or_default(),
        }),
        Some(Err(e)) => Incoming::Closed(io_reason(e)),
    }
}

/// Frames written per `writev` (each a header and a payload slice).
pub(crate) const WRITEV_FRAMES: usize = crate::outbox::BATCH;

/// Writes an unmasked server frame header for `frame`; returns its length.
fn ws_header(frame: &Frame, out: &mut [u8; 10]) -> usize {
    out[0] = match frame.kind() {
        FrameKind::Text => 0x81,
        FrameKind::Binary => 0x82,
    };
    let len = frame.len();
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// What one [`write_frames`] took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    /// Bytes of the head not written yet (nothing of the frames went).
    pub(crate) head_left: usize,
    /// Frames written whole.
    pub(crate) done: usize,
    /// Bytes of the next frame written.
    pub(crate) rest: usize,
}

/// One `writev` of `head` (raw bytes, e.g. an HTTP response; may be empty)
/// and up to [`WRITEV_FRAMES`] of `frames` as WebSocket data frames (a small
/// header and the shared payload each, no copy), skipping `offset` bytes
/// already written of the first frame (`offset` only with an empty head).
pub(crate) fn write_frames<'a>(
    stream: &TcpStream,
    head: &[u8],
    frames: impl Iterator<Item = &'a Frame> + Clone,
    offset: usize,
) -> io::Result<Written> {
    debug_assert!(head.is_empty() || offset == 0);
    let mut headers = [[0u8; 10]; WRITEV_FRAMES];
    let mut lens = [0usize; WRITEV_FRAMES];
    let mut n = 0;
    for (i, frame) in frames.clone().take(WRITEV_FRAMES).enumerate() {
        lens[i] = ws_header(frame, &mut headers[i]);
        n = i + 1;
    }
    let mut slices = [IoSlice::new(&[]); WRITEV_FRAMES * 2 + 1];
    slices[0] = IoSlice::new(head);
    for (i, frame) in frames.take(n).enumerate() {
        slices[2 * i + 1] = IoSlice::new(&headers[i][..lens[i]]);
        slices[2 * i + 2] = IoSlice::new(frame.data());
        lens[i] += frame.len();
    }
    let mut rest: &mut [IoSlice<'_>] = &mut slices[..2 * n + 1];
    IoSlice::advance_slices(&mut rest, offset);
    let written = stream.try_write_vectored(rest)?;
    if written == 0 {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "connection closed while writing",
        ));
    }
    if written < head.len() {
        return Ok(Written {
            head_left: head.len() - written,
            done: 0,
            rest: 0,
        });
    }
    let mut progress = offset + written - head.len();
    let mut done = 0;
    for &len in &lens[..n] {
        if progress < len {
            break;
        }
        progress -= len;
        done += 1;
    }
    Ok(Written {
        head_left: 0,
        done,
        rest: progress,
    })
}

/// tungstenite's view of the socket: non-blocking reads and writes, with
/// the gate that keeps its control frames from interleaving with a data frame
/// partly written.
struct Sock {
    stream: TcpStream,
    /// A data frame is partly on the socket: control frames must wait.
    data_partial: bool,
    /// A control frame is partly on the socket: data frames must wait.
    control_partial: bool,
}

impl Sock {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            data_partial: false,
            control_partial: false,
        }
    }
}

impl io::Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        super::read_once(&self.stream, buf.len(), |s| {
            let mut s: &socket2::Socket = s;
            io::Read::read(&mut s, buf)
        })
    }
}

impl io::Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.data_partial {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.stream.try_write(buf)?;
        // tungstenite hands over all it holds each time: what is left is the
        // tail of a frame already begun.
        self.control_partial = n < buf.len();
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

type SyncWs = tokio_tungstenite::tungstenite::WebSocket<Sock>;

/// A WebSocket over a plain TCP socket, the common case. tungstenite reads
/// (frames, control frames, UTF-8, limits) and writes control frames; data
/// frames are written by [`write_frames`]: a whole batch per `writev`, no
/// copy. tungstenite is used without its async wrapper: readiness comes from
/// the socket itself, so nothing is allocated per connection for wakers.
struct FastWire {
    ws: SyncWs,
    /// tungstenite may hold complete frames that the socket will not announce.
    buffered: bool,
    /// tungstenite holds a pong to send.
    pong: bool,
}

impl FastWire {
    fn new(ws: SyncWs) -> Self {
        Self {
            ws,
            buffered: true,
            pong: false,
        }
    }

    fn socket(&self) -> &TcpStream {
        &self.ws.get_ref().stream
    }

    /// Writes what tungstenite holds. `Ok(false)` when the socket is full.
    fn flush_control(&mut self) -> Result<bool, CloseReason> {
        match self.ws.flush() {
            Ok(()) => {
                self.pong = false;
                Ok(true)
            }
            Err(e) if would_block(&e) => Ok(false),
            Err(e) => Err(io_reason(e)),
        }
    }

    /// Writes what `outbox` holds as far as the socket takes it, a batch per
    /// `writev`, counting the frames written whole in `written`; what it does
    /// not take goes back to the outbox. `Ok(false)` when the socket is full.
    fn write_queued(&mut self, outbox: &Outbox, written: &mut u32) -> Result<bool, CloseReason> {
        let mut batch = Batch::default();
        loop {
            let mut offset = outbox.take(&mut batch);
            if batch.is_empty() {
                return Ok(true);
            }
            while !batch.is_empty() {
                match write_frames(self.socket(), &[], batch.iter(), offset) {
                    Ok(w) => {
                        batch.consume(w.done);
                        *written += w.done as u32;
                        offset = w.rest;
                        self.ws.get_mut().data_partial = w.rest > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        outbox.put_back(batch, offset);
                        return Ok(false);
                    }
                    Err(e) => return Err(CloseReason::Io(e.to_string())),
                }
            }
        }
    }
}

/// Waits until the socket is readable.
///
/// Through the socket's single reader slot (`poll_read_ready`), not
/// `readable()`: hyper left its handshake task's waker in that slot, and only
/// a newer registration there lets that finished task (about a kilobyte) be
/// freed rather than kept for the life of the connection. The slot also costs
/// the connection's task no waiter state.
fn read_ready(socket: &TcpStream) -> impl Future<Output = io::Result<()>> + '_ {
    poll_fn(move |cx| socket.poll_read_ready(cx))
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl Wire for FastWire {
    async fn recv(&mut self) -> Incoming {
        loop {
            if self.buffered {
                match self.ws.read() {
                    Ok(m) => {
                        // tungstenite queued the reply; the task sends it.
                        self.pong |= matches!(m, Message::Ping(_));
                        return map_message(Some(Ok(m)));
                    }
                    Err(e) if would_block(&e) => self.buffered = false,
                    Err(e) => return map_message(Some(Err(e))),
                }
            }
            if let Err(e) = read_ready(self.socket()).await {
                return Incoming::Closed(CloseReason::Io(e.to_string()));
            }
            self.buffered = true;
        }
    }

    fn try_flush(&mut self, outbox: &Outbox) -> Result<Flushed, CloseReason> {
        // A frame begun goes on first, data or control: never two frames
        // interleaved.
        if self.ws.get_ref().control_partial && !self.flush_control()? {
            return Ok(Flushed::BLOCKED);
        }
        let mut f = Flushed::BLOCKED;
        // Control frames wait while the socket is full of data.
        f.done = self.write_queued(outbox, &mut f.written)? && self.flush_control()?;
        Ok(f)
    }

    async fn writable(&mut self) -> Result<(), CloseReason> {
        let socket = self.socket();
        poll_fn(|cx| socket.poll_write_ready(cx))
            .await
            .map_err(|e| CloseReason::Io(e.to_string()))
    }

    fn ping(&mut self) -> Result<(), CloseReason> {
        match self.ws.write(Message::Ping(Bytes::new())) {
            Ok(()) => Ok(()),
            Err(e) if would_block(&e) => Ok(()),
            Err(e) => Err(io_reason(e)),
        }
    }

    fn wants_flush(&self) -> bool {
        self.pong
    }

    async fn close(&mut self, outbox: &Outbox, reason: &CloseReason) {
        if matches!(reason, CloseReason::Io(_)) {
            return;
        }
        if !matches!(reason, CloseReason::Client { .. }) {
            // (A client's close frame was answered by tungstenite already;
            // the flush below sends the answer.)
            let frame = CloseFrame {
                code: reason.ws_code().into(),
                reason: Utf8Bytes::from(reason.to_string()),
            };
            if let Err(e) = self.ws.close(Some(frame))
                && !would_block(&e)
            {
                return;
            }
        }
        // The rest of a frame begun, then the close frame.
        loop {
            match self.try_flush(outbox) {
                Ok(f) if f.done => break,
                Ok(_) => {
                    if self.writable().await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        if matches!(reason, CloseReason::Client { .. }) {
            return;
        }
        // Wait for the client's close frame (the caller bounds this), so the
        // client sees a clean close rather than a reset.
        loop {
            match self.ws.read() {
                Ok(_) => {}
                Err(e) if would_block(&e) => {
                    if read_ready(self.socket()).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }
}

async fn close_ws<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    reason: &CloseReason,
) {
    match reason {
        // tungstenite queued the reply to the client's close frame: send it.
        CloseReason::Client { .. } => {
            let _ = ws.flush().await;
        }
        CloseReason::Io(_) => {}
        _ => {
            let frame = CloseFrame {
                code: reason.ws_code().into(),
                reason: Utf8Bytes::from(reason.to_string()),
            };
            if ws.close(Some(frame)).await.is_ok() {
                // Wait for the client's close frame (the caller bounds this),
                // so the client sees a clean close rather than a reset.
                while let Some(Ok(_)) = ws.next().await {}
            }
        }
    }
}

fn io_reason(e: WsError) -> CloseReason {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => CloseReason::Client {
            code: None,
            reason: String::new(),
        },
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::TooBig,
        WsError::Capacity(e) => CloseReason::Protocol(e.to_string()),
        WsError::Utf8(_) => CloseReason::InvalidUtf8,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::Client {
            code: None,
            reason: String::new(),
        },
        WsError::Protocol(p) => CloseReason::Protocol(p.to_string()),
        WsError::Io(e) => CloseReason::Io(e.to_string()),
        other => CloseReason::Protocol(other.to_string()),
    }
}

fn to_message(frame: Frame) -> Message {
    match frame.kind() {
        FrameKind::Text => {
            #[allow(unsafe_code)]
            // SAFETY: a text `Frame` can only be built from data checked to be
            // UTF-8 (see `Frame::text`, `Frame::text_bytes`), and its payload is
            // immutable. Checking again here would cost a pass over the payload
            // per recipient.
            let text = unsafe { Utf8Bytes::from_bytes_unchecked(frame.into_data()) };
            Message::Text(text)
        }
        FrameKind::Binary => Message::Binary(frame.into_data()),
    }
}

/// Any other byte stream (TLS, a custom listener): tungstenite's async
/// wrapper alone, every frame through it.
impl<S> Wire for WsWire<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn recv(&mut self) -> Incoming {
        map_message(self.ws.next().await)
    }

    fn try_flush(&mut self, outbox: &Outbox) -> Result<Flushed, CloseReason> {
        if self.pending.is_empty() {
            let mut frames = Batch::default();
            outbox.take(&mut frames);
            self.pending.extend(frames.map(to_message));
        }
        // A frame counts as written once tungstenite takes it: it writes
        // what it took before it takes more.
        let mut f = Flushed::BLOCKED;
        while let Some(m) = self.pending.front() {
            // `feed` takes the message only once tungstenite has room for it.
            match self.ws.feed(m.clone()).now_or_never() {
                Some(Ok(())) => {
                    if let Some(Message::Text(_) | Message::Binary(_)) = self.pending.pop_front() {
                        f.written += 1;
                    }
                }
                Some(Err(e)) => return Err(io_reason(e)),
                None => return Ok(f),
            }
        }
        match self.ws.flush().now_or_never() {
            Some(Ok(())) => {
                f.done = true;
                Ok(f)
            }
            Some(Err(e)) => Err(io_reason(e)),
            None => Ok(f),
        }
    }

    async fn writable(&mut self) -> Result<(), CloseReason> {
        // Driving tungstenite's own buffer out is what makes room.
        self.ws.flush().await.map_err(io_reason)
    }

    fn ping(&mut self) -> Result<(), CloseReason> {
        self.pending.push_back(Message::Ping(Bytes::new()));
        Ok(())
    }

    async fn close(&mut self, _outbox: &Outbox, reason: &CloseReason) {
        close_ws(&mut self.ws, reason).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumer;
    use crate::outbox::Caps;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (server, client)
    }

    /// Reads `n` unmasked server frames: (opcode byte, payload).
    async fn read_frames(client: &mut TcpStream, n: usize) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while out.len() < n {
            let mut h = [0u8; 2];
            client.read_exact(&mut h).await.unwrap();
            let len = match h[1] {
                126 => {
                    let mut l = [0u8; 2];
                    client.read_exact(&mut l).await.unwrap();
                    usize::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    client.read_exact(&mut l).await.unwrap();
                    u64::from_be_bytes(l) as usize
                }
                l => usize::from(l),
            };
            assert!(
                len <= 1 << 20,
                "frame {} has no sane length: a cut frame",
                out.len()
            );
            let mut data = vec![0u8; len];
            client.read_exact(&mut data).await.unwrap();
            out.push((h[0], data));
        }
        out
    }

    #[tokio::test]
    async fn a_pong_never_cuts_into_a_data_frame() {
        let (server, mut client) = pair().await;
        let mut wire = FastWire::new(SyncWs::from_raw_socket(
            Sock::new(server),
            Role::Server,
            None,
        ));
        let outbox = Outbox::new(Caps {
            frames: 1 << 20,
            bytes: usize::MAX,
            policy: SlowConsumer::Close,
            idle_ms: 0,
        });
        // Odd-sized frames, pushed until the socket (unread) leaves one of
        // them half written.
        let payload = |i: usize| format!("{i:07}").repeat(1143);
        let mut sent = 0;
        while !wire.ws.get_ref().data_partial {
            outbox.push(&Frame::text(payload(sent)));
            sent += 1;
            assert!(sent < 100_000, "the socket never filled");
            wire.try_flush(&outbox).unwrap();
        }
        // The client pings (masked, empty): tungstenite reads it and answers
        // at once if it can; the gate must hold the pong back.
        client.write_all(&[0x89, 0x80, 1, 2, 3, 4]).await.unwrap();
        let incoming = tokio::time::timeout(std::time::Duration::from_secs(5), wire.recv())
            .await
            .expect("the ping is read");
        assert!(matches!(incoming, Incoming::Alive));
        assert!(wire.wants_flush());
        // The client starts reading, so the socket has room again while the
        // frame is still half written; reading again makes tungstenite try
        // to send its pong first.
        let reader = tokio::spawn(async move { read_frames(&mut client, sent + 1).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let more = tokio::time::timeout(std::time::Duration::from_millis(50), wire.recv()).await;
        assert!(more.is_err(), "nothing more to read");
        loop {
            if wire.try_flush(&outbox).unwrap().done {
                break;
            }
            wire.writable().await.unwrap();
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("every frame arrives")
            .unwrap();
        for (i, (op, data)) in got[..sent].iter().enumerate() {
            assert_eq!(*op, 0x81, "frame {i} is a text frame");
            assert_eq!(data, payload(i).as_bytes(), "frame {i} whole and in order");
        }
        assert_eq!(got[sent], (0x8A, Vec::new()), "then the pong");
    }

    /// An idle connection is mostly its task: tokio stores the future in a
    /// cell of header (32) + scheduler and id (16) + tracker (8) + future +
    /// trailer (48) bytes, padded to a multiple of 128. Up to 536 bytes of
    /// future the cell is 640; one byte more makes it 768 for every
    /// connection.
    #[tokio::test]
    async fn the_connection_task_fits_a_640_byte_cell() {
        let (server, _client) = pair().await;
        let wire = FastWire::new(SyncWs::from_raw_socket(
            Sock::new(server),
            Role::Server,
            None,
        ));
        let hub = Hub::builder().start().await.unwrap();
        let conn = hub.next_conn_id();
        let outbox = hub.open(
            &conn,
            crate::handler::Accept::default(),
            Transport::WebSocket,
        );
        let task = conn::run(hub.clone(), conn, outbox, wire, Transport::WebSocket, false);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 536, "the connection's future grew to {size} bytes");
    }
}
