//! The Hub API through the library alone: two nodes joined by the in-memory
//! bus, each serving WebSocket clients, and what each push and close reports
//! (queued here, handed to the cluster) next to what the clients receive.
//! The reference application and its conformance suite check the same API
//! from outside; these checks keep the library honest on its own.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use futures_util::StreamExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use switchboard::core::backplane::{BackplaneStats, Handoff, JoinContext, JoinError, Status};
use switchboard::core::{
    Backplane, Body, ConnId, Dest, Envelope, LocalView, MembershipChange, MemoryBus, NodeId,
    OpResult, Target,
};
use switchboard::{
    Accept, ConnectInfo, Decision, FrameKind, Handler, Hub, Limits, Server, async_trait,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(10);

/// Binds `?uid=`, joins `?group=`, greets with the connection's id.
struct Bind;

#[async_trait]
impl Handler for Bind {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        let mut a = Accept::new().greet(switchboard::Frame::text(info.conn.to_string()));
        if let Some(u) = info.query_param("uid") {
            a = a.bind(u.as_ref());
        }
        if let Some(g) = info.query_param("group") {
            a = a.join(g.as_ref());
        }
        a.into()
    }
}

struct Node {
    hub: Hub,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

async fn node(bus: Option<&MemoryBus>, id: &str, limits: Limits) -> Node {
    let mut b = Hub::builder()
        .node_id(NodeId::new(id).unwrap())
        .limits(limits)
        .handler(Bind);
    if let Some(bus) = bus {
        b = b.backplane(bus.backplane());
    }
    let hub = b.start().await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = Server::new(hub.clone()).websocket(listener, "/ws");
    let s = stop.clone();
    tokio::spawn(async move { server.serve(s.cancelled_owned()).await });
    Node { hub, addr, stop }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A client, and its connection id (from the greeting).
async fn client(n: &Node, query: &str) -> (Ws, ConnId) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?{query}", n.addr))
        .await
        .unwrap();
    let id = next(&mut ws).await.unwrap().parse().unwrap();
    (ws, id)
}

/// The next text frame, or `None` when the connection closed.
async fn next(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => return Some(t.to_string()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_report_what_was_queued_here_and_handed_on() {
    let bus = MemoryBus::new();
    let a = node(Some(&bus), "a", Limits::default()).await;
    let b = node(Some(&bus), "b", Limits::default()).await;
    let (mut alice, alice_id) = client(&a, "uid=alice&group=g").await;
    let (mut bob, bob_id) = client(&b, "uid=bob&group=g").await;

    let r = a.hub.to_user("alice", "1").unwrap();
    assert_eq!(
        (r.local, r.remote.sent),
        (1, 1),
        "queued here, and b may hold alice too"
    );
    let r = a.hub.to_user("bob", "2").unwrap();
    assert_eq!((r.local, r.remote.sent), (0, 1));
    let r = a.hub.to_group("g", "3").unwrap();
    assert_eq!((r.local, r.remote.sent), (1, 1));
    let r = a.hub.to_all("4").unwrap();
    assert_eq!((r.local, r.remote.sent), (1, 1));
    // A connection of this node concerns no other: nothing is handed on.
    let r = a.hub.to_conn(&alice_id, "5").unwrap();
    assert_eq!((r.local, r.remote.sent), (1, 0));
    let r = a.hub.to_conn(&bob_id, "6").unwrap();
    assert_eq!(
        (r.local, r.remote.sent),
        (0, 1),
        "only b's connection: sent to b"
    );
    for want in ["1", "3", "4", "5"] {
        assert_eq!(next(&mut alice).await.as_deref(), Some(want));
    }
    for want in ["2", "3", "4", "6"] {
        assert_eq!(next(&mut bob).await.as_deref(), Some(want));
    }
    // Pushes count where they were made; on b, what came from a counts as
    // frames.
    let (pa, pb) = (a.hub.stats(), b.hub.stats());
    let kinds = |p: switchboard::PushKinds| (p.conn, p.user, p.group, p.all, p.mixed);
    assert_eq!(kinds(pa.pushes), (2, 2, 1, 1, 0));
    assert_eq!(kinds(pb.pushes), (0, 0, 0, 0, 0));
    assert_eq!(pb.frames_queued, 4);

    // Operations and questions about another node's connection are asked of
    // that node, and answered.
    a.hub.join(&bob_id, "h").await.unwrap();
    let count = a.hub.group_count("h").await;
    assert_eq!((count.value, count.is_complete()), (1, true));
    a.hub
        .set_session(&bob_id, "k", Some("v".into()))
        .await
        .unwrap();
    let session = a.hub.session(&bob_id).await.unwrap();
    assert_eq!(session.get("k").map(String::as_str), Some("v"));
    assert_eq!(
        a.hub.user_conns("bob").await.value,
        std::slice::from_ref(&bob_id)
    );
    let mut replaced = switchboard::Session::new();
    replaced.insert("only".into(), "this".into());
    a.hub
        .replace_session(&bob_id, replaced.clone())
        .await
        .unwrap();
    assert_eq!(b.hub.session(&bob_id).await.unwrap(), replaced);
    for (hub, name) in [(&a.hub, "a"), (&b.hub, "b")] {
        // Asked of the node holding each, or answered here.
        for (conn, user) in [(&alice_id, "alice"), (&bob_id, "bob")] {
            let exists = hub.conn_exists(conn).await;
            assert!(exists.value && exists.is_complete(), "{name}: {conn}");
            let u = hub.conn_user(conn).await;
            assert_eq!(u.value.as_ref().map(|u| u.as_str()), Some(user), "{name}");
        }
        let members = hub.group_members("g").await;
        assert_eq!(members.value, [alice_id.clone(), bob_id.clone()], "{name}");
        let t = hub.totals().await.value;
        assert_eq!((t.conns, t.users, t.groups), (2, 2, 2), "{name}");
    }
    // A node outside the cluster holds nothing, and that is a complete answer.
    let nowhere = ConnId::new(NodeId::new("nowhere").unwrap(), 1);
    let exists = a.hub.conn_exists(&nowhere).await;
    assert!(!exists.value && exists.is_complete());

    // Closes report the same way, and reach the client.
    let r = a.hub.close(&Target::user("bob"), "bye");
    assert_eq!((r.local, r.remote.sent), (0, 1));
    assert_eq!(next(&mut bob).await, None);
    let r = a.hub.close(&Target::conn(alice_id), "bye");
    assert_eq!((r.local, r.remote.sent), (1, 0));
    assert_eq!(next(&mut alice).await, None);

    // Both connections are forgotten, and counted as closed.
    let deadline = tokio::time::Instant::now() + STEP;
    while a.hub.stats().conns_open + b.hub.stats().conns_open > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections left open"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        (
            a.hub.stats().conns_closed,
            a.hub.stats().slow_consumers_closed
        ),
        (1, 0)
    );
    for n in [a, b] {
        n.stop.cancel();
        n.hub.shutdown().await;
    }
}

#[tokio::test]
async fn a_standalone_node_hands_nothing_on() {
    let n = node(None, "solo", Limits::default()).await;
    let (mut ws, _) = client(&n, "uid=u").await;
    let r = n.hub.to_all("x").unwrap();
    assert_eq!((r.local, r.remote.sent, r.remote.dropped), (1, 0, 0));
    assert_eq!(next(&mut ws).await.as_deref(), Some("x"));
    assert_eq!(n.hub.stats().backplane.published, 0);
    drop(ws);
    n.stop.cancel();
    n.hub.shutdown().await;
}

#[tokio::test]
async fn settings_are_what_the_builder_was_given() {
    let mut limits = Limits::default();
    limits.max_message_size = 1234;
    let hub = Hub::builder()
        .default_kind(FrameKind::Binary)
        .limits(limits)
        .start()
        .await
        .unwrap();
    assert_eq!(hub.default_kind(), FrameKind::Binary);
    assert_eq!(hub.limits().max_message_size, 1234);
    hub.shutdown().await;
}

/// A node restarted under the same id does not hand out the ids of the
/// connections it had before.
#[tokio::test]
async fn a_restarted_node_does_not_reuse_connection_ids() {
    let first = node(None, "same", Limits::default()).await;
    let (ws, old) = client(&first, "").await;
    drop(ws);
    first.stop.cancel();
    first.hub.shutdown().await;
    let second = node(None, "same", Limits::default()).await;
    let (ws, new) = client(&second, "").await;
    drop(ws);
    assert_eq!(old.node(), new.node());
    assert!(new.seq() > old.seq(), "{old} then {new}");
    second.stop.cancel();
    second.hub.shutdown().await;
}

/// A WebSocket client that never answers pings is pinged once per heartbeat,
/// then closed once the idle limit has passed on the hub's clock (a raw
/// socket: a WebSocket library answers pings whenever it reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_never_answers_is_closed_idle() {
    let mut limits = Limits::default();
    limits.heartbeat = Duration::from_millis(100);
    limits.ws_idle_timeout = Some(Duration::from_millis(300));
    limits.tcp_idle_timeout = None;
    let n = node(None, "idle", limits).await;
    let mut s = TcpStream::connect(n.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let mut got = Vec::new();
    loop {
        let mut buf = [0u8; 256];
        let k = tokio::time::timeout(STEP, s.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap();
        got.extend_from_slice(&buf[..k]);
        if k == 0 || idle_close(&got) {
            break;
        }
    }
    assert!(idle_close(&got), "closed with 1000 (idle): {got:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(300 + 200 + 1500),
        "closed {elapsed:?} after the upgrade: the keep-alive visits each connection every heartbeat"
    );
    // Empty pings (0x89 0x00), one per heartbeat: about three before the close.
    let pings = got.windows(2).filter(|w| w == &[0x89, 0x00]).count();
    assert!((1..=6).contains(&pings), "{pings} pings in {elapsed:?}");
    n.stop.cancel();
    n.hub.shutdown().await;
}

/// Whether `got` holds a server's close frame with code 1000: 0x88, a short
/// length, then the code.
fn idle_close(got: &[u8]) -> bool {
    got.windows(4)
        .any(|w| w[0] == 0x88 && w[1] < 126 && w[2..] == [0x03, 0xe8])
}

/// A backplane that records the membership changes the node reports and keeps
/// the node's view, to replay it as a broker backplane does after reconnecting.
#[derive(Clone, Default)]
struct Recorder {
    changes: Arc<Mutex<Vec<String>>>,
    view: Arc<Mutex<Option<Arc<dyn LocalView>>>>,
}

#[async_trait]
impl Backplane for Recorder {
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError> {
        *self.view.lock().unwrap() = Some(ctx.local);
        Ok(())
    }
    fn publish(&self, _dest: Dest<'_>, _envelope: Bytes) -> Handoff {
        self.changes.lock().unwrap().push("publish".into());
        Handoff::default()
    }
    fn peers(&self) -> Vec<NodeId> {
        Vec::new()
    }
    fn membership(&self, change: &MembershipChange) {
        self.changes.lock().unwrap().push(describe(change));
    }
    async fn settle(&self) {
        self.changes.lock().unwrap().push("settle".into());
    }
    fn status(&self) -> Status {
        Status::Ready
    }
    fn stats(&self) -> BackplaneStats {
        BackplaneStats::default()
    }
    async fn leave(&self) {}
}

/// A change in a few words, connections by their order of arrival.
fn describe(c: &MembershipChange) -> String {
    let seq = |c: &ConnId| c.seq() % 1000;
    match c {
        MembershipChange::Opened { conn } => format!("open {}", seq(conn)),
        MembershipChange::Closed { conn, .. } => format!("close {}", seq(conn)),
        MembershipChange::Bound {
            conn,
            user,
            first,
            count,
        } => format!("bind {} {user} first={first} n={count}", seq(conn)),
        MembershipChange::Unbound {
            conn,
            user,
            last,
            count,
        } => format!("unbind {} {user} last={last} n={count}", seq(conn)),
        MembershipChange::Joined {
            conn,
            group,
            first,
            count,
        } => format!("join {} {group} first={first} n={count}", seq(conn)),
        MembershipChange::Left {
            conn,
            group,
            last,
            count,
        } => format!("leave {} {group} last={last} n={count}", seq(conn)),
        MembershipChange::Session { conn, session } => {
            format!("session {} {}", seq(conn), session.len())
        }
        _ => format!("{c:?}"),
    }
}

/// What a broker backplane keeps in step: each change the node reports, with
/// first and last member flags, and a replay of the node's current state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backplane_hears_every_membership_change_and_can_replay_the_node() {
    let rec = Recorder::default();
    let hub = Hub::builder()
        .node_id(NodeId::new("rec").unwrap())
        .first_conn_seq(1000)
        .backplane(rec.clone())
        .handler(Bind)
        .start()
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let n = Node {
        addr: listener.local_addr().unwrap(),
        hub: hub.clone(),
        stop: CancellationToken::new(),
    };
    let server = Server::new(hub.clone()).websocket(listener, "/ws");
    let s = n.stop.clone();
    tokio::spawn(async move { server.serve(s.cancelled_owned()).await });

    let (ws0, c0) = client(&n, "uid=u&group=g").await;
    let (_ws1, c1) = client(&n, "uid=u&group=g").await;
    hub.join(&c1, "h").await.unwrap();
    hub.leave(&c1, "h").await.unwrap();
    hub.leave(&c1, "never-joined").await.unwrap();
    hub.set_session(&c1, "k", Some("v".into())).await.unwrap();
    assert_eq!(
        hub.session(&c1)
            .await
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        [("k".to_owned(), "v".to_owned())]
    );
    // A push to a connection of this node concerns no other: not published.
    hub.to_conn(&c1, "here").unwrap();
    hub.to_user("u", "anywhere").unwrap();
    // A local connection that is gone: every operation says so, and nothing
    // is reported.
    let gone = ConnId::new(c1.node().clone(), c1.seq() + 100);
    let no = Err(switchboard::OpError::NoSuchConn(gone.clone()));
    assert_eq!(hub.bind(&gone, "x").await, no);
    assert_eq!(hub.unbind(&gone).await, no);
    assert_eq!(hub.join(&gone, "x").await, no);
    assert_eq!(hub.leave(&gone, "x").await, no);
    assert_eq!(hub.set_session(&gone, "k", None).await, no);
    assert_eq!(hub.session(&gone).await, no.map(|()| Default::default()));
    drop(ws0);
    let deadline = tokio::time::Instant::now() + STEP;
    while hub.stats().conns_open != 1 {
        assert!(tokio::time::Instant::now() < deadline, "not forgotten");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(hub.user_conns("u").await.value, std::slice::from_ref(&c1));
    let changes = rec.changes.lock().unwrap().clone();
    assert_eq!(
        changes,
        [
            // Settled before the connection's first frame...
            "open 0",
            "bind 0 u first=true n=1",
            "join 0 g first=true n=1",
            "settle",
            "open 1",
            "bind 1 u first=false n=2",
            "join 1 g first=false n=2",
            "settle",
            // ... and before each membership operation returns.
            "join 1 h first=true n=1",
            "settle",
            "leave 1 h last=true n=0",
            "settle",
            "settle", // leaving a group never joined changes nothing
            "session 1 1",
            "settle",
            "publish", // to the user, not to the local connection
            "settle",  // the five operations on a gone connection
            "settle",
            "settle",
            "settle",
            "settle",
            "unbind 0 u last=false n=1",
            "leave 0 g last=false n=1",
            "close 0",
        ],
        "{c0} {c1}"
    );

    let mut replayed = Vec::new();
    let view = rec.view.lock().unwrap().clone().expect("joined");
    view.replay(&mut |c| replayed.push(describe(&c)));
    assert_eq!(
        replayed,
        [
            "open 1",
            "session 1 1",
            "bind 1 u first=false n=1",
            "join 1 g first=false n=1",
        ],
        "a replay states the node's state, with totals, not transitions"
    );
    n.stop.cancel();
    hub.shutdown().await;
}

/// A node that replies to every request, but with a refusal instead of an
/// answer, did not answer: it is named missing, never folded in as nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_replies_without_an_answer_is_missing() {
    let bus = MemoryBus::new();
    let a = node(Some(&bus), "a", Limits::default()).await;
    let liar = bus.backplane();
    let liar_id = NodeId::new("liar").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let (_handled, handled_rx) = tokio::sync::watch::channel(0);
    liar.join(JoinContext::new(
        liar_id.clone(),
        tx,
        handled_rx,
        Arc::new(switchboard::core::backplane::NoLocalState),
    ))
    .await
    .unwrap();
    let replies = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            let env = Envelope::decode(&bytes).unwrap();
            if let Body::Request { .. } = env.body {
                let reply = Envelope {
                    origin: liar_id.clone(),
                    id: env.id,
                    body: Body::Reply {
                        result: OpResult::Failed("no".into()),
                    },
                };
                liar.publish(Dest::Node(&env.origin), reply.encode());
            }
        }
    });
    let (_ws, _) = client(&a, "uid=u&group=g").await;
    let count = a.hub.group_count("g").await;
    assert_eq!(count.value, 1, "what a said is kept");
    assert_eq!(count.missing, [NodeId::new("liar").unwrap()]);
    let online = a.hub.is_online("nobody").await;
    assert!(!online.value && !online.is_complete());
    replies.abort();
    a.stop.cancel();
    a.hub.shutdown().await;
}

/// Records the events a worker hands its hub for connections held elsewhere.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl Handler for Events {
    async fn on_message(&self, _hub: &Hub, conn: &ConnId, frame: switchboard::Frame) {
        let text = frame.as_text().unwrap_or_default().to_owned();
        self.0
            .lock()
            .unwrap()
            .push(format!("message {} {text}", conn.seq()));
    }
    async fn on_close(&self, _hub: &Hub, conn: &ConnId, reason: &switchboard::CloseReason) {
        self.0
            .lock()
            .unwrap()
            .push(format!("close {} {reason:?}", conn.seq()));
    }
}

/// A gateway worker runs the application for connections held by gateways:
/// their events reach the handler through the hub, and a gateway lists its
/// own connections from the hub.
#[tokio::test]
async fn events_of_connections_held_elsewhere_reach_the_handler() {
    let events = Events::default();
    let hub = Hub::builder()
        .handler(events.clone())
        .start()
        .await
        .unwrap();
    let elsewhere = ConnId::new(NodeId::new("gw").unwrap(), 7);
    hub.handle_message(&elsewhere, switchboard::Frame::text("hi"))
        .await;
    hub.handle_close(&elsewhere, &switchboard::CloseReason::Kicked("bye".into()))
        .await;
    assert_eq!(
        *events.0.lock().unwrap(),
        ["message 7 hi", "close 7 Kicked(\"bye\")"]
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let n = Node {
        addr: listener.local_addr().unwrap(),
        hub: Hub::builder().handler(Bind).start().await.unwrap(),
        stop: CancellationToken::new(),
    };
    let server = Server::new(n.hub.clone()).websocket(listener, "/ws");
    let s = n.stop.clone();
    tokio::spawn(async move { server.serve(s.cancelled_owned()).await });
    let (ws, conn) = client(&n, "uid=u&group=g").await;
    let mut listed = Vec::new();
    n.hub.for_each_local(&mut |c| listed.push(describe(&c)));
    let seq = conn.seq() % 1000;
    assert_eq!(
        listed,
        [
            format!("open {seq}"),
            format!("bind {seq} u first=false n=1"),
            format!("join {seq} g first=false n=1"),
        ]
    );
    drop(ws);
    n.stop.cancel();
    n.hub.shutdown().await;
    hub.shutdown().await;
}

/// A push reports the frames a full outbox did not take, under either
/// policy. One thread, so the connection's writer cannot drain the outbox
/// between the pushes.
#[tokio::test]
async fn a_push_reports_what_full_outboxes_did_not_take() {
    for policy in [
        switchboard::SlowConsumer::Close,
        switchboard::SlowConsumer::DropNewest,
    ] {
        let mut limits = Limits::default();
        limits.outbox_frames = 4;
        limits.slow_consumer = policy;
        let n = node(None, "full", limits).await;
        let (ws, _) = client(&n, "uid=u").await;
        let (mut queued, mut dropped) = (0, 0);
        for i in 0..10 {
            let r = n.hub.to_user("u", format!("{i}")).unwrap();
            queued += r.local;
            dropped += r.local_dropped;
        }
        assert_eq!(queued, 4, "{policy:?}");
        match policy {
            // The frame that overflowed closes the connection; later ones
            // find it closing and are not counted against it.
            switchboard::SlowConsumer::Close => {
                assert_eq!(dropped, 1);
                // The node counts what the client lost: that frame and the
                // four it never got to write.
                let s = wait_for(&n.hub, |s| s.slow_consumers_closed == 1).await;
                assert_eq!(s.closes.slow_consumer, 1);
                assert_eq!(s.frames_dropped_by.slow_consumer, 5);
                assert_eq!(s.frames_dropped_by.queue_full, 0);
            }
            _ => {
                assert_eq!(dropped, 6, "every frame past the cap");
                let s = n.hub.stats();
                assert_eq!((s.frames_dropped_by.queue_full, s.frames_dropped), (6, 6));
                assert_eq!(s.frames_dropped_by.slow_consumer, 0);
            }
        }
        drop(ws);
        n.stop.cancel();
        n.hub.shutdown().await;
    }
}

/// The node's stats once `done` holds of them (within [`STEP`]).
async fn wait_for(
    hub: &Hub,
    done: impl Fn(&switchboard::HubStats) -> bool,
) -> switchboard::HubStats {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let s = hub.stats();
        if done(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "stats stayed {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every counter of connections, pushes and frames moves with what it
/// counts, on both transports.
#[tokio::test]
async fn the_counters_follow_connections_pushes_and_frames() {
    let n = node(None, "counted", Limits::default()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = listener.local_addr().unwrap();
    let tcp = Server::new(n.hub.clone()).tcp(
        listener,
        switchboard::TcpOptions::new(switchboard::core::framing::Framing::Line),
    );
    tokio::spawn(tcp.serve(n.stop.clone().cancelled_owned()));

    let (mut ws, ws_id) = client(&n, "uid=u&group=g").await;
    let mut line = tokio::io::BufReader::new(TcpStream::connect(tcp_addr).await.unwrap());
    let mut greeting = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut line, &mut greeting)
        .await
        .unwrap();
    let s = n.hub.stats();
    assert_eq!((s.conns_open_by.websocket, s.conns_open_by.tcp), (1, 1));
    assert_eq!((s.conns_opened_by.websocket, s.conns_opened_by.tcp), (1, 1));
    assert_eq!(s.conns_opened, 2);

    // One push of each kind; the WebSocket client gets all five, the TCP
    // one the push to everyone.
    n.hub.to_conn(&ws_id, "conn").unwrap();
    n.hub.to_user("u", "user").unwrap();
    n.hub.to_group("g", "group").unwrap();
    n.hub.to_all("all").unwrap();
    n.hub
        .push(&Target::user("u").and_group("g"), "mixed")
        .unwrap();
    n.hub.push(&Target::none(), "nobody").unwrap();
    for want in ["conn", "user", "group", "all", "mixed"] {
        assert_eq!(next(&mut ws).await.as_deref(), Some(want));
    }
    let mut all = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut line, &mut all)
        .await
        .unwrap();
    assert_eq!(all, "all\n");
    let p = n.hub.stats().pushes;
    assert_eq!((p.conn, p.user, p.group, p.all, p.mixed), (1, 1, 1, 1, 1));
    // Two greetings and six frames written, as queued.
    let s = wait_for(&n.hub, |s| s.frames_written == 8).await;
    assert_eq!(s.frames_queued, 6);

    // The client closes; the TCP connection is kicked.
    ws.close(None).await.unwrap();
    wait_for(&n.hub, |s| s.conns_open_by.websocket == 0).await;
    n.hub.close(&Target::all(), "bye");
    let s = wait_for(&n.hub, |s| s.conns_open_by.tcp == 0).await;
    assert_eq!(
        (s.closes.client, s.closes.kicked, s.conns_closed),
        (1, 1, 2)
    );
    assert_eq!(s.closes.slow_consumer + s.closes.shutdown + s.closes.io, 0);
    n.stop.cancel();
    n.hub.shutdown().await;
}

/// Shutting a node down closes its clients with "going away".
#[tokio::test]
async fn shutdown_closes_every_client_going_away() {
    let n = node(None, "bye", Limits::default()).await;
    let (mut ws, _) = client(&n, "uid=u").await;
    let hub = n.hub.clone();
    let shutdown = tokio::spawn(async move { hub.shutdown().await });
    let code = loop {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(cf))) => break cf.map(|c| u16::from(c.code)),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, Some(1001));
    drop(ws);
    shutdown.await.unwrap();
    n.stop.cancel();
}

/// The inbound queue between two nodes absorbs a burst: 5,000 pushes made
/// while the receiving node cannot run (one thread, no await) all arrive.
#[tokio::test]
async fn a_burst_between_two_nodes_is_not_dropped() {
    let bus = MemoryBus::new();
    let a = node(Some(&bus), "a", Limits::default()).await;
    let b = node(Some(&bus), "b", Limits::default()).await;
    for i in 0..5_000 {
        let r = a.hub.to_user("nobody", format!("{i}")).unwrap();
        assert_eq!(r.remote.dropped, 0, "push {i} dropped");
    }
    assert_eq!(a.hub.stats().backplane.publish_dropped, 0);
    for n in [a, b] {
        n.stop.cancel();
        n.hub.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_stop_at_the_cap_on_any_node_and_bad_names_are_refused() {
    let bus = MemoryBus::new();
    let mut limits = Limits::default();
    limits.max_groups_per_conn = 3;
    let a = node(Some(&bus), "ca", limits.clone()).await;
    let b = node(Some(&bus), "cb", limits).await;
    let (_ws, conn) = client(&a, "uid=u&group=g0").await;
    for g in ["g1", "g2", "g1"] {
        a.hub.join(&conn, g).await.unwrap();
    }
    // The fourth distinct group is refused, by the node holding the
    // connection, whether asked there or from another node.
    for hub in [&a.hub, &b.hub] {
        let e = hub.join(&conn, "g3").await.unwrap_err();
        assert!(
            matches!(&e, switchboard::OpError::Refused(r) if r.contains("at most 3")),
            "{e}"
        );
    }
    assert_eq!(a.hub.stats().ops_refused, 2);
    assert_eq!(a.hub.group_count("g3").await.value, 0);
    // Leaving makes room again.
    a.hub.leave(&conn, "g0").await.unwrap();
    b.hub.join(&conn, "g3").await.unwrap();
    assert_eq!(a.hub.group_count("g3").await.value, 1);
    for bad in ["", "a\u{1}b"] {
        let e = a.hub.join(&conn, bad).await.unwrap_err();
        assert!(matches!(e, switchboard::OpError::Refused(_)), "{e}");
    }
    let long = "x".repeat(256);
    assert!(a.hub.bind(&conn, long.as_str()).await.is_err());
    assert!(
        a.hub
            .update_session(&conn, vec![(long, Some("v".into()))])
            .await
            .is_err()
    );
    a.stop.cancel();
    b.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_is_refused_then_closed_with_1008() {
    struct Counting(Arc<Mutex<(u32, u32)>>);
    #[async_trait]
    impl Handler for Counting {
        async fn on_message(&self, _hub: &Hub, _conn: &ConnId, _f: switchboard::Frame) {
            self.0.lock().unwrap().0 += 1;
        }
        async fn on_rate_limited(&self, _hub: &Hub, _conn: &ConnId) {
            self.0.lock().unwrap().1 += 1;
        }
    }
    let seen = Arc::new(Mutex::new((0, 0)));
    let mut limits = Limits::default();
    limits.message_rate = Some(switchboard::RateLimit {
        per_second: 5.0,
        burst: 10.0,
    });
    let hub = Hub::builder()
        .limits(limits)
        .handler(Counting(seen.clone()))
        .start()
        .await
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = Server::new(hub.clone()).websocket(listener, "/ws");
    tokio::spawn(server.serve(stop.clone().cancelled_owned()));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    use futures_util::SinkExt;
    // Far over the rate: the burst is handled, the excess refused, and the
    // connection closed once the excess runs past another burst.
    let mut sent = 0;
    while sent < 100 && ws.send(Message::text("m")).await.is_ok() {
        sent += 1;
    }
    let close = tokio::time::timeout(STEP, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => return c,
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    let code = close.map(|c| u16::from(c.code));
    assert_eq!(code, Some(1008));
    let (handled, refused) = *seen.lock().unwrap();
    assert!((10..=11).contains(&handled), "{handled} handled");
    assert!(refused >= 10, "{refused} refused");
    let s = hub.stats();
    assert_eq!(s.policy_closed, 1);
    assert_eq!(s.messages_rate_limited, u64::from(refused) + 1);
    stop.cancel();
}
