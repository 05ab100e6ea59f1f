//! Streams with history against real processes of the binary on Redis
//! pub/sub: recorded pushes through the API, a client that reconnects to the
//! other node and recovers what it missed, the window, and the API's
//! `history` method.

#![allow(clippy::unwrap_used)]

use anyhow::Result;
use serde_json::{Value, json};
use switchboard::auth::{Claims, mint_hs256, now_secs};
use switchboard::http::StatusCode;
use switchboard_test::Client;
use switchboard_test::cluster::{Process, ProcessNode};
use switchboard_test::http::api;

const KEY: &str = "a-test-api-key-0123456789";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

async fn call(n: &ProcessNode, method: &str, body: Value) -> Result<Value> {
    Ok(n.call(KEY, method, body).await?["result"].clone())
}

/// Pushes `data` to alice, recorded, through `n`'s API; its position.
async fn record(n: &ProcessNode, data: &str) -> Result<String> {
    let r = call(
        n,
        "push",
        json!({"users": ["alice"], "data": data, "history": true}),
    )
    .await?;
    Ok(r["positions"]["user:alice"].as_str().unwrap().to_owned())
}

/// The next frame, which must be a recorded push: its data and position.
async fn entry(c: &mut Client) -> Result<(String, String)> {
    let v = c.recv_json().await?;
    anyhow::ensure!(v["op"] == "push" && v["stream"] == "user:alice", "{v}");
    Ok((
        v["data"].as_str().unwrap().to_owned(),
        v["pos"].as_str().unwrap().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_the_other_node_what_was_pushed_while_it_was_away() -> Result<()> {
    let p = Process::redis_with_api(bin(), "hist", KEY, &[]).await?;
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    let mut alice = Client::ws(n2.ws.unwrap(), "alice", None).await?;
    let p1 = record(n1, "m1").await?;
    let p2 = record(n1, "m2").await?;
    assert_eq!(entry(&mut alice).await?, ("m1".into(), p1));
    assert_eq!(entry(&mut alice).await?, ("m2".into(), p2.clone()));
    alice.close().await;

    let mut missed = Vec::new();
    for m in ["m3", "m4", "m5"] {
        missed.push((m.to_owned(), record(n1, m).await?));
    }
    let mut alice = Client::ws_query(
        n1.ws.unwrap(),
        &format!("uid=alice&recover=user:alice@{p2}"),
    )
    .await?;
    for m in &missed {
        assert_eq!(&entry(&mut alice).await?, m);
    }
    assert_eq!(
        alice.recv_json().await?,
        json!({"op": "recovered", "stream": "user:alice", "recovered": true})
    );
    // After the replay, a push arrives live, once.
    let p6 = record(n2, "m6").await?;
    assert_eq!(entry(&mut alice).await?, ("m6".into(), p6));
    call(n2, "push", json!({"users": ["alice"], "data": "plain"})).await?;
    assert_eq!(alice.recv().await?, "plain");

    // A backend reads the same stream.
    let h = call(
        n2,
        "history",
        json!({"stream": "user:alice", "since": missed[0].1}),
    )
    .await?;
    let datas: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"].as_str().unwrap())
        .collect();
    assert_eq!(datas, ["m4", "m5", "m6"]);
    assert_eq!(h["covered"], true);
    let h = call(n1, "history", json!({"stream": "user:alice", "limit": 2})).await?;
    assert_eq!(h["entries"][1]["data"], "m6");
    assert_eq!(h["top"], h["entries"][1]["pos"]);

    let stats = switchboard_test::http::get(n1.api_addr(), "/stats").await?;
    let stats: Value = serde_json::from_str(&stats.text())?;
    assert_eq!(stats["history"]["recovered"], 1, "{stats}");
    assert_eq!(stats["history"]["replayed"], 3, "{stats}");
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_history_size_a_client_gets_recovered_false_and_no_replay() -> Result<()> {
    let p = Process::redis_with_api(bin(), "hist-size", KEY, &["--history-size", "100"]).await?;
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    let mut alice = Client::ws(n2.ws.unwrap(), "alice", None).await?;
    let p1 = record(n1, "first").await?;
    assert_eq!(entry(&mut alice).await?.1, p1);
    alice.close().await;
    // 150 more in one batch request.
    let commands: Vec<Value> = (0..150)
        .map(|i| {
            json!({"method": "push", "params":
                {"users": ["alice"], "data": format!("n{i}"), "history": true}})
        })
        .collect();
    call(n1, "batch", json!({ "commands": commands })).await?;
    let mut alice = Client::ws_query(
        n1.ws.unwrap(),
        &format!("uid=alice&recover=user:alice@{p1}"),
    )
    .await?;
    assert_eq!(
        alice.recv_json().await?,
        json!({"op": "recovered", "stream": "user:alice", "recovered": false})
    );
    call(n2, "push", json!({"users": ["alice"], "data": "after"})).await?;
    assert_eq!(alice.recv().await?, "after", "nothing replayed");
    let h = call(n1, "history", json!({"stream": "user:alice", "since": p1})).await?;
    assert_eq!(h["covered"], false);
    assert_eq!(h["entries"], json!([]));
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_asks_for_users_or_groups_and_patterns_record_without_asking() -> Result<()> {
    let p = Process::redis_with_api(
        bin(),
        "hist-rec",
        KEY,
        &["--history-record", "group:news-*"],
    )
    .await?;
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    let (status, v) = api(
        n1.api_addr(),
        Some(KEY),
        "push",
        &json!({"all": true, "data": "x", "history": true}),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let mut bob = Client::ws(n2.ws.unwrap(), "bob", Some("news-1")).await?;
    let mut carol = Client::ws(n2.ws.unwrap(), "carol", Some("chat")).await?;
    // news-* is recorded without asking; chat is not.
    let r = call(
        n1,
        "push",
        json!({"groups": ["news-1", "chat"], "data": "hello"}),
    )
    .await?;
    assert!(r["positions"]["group:news-1"].is_string(), "{r}");
    let v = bob.recv_json().await?;
    assert_eq!(
        (v["op"].as_str(), v["stream"].as_str()),
        (Some("push"), Some("group:news-1"))
    );
    assert_eq!(carol.recv().await?, "hello");
    // A client's own push to a recorded group is recorded too.
    bob.send(json!({"op": "to_group", "group": "news-1", "data": "from bob"}))
        .await?;
    let v = bob.recv_json().await?;
    assert_eq!(v["data"], "from bob");
    assert_eq!(v["stream"], "group:news-1");
    p.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_may_recover_only_streams_it_may_read() -> Result<()> {
    let secret = "a-jwt-secret-for-the-history-test";
    let p = Process::redis_with_api(bin(), "hist-auth", KEY, &["--jwt-secret", secret]).await?;
    let n1 = &p.nodes[0];
    let p1 = call(
        n1,
        "push",
        json!({"users": ["bob"], "groups": ["lobby", "staff"], "data": "x", "history": true}),
    )
    .await?["positions"]
        .clone();
    let token = mint_hs256(
        &Claims {
            sub: "alice".into(),
            groups: vec!["lobby".into()],
            exp: Some(now_secs() + 600),
            ..Claims::default()
        },
        secret,
    );
    let q = format!(
        "token={token}&recover=user:bob@{}&recover=group:staff@{}&recover=group:lobby@{}",
        p1["user:bob"].as_str().unwrap(),
        p1["group:staff"].as_str().unwrap(),
        p1["group:lobby"].as_str().unwrap(),
    );
    let mut alice = Client::ws_query(n1.ws.unwrap(), &q).await?;
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(alice.recv_json().await?);
    }
    assert_eq!(
        frames,
        [
            json!({"op": "error", "reason": "not permitted: recover \"user:bob\""}),
            json!({"op": "error", "reason": "not permitted: recover \"group:staff\""}),
            json!({"op": "recovered", "stream": "group:lobby", "recovered": true}),
        ]
    );
    p.stop().await;
    Ok(())
}

/// RabbitMQ carries the pushes, a Redis named with `--history` keeps the
/// streams: recovery works the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_a_redis_named_with_history_keeps_the_streams() -> Result<()> {
    let cluster = format!(
        "{}?mode=routing&prefix={}",
        switchboard_test::services::amqp_url()?,
        switchboard_test::services::unique_prefix("hist-amqp")
    );
    let history = format!(
        "{}?prefix={}",
        switchboard_test::services::redis_url()?,
        switchboard_test::services::unique_prefix("hist-amqp")
    );
    let args = [
        "--api",
        "127.0.0.1:0",
        "--api-key",
        KEY,
        "--history",
        &history,
    ];
    let p = Process::start_cluster_with(bin(), 2, &cluster, &args).await?;
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    let mut alice = Client::ws(n2.ws.unwrap(), "alice", None).await?;
    let p1 = record(n1, "r1").await?;
    assert_eq!(entry(&mut alice).await?, ("r1".into(), p1.clone()));
    alice.close().await;
    let p2 = record(n2, "r2").await?;
    let mut alice = Client::ws_query(
        n1.ws.unwrap(),
        &format!("uid=alice&recover=user:alice@{p1}"),
    )
    .await?;
    assert_eq!(entry(&mut alice).await?, ("r2".into(), p2));
    assert_eq!(alice.recv_json().await?["recovered"], true);
    p.stop().await;
    Ok(())
}

/// In the gateway topology a worker named a Redis with `--history` records
/// pushes: clients get them with their positions through the gateways, and
/// backends read the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_history_records_pushes_through_the_gateways() -> Result<()> {
    use switchboard_test::gateway::{GatewayCluster, Listeners, WorkerProc};
    let history = format!(
        "{}?prefix={}",
        switchboard_test::services::redis_url()?,
        switchboard_test::services::unique_prefix("hist-gw")
    );
    let mut c = GatewayCluster::start(bin(), &[Listeners::Ws], 0, "").await?;
    let worker = WorkerProc::start(
        c.bin.as_path(),
        c.register.addr,
        &[
            "--api",
            "127.0.0.1:0",
            "--api-key",
            KEY,
            "--history",
            &history,
        ],
    )
    .await?;
    let api_at = worker.api.expect("the worker printed its API address");
    c.workers.push(worker);
    c.wait_attached(1).await?;
    let mut alice = Client::ws(c.gateways[0].ws.unwrap(), "alice", None).await?;
    let (status, v) = api(
        api_at,
        Some(KEY),
        "push",
        &json!({"users": ["alice"], "data": "g1", "history": true}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let pos = v["result"]["positions"]["user:alice"].clone();
    assert_eq!(
        alice.recv_json().await?,
        json!({"op": "push", "stream": "user:alice", "pos": pos, "data": "g1"})
    );
    let (_, h) = api(
        api_at,
        Some(KEY),
        "history",
        &json!({"stream": "user:alice", "limit": 5}),
    )
    .await?;
    assert_eq!(h["result"]["entries"][0]["data"], "g1", "{h}");
    switchboard_test::Cluster::shutdown(Box::new(c)).await;
    Ok(())
}
