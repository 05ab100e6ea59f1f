//! The Hub API across nodes: membership, sessions, closes and queries made on
//! one node about connections of another, and honest answers when a node does
//! not respond.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use switchboard::core::backplane::NoLocalState;
use switchboard::core::{Backplane, JoinContext, MemoryBus};
use switchboard::{ConnId, NodeId, OpError};
use switchboard_server::config::ClusterUrl;
use switchboard_server::node::{self, Running};
use switchboard_test::Client;
use switchboard_test::cluster::test_config;

async fn two_nodes(bus: &MemoryBus) -> Result<(Running, Running)> {
    let a = node::launch(&test_config("a"), Arc::new(bus.backplane())).await?;
    let b = node::launch(&test_config("b"), Arc::new(bus.backplane())).await?;
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_sessions_from_another_node() -> Result<()> {
    let bus = MemoryBus::new();
    let (a, b) = two_nodes(&bus).await?;
    switchboard_test::hub_api::across_nodes(&a, &b).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

/// Two nodes, `a` and `b`, in this process on the shared RabbitMQ in `mode`;
/// `None` to skip when RabbitMQ is missing outside CI.
async fn on_rabbitmq_nodes(mode: &str) -> Result<Option<Vec<Running>>> {
    let Some(url) = switchboard_test::services::amqp_url() else {
        return Ok(None);
    };
    let prefix = switchboard_test::services::unique_prefix("hub");
    let cluster: ClusterUrl = format!("{url}?mode={mode}&prefix={prefix}").parse()?;
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let mut cfg = test_config(id);
        cfg.cluster = cluster.clone();
        nodes.push(node::launch(&cfg, node::backplane(&cfg.cluster).await?).await?);
    }
    Ok(Some(nodes))
}

/// The same checks on two nodes in this process on the shared RabbitMQ, in `mode`.
async fn on_rabbitmq(mode: &str) -> Result<()> {
    let Some(nodes) = on_rabbitmq_nodes(mode).await? else {
        return Ok(());
    };
    switchboard_test::hub_api::across_nodes(&nodes[0], &nodes[1]).await?;
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_sessions_from_another_node_on_rabbitmq_routing() -> Result<()> {
    on_rabbitmq("routing").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_bind_returns_once_pushes_reach_the_connection() -> Result<()> {
    let Some(nodes) = on_rabbitmq_nodes("routing").await? else {
        return Ok(());
    };
    let mut on_a = Client::ws(nodes[0].ws.unwrap(), "first", None).await?;
    let conn: ConnId = on_a.conn.parse()?;
    let hub_b = &nodes[1].hub;
    // Node b moves a connection of node a from user to user and pushes to
    // the new user at once: the bind's reply means the broker routes the
    // user's key to node a already.
    for i in 0..30 {
        hub_b.bind(&conn, format!("user{i}")).await?;
        hub_b.to_user(format!("user{i}"), format!("m{i}"))?;
        assert_eq!(on_a.recv().await?, format!("m{i}"));
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_and_sessions_from_another_node_on_rabbitmq_fanout() -> Result<()> {
    on_rabbitmq("fanout").await
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
