//! The producer's delivery reports: the next changelog offset each partition reached in the
//! open transaction (the position its store reaches once the transaction commits), and the
//! first failure, which aborts the transaction.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::producer::{DeliveryResult, ProducerContext};

/// Tracks delivery reports of the node's transactional producer.
pub(crate) struct DeliveryTracker {
    changelog_topic: String,
    changelog_next: Mutex<HashMap<i32, i64>>,
    failure: Mutex<Option<String>>,
}

impl DeliveryTracker {
    /// Tracks deliveries to `changelog_topic`.
    pub(crate) fn new(changelog_topic: String) -> Self {
        DeliveryTracker {
            changelog_topic,
            changelog_next: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
        }
    }

    /// The changelog topic.
    pub(crate) fn changelog_topic(&self) -> &str {
        &self.changelog_topic
    }

    /// Returns and forgets the next changelog offset per partition reached since the last
    /// call (the transaction's, after it committed).
    pub(crate) fn take_changelog_next(&self) -> HashMap<i32, i64> {
        std::mem::take(&mut *lock(&self.changelog_next))
    }

    /// Returns and forgets the first delivery failure since the last call.
    pub(crate) fn take_failure(&self) -> Option<String> {
        lock(&self.failure).take()
    }

    /// Forgets everything (the transaction aborted).
    pub(crate) fn clear(&self) {
        lock(&self.changelog_next).clear();
        lock(&self.failure).take();
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(message) if message.topic() == self.changelog_topic => {
                let mut next = lock(&self.changelog_next);
                let entry = next.entry(message.partition()).or_insert(0);
                *entry = (*entry).max(message.offset() + 1);
            }
            Ok(_) => {}
            Err((error, message)) => {
                let mut failure = lock(&self.failure);
                failure.get_or_insert_with(|| {
                    format!(
                        "producing to {} [{}]: {error}",
                        message.topic(),
                        message.partition()
                    )
                });
            }
        }
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks already ends the node.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
