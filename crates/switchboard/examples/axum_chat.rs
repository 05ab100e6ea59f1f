//! The README's library example: a chat lobby mounted in an axum router.
//!
//! `cargo run -p switchboard --example axum_chat`, then connect to ws://127.0.0.1:3000/ws?uid=alice

use switchboard::core::ConnId;
use switchboard::{Accept, ConnectInfo, Decision, Frame, Handler, Hub, Reject, async_trait};

struct Chat;

#[async_trait]
impl Handler for Chat {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        match info.query_param("uid") {
            Some(uid) => Accept::new().bind(uid.as_ref()).join("lobby").into(),
            None => Reject::new("uid required").into(),
        }
    }
    async fn on_message(&self, hub: &Hub, _conn: &ConnId, frame: Frame) {
        // Every member of the lobby, on every node of the cluster.
        let _ = hub.to_group("lobby", frame);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let hub = Hub::builder().handler(Chat).start().await?;
    // Mount the WebSocket route in your own axum router.
    let app = axum::Router::new()
        .route("/ws", switchboard::axum::route(hub.clone()))
        .route(
            "/online/{uid}",
            axum::routing::get({
                let hub = hub.clone();
                move |axum::extract::Path(uid): axum::extract::Path<String>| async move {
                    hub.is_online(uid).await.value.to_string()
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .await?;
    Ok(())
}
