//! containerd's snapshots gRPC API over a [`Snapshotter`]. Each call runs
//! on the blocking pool: snapshots touch the disk and measure directories.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::api::snapshots::snapshots_server::Snapshots;
use crate::api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info as ApiInfo, Kind as ApiKind, ListSnapshotsRequest,
    ListSnapshotsResponse, MountsRequest, MountsResponse, PrepareSnapshotRequest,
    PrepareSnapshotResponse, RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse,
    UpdateSnapshotRequest, UpdateSnapshotResponse, UsageRequest, UsageResponse,
    ViewSnapshotRequest, ViewSnapshotResponse,
};
use crate::error::SnapshotError;
use crate::metadata::Kind;
use crate::snapshotter::{Info, Snapshotter};

/// containerd sends List answers in batches; so do we.
const LIST_BATCH: usize = 100;

#[derive(Clone)]
pub struct SnapshotService {
    snapshotter: Arc<Snapshotter>,
}

impl SnapshotService {
    pub fn new(snapshotter: Arc<Snapshotter>) -> SnapshotService {
        SnapshotService { snapshotter }
    }

    /// Runs the call `name` on the blocking pool and counts it.
    async fn blocking<T: Send + 'static>(
        &self,
        name: &'static str,
        call: impl FnOnce(&Snapshotter) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, Status> {
        let started = std::time::Instant::now();
        let snapshotter = self.snapshotter.clone();
        let result = tokio::task::spawn_blocking(move || call(&snapshotter))
            .await
            .map_err(|e| Status::internal(format!("a snapshot call failed: {e}")))
            .and_then(|r| r.map_err(Status::from));
        let code = result
            .as_ref()
            .map_or_else(Status::code, |_| tonic::Code::Ok);
        self.snapshotter
            .metrics()
            .call(name, code, started.elapsed());
        result
    }
}

fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn api_info(info: Info) -> ApiInfo {
    let kind = match info.snapshot.kind {
        Kind::View => ApiKind::View,
        Kind::Active => ApiKind::Active,
        Kind::Committed => ApiKind::Committed,
    };
    ApiInfo {
        name: info.name,
        parent: info.snapshot.parent,
        kind: kind as i32,
        created_at: Some(info.snapshot.created.into()),
        updated_at: Some(info.snapshot.updated.into()),
        labels: info.snapshot.labels.into_iter().collect(),
    }
}

type ListStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!("prepare {} on {:?}", r.key, r.parent);
        let mounts = self
            .blocking("prepare", move |s| {
                s.prepare(&r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .blocking("view", move |s| {
                s.create(Kind::View, &r.key, &r.parent, labels(r.labels))
            })
            .await?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let key = request.into_inner().key;
        let mounts = self.blocking("mounts", move |s| s.mounts(&key)).await?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!("commit {} as {}", r.key, r.name);
        self.blocking("commit", move |s| {
            s.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        self.blocking("remove", move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let info = self.blocking("stat", move |s| s.stat(&key)).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(api_info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("an update names no snapshot"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self
            .blocking("update", move |s| {
                s.update(&info.name, labels(info.labels), &paths)
            })
            .await?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(api_info(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        // Filters are left to containerd, which checks every answer itself.
        let infos = self.blocking("list", |s| Ok(s.list())).await?;
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|batch| {
                Ok(ListSnapshotsResponse {
                    info: batch.iter().cloned().map(api_info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let key = request.into_inner().key;
        let usage = self.blocking("usage", move |s| s.usage(&key)).await?;
        Ok(Response::new(UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.blocking("cleanup", |s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
