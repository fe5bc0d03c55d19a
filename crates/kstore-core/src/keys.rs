//! The rules every key must meet, checked the same way by the client before a read, by a
//! node's Query service, and by ingest before a record is folded.
//!
//! ```
//! use kstore_core::keys::{KeyError, check_key};
//! assert_eq!(check_key(b"customer-000042", 64), Ok(()));
//! assert_eq!(check_key(b"", 64), Err(KeyError::Empty));
//! assert_eq!(check_key(&[b'x'; 65], 64), Err(KeyError::TooLarge { len: 65, limit: 64 }));
//! assert_eq!(check_key(b"\0kstore-module-history", 64), Err(KeyError::Reserved));
//! ```

/// Keys that start with these bytes are kstore's own records in a changelog (a
/// partition's module history, a point-in-time restore's marker), never a user's.
pub const RESERVED_KEY_PREFIX: &[u8] = b"\0kstore-";

/// Why a key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key has no bytes.
    #[error("the key is empty")]
    Empty,
    /// The key is longer than the limit.
    #[error("key of {len} bytes exceeds max-key-bytes {limit}")]
    TooLarge {
        /// The key's length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The key starts with [`RESERVED_KEY_PREFIX`].
    #[error(
        "keys that start with a NUL byte and \"kstore-\" are reserved for kstore's own records"
    )]
    Reserved,
}

/// Checks that `key` is not empty, at most `limit` bytes long and not reserved.
pub fn check_key(key: &[u8], limit: usize) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > limit {
        return Err(KeyError::TooLarge {
            len: key.len(),
            limit,
        });
    }
    if key.starts_with(RESERVED_KEY_PREFIX) {
        return Err(KeyError::Reserved);
    }
    Ok(())
}
