//! Key ranges for scans. Keys compare as bytes (unsigned, shorter first on a common
//! prefix), so a range means what its users mean only if their keys' bytes sort the way they
//! do: fixed-width big-endian integers, and composite keys of fixed-width parts or of parts
//! that end in a separator no part contains.

/// The keys in `[from, to)`; `None` leaves that side unbounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key that may be in it.
    pub from: Option<Vec<u8>>,
    /// The first key past it.
    pub to: Option<Vec<u8>>,
}

/// A range that cannot be scanned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Both a prefix and a bound were given.
    #[error("give a prefix or a range (from, to), not both")]
    PrefixAndRange,
    /// `from` is after `to`.
    #[error("the range's from ({from}) is after its to ({to})")]
    Inverted {
        /// `from`, printed.
        from: String,
        /// `to`, printed.
        to: String,
    },
}

impl KeyRange {
    /// The keys that start with `prefix` (every key, for an empty one).
    pub fn with_prefix(prefix: &[u8]) -> KeyRange {
        KeyRange {
            from: (!prefix.is_empty()).then(|| prefix.to_vec()),
            to: prefix_end(prefix),
        }
    }

    /// The keys in `[from, to)`; an empty bound is no bound.
    pub fn between(from: &[u8], to: &[u8]) -> Result<KeyRange, RangeError> {
        if !from.is_empty() && !to.is_empty() && from > to {
            return Err(RangeError::Inverted {
                from: printable(from),
                to: printable(to),
            });
        }
        Ok(KeyRange {
            from: (!from.is_empty()).then(|| from.to_vec()),
            to: (!to.is_empty()).then(|| to.to_vec()),
        })
    }

    /// The range a request names: a prefix, or bounds, or (neither) every key.
    pub fn of_request(prefix: &[u8], from: &[u8], to: &[u8]) -> Result<KeyRange, RangeError> {
        match (prefix.is_empty(), from.is_empty() && to.is_empty()) {
            (false, false) => Err(RangeError::PrefixAndRange),
            (false, true) => Ok(KeyRange::with_prefix(prefix)),
            (true, _) => KeyRange::between(from, to),
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.from.as_deref().is_none_or(|from| key >= from)
            && self.to.as_deref().is_none_or(|to| key < to)
    }

    /// What is left of the range once a scan in that direction has returned `last`: the
    /// keys after it (ascending) or before it (descending).
    pub fn after(&self, last: &[u8], descending: bool) -> KeyRange {
        let mut rest = self.clone();
        if descending {
            rest.to = Some(match rest.to {
                Some(to) if to.as_slice() < last => to,
                _ => last.to_vec(),
            });
        } else {
            // The first key after `last` in byte order is `last` followed by a zero byte.
            let mut next = last.to_vec();
            next.push(0);
            rest.from = Some(match rest.from {
                Some(from) if from > next => from,
                _ => next,
            });
        }
        rest
    }
}

/// The first key past every key that starts with `prefix`; `None` if there is none (an
/// empty prefix, or one of only 0xFF bytes).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A key as text if it is printable ASCII, else as hex.
fn printable(key: &[u8]) -> String {
    if key.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(key))
    } else {
        key.iter().map(|b| format!("{b:02x}")).collect::<String>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_prefix_covers_exactly_its_keys() {
        let range = KeyRange::with_prefix(b"customer-01");
        assert!(range.contains(b"customer-01"));
        assert!(range.contains(b"customer-0199"));
        assert!(!range.contains(b"customer-02"));
        assert!(!range.contains(b"customer-0"));
        assert_eq!(range.to.as_deref(), Some(&b"customer-02"[..]));
        assert_eq!(KeyRange::with_prefix(&[0x61, 0xff]).to, Some(vec![0x62]));
        assert_eq!(KeyRange::with_prefix(&[0xff, 0xff]).to, None);
        assert_eq!(KeyRange::with_prefix(b""), KeyRange::default());
    }

    #[test]
    fn bad_ranges_are_refused_naming_what_is_wrong() {
        assert_eq!(
            KeyRange::of_request(b"a", b"b", b""),
            Err(RangeError::PrefixAndRange)
        );
        let inverted = KeyRange::of_request(b"", b"zz", b"aa").unwrap_err();
        assert_eq!(
            inverted.to_string(),
            r#"the range's from ("zz") is after its to ("aa")"#
        );
        assert!(KeyRange::of_request(b"", b"aa", b"aa").is_ok());
    }

    proptest! {
        /// Resuming after any key of a range leaves exactly the keys of the range beyond it.
        #[test]
        fn the_rest_after_a_key_is_exactly_the_range_beyond_it(
            from in proptest::collection::vec(any::<u8>(), 0..3),
            to in proptest::collection::vec(any::<u8>(), 0..3),
            last in proptest::collection::vec(any::<u8>(), 0..3),
            key in proptest::collection::vec(any::<u8>(), 0..4),
            descending in any::<bool>(),
        ) {
            prop_assume!(from.is_empty() || to.is_empty() || from <= to);
            let range = KeyRange::between(&from, &to).unwrap();
            let rest = range.after(&last, descending);
            let beyond = if descending { key < last } else { key > last };
            prop_assert_eq!(rest.contains(&key), range.contains(&key) && beyond);
        }

        /// A prefix range holds a key exactly when the key starts with the prefix.
        #[test]
        fn a_prefix_range_holds_the_keys_with_the_prefix(
            prefix in proptest::collection::vec(prop_oneof![Just(0u8), Just(0xff), any::<u8>()], 0..3),
            key in proptest::collection::vec(prop_oneof![Just(0u8), Just(0xff), any::<u8>()], 0..4),
        ) {
            prop_assert_eq!(KeyRange::with_prefix(&prefix).contains(&key), key.starts_with(&prefix));
        }
    }
}
