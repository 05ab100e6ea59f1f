//! The Hub API across nodes, in every mode the conformance suite runs:
//! membership, sessions, closes, queries and pushes with exclusions made
//! from one side of the cluster about connections of the other (one suite,
//! [`switchboard_test::hub_api`]); and honest answers when a node does not
//! respond.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use switchboard::core::backplane::NoLocalState;
use switchboard::core::{Backplane, JoinContext, MemoryBus};
use switchboard::{ConnId, NodeId, OpError};
use switchboard_server::node::{self, Running};
use switchboard_test::Client;
use switchboard_test::cluster::test_config;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// One standalone node: both sides are the node, every operation local.
mod local {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::local());
}

mod memory {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::memory());
}

mod redis_pubsub {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::redis("pubsub"));
}

mod redis_queue {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::redis("queue"));
}

mod amqp_fanout {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::amqp("fanout"));
}

mod amqp_routing {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::amqp("routing"));
}

/// Register and gateways as processes, the acting hubs on in-process workers.
mod gateway {
    use switchboard_test::hub_api::GatewaySides;
    switchboard_test::hub_api_suite!(GatewaySides::start(super::BIN));
}

async fn two_nodes(bus: &MemoryBus) -> Result<(Running, Running)> {
    let a = node::launch(&test_config("a"), Arc::new(bus.backplane())).await?;
    let b = node::launch(&test_config("b"), Arc::new(bus.backplane())).await?;
    Ok((a, b))
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
