//! Forwarding: a read of a partition this node holds no copy of goes to the best holder in
//! the cluster view, marked with [`FORWARDED_FROM`] so that the holder never forwards it
//! again. Plain gRPC clients (grpcurl, any generated client) get their answer from any node;
//! smart clients ask for no forwarding and fix their routing from the holders instead.
//!
//! A holder that fails is replaced at once by the partition's next holder; one that has not
//! answered within its share of the time left (a paused or overloaded node that the failure
//! detector has not noticed yet) gets the next holder asked as well, and the first answer
//! wins ([`forward_keys`]). A MultiGet's keys go one call per holder, and a call that fails
//! or stalls sends its keys on to their partitions' next holders. A holder that stalled is
//! asked last for a while ([`AVOID_FOR`]), so that reads forwarded before gossip calls it
//! suspect do not each wait on it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kstore_core::routing::Target;
use kstore_core::routing::fanout::{FanOut, Group, GroupId};
use kstore_proto::v1::query_client::QueryClient;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// The request header that marks a forwarded read; its value names the forwarding node.
pub const FORWARDED_FROM: &str = "kstore-forwarded-from";

/// Keys read through another node, by method and outcome (`answered`, `error`: a holder's
/// refusal, `no_holder`, `no_answer`: none answered before the deadline).
pub const FORWARDED_READS: &str = "kstore_forwarded_reads_total";

/// Holders that had not answered a forwarded call within their share of the deadline, so
/// that the next holder was asked as well.
pub const FORWARD_STALLS: &str = "kstore_forward_stalls_total";

/// How long connecting to a holder may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a holder that stalled a forwarded call is asked last (longer than the failure
/// detector takes to call a silent node suspect).
pub const AVOID_FOR: Duration = Duration::from_secs(2);

/// The most peers a node keeps a channel to; past it (nodes that came and went on other
/// addresses) the cache starts afresh.
const MAX_PEERS: usize = 1_024;

/// Channels to the other nodes, by gRPC address, made on first use and reused (a channel
/// reconnects by itself), and the nodes that stalled a forwarded call lately.
#[derive(Debug, Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    /// The node's TLS identity: set, other nodes are dialed over TLS with it.
    tls: Option<Arc<crate::tls::Tls>>,
    /// Node ids, and until when they are asked last.
    stalled: Mutex<HashMap<String, std::time::Instant>>,
}

impl Peers {
    /// Peers dialed over TLS with the node's identity, if `tls` is set.
    pub fn with_tls(tls: Option<Arc<crate::tls::Tls>>) -> Self {
        Peers {
            tls,
            ..Peers::default()
        }
    }

    /// Notes that a holder did not answer a forwarded call within its share of the time:
    /// it is asked last for [`AVOID_FOR`].
    pub fn stalled(&self, node_id: &str) {
        self.stalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(node_id.to_owned(), std::time::Instant::now() + AVOID_FOR);
    }

    /// Returns the holders in the same order, except that those which stalled lately come
    /// last.
    pub fn order(&self, mut targets: Vec<Target>) -> Vec<Target> {
        let mut stalled = self
            .stalled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if stalled.is_empty() {
            return targets;
        }
        let now = std::time::Instant::now();
        stalled.retain(|_, until| *until > now);
        targets.sort_by_key(|target| stalled.contains_key(&target.node_id));
        targets
    }

    /// Returns a Query client for the node at `address`.
    pub fn client(&self, address: &str) -> Result<QueryClient<Channel>, String> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(address) {
            return Ok(QueryClient::new(channel.clone()));
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| format!("{address:?} is not an address: {error}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let channel = match &self.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(tls.connector()),
            None => endpoint.connect_lazy(),
        };
        if channels.len() >= MAX_PEERS {
            channels.clear();
        }
        channels.insert(address.to_owned(), channel.clone());
        Ok(QueryClient::new(channel))
    }
}

/// Whether another node forwarded this request here.
pub fn was_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_FROM)
}

/// Wraps a read to forward: marked as forwarded by `node_id`, carrying the cluster's
/// `secret` if it has one, with `timeout` as its deadline.
pub fn forwarded<T>(
    message: T,
    node_id: &str,
    secret: Option<&str>,
    timeout: Duration,
) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    if let Some(secret) = secret {
        crate::access::present(&mut request, secret);
    }
    // Node ids are ASCII letters, digits, '-', '_' and '.' (checked at startup).
    let value =
        MetadataValue::try_from(node_id).unwrap_or_else(|_| MetadataValue::from_static("node"));
    request.metadata_mut().insert(FORWARDED_FROM, value);
    request
}

/// What came of forwarding one key.
#[derive(Debug)]
pub enum Forwarded<R> {
    /// A holder answered.
    Answered(R),
    /// A holder refused the read for a reason any holder would give (such as a bad request
    /// or a position bound not reached).
    Refused(Status),
    /// No holder answered before the deadline.
    NoAnswer {
        /// The holders asked, in order.
        asked: Vec<String>,
    },
    /// No live holder is known, or every one asked failed (unreachable, or no longer
    /// holding the partition).
    NoHolder,
}

/// One call to a holder for some keys: the holder's answer per key, in the order of the keys
/// given (`None` for a key it could not answer, such as one of a partition it no longer
/// holds: its partition's next holder is asked), or the call's error.
pub type CallResult<R> = Result<Vec<Option<R>>, Status>;

/// Forwards keys (whose partitions and holders `fanout` knows) to their holders: each group of
/// keys in one `call(holder, keys, timeout)`; a call that fails with a status another holder
/// could answer differently (unavailable, cancelled, deadline exceeded), or that has not
/// answered within its share of the time left, sends its keys on to their partitions' next
/// holders; the first answer for a key wins; `on_stall` hears of each holder passed over.
/// Returns what came of each key by `deadline` (on tokio's clock, so that tests can pause
/// it).
pub async fn forward_keys<R, F, Fut>(
    mut fanout: FanOut,
    deadline: Instant,
    mut call: F,
    mut on_stall: impl FnMut(&Target),
) -> Vec<Forwarded<R>>
where
    R: Send + 'static,
    F: FnMut(&Target, &[usize], Duration) -> Fut,
    Fut: std::future::Future<Output = CallResult<R>> + Send + 'static,
{
    type Running<R> = tokio::task::JoinSet<(GroupId, Vec<usize>, CallResult<R>)>;
    let mut results: Vec<Option<Forwarded<R>>> = (0..fanout.keys()).map(|_| None).collect();
    let mut running: Running<R> = tokio::task::JoinSet::new();
    // When each running call's keys go on to their next holders as well.
    let mut stalls: Vec<(Instant, GroupId, Target)> = Vec::new();
    // Partitions that a holder did not answer in time.
    let mut timed_out: BTreeSet<u32> = BTreeSet::new();
    let mut send = |groups: Vec<Group>,
                    fanout: &FanOut,
                    running: &mut Running<R>,
                    stalls: &mut Vec<(Instant, GroupId, Target)>| {
        let now = Instant::now();
        let remaining = deadline.saturating_duration_since(now);
        for group in groups {
            if let Some(share) = fanout.stall_after(group.id, remaining) {
                stalls.push((now + share, group.id, group.target.clone()));
            }
            let answer = call(&group.target, &group.keys, remaining);
            running.spawn(async move { (group.id, group.keys, answer.await) });
        }
    };
    let first = fanout.start();
    send(first, &fanout, &mut running, &mut stalls);
    while !fanout.is_done() && !running.is_empty() {
        let next_stall = stalls.iter().map(|(at, _, _)| *at).min();
        tokio::select! {
            joined = running.join_next() => {
                let Some(Ok((group, sent, answer))) = joined else { continue };
                stalls.retain(|(_, g, _)| *g != group);
                let next = match answer {
                    Ok(answers) if answers.len() == sent.len() => {
                        let mut retry = Vec::new();
                        for (key, answer) in sent.into_iter().zip(answers) {
                            match answer {
                                Some(answer) => {
                                    if fanout.settle(key) {
                                        results[key] = Some(Forwarded::Answered(answer));
                                    }
                                }
                                None => retry.push(fanout.partition_of(key)),
                            }
                        }
                        fanout.move_on_partitions(group, &retry)
                    }
                    // An answer that does not match the request is no answer.
                    Ok(_) => fanout.move_on(group),
                    Err(status) if may_answer_elsewhere(status.code()) => {
                        if is_timeout(&status) {
                            timed_out.extend(fanout.partitions_of(group).iter().copied());
                        }
                        fanout.move_on(group)
                    }
                    Err(status) => {
                        for key in sent {
                            if fanout.settle(key) {
                                results[key] = Some(Forwarded::Refused(status.clone()));
                            }
                        }
                        Vec::new()
                    }
                };
                send(next, &fanout, &mut running, &mut stalls);
            }
            _ = tokio::time::sleep_until(next_stall.unwrap_or(deadline)), if next_stall.is_some() => {
                let now = Instant::now();
                let (due, waiting) = std::mem::take(&mut stalls)
                    .into_iter()
                    .partition::<Vec<_>, _>(|(at, _, _)| *at <= now);
                stalls = waiting;
                for (_, group, target) in due {
                    metrics::counter!(FORWARD_STALLS).increment(1);
                    on_stall(&target);
                    timed_out.extend(fanout.partitions_of(group).iter().copied());
                    let next = fanout.move_on(group);
                    send(next, &fanout, &mut running, &mut stalls);
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let past_deadline = Instant::now() >= deadline;
    results
        .into_iter()
        .enumerate()
        .map(|(key, result)| {
            result.unwrap_or_else(|| {
                let partition = fanout.partition_of(key);
                let asked = fanout.asked(partition).to_vec();
                if !asked.is_empty() && (past_deadline || timed_out.contains(&partition)) {
                    Forwarded::NoAnswer { asked }
                } else {
                    Forwarded::NoHolder
                }
            })
        })
        .collect()
}

/// Whether another holder may answer where one failed with `code`: it is gone, stalls, or
/// no longer holds the partition.
fn may_answer_elsewhere(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::ResourceExhausted
    )
}

/// Whether a holder's error says it did not answer in time: a deadline it gave up on, or
/// tonic's own timeout ("Timeout expired", which tonic reports as CANCELLED).
pub fn is_timeout(status: &Status) -> bool {
    match status.code() {
        tonic::Code::DeadlineExceeded => true,
        tonic::Code::Cancelled => status.message() == tonic::TimeoutExpired(()).to_string(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kstore_core::cluster::Role;

    use super::*;

    /// How a fake holder answers a call.
    #[derive(Debug, Clone, Copy)]
    enum Holder {
        /// Answers after this long, every key.
        After(u64),
        /// Never answers (a paused process).
        Stalls,
        /// Fails at once with this code.
        Fails(tonic::Code),
        /// Answers at once, but holds no copy of any key's partition.
        NotHosting,
    }

    fn target(node: &str) -> Target {
        Target {
            node_id: node.into(),
            address: format!("{node}:50051"),
            role: Role::Active,
            lag: 0,
        }
    }

    /// Forwards keys of `key_partitions` over `plans` (partition → nodes) to fake holders;
    /// returns each key's outcome (the answering node's name), when the last came, and the
    /// calls made as (node, keys).
    async fn forward(
        key_partitions: Vec<u32>,
        plans: &[(u32, &[&'static str])],
        holders: &[(&'static str, Holder)],
        timeout: Duration,
    ) -> (Vec<Forwarded<String>>, Duration, Vec<(String, Vec<usize>)>) {
        let plans: HashMap<u32, Vec<Target>> = plans
            .iter()
            .map(|(p, nodes)| (*p, nodes.iter().map(|n| target(n)).collect()))
            .collect();
        let fanout = FanOut::new(key_partitions, |p| {
            plans.get(&p).cloned().unwrap_or_default()
        });
        let holders: HashMap<&str, Holder> = holders.iter().copied().collect();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let call = |target: &Target, keys: &[usize], _: Duration| {
            calls
                .lock()
                .unwrap()
                .push((target.node_id.clone(), keys.to_vec()));
            let node = target.node_id.clone();
            let how = holders[node.as_str()];
            let count = keys.len();
            async move {
                match how {
                    Holder::After(ms) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        Ok(vec![Some(node); count])
                    }
                    Holder::Stalls => std::future::pending().await,
                    Holder::Fails(code) => Err(Status::new(code, "no")),
                    Holder::NotHosting => Ok(vec![None; count]),
                }
            }
        };
        let outcomes = forward_keys(fanout, started + timeout, call, |_| {}).await;
        let calls = calls.lock().unwrap().clone();
        (outcomes, started.elapsed(), calls)
    }

    fn answered_by(outcome: &Forwarded<String>) -> Option<&str> {
        match outcome {
            Forwarded::Answered(node) => Some(node),
            _ => None,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_stalled_holder_gets_half_the_deadline_then_the_next_answers() {
        let (outcomes, elapsed, calls) = forward(
            vec![3],
            &[(3, &["a", "b"])],
            &[("a", Holder::Stalls), ("b", Holder::After(2))],
            SECOND,
        )
        .await;
        assert_eq!(answered_by(&outcomes[0]), Some("b"));
        assert_eq!(elapsed, Duration::from_millis(502));
        assert_eq!(calls.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_holder_that_answers_first_after_all_wins() {
        let (outcomes, elapsed, _) = forward(
            vec![3],
            &[(3, &["a", "b"])],
            &[("a", Holder::After(600)), ("b", Holder::After(300))],
            SECOND,
        )
        .await;
        assert_eq!(answered_by(&outcomes[0]), Some("a"));
        assert_eq!(elapsed, Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_holder_is_replaced_at_once_and_a_refusal_is_the_answer() {
        let (outcomes, elapsed, _) = forward(
            vec![3],
            &[(3, &["a", "b"])],
            &[
                ("a", Holder::Fails(tonic::Code::Unavailable)),
                ("b", Holder::After(2)),
            ],
            SECOND,
        )
        .await;
        assert_eq!(answered_by(&outcomes[0]), Some("b"));
        assert_eq!(elapsed, Duration::from_millis(2));

        let (outcomes, _, calls) = forward(
            vec![3],
            &[(3, &["a", "b"])],
            &[
                ("a", Holder::Fails(tonic::Code::InvalidArgument)),
                ("b", Holder::After(2)),
            ],
            SECOND,
        )
        .await;
        assert!(
            matches!(&outcomes[0], Forwarded::Refused(s) if s.code() == tonic::Code::InvalidArgument)
        );
        assert_eq!(calls.len(), 1, "a refusal is not asked again elsewhere");
    }

    #[tokio::test(start_paused = true)]
    async fn no_answer_before_the_deadline_names_every_holder_asked() {
        let (outcomes, elapsed, _) = forward(
            vec![3],
            &[(3, &["a", "b"])],
            &[("a", Holder::Stalls), ("b", Holder::Stalls)],
            SECOND,
        )
        .await;
        assert!(
            matches!(&outcomes[0], Forwarded::NoAnswer { asked } if asked == &["a", "b"]),
            "{outcomes:?}"
        );
        assert_eq!(elapsed, SECOND);
        // Holders that all fail at once: none reachable, no waiting.
        let (outcomes, elapsed, _) = forward(
            vec![3],
            &[(3, &["a"])],
            &[("a", Holder::Fails(tonic::Code::Unavailable))],
            SECOND,
        )
        .await;
        assert!(matches!(outcomes[0], Forwarded::NoHolder));
        assert_eq!(elapsed, Duration::ZERO);
        let (outcomes, _, calls) = forward(vec![3], &[], &[], SECOND).await;
        assert!(matches!(outcomes[0], Forwarded::NoHolder) && calls.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_multi_get_group_whose_holder_stalls_goes_to_each_partitions_next_holder() {
        // Keys 0 and 2 of partition 0 (a, then b), key 1 of partition 1 (a, then c), key 3 of
        // partition 2 (c, then a).
        let (outcomes, elapsed, calls) = forward(
            vec![0, 1, 0, 2],
            &[(0, &["a", "b"]), (1, &["a", "c"]), (2, &["c", "a"])],
            &[
                ("a", Holder::Stalls),
                ("b", Holder::After(1)),
                ("c", Holder::After(1)),
            ],
            SECOND,
        )
        .await;
        let by: Vec<Option<&str>> = outcomes.iter().map(answered_by).collect();
        assert_eq!(by, [Some("b"), Some("c"), Some("b"), Some("c")]);
        assert_eq!(elapsed, Duration::from_millis(501));
        assert_eq!(
            calls,
            [
                ("a".to_owned(), vec![0, 1, 2]),
                ("c".to_owned(), vec![3]),
                ("b".to_owned(), vec![0, 2]),
                ("c".to_owned(), vec![1]),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keys_a_holder_no_longer_holds_go_to_the_next_holder_at_once() {
        let (outcomes, elapsed, _) = forward(
            vec![0],
            &[(0, &["a", "b"])],
            &[("a", Holder::NotHosting), ("b", Holder::After(1))],
            SECOND,
        )
        .await;
        assert_eq!(answered_by(&outcomes[0]), Some("b"));
        assert_eq!(elapsed, Duration::from_millis(1));
    }

    #[test]
    fn holders_that_stalled_lately_are_asked_last() {
        let peers = Peers::default();
        let plan = vec![target("a"), target("b"), target("c")];
        assert_eq!(peers.order(plan.clone()), plan);
        peers.stalled("a");
        let ids: Vec<String> = peers.order(plan).into_iter().map(|t| t.node_id).collect();
        assert_eq!(ids, ["b", "c", "a"]);
    }

    #[test]
    fn tonics_own_timeout_counts_as_a_timeout() {
        assert!(is_timeout(&Status::cancelled("Timeout expired")));
        assert!(is_timeout(&Status::deadline_exceeded("late")));
        assert!(!is_timeout(&Status::cancelled("the caller went away")));
    }
}
