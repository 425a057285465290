//! The hot-chunk cache: chunks in their wire form (one zstd frame each),
//! bounded by bytes, so a popular chunk is read and compressed once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use rayon::prelude::*;
use skiff_chunk::compress_chunk;
use skiff_format::{ChunkId, ImageManifest, ImageRef, InodeKind};
use skiff_store::{Store, StoreError};

use crate::metrics::Metrics;

/// Per-entry bookkeeping counted against the budget besides the bytes.
const ENTRY_OVERHEAD: u64 = 96;
/// An image is warmed at most this often, however often its manifest is read.
const REWARM_AFTER: Duration = Duration::from_secs(60);
/// A tag put this recently names a recently pushed image, whose first
/// pulls are likely to follow soon (the FAST '18 registry study): reading
/// its manifest warms the cache. Older images' hot chunks are in the cache
/// already if they are still pulled.
const RECENTLY_PUSHED: Duration = Duration::from_secs(3600);
/// Chunks a warm loads side by side before it moves on down the order.
const WARM_BATCH: usize = 8;

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
    /// When each tag was last put on this server.
    pushed: Mutex<HashMap<ImageRef, Instant>>,
    /// Warms run here, not on the global pool, where they would hold up the
    /// chunk loads of every client's batch until they finished.
    warm_pool: Option<rayon::ThreadPool>,
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
            pushed: Mutex::default(),
            warm_pool: rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .thread_name(|i| format!("skiff-warm-{i}"))
                .build()
                .map_err(|e| tracing::warn!("no warm threads ({e}): warming on the shared pool"))
                .ok(),
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

    /// Notes that `manifest`'s tag was just put (pushed, or its profile
    /// updated): its next read warms the cache again.
    pub fn note_pushed(&self, manifest: &ImageManifest) {
        {
            let mut pushed = self.pushed.lock().expect("push log poisoned");
            let now = Instant::now();
            pushed.retain(|_, at| now.duration_since(*at) < RECENTLY_PUSHED);
            pushed.insert(manifest.image_ref(), now);
        }
        self.warmed
            .lock()
            .expect("warm log poisoned")
            .remove(&manifest.index.digest);
    }

    /// Whether `image`'s tag was put within the last hour: only then does
    /// reading its manifest warm the cache.
    pub fn recently_pushed(&self, image: &ImageRef) -> bool {
        self.pushed
            .lock()
            .expect("push log poisoned")
            .get(image)
            .is_some_and(|at| at.elapsed() < RECENTLY_PUSHED)
    }

    /// When `manifest` names a recently pushed image, loads the chunks the
    /// client that just fetched it will most likely ask for first, so those
    /// requests hit memory, up to an eighth of the cache: the image's
    /// startup profile in the order the start read it, or without one the
    /// first chunk of each of its smallest files (a start opens many small
    /// files: libraries, configs, scripts). Blocking; returns how many
    /// chunks were loaded.
    pub fn warm(&self, store: &Store, manifest: &ImageManifest) -> Result<u64, StoreError> {
        if !self.recently_pushed(&manifest.image_ref()) {
            return Ok(0);
        }
        let digest = manifest.index.digest;
        {
            let mut warmed = self.warmed.lock().expect("warm log poisoned");
            let now = Instant::now();
            warmed.retain(|_, at| now.duration_since(*at) < REWARM_AFTER);
            if warmed.contains_key(&digest) {
                return Ok(0);
            }
            warmed.insert(digest, now);
        }
        let budget = self.capacity / 8;
        let index = store.index(&digest)?;
        // A profile the index does not match (no store accepts one) is ignored.
        let profiled = manifest
            .profile
            .as_ref()
            .and_then(|profile| profile.chunk_order(&index).ok())
            .filter(|order| !order.is_empty());
        let order: Vec<(ChunkId, u32)> = match profiled {
            Some(order) => {
                let lengths: HashMap<ChunkId, u32> =
                    index.chunk_refs().map(|c| (c.id, c.len)).collect();
                order
                    .into_iter()
                    .filter_map(|id| lengths.get(&id).map(|len| (id, *len)))
                    .collect()
            }
            None => {
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
                first_chunks
                    .into_iter()
                    .map(|(_, id, len)| (id, len))
                    .collect()
            }
        };
        let mut spent = 0u64;
        let mut seen = HashSet::new();
        let wanted: Vec<ChunkId> = order
            .into_iter()
            // Identical small files share their first chunk: load it once.
            .filter(|(id, _)| seen.insert(*id) && !self.chunks.contains_key(id))
            // Counted at raw size: a safe over-estimate of the wire size.
            .take_while(|(_, len)| {
                spent += u64::from(*len);
                spent <= budget
            })
            .map(|(id, _)| id)
            .collect();
        // In order, a few at a time on the warm threads: the client asks
        // for the first chunks as soon as it has the manifest.
        let mut loaded = 0u64;
        for batch in wanted.chunks(WARM_BATCH) {
            let fill = || {
                batch
                    .par_iter()
                    .map(|id| self.fill(store, id).map(|wire| u64::from(wire.is_some())))
                    .sum::<Result<u64, StoreError>>()
            };
            loaded += match &self.warm_pool {
                Some(pool) => pool.install(fill),
                None => fill(),
            }?;
        }
        self.metrics.cache_warmed.inc_by(loaded);
        tracing::debug!(image = %manifest.image_ref(), loaded, "warmed the hot-chunk cache");
        Ok(loaded)
    }
}
