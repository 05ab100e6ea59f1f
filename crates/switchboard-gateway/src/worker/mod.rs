//! The worker role: runs the application for clients held by gateways.
//!
//! A worker learns the gateways from the register, keeps one link to each,
//! and runs the application's [`Handler`] for every client event that arrives,
//! one client's events in order, different clients concurrently. The
//! application talks to a [`Hub`] like in every other mode; the hub's cluster
//! backplane (`backplane::Links`) turns pushes, membership operations and
//! queries into GatewayWorker commands.
//!
//! A link whose gateway leaves a query unanswered past the query timeout can
//! no longer pair replies with queries (they carry no request id): it is
//! closed, failing what waits on it, and linked again (see the `link` module).
//!
//! Stopping a worker is safe for clients: it asks every switchboard gateway to
//! route nothing more to it, handles what is already on its way, and only then
//! closes its links. The gateways hold the next events until another worker
//! (or this one, restarted) attaches.

mod backplane;
mod link;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use switchboard::core::{ConnId, NodeId};
use switchboard::{CloseReason, ConnectInfo, Decision, Handler, Hub, Transport};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ext::{self, Verdict, WireFrame};
use crate::protocol::cmd;
use crate::protocol::frame::Frame as GwFrame;
use crate::protocol::php::{self, Value};
use link::{Incoming, Link, LinkDecoder};

/// How a worker runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The register's address.
    pub register: String,
    /// Shared secret (empty: none).
    pub secret: String,
    /// This worker's key, unique among the workers of one host
    /// (GatewayWorker: `name:index`).
    pub key: String,
    /// How long cluster queries and remote operations wait.
    pub query_timeout: Duration,
    /// How long a stopping worker waits for gateways to confirm and for
    /// in-flight events to be handled.
    pub drain_timeout: Duration,
    /// Events queued per client before the client is cut off (a burst held
    /// at a gateway while no worker was attached arrives at once).
    pub mailbox: usize,
    /// Largest frame accepted from a gateway.
    pub max_frame: usize,
}

impl WorkerConfig {
    /// A worker registering at `register`.
    pub fn new(register: impl Into<String>) -> Self {
        Self {
            register: register.into(),
            secret: String::new(),
            key: format!("switchboard:{}", std::process::id()),
            query_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(10),
            mailbox: 16 * 1024,
            max_frame: 10 << 20,
        }
    }

    /// The shared secret.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = secret.into();
        self
    }

    /// The worker key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }
}

/// A client event for the client's task.
enum ConnEvent {
    /// A switchboard gateway's connection request.
    Request(ext::ConnectRequest),
    /// GatewayWorker's `CMD_ON_CONNECT`: wait for the WebSocket details or
    /// the first message.
    Opened {
        peer: Option<std::net::SocketAddr>,
    },
    /// `CMD_ON_WEBSOCKET_CONNECT` with its PHP body.
    WebSocket(Bytes),
    Message(switchboard::Frame),
    Close,
}

/// Counters of a worker.
#[derive(Debug, Default, Clone, Copy)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Gateways linked now.
    pub links: u64,
    /// Client events received.
    pub events: u64,
    /// Clients cut off because their events piled up faster than handled.
    pub overflowed: u64,
}

pub(crate) struct Shared {
    cfg: WorkerConfig,
    hub: std::sync::OnceLock<Hub>,
    links: Mutex<HashMap<NodeId, Arc<Link>>>,
    addresses: watch::Receiver<Vec<String>>,
    /// The gateways of the register's last list, as node ids.
    known: Mutex<Arc<[NodeId]>>,
    clients: Mutex<HashMap<ConnId, Client>>,
    /// Events received and not yet handled.
    in_flight: AtomicUsize,
    events: AtomicU64,
    overflowed: AtomicU64,
    /// What links lost after accepting it (see [`link`]), over every link
    /// this worker had.
    link_dropped: Arc<AtomicU64>,
    tasks: TaskTracker,
    /// Stops the register link and link reconnects.
    stop: CancellationToken,
    /// Closes the links themselves, after draining.
    close_links: CancellationToken,
}

use crate::lock;

/// A running worker.
#[derive(Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts a worker running `handler`: connects to the register and to
    /// every gateway it names, and keeps doing so until [`Worker::shutdown`].
    pub async fn start(
        cfg: WorkerConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Self, switchboard::BuildError> {
        Self::start_with(cfg, handler, |b| b).await
    }

    /// [`Worker::start`], with `tweak` adjusting the worker's hub before it
    /// starts (a history store, streams recorded by configuration).
    pub async fn start_with(
        cfg: WorkerConfig,
        handler: Arc<dyn Handler>,
        tweak: impl FnOnce(switchboard::HubBuilder) -> switchboard::HubBuilder,
    ) -> Result<Self, switchboard::BuildError> {
        let (addr_tx, addr_rx) = watch::channel(Vec::new());
        let shared = Arc::new(Shared {
            cfg,
            hub: std::sync::OnceLock::new(),
            links: Mutex::new(HashMap::new()),
            addresses: addr_rx,
            known: Mutex::new(Arc::from(Vec::new())),
            clients: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            events: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            link_dropped: Arc::new(AtomicU64::new(0)),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            close_links: CancellationToken::new(),
        });
        let node = NodeId::new(format!(
            "w-{}",
            NodeId::random().as_str().trim_start_matches("n-")
        ))
        .unwrap_or_else(|_| NodeId::random());
        let hub = tweak(
            Hub::builder()
                .node_id(node)
                .query_timeout(shared.cfg.query_timeout)
                .backplane(backplane::Links::new(
                    Arc::downgrade(&shared),
                    shared.link_dropped.clone(),
                ))
                .handler_arc(handler),
        )
        .start()
        .await?;
        let _ = shared.hub.set(hub);
        shared.tasks.spawn(crate::register_link::worker(
            shared.cfg.register.clone(),
            shared.cfg.secret.clone(),
            addr_tx,
            shared.stop.clone(),
        ));
        shared.tasks.spawn(supervise(shared.clone()));
        Ok(Self { shared })
    }

    /// The worker's hub, the one its application uses.
    pub fn hub(&self) -> &Hub {
        self.shared.hub()
    }

    /// Counters.
    pub fn stats(&self) -> WorkerStats {
        WorkerStats {
            links: lock(&self.shared.links).len() as u64,
            events: self.shared.events.load(Ordering::Relaxed),
            overflowed: self.shared.overflowed.load(Ordering::Relaxed),
        }
    }

    /// Gateways linked now.
    pub fn gateways(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = lock(&self.shared.links).keys().cloned().collect();
        v.sort();
        v
    }

    /// Stops without losing a client event: asks every switchboard gateway to
    /// route nothing more here, waits for their confirmation, handles every
    /// event already received, flushes what the application sent, then
    /// closes the links. Bounded by the drain timeout.
    pub async fn shutdown(&self) {
        let s = &self.shared;
        s.stop.cancel();
        let deadline = tokio::time::Instant::now() + s.cfg.drain_timeout;
        let links: Vec<Arc<Link>> = lock(&s.links).values().cloned().collect();
        for l in &links {
            if l.negotiated.load(Ordering::Relaxed) {
                l.send(link::plain(ext::DRAIN, 0, Bytes::new()));
            }
        }
        for l in &links {
            if !l.negotiated.load(Ordering::Relaxed) {
                continue;
            }
            let confirmed = l.drained_notify.notified();
            if l.drained.load(Ordering::Relaxed) || l.is_closed() {
                continue;
            }
            if tokio::time::timeout_at(deadline, confirmed).await.is_err() {
                tracing::warn!(gateway = %l.node, "gateway did not confirm the drain in time");
            }
        }
        while s.in_flight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lock(&s.clients).clear();
        s.close_links.cancel();
        s.tasks.close();
        let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), s.tasks.wait()).await;
        s.hub().shutdown().await;
    }
}

impl Shared {
    fn hub(&self) -> &Hub {
        // Set in `Worker::start` before any task that reads it is spawned.
        self.hub
            .get()
            .unwrap_or_else(|| unreachable!("hub set at start"))
    }

    fn link(&self, node: &NodeId) -> Option<Arc<Link>> {
        lock(&self.links).get(node).cloned()
    }

    fn all_links(&self) -> Vec<Arc<Link>> {
        lock(&self.links).values().cloned().collect()
    }

    /// Gateways named by the register's last broadcast.
    fn known_gateways(&self) -> Arc<[NodeId]> {
        lock(&self.known).clone()
    }
}

/// Links every gateway the register names, as GatewayWorker does: a link is
/// kept while it lives even if its address leaves the list; only reconnects
/// stop.
async fn supervise(shared: Arc<Shared>) {
    let mut addresses = shared.addresses.clone();
    // One task per address ever named, for the worker's life: an address that
    // leaves the list (a register restart sends partial lists at first) must
    // not get a second link to the same gateway when it comes back, which the
    // gateway would take as a new worker replacing this one.
    let mut linking: HashMap<String, Arc<AtomicBool>> = HashMap::new();
    loop {
        let list = addresses.borrow_and_update().clone();
        // Parsed once per list, not on every push and query.
        *lock(&shared.known) = list.iter().filter_map(|a| crate::gateway_node(a)).collect();
        for a in &list {
            if crate::gateway_node(a).is_none() {
                continue;
            }
            match linking.get(a) {
                Some(wanted) => wanted.store(true, Ordering::Relaxed),
                None => {
                    let wanted = Arc::new(AtomicBool::new(true));
                    linking.insert(a.clone(), wanted.clone());
                    shared
                        .tasks
                        .spawn(keep_link(shared.clone(), a.clone(), wanted));
                }
            }
        }
        for (a, wanted) in &linking {
            if !list.contains(a) {
                // Stop reconnecting; a live link stays until it closes.
                wanted.store(false, Ordering::Relaxed);
            }
        }
        tokio::select! {
            () = shared.stop.cancelled() => return,
            r = addresses.changed() => if r.is_err() { return },
        }
    }
}

/// Keeps one gateway linked: reconnects every second while the register
/// names it, until the worker stops.
async fn keep_link(shared: Arc<Shared>, address: String, wanted: Arc<AtomicBool>) {
    let Some(node) = crate::gateway_node(&address) else {
        return;
    };
    loop {
        if wanted.load(Ordering::Relaxed) {
            match TcpStream::connect(&address).await {
                Ok(stream) => {
                    run_link(&shared, &node, stream).await;
                    tracing::warn!(gateway = %address, "link closed");
                }
                Err(error) => tracing::debug!(gateway = %address, %error, "cannot reach gateway"),
            }
        }
        if shared.close_links.is_cancelled() {
            return;
        }
        tokio::select! {
            () = shared.stop.cancelled() => return,
            () = tokio::time::sleep(crate::register_link::RETRY) => {}
        }
    }
}

async fn run_link(shared: &Arc<Shared>, node: &NodeId, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let hello = serde_json::json!({
        "worker_key": shared.cfg.key,
        "secret_key": shared.cfg.secret,
        ext::ANNOUNCE_KEY: ext::REVISION,
    });
    let first = link::one(
        cmd::WORKER_CONNECT,
        0,
        cmd::FLAG_BODY_IS_SCALAR,
        Bytes::new(),
        Bytes::from(hello.to_string()),
    );
    if write.write_all(&first).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Bytes>(link::LINK_QUEUE);
    let link = Arc::new(Link::new(node.clone(), tx, shared.link_dropped.clone()));
    lock(&shared.links).insert(node.clone(), link.clone());
    tracing::info!(gateway = %node, "linked");
    let done = CancellationToken::new();
    let writer = {
        let done = done.clone();
        let closing = shared.close_links.clone();
        let untrusted = link.untrusted.clone();
        let dropped = shared.link_dropped.clone();
        async move {
            let mut batch = Vec::with_capacity(256);
            let mut buf = bytes::BytesMut::new();
            loop {
                let last = tokio::select! {
                    biased;
                    // Given up: nothing more is written.
                    () = untrusted.cancelled() => break,
                    n = rx.recv_many(&mut batch, 256) => if n == 0 { break } else { false },
                    // Closing: write what is queued, then stop.
                    () = closing.cancelled() => {
                        while let Ok(b) = rx.try_recv() {
                            batch.push(b);
                        }
                        true
                    }
                };
                for b in batch.drain(..) {
                    buf.extend_from_slice(&b);
                }
                let written = tokio::select! {
                    biased;
                    // A gateway that stopped answering may have stopped
                    // reading too: the write must not keep the link alive.
                    () = untrusted.cancelled() => false,
                    r = write.write_all(&buf) => r.is_ok(),
                };
                if !written || last {
                    break;
                }
                buf.clear();
            }
            done.cancel();
            // Accepted and never written: lost, and counted.
            rx.close();
            let mut lost = 0;
            while rx.try_recv().is_ok() {
                lost += 1;
            }
            dropped.fetch_add(lost, Ordering::Relaxed);
            let _ = write.shutdown().await;
        }
    };
    let writer = shared.tasks.spawn(writer);
    let mut incoming = FramedRead::new(read, LinkDecoder::new(shared.cfg.max_frame));
    loop {
        let item = tokio::select! {
            () = shared.close_links.cancelled() => break,
            () = done.cancelled() => break,
            () = link.untrusted.cancelled() => break,
            i = incoming.next() => i,
        };
        match item {
            Some(Ok(Incoming::Reply(v))) => link.reply(v),
            Some(Ok(Incoming::Frame(f))) => on_frame(shared, &link, f).await,
            Some(Err(error)) => {
                tracing::warn!(gateway = %node, %error, "bad data from gateway: closing the link");
                break;
            }
            None => break,
        }
    }
    {
        let mut links = lock(&shared.links);
        if links.get(node).is_some_and(|l| Arc::ptr_eq(l, &link)) {
            links.remove(node);
        }
    }
    link.end();
    // Dropping the last sender ends the writer once it has written the rest.
    drop(link);
    let _ = writer.await;
}

/// One client, as its worker knows it. An idle client costs only this entry:
/// a task runs while it has events and ends when they are handled.
struct Client {
    /// Events not yet handled, oldest first.
    queue: VecDeque<ConnEvent>,
    /// A task is handling this client's events.
    running: bool,
    /// The application accepted it (here, or under the worker it moved from).
    accepted: bool,
    /// GatewayWorker's `CMD_ON_CONNECT` came; the connection decision waits
    /// for the WebSocket details or the first message (a TCP hello).
    waiting_hello: bool,
    peer: Option<std::net::SocketAddr>,
}

async fn on_frame(shared: &Arc<Shared>, link: &Arc<Link>, f: GwFrame) {
    let conn = ConnId::new(link.node.clone(), u64::from(f.header.connection_id));
    let event = match f.header.cmd {
        ext::HELLO => {
            link.negotiated.store(true, Ordering::Relaxed);
            return;
        }
        ext::DRAINED => {
            link.drained.store(true, Ordering::Relaxed);
            link.drained_notify.notify_waiters();
            return;
        }
        cmd::PING => return,
        ext::CONNECT => match ext::decode::<ext::ConnectRequest>(&f.body) {
            Ok(r) => ConnEvent::Request(r),
            Err(error) => {
                tracing::warn!(%conn, %error, "bad connection request from gateway");
                return;
            }
        },
        cmd::ON_CONNECT => ConnEvent::Opened {
            peer: (f.header.client_ip != 0).then(|| {
                std::net::SocketAddr::from((
                    std::net::Ipv4Addr::from(f.header.client_ip),
                    f.header.client_port,
                ))
            }),
        },
        cmd::ON_WEBSOCKET_CONNECT => ConnEvent::WebSocket(f.body),
        cmd::ON_MESSAGE => {
            ConnEvent::Message(ext::to_frame(f.header.flag & ext::FLAG_BINARY != 0, f.body))
        }
        cmd::ON_CLOSE => ConnEvent::Close,
        other => {
            tracing::warn!(gateway = %link.node, cmd = other, "unexpected command from gateway: ignored");
            return;
        }
    };
    shared.events.fetch_add(1, Ordering::Relaxed);
    let opening = matches!(event, ConnEvent::Request(_) | ConnEvent::Opened { .. });
    let mut clients = lock(&shared.clients);
    // A client never seen open here moved from a stopped worker: it is
    // handled as already accepted.
    let c = clients.entry(conn.clone()).or_insert_with(|| Client {
        queue: VecDeque::new(),
        running: false,
        accepted: !opening,
        waiting_hello: false,
        peer: None,
    });
    if c.queue.len() >= shared.cfg.mailbox {
        clients.remove(&conn);
        drop(clients);
        shared.overflowed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%conn, "a client's events pile up faster than they are handled: cutting the client off");
        link.send(link::plain(cmd::DESTROY, conn.seq() as u32, Bytes::new()));
        return;
    }
    c.queue.push_back(event);
    shared.in_flight.fetch_add(1, Ordering::AcqRel);
    if !c.running {
        c.running = true;
        shared
            .tasks
            .spawn(client(shared.clone(), link.clone(), conn));
    }
}

/// Handles one client's queued events in order, then ends.
async fn client(shared: Arc<Shared>, link: Arc<Link>, conn: ConnId) {
    let hub = shared.hub().clone();
    loop {
        let (event, accepted, waiting_hello, peer) = {
            let mut clients = lock(&shared.clients);
            let Some(c) = clients.get_mut(&conn) else {
                return;
            };
            let Some(event) = c.queue.pop_front() else {
                c.running = false;
                return;
            };
            (event, c.accepted, c.waiting_hello, c.peer)
        };
        let closing = matches!(event, ConnEvent::Close);
        // What the event changes in the client's state, written back after.
        let mut state = (accepted, waiting_hello, peer);
        match event {
            ConnEvent::Request(r) => {
                let info = info_from_request(&conn, r);
                let decision = hub.handle_connect(&info).await;
                state.0 = matches!(decision, Decision::Accept(_));
                link.send(link::one(
                    ext::VERDICT,
                    conn.seq() as u32,
                    cmd::FLAG_BODY_IS_SCALAR,
                    Bytes::new(),
                    ext::encode(&verdict(&decision)),
                ));
            }
            ConnEvent::Opened { peer: p } => {
                state.2 = p;
                state.1 = true;
            }
            ConnEvent::WebSocket(body) => {
                state.1 = false;
                let mut info = info_from_websocket(&conn, &body);
                info.peer = peer;
                state.0 = apply(&link, &conn, hub.handle_connect(&info).await);
            }
            ConnEvent::Message(frame) if waiting_hello => {
                state.1 = false;
                let mut info = ConnectInfo::new(conn.clone(), Transport::Tcp);
                info.peer = peer;
                info.hello = Some(frame);
                state.0 = apply(&link, &conn, hub.handle_connect(&info).await);
            }
            ConnEvent::Message(frame) => {
                if accepted {
                    hub.handle_message(&conn, frame).await;
                }
            }
            ConnEvent::Close => {
                if accepted {
                    let reason = CloseReason::Client {
                        code: None,
                        reason: String::new(),
                    };
                    hub.handle_close(&conn, &reason).await;
                }
            }
        }
        let mut clients = lock(&shared.clients);
        if closing {
            // Events after a close (none are sent) would be counted in flight.
            if let Some(c) = clients.remove(&conn) {
                shared.in_flight.fetch_sub(c.queue.len(), Ordering::AcqRel);
            }
        } else if let Some(c) = clients.get_mut(&conn) {
            (c.accepted, c.waiting_hello, c.peer) = state;
        }
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        if closing {
            return;
        }
    }
}

fn verdict(d: &Decision) -> Verdict {
    match d {
        Decision::Accept(a) => Verdict::Accept {
            user: a.user().map(|u| u.as_str().to_owned()),
            groups: a.groups().iter().map(|g| g.as_str().to_owned()).collect(),
            session: a
                .initial_session()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            greeting: a.greeting().iter().map(WireFrame::from).collect(),
        },
        Decision::Reject(r) => Verdict::Reject {
            status: r.http_status().as_u16(),
            reason: r.reason().to_owned(),
            reply: r.reply_frame().map(WireFrame::from),
        },
    }
}

fn body_flag(f: &switchboard::Frame) -> u8 {
    if f.kind() == switchboard::core::FrameKind::Binary {
        cmd::FLAG_BODY_IS_SCALAR | ext::FLAG_BINARY
    } else {
        cmd::FLAG_BODY_IS_SCALAR
    }
}

/// Carries out a decision through GatewayWorker commands (a gateway without
/// the extensions): bind, join, session, greeting; or the refusal's reply
/// and a kick. Returns whether the client was accepted.
fn apply(link: &Link, conn: &ConnId, d: Decision) -> bool {
    let id = conn.seq() as u32;
    let mut out = bytes::BytesMut::new();
    let accepted = match &d {
        Decision::Accept(a) => {
            if let Some(u) = a.user() {
                link::frame(
                    &mut out,
                    cmd::BIND_UID,
                    id,
                    cmd::FLAG_BODY_IS_SCALAR,
                    Bytes::copy_from_slice(u.as_str().as_bytes()),
                    Bytes::new(),
                );
            }
            for g in a.groups() {
                link::frame(
                    &mut out,
                    cmd::JOIN_GROUP,
                    id,
                    cmd::FLAG_BODY_IS_SCALAR,
                    Bytes::copy_from_slice(g.as_str().as_bytes()),
                    Bytes::new(),
                );
            }
            if !a.initial_session().is_empty() {
                let session = crate::session::to_php(
                    a.initial_session()
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str())),
                );
                link::frame(
                    &mut out,
                    cmd::SET_SESSION,
                    id,
                    cmd::FLAG_BODY_IS_SCALAR,
                    session,
                    Bytes::new(),
                );
            }
            for f in a.greeting() {
                link::frame(
                    &mut out,
                    cmd::SEND_TO_ONE,
                    id,
                    body_flag(f),
                    Bytes::new(),
                    f.data().clone(),
                );
            }
            true
        }
        Decision::Reject(r) => {
            match r.reply_frame() {
                Some(f) => link::frame(
                    &mut out,
                    cmd::KICK,
                    id,
                    body_flag(f),
                    Bytes::new(),
                    f.data().clone(),
                ),
                None => link::frame(
                    &mut out,
                    cmd::KICK,
                    id,
                    0,
                    Bytes::new(),
                    Bytes::from(php::to_bytes(&Value::Null)),
                ),
            }
            false
        }
    };
    link.send(out.freeze());
    accepted
}

fn info_from_request(conn: &ConnId, r: ext::ConnectRequest) -> ConnectInfo {
    let transport = if r.websocket {
        Transport::WebSocket
    } else {
        Transport::Tcp
    };
    let mut info = ConnectInfo::new(conn.clone(), transport);
    info.peer = r.peer;
    info.path = r.path;
    info.query = r.query;
    for (k, v) in r.headers {
        if let (Ok(k), Ok(v)) = (
            switchboard::http::HeaderName::from_bytes(k.as_bytes()),
            switchboard::http::HeaderValue::from_bytes(&v),
        ) {
            info.headers.append(k, v);
        }
    }
    info.hello = r.hello.map(WireFrame::into_frame);
    info
}

/// Connection details from GatewayWorker's `CMD_ON_WEBSOCKET_CONNECT` body:
/// `['get' => …, 'server' => [REQUEST_URI, QUERY_STRING, HTTP_* …], 'cookie' => …]`.
fn info_from_websocket(conn: &ConnId, body: &[u8]) -> ConnectInfo {
    let mut info = ConnectInfo::new(conn.clone(), Transport::WebSocket);
    let Ok(Value::Array(top)) = php::unserialize(body) else {
        return info;
    };
    let Some(Value::Array(server)) = top.get(&php::Key::Str(Bytes::from_static(b"server"))) else {
        return info;
    };
    for (k, v) in server.iter() {
        let (php::Key::Str(k), Value::Str(v)) = (k, v) else {
            continue;
        };
        match &k[..] {
            b"REQUEST_URI" => {
                let uri = String::from_utf8_lossy(v);
                info.path = uri.split('?').next().unwrap_or_default().to_owned();
            }
            b"QUERY_STRING" => info.query = String::from_utf8_lossy(v).into_owned(),
            name if name.starts_with(b"HTTP_") => {
                let header = String::from_utf8_lossy(&name[5..])
                    .to_ascii_lowercase()
                    .replace('_', "-");
                if let (Ok(k), Ok(v)) = (
                    switchboard::http::HeaderName::from_bytes(header.as_bytes()),
                    switchboard::http::HeaderValue::from_bytes(v),
                ) {
                    info.headers.append(k, v);
                }
            }
            _ => {}
        }
    }
    info
}
