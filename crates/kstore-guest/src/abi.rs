//! The bytes that cross the boundary between a node and a module (guest ABI version
//! [`ABI_VERSION`]): a batch of records in, one result per record out. The node encodes
//! batches and decodes results; a module does the reverse. Both sides use this code, so the
//! format has one definition.
//!
//! Every number is little-endian. `bytes` is a `u32` length then that many bytes; `opt` is
//! a `u32` length or `0xFFFF_FFFF` for "absent" (then no bytes); `str` is `bytes` holding
//! UTF-8.
//!
//! ```text
//! batch   = u32 count, record × count
//! record  = str topic, u32 partition, i64 offset,
//!           u8 has_timestamp (0 | 1), i64 timestamp_ms (0 when absent),
//!           bytes key, opt value, opt current,
//!           u32 header_count, (str header_key, opt header_value) × header_count
//! results = u32 count (the batch's count), result × count
//! result  = u8 0, update, u32 output_count, (str name, bytes key, bytes value) × output_count
//!         | u8 1, str reason      (malformed: the record cannot be decoded)
//!         | u8 2, str reason      (failed: the fold failed on a well-formed record)
//! update  = u8 0 (unchanged) | u8 1, bytes value (put) | u8 2 (delete)
//! ```
//!
//! Decoding never panics and never allocates more than its input's length suggests: a
//! length or count that runs past the end is an [`AbiError`].

use std::fmt;

/// The ABI version this crate speaks; a module's `kstore_abi_version` export returns it.
pub const ABI_VERSION: i32 = 1;

/// The export that returns the module's ABI version.
pub const EXPORT_ABI_VERSION: &str = "kstore_abi_version";
/// The export that returns where the node writes a batch.
pub const EXPORT_INPUT: &str = "kstore_input";
/// The export that folds a batch.
pub const EXPORT_FOLD: &str = "kstore_fold";
/// The optional export that returns the last panic's message.
pub const EXPORT_PANIC_MESSAGE: &str = "kstore_panic_message";

const ABSENT: u32 = u32::MAX;

/// One input record, as a fold sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record<'a> {
    /// The input topic.
    pub topic: &'a str,
    /// The partition the record arrived on.
    pub partition: u32,
    /// The record's offset in that partition.
    pub offset: i64,
    /// The record's Kafka timestamp in milliseconds since the Unix epoch, if it has one.
    pub timestamp_ms: Option<i64>,
    /// The record key; never empty.
    pub key: &'a [u8],
    /// The record value, if any.
    pub value: Option<&'a [u8]>,
    /// The record's headers, in order (a key may repeat).
    pub headers: Vec<Header<'a>>,
}

impl<'a> Record<'a> {
    /// Returns the value of the last header named `key`, if there is one with a value.
    pub fn header(&self, key: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.key == key)
            .and_then(|h| h.value)
    }
}

/// One record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
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

/// A record for one of the module's outputs, written in the same transaction as the state
/// change. The node's configuration maps each output name to a topic; a record for a name it
/// does not map is refused (the input record is dead-lettered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The output's name, such as `"alerts"`.
    pub name: String,
    /// The record key.
    pub key: Vec<u8>,
    /// The record value.
    pub value: Vec<u8>,
}

/// A successful fold of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The change to the key's value.
    pub update: Update,
    /// Records for the module's outputs.
    pub outputs: Vec<Output>,
}

impl Outcome {
    /// The key's value stays as it is; no output.
    pub fn unchanged() -> Self {
        Outcome {
            update: Update::Unchanged,
            outputs: Vec::new(),
        }
    }

    /// The key's value becomes `value`; no output.
    pub fn put(value: impl Into<Vec<u8>>) -> Self {
        Outcome {
            update: Update::Put(value.into()),
            outputs: Vec::new(),
        }
    }

    /// The key is deleted; no output.
    pub fn delete() -> Self {
        Outcome {
            update: Update::Delete,
            outputs: Vec::new(),
        }
    }

    /// Adds a record for the output `name`.
    pub fn with_output(
        mut self,
        name: impl Into<String>,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Self {
        self.outputs.push(Output {
            name: name.into(),
            key: key.into(),
            value: value.into(),
        });
        self
    }
}

/// Why a fold refuses a record: the node sends it to the dead-letter topic with this reason,
/// and the partition goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The record cannot be decoded or does not make sense.
    Malformed(String),
    /// The fold failed on a well-formed record.
    Failed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Malformed(reason) => write!(f, "malformed record: {reason}"),
            Error::Failed(reason) => write!(f, "processing failed: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// What a fold returns for one record.
pub type FoldResult = Result<Outcome, Error>;

/// Bytes that do not follow the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbiError {
    /// Where in the input the problem is, in bytes.
    pub at: usize,
    /// What is wrong.
    pub what: &'static str,
}

impl fmt::Display for AbiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for AbiError {}

/// Appends a batch of `(record, current value)` pairs to `out`.
pub fn encode_batch<'r, 'a: 'r>(
    out: &mut Vec<u8>,
    batch: impl ExactSizeIterator<Item = (&'r Record<'a>, Option<&'r [u8]>)>,
) {
    put_u32(out, batch.len() as u32);
    for (record, current) in batch {
        put_bytes(out, record.topic.as_bytes());
        put_u32(out, record.partition);
        out.extend_from_slice(&record.offset.to_le_bytes());
        out.push(u8::from(record.timestamp_ms.is_some()));
        out.extend_from_slice(&record.timestamp_ms.unwrap_or(0).to_le_bytes());
        put_bytes(out, record.key);
        put_opt(out, record.value);
        put_opt(out, current);
        put_u32(out, record.headers.len() as u32);
        for header in &record.headers {
            put_bytes(out, header.key.as_bytes());
            put_opt(out, header.value);
        }
    }
}

/// One record of a batch with its key's current value.
pub type BatchEntry<'a> = (Record<'a>, Option<&'a [u8]>);

/// Reads a batch: each record with the key's current value.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<BatchEntry<'_>>, AbiError> {
    let mut r = Reader { bytes, at: 0 };
    let count = r.u32()?;
    // A record takes at least 45 bytes: never reserve more than the input can hold.
    let mut batch = Vec::with_capacity((count as usize).min(bytes.len() / 45));
    for _ in 0..count {
        let topic = r.str()?;
        let partition = r.u32()?;
        let offset = r.i64()?;
        let has_timestamp = r.flag()?;
        let timestamp = r.i64()?;
        let key = r.bytes()?;
        let value = r.opt()?;
        let current = r.opt()?;
        let header_count = r.u32()?;
        let mut headers = Vec::with_capacity((header_count as usize).min(r.remaining() / 8));
        for _ in 0..header_count {
            headers.push(Header {
                key: r.str()?,
                value: r.opt()?,
            });
        }
        batch.push((
            Record {
                topic,
                partition,
                offset,
                timestamp_ms: has_timestamp.then_some(timestamp),
                key,
                value,
                headers,
            },
            current,
        ));
    }
    r.end()?;
    Ok(batch)
}

/// Appends the results of a batch to `out`.
pub fn encode_results<'r>(
    out: &mut Vec<u8>,
    results: impl ExactSizeIterator<Item = &'r FoldResult>,
) {
    put_u32(out, results.len() as u32);
    for result in results {
        match result {
            Ok(outcome) => {
                out.push(0);
                match &outcome.update {
                    Update::Unchanged => out.push(0),
                    Update::Put(value) => {
                        out.push(1);
                        put_bytes(out, value);
                    }
                    Update::Delete => out.push(2),
                }
                put_u32(out, outcome.outputs.len() as u32);
                for output in &outcome.outputs {
                    put_bytes(out, output.name.as_bytes());
                    put_bytes(out, &output.key);
                    put_bytes(out, &output.value);
                }
            }
            Err(Error::Malformed(reason)) => {
                out.push(1);
                put_bytes(out, reason.as_bytes());
            }
            Err(Error::Failed(reason)) => {
                out.push(2);
                put_bytes(out, reason.as_bytes());
            }
        }
    }
}

/// Reads the results of a batch of `expected` records.
pub fn decode_results(bytes: &[u8], expected: usize) -> Result<Vec<FoldResult>, AbiError> {
    let mut r = Reader { bytes, at: 0 };
    let count = r.u32()?;
    if count as usize != expected {
        return Err(r.error("result count differs from the batch's record count"));
    }
    let mut results = Vec::with_capacity(expected.min(bytes.len() / 2));
    for _ in 0..count {
        let result = match r.u8()? {
            0 => {
                let update = match r.u8()? {
                    0 => Update::Unchanged,
                    1 => Update::Put(r.bytes()?.to_vec()),
                    2 => Update::Delete,
                    _ => return Err(r.back(1, "unknown update kind")),
                };
                let output_count = r.u32()?;
                let mut outputs =
                    Vec::with_capacity((output_count as usize).min(r.remaining() / 12));
                for _ in 0..output_count {
                    outputs.push(Output {
                        name: r.str()?.to_owned(),
                        key: r.bytes()?.to_vec(),
                        value: r.bytes()?.to_vec(),
                    });
                }
                Ok(Outcome { update, outputs })
            }
            1 => Err(Error::Malformed(r.str()?.to_owned())),
            2 => Err(Error::Failed(r.str()?.to_owned())),
            _ => return Err(r.back(1, "unknown result kind")),
        };
        results.push(result);
    }
    r.end()?;
    Ok(results)
}

/// Packs a pointer and a length into the `i64` that `kstore_fold` returns.
pub fn pack(ptr: u32, len: u32) -> i64 {
    ((u64::from(ptr) << 32) | u64::from(len)) as i64
}

/// Splits what `kstore_fold` returned into a pointer and a length.
pub fn unpack(packed: i64) -> (u32, u32) {
    let packed = packed as u64;
    ((packed >> 32) as u32, packed as u32)
}

fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => put_bytes(out, bytes),
        None => put_u32(out, ABSENT),
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn error(&self, what: &'static str) -> AbiError {
        AbiError { at: self.at, what }
    }

    fn back(&self, n: usize, what: &'static str) -> AbiError {
        AbiError {
            at: self.at - n,
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], AbiError> {
        if n > self.remaining() {
            return Err(self.error("length runs past the end"));
        }
        let taken = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, AbiError> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, AbiError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.back(1, "a flag is neither 0 nor 1")),
        }
    }

    fn u32(&mut self) -> Result<u32, AbiError> {
        let mut n = [0; 4];
        n.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(n))
    }

    fn i64(&mut self) -> Result<i64, AbiError> {
        let mut n = [0; 8];
        n.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(n))
    }

    fn bytes(&mut self) -> Result<&'a [u8], AbiError> {
        let len = self.u32()?;
        self.take(len as usize)
    }

    fn opt(&mut self) -> Result<Option<&'a [u8]>, AbiError> {
        match self.u32()? {
            ABSENT => Ok(None),
            len => self.take(len as usize).map(Some),
        }
    }

    fn str(&mut self) -> Result<&'a str, AbiError> {
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map_err(|_| self.back(bytes.len(), "text is not UTF-8"))
    }

    fn end(&self) -> Result<(), AbiError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.error("bytes left over after the last item"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(Record<'static>, Option<&'static [u8]>)> {
        vec![
            (
                Record {
                    topic: "orders",
                    partition: 7,
                    offset: 42,
                    timestamp_ms: Some(1_767_225_600_000),
                    key: b"c-1",
                    value: Some(b"{}"),
                    headers: vec![
                        Header {
                            key: "trace",
                            value: Some(b"abc"),
                        },
                        Header {
                            key: "empty",
                            value: None,
                        },
                    ],
                },
                Some(b"state".as_slice()),
            ),
            (
                Record {
                    topic: "orders",
                    partition: 0,
                    offset: -1,
                    timestamp_ms: None,
                    key: b"k",
                    value: None,
                    headers: Vec::new(),
                },
                None,
            ),
            (
                Record {
                    key: b"e",
                    value: Some(b""),
                    ..Record::default()
                },
                Some(b"".as_slice()),
            ),
        ]
    }

    #[test]
    fn a_batch_round_trips() {
        let batch = sample();
        let mut bytes = Vec::new();
        encode_batch(&mut bytes, batch.iter().map(|(r, c)| (r, *c)));
        assert_eq!(decode_batch(&bytes).unwrap(), batch);
    }

    #[test]
    fn results_round_trip() {
        let results = vec![
            Ok(Outcome::put(b"v".to_vec()).with_output("alerts", b"k".to_vec(), b"a".to_vec())),
            Ok(Outcome::unchanged()),
            Ok(Outcome::delete()),
            Err(Error::Malformed("no value".into())),
            Err(Error::Failed("stored value: bad".into())),
        ];
        let mut bytes = Vec::new();
        encode_results(&mut bytes, results.iter());
        assert_eq!(decode_results(&bytes, results.len()).unwrap(), results);
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let batch = sample();
        let mut bytes = Vec::new();
        encode_batch(&mut bytes, batch.iter().map(|(r, c)| (r, *c)));
        for len in 0..bytes.len() {
            assert!(decode_batch(&bytes[..len]).is_err(), "{len}");
        }
        bytes.push(0);
        assert!(decode_batch(&bytes).is_err());

        let mut bytes = Vec::new();
        encode_results(&mut bytes, [Ok(Outcome::put(b"v".to_vec()))].iter());
        for len in 0..bytes.len() {
            assert!(decode_results(&bytes[..len], 1).is_err(), "{len}");
        }
        assert!(decode_results(&bytes, 2).is_err(), "a count that differs");
    }

    #[test]
    fn a_huge_count_does_not_allocate_ahead() {
        let bytes = u32::MAX.to_le_bytes();
        assert!(decode_batch(&bytes).is_err());
        assert!(decode_results(&bytes, u32::MAX as usize).is_err());
    }

    #[test]
    fn pointers_and_lengths_pack_into_one_i64() {
        for (ptr, len) in [(0, 0), (1, 2), (u32::MAX, u32::MAX), (0x8000_0000, 17)] {
            assert_eq!(unpack(pack(ptr, len)), (ptr, len));
        }
    }

    #[test]
    fn the_last_header_of_a_name_wins() {
        let record = Record {
            headers: vec![
                Header {
                    key: "h",
                    value: Some(b"1"),
                },
                Header {
                    key: "h",
                    value: Some(b"2"),
                },
            ],
            ..Record::default()
        };
        assert_eq!(record.header("h"), Some(b"2".as_slice()));
        assert_eq!(record.header("other"), None);
    }
}
