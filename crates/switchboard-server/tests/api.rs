//! The server API and the events to the backend, against real processes of
//! the binary on Redis: what a backend in any language sees.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use switchboard::http::StatusCode;
use switchboard_test::cluster::{Process, ProcessNode};
use switchboard_test::http::api;
use switchboard_test::{Client, STEP, services};
use tokio::sync::mpsc;

const KEY: &str = "a-test-api-key-0123456789";
const EVENTS_SECRET: &str = "an-events-secret";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

/// Two nodes on Redis pub/sub, each serving the API with [`KEY`] and
/// started with `extra`.
async fn two_nodes(tag: &str, extra: &[&str]) -> Result<Process> {
    Process::redis_with_api(bin(), tag, KEY, extra).await
}

fn api_addr(n: &ProcessNode) -> SocketAddr {
    n.api_addr()
}

/// A sample of node `n`'s `/metrics` on its API listener (0 when absent).
async fn metric(n: &ProcessNode, sample: &str) -> Result<f64> {
    let r = switchboard_test::http::get(api_addr(n), "/metrics").await?;
    anyhow::ensure!(r.status == 200, "/metrics: {}", r.status);
    let text = r.text();
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0))
}

async fn call(n: &ProcessNode, method: &str, body: Value) -> Result<Value> {
    n.call(KEY, method, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_pushes_binds_and_asks_through_any_node() -> Result<()> {
    let p = two_nodes("api", &[]).await?;
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    let mut alice = Client::ws(n2.ws.unwrap(), "alice", Some("room")).await?;
    let conn = alice.conn.clone();

    // Without the key: refused, and nothing reaches alice.
    let (status, v) = api(
        api_addr(n1),
        None,
        "push",
        &json!({"users": ["alice"], "data": "no"}),
    )
    .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(v["error"]["code"], "unauthorized");

    let pushes_before = metric(n1, "switchboard_pushes_total{target=\"user\"}").await?;
    let v = call(n1, "push", json!({"users": ["alice"], "data": "hi"})).await?;
    assert_eq!(v["result"]["remote_dropped"], 0, "{v}");
    assert_eq!(alice.recv().await?, "hi");
    // The push moved node 1's counters, and the API timed the request.
    let pushes_after = metric(n1, "switchboard_pushes_total{target=\"user\"}").await?;
    assert_eq!(pushes_after, pushes_before + 1.0);
    let timed = metric(
        n1,
        "switchboard_api_request_duration_seconds_count{method=\"push\",status=\"200\"}",
    )
    .await?;
    assert!(timed >= 1.0, "{timed}");

    let v = call(n1, "online", json!({"uid": "alice"})).await?;
    assert_eq!(
        v,
        json!({"result": {"online": true}, "complete": true, "missing": []})
    );
    let v = call(n1, "online", json!({"uid": "bob"})).await?;
    assert_eq!(v["result"]["online"], false);
    let v = call(n1, "group_count", json!({"group": "room"})).await?;
    assert_eq!(
        v,
        json!({"result": {"count": 1}, "complete": true, "missing": []})
    );

    // Membership and sessions of a connection on the other node.
    call(n1, "join", json!({"conn": conn, "group": "vip"})).await?;
    let v = call(n1, "group_members", json!({"group": "vip"})).await?;
    assert_eq!(v["result"]["conns"], json!([conn]));
    call(n1, "push", json!({"groups": ["vip"], "data": "for vips"})).await?;
    assert_eq!(alice.recv().await?, "for vips");
    call(n1, "bind", json!({"conn": conn, "uid": "alicia"})).await?;
    let v = call(n1, "conn_user", json!({"conn": conn})).await?;
    assert_eq!(v["result"]["uid"], "alicia");
    let v = call(n1, "user_conns", json!({"uid": "alicia"})).await?;
    assert_eq!(v["result"]["conns"], json!([conn]));
    call(
        n1,
        "session_update",
        json!({"conn": conn, "session": {"plan": "gold", "x": "1"}}),
    )
    .await?;
    call(
        n1,
        "session_set",
        json!({"conn": conn, "key": "x", "value": null}),
    )
    .await?;
    let v = call(n1, "session_get", json!({"conn": conn})).await?;
    assert_eq!(v["result"]["session"]["plan"], "gold");
    assert!(v["result"]["session"].get("x").is_none(), "{v}");
    // Totals are asked of every node the first one knows alive: wait until
    // it has seen the other.
    let deadline = Instant::now() + STEP;
    loop {
        let v = call(n1, "totals", json!({})).await?;
        if v["result"]["conns"] == 1 {
            assert_eq!(v["result"]["users"], 1, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "totals never counted alice: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A binary push arrives as a binary frame, decoded from base64.
    call(
        n1,
        "push",
        json!({"conns": [conn], "data": "AAEC/w==", "binary": true}),
    )
    .await?;
    match alice.next_event(STEP).await? {
        switchboard_test::client::Event::Binary(b) => assert_eq!(b, vec![0, 1, 2, 255]),
        other => panic!("expected a binary frame, got {other:?}"),
    }

    // A batch runs in order: the push after the leave no longer reaches her.
    let v = call(
        n1,
        "batch",
        json!({"commands": [
            {"method": "leave", "params": {"conn": conn, "group": "vip"}},
            {"method": "push", "params": {"groups": ["vip"], "data": "late"}},
            {"method": "push", "params": {"users": ["alicia"], "data": "after"}},
        ]}),
    )
    .await?;
    assert_eq!(v["result"]["replies"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(alice.recv().await?, "after");

    call(n1, "close", json!({"conns": [conn], "reason": "bye"})).await?;
    assert!(alice.expect_closed(STEP).await?.is_some());

    let doc = switchboard_test::http::get(api_addr(n1), "/api/openapi.json").await?;
    assert_eq!(doc.status, 200);
    let doc: Value = serde_json::from_slice(&doc.body)?;
    assert_eq!(doc["openapi"], "3.1.0");
    let ready = switchboard_test::http::get(api_addr(n1), "/ready").await?;
    assert_eq!(ready.status, 200, "{}", ready.text());
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_api_without_a_key_does_not_start() -> Result<()> {
    let out = tokio::process::Command::new(bin())
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--tcp",
            "off",
            "--api",
            "0.0.0.0:0",
        ])
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-key"), "{err}");
    Ok(())
}

/// A backend that records the events it is sent, checks their signature, and
/// answers a `message` event whose data is `shout:TEXT` with a reply.
struct Backend {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Value>,
    seen: Vec<Value>,
}

impl Backend {
    async fn start() -> Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let secret: switchboard_server::config::Secret = EVENTS_SECRET.parse()?;
        let handler = move |headers: switchboard::http::HeaderMap, body: bytes::Bytes| {
            let tx = tx.clone();
            let want = switchboard_server::events::sign(&secret, &body);
            async move {
                let got = headers
                    .get("x-switchboard-signature")
                    .and_then(|v| v.to_str().ok());
                if got != Some(want.as_str()) {
                    return (StatusCode::UNAUTHORIZED, String::new());
                }
                let batch: Value = serde_json::from_slice(&body).unwrap();
                let mut results = Vec::new();
                for e in batch["events"].as_array().unwrap() {
                    let _ = tx.send(e.clone());
                    let data = e["data"].as_str().unwrap_or_default();
                    results.push(if let Some(t) = data.strip_prefix("shout:") {
                        json!({"reply": t.to_uppercase()})
                    } else if let Some(g) = data.strip_prefix("join:") {
                        // Join, then greet the group: in that order.
                        json!({"join": [g], "push": [{"groups": [g], "data": format!("welcome to {g}")}]})
                    } else if data == "bye" {
                        json!({"close": "the backend said so"})
                    } else {
                        Value::Null
                    });
                }
                (StatusCode::OK, json!({ "results": results }).to_string())
            }
        };
        let app = axum::Router::new().route("/events", axum::routing::post(handler));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move { axum::serve(l, app).await });
        Ok(Self {
            addr,
            rx,
            seen: Vec::new(),
        })
    }

    fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// Waits for an event matching `f`.
    async fn wait_for(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(e) = self.seen.iter().find(|e| f(e)) {
                return Ok(e.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(e)) => self.seen.push(e),
                _ => anyhow::bail!("no {what} event; seen: {:#?}", self.seen),
            }
        }
    }

    /// Collects what arrives for `wait`.
    async fn settle(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            self.seen.push(e);
        }
    }

    fn count(&self, kind: &str, uid: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| e["type"] == kind && e["uid"] == uid)
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_hears_connects_messages_closes_and_presence_once() -> Result<()> {
    let mut backend = Backend::start().await?;
    let url = backend.url();
    let p = two_nodes(
        "events",
        &["--events-url", &url, "--events-secret", EVENTS_SECRET],
    )
    .await?;
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    // Give the nodes a tick to see each other, so that both agree on who
    // tells alice's presence.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut a1 = Client::ws(n1.ws.unwrap(), "alice", None).await?;
    let c1 = a1.conn.clone();
    let connect = backend
        .wait_for("connect", |e| e["type"] == "connect" && e["conn"] == c1)
        .await?;
    assert_eq!(connect["uid"], "alice");
    assert_eq!(connect["transport"], "websocket");
    assert_eq!(connect["node"], "n0");
    backend
        .wait_for("online", |e| e["type"] == "online" && e["uid"] == "alice")
        .await?;

    let a2 = Client::ws(n2.ws.unwrap(), "alice", None).await?;

    // A message the application does not handle goes to the backend, and
    // the backend's reply comes back to the sender.
    a1.send_text("shout:hello").await?;
    let m = backend
        .wait_for("message", |e| e["type"] == "message")
        .await?;
    assert_eq!(
        (m["conn"].as_str(), m["uid"].as_str()),
        (Some(c1.as_str()), Some("alice"))
    );
    assert_eq!(m["data"], "shout:hello");
    assert_eq!(a1.recv().await?, "HELLO");
    // A request of the application's own is still its own.
    a1.send(json!({"op": "online", "uid": "alice"})).await?;
    assert_eq!(a1.recv_json().await?["online"], true);
    // The backend's answer may join the sender to a group and push to it.
    a1.send_text("join:lounge").await?;
    assert_eq!(a1.recv().await?, "welcome to lounge");
    let (_, count) = api(
        api_addr(n2),
        Some(KEY),
        "group_count",
        &json!({"group": "lounge"}),
    )
    .await?;
    assert_eq!(count["result"]["count"], 1, "{count}");

    drop(a1);
    backend
        .wait_for("close", |e| e["type"] == "close" && e["conn"] == c1)
        .await?;
    // ... or close it.
    let mut a2 = a2;
    a2.send_text("bye").await?;
    assert!(a2.expect_closed(STEP).await?.is_some());
    backend
        .wait_for("offline", |e| e["type"] == "offline" && e["uid"] == "alice")
        .await?;
    let closed = backend
        .wait_for("close", |e| {
            e["type"] == "close" && e["conn"] == a2.conn.as_str()
        })
        .await?;
    assert!(
        closed["reason"]
            .as_str()
            .unwrap()
            .contains("the backend said so"),
        "{closed}"
    );
    // A connection unbound by the backend, then closed, closes as nobody's.
    let carol = Client::ws(n1.ws.unwrap(), "carol", None).await?;
    call(n1, "unbind", json!({"conn": carol.conn})).await?;
    call(n1, "close", json!({"conns": [carol.conn]})).await?;
    let closed = backend
        .wait_for("close", |e| {
            e["type"] == "close" && e["conn"] == carol.conn.as_str()
        })
        .await?;
    assert_eq!(closed["uid"], Value::Null, "{closed}");
    // Bob's only connection is on a node that dies: he goes offline when
    // the survivor stops counting that node alive.
    let _bob = Client::ws(n2.ws.unwrap(), "bob", None).await?;
    backend
        .wait_for("online", |e| e["type"] == "online" && e["uid"] == "bob")
        .await?;
    let mut p = p;
    let dead = p.nodes.remove(1);
    let pid = dead.pid();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    backend
        .wait_for("offline", |e| e["type"] == "offline" && e["uid"] == "bob")
        .await?;
    backend.settle(Duration::from_secs(2)).await;
    assert_eq!(backend.count("online", "alice"), 1, "{:#?}", backend.seen);
    assert_eq!(backend.count("offline", "alice"), 1, "{:#?}", backend.seen);
    assert_eq!(backend.count("online", "bob"), 1, "{:#?}", backend.seen);
    assert_eq!(backend.count("offline", "bob"), 1, "{:#?}", backend.seen);
    assert_eq!(backend.count("connect", "alice"), 2);
    assert_eq!(backend.count("close", "alice"), 2, "{:#?}", backend.seen);
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_gateway_topology_the_worker_serves_the_api() -> Result<()> {
    use switchboard_test::gateway::{GatewayCluster, Listeners, WorkerProc};
    let mut c = GatewayCluster::start(bin(), &[Listeners::Ws, Listeners::Ws], 0, "").await?;
    let worker = WorkerProc::start(
        c.bin.as_path(),
        c.register.addr,
        &["--api", "127.0.0.1:0", "--api-key", KEY],
    )
    .await?;
    let api_at = worker.api.expect("the worker printed its API address");
    c.workers.push(worker);
    c.wait_attached(1).await?;
    let mut alice = Client::ws(c.gateways[1].ws.unwrap(), "alice", Some("room")).await?;
    let ask = |method: &'static str, body: Value| async move {
        let (status, v) = api(api_at, Some(KEY), method, &body).await?;
        anyhow::ensure!(status == StatusCode::OK, "{method}: {status} {v}");
        anyhow::Ok(v)
    };
    ask(
        "push",
        json!({"users": ["alice"], "data": "through a gateway"}),
    )
    .await?;
    assert_eq!(alice.recv().await?, "through a gateway");
    let v = ask("online", json!({"uid": "alice"})).await?;
    assert_eq!(
        v,
        json!({"result": {"online": true}, "complete": true, "missing": []})
    );
    let v = ask("group_count", json!({"group": "room"})).await?;
    assert_eq!(v["result"]["count"], 1, "{v}");
    ask("join", json!({"conn": alice.conn, "group": "vip"})).await?;
    ask("push", json!({"groups": ["vip"], "data": "vip"})).await?;
    assert_eq!(alice.recv().await?, "vip");
    let (status, _) = api(api_at, None, "totals", &json!({})).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    switchboard_test::Cluster::shutdown(Box::new(c)).await;
    Ok(())
}

/// Two nodes of `cluster` in this process, each with the API.
async fn launched(cluster: &str) -> Result<Vec<switchboard_server::node::Running>> {
    use switchboard_server::config::{ServeArgs, ServeConfig};
    use switchboard_server::node;
    let args = || -> Result<ServeArgs> {
        Ok(ServeArgs {
            ws: Some("127.0.0.1:0".into()),
            tcp: Some("off".into()),
            api: Some("127.0.0.1:0".into()),
            api_key: Some(KEY.parse()?),
            cluster: Some(cluster.into()),
            ..ServeArgs::default()
        })
    };
    let cfg = ServeConfig::load(args()?)?;
    if cluster.starts_with("memory:") {
        return node::launch_all(&cfg).await;
    }
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let cfg = ServeConfig::load(args()?)?;
        nodes.push(node::launch(&cfg, node::backplane(&cfg.cluster).await?).await?);
    }
    Ok(nodes)
}

/// The same calls through node 0's API for a client on node 1, in a mode.
async fn api_contract(cluster: &str) -> Result<()> {
    let nodes = launched(cluster).await?;
    let at = nodes[0].api.unwrap();
    let ask = |method: &'static str, body: Value| async move {
        let (status, v) = api(at, Some(KEY), method, &body).await?;
        anyhow::ensure!(status == StatusCode::OK, "{cluster} {method}: {status} {v}");
        anyhow::Ok(v)
    };
    let mut alice = Client::ws(nodes[1].ws.unwrap(), "alice", Some("room")).await?;
    ask("push", json!({"users": ["alice"], "data": "hi"})).await?;
    assert_eq!(alice.recv().await?, "hi", "{cluster}");
    let v = ask("online", json!({"uid": "alice"})).await?;
    assert_eq!(
        v,
        json!({"result": {"online": true}, "complete": true, "missing": []}),
        "{cluster}"
    );
    let v = ask("group_count", json!({"group": "room"})).await?;
    assert_eq!(v["result"]["count"], 1, "{cluster}: {v}");
    ask("join", json!({"conn": alice.conn, "group": "vip"})).await?;
    ask("push", json!({"groups": ["vip"], "data": "vip"})).await?;
    assert_eq!(alice.recv().await?, "vip", "{cluster}");
    let (status, v) = api(
        at,
        Some(KEY),
        "session_get",
        &json!({"conn": "00000000000000000000"}),
    )
    .await?;
    assert_eq!(v["error"]["code"], "unavailable", "{cluster}: {status} {v}");
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_behaves_the_same_in_every_mode() -> Result<()> {
    api_contract("memory:2").await?;
    let redis = services::redis_url()?;
    let prefix = services::unique_prefix("apiq");
    api_contract(&format!("{redis}?mode=queue&prefix={prefix}")).await?;
    let amqp = services::amqp_url()?;
    for mode in ["fanout", "routing"] {
        let prefix = services::unique_prefix("api");
        api_contract(&format!("{amqp}?mode={mode}&prefix={prefix}")).await?;
    }
    Ok(())
}
