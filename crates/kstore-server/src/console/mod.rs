//! The web console: a page on the metrics port (`/console`, one HTML file with its script,
//! no build step) that shows the cluster as this node's gossip view sees it, updating every
//! second from `/console/cluster.json`: every node with its liveness, status and load; a map
//! of nodes × partitions with each copy's role and lag; ingest and lag over the last
//! minutes (kept by the page); failed copies with their error; and a key lookup
//! (`/console/lookup?key=…`) that shows the routing decision (the key's partition, its
//! holders best first, who answered and how fresh) and the value as JSON.
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

/// What the console answers from, set once the node's gossip and gRPC service are up.
#[derive(Clone)]
pub struct Console {
    node_id: String,
    store: String,
    partitions: u32,
    view: watch::Receiver<Arc<ClusterView>>,
    query: QueryService,
    /// The value type of the config's `value-type`, to print values as JSON.
    value_type: Option<MessageDescriptor>,
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

/// Why a lookup was not answered.
#[derive(Debug, PartialEq, Eq)]
pub enum LookupRefused {
    /// The metrics address is not loopback.
    NotLoopback,
    /// No key was given, or it is not UTF-8 text after percent-decoding.
    NoKey,
}

impl Console {
    /// A console of the node `node_id`'s store, reading through `query`; `value_set` is
    /// the encoded descriptor set of the config's value type, if any, and `type_url` the
    /// values' type URL; `lookups` says whether key lookups are answered.
    pub fn new(
        node_id: &str,
        store: &str,
        partitions: u32,
        view: watch::Receiver<Arc<ClusterView>>,
        query: QueryService,
        values: &crate::grpc::ValueFormat,
        lookups: bool,
    ) -> Console {
        let value_type = values.descriptor_set.as_deref().and_then(|set| {
            let pool = DescriptorPool::decode(set).ok()?;
            let name = values.type_url.as_deref()?.rsplit('/').next()?;
            pool.get_message_by_name(name)
        });
        Console {
            node_id: node_id.to_owned(),
            store: store.to_owned(),
            partitions,
            view,
            query,
            value_type,
            lookups,
        }
    }

    /// The cluster as this node's view sees it.
    pub fn cluster_json(&self) -> Value {
        let view = self.view.borrow().clone();
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
        json!({
            "cluster_id": view.cluster_id,
            "version": view.version,
            "seen_from": self.node_id,
            "store": self.store,
            "partitions": self.partitions,
            "lookups": self.lookups,
            "nodes": nodes,
        })
    }

    /// Reads `key` as a client would through this node (which forwards it if it holds no
    /// copy), and says how it was routed.
    pub async fn lookup(&self, query: Option<&str>) -> Result<Value, LookupRefused> {
        if !self.lookups {
            return Err(LookupRefused::NotLoopback);
        }
        let key = query
            .and_then(|query| {
                query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("key="))
                    .and_then(percent_decode)
            })
            .filter(|key| !key.is_empty())
            .ok_or(LookupRefused::NoKey)?;
        let partition = partition_for_key(key.as_bytes(), self.partitions);
        let holders: Vec<Value> = {
            let view = self.view.borrow();
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
            store: self.store.clone(),
            key: key.clone().into_bytes(),
            partition: None,
            options: None,
        });
        let answer = match self.query.get(request).await {
            Ok(response) => {
                let response = response.into_inner();
                let read = response.read.unwrap_or_default();
                let value = match response.value {
                    Some(get_response::Value::Raw(bytes)) => self.value_json(None, &bytes),
                    Some(get_response::Value::Message(any)) => {
                        self.value_json(Some(&any.type_url), &any.value)
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
            "key": key,
            "partition": partition,
            "asked": self.node_id,
            "holders": holders,
            "answer": answer,
            "elapsed_ms": started.elapsed().as_secs_f64() * 1_000.0,
        }))
    }

    /// A value as JSON: the config's value type or the built-in features, field by field;
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
    }
}
