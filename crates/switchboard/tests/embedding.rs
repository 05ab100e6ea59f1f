//! Embedding the library: the axum route in a user's router, the standalone
//! server with length-prefixed TCP, the hub-wide default frame kind.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use switchboard::core::{ConnId, Framing};
use switchboard::{
    Accept, CloseReason, ConnectInfo, Decision, Frame, FrameKind, Handler, Hub, Server, TcpOptions,
    async_trait,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Echoes every frame, greets with a default-kind payload, records what it saw.
#[derive(Default, Clone)]
struct Echo {
    peers: Arc<Mutex<Vec<Option<SocketAddr>>>>,
    closed: Arc<Mutex<Vec<CloseReason>>>,
}

#[async_trait]
impl Handler for Echo {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        self.peers.lock().unwrap().push(info.peer);
        Accept::new().into()
    }
    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: Frame) {
        if frame.as_text() == Some("default") {
            // A payload without a kind takes the hub's default kind.
            hub.to_conn(conn, "hello").unwrap();
        } else {
            hub.to_conn(conn, frame).unwrap();
        }
    }
    async fn on_close(&self, _hub: &Hub, _conn: &ConnId, reason: &CloseReason) {
        self.closed.lock().unwrap().push(reason.clone());
    }
}

const STEP: Duration = Duration::from_secs(10);

#[tokio::test]
async fn axum_route_in_a_user_router() {
    let echo = Echo::default();
    let hub = Hub::builder()
        .handler(echo.clone())
        .default_kind(FrameKind::Binary)
        .start()
        .await
        .unwrap();
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route("/socket", switchboard::axum::route(hub.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/socket"))
        .await
        .unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    let got = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, Message::text("ping"), "text echoes as text");
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let got = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        Message::binary(vec![1, 2, 3]),
        "binary echoes as binary"
    );
    ws.send(Message::text("default")).await.unwrap();
    let got = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        got,
        Message::binary(b"hello".to_vec()),
        "default kind applies"
    );

    // The client's address reached on_connect through axum's ConnectInfo.
    let local = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.local_addr().unwrap(),
        _ => unreachable!(),
    };
    assert_eq!(echo.peers.lock().unwrap().as_slice(), &[Some(local)]);

    // The rest of the user's router is untouched, and a plain GET on the
    // socket route is refused clearly.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("ok"),
        "{resp}"
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /socket HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");

    // A close frame without a code: the reason says the client closed, with no code.
    ws.close(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + STEP;
    while echo.closed.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        echo.closed.lock().unwrap()[0],
        CloseReason::Client { code: None, .. }
    ));
    hub.shutdown().await;
    server.abort();
}

#[tokio::test]
async fn length_prefixed_tcp() {
    let hub = Hub::builder()
        .handler(Echo::default())
        .start()
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::new(hub.clone())
            .tcp(listener, TcpOptions::new(Framing::Length))
            .serve(async {
                let _ = stopped.await;
            }),
    );
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Two messages, one with a newline and a zero byte, in one write.
    let mut wire = Vec::new();
    for m in [&b"a\nb\0c"[..], b"second"] {
        wire.extend_from_slice(&(m.len() as u32).to_be_bytes());
        wire.extend_from_slice(m);
    }
    s.write_all(&wire).await.unwrap();
    let mut back = vec![0u8; wire.len()];
    tokio::time::timeout(STEP, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, wire);
    // A declared length over the limit closes the connection.
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let n = tokio::time::timeout(STEP, s.read(&mut [0u8; 8]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    let _ = stop.send(());
    server.await.unwrap();
    assert!(hub.is_closing());
}
