//! Where a lazy reader gets chunks: the seam between the FUSE file system,
//! which knows nothing of HTTP, and the places chunks live (this store, a
//! chunk server, the host's chunk cache in front of one).

use skiff_format::{ChunkId, ChunkRef};
use thiserror::Error;

use crate::{Store, StoreError};

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
    /// server) and hands each chunk to `each` in the order asked, as it arrives.
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Vec<u8>),
    ) -> Result<(), SourceError>;

    /// A chunk this host already holds, read without the network.
    fn local(&self, _id: &ChunkId) -> Option<Vec<u8>> {
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
}

impl ChunkSource for Store {
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Vec<u8>),
    ) -> Result<(), SourceError> {
        for id in ids {
            let data = self.read_chunk(id).map_err(|e| match e {
                StoreError::ChunkNotFound(id) => SourceError::Missing(id),
                StoreError::Chunk(e) => SourceError::Corrupt(e.to_string()),
                other => SourceError::Unavailable(other.to_string()),
            })?;
            each(*id, data);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("store {}", self.root().display())
    }
}
