//! The server API's methods: JSON parameters in, a [`Reply`] out, each one a
//! thin translation of a [`Hub`] call. Nothing here knows about HTTP beyond
//! the status an error maps to.

use base64::Engine as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use switchboard::core::history::StreamOf;
use switchboard::core::{Answer, ConnId, Since};
use switchboard::{Frame, Hub, NodeId, OpError, Position, PushError, Target, check_name};

use super::ApiError;

/// Every method, in the order the documentation lists them.
pub const METHODS: &[&str] = &[
    "push",
    "bind",
    "unbind",
    "join",
    "leave",
    "close",
    "session_get",
    "session_set",
    "session_update",
    "online",
    "user_conns",
    "conn_user",
    "group_members",
    "group_count",
    "totals",
    "history",
    "batch",
];

/// The methods that are cluster-wide queries, timed apart in `/metrics`.
pub const QUERIES: &[&str] = &[
    "online",
    "user_conns",
    "conn_user",
    "group_members",
    "group_count",
    "totals",
];

/// Commands one `batch` may carry: enough to amortise a request, few enough
/// that one request cannot hold a node's API for long.
pub const MAX_BATCH: usize = 1000;

/// A method's successful result: the value, and for cluster-wide queries the
/// nodes that did not answer.
#[derive(Debug)]
pub struct Reply {
    result: Value,
    missing: Option<Vec<NodeId>>,
}

impl Reply {
    fn done(result: Value) -> Self {
        Self {
            result,
            missing: None,
        }
    }

    fn answer<T>(a: Answer<T>, f: impl FnOnce(T) -> Value) -> Self {
        Self {
            result: f(a.value),
            missing: Some(a.missing),
        }
    }

    /// The JSON body: `{"result": ...}`, with `complete` and `missing` for queries.
    pub fn into_json(self) -> Value {
        let mut body = json!({ "result": self.result });
        if let Some(missing) = self.missing {
            body["complete"] = Value::Bool(missing.is_empty());
            body["missing"] = missing.iter().map(|n| Value::from(n.as_str())).collect();
        }
        body
    }
}

/// The recipients of a push or a close, as the API spells them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetParams {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    conns: Vec<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    except_users: Vec<String>,
    #[serde(default)]
    except_conns: Vec<String>,
}

impl TargetParams {
    fn target(self) -> Result<Target, ApiError> {
        for u in self.users.iter().chain(&self.except_users) {
            name("uid", u)?;
        }
        for g in &self.groups {
            name("group", g)?;
        }
        let mut t = if self.all {
            Target::all()
        } else {
            Target::none()
        };
        t = t.and_conns(conns(&self.conns)?).and_groups(self.groups);
        t = self.users.into_iter().fold(t, Target::and_user);
        for c in conns(&self.except_conns)? {
            t = t.except_conn(c);
        }
        for u in self.except_users {
            t = t.except_user(u);
        }
        Ok(t)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Push {
    #[serde(flatten)]
    target: TargetParams,
    data: String,
    #[serde(default)]
    binary: bool,
    /// Record the push in its users' and groups' streams.
    #[serde(default)]
    history: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    stream: String,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// Most entries one `history` call returns.
pub const MAX_HISTORY: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Close {
    #[serde(flatten)]
    target: TargetParams,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Conn {
    conn: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnUid {
    conn: String,
    uid: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnGroup {
    conn: String,
    group: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionSet {
    conn: String,
    key: String,
    value: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionUpdate {
    conn: String,
    session: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Uid {
    uid: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Group {
    group: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nothing {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch {
    commands: Vec<Command>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Command {
    method: String,
    #[serde(default)]
    params: Option<Value>,
}

fn params<T: DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The `uid` of a `{"uid"}` body, checked as a name.
fn uid_param(body: Value) -> Result<String, ApiError> {
    let p: Uid = params(body)?;
    name("uid", &p.uid)?;
    Ok(p.uid)
}

/// The `group` of a `{"group"}` body, checked as a name.
fn group_param(body: Value) -> Result<String, ApiError> {
    let p: Group = params(body)?;
    name("group", &p.group)?;
    Ok(p.group)
}

fn name(what: &str, value: &str) -> Result<(), ApiError> {
    check_name(what, value).map_err(ApiError::bad_request)
}

fn conn(s: &str) -> Result<ConnId, ApiError> {
    s.parse()
        .map_err(|e| ApiError::bad_request(format!("conn {s:?}: {e}")))
}

fn conns(list: &[String]) -> Result<Vec<ConnId>, ApiError> {
    list.iter().map(|s| conn(s)).collect()
}

/// An operation's error as the API answers it. On a standalone node a
/// connection of any other node cannot exist: 404, not the 503 that tells the
/// backend to retry (as it would forever, say with an id from before a restart
/// under another node id). In a cluster, a node the hub cannot reach stays a
/// 503, the same in every mode.
fn op_error(hub: &Hub, e: OpError) -> ApiError {
    match e {
        OpError::Unreachable(node) if hub.is_standalone() && node != *hub.node_id() => {
            ApiError::not_found(format!(
                "no such connection: this node is alone, and {node} is another"
            ))
        }
        e => e.into(),
    }
}

fn op(hub: &Hub, r: Result<(), OpError>) -> Result<Reply, ApiError> {
    r.map(|()| Reply::done(json!({})))
        .map_err(|e| op_error(hub, e))
}

/// Runs one method. `batch` may not nest.
pub async fn call(hub: &Hub, method: &str, body: Value) -> Result<Reply, ApiError> {
    if method == "batch" {
        return batch(hub, params(body)?).await;
    }
    single(hub, method, body).await
}

async fn batch(hub: &Hub, b: Batch) -> Result<Reply, ApiError> {
    if b.commands.len() > MAX_BATCH {
        return Err(ApiError::bad_request(format!(
            "a batch carries at most {MAX_BATCH} commands, this one {}",
            b.commands.len()
        )));
    }
    let mut replies = Vec::with_capacity(b.commands.len());
    // In order, one at a time: a command may depend on the one before it
    // (bind, then push to the user).
    for c in b.commands {
        let params = c.params.unwrap_or_else(|| json!({}));
        let r = if c.method == "batch" {
            Err(ApiError::bad_request("a batch cannot contain a batch"))
        } else {
            single(hub, &c.method, params).await
        };
        replies.push(match r {
            Ok(reply) => reply.into_json(),
            Err(e) => e.body(),
        });
    }
    Ok(Reply::done(json!({ "replies": replies })))
}

async fn single(hub: &Hub, method: &str, body: Value) -> Result<Reply, ApiError> {
    match method {
        "push" => {
            let p: Push = params(body)?;
            let frame = if p.binary {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(p.data.as_bytes())
                    .map_err(|e| ApiError::bad_request(format!("data is not base64: {e}")))?;
                Frame::binary(data)
            } else {
                Frame::text(p.data)
            };
            let r = crate::history::push(hub, &p.target.target()?, frame, p.history)
                .await
                .map_err(push_error)?;
            Ok(Reply::done(r.to_json()))
        }
        "history" => {
            let p: HistoryParams = params(body)?;
            history(hub, p).await
        }
        "close" => {
            let c: Close = params(body)?;
            let reason = c.reason.unwrap_or_else(|| "closed by the server".into());
            let r = hub.close(&c.target.target()?, reason);
            Ok(Reply::done(json!({
                "local": r.local,
                "remote_sent": r.remote.sent,
                "remote_dropped": r.remote.dropped,
            })))
        }
        "bind" => {
            let p: ConnUid = params(body)?;
            name("uid", &p.uid)?;
            op(hub, hub.bind(&conn(&p.conn)?, p.uid).await)
        }
        "unbind" => {
            let p: Conn = params(body)?;
            op(hub, hub.unbind(&conn(&p.conn)?).await)
        }
        "join" => {
            let p: ConnGroup = params(body)?;
            name("group", &p.group)?;
            op(hub, hub.join(&conn(&p.conn)?, p.group).await)
        }
        "leave" => {
            let p: ConnGroup = params(body)?;
            name("group", &p.group)?;
            op(hub, hub.leave(&conn(&p.conn)?, p.group).await)
        }
        "session_get" => {
            let p: Conn = params(body)?;
            let s = hub
                .session(&conn(&p.conn)?)
                .await
                .map_err(|e| op_error(hub, e))?;
            Ok(Reply::done(json!({ "session": s })))
        }
        "session_set" => {
            let p: SessionSet = params(body)?;
            op(hub, hub.set_session(&conn(&p.conn)?, p.key, p.value).await)
        }
        "session_update" => {
            let p: SessionUpdate = params(body)?;
            let changes = p
                .session
                .into_iter()
                .map(|(k, v)| match v {
                    Value::Null => Ok((k, None)),
                    Value::String(s) => Ok((k, Some(s))),
                    other => Err(ApiError::bad_request(format!(
                        "session value of {k:?} must be a string or null, not {other}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            op(hub, hub.update_session(&conn(&p.conn)?, changes).await)
        }
        "online" => {
            let a = hub.is_online(uid_param(body)?).await;
            Ok(Reply::answer(a, |v| json!({ "online": v })))
        }
        "user_conns" => {
            let a = hub.user_conns(uid_param(body)?).await;
            Ok(Reply::answer(a, |v| json!({ "conns": ids(&v) })))
        }
        "conn_user" => {
            let p: Conn = params(body)?;
            let a = hub.conn_user(&conn(&p.conn)?).await;
            Ok(Reply::answer(
                a,
                |v| json!({ "uid": v.map(|u| u.as_str().to_owned()) }),
            ))
        }
        "group_members" => {
            let a = hub.group_members(group_param(body)?).await;
            Ok(Reply::answer(a, |v| json!({ "conns": ids(&v) })))
        }
        "group_count" => {
            let a = hub.group_count(group_param(body)?).await;
            Ok(Reply::answer(a, |v| json!({ "count": v })))
        }
        "totals" => {
            let _: Nothing = params(body)?;
            let a = hub.totals().await;
            Ok(Reply::answer(
                a,
                |t| json!({ "conns": t.conns, "users": t.users, "groups": t.groups }),
            ))
        }
        other => Err(ApiError::unknown_method(other)),
    }
}

fn push_error(e: PushError) -> ApiError {
    match e {
        PushError::History(e) => ApiError::unavailable(e.to_string()),
        PushError::NoHistory => ApiError::no_history(
            "this node keeps no history: start it with --history redis://HOST:PORT",
        ),
        e => ApiError::bad_request(e.to_string()),
    }
}

/// A stream's entries after `since`, or its latest `limit` (default 100).
async fn history(hub: &Hub, p: HistoryParams) -> Result<Reply, ApiError> {
    if StreamOf::parse(&p.stream).is_none() {
        return Err(ApiError::bad_request(format!(
            "stream {:?}: a stream is user:UID or group:GROUP",
            p.stream
        )));
    }
    let name_part = p.stream.split_once(':').map_or("", |(_, n)| n);
    name("stream name", name_part)?;
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_HISTORY {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_HISTORY}"
        )));
    }
    if hub.history().is_none() {
        return Err(push_error(PushError::NoHistory));
    }
    let entry = |e: &switchboard::core::Entry| match e.kind {
        switchboard::FrameKind::Binary => json!({
            "pos": e.pos.to_string(),
            "data": base64::engine::general_purpose::STANDARD.encode(&e.data),
            "binary": true,
        }),
        _ => json!({"pos": e.pos.to_string(), "data": String::from_utf8_lossy(&e.data)}),
    };
    let unavailable = |e: switchboard::core::HistoryError| ApiError::unavailable(e.to_string());
    let (entries, top, covered) = match p.since {
        Some(since) => {
            let after: Position = since
                .parse()
                .map_err(|e| ApiError::bad_request(format!("since {since:?}: {e}")))?;
            match hub
                .history_since(&p.stream, after, limit)
                .await
                .map_err(unavailable)?
            {
                Since::Entries { entries, top } => (entries, Some(top), true),
                Since::Gone { top } => (Vec::new(), top, false),
            }
        }
        None => {
            let (entries, top) = hub
                .history_latest(&p.stream, limit)
                .await
                .map_err(unavailable)?;
            (entries, top, true)
        }
    };
    Ok(Reply::done(json!({
        "stream": p.stream,
        "entries": entries.iter().map(entry).collect::<Vec<_>>(),
        "top": top.map(|t| t.to_string()),
        "covered": covered,
    })))
}

fn ids(conns: &[ConnId]) -> Vec<String> {
    conns.iter().map(ToString::to_string).collect()
}
