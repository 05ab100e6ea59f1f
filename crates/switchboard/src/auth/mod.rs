//! Who a connecting client is, and what it may do.
//!
//! A client proves who it is with a JSON Web Token: `?token=` or an
//! `Authorization: Bearer` header on WebSocket, a `token` field of its JSON
//! hello on TCP ([`token_of`]). [`JwtVerifier`] checks the signature (HS256
//! with a shared secret; RS256 or ES256 with a public key) and the `exp` and
//! `nbf` claims, and turns the claims into an [`Identity`]:
//!
//! | claim | meaning |
//! |---|---|
//! | `sub` (required) | the uid the connection is bound to |
//! | `groups` (array) | groups joined at connect, and the groups it may join and ask about |
//! | `session` (object) | the connection's initial session |
//! | `can` (array) | further [`Permissions`] |
//! | `exp`, `nbf` | enforced, with [`LEEWAY_SECS`] of clock skew |
//!
//! Use it from [`Handler::on_connect`](crate::Handler::on_connect):
//!
//! ```
//! use switchboard::auth::{self, JwtVerifier};
//! use switchboard::{Accept, ConnectInfo, Decision, Handler, Hub, async_trait};
//!
//! struct App {
//!     jwt: JwtVerifier,
//! }
//!
//! #[async_trait]
//! impl Handler for App {
//!     async fn on_connect(&self, _hub: &Hub, info: &ConnectInfo) -> Decision {
//!         match self.jwt.verify_connect(info) {
//!             Ok(id) => id.accept().into(),
//!             Err(e) => e.reject().into(),
//!         }
//!     }
//! }
//! # let _ = App { jwt: JwtVerifier::hs256(b"secret") };
//! ```

mod can;
pub mod proxy;

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use switchboard_core::{GroupId, Session, UserId};

pub use can::{Action, Permissions, pattern_matches};

use crate::config::check_name;
use crate::handler::{Accept, ConnectInfo, Reject};

/// Seconds of clock skew allowed between the token's issuer and this node,
/// on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// The claims switchboard reads from a token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The uid.
    pub sub: String,
    /// Groups joined at connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The initial session: strings as they are, other values as JSON text.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub session: serde_json::Map<String, serde_json::Value>,
    /// Further permissions ([`Permissions`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub can: Vec<String>,
    /// Expiry, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Not valid before, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// A verified client.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Identity {
    /// Its uid.
    pub user: UserId,
    /// Groups to join at connect.
    pub groups: Vec<GroupId>,
    /// Its initial session.
    pub session: Session,
    /// What it may do: joining and asking about its `groups`, and its `can`.
    pub can: Permissions,
    /// When its token expires, in seconds since the Unix epoch.
    pub expires: Option<u64>,
}

impl Identity {
    /// Accept the connection as this identity: bound to its uid, in its groups,
    /// with its session.
    pub fn accept(&self) -> Accept {
        let mut a = Accept::new()
            .bind(self.user.clone())
            .session(self.session.clone());
        for g in &self.groups {
            a = a.join(g.clone());
        }
        a
    }
}

/// A token was missing or not acceptable. Every variant says what to fix;
/// none repeats the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was presented.
    #[error(
        "a token is required: pass ?token=JWT or an Authorization: Bearer header (WebSocket), or a \"token\" field in the hello (TCP)"
    )]
    Missing,
    /// The token has expired.
    #[error("the token has expired")]
    Expired,
    /// The token is not valid yet.
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    /// The signature does not verify with this server's key.
    #[error("the token's signature does not verify with this server's key")]
    BadSignature,
    /// Signed with an algorithm this server does not accept.
    #[error("the token is signed with an algorithm this server does not accept")]
    Algorithm,
    /// Not a JWT, or its claims are malformed.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// A key could not be read.
    #[error("invalid key: {0}")]
    Key(String),
}

impl AuthError {
    /// The refusal of a WebSocket upgrade (401) or TCP hello for this error.
    pub fn reject(&self) -> Reject {
        Reject::new(self.to_string()).status(http::StatusCode::UNAUTHORIZED)
    }
}

fn jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => AuthError::Expired,
        K::ImmatureSignature => AuthError::NotYetValid,
        K::InvalidSignature => AuthError::BadSignature,
        K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::Algorithm,
        K::MissingRequiredClaim(c) => AuthError::Invalid(format!("the {c:?} claim is required")),
        K::Json(e) => AuthError::Invalid(format!("bad claims: {e}")),
        K::InvalidToken | K::Base64(_) | K::Utf8(_) => {
            AuthError::Invalid("not a JSON Web Token".into())
        }
        _ => AuthError::Invalid(e.to_string()),
    }
}

/// Checks tokens with one key.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    fn with(key: DecodingKey, alg: Algorithm) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // `exp` is checked when present; a token without one does not
        // expire, as the issuer chose.
        validation.required_spec_claims = ["sub".to_owned()].into_iter().collect();
        Self { key, validation }
    }

    /// HS256 with a shared secret.
    pub fn hs256(secret: impl AsRef<[u8]>) -> Self {
        Self::with(DecodingKey::from_secret(secret.as_ref()), Algorithm::HS256)
    }

    /// RS256 (an RSA public key) or ES256 (a P-256 public key), from PEM.
    pub fn public_key_pem(pem: &[u8]) -> Result<Self, AuthError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::with(key, Algorithm::RS256));
        }
        match DecodingKey::from_ec_pem(pem) {
            Ok(key) => Ok(Self::with(key, Algorithm::ES256)),
            Err(_) => Err(AuthError::Key(
                "not an RSA or P-256 (EC) public key in PEM".into(),
            )),
        }
    }

    /// Verifies a token and reads its identity.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(jwt_error)?;
        identity(data.claims)
    }

    /// Verifies the token a connecting client presents ([`token_of`]).
    pub fn verify_connect(&self, info: &ConnectInfo) -> Result<Identity, AuthError> {
        self.verify(&token_of(info).ok_or(AuthError::Missing)?)
    }
}

/// Checks the claims' names and builds the identity.
fn identity(c: Claims) -> Result<Identity, AuthError> {
    let bad = |e: String| AuthError::Invalid(e);
    check_name("sub", &c.sub).map_err(bad)?;
    let mut can = Permissions::parse(&c.can).map_err(|e| bad(format!("claim can: {e}")))?;
    let mut groups = Vec::with_capacity(c.groups.len());
    for g in c.groups {
        check_name("a group of the groups claim", &g).map_err(bad)?;
        can.grant_group(&g);
        groups.push(GroupId::from(g));
    }
    let mut session = Session::new();
    for (k, v) in c.session {
        check_name("a key of the session claim", &k).map_err(bad)?;
        let v = match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        session.insert(k, v);
    }
    Ok(Identity {
        user: UserId::from(c.sub),
        groups,
        session,
        can,
        expires: c.exp,
    })
}

/// The token a connecting client presents: `?token=`, then `Authorization:
/// Bearer`, on WebSocket; the `token` string of a JSON hello on TCP.
pub fn token_of(info: &ConnectInfo) -> Option<Cow<'_, str>> {
    if let Some(t) = info.query_param("token").filter(|t| !t.is_empty()) {
        return Some(t);
    }
    if let Some(t) = info
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some(Cow::Borrowed(t));
    }
    let hello = info.hello.as_ref()?;
    #[derive(Deserialize)]
    struct Hello {
        token: Option<String>,
    }
    serde_json::from_slice::<Hello>(hello.data())
        .ok()?
        .token
        .filter(|t| !t.is_empty())
        .map(Cow::Owned)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs claims with HS256: development tokens (`switchboard token`) and
/// tests. A production issuer is the application's own login service.
pub fn mint_hs256(claims: &Claims, secret: impl AsRef<[u8]>) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_ref()),
    )
    .unwrap_or_else(|e| unreachable!("HS256 signs any claims: {e}"))
}

#[cfg(test)]
mod tests;
