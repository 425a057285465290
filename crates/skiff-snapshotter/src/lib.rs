//! skiff as a containerd snapshotter: containerd's snapshots gRPC API on a
//! unix socket (a `proxy_plugins` entry of type "snapshot"), with
//! overlayfs semantics for ordinary layers, and skiff images' layers as
//! remote snapshots: lazy mounts of the image, nothing downloaded.

mod error;
pub mod metadata;
mod metrics;
pub mod remote;
mod service;
mod snapshotter;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use skiff_agent::{MountSettings, RunDir, SharedMounts};

pub use error::SnapshotError;
pub use remote::LazyMounts;
pub use service::SnapshotService;
pub use snapshotter::{Info, Snapshotter};

/// containerd's API, generated from the vendored protos (see build.rs).
pub mod api {
    #![allow(clippy::all, missing_docs)]

    // Nested as the packages are: generated code names types by relative path.
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }

    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}

pub const DEFAULT_ADDRESS: &str = "/run/skiff/snapshotter.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/skiff/snapshotter";
/// How long calls in flight may take to finish once asked to stop.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Where a snapshotter listens and keeps its snapshots, and how it mounts skiff images.
#[derive(Clone, Debug)]
pub struct SnapshotterConfig {
    pub address: PathBuf,
    pub root: PathBuf,
    /// The host agent's run directory, shared with `skiff run` and `skiff mount`.
    pub run_dir: PathBuf,
    pub settings: MountSettings,
    /// Where to serve Prometheus metrics at `/metrics` (off if `None`).
    pub metrics_address: Option<std::net::SocketAddr>,
    /// `HOST[/REPO]` prefixes whose images' attached artifacts are trusted.
    pub attached_from: Vec<String>,
}

/// Serves the snapshots API until `shutdown` completes.
pub async fn serve(
    config: &SnapshotterConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), SnapshotError> {
    let lazy = LazyMounts::new(
        SharedMounts::new(RunDir::new(&config.run_dir)),
        config.settings.clone(),
        &config.root,
    )
    .with_attached_from(config.attached_from.clone());
    let snapshotter = Arc::new(Snapshotter::open(&config.root, Some(lazy))?);
    if let Some(dir) = config.address.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| SnapshotError::io(format!("creating {}", dir.display()), e))?;
    }
    remove_stale_socket(&config.address)?;
    let listener = tokio::net::UnixListener::bind(&config.address)
        .map_err(|e| SnapshotError::io(format!("listening on {}", config.address.display()), e))?;
    // Whoever reaches the socket controls the host's snapshots: root only.
    std::fs::set_permissions(&config.address, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| SnapshotError::io(format!("securing {}", config.address.display()), e))?;
    tracing::info!(
        "serving containerd snapshots on {} (root {})",
        config.address.display(),
        config.root.display()
    );
    if let Some(address) = config.metrics_address {
        serve_metrics(address, snapshotter.clone()).await?;
    }
    let service =
        api::snapshots::snapshots_server::SnapshotsServer::new(SnapshotService::new(snapshotter));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            },
        );
    // containerd keeps its connection open: calls in flight get a moment
    // to finish, then the connections are dropped.
    let served = tokio::select! {
        served = server => served,
        () = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    };
    let _ = std::fs::remove_file(&config.address);
    served.map_err(|e| {
        SnapshotError::io(
            format!("serving on {}", config.address.display()),
            std::io::Error::other(e),
        )
    })
}

/// Serves `snapshotter`'s metrics at `http://ADDRESS/metrics` for as long
/// as the runtime runs.
async fn serve_metrics(
    address: std::net::SocketAddr,
    snapshotter: Arc<Snapshotter>,
) -> Result<(), SnapshotError> {
    use axum::http::header::CONTENT_TYPE;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| SnapshotError::io(format!("serving metrics on {address}"), e))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let snapshotter = snapshotter.clone();
            async move {
                let text = tokio::task::spawn_blocking(move || snapshotter.render_metrics())
                    .await
                    .unwrap_or_default();
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    tracing::info!("serving metrics on http://{address}/metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics server stopped: {e}");
        }
    });
    Ok(())
}

/// A socket file whose server is gone is in the way; a live one is refused.
fn remove_stale_socket(path: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SnapshotError::FailedPrecondition(format!(
                "{} is not a socket; refusing to replace it",
                path.display()
            )))
        }
        _ => {}
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(SnapshotError::FailedPrecondition(format!(
            "another snapshotter answers on {}",
            path.display()
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SnapshotError::io(format!("removing {}", path.display()), e)),
    }
}
