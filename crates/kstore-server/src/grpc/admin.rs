//! The Admin service: operator calls about the node's local stores. A configured token is
//! required as `authorization: Bearer <token>` (see [`crate::access`]).

use std::sync::Arc;

use kstore_core::cluster::ClusterView;
use kstore_proto::v1::admin_server::Admin;
use kstore_proto::v1::{
    BackupInfo, BackupVerification, CreateBackupRequest, CreateBackupResponse, DrainRequest,
    DrainResponse, FailedPartition, ListBackupsRequest, ListBackupsResponse,
    PartitionStatusRequest, PartitionStatusResponse, Role, SkippedPartition, StoreStatus,
    VerifyBackupRequest, VerifyBackupResponse,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::error::ReadError;
use super::query::partition_copy;
use crate::access::{Access, Secret};
use crate::backup::{Backups, CatalogEntry};
use crate::drain::Drain;
use crate::registry::Registry;

/// The Admin service of one node.
#[derive(Debug, Clone)]
pub struct AdminService {
    registry: Arc<Registry>,
    store: String,
    access: Access,
    drain: Arc<Drain>,
    backups: Option<Arc<Backups>>,
    view: watch::Receiver<Arc<ClusterView>>,
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
            access: Access {
                admin: token.as_deref().map(Secret::new),
                cluster: None,
            },
            drain,
            backups: None,
            view: watch::channel(Arc::new(ClusterView::default())).1,
        }
    }

    /// Serves the backup calls with `backups` (none: they fail with
    /// BACKUPS_NOT_CONFIGURED), choosing what to back up by `view`.
    pub fn with_backups(
        mut self,
        backups: Option<Arc<Backups>>,
        view: watch::Receiver<Arc<ClusterView>>,
    ) -> Self {
        self.backups = backups;
        self.view = view;
        self
    }

    fn backups(&self) -> Result<Arc<Backups>, Status> {
        self.backups
            .clone()
            .ok_or_else(|| ReadError::BackupsNotConfigured.into())
    }

    /// The catalog entries of `partitions` (all if empty), oldest first per partition.
    fn catalog(backups: &Backups, partitions: &[u32]) -> Result<Vec<CatalogEntry>, Status> {
        let all: Vec<u32>;
        let partitions = if partitions.is_empty() {
            all = (0..backups.partitions()).collect();
            &all
        } else {
            partitions
        };
        let mut entries = Vec::new();
        for &partition in partitions {
            let (mut listed, problems) = backups.list(partition).map_err(backup_failed)?;
            for problem in problems {
                tracing::warn!(partition, %problem, "a catalog entry cannot be read");
            }
            entries.append(&mut listed);
        }
        Ok(entries)
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.access.admin(request)
    }
}

fn backup_failed(error: impl std::fmt::Display) -> Status {
    ReadError::BackupFailed {
        message: error.to_string(),
    }
    .into()
}

fn join_failed(error: tokio::task::JoinError) -> Status {
    Status::internal(error.to_string())
}

/// A catalog entry as the Admin service answers it.
pub fn backup_info(entry: &CatalogEntry) -> BackupInfo {
    let source_role = match entry.source_role.as_str() {
        "active" => Role::Active,
        "standby" => Role::Standby,
        "restoring" => Role::Restoring,
        _ => Role::Unspecified,
    };
    BackupInfo {
        backup_id: entry.backup_id,
        app: entry.app.clone(),
        store: entry.store.clone(),
        partition: entry.partition,
        partition_count: entry.partition_count,
        changelog_offset: entry.changelog_next,
        input_offset: entry.input_next,
        node_id: entry.node_id.clone(),
        source_role: source_role as i32,
        created_at_ms: entry.created_at_ms,
        size_bytes: entry.size_bytes,
        added_bytes: entry.added_bytes,
        file_count: entry.files.len() as u32,
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
        let pending = self.registry.all_pending();
        let store = self.store.clone();
        let mut stores: Vec<StoreStatus> = tokio::task::spawn_blocking(move || {
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
        // Copies that serve no reads (opening, bootstrapping, failed), with their errors.
        for (partition, copy) in pending {
            stores.push(StoreStatus {
                store: self.store.clone(),
                copy: Some(kstore_proto::v1::PartitionCopy {
                    partition: partition as u32,
                    role: copy.role as i32,
                    error: copy.error.unwrap_or_default(),
                    ..Default::default()
                }),
                size_on_disk_bytes: 0,
                estimated_keys: 0,
            });
        }
        stores.sort_by_key(|s| s.copy.as_ref().map_or(0, |c| c.partition));
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

    async fn create_backup(
        &self,
        request: Request<CreateBackupRequest>,
    ) -> Result<Response<CreateBackupResponse>, Status> {
        self.authorize(&request)?;
        let backups = self.backups()?;
        let registry = self.registry.clone();
        let view = self.view.borrow().clone();
        let wanted = request.into_inner().partitions;
        let round = tokio::task::spawn_blocking({
            let backups = backups.clone();
            move || backups.back_up_local(&registry, &view, &wanted)
        })
        .await
        .map_err(join_failed)?;
        Ok(Response::new(CreateBackupResponse {
            backups: round.created.iter().map(backup_info).collect(),
            skipped: round
                .skipped
                .into_iter()
                .map(|(partition, reason)| SkippedPartition { partition, reason })
                .collect(),
            failed: round
                .failed
                .into_iter()
                .map(|(partition, error)| FailedPartition {
                    partition,
                    error: error.to_string(),
                })
                .collect(),
            location: backups.location(),
        }))
    }

    async fn list_backups(
        &self,
        request: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        self.authorize(&request)?;
        let backups = self.backups()?;
        let partitions = request.into_inner().partitions;
        let entries = tokio::task::spawn_blocking({
            let backups = backups.clone();
            move || Self::catalog(&backups, &partitions)
        })
        .await
        .map_err(join_failed)??;
        Ok(Response::new(ListBackupsResponse {
            backups: entries.iter().map(backup_info).collect(),
            location: backups.location(),
        }))
    }

    async fn verify_backup(
        &self,
        request: Request<VerifyBackupRequest>,
    ) -> Result<Response<VerifyBackupResponse>, Status> {
        self.authorize(&request)?;
        let backups = self.backups()?;
        let VerifyBackupRequest {
            partitions,
            backup_id,
        } = request.into_inner();
        if backup_id != 0 && partitions.len() != 1 {
            return Err(Status::invalid_argument(
                "a backup id names a backup of one partition: name exactly one partition",
            ));
        }
        let results = tokio::task::spawn_blocking(move || {
            let mut results = Vec::new();
            for entry in Self::catalog(&backups, &partitions)? {
                if backup_id != 0 && entry.backup_id != backup_id {
                    continue;
                }
                let verification = backups.verify(&entry).map_err(backup_failed)?;
                results.push(BackupVerification {
                    backup: Some(backup_info(&entry)),
                    ok: verification.ok(),
                    files_checked: verification.files_checked,
                    bytes_checked: verification.bytes_checked,
                    problems: verification.problems,
                });
            }
            if backup_id != 0 && results.is_empty() {
                return Err(Status::not_found(format!(
                    "no backup {backup_id} of partition {}",
                    partitions[0]
                )));
            }
            Ok(results)
        })
        .await
        .map_err(join_failed)??;
        Ok(Response::new(VerifyBackupResponse { results }))
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
