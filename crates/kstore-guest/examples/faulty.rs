//! A module that misbehaves on purpose, for kstore's tests of the node's limits. It appends
//! each record's value to the key's value, except for these values:
//!
//! - `panic`: panics (a trap, with a message);
//! - `loop`: never returns (runs out of fuel);
//! - `hog`: allocates without bound (exceeds the memory cap);
//! - `recurse`: recurses without bound (overflows the stack);
//! - `malformed`, `failed`: refuses the record;
//! - `delete`: deletes the key; `same`: leaves it unchanged;
//! - `output:NAME`: writes the record to the output NAME;
//! - `headers`: stores the record's topic, partition, offset, timestamp and headers.

use kstore_guest::{Error, FoldResult, Outcome, Record};

fn faulty(record: &Record<'_>, current: Option<&[u8]>) -> FoldResult {
    let value = record.value.unwrap_or_default();
    match value {
        b"panic" => panic!("asked to panic at offset {}", record.offset),
        b"loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        b"hog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        b"recurse" => Ok(Outcome::put(recurse(std::hint::black_box(1)).to_le_bytes())),
        b"malformed" => Err(Error::Malformed("asked to refuse it".into())),
        b"failed" => Err(Error::Failed("asked to fail".into())),
        b"delete" => Ok(Outcome::delete()),
        b"same" => Ok(Outcome::unchanged()),
        b"headers" => {
            let mut text = format!(
                "{}/{}/{}/{:?}",
                record.topic, record.partition, record.offset, record.timestamp_ms
            );
            for header in &record.headers {
                let value = header.value.map(String::from_utf8_lossy);
                text.push_str(&format!(" {}={value:?}", header.key));
            }
            Ok(Outcome::put(text))
        }
        _ => {
            if let Some(name) = value.strip_prefix(b"output:") {
                let name = String::from_utf8_lossy(name).into_owned();
                return Ok(Outcome::unchanged().with_output(name, record.key, value));
            }
            let mut state = current.unwrap_or_default().to_vec();
            state.extend_from_slice(value);
            Ok(Outcome::put(state))
        }
    }
}

fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    if frame[0] == u64::MAX {
        return 0;
    }
    recurse(frame[0] + 1) + frame[63]
}

kstore_guest::export_fold!(faulty);
