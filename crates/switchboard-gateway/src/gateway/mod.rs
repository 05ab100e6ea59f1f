//! The gateway role: holds client sockets and nothing else.
//!
//! A gateway is an ordinary switchboard node (a [`Hub`] with WebSocket and TCP
//! listeners) whose application is a [`Forwarder`]: every client event goes
//! to a business worker over GatewayWorker's binary protocol, and the
//! workers' commands (send, bind, join, sessions, queries) are carried out on
//! the hub. The inner port speaks that protocol to workers and to outside
//! pushers; the gateway announces the port to the register.

mod commands;
mod inner;
mod router;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchboard::core::{ConnId, Frame, FrameKind, NodeId};
use switchboard::{
    Accept, CloseReason, ConnectInfo, Decision, Handler, Hub, Reject, Transport, async_trait,
};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ext::{self, ConnectRequest, Verdict, WireFrame};
use crate::protocol::cmd;
use crate::protocol::frame::{Frame as GwFrame, Header};
use router::{Connect, Encoder, HoldLimits, Router, Slot};
pub(crate) use router::{Event, Out};

/// How a gateway runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// The address workers reach this gateway at; with `lan_port` it is what
    /// the register advertises and what client ids embed. Must be IPv4.
    pub lan_ip: Ipv4Addr,
    /// The inner (worker-facing) port.
    pub lan_port: u16,
    /// The register's address (`host:port`).
    pub register: String,
    /// Shared secret of register, gateways and workers (empty: none).
    pub secret: String,
    /// How long client events wait for a worker when none can take them.
    pub hold_time: Duration,
    /// How many client events may wait at most.
    pub hold_events: usize,
    /// How many bytes of client events may wait at most.
    pub hold_bytes: usize,
    /// How long a connecting client waits for a switchboard worker's decision.
    pub verdict_timeout: Duration,
    /// Largest frame accepted on the inner port (GatewayWorker: 10 MiB).
    pub max_frame: usize,
}

impl GatewayConfig {
    /// A gateway whose workers reach it at `lan_ip:lan_port`, registered at `register`.
    pub fn new(lan_ip: Ipv4Addr, lan_port: u16, register: impl Into<String>) -> Self {
        Self {
            lan_ip,
            lan_port,
            register: register.into(),
            secret: String::new(),
            hold_time: Duration::from_secs(30),
            hold_events: 100_000,
            hold_bytes: 64 << 20,
            verdict_timeout: Duration::from_secs(10),
            max_frame: 10 << 20,
        }
    }

    /// The shared secret.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = secret.into();
        self
    }

    /// How long events wait for a worker.
    pub fn hold_time(mut self, d: Duration) -> Self {
        self.hold_time = d;
        self
    }

    /// The node id of this gateway: the 12 hex digits of its inner address.
    pub fn node_id(&self) -> NodeId {
        NodeId::gateway(self.lan_ip, self.lan_port)
    }

    /// The address the register advertises, `a.b.c.d:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.lan_ip, self.lan_port)
    }
}

/// What a gateway knows of one of its clients.
#[derive(Debug, Default)]
struct Client {
    ip: u32,
    port: u16,
    /// The session as a PHP-serialized string, stored verbatim.
    session: Bytes,
}

/// Counters of a gateway, for `/stats`.
#[derive(Debug, Default, Clone, Copy)]
#[non_exhaustive]
pub struct GatewayStats {
    /// Workers attached now.
    pub workers: u64,
    /// Client events waiting for a worker now.
    pub held_now: u64,
    /// Client events that had to wait for a worker.
    pub held_total: u64,
    /// Client events dropped because no worker took them in time.
    pub expired: u64,
    /// Client events dropped because the hold buffer stayed full.
    pub overflowed: u64,
    /// Inner connections closed for a bad frame, a bad secret or no auth.
    pub rejected_inner: u64,
    /// Commands carried out.
    pub commands: u64,
    /// Worker links closed because a newer link with the same worker key
    /// attached (a worker that reconnected before its old link was seen to die).
    pub replaced: u64,
}

struct Shared {
    cfg: GatewayConfig,
    node: NodeId,
    /// The client-facing port, carried in every event header.
    client_port: AtomicU16,
    router: Mutex<Router>,
    clients: Mutex<HashMap<u32, Client>>,
    verdicts: Mutex<HashMap<u32, oneshot::Sender<Verdict>>>,
    /// Links to close when a worker with the same key attaches again.
    links: Mutex<HashMap<u64, CancellationToken>>,
    /// Woken when the hold buffer may move (worker attached, queue drained).
    wake: Notify,
    /// Woken when the hold buffer has room again.
    room: Notify,
    overflowed: AtomicU64,
    rejected_inner: AtomicU64,
    commands: AtomicU64,
    replaced: AtomicU64,
}

/// A gateway. Build the node's hub with [`Gateway::handler`] and
/// [`Gateway::node_id`] (and connection ids starting at 1), serve clients
/// with it, and [`Gateway::run`] the inner side.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("node", &self.shared.node)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with this configuration.
    pub fn new(cfg: GatewayConfig) -> Self {
        let limits = HoldLimits {
            events: cfg.hold_events,
            bytes: cfg.hold_bytes,
            age: cfg.hold_time,
        };
        Self {
            shared: Arc::new(Shared {
                node: cfg.node_id(),
                cfg,
                client_port: AtomicU16::new(0),
                router: Mutex::new(Router::new(limits)),
                clients: Mutex::new(HashMap::new()),
                verdicts: Mutex::new(HashMap::new()),
                links: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                room: Notify::new(),
                overflowed: AtomicU64::new(0),
                rejected_inner: AtomicU64::new(0),
                commands: AtomicU64::new(0),
                replaced: AtomicU64::new(0),
            }),
        }
    }

    /// The gateway's node id, which its hub must use.
    pub fn node_id(&self) -> NodeId {
        self.shared.node.clone()
    }

    /// The application to install in the gateway's hub.
    pub fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(Forwarder {
            shared: self.shared.clone(),
        })
    }

    /// The client-facing port, which every event header carries.
    pub fn set_client_port(&self, port: u16) {
        self.shared.client_port.store(port, Ordering::Relaxed);
    }

    /// Counters.
    pub fn stats(&self) -> GatewayStats {
        let r = lock(&self.shared.router).stats();
        GatewayStats {
            workers: r.workers,
            held_now: r.held_now,
            held_total: r.held_total,
            expired: r.expired,
            overflowed: self.shared.overflowed.load(Ordering::Relaxed),
            rejected_inner: self.shared.rejected_inner.load(Ordering::Relaxed),
            commands: self.shared.commands.load(Ordering::Relaxed),
            replaced: self.shared.replaced.load(Ordering::Relaxed),
        }
    }

    /// Serves workers and pushers on `inner`, keeps the gateway registered
    /// and the hold buffer moving, until `shutdown` is cancelled.
    pub async fn run(&self, hub: Hub, inner: TcpListener, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        tasks.spawn(crate::register_link::gateway(
            self.shared.cfg.register.clone(),
            self.shared.cfg.address(),
            self.shared.cfg.secret.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(flusher(self.shared.clone(), shutdown.clone()));
        inner::serve(self.shared.clone(), hub, inner, &tasks, shutdown.clone()).await;
        tasks.close();
        tasks.wait().await;
    }
}

use crate::lock;

impl Shared {
    fn header(&self, cmd: u8, conn: u32, client: Option<&Client>, flag: u8) -> Header {
        Header {
            cmd,
            local_ip: u32::from(self.cfg.lan_ip),
            local_port: self.cfg.lan_port,
            client_ip: client.map_or(0, |c| c.ip),
            client_port: client.map_or(0, |c| c.port),
            connection_id: conn,
            flag,
            gateway_port: self.client_port.load(Ordering::Relaxed),
        }
    }

    fn frame(&self, out: &mut BytesMut, header: Header, ext_data: Bytes, body: Bytes) {
        GwFrame {
            header,
            ext_data,
            body,
        }
        .encode(out);
    }

    /// Encodes a client event for the worker in `slot`.
    fn encode(&self, conn: u32, event: Event, slot: &Slot) -> Option<Bytes> {
        let mut out = BytesMut::new();
        let mut clients = lock(&self.clients);
        let client = clients.get(&conn);
        let session = client.map(|c| c.session.clone()).unwrap_or_default();
        match event {
            Event::Connect(c) => {
                let Connect {
                    request,
                    websocket_body,
                    verdict,
                } = *c;
                if slot.negotiated {
                    lock(&self.verdicts).insert(conn, verdict);
                    let h = self.header(ext::CONNECT, conn, client, cmd::FLAG_BODY_IS_SCALAR);
                    self.frame(&mut out, h, session, ext::encode(&request));
                } else {
                    // A PHP worker binds and greets through commands; the
                    // connection is open as far as the gateway is concerned.
                    let _ = verdict.send(Verdict::Accept {
                        user: None,
                        groups: Vec::new(),
                        session: Vec::new(),
                        greeting: Vec::new(),
                    });
                    let h = self.header(cmd::ON_CONNECT, conn, client, cmd::FLAG_BODY_IS_SCALAR);
                    self.frame(&mut out, h, session.clone(), Bytes::new());
                    if let Some(body) = websocket_body {
                        let h = self.header(cmd::ON_WEBSOCKET_CONNECT, conn, client, 0);
                        self.frame(&mut out, h, session.clone(), body);
                    }
                    if let Some(hello) = request.hello {
                        let flag = message_flag(hello.binary);
                        let h = self.header(cmd::ON_MESSAGE, conn, client, flag);
                        self.frame(&mut out, h, session, hello.data);
                    }
                }
            }
            Event::Message { body, flag } => {
                let h = self.header(cmd::ON_MESSAGE, conn, client, flag);
                self.frame(&mut out, h, session, body);
            }
            Event::Close => {
                let h = self.header(cmd::ON_CLOSE, conn, client, cmd::FLAG_BODY_IS_SCALAR);
                self.frame(&mut out, h, session, Bytes::new());
                clients.remove(&conn);
            }
        }
        Some(out.freeze())
    }

    /// Routes a client event, waiting while the hold buffer is full (this
    /// holds back only the client whose event it is), at most the hold time.
    async fn route(&self, conn: u32, mut event: Event) {
        let deadline = Instant::now() + self.cfg.hold_time;
        loop {
            let room = self.room.notified();
            let result = {
                let mut router = lock(&self.router);
                let mut enc = |c, e, s: &Slot| self.encode(c, e, s);
                let enc: &mut Encoder<'_> = &mut enc;
                router.route(conn, event, Instant::now(), enc)
            };
            match result {
                Ok(_) => return,
                Err(router::Full(e)) => event = e,
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(node = %self.node, conn, "no worker took a client event in time: dropped");
                self.dropped(conn, event);
                return;
            }
        }
    }

    /// Cleans up after an event no worker will get.
    fn dropped(&self, conn: u32, event: Event) {
        match event {
            Event::Connect(c) => {
                let _ = c.verdict.send(Verdict::Reject {
                    status: 503,
                    reason: "no worker available".into(),
                    reply: None,
                });
            }
            Event::Close => {
                lock(&self.clients).remove(&conn);
            }
            Event::Message { .. } => {}
        }
    }
}

fn message_flag(binary: bool) -> u8 {
    if binary {
        cmd::FLAG_BODY_IS_SCALAR | ext::FLAG_BINARY
    } else {
        cmd::FLAG_BODY_IS_SCALAR
    }
}

/// Moves held events to workers as they become able to take them, and
/// expires those that waited too long.
async fn flusher(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = shared.wake.notified() => {}
            _ = tick.tick() => {}
        }
        let expired = {
            let mut router = lock(&shared.router);
            if !router.has_held() {
                continue;
            }
            let mut enc = |c, e, s: &Slot| shared.encode(c, e, s);
            let enc: &mut Encoder<'_> = &mut enc;
            router.flush(Instant::now(), enc)
        };
        if !expired.is_empty() {
            tracing::warn!(node = %shared.node, events = expired.len(), "client events waited longer than the hold time for a worker: dropped");
        }
        for (conn, event) in expired {
            shared.dropped(conn, event);
        }
        shared.room.notify_waiters();
    }
}

/// The gateway's application: forwards client events to workers.
pub struct Forwarder {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

fn conn_no(conn: &ConnId) -> u32 {
    // Gateway hubs number connections from 1; ids beyond 32 bits would need
    // four billion connections in one process.
    conn.seq() as u32
}

#[async_trait]
impl Handler for Forwarder {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        let conn = conn_no(&info.conn);
        let (ip, port) = match info.peer {
            Some(SocketAddr::V4(a)) => (u32::from(*a.ip()), a.port()),
            Some(SocketAddr::V6(a)) => (0, a.port()),
            None => (0, 0),
        };
        lock(&self.shared.clients).insert(
            conn,
            Client {
                ip,
                port,
                session: Bytes::new(),
            },
        );
        let websocket = info.transport == Transport::WebSocket;
        let request = ConnectRequest {
            websocket,
            peer: info.peer,
            path: info.path.clone(),
            query: info.query.clone(),
            headers: info
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            hello: info.hello.as_ref().map(WireFrame::from),
        };
        let websocket_body = websocket.then(|| {
            let uri = if info.query.is_empty() {
                info.path.clone()
            } else {
                format!("{}?{}", info.path, info.query)
            };
            let headers = info.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
            let body = crate::protocol::websocket::connect_body("GET", &uri, "HTTP/1.1", headers);
            Bytes::from(crate::protocol::php::to_bytes(&body))
        });
        let (tx, rx) = oneshot::channel();
        let event = Event::Connect(Box::new(Connect {
            request,
            websocket_body,
            verdict: tx,
        }));
        self.shared.route(conn, event).await;
        let verdict = tokio::time::timeout(self.shared.cfg.verdict_timeout, rx).await;
        let verdict = match verdict {
            Ok(Ok(v)) => v,
            _ => {
                // The worker may still answer later: tell it the client left.
                lock(&self.shared.verdicts).remove(&conn);
                self.shared.route(conn, Event::Close).await;
                return Reject::new("no worker answered in time")
                    .status(switchboard::http::StatusCode::SERVICE_UNAVAILABLE)
                    .into();
            }
        };
        match verdict {
            Verdict::Accept {
                user,
                groups,
                session,
                greeting,
            } => {
                let mut accept = Accept::new();
                if let Some(u) = user {
                    accept = accept.bind(u);
                }
                for g in groups {
                    accept = accept.join(g);
                }
                if !session.is_empty() {
                    let bytes = crate::session::to_php(
                        session.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    );
                    if let Some(c) = lock(&self.shared.clients).get_mut(&conn) {
                        c.session = bytes;
                    }
                }
                for f in greeting {
                    accept = accept.greet(f.into_frame());
                }
                accept.into()
            }
            Verdict::Reject {
                status,
                reason,
                reply,
            } => {
                lock(&self.shared.clients).remove(&conn);
                let mut r = Reject::new(reason).status(
                    switchboard::http::StatusCode::from_u16(status)
                        .unwrap_or(switchboard::http::StatusCode::FORBIDDEN),
                );
                if let Some(f) = reply {
                    r = r.reply(f.into_frame());
                }
                r.into()
            }
        }
    }

    async fn on_message(&self, _hub: &Hub, conn: &ConnId, frame: Frame) {
        let flag = message_flag(frame.kind() == FrameKind::Binary);
        let event = Event::Message {
            body: frame.into_data(),
            flag,
        };
        self.shared.route(conn_no(conn), event).await;
    }

    async fn on_close(&self, _hub: &Hub, conn: &ConnId, _reason: &CloseReason) {
        self.shared.route(conn_no(conn), Event::Close).await;
    }
}
