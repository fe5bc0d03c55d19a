//! The web console: a page on the metrics port (`/console`, one HTML file with its script,
//! no build step) that shows the cluster as this node's gossip view sees it, updating every
//! second from `/console/cluster.json`: every node with its liveness, status and load; a map
//! of nodes × partitions with each copy's role and lag; ingest and lag over the last
//! minutes (kept by the page); failed copies with their error; and a key lookup
//! (`/console/lookup?key=…`) that shows the routing decision (the key's partition, its
//! holders best first, who answered and how fresh) and the value as JSON. Each of the
//! node's stores has its own map and lookups (`&store=…`; the first store otherwise); the
//! page lets one choose.
//!
//! A lookup shows a customer's value, so it is answered only on a loopback metrics address
//! (reach it through a tunnel or a port-forward); the map shows no values.

use std::sync::Arc;

use kstore_core::cluster::{ClusterView, role_name};
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::query_server::Query as _;
use kstore_proto::v1::{CustomerFeatures, GetRequest, get_response};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::grpc::query::QueryService;

/// The page.
pub const PAGE: &str = include_str!("console.html");

/// One store as the console shows it.
#[derive(Clone)]
struct ConsoleStore {
    name: String,
    partitions: u32,
    view: watch::Receiver<Arc<ClusterView>>,
    query: QueryService,
    /// The value type of the store's `value-type`, to print values as JSON.
    value_type: Option<MessageDescriptor>,
}

/// What the console answers from, set once the node's gossip and gRPC service are up: every
/// store of the node, its first store first (a request names one as `store=…`; the first
/// is shown otherwise).
#[derive(Clone)]
pub struct Console {
    node_id: String,
    stores: Vec<ConsoleStore>,
    /// Whether key lookups are answered (a loopback metrics address).
    lookups: bool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("node_id", &self.node_id)
            .field("lookups", &self.lookups)
            .finish_non_exhaustive()
    }
}

/// Why a console request was not answered.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleRefused {
    /// The metrics address is not loopback (lookups only).
    NotLoopback,
    /// No key was given, or it is not UTF-8 text after percent-decoding (lookups only).
    NoKey,
    /// The request names a store the node does not serve.
    UnknownStore {
        /// The name asked for.
        name: String,
        /// The stores the node serves.
        served: String,
    },
}

impl ConsoleRefused {
    /// What the console answers: its HTTP status and message.
    pub fn message(&self) -> String {
        match self {
            ConsoleRefused::NotLoopback => "key lookups show stored values, so the console \
                answers them only on a loopback metrics address: reach it through a tunnel \
                or a port-forward"
                .into(),
            ConsoleRefused::NoKey => "give a key: /console/lookup?key=customer-000042".into(),
            ConsoleRefused::UnknownStore { name, served } => {
                format!("no store named {name:?}; this node serves {served}")
            }
        }
    }
}

impl Console {
    /// A console of node `node_id` with no store yet (see [`Console::with_store`]);
    /// `lookups` says whether key lookups are answered.
    pub fn new(node_id: &str, lookups: bool) -> Console {
        Console {
            node_id: node_id.to_owned(),
            stores: Vec::new(),
            lookups,
        }
    }

    /// The console showing `store` too (of `partitions` partitions, with its cluster view),
    /// reading it through `query`; `values` says how its values are typed.
    pub fn with_store(
        mut self,
        store: &str,
        partitions: u32,
        view: watch::Receiver<Arc<ClusterView>>,
        query: QueryService,
        values: &crate::grpc::ValueFormat,
    ) -> Console {
        let value_type = values.descriptor_set.as_deref().and_then(|set| {
            let pool = DescriptorPool::decode(set).ok()?;
            let name = values.type_url.as_deref()?.rsplit('/').next()?;
            pool.get_message_by_name(name)
        });
        self.stores.push(ConsoleStore {
            name: store.to_owned(),
            partitions,
            view,
            query,
            value_type,
        });
        self
    }

    /// The store that `query`'s `store=` names, or the first store if it names none.
    fn store(&self, query: Option<&str>) -> Result<&ConsoleStore, ConsoleRefused> {
        let first = self
            .stores
            .first()
            .ok_or_else(|| ConsoleRefused::UnknownStore {
                name: String::new(),
                served: "no store yet".into(),
            })?;
        match parameter(query, "store").filter(|name| !name.is_empty()) {
            None => Ok(first),
            Some(name) => self
                .stores
                .iter()
                .find(|store| store.name == name)
                .ok_or_else(|| ConsoleRefused::UnknownStore {
                    name,
                    served: self
                        .stores
                        .iter()
                        .map(|store| store.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
        }
    }

    /// The cluster as this node's view of the store that `query` names (`store=…`, the
    /// first store if none) sees it.
    pub fn cluster_json(&self, query: Option<&str>) -> Result<Value, ConsoleRefused> {
        let store = self.store(query)?;
        let view = store.view.borrow().clone();
        let nodes: Vec<Value> = view
            .nodes
            .iter()
            .map(|node| {
                json!({
                    "node_id": node.node_id,
                    "grpc_address": node.grpc_address,
                    "liveness": node.liveness.as_str_name().trim_start_matches("LIVENESS_").to_lowercase(),
                    "status": node.status.as_str_name().trim_start_matches("NODE_STATUS_").to_lowercase(),
                    "conflicting": node.conflicting,
                    "ingest_rate": node.load.ingest_rate,
                    "reads_in_flight": node.load.reads_in_flight,
                    "copies": node.copies.iter().map(|copy| json!({
                        "partition": copy.partition,
                        "role": role_name(copy.role),
                        "input_offset": copy.input_offset,
                        "lag": copy.lag,
                    })).collect::<Vec<_>>(),
                    "copy_errors": node.copy_errors,
                })
            })
            .collect();
        Ok(json!({
            "cluster_id": view.cluster_id,
            "version": view.version,
            "seen_from": self.node_id,
            "store": store.name,
            "stores": self.stores.iter().map(|store| store.name.as_str()).collect::<Vec<_>>(),
            "partitions": store.partitions,
            "lookups": self.lookups,
            "nodes": nodes,
        }))
    }

    /// Reads `query`'s `key=` of its `store=` (the first store if none) as a client would
    /// through this node (which forwards it if it holds no copy), and says how it was
    /// routed.
    pub async fn lookup(&self, query: Option<&str>) -> Result<Value, ConsoleRefused> {
        if !self.lookups {
            return Err(ConsoleRefused::NotLoopback);
        }
        let store = self.store(query)?;
        let key = parameter(query, "key")
            .filter(|key| !key.is_empty())
            .ok_or(ConsoleRefused::NoKey)?;
        let partition = partition_for_key(key.as_bytes(), store.partitions);
        let holders: Vec<Value> = {
            let view = store.view.borrow();
            view.holders(partition)
                .iter()
                .map(|holder| {
                    json!({
                        "node_id": holder.node.node_id,
                        "role": role_name(holder.copy.role),
                        "lag": holder.copy.lag,
                        "liveness": holder.node.liveness.as_str_name().trim_start_matches("LIVENESS_").to_lowercase(),
                    })
                })
                .collect()
        };
        let started = std::time::Instant::now();
        let request = tonic::Request::new(GetRequest {
            store: store.name.clone(),
            key: key.clone().into_bytes(),
            partition: None,
            options: None,
        });
        let answer = match store.query.get(request).await {
            Ok(response) => {
                let response = response.into_inner();
                let read = response.read.unwrap_or_default();
                let value = match response.value {
                    Some(get_response::Value::Raw(bytes)) => store.value_json(None, &bytes),
                    Some(get_response::Value::Message(any)) => {
                        store.value_json(Some(&any.type_url), &any.value)
                    }
                    None => Value::Null,
                };
                json!({
                    "found": response.found,
                    "value": value,
                    "node_id": read.node_id,
                    "role": role_name(read.role()),
                    "input_offset": read.input_offset,
                    "lag": read.lag,
                    "forwarded": read.node_id != self.node_id,
                })
            }
            Err(status) => json!({ "error": format!("{:?}: {}", status.code(), status.message()) }),
        };
        Ok(json!({
            "store": store.name,
            "key": key,
            "partition": partition,
            "asked": self.node_id,
            "holders": holders,
            "answer": answer,
            "elapsed_ms": started.elapsed().as_secs_f64() * 1_000.0,
        }))
    }
}

impl ConsoleStore {
    /// A value as JSON: the store's value type or the built-in features, field by field;
    /// else UTF-8 text, else the bytes.
    fn value_json(&self, type_url: Option<&str>, bytes: &[u8]) -> Value {
        if let (Some(message), Some(_)) = (&self.value_type, type_url)
            && let Ok(decoded) = DynamicMessage::decode(message.clone(), bytes)
        {
            return serde_json::to_value(&decoded).unwrap_or(Value::Null);
        }
        if type_url == Some(kstore_proto::CUSTOMER_FEATURES_TYPE_URL)
            && let Ok(features) = CustomerFeatures::decode(bytes)
        {
            return serde_json::to_value(features).unwrap_or(Value::Null);
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => Value::String(text.to_owned()),
            Err(_) => Value::Array(bytes.iter().map(|b| Value::from(*b)).collect()),
        }
    }
}

/// The value of `name` in a query string (`a=1&b=2`), percent-decoded; `None` if it is
/// missing or not UTF-8.
fn parameter(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .and_then(percent_decode)
}

/// Decodes a query parameter's `%XX` escapes and `+`; `None` if that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.bytes();
    while let Some(byte) = rest.next() {
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let high = (rest.next()? as char).to_digit(16)?;
                let low = (rest.next()? as char).to_digit(16)?;
                bytes.push((high * 16 + low) as u8);
            }
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_decode_or_are_refused() {
        assert_eq!(
            percent_decode("customer-000042").as_deref(),
            Some("customer-000042")
        );
        assert_eq!(percent_decode("a%20b+c%2F").as_deref(), Some("a b c/"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("%ff%fe"), None);
        let query = Some("store=tally&key=word%2D01&keys=x");
        assert_eq!(parameter(query, "store").as_deref(), Some("tally"));
        assert_eq!(parameter(query, "key").as_deref(), Some("word-01"));
        assert_eq!(parameter(query, "ke"), None);
        assert_eq!(parameter(None, "key"), None);
    }
}
