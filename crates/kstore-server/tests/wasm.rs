//! Processors as WebAssembly modules (`kstore-guest`'s examples, built by the test): the
//! features module folds byte for byte as the native processor does, in process and in a
//! node against a real broker; a module's panic, fuel exhaustion or memory hog dead-letters
//! that record with the reason; a module that faults on every record fails its partition's
//! copy and not the node; a module that does not fit the ABI is refused at start, naming the
//! file and what is wrong.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::query_client::QueryClient;
use kstore_proto::v1::{GetRequest, MetadataRequest, Role, get_response};
use kstore_server::kafka::{DLQ_ERROR_HEADER, DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER};
use kstore_server::processor::features::FeaturesProcessor;
use kstore_server::processor::wasm::{WasmConfig, WasmProcessor};
use kstore_server::processor::{
    InputRecord, Outcome, ProcessError, Processor, RecordHeader, Update,
};
use kstore_server::store::{PartitionStore, SharedMemory};
use rdkafka::Message;
use rdkafka::message::Headers;
use rdkafka::producer::FutureRecord;

use common::{Scenario, assert_exact_state, run_async};

fn module(name: &str) -> Result<PathBuf> {
    kstore_testkit::guest::module(name)
}

fn wasm_config(path: &Path) -> WasmConfig {
    WasmConfig {
        wasm: path.to_owned(),
        outputs: BTreeMap::from([("alerts".to_owned(), "alerts".to_owned())]),
        fuel_per_record: 5_000_000,
        max_memory_bytes: 16 << 20,
        max_faults_in_a_row: 5,
        ..WasmConfig::default()
    }
}

fn record<'a>(partition: i32, offset: i64, key: &'a [u8], value: &'a [u8]) -> InputRecord<'a> {
    InputRecord {
        topic: "orders",
        partition,
        offset,
        key,
        value: Some(value),
        ..InputRecord::default()
    }
}

/// Folds `inputs` (key, value) in order with `processor`, keeping each key's value; returns
/// each record's result and the final values.
type Folded = (
    Vec<Result<Outcome, ProcessError>>,
    BTreeMap<Vec<u8>, Vec<u8>>,
);

fn fold_all(processor: &mut dyn Processor, inputs: &[(Vec<u8>, Vec<u8>)]) -> Folded {
    let mut values: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut results = Vec::new();
    for (offset, (key, value)) in inputs.iter().enumerate() {
        let input = record(0, offset as i64, key, value);
        let result = processor.process(&input, values.get(key).map(Vec::as_slice));
        if let Ok(outcome) = &result {
            match &outcome.update {
                Update::Put(bytes) => {
                    values.insert(key.clone(), bytes.clone());
                }
                Update::Delete => {
                    values.remove(key);
                }
                Update::Unchanged => {}
            }
        }
        results.push(result);
    }
    (results, values)
}

fn order_inputs(count: usize, seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    OrderGenerator::new(GeneratorConfig {
        customers: 300,
        seed,
        ..GeneratorConfig::default()
    })
    .take(count)
    .map(|event| {
        (
            event.customer_id.clone().into_bytes(),
            serde_json::to_vec(&event).unwrap(),
        )
    })
    .collect()
}

#[test]
fn the_features_module_folds_byte_for_byte_as_the_native_processor() -> Result<()> {
    let mut inputs = order_inputs(5_000, 3);
    // Bad records too: both must refuse them with the same reason.
    inputs.insert(100, (b"customer-x".to_vec(), b"{\"order_id\": ".to_vec()));
    inputs.insert(200, (b"customer-y".to_vec(), b"not json".to_vec()));
    let mut native = FeaturesProcessor::new("alerts");
    let mut module = WasmProcessor::from_config(&wasm_config(&module("features")?))?;
    let (native_results, native_values) = fold_all(&mut native, &inputs);
    let (module_results, module_values) = fold_all(&mut module, &inputs);
    for (i, (n, m)) in native_results.iter().zip(&module_results).enumerate() {
        ensure!(n == m, "record {i}: native {n:?}\nmodule {m:?}");
    }
    ensure!(
        native_results.iter().filter(|r| r.is_err()).count() == 2,
        "the two bad records are refused"
    );
    ensure!(
        native_results
            .iter()
            .any(|r| r.as_ref().is_ok_and(|o| !o.outputs.is_empty())),
        "the generator's abusers trigger alerts"
    );
    ensure!(native_values == module_values, "the stored values differ");
    Ok(())
}

#[test]
fn a_batch_folds_as_its_records_one_by_one_and_a_fault_hits_only_its_record() -> Result<()> {
    let path = module("faulty")?;
    let mut batched = WasmProcessor::from_config(&wasm_config(&path))?;
    let keys: Vec<Vec<u8>> = (0..8).map(|i| format!("k{i}").into_bytes()).collect();
    let values: Vec<&[u8]> = vec![b"a", b"b", b"panic", b"c", b"failed", b"d", b"delete", b"e"];
    let current = b"x".to_vec();
    let batch: Vec<(InputRecord<'_>, Option<&[u8]>)> = keys
        .iter()
        .zip(&values)
        .enumerate()
        .map(|(i, (k, v))| (record(0, i as i64, k, v), Some(current.as_slice())))
        .collect();
    let results = batched.process_batch(&batch);
    let mut single = WasmProcessor::from_config(&wasm_config(&path))?;
    for (i, ((input, current), result)) in batch.iter().zip(&results).enumerate() {
        ensure!(
            *result == single.process(input, *current),
            "record {i}: {result:?}"
        );
    }
    ensure!(
        results[0]
            == Ok(Outcome {
                update: Update::Put(b"xa".to_vec()),
                outputs: vec![]
            })
    );
    ensure!(matches!(&results[2], Err(ProcessError::Failed(r)) if r.contains("panicked")));
    ensure!(results[4] == Err(ProcessError::Failed("asked to fail".into())));
    ensure!(
        results[6]
            .as_ref()
            .is_ok_and(|o| o.update == Update::Delete)
    );
    Ok(())
}

#[test]
fn a_panic_fuel_exhaustion_and_a_memory_hog_fail_their_record_with_the_reason() -> Result<()> {
    let mut processor = WasmProcessor::from_config(&wasm_config(&module("faulty")?))?;
    let key = b"key".as_slice();
    let cases: [(&[u8], &str); 4] = [
        (b"panic", "asked to panic at offset 7"),
        (
            b"loop",
            "ran out of fuel (processor.fuel-per-record is 5000000)",
        ),
        (
            b"hog",
            "exceeded processor.max-memory-bytes (16777216 bytes)",
        ),
        (b"recurse", "trapped"),
    ];
    for (value, reason) in cases {
        let started = std::time::Instant::now();
        let result = processor.process(&record(0, 7, key, value), None);
        let Err(ProcessError::Failed(message)) = &result else {
            bail!("{}: {result:?}", String::from_utf8_lossy(value));
        };
        ensure!(message.contains(reason), "{message:?} lacks {reason:?}");
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "a fault is bounded"
        );
        // The next record gets a fresh instance and folds.
        let next = processor.process(&record(0, 8, key, b"ok"), Some(b"so far "))?;
        ensure!(next.update == Update::Put(b"so far ok".to_vec()));
    }
    // The record's timestamp and headers are inputs.
    let headers = [
        RecordHeader {
            key: "trace",
            value: Some(b"t-1"),
        },
        RecordHeader {
            key: "empty",
            value: None,
        },
    ];
    let input = InputRecord {
        timestamp_ms: Some(1_700_000_000_000),
        headers: &headers,
        ..record(3, 42, key, b"headers")
    };
    let outcome = processor.process(&input, None)?;
    ensure!(
        outcome.update
            == Update::Put(
                b"orders/3/42/Some(1700000000000) trace=Some(\"t-1\") empty=None".to_vec()
            ),
        "{:?}",
        outcome.update
    );
    Ok(())
}

#[test]
fn a_module_faulting_on_every_record_is_unavailable_for_that_partition_only() -> Result<()> {
    let mut processor = WasmProcessor::from_config(&wasm_config(&module("faulty")?))?;
    let mut results = Vec::new();
    for offset in 0..6 {
        results.push(processor.process(&record(1, offset, b"k", b"panic"), None));
        // Another partition's good records go on meanwhile.
        processor.process(&record(0, offset, b"j", b"ok"), None)?;
    }
    for result in &results[..4] {
        ensure!(
            matches!(result, Err(ProcessError::Failed(r)) if r.contains("panicked")),
            "{result:?}"
        );
    }
    for result in &results[4..] {
        let Err(ProcessError::Unavailable(reason)) = result else {
            bail!("{result:?}");
        };
        ensure!(
            reason.contains("faulted on 5 records in a row of partition 1"),
            "{reason}"
        );
    }
    // A good record clears the count.
    processor.process(&record(1, 6, b"k", b"ok"), None)?;
    ensure!(matches!(
        processor.process(&record(1, 7, b"k", b"panic"), None),
        Err(ProcessError::Failed(_))
    ));
    Ok(())
}

/// Writes a module in WebAssembly text to a file named `name`.
fn wat_module(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, wat::parse_str(text)?)?;
    Ok(path)
}

const GOOD_EXPORTS: &str = r#"
    (memory (export "memory") 1)
    (func (export "kstore_input") (param i32) (result i32) i32.const 0)
    (func (export "kstore_fold") (param i32) (result i64) i64.const 0)
"#;

#[test]
fn modules_that_do_not_fit_the_abi_are_refused_naming_the_file_and_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let version =
        |v: i32| format!("(func (export \"kstore_abi_version\") (result i32) i32.const {v})");
    let cases = [
        (
            "no-fold.wasm",
            format!(
                "(module (memory (export \"memory\") 1) {} \
                 (func (export \"kstore_input\") (param i32) (result i32) i32.const 0))",
                version(1)
            ),
            "does not export kstore_fold as a function (i32) -> i64",
        ),
        (
            "wrong-type.wasm",
            format!(
                "(module (memory (export \"memory\") 1) {} \
                 (func (export \"kstore_input\") (param i32) (result i32) i32.const 0) \
                 (func (export \"kstore_fold\") (param i32) (result i32) i32.const 0))",
                version(1)
            ),
            "kstore_fold as a function (i32) -> i64 (kstore guest ABI 1): a function (i32) -> i32",
        ),
        (
            "imports.wasm",
            format!(
                "(module (import \"wasi_snapshot_preview1\" \"clock_time_get\" \
                 (func (param i32 i64 i32) (result i32))) {GOOD_EXPORTS} {})",
                version(1)
            ),
            "imports wasi_snapshot_preview1::clock_time_get: a kstore module may import nothing",
        ),
        (
            "no-memory.wasm",
            format!(
                "(module {} (func (export \"kstore_input\") (param i32) (result i32) i32.const 0) \
                 (func (export \"kstore_fold\") (param i32) (result i64) i64.const 0))",
                version(1)
            ),
            "does not export memory as a 32-bit memory",
        ),
        (
            "abi-2.wasm",
            format!("(module {GOOD_EXPORTS} {})", version(2)),
            "speaks kstore guest ABI version 2; this node speaks version 1",
        ),
    ];
    for (name, text, reason) in cases {
        let path = wat_module(dir.path(), name, &text)?;
        let error = WasmProcessor::from_config(&wasm_config(&path))
            .err()
            .with_context(|| format!("{name} was accepted"))?
            .to_string();
        ensure!(
            error.contains(&path.display().to_string()) && error.contains(reason),
            "{name}: {error:?} lacks {reason:?}"
        );
    }
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\x7fELF not a module")?;
    let error = WasmProcessor::from_config(&wasm_config(&garbage))
        .err()
        .context("garbage was accepted")?
        .to_string();
    ensure!(
        error.contains("garbage.wasm is not a WebAssembly module this node can run"),
        "{error}"
    );
    let missing = dir.path().join("missing.wasm");
    let error = WasmProcessor::from_config(&wasm_config(&missing))
        .err()
        .context("a missing file was accepted")?
        .to_string();
    ensure!(
        error.contains("cannot read the WebAssembly module") && error.contains("missing.wasm"),
        "{error}"
    );
    Ok(())
}

/// The arguments that make a scenario's node run `module`.
fn use_module(scenario: &mut Scenario, module: &Path, extra: &[&str]) {
    scenario
        .extra
        .push(format!("processor.wasm={}", module.display()));
    scenario.extra.extend(extra.iter().map(|s| s.to_string()));
}

fn header(message: &rdkafka::message::OwnedMessage, name: &str) -> String {
    message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

#[test]
fn a_node_running_the_features_module_stores_what_the_native_processor_would() -> Result<()> {
    run_async(async {
        let partitions = 4;
        let mut scenario = Scenario::new("wasm-features", partitions).await?;
        // A topic of its own, which the node creates as it does its alerts topic.
        let alerts_topic = format!("{}-module-alerts", scenario.app);
        use_module(
            &mut scenario,
            &module("features")?,
            &[&format!("processor.outputs.alerts={alerts_topic}")],
        );
        let count = 20_000u64;
        let generator = GeneratorConfig {
            customers: 2_000,
            seed: 9,
            ..GeneratorConfig::default()
        };
        scenario.produce(&generator, count)?;
        let events: Vec<OrderEvent> = OrderGenerator::new(generator)
            .take(count as usize)
            .collect();

        let mut node = scenario.start_node("node-1", "only")?;
        scenario.wait_caught_up(&mut node, Duration::from_secs(300))?;
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");

        // Exact against values recomputed from the events.
        assert_exact_state(&scenario, &["node-1"], &events)?;
        // Byte-equal to the native processor's fold of the same events.
        let mut native = FeaturesProcessor::new(alerts_topic.clone());
        let mut want: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut alerts = 0;
        for event in &events {
            let json = serde_json::to_vec(event)?;
            let key = event.customer_id.as_bytes();
            let input = record(0, 0, key, &json);
            let outcome = native.process(&input, want.get(key).map(Vec::as_slice))?;
            if let Update::Put(bytes) = outcome.update {
                want.insert(key.to_vec(), bytes);
            }
            alerts += outcome.outputs.len();
        }
        let config = scenario.config("node-1")?;
        let memory = SharedMemory::new(&config.memory);
        let mut stored: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for partition in 0..partitions as i32 {
            let store = PartitionStore::open(&config.store_dir(partition), &memory)?;
            stored.extend(store.scan()?);
        }
        ensure!(stored.len() == want.len(), "{} keys stored", stored.len());
        ensure!(
            stored == want,
            "the stored bytes differ from the native fold's"
        );
        let written = scenario.kafka.read_all(&alerts_topic, partitions)?;
        ensure!(
            written.len() == alerts && alerts > 0,
            "{} alerts written, the native fold emits {alerts}",
            written.len()
        );
        Ok(())
    })
}

#[test]
fn a_module_fault_dead_letters_the_record_with_the_reason() -> Result<()> {
    run_async(async {
        let partitions = 2;
        let mut scenario = Scenario::new("wasm-dlq", partitions).await?;
        use_module(
            &mut scenario,
            &module("faulty")?,
            &[
                "processor.fuel-per-record=20000000",
                "processor.max-memory-bytes=16777216",
            ],
        );
        let producer = scenario.kafka.producer()?;
        let key = "customer-wasm";
        let mut node = scenario.start_node("node-1", "only")?;
        let values: [&[u8]; 8] = [
            b"a",
            b"panic",
            b"b",
            b"loop",
            b"hog",
            b"failed",
            b"malformed",
            b"c",
        ];
        let mut sent = Vec::new();
        for value in values {
            let record = FutureRecord::<str, [u8]>::to(&scenario.input)
                .key(key)
                .payload(value);
            let (partition, offset) = producer
                .send(record, Duration::from_secs(30))
                .await
                .map(|d| (d.partition, d.offset))
                .map_err(|(e, _)| e)?;
            sent.push((partition, offset, value));
        }
        scenario.wait_caught_up(&mut node, Duration::from_secs(120))?;
        ensure!(node.try_exit()?.is_none(), "the node keeps running");

        let dlq = scenario
            .kafka
            .read_all(&format!("{}-dlq", scenario.app), partitions)?;
        let reasons: [(&[u8], &str); 5] = [
            (b"panic", "asked to panic at offset"),
            (
                b"loop",
                "ran out of fuel (processor.fuel-per-record is 20000000)",
            ),
            (
                b"hog",
                "exceeded processor.max-memory-bytes (16777216 bytes)",
            ),
            (b"failed", "asked to fail"),
            (b"malformed", "asked to refuse it"),
        ];
        ensure!(dlq.len() == reasons.len(), "{} dead letters", dlq.len());
        for (value, reason) in reasons {
            let (partition, offset, _) =
                sent.iter().find(|(_, _, v)| *v == value).context("sent")?;
            let letter = dlq
                .iter()
                .find(|m| {
                    header(m, DLQ_OFFSET_HEADER) == offset.to_string()
                        && header(m, DLQ_PARTITION_HEADER) == partition.to_string()
                })
                .with_context(|| format!("no dead letter for {partition}@{offset}"))?;
            let error = header(letter, DLQ_ERROR_HEADER);
            ensure!(error.contains(reason), "{error:?} lacks {reason:?}");
            ensure!(
                letter.payload() == Some(value),
                "the record's value is kept"
            );
            ensure!(
                letter.key() == Some(key.as_bytes()),
                "the record's key is kept"
            );
        }
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");

        let config = scenario.config("node-1")?;
        let partition = partition_for_key(key.as_bytes(), partitions) as i32;
        let store = PartitionStore::open(
            &config.store_dir(partition),
            &SharedMemory::new(&config.memory),
        )?;
        let stored: BTreeMap<Vec<u8>, Vec<u8>> = store.scan()?.into_iter().collect();
        ensure!(
            stored.get(key.as_bytes()).map(Vec::as_slice) == Some(b"abc".as_slice()),
            "the good records' state: {stored:?}"
        );
        Ok(())
    })
}

#[test]
fn a_module_failing_every_record_fails_the_partition_copy_not_the_node() -> Result<()> {
    run_async(async {
        let partitions = 2u32;
        let mut scenario = Scenario::new("wasm-broken", partitions).await?;
        use_module(
            &mut scenario,
            &module("faulty")?,
            &[
                "processor.max-faults-in-a-row=3",
                "copy-retry-initial-ms=200",
                "copy-retry-max-ms=1000",
            ],
        );
        let producer = scenario.kafka.producer()?;
        let mut node = scenario.start_node("node-1", "only")?;
        let uri = scenario.grpc_uri(&mut node)?;
        // Partition 0 gets good records; partition 1 only records the module panics on.
        for i in 0..20 {
            for (partition, value) in [(0, b"ok".as_slice()), (1, b"panic".as_slice())] {
                let key = format!("key-{i}");
                let record = FutureRecord::<str, [u8]>::to(&scenario.input)
                    .key(&key)
                    .payload(value)
                    .partition(partition);
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| e)?;
            }
        }
        let end = scenario.kafka.end_offsets(&scenario.input, partitions)?;
        kstore_testkit::process::wait_until(
            Duration::from_secs(120),
            "partition 0 to commit its input",
            || {
                ensure!(
                    node.try_exit()?.is_none(),
                    "the node stopped:\n{}",
                    node.tail()
                );
                let committed =
                    scenario
                        .kafka
                        .committed_offsets(&scenario.app, &scenario.input, partitions)?;
                Ok(committed[0] >= end[0])
            },
        )?;
        let mut client = QueryClient::connect(uri).await?;
        let mut failed = None;
        for _ in 0..200 {
            let metadata = client.metadata(MetadataRequest {}).await?.into_inner();
            let copies = &metadata.nodes.first().context("no node")?.copies;
            if let Some(copy) = copies
                .iter()
                .find(|c| c.partition == 1 && c.role() == Role::Failed)
            {
                failed = Some(copy.error.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let error = failed.context("partition 1's copy never showed as failed")?;
        ensure!(
            error.contains("faulted on 3 records in a row of partition 1"),
            "the failed copy's error: {error:?}"
        );
        let metadata = client.metadata(MetadataRequest {}).await?.into_inner();
        let zero = metadata.nodes[0]
            .copies
            .iter()
            .find(|c| c.partition == 0)
            .context("partition 0's copy")?;
        ensure!(
            zero.role() == Role::Active,
            "partition 0 is {:?}",
            zero.role()
        );
        ensure!(node.try_exit()?.is_none(), "the node keeps running");
        let committed =
            scenario
                .kafka
                .committed_offsets(&scenario.app, &scenario.input, partitions)?;
        ensure!(
            committed[1] < end[1],
            "partition 1 must not commit past the records its module cannot fold"
        );
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        Ok(())
    })
}

#[test]
fn a_node_refuses_to_start_with_a_module_that_does_not_fit() -> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("wasm-bad", 1).await?;
        let path = wat_module(
            scenario.dir.path(),
            "no-exports.wasm",
            "(module (memory (export \"memory\") 1))",
        )?;
        use_module(&mut scenario, &path, &[]);
        let mut node = scenario.start_node("node-1", "only")?;
        let status = node.wait_exit(Duration::from_secs(60))?;
        ensure!(status.code() == Some(2), "exit status {status}");
        let output = node.output();
        ensure!(
            output.contains("invalid value for `processor.wasm`")
                && output.contains(&path.display().to_string())
                && output.contains("does not export kstore_abi_version"),
            "{output}"
        );
        Ok(())
    })
}

#[test]
fn a_modules_own_protobuf_values_read_typed_and_as_json_through_reflection() -> Result<()> {
    run_async(async {
        let partitions = 3;
        let mut scenario = Scenario::new("wasm-typed", partitions).await?;
        let set = kstore_testkit::guest::tally_descriptor_set(scenario.dir.path())?;
        // Named in the config, a message the set does not define stops the node at start.
        use_module(
            &mut scenario,
            &module("tally")?,
            &[
                &format!("value-type.descriptor-set={}", set.display()),
                "value-type.message=acme.v1.Tallies",
            ],
        );
        let mut refused = scenario.start_node("node-0", "only")?;
        let status = refused.wait_exit(Duration::from_secs(60))?;
        let output = refused.output();
        ensure!(
            status.code() == Some(2)
                && output.contains("invalid value for `value-type`")
                && output.contains("defines no message acme.v1.Tallies")
                && output.contains("acme.v1.Tally"),
            "exit {status}: {output}"
        );
        scenario.extra.pop();
        scenario
            .extra
            .push("value-type.message=acme.v1.Tally".into());

        // Per key: how many records and the last value; one record stores garbage.
        let producer = scenario.kafka.producer()?;
        let mut expected: BTreeMap<String, (u64, String)> = BTreeMap::new();
        let mut garbage = None;
        for i in 0..60u64 {
            let key = format!("key-{:02}", i % 7);
            let value = if i == 30 {
                "garbage".to_owned()
            } else {
                format!("value-{i}")
            };
            let record = FutureRecord::<str, str>::to(&scenario.input)
                .key(&key)
                .payload(&value);
            let delivered = producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)?;
            if value == "garbage" {
                garbage = Some((delivered.partition, delivered.offset));
            } else {
                let entry = expected.entry(key).or_default();
                *entry = (entry.0 + 1, value);
            }
        }
        let mut node = scenario.start_node("node-1", "only")?;
        scenario.wait_caught_up(&mut node, Duration::from_secs(120))?;
        let uri = scenario.grpc_uri(&mut node)?;
        let channel = tonic::transport::Endpoint::from_shared(uri)?
            .connect()
            .await?;
        let mut query = QueryClient::new(channel.clone());

        let metadata = query.metadata(MetadataRequest {}).await?.into_inner();
        let value_type = metadata
            .stores
            .first()
            .map(|s| s.value_type.clone())
            .unwrap_or_default();
        ensure!(
            value_type == "acme.v1.Tally",
            "Metadata names {value_type:?}"
        );
        let values = kstore_cli::values::Values::described(channel, &value_type)
            .await
            .map_err(anyhow::Error::msg)?;
        for (key, (count, last)) in &expected {
            let answer = query
                .get(GetRequest {
                    store: "features".into(),
                    key: key.as_bytes().to_vec(),
                    ..GetRequest::default()
                })
                .await?
                .into_inner();
            let Some(get_response::Value::Message(any)) = answer.value else {
                bail!("{key}: not answered as a typed message: {answer:?}");
            };
            ensure!(
                any.type_url == "type.googleapis.com/acme.v1.Tally",
                "{key}: {}",
                any.type_url
            );
            // As reflection describes the type, the way grpcurl and `kstore get --json` print
            // it (uint64 as a string, in protobuf's JSON mapping).
            let json = values.json(Some(&any.value));
            let want = serde_json::json!({"count": count.to_string(), "last": last});
            ensure!(json == want, "{key}: {json} (want {want})");
        }

        // The record whose new value is not a Tally is dead-lettered with the reason, and
        // its key keeps the records before and after it.
        let (partition, offset) = garbage.context("the garbage record was not sent")?;
        let dlq = scenario
            .kafka
            .read_all(&format!("{}-dlq", scenario.app), partitions)?;
        ensure!(dlq.len() == 1, "{} dead letters", dlq.len());
        ensure!(
            header(&dlq[0], DLQ_OFFSET_HEADER) == offset.to_string()
                && header(&dlq[0], DLQ_PARTITION_HEADER) == partition.to_string(),
            "the dead letter is not the garbage record"
        );
        let reason = header(&dlq[0], DLQ_ERROR_HEADER);
        ensure!(
            reason.contains("does not decode as acme.v1.Tally"),
            "{reason}"
        );
        let status = node.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit after SIGTERM: {status}");
        Ok(())
    })
}

/// Nanoseconds per record, native against the features module, one record per call and in
/// batches. A measurement, not a check: `cargo test -p kstore-server --test wasm --
/// --ignored --nocapture nanoseconds_per_call` (see README, Benchmarks).
#[test]
#[ignore = "a measurement: run it on its own with --ignored --nocapture"]
fn nanoseconds_per_call() -> Result<()> {
    let inputs = order_inputs(50_000, 11);
    let path = module("features")?;
    let time = |label: &str, run: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        run()?; // warm up (and compile caches)
        let mut best = f64::MAX;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            run()?;
            best = best.min(started.elapsed().as_nanos() as f64 / inputs.len() as f64);
        }
        println!("{label:<40} {best:>8.0} ns/record");
        Ok(best)
    };
    let mut native = FeaturesProcessor::new("alerts");
    let native_ns = time("native FeaturesProcessor", &mut || {
        fold_all(&mut native, &inputs);
        Ok(())
    })?;
    let mut one = WasmProcessor::from_config(&wasm_config(&path))?;
    let one_ns = time("features module, 1 record per call", &mut || {
        fold_all(&mut one, &inputs);
        Ok(())
    })?;
    // Batches of distinct keys (as the ABI requires), each with the value folded so far.
    for size in [16usize, 64] {
        let mut batched = WasmProcessor::from_config(&wasm_config(&path))?;
        let ns = time(
            &format!("features module, {size} records per call"),
            &mut || {
                let mut values: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
                let mut start = 0;
                while start < inputs.len() {
                    let mut end = start;
                    let mut keys = std::collections::HashSet::new();
                    while end < inputs.len() && end - start < size && keys.insert(&inputs[end].0) {
                        end += 1;
                    }
                    let batch: Vec<(InputRecord<'_>, Option<&[u8]>)> = inputs[start..end]
                        .iter()
                        .enumerate()
                        .map(|(i, (k, v))| {
                            (
                                record(0, (start + i) as i64, k, v),
                                values.get(k).map(Vec::as_slice),
                            )
                        })
                        .collect();
                    let results = batched.process_batch(&batch);
                    let updates: Vec<(Vec<u8>, Vec<u8>)> = inputs[start..end]
                        .iter()
                        .zip(results)
                        .filter_map(|((k, _), r)| match r {
                            Ok(Outcome {
                                update: Update::Put(v),
                                ..
                            }) => Some((k.clone(), v)),
                            _ => None,
                        })
                        .collect();
                    values.extend(updates);
                    start = end;
                }
                Ok(())
            },
        )?;
        println!("  ratio to native: {:.2}", ns / native_ns);
    }
    println!("  1 per call, ratio to native: {:.2}", one_ns / native_ns);
    Ok(())
}
