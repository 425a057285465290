//! The chunk server and the host's chunk cache as [`ChunkSource`]s for a lazy mount.

use std::sync::Arc;

use skiff_format::{ChunkId, ChunkRef};
use skiff_source::{Bytes, ChunkSource, SourceError, SourceTraffic};

use crate::cache::ChunkCache;
use crate::{Client, ClientError};

impl ChunkSource for Client {
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        Client::fetch(self, ids, |id, data, _wire_len| {
            each(id, data);
            Ok(())
        })
        .map_err(|e| match e {
            ClientError::ChunkMissing(id) => SourceError::Missing(id),
            ClientError::Chunk(e) => SourceError::Corrupt(e.to_string()),
            other => SourceError::Unavailable(other.to_string()),
        })
    }

    fn describe(&self) -> String {
        self.server().to_owned()
    }
}

/// A remote source behind the host's chunk cache: what arrives is cached
/// for every mount, and what is cached is never asked for again.
pub struct CachedSource<S> {
    cache: Arc<ChunkCache>,
    remote: S,
}

impl<S: ChunkSource> CachedSource<S> {
    pub fn new(cache: Arc<ChunkCache>, remote: S) -> Self {
        CachedSource { cache, remote }
    }
}

impl<S: ChunkSource> ChunkSource for CachedSource<S> {
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        let fetched = self.remote.fetch(ids, &mut |id, data| {
            // A full or failing disk costs refetches later, not this read.
            if let Err(e) = self.cache.put(&id, data.clone()) {
                tracing::warn!("{e}");
            }
            each(id, data);
        });
        // What one fetch brought is one pack (or a few, for a long one).
        if let Err(e) = self.cache.flush() {
            tracing::warn!("{e}");
        }
        fetched
    }

    fn local(&self, id: &ChunkId) -> Option<Bytes> {
        self.cache.get(id)
    }

    fn is_local(&self, id: &ChunkId) -> bool {
        self.cache.contains(id)
    }

    fn assembled(&self, chunks: &[ChunkRef], build: bool) -> Option<std::fs::File> {
        self.cache
            .assembled(chunks, build)
            .map_err(|e| tracing::warn!("{e}"))
            .ok()
            .flatten()
    }

    fn pin(&self, ids: &[ChunkId]) {
        self.cache.pin(ids);
    }

    fn unpin(&self, ids: &[ChunkId]) {
        self.cache.unpin(ids);
    }

    fn traffic(&self) -> Option<SourceTraffic> {
        self.remote.traffic()
    }

    fn describe(&self) -> String {
        format!(
            "{} through the cache at {}",
            self.remote.describe(),
            self.cache.root().display()
        )
    }
}
