//! Hedging, and the budgets of asking a second copy: when a read asks the next copy of its
//! plan while the copy it asked is merely slow. The delay is fixed or follows recent latency
//! (a quantile of this client's answered calls, Gets and MultiGets apart), and a budget keeps
//! hedges to a tenth of the calls by default, so that hedging cannot double the load on a
//! cluster that is slow everywhere.
//!
//! Hedging is for the tail of normal latency. A copy that stalls outright (a paused process)
//! is passed over by the read's stall timer after ten times the p99 of recent latency (at
//! least 50 ms), or after its share of the deadline (see
//! [`kstore_core::routing::stall_after`]) if that comes first or too few calls answered yet
//! to know the p99, under a budget of its own that is far looser
//! (half the calls): enough for one stalled node among two or more, which the client then
//! asks last, but not for asking everything twice when every node is overloaded.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::routing::Op;

/// When a read is sent to a second copy while the first has not answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hedge {
    /// Never. A copy that does not answer is still passed over after its share of the
    /// deadline, or when it fails.
    Off,
    /// After a fixed delay.
    After(Duration),
    /// After the given quantile of this client's recent call latencies (Gets and MultiGets
    /// apart), kept between `min` and `max`; `max` until 20 calls have answered.
    Percentile {
        /// The quantile, between 0 and 1.
        quantile: f64,
        /// The shortest delay.
        min: Duration,
        /// The longest delay.
        max: Duration,
    },
}

impl Default for Hedge {
    /// After the 99th percentile of recent latency, between 5 and 50 ms.
    fn default() -> Self {
        Hedge::Percentile {
            quantile: 0.99,
            min: Duration::from_millis(5),
            max: Duration::from_millis(50),
        }
    }
}

impl Hedge {
    /// Checks the setting: a quantile between 0 and 1, and `min` at most `max`.
    pub(crate) fn validate(&self) -> Result<(), String> {
        match *self {
            Hedge::Off | Hedge::After(_) => Ok(()),
            Hedge::Percentile { quantile, min, max } => {
                if !(0.0..=1.0).contains(&quantile) {
                    return Err(format!("the quantile {quantile} is not between 0 and 1"));
                }
                if min > max {
                    return Err(format!(
                        "the shortest delay {min:?} is above the longest {max:?}"
                    ));
                }
                Ok(())
            }
        }
    }
}

/// The most latencies kept per kind of call.
const KEEP: usize = 1_024;

/// How many latencies a quantile needs before it is trusted.
const ENOUGH: usize = 20;

/// How many new latencies make a cached quantile stale.
const RECOMPUTE_EVERY: usize = 64;

/// Recent latencies of one kind of call, and the quantiles last computed from them.
#[derive(Debug, Default)]
struct Latencies {
    recent: VecDeque<Duration>,
    since_computed: usize,
    /// (quantile, value) computed since the cache was last cleared: the hedge delay's and
    /// the stall delay's, which may differ.
    cached: Vec<(f64, Duration)>,
}

impl Latencies {
    fn record(&mut self, latency: Duration) {
        if self.recent.len() == KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(latency);
        self.since_computed += 1;
    }

    /// Returns the quantile `q` of the recent latencies, recomputed once enough new ones
    /// came (sorting a thousand durations on every read would cost more than the read).
    fn quantile(&mut self, q: f64) -> Option<Duration> {
        if self.recent.len() < ENOUGH {
            return None;
        }
        if self.since_computed >= RECOMPUTE_EVERY {
            self.cached.clear();
            self.since_computed = 0;
        }
        if let Some(&(_, value)) = self.cached.iter().find(|(cached_q, _)| *cached_q == q) {
            return Some(value);
        }
        let mut sorted: Vec<Duration> = self.recent.iter().copied().collect();
        sorted.sort_unstable();
        let index = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        let value = sorted[index];
        self.cached.push((q, value));
        Some(value)
    }
}

/// A call unanswered for this many times the p99 of recent calls of its kind has stalled
/// (see [`Hedger::stall_delay`])...
const STALL_FACTOR: u32 = 10;

/// ...but never before this long: on a loaded machine scheduling alone takes milliseconds.
const STALL_MIN: Duration = Duration::from_millis(50);

/// The share of calls that may be passed over for stalling (the failover budget).
const FAILOVER_SHARE: f64 = 0.5;

/// A budget: a token bucket, counted in thousandths of a token. Each first call a read
/// makes earns `share` of a token, a hedge (or failover) spends one; the bucket starts with
/// a few tokens (so that a new client's first reads can use it) and keeps at most the
/// earnings of the last thousand calls, so that tokens saved up in quiet times cannot double
/// a burst.
#[derive(Debug)]
struct Budget {
    milli_tokens: u64,
    /// Thousandths of a token earned per call.
    earned_per_call: u64,
}

impl Budget {
    const TOKEN: u64 = 1_000;
    const START: u64 = 10 * Self::TOKEN;

    fn new(share: f64) -> Self {
        let earned_per_call = (share.clamp(0.0, 1.0) * Self::TOKEN as f64).round() as u64;
        Budget {
            // A tenth of the capacity, at least ten tokens.
            milli_tokens: (earned_per_call * 100).max(Self::START),
            earned_per_call,
        }
    }

    fn capacity(&self) -> u64 {
        (self.earned_per_call * 1_000).max(Self::START)
    }

    fn earn(&mut self) {
        self.milli_tokens = (self.milli_tokens + self.earned_per_call).min(self.capacity());
    }

    fn spend(&mut self) -> bool {
        match self.milli_tokens.checked_sub(Self::TOKEN) {
            Some(left) => {
                self.milli_tokens = left;
                true
            }
            None => false,
        }
    }
}

/// A client's hedging state: recent latencies and the budgets.
#[derive(Debug)]
pub(crate) struct Hedger {
    gets: Mutex<Latencies>,
    multi_gets: Mutex<Latencies>,
    scans: Mutex<Latencies>,
    budget: Mutex<Budget>,
    failovers: Mutex<Budget>,
}

impl Hedger {
    /// Returns a hedger whose hedges are at most `share` of the calls (between 0 and 1).
    pub(crate) fn new(share: f64) -> Self {
        Hedger {
            gets: Mutex::default(),
            multi_gets: Mutex::default(),
            scans: Mutex::default(),
            budget: Mutex::new(Budget::new(share)),
            failovers: Mutex::new(Budget::new(FAILOVER_SHARE)),
        }
    }

    fn latencies(&self, op: Op) -> std::sync::MutexGuard<'_, Latencies> {
        match op {
            Op::Get => &self.gets,
            Op::MultiGet => &self.multi_gets,
            Op::Scan => &self.scans,
        }
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns the hedge delay of a call of kind `op`, if it hedges at all.
    pub(crate) fn delay(&self, hedge: Hedge, op: Op) -> Option<Duration> {
        match hedge {
            Hedge::Off => None,
            Hedge::After(delay) => Some(delay),
            Hedge::Percentile { quantile, min, max } => Some(
                self.latencies(op)
                    .quantile(quantile)
                    .unwrap_or(max)
                    .clamp(min, max),
            ),
        }
    }

    /// How long a call of kind `op` may go unanswered before it counts as stalled: ten times
    /// the p99 of this client's recent calls of that kind, at least 50 ms; `None` until
    /// enough of them answered. A read passes over a stalled copy at this delay or after its
    /// share of the deadline, whichever comes first, so that a paused node costs the reads
    /// sent to it before anything noticed some multiple of normal latency, not half the
    /// deadline.
    pub(crate) fn stall_delay(&self, op: Op) -> Option<Duration> {
        self.latencies(op)
            .quantile(0.99)
            .map(|p99| (p99 * STALL_FACTOR).max(STALL_MIN))
    }

    /// Records how long an answered call of kind `op` took.
    pub(crate) fn record(&self, op: Op, latency: Duration) {
        self.latencies(op).record(latency);
    }

    /// Counts a read's first call towards the budgets.
    pub(crate) fn first_call(&self) {
        for budget in [&self.budget, &self.failovers] {
            budget
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .earn();
        }
    }

    /// Takes a hedge from the budget; false if it is spent.
    pub(crate) fn try_hedge(&self) -> bool {
        self.budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spend()
    }

    /// Takes a failover past a stalled copy from its budget; false if it is spent.
    pub(crate) fn try_failover(&self) -> bool {
        self.failovers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_percentile_delay_follows_recent_latency_within_its_bounds() {
        let hedger = Hedger::new(0.1);
        let hedge = Hedge::Percentile {
            quantile: 0.9,
            min: 2 * MS,
            max: 40 * MS,
        };
        // Too few answers yet: the longest delay.
        assert_eq!(hedger.delay(hedge, Op::Get), Some(40 * MS));
        for i in 1..=100u32 {
            hedger.record(Op::Get, i * MS / 10);
        }
        // The 90th percentile of 0.1..10 ms.
        assert_eq!(hedger.delay(hedge, Op::Get), Some(9 * MS));
        // MultiGets keep their own latencies.
        assert_eq!(hedger.delay(hedge, Op::MultiGet), Some(40 * MS));
        for _ in 0..KEEP {
            hedger.record(Op::Get, MS / 10);
        }
        assert_eq!(hedger.delay(hedge, Op::Get), Some(2 * MS), "kept above min");
        assert_eq!(hedger.delay(Hedge::Off, Op::Get), None);
        assert_eq!(hedger.delay(Hedge::After(7 * MS), Op::Get), Some(7 * MS));
    }

    #[test]
    fn a_call_has_stalled_after_ten_times_the_recent_p99_and_never_before_50_ms() {
        let hedger = Hedger::new(0.1);
        for _ in 0..ENOUGH - 1 {
            hedger.record(Op::Get, 20 * MS);
        }
        assert_eq!(hedger.stall_delay(Op::Get), None, "too few calls to know");
        hedger.record(Op::Get, 20 * MS);
        assert_eq!(hedger.stall_delay(Op::Get), Some(200 * MS));
        assert_eq!(
            hedger.stall_delay(Op::Scan),
            None,
            "each kind of call apart"
        );
        for _ in 0..100 {
            hedger.record(Op::Scan, MS);
        }
        assert_eq!(hedger.stall_delay(Op::Scan), Some(STALL_MIN));
        // The hedge delay's quantile and the stall delay's are cached side by side.
        let hedge = Hedge::Percentile {
            quantile: 0.5,
            min: MS,
            max: 50 * MS,
        };
        assert_eq!(hedger.delay(hedge, Op::Get), Some(20 * MS));
        assert_eq!(hedger.stall_delay(Op::Get), Some(200 * MS));
    }

    #[test]
    fn a_cached_quantile_is_recomputed_after_enough_new_latencies() {
        let mut latencies = Latencies::default();
        for _ in 0..100 {
            latencies.record(MS);
        }
        assert_eq!(latencies.quantile(0.9), Some(MS));
        for _ in 0..RECOMPUTE_EVERY - 1 {
            latencies.record(100 * MS);
        }
        assert_eq!(latencies.quantile(0.9), Some(MS), "still cached");
        latencies.record(100 * MS);
        assert_eq!(latencies.quantile(0.9), Some(100 * MS));
    }

    #[test]
    fn the_budget_allows_a_share_of_calls_and_does_not_save_up_without_bound() {
        let hedger = Hedger::new(0.1);
        // A new client may hedge its first reads.
        for _ in 0..10 {
            assert!(hedger.try_hedge());
        }
        assert!(!hedger.try_hedge());
        for _ in 0..10 {
            hedger.first_call();
        }
        assert!(hedger.try_hedge());
        assert!(!hedger.try_hedge());
        // A million quiet calls save up at most a thousand calls' worth.
        for _ in 0..1_000_000 {
            hedger.first_call();
        }
        let hedges = (0..1_000).take_while(|_| hedger.try_hedge()).count();
        assert_eq!(hedges, 100);
    }

    #[test]
    fn failovers_have_a_looser_budget_of_their_own() {
        let hedger = Hedger::new(0.0);
        // Fifty to start with (a tenth of the thousand calls' worth), then half the calls.
        let first = (0..1_000).take_while(|_| hedger.try_failover()).count();
        assert_eq!(first, 50);
        assert!(hedger.try_hedge(), "the hedge budget is another");
        for _ in 0..100 {
            hedger.first_call();
        }
        let next = (0..1_000).take_while(|_| hedger.try_failover()).count();
        assert_eq!(next, 50);
        for _ in 0..10_000 {
            hedger.first_call();
        }
        let saved = (0..10_000).take_while(|_| hedger.try_failover()).count();
        assert_eq!(saved, 500, "at most a thousand calls' worth");
    }

    #[test]
    fn bad_hedge_settings_are_named() {
        let bad = Hedge::Percentile {
            quantile: 1.5,
            min: MS,
            max: 2 * MS,
        };
        assert!(bad.validate().unwrap_err().contains("1.5"));
        let inverted = Hedge::Percentile {
            quantile: 0.5,
            min: 3 * MS,
            max: 2 * MS,
        };
        assert!(inverted.validate().unwrap_err().contains("above"));
        let nan = Hedge::Percentile {
            quantile: f64::NAN,
            min: MS,
            max: MS,
        };
        assert!(nan.validate().is_err());
        assert!(Hedge::default().validate().is_ok());
    }
}
