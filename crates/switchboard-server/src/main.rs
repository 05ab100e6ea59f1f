//! `switchboard`: serve the reference application.

use clap::{Parser, Subcommand};
use switchboard_server::config::{ServeArgs, ServeConfig};
use switchboard_server::node;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Distributed long-lived connections: WebSocket and TCP push, on any node of a cluster."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the reference application (bench/CONTRACT.md) over WebSocket and TCP.
    Serve(Box<ServeArgs>),
    /// Load-test a server that speaks bench/CONTRACT.md (this one or a peer).
    Bench(switchboard_server::bench::BenchArgs),
    /// Internal: one worker process of `bench`.
    #[command(hide = true)]
    BenchWorker,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(*args)),
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
    // Signal handlers are installed before the addresses are printed: whoever
    // reads them may signal at once, and must get a graceful stop.
    let signal = shutdown_signal()?;
    let nodes = node::launch_all(&cfg).await?;
    #[allow(clippy::print_stdout)]
    for running in &nodes {
        println!(
            "switchboard node {} ({} cluster)",
            running.hub.node_id(),
            cfg.cluster
        );
        if let Some(a) = running.ws {
            println!("  websocket  ws://{a}{}", cfg.ws_path);
        }
        if let Some(a) = running.tcp {
            println!("  tcp        tcp://{a} ({} framing)", cfg.tcp_framing);
        }
    }
    signal.await;
    tracing::info!("signal received, stopping");
    for running in nodes {
        running.shutdown().await;
    }
    Ok(())
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
