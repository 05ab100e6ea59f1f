//! TLS on the server's listeners (feature `tls`): `wss://`, `https://` and
//! TLS over raw TCP, with rustls.
//!
//! A [`Tls`] holds the rustls configuration new handshakes use. It can be
//! replaced while the server runs ([`Tls::replace`]), for instance when a
//! certificate is renewed: connections already open keep the session they
//! negotiated, new ones get the new certificate.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use tokio_rustls::rustls;

use crate::hub::Hub;

/// TLS settings shared by listeners: the rustls configuration that new
/// handshakes use, replaceable while serving. Clones share it, so one
/// [`Tls::replace`] reaches every listener it was given to.
#[derive(Clone)]
pub struct Tls {
    config: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// A certificate and key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// No `CERTIFICATE` block in the certificate PEM.
    #[error("no certificate found in the PEM")]
    NoCertificate,
    /// The certificate PEM cannot be parsed.
    #[error("invalid certificate PEM: {0}")]
    Certificate(String),
    /// No usable private key in the key PEM (PKCS#8, PKCS#1 or SEC1).
    #[error("no private key found in the PEM: {0}")]
    Key(String),
    /// rustls refused the pair (an unsupported key, or a key that is not the
    /// certificate's).
    #[error("certificate and key cannot be used: {0}")]
    Rejected(#[from] rustls::Error),
}

impl Tls {
    /// Serves with `config` (see [`Tls::from_pem`] for the usual one).
    pub fn new(config: ServerConfig) -> Self {
        Self {
            config: Arc::new(RwLock::new(Arc::new(config))),
        }
    }

    /// Serves the certificate chain (leaf first) and private key of these PEM
    /// texts, with rustls' defaults and the `ring` provider.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        Ok(Self::new(server_config(cert_chain, key)?))
    }

    /// New handshakes use `config` from now on; open connections are not
    /// touched.
    pub fn replace(&self, config: ServerConfig) {
        let config = Arc::new(config);
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
    }

    /// [`Tls::replace`] with the chain and key of these PEM texts; on error
    /// the current configuration stays.
    pub fn replace_pem(&self, cert_chain: &[u8], key: &[u8]) -> Result<(), TlsError> {
        self.replace(server_config(cert_chain, key)?);
        Ok(())
    }

    /// The configuration new handshakes use.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs the server side of a handshake on `stream`, within the hub's
    /// handshake timeout; `None` (counted as a rejected connection) when it
    /// fails, times out, or the hub begins shutting down.
    pub(crate) async fn accept(
        &self,
        hub: &Hub,
        stream: TcpStream,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.config());
        let closing = hub.closing();
        let timeout = hub.limits().handshake_timeout;
        let failed = |why: &dyn std::fmt::Display| {
            crate::stats::Counters::add(&hub.counters().rejected, 1);
            // Debug: scanners and clients with the wrong trust store fail
            // here all the time.
            tracing::debug!(error = %why, "TLS handshake failed");
        };
        tokio::select! {
            r = tokio::time::timeout(timeout, acceptor.accept(stream)) => match r {
                Ok(Ok(tls)) => Some(tls),
                Ok(Err(e)) => {
                    failed(&e);
                    None
                }
                Err(_) => {
                    failed(&"timed out");
                    None
                }
            },
            () = closing.cancelled() => None,
        }
    }
}

/// A rustls server configuration for a certificate chain and key in PEM.
fn server_config(cert_chain: &[u8], key: &[u8]) -> Result<ServerConfig, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Key(e.to_string()))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(ring()));
    Ok(ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?)
}

/// The provider used unless the process installed another: ring, which
/// builds without cmake or a C toolchain of its own. rustls marks it
/// deprecated for lacking post-quantum key exchange; a process that wants
/// that installs aws-lc-rs as its default provider, which is used instead.
#[allow(deprecated)]
fn ring() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A TLS stream under a raw TCP connection, with the non-blocking calls of
/// [`crate::transport::tcp`]'s wire. Boxed: rustls' state is large, and an
/// idle connection's task should not grow by it.
pub(crate) struct TlsIo(Box<tokio_rustls::server::TlsStream<TcpStream>>);

impl TlsIo {
    pub(crate) fn new(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        Self(Box::new(stream))
    }

    /// One poll with a waker that does nothing: what a readiness-based
    /// `try_` call does with a socket. The wait that follows registers the
    /// task's real waker.
    fn now<T>(
        &mut self,
        f: impl FnOnce(
            Pin<&mut tokio_rustls::server::TlsStream<TcpStream>>,
            &mut Context<'_>,
        ) -> Poll<io::Result<T>>,
    ) -> io::Result<T> {
        let mut cx = Context::from_waker(Waker::noop());
        match f(Pin::new(&mut *self.0), &mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl crate::transport::tcp::Io for TlsIo {
    async fn readable(&mut self) -> io::Result<()> {
        // Plaintext rustls has decrypted already (or the peer's close) is
        // there to read without the socket saying so.
        if !self.0.get_ref().1.wants_read() {
            return Ok(());
        }
        self.0.get_ref().0.readable().await
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        self.now(|s, cx| tokio_util::io::poll_read_buf(s, cx, buf))
    }

    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.now(|s, cx| s.poll_write(cx, buf))
    }

    fn try_flush(&mut self) -> io::Result<bool> {
        // rustls takes plaintext into its own buffer even when the socket is
        // full: written only once that buffer is out.
        match self.now(|s, cx| s.poll_flush(cx)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn writable(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *self.0).poll_flush(cx)).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        // close_notify, then the socket's write side.
        self.0.shutdown().await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpSocket};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    #[test]
    fn pem_errors_name_what_is_wrong() {
        assert!(matches!(
            Tls::from_pem(b"", b""),
            Err(TlsError::NoCertificate)
        ));
        let cert = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(Tls::from_pem(cert, b""), Err(TlsError::Key(_))));
    }

    /// A TLS connection over loopback with small socket buffers (so that a
    /// few writes fill them): the server's side, and the client's.
    pub(crate) async fn pair() -> (TlsIo, tokio_rustls::client::TlsStream<TcpStream>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let tls = Tls::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = ClientConfig::builder_with_provider(Arc::new(ring()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let (client_tcp, accepted) = tokio::join!(socket.connect(addr), l.accept());
        let (server_tcp, _) = accepted.unwrap();
        server_tcp.set_nodelay(true).unwrap();
        let _ = socket2::SockRef::from(&server_tcp).set_send_buffer_size(4096);
        let (server, client) = tokio::join!(
            TlsAcceptor::from(tls.config()).accept(server_tcp),
            TlsConnector::from(Arc::new(client))
                .connect(ServerName::from(addr.ip()), client_tcp.unwrap()),
        );
        (TlsIo::new(server.unwrap()), client.unwrap())
    }

    impl TlsIo {
        /// Whether rustls holds records it has not written yet.
        pub(crate) fn holds_records(&self) -> bool {
            self.0.get_ref().1.wants_write()
        }
    }
}
