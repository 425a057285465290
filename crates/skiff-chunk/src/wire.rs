//! One chunk on its own, as the chunk server sends and receives it: a single
//! zstd frame of the chunk's bytes. The receiver decompresses it with a bound
//! and checks the BLAKE3 id before anything else sees the bytes.

use std::cell::RefCell;
use std::io::Read;

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
    let data = decompress_bounded(wire, max_len)?;
    verify_chunk(id, &data)?;
    Ok(data)
}

/// Decompresses one zstd frame of at most `max_len` bytes. Memory follows
/// what the frame holds, not the bound: a frame that states its size (as
/// skiff's do) gets exactly that, one that does not is read as a stream.
pub fn decompress_bounded(data: &[u8], max_len: usize) -> Result<Vec<u8>, ChunkError> {
    let too_large = || ChunkError::TooLarge { limit: max_len };
    match zstd::zstd_safe::get_frame_content_size(data) {
        Ok(Some(size)) => {
            let size = usize::try_from(size)
                .ok()
                .filter(|&s| s <= max_len)
                .ok_or_else(too_large)?;
            let out = DECOMPRESSOR.with_borrow_mut(|slot| {
                let decompressor = match slot {
                    Some(decompressor) => decompressor,
                    None => slot
                        .insert(zstd::bulk::Decompressor::new().map_err(ChunkError::Decompress)?),
                };
                decompressor
                    .decompress(data, size)
                    .map_err(ChunkError::Decompress)
            })?;
            if out.len() != size {
                return Err(ChunkError::FrameLength {
                    expected: size,
                    actual: out.len(),
                });
            }
            Ok(out)
        }
        Ok(None) => {
            let decoder = zstd::stream::read::Decoder::new(data).map_err(ChunkError::Decompress)?;
            let mut out = Vec::new();
            decoder
                .take(max_len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(ChunkError::Decompress)?;
            if out.len() > max_len {
                return Err(too_large());
            }
            Ok(out)
        }
        Err(_) => Err(ChunkError::Decompress(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a zstd frame",
        ))),
    }
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

    #[test]
    fn frames_without_a_stated_size_are_bounded_too() {
        let data = vec![1u8; 100_000];
        let mut streamed = Vec::new();
        let mut encoder = zstd::stream::write::Encoder::new(&mut streamed, 3).unwrap();
        std::io::Write::write_all(&mut encoder, &data).unwrap();
        encoder.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(),
            None
        );
        assert_eq!(decompress_bounded(&streamed, 100_000).unwrap(), data);
        assert!(matches!(
            decompress_bounded(&streamed, 99_999),
            Err(ChunkError::TooLarge { .. })
        ));
        let sized = compress_chunk(&data).unwrap();
        assert!(matches!(
            decompress_bounded(&sized, 99_999),
            Err(ChunkError::TooLarge { .. })
        ));
    }
}
