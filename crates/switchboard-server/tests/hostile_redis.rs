//! A hostile client against two real nodes on Redis with authentication on:
//! it floods denied pushes and joins, oversized names and bad tokens, and
//! reconnects whenever it is closed. An honest client on each node keeps a
//! round trip going meanwhile: it is never closed, its p99 stays under 50 ms,
//! and every denial the hostile client saw is counted by the nodes.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use switchboard::auth::{Claims, mint_hs256, now_secs};
use switchboard_test::client::Event;
use switchboard_test::cluster::ProcessNode;
use switchboard_test::probe::{on_own_thread, p99, round_trips};
use switchboard_test::{Client, services};

const SECRET: &str = "hostile-test-secret-0123456789ab";

fn token(sub: &str, groups: &[&str], can: &[&str]) -> String {
    let claims = Claims {
        sub: sub.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        can: can.iter().map(|c| c.to_string()).collect(),
        exp: Some(now_secs() + 600),
        ..Claims::default()
    };
    mint_hs256(&claims, SECRET)
}

/// What the hostile client saw.
#[derive(Debug, Default)]
struct Seen {
    denied: u64,
    rate_limited: u64,
    closed_1008: u64,
    refused_tokens: u64,
    other: Vec<String>,
}

/// One round of abuse on one connection: a burst of bad requests, then their
/// answers, until the node closes it or the burst is answered.
async fn abuse(ws: SocketAddr, round: usize, seen: &mut Seen) -> Result<()> {
    // A forged token, then an expired one: refused before any socket is open.
    for t in [
        mint_hs256(
            &Claims {
                sub: "mallory".into(),
                ..Claims::default()
            },
            "not-the-secret-not-the-secret-00",
        ),
        "not.a.jwt".to_owned(),
    ] {
        let (status, _) = Client::ws_refused(ws, &format!("token={t}"), &[]).await?;
        anyhow::ensure!(status == 401, "a bad token got {status}");
        seen.refused_tokens += 1;
    }
    let mut c = Client::ws_query(ws, &format!("token={}", token("mallory", &["pit"], &[]))).await?;
    let long = "g".repeat(300);
    // Past the default burst of 200 and on, so that the rate limit refuses,
    // then closes.
    let burst = 600;
    for i in 0..burst {
        let req = match i % 4 {
            0 => json!({"op": "to_all", "data": "spam"}),
            1 => json!({"op": "join", "group": format!("room-{round}-{i}")}),
            2 => json!({"op": "join", "group": long}),
            _ => json!({"op": "to_user", "uid": "honest-0", "data": "spam"}),
        };
        if c.send(req).await.is_err() {
            break;
        }
    }
    for _ in 0..burst {
        match c.next_event(Duration::from_secs(5)).await? {
            Event::Text(t) => {
                let v: Value = serde_json::from_str(&t)?;
                let r = v["reason"].as_str().unwrap_or_default();
                if r.starts_with("not permitted") {
                    seen.denied += 1;
                } else if r.starts_with("rate limited") {
                    seen.rate_limited += 1;
                } else if r.contains("closing") {
                    // The TCP notice; on WebSocket the close code says it.
                } else {
                    seen.other.push(t);
                }
            }
            Event::Closed(Some(1008)) => {
                seen.closed_1008 += 1;
                return Ok(());
            }
            e => anyhow::bail!("unexpected {e:?}"),
        }
    }
    c.close().await;
    Ok(())
}

async fn stats(addr: SocketAddr) -> Result<Value> {
    let r = switchboard_test::http::get(addr, "/stats").await?;
    Ok(serde_json::from_slice(&r.body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_client_on_redis_harms_no_honest_client_and_every_denial_is_counted() -> Result<()>
{
    let url = format!(
        "{}?mode=pubsub&prefix={}",
        services::redis_url()?,
        services::unique_prefix("hostile")
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_switchboard"));
    let env = [("SWITCHBOARD_JWT_SECRET", SECRET)];
    let mut nodes = Vec::new();
    for id in ["h0", "h1"] {
        nodes.push(
            ProcessNode::spawn_with_env(bin, &["--node-id", id, "--cluster", &url], &env).await?,
        );
    }
    let ws: Vec<SocketAddr> = nodes.iter().map(|n| n.ws.unwrap()).collect();
    let mut honest = Vec::new();
    for (i, addr) in ws.iter().enumerate() {
        let t = token(&format!("honest-{i}"), &["pit"], &["push:conn"]);
        honest.push(Client::ws_query(*addr, &format!("token={t}")).await?);
    }
    let done = Arc::new(AtomicBool::new(false));
    let hostile = on_own_thread({
        let (done, ws) = (done.clone(), ws.clone());
        move || async move {
            let mut seen = Seen::default();
            let t0 = Instant::now();
            let mut round = 0;
            while t0.elapsed() < Duration::from_secs(4) {
                abuse(ws[round % 2], round, &mut seen).await?;
                round += 1;
            }
            done.store(true, Ordering::Release);
            anyhow::Ok(seen)
        }
    });
    let (mut h0, mut h1) = {
        let mut it = honest.into_iter();
        (it.next().unwrap(), it.next().unwrap())
    };
    let pause = Duration::from_millis(5);
    let (r0, r1) = tokio::join!(
        round_trips(&mut h0, &done, 100, pause),
        round_trips(&mut h1, &done, 100, pause)
    );
    let seen = hostile.join().unwrap()?;
    let mut p99s = Vec::new();
    for (i, mut rtts) in [r0?, r1?].into_iter().enumerate() {
        let p = p99(&mut rtts);
        p99s.push((p, rtts.len()));
        assert!(
            p < Duration::from_millis(50),
            "honest client on node {i}: p99 {p:?} over {} round trips",
            rtts.len()
        );
    }
    // Never closed, still in its group, still hearing the cluster.
    h0.send(json!({"op": "to_conn", "conn": h1.conn, "data": "still here"}))
        .await?;
    assert_eq!(h1.recv().await?, "still here");
    assert!(seen.other.is_empty(), "{:?}", seen.other);
    assert!(seen.denied > 0 && seen.refused_tokens > 0, "{seen:?}");
    assert!(seen.rate_limited + seen.closed_1008 > 0, "{seen:?}");

    // Every denial the hostile client saw, the nodes counted.
    let (mut denied, mut refused, mut limited, mut closed) = (0, 0, 0, 0);
    for addr in &ws {
        let s = stats(*addr).await?;
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        denied += n(&s["app"]["requests_denied"]);
        refused += n(&s["app"]["connections_refused"]);
        limited += n(&s["messages_rate_limited"]);
        closed += n(&s["policy_closed"]);
    }
    assert_eq!(denied, seen.denied, "{seen:?}");
    assert_eq!(refused, seen.refused_tokens, "{seen:?}");
    assert_eq!(closed, seen.closed_1008, "{seen:?}");
    // The message that tips a connection over is counted but not answered.
    assert_eq!(limited, seen.rate_limited + seen.closed_1008, "{seen:?}");
    eprintln!(
        "hostile: {seen:?}; honest (p99, round trips): {p99s:?}; nodes counted {denied} denied, {refused} refused, {limited} rate-limited, {closed} closed"
    );
    for n in nodes {
        n.terminate().await?;
    }
    Ok(())
}
