//! Who may call what. Clients call Query. Operators call Admin, with the admin token. Nodes
//! call Peer (snapshots) and forward reads to each other, with the cluster's secret, which
//! also authenticates gossip. A call proves it with `authorization: Bearer <token>`; the
//! token is compared by its SHA-256 digest in constant time, so that neither its bytes nor
//! its length show in how long a refusal takes.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::grpc::error::ReadError;

/// The metadata key that carries a token.
pub const AUTHORIZATION: &str = "authorization";

/// A token, kept as its digest.
#[derive(Clone)]
pub struct Secret {
    digest: [u8; 32],
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Keeps `token`'s digest.
    pub fn new(token: &str) -> Self {
        Secret {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.digest.ct_eq(&presented).into()
    }
}

/// Who may call what on this node.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Admin calls carry it (none: Admin is open, allowed on loopback only).
    pub admin: Option<Secret>,
    /// Peer calls and forwarded reads carry it (none: open, allowed on loopback only).
    pub cluster: Option<Secret>,
}

impl Access {
    /// The tokens of `config`.
    pub fn from_config(config: &crate::config::NodeConfig) -> Self {
        Access {
            admin: config.admin_token.as_deref().map(Secret::new),
            cluster: config.cluster_secret.as_deref().map(Secret::new),
        }
    }

    /// Checks an Admin call.
    pub fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        check(self.admin.as_ref(), request).map_err(|()| ReadError::AdminTokenRequired.into())
    }

    /// Checks a call only nodes may make: Peer's, or a read marked as forwarded.
    pub fn node<T>(&self, request: &Request<T>) -> Result<(), Status> {
        check(self.cluster.as_ref(), request).map_err(|()| ReadError::ClusterSecretRequired.into())
    }
}

/// Whether `request` carries `authorization: Bearer <token>` matching `secret` (anything
/// passes where no secret is set).
fn check<T>(secret: Option<&Secret>, request: &Request<T>) -> Result<(), ()> {
    let Some(secret) = secret else {
        return Ok(());
    };
    let presented = request
        .metadata()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if secret.matches(token) => Ok(()),
        _ => Err(()),
    }
}

/// Adds `authorization: Bearer <token>` to an outgoing call (a node's call to another).
pub fn present<T>(request: &mut Request<T>, token: &str) {
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert(AUTHORIZATION, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(token: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(token) = token {
            present(&mut request, token);
        }
        request
    }

    #[test]
    fn only_the_right_token_passes_and_each_refusal_names_its_reason() {
        let access = Access {
            admin: Some(Secret::new("operator-token-0123456789")),
            cluster: Some(Secret::new("cluster-secret-0123456789abcdef0123456789")),
        };
        assert!(
            access
                .admin(&call(Some("operator-token-0123456789")))
                .is_ok()
        );
        assert!(
            access
                .node(&call(Some("cluster-secret-0123456789abcdef0123456789")))
                .is_ok()
        );
        for wrong in [
            None,
            Some(""),
            Some("operator-token-012345678"),
            Some("operator-token-0123456789x"),
            Some("cluster-secret-0123456789abcdef0123456789"),
        ] {
            let status = access.admin(&call(wrong)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong:?}");
            assert!(status.message().contains("token"), "{status:?}");
        }
        let status = access
            .node(&call(Some("operator-token-0123456789")))
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        // Without secrets (loopback, development) everything passes.
        let open = Access::default();
        assert!(open.admin(&call(None)).is_ok());
        assert!(open.node(&call(None)).is_ok());
    }

    #[test]
    fn a_secret_is_never_printed() {
        let secret = Secret::new("do-not-print-me");
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }
}
