//! A node's Prometheus metrics, served at `GET /metrics` in the OpenMetrics
//! text format (which Prometheus scrapes natively).
//!
//! Two kinds: latency histograms that the server observes as requests are
//! answered, kept in a [`Registry`]; and the hub's counters, read from
//! [`Hub::stats`] at scrape time by a collector, so that counting stays
//! the library's relaxed atomics and nothing is counted twice on the hot
//! path. Every name starts with `switchboard_`; docs/METRICS.md lists them.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet, text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use switchboard::core::Status;
use switchboard::{Hub, HubStats};

/// The `Content-Type` of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric's prefix.
const PREFIX: &str = "switchboard";

/// Latency buckets, in seconds: from half a millisecond (a local answer) to
/// ten seconds (well past any timeout a request waits under).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn latency() -> Histogram {
    Histogram::new(BUCKETS)
}

type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    query: String,
}

/// A node's metrics: cheap to clone (one `Arc`), shared by every listener
/// that serves or observes them.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    api: Latencies<ApiLabels>,
    query: Latencies<QueryLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Metrics with no observation yet.
    pub fn new() -> Self {
        let api: Latencies<ApiLabels> = Family::new_with_constructor(latency);
        let query: Latencies<QueryLabels> = Family::new_with_constructor(latency);
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_with_unit(
            "api_request_duration",
            "Time to answer an API request, by method and HTTP status",
            Unit::Seconds,
            api.clone(),
        );
        registry.register_with_unit(
            "query_duration",
            "Time to answer a cluster-wide query, by query",
            Unit::Seconds,
            query.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                api,
                query,
            }),
        }
    }

    /// Records an API request answered in `seconds`. `method` must come
    /// from a bounded set (a known method name, or `"unknown"`): every
    /// distinct value is a series of its own, kept for the node's life.
    pub fn observe_api(&self, method: &str, status: u16, seconds: f64) {
        let labels = ApiLabels {
            method: method.to_owned(),
            status,
        };
        self.inner.api.get_or_create(&labels).observe(seconds);
    }

    /// Records a cluster-wide query answered in `seconds`. `query` must come
    /// from a bounded set, as for [`Metrics::observe_api`].
    pub fn observe_query(&self, query: &str, seconds: f64) {
        let labels = QueryLabels {
            query: query.to_owned(),
        };
        self.inner.query.get_or_create(&labels).observe(seconds);
    }

    /// The exposition: the histograms, then `hub`'s counters read now, then
    /// `extra`: for each `(prefix, object)`, every number of the (flat) JSON
    /// object as a gauge `switchboard_<prefix>_<key>` (anything else is
    /// left out).
    pub fn render(&self, hub: &Hub, extra: &[(&str, &serde_json::Value)]) -> String {
        let mut scrape = Registry::with_prefix(PREFIX);
        scrape.register_collector(Box::new(HubCollector {
            stats: hub.stats(),
            link_up: hub.cluster_status() == Status::Ready,
            extra: flatten(extra),
        }));
        let mut out = String::with_capacity(8 * 1024);
        let written = text::encode_registry(&mut out, &self.inner.registry)
            .and_then(|()| text::encode_registry(&mut out, &scrape))
            .and_then(|()| text::encode_eof(&mut out));
        // Writing to a string cannot fail; an encoder that refuses a metric
        // would be a bug here, and a scrape still gets what came before.
        if let Err(error) = written {
            tracing::error!(%error, "metrics could not all be encoded");
        }
        out
    }
}

/// A number from `/stats` beside the hub's: its metric name, its help, its
/// value.
#[derive(Debug)]
struct Extra {
    name: String,
    help: String,
    value: f64,
}

/// The numbers of `extra`, names made valid metric names, each name once.
fn flatten(extra: &[(&str, &serde_json::Value)]) -> Vec<Extra> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (prefix, value) in extra {
        let Some(object) = value.as_object() else {
            continue;
        };
        for (key, v) in object {
            let Some(value) = v.as_f64() else { continue };
            let name = metric_name(&format!("{prefix}_{key}"));
            if seen.insert(name.clone()) {
                out.push(Extra {
                    help: format!("{key} of {prefix} in /stats"),
                    name,
                    value,
                });
            }
        }
    }
    out
}

/// `raw` with every character a metric name may not hold replaced by `_`.
fn metric_name(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The hub's counters as they were when the scrape began.
#[derive(Debug)]
struct HubCollector {
    stats: HubStats,
    link_up: bool,
    extra: Vec<Extra>,
}

/// One metric family: a counter or a gauge, with one label, or none
/// (`label` empty, one value).
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    kind: MetricType,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for &(value, n) in values {
        if label.is_empty() {
            self::value(&mut metric, kind, n)?;
        } else {
            self::value(&mut metric.encode_family(&[(label, value)])?, kind, n)?;
        }
    }
    Ok(())
}

fn value(sample: &mut MetricEncoder<'_>, kind: MetricType, n: u64) -> fmt::Result {
    match kind {
        MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&n, None),
        _ => sample.encode_gauge(&n),
    }
}

fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, n: u64) -> fmt::Result {
    family(encoder, MetricType::Counter, name, help, "", &[("", n)])
}

impl Collector for HubCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let s = &self.stats;
        let b = &s.backplane;
        let e = &mut e;
        family(
            e,
            Gauge,
            "connections",
            "Connections open on this node now",
            "transport",
            &s.conns_open_by.labeled(),
        )?;
        family(
            e,
            Counter,
            "opens",
            "Connections accepted",
            "transport",
            &s.conns_opened_by.labeled(),
        )?;
        family(
            e,
            Counter,
            "closes",
            "Connections closed, by reason",
            "reason",
            &s.closes.labeled(),
        )?;
        counter(
            e,
            "connections_rejected",
            "Connections refused by the application or a failed handshake",
            s.conns_rejected,
        )?;
        family(
            e,
            Counter,
            "pushes",
            "Pushes made on this node, by what the target names (peers' pushes are not counted here)",
            "target",
            &s.pushes.labeled(),
        )?;
        counter(
            e,
            "frames_received",
            "Frames received from clients",
            s.frames_in,
        )?;
        counter(
            e,
            "frames_queued",
            "Frames queued to local connections, one per recipient",
            s.frames_queued,
        )?;
        counter(
            e,
            "frames_written",
            "Frames written to clients, one per recipient",
            s.frames_written,
        )?;
        family(
            e,
            Counter,
            "frames_dropped",
            "Frames local connections never got, by reason",
            "reason",
            &s.frames_dropped_by.labeled(),
        )?;
        counter(
            e,
            "slow_consumers",
            "Connections closed because they could not keep up",
            s.slow_consumers_closed,
        )?;
        counter(
            e,
            "messages_rate_limited",
            "Client messages not handled because they came over the rate limit",
            s.messages_rate_limited,
        )?;
        counter(
            e,
            "policy_closed",
            "Connections closed for breaking a policy (kept sending over the rate limit)",
            s.policy_closed,
        )?;
        counter(
            e,
            "ops_refused",
            "Operations refused by a limit (a join past the cap of groups)",
            s.ops_refused,
        )?;
        family(
            e,
            Counter,
            "history_entries",
            "Recorded pushes: appended to a stream (recorded), not made because the history failed (record_failed), replayed to recovering clients (replayed), read back to fill a stream's gap (gap_filled), and missing from a stream for good (gap_lost)",
            "outcome",
            &[
                ("recorded", s.history_recorded),
                ("record_failed", s.history_record_failed),
                ("replayed", s.history_replayed),
                ("gap_filled", s.history_gaps_filled),
                ("gap_lost", s.history_gaps_lost),
            ],
        )?;
        family(
            e,
            Counter,
            "history_recoveries",
            "Streams connecting clients asked to recover, by outcome",
            "outcome",
            &[
                ("recovered", s.history_recovered),
                ("not_recovered", s.history_not_recovered),
            ],
        )?;
        family(
            e,
            Counter,
            "backplane_envelopes",
            "Envelopes handed to the cluster (published) and delivered to this node (received)",
            "direction",
            &[("published", b.published), ("received", b.received)],
        )?;
        family(
            e,
            Counter,
            "backplane_envelopes_lost",
            "Envelopes lost: not handed over (publish), lost before this node got them (receive), kept past their time (expired)",
            "where",
            &[
                ("publish", b.publish_dropped),
                ("receive", b.receive_dropped),
                ("expired", b.expired),
            ],
        )?;
        counter(
            e,
            "backplane_duplicates",
            "Envelopes received twice and dropped",
            b.duplicates,
        )?;
        counter(
            e,
            "backplane_reconnects",
            "Times the backplane reconnected to its broker",
            b.reconnects,
        )?;
        counter(
            e,
            "backplane_bad_envelopes",
            "Envelopes from peers that could not be decoded",
            s.bad_envelopes,
        )?;
        family(
            e,
            Gauge,
            "broker_link_up",
            "1 while the node can reach its cluster, 0 otherwise",
            "",
            &[("", u64::from(self.link_up))],
        )?;
        for x in &self.extra {
            e.encode_descriptor(&x.name, &x.help, None, Gauge)?
                .encode_gauge(&x.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The value of the sample `series` (name and labels, as written).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    /// Checks the exposition line by line, as a scraper reads it: comments
    /// are HELP, TYPE, UNIT or EOF; every sample belongs to the family
    /// typed last, has a valid name, balanced labels, and a number.
    fn check_exposition(text: &str) {
        let mut family = String::new();
        let mut families = HashSet::new();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"# EOF"), "ends with # EOF");
        for line in &lines[..lines.len() - 1] {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(families.insert(name.to_owned()), "{name} typed twice");
                family = name.to_owned();
            } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            } else {
                assert!(!line.starts_with('#'), "stray comment: {line}");
                let (series, value) = line.rsplit_once(' ').unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
                let name = series.split('{').next().unwrap();
                assert!(name.starts_with(&family), "{line} outside {family}");
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                if series.contains('{') {
                    assert!(series.ends_with('}'), "{line}");
                }
            }
        }
    }

    #[tokio::test]
    async fn the_exposition_parses_and_a_push_moves_its_counter() {
        let hub = Hub::builder().start().await.unwrap();
        let metrics = Metrics::new();
        let app = serde_json::json!({"auth": "none", "tokens-expired": 3, "nested": {"n": 1}});
        let before = metrics.render(&hub, &[("app", &app)]);
        check_exposition(&before);
        for family in [
            "switchboard_connections gauge",
            "switchboard_opens counter",
            "switchboard_closes counter",
            "switchboard_pushes counter",
            "switchboard_frames_written counter",
            "switchboard_frames_dropped counter",
            "switchboard_backplane_envelopes_lost counter",
            "switchboard_broker_link_up gauge",
            "switchboard_app_tokens_expired gauge",
        ] {
            assert!(before.contains(&format!("# TYPE {family}\n")), "{family}");
        }
        let user = r#"switchboard_pushes_total{target="user"}"#;
        assert_eq!(sample(&before, user), Some(0.0));
        assert_eq!(
            sample(&before, r#"switchboard_connections{transport="websocket"}"#),
            Some(0.0)
        );
        assert_eq!(sample(&before, "switchboard_broker_link_up"), Some(1.0));
        assert_eq!(sample(&before, "switchboard_app_tokens_expired"), Some(3.0));
        assert!(!before.contains("auth"), "a string is no metric");
        assert!(!before.contains("nested"), "nor is an object");

        hub.to_user("alice", "hi").unwrap();
        hub.to_user("bob", "hi").unwrap();
        metrics.observe_api("push", 200, 0.003);
        metrics.observe_query("online", 0.2);
        let after = metrics.render(&hub, &[]);
        check_exposition(&after);
        assert_eq!(sample(&after, user), Some(2.0));
        assert_eq!(
            sample(&after, r#"switchboard_pushes_total{target="group"}"#),
            Some(0.0)
        );
        assert!(after.contains("# TYPE switchboard_api_request_duration_seconds histogram\n"));
        assert_eq!(
            sample(
                &after,
                r#"switchboard_api_request_duration_seconds_bucket{le="0.005",method="push",status="200"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &after,
                r#"switchboard_query_duration_seconds_count{query="online"}"#
            ),
            Some(1.0)
        );
        hub.shutdown().await;
    }

    #[test]
    fn extra_names_become_valid_metric_names_once() {
        let a = serde_json::json!({"x.y": 1, "x y": 2, "ok": 1.5});
        let got = flatten(&[("role", &a)]);
        let names: Vec<&str> = got.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"role_x_y") && names.contains(&"role_ok"));
    }
}
