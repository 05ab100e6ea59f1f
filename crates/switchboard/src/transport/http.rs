//! The WebSocket listener's own HTTP/1.1 front.
//!
//! A listener that serves WebSocket connections at a known path reads each
//! connection's request head itself. An upgrade at that path is answered here:
//! the `101` and the connection's greeting leave in one `writev`, and no HTTP
//! connection state (hyper's buffers, its task, a router call) is built for
//! a connection that will never speak HTTP again. Anything else (another path,
//! a malformed or unusual request) goes to hyper and the router, with the bytes
//! already read put back in front of the socket, so those requests see no
//! difference.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use bytes::{Buf, Bytes};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tower::ServiceExt;

use super::ws;
use crate::hub::Hub;

/// The longest request head read here; longer ones are refused with 431.
const MAX_HEAD: usize = 16 * 1024;
/// Headers a request may have, as hyper allows; more are refused with 431.
const MAX_HEADERS: usize = 100;

/// Serves one accepted connection of an HTTP listener. With `ws_path`, an
/// upgrade request at that path is handled directly (see the module docs).
pub(crate) async fn serve(
    hub: Hub,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    ws_path: Option<std::sync::Arc<str>>,
) {
    // hyper's connection state is kilobytes: boxed, so that it is not moved
    // into (and sized into) every connection's handshake task.
    let Some(path) = ws_path else {
        return Box::pin(serve_hyper(hub, TokioIo::new(stream), peer, router)).await;
    };
    let timeout = hub.limits().handshake_timeout;
    let closing = hub.closing();
    let read = tokio::select! {
        read = tokio::time::timeout(timeout, read_head(&stream, &path)) => read,
        // A client that has not sent its request yet does not hold up a
        // shutdown.
        () = closing.cancelled() => return,
    };
    let (buf, head) = match read {
        Ok(Ok(read)) => read,
        // Closed, failed or too slow before a whole head: nothing to answer.
        Ok(Err(_)) | Err(_) => return,
    };
    match head {
        Head::TooLarge => {
            let r = ws::plain(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large",
            );
            Box::pin(respond(stream, r)).await;
        }
        Head::Upgrade(mut req, len) => match ws::admit(&hub, &mut req, Some(peer)).await {
            Ok(admitted) => {
                ws::accept_direct(&hub, stream, admitted, buf[len..].to_vec()).await;
            }
            Err(response) => Box::pin(respond(stream, response)).await,
        },
        Head::Other => {
            let io = Prefixed {
                prefix: Bytes::from(buf),
                stream,
            };
            Box::pin(serve_hyper(hub, TokioIo::new(io), peer, router)).await;
        }
    }
}

/// Serves one accepted connection of an HTTP listener over TLS: the
/// handshake (within the handshake timeout), then hyper and the router, where
/// the WebSocket path is mounted too. Upgraded connections run on
/// tungstenite's stream (see [`ws::upgrade`]): the direct front and its
/// one-`writev` greeting are for plain sockets.
#[cfg(feature = "tls")]
pub(crate) async fn serve_tls(
    hub: Hub,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    tls: crate::tls::Tls,
) {
    let Some(stream) = tls.accept(&hub, stream).await else {
        return;
    };
    Box::pin(serve_hyper(hub, TokioIo::new(stream), peer, router)).await;
}

/// What [`read_head`] found.
// Made once per connection and taken apart at once: boxing the request would
// only add an allocation to every connection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Head {
    /// An HTTP/1.1 `GET` of the WebSocket path, answered here; its head is
    /// this many bytes (what follows is the client's first frames).
    Upgrade(Request<()>, usize),
    /// Anything else, complete or malformed: hyper's to answer.
    Other,
    TooLarge,
}

/// Reads until the buffer holds a whole request head (by httparse's
/// reckoning, which also ends a malformed one), or too much of one.
async fn read_head(stream: &TcpStream, ws_path: &str) -> io::Result<(Vec<u8>, Head)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        stream.readable().await?;
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        if let Some(head) = check(&buf, ws_path) {
            return Ok((buf, head));
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len());
        }
    }
}

/// What `buf` holds so far; `None` to read on.
fn check(buf: &[u8], ws_path: &str) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            Some(upgrade_request(&req, ws_path).map_or(Head::Other, |r| Head::Upgrade(r, len)))
        }
        Err(httparse::Error::TooManyHeaders) => Some(Head::TooLarge),
        // hyper answers other malformed requests.
        Err(_) => Some(Head::Other),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Some(Head::TooLarge),
        Ok(httparse::Status::Partial) => None,
    }
}

/// The request, if it is an HTTP/1.1 `GET` of `ws_path` this front answers;
/// `None` hands the connection to hyper.
fn upgrade_request(req: &httparse::Request<'_, '_>, ws_path: &str) -> Option<Request<()>> {
    let target = req.path?;
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if req.method != Some("GET") || req.version != Some(1) || path != ws_path {
        return None;
    }
    let mut out = Request::new(());
    *out.method_mut() = Method::GET;
    *out.version_mut() = Version::HTTP_11;
    *out.uri_mut() = target.parse().ok()?;
    let map = out.headers_mut();
    map.reserve(req.headers.len());
    for h in req.headers.iter() {
        map.append(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    Some(out)
}

/// Writes a refusal as an HTTP/1.1 response and closes the connection.
async fn respond(mut stream: TcpStream, response: Response<axum::body::Body>) {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_u16(),
            parts.status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    let write = async {
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        // Closing with unread input makes the kernel reset the connection,
        // which can destroy the answer before the client reads it: read on
        // (a little, briefly) until the client closes too. A small buffer: a
        // flood of refused clients holds one of these each for a moment.
        let mut drained = 0;
        let mut sink = [0u8; 512];
        while drained < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

/// Serves HTTP on `io` with hyper and `router` (upgrades included), until
/// the connection ends or the hub begins shutting down.
async fn serve_hyper<I>(hub: Hub, io: TokioIo<I>, peer: SocketAddr, router: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = router.map_request(move |mut req: Request<Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
        req
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(hub.limits().handshake_timeout)
        .serve_connection(io, TowerToHyperService::new(svc))
        .with_upgrades();
    let closing = hub.closing();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(error) = r {
                tracing::debug!(%error, %peer, "http connection ended with an error");
            }
        }
        () = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

/// A socket with bytes already read from it put back in front.
pub(crate) struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The plain TCP socket under a hyper upgrade, with what the client sent
/// after its request; the upgrade back when it is something else (TLS, a
/// custom listener).
pub(crate) fn into_tcp(upgraded: Upgraded) -> Result<(TcpStream, Vec<u8>), Upgraded> {
    // The leftover is copied (it is normally empty) so that hyper's whole
    // read buffer goes now, not when the connection ends.
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Ok((parts.io.into_inner(), parts.read_buf.to_vec())),
        Err(upgraded) => upgraded,
    };
    let parts = upgraded.downcast::<TokioIo<Prefixed>>()?;
    let Prefixed { prefix, stream } = parts.io.into_inner();
    // hyper's buffer was read from the socket before what is left of the
    // prefix would have been.
    let mut leftover = parts.read_buf.to_vec();
    leftover.extend_from_slice(&prefix);
    Ok((stream, leftover))
}
