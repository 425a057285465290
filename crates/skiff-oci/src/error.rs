use std::path::PathBuf;

use skiff_store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OciError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported image source {0:?}: use oci:DIR[:TAG], docker-archive:FILE[:NAME:TAG] or docker://[HOST/]NAME[:TAG]")]
    UnsupportedSource(String),
    #[error("malformed {what}: {reason}")]
    Malformed { what: String, reason: String },
    #[error("blob {0} is missing from the image")]
    MissingBlob(String),
    #[error("{what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} has {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("unsupported media type {0:?}")]
    UnknownMediaType(String),
    #[error("no image tagged {tag:?} in {source_name} (it has: {available})")]
    TagNotFound {
        tag: String,
        source_name: String,
        available: String,
    },
    #[error("{source_name} holds several images: name one with :TAG (it has: {available})")]
    TagRequired {
        source_name: String,
        available: String,
    },
    #[error("no image for platform {wanted} (the index has: {available})")]
    PlatformNotFound { wanted: String, available: String },
    #[error("layer {layer}: entry {path:?} climbs out of the root file system")]
    PathEscapesRoot { layer: usize, path: String },
    #[error("layer {layer}: entry {path:?} would write through the symbolic link {link:?}")]
    WritesThroughSymlink {
        layer: usize,
        path: String,
        link: String,
    },
    #[error("layer {layer}: entry {path:?}: {reason}")]
    BadEntry {
        layer: usize,
        path: String,
        reason: String,
    },
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: usize, reason: String },
    #[error("output {0} already exists and is not an OCI image layout")]
    BadOutput(PathBuf),
    #[error("registry {url}: {reason}")]
    Registry { url: String, reason: String },
    #[error("interrupted; nothing of this conversion was kept")]
    Interrupted,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Format(#[from] skiff_format::FormatError),
    #[error(transparent)]
    Chunk(#[from] skiff_chunk::ChunkError),
}

pub(crate) trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, OciError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, OciError> {
        self.map_err(|source| OciError::Io {
            context: what(),
            source,
        })
    }
}
