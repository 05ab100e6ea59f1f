//! The Hub API across nodes: membership, sessions, closes and queries made on
//! one node about connections of another, and honest answers when a node does
//! not respond.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use switchboard::core::backplane::NoLocalState;
use switchboard::core::{Backplane, JoinContext, MemoryBus};
use switchboard::{ConnId, NodeId, OpError, Target};
use switchboard_server::node::{self, Running};
use switchboard_test::Client;
use switchboard_test::client::Event;
use switchboard_test::cluster::test_config;
use switchboard_test::conformance::settle;

async fn two_nodes(bus: &MemoryBus) -> Result<(Running, Running)> {
    let a = node::launch(&test_config("a"), Arc::new(bus.backplane())).await?;
    let b = node::launch(&test_config("b"), Arc::new(bus.backplane())).await?;
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_sessions_from_another_node() -> Result<()> {
    let bus = MemoryBus::new();
    let (a, b) = two_nodes(&bus).await?;
    let on_a = Client::ws(a.ws.unwrap(), "alice", None).await?;
    let sender = Client::tcp(b.tcp.unwrap(), "sender", None).await?;
    let conn: ConnId = on_a.conn.parse()?;
    let hub = &b.hub; // node b acts on a connection of node a

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
    cl[0]
        .send(serde_json::json!({"op":"to_user","uid":"alice","data":"old"}))
        .await?;
    cl[0]
        .send(serde_json::json!({"op":"to_user","uid":"alice2","data":"new"}))
        .await?;
    cl[0]
        .send(serde_json::json!({"op":"to_group","group":"room","data":"room"}))
        .await?;
    settle(&mut cl, 0, &[&[], &["new", "room"]]).await?;

    hub.set_session(&conn, "lang", Some("fr".into())).await?;
    hub.update_session(
        &conn,
        vec![
            ("a".into(), Some("1".into())),
            ("b".into(), Some("2".into())),
        ],
    )
    .await?;
    hub.set_session(&conn, "a", None).await?;
    let s = a.hub.session(&conn).await?;
    assert_eq!(
        s.into_iter().collect::<Vec<_>>(),
        [("b".into(), "2".into()), ("lang".into(), "fr".into())]
    );

    hub.leave(&conn, "room").await?;
    hub.unbind(&conn).await?;
    assert_eq!(hub.group_count("room").await.value, 0);
    assert!(!hub.is_online("alice2").await.value);

    // A connection that does not exist, on a live node and on an unknown node.
    let gone = ConnId::new(NodeId::new("a")?, conn.seq() + 1000);
    assert_eq!(
        hub.join(&gone, "x").await,
        Err(OpError::NoSuchConn(gone.clone()))
    );
    assert!(!hub.conn_exists(&gone).await.value);
    assert!(hub.conn_exists(&conn).await.value);
    let nowhere = ConnId::new(NodeId::new("nowhere")?, 1);
    assert_eq!(
        hub.session(&nowhere).await,
        Err(OpError::Unreachable(NodeId::new("nowhere")?))
    );
    let ex = hub.conn_exists(&nowhere).await;
    assert!(!ex.value && ex.is_complete());

    // Closing a user from another node closes its connections there.
    hub.bind(&conn, "alice").await?;
    let report = hub.close(&Target::user("alice"), "bye");
    assert_eq!(report.remote.sent, 1);
    let mut on_a = cl.pop().unwrap();
    assert_eq!(
        on_a.next_event(switchboard_test::STEP).await?,
        Event::Closed(Some(1000))
    );
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_name_the_nodes_that_did_not_answer() -> Result<()> {
    let bus = MemoryBus::new();
    let (a, b) = two_nodes(&bus).await?;
    // A node that joined the bus but never answers (hung, or partitioned).
    let deaf = bus.backplane();
    let (tx, _rx) = tokio::sync::mpsc::channel(1024);
    let (_handled_tx, handled) = tokio::sync::watch::channel(0);
    deaf.join(JoinContext::new(
        NodeId::new("deaf")?,
        tx,
        handled,
        Arc::new(NoLocalState),
    ))
    .await?;

    let _u = Client::ws(b.ws.unwrap(), "bob", Some("g")).await?;
    let hub = switchboard::Hub::builder()
        .node_id(NodeId::new("asker")?)
        .backplane(bus.backplane())
        .query_timeout(Duration::from_millis(300))
        .start()
        .await?;

    let count = hub.group_count("g").await;
    assert_eq!(count.value, 1, "what the live nodes said is kept");
    assert_eq!(count.missing, vec![NodeId::new("deaf")?]);
    assert!(!count.is_complete());
    let offline = hub.is_online("nobody").await;
    assert!(
        !offline.value && !offline.is_complete(),
        "cannot say nobody is offline"
    );
    // Found online is definitive whoever else is silent.
    let online = hub.is_online("bob").await;
    assert!(online.value && online.is_complete());

    // An operation on a connection of the deaf node times out, it is not faked.
    let on_deaf = ConnId::new(NodeId::new("deaf")?, 7);
    assert_eq!(
        hub.join(&on_deaf, "g").await,
        Err(OpError::Timeout(NodeId::new("deaf")?))
    );

    // Once the node leaves, answers are complete again.
    deaf.leave().await;
    assert!(hub.group_count("g").await.is_complete());
    hub.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
