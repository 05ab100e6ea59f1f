//! The web console and `switchboard demo`: the page every node serves at `/`,
//! the demo's two nodes behind one page, and the page itself in a headless
//! Chromium, sending from a pane on one node to a user on the other.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use switchboard_test::browser::Browser;
use switchboard_test::cluster::DemoProcess;
use switchboard_test::{Client, Cluster, InProcess, Mode, STEP, http};

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// `target/artifacts`: beside the binary's profile directory, so it follows
/// `CARGO_TARGET_DIR`.
fn artifacts() -> PathBuf {
    let target = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in target/PROFILE/");
    target.join("artifacts")
}

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

#[tokio::test]
async fn demo_serves_the_page_and_two_nodes_of_one_cluster() {
    let demo = DemoProcess::spawn(BIN.as_ref(), &[]).await.unwrap();
    assert_eq!(demo.banner.nodes.len(), 2, "{:?}", demo.banner);
    let page = demo.page();
    assert!(page.ip().is_loopback());

    let index = http::get(page, "/").await.unwrap();
    assert_eq!(index.status, 200);
    assert!(index.text().contains("console.js"));
    assert_eq!(http::get(page, "/nope").await.unwrap().status, 404);
    // The page is told where both nodes are.
    let config = json_of(&http::get(page, "/config.json").await.unwrap());
    let ports: Vec<_> = config["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["port"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ports,
        [demo.ws(0).port() as u64, demo.ws(1).port() as u64],
        "{config}"
    );
    assert_ne!(demo.ws(0), demo.ws(1));

    // Each endpoint is its own node, and a push crosses between them.
    let mut alice = Client::ws(demo.ws(0), "alice", Some("lobby"))
        .await
        .unwrap();
    let mut bob = Client::ws(demo.ws(1), "bob", Some("lobby")).await.unwrap();
    assert_eq!(alice.node, demo.banner.nodes[0].id);
    assert_eq!(bob.node, demo.banner.nodes[1].id);
    assert_ne!(alice.node, bob.node);
    let data = json!({"from": "alice", "node": alice.node, "text": "hi bob"}).to_string();
    alice
        .send(json!({"op": "to_user", "uid": "bob", "data": data}))
        .await
        .unwrap();
    assert_eq!(bob.recv().await.unwrap(), data);
    assert_eq!(
        bob.ask(json!({"op": "group_count", "group": "lobby"}))
            .await
            .unwrap()["count"],
        2
    );
    assert_eq!(
        alice
            .ask(json!({"op": "online", "uid": "bob"}))
            .await
            .unwrap()["online"],
        true
    );

    // SIGTERM stops it like `serve`: clients told "going away", exit 0.
    // Each client hangs up once told, as a browser would answer the close.
    drop(bob);
    let told = async move {
        let code = alice.expect_closed(STEP).await;
        drop(alice);
        code
    };
    let (status, code) = tokio::join!(demo.terminate(), told);
    let status = status.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(code.unwrap(), Some(1001));
}

#[tokio::test]
async fn demo_on_a_busy_port_is_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let out = tokio::process::Command::new(BIN)
        .args(["demo", "--port", &port])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("binding the demo page"), "{err}");
}

/// The CSS selector of pane `i`.
fn pane(i: usize) -> String {
    format!(r#"[data-pane="{i}"]"#)
}

#[tokio::test]
async fn in_a_browser_a_message_from_node_one_reaches_a_user_on_node_two() {
    let artifacts = artifacts();
    std::fs::create_dir_all(&artifacts).unwrap();
    // No screenshot of an earlier run may pass for this one's.
    for old in ["demo.png", "demo-phone.png", "demo-failure.png"] {
        let _ = std::fs::remove_file(artifacts.join(old));
    }
    let browser = Browser::start(&artifacts.join("chromedriver.log"), 1280, 900)
        .await
        .unwrap();
    let demo = DemoProcess::spawn(BIN.as_ref(), &[]).await.unwrap();
    let outcome = use_the_page(&browser, &demo, &artifacts).await;
    if outcome.is_err() {
        // What the page showed when it went wrong, for the CI artefacts.
        let _ = browser
            .screenshot(&artifacts.join("demo-failure.png"))
            .await;
    }
    browser.quit().await;
    let status = demo.terminate().await.unwrap();
    outcome.unwrap();
    assert!(status.success(), "{status}");
}

async fn use_the_page(browser: &Browser, demo: &DemoProcess, artifacts: &Path) -> Result<()> {
    browser.goto(&format!("http://{}/", demo.page())).await?;
    browser
        .wait_for_text("#panes", "node 2", STEP)
        .await
        .context("the page did not build its panes")?;

    for (i, uid) in [(0, "alice"), (1, "bob")] {
        browser.fill(&format!("{} .uid", pane(i)), uid).await?;
        browser
            .fill(&format!("{} .group", pane(i)), "lobby")
            .await?;
        browser.click(&format!("{} .connect", pane(i))).await?;
    }
    for i in 0..2 {
        let id = &demo.banner.nodes[i].id;
        let log = format!("{} .log", pane(i));
        browser
            .wait_for_text(&log, &format!("connected to node {id}"), STEP)
            .await?;
        let shown = browser.text(&format!("{} .node", pane(i))).await?;
        ensure!(shown == *id, "pane {i} shows node {shown:?}, not {id:?}");
    }

    // Cluster-wide answers, asked of either node.
    browser.fill(&format!("{} .who", pane(0)), "bob").await?;
    browser.click(&format!("{} .online", pane(0))).await?;
    browser
        .wait_for_text(&format!("{} .log", pane(0)), "bob is online", STEP)
        .await?;
    browser
        .fill(&format!("{} .which", pane(1)), "lobby")
        .await?;
    browser.click(&format!("{} .count", pane(1))).await?;
    browser
        .wait_for_text(
            &format!("{} .log", pane(1)),
            "group lobby: 2 connections",
            STEP,
        )
        .await?;

    // Markup in a message is text, never HTML.
    let text = r#"hello bob <b>from</b> node one & "friends" <img src=x onerror=alert(1)>"#;
    browser.fill(&format!("{} .to", pane(0)), "bob").await?;
    browser.fill(&format!("{} .text", pane(0)), text).await?;
    browser.click(&format!("{} .send", pane(0))).await?;
    let got = browser
        .wait_for_text(&format!("{} .log .msg", pane(1)), text, STEP)
        .await
        .context("the message did not reach the pane on node 2")?;
    let (n0, n1) = (&demo.banner.nodes[0].id, &demo.banner.nodes[1].id);
    ensure!(got.contains(&format!("alice on {n0}")), "sender: {got:?}");
    ensure!(
        got.contains(&format!("via {n1}")),
        "receiving node: {got:?}"
    );
    ensure!(browser.count(".log b, .log img").await? == 0, "markup ran");
    ensure!(
        browser.count(&format!("{} .log .msg", pane(0))).await? == 0,
        "a message to bob reached alice"
    );
    browser.screenshot(&artifacts.join("demo.png")).await?;

    // Side by side on a wide screen, stacked on a phone, never wider than it.
    let layout = "const [a, b] = [...document.querySelectorAll('.pane')]\
        .map(p => p.getBoundingClientRect());\
        const d = document.documentElement;\
        return {side: Math.abs(a.top - b.top) < 1, stacked: b.top >= a.bottom,\
        overflow: d.scrollWidth > d.clientWidth};";
    let wide = browser.execute(layout, json!([])).await?;
    ensure!(wide["side"] == true, "wide layout: {wide}");
    browser.resize(390, 844).await?;
    let narrow = browser.execute(layout, json!([])).await?;
    ensure!(
        narrow["stacked"] == true && narrow["overflow"] == false,
        "phone layout: {narrow}"
    );
    browser
        .screenshot(&artifacts.join("demo-phone.png"))
        .await?;
    Ok(())
}
