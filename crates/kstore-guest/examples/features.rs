//! kstore's built-in processor, fraud features per customer, as a module: the same fold
//! (`kstore_core::features::process`) that the node runs natively, so that both store the
//! same bytes and dead-letter the same records with the same reasons. Its alerts go to the
//! output `alerts`; map it to the alerts topic in the node's configuration:
//! `processor = { wasm = "features.wasm", outputs = { alerts = "kstore-alerts" } }`.

use kstore_core::features::{FeaturesError, process};
use kstore_guest::{Error, FoldResult, Outcome, Record};

fn features(record: &Record<'_>, current: Option<&[u8]>) -> FoldResult {
    let folded = process(record.key, record.value, current).map_err(|error| match error {
        FeaturesError::Malformed(reason) => Error::Malformed(reason),
        FeaturesError::Failed(reason) => Error::Failed(reason),
    })?;
    let outcome = Outcome::put(folded.state);
    Ok(match folded.alert {
        Some(alert) => outcome.with_output("alerts", record.key, alert),
        None => outcome,
    })
}

kstore_guest::export_fold!(features);
