use skiff_chunk::ChunkError;
use skiff_format::{ChunkId, FormatError};
use skiff_store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid server address {0:?}: expected http://HOST[:PORT] or https://HOST[:PORT]")]
    InvalidServer(String),
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: the server answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: the answer was cut short: {message}")]
    Interrupted { url: String, message: String },
    #[error("{url}: malformed response: {message}")]
    Protocol { url: String, message: String },
    #[error("{server} refuses {what} without a valid token (pass --token-file)")]
    Unauthorized { server: String, what: &'static str },
    #[error("the server does not hold chunk {0}")]
    ChunkMissing(ChunkId),
    #[error("a chunk from the server failed verification: {0}")]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] skiff_registry::RegistryError),
    #[error("{0}")]
    Source(String),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl ClientError {
    /// Whether the failure may pass by itself: no connection, a reset or
    /// timeout, an answer cut short, or a server saying it is overloaded or
    /// behind a proxy that lost it. Every request of the API may be repeated.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Http { source, .. } => !source.is_builder(),
            ClientError::Interrupted { .. } => true,
            ClientError::Registry(e) => e.is_transient(),
            ClientError::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// The HTTP status the server answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}
