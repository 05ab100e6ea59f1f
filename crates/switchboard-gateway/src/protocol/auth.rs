//! The JSON bodies that authorize inner connections to a gateway (docs/GATEWAY-PROTOCOL.md §3.8).
//!
//! A worker link starts with `CMD_WORKER_CONNECT` and a
//! `{"worker_key":…,"secret_key":…}` body; a pusher's request with a secret set
//! is preceded by `CMD_GATEWAY_CLIENT_CONNECT` and `{"secret_key":…}`. Both are
//! PHP `json_encode` output, sent as scalar bodies (flag 1).

use super::php::{self, Key, Value};

/// Body of `CMD_WORKER_CONNECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConnect {
    /// `"<worker name>:<process index>"`, e.g. `BusinessWorker:0`.
    pub worker_key: String,
    /// The cluster secret, compared strictly by the gateway.
    pub secret_key: String,
}

/// Body of `CMD_GATEWAY_CLIENT_CONNECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayClientConnect {
    /// The cluster secret, compared strictly by the gateway.
    pub secret_key: String,
}

/// An authorization body the gateway would refuse.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Not JSON.
    #[error("authorization body is not JSON")]
    Json(#[source] php::JsonError),
    /// A member is missing or not a string (PHP's strict comparison would fail).
    #[error("authorization body has no string {0:?}")]
    Missing(&'static str),
}

impl WorkerConnect {
    /// The body bytes, exactly as PHP's `json_encode` writes them.
    pub fn encode(&self) -> Vec<u8> {
        encode_object(&[
            ("worker_key", &self.worker_key),
            ("secret_key", &self.secret_key),
        ])
    }

    /// Reads a body as the gateway does (`json_decode($body, true)`).
    pub fn decode(body: &[u8]) -> Result<Self, AuthError> {
        let v = php::json_decode(body).map_err(AuthError::Json)?;
        Ok(Self {
            worker_key: member(&v, "worker_key")?,
            secret_key: member(&v, "secret_key")?,
        })
    }
}

impl GatewayClientConnect {
    /// The body bytes, exactly as PHP's `json_encode` writes them.
    pub fn encode(&self) -> Vec<u8> {
        encode_object(&[("secret_key", &self.secret_key)])
    }

    /// Reads a body as the gateway does (`json_decode($body, true)`).
    pub fn decode(body: &[u8]) -> Result<Self, AuthError> {
        let v = php::json_decode(body).map_err(AuthError::Json)?;
        Ok(Self {
            secret_key: member(&v, "secret_key")?,
        })
    }
}

/// A JSON object of string members, as `json_encode` of a string-keyed array.
pub(crate) fn encode_object(members: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![b'{'];
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        php::encode_json_str(&mut out, k);
        out.push(b':');
        php::encode_json_str(&mut out, v);
    }
    out.push(b'}');
    out
}

fn member(v: &Value, name: &'static str) -> Result<String, AuthError> {
    v.as_array()
        .and_then(|a| a.get(&Key::from(name)))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(AuthError::Missing(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn php_bytes() {
        let w = WorkerConnect {
            worker_key: "BusinessWorker:0".into(),
            secret_key: "s3cret".into(),
        };
        assert_eq!(
            w.encode(),
            br#"{"worker_key":"BusinessWorker:0","secret_key":"s3cret"}"#
        );
        assert_eq!(WorkerConnect::decode(&w.encode()).unwrap(), w);
        let g = GatewayClientConnect {
            secret_key: "a/b\u{e9}".into(),
        };
        assert_eq!(g.encode(), br#"{"secret_key":"a\/b\u00e9"}"#);
        assert_eq!(GatewayClientConnect::decode(&g.encode()).unwrap(), g);
        // Any whitespace is fine; a missing or non-string secret is not.
        assert_eq!(
            GatewayClientConnect::decode(br#"{"secret_key": "s3cret"}"#)
                .unwrap()
                .secret_key,
            "s3cret"
        );
        assert!(matches!(
            GatewayClientConnect::decode(br#"{"secret_key":1}"#),
            Err(AuthError::Missing("secret_key"))
        ));
        assert!(matches!(
            WorkerConnect::decode(br#"{"secret_key":""}"#),
            Err(AuthError::Missing("worker_key"))
        ));
        assert!(matches!(
            WorkerConnect::decode(b"nope"),
            Err(AuthError::Json(_))
        ));
    }
}
