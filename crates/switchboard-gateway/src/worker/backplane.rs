//! The worker hub's cluster: every gateway is a peer node, reached through
//! GatewayWorker commands.
//!
//! The hub hands this backplane the same envelopes it hands Redis or
//! RabbitMQ. Pushes become one command per gateway (`SEND_TO_UID`,
//! `SEND_TO_GROUP`, `SEND_TO_ALL`) or per connection (`SEND_TO_ONE`), with
//! the frame encoded once and shared; a target no single command expresses
//! (a union with exclusions) is resolved with `CMD_SELECT` first, so it is
//! still delivered once to each recipient; a close is resolved the same way.
//! A look-up holds its place on each link (see [`super::link`]): what the
//! hub issues after it to the same gateway waits for its answer, so pushes
//! and closes reach a client in the order the hub made them, and the hub's
//! caller never waits. Operations on a connection become
//! its gateway's command followed by a query on the same link, whose answer
//! both confirms the gateway applied it and says whether the connection
//! exists. Queries are asked of every gateway the register names, and a
//! gateway that does not answer is reported missing. Every query a publish
//! leads to, look-ups included, is given up at the query timeout counted
//! from the publish, so a link gives up on an unanswered query (and closes)
//! no later than the hub's caller does.
//!
//! Each envelope a gateway misses counts once in `publish_dropped`: either
//! in the hand-off `publish` returns (no link, or the link refused it), or,
//! when it was lost after the hand-off said sent, in the links' own count.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::{Bytes, BytesMut};
use switchboard::async_trait;
use switchboard::core::backplane::{
    BackplaneStats, Handoff, Inbound, JoinContext, JoinError, Status,
};
use switchboard::core::query::{LocalAnswer, LocalTotals};
use switchboard::core::{
    Backplane, Body, ConnId, Dest, Envelope, Frame, NodeId, Op, OpResult, Query, Session, Target,
};
use tokio::time::Instant;

use super::link::{self, Link};
use super::{Shared, body_flag};
use crate::protocol::cmd;
use crate::protocol::php::Value;
use crate::protocol::query::{Condition, Id, IdList, Select, SendToAll, SendToGroup};

/// The backplane of a worker's hub.
pub(crate) struct Links {
    shared: Weak<Shared>,
    inbound: OnceLock<Inbound>,
    published: AtomicU64,
    /// Refused at hand-off: the `dropped` of the hand-offs returned.
    dropped: AtomicU64,
    /// Lost by the links after the hand-off (see [`super::link`]).
    link_dropped: Arc<AtomicU64>,
}

impl Links {
    pub(crate) fn new(shared: Weak<Shared>, link_dropped: Arc<AtomicU64>) -> Self {
        Self {
            shared,
            inbound: OnceLock::new(),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            link_dropped,
        }
    }

    fn count(&self, h: Handoff) -> Handoff {
        self.published
            .fetch_add(u64::from(h.sent), Ordering::Relaxed);
        self.dropped
            .fetch_add(u64::from(h.dropped), Ordering::Relaxed);
        h
    }
}

/// What one command to every gateway costs: sent to the live links,
/// dropped for the gateways the register names that are not linked.
fn to_all(shared: &Shared, bytes: &Bytes) -> Handoff {
    let mut h = Handoff::default();
    let links = shared.all_links();
    for l in &links {
        if l.deliver(bytes.clone()) {
            h.sent += 1;
        } else {
            h.dropped += 1;
        }
    }
    let known = shared.known_gateways();
    h.dropped += known
        .iter()
        .filter(|n| !links.iter().any(|l| &l.node == *n))
        .count() as u32;
    h
}

fn ids<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Id> {
    names.into_iter().map(Id::from).collect()
}

/// `CMD_SEND_TO_GROUP`'s ext_data for the target's groups.
fn group_ext(target: &Target, exclude: Option<Vec<u32>>) -> Bytes {
    let groups = ids(target.included_groups().iter().map(|g| g.as_str()));
    Bytes::from(SendToGroup { groups, exclude }.encode())
}

fn select(fields: &[&str], conditions: Vec<Condition>) -> Bytes {
    let fields = fields.iter().map(|f| (*f).to_owned()).collect();
    Bytes::from(Select { fields, conditions }.encode())
}

fn send_cmd(c: u8, ext_data: Bytes, frame: &Frame) -> Bytes {
    link::one(c, 0, body_flag(frame), ext_data, frame.data().clone())
}

#[async_trait]
impl Backplane for Links {
    async fn join(&self, ctx: JoinContext) -> Result<(), JoinError> {
        let _ = self.inbound.set(ctx.inbound);
        Ok(())
    }

    fn publish(&self, dest: Dest<'_>, envelope: Bytes) -> Handoff {
        let Some(shared) = self.shared.upgrade() else {
            return self.count(Handoff {
                sent: 0,
                dropped: 1,
            });
        };
        let Ok(env) = Envelope::decode(&envelope) else {
            return self.count(Handoff {
                sent: 0,
                dropped: 1,
            });
        };
        // The hub's caller starts waiting after this: a link's deadline for
        // what follows is never later than the caller's.
        let deadline = Instant::now() + shared.cfg.query_timeout;
        let h = match env.body {
            // Gateways hold the connections and know nothing of recovery:
            // a recorded push reaches them as its frame.
            Body::Push { target, frame } | Body::Recorded { target, frame, .. } => {
                push(&shared, &target, &frame, deadline)
            }
            Body::Close { target, .. } => close(&shared, &target, deadline),
            Body::Request { op } => {
                let nodes = match dest {
                    Dest::Node(n) => vec![n.clone()],
                    _ => shared.known_gateways().to_vec(),
                };
                let mut h = Handoff::default();
                for node in nodes {
                    let Some(l) = shared.link(&node) else {
                        h.dropped += 1;
                        continue;
                    };
                    h.sent += 1;
                    let inbound = self.inbound.get().cloned();
                    let op = op.clone();
                    let id = env.id;
                    shared.tasks.spawn(async move {
                        let query = matches!(op, Op::Query(_));
                        let result = run_op(&l, op, deadline).await;
                        if query && matches!(result, OpResult::Failed(_)) {
                            // The hub counts a gateway that replies to a
                            // cluster query as answered, even with a
                            // failure; only one that sends nothing is
                            // reported missing, which is the truth here.
                            return;
                        }
                        let reply = Envelope {
                            origin: l.node.clone(),
                            id,
                            body: Body::Reply { result },
                        }
                        .encode();
                        if let Some(inbound) = inbound {
                            let _ = inbound.try_send(reply);
                        }
                    });
                }
                h
            }
            _ => Handoff::default(),
        };
        self.count(h)
    }

    fn peers(&self) -> Vec<NodeId> {
        self.shared
            .upgrade()
            .map(|s| s.known_gateways().to_vec())
            .unwrap_or_default()
    }

    fn status(&self) -> Status {
        match self.shared.upgrade() {
            Some(s) if !s.all_links().is_empty() => Status::Ready,
            _ => Status::Connecting {
                reason: "no gateway linked".into(),
            },
        }
    }

    fn stats(&self) -> BackplaneStats {
        BackplaneStats {
            published: self.published.load(Ordering::Relaxed),
            publish_dropped: self.dropped.load(Ordering::Relaxed)
                + self.link_dropped.load(Ordering::Relaxed),
            ..BackplaneStats::default()
        }
    }

    async fn leave(&self) {}
}

/// One push, as the fewest GatewayWorker commands that deliver it exactly.
fn push(shared: &Arc<Shared>, target: &Target, frame: &Frame, deadline: Instant) -> Handoff {
    let only_conns = !target.is_all()
        && target.included_users().is_empty()
        && target.included_groups().is_empty()
        && target.excluded_users().is_empty();
    if only_conns {
        let mut h = Handoff::default();
        let except: BTreeSet<&ConnId> = target.excluded_conns().iter().collect();
        for c in target.conns().iter().filter(|c| !except.contains(c)) {
            match shared.link(c.node()) {
                Some(l)
                    if l.deliver(link::one(
                        cmd::SEND_TO_ONE,
                        c.seq() as u32,
                        body_flag(frame),
                        Bytes::new(),
                        frame.data().clone(),
                    )) =>
                {
                    h.sent += 1
                }
                _ => h.dropped += 1,
            }
        }
        return h;
    }
    let plain_users = !target.is_all()
        && target.conns().is_empty()
        && target.included_groups().is_empty()
        && target.excluded_users().is_empty()
        && target.excluded_conns().is_empty();
    if plain_users {
        let uids = IdList(ids(target.included_users().iter().map(|u| u.as_str())));
        return to_all(
            shared,
            &send_cmd(cmd::SEND_TO_UID, Bytes::from(uids.encode()), frame),
        );
    }
    let groups_except_conns = !target.is_all()
        && target.conns().is_empty()
        && target.included_users().is_empty()
        && target.excluded_users().is_empty();
    let all_except_conns = target.is_all() && target.excluded_users().is_empty();
    if groups_except_conns || all_except_conns {
        if target.excluded_conns().is_empty() {
            let bytes = if all_except_conns {
                send_cmd(cmd::SEND_TO_ALL, Bytes::new(), frame)
            } else {
                send_cmd(cmd::SEND_TO_GROUP, group_ext(target, None), frame)
            };
            return to_all(shared, &bytes);
        }
        // Each gateway gets only its own connections in the exclusion map.
        let mut h = Handoff::default();
        for l in shared.all_links() {
            let mine: Vec<u32> = target
                .excluded_conns()
                .iter()
                .filter(|c| c.node() == &l.node)
                .map(|c| c.seq() as u32)
                .collect();
            let bytes = if all_except_conns {
                let ext = Bytes::from(SendToAll::Exclude(mine).encode());
                send_cmd(cmd::SEND_TO_ALL, ext, frame)
            } else {
                send_cmd(cmd::SEND_TO_GROUP, group_ext(target, Some(mine)), frame)
            };
            if l.deliver(bytes) {
                h.sent += 1;
            } else {
                h.dropped += 1;
            }
        }
        return h;
    }
    // A union no single command expresses: resolve it, then send once.
    let frame = frame.clone();
    look_up(shared, target, deadline, move |conns| {
        let ids = conns.iter().map(|c| c.seq() as u32).collect();
        let ext = Bytes::from(SendToAll::Connections(ids).encode());
        send_cmd(cmd::SEND_TO_ALL, ext, &frame)
    })
}

/// Closes the connections a target selects.
fn close(shared: &Arc<Shared>, target: &Target, deadline: Instant) -> Handoff {
    look_up(shared, target, deadline, |conns| {
        let mut kicks = BytesMut::new();
        for c in conns {
            link::frame(
                &mut kicks,
                cmd::KICK,
                c.seq() as u32,
                0,
                Bytes::new(),
                Bytes::from(crate::protocol::php::to_bytes(&Value::Null)),
            );
        }
        kicks.freeze()
    })
}

/// Looks up on every gateway the connections `target` selects, and sends
/// what `then` makes of them (when there are some) in the look-up's place on
/// the link. A look-up unanswered by `deadline` is dropped, and its link
/// given up.
fn look_up<F>(shared: &Arc<Shared>, target: &Target, deadline: Instant, then: F) -> Handoff
where
    F: Fn(&[ConnId]) -> Bytes + Clone + Send + 'static,
{
    let mut h = Handoff::default();
    for l in shared.all_links() {
        let Some(select) = selection(&l, target) else {
            // Nothing of this gateway's is selected.
            h.sent += 1;
            continue;
        };
        let Some(pending) = l.look_up(select, deadline) else {
            h.dropped += 1;
            continue;
        };
        h.sent += 1;
        let (target, then) = (target.clone(), then.clone());
        shared.tasks.spawn(async move {
            let Ok(rows) = l.reply_by(pending.reply, deadline).await else {
                // Dropped unfilled: counted.
                return;
            };
            let conns = selected(&l, &target, &rows);
            let frames = if conns.is_empty() {
                Bytes::new()
            } else {
                then(&conns)
            };
            pending.place.fill(frames);
        });
    }
    h
}

/// The `CMD_SELECT` for the connections of `l`'s gateway a target selects;
/// `None` when the target names none there.
fn selection(l: &Link, target: &Target) -> Option<Bytes> {
    let mut conds = Vec::new();
    if !target.is_all() {
        let mine: Vec<u32> = target
            .conns()
            .iter()
            .filter(|c| c.node() == &l.node)
            .map(|c| c.seq() as u32)
            .collect();
        if !mine.is_empty() {
            conds.push(Condition::ConnectionIds(mine));
        }
        if !target.included_users().is_empty() {
            conds.push(Condition::Uids(ids(target
                .included_users()
                .iter()
                .map(|u| u.as_str()))));
        }
        if !target.included_groups().is_empty() {
            conds.push(Condition::Groups(ids(target
                .included_groups()
                .iter()
                .map(|g| g.as_str()))));
        }
        if conds.is_empty() {
            return None;
        }
    }
    Some(link::plain(cmd::SELECT, 0, select(&["uid"], conds)))
}

/// The connections of a `CMD_SELECT`'s answer a target keeps.
fn selected(l: &Link, target: &Target, rows: &Value) -> Vec<ConnId> {
    let Value::Array(rows) = rows else {
        return Vec::new();
    };
    let except_users: BTreeSet<&str> = target.excluded_users().iter().map(|u| u.as_str()).collect();
    let except_conns: BTreeSet<&ConnId> = target.excluded_conns().iter().collect();
    let mut out = Vec::new();
    for (k, row) in rows.iter() {
        let Some(id) = key_int(k) else { continue };
        let conn = ConnId::new(l.node.clone(), id);
        if except_conns.contains(&conn) {
            continue;
        }
        let uid = match row {
            Value::Array(r) => r.get(&str_key("uid")).and_then(text),
            _ => None,
        };
        if uid.as_deref().is_some_and(|u| except_users.contains(u)) {
            continue;
        }
        out.push(conn);
    }
    out
}

fn str_key(s: &'static str) -> crate::protocol::php::Key {
    crate::protocol::php::Key::Str(Bytes::from_static(s.as_bytes()))
}

fn key_int(k: &crate::protocol::php::Key) -> Option<u64> {
    match k {
        crate::protocol::php::Key::Int(i) => u64::try_from(*i).ok(),
        crate::protocol::php::Key::Str(s) => std::str::from_utf8(s).ok()?.parse().ok(),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Bool(b) => Some(i64::from(*b)),
        Value::Str(s) => std::str::from_utf8(s).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Str(s) => Some(String::from_utf8_lossy(s).into_owned()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Connection ids listed as the values of a PHP list.
fn id_values(l: &Link, v: &Value) -> Vec<ConnId> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|(_, v)| int(v))
            .filter_map(|i| u64::try_from(i).ok())
            .map(|i| ConnId::new(l.node.clone(), i))
            .collect(),
        _ => Vec::new(),
    }
}

/// Connection ids listed as the keys of a PHP array.
fn id_keys(l: &Link, v: &Value) -> Vec<ConnId> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|(k, _)| key_int(k))
            .map(|i| ConnId::new(l.node.clone(), i))
            .collect(),
        _ => Vec::new(),
    }
}

/// A command on a connection, confirmed: `CMD_IS_ONLINE` after it on the
/// same link answers once the gateway has applied it.
async fn confirmed(l: &Link, mut frames: BytesMut, conn: &ConnId, deadline: Instant) -> OpResult {
    let id = conn.seq() as u32;
    link::frame(
        &mut frames,
        cmd::IS_ONLINE,
        id,
        cmd::FLAG_BODY_IS_SCALAR,
        Bytes::new(),
        Bytes::new(),
    );
    match l.query(frames.freeze(), deadline).await {
        Ok(v) if int(&v) == Some(1) => OpResult::Done,
        Ok(_) => OpResult::NoSuchConn,
        Err(_) => OpResult::Failed("gateway link lost".into()),
    }
}

fn command(c: u8, conn: &ConnId, ext_data: Bytes) -> BytesMut {
    let mut b = BytesMut::new();
    link::frame(
        &mut b,
        c,
        conn.seq() as u32,
        cmd::FLAG_BODY_IS_SCALAR,
        ext_data,
        Bytes::new(),
    );
    b
}

fn str_bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn session_of(
    l: &Link,
    conn: &ConnId,
    deadline: Instant,
) -> Result<Option<Session>, OpResult> {
    match l
        .query(
            link::plain(
                cmd::GET_SESSION_BY_CLIENT_ID,
                conn.seq() as u32,
                Bytes::new(),
            ),
            deadline,
        )
        .await
    {
        Ok(Value::Null) => Ok(None),
        Ok(v) => Ok(Some(crate::session::from_php(&v))),
        Err(_) => Err(OpResult::Failed("gateway link lost".into())),
    }
}

fn set_session(conn: &ConnId, s: &Session) -> BytesMut {
    let php = crate::session::to_php(s.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    command(cmd::SET_SESSION, conn, php)
}

/// Carries out a hub operation on one gateway, giving up at `deadline`.
async fn run_op(l: &Link, op: Op, deadline: Instant) -> OpResult {
    match op {
        Op::Bind { conn, user } => {
            confirmed(
                l,
                command(cmd::BIND_UID, &conn, str_bytes(user.as_str())),
                &conn,
                deadline,
            )
            .await
        }
        Op::Unbind { conn } => {
            confirmed(
                l,
                command(cmd::UNBIND_UID, &conn, Bytes::new()),
                &conn,
                deadline,
            )
            .await
        }
        Op::Join { conn, group } => {
            confirmed(
                l,
                command(cmd::JOIN_GROUP, &conn, str_bytes(group.as_str())),
                &conn,
                deadline,
            )
            .await
        }
        Op::Leave { conn, group } => {
            confirmed(
                l,
                command(cmd::LEAVE_GROUP, &conn, str_bytes(group.as_str())),
                &conn,
                deadline,
            )
            .await
        }
        Op::SessionGet { conn } => match session_of(l, &conn, deadline).await {
            Ok(Some(s)) => OpResult::Session(s),
            Ok(None) => OpResult::NoSuchConn,
            Err(e) => e,
        },
        Op::SessionReplace { conn, session } => {
            confirmed(l, set_session(&conn, &session), &conn, deadline).await
        }
        Op::SessionUpdate { conn, changes } => {
            if changes.iter().all(|(_, v)| v.is_some()) {
                let php = crate::session::to_php(
                    changes
                        .iter()
                        .filter_map(|(k, v)| v.as_deref().map(|v| (k.as_str(), v))),
                );
                return confirmed(l, command(cmd::UPDATE_SESSION, &conn, php), &conn, deadline)
                    .await;
            }
            // Removing keys has no merge command: read, change, write.
            let mut s = match session_of(l, &conn, deadline).await {
                Ok(Some(s)) => s,
                Ok(None) => return OpResult::NoSuchConn,
                Err(e) => return e,
            };
            for (k, v) in changes {
                match v {
                    Some(v) => s.insert(k, v),
                    None => s.remove(&k),
                };
            }
            confirmed(l, set_session(&conn, &s), &conn, deadline).await
        }
        Op::Query(q) => match answer(l, q, deadline).await {
            Some(a) => OpResult::Answer(a),
            None => OpResult::Failed("gateway link lost".into()),
        },
        _ => OpResult::Failed("unsupported operation".into()),
    }
}

/// Answers a query for one gateway's clients.
async fn answer(l: &Link, q: Query, deadline: Instant) -> Option<LocalAnswer> {
    let ask = |c: u8, conn: u32, ext: Bytes| l.query(link::plain(c, conn, ext), deadline);
    Some(match q {
        Query::ConnExists(c) => {
            let v = ask(cmd::IS_ONLINE, c.seq() as u32, Bytes::new())
                .await
                .ok()?;
            LocalAnswer::Bool(int(&v) == Some(1))
        }
        Query::UserOnline(u) => {
            let v = ask(cmd::GET_CLIENT_ID_BY_UID, 0, str_bytes(u.as_str()))
                .await
                .ok()?;
            LocalAnswer::Bool(!id_values(l, &v).is_empty())
        }
        Query::UserConns(u) => {
            let v = ask(cmd::GET_CLIENT_ID_BY_UID, 0, str_bytes(u.as_str()))
                .await
                .ok()?;
            LocalAnswer::Conns(id_values(l, &v))
        }
        Query::ConnUser(c) => {
            let ext = select(
                &["uid"],
                vec![Condition::ConnectionIds(vec![c.seq() as u32])],
            );
            let v = ask(cmd::SELECT, 0, ext).await.ok()?;
            let uid = match &v {
                Value::Array(rows) => rows.iter().find_map(|(_, row)| match row {
                    Value::Array(r) => r.get(&str_key("uid")).and_then(text),
                    _ => None,
                }),
                _ => None,
            };
            LocalAnswer::User(uid.map(Into::into))
        }
        Query::GroupMembers(g) => {
            let v = ask(cmd::GET_CLIENT_SESSIONS_BY_GROUP, 0, str_bytes(g.as_str()))
                .await
                .ok()?;
            LocalAnswer::Conns(id_keys(l, &v))
        }
        Query::GroupCount(g) => {
            if g.as_str().is_empty() {
                return Some(LocalAnswer::Count(0));
            }
            let v = ask(cmd::GET_CLIENT_COUNT_BY_GROUP, 0, str_bytes(g.as_str()))
                .await
                .ok()?;
            LocalAnswer::Count(int(&v).unwrap_or(0).max(0) as u64)
        }
        Query::Totals => {
            let ext = select(&["uid", "groups"], Vec::new());
            let v = ask(cmd::SELECT, 0, ext).await.ok()?;
            let mut t = LocalTotals::default();
            let (mut users, mut groups) = (BTreeSet::new(), BTreeSet::new());
            if let Value::Array(rows) = v {
                for (_, row) in rows.iter() {
                    t.conns += 1;
                    let Value::Array(r) = row else { continue };
                    if let Some(u) = r.get(&str_key("uid")).and_then(text) {
                        users.insert(u);
                    }
                    if let Some(Value::Array(gs)) = r.get(&str_key("groups")) {
                        groups.extend(gs.iter().filter_map(|(_, g)| text(g)));
                    }
                }
            }
            t.users = users.into_iter().map(Into::into).collect();
            t.groups = groups.into_iter().map(Into::into).collect();
            LocalAnswer::Totals(t)
        }
        _ => return None,
    })
}
