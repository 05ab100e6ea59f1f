//! External services for tests: the shared Redis on 127.0.0.1:6379, and
//! private `redis-server` processes for tests that restart or kill Redis.
//!
//! When `CI=true`, an unreachable service fails the test instead of skipping it.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Whether this run is CI, where missing services are failures.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Answers `PING` with `+PONG` within a second?
fn redis_answers(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Decides what a test does when a service is missing: `Ok(false)` to skip
/// (outside CI), an error in CI.
pub fn require(service: &str, reachable: bool) -> Result<bool> {
    if reachable {
        return Ok(true);
    }
    if in_ci() {
        bail!("{service} is not available and CI=true: this is a failure, not a skip");
    }
    eprintln!("SKIPPED: {service} is not available (set CI=true to make this a failure)");
    Ok(false)
}

/// The shared Redis (`SWITCHBOARD_TEST_REDIS`, default 127.0.0.1:6379) as a
/// URL, or `None` to skip outside CI. Panics in CI if it is unreachable.
pub fn redis_url() -> Option<String> {
    let addr = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    match require(&format!("Redis at {addr}"), redis_answers(&addr)) {
        Ok(true) => Some(format!("redis://{addr}")),
        Ok(false) => None,
        Err(e) => panic!("{e}"),
    }
}

/// A key prefix no other test uses, so tests share one Redis in parallel.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "t-{tag}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loopback port free a moment ago (bind, read, release).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A private `redis-server`, on its own port and directory, that a test may
/// kill and restart. With `durable`, it writes an fsync'd append-only file, so
/// what it acknowledged survives a kill.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    durable: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one, or `None` to skip (outside CI) when `redis-server` is missing.
    pub fn start(durable: bool) -> Result<Option<Self>> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !require("redis-server (the binary)", found)? {
            return Ok(None);
        }
        let dir = std::env::temp_dir().join(unique_prefix("redis"));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port: free_port()?,
            dir,
            durable,
            child: None,
        };
        s.spawn()?;
        Ok(Some(s))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(&self.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        self.child = Some(cmd.spawn().context("starting redis-server")?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_answers(&format!("127.0.0.1:{}", self.port)) {
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not start", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A GET (for `/ready` and `/stats`): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let r = crate::http::get(addr, path).await?;
    Ok((r.status.as_u16(), r.text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_service_fails_in_ci_and_skips_outside() {
        assert!(!redis_answers("127.0.0.1:1"));
        let ci = in_ci();
        let r = require("nothing on port 1", false);
        if ci {
            assert!(
                r.is_err(),
                "CI=true must turn a missing service into a failure"
            );
        } else {
            assert!(matches!(r, Ok(false)));
        }
        assert!(matches!(require("x", true), Ok(true)));
    }
}
