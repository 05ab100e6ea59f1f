//! The standalone server: accept loops for WebSocket (HTTP) and TCP listeners,
//! run until a shutdown future resolves, then a graceful stop.
//!
//! It takes bound listeners rather than addresses, so the caller decides how to
//! bind (and can learn the port of `127.0.0.1:0`), and it takes the shutdown
//! signal as a future, so tests and embedders stop it without signals.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::hub::Hub;
use crate::transport::{TcpOptions, tcp};

/// Listeners bound to a hub. See the module docs.
#[must_use]
pub struct Server {
    hub: Hub,
    http: Vec<(TcpListener, Router)>,
    tcp: Vec<(TcpListener, TcpOptions)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("hub", &self.hub)
            .field("http", &self.http.len())
            .field("tcp", &self.tcp.len())
            .finish()
    }
}

impl Server {
    /// A server with no listeners yet.
    pub fn new(hub: Hub) -> Self {
        Self {
            hub,
            http: Vec::new(),
            tcp: Vec::new(),
        }
    }

    /// Serves WebSocket connections at `path` on this listener.
    pub fn websocket(self, listener: TcpListener, path: &str) -> Self {
        let router = crate::axum::router(self.hub.clone(), path);
        self.http(listener, router)
    }

    /// Serves an axum router on this listener (mount [`crate::axum::route`] in it
    /// for WebSocket connections). Connections get a `ConnectInfo<SocketAddr>`.
    pub fn http(mut self, listener: TcpListener, router: Router) -> Self {
        self.http.push((listener, router));
        self
    }

    /// Serves raw TCP connections on this listener.
    pub fn tcp(mut self, listener: TcpListener, options: TcpOptions) -> Self {
        self.tcp.push((listener, options));
        self
    }

    /// Serves until `shutdown` resolves, then stops accepting, closes every
    /// connection with "going away" and waits for them (bounded by the hub's
    /// shutdown timeout).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let loops = TaskTracker::new();
        for (listener, router) in self.http {
            loops.spawn(accept_http(
                self.hub.clone(),
                listener,
                router,
                stop.clone(),
            ));
        }
        for (listener, opts) in self.tcp {
            loops.spawn(accept_tcp(self.hub.clone(), listener, opts, stop.clone()));
        }
        loops.close();
        let closing = self.hub.closing();
        tokio::select! {
            () = shutdown => {}
            () = closing.cancelled() => {}
        }
        tracing::info!(node = %self.hub.node_id(), "shutting down");
        stop.cancel();
        loops.wait().await;
        self.hub.shutdown().await;
    }
}

/// The next accepted connection, or `None` once `stop` is cancelled. After
/// an accept error (out of file descriptors, most often) it backs off rather
/// than spin. For servers of other protocols beside a hub (a gateway's inner
/// port, a register).
pub async fn next_conn(
    listener: &TcpListener,
    stop: &CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(accepted) => return Some(accepted),
                Err(e) => accept_failed(e).await,
            },
        }
    }
}

/// Backs off after an accept error (out of file descriptors, most often), so
/// the loop does not spin while nothing can be accepted.
async fn accept_failed(error: io::Error) {
    tracing::warn!(%error, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn accept_http(hub: Hub, listener: TcpListener, router: Router, stop: CancellationToken) {
    while let Some((stream, peer)) = next_conn(&listener, &stop).await {
        let _ = stream.set_nodelay(true);
        let svc = router
            .clone()
            .map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo::<SocketAddr>(peer));
                req
            });
        let handshake = hub.limits().handshake_timeout;
        let closing = hub.closing();
        hub.spawn_conn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .with_upgrades();
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
        });
    }
}

async fn accept_tcp(hub: Hub, listener: TcpListener, opts: TcpOptions, stop: CancellationToken) {
    while let Some((stream, peer)) = next_conn(&listener, &stop).await {
        hub.spawn_conn(tcp::handle(hub.clone(), stream, peer, opts));
    }
}
