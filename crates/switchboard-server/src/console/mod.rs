//! The web console: a static page that speaks the reference application's
//! WebSocket protocol from a browser, one pane per node.
//!
//! The page is plain HTML, CSS and JavaScript embedded in the binary, with no
//! build step and nothing loaded from elsewhere. It learns where its panes
//! connect from `config.json`, served beside it, so one page serves both uses:
//! `switchboard serve` mounts it at `/` of every node's WebSocket port (one pane,
//! connecting back to the port the page came from), and `switchboard demo`
//! serves it on a port of its own with one pane per node.

use axum::Router;
use axum::body::Bytes;
use axum::routing::get;
use serde::Serialize;
use switchboard::http::header::{self, HeaderName};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// Where one pane of the console connects.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    /// The pane's heading.
    pub label: String,
    /// The port of the node's WebSocket listener, on the host the page was
    /// loaded from; `None` for the page's own port.
    pub port: Option<u16>,
    /// The WebSocket path.
    pub path: String,
}

/// What the page is told: its title, a line about what it shows, its panes.
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleConfig {
    /// The page's title and heading.
    pub title: String,
    /// A sentence under the heading.
    pub about: String,
    /// One pane per endpoint, in order.
    pub endpoints: Vec<Endpoint>,
}

/// Headers of every console response: the page runs only its own script and
/// style sheet (no inline code, so injected markup could not run even if it
/// reached the DOM) and may open WebSockets to any port of any host.
const SECURITY: [(HeaderName, &str); 3] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; \
         connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    // The page is tiny and changes with the binary: never serve a stale one.
    (header::CACHE_CONTROL, "no-cache"),
];

type Asset = (
    [(HeaderName, &'static str); 1],
    [(HeaderName, &'static str); 3],
    Bytes,
);

fn asset(content_type: &'static str, body: Bytes) -> Asset {
    ([(header::CONTENT_TYPE, content_type)], SECURITY, body)
}

/// The console's routes: `/`, `/console.js`, `/console.css` and
/// `/config.json`. A route whose path is `taken` (the node's WebSocket path,
/// when it is one of these) is left out, so the WebSocket keeps its path.
pub fn router(config: &ConsoleConfig, taken: Option<&str>) -> Router {
    // Serialising plain strings and numbers cannot fail.
    let config = Bytes::from(serde_json::to_string(config).unwrap_or_default());
    let routes: [(&str, &'static str, Bytes); 4] = [
        (
            "/",
            "text/html; charset=utf-8",
            Bytes::from_static(INDEX.as_bytes()),
        ),
        (
            "/console.js",
            "text/javascript; charset=utf-8",
            Bytes::from_static(SCRIPT.as_bytes()),
        ),
        (
            "/console.css",
            "text/css; charset=utf-8",
            Bytes::from_static(STYLE.as_bytes()),
        ),
        ("/config.json", "application/json", config),
    ];
    routes
        .into_iter()
        .filter(|(path, _, _)| Some(*path) != taken)
        .fold(Router::new(), |router, (path, content_type, body)| {
            router.route(
                path,
                get(move || std::future::ready(asset(content_type, body.clone()))),
            )
        })
}

/// The console of one node served by `switchboard serve`: one pane, connecting
/// to `ws_path` on the port the page came from.
pub fn node_config(node: &switchboard::NodeId, ws_path: &str) -> ConsoleConfig {
    ConsoleConfig {
        title: format!("switchboard node {node}"),
        about: "Connect as a user, push to users, groups or everyone in the cluster, \
                and ask who is online: this pane is a WebSocket client of this node."
            .to_owned(),
        endpoints: vec![Endpoint {
            label: format!("node {node}"),
            port: None,
            path: ws_path.to_owned(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        // The CSP forbids inline code and other origins: the page must not need them.
        assert!(INDEX.contains(r#"<script src="console.js" defer></script>"#));
        assert!(!INDEX.contains("<script>"), "inline script");
        assert!(!INDEX.contains("<style"), "inline style");
        assert!(!INDEX.contains("http://") && !INDEX.contains("https://"));
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("insertAdjacentHTML"));
    }

    #[test]
    fn the_node_config_names_one_same_origin_pane() {
        let id = switchboard::NodeId::new("n7").unwrap();
        let v = serde_json::to_value(node_config(&id, "/socket")).unwrap();
        assert_eq!(v["title"], "switchboard node n7");
        assert_eq!(v["endpoints"][0]["path"], "/socket");
        assert!(v["endpoints"][0]["port"].is_null());
        assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(1));
    }
}
