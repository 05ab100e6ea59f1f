//! Secure by default: who may connect, what a client may do, and the limits
//! that keep one client from harming the others.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use switchboard::auth::{Claims, mint_hs256, now_secs};
use switchboard_server::config::{ServeArgs, ServeConfig};
use switchboard_server::node::{self, Running};
use switchboard_test::client::Event;
use switchboard_test::cluster::ProcessNode;
use switchboard_test::probe::{on_own_thread, p99, round_trips};
use switchboard_test::{Client, STEP};

const SECRET: &str = "a-test-secret-of-32-bytes-or-so!";

/// One node started from flags, as `switchboard serve` would be.
async fn node_with(args: ServeArgs) -> Result<Running> {
    let mut args = args;
    args.ws.get_or_insert("127.0.0.1:0".into());
    args.tcp.get_or_insert("127.0.0.1:0".into());
    let cfg = ServeConfig::load(args)?;
    node::launch(&cfg, node::backplane(&cfg.cluster).await?).await
}

async fn jwt_node(can: Option<&str>) -> Result<Running> {
    node_with(ServeArgs {
        jwt_secret: Some(SECRET.parse()?),
        can: can.map(str::to_owned),
        ..ServeArgs::default()
    })
    .await
}

fn token(sub: &str, groups: &[&str], exp_in: i64, secret: &str) -> String {
    let claims = Claims {
        sub: sub.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        exp: Some((now_secs() as i64 + exp_in) as u64),
        ..Claims::default()
    };
    mint_hs256(&claims, secret)
}

fn reason(v: &Value) -> &str {
    v["reason"].as_str().unwrap_or_default()
}

async fn stats(n: &Running) -> Result<Value> {
    let r = switchboard_test::http::get(n.ws.unwrap(), "/stats").await?;
    assert_eq!(r.status, 200);
    Ok(serde_json::from_slice(&r.body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_node_refuses_bad_tokens_and_grants_only_the_tokens_groups() -> Result<()> {
    let n = jwt_node(None).await?;
    let ws = n.ws.unwrap();
    // No token, a token signed by another key, an expired token: 401, with a
    // reason a developer can act on.
    let (status, body) = Client::ws_refused(ws, "uid=alice", &[]).await?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("token is required"), "{body}");
    let forged = token("alice", &["lobby"], 60, "another-secret-entirely-32-bytes");
    let (status, body) = Client::ws_refused(ws, &format!("token={forged}"), &[]).await?;
    assert_eq!(status, 401);
    assert!(body.contains("signature"), "{body}");
    let expired = token("alice", &["lobby"], -60, SECRET);
    let (status, body) = Client::ws_refused(ws, &format!("token={expired}"), &[]).await?;
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");
    let (status, _) =
        Client::ws_refused(ws, "", &[("authorization", &format!("Bearer {forged}"))]).await?;
    assert_eq!(status, 401);

    // A valid token: welcomed, bound to its uid, in its groups.
    let mut alice = Client::ws_query(
        ws,
        &format!("token={}", token("alice", &["lobby"], 60, SECRET)),
    )
    .await?;
    assert_eq!(alice.uid, "alice");
    let bob_token = token("bob", &["lobby"], 60, SECRET);
    let mut bob =
        Client::tcp_hello(n.tcp.unwrap(), &json!({"op": "hello", "token": bob_token})).await?;
    assert_eq!(bob.uid, "bob");
    let count = alice
        .ask(json!({"op": "group_count", "group": "lobby"}))
        .await?;
    assert_eq!(count["count"], 2, "{count}");

    // Nothing else is allowed: every denial is an error, the connection stays.
    for (req, what) in [
        (json!({"op": "to_all", "data": "spam"}), "to_all"),
        (
            json!({"op": "to_group", "group": "lobby", "data": "spam"}),
            "to_group",
        ),
        (
            json!({"op": "to_user", "uid": "bob", "data": "spam"}),
            "to_user",
        ),
        (json!({"op": "join", "group": "admins"}), "join"),
        (json!({"op": "online", "uid": "bob"}), "online"),
        (
            json!({"op": "group_count", "group": "admins"}),
            "group_count",
        ),
    ] {
        let e = alice.ask(req).await?;
        assert_eq!(e["op"], "error", "{e}");
        assert!(
            reason(&e).starts_with(&format!("not permitted: {what}")),
            "{e}"
        );
    }
    bob.expect_silence(Duration::from_millis(300)).await?;
    // Its own group it may leave and join again.
    alice.send(json!({"op": "leave", "group": "lobby"})).await?;
    alice.send(json!({"op": "join", "group": "lobby"})).await?;
    let count = alice
        .ask(json!({"op": "group_count", "group": "lobby"}))
        .await?;
    assert_eq!(count["count"], 2, "{count}");
    // A TCP hello without a token gets an error line, then the close.
    let refused =
        Client::tcp_refused(n.tcp.unwrap(), &json!({"op": "hello", "uid": "eve"})).await?;
    assert!(reason(&refused).contains("token is required"), "{refused}");

    let s = stats(&n).await?;
    assert_eq!(s["app"]["requests_denied"], 6, "{s}");
    assert_eq!(s["app"]["connections_refused"], 5, "{s}");
    n.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_wide_rules_and_token_rules_widen_what_a_client_may_do() -> Result<()> {
    let n = jwt_node(Some("push:group:lobby, query:online:*")).await?;
    let ws = n.ws.unwrap();
    let mut alice = Client::ws_query(
        ws,
        &format!("token={}", token("alice", &["lobby"], 60, SECRET)),
    )
    .await?;
    let mut bob = Client::ws_query(
        ws,
        &format!("token={}", token("bob", &["lobby"], 60, SECRET)),
    )
    .await?;
    alice
        .send(json!({"op": "to_group", "group": "lobby", "data": "hi"}))
        .await?;
    assert_eq!(bob.recv().await?, "hi");
    assert_eq!(alice.recv().await?, "hi", "a member of lobby too");
    let online = alice.ask(json!({"op": "online", "uid": "bob"})).await?;
    assert_eq!(online["online"], true, "{online}");
    // A token's own rules: this one may push to everyone.
    let claims = Claims {
        sub: "ops".into(),
        can: vec!["push:all".into()],
        exp: Some(now_secs() + 60),
        ..Claims::default()
    };
    let mut ops = Client::ws_query(ws, &format!("token={}", mint_hs256(&claims, SECRET))).await?;
    ops.send(json!({"op": "to_all", "data": "notice"})).await?;
    assert_eq!(alice.recv().await?, "notice");
    assert_eq!(bob.recv().await?, "notice");
    let e = alice.ask(json!({"op": "to_all", "data": "x"})).await?;
    assert!(reason(&e).starts_with("not permitted"), "{e}");
    n.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_told_and_closed_unless_refreshed() -> Result<()> {
    let mut args = ServeArgs {
        jwt_secret: Some(SECRET.parse()?),
        ws: Some("127.0.0.1:0".into()),
        tcp: Some("off".into()),
        ..ServeArgs::default()
    };
    args.ws_path = None;
    let mut cfg = ServeConfig::load(args)?;
    cfg.security.refresh_grace = Duration::from_secs(2);
    let n = node::launch(&cfg, node::backplane(&cfg.cluster).await?).await?;
    let ws = n.ws.unwrap();
    // exp is checked with 5 s of leeway: a token 4 s past its exp still opens.
    let mut keeps = Client::ws_query(ws, &format!("token={}", token("k", &[], -4, SECRET))).await?;
    let mut lapses =
        Client::ws_query(ws, &format!("token={}", token("l", &[], -4, SECRET))).await?;
    for c in [&mut keeps, &mut lapses] {
        let told = c.recv_json().await?;
        assert_eq!(told["op"], "expired", "{told}");
        assert!(reason(&told).contains("refresh"), "{told}");
    }
    // Another uid's token does not do.
    let wrong = keeps
        .ask(json!({"op": "refresh", "token": token("x", &[], 600, SECRET)}))
        .await?;
    assert_eq!(wrong["op"], "error", "{wrong}");
    let ok = keeps
        .ask(json!({"op": "refresh", "token": token("k", &[], 600, SECRET)}))
        .await?;
    assert_eq!(ok["op"], "refreshed", "{ok}");
    let t0 = Instant::now();
    assert_eq!(lapses.expect_closed(STEP).await?, Some(1000));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The refreshed one stays, and works.
    let count = keeps
        .ask(json!({"op": "group_count", "group": "none"}))
        .await?;
    assert_eq!(count["op"], "error", "not its group: {count}");
    keeps.expect_silence(Duration::from_millis(1500)).await?;
    let s = stats(&n).await?;
    assert_eq!(s["app"]["tokens_expired"], 1, "{s}");
    assert_eq!(s["app"]["tokens_refreshed"], 1, "{s}");
    n.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_refuses_pages_from_other_origins() -> Result<()> {
    let n = node_with(ServeArgs::default()).await?;
    let ws = n.ws.unwrap();
    let (status, body) =
        Client::ws_refused(ws, "uid=a", &[("origin", "https://evil.example")]).await?;
    assert_eq!(status, 403);
    assert!(body.contains("allowed-origins"), "{body}");
    // Pages of this machine, and clients that are not browsers, connect.
    let origin = format!("http://{ws}");
    assert!(
        Client::ws_refused(ws, "uid=a", &[("origin", &origin)])
            .await
            .is_err()
    );
    Client::ws(ws, "a", None).await?;
    // Names are checked: too long, or with control characters.
    let long = "x".repeat(256);
    let (status, body) = Client::ws_refused(ws, &format!("uid={long}"), &[]).await?;
    assert_eq!(status, 400, "{body}");
    n.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_stop_at_the_cap_while_another_clients_round_trips_stay_fast() -> Result<()> {
    // The shipped server, --insecure, with no rate limit so that every join
    // reaches the cap; the flood on a thread of its own.
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_switchboard"));
    let n = ProcessNode::spawn(bin, &["--insecure", "--client-rate", "0"]).await?;
    let (ws, tcp) = (n.ws.unwrap(), n.tcp.unwrap());
    let mut honest = Client::ws(ws, "honest", None).await?;
    let done = Arc::new(AtomicBool::new(false));
    let joins = 10_000;
    let flood = on_own_thread({
        let done = done.clone();
        move || async move {
            let mut flood = Client::tcp(tcp, "flood", None).await?;
            for i in 0..joins {
                flood
                    .send(json!({"op": "join", "group": format!("g-{i}")}))
                    .await?;
            }
            // Every join past the cap gets an error, and nothing else comes.
            for _ in 0..joins - 128 {
                let e = flood.recv_json().await?;
                anyhow::ensure!(reason(&e).contains("too many groups"), "{e}");
            }
            flood.expect_silence(Duration::from_millis(300)).await?;
            done.store(true, Ordering::Release);
            let mut counts = Vec::new();
            for g in ["g-127", "g-128"] {
                let c = flood.ask(json!({"op": "group_count", "group": g})).await?;
                counts.push(c["count"].clone());
            }
            anyhow::Ok(counts)
        }
    });
    let mut rtts = round_trips(&mut honest, &done, 100, Duration::from_millis(5)).await?;
    let counts = flood.join().unwrap()?;
    assert_eq!(counts, [1, 0], "in the 128th group, not the 129th");
    let p99 = p99(&mut rtts);
    assert!(
        p99 < Duration::from_millis(50),
        "p99 {p99:?} over {} round trips",
        rtts.len()
    );
    let r = switchboard_test::http::get(ws, "/stats").await?;
    let s: Value = serde_json::from_slice(&r.body)?;
    assert_eq!(s["ops_refused"], joins - 128, "{s}");
    n.terminate().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_refused_then_closed_and_counted() -> Result<()> {
    // --insecure: the default rate limit (100 a second, bursts of 200).
    let n = node_with(ServeArgs {
        insecure: Some(true),
        ..ServeArgs::default()
    })
    .await?;
    let ws = n.ws.unwrap();
    let mut flood = Client::ws(ws, "flood", None).await?;
    let mut other = Client::ws(ws, "other", None).await?;
    let mut limited = 0;
    let closed = loop {
        if flood
            .send(json!({"op": "online", "uid": "nobody"}))
            .await
            .is_err()
        {
            break None;
        }
        match flood.next_event(Duration::from_millis(0)).await {
            Ok(Event::Text(t)) if t.contains("rate limited") => limited += 1,
            Ok(Event::Closed(code)) => break code,
            _ => {}
        }
    };
    let closed = match closed {
        Some(c) => Some(c),
        None => flood.expect_closed(STEP).await?,
    };
    assert_eq!(closed, Some(1008));
    assert!(limited > 0);
    // The bystander is untouched.
    let a = other.ask(json!({"op": "online", "uid": "other"})).await?;
    assert_eq!(a["online"], true);
    let s = stats(&n).await?;
    assert_eq!(s["policy_closed"], 1, "{s}");
    assert!(s["messages_rate_limited"].as_u64() > Some(0), "{s}");
    n.shutdown().await;
    Ok(())
}

#[test]
fn serve_refuses_an_exposed_address_without_authentication() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--ws", "0.0.0.0:0", "--tcp", "off"])
        .env_remove("SWITCHBOARD_JWT_SECRET")
        .env_remove("SWITCHBOARD_INSECURE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve 0.0.0.0:0 without authentication")
            && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn the_token_subcommand_mints_what_a_node_accepts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--sub", "alice", "--groups", "lobby,room-1"])
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let id = switchboard::auth::JwtVerifier::hs256(SECRET)
        .verify(token.trim())
        .unwrap();
    assert_eq!(id.user.as_str(), "alice");
    assert_eq!(id.groups.len(), 2);
    assert!(id.expires.is_some_and(|e| e > now_secs() + 3000));
}

/// A backend for the connect proxy: `Bearer ok-UID` is UID in the lobby
/// (allowed to push there); a query with `slow` is never answered in time;
/// anything else is refused with a reason. It keeps the facts it was sent.
async fn backend() -> Result<(std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Value>>>)> {
    use axum::routing::post;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/auth",
        post({
            let seen = seen.clone();
            move |body: String| {
                let seen = seen.clone();
                async move {
                    let facts: Value = serde_json::from_str(&body).unwrap();
                    seen.lock().unwrap().push(facts.clone());
                    if facts["query"].as_str().unwrap_or("").contains("slow") {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    let auth = facts["headers"]["authorization"]
                        .as_str()
                        .or(facts["hello"]["auth"].as_str())
                        .unwrap_or("");
                    match auth.strip_prefix("Bearer ok-") {
                        Some(uid) => (
                            axum::http::StatusCode::OK,
                            json!({"uid": uid, "groups": ["lobby"], "can": ["push:group:lobby"]})
                                .to_string(),
                        ),
                        None => (
                            axum::http::StatusCode::FORBIDDEN,
                            json!({"reason": "unknown user"}).to_string(),
                        ),
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_proxy_decides_who_connects_and_as_whom() -> Result<()> {
    let (addr, seen) = backend().await?;
    let n = node_with(ServeArgs {
        connect_proxy: Some(format!("http://{addr}/auth")),
        connect_proxy_timeout: Some(1),
        ..ServeArgs::default()
    })
    .await?;
    let ws = n.ws.unwrap();
    // Accepted as the backend says, with what it allows.
    let mut a =
        Client::ws_with_headers(ws, "room=4", &[("authorization", "Bearer ok-alice")]).await?;
    assert_eq!(a.uid, "alice");
    let mut b = Client::tcp_hello(
        n.tcp.unwrap(),
        &json!({"op": "hello", "auth": "Bearer ok-bob"}),
    )
    .await?;
    assert_eq!(b.uid, "bob");
    a.send(json!({"op": "to_group", "group": "lobby", "data": "hi"}))
        .await?;
    assert_eq!(b.recv().await?, "hi");
    assert_eq!(a.recv().await?, "hi");
    let e = a.ask(json!({"op": "to_all", "data": "x"})).await?;
    assert!(reason(&e).starts_with("not permitted"), "{e}");
    {
        let facts = seen.lock().unwrap();
        assert_eq!(facts[0]["transport"], "websocket");
        assert_eq!(facts[0]["query"], "room=4");
        assert!(
            facts[0]["remote_addr"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        assert_eq!(facts[1]["transport"], "tcp");
        assert_eq!(facts[1]["hello"]["auth"], "Bearer ok-bob");
    }
    // Refused with the backend's reason; no answer in time is a 503.
    let (status, body) = Client::ws_refused(ws, "", &[("authorization", "Bearer nope")]).await?;
    assert_eq!(status, 403);
    assert!(body.contains("unknown user"), "{body}");
    let t = Instant::now();
    let (status, body) =
        Client::ws_refused(ws, "slow", &[("authorization", "Bearer ok-c")]).await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no answer within"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(3));
    let refused = Client::tcp_refused(n.tcp.unwrap(), &json!({"op": "hello"})).await?;
    assert!(reason(&refused).contains("unknown user"), "{refused}");
    n.shutdown().await;
    // A backend that is down refuses everyone, with 503.
    let gone = node_with(ServeArgs {
        connect_proxy: Some(format!(
            "http://127.0.0.1:{}/auth",
            switchboard_test::services::free_port()?
        )),
        ..ServeArgs::default()
    })
    .await?;
    let (status, body) = Client::ws_refused(gone.ws.unwrap(), "", &[]).await?;
    assert_eq!(status, 503, "{body}");
    gone.shutdown().await;
    Ok(())
}
