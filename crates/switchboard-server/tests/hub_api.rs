//! The Hub API across nodes, in every mode the conformance suite runs:
//! membership, sessions, closes, queries and pushes with exclusions made
//! from one side of the cluster about connections of the other, and the
//! order in which its pushes and closes reach a client (one suite,
//! [`switchboard_test::hub_api`]); and honest answers when a node does not
//! respond, down to what a client is told.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use switchboard::{ConnId, NodeId, OpError};
use switchboard_test::hub_api::WithDeafNode;
use switchboard_test::{Client, Kind};

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

mod nats_core {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::nats("core"));
}

mod nats_jetstream {
    use switchboard_test::hub_api::NodeSides;
    switchboard_test::hub_api_suite!(NodeSides::nats("jetstream"));
}

/// Register and gateways as processes, the acting hubs on in-process workers.
mod gateway {
    use switchboard_test::hub_api::GatewaySides;
    switchboard_test::hub_api_suite!(GatewaySides::start(super::BIN));
}

/// Short, so that waiting for the node that never answers costs little.
const QUERY_TIMEOUT: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_name_the_nodes_that_did_not_answer() -> Result<()> {
    let c = WithDeafNode::start(QUERY_TIMEOUT).await?;
    let u = Client::ws(c.b.ws.unwrap(), "bob", Some("g")).await?;
    let hub = switchboard::Hub::builder()
        .node_id(NodeId::new("asker")?)
        .backplane(c.bus.backplane())
        .query_timeout(QUERY_TIMEOUT)
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
    c.deaf.leave().await;
    assert!(hub.group_count("g").await.is_complete());
    // Gone before the nodes stop, which would otherwise wait for its close.
    drop(u);
    hub.shutdown().await;
    c.shutdown().await;
    Ok(())
}

/// A client's `group_count` and `online` replies say when a node did not
/// answer (`"complete":false` and the `"missing"` nodes, as the README
/// documents), keep what the live nodes said, and drop both fields once
/// every node answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_told_which_nodes_did_not_answer() -> Result<()> {
    let c = WithDeafNode::start(QUERY_TIMEOUT).await?;
    let member = Client::tcp(c.b.tcp.unwrap(), "bob", Some("g")).await?;
    let mut askers = vec![
        Client::connect(Kind::Ws, c.a.ws.unwrap(), "ws-asker", None).await?,
        Client::connect(Kind::Tcp, c.a.tcp.unwrap(), "tcp-asker", None).await?,
    ];
    // Each request, the answer the live nodes give, and whether the answer
    // needs every node: found online is definitive whoever else is silent.
    let asks = [
        (
            json!({"op": "group_count", "group": "g"}),
            json!({"count": 1}),
            true,
        ),
        (
            json!({"op": "online", "uid": "nobody"}),
            json!({"online": false}),
            true,
        ),
        (
            json!({"op": "online", "uid": "bob"}),
            json!({"online": true}),
            false,
        ),
    ];
    replies(&mut askers, &asks, Some("deaf")).await?;
    c.deaf.leave().await;
    replies(&mut askers, &asks, None).await?;
    // Gone before the nodes stop, which would otherwise wait for their close.
    drop((askers, member));
    c.shutdown().await;
    Ok(())
}

/// Each client asks each request and must get back exactly the request's
/// fields and the answer's, marked incomplete with `silent` missing where the
/// answer needs every node.
async fn replies(
    clients: &mut [Client],
    asks: &[(serde_json::Value, serde_json::Value, bool)],
    silent: Option<&str>,
) -> Result<()> {
    for c in clients {
        for (request, answer, needs_all) in asks {
            let mut expected = request.clone();
            for (k, v) in answer.as_object().unwrap() {
                expected[k] = v.clone();
            }
            if let (true, Some(node)) = (needs_all, silent) {
                expected["complete"] = json!(false);
                expected["missing"] = json!([node]);
            }
            assert_eq!(
                c.ask(request.clone()).await?,
                expected,
                "{c:?} asked {request}"
            );
        }
    }
    Ok(())
}
