//! Building a [`Client`]: its settings, checked, and the first view of the cluster.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::error::BuildError;
use crate::hedge::{Hedge, Hedger};
use crate::{Client, Counters, Inner, KeeperTask, ReadPolicy, channels, metadata};

/// Configures a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    pub(crate) seeds: Vec<String>,
    pub(crate) store: String,
    pub(crate) cluster_id: Option<String>,
    pub(crate) policy: ReadPolicy,
    pub(crate) hedge: Hedge,
    pub(crate) hedge_budget: f64,
    pub(crate) request_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) max_key_bytes: usize,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            seeds: Vec::new(),
            store: "features".into(),
            cluster_id: None,
            policy: ReadPolicy::default(),
            hedge: Hedge::default(),
            hedge_budget: 0.1,
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_millis(500),
            poll_interval: Duration::from_secs(10),
            max_key_bytes: 64 << 10,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

impl ClientBuilder {
    /// The gRPC addresses (`host:port`) of nodes to learn the cluster from; any one that
    /// answers will do.
    pub fn seeds<S: Into<String>>(mut self, seeds: impl IntoIterator<Item = S>) -> Self {
        self.seeds = seeds.into_iter().map(Into::into).collect();
        self
    }

    /// The store to read (default `features`).
    pub fn store(mut self, store: impl Into<String>) -> Self {
        self.store = store.into();
        self
    }

    /// Refuses nodes of any other cluster (default: the cluster of the first seed that
    /// answers).
    pub fn cluster_id(mut self, cluster_id: impl Into<String>) -> Self {
        self.cluster_id = Some(cluster_id.into());
        self
    }

    /// The default read policy (default `PreferActive { max_lag: 10_000 }`).
    pub fn read_policy(mut self, policy: ReadPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The default hedging (default: after the 99th percentile of recent latency, between
    /// 5 and 50 ms; see [`Hedge`]). Whatever it says, a copy that has not answered within
    /// its share of the time left gets the next copy asked as well.
    pub fn hedge(mut self, hedge: Hedge) -> Self {
        self.hedge = hedge;
        self
    }

    /// The most hedges as a share of calls, between 0 and 1 (default 0.1), so that hedging
    /// cannot double the load on a cluster that is slow everywhere. Passing over a copy that
    /// has not answered within its share of the deadline (what keeps a read answering while
    /// a node is paused) has a budget of its own, half the calls.
    pub fn hedge_budget(mut self, share: f64) -> Self {
        self.hedge_budget = share;
        self
    }

    /// How long a read may take, all attempts included (default 1 s). A copy that has not
    /// answered gets the next copy of the plan asked as well after an even share of it (half
    /// with one other copy), or sooner once it has taken ten times the p99 of this client's
    /// recent calls of its kind (at least 50 ms), so that a stalled node costs a read a
    /// little time and not the read.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long connecting to a node may take (default 500 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often the view is fetched whatever the watch stream does (default 10 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The longest key the client sends (default 64 KiB, the nodes' default).
    pub fn max_key_bytes(mut self, limit: usize) -> Self {
        self.max_key_bytes = limit;
        self
    }

    /// Connects to the nodes over TLS: seeds and the addresses the cluster view advertises
    /// are dialed with `https`, each verified by the host of its address (see
    /// [`tls_from_files`](crate::tls_from_files)).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: tonic::transport::ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Learns the cluster from the first seed that answers and starts keeping its view.
    /// Fails with every seed tried and why if none answers, or if the cluster is not the
    /// one asked for or does not serve the store.
    pub async fn build(self) -> Result<Client, BuildError> {
        if self.seeds.is_empty() {
            return Err(BuildError::NoSeeds);
        }
        self.validate()?;
        let channels = Arc::new(channels::Channels::new(
            self.connect_timeout,
            #[cfg(feature = "tls")]
            self.tls.clone(),
        ));
        let mut tried = Vec::new();
        let mut first = None;
        for seed in &self.seeds {
            let channel = channels.get(seed).map_err(|reason| BuildError::BadSeed {
                seed: seed.clone(),
                reason,
            })?;
            match metadata::fetch(channel).await {
                Ok(answer) => {
                    if let Some(expected) = &self.cluster_id
                        && answer.cluster_id != *expected
                    {
                        return Err(BuildError::WrongCluster {
                            seed: seed.clone(),
                            expected: expected.clone(),
                            found: answer.cluster_id,
                        });
                    }
                    first = Some(answer);
                    break;
                }
                Err(reason) => {
                    #[cfg(feature = "tls")]
                    let reason = if self.tls.is_some() {
                        crate::tls::explain_refusal(reason)
                    } else {
                        reason
                    };
                    #[cfg(not(feature = "tls"))]
                    let tls_configured = false;
                    #[cfg(feature = "tls")]
                    let tls_configured = self.tls.is_some();
                    let reason = if tls_configured {
                        reason
                    } else {
                        explain_plaintext_to_tls(reason)
                    };
                    tried.push((seed.clone(), reason));
                }
            }
        }
        let first = first.ok_or(BuildError::Unreachable { tried })?;
        let cache = Arc::new(metadata::MetadataCache::new(
            &first,
            self.seeds.clone(),
            &self.store,
        ));
        let store = cache
            .store(&self.store)
            .ok_or_else(|| BuildError::UnknownStore {
                store: self.store.clone(),
                served: cache.store_names(),
            })?;
        let keeper = tokio::spawn(
            cache
                .clone()
                .keep_current(channels.clone(), self.poll_interval),
        );
        Ok(Client {
            inner: Arc::new(Inner {
                hedger: Hedger::new(self.hedge_budget),
                builder: self,
                partitions: store.partitions,
                cache,
                channels,
                counters: Counters::default(),
                read_seed: AtomicU64::new(0),
                _keeper: KeeperTask(keeper),
            }),
        })
    }
}

impl ClientBuilder {
    /// Checks the settings, naming the first that is out of range.
    fn validate(&self) -> Result<(), BuildError> {
        let invalid = |setting: &'static str, reason: String| {
            Err(BuildError::InvalidSetting { setting, reason })
        };
        if let Err(reason) = self.hedge.validate() {
            return invalid("hedge", reason);
        }
        if !(0.0..=1.0).contains(&self.hedge_budget) {
            return invalid(
                "hedge_budget",
                format!("{} is not a share between 0 and 1", self.hedge_budget),
            );
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout", "a read needs some time".into());
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout", "connecting needs some time".into());
        }
        if self.poll_interval.is_zero() {
            return invalid("poll_interval", "it must be above zero".into());
        }
        if self.max_key_bytes == 0 {
            return invalid("max_key_bytes", "no key would fit".into());
        }
        if let ReadPolicy::PreferActive { max_lag } | ReadPolicy::AnyReplica { max_lag } =
            self.policy
            && max_lag < 0
        {
            return invalid(
                "read_policy",
                format!(
                    "max_lag {max_lag} is negative: no copy other than the active would qualify"
                ),
            );
        }
        Ok(())
    }
}

/// Adds what a plaintext call's failure most likely means when the node speaks TLS. The
/// node reads the client's HTTP/2 preface as a broken TLS handshake, sends an alert and
/// closes: the client either reads that alert as an HTTP/2 frame of an impossible size, or,
/// when the close wins the race, finds its connection dropped before any answer.
fn explain_plaintext_to_tls(reason: String) -> String {
    let tls_signs = [
        "frame with invalid size",
        "broken pipe",
        "connection reset",
        "connection closed",
        "stream closed",
    ];
    if tls_signs.iter().any(|sign| reason.contains(sign)) {
        format!(
            "{reason} (the node did not answer plaintext HTTP/2, most likely because it speaks \
             TLS: give its CA, and with mutual TLS a client certificate and key: --ca, --cert, \
             --key or KSTORE_CA, KSTORE_CERT, KSTORE_KEY)"
        )
    } else {
        reason
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds with one bad setting; the seed is never asked, since settings are checked
    /// first.
    async fn refused(builder: ClientBuilder) -> String {
        match builder.seeds(["127.0.0.1:1"]).build().await {
            Err(error @ BuildError::InvalidSetting { .. }) => error.to_string(),
            Err(error) => panic!("not a setting error: {error}"),
            Ok(_) => panic!("built"),
        }
    }

    #[tokio::test]
    async fn bad_settings_are_named_before_any_seed_is_asked() {
        let error = refused(Client::builder().hedge_budget(1.5)).await;
        assert!(
            error.contains("hedge_budget") && error.contains("1.5"),
            "{error}"
        );
        let error = refused(Client::builder().request_timeout(Duration::ZERO)).await;
        assert!(error.contains("request_timeout"), "{error}");
        let error =
            refused(Client::builder().read_policy(ReadPolicy::AnyReplica { max_lag: -1 })).await;
        assert!(error.contains("max_lag -1"), "{error}");
        let inverted = Hedge::Percentile {
            quantile: 0.9,
            min: Duration::from_millis(9),
            max: Duration::from_millis(1),
        };
        let error = refused(Client::builder().hedge(inverted)).await;
        assert!(error.starts_with("bad client setting hedge:"), "{error}");
    }

    #[test]
    fn a_plaintext_call_refused_either_way_by_a_tls_node_is_explained() {
        for reason in [
            "transport error: connection error: frame with invalid size",
            "transport error: connection error: stream closed because of a broken pipe",
        ] {
            let explained = explain_plaintext_to_tls(reason.to_string());
            assert!(
                explained.contains("most likely because it speaks TLS"),
                "{explained}"
            );
            assert!(explained.contains("--ca"), "{explained}");
        }
        let unrelated = "transport error: Connection refused (os error 111)";
        assert_eq!(explain_plaintext_to_tls(unrelated.to_string()), unrelated);
    }
}
