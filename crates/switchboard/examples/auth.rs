//! Authenticated connections in a library application: a JWT checked in
//! `on_connect`, and a permission checked per message.
//!
//! ```sh
//! SECRET=$(head -c 32 /dev/urandom | base64)
//! SWITCHBOARD_JWT_SECRET=$SECRET cargo run -p switchboard --example auth &
//! TOKEN=$(cargo run -q --bin switchboard -- token --sub alice --groups lobby \
//!     --can push:group:lobby --secret "$SECRET")
//! # then connect to ws://127.0.0.1:9001/ws?token=$TOKEN: every message goes to the lobby
//! ```

use std::collections::HashMap;
use std::sync::Mutex;

use switchboard::auth::{Action, JwtVerifier, Permissions};
use switchboard::core::ConnId;
use switchboard::{CloseReason, ConnectInfo, Decision, Frame, Handler, Hub, Server, async_trait};

struct Chat {
    jwt: JwtVerifier,
    /// What each connection of this node may do. Kept here because this
    /// application runs in the process that holds its sockets; one that runs
    /// elsewhere (a gateway worker) would keep it in the session.
    can: Mutex<HashMap<ConnId, Permissions>>,
}

#[async_trait]
impl Handler for Chat {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        match self.jwt.verify_connect(info) {
            Ok(id) => {
                self.can
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(info.conn.clone(), id.can.clone());
                // Bound to its `sub`, in its `groups`, with its `session`.
                id.accept().into()
            }
            // 401, with a reason the client's developer can act on.
            Err(e) => e.reject().into(),
        }
    }

    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: Frame) {
        let allowed = self
            .can
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(conn)
            .is_some_and(|can| can.allows(Action::PushGroup, "lobby"));
        if allowed {
            let _ = hub.to_group("lobby", frame);
        } else {
            let _ = hub.to_conn(conn, Frame::text("not permitted: push:group:lobby"));
        }
    }

    async fn on_close(&self, _hub: &Hub, conn: &ConnId, _reason: &CloseReason) {
        self.can
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(conn);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secret = std::env::var("SWITCHBOARD_JWT_SECRET")
        .map_err(|_| anyhow::anyhow!("set SWITCHBOARD_JWT_SECRET"))?;
    let chat = Chat {
        jwt: JwtVerifier::hs256(secret),
        can: Mutex::default(),
    };
    let hub = Hub::builder().handler(chat).start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:9001").await?;
    eprintln!("auth example on ws://127.0.0.1:9001/ws");
    Server::new(hub)
        .websocket(listener, "/ws")
        .serve(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    Ok(())
}
