//! The gateway carrying out GatewayWorker's commands, in one process: a
//! [`Gateway`] with its hub serving WebSocket clients, a worker link on the
//! inner port that learns each client's connection id from its
//! `CMD_ON_CONNECT`, and a second inner connection that writes commands and
//! reads query replies, as `Lib\Gateway` does.
//!
//! Commands written on one inner connection are carried out in order and a
//! push to one client keeps its order, so a marker pushed to a client after
//! some commands ends exactly what those commands sent it: each check names
//! who gets a push and, as precisely, who does not. Membership and session
//! commands are checked through the query commands, whose replies are read
//! with the crate's own reply decoder and compared whole, shape included.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use switchboard::{CloseReason, ConnId, ConnectInfo, Decision, Handler, Hub, Server, async_trait};
use switchboard_gateway::ext::FLAG_BINARY;
use switchboard_gateway::protocol::php::{self, Array, Key, Value};
use switchboard_gateway::protocol::query::{
    Condition, Id, IdList, ReplyDecoder, Select, SendToAll, SendToGroup,
};
use switchboard_gateway::protocol::{Frame, FrameDecoder, cmd};
use switchboard_gateway::{Gateway, GatewayConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

/// How long any one awaited step may take.
const STEP: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {STEP:?}"))
}

/// The gateway's own application, reporting each connection whose close it
/// has handled: with no worker attached, that close waits in the gateway's
/// hold buffer while the hub has already forgotten the connection.
struct Observed {
    gateway: Arc<dyn Handler>,
    closed: mpsc::UnboundedSender<u32>,
}

#[async_trait]
impl Handler for Observed {
    async fn on_connect(&self, hub: &Hub, info: &ConnectInfo) -> Decision {
        self.gateway.on_connect(hub, info).await
    }

    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: switchboard::Frame) {
        self.gateway.on_message(hub, conn, frame).await;
    }

    async fn on_close(&self, hub: &Hub, conn: &ConnId, reason: &CloseReason) {
        self.gateway.on_close(hub, conn, reason).await;
        let _ = self.closed.send(conn.seq() as u32);
    }
}

/// What a client received.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    Closed,
}

fn texts(t: &[&str]) -> Vec<Got> {
    t.iter().map(|s| Got::Text((*s).to_owned())).collect()
}

/// A WebSocket client of the gateway and its connection id there.
struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    id: u32,
}

impl Client {
    async fn recv(&mut self) -> Got {
        within("frame for a client", async {
            loop {
                return match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => Got::Text(t.as_str().to_owned()),
                    Some(Ok(Message::Binary(b))) => Got::Binary(b.to_vec()),
                    Some(Ok(Message::Close(_)) | Err(_)) | None => Got::Closed,
                    Some(Ok(_)) => continue,
                };
            }
        })
        .await
    }

    /// Expects the server's close, and answers it (reading on until the end
    /// sends the close reply) so the gateway sees the close completed at once.
    async fn expect_closed(&mut self) {
        assert_eq!(self.recv().await, Got::Closed, "client {}", self.id);
        within("end of a closed client", async {
            while self.ws.next().await.is_some() {}
        })
        .await;
    }
}

/// The worker link: it receives the clients' events.
struct WorkerLink {
    events: FramedRead<OwnedReadHalf, FrameDecoder>,
    write: OwnedWriteHalf,
}

impl WorkerLink {
    /// Attaches as a GatewayWorker worker (no switchboard extensions), so the
    /// gateway accepts clients at once and reports them with `CMD_ON_CONNECT`.
    async fn attach(inner: SocketAddr) -> Self {
        let stream = TcpStream::connect(inner).await.expect("inner port");
        stream.set_nodelay(true).expect("nodelay");
        let (read, mut write) = stream.into_split();
        let mut b = BytesMut::new();
        Frame::worker_connect("commands:0", "").encode(&mut b);
        write.write_all(&b).await.expect("worker connect");
        Self {
            events: FramedRead::new(read, FrameDecoder::default()),
            write,
        }
    }

    /// The next event `want` accepts; others are skipped.
    async fn next(&mut self, what: &str, want: impl Fn(&Frame) -> bool) -> Frame {
        within(what, async {
            loop {
                let f = self
                    .events
                    .next()
                    .await
                    .expect("worker link open")
                    .expect("a well-formed frame");
                if want(&f) {
                    return f;
                }
            }
        })
        .await
    }

    /// Closes the link and waits until the gateway has let it go: it shuts
    /// its side only after detaching the worker.
    async fn detach(mut self) {
        self.write.shutdown().await.expect("shutdown");
        within("end of the worker link", async {
            while self.events.next().await.is_some() {}
        })
        .await;
    }
}

/// An inner connection that writes commands and reads replies.
struct Inner {
    write: OwnedWriteHalf,
    replies: FramedRead<OwnedReadHalf, ReplyDecoder>,
}

static MARKERS: AtomicU64 = AtomicU64::new(0);

impl Inner {
    async fn connect(inner: SocketAddr) -> Self {
        let stream = TcpStream::connect(inner).await.expect("inner port");
        stream.set_nodelay(true).expect("nodelay");
        let (read, write) = stream.into_split();
        Self {
            write,
            replies: FramedRead::new(read, ReplyDecoder::default()),
        }
    }

    async fn send(&mut self, f: &Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        self.write.write_all(&b).await.expect("write a command");
    }

    /// A query and its decoded reply.
    async fn ask(&mut self, f: &Frame) -> Value {
        self.send(f).await;
        within(cmd::name(f.header.cmd), self.replies.next())
            .await
            .expect("the gateway answers")
            .expect("a well-formed reply")
    }

    /// Pushes a fresh marker to `c` and returns what `c` received before it.
    async fn fence(&mut self, c: &mut Client) -> Vec<Got> {
        let marker = format!("marker-{}", MARKERS.fetch_add(1, Ordering::Relaxed));
        self.send(&Frame::to_gateway(
            cmd::SEND_TO_ONE,
            c.id,
            "",
            marker.clone(),
        ))
        .await;
        let mut got = Vec::new();
        loop {
            match c.recv().await {
                Got::Text(t) if t == marker => return got,
                Got::Closed => panic!("client {} closed before its marker: {got:?}", c.id),
                other => got.push(other),
            }
        }
    }
}

/// A gateway serving WebSocket clients, a worker link and a command link.
struct Node {
    ws: SocketAddr,
    worker: Option<WorkerLink>,
    inner: Inner,
    /// Connections whose close the gateway has handled.
    closed: mpsc::UnboundedReceiver<u32>,
    stop: CancellationToken,
    /// A register that never answers: the gateway's link to it waits
    /// quietly in the listen backlog, and inner-port commands need no register.
    _register: TcpListener,
}

impl Node {
    async fn start() -> Self {
        let register = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let inner_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let inner = inner_l.local_addr().expect("address");
        let gw = Gateway::new(GatewayConfig::new(
            Ipv4Addr::LOCALHOST,
            inner.port(),
            register.local_addr().expect("address").to_string(),
        ));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        // Connection ids start at 1, as on every gateway: 0 means none.
        let hub = Hub::builder()
            .node_id(gw.node_id())
            .first_conn_seq(1)
            .handler_arc(Arc::new(Observed {
                gateway: gw.handler(),
                closed: closed_tx,
            }))
            .start()
            .await
            .expect("hub");
        let ws_l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ws = ws_l.local_addr().expect("address");
        gw.set_client_port(ws.port());
        let stop = CancellationToken::new();
        tokio::spawn(
            Server::new(hub.clone())
                .websocket(ws_l, "/")
                .serve(stop.clone().cancelled_owned()),
        );
        tokio::spawn({
            let stop = stop.clone();
            async move { gw.run(hub, inner_l, stop).await }
        });
        Self {
            ws,
            worker: Some(WorkerLink::attach(inner).await),
            inner: Inner::connect(inner).await,
            closed,
            stop,
            _register: register,
        }
    }

    fn worker(&mut self) -> &mut WorkerLink {
        self.worker.as_mut().expect("a worker attached")
    }

    /// A new client; its id is that of the next `CMD_ON_CONNECT` (clients
    /// connect one at a time). The hub registers a WebSocket connection
    /// before its handshake completes, so pushes reach it from here on.
    async fn client(&mut self) -> Client {
        let url = format!("ws://{}/", self.ws);
        let (ws, _) = within("WebSocket handshake", tokio_tungstenite::connect_async(url))
            .await
            .expect("handshake");
        let f = self
            .worker()
            .next("CMD_ON_CONNECT", |f| f.header.cmd == cmd::ON_CONNECT)
            .await;
        Client {
            ws,
            id: f.header.connection_id,
        }
    }

    async fn clients<const N: usize>(&mut self) -> [Client; N] {
        let mut v = Vec::new();
        for _ in 0..N {
            v.push(self.client().await);
        }
        v.try_into().unwrap_or_else(|_| unreachable!())
    }

    async fn send(&mut self, c: u8, id: u32, ext: impl Into<Bytes>) {
        self.inner.send(&Frame::to_gateway(c, id, ext, "")).await;
    }

    async fn ask(&mut self, c: u8, id: u32, ext: impl Into<Bytes>) -> Value {
        self.inner.ask(&Frame::to_gateway(c, id, ext, "")).await
    }

    async fn push(&mut self, c: u8, id: u32, ext: impl Into<Bytes>, body: &str) {
        self.inner
            .send(&Frame::to_gateway(c, id, ext, body.to_owned()))
            .await;
    }

    /// What each client received since its last marker, in client order.
    async fn fenced(&mut self, clients: &mut [Client]) -> Vec<Vec<Got>> {
        let mut out = Vec::new();
        for c in clients {
            out.push(self.inner.fence(c).await);
        }
        out
    }

    /// Waits for the gateway to report `ids` closed to its worker.
    async fn closed_on_worker(&mut self, ids: &[u32]) {
        let mut left: Vec<u32> = ids.to_vec();
        while !left.is_empty() {
            let f = self
                .worker()
                .next("CMD_ON_CLOSE", |f| f.header.cmd == cmd::ON_CLOSE)
                .await;
            left.retain(|&i| i != f.header.connection_id);
        }
    }

    async fn online(&mut self, id: u32) -> Value {
        self.ask(cmd::IS_ONLINE, id, "").await
    }

    async fn count(&mut self, group: &str) -> Value {
        self.ask(cmd::GET_CLIENT_COUNT_BY_GROUP, 0, group.to_owned())
            .await
    }

    async fn conns_of(&mut self, uid: &str) -> Vec<u32> {
        let v = self.ask(cmd::GET_CLIENT_ID_BY_UID, 0, uid.to_owned()).await;
        id_list(&v)
    }

    async fn group_ids(&mut self) -> Value {
        self.ask(cmd::GET_GROUP_ID_LIST, 0, "").await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A reply that must be a PHP list of connection ids, as a sorted list (the
/// gateway lists a uid's connections in no set order).
fn id_list(v: &Value) -> Vec<u32> {
    let a = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v:?}"));
    assert!(a.is_list(), "not a list: {v:?}");
    let mut ids: Vec<u32> = a
        .values()
        .map(|i| {
            i.as_int()
                .and_then(|i| u32::try_from(i).ok())
                .unwrap_or_else(|| panic!("not a connection id: {v:?}"))
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// A reply that must be an array, as its entries sorted by key.
fn entries(v: &Value) -> Vec<(Key, Value)> {
    let mut e = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v:?}"))
        .clone()
        .into_pairs();
    e.sort_by(|a, b| a.0.cmp(&b.0));
    e
}

fn array<K: Into<Key>, V: Into<Value>>(pairs: impl IntoIterator<Item = (K, V)>) -> Value {
    Value::Array(pairs.into_iter().collect())
}

fn list<V: Into<Value>>(values: impl IntoIterator<Item = V>) -> Value {
    Value::Array(Array::list(values))
}

fn uids(u: &[&str]) -> Vec<u8> {
    IdList(u.iter().map(|&s| Id::from(s)).collect()).encode()
}

/// `CMD_SEND_TO_ONE` delivers the body to its one client, as text or, with
/// the binary flag, as binary; `CMD_SEND_TO_ALL` reaches every client, only
/// the listed ones, or all but the excluded ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_one_and_to_all_reach_exactly_their_clients() {
    let mut n = Node::start().await;
    let mut cl: [Client; 3] = n.clients().await;
    let [a, b, c] = [cl[0].id, cl[1].id, cl[2].id];

    n.push(cmd::SEND_TO_ONE, a, "", "one").await;
    let mut binary = Frame::to_gateway(cmd::SEND_TO_ONE, b, "", "bin");
    binary.header.flag |= FLAG_BINARY;
    n.inner.send(&binary).await;
    n.push(cmd::SEND_TO_ALL, 0, SendToAll::All.encode(), "all")
        .await;
    let some = SendToAll::Connections(vec![a, c]).encode();
    n.push(cmd::SEND_TO_ALL, 0, some, "some").await;
    let but_b = SendToAll::Exclude(vec![b]).encode();
    n.push(cmd::SEND_TO_ALL, 0, but_b, "all-but-b").await;

    let got = n.fenced(&mut cl).await;
    assert_eq!(got[0], texts(&["one", "all", "some", "all-but-b"]));
    assert_eq!(
        got[1],
        [Got::Binary(b"bin".to_vec()), Got::Text("all".into())]
    );
    assert_eq!(got[2], texts(&["all", "some", "all-but-b"]));
}

/// `CMD_SEND_TO_UID` reaches every connection of every listed uid, numbers
/// included; `CMD_SEND_TO_GROUP` reaches the members of several groups once
/// each, and leaves out the excluded connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_uid_and_to_group_reach_members_but_the_excluded() {
    let mut n = Node::start().await;
    let mut cl: [Client; 6] = n.clients().await;
    let id: Vec<u32> = cl.iter().map(|c| c.id).collect();
    // a: alice in g1 and g2; b: bob in g1; c: alice in g3; d: g2 only;
    // e: uid 5; f: nothing.
    for (i, uid) in [(0, "alice"), (1, "bob"), (2, "alice"), (4, "5")] {
        n.send(cmd::BIND_UID, id[i], uid).await;
    }
    for (i, g) in [(0, "g1"), (0, "g2"), (1, "g1"), (2, "g3"), (3, "g2")] {
        n.send(cmd::JOIN_GROUP, id[i], g).await;
    }

    let to_uids = IdList(vec![Id::from("alice"), Id::from("bob")]).encode();
    n.push(cmd::SEND_TO_UID, 0, to_uids, "uids").await;
    // PHP sends an integer uid as a JSON number.
    n.push(
        cmd::SEND_TO_UID,
        0,
        IdList(vec![Id::Int(5)]).encode(),
        "five",
    )
    .await;
    let groups = SendToGroup {
        groups: vec![Id::from("g1"), Id::from("g2")],
        exclude: None,
    };
    n.push(cmd::SEND_TO_GROUP, 0, groups.encode(), "groups")
        .await;
    let groups_but = SendToGroup {
        groups: vec![Id::from("g1"), Id::from("g2"), Id::from("g3")],
        exclude: Some(vec![id[0], id[3]]),
    };
    n.push(cmd::SEND_TO_GROUP, 0, groups_but.encode(), "groups-but")
        .await;

    let got = n.fenced(&mut cl).await;
    let want: [&[&str]; 6] = [
        &["uids", "groups"],
        &["uids", "groups", "groups-but"],
        &["uids", "groups-but"],
        &["groups"],
        &["five"],
        &[],
    ];
    for (i, w) in want.iter().enumerate() {
        assert_eq!(got[i], texts(w), "client {i}");
    }
}

/// `CMD_KICK` sends its goodbye (a scalar body) first, or nothing when the
/// body is a serialized null, then closes; `CMD_DESTROY` closes at once.
/// Each closes only its own client, which the worker hears of and which is
/// then offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_and_destroy_close_only_their_client() {
    let mut n = Node::start().await;
    let [mut a, mut b, mut c, d] = n.clients().await;

    n.inner
        .send(&Frame::to_gateway_value(cmd::KICK, a.id, "", &"bye".into()))
        .await;
    assert_eq!(a.recv().await, Got::Text("bye".into()));
    a.expect_closed().await;

    // `Gateway::closeClient($id)`: flag 0, body `N;`.
    let kick = Frame::to_gateway_value(cmd::KICK, b.id, "", &Value::Null);
    assert_eq!((kick.header.flag, &kick.body[..]), (0, &b"N;"[..]));
    n.inner.send(&kick).await;
    b.expect_closed().await;

    n.push(cmd::DESTROY, c.id, "", "ignored").await;
    c.expect_closed().await;

    n.closed_on_worker(&[a.id, b.id, c.id]).await;
    for gone in [a.id, b.id, c.id] {
        assert_eq!(n.online(gone).await, Value::Int(0), "client {gone}");
    }
    assert_eq!(n.online(d.id).await, Value::Int(1));
    let mut rest = [d];
    assert_eq!(n.fenced(&mut rest).await, [Vec::<Got>::new()]);
}

/// `CMD_IS_ONLINE` answers 1 for a client the gateway holds and 0 for an
/// unknown id, and 0 too for a client that has gone while its close event
/// still waits for a worker (the gateway still knows its session then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_online_follows_the_hub() {
    let mut n = Node::start().await;
    let [mut a, b] = n.clients().await;
    assert_eq!(n.online(a.id).await, Value::Int(1));
    assert_eq!(n.online(b.id).await, Value::Int(1));
    assert_eq!(n.online(b.id + 100).await, Value::Int(0));

    n.worker.take().expect("worker").detach().await;
    a.ws.close(None).await.expect("close");
    let closed = within("close handled", n.closed.recv()).await;
    assert_eq!(closed, Some(a.id));
    assert_eq!(n.online(a.id).await, Value::Int(0));
    assert_eq!(n.online(b.id).await, Value::Int(1));
}

/// `CMD_BIND_UID`, `CMD_UNBIND_UID` (whatever uid it carries),
/// `CMD_JOIN_GROUP`, `CMD_LEAVE_GROUP` and `CMD_UNGROUP`, seen through the
/// uid and group queries; an empty group name counts every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_commands_show_in_the_queries() {
    let mut n = Node::start().await;
    let mut cl: [Client; 4] = n.clients().await;
    let [a, b, c] = [cl[0].id, cl[1].id, cl[2].id];

    assert_eq!(
        n.ask(cmd::GET_CLIENT_ID_BY_UID, 0, "alice").await,
        list::<Value>([])
    );
    n.send(cmd::BIND_UID, a, "alice").await;
    n.send(cmd::BIND_UID, b, "alice").await;
    n.send(cmd::BIND_UID, c, "bob").await;
    assert_eq!(n.conns_of("alice").await, [a, b]);
    assert_eq!(n.conns_of("bob").await, [c]);
    assert!(n.conns_of("nobody").await.is_empty());

    let batch = n
        .ask(
            cmd::BATCH_GET_CLIENT_ID_BY_UID,
            0,
            uids(&["alice", "bob", "nobody"]),
        )
        .await;
    let batch = batch.as_array().expect("an array");
    let keys: Vec<&Key> = batch.keys().collect();
    assert_eq!(
        keys,
        [&Key::from("alice"), &Key::from("bob"), &Key::from("nobody")]
    );
    let got: Vec<Vec<u32>> = batch.values().map(id_list).collect();
    assert_eq!(got, [vec![a, b], vec![c], vec![]]);

    // GatewayWorker unbinds the connection from whatever uid it has.
    n.send(cmd::UNBIND_UID, b, "someone-else").await;
    assert_eq!(n.conns_of("alice").await, [a]);

    for (i, g) in [(a, "g1"), (b, "g1"), (b, "g2"), (c, "g2")] {
        n.send(cmd::JOIN_GROUP, i, g).await;
    }
    assert_eq!(n.count("g1").await, Value::Int(2));
    assert_eq!(n.count("g2").await, Value::Int(2));
    assert_eq!(n.count("nope").await, Value::Int(0));
    assert_eq!(n.count("").await, Value::Int(4));
    let counts = n
        .ask(
            cmd::BATCH_GET_CLIENT_COUNT_BY_GROUP,
            0,
            uids(&["g2", "nope", "g1"]),
        )
        .await;
    assert_eq!(counts, array([("g2", 2), ("nope", 0), ("g1", 2)]));
    assert_eq!(n.group_ids().await, list(["g1", "g2"]));

    n.send(cmd::LEAVE_GROUP, b, "g1").await;
    assert_eq!(n.count("g1").await, Value::Int(1));
    assert_eq!(n.count("g2").await, Value::Int(2));
    n.send(cmd::UNGROUP, 0, "g2").await;
    assert_eq!(n.count("g2").await, Value::Int(0));
    assert_eq!(n.count("g1").await, Value::Int(1));
    assert_eq!(n.group_ids().await, list(["g1"]));
    assert_eq!(n.count("").await, Value::Int(4));

    let to = |g: &[&str]| {
        SendToGroup {
            groups: g.iter().map(|&s| Id::from(s)).collect(),
            exclude: None,
        }
        .encode()
    };
    n.push(cmd::SEND_TO_GROUP, 0, to(&["g2"]), "g2").await;
    n.push(cmd::SEND_TO_GROUP, 0, to(&["g1"]), "g1").await;
    let got = n.fenced(&mut cl).await;
    assert_eq!(got, [texts(&["g1"]), vec![], vec![], vec![]]);
}

/// PHP's `empty()`: a uid or group of `""` or `"0"` is ignored by bind,
/// join, leave and ungroup, while `"00"` is an ordinary name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_uids_and_groups_are_ignored_like_php() {
    let mut n = Node::start().await;
    let [a, b] = n.clients().await;
    let (a, b) = (a.id, b.id);

    n.send(cmd::BIND_UID, a, "alice").await;
    n.send(cmd::BIND_UID, a, "0").await;
    n.send(cmd::BIND_UID, a, "").await;
    n.send(cmd::BIND_UID, b, "00").await;
    assert_eq!(n.conns_of("alice").await, [a]);
    assert!(n.conns_of("0").await.is_empty());
    assert_eq!(n.conns_of("00").await, [b]);

    n.send(cmd::JOIN_GROUP, a, "g").await;
    n.send(cmd::JOIN_GROUP, b, "00").await;
    for nothing in ["", "0"] {
        n.send(cmd::JOIN_GROUP, a, nothing).await;
        n.send(cmd::LEAVE_GROUP, a, nothing).await;
        n.send(cmd::UNGROUP, 0, nothing).await;
    }
    assert_eq!(n.group_ids().await, list(["00", "g"]));
    assert_eq!(n.count("g").await, Value::Int(1));
    n.send(cmd::LEAVE_GROUP, b, "00").await;
    assert_eq!(n.group_ids().await, list(["g"]));
}

/// Sessions as GatewayWorker keeps them: `CMD_SET_SESSION` stores the bytes
/// as they come, `CMD_UPDATE_SESSION` merges recursively or, over nothing
/// (`""` or `"0"`), stores the update as it came, and keeps a stored session
/// it cannot read. `CMD_GET_SESSION_BY_CLIENT_ID` reads one back (an empty
/// array for nothing, null for no such client); the listing queries give the
/// stored strings of a group's members and of every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_stored_merged_and_listed() {
    let mut n = Node::start().await;
    let [a, b, c] = n.clients().await;
    let (a, b, c) = (a.id, b.id, c.id);
    let get = |id| Frame::to_gateway(cmd::GET_SESSION_BY_CLIENT_ID, id, "", "");

    assert_eq!(n.inner.ask(&get(a)).await, array::<&str, Value>([]));
    assert_eq!(n.inner.ask(&get(c + 100)).await, Value::Null);

    let stored = array([
        ("user", array([("name", "ann"), ("lang", "fr")])),
        ("n", 1.into()),
    ]);
    n.send(cmd::SET_SESSION, a, php::to_bytes(&stored)).await;
    assert_eq!(n.inner.ask(&get(a)).await, stored);
    let update = array([
        ("user", array([("lang", "de"), ("tz", "UTC")])),
        ("m", 2.into()),
    ]);
    n.send(cmd::UPDATE_SESSION, a, php::to_bytes(&update)).await;
    let merged = array([
        (
            "user",
            array([("name", "ann"), ("lang", "de"), ("tz", "UTC")]),
        ),
        ("n", 1.into()),
        ("m", 2.into()),
    ]);
    assert_eq!(n.inner.ask(&get(a)).await, merged);

    // "0" is nothing to PHP's `!$session`: it reads back as an empty array
    // and an update replaces it.
    n.send(cmd::SET_SESSION, b, "0").await;
    assert_eq!(n.inner.ask(&get(b)).await, array::<&str, Value>([]));
    n.send(cmd::UPDATE_SESSION, b, php::to_bytes(&update)).await;
    assert_eq!(n.inner.ask(&get(b)).await, update);

    // An unreadable session stays as it was.
    n.send(cmd::SET_SESSION, c, "not php").await;
    n.send(cmd::UPDATE_SESSION, c, php::to_bytes(&update)).await;

    n.send(cmd::JOIN_GROUP, a, "g").await;
    n.send(cmd::JOIN_GROUP, b, "g").await;
    let by_group = n.ask(cmd::GET_CLIENT_SESSIONS_BY_GROUP, 0, "g").await;
    let s = |v: &Value| Value::Str(Bytes::from(php::to_bytes(v)));
    assert_eq!(
        entries(&by_group),
        [(Key::from(a), s(&merged)), (Key::from(b), s(&update))]
    );
    let nobody = n.ask(cmd::GET_CLIENT_SESSIONS_BY_GROUP, 0, "nope").await;
    assert_eq!(nobody, array::<&str, Value>([]));
    let all = n.ask(cmd::GET_ALL_CLIENT_SESSIONS, 0, "").await;
    assert_eq!(
        all,
        array([(a, s(&merged)), (b, s(&update)), (c, "not php".into())])
    );
}

/// `CMD_SELECT`: the asked fields (unknown ones null) of every client when
/// there is no condition, else of the clients matching any condition: a uid,
/// a group or a connection id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_returns_the_fields_of_the_matching_clients() {
    let mut n = Node::start().await;
    let [a, b, c, d] = n.clients().await;
    let (a, b, c, d) = (a.id, b.id, c.id, d.id);
    // a: alice in g1 and g2, with a session; b: bob in g2; c: g3; d: nothing.
    n.send(cmd::BIND_UID, a, "alice").await;
    n.send(cmd::BIND_UID, b, "bob").await;
    for (i, g) in [(a, "g2"), (a, "g1"), (b, "g2"), (c, "g3")] {
        n.send(cmd::JOIN_GROUP, i, g).await;
    }
    n.send(cmd::SET_SESSION, a, "s-a").await;

    let select = |fields: &[&str], conditions: Vec<Condition>| Select {
        fields: fields.iter().map(|&f| f.to_owned()).collect(),
        conditions,
    };
    let all = select(&["uid", "groups", "session"], vec![]);
    let got = n.ask(cmd::SELECT, 0, all.encode()).await;
    let row = |uid: Value, groups: &[&str], session: &str| {
        array([
            ("uid", uid),
            ("groups", array(groups.iter().map(|&g| (g, g)))),
            ("session", session.into()),
        ])
    };
    let want = array([
        (a, row("alice".into(), &["g2", "g1"], "s-a")),
        (b, row("bob".into(), &["g2"], "")),
        (c, row(Value::Null, &["g3"], "")),
        (d, row(Value::Null, &[], "")),
    ]);
    assert_eq!(got, want);

    let uid = |ids: &[&str]| Condition::Uids(ids.iter().map(|&s| Id::from(s)).collect());
    let group = |ids: &[&str]| Condition::Groups(ids.iter().map(|&s| Id::from(s)).collect());
    let cases = [
        (vec![uid(&["alice"])], vec![a]),
        (vec![group(&["g3"])], vec![c]),
        (vec![Condition::ConnectionIds(vec![d])], vec![d]),
        (
            vec![
                uid(&["bob"]),
                group(&["g1"]),
                Condition::ConnectionIds(vec![d]),
            ],
            vec![a, b, d],
        ),
        (vec![uid(&["nobody"]), group(&["nope"])], vec![]),
    ];
    for (conditions, ids) in cases {
        let q = select(&["uid"], conditions.clone());
        let got = n.ask(cmd::SELECT, 0, q.encode()).await;
        let uid_of = |i| {
            if i == a {
                Value::from("alice")
            } else if i == b {
                Value::from("bob")
            } else {
                Value::Null
            }
        };
        let want = array(ids.iter().map(|&i| (i, array([("uid", uid_of(i))]))));
        assert_eq!(got, want, "{conditions:?}");
    }

    let odd = select(&["nickname"], vec![Condition::ConnectionIds(vec![a])]);
    let got = n.ask(cmd::SELECT, 0, odd.encode()).await;
    assert_eq!(got, array([(a, array([("nickname", Value::Null)]))]));
    // A request PHP would answer with nothing.
    assert_eq!(n.ask(cmd::SELECT, 0, "{}").await, array::<&str, Value>([]));
}
