//! The rules every key must meet, checked the same way by the client before a read, by a
//! node's Query service, and by ingest before a record is folded.
//!
//! ```
//! use kstore_core::keys::{KeyError, check_key};
//! assert_eq!(check_key(b"customer-000042", 64), Ok(()));
//! assert_eq!(check_key(b"", 64), Err(KeyError::Empty));
//! assert_eq!(check_key(&[b'x'; 65], 64), Err(KeyError::TooLarge { len: 65, limit: 64 }));
//! ```

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
}

/// Checks that `key` is not empty and at most `limit` bytes long.
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
    Ok(())
}
