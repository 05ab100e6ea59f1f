//! The reference application of `docs/CLIENT-PROTOCOL.md`, written once against the
//! [`Hub`] API. Every mode, test and benchmark speaks it.
//!
//! Clients connect with `?uid=U&group=G` (WebSocket) or a first line
//! `{"op":"hello","uid":"U","group":"G"}` (TCP), get a welcome frame first,
//! then send JSON requests: `to_user`, `to_users`, `to_group`, `to_all`,
//! `to_conn`, `join`, `leave`, `online`, `group_count`. Pushed data arrives
//! verbatim as one text frame. Bad input gets one `{"op":"error"}` reply and the
//! connection stays open.

use serde::Deserialize;
use serde_json::json;
use switchboard::core::ConnId;
use switchboard::{
    Accept, ConnectInfo, Decision, Frame, Handler, Hub, Reject, Transport, async_trait,
};

/// The reference application.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReferenceApp;

#[derive(Deserialize)]
struct Hello {
    op: String,
    uid: String,
    #[serde(default)]
    group: Option<String>,
}

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
}

const OPS: [&str; 9] = [
    "to_user",
    "to_users",
    "to_group",
    "to_all",
    "to_conn",
    "join",
    "leave",
    "online",
    "group_count",
];

fn error_frame(reason: &str) -> Frame {
    Frame::text(json!({"op": "error", "reason": reason}).to_string())
}

/// Why a request could not be parsed, in words a client developer can act on.
fn parse_error(bytes: &[u8], e: &serde_json::Error) -> String {
    #[derive(Deserialize)]
    struct OpOnly {
        op: Option<serde_json::Value>,
    }
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

/// A connection request as the contract defines it: uid required, group optional.
fn identity(info: &ConnectInfo) -> Result<(String, Option<String>), String> {
    match info.transport {
        Transport::Tcp => {
            let hello = info.hello.as_ref().ok_or("expected a hello line")?;
            let h: Hello =
                serde_json::from_slice(hello.data()).map_err(|e| format!("invalid hello: {e}"))?;
            if h.op != "hello" {
                return Err(format!("expected op \"hello\", got {:?}", h.op));
            }
            Ok((h.uid, h.group))
        }
        _ => {
            let uid = info
                .query_param("uid")
                .ok_or("uid query parameter required")?;
            let group = info.query_param("group").map(|g| g.into_owned());
            Ok((uid.into_owned(), group))
        }
    }
    .and_then(|(uid, group)| {
        if uid.is_empty() {
            return Err("uid must not be empty".to_owned());
        }
        Ok((uid, group.filter(|g| !g.is_empty())))
    })
}

#[async_trait]
impl Handler for ReferenceApp {
    async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
        let (uid, group) = match identity(info) {
            Ok(id) => id,
            Err(reason) => {
                return Reject::new(reason.clone())
                    .status(switchboard::http::StatusCode::BAD_REQUEST)
                    .reply(error_frame(&reason))
                    .into();
            }
        };
        let welcome = json!({
            "op": "welcome",
            "conn": info.conn.to_string(),
            // The node holding the socket: a gateway's, when the application
            // runs in a worker.
            "node": info.conn.node().as_str(),
        });
        let mut accept = Accept::new()
            .bind(uid)
            .greet(Frame::text(welcome.to_string()));
        if let Some(g) = group {
            accept = accept.join(g);
        }
        accept.into()
    }

    async fn on_message(&self, hub: &Hub, conn: &ConnId, frame: Frame) {
        let req = match serde_json::from_slice::<Request>(frame.data()) {
            Ok(r) => r,
            Err(e) => {
                let _ = hub.to_conn(conn, error_frame(&parse_error(frame.data(), &e)));
                return;
            }
        };
        let reply = match req {
            Request::ToUser { uid, data } => push(hub, &switchboard::Target::user(uid), data),
            Request::ToUsers { uids, data } => push(hub, &switchboard::Target::users(uids), data),
            Request::ToGroup { group, data } => push(hub, &switchboard::Target::group(group), data),
            Request::ToAll { data } => push(hub, &switchboard::Target::all(), data),
            Request::ToConn { conn: to, data } => match to.parse::<ConnId>() {
                Ok(to) => push(hub, &switchboard::Target::conn(to), data),
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
        };
        if let Some(reply) = reply {
            let _ = hub.to_conn(conn, reply);
        }
    }
}

/// Pushes `data` verbatim as one text frame.
fn push(hub: &Hub, target: &switchboard::Target, data: String) -> Option<Frame> {
    match hub.push(target, Frame::text(data)) {
        Ok(_) => None,
        Err(e) => Some(error_frame(&e.to_string())),
    }
}

/// Marks an answer that some nodes did not contribute to, rather than passing a
/// partial answer off as the truth.
fn incomplete(reply: &mut serde_json::Value, missing: &[switchboard::NodeId]) {
    if !missing.is_empty() {
        reply["complete"] = json!(false);
        reply["missing"] = json!(missing.iter().map(|n| n.as_str()).collect::<Vec<_>>());
    }
}
