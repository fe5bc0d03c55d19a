//! The node's configuration: a TOML file, then `KSTORE_…` environment variables, then
//! `--set key=value` flags, each layer overriding the one before; then `validate()`.
//!
//! Keys are kebab-case. Nested keys use `.` in flags (`--set memory.block-cache-bytes=…`)
//! and `__` in the environment (`KSTORE_MEMORY__BLOCK_CACHE_BYTES`). The `[kafka]` table is
//! passed verbatim to librdkafka (`--set kafka.bootstrap.servers=…`,
//! `KSTORE_KAFKA__BOOTSTRAP_SERVERS`, where `_` becomes `.`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::processor::wasm::WasmConfig;

/// How the node commits its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessingGuarantee {
    /// Kafka transactions (exactly-once v2): state changes, outputs, dead letters and input
    /// offsets commit atomically.
    ExactlyOnce,
    /// Outputs are flushed, then input offsets committed: a crash can apply a record twice.
    AtLeastOnce,
}

/// What to do with a record whose key hashes to another partition than the one it arrived
/// on (its producer did not use Kafka's partitioner, so reads would never find the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MismatchPolicy {
    /// Count and log it, then process it as usual.
    Warn,
    /// Count and log it, and send it to the dead-letter topic.
    Dlq,
}

/// How the consumer group places the partitions' actives on the nodes (Kafka's
/// `partition.assignment.strategy`, classic protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupAssignor {
    /// Kafka's range assignor over the members sorted by `group.instance.id` (the node id):
    /// whenever the same nodes are in the group, each owns the same partitions, whatever
    /// happened before. A rebalance is eager: every partition's ingest pauses while it runs.
    Range,
    /// Kafka's cooperative-sticky assignor: a rebalance pauses only the partitions that
    /// move, but where they go depends on what each member reports owning, which a
    /// restarted process or a member that missed its session timeout reports empty.
    CooperativeSticky,
}

impl GroupAssignor {
    /// The librdkafka name of the assignor.
    pub fn kafka_name(self) -> &'static str {
        match self {
            GroupAssignor::Range => "range",
            GroupAssignor::CooperativeSticky => "cooperative-sticky",
        }
    }
}

/// Which built-in processor folds the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessorKind {
    /// The built-in fraud features per customer from JSON order events.
    Features,
}

/// The processor that folds the input: a built-in one by name (`processor = "features"`),
/// or a WebAssembly module (`processor = { wasm = "module.wasm", … }`, see
/// [`WasmConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ProcessorConfig {
    /// A processor built into the node.
    Builtin(ProcessorKind),
    /// A module loaded at start.
    Wasm(WasmConfig),
}

impl<'de> Deserialize<'de> for ProcessorConfig {
    // By hand rather than untagged, so that a bad name or a bad key of the table is named
    // in the error rather than "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ProcessorConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a built-in processor's name or a table such as { wasm = \"module.wasm\" }",
                )
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
                ProcessorKind::deserialize(serde::de::value::StrDeserializer::new(name))
                    .map(ProcessorConfig::Builtin)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                WasmConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ProcessorConfig::Wasm)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Memory that all of the node's RocksDB stores share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MemoryConfig {
    /// The block cache shared by every store.
    pub block_cache_bytes: u64,
    /// The memtable budget shared by every store, charged to the block cache.
    pub write_buffer_bytes: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 128 << 20,
        }
    }
}

/// The node's probes on the metrics port (see the `probes` module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ProbesConfig {
    /// Readiness's staleness bound, in input records: `/readyz` fails while a local copy
    /// lags the input by more than this and a live copy on another node is more than this
    /// ahead of it. The same default as the client's `PreferActive { max_lag }`.
    pub max_lag: i64,
    /// Liveness's limit, in milliseconds: `/livez` fails when a loop (ingest, state updater,
    /// gossip) has not come around for this long outside a step known to be long.
    pub stall_after_ms: u64,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            max_lag: 10_000,
            stall_after_ms: 300_000,
        }
    }
}

/// Backups of the node's stores (see the `backup` module).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct BackupConfig {
    /// The backup location: a local or mounted directory that every node of the cluster
    /// can reach (so any node can restore any partition). Empty turns backups off.
    pub dir: PathBuf,
    /// How often the node backs up each partition it is the backup source of, in
    /// milliseconds; 0 backs up only on demand (Admin `CreateBackup`).
    pub interval_ms: u64,
    /// How many backups of each partition are kept, newest first.
    pub keep_count: usize,
    /// Backups older than this are deleted, in milliseconds, except each partition's
    /// newest one.
    pub max_age_ms: u64,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            dir: PathBuf::new(),
            interval_ms: 3_600_000,
            keep_count: 24,
            max_age_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// Limits that keep a node answering reads whatever its callers and peers do: how many
/// calls of each kind it serves at once, how long it waits on them, and what it accepts
/// from a peer's snapshot. A call beyond a limit is refused at once, with a status that
/// names the limit, rather than queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LimitsConfig {
    /// Query calls (Get, MultiGet, Metadata) answered at once; more are refused with
    /// UNAVAILABLE (reason OVERLOADED), so the caller asks another copy.
    pub max_concurrent_reads: usize,
    /// The longest a Query call (Get, MultiGet, Metadata) may take, in milliseconds: a read
    /// waiting for its position bound answers POSITION_NOT_REACHED just before it, anything
    /// else still running then is answered UNAVAILABLE (reason REQUEST_TIMEOUT).
    pub request_timeout_ms: u64,
    /// WatchMetadata and ScanStream streams open at once; more are refused with
    /// RESOURCE_EXHAUSTED (reason TOO_MANY_STREAMS).
    pub max_watch_streams: usize,
    /// Snapshots this node sends to peers at once (FetchSnapshot); more are refused with
    /// RESOURCE_EXHAUSTED (reason TOO_MANY_STREAMS), and the peer asks another source.
    pub max_snapshot_streams: usize,
    /// How long a snapshot this node sends may wait for the receiver to take the next
    /// chunk, in milliseconds; then the send is abandoned, and its checkpoint and slot freed.
    pub snapshot_send_timeout_ms: u64,
    /// How long a snapshot this node receives may go without a part, in milliseconds; then
    /// the peer is given up and the next source tried.
    pub snapshot_idle_timeout_ms: u64,
    /// The most files a peer's snapshot may hold.
    pub snapshot_max_files: usize,
    /// Free space the state directory's disk keeps when a snapshot arrives: a snapshot
    /// larger than the free space less this is refused before its first byte.
    pub snapshot_disk_margin_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_concurrent_reads: 1_024,
            request_timeout_ms: 60_000,
            max_watch_streams: 1_024,
            max_snapshot_streams: 4,
            snapshot_send_timeout_ms: 30_000,
            snapshot_idle_timeout_ms: 30_000,
            snapshot_max_files: 100_000,
            snapshot_disk_margin_bytes: 1 << 30,
        }
    }
}

impl LimitsConfig {
    /// Checks every limit, naming the first bad key.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: format!("limits.{key}"),
                reason: reason.into(),
            })
        };
        for (key, value, range) in [
            (
                "max-concurrent-reads",
                self.max_concurrent_reads,
                1..=1_000_000,
            ),
            ("max-watch-streams", self.max_watch_streams, 0..=1_000_000),
            ("max-snapshot-streams", self.max_snapshot_streams, 0..=1_000),
            (
                "snapshot-max-files",
                self.snapshot_max_files,
                1..=10_000_000,
            ),
        ] {
            if !range.contains(&value) {
                return invalid(
                    key,
                    &format!("must be between {} and {}", range.start(), range.end()),
                );
            }
        }
        for (key, value) in [
            ("request-timeout-ms", self.request_timeout_ms),
            ("snapshot-send-timeout-ms", self.snapshot_send_timeout_ms),
            ("snapshot-idle-timeout-ms", self.snapshot_idle_timeout_ms),
        ] {
            if !(100..=3_600_000).contains(&value) {
                return invalid(key, "must be between 100 and 3600000");
            }
        }
        Ok(())
    }
}

/// TLS on the gRPC port, and for the calls this node makes to other nodes (forwarded reads,
/// Peer snapshots). Certificates and CAs are read again on SIGHUP and when their files
/// change; a set that does not load or verify is refused and the one in use kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct TlsConfig {
    /// The node's certificate chain (PEM), leaf first. It must name the node's advertised
    /// host (`advertise-host`, or the gRPC address's IP) as a subject alternative name, and
    /// allow both server and client authentication (the node presents it to its peers).
    pub cert: PathBuf,
    /// The node's private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA (PEM) that signs the nodes' certificates: a node verifies the nodes it calls
    /// with it, by their advertised host.
    pub ca: PathBuf,
    /// The CA (PEM) that signs client certificates. Set, it turns mutual TLS on: every
    /// caller (clients, and the other nodes, which present their node certificate) must
    /// present a certificate it signed. Empty: any client may connect.
    pub client_ca: PathBuf,
    /// How often the files are checked for changes, in milliseconds.
    pub reload_interval_ms: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            ca: PathBuf::new(),
            client_ca: PathBuf::new(),
            reload_interval_ms: 5_000,
        }
    }
}

impl TlsConfig {
    /// Whether mutual TLS is on (`client-ca` set).
    pub fn mutual(&self) -> bool {
        !self.client_ca.as_os_str().is_empty()
    }

    /// Checks the keys, naming the first bad one (the files are read when the node starts).
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, path) in [("cert", &self.cert), ("key", &self.key), ("ca", &self.ca)] {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("tls.{key}"),
                    reason: "must be set (a PEM file) when [tls] is present".into(),
                });
            }
        }
        if !(100..=3_600_000).contains(&self.reload_interval_ms) {
            return Err(ConfigError::Invalid {
                key: "tls.reload-interval-ms".into(),
                reason: "must be between 100 and 3600000".into(),
            });
        }
        Ok(())
    }
}

impl BackupConfig {
    /// Whether a backup location is set.
    pub fn enabled(&self) -> bool {
        !self.dir.as_os_str().is_empty()
    }
}

/// The protobuf message type of a store's values (`[value-type]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ValueTypeConfig {
    /// A `FileDescriptorSet` file that defines the message and everything it imports
    /// (`protoc --include_imports --descriptor_set_out=…`).
    pub descriptor_set: PathBuf,
    /// The message's full name, such as `acme.v1.Counter`.
    pub message: String,
}

/// A further store of the node (`[[stores]]`), beside the one the top-level keys describe:
/// its own input, processor, changelog, dead letters, consumer group, standbys, backups and
/// metrics, served on the same ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreConfig {
    /// The store's name, as reads name it.
    pub name: String,
    /// The keyed input topic.
    #[serde(default)]
    pub input_topic: String,
    /// Several co-partitioned input topics instead of `input-topic` (as the top-level
    /// `input-topics`).
    #[serde(default)]
    pub input_topics: Vec<String>,
    /// The processor that folds the input.
    pub processor: ProcessorConfig,
    /// The protobuf type of the store's values (as the top-level `[value-type]`).
    #[serde(default)]
    pub value_type: Option<ValueTypeConfig>,
    /// The store's changelog topic. Named explicitly, never derived from the store's name,
    /// so that renaming the store cannot leave its state behind in an orphaned topic.
    pub changelog_topic: String,
    /// The topic the store's dead letters go to (named explicitly, as the changelog).
    pub dead_letter_topic: String,
    /// The store's consumer group (its committed input offsets; part of its transactional
    /// ids). Named explicitly too: a new group would fold the whole input again.
    pub group_id: String,
}

/// The names that tie a further store to its state in Kafka, set on the configuration
/// [`NodeConfig::store_configs`] derives for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreTopics {
    changelog_topic: String,
    dead_letter_topic: String,
    group_id: String,
}

/// Everything a node needs to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct NodeConfig {
    /// This node's id: its static group member id and part of its transactional id.
    pub node_id: String,
    /// The application id: the consumer group and the prefix of kstore's topics.
    pub app_id: String,
    /// The keyed input topic.
    pub input_topic: String,
    /// Several keyed input topics instead of `input-topic`, co-partitioned (the same
    /// partition count, keys placed by the same partitioner): partition `p` of the store
    /// folds partition `p` of each, in the order the records arrive. To change the list, stop
    /// every node of the store, then start them with the new one (README, "A store over
    /// several input topics").
    pub input_topics: Vec<String>,
    /// The store's name, part of the changelog topic's name.
    pub store: String,
    /// Further stores (`[[stores]]`), each with its own input, processor and topics.
    pub stores: Vec<StoreConfig>,
    /// Set on the configuration derived for a further store: its own topics and group.
    #[serde(skip)]
    pub store_topics: Option<StoreTopics>,
    /// Where stores live: `<state-dir>/<app-id>/<store>/<partition>/`.
    pub state_dir: PathBuf,
    /// Exactly-once (default) or at-least-once.
    pub processing_guarantee: ProcessingGuarantee,
    /// The processor that folds the input.
    pub processor: ProcessorConfig,
    /// The protobuf type of the store's values, for a WebAssembly processor whose values
    /// are protobuf messages: reads return them typed and reflection describes them.
    pub value_type: Option<ValueTypeConfig>,
    /// The longest a transaction stays open, in milliseconds.
    pub commit_interval_ms: u64,
    /// The most input records in one transaction.
    pub max_transaction_records: usize,
    /// A transaction commits once the updates it holds in memory (keys and values, one per
    /// key) reach this many bytes.
    pub max_transaction_bytes: usize,
    /// Input values larger than this go to the dead-letter topic.
    pub max_value_bytes: usize,
    /// Input keys larger than this go to the dead-letter topic.
    pub max_key_bytes: usize,
    /// What to do with keys that arrive on the wrong partition.
    pub partition_mismatch: MismatchPolicy,
    /// The replication factor of topics the node creates; -1 takes the broker's default.
    pub topic_replication_factor: i32,
    /// Where the node serves gRPC (Query, Admin, health, reflection).
    pub grpc_address: String,
    /// Where the node serves Prometheus metrics (`GET /metrics`); empty to turn them off.
    pub metrics_address: String,
    /// Whether the Admin service is served.
    pub admin_enabled: bool,
    /// The bearer token Admin calls must carry; required when `grpc-address` is not a
    /// loopback address and admin is enabled.
    pub admin_token: Option<String>,
    /// The secret the cluster's nodes share (at least 32 bytes): gossip datagrams carry its
    /// MAC, and the calls only nodes may make (Peer snapshots, forwarded reads) carry it as
    /// a bearer token. Required when the node's gRPC or gossip address is not loopback.
    pub cluster_secret: Option<String>,
    /// The most keys one MultiGet may ask for.
    pub max_multiget_keys: usize,
    /// The most keys one Scan page returns.
    pub max_scan_page: usize,
    /// How long a read with a position bound waits when its request has no deadline.
    pub read_wait_ms: u64,
    /// The niceness (0..=19) of ingestion: the ingest thread, and the Kafka client and
    /// RocksDB threads it starts. Reads run at the process's own priority, so a node that
    /// is short of CPU answers reads first and lets ingest lag (every answer shows the lag).
    pub ingest_niceness: u8,
    /// The cluster this node gossips with; gossip from other clusters is dropped.
    pub cluster_id: String,
    /// Where the node gossips (UDP). Port 0 takes a free port; the node logs the address.
    pub gossip_address: String,
    /// The IP address or DNS name other nodes and clients use to reach this node, when it
    /// differs from the one it listens on (which must then be set if it listens on 0.0.0.0
    /// or [::]). A name is advertised as is for gRPC and resolved at start for gossip.
    pub advertise_host: String,
    /// Gossip addresses (`host:port`) of nodes to join through. Empty for the first node.
    pub seeds: Vec<String>,
    /// How often the node gossips with a few others, in milliseconds.
    pub gossip_interval_ms: u64,
    /// How often the node publishes its copies, offsets, lag and load, and rebuilds its view
    /// of the cluster, in milliseconds.
    pub publish_interval_ms: u64,
    /// How long a node whose heartbeats stopped is suspect before it counts as dead (its
    /// standbys are then placed on other nodes), in milliseconds.
    pub dead_after_ms: u64,
    /// Standby copies of each partition, on nodes other than its active's.
    pub num_standbys: usize,
    /// How long the directory of a copy this node no longer holds is kept, so that a quick
    /// return starts warm, in milliseconds.
    pub standby_retention_ms: u64,
    /// Whether SIGTERM drains the node (as Admin Drain does: its partitions move at once)
    /// rather than stopping it as a static member that will be back within the session
    /// timeout (a rolling restart, which moves nothing).
    pub drain_on_shutdown: bool,
    /// How long a drain waits for the other members to run the node's partitions before the
    /// node stops anyway, in milliseconds.
    pub drain_timeout_ms: u64,
    /// How the consumer group places the actives: `range` (a node gets the same partitions
    /// back whenever the same nodes are in the group) or `cooperative-sticky`.
    pub group_assignor: GroupAssignor,
    /// Whether a copy found on disk at start is read whole to check every block's checksum
    /// before it is used; a damaged copy is moved aside and recovered (from the newest good
    /// backup, then its changelog). Costs one sequential read of the copy.
    pub verify_checksums_on_open: bool,
    /// How often every open copy is read whole to check its checksums, in milliseconds; 0
    /// turns the background check off. A damaged copy fails: it is moved aside and rebuilt
    /// (a damaged active's input waits meanwhile, and its standbys answer its reads).
    pub verify_interval_ms: u64,
    /// How often a copy that changed is flushed to disk, in milliseconds. Stores keep no
    /// write-ahead log (the changelog is the log): a crash loses what a copy applied since
    /// its last flush, which it then replays from the changelog.
    pub store_flush_interval_ms: u64,
    /// How soon a failed copy is first retried, in milliseconds; each retry that fails
    /// again doubles the wait, up to `copy-retry-max-ms`.
    pub copy_retry_initial_ms: u64,
    /// The longest wait between retries of a failed copy, in milliseconds.
    pub copy_retry_max_ms: u64,
    /// Backups of the stores.
    pub backup: BackupConfig,
    /// The probes on the metrics port.
    pub probes: ProbesConfig,
    /// Memory shared by the stores.
    pub memory: MemoryConfig,
    /// Limits on what callers and peers may ask of the node at once.
    pub limits: LimitsConfig,
    /// TLS for gRPC; absent, gRPC is plaintext (reads travel unencrypted; the cluster
    /// secret still guards the calls only nodes may make).
    pub tls: Option<TlsConfig>,
    /// librdkafka settings for every client of the node, passed through verbatim.
    pub kafka: BTreeMap<String, String>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: String::new(),
            app_id: "kstore".into(),
            input_topic: String::new(),
            input_topics: Vec::new(),
            store: "features".into(),
            stores: Vec::new(),
            store_topics: None,
            state_dir: PathBuf::from("kstore-state"),
            processing_guarantee: ProcessingGuarantee::ExactlyOnce,
            processor: ProcessorConfig::Builtin(ProcessorKind::Features),
            value_type: None,
            commit_interval_ms: 100,
            max_transaction_records: 20_000,
            max_transaction_bytes: 64 << 20,
            max_value_bytes: 256 << 10,
            max_key_bytes: 64 << 10,
            partition_mismatch: MismatchPolicy::Warn,
            topic_replication_factor: -1,
            grpc_address: "127.0.0.1:50051".into(),
            metrics_address: "127.0.0.1:9464".into(),
            admin_enabled: true,
            admin_token: None,
            cluster_secret: None,
            max_multiget_keys: 1_000,
            max_scan_page: 1_000,
            read_wait_ms: 1_000,
            ingest_niceness: 10,
            cluster_id: "kstore".into(),
            gossip_address: "127.0.0.1:7946".into(),
            advertise_host: String::new(),
            seeds: Vec::new(),
            gossip_interval_ms: 100,
            publish_interval_ms: 250,
            dead_after_ms: 10_000,
            num_standbys: 1,
            standby_retention_ms: 600_000,
            drain_on_shutdown: false,
            drain_timeout_ms: 120_000,
            group_assignor: GroupAssignor::Range,
            verify_checksums_on_open: true,
            verify_interval_ms: 86_400_000,
            store_flush_interval_ms: 30_000,
            copy_retry_initial_ms: 1_000,
            copy_retry_max_ms: 60_000,
            backup: BackupConfig::default(),
            probes: ProbesConfig::default(),
            memory: MemoryConfig::default(),
            limits: LimitsConfig::default(),
            tls: None,
            kafka: BTreeMap::new(),
        }
    }
}

/// A configuration that cannot be loaded or is not valid. Each names the key at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A layer is not valid TOML, or a value has the wrong type or an unknown key.
    #[error("invalid configuration in {layer}: {message}")]
    Parse {
        /// The file, environment variable or flag.
        layer: String,
        /// What is wrong, with the key.
        message: String,
    },
    /// A key holds a value that parses but cannot work.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// The key at fault.
        key: String,
        /// Why.
        reason: String,
    },
}

/// Settings that kstore manages itself because its guarantees depend on them.
const MANAGED_KAFKA_KEYS: &[&str] = &[
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "transactional.id",
    "enable.idempotence",
    "partitioner",
    "partition.assignment.strategy",
    "group.remote.assignor",
    "enable.partition.eof",
];

impl NodeConfig {
    /// Loads the configuration: defaults, then the TOML file (if any), then `KSTORE_…`
    /// variables from `env`, then `key=value` overrides; then validates it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let mut table = toml::Table::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            table = text
                .parse::<toml::Table>()
                .map_err(|error| ConfigError::Parse {
                    layer: path.display().to_string(),
                    message: error.to_string(),
                })?;
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with("KSTORE_"))
            .collect();
        env.sort();
        for (name, value) in env {
            let Some(path) = env_key_path(&name) else {
                continue;
            };
            set_path(&mut table, &path, &value);
        }
        for item in overrides {
            let Some((key, value)) = item.split_once('=') else {
                return Err(ConfigError::Parse {
                    layer: format!("--set {item}"),
                    message: "expected key=value".into(),
                });
            };
            set_path(&mut table, &flag_key_path(key.trim()), value.trim());
        }
        let config: NodeConfig =
            table
                .try_into()
                .map_err(|error: toml::de::Error| ConfigError::Parse {
                    layer: "the merged configuration".into(),
                    message: error.message().to_owned(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the configuration can work, naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason: reason.into(),
            })
        };
        for (key, value) in [
            ("node-id", &self.node_id),
            ("app-id", &self.app_id),
            ("store", &self.store),
            ("cluster-id", &self.cluster_id),
        ] {
            if value.is_empty() {
                return invalid(key, "must be set");
            }
            if !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return invalid(key, "may hold only ASCII letters, digits, '-', '_' and '.'");
            }
        }
        self.validate_inputs()?;
        if self.commit_interval_ms == 0 || self.commit_interval_ms > 60_000 {
            return invalid("commit-interval-ms", "must be between 1 and 60000");
        }
        if self.max_transaction_records == 0 {
            return invalid("max-transaction-records", "must be at least 1");
        }
        if self.max_transaction_bytes < 1 << 20 {
            return invalid("max-transaction-bytes", "must be at least 1 MiB");
        }
        if self.max_value_bytes == 0 || self.max_value_bytes > 64 << 20 {
            return invalid("max-value-bytes", "must be between 1 and 64 MiB");
        }
        if self.max_key_bytes == 0 || self.max_key_bytes > 1 << 20 {
            return invalid("max-key-bytes", "must be between 1 and 1 MiB");
        }
        if self.topic_replication_factor == 0 || self.topic_replication_factor < -1 {
            return invalid(
                "topic-replication-factor",
                "must be -1 (broker default) or at least 1",
            );
        }
        if self.ingest_niceness > 19 {
            return invalid("ingest-niceness", "must be between 0 and 19");
        }
        if self.memory.block_cache_bytes < 1 << 20 {
            return invalid("memory.block-cache-bytes", "must be at least 1 MiB");
        }
        if self.memory.write_buffer_bytes < 1 << 20 {
            return invalid("memory.write-buffer-bytes", "must be at least 1 MiB");
        }
        let grpc: std::net::SocketAddr = match self.grpc_address.parse() {
            Ok(address) => address,
            Err(_) => return invalid("grpc-address", "must be an address such as 127.0.0.1:50051"),
        };
        if !self.metrics_address.is_empty()
            && self
                .metrics_address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return invalid(
                "metrics-address",
                "must be an address such as 127.0.0.1:9464, or empty",
            );
        }
        let gossip: std::net::SocketAddr = match self.gossip_address.parse() {
            Ok(address) => address,
            Err(_) => {
                return invalid(
                    "gossip-address",
                    "must be an address such as 127.0.0.1:7946",
                );
            }
        };
        if !self.advertise_host.is_empty() && !is_host(&self.advertise_host) {
            return invalid(
                "advertise-host",
                "must be an IP address or a DNS name (such as kstore-0.kstore-peers), or empty",
            );
        }
        if self.advertise_host.is_empty() {
            for (key, address) in [("grpc-address", grpc), ("gossip-address", gossip)] {
                if address.ip().is_unspecified() {
                    return invalid(
                        "advertise-host",
                        &format!(
                            "must be set when {key} listens on every interface ({address}): \
                             other nodes need an address to reach this one"
                        ),
                    );
                }
            }
        }
        if let Some(seed) = self.seeds.iter().find(|s| {
            s.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            return invalid("seeds", &format!("{seed:?} is not host:port"));
        }
        if !(10..=10_000).contains(&self.gossip_interval_ms) {
            return invalid("gossip-interval-ms", "must be between 10 and 10000");
        }
        if !(50..=60_000).contains(&self.publish_interval_ms) {
            return invalid("publish-interval-ms", "must be between 50 and 60000");
        }
        if self.dead_after_ms < 1_000 {
            return invalid("dead-after-ms", "must be at least 1000");
        }
        if self.store_flush_interval_ms < 100 {
            return invalid("store-flush-interval-ms", "must be at least 100");
        }
        if self.copy_retry_initial_ms == 0 || self.copy_retry_max_ms < self.copy_retry_initial_ms {
            return invalid(
                "copy-retry-initial-ms",
                "must be at least 1 and at most copy-retry-max-ms",
            );
        }
        if self.verify_interval_ms != 0 && self.verify_interval_ms < 1_000 {
            return invalid("verify-interval-ms", "must be 0 (off) or at least 1000");
        }
        if self.probes.max_lag < 0 {
            return invalid("probes.max-lag", "must be at least 0");
        }
        if self.probes.stall_after_ms < 10_000 {
            return invalid("probes.stall-after-ms", "must be at least 10000");
        }
        if self.backup.keep_count == 0 {
            return invalid("backup.keep-count", "must be at least 1");
        }
        if self.backup.interval_ms != 0 && self.backup.interval_ms < 1_000 {
            return invalid(
                "backup.interval-ms",
                "must be 0 (on demand only) or at least 1000",
            );
        }
        if self.num_standbys > 8 {
            return invalid("num-standbys", "must be at most 8");
        }
        if self.admin_enabled && !grpc.ip().is_loopback() && self.admin_token.is_none() {
            return invalid(
                "admin-token",
                "must be set when admin is enabled and grpc-address is not a loopback address",
            );
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return invalid("admin-token", "must be at least 16 characters");
        }
        let beyond_loopback = !grpc.ip().is_loopback() || !gossip.ip().is_loopback();
        if beyond_loopback && self.cluster_secret.is_none() {
            return invalid(
                "cluster-secret",
                "must be set (at least 32 bytes, the same on every node) when grpc-address or \
                 gossip-address is not a loopback address: it authenticates gossip and the \
                 calls only nodes may make (snapshots of this node's stores, forwarded reads)",
            );
        }
        if self.cluster_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return invalid("cluster-secret", "must be at least 32 bytes");
        }
        if self.max_multiget_keys == 0 || self.max_multiget_keys > 100_000 {
            return invalid("max-multiget-keys", "must be between 1 and 100000");
        }
        if self.max_scan_page == 0 || self.max_scan_page > 100_000 {
            return invalid("max-scan-page", "must be between 1 and 100000");
        }
        if self.read_wait_ms > 60_000 {
            return invalid("read-wait-ms", "must be at most 60000");
        }
        self.limits.validate()?;
        self.validate_processor()?;
        self.validate_stores()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if !self.kafka.contains_key("bootstrap.servers") {
            return invalid("kafka.bootstrap.servers", "must be set");
        }
        if self
            .kafka
            .get("group.protocol")
            .is_some_and(|p| !p.eq_ignore_ascii_case("classic"))
        {
            // Measured against the classic protocol (see DESIGN.md, "Membership and
            // metadata"): under KIP-848 the session timeout is the broker's (at least 45 s by
            // default), and a node restarted after a crash is refused the group
            // (UNRELEASED_INSTANCE_ID) until its old session expires.
            return invalid(
                "kafka.group.protocol",
                "must be classic: under the consumer protocol (KIP-848) the session timeout \
                 is the broker's and a node restarted after a crash is refused the group until \
                 its old session expires",
            );
        }
        if let Some(key) = self
            .kafka
            .keys()
            .find(|k| MANAGED_KAFKA_KEYS.contains(&k.as_str()))
        {
            return invalid(
                &format!("kafka.{key}"),
                "is managed by kstore and cannot be set",
            );
        }
        Ok(())
    }

    /// Checks a module's settings (the module file is loaded when the node starts), and
    /// that no output goes to a topic of kstore's own.
    fn validate_processor(&self) -> Result<(), ConfigError> {
        let ProcessorConfig::Wasm(wasm) = &self.processor else {
            if self.value_type.is_some() {
                return Err(ConfigError::Invalid {
                    key: "value-type".into(),
                    reason: "is for a WebAssembly processor's values; the built-in features \
                             processor's values are kstore.v1.CustomerFeatures"
                        .into(),
                });
            }
            return Ok(());
        };
        if let Some(value_type) = &self.value_type
            && value_type.message.trim().is_empty()
        {
            return Err(ConfigError::Invalid {
                key: "value-type.message".into(),
                reason: "must name a message, such as acme.v1.Counter".into(),
            });
        }
        wasm.validate().map_err(|error| ConfigError::Invalid {
            key: format!("processor.{}", error.key),
            reason: error.reason,
        })?;
        let mut own = self.inputs().to_vec();
        own.extend([self.changelog_topic(), self.dlq_topic()]);
        if let Some((name, topic)) = wasm.outputs.iter().find(|(_, topic)| own.contains(topic)) {
            return Err(ConfigError::Invalid {
                key: format!("processor.outputs.{name}"),
                reason: format!("{topic} is the input, changelog or dead-letter topic"),
            });
        }
        Ok(())
    }

    /// Returns the store's input topics: `input-topics`, or `input-topic` alone.
    pub fn inputs(&self) -> &[String] {
        if self.input_topics.is_empty() {
            std::slice::from_ref(&self.input_topic)
        } else {
            &self.input_topics
        }
    }

    /// Checks the store's input topics: one way of naming them, each a Kafka topic name
    /// once, and an assignor that keeps their partitions together.
    fn validate_inputs(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                reason,
            })
        };
        if !self.input_topic.is_empty() && !self.input_topics.is_empty() {
            return invalid(
                "input-topics",
                "set input-topic or input-topics, not both".into(),
            );
        }
        let key = if self.input_topics.is_empty() {
            "input-topic"
        } else {
            "input-topics"
        };
        let mut seen = std::collections::BTreeSet::new();
        for topic in self.inputs() {
            if topic.trim().is_empty() {
                return invalid(key, "must be set".into());
            }
            if topic.len() > 249
                || !topic
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return invalid(
                    key,
                    format!(
                        "{topic:?} is not a Kafka topic name (at most 249 ASCII letters, \
                         digits, '-', '_' and '.')"
                    ),
                );
            }
            if !seen.insert(topic) {
                return invalid(key, format!("{topic} is listed twice"));
            }
        }
        if self.inputs().len() > 1 && self.group_assignor == GroupAssignor::CooperativeSticky {
            return invalid(
                "group-assignor",
                format!(
                    "store {} reads {} topics ({}): cooperative-sticky may give one topic's \
                     partition to one node and another's to another; use range",
                    self.store,
                    self.inputs().len(),
                    self.inputs().join(", ")
                ),
            );
        }
        Ok(())
    }

    /// Returns the consumer group id: the app id, or a further store's `group-id`.
    pub fn group_id(&self) -> &str {
        match &self.store_topics {
            Some(topics) => &topics.group_id,
            None => &self.app_id,
        }
    }

    /// Returns the changelog topic of the store: `<app>-<store>-changelog`, or a further
    /// store's `changelog-topic`.
    pub fn changelog_topic(&self) -> String {
        match &self.store_topics {
            Some(topics) => topics.changelog_topic.clone(),
            None => format!("{}-{}-changelog", self.app_id, self.store),
        }
    }

    /// Returns the dead-letter topic: `<app>-dlq`, or a further store's
    /// `dead-letter-topic`.
    pub fn dlq_topic(&self) -> String {
        match &self.store_topics {
            Some(topics) => topics.dead_letter_topic.clone(),
            None => format!("{}-dlq", self.app_id),
        }
    }

    /// Returns the key under which this store's copies are gossiped (see
    /// `kstore_core::cluster::keys::scoped`): `""` for the node's first store, the store's
    /// name for a further one.
    pub fn gossip_scope(&self) -> &str {
        match &self.store_topics {
            Some(_) => &self.store,
            None => "",
        }
    }

    /// Returns one configuration per store the node serves: the first store (the
    /// top-level keys), then each of `[[stores]]` with its own name, input, processor,
    /// value type, topics and group; everything else is the node's.
    pub fn store_configs(&self) -> Vec<NodeConfig> {
        let first = NodeConfig {
            stores: Vec::new(),
            ..self.clone()
        };
        let further = self.stores.iter().map(|store| NodeConfig {
            store: store.name.clone(),
            input_topic: store.input_topic.clone(),
            input_topics: store.input_topics.clone(),
            processor: store.processor.clone(),
            value_type: store.value_type.clone(),
            store_topics: Some(StoreTopics {
                changelog_topic: store.changelog_topic.clone(),
                dead_letter_topic: store.dead_letter_topic.clone(),
                group_id: store.group_id.clone(),
            }),
            ..first.clone()
        });
        std::iter::once(first.clone()).chain(further).collect()
    }

    /// Checks the further stores: each fully named, no name, topic or group used twice,
    /// no store's own topic another's input, and each store's processor settings.
    fn validate_stores(&self) -> Result<(), ConfigError> {
        let configs = self.store_configs();
        let mut names = std::collections::BTreeSet::new();
        let mut groups = std::collections::BTreeSet::new();
        let mut written = BTreeMap::new();
        for (i, config) in configs.iter().enumerate() {
            let key = |field: &str| match i {
                0 => field.to_owned(),
                _ => format!("stores[{}].{field}", i - 1),
            };
            let invalid = |field: &str, reason: String| {
                Err(ConfigError::Invalid {
                    key: key(field),
                    reason,
                })
            };
            if i > 0 {
                for (field, value) in [
                    ("name", &config.store),
                    ("changelog-topic", &config.changelog_topic()),
                    ("dead-letter-topic", &config.dlq_topic()),
                    ("group-id", &config.group_id().to_owned()),
                ] {
                    if value.trim().is_empty() {
                        return invalid(field, "must be set".into());
                    }
                }
                if !config
                    .store
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    return invalid(
                        "name",
                        "may hold only ASCII letters, digits, '-', '_' and '.'".into(),
                    );
                }
                config
                    .validate_inputs()
                    .and_then(|()| config.validate_processor())
                    .map_err(|error| match error {
                        ConfigError::Invalid { key: field, reason } => ConfigError::Invalid {
                            key: key(&field),
                            reason,
                        },
                        other => other,
                    })?;
            }
            if config.inputs().contains(&config.dlq_topic()) {
                return invalid(
                    "dead-letter-topic",
                    format!(
                        "{} is the store's input: its dead letters would be read again",
                        config.dlq_topic()
                    ),
                );
            }
            if !names.insert(config.store.clone()) {
                return invalid(
                    "name",
                    format!("store {:?} is declared twice", config.store),
                );
            }
            if !groups.insert(config.group_id().to_owned()) {
                return invalid(
                    "group-id",
                    format!("group {:?} is another store's too", config.group_id()),
                );
            }
            for (field, topic) in [
                ("changelog-topic", config.changelog_topic()),
                ("dead-letter-topic", config.dlq_topic()),
            ] {
                // Stores may share a dead-letter topic; a changelog is one store's alone.
                let shared = field == "dead-letter-topic"
                    && written.get(&topic).is_some_and(|(f, _)| *f == field);
                if let Some((_, owner)) = written.get(&topic)
                    && !shared
                {
                    return invalid(
                        field,
                        format!("{topic} is written by store {owner} already"),
                    );
                }
                written.insert(topic, (field, config.store.clone()));
            }
        }
        // A store may read another's dead letters, never its changelog.
        for config in &configs {
            for input in config.inputs() {
                if let Some((field, owner)) = written.get(input)
                    && *field == "changelog-topic"
                {
                    let key = if config.input_topics.is_empty() {
                        "input-topic"
                    } else {
                        "input-topics"
                    };
                    return Err(ConfigError::Invalid {
                        key: if config.store == self.store {
                            key.into()
                        } else {
                            format!("stores.{}.{key}", config.store)
                        },
                        reason: format!(
                            "{input} is the {field} of store {owner}: a store cannot read \
                             what a store writes"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Returns the built-in processor's alert topic: `<app>-alerts`.
    pub fn alerts_topic(&self) -> String {
        format!("{}-alerts", self.app_id)
    }

    /// Returns the address (`host:port`) other nodes and clients use for a port this node
    /// bound: `advertise-host` (an IP address or a DNS name) with the bound port, or the
    /// bound address itself.
    pub fn advertised(&self, bound: std::net::SocketAddr) -> String {
        match self.advertise_host.parse::<std::net::IpAddr>() {
            Ok(host) => std::net::SocketAddr::new(host, bound.port()).to_string(),
            Err(_) if !self.advertise_host.is_empty() => {
                format!("{}:{}", self.advertise_host, bound.port())
            }
            Err(_) => bound.to_string(),
        }
    }

    /// Returns the directory of one partition's store.
    pub fn store_dir(&self, partition: i32) -> PathBuf {
        self.state_dir
            .join(&self.app_id)
            .join(&self.store)
            .join(partition.to_string())
    }
}

/// Whether `text` is an IP address or a DNS name (letters, digits, `-` and `.`, labels of
/// 1 to 63 characters that neither start nor end with `-`).
fn is_host(text: &str) -> bool {
    text.parse::<std::net::IpAddr>().is_ok()
        || (text.len() <= 253
            && text.trim_end_matches('.').split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

/// Maps `KSTORE_MEMORY__BLOCK_CACHE_BYTES` to `["memory", "block-cache-bytes"]` and
/// `KSTORE_KAFKA__BOOTSTRAP_SERVERS` to `["kafka", "bootstrap.servers"]`.
fn env_key_path(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix("KSTORE_")?.to_ascii_lowercase();
    // Variables that are not configuration (the log filter, the test broker, where xtask
    // built the binaries a benchmark starts) are skipped.
    let tools = ["log", "kafka_bootstrap", "kafka_port", "bin_dir"];
    if rest.is_empty() || tools.contains(&rest.as_str()) {
        return None;
    }
    let mut parts = rest.split("__");
    let first = parts.next()?.to_owned();
    if first == "kafka" {
        let key = parts.collect::<Vec<_>>().join("__").replace('_', ".");
        return (!key.is_empty()).then(|| vec![first, key]);
    }
    let mut path = vec![first.replace('_', "-")];
    path.extend(parts.map(|p| p.replace('_', "-")));
    Some(path)
}

/// Maps `memory.block-cache-bytes` to its path and `kafka.bootstrap.servers` to
/// `["kafka", "bootstrap.servers"]`.
fn flag_key_path(key: &str) -> Vec<String> {
    match key.strip_prefix("kafka.") {
        Some(kafka_key) => vec!["kafka".into(), kafka_key.into()],
        None => key.split('.').map(str::to_owned).collect(),
    }
}

/// Sets a value given as text: as a TOML integer, float or boolean if it is one (outside
/// `kafka`, whose values are all strings), else as a string.
fn set_path(table: &mut toml::Table, path: &[String], text: &str) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            unreachable!("made a table above")
        };
        current = next;
    }
    let in_kafka = path.first().is_some_and(|p| p == "kafka");
    let value = if path == ["seeds"] {
        toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        )
    } else if in_kafka {
        toml::Value::String(text.to_owned())
    } else if let Ok(v) = text.parse::<i64>() {
        toml::Value::Integer(v)
    } else if let Ok(v) = text.parse::<bool>() {
        toml::Value::Boolean(v)
    } else {
        toml::Value::String(text.to_owned())
    };
    current.insert(last.clone(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], overrides: &[&str]) -> Result<NodeConfig, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        NodeConfig::load(None, env, &overrides)
    }

    const MINIMAL: &[&str] = &[
        "node-id=n1",
        "input-topic=orders",
        "kafka.bootstrap.servers=127.0.0.1:9092",
    ];

    #[test]
    fn template_in_deploy_parses_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("kstore-node.toml");
        std::fs::write(&template, include_str!("../../../deploy/kstore-node.toml")).unwrap();
        let config = NodeConfig::load(Some(&template), [], &[]).unwrap();
        assert_eq!(
            config.processing_guarantee,
            ProcessingGuarantee::ExactlyOnce
        );
        assert_eq!(
            config.kafka.get("bootstrap.servers").map(String::as_str),
            Some("127.0.0.1:39092")
        );
        // Every default is written in the template, so it documents them all.
        let defaults = NodeConfig {
            node_id: config.node_id.clone(),
            input_topic: config.input_topic.clone(),
            state_dir: config.state_dir.clone(),
            kafka: config.kafka.clone(),
            ..NodeConfig::default()
        };
        assert_eq!(config, defaults);
    }

    /// Loads MINIMAL plus `text` (TOML) as the config file.
    fn load_file(text: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, text).unwrap();
        let overrides: Vec<String> = MINIMAL.iter().map(|s| s.to_string()).collect();
        NodeConfig::load(Some(&file), [], &overrides)
    }

    const TALLY_STORE: &str = r#"
        [[stores]]
        name = "tally"
        input-topic = "words"
        processor = { wasm = "tally.wasm" }
        changelog-topic = "tally-changelog"
        dead-letter-topic = "tally-dlq"
        group-id = "tally-group"
    "#;

    #[test]
    fn further_stores_get_their_own_input_processor_topics_and_group() {
        let config = load_file(TALLY_STORE).unwrap();
        let stores = config.store_configs();
        assert_eq!(stores.len(), 2);
        let (first, tally) = (&stores[0], &stores[1]);
        // The first store is what the top-level keys say, as a node of one store has it.
        assert_eq!(first.store, "features");
        assert_eq!(first.input_topic, "orders");
        assert_eq!(first.changelog_topic(), "kstore-features-changelog");
        assert_eq!(first.dlq_topic(), "kstore-dlq");
        assert_eq!(first.group_id(), "kstore");
        assert_eq!(first.gossip_scope(), "");
        assert!(first.stores.is_empty());
        // A further store has exactly the names it was given.
        assert_eq!(tally.store, "tally");
        assert_eq!(tally.inputs(), ["words"]);
        let several = load_file(&TALLY_STORE.replace(
            "input-topic = \"words\"",
            "input-topics = [\"words\", \"more-words\"]",
        ))
        .unwrap();
        assert_eq!(several.store_configs()[1].inputs(), ["words", "more-words"]);
        assert!(
            matches!(&tally.processor, ProcessorConfig::Wasm(w) if w.wasm == Path::new("tally.wasm"))
        );
        assert_eq!(tally.changelog_topic(), "tally-changelog");
        assert_eq!(tally.dlq_topic(), "tally-dlq");
        assert_eq!(tally.group_id(), "tally-group");
        assert_eq!(tally.gossip_scope(), "tally");
        assert_eq!(tally.store_dir(2), Path::new("kstore-state/kstore/tally/2"));
        // Everything else is the node's.
        assert_eq!(tally.node_id, "n1");
        assert_eq!(tally.grpc_address, first.grpc_address);
    }

    #[test]
    fn further_stores_that_cannot_work_are_refused_naming_the_key() {
        let refused = |text: &str| match load_file(text) {
            Err(ConfigError::Invalid { key, reason }) => format!("{key}: {reason}"),
            other => panic!("accepted or failed otherwise: {other:?}"),
        };
        let without = |key: &str| {
            TALLY_STORE
                .lines()
                .filter(|line| !line.trim_start().starts_with(&format!("{key} =")))
                .collect::<Vec<_>>()
                .join("\n")
        };
        // Topics and group are never derived: a renamed store must not leave its state.
        for key in ["changelog-topic", "dead-letter-topic", "group-id"] {
            match load_file(&without(key)) {
                Err(ConfigError::Parse { message, .. }) => {
                    assert!(message.contains(key), "{key}: {message}")
                }
                other => panic!("{key} missing was accepted: {other:?}"),
            }
        }
        assert_eq!(
            refused(&TALLY_STORE.replace("\"tally\"", "\"features\"")),
            "stores[0].name: store \"features\" is declared twice"
        );
        assert_eq!(
            refused(&TALLY_STORE.replace("\"tally-changelog\"", "\"kstore-features-changelog\"")),
            "stores[0].changelog-topic: kstore-features-changelog is written by store features already"
        );
        assert_eq!(
            refused(&TALLY_STORE.replace("\"tally-group\"", "\"kstore\"")),
            "stores[0].group-id: group \"kstore\" is another store's too"
        );
        assert_eq!(
            refused(&TALLY_STORE.replace("\"words\"", "\"kstore-features-changelog\"")),
            "stores.tally.input-topic: kstore-features-changelog is the changelog-topic of \
             store features: a store cannot read what a store writes"
        );
        assert_eq!(
            refused(&TALLY_STORE.replace("\"tally\"", "\"tally/x\"")),
            "stores[0].name: may hold only ASCII letters, digits, '-', '_' and '.'"
        );
        assert_eq!(
            refused(&TALLY_STORE.replace("\"words\"", "\"\"")),
            "stores[0].input-topic: must be set"
        );
        let several = |list: &str| {
            TALLY_STORE.replace(
                "input-topic = \"words\"",
                &format!("input-topics = [{list}]"),
            )
        };
        assert_eq!(
            refused(&several(r#""words", "words""#)),
            "stores[0].input-topics: words is listed twice"
        );
        assert_eq!(
            refused(&several(r#""words", "more=words""#)),
            "stores[0].input-topics: \"more=words\" is not a Kafka topic name (at most 249 \
             ASCII letters, digits, '-', '_' and '.')"
        );
        assert_eq!(
            refused(&several(r#""words", "tally-dlq""#)),
            "stores[0].dead-letter-topic: tally-dlq is the store's input: its dead letters \
             would be read again"
        );
        assert_eq!(
            refused(&TALLY_STORE.replace(
                "input-topic = \"words\"",
                "input-topic = \"words\"\ninput-topics = [\"words\"]"
            )),
            "stores[0].input-topics: set input-topic or input-topics, not both"
        );
        assert_eq!(
            refused(&format!(
                "group-assignor = \"cooperative-sticky\"\n{}",
                several(r#""words", "more-words""#)
            )),
            "stores[0].group-assignor: store tally reads 2 topics (words, more-words): \
             cooperative-sticky may give one topic's partition to one node and another's to \
             another; use range"
        );
        let features_typed = TALLY_STORE.replace(
            "processor = { wasm = \"tally.wasm\" }",
            "processor = \"features\"\n        value-type = { descriptor-set = \"t.binpb\", message = \"a.T\" }",
        );
        assert!(
            refused(&features_typed).starts_with("stores[0].value-type: is for a WebAssembly"),
            "{}",
            refused(&features_typed)
        );
        assert_eq!(
            refused(&TALLY_STORE.replace("\"tally-dlq\"", "\"words\"")),
            "stores[0].dead-letter-topic: words is the store's input: its dead letters would \
             be read again"
        );
        // Stores may share a dead-letter topic.
        let shared = TALLY_STORE.replace("\"tally-dlq\"", "\"kstore-dlq\"");
        assert_eq!(
            load_file(&shared).unwrap().store_configs()[1].dlq_topic(),
            "kstore-dlq"
        );
    }

    #[test]
    fn flags_override_environment_which_overrides_defaults() {
        let config = load(
            &[
                ("KSTORE_COMMIT_INTERVAL_MS", "250"),
                ("KSTORE_APP_ID", "fraud"),
                ("PATH", "/bin"),
            ],
            &[MINIMAL, &["app-id=checkout"]].concat(),
        )
        .unwrap();
        assert_eq!(config.commit_interval_ms, 250);
        assert_eq!(config.app_id, "checkout");
        assert_eq!(config.changelog_topic(), "checkout-features-changelog");
    }

    #[test]
    fn environment_reaches_nested_and_kafka_keys() {
        let config = load(
            &[
                ("KSTORE_MEMORY__BLOCK_CACHE_BYTES", "8388608"),
                ("KSTORE_KAFKA__SESSION_TIMEOUT_MS", "6000"),
                ("KSTORE_KAFKA__SASL_PASSWORD", "from-a-secret"),
                ("KSTORE_PROCESSING_GUARANTEE", "at-least-once"),
                ("KSTORE_KAFKA_BOOTSTRAP", "ignored:1"),
                ("KSTORE_BIN_DIR", "/ignored/target/debug"),
            ],
            MINIMAL,
        )
        .unwrap();
        assert_eq!(config.memory.block_cache_bytes, 8 << 20);
        assert_eq!(
            config.kafka.get("session.timeout.ms").map(String::as_str),
            Some("6000")
        );
        // The way docs/OPERATIONS.md tells to give the SASL password.
        assert_eq!(
            config.kafka.get("sasl.password").map(String::as_str),
            Some("from-a-secret")
        );
        assert_eq!(
            config.processing_guarantee,
            ProcessingGuarantee::AtLeastOnce
        );
    }

    #[test]
    fn admin_beyond_loopback_needs_a_token() {
        let public = [
            MINIMAL,
            &[
                "grpc-address=0.0.0.0:50051",
                "advertise-host=10.0.0.1",
                "cluster-secret=0123456789abcdef0123456789abcdef",
            ],
        ]
        .concat();
        let error = load(&[], &public).unwrap_err().to_string();
        assert!(error.contains("admin-token"), "{error}");
        let with_token = [public.as_slice(), &["admin-token=0123456789abcdef"]].concat();
        assert!(load(&[], &with_token).is_ok());
        let admin_off = [public.as_slice(), &["admin-enabled=false"]].concat();
        assert!(load(&[], &admin_off).is_ok());
    }

    #[test]
    fn beyond_loopback_the_nodes_must_share_a_secret() {
        let public_gossip = [
            MINIMAL,
            &["gossip-address=10.0.0.1:7946", "admin-enabled=false"],
        ]
        .concat();
        let error = load(&[], &public_gossip).unwrap_err().to_string();
        assert!(
            error.contains("cluster-secret") && error.contains("at least 32 bytes"),
            "{error}"
        );
        let short = [public_gossip.as_slice(), &["cluster-secret=too-short"]].concat();
        let error = load(&[], &short).unwrap_err().to_string();
        assert!(error.contains("cluster-secret"), "{error}");
        let secret = ("KSTORE_CLUSTER_SECRET", "0123456789abcdef0123456789abcdef");
        assert!(load(&[secret], &public_gossip).is_ok());
        // On loopback a cluster may run without one (development).
        assert!(load(&[], MINIMAL).is_ok());
    }

    #[test]
    fn tls_needs_a_certificate_key_and_ca_and_unknown_keys_are_named() {
        let half = [MINIMAL, &["tls.cert=/etc/kstore-tls/tls.crt"]].concat();
        let error = load(&[], &half).unwrap_err().to_string();
        assert!(
            error.contains("tls.key") && error.contains("must be set"),
            "{error}"
        );
        let whole = [
            MINIMAL,
            &[
                "tls.cert=/etc/kstore-tls/tls.crt",
                "tls.key=/etc/kstore-tls/tls.key",
                "tls.ca=/etc/kstore-tls/ca.crt",
            ],
        ]
        .concat();
        let config = load(&[], &whole).unwrap();
        let tls = config.tls.unwrap();
        assert!(!tls.mutual());
        assert_eq!(tls.reload_interval_ms, 5_000);
        let mutual = [whole.as_slice(), &["tls.client-ca=/etc/kstore-tls/ca.crt"]].concat();
        assert!(load(&[], &mutual).unwrap().tls.unwrap().mutual());
        let typo = [whole.as_slice(), &["tls.client-cert=/x"]].concat();
        let error = load(&[], &typo).unwrap_err().to_string();
        assert!(error.contains("client-cert"), "{error}");
        let fast = [whole.as_slice(), &["tls.reload-interval-ms=1"]].concat();
        let error = load(&[], &fast).unwrap_err().to_string();
        assert!(error.contains("tls.reload-interval-ms"), "{error}");
        // Without [tls] gRPC is plaintext.
        assert!(load(&[], MINIMAL).unwrap().tls.is_none());
    }

    #[test]
    fn seeds_come_comma_separated_from_flags_and_the_environment() {
        let config = load(&[("KSTORE_SEEDS", "10.0.0.1:7946, 10.0.0.2:7946")], MINIMAL).unwrap();
        assert_eq!(config.seeds, ["10.0.0.1:7946", "10.0.0.2:7946"]);
        let config = load(&[], &[MINIMAL, &["seeds=kstore-0.kstore:7946"]].concat()).unwrap();
        assert_eq!(config.seeds, ["kstore-0.kstore:7946"]);
        let config = load(&[], &[MINIMAL, &["seeds="]].concat()).unwrap();
        assert!(config.seeds.is_empty());
        let error = load(&[], &[MINIMAL, &["seeds=10.0.0.1"]].concat()).unwrap_err();
        assert!(error.to_string().contains("seeds"), "{error}");
    }

    #[test]
    fn listening_on_every_interface_needs_an_advertised_host() {
        let everywhere = [
            MINIMAL,
            &[
                "gossip-address=0.0.0.0:7946",
                "cluster-secret=0123456789abcdef0123456789abcdef",
            ],
        ]
        .concat();
        let error = load(&[], &everywhere).unwrap_err().to_string();
        assert!(
            error.contains("advertise-host") && error.contains("gossip-address"),
            "{error}"
        );
        let advertised = [everywhere.as_slice(), &["advertise-host=10.1.2.3"]].concat();
        let config = load(&[], &advertised).unwrap();
        assert_eq!(
            config.advertised("0.0.0.0:7000".parse().unwrap()),
            "10.1.2.3:7000"
        );
        // A pod's DNS name, as a StatefulSet gives it.
        let named = [
            everywhere.as_slice(),
            &["advertise-host=kstore-0.kstore-peers.default.svc.cluster.local"],
        ]
        .concat();
        let config = load(&[], &named).unwrap();
        assert_eq!(
            config.advertised("0.0.0.0:50051".parse().unwrap()),
            "kstore-0.kstore-peers.default.svc.cluster.local:50051"
        );
        let bad = [MINIMAL, &["advertise-host=node_1/example"]].concat();
        assert!(
            load(&[], &bad)
                .unwrap_err()
                .to_string()
                .contains("advertise-host")
        );
    }

    #[test]
    fn a_processor_is_a_built_in_name_or_a_module_table() {
        let config = load(&[], MINIMAL).unwrap();
        assert_eq!(
            config.processor,
            ProcessorConfig::Builtin(ProcessorKind::Features)
        );
        let config = load(
            &[],
            &[
                MINIMAL,
                &[
                    "processor.wasm=/m/features.wasm",
                    "processor.outputs.alerts=fraud-alerts",
                    "processor.fuel-per-record=5000",
                ],
            ]
            .concat(),
        )
        .unwrap();
        let ProcessorConfig::Wasm(wasm) = &config.processor else {
            panic!("{:?}", config.processor);
        };
        assert_eq!(wasm.wasm, PathBuf::from("/m/features.wasm"));
        assert_eq!(wasm.outputs["alerts"], "fraud-alerts");
        assert_eq!(wasm.fuel_per_record, 5000);
        assert_eq!(wasm.max_memory_bytes, 64 << 20);

        let message = |overrides: &[&str]| {
            load(&[], &[MINIMAL, overrides].concat())
                .unwrap_err()
                .to_string()
        };
        assert!(message(&["processor=scoring"]).contains("scoring"));
        assert!(message(&["processor.wasm=m.wasm", "processor.fuel=1"]).contains("fuel"));
        assert!(
            message(&["processor.wasm=m.wasm", "processor.fuel-per-record=10"])
                .contains("processor.fuel-per-record")
        );
        assert!(message(&["processor.outputs.alerts=x"]).contains("processor.wasm"));
        assert!(
            message(&["processor.wasm=m.wasm", "processor.outputs.alerts=orders"])
                .contains("processor.outputs.alerts")
        );
        // A value type is for a module's values, and names a message.
        let typed = [
            "value-type.descriptor-set=t.binpb",
            "value-type.message=acme.v1.Tally",
        ];
        assert!(message(&typed).contains("built-in features processor"));
        assert!(
            message(&[
                "processor.wasm=m.wasm",
                "value-type.descriptor-set=t.binpb",
                "value-type.message= "
            ])
            .contains("value-type.message")
        );
        assert!(
            message(&["processor.wasm=m.wasm", "value-type.message=a.B"])
                .contains("descriptor-set")
        );
    }

    #[test]
    fn errors_name_the_bad_key() {
        let message = |result: Result<NodeConfig, ConfigError>| result.unwrap_err().to_string();
        assert!(
            message(load(&[], &[MINIMAL, &["no-such-key=1"]].concat())).contains("no-such-key")
        );
        assert!(message(load(&[], &["input-topic=orders"])).contains("node-id"));
        assert!(
            message(load(&[], &[MINIMAL, &["commit-interval-ms=0"]].concat()))
                .contains("commit-interval-ms")
        );
        assert!(
            message(load(
                &[],
                &[MINIMAL, &["kafka.enable.auto.commit=true"]].concat()
            ))
            .contains("kafka.enable.auto.commit")
        );
        assert!(
            message(load(
                &[],
                &[MINIMAL, &["processing-guarantee=maybe"]].concat()
            ))
            .contains("maybe")
        );
        assert!(
            message(load(&[], &[MINIMAL, &["ingest-niceness=20"]].concat()))
                .contains("ingest-niceness")
        );
        assert!(message(load(&[], &["oops"])).contains("key=value"));
        assert!(
            message(load(
                &[],
                &[MINIMAL, &["kafka.group.protocol=consumer"]].concat()
            ))
            .contains("kafka.group.protocol")
        );
        assert!(
            message(load(&[], &[MINIMAL, &["group-assignor=sticky"]].concat())).contains("sticky")
        );
        for (setting, key) in [
            ("cluster-id=a b", "cluster-id"),
            ("gossip-address=nowhere", "gossip-address"),
            ("gossip-interval-ms=0", "gossip-interval-ms"),
            ("publish-interval-ms=10", "publish-interval-ms"),
            ("dead-after-ms=10", "dead-after-ms"),
            ("num-standbys=9", "num-standbys"),
            ("probes.max-lag=-1", "probes.max-lag"),
            ("probes.stall-after-ms=5", "probes.stall-after-ms"),
            (
                "limits.max-concurrent-reads=0",
                "limits.max-concurrent-reads",
            ),
            ("limits.request-timeout-ms=5", "limits.request-timeout-ms"),
            (
                "limits.snapshot-idle-timeout-ms=0",
                "limits.snapshot-idle-timeout-ms",
            ),
            ("limits.no-such-limit=1", "no-such-limit"),
        ] {
            let error = message(load(&[], &[MINIMAL, &[setting]].concat()));
            assert!(error.contains(key), "{setting}: {error}");
        }
    }
}
