//! The built-in processor: fraud features per customer, folded from JSON order events by
//! [`kstore_core::features`] (the same fold that the `features` WebAssembly module runs).

use super::{InputRecord, Outcome, OutputRecord, ProcessError, Processor, Update};
use kstore_core::features::{FeaturesError, Folded};

pub use kstore_core::features::{ABUSE_DISTINCT_ADDRESSES, ABUSE_RULE, DISTINCT_SET_CAP, fold};

/// Folds order events into `CustomerFeatures` and emits an alert to `alerts_topic` when
/// a customer starts to match the subscription-abuse rule.
#[derive(Debug, Clone)]
pub struct FeaturesProcessor {
    alerts_topic: String,
}

impl FeaturesProcessor {
    /// Returns a processor that writes alerts to `alerts_topic`.
    pub fn new(alerts_topic: impl Into<String>) -> Self {
        FeaturesProcessor {
            alerts_topic: alerts_topic.into(),
        }
    }
}

impl Processor for FeaturesProcessor {
    fn process(
        &mut self,
        record: &InputRecord<'_>,
        current: Option<&[u8]>,
    ) -> Result<Outcome, ProcessError> {
        let Folded { state, alert } =
            kstore_core::features::process(record.key, record.value, current).map_err(|error| {
                match error {
                    FeaturesError::Malformed(reason) => ProcessError::Malformed(reason),
                    FeaturesError::Failed(reason) => ProcessError::Failed(reason),
                }
            })?;
        let outputs = alert
            .map(|value| OutputRecord {
                topic: self.alerts_topic.clone(),
                key: record.key.to_vec(),
                value,
            })
            .into_iter()
            .collect();
        Ok(Outcome {
            update: Update::Put(state),
            outputs,
        })
    }

    fn value_type_url(&self) -> Option<&str> {
        Some(kstore_proto::CUSTOMER_FEATURES_TYPE_URL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_go_to_the_configured_topic_keyed_by_customer() {
        let mut processor = FeaturesProcessor::new("fraud-alerts");
        let mut value: Option<Vec<u8>> = None;
        let mut alerts = Vec::new();
        for n in 0..5i64 {
            let json = format!(
                r#"{{"order_id":"o-{n}","customer_id":"c-1","event_time_ms":{},"amount_cents":100,"delivery_address":"addr-{n}","payment_instrument":"p","free_delivery":true}}"#,
                1_767_225_600_000 + n * 60_000
            );
            let record = InputRecord {
                topic: "orders",
                partition: 0,
                offset: n,
                key: b"c-1",
                value: Some(json.as_bytes()),
                ..InputRecord::default()
            };
            let outcome = processor.process(&record, value.as_deref()).unwrap();
            let Update::Put(bytes) = outcome.update else {
                panic!("expected a put")
            };
            value = Some(bytes);
            alerts.extend(outcome.outputs);
        }
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].topic, "fraud-alerts");
        assert_eq!(alerts[0].key, b"c-1");
        let record = InputRecord {
            key: b"c-1",
            ..InputRecord::default()
        };
        assert_eq!(
            processor.process(&record, None),
            Err(ProcessError::Malformed("no value".into()))
        );
    }
}
