//! A skiff image as an OCI artifact in a registry (docs/FORMAT.md, "In an
//! OCI registry"): media types, annotations, and the chunk table that says
//! where in the registry's blobs each chunk lives.
//!
//! Registries name blobs by sha256, so every blob here is sha256-named; the
//! BLAKE3 chunk id stays the name of a chunk inside them.

use serde::{Deserialize, Serialize};

use crate::{ChunkId, ChunkRef, FormatError, MAX_CHUNK_SIZE};

/// `artifactType` of a skiff image's OCI manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.skiff.image.v1";
/// The OCI image manifest that carries a skiff image.
pub const OCI_MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The image's own OCI config, verbatim.
pub const OCI_CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Layer 0: the skiff manifest (FORMAT.md, "Image manifest"), JSON.
pub const MANIFEST_LAYER_TYPE: &str = "application/vnd.skiff.manifest.v1+json";
/// Layer 1: the encoded image index, zstd-compressed.
pub const INDEX_LAYER_TYPE: &str = "application/vnd.skiff.index.v1+zstd";
/// Layer 2: the [`ChunkTable`], zstd-compressed.
pub const CHUNK_TABLE_LAYER_TYPE: &str = "application/vnd.skiff.chunk-table.v1+zstd";
/// Layers 3…: pack blobs, zstd frames back to back.
pub const PACK_LAYER_TYPE: &str = "application/vnd.skiff.pack.v1";

/// Annotation of the manifest (and of the index layer): the index digest.
pub const INDEX_DIGEST_ANNOTATION: &str = "dev.skiff.index.digest";

pub const CHUNK_TABLE_MAGIC: &[u8; 8] = b"SKIFFCTB";
pub const CHUNK_TABLE_VERSION: u32 = 1;
/// Frames end within this many bytes of their blob's start (2^48: 256 TiB).
const MAX_BLOB_END: u64 = 1 << 48;
/// A frame decompresses to at most this many bytes (writers aim at 1 MiB).
pub const MAX_FRAME_RAW_LEN: u32 = 64 << 20;
/// A frame's compressed bytes are at most this many (zstd's worst case of the above).
pub const MAX_FRAME_LEN: u32 = MAX_FRAME_RAW_LEN + (1 << 20);

/// One zstd frame in a pack blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableFrame {
    /// Which pack blob: 0 is the manifest's first pack layer (layer 3).
    pub blob: u32,
    /// Where the frame starts in the blob.
    pub offset: u64,
    /// The frame's compressed length.
    pub len: u32,
    /// The frame's decompressed length.
    pub raw_len: u32,
}

/// Where one chunk is: a frame, and its place in the frame's decompressed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableChunk {
    pub id: ChunkId,
    /// Position in [`ChunkTable::frames`].
    pub frame: u32,
    pub offset: u32,
    pub len: u32,
}

/// Every chunk of an image and the frame that holds it; in memory, chunks
/// sorted by id (for lookups), frames by (blob, offset) without overlaps.
///
/// Encoded as [`CHUNK_TABLE_MAGIC`], the version (u32 LE), then postcard
/// [`EncodedTable`]: the ids and lengths are the index's, so the table
/// names only each chunk's frame and offset, in the order of
/// [`ImageIndex::distinct_chunks`](crate::ImageIndex::distinct_chunks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkTable {
    pub frames: Vec<TableFrame>,
    pub chunks: Vec<TableChunk>,
}

/// The chunk table as it travels.
#[derive(Serialize, Deserialize)]
struct EncodedTable {
    frames: Vec<TableFrame>,
    /// (frame, offset in the frame) of each of the index's distinct chunks, in order.
    chunks: Vec<(u32, u32)>,
}

fn malformed(reason: impl Into<String>) -> FormatError {
    FormatError::MalformedChunkTable(reason.into())
}

impl ChunkTable {
    /// Encodes the table for an image whose distinct chunks are `order`
    /// (every one of which the table must hold).
    pub fn encode(&self, order: &[ChunkRef]) -> Result<Vec<u8>, FormatError> {
        let chunks = order
            .iter()
            .map(|c| {
                self.find(&c.id)
                    .map(|(chunk, _)| (chunk.frame, chunk.offset))
                    .ok_or_else(|| malformed(format!("the table lacks chunk {}", c.id)))
            })
            .collect::<Result<_, _>>()?;
        let encoded = EncodedTable {
            frames: self.frames.clone(),
            chunks,
        };
        let mut out = CHUNK_TABLE_MAGIC.to_vec();
        out.extend_from_slice(&CHUNK_TABLE_VERSION.to_le_bytes());
        out.extend_from_slice(
            &postcard::to_stdvec(&encoded).expect("postcard encoding into a Vec"),
        );
        Ok(out)
    }

    /// Decodes and validates the table of an image whose distinct chunks
    /// are `order`, with frames in at most `blobs` pack blobs.
    pub fn decode(
        bytes: &[u8],
        blobs: usize,
        order: &[ChunkRef],
    ) -> Result<ChunkTable, FormatError> {
        let rest = bytes
            .strip_prefix(CHUNK_TABLE_MAGIC.as_slice())
            .ok_or_else(|| malformed("bad magic"))?;
        let (version, body) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| malformed("truncated header"))?;
        let version = u32::from_le_bytes(*version);
        if version != CHUNK_TABLE_VERSION {
            return Err(malformed(format!(
                "version {version} (this skiff reads {CHUNK_TABLE_VERSION})"
            )));
        }
        let encoded: EncodedTable =
            postcard::from_bytes(body).map_err(|e| malformed(e.to_string()))?;
        if encoded.chunks.len() != order.len() {
            return Err(malformed(format!(
                "{} chunks for an index of {}",
                encoded.chunks.len(),
                order.len()
            )));
        }
        let mut chunks: Vec<TableChunk> = order
            .iter()
            .zip(encoded.chunks)
            .map(|(c, (frame, offset))| TableChunk {
                id: c.id,
                frame,
                offset,
                len: c.len,
            })
            .collect();
        chunks.sort_by_key(|c| c.id);
        let table = ChunkTable {
            frames: encoded.frames,
            chunks,
        };
        table.validate(blobs)?;
        Ok(table)
    }

    /// Checks the rules of the encoding: sorted, unique, every chunk inside its frame.
    pub fn validate(&self, blobs: usize) -> Result<(), FormatError> {
        for frame in &self.frames {
            if frame
                .offset
                .checked_add(u64::from(frame.len))
                .is_none_or(|end| end > MAX_BLOB_END)
            {
                return Err(malformed(format!("a frame at offset {}", frame.offset)));
            }
        }
        for pair in self.frames.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let ordered = (a.blob, a.offset) < (b.blob, b.offset);
            let apart = a.blob != b.blob || a.offset + u64::from(a.len) <= b.offset;
            if !ordered || !apart {
                return Err(malformed("frames out of order or overlapping"));
            }
        }
        for frame in &self.frames {
            if frame.blob as usize >= blobs {
                return Err(malformed(format!(
                    "a frame in pack blob {} of {blobs}",
                    frame.blob
                )));
            }
            if frame.len == 0 || frame.len > MAX_FRAME_LEN || frame.raw_len > MAX_FRAME_RAW_LEN {
                return Err(malformed(format!("a frame of {} bytes", frame.len)));
            }
        }
        for pair in self.chunks.windows(2) {
            if pair[0].id >= pair[1].id {
                return Err(malformed("chunks not sorted by id or repeated"));
            }
        }
        for chunk in &self.chunks {
            let frame = self
                .frames
                .get(chunk.frame as usize)
                .ok_or_else(|| malformed(format!("chunk {} names no frame", chunk.id)))?;
            let inside = u64::from(chunk.offset) + u64::from(chunk.len) <= u64::from(frame.raw_len);
            if chunk.len == 0 || chunk.len > MAX_CHUNK_SIZE || !inside {
                return Err(malformed(format!(
                    "chunk {} lies outside its frame",
                    chunk.id
                )));
            }
        }
        Ok(())
    }

    /// Where chunk `id` is, if the table has it.
    pub fn find(&self, id: &ChunkId) -> Option<(&TableChunk, &TableFrame)> {
        let at = self.chunks.binary_search_by(|c| c.id.cmp(id)).ok()?;
        let chunk = &self.chunks[at];
        Some((chunk, &self.frames[chunk.frame as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ChunkTable {
        let mut ids = [ChunkId::of(b"a"), ChunkId::of(b"b"), ChunkId::of(b"c")];
        ids.sort();
        ChunkTable {
            frames: vec![
                TableFrame {
                    blob: 0,
                    offset: 0,
                    len: 100,
                    raw_len: 300,
                },
                TableFrame {
                    blob: 0,
                    offset: 100,
                    len: 50,
                    raw_len: 10,
                },
                TableFrame {
                    blob: 1,
                    offset: 0,
                    len: 10,
                    raw_len: 10,
                },
            ],
            chunks: vec![
                TableChunk {
                    id: ids[0],
                    frame: 0,
                    offset: 0,
                    len: 200,
                },
                TableChunk {
                    id: ids[1],
                    frame: 0,
                    offset: 200,
                    len: 100,
                },
                TableChunk {
                    id: ids[2],
                    frame: 2,
                    offset: 0,
                    len: 10,
                },
            ],
        }
    }

    /// The index's distinct chunks, in another order than the table's.
    fn order(t: &ChunkTable) -> Vec<ChunkRef> {
        t.chunks
            .iter()
            .rev()
            .map(|c| ChunkRef {
                id: c.id,
                len: c.len,
            })
            .collect()
    }

    #[test]
    fn round_trips_and_finds() {
        let t = table();
        let encoded = t.encode(&order(&t)).unwrap();
        // Ids and lengths are the index's: 12 bytes header, then a few per chunk.
        assert!(
            encoded.len() < 12 + 3 * 16 + 3 * 4,
            "{} bytes",
            encoded.len()
        );
        let decoded = ChunkTable::decode(&encoded, 2, &order(&t)).unwrap();
        assert_eq!(decoded, t);
        let (chunk, frame) = decoded.find(&t.chunks[2].id).unwrap();
        assert_eq!((chunk.len, frame.blob), (10, 1));
        assert!(decoded.find(&ChunkId::of(b"zz")).is_none());
    }

    #[test]
    fn rejects_broken_tables() {
        let t = table();
        let order = order(&t);
        let encoded = t.encode(&order).unwrap();
        assert!(
            ChunkTable::decode(&encoded, 1, &order).is_err(),
            "a frame past the blobs"
        );
        assert!(ChunkTable::decode(&encoded[..encoded.len() - 1], 2, &order).is_err());
        assert!(ChunkTable::decode(b"SKIFFCTB\x02\0\0\0", 2, &order).is_err());
        assert!(
            ChunkTable::decode(&encoded, 2, &order[1..]).is_err(),
            "another index"
        );
        let mut longer = order.clone();
        longer[0].len = 5000;
        assert!(
            ChunkTable::decode(&encoded, 2, &longer).is_err(),
            "a chunk past its frame"
        );
        let mut stranger = order.clone();
        stranger[0].id = ChunkId::of(b"not in the table");
        assert!(t.encode(&stranger).is_err(), "a chunk the table lacks");
        let mut t = table();
        t.frames[2].offset = u64::MAX - 5;
        assert!(t.validate(2).is_err(), "a frame past any blob's end");
        let mut t = table();
        t.frames[1].offset = 99;
        assert!(t.validate(2).is_err(), "overlapping frames");
        let mut t = table();
        t.chunks[1].len = 101;
        assert!(t.validate(2).is_err(), "a chunk past its frame's end");
        let mut t = table();
        t.chunks.swap(0, 1);
        assert!(t.validate(2).is_err(), "unsorted ids");
        let mut t = table();
        t.chunks[2].frame = 7;
        assert!(t.validate(2).is_err(), "a chunk naming no frame");
    }
}
