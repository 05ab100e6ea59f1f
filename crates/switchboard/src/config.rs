//! Limits and timeouts of a hub and its connections, with their defaults.

use std::time::Duration;

use bytes::Bytes;

/// What happens when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowConsumer {
    /// Close the connection (code 1008 on WebSocket). Its peers are unaffected
    /// and nothing is silently lost: the client sees the close and can resync.
    #[default]
    Close,
    /// Drop the new frame and keep the connection. Counted in
    /// [`HubStats::frames_dropped`](crate::HubStats).
    DropNewest,
}

/// Per-connection limits and timeouts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Limits {
    /// Largest inbound message, in bytes. Larger: WebSocket close 1009, TCP close.
    pub max_message_size: usize,
    /// Frames a connection's outbound queue holds before [`SlowConsumer`] applies.
    pub outbox_frames: usize,
    /// Bytes a connection's outbound queue holds before [`SlowConsumer`] applies.
    pub outbox_bytes: usize,
    /// What to do with a connection whose outbound queue is full.
    pub slow_consumer: SlowConsumer,
    /// A write that makes no progress for this long closes the connection as slow.
    pub write_timeout: Duration,
    /// Time allowed from TCP accept to an accepted connection (HTTP upgrade, or
    /// the first frame of a TCP connection that expects a hello).
    pub handshake_timeout: Duration,
    /// How often WebSocket connections are pinged (and TCP connections sent
    /// [`Limits::tcp_ping`]); also how often idleness is checked.
    pub heartbeat: Duration,
    /// A WebSocket connection that sends nothing (pongs count) for this long is closed.
    pub ws_idle_timeout: Option<Duration>,
    /// A TCP connection that sends nothing for this long is closed. Off by
    /// default: raw TCP clients have no standard ping; TCP keepalive catches dead peers.
    pub tcp_idle_timeout: Option<Duration>,
    /// Bytes sent as one frame to TCP clients every heartbeat, if set.
    pub tcp_ping: Option<Bytes>,
    /// Time given to a closing connection to flush and finish its close handshake.
    pub close_timeout: Duration,
    /// Most groups one connection may be in; a join beyond is refused
    /// ([`OpError::Refused`](crate::OpError::Refused)).
    pub max_groups_per_conn: usize,
    /// Messages a connection may send, if limited: a token bucket per
    /// connection. A message over the rate is not handled, the application
    /// hears of it ([`Handler::on_rate_limited`](crate::Handler::on_rate_limited)),
    /// and a connection that keeps sending over the rate is closed
    /// ([`CloseReason::Policy`](crate::CloseReason::Policy), WebSocket 1008).
    pub message_rate: Option<RateLimit>,
}

/// A token bucket: `per_second` messages sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub per_second: f64,
    /// Messages that may arrive at once, after a quiet spell.
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            outbox_frames: 1024,
            outbox_bytes: 4 * 1024 * 1024,
            slow_consumer: SlowConsumer::Close,
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(25),
            ws_idle_timeout: Some(Duration::from_secs(60)),
            tcp_idle_timeout: None,
            tcp_ping: None,
            close_timeout: Duration::from_secs(2),
            max_groups_per_conn: 128,
            message_rate: None,
        }
    }
}

/// What a [`Bucket`] says of one more message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Take {
    /// Within the rate.
    Allow,
    /// Over the rate: not handled.
    Over,
    /// Over the rate for long: the connection is to be closed.
    Abuse,
}

/// A connection's token bucket, kept in its own task: no lock, no timer.
///
/// Messages over the rate also run up a debt, which drains at a tenth of the
/// burst per second: a client a little over its rate is only refused the
/// excess, one that keeps sending far over it (more than the burst again in
/// excess within about ten seconds) is closed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    debt: f64,
    last_ms: u64,
}

impl Bucket {
    pub(crate) fn new(limit: &RateLimit, now_ms: u64) -> Self {
        Self {
            tokens: limit.burst,
            debt: 0.0,
            last_ms: now_ms,
        }
    }

    pub(crate) fn take(&mut self, limit: &RateLimit, now_ms: u64) -> Take {
        let secs = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.last_ms = self.last_ms.max(now_ms);
        self.tokens = (self.tokens + secs * limit.per_second).min(limit.burst);
        self.debt = (self.debt - secs * limit.burst / 10.0).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Take::Allow;
        }
        self.debt += 1.0;
        if self.debt > limit.burst {
            Take::Abuse
        } else {
            Take::Over
        }
    }
}

/// Longest uid, group name or session key, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Checks a uid, group name or session key: non-empty, at most
/// [`MAX_NAME_LEN`] bytes, no control characters (which would corrupt logs and
/// line-framed protocols). `what` names it in the error.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{what} must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate_and_closes_on_sustained_excess() {
        let limit = RateLimit {
            per_second: 10.0,
            burst: 20.0,
        };
        let mut b = Bucket::new(&limit, 0);
        for _ in 0..20 {
            assert_eq!(b.take(&limit, 0), Take::Allow);
        }
        assert_eq!(b.take(&limit, 0), Take::Over);
        // A tenth of a second later, one more token.
        assert_eq!(b.take(&limit, 100), Take::Allow);
        assert_eq!(b.take(&limit, 100), Take::Over);
        // A client a little over its rate (11/s) is refused the excess, never closed.
        let mut b = Bucket::new(&limit, 0);
        let (mut over, mut t) = (0, 0);
        for i in 0..11 * 60 {
            t = i * 1000 / 11;
            match b.take(&limit, t) {
                Take::Allow => {}
                Take::Over => over += 1,
                Take::Abuse => panic!("closed at {t} ms"),
            }
        }
        assert!(over > 0 && t > 59_000, "{over} refused");
        // One at five times its rate is closed within seconds.
        let mut b = Bucket::new(&limit, 0);
        let closed_at = (0..50 * 60)
            .map(|i| i * 1000 / 50)
            .find(|&t| b.take(&limit, t) == Take::Abuse);
        assert!(matches!(closed_at, Some(t) if t < 5_000), "{closed_at:?}");
    }

    #[test]
    fn names_are_non_empty_short_and_printable() {
        assert!(check_name("group", "lobby").is_ok());
        assert!(check_name("group", &"é".repeat(127)).is_ok(), "254 bytes");
        assert!(check_name("group", &"a".repeat(255)).is_ok());
        let e = check_name("group", &"a".repeat(256)).unwrap_err();
        assert!(e.contains("256 bytes"), "{e}");
        assert!(check_name("uid", "").unwrap_err().contains("empty"));
        assert!(check_name("uid", "a\nb").unwrap_err().contains("control"));
        assert!(check_name("uid", "a\u{7f}").is_err());
    }
}
