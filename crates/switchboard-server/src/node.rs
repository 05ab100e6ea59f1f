//! Starting one node of the reference application from a [`ServeConfig`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use switchboard::core::Backplane;
use switchboard::{Hub, Server, Standalone, TcpOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::ReferenceApp;
use crate::config::{ClusterUrl, ServeConfig};
use crate::metrics::Metrics;
use crate::security::Security;

/// A running node.
#[derive(Debug)]
pub struct Running {
    /// The node's hub.
    pub hub: Hub,
    /// Where WebSocket clients connect, if served.
    pub ws: Option<SocketAddr>,
    /// Where TCP clients connect, if served.
    pub tcp: Option<SocketAddr>,
    /// Where the server API is served, if it is.
    pub api: Option<SocketAddr>,
    /// The node's metrics, served at `/metrics` on the WebSocket and API listeners.
    pub metrics: Metrics,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// Tasks that outlive the listeners (the API server, the events sender
    /// and the presence tracker): stopped once the connections are closed,
    /// so that their close events still go out.
    background: Vec<JoinHandle<()>>,
    background_stop: CancellationToken,
}

impl Running {
    /// Stops the node gracefully and waits until it has stopped.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
        self.background_stop.cancel();
        for task in self.background {
            let _ = task.await;
        }
    }
}

/// What SIGHUP does to a node: reads its TLS certificate and key again, so
/// that new handshakes use them (open connections keep theirs). A pair that
/// cannot be used is logged and the certificate served so far stays. Returns
/// whether a new pair is served.
pub fn reload_tls(cfg: &ServeConfig) -> bool {
    let Some(files) = &cfg.tls else {
        tracing::info!("SIGHUP: nothing to reload (no --tls-cert)");
        return false;
    };
    match files.reload() {
        Ok(()) => {
            tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            true
        }
        Err(error) => {
            tracing::error!(%error, "TLS certificate not reloaded; the current one stays");
            false
        }
    }
}

/// Connects the backplane a cluster URL names (for `memory:N`, a bus of its
/// own: use [`launch_all`] to start the N nodes on one bus).
pub async fn backplane(cluster: &ClusterUrl) -> anyhow::Result<Arc<dyn Backplane>> {
    Ok(match cluster {
        ClusterUrl::Local => Arc::new(Standalone),
        ClusterUrl::Memory(_) => Arc::new(switchboard::core::MemoryBus::new().backplane()),
        ClusterUrl::Redis(cfg) => Arc::new(
            switchboard_redis::RedisBackplane::connect(cfg.clone())
                .await
                .with_context(|| format!("connecting to {}", cfg.display_url()))?,
        ),
        ClusterUrl::Amqp(cfg) => Arc::new(switchboard_amqp::AmqpBackplane::new(cfg.clone())),
        ClusterUrl::Nats(cfg) => Arc::new(switchboard_nats::NatsBackplane::new(cfg.clone())),
    })
}

/// What a role adds to a node's `/stats` and `/ready` (a gateway: its
/// workers and held events).
pub trait Probe: Send + Sync + 'static {
    /// The key its counters go under in `/stats`.
    fn key(&self) -> &'static str {
        "role"
    }
    /// Extra counters, under [`Probe::key`] in `/stats`.
    fn stats(&self) -> serde_json::Value;
    /// Whether the role can serve; `Err` says why not.
    fn ready(&self) -> Result<(), String>;
}

/// What a node serves: the application and how its clients open.
pub struct AppSpec {
    /// The application.
    pub handler: Arc<dyn switchboard::Handler>,
    /// TCP clients send a hello line first.
    pub tcp_hello: bool,
    /// The role's own counters and readiness.
    pub probe: Option<Arc<dyn Probe>>,
}

impl AppSpec {
    /// The reference application.
    pub fn reference(security: Security) -> Self {
        Self::of(ReferenceApp::new(security))
    }

    /// This reference application.
    pub fn of(app: ReferenceApp) -> Self {
        Self {
            handler: Arc::new(app.clone()),
            tcp_hello: true,
            probe: Some(Arc::new(app)),
        }
    }
}

/// `/ready`, `/stats` and `/metrics`, served on the WebSocket listener and
/// on the API's (a worker's too).
pub(crate) fn ops_router(
    hub: &Hub,
    probe: Option<&Arc<dyn Probe>>,
    metrics: &Metrics,
) -> axum::Router {
    let (h, p) = (hub.clone(), probe.cloned());
    let ready_route = axum::routing::get(move || ready(h.clone(), p.clone()));
    let (h, p) = (hub.clone(), probe.cloned());
    let stats_route = axum::routing::get(move || std::future::ready(stats(&h, p.as_deref())));
    let (h, p, m) = (hub.clone(), probe.cloned(), metrics.clone());
    let metrics_route =
        axum::routing::get(move || std::future::ready(self::metrics(&m, &h, p.as_deref())));
    axum::Router::new()
        .route("/ready", ready_route)
        .route("/stats", stats_route)
        .route("/metrics", metrics_route)
}

/// `GET /stats`: the node's counters as JSON.
fn stats(
    hub: &Hub,
    probe: Option<&dyn Probe>,
) -> ([(switchboard::http::HeaderName, &'static str); 1], String) {
    let s = hub.stats();
    let b = s.backplane;
    let body = serde_json::json!({
        "node": hub.node_id().as_str(),
        "conns_open": s.conns_open,
        "conns_opened": s.conns_opened,
        "conns_closed": s.conns_closed,
        "conns_rejected": s.conns_rejected,
        "frames_in": s.frames_in,
        "frames_queued": s.frames_queued,
        "frames_dropped": s.frames_dropped,
        "slow_consumers_closed": s.slow_consumers_closed,
        "ops_refused": s.ops_refused,
        "messages_rate_limited": s.messages_rate_limited,
        "policy_closed": s.policy_closed,
        "bad_envelopes": s.bad_envelopes,
        "history": {
            "recorded": s.history_recorded,
            "record_failed": s.history_record_failed,
            "recovered": s.history_recovered,
            "not_recovered": s.history_not_recovered,
            "replayed": s.history_replayed,
            "gaps_filled": s.history_gaps_filled,
            "gaps_lost": s.history_gaps_lost,
        },
        "runtime_tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        "backplane": {
            "published": b.published,
            "publish_dropped": b.publish_dropped,
            "received": b.received,
            "receive_dropped": b.receive_dropped,
            "duplicates": b.duplicates,
            "expired": b.expired,
            "reconnects": b.reconnects,
        },
    });
    let mut body = body;
    if let Some(p) = probe {
        body[p.key()] = p.stats();
    }
    (
        [(switchboard::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

/// `GET /metrics`: the node's metrics, with the role's counters.
fn metrics(
    metrics: &Metrics,
    hub: &Hub,
    probe: Option<&dyn Probe>,
) -> ([(switchboard::http::HeaderName, &'static str); 1], String) {
    let role = probe.map(|p| (p.key(), p.stats()));
    let mut extra: Vec<(&str, &serde_json::Value)> = role.iter().map(|(k, v)| (*k, v)).collect();
    // The events sender's counters sit one level down in the app's.
    if let Some((_, v)) = &role
        && let Some(events) = v.get("events")
    {
        extra.push(("events", events));
    }
    (
        [(
            switchboard::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        metrics.render(hub, &extra),
    )
}

/// `GET /ready`: 200 while the node can reach its cluster, 503 with the reason otherwise.
async fn ready(hub: Hub, probe: Option<Arc<dyn Probe>>) -> (switchboard::http::StatusCode, String) {
    if let Some(Err(reason)) = probe.map(|p| p.ready()) {
        return (
            switchboard::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        );
    }
    match hub.cluster_status() {
        switchboard::core::Status::Ready => (switchboard::http::StatusCode::OK, "ready\n".into()),
        switchboard::core::Status::Connecting { reason } => (
            switchboard::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
        other => (
            switchboard::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("{other:?}\n"),
        ),
    }
}

/// Starts every node `cfg` describes: one, or N for `memory:N` (node ids
/// `ID0..`, ports counted up from the configured ones unless those are 0).
pub async fn launch_all(cfg: &ServeConfig) -> anyhow::Result<Vec<Running>> {
    let ClusterUrl::Memory(n) = cfg.cluster else {
        return Ok(vec![launch(cfg, backplane(&cfg.cluster).await?).await?]);
    };
    let bus = switchboard::core::MemoryBus::new();
    // One history for the process's nodes: a stream's positions are the
    // cluster's.
    let history = cfg.history.open().await?;
    let base = cfg
        .node_id
        .as_ref()
        .map_or("n".to_owned(), |n| n.to_string());
    let shift = |addr: &Option<String>, i: usize| -> anyhow::Result<Option<String>> {
        Ok(match addr {
            None => None,
            Some(a) => {
                let mut sa: SocketAddr = a
                    .parse()
                    .with_context(|| format!("memory:N needs IP:PORT addresses, got {a}"))?;
                if sa.port() != 0 {
                    let port = u16::try_from(i)
                        .ok()
                        .and_then(|i| sa.port().checked_add(i))
                        .with_context(|| format!("memory:{n}: no port {i} above {sa}"))?;
                    sa.set_port(port);
                }
                Some(sa.to_string())
            }
        })
    };
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = cfg.clone();
        c.history.store = match &history {
            Some(h) => crate::history::Store::Shared(h.clone()),
            None => crate::history::Store::Off,
        };
        c.node_id = Some(switchboard::NodeId::new(format!("{base}{i}"))?);
        c.ws = shift(&cfg.ws, i)?;
        c.tcp = shift(&cfg.tcp, i)?;
        if let (Some(api), Some(c_api)) = (&cfg.api, &mut c.api) {
            c_api.addr = shift(&Some(api.addr.clone()), i)?.unwrap_or_default();
        }
        nodes.push(launch(&c, Arc::new(bus.backplane())).await?);
    }
    Ok(nodes)
}

/// Binds the listeners of `cfg` and serves the reference application on them
/// through `backplane`, telling the backend of `--events-url` what happens.
pub async fn launch(cfg: &ServeConfig, backplane: Arc<dyn Backplane>) -> anyhow::Result<Running> {
    let Some(events_cfg) = &cfg.events else {
        let app = ReferenceApp::new(cfg.security.clone());
        return launch_app(cfg, backplane, AppSpec::of(app), |b| b).await;
    };
    let (events, runner) = crate::events::Events::new(events_cfg.clone());
    let (presence, tracker, tap) =
        crate::events::presence::Presence::new(events.clone(), backplane);
    let app = ReferenceApp::with_events(cfg.security.clone(), events, presence);
    let mut running = launch_app(cfg, tap, AppSpec::of(app), |b| b).await?;
    let stop = running.background_stop.clone();
    running
        .background
        .push(runner.spawn(running.hub.clone(), stop.clone()));
    running
        .background
        .push(tracker.spawn(running.hub.clone(), stop));
    Ok(running)
}

/// Binds the listeners of `cfg` and serves `app` on them through
/// `backplane`; `tweak` adjusts the hub before it starts.
pub async fn launch_app(
    cfg: &ServeConfig,
    backplane: Arc<dyn Backplane>,
    app: AppSpec,
    tweak: impl FnOnce(switchboard::HubBuilder) -> switchboard::HubBuilder,
) -> anyhow::Result<Running> {
    let AppSpec {
        handler,
        tcp_hello,
        probe,
    } = app;
    let mut builder = Hub::builder()
        .limits(cfg.limits.clone())
        .shutdown_timeout(cfg.shutdown_timeout)
        .backplane_arc(backplane)
        .handler_arc(handler)
        .record(cfg.history.record.iter().cloned());
    if let Some(history) = cfg.history.open().await? {
        builder = builder.history(history);
    }
    if let Some(id) = &cfg.node_id {
        builder = builder.node_id(id.clone());
    }
    let builder = tweak(builder);
    let hub = builder.start().await.context("starting the hub")?;
    let metrics = Metrics::new();
    let mut server = Server::new(hub.clone());
    let mut ws = None;
    if let Some(addr) = &cfg.ws {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the WebSocket listener on {addr}"))?;
        ws = Some(l.local_addr()?);
        let router = ops_router(&hub, probe.as_ref(), &metrics)
            // A browser pointed at the node gets a console connected to it.
            .merge(crate::console::router(
                &crate::console::node_config(hub.node_id(), &cfg.ws_path),
                Some(&cfg.ws_path),
            ));
        server = server.websocket_with(l, &cfg.ws_path, router);
    }
    let mut tcp = None;
    if let Some(addr) = &cfg.tcp {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the TCP listener on {addr}"))?;
        tcp = Some(l.local_addr()?);
        let options = TcpOptions::new(cfg.tcp_framing);
        server = server.tcp(
            l,
            if tcp_hello {
                options.with_hello()
            } else {
                options
            },
        );
    }
    if let Some(files) = &cfg.tls {
        server = server.tls(files.tls.clone());
    }
    let background_stop = CancellationToken::new();
    let mut background = Vec::new();
    let mut api = None;
    if let Some(listen) = &cfg.api {
        let extra = ops_router(&hub, probe.as_ref(), &metrics);
        let (addr, task) =
            crate::api::serve(listen, &hub, extra, Some(&metrics), background_stop.clone()).await?;
        api = Some(addr);
        background.push(task);
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        hub,
        ws,
        tcp,
        api,
        metrics,
        stop,
        task,
        background,
        background_stop,
    })
}
