//! `kstore backup create|list|verify`: the Admin backup calls for an operator.
//!
//! `create` asks every live node of the cluster (learned from the seeds' view) to back up
//! the partitions it is the backup source of, so that one command backs up every partition
//! once, from standbys where they run. `list` and `verify` ask one node, which reads the
//! backup location's catalog. Each acts on every store the nodes serve, or on one
//! (`--store`).

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kstore_proto::v1::admin_client::AdminClient;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{
    BackupInfo, CreateBackupRequest, CreateBackupResponse, ListBackupsRequest, Liveness,
    MetadataRequest, MetadataResponse, VerifyBackupRequest, VerifyBackupResponse,
};
use tonic::transport::{Channel, Endpoint};

use crate::view::role_name;

/// How one backup command reaches the cluster.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    /// gRPC addresses of nodes (`host:port`); the first that answers is used.
    pub seeds: Vec<String>,
    /// The bearer token Admin calls carry, if the nodes require one.
    pub token: Option<String>,
    /// How long one call may take.
    pub timeout: Duration,
    /// TLS to the nodes, if they serve it.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl AdminTarget {
    pub(crate) async fn channel(&self, address: &str) -> Result<Channel> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = if address.contains("://") {
            address.to_owned()
        } else {
            format!("{scheme}://{address}")
        };
        let mut endpoint = Endpoint::from_shared(uri)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(self.timeout);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint.connect().await?)
    }

    pub(crate) fn request<T>(&self, message: T) -> Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        Ok(request)
    }

    /// The cluster view of the first seed that connects, and every live node in it (id and
    /// gRPC address; the seed itself if the view names none).
    pub(crate) async fn live_nodes(&self) -> Result<(MetadataResponse, Vec<(String, String)>)> {
        let (seed, _) = self.admin().await?;
        let mut query = QueryClient::new(self.channel(&seed).await?);
        let view = query
            .metadata(MetadataRequest {})
            .await
            .with_context(|| format!("asking {seed} for the cluster view"))?
            .into_inner();
        let mut nodes: Vec<(String, String)> = view
            .nodes
            .iter()
            .filter(|n| n.liveness() == Liveness::Live && !n.grpc_address.is_empty())
            .map(|n| (n.node_id.clone(), n.grpc_address.clone()))
            .collect();
        nodes.dedup();
        if nodes.is_empty() {
            nodes.push((seed.clone(), seed));
        }
        Ok((view, nodes))
    }

    /// Calls `call` with an Admin client of every one of `nodes` (id and address) at once,
    /// and returns each node's answer, or why it failed, in the order given.
    pub(crate) async fn ask_each<T, F, Fut>(
        &self,
        nodes: Vec<(String, String)>,
        call: F,
    ) -> Result<Vec<(String, std::result::Result<T, String>)>>
    where
        T: Send + 'static,
        F: Fn(AdminTarget, AdminClient<Channel>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send,
    {
        let mut calls = tokio::task::JoinSet::new();
        for (index, (node_id, address)) in nodes.into_iter().enumerate() {
            let (target, call) = (self.clone(), call.clone());
            calls.spawn(async move {
                let answer = async {
                    let admin = AdminClient::new(target.channel(&address).await?);
                    call(target, admin).await
                }
                .await
                .map_err(|error| format!("{error:#}"));
                (index, node_id, answer)
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = calls.join_next().await {
            answers.push(joined.context("an Admin call panicked")?);
        }
        answers.sort_by_key(|(index, _, _)| *index);
        Ok(answers
            .into_iter()
            .map(|(_, node_id, answer)| (node_id, answer))
            .collect())
    }

    /// An Admin client for the first seed that connects.
    async fn admin(&self) -> Result<(String, AdminClient<Channel>)> {
        let mut errors = Vec::new();
        for seed in &self.seeds {
            match self.channel(seed).await {
                Ok(channel) => return Ok((seed.clone(), AdminClient::new(channel))),
                Err(error) => errors.push(format!("{seed}: {error}")),
            }
        }
        bail!("no seed answered: {}", errors.join("; "))
    }
}

/// What `kstore backup create` did across the cluster.
#[derive(Debug, Default)]
pub struct CreateSummary {
    /// Each node asked, and its answer (or why it failed).
    pub answers: Vec<(String, std::result::Result<CreateBackupResponse, String>)>,
    /// The partitions asked for that no node backed up, as (store, partition).
    pub missing: Vec<(String, u32)>,
}

/// Asks every live node for the backups it is the source of, of `store` (every store if
/// empty) and `partitions` (all if empty).
pub async fn create(
    target: &AdminTarget,
    store: &str,
    partitions: &[u32],
) -> Result<CreateSummary> {
    let (view, nodes) = target.live_nodes().await?;
    // Every node backs up its share at once.
    let (partitions_asked, store_asked) = (partitions.to_vec(), store.to_owned());
    let answers = target
        .ask_each(nodes, move |target, mut admin| {
            let (partitions, store) = (partitions_asked.clone(), store_asked.clone());
            async move {
                let request = target.request(CreateBackupRequest { partitions, store })?;
                Ok(admin.create_backup(request).await?.into_inner())
            }
        })
        .await?;
    let mut wanted = Vec::new();
    for described in view
        .stores
        .iter()
        .filter(|s| store.is_empty() || s.name == store)
    {
        let mut of_store: Vec<u32> = if partitions.is_empty() {
            (0..described.partitions).collect()
        } else {
            partitions.to_vec()
        };
        of_store.retain(|&p| p < described.partitions);
        wanted.extend(of_store.into_iter().map(|p| (described.name.clone(), p)));
    }
    let missing = wanted
        .into_iter()
        .filter(|(store, partition)| {
            !answers.iter().any(|(_, answer)| {
                answer.as_ref().is_ok_and(|a| {
                    a.backups
                        .iter()
                        .any(|b| b.partition == *partition && b.store == *store)
                })
            })
        })
        .collect();
    Ok(CreateSummary { answers, missing })
}

/// The catalog of `store` (every store if empty), as one node reads it.
pub async fn list(
    target: &AdminTarget,
    store: &str,
    partitions: &[u32],
) -> Result<(String, Vec<BackupInfo>)> {
    let (seed, mut admin) = target.admin().await?;
    let answer = admin
        .list_backups(target.request(ListBackupsRequest {
            partitions: partitions.to_vec(),
            store: store.to_owned(),
        })?)
        .await
        .with_context(|| format!("listing backups through {seed}"))?
        .into_inner();
    Ok((answer.location, answer.backups))
}

/// Re-reads the named backups' files (of `store`, every store if empty) and checks them.
pub async fn verify(
    target: &AdminTarget,
    store: &str,
    partitions: &[u32],
    backup_id: u32,
) -> Result<VerifyBackupResponse> {
    let (seed, mut admin) = target.admin().await?;
    Ok(admin
        .verify_backup(target.request(VerifyBackupRequest {
            partitions: partitions.to_vec(),
            backup_id,
            store: store.to_owned(),
        })?)
        .await
        .with_context(|| format!("verifying backups through {seed}"))?
        .into_inner())
}

/// One backup as a table row.
pub fn format_backup(backup: &BackupInfo) -> String {
    format!(
        "{:<12} {:>9} {:>6} {:>20} {:>14} {:>14} {:>10} {:>8} {:>12} {:>12}",
        backup.store,
        backup.partition,
        backup.backup_id,
        format_time(backup.created_at_ms),
        backup.changelog_offset,
        backup.input_offset,
        backup.node_id,
        role_name(backup.source_role()),
        format_bytes(backup.size_bytes),
        format_bytes(backup.added_bytes),
    )
}

/// The header of [`format_backup`]'s rows.
pub fn backup_header() -> String {
    format!(
        "{:<12} {:>9} {:>6} {:>20} {:>14} {:>14} {:>10} {:>8} {:>12} {:>12}",
        "store",
        "partition",
        "id",
        "created (UTC)",
        "changelog",
        "input",
        "node",
        "from",
        "size",
        "added"
    )
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_time(millis: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(millis);
    let seconds = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3_600,
        rest % 3_600 / 60,
        rest % 60
    )
}

/// Bytes for a person: `812 B`, `3.4 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(1_795_824_000_000), "2026-11-28 00:00:00");
        assert_eq!(
            format_time(951_782_400_000 + 3_723_000),
            "2000-02-29 01:02:03"
        );
        assert_eq!(format_bytes(812), "812 B");
        assert_eq!(format_bytes(3 << 20), "3.0 MiB");
    }
}
