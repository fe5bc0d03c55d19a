//! The fold step of input records, free of Kafka and RocksDB: a record's checks (a key,
//! sizes within limits, the partition Kafka's partitioner gives its key) before the
//! processor's call against the key's current value, and the checks of what it returned.
//! The engine calls the processor for runs of records at once, and produces each outcome
//! inside its transaction, or the record's dead letter.

use kstore_core::keys::check_key;
use kstore_core::partitioner::partition_for_key;

use crate::config::MismatchPolicy;
#[cfg(test)]
use crate::processor::Processor;
use crate::processor::{InputRecord, Outcome, ProcessError, Update};

/// What a record may be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The input's partition count.
    pub partitions: u32,
    /// `max-key-bytes`.
    pub max_key_bytes: usize,
    /// `max-value-bytes`.
    pub max_value_bytes: usize,
    /// The largest key and value a Kafka record may carry (`message.max.bytes` less room
    /// for headers and framing).
    pub max_record_bytes: usize,
    /// What to do with a key that arrived on another partition than its own.
    pub partition_mismatch: MismatchPolicy,
}

/// What becomes of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Fold it: produce the update and the outputs.
    Folded(Outcome),
    /// It is bad: it goes to the dead-letter topic with this reason.
    DeadLetter(String),
    /// The processor cannot process any record now: the partition's copy fails, and the
    /// record is read again when it is retried.
    Unavailable(String),
}

/// A record's fold, and whether its key arrived on another partition than Kafka's
/// partitioner gives it (the partition it belongs to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fold {
    /// What becomes of the record.
    pub step: Step,
    /// The key's own partition, when the record arrived on another.
    pub misplaced: Option<u32>,
}

/// Checks `record`, calls the processor with the key's current value (asked of `current`
/// only once the record passed its checks) and checks what it returned: one record's whole
/// fold, as ingest makes it in steps ([`check`], the processor's batch call, [`step_of`]).
#[cfg(test)]
pub(crate) fn fold<E>(
    limits: &Limits,
    processor: &mut dyn Processor,
    record: &InputRecord<'_>,
    current: impl FnOnce(&[u8]) -> Result<Option<Vec<u8>>, E>,
) -> Result<Fold, E> {
    let misplaced = match check(limits, record) {
        Ok(misplaced) => misplaced,
        Err(decided) => return Ok(decided),
    };
    let current = current(record.key)?;
    let step = step_of(
        limits,
        record.key,
        processor.process(record, current.as_deref()),
    );
    Ok(Fold { step, misplaced })
}

/// A record's checks before the processor sees it: a key, sizes within limits, and the
/// partition Kafka's partitioner gives its key. Returns whether the key arrived on another
/// partition than its own (the partition it belongs to), or the record's fate if a check
/// decides it.
pub(crate) fn check(limits: &Limits, record: &InputRecord<'_>) -> Result<Option<u32>, Fold> {
    let dead = |reason: String| Fold {
        step: Step::DeadLetter(reason),
        misplaced: None,
    };
    if let Err(error) = check_key(record.key, limits.max_key_bytes) {
        return Err(dead(match error {
            kstore_core::keys::KeyError::Empty => "record has no key".into(),
            too_large => too_large.to_string(),
        }));
    }
    let value_len = record.value.map_or(0, <[u8]>::len);
    if value_len > limits.max_value_bytes {
        return Err(dead(format!(
            "value of {value_len} bytes exceeds max-value-bytes {}",
            limits.max_value_bytes
        )));
    }
    let expected = partition_for_key(record.key, limits.partitions);
    let misplaced = (i64::from(expected) != i64::from(record.partition)).then_some(expected);
    if misplaced.is_some() && limits.partition_mismatch == MismatchPolicy::Dlq {
        return Err(Fold {
            step: Step::DeadLetter(format!(
                "key belongs to partition {expected}, arrived on partition {}",
                record.partition
            )),
            misplaced,
        });
    }
    Ok(misplaced)
}

/// What becomes of a record of `key`, given what the processor made of it.
pub(crate) fn step_of(
    limits: &Limits,
    key: &[u8],
    processed: Result<Outcome, ProcessError>,
) -> Step {
    match processed {
        Ok(outcome) => check_outcome(limits, key, outcome),
        Err(ProcessError::Unavailable(reason)) => Step::Unavailable(reason),
        Err(error) => Step::DeadLetter(error.to_string()),
    }
}

/// Refuses an outcome that no Kafka record could carry.
fn check_outcome(limits: &Limits, key: &[u8], outcome: Outcome) -> Step {
    let too_big = |what: &str, len: usize| {
        format!("{what} of {len} bytes is larger than a Kafka record can be")
    };
    if let Update::Put(value) = &outcome.update
        && key.len() + value.len() > limits.max_record_bytes
    {
        return Step::DeadLetter(too_big("new state", key.len() + value.len()));
    }
    if let Some(output) = outcome
        .outputs
        .iter()
        .find(|o| o.key.len() + o.value.len() > limits.max_record_bytes)
    {
        return Step::DeadLetter(too_big(
            "output record",
            output.key.len() + output.value.len(),
        ));
    }
    Step::Folded(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::OutputRecord;

    /// Appends the record's value to the key's value; "unavailable" makes it unavailable,
    /// "bad" makes it fail, "huge" returns a state of 2 KiB and "alert" an output record.
    struct Append;

    impl Processor for Append {
        fn process(
            &mut self,
            record: &InputRecord<'_>,
            current: Option<&[u8]>,
        ) -> Result<Outcome, ProcessError> {
            let value = record.value.unwrap_or_default();
            let mut state = current.unwrap_or_default().to_vec();
            match value {
                b"unavailable" => return Err(ProcessError::Unavailable("gone".into())),
                b"bad" => return Err(ProcessError::Malformed("not a number".into())),
                b"huge" => state = vec![b'x'; 2048],
                _ => state.extend_from_slice(value),
            }
            let outputs = if value == b"alert" {
                vec![OutputRecord {
                    topic: "alerts".into(),
                    key: record.key.to_vec(),
                    value: vec![b'y'; 4096],
                }]
            } else {
                Vec::new()
            };
            Ok(Outcome {
                update: Update::Put(state),
                outputs,
            })
        }
    }

    fn limits() -> Limits {
        Limits {
            partitions: 12,
            max_key_bytes: 32,
            max_value_bytes: 16,
            max_record_bytes: 1024,
            partition_mismatch: MismatchPolicy::Warn,
        }
    }

    /// A record of `key` on its own partition (of 12).
    fn record<'a>(key: &'a [u8], value: &'a [u8]) -> InputRecord<'a> {
        InputRecord {
            topic: "orders",
            partition: partition_for_key(key, 12) as i32,
            offset: 7,
            key,
            value: Some(value),
            ..InputRecord::default()
        }
    }

    fn run(record: &InputRecord<'_>, current: Option<&[u8]>) -> Fold {
        let current = current.map(<[u8]>::to_vec);
        fold(&limits(), &mut Append, record, |_| Ok::<_, ()>(current)).unwrap()
    }

    #[test]
    fn a_good_record_is_folded_into_the_current_value() {
        let folded = run(&record(b"customer-1", b"b"), Some(b"a"));
        assert_eq!(
            folded,
            Fold {
                step: Step::Folded(Outcome {
                    update: Update::Put(b"ab".to_vec()),
                    outputs: Vec::new(),
                }),
                misplaced: None,
            }
        );
    }

    #[test]
    fn bad_records_are_dead_lettered_with_their_reason() {
        let cases: [(&[u8], &[u8], &str); 6] = [
            (b"", b"a", "record has no key"),
            (
                &[b'k'; 33],
                b"a",
                "key of 33 bytes exceeds max-key-bytes 32",
            ),
            (
                b"customer-1",
                &[b'v'; 17],
                "value of 17 bytes exceeds max-value-bytes 16",
            ),
            (b"customer-1", b"bad", "malformed record: not a number"),
            (
                b"customer-1",
                b"huge",
                "new state of 2058 bytes is larger than a Kafka record can be",
            ),
            (
                b"customer-1",
                b"alert",
                "output record of 4106 bytes is larger than a Kafka record can be",
            ),
        ];
        for (key, value, reason) in cases {
            let folded = run(&record(key, value), None);
            assert_eq!(folded.step, Step::DeadLetter(reason.into()), "{reason}");
        }
    }

    #[test]
    fn the_store_is_not_asked_for_a_record_that_fails_its_checks() {
        let asked = std::cell::Cell::new(false);
        let folded = fold(&limits(), &mut Append, &record(b"", b"a"), |_| {
            asked.set(true);
            Ok::<_, ()>(None)
        })
        .unwrap();
        assert!(matches!(folded.step, Step::DeadLetter(_)));
        assert!(!asked.get());
        // A store that fails fails the fold.
        let failed = fold(&limits(), &mut Append, &record(b"k", b"a"), |_| Err("io"));
        assert_eq!(failed, Err("io"));
    }

    #[test]
    fn an_unavailable_processor_is_not_the_records_fault() {
        let folded = run(&record(b"customer-1", b"unavailable"), None);
        assert_eq!(folded.step, Step::Unavailable("gone".into()));
    }

    #[test]
    fn a_misplaced_key_is_flagged_and_follows_the_policy() {
        let key = b"customer-1";
        let own = partition_for_key(key, 12);
        let mut misplaced = record(key, b"a");
        misplaced.partition = ((own + 1) % 12) as i32;
        let folded = run(&misplaced, None);
        assert_eq!(folded.misplaced, Some(own));
        assert!(matches!(folded.step, Step::Folded(_)));

        let strict = Limits {
            partition_mismatch: MismatchPolicy::Dlq,
            ..limits()
        };
        let folded = fold(&strict, &mut Append, &misplaced, |_| Ok::<_, ()>(None)).unwrap();
        assert_eq!(folded.misplaced, Some(own));
        assert_eq!(
            folded.step,
            Step::DeadLetter(format!(
                "key belongs to partition {own}, arrived on partition {}",
                misplaced.partition
            ))
        );
    }
}
