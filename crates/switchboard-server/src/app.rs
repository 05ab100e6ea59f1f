//! The reference application of `docs/CLIENT-PROTOCOL.md`, written once against the
//! [`Hub`] API. Every mode, test and benchmark speaks it.
//!
//! Clients connect with `?uid=U&group=G` (WebSocket) or a first line
//! `{"op":"hello","uid":"U","group":"G"}` (TCP), get a welcome frame first,
//! then send JSON requests: `to_user`, `to_users`, `to_group`, `to_all`,
//! `to_conn`, `join`, `leave`, `online`, `group_count`. Pushed data arrives
//! verbatim as one text frame. Bad input gets one `{"op":"error"}` reply and the
//! connection stays open.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use switchboard::auth::{Action, Identity, Permissions};
use switchboard::core::ConnId;
use switchboard::core::history::StreamOf;
use switchboard::{
    Accept, CloseReason, ConnectInfo, Decision, Frame, Handler, Hub, Reject, Target, Transport,
    async_trait, check_name,
};

use crate::events::Events;
use crate::events::presence::Presence;
use crate::security::Security;

/// Session keys the application keeps a connection's grant under, so that
/// any process handling its messages (a restarted gateway worker) finds it.
const SESSION_UID: &str = "sb.uid";
const SESSION_CAN: &str = "sb.can";
const SESSION_EXP: &str = "sb.exp";

/// The reference application.
#[derive(Debug, Clone, Default)]
pub struct ReferenceApp {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    security: Security,
    /// What each authenticated connection may do, cached from its session
    /// at its first message, dropped when it closes. Read on every request,
    /// written once per connection: a read lock lets every worker thread
    /// look up at once.
    grants: RwLock<HashMap<ConnId, Arc<Grant>>>,
    /// Token deadlines: (when, in milliseconds since the Unix epoch;
    /// connection) to the expiry (seconds) the deadline is for.
    deadlines: Mutex<BTreeMap<(u64, ConnId), Deadline>>,
    watcher: OnceLock<()>,
    counters: AppCounters,
    /// Where client events go, when `--events-url` is set.
    events: Option<(Events, Presence)>,
}

#[derive(Debug, Default)]
struct AppCounters {
    refused: AtomicU64,
    denied: AtomicU64,
    expired: AtomicU64,
    refreshed: AtomicU64,
}

#[derive(Debug)]
struct Grant {
    uid: String,
    can: Permissions,
    exp: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    /// The token of this expiry ends: tell the client.
    Warn(u64),
    /// The grace after this expiry ends: close, unless refreshed.
    Close(u64),
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

impl ReferenceApp {
    /// The application with these security settings.
    pub fn new(security: Security) -> Self {
        Self {
            inner: Arc::new(Inner {
                security,
                ..Inner::default()
            }),
        }
    }

    /// The application, telling `events` what its clients do and `presence`
    /// who comes online.
    pub fn with_events(security: Security, events: Events, presence: Presence) -> Self {
        Self {
            inner: Arc::new(Inner {
                security,
                events: Some((events, presence)),
                ..Inner::default()
            }),
        }
    }

    /// Its counters, for `/stats`.
    pub fn stats(&self) -> serde_json::Value {
        let c = &self.inner.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut stats = json!({
            "auth": match (&self.inner.security.jwt, &self.inner.security.proxy) {
                (Some(_), _) => "jwt",
                (None, Some(_)) => "connect_proxy",
                (None, None) => "none",
            },
            "connections_refused": g(&c.refused),
            "requests_denied": g(&c.denied),
            "tokens_expired": g(&c.expired),
            "tokens_refreshed": g(&c.refreshed),
        });
        if let Some((events, _)) = &self.inner.events {
            stats["events"] = events.stats();
        }
        stats
    }

    /// Hands a frame the application does not handle to the backend, if
    /// events are on; `false` when nobody takes it.
    async fn forward(&self, hub: &Hub, conn: &ConnId, frame: &Frame) -> bool {
        let Some((events, _)) = &self.inner.events else {
            return false;
        };
        // An authenticated connection's uid is in its grant; without
        // authentication there is no grant to look up, only the binding.
        let uid = if self.inner.security.authenticates() {
            self.grant(hub, conn).await.map(|g| g.uid.clone())
        } else {
            hub.conn_user(conn).await.value.map(|u| u.to_string())
        };
        events.message(conn, uid.as_deref(), frame);
        true
    }
}

#[derive(Deserialize)]
struct Hello {
    op: String,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    group: Option<String>,
    /// `"STREAM@POS"`, or a list of them.
    #[serde(default)]
    recover: Option<OneOrMany>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Most streams one connection may recover at once.
const MAX_RECOVER: usize = 16;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    ToUser { uid: String, data: String },
    ToUsers { uids: Vec<String>, data: String },
    ToGroup { group: String, data: String },
    ToAll { data: String },
    ToConn { conn: String, data: String },
    Join { group: String },
    Leave { group: String },
    Online { uid: String },
    GroupCount { group: String },
    Refresh { token: String },
}

const OPS: [&str; 10] = [
    "to_user",
    "to_users",
    "to_group",
    "to_all",
    "to_conn",
    "join",
    "leave",
    "online",
    "group_count",
    "refresh",
];

fn error_frame(reason: &str) -> Frame {
    Frame::text(json!({"op": "error", "reason": reason}).to_string())
}

/// Just the `op` of a frame that did not parse as a request.
#[derive(Deserialize)]
struct OpOnly {
    op: Option<serde_json::Value>,
}

/// Whether a frame is no request of this application at all (not a JSON
/// object with a known `op`), rather than a request with a mistake in it.
fn foreign(bytes: &[u8]) -> bool {
    match serde_json::from_slice::<OpOnly>(bytes) {
        Err(_) | Ok(OpOnly { op: None }) => true,
        Ok(OpOnly {
            op: Some(serde_json::Value::String(op)),
        }) => !OPS.contains(&op.as_str()),
        Ok(_) => true,
    }
}

/// Why a request could not be parsed, in words a client developer can act on.
fn parse_error(bytes: &[u8], e: &serde_json::Error) -> String {
    match serde_json::from_slice::<OpOnly>(bytes) {
        Err(_) => format!("invalid JSON: {e}"),
        Ok(OpOnly { op: None }) => "missing op".to_owned(),
        Ok(OpOnly {
            op: Some(serde_json::Value::String(op)),
        }) if !OPS.contains(&op.as_str()) => {
            format!("unknown op {op:?}")
        }
        Ok(_) => format!("bad request: {e}"),
    }
}

/// The uid and group a client names itself (development mode and
/// `--insecure`): `?uid=U&group=G`, or the hello's `uid` and `group`.
fn named_identity(info: &ConnectInfo) -> Result<(String, Option<String>), String> {
    let (uid, group) = match info.transport {
        Transport::Tcp => {
            let h = hello(info)?;
            (h.uid.unwrap_or_default(), h.group)
        }
        _ => {
            let uid = info
                .query_param("uid")
                .ok_or("uid query parameter required")?;
            let group = info.query_param("group").map(|g| g.into_owned());
            (uid.into_owned(), group)
        }
    };
    check_name("uid", &uid)?;
    let group = group.filter(|g| !g.is_empty());
    if let Some(g) = &group {
        check_name("group", g)?;
    }
    Ok((uid, group))
}

/// A TCP client's hello, checked.
fn hello(info: &ConnectInfo) -> Result<Hello, String> {
    let hello = info.hello.as_ref().ok_or("expected a hello line")?;
    let h: Hello =
        serde_json::from_slice(hello.data()).map_err(|e| format!("invalid hello: {e}"))?;
    if h.op != "hello" {
        return Err(format!("expected op \"hello\", got {:?}", h.op));
    }
    Ok(h)
}

fn refuse(status: switchboard::http::StatusCode, reason: &str) -> Decision {
    Reject::new(reason)
        .status(status)
        .reply(error_frame(reason))
        .into()
}

/// What a request asks to do, for the permission check: the action and the
/// names it concerns.
fn wants(req: &Request) -> (Action, &'static str, Vec<&str>) {
    match req {
        Request::ToUser { uid, .. } => (Action::PushUser, "to_user", vec![uid.as_str()]),
        Request::ToUsers { uids, .. } => (
            Action::PushUser,
            "to_users",
            uids.iter().map(String::as_str).collect(),
        ),
        Request::ToGroup { group, .. } => (Action::PushGroup, "to_group", vec![group.as_str()]),
        Request::ToAll { .. } => (Action::PushAll, "to_all", vec![""]),
        Request::ToConn { .. } => (Action::PushConn, "to_conn", vec![""]),
        Request::Join { group } => (Action::Join, "join", vec![group.as_str()]),
        Request::Leave { group } => (Action::Join, "leave", vec![group.as_str()]),
        Request::Online { uid } => (Action::QueryOnline, "online", vec![uid.as_str()]),
        Request::GroupCount { group } => (Action::QueryGroup, "group_count", vec![group.as_str()]),
        Request::Refresh { .. } => (Action::PushAll, "refresh", Vec::new()),
    }
}

impl ReferenceApp {
    /// Accepts a client that proved who it is: by a token, or by the
    /// connect proxy's answer.
    async fn admit_token(
        &self,
        hub: &Hub,
        info: &ConnectInfo,
    ) -> Result<(Accept, Permissions), Decision> {
        let sec = &self.inner.security;
        let mut id: Identity = match (&sec.jwt, &sec.proxy) {
            (Some(jwt), _) => jwt.verify_connect(info).map_err(|e| {
                let r = e.reject();
                refuse(r.http_status(), r.reason())
            })?,
            (None, Some(proxy)) => proxy.check(info).await.map_err(|e| {
                let r = e.reject();
                refuse(r.http_status(), r.reason())
            })?,
            (None, None) => unreachable!("called with authentication on"),
        };
        if let Transport::Tcp = info.transport {
            hello(info).map_err(|e| refuse(switchboard::http::StatusCode::BAD_REQUEST, &e))?;
        }
        id.can.extend(&self.inner.security.can);
        if let Some(exp) = id.expires {
            self.watch(hub, &info.conn, exp);
        }
        let mut session = id.session.clone();
        session.insert(SESSION_UID.into(), id.user.to_string());
        session.insert(
            SESSION_CAN.into(),
            serde_json::to_string(&id.can.to_strings()).unwrap_or_default(),
        );
        if let Some(exp) = id.expires {
            session.insert(SESSION_EXP.into(), exp.to_string());
        }
        let can = id.can.clone();
        Ok((id.accept().session(session), can))
    }

    /// The grant of an authenticated connection: cached, or read back from
    /// its session (its first message here).
    async fn grant(&self, hub: &Hub, conn: &ConnId) -> Option<Arc<Grant>> {
        if let Some(g) = read(&self.inner.grants).get(conn) {
            return Some(g.clone());
        }
        let session = hub.session(conn).await.ok()?;
        let can: Vec<String> = serde_json::from_str(session.get(SESSION_CAN)?).ok()?;
        let grant = Arc::new(Grant {
            uid: session.get(SESSION_UID)?.clone(),
            can: Permissions::parse(can).ok()?,
            exp: session.get(SESSION_EXP).and_then(|e| e.parse().ok()),
        });
        write(&self.inner.grants).insert(conn.clone(), grant.clone());
        Some(grant)
    }

    /// Remembers when a connection's token expires; the watcher, started
    /// with the first such token, tells the client then and closes it after
    /// [`Security::refresh_grace`] unless it refreshed.
    fn watch(&self, hub: &Hub, conn: &ConnId, exp: u64) {
        lock(&self.inner.deadlines).insert(
            (exp.saturating_mul(1000), conn.clone()),
            Deadline::Warn(exp),
        );
        self.inner.watcher.get_or_init(|| {
            let (app, hub) = (self.clone(), hub.clone());
            // Owned by the hub: it ends when the hub shuts down.
            tokio::spawn(async move {
                let closing = hub.closing();
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        () = closing.cancelled() => return,
                        _ = tick.tick() => app.expire(&hub).await,
                    }
                }
            });
        });
    }

    /// Acts on the deadlines that have passed.
    async fn expire(&self, hub: &Hub) {
        let now = now_ms();
        let due: Vec<((u64, ConnId), Deadline)> = {
            let mut d = lock(&self.inner.deadlines);
            let later = d.split_off(&(now + 1, ConnId::new(hub.node_id().clone(), 0)));
            std::mem::replace(&mut *d, later).into_iter().collect()
        };
        for ((_, conn), deadline) in due {
            let current = self.current_exp(hub, &conn).await;
            match deadline {
                // Refreshed since, or gone.
                Deadline::Warn(exp) | Deadline::Close(exp) if current != Some(exp) => {}
                Deadline::Warn(exp) => {
                    let grace = self.inner.security.refresh_grace;
                    let reason = format!(
                        "the token has expired: send {{\"op\":\"refresh\",\"token\":\"...\"}} within {} s or be closed",
                        grace.as_secs_f64()
                    );
                    let _ = hub.to_conn(
                        &conn,
                        Frame::text(json!({"op": "expired", "reason": reason}).to_string()),
                    );
                    lock(&self.inner.deadlines)
                        .insert((now + grace.as_millis() as u64, conn), Deadline::Close(exp));
                }
                Deadline::Close(_) => {
                    self.inner.counters.expired.fetch_add(1, Ordering::Relaxed);
                    hub.close(&Target::conn(conn), "token expired");
                }
            }
        }
    }

    /// The expiry a connection's token has now, if it is open.
    async fn current_exp(&self, hub: &Hub, conn: &ConnId) -> Option<u64> {
        let cached = read(&self.inner.grants).get(conn).map(|g| g.exp);
        match cached {
            Some(exp) => return exp,
            None if !hub.conn_exists(conn).await.value => return None,
            None => {}
        }
        self.grant(hub, conn).await.and_then(|g| g.exp)
    }

    /// `refresh`: a fresh token for the same uid extends the connection.
    async fn refresh(&self, hub: &Hub, conn: &ConnId, grant: &Grant, token: &str) -> Frame {
        let Some(jwt) = &self.inner.security.jwt else {
            return error_frame("refresh: this server does not take tokens");
        };
        let mut id = match jwt.verify(token) {
            Ok(id) => id,
            Err(e) => return error_frame(&format!("refresh: {e}")),
        };
        if id.user.as_str() != grant.uid {
            return error_frame("refresh: the token is for another uid");
        }
        id.can.extend(&self.inner.security.can);
        let mut changes = vec![(
            SESSION_CAN.to_owned(),
            Some(serde_json::to_string(&id.can.to_strings()).unwrap_or_default()),
        )];
        changes.push((SESSION_EXP.to_owned(), id.expires.map(|e| e.to_string())));
        if let Err(e) = hub.update_session(conn, changes).await {
            return error_frame(&format!("refresh: {e}"));
        }
        write(&self.inner.grants).insert(
            conn.clone(),
            Arc::new(Grant {
                uid: grant.uid.clone(),
                can: id.can,
                exp: id.expires,
            }),
        );
        if let Some(exp) = id.expires {
            self.watch(hub, conn, exp);
        }
        self.inner
            .counters
            .refreshed
            .fetch_add(1, Ordering::Relaxed);
        Frame::text(json!({"op": "refreshed", "expires": id.expires}).to_string())
    }
}

impl crate::node::Probe for ReferenceApp {
    fn key(&self) -> &'static str {
        "app"
    }
    fn stats(&self) -> serde_json::Value {
        ReferenceApp::stats(self)
    }
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

#[async_trait]
impl Handler for ReferenceApp {
    async fn on_connect(&self, hub: &Hub, info: &ConnectInfo) -> Decision {
        let sec = &self.inner.security;
        let refused = |d: Decision| {
            self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            d
        };
        if let Some(origin) = info.headers.get(switchboard::http::header::ORIGIN)
            && !sec.origin_allowed(origin.to_str().unwrap_or(""))
        {
            let reason = format!(
                "origin {:?} is not allowed (--allowed-origins)",
                String::from_utf8_lossy(origin.as_bytes())
            );
            return refused(refuse(switchboard::http::StatusCode::FORBIDDEN, &reason));
        }
        let (accept, can) = if sec.authenticates() {
            match self.admit_token(hub, info).await {
                Ok(a) => a,
                Err(d) => return refused(d),
            }
        } else {
            match named_identity(info) {
                Ok((uid, group)) => {
                    let a = Accept::new().bind(uid);
                    let a = match group {
                        Some(g) => a.join(g),
                        None => a,
                    };
                    (a, Permissions::everything())
                }
                Err(reason) => {
                    return refuse(switchboard::http::StatusCode::BAD_REQUEST, &reason);
                }
            }
        };
        let uid = accept.user().map(|u| u.to_string()).unwrap_or_default();
        if let Some(max) = sec.max_conns_per_uid {
            let held = hub.user_conns(uid.as_str()).await;
            if held.value.len() >= max {
                let reason =
                    format!("{uid:?} already holds {max} connections (the most one uid may)");
                return refused(refuse(
                    switchboard::http::StatusCode::TOO_MANY_REQUESTS,
                    &reason,
                ));
            }
        }
        let mut welcome = json!({
            "op": "welcome",
            "conn": info.conn.to_string(),
            // The node holding the socket: a gateway's, when the application
            // runs in a worker.
            "node": info.conn.node().as_str(),
            "uid": uid,
        });
        if let Some(exp) = accept.initial_session().get(SESSION_EXP) {
            welcome["expires"] = json!(exp.parse::<u64>().ok());
        }
        if let Some((events, _)) = &self.inner.events {
            let transport = match info.transport {
                Transport::Tcp => "tcp",
                _ => "websocket",
            };
            events.connect(&info.conn, accept.user().map(|u| u.as_str()), transport);
        }
        let mut accept = accept.greet(Frame::text(welcome.to_string()));
        match recover_requests(info) {
            Ok(asked) => {
                for (stream, pos) in asked {
                    let allowed = match StreamOf::parse(&stream) {
                        Some(StreamOf::User(u)) => u == uid,
                        Some(StreamOf::Group(g)) => can.allows(Action::Join, g),
                        None => false,
                    };
                    if !allowed {
                        self.inner.counters.denied.fetch_add(1, Ordering::Relaxed);
                        accept = accept
                            .greet(error_frame(&format!("not permitted: recover {stream:?}")));
                        continue;
                    }
                    // A group's live entries reach members only.
                    if let Some(StreamOf::Group(g)) = StreamOf::parse(&stream)
                        && !accept.groups().iter().any(|m| m.as_str() == g)
                    {
                        let g = g.to_owned();
                        accept = accept.join(g);
                    }
                    accept = accept.recover(stream, pos);
                }
            }
            Err(reason) => accept = accept.greet(error_frame(&reason)),
        }
        accept.into()
    }

    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: Frame) {
        let req = match serde_json::from_slice::<Request>(frame.data()) {
            Ok(r) => r,
            Err(_) if foreign(frame.data()) && self.forward(hub, conn, &frame).await => return,
            Err(e) => {
                let _ = hub.to_conn(conn, error_frame(&parse_error(frame.data(), &e)));
                return;
            }
        };
        // With authentication on, every request is checked against what the
        // connection's token and the node's --can allow.
        if self.inner.security.authenticates() {
            let Some(grant) = self.grant(hub, conn).await else {
                let _ = hub.to_conn(
                    conn,
                    error_frame("not permitted: no grant found for this connection"),
                );
                return;
            };
            if let Request::Refresh { token } = &req {
                let reply = self.refresh(hub, conn, &grant, token).await;
                let _ = hub.to_conn(conn, reply);
                return;
            }
            let (action, op, names) = wants(&req);
            if let Some(name) = names.iter().find(|n| !grant.can.allows(action, n)) {
                self.inner.counters.denied.fetch_add(1, Ordering::Relaxed);
                let what = if name.is_empty() {
                    op.to_owned()
                } else {
                    format!("{op} {name:?}")
                };
                let _ = hub.to_conn(conn, error_frame(&format!("not permitted: {what}")));
                return;
            }
        }
        let reply = match req {
            Request::ToUser { uid, data } => push(hub, &Target::user(uid), data).await,
            Request::ToUsers { uids, data } => push(hub, &Target::users(uids), data).await,
            Request::ToGroup { group, data } => push(hub, &Target::group(group), data).await,
            Request::ToAll { data } => push(hub, &Target::all(), data).await,
            Request::ToConn { conn: to, data } => match to.parse::<ConnId>() {
                Ok(to) => push(hub, &Target::conn(to), data).await,
                Err(e) => Some(error_frame(&e.to_string())),
            },
            Request::Join { group } => hub
                .join(conn, group)
                .await
                .err()
                .map(|e| error_frame(&e.to_string())),
            Request::Leave { group } => hub
                .leave(conn, group)
                .await
                .err()
                .map(|e| error_frame(&e.to_string())),
            Request::Online { uid } => {
                let a = hub.is_online(uid.as_str()).await;
                let mut r = json!({"op": "online", "uid": uid, "online": a.value});
                incomplete(&mut r, &a.missing);
                Some(Frame::text(r.to_string()))
            }
            Request::GroupCount { group } => {
                let a = hub.group_count(group.as_str()).await;
                let mut r = json!({"op": "group_count", "group": group, "count": a.value});
                incomplete(&mut r, &a.missing);
                Some(Frame::text(r.to_string()))
            }
            Request::Refresh { .. } => Some(error_frame(
                "refresh: this server does not authenticate clients",
            )),
        };
        if let Some(reply) = reply {
            let _ = hub.to_conn(conn, reply);
        }
    }

    async fn on_rate_limited(&self, hub: &Hub, conn: &ConnId) {
        let rate = hub.limits().message_rate.map_or(0.0, |r| r.per_second);
        let reason =
            format!("rate limited: at most {rate} messages a second; this one was not handled");
        let _ = hub.to_conn(conn, error_frame(&reason));
    }

    fn close_notice(&self, hub: &Hub, reason: &CloseReason) -> Option<Frame> {
        match reason {
            CloseReason::TooBig => Some(error_frame(&format!(
                "message too big: at most {} bytes; closing",
                hub.limits().max_message_size
            ))),
            CloseReason::Policy(r) => Some(error_frame(&format!("{r}; closing"))),
            CloseReason::Kicked(r) if r == "token expired" => Some(error_frame(
                "the token expired and was not refreshed; closing",
            )),
            _ => None,
        }
    }

    async fn on_close(&self, _hub: &Hub, conn: &ConnId, reason: &CloseReason) {
        if self.inner.security.authenticates() {
            write(&self.inner.grants).remove(conn);
        }
        if let Some((events, presence)) = &self.inner.events {
            let uid = presence.closed_user(conn);
            events.close(conn, uid.as_ref().map(|u| u.as_str()), &reason.to_string());
        }
    }

    fn on_peer_message(&self, _hub: &Hub, from: &switchboard::NodeId, data: bytes::Bytes) {
        if let Some((_, presence)) = &self.inner.events {
            presence.peer_message(from, data);
        }
    }
}

/// Pushes `data` verbatim as one text frame, or recorded when
/// `--history-record` names its streams.
async fn push(hub: &Hub, target: &Target, data: String) -> Option<Frame> {
    match crate::history::push(hub, target, Frame::text(data), false).await {
        Ok(_) => None,
        Err(e) => Some(error_frame(&e.to_string())),
    }
}

/// The streams a connecting client asks to recover: `?recover=STREAM@POS`
/// (repeatable) on WebSocket, the hello's `recover` on TCP.
fn recover_requests(info: &ConnectInfo) -> Result<Vec<(String, switchboard::Position)>, String> {
    let asked: Vec<String> = match info.transport {
        Transport::Tcp => match hello(info)?.recover {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        },
        _ => info
            .query_params("recover")
            .map(|s| s.into_owned())
            .collect(),
    };
    if asked.len() > MAX_RECOVER {
        return Err(format!(
            "recover: at most {MAX_RECOVER} streams at once; none recovered"
        ));
    }
    asked
        .into_iter()
        .map(|r| {
            let (stream, pos) = r
                .rsplit_once('@')
                .ok_or_else(|| format!("recover {r:?}: expected STREAM@POSITION"))?;
            if StreamOf::parse(stream).is_none() {
                return Err(format!(
                    "recover {r:?}: a stream is user:UID or group:GROUP"
                ));
            }
            let pos = pos.parse().map_err(|e| format!("recover {r:?}: {e}"))?;
            Ok((stream.to_owned(), pos))
        })
        .collect()
}

/// Marks an answer that some nodes did not contribute to, rather than passing a
/// partial answer off as the truth.
fn incomplete(reply: &mut serde_json::Value, missing: &[switchboard::NodeId]) {
    if !missing.is_empty() {
        reply["complete"] = json!(false);
        reply["missing"] = json!(missing.iter().map(|n| n.as_str()).collect::<Vec<_>>());
    }
}
