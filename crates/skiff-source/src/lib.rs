//! Where a lazy reader gets chunks: the seam between the FUSE file system,
//! which knows nothing of HTTP, and the places chunks live (a local store, a
//! chunk server, an OCI registry, the host's chunk cache in front of one).
//!
//! This crate holds only the contract, so the file system can depend on it
//! without any backend (RocksDB, HTTP) coming along.

use skiff_format::{ChunkId, ChunkRef};
mod backoff;

/// A chunk's bytes, shared: a frame decompressed once hands out slices of
/// itself, not copies, to the caches and the reads it serves.
pub use bytes::Bytes;

pub use backoff::Backoff;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a source could not hand over a chunk.
#[derive(Debug, Error)]
pub enum SourceError {
    /// Bytes arrived but are not the chunk: never to be returned as data.
    #[error("{0}")]
    Corrupt(String),
    #[error("the source does not hold chunk {0}")]
    Missing(ChunkId),
    /// The source could not be reached or stopped answering, after retrying.
    #[error("{0}")]
    Unavailable(String),
}

/// A place chunks come from, verified against their ids before they are handed out.
pub trait ChunkSource: Send + Sync {
    /// Gets `ids` in one go where the source allows (one batch request for a
    /// server, coalesced ranged reads for a registry) and hands each chunk to
    /// `each` in the order asked, as it arrives.
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError>;

    /// As [`ChunkSource::fetch`], where only the first `needed` of `ids`
    /// must come: the rest (a read's neighbours, prefetch) may be left out
    /// if someone else is bringing them already, as another host does into
    /// a cache they share.
    fn fetch_wanting(
        &self,
        ids: &[ChunkId],
        _needed: usize,
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        self.fetch(ids, each)
    }

    /// A chunk this host already holds, read without the network.
    fn local(&self, _id: &ChunkId) -> Option<Bytes> {
        None
    }

    /// Whether [`ChunkSource::local`] would find `id`, without reading it.
    fn is_local(&self, _id: &ChunkId) -> bool {
        false
    }

    /// A local file holding `chunks` end to end, which the kernel can read
    /// directly (FUSE passthrough). With `build`, one is made if every chunk
    /// is on this host (slow: it copies the file); without, only an
    /// existing one is returned.
    fn assembled(&self, _chunks: &[ChunkRef], _build: bool) -> Option<std::fs::File> {
        None
    }

    /// Asks that `ids` stay on this host while a file that needs them is open.
    fn pin(&self, _ids: &[ChunkId]) {}

    /// Undoes one [`ChunkSource::pin`] of the same ids.
    fn unpin(&self, _ids: &[ChunkId]) {}

    /// Says where chunks come from, for logs and `skiff status`.
    fn describe(&self) -> String;

    /// What the backend did on the network, for `skiff status`; `None` for
    /// a source that has nothing to tell (a local store).
    fn traffic(&self) -> Option<SourceTraffic> {
        None
    }
}

/// Requests a network backend made, and what it noticed about its peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceTraffic {
    pub requests: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Byte ranges asked for (a request may carry one).
    pub ranges: u64,
    /// Requests retried after a passing failure.
    pub retries: u64,
    /// Chunks asked of the network that another host fetched into a cache
    /// they share, and that came from there instead.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub from_shared_cache: u64,
    /// Things done about a peer that did not behave (one line each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
