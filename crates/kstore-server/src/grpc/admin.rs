//! The Admin service: operator calls about the node's local stores. A configured token is
//! required as `authorization: Bearer <token>` (see [`crate::access`]).

use std::sync::Arc;

use kstore_core::cluster::ClusterView;
use kstore_proto::v1::admin_server::Admin;
use kstore_proto::v1::{
    BackupInfo, BackupVerification, CreateBackupRequest, CreateBackupResponse, DrainRequest,
    DrainResponse, FailedPartition, ListBackupsRequest, ListBackupsResponse, ModuleVersion,
    PartitionStatusRequest, PartitionStatusResponse, Role, SkippedPartition, StorePartitions,
    StoreStatus, VerifyBackupRequest, VerifyBackupResponse,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::error::ReadError;
use super::query::partition_copy;
use crate::access::{Access, Secret};
use crate::backup::{Backups, CatalogEntry};
use crate::drain::Drain;
use crate::registry::Registry;

/// One of the node's stores, as the Admin service acts on it.
#[derive(Debug, Clone)]
pub struct AdminStore {
    /// The store's name.
    pub name: String,
    /// Its copies on this node.
    pub registry: Arc<Registry>,
    /// Its backups (none: the backup calls fail with BACKUPS_NOT_CONFIGURED).
    pub backups: Option<Arc<Backups>>,
    /// Its cluster view, which says what this node backs up.
    pub view: watch::Receiver<Arc<ClusterView>>,
}

impl AdminStore {
    /// `name`'s copies in `registry`, with no backups and an empty view.
    pub fn new(name: impl Into<String>, registry: Arc<Registry>) -> Self {
        AdminStore {
            name: name.into(),
            registry,
            backups: None,
            view: watch::channel(Arc::new(ClusterView::default())).1,
        }
    }

    /// The store with `backups`, choosing what to back up by `view`.
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
}

/// The Admin service of one node, over every store it serves.
#[derive(Debug, Clone)]
pub struct AdminService {
    /// The node's stores, its first store first; never empty.
    stores: Vec<AdminStore>,
    access: Access,
    drain: Arc<Drain>,
}

impl AdminService {
    /// Returns the service over `stores` (at least one, the node's first store first); with
    /// a token, every call must carry it. Drain turns `drain`.
    pub fn new(stores: Vec<AdminStore>, token: Option<String>, drain: Arc<Drain>) -> Self {
        assert!(!stores.is_empty(), "a node serves at least one store");
        AdminService {
            stores,
            access: Access {
                admin: token.as_deref().map(Secret::new),
                cluster: None,
            },
            drain,
        }
    }

    /// The stores a call names: `name`, or every store if it is empty. An unknown name is
    /// refused, naming the stores served.
    fn named(&self, name: &str) -> Result<Vec<&AdminStore>, Status> {
        if name.is_empty() {
            return Ok(self.stores.iter().collect());
        }
        match self.stores.iter().find(|store| store.name == name) {
            Some(store) => Ok(vec![store]),
            None => Err(ReadError::unknown_store(
                name,
                self.stores.iter().map(|s| s.name.as_str()),
            )
            .into()),
        }
    }

    /// The stores a backup call names, each with its backups; fails with
    /// BACKUPS_NOT_CONFIGURED if one has none.
    fn backed_up(&self, name: &str) -> Result<Vec<(&AdminStore, Arc<Backups>)>, Status> {
        self.named(name)?
            .into_iter()
            .map(|store| Ok((store, store.backups()?)))
            .collect()
    }

    /// Refuses `partitions` if one of them is out of range of every store in `stores`.
    fn check_partitions(
        stores: &[(&AdminStore, Arc<Backups>)],
        partitions: &[u32],
    ) -> Result<(), Status> {
        let most = stores
            .iter()
            .map(|(_, backups)| backups.partitions())
            .max()
            .unwrap_or(0);
        match partitions.iter().find(|&&partition| partition >= most) {
            Some(&partition) => Err(ReadError::PartitionOutOfRange {
                partition,
                partitions: most,
            }
            .into()),
            None => Ok(()),
        }
    }

    /// The catalog entries of `partitions` (all if empty) that `backups`' store has, oldest
    /// first per partition.
    fn catalog(backups: &Backups, partitions: &[u32]) -> Result<Vec<CatalogEntry>, Status> {
        let mut entries = Vec::new();
        for partition in partitions_of(backups.partitions(), partitions) {
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

/// The partitions of a store of `count` partitions among `wanted` (all of them if empty).
fn partitions_of(count: u32, wanted: &[u32]) -> Vec<u32> {
    if wanted.is_empty() {
        return (0..count).collect();
    }
    wanted.iter().copied().filter(|&p| p < count).collect()
}

fn backup_failed(error: impl std::fmt::Display) -> Status {
    ReadError::BackupFailed {
        message: error.to_string(),
    }
    .into()
}

/// The module versions a copy's store records (none if its history cannot be read: the
/// copy's own failure says why when ingest reads it).
fn module_versions(store: &crate::store::PartitionStore) -> Vec<ModuleVersion> {
    store.module_history().map_or_else(
        |_| Vec::new(),
        |history| {
            history
                .versions()
                .iter()
                .map(|v| ModuleVersion {
                    from_input_offset: v.from_offset,
                    sha256: v.digest.clone(),
                })
                .collect()
        },
    )
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
        let mut stores = Vec::new();
        for store in self.named(&request.get_ref().store)? {
            let copies = store.registry.all();
            let pending = store.registry.all_pending();
            let name = store.name.clone();
            let mut statuses: Vec<StoreStatus> = tokio::task::spawn_blocking(move || {
                copies
                    .iter()
                    .map(|copy| StoreStatus {
                        store: name.clone(),
                        copy: Some(partition_copy(copy)),
                        size_on_disk_bytes: copy.store.size_on_disk().unwrap_or(0),
                        estimated_keys: copy.store.estimated_keys().unwrap_or(0),
                        modules: module_versions(&copy.store),
                    })
                    .collect()
            })
            .await
            .map_err(join_failed)?;
            // Copies that serve no reads (opening, bootstrapping, failed), with their errors.
            for (partition, copy) in pending {
                statuses.push(StoreStatus {
                    store: store.name.clone(),
                    copy: Some(kstore_proto::v1::PartitionCopy {
                        partition: partition as u32,
                        role: copy.role as i32,
                        error: copy.error.unwrap_or_default(),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
            statuses.sort_by_key(|s| s.copy.as_ref().map_or(0, |c| c.partition));
            stores.append(&mut statuses);
        }
        Ok(Response::new(PartitionStatusResponse { stores }))
    }

    async fn drain(
        &self,
        request: Request<DrainRequest>,
    ) -> Result<Response<DrainResponse>, Status> {
        self.authorize(&request)?;
        let active_by_store: Vec<StorePartitions> = self
            .stores
            .iter()
            .map(|store| StorePartitions {
                store: store.name.clone(),
                partitions: store
                    .registry
                    .all()
                    .iter()
                    .filter(|c| matches!(c.role(), Role::Active | Role::Restoring))
                    .map(|c| c.partition as u32)
                    .collect(),
            })
            .collect();
        if !self.drain.start() {
            return Err(ReadError::DrainInProgress.into());
        }
        Ok(Response::new(DrainResponse {
            node_id: self.stores[0].registry.node_id().to_owned(),
            active_partitions: active_by_store[0].partitions.clone(),
            active_by_store,
        }))
    }

    async fn create_backup(
        &self,
        request: Request<CreateBackupRequest>,
    ) -> Result<Response<CreateBackupResponse>, Status> {
        self.authorize(&request)?;
        let CreateBackupRequest { partitions, store } = request.into_inner();
        let chosen = self.backed_up(&store)?;
        Self::check_partitions(&chosen, &partitions)?;
        let mut answer = CreateBackupResponse::default();
        for (store, backups) in chosen {
            let name = store.name.clone();
            let registry = store.registry.clone();
            let view = store.view.borrow().clone();
            let wanted = partitions_of(backups.partitions(), &partitions);
            let round = tokio::task::spawn_blocking({
                let backups = backups.clone();
                move || backups.back_up_local(&registry, &view, &wanted)
            })
            .await
            .map_err(join_failed)?;
            answer.backups.extend(round.created.iter().map(backup_info));
            answer
                .skipped
                .extend(
                    round
                        .skipped
                        .into_iter()
                        .map(|(partition, reason)| SkippedPartition {
                            partition,
                            reason,
                            store: name.clone(),
                        }),
                );
            answer
                .failed
                .extend(
                    round
                        .failed
                        .into_iter()
                        .map(|(partition, error)| FailedPartition {
                            partition,
                            error: error.to_string(),
                            store: name.clone(),
                        }),
                );
            answer.location = backups.location();
        }
        Ok(Response::new(answer))
    }

    async fn list_backups(
        &self,
        request: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        self.authorize(&request)?;
        let ListBackupsRequest { partitions, store } = request.into_inner();
        let chosen = self.backed_up(&store)?;
        Self::check_partitions(&chosen, &partitions)?;
        let location = chosen
            .first()
            .map(|(_, backups)| backups.location())
            .unwrap_or_default();
        let chosen: Vec<Arc<Backups>> = chosen.into_iter().map(|(_, backups)| backups).collect();
        let entries = tokio::task::spawn_blocking(move || {
            let mut entries = Vec::new();
            for backups in &chosen {
                entries.append(&mut Self::catalog(backups, &partitions)?);
            }
            Ok::<_, Status>(entries)
        })
        .await
        .map_err(join_failed)??;
        Ok(Response::new(ListBackupsResponse {
            backups: entries.iter().map(backup_info).collect(),
            location,
        }))
    }

    async fn verify_backup(
        &self,
        request: Request<VerifyBackupRequest>,
    ) -> Result<Response<VerifyBackupResponse>, Status> {
        self.authorize(&request)?;
        let VerifyBackupRequest {
            partitions,
            backup_id,
            store,
        } = request.into_inner();
        if backup_id != 0 && partitions.len() != 1 {
            return Err(Status::invalid_argument(
                "a backup id names a backup of one partition: name exactly one partition",
            ));
        }
        let chosen = self.backed_up(&store)?;
        if backup_id != 0 && chosen.len() != 1 {
            return Err(Status::invalid_argument(format!(
                "a backup id names a backup of one store: name the store (this node serves {})",
                chosen
                    .iter()
                    .map(|(store, _)| store.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Self::check_partitions(&chosen, &partitions)?;
        let chosen: Vec<Arc<Backups>> = chosen.into_iter().map(|(_, backups)| backups).collect();
        let results = tokio::task::spawn_blocking(move || {
            let mut results = Vec::new();
            for backups in &chosen {
                for entry in Self::catalog(backups, &partitions)? {
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
        let mut request = Request::new(PartitionStatusRequest::default());
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
            vec![AdminStore::new("features", registry.clone())],
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
        let open = AdminService::new(vec![AdminStore::new("features", registry)], None, drain);
        assert!(open.authorize(&request(None)).is_ok());
    }

    #[tokio::test]
    async fn a_second_drain_is_refused_while_one_runs() {
        let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drain = Arc::new(Drain::new(shutdown.clone(), false));
        let admin = AdminService::new(
            vec![AdminStore::new(
                "features",
                Arc::new(Registry::new("n1", 1)),
            )],
            None,
            drain.clone(),
        );
        let answer = admin
            .drain(Request::new(DrainRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.node_id, "n1");
        let stores: Vec<&str> = answer
            .active_by_store
            .iter()
            .map(|s| s.store.as_str())
            .collect();
        assert_eq!(stores, ["features"]);
        assert!(drain.requested() && shutdown.load(std::sync::atomic::Ordering::Acquire));
        let again = admin
            .drain(Request::new(DrainRequest {}))
            .await
            .unwrap_err();
        assert_eq!(again.code(), tonic::Code::FailedPrecondition);
        assert!(again.message().contains("draining"), "{}", again.message());
    }

    #[tokio::test]
    async fn calls_name_a_store_or_act_on_every_store() {
        let drain = Arc::new(Drain::new(Arc::default(), false));
        let admin = AdminService::new(
            vec![
                AdminStore::new("features", Arc::new(Registry::new("n1", 4))),
                AdminStore::new("tally", Arc::new(Registry::new("n1", 3))),
            ],
            None,
            drain,
        );
        let unknown = admin
            .partition_status(Request::new(PartitionStatusRequest {
                store: "orders".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::InvalidArgument);
        assert!(
            unknown.message().contains("\"orders\"")
                && unknown.message().contains("features, tally"),
            "{}",
            unknown.message()
        );
        for store in ["", "tally"] {
            assert!(
                admin
                    .partition_status(Request::new(PartitionStatusRequest {
                        store: store.into()
                    }))
                    .await
                    .is_ok()
            );
        }
        // Neither store has backups here: the call says so, for a named store and for all.
        for store in ["", "tally"] {
            let refused = admin
                .list_backups(Request::new(ListBackupsRequest {
                    store: store.into(),
                    ..Default::default()
                }))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{store:?}");
        }
    }

    #[tokio::test]
    async fn backup_calls_cover_each_named_store_and_its_own_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let backups_of = |store: &str, partitions: u32| {
            let config = crate::config::NodeConfig {
                store: store.into(),
                backup: crate::config::BackupConfig {
                    dir: dir.path().join("backups"),
                    ..Default::default()
                },
                state_dir: dir.path().join("state"),
                ..Default::default()
            };
            let memory = crate::store::SharedMemory::new(&config.memory);
            Backups::from_config(&config, partitions, memory)
        };
        let store = |name: &str, partitions: u32| {
            AdminStore::new(name, Arc::new(Registry::new("n1", partitions))).with_backups(
                backups_of(name, partitions),
                watch::channel(Arc::new(ClusterView::default())).1,
            )
        };
        let admin = AdminService::new(
            vec![store("features", 4), store("tally", 3)],
            None,
            Arc::new(Drain::new(Arc::default(), false)),
        );
        // Partition 3 is the features store's only: it is asked of that store alone.
        let listed = admin
            .list_backups(Request::new(ListBackupsRequest {
                partitions: vec![3],
                store: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(listed.backups.is_empty());
        assert!(listed.location.contains("backups"), "{}", listed.location);
        let out_of_range = admin
            .list_backups(Request::new(ListBackupsRequest {
                partitions: vec![3],
                store: "tally".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(out_of_range.code(), tonic::Code::InvalidArgument);
        // A backup id is one store's.
        let ambiguous = admin
            .verify_backup(Request::new(VerifyBackupRequest {
                partitions: vec![0],
                backup_id: 1,
                store: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(ambiguous.code(), tonic::Code::InvalidArgument);
        assert!(
            ambiguous.message().contains("features, tally"),
            "{}",
            ambiguous.message()
        );
    }
}
