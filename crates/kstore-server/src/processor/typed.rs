//! Typed values for any store: the config's `value-type` names a protobuf message in a
//! descriptor set file (`protoc --include_imports --descriptor_set_out=…`). The node then
//! answers reads with values as `google.protobuf.Any` of that type and serves the set over
//! gRPC reflection, so that grpcurl and `kstore … --json` print values as JSON without kstore
//! knowing the type when it was built; and a new value that does not decode as the type is
//! dead-lettered with its record instead of being stored.

use std::path::PathBuf;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

use super::{InputRecord, Outcome, ProcessError, Processor, Update};
use crate::config::ValueTypeConfig;

/// Why a value type could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ValueTypeError {
    /// The descriptor set file cannot be read.
    #[error("cannot read the descriptor set {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a complete descriptor set.
    #[error(
        "{path} is not a complete protobuf descriptor set ({reason}); make it with protoc \
         --include_imports --descriptor_set_out={path} your.proto"
    )]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The set does not define the message.
    #[error("{path} defines no message {message}; it defines {defined}")]
    NoSuchMessage {
        /// The file.
        path: PathBuf,
        /// The message named in the config.
        message: String,
        /// Some of the messages it defines.
        defined: String,
    },
}

/// A store's value type: the message, its `Any` type URL, and the descriptor set that
/// defines it (served over reflection).
#[derive(Debug, Clone)]
pub struct ValueType {
    message: MessageDescriptor,
    type_url: String,
    descriptor_set: Vec<u8>,
}

impl ValueType {
    /// Reads the descriptor set and finds the message in it.
    pub fn load(config: &ValueTypeConfig) -> Result<ValueType, ValueTypeError> {
        let path = config.descriptor_set.clone();
        let descriptor_set = std::fs::read(&path).map_err(|source| ValueTypeError::Read {
            path: path.clone(),
            source,
        })?;
        let pool = DescriptorPool::decode(descriptor_set.as_slice()).map_err(|error| {
            ValueTypeError::Decode {
                path: path.clone(),
                reason: error.to_string(),
            }
        })?;
        let message = pool.get_message_by_name(&config.message).ok_or_else(|| {
            let mut names: Vec<String> = pool
                .all_messages()
                .map(|m| m.full_name().to_owned())
                .filter(|name| !name.starts_with("google.protobuf."))
                .collect();
            names.sort();
            let defined = match names.len() {
                0 => "no message of its own".to_owned(),
                n if n > 10 => format!("{}, … ({n} in all)", names[..10].join(", ")),
                _ => names.join(", "),
            };
            ValueTypeError::NoSuchMessage {
                path: path.clone(),
                message: config.message.clone(),
                defined,
            }
        })?;
        Ok(ValueType {
            type_url: format!("type.googleapis.com/{}", message.full_name()),
            message,
            descriptor_set,
        })
    }

    /// The message's full name.
    pub fn name(&self) -> &str {
        self.message.full_name()
    }

    /// Why `bytes` is not a value of this type, if it is not.
    fn check(&self, bytes: &[u8]) -> Result<(), String> {
        DynamicMessage::decode(self.message.clone(), bytes)
            .map(drop)
            .map_err(|error| error.to_string())
    }
}

/// A processor whose values are of a [`ValueType`]: a new value that does not decode as the
/// type fails its record (which is dead-lettered with the reason).
pub struct Typed {
    inner: Box<dyn Processor>,
    value_type: ValueType,
}

impl std::fmt::Debug for Typed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Typed")
            .field("value_type", &self.value_type.name())
            .finish_non_exhaustive()
    }
}

impl Typed {
    /// `inner`, with its values checked against `value_type`.
    pub fn new(inner: Box<dyn Processor>, value_type: ValueType) -> Typed {
        Typed { inner, value_type }
    }
}

impl Typed {
    /// Refuses an outcome whose new value does not decode as the value type.
    fn checked(&self, outcome: Result<Outcome, ProcessError>) -> Result<Outcome, ProcessError> {
        let outcome = outcome?;
        if let Update::Put(value) = &outcome.update
            && let Err(reason) = self.value_type.check(value)
        {
            return Err(ProcessError::Failed(format!(
                "the new value does not decode as {} (value-type.message): {reason}",
                self.value_type.name()
            )));
        }
        Ok(outcome)
    }
}

impl Processor for Typed {
    fn process(
        &mut self,
        record: &InputRecord<'_>,
        current: Option<&[u8]>,
    ) -> Result<Outcome, ProcessError> {
        let outcome = self.inner.process(record, current);
        self.checked(outcome)
    }

    fn process_batch(
        &mut self,
        batch: &[(InputRecord<'_>, Option<&[u8]>)],
    ) -> Vec<Result<Outcome, ProcessError>> {
        let outcomes = self.inner.process_batch(batch);
        outcomes
            .into_iter()
            .map(|outcome| self.checked(outcome))
            .collect()
    }

    fn version(&self) -> Option<&str> {
        self.inner.version()
    }

    fn value_type_url(&self) -> Option<&str> {
        Some(&self.value_type.type_url)
    }

    fn value_descriptor_set(&self) -> Option<&[u8]> {
        Some(&self.value_type.descriptor_set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores each record's value as the key's new value.
    struct Echo;

    impl Processor for Echo {
        fn process(
            &mut self,
            record: &InputRecord<'_>,
            _current: Option<&[u8]>,
        ) -> Result<Outcome, ProcessError> {
            Ok(Outcome {
                update: Update::Put(record.value.unwrap_or_default().to_vec()),
                outputs: Vec::new(),
            })
        }
    }

    fn tally_set(dir: &std::path::Path) -> PathBuf {
        kstore_testkit::guest::tally_descriptor_set(dir).unwrap()
    }

    fn config(path: PathBuf, message: &str) -> ValueTypeConfig {
        ValueTypeConfig {
            descriptor_set: path,
            message: message.into(),
        }
    }

    #[test]
    fn a_missing_file_a_broken_set_or_an_unknown_message_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = ValueType::load(&config(dir.path().join("none.binpb"), "a.B")).unwrap_err();
        assert!(error.to_string().contains("cannot read"), "{error}");
        let broken = dir.path().join("broken.binpb");
        std::fs::write(&broken, b"\xff\xff not protobuf").unwrap();
        let error = ValueType::load(&config(broken, "a.B")).unwrap_err();
        assert!(error.to_string().contains("--include_imports"), "{error}");
        let set = tally_set(dir.path());
        let error = ValueType::load(&config(set.clone(), "acme.v1.Tall")).unwrap_err();
        assert!(
            error.to_string().contains("no message acme.v1.Tall")
                && error.to_string().contains("acme.v1.Tally"),
            "{error}"
        );
        let value_type = ValueType::load(&config(set, "acme.v1.Tally")).unwrap();
        assert_eq!(value_type.type_url, "type.googleapis.com/acme.v1.Tally");
    }

    #[test]
    fn a_value_that_is_not_the_type_fails_its_record_and_one_that_is_passes() {
        let dir = tempfile::tempdir().unwrap();
        let value_type = ValueType::load(&config(tally_set(dir.path()), "acme.v1.Tally")).unwrap();
        let mut typed = Typed::new(Box::new(Echo), value_type);
        let record = |value: &'static [u8]| InputRecord {
            key: b"k",
            value: Some(value),
            ..InputRecord::default()
        };
        // Field 1 (varint) = 7: a Counter.
        let outcome = typed.process(&record(&[0x08, 0x07]), None).unwrap();
        assert_eq!(outcome.update, Update::Put(vec![0x08, 0x07]));
        // Field 2 says 16 bytes of string follow; there are 2.
        let error = typed
            .process(&record(&[0x12, 0x10, b'a', b'b']), None)
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("does not decode as acme.v1.Tally"),
            "{error}"
        );
        assert_eq!(
            typed.value_type_url(),
            Some("type.googleapis.com/acme.v1.Tally")
        );
    }
}
