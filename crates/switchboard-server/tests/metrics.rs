//! `GET /metrics` of a process of the real binary: what a scraper reads as
//! a client connects and pushes.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use anyhow::{Result, ensure};
use serde_json::json;
use switchboard_test::Client;
use switchboard_test::cluster::ProcessNode;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// The node's metrics, checked to be served as OpenMetrics.
async fn scrape(ws: SocketAddr) -> Result<String> {
    let r = switchboard_test::http::get(ws, "/metrics").await?;
    ensure!(r.status == 200, "/metrics answered {}", r.status);
    let kind = r.header("content-type").unwrap_or_default();
    ensure!(kind.starts_with("application/openmetrics-text"), "{kind}");
    Ok(r.text())
}

/// The value of a series (its name and labels, as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_scrape_sees_the_nodes_clients_and_pushes() -> Result<()> {
    let n = ProcessNode::spawn(BIN.as_ref(), &[]).await?;
    let ws = n.ws.unwrap();
    let pushes = r#"switchboard_pushes_total{target="user"}"#;
    let open = r#"switchboard_connections{transport="websocket"}"#;
    let before = scrape(ws).await?;
    assert_eq!(sample(&before, pushes), Some(0.0), "{before}");
    assert_eq!(sample(&before, open), Some(0.0));
    assert!(before.ends_with("# EOF\n"));

    let mut alice = Client::ws(ws, "alice", None).await?;
    alice
        .send(json!({"op": "to_user", "uid": "alice", "data": "hi"}))
        .await?;
    assert_eq!(alice.recv().await?, "hi");
    // A frame is counted once its write returns, which may be just after
    // the client has read it: scrape until both are counted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut after = scrape(ws).await?;
    while sample(&after, "switchboard_frames_written_total") < Some(2.0)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        after = scrape(ws).await?;
    }
    assert!(after.lines().any(|l| l == format!("{open} 1")), "{after}");
    assert_eq!(sample(&after, pushes), Some(1.0));
    assert!(
        sample(&after, "switchboard_frames_written_total") >= Some(2.0),
        "the welcome and the push"
    );
    assert_eq!(sample(&after, "switchboard_broker_link_up"), Some(1.0));
    // The reference application's counters come along.
    assert_eq!(
        sample(&after, "switchboard_app_connections_refused"),
        Some(0.0)
    );

    alice.close().await;
    n.terminate().await?;
    Ok(())
}
