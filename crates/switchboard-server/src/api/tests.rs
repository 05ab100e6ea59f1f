use std::net::SocketAddr;

use serde_json::{Value, json};
use switchboard::Hub;
use switchboard::http::{Method, StatusCode};
use switchboard_test::http::{api, request_with};

use super::*;

const KEY: &str = "a-test-api-key-of-some-length";

/// A standalone hub with its API served on a loopback port, with `KEY`.
async fn serve() -> (Hub, SocketAddr) {
    let hub = Hub::builder().start().await.expect("hub");
    let key: Secret = KEY.parse().expect("key");
    let app = router(ApiState::new(hub.clone(), Some(&key)));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    (hub, addr)
}

async fn call(addr: SocketAddr, method: &str, body: Value) -> (StatusCode, Value) {
    api(addr, Some(KEY), method, &body).await.expect("request")
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("(none)")
}

#[tokio::test]
async fn every_request_needs_the_key() {
    let (_hub, addr) = serve().await;
    let (s, v) = api(addr, None, "totals", &json!({}))
        .await
        .expect("request");
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    let (s, v) = api(addr, Some("not-the-key"), "totals", &json!({}))
        .await
        .expect("request");
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert!(
        !v.to_string().contains("not-the-key"),
        "the refusal repeats the key it was sent: {v}"
    );
    // A prefix of the right key is as wrong as any other.
    let (s, _) = api(addr, Some(&KEY[..KEY.len() - 1]), "totals", &json!({}))
        .await
        .expect("request");
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = call(addr, "totals", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["result"], json!({"conns": 0, "users": 0, "groups": 0}));
    assert_eq!(
        (v["complete"].clone(), v["missing"].clone()),
        (json!(true), json!([]))
    );
}

#[tokio::test]
async fn a_node_without_a_key_serves_everyone() {
    let hub = Hub::builder().start().await.expect("hub");
    let app = router(ApiState::new(hub, None));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    let (s, v) = api(addr, None, "online", &json!({"uid": "alice"}))
        .await
        .expect("request");
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["result"], json!({"online": false}));
}

#[tokio::test]
async fn bad_requests_get_their_own_codes() {
    let (_hub, addr) = serve().await;
    let cases = [
        ("nosuch", json!({}), StatusCode::NOT_FOUND, "unknown_method"),
        ("online", json!({}), StatusCode::BAD_REQUEST, "bad_request"),
        (
            "online",
            json!({"uid": ""}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "online",
            json!({"uid": "a", "x": 1}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "push",
            json!({"users": ["a"]}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "push",
            json!({"all": true, "data": "%%", "binary": true}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "bind",
            json!({"conn": "xyz", "uid": "a"}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "session_update",
            json!({"conn": "00000000000000000001", "session": {"k": 1}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (method, body, status, want) in cases {
        let (s, v) = call(addr, method, body.clone()).await;
        assert_eq!((s, code(&v)), (status, want), "{method} {body}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let auth = format!("apikey {KEY}");
    let send = |method: Method, body: &'static [u8]| {
        let auth = auth.clone();
        async move {
            let r = request_with(
                addr,
                method,
                "/api/totals",
                &[("authorization", auth.as_str())],
                Some(bytes::Bytes::from_static(body)),
                switchboard_test::STEP,
            )
            .await
            .expect("request");
            let v: Value = serde_json::from_slice(&r.body).expect("JSON");
            (r.status, v, r.header("allow").map(str::to_owned))
        }
    };
    let (s, v, _) = send(Method::POST, b"{not json").await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
    let (s, v, _) = send(Method::POST, b"[1,2]").await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
    let (s, v, allow) = send(Method::GET, b"").await;
    assert_eq!(
        (s, code(&v)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    // A 405 names the method that is allowed (RFC 9110, 15.5.6).
    assert_eq!(allow.as_deref(), Some("POST"));
    // An empty body is an empty object.
    let (s, _, _) = send(Method::POST, b"").await;
    assert_eq!(s, StatusCode::OK);
    let big = Box::leak(vec![b' '; MAX_BODY + 1].into_boxed_slice());
    let (s, v, _) = send(Method::POST, big).await;
    assert_eq!((s, code(&v)), (StatusCode::PAYLOAD_TOO_LARGE, "too_large"));
}

#[tokio::test]
async fn an_operation_on_a_missing_connection_is_not_found() {
    let (hub, addr) = serve().await;
    // A well-formed id of this node that was never handed out.
    let ghost = format!(
        "{}",
        switchboard::core::ConnId::new(hub.node_id().clone(), 999_999)
    );
    // On this standalone node, a well-formed id of another node: no
    // connection either, not a node to wait for.
    let foreign = format!(
        "{}",
        switchboard::core::ConnId::new(switchboard::NodeId::new("elsewhere").expect("id"), 1)
    );
    for (method, body) in [
        ("bind", json!({"conn": ghost, "uid": "a"})),
        ("join", json!({"conn": ghost, "group": "g"})),
        ("session_get", json!({"conn": ghost})),
        ("bind", json!({"conn": foreign, "uid": "a"})),
        ("unbind", json!({"conn": foreign})),
        ("leave", json!({"conn": foreign, "group": "g"})),
        ("session_get", json!({"conn": foreign})),
        (
            "session_set",
            json!({"conn": foreign, "key": "k", "value": "v"}),
        ),
        (
            "session_update",
            json!({"conn": foreign, "session": {"k": null}}),
        ),
    ] {
        let (s, v) = call(addr, method, body).await;
        assert_eq!(
            (s, code(&v)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{method}: {v}"
        );
    }
}

#[tokio::test]
async fn a_batch_answers_each_command_in_order() {
    let (_hub, addr) = serve().await;
    let (s, v) = call(
        addr,
        "batch",
        json!({"commands": [
            {"method": "push", "params": {"all": true, "data": "x"}},
            {"method": "group_count", "params": {"group": "g"}},
            {"method": "nosuch"},
            {"method": "batch", "params": {"commands": []}},
            {"method": "totals"},
        ]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = v["result"]["replies"].as_array().expect("replies");
    assert_eq!(r.len(), 5, "{v}");
    assert_eq!(r[0]["result"]["local"], 0);
    assert_eq!(r[1]["result"], json!({"count": 0}));
    assert_eq!(r[1]["complete"], true);
    assert_eq!(code(&r[2]), "unknown_method");
    assert_eq!(code(&r[3]), "bad_request");
    assert_eq!(r[4]["result"]["conns"], 0);
    let many: Vec<Value> = (0..=methods::MAX_BATCH)
        .map(|_| json!({"method": "totals"}))
        .collect();
    let (s, v) = call(addr, "batch", json!({ "commands": many })).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, "bad_request"));
}

#[test]
fn the_openapi_document_describes_every_method() {
    let doc: Value = serde_json::from_str(OPENAPI).expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    for m in methods::METHODS {
        let op = &paths[&format!("/api/{m}")]["post"];
        assert_eq!(op["operationId"], *m, "{m} is not documented");
    }
    assert_eq!(paths.len(), methods::METHODS.len(), "a path has no method");
}
