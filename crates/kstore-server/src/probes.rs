//! The node's probes, served on the metrics port: `/startupz`, `/readyz` and `/livez` answer
//! 200 or 503 with a line per thing checked. The rules are `kstore_core::probes`; this
//! module gathers what they look at: the registry's copies and status, the cluster view, the
//! shutdown flag, and a [`Pulse`] per loop (ingest, state updater, gossip, gRPC server).
//!
//! - `/startupz`: the stores of the node's first assignment are open (gRPC health SERVING).
//! - `/readyz`: started, not leaving, and every local copy within `probes.max-lag` input
//!   records (or nothing live elsewhere is fresher by more than that).
//! - `/livez`: no loop has gone `probes.stall-after-ms` without a round, outside a step known
//!   to be long (opening, bootstrapping or handing over copies); always 200 while leaving.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kstore_core::cluster::ClusterView;
use kstore_core::probes::{self, Activity, LocalCopy, LoopState, Phase, ProbeReport};
use kstore_proto::v1::NodeStatus;
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::registry::Registry;

const NOT_STARTED: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;

/// What one loop of the node says about itself: that it came around (`beat`), that it is
/// inside a step known to be long (`busy`), or that it ended (`stop`).
#[derive(Debug)]
pub struct Pulse {
    name: String,
    beats: bool,
    origin: Instant,
    state: AtomicU8,
    last_beat_ms: AtomicU64,
    busy: Mutex<Option<(String, Instant)>>,
}

impl Pulse {
    /// Returns the pulse of a loop that beats on every round.
    pub fn beating(name: impl Into<String>) -> Self {
        Self::new(name, true)
    }

    /// Returns the pulse of something that runs without rounds (a server): only whether it
    /// started and whether it stopped count.
    pub fn steady(name: impl Into<String>) -> Self {
        Self::new(name, false)
    }

    fn new(name: impl Into<String>, beats: bool) -> Self {
        Pulse {
            name: name.into(),
            beats,
            origin: Instant::now(),
            state: AtomicU8::new(NOT_STARTED),
            last_beat_ms: AtomicU64::new(0),
            busy: Mutex::new(None),
        }
    }

    /// Records a round of the loop (the first one starts it).
    pub fn beat(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_beat_ms.store(now, Ordering::Relaxed);
        let _ =
            self.state
                .compare_exchange(NOT_STARTED, RUNNING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Marks the loop as inside a step known to be long, until the guard is dropped (which
    /// counts as a round).
    pub fn busy(&self, what: &str) -> Busy<'_> {
        self.beat();
        *self.busy.lock().unwrap_or_else(|e| e.into_inner()) = Some((what.into(), Instant::now()));
        Busy(self)
    }

    /// Records that the loop ended.
    pub fn stop(&self) {
        self.state.store(STOPPED, Ordering::Release);
    }

    fn state(&self) -> LoopState {
        let activity = match self.state.load(Ordering::Acquire) {
            NOT_STARTED => Activity::NotStarted,
            STOPPED => Activity::Stopped,
            _ => match &*self.busy.lock().unwrap_or_else(|e| e.into_inner()) {
                Some((what, since)) => Activity::Busy {
                    what: what.clone(),
                    since: since.elapsed(),
                },
                None if self.beats => {
                    let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
                    Activity::Beating {
                        since: self.origin.elapsed().saturating_sub(last),
                    }
                }
                None => Activity::Running,
            },
        };
        LoopState {
            name: self.name.clone(),
            activity,
        }
    }
}

/// A loop's long step; dropping it ends the step.
#[derive(Debug)]
pub struct Busy<'a>(&'a Pulse);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0.beat();
    }
}

/// What the probes look at of one store.
#[derive(Debug)]
pub struct ProbedStore {
    name: String,
    registry: Arc<Registry>,
    view: OnceLock<watch::Receiver<Arc<ClusterView>>>,
    /// The store's ingest loop: one round per poll of its group consumer.
    pub ingest: Arc<Pulse>,
    /// The store's state updater thread: one round per command or changelog poll.
    pub updater: Arc<Pulse>,
}

impl ProbedStore {
    /// Gives readiness the store's cluster view, once gossip runs (until then, no copy
    /// elsewhere is known).
    pub fn watch_view(&self, view: watch::Receiver<Arc<ClusterView>>) {
        let _ = self.view.set(view);
    }
}

/// Everything the probes look at.
#[derive(Debug)]
pub struct Probes {
    stores: Vec<ProbedStore>,
    shutdown: Arc<AtomicBool>,
    max_lag: i64,
    stall_after: Duration,
    /// Gossip's publisher: one round per publish interval.
    pub gossip: Arc<Pulse>,
    /// The gRPC server: running until it stops.
    pub grpc: Arc<Pulse>,
}

impl Probes {
    /// Returns the probes of a node serving `stores` (each store's name and registry, the
    /// node's first store first); its loops report through the pulses.
    pub fn new(
        config: &NodeConfig,
        stores: Vec<(String, Arc<Registry>)>,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        let one_store = stores.len() == 1;
        let stores = stores
            .into_iter()
            .map(|(name, registry)| {
                // A node of one store names its loops as it always has.
                let of_store = |what: &str| match one_store {
                    true => what.to_owned(),
                    false => format!("{what} of store {name}"),
                };
                ProbedStore {
                    ingest: Arc::new(Pulse::beating(of_store("ingest"))),
                    updater: Arc::new(Pulse::beating(of_store("state updater"))),
                    name,
                    registry,
                    view: OnceLock::new(),
                }
            })
            .collect();
        Probes {
            stores,
            shutdown,
            max_lag: config.probes.max_lag,
            stall_after: Duration::from_millis(config.probes.stall_after_ms),
            gossip: Arc::new(Pulse::beating("gossip")),
            grpc: Arc::new(Pulse::steady("grpc server")),
        }
    }

    /// Returns what the probes look at of each store, the node's first store first.
    pub fn stores(&self) -> &[ProbedStore] {
        &self.stores
    }

    /// Running once every store's first assignment is open.
    fn phase(&self) -> Phase {
        if self.shutdown.load(Ordering::Relaxed) {
            Phase::Leaving
        } else if self
            .stores
            .iter()
            .all(|store| store.registry.status() == NodeStatus::Running)
        {
            Phase::Running
        } else {
            Phase::Starting
        }
    }

    /// Whether the node has started (`/startupz`).
    pub fn startup(&self) -> ProbeReport {
        probes::startup(self.phase())
    }

    /// Whether the node answers reads of every store within the staleness bound
    /// (`/readyz`).
    pub fn readiness(&self) -> ProbeReport {
        let phase = self.phase();
        let mut report = ProbeReport {
            pass: true,
            lines: Vec::new(),
        };
        for store in &self.stores {
            let of_store = store.readiness(phase, self.max_lag);
            report.pass &= of_store.pass;
            if self.stores.len() == 1 {
                report.lines = of_store.lines;
            } else {
                let name = &store.name;
                report.lines.extend(
                    of_store
                        .lines
                        .into_iter()
                        .map(|line| format!("store {name}: {line}")),
                );
            }
        }
        report
    }

    /// Whether the node's loops are alive (`/livez`).
    pub fn liveness(&self) -> ProbeReport {
        let mut loops: Vec<LoopState> = self
            .stores
            .iter()
            .flat_map(|store| [store.ingest.state(), store.updater.state()])
            .collect();
        loops.extend([self.gossip.state(), self.grpc.state()]);
        probes::liveness(&loops, self.phase(), self.stall_after)
    }
}

impl ProbedStore {
    fn readiness(&self, phase: Phase, max_lag: i64) -> ProbeReport {
        let copies: Vec<LocalCopy> = self
            .registry
            .all()
            .iter()
            .map(|copy| {
                let position = copy.position();
                LocalCopy {
                    partition: copy.partition as u32,
                    role: copy.role(),
                    input_offset: position.input_next,
                    lag: copy.input_end_known().then(|| copy.lag_at(position)),
                }
            })
            .collect();
        let view = self
            .view
            .get()
            .map(|view| view.borrow().clone())
            .unwrap_or_default();
        probes::readiness(phase, &copies, &view, self.registry.node_id(), max_lag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulse_reports_not_started_then_rounds_then_busy_then_stopped() {
        let pulse = Pulse::beating("ingest");
        assert_eq!(pulse.state().activity, Activity::NotStarted);
        pulse.beat();
        assert!(
            matches!(pulse.state().activity, Activity::Beating { since } if since < Duration::from_secs(5))
        );
        {
            let _busy = pulse.busy("opening assigned copies");
            assert!(
                matches!(&pulse.state().activity, Activity::Busy { what, .. } if what == "opening assigned copies")
            );
        }
        assert!(matches!(pulse.state().activity, Activity::Beating { .. }));
        pulse.stop();
        assert_eq!(pulse.state().activity, Activity::Stopped);
        let server = Pulse::steady("grpc server");
        server.beat();
        assert_eq!(server.state().activity, Activity::Running);
    }
}
