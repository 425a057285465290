//! The hot-chunk cache: chunks in their wire form (one zstd frame each),
//! bounded by bytes, so a popular chunk is read and compressed once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use skiff_chunk::compress_chunk;
use skiff_format::{ChunkId, ImageManifest, InodeKind};
use skiff_store::{Store, StoreError};

use crate::metrics::Metrics;

/// Per-entry bookkeeping counted against the budget besides the bytes.
const ENTRY_OVERHEAD: u64 = 96;
/// An image is warmed at most this often, however often its manifest is read.
const REWARM_AFTER: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct WireWeighter;

impl Weighter<ChunkId, Bytes> for WireWeighter {
    fn weight(&self, _id: &ChunkId, wire: &Bytes) -> u64 {
        wire.len() as u64 + ENTRY_OVERHEAD
    }
}

pub struct HotCache {
    chunks: Cache<ChunkId, Bytes, WireWeighter>,
    capacity: u64,
    warmed: Mutex<HashMap<skiff_format::IndexDigest, Instant>>,
    metrics: Arc<Metrics>,
}

impl HotCache {
    pub fn new(capacity_bytes: u64, metrics: Arc<Metrics>) -> Self {
        // quick_cache sizes its tables from an item estimate: chunks average ~25 KiB compressed.
        let estimated_items = (capacity_bytes / 25_000).clamp(64, 1 << 22) as usize;
        HotCache {
            chunks: Cache::with_weighter(estimated_items, capacity_bytes.max(1), WireWeighter),
            capacity: capacity_bytes,
            warmed: Mutex::default(),
            metrics,
        }
    }

    /// The chunk's wire form if the cache holds it; counts a hit.
    pub fn get(&self, id: &ChunkId) -> Option<Bytes> {
        let wire = self.chunks.get(id)?;
        self.metrics.cache_hits.inc();
        Some(wire)
    }

    /// A chunk the cache lacks (counted as a miss): read from the store,
    /// verified, compressed and cached. `None` if the store does not hold
    /// it. Blocking: call it off the async workers.
    pub fn load(&self, store: &Store, id: &ChunkId) -> Result<Option<Bytes>, StoreError> {
        self.metrics.cache_misses.inc();
        self.fill(store, id)
    }

    fn fill(&self, store: &Store, id: &ChunkId) -> Result<Option<Bytes>, StoreError> {
        let data = match store.read_chunk(id) {
            Ok(data) => data,
            Err(StoreError::ChunkNotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let wire = Bytes::from(compress_chunk(&data)?);
        if self.capacity > 0 {
            self.chunks.insert(*id, wire.clone());
            self.metrics.cache_bytes.set(self.chunks.weight() as i64);
        }
        Ok(Some(wire))
    }

    /// Loads the chunks a client that just fetched `manifest` will most
    /// likely ask for first, so those requests hit memory: the first chunk
    /// of each of the image's smallest files, up to an eighth of the cache
    /// (startup programs open many small files: libraries, configs, scripts).
    /// Blocking; returns how many chunks were loaded.
    pub fn warm(&self, store: &Store, manifest: &ImageManifest) -> Result<u64, StoreError> {
        let digest = manifest.index.digest;
        {
            let mut warmed = self.warmed.lock().expect("warm log poisoned");
            let now = Instant::now();
            warmed.retain(|_, at| now.duration_since(*at) < REWARM_AFTER);
            if warmed.insert(digest, now).is_some() {
                return Ok(0);
            }
        }
        let budget = self.capacity / 8;
        let index = store.index(&digest)?;
        let mut first_chunks: Vec<(u64, ChunkId, u32)> = index
            .inodes
            .iter()
            .filter_map(|inode| match &inode.kind {
                InodeKind::File { chunks, .. } => {
                    chunks.first().map(|c| (inode.size(), c.id, c.len))
                }
                _ => None,
            })
            .collect();
        first_chunks.sort_unstable_by_key(|(size, ..)| *size);
        let (mut spent, mut loaded) = (0u64, 0u64);
        for (_, id, len) in first_chunks {
            if spent + u64::from(len) > budget {
                break;
            }
            if self.chunks.contains_key(&id) {
                continue;
            }
            // Counted at raw size: a safe over-estimate of the wire size.
            spent += u64::from(len);
            if self.fill(store, &id)?.is_some() {
                loaded += 1;
            }
        }
        self.metrics.cache_warmed.inc_by(loaded);
        tracing::debug!(image = %manifest.image_ref(), loaded, "warmed the hot-chunk cache");
        Ok(loaded)
    }
}
