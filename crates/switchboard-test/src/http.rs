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
        let body = match json {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
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
