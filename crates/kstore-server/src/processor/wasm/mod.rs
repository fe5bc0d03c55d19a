//! Processors loaded at run time as WebAssembly modules (wasmtime, cranelift), written with
//! `kstore-guest` and named in the configuration: `processor = { wasm = "module.wasm" }`.
//!
//! A module imports nothing, so its fold is deterministic by construction: no clock, no
//! randomness, no I/O; the record's topic, partition, offset, timestamp and headers are its
//! inputs, NaNs are canonical and relaxed SIMD deterministic. Each call runs under limits:
//! fuel per record (about one unit per WebAssembly instruction, so a record's cost does not
//! depend on the machine) and a cap on the module's linear memory. A call that traps, runs
//! out of fuel or exceeds the memory cap dead-letters its record with the reason (a panic's
//! message included) and the instance is replaced by a fresh one. A module that faults
//! `max-faults-in-a-row` times in a row on one partition, or cannot be instantiated, makes
//! the processor [`ProcessError::Unavailable`] for that partition: its copy fails and is
//! retried, and the node and its other partitions go on.
//!
//! The bytes that cross the boundary are `kstore_guest::abi`'s.

mod module;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kstore_guest::abi;
use serde::{Deserialize, Serialize};

pub use module::{LoadedModule, ModuleError, sha256_hex};

use super::{InputRecord, Outcome, OutputRecord, ProcessError, Processor, Update};
use module::{Live, trap_reason};

/// The `processor` table that names a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct WasmConfig {
    /// The module file (`.wasm`), built with `kstore-guest`.
    pub wasm: PathBuf,
    /// The topic of each output the module writes to, by the output's name. A record for a
    /// name not here is dead-lettered.
    pub outputs: BTreeMap<String, String>,
    /// The fuel one record may use: about one unit per WebAssembly instruction executed.
    pub fuel_per_record: u64,
    /// The most linear memory the module may have, in bytes.
    pub max_memory_bytes: u64,
    /// How many records in a row of one partition may fault (trap, run out of fuel, exceed
    /// the memory) before the module counts as broken there: that record is not
    /// dead-lettered, and the partition's copy fails and is retried.
    pub max_faults_in_a_row: u32,
    /// Fold with this module even where a later version took over (which a partition's
    /// changelog records): the module takes over again from each partition's next record.
    /// Without it, a partition a later module folded is not folded with an earlier one: its
    /// input waits, and its copy's error names both versions (`processor::versions`).
    pub rollback: bool,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            wasm: PathBuf::new(),
            outputs: BTreeMap::new(),
            fuel_per_record: 100_000_000,
            max_memory_bytes: 64 << 20,
            max_faults_in_a_row: 100,
            rollback: false,
        }
    }
}

/// Why a module's settings cannot work: the key (below `processor.`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmConfigError {
    /// The key, such as `fuel-per-record`.
    pub key: String,
    /// Why.
    pub reason: String,
}

impl WasmConfig {
    /// Checks the settings (not the module file: [`LoadedModule::load`] does).
    pub fn validate(&self) -> Result<(), WasmConfigError> {
        let invalid = |key: &str, reason: &str| {
            Err(WasmConfigError {
                key: key.into(),
                reason: reason.into(),
            })
        };
        if self.wasm.as_os_str().is_empty() {
            return invalid("wasm", "must name the module file");
        }
        if self.fuel_per_record < 1_000 {
            return invalid("fuel-per-record", "must be at least 1000");
        }
        if !(1 << 20..=4 << 30).contains(&self.max_memory_bytes) {
            return invalid("max-memory-bytes", "must be between 1 MiB and 4 GiB");
        }
        if self.max_faults_in_a_row == 0 {
            return invalid("max-faults-in-a-row", "must be at least 1");
        }
        if let Some((name, _)) = self
            .outputs
            .iter()
            .find(|(name, topic)| name.is_empty() || topic.is_empty())
        {
            return invalid(
                &format!("outputs.{name}"),
                "output names and topics must not be empty",
            );
        }
        Ok(())
    }

    /// The limits of the module's calls.
    pub fn limits(&self) -> WasmLimits {
        WasmLimits {
            fuel_per_record: self.fuel_per_record,
            max_memory_bytes: self.max_memory_bytes,
            max_faults_in_a_row: self.max_faults_in_a_row,
        }
    }
}

/// The limits a module's calls run under (see [`WasmConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WasmLimits {
    /// Fuel per record.
    pub fuel_per_record: u64,
    /// The most linear memory, in bytes.
    pub max_memory_bytes: u64,
    /// Faults in a row on one partition before the module counts as broken there.
    pub max_faults_in_a_row: u32,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmConfig::default().limits()
    }
}

/// A processor that runs a WebAssembly module's fold.
pub struct WasmProcessor {
    module: LoadedModule,
    outputs: BTreeMap<String, String>,
    /// The instance, until a fault drops it; the next call makes a fresh one.
    live: Option<Live>,
    /// Faults in a row per partition.
    faults: HashMap<i32, u32>,
    /// The batch's bytes, reused from call to call.
    batch: Vec<u8>,
}

impl std::fmt::Debug for WasmProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmProcessor")
            .field("module", &self.module)
            .field("outputs", &self.outputs)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

/// Why a call into the module returned no results.
enum CallError {
    /// The module cannot be instantiated: no record can be folded now.
    Unavailable(String),
    /// The call trapped, ran out of fuel, exceeded the memory cap or returned results that
    /// do not decode: the module's fault, in words. The instance is dropped.
    Fault(String),
}

impl WasmProcessor {
    /// Loads the module the configuration names.
    pub fn from_config(config: &WasmConfig) -> Result<Self, ModuleError> {
        let module = LoadedModule::load(&config.wasm, config.limits())?;
        Ok(Self::new(module, config.outputs.clone()))
    }

    /// A processor running `module`, whose outputs go to the topics `outputs` maps them to.
    pub fn new(module: LoadedModule, outputs: BTreeMap<String, String>) -> Self {
        tracing::info!(
            module = %module.path().display(),
            digest = module.digest(),
            compile_ms = module.compile_time().as_millis() as u64,
            "WebAssembly processor loaded"
        );
        WasmProcessor {
            module,
            outputs,
            live: None,
            faults: HashMap::new(),
            batch: Vec::new(),
        }
    }

    /// The module this processor runs.
    pub fn module(&self) -> &LoadedModule {
        &self.module
    }

    /// The module's file.
    pub fn path(&self) -> &Path {
        self.module.path()
    }

    /// Folds several records in one call into the module, each with its key's current value;
    /// no two may have the same key. Returns one result per record, in order. A fault of the
    /// call is narrowed down by calling again record by record, so that only the records
    /// that fault on their own are dead-lettered.
    fn fold_batch(
        &mut self,
        batch: &[(InputRecord<'_>, Option<&[u8]>)],
    ) -> Vec<Result<Outcome, ProcessError>> {
        debug_assert!(
            batch
                .iter()
                .enumerate()
                .all(|(i, (a, _))| batch[..i].iter().all(|(b, _)| a.key != b.key)),
            "a batch holds no two records of one key"
        );
        if batch.len() > 1 {
            match self.call(batch) {
                Ok(results) => {
                    return batch
                        .iter()
                        .zip(results)
                        .map(|((record, _), result)| self.finish(record, Ok(result)))
                        .collect();
                }
                Err(CallError::Unavailable(reason)) => {
                    let error = ProcessError::Unavailable(reason);
                    return batch.iter().map(|_| Err(error.clone())).collect();
                }
                Err(CallError::Fault(_)) => {}
            }
        }
        batch
            .iter()
            .map(|one| match self.call(std::slice::from_ref(one)) {
                Ok(mut results) => {
                    let result = results.pop().expect("decode_results checked the count");
                    self.finish(&one.0, Ok(result))
                }
                Err(CallError::Unavailable(reason)) => Err(ProcessError::Unavailable(reason)),
                Err(CallError::Fault(reason)) => self.finish(&one.0, Err(reason)),
            })
            .collect()
    }

    /// Calls the module with a batch: writes it where `kstore_input` says, folds it with the
    /// batch's fuel, and decodes the results.
    fn call(
        &mut self,
        batch: &[(InputRecord<'_>, Option<&[u8]>)],
    ) -> Result<Vec<abi::FoldResult>, CallError> {
        let live = match &mut self.live {
            Some(live) => live,
            empty => empty.insert(self.module.instantiate().map_err(|reason| {
                CallError::Unavailable(format!(
                    "cannot instantiate the module {}: {reason}",
                    self.module.path().display()
                ))
            })?),
        };
        self.batch.clear();
        let records: Vec<abi::Record<'_>> = batch.iter().map(|(r, _)| guest_record(r)).collect();
        abi::encode_batch(
            &mut self.batch,
            records
                .iter()
                .zip(batch)
                .map(|(r, (_, current))| (r, *current)),
        );
        let limits = self.module.limits();
        let result = call_live(live, &self.batch, batch.len(), limits);
        if result.is_err() {
            // A fault can leave the module's memory in any state: start afresh.
            self.live = None;
        }
        result.map_err(CallError::Fault)
    }

    /// Counts the record's fault or success, and turns the module's result into the
    /// processor's.
    fn finish(
        &mut self,
        record: &InputRecord<'_>,
        result: Result<abi::FoldResult, String>,
    ) -> Result<Outcome, ProcessError> {
        let result = match result {
            Ok(result) => {
                self.faults.remove(&record.partition);
                result
            }
            Err(fault) => {
                let max = self.module.limits().max_faults_in_a_row;
                let faults = self.faults.entry(record.partition).or_default();
                *faults += 1;
                if *faults >= max {
                    // The next record gets one try: one more fault and the copy fails again.
                    *faults = max - 1;
                    return Err(ProcessError::Unavailable(format!(
                        "the module {} faulted on {max} records in a row of partition {}; \
                         the last, at offset {}: {fault}",
                        self.module.path().display(),
                        record.partition,
                        record.offset
                    )));
                }
                return Err(ProcessError::Failed(format!("the module {fault}")));
            }
        };
        let outcome = result.map_err(|error| match error {
            abi::Error::Malformed(reason) => ProcessError::Malformed(reason),
            abi::Error::Failed(reason) => ProcessError::Failed(reason),
        })?;
        let mut outputs = Vec::with_capacity(outcome.outputs.len());
        for output in outcome.outputs {
            let Some(topic) = self.outputs.get(&output.name) else {
                return Err(ProcessError::Failed(format!(
                    "the module wrote to output {:?}, which processor.outputs does not map \
                     to a topic",
                    output.name
                )));
            };
            outputs.push(OutputRecord {
                topic: topic.clone(),
                key: output.key,
                value: output.value,
            });
        }
        let update = match outcome.update {
            abi::Update::Unchanged => Update::Unchanged,
            abi::Update::Put(value) => Update::Put(value),
            abi::Update::Delete => Update::Delete,
        };
        Ok(Outcome { update, outputs })
    }
}

impl Processor for WasmProcessor {
    fn process(
        &mut self,
        record: &InputRecord<'_>,
        current: Option<&[u8]>,
    ) -> Result<Outcome, ProcessError> {
        self.fold_batch(&[(*record, current)])
            .pop()
            .expect("one result per record")
    }

    fn process_batch(
        &mut self,
        batch: &[(InputRecord<'_>, Option<&[u8]>)],
    ) -> Vec<Result<Outcome, ProcessError>> {
        self.fold_batch(batch)
    }

    fn version(&self) -> Option<&str> {
        Some(self.module.digest())
    }
}

/// The record as the guest ABI carries it.
fn guest_record<'a>(record: &InputRecord<'a>) -> abi::Record<'a> {
    abi::Record {
        topic: record.topic,
        // Kafka's partitions are never negative.
        partition: u32::try_from(record.partition).unwrap_or(u32::MAX),
        offset: record.offset,
        timestamp_ms: record.timestamp_ms,
        key: record.key,
        value: record.value,
        headers: record
            .headers
            .iter()
            .map(|h| abi::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
    }
}

/// One call into a live instance: the batch in, the results out, or the fault in words.
fn call_live(
    live: &mut Live,
    batch: &[u8],
    records: usize,
    limits: WasmLimits,
) -> Result<Vec<abi::FoldResult>, String> {
    let fuel = limits.fuel_per_record.saturating_mul(records as u64);
    live.store
        .set_fuel(fuel)
        .map_err(|error| format!("could not be given fuel: {error}"))?;
    live.store.data_mut().limiter.refused = false;
    let len = i32::try_from(batch.len())
        .map_err(|_| format!("cannot take a batch of {} bytes", batch.len()))?;
    let fault = |live: &mut Live, error: anyhow::Error| fault_reason(live, &error, limits);
    let at = live
        .input
        .call(&mut live.store, len)
        .map_err(|error| fault(live, error))?;
    live.memory
        .write(&mut live.store, at as u32 as usize, batch)
        .map_err(|_| format!("gave a batch buffer outside its memory (at {at})"))?;
    let packed = live
        .fold
        .call(&mut live.store, len)
        .map_err(|error| fault(live, error))?;
    let (ptr, len) = abi::unpack(packed);
    let results = live
        .memory
        .data(&live.store)
        .get(ptr as usize..ptr as usize + len as usize)
        .ok_or_else(|| format!("returned results outside its memory ({len} bytes at {ptr})"))?;
    abi::decode_results(results, records)
        .map_err(|error| format!("returned results that do not decode: {error}"))
}

/// Describes why a call failed: out of fuel, over the memory cap, or a trap with the
/// module's panic message when it left one.
fn fault_reason(live: &mut Live, error: &anyhow::Error, limits: WasmLimits) -> String {
    if live.store.data().limiter.refused {
        return format!(
            "exceeded processor.max-memory-bytes ({} bytes)",
            limits.max_memory_bytes
        );
    }
    if matches!(
        error.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::OutOfFuel)
    ) {
        return format!(
            "ran out of fuel (processor.fuel-per-record is {})",
            limits.fuel_per_record
        );
    }
    let trap = trap_reason(error);
    match panic_message(live) {
        Some(message) => format!("panicked: {message}"),
        None => format!("trapped: {trap}"),
    }
}

/// Reads the message the module's panic hook left, if it left one.
fn panic_message(live: &mut Live) -> Option<String> {
    let export = live.panic_message.clone()?;
    live.store.set_fuel(1_000_000).ok()?;
    let (ptr, len) = abi::unpack(export.call(&mut live.store, ()).ok()?);
    let bytes = live
        .memory
        .data(&live.store)
        .get(ptr as usize..ptr as usize + len as usize)?;
    // A message is kept short: it goes into a Kafka header.
    let message = String::from_utf8_lossy(&bytes[..bytes.len().min(1024)]).into_owned();
    (!message.is_empty()).then_some(message)
}
