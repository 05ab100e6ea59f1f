//! WebSocket connections: the HTTP upgrade (shared by the standalone server and
//! the axum integration) and the frame I/O, through tungstenite.

use std::collections::VecDeque;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use switchboard_core::{Frame, FrameKind};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::conn::{self, Incoming, Wire};
use crate::handler::{CloseReason, ConnectInfo, Decision, Transport};
use crate::hub::Hub;
use crate::stats::Counters;

/// Bytes of the per-connection read buffer. tungstenite allocates it eagerly,
/// so it is kept small: most messages of a push system are small, and larger
/// ones are read in several steps.
const READ_BUFFER: usize = 4096;
/// Queued writes are buffered up to this size before a write to the socket,
/// so a batch of frames leaves in one system call.
const WRITE_BUFFER: usize = 64 * 1024;

type Body = axum::body::Body;

fn plain(status: StatusCode, text: impl Into<String>) -> Response<Body> {
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
    if hub.is_closing() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    let headers = req.headers();
    if req.method() != Method::GET
        || !has_token(headers, header::CONNECTION, "upgrade")
        || !has_token(headers, header::UPGRADE, "websocket")
    {
        return plain(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade request",
        );
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
        return r;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let accept_key = derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "connection cannot be upgraded",
        );
    };

    let info = ConnectInfo {
        conn: hub.next_conn_id(),
        transport: Transport::WebSocket,
        peer: req
            .extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0),
        path: req.uri().path().to_owned(),
        query: req.uri().query().unwrap_or_default().to_owned(),
        headers: std::mem::take(req.headers_mut()),
        hello: None,
    };
    let limits = hub.limits();
    let decision = tokio::time::timeout(
        limits.handshake_timeout,
        hub.handler().on_connect(&hub, &info),
    )
    .await;
    let accept = match decision {
        Ok(Decision::Accept(a)) => a,
        Ok(Decision::Reject(r)) => {
            Counters::add(&hub.counters().rejected, 1);
            return plain(r.status, r.reason);
        }
        Err(_) => {
            Counters::add(&hub.counters().rejected, 1);
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "connection handler timed out",
            );
        }
    };

    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + limits.outbox_bytes + limits.max_message_size)
        .max_message_size(Some(limits.max_message_size))
        .max_frame_size(Some(limits.max_message_size));
    let conn = info.conn;
    let task_hub = hub.clone();
    hub.spawn_conn(async move {
        let hub = task_hub;
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                let outbox = hub.open(&conn, accept);
                conn::run(hub, conn, outbox, WsWire { ws }, Transport::WebSocket).await;
            }
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

struct WsWire<S> {
    ws: WebSocketStream<S>,
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

impl<S> Wire for WsWire<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn recv(&mut self) -> Incoming {
        match self.ws.next().await {
            None => Incoming::Closed(CloseReason::Client {
                code: None,
                reason: String::new(),
            }),
            Some(Ok(Message::Text(t))) => {
                // tungstenite validated the text already; the check in
                // `text_bytes` cannot fail here.
                match Frame::text_bytes(Bytes::from(t)) {
                    Ok(f) => Incoming::Frame(f),
                    Err(_) => Incoming::Closed(CloseReason::InvalidUtf8),
                }
            }
            Some(Ok(Message::Binary(b))) => Incoming::Frame(Frame::binary(b)),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Incoming::Alive,
            Some(Ok(Message::Close(cf))) => Incoming::Closed(CloseReason::Client {
                code: cf.as_ref().map(|c| c.code.into()),
                reason: cf.map(|c| c.reason.to_string()).unwrap_or_default(),
            }),
            Some(Err(e)) => Incoming::Closed(io_reason(e)),
        }
    }

    async fn send_batch(&mut self, batch: &mut VecDeque<Frame>) -> Result<u32, CloseReason> {
        for frame in batch.drain(..) {
            self.ws.feed(to_message(frame)).await.map_err(io_reason)?;
        }
        self.ws.flush().await.map_err(io_reason)?;
        Ok(0)
    }

    async fn ping(&mut self) -> Result<(), CloseReason> {
        self.ws
            .send(Message::Ping(Bytes::new()))
            .await
            .map_err(io_reason)
    }

    async fn close(&mut self, reason: &CloseReason) {
        match reason {
            // tungstenite queued the reply to the client's close frame: send it.
            CloseReason::Client { .. } => {
                let _ = self.ws.flush().await;
            }
            CloseReason::Io(_) => {}
            _ => {
                let frame = CloseFrame {
                    code: reason.ws_code().into(),
                    reason: Utf8Bytes::from(reason.to_string()),
                };
                if self.ws.close(Some(frame)).await.is_ok() {
                    // Wait for the client's close frame (the caller bounds this),
                    // so the client sees a clean close rather than a reset.
                    while let Some(Ok(_)) = self.ws.next().await {}
                }
            }
        }
    }
}
