//! Bad input and bad clients: each gets a clear error or close code, and
//! harms nobody else.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use switchboard_test::client::Event;
use switchboard_test::conformance::settle;
use switchboard_test::{Client, InProcess, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

async fn small_limits() -> Result<InProcess> {
    InProcess::start_with(Mode::Memory(2), |cfg| {
        cfg.limits.max_message_size = 1024;
        cfg.limits.handshake_timeout = Duration::from_millis(500);
        cfg.limits.heartbeat = Duration::from_millis(200);
        cfg.limits.ws_idle_timeout = Some(Duration::from_millis(600));
    })
    .await
}

/// A neighbour pair that must keep working whatever the bad client did.
async fn neighbours_still_work(c: &InProcess) -> Result<()> {
    let (a, b) = (format!("na-{}", rand_tag()), format!("nb-{}", rand_tag()));
    let mut cl = vec![
        Client::tcp(c.nodes[0].tcp.unwrap(), &a, None).await?,
        Client::ws(c.nodes[1].ws.unwrap(), &b, None).await?,
    ];
    cl[0]
        .send(json!({"op": "to_user", "uid": b, "data": "ok"}))
        .await?;
    settle(&mut cl, 0, &[&[], &["ok"]]).await
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_invalid_utf8_closes_with_1007() -> Result<()> {
    let c = small_limits().await?;
    let url = format!("ws://{}/ws?uid=bad", c.nodes[0].ws.unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let _welcome = ws.next().await;
    let frame = WsFrame::message(vec![0x66, 0xff, 0xfe], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(frame)).await?;
    let code = loop {
        match ws.next().await {
            Some(Ok(Message::Close(cf))) => break cf.map(|c| u16::from(c.code)),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1007));
    neighbours_still_work(&c).await?;
    Box::new(c).shutdown_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_oversize_closes_with_1009_and_tcp_oversize_gets_an_error_line_then_closes() -> Result<()>
{
    let c = small_limits().await?;
    let mut big = Client::ws(c.nodes[0].ws.unwrap(), "big", None).await?;
    big.send_text(&"x".repeat(2000)).await?;
    assert_eq!(big.expect_closed(switchboard_test::STEP).await?, Some(1009));

    // Just under the limit is fine (and gets an error reply, since it is not JSON).
    let mut fits = Client::ws(c.nodes[0].ws.unwrap(), "fits", None).await?;
    fits.send_text(&"x".repeat(1000)).await?;
    assert_eq!(fits.recv_json().await?["op"], "error");

    // TCP: a line that never ends is cut off at the limit, not buffered
    // forever, and the client is told why (TCP has no close code).
    let mut t = Client::tcp(c.nodes[1].tcp.unwrap(), "bigtcp", None).await?;
    t.send_raw(&[b'y'; 4096]).await?;
    let told = t.recv_json().await?;
    assert_eq!(told["op"], "error", "{told}");
    assert!(
        told["reason"]
            .as_str()
            .is_some_and(|r| r.contains("too big") && r.contains("1024")),
        "{told}"
    );
    assert_eq!(t.expect_closed(switchboard_test::STEP).await?, None);
    neighbours_still_work(&c).await?;
    Box::new(c).shutdown_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_binary_frames_get_errors_not_closes() -> Result<()> {
    let c = small_limits().await?;
    let mut w = Client::ws(c.nodes[0].ws.unwrap(), "garbage", None).await?;
    w.send_raw(&[0, 1, 2, 0xff, 0xfe]).await?;
    assert_eq!(w.recv_json().await?["op"], "error");
    w.send_raw(br#"{"op":"online","uid":"garbage"}"#).await?;
    assert_eq!(
        w.recv_json().await?["online"],
        true,
        "binary JSON is served like text"
    );
    let mut t = Client::tcp(c.nodes[0].tcp.unwrap(), "garbage2", None).await?;
    t.send_raw(b"\x00\x01\xff\xfe\n\r\n").await?;
    assert_eq!(t.recv_json().await?["op"], "error");
    assert_eq!(t.recv_json().await?["op"], "error");
    neighbours_still_work(&c).await?;
    Box::new(c).shutdown_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_disconnects_leave_nothing_behind() -> Result<()> {
    let c = small_limits().await?;
    let before = c.nodes[0].hub.stats();
    for i in 0..40 {
        let ws = c.nodes[0].ws.unwrap();
        let tcp = c.nodes[0].tcp.unwrap();
        match i % 4 {
            // Dropped right after the welcome, no close handshake.
            0 => Client::ws(ws, &format!("drop{i}"), Some("dropg"))
                .await?
                .abort(),
            1 => Client::tcp(tcp, &format!("drop{i}"), Some("dropg"))
                .await?
                .abort(),
            // Dropped in the middle of a request.
            2 => {
                let mut cl = Client::tcp(tcp, &format!("drop{i}"), Some("dropg")).await?;
                cl.send_raw(br#"{"op":"to_all","da"#).await?;
                cl.abort();
            }
            // Dropped in the middle of the HTTP upgrade.
            _ => {
                let mut s = TcpStream::connect(ws).await?;
                s.write_all(b"GET /ws?uid=x HTTP/1.1\r\nHost: x\r\nUpgr")
                    .await?;
            }
        }
    }
    let hub = &c.nodes[0].hub;
    assert!(
        hub.stats().conns_opened - before.conns_opened >= 30,
        "{:?}",
        hub.stats()
    );
    let deadline = tokio::time::Instant::now() + switchboard_test::STEP;
    while hub.stats().conns_open != before.conns_open {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections left open: {:?}",
            hub.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hub.group_count("dropg").await.value, 0);
    neighbours_still_work(&c).await?;
    Box::new(c).shutdown_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_timed_out() -> Result<()> {
    let c = small_limits().await?;
    // (handshake timeout 500 ms, idle timeout 600 ms: see `small_limits`.)
    let handshake = Duration::from_millis(500);
    let idle = Duration::from_millis(600);

    // TCP without a hello: closed once the handshake timeout has passed, not before.
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(c.nodes[0].tcp.unwrap()).await?;
    let got = read_until_closed(&mut s).await?;
    within("a hello-less TCP client", started.elapsed(), handshake)?;
    assert!(got.is_empty(), "nothing is sent before the hello: {got:?}");

    // HTTP without a complete request head: the same.
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(c.nodes[0].ws.unwrap()).await?;
    s.write_all(b"GET /ws HTTP/1.1\r\n").await?;
    let got = read_until_closed(&mut s).await?;
    within("an incomplete request head", started.elapsed(), handshake)?;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 408"),
        "only a 408 may come before the close: {got:?}"
    );

    // A WebSocket client that never answers pings: closed with 1000 once the
    // idle timeout has passed. A raw socket, because a WebSocket library
    // answers pings by itself whenever it reads.
    let mut s = TcpStream::connect(c.nodes[0].ws.unwrap()).await?;
    s.write_all(
        b"GET /ws?uid=sleepy HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    let upgraded = tokio::time::Instant::now();
    // Timed at the close frame: the socket itself closes later, once the
    // server gives up waiting for a close reply that never comes.
    let mut got = Vec::new();
    let frames = loop {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(switchboard_test::STEP, s.read(&mut buf)).await??;
        assert!(n > 0, "closed without a close frame: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let Some(head) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        assert!(got.starts_with(b"HTTP/1.1 101"), "{got:?}");
        let frames = server_frames(&got[head + 4..]);
        if frames.iter().any(|(op, _)| *op == 0x8) {
            break frames;
        }
    };
    let elapsed = upgraded.elapsed();
    assert!(
        frames.iter().any(|(op, _)| *op == 0x9),
        "the server pinged before giving up: {frames:?}"
    );
    let (op, body) = frames.last().expect("frames");
    assert_eq!(*op, 0x8, "the last frame is a close: {frames:?}");
    assert_eq!(
        body.get(..2),
        Some(&1000u16.to_be_bytes()[..]),
        "idle close code"
    );
    within("a client that does not answer pings", elapsed, idle)?;

    // A client that answers pings stays.
    let mut alive = Client::ws(c.nodes[0].ws.unwrap(), "alive", None).await?;
    alive.expect_silence(Duration::from_millis(1200)).await?;
    assert_eq!(
        alive.ask(json!({"op":"online","uid":"alive"})).await?["online"],
        true
    );
    Box::new(c).shutdown_all().await;
    Ok(())
}

/// Reads from `s` until the server closes it; what it sent meanwhile.
async fn read_until_closed(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    tokio::time::timeout(switchboard_test::STEP, s.read_to_end(&mut got))
        .await
        .map_err(|_| anyhow::anyhow!("not closed within {:?}", switchboard_test::STEP))??;
    Ok(got)
}

/// Fails unless a timeout of `limit` fired when it should: after `limit`
/// (the server started its clock after we started ours), and well before
/// twice the limit plus scheduling slack.
fn within(what: &str, elapsed: Duration, limit: Duration) -> Result<()> {
    anyhow::ensure!(
        elapsed >= limit && elapsed < limit * 2 + Duration::from_millis(1500),
        "{what}: closed after {elapsed:?}, the timeout is {limit:?}"
    );
    Ok(())
}

/// The (opcode, payload) of each whole unmasked frame a server sent (payloads
/// under 126 bytes, which is all a welcome, ping or close carries here).
fn server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 && b.len() >= 2 + usize::from(b[1] & 0x7f) {
        let (op, len) = (b[0] & 0x0f, usize::from(b[1] & 0x7f));
        assert!(len < 126 && b[1] & 0x80 == 0, "unexpected frame: {b:?}");
        out.push((op, b[2..2 + len].to_vec()));
        b = &b[2 + len..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_with_1001_in_bounded_time() -> Result<()> {
    let c = InProcess::start(Mode::Memory(2)).await?;
    let mut ws = Client::ws(c.nodes[0].ws.unwrap(), "s1", None).await?;
    let mut tcp = Client::tcp(c.nodes[0].tcp.unwrap(), "s2", None).await?;
    let other = Client::ws(c.nodes[1].ws.unwrap(), "s3", None).await?;
    let mut nodes = c.nodes.into_iter();
    let n0 = nodes.next().unwrap();
    let ws_addr = n0.ws.unwrap();
    let started = tokio::time::Instant::now();
    n0.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(ws.expect_closed(Duration::from_secs(1)).await?, Some(1001));
    assert_eq!(
        tcp.next_event(Duration::from_secs(1)).await?,
        Event::Closed(None)
    );
    assert!(
        TcpStream::connect(ws_addr).await.is_err(),
        "still accepting after shutdown"
    );
    // The other node lost nothing and knows the departed node's users are gone.
    let mut other = other;
    let r = other.ask(json!({"op":"online","uid":"s1"})).await?;
    assert_eq!(r["online"], false, "{r}");
    assert!(
        r.get("complete").is_none(),
        "a node that left is not missing: {r}"
    );
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

trait ShutdownAll {
    async fn shutdown_all(self);
}

impl ShutdownAll for Box<InProcess> {
    async fn shutdown_all(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}
