//! `switchboard token`: a development token for a node started with
//! `--jwt-secret`. A production issuer is the application's own login
//! service; this is for trying a secured node and for scripts.

use anyhow::Context;
use clap::Args;
use switchboard::auth::{self, Claims};

use crate::config::Secret;

/// Flags of `switchboard token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The uid (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// Groups joined at connect, comma-separated (`groups` claim).
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Further permission rules, comma-separated (`can` claim; docs/SECURITY.md).
    #[arg(long, value_delimiter = ',')]
    pub can: Vec<String>,
    /// Session entries KEY=VALUE, comma-separated (`session` claim).
    #[arg(long, value_delimiter = ',')]
    pub session: Vec<String>,
    /// Seconds until the token expires; 0 for a token that never does.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// The HS256 secret the node was started with.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    pub secret: Secret,
}

/// The signed token.
pub fn mint(a: &TokenArgs) -> anyhow::Result<String> {
    let mut claims = Claims {
        sub: a.sub.clone(),
        groups: a.groups.clone(),
        can: a.can.clone(),
        exp: (a.ttl > 0).then(|| auth::now_secs() + a.ttl),
        ..Claims::default()
    };
    switchboard::auth::Permissions::parse(&a.can).map_err(anyhow::Error::msg)?;
    for kv in &a.session {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--session {kv:?}: expected KEY=VALUE"))?;
        claims.session.insert(k.to_owned(), v.into());
    }
    Ok(auth::mint_hs256(&claims, a.secret.expose()))
}
