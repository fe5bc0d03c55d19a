//! The race's timing on a paused clock, against fake nodes: a stalled copy passed over after
//! its share of the deadline, hedges within their budget, failures replaced at once,
//! misroutes corrected, and MultiGet groups split by their keys' next copies.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize};

use kstore_core::cluster::Role;
use kstore_proto::v1::{Holder, ReadMetadata};

use super::*;

const MS: Duration = Duration::from_millis(1);
const SECOND: Duration = Duration::from_secs(1);

/// How a fake node answers.
#[derive(Debug, Clone)]
enum Behaviour {
    /// Answers every key after this many milliseconds.
    After(u64),
    /// Never answers (a paused process).
    Stalls,
    /// Fails at once.
    Fails(AttemptError),
    /// Holds no copy: answers at once with the holders, naming this node.
    Moved(&'static str),
}

#[derive(Default)]
struct Fake {
    plans: Mutex<HashMap<u32, Vec<&'static str>>>,
    nodes: HashMap<&'static str, Behaviour>,
    /// (node, number of keys) per call made.
    calls: Mutex<Vec<(String, usize)>>,
    unresponsive: Mutex<Vec<String>>,
    corrections: AtomicUsize,
    refreshes: AtomicUsize,
}

fn target(node: &str) -> Target {
    Target {
        node_id: node.into(),
        address: format!("{node}:50051"),
        role: Role::Standby,
        lag: 0,
    }
}

fn answer_from(node: &str) -> GetResponse {
    GetResponse {
        found: true,
        value: Some(kstore_proto::v1::get_response::Value::Raw(
            node.as_bytes().to_vec(),
        )),
        read: Some(ReadMetadata {
            node_id: node.into(),
            ..ReadMetadata::default()
        }),
    }
}

impl Fake {
    fn new(plans: &[(u32, &[&'static str])], nodes: &[(&'static str, Behaviour)]) -> Fake {
        Fake {
            plans: Mutex::new(plans.iter().map(|(p, n)| (*p, n.to_vec())).collect()),
            nodes: nodes.iter().cloned().collect(),
            ..Fake::default()
        }
    }

    fn calls(&self) -> Vec<(String, usize)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Nodes for Fake {
    fn plan(&self, partition: u32, asked: &[String]) -> Vec<Target> {
        let plans = self.plans.lock().unwrap();
        plans
            .get(&partition)
            .into_iter()
            .flatten()
            .filter(|n| !asked.iter().any(|a| a == *n))
            .map(|n| target(n))
            .collect()
    }

    fn call(&self, _: Op, target: &Target, keys: Vec<Vec<u8>>, _: Instant) -> CallFuture {
        let node = target.node_id.clone();
        self.calls.lock().unwrap().push((node.clone(), keys.len()));
        let behaviour = self.nodes[node.as_str()].clone();
        Box::pin(async move {
            match behaviour {
                Behaviour::After(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    CallOutcome::Answered {
                        keys: keys
                            .iter()
                            .map(|_| KeyOutcome::Answered(Reply::Get(answer_from(&node))))
                            .collect(),
                        holders: Vec::new(),
                    }
                }
                Behaviour::Stalls => std::future::pending().await,
                Behaviour::Fails(error) => CallOutcome::Failed(error, None),
                Behaviour::Moved(to) => CallOutcome::Failed(
                    AttemptError::NotHosted,
                    Some(PartitionHolders {
                        partition: 3,
                        holders: vec![Holder {
                            node_id: to.into(),
                            ..Holder::default()
                        }],
                    }),
                ),
            }
        })
    }

    fn correct(&self, holders: &PartitionHolders) {
        self.corrections.fetch_add(1, Ordering::Relaxed);
        let nodes: Vec<&'static str> = holders
            .holders
            .iter()
            .map(|h| *self.nodes.keys().find(|n| **n == h.node_id).unwrap())
            .collect();
        self.plans.lock().unwrap().insert(holders.partition, nodes);
    }

    fn unresponsive(&self, node_id: &str) {
        self.unresponsive.lock().unwrap().push(node_id.into());
    }

    fn answered(&self, _: &str) {}

    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        Box::pin(async {})
    }

    fn refresh_later(&self) {
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads `keys` (key `i` of partition `partitions[i]`) through the fake; returns the
/// results, how long the read took, and the client's counters.
async fn read_through(
    fake: &Fake,
    op: Op,
    partitions: &[u32],
    hedge: Option<Duration>,
    hedger: &Hedger,
) -> (Vec<Result<Answer<Vec<u8>>, ReadError>>, Duration, Counters) {
    let keys: Vec<Vec<u8>> = (0..partitions.len())
        .map(|i| format!("key-{i}").into_bytes())
        .collect();
    let key_refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let read = Read {
        op,
        keys: &key_refs,
        partitions: partitions.to_vec(),
        timeout: SECOND,
        hedge,
        policy: "PreferActive { max_lag: 10000 }".into(),
    };
    let counters = Counters::default();
    let started = Instant::now();
    let results = super::read(fake, hedger, &counters, &read)
        .await
        .into_iter()
        .map(|result| result.map(Routed::into_answer))
        .collect();
    (results, started.elapsed(), counters)
}

fn answered_by(result: &Result<Answer<Vec<u8>>, ReadError>) -> &str {
    match result {
        Ok(answer) => &answer.read.node_id,
        Err(_) => "nobody",
    }
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

#[tokio::test(start_paused = true)]
async fn a_paused_first_copy_is_passed_over_after_its_share_of_the_deadline() {
    let fake = Fake::new(
        &[(3, &["active", "standby"])],
        &[
            ("active", Behaviour::Stalls),
            ("standby", Behaviour::After(1)),
        ],
    );
    let (results, elapsed, counters) =
        read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert_eq!(answered_by(&results[0]), "standby");
    // Half the second for the active (one other copy), then the standby's millisecond.
    assert_eq!(elapsed, SECOND / 2 + MS);
    let answer = results[0].as_ref().unwrap();
    assert_eq!(answer.value.as_deref(), Some(&b"standby"[..]));
    assert_eq!(answer.route.plan, ["active", "standby"]);
    let attempts: Vec<(&str, Sent, Option<AttemptError>)> = answer
        .route
        .attempts
        .iter()
        .map(|a| (a.node_id.as_str(), a.sent, a.error.clone()))
        .collect();
    assert_eq!(
        attempts,
        [
            ("active", Sent::First, Some(AttemptError::Cancelled)),
            ("standby", Sent::AfterStall, None)
        ]
    );
    assert_eq!(get(&counters.failovers), 1);
    assert_eq!(get(&counters.fallback_answers), 1);
    assert_eq!(*fake.unresponsive.lock().unwrap(), ["active"]);
}

#[tokio::test(start_paused = true)]
async fn once_latency_is_known_a_paused_copy_is_passed_over_after_ten_times_its_p99() {
    let fake = Fake::new(
        &[(3, &["active", "standby"])],
        &[
            ("active", Behaviour::Stalls),
            ("standby", Behaviour::After(1)),
        ],
    );
    let hedger = Hedger::new(0.1);
    // Gets have answered within 2 ms: a call unanswered for 10 × 2 ms = 20 ms (raised to
    // the 50 ms floor) has stalled, long before half the second.
    for _ in 0..100 {
        hedger.record(Op::Get, 2 * MS);
    }
    let (results, elapsed, counters) = read_through(&fake, Op::Get, &[3], None, &hedger).await;
    assert_eq!(answered_by(&results[0]), "standby");
    assert_eq!(elapsed, 50 * MS + MS);
    assert_eq!(get(&counters.failovers), 1);
    assert_eq!(*fake.unresponsive.lock().unwrap(), ["active"]);

    // Slower recent Gets (30 ms) wait ten times that, 300 ms.
    let slower = Hedger::new(0.1);
    for _ in 0..100 {
        slower.record(Op::Get, 30 * MS);
    }
    let (results, elapsed, _) = read_through(&fake, Op::Get, &[3], None, &slower).await;
    assert_eq!(answered_by(&results[0]), "standby");
    assert_eq!(elapsed, 300 * MS + MS);
}

#[tokio::test(start_paused = true)]
async fn three_copies_get_a_third_of_the_time_each() {
    let fake = Fake::new(
        &[(3, &["a", "b", "c"])],
        &[
            ("a", Behaviour::Stalls),
            ("b", Behaviour::Stalls),
            ("c", Behaviour::After(1)),
        ],
    );
    let (results, elapsed, counters) =
        read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert_eq!(answered_by(&results[0]), "c");
    // a: a third of 1 s; b: half of the two thirds left; then c's millisecond (tokio's
    // timers round up to the millisecond).
    let expected = SECOND / 3 + (SECOND - SECOND / 3) / 2 + MS;
    assert!(
        elapsed >= expected && elapsed <= expected + 2 * MS,
        "{elapsed:?}"
    );
    assert_eq!(get(&counters.failovers), 2);
}

#[tokio::test(start_paused = true)]
async fn with_the_failover_budget_spent_a_stalled_copy_is_waited_for() {
    let fake = Fake::new(
        &[(3, &["active", "standby"])],
        &[
            ("active", Behaviour::Stalls),
            ("standby", Behaviour::After(1)),
        ],
    );
    let hedger = Hedger::new(0.1);
    while hedger.try_failover() {}
    let (results, elapsed, counters) = read_through(&fake, Op::Get, &[3], None, &hedger).await;
    assert!(matches!(results[0], Err(ReadError::TimedOut { .. })));
    assert_eq!(elapsed, SECOND);
    assert_eq!(get(&counters.failovers), 0);
    // It stalled all the same: later reads ask it last.
    assert_eq!(*fake.unresponsive.lock().unwrap(), ["active"]);
}

#[tokio::test(start_paused = true)]
async fn a_copy_that_is_slow_but_answers_first_still_wins() {
    let fake = Fake::new(
        &[(3, &["active", "standby"])],
        &[
            ("active", Behaviour::After(600)),
            ("standby", Behaviour::After(300)),
        ],
    );
    let (results, elapsed, _) = read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert_eq!(answered_by(&results[0]), "active");
    assert_eq!(elapsed, 600 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_asks_the_next_copy_after_its_delay_while_the_budget_lasts() {
    let fake = Fake::new(
        &[(3, &["active", "standby"])],
        &[
            ("active", Behaviour::Stalls),
            ("standby", Behaviour::After(1)),
        ],
    );
    let hedger = Hedger::new(0.0);
    let (results, elapsed, counters) =
        read_through(&fake, Op::Get, &[3], Some(10 * MS), &hedger).await;
    assert_eq!(answered_by(&results[0]), "standby");
    assert_eq!(elapsed, 11 * MS);
    assert_eq!(
        (get(&counters.hedges_sent), get(&counters.hedges_won)),
        (1, 1)
    );
    assert_eq!(get(&counters.failovers), 0);
    // The budget spent (a new client's ten hedges, nothing earned at a share of 0): the
    // stalled copy is still passed over, after its share of the deadline.
    while hedger.try_hedge() {}
    let (results, elapsed, counters) =
        read_through(&fake, Op::Get, &[3], Some(10 * MS), &hedger).await;
    assert_eq!(answered_by(&results[0]), "standby");
    assert_eq!(elapsed, SECOND / 2 + MS);
    assert_eq!(get(&counters.hedges_sent), 0);
}

#[tokio::test(start_paused = true)]
async fn one_copy_that_stalls_gets_the_whole_deadline_and_fails_in_one_wording() {
    // ActiveOnly, or no standby within max_lag: nothing to fail over to.
    let fake = Fake::new(&[(3, &["active"])], &[("active", Behaviour::Stalls)]);
    let (results, elapsed, _) =
        read_through(&fake, Op::Get, &[3], Some(5 * MS), &Hedger::new(0.1)).await;
    assert_eq!(elapsed, SECOND);
    let error = results[0].as_ref().unwrap_err();
    assert!(
        matches!(error, ReadError::TimedOut { partition: 3, .. }),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "no answer for partition 3 before the deadline (1s): active (active:50051, first): \
         no answer before the deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_copy_is_replaced_at_once() {
    let fake = Fake::new(
        &[(3, &["active", "standby"])],
        &[
            (
                "active",
                Behaviour::Fails(AttemptError::Unreachable("refused".into())),
            ),
            ("standby", Behaviour::After(1)),
        ],
    );
    let (results, elapsed, _) = read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert_eq!(answered_by(&results[0]), "standby");
    assert_eq!(elapsed, MS);
    assert_eq!(*fake.unresponsive.lock().unwrap(), ["active"]);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_any_copy_would_give_is_not_asked_elsewhere() {
    let refused = AttemptError::Status {
        code: tonic::Code::InvalidArgument,
        reason: "KEY_TOO_LARGE".into(),
        message: "too long".into(),
    };
    let fake = Fake::new(
        &[(3, &["active", "standby"])],
        &[
            ("active", Behaviour::Fails(refused.clone())),
            ("standby", Behaviour::After(1)),
        ],
    );
    let (results, _, _) = read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert!(matches!(&results[0], Err(ReadError::Rejected { error, .. }) if *error == refused));
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_misroute_patches_the_view_and_asks_the_holder_it_names() {
    let fake = Fake::new(
        &[(3, &["old", "standby"])],
        &[
            ("old", Behaviour::Moved("new")),
            ("new", Behaviour::After(1)),
            ("standby", Behaviour::After(1)),
        ],
    );
    let (results, _, counters) = read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert_eq!(answered_by(&results[0]), "new");
    assert_eq!(get(&counters.misroutes_corrected), 1);
    assert_eq!(fake.corrections.load(Ordering::Relaxed), 1);
    let plan = &results[0].as_ref().unwrap().route.plan;
    assert_eq!(plan, &["old", "new"]);
}

#[tokio::test(start_paused = true)]
async fn when_every_copy_fails_one_fresh_view_is_fetched_then_the_read_fails() {
    let unreachable = || Behaviour::Fails(AttemptError::Unreachable("refused".into()));
    let fake = Fake::new(
        &[(3, &["a", "b"])],
        &[("a", unreachable()), ("b", unreachable())],
    );
    let (results, elapsed, _) = read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert_eq!(elapsed, Duration::ZERO, "failures are not waited for");
    let error = results[0].as_ref().unwrap_err();
    assert!(matches!(error, ReadError::Failed { .. }), "{error:?}");
    assert_eq!(error.attempts().len(), 2);
    assert_eq!(fake.refreshes.load(Ordering::Relaxed), 1);
    // No copy at all: one refresh, then NoCopy.
    let fake = Fake::new(&[], &[]);
    let (results, _, _) = read_through(&fake, Op::Get, &[3], None, &Hedger::new(0.1)).await;
    assert!(matches!(
        results[0],
        Err(ReadError::NoCopy { partition: 3, .. })
    ));
    assert_eq!(fake.refreshes.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn multi_get_keys_of_a_stalled_node_go_to_their_partitions_next_copies() {
    // Keys 0 and 3 of partition 0 (a, then b); key 1 of partition 1 (a, then c); key 2 of
    // partition 2 (b only).
    let fake = Fake::new(
        &[(0, &["a", "b"]), (1, &["a", "c"]), (2, &["b"])],
        &[
            ("a", Behaviour::Stalls),
            ("b", Behaviour::After(1)),
            ("c", Behaviour::After(1)),
        ],
    );
    let (results, elapsed, counters) =
        read_through(&fake, Op::MultiGet, &[0, 1, 2, 0], None, &Hedger::new(0.1)).await;
    let by: Vec<&str> = results.iter().map(answered_by).collect();
    assert_eq!(by, ["b", "c", "b", "b"]);
    assert_eq!(elapsed, SECOND / 2 + MS);
    assert_eq!(
        fake.calls(),
        [
            ("a".to_owned(), 3),
            ("b".to_owned(), 1),
            ("b".to_owned(), 2),
            ("c".to_owned(), 1)
        ]
    );
    assert_eq!(get(&counters.reads), 4);
    assert_eq!(get(&counters.first_hop_answers), 1);
    assert_eq!(get(&counters.fallback_answers), 3);
}
