//! Peer snapshots: a node that must host a partition it has no local copy of fetches a
//! consistent snapshot of a peer's copy over the `Peer` gRPC service, instead of replaying
//! the whole changelog. The peer makes a RocksDB checkpoint (hard links, so it costs little
//! and its copy keeps working) and streams its files in chunks, each file followed by its
//! XXH3-128 checksum. gRPC's flow control paces the sender to the receiver's disk, and the
//! sender reads ahead at most [`READ_AHEAD`] chunks.
//!
//! Both ends hold each other to limits (`limits` in the node's config). A node sends at
//! most `max-snapshot-streams` snapshots at once and refuses more at once; a receiver that
//! takes no part for `snapshot-send-timeout-ms` is given up, its checkpoint, thread and slot
//! freed and the parts queued for it emptied. The receiver ([`receive`]) trusts nothing in
//! the stream: it checks every part before writing it into a scratch directory beside the
//! store, removes that directory on any refusal, opens the result and checks its offsets,
//! and only then moves it into place; a peer that sends anything wrong is dropped, the
//! refusal counted by reason, and the next source tried.

pub mod receive;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use kstore_core::cluster::{ClusterView, Liveness};
use kstore_proto::v1::peer_client::PeerClient;
use kstore_proto::v1::peer_server::Peer;
use kstore_proto::v1::snapshot_part::Part;
use kstore_proto::v1::{
    FetchSnapshotRequest, Role, SnapshotChunk, SnapshotFile, SnapshotFileEnd, SnapshotManifest,
    SnapshotPart,
};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::access::{Access, Secret};
use crate::config::LimitsConfig;
use crate::grpc::limits::LimitError;
use crate::registry::Registry;
use crate::store::{PartitionStore, SharedMemory};
pub use receive::{ReceiveError, ReceiveLimits, receive};

/// The size of one chunk of a file.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks the sender reads ahead of the network.
const READ_AHEAD: usize = 8;
/// How many bytes of a snapshot may be on their way to the receiver (its HTTP/2 window), so
/// that the sender need not wait for each chunk to be taken before it sends the next.
const RECEIVE_WINDOW: u32 = 8 * CHUNK_BYTES as u32;
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Snapshots this node sent, by outcome (`ok`, `failed`, `receiver_gone`,
/// `receiver_stalled`).
pub const SNAPSHOTS_SENT: &str = "kstore_snapshots_sent_total";
/// Bytes of snapshots this node received from peers.
pub const SNAPSHOT_BYTES_RECEIVED: &str = "kstore_snapshot_bytes_received_total";
/// Snapshots fetched from peers, by outcome (`ok`, `refused`).
pub const SNAPSHOTS_FETCHED: &str = "kstore_snapshots_fetched_total";
/// Snapshots from peers that were refused, by reason (what was wrong with the stream, or
/// `unreachable`, `does_not_open`, `offset_mismatch`).
pub const SNAPSHOT_REFUSALS: &str = "kstore_snapshot_refusals_total";

/// Files of a store directory that a snapshot leaves out: RocksDB's info logs and lock.
fn skipped(name: &str) -> bool {
    name == "LOCK" || name.starts_with("LOG")
}

/// A store whose copies the Peer service sends.
#[derive(Debug, Clone)]
struct SentStore {
    name: String,
    registry: Arc<Registry>,
    /// Where checkpoints are made: beside the store's copies, so that they are hard links.
    scratch: PathBuf,
}

/// The Peer service of one node.
#[derive(Debug, Clone)]
pub struct PeerService {
    stores: Vec<SentStore>,
    memory: SharedMemory,
    /// What a caller must present: the cluster's secret.
    access: Access,
    /// One per snapshot being sent.
    slots: Arc<Semaphore>,
    slot_limit: usize,
    send_timeout: Duration,
}

impl PeerService {
    /// The service, with the default limits; with the cluster's secret, every call must
    /// carry it as `authorization: Bearer …` (only nodes may copy a node's stores).
    pub fn new(
        registry: Arc<Registry>,
        store: String,
        scratch: PathBuf,
        memory: SharedMemory,
        cluster_secret: Option<&str>,
    ) -> Self {
        PeerService {
            stores: vec![SentStore {
                name: store,
                registry,
                scratch,
            }],
            memory,
            access: Access {
                admin: None,
                cluster: cluster_secret.map(Secret::new),
            },
            slots: Arc::new(Semaphore::new(0)),
            slot_limit: 0,
            send_timeout: Duration::ZERO,
        }
        .with_limits(&LimitsConfig::default())
    }

    /// The service sending the copies of a further store too (checkpoints made in
    /// `scratch`); the limits are shared by every store.
    pub fn with_store(mut self, store: String, registry: Arc<Registry>, scratch: PathBuf) -> Self {
        self.stores.push(SentStore {
            name: store,
            registry,
            scratch,
        });
        self
    }

    /// The service with `limits`: how many snapshots it sends at once, and how long it waits
    /// for a receiver to take the next chunk.
    pub fn with_limits(mut self, limits: &LimitsConfig) -> Self {
        self.slots = Arc::new(Semaphore::new(limits.max_snapshot_streams));
        self.slot_limit = limits.max_snapshot_streams;
        self.send_timeout = Duration::from_millis(limits.snapshot_send_timeout_ms);
        self
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

/// Why sending a snapshot stopped early.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The receiver closed the stream.
    #[error("the receiver went away")]
    Gone,
    /// The receiver took no part for the send timeout.
    #[error("the receiver took no part for {0:?}")]
    Stalled(Duration),
    /// The checkpoint could not be made or read.
    #[error("{0}")]
    Checkpoint(String),
}

impl SendError {
    fn outcome(&self) -> &'static str {
        match self {
            SendError::Gone => "receiver_gone",
            SendError::Stalled(_) => "receiver_stalled",
            SendError::Checkpoint(_) => "failed",
        }
    }
}

/// What a slot holds: a part, or the error that ends the stream; `None` once taken or
/// emptied.
type SlotContent = Mutex<Option<Result<SnapshotPart, Status>>>;

/// A part on its way to the receiver, in a slot the sender can empty.
type Slot = Arc<SlotContent>;

/// The sending end of a snapshot stream. Each part waits at most the send timeout for room
/// in the queue. When a receiver stalls longer, the parts it has not taken yet are emptied,
/// so that their memory is freed even while its connection (and so the queue) stays open.
struct PartSender {
    parts: mpsc::Sender<Slot>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    /// The parts sent lately, which the receiver may not have taken yet.
    queued: VecDeque<Weak<SlotContent>>,
}

impl PartSender {
    /// A sender on `parts` that waits at most `timeout` per part, on `runtime` (blocking:
    /// call it off the async workers).
    fn new(parts: mpsc::Sender<Slot>, runtime: tokio::runtime::Handle, timeout: Duration) -> Self {
        PartSender {
            parts,
            runtime,
            timeout,
            queued: VecDeque::with_capacity(READ_AHEAD + 2),
        }
    }

    fn send(&mut self, part: Part) -> Result<(), SendError> {
        let slot: Slot = Arc::new(Mutex::new(Some(Ok(SnapshotPart { part: Some(part) }))));
        let queued = Arc::downgrade(&slot);
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(self.timeout, self.parts.send(slot)));
        match sent {
            Ok(Ok(())) => {
                // The queue holds READ_AHEAD parts and the stream one more: older ones are
                // taken.
                self.queued.push_back(queued);
                if self.queued.len() > READ_AHEAD + 1 {
                    self.queued.pop_front();
                }
                Ok(())
            }
            Ok(Err(_)) => Err(SendError::Gone),
            Err(_) => {
                for slot in self.queued.drain(..).filter_map(|slot| slot.upgrade()) {
                    slot.lock().unwrap_or_else(PoisonError::into_inner).take();
                }
                Err(SendError::Stalled(self.timeout))
            }
        }
    }

    /// Ends the stream with `status`, if the queue has room for it.
    fn fail(&self, status: Status) {
        let _ = self.parts.try_send(Arc::new(Mutex::new(Some(Err(status)))));
    }
}

/// The stream of parts a [`PartSender`] sends. A part that was emptied ends the stream.
fn part_stream(parts: mpsc::Receiver<Slot>) -> SnapshotStream {
    let parts = tokio_stream::wrappers::ReceiverStream::new(parts).map(|slot: Slot| {
        slot.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| {
                Err(Status::deadline_exceeded(
                    "the snapshot was given up: the receiver took no part in time",
                ))
            })
    });
    Box::pin(parts)
}

/// Sends the checkpoint's files in chunks, each followed by its checksum. Stops when the
/// receiver goes away or stalls.
fn send_files(
    dir: &Path,
    manifest: &SnapshotManifest,
    send: &mut impl FnMut(Part) -> Result<(), SendError>,
) -> Result<(), SendError> {
    use std::io::Read;
    let failed = |name: &str, e: std::io::Error| SendError::Checkpoint(format!("{name}: {e}"));
    for (index, file) in manifest.files.iter().enumerate() {
        let index = u32::try_from(index)
            .map_err(|_| SendError::Checkpoint("more than 2^32 files".into()))?;
        let mut reader =
            std::fs::File::open(dir.join(&file.name)).map_err(|e| failed(&file.name, e))?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut offset = 0u64;
        loop {
            let mut data = Vec::with_capacity(CHUNK_BYTES);
            let read = (&mut reader)
                .take(CHUNK_BYTES as u64)
                .read_to_end(&mut data)
                .map_err(|e| failed(&file.name, e))?;
            if read == 0 {
                break;
            }
            hasher.update(&data);
            send(Part::Chunk(SnapshotChunk {
                file: index,
                offset,
                data: data.into(),
            }))?;
            offset += read as u64;
        }
        send(Part::FileEnd(SnapshotFileEnd {
            file: index,
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
        self.access.node(&request)?;
        let FetchSnapshotRequest { store, partition } = request.into_inner();
        let Some(sent) = self.stores.iter().find(|sent| sent.name == store) else {
            let served: Vec<&str> = self.stores.iter().map(|s| s.name.as_str()).collect();
            return Err(Status::invalid_argument(format!(
                "no store named {store:?}; this node serves {}",
                served.join(", ")
            )));
        };
        let copy = i32::try_from(partition)
            .ok()
            .and_then(|partition| sent.registry.get(partition))
            .ok_or_else(|| Status::not_found(format!("this node holds no copy of {partition}")))?;
        let role = copy.role();
        if role == Role::Restoring {
            return Err(Status::failed_precondition(format!(
                "this node's copy of partition {partition} is restoring"
            )));
        }
        // The slot is the sending thread's: it is freed when the send ends, is given up, or
        // fails, whether or not the receiver's connection stays.
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            let refused = LimitError::TooManyStreams {
                method: "FetchSnapshot",
                limit: self.slot_limit,
                key: "max-snapshot-streams",
            };
            refused.count("FetchSnapshot");
            tracing::info!(partition, %refused, "refused a snapshot");
            Status::from(refused)
        })?;
        let (parts, stream) = mpsc::channel(READ_AHEAD);
        let dir = sent
            .scratch
            .join(format!(".peer-snapshot-{partition}-{}", snapshot_number()));
        let memory = self.memory.clone();
        let node_id = sent.registry.node_id().to_owned();
        let mut sender =
            PartSender::new(parts, tokio::runtime::Handle::current(), self.send_timeout);
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let started = Instant::now();
            let outcome = checkpoint_manifest(&copy.store, &dir, &memory, &node_id, role)
                .map_err(SendError::Checkpoint)
                .and_then(|manifest| {
                    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
                    sender.send(Part::Manifest(manifest.clone()))?;
                    send_files(&dir, &manifest, &mut |part| sender.send(part))?;
                    Ok(bytes)
                });
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
                    metrics::counter!(SNAPSHOTS_SENT, "outcome" => error.outcome()).increment(1);
                    tracing::warn!(partition, %error, "sending a snapshot stopped");
                    sender.fail(Status::unavailable(format!(
                        "sending the snapshot stopped: {error}"
                    )));
                }
            }
        });
        Ok(Response::new(part_stream(stream)))
    }
}

/// A number that differs between calls, so that concurrent snapshots of one partition use
/// different directories.
fn snapshot_number() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// How long a new copy keeps asking peers that refused it only for a moment (see
/// `FetchError::is_momentary`) before it gives up on peers: a copy re-activated after a
/// rebalance restores its changelog tail within about a second.
const BUSY_PEER_WAIT: Duration = Duration::from_secs(10);

/// The pause between two rounds of asking busy peers.
const BUSY_PEER_PAUSE: Duration = Duration::from_millis(250);

/// Why a peer's snapshot was not used.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// The peer could not be reached.
    #[error("connecting to {address}: {reason}")]
    Unreachable {
        /// The peer's address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The stream was refused.
    #[error(transparent)]
    Refused(#[from] ReceiveError),
    /// The files arrived whole but are not a store.
    #[error("the snapshot does not open: {0}")]
    DoesNotOpen(String),
    /// The store holds other offsets than the manifest states.
    #[error("the snapshot holds changelog offset {held}, its manifest says {stated}")]
    OffsetMismatch {
        /// The store's.
        held: i64,
        /// The manifest's.
        stated: i64,
    },
}

impl FetchError {
    /// Whether the peer refused only for a moment: its copy is restoring (after a
    /// rebalance), or it sends as many snapshots as it may.
    fn is_momentary(&self) -> bool {
        matches!(
            self,
            FetchError::Refused(ReceiveError::PeerFailed {
                code: tonic::Code::FailedPrecondition | tonic::Code::ResourceExhausted,
                ..
            })
        )
    }

    fn reason(&self) -> &'static str {
        match self {
            FetchError::Unreachable { .. } => "unreachable",
            FetchError::Refused(refused) => refused.reason(),
            FetchError::DoesNotOpen(_) => "does_not_open",
            FetchError::OffsetMismatch { .. } => "offset_mismatch",
        }
    }
}

/// Fetches snapshots of a node's partitions from its peers.
#[derive(Debug, Clone)]
pub struct SnapshotFetcher {
    runtime: tokio::runtime::Handle,
    view: watch::Receiver<Arc<ClusterView>>,
    node_id: String,
    store: String,
    token: Option<String>,
    tls: Option<Arc<crate::tls::Tls>>,
    memory: SharedMemory,
    max_files: usize,
    disk_margin: u64,
    idle_timeout: Duration,
    /// Until when a copy with no peer in view waits for gossip to bring one: a node that
    /// has just started has not heard from its seeds yet, and a copy it bootstraps before
    /// then would replay its whole changelog although a peer holds it.
    first_view_deadline: Option<Instant>,
}

impl SnapshotFetcher {
    /// Fetches on `runtime`, choosing peers from `view`, with the default limits, presenting
    /// the cluster's secret (`token`) to them.
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
            tls: None,
            memory,
            max_files: 0,
            disk_margin: 0,
            idle_timeout: Duration::ZERO,
            first_view_deadline: None,
        }
        .with_limits(&LimitsConfig::default())
    }

    /// The fetcher waiting, until `wait` from now, for gossip to show a peer holding a
    /// partition before it gives up on peers for that partition. For a node that has just
    /// started and has seeds: its first view may not have heard from them yet.
    pub fn with_first_view_wait(mut self, wait: Duration) -> Self {
        self.first_view_deadline = Some(Instant::now() + wait);
        self
    }

    /// The fetcher dialing peers over TLS with the node's identity, if `tls` is set.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::Tls>>) -> Self {
        self.tls = tls;
        self
    }

    /// The fetcher with `limits`: the most files a snapshot may hold, the free space its
    /// disk keeps, and how long a stream may go without a part.
    pub fn with_limits(mut self, limits: &LimitsConfig) -> Self {
        self.max_files = limits.snapshot_max_files;
        self.disk_margin = limits.snapshot_disk_margin_bytes;
        self.idle_timeout = Duration::from_millis(limits.snapshot_idle_timeout_ms);
        self
    }

    /// Fills `target` (an empty or missing directory) with a snapshot of `partition` from
    /// the best peer that sends a good one, trying them in turn. Returns the peer and the
    /// manifest, or `None` if no peer could. Blocks; call it off the async runtime.
    pub fn bootstrap(&self, partition: u32, target: &Path) -> Option<(String, SnapshotManifest)> {
        // A peer whose copy is busy for a moment (restoring its changelog tail after a
        // rebalance, or sending as many snapshots as it may) is asked again, for a while,
        // rather than replaying the whole changelog here.
        let busy_until = Instant::now() + BUSY_PEER_WAIT;
        loop {
            let (fetched, busy) = self.bootstrap_once(partition, target);
            if fetched.is_some() || !busy || Instant::now() >= busy_until {
                return fetched;
            }
            tracing::info!(
                partition,
                "the peers holding the partition are busy for a moment; asking them again"
            );
            std::thread::sleep(BUSY_PEER_PAUSE);
        }
    }

    /// Tries each source of `partition` once (see [`SnapshotFetcher::bootstrap`]); also says
    /// whether a source refused only for a moment.
    fn bootstrap_once(
        &self,
        partition: u32,
        target: &Path,
    ) -> (Option<(String, SnapshotManifest)>, bool) {
        let sources = self.sources(partition);
        let incoming = target.with_file_name(format!(".incoming-{partition}"));
        // No source yet, but a peer's copy is settling after a rebalance: it is one in a
        // moment, and waiting for it beats replaying the whole changelog here.
        let mut busy = sources.is_empty()
            && self
                .view
                .borrow()
                .copy_settling_elsewhere(partition, &self.node_id);
        for (peer, address) in sources {
            // Left over by a process that stopped while receiving.
            let _ = std::fs::remove_dir_all(&incoming);
            let started = Instant::now();
            let manifest = match self.attempt(partition, &peer, &address, &incoming) {
                Ok(manifest) => manifest,
                Err(error) => {
                    busy |= error.is_momentary();
                    let _ = std::fs::remove_dir_all(&incoming);
                    metrics::counter!(SNAPSHOTS_FETCHED, "outcome" => "refused").increment(1);
                    metrics::counter!(SNAPSHOT_REFUSALS, "reason" => error.reason()).increment(1);
                    tracing::warn!(partition, peer = %peer, %error, reason = error.reason(),
                        "refused a peer's snapshot; trying the next source");
                    continue;
                }
            };
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
                return (None, false);
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
            return (Some((peer, manifest)), false);
        }
        (None, busy)
    }

    /// The peers that may send a snapshot of `partition`, best first, as (node id, gRPC
    /// address). While the first view's deadline has not passed, waits for gossip to show
    /// one. Blocks.
    fn sources(&self, partition: u32) -> Vec<(String, String)> {
        let sources_in = |view: &ClusterView| -> Vec<(String, String)> {
            view.snapshot_sources(partition, &self.node_id)
                .iter()
                .map(|h| (h.node.node_id.clone(), h.node.grpc_address.clone()))
                .collect()
        };
        // Once the view shows another node live, gossip has reached the cluster: what it says
        // about holders is as good as it gets. A node only just heard of is not live yet (the
        // failure detector waits for its second heartbeat), and its copies are not sources
        // until it is: giving up on peers then would replay a whole changelog for nothing.
        let heard_from_cluster = |view: &ClusterView| {
            view.nodes
                .iter()
                .any(|n| n.node_id != self.node_id && n.liveness == Liveness::Live)
        };
        let mut view = self.view.clone();
        let (now_known, heard) = {
            let view = view.borrow_and_update();
            (sources_in(&view), heard_from_cluster(&view))
        };
        let deadline = match self.first_view_deadline {
            Some(deadline) if now_known.is_empty() && !heard && deadline > Instant::now() => {
                deadline
            }
            _ => return now_known,
        };
        tracing::info!(
            partition,
            wait_ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            "gossip has not reached another node yet; waiting for it before choosing a source"
        );
        self.runtime.block_on(async {
            let waited = tokio::time::timeout_at(deadline.into(), async {
                while view.changed().await.is_ok() {
                    let view = view.borrow_and_update();
                    if heard_from_cluster(&view) {
                        return sources_in(&view);
                    }
                }
                Vec::new()
            });
            waited.await.unwrap_or_default()
        })
    }

    /// Fetches `peer`'s snapshot of `partition` into `incoming` and checks that it opens at
    /// the manifest's offset. Blocks.
    fn attempt(
        &self,
        partition: u32,
        peer: &str,
        address: &str,
        incoming: &Path,
    ) -> Result<SnapshotManifest, FetchError> {
        self.runtime
            .block_on(self.fetch(partition, peer, address, incoming))
            .and_then(|manifest| self.check_opens(incoming, manifest))
    }

    /// Checks that the snapshot in `dir` opens as a store at the manifest's offset.
    fn check_opens(
        &self,
        dir: &Path,
        manifest: SnapshotManifest,
    ) -> Result<SnapshotManifest, FetchError> {
        // Opening creates a store where there is none: an empty snapshot would pass.
        if !dir.join("CURRENT").is_file() {
            return Err(FetchError::DoesNotOpen("it holds no CURRENT file".into()));
        }
        let opened = PartitionStore::open(dir, &self.memory)
            .and_then(|store| store.position())
            .map_err(|e| FetchError::DoesNotOpen(e.to_string()))?;
        if opened.changelog_next != manifest.changelog_offset {
            return Err(FetchError::OffsetMismatch {
                held: opened.changelog_next,
                stated: manifest.changelog_offset,
            });
        }
        Ok(manifest)
    }

    /// The limits a snapshot arriving into `dir` is held to: the disk's free space now,
    /// less the margin.
    fn receive_limits(&self, dir: &Path) -> Result<ReceiveLimits, FetchError> {
        let disk = dir.parent().unwrap_or(dir);
        let available = receive::available_bytes(disk)
            .map_err(|e| ReceiveError::Local(format!("free space of {}: {e}", disk.display())))?;
        Ok(ReceiveLimits {
            max_files: self.max_files,
            max_bytes: available.saturating_sub(self.disk_margin),
            idle_timeout: self.idle_timeout,
        })
    }

    async fn fetch(
        &self,
        partition: u32,
        peer: &str,
        address: &str,
        dir: &Path,
    ) -> Result<SnapshotManifest, FetchError> {
        let limits = self.receive_limits(dir)?;
        let unreachable = |reason: String| FetchError::Unreachable {
            address: address.to_owned(),
            reason,
        };
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(RECEIVE_WINDOW)
            .initial_connection_window_size(RECEIVE_WINDOW);
        let channel = match &self.tls {
            Some(tls) => endpoint.connect_with_connector(tls.connector()).await,
            None => endpoint.connect().await,
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let mut client = PeerClient::new(channel).max_decoding_message_size(CHUNK_BYTES * 2);
        let mut request = Request::new(FetchSnapshotRequest {
            store: self.store.clone(),
            partition,
        });
        if let Some(token) = &self.token {
            crate::access::present(&mut request, token);
        }
        let answer = tokio::time::timeout(self.idle_timeout, client.fetch_snapshot(request))
            .await
            .map_err(|_| ReceiveError::Stalled(self.idle_timeout))?;
        let parts = answer
            .map_err(|status| ReceiveError::PeerFailed {
                code: status.code(),
                message: receive::quoted(status.message()),
            })?
            .into_inner();
        let mut logged = Instant::now();
        let manifest = receive(parts, dir, &limits, |received, total| {
            if logged.elapsed() >= Duration::from_secs(2) {
                logged = Instant::now();
                tracing::info!(partition, peer, received, total, "receiving a snapshot");
            }
        })
        .await?;
        Ok(manifest)
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
        let mut parts = vec![SnapshotPart {
            part: Some(Part::Manifest(manifest.clone())),
        }];
        send_files(&dir, &manifest, &mut |part| {
            parts.push(SnapshotPart { part: Some(part) });
            Ok(())
        })
        .unwrap();
        parts
    }

    fn limits() -> ReceiveLimits {
        ReceiveLimits {
            max_files: 1_000,
            max_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(30),
        }
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

    /// A filled store of partition 0 in `dir`, and the parts of a snapshot of it.
    async fn filled_store_in_parts(dir: &Path) -> (Arc<PartitionStore>, Vec<SnapshotPart>) {
        let store = filled_store(&dir.join("0"));
        let parts = tokio::task::spawn_blocking({
            let (store, scratch) = (store.clone(), dir.to_path_buf());
            move || parts_of(&store, &scratch)
        })
        .await
        .unwrap();
        (store, parts)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_arrives_whole_and_opens_at_its_offsets() {
        let source = tempfile::tempdir().unwrap();
        let (store, parts) = filled_store_in_parts(source.path()).await;
        assert!(parts.len() > 3, "{} parts", parts.len());
        let target = tempfile::tempdir().unwrap();
        let dir = target.path().join("0");
        let manifest = receive(
            tokio_stream::iter(parts.into_iter().map(Ok)),
            &dir,
            &limits(),
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
        let (_, parts) = filled_store_in_parts(source.path()).await;
        let target = tempfile::tempdir().unwrap();
        let try_receive = |parts: Vec<SnapshotPart>, name: &str| {
            let dir = target.path().join(name);
            async move {
                let error = receive(
                    tokio_stream::iter(parts.into_iter().map(Ok)),
                    &dir,
                    &limits(),
                    |_, _| {},
                )
                .await
                .unwrap_err();
                assert!(!dir.exists(), "{error}: {} stayed behind", dir.display());
                error
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
        let mut data = chunk.data.to_vec();
        data[50] ^= 1;
        chunk.data = data.into();
        let error = try_receive(flipped, "flipped").await;
        assert!(matches!(error, ReceiveError::Checksum { .. }), "{error}");

        let mut gap = parts.clone();
        let index = gap
            .iter()
            .position(|p| matches!(p.part, Some(Part::Chunk(_))))
            .unwrap();
        if let Some(Part::Chunk(chunk)) = &mut gap[index].part {
            chunk.offset += 1;
        }
        let error = try_receive(gap, "gap").await;
        assert!(matches!(error, ReceiveError::BadOffset { .. }), "{error}");

        let mut cut = parts.clone();
        cut.pop();
        let error = try_receive(cut, "cut").await;
        assert!(matches!(error, ReceiveError::EndedEarly { .. }), "{error}");

        let mut escaping = parts;
        if let Some(Part::Manifest(manifest)) = &mut escaping[0].part {
            manifest.files[0].name = "../outside".into();
        }
        let error = try_receive(escaping, "escaping").await;
        assert!(matches!(error, ReceiveError::BadFileName { .. }), "{error}");
    }

    /// A store of about `mib` MiB of incompressible values, at changelog offset 77.
    fn large_store(dir: &Path, mib: u32) -> Arc<PartitionStore> {
        let store = PartitionStore::open(dir, &test_memory()).unwrap();
        let updates: BTreeMap<Vec<u8>, Option<Vec<u8>>> = (0..mib * 1024)
            .map(|i: u32| {
                let value: Vec<u8> = (0..64u32)
                    .flat_map(|j| {
                        xxhash_rust::xxh3::xxh3_128(&[i.to_be_bytes(), j.to_be_bytes()].concat())
                            .to_be_bytes()
                    })
                    .collect();
                (format!("key-{i}").into_bytes(), Some(value))
            })
            .collect();
        let position = Position {
            changelog_next: 77,
            input_next: 120,
        };
        store.apply(&updates, position).unwrap();
        store
    }

    fn peer_service(
        store: Arc<PartitionStore>,
        scratch: &Path,
        limits: &LimitsConfig,
    ) -> PeerService {
        let registry = Arc::new(Registry::new("node-1", 1));
        let position = store.position().unwrap();
        registry.track(0, store, Role::Active, position);
        PeerService::new(
            registry,
            "features".into(),
            scratch.to_path_buf(),
            test_memory(),
            None,
        )
        .with_limits(limits)
    }

    fn fetch_request() -> Request<FetchSnapshotRequest> {
        Request::new(FetchSnapshotRequest {
            store: "features".into(),
            partition: 0,
        })
    }

    fn checkpoints_in(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".peer-snapshot-")
            })
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receiver_that_stops_reading_is_given_up_and_frees_its_slot() {
        use tonic_types::StatusExt;
        let source = tempfile::tempdir().unwrap();
        let store = tokio::task::spawn_blocking({
            let dir = source.path().join("0");
            move || large_store(&dir, 12)
        })
        .await
        .unwrap();
        let limits = LimitsConfig {
            max_snapshot_streams: 1,
            // Long enough that the test asks again before the sender gives up, on a busy
            // machine too.
            snapshot_send_timeout_ms: 2_000,
            ..LimitsConfig::default()
        };
        let service = peer_service(store, source.path(), &limits);

        // The receiver takes the manifest, then stops reading.
        let mut stalled = service
            .fetch_snapshot(fetch_request())
            .await
            .unwrap()
            .into_inner();
        let first = stalled.next().await.unwrap().unwrap();
        assert!(matches!(first.part, Some(Part::Manifest(_))));

        // Its sender holds the one slot: another snapshot is refused at once.
        let Err(busy) = service.fetch_snapshot(fetch_request()).await else {
            panic!("a second snapshot was admitted");
        };
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            busy.get_details_error_info().unwrap().reason,
            "TOO_MANY_STREAMS"
        );

        // After the send timeout the sender gives up: its checkpoint goes, its slot frees.
        let deadline = Instant::now() + Duration::from_secs(20);
        let admitted = loop {
            match service.fetch_snapshot(fetch_request()).await {
                Ok(admitted) => break admitted,
                Err(status) => assert_eq!(status.code(), tonic::Code::ResourceExhausted),
            }
            assert!(Instant::now() < deadline, "the slot was never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        drop(admitted);
        while checkpoints_in(source.path()) > 0 {
            assert!(Instant::now() < deadline, "a checkpoint stayed behind");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The chunks queued for the stalled receiver were emptied (their memory freed): if
        // it reads again, the stream ends with an error at once.
        let mut bytes = 0;
        let ended = loop {
            match stalled.next().await {
                Some(Ok(SnapshotPart {
                    part: Some(Part::Chunk(chunk)),
                })) => bytes += chunk.data.len(),
                Some(Ok(_)) => {}
                Some(Err(status)) => break Some(status),
                None => break None,
            }
        };
        assert_eq!(bytes, 0, "parts queued for a stalled receiver were kept");
        assert_eq!(ended.unwrap().code(), tonic::Code::DeadlineExceeded);
    }

    /// A peer that sends whatever stream it is given.
    #[derive(Debug, Clone, Default)]
    struct ScriptedPeer {
        parts: Arc<Mutex<Vec<Result<SnapshotPart, Status>>>>,
        stall: Arc<std::sync::atomic::AtomicBool>,
    }

    #[tonic::async_trait]
    impl Peer for ScriptedPeer {
        type FetchSnapshotStream = SnapshotStream;

        async fn fetch_snapshot(
            &self,
            _request: Request<FetchSnapshotRequest>,
        ) -> Result<Response<SnapshotStream>, Status> {
            let parts = self.parts.lock().unwrap().clone();
            let parts = tokio_stream::iter(parts);
            if self.stall.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(Response::new(Box::pin(
                    parts.chain(tokio_stream::pending()),
                )));
            }
            Ok(Response::new(Box::pin(parts)))
        }
    }

    async fn serve_peer(peer: impl Peer) -> String {
        let incoming =
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = incoming.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(kstore_proto::v1::peer_server::PeerServer::new(peer))
                .serve_with_incoming(incoming),
        );
        address
    }

    fn holder(
        node_id: &str,
        address: &str,
        role: Role,
        lag: i64,
    ) -> kstore_core::cluster::NodeEntry {
        kstore_core::cluster::NodeEntry {
            node_id: node_id.into(),
            incarnation: 1,
            version: 1,
            gossip_address: String::new(),
            grpc_address: address.into(),
            group_generation: 1,
            status: kstore_core::cluster::NodeStatus::Running,
            liveness: kstore_core::cluster::Liveness::Live,
            conflicting: false,
            load: Default::default(),
            copies: vec![kstore_core::cluster::CopyInfo {
                partition: 0,
                role,
                changelog_offset: 77,
                input_offset: 120,
                lag,
            }],
            copy_errors: Default::default(),
        }
    }

    /// A peer snapshot against a raw copy of the same files (copy each, fsync), on this
    /// machine's disk, page cache warm for both; best of three each, alternating. Each
    /// snapshot must arrive whole: every key with its value, at the store's position. It
    /// asserts no time; it prints the figures. `KSTORE_SNAPSHOT_BENCH_MIB` sets the store's
    /// size (default 16 MiB of incompressible values, so that it runs with the tests):
    /// `KSTORE_SNAPSHOT_BENCH_MIB=1024 cargo test -p kstore-server --lib snapshot_speed --
    /// --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_speed_against_a_raw_copy() {
        let mib: u64 = std::env::var("KSTORE_SNAPSHOT_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        let source = tempfile::tempdir().unwrap();
        let store_dir = source.path().join("0");
        let started = Instant::now();
        let keys = (mib << 20) / INCOMPRESSIBLE_VALUE_BYTES as u64;
        let store = tokio::task::spawn_blocking({
            let store_dir = store_dir.clone();
            move || incompressible_store(&store_dir, keys)
        })
        .await
        .unwrap();
        // The raw copy copies a checkpoint (hard links to the same files): the live
        // directory's files come and go as RocksDB compacts.
        let stable = source.path().join("stable");
        store.checkpoint(&stable).unwrap();
        let on_disk: u64 = std::fs::read_dir(&stable)
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum();
        eprintln!(
            "filled {:.0} MiB on disk in {:.1} s",
            on_disk as f64 / f64::from(1 << 20),
            started.elapsed().as_secs_f64()
        );
        let address = serve_peer(peer_service(
            store.clone(),
            source.path(),
            &LimitsConfig::default(),
        ))
        .await;
        let (_view_tx, view_rx) =
            watch::channel(view_of(vec![holder("node-1", &address, Role::Active, 0)]));
        let fetcher = node_9_fetching(view_rx);
        let target = tempfile::tempdir().unwrap();
        let (mut raw, mut snapshot) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let copy = target.path().join("raw");
            let started = Instant::now();
            std::fs::create_dir(&copy).unwrap();
            for entry in std::fs::read_dir(&stable).unwrap() {
                let entry = entry.unwrap();
                let to = copy.join(entry.file_name());
                std::fs::copy(entry.path(), &to).unwrap();
                std::fs::File::open(&to).unwrap().sync_all().unwrap();
            }
            raw = raw.min(started.elapsed().as_secs_f64());
            std::fs::remove_dir_all(&copy).unwrap();

            let copy = target.path().join("0");
            let started = Instant::now();
            let fetched = tokio::task::spawn_blocking({
                let (fetcher, copy) = (fetcher.clone(), copy.clone());
                move || fetcher.bootstrap(0, &copy)
            })
            .await
            .unwrap();
            snapshot = snapshot.min(started.elapsed().as_secs_f64());
            let (_, manifest) = fetched.expect("the snapshot was not fetched");
            let received = PartitionStore::open(&copy, &test_memory()).unwrap();
            assert_eq!(received.position().unwrap(), store.position().unwrap());
            assert_eq!(manifest.changelog_offset, keys as i64);
            assert!(
                received.scan().unwrap() == store.scan().unwrap(),
                "keys or values differ"
            );
            drop(received);
            std::fs::remove_dir_all(&copy).unwrap();
        }
        let speed = |seconds: f64| on_disk as f64 / f64::from(1 << 20) / seconds;
        eprintln!(
            "raw copy {raw:.2} s ({:.0} MiB/s); peer snapshot {snapshot:.2} s ({:.0} MiB/s), \
             {:.0}% of the raw copy's speed",
            speed(raw),
            speed(snapshot),
            raw / snapshot * 100.0
        );
    }

    const INCOMPRESSIBLE_VALUE_BYTES: usize = 1024;

    /// A store at `dir` holding `keys` values of [`INCOMPRESSIBLE_VALUE_BYTES`] that do not
    /// compress, flushed, at changelog and input position `keys`.
    fn incompressible_store(dir: &Path, keys: u64) -> Arc<PartitionStore> {
        const PER_BATCH: u64 = 4096;
        let store = PartitionStore::open(dir, &test_memory()).unwrap();
        let mut written = 0u64;
        while written < keys {
            let updates: BTreeMap<Vec<u8>, Option<Vec<u8>>> = (written
                ..(written + PER_BATCH).min(keys))
                .map(|key| {
                    let value: Vec<u8> = (0..INCOMPRESSIBLE_VALUE_BYTES / 16)
                        .flat_map(|part| {
                            xxhash_rust::xxh3::xxh3_128(
                                &[key, part as u64].map(u64::to_be_bytes).concat(),
                            )
                            .to_be_bytes()
                        })
                        .collect();
                    (format!("key-{key:012}").into_bytes(), Some(value))
                })
                .collect();
            written += updates.len() as u64;
            store
                .apply(
                    &updates,
                    Position {
                        changelog_next: written as i64,
                        input_next: written as i64,
                    },
                )
                .unwrap();
        }
        store.flush().unwrap();
        store
    }

    /// The fetcher of node-9 (which holds nothing), choosing peers from `view`.
    fn node_9_fetching(view: watch::Receiver<Arc<ClusterView>>) -> SnapshotFetcher {
        SnapshotFetcher::new(
            tokio::runtime::Handle::current(),
            view,
            "node-9".into(),
            "features".into(),
            None,
            test_memory(),
        )
    }

    fn view_of(nodes: Vec<kstore_core::cluster::NodeEntry>) -> Arc<ClusterView> {
        Arc::new(ClusterView {
            cluster_id: "test".into(),
            version: 1,
            nodes,
        })
    }

    /// A peer that refuses the first calls with `status`, then sends `parts`.
    #[derive(Debug, Clone)]
    struct RefusingPeer {
        refusals_left: Arc<std::sync::atomic::AtomicUsize>,
        status: Status,
        parts: Vec<SnapshotPart>,
    }

    #[tonic::async_trait]
    impl Peer for RefusingPeer {
        type FetchSnapshotStream = SnapshotStream;

        async fn fetch_snapshot(
            &self,
            _request: Request<FetchSnapshotRequest>,
        ) -> Result<Response<SnapshotStream>, Status> {
            use std::sync::atomic::Ordering::SeqCst;
            let refuse = self
                .refusals_left
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .is_ok();
            if refuse {
                return Err(self.status.clone());
            }
            let parts = tokio_stream::iter(self.parts.clone().into_iter().map(Ok));
            Ok(Response::new(Box::pin(parts)))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_busy_for_a_moment_is_asked_again_and_one_that_refuses_is_not() {
        let source = tempfile::tempdir().unwrap();
        let (_, parts) = filled_store_in_parts(source.path()).await;
        for (status, refusals, bootstraps) in [
            // Its copy restores its changelog tail after a rebalance: asked again.
            (
                Status::failed_precondition("this node's copy of partition 0 is restoring"),
                3,
                true,
            ),
            // At its snapshot limit: asked again.
            (
                Status::resource_exhausted("too many snapshot streams"),
                2,
                true,
            ),
            // It holds no copy: the changelog it is, at once.
            (Status::not_found("this node holds no copy of 0"), 1, false),
        ] {
            let refusals_left = Arc::new(std::sync::atomic::AtomicUsize::new(refusals));
            let address = serve_peer(RefusingPeer {
                refusals_left: refusals_left.clone(),
                status: status.clone(),
                parts: parts.clone(),
            })
            .await;
            let (_view_tx, view_rx) =
                watch::channel(view_of(vec![holder("node-1", &address, Role::Active, 0)]));
            let fetcher = node_9_fetching(view_rx);
            let target = tempfile::tempdir().unwrap();
            let dir = target.path().join("0");
            let started = Instant::now();
            let fetched = tokio::task::spawn_blocking(move || fetcher.bootstrap(0, &dir))
                .await
                .unwrap();
            assert_eq!(fetched.is_some(), bootstraps, "{status:?}");
            assert_eq!(
                refusals_left.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "{status:?}"
            );
            if !bootstraps {
                assert!(
                    started.elapsed() < BUSY_PEER_WAIT / 2,
                    "a refusal for good was asked again"
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_that_just_started_waits_for_gossip_to_reach_the_cluster_before_giving_up_on_peers()
     {
        let mut alone = holder("node-9", "127.0.0.1:9", Role::Active, 0);
        alone.copies.clear();
        let (view_tx, view_rx) = watch::channel(view_of(vec![alone.clone()]));
        let fetcher = node_9_fetching(view_rx).with_first_view_wait(Duration::from_secs(60));
        let asked = tokio::task::spawn_blocking({
            let fetcher = fetcher.clone();
            move || fetcher.sources(0)
        });
        // Until the call is waiting (it holds a third receiver of the view), or is over.
        while view_tx.receiver_count() < 3 && !asked.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A view that still knows only this node changes nothing, nor one that shows another
        // node not yet live (just heard of); the first one that shows another node live is
        // the one whose holders count.
        view_tx.send_replace(view_of(vec![alone.clone()]));
        tokio::task::yield_now().await;
        let mut just_heard_of = holder("node-1", "127.0.0.1:1", Role::Standby, 3);
        just_heard_of.liveness = Liveness::Suspect;
        view_tx.send_replace(view_of(vec![alone.clone(), just_heard_of]));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !asked.is_finished(),
            "a node not yet live was taken as the cluster's answer"
        );
        view_tx.send_replace(view_of(vec![
            alone.clone(),
            holder("node-1", "127.0.0.1:1", Role::Standby, 3),
        ]));
        assert_eq!(
            asked.await.unwrap(),
            vec![("node-1".to_string(), "127.0.0.1:1".to_string())]
        );

        // Once gossip has reached another node, a partition nobody holds is not waited for:
        // this returns at once, not after the minute.
        let mut holds_nothing = holder("node-1", "127.0.0.1:1", Role::Standby, 3);
        holds_nothing.copies.clear();
        view_tx.send_replace(view_of(vec![alone, holds_nothing]));
        let asked = tokio::task::spawn_blocking(move || fetcher.sources(0));
        let sources = tokio::time::timeout(Duration::from_secs(30), asked)
            .await
            .expect("a view that has reached the cluster is not waited on")
            .unwrap();
        assert!(sources.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hostile_peer_is_refused_and_the_next_source_bootstraps_the_copy() {
        let source = tempfile::tempdir().unwrap();
        let store = filled_store(&source.path().join("0"));
        let good = peer_service(store.clone(), source.path(), &LimitsConfig::default());
        let good = serve_peer(good).await;
        let hostile = ScriptedPeer::default();
        let hostile_address = serve_peer(hostile.clone()).await;
        // The hostile peer ranks first: a standby with no lag.
        let view = ClusterView {
            cluster_id: "test".into(),
            version: 1,
            nodes: vec![
                holder("node-1", &good, Role::Active, 5),
                holder("node-2", &hostile_address, Role::Standby, 0),
            ],
        };
        let (_view_tx, view_rx) = watch::channel(Arc::new(view));
        let fetcher = node_9_fetching(view_rx).with_limits(&LimitsConfig {
            // Long enough for the good peer to make its checkpoint on a busy machine (its
            // manifest follows it), short enough for the stalling peer.
            snapshot_idle_timeout_ms: 3_000,
            snapshot_disk_margin_bytes: 0,
            ..LimitsConfig::default()
        });
        let good_parts = tokio::task::spawn_blocking({
            let (store, scratch) = (store.clone(), source.path().join("scratch"));
            move || {
                std::fs::create_dir_all(&scratch).unwrap();
                parts_of(&store, &scratch)
            }
        })
        .await
        .unwrap();
        let manifest_of = |files: &[(&str, u64)]| SnapshotPart {
            part: Some(Part::Manifest(SnapshotManifest {
                node_id: "node-2".into(),
                role: Role::Standby as i32,
                changelog_offset: 77,
                input_offset: 120,
                files: files
                    .iter()
                    .map(|(name, bytes)| SnapshotFile {
                        name: (*name).into(),
                        bytes: *bytes,
                    })
                    .collect(),
            })),
        };
        let end = |file| SnapshotPart {
            part: Some(Part::FileEnd(SnapshotFileEnd {
                file,
                xxh3: String::new(),
            })),
        };
        let chunk = |file, offset| SnapshotPart {
            part: Some(Part::Chunk(SnapshotChunk {
                file,
                offset,
                data: vec![1; 10].into(),
            })),
        };
        let mut half = good_parts.clone();
        half.truncate(good_parts.len() / 2);
        let mut wrong_offset = good_parts.clone();
        if let Some(Part::Manifest(manifest)) = &mut wrong_offset[0].part {
            manifest.changelog_offset = 5;
        }
        let cases: Vec<(&str, Vec<SnapshotPart>, bool, &str)> = vec![
            (
                "an empty manifest and a file end",
                vec![manifest_of(&[]), end(0)],
                false,
                "unknown_file",
            ),
            (
                "a file end past the last file",
                vec![manifest_of(&[("CURRENT", 0)]), end(3)],
                false,
                "unknown_file",
            ),
            (
                "a chunk of an unknown file",
                vec![manifest_of(&[("CURRENT", 10)]), chunk(7, 0)],
                false,
                "unknown_file",
            ),
            (
                "a path for a name",
                vec![manifest_of(&[("../../escape", 10)]), chunk(0, 0)],
                false,
                "bad_file_name",
            ),
            (
                "sizes that overflow",
                vec![manifest_of(&[("a", u64::MAX), ("b", 2)])],
                false,
                "size_overflow",
            ),
            (
                "more than the disk holds",
                vec![manifest_of(&[("a", u64::MAX / 2)])],
                false,
                "no_space",
            ),
            ("a stream that ends early", half, false, "ended_early"),
            (
                "a stream that stalls",
                good_parts[..3].to_vec(),
                true,
                "stalled",
            ),
            (
                "files that do not open",
                vec![manifest_of(&[])],
                false,
                "does_not_open",
            ),
            (
                "offsets that differ from the store's",
                wrong_offset,
                false,
                "offset_mismatch",
            ),
        ];
        let stores = tempfile::tempdir().unwrap();
        for (case, parts, stall, reason) in cases {
            *hostile.parts.lock().unwrap() = parts.into_iter().map(Ok).collect();
            hostile
                .stall
                .store(stall, std::sync::atomic::Ordering::Relaxed);
            let target = stores.path().join("0");
            let (refused, fetched, target) = tokio::task::spawn_blocking({
                let (fetcher, hostile) = (fetcher.clone(), hostile_address.clone());
                move || {
                    let incoming = target.with_file_name(".incoming-0");
                    let refused = fetcher.attempt(0, "node-2", &hostile, &incoming);
                    let _ = std::fs::remove_dir_all(&incoming);
                    (refused, fetcher.bootstrap(0, &target), target)
                }
            })
            .await
            .unwrap();
            match refused {
                Err(error) => assert_eq!(error.reason(), reason, "{case}: {error}"),
                Ok(_) => panic!("{case}: accepted"),
            }
            let (peer, manifest) = fetched.unwrap_or_else(|| panic!("{case}: no copy"));
            assert_eq!(peer, "node-1", "{case}");
            assert_eq!(manifest.changelog_offset, 77, "{case}");
            let copy = PartitionStore::open(&target, &test_memory()).unwrap();
            assert_eq!(copy.scan().unwrap(), store.scan().unwrap(), "{case}");
            drop(copy);
            // Only the copy is left: the refused attempt's scratch directory is gone.
            let left: Vec<String> = std::fs::read_dir(stores.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(left, ["0"], "{case}: {reason}");
            std::fs::remove_dir_all(&target).unwrap();
        }
    }
}
