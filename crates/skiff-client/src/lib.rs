//! The client side of the skiff chunk server: typed requests for every
//! route in `docs/API.md`, and resumable `push` and `pull` of images that
//! send only the chunks the other side lacks. Every chunk received is
//! checked against its BLAKE3 id before it is used or stored.

mod cache;
mod claims;
mod client;
mod error;
mod pack_file;
mod registry;
mod source;
mod transfer;

pub use cache::{process_is_running, stored_chunks, CacheError, ChunkCache, EvictReport};
pub use claims::{Claim, Claims, CLAIM_LEASE};
pub use client::{Client, DEFAULT_RETRY_WINDOW};
pub use error::ClientError;
pub use registry::{
    attach_to_registry, pull_from_registry, push_to_registry, put_profile, RegistryAttachReport,
    RegistryPullReport, RegistryPushReport,
};
pub use source::CachedSource;
pub use transfer::{pull, push, NoProgress, TransferProgress, TransferReport};
