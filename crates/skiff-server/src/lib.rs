//! The skiff chunk server: a store over HTTP (axum on tokio). See
//! `docs/API.md` for the routes and their bodies.
//!
//! Reads go through a bounded cache of hot chunks in their wire form;
//! uploads are verified chunk by chunk and appended by one writer thread;
//! writes (and, if configured, reads) need a bearer token.

mod auth;
mod body;
mod cache;
mod chunks;
mod connection;
mod error;
mod images;
mod metrics;
mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use skiff_format::wire;
use skiff_store::Store;
use tokio::net::TcpListener;

pub use auth::Tokens;
pub use chunks::MAX_UPLOAD_RAW_BYTES;
pub use connection::ConnectionLimits;
pub use error::ServerError;

use cache::HotCache;
use connection::{IdleTimeout, PeerSlots};
use metrics::Metrics;
use writer::ChunkWriter;

/// The largest upload body (chunk records).
pub const MAX_UPLOAD_BODY: usize = 64 * 1024 * 1024;
/// The largest manifest body.
pub const MAX_MANIFEST_BODY: usize = wire::MAX_MANIFEST_BYTES as usize;
/// The largest index body (zstd-compressed).
pub const MAX_INDEX_BODY: usize = wire::MAX_COMPRESSED_INDEX_BYTES as usize;

/// The route templates (also the `route` label of the metrics).
mod route {
    pub const HEALTH: &str = "/healthz";
    pub const METRICS: &str = "/metrics";
    pub const AUTH: &str = "/v1/auth";
    pub const CHUNKS: &str = "/v1/chunks";
    pub const FETCH: &str = "/v1/chunks/fetch";
    pub const MISSING: &str = "/v1/chunks/missing";
    pub const CHUNK: &str = "/v1/chunks/{id}";
    pub const IMAGES: &str = "/v1/images";
    pub const TAGS: &str = "/v1/tags/{*name}";
    pub const MANIFEST: &str = "/v1/manifests/{*image}";
    pub const INDEX: &str = "/v1/indexes/{digest}";
}

pub(crate) const ROUTES: [&str; 11] = [
    route::HEALTH,
    route::METRICS,
    route::AUTH,
    route::CHUNKS,
    route::FETCH,
    route::MISSING,
    route::CHUNK,
    route::IMAGES,
    route::TAGS,
    route::MANIFEST,
    route::INDEX,
];

#[derive(Clone)]
pub struct ServerConfig {
    pub tokens: Tokens,
    /// Bytes of hot chunks kept in memory (0 turns the cache off).
    pub cache_bytes: u64,
    pub limits: ConnectionLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tokens: Tokens::default(),
            cache_bytes: 512 << 20,
            limits: ConnectionLimits::default(),
        }
    }
}

pub(crate) struct Shared {
    store: Arc<Store>,
    cache: HotCache,
    writer: ChunkWriter,
    metrics: Arc<Metrics>,
    tokens: Tokens,
    upload_slots: Arc<tokio::sync::Semaphore>,
    /// Held while a tag is read, compared and changed (`If-Match`).
    tags: std::sync::Mutex<()>,
}

pub(crate) type AppState = Arc<Shared>;

/// A server bound to its address, not yet serving.
pub struct Server {
    listener: TcpListener,
    router: Router,
    shared: AppState,
    limits: ConnectionLimits,
}

impl Server {
    /// Binds `addr` and prepares to serve `store`, which the server then
    /// owns for writing: uploads go through its single pack writer.
    pub async fn bind(
        addr: &str,
        store: Arc<Store>,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_owned(),
                source,
            })?;
        let metrics = Metrics::new();
        let shared = Arc::new(Shared {
            writer: ChunkWriter::start(store.clone()).map_err(ServerError::Writer)?,
            cache: HotCache::new(config.cache_bytes, metrics.clone()),
            store,
            metrics,
            tokens: config.tokens,
            upload_slots: Arc::new(tokio::sync::Semaphore::new(chunks::MAX_CONCURRENT_UPLOADS)),
            tags: std::sync::Mutex::new(()),
        });
        Ok(Server {
            listener,
            router: router(shared.clone()),
            shared,
            limits: config.limits,
        })
    }

    /// The routes as a tower service, to call in-process (the fuzz targets
    /// do) without a connection.
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        self.listener.local_addr().map_err(ServerError::Serve)
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests
    /// finish for up to `drain` (a client that stalls does not hold the
    /// server forever) and waits as long again for their workers to let go
    /// of the store, so the caller can close it cleanly.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        drain: Duration,
    ) -> Result<(), ServerError> {
        let Server {
            listener,
            router,
            shared,
            limits,
        } = self;
        // HTTP/1 only (skiff's clients speak nothing else): the header
        // timer then runs from the moment a connection opens, and one
        // connection carries one request at a time, so the cap on
        // connections is a cap on requests.
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        let peers = PeerSlots::new(limits.max_connections_per_client.max(1));
        let graceful = GracefulShutdown::new();
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            while connections.try_join_next().is_some() {}
            // A slot first: past the cap, clients wait in the listen backlog.
            let slot = tokio::select! {
                () = &mut shutdown => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, or a connection reset before it
                        // was accepted: a pause, not the end of the server.
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // One client may not take every slot.
            let Some(peer_slot) = peers.claim(peer.ip()) else {
                tracing::debug!("{peer} has too many connections open; closing one");
                continue;
            };
            // Answers go out as a header then body pieces; with Nagle's
            // algorithm the second write would wait ~40 ms for the client's
            // delayed ACK.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {e}");
            }
            let io = TokioIo::new(IdleTimeout::new(tcp, limits.idle_timeout));
            let service = TowerToHyperService::new(router.clone());
            let connection = graceful.watch(builder.serve_connection(io, service).into_owned());
            connections.spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("connection from {peer}: {e}");
                }
                drop((slot, peer_slot));
            });
        }
        // The routes hold the store too: only the connections may still.
        drop((listener, router));
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(drain) => {
                tracing::warn!(
                    "in-flight requests did not finish within {drain:?}; closing their connections"
                );
                connections.abort_all();
            }
        }
        while connections.join_next().await.is_some() {}
        let deadline = Instant::now() + drain;
        while Arc::strong_count(&shared) > 1 {
            if Instant::now() >= deadline {
                // Answered uploads are durable already; only unanswered work is lost.
                tracing::warn!(
                    "request workers still hold the store after {drain:?}; stopping anyway"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Joins the writer thread, which closes its pack.
        tokio::task::spawn_blocking(move || drop(shared))
            .await
            .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
        Ok(())
    }
}

fn router(state: AppState) -> Router {
    let limit = DefaultBodyLimit::max;
    let ids_limit = limit(wire::MAX_IDS_PER_REQUEST * wire::ID_LEN);
    Router::new()
        .route(route::HEALTH, get(|| async { "ok\n" }))
        .route(route::METRICS, get(metrics::render))
        .route(route::AUTH, get(auth::describe))
        .route(
            route::CHUNKS,
            post(chunks::upload_chunks).layer(limit(MAX_UPLOAD_BODY)),
        )
        .route(route::FETCH, post(chunks::fetch_chunks).layer(ids_limit))
        .route(
            route::MISSING,
            post(chunks::missing_chunks).layer(ids_limit),
        )
        .route(
            route::CHUNK,
            get(chunks::get_chunk).head(chunks::head_chunk),
        )
        .route(route::IMAGES, get(images::list_images))
        .route(route::TAGS, get(images::list_tags))
        .route(
            route::MANIFEST,
            get(images::get_manifest)
                .put(images::put_manifest)
                .delete(images::delete_manifest)
                .layer(limit(MAX_MANIFEST_BODY)),
        )
        .route(
            route::INDEX,
            get(images::get_index)
                .put(images::put_index)
                .layer(limit(MAX_INDEX_BODY)),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}
