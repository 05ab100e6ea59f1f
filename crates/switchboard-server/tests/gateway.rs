//! The gateway topology, as processes of the real binary: a register,
//! gateways holding the clients, workers running the reference app. Some
//! tests also act as a GatewayWorker worker or pusher themselves, writing
//! commands to a gateway's inner port, with real clients as the receivers.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use bytes::BytesMut;
use serde_json::json;
use switchboard_gateway::protocol::php::{self, Array, Value};
use switchboard_gateway::protocol::query::{Id, SendToAll, SendToGroup};
use switchboard_gateway::protocol::register::RegisterMessage;
use switchboard_gateway::protocol::{Frame, cmd};
use switchboard_test::gateway::{
    GatewayCluster, GatewayProc, Inner, Listeners, RegisterProc, WorkerProc, accept_worker,
    await_worker_at_dead_register, conn_no, signal,
};
use switchboard_test::{Client, Cluster, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// One WebSocket gateway and one TCP gateway, two workers.
mod conformance_ws_and_tcp_gateways {
    use super::*;
    switchboard_test::conformance_suite!(GatewayCluster::boxed(
        BIN,
        &[Listeners::Ws, Listeners::Tcp],
        2
    ));
}

/// Two gateways with both listeners, so every check crosses gateways.
mod conformance_two_mixed_gateways {
    use super::*;
    switchboard_test::conformance_suite!(GatewayCluster::boxed(
        BIN,
        &[Listeners::Both, Listeners::Both],
        2
    ));
}

async fn role_stats(g: &GatewayProc) -> serde_json::Value {
    g.stats().await.expect("stats")["role"].clone()
}

/// Every worker is stopped and replaced, one after the other, while clients
/// on both gateways keep sending: no client is disconnected, no message is
/// lost, duplicated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_every_worker_drops_nothing() -> Result<()> {
    let mut c = GatewayCluster::start(BIN, &[Listeners::Both, Listeners::Both], 2, "").await?;
    // Four senders (two per gateway, one WebSocket and one TCP each), one receiver.
    let mut rx = Client::connect(Kind::Ws, c.gateways[1].ws.unwrap(), "sink", None).await?;
    let mut senders = Vec::new();
    for (i, g) in c.gateways.iter().enumerate() {
        senders.push(Client::connect(Kind::Ws, g.ws.unwrap(), &format!("s{i}w"), None).await?);
        senders.push(Client::connect(Kind::Tcp, g.tcp.unwrap(), &format!("s{i}t"), None).await?);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for (k, mut s) in senders.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                s.send(json!({"op": "to_user", "uid": "sink", "data": format!("{k}:{n}")}))
                    .await?;
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // The last message of this sender: the sink's fence for it.
            s.send(json!({"op": "to_user", "uid": "sink", "data": format!("{k}:end")}))
                .await?;
            // Still connected: a round trip through a worker works.
            let r = s.ask(json!({"op": "online", "uid": "sink"})).await?;
            ensure!(r["online"] == true, "sender {k} after restarts: {r}");
            anyhow::Ok((n, s))
        }));
    }
    // The senders run for a while before, between and after the
    // replacements: these pauses set how much traffic crosses them, they
    // wait for nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every worker replaced, twice over; each replacement attached to both
    // gateways before the next worker stops.
    for _round in 0..4 {
        let old = c.workers.remove(0);
        let status = old.stop().await?;
        ensure!(status.success(), "worker exited with {status}");
        c.workers
            .push(WorkerProc::start(&c.bin, c.register.addr, &[]).await?);
        c.wait_attached(2).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    let mut sent = Vec::new();
    let mut alive = Vec::new();
    for t in tasks {
        let (n, s) = t.await??;
        sent.push(n);
        alive.push(s);
    }
    let total: u64 = sent.iter().sum();
    // Each sender's messages arrive in order, so a duplicate or a late one
    // shows up before its sender's end marker, as a number out of turn; no
    // wait for silence is needed once every end marker is in.
    let mut next: HashMap<usize, u64> = HashMap::new();
    let mut ended = 0;
    while ended < sent.len() {
        let m = rx.recv().await?;
        let (k, n) = m.split_once(':').unwrap();
        let k: usize = k.parse()?;
        let want = next.entry(k).or_default();
        if n == "end" {
            ensure!(
                *want == sent[k],
                "sender {k}: end after {want} of {} messages (lost)",
                sent[k]
            );
            ended += 1;
            continue;
        }
        let n: u64 = n.parse()?;
        ensure!(
            n == *want,
            "sender {k}: got {n}, expected {want} (lost, duplicated or reordered)"
        );
        *want += 1;
    }
    for g in &c.gateways {
        let s = role_stats(g).await;
        ensure!(
            s["expired"] == 0 && s["overflowed"] == 0,
            "gateway dropped events: {s}"
        );
        let st = g.stats().await?;
        ensure!(st["conns_closed"] == 0, "a client was disconnected: {st}");
    }
    eprintln!("{total} messages through four worker replacements, none lost");
    Box::new(c).shutdown().await;
    Ok(())
}

/// Clients that speak while no worker is attached are held, not dropped,
/// and their events are delivered when a worker attaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_a_worker() -> Result<()> {
    let mut c = GatewayCluster::start(BIN, &[Listeners::Both], 1, "").await?;
    let mut a = Client::connect(Kind::Ws, c.gateways[0].ws.unwrap(), "a", None).await?;
    let w = c.workers.remove(0);
    w.stop().await?;
    // No worker: the message waits at the gateway, and reaches a (through
    // a worker) only once one attaches.
    a.send(json!({"op": "to_user", "uid": "a", "data": "held"}))
        .await?;
    c.gateways[0]
        .wait_role("holding one event", |s| s["held_now"] == 1)
        .await?;
    c.workers
        .push(WorkerProc::start(&c.bin, c.register.addr, &[]).await?);
    ensure!(a.recv().await? == "held");
    Box::new(c).shutdown().await;
    Ok(())
}

/// A killed gateway's clients are gone cluster-wide; the other gateway's
/// clients are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_takes_only_its_clients() -> Result<()> {
    let mut c = GatewayCluster::start(BIN, &[Listeners::Both, Listeners::Both], 1, "").await?;
    let mut a = Client::connect(Kind::Ws, c.gateways[0].ws.unwrap(), "ka", None).await?;
    let mut b = Client::connect(Kind::Tcp, c.gateways[0].tcp.unwrap(), "kb", None).await?;
    let _gone = Client::connect(Kind::Ws, c.gateways[1].ws.unwrap(), "kgone", None).await?;
    let r = a.ask(json!({"op": "online", "uid": "kgone"})).await?;
    ensure!(r["online"] == true, "{r}");
    signal(&mut c.gateways[1].child, "-KILL").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = a.ask(json!({"op": "online", "uid": "kgone"})).await?;
        if r["online"] == false && r.get("complete").is_none() {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "still online or incomplete: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.send(json!({"op": "to_user", "uid": "kb", "data": "still fine"}))
        .await?;
    ensure!(b.recv().await? == "still fine");
    c.gateways.pop();
    Box::new(c).shutdown().await;
    Ok(())
}

/// With the register down, existing routes keep working; a worker started
/// meanwhile joins once the register is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_restart_keeps_routes_and_lets_new_processes_join() -> Result<()> {
    let mut c = GatewayCluster::start(BIN, &[Listeners::Both, Listeners::Both], 1, "").await?;
    let mut a = Client::connect(Kind::Ws, c.gateways[0].ws.unwrap(), "ra", None).await?;
    let mut b = Client::connect(Kind::Tcp, c.gateways[1].tcp.unwrap(), "rb", None).await?;
    let addr = c.register.addr;
    signal(&mut c.register.child, "-KILL").await?;
    a.send(json!({"op": "to_user", "uid": "rb", "data": "across"}))
        .await?;
    ensure!(b.recv().await? == "across");
    c.workers.push(WorkerProc::start(&c.bin, addr, &[]).await?);
    // The new worker is up and asking a register that does not answer.
    await_worker_at_dead_register(addr).await?;
    ensure!(
        role_stats(&c.gateways[0]).await["workers"] == 1,
        "a worker joined without a register"
    );
    c.register = RegisterProc::start(&c.bin, &addr.to_string(), "").await?;
    c.wait_attached(2).await?;
    b.send(json!({"op": "to_user", "uid": "ra", "data": "back"}))
        .await?;
    ensure!(a.recv().await? == "back");
    // The first worker kept its links through the partial address lists a
    // restarted register sends: no second link replaced a live one. A third
    // gateway is the fence: the list naming it reaches each worker after
    // every earlier list, and a worker links it only after acting on those,
    // so once both workers are attached to it, any second link would have
    // been made.
    let third = GatewayProc::start(&c.bin, addr, true, false, &["--secret", &c.secret]).await?;
    third
        .wait_role("attached to both workers", |s| s["workers"] == 2)
        .await?;
    c.gateways.push(third);
    for g in &c.gateways {
        let s = role_stats(g).await;
        ensure!(s["replaced"] == 0 && s["workers"] == 2, "{s}");
    }
    Box::new(c).shutdown().await;
    Ok(())
}

/// Writes `bytes` on a new connection to `addr` and checks that the peer
/// closes it without answering a byte.
async fn refused(addr: std::net::SocketAddr, bytes: &[u8], what: &str) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(bytes).await?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(switchboard_test::STEP, s.read_to_end(&mut buf)).await;
    ensure!(
        matches!(read, Ok(Ok(0))),
        "{what}: not closed at once ({read:?}, answered {:?})",
        String::from_utf8_lossy(&buf)
    );
    Ok(())
}

fn encoded(f: &Frame) -> BytesMut {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b
}

/// Garbage on the inner port and a wrong secret are refused; clients and
/// workers carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_wrong_secrets_are_refused_without_harm() -> Result<()> {
    let c = GatewayCluster::start(BIN, &[Listeners::Both], 1, "s3cret").await?;
    let mut a = Client::connect(Kind::Ws, c.gateways[0].ws.unwrap(), "sa", None).await?;
    let inner = c.gateways[0].inner;
    // A frame claiming to be shorter than its header.
    let short = [
        0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
        23, 24,
    ];
    refused(inner, &short, "a bad frame").await?;
    // A command before authenticating, with a secret set.
    let sneaky = Frame::to_gateway(cmd::SEND_TO_ALL, 0, "", "sneaky");
    refused(inner, &encoded(&sneaky), "an unauthorized command").await?;
    // a's next frame is its own message, not "sneaky": the refused command
    // was never carried out.
    a.send(json!({"op": "to_user", "uid": "sa", "data": "fine"}))
        .await?;
    ensure!(a.recv().await? == "fine");
    // Each refused connection counted once (the gateway counts before it
    // closes, and both closes were seen).
    let s = role_stats(&c.gateways[0]).await;
    ensure!(s["rejected_inner"] == 2, "{s}");
    // A worker link with the wrong secret is refused and never attached:
    // exactly one more refusal, and still one worker.
    let hello = Frame::worker_connect("wrong:0", "wrong");
    refused(inner, &encoded(&hello), "a worker link with a wrong secret").await?;
    let s = role_stats(&c.gateways[0]).await;
    ensure!(s["rejected_inner"] == 3 && s["workers"] == 1, "{s}");
    // The register refuses such a worker too: it closes without a gateway
    // list, so a worker process with a wrong secret never learns a gateway.
    let hello = RegisterMessage::WorkerConnect {
        secret_key: "wrong".into(),
    };
    refused(
        c.register.addr,
        &hello.encode(),
        "a wrong secret at the register",
    )
    .await?;
    a.send(json!({"op": "to_user", "uid": "sa", "data": "still fine"}))
        .await?;
    ensure!(a.recv().await? == "still fine");
    Box::new(c).shutdown().await;
    Ok(())
}

/// `switchboard push` finds the gateways through the register and pushes
/// and asks from outside, with a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pusher_reaches_every_gateway() -> Result<()> {
    let c = GatewayCluster::start(BIN, &[Listeners::Both, Listeners::Both], 1, "k").await?;
    let mut a = Client::connect(Kind::Ws, c.gateways[0].ws.unwrap(), "pa", Some("pg")).await?;
    let mut b = Client::connect(Kind::Tcp, c.gateways[1].tcp.unwrap(), "pb", Some("pg")).await?;
    let reg = c.register.addr.to_string();
    let push = |args: &[&str]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["push", "--register", &reg, "--secret", "k"])
            .args(args);
        cmd
    };
    let out = push(&["to-group", "pg", "from outside"]).output()?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(a.recv().await? == "from outside" && b.recv().await? == "from outside");
    let out = push(&["online", "pb"]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["online"] == true && v["missing"] == json!([]), "{v}");
    let out = push(&["group-count", "pg"]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["count"] == 2, "{v}");
    let out = push(&["to-conn", &b.conn, "just b"]).output()?;
    ensure!(out.status.success());
    ensure!(b.recv().await? == "just b");
    // a may have b's connection number, on the other gateway: "just b" is
    // not for it. Its next frame is one pushed to it after "just b" was
    // written and delivered.
    let out = push(&["to-conn", &a.conn, "just a"]).output()?;
    ensure!(out.status.success());
    ensure!(a.recv().await? == "just a");
    Box::new(c).shutdown().await;
    Ok(())
}

/// The data each client received before its fence, in client order.
async fn fenced(inner: &mut [Inner], clients: &mut [(usize, Client)]) -> Result<Vec<Vec<String>>> {
    let mut out = Vec::new();
    for (g, c) in clients.iter_mut() {
        out.push(inner[*g].fence(c).await?);
    }
    Ok(out)
}

/// `CMD_SEND_TO_ALL` and `CMD_SEND_TO_GROUP` with exclusion lists, written
/// by the test as GatewayWorker's `Lib\Gateway` writes them: each gateway
/// gets the excluded connections it holds. Excluded clients get nothing,
/// every other addressed client gets the message exactly once, including
/// one that is in two of the groups pushed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_lists_leave_out_exactly_the_excluded_clients() -> Result<()> {
    let c = GatewayCluster::start(BIN, &[Listeners::Both, Listeners::Both], 1, "k").await?;
    let (g0, g1) = (&c.gateways[0], &c.gateways[1]);
    // (gateway index, client); a is in g1 and g2, f in no group.
    let mut cl = vec![
        (
            0,
            Client::connect(Kind::Ws, g0.ws.unwrap(), "xa", Some("g1")).await?,
        ),
        (
            0,
            Client::connect(Kind::Tcp, g0.tcp.unwrap(), "xb", Some("g1")).await?,
        ),
        (
            0,
            Client::connect(Kind::Ws, g0.ws.unwrap(), "xc", Some("g2")).await?,
        ),
        (
            1,
            Client::connect(Kind::Ws, g1.ws.unwrap(), "xd", Some("g1")).await?,
        ),
        (
            1,
            Client::connect(Kind::Tcp, g1.tcp.unwrap(), "xe", Some("g2")).await?,
        ),
        (
            1,
            Client::connect(Kind::Ws, g1.ws.unwrap(), "xf", None).await?,
        ),
    ];
    let id: Vec<u32> = cl.iter().map(|(_, c)| conn_no(c)).collect::<Result<_>>()?;
    let mut inner = vec![
        Inner::connect(g0, "k").await?,
        Inner::connect(g1, "k").await?,
    ];
    inner[0]
        .send(&Frame::to_gateway(cmd::JOIN_GROUP, id[0], "g2", ""))
        .await?;

    // Everyone but a (on gateway 0) and e (on gateway 1). Connection ids are
    // per gateway: d may have a's number, and is not excluded for it.
    for (g, excluded) in [(0, id[0]), (1, id[4])] {
        let ext = SendToAll::Exclude(vec![excluded]).encode();
        inner[g]
            .send(&Frame::to_gateway(cmd::SEND_TO_ALL, 0, ext, "all-but"))
            .await?;
    }
    // Groups g1 and g2 but b (on gateway 0) and d (on gateway 1).
    for (g, excluded) in [(0, id[1]), (1, id[3])] {
        let ext = SendToGroup {
            groups: vec![Id::from("g1"), Id::from("g2")],
            exclude: Some(vec![excluded]),
        }
        .encode();
        inner[g]
            .send(&Frame::to_gateway(cmd::SEND_TO_GROUP, 0, ext, "groups-but"))
            .await?;
    }
    let got = fenced(&mut inner, &mut cl).await?;
    let want: [&[&str]; 6] = [
        &["groups-but"],
        &["all-but"],
        &["all-but", "groups-but"],
        &["all-but"],
        &["groups-but"],
        &["all-but"],
    ];
    for (i, ((_, client), w)) in cl.iter().zip(want).enumerate() {
        ensure!(got[i] == w, "{client:?} got {:?}, expected {w:?}", got[i]);
    }
    Box::new(c).shutdown().await;
    Ok(())
}

/// `serialize()` of a PHP array of string keys and values.
fn php_array<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    Value::Array(pairs.into_iter().collect::<Array>())
}

/// Sessions as GatewayWorker keeps them: `CMD_SET_SESSION` stores the bytes
/// as they come, `CMD_UPDATE_SESSION` merges with `array_replace_recursive`
/// (nested keys kept) or, when nothing is stored (`""`, and `"0"`, which
/// PHP's `!$session` also takes for nothing), stores the update as it came;
/// `CMD_GET_SESSION_BY_CLIENT_ID` reads it back, `a:0:{}` for nothing and
/// `N;` for no such client. Checked byte for byte through the protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_set_merged_and_read_back_like_gatewayworker() -> Result<()> {
    let c = GatewayCluster::start(BIN, &[Listeners::Both], 1, "").await?;
    let a = Client::connect(Kind::Ws, c.gateways[0].ws.unwrap(), "sa", None).await?;
    let id = conn_no(&a)?;
    let mut inner = Inner::connect(&c.gateways[0], "").await?;
    let set = |s: &[u8]| Frame::to_gateway(cmd::SET_SESSION, id, s.to_vec(), "");
    let update = |s: &[u8]| Frame::to_gateway(cmd::UPDATE_SESSION, id, s.to_vec(), "");
    let get = |id| Frame::to_gateway(cmd::GET_SESSION_BY_CLIENT_ID, id, "", "");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();

    // The reference application sets no session.
    ensure!(inner.ask(&get(id)).await? == b"a:0:{}");
    ensure!(inner.ask(&get(id + 1000)).await? == b"N;");

    let stored = php::to_bytes(&php_array([
        (
            "user",
            php_array([("name", "ann".into()), ("lang", "fr".into())]),
        ),
        ("n", 1.into()),
    ]));
    inner.send(&set(&stored)).await?;
    let got = inner.ask(&get(id)).await?;
    ensure!(got == stored, "set: {}", text(&got));

    let upd = php::to_bytes(&php_array([
        (
            "user",
            php_array([("lang", "de".into()), ("tz", "UTC".into())]),
        ),
        ("m", 2.into()),
    ]));
    inner.send(&update(&upd)).await?;
    let merged = php::to_bytes(&php_array([
        (
            "user",
            php_array([
                ("name", "ann".into()),
                ("lang", "de".into()),
                ("tz", "UTC".into()),
            ]),
        ),
        ("n", 1.into()),
        ("m", 2.into()),
    ]));
    let got = inner.ask(&get(id)).await?;
    ensure!(got == merged, "update: {}", text(&got));

    // Nothing stored: the update is stored as it came, whichever of PHP's
    // two empty strings the session was.
    for nothing in [&b""[..], b"0"] {
        inner.send(&set(nothing)).await?;
        let got = inner.ask(&get(id)).await?;
        ensure!(
            got == b"a:0:{}",
            "{:?} stored reads {}",
            text(nothing),
            text(&got)
        );
        inner.send(&update(&upd)).await?;
        let got = inner.ask(&get(id)).await?;
        ensure!(
            got == upd,
            "update over {:?}: {}",
            text(nothing),
            text(&got)
        );
    }
    Box::new(c).shutdown().await;
    Ok(())
}

/// A restarting register names the gateways again one by one, so a worker
/// gets lists that leave out a gateway it is linked to, then name it again.
/// The worker keeps that link throughout and opens no second one, which the
/// gateway would take for a new worker replacing it. The test plays the
/// register, so the partial list is certain; each list it checks adds a
/// new gateway, whose attachment shows the worker has acted on that list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_address_list_keeps_live_links() -> Result<()> {
    let register = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reg = register.local_addr()?;
    let bin = std::path::Path::new(BIN);
    let mut g = Vec::new();
    for _ in 0..4 {
        g.push(GatewayProc::start(bin, reg, true, false, &[]).await?);
    }
    let mut w = WorkerProc::start(bin, reg, &[]).await?;
    let mut link = accept_worker(&register).await?;
    let mut list = async |gws: &[&GatewayProc]| {
        let addresses = gws.iter().map(|g| g.inner.to_string()).collect();
        link.write_all(&RegisterMessage::BroadcastAddresses(addresses).encode())
            .await
    };
    let attached = |s: &serde_json::Value| s["workers"] == 1;
    list(&[&g[0], &g[1]]).await?;
    g[1].wait_role("linked", attached).await?;
    // g1 left out, then named again.
    list(&[&g[0], &g[2]]).await?;
    g[2].wait_role("linked", attached).await?;
    list(&[&g[0], &g[1], &g[2], &g[3]]).await?;
    g[3].wait_role("linked", attached).await?;
    let s = role_stats(&g[1]).await;
    ensure!(s["replaced"] == 0 && s["workers"] == 1, "{s}");
    let _ = w.child.kill().await;
    for g in &mut g {
        let _ = signal(&mut g.child, "-TERM").await;
    }
    Ok(())
}

/// A worker started with --jwt-secret authenticates the gateways' clients as
/// `serve` does: no token is refused with 401 through the gateway, a valid
/// token is welcomed as its `sub`, and a request it may not make is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_jwt_secret_authenticates_the_gateways_clients() -> Result<()> {
    use switchboard::auth::{Claims, mint_hs256, now_secs};
    const SECRET: &str = "gateway-test-secret-0123456789ab";
    let mut c = GatewayCluster::start(BIN, &[Listeners::Both], 0, "").await?;
    c.workers.push(
        WorkerProc::start(
            &c.bin,
            c.register.addr,
            &["--jwt-secret", SECRET, "--can", "push:group:lobby"],
        )
        .await?,
    );
    c.wait_attached(1).await?;
    let ws = c.gateways[0].ws.unwrap();
    let (status, body) = Client::ws_refused(ws, "uid=mallory", &[]).await?;
    ensure!(status == 401, "{status} {body}");
    ensure!(body.contains("token is required"), "{body}");
    let token = |sub: &str| {
        let claims = Claims {
            sub: sub.into(),
            groups: vec!["lobby".into()],
            exp: Some(now_secs() + 600),
            ..Claims::default()
        };
        mint_hs256(&claims, SECRET)
    };
    let mut alice = Client::ws_query(ws, &format!("token={}", token("alice"))).await?;
    ensure!(alice.uid == "alice", "{alice:?}");
    let mut bob = Client::tcp_hello(
        c.gateways[0].tcp.unwrap(),
        &json!({"op": "hello", "token": token("bob")}),
    )
    .await?;
    ensure!(bob.uid == "bob", "{bob:?}");
    alice
        .send(json!({"op": "to_group", "group": "lobby", "data": "hi"}))
        .await?;
    ensure!(bob.recv().await? == "hi");
    ensure!(alice.recv().await? == "hi");
    let e = alice.ask(json!({"op": "to_all", "data": "x"})).await?;
    ensure!(
        e["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("not permitted: to_all")),
        "{e}"
    );
    Box::new(c).shutdown().await;
    Ok(())
}
