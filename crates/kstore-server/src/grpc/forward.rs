//! Forwarding: a read of a partition this node holds no copy of goes once to the best holder
//! in the cluster view, marked with [`FORWARDED_FROM`] so that the holder never forwards it
//! again. Plain gRPC clients (grpcurl, any generated client) get their answer from any node;
//! smart clients ask for no forwarding and fix their routing from the holders instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kstore_proto::v1::query_client::QueryClient;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// The request header that marks a forwarded read; its value names the forwarding node.
pub const FORWARDED_FROM: &str = "kstore-forwarded-from";

/// Reads forwarded to another node, by method and outcome.
pub const FORWARDED_READS: &str = "kstore_forwarded_reads_total";

/// How long connecting to a holder may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The most peers a node keeps a channel to; past it (nodes that came and went on other
/// addresses) the cache starts afresh.
const MAX_PEERS: usize = 1_024;

/// Channels to the other nodes, by gRPC address, made on first use and reused (a channel
/// reconnects by itself).
#[derive(Debug, Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
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
        let channel = endpoint.connect_lazy();
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

/// Wraps a read to forward: marked as forwarded by `node_id`, with `timeout` as its deadline.
pub fn forwarded<T>(message: T, node_id: &str, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    // Node ids are ASCII letters, digits, '-', '_' and '.' (checked at startup).
    let value =
        MetadataValue::try_from(node_id).unwrap_or_else(|_| MetadataValue::from_static("node"));
    request.metadata_mut().insert(FORWARDED_FROM, value);
    request
}
