//! Peer snapshots: a node that must host a partition it has no local copy of fetches a
//! consistent snapshot of a peer's copy over the `Peer` gRPC service, instead of replaying
//! the whole changelog. The peer makes a RocksDB checkpoint (hard links, so it costs little
//! and its copy keeps working) and streams its files in chunks, each file followed by its
//! XXH3-128 checksum. gRPC's flow control paces the sender to the receiver's disk, and the
//! sender reads ahead at most [`READ_AHEAD`] chunks. The receiver writes into a scratch
//! directory beside the store, checks every size and checksum, and only then moves the
//! snapshot into place; a peer that sends anything wrong is dropped and the next one tried.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kstore_core::cluster::ClusterView;
use kstore_proto::v1::peer_client::PeerClient;
use kstore_proto::v1::peer_server::Peer;
use kstore_proto::v1::snapshot_part::Part;
use kstore_proto::v1::{
    FetchSnapshotRequest, Role, SnapshotChunk, SnapshotFile, SnapshotFileEnd, SnapshotManifest,
    SnapshotPart,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::registry::Registry;
use crate::store::{PartitionStore, SharedMemory};

/// The size of one chunk of a file.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks the sender reads ahead of the network.
const READ_AHEAD: usize = 8;
/// How long the receiver waits for the next part before it gives the peer up.
const PART_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Snapshots this node sent, by outcome.
pub const SNAPSHOTS_SENT: &str = "kstore_snapshots_sent_total";
/// Bytes of snapshots this node received from peers.
pub const SNAPSHOT_BYTES_RECEIVED: &str = "kstore_snapshot_bytes_received_total";
/// Snapshots fetched from peers, by outcome (`ok`, or why a peer was dropped).
pub const SNAPSHOTS_FETCHED: &str = "kstore_snapshots_fetched_total";

/// Files of a store directory that a snapshot leaves out: RocksDB's info logs and lock.
fn skipped(name: &str) -> bool {
    name == "LOCK" || name.starts_with("LOG")
}

/// The Peer service of one node.
#[derive(Debug, Clone)]
pub struct PeerService {
    registry: Arc<Registry>,
    store: String,
    /// Where checkpoints are made: beside the stores, so that they are hard links.
    scratch: PathBuf,
    memory: SharedMemory,
    token: Option<String>,
}

impl PeerService {
    /// The service; with a token, every call must carry it as `authorization: Bearer …`.
    pub fn new(
        registry: Arc<Registry>,
        store: String,
        scratch: PathBuf,
        memory: SharedMemory,
        token: Option<String>,
    ) -> Self {
        PeerService {
            registry,
            store,
            scratch,
            memory,
            token,
        }
    }
}

/// Makes a checkpoint of `store` in `dir`, and returns its manifest.
fn checkpoint_manifest(
    store: &PartitionStore,
    dir: &Path,
    memory: &SharedMemory,
    node_id: &str,
    role: Role,
) -> Result<SnapshotManifest, String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    store.checkpoint(dir).map_err(|e| e.to_string())?;
    // Opened once to read its position, and closed before its files are listed: opening
    // may add files (a new manifest, options), which then belong to the snapshot.
    let position = PartitionStore::open(dir, memory)
        .and_then(|checkpoint| checkpoint.position())
        .map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let metadata = entry.metadata().map_err(|e| e.to_string())?;
        if metadata.is_file() && !skipped(&name) {
            files.push(SnapshotFile {
                name,
                bytes: metadata.len(),
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(SnapshotManifest {
        node_id: node_id.to_owned(),
        role: role as i32,
        changelog_offset: position.changelog_next,
        input_offset: position.input_next,
        files,
    })
}

/// Sends the checkpoint's files in chunks, each followed by its checksum. Stops when the
/// receiver goes away.
fn send_files(
    dir: &Path,
    manifest: &SnapshotManifest,
    parts: &mpsc::Sender<Result<SnapshotPart, Status>>,
) -> Result<(), String> {
    use std::io::Read;
    let send = |part: Part| {
        parts
            .blocking_send(Ok(SnapshotPart { part: Some(part) }))
            .map_err(|_| "the receiver went away".to_owned())
    };
    for (index, file) in manifest.files.iter().enumerate() {
        let mut reader =
            std::fs::File::open(dir.join(&file.name)).map_err(|e| format!("{}: {e}", file.name))?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK_BYTES];
            let read = reader
                .read(&mut data)
                .map_err(|e| format!("{}: {e}", file.name))?;
            if read == 0 {
                break;
            }
            data.truncate(read);
            hasher.update(&data);
            send(Part::Chunk(SnapshotChunk {
                file: index as u32,
                offset,
                data,
            }))?;
            offset += read as u64;
        }
        send(Part::FileEnd(SnapshotFileEnd {
            file: index as u32,
            xxh3: format!("{:032x}", hasher.digest128()),
        }))?;
    }
    Ok(())
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotPart, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type FetchSnapshotStream = SnapshotStream;

    async fn fetch_snapshot(
        &self,
        request: Request<FetchSnapshotRequest>,
    ) -> Result<Response<SnapshotStream>, Status> {
        crate::grpc::admin::authorize(self.token.as_deref(), &request)?;
        let FetchSnapshotRequest { store, partition } = request.into_inner();
        if store != self.store {
            return Err(Status::invalid_argument(format!(
                "no store named {store:?}; this node serves {:?}",
                self.store
            )));
        }
        let copy = self
            .registry
            .get(partition as i32)
            .ok_or_else(|| Status::not_found(format!("this node holds no copy of {partition}")))?;
        let role = copy.role();
        if role == Role::Restoring {
            return Err(Status::failed_precondition(format!(
                "this node's copy of partition {partition} is restoring"
            )));
        }
        let (parts, stream) = mpsc::channel(READ_AHEAD);
        let dir = self
            .scratch
            .join(format!(".peer-snapshot-{partition}-{}", snapshot_number()));
        let memory = self.memory.clone();
        let node_id = self.registry.node_id().to_owned();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let outcome = checkpoint_manifest(&copy.store, &dir, &memory, &node_id, role).and_then(
                |manifest| {
                    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
                    parts
                        .blocking_send(Ok(SnapshotPart {
                            part: Some(Part::Manifest(manifest.clone())),
                        }))
                        .map_err(|_| "the receiver went away".to_owned())?;
                    send_files(&dir, &manifest, &parts)?;
                    Ok(bytes)
                },
            );
            let _ = std::fs::remove_dir_all(&dir);
            match outcome {
                Ok(bytes) => {
                    metrics::counter!(SNAPSHOTS_SENT, "outcome" => "ok").increment(1);
                    tracing::info!(
                        partition,
                        bytes,
                        took_ms = started.elapsed().as_millis() as u64,
                        "sent a snapshot to a peer"
                    );
                }
                Err(error) => {
                    metrics::counter!(SNAPSHOTS_SENT, "outcome" => "failed").increment(1);
                    tracing::warn!(partition, %error, "sending a snapshot failed");
                    let _ = parts.blocking_send(Err(Status::internal(error)));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(stream),
        )))
    }
}

/// A number that differs between calls, so that concurrent snapshots of one partition use
/// different directories.
fn snapshot_number() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The next part of a snapshot; `None` at its end.
async fn next_part(
    parts: &mut (impl Stream<Item = Result<SnapshotPart, Status>> + Unpin),
) -> Result<Option<Part>, String> {
    match tokio::time::timeout(PART_TIMEOUT, parts.next()).await {
        Err(_) => Err(format!("no data for {PART_TIMEOUT:?}")),
        Ok(None) => Ok(None),
        Ok(Some(Err(status))) => Err(format!("the peer failed: {}", status.message())),
        Ok(Some(Ok(part))) => match part.part {
            Some(part) => Ok(Some(part)),
            None => Err("an empty part".into()),
        },
    }
}

/// Receives a snapshot from `parts` into `dir` (which must not exist): every file of the
/// manifest, each checked against its size and checksum. Returns the manifest.
pub async fn receive(
    mut parts: impl Stream<Item = Result<SnapshotPart, Status>> + Unpin,
    dir: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<SnapshotManifest, String> {
    let manifest = match next_part(&mut parts).await? {
        Some(Part::Manifest(manifest)) => manifest,
        other => {
            return Err(format!(
                "the snapshot did not start with a manifest: {other:?}"
            ));
        }
    };
    for file in &manifest.files {
        let name = Path::new(&file.name);
        if name.components().count() != 1 || name.file_name().is_none() {
            return Err(format!(
                "the manifest names a file outside the store: {:?}",
                file.name
            ));
        }
    }
    let total: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut received = 0u64;
    let mut current: Option<(u32, std::fs::File, xxhash_rust::xxh3::Xxh3, u64)> = None;
    let mut finished = 0usize;
    while let Some(part) = next_part(&mut parts).await? {
        match part {
            Part::Manifest(_) => return Err("a second manifest".into()),
            Part::Chunk(chunk) => {
                let file = manifest.files.get(chunk.file as usize).ok_or_else(|| {
                    format!("a chunk of file {} of {}", chunk.file, manifest.files.len())
                })?;
                if current
                    .as_ref()
                    .is_none_or(|(index, ..)| *index != chunk.file)
                {
                    if current.is_some() || chunk.file as usize != finished {
                        return Err(format!(
                            "file {} began before file {finished} ended",
                            chunk.file
                        ));
                    }
                    let handle = std::fs::File::create(dir.join(&file.name))
                        .map_err(|e| format!("creating {}: {e}", file.name))?;
                    current = Some((chunk.file, handle, xxhash_rust::xxh3::Xxh3::new(), 0));
                }
                let (_, handle, hasher, written) = current.as_mut().expect("set above");
                if chunk.offset != *written {
                    return Err(format!(
                        "{}: a chunk at {} after {written} bytes",
                        file.name, chunk.offset
                    ));
                }
                if *written + chunk.data.len() as u64 > file.bytes {
                    return Err(format!("{}: more than its {} bytes", file.name, file.bytes));
                }
                handle
                    .write_all(&chunk.data)
                    .map_err(|e| format!("writing {}: {e}", file.name))?;
                hasher.update(&chunk.data);
                *written += chunk.data.len() as u64;
                received += chunk.data.len() as u64;
                metrics::counter!(SNAPSHOT_BYTES_RECEIVED).increment(chunk.data.len() as u64);
                progress(received, total);
            }
            Part::FileEnd(end) => {
                if end.file as usize != finished {
                    return Err(format!(
                        "file {} ended while file {finished} was due",
                        end.file
                    ));
                }
                let file = &manifest.files[finished];
                let (handle, hasher, written) = match current.take() {
                    Some((_, handle, hasher, written)) => (Some(handle), hasher, written),
                    // An empty file has no chunks.
                    None => {
                        std::fs::File::create(dir.join(&file.name))
                            .map_err(|e| format!("creating {}: {e}", file.name))?;
                        (None, xxhash_rust::xxh3::Xxh3::new(), 0)
                    }
                };
                if written != file.bytes {
                    return Err(format!(
                        "{}: {written} bytes, the manifest says {}",
                        file.name, file.bytes
                    ));
                }
                let checksum = format!("{:032x}", hasher.digest128());
                if checksum != end.xxh3 {
                    return Err(format!(
                        "{}: checksum {checksum}, the peer says {}",
                        file.name, end.xxh3
                    ));
                }
                if let Some(handle) = handle {
                    handle
                        .sync_all()
                        .map_err(|e| format!("syncing {}: {e}", file.name))?;
                }
                finished += 1;
            }
        }
    }
    if finished != manifest.files.len() {
        return Err(format!(
            "the peer stopped after {finished} of {} files",
            manifest.files.len()
        ));
    }
    Ok(manifest)
}

/// Fetches snapshots of a node's partitions from its peers.
#[derive(Debug, Clone)]
pub struct SnapshotFetcher {
    runtime: tokio::runtime::Handle,
    view: watch::Receiver<Arc<ClusterView>>,
    node_id: String,
    store: String,
    token: Option<String>,
    memory: SharedMemory,
}

impl SnapshotFetcher {
    /// Fetches on `runtime`, choosing peers from `view`.
    pub fn new(
        runtime: tokio::runtime::Handle,
        view: watch::Receiver<Arc<ClusterView>>,
        node_id: String,
        store: String,
        token: Option<String>,
        memory: SharedMemory,
    ) -> Self {
        SnapshotFetcher {
            runtime,
            view,
            node_id,
            store,
            token,
            memory,
        }
    }

    /// Fills `target` (an empty or missing directory) with a snapshot of `partition` from
    /// the best peer that sends a good one, trying them in turn. Returns the peer and the
    /// manifest, or `None` if no peer could. Blocks; call it off the async runtime.
    pub fn bootstrap(&self, partition: u32, target: &Path) -> Option<(String, SnapshotManifest)> {
        let sources: Vec<(String, String)> = self
            .view
            .borrow()
            .snapshot_sources(partition, &self.node_id)
            .iter()
            .map(|h| (h.node.node_id.clone(), h.node.grpc_address.clone()))
            .collect();
        let incoming = target.with_file_name(format!(".incoming-{partition}"));
        for (peer, address) in sources {
            let _ = std::fs::remove_dir_all(&incoming);
            let started = Instant::now();
            let fetched = self
                .runtime
                .block_on(self.fetch(partition, &peer, &address, &incoming));
            let checked = fetched.and_then(|manifest| {
                let opened = PartitionStore::open(&incoming, &self.memory)
                    .and_then(|store| store.position())
                    .map_err(|e| format!("the snapshot does not open: {e}"))?;
                if opened.changelog_next != manifest.changelog_offset {
                    return Err(format!(
                        "the snapshot holds changelog offset {}, its manifest says {}",
                        opened.changelog_next, manifest.changelog_offset
                    ));
                }
                Ok(manifest)
            });
            match checked {
                Ok(manifest) => {
                    if let Err(error) = std::fs::remove_dir_all(target)
                        .or_else(|e| {
                            if e.kind() == std::io::ErrorKind::NotFound {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        })
                        .and_then(|()| std::fs::rename(&incoming, target))
                    {
                        tracing::error!(partition, %error, "cannot move a snapshot into place");
                        let _ = std::fs::remove_dir_all(&incoming);
                        return None;
                    }
                    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
                    let seconds = started.elapsed().as_secs_f64();
                    metrics::counter!(SNAPSHOTS_FETCHED, "outcome" => "ok").increment(1);
                    tracing::info!(
                        partition,
                        peer = %peer,
                        bytes,
                        took_ms = (seconds * 1000.0) as u64,
                        mib_per_s = (bytes as f64 / (1 << 20) as f64 / seconds.max(1e-6)) as u64,
                        changelog_offset = manifest.changelog_offset,
                        "bootstrapped a copy from a peer's snapshot; the changelog supplies the rest"
                    );
                    return Some((peer, manifest));
                }
                Err(error) => {
                    metrics::counter!(SNAPSHOTS_FETCHED, "outcome" => "dropped").increment(1);
                    tracing::warn!(partition, peer = %peer, %error,
                        "a peer's snapshot failed; trying the next source");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&incoming);
        None
    }

    async fn fetch(
        &self,
        partition: u32,
        peer: &str,
        address: &str,
        dir: &Path,
    ) -> Result<SnapshotManifest, String> {
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connecting to {address}: {e}"))?;
        let mut client = PeerClient::new(channel).max_decoding_message_size(CHUNK_BYTES * 2);
        let mut request = Request::new(FetchSnapshotRequest {
            store: self.store.clone(),
            partition,
        });
        if let Some(token) = &self.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        let parts = client
            .fetch_snapshot(request)
            .await
            .map_err(|status| format!("{}: {}", status.code(), status.message()))?
            .into_inner();
        let mut logged = Instant::now();
        receive(parts, dir, |received, total| {
            if logged.elapsed() >= Duration::from_secs(2) {
                logged = Instant::now();
                tracing::info!(partition, peer, received, total, "receiving a snapshot");
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{Position, test_memory};

    fn parts_of(store: &PartitionStore, scratch: &Path) -> Vec<SnapshotPart> {
        let dir = scratch.join("checkpoint");
        let manifest =
            checkpoint_manifest(store, &dir, &test_memory(), "node-1", Role::Active).unwrap();
        let (sender, mut receiver) = mpsc::channel(1 << 16);
        let mut parts = vec![SnapshotPart {
            part: Some(Part::Manifest(manifest.clone())),
        }];
        send_files(&dir, &manifest, &sender).unwrap();
        drop(sender);
        while let Ok(part) = receiver.try_recv() {
            parts.push(part.unwrap());
        }
        parts
    }

    fn filled_store(dir: &Path) -> Arc<PartitionStore> {
        let store = PartitionStore::open(dir, &test_memory()).unwrap();
        let updates: BTreeMap<Vec<u8>, Option<Vec<u8>>> = (0..5_000)
            .map(|i: u32| {
                let value = xxhash_rust::xxh3::xxh3_128(&i.to_be_bytes());
                (
                    format!("key-{i}").into_bytes(),
                    Some(format!("{value:032x}").repeat(20).into_bytes()),
                )
            })
            .collect();
        store
            .apply(
                &updates,
                Position {
                    changelog_next: 77,
                    input_next: 120,
                },
            )
            .unwrap();
        store
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_arrives_whole_and_opens_at_its_offsets() {
        let source = tempfile::tempdir().unwrap();
        let store = filled_store(&source.path().join("0"));
        let parts = tokio::task::spawn_blocking({
            let (store, scratch) = (store.clone(), source.path().to_path_buf());
            move || parts_of(&store, &scratch)
        })
        .await
        .unwrap();
        assert!(parts.len() > 3, "{} parts", parts.len());
        let target = tempfile::tempdir().unwrap();
        let dir = target.path().join("0");
        let manifest = receive(
            tokio_stream::iter(parts.into_iter().map(Ok)),
            &dir,
            |_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(
            (manifest.changelog_offset, manifest.input_offset),
            (77, 120)
        );
        let copy = PartitionStore::open(&dir, &test_memory()).unwrap();
        assert_eq!(copy.scan().unwrap(), store.scan().unwrap());
        assert_eq!(copy.position().unwrap().changelog_next, 77);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_checksum_a_gap_or_a_missing_file_is_refused() {
        let source = tempfile::tempdir().unwrap();
        let store = filled_store(&source.path().join("0"));
        let parts = tokio::task::spawn_blocking({
            let scratch = source.path().to_path_buf();
            move || parts_of(&store, &scratch)
        })
        .await
        .unwrap();
        let target = tempfile::tempdir().unwrap();
        let try_receive = |parts: Vec<SnapshotPart>, name: &str| {
            let dir = target.path().join(name);
            async move {
                receive(
                    tokio_stream::iter(parts.into_iter().map(Ok)),
                    &dir,
                    |_, _| {},
                )
                .await
                .unwrap_err()
            }
        };

        let mut flipped = parts.clone();
        let chunk = flipped
            .iter_mut()
            .find_map(|p| match &mut p.part {
                Some(Part::Chunk(chunk)) if chunk.data.len() > 100 => Some(chunk),
                _ => None,
            })
            .unwrap();
        chunk.data[50] ^= 1;
        let error = try_receive(flipped, "flipped").await;
        assert!(error.contains("checksum"), "{error}");

        let mut gap = parts.clone();
        let index = gap
            .iter()
            .position(|p| matches!(p.part, Some(Part::Chunk(_))))
            .unwrap();
        if let Some(Part::Chunk(chunk)) = &mut gap[index].part {
            chunk.offset += 1;
        }
        let error = try_receive(gap, "gap").await;
        assert!(error.contains("a chunk at"), "{error}");

        let mut cut = parts.clone();
        cut.pop();
        let error = try_receive(cut, "cut").await;
        assert!(error.contains("stopped after"), "{error}");

        let mut escaping = parts;
        if let Some(Part::Manifest(manifest)) = &mut escaping[0].part {
            manifest.files[0].name = "../outside".into();
        }
        let error = try_receive(escaping, "escaping").await;
        assert!(error.contains("outside"), "{error}");
    }
}
