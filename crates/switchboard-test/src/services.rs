//! External services for tests: the shared Redis on 127.0.0.1:6379 and
//! RabbitMQ on 127.0.0.1:5672, and private `redis-server` and
//! `rabbitmq-server` processes for tests that restart or kill the broker.
//!
//! A test whose service is missing fails: it never passes silently. Outside
//! CI, `scripts/test.sh` probes the services first and leaves out the tests of
//! those that are missing, so the runner reports them as skipped (see
//! `docs/TESTING.md`).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Answers `hello` with a reply that starts with `expect`, within a second?
fn answers(addr: &str, hello: &[u8], expect: &[u8]) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = vec![0u8; expect.len()];
    s.write_all(hello).is_ok() && s.read_exact(&mut buf).is_ok() && buf == expect
}

/// Answers `PING` with `+PONG`?
fn redis_answers(addr: &str) -> bool {
    answers(addr, b"PING\r\n", b"+PONG\r\n")
}

/// Checks that a service a test needs is there: an error that names it when
/// it is not. A missing service is a failure, never a silent pass; the test
/// script leaves such tests out beforehand, so the runner counts them as
/// skipped, when it runs outside CI.
pub fn require(service: &str, reachable: bool) -> Result<()> {
    if reachable {
        return Ok(());
    }
    bail!(
        "{service} is not available: this test needs it (scripts/test.sh leaves \
         out the tests of missing services outside CI, and fails them in CI)"
    )
}

/// The shared Redis (`SWITCHBOARD_TEST_REDIS`, default 127.0.0.1:6379) as a
/// URL, or an error naming it if it is unreachable.
pub fn redis_url() -> Result<String> {
    let addr = std::env::var("SWITCHBOARD_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    require(&format!("Redis at {addr}"), redis_answers(&addr))?;
    Ok(format!("redis://{addr}"))
}

/// Answers the AMQP 0-9-1 protocol header with a method frame (type 1: the
/// broker's connection.start)?
fn amqp_answers(addr: &str) -> bool {
    answers(addr, b"AMQP\x00\x00\x09\x01", &[1])
}

/// The shared RabbitMQ (`SWITCHBOARD_TEST_AMQP`, default 127.0.0.1:5672,
/// guest/guest, vhost `/`) as a URL, or an error naming it if it is
/// unreachable.
pub fn amqp_url() -> Result<String> {
    let addr = std::env::var("SWITCHBOARD_TEST_AMQP").unwrap_or_else(|_| "127.0.0.1:5672".into());
    require(&format!("RabbitMQ at {addr}"), amqp_answers(&addr))?;
    Ok(format!("amqp://guest:guest@{addr}/%2f"))
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
    /// Starts one; an error if `redis-server` is missing or does not start.
    pub fn start(durable: bool) -> Result<Self> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        require("redis-server (the binary)", found)?;
        let dir = std::env::temp_dir().join(unique_prefix("redis"));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port: free_port()?,
            dir,
            durable,
            child: None,
        };
        s.spawn()?;
        Ok(s)
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

/// Where RabbitMQ's own scripts are: Debian's package keeps the real ones
/// (not the wrappers that switch to the `rabbitmq` user) in /usr/lib/rabbitmq/bin.
fn rabbitmq_script(name: &str) -> PathBuf {
    let packaged = PathBuf::from("/usr/lib/rabbitmq/bin").join(name);
    if packaged.exists() {
        packaged
    } else {
        PathBuf::from(name)
    }
}

/// `rabbitmqctl` for one broker node.
#[derive(Debug, Clone)]
pub struct RabbitCtl {
    program: PathBuf,
    node: Option<String>,
    home: Option<PathBuf>,
}

impl RabbitCtl {
    /// `rabbitmqctl` of the shared broker; an error if it is missing or
    /// cannot talk to the broker.
    pub fn shared() -> Result<Self> {
        let ctl = Self {
            program: PathBuf::from("rabbitmqctl"),
            node: None,
            home: None,
        };
        let works = ctl.run(&["-q", "status"]).is_ok();
        require("rabbitmqctl for the shared RabbitMQ", works)?;
        Ok(ctl)
    }

    /// Runs `rabbitmqctl ARGS` and returns what it printed.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.program);
        if let Some(node) = &self.node {
            cmd.args(["-n", node]);
        }
        if let Some(home) = &self.home {
            cmd.env("HOME", home);
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.program.display()))?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Lines of `rabbitmqctl -q list_... COLUMNS` that contain `needle`.
    pub fn list(&self, what: &str, columns: &[&str], needle: &str) -> Result<Vec<String>> {
        let mut args = vec!["-q", "--no-table-headers", what];
        args.extend_from_slice(columns);
        Ok(self
            .run(&args)?
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect())
    }

    /// Force-closes every client connection whose name contains `needle`
    /// (switchboard names its connections `switchboard PREFIX NODE`); returns
    /// how many it closed.
    pub fn close_connections(&self, needle: &str) -> Result<usize> {
        let conns = self.list("list_connections", &["pid", "client_properties"], needle)?;
        for line in &conns {
            let pid = line.split_whitespace().next().context("no pid")?;
            self.run(&["close_connection", pid, "closed by a test"])?;
        }
        Ok(conns.len())
    }
}

/// A private `rabbitmq-server` on its own ports, node name and directory,
/// that a test may kill and restart without disturbing other tests.
pub struct RabbitServer {
    pub port: u16,
    dist_port: u16,
    node: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl RabbitServer {
    /// Starts one (about 5 to 15 s); an error if `rabbitmq-server` is missing
    /// or does not start.
    pub fn start() -> Result<Self> {
        let found = rabbitmq_script("rabbitmq-server").exists()
            || Command::new("which")
                .arg("rabbitmq-server")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        require("rabbitmq-server (the binary)", found)?;
        let name = unique_prefix("rmq");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let mut s = Self {
            port,
            dist_port: free_port()?,
            node: format!("{name}@localhost"),
            dir,
            child: None,
        };
        std::fs::write(
            s.dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"),
        )?;
        std::fs::write(s.dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(s.dir.join("enabled_plugins"), "[].\n")?;
        s.spawn()?;
        Ok(s)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl` for this server.
    pub fn ctl(&self) -> RabbitCtl {
        RabbitCtl {
            program: rabbitmq_script("rabbitmqctl"),
            node: Some(self.node.clone()),
            home: Some(self.dir.clone()),
        }
    }

    fn spawn(&mut self) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let d = &self.dir;
        let mut cmd = Command::new(rabbitmq_script("rabbitmq-server"));
        cmd.env("HOME", d)
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            // Its own process group: the script starts the Erlang VM as a
            // child, and a kill must reach it.
            .process_group(0);
        // A broker started again on the same node name can exit at once
        // while the killed one is still registered; it is then started
        // again. Its output is kept, and shown when it never comes up.
        let out_path = d.join("server.out");
        for attempt in 1..=3 {
            let out = std::fs::File::create(&out_path)?;
            cmd.stdout(out.try_clone()?).stderr(out);
            self.child = Some(cmd.spawn().context("starting rabbitmq-server")?);
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if amqp_answers(&format!("127.0.0.1:{}", self.port)) {
                    return Ok(());
                }
                let exited = self
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some());
                if exited || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            self.kill();
            eprintln!(
                "rabbitmq-server on port {}: start {attempt} failed",
                self.port
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        let output = std::fs::read_to_string(&out_path).unwrap_or_default();
        let tail: String = output
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "rabbitmq-server on port {} did not start; its output:\n{tail}",
            self.port
        )
    }

    /// Kills the server (SIGKILL to its whole process group: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again after [`RabbitServer::kill`], on the same ports, node
    /// name and directory.
    pub fn start_again(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP GET (for `/ready` and `/stats`): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let r = crate::http::get(addr, path).await?;
    Ok((r.status.as_u16(), r.text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_service_is_a_failure() {
        assert!(!redis_answers("127.0.0.1:1"));
        assert!(!amqp_answers("127.0.0.1:1"));
        let r = require("nothing on port 1", false);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("nothing on port 1")),
            "a missing service must fail the test: {r:?}"
        );
        assert!(require("x", true).is_ok());
    }
}
