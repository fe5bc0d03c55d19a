//! TLS to the nodes from PEM files: the CA that signs the nodes' certificates, and the
//! client certificate to present when the nodes require one (mutual TLS). With TLS set,
//! every node (seeds, and the addresses the cluster view advertises) is dialed with
//! `https`, and verified by the host of its address.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsFileError {
    /// A file cannot be read.
    #[error("cannot read the TLS {what} file {path}: {source}")]
    Read {
        /// Which file (`CA`, `certificate`, `key`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate was given without its key, or a key without its certificate.
    #[error("a client certificate needs both --cert and --key (KSTORE_CERT, KSTORE_KEY)")]
    HalfIdentity,
}

/// Returns the TLS settings for [`ClientBuilder::tls`](crate::ClientBuilder::tls): trust
/// the CA in `ca` (PEM; the system's root certificates if `None`), and present the client
/// certificate `cert` with its key `key` (PEM) if both are given.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::path::Path;
/// let tls = kstore_client::tls_from_files(
///     Some(Path::new("ca.pem")),
///     Some(Path::new("client.pem")),
///     Some(Path::new("client-key.pem")),
/// )?;
/// let client = kstore_client::Client::builder()
///     .seeds(["127.0.0.1:50051"])
///     .tls(tls)
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
pub fn tls_from_files(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<ClientTlsConfig, TlsFileError> {
    let read = |what: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| TlsFileError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let mut tls = ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read("CA", ca)?)),
        None => tls.with_native_roots(),
    };
    match (cert, key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read("certificate", cert)?,
                read("key", key)?,
            ));
        }
        (None, None) => {}
        _ => return Err(TlsFileError::HalfIdentity),
    }
    Ok(tls)
}

/// Adds what a dropped TLS connection most likely means to a failed call's `reason`. Under
/// TLS 1.3 a node checks the client's certificate after the client has finished its side of
/// the handshake, so a refused certificate reaches the client only as a closed connection;
/// the node's log says which check failed.
pub(crate) fn explain_refusal(reason: String) -> String {
    let dropped = [
        "connection closed",
        "connection reset",
        "broken pipe",
        "stream closed",
        "fatal alert",
    ];
    if dropped.iter().any(|said| reason.contains(said)) {
        format!(
            "{reason} (the node closed the TLS connection: with mutual TLS it refuses a client \
             without a certificate, or with one its client CA did not sign, or one that is \
             expired or not yet valid; its log says which)"
        )
    } else {
        reason
    }
}
