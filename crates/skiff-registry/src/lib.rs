//! OCI registries (distribution, Harbor, Quay, Zot, ECR, GHCR, …) as skiff's
//! distribution engine.
//!
//! - [`Registry`]: the distribution API of one repository, with the
//!   registry's auth ([`auth`]: anonymous, basic from docker's config or a
//!   credential helper, bearer tokens renewed as they expire), redirects
//!   that never carry credentials elsewhere, and bounded retries.
//! - [`OciManifest`] / [`RemoteImage`]: a skiff image as an OCI artifact
//!   (docs/FORMAT.md, "In an OCI registry"), read and checked whole.
//! - [`launcher`]: what a tag holds, so containerd pulls a skiff image
//!   like any other and skiff's snapshotter mounts it lazily.
//! - [`referrers`]: skiff's artifacts attached beside an unconverted
//!   image (OCI 1.1 `subject`), one per layer prefix.
//! - [`RegistrySource`]: the image's chunks by ranged reads of its pack
//!   blobs, as a [`skiff_source::ChunkSource`].

pub mod auth;
pub mod body;
mod client;
mod digest;
mod error;
mod image;
pub mod launcher;
mod reference;
pub mod referrers;
mod source;

pub use auth::{BareCredentials, Credentials};
pub use client::{
    Access, MountOutcome, RangeAnswer, Registry, Traffic, DEFAULT_RETRY_WINDOW, MAX_MANIFEST_BYTES,
};
pub use digest::{sha256_digest, Sha256Digest, Sha256Writer};
pub use error::RegistryError;
pub use image::{
    Descriptor, OciManifest, RemoteImage, RemoteImageParts, FIRST_PACK_LAYER,
    MAX_CHUNK_TABLE_BYTES, MAX_SKIFF_MANIFEST_BYTES,
};
pub use reference::{is_plain_http_allowed, RegistryRef, DOCKER_HUB};
pub use source::{RangePlan, RegistrySource};
