//! The example backends of `examples/`, each driven end to end against two
//! processes of the real binary on Redis pub/sub: what a user copying them
//! gets is what is tested. Tokens, pushes and queries go through the server
//! API of the first node; clients sit on both.
//!
//! The tests need Redis and an interpreter (`python3`; `php` with curl): their
//! names say which, so `scripts/test.sh` leaves them out where one is missing
//! outside CI, and they fail in CI.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use switchboard::auth::{Claims, mint_hs256, now_secs};
use switchboard_test::Process;
use switchboard_test::programs::{self, Script, example};
use switchboard_test::services::{redis_url, unique_prefix};
use switchboard_test::{Client, Cluster, STEP};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
const API_KEY: &str = "an-api-key-only-these-tests-use";
const JWT_SECRET: &str = "a-jwt-secret-of-32-bytes-or-so!!";
const EVENTS_SECRET: &str = "an-events-secret-for-the-backend";

/// Two nodes on Redis pub/sub under a prefix of their own, each with an API
/// (keyed) and HS256 tokens, plus `extra` flags.
async fn api_cluster(extra: &[&str]) -> Result<Process> {
    let cluster = format!(
        "{}?mode=pubsub&prefix={}",
        redis_url()?,
        unique_prefix("backends")
    );
    let mut args = vec![
        "--api",
        "127.0.0.1:0",
        "--api-key",
        API_KEY,
        "--jwt-secret",
        JWT_SECRET,
    ];
    args.extend_from_slice(extra);
    Process::start_cluster_with(BIN, 2, &cluster, &args).await
}

/// The base URL of node `i`'s API, as the examples take it.
fn api_url(p: &Process, i: usize) -> String {
    format!(
        "http://{}",
        p.nodes[i].api.expect("the node printed its API address")
    )
}

/// Retries `check` until it holds, for at most [`STEP`]: the directory of a
/// Redis cluster learns a new connection a moment after it is welcomed.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {STEP:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects over WebSocket with `token`; checks the welcome names `uid`.
async fn connect(ws: SocketAddr, token: &str, uid: &str) -> Result<Client> {
    let c = Client::ws_query(ws, &format!("token={token}")).await?;
    assert_eq!(c.uid, uid, "{c:?}");
    Ok(c)
}

fn json_of(out: &str) -> Result<Value> {
    serde_json::from_str(out).with_context(|| format!("not JSON: {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_backend_on_redis_mints_pushes_and_answers_messages() -> Result<()> {
    programs::require_python()?;
    let backend = example("backend-python/backend.py");
    let backend = backend.to_str().unwrap();
    let (_events, events_url) = programs::spawn_first_line(
        "python3",
        &[
            backend,
            "--events-secret",
            EVENTS_SECRET,
            "serve",
            "--listen",
            "127.0.0.1:0",
        ],
    )
    .await?;
    assert!(events_url.starts_with("http://127.0.0.1:"), "{events_url}");
    let nodes = api_cluster(&[
        "--events-url",
        &events_url,
        "--events-secret",
        EVENTS_SECRET,
    ])
    .await?;
    let py = Script::new(
        "python3",
        &[backend, "--api", &api_url(&nodes, 0), "--api-key", API_KEY],
    );
    let minter = Script::new("python3", &[backend, "--jwt-secret", JWT_SECRET, "token"]);
    let minter = &minter;
    let token = |uid: &'static str| async move { minter.run(&[uid, "--groups", "lobby"]).await };

    // The backend's tokens are accepted: alice on the second node, bob on the
    // first, both in the lobby.
    let mut alice = connect(nodes.ws(1), &token("alice").await?, "alice").await?;
    let mut bob = connect(nodes.ws(0), &token("bob").await?, "bob").await?;
    eventually("alice online through the first node's API", || async {
        let v = json_of(&py.run(&["online", "alice"]).await?)?;
        Ok(v["online"] == true && v["complete"] == true)
    })
    .await?;

    // A push through the first node's API reaches alice on the second.
    let report = json_of(
        &py.run(&["push", "--users", "alice", "--data", "hi alice"])
            .await?,
    )?;
    assert_eq!(report["local"], 0, "{report}");
    assert_eq!(report["remote_dropped"], 0, "{report}");
    assert_eq!(alice.recv().await?, "hi alice");

    // A message switchboard's protocol does not handle goes to the backend,
    // whose answer is carried out: the reply to alice, the relay to the rest of
    // the lobby (bob, on the other node), but not back to alice.
    alice.send_text("hello from alice").await?;
    assert_eq!(alice.recv().await?, "HELLO FROM ALICE");
    let relayed = bob.recv_json().await?;
    assert_eq!(
        relayed,
        json!({"from": "alice", "text": "hello from alice"}),
        "{relayed}"
    );
    // A join action, checked by a push to the group through the API; the
    // reply comes first, and nothing of the relay reached alice before it.
    alice.send_text("/join room-7").await?;
    assert_eq!(alice.recv().await?, "joined room-7");
    eventually("room-7 has alice", || async {
        let v = json_of(
            &py.run(&["call", "group_count", r#"{"group":"room-7"}"#])
                .await?,
        )?;
        Ok(v["count"] == 1)
    })
    .await?;
    py.run(&["push", "--groups", "room-7", "--data", "to room 7"])
        .await?;
    assert_eq!(alice.recv().await?, "to room 7");
    bob.expect_silence(Duration::from_millis(200)).await?;

    // The backend refuses a batch that switchboard did not sign.
    let forged = json!({"events": [{"type": "message", "conn": alice.conn, "uid": "alice",
                                    "data": "forged", "node": "n1", "time_ms": 0}]});
    let r = switchboard_test::http::request(
        events_url
            .trim_start_matches("http://")
            .trim_end_matches("/events")
            .parse()?,
        switchboard::http::Method::POST,
        "/events",
        Some(&forged),
        STEP,
    )
    .await?;
    assert_eq!(r.status, 401, "{}", r.text());

    // A close action.
    alice.send_text("/quit").await?;
    alice.expect_closed(STEP).await?;
    eventually("alice offline", || async {
        Ok(json_of(&py.run(&["online", "alice"]).await?)?["online"] == false)
    })
    .await?;
    nodes.stop().await;
    Ok(())
}

fn token(uid: &str, groups: &[&str]) -> String {
    let claims = Claims {
        sub: uid.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        exp: Some(now_secs() + 600),
        ..Claims::default()
    };
    mint_hs256(&claims, JWT_SECRET)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_backend_on_redis_sends_and_asks_across_two_nodes() -> Result<()> {
    programs::require_php()?;
    let cli = example("backend-php/cli.php");
    let cli = cli.to_str().unwrap();
    let nodes = api_cluster(&[]).await?;
    let api = &api_url(&nodes, 0);
    let php = Script::new("php", &[cli, "--api", api, "--api-key", API_KEY]);

    let mut alice = connect(nodes.ws(1), &token("alice", &["lobby"]), "alice").await?;
    let mut bob = connect(nodes.ws(0), &token("bob", &["lobby"]), "bob").await?;
    let mut carol = connect(nodes.ws(1), &token("carol", &[]), "carol").await?;
    for uid in ["alice", "bob", "carol"] {
        eventually(&format!("isUidOnline {uid}"), || async {
            Ok(php.run(&["isUidOnline", uid]).await? == "1")
        })
        .await?;
    }
    assert_eq!(php.run(&["isUidOnline", "nobody"]).await?, "0");

    // One sender (the first node), so each client gets its pushes in order.
    let report = json_of(&php.run(&["sendToUid", "alice", "to alice"]).await?)?;
    assert_eq!(report["local"], 0, "{report}");
    php.run(&["send", "carol", "to carol"]).await?;
    php.run(&["sendMulti", "alice,carol", "to both"]).await?;
    php.run(&["sendToGroup", "lobby", "to the lobby"]).await?;
    php.run(&["sendToGroup", "lobby", "not to alice", &alice.conn])
        .await?;
    php.run(&["sendAll", "to everyone"]).await?;
    for (client, expected) in [
        (
            &mut alice,
            &["to alice", "to both", "to the lobby", "to everyone"][..],
        ),
        (&mut bob, &["to the lobby", "not to alice", "to everyone"]),
        (&mut carol, &["to carol", "to both", "to everyone"]),
    ] {
        for e in expected {
            assert_eq!(client.recv().await?, *e, "{client:?}");
        }
        client.expect_silence(Duration::from_millis(100)).await?;
    }

    // Queries and membership, for connections on either node.
    assert_eq!(php.run(&["getClientIdCountByGroup", "lobby"]).await?, "2");
    assert_eq!(
        json_of(&php.run(&["getClientIdByUid", "alice"]).await?)?,
        json!([alice.conn])
    );
    assert_eq!(
        json_of(&php.run(&["getUidByClientId", &carol.conn]).await?)?,
        json!("carol")
    );
    php.run(&["joinGroup", &carol.conn, "lobby"]).await?;
    assert_eq!(php.run(&["getClientIdCountByGroup", "lobby"]).await?, "3");
    php.run(&["sendToGroup", "lobby", "carol too"]).await?;
    for c in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(c.recv().await?, "carol too", "{c:?}");
    }

    // A wrong key is refused, and the CLI says so.
    let wrong = programs::output(
        "php",
        &[
            cli,
            "--api",
            api,
            "--api-key",
            "wrong",
            "isUidOnline",
            "alice",
        ],
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(wrong.contains("unauthorized"), "{wrong}");

    // closeClient, with a last message first; then alice is offline.
    php.run(&["closeClient", &alice.conn, "bye"]).await?;
    assert_eq!(alice.recv().await?, "bye");
    alice.expect_closed(STEP).await?;
    eventually("alice offline", || async {
        Ok(php.run(&["isUidOnline", "alice"]).await? == "0")
    })
    .await?;
    nodes.stop().await;
    Ok(())
}
