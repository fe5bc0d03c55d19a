//! A module that counts records per key (a little-endian u64), and emits a `milestones`
//! output record at every thousandth. The whole processor:
//! `cargo build --release --target wasm32-unknown-unknown --example count -p kstore-guest`.

use kstore_guest::{Error, FoldResult, Outcome, Record};

fn count(record: &Record<'_>, current: Option<&[u8]>) -> FoldResult {
    let count = match current {
        Some(bytes) => u64::from_le_bytes(
            bytes
                .try_into()
                .map_err(|_| Error::Failed(format!("stored count of {} bytes", bytes.len())))?,
        ),
        None => 0,
    } + 1;
    let outcome = Outcome::put(count.to_le_bytes());
    Ok(if count % 1000 == 0 {
        outcome.with_output("milestones", record.key, count.to_string())
    } else {
        outcome
    })
}

kstore_guest::export_fold!(count);
