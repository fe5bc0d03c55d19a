//! The Admin service: operator calls about the node's local stores. A configured token is
//! required as `authorization: Bearer <token>`.

use std::sync::Arc;

use kstore_proto::v1::admin_server::Admin;
use kstore_proto::v1::{PartitionStatusRequest, PartitionStatusResponse, StoreStatus};
use tonic::{Request, Response, Status};

use super::error::ReadError;
use super::query::partition_copy;
use crate::registry::Registry;

/// The Admin service of one node.
#[derive(Debug, Clone)]
pub struct AdminService {
    registry: Arc<Registry>,
    store: String,
    token: Option<String>,
}

impl AdminService {
    /// Returns the service; with a token, every call must carry it.
    pub fn new(registry: Arc<Registry>, store: String, token: Option<String>) -> Self {
        AdminService {
            registry,
            store,
            token,
        }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare without an early exit, so timing does not reveal a prefix.
        let matches = presented.is_some_and(|p| {
            p.len() == token.len()
                && p.bytes()
                    .zip(token.bytes())
                    .fold(0, |acc, (a, b)| acc | (a ^ b))
                    == 0
        });
        if matches {
            Ok(())
        } else {
            Err(ReadError::AdminTokenRequired.into())
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn partition_status(
        &self,
        request: Request<PartitionStatusRequest>,
    ) -> Result<Response<PartitionStatusResponse>, Status> {
        self.authorize(&request)?;
        let copies = self.registry.all();
        let store = self.store.clone();
        let stores = tokio::task::spawn_blocking(move || {
            copies
                .iter()
                .map(|copy| StoreStatus {
                    store: store.clone(),
                    copy: Some(partition_copy(copy)),
                    size_on_disk_bytes: copy.store.size_on_disk().unwrap_or(0),
                    estimated_keys: copy.store.estimated_keys().unwrap_or(0),
                })
                .collect()
        })
        .await
        .map_err(|error| Status::internal(error.to_string()))?;
        Ok(Response::new(PartitionStatusResponse { stores }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authorization: Option<&str>) -> Request<PartitionStatusRequest> {
        let mut request = Request::new(PartitionStatusRequest {});
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn a_configured_token_is_required() {
        let registry = Arc::new(Registry::new("n1", 1));
        let admin = AdminService::new(
            registry.clone(),
            "features".into(),
            Some("0123456789abcdef".into()),
        );
        assert!(
            admin
                .authorize(&request(Some("Bearer 0123456789abcdef")))
                .is_ok()
        );
        for wrong in [
            None,
            Some("Bearer 0123456789abcdeX"),
            Some("0123456789abcdef"),
            Some("Bearer "),
        ] {
            let status = admin.authorize(&request(wrong)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
        let open = AdminService::new(registry, "features".into(), None);
        assert!(open.authorize(&request(None)).is_ok());
    }
}
