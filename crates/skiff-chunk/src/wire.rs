//! One chunk on its own, as the chunk server sends and receives it: a single
//! zstd frame of the chunk's bytes. The receiver decompresses it with a bound
//! and checks the BLAKE3 id before anything else sees the bytes.

use std::cell::RefCell;

use skiff_format::ChunkId;

use crate::frame::{verify_chunk, ChunkError, DEFAULT_ZSTD_LEVEL};

thread_local! {
    // A zstd context costs about as much to set up as compressing a small
    // chunk, and servers compress chunk after chunk: one per thread, reused.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses one chunk for the wire.
pub fn compress_chunk(data: &[u8]) -> Result<Vec<u8>, ChunkError> {
    COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some(compressor) => compressor,
            None => slot.insert(
                zstd::bulk::Compressor::new(DEFAULT_ZSTD_LEVEL).map_err(ChunkError::Compress)?,
            ),
        };
        compressor.compress(data).map_err(ChunkError::Compress)
    })
}

/// Decompresses a chunk received from elsewhere and checks it against `id`.
/// `max_len` bounds the output, so a hostile frame cannot allocate without limit.
pub fn decompress_chunk(id: &ChunkId, wire: &[u8], max_len: usize) -> Result<Vec<u8>, ChunkError> {
    let data = DECOMPRESSOR.with_borrow_mut(|slot| {
        let decompressor = match slot {
            Some(decompressor) => decompressor,
            None => slot.insert(zstd::bulk::Decompressor::new().map_err(ChunkError::Decompress)?),
        };
        decompressor
            .decompress(wire, max_len)
            .map_err(ChunkError::Decompress)
    })?;
    verify_chunk(id, &data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_lies_are_caught() {
        let data = vec![7u8; 70_000];
        let id = ChunkId::of(&data);
        let wire = compress_chunk(&data).unwrap();
        assert!(wire.len() < 1000);
        assert_eq!(decompress_chunk(&id, &wire, 70_000).unwrap(), data);
        // Bigger than the bound: refused, not allocated.
        assert!(decompress_chunk(&id, &wire, 69_999).is_err());
        // Valid zstd of other bytes: a digest mismatch.
        let other = compress_chunk(b"other").unwrap();
        assert!(matches!(
            decompress_chunk(&id, &other, 70_000),
            Err(ChunkError::DigestMismatch { .. })
        ));
        assert!(decompress_chunk(&id, b"not zstd", 70_000).is_err());
    }
}
