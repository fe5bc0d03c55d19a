//! A module whose values are a protobuf message, `acme.v1.Tally { uint64 count = 1; string
//! last = 2; }`: per key, how many records came and the last record's value (as text). It
//! writes the message's bytes by hand, so that the module needs no protobuf crate; a node
//! given the message's descriptor set (`value-type`) answers reads with it typed. A record
//! whose value is `garbage` makes it store bytes that are not the message (for kstore's test
//! that the node dead-letters such a record instead of storing them).

use kstore_guest::{Error, FoldResult, Outcome, Record};

fn tally(record: &Record<'_>, current: Option<&[u8]>) -> FoldResult {
    let value = record.value.unwrap_or_default();
    if value == b"garbage" {
        // A field tag whose varint never ends.
        return Ok(Outcome::put([0xff, 0xff]));
    }
    let count = match current {
        Some(bytes) => count_of(bytes)?,
        None => 0,
    } + 1;
    let last = String::from_utf8_lossy(value);
    let mut message = vec![0x08];
    put_varint(&mut message, count);
    message.push(0x12);
    put_varint(&mut message, last.len() as u64);
    message.extend_from_slice(last.as_bytes());
    Ok(Outcome::put(message))
}

/// Field 1 of a stored Tally (the message starts with it, as this module writes it).
fn count_of(bytes: &[u8]) -> Result<u64, Error> {
    let bad = || {
        Error::Failed(format!(
            "a stored Tally of {} bytes does not start with its count",
            bytes.len()
        ))
    };
    let (&tag, rest) = bytes.split_first().ok_or_else(bad)?;
    if tag != 0x08 {
        return Err(bad());
    }
    let mut count = 0u64;
    for (i, byte) in rest.iter().enumerate().take(10) {
        count |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(count);
        }
    }
    Err(bad())
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

kstore_guest::export_fold!(tally);
