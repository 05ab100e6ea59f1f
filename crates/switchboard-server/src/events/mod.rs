//! Events to the backend (`docs/EVENTS.md`): a node POSTs what its clients
//! do (connect, message, close) and user presence (online, offline) to one
//! backend URL, in batches, signed, retried, and never in a way that can
//! hold up a client or a push.
//!
//! Emitting is a `try_send` on a bounded queue: a full queue drops the event
//! and counts it. One sender task per node drains the queue in order, so
//! events of one connection reach the backend in the order they happened;
//! a batch that fails is retried, with backoff, before the next is sent.

pub mod presence;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::Sha256;
use switchboard::core::ConnId;
use switchboard::http::{Request, StatusCode, Uri, header};
use switchboard::{Frame, Hub, Target};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Secret};

/// Events sent in one request, at most.
pub const MAX_BATCH: usize = 100;
/// Tries per batch before it is dropped.
pub const ATTEMPTS: u32 = 5;
/// The wait before the first retry; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between two tries of one batch.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a stopping node keeps sending what is queued.
pub const DRAIN: Duration = Duration::from_secs(2);
/// The header carrying the body's signature.
pub const SIGNATURE: &str = "x-switchboard-signature";

/// Where events go, and how.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EventsConfig {
    /// The backend's URL (`http://`).
    pub url: Uri,
    /// The HMAC-SHA256 key of the signature header, if any.
    pub secret: Option<Secret>,
    /// Events queued at most.
    pub queue: usize,
    /// How long one request may take.
    pub timeout: Duration,
}

impl EventsConfig {
    /// Checks the URL and the bounds.
    pub fn new(
        url: &str,
        secret: Option<Secret>,
        queue: usize,
        timeout: Duration,
    ) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Auth(format!("--events-url {url:?}: {why}"));
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(bad(
                "use http://HOST:PORT/PATH (a backend on the node's own network; put TLS in front of a remote one)",
            ));
        }
        Ok(Self {
            url: uri,
            secret,
            queue: queue.max(1),
            timeout,
        })
    }
}

/// One event waiting to be sent.
#[derive(Debug)]
struct Event {
    body: Value,
    /// For a `message` event: the connection its actions act on.
    from: Option<ConnId>,
}

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    sent: AtomicU64,
    failed_requests: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_undelivered: AtomicU64,
    actions_failed: AtomicU64,
}

/// The sending end: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Events {
    tx: mpsc::Sender<Event>,
    counters: Arc<Counters>,
}

/// The receiving end, until [`Runner::spawn`] starts the sender task.
#[derive(Debug)]
pub struct Runner {
    cfg: EventsConfig,
    rx: mpsc::Receiver<Event>,
    counters: Arc<Counters>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Events {
    /// The queue; events wait in it until the runner is spawned.
    pub fn new(cfg: EventsConfig) -> (Self, Runner) {
        let (tx, rx) = mpsc::channel(cfg.queue);
        let counters = Arc::new(Counters::default());
        (
            Self {
                tx,
                counters: counters.clone(),
            },
            Runner { cfg, rx, counters },
        )
    }

    fn emit(&self, mut body: Value, from: Option<ConnId>) {
        body["time_ms"] = json!(now_ms());
        match self.tx.try_send(Event { body, from }) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                let n = self
                    .counters
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                // Once per thousand: a dead backend must not flood the log.
                if n.is_multiple_of(1000) {
                    let kind = e.into_inner().body["type"].clone();
                    tracing::warn!(event = %kind, dropped = n + 1, "events queue full: event dropped");
                }
            }
        }
    }

    /// A client was accepted.
    pub fn connect(&self, conn: &ConnId, uid: Option<&str>, transport: &str) {
        self.emit(
            json!({"type": "connect", "conn": conn.to_string(), "uid": uid, "transport": transport}),
            None,
        );
    }

    /// A client sent a frame the application does not handle itself.
    pub fn message(&self, conn: &ConnId, uid: Option<&str>, frame: &Frame) {
        let mut body = json!({"type": "message", "conn": conn.to_string(), "uid": uid});
        match frame.as_text() {
            Some(text) => body["data"] = json!(text),
            None => {
                use base64::Engine as _;
                body["data"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(frame.data()));
                body["binary"] = json!(true);
            }
        }
        self.emit(body, Some(conn.clone()));
    }

    /// A client's connection closed.
    pub fn close(&self, conn: &ConnId, uid: Option<&str>, reason: &str) {
        self.emit(
            json!({"type": "close", "conn": conn.to_string(), "uid": uid, "reason": reason}),
            None,
        );
    }

    /// A user's first connection in the cluster appeared (`online`), or its
    /// last one went (`offline`).
    pub fn presence(&self, uid: &str, online: bool) {
        let kind = if online { "online" } else { "offline" };
        self.emit(json!({"type": kind, "uid": uid}), None);
    }

    /// The counters, for `/stats` and `/metrics`.
    pub fn stats(&self) -> Value {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "queued": g(&c.queued),
            "waiting": self.tx.max_capacity() - self.tx.capacity(),
            "sent": g(&c.sent),
            "failed_requests": g(&c.failed_requests),
            "dropped_queue_full": g(&c.dropped_queue_full),
            "dropped_undelivered": g(&c.dropped_undelivered),
            "actions_failed": g(&c.actions_failed),
        })
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

impl Runner {
    /// Starts sending, on behalf of `hub`, until `stop` is cancelled; then
    /// sends what is queued for at most [`DRAIN`].
    pub fn spawn(self, hub: Hub, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(self.run(hub, stop))
    }

    async fn run(mut self, hub: Hub, stop: CancellationToken) {
        // Keep-alive connections to the backend: one connect per burst, not
        // per batch.
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                n = self.rx.recv_many(&mut batch, MAX_BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
            }
            self.deliver(&client, &hub, &mut batch, Some(&stop)).await;
        }
        let deadline = tokio::time::Instant::now() + DRAIN;
        let drain = async {
            while self.rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                self.deliver(&client, &hub, &mut batch, None).await;
            }
        };
        let _ = tokio::time::timeout_at(deadline, drain).await;
    }

    /// Sends one batch, retrying with backoff; `stop` cuts the retries short.
    async fn deliver(
        &self,
        client: &HttpClient,
        hub: &Hub,
        batch: &mut Vec<Event>,
        stop: Option<&CancellationToken>,
    ) {
        let node = hub.node_id().as_str();
        for e in batch.iter_mut() {
            e.body["node"] = json!(node);
        }
        let events: Vec<&Value> = batch.iter().map(|e| &e.body).collect();
        let body = Bytes::from(
            json!({ "node": node, "events": events })
                .to_string()
                .into_bytes(),
        );
        let signature = self.cfg.secret.as_ref().map(|s| sign(s, &body));
        let mut wait = FIRST_BACKOFF;
        let mut answer = None;
        for attempt in 1..=ATTEMPTS {
            match self.post(client, body.clone(), signature.as_deref()).await {
                Ok(a) => {
                    answer = Some(a);
                    break;
                }
                Err(why) => {
                    self.counters
                        .failed_requests
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        url = %self.cfg.url, attempt, events = batch.len(), %why,
                        "the events backend did not take a batch"
                    );
                    if attempt == ATTEMPTS || stop.is_some_and(CancellationToken::is_cancelled) {
                        break;
                    }
                    let sleep = tokio::time::sleep(wait);
                    match stop {
                        Some(stop) => tokio::select! {
                            () = sleep => {}
                            () = stop.cancelled() => {}
                        },
                        None => sleep.await,
                    }
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
        let Some(answer) = answer else {
            self.counters
                .dropped_undelivered
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::error!(url = %self.cfg.url, events = batch.len(), "events dropped: the backend did not take them");
            batch.clear();
            return;
        };
        self.counters
            .sent
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let results = answer.get("results").and_then(Value::as_array);
        for (i, event) in batch.drain(..).enumerate() {
            let (Some(conn), Some(r)) = (event.from, results.and_then(|r| r.get(i))) else {
                continue;
            };
            if !act(hub, &conn, r).await {
                self.counters.actions_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One POST; the backend's JSON answer (`null` when it sent none) on 2xx.
    async fn post(
        &self,
        client: &HttpClient,
        body: Bytes,
        signature: Option<&str>,
    ) -> Result<Value, String> {
        let mut req = Request::post(self.cfg.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "switchboard");
        if let Some(s) = signature {
            req = req.header(SIGNATURE, s);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            // An answer bigger than this is not a list of actions.
            let body = http_body_util::Limited::new(resp.into_body(), 1024 * 1024)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("status {status}"));
            }
            Ok(if body.is_empty() || status == StatusCode::NO_CONTENT {
                Value::Null
            } else {
                serde_json::from_slice(&body).unwrap_or(Value::Null)
            })
        };
        tokio::time::timeout(self.cfg.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {:?}", self.cfg.timeout))?
    }
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Runs the actions the backend answered a `message` event with, in this
/// order: `join` and `leave` (so that a push to a group just joined reaches
/// the sender), `reply`, `push`, then `close` (after what it sent is queued).
/// Returns whether every one succeeded.
async fn act(hub: &Hub, conn: &ConnId, r: &Value) -> bool {
    let mut ok = true;
    let names = |key: &str| -> Vec<String> {
        r.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    for g in names("join") {
        ok &= hub.join(conn, g).await.is_ok();
    }
    for g in names("leave") {
        ok &= hub.leave(conn, g).await.is_ok();
    }
    if let Some(text) = r.get("reply").and_then(Value::as_str) {
        ok &= hub.to_conn(conn, Frame::text(text)).is_ok();
    }
    if let Some(pushes) = r.get("push").and_then(Value::as_array) {
        for p in pushes {
            ok &= crate::api::methods::call(hub, "push", p.clone())
                .await
                .is_ok();
        }
    }
    if let Some(reason) = r.get("close").and_then(Value::as_str) {
        hub.close(&Target::conn(conn.clone()), reason);
    }
    ok
}

#[cfg(test)]
mod tests;
