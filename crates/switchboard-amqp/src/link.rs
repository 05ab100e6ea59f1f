//! The node's connection to the broker and its supervisor.
//!
//! A [`Session`] is one AMQP connection with everything the node set up on it:
//! the exchange, the node's exclusive queue and its fixed bindings, a consumer,
//! a publishing channel in confirm mode and a control channel (bindings,
//! liveness messages). Any task that sees the session fail reports it; the
//! supervisor closes the whole connection (so that the broker drops the queue
//! and its bindings), reconnects with backoff, sets everything up again and
//! bumps the generation number, which is how the other tasks learn that the
//! broker lost their state and that they must rebind.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{AmqpConfig, Mode};
use crate::wire;

/// Deliveries the broker sends ahead of acknowledgements: the bound on what
/// the client buffers for this node.
pub(crate) const PREFETCH: u16 = 1024;
/// How long connecting and setting up may take before the attempt is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed connection may take to close before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// AMQP's reply code for "resource locked": another connection holds the
/// node's exclusive queue.
const RESOURCE_LOCKED: u16 = 405;

/// Names the node uses on the broker.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) exchange: ShortString,
    pub(crate) queue: ShortString,
    pub(crate) node_key: ShortString,
    /// Shown in the broker's connection list, so operators (and tests) can
    /// tell which connection is which node's.
    pub(crate) connection: String,
}

impl Names {
    pub(crate) fn new(cfg: &AmqpConfig, node: &str) -> Self {
        Self {
            exchange: cfg.exchange_name().into(),
            queue: format!("{}.node.{node}", cfg.prefix).into(),
            node_key: wire::node_key(node).into(),
            connection: format!("switchboard {} {node}", cfg.prefix),
        }
    }
}

/// One connection and what was set up on it.
pub(crate) struct Session {
    pub(crate) generation: u64,
    conn: Connection,
    /// Envelopes, with publisher confirms.
    pub(crate) publish: Channel,
    /// Bindings and liveness messages, without confirms.
    pub(crate) control: Channel,
    consumer: Mutex<Option<Consumer>>,
}

impl Session {
    /// The queue's consumer, to the one task that reads it.
    pub(crate) fn take_consumer(&self) -> Option<Consumer> {
        self.consumer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    async fn close(&self) {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, self.conn.close(200, "reconnecting".into())).await;
    }
}

/// Why setting up a session failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The node's queue is held by another live connection: the same node id
    /// in another process, or this node's previous connection, not yet reaped.
    #[error("the node's queue is held by another connection")]
    Locked,
    /// The broker could not be reached, refused, or timed out.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// Setting up took too long.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone)]
pub(crate) struct LinkState {
    pub(crate) session: Option<std::sync::Arc<Session>>,
    pub(crate) generation: u64,
    pub(crate) error: Option<String>,
}

pub(crate) struct Link {
    cfg: AmqpConfig,
    names: Names,
    state: watch::Sender<LinkState>,
    /// A failed session, for the supervisor to close.
    retired: Mutex<Option<std::sync::Arc<Session>>>,
    pub(crate) reconnects: AtomicU64,
}

fn is_locked(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if p.get_id() == RESOURCE_LOCKED)
}

impl Link {
    pub(crate) fn new(cfg: AmqpConfig, names: Names) -> Self {
        let (state, _) = watch::channel(LinkState {
            session: None,
            generation: 0,
            error: Some("not connected yet".into()),
        });
        Self {
            cfg,
            names,
            state,
            retired: Mutex::new(None),
            reconnects: AtomicU64::new(0),
        }
    }

    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    /// Connects and sets up the first session.
    pub(crate) async fn start(&self) -> Result<(), OpenError> {
        let session = self.open(1).await?;
        self.state.send_modify(|s| {
            s.session = Some(std::sync::Arc::new(session));
            s.generation = 1;
            s.error = None;
        });
        Ok(())
    }

    /// Connects and sets up a session numbered `generation`.
    async fn open(&self, generation: u64) -> Result<Session, OpenError> {
        match tokio::time::timeout(SETUP_TIMEOUT, self.setup(generation)).await {
            Ok(r) => r,
            Err(_) => Err(OpenError::Timeout(SETUP_TIMEOUT)),
        }
    }

    async fn setup(&self, generation: u64) -> Result<Session, OpenError> {
        let props = ConnectionProperties::default()
            .with_connection_name(self.names.connection.clone().into());
        let conn = Connection::connect_uri(self.cfg.uri(), props).await?;
        match self.declare(&conn, generation).await {
            Ok((publish, control, consumer)) => Ok(Session {
                generation,
                conn,
                publish,
                control,
                consumer: Mutex::new(Some(consumer)),
            }),
            Err(e) => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "setup failed".into()))
                    .await;
                Err(e)
            }
        }
    }

    /// Declares the exchange and the node's queue, binds it, and opens the
    /// publishing channel and the consumer.
    async fn declare(
        &self,
        conn: &Connection,
        generation: u64,
    ) -> Result<(Channel, Channel, Consumer), OpenError> {
        let n = &self.names;
        let control = conn.create_channel().await?;
        let kind = match self.cfg.mode {
            Mode::Fanout => ExchangeKind::Fanout,
            Mode::Routing => ExchangeKind::Direct,
        };
        // Transient, and deleted with its last binding: a deployment whose
        // nodes are all gone leaves nothing on the broker.
        let exchange = ExchangeDeclareOptions {
            durable: false,
            auto_delete: true,
            ..ExchangeDeclareOptions::default()
        };
        control
            .exchange_declare(n.exchange.clone(), kind, exchange, FieldTable::default())
            .await?;
        // Exclusive: the broker deletes the queue, and its bindings, when this
        // connection closes or dies. Bounded: a full queue refuses new
        // messages, which their senders see (nack) and count.
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongUInt(self.cfg.queue_cap),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let queue = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            durable: false,
            ..QueueDeclareOptions::default()
        };
        if let Err(e) = control.queue_declare(n.queue.clone(), queue, args).await {
            return Err(if is_locked(&e) {
                OpenError::Locked
            } else {
                e.into()
            });
        }
        let keys: &[&str] = match self.cfg.mode {
            Mode::Fanout => &[""],
            Mode::Routing => &[n.node_key.as_str(), wire::BROADCAST_KEY],
        };
        for key in keys {
            control
                .queue_bind(
                    n.queue.clone(),
                    n.exchange.clone(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let consumer = consume
            .basic_consume(
                n.queue.clone(),
                format!("{}-{generation}", n.node_key).into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((publish, control, consumer))
    }

    /// The session, if up.
    pub(crate) fn current(&self) -> Option<std::sync::Arc<Session>> {
        self.state.borrow().session.clone()
    }

    pub(crate) fn state(&self) -> LinkState {
        self.state.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.subscribe()
    }

    /// Waits for a session (or `stop`).
    pub(crate) async fn ready(&self, stop: &CancellationToken) -> Option<std::sync::Arc<Session>> {
        let mut rx = self.state.subscribe();
        tokio::select! {
            () = stop.cancelled() => None,
            r = rx.wait_for(|s| s.session.is_some()) => r.ok()?.session.clone(),
        }
    }

    /// Reports that session `generation` failed: the supervisor replaces it.
    pub(crate) fn failed(&self, generation: u64, why: &dyn std::fmt::Display) {
        self.state.send_if_modified(|s| match &s.session {
            Some(session) if session.generation == generation => {
                tracing::warn!(generation, error = %why, "amqp session lost");
                *self.retired.lock().unwrap_or_else(|p| p.into_inner()) = s.session.take();
                s.error = Some(why.to_string());
                true
            }
            _ => false,
        });
    }

    /// Closes the session for good.
    pub(crate) async fn close(&self) {
        let mut taken = None;
        self.state.send_modify(|s| {
            taken = s.session.take();
            s.error = Some("left the cluster".into());
        });
        if let Some(s) = taken {
            s.close().await;
        }
    }

    /// Replaces failed sessions until `stop`.
    pub(crate) async fn supervise(&self, stop: CancellationToken) {
        let mut rx = self.state.subscribe();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = rx.wait_for(|s| s.session.is_none()) => if r.is_err() { return },
            }
            let retired = self
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(old) = retired {
                // Closing drops the old queue at once, so the new one can take its name.
                old.close().await;
            }
            let mut wait = BACKOFF_MIN;
            loop {
                if stop.is_cancelled() {
                    return;
                }
                let generation = self.state.borrow().generation + 1;
                match self.open(generation).await {
                    Ok(session) => {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.state.send_modify(|s| {
                            s.session = Some(std::sync::Arc::new(session));
                            s.generation = generation;
                            s.error = None;
                        });
                        tracing::info!(generation, "amqp session re-established");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "amqp reconnect failed");
                        self.state.send_modify(|s| s.error = Some(e.to_string()));
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = switchboard_core::backplane::backoff(&mut wait, BACKOFF_MAX) => {}
                        }
                    }
                }
            }
        }
    }
}
