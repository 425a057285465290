use thiserror::Error;

/// Errors from decoding or validating skiff's formats.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("invalid digest {0:?}: expected 64 lowercase hex digits")]
    InvalidDigest(String),
    #[error("not a skiff image index (bad magic)")]
    BadIndexMagic,
    #[error("unsupported image index version {0} (this skiff reads version {1})")]
    UnsupportedIndexVersion(u32, u32),
    #[error("malformed image index: {0}")]
    MalformedIndex(String),
    #[error("image index encoding: {0}")]
    IndexEncoding(#[from] postcard::Error),
    #[error("malformed image manifest: {0}")]
    MalformedManifest(String),
    #[error("invalid startup profile: {0}")]
    InvalidProfile(String),
    #[error("malformed chunk table: {0}")]
    MalformedChunkTable(String),
    #[error("invalid chunking parameters: {0}")]
    InvalidChunking(String),
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidImageRef {
        reference: String,
        reason: &'static str,
    },
}
