//! Redis modes under faults: a node killed, Redis restarted during traffic
//! with which end counted each loss, a node the sender has not heard of
//! after a restart, a receiver that misses what was published while it was
//! unsubscribed, a node restarted with a backlog,
//! subscriptions killed; and routing that sends a push only to the nodes that
//! need it, in the order the pushes were made. Real binaries (in-process
//! nodes where a test must control the batching), real Redis.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use switchboard_test::cluster::{InProcess, Process, ProcessNode};
use switchboard_test::faults::{self, Outcome};
use switchboard_test::services::{RedisServer, http_get, redis_url, unique_prefix};
use switchboard_test::{Client, STEP};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

async fn stats(node: &ProcessNode) -> Value {
    faults::stats(node).await.unwrap()
}

async fn wait_ready(node: &ProcessNode, within: Duration) -> Duration {
    faults::wait_ready(node, within).await.unwrap()
}

fn kill9(node: &mut ProcessNode) {
    faults::kill9(node).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_goes_offline_within_the_ttl() {
    let url = redis_url().unwrap();
    let prefix = unique_prefix("kill");
    let cluster = format!("{url}?mode=pubsub&prefix={prefix}&ttl=1.5");
    let mut p = Process::start_cluster(BIN, 2, &cluster).await.unwrap();
    let mut asker = Client::ws(p.nodes[0].ws.unwrap(), "asker", None)
        .await
        .unwrap();
    let _victim = Client::ws(p.nodes[1].ws.unwrap(), "victim", Some("vg"))
        .await
        .unwrap();
    assert_eq!(
        asker
            .ask(json!({"op":"online","uid":"victim"}))
            .await
            .unwrap()["online"],
        true
    );
    assert_eq!(
        asker
            .ask(json!({"op":"group_count","group":"vg"}))
            .await
            .unwrap()["count"],
        1
    );

    kill9(&mut p.nodes[1]);
    let killed = Instant::now();
    faults::ask_until(
        &mut asker,
        json!({"op":"online","uid":"victim"}),
        |r| r["online"] == false,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let offline_after = killed.elapsed();
    assert_eq!(
        asker
            .ask(json!({"op":"group_count","group":"vg"}))
            .await
            .unwrap()["count"],
        0
    );
    assert!(
        offline_after <= Duration::from_millis(1500 + 300),
        "offline after {offline_after:?}, bound is the 1.5 s TTL"
    );

    // A TTL later the survivors collect the dead node's entries.
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    loop {
        let left: bool = redis::cmd("EXISTS")
            .arg(format!("{prefix}:nc:n1"))
            .query_async(&mut redis)
            .await
            .unwrap();
        if !left {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(8),
            "dead node's entries never collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "killed node: offline in every answer after {offline_after:?}; entries collected after {:?}",
        killed.elapsed()
    );
    Box::new(p).shutdown_all().await;
}

/// Runs traffic, restarts Redis in the middle, and collects what arrived.
async fn restart_during_traffic(mode: &str, durable: bool) -> (Outcome, u64, Process, RedisServer) {
    let mut rs = RedisServer::start(durable).unwrap();
    let cluster = format!(
        "{}?mode={mode}&prefix={}&ttl=3",
        rs.url(),
        unique_prefix("restart")
    );
    let (p, sender, receiver) = faults::two_nodes(BIN, &cluster, "sender", "receiver")
        .await
        .unwrap();
    let out = faults::across_fault(
        sender,
        receiver,
        async { tokio::task::block_in_place(|| rs.restart()) },
        Duration::from_secs(15),
        &[&p.nodes[0], &p.nodes[1]],
    )
    .await
    .unwrap();
    let sent = out.sent;
    (out, sent, p, rs)
}

/// Password of the ACL user `n1` that node n1 connects as in some tests.
const N1_PASSWORD: &str = "n1-secret";

/// Creates (again) the ACL user `n1`, with every right, on the Redis at `url`.
async fn create_user_n1(url: &str) -> redis::aio::MultiplexedConnection {
    let mut redis = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    acl_n1(
        &mut redis,
        &["on", &format!(">{N1_PASSWORD}"), "~*", "&*", "+@all"],
    )
    .await;
    redis
}

/// Changes the rights of ACL user `n1`.
async fn acl_n1(redis: &mut redis::aio::MultiplexedConnection, rules: &[&str]) {
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("n1")
        .arg(rules)
        .query_async::<()>(redis)
        .await
        .unwrap();
}

/// Closes the connections of ACL user `n1` that match the further `CLIENT
/// KILL` filters `and`; returns how many.
async fn kill_n1(redis: &mut redis::aio::MultiplexedConnection, and: &[&str]) -> u64 {
    redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "n1"])
        .arg(and)
        .query_async(redis)
        .await
        .unwrap()
}

/// Has `sender`, a client of `node`, push each of `data` to user `uid`, and
/// waits until the node has published them all.
async fn push_published(sender: &mut Client, node: &ProcessNode, uid: &str, data: &[&str]) {
    let published = faults::backplane(node, "published").await.unwrap();
    for d in data {
        sender
            .send(json!({"op":"to_user","uid":uid,"data":d}))
            .await
            .unwrap();
    }
    let all = published + data.len() as u64;
    faults::wait_backplane(node, "published", |n| n >= all, STEP)
        .await
        .unwrap();
}

/// Pushes once more from `sender` (on n0) to `receiver` (user `r` on n1):
/// that push is the next frame the receiver gets, the lost ones never come,
/// n1 has counted all `lost` (the gap this push reveals) and n0, which saw
/// nothing fail, none.
async fn counted_by_the_receiver(
    sender: &mut Client,
    receiver: &mut Client,
    p: &Process,
    lost: u64,
) {
    sender
        .send(json!({"op":"to_user","uid":"r","data":"next"}))
        .await
        .unwrap();
    assert_eq!(receiver.recv().await.unwrap(), "next");
    let (n0, n1) = (&p.nodes[0], &p.nodes[1]);
    assert_eq!(
        faults::backplane(n1, "receive_dropped").await.unwrap(),
        lost,
        "the receiver counts each push it missed"
    );
    assert_eq!(
        faults::backplane(n0, "publish_dropped").await.unwrap(),
        0,
        "the sender saw nothing fail"
    );
}

/// Node `id` of the binary on the private Redis `rs`, with `query` (after
/// `?`) and `prefix`; n1 connects as ACL user `n1`, so that a test can take
/// rights from that node alone.
async fn node_on(rs: &RedisServer, id: &str, query: &str, prefix: &str) -> ProcessNode {
    let url = match id {
        "n1" => rs
            .url()
            .replacen("redis://", &format!("redis://n1:{N1_PASSWORD}@"), 1),
        _ => rs.url(),
    };
    let cluster = format!("{url}?{query}&prefix={prefix}");
    ProcessNode::spawn(BIN.as_ref(), &["--node-id", id, "--cluster", &cluster])
        .await
        .unwrap()
}

/// Two nodes on the private Redis `rs` with `query` (after `?`): n0 as the
/// default user, n1 as ACL user `n1` (see [`node_on`]). Returns them, their
/// prefix and a connection to Redis.
async fn receiver_with_its_own_user(
    rs: &RedisServer,
    query: &str,
) -> (Process, String, redis::aio::MultiplexedConnection) {
    let redis = create_user_n1(&rs.url()).await;
    let prefix = unique_prefix("own-user");
    let n0 = node_on(rs, "n0", query, &prefix).await;
    let n1 = node_on(rs, "n1", query, &prefix).await;
    (
        Process {
            nodes: vec![n0, n1],
        },
        prefix,
        redis,
    )
}

/// A gap only the receiver can see: its subscription is gone (and may not
/// come back) while the sender, connected throughout, publishes three pushes
/// to it. Redis takes them without complaint; the receiver counts exactly
/// three missing when the next push arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_receiver_counts_what_was_published_while_it_was_unsubscribed() {
    let rs = RedisServer::start(false).unwrap();
    let (p, prefix, mut redis) = receiver_with_its_own_user(&rs, "mode=pubsub&ttl=3").await;
    let (n0, n1) = (&p.nodes[0], &p.nodes[1]);
    let mut s = Client::tcp(n0.tcp.unwrap(), "s", None).await.unwrap();
    let mut r = Client::ws(n1.ws.unwrap(), "r", None).await.unwrap();
    s.send(json!({"op":"to_user","uid":"r","data":"before"}))
        .await
        .unwrap();
    assert_eq!(r.recv().await.unwrap(), "before");

    // n1 may no longer subscribe, and its subscriptions are closed.
    acl_n1(&mut redis, &["-subscribe"]).await;
    assert_eq!(
        kill_n1(&mut redis, &["TYPE", "pubsub"]).await,
        2,
        "n1's subscriptions: its channels, and the routes"
    );
    // Published to n1's channel, which nobody hears.
    push_published(&mut s, n0, "r", &["lost0", "lost1", "lost2"]).await;
    acl_n1(&mut redis, &["+subscribe"]).await;
    let channel = format!("{prefix}:ch:n1");
    faults::poll(STEP, async || {
        let subscribers: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut redis)
            .await?;
        Ok(if subscribers[0].1 == 1 {
            Ok(())
        } else {
            Err("n1 not subscribed again")
        })
    })
    .await
    .unwrap();
    counted_by_the_receiver(&mut s, &mut r, &p, 3).await;
    Box::new(p).shutdown_all().await;
}

/// Restarts Redis during traffic. The sender and the receiver each must count
/// a loss that only they can see, so the restart is arranged to produce both:
/// Redis stays down until the sender has counted a publish that failed, and
/// the restarted Redis does not know the receiver's user until the sender has
/// published to it again, which the receiver, not yet subscribed, misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_resumes_after_a_redis_restart_and_counts_losses() {
    let mut rs = RedisServer::start(false).unwrap();
    // A TTL well beyond the restart: for all of it, the directory being
    // unsure, the sender keeps sending the receiver's pushes to its channel
    // (a node it published to before, whether or not it knows it alive)
    // while the receiver cannot connect.
    let (p, _, _) = receiver_with_its_own_user(&rs, "mode=pubsub&ttl=10").await;
    let (n0, n1) = (&p.nodes[0], &p.nodes[1]);
    let sender = Client::tcp(n0.tcp.unwrap(), "sender", None).await.unwrap();
    let receiver = Client::ws(n1.ws.unwrap(), "receiver", None).await.unwrap();
    let mut unheard = 0;
    let fault = async {
        tokio::task::block_in_place(|| rs.kill());
        faults::wait_backplane(n0, "publish_dropped", |d| d > 0, STEP).await?;
        let before = faults::backplane(n0, "published").await?;
        tokio::task::block_in_place(|| rs.restart())?;
        // Published to n1's channel after the restart, while n1 cannot log in.
        let after = faults::wait_backplane(n0, "published", |n| n > before, STEP).await?;
        unheard = after - before;
        create_user_n1(&rs.url()).await;
        anyhow::Ok(())
    };
    let out = faults::across_fault(sender, receiver, fault, Duration::from_secs(15), &[n0, n1])
        .await
        .unwrap();
    assert!(out.in_order_without_duplicates(), "duplicated or reordered");
    let lost = out.lost();
    let dropped = faults::backplane(n0, "publish_dropped").await.unwrap();
    let gaps = faults::backplane(n1, "receive_dropped").await.unwrap();
    eprintln!(
        "pubsub redis restart: recovered in {:?}; sent {}, received {}, lost {lost}; counted: {dropped} by the sender (publish_dropped), {gaps} by the receiver (receive_dropped), which missed {unheard} published while it was away",
        out.recovery,
        out.sent,
        out.got.len(),
    );
    assert!(
        faults::backplane(n1, "reconnects").await.unwrap() >= 1,
        "receiver never resubscribed"
    );
    assert!(dropped >= 1, "the sender counted no failed publish");
    assert!(
        gaps >= unheard && unheard >= 1,
        "the receiver counted {gaps}, but missed {unheard} published while it was away"
    );
    // The receiver counts only numbers it never got; the sender only what it
    // saw fail (which Redis may have executed all the same, when it died
    // before answering).
    assert!(gaps <= lost, "the receiver counted {gaps} of {lost} lost");
    assert!(
        dropped <= out.sent,
        "the sender counted {dropped} of {} sent",
        out.sent
    );
    // The directory was rebuilt: answers are right again.
    let mut c = Client::ws(n0.ws.unwrap(), "checker", None).await.unwrap();
    assert_eq!(
        c.ask(json!({"op":"online","uid":"receiver"}))
            .await
            .unwrap()["online"],
        true
    );
    Box::new(p).shutdown_all().await;
}

/// After a restart of a Redis without persistence, a sender may know neither
/// that a node exists (it joined after the sender last read the node set)
/// nor, from the directory, that it holds a user (it has not rewritten its
/// entries yet). A push to that user must still reach the node if it is
/// subscribed, and be counted if it is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_reaches_or_counts_a_holder_the_sender_has_not_heard_of() {
    let mut rs = RedisServer::start(false).unwrap();
    create_user_n1(&rs.url()).await;
    // n0 reads the node set when it joins and then once per heartbeat, a
    // third of the TTL: with this TTL, not again during the test, which also
    // runs entirely within the TTL that follows n0's reconnect.
    let query = "mode=pubsub&ttl=600";
    let prefix = unique_prefix("unheard");
    // n0's heartbeat probes n0's channel after its first read of the node
    // set: n1 starts only once that read is done.
    let mut probes = redis::Client::open(rs.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    probes.subscribe(format!("{prefix}:ch:n0")).await.unwrap();
    let n0 = node_on(&rs, "n0", query, &prefix).await;
    tokio::time::timeout(STEP, probes.into_on_message().next())
        .await
        .unwrap()
        .unwrap();
    let n1 = node_on(&rs, "n1", query, &prefix).await;
    let p = Process {
        nodes: vec![n0, n1],
    };
    let (n0, n1) = (&p.nodes[0], &p.nodes[1]);
    let mut s = Client::tcp(n0.tcp.unwrap(), "s", None).await.unwrap();
    let mut r = Client::ws(n1.ws.unwrap(), "r", None).await.unwrap();

    tokio::task::block_in_place(|| rs.restart()).unwrap();
    let mut redis = create_user_n1(&rs.url()).await;
    // Each node is back: its connection and its subscription restored, its
    // entries rebuilt.
    for n in [n0, n1] {
        faults::wait_backplane(n, "reconnects", |c| c >= 2, STEP)
            .await
            .unwrap();
        wait_ready(n, STEP).await;
    }
    // As if n1 had not rewritten its entry for r yet.
    redis::cmd("DEL")
        .arg(format!("{prefix}:uc:r"))
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    s.send(json!({"op":"to_user","uid":"r","data":"unheard-of"}))
        .await
        .unwrap();
    assert_eq!(
        r.recv().await.unwrap(),
        "unheard-of",
        "n1, subscribed, gets the push"
    );

    // n1 away: it may not log in again, and its connections are cut.
    let reconnects = faults::backplane(n1, "reconnects").await.unwrap();
    acl_n1(&mut redis, &["off"]).await;
    let killed = kill_n1(&mut redis, &[]).await;
    assert!(killed >= 2, "n1's connection and subscription: {killed}");
    faults::wait_unready(n1, STEP).await.unwrap();
    // Sent to n1's channel, which nobody hears; n1 counts it once back.
    push_published(&mut s, n0, "r", &["away"]).await;
    acl_n1(&mut redis, &["on"]).await;
    faults::wait_backplane(n1, "reconnects", |c| c >= reconnects + 2, STEP)
        .await
        .unwrap();
    wait_ready(n1, STEP).await;
    counted_by_the_receiver(&mut s, &mut r, &p, 1).await;
    Box::new(p).shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_loses_nothing_across_a_redis_restart() {
    let (out, sent, p, _rs) = restart_during_traffic("queue", true).await;
    let expected: Vec<u64> = (0..sent).collect();
    let s1 = stats(&p.nodes[1]).await;
    eprintln!(
        "queue redis restart: recovered in {:?}; sent {sent}, received {}; duplicates dropped by n1 {}",
        out.recovery,
        out.got.len(),
        s1["backplane"]["duplicates"]
    );
    assert_eq!(
        out.got, expected,
        "queue mode lost, duplicated or reordered pushes"
    );
    Box::new(p).shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_node_restarted_under_its_id_gets_its_backlog() {
    let url = redis_url().unwrap();
    let cluster = format!(
        "{url}?mode=queue&prefix={}&ttl=1.5&backlog_grace=2",
        unique_prefix("backlog")
    );
    let mut p = Process::start_cluster(BIN, 2, &cluster).await.unwrap();
    let mut sender = Client::tcp(p.nodes[0].tcp.unwrap(), "sender", None)
        .await
        .unwrap();
    let _b = Client::ws(p.nodes[1].ws.unwrap(), "b", None).await.unwrap();

    kill9(&mut p.nodes[1]);
    let _ = p.nodes[1].child.wait().await;
    for i in 0..5 {
        sender
            .send(json!({"op":"to_user","uid":"b","data":format!("while down {i}")}))
            .await
            .unwrap();
    }
    // Make sure node 0 has written them before node 1 comes back.
    assert_eq!(
        sender
            .ask(json!({"op":"online","uid":"nobody"}))
            .await
            .unwrap()["online"],
        false
    );

    let restarted = ProcessNode::spawn(BIN.as_ref(), &["--node-id", "n1", "--cluster", &cluster])
        .await
        .unwrap();
    let started = Instant::now();
    let mut b = Client::ws(restarted.ws.unwrap(), "b", None).await.unwrap();
    for i in 0..5 {
        assert_eq!(b.recv().await.unwrap(), format!("while down {i}"));
    }
    eprintln!(
        "queue backlog: 5 of 5 delivered {:?} after the restart",
        started.elapsed()
    );
    p.nodes[1] = restarted;
    Box::new(p).shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscriptions_are_restored() {
    let rs = RedisServer::start(false).unwrap();
    let cluster = format!(
        "{}?mode=pubsub&prefix={}&ttl=1.5",
        rs.url(),
        unique_prefix("deaf")
    );
    let (p, mut a, mut b) = faults::two_nodes(BIN, &cluster, "a", "b").await.unwrap();
    let mut redis = redis::Client::open(rs.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(killed >= 2, "killed {killed} subscriptions");
    let (resumed, _) = faults::push_until_delivered(&mut a, &mut b, Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("killed subscriptions: deliveries resumed after {resumed:?}");
    assert!(
        stats(&p.nodes[1]).await["backplane"]["reconnects"]
            .as_u64()
            .unwrap()
            >= 1
    );
    Box::new(p).shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_sends_each_push_only_to_nodes_that_need_it() {
    let url = redis_url().unwrap();
    let prefix = unique_prefix("route");
    let cluster = format!("{url}?mode=pubsub&prefix={prefix}");
    let p = Process::start_cluster(BIN, 3, &cluster).await.unwrap();

    // Watch every channel of this cluster.
    let mut watcher = redis::Client::open(url.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    watcher.psubscribe(format!("{prefix}:*")).await.unwrap();
    // Per channel: (Redis messages, envelopes in them); on the marker
    // channel, the markers seen.
    let counts: Arc<std::sync::Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let marker = format!("{prefix}:marker");
    let watch = tokio::spawn({
        let (counts, marker) = (counts.clone(), marker.clone());
        async move {
            let mut s = watcher.into_on_message();
            while let Some(m) = s.next().await {
                let payload = m.get_payload_bytes();
                if m.get_channel_name() == marker {
                    counts.lock().unwrap().entry(marker.clone()).or_default().0 += 1;
                } else if payload.first() != Some(&0) {
                    let mut counts = counts.lock().unwrap();
                    let c = counts.entry(m.get_channel_name().to_owned()).or_default();
                    c.0 += 1;
                    c.1 += bundled_envelopes(payload);
                }
            }
        }
    });

    let mut s = Client::tcp(p.nodes[0].tcp.unwrap(), "s", None)
        .await
        .unwrap();
    let mut u1 = Client::ws(p.nodes[1].ws.unwrap(), "only1", Some("g"))
        .await
        .unwrap();
    let mut u2 = Client::ws(p.nodes[2].ws.unwrap(), "two", Some("g"))
        .await
        .unwrap();
    let target2 = u2.conn.clone();
    for i in 0..10 {
        s.send(json!({"op":"to_user","uid":"only1","data":format!("u{i}")}))
            .await
            .unwrap();
        s.send(json!({"op":"to_group","group":"g","data":format!("g{i}")}))
            .await
            .unwrap();
        s.send(json!({"op":"to_conn","conn":target2,"data":format!("c{i}")}))
            .await
            .unwrap();
        s.send(json!({"op":"to_all","data":format!("a{i}")}))
            .await
            .unwrap();
    }
    // Each receiver gets its 30 frames; the sender its 10 broadcasts.
    for _ in 0..30 {
        u1.recv().await.unwrap();
        u2.recv().await.unwrap();
    }
    for _ in 0..10 {
        s.recv().await.unwrap();
    }
    // Every push was published before the clients got it, so the watcher has
    // seen them all once it sees a marker published now.
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut markers = 0;
    let mut seen_all = async || {
        markers += 1;
        redis::cmd("PUBLISH")
            .arg(&marker)
            .arg("marker")
            .query_async::<()>(&mut redis)
            .await
            .unwrap();
        faults::poll(STEP, async || {
            let seen = counts.lock().unwrap().get(&marker).map_or(0, |c| c.0);
            Ok(if seen == markers {
                Ok(())
            } else {
                Err("the watcher has not seen the marker")
            })
        })
        .await
        .unwrap();
    };
    seen_all().await;
    let first = counts.lock().unwrap().clone();
    let get = |c: &str| {
        first
            .get(&format!("{prefix}:{c}"))
            .copied()
            .unwrap_or((0, 0))
    };
    eprintln!("(messages, envelopes) per channel: {first:?}");
    assert_eq!(
        get("ch:n0"),
        (0, 0),
        "the sender's node needs nothing from Redis"
    );
    assert_eq!(get("ch:n1").1, 20, "n1: 10 to_user + 10 to_group");
    assert_eq!(get("ch:n2").1, 20, "n2: 10 to_group + 10 to_conn");
    assert_eq!(get("bc").1, 10, "to_all: one broadcast envelope per push");
    for c in ["ch:n1", "ch:n2", "bc"] {
        assert!(get(c).0 >= 1 && get(c).0 <= get(c).1, "{c}: {:?}", get(c));
    }

    // A burst to one node travels in far fewer Redis messages than pushes:
    // the envelopes of each batch share one PUBLISH.
    const BURST: u64 = 500;
    for i in 0..BURST {
        s.send(json!({"op":"to_user","uid":"only1","data":format!("b{i}")}))
            .await
            .unwrap();
    }
    for i in 0..BURST {
        let m = u1.recv().await.unwrap();
        assert_eq!(m, format!("b{i}"), "in order");
    }
    seen_all().await;
    watch.abort();
    let (before, after) = (get("ch:n1"), {
        let c = counts.lock().unwrap();
        c.get(&format!("{prefix}:ch:n1")).copied().unwrap_or((0, 0))
    });
    let (messages, envelopes) = (after.0 - before.0, after.1 - before.1);
    eprintln!("burst: {envelopes} envelopes in {messages} messages");
    assert_eq!(envelopes, BURST);
    assert!(
        messages <= BURST / 2,
        "{envelopes} envelopes took {messages} messages"
    );
    assert_eq!(
        stats(&p.nodes[1]).await["backplane"]["receive_dropped"].as_u64(),
        Some(0),
        "bundles keep the sequence numbers whole"
    );
    Box::new(p).shutdown_all().await;
}

/// A node's pushes reach another node in the order they were made, even when
/// one batch interleaves pushes to everyone (the broadcast channel) with
/// pushes to a user (the node's own channel).
#[tokio::test(flavor = "current_thread")]
async fn pubsub_keeps_the_order_of_a_batch_across_channels() {
    let url = redis_url().unwrap();
    let c = InProcess::on_broker(&url, "pubsub", 2).await.unwrap();
    let mut r = Client::ws(c.nodes[1].ws.unwrap(), "r", None).await.unwrap();
    let hub = &c.nodes[0].hub;
    // One thread: the publishing task cannot take any of these before the
    // test awaits, so they travel as one batch.
    let mut sent = Vec::new();
    for i in 0..3 {
        hub.to_all(format!("all{i}")).unwrap();
        hub.to_user("r", format!("r{i}")).unwrap();
        sent.extend([format!("all{i}"), format!("r{i}")]);
    }
    let mut got = Vec::new();
    for _ in &sent {
        got.push(r.recv().await.unwrap());
    }
    assert_eq!(got, sent);
    for n in c.nodes {
        n.shutdown().await;
    }
}

/// Envelopes in one pub/sub message: a bundle (kind 3, 17-byte header, then
/// u32-length-prefixed envelopes) or a single envelope (kind 2).
fn bundled_envelopes(payload: &[u8]) -> u64 {
    match payload.first() {
        Some(3) => {
            let (mut rest, mut n) = (&payload[17..], 0);
            while rest.len() >= 4 {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                rest = &rest[4 + len..];
                n += 1;
            }
            assert!(rest.is_empty(), "a bundle's lengths add up");
            n
        }
        Some(2) => 1,
        other => panic!("unexpected pub/sub message kind {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_queue_is_capped_then_removed() {
    let url = redis_url().unwrap();
    let prefix = unique_prefix("cap");
    let cluster = format!("{url}?mode=queue&prefix={prefix}&ttl=1&queue_cap=50&queue_age=2");
    let mut p = Process::start_cluster(BIN, 2, &cluster).await.unwrap();
    let mut sender = Client::tcp(p.nodes[0].tcp.unwrap(), "sender", None)
        .await
        .unwrap();
    let _gone = Client::ws(p.nodes[1].ws.unwrap(), "gone", None)
        .await
        .unwrap();
    kill9(&mut p.nodes[1]);
    let killed = Instant::now();
    for i in 0..400 {
        sender
            .send(json!({"op":"to_user","uid":"gone","data":i.to_string()}))
            .await
            .unwrap();
    }
    // Wait until node 0 has written all 400 to Redis.
    loop {
        if stats(&p.nodes[0]).await["backplane"]["published"]
            .as_u64()
            .unwrap()
            >= 400
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "pushes never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let queue = format!("{prefix}:q:n1");
    let len: u64 = redis::cmd("XLEN")
        .arg(&queue)
        .query_async(&mut redis)
        .await
        .unwrap();
    // Approximate trimming removes whole stream nodes (100 entries).
    assert!(
        (50..=50 + 100).contains(&len),
        "queue of a dead node holds {len}"
    );
    // Dead for longer than the queue age: collected, queue and all.
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&queue)
            .query_async(&mut redis)
            .await
            .unwrap();
        if !exists {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "dead node's queue never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "dead node's queue: {len} entries (cap 50), removed {:?} after the kill",
        killed.elapsed()
    );
    Box::new(p).shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis() {
    let mut rs = RedisServer::start(false).unwrap();
    let cluster = format!(
        "{}?mode=pubsub&prefix={}&ttl=1.5",
        rs.url(),
        unique_prefix("ready")
    );
    let p = Process::start_cluster(BIN, 1, &cluster).await.unwrap();
    let node = &p.nodes[0];
    wait_ready(node, Duration::from_secs(5)).await;
    rs.kill();
    let t = Instant::now();
    let reason = loop {
        let (status, body) = http_get(node.ws.unwrap(), "/ready").await.unwrap();
        if status == 503 {
            break body;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still ready with Redis gone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let noticed = t.elapsed();
    assert!(reason.contains("redis"), "{reason}");
    rs.restart().unwrap();
    let back = wait_ready(node, Duration::from_secs(10)).await;
    eprintln!(
        "readiness: 503 ({}) {noticed:?} after Redis died, ready {back:?} after it returned",
        reason.trim()
    );
    Box::new(p).shutdown_all().await;
}

trait ShutdownAll {
    async fn shutdown_all(self);
}

impl ShutdownAll for Box<Process> {
    async fn shutdown_all(self) {
        use switchboard_test::Cluster;
        self.shutdown().await;
    }
}

/// A rebuild of a node's directory entries (here: after its Redis connections
/// are killed) never leaves an entry the node still holds missing, not even
/// for a round trip, and removes the entries it no longer holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_rebuild_never_drops_what_the_node_holds() {
    const GROUPS: usize = 3000;
    // Its own Redis: killing every client of the shared one would hit the
    // tests running beside this one.
    let rs = RedisServer::start(false).unwrap();
    let url = rs.url();
    let prefix = unique_prefix("rebuild");
    let cluster = format!("{url}?mode=queue&prefix={prefix}");
    // One connection in 3,000 groups: past the default cap of 128.
    let p = Process::start_cluster_with(BIN, 1, &cluster, &["--max-groups-per-conn", "4000"])
        .await
        .unwrap();
    let node = &p.nodes[0];
    let n = node.node_id.clone();
    let mut c = Client::tcp(node.tcp.unwrap(), "holder", Some("g0"))
        .await
        .unwrap();
    // Enough groups that writing them all takes several round trips.
    for i in 1..GROUPS {
        c.send(json!({"op":"join","group":format!("g{i}")}))
            .await
            .unwrap();
    }
    let last = format!("g{}", GROUPS - 1);
    faults::ask_until(
        &mut c,
        json!({"op":"group_count","group":last}),
        |r| r["count"] == 1,
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    // Entries the node no longer holds, as a lost change would leave them: a
    // closed connection of user "ghost" in group "gone", and a group "left"
    // the live connection left.
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ghost = format!("{n}.dead");
    let k = |kind: &str, id: &str| format!("{prefix}:{kind}:{id}");
    redis::pipe()
        .sadd(k("nc", &n), &ghost)
        .hset_multiple(
            k("conn", &ghost),
            &[("node", n.as_str()), ("user", "ghost")],
        )
        .sadd(k("user", "ghost"), &ghost)
        .hset(k("uc", "ghost"), &n, 1)
        .sadd(k("cg", &ghost), "gone")
        .sadd(k("group", "gone"), &ghost)
        .hset(k("gc", "gone"), &n, 1)
        .sadd(k("cg", &c.conn), "left")
        .sadd(k("group", "left"), &c.conn)
        .hset(k("gc", "left"), &n, 1)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        answer(&mut c, json!({"op":"online","uid":"ghost"})).await["online"],
        true
    );
    assert_eq!(
        answer(&mut c, json!({"op":"group_count","group":"left"})).await["count"],
        1
    );

    // What the node holds, read in one round trip: its user, its first and
    // last group, its connection.
    let mut held = redis::pipe();
    held.hexists(k("uc", "holder"), &n)
        .hexists(k("gc", "g0"), &n)
        .hexists(k("gc", &last), &n)
        .sismember(k("nc", &n), &c.conn);
    let (mut polls, mut missing) = (0u64, 0u64);
    for round in 0..3 {
        let before = faults::backplane(node, "reconnects").await.unwrap();
        // Kills every normal client but this one: the node's links.
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(killed >= 1, "round {round}: killed no connection");
        let started = Instant::now();
        loop {
            for _ in 0..20 {
                let present: (bool, bool, bool, bool) = held.query_async(&mut redis).await.unwrap();
                polls += 1;
                if present != (true, true, true, true) {
                    missing += 1;
                }
            }
            if faults::backplane(node, "reconnects").await.unwrap() > before
                && http_get(node.ws.unwrap(), "/ready").await.unwrap().0 == 200
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "round {round}: no rebuild within 10 s"
            );
        }
    }
    eprintln!("directory rebuild: {polls} polls over 3 rebuilds, {missing} found an entry missing");
    assert_eq!(missing, 0, "a rebuild left held entries missing");

    assert_eq!(
        answer(&mut c, json!({"op":"online","uid":"ghost"})).await["online"],
        false
    );
    assert_eq!(
        answer(&mut c, json!({"op":"group_count","group":"gone"})).await["count"],
        0
    );
    assert_eq!(
        answer(&mut c, json!({"op":"group_count","group":"left"})).await["count"],
        0
    );
    let leftovers: (bool, bool, bool, bool) = redis::pipe()
        .exists(k("conn", &ghost))
        .sismember(k("nc", &n), &ghost)
        .sismember(k("group", "left"), &c.conn)
        .sismember(k("cg", &c.conn), "left")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(leftovers, (false, false, false, false));
    assert_eq!(
        answer(&mut c, json!({"op":"online","uid":"holder"})).await["online"],
        true
    );
    assert_eq!(
        answer(&mut c, json!({"op":"group_count","group":last})).await["count"],
        1
    );
    Box::new(p).shutdown_all().await;
}

async fn answer(c: &mut Client, q: Value) -> Value {
    c.ask(q).await.unwrap()
}

/// How many keys the routing lookups of a private Redis have read so far
/// (the lookup script reads each with `HKEYS`; nothing else in these tests
/// does).
async fn route_lookups(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(redis)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_hkeys:calls="))
        .and_then(|l| l.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A node keeps the routes it learned: pushes to a user it has routed to
/// before cost no lookup, and the route stays right as the user comes and
/// goes on other nodes, "offline" included.
async fn known_routes_need_no_lookup(mode: &str) {
    let rs = RedisServer::start(false).unwrap();
    let mut redis = redis::Client::open(rs.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let prefix = unique_prefix("known");
    let query = format!("mode={mode}");
    let p = Process {
        nodes: vec![
            node_on(&rs, "n0", &query, &prefix).await,
            node_on(&rs, "n2", &query, &prefix).await,
        ],
    };
    let (n0, n1) = (&p.nodes[0], &p.nodes[1]);
    let mut s = Client::tcp(n0.tcp.unwrap(), "s", None).await.unwrap();
    let mut bob = Client::ws(n1.ws.unwrap(), "bob", None).await.unwrap();

    let before = route_lookups(&mut redis).await;
    // One at a time: each push is a batch of its own, which without known
    // routes would be a lookup each.
    for i in 0..20 {
        s.send(json!({"op":"to_user","uid":"bob","data":format!("m{i}")}))
            .await
            .unwrap();
        assert_eq!(bob.recv().await.unwrap(), format!("m{i}"));
    }
    // Once, or twice when the first lookup crossed the change that bob's
    // arrival published (such a lookup is used, not kept); never per push.
    let lookups = route_lookups(&mut redis).await - before;
    assert!(
        (1..=2).contains(&lookups),
        "bob's route was looked up {lookups} times for 20 pushes"
    );

    // Carol is offline: that is looked up once, and kept.
    let before = route_lookups(&mut redis).await;
    s.send(json!({"op":"to_user","uid":"carol","data":"nobody"}))
        .await
        .unwrap();
    faults::poll(STEP, async || {
        Ok(if route_lookups(&mut redis).await > before {
            Ok(())
        } else {
            Err("carol's route not looked up")
        })
    })
    .await
    .unwrap();
    // She connects on n1: n0 hears of it, and its "offline" becomes n1.
    let mut carol = Client::ws(n1.ws.unwrap(), "carol", None).await.unwrap();
    // (Well past the time n0 takes to read the change on an idle machine.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send(json!({"op":"to_user","uid":"carol","data":"hello"}))
        .await
        .unwrap();
    assert_eq!(carol.recv().await.unwrap(), "hello");

    // Bob moves to n0 and leaves n1: the route follows.
    let mut bob0 = Client::ws(n0.ws.unwrap(), "bob", None).await.unwrap();
    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send(json!({"op":"to_user","uid":"bob","data":"moved"}))
        .await
        .unwrap();
    assert_eq!(bob0.recv().await.unwrap(), "moved");
    assert_eq!(
        route_lookups(&mut redis).await - before,
        1,
        "only carol's first route was looked up"
    );
    Box::new(p).shutdown_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_known_routes_need_no_lookup() {
    known_routes_need_no_lookup("pubsub").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_known_routes_need_no_lookup() {
    known_routes_need_no_lookup("queue").await;
}

/// A node that cannot hear route changes must not route by what it kept:
/// the sender's subscriptions are cut (and may not come back) while the
/// receiver moves to another node; the next push still finds him, by asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deaf_to_route_changes_asks_instead_of_misrouting() {
    let rs = RedisServer::start(false).unwrap();
    let mut redis = create_user_n1(&rs.url()).await;
    let prefix = unique_prefix("deaf");
    let p = Process {
        nodes: vec![
            // n1, the sender, connects as the ACL user whose rights change.
            node_on(&rs, "n1", "mode=pubsub", &prefix).await,
            node_on(&rs, "n0", "mode=pubsub", &prefix).await,
            node_on(&rs, "n2", "mode=pubsub", &prefix).await,
        ],
    };
    let (sender, n0, n2) = (&p.nodes[0], &p.nodes[1], &p.nodes[2]);
    let mut s = Client::tcp(sender.tcp.unwrap(), "s", None).await.unwrap();
    let mut bob = Client::ws(n2.ws.unwrap(), "bob", None).await.unwrap();
    s.send(json!({"op":"to_user","uid":"bob","data":"on n2"}))
        .await
        .unwrap();
    assert_eq!(bob.recv().await.unwrap(), "on n2");

    // The sender knows bob is on n2. Now it hears no route change: its
    // routes subscription (one channel; its envelopes' holds two) is cut,
    // and may not come back. Its other connections stay, so it has no
    // reconnect window in which it would ask anyway.
    acl_n1(&mut redis, &["-subscribe"]).await;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis)
        .await
        .unwrap();
    let routes = clients
        .lines()
        .find(|l| l.contains(" user=n1 ") && l.contains(" sub=1 "))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .expect("the sender's routes subscription")
        .to_owned();
    assert_eq!(
        kill_n1(&mut redis, &["ID", &routes]).await,
        1,
        "the sender's routes subscription"
    );
    // Bob moves to n0, and leaves n2.
    let mut bob0 = Client::ws(n0.ws.unwrap(), "bob", None).await.unwrap();
    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send(json!({"op":"to_user","uid":"bob","data":"on n0"}))
        .await
        .unwrap();
    assert_eq!(bob0.recv().await.unwrap(), "on n0");
    Box::new(p).shutdown_all().await;
}
