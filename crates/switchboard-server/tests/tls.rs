//! TLS: `wss://`, `https://` and TCP over TLS with `--tls-cert`/`--tls-key`,
//! the certificate read again on SIGHUP, and `rediss://` / `amqps://` to the
//! brokers. Every certificate is made here, by a CA of the test's own.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::json;
use switchboard_server::config::{ConfigError, ServeArgs, ServeConfig};
use switchboard_server::node::{self, Running};
use switchboard_test::client::{tls_connect, tls_trusting};
use switchboard_test::cluster::ProcessNode;
use switchboard_test::services::{RabbitServer, RedisServer, TlsListener, unique_prefix};
use switchboard_test::{Client, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::ClientConfig;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// A certificate authority of the test's own.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost: the chain (leaf,
    /// then this CA) and the key, in PEM.
    fn issue(&self) -> (String, String) {
        let p =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (format!("{}{}", cert.pem(), self.pem()), key.serialize_pem())
    }

    fn trust(&self) -> Arc<ClientConfig> {
        tls_trusting(self.pem().as_bytes()).unwrap()
    }
}

/// A directory with `cert.pem`, `key.pem` and `ca.pem` of a CA's certificate.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(ca: &Ca) -> Self {
        let dir = std::env::temp_dir().join(unique_prefix("tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let f = Self { dir };
        f.write(ca);
        f
    }

    /// Writes a new certificate of `ca` over the files.
    fn write(&self, ca: &Ca) {
        let (chain, key) = ca.issue();
        std::fs::write(self.cert(), chain).unwrap();
        std::fs::write(self.key(), key).unwrap();
        std::fs::write(self.ca(), ca.pem()).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    fn listener(&self) -> TlsListener {
        TlsListener::new(self.cert(), self.key(), self.ca()).unwrap()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_args(files: &Files) -> ServeArgs {
    ServeArgs {
        ws: Some("127.0.0.1:0".into()),
        tcp: Some("127.0.0.1:0".into()),
        tls_cert: Some(files.cert()),
        tls_key: Some(files.key()),
        ..ServeArgs::default()
    }
}

async fn start(args: ServeArgs) -> Result<(ServeConfig, Running)> {
    let cfg = ServeConfig::load(args)?;
    let running = node::launch(&cfg, node::backplane(&cfg.cluster).await?).await?;
    Ok((cfg, running))
}

/// `GET path` over TLS: the whole response.
async fn https_get(addr: SocketAddr, tls: &Arc<ClientConfig>, path: &str) -> Result<String> {
    let mut s = tls_connect(addr, tls).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    // A server that closes without close_notify still answered.
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn online(c: &mut Client, uid: &str) -> Result<bool> {
    let r = c.ask(json!({"op": "online", "uid": uid})).await?;
    Ok(r["online"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_https_and_tcp_over_tls_and_nothing_in_the_clear() -> Result<()> {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca);
    let (_cfg, n) = start(tls_args(&files)).await?;
    let (ws, tcp) = (n.ws.unwrap(), n.tcp.unwrap());
    let trust = ca.trust();

    let mut alice = Client::wss(ws, "alice", &trust).await?;
    let mut bob = Client::tcp_tls(tcp, "bob", &trust).await?;
    assert_eq!(alice.node, bob.node);
    assert!(online(&mut alice, "bob").await?);
    assert!(online(&mut bob, "alice").await?);
    alice
        .send(json!({"op": "to_user", "uid": "bob", "data": "over tls"}))
        .await?;
    assert_eq!(bob.recv().await?, "over tls");
    bob.send(json!({"op": "to_user", "uid": "alice", "data": "and back"}))
        .await?;
    assert_eq!(alice.recv().await?, "and back");
    // A line longer than the server reads at once: the rest, decrypted
    // already, is read without waiting for the socket.
    let long = "y".repeat(20_000);
    bob.send(json!({"op": "to_user", "uid": "alice", "data": long}))
        .await?;
    assert_eq!(alice.recv().await?, long);

    // The node's HTTP endpoints are HTTPS too.
    let ready = https_get(ws, &trust, "/ready").await?;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // A burst larger than the socket takes while the client does not read:
    // rustls holds what the socket refused, and all of it must still go out
    // once the client reads, with nothing more written after it.
    let data = "x".repeat(16 * 1024);
    for i in 0..200 {
        alice
            .send(json!({"op": "to_user", "uid": "bob", "data": format!("{i:03}{data}")}))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..200 {
        let got = bob.recv().await.with_context(|| format!("message {i}"))?;
        assert_eq!(&got[..3], format!("{i:03}"), "in order");
        assert_eq!(got.len(), 3 + data.len());
    }

    // Nothing is served in the clear, and a client that does not trust the
    // certificate does not get in.
    assert!(Client::ws(ws, "eve", None).await.is_err());
    assert!(
        tokio::time::timeout(Duration::from_secs(3), Client::tcp(tcp, "eve", None))
            .await
            .map_or(true, |r| r.is_err())
    );
    let stranger = Ca::new("another CA").trust();
    assert!(Client::wss(ws, "eve", &stranger).await.is_err());
    assert!(Client::tcp_tls(tcp, "eve", &stranger).await.is_err());
    // The refused handshakes are counted.
    let stats = https_get(ws, &trust, "/stats").await?;
    let body = stats.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).with_context(|| stats.clone())?;
    assert!(v["conns_rejected"].as_u64() >= Some(4), "{v}");
    n.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_new_certificate_and_keeps_open_connections() -> Result<()> {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::new(&old_ca);
    let (cfg, n) = start(tls_args(&files)).await?;
    let (ws, tcp) = (n.ws.unwrap(), n.tcp.unwrap());
    let mut alice = Client::wss(ws, "alice", &old_ca.trust()).await?;
    let mut bob = Client::tcp_tls(tcp, "bob", &old_ca.trust()).await?;

    files.write(&new_ca);
    assert!(node::reload_tls(&cfg), "the new pair is served");
    // Open connections go on with the session they negotiated.
    assert!(online(&mut alice, "bob").await?);
    assert!(online(&mut bob, "alice").await?);
    alice
        .send(json!({"op": "to_user", "uid": "bob", "data": "still here"}))
        .await?;
    assert_eq!(bob.recv().await?, "still here");
    // New handshakes get the new certificate, on both listeners.
    assert!(tls_connect(ws, &old_ca.trust()).await.is_err());
    assert!(tls_connect(tcp, &old_ca.trust()).await.is_err());
    let mut carol = Client::wss(ws, "carol", &new_ca.trust()).await?;
    let mut dave = Client::tcp_tls(tcp, "dave", &new_ca.trust()).await?;
    assert!(online(&mut carol, "alice").await?);
    assert!(online(&mut dave, "bob").await?);

    // A broken pair is refused and the current one stays: a certificate
    // that is not PEM, then a key that is not the certificate's.
    let (good_chain, good_key) = (
        std::fs::read(files.cert()).unwrap(),
        std::fs::read(files.key()).unwrap(),
    );
    std::fs::write(files.cert(), "not a certificate").unwrap();
    assert!(!node::reload_tls(&cfg));
    std::fs::write(files.cert(), &good_chain).unwrap();
    std::fs::write(files.key(), KeyPair::generate().unwrap().serialize_pem()).unwrap();
    assert!(!node::reload_tls(&cfg));
    std::fs::remove_file(files.key()).unwrap();
    assert!(!node::reload_tls(&cfg));
    std::fs::write(files.key(), &good_key).unwrap();
    let mut erin = Client::wss(ws, "erin", &new_ca.trust()).await?;
    assert!(online(&mut erin, "carol").await?);
    n.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn tls_options_come_in_pairs_and_bad_files_are_a_clear_error() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca);
    let load = |cert: Option<PathBuf>, key: Option<PathBuf>| {
        ServeConfig::load(ServeArgs {
            tls_cert: cert,
            tls_key: key,
            ..ServeArgs::default()
        })
    };
    let err = load(Some(files.cert()), None).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Tls(e) if e.contains("--tls-key")),
        "{err}"
    );
    let err = load(None, Some(files.key())).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Tls(e) if e.contains("--tls-cert")),
        "{err}"
    );
    let missing = files.dir.join("missing.pem");
    let err = load(Some(missing), Some(files.key())).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // The key where the certificate should be: named, and the key's
    // content never shown.
    let err = load(Some(files.key()), Some(files.key())).unwrap_err();
    let key = std::fs::read_to_string(files.key()).unwrap();
    let key_body = key.lines().nth(1).unwrap();
    assert!(err.to_string().contains("no certificate"), "{err}");
    assert!(!err.to_string().contains(key_body), "{err}");
    let cfg = load(Some(files.cert()), Some(files.key())).unwrap();
    assert!(cfg.tls.is_some());
    let help = ServeConfig::default();
    assert!(help.tls.is_none(), "no TLS unless asked");
}

/// Waits until `ok` holds, for up to [`STEP`].
async fn eventually<F, Fut>(what: &str, mut ok: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STEP;
    while !ok().await {
        if Instant::now() > deadline {
            bail!("{what}: not within {STEP:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn sighup_makes_the_binary_serve_the_new_certificate() -> Result<()> {
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::new(&old_ca);
    let (cert, key) = (files.cert(), files.key());
    let n = ProcessNode::spawn(
        BIN.as_ref(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await?;
    let ws = n.ws.unwrap();
    let mut alice = Client::wss(ws, "alice", &old_ca.trust()).await?;

    files.write(&new_ca);
    let hup = tokio::process::Command::new("kill")
        .args(["-HUP", &n.pid().to_string()])
        .status()
        .await?;
    assert!(hup.success());
    let trust = new_ca.trust();
    eventually("a handshake with the new certificate", || async {
        tls_connect(ws, &trust).await.is_ok()
    })
    .await?;
    assert!(
        online(&mut alice, "alice").await?,
        "the open connection works"
    );
    let mut bob = Client::wss(ws, "bob", &trust).await?;
    assert!(online(&mut bob, "alice").await?);
    // The signal did not stop the node: SIGTERM still closes it cleanly.
    assert!(n.terminate().await?.success());
    assert_eq!(alice.expect_closed(STEP).await?, Some(1001));
    Ok(())
}

/// Two processes of the binary on `cluster`, trusting `ca` (the system
/// trust store replaced by SSL_CERT_FILE), each serving plain listeners.
async fn two_nodes(cluster: &str, ca: &Path) -> Result<(ProcessNode, ProcessNode)> {
    let env = [("SSL_CERT_FILE", ca.to_str().unwrap())];
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let args = ["--cluster", cluster, "--node-id", id];
        let spawn = ProcessNode::spawn_with_env(BIN.as_ref(), &args, &env);
        nodes.push(tokio::time::timeout(STEP, spawn).await??);
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    Ok((a, b))
}

/// The broker's certificate is checked: trusting another CA, a node cannot
/// join `cluster`, and says why.
async fn refused_without_trust(cluster: &str) -> Result<()> {
    let stranger = Files::new(&Ca::new("another CA"));
    let out = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--ws",
            "127.0.0.1:0",
            "--tcp",
            "off",
            "--cluster",
            cluster,
        ])
        .env("SSL_CERT_FILE", stranger.ca())
        .env("RUST_BACKTRACE", "0")
        .output();
    let out = tokio::time::timeout(STEP * 3, out).await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("certificate"), "{err}");
    Ok(())
}

/// Until the node's `/ready` answers 200.
async fn ready(addr: SocketAddr) -> Result<()> {
    eventually("/ready", || async {
        switchboard_test::services::http_get(addr, "/ready")
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await
}

/// Alice on one node reaches Bob on the other through the broker.
async fn across(a: &ProcessNode, b: &ProcessNode) -> Result<()> {
    let mut alice = Client::ws(a.ws.unwrap(), "alice", None).await?;
    let mut bob = Client::ws(b.ws.unwrap(), "bob", None).await?;
    let deadline = Instant::now() + STEP;
    while !online(&mut alice, "bob").await? {
        if Instant::now() > deadline {
            bail!("bob never online, seen from a");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    alice
        .send(json!({"op": "to_user", "uid": "bob", "data": "via the broker"}))
        .await?;
    assert_eq!(bob.recv().await?, "via the broker");
    Ok(())
}

#[tokio::test]
async fn rediss_carries_the_cluster_over_tls_to_a_verified_redis() -> Result<()> {
    let ca = Ca::new("redis CA");
    let files = Files::new(&ca);
    let redis = RedisServer::start_tls(files.listener())?;
    let url = format!(
        "{}?prefix={}",
        redis.tls_url().unwrap(),
        unique_prefix("rediss")
    );

    let (a, b) = two_nodes(&url, &files.ca()).await?;
    ready(a.ws.unwrap()).await?;
    across(&a, &b).await?;
    refused_without_trust(&url).await?;
    assert!(a.terminate().await?.success());
    assert!(b.terminate().await?.success());
    Ok(())
}

#[tokio::test]
async fn amqps_carries_the_cluster_over_tls_to_a_verified_rabbitmq() -> Result<()> {
    let ca = Ca::new("rabbitmq CA");
    let files = Files::new(&ca);
    let rabbit = RabbitServer::start_tls(files.listener())?;
    let url = format!(
        "{}?prefix={}",
        rabbit.tls_url().unwrap(),
        unique_prefix("amqps")
    );

    let (a, b) = two_nodes(&url, &files.ca()).await?;
    ready(a.ws.unwrap()).await?;
    ready(b.ws.unwrap()).await?;
    across(&a, &b).await?;
    // Over TLS indeed: the broker lists the nodes' connections as TLS.
    let ctl = rabbit.ctl();
    let conns = ctl.list(
        "list_connections",
        &["ssl", "client_properties"],
        "switchboard",
    )?;
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert!(conns.iter().all(|c| c.starts_with("true")), "{conns:?}");
    refused_without_trust(&url).await?;
    for n in [a, b] {
        assert!(n.terminate().await?.success());
    }
    Ok(())
}
