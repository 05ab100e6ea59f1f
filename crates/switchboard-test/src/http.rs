//! A minimal HTTP/1.1 client for tests: one request per connection, through
//! hyper (already what the server is built on), bounded in time.
//! It serves the nodes' plain HTTP endpoints and chromedriver's WebDriver API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request to `addr` (a JSON body when `json` is given) and reads
/// the whole response within `within`.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    json: Option<&serde_json::Value>,
    within: Duration,
) -> Result<Response> {
    let body = json.map(|v| Bytes::from(v.to_string()));
    let content_type = [(header::CONTENT_TYPE.as_str(), "application/json")];
    let headers: &[(&str, &str)] = if json.is_some() { &content_type } else { &[] };
    request_with(addr, method, path, headers, body, within).await
}

/// Sends one request with these extra headers and this raw body, and reads
/// the whole response within `within`.
pub async fn request_with(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Bytes>,
    within: Duration,
) -> Result<Response> {
    let method_path = format!("{method} http://{addr}{path}");
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let body = body.unwrap_or_default();
        let response = sender.send_request(req.body(Full::new(body))?);
        // The connection ends after this one exchange: driving it to its end
        // beside the response leaves no task behind.
        drop(sender);
        let read = async {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let (response, _) = tokio::join!(read, conn);
        response
    };
    tokio::time::timeout(within, exchange)
        .await
        .with_context(|| format!("{method_path}: no response within {within:?}"))?
}

/// `GET path`, within [`crate::STEP`].
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    request(addr, Method::GET, path, None, crate::STEP).await
}

/// `POST /api/<method>` to a node's server API with `key` (when given) and a
/// JSON body: the status and the JSON answer.
pub async fn api(
    addr: SocketAddr,
    key: Option<&str>,
    method: &str,
    body: &serde_json::Value,
) -> Result<(StatusCode, serde_json::Value)> {
    let auth = key.map(|k| format!("apikey {k}"));
    let mut headers = vec![(header::CONTENT_TYPE.as_str(), "application/json")];
    if let Some(a) = &auth {
        headers.push((header::AUTHORIZATION.as_str(), a.as_str()));
    }
    let path = format!("/api/{method}");
    let body = Some(Bytes::from(body.to_string()));
    let r = request_with(addr, Method::POST, &path, &headers, body, crate::STEP).await?;
    let json = serde_json::from_slice(&r.body)
        .with_context(|| format!("POST {path}: the answer is not JSON: {}", r.text()))?;
    Ok((r.status, json))
}
