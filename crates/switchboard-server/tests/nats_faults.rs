//! NATS modes under faults: a server of a NATS cluster killed under a node
//! during traffic (core: every loss is counted; JetStream with three
//! replicas: nothing is lost), and a node killed and restarted under its id
//! that reads its JetStream backlog. Real binaries, real NATS servers.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_test::broker_clusters::NatsCluster;
use switchboard_test::cluster::{Process, ProcessNode};
use switchboard_test::faults::{self, Outcome, backplane};
use switchboard_test::services::{http_get, nats_url, unique_prefix};
use switchboard_test::{Client, STEP};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// Node `id` of the binary, given server `server` of `c` alone: the rest of
/// the cluster it learns from that server's INFO, which is all it has to
/// fail over with.
async fn node_on(
    c: &NatsCluster,
    id: &str,
    server: usize,
    query: &str,
    extra: &[&str],
) -> ProcessNode {
    let cluster = format!("nats://127.0.0.1:{}?{query}", c.client_port(server));
    let mut args = vec!["--node-id", id, "--cluster", &cluster];
    args.extend_from_slice(extra);
    ProcessNode::spawn(BIN.as_ref(), &args).await.unwrap()
}

/// The servers of `c` that hold a client connection named after node `id`
/// (`/connz`); a server that does not answer is skipped.
fn servers_of(c: &NatsCluster, id: &str) -> Vec<usize> {
    let name = format!("switchboard {id}");
    (0..3)
        .filter(|&i| {
            c.monitor(i, "/connz").is_ok_and(|connz| {
                connz["connections"]
                    .as_array()
                    .is_some_and(|all| all.iter().any(|conn| conn["name"] == name.as_str()))
            })
        })
        .collect()
}

/// Waits until node `id` is connected to exactly one server of `c`, other
/// than `not`; returns it.
async fn wait_connected(c: &NatsCluster, id: &str, not: Option<usize>) -> usize {
    faults::poll(STEP, async || {
        let on = tokio::task::block_in_place(|| servers_of(c, id));
        Ok(match on[..] {
            [s] if Some(s) != not => Ok(s),
            _ => Err(format!("node {id} is connected to the servers {on:?}")),
        })
    })
    .await
    .unwrap()
}

/// What a node's `/ready` said while it was watched: when it first and last
/// answered 503 (from the start of the watch) and the first reason given.
#[derive(Debug, Default, Clone)]
struct Readiness {
    unready_from: Option<Duration>,
    unready_until: Option<Duration>,
    reason: Option<String>,
}

/// Polls `addr`'s `/ready` every 5 ms until `stop`, noting when it was not
/// ready.
fn watch_ready(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Readiness> {
    tokio::spawn(async move {
        let t = Instant::now();
        let mut r = Readiness::default();
        while !stop.load(Ordering::Relaxed) {
            if let Ok((status, body)) = http_get(addr, "/ready").await
                && status == 503
            {
                r.unready_from.get_or_insert(t.elapsed());
                r.unready_until = Some(t.elapsed());
                r.reason.get_or_insert_with(|| body.trim().to_owned());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        r
    })
}

/// The sum of one backplane counter over `nodes`.
async fn total(nodes: &[&ProcessNode], counter: &str) -> u64 {
    let mut sum = 0;
    for n in nodes {
        sum += backplane(n, counter).await.unwrap();
    }
    sum
}

/// A server killed under a node during traffic, and what followed.
struct Killed {
    out: Outcome,
    c: NatsCluster,
    p: Process,
    /// The server n1 failed over to.
    moved: usize,
    /// What each node's `/ready` said from just before the kill.
    ready: Vec<Readiness>,
    /// n1's reconnections before the kill.
    reconnects: u64,
}

/// A NATS cluster of three, a node on server 0 with a sender and a node on
/// server 1 with a receiver (`prepare` runs then), and traffic between them
/// across a kill of server 1 two seconds into it.
async fn kill_the_receivers_server(
    query: &str,
    extra: &[&str],
    prepare: impl AsyncFnOnce(&NatsCluster),
) -> Killed {
    let mut c = tokio::task::block_in_place(|| NatsCluster::start(3)).unwrap();
    let p = Process {
        nodes: vec![
            node_on(&c, "n0", 0, query, extra).await,
            node_on(&c, "n1", 1, query, extra).await,
        ],
    };
    let (n0, n1) = (&p.nodes[0], &p.nodes[1]);
    assert_eq!(wait_connected(&c, "n0", None).await, 0);
    assert_eq!(wait_connected(&c, "n1", None).await, 1);
    prepare(&c).await;
    let reconnects = backplane(n1, "reconnects").await.unwrap();
    let sender = Client::tcp(n0.tcp.unwrap(), "sender", None).await.unwrap();
    let receiver = Client::ws(n1.ws.unwrap(), "receiver", None).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut watches = Vec::new();
    let fault = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for n in [n0, n1] {
            watches.push(watch_ready(n.ws.unwrap(), stop.clone()));
        }
        tokio::task::block_in_place(|| c.kill(1));
        anyhow::Ok(())
    };
    // JetStream takes seconds to elect new leaders, and the receiver's
    // consumer may then wait out the client's request timeout (10 s).
    let out = faults::across_fault(sender, receiver, fault, Duration::from_secs(20), &[n0, n1])
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let mut ready = Vec::new();
    for w in watches {
        ready.push(w.await.unwrap());
    }
    let moved = wait_connected(&c, "n1", Some(1)).await;
    assert_eq!(
        wait_connected(&c, "n0", None).await,
        0,
        "n0's server stayed up"
    );
    Killed {
        out,
        c,
        p,
        moved,
        ready,
        reconnects,
    }
}

/// Core NATS: server 1 dies under the receiver's node while the sender's
/// node, on server 0, keeps publishing. The receiver's node fails over to a
/// server it learned from the cluster and resubscribes; what was published
/// to its subjects meanwhile is gone, and each loss is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_a_nats_server_killed_during_traffic() {
    let prefix = unique_prefix("core-kill");
    let query = format!("mode=core&prefix={prefix}&ttl=2");
    let k = kill_the_receivers_server(&query, &[], async |_| {}).await;
    let (out, p) = (&k.out, &k.p);
    let nodes = [&p.nodes[0], &p.nodes[1]];
    let lost = out.lost();
    let publish_dropped = total(&nodes, "publish_dropped").await;
    let receive_dropped = total(&nodes, "receive_dropped").await;
    let reconnects = backplane(nodes[1], "reconnects").await.unwrap() - k.reconnects;
    eprintln!(
        "core, server killed: n1 moved to server {}, delivery resumed {:?} after the kill; sent {}, received {}, lost {lost}; counted: publish_dropped {publish_dropped}, receive_dropped {receive_dropped}; n1 reconnected {reconnects} times; /ready n0 {:?}, n1 {:?}",
        k.moved,
        out.recovery,
        out.sent,
        out.got.len(),
        k.ready[0],
        k.ready[1],
    );
    assert!(out.in_order_without_duplicates(), "duplicated or reordered");
    assert!(reconnects >= 1, "n1 never reconnected");
    assert!(
        out.recovery < Duration::from_secs(5),
        "delivery resumed only {:?} after the kill",
        out.recovery
    );
    // The sender's link never broke, so nothing failed in its hands: every
    // loss happened between the servers and n1, and the traffic ran on
    // after it, so a later push showed n1 every gap.
    assert_eq!(publish_dropped, 0, "the sender's server never went away");
    assert_eq!(
        receive_dropped, lost,
        "n1 counted {receive_dropped} missing of {lost} lost"
    );
    // The client waits at least 100 ms before its first reconnection
    // attempt, and the watch looks every 5 ms.
    let reason = k.ready[1].reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("nats"),
        "n1 never said it was not ready while it failed over: {:?}",
        k.ready[1]
    );
    k.p.stop().await;
}

/// A JetStream API request by hand, in the plain NATS protocol: an empty
/// message on `subject` to the server at `addr` (`host:port`); the reply.
fn js_request(addr: &str, subject: &str) -> Value {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let inbox = format!("_INBOX.{}", unique_prefix("js"));
    write!(
        w,
        "CONNECT {{\"verbose\":false}}\r\nSUB {inbox} 1\r\nPUB {subject} {inbox} 0\r\n\r\n"
    )
    .unwrap();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line.starts_with("MSG ") {
            let mut body = String::new();
            r.read_line(&mut body).unwrap();
            return serde_json::from_str(body.trim_end()).unwrap();
        }
        if line.starts_with("PING") {
            w.write_all(b"PONG\r\n").unwrap();
        }
    }
}

/// The servers (`s0`..) that lead the stream `prefix` and its consumer
/// `n1`, as server 0 sees them.
fn leaders(c: &NatsCluster, prefix: &str) -> (String, String) {
    let jsz = c
        .monitor(0, "/jsz?accounts=true&streams=true&consumers=true")
        .unwrap();
    let streams = jsz["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["stream_detail"].as_array())
        .flatten();
    for s in streams {
        if s["name"] != prefix {
            continue;
        }
        let stream = s["cluster"]["leader"].as_str().unwrap_or_default();
        let consumer = s["consumer_detail"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "n1")
            .and_then(|c| c["cluster"]["leader"].as_str())
            .unwrap_or_default();
        return (stream.to_owned(), consumer.to_owned());
    }
    (String::new(), String::new())
}

/// Moves the leaders of the stream and of n1's consumer to server 1, by
/// asking whoever leads them to step down until server 1 does.
async fn lead_from_server_1(c: &NatsCluster, prefix: &str) {
    faults::poll(Duration::from_secs(20), async || {
        let (stream, consumer) = tokio::task::block_in_place(|| leaders(c, prefix));
        if stream.is_empty() || consumer.is_empty() {
            return Ok(Err(format!("leaders not elected: {stream:?} {consumer:?}")));
        }
        if stream != "s1" {
            tokio::task::block_in_place(|| {
                js_request(
                    &format!("127.0.0.1:{}", c.client_port(0)),
                    &format!("$JS.API.STREAM.LEADER.STEPDOWN.{prefix}"),
                )
            });
        } else if consumer != "s1" {
            tokio::task::block_in_place(|| {
                js_request(
                    &format!("127.0.0.1:{}", c.client_port(0)),
                    &format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{prefix}.n1"),
                )
            });
        } else {
            return Ok(Ok(()));
        }
        // An election takes a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Err(format!("leaders {stream} and {consumer}")))
    })
    .await
    .unwrap();
}

/// JetStream with three replicas: server 1 dies under the receiver's node
/// while it leads the stream and the receiver's consumer: the worst server
/// to lose. The sender retries what JetStream did not acknowledge, the
/// receiver fails over and reads its consumer from the new leader: every
/// push arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_nats_server_killed_during_traffic_loses_nothing() {
    let prefix = unique_prefix("js-kill");
    let query = format!("mode=jetstream&prefix={prefix}&ttl=2&replicas=3");
    // Everything pushed during the outage (JetStream takes seconds to elect
    // new leaders) reaches the receiver at once when the stream is back:
    // more than the default outbox holds.
    let extra = ["--outbox-frames", "65536"];
    let k = kill_the_receivers_server(&query, &extra, async |c| {
        lead_from_server_1(c, &prefix).await;
    })
    .await;
    let (out, p) = (&k.out, &k.p);
    let nodes = [&p.nodes[0], &p.nodes[1]];
    let duplicates = backplane(nodes[1], "duplicates").await.unwrap();
    let after = tokio::task::block_in_place(|| leaders(&k.c, &prefix));
    eprintln!(
        "jetstream, server killed (it led the stream and n1's consumer; now {after:?}): n1 moved to server {}, delivery resumed {:?} after the kill; sent {}, received {}, duplicates dropped by n1 {duplicates}; /ready n0 {:?}, n1 {:?}",
        k.moved,
        out.recovery,
        out.sent,
        out.got.len(),
        k.ready[0],
        k.ready[1],
    );
    let expected: Vec<u64> = (0..out.sent).collect();
    assert_eq!(out.got, expected, "lost, duplicated or reordered pushes");
    for counter in ["publish_dropped", "receive_dropped", "expired"] {
        assert_eq!(total(&nodes, counter).await, 0, "{counter}");
    }
    k.p.stop().await;
}

/// What JetStream holds for node n1 of the deployment `prefix` on the NATS
/// at `addr`: messages not yet delivered to it, and delivered but not
/// acknowledged.
fn n1_pending(addr: &str, prefix: &str) -> (u64, u64) {
    let info = js_request(addr, &format!("$JS.API.CONSUMER.INFO.{prefix}.n1"));
    let n = |k: &str| {
        info[k]
            .as_u64()
            .unwrap_or_else(|| panic!("consumer info without {k}: {info}"))
    };
    (n("num_pending"), n("num_ack_pending"))
}

/// Waits until JetStream holds `pending` undelivered and nothing unacknowledged
/// for n1.
async fn wait_n1_pending(addr: &str, prefix: &str, pending: u64) {
    faults::poll(STEP, async || {
        let now = tokio::task::block_in_place(|| n1_pending(addr, prefix));
        Ok(if now == (pending, 0) {
            Ok(())
        } else {
            Err(format!(
                "n1's consumer holds (pending, unacknowledged) {now:?}"
            ))
        })
    })
    .await
    .unwrap();
}

/// Two nodes on the shared NATS in JetStream mode, a sender on n0 and user
/// `b` on n1; n1 is killed (SIGKILL: its consumer stays) once it has
/// acknowledged a first push, and five pushes to `b` are made while it is
/// down. Returns the nodes, the cluster URL, the prefix, the NATS address
/// and the sender.
async fn pushes_while_n1_is_down() -> (Process, String, String, String, Client) {
    let url = nats_url().unwrap();
    let addr = url.trim_start_matches("nats://").to_owned();
    let prefix = unique_prefix("backlog");
    // Short, but long enough for a client to be back on the restarted node.
    let cluster = format!("{url}?mode=jetstream&prefix={prefix}&ttl=1.5&backlog_grace=1.5");
    let mut p = Process::start_cluster(BIN, 2, &cluster).await.unwrap();
    let mut sender = Client::tcp(p.nodes[0].tcp.unwrap(), "sender", None)
        .await
        .unwrap();
    let mut b = Client::ws(p.nodes[1].ws.unwrap(), "b", None).await.unwrap();
    sender
        .send(json!({"op":"to_user","uid":"b","data":"before"}))
        .await
        .unwrap();
    assert_eq!(b.recv().await.unwrap(), "before");
    // Acknowledged once handled: a restart must not bring it back.
    wait_n1_pending(&addr, &prefix, 0).await;

    faults::kill9(&p.nodes[1]).unwrap();
    let _ = p.nodes[1].child.wait().await;
    let published = backplane(&p.nodes[0], "published").await.unwrap();
    for i in 0..5 {
        sender
            .send(json!({"op":"to_user","uid":"b","data":format!("while down {i}")}))
            .await
            .unwrap();
        // One at a time, so that each is a JetStream message of its own
        // (a batch would share one).
        faults::wait_backplane(&p.nodes[0], "published", |n| n > published + i, STEP)
            .await
            .unwrap();
    }
    // Kept for n1 by JetStream, not by n0.
    wait_n1_pending(&addr, &prefix, 5).await;
    (p, cluster, prefix, addr, sender)
}

/// JetStream keeps what is published for a node while it is down: n1,
/// restarted under its id, reads exactly those five from its consumer (not
/// the push it acknowledged before it was killed) and acknowledges them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_node_restarted_under_its_id_gets_its_backlog() {
    let (mut p, cluster, prefix, addr, _sender) = pushes_while_n1_is_down().await;
    let t = Instant::now();
    let restarted = ProcessNode::spawn(BIN.as_ref(), &["--node-id", "n1", "--cluster", &cluster])
        .await
        .unwrap();
    let received = faults::wait_backplane(&restarted, "received", |n| n >= 5, STEP)
        .await
        .unwrap();
    let took = t.elapsed();
    wait_n1_pending(&addr, &prefix, 0).await;
    let s = faults::stats(&restarted).await.unwrap();
    eprintln!(
        "jetstream backlog: {received} envelopes read {took:?} after the restart began; n1's backplane {}, connections opened {}",
        s["backplane"], s["conns_opened"]
    );
    assert_eq!(received, 5, "the backlog, and nothing acknowledged before");
    for counter in ["duplicates", "expired", "receive_dropped"] {
        assert_eq!(s["backplane"][counter], 0, "{counter}");
    }
    p.nodes[1] = restarted;
    p.stop().await;
}

/// The Redis queue's promise, on JetStream: a client of `b` back on the
/// restarted node gets what was pushed to it while the node was down.
/// The node holds its backlog for `backlog_grace` before reading it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_client_back_on_a_restarted_node_gets_the_backlog() {
    let (mut p, cluster, _, _, _sender) = pushes_while_n1_is_down().await;
    let restarted = ProcessNode::spawn(BIN.as_ref(), &["--node-id", "n1", "--cluster", &cluster])
        .await
        .unwrap();
    let mut b = Client::ws(restarted.ws.unwrap(), "b", None).await.unwrap();
    for i in 0..5 {
        assert_eq!(b.recv().await.unwrap(), format!("while down {i}"));
    }
    p.nodes[1] = restarted;
    p.stop().await;
}

/// A second process under a live node's id is refused at start, in both
/// modes (it would take the node's subscriptions or its consumer), and the
/// live node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_id_is_refused() {
    let url = nats_url().unwrap();
    for mode in ["core", "jetstream"] {
        let cluster = format!("{url}?mode={mode}&prefix={}", unique_prefix("dup"));
        let p = Process::start_cluster(BIN, 1, &cluster).await.unwrap();
        let out = tokio::process::Command::new(BIN)
            .args([
                "serve",
                "--node-id",
                "n0",
                "--ws",
                "127.0.0.1:0",
                "--tcp",
                "off",
            ])
            .args(["--cluster", &cluster])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{mode}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("already in use"), "{mode}: {err}");
        faults::wait_ready(&p.nodes[0], STEP).await.unwrap();
        // Another id is welcome.
        let other = ProcessNode::spawn(BIN.as_ref(), &["--node-id", "n1", "--cluster", &cluster])
            .await
            .unwrap();
        let _ = other.terminate().await;
        p.stop().await;
    }
}
