//! TLS for the node's gRPC port and for the calls it makes to other nodes (forwarded reads,
//! Peer snapshots), with one identity: the node's certificate serves its port and is
//! presented to its peers when they ask for a client certificate (mutual TLS).
//!
//! The certificate, key and CAs are read again on SIGHUP and when a file's modification time
//! or size changes. A new set is used only once it loads and verifies (the key matches the
//! certificate, the certificate is current, signed by `ca` for the advertised host and, with
//! mutual TLS, by `client-ca`); otherwise it is logged, counted, and the set in use kept.
//! A reload swaps the whole rustls configuration (so that CAs rotate too): connections open
//! keep the handshake they made, and every new one gets the new set.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::Digest as _;
use tokio::net::TcpStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::transport::server::TcpIncoming;

use crate::config::TlsConfig;

/// Certificate sets loaded after a change (SIGHUP or files), by outcome (`ok`, `failed`).
pub const TLS_RELOADS: &str = "kstore_tls_reloads_total";
/// TLS handshakes on the gRPC port that failed (no or a wrong client certificate, a client
/// that does not trust the node's CA, or no handshake within the time allowed).
pub const TLS_HANDSHAKE_FAILURES: &str = "kstore_tls_handshake_failures_total";

/// How long a caller has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The only application protocol served: gRPC's HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// Why a certificate set cannot be used. Each names the `[tls]` key at fault.
#[derive(Debug, thiserror::Error)]
#[error("tls.{key} ({path}): {reason}")]
pub struct TlsError {
    /// The key at fault (`cert`, `key`, `ca`, `client-ca`).
    pub key: &'static str,
    /// Its file.
    pub path: String,
    /// Why.
    pub reason: String,
}

/// Returns the crypto provider every TLS configuration of kstore uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process's default rustls crypto provider, so that code which asks
/// for the default finds one even when another provider is linked in too. Call it once at
/// process start; a second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// One loaded and verified certificate set.
#[derive(Debug)]
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    fingerprint: String,
}

/// The node's TLS identity and trust, reloadable.
#[derive(Debug)]
pub struct Tls {
    settings: TlsConfig,
    /// The advertised host: the node's certificate must name it.
    host: String,
    current: RwLock<Arc<Loaded>>,
    /// The files' modification times and sizes when last read.
    seen: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Tls {
    /// Loads and verifies the set `settings` names, for a node advertised as `host` (an IP
    /// address or a DNS name, without port).
    pub fn load(settings: TlsConfig, host: &str) -> Result<Arc<Tls>, TlsError> {
        let seen = stamps(&settings);
        let loaded = load(&settings, host)?;
        tracing::info!(
            sha256 = %loaded.fingerprint,
            mutual = settings.mutual(),
            "serving gRPC over TLS"
        );
        Ok(Arc::new(Tls {
            settings,
            host: host.to_owned(),
            current: RwLock::new(Arc::new(loaded)),
            seen: Mutex::new(seen),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Returns the server configuration in use.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// Returns the configuration for calls to other nodes in use.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Returns the SHA-256 of the node's certificate in use, in hex.
    pub fn fingerprint(&self) -> String {
        self.current().fingerprint.clone()
    }

    /// Reads the set again and uses it if it loads and verifies; otherwise logs and counts
    /// why, and keeps the set in use. Returns whether the new set is in use.
    pub fn reload(&self, why: &str) -> bool {
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = stamps(&self.settings);
        match load(&self.settings, &self.host) {
            Ok(loaded) => {
                tracing::info!(
                    why,
                    sha256 = %loaded.fingerprint,
                    "TLS certificates reloaded"
                );
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
                metrics::counter!(TLS_RELOADS, "outcome" => "ok").increment(1);
                true
            }
            Err(error) => {
                tracing::error!(
                    why,
                    %error,
                    sha256 = %self.fingerprint(),
                    "new TLS certificates refused; the ones in use are kept"
                );
                metrics::counter!(TLS_RELOADS, "outcome" => "failed").increment(1);
                false
            }
        }
    }

    /// Whether a file changed (modification time or size) since it was last read.
    fn files_changed(&self) -> bool {
        let now = stamps(&self.settings);
        *self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            != now
    }

    /// Reloads on SIGHUP and when the files change, forever (run it as a task).
    pub async fn watch(self: Arc<Self>) {
        let interval = Duration::from_millis(self.settings.reload_interval_ms);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot handle SIGHUP; TLS files are still polled");
                None
            }
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let signalled = async {
                match &mut hangup {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = ticker.tick() => {
                    if self.files_changed() {
                        self.reload("files changed");
                    }
                }
                _ = signalled => {
                    self.reload("SIGHUP");
                }
            }
        }
    }

    /// Returns the TLS connections made on `tcp`: each handshake runs on a task of its own
    /// (a slow caller holds up no other), with the set in use when it starts.
    pub fn incoming(
        self: &Arc<Self>,
        mut tcp: TcpIncoming,
    ) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = tcp.next() => accepted,
                    () = sender.closed() => return,
                };
                let stream = match accepted {
                    Some(Ok(stream)) => stream,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "accepting a gRPC connection");
                        continue;
                    }
                    None => return,
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
                let sender = sender.clone();
                tokio::spawn(async move {
                    let remote = stream.peer_addr().ok();
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send(Ok(stream)).await;
                        }
                        Ok(Err(error)) => {
                            metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
                            tracing::info!(%error, ?remote, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
                            tracing::info!(?remote, "TLS handshake timed out");
                        }
                    }
                });
            }
        });
        ReceiverStream::new(receiver)
    }

    /// Returns a connector for tonic channels to other nodes: TLS with the set in use when
    /// each connection is made, verifying the node by the host of the address dialed (its
    /// advertised host).
    pub fn connector(self: &Arc<Self>) -> Connector {
        Connector { tls: self.clone() }
    }
}

/// Dials other nodes over TLS (see [`Tls::connector`]). Use it with an `http://` endpoint:
/// the connector, not tonic, does the TLS.
#[derive(Debug, Clone)]
pub struct Connector {
    tls: Arc<Tls>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.client_config();
        Box::pin(async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"))
            };
            let host = uri
                .host()
                .ok_or_else(|| invalid("no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("not a host name for TLS"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The files a set is read from, with their keys.
fn files(settings: &TlsConfig) -> [(&'static str, &Path); 4] {
    [
        ("cert", &settings.cert),
        ("key", &settings.key),
        ("ca", &settings.ca),
        ("client-ca", &settings.client_ca),
    ]
}

fn stamps(settings: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    files(settings)
        .iter()
        .map(|(_, path)| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.modified().ok()?, metadata.len()))
        })
        .collect()
}

fn error(key: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| error(key, path, e))
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(key, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(error(key, path, "holds no certificate"));
    }
    Ok(certs)
}

fn roots(key: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(key, path)? {
        roots
            .add(cert)
            .map_err(|e| error(key, path, format!("not a CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// Loads the set and checks that it works: the key matches the certificate, which is
/// current, signed by `ca` for `host`, and (with mutual TLS) by `client-ca` as a client.
fn load(settings: &TlsConfig, host: &str) -> Result<Loaded, TlsError> {
    let provider = provider();
    let chain = certificates("cert", &settings.cert)?;
    let key_pem = read("key", &settings.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| error("key", &settings.key, format!("not a PEM private key: {e}")))?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
        .map_err(|e| error("key", &settings.key, format!("does not fit tls.cert: {e}")))?;
    let fingerprint = hex(&sha2::Sha256::digest(chain[0].as_ref()));
    let now = UnixTime::now();

    let server_roots = roots("ca", &settings.ca)?;
    let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        server_roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| error("ca", &settings.ca, e))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|_| {
        error(
            "cert",
            &settings.cert,
            format!("{host:?} is not a host name"),
        )
    })?;
    server_verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
        .map_err(|e| {
            error(
                "cert",
                &settings.cert,
                format!("does not verify as the server {host} with tls.ca: {e}"),
            )
        })?;

    let protocols = |key: &'static str, path: &Path, e: rustls::Error| error(key, path, e);
    let server_builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| protocols("cert", &settings.cert, e))?;
    let server_builder = if settings.mutual() {
        let client_roots = roots("client-ca", &settings.client_ca)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(client_roots, provider.clone())
            .build()
            .map_err(|e| error("client-ca", &settings.client_ca, e))?;
        // The node presents its certificate to its peers, which verify it with this CA.
        verifier
            .verify_client_cert(&chain[0], &chain[1..], now)
            .map_err(|e| {
                error(
                    "cert",
                    &settings.cert,
                    format!("does not verify as a client with tls.client-ca: {e}"),
                )
            })?;
        server_builder.with_client_cert_verifier(verifier)
    } else {
        server_builder.with_no_client_auth()
    };
    let mut server = server_builder
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| error("key", &settings.key, e))?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];

    let mut client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| protocols("cert", &settings.cert, e))?
        .with_root_certificates(server_roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| error("key", &settings.key, e))?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];

    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        fingerprint,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The host part of an advertised `host:port` address, without an IPv6 address's brackets.
pub fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair,
    };

    use super::*;

    /// Writes a CA and a node certificate for 127.0.0.1 into `dir`; returns the settings.
    fn write_set(dir: &Path, ca: &CertifiedIssuer<'static, KeyPair>) -> TlsConfig {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("node-key.pem"), key.serialize_pem()).unwrap();
        TlsConfig {
            cert: dir.join("node.pem"),
            key: dir.join("node-key.pem"),
            ca: dir.join("ca.pem"),
            client_ca: dir.join("ca.pem"),
            ..TlsConfig::default()
        }
    }

    fn new_ca() -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    #[test]
    fn a_changed_set_is_seen_and_used_and_a_bad_one_is_refused_keeping_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca();
        let settings = write_set(dir.path(), &ca);
        let tls = Tls::load(settings.clone(), "127.0.0.1").unwrap();
        assert!(!tls.files_changed());
        let first = tls.fingerprint();

        // A key that does not fit the certificate: refused, the old set kept.
        std::fs::write(
            &settings.key,
            KeyPair::generate().unwrap().serialize_pem() + "\n",
        )
        .unwrap();
        assert!(tls.files_changed());
        assert!(!tls.reload("test"));
        assert!(
            !tls.files_changed(),
            "a refused set is not read again until it changes"
        );
        assert_eq!(tls.fingerprint(), first);

        // A good new set: used.
        write_set(dir.path(), &ca);
        assert!(tls.reload("test"));
        assert_ne!(tls.fingerprint(), first);

        // A certificate from another CA than tls.ca: refused, naming the key.
        let stranger = new_ca();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &stranger).unwrap();
        std::fs::write(&settings.cert, cert.pem()).unwrap();
        std::fs::write(&settings.key, key.serialize_pem()).unwrap();
        let error = load(&settings, "127.0.0.1").unwrap_err();
        assert_eq!(error.key, "cert", "{error}");
        assert!(error.to_string().contains("tls.ca"), "{error}");
    }

    #[test]
    fn a_certificate_must_name_the_advertised_host() {
        let dir = tempfile::tempdir().unwrap();
        let settings = write_set(dir.path(), &new_ca());
        let error = Tls::load(settings, "kstore-0.kstore-peers").unwrap_err();
        assert_eq!(error.key, "cert", "{error}");
        assert!(
            error.to_string().contains("kstore-0.kstore-peers"),
            "{error}"
        );
    }

    #[test]
    fn the_host_of_an_address_drops_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:50051"), "127.0.0.1");
        assert_eq!(
            host_of("kstore-0.kstore-peers:50051"),
            "kstore-0.kstore-peers"
        );
        assert_eq!(host_of("[::1]:50051"), "::1");
    }
}
