//! `switchboard demo`: a two-node cluster and a web page to try it from, on
//! loopback, with no external service.
//!
//! The page is the [`console`] with one pane per node, served on
//! a port of its own and told by its `config.json` where the nodes listen.
//! What runs behind it is chosen by one function, [`topology`]: today two nodes
//! in this process on the in-memory bus (`--cluster memory:2`). Another shape
//! (gateways in front of workers, say) replaces that function and nothing else,
//! as long as it returns the WebSocket endpoints the panes connect to.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::{ClusterUrl, ServeConfig};
use crate::console::{self, ConsoleConfig};
use crate::node::{self, Running};

/// Flags of `switchboard demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Port of the web page on 127.0.0.1; 0 picks a free one
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// WebSocket port of the first node on 127.0.0.1, the second node gets the next one; 0 picks free ones
    #[arg(long, default_value_t = 0)]
    pub ws_port: u16,
}

/// One node as a browser reaches it.
#[derive(Debug, Clone)]
pub struct NodeEndpoint {
    /// The node's id (what its welcome frames carry).
    pub node: String,
    /// Its WebSocket listener.
    pub ws: SocketAddr,
    /// Its WebSocket path.
    pub path: String,
}

/// The nodes behind the page, whatever their shape: where the panes connect,
/// and how to stop them.
#[derive(Debug)]
pub struct Topology {
    /// One endpoint per pane, in pane order.
    pub endpoints: Vec<NodeEndpoint>,
    /// What connects the nodes, for the start-up output.
    pub cluster: String,
    /// A line for the page about what runs behind it.
    pub about: String,
    nodes: Vec<Running>,
}

impl Topology {
    /// Stops every node gracefully.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// Starts the demo's cluster: two nodes in this process joined by the
/// in-memory bus, each with a WebSocket listener on loopback and no TCP.
pub async fn topology(args: &DemoArgs) -> anyhow::Result<Topology> {
    let cfg = ServeConfig {
        cluster: ClusterUrl::Memory(2),
        ws: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, args.ws_port)).to_string()),
        tcp: None,
        // An open page answers the close at once, but a tab asleep in the
        // background may not: Ctrl-C should not wait the default 10 s for it.
        shutdown_timeout: Duration::from_secs(3),
        ..ServeConfig::default()
    };
    let nodes = node::launch_all(&cfg).await?;
    let endpoints = nodes
        .iter()
        .map(|n| {
            Ok(NodeEndpoint {
                node: n.hub.node_id().to_string(),
                ws: n.ws.context("a demo node without a WebSocket listener")?,
                path: cfg.ws_path.clone(),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Topology {
        endpoints,
        cluster: cfg.cluster.to_string(),
        about: "Two nodes of one cluster, in one process, joined by an in-memory bus. \
                Connect both panes, then send from the first to the user of the second: \
                the message crosses from one node to the other."
            .to_owned(),
        nodes,
    })
}

/// A running demo: the page and the nodes behind it.
#[derive(Debug)]
pub struct Demo {
    /// Where the page is served.
    pub page: SocketAddr,
    /// The nodes.
    pub topology: Topology,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

/// Starts the nodes and serves the page.
pub async fn start(args: &DemoArgs) -> anyhow::Result<Demo> {
    // The page's port first: a busy port fails before any node starts.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.port))
        .await
        .with_context(|| format!("binding the demo page on 127.0.0.1:{}", args.port))?;
    let page = listener.local_addr()?;
    let topology = topology(args).await?;
    let config = ConsoleConfig {
        title: "switchboard demo".to_owned(),
        about: topology.about.clone(),
        endpoints: topology
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| console::Endpoint {
                label: format!("node {}", i + 1),
                port: Some(e.ws.port()),
                path: e.path.clone(),
            })
            .collect(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, console::router(&config, None))
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future(),
    );
    Ok(Demo {
        page,
        topology,
        stop,
        server,
    })
}

impl Demo {
    /// Stops serving the page, then the nodes (whose clients are closed with
    /// 1001 "going away").
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let mut server = self.server;
        // Graceful shutdown closes idle keep-alive connections at once; a
        // request still being sent is given a moment, then cut.
        if tokio::time::timeout(Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        self.topology.shutdown().await;
    }
}
