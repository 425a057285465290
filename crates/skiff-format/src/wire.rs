//! The chunk server's binary bodies (docs/API.md): lists of chunk ids and
//! streams of chunk records.
//!
//! ```text
//! id list := id[32]*
//! record  := id[32] | kind u8 | len u32 LE | payload[len]
//! frame payload := count u32 LE | raw_len u32 LE | (id[32] | offset u32 LE | len u32 LE)*count | zstd frame
//! ```
//! A record of kind [`RecordKind::Chunk`] carries the chunk as one zstd
//! frame; [`RecordKind::Missing`] says the sender does not hold the id and
//! has no payload; [`RecordKind::Frame`] (only to a client that accepts
//! [`FRAME_RECORDS_CONTENT_TYPE`]) carries a frame as the store keeps it,
//! `raw_len` bytes once decompressed, and where the chunks asked for lie in
//! them (its id is the first of those).

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use crate::{ChunkId, ImageManifest, IndexDigest, ProfileSummary, MAX_CHUNK_SIZE};

/// A chunk on its own (its wire form).
pub const CHUNK_CONTENT_TYPE: &str = "application/zstd";
/// An encoded index, zstd-compressed.
pub const INDEX_CONTENT_TYPE: &str = "application/zstd";
pub const MANIFEST_CONTENT_TYPE: &str = "application/vnd.skiff.manifest.v1+json";
/// A stream of chunk records.
pub const RECORDS_CONTENT_TYPE: &str = "application/vnd.skiff.chunks.v1";
/// A stream of chunk and frame records, in any order, each chunk asked for
/// once: what a fetch answers a client whose `Accept` names it.
pub const FRAME_RECORDS_CONTENT_TYPE: &str = "application/vnd.skiff.chunks.v2";
/// A list of chunk ids.
pub const IDS_CONTENT_TYPE: &str = "application/vnd.skiff.chunk-ids.v1";

/// The most ids one fetch or missing request may list.
pub const MAX_IDS_PER_REQUEST: usize = 65_536;
/// The bound for decompressing one received chunk.
pub const MAX_CHUNK_BYTES: usize = MAX_CHUNK_SIZE as usize;
/// The bound for decompressing a received index (a 100k-file index is a few MB).
pub const MAX_INDEX_BYTES: usize = 512 * 1024 * 1024;
/// The largest index on the wire (zstd-compressed), either way.
pub const MAX_COMPRESSED_INDEX_BYTES: u64 = 64 * 1024 * 1024;
/// The largest manifest on the wire, either way.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// One row of `GET /v1/images`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub name: String,
    pub tag: String,
    pub index: IndexDigest,
    pub index_size: u64,
    pub files: u64,
    pub logical_bytes: u64,
    /// What the image's startup profile covers, if one was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileSummary>,
}

impl From<&ImageManifest> for ImageSummary {
    fn from(m: &ImageManifest) -> Self {
        ImageSummary {
            name: m.name.clone(),
            tag: m.tag.clone(),
            index: m.index.digest,
            index_size: m.index.size,
            files: m.index.files,
            logical_bytes: m.index.logical_bytes,
            profile: m.profile.as_ref().map(|p| p.summary()),
        }
    }
}

/// The entity tag of a manifest as the server sends it (its JSON bytes'
/// BLAKE3, quoted): `GET` answers with it, and a `PUT` bearing it in
/// `If-Match` replaces the tag only if it still names those bytes.
pub fn manifest_etag(json: &[u8]) -> String {
    format!("\"{}\"", blake3::hash(json).to_hex())
}

/// The answer to `GET /v1/auth`: what the presented token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessReport {
    pub read: bool,
    pub write: bool,
}

/// The answer to an upload (`POST /v1/chunks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadOutcome {
    /// Chunks in the request.
    pub received: u64,
    /// Chunks the store did not hold before.
    pub stored: u64,
    /// Their uncompressed bytes.
    pub stored_bytes: u64,
}

pub const ID_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = ID_LEN + 1 + 4;
/// The largest payload a record may declare: a 16 MiB chunk (the FastCDC
/// maximum) that zstd could not shrink, plus room for zstd's own framing.
pub const MAX_RECORD_PAYLOAD: u32 = MAX_CHUNK_SIZE + 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Chunk = 0,
    Missing = 1,
    Frame = 2,
}

/// Where a chunk lies in a frame record's decompressed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameChunk {
    pub id: ChunkId,
    pub offset: u32,
    pub len: u32,
}

const FRAME_HEADER_LEN: usize = 8;
const FRAME_ENTRY_LEN: usize = ID_LEN + 8;

/// One record read from a body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkRecord {
    /// The chunk's zstd frame, not yet checked against the id.
    Chunk {
        id: ChunkId,
        wire: Vec<u8>,
    },
    Missing(ChunkId),
    /// A stored frame (not yet decompressed or checked) and the chunks of it asked for.
    Frame {
        chunks: Vec<FrameChunk>,
        raw_len: u32,
        frame: Vec<u8>,
    },
}

impl ChunkRecord {
    pub fn id(&self) -> &ChunkId {
        match self {
            ChunkRecord::Chunk { id, .. } | ChunkRecord::Missing(id) => id,
            ChunkRecord::Frame { chunks, .. } => &chunks[0].id,
        }
    }
}

pub fn encode_ids<'a>(ids: impl IntoIterator<Item = &'a ChunkId>) -> Vec<u8> {
    ids.into_iter().flat_map(|id| *id.as_bytes()).collect()
}

/// Splits an id list; its length must be a multiple of 32.
pub fn decode_ids(body: &[u8]) -> io::Result<Vec<ChunkId>> {
    if !body.len().is_multiple_of(ID_LEN) {
        return Err(malformed(format!(
            "an id list is a multiple of {ID_LEN} bytes, this one is {}",
            body.len()
        )));
    }
    body.chunks_exact(ID_LEN)
        .map(|raw| ChunkId::from_slice(raw).map_err(|e| malformed(e.to_string())))
        .collect()
}

/// The header of a record; the payload (if any) follows it.
pub fn record_header(id: &ChunkId, kind: RecordKind, payload_len: u32) -> [u8; RECORD_HEADER_LEN] {
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[..ID_LEN].copy_from_slice(id.as_bytes());
    header[ID_LEN] = kind as u8;
    header[ID_LEN + 1..].copy_from_slice(&payload_len.to_le_bytes());
    header
}

/// Appends a whole chunk record to `out`.
pub fn write_chunk_record(out: &mut Vec<u8>, id: &ChunkId, wire: &[u8]) {
    let len = u32::try_from(wire.len()).expect("a wire chunk is far below 4 GiB");
    out.extend_from_slice(&record_header(id, RecordKind::Chunk, len));
    out.extend_from_slice(wire);
}

/// The payload of a frame record: `chunks` (at least one) of a frame of
/// `raw_len` bytes, compressed as `frame`.
pub fn frame_payload(chunks: &[FrameChunk], raw_len: u32, frame: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(FRAME_HEADER_LEN + chunks.len() * FRAME_ENTRY_LEN + frame.len());
    let count = u32::try_from(chunks.len()).expect("a frame holds far fewer than 4G chunks");
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    for chunk in chunks {
        out.extend_from_slice(chunk.id.as_bytes());
        out.extend_from_slice(&chunk.offset.to_le_bytes());
        out.extend_from_slice(&chunk.len.to_le_bytes());
    }
    out.extend_from_slice(frame);
    out
}

fn parse_frame_payload(id: &ChunkId, payload: Vec<u8>) -> io::Result<ChunkRecord> {
    let word = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
    if payload.len() < FRAME_HEADER_LEN {
        return Err(malformed(format!("the frame record of {id} has no header")));
    }
    let (count, raw_len) = (word(0) as usize, word(4));
    let table_end = count
        .checked_mul(FRAME_ENTRY_LEN)
        .and_then(|t| t.checked_add(FRAME_HEADER_LEN))
        .filter(|&end| count > 0 && end <= payload.len())
        .ok_or_else(|| malformed(format!("the frame record of {id} lists {count} chunks")))?;
    if raw_len > MAX_RECORD_PAYLOAD {
        return Err(malformed(format!(
            "the frame record of {id} declares {raw_len} bytes, more than the {MAX_RECORD_PAYLOAD} allowed"
        )));
    }
    let chunks = payload[FRAME_HEADER_LEN..table_end]
        .chunks_exact(FRAME_ENTRY_LEN)
        .map(|entry| {
            let chunk = FrameChunk {
                id: ChunkId::from_slice(&entry[..ID_LEN]).map_err(|e| malformed(e.to_string()))?,
                offset: u32::from_le_bytes(entry[ID_LEN..ID_LEN + 4].try_into().expect("4 bytes")),
                len: u32::from_le_bytes(entry[ID_LEN + 4..].try_into().expect("4 bytes")),
            };
            match chunk.offset.checked_add(chunk.len) {
                Some(end) if end <= raw_len => Ok(chunk),
                _ => Err(malformed(format!(
                    "chunk {} lies outside its frame of {raw_len} bytes",
                    chunk.id
                ))),
            }
        })
        .collect::<io::Result<Vec<_>>>()?;
    if chunks[0].id != *id {
        return Err(malformed(format!(
            "a frame record headed {id} starts with chunk {}",
            chunks[0].id
        )));
    }
    let frame = payload[table_end..].to_vec();
    Ok(ChunkRecord::Frame {
        chunks,
        raw_len,
        frame,
    })
}

/// Reads records one by one from a body or a response stream.
pub struct RecordReader<R> {
    source: R,
}

impl<R: Read> RecordReader<R> {
    pub fn new(source: R) -> Self {
        RecordReader { source }
    }

    pub fn into_inner(self) -> R {
        self.source
    }

    /// The next record, `None` at a clean end between records. A stream that
    /// ends inside a record, an unknown kind or an oversized length is an
    /// `InvalidData` error.
    pub fn next_record(&mut self) -> io::Result<Option<ChunkRecord>> {
        let mut header = [0u8; RECORD_HEADER_LEN];
        let mut filled = 0;
        while filled < header.len() {
            match self.source.read(&mut header[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(malformed("the body ends inside a record header".into())),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let id = ChunkId::from_slice(&header[..ID_LEN]).map_err(|e| malformed(e.to_string()))?;
        let len = u32::from_le_bytes(header[ID_LEN + 1..].try_into().expect("4 bytes"));
        match header[ID_LEN] {
            k if k == RecordKind::Chunk as u8 => {
                let wire = self.payload(len, || format!("chunk {id}"))?;
                Ok(Some(ChunkRecord::Chunk { id, wire }))
            }
            k if k == RecordKind::Missing as u8 && len == 0 => Ok(Some(ChunkRecord::Missing(id))),
            k if k == RecordKind::Frame as u8 => {
                let payload = self.payload(len, || format!("the frame record of {id}"))?;
                parse_frame_payload(&id, payload).map(Some)
            }
            k => Err(malformed(format!(
                "record for {id} has kind {k} and length {len}"
            ))),
        }
    }
}

impl<R: Read> RecordReader<R> {
    /// A record's payload of `len` bytes, bounded; `what` names the record in errors.
    fn payload(&mut self, len: u32, what: impl Fn() -> String) -> io::Result<Vec<u8>> {
        if len > MAX_RECORD_PAYLOAD {
            return Err(malformed(format!(
                "{} declares {len} bytes, more than the {MAX_RECORD_PAYLOAD} allowed",
                what()
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.source.read_exact(&mut payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                malformed(format!("the body ends inside {}", what()))
            } else {
                e
            }
        })?;
        Ok(payload)
    }
}

impl<R: Read> Iterator for RecordReader<R> {
    type Item = io::Result<ChunkRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

fn malformed(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_records_round_trip() {
        let ids = [ChunkId::of(b"a"), ChunkId::of(b"b")];
        assert_eq!(decode_ids(&encode_ids(&ids)).unwrap(), ids);
        assert!(decode_ids(&[0u8; 33]).is_err());

        let mut body = Vec::new();
        write_chunk_record(&mut body, &ids[0], b"zstd bytes");
        body.extend_from_slice(&record_header(&ids[1], RecordKind::Missing, 0));
        let records: Vec<_> = RecordReader::new(&body[..])
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(
            records,
            [
                ChunkRecord::Chunk {
                    id: ids[0],
                    wire: b"zstd bytes".to_vec()
                },
                ChunkRecord::Missing(ids[1])
            ]
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, reading records ends in records or an error:
        /// never a panic, never a payload past the bound.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            for record in RecordReader::new(&body[..]) {
                match record {
                    Ok(ChunkRecord::Chunk { wire, .. }) => {
                        proptest::prop_assert!(wire.len() <= MAX_RECORD_PAYLOAD as usize);
                    }
                    Ok(ChunkRecord::Missing(_)) => {}
                    Ok(ChunkRecord::Frame { chunks, raw_len, frame }) => {
                        proptest::prop_assert!(frame.len() <= MAX_RECORD_PAYLOAD as usize);
                        proptest::prop_assert!(chunks.iter().all(|c| c.offset + c.len <= raw_len));
                    }
                    Err(_) => break,
                }
            }
            let _ = decode_ids(&body);
        }
    }

    #[test]
    fn frame_records_round_trip_and_hostile_tables_are_errors() {
        let chunks = [
            FrameChunk {
                id: ChunkId::of(b"a"),
                offset: 0,
                len: 10,
            },
            FrameChunk {
                id: ChunkId::of(b"b"),
                offset: 10,
                len: 5,
            },
        ];
        let record = |chunks: &[FrameChunk], raw_len: u32| {
            let payload = frame_payload(chunks, raw_len, b"zstd frame");
            let mut body =
                record_header(&chunks[0].id, RecordKind::Frame, payload.len() as u32).to_vec();
            body.extend_from_slice(&payload);
            body
        };
        let body = record(&chunks, 15);
        assert_eq!(
            RecordReader::new(&body[..]).next_record().unwrap(),
            Some(ChunkRecord::Frame {
                chunks: chunks.to_vec(),
                raw_len: 15,
                frame: b"zstd frame".to_vec()
            })
        );
        // A chunk past the frame's end, a frame over the bound, no chunks, a wrong head.
        assert!(RecordReader::new(&record(&chunks, 14)[..])
            .next_record()
            .is_err());
        assert!(RecordReader::new(&record(&chunks, u32::MAX)[..])
            .next_record()
            .is_err());
        let mut empty = record(&chunks, 15);
        empty[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(RecordReader::new(&empty[..]).next_record().is_err());
        let mut lying_count = record(&chunks, 15);
        lying_count[RECORD_HEADER_LEN..RECORD_HEADER_LEN + 4]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(RecordReader::new(&lying_count[..]).next_record().is_err());
        let mut wrong_head = record(&chunks, 15);
        wrong_head[..ID_LEN].copy_from_slice(ChunkId::of(b"c").as_bytes());
        assert!(RecordReader::new(&wrong_head[..]).next_record().is_err());
        assert!(RecordReader::new(&body[..body.len() - 1])
            .next_record()
            .is_err());
    }

    #[test]
    fn truncated_and_hostile_bodies_are_errors() {
        let id = ChunkId::of(b"a");
        let mut body = Vec::new();
        write_chunk_record(&mut body, &id, b"0123456789");
        for cut in [1, RECORD_HEADER_LEN - 1, RECORD_HEADER_LEN + 3] {
            let mut reader = RecordReader::new(&body[..cut]);
            let err = reader.next_record().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "cut at {cut}");
        }
        let huge = record_header(&id, RecordKind::Chunk, u32::MAX);
        assert!(RecordReader::new(&huge[..]).next_record().is_err());
        let bad_kind = record_header(&id, RecordKind::Chunk, 0);
        let mut bad_kind = bad_kind.to_vec();
        bad_kind[ID_LEN] = 9;
        assert!(RecordReader::new(&bad_kind[..]).next_record().is_err());
        let missing_with_payload = record_header(&id, RecordKind::Missing, 4);
        assert!(RecordReader::new(&missing_with_payload[..])
            .next_record()
            .is_err());
    }
}
