//! Receiving a peer's snapshot, where every field of the stream is hostile until checked.
//!
//! [`SnapshotCheck`] is the state machine, free of I/O: it takes the manifest and then each
//! part, and says what to write (or why the stream is refused). The manifest must list at
//! most `max-files` plain file names (no paths, no duplicates) whose sizes add up, without
//! overflow, to no more than the disk has free less its margin. Parts must then come in
//! order: each file's chunks at the offsets that follow each other, never past its size,
//! then its end with the right checksum, then the next file. [`receive`] drives the check
//! over a stream into a scratch directory, gives a stalled stream up after the idle timeout,
//! and removes the directory on any refusal, so nothing half-written stays behind.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kstore_proto::v1::snapshot_part::Part;
use kstore_proto::v1::{Role, SnapshotManifest, SnapshotPart};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;
use xxhash_rust::xxh3::Xxh3;

use crate::store::plain_file_name;

/// What a receiver accepts from a peer's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveLimits {
    /// The most files the manifest may list.
    pub max_files: usize,
    /// The most bytes the files may add up to: the disk's free space less the margin.
    pub max_bytes: u64,
    /// How long the stream may go without a part.
    pub idle_timeout: Duration,
}

/// How much of a peer's text an error quotes.
const QUOTED_CHARS: usize = 64;

/// Why a snapshot from a peer was refused. Each names what was wrong; [`Self::reason`] labels
/// it for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiveError {
    /// The stream did not start with a manifest.
    #[error("the snapshot did not start with a manifest")]
    NoManifest,
    /// A manifest after the first.
    #[error("a second manifest")]
    SecondManifest,
    /// A part with nothing in it.
    #[error("an empty part")]
    EmptyPart,
    /// More files than the limit.
    #[error("the manifest lists {count} files; the limit is {limit}")]
    TooManyFiles {
        /// Files listed.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A name that is not a plain file name (a path, empty, hidden, odd characters).
    #[error("the manifest names {name:?}, which is not a plain file name")]
    BadFileName {
        /// The name, quoted in part.
        name: String,
    },
    /// One name listed twice.
    #[error("the manifest names {name:?} twice")]
    DuplicateFile {
        /// The name.
        name: String,
    },
    /// Sizes that add up past 2^64 bytes.
    #[error("the manifest's sizes add up to more than 2^64 bytes")]
    SizeOverflow,
    /// More bytes than the disk can take.
    #[error("the snapshot holds {needed} bytes; the disk has {available} free beyond its margin")]
    NoSpace {
        /// Bytes the manifest lists.
        needed: u64,
        /// Free bytes less the margin.
        available: u64,
    },
    /// Offsets that no store holds.
    #[error("the manifest states changelog offset {changelog} and input offset {input}")]
    BadOffsets {
        /// The changelog offset stated.
        changelog: i64,
        /// The input offset stated.
        input: i64,
    },
    /// A role that a snapshot's source cannot have.
    #[error("the manifest states role {0}; a snapshot comes from an active or standby copy")]
    BadRole(i32),
    /// A part for a file number the manifest does not have.
    #[error("a part for file {file}; the manifest lists {files}")]
    UnknownFile {
        /// The file number sent.
        file: u32,
        /// Files in the manifest.
        files: usize,
    },
    /// A part for another file than the one due.
    #[error("a part for file {file} while file {due} was due")]
    OutOfOrder {
        /// The file number sent.
        file: u32,
        /// The file due.
        due: usize,
    },
    /// A chunk that skips or overlaps bytes.
    #[error("{name}: a chunk at offset {offset} after {written} bytes")]
    BadOffset {
        /// The file.
        name: String,
        /// The chunk's offset.
        offset: u64,
        /// Bytes received of the file.
        written: u64,
    },
    /// A chunk without data.
    #[error("{name}: a chunk without data")]
    EmptyChunk {
        /// The file.
        name: String,
    },
    /// More bytes than the manifest said.
    #[error("{name}: more than its {bytes} bytes")]
    FileTooLong {
        /// The file.
        name: String,
        /// Its size in the manifest.
        bytes: u64,
    },
    /// Fewer bytes than the manifest said.
    #[error("{name}: {written} bytes, the manifest says {bytes}")]
    FileTooShort {
        /// The file.
        name: String,
        /// Bytes received.
        written: u64,
        /// Its size in the manifest.
        bytes: u64,
    },
    /// A checksum that does not match the bytes.
    #[error("{name}: checksum {computed}, the peer says {stated:?}")]
    Checksum {
        /// The file.
        name: String,
        /// The checksum of the bytes received.
        computed: String,
        /// The peer's, quoted in part.
        stated: String,
    },
    /// The stream ended before every file did.
    #[error("the stream ended after {finished} of {files} files")]
    EndedEarly {
        /// Files complete.
        finished: usize,
        /// Files in the manifest.
        files: usize,
    },
    /// No part for the idle timeout.
    #[error("no part for {0:?}")]
    Stalled(Duration),
    /// The peer ended the stream with an error.
    #[error("the peer failed: {code:?}: {message}")]
    PeerFailed {
        /// The status code.
        code: tonic::Code,
        /// The status message, quoted in part.
        message: String,
    },
    /// Writing the snapshot here failed (not the peer's fault).
    #[error("{0}")]
    Local(String),
}

impl ReceiveError {
    /// A short label of what was wrong, for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ReceiveError::NoManifest => "no_manifest",
            ReceiveError::SecondManifest => "second_manifest",
            ReceiveError::EmptyPart => "empty_part",
            ReceiveError::TooManyFiles { .. } => "too_many_files",
            ReceiveError::BadFileName { .. } => "bad_file_name",
            ReceiveError::DuplicateFile { .. } => "duplicate_file",
            ReceiveError::SizeOverflow => "size_overflow",
            ReceiveError::NoSpace { .. } => "no_space",
            ReceiveError::BadOffsets { .. } => "bad_offsets",
            ReceiveError::BadRole(_) => "bad_role",
            ReceiveError::UnknownFile { .. } => "unknown_file",
            ReceiveError::OutOfOrder { .. } => "out_of_order",
            ReceiveError::BadOffset { .. } => "bad_chunk_offset",
            ReceiveError::EmptyChunk { .. } => "empty_chunk",
            ReceiveError::FileTooLong { .. } => "file_too_long",
            ReceiveError::FileTooShort { .. } => "file_too_short",
            ReceiveError::Checksum { .. } => "checksum",
            ReceiveError::EndedEarly { .. } => "ended_early",
            ReceiveError::Stalled(_) => "stalled",
            ReceiveError::PeerFailed { .. } => "peer_failed",
            ReceiveError::Local(_) => "local_io",
        }
    }
}

/// Quotes at most [`QUOTED_CHARS`] characters of a peer's text, so that a huge field cannot
/// flood the log.
pub(crate) fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Checks a manifest against the limits; returns the bytes its files add up to.
pub fn check_manifest(
    manifest: &SnapshotManifest,
    limits: &ReceiveLimits,
) -> Result<u64, ReceiveError> {
    if manifest.files.len() > limits.max_files {
        return Err(ReceiveError::TooManyFiles {
            count: manifest.files.len(),
            limit: limits.max_files,
        });
    }
    if manifest.changelog_offset < 0 || manifest.input_offset < 0 {
        return Err(ReceiveError::BadOffsets {
            changelog: manifest.changelog_offset,
            input: manifest.input_offset,
        });
    }
    match Role::try_from(manifest.role) {
        Ok(Role::Active | Role::Standby) => {}
        _ => return Err(ReceiveError::BadRole(manifest.role)),
    }
    let mut names = std::collections::HashSet::with_capacity(manifest.files.len());
    let mut total = 0u64;
    for file in &manifest.files {
        if !plain_file_name(&file.name) {
            return Err(ReceiveError::BadFileName {
                name: quoted(&file.name),
            });
        }
        if !names.insert(file.name.as_str()) {
            return Err(ReceiveError::DuplicateFile {
                name: file.name.clone(),
            });
        }
        total = total
            .checked_add(file.bytes)
            .ok_or(ReceiveError::SizeOverflow)?;
    }
    if total > limits.max_bytes {
        return Err(ReceiveError::NoSpace {
            needed: total,
            available: limits.max_bytes,
        });
    }
    Ok(total)
}

/// What to do with a part the check accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Append the chunk's data to file `file`, creating the file first if `begins`.
    Data {
        /// The file's index in the manifest.
        file: usize,
        /// Whether the data is the file's first.
        begins: bool,
    },
    /// File `file` is whole and its checksum right: make it durable (creating it first if
    /// `empty`: a file without bytes has no chunks).
    FileDone {
        /// The file's index in the manifest.
        file: usize,
        /// Whether the file had no chunk.
        empty: bool,
    },
}

/// The file being received: always the one due.
struct OpenFile {
    written: u64,
    hasher: Xxh3,
}

impl std::fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFile")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// The state of a snapshot stream being received: what has arrived, and what may come next.
#[derive(Debug)]
pub struct SnapshotCheck {
    manifest: SnapshotManifest,
    total: u64,
    received: u64,
    /// Files complete, in manifest order: the next one due is this index.
    finished: usize,
    current: Option<OpenFile>,
}

impl SnapshotCheck {
    /// Starts with the stream's first part, which must be a manifest within `limits`.
    pub fn start(first: Option<Part>, limits: &ReceiveLimits) -> Result<Self, ReceiveError> {
        let Some(Part::Manifest(manifest)) = first else {
            return Err(ReceiveError::NoManifest);
        };
        let total = check_manifest(&manifest, limits)?;
        Ok(SnapshotCheck {
            manifest,
            total,
            received: 0,
            finished: 0,
            current: None,
        })
    }

    /// The manifest (checked).
    pub fn manifest(&self) -> &SnapshotManifest {
        &self.manifest
    }

    /// The name of file `index` of the manifest: a plain file name.
    pub fn file_name(&self, index: usize) -> &str {
        self.manifest
            .files
            .get(index)
            .map_or("", |file| file.name.as_str())
    }

    /// Bytes received so far, and bytes in all.
    pub fn progress(&self) -> (u64, u64) {
        (self.received, self.total)
    }

    /// The file number of a part, checked to be the one due.
    fn due(&self, file: u32) -> Result<usize, ReceiveError> {
        let files = self.manifest.files.len();
        let index = usize::try_from(file)
            .ok()
            .filter(|&index| index < files)
            .ok_or(ReceiveError::UnknownFile { file, files })?;
        if index != self.finished {
            return Err(ReceiveError::OutOfOrder {
                file,
                due: self.finished,
            });
        }
        Ok(index)
    }

    /// Checks the next part of the stream; says what to write.
    pub fn accept(&mut self, part: &Part) -> Result<Accepted, ReceiveError> {
        match part {
            Part::Manifest(_) => Err(ReceiveError::SecondManifest),
            Part::Chunk(chunk) => {
                let index = self.due(chunk.file)?;
                let file = &self.manifest.files[index];
                if chunk.data.is_empty() {
                    return Err(ReceiveError::EmptyChunk {
                        name: file.name.clone(),
                    });
                }
                let begins = self.current.is_none();
                let open = self.current.get_or_insert_with(|| OpenFile {
                    written: 0,
                    hasher: Xxh3::new(),
                });
                if chunk.offset != open.written {
                    return Err(ReceiveError::BadOffset {
                        name: file.name.clone(),
                        offset: chunk.offset,
                        written: open.written,
                    });
                }
                let written = u64::try_from(chunk.data.len())
                    .ok()
                    .and_then(|len| open.written.checked_add(len))
                    .filter(|&written| written <= file.bytes)
                    .ok_or_else(|| ReceiveError::FileTooLong {
                        name: file.name.clone(),
                        bytes: file.bytes,
                    })?;
                open.hasher.update(&chunk.data);
                self.received += written - open.written;
                open.written = written;
                Ok(Accepted::Data {
                    file: index,
                    begins,
                })
            }
            Part::FileEnd(end) => {
                let index = self.due(end.file)?;
                let file = &self.manifest.files[index];
                let (written, computed, empty) = match self.current.take() {
                    Some(open) => (open.written, open.hasher.digest128(), false),
                    None => (0, Xxh3::new().digest128(), true),
                };
                if written != file.bytes {
                    return Err(ReceiveError::FileTooShort {
                        name: file.name.clone(),
                        written,
                        bytes: file.bytes,
                    });
                }
                let computed = format!("{computed:032x}");
                if computed != end.xxh3 {
                    return Err(ReceiveError::Checksum {
                        name: file.name.clone(),
                        computed,
                        stated: quoted(&end.xxh3),
                    });
                }
                self.finished += 1;
                Ok(Accepted::FileDone { file: index, empty })
            }
        }
    }

    /// The stream ended: every file must be complete. Returns the manifest.
    pub fn finish(self) -> Result<SnapshotManifest, ReceiveError> {
        if self.finished != self.manifest.files.len() {
            return Err(ReceiveError::EndedEarly {
                finished: self.finished,
                files: self.manifest.files.len(),
            });
        }
        Ok(self.manifest)
    }
}

/// The bytes free to an unprivileged writer on the file system that holds `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(path)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// The next part of a stream; `None` at its end.
async fn next_part(
    parts: &mut (impl Stream<Item = Result<SnapshotPart, Status>> + Unpin),
    idle_timeout: Duration,
) -> Result<Option<Part>, ReceiveError> {
    match tokio::time::timeout(idle_timeout, parts.next()).await {
        Err(_) => Err(ReceiveError::Stalled(idle_timeout)),
        Ok(None) => Ok(None),
        Ok(Some(Err(status))) => Err(ReceiveError::PeerFailed {
            code: status.code(),
            message: quoted(status.message()),
        }),
        Ok(Some(Ok(SnapshotPart { part: None }))) => Err(ReceiveError::EmptyPart),
        Ok(Some(Ok(SnapshotPart { part: Some(part) }))) => Ok(Some(part)),
    }
}

/// Receives a snapshot from `parts` into `dir`, which must not exist (its parent must):
/// every part checked by [`SnapshotCheck`] before it is written, every file synced once its
/// checksum is right. On any refusal `dir` is removed. Returns the manifest.
pub async fn receive(
    mut parts: impl Stream<Item = Result<SnapshotPart, Status>> + Unpin,
    dir: &Path,
    limits: &ReceiveLimits,
    mut progress: impl FnMut(u64, u64),
) -> Result<SnapshotManifest, ReceiveError> {
    let first = next_part(&mut parts, limits.idle_timeout).await?;
    let mut check = SnapshotCheck::start(first, limits)?;
    std::fs::create_dir(dir)
        .map_err(|e| ReceiveError::Local(format!("creating {}: {e}", dir.display())))?;
    let received = write_parts(&mut parts, dir, limits, &mut check, &mut progress)
        .await
        .and_then(|()| check.finish());
    if received.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    received
}

/// How many checked writes may wait for the disk while the next parts arrive.
const WRITE_AHEAD: usize = 8;

/// What the writer does with the checked parts, in order.
#[derive(Debug)]
enum FileWrite {
    /// Create the named file (it must not exist) and make it the one written.
    Create(String),
    /// Append to the file being written.
    Append(bytes::Bytes),
    /// Sync the file being written and close it.
    Done,
}

/// Writes the parts after the manifest into `dir`, as the check accepts them. The disk work
/// runs on a thread of its own, so that the next parts arrive while the last are written.
async fn write_parts(
    parts: &mut (impl Stream<Item = Result<SnapshotPart, Status>> + Unpin),
    dir: &Path,
    limits: &ReceiveLimits,
    check: &mut SnapshotCheck,
    progress: &mut impl FnMut(u64, u64),
) -> Result<(), ReceiveError> {
    let (writes, to_write) = tokio::sync::mpsc::channel(WRITE_AHEAD);
    let writer = tokio::task::spawn_blocking({
        let dir = dir.to_path_buf();
        move || write_files(&dir, to_write)
    });
    let checked = check_parts(parts, limits, check, progress, &writes).await;
    drop(writes);
    let written = writer
        .await
        .map_err(|e| ReceiveError::Local(format!("the snapshot's writer failed: {e}")))?;
    // A writer that failed stopped the parts too: its error is the cause.
    written.and(checked)
}

/// Checks each part after the manifest and hands what it says to write to `writes`. Stops
/// early, with no error of its own, if the writer has stopped.
async fn check_parts(
    parts: &mut (impl Stream<Item = Result<SnapshotPart, Status>> + Unpin),
    limits: &ReceiveLimits,
    check: &mut SnapshotCheck,
    progress: &mut impl FnMut(u64, u64),
    writes: &tokio::sync::mpsc::Sender<FileWrite>,
) -> Result<(), ReceiveError> {
    while let Some(part) = next_part(parts, limits.idle_timeout).await? {
        let accepted = check.accept(&part)?;
        let mut to_write = Vec::with_capacity(2);
        match (accepted, part) {
            (Accepted::Data { file, begins }, Part::Chunk(chunk)) => {
                if begins {
                    to_write.push(FileWrite::Create(check.file_name(file).to_owned()));
                }
                metrics::counter!(super::SNAPSHOT_BYTES_RECEIVED)
                    .increment(chunk.data.len() as u64);
                to_write.push(FileWrite::Append(chunk.data));
                let (received, total) = check.progress();
                progress(received, total);
            }
            (Accepted::FileDone { file, empty }, _) => {
                if empty {
                    to_write.push(FileWrite::Create(check.file_name(file).to_owned()));
                }
                to_write.push(FileWrite::Done);
            }
            (Accepted::Data { file, .. }, _) => {
                return Err(ReceiveError::Local(format!(
                    "{}: data accepted from a part that holds none",
                    check.file_name(file)
                )));
            }
        }
        for write in to_write {
            if writes.send(write).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Carries out `writes` in `dir` until they end or one fails.
fn write_files(
    dir: &Path,
    mut writes: tokio::sync::mpsc::Receiver<FileWrite>,
) -> Result<(), ReceiveError> {
    let local = |what: &str, name: &str, error: std::io::Error| {
        ReceiveError::Local(format!("{what} {name}: {error}"))
    };
    let mut open: Option<(String, std::fs::File)> = None;
    while let Some(write) = writes.blocking_recv() {
        match write {
            FileWrite::Create(name) => {
                let file = std::fs::File::create_new(dir.join(&name))
                    .map_err(|e| local("creating", &name, e))?;
                open = Some((name, file));
            }
            FileWrite::Append(data) => {
                let Some((name, file)) = open.as_mut() else {
                    return Err(ReceiveError::Local("data for no open file".into()));
                };
                file.write_all(&data)
                    .map_err(|e| local("writing", name, e))?;
            }
            FileWrite::Done => {
                let Some((name, file)) = open.take() else {
                    return Err(ReceiveError::Local("a file end with no open file".into()));
                };
                file.sync_all().map_err(|e| local("syncing", &name, e))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kstore_proto::v1::{SnapshotChunk, SnapshotFile, SnapshotFileEnd};
    use proptest::prelude::*;

    use super::*;

    const LIMITS: ReceiveLimits = ReceiveLimits {
        max_files: 16,
        max_bytes: 1 << 20,
        idle_timeout: Duration::from_secs(5),
    };

    fn manifest(files: &[(&str, u64)]) -> SnapshotManifest {
        SnapshotManifest {
            node_id: "node-2".into(),
            role: Role::Standby as i32,
            changelog_offset: 10,
            input_offset: 20,
            files: files
                .iter()
                .map(|(name, bytes)| SnapshotFile {
                    name: (*name).into(),
                    bytes: *bytes,
                })
                .collect(),
        }
    }

    fn checksum(data: &[u8]) -> String {
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(data))
    }

    /// The stream a sender makes of `files`, in chunks of at most `chunk` bytes.
    fn stream_of(files: &BTreeMap<String, Vec<u8>>, chunk: usize) -> Vec<Part> {
        let listed: Vec<(&str, u64)> = files
            .iter()
            .map(|(name, data)| (name.as_str(), data.len() as u64))
            .collect();
        let mut parts = vec![Part::Manifest(manifest(&listed))];
        for (index, data) in files.values().enumerate() {
            for (n, piece) in data.chunks(chunk).enumerate() {
                parts.push(Part::Chunk(SnapshotChunk {
                    file: index as u32,
                    offset: (n * chunk) as u64,
                    data: piece.to_vec().into(),
                }));
            }
            parts.push(Part::FileEnd(SnapshotFileEnd {
                file: index as u32,
                xxh3: checksum(data),
            }));
        }
        parts
    }

    /// Feeds parts to the check alone, without I/O.
    fn check(parts: Vec<Part>, limits: &ReceiveLimits) -> Result<SnapshotManifest, ReceiveError> {
        let mut parts = parts.into_iter();
        let mut check = SnapshotCheck::start(parts.next(), limits)?;
        for part in parts {
            check.accept(&part)?;
        }
        check.finish()
    }

    /// Receives `parts` into `<root>/incoming` on a runtime of its own.
    fn receive_now(
        parts: Vec<Option<Part>>,
        root: &Path,
        limits: &ReceiveLimits,
    ) -> Result<SnapshotManifest, ReceiveError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let stream = tokio_stream::iter(parts.into_iter().map(|part| Ok(SnapshotPart { part })));
        runtime.block_on(receive(stream, &root.join("incoming"), limits, |_, _| {}))
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|listing| {
                listing
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn a_file_end_past_the_last_file_or_with_no_files_is_refused() {
        let end = |file| {
            Part::FileEnd(SnapshotFileEnd {
                file,
                xxh3: checksum(b""),
            })
        };
        assert_eq!(
            check(vec![Part::Manifest(manifest(&[])), end(0)], &LIMITS).unwrap_err(),
            ReceiveError::UnknownFile { file: 0, files: 0 }
        );
        assert_eq!(
            check(
                vec![Part::Manifest(manifest(&[("CURRENT", 0)])), end(0), end(1)],
                &LIMITS
            )
            .unwrap_err(),
            ReceiveError::UnknownFile { file: 1, files: 1 }
        );
        assert_eq!(
            check(
                vec![Part::Manifest(manifest(&[("CURRENT", 0)])), end(u32::MAX)],
                &LIMITS
            )
            .unwrap_err(),
            ReceiveError::UnknownFile {
                file: u32::MAX,
                files: 1
            }
        );
        // An empty snapshot is well-formed (RocksDB never makes one, and it will not open).
        assert!(check(vec![Part::Manifest(manifest(&[]))], &LIMITS).is_ok());
    }

    #[test]
    fn manifests_are_checked_before_any_byte_arrives() {
        let refused = |files: &[(&str, u64)]| {
            SnapshotCheck::start(Some(Part::Manifest(manifest(files))), &LIMITS).unwrap_err()
        };
        assert_eq!(
            refused(&[("a", u64::MAX), ("b", 1)]),
            ReceiveError::SizeOverflow
        );
        assert_eq!(
            refused(&[("a", 1 << 20), ("b", 1)]),
            ReceiveError::NoSpace {
                needed: (1 << 20) + 1,
                available: 1 << 20
            }
        );
        assert!(matches!(
            refused(&[("CURRENT", 1), ("CURRENT", 1)]),
            ReceiveError::DuplicateFile { .. }
        ));
        let many: Vec<(String, u64)> = (0..17).map(|i| (format!("{i:06}.sst"), 1)).collect();
        let many: Vec<(&str, u64)> = many.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        assert_eq!(
            refused(&many),
            ReceiveError::TooManyFiles {
                count: 17,
                limit: 16
            }
        );
        let long = "a".repeat(300);
        for name in [
            "",
            ".",
            "..",
            "../CURRENT",
            "/etc/passwd",
            "a/b",
            "a\\b",
            ".hidden",
            "nul\0",
            "ünïcode",
            &long,
        ] {
            assert!(
                matches!(refused(&[(name, 1)]), ReceiveError::BadFileName { .. }),
                "{name:?}"
            );
        }
        let mut negative = manifest(&[]);
        negative.input_offset = -1;
        assert!(matches!(
            SnapshotCheck::start(Some(Part::Manifest(negative)), &LIMITS).unwrap_err(),
            ReceiveError::BadOffsets { .. }
        ));
        let mut restoring = manifest(&[]);
        restoring.role = Role::Restoring as i32;
        assert_eq!(
            SnapshotCheck::start(Some(Part::Manifest(restoring)), &LIMITS).unwrap_err(),
            ReceiveError::BadRole(Role::Restoring as i32)
        );
        assert_eq!(
            SnapshotCheck::start(None, &LIMITS).unwrap_err(),
            ReceiveError::NoManifest
        );
    }

    #[test]
    fn chunks_must_follow_each_other_within_the_current_file() {
        let files: BTreeMap<String, Vec<u8>> = [
            ("000001.sst".to_owned(), vec![1u8; 10]),
            ("CURRENT".to_owned(), vec![2u8; 4]),
        ]
        .into();
        let good = stream_of(&files, 4);
        assert!(check(good.clone(), &LIMITS).is_ok());

        // A chunk of the second file while the first is open.
        let mut early = good.clone();
        early.insert(
            2,
            Part::Chunk(SnapshotChunk {
                file: 1,
                offset: 0,
                data: vec![2; 4].into(),
            }),
        );
        assert_eq!(
            check(early, &LIMITS).unwrap_err(),
            ReceiveError::OutOfOrder { file: 1, due: 0 }
        );
        // An overlap: the second chunk again.
        let mut overlap = good.clone();
        overlap.insert(3, overlap[2].clone());
        assert!(matches!(
            check(overlap, &LIMITS).unwrap_err(),
            ReceiveError::BadOffset {
                offset: 4,
                written: 8,
                ..
            }
        ));
        // A file's end before its last chunk.
        let mut short = good.clone();
        short.swap(3, 4);
        assert!(matches!(
            check(short, &LIMITS).unwrap_err(),
            ReceiveError::FileTooShort { .. }
        ));
        // A chunk past the file's size.
        let mut long = good.clone();
        if let Part::Chunk(chunk) = &mut long[3] {
            chunk.data = [&chunk.data[..], &[9]].concat().into();
        }
        assert!(matches!(
            check(long, &LIMITS).unwrap_err(),
            ReceiveError::FileTooLong { .. }
        ));
        // A chunk without data.
        let mut empty = good;
        empty.insert(
            1,
            Part::Chunk(SnapshotChunk {
                file: 0,
                offset: 0,
                data: Default::default(),
            }),
        );
        assert!(matches!(
            check(empty, &LIMITS).unwrap_err(),
            ReceiveError::EmptyChunk { .. }
        ));
    }

    #[tokio::test]
    async fn a_stream_that_stalls_is_given_up_and_leaves_nothing() {
        let limits = ReceiveLimits {
            idle_timeout: Duration::from_millis(100),
            ..LIMITS
        };
        let root = tempfile::tempdir().unwrap();
        let files: BTreeMap<String, Vec<u8>> = [("CURRENT".to_owned(), vec![7u8; 100])].into();
        let mut parts = stream_of(&files, 10);
        parts.truncate(4);
        let stream = tokio_stream::iter(
            parts
                .into_iter()
                .map(|part| Ok(SnapshotPart { part: Some(part) })),
        )
        .chain(tokio_stream::pending());
        let dir = root.path().join("incoming");
        let error = receive(stream, &dir, &limits, |_, _| {}).await.unwrap_err();
        assert_eq!(error, ReceiveError::Stalled(limits.idle_timeout));
        assert_eq!(error.reason(), "stalled");
        assert!(entries(root.path()).is_empty());
    }

    #[test]
    fn a_peer_error_or_an_empty_part_is_refused_and_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let files: BTreeMap<String, Vec<u8>> = [("CURRENT".to_owned(), vec![7u8; 10])].into();
        let mut parts: Vec<Option<Part>> = stream_of(&files, 4).into_iter().map(Some).collect();
        parts.insert(2, None);
        assert_eq!(
            receive_now(parts, root.path(), &LIMITS).unwrap_err(),
            ReceiveError::EmptyPart
        );
        assert!(entries(root.path()).is_empty());

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let failing = tokio_stream::iter(vec![
            Ok(SnapshotPart {
                part: Some(Part::Manifest(manifest(&[("CURRENT", 10)]))),
            }),
            Err(Status::internal("x".repeat(10_000))),
        ]);
        let error = runtime
            .block_on(receive(
                failing,
                &root.path().join("incoming"),
                &LIMITS,
                |_, _| {},
            ))
            .unwrap_err();
        assert!(matches!(error, ReceiveError::PeerFailed { .. }));
        assert!(error.to_string().len() < 200, "quoted in part: {error}");
        assert!(entries(root.path()).is_empty());
    }

    /// A file name as a peer might send it: mostly plain, sometimes not.
    fn any_name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[A-Z0-9]{1,8}(\\.sst)?",
            1 => Just("../CURRENT".to_owned()),
            1 => Just("/tmp/x".to_owned()),
            1 => Just(String::new()),
            1 => Just("..".to_owned()),
            1 => "\\PC{0,12}",
        ]
    }

    fn any_part() -> impl Strategy<Value = Option<Part>> {
        let file = prop_oneof![4 => 0u32..4, 1 => any::<u32>()];
        let offset = prop_oneof![4 => 0u64..64, 1 => any::<u64>()];
        prop_oneof![
            6 => (file.clone(), offset, proptest::collection::vec(any::<u8>(), 0..24)).prop_map(
                |(file, offset, data)| Some(Part::Chunk(SnapshotChunk {
                    file,
                    offset,
                    data: data.into()
                }))
            ),
            3 => (file, prop_oneof![Just(checksum(b"")), "[0-9a-f]{0,40}"])
                .prop_map(|(file, xxh3)| Some(Part::FileEnd(SnapshotFileEnd { file, xxh3 }))),
            1 => any_manifest().prop_map(|m| Some(Part::Manifest(m))),
            1 => Just(None),
        ]
    }

    fn any_manifest() -> impl Strategy<Value = SnapshotManifest> {
        let size = prop_oneof![4 => 0u64..64, 1 => any::<u64>()];
        (
            proptest::collection::vec((any_name(), size), 0..5),
            prop_oneof![4 => 0i64..100, 1 => any::<i64>()],
            0i32..5,
        )
            .prop_map(|(files, offset, role)| SnapshotManifest {
                node_id: "peer".into(),
                role,
                changelog_offset: offset,
                input_offset: offset,
                files: files
                    .into_iter()
                    .map(|(name, bytes)| SnapshotFile { name, bytes })
                    .collect(),
            })
    }

    /// Files as a checkpoint holds them: plain names, any content (some empty).
    fn any_files() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
        proptest::collection::btree_map(
            "[A-Z0-9]{1,8}(\\.sst)?",
            proptest::collection::vec(any::<u8>(), 0..200),
            0..6,
        )
    }

    /// One way to spoil a well-formed stream.
    #[derive(Debug, Clone)]
    enum Spoil {
        Drop(usize),
        Repeat(usize),
        Swap(usize, usize),
        FlipByte(usize, usize),
        RenumberFile(usize, u32),
        ShiftOffset(usize, u64),
        WrongChecksum(usize),
        Resize(usize, u64),
    }

    fn spoil(mut parts: Vec<Part>, how: &Spoil) -> Option<Vec<Part>> {
        let len = parts.len();
        match *how {
            Spoil::Drop(i) => {
                parts.remove(i % len);
            }
            Spoil::Repeat(i) => {
                let part = parts[i % len].clone();
                parts.insert(i % len, part);
            }
            Spoil::Swap(i, j) => {
                if i % len == j % len {
                    return None;
                }
                parts.swap(i % len, j % len);
            }
            Spoil::FlipByte(i, at) => match &mut parts[i % len] {
                Part::Chunk(chunk) => {
                    let mut data = chunk.data.to_vec();
                    let at = at % data.len();
                    data[at] ^= 0x40;
                    chunk.data = data.into();
                }
                _ => return None,
            },
            Spoil::RenumberFile(i, file) => match &mut parts[i % len] {
                Part::Chunk(SnapshotChunk { file: f, .. })
                | Part::FileEnd(SnapshotFileEnd { file: f, .. })
                    if *f != file =>
                {
                    *f = file
                }
                _ => return None,
            },
            Spoil::ShiftOffset(i, by) => match &mut parts[i % len] {
                Part::Chunk(chunk) if by != 0 => chunk.offset = chunk.offset.wrapping_add(by),
                _ => return None,
            },
            Spoil::WrongChecksum(i) => match &mut parts[i % len] {
                Part::FileEnd(end) => end.xxh3 = checksum(end.xxh3.as_bytes()),
                _ => return None,
            },
            Spoil::Resize(i, bytes) => match &mut parts[0] {
                Part::Manifest(manifest) if !manifest.files.is_empty() => {
                    let n = manifest.files.len();
                    let file = &mut manifest.files[i % n];
                    if file.bytes == bytes {
                        return None;
                    }
                    file.bytes = bytes;
                }
                _ => return None,
            },
        }
        Some(parts)
    }

    fn any_spoil() -> impl Strategy<Value = Spoil> {
        let i = any::<usize>();
        prop_oneof![
            i.prop_map(Spoil::Drop),
            i.prop_map(Spoil::Repeat),
            (i, i).prop_map(|(a, b)| Spoil::Swap(a, b)),
            (i, i).prop_map(|(a, b)| Spoil::FlipByte(a, b)),
            (i, 0u32..8).prop_map(|(a, f)| Spoil::RenumberFile(a, f)),
            (i, any::<u64>()).prop_map(|(a, by)| Spoil::ShiftOffset(a, by)),
            i.prop_map(Spoil::WrongChecksum),
            (i, 0u64..300).prop_map(|(a, b)| Spoil::Resize(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn the_check_never_panics_on_any_stream(
            first in any_part(),
            rest in proptest::collection::vec(any_part(), 0..16),
        ) {
            if let Ok(mut check) = SnapshotCheck::start(first, &LIMITS) {
                for part in rest.into_iter().flatten() {
                    if check.accept(&part).is_err() {
                        return Ok(());
                    }
                }
                let _ = check.finish();
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn any_stream_is_received_or_refused_leaving_nothing_behind(
            first in any_part(),
            rest in proptest::collection::vec(any_part(), 0..12),
        ) {
            let root = tempfile::tempdir().unwrap();
            let parts: Vec<Option<Part>> = std::iter::once(first).chain(rest).collect();
            match receive_now(parts, root.path(), &LIMITS) {
                Ok(manifest) => {
                    // Accepted: exactly the manifest's files, nothing beside the directory.
                    prop_assert_eq!(entries(root.path()), vec!["incoming".to_owned()]);
                    let mut names: Vec<String> =
                        manifest.files.iter().map(|f| f.name.clone()).collect();
                    names.sort();
                    prop_assert_eq!(entries(&root.path().join("incoming")), names);
                }
                Err(_) => prop_assert!(entries(root.path()).is_empty()),
            }
        }

        #[test]
        fn a_well_formed_stream_is_accepted_byte_exactly(
            files in any_files(),
            chunk in 1usize..64,
        ) {
            let root = tempfile::tempdir().unwrap();
            let parts = stream_of(&files, chunk).into_iter().map(Some).collect();
            let manifest = receive_now(parts, root.path(), &LIMITS).unwrap();
            prop_assert_eq!(manifest.files.len(), files.len());
            let dir = root.path().join("incoming");
            prop_assert_eq!(entries(&dir), files.keys().cloned().collect::<Vec<_>>());
            for (name, data) in &files {
                prop_assert_eq!(&std::fs::read(dir.join(name)).unwrap(), data);
            }
        }

        #[test]
        fn a_spoiled_stream_is_refused_and_leaves_nothing(
            files in any_files(),
            chunk in 1usize..64,
            how in any_spoil(),
        ) {
            let Some(parts) = spoil(stream_of(&files, chunk), &how) else {
                return Ok(());
            };
            let root = tempfile::tempdir().unwrap();
            let received = receive_now(parts.into_iter().map(Some).collect(), root.path(), &LIMITS);
            prop_assert!(received.is_err(), "{:?} was accepted", how);
            prop_assert!(entries(root.path()).is_empty());
        }
    }
}
