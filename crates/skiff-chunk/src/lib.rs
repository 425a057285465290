//! Content-defined chunking (FastCDC 2020), chunk hashing (BLAKE3) and the
//! zstd frames that group chunks for storage and transfer.

mod chunker;
mod frame;
mod wire;

pub use chunker::Chunker;
pub use frame::{
    decompress_frame, verify_chunk, ChunkError, Frame, FrameBuilder, FrameEntry, RawFrame,
    DEFAULT_FRAME_SIZE, DEFAULT_ZSTD_LEVEL, STORE_ZSTD_LEVEL,
};
pub use wire::{compress_chunk, decompress_bounded, decompress_chunk};
