//! The processor API: how a node turns one input record and the key's current value into a
//! new value and output records.
//!
//! A processor sees the records of a key in partition order and must be a pure function of
//! them: the node replays nothing through it (restores come from the changelog), but
//! exactly-once only means "exact" if the fold itself is deterministic.

pub mod features;
pub mod typed;
pub mod versions;
pub mod wasm;

/// One record from the input topic, as the processor sees it.
///
/// Build one with `..InputRecord::default()` for the fields you do not set, so that a field
/// added later does not break your code.
#[derive(Debug, Clone, Copy, Default)]
pub struct InputRecord<'a> {
    /// The input topic.
    pub topic: &'a str,
    /// The partition the record arrived on.
    pub partition: i32,
    /// The record's offset in that partition.
    pub offset: i64,
    /// The record key; never empty (records without a key go to the dead-letter topic).
    pub key: &'a [u8],
    /// The record value, if any.
    pub value: Option<&'a [u8]>,
    /// The record's Kafka timestamp, in milliseconds since the Unix epoch, if it has one.
    pub timestamp_ms: Option<i64>,
    /// The record's headers, in order (a name may repeat).
    pub headers: &'a [RecordHeader<'a>],
}

/// One header of an input record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader<'a> {
    /// The header's name.
    pub key: &'a str,
    /// Its value, if any.
    pub value: Option<&'a [u8]>,
}

/// What happens to the key's stored value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The value stays as it is.
    Unchanged,
    /// The value becomes these bytes.
    Put(Vec<u8>),
    /// The key is deleted.
    Delete,
}

/// A record for an output topic, written in the same transaction as the state change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    /// The topic to write to.
    pub topic: String,
    /// The record key; the node partitions it with Kafka's partitioner.
    pub key: Vec<u8>,
    /// The record value.
    pub value: Vec<u8>,
}

/// The result of processing one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The change to the key's value.
    pub update: Update,
    /// Records to write to output topics.
    pub outputs: Vec<OutputRecord>,
}

/// Why a record could not be processed.
///
/// `Malformed` and `Failed` are the record's fault: it goes to the dead-letter topic and the
/// partition keeps flowing. `Unavailable` is not: the processor cannot process any record
/// right now (a resource it needs is gone, its code failed to load), so the record is not
/// dead-lettered; the partition's copy moves to `failed`, its input waits, and the record
/// is processed again when the copy is retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The record cannot be decoded or does not make sense.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The processor failed on a well-formed record.
    #[error("processing failed: {0}")]
    Failed(String),
    /// The processor cannot process records at all right now, whatever the record.
    #[error("the processor is unavailable: {0}")]
    Unavailable(String),
}

/// A user's fold from input records to per-key state.
///
/// ```
/// use kstore_server::processor::{InputRecord, Outcome, ProcessError, Processor, Update};
///
/// /// Counts records per key, as a little-endian u64.
/// struct Counter;
///
/// impl Processor for Counter {
///     fn process(&mut self, _record: &InputRecord<'_>, current: Option<&[u8]>)
///         -> Result<Outcome, ProcessError>
///     {
///         let count = match current {
///             Some(bytes) => u64::from_le_bytes(bytes.try_into()
///                 .map_err(|_| ProcessError::Failed("bad stored count".into()))?),
///             None => 0,
///         };
///         Ok(Outcome { update: Update::Put((count + 1).to_le_bytes().to_vec()), outputs: vec![] })
///     }
/// }
/// ```
pub trait Processor: Send + 'static {
    /// Returns the key's new value and any output records, given the key's current value.
    fn process(
        &mut self,
        record: &InputRecord<'_>,
        current: Option<&[u8]>,
    ) -> Result<Outcome, ProcessError>;

    /// Processes several records, each with its key's current value; no two have the same
    /// key. Returns one result per record, in order, each what [`Processor::process`] would
    /// return for it. Ingest hands the processor runs of records this way, so that a
    /// processor with a fixed cost per call (a WebAssembly module) spreads it; the default
    /// calls `process` for each.
    fn process_batch(
        &mut self,
        batch: &[(InputRecord<'_>, Option<&[u8]>)],
    ) -> Vec<Result<Outcome, ProcessError>> {
        batch
            .iter()
            .map(|(record, current)| self.process(record, *current))
            .collect()
    }

    /// Returns the `google.protobuf.Any` type URL of the values this processor stores, if
    /// they are protobuf messages that the node's gRPC reflection knows. Reads then return
    /// them typed, so that grpcurl prints them as JSON; otherwise they return raw bytes.
    fn value_type_url(&self) -> Option<&str> {
        None
    }

    /// Returns the version of the fold's code, if it is one that can change while the store
    /// lives (a WebAssembly module's SHA-256): ingest records in each partition's changelog
    /// from which input offset each version folded, and refuses to fold with an earlier one
    /// (see [`versions`]). Built-in processors have none.
    fn version(&self) -> Option<&str> {
        None
    }

    /// Returns the encoded `FileDescriptorSet` that defines the value type, if the node's
    /// reflection does not know it already (a type from the config's `value-type`).
    fn value_descriptor_set(&self) -> Option<&[u8]> {
        None
    }
}
