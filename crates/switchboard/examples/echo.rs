//! An echo endpoint on the standalone server, for the Autobahn WebSocket
//! conformance cases: every message comes back to its sender.
//!
//! `bash scripts/autobahn.sh` builds it, starts it on a free port (address
//! `127.0.0.1:0`) and runs the cases against it; docs/TESTING.md says more.

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
    // No keep-alive ping while the cases run: the suite ends a case on any
    // frame it does not expect, and an unsolicited ping is one. Its latency
    // cases (9.7, 9.8) take seconds on a loaded machine, long enough for a
    // heartbeat's ping to land in them.
    limits.heartbeat = std::time::Duration::from_secs(3600);
    let hub = Hub::builder().handler(Echo).limits(limits).start().await?;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    // The bound address, not the requested one: given port 0, the system picks a
    // free port, and scripts/autobahn.sh reads it from this line.
    eprintln!("echo on ws://{}/", listener.local_addr()?);
    Server::new(hub.clone())
        .websocket(listener, "/")
        .serve(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    hub.shutdown().await;
    Ok(())
}
