//! The Hub API across two sides of a cluster, written once for every mode:
//! a hub on side `b` binds, joins, leaves, unbinds, reads and writes
//! sessions, asks, closes and pushes with exclusions, about connections of
//! side `a`, and the checks look where the clients see it, down to the order
//! pushes and closes arrive in. Every mode runs the checks through
//! [`hub_api_suite!`](crate::hub_api_suite), each check on a cluster of its
//! own.
//!
//! Where modes legitimately differ, a check branches on the mode's declared
//! [`Traits`], it never skips: in local mode both sides are the one node, so
//! every operation takes the local path and a close is done on the spot; a
//! backplane that knows its peers refuses an operation for a node outside the
//! cluster at once, where another can only wait for the query timeout.
//!
//! Exactness is checked with fences pushed by the acting hub, once what a
//! client should get has arrived: see [`delivered`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use switchboard::core::backplane::{Handoff, JoinContext, NoLocalState};
use switchboard::core::memory::MemoryBackplane;
use switchboard::core::{Backplane, MemoryBus, Session};
use switchboard::{CloseReport, ConnId, Hub, NodeId, OpError, Target};
use switchboard_gateway::Worker;
use switchboard_server::node::{self, AppSpec, Running};
use tokio::sync::{mpsc, watch};

use crate::client::{Client, Event, Kind};
use crate::cluster::{InProcess, Mode, test_config};
use crate::conformance::{check_delivery, settle};
use crate::gateway::{GatewayCluster, Listeners};
use crate::{Cluster, STEP};

/// One side of the cluster: `A` holds the connections acted on, `B` the
/// acting hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// How an operation on a connection of a node outside the cluster fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownNode {
    /// At once: the backplane knows its peers and has nowhere to send it.
    Unreachable,
    /// After the query timeout: the backplane cannot tell nobody listens.
    Timeout,
}

/// What a mode declares where modes legitimately differ.
#[derive(Debug, Clone, Copy)]
pub struct Traits {
    /// Both sides are one node: operations take the local path, and a close
    /// is carried out by the acting hub itself, nothing handed to a cluster.
    pub one_node: bool,
    /// How an operation for a node outside the cluster fails.
    pub unknown_node: UnknownNode,
}

/// A running cluster seen as two sides, with a hub on each.
#[async_trait]
pub trait Sides: Send + Sync {
    /// Where a `kind` client of `side` connects.
    fn addr(&self, side: Side, kind: Kind) -> SocketAddr;
    /// The hub that acts: side `b`'s.
    fn actor(&self) -> &Hub;
    /// A hub on side `a`'s side, to read back what the actor changed.
    fn near(&self) -> &Hub;
    /// How the mode differs.
    fn traits(&self) -> Traits;
    /// Stops everything.
    async fn shutdown(self: Box<Self>);
}

/// The listener of `kind`, of a node or gateway that serves both.
fn by_kind(kind: Kind, ws: Option<SocketAddr>, tcp: Option<SocketAddr>) -> SocketAddr {
    match kind {
        Kind::Ws => ws,
        Kind::Tcp => tcp,
    }
    .expect("both listeners are served")
}

/// Reference-app nodes in this process: side `a` is the first, side `b` the
/// last (the same one in local mode).
#[derive(Debug)]
pub struct NodeSides {
    cluster: InProcess,
    traits: Traits,
}

impl NodeSides {
    fn boxed(cluster: InProcess, unknown_node: UnknownNode) -> Box<dyn Sides> {
        let traits = Traits {
            one_node: cluster.nodes.len() == 1,
            unknown_node,
        };
        Box::new(Self { cluster, traits })
    }

    /// One standalone node: both sides are that node.
    pub async fn local() -> Result<Box<dyn Sides>> {
        let c = InProcess::start(Mode::Local).await?;
        Ok(Self::boxed(c, UnknownNode::Unreachable))
    }

    /// Two nodes on the in-memory bus.
    pub async fn memory() -> Result<Box<dyn Sides>> {
        let c = InProcess::start(Mode::Memory(2)).await?;
        Ok(Self::boxed(c, UnknownNode::Unreachable))
    }

    /// Two nodes on the shared Redis in `mode`; an error if Redis is missing.
    pub async fn redis(mode: &str) -> Result<Box<dyn Sides>> {
        Self::on_broker(&crate::services::redis_url()?, mode).await
    }

    /// Two nodes on the shared RabbitMQ in `mode`; an error if RabbitMQ is
    /// missing.
    pub async fn amqp(mode: &str) -> Result<Box<dyn Sides>> {
        Self::on_broker(&crate::services::amqp_url()?, mode).await
    }

    /// Two nodes on the shared NATS in `mode`; an error if NATS is missing.
    pub async fn nats(mode: &str) -> Result<Box<dyn Sides>> {
        Self::on_broker(&crate::services::nats_url()?, mode).await
    }

    async fn on_broker(url: &str, mode: &str) -> Result<Box<dyn Sides>> {
        let c = InProcess::on_broker(url, mode, 2).await?;
        // The broker takes a request for a node nobody knows: only the
        // timeout tells that no answer will come.
        Ok(Self::boxed(c, UnknownNode::Timeout))
    }

    fn node(&self, side: Side) -> &Running {
        match side {
            Side::A => &self.cluster.nodes[0],
            Side::B => &self.cluster.nodes[self.cluster.nodes.len() - 1],
        }
    }
}

#[async_trait]
impl Sides for NodeSides {
    fn addr(&self, side: Side, kind: Kind) -> SocketAddr {
        let n = self.node(side);
        by_kind(kind, n.ws, n.tcp)
    }
    fn actor(&self) -> &Hub {
        &self.node(Side::B).hub
    }
    fn near(&self) -> &Hub {
        &self.node(Side::A).hub
    }
    fn traits(&self) -> Traits {
        self.traits
    }
    async fn shutdown(self: Box<Self>) {
        Box::new(self.cluster).shutdown().await;
    }
}

/// The gateway topology: a register and two gateways as processes of the
/// real binary, two workers in this process. Clients of side `a` are on the
/// first gateway, of side `b` on the second; the second worker's hub acts,
/// the first's reads back. No hub holds a client: every operation crosses to
/// a gateway as GatewayWorker commands.
#[derive(Debug)]
pub struct GatewaySides {
    cluster: GatewayCluster,
    workers: Vec<Worker>,
}

impl GatewaySides {
    /// Starts the topology with `bin` as the register's and gateways' binary.
    pub async fn start(bin: &str) -> Result<Box<dyn Sides>> {
        let (cluster, workers) = GatewayCluster::start_with_workers_here(
            bin,
            &[Listeners::Both, Listeners::Both],
            2,
            "",
        )
        .await?;
        Ok(Box::new(Self { cluster, workers }))
    }

    fn gateway(&self, side: Side) -> &crate::gateway::GatewayProc {
        &self.cluster.gateways[usize::from(side == Side::B)]
    }
}

#[async_trait]
impl Sides for GatewaySides {
    fn addr(&self, side: Side, kind: Kind) -> SocketAddr {
        let g = self.gateway(side);
        by_kind(kind, g.ws, g.tcp)
    }
    fn actor(&self) -> &Hub {
        self.workers[1].hub()
    }
    fn near(&self) -> &Hub {
        self.workers[0].hub()
    }
    fn traits(&self) -> Traits {
        Traits {
            one_node: false,
            // A worker knows the gateways from the register.
            unknown_node: UnknownNode::Unreachable,
        }
    }
    async fn shutdown(self: Box<Self>) {
        for w in &self.workers {
            w.shutdown().await;
        }
        Box::new(self.cluster).shutdown().await;
    }
}

static FENCES: AtomicU64 = AtomicU64::new(0);

/// Checks that each of `clients` received exactly `expected[i]`, in order,
/// from `hub`'s pushes.
///
/// The expected frames are awaited before any fence is pushed, so that a
/// check built on this one fails on what was delivered, not on its order
/// ([`pushes_arrive_in_the_order_made`] checks that). Once every expected
/// frame has arrived, the fences follow everything the pushes put on the
/// way, on every side that holds an expected recipient; a client that should
/// get nothing must therefore share its side with one that gets something,
/// for the fence to prove its silence.
pub async fn delivered(hub: &Hub, clients: &mut [Client], expected: &[&[&str]]) -> Result<()> {
    assert_eq!(clients.len(), expected.len());
    let mut got: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    for (i, c) in clients.iter_mut().enumerate() {
        while got[i].len() < expected[i].len() {
            got[i].push(c.recv().await?);
        }
    }
    let fences: Vec<String> = (0..clients.len())
        .map(|_| format!("fence-{}", FENCES.fetch_add(1, Ordering::Relaxed)))
        .collect();
    for (c, fence) in clients.iter().zip(&fences) {
        hub.to_conn(&conn_of(c), fence.clone())?;
    }
    for (i, c) in clients.iter_mut().enumerate() {
        loop {
            let f = c.recv().await?;
            if f == fences[i] {
                break;
            }
            got[i].push(f);
        }
        check_delivery(&format!("{c:?}"), &got[i], expected[i])?;
    }
    Ok(())
}

/// The connection id a client was welcomed with.
pub fn conn_of(c: &Client) -> ConnId {
    c.conn.parse().expect("the welcome names a connection id")
}

async fn at(
    s: &dyn Sides,
    side: Side,
    kind: Kind,
    uid: &str,
    group: Option<&str>,
) -> Result<Client> {
    Client::connect(kind, s.addr(side, kind), uid, group).await
}

fn session(pairs: &[(&str, &str)]) -> Session {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Membership changed from side `b` is what every query and push sees.
pub async fn membership_from_the_other_side(s: &dyn Sides) -> Result<()> {
    let on_a = at(s, Side::A, Kind::Ws, "alice", None).await?;
    let sender = at(s, Side::B, Kind::Tcp, "sender", None).await?;
    let conn = conn_of(&on_a);
    let hub = s.actor();

    hub.join(&conn, "room").await?;
    assert_eq!(hub.group_count("room").await.value, 1);
    assert_eq!(hub.group_members("room").await.value, vec![conn.clone()]);
    hub.bind(&conn, "alice2").await?;
    assert!(
        !hub.is_online("alice").await.value,
        "re-binding moves the connection"
    );
    assert!(hub.is_online("alice2").await.value);
    assert_eq!(
        hub.conn_user(&conn)
            .await
            .value
            .as_ref()
            .map(|u| u.as_str()),
        Some("alice2")
    );
    assert_eq!(hub.user_conns("alice2").await.value, vec![conn.clone()]);
    let t = hub.totals().await;
    assert!(t.is_complete());
    assert_eq!((t.value.conns, t.value.users, t.value.groups), (2, 2, 1));

    // Pushes by the new identity reach it; by the old one do not.
    let mut cl = vec![sender, on_a];
    for (op, key, to, data) in [
        ("to_user", "uid", "alice", "old"),
        ("to_user", "uid", "alice2", "new"),
        ("to_group", "group", "room", "room"),
    ] {
        cl[0]
            .send(serde_json::json!({"op": op, key: to, "data": data}))
            .await?;
    }
    settle(&mut cl, 0, &[&[], &["new", "room"]]).await?;

    hub.leave(&conn, "room").await?;
    hub.unbind(&conn).await?;
    assert_eq!(hub.group_count("room").await.value, 0);
    assert!(!hub.is_online("alice2").await.value);
    assert_eq!(hub.conn_user(&conn).await.value, None);
    cl[0]
        .send(serde_json::json!({"op": "to_group", "group": "room", "data": "left"}))
        .await?;
    cl[0]
        .send(serde_json::json!({"op": "to_user", "uid": "alice2", "data": "unbound"}))
        .await?;
    settle(&mut cl, 0, &[&[], &[]]).await
}

/// A bind or a join from side `b` returns once pushes to the new user or
/// group reach the connection: a push right after it is never lost.
pub async fn bind_and_join_take_effect_before_they_return(s: &dyn Sides) -> Result<()> {
    let mut on_a = vec![at(s, Side::A, Kind::Ws, "first", None).await?];
    let conn = conn_of(&on_a[0]);
    let hub = s.actor();
    for i in 0..30 {
        hub.bind(&conn, format!("user{i}")).await?;
        hub.to_user(format!("user{i}"), format!("u{i}"))?;
        hub.join(&conn, format!("room{i}")).await?;
        hub.to_group(format!("room{i}"), format!("g{i}"))?;
        delivered(hub, &mut on_a, &[&[&format!("u{i}"), &format!("g{i}")]]).await?;
        hub.leave(&conn, format!("room{i}")).await?;
    }
    // What it left behind no longer reaches it.
    hub.to_user("user0", "stale user")?;
    hub.to_group("room29", "stale group")?;
    delivered(hub, &mut on_a, &[&[]]).await
}

/// Sessions written from side `b` are read back from either side, key by
/// key, and touch no other connection.
pub async fn sessions_from_the_other_side(s: &dyn Sides) -> Result<()> {
    let x = at(s, Side::A, Kind::Ws, "x", None).await?;
    let y = at(s, Side::A, Kind::Tcp, "y", None).await?;
    let (cx, cy) = (conn_of(&x), conn_of(&y));
    let (hub, near) = (s.actor(), s.near());

    assert_eq!(hub.session(&cx).await?, Session::new());
    hub.set_session(&cx, "lang", Some("fr".into())).await?;
    hub.update_session(
        &cx,
        vec![
            ("a".into(), Some("1".into())),
            ("b".into(), Some("2".into())),
        ],
    )
    .await?;
    hub.set_session(&cx, "a", None).await?;
    let expected = session(&[("b", "2"), ("lang", "fr")]);
    assert_eq!(near.session(&cx).await?, expected, "read on a's side");
    assert_eq!(hub.session(&cx).await?, expected, "read on b's side");

    // A change from a's side is seen from b's.
    near.set_session(&cx, "lang", Some("de".into())).await?;
    assert_eq!(
        hub.session(&cx).await?,
        session(&[("b", "2"), ("lang", "de")])
    );

    // One update both removes and sets.
    hub.update_session(
        &cx,
        vec![("b".into(), None), ("c".into(), Some("3".into()))],
    )
    .await?;
    assert_eq!(
        near.session(&cx).await?,
        session(&[("c", "3"), ("lang", "de")])
    );

    hub.replace_session(&cx, session(&[("z", "26")])).await?;
    assert_eq!(near.session(&cx).await?, session(&[("z", "26")]));
    assert_eq!(hub.session(&cy).await?, Session::new(), "y untouched");
    hub.set_session(&cy, "only", Some("y".into())).await?;
    assert_eq!(near.session(&cx).await?, session(&[("z", "26")]));
    assert_eq!(near.session(&cy).await?, session(&[("only", "y")]));
    Ok(())
}

/// Operations on a connection that does not exist fail as such; on a node
/// outside the cluster, as the mode declares.
pub async fn operations_on_unknown_connections(s: &dyn Sides) -> Result<()> {
    let on_a = at(s, Side::A, Kind::Ws, "alice", None).await?;
    let conn = conn_of(&on_a);
    let hub = s.actor();

    let gone = ConnId::new(conn.node().clone(), conn.seq() + 1000);
    let no_such = Err(OpError::NoSuchConn(gone.clone()));
    assert_eq!(hub.join(&gone, "x").await, no_such);
    assert_eq!(hub.leave(&gone, "x").await, no_such);
    assert_eq!(hub.bind(&gone, "x").await, no_such);
    assert_eq!(hub.unbind(&gone).await, no_such);
    assert_eq!(hub.set_session(&gone, "k", Some("v".into())).await, no_such);
    assert_eq!(
        hub.session(&gone).await,
        Err(OpError::NoSuchConn(gone.clone()))
    );
    let ex = hub.conn_exists(&gone).await;
    assert!(!ex.value && ex.is_complete(), "{ex:?}");
    let ex = hub.conn_exists(&conn).await;
    assert!(ex.value && ex.is_complete(), "{ex:?}");
    let user = hub.conn_user(&gone).await;
    assert!(user.value.is_none() && user.is_complete(), "{user:?}");

    let nowhere = NodeId::new("nowhere")?;
    let far = ConnId::new(nowhere.clone(), 1);
    let refused = match s.traits().unknown_node {
        UnknownNode::Unreachable => OpError::Unreachable(nowhere),
        UnknownNode::Timeout => OpError::Timeout(nowhere),
    };
    assert_eq!(hub.session(&far).await, Err(refused.clone()));
    assert_eq!(hub.join(&far, "x").await, Err(refused));
    // A node outside the cluster holds no connection: that is a complete answer.
    let ex = hub.conn_exists(&far).await;
    assert!(!ex.value && ex.is_complete(), "{ex:?}");
    Ok(())
}

/// What a close from side `b` hands over: in local mode it is all done on
/// the spot, otherwise the cluster carries it and nothing is dropped.
fn handed_over(s: &dyn Sides, r: &CloseReport, closed: u32) -> Result<()> {
    if s.traits().one_node {
        ensure!(r.local == closed && r.remote == Handoff::default(), "{r:?}");
    } else {
        ensure!(
            r.local == 0 && r.remote.sent >= 1 && r.remote.dropped == 0,
            "{r:?}"
        );
    }
    Ok(())
}

/// Closing a connection, a user, a group minus a connection, or everyone
/// minus a user, from side `b`: exactly those clients see the close (code
/// 1000 on WebSocket, end of stream on TCP); the others keep working.
pub async fn closes_from_the_other_side(s: &dyn Sides) -> Result<()> {
    let hub = s.actor();
    let mut x = at(s, Side::A, Kind::Ws, "x", None).await?;
    let mut keep = vec![at(s, Side::A, Kind::Tcp, "x", None).await?];
    let r = hub.close(&Target::conn(conn_of(&x)), "bye");
    handed_over(s, &r, 1)?;
    assert_eq!(x.expect_closed(STEP).await?, Some(1000), "closed conn");
    hub.to_conn(&conn_of(&keep[0]), "after a conn close")?;
    delivered(hub, &mut keep, &[&["after a conn close"]]).await?;

    let mut u1 = at(s, Side::A, Kind::Ws, "u", None).await?;
    let mut u2 = at(s, Side::A, Kind::Tcp, "u", None).await?;
    let mut u3 = at(s, Side::B, Kind::Ws, "u", None).await?;
    hub.close(&Target::user("u"), "bye");
    assert_eq!(u1.expect_closed(STEP).await?, Some(1000), "user, ws on a");
    assert_eq!(u2.expect_closed(STEP).await?, None, "user, tcp on a");
    assert_eq!(u3.expect_closed(STEP).await?, Some(1000), "user, ws on b");
    hub.to_conn(&conn_of(&keep[0]), "after a user close")?;
    delivered(hub, &mut keep, &[&["after a user close"]]).await?;

    let mut g1 = at(s, Side::A, Kind::Ws, "g1", Some("g")).await?;
    let mut g2 = at(s, Side::A, Kind::Tcp, "g2", Some("g")).await?;
    let mut g3 = at(s, Side::B, Kind::Ws, "g3", Some("g")).await?;
    let spared = at(s, Side::A, Kind::Ws, "spared", Some("g")).await?;
    hub.close(&Target::group("g").except_conn(conn_of(&spared)), "bye");
    assert_eq!(g1.expect_closed(STEP).await?, Some(1000), "group, ws on a");
    assert_eq!(g2.expect_closed(STEP).await?, None, "group, tcp on a");
    assert_eq!(g3.expect_closed(STEP).await?, Some(1000), "group, ws on b");
    keep.push(spared);
    hub.to_group("g", "after a group close")?;
    delivered(hub, &mut keep, &[&[], &["after a group close"]]).await?;

    // Everyone but user x: x's TCP connection stays, `spared` and z go.
    let mut z = at(s, Side::B, Kind::Tcp, "z", None).await?;
    hub.close(&Target::all().except_user("x"), "bye");
    let mut spared = keep.pop().unwrap();
    assert_eq!(
        spared.expect_closed(STEP).await?,
        Some(1000),
        "all, ws on a"
    );
    assert_eq!(z.expect_closed(STEP).await?, None, "all, tcp on b");
    hub.to_conn(&conn_of(&keep[0]), "after closing all")?;
    delivered(hub, &mut keep, &[&["after closing all"]]).await
}

/// Pushes to a group or to everyone minus some connections, from side `b`:
/// the excluded get nothing, every other recipient exactly once.
pub async fn pushes_except_connections(s: &dyn Sides) -> Result<()> {
    let hub = s.actor();
    let mut cl = vec![
        at(s, Side::A, Kind::Ws, "p", Some("g")).await?,
        at(s, Side::A, Kind::Tcp, "q", Some("g")).await?,
        at(s, Side::B, Kind::Ws, "r", Some("g")).await?,
        at(s, Side::B, Kind::Tcp, "s", Some("g")).await?,
        at(s, Side::A, Kind::Ws, "outsider", None).await?,
    ];
    let c: Vec<ConnId> = cl.iter().map(conn_of).collect();
    // Each side keeps a recipient next to what it excludes (see `delivered`).
    let t = Target::group("g")
        .except_conn(c[0].clone())
        .except_conn(c[3].clone());
    hub.push(&t, "g")?;
    delivered(hub, &mut cl, &[&[], &["g"], &["g"], &[], &[]]).await?;

    let t = Target::all()
        .except_conn(c[1].clone())
        .except_conn(c[2].clone());
    hub.push(&t, "all")?;
    delivered(hub, &mut cl, &[&["all"], &[], &[], &["all"], &["all"]]).await?;

    // Several connections of one node excluded at once.
    let t = Target::all()
        .except_conn(c[0].clone())
        .except_conn(c[1].clone());
    hub.push(&t, "all-but-a")?;
    delivered(
        hub,
        &mut cl,
        &[&[], &[], &["all-but-a"], &["all-but-a"], &["all-but-a"]],
    )
    .await
}

/// Pushes to a group, to everyone, or to a union, minus users, from side
/// `b`: the excluded users' connections on both sides get nothing, every
/// other recipient exactly once.
pub async fn pushes_except_users(s: &dyn Sides) -> Result<()> {
    let hub = s.actor();
    let mut cl = vec![
        at(s, Side::A, Kind::Ws, "ex", Some("g")).await?,
        at(s, Side::B, Kind::Tcp, "ex", Some("g")).await?,
        at(s, Side::A, Kind::Tcp, "in", Some("g")).await?,
        at(s, Side::B, Kind::Ws, "in", Some("g")).await?,
        at(s, Side::A, Kind::Ws, "o", None).await?,
        at(s, Side::B, Kind::Tcp, "o2", None).await?,
    ];
    let c: Vec<ConnId> = cl.iter().map(conn_of).collect();

    hub.push(&Target::group("g").except_user("ex"), "g")?;
    delivered(hub, &mut cl, &[&[], &[], &["g"], &["g"], &[], &[]]).await?;

    let t = Target::all().except_user("ex").except_conn(c[3].clone());
    hub.push(&t, "all")?;
    delivered(hub, &mut cl, &[&[], &[], &["all"], &[], &["all"], &["all"]]).await?;

    // A union reaching "in" twice (user and group member): once each.
    let t = Target::group("g")
        .and_user("in")
        .and_user("o")
        .except_user("ex");
    hub.push(&t, "union")?;
    delivered(
        hub,
        &mut cl,
        &[&[], &[], &["union"], &["union"], &["union"], &[]],
    )
    .await?;

    let t = Target::users(["ex", "in", "o2"]).except_user("in");
    hub.push(&t, "users")?;
    delivered(
        hub,
        &mut cl,
        &[&["users"], &["users"], &[], &[], &[], &["users"]],
    )
    .await
}

/// Pushes from side `b` reach each client in the order they were made,
/// whatever each target costs to resolve. A gateway worker must look up a
/// union or a target minus users before it can send it; the simple pushes
/// made after it (to the connection, the user, the group) must not overtake
/// it, on either side.
pub async fn pushes_arrive_in_the_order_made(s: &dyn Sides) -> Result<()> {
    let hub = s.actor();
    let mut cl = vec![
        at(s, Side::A, Kind::Ws, "a", Some("g")).await?,
        at(s, Side::B, Kind::Tcp, "b", Some("g")).await?,
    ];
    let conns: Vec<ConnId> = cl.iter().map(conn_of).collect();
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); cl.len()];
    // Enough rounds that a look-up overtaken even one time in ten is caught.
    for i in 0..200 {
        let looked_up = match i % 3 {
            0 => Target::group("g").except_user("nobody"),
            1 => Target::all().except_user("nobody"),
            _ => Target::group("g").and_user("a"),
        };
        hub.push(&looked_up, format!("look-up {i}"))?;
        match i % 3 {
            0 => {
                for c in &conns {
                    hub.to_conn(c, format!("simple {i}"))?;
                }
            }
            1 => {
                hub.push(&Target::users(["a", "b"]), format!("simple {i}"))?;
            }
            _ => {
                hub.to_group("g", format!("simple {i}"))?;
            }
        }
        for e in &mut expected {
            e.extend([format!("look-up {i}"), format!("simple {i}")]);
        }
    }
    let expected: Vec<Vec<&str>> = expected
        .iter()
        .map(|e| e.iter().map(String::as_str).collect())
        .collect();
    let expected: Vec<&[&str]> = expected.iter().map(Vec::as_slice).collect();
    delivered(hub, &mut cl, &expected).await
}

/// A push from side `b` made before a close of the same client arrives
/// before the close, whether the push or the close needs a look-up first.
pub async fn a_push_arrives_before_a_later_close(s: &dyn Sides) -> Result<()> {
    let hub = s.actor();
    for i in 0..20 {
        let (side, kind) = match i % 4 {
            0 => (Side::A, Kind::Ws),
            1 => (Side::A, Kind::Tcp),
            2 => (Side::B, Kind::Ws),
            _ => (Side::B, Kind::Tcp),
        };
        let uid = format!("doomed{i}");
        let mut c = at(s, side, kind, &uid, None).await?;
        let conn = conn_of(&c);
        hub.push(
            &Target::user(uid.as_str()).except_user("nobody"),
            "looked up",
        )?;
        hub.to_conn(&conn, "simple")?;
        let close = if i % 2 == 0 {
            Target::conn(conn)
        } else {
            Target::user(uid.as_str()).except_user("nobody")
        };
        hub.close(&close, "bye");
        for frame in ["looked up", "simple"] {
            match c.next_event(STEP).await? {
                Event::Text(t) if t == frame => {}
                other => bail!("{c:?}: expected {frame:?} before the close, got {other:?}"),
            }
        }
        c.expect_closed(STEP).await?;
    }
    Ok(())
}

/// Turns the checks above into `#[tokio::test]`s for one mode. `$start` is an
/// expression evaluating to a future of `Result<Box<dyn Sides>>`; it is
/// evaluated once per test, so every test has its own cluster. A cluster that
/// does not start, a missing service among the causes, fails the test.
#[macro_export]
macro_rules! hub_api_suite {
    ($start:expr) => {
        $crate::hub_api_suite!(@tests $start;
            membership_from_the_other_side,
            bind_and_join_take_effect_before_they_return,
            sessions_from_the_other_side,
            operations_on_unknown_connections,
            closes_from_the_other_side,
            pushes_except_connections,
            pushes_except_users,
            pushes_arrive_in_the_order_made,
            a_push_arrives_before_a_later_close
        );
    };
    (@tests $start:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let sides = $start.await.expect("starting the cluster");
                let result = $crate::hub_api::$name(&*sides).await;
                sides.shutdown().await;
                result.unwrap();
            }
        )*
    };
}

/// A node of the in-memory bus that joined and never answers (hung, or cut
/// off): what the cluster asks of it goes unanswered.
pub struct DeafNode {
    backplane: MemoryBackplane,
    // Held so the bus sees a live node: envelopes to it are taken, never read.
    _inbound: mpsc::Receiver<Bytes>,
    _handled: watch::Sender<u64>,
}

impl DeafNode {
    /// Joins `bus` as node `id`.
    pub async fn join(bus: &MemoryBus, id: &str) -> Result<Self> {
        let backplane = bus.backplane();
        let (tx, inbound) = mpsc::channel(1024);
        let (handled_tx, handled) = watch::channel(0);
        backplane
            .join(JoinContext::new(
                NodeId::new(id)?,
                tx,
                handled,
                Arc::new(NoLocalState),
            ))
            .await?;
        Ok(Self {
            backplane,
            _inbound: inbound,
            _handled: handled_tx,
        })
    }

    /// Leaves the bus: from then on nobody waits for it.
    pub async fn leave(&self) {
        self.backplane.leave().await;
    }
}

/// Two reference-app nodes, `a` and `b`, on the in-memory bus with the
/// [`DeafNode`] "deaf": every cluster-wide question waits for it in vain.
pub struct WithDeafNode {
    pub bus: MemoryBus,
    pub a: Running,
    pub b: Running,
    pub deaf: DeafNode,
}

impl WithDeafNode {
    /// Starts the nodes; their questions wait at most `query_timeout`.
    pub async fn start(query_timeout: Duration) -> Result<Self> {
        let bus = MemoryBus::new();
        let a = node_on(&bus, "a", query_timeout).await?;
        let b = node_on(&bus, "b", query_timeout).await?;
        let deaf = DeafNode::join(&bus, "deaf").await?;
        Ok(Self { bus, a, b, deaf })
    }

    /// Stops the nodes.
    pub async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

/// A reference-app node `id` on `bus` whose cluster queries and remote
/// operations wait at most `query_timeout`.
pub async fn node_on(bus: &MemoryBus, id: &str, query_timeout: Duration) -> Result<Running> {
    let cfg = test_config(id);
    node::launch_app(
        &cfg,
        Arc::new(bus.backplane()),
        AppSpec::reference(cfg.security.clone()),
        |b| b.query_timeout(query_timeout),
    )
    .await
}
