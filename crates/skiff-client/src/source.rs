//! The chunk server and the host's chunk cache as [`ChunkSource`]s for a lazy mount.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_format::{ChunkId, ChunkRef};
use skiff_source::{Bytes, ChunkSource, SourceError, SourceTraffic};

use crate::cache::ChunkCache;
use crate::claims::{Claim, Claims};
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
    /// Chunks a fetch found in a shared cache, written by another host.
    from_shared_cache: AtomicU64,
}

/// A host waiting for a chunk another host claimed looks for it this
/// often at first, and backs off to
const LOOK_FIRST: Duration = Duration::from_millis(5);
const LOOK_AT_MOST: Duration = Duration::from_millis(100);
/// A live claim is waited on at most this long after the last chunk came;
/// then the chunk is fetched anyway (twice in all, rather than a read
/// stalled by a stuck host).
const WAIT_AT_MOST: Duration = Duration::from_secs(60);
/// Chunks claimed and fetched at a time (16 MiB, the largest read window,
/// for chunks of 64 KiB: a long prefetch batch goes in pieces).
const CLAIM_PIECE: usize = 256;

impl<S: ChunkSource> CachedSource<S> {
    pub fn new(cache: Arc<ChunkCache>, remote: S) -> Self {
        CachedSource {
            cache,
            remote,
            from_shared_cache: AtomicU64::new(0),
        }
    }

    /// Fetches `ids` from the remote and caches them as one pack (or a few,
    /// for a long fetch).
    fn fetch_into_cache(
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
        if let Err(e) = self.cache.flush() {
            tracing::warn!("{e}");
        }
        fetched
    }

    /// [`ChunkSource::fetch_wanting`] on a cache several hosts share:
    /// fetches the chunks no other host has claimed, then waits for the
    /// others' claims on the first `needed` to land in the cache, taking
    /// over a claim whose holder stopped renewing it. The others' claims on
    /// the rest are left to them: this host brings something else meanwhile.
    fn fetch_claimed(
        &self,
        claims: &Claims,
        ids: &[ChunkId],
        needed: usize,
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        let mut waiting: Vec<(ChunkId, bool)> = ids
            .iter()
            .enumerate()
            .map(|(at, id)| (*id, at < needed))
            .collect();
        let mut look_again = LOOK_FIRST;
        // Since the last chunk arrived: a live claim is waited on this long at most.
        let mut progress = Instant::now();
        let mut first_look = true;
        while !waiting.is_empty() {
            // Packs other hosts wrote since the last look (listed whatever
            // the directory's mtime says once this host waits: NFS may show
            // it late).
            if first_look {
                self.cache.refresh();
            } else {
                self.cache.refresh_now();
            }
            first_look = false;
            let mut mine = Vec::new();
            let out_of_patience = progress.elapsed() >= WAIT_AT_MOST;
            let before = waiting.len();
            waiting.retain(|&(id, needed)| {
                if let Some(data) = self.cache.get(&id) {
                    self.from_shared_cache.fetch_add(1, Ordering::Relaxed);
                    each(id, data);
                    return false;
                }
                // Claimed a piece at a time, so others wait on a claim for
                // one piece's fetch, not a whole long batch's.
                if mine.len() >= CLAIM_PIECE {
                    return true;
                }
                if out_of_patience || claims.claim(&id) == Claim::Mine {
                    mine.push(id);
                    return false;
                }
                needed
            });
            if waiting.len() + mine.len() < before {
                progress = Instant::now();
            }
            if mine.is_empty() {
                if !waiting.is_empty() {
                    std::thread::sleep(look_again);
                    look_again = (look_again * 2).min(LOOK_AT_MOST);
                }
                continue;
            }
            // A host that wrote a chunk's pack released its claim after:
            // one claimed since the last look may be here already.
            self.cache.refresh_now();
            mine.retain(|id| match self.cache.get(id) {
                Some(data) => {
                    claims.release(&[*id]);
                    self.from_shared_cache.fetch_add(1, Ordering::Relaxed);
                    each(*id, data);
                    false
                }
                None => true,
            });
            let fetched = self.fetch_into_cache(&mine, each);
            // Released once in a pack (or failed): a waiting host then finds it
            // or claims it.
            claims.release(&mine);
            fetched?;
            look_again = LOOK_FIRST;
            progress = Instant::now();
        }
        Ok(())
    }
}

impl<S: ChunkSource> ChunkSource for CachedSource<S> {
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        self.fetch_wanting(ids, ids.len(), each)
    }

    fn fetch_wanting(
        &self,
        ids: &[ChunkId],
        needed: usize,
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        match self.cache.claims() {
            Some(claims) => self.fetch_claimed(claims, ids, needed, each),
            None => self.fetch_into_cache(ids, each),
        }
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
        let from_shared_cache = self.from_shared_cache.load(Ordering::Relaxed);
        match self.remote.traffic() {
            Some(traffic) => Some(SourceTraffic {
                from_shared_cache,
                ..traffic
            }),
            None => (from_shared_cache > 0).then(|| SourceTraffic {
                from_shared_cache,
                ..SourceTraffic::default()
            }),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} through the cache at {}",
            self.remote.describe(),
            self.cache.root().display()
        )
    }
}
