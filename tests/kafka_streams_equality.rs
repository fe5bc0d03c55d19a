//! Keeps the Kafka Streams baseline (`bench/kafka-streams-baseline`) honest: fed the same
//! input, it must answer `kstore.v1.Query/Get` with the same `CustomerFeatures` as kstore.
//!
//! One input topic gets the generator's order events for a few hundred customers, then
//! hand-made records between them: valid events that exercise the edges of the JSON decoder
//! and of the fold (field order, escapes, the array form, extreme integers, negative times,
//! late events, the distinct-set cap with ties, every XXH3 input-length path), and malformed
//! records of many kinds. A kstore node (in this process) and one baseline instance (a JVM)
//! consume the topic side by side. Once both have committed the whole input, every customer
//! is read from both over gRPC: the values must be byte-for-byte equal, and equal to what
//! kstore's fold recomputes from the events. Both dead-letter topics must hold exactly the
//! malformed records (same source partition and offset, same key and value, the same kind
//! of error), and both alert topics the same alerts as the recomputation.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_core::partitioner::partition_for_key;
use kstore_proto::CUSTOMER_FEATURES_TYPE_URL;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{CustomerFeatures, GetRequest, GetResponse, get_response};
use kstore_server::config::NodeConfig;
use kstore_server::kafka::{
    DLQ_ERROR_HEADER, DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};
use kstore_server::processor::features::FeaturesProcessor;
use kstore_server::processor::{InputRecord, Processor, Update};
use kstore_testkit::TestKafka;
use kstore_testkit::baseline::{Baseline, BaselineOptions};
use kstore_testkit::process::wait_until;
use prost::Message as _;
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, producer::FutureProducer};
use tonic::transport::Channel;

const PARTITIONS: u32 = 4;
const CUSTOMERS: u32 = 300;
/// Generated events before the hand-made records, and as many after them.
const GENERATED_HALF: u64 = 3_000;
/// The whole test after the jar is built: produce, run both systems, compare.
const TEST_TIMEOUT: Duration = Duration::from_secs(240);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(150);
/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;
const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 24 * 60 * MINUTE_MS;
/// kstore's default max-value-bytes.
const MAX_VALUE_BYTES: usize = 256 << 10;

#[test]
fn kafka_streams_baseline_folds_the_same_features_as_kstore() -> Result<()> {
    // Outside the time bound: the first build downloads Kafka Streams, gRPC and protoc.
    let jar = kstore_testkit::baseline::build_jar()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        tokio::time::timeout(TEST_TIMEOUT, compare(&jar))
            .await
            .with_context(|| format!("the comparison took longer than {TEST_TIMEOUT:?}"))?
    })
}

/// One record sent to the input topic.
#[derive(Debug, Clone)]
struct Sent {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    partition: i32,
    offset: i64,
}

/// A hand-made record: what it is, and, if kstore must reject it, a part of the error.
struct Special {
    what: &'static str,
    key: Option<String>,
    value: Option<Vec<u8>>,
    rejected_with: Option<&'static str>,
}

/// Deletes the test's topics and groups when the test ends, however it ends.
struct Cleanup {
    kafka: &'static TestKafka,
    apps: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for app in &self.apps {
            if let Err(error) = self
                .kafka
                .delete_topics_with_prefix(&format!("{app}-"), Some(app))
            {
                eprintln!("could not delete the topics of {app}: {error:#}");
            }
        }
    }
}

async fn compare(jar: &Path) -> Result<()> {
    let kafka = kstore_testkit::kafka();
    let name = kafka.unique_name("equality");
    let kstore_app = format!("{name}-kstore");
    let streams_app = format!("{name}-streams");
    let _cleanup = Cleanup {
        kafka,
        apps: vec![kstore_app.clone(), streams_app.clone()],
    };
    let input = format!("{kstore_app}-orders");
    kafka.create_topic(&input, PARTITIONS).await?;
    let dir = tempfile::tempdir()?;

    // The input: generated events, the hand-made records, more generated events.
    let generator = GeneratorConfig {
        customers: CUSTOMERS,
        seed: 1_234,
        ..GeneratorConfig::default()
    };
    let mut sent = Vec::new();
    sent.extend(produce_generated(kafka, &input, &generator, 0)?);
    let specials = specials();
    let producer = kafka.producer()?;
    for special in &specials {
        sent.push(send(&producer, &input, special).await?);
    }
    sent.extend(produce_generated(
        kafka,
        &input,
        &generator,
        GENERATED_HALF,
    )?);
    let expected = Expected::of(&sent)?;
    check_labels(&specials, &sent[GENERATED_HALF as usize..], &expected)?;
    let end = kafka.end_offsets(&input, PARTITIONS)?;

    // Both systems, side by side.
    let kstore = KstoreNode::start(kafka, &kstore_app, &input, dir.path())?;
    let mut baseline = Baseline::start(
        jar,
        &BaselineOptions {
            bootstrap: kafka.bootstrap().to_owned(),
            input_topic: input.clone(),
            application_id: streams_app.clone(),
            instance_id: "streams-1".into(),
            state_dir: dir.path().join("streams-state"),
            standbys: 0,
            extra: Vec::new(),
        },
        &dir.path().join("streams-1.log"),
        Duration::from_secs(90),
    )?;
    let started = Instant::now();
    wait_until(
        CATCH_UP_TIMEOUT,
        "both systems to commit the whole input",
        || {
            ensure!(
                !kstore.thread.is_finished(),
                "the kstore node stopped:\n{}",
                kstore.log_tail()
            );
            if let Some(status) = baseline.process.try_exit()? {
                bail!(
                    "the baseline exited with {status}:\n{}",
                    baseline.process.tail()
                );
            }
            let caught_up = |group: &str| -> Result<bool> {
                let committed = kafka.committed_offsets(group, &input, PARTITIONS)?;
                Ok(committed.iter().zip(&end).all(|(c, e)| c >= e || *e == 0))
            };
            Ok(caught_up(&kstore_app)? && caught_up(&streams_app)?)
        },
    )?;
    eprintln!(
        "both systems committed {} records in {:.1?}",
        sent.len(),
        started.elapsed()
    );

    // Every customer, from both, over gRPC.
    let mut kstore_client = QueryClient::connect(format!("http://{}", kstore.grpc_address)).await?;
    let mut baseline_client =
        QueryClient::connect(format!("http://{}", baseline.grpc_address)).await?;
    let mut mismatches = Vec::new();
    let keys = expected.keys();
    for key in &keys {
        let partition = partition_for_key(key, PARTITIONS);
        // kstore applies a transaction to its store right after the commit the wait above
        // saw: its answer states how much of the input it reflects. The baseline's state
        // includes every record it processed, committed or not.
        let end = end[partition as usize];
        let from_kstore = get_when(&mut kstore_client, "kstore", key, |r| {
            r.read.as_ref().is_some_and(|read| read.input_offset >= end)
        })
        .await?;
        let from_baseline = get_when(&mut baseline_client, "the baseline", key, |_| true).await?;
        let want = expected.features.get(key);
        let kstore_value = value_of(&from_kstore, "kstore", key)?;
        let baseline_value = value_of(&from_baseline, "the baseline", key)?;
        let decode = |bytes: &Option<Vec<u8>>| -> Result<Option<CustomerFeatures>> {
            Ok(match bytes {
                Some(bytes) => Some(CustomerFeatures::decode(bytes.as_slice())?),
                None => None,
            })
        };
        let (kstore_features, baseline_features) =
            (decode(&kstore_value)?, decode(&baseline_value)?);
        if kstore_features.as_ref() != want || baseline_features.as_ref() != want {
            mismatches.push(format!(
                "{}:\n  expected {want:?}\n  kstore   {kstore_features:?}\n  baseline {baseline_features:?}",
                String::from_utf8_lossy(key)
            ));
        } else if kstore_value != baseline_value {
            mismatches.push(format!(
                "{}: equal values in different bytes:\n  kstore   {kstore_value:02x?}\n  baseline {baseline_value:02x?}",
                String::from_utf8_lossy(key)
            ));
        }
        let read = from_baseline
            .read
            .context("the baseline's answer has no read metadata")?;
        ensure!(
            read.partition == partition && read.node_id == "streams-1",
            "the baseline answered for partition {} as {:?}; expected partition {partition} as streams-1",
            read.partition,
            read.node_id
        );
    }
    ensure!(
        mismatches.is_empty(),
        "{} of {} customers differ; the first:\n{}",
        mismatches.len(),
        keys.len(),
        mismatches[0]
    );
    eprintln!(
        "{} customers equal in kstore, the baseline and the recomputation ({} not found in all three)",
        keys.len(),
        keys.len() - expected.features.len()
    );

    // Dead letters: exactly the rejected records, with the same kind of error.
    let kstore_dlq = dead_letters(kafka, &format!("{kstore_app}-dlq"), &input)?;
    let streams_dlq = dead_letters(kafka, &format!("{streams_app}-dlq"), &input)?;
    let rejected: BTreeSet<(i32, i64)> = expected.rejected.keys().copied().collect();
    for (system, letters) in [("kstore", &kstore_dlq), ("the baseline", &streams_dlq)] {
        let got: BTreeSet<(i32, i64)> = letters.keys().copied().collect();
        ensure!(
            got == rejected,
            "{system}'s dead letters are from {got:?}; the rejected records are {rejected:?}"
        );
        for (at, letter) in letters.iter() {
            let record = &expected.rejected[at];
            ensure!(
                letter.key == record.key && letter.value == record.value,
                "{system}'s dead letter for {at:?} does not hold the record as it was sent"
            );
        }
    }
    for (at, letter) in &kstore_dlq {
        let theirs = &streams_dlq[at];
        ensure!(
            error_kind(&letter.error) == error_kind(&theirs.error),
            "the record at {at:?}: kstore says {:?}, the baseline {:?}",
            letter.error,
            theirs.error
        );
    }

    // Alerts: the same records, in both and in the recomputation.
    let kstore_alerts = alerts(kafka, &format!("{kstore_app}-alerts"))?;
    let streams_alerts = alerts(kafka, &format!("{streams_app}-alerts"))?;
    ensure!(!expected.alerts.is_empty(), "the input must trigger alerts");
    ensure!(
        kstore_alerts == expected.alerts,
        "kstore wrote {} alerts; the recomputation gives {}",
        kstore_alerts.len(),
        expected.alerts.len()
    );
    ensure!(
        streams_alerts == expected.alerts,
        "the baseline wrote {} alerts, kstore {}; first of the baseline's: {:?}",
        streams_alerts.len(),
        expected.alerts.len(),
        streams_alerts
            .iter()
            .find(|a| !expected.alerts.contains(a))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    );
    eprintln!(
        "{} dead letters and {} alerts equal in both",
        rejected.len(),
        expected.alerts.len()
    );

    // A JVM ends with 143 (128 + SIGTERM) once its shutdown hook has closed Kafka Streams.
    let status = baseline.process.terminate(Duration::from_secs(60))?;
    ensure!(
        status.success() || status.code() == Some(143),
        "the baseline's exit after SIGTERM: {status}:\n{}",
        baseline.process.tail()
    );
    kstore.stop()?;
    Ok(())
}

/// Sends the generator's events `skip..skip + GENERATED_HALF` and returns them as sent.
fn produce_generated(
    kafka: &TestKafka,
    topic: &str,
    generator: &GeneratorConfig,
    skip: u64,
) -> Result<Vec<Sent>> {
    let summary = produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: topic.into(),
        count: GENERATED_HALF,
        skip,
        rate: 0,
        generator: generator.clone(),
        kafka: Vec::new(),
    })?;
    ensure!(
        summary.delivered == GENERATED_HALF,
        "delivered {} of {GENERATED_HALF} events",
        summary.delivered
    );
    // One producer, keyed records, idempotence on: each partition holds its records in the
    // order they were sent, so each key's events arrive in the generator's order.
    OrderGenerator::new(generator.clone())
        .skip(skip as usize)
        .take(GENERATED_HALF as usize)
        .map(|event| {
            Ok(Sent {
                key: Some(event.customer_id.clone().into_bytes()),
                value: Some(serde_json::to_vec(&event)?),
                partition: partition_for_key(event.customer_id.as_bytes(), PARTITIONS) as i32,
                offset: -1,
            })
        })
        .collect()
}

async fn send(producer: &FutureProducer, topic: &str, special: &Special) -> Result<Sent> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic);
    if let Some(key) = &special.key {
        record = record.key(key.as_bytes());
    }
    if let Some(value) = &special.value {
        record = record.payload(value.as_slice());
    }
    let delivery = producer
        .send(record, Duration::from_secs(30))
        .await
        .map_err(|(error, _)| error)
        .with_context(|| format!("producing the record {:?}", special.what))?;
    Ok(Sent {
        key: special.key.clone().map(String::into_bytes),
        value: special.value.clone(),
        partition: delivery.partition,
        offset: delivery.offset,
    })
}

/// What both systems must end with, recomputed with kstore's processor over the records in
/// the order each partition holds them.
struct Expected {
    /// Per key, the features of every customer with at least one valid event.
    features: BTreeMap<Vec<u8>, CustomerFeatures>,
    /// Keys that only ever had rejected records: found in neither system.
    unknown: BTreeSet<Vec<u8>>,
    /// The rejected records by (partition, offset), with what kstore said.
    rejected: BTreeMap<(i32, i64), Rejected>,
    /// Every alert, as (key, value), sorted.
    alerts: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Rejected {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    error: String,
}

impl Expected {
    fn of(sent: &[Sent]) -> Result<Expected> {
        let mut processor = FeaturesProcessor::new("alerts");
        let mut values: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut unknown = BTreeSet::new();
        let mut rejected = BTreeMap::new();
        let mut alerts = Vec::new();
        for record in sent {
            // The node's own checks come before the processor's.
            let error = match &record.key {
                None => Some("record has no key".to_owned()),
                Some(_) if record.value.as_ref().map_or(0, Vec::len) > MAX_VALUE_BYTES => {
                    Some("exceeds max-value-bytes".to_owned())
                }
                Some(key) => {
                    let input = InputRecord {
                        topic: "orders",
                        partition: record.partition,
                        offset: record.offset,
                        key,
                        value: record.value.as_deref(),
                        ..InputRecord::default()
                    };
                    match processor.process(&input, values.get(key).map(Vec::as_slice)) {
                        Ok(outcome) => {
                            if let Update::Put(value) = outcome.update {
                                values.insert(key.clone(), value);
                            }
                            alerts.extend(outcome.outputs.into_iter().map(|o| (o.key, o.value)));
                            None
                        }
                        Err(error) => {
                            unknown.insert(key.clone());
                            Some(error.to_string())
                        }
                    }
                }
            };
            if let Some(error) = error {
                ensure!(
                    record.offset >= 0,
                    "kstore's processor rejects a generated event: {error}"
                );
                rejected.insert(
                    (record.partition, record.offset),
                    Rejected {
                        key: record.key.clone(),
                        value: record.value.clone(),
                        error,
                    },
                );
            }
        }
        let features = values
            .into_iter()
            .map(|(key, value)| Ok((key, CustomerFeatures::decode(value.as_slice())?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        unknown.retain(|key| !features.contains_key(key));
        alerts.sort();
        Ok(Expected {
            features,
            unknown,
            rejected,
            alerts,
        })
    }

    /// Every key to read: the customers, and the keys of only rejected records.
    fn keys(&self) -> Vec<Vec<u8>> {
        self.features.keys().chain(&self.unknown).cloned().collect()
    }
}

/// Checks that kstore's processor accepts and rejects the hand-made records as labelled, so
/// that the test's input means what it says.
fn check_labels(specials: &[Special], sent: &[Sent], expected: &Expected) -> Result<()> {
    for (special, record) in specials.iter().zip(sent) {
        let verdict = expected.rejected.get(&(record.partition, record.offset));
        match (special.rejected_with, verdict) {
            (None, None) => {}
            (Some(part), Some(rejected)) => ensure!(
                rejected.error.contains(part),
                "{}: kstore rejects it with {:?}, not with {part:?}",
                special.what,
                rejected.error
            ),
            (None, Some(rejected)) => bail!(
                "{}: meant to be valid, but kstore rejects it: {}",
                special.what,
                rejected.error
            ),
            (Some(_), None) => bail!(
                "{}: meant to be rejected, but kstore folds it",
                special.what
            ),
        }
    }
    Ok(())
}

/// An order event's JSON (serde_json's `json!`, which may order the fields its own way).
fn order(
    customer: &str,
    order_id: &str,
    t: i64,
    amount: i64,
    address: &str,
    instrument: &str,
    free: bool,
) -> String {
    serde_json::json!({
        "order_id": order_id,
        "customer_id": customer,
        "event_time_ms": t,
        "amount_cents": amount,
        "delivery_address": address,
        "payment_instrument": instrument,
        "free_delivery": free,
    })
    .to_string()
}

fn specials() -> Vec<Special> {
    let valid = |what: &'static str, key: &str, value: String| Special {
        what,
        key: Some(key.to_owned()),
        value: Some(value.into_bytes()),
        rejected_with: None,
    };
    let bad = |what: &'static str, value: Vec<u8>, error: &'static str| Special {
        what,
        key: Some("edge-ghost".to_owned()),
        value: Some(value),
        rejected_with: Some(error),
    };
    let ghost = |t: i64| order("edge-ghost", "o-ghost", t, 100, "a", "p", false);
    let not_event = "not an order event";
    let mut specials = vec![
        valid(
            "fields in reverse order, CR LF and tabs",
            "edge-layout",
            format!(
                "\r\n {{ \"free_delivery\" :\tfalse ,\r\n\"payment_instrument\":\"p1\", \
                 \"delivery_address\" : \"a1\",\"amount_cents\":100,\"event_time_ms\":{T0},\
                 \"customer_id\":\"edge-layout\",\"order_id\":\"e1\"}}\n\t "
            ),
        ),
        valid(
            "escaped field names and escapes in values",
            "edge-escapes",
            format!(
                r#"{{"order\u005fid":"e2","customer\u005Fid":"edge-\u0065scapes","event_time_ms":{},"amount_cents":0,"delivery_address":"\u00fcber \/ \"q\" \\ \ud83d\ude00 \b\f\n\r\t \u0000","payment_instrument":"","free_delivery":true}}"#,
                T0 + MINUTE_MS
            ),
        ),
        valid(
            "an array of the seven values",
            "edge-array",
            format!(r#"["e3","edge-array",{T0},-250,"addr","card",true]"#),
        ),
        valid(
            "raw UTF-8 in key and values",
            "edge-ünïcødé",
            order(
                "edge-ünïcødé",
                "e4",
                T0,
                1999,
                "Straße 1 ☃ 😀",
                "カード",
                true,
            ),
        ),
        valid(
            "the largest i64s",
            "edge-max",
            order("edge-max", "e5", i64::MAX, i64::MAX, "max", "max", false),
        ),
        valid(
            "the smallest amount and a negative time",
            "edge-min",
            order("edge-min", "e6", -1, i64::MIN, "min", "min", true),
        ),
        valid(
            "a negative time in an earlier minute",
            "edge-min",
            order("edge-min", "e7", -MINUTE_MS - 1, 0, "min2", "min", true),
        ),
        valid(
            "an event ten days on",
            "edge-late",
            order("edge-late", "e8", T0 + 10 * DAY_MS, 500, "l1", "p", false),
        ),
        valid(
            "an event older than the 7-day window",
            "edge-late",
            order("edge-late", "e9", T0, 700, "l2", "p", true),
        ),
        valid(
            "an event at the window's edge",
            "edge-late",
            order(
                "edge-late",
                "e10",
                T0 + 3 * DAY_MS + 1,
                900,
                "l3",
                "p2",
                true,
            ),
        ),
    ];
    // The distinct-set cap, with ties in last-seen time broken by hash, and the abuse rule.
    for n in 0..70 {
        specials.push(valid(
            "one of many addresses at the same time",
            "edge-cap",
            order(
                "edge-cap",
                &format!("cap-{n}"),
                T0 + if n < 40 { 0 } else { MINUTE_MS },
                n,
                &format!("cap address {n}"),
                &format!("card {}", n % 67),
                true,
            ),
        ));
    }
    // Every input-length path of XXH3-64, up to several 1 KiB blocks.
    for (n, len) in [
        0, 1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 100, 128, 129, 200, 240, 241, 300, 1024, 1025, 5000,
    ]
    .into_iter()
    .enumerate()
    {
        let address: String = (0..len)
            .map(|i| char::from(b'a' + ((i * 7 + len) % 26) as u8))
            .collect();
        specials.push(valid(
            "an address of a chosen length",
            "edge-xxh3",
            order(
                "edge-xxh3",
                &format!("x{n}"),
                T0 + n as i64 * MINUTE_MS,
                1,
                &address,
                &address,
                n % 2 == 0,
            ),
        ));
    }
    let complete = ghost(T0);
    specials.extend([
        bad("truncated JSON", br#"{"order_id": "#.to_vec(), not_event),
        bad("an empty value", Vec::new(), not_event),
        Special {
            what: "no value",
            key: Some("edge-ghost".into()),
            value: None,
            rejected_with: Some("no value"),
        },
        Special {
            what: "no key",
            key: None,
            value: Some(ghost(T0).into_bytes()),
            rejected_with: Some("record has no key"),
        },
        bad(
            "another customer's event",
            order("edge-other", "o", T0, 1, "a", "p", false).into_bytes(),
            "differs from the record key",
        ),
        bad(
            "an unknown field",
            complete.replacen('}', r#","coupon":"x"}"#, 1).into_bytes(),
            not_event,
        ),
        bad(
            "a missing field",
            complete
                .replace(r#","free_delivery":false"#, "")
                .into_bytes(),
            not_event,
        ),
        bad(
            "a field twice",
            complete
                .replacen('{', r#"{"order_id":"twice","#, 1)
                .into_bytes(),
            not_event,
        ),
        bad("a fraction", amount(&complete, "12.5"), not_event),
        bad("an exponent", amount(&complete, "1e3"), not_event),
        bad("minus zero", amount(&complete, "-0"), not_event),
        bad(
            "a number in a string",
            amount(&complete, "\"100\""),
            not_event,
        ),
        bad(
            "past i64::MAX",
            amount(&complete, "9223372036854775808"),
            not_event,
        ),
        bad(
            "past i64::MIN",
            amount(&complete, "-9223372036854775809"),
            not_event,
        ),
        bad("a leading zero", amount(&complete, "0123"), not_event),
        bad("a plus sign", amount(&complete, "+1"), not_event),
        bad("a lone minus", amount(&complete, "-"), not_event),
        bad("null for a number", amount(&complete, "null"), not_event),
        bad(
            "a trailing comma",
            complete.replacen('}', ",}", 1).into_bytes(),
            not_event,
        ),
        bad(
            "trailing characters",
            format!("{complete} x").into_bytes(),
            not_event,
        ),
        bad(
            "two objects",
            format!("{complete}{complete}").into_bytes(),
            not_event,
        ),
        bad(
            "a byte order mark",
            [b"\xef\xbb\xbf".as_slice(), complete.as_bytes()].concat(),
            not_event,
        ),
        bad(
            "invalid UTF-8 in a string",
            complete
                .replacen("\"a\"", "\"a\u{1}\"", 1)
                .into_bytes()
                .into_iter()
                .map(|b| if b == 1 { 0xff } else { b })
                .collect(),
            not_event,
        ),
        bad(
            "a lone leading surrogate",
            complete.replacen("\"a\"", r#""\ud800""#, 1).into_bytes(),
            not_event,
        ),
        bad(
            "a lone trailing surrogate",
            complete.replacen("\"a\"", r#""\udc00""#, 1).into_bytes(),
            not_event,
        ),
        bad(
            "a leading surrogate before a letter",
            complete
                .replacen("\"a\"", r#""\ud800\u0041""#, 1)
                .into_bytes(),
            not_event,
        ),
        bad(
            "a raw tab in a string",
            complete.replacen("\"a\"", "\"a\tb\"", 1).into_bytes(),
            not_event,
        ),
        bad(
            "an unknown escape",
            complete.replacen("\"a\"", r#""\x41""#, 1).into_bytes(),
            not_event,
        ),
        bad(
            "null for a string",
            complete.replacen("\"a\"", "null", 1).into_bytes(),
            not_event,
        ),
        bad(
            "an object for a string",
            complete
                .replacen("\"a\"", r#"{"street":"a"}"#, 1)
                .into_bytes(),
            not_event,
        ),
        bad(
            "1 for a boolean",
            complete.replacen("false", "1", 1).into_bytes(),
            not_event,
        ),
        bad(
            "TRUE for a boolean",
            complete.replacen("false", "TRUE", 1).into_bytes(),
            not_event,
        ),
        bad(
            "six values in an array",
            format!(r#"["o","edge-ghost",{T0},1,"a","p"]"#).into_bytes(),
            not_event,
        ),
        bad(
            "eight values in an array",
            format!(r#"["o","edge-ghost",{T0},1,"a","p",false,1]"#).into_bytes(),
            not_event,
        ),
        bad("JSON null", b"null".to_vec(), not_event),
        bad("a JSON string", br#""edge-ghost""#.to_vec(), not_event),
        bad(
            "a value over max-value-bytes",
            vec![b'x'; 300 << 10],
            "exceeds max-value-bytes",
        ),
    ]);
    specials
}

/// The ghost's complete event with another amount text.
fn amount(complete: &str, text: &str) -> Vec<u8> {
    complete
        .replacen(
            r#""amount_cents":100"#,
            &format!(r#""amount_cents":{text}"#),
            1,
        )
        .into_bytes()
}

/// An in-process kstore node with its log in a file (where it logs its gRPC address).
struct KstoreNode {
    thread: std::thread::JoinHandle<Result<(), kstore_server::node::NodeError>>,
    shutdown: Arc<AtomicBool>,
    grpc_address: String,
    log: PathBuf,
}

impl KstoreNode {
    fn start(kafka: &TestKafka, app: &str, input: &str, dir: &Path) -> Result<KstoreNode> {
        let log = dir.join("kstore-node.log");
        let file = File::create(&log)?;
        tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .try_init()
            .map_err(|error| anyhow::anyhow!("installing the log: {error}"))?;
        let settings: Vec<String> = vec![
            "node-id=kstore-1".into(),
            format!("app-id={app}"),
            format!("input-topic={input}"),
            format!("state-dir={}", dir.join("kstore-state").display()),
            format!("kafka.bootstrap.servers={}", kafka.bootstrap()),
            "grpc-address=127.0.0.1:0".into(),
            "metrics-address=".into(),
            "gossip-address=127.0.0.1:0".into(),
            format!("cluster-id={app}"),
        ];
        let config = NodeConfig::load(None, [], &settings)?;
        let processor =
            kstore_server::node::configured_processor(&config).expect("the built-in processor");
        let shutdown = Arc::new(AtomicBool::new(false));
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("kstore-node".into())
            .spawn(move || kstore_server::node::run(config, processor, stop))?;
        let mut grpc_address = None;
        wait_until(Duration::from_secs(60), "kstore to serve gRPC", || {
            if thread.is_finished() {
                bail!("the kstore node stopped:\n{}", tail(&log));
            }
            grpc_address = std::fs::read_to_string(&log)?
                .lines()
                .find(|l| l.contains("serving gRPC"))
                .and_then(|l| l.split("address=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .map(str::to_owned);
            Ok(grpc_address.is_some())
        })?;
        Ok(KstoreNode {
            thread,
            shutdown,
            grpc_address: grpc_address.unwrap_or_default(),
            log,
        })
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }

    fn stop(self) -> Result<()> {
        self.shutdown.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the kstore node panicked"))?
            .context("the kstore node")
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Reads a key until the answer satisfies `ready`, retrying while the system answers
/// UNAVAILABLE (a partition that is moving or restoring), for up to 30 s.
async fn get_when(
    client: &mut QueryClient<Channel>,
    system: &str,
    key: &[u8],
    ready: impl Fn(&GetResponse) -> bool,
) -> Result<GetResponse> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client
            .get(GetRequest {
                store: "features".into(),
                key: key.to_vec(),
                partition: None,
                options: None,
            })
            .await;
        let last = match answer {
            Ok(response) => {
                let response = response.into_inner();
                if ready(&response) {
                    return Ok(response);
                }
                format!("{:?}", response.read)
            }
            Err(status) if status.code() == tonic::Code::Unavailable => status.to_string(),
            Err(status) => bail!("{system}: Get {:?}: {status}", String::from_utf8_lossy(key)),
        };
        if Instant::now() > deadline {
            bail!(
                "{system}: Get {:?} was not answered as expected within 30 s; the last answer: {last}",
                String::from_utf8_lossy(key)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value bytes of an answer: `None` when not found. Both systems answer with a
/// `kstore.v1.CustomerFeatures` inside a `google.protobuf.Any`.
fn value_of(response: &GetResponse, system: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
    match (&response.value, response.found) {
        (None, false) => Ok(None),
        (Some(get_response::Value::Message(any)), true) => {
            ensure!(
                any.type_url == CUSTOMER_FEATURES_TYPE_URL,
                "{system} answered {:?} with type {}",
                String::from_utf8_lossy(key),
                any.type_url
            );
            Ok(Some(any.value.clone()))
        }
        (value, found) => bail!(
            "{system} answered {:?} with found={found} and value {value:?}",
            String::from_utf8_lossy(key)
        ),
    }
}

/// A dead letter as read back.
struct Letter {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    error: String,
}

/// Reads a dead-letter topic, by the source partition and offset in the headers.
fn dead_letters(
    kafka: &TestKafka,
    topic: &str,
    input: &str,
) -> Result<BTreeMap<(i32, i64), Letter>> {
    let mut letters = BTreeMap::new();
    for message in kafka.read_all(topic, PARTITIONS)? {
        ensure!(
            header(&message, DLQ_TOPIC_HEADER) == input,
            "a dead letter in {topic} from topic {:?}",
            header(&message, DLQ_TOPIC_HEADER)
        );
        let at = (
            header(&message, DLQ_PARTITION_HEADER).parse()?,
            header(&message, DLQ_OFFSET_HEADER).parse()?,
        );
        let letter = Letter {
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            error: header(&message, DLQ_ERROR_HEADER),
        };
        ensure!(
            letters.insert(at, letter).is_none(),
            "two dead letters in {topic} for {at:?}"
        );
    }
    Ok(letters)
}

/// What an error says, without the JSON decoder's own words (serde_json's and the baseline's
/// messages for the same fault differ).
fn error_kind(error: &str) -> &str {
    const DECODE: &str = "malformed record: not an order event: ";
    if error.starts_with(DECODE) {
        DECODE
    } else {
        error
    }
}

fn header(message: &OwnedMessage, name: &str) -> String {
    message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Every alert of a topic as (key, value), sorted.
fn alerts(kafka: &TestKafka, topic: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut alerts: Vec<(Vec<u8>, Vec<u8>)> = kafka
        .read_all(topic, PARTITIONS)?
        .iter()
        .map(|m| {
            (
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            )
        })
        .collect();
    alerts.sort();
    Ok(alerts)
}
