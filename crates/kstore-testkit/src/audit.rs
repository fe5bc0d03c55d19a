//! The chaos audit: every answer a reader got is checked against the events as the input
//! topic holds them, and the topics themselves are checked for what would look like a
//! double fold.
//!
//! - **Each answer is exact for its stated position**: an answer that says it reflects the
//!   input of partition P before offset O must hold exactly the fold of its key's events at
//!   offsets below O (the generator is deterministic; the topic gives each event's offset).
//! - **Its stated lag is never understated**: a node states its lag as of when it last saw
//!   the input's end (`input_end_seen_ms`); every record the broker had acknowledged to the
//!   producer before then was below the end it saw, so the stated lag must be at least the
//!   count of those at or past O.
//! - **Time behind**: how long before the answer the first record it does not reflect was
//!   appended.
//! - **The input holds every event once**, and **no two committed changelog records of a
//!   partition carry the same input offset** (each input record changes at most one key).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, Result};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_proto::v1::CustomerFeatures;
use prost::Message as _;
use rdkafka::Message as _;
use rdkafka::message::Headers as _;

use crate::TestKafka;

/// The header of a changelog record that holds the input offset that produced it.
const INPUT_OFFSET_HEADER: &str = "kstore.input-offset";

/// One answered read, as the reader recorded it.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Which of the read keys.
    pub key: usize,
    /// The node that answered.
    pub node: String,
    /// The role of the copy that answered (`ROLE_ACTIVE`, `ROLE_STANDBY`, …).
    pub role: String,
    /// The partition the answer names.
    pub partition: u32,
    /// The next input offset it states it reflects.
    pub input_offset: i64,
    /// The lag it states.
    pub lag: i64,
    /// When its node last saw the input's end (ms since the Unix epoch; 0: never).
    pub input_end_seen_ms: i64,
    /// When the answer arrived (ms since the Unix epoch).
    pub answered_ms: i64,
    /// XXH3-64 of the value's bytes; `None` for "not found".
    pub value: Option<u64>,
}

/// What the audit found.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Answers checked.
    pub answers: u64,
    /// Answers whose value is not the fold of the events before their stated position.
    pub wrong_answers: u64,
    /// The lag an answer stated was below the true lag as of its node's look at the end.
    pub understated_lags: u64,
    /// A few of the wrong answers and understated lags, described.
    pub examples: Vec<String>,
    /// The largest lag an answer stated.
    pub max_lag: i64,
    /// The longest an answer was behind: from the append of the first record it does not
    /// reflect to the answer.
    pub max_time_behind: Duration,
    /// The answer that was furthest behind, described (empty if none was).
    pub most_behind: String,
    /// Events the input topic holds more than once.
    pub duplicate_inputs: u64,
    /// Events sent that the input topic does not hold.
    pub missing_inputs: u64,
    /// Committed changelog records whose input offset is not above the previous one of
    /// their partition (an input record whose effects committed twice).
    pub duplicate_changelog_inputs: u64,
}

/// Where each event landed.
struct Landed {
    /// Per read key: (offset, event index), by offset.
    events_of_key: Vec<Vec<(i64, u64)>>,
    /// Per partition: (offset, append time ms), by offset.
    appends: Vec<Vec<(i64, i64)>>,
}

/// Audits `answers` against the input topic `input` (whose records carry their append
/// time: created with `message.timestamp.type=LogAppendTime`), into which the first
/// `events` events of `generator` were produced, and checks the changelog `changelog`.
/// `read_keys` are the customers the reader asked for, indexed as in the answers.
#[allow(clippy::too_many_arguments)]
pub fn audit(
    kafka: &TestKafka,
    input: &str,
    changelog: &str,
    partitions: u32,
    generator: &GeneratorConfig,
    events: u64,
    acks: &kstore_cli::produce::AckLog,
    read_keys: &[String],
    answers: &[Answer],
) -> Result<Audit> {
    let mut audit = Audit::default();
    let key_index: HashMap<&str, usize> = read_keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.as_str(), i))
        .collect();
    let timeout = Duration::from_secs(60 + events / 20_000);

    // The input: where each event landed, each exactly once.
    let mut landed = Landed {
        events_of_key: vec![Vec::new(); read_keys.len()],
        appends: vec![Vec::new(); partitions as usize],
    };
    let mut seen = vec![0u8; events as usize];
    let prefix = format!("order-{}-", generator.seed);
    let mut foreign = 0u64;
    kafka.scan(input, partitions, timeout, |message| {
        let partition = message.partition() as usize;
        let append_ms = message.timestamp().to_millis().unwrap_or(0);
        landed.appends[partition].push((message.offset(), append_ms));
        let index = message
            .payload()
            .and_then(|payload| serde_json::from_slice::<OrderEvent>(payload).ok())
            .and_then(|event| {
                let n: u64 = event.order_id.strip_prefix(&prefix)?.parse().ok()?;
                Some((n, event.customer_id))
            });
        let Some((n, customer)) = index.filter(|(n, _)| *n < events) else {
            foreign += 1;
            return;
        };
        seen[n as usize] = seen[n as usize].saturating_add(1);
        if let Some(&key) = key_index.get(customer.as_str()) {
            landed.events_of_key[key].push((message.offset(), n));
        }
    })?;
    audit.duplicate_inputs = seen.iter().map(|&c| u64::from(c.saturating_sub(1))).sum();
    audit.missing_inputs = seen.iter().filter(|&&c| c == 0).count() as u64 + foreign;
    for events in &mut landed.events_of_key {
        events.sort_unstable();
    }
    for appends in &mut landed.appends {
        appends.sort_unstable();
    }
    // Per partition, the acknowledgements by time, each with the end it proves.
    let acked: Vec<Vec<(i64, i64)>> = (0..partitions as i32)
        .map(|partition| {
            let mut by_time: Vec<(i64, i64)> = acks
                .get(&partition)
                .into_iter()
                .flatten()
                .map(|&(offset, at)| (at, offset + 1))
                .collect();
            by_time.sort_unstable();
            // The end proven by time t: the largest acknowledged offset + 1 up to t.
            let mut end = 0;
            for entry in &mut by_time {
                end = end.max(entry.1);
                entry.1 = end;
            }
            by_time
        })
        .collect();

    // The changelog: input offsets strictly increase per partition.
    let mut last_input: Vec<Option<i64>> = vec![None; partitions as usize];
    kafka.scan(changelog, partitions, timeout, |message| {
        let Some(offset) = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == INPUT_OFFSET_HEADER)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<i64>().ok())
        }) else {
            return;
        };
        let last = &mut last_input[message.partition() as usize];
        if last.is_some_and(|last| offset <= last) {
            audit.duplicate_changelog_inputs += 1;
        }
        *last = Some(offset);
    })?;

    // Each answer against the fold of its key's events before its position.
    let events_by_index = events_of(generator, events, &key_index);
    let mut by_key: BTreeMap<usize, Vec<&Answer>> = BTreeMap::new();
    for answer in answers {
        by_key.entry(answer.key).or_default().push(answer);
    }
    for (key, mut key_answers) in by_key {
        key_answers.sort_by_key(|a| a.input_offset);
        let events = &landed.events_of_key[key];
        let mut state = CustomerFeatures::default();
        let mut folded = 0usize;
        let mut hash = None;
        for answer in key_answers {
            while folded < events.len() && events[folded].0 < answer.input_offset {
                let event = events_by_index
                    .get(&events[folded].1)
                    .context("an event of a read key was not regenerated")?;
                kstore_server::processor::features::fold(&mut state, event);
                folded += 1;
                hash = None;
            }
            let expected = if folded == 0 {
                None
            } else {
                Some(
                    *hash.get_or_insert_with(|| xxhash_rust::xxh3::xxh3_64(&state.encode_to_vec())),
                )
            };
            audit.answers += 1;
            audit.max_lag = audit.max_lag.max(answer.lag);
            if answer.value != expected {
                audit.wrong_answers += 1;
                if audit.examples.len() < 10 {
                    audit.examples.push(format!(
                        "{} from {} states input before offset {} of partition {} but holds \
                         {} (the fold of {folded} events was expected)",
                        read_keys[key],
                        answer.node,
                        answer.input_offset,
                        answer.partition,
                        if answer.value.is_some() {
                            "another value"
                        } else {
                            "nothing"
                        },
                    ));
                }
            }
            let partition = answer.partition as usize;
            check_lag(
                &mut audit,
                &landed.appends[partition],
                &acked[partition],
                answer,
                read_keys,
            );
        }
    }
    Ok(audit)
}

/// Checks an answer's stated lag against the records acknowledged before its node looked at
/// the input's end (`acked`: by time, with the end each proves), and measures how far
/// behind it was (`appends`: by offset, with append times).
fn check_lag(
    audit: &mut Audit,
    appends: &[(i64, i64)],
    acked: &[(i64, i64)],
    answer: &Answer,
    keys: &[String],
) {
    // The first record the answer does not reflect, and when it was appended.
    let first_missing = appends.partition_point(|(offset, _)| *offset < answer.input_offset);
    if let Some((_, appended)) = appends.get(first_missing)
        && *appended < answer.answered_ms
    {
        let behind = Duration::from_millis((answer.answered_ms - appended) as u64);
        if behind > audit.max_time_behind {
            audit.max_time_behind = behind;
            audit.most_behind = format!(
                "{} from {} ({}) of partition {} at {} states input before offset {} and lag \
                 {}; the first record it does not reflect was appended {} ms earlier",
                keys[answer.key],
                answer.node,
                answer.role,
                answer.partition,
                answer.answered_ms,
                answer.input_offset,
                answer.lag,
                behind.as_millis()
            );
        }
    }
    if answer.input_end_seen_ms <= 0 {
        return;
    }
    // Records acknowledged before the look (in an earlier millisecond) are below the end it
    // saw.
    let before_look = acked.partition_point(|(at, _)| *at < answer.input_end_seen_ms);
    let end_at_look = before_look.checked_sub(1).map_or(0, |last| acked[last].1);
    let true_lag = (end_at_look - answer.input_offset).max(0);
    if answer.lag < true_lag {
        audit.understated_lags += 1;
        if audit.examples.len() < 10 {
            audit.examples.push(format!(
                "{} from {} states lag {} at offset {} of partition {}, but {true_lag} \
                 records had been acknowledged to the producer before its look at the end",
                keys[answer.key], answer.node, answer.lag, answer.input_offset, answer.partition
            ));
        }
    }
}

/// Regenerates the events among the first `events` whose customer is one of `keys`, by
/// index (the `n` of their order id).
fn events_of(
    generator: &GeneratorConfig,
    events: u64,
    keys: &HashMap<&str, usize>,
) -> HashMap<u64, OrderEvent> {
    OrderGenerator::new(generator.clone())
        .take(events as usize)
        .enumerate()
        .filter(|(_, event)| keys.contains_key(event.customer_id.as_str()))
        .map(|(n, event)| (n as u64, event))
        .collect()
}
