//! The gateway topology's three roles and the outside pusher, as
//! subcommands: `register`, `gateway`, `worker`, `push`.
//!
//! Flags follow GatewayWorker's settings (`lanIp`, `startPort`, `secretKey`,
//! `pingInterval`, `pingNotResponseLimit`, `pingData`), so a deployment maps
//! one to one. Every flag can also be set through its `SWITCHBOARD_*`
//! environment variable.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use switchboard::core::{ConnId, Framing};
use switchboard::{Limits, Standalone};
use switchboard_gateway::{Gateway, GatewayConfig, Pusher, Worker, WorkerConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::ReferenceApp;
use crate::config::{ApiListen, Secret, ServeConfig, jwt_verifier, split_list};
use crate::node;
use crate::security::Security;

/// `switchboard register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Listen address.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:1236")]
    pub listen: String,
    /// Shared secret of register, gateways and workers.
    #[arg(long, env = "SWITCHBOARD_SECRET", default_value = "")]
    pub secret: String,
    /// Listen on a non-loopback address without a secret.
    #[arg(long, env = "SWITCHBOARD_INSECURE")]
    pub insecure: bool,
}

/// `switchboard gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The register's address.
    #[arg(long, env = "SWITCHBOARD_REGISTER", default_value = "127.0.0.1:1236")]
    pub register: String,
    /// WebSocket listen address for clients.
    #[arg(long, env = "SWITCHBOARD_WS")]
    pub ws: Option<String>,
    /// WebSocket path.
    #[arg(long, env = "SWITCHBOARD_WS_PATH", default_value = "/ws")]
    pub ws_path: String,
    /// Raw TCP listen address for clients.
    #[arg(long, env = "SWITCHBOARD_TCP")]
    pub tcp: Option<String>,
    /// TCP framing: `line` or `length`.
    #[arg(long, env = "SWITCHBOARD_FRAMING", default_value = "line")]
    pub framing: Framing,
    /// Whether a TCP client's first line is its hello (handed to the worker
    /// with the connection); otherwise every line is a message.
    #[arg(long, env = "SWITCHBOARD_TCP_HELLO", default_value_t = true, action = clap::ArgAction::Set)]
    pub tcp_hello: bool,
    /// The IPv4 address workers reach this gateway at (GatewayWorker `lanIp`).
    #[arg(long, env = "SWITCHBOARD_LAN_IP", default_value = "127.0.0.1")]
    pub lan_ip: Ipv4Addr,
    /// The inner port workers connect to (GatewayWorker `startPort`; 0: any).
    #[arg(long, env = "SWITCHBOARD_START_PORT", default_value_t = 2900)]
    pub start_port: u16,
    /// Shared secret.
    #[arg(long, env = "SWITCHBOARD_SECRET", default_value = "")]
    pub secret: String,
    /// Seconds between heartbeats to clients (WebSocket pings; `--ping-data` on TCP).
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL", default_value_t = 25.0)]
    pub ping_interval: f64,
    /// Close a client silent for this many intervals (0: never).
    #[arg(long, env = "SWITCHBOARD_PING_LIMIT", default_value_t = 0)]
    pub ping_limit: u32,
    /// Sent to TCP clients every interval.
    #[arg(long, env = "SWITCHBOARD_PING_DATA")]
    pub ping_data: Option<String>,
    /// Seconds client events wait for a worker when none is attached.
    #[arg(long, env = "SWITCHBOARD_HOLD_TIME", default_value_t = 30.0)]
    pub hold_time: f64,
    /// Serve clients on non-loopback addresses though the reference worker
    /// does not authenticate them, or open the inner port beyond loopback
    /// without a secret.
    #[arg(long, env = "SWITCHBOARD_INSECURE")]
    pub insecure: bool,
}

/// Refuses an address reachable from other hosts where nothing
/// authenticates, unless the operator said `--insecure`.
fn exposed(what: &str, addr: &str, guarded: bool, insecure: bool) -> anyhow::Result<()> {
    if guarded || insecure || crate::security::is_loopback(addr) {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve {what} on {addr}: nothing authenticates who connects there. {}",
        match what {
            "clients" => concat!(
                "A gateway cannot tell whether its workers authenticate clients: once they do ",
                "(switchboard worker --jwt-secret, or your own worker's onConnect), pass ",
                "--insecure, or listen on a loopback address"
            ),
            _ => concat!(
                "Set --secret (SWITCHBOARD_SECRET) on the register, gateways and workers, ",
                "or pass --insecure"
            ),
        }
    )
}

/// `switchboard worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The register's address.
    #[arg(long, env = "SWITCHBOARD_REGISTER", default_value = "127.0.0.1:1236")]
    pub register: String,
    /// Shared secret.
    #[arg(long, env = "SWITCHBOARD_SECRET", default_value = "")]
    pub secret: String,
    /// This worker's key among the workers of its host (default: from the pid).
    #[arg(long, env = "SWITCHBOARD_WORKER_KEY")]
    pub key: Option<String>,
    /// Authenticate the gateways' clients by JWT signed with this HS256
    /// secret, as `serve --jwt-secret` does (docs/SECURITY.md).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// Authenticate them by JWT verified with this PEM public key (RS256 or ES256).
    #[arg(long, env = "SWITCHBOARD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,
    /// Permissions every authenticated client has, comma-separated rules, as
    /// `serve --can`.
    #[arg(long, env = "SWITCHBOARD_CAN")]
    pub can: Option<String>,
    /// Serve the server API for the whole topology on this address, as
    /// `serve --api` does (docs/SERVER-API.md).
    #[arg(long, env = "SWITCHBOARD_API")]
    pub api: Option<String>,
    /// The key every API request carries as `Authorization: apikey KEY`.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// Serve the API on a non-loopback address without a key.
    #[arg(long, env = "SWITCHBOARD_INSECURE")]
    pub insecure: bool,
    /// Keep recorded pushes in this Redis (redis://HOST:PORT[?prefix=P]),
    /// shared by every worker of the topology; off when unset. Clients get
    /// recorded pushes with their positions, and backends read streams with
    /// the API's history method; gateways do not replay them on reconnect.
    #[arg(long, env = "SWITCHBOARD_HISTORY")]
    pub history: Option<String>,
    /// Entries kept per stream, as `serve --history-size`.
    #[arg(long, env = "SWITCHBOARD_HISTORY_SIZE", default_value_t = 100)]
    pub history_size: usize,
    /// Seconds an entry is kept, as `serve --history-ttl`.
    #[arg(long, env = "SWITCHBOARD_HISTORY_TTL", default_value_t = 300)]
    pub history_ttl: u64,
    /// Streams recorded without asking, as `serve --history-record`.
    #[arg(long, env = "SWITCHBOARD_HISTORY_RECORD")]
    pub history_record: Option<String>,
}

/// `switchboard push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The register's address.
    #[arg(long, env = "SWITCHBOARD_REGISTER", default_value = "127.0.0.1:1236")]
    pub register: String,
    /// Shared secret.
    #[arg(long, env = "SWITCHBOARD_SECRET", default_value = "")]
    pub secret: String,
    /// What to do.
    #[command(subcommand)]
    pub what: PushWhat,
}

/// A push or a question.
#[derive(Debug, Subcommand)]
pub enum PushWhat {
    /// Push DATA to every connection of a user.
    ToUser {
        /// The user.
        uid: String,
        /// The data.
        data: String,
    },
    /// Push DATA to every member of a group.
    ToGroup {
        /// The group.
        group: String,
        /// The data.
        data: String,
    },
    /// Push DATA to every connection.
    ToAll {
        /// The data.
        data: String,
    },
    /// Push DATA to one connection (its 20-hex-digit id).
    ToConn {
        /// The connection id.
        conn: String,
        /// The data.
        data: String,
    },
    /// Whether a user is online anywhere.
    Online {
        /// The user.
        uid: String,
    },
    /// How many connections a group has.
    GroupCount {
        /// The group.
        group: String,
    },
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).context("a duration in seconds must be positive and finite")
}

/// Runs a register until `stop` resolves.
pub async fn register(args: RegisterArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    exposed(
        "the register",
        &args.listen,
        !args.secret.is_empty(),
        args.insecure,
    )?;
    let l = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding the register on {}", args.listen))?;
    #[allow(clippy::print_stdout)]
    {
        println!("switchboard register tcp://{}", l.local_addr()?);
    }
    let token = CancellationToken::new();
    let task = tokio::spawn(switchboard_gateway::register::serve(
        l,
        args.secret,
        token.clone(),
    ));
    stop.await;
    token.cancel();
    let _ = task.await;
    Ok(())
}

/// A gateway's part of `/stats` and `/ready`: ready once a worker is attached.
struct GatewayProbe(Gateway);

impl node::Probe for GatewayProbe {
    fn stats(&self) -> serde_json::Value {
        let s = self.0.stats();
        serde_json::json!({
            "gateway": self.0.node_id().as_str(),
            "workers": s.workers,
            "held_now": s.held_now,
            "held_total": s.held_total,
            "expired": s.expired,
            "overflowed": s.overflowed,
            "rejected_inner": s.rejected_inner,
            "commands": s.commands,
            "replaced": s.replaced,
        })
    }

    fn ready(&self) -> Result<(), String> {
        if self.0.stats().workers == 0 {
            return Err("no worker attached (client events are held)".into());
        }
        Ok(())
    }
}

/// Runs a gateway until `stop` resolves.
pub async fn gateway(args: GatewayArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.ws.is_some() || args.tcp.is_some(),
        "a gateway needs --ws ADDR or --tcp ADDR (or both)"
    );
    for addr in args.ws.iter().chain(args.tcp.iter()) {
        exposed("clients", addr, false, args.insecure)?;
    }
    let inner_addr = format!("{}:{}", args.lan_ip, args.start_port);
    exposed(
        "the inner port",
        &inner_addr,
        !args.secret.is_empty(),
        args.insecure,
    )?;
    let inner = TcpListener::bind((args.lan_ip, args.start_port))
        .await
        .with_context(|| format!("binding the inner port {}:{}", args.lan_ip, args.start_port))?;
    let lan_port = inner.local_addr()?.port();
    let gw = Gateway::new(
        GatewayConfig::new(args.lan_ip, lan_port, args.register.clone())
            .secret(args.secret)
            .hold_time(secs(args.hold_time)?),
    );
    let interval = secs(args.ping_interval)?;
    let mut limits = Limits::default();
    limits.heartbeat = interval;
    let idle = (args.ping_limit > 0).then(|| interval * args.ping_limit);
    limits.ws_idle_timeout = idle;
    limits.tcp_idle_timeout = idle;
    limits.tcp_ping = args.ping_data.map(bytes::Bytes::from);
    let cfg = ServeConfig {
        node_id: Some(gw.node_id()),
        ws: args.ws,
        ws_path: args.ws_path,
        tcp: args.tcp,
        tcp_framing: args.framing,
        limits,
        // A gateway only relays: what is recorded is recorded by the worker.
        history: crate::history::HistoryConfig::off(),
        ..ServeConfig::default()
    };
    let app = node::AppSpec {
        handler: gw.handler(),
        tcp_hello: args.tcp_hello,
        probe: Some(Arc::new(GatewayProbe(gw.clone()))),
    };
    let running =
        node::launch_app(&cfg, Arc::new(Standalone), app, |b| b.first_conn_seq(1)).await?;
    let client_port = running
        .ws
        .or(running.tcp)
        .map_or(0, |a: SocketAddr| a.port());
    gw.set_client_port(client_port);
    let token = CancellationToken::new();
    let inner_task = tokio::spawn({
        let gw = gw.clone();
        let hub = running.hub.clone();
        let token = token.clone();
        async move { gw.run(hub, inner, token).await }
    });
    #[allow(clippy::print_stdout)]
    {
        println!(
            "switchboard node {} (gateway, register {})",
            gw.node_id(),
            args.register
        );
        if let Some(a) = running.ws {
            println!("  websocket  ws://{a}{}", cfg.ws_path);
        }
        if let Some(a) = running.tcp {
            println!("  tcp        tcp://{a} ({} framing)", cfg.tcp_framing);
        }
        println!("  inner      gateway://{}:{lan_port}", args.lan_ip);
    }
    stop.await;
    tracing::info!("signal received, stopping");
    // Clients first, so their close events still reach the workers.
    running.shutdown().await;
    token.cancel();
    let _ = inner_task.await;
    Ok(())
}

/// Runs a worker with the reference application until `stop` resolves, then
/// drains it.
pub async fn worker(args: WorkerArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut cfg = WorkerConfig::new(args.register.clone()).secret(args.secret);
    if let Some(k) = args.key {
        cfg = cfg.key(k);
    }
    let mut security = Security::open();
    if let Some(jwt) = jwt_verifier(args.jwt_secret.as_ref(), args.jwt_public_key.as_deref())? {
        security.jwt = Some(Arc::new(jwt));
        security.can =
            switchboard::auth::Permissions::parse(split_list(args.can.as_deref().unwrap_or("")))
                .map_err(|e| anyhow::anyhow!("--can: {e}"))?;
    } else if args.can.is_some() {
        anyhow::bail!(
            "--can is set but clients are not authenticated (set --jwt-secret or --jwt-public-key)"
        );
    }
    let api = match args.api {
        Some(addr) => Some(ApiListen::new(addr, args.api_key, args.insecure)?),
        None if args.api_key.is_some() => anyhow::bail!("--api-key is set but --api is not"),
        None => None,
    };
    // Off unless named: workers share nothing but what they name, so memory
    // (each worker's own positions) is refused.
    let history = crate::history::HistoryConfig::parse(
        args.history.as_deref(),
        args.history_size,
        args.history_ttl,
        args.history_record.as_deref(),
        crate::history::Store::Off,
        false,
    )?;
    let store = history.open().await?;
    let worker = Worker::start_with(cfg, Arc::new(ReferenceApp::new(security)), |b| {
        let b = b.record(history.record.iter().cloned());
        match store {
            Some(s) => b.history(s),
            None => b,
        }
    })
    .await
    .context("starting the worker")?;
    let stop_api = CancellationToken::new();
    let (api_addr, api_task) = match &api {
        None => (None, None),
        Some(listen) => {
            // The worker's own counters: its hub's, and what the API observes.
            let metrics = crate::metrics::Metrics::new();
            let extra = node::ops_router(worker.hub(), None, &metrics);
            let (a, t) = crate::api::serve(
                listen,
                worker.hub(),
                extra,
                Some(&metrics),
                stop_api.clone(),
            )
            .await?;
            (Some(a), Some(t))
        }
    };
    #[allow(clippy::print_stdout)]
    {
        println!(
            "switchboard worker {} (register {})",
            worker.hub().node_id(),
            args.register
        );
        if let Some(a) = api_addr {
            println!("  api        http://{a}/api/");
        }
    }
    stop.await;
    tracing::info!("signal received, draining");
    stop_api.cancel();
    if let Some(t) = api_task {
        let _ = t.await;
    }
    worker.shutdown().await;
    Ok(())
}

/// Runs one push or query and prints its result as one JSON line.
pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let p = Pusher::new(args.register).secret(args.secret);
    let missing = |m: &[switchboard::NodeId]| m.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let out = match args.what {
        PushWhat::ToUser { uid, data } => {
            let a = p.to_users(&[uid.as_str()], data).await?;
            serde_json::json!({"gateways": a.value, "missing": missing(&a.missing)})
        }
        PushWhat::ToGroup { group, data } => {
            let a = p.to_group(&group, data).await?;
            serde_json::json!({"gateways": a.value, "missing": missing(&a.missing)})
        }
        PushWhat::ToAll { data } => {
            let a = p.to_all(data).await?;
            serde_json::json!({"gateways": a.value, "missing": missing(&a.missing)})
        }
        PushWhat::ToConn { conn, data } => {
            let id: ConnId = conn.parse()?;
            serde_json::json!({"sent": p.to_conn(&id, data).await?})
        }
        PushWhat::Online { uid } => {
            let a = p.is_online(&uid).await?;
            serde_json::json!({"uid": uid, "online": a.value, "missing": missing(&a.missing)})
        }
        PushWhat::GroupCount { group } => {
            let a = p.group_count(&group).await?;
            serde_json::json!({"group": group, "count": a.value, "missing": missing(&a.missing)})
        }
    };
    #[allow(clippy::print_stdout)]
    {
        println!("{out}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposed_roles_need_a_secret_or_insecure() {
        assert!(exposed("the register", "127.0.0.1:1236", false, false).is_ok());
        let e = exposed("the register", "0.0.0.0:1236", false, false).unwrap_err();
        assert!(e.to_string().contains("--secret"), "{e}");
        assert!(exposed("the register", "0.0.0.0:1236", true, false).is_ok());
        assert!(exposed("the register", "0.0.0.0:1236", false, true).is_ok());
        let e = exposed("clients", "10.0.0.1:9001", false, false).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
    }

    #[tokio::test]
    async fn a_register_on_every_address_without_a_secret_does_not_start() {
        let args = RegisterArgs {
            listen: "0.0.0.0:0".into(),
            secret: String::new(),
            insecure: false,
        };
        let e = register(args, std::future::ready(())).await.unwrap_err();
        assert!(
            e.to_string().starts_with("refusing to serve the register"),
            "{e}"
        );
    }
}
