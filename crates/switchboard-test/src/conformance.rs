//! The conformance suite: the reference app's behaviour, checked over real
//! sockets, across nodes, for any [`Cluster`]. Written once; every mode runs it
//! through [`conformance_suite!`](crate::conformance_suite).
//!
//! Exactness is checked with fences: after the pushes under test, the same
//! sender sends a unique fence to each client (`to_conn`). Frames from one
//! sender reach a connection in order, so everything a client receives before
//! its fence is exactly what the pushes delivered to it: a lost, duplicated or
//! misdelivered frame fails the check.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use serde_json::json;

use crate::client::{Client, Kind};
use crate::cluster::Cluster;

static FENCES: AtomicU64 = AtomicU64::new(0);

/// Compares what a client received before its fence with what it should have.
pub fn check_delivery(who: &str, got: &[String], expected: &[&str]) -> Result<()> {
    if got.iter().map(String::as_str).eq(expected.iter().copied()) {
        return Ok(());
    }
    let mut problems = Vec::new();
    for e in expected {
        let n = got.iter().filter(|g| g == e).count();
        match n {
            0 => problems.push(format!("lost {e:?}")),
            1 => {}
            n => problems.push(format!("{e:?} delivered {n} times")),
        }
    }
    for g in got {
        if !expected.contains(&g.as_str()) {
            problems.push(format!("unexpected {g:?}"));
        }
    }
    if problems.is_empty() {
        problems.push(format!("out of order: got {got:?}, expected {expected:?}"));
    }
    bail!("{who}: {}", problems.join("; "))
}

/// Fences every client in `clients` from `sender` (index into `clients`) and
/// checks each received exactly `expected[i]`, in order, before its fence.
pub async fn settle(clients: &mut [Client], sender: usize, expected: &[&[&str]]) -> Result<()> {
    assert_eq!(clients.len(), expected.len());
    let fences: Vec<String> = (0..clients.len())
        .map(|_| format!("fence-{}", FENCES.fetch_add(1, Ordering::Relaxed)))
        .collect();
    for (i, fence) in fences.iter().enumerate() {
        let conn = clients[i].conn.clone();
        clients[sender]
            .send(json!({"op": "to_conn", "conn": conn, "data": fence}))
            .await?;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        loop {
            let f = c.recv().await?;
            if f == fences[i] {
                break;
            }
            ensure!(!f.starts_with("fence-"), "{c:?}: foreign fence {f:?}");
            got.push(f);
        }
        check_delivery(&format!("{c:?}"), &got, expected[i])?;
    }
    Ok(())
}

/// Connects `uid` to node `node` with `kind`.
async fn at(
    c: &dyn Cluster,
    node: usize,
    kind: Kind,
    uid: &str,
    group: Option<&str>,
) -> Result<Client> {
    let addr = match kind {
        Kind::Ws => c.ws(node),
        Kind::Tcp => c.tcp(node),
    };
    Client::connect(kind, addr, uid, group).await
}

/// Unique names per test run, so checks never see each other's users or groups.
fn uniq(base: &str) -> String {
    format!("{base}-{}", FENCES.fetch_add(1, Ordering::Relaxed))
}

/// The welcome is the first frame, names the node, and carries a routable id.
pub async fn welcome_first(c: &dyn Cluster) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for i in 0..4 {
        let kind = if i % 2 == 0 { Kind::Ws } else { Kind::Tcp };
        let cl = at(c, i, kind, &uniq("w"), None).await?;
        ensure!(
            cl.node == c.node_for(i, kind),
            "welcome names node {} not {}",
            cl.node,
            c.node_for(i, kind)
        );
        let id: switchboard::ConnId = cl.conn.parse()?;
        ensure!(
            id.node().as_str() == cl.node,
            "conn id {} is not on node {}",
            cl.conn,
            cl.node
        );
        ensure!(
            seen.insert(cl.conn.clone()),
            "conn id {} handed out twice",
            cl.conn
        );
    }
    Ok(())
}

/// `to_user` reaches every connection of the user, on every node, once.
pub async fn to_user_crosses_nodes(c: &dyn Cluster) -> Result<()> {
    let (a, b, x) = (uniq("a"), uniq("b"), uniq("x"));
    let mut cl = vec![
        at(c, 0, Kind::Ws, &a, None).await?,
        at(c, 1, Kind::Tcp, &b, None).await?,
        at(c, 0, Kind::Ws, &b, None).await?,
        at(c, 1, Kind::Ws, &x, None).await?,
    ];
    cl[0]
        .send(json!({"op": "to_user", "uid": b, "data": "m1"}))
        .await?;
    cl[1]
        .send(json!({"op": "to_user", "uid": a, "data": "m2"}))
        .await?;
    // m2 comes from another sender: wait for it before fencing from client 0.
    ensure!(cl[0].recv().await? == "m2", "a did not get m2");
    settle(&mut cl, 0, &[&[], &["m1"], &["m1"], &[]]).await
}

/// `to_users` reaches each listed user once, even when listed twice.
pub async fn to_users_once_each(c: &dyn Cluster) -> Result<()> {
    let (s, b, d, x) = (uniq("s"), uniq("b"), uniq("d"), uniq("x"));
    let mut cl = vec![
        at(c, 0, Kind::Tcp, &s, None).await?,
        at(c, 1, Kind::Ws, &b, None).await?,
        at(c, 2, Kind::Tcp, &d, None).await?,
        at(c, 1, Kind::Tcp, &x, None).await?,
    ];
    cl[0]
        .send(json!({"op": "to_users", "uids": [b, d, b], "data": "m"}))
        .await?;
    settle(&mut cl, 0, &[&[], &["m"], &["m"], &[]]).await
}

/// `to_group` reaches every member on every node once, and nobody else.
pub async fn to_group_reaches_members_only(c: &dyn Cluster) -> Result<()> {
    let g = uniq("g");
    let mut cl = vec![
        at(c, 0, Kind::Ws, &uniq("u"), Some(&g)).await?,
        at(c, 1, Kind::Ws, &uniq("u"), Some(&g)).await?,
        at(c, 1, Kind::Tcp, &uniq("u"), Some(&g)).await?,
        at(c, 0, Kind::Tcp, &uniq("u"), None).await?,
        at(c, 1, Kind::Ws, &uniq("u"), Some(&uniq("other"))).await?,
    ];
    cl[3]
        .send(json!({"op": "to_group", "group": g, "data": "g1"}))
        .await?;
    cl[3]
        .send(json!({"op": "to_group", "group": g, "data": "g2"}))
        .await?;
    settle(
        &mut cl,
        3,
        &[&["g1", "g2"], &["g1", "g2"], &["g1", "g2"], &[], &[]],
    )
    .await
}

/// `to_all` reaches every connection of the cluster once, the sender included.
pub async fn to_all_reaches_everyone(c: &dyn Cluster) -> Result<()> {
    let mut cl = Vec::new();
    for i in 0..6 {
        let kind = if i % 3 == 0 { Kind::Tcp } else { Kind::Ws };
        cl.push(at(c, i, kind, &uniq("u"), None).await?);
    }
    let tag = uniq("all");
    cl[1].send(json!({"op": "to_all", "data": tag})).await?;
    // Other tests run in parallel on the same cluster and may broadcast too:
    // only this test's frames count.
    for c in cl.iter_mut() {
        let mut got = 0;
        while got == 0 {
            let f = c.recv().await?;
            if f == tag {
                got += 1;
            }
        }
    }
    // Then fence: nothing of ours may arrive a second time.
    let fences: Vec<String> = (0..cl.len()).map(|_| uniq("fence")).collect();
    for (i, f) in fences.iter().enumerate() {
        let conn = cl[i].conn.clone();
        cl[1]
            .send(json!({"op": "to_conn", "conn": conn, "data": f}))
            .await?;
    }
    for (i, c) in cl.iter_mut().enumerate() {
        loop {
            let f = c.recv().await?;
            ensure!(f != tag, "{c:?} got the broadcast twice");
            if f == fences[i] {
                break;
            }
        }
    }
    Ok(())
}

/// `to_conn` reaches exactly that connection, not its user's other connections.
pub async fn to_conn_by_cluster_id(c: &dyn Cluster) -> Result<()> {
    let u = uniq("u");
    let mut cl = vec![
        at(c, 0, Kind::Ws, &uniq("s"), None).await?,
        at(c, 1, Kind::Tcp, &u, None).await?,
        at(c, 1, Kind::Ws, &u, None).await?,
        at(c, 0, Kind::Ws, &u, None).await?,
    ];
    let (t1, t3) = (cl[1].conn.clone(), cl[3].conn.clone());
    cl[0]
        .send(json!({"op": "to_conn", "conn": t1, "data": "c1"}))
        .await?;
    cl[0]
        .send(json!({"op": "to_conn", "conn": t3, "data": "c3"}))
        .await?;
    settle(&mut cl, 0, &[&[], &["c1"], &[], &["c3"]]).await?;
    let r = cl[0]
        .ask(json!({"op": "to_conn", "conn": "not-an-id", "data": "x"}))
        .await?;
    ensure!(r["op"] == "error", "bad conn id accepted: {r}");
    Ok(())
}

/// `join`/`leave` change membership cluster-wide; `group_count` sees it from any node.
pub async fn join_leave_and_count(c: &dyn Cluster) -> Result<()> {
    let g = uniq("g");
    let mut cl = vec![
        at(c, 0, Kind::Ws, &uniq("s"), None).await?,
        at(c, 1, Kind::Tcp, &uniq("m"), None).await?,
        at(c, 2, Kind::Ws, &uniq("m"), Some(&g)).await?,
    ];
    let count = |v: &serde_json::Value| v["count"].as_u64();
    let r = cl[0].ask(json!({"op": "group_count", "group": g})).await?;
    ensure!(
        count(&r) == Some(1) && r["group"] == g.as_str() && r["op"] == "group_count",
        "count 1: {r}"
    );

    cl[1].send(json!({"op": "join", "group": g})).await?;
    // The join is done when node 1 has handled it: a round trip through the same connection proves it.
    let own = cl[1].ask(json!({"op": "group_count", "group": g})).await?;
    ensure!(
        count(&own) == Some(2),
        "count after join, asked by the joiner: {own}"
    );
    let r = cl[0].ask(json!({"op": "group_count", "group": g})).await?;
    ensure!(
        count(&r) == Some(2),
        "count after join, asked from node 0: {r}"
    );
    cl[0]
        .send(json!({"op": "to_group", "group": g, "data": "j"}))
        .await?;
    settle(&mut cl, 0, &[&[], &["j"], &["j"]]).await?;

    cl[2].send(json!({"op": "leave", "group": g})).await?;
    let own = cl[2].ask(json!({"op": "group_count", "group": g})).await?;
    ensure!(count(&own) == Some(1), "count after leave: {own}");
    cl[0]
        .send(json!({"op": "to_group", "group": g, "data": "k"}))
        .await?;
    settle(&mut cl, 0, &[&[], &["k"], &[]]).await
}

/// `online` is the cluster-wide truth, and turns false when the last
/// connection of the user goes, however it goes.
pub async fn online_is_cluster_wide(c: &dyn Cluster) -> Result<()> {
    let u = uniq("u");
    let mut asker = at(c, 0, Kind::Ws, &uniq("s"), None).await?;
    let on = |v: &serde_json::Value| v["online"].as_bool();
    let r = asker.ask(json!({"op": "online", "uid": u})).await?;
    ensure!(
        on(&r) == Some(false) && r["uid"] == u.as_str() && r["op"] == "online",
        "offline first: {r}"
    );
    let t = at(c, 1, Kind::Tcp, &u, None).await?;
    let w = at(c, 2, Kind::Ws, &u, None).await?;
    let r = asker.ask(json!({"op": "online", "uid": u})).await?;
    ensure!(on(&r) == Some(true), "online with two connections: {r}");
    t.close().await;
    let r = asker.ask(json!({"op": "online", "uid": u})).await?;
    ensure!(
        on(&r) == Some(true),
        "still online with one connection left: {r}"
    );
    w.abort();
    let deadline = tokio::time::Instant::now() + crate::STEP;
    loop {
        let r = asker.ask(json!({"op": "online", "uid": u})).await?;
        if on(&r) == Some(false) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "still online after an abrupt disconnect: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Many frames from one sender to a user on another node arrive complete and in order.
pub async fn order_is_kept(c: &dyn Cluster) -> Result<()> {
    let (s, r) = (uniq("s"), uniq("r"));
    let mut cl = vec![
        at(c, 0, Kind::Tcp, &s, None).await?,
        at(c, 1, Kind::Ws, &r, None).await?,
    ];
    let expected: Vec<String> = (0..500).map(|i| format!("n{i}")).collect();
    for m in &expected {
        cl[0]
            .send(json!({"op": "to_user", "uid": r, "data": m}))
            .await?;
    }
    let exp: Vec<&str> = expected.iter().map(String::as_str).collect();
    settle(&mut cl, 0, &[&[], &exp]).await
}

/// Bad requests get one error reply each, and the connection keeps working.
pub async fn bad_input_gets_an_error(c: &dyn Cluster) -> Result<()> {
    for kind in [Kind::Ws, Kind::Tcp] {
        let peer = uniq("p");
        let mut cl = vec![
            at(c, 0, kind, &uniq("s"), None).await?,
            at(c, 1, Kind::Ws, &peer, None).await?,
        ];
        for bad in [
            "garbage",
            "{\"op\":",
            "{\"op\":\"teleport\"}",
            "{\"no_op\":1}",
            "{\"op\":\"to_user\"}",
            "{\"op\":\"to_user\",\"uid\":5,\"data\":\"x\"}",
            "[]",
        ] {
            cl[0].send_text(bad).await?;
            let r = cl[0].recv_json().await?;
            ensure!(
                r["op"] == "error" && r["reason"].is_string(),
                "{kind:?} {bad:?} -> {r}"
            );
        }
        cl[0]
            .send(json!({"op": "to_user", "uid": peer, "data": "still here"}))
            .await?;
        settle(&mut cl, 0, &[&[], &["still here"]]).await?;
    }
    Ok(())
}

/// Connections without a uid are refused with a clear error.
pub async fn identity_is_required(c: &dyn Cluster) -> Result<()> {
    let url = format!("ws://{}/ws?group=g", c.ws(0));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            ensure!(r.status() == 400, "status {}", r.status())
        }
        other => bail!(
            "a WebSocket without uid was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(c.tcp(0)).await?;
    s.write_all(b"{\"op\":\"hi\"}\n").await?;
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(crate::STEP, r.read_line(&mut line)).await??;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    ensure!(v["op"] == "error", "bad hello reply: {line}");
    line.clear();
    let n = tokio::time::timeout(crate::STEP, r.read_line(&mut line)).await??;
    ensure!(n == 0, "connection not closed after a bad hello: {line:?}");
    Ok(())
}

/// Turns the checks above into `#[tokio::test]`s for one mode. `$start` is an
/// expression evaluating to a future of `Result<Box<dyn Cluster>>`; it is
/// evaluated once per test, so every test has its own cluster. A cluster that
/// does not start, a missing service among the causes, fails the test.
#[macro_export]
macro_rules! conformance_suite {
    ($start:expr) => {
        $crate::conformance_suite!(@tests $start;
            welcome_first,
            to_user_crosses_nodes,
            to_users_once_each,
            to_group_reaches_members_only,
            to_all_reaches_everyone,
            to_conn_by_cluster_id,
            join_leave_and_count,
            online_is_cluster_wide,
            order_is_kept,
            bad_input_gets_an_error,
            identity_is_required
        );
    };
    (@tests $start:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let cluster = $start.await.expect("starting the cluster");
                let result = $crate::conformance::$name(&*cluster).await;
                cluster.shutdown().await;
                result.unwrap();
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::check_delivery;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_checker_catches_loss_duplicates_strays_and_reordering() {
        assert!(check_delivery("c", &v(&["a", "b"]), &["a", "b"]).is_ok());
        let e = check_delivery("c", &v(&["a"]), &["a", "b"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lost \"b\""), "{e}");
        let e = check_delivery("c", &v(&["a", "a"]), &["a"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 times"), "{e}");
        let e = check_delivery("c", &v(&["a", "z"]), &["a"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unexpected \"z\""), "{e}");
        let e = check_delivery("c", &v(&["b", "a"]), &["a", "b"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of order"), "{e}");
    }
}
