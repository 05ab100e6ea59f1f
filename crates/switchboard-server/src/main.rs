//! `switchboard`: serve the reference application.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use switchboard_server::config::{ServeArgs, ServeConfig};
use switchboard_server::demo::{self, DemoArgs};
use switchboard_server::node;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Distributed long-lived connections: WebSocket and TCP push, on any node of a cluster."
)]
struct Cli {
    /// Runtime threads: 1 runs everything on one thread (no cross-thread
    /// wake-ups; scale by running more processes, as GatewayWorker does), N a
    /// pool of N. Default: 1 for register, gateway and worker; one per core
    /// otherwise.
    #[arg(long, global = true, env = "SWITCHBOARD_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the reference application (docs/CLIENT-PROTOCOL.md) over WebSocket and TCP.
    Serve(Box<ServeArgs>),
    /// Two nodes on loopback and a web page to try them from (http://127.0.0.1:8080).
    Demo(DemoArgs),
    /// Gateway topology: the register, where gateways and workers meet.
    Register(switchboard_server::roles::RegisterArgs),
    /// Gateway topology: hold client sockets and forward their events to workers.
    Gateway(Box<switchboard_server::roles::GatewayArgs>),
    /// Gateway topology: run the reference application for the gateways' clients.
    Worker(switchboard_server::roles::WorkerArgs),
    /// Push to, or ask about, the clients of a gateway cluster from outside.
    Push(switchboard_server::roles::PushArgs),
    /// Load-test a server that speaks docs/CLIENT-PROTOCOL.md (this one or a peer).
    Bench(switchboard_server::bench::BenchArgs),
    /// Mint a development token (HS256) for a node started with --jwt-secret.
    Token(switchboard_server::token::TokenArgs),
    /// Internal: one worker process of `bench`.
    #[command(hide = true)]
    BenchWorker,
}

/// jemalloc rather than the system allocator: every connection's task is a
/// 128-byte-aligned allocation (tokio pads its task cells to a cache line
/// pair), which glibc serves with tens of bytes of padding and leaves
/// fragmented as handshake buffers come and go; jemalloc's size classes fit
/// it exactly. idle10k measures about 1.8 KB per connection instead of 2.0.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let role = matches!(
        cli.command,
        Command::Register(_) | Command::Gateway(_) | Command::Worker(_)
    );
    let threads = cli.threads.unwrap_or(if role { 1 } else { 0 });
    let rt = match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build()?,
    };
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(*args)),
        Command::Demo(args) => rt.block_on(run_demo(args)),
        Command::Register(args) => rt.block_on(async {
            let stop = shutdown_signal()?;
            switchboard_server::roles::register(args, stop).await
        }),
        Command::Gateway(args) => rt.block_on(async {
            let stop = shutdown_signal()?;
            switchboard_server::roles::gateway(*args, stop).await
        }),
        Command::Worker(args) => rt.block_on(async {
            let stop = shutdown_signal()?;
            switchboard_server::roles::worker(args, stop).await
        }),
        Command::Push(args) => rt.block_on(switchboard_server::roles::push(args)),
        Command::Token(args) => {
            #[allow(clippy::print_stdout)]
            {
                println!("{}", switchboard_server::token::mint(&args)?);
            }
            Ok(())
        }
        Command::Bench(args) => rt.block_on(switchboard_server::bench::run(args)),
        Command::BenchWorker => {
            // One thread: workers are many processes sharing two cores.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(switchboard_server::bench::worker::run())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = ServeConfig::load(args)?;
    if cfg.development {
        tracing::warn!(
            "development mode: no authentication (set --jwt-secret or --jwt-public-key); clients \
             name their own uid with ?uid= and may do anything, and only loopback addresses are served"
        );
    } else if !cfg.security.authenticates() {
        tracing::warn!(
            "--insecure: no authentication; anyone who reaches this node may connect as any \
             uid and push to everyone"
        );
    }
    // Signal handlers are installed before the addresses are printed: whoever
    // reads them may signal at once, and must get a graceful stop.
    let signal = shutdown_signal()?;
    let mut hangups = Hangups::new()?;
    let nodes = node::launch_all(&cfg).await?;
    let tls = cfg.tls.is_some();
    for running in &nodes {
        let id = running.hub.node_id().to_string();
        let ws = running.ws.map(|a| (a, tls));
        print_node(&id, &cfg.cluster.to_string(), ws, &cfg.ws_path);
        if let Some(a) = running.ws {
            let scheme = if tls { "https" } else { "http" };
            print_address("console", &format!("{scheme}://{a}/"));
        }
        if let Some(a) = running.api {
            print_address("api", &format!("http://{a}/api/"));
        }
        if let Some(a) = running.tcp {
            let over = if tls { ", TLS" } else { "" };
            print_address(
                "tcp",
                &format!("tcp://{a} ({} framing{over})", cfg.tcp_framing),
            );
        }
    }
    let mut signal = std::pin::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            () = hangups.next() => {
                node::reload_tls(&cfg);
            }
        }
    }
    tracing::info!("signal received, stopping");
    for running in nodes {
        running.shutdown().await;
    }
    Ok(())
}

async fn run_demo(args: DemoArgs) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    let demo = demo::start(&args).await?;
    for e in &demo.topology.endpoints {
        print_node(
            &e.node,
            &demo.topology.cluster,
            Some((e.ws, false)),
            &e.path,
        );
    }
    let page = format!("http://{}/", demo.page);
    #[allow(clippy::print_stdout)]
    {
        println!("switchboard demo");
    }
    // Last: whoever reads the output knows every address once it sees this line.
    print_address("page", &page);
    tracing::info!(%page, "demo ready: open the page in a browser; Ctrl-C stops");
    signal.await;
    tracing::info!("signal received, stopping");
    demo.shutdown().await;
    Ok(())
}

/// The heading of a node in the start-up output, and its WebSocket address
/// (and whether it speaks TLS). Tests and scripts read these lines to learn
/// the ports.
fn print_node(id: &str, cluster: &str, ws: Option<(SocketAddr, bool)>, ws_path: &str) {
    #[allow(clippy::print_stdout)]
    {
        println!("switchboard node {id} ({cluster} cluster)");
    }
    if let Some((a, tls)) = ws {
        let scheme = if tls { "wss" } else { "ws" };
        print_address("websocket", &format!("{scheme}://{a}{ws_path}"));
    }
}

/// One indented `name  address` line of the start-up output.
#[allow(clippy::print_stdout)]
fn print_address(name: &str, address: &str) {
    println!("  {name:<10} {address}");
}

/// SIGHUP, the usual "read your files again", as a stream of notices; none
/// where there is no SIGHUP. Installed whether or not TLS is on, so that a
/// stray SIGHUP never stops a node without its graceful close.
struct Hangups {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Hangups {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
        })
    }

    /// The next SIGHUP.
    async fn next(&mut self) {
        #[cfg(unix)]
        if self.signal.recv().await.is_some() {
            return;
        }
        std::future::pending::<()>().await;
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are registered when this is
/// called, not when the future is first polled.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
