//! The server API: the whole [`Hub`] over HTTP, for backends in any language
//! (`docs/SERVER-API.md`).
//!
//! `POST /api/<method>` with a JSON object, answered `{"result": ...}` or
//! `{"error": {"code", "message"}}`. Requests carry `Authorization: apikey KEY`
//! when the node has a key. The methods themselves are in [`methods`]; this
//! module is the HTTP shell around them.

pub mod methods;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use switchboard::http::{HeaderValue, Method, StatusCode, header};
use switchboard::{Hub, OpError};

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ApiListen, Secret};

/// The largest request body the API reads. A push of a whole 64 KiB message
/// in base64 fits with room to spare; a bigger body is refused with 413
/// before it is buffered.
pub const MAX_BODY: usize = 1024 * 1024;

/// The OpenAPI 3.1 document of every method, served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Called once per API request with the method (one of
/// [`methods::METHODS`], or `"unknown"`), the status, and the time taken.
pub type Observer = Arc<dyn Fn(&'static str, u16, Duration) + Send + Sync>;

/// A request the API refuses, with the HTTP status and the stable code a
/// backend can match on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A body or a parameter that is not what the method takes.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A method the API does not have.
    pub fn unknown_method(method: &str) -> Self {
        let mut shown: String = method.chars().take(64).collect();
        if shown.len() < method.len() {
            shown.push('…');
        }
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_method",
            format!(
                "no method {shown:?}; the methods are {}",
                methods::METHODS.join(", ")
            ),
        )
    }

    /// The connection does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The node cannot do it now (its history store is down); the backend
    /// may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The node keeps no history.
    pub fn no_history(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "no_history", message)
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// `{"error": {"code", "message"}}`.
    pub fn body(&self) -> Value {
        json!({ "error": { "code": self.code, "message": self.message } })
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        match &e {
            OpError::NoSuchConn(_) => Self::not_found(e.to_string()),
            OpError::Refused(_) => Self::new(StatusCode::CONFLICT, "refused", e.to_string()),
            // Unreachable, Timeout, Remote, and whatever a later version adds:
            // the cluster could not do it now; the backend may retry.
            _ => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
        }
    }
}

/// What the API's handlers share.
#[derive(Clone)]
pub struct ApiState {
    hub: Hub,
    /// SHA-256 of the key, when requests must carry one. Comparing digests
    /// keeps the comparison's timing independent of how much of the key a
    /// guess got right.
    key: Option<[u8; 32]>,
    observe: Option<Observer>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("hub", &self.hub)
            .field("key", &self.key.map(|_| ".."))
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// The API over `hub`, with requests checked against `key` when set.
    pub fn new(hub: Hub, key: Option<&Secret>) -> Self {
        Self {
            hub,
            key: key.map(|k| Sha256::digest(k.expose().as_bytes()).into()),
            observe: None,
        }
    }

    /// Reports every request to `observe` (metrics).
    pub fn observe(mut self, observe: Observer) -> Self {
        self.observe = Some(observe);
        self
    }

    fn authorize(&self, req: &Request) -> Result<(), ApiError> {
        let Some(want) = &self.key else {
            return Ok(());
        };
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "the request needs an Authorization: apikey KEY header",
            ));
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("apikey "))
            .map(str::trim);
        match given {
            Some(k) if <[u8; 32]>::from(Sha256::digest(k.as_bytes())) == *want => Ok(()),
            // Never echo what was sent: it may be someone's real key.
            _ => Err(ApiError::unauthorized("the API key is wrong")),
        }
    }
}

/// The API's routes: `/api/openapi.json` and `POST /api/<method>`.
pub fn router(state: ApiState) -> axum::Router {
    axum::Router::new()
        .route(
            "/api/openapi.json",
            axum::routing::get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    OPENAPI,
                )
            }),
        )
        .route("/api/{method}", axum::routing::any(handle))
        .with_state(state)
}

/// Binds `listen` and serves the API over `hub` there, with `extra` routes
/// beside it, until `stop` is cancelled.
pub async fn serve(
    listen: &ApiListen,
    hub: &Hub,
    extra: axum::Router,
    metrics: Option<&crate::metrics::Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let l = TcpListener::bind(&listen.addr)
        .await
        .with_context(|| format!("binding the API listener on {}", listen.addr))?;
    let addr = l.local_addr()?;
    let mut state = ApiState::new(hub.clone(), listen.key.as_ref());
    if let Some(m) = metrics.cloned() {
        state = state.observe(Arc::new(move |method, status, took| {
            let secs = took.as_secs_f64();
            m.observe_api(method, status, secs);
            if methods::QUERIES.contains(&method) {
                m.observe_query(method, secs);
            }
        }));
    }
    let app = router(state).merge(extra);
    let task = tokio::spawn(async move {
        let served = axum::serve(l, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the API listener failed");
        }
    });
    Ok((addr, task))
}

async fn handle(State(st): State<ApiState>, Path(method): Path<String>, req: Request) -> Response {
    let started = Instant::now();
    let label = methods::METHODS
        .iter()
        .copied()
        .find(|m| *m == method)
        .unwrap_or("unknown");
    let (status, body) = match run(&st, &method, req).await {
        Ok(v) => (StatusCode::OK, v),
        Err(e) => (e.status, e.body()),
    };
    if let Some(observe) = &st.observe {
        observe(label, status.as_u16(), started.elapsed());
    }
    let mut r = json_response(status, &body);
    if status == StatusCode::METHOD_NOT_ALLOWED {
        // A 405 says what is allowed (RFC 9110, 15.5.6).
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    r
}

async fn run(st: &ApiState, method: &str, req: Request) -> Result<Value, ApiError> {
    st.authorize(&req)?;
    if req.method() != Method::POST {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("use POST /api/{method}, not {}", req.method()),
        ));
    }
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is over {MAX_BODY} bytes, or was cut short"),
            )
        })?;
    let params = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?
    };
    if !params.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(methods::call(&st.hub, method, params).await?.into_json())
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.into_response()
}

#[cfg(test)]
mod tests;
