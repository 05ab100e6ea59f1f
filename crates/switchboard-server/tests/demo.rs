//! The web console: the page every node serves at `/`.

#![allow(clippy::unwrap_used)]

use serde_json::{Value, json};
use switchboard_test::{Client, Cluster, InProcess, Mode, http};

fn json_of(r: &http::Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()))
}

#[tokio::test]
async fn every_node_serves_its_console_beside_its_endpoints() {
    let cluster = InProcess::start(Mode::Local).await.unwrap();
    let node = &cluster.nodes[0];
    let ws = node.ws.unwrap();

    let page = http::get(ws, "/").await.unwrap();
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.header("content-security-policy").is_some());
    assert!(
        page.text().contains(r#"<script src="console.js""#),
        "{}",
        page.text()
    );
    let script = http::get(ws, "/console.js").await.unwrap();
    assert_eq!(script.status, 200);
    assert!(script.text().contains("new WebSocket("));
    assert_eq!(http::get(ws, "/console.css").await.unwrap().status, 200);

    // One pane, on the port the page came from, at the node's WebSocket path.
    let config = json_of(&http::get(ws, "/config.json").await.unwrap());
    assert_eq!(config["title"], "switchboard node n0");
    assert_eq!(config["endpoints"].as_array().unwrap().len(), 1);
    assert_eq!(config["endpoints"][0]["path"], "/ws");
    assert!(config["endpoints"][0]["port"].is_null());

    // The other endpoints are untouched, and unknown paths are still 404.
    assert_eq!(http::get(ws, "/ready").await.unwrap().status, 200);
    let stats = http::get(ws, "/stats").await.unwrap();
    assert_eq!(json_of(&stats)["node"], "n0");
    assert_eq!(http::get(ws, "/nope").await.unwrap().status, 404);
    assert_eq!(http::get(ws, "/console").await.unwrap().status, 404);
    // A plain GET of the WebSocket path still reaches the upgrade handler.
    assert_eq!(http::get(ws, "/ws").await.unwrap().status, 400);
    let mut c = Client::ws(ws, "u", None).await.unwrap();
    assert_eq!(
        c.ask(json!({"op": "online", "uid": "u"})).await.unwrap()["online"],
        true
    );
    c.close().await;
    Box::new(cluster).shutdown().await;
}

#[tokio::test]
async fn a_websocket_path_at_the_root_keeps_the_root() {
    let cluster = InProcess::start_with(Mode::Local, |c| c.ws_path = "/".into())
        .await
        .unwrap();
    let ws = cluster.nodes[0].ws.unwrap();
    let c = Client::connect_path(ws, "/", "u").await.unwrap();
    assert_eq!(c.node, "n0");
    c.close().await;
    assert_eq!(http::get(ws, "/").await.unwrap().status, 400);
    // The rest of the console still tells where to connect.
    let config = json_of(&http::get(ws, "/config.json").await.unwrap());
    assert_eq!(config["endpoints"][0]["path"], "/");
    Box::new(cluster).shutdown().await;
}
