//! Connecting to a broker outside librdkafka (the drain's LeaveGroup, the start-up check)
//! with the same `kafka.*` security settings that librdkafka gets: `security.protocol`, TLS
//! with `ssl.ca.location` (and a client certificate for mTLS), SASL PLAIN or SCRAM.
//!
//! TLS is rustls with the ring provider, given explicitly to every config built here, so
//! nothing depends on which provider the process installed. The broker's certificate must
//! chain to the configured CA and, unless `ssl.endpoint.identification.algorithm=none`,
//! name the host that was dialled, as librdkafka checks it. SASL is
//! [`kstore_kafka::sasl`] on top of the TLS stream.
//!
//! Every failure says which `kafka.*` key to look at: a node that cannot authenticate
//! refuses to start with that message instead of retrying forever.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse};
use kstore_kafka::sasl::{self, Credentials, Mechanism, SaslError};
use kstore_kafka::wire::{self, Connection, WireError};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore,
};

/// Metadata v12: Kafka 3.1 and later.
const METADATA_VERSION: i16 = 12;

/// `security.protocol`, as librdkafka names its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The name librdkafka and Kafka use.
    pub fn name(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }

    fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// Why the `kafka.*` security settings cannot be used for a connection of kstore's own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// A setting's value is wrong, or a file it names cannot be used.
    #[error("kafka.{key}: {reason}")]
    Invalid {
        /// The librdkafka key, without `kafka.`.
        key: &'static str,
        /// What is wrong and what to set.
        reason: String,
    },
    /// librdkafka may accept the settings, but kstore's own connections (the drain's
    /// LeaveGroup) do not speak them.
    #[error("kafka.{key}={value} is not supported by kstore's own broker connections: {instead}")]
    Unsupported {
        /// The librdkafka key, without `kafka.`.
        key: &'static str,
        /// Its value.
        value: String,
        /// What works instead.
        instead: &'static str,
    },
}

/// Why a connection to a broker failed. The message names what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The broker could not be reached.
    #[error("cannot reach broker {address}: {reason}")]
    Unreachable {
        /// The broker's `host:port`.
        address: String,
        /// Why.
        reason: String,
    },
    /// The broker closed the connection before it answered: most often a listener of
    /// another security protocol than the one configured.
    #[error(
        "broker {address} closed the connection while {doing}: check that \
         kafka.security.protocol ({protocol}) is the protocol of the listener that \
         kafka.bootstrap.servers names"
    )]
    Closed {
        /// The broker's `host:port`.
        address: String,
        /// What the connection was doing.
        doing: &'static str,
        /// The configured protocol.
        protocol: &'static str,
    },
    /// The broker's certificate failed verification.
    #[error("broker {address} presented a certificate that {reason}: {fix}")]
    UntrustedBroker {
        /// The broker's `host:port`.
        address: String,
        /// What is wrong with it.
        reason: String,
        /// What to set.
        fix: String,
    },
    /// The broker ended the TLS handshake with an alert.
    #[error(
        "broker {address} refused the TLS connection ({alert}): if its listener requires \
         client certificates (ssl.client.auth=required), set kafka.ssl.certificate.location \
         and kafka.ssl.key.location to a certificate and key that its truststore trusts"
    )]
    TlsRefused {
        /// The broker's `host:port`.
        address: String,
        /// The alert it sent.
        alert: String,
    },
    /// Another TLS failure.
    #[error("TLS with broker {address}: {reason}")]
    Tls {
        /// The broker's `host:port`.
        address: String,
        /// Why.
        reason: String,
    },
    /// The broker refused the SASL credentials.
    #[error(
        "broker {address} refused the credentials ({source}): check kafka.sasl.username and \
         kafka.sasl.password, and that the broker has {mechanism} credentials for that user"
    )]
    Rejected {
        /// The broker's `host:port`.
        address: String,
        /// The mechanism.
        mechanism: Mechanism,
        /// The broker's answer.
        source: SaslError,
    },
    /// The listener does not enable the configured mechanism.
    #[error(
        "broker {address}: {source}; set kafka.sasl.mechanism to one the listener enables, \
         or check that kafka.security.protocol is the listener's"
    )]
    MechanismNotEnabled {
        /// The broker's `host:port`.
        address: String,
        /// The broker's answer.
        source: SaslError,
    },
    /// Another SASL failure (a broker that cannot prove it knows the password included).
    #[error("SASL with broker {address}: {source}")]
    Sasl {
        /// The broker's `host:port`.
        address: String,
        /// Why.
        source: SaslError,
    },
    /// The broker answered, but not as Kafka.
    #[error("broker {address}: {source}")]
    Wire {
        /// The broker's `host:port`.
        address: String,
        /// Why.
        source: WireError,
    },
}

impl ConnectError {
    /// Whether the settings (or the broker's) are wrong, as opposed to a broker that is
    /// down or busy: retrying cannot help, someone must change a setting.
    pub fn is_configuration(&self) -> bool {
        match self {
            ConnectError::UntrustedBroker { .. }
            | ConnectError::TlsRefused { .. }
            | ConnectError::Tls { .. }
            | ConnectError::Rejected { .. }
            | ConnectError::MechanismNotEnabled { .. }
            | ConnectError::Sasl { .. } => true,
            ConnectError::Unreachable { .. }
            | ConnectError::Closed { .. }
            | ConnectError::Wire { .. } => false,
        }
    }
}

/// The stream under a broker connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum BrokerStream {
    /// PLAINTEXT and SASL_PLAINTEXT.
    Plain(TcpStream),
    /// SSL and SASL_SSL.
    Tls(Box<rustls::StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for BrokerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BrokerStream::Plain(stream) => stream.read(buf),
            BrokerStream::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for BrokerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BrokerStream::Plain(stream) => stream.write(buf),
            BrokerStream::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            BrokerStream::Plain(stream) => stream.flush(),
            BrokerStream::Tls(stream) => stream.flush(),
        }
    }
}

/// Opens authenticated connections to brokers with the node's `kafka.*` settings.
#[derive(Debug, Clone)]
pub struct Connector {
    protocol: SecurityProtocol,
    tls: Option<Arc<ClientConfig>>,
    /// Where the trusted CAs come from, for messages.
    trust: String,
    sasl: Option<Credentials>,
}

impl Connector {
    /// Reads the security settings among `kafka` (the node's `kafka.*` keys) and loads the
    /// files they name.
    pub fn from_settings(kafka: &BTreeMap<String, String>) -> Result<Self, SettingsError> {
        let get = |key: &str| kafka.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
        let protocol = match get("security.protocol")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("plaintext") => SecurityProtocol::Plaintext,
            Some("ssl") => SecurityProtocol::Ssl,
            Some("sasl_plaintext") => SecurityProtocol::SaslPlaintext,
            Some("sasl_ssl") => SecurityProtocol::SaslSsl,
            Some(other) => {
                return Err(SettingsError::Invalid {
                    key: "security.protocol",
                    reason: format!(
                        "{other} is not one of plaintext, ssl, sasl_plaintext, sasl_ssl"
                    ),
                });
            }
        };
        let sasl = protocol.sasl().then(|| credentials(&get)).transpose()?;
        let (tls, trust) = if protocol.tls() {
            let (config, trust) = tls_config(&get)?;
            (Some(Arc::new(config)), trust)
        } else {
            (None, String::new())
        };
        Ok(Connector {
            protocol,
            tls,
            trust,
            sasl,
        })
    }

    /// Returns whether the connections use TLS or SASL (anything but PLAINTEXT).
    pub fn is_secured(&self) -> bool {
        self.protocol != SecurityProtocol::Plaintext
    }

    /// The protocol, and the mechanism where SASL is used: `SASL_SSL with SCRAM-SHA-512`.
    pub fn describe(&self) -> String {
        match &self.sasl {
            Some(credentials) => format!(
                "{} with {} as {}",
                self.protocol.name(),
                credentials.mechanism,
                credentials.username
            ),
            None => self.protocol.name().to_owned(),
        }
    }

    /// Connects to `address` (`host:port`), with TLS and SASL as configured, and `timeout`
    /// on the connect and on every read and write.
    pub fn connect(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<Connection<BrokerStream>, ConnectError> {
        let mut tcp =
            wire::tcp_stream(address, timeout).map_err(|error| ConnectError::Unreachable {
                address: address.to_owned(),
                reason: match error {
                    WireError::Connect { reason, .. } => reason,
                    other => other.to_string(),
                },
            })?;
        let stream = match &self.tls {
            None => BrokerStream::Plain(tcp),
            Some(config) => {
                let host = host_of(address);
                let name =
                    ServerName::try_from(host.to_owned()).map_err(|_| ConnectError::Tls {
                        address: address.to_owned(),
                        reason: format!("{host} is neither a DNS name nor an IP address"),
                    })?;
                let mut tls = ClientConnection::new(config.clone(), name).map_err(|error| {
                    ConnectError::Tls {
                        address: address.to_owned(),
                        reason: error.to_string(),
                    }
                })?;
                while tls.is_handshaking() {
                    tls.complete_io(&mut tcp)
                        .map_err(|error| self.io_failure(address, "the TLS handshake", error))?;
                }
                BrokerStream::Tls(Box::new(rustls::StreamOwned::new(tls, tcp)))
            }
        };
        let mut connection = Connection::new(stream);
        if let Some(credentials) = &self.sasl {
            sasl::authenticate(&mut connection, credentials)
                .map_err(|error| self.sasl_failure(address, credentials, error))?;
        }
        Ok(connection)
    }

    /// Maps a failed call on a connection from [`Connector::connect`] to what to fix: with
    /// TLS 1.3, a broker that refuses the client's certificate says so only after the
    /// handshake, on the first read.
    pub fn call_failure(&self, address: &str, error: WireError) -> ConnectError {
        match error {
            WireError::Io { doing, source } => self.io_failure(address, doing, source),
            other => ConnectError::Wire {
                address: address.to_owned(),
                source: other,
            },
        }
    }

    /// Connects to the first of `bootstrap` (comma-separated `host:port`) that answers and
    /// asks it for metadata: the whole path that the drain's LeaveGroup takes, TLS and SASL
    /// included. Returns the broker that answered. A configuration error is returned at
    /// once; otherwise the last broker's error.
    pub fn check(&self, bootstrap: &str, timeout: Duration) -> Result<String, ConnectError> {
        let mut last = None;
        for address in bootstrap
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            let answered = self.connect(address, timeout).and_then(|mut connection| {
                connection
                    .call::<_, MetadataResponse>(
                        ApiKey::Metadata,
                        MetadataRequest::default().with_topics(Some(Vec::new())),
                        METADATA_VERSION,
                    )
                    .map_err(|error| self.call_failure(address, error))
            });
            match answered {
                Ok(_) => return Ok(address.to_owned()),
                Err(error) if error.is_configuration() => return Err(error),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Unreachable {
            address: bootstrap.to_owned(),
            reason: "kafka.bootstrap.servers names no broker".into(),
        }))
    }

    fn io_failure(&self, address: &str, doing: &'static str, error: io::Error) -> ConnectError {
        let tls_error = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let address = address.to_owned();
        match tls_error {
            Some(rustls::Error::InvalidCertificate(error)) => {
                let (reason, fix) = self.certificate_problem(error);
                ConnectError::UntrustedBroker {
                    address,
                    reason,
                    fix,
                }
            }
            Some(rustls::Error::AlertReceived(alert)) => ConnectError::TlsRefused {
                address,
                alert: format!("{alert:?}"),
            },
            Some(rustls::Error::InvalidMessage(_))
            | Some(rustls::Error::InappropriateMessage { .. })
            | Some(rustls::Error::InappropriateHandshakeMessage { .. }) => ConnectError::Closed {
                address,
                doing,
                protocol: self.protocol.name(),
            },
            Some(other) => ConnectError::Tls {
                address,
                reason: other.to_string(),
            },
            None => match error.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => ConnectError::Closed {
                    address,
                    doing,
                    protocol: self.protocol.name(),
                },
                _ => ConnectError::Unreachable {
                    address,
                    reason: format!("{doing}: {error}"),
                },
            },
        }
    }

    fn certificate_problem(&self, error: &CertificateError) -> (String, String) {
        let trust = &self.trust;
        let set_ca = format!(
            "set kafka.ssl.ca.location to the CA certificate (PEM) that signed the broker's \
             certificate (it trusts {trust} now)"
        );
        match error {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                ("is not signed by a trusted CA".into(), set_ca)
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                (
                    format!("does not name the host dialled ({error})"),
                    "name the brokers in kafka.bootstrap.servers as their certificates do, or set \
                 kafka.ssl.endpoint.identification.algorithm=none to check the CA only"
                        .into(),
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
                format!("has expired ({error})"),
                "renew the broker's certificate".into(),
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
                format!("is not valid yet ({error})"),
                "check the clocks of this host and the broker's, or the certificate's dates".into(),
            ),
            other => (format!("failed verification ({other})"), set_ca),
        }
    }

    fn sasl_failure(
        &self,
        address: &str,
        credentials: &Credentials,
        error: SaslError,
    ) -> ConnectError {
        let address = address.to_owned();
        match error {
            SaslError::Rejected { .. } => ConnectError::Rejected {
                address,
                mechanism: credentials.mechanism,
                source: error,
            },
            SaslError::MechanismNotEnabled { .. } => ConnectError::MechanismNotEnabled {
                address,
                source: error,
            },
            SaslError::Wire(WireError::Io { doing, source }) => {
                self.io_failure(&address, doing, source)
            }
            // A listener without SASL answers a SaslHandshake with an error of its own.
            SaslError::Protocol { ref reason, .. } if reason.contains("IllegalSaslState") => {
                ConnectError::Closed {
                    address,
                    doing: "authenticating",
                    protocol: self.protocol.name(),
                }
            }
            other => ConnectError::Sasl {
                address,
                source: other,
            },
        }
    }
}

/// Returns the host of `host:port` (`[::1]:9093` gives `::1`).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn credentials<'a>(get: &impl Fn(&str) -> Option<&'a str>) -> Result<Credentials, SettingsError> {
    // librdkafka's own name is sasl.mechanisms; sasl.mechanism is its alias. Its default is
    // GSSAPI.
    let name = get("sasl.mechanism")
        .or_else(|| get("sasl.mechanisms"))
        .unwrap_or("GSSAPI");
    let mechanism: Mechanism = name.parse().map_err(|_| SettingsError::Unsupported {
        key: "sasl.mechanism",
        value: name.to_owned(),
        instead: "use SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
    })?;
    let required = |key: &'static str| {
        get(key).map(str::to_owned).ok_or(SettingsError::Invalid {
            key,
            reason: format!("must be set for sasl.mechanism={mechanism}"),
        })
    };
    Ok(Credentials {
        mechanism,
        username: required("sasl.username")?,
        password: required("sasl.password")?,
    })
}

fn tls_config<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<(ClientConfig, String), SettingsError> {
    for (key, instead) in [
        (
            "ssl.keystore.location",
            "give the client certificate and key as PEM in ssl.certificate.location and \
             ssl.key.location",
        ),
        (
            "ssl.key.password",
            "give an unencrypted key (PKCS#8 PEM) in ssl.key.location, readable by the node only",
        ),
        (
            "ssl.engine.location",
            "give the key as PEM in ssl.key.location",
        ),
    ] {
        if let Some(value) = get(key) {
            return Err(SettingsError::Unsupported {
                key,
                value: if key.contains("password") {
                    "…".into()
                } else {
                    value.into()
                },
                instead,
            });
        }
    }
    if get("enable.ssl.certificate.verification").is_some_and(|v| v.eq_ignore_ascii_case("false")) {
        return Err(SettingsError::Unsupported {
            key: "enable.ssl.certificate.verification",
            value: "false".into(),
            instead: "verify the broker: set ssl.ca.location to its CA",
        });
    }
    let verify_name = match get("ssl.endpoint.identification.algorithm")
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("https") => true,
        Some("none") => false,
        Some(other) => {
            return Err(SettingsError::Invalid {
                key: "ssl.endpoint.identification.algorithm",
                reason: format!("{other} is not one of https, none"),
            });
        }
    };

    let mut roots = RootCertStore::empty();
    let trust = if let Some(pem) = get("ssl.ca.pem") {
        add_roots(&mut roots, "ssl.ca.pem", pem_certificates(pem.as_bytes()))?;
        "the certificates in kafka.ssl.ca.pem".to_owned()
    } else if let Some(location) = get("ssl.ca.location").filter(|l| *l != "probe") {
        let path = Path::new(location);
        let files = if path.is_dir() {
            std::fs::read_dir(path)
                .map_err(|error| unreadable("ssl.ca.location", path, &error))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|file| file.is_file())
                .collect()
        } else {
            vec![path.to_path_buf()]
        };
        let mut certificates = Vec::new();
        for file in files {
            let bytes = std::fs::read(&file)
                .map_err(|error| unreadable("ssl.ca.location", &file, &error))?;
            certificates.extend(pem_certificates(&bytes));
        }
        add_roots(&mut roots, "ssl.ca.location", certificates)?;
        format!("kafka.ssl.ca.location={location}")
    } else {
        // librdkafka then uses OpenSSL's default CA paths; these are the same files.
        let native = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(native.certs);
        if added == 0 {
            return Err(SettingsError::Invalid {
                key: "ssl.ca.location",
                reason: "is not set and the system has no CA certificates: set it to the CA \
                         certificate (PEM) that signed the brokers' certificates"
                    .into(),
            });
        }
        "the system's CA certificates".to_owned()
    };

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| SettingsError::Invalid {
            key: "ssl.ca.location",
            reason: error.to_string(),
        })?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| SettingsError::Invalid {
            key: "security.protocol",
            reason: error.to_string(),
        })?;
    let builder = if verify_name {
        builder.with_webpki_verifier(verifier)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(CaOnly { inner: verifier }))
    };
    let certificate = client_certificate(get)?;
    let config =
        match certificate {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|error| {
                SettingsError::Invalid {
                    key: "ssl.key.location",
                    reason: format!("does not fit the client certificate: {error}"),
                }
            })?,
            None => builder.with_no_client_auth(),
        };
    Ok((config, trust))
}

type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_certificate<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<ClientIdentity>, SettingsError> {
    let chain = if let Some(pem) = get("ssl.certificate.pem") {
        Some(("ssl.certificate.pem", pem_certificates(pem.as_bytes())))
    } else if let Some(location) = get("ssl.certificate.location") {
        let bytes = std::fs::read(location)
            .map_err(|error| unreadable("ssl.certificate.location", Path::new(location), &error))?;
        Some(("ssl.certificate.location", pem_certificates(&bytes)))
    } else {
        None
    };
    let key = if let Some(pem) = get("ssl.key.pem") {
        Some(("ssl.key.pem", PrivateKeyDer::from_pem_slice(pem.as_bytes())))
    } else if let Some(location) = get("ssl.key.location") {
        let bytes = std::fs::read(location)
            .map_err(|error| unreadable("ssl.key.location", Path::new(location), &error))?;
        Some(("ssl.key.location", PrivateKeyDer::from_pem_slice(&bytes)))
    } else {
        None
    };
    match (chain, key) {
        (None, None) => Ok(None),
        (Some((key, _)), None) => Err(SettingsError::Invalid {
            key,
            reason: "is set without a key: set ssl.key.location too".into(),
        }),
        (None, Some((key, _))) => Err(SettingsError::Invalid {
            key,
            reason: "is set without a certificate: set ssl.certificate.location too".into(),
        }),
        (Some((chain_key, chain)), Some((key_key, key))) => {
            if chain.is_empty() {
                return Err(SettingsError::Invalid {
                    key: chain_key,
                    reason: "holds no PEM certificate".into(),
                });
            }
            let key = key.map_err(|error| SettingsError::Invalid {
                key: key_key,
                reason: format!(
                    "holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1): {error}"
                ),
            })?;
            Ok(Some((chain, key)))
        }
    }
}

fn pem_certificates(bytes: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(bytes)
        .filter_map(Result::ok)
        .collect()
}

fn add_roots(
    roots: &mut RootCertStore,
    key: &'static str,
    certificates: Vec<CertificateDer<'static>>,
) -> Result<(), SettingsError> {
    let (added, _) = roots.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(SettingsError::Invalid {
            key,
            reason: "holds no usable PEM CA certificate".into(),
        });
    }
    Ok(())
}

fn unreadable(key: &'static str, path: &Path, error: &io::Error) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: format!("cannot read {}: {error}", PathBuf::from(path).display()),
    }
}

/// Checks the broker's chain against the CAs but not its name
/// (`ssl.endpoint.identification.algorithm=none`, as librdkafka then does).
#[derive(Debug)]
struct CaOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            // webpki checks the name only after the chain, its dates and its usage passed.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Installs ring as the process's rustls crypto provider, once. Every TLS config kstore
/// builds names its provider itself; this is for libraries that take the process default.
pub fn install_crypto_provider() {
    // An error only means a provider is installed already.
    let _ = CryptoProvider::install_default(rustls::crypto::ring::default_provider());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn plaintext_is_the_default_and_needs_nothing() {
        let connector = Connector::from_settings(&settings(&[])).unwrap();
        assert_eq!(connector.describe(), "PLAINTEXT");
        assert!(!connector.is_secured());
    }

    #[test]
    fn sasl_settings_name_the_missing_key() {
        let error = Connector::from_settings(&settings(&[
            ("security.protocol", "SASL_PLAINTEXT"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "kstore"),
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("kafka.sasl.password"), "{error}");

        let error = Connector::from_settings(&settings(&[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.username", "kstore"),
            ("sasl.password", "secret"),
        ]))
        .unwrap_err();
        assert!(
            matches!(
                error,
                SettingsError::Unsupported {
                    key: "sasl.mechanism",
                    ..
                }
            ),
            "librdkafka's default mechanism is GSSAPI: {error}"
        );

        let connector = Connector::from_settings(&settings(&[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanisms", "SCRAM-SHA-256"),
            ("sasl.username", "kstore"),
            ("sasl.password", "secret"),
        ]))
        .unwrap();
        assert_eq!(
            connector.describe(),
            "SASL_PLAINTEXT with SCRAM-SHA-256 as kstore"
        );
        assert!(!format!("{connector:?}").contains("secret"));
    }

    #[test]
    fn tls_settings_name_the_file_that_cannot_be_used() {
        let error = Connector::from_settings(&settings(&[
            ("security.protocol", "ssl"),
            ("ssl.ca.location", "/nonexistent/ca.pem"),
        ]))
        .unwrap_err();
        assert!(
            error.to_string().contains("kafka.ssl.ca.location")
                && error.to_string().contains("/nonexistent/ca.pem"),
            "{error}"
        );
        let error = Connector::from_settings(&settings(&[
            ("security.protocol", "ssl"),
            ("ssl.ca.pem", "not a certificate"),
        ]))
        .unwrap_err();
        assert!(error.to_string().contains("kafka.ssl.ca.pem"), "{error}");
        let error = Connector::from_settings(&settings(&[
            ("security.protocol", "ssl"),
            ("ssl.keystore.location", "/etc/kstore/client.p12"),
        ]))
        .unwrap_err();
        assert!(
            matches!(error, SettingsError::Unsupported { .. }),
            "{error}"
        );
        let error =
            Connector::from_settings(&settings(&[("security.protocol", "tls")])).unwrap_err();
        assert!(
            error.to_string().contains("kafka.security.protocol"),
            "{error}"
        );
    }

    #[test]
    fn hosts_come_out_of_addresses() {
        assert_eq!(host_of("broker-1.kafka:9093"), "broker-1.kafka");
        assert_eq!(host_of("127.0.0.1:9093"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9093"), "::1");
    }
}
