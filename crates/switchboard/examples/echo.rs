//! An echo endpoint on the standalone server, for the Autobahn WebSocket
//! conformance cases: every message comes back to its sender.
//!
//! `cargo run --release -p switchboard --example echo -- 127.0.0.1:9001`,
//! then `kosoku 127.0.0.1:9001`.

use switchboard::core::ConnId;
use switchboard::{
    Accept, ConnectInfo, Decision, Frame, Handler, Hub, Limits, Server, async_trait,
};

struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn on_connect(&self, _hub: &Hub, _info: &ConnectInfo) -> Decision {
        Accept::new().into()
    }
    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: Frame) {
        let _ = hub.to_conn(conn, frame);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    // The conformance cases send messages of up to 16 MiB.
    let mut limits = Limits::default();
    limits.max_message_size = 16 << 20;
    limits.outbox_bytes = 64 << 20;
    let hub = Hub::builder().handler(Echo).limits(limits).start().await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("echo on ws://{addr}/");
    Server::new(hub.clone())
        .websocket(listener, "/")
        .serve(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    hub.shutdown().await;
    Ok(())
}
