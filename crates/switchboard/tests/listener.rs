//! The WebSocket listener's own upgrade path (`Server::websocket_with`): what
//! a client sees on the wire, and that every other request still reaches the
//! application's router.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use switchboard::core::ConnId;
use switchboard::{
    Accept, ConnectInfo, Decision, Frame, Handler, Hub, Reject, Server, async_trait,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const STEP: Duration = Duration::from_secs(10);

/// Greets with "hi <uid>", refuses a missing uid, echoes frames.
struct Greeter;

#[async_trait]
impl Handler for Greeter {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        match info.query_param("uid") {
            Some(uid) => Accept::new().greet(Frame::text(format!("hi {uid}"))).into(),
            None => Reject::new("uid required").into(),
        }
    }
    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: Frame) {
        hub.to_conn(conn, frame).unwrap();
    }
}

async fn serve() -> (Hub, SocketAddr) {
    let hub = Hub::builder().handler(Greeter).start().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    let server = Server::new(hub.clone()).websocket_with(listener, "/ws", router);
    tokio::spawn(server.serve(std::future::pending()));
    (hub, addr)
}

fn upgrade_request(target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// A masked client text frame.
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// An unmasked server text frame.
fn server_frame(text: &str) -> Vec<u8> {
    let mut f = vec![0x81, text.len() as u8];
    f.extend_from_slice(text.as_bytes());
    f
}

const RESPONSE_101: &str = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
    upgrade: websocket\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// The `101` and then these text frames, as the server writes them.
fn response_then(texts: &[&str]) -> Vec<u8> {
    let mut wire = RESPONSE_101.as_bytes().to_vec();
    for t in texts {
        wire.extend(server_frame(t));
    }
    wire
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(STEP, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf
}

/// Byte strings compared as text, for readable failures.
fn assert_same(got: &[u8], expected: &[u8]) {
    assert_eq!(
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(expected)
    );
}

async fn read_to_end(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn the_101_and_the_greeting_leave_together() {
    let (hub, addr) = serve().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request("/ws?uid=ann").as_bytes())
        .await
        .unwrap();
    // One read, begun before the server answers: with the response and the
    // greeting written apart it would usually hold the response alone.
    let expected = response_then(&["hi ann"]);
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(STEP, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_same(&buf[..n], &expected);
    drop(s);
    hub.shutdown().await;
}

#[tokio::test]
async fn frames_sent_with_the_request_are_not_lost() {
    let (hub, addr) = serve().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The request and two frames in one write: the frames are read by the
    // connection, not dropped with the request head.
    let mut wire = upgrade_request("/ws?uid=bo").into_bytes();
    wire.extend(client_frame("one"));
    wire.extend(client_frame("two"));
    s.write_all(&wire).await.unwrap();
    let expected = response_then(&["hi bo", "one", "two"]);
    let got = read_exactly(&mut s, expected.len()).await;
    assert_same(&got, &expected);
    drop(s);
    hub.shutdown().await;
}

#[tokio::test]
async fn other_requests_reach_the_router() {
    let (hub, addr) = serve().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = read_to_end(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("ok"), "{r}");

    // An upgrade on another path is the router's too: 404.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request("/elsewhere?uid=x").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_exactly(&mut s, 12).await, b"HTTP/1.1 404");

    // A request head split over several writes is read whole.
    let mut s = TcpStream::connect(addr).await.unwrap();
    for part in [
        "GET /hea",
        "lth HTTP/1.1\r\nHo",
        "st: x\r\nConnection: close\r\n\r\n",
    ] {
        s.write_all(part.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = read_to_end(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    hub.shutdown().await;
}

#[tokio::test]
async fn refusals_get_a_clear_answer() {
    let (hub, addr) = serve().await;
    // The application's refusal.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request("/ws").as_bytes())
        .await
        .unwrap();
    let r = read_to_end(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.ends_with("uid required"), "{r}");

    // A plain GET of the WebSocket path.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws?uid=x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_to_end(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");

    // A head that never ends.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut head = b"GET /ws HTTP/1.1\r\n".to_vec();
    while head.len() < 20_000 {
        head.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let _ = s.write_all(&head).await;
    let r = read_to_end(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");

    // HTTP/1.0 cannot upgrade (RFC 6455 §4.1): a 400 that says why, not a 500.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        upgrade_request("/ws?uid=x")
            .replace("HTTP/1.1", "HTTP/1.0")
            .as_bytes(),
    )
    .await
    .unwrap();
    let r = read_to_end(&mut s).await;
    assert!(
        r.contains(" 400 ") && r.ends_with("a WebSocket upgrade needs HTTP/1.1"),
        "{r}"
    );

    // A key that is not 16 bytes in base64.
    for key in [
        "c2hvcnQ=",
        "dGhlIHNhbXBsZSBub25jZQ==AAAA",
        "not base64 at all!!!!!!!",
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = upgrade_request("/ws?uid=x").replace("dGhlIHNhbXBsZSBub25jZQ==", key);
        s.write_all(req.as_bytes()).await.unwrap();
        let r = read_to_end(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{key}: {r}");
        assert!(
            r.ends_with("Sec-WebSocket-Key must be 16 bytes in base64"),
            "{r}"
        );
    }

    // None of this touched the hub's connections.
    assert_eq!(hub.stats().conns_opened, 0);
    assert_eq!(hub.stats().conns_rejected, 1, "the application's refusal");
    hub.shutdown().await;
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_a_shutdown() {
    // Both waits long, so that a shutdown held up by the silent client
    // could not pass for a quick one.
    let mut limits = switchboard::Limits::default();
    limits.handshake_timeout = Duration::from_secs(60);
    let hub = Hub::builder()
        .handler(Greeter)
        .limits(limits)
        .shutdown_timeout(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(hub.clone()).websocket(listener, "/ws");
    tokio::spawn(server.serve(std::future::pending()));
    // Connected, request not sent: the listener is waiting for its head.
    let _silent = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(STEP, hub.shutdown())
        .await
        .expect("shutdown did not wait for the silent client");
}
