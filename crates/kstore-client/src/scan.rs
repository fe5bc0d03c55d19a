//! Scans: a store's keys in key order, a page at a time, over every partition or one.
//!
//! A whole-store page merges the partitions: each partition's keys are fetched in pages of
//! its own (the `Scan` RPC, routed to its best copy like a Get, with the same policies,
//! fallbacks and hedging), and the smallest key among what is fetched is taken next, as
//! long as every partition that may hold a smaller one has fetched keys left; a partition
//! that has run out of fetched keys while holding more is fetched again first. Each
//! partition is first asked for about twice its share of the page, so that evenly spread
//! keys cost about one round and a skewed range a few.
//!
//! A page ends with a [`ScanToken`]: per partition, the last key the page took and the
//! input position it was read at. The next page resumes each partition after its key and
//! from a copy at least at that position (a copy behind it waits for it until the
//! deadline), so paging neither repeats nor skips a key, and never goes back in time, even
//! when the copy that served a partition moved or died in between. A scan is not one
//! snapshot of the store: a key written while it pages shows if its partition has not yet
//! been read past it (a partition read to its end is not read again).
//!
//! Keys compare as bytes, unsigned; [`crate::keys`] encodes integers and composite keys so
//! that byte order is the order meant.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use kstore_core::scan::KeyRange;
use kstore_proto::v1::{ReadOptions as WireReadOptions, ScanRequest, scan_entry};
use prost::Message as _;

use crate::error::ReadError;
use crate::routing::{self, Reply};
use crate::{Client, ReadInfo, ReadOptions};

/// The most keys one page may ask for: a page's fetched keys are held in memory.
pub const MAX_SCAN_LIMIT: usize = 10_000;

/// A page ends once its keys and values hold this many bytes, whatever its limit: what a
/// page holds in memory stays bounded (the nodes bound each partition's fetch to 3 MiB).
pub const MAX_PAGE_BYTES: usize = 16 << 20;

/// The fewest keys a partition is asked for in one fetch (unless the page wants fewer).
const MIN_FETCH: usize = 16;

/// Which keys a scan reads, and in which order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    prefix: Vec<u8>,
    from: Vec<u8>,
    to: Vec<u8>,
    descending: bool,
    partition: Option<u32>,
}

impl Scan {
    /// Every key of the store.
    pub fn all() -> Scan {
        Scan::default()
    }

    /// The keys that start with `prefix`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> Scan {
        Scan {
            prefix: prefix.into(),
            ..Scan::default()
        }
    }

    /// The keys in `[from, to)`; an empty bound leaves that side open.
    pub fn range(from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) -> Scan {
        Scan {
            from: from.into(),
            to: to.into(),
            ..Scan::default()
        }
    }

    /// The same keys, largest first.
    pub fn descending(mut self) -> Scan {
        self.descending = true;
        self
    }

    /// The same keys, of one partition only.
    pub fn partition(mut self, partition: u32) -> Scan {
        self.partition = Some(partition);
        self
    }

    /// Whether the scan goes from the largest key down.
    pub fn is_descending(&self) -> bool {
        self.descending
    }

    /// The range, checked.
    fn key_range(&self) -> Result<KeyRange, ReadError> {
        KeyRange::of_request(&self.prefix, &self.from, &self.to).map_err(|error| {
            ReadError::InvalidScan {
                what: "range",
                reason: error.to_string(),
            }
        })
    }
}

/// One key of a page and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEntry {
    /// The key.
    pub key: Vec<u8>,
    /// The stored value's bytes (a protobuf message for typed stores).
    pub value: Vec<u8>,
    /// The key's partition.
    pub partition: u32,
}

impl ScanEntry {
    /// The value as a protobuf message (such as `kstore.v1.CustomerFeatures`).
    pub fn value_as<M: prost::Message + Default>(&self) -> Result<M, ReadError> {
        M::decode(self.value.as_slice()).map_err(|error| ReadError::Decode {
            partition: self.partition,
            type_name: std::any::type_name::<M>(),
            reason: error.to_string(),
        })
    }
}

/// A page of a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanPage {
    /// The keys, in the scan's order. Fewer than the limit when the scan is complete, when
    /// they reach [`MAX_PAGE_BYTES`], or when a partition could not be fetched again in
    /// the page's time (a partition that fails before any key is taken fails the page).
    pub entries: Vec<ScanEntry>,
    /// How fresh each partition fetched for this page is, and who answered: its last
    /// fetch's staleness, as a Get states it.
    pub reads: Vec<ReadInfo>,
    /// Where the next page starts; `None` once the scan has returned every key.
    pub next: Option<ScanToken>,
}

/// Where a scan stands: the scan itself, and per partition the last key returned and the
/// input position read. Printed (`Display`) as URL-safe text, and parsed back with
/// `str::parse`; [`Client::scan_next`] resumes from it alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanToken {
    store: String,
    partitions: u32,
    scan: Scan,
    cursors: Vec<Cursor>,
}

/// Where one partition's part of a scan stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Cursor {
    partition: u32,
    /// The last key returned; `None`: none yet.
    after: Option<Vec<u8>>,
    /// Every key of the partition in the range has been returned.
    done: bool,
    /// The input position the partition was last read at (the next input offset).
    input_offset: i64,
}

impl ScanToken {
    /// The scan this token continues.
    pub fn scan(&self) -> &Scan {
        &self.scan
    }

    /// The store it scans.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// The start of `scan` over a store of `partitions` partitions.
    fn start(store: &str, partitions: u32, scan: &Scan) -> ScanToken {
        let chosen: Vec<u32> = match scan.partition {
            Some(partition) => vec![partition],
            None => (0..partitions).collect(),
        };
        ScanToken {
            store: store.to_owned(),
            partitions,
            scan: scan.clone(),
            cursors: chosen
                .into_iter()
                .map(|partition| Cursor {
                    partition,
                    ..Cursor::default()
                })
                .collect(),
        }
    }
}

/// Why a token could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a kstore scan token: {0}")]
pub struct ScanTokenError(String);

/// The token on the wire (version 1).
#[derive(Clone, PartialEq, prost::Message)]
struct TokenMessage {
    #[prost(uint32, tag = "1")]
    version: u32,
    #[prost(string, tag = "2")]
    store: String,
    #[prost(uint32, tag = "3")]
    partitions: u32,
    #[prost(bytes = "vec", tag = "4")]
    prefix: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    from: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    to: Vec<u8>,
    #[prost(bool, tag = "7")]
    descending: bool,
    #[prost(uint32, optional, tag = "8")]
    partition: Option<u32>,
    #[prost(message, repeated, tag = "9")]
    cursors: Vec<CursorMessage>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CursorMessage {
    #[prost(uint32, tag = "1")]
    partition: u32,
    #[prost(bytes = "vec", optional, tag = "2")]
    after: Option<Vec<u8>>,
    #[prost(bool, tag = "3")]
    done: bool,
    #[prost(int64, tag = "4")]
    input_offset: i64,
}

const TOKEN_VERSION: u32 = 1;

impl fmt::Display for ScanToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = TokenMessage {
            version: TOKEN_VERSION,
            store: self.store.clone(),
            partitions: self.partitions,
            prefix: self.scan.prefix.clone(),
            from: self.scan.from.clone(),
            to: self.scan.to.clone(),
            descending: self.scan.descending,
            partition: self.scan.partition,
            cursors: self
                .cursors
                .iter()
                .map(|cursor| CursorMessage {
                    partition: cursor.partition,
                    after: cursor.after.clone(),
                    done: cursor.done,
                    input_offset: cursor.input_offset,
                })
                .collect(),
        };
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(message.encode_to_vec());
        f.write_str(&text)
    }
}

impl FromStr for ScanToken {
    type Err = ScanTokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|error| ScanTokenError(format!("not URL-safe base64 ({error})")))?;
        let message = TokenMessage::decode(bytes.as_slice())
            .map_err(|error| ScanTokenError(format!("its contents do not decode ({error})")))?;
        if message.version != TOKEN_VERSION {
            return Err(ScanTokenError(format!(
                "version {} (this client reads version {TOKEN_VERSION})",
                message.version
            )));
        }
        let expected = match message.partition {
            Some(partition) if partition < message.partitions => partition..partition + 1,
            Some(partition) => {
                return Err(ScanTokenError(format!(
                    "partition {partition} of a store of {} partitions",
                    message.partitions
                )));
            }
            None => 0..message.partitions,
        };
        // Compared without building the expected list: a token is untrusted text.
        let named = message.cursors.iter().map(|c| c.partition);
        if !named.clone().eq(expected.clone()) {
            return Err(ScanTokenError(format!(
                "it names {} partitions, not partitions {} to {}",
                message.cursors.len(),
                expected.start,
                expected.end.saturating_sub(1)
            )));
        }
        Ok(ScanToken {
            store: message.store,
            partitions: message.partitions,
            scan: Scan {
                prefix: message.prefix,
                from: message.from,
                to: message.to,
                descending: message.descending,
                partition: message.partition,
            },
            cursors: message
                .cursors
                .into_iter()
                .map(|cursor| Cursor {
                    partition: cursor.partition,
                    after: cursor.after,
                    done: cursor.done,
                    input_offset: cursor.input_offset,
                })
                .collect(),
        })
    }
}

/// One partition's part of a page being merged.
#[derive(Debug)]
struct Lane {
    cursor: Cursor,
    /// Keys fetched and not yet taken, in the scan's order.
    fetched: VecDeque<(Vec<u8>, Vec<u8>)>,
    /// The last key fetched: the next fetch resumes after it.
    fetched_after: Option<Vec<u8>>,
    /// Whether the partition may hold keys past those fetched.
    more: bool,
    /// The staleness of its last fetch.
    read: Option<ReadInfo>,
}

impl Lane {
    fn new(cursor: Cursor) -> Lane {
        Lane {
            fetched_after: cursor.after.clone(),
            more: !cursor.done,
            cursor,
            fetched: VecDeque::new(),
            read: None,
        }
    }

    /// Whether the merge must fetch this partition before it can take another key.
    fn needs_fetch(&self) -> bool {
        self.fetched.is_empty() && self.more
    }

    /// Takes in a fetched page: `entries` in the range, `last` the last key the node sent.
    fn fetched(
        &mut self,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        last: Option<Vec<u8>>,
        more: bool,
        read: ReadInfo,
    ) {
        if last.is_some() {
            self.fetched_after = last;
        }
        self.more = more;
        self.fetched.extend(entries);
        self.cursor.input_offset = self.cursor.input_offset.max(read.input_offset);
        self.read = Some(read);
    }

    /// The cursor once the page is over: done if every key fetched was taken and the
    /// partition has no more.
    fn into_cursor(self) -> Cursor {
        let done = self.fetched.is_empty() && !self.more;
        Cursor {
            done,
            ..self.cursor
        }
    }
}

/// Takes keys from the lanes in the scan's order until the page holds `limit` keys or
/// [`MAX_PAGE_BYTES`], every lane is spent, or a lane must be fetched again first (it has
/// run out of fetched keys and may hold keys that come before the others' next). Returns
/// whether a lane must be fetched.
fn merge(lanes: &mut [Lane], descending: bool, limit: usize, page: &mut Vec<ScanEntry>) -> bool {
    let mut bytes: usize = page.iter().map(|e| e.key.len() + e.value.len()).sum();
    while page.len() < limit && bytes < MAX_PAGE_BYTES {
        if lanes.iter().any(Lane::needs_fetch) {
            return true;
        }
        let next = lanes
            .iter()
            .enumerate()
            .filter_map(|(index, lane)| lane.fetched.front().map(|(key, _)| (index, key)))
            .reduce(|best, candidate| {
                let comes_first = if descending {
                    candidate.1 > best.1
                } else {
                    candidate.1 < best.1
                };
                if comes_first { candidate } else { best }
            })
            .map(|(index, _)| index);
        let Some(index) = next else {
            return false;
        };
        let lane = &mut lanes[index];
        let Some((key, value)) = lane.fetched.pop_front() else {
            return false;
        };
        lane.cursor.after = Some(key.clone());
        bytes += key.len() + value.len();
        page.push(ScanEntry {
            key,
            value,
            partition: lane.cursor.partition,
        });
    }
    false
}

/// How many keys each of `fetching` partitions is asked for when the page still needs
/// `wanted`: about twice an even share, at least [`MIN_FETCH`], at most `wanted`.
fn fetch_size(wanted: usize, fetching: usize) -> usize {
    (2 * wanted)
        .div_ceil(fetching.max(1))
        .clamp(MIN_FETCH.min(wanted), wanted)
}

impl Client {
    /// Reads the first page of `scan` (at most `limit` keys, at most [`MAX_SCAN_LIMIT`]),
    /// with the client's defaults. Resume with [`Client::scan_next`] and the page's token.
    pub async fn scan(&self, scan: &Scan, limit: usize) -> Result<ScanPage, ReadError> {
        let start = ScanToken::start(&self.inner.builder.store, self.partitions(), scan);
        self.scan_page(start, limit, &ReadOptions::default()).await
    }

    /// Reads the page after `token` (at most `limit` keys), with per-read settings (the
    /// policy, timeout and hedging; `min_input_offset` is not used: the token holds each
    /// partition's position).
    pub async fn scan_next(
        &self,
        token: &ScanToken,
        limit: usize,
        options: &ReadOptions,
    ) -> Result<ScanPage, ReadError> {
        let store = &self.inner.builder.store;
        if token.store != *store || token.partitions != self.partitions() {
            return Err(ReadError::InvalidScan {
                what: "token",
                reason: format!(
                    "it continues a scan of store {:?} of {} partitions; this client reads \
                     store {store:?} of {}",
                    token.store,
                    token.partitions,
                    self.partitions()
                ),
            });
        }
        self.scan_page(token.clone(), limit, options).await
    }

    /// Reads one page from where `token` stands.
    async fn scan_page(
        &self,
        token: ScanToken,
        limit: usize,
        options: &ReadOptions,
    ) -> Result<ScanPage, ReadError> {
        if limit == 0 || limit > MAX_SCAN_LIMIT {
            return Err(ReadError::InvalidScan {
                what: "limit",
                reason: format!("{limit}: a page holds 1 to {MAX_SCAN_LIMIT} keys"),
            });
        }
        let range = token.scan.key_range()?;
        if let Some(partition) = token.scan.partition
            && partition >= token.partitions
        {
            return Err(ReadError::InvalidScan {
                what: "partition",
                reason: format!(
                    "the store has partitions 0 to {}, not {partition}",
                    token.partitions.saturating_sub(1)
                ),
            });
        }
        let ScanToken {
            store,
            partitions,
            scan,
            cursors,
        } = token;
        // The whole page has the read's timeout: each round of fetches gets what is left.
        let timeout = options
            .timeout
            .unwrap_or(self.inner.builder.request_timeout);
        let deadline = std::time::Instant::now() + timeout;
        let mut lanes: Vec<Lane> = cursors.into_iter().map(Lane::new).collect();
        let mut page = Vec::new();
        while merge(&mut lanes, scan.descending, limit, &mut page) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() && !page.is_empty() {
                break;
            }
            // Copies are planned without the positions: a copy a little behind waits for
            // its position on the node (until the deadline), which a standby that is
            // applying the changelog reaches in moments.
            let options = ReadOptions {
                min_input_offset: None,
                timeout: Some(left.max(std::time::Duration::from_millis(1))),
                ..*options
            };
            let fetching: Vec<usize> = (0..lanes.len())
                .filter(|&lane| lanes[lane].needs_fetch())
                .collect();
            let size = fetch_size(limit - page.len(), fetching.len());
            let requests: Vec<Vec<u8>> = fetching
                .iter()
                .map(|&lane| {
                    let lane = &lanes[lane];
                    // The position read before, as "reflects the record before it".
                    let min_input_offset =
                        (lane.cursor.input_offset > 0).then(|| lane.cursor.input_offset - 1);
                    ScanRequest {
                        store: store.clone(),
                        partition: lane.cursor.partition,
                        prefix: scan.prefix.clone(),
                        from: scan.from.clone(),
                        to: scan.to.clone(),
                        limit: size as u32,
                        descending: scan.descending,
                        after: lane.fetched_after.clone(),
                        options: Some(WireReadOptions {
                            min_input_offset,
                            no_forward: true,
                        }),
                        page_size: 0,
                    }
                    .encode_to_vec()
                })
                .collect();
            let items: Vec<&[u8]> = requests.iter().map(Vec::as_slice).collect();
            let lane_partitions = fetching
                .iter()
                .map(|&lane| lanes[lane].cursor.partition)
                .collect();
            let read = self.read_of(routing::Op::Scan, &items, lane_partitions, &options)?;
            let context = crate::ReadContext::new(&self.inner, &options);
            let answers =
                routing::read(&context, &self.inner.hedger, &self.inner.counters, &read).await;
            let mut failed = None;
            for (lane, answer) in fetching.into_iter().zip(answers) {
                let routed = match answer {
                    Ok(routed) => routed,
                    Err(error) => {
                        failed.get_or_insert(error);
                        continue;
                    }
                };
                let partition = routed.route.partition;
                let Reply::Scan(response) = routed.reply else {
                    return Err(ReadError::InvalidScan {
                        what: "answer",
                        reason: format!("partition {partition} answered a page with a Get"),
                    });
                };
                if response.more && response.entries.is_empty() {
                    // It would stall the merge.
                    return Err(ReadError::InvalidScan {
                        what: "answer",
                        reason: format!("partition {partition} sent no key but said it has more"),
                    });
                }
                let info = crate::read_info(response.read.unwrap_or_default(), partition);
                let last = response.entries.last().map(|entry| entry.key.clone());
                let entries = response
                    .entries
                    .into_iter()
                    .filter(|entry| range.contains(&entry.key))
                    .map(|entry| {
                        let value = match entry.value {
                            Some(scan_entry::Value::Raw(bytes)) => bytes,
                            Some(scan_entry::Value::Message(any)) => any.value,
                            None => Vec::new(),
                        };
                        (entry.key, value)
                    })
                    .collect();
                lanes[lane].fetched(entries, last, response.more, info);
            }
            if let Some(error) = failed {
                // The keys taken so far are a page (the token resumes after them); with none
                // taken, the page fails and the same token may be tried again.
                if page.is_empty() {
                    return Err(error);
                }
                break;
            }
        }
        let reads = lanes.iter().filter_map(|lane| lane.read.clone()).collect();
        let cursors: Vec<Cursor> = lanes.into_iter().map(Lane::into_cursor).collect();
        let complete = cursors.iter().all(|cursor| cursor.done);
        let next = (!complete).then_some(ScanToken {
            store,
            partitions,
            scan,
            cursors,
        });
        Ok(ScanPage {
            entries: page,
            reads,
            next,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// A fetched page: keys with their values, and whether the partition holds more.
    type Fetched = (Vec<(Vec<u8>, Vec<u8>)>, bool);

    /// A partition's keys, as its scans would fetch them.
    fn fetch(
        keys: &BTreeMap<Vec<u8>, u32>,
        partition: u32,
        after: Option<&[u8]>,
        descending: bool,
        size: usize,
    ) -> Fetched {
        let mut mine: Vec<&Vec<u8>> = keys
            .iter()
            .filter(|(_, p)| **p == partition)
            .map(|(k, _)| k)
            .collect();
        if descending {
            mine.reverse();
        }
        let rest: Vec<(Vec<u8>, Vec<u8>)> = mine
            .into_iter()
            .filter(|key| {
                after.is_none_or(|after| {
                    if descending {
                        key.as_slice() < after
                    } else {
                        key.as_slice() > after
                    }
                })
            })
            .map(|key| (key.clone(), key.clone()))
            .collect();
        let more = rest.len() > size;
        (rest.into_iter().take(size).collect(), more)
    }

    /// Pages through `keys` spread over `partitions` with the merge, as the client does
    /// (the token printed and parsed between pages); returns the keys in the order
    /// returned and the number of pages.
    fn page_through(
        keys: &BTreeMap<Vec<u8>, u32>,
        partitions: u32,
        descending: bool,
        limit: usize,
    ) -> (Vec<Vec<u8>>, usize) {
        let scan = if descending {
            Scan::all().descending()
        } else {
            Scan::all()
        };
        let mut token = ScanToken::start("s", partitions, &scan);
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            let mut lanes: Vec<Lane> = token.cursors.clone().into_iter().map(Lane::new).collect();
            let mut page = Vec::new();
            while merge(&mut lanes, descending, limit, &mut page) {
                let fetching: Vec<usize> = (0..lanes.len())
                    .filter(|&l| lanes[l].needs_fetch())
                    .collect();
                let size = fetch_size(limit - page.len(), fetching.len());
                for lane in fetching {
                    let partition = lanes[lane].cursor.partition;
                    let after = lanes[lane].fetched_after.clone();
                    let (entries, more) =
                        fetch(keys, partition, after.as_deref(), descending, size);
                    let read = ReadInfo {
                        partition,
                        node_id: "n".into(),
                        role: crate::Role::Active,
                        changelog_offset: 0,
                        input_offset: 7,
                        lag: 0,
                    };
                    let last = entries.last().map(|(key, _)| key.clone());
                    lanes[lane].fetched(entries, last, more, read);
                }
            }
            assert!(page.len() <= limit);
            seen.extend(page.into_iter().map(|entry| entry.key));
            let cursors: Vec<Cursor> = lanes.into_iter().map(Lane::into_cursor).collect();
            if cursors.iter().all(|c| c.done) {
                return (seen, pages);
            }
            let next = ScanToken {
                cursors,
                ..token.clone()
            };
            token = next.to_string().parse().expect("the token parses back");
            assert_eq!(token, next);
        }
    }

    proptest! {
        #[test]
        fn paging_returns_every_key_once_in_order(
            keys in proptest::collection::btree_map(
                proptest::collection::vec(any::<u8>(), 1..6), 0u32..5, 0..200),
            limit in 1usize..40,
            descending in any::<bool>(),
        ) {
            let (seen, pages) = page_through(&keys, 5, descending, limit);
            let mut expected: Vec<Vec<u8>> = keys.keys().cloned().collect();
            if descending {
                expected.reverse();
            }
            prop_assert_eq!(&seen, &expected);
            // Every page but the last is full.
            prop_assert_eq!(pages, expected.len().div_ceil(limit).max(1));
        }
    }

    #[test]
    fn a_token_for_another_scan_shape_or_garbage_is_refused_with_the_reason() {
        let token = ScanToken::start("features", 12, &Scan::prefix("customer-1"));
        let text = token.to_string();
        assert_eq!(text.parse::<ScanToken>().unwrap(), token);
        let error = "not a token!".parse::<ScanToken>().unwrap_err();
        assert!(error.to_string().contains("base64"), "{error}");
        let error = "AAAA".parse::<ScanToken>().unwrap_err();
        assert!(error.to_string().contains("do not decode"), "{error}");
        let future = TokenMessage {
            version: 2,
            ..TokenMessage::default()
        };
        let future =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(future.encode_to_vec());
        let error = future.parse::<ScanToken>().unwrap_err();
        assert!(error.to_string().contains("version 2"), "{error}");
        let mut short = token.clone();
        short.cursors.pop();
        let error = short.to_string().parse::<ScanToken>().unwrap_err();
        assert!(error.to_string().contains("names 11 partitions"), "{error}");
        // A token that claims billions of partitions is refused, not allocated for.
        let mut huge = token.clone();
        huge.partitions = u32::MAX;
        let error = huge.to_string().parse::<ScanToken>().unwrap_err();
        assert!(error.to_string().contains("not partitions 0 to"), "{error}");
    }

    #[test]
    fn fetches_ask_for_about_twice_a_share() {
        assert_eq!(fetch_size(100, 12), 17);
        assert_eq!(fetch_size(100, 1), 100);
        assert_eq!(fetch_size(5, 12), 5);
        assert_eq!(fetch_size(1000, 12), 167);
    }
}
