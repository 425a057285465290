//! The skiff wire and on-disk formats: chunk ids, the image index (the merged
//! root file system with per-file chunk lists) and the image manifest.
//!
//! Everything here is pure data with a deterministic encoding; see
//! `docs/FORMAT.md` for the byte-level description.

pub mod artifact;
mod digest;
mod error;
mod image_ref;
mod index;
mod manifest;
mod profile;
pub mod wire;

pub use digest::{ChunkId, IndexDigest};
pub use error::FormatError;
pub use image_ref::ImageRef;
pub use index::{
    ChunkRef, ChunkingParams, DirEntry, ImageIndex, Inode, InodeKind, InodeNo, Metadata, Xattr,
    INDEX_FORMAT_VERSION, INDEX_MAGIC, MAX_CHUNK_SIZE, MAX_NAME_BYTES, MAX_PATH_BYTES,
    MAX_SYMLINK_BYTES, MAX_XATTR_NAME_BYTES, MAX_XATTR_VALUE_BYTES, ROOT_INO,
};
pub use manifest::{ImageManifest, IndexDescriptor, SourceInfo, MANIFEST_SCHEMA_VERSION};
pub use profile::{ProfileRange, ProfileSummary, StartupProfile, MAX_PROFILE_RANGES};
