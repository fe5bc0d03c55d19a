//! Keys whose bytes sort the way their values do. Stores compare keys as bytes, unsigned,
//! a shorter key first when one is a prefix of the other, so a range or a prefix scan means
//! what is meant only if the keys were encoded for it:
//!
//! - integers: fixed width, big-endian, and for signed ones the sign bit flipped
//!   ([`u64_key`], [`i64_key`]); decimal text sorts "10" before "9";
//! - composite keys (customer, then day): [`composite`] ends each part with a terminator
//!   no part's bytes can produce, so keys sort by their first part, then their second, and
//!   the encoding of leading parts is a prefix scan over every key that starts with them.
//!
//! Keys produced by other clients (a Java producer) must use the same encoding for their
//! scans to mean the same; the encodings are simple enough to write in any language.

/// Why a key does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyDecodeError {
    /// An integer key of the wrong width.
    #[error("an integer key has 8 bytes, not {0}")]
    Width(usize),
    /// A composite key that is cut short or holds a byte sequence its encoding never makes.
    #[error("not a composite key: {0}")]
    Composite(&'static str),
}

/// An unsigned integer as a key: 8 bytes, big-endian.
pub fn u64_key(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// A signed integer as a key: 8 bytes, big-endian, with the sign bit flipped so that
/// negative numbers sort before positive ones.
pub fn i64_key(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

/// The integer a [`u64_key`] encodes.
pub fn u64_of(key: &[u8]) -> Result<u64, KeyDecodeError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| KeyDecodeError::Width(key.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The integer an [`i64_key`] encodes.
pub fn i64_of(key: &[u8]) -> Result<i64, KeyDecodeError> {
    Ok((u64_of(key)? ^ (1 << 63)) as i64)
}

/// A byte inside a part that is 0 is written 0x00 0xFF; a part ends with 0x00 0x01.
const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const END_OF_PART: u8 = 0x01;

/// A key of several parts, sorting by the first part, then the second, and so on (each
/// part compared as bytes). `composite(&[a])` is a prefix of every `composite(&[a, …])`, so
/// a prefix scan with it reads every key whose first part is `a`.
pub fn composite<P: AsRef<[u8]>>(parts: &[P]) -> Vec<u8> {
    let mut key = Vec::new();
    for part in parts {
        for &byte in part.as_ref() {
            key.push(byte);
            if byte == ESCAPE {
                key.push(ESCAPED_ZERO);
            }
        }
        key.extend([ESCAPE, END_OF_PART]);
    }
    key
}

/// The parts of a [`composite`] key.
pub fn parts_of(key: &[u8]) -> Result<Vec<Vec<u8>>, KeyDecodeError> {
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let mut bytes = key.iter().copied();
    while let Some(byte) = bytes.next() {
        if byte != ESCAPE {
            part.push(byte);
            continue;
        }
        match bytes.next() {
            Some(ESCAPED_ZERO) => part.push(0),
            Some(END_OF_PART) => parts.push(std::mem::take(&mut part)),
            Some(_) => return Err(KeyDecodeError::Composite("a zero byte not escaped")),
            None => return Err(KeyDecodeError::Composite("it ends inside an escape")),
        }
    }
    if !part.is_empty() {
        return Err(KeyDecodeError::Composite("its last part has no end"));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn signed_and_unsigned_keys_sort_as_their_numbers(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(a.cmp(&b), i64_key(a).cmp(&i64_key(b)));
            prop_assert_eq!(i64_of(&i64_key(a)).unwrap(), a);
            let (a, b) = (a as u64, b as u64);
            prop_assert_eq!(a.cmp(&b), u64_key(a).cmp(&u64_key(b)));
            prop_assert_eq!(u64_of(&u64_key(a)).unwrap(), a);
        }

        #[test]
        fn composite_keys_sort_part_by_part_and_decode_back(
            a in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..4), 1..4),
            b in proptest::collection::vec(proptest::collection::vec(0u8..4, 0..4), 1..4),
        ) {
            let (key_a, key_b) = (composite(&a), composite(&b));
            prop_assert_eq!(a.cmp(&b), key_a.cmp(&key_b));
            prop_assert_eq!(parts_of(&key_a).unwrap(), a.clone());
            // Leading parts are a prefix of the whole.
            prop_assert!(key_a.starts_with(&composite(&a[..1])));
        }
    }

    #[test]
    fn malformed_keys_say_what_is_wrong() {
        assert_eq!(u64_of(b"123"), Err(KeyDecodeError::Width(3)));
        assert!(parts_of(&[b'a', 0]).is_err());
        assert!(parts_of(&[b'a', 0, 7]).is_err());
        assert!(parts_of(b"a").is_err());
    }
}
