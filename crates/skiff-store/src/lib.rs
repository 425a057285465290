//! The local chunk store: a RocksDB index over append-only pack files of
//! zstd frames, plus the image catalog (name:tag → manifest → index).
//!
//! ```text
//! STORE/
//!   skiff-store.json   store parameters (chunking, frame size, zstd level)
//!   lock               held (flock) by the one process that may write
//!   db/                RocksDB: chunks, indexes, images, layers, meta
//!   packs/00000001.pack
//! ```
//!
//! Crash safety: frame bytes are written and fsynced *before* the RocksDB
//! batch that makes them reachable, and every pack's committed length is in
//! that batch; on open, bytes past it are cut off and packs the database does
//! not know are removed.

mod error;
mod gc;
mod layout;
mod pack;
mod source;
mod store;
#[cfg(test)]
mod tests;

pub use error::StoreError;
pub use gc::GcReport;
pub use layout::{ChunkLocation, LayerRecord, StoreConfig};
pub use pack::{PackWriter, WriteSummary};

pub use store::{FsckReport, Store, StoreStats};
