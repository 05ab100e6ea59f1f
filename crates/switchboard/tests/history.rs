//! Streams with history through the library alone: two nodes on the
//! in-memory bus sharing one [`MemoryHistory`], clients over real sockets.
//! A client that drops and reconnects to the other node with `recover`
//! gets what it missed, then `recovered`, then live frames: nothing lost or
//! repeated at the seam, even while pushes keep coming.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use switchboard::core::{Entry, HistoryError, MemoryBus, NodeId, Since, Target};
use switchboard::{
    Accept, ConnectInfo, Decision, FrameKind, Handler, History, Hub, MemoryHistory, Position,
    Retention, Server, async_trait,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(10);

/// Binds `?uid=` and recovers each `?recover=STREAM@POS`.
struct App;

#[async_trait]
impl Handler for App {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        let mut a = Accept::new().greet(switchboard::Frame::text("welcome"));
        if let Some(u) = info.query_param("uid") {
            a = a.bind(u.as_ref());
        }
        for r in info.query_params("recover") {
            let (stream, pos) = r.rsplit_once('@').unwrap();
            a = a.recover(stream, pos.parse::<Position>().unwrap());
        }
        a.into()
    }
}

/// A memory history whose reads take 20 ms, as a broker's might under load:
/// pushes keep coming while a recovering client's replay is read.
struct Slow(std::sync::Mutex<Arc<MemoryHistory>>, Retention);

impl Slow {
    fn new(retention: Retention) -> Self {
        Slow(
            std::sync::Mutex::new(Arc::new(MemoryHistory::new(retention))),
            retention,
        )
    }

    fn store(&self) -> Arc<MemoryHistory> {
        self.0.lock().unwrap().clone()
    }

    /// Loses every stream, as a Redis restarted without persistence does.
    fn lose_everything(&self) {
        *self.0.lock().unwrap() = Arc::new(MemoryHistory::new(self.1));
    }
}

#[async_trait]
impl History for Slow {
    async fn append(
        &self,
        stream: &str,
        data: Bytes,
        kind: FrameKind,
    ) -> Result<Position, HistoryError> {
        self.store().append(stream, data, kind).await
    }
    async fn since(
        &self,
        stream: &str,
        after: Position,
        limit: usize,
    ) -> Result<Since, HistoryError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.store().since(stream, after, limit).await
    }
    async fn latest(
        &self,
        stream: &str,
        n: usize,
    ) -> Result<(Vec<Entry>, Option<Position>), HistoryError> {
        self.store().latest(stream, n).await
    }
}

struct Node {
    history: Arc<Slow>,
    hub: Hub,
    addr: std::net::SocketAddr,
    _stop: tokio_util::sync::DropGuard,
}

async fn nodes(retention: Retention) -> (Node, Node) {
    let bus = MemoryBus::new();
    let history = Arc::new(Slow::new(retention));
    let mut out = Vec::new();
    for id in ["hist-a", "hist-b"] {
        let hub = Hub::builder()
            .node_id(NodeId::new(id).unwrap())
            .backplane(bus.backplane())
            .history(history.clone())
            .handler(App)
            .start()
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = Server::new(hub.clone()).websocket(listener, "/ws");
        let s = stop.clone();
        tokio::spawn(async move { server.serve(s.cancelled_owned()).await });
        out.push(Node {
            history: history.clone(),
            hub,
            addr,
            _stop: stop.drop_guard(),
        });
    }
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    (a, b)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn client(n: &Node, query: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?{query}", n.addr))
        .await
        .unwrap();
    assert_eq!(next(&mut ws).await["welcome"], Value::Bool(true));
    ws
}

/// The next frame, as JSON (the greeting reads as `{"welcome":true}`).
async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .unwrap();
        if let Message::Text(t) = m {
            if t.as_str() == "welcome" {
                return serde_json::json!({"welcome": true});
            }
            // A plain push reads as a JSON string.
            return serde_json::from_str(t.as_str())
                .unwrap_or_else(|_| Value::String(t.as_str().to_owned()));
        }
    }
}

/// A recorded push frame's data and position.
fn entry(v: &Value) -> (String, String) {
    assert_eq!(v["op"], "push", "{v}");
    (
        v["data"].as_str().unwrap().to_owned(),
        v["pos"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn a_client_recovers_what_it_missed_on_the_other_node_then_gets_live_pushes() {
    let (a, b) = nodes(Retention::default()).await;
    let mut alice = client(&b, "uid=alice").await;
    for m in ["m1", "m2"] {
        a.hub
            .push_recorded(&Target::user("alice"), m)
            .await
            .unwrap();
    }
    let (d1, _) = entry(&next(&mut alice).await);
    let (d2, pos2) = entry(&next(&mut alice).await);
    assert_eq!((d1.as_str(), d2.as_str()), ("m1", "m2"));
    alice.close(None).await.unwrap();
    drop(alice);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut missed = Vec::new();
    for m in ["m3", "m4", "m5"] {
        let r = a
            .hub
            .push_recorded(&Target::user("alice"), m)
            .await
            .unwrap();
        missed.push(r.positions[0].1.to_string());
    }
    let mut alice = client(&a, &format!("uid=alice&recover=user:alice@{pos2}")).await;
    for (m, pos) in ["m3", "m4", "m5"].iter().zip(&missed) {
        assert_eq!(entry(&next(&mut alice).await), (m.to_string(), pos.clone()));
    }
    let done = next(&mut alice).await;
    assert_eq!(
        done,
        serde_json::json!({"op":"recovered","stream":"user:alice","recovered":true})
    );
    b.hub
        .push_recorded(&Target::user("alice"), "live")
        .await
        .unwrap();
    assert_eq!(entry(&next(&mut alice).await).0, "live");
    // Once: an unrecorded push is the next thing it gets.
    b.hub.to_user("alice", "plain").unwrap();
    let Some(Ok(Message::Text(t))) = tokio::time::timeout(STEP, alice.next()).await.unwrap() else {
        panic!("a frame");
    };
    assert_eq!(t.as_str(), "plain");
    let s = a.hub.stats();
    assert_eq!((s.history_recovered, s.history_replayed), (1, 3));
}

#[tokio::test]
async fn a_position_outside_the_window_is_not_recovered_and_nothing_is_replayed() {
    let (a, b) = nodes(Retention {
        size: 100,
        ttl: Duration::from_secs(60),
    })
    .await;
    let first = a
        .hub
        .push_recorded(&Target::user("bob"), "first")
        .await
        .unwrap()
        .positions[0]
        .1;
    for i in 0..150 {
        a.hub
            .push_recorded(&Target::user("bob"), format!("n{i}"))
            .await
            .unwrap();
    }
    let mut bob = client(&b, &format!("uid=bob&recover=user:bob@{first}")).await;
    assert_eq!(
        next(&mut bob).await,
        serde_json::json!({"op":"recovered","stream":"user:bob","recovered":false})
    );
    // Another epoch is not recovered either.
    let other = Position {
        epoch: first.epoch ^ 2,
        ..first
    };
    let mut bob2 = client(&b, &format!("uid=bob&recover=user:bob@{other}")).await;
    assert_eq!(next(&mut bob2).await["recovered"], Value::Bool(false));
    a.hub.to_user("bob", "after").unwrap();
    for ws in [&mut bob, &mut bob2] {
        let Some(Ok(Message::Text(t))) = tokio::time::timeout(STEP, ws.next()).await.unwrap()
        else {
            panic!("a frame");
        };
        assert_eq!(t.as_str(), "after", "nothing replayed before live frames");
    }
    assert_eq!(b.hub.stats().history_not_recovered, 2);
}

/// Pushes keep coming, from both nodes, while the client drops and recovers
/// on the other node: every one arrives exactly once, and a node's pushes in
/// the order it made them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_repeated_at_the_seam_while_pushes_keep_coming() {
    let (a, b) = nodes(Retention {
        size: 10_000,
        ttl: Duration::from_secs(60),
    })
    .await;
    let mut carol = client(&b, "uid=carol").await;
    const N: usize = 400;
    let pushers: Vec<_> = [(a.hub.clone(), "a"), (b.hub.clone(), "b")]
        .into_iter()
        .map(|(hub, name)| {
            tokio::spawn(async move {
                for i in 0..N {
                    hub.push_recorded(&Target::user("carol"), format!("{name}{i}"))
                        .await
                        .unwrap();
                    if i % 10 == 0 {
                        hub.to_user("carol", "plain").unwrap();
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            })
        })
        .collect();
    let mut got: Vec<String> = Vec::new();
    let mut last = String::new();
    let mut reconnects = 0;
    let mut recovering = false;
    while got.len() < 2 * N {
        if reconnects < 3 && got.len() >= (reconnects + 1) * N / 2 {
            // Drop without a goodbye and come back on the other node.
            drop(carol);
            reconnects += 1;
            let n = if reconnects % 2 == 1 { &a } else { &b };
            carol = client(n, &format!("uid=carol&recover=user:carol@{last}")).await;
            recovering = true;
            continue;
        }
        let v = next(&mut carol).await;
        if v == "plain" {
            assert!(!recovering, "a live frame before the replay ended");
            continue;
        }
        if v["op"] == "recovered" {
            assert_eq!(v["recovered"], Value::Bool(true), "{v}");
            recovering = false;
            continue;
        }
        let (data, pos) = entry(&v);
        got.push(data);
        last = pos;
    }
    for p in pushers {
        p.await.unwrap();
    }
    assert_eq!(reconnects, 3);
    let mut seen = std::collections::HashSet::new();
    for g in &got {
        assert!(seen.insert(g.clone()), "{g} twice");
    }
    for name in ["a", "b"] {
        let order: Vec<usize> = got
            .iter()
            .filter_map(|g| g.strip_prefix(name))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(
            order,
            (0..N).collect::<Vec<_>>(),
            "node {name}'s pushes in order"
        );
    }
}

/// An entry that never reaches a node (lost by an at-most-once broker; here
/// appended to the history behind the cluster's back) is read from the
/// history once the gap timeout passes, and delivered before the entries
/// after it.
#[tokio::test]
async fn an_entry_that_never_arrives_is_read_from_the_history_in_order() {
    let (a, b) = nodes(Retention::default()).await;
    let mut dave = client(&b, "uid=dave").await;
    a.hub
        .push_recorded(&Target::user("dave"), "d1")
        .await
        .unwrap();
    assert_eq!(entry(&next(&mut dave).await).0, "d1");
    let lost = a
        .history
        .append("user:dave", Bytes::from_static(b"d2"), FrameKind::Text)
        .await
        .unwrap();
    a.hub
        .push_recorded(&Target::user("dave"), "d3")
        .await
        .unwrap();
    let (d, pos) = entry(&next(&mut dave).await);
    assert_eq!((d.as_str(), pos), ("d2", lost.to_string()));
    assert_eq!(entry(&next(&mut dave).await).0, "d3");
    assert_eq!(b.hub.stats().history_gaps_filled, 1);
}

/// When the history is lost (a new epoch), the members of a stream are told
/// they may have missed entries, before the first entry of the new epoch.
#[tokio::test]
async fn a_lost_history_is_told_to_the_streams_members() {
    let (a, b) = nodes(Retention::default()).await;
    let mut erin = client(&b, "uid=erin").await;
    a.hub
        .push_recorded(&Target::user("erin"), "e1")
        .await
        .unwrap();
    assert_eq!(entry(&next(&mut erin).await).0, "e1");
    a.history.lose_everything();
    a.hub
        .push_recorded(&Target::user("erin"), "e2")
        .await
        .unwrap();
    assert_eq!(
        next(&mut erin).await,
        serde_json::json!({"op":"recovered","stream":"user:erin","recovered":false})
    );
    let (d, pos) = entry(&next(&mut erin).await);
    assert_eq!((d.as_str(), pos.split('-').next()), ("e2", Some("1")));
}
