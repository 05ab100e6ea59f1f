//! Mounting switchboard in an axum application.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let hub = switchboard::Hub::builder().start().await?;
//! let app = axum::Router::new()
//!     .route("/health", axum::routing::get(|| async { "ok" }))
//!     .route("/ws", switchboard::axum::route(hub.clone()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(
//!     listener,
//!     app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
//! )
//! .await?;
//! # Ok(()) }
//! ```

use axum::extract::Request;
use axum::routing::{MethodRouter, get};

use crate::hub::Hub;

/// A `GET` route that upgrades to a WebSocket connection of `hub`. Serve the
/// router with `into_make_service_with_connect_info::<SocketAddr>()` to give the
/// application the client's address.
pub fn route<S>(hub: Hub) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(move |req: Request| crate::transport::upgrade(hub.clone(), req))
}

/// A router with one WebSocket route at `path`.
pub fn router(hub: Hub, path: &str) -> axum::Router {
    axum::Router::new().route(path, route(hub))
}
