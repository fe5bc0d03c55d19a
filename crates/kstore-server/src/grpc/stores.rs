//! The Query service of a node that serves several stores: each read goes to the
//! [`QueryService`] of the store it names; Metadata and WatchMetadata describe every store,
//! each copy marked with its store.

use std::sync::Arc;

use kstore_core::cluster::ClusterView;
use kstore_proto::v1::query_server::Query;
use kstore_proto::v1::{
    GetRequest, GetResponse, MetadataRequest, MetadataResponse, MultiGetRequest, MultiGetResponse,
    ScanRequest, ScanResponse,
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tonic::{Request, Response, Status};

use super::error::ReadError;
use super::query::QueryService;

/// One store's Query service and the cluster view of its copies.
#[derive(Debug, Clone)]
pub struct StoreQuery {
    /// The store's name.
    pub name: String,
    /// Its Query service.
    pub service: QueryService,
    /// Every node with its copies of this store.
    pub view: watch::Receiver<Arc<ClusterView>>,
}

/// The Query service of every store of a node, the first store first.
#[derive(Debug, Clone)]
pub struct StoreQueries {
    stores: Arc<Vec<StoreQuery>>,
}

impl StoreQueries {
    /// Returns the service of `stores` (at least one, the node's first store first).
    pub fn new(stores: Vec<StoreQuery>) -> Self {
        assert!(!stores.is_empty(), "a node serves at least one store");
        StoreQueries {
            stores: Arc::new(stores),
        }
    }

    /// Returns the service of the store named `name`, or UNKNOWN_STORE with the names
    /// served.
    fn store(&self, name: &str) -> Result<&QueryService, Status> {
        self.stores
            .iter()
            .find(|store| store.name == name)
            .map(|store| &store.service)
            .ok_or_else(|| {
                ReadError::unknown_store(name, self.stores.iter().map(|s| s.name.as_str())).into()
            })
    }

    /// Describes every store and the cluster as the stores' current views show it.
    fn metadata(&self) -> MetadataResponse {
        let views: Vec<Arc<ClusterView>> = self
            .stores
            .iter()
            .map(|store| store.view.borrow().clone())
            .collect();
        let first = &self.stores[0];
        let mut answer = first.service.metadata_of(&views[0]);
        answer.stores = self
            .stores
            .iter()
            .map(|store| store.service.store_info())
            .collect();
        let named: Vec<(&str, &ClusterView)> = self
            .stores
            .iter()
            .zip(&views)
            .map(|(store, view)| (store.name.as_str(), view.as_ref()))
            .collect();
        answer.nodes = ClusterView::to_proto_nodes_of_stores(&named);
        answer.view_version = views.iter().map(|view| view.version).sum();
        answer
    }
}

#[tonic::async_trait]
impl Query for StoreQueries {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let service = self.store(&request.get_ref().store)?;
        Query::get(service, request).await
    }

    async fn multi_get(
        &self,
        request: Request<MultiGetRequest>,
    ) -> Result<Response<MultiGetResponse>, Status> {
        let service = self.store(&request.get_ref().store)?;
        Query::multi_get(service, request).await
    }

    async fn metadata(
        &self,
        _request: Request<MetadataRequest>,
    ) -> Result<Response<MetadataResponse>, Status> {
        Ok(Response::new(self.metadata()))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let service = self.store(&request.get_ref().store)?;
        Query::scan(service, request).await
    }

    type ScanStreamStream = <QueryService as Query>::ScanStreamStream;

    async fn scan_stream(
        &self,
        request: Request<ScanRequest>,
    ) -> Result<Response<Self::ScanStreamStream>, Status> {
        let service = self.store(&request.get_ref().store)?;
        Query::scan_stream(service, request).await
    }

    type WatchMetadataStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<MetadataResponse, Status>> + Send>>;

    async fn watch_metadata(
        &self,
        _request: Request<MetadataRequest>,
    ) -> Result<Response<Self::WatchMetadataStream>, Status> {
        // The current views first, then again whenever any store's view changes. A slow
        // reader skips the versions it missed (each watch keeps only the newest).
        let mut changes = StreamMap::new();
        for (i, store) in self.stores.iter().enumerate() {
            changes.insert(i, WatchStream::new(store.view.clone()));
        }
        let service = self.clone();
        let stream = changes.map(move |_| Ok(service.metadata()));
        Ok(Response::new(Box::pin(stream)))
    }
}
