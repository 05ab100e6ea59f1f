//! Carrying out workers' and pushers' commands on the gateway's hub, with
//! GatewayWorker's semantics, and answering its queries.
//!
//! Pushes become one hub push each (the frame shared by every recipient);
//! membership commands become hub operations; sessions are kept here as the
//! PHP-serialized strings GatewayWorker stores, verbatim. A query's reply is a
//! `u32` length and a PHP `serialize` payload, never a frame.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use switchboard::Hub;
use switchboard::core::{ConnId, MembershipChange, Target};

use super::{Shared, lock};
use crate::ext;
use crate::protocol::frame::Frame as GwFrame;
use crate::protocol::php::{self, Array, Key, Value};
use crate::protocol::query::{Condition, Id, IdList, Select, SendToAll, SendToGroup, encode_reply};
use crate::protocol::{cmd, session};

/// PHP's `empty()` of a string: `""` and `"0"`.
fn php_empty(b: &[u8]) -> bool {
    b.is_empty() || b == b"0"
}

fn ids(list: &[Id]) -> Vec<String> {
    list.iter().map(Id::to_string).collect()
}

fn id_list(ext: &[u8]) -> Vec<String> {
    IdList::decode(ext).map(|l| ids(&l.0)).unwrap_or_default()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn reply(v: &Value) -> Option<Bytes> {
    Some(encode_reply(v))
}

fn int_list(ids: impl IntoIterator<Item = u32>) -> Value {
    let mut a = Array::new();
    for (i, id) in ids.into_iter().enumerate() {
        a.insert(Key::Int(i as i64), Value::Int(i64::from(id)));
    }
    Value::Array(a)
}

/// What the gateway knows of each local connection, for listing queries.
#[derive(Default)]
struct Local {
    uid: Option<String>,
    groups: Vec<String>,
}

fn snapshot(hub: &Hub) -> BTreeMap<u32, Local> {
    let mut all: BTreeMap<u32, Local> = BTreeMap::new();
    hub.for_each_local(&mut |c| match c {
        MembershipChange::Opened { conn } => {
            all.entry(conn.seq() as u32).or_default();
        }
        MembershipChange::Bound { conn, user, .. } => {
            all.entry(conn.seq() as u32).or_default().uid = Some(user.as_str().to_owned());
        }
        MembershipChange::Joined { conn, group, .. } => {
            all.entry(conn.seq() as u32)
                .or_default()
                .groups
                .push(group.as_str().to_owned());
        }
        _ => {}
    });
    all
}

impl Shared {
    fn conn(&self, id: u32) -> ConnId {
        ConnId::new(self.node.clone(), u64::from(id))
    }

    fn session_value(&self, id: u32) -> Value {
        match lock(&self.clients).get(&id) {
            Some(c) => Value::Str(c.session.clone()),
            None => Value::Null,
        }
    }
}

/// The frame a push command carries to clients.
fn body_frame(f: &GwFrame) -> switchboard::Frame {
    ext::to_frame(f.header.flag & ext::FLAG_BINARY != 0, f.body.clone())
}

/// Carries out one command; returns the reply for queries.
pub(super) async fn execute(shared: &Shared, hub: &Hub, f: &GwFrame) -> Option<Bytes> {
    let h = &f.header;
    let conn = shared.conn(h.connection_id);
    let ext_data = &f.ext_data[..];
    match h.cmd {
        cmd::SEND_TO_ONE => {
            let _ = hub.to_conn(&conn, body_frame(f));
            None
        }
        cmd::SEND_TO_ALL => {
            let target = match SendToAll::decode(ext_data) {
                Ok(SendToAll::Connections(c)) => {
                    Target::none().and_conns(c.into_iter().map(|i| shared.conn(i)))
                }
                Ok(SendToAll::Exclude(c)) => c
                    .into_iter()
                    .fold(Target::all(), |t, i| t.except_conn(shared.conn(i))),
                Ok(SendToAll::All) => Target::all(),
                Err(error) => {
                    tracing::warn!(node = %shared.node, %error, "bad CMD_SEND_TO_ALL: ignored");
                    return None;
                }
            };
            let _ = hub.push(&target, body_frame(f));
            None
        }
        cmd::SEND_TO_UID => {
            let _ = hub.push(&Target::users(id_list(ext_data)), body_frame(f));
            None
        }
        cmd::SEND_TO_GROUP => {
            let Ok(g) = SendToGroup::decode(ext_data) else {
                tracing::warn!(node = %shared.node, "bad CMD_SEND_TO_GROUP: ignored");
                return None;
            };
            let t = g
                .exclude
                .unwrap_or_default()
                .into_iter()
                .fold(Target::none().and_groups(ids(&g.groups)), |t, i| {
                    t.except_conn(shared.conn(i))
                });
            let _ = hub.push(&t, body_frame(f));
            None
        }
        cmd::KICK => {
            // A scalar body is a goodbye message; `N;` (flag 0) means none.
            if h.flag & cmd::FLAG_BODY_IS_SCALAR != 0 && !f.body.is_empty() {
                let _ = hub.to_conn(&conn, body_frame(f));
            }
            hub.close(&Target::conn(conn), "kicked");
            None
        }
        cmd::DESTROY => {
            hub.close(&Target::conn(conn), "destroyed");
            None
        }
        cmd::BIND_UID => {
            if !php_empty(ext_data) {
                let _ = hub.bind(&conn, text(ext_data)).await;
            }
            None
        }
        cmd::UNBIND_UID => {
            // GatewayWorker ignores the uid it carries.
            let _ = hub.unbind(&conn).await;
            None
        }
        cmd::JOIN_GROUP => {
            if !php_empty(ext_data) {
                let _ = hub.join(&conn, text(ext_data)).await;
            }
            None
        }
        cmd::LEAVE_GROUP => {
            if !php_empty(ext_data) {
                let _ = hub.leave(&conn, text(ext_data)).await;
            }
            None
        }
        cmd::UNGROUP => {
            if !php_empty(ext_data) {
                let group = text(ext_data);
                let members = hub.group_members(group.as_str()).await.value;
                for m in members {
                    let _ = hub.leave(&m, group.as_str()).await;
                }
            }
            None
        }
        cmd::SET_SESSION => {
            if let Some(c) = lock(&shared.clients).get_mut(&h.connection_id) {
                c.session = f.ext_data.clone();
            }
            None
        }
        cmd::UPDATE_SESSION => {
            if let Some(c) = lock(&shared.clients).get_mut(&h.connection_id) {
                match session::merge_update(&c.session, ext_data) {
                    Ok(merged) => c.session = merged,
                    Err(error) => tracing::warn!(
                        conn = h.connection_id,
                        %error,
                        "session update that is not a PHP array: ignored"
                    ),
                }
            }
            None
        }
        cmd::GET_SESSION_BY_CLIENT_ID => {
            let v = match lock(&shared.clients).get(&h.connection_id) {
                None => php::to_bytes(&Value::Null),
                // PHP's `!$session`: "0" reads back as no session too.
                Some(c) if session::is_unset(&c.session) => {
                    php::to_bytes(&Value::Array(Array::new()))
                }
                Some(c) => c.session.to_vec(),
            };
            Some(crate::protocol::query::encode_reply_raw(&v))
        }
        cmd::IS_ONLINE => {
            let online = lock(&shared.clients).contains_key(&h.connection_id)
                && hub.conn_exists(&conn).await.value;
            reply(&Value::Int(i64::from(online)))
        }
        cmd::GET_CLIENT_ID_BY_UID => {
            let conns = hub.user_conns(text(ext_data).as_str()).await.value;
            reply(&int_list(conns.iter().map(|c| c.seq() as u32)))
        }
        cmd::BATCH_GET_CLIENT_ID_BY_UID => {
            let mut a = Array::new();
            for uid in id_list(ext_data) {
                let conns = hub.user_conns(uid.as_str()).await.value;
                a.insert(
                    Key::from_bytes(Bytes::copy_from_slice(uid.as_bytes())),
                    int_list(conns.iter().map(|c| c.seq() as u32)),
                );
            }
            reply(&Value::Array(a))
        }
        cmd::GET_CLIENT_COUNT_BY_GROUP => {
            let n = if ext_data.is_empty() {
                hub.stats().conns_open
            } else {
                hub.group_count(text(ext_data).as_str()).await.value
            };
            reply(&Value::Int(n as i64))
        }
        cmd::BATCH_GET_CLIENT_COUNT_BY_GROUP => {
            let mut a = Array::new();
            for g in id_list(ext_data) {
                let n = hub.group_count(g.as_str()).await.value;
                a.insert(
                    Key::from_bytes(Bytes::copy_from_slice(g.as_bytes())),
                    Value::Int(n as i64),
                );
            }
            reply(&Value::Array(a))
        }
        cmd::GET_CLIENT_SESSIONS_BY_GROUP => {
            let members = hub.group_members(text(ext_data).as_str()).await.value;
            let mut a = Array::new();
            for m in members {
                let id = m.seq() as u32;
                a.insert(Key::Int(i64::from(id)), shared.session_value(id));
            }
            reply(&Value::Array(a))
        }
        cmd::GET_ALL_CLIENT_SESSIONS => {
            let mut a = Array::new();
            for id in snapshot(hub).into_keys() {
                a.insert(Key::Int(i64::from(id)), shared.session_value(id));
            }
            reply(&Value::Array(a))
        }
        cmd::GET_GROUP_ID_LIST => {
            let mut groups = BTreeSet::new();
            for l in snapshot(hub).into_values() {
                groups.extend(l.groups);
            }
            let mut a = Array::new();
            for (i, g) in groups.into_iter().enumerate() {
                a.insert(Key::Int(i as i64), Value::Str(Bytes::from(g)));
            }
            reply(&Value::Array(a))
        }
        cmd::SELECT => reply(&select(shared, hub, ext_data)),
        other => {
            tracing::warn!(node = %shared.node, cmd = other, "unknown command on the inner port: ignored");
            None
        }
    }
}

/// `CMD_SELECT`: the requested fields of the clients matching any `where`
/// condition (all clients when there is none).
fn select(shared: &Shared, hub: &Hub, ext_data: &[u8]) -> Value {
    let Ok(q) = Select::decode(ext_data) else {
        return Value::Array(Array::new());
    };
    let (mut uids, mut groups, mut conns) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for c in &q.conditions {
        match c {
            Condition::Uids(u) => uids.extend(ids(u)),
            Condition::Groups(g) => groups.extend(ids(g)),
            Condition::ConnectionIds(i) => conns.extend(i.iter().copied()),
        }
    }
    let mut out = Array::new();
    for (id, local) in &snapshot(hub) {
        let matches = q.conditions.is_empty()
            || local.uid.as_ref().is_some_and(|u| uids.contains(u))
            || local.groups.iter().any(|g| groups.contains(g))
            || conns.contains(id);
        if !matches {
            continue;
        }
        let mut row = Array::new();
        for field in &q.fields {
            let v = match field.as_str() {
                "uid" => local
                    .uid
                    .as_ref()
                    .map_or(Value::Null, |u| Value::Str(Bytes::from(u.clone()))),
                "groups" => Value::Array(
                    local
                        .groups
                        .iter()
                        .map(|g| (g.as_str(), g.as_str()))
                        .collect(),
                ),
                "session" => shared.session_value(*id),
                _ => Value::Null,
            };
            row.insert(field.as_str(), v);
        }
        out.insert(Key::Int(i64::from(*id)), Value::Array(row));
    }
    Value::Array(out)
}
