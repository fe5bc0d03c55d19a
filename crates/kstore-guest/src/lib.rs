//! Write a kstore processor as a WebAssembly module: a fold from one input record and its
//! key's current value to the key's new value and output records, compiled to
//! `wasm32-unknown-unknown` and named in a node's configuration. No node rebuild.
//!
//! ```
//! use kstore_guest::{Error, FoldResult, Outcome, Record};
//!
//! /// Counts records per key, as a little-endian u64.
//! fn count(_record: &Record<'_>, current: Option<&[u8]>) -> FoldResult {
//!     let count = match current {
//!         Some(bytes) => u64::from_le_bytes(
//!             bytes.try_into().map_err(|_| Error::Failed("bad stored count".into()))?,
//!         ),
//!         None => 0,
//!     };
//!     Ok(Outcome::put((count + 1).to_le_bytes()))
//! }
//!
//! kstore_guest::export_fold!(count);
//! ```
//!
//! Build it as a `cdylib` with `cargo build --release --target wasm32-unknown-unknown`
//! (`rustup target add wasm32-unknown-unknown` once), and name the `.wasm` file in the node's
//! configuration: `processor = { wasm = "count.wasm" }`. The examples of this crate are
//! modules: `count`, `features` (kstore's built-in fraud features, byte for byte) and
//! `faulty` (misbehaves on purpose, for kstore's tests).
//!
//! # What a fold may do
//!
//! A fold must be a pure function of the record (its key, value, headers, topic,
//! partition, offset and timestamp) and the key's current value: the node folds a record
//! again after an abort or on another node after a hand-over, and exactly-once is only exact
//! if the result is the same. The module can import nothing, so it has no clock, no
//! randomness and no I/O; floating-point NaNs are canonical. Globals survive from one call
//! to the next only while the node keeps the instance, which it replaces at any time (after
//! a trap, at restart, on another node): never let a result depend on them.
//!
//! Return [`Error::Malformed`] or [`Error::Failed`] to refuse a record: the node sends it to
//! the dead-letter topic with your reason, and the partition goes on. A panic, a trap, or a
//! call beyond the node's limits (fuel per record, memory per module) dead-letters the
//! record too, with the reason (a panic's message included); a module that faults on many
//! records in a row of one partition (`processor.max-faults-in-a-row`) stops that partition
//! instead, until it is retried, so that a broken module does not dead-letter a whole topic.
//!
//! Outputs are named ([`Outcome::with_output`]): the node's configuration maps each name to a
//! topic (`processor.outputs`), and a record for an unmapped name is dead-lettered.
//!
//! # The ABI (version 1)
//!
//! A module exports its linear memory as `memory` and these functions (the
//! [`export_fold!`] macro writes them); it imports nothing.
//!
//! | export | type | what it does |
//! |---|---|---|
//! | `kstore_abi_version` | `() -> i32` | returns [`ABI_VERSION`] (1) |
//! | `kstore_input` | `(len: i32) -> i32` | returns a pointer to `len` bytes of module memory for the node to write a batch into; valid until the next call |
//! | `kstore_fold` | `(len: i32) -> i64` | folds the batch of `len` bytes written there; returns the results' pointer and length packed as `ptr << 32 \| len`, valid until the next call |
//! | `kstore_panic_message` | `() -> i64` | optional: the last panic's message, packed the same way (empty if none); the node reads it after a trap |
//!
//! Memory belongs to the module: the node never allocates or frees in it, it only writes
//! the batch where `kstore_input` says and reads the results where `kstore_fold` says. A
//! batch holds one or more records, never two of the same key (so each record's current
//! value is the one the node passes with it); the results hold one result per record, in
//! order. The byte format of both is in [`abi`].
//!
//! A new ABI version will be a new value of `kstore_abi_version`; a node refuses a module
//! whose version it does not speak, naming both.

pub mod abi;

pub use abi::{ABI_VERSION, Error, FoldResult, Header, Outcome, Output, Record, Update};

/// Exports a fold as a kstore module: `kstore_abi_version`, `kstore_input`, `kstore_fold`
/// and `kstore_panic_message` (see the crate's documentation for the ABI).
///
/// The fold is a function `fn(&Record<'_>, Option<&[u8]>) -> FoldResult` (the record and
/// the key's current value). Use the macro once per module.
#[macro_export]
macro_rules! export_fold {
    ($fold:path) => {
        /// The guest ABI version this module speaks.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn kstore_abi_version() -> i32 {
            $crate::ABI_VERSION
        }

        /// Returns where the node writes a batch of `len` bytes.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn kstore_input(len: i32) -> i32 {
            $crate::__runtime::input(len)
        }

        /// Folds the batch of `len` bytes; returns its results' pointer and length.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn kstore_fold(len: i32) -> i64 {
            $crate::__runtime::fold(len, $fold)
        }

        /// Returns the last panic's message's pointer and length.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn kstore_panic_message() -> i64 {
            $crate::__runtime::panic_message()
        }
    };
}

/// What the exports that [`export_fold!`] writes call: the module's buffers and its panic
/// hook. Not an API.
#[doc(hidden)]
pub mod __runtime {
    use std::cell::RefCell;
    use std::fmt::Write;
    use std::sync::Once;

    use crate::abi::{self, FoldResult, Record};

    thread_local! {
        static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        static OUTPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        static PANIC: RefCell<String> = const { RefCell::new(String::new()) };
    }

    static HOOK: Once = Once::new();

    /// The address of `bytes` in a 32-bit module's memory.
    fn address(bytes: &[u8]) -> u32 {
        bytes.as_ptr() as usize as u32
    }

    /// Makes room for a batch of `len` bytes and returns where it starts.
    pub fn input(len: i32) -> i32 {
        // A panic's message is kept for the node to read after the trap that follows it.
        HOOK.call_once(|| {
            std::panic::set_hook(Box::new(|info| {
                PANIC.with(|message| {
                    if let Ok(mut message) = message.try_borrow_mut() {
                        message.clear();
                        let _ = write!(message, "{info}");
                    }
                });
            }))
        });
        let len = usize::try_from(len).unwrap_or(0);
        INPUT.with_borrow_mut(|buffer| {
            buffer.clear();
            buffer.resize(len, 0);
            address(buffer) as i32
        })
    }

    /// Folds the batch in the input buffer with `fold` and returns where its results are.
    pub fn fold(len: i32, fold: impl Fn(&Record<'_>, Option<&[u8]>) -> FoldResult) -> i64 {
        INPUT.with_borrow(|input| {
            let batch = usize::try_from(len)
                .ok()
                .and_then(|len| input.get(..len))
                .map(abi::decode_batch);
            let batch = match batch {
                Some(Ok(batch)) => batch,
                Some(Err(error)) => panic!("the node's batch does not decode: {error}"),
                None => panic!("the node's batch is longer than the buffer it asked for"),
            };
            let results: Vec<FoldResult> = batch
                .iter()
                .map(|(record, current)| fold(record, *current))
                .collect();
            OUTPUT.with_borrow_mut(|output| {
                output.clear();
                abi::encode_results(output, results.iter());
                abi::pack(address(output), output.len() as u32)
            })
        })
    }

    /// Returns where the last panic's message is (empty if there was none).
    pub fn panic_message() -> i64 {
        PANIC.with_borrow(|message| abi::pack(address(message.as_bytes()), message.len() as u32))
    }
}
