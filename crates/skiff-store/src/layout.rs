//! Names of things on disk and the encodings of database values.

use serde::{Deserialize, Serialize};
use skiff_format::ChunkingParams;

use crate::StoreError;

pub(crate) const CONFIG_FILE: &str = "skiff-store.json";
pub(crate) const LOCK_FILE: &str = "lock";
/// Shared by read-only opens, exclusive for gc: gc deletes pack files that a
/// reader's older view of the database may still point at.
pub(crate) const READERS_LOCK_FILE: &str = "readers.lock";
pub(crate) const DB_DIR: &str = "db";
pub(crate) const PACKS_DIR: &str = "packs";

pub(crate) const CF_CHUNKS: &str = "chunks";
pub(crate) const CF_INDEXES: &str = "indexes";
pub(crate) const CF_IMAGES: &str = "images";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_LAYERS: &str = "layers";
pub(crate) const COLUMN_FAMILIES: [&str; 5] =
    [CF_CHUNKS, CF_INDEXES, CF_IMAGES, CF_META, CF_LAYERS];

pub(crate) const META_NEXT_PACK: &[u8] = b"next-pack";
const META_PACK_PREFIX: &[u8] = b"pack/";

pub(crate) const STORE_FORMAT_VERSION: u32 = 1;

/// Parameters fixed when a store is created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format_version: u32,
    pub chunking: ChunkingParams,
    /// Uncompressed bytes gathered into one zstd frame.
    pub frame_size: u32,
    pub zstd_level: i32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            format_version: STORE_FORMAT_VERSION,
            chunking: ChunkingParams::default(),
            frame_size: skiff_chunk::DEFAULT_FRAME_SIZE as u32,
            zstd_level: skiff_chunk::STORE_ZSTD_LEVEL,
        }
    }
}

/// Where a chunk lives: a frame in a pack, and the chunk's place in the
/// frame's uncompressed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLocation {
    pub pack: u32,
    pub frame_offset: u64,
    pub frame_len: u32,
    pub frame_raw_len: u32,
    pub offset: u32,
    pub len: u32,
}

impl ChunkLocation {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("postcard encoding into a Vec")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("chunk location: {e}")))
    }

    /// Identifies the frame (pack, offset) for grouping reads.
    pub(crate) fn frame_key(&self) -> (u32, u64) {
        (self.pack, self.frame_offset)
    }
}

pub(crate) fn pack_meta_key(pack: u32) -> Vec<u8> {
    let mut key = META_PACK_PREFIX.to_vec();
    key.extend_from_slice(&pack.to_be_bytes());
    key
}

/// The pack id of a `pack/<id>` meta key.
pub(crate) fn pack_of_meta_key(key: &[u8]) -> Option<u32> {
    let id = key.strip_prefix(META_PACK_PREFIX)?;
    Some(u32::from_be_bytes(id.try_into().ok()?))
}

pub(crate) fn pack_file_name(pack: u32) -> String {
    format!("{pack:08}.pack")
}

pub(crate) fn pack_of_file_name(name: &str) -> Option<u32> {
    name.strip_suffix(".pack")?.parse().ok()
}

pub(crate) fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, StoreError> {
    bytes.try_into().map(u64::from_le_bytes).map_err(|_| {
        StoreError::Corrupt(format!("{what}: expected 8 bytes, found {}", bytes.len()))
    })
}

/// A converted layer kept by diff_id, so an image sharing it need not read it
/// again. The payload is the converter's business; the store only needs the
/// chunks it names, to drop the record when gc frees any of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Each distinct chunk of the layer's files once, in no order that
    /// matters (a push orders a layer from the payload's entries).
    pub chunks: Vec<skiff_format::ChunkId>,
    pub payload: Vec<u8>,
}

impl LayerRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let raw = postcard::to_stdvec(self).expect("postcard encoding into a Vec");
        zstd::bulk::compress(&raw, 3).expect("zstd compression of a buffer")
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        // Records are metadata and chunk lists: 256 MiB bounds a corrupt one.
        let raw = zstd::bulk::decompress(bytes, 256 << 20)
            .map_err(|e| StoreError::Corrupt(format!("layer record: {e}")))?;
        postcard::from_bytes(&raw).map_err(|e| StoreError::Corrupt(format!("layer record: {e}")))
    }
}
