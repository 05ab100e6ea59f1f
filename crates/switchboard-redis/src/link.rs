//! The shared Redis connection and its supervisor.
//!
//! Commands go through one multiplexed connection. A task whose command fails
//! with a connection error reports it; the supervisor reconnects with
//! exponential backoff and bumps a generation number, which is how the other
//! tasks learn that Redis may have lost their state (a restart) and that they
//! must resubscribe or rewrite it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Commands that take longer than this are treated as a dead connection.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct LinkState {
    pub(crate) conn: Option<MultiplexedConnection>,
    pub(crate) generation: u64,
    pub(crate) error: Option<String>,
}

pub(crate) struct Link {
    pub(crate) client: Client,
    state: watch::Sender<LinkState>,
    pub(crate) reconnects: AtomicU64,
    /// When the connection was last re-established (ms since the epoch, 0 never).
    reconnected_at: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether an error means the connection is gone (as opposed to a bad command).
pub(crate) fn is_link_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

pub(crate) fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// Waits `wait` (with jitter), then doubles it up to the maximum.
pub(crate) async fn backoff(wait: &mut Duration) {
    switchboard_core::backplane::backoff(wait, BACKOFF_MAX).await;
}

impl Link {
    /// Connects once; fails if Redis cannot be reached now.
    pub(crate) async fn connect(client: Client) -> Result<Self, RedisError> {
        let conn = client
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await?;
        let (state, _) = watch::channel(LinkState {
            conn: Some(conn),
            generation: 1,
            error: None,
        });
        Ok(Self {
            client,
            state,
            reconnects: AtomicU64::new(0),
            reconnected_at: AtomicU64::new(0),
        })
    }

    /// Whether the connection was re-established less than `window` ago: Redis
    /// may have restarted empty, and peers may not have rebuilt their
    /// directory entries yet.
    pub(crate) fn recently_reconnected(&self, window: Duration) -> bool {
        let at = self.reconnected_at.load(Ordering::Relaxed);
        at != 0 && now_ms().saturating_sub(at) < window.as_millis() as u64
    }

    /// The connection, if up, with its generation.
    pub(crate) fn current(&self) -> Option<(MultiplexedConnection, u64)> {
        let s = self.state.borrow();
        s.conn.clone().map(|c| (c, s.generation))
    }

    pub(crate) fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// Waits for a connection (or `stop`).
    pub(crate) async fn ready(
        &self,
        stop: &CancellationToken,
    ) -> Option<(MultiplexedConnection, u64)> {
        let mut rx = self.state.subscribe();
        tokio::select! {
            () = stop.cancelled() => None,
            r = rx.wait_for(|s| s.conn.is_some()) => {
                let s = r.ok()?;
                s.conn.clone().map(|c| (c, s.generation))
            }
        }
    }

    /// Reports that a command on generation `generation` failed. Connection
    /// errors hand the link to the supervisor; other errors are the caller's.
    pub(crate) fn failed(&self, generation: u64, e: &RedisError) {
        if !is_link_error(e) {
            return;
        }
        self.state.send_if_modified(|s| {
            if s.generation == generation && s.conn.is_some() {
                tracing::warn!(error = %e, "redis connection lost");
                s.conn = None;
                s.error = Some(e.to_string());
                true
            } else {
                false
            }
        });
    }

    /// Reconnects whenever the connection is reported lost, until `stop`.
    pub(crate) async fn supervise(&self, stop: CancellationToken) {
        let mut rx = self.state.subscribe();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = rx.wait_for(|s| s.conn.is_none()) => if r.is_err() { return },
            }
            let mut wait = BACKOFF_MIN;
            loop {
                if stop.is_cancelled() {
                    return;
                }
                match self
                    .client
                    .get_multiplexed_async_connection_with_config(&connection_config())
                    .await
                {
                    Ok(conn) => {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.reconnected_at.store(now_ms(), Ordering::Relaxed);
                        self.state.send_modify(|s| {
                            s.conn = Some(conn);
                            s.generation += 1;
                            s.error = None;
                        });
                        tracing::info!("redis connection re-established");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "redis reconnect failed");
                        self.state.send_modify(|s| s.error = Some(e.to_string()));
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = backoff(&mut wait) => {}
                        }
                    }
                }
            }
        }
    }
}
