use skiff_chunk::ChunkError;
use skiff_format::FormatError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("invalid registry reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{url}: {}", chain(source))]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: the registry answered {status}{hint}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
        message: String,
    },
    #[error("{url}: the answer was cut short: {message}")]
    Interrupted { url: String, message: String },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    #[error("{what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("credentials for {host}: {reason}")]
    Credentials { host: String, reason: String },
    #[error("{reference} is not a skiff image: {reason}")]
    NotSkiff { reference: String, reason: String },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("a chunk from the registry failed verification: {0}")]
    Chunk(#[from] ChunkError),
}

/// reqwest's own message is only the outermost layer ("error sending request").
fn chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

impl RegistryError {
    /// Whether the failure may pass by itself: no connection, a reset or
    /// timeout, an answer cut short, or a registry saying it is overloaded.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Http { source, .. } => !source.is_builder(),
            RegistryError::Interrupted { .. } => true,
            RegistryError::Status { status, .. } => {
                matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
            }
            _ => false,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}
