//! The local store as a [`ChunkSource`].

use skiff_format::ChunkId;
use skiff_source::{Bytes, ChunkSource, SourceError};

use crate::{Store, StoreError};

impl ChunkSource for Store {
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        for id in ids {
            let data = self.read_chunk(id).map_err(|e| match e {
                StoreError::ChunkNotFound(id) => SourceError::Missing(id),
                StoreError::Chunk(e) => SourceError::Corrupt(e.to_string()),
                other => SourceError::Unavailable(other.to_string()),
            })?;
            each(*id, Bytes::from(data));
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("store {}", self.root().display())
    }
}
