//! The `switchboard` binary itself: configuration sources and their order,
//! clean exit on SIGTERM, and the conformance suite against a real process.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use switchboard_test::cluster::ProcessNode;
use switchboard_test::{Client, Process};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

mod process {
    use super::*;
    switchboard_test::conformance_suite!(Process::boxed(BIN, &[&["--node-id", "proc"]]));
}

#[tokio::test]
async fn flags_over_environment_over_file() {
    let dir = std::env::temp_dir().join(format!("sb-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("switchboard.toml");
    std::fs::write(
        &file,
        "node_id = \"from-file\"\nws_path = \"/socket\"\nws = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let n = ProcessNode::spawn_with_env(BIN.as_ref(), &["--config", file], &[])
        .await
        .unwrap();
    assert_eq!(n.node_id, "from-file");
    let mut c = Client::connect_path(n.ws.unwrap(), "/socket", "u")
        .await
        .unwrap();
    assert_eq!(c.node, "from-file");
    assert_eq!(
        c.ask(json!({"op":"online","uid":"u"})).await.unwrap()["online"],
        true
    );
    assert!(n.terminate().await.unwrap().success());

    let n = ProcessNode::spawn_with_env(
        BIN.as_ref(),
        &["--config", file],
        &[("SWITCHBOARD_NODE_ID", "from-env")],
    )
    .await
    .unwrap();
    assert_eq!(n.node_id, "from-env");
    assert!(n.terminate().await.unwrap().success());

    let n = ProcessNode::spawn_with_env(
        BIN.as_ref(),
        &["--config", file, "--node-id", "from-flag"],
        &[("SWITCHBOARD_NODE_ID", "from-env")],
    )
    .await
    .unwrap();
    assert_eq!(n.node_id, "from-flag");
    assert!(n.terminate().await.unwrap().success());
}

#[tokio::test]
async fn bad_configuration_is_a_clear_error() {
    let out = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--node-id",
            "bad id!",
            "--ws",
            "127.0.0.1:0",
            "--tcp",
            "off",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid node id"), "{err}");
    let out = tokio::process::Command::new(BIN)
        .args(["serve", "--cluster", "kafka://x", "--ws", "127.0.0.1:0"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported cluster"));
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_zero() {
    let n = ProcessNode::spawn(BIN.as_ref(), &[]).await.unwrap();
    let mut ws = Client::ws(n.ws.unwrap(), "a", None).await.unwrap();
    let mut tcp = Client::tcp(n.tcp.unwrap(), "b", None).await.unwrap();
    let status = n.terminate().await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        ws.expect_closed(Duration::from_secs(2)).await.unwrap(),
        Some(1001)
    );
    assert_eq!(
        tcp.expect_closed(Duration::from_secs(2)).await.unwrap(),
        None
    );
}
