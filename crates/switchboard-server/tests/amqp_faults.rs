//! RabbitMQ modes under faults and at work: what each node receives in
//! routing and fanout mode, a broker restart and lost connections during
//! traffic (on a private broker, or by closing the nodes' connections on the
//! shared one) with which end counted each loss, sequence numbers skipped by
//! a sender (published by hand), a deleted queue, a node that goes deaf, a
//! killed node, a duplicate node id. Real binaries, real RabbitMQ.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use switchboard_test::cluster::Process;
use switchboard_test::faults::{self, Outcome, backplane, kill9, wait_ready, wait_unready};
use switchboard_test::services::{RabbitCtl, RabbitServer, amqp_url, unique_prefix};
use switchboard_test::{Client, STEP};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

async fn received(p: &Process) -> Vec<u64> {
    let mut r = Vec::new();
    for n in &p.nodes {
        r.push(backplane(n, "received").await.unwrap());
    }
    r
}

/// Waits until `client` gets `frame`, returning the frames before it.
async fn until(client: &mut Client, frame: &str) -> Vec<String> {
    let mut before = Vec::new();
    loop {
        let f = client.recv().await.unwrap();
        if f == frame {
            return before;
        }
        before.push(f);
    }
}

/// Three nodes: a sender on n0, users `one` and `also` on n1 and `two` on
/// n2, both n1 and n2 in group `g`. Ten rounds of pushes to a user, a group,
/// a connection, everyone and two users, then an end marker to everyone
/// (each node handles a sender's messages in order: once a node's client has
/// the marker, the node has handled everything before it). Returns the
/// envelopes each node received, the duplicates n1 dropped, the cluster, its
/// prefix and the clients (still connected).
async fn ten_rounds(mode: &str) -> (Vec<u64>, u64, Process, String, Vec<Client>) {
    let url = amqp_url().unwrap();
    let prefix = unique_prefix(mode);
    let cluster = format!("{url}?mode={mode}&prefix={prefix}");
    let p = Process::start_cluster(BIN, 3, &cluster).await.unwrap();
    let mut s = Client::tcp(p.nodes[0].tcp.unwrap(), "s", None)
        .await
        .unwrap();
    let mut one = Client::ws(p.nodes[1].ws.unwrap(), "one", Some("g"))
        .await
        .unwrap();
    let mut also = Client::tcp(p.nodes[1].tcp.unwrap(), "also", None)
        .await
        .unwrap();
    let mut two = Client::ws(p.nodes[2].ws.unwrap(), "two", Some("g"))
        .await
        .unwrap();
    let before = received(&p).await;
    let dup_before = backplane(&p.nodes[1], "duplicates").await.unwrap();
    for i in 0..10 {
        for push in [
            json!({"op":"to_user","uid":"one","data":format!("u{i}")}),
            json!({"op":"to_group","group":"g","data":format!("g{i}")}),
            json!({"op":"to_conn","conn":two.conn,"data":format!("c{i}")}),
            json!({"op":"to_all","data":format!("a{i}")}),
            json!({"op":"to_users","uids":["one","also"],"data":format!("us{i}")}),
        ] {
            s.send(push).await.unwrap();
        }
    }
    s.send(json!({"op":"to_all","data":"end"})).await.unwrap();
    let per_round = |c: &[&str]| -> Vec<String> {
        (0..10)
            .flat_map(|i| c.iter().map(move |k| format!("{k}{i}")))
            .collect()
    };
    assert_eq!(
        until(&mut one, "end").await,
        per_round(&["u", "g", "a", "us"])
    );
    assert_eq!(until(&mut also, "end").await, per_round(&["a", "us"]));
    assert_eq!(until(&mut two, "end").await, per_round(&["g", "c", "a"]));
    assert_eq!(until(&mut s, "end").await, per_round(&["a"]));
    let after = received(&p).await;
    let got: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let dups = backplane(&p.nodes[1], "duplicates").await.unwrap() - dup_before;
    eprintln!("{mode}: envelopes received per node {got:?}, duplicates dropped by n1 {dups}");
    (got, dups, p, prefix, vec![s, one, also, two])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_delivers_a_push_only_to_the_nodes_that_hold_a_recipient() {
    let (got, dups, p, prefix, _clients) = ten_rounds("routing").await;
    // n0 holds no recipient but the sender itself (its own envelopes never
    // come back to it); n1: user, group, everyone, users, end; n2: group,
    // connection, everyone, end, and never the pushes to users of n1.
    assert_eq!(got, [0, 41, 31]);
    assert_eq!(
        dups, 10,
        "to_users one+also: one copy per user key, one delivered"
    );

    // The node's queue is bound with what it holds, and the broker agrees.
    let ctl = RabbitCtl::shared().unwrap();
    let bindings = |node: &str| {
        let queue = format!("{prefix}.node.{node}");
        let mut keys: Vec<String> = ctl
            .list(
                "list_bindings",
                &["destination_name", "routing_key"],
                &queue,
            )
            .unwrap()
            .iter()
            .filter_map(|l| l.split('\t').nth(1).map(str::to_owned))
            .filter(|k| !k.is_empty() && k != &queue)
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(bindings("n1"), ["b", "g.g", "n.n1", "u.also", "u.one"]);
    assert_eq!(bindings("n2"), ["b", "g.g", "n.n2", "u.two"]);
    // The last member of g on n1 leaves: unbound before the leave returns.
    let mut one = Client::ws(p.nodes[1].ws.unwrap(), "one-b", None)
        .await
        .unwrap();
    one.send(json!({"op":"join","group":"h"})).await.unwrap();
    let r = one
        .ask(json!({"op":"group_count","group":"h"}))
        .await
        .unwrap();
    assert_eq!(r["count"], 1);
    assert!(bindings("n1").contains(&"g.h".to_owned()));
    one.send(json!({"op":"leave","group":"h"})).await.unwrap();
    let r = one
        .ask(json!({"op":"group_count","group":"h"}))
        .await
        .unwrap();
    assert_eq!(r["count"], 0);
    assert!(!bindings("n1").contains(&"g.h".to_owned()));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_push_to_every_node() {
    let (got, dups, p, _, _clients) = ten_rounds("fanout").await;
    // Every node but the sender's gets every push (the one to a connection
    // is dropped unread by the node it does not name).
    assert_eq!(got, [0, 41, 51]);
    assert_eq!(dups, 0, "fanout sends one message per push");
    p.stop().await;
}

/// Who counted the losses across a fault. A sender numbers every push on its
/// stream before it publishes it, even while the broker is unreachable, so
/// the receiver, which gets the later pushes of that stream, counts every one
/// it missed: `receive_dropped` is exactly the pushes lost, whatever the
/// sender also counted (a loss may be counted at both ends). The sender
/// counts what it saw fail, which is never more than it sent. Returns the
/// counts of the sender and of the receiver.
async fn assert_losses_counted(what: &str, out: &Outcome, p: &Process) -> (u64, u64) {
    assert!(
        out.in_order_without_duplicates(),
        "{what}: duplicated or reordered"
    );
    let lost = out.lost();
    let dropped = backplane(&p.nodes[0], "publish_dropped").await.unwrap();
    let gaps = backplane(&p.nodes[1], "receive_dropped").await.unwrap();
    let reconnects: Vec<u64> = {
        let mut r = Vec::new();
        for n in &p.nodes {
            r.push(backplane(n, "reconnects").await.unwrap());
        }
        r
    };
    eprintln!(
        "{what}: delivery resumed {:?} after the fault; sent {}, received {}, lost {lost}; counted: {dropped} by the sender (publish_dropped), {gaps} by the receiver (receive_dropped); reconnects {reconnects:?}",
        out.recovery,
        out.sent,
        out.got.len(),
    );
    assert!(
        reconnects.iter().all(|r| *r >= 1),
        "{what}: reconnects {reconnects:?}"
    );
    assert_eq!(
        gaps, lost,
        "{what}: the receiver counted {gaps} missing of {lost} lost"
    );
    assert!(
        dropped <= out.sent,
        "{what}: the sender counted {dropped} dropped of {} sent",
        out.sent
    );
    (dropped, gaps)
}

/// Restarts a private broker in the middle of traffic between two nodes. The
/// broker stays down until the sender has counted a push it could not
/// publish: that loss is certain, and both ends must see it.
async fn broker_restart(mode: &str) {
    let mut rabbit = RabbitServer::start().unwrap();
    let cluster = format!(
        "{}?mode={mode}&prefix={}&ttl=3",
        rabbit.url(),
        unique_prefix("restart")
    );
    let (p, sender, receiver) = faults::two_nodes(BIN, &cluster, "sender", "receiver")
        .await
        .unwrap();
    let mut down = Duration::ZERO;
    let mut unready = String::new();
    let fault = async {
        let t = Instant::now();
        rabbit.kill();
        // Not ready while the broker is gone.
        unready = wait_unready(&p.nodes[1], Duration::from_secs(10)).await?;
        faults::wait_backplane(&p.nodes[0], "publish_dropped", |d| d > 0, STEP).await?;
        tokio::task::block_in_place(|| rabbit.start_again())?;
        down = t.elapsed();
        anyhow::Ok(())
    };
    let out = faults::across_fault(
        sender,
        receiver,
        fault,
        Duration::from_secs(20),
        &[&p.nodes[0], &p.nodes[1]],
    )
    .await
    .unwrap();
    assert!(unready.contains("amqp"), "{unready}");
    eprintln!(
        "{mode}: broker down for {down:?} (kill, restart, until it accepts connections); /ready said {:?}",
        unready.trim()
    );
    let (dropped, gaps) = assert_losses_counted(&format!("{mode} broker restart"), &out, &p).await;
    // Only the sender knows a publish failed; the receiver knows the numbers
    // it never got.
    assert!(dropped >= 1, "{mode}: the sender counted no failed publish");
    assert!(gaps >= 1, "{mode}: the receiver counted no gap");
    // Nodes found each other again: answers are right.
    let mut asker = Client::tcp(p.nodes[0].tcp.unwrap(), "asker", None)
        .await
        .unwrap();
    faults::ask_until(
        &mut asker,
        json!({"op":"online","uid":"receiver"}),
        |r| r["online"] == true,
        STEP,
    )
    .await
    .unwrap();
    p.stop().await;
    drop(rabbit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_resumes_after_a_broker_restart_and_counts_losses() {
    broker_restart("routing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_resumes_after_a_broker_restart_and_counts_losses() {
    broker_restart("fanout").await;
}

/// A receiver counts the numbers a sender skipped, exactly, though no sender
/// saw anything fail: a sender unknown to the broker ("forger", published
/// here by hand onto the deployment's exchange) sends an envelope numbered 1,
/// then a bundle numbered 5 and 6. The receiver delivers all three and counts
/// 2, 3 and 4 as lost.
async fn skipped_numbers_are_counted_by_the_receiver(mode: &str) {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;

    const EPOCH: u64 = 7;
    let url = amqp_url().unwrap();
    let prefix = unique_prefix("skip");
    let cluster = format!("{url}?mode={mode}&prefix={prefix}");
    let (p, mut s, mut r) = faults::two_nodes(BIN, &cluster, "s", "r").await.unwrap();
    // A real push first: user r's key is bound (routing), and the real
    // sender's stream starts without a gap.
    s.send(json!({"op":"to_user","uid":"r","data":"real"}))
        .await
        .unwrap();
    assert_eq!(r.recv().await.unwrap(), "real");

    let env = |id, text| faults::push_envelope("forger", id, "r", text).unwrap();
    // An envelope message (kind 2): epoch, number, copy marker (0: the only
    // copy), the envelope.
    let mut one = vec![2];
    one.extend_from_slice(&EPOCH.to_be_bytes());
    one.extend_from_slice(&1u64.to_be_bytes());
    one.push(0);
    one.extend_from_slice(&env(1, "f1"));
    let bundle = faults::sequenced_bundle(EPOCH, 5, &[env(2, "f5"), env(3, "f6")]);
    let conn = lapin::Connection::connect_uri(url.parse().unwrap(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // Fanout: one stream to every node; routing: user r's key.
    let key = if mode == "fanout" { "" } else { "u.r" };
    for body in [one, bundle] {
        ch.basic_publish(
            format!("{prefix}.{mode}").into(),
            key.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    for f in ["f1", "f5", "f6"] {
        assert_eq!(r.recv().await.unwrap(), f);
    }
    let n1 = &p.nodes[1];
    assert_eq!(
        backplane(n1, "receive_dropped").await.unwrap(),
        3,
        "{mode}: numbers 2 to 4 never arrived"
    );
    assert_eq!(backplane(n1, "duplicates").await.unwrap(), 0, "{mode}");
    assert_eq!(
        backplane(&p.nodes[0], "publish_dropped").await.unwrap(),
        0,
        "{mode}: the real sender lost nothing"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_receiver_counts_the_numbers_a_sender_skipped() {
    skipped_numbers_are_counted_by_the_receiver("fanout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_receiver_counts_the_numbers_a_sender_skipped() {
    skipped_numbers_are_counted_by_the_receiver("routing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connections_are_replaced_and_bindings_restored() {
    let url = amqp_url().unwrap();
    let ctl = RabbitCtl::shared().unwrap();
    let prefix = unique_prefix("conn");
    let cluster = format!("{url}?mode=routing&prefix={prefix}&ttl=3");
    let (p, sender, receiver) = faults::two_nodes(BIN, &cluster, "sender", "receiver")
        .await
        .unwrap();
    let fault = async {
        // Every broker connection of both nodes, at once.
        let closed = tokio::task::block_in_place(|| {
            ctl.close_connections(&format!("switchboard {prefix} "))
        })?;
        anyhow::ensure!(closed == 2, "closed {closed} connections");
        anyhow::Ok(())
    };
    let out = faults::across_fault(
        sender,
        receiver,
        fault,
        Duration::from_secs(10),
        &[&p.nodes[0], &p.nodes[1]],
    )
    .await
    .unwrap();
    assert_losses_counted("connections closed", &out, &p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_cancels_the_consumer_and_is_declared_again() {
    let url = amqp_url().unwrap();
    let ctl = RabbitCtl::shared().unwrap();
    let prefix = unique_prefix("cancel");
    let cluster = format!("{url}?mode=routing&prefix={prefix}");
    let (p, mut a, mut b) = faults::two_nodes(BIN, &cluster, "a", "b").await.unwrap();
    ctl.run(&["delete_queue", &format!("{prefix}.node.n1")])
        .unwrap();
    let (resumed, _) = faults::push_until_delivered(&mut a, &mut b, Duration::from_secs(10))
        .await
        .unwrap();
    eprintln!("deleted queue: deliveries resumed after {resumed:?}");
    assert!(backplane(&p.nodes[1], "reconnects").await.unwrap() >= 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_hearing_its_queue_reconnects() {
    let url = amqp_url().unwrap();
    let ctl = RabbitCtl::shared().unwrap();
    let prefix = unique_prefix("deaf");
    let cluster = format!("{url}?mode=routing&prefix={prefix}&ttl=1.5");
    let (p, mut a, mut b) = faults::two_nodes(BIN, &cluster, "a", "b").await.unwrap();
    // The broker keeps the connection, channel and consumer of n1 but
    // refuses every message for its queue: connected, and deaf.
    let policy = format!("{prefix}-deafen");
    let pattern = format!("^{}\\.node\\.n1$", prefix.replace('.', "\\."));
    ctl.run(&[
        "set_policy",
        "--apply-to",
        "queues",
        &policy,
        &pattern,
        "{\"max-length\":0}",
    ])
    .unwrap();
    let t = Instant::now();
    while backplane(&p.nodes[1], "reconnects").await.unwrap() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "deaf node never noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let noticed = t.elapsed();
    // The sender counted what the broker refused.
    a.send(json!({"op":"to_user","uid":"b","data":"refused"}))
        .await
        .unwrap();
    let t2 = Instant::now();
    while backplane(&p.nodes[0], "publish_dropped").await.unwrap() == 0 {
        assert!(t2.elapsed() < Duration::from_secs(5), "refusal not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctl.run(&["clear_policy", &policy]).unwrap();
    let (again, first) = faults::push_until_delivered(&mut a, &mut b, Duration::from_secs(10))
        .await
        .unwrap();
    assert_ne!(first, "refused", "a refused push was delivered");
    eprintln!(
        "deaf node: noticed and reconnected {noticed:?} after its queue stopped delivering (ttl 1.5 s); delivering again {again:?} after the broker accepted messages again"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_no_queue_binding_or_answer_behind() {
    let url = amqp_url().unwrap();
    let ctl = RabbitCtl::shared().unwrap();
    let prefix = unique_prefix("kill");
    let cluster = format!("{url}?mode=routing&prefix={prefix}&ttl=5");
    let p = Process::start_cluster(BIN, 2, &cluster).await.unwrap();
    let mut asker = Client::ws(p.nodes[0].ws.unwrap(), "asker", None)
        .await
        .unwrap();
    let _victim = Client::ws(p.nodes[1].ws.unwrap(), "victim", Some("vg"))
        .await
        .unwrap();
    let queue = format!("{prefix}.node.n1");
    let queues = || ctl.list("list_queues", &["name"], &queue).unwrap();
    let bindings = || {
        ctl.list(
            "list_bindings",
            &["destination_name", "routing_key"],
            &queue,
        )
        .unwrap()
    };
    assert_eq!(queues().len(), 1);
    assert_eq!(bindings().len(), 5, "default, b, n.n1, u.victim, g.vg");
    let r = asker
        .ask(json!({"op":"group_count","group":"vg"}))
        .await
        .unwrap();
    assert_eq!(r["count"], 1);

    kill9(&p.nodes[1]).unwrap();
    let killed = Instant::now();
    // The exclusive queue and its bindings go with the connection.
    let gone = loop {
        if queues().is_empty() && bindings().is_empty() {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "queue or bindings left: {:?} {:?}",
            queues(),
            bindings()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // After the TTL, answers are complete again, without the dead node.
    faults::ask_until(
        &mut asker,
        json!({"op":"online","uid":"victim"}),
        |r| r["online"] == false && r.get("complete").is_none(),
        Duration::from_secs(5 + 3),
    )
    .await
    .unwrap();
    let complete = killed.elapsed();
    eprintln!(
        "killed node: queue and bindings gone {gone:?} after SIGKILL (as seen by rabbitmqctl); answers complete without it {complete:?} after (ttl 5 s)"
    );
    // When the last node leaves, the exchange goes too.
    let exchange = format!("{prefix}.routing");
    p.stop().await;
    let t = Instant::now();
    while !ctl
        .list("list_exchanges", &["name"], &exchange)
        .unwrap()
        .is_empty()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "exchange left behind"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_id_is_refused() {
    let url = amqp_url().unwrap();
    let cluster = format!("{url}?mode=fanout&prefix={}", unique_prefix("dup"));
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
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");
    wait_ready(&p.nodes[0], Duration::from_secs(5))
        .await
        .unwrap();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_the_start_with_a_clear_error() {
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--ws", "127.0.0.1:0", "--tcp", "off"])
        .args(["--cluster", "amqp://guest:guest@127.0.0.1:1/%2f"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the cluster backplane"), "{err}");
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--cluster", "amqp://h?mode=topic"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value \"topic\" for amqp option mode"),
        "{err}"
    );
}

/// Envelopes in a message on the wire: a bundle (kind 3) holds several, an
/// envelope message (kind 2) one, a control message (kind 1) none.
fn envelopes_in(body: &[u8]) -> u64 {
    match body.first() {
        Some(2) => 1,
        Some(3) => {
            let (mut at, mut n) = (17, 0);
            while at + 4 <= body.len() {
                let len = u32::from_be_bytes(body[at..at + 4].try_into().unwrap()) as usize;
                at += 4 + len;
                n += 1;
            }
            assert_eq!(at, body.len(), "a bundle cut short");
            n
        }
        _ => 0,
    }
}

/// A burst travels in bundles: 500 pushes from one node to a user on another
/// cost the broker a few messages, not 500, and arrive whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_sends_a_burst_in_few_messages() {
    use futures_util::StreamExt;
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let url = amqp_url().unwrap();
    let prefix = unique_prefix("bundle");
    let cluster = format!("{url}?mode=fanout&prefix={prefix}");
    let p = Process::start_cluster(BIN, 2, &cluster).await.unwrap();
    let mut s = Client::tcp(p.nodes[0].tcp.unwrap(), "s", None)
        .await
        .unwrap();
    let mut r = Client::ws(p.nodes[1].ws.unwrap(), "r", None).await.unwrap();

    // A queue of our own on the cluster's exchange sees every message.
    let conn = lapin::Connection::connect_uri(url.parse().unwrap(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let spy = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        spy.name().clone(),
        format!("{prefix}.fanout").into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            spy.name().clone(),
            "spy".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();

    // One write: the sending node reads the whole burst at once.
    let burst: String = (0..500)
        .map(|i| {
            format!(
                "{}\n",
                json!({"op":"to_user","uid":"r","data":format!("b{i}")})
            )
        })
        .collect();
    s.send_raw(burst.as_bytes()).await.unwrap();
    for i in 0..500 {
        assert_eq!(r.recv().await.unwrap(), format!("b{i}"));
    }
    let (mut messages, mut envelopes) = (0u64, 0u64);
    while envelopes < 500 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the spy saw fewer than 500 envelopes")
            .unwrap()
            .unwrap();
        let n = envelopes_in(&d.data);
        if n > 0 {
            messages += 1;
            envelopes += n;
        }
    }
    eprintln!("fanout burst: 500 pushes in {messages} messages");
    assert_eq!(envelopes, 500);
    assert!(messages <= 250, "500 pushes took {messages} messages");
    assert_eq!(backplane(&p.nodes[1], "receive_dropped").await.unwrap(), 0);
    p.stop().await;
}
