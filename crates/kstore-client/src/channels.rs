//! Connections to the nodes, by gRPC address, made on first use and shared (a tonic channel
//! reconnects by itself), and the reads in flight to each, for load-aware routing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// The most addresses kept; past it (nodes that came and went) the pool starts afresh.
const MAX_CHANNELS: usize = 1_024;

/// The pool.
#[derive(Debug)]
pub(crate) struct Channels {
    connect_timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
    channels: Mutex<HashMap<String, (Channel, Arc<AtomicU32>)>>,
}

/// Counts a read to a node as in flight while it lives.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Channels {
    pub(crate) fn new(
        connect_timeout: Duration,
        #[cfg(feature = "tls")] tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self {
        Channels {
            connect_timeout,
            #[cfg(feature = "tls")]
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn entry(&self, address: &str) -> Result<(Channel, Arc<AtomicU32>), String> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = channels.get(address) {
            return Ok(entry.clone());
        }
        #[cfg(feature = "tls")]
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        #[cfg(not(feature = "tls"))]
        let scheme = "http";
        let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|error| format!("{address:?} is not an address: {error}"))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        #[cfg(feature = "tls")]
        let endpoint = match &self.tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|error| format!("TLS for {address}: {error}"))?,
            None => endpoint,
        };
        if channels.len() >= MAX_CHANNELS {
            channels.clear();
        }
        let entry = (endpoint.connect_lazy(), Arc::new(AtomicU32::new(0)));
        channels.insert(address.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Returns the channel to `address`.
    pub(crate) fn get(&self, address: &str) -> Result<Channel, String> {
        self.entry(address).map(|(channel, _)| channel)
    }

    /// Returns the channel to `address`, counting a read to it until the guard drops.
    pub(crate) fn start_read(&self, address: &str) -> Result<(Channel, InFlight), String> {
        let (channel, count) = self.entry(address)?;
        count.fetch_add(1, Ordering::Relaxed);
        Ok((channel, InFlight(count)))
    }

    /// Returns this client's reads in flight to `address`.
    pub(crate) fn in_flight(&self, address: &str) -> u32 {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(address)
            .map_or(0, |(_, count)| count.load(Ordering::Relaxed))
    }
}
