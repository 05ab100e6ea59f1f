//! External services for tests: the shared Redis on 127.0.0.1:6379,
//! RabbitMQ on 127.0.0.1:5672 and NATS on 127.0.0.1:4222, and private
//! `redis-server` and `rabbitmq-server` processes for tests that restart or
//! kill the broker (private clusters are in [`crate::broker_clusters`]).
//!
//! A test whose service is missing fails: it never passes silently. Outside
//! CI, `scripts/test.sh` probes the services first and leaves out the tests of
//! those that are missing, so the runner reports them as skipped (see
//! `docs/TESTING.md`).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
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
pub(crate) fn redis_answers(addr: &str) -> bool {
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

/// Greets a new connection with its `INFO` line, as a NATS server does
/// before the client says anything?
pub(crate) fn nats_answers(addr: &str) -> bool {
    answers(addr, b"", b"INFO ")
}

/// The shared NATS (`SWITCHBOARD_TEST_NATS`, default 127.0.0.1:4222) as a
/// URL, or an error naming it if it is unreachable.
pub fn nats_url() -> Result<String> {
    let addr = std::env::var("SWITCHBOARD_TEST_NATS").unwrap_or_else(|_| "127.0.0.1:4222".into());
    require(&format!("NATS at {addr}"), nats_answers(&addr))?;
    Ok(format!("nats://{addr}"))
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

/// The output of a private broker, kept in a file of its directory: every
/// start of the broker appends to it, after a line that marks the start. A
/// start that fails says its tail in the error, and so does the broker's drop
/// when the test that owns it fails, so that no test has to remember to.
#[derive(Debug)]
pub(crate) struct BrokerLog {
    path: PathBuf,
    starts: u32,
}

/// Lines of a broker's output shown in an error or a failing test.
const LOG_TAIL: usize = 60;

impl BrokerLog {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("server.out"),
            starts: 0,
        }
    }

    /// The file the next start writes its output to (stdout and stderr), after
    /// a line that marks the start.
    pub(crate) fn next_start(&mut self) -> Result<std::fs::File> {
        use std::io::Write;
        self.starts += 1;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(f, "--- start {} ---", self.starts)?;
        Ok(f)
    }

    /// The last [`LOG_TAIL`] lines of the output.
    pub(crate) fn tail(&self) -> String {
        let text = std::fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }

    /// The tail of the output under a heading that names the broker.
    pub(crate) fn report(&self, broker: &str) -> String {
        format!(
            "--- {broker}: the last lines of its output ({}) ---\n{}\n--- end of the output of {broker} ---",
            self.path.display(),
            self.tail()
        )
    }
}

/// Removes a private broker's directory; but when the test that owns the
/// broker fails (the thread unwinds from a panic), shows the tail of its
/// output and keeps the directory, whose files say more. Quiet otherwise.
pub(crate) fn clean_up(broker: &str, log: &BrokerLog, dir: &Path) {
    if std::thread::panicking() {
        eprintln!(
            "{}\n(the directory {} is kept)",
            log.report(broker),
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// How a start that did not come up ended.
#[derive(Debug)]
pub(crate) enum NotUp {
    /// The process exited: it will never answer.
    Exited(std::process::ExitStatus),
    /// Still running, but not ready within the ceiling.
    Hung(Duration),
}

impl std::fmt::Display for NotUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(status) => write!(f, "exited at start ({status})"),
            Self::Hung(ceiling) => write!(f, "was not ready within {ceiling:?}, and still runs"),
        }
    }
}

/// Waits until `ready` answers yes, checking every 20 ms, and gives up at
/// once when `child` has exited. `ceiling` is only a last resort against a
/// broker that hangs: a broker that starts returns as soon as it answers, and
/// one that dies fails when it dies, however loaded the machine.
pub(crate) fn wait_until_ready(
    child: &mut Child,
    ceiling: Duration,
    ready: impl Fn() -> bool,
) -> std::result::Result<Duration, NotUp> {
    let t = Instant::now();
    loop {
        // Ready first: a broker that answered and then exited is seen exited
        // by the next check of whoever uses it.
        if ready() {
            return Ok(t.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotUp::Exited(status));
        }
        if t.elapsed() > ceiling {
            return Err(NotUp::Hung(ceiling));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a private `redis-server` may take to answer before it is taken
/// for hung. It answers in milliseconds (an append-only file to load takes
/// longer, but this one is small); the ceiling only bounds a hang, and stays
/// well below the time after which nextest ends a test (`.config/nextest.toml`),
/// so that the test fails with the broker's output.
pub(crate) const REDIS_CEILING: Duration = Duration::from_secs(30);

/// A private `redis-server`, on its own port and directory, that a test may
/// kill and restart. With `durable`, it writes an fsync'd append-only file, so
/// what it acknowledged survives a kill. Its output is kept in its directory
/// and shown when it fails to start or the test fails.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    durable: bool,
    /// Options added to the command line, after the harness's own.
    extra: Vec<String>,
    /// The TLS port, for a server started with TLS.
    tls_port: Option<u16>,
    log: BrokerLog,
    child: Option<Child>,
}

/// A broker's TLS listener: its port, and its certificate, key and CA files.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub port: u16,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsListener {
    /// A listener on a free port with these PEM files.
    pub fn new(cert: PathBuf, key: PathBuf, ca: PathBuf) -> Result<Self> {
        Ok(Self {
            port: free_port()?,
            cert,
            key,
            ca,
        })
    }

    fn path(p: &std::path::Path) -> Result<&str> {
        p.to_str().context("a TLS file's path is not UTF-8")
    }
}

impl RedisServer {
    /// Starts one; an error if `redis-server` is missing or does not start.
    pub fn start(durable: bool) -> Result<Self> {
        Self::start_with(durable, &[])
    }

    /// Starts one that also listens with TLS (clients need no certificate
    /// of their own); an error if `redis-server` was built without TLS.
    pub fn start_tls(tls: TlsListener) -> Result<Self> {
        let port = tls.port.to_string();
        let mut s = Self::start_with(
            false,
            &[
                "--tls-port",
                &port,
                "--tls-auth-clients",
                "no",
                "--tls-cert-file",
                TlsListener::path(&tls.cert)?,
                "--tls-key-file",
                TlsListener::path(&tls.key)?,
                "--tls-ca-cert-file",
                TlsListener::path(&tls.ca)?,
            ],
        )?;
        s.tls_port = Some(tls.port);
        Ok(s)
    }

    /// Starts one with further command-line options `extra`.
    fn start_with(durable: bool, extra: &[&str]) -> Result<Self> {
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
            log: BrokerLog::new(&dir),
            dir,
            durable,
            extra: extra.iter().map(|&a| a.to_owned()).collect(),
            tls_port: None,
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:TLS-PORT`, for a server started with TLS.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}"))
    }

    fn spawn(&mut self) -> Result<()> {
        let out = self.log.next_start()?;
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
        // Without a log file it logs to its stdout, kept with its stderr
        // (where a refused option is reported) in its directory.
        .args(["--logfile", ""])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.extra);
        let child = self
            .child
            .insert(cmd.spawn().context("starting redis-server")?);
        let addr = format!("127.0.0.1:{}", self.port);
        if let Err(not_up) = wait_until_ready(child, REDIS_CEILING, || redis_answers(&addr)) {
            self.kill();
            bail!(
                "redis-server on port {} {not_up}\n{}",
                self.port,
                self.log.report("redis-server")
            );
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
        clean_up(
            &format!("redis-server on port {}", self.port),
            &self.log,
            &self.dir,
        );
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

/// Starts a watchdog in process group `group` that kills the whole group
/// once process `owner` is gone. A test process that is ended from outside
/// (nextest ends a test that runs too long) runs no drop, and a broker in a
/// process group of its own is not ended with the test's group: without the
/// watchdog, it would run on, holding its ports, for good.
fn watchdog(group: u32, owner: u32) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .args([
            "-c",
            "while kill -0 \"$0\" 2>/dev/null; do sleep 1; done; kill -KILL 0",
            &owner.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(i32::try_from(group)?)
        .spawn()
        .context("starting the watchdog of a private broker")
}

/// How long one start of a private `rabbitmq-server` may take to answer
/// before it is taken for hung. It answers in 5 to 30 s, depending on the
/// load of the machine; the ceiling only bounds a hang, and stays below the
/// time after which nextest ends a test (`.config/nextest.toml`), so that the
/// test fails with the broker's output.
const RABBIT_CEILING: Duration = Duration::from_secs(60);

/// A private `rabbitmq-server` on its own ports, node name and directory,
/// that a test may kill and restart without disturbing other tests. Its
/// output (its log included) is kept in its directory and shown when it fails
/// to start or the test fails.
pub struct RabbitServer {
    pub port: u16,
    tls_port: Option<u16>,
    dist_port: u16,
    node: String,
    dir: PathBuf,
    log: BrokerLog,
    child: Option<Child>,
    /// Kills the broker's process group once this test process is gone.
    watchdog: Option<Child>,
}

impl RabbitServer {
    /// Starts one (about 5 to 15 s); an error if `rabbitmq-server` is missing
    /// or does not start.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// Starts one that also listens with TLS (clients need no certificate
    /// of their own).
    pub fn start_tls(tls: TlsListener) -> Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<TlsListener>) -> Result<Self> {
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
            tls_port: tls.as_ref().map(|t| t.port),
            dist_port: free_port()?,
            node: format!("{name}@localhost"),
            log: BrokerLog::new(&dir),
            dir,
            child: None,
            watchdog: None,
        };
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n");
        if let Some(t) = &tls {
            conf.push_str(&format!(
                "listeners.ssl.local = 127.0.0.1:{}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                t.port,
                t.ca.display(),
                t.cert.display(),
                t.key.display()
            ));
        }
        std::fs::write(s.dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(s.dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(s.dir.join("enabled_plugins"), "[].\n")?;
        s.spawn()?;
        Ok(s)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqps://guest:guest@127.0.0.1:TLS-PORT/%2f`, for a server started
    /// with TLS.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port
            .map(|p| format!("amqps://guest:guest@127.0.0.1:{p}/%2f"))
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
            // Its log to its stdout, kept with the rest of its output.
            .env("RABBITMQ_LOGS", "-")
            .stdin(Stdio::null())
            // Its own process group: the script starts the Erlang VM as a
            // child, and a kill must reach it.
            .process_group(0);
        // A broker started again on the same node name can exit at once
        // while the killed one is still registered; it is then started
        // again.
        let addr = format!("127.0.0.1:{}", self.port);
        let mut attempt = 1;
        loop {
            let out = self.log.next_start()?;
            cmd.stdout(out.try_clone()?).stderr(out);
            let child = self
                .child
                .insert(cmd.spawn().context("starting rabbitmq-server")?);
            self.watchdog = Some(watchdog(child.id(), std::process::id())?);
            let not_up = match wait_until_ready(child, RABBIT_CEILING, || amqp_answers(&addr)) {
                Ok(_) => return Ok(()),
                Err(not_up) => not_up,
            };
            self.kill();
            // A hung broker is not given another ceiling's worth of time.
            if attempt == 3 || matches!(not_up, NotUp::Hung(_)) {
                bail!(
                    "rabbitmq-server on port {} {not_up} (start {attempt})\n{}",
                    self.port,
                    self.log.report("rabbitmq-server")
                );
            }
            eprintln!(
                "rabbitmq-server on port {}: start {attempt} {not_up}; starting it again",
                self.port
            );
            attempt += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Kills the server (SIGKILL to its whole process group: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.wait();
        }
        // In the same group, so killed with it.
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.wait();
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
        clean_up(
            &format!("rabbitmq-server on port {}", self.port),
            &self.log,
            &self.dir,
        );
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
        assert!(!nats_answers("127.0.0.1:1"));
        let r = require("nothing on port 1", false);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.to_string().contains("nothing on port 1")),
            "a missing service must fail the test: {r:?}"
        );
        assert!(require("x", true).is_ok());
    }

    #[test]
    fn a_watchdog_kills_the_group_of_a_broker_once_its_owner_is_gone() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        // A broker in a group of its own, owned by a process that ends soon.
        let mut broker = Command::new("sleep")
            .arg("600")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let mut owner = Command::new("sleep").arg("0.3").spawn().expect("sleep");
        let mut w = watchdog(broker.id(), owner.id()).expect("watchdog");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            broker.try_wait().expect("try_wait").is_none(),
            "killed while its owner runs"
        );
        owner.wait().expect("owner");
        let t = Instant::now();
        let ended = loop {
            if let Some(status) = broker.try_wait().expect("try_wait") {
                break status;
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = broker.kill();
                panic!("the broker outlived its owner by 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(ended.signal(), Some(9), "{ended:?}");
        let _ = w.wait();
    }

    #[test]
    fn a_private_redis_that_exits_at_start_fails_at_once_with_its_output() {
        let t = Instant::now();
        let Err(e) = RedisServer::start_with(false, &["--no-such-option", "x"]) else {
            panic!("a redis-server with an unknown option started");
        };
        let e = format!("{e:#}");
        let took = t.elapsed();
        assert!(e.contains("exited at start"), "{e}");
        // What redis-server said of the option, from its kept output.
        assert!(e.contains("Bad directive"), "{e}");
        assert!(
            took < Duration::from_secs(5),
            "failed only after {took:?}, though it exited at once: {e}"
        );
    }

    #[test]
    fn a_private_redis_keeps_its_output_across_restarts_and_after_a_failed_test() {
        let mut rs = RedisServer::start(false).unwrap_or_else(|e| panic!("{e:#}"));
        rs.restart().unwrap_or_else(|e| panic!("{e:#}"));
        let tail = rs.log.tail();
        for mark in ["--- start 1 ---", "--- start 2 ---"] {
            assert!(tail.contains(mark), "{mark} missing from:\n{tail}");
        }
        assert_eq!(
            tail.matches("Ready to accept connections").count(),
            2,
            "{tail}"
        );
        let dir = rs.dir.clone();
        drop(rs);
        assert!(!dir.exists(), "the directory of a passing test is removed");

        // A test that fails while it owns one: the directory, and its output,
        // are kept.
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = std::thread::spawn(move || {
            let rs = RedisServer::start(false).unwrap_or_else(|e| panic!("{e:#}"));
            let _ = tx.send(rs.dir.clone());
            panic!("a test that fails, on purpose, while it owns a private redis-server");
        });
        assert!(owner.join().is_err());
        let dir = rx.recv().expect("the owner started its redis-server");
        let kept = dir.join("server.out").exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(kept, "the output of a failed test's broker is kept");
    }
}
