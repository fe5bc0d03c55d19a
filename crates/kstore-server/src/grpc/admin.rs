//! The Admin service: operator calls about the node's local stores. A configured token is
//! required as `authorization: Bearer <token>`.

use std::sync::Arc;

use kstore_proto::v1::admin_server::Admin;
use kstore_proto::v1::{
    DrainRequest, DrainResponse, PartitionStatusRequest, PartitionStatusResponse, Role, StoreStatus,
};
use tonic::{Request, Response, Status};

use super::error::ReadError;
use super::query::partition_copy;
use crate::drain::Drain;
use crate::registry::Registry;

/// The Admin service of one node.
#[derive(Debug, Clone)]
pub struct AdminService {
    registry: Arc<Registry>,
    store: String,
    token: Option<String>,
    drain: Arc<Drain>,
}

impl AdminService {
    /// Returns the service; with a token, every call must carry it. Drain turns `drain`.
    pub fn new(
        registry: Arc<Registry>,
        store: String,
        token: Option<String>,
        drain: Arc<Drain>,
    ) -> Self {
        AdminService {
            registry,
            store,
            token,
            drain,
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

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.authorize(&request)?;
        let active_partitions = self
            .registry
            .all()
            .iter()
            .filter(|c| matches!(c.role(), Role::Active | Role::Restoring))
            .map(|c| c.partition as u32)
            .collect();
        if !self.drain.start() {
            return Err(ReadError::DrainInProgress.into());
        }
        Ok(Response::new(DrainResponse {
            node_id: self.registry.node_id().to_owned(),
            active_partitions,
        }))
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
        let drain = Arc::new(Drain::new(Arc::default(), false));
        let admin = AdminService::new(
            registry.clone(),
            "features".into(),
            Some("0123456789abcdef".into()),
            drain.clone(),
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
        let open = AdminService::new(registry, "features".into(), None, drain);
        assert!(open.authorize(&request(None)).is_ok());
    }

    #[tokio::test]
    async fn a_second_drain_is_refused_while_one_runs() {
        let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drain = Arc::new(Drain::new(shutdown.clone(), false));
        let admin = AdminService::new(
            Arc::new(Registry::new("n1", 1)),
            "features".into(),
            None,
            drain.clone(),
        );
        let answer = admin.drain(Request::new(DrainRequest {})).await.unwrap();
        assert_eq!(answer.into_inner().node_id, "n1");
        assert!(drain.requested() && shutdown.load(std::sync::atomic::Ordering::Acquire));
        let again = admin
            .drain(Request::new(DrainRequest {}))
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition);
        assert!(again.message().contains("draining"), "{}", again.message());
    }
}
