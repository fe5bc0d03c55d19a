//! Routing a read: each key's partition gets a plan of copies from the cached view
//! (`kstore_core::routing::plan`, under the read policy), and the read races over the plans.
//! A read's items are keys (a Get, a MultiGet) or one page request per partition (the pages
//! of a whole-store scan), and are routed alike:
//!
//! - the plan's first copy is asked (`pick`); the keys of a MultiGet go one call per node;
//! - a copy that fails is replaced at once by the next (`fallback`); one that names the
//!   partition's holders instead (a misroute) patches the view, and the rest of the plan is
//!   made again from it;
//! - a copy that has not answered after the hedge delay (within the hedge budget) or after
//!   the stall delay, ten times the recent p99 or its share of the time left if sooner
//!   (within the far looser failover budget: this is what passes over a paused node before
//!   the failure detector notices it) gets the next copy asked as well, and a copy that
//!   stalled is asked last by later reads for a while;
//! - the first answer for a key wins and the other calls are dropped; no node is asked twice
//!   for a partition, hedges included; when every copy failed, one fresh view is fetched
//!   and the read planned again.
//!
//! The race is written against [`Nodes`], so that its timing is tested on a paused clock
//! with fake nodes; [`calls`] makes the real gRPC calls.

pub(crate) mod calls;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kstore_core::routing::Target;
use kstore_core::routing::fanout::{FanOut, Group, GroupId};
use kstore_proto::v1::{GetResponse, PartitionHolders, ScanResponse};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::error::{Attempt, AttemptError, ReadError, Sent};
use crate::hedge::Hedger;
use crate::{Answer, Counters, Route, answer_of};

/// The kind of call a read makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// A Get of one key.
    Get,
    /// A MultiGet of the keys a node is asked for.
    MultiGet,
    /// A Scan page per item, each item one partition's encoded `ScanRequest`.
    Scan,
}

/// What a node answered for one item.
#[derive(Debug)]
pub(crate) enum Reply {
    /// A key's value, or that there is none, with its staleness.
    Get(GetResponse),
    /// A page of a partition's keys, with its staleness.
    Scan(ScanResponse),
}

/// An item's answer and how it was routed.
#[derive(Debug)]
pub(crate) struct Routed {
    pub(crate) reply: Reply,
    pub(crate) route: Route,
}

impl Routed {
    /// The answer of a Get or a MultiGet key.
    pub(crate) fn into_answer(self) -> Answer<Vec<u8>> {
        let partition = self.route.partition;
        match self.reply {
            Reply::Get(response) => answer_of(response, partition, self.route),
            // A key's call never answers with a page; if it did, it found nothing.
            Reply::Scan(page) => answer_of(
                GetResponse {
                    found: false,
                    value: None,
                    read: page.read,
                },
                partition,
                self.route,
            ),
        }
    }
}

/// What a node answered for one key.
#[derive(Debug)]
pub(crate) enum KeyOutcome {
    /// The value, or that there is none, with its staleness.
    Answered(Reply),
    /// Why the node could not read this key.
    Failed(AttemptError),
}

/// What came of one call.
#[derive(Debug)]
pub(crate) enum CallOutcome {
    /// The node answered, for each key in the order asked; `holders` names the holders of
    /// partitions it did not hold.
    Answered {
        keys: Vec<KeyOutcome>,
        holders: Vec<PartitionHolders>,
    },
    /// The call failed as a whole, maybe naming the partition's holders.
    Failed(AttemptError, Option<PartitionHolders>),
}

/// A call on its way.
pub(crate) type CallFuture = Pin<Box<dyn Future<Output = CallOutcome> + Send + 'static>>;

/// What a read needs from the client: plans from its view, calls to nodes, and corrections
/// to the view.
pub(crate) trait Nodes {
    /// Returns the plan for `partition` under the read's policy, leaving out `asked`.
    fn plan(&self, partition: u32, asked: &[String]) -> Vec<Target>;
    /// Sends one call for `keys` (one for a Get) to `target`, until `deadline`.
    fn call(&self, op: Op, target: &Target, keys: Vec<Vec<u8>>, deadline: Instant) -> CallFuture;
    /// Patches the view from the holders a node named.
    fn correct(&self, holders: &PartitionHolders);
    /// Notes that a node did not answer (unreachable, or stalled): it is asked last for a
    /// while.
    fn unresponsive(&self, node_id: &str);
    /// Notes that a node answered a call.
    fn answered(&self, node_id: &str);
    /// Fetches a fresh view, and waits for it.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Fetches a fresh view in the background.
    fn refresh_later(&self);
}

/// One read: its keys and settings.
#[derive(Debug)]
pub(crate) struct Read<'a> {
    /// Get or MultiGet.
    pub(crate) op: Op,
    /// The keys.
    pub(crate) keys: &'a [&'a [u8]],
    /// Each key's partition.
    pub(crate) partitions: Vec<u32>,
    /// How long the read may take, all calls included.
    pub(crate) timeout: Duration,
    /// The hedge delay, if the read hedges.
    pub(crate) hedge: Option<Duration>,
    /// The read policy, described (for a read that no copy qualifies for).
    pub(crate) policy: String,
}

/// How a key was settled.
#[derive(Debug)]
enum Settled {
    /// Call `call` answered it.
    Answered { call: GroupId, response: Reply },
    /// A node refused it for a reason any node would give.
    Rejected(AttemptError),
    /// No copy of its partition qualifies under the policy.
    NoCopy,
}

/// One call made, by group id (the fan-out numbers its groups in the order they are made).
#[derive(Debug)]
struct Call {
    target: Target,
    keys: Vec<usize>,
    sent: Sent,
    started: Instant,
    /// How it ended, once it did: how long it took, and its error (`None`: it answered).
    ended: Option<(Duration, Option<AttemptError>)>,
    /// Keys it could not answer while answering the others.
    key_errors: Vec<(usize, AttemptError)>,
    /// When the next copy is asked as a hedge.
    hedge_at: Option<Instant>,
    /// When the next copy is asked because this one stalls.
    stall_at: Option<Instant>,
}

/// Reads `read.keys`: see the [module](self) documentation. Returns each key's answer, or
/// why it has none.
pub(crate) async fn read<N: Nodes>(
    nodes: &N,
    hedger: &Hedger,
    counters: &Counters,
    read: &Read<'_>,
) -> Vec<Result<Routed, ReadError>> {
    let deadline = Instant::now() + read.timeout;
    counters
        .reads
        .fetch_add(read.keys.len() as u64, Ordering::Relaxed);
    let mut fanout = FanOut::new(read.partitions.clone(), |p| nodes.plan(p, &[]));
    if !fanout.exhausted().is_empty() {
        // Maybe the view is stale: one refresh, then plan again.
        refresh_until(nodes, deadline).await;
        for partition in fanout.exhausted() {
            fanout.replan(partition, nodes.plan(partition, &[]));
        }
    }
    let mut race = Race {
        nodes,
        hedger,
        counters,
        read,
        deadline,
        settled: (0..fanout.keys()).map(|_| None).collect(),
        fanout,
        calls: Vec::new(),
        running: JoinSet::new(),
        refreshed: false,
    };
    for partition in race.fanout.exhausted() {
        race.settle_partition(partition, || Settled::NoCopy);
    }
    let first = race.fanout.start();
    race.send(first, Sent::First);
    race.run().await;
    race.finish()
}

/// Fetches a fresh view, for no longer than until `deadline`.
async fn refresh_until<N: Nodes>(nodes: &N, deadline: Instant) {
    let _ = tokio::time::timeout_at(deadline, nodes.refresh()).await;
}

/// A read under way.
struct Race<'r, N> {
    nodes: &'r N,
    hedger: &'r Hedger,
    counters: &'r Counters,
    read: &'r Read<'r>,
    deadline: Instant,
    fanout: FanOut,
    calls: Vec<Call>,
    running: JoinSet<(GroupId, CallOutcome)>,
    settled: Vec<Option<Settled>>,
    /// Whether a fresh view was fetched because every planned copy failed.
    refreshed: bool,
}

impl<N: Nodes> Race<'_, N> {
    /// Runs until every key is settled, nothing is left to ask, or the deadline.
    async fn run(&mut self) {
        loop {
            if self.fanout.is_done() {
                return;
            }
            if self.running.is_empty() && !self.resume().await {
                return;
            }
            let timer = self.next_timer();
            tokio::select! {
                joined = self.running.join_next() => {
                    if let Some(Ok((call, outcome))) = joined {
                        self.on_call(call, outcome);
                    }
                }
                _ = tokio::time::sleep_until(timer.unwrap_or(self.deadline)), if timer.is_some() => {
                    self.on_timers(Instant::now());
                }
                _ = tokio::time::sleep_until(self.deadline) => return,
            }
        }
    }

    /// Sends a call per group; `sent` says why.
    fn send(&mut self, groups: Vec<Group>, sent: Sent) {
        let now = Instant::now();
        let remaining = self.deadline.saturating_duration_since(now);
        for group in groups {
            debug_assert_eq!(group.id, self.calls.len(), "groups come in the order made");
            let has_next = self.fanout.copies_left(group.id) > 0;
            let hedge_at = match (sent, self.read.hedge) {
                (Sent::First, Some(delay)) if has_next => Some(now + delay),
                _ => None,
            };
            if sent == Sent::First {
                self.hedger.first_call();
            }
            let keys = group
                .keys
                .iter()
                .map(|&k| self.read.keys[k].to_vec())
                .collect();
            let call = self
                .nodes
                .call(self.read.op, &group.target, keys, self.deadline);
            let id = group.id;
            self.running.spawn(async move { (id, call.await) });
            self.calls.push(Call {
                stall_at: self.fanout.stall_after(group.id, remaining).map(|share| {
                    now + match self.hedger.stall_delay(self.read.op) {
                        Some(stall) => share.min(stall),
                        None => share,
                    }
                }),
                target: group.target,
                keys: group.keys,
                sent,
                started: now,
                ended: None,
                key_errors: Vec::new(),
                hedge_at,
            });
        }
    }

    /// When the next timer of a running call fires.
    fn next_timer(&self) -> Option<Instant> {
        self.calls
            .iter()
            .filter(|call| call.ended.is_none())
            .flat_map(|call| [call.hedge_at, call.stall_at])
            .flatten()
            .min()
    }

    /// Asks the next copies for the calls whose hedge delay or share of the deadline is up.
    fn on_timers(&mut self, now: Instant) {
        for id in 0..self.calls.len() {
            let call = &mut self.calls[id];
            if call.ended.is_some() {
                continue;
            }
            if call.stall_at.is_some_and(|at| at <= now) {
                call.stall_at = None;
                call.hedge_at = None;
                let node = call.target.node_id.clone();
                if self.fanout.copies_left(id) == 0 {
                    continue;
                }
                // It stalled: asked last for a while, whether or not this read moves on.
                self.nodes.unresponsive(&node);
                if self.hedger.try_failover() {
                    tracing::debug!(node = %node, "no answer within its share of the deadline");
                    self.counters.failovers.fetch_add(1, Ordering::Relaxed);
                    let next = self.fanout.move_on(id);
                    self.send(next, Sent::AfterStall);
                } else {
                    tracing::debug!(node = %node, "a stalled copy kept: the failover budget is spent");
                }
            } else if call.hedge_at.is_some_and(|at| at <= now) {
                call.hedge_at = None;
                if self.fanout.copies_left(id) > 0 && self.hedger.try_hedge() {
                    self.counters.hedges_sent.fetch_add(1, Ordering::Relaxed);
                    let next = self.fanout.move_on(id);
                    self.send(next, Sent::Hedge);
                }
            }
        }
    }

    /// Takes in what a call came to.
    fn on_call(&mut self, id: GroupId, outcome: CallOutcome) {
        let call = &mut self.calls[id];
        let elapsed = call.started.elapsed();
        call.hedge_at = None;
        call.stall_at = None;
        match outcome {
            CallOutcome::Answered { keys, holders } if keys.len() == call.keys.len() => {
                call.ended = Some((elapsed, None));
                self.nodes.answered(&call.target.node_id);
                self.hedger.record(self.read.op, elapsed);
                for hint in &holders {
                    self.nodes.correct(hint);
                    self.counters
                        .misroutes_corrected
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.on_answer(id, keys);
            }
            CallOutcome::Answered { keys, .. } => {
                let error = AttemptError::Status {
                    code: tonic::Code::Internal,
                    reason: String::new(),
                    message: format!("{} results for {} keys", keys.len(), call.keys.len()),
                };
                self.on_failure(id, elapsed, error, None);
            }
            CallOutcome::Failed(error, hint) => self.on_failure(id, elapsed, error, hint),
        }
    }

    /// A call answered: each of its keys is answered, refused, or goes on to its next copy.
    fn on_answer(&mut self, id: GroupId, outcomes: Vec<KeyOutcome>) {
        let keys = self.calls[id].keys.clone();
        let sent = self.calls[id].sent;
        let mut retry = Vec::new();
        let mut misrouted = Vec::new();
        for (key, outcome) in keys.into_iter().zip(outcomes) {
            match outcome {
                KeyOutcome::Answered(response) => {
                    if self.fanout.settle(key) {
                        self.count_answer(sent);
                        self.settled[key] = Some(Settled::Answered { call: id, response });
                    }
                }
                KeyOutcome::Failed(error) => {
                    self.calls[id].key_errors.push((key, error.clone()));
                    let partition = self.fanout.partition_of(key);
                    if error == AttemptError::NotHosted {
                        misrouted.push(partition);
                    }
                    if calls::retriable(&error) {
                        retry.push(partition);
                    } else if self.fanout.settle(key) {
                        self.settled[key] = Some(Settled::Rejected(error));
                    }
                }
            }
        }
        self.replan(&misrouted);
        let next = self.fanout.move_on_partitions(id, &retry);
        self.send(next, Sent::AfterFailure);
    }

    /// A call failed as a whole: its keys go on to their next copies, or are refused if any
    /// node would refuse them.
    fn on_failure(
        &mut self,
        id: GroupId,
        elapsed: Duration,
        error: AttemptError,
        hint: Option<PartitionHolders>,
    ) {
        self.calls[id].ended = Some((elapsed, Some(error.clone())));
        match &error {
            AttemptError::NotHosted => {
                if let Some(hint) = &hint {
                    self.nodes.correct(hint);
                    self.counters
                        .misroutes_corrected
                        .fetch_add(1, Ordering::Relaxed);
                }
                let partitions = self.fanout.partitions_of(id).to_vec();
                self.replan(&partitions);
            }
            AttemptError::Unreachable(_) | AttemptError::TimedOut => {
                self.nodes.unresponsive(&self.calls[id].target.node_id);
            }
            AttemptError::Cancelled | AttemptError::Status { .. } => {}
        }
        if calls::retriable(&error) {
            let next = self.fanout.move_on(id);
            self.send(next, Sent::AfterFailure);
        } else {
            for key in self.calls[id].keys.clone() {
                if self.fanout.settle(key) {
                    self.settled[key] = Some(Settled::Rejected(error.clone()));
                }
            }
        }
    }

    /// Plans misrouted partitions again from the patched view (the rest of their plans came
    /// from the stale one), and refreshes the view in the background.
    fn replan(&mut self, partitions: &[u32]) {
        if partitions.is_empty() {
            return;
        }
        for &partition in partitions {
            let fresh = self.nodes.plan(partition, self.fanout.asked(partition));
            self.fanout.replan(partition, fresh);
        }
        self.nodes.refresh_later();
    }

    /// With nothing running and keys unsettled: asks their next copies; if none is left,
    /// fetches a fresh view once and plans them again. Returns whether anything was sent.
    async fn resume(&mut self) -> bool {
        let mut next = self.fanout.resume();
        if next.is_empty() && !self.refreshed {
            self.refreshed = true;
            refresh_until(self.nodes, self.deadline).await;
            let waiting: Vec<u32> = self
                .fanout
                .unsettled()
                .into_iter()
                .map(|key| self.fanout.partition_of(key))
                .collect();
            for partition in waiting {
                let fresh = self.nodes.plan(partition, self.fanout.asked(partition));
                self.fanout.replan(partition, fresh);
            }
            next = self.fanout.resume();
        }
        let sent = !next.is_empty();
        self.send(next, Sent::AfterFailure);
        sent
    }

    fn count_answer(&self, sent: Sent) {
        let counter = match sent {
            Sent::First => &self.counters.first_hop_answers,
            Sent::AfterFailure | Sent::Hedge | Sent::AfterStall => &self.counters.fallback_answers,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if sent == Sent::Hedge {
            self.counters.hedges_won.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn settle_partition(&mut self, partition: u32, why: impl Fn() -> Settled) {
        for key in self.fanout.unsettled() {
            if self.fanout.partition_of(key) == partition && self.fanout.settle(key) {
                self.settled[key] = Some(why());
            }
        }
    }

    /// Every call that asked for `key`, in the order made; the one that answered it last.
    fn attempts(&self, key: usize, answered_by: Option<GroupId>) -> Vec<Attempt> {
        let mut attempts = Vec::new();
        let mut answering = None;
        for (id, call) in self.calls.iter().enumerate() {
            if !call.keys.contains(&key) {
                continue;
            }
            let key_error = call
                .key_errors
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, error)| error.clone());
            let (elapsed, error) = match &call.ended {
                Some((elapsed, error)) => (*elapsed, key_error.or_else(|| error.clone())),
                // Still running: dropped because another call answered, or out of time.
                None => (
                    call.started.elapsed(),
                    Some(if answered_by.is_some() {
                        AttemptError::Cancelled
                    } else {
                        AttemptError::TimedOut
                    }),
                ),
            };
            let attempt = Attempt {
                node_id: call.target.node_id.clone(),
                address: call.target.address.clone(),
                sent: call.sent,
                elapsed,
                error,
            };
            if Some(id) == answered_by {
                answering = Some(attempt);
            } else {
                attempts.push(attempt);
            }
        }
        attempts.extend(answering);
        attempts
    }

    /// Each key's answer, or why it has none.
    fn finish(mut self) -> Vec<Result<Routed, ReadError>> {
        let out_of_time = Instant::now() >= self.deadline || !self.running.is_empty();
        let settled = std::mem::take(&mut self.settled);
        settled
            .into_iter()
            .enumerate()
            .map(|(key, settled)| {
                let partition = self.fanout.partition_of(key);
                match settled {
                    Some(Settled::Answered { call, response }) => {
                        let route = Route {
                            partition,
                            plan: self.fanout.plan(partition),
                            attempts: self.attempts(key, Some(call)),
                        };
                        Ok(Routed {
                            reply: response,
                            route,
                        })
                    }
                    Some(Settled::Rejected(error)) => Err(ReadError::Rejected {
                        partition,
                        error,
                        attempts: self.attempts(key, None),
                    }),
                    Some(Settled::NoCopy) => Err(ReadError::NoCopy {
                        partition,
                        policy: self.read.policy.clone(),
                    }),
                    None if out_of_time => Err(ReadError::TimedOut {
                        partition,
                        timeout: self.read.timeout,
                        attempts: self.attempts(key, None),
                    }),
                    None => Err(ReadError::Failed {
                        partition,
                        attempts: self.attempts(key, None),
                    }),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
