//! The lifecycle of one copy, as plain data: what the node wants of it (active for an
//! assignment, or a standby), whether it is being prepared, and its failures with their
//! backoff. [`super::Copies`] holds one [`Lifecycles`] under its lock and acts on what
//! these decisions say.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// What the node wants of a partition's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Ingest owns the partition: the copy restores its changelog tail, then turns active.
    /// The generation tells this assignment from an earlier one.
    Active {
        /// Which assignment of the partition this is.
        generation: u64,
    },
    /// A standby (placed here, or kept after a revoke until its new active runs).
    Standby,
}

/// A copy that failed, and when it is tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Failures in a row.
    pub attempts: u32,
    /// When it is tried again.
    pub retry_at: Instant,
    /// Its files are damaged: the retry moves them aside and rebuilds the copy.
    pub damaged: bool,
    /// Why it failed last.
    pub reason: String,
}

/// How long to wait before retrying a copy that failed `attempts` times in a row: `initial`,
/// doubled for each further failure, at most `max`.
pub fn backoff(attempts: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30);
    initial.saturating_mul(1 << doublings).min(max)
}

/// Every copy's lifecycle on a node.
#[derive(Debug, Default)]
pub struct Lifecycles {
    wanted: HashMap<i32, Want>,
    preparing: HashSet<i32>,
    failures: HashMap<i32, Failure>,
}

/// What to do after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Prepare the copy (open, check, bootstrap) off the caller's thread.
    Prepare,
    /// Nothing now: it is being prepared, or waits for its retry.
    Wait,
}

impl Lifecycles {
    /// Returns what the node wants of the partition's copy.
    pub fn wanted(&self, partition: i32) -> Option<Want> {
        self.wanted.get(&partition).copied()
    }

    /// Returns the partition's failure, if its copy failed and waits for a retry.
    pub fn failure(&self, partition: i32) -> Option<&Failure> {
        self.failures.get(&partition)
    }

    /// Whether the partition's copy is being prepared.
    pub fn preparing(&self, partition: i32) -> bool {
        self.preparing.contains(&partition)
    }

    /// The node wants the copy as `want`. A copy that is not open must be prepared, unless
    /// it is being prepared or waits for its retry.
    pub fn want(&mut self, partition: i32, want: Want) -> Next {
        self.wanted.insert(partition, want);
        if self.preparing.contains(&partition) || self.failures.contains_key(&partition) {
            return Next::Wait;
        }
        self.preparing.insert(partition);
        Next::Prepare
    }

    /// The node no longer wants the copy. Returns whether it was wanted.
    pub fn forget(&mut self, partition: i32) -> bool {
        self.failures.remove(&partition);
        self.wanted.remove(&partition).is_some()
    }

    /// A preparation ended (it succeeded, or `fail` records why not). Returns what the node
    /// wants of the copy now (`None`: close it).
    pub fn prepared(&mut self, partition: i32) -> Option<Want> {
        self.preparing.remove(&partition);
        self.failures.remove(&partition);
        self.wanted(partition)
    }

    /// The copy failed at `now`: it is retried after the backoff. Returns the failure, or
    /// `None` if the node does not want the copy (then there is nothing to retry).
    pub fn fail(
        &mut self,
        partition: i32,
        reason: String,
        damaged: bool,
        now: Instant,
        initial: Duration,
        max: Duration,
    ) -> Option<&Failure> {
        self.preparing.remove(&partition);
        if !self.wanted.contains_key(&partition) {
            self.failures.remove(&partition);
            return None;
        }
        let failure = self.failures.entry(partition).or_insert(Failure {
            attempts: 0,
            retry_at: now,
            damaged: false,
            reason: String::new(),
        });
        failure.attempts += 1;
        failure.retry_at = now + backoff(failure.attempts, initial, max);
        failure.damaged |= damaged;
        failure.reason = reason;
        Some(failure)
    }

    /// Returns the failed copies whose retry is due at `now`, and marks them as being
    /// prepared. Their failures stay until the preparation ends, so that a damaged copy is
    /// still known to be damaged.
    pub fn due(&mut self, now: Instant) -> Vec<i32> {
        let due: Vec<i32> = self
            .failures
            .iter()
            .filter(|(partition, failure)| {
                failure.retry_at <= now && !self.preparing.contains(partition)
            })
            .map(|(partition, _)| *partition)
            .collect();
        self.preparing.extend(&due);
        due
    }

    /// When the next retry is due, if any copy waits for one.
    pub fn next_retry(&self) -> Option<Instant> {
        self.failures
            .iter()
            .filter(|(partition, _)| !self.preparing.contains(partition))
            .map(|(_, failure)| failure.retry_at)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn retries_back_off_doubling_up_to_the_cap() {
        let waits: Vec<u64> = (1..=9)
            .map(|attempts| backoff(attempts, SECOND, 60 * SECOND).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX, SECOND, 60 * SECOND), 60 * SECOND);
    }

    #[test]
    fn a_copy_is_prepared_once_however_often_it_is_wanted() {
        let mut copies = Lifecycles::default();
        assert_eq!(copies.want(3, Want::Standby), Next::Prepare);
        assert_eq!(copies.want(3, Want::Active { generation: 1 }), Next::Wait);
        assert!(copies.preparing(3));
        // The preparation ends with what is wanted by then.
        assert_eq!(copies.prepared(3), Some(Want::Active { generation: 1 }));
        assert!(!copies.preparing(3));
    }

    #[test]
    fn a_failed_copy_waits_for_its_retry_then_is_prepared_again() {
        let mut copies = Lifecycles::default();
        let start = Instant::now();
        assert_eq!(
            copies.want(5, Want::Active { generation: 2 }),
            Next::Prepare
        );
        let failure = copies
            .fail(5, "disk full".into(), false, start, SECOND, 60 * SECOND)
            .unwrap();
        assert_eq!(failure.attempts, 1);
        assert_eq!(failure.retry_at, start + SECOND);
        // Wanted again meanwhile (a new assignment): still waits for the retry.
        assert_eq!(copies.want(5, Want::Active { generation: 3 }), Next::Wait);
        assert!(copies.due(start).is_empty());
        assert_eq!(copies.next_retry(), Some(start + SECOND));
        assert_eq!(copies.due(start + SECOND), [5]);
        assert!(copies.preparing(5));
        assert_eq!(copies.next_retry(), None);
        // Fails again: twice as long.
        let failure = copies
            .fail(
                5,
                "disk full".into(),
                true,
                start + SECOND,
                SECOND,
                60 * SECOND,
            )
            .unwrap();
        assert_eq!((failure.attempts, failure.damaged), (2, true));
        assert_eq!(failure.retry_at, start + 3 * SECOND);
        assert_eq!(copies.due(start + 3 * SECOND), [5]);
        // The damage is remembered until the preparation ends.
        assert!(copies.failure(5).unwrap().damaged);
        assert_eq!(copies.prepared(5), Some(Want::Active { generation: 3 }));
        assert!(copies.failure(5).is_none());
    }

    #[test]
    fn a_copy_nobody_wants_is_not_retried() {
        let mut copies = Lifecycles::default();
        let now = Instant::now();
        copies.want(1, Want::Standby);
        assert!(copies.forget(1));
        assert!(
            copies
                .fail(1, "gone".into(), false, now, SECOND, SECOND)
                .is_none()
        );
        assert!(copies.due(now + 10 * SECOND).is_empty());
        assert_eq!(copies.prepared(1), None);
        assert!(!copies.forget(1));
    }
}
