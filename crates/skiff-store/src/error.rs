use std::path::PathBuf;

use skiff_chunk::ChunkError;
use skiff_format::{ChunkId, FormatError, ImageRef, IndexDigest};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error(
        "store {0} is busy: another skiff process is writing to it; retry when it has finished"
    )]
    Busy(PathBuf),
    #[error("store {0} is in use: {1}; retry when it is done")]
    InUse(PathBuf, &'static str),
    #[error("no skiff store at {0} (convert an image into it first, or pass --store)")]
    NoStore(PathBuf),
    #[error("store {path} is not usable: {reason}")]
    BadStore { path: PathBuf, reason: String },
    #[error("image {0} not found in the store")]
    ImageNotFound(ImageRef),
    #[error("index {0} not found in the store")]
    IndexNotFound(IndexDigest),
    #[error("chunk {0} not found in the store")]
    ChunkNotFound(ChunkId),
    #[error("{image} references chunk {chunk}, which the store does not hold")]
    MissingChunk { image: String, chunk: ChunkId },
    #[error("{image} says chunk {chunk} is {claimed} bytes long, but it is {stored}")]
    ChunkLength {
        image: String,
        chunk: ChunkId,
        claimed: u32,
        stored: u32,
    },
    #[error("manifest does not match its index: {0}")]
    BadManifest(String),
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

/// Attaches what was being done to an I/O error.
pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Io {
            context: what(),
            source,
        })
    }
}
