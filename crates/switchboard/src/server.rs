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

use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Hub;
use crate::transport::{TcpOptions, http, tcp};

/// Listeners bound to a hub. See the module docs.
#[must_use]
pub struct Server {
    hub: Hub,
    /// Listeners, their routers, and the path of WebSocket connections the
    /// listener answers itself (see [`crate::transport::http`]).
    http: Vec<(TcpListener, Router, Option<Arc<str>>)>,
    tcp: Vec<(TcpListener, TcpOptions)>,
    /// TLS on every listener.
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::Tls>,
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
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Speaks TLS on every listener of this server: `wss://` and `https://`
    /// on the WebSocket and HTTP ones, TLS on the TCP ones. The handshake
    /// counts in the hub's handshake timeout; a failed one counts as a
    /// rejected connection.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Serves WebSocket connections at `path` on this listener.
    pub fn websocket(self, listener: TcpListener, path: &str) -> Self {
        self.websocket_with(listener, path, Router::new())
    }

    /// Serves WebSocket connections at `path` on this listener, and every
    /// other request with `router`. Upgrades at `path` skip the HTTP stack:
    /// the listener answers them itself, which makes a connection cheaper to
    /// open than a route mounted with [`Server::http`].
    pub fn websocket_with(mut self, listener: TcpListener, path: &str, router: Router) -> Self {
        let router = router.route(path, crate::axum::route(self.hub.clone()));
        self.http.push((listener, router, Some(Arc::from(path))));
        self
    }

    /// Serves an axum router on this listener (mount [`crate::axum::route`] in it
    /// for WebSocket connections). Connections get a `ConnectInfo<SocketAddr>`.
    pub fn http(mut self, listener: TcpListener, router: Router) -> Self {
        self.http.push((listener, router, None));
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
        #[cfg(feature = "tls")]
        let tls = self.tls;
        #[cfg(not(feature = "tls"))]
        let tls = None::<NoTls>;
        for (listener, router, ws_path) in self.http {
            loops.spawn(accept_http(
                self.hub.clone(),
                listener,
                router,
                ws_path,
                tls.clone(),
                stop.clone(),
            ));
        }
        for (listener, opts) in self.tcp {
            loops.spawn(accept_tcp(
                self.hub.clone(),
                listener,
                opts,
                tls.clone(),
                stop.clone(),
            ));
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

/// What a listener speaks TLS with; nothing without the `tls` feature.
#[cfg(feature = "tls")]
type ListenerTls = crate::tls::Tls;
#[cfg(not(feature = "tls"))]
type ListenerTls = NoTls;

/// Stands for TLS settings in a build without TLS: never made.
#[cfg(not(feature = "tls"))]
#[derive(Clone)]
enum NoTls {}

#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
async fn accept_http(
    hub: Hub,
    listener: TcpListener,
    router: Router,
    ws_path: Option<Arc<str>>,
    tls: Option<ListenerTls>,
    stop: CancellationToken,
) {
    // Linux gives accepted sockets the listener's TCP_NODELAY: one system
    // call per listener instead of one per connection.
    let inherited = cfg!(target_os = "linux")
        && socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok();
    while let Some((stream, peer)) = next_conn(&listener, &stop).await {
        if !inherited {
            let _ = stream.set_nodelay(true);
        }
        #[cfg(feature = "tls")]
        if let Some(tls) = &tls {
            hub.spawn_conn(http::serve_tls(
                hub.clone(),
                stream,
                peer,
                router.clone(),
                tls.clone(),
            ));
            continue;
        }
        hub.spawn_conn(http::serve(
            hub.clone(),
            stream,
            peer,
            router.clone(),
            ws_path.clone(),
        ));
    }
}

#[cfg_attr(not(feature = "tls"), allow(unused_variables))]
async fn accept_tcp(
    hub: Hub,
    listener: TcpListener,
    opts: TcpOptions,
    tls: Option<ListenerTls>,
    stop: CancellationToken,
) {
    while let Some((stream, peer)) = next_conn(&listener, &stop).await {
        #[cfg(feature = "tls")]
        if let Some(tls) = &tls {
            hub.spawn_conn(tcp::handle_tls(
                hub.clone(),
                stream,
                peer,
                opts,
                tls.clone(),
            ));
            continue;
        }
        hub.spawn_conn(tcp::handle(hub.clone(), stream, peer, opts));
    }
}
