//! Background prefetch: after the mount is ready, fetch the image's chunks
//! in the order a start is likely to need them, in batches that step aside
//! while reads are waiting on the source.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_format::wire::MAX_IDS_PER_REQUEST;
use skiff_format::ChunkId;

use crate::fetcher::Fetcher;
use crate::readahead::Layout;

#[derive(Clone, Debug)]
pub struct PrefetchConfig {
    /// Raw bytes of the first batch request, and the fewest of any.
    pub batch_bytes: u64,
    /// Later batches hold what the source brought in this long at the rate
    /// the last one came, up to `max_batch_bytes`.
    pub batch_time: Duration,
    pub max_batch_bytes: u64,
    /// Upper bound on the average rate, in bytes per second (0: none).
    pub max_rate: u64,
    /// Chunk ids to fetch first (a startup profile), before the rest.
    pub first: Vec<ChunkId>,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            batch_bytes: 4 << 20,
            batch_time: BATCH_TIME,
            max_batch_bytes: MAX_BATCH_BYTES,
            max_rate: 0,
            first: Vec::new(),
        }
    }
}

/// A batch after the first holds what the source brought in this long at
/// the rate the last batch came (at least `batch_bytes`): a read that
/// comes while a batch is under way shares the link with it for about as
/// long, and a fast source is asked in few large requests (on loopback,
/// a walk of `git` beside the prefetch made ~65 requests instead of ~100
/// with fixed 4 MiB batches, and took 1.12 s instead of 1.29 s).
const BATCH_TIME: Duration = Duration::from_millis(100);
/// The largest batch, in raw bytes.
const MAX_BATCH_BYTES: u64 = 64 << 20;
/// A batch grows at most this many times from one to the next.
const BATCH_GROWTH: u64 = 2;

/// Chunks asked for at once when prefetch goes back for those left out.
const LEFT_OUT_BATCH: usize = 64;
/// After a failed batch, wait this long before the next try.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// Failures at the same chunk (each after the client's own retries) before
/// that chunk is left to the reads.
const GIVE_UP_AFTER: u32 = 3;
/// How often a paused prefetch looks again whether reads are still waiting.
const YIELD_POLL: Duration = Duration::from_millis(5);
/// A startup profile is fetched in requests of up to this many raw bytes:
/// one request for any profile of a usual size.
const PROFILE_BATCH_BYTES: u64 = 64 << 20;
/// After the profile, the rest waits until no read has come for this long,
const SETTLE: Duration = Duration::from_millis(500);
/// but no longer than this.
const SETTLE_AT_MOST: Duration = Duration::from_secs(5);

/// Every distinct chunk of the image in the order to fetch it, with its length.
pub struct PrefetchPlan {
    pub order: Vec<(ChunkId, u32)>,
    /// How many of `order`, from the start, are the startup profile's.
    pub profile_len: usize,
}

/// Every distinct chunk of the image: `first` ones first, then the rest in
/// path order (the order `ls -R` and most starts walk a tree).
pub fn prefetch_order(layout: &Layout, first: &[ChunkId]) -> PrefetchPlan {
    let chunks = layout.chunks();
    let mut seen = HashSet::new();
    let mut order = Vec::with_capacity(chunks.len());
    for id in first {
        if let Some(at) = layout.position(id) {
            if seen.insert(*id) {
                order.push((*id, chunks[at].len));
            }
        }
    }
    let profile_len = order.len();
    order.extend(
        chunks
            .iter()
            .filter(|c| !seen.contains(&c.id))
            .map(|c| (c.id, c.len)),
    );
    PrefetchPlan { order, profile_len }
}

pub struct Prefetcher {
    stop: Arc<AtomicBool>,
    _thread: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn start(fetcher: Arc<Fetcher>, plan: PrefetchPlan, config: PrefetchConfig) -> Prefetcher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || run(&fetcher, &plan, &config, &stopped))
            .map_err(|e| tracing::error!("prefetch did not start: {e}"))
            .ok();
        Prefetcher {
            stop,
            _thread: thread,
        }
    }

    /// Asks the thread to stop after the batch in flight, without waiting:
    /// against a dead server that batch may retry for the whole window.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub(crate) fn run(
    fetcher: &Fetcher,
    plan: &PrefetchPlan,
    config: &PrefetchConfig,
    stop: &AtomicBool,
) {
    let (order, profile_len) = (&plan.order, plan.profile_len);
    let stats = &fetcher.stats;
    stats
        .profile_chunks
        .store(profile_len as u64, Ordering::Relaxed);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut at = 0;
    // The chunk the last failed batches stopped at, and how many failed there.
    let mut stuck: Option<(usize, u32)> = None;
    let mut skipped = 0;
    let mut given_up = HashSet::new();
    let mut settled = profile_len == 0;
    let mut batch_bytes = config.batch_bytes;
    while at < order.len() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let in_profile = at < profile_len;
        if !in_profile && !settled {
            // The start reads what its profile named and then some; the
            // rest of the image waits until it has gone quiet, so it does
            // not compete with the start for the link.
            stats.profile_done.store(skipped == 0, Ordering::Relaxed);
            tracing::info!(
                "startup profile fetched in {:.0} ms",
                started.elapsed().as_secs_f64() * 1000.0
            );
            // Quiet since the profile arrived, too: with the profile on
            // this host already, the start may not have begun reading yet.
            // A container that reads on and on does not hold the rest back
            // for longer than SETTLE_AT_MOST.
            let profile_done = Instant::now();
            let busy = || stats.since_last_read().is_some_and(|quiet| quiet < SETTLE);
            while (busy() || profile_done.elapsed() < SETTLE)
                && profile_done.elapsed() < SETTLE_AT_MOST
                && !stop.load(Ordering::Relaxed)
            {
                std::thread::sleep(YIELD_POLL * 10);
            }
            settled = true;
            continue;
        }
        // A profile's chunks are what the reads are about to ask for: they
        // go at once, without yielding and without the rate cap.
        if !in_profile && fetcher.busy_with_reads() {
            std::thread::sleep(YIELD_POLL);
            continue;
        }
        if !in_profile && config.max_rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / config.max_rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
                continue;
            }
        }
        let (end, budget) = if in_profile {
            (profile_len, PROFILE_BATCH_BYTES)
        } else {
            (order.len(), batch_bytes)
        };
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        let mut next = at;
        while next < end && bytes < budget && batch.len() < MAX_IDS_PER_REQUEST {
            let (id, len) = order[next];
            next += 1;
            if !fetcher.is_local(&id) {
                batch.push(id);
                bytes += u64::from(len);
            }
        }
        let (asked, fetched_before) = (Instant::now(), prefetched_bytes(fetcher));
        match fetcher.prefetch(&batch) {
            Ok(_) => {
                sent += bytes;
                at = next;
                stuck = None;
                // Sized by what this batch brought itself: chunks a read
                // was getting, or another host, are not the source's speed.
                let fetched = prefetched_bytes(fetcher).saturating_sub(fetched_before);
                if !in_profile && fetched >= config.batch_bytes / 2 {
                    let mut rate = fetched as f64 / asked.elapsed().as_secs_f64().max(1e-6);
                    if config.max_rate > 0 {
                        rate = rate.min(config.max_rate as f64);
                    }
                    let wanted = (rate * config.batch_time.as_secs_f64()) as u64;
                    batch_bytes = wanted.min(batch_bytes.saturating_mul(BATCH_GROWTH)).clamp(
                        config.batch_bytes,
                        config.max_batch_bytes.max(config.batch_bytes),
                    );
                }
            }
            Err(e) => {
                batch_bytes = config.batch_bytes;
                // Chunks arrive in the order asked and are kept as they
                // arrive, so the first one still missing is where the batch
                // broke. A server that comes back gets past it; one that
                // cannot read it (a corrupt or missing chunk, or a stream it
                // cuts there every time) would stop the prefetch for good:
                // after GIVE_UP_AFTER failures there that chunk alone is
                // left to the reads, which ask for it again.
                let Some(culprit) = (at..next).find(|&i| !fetcher.is_local(&order[i].0)) else {
                    at = next;
                    stuck = None;
                    continue;
                };
                let failures = match stuck {
                    Some((position, failures)) if position == culprit => failures + 1,
                    _ => 1,
                };
                if failures >= GIVE_UP_AFTER {
                    tracing::error!("prefetch skips chunk {}: {e}", order[culprit].0);
                    skipped += 1;
                    given_up.insert(order[culprit].0);
                    at = culprit + 1;
                    stuck = None;
                    continue;
                }
                stuck = Some((culprit, failures));
                tracing::warn!("prefetch paused: {e}");
                let resume = Instant::now() + PAUSE_AFTER_FAILURE;
                while Instant::now() < resume && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(YIELD_POLL * 10);
                }
            }
        }
    }
    if !settled {
        // The profile was the whole image.
        stats.profile_done.store(skipped == 0, Ordering::Relaxed);
    }
    // What batches left out (another host sharing the cache was bringing
    // it) is here by now, or is fetched now, waited for if still claimed.
    let left: Vec<ChunkId> = order
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !fetcher.is_local(id) && !given_up.contains(id))
        .collect();
    for batch in left.chunks(LEFT_OUT_BATCH) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = fetcher.prefetch_all(batch) {
            tracing::warn!("prefetch could not get {} chunks: {e}", batch.len());
            skipped += batch.iter().filter(|id| !fetcher.is_local(id)).count();
        }
    }
    if skipped > 0 {
        tracing::warn!("prefetch finished without {skipped} chunks; reads will ask for them again");
        return;
    }
    fetcher.stats.prefetch_done.store(true, Ordering::Relaxed);
    tracing::info!(
        "prefetch finished in {:.1} s: every chunk of the image is on this host",
        started.elapsed().as_secs_f64()
    );
}

fn prefetched_bytes(fetcher: &Fetcher) -> u64 {
    fetcher.stats.prefetched_bytes.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use skiff_source::{ChunkSource, SourceError};

    use super::*;

    /// Delivers chunks in the order asked, but cuts every answer at `bad`
    /// (a chunk it cannot read), as the server does.
    struct CutsAt {
        bad: ChunkId,
        delivered: Mutex<HashMap<ChunkId, u32>>,
        asked_for_bad: Mutex<u32>,
    }

    impl ChunkSource for CutsAt {
        fn fetch(
            &self,
            ids: &[ChunkId],
            each: &mut dyn FnMut(ChunkId, skiff_source::Bytes),
        ) -> Result<(), SourceError> {
            for id in ids {
                if *id == self.bad {
                    *self.asked_for_bad.lock().unwrap() += 1;
                    return Err(SourceError::Unavailable("answer cut short".into()));
                }
                *self.delivered.lock().unwrap().entry(*id).or_default() += 1;
                each(*id, id.as_bytes().to_vec().into());
            }
            Ok(())
        }

        fn is_local(&self, id: &ChunkId) -> bool {
            self.delivered.lock().unwrap().contains_key(id)
        }

        fn local(&self, id: &ChunkId) -> Option<skiff_source::Bytes> {
            self.is_local(id).then(|| id.as_bytes().to_vec().into())
        }

        fn describe(&self) -> String {
            "a server that cannot read one chunk".into()
        }
    }

    /// A plan of `ids` (each `len` bytes) in that order, and a fetcher of
    /// them from `source` with 8 MiB of memory.
    fn plan_and_fetcher(
        ids: &[ChunkId],
        len: u32,
        source: Arc<dyn ChunkSource>,
    ) -> (PrefetchPlan, Fetcher) {
        let plan = PrefetchPlan {
            order: ids.iter().map(|id| (*id, len)).collect(),
            profile_len: 0,
        };
        let layout = Layout::new(
            plan.order
                .iter()
                .map(|&(id, len)| skiff_format::ChunkRef { id, len })
                .collect(),
        );
        let fetcher = Fetcher::new(
            source,
            8 << 20,
            crate::readahead::WindowLimits::fixed(1 << 20),
            Arc::new(layout),
        );
        (plan, fetcher)
    }

    /// Sends chunks of 1 KiB after a wait of `per_kib` for each, and
    /// remembers how many each request asked for.
    struct Paced {
        per_kib: Duration,
        requests: Mutex<Vec<usize>>,
        delivered: Mutex<HashSet<ChunkId>>,
    }

    impl ChunkSource for Paced {
        fn fetch(
            &self,
            ids: &[ChunkId],
            each: &mut dyn FnMut(ChunkId, skiff_source::Bytes),
        ) -> Result<(), SourceError> {
            self.requests.lock().unwrap().push(ids.len());
            std::thread::sleep(self.per_kib * ids.len() as u32);
            for id in ids {
                self.delivered.lock().unwrap().insert(*id);
                each(*id, vec![0; 1024].into());
            }
            Ok(())
        }

        fn is_local(&self, id: &ChunkId) -> bool {
            self.delivered.lock().unwrap().contains(id)
        }

        fn local(&self, id: &ChunkId) -> Option<skiff_source::Bytes> {
            self.is_local(id).then(|| vec![0; 1024].into())
        }

        fn describe(&self) -> String {
            "a source of a given speed".into()
        }
    }

    /// The chunks per request of a prefetch of `chunks` 1 KiB chunks in
    /// batches of 64 KiB to 1 MiB, each holding what came in `batch_time`,
    /// from a source that takes `per_kib`.
    fn batches(chunks: u32, per_kib: Duration, batch_time: Duration) -> Vec<usize> {
        let ids: Vec<ChunkId> = (0..chunks).map(|i| ChunkId::of(&i.to_le_bytes())).collect();
        let source = Arc::new(Paced {
            per_kib,
            requests: Mutex::default(),
            delivered: Mutex::default(),
        });
        let (plan, fetcher) = plan_and_fetcher(&ids, 1024, source.clone());
        let config = PrefetchConfig {
            batch_bytes: 64 << 10,
            batch_time,
            max_batch_bytes: 1 << 20,
            ..PrefetchConfig::default()
        };
        run(&fetcher, &plan, &config, &AtomicBool::new(false));
        assert_eq!(source.delivered.lock().unwrap().len(), chunks as usize);
        let requests = source.requests.lock().unwrap().clone();
        requests
    }

    #[test]
    fn batches_grow_on_a_fast_source_and_stay_small_on_a_slow_one() {
        // No wait (64 KiB well within 10 s): twice as many each time up to 1 MiB.
        assert_eq!(
            batches(3000, Duration::ZERO, Duration::from_secs(10)),
            vec![64, 128, 256, 512, 1024, 1016]
        );
        // 64 KiB take 192 ms, longer than a batch's 100 ms: the fewest each time.
        assert_eq!(
            batches(256, Duration::from_millis(3), Duration::from_millis(100)),
            vec![64; 4]
        );
    }

    #[test]
    fn a_chunk_the_server_cannot_send_is_skipped_after_bounded_tries() {
        let ids: Vec<ChunkId> = (0u8..10).map(|i| ChunkId::of(&[i])).collect();
        let source = Arc::new(CutsAt {
            bad: ids[3],
            delivered: Mutex::default(),
            asked_for_bad: Mutex::new(0),
        });
        let (plan, fetcher) = plan_and_fetcher(&ids, 32, source.clone());
        run(
            &fetcher,
            &plan,
            &PrefetchConfig::default(),
            &AtomicBool::new(false),
        );
        let delivered = source.delivered.lock().unwrap();
        // Every other chunk arrived, each once; the bad one was tried a bounded number of times.
        assert_eq!(delivered.len(), 9);
        assert!(delivered.values().all(|&n| n == 1), "{delivered:?}");
        assert_eq!(*source.asked_for_bad.lock().unwrap(), GIVE_UP_AFTER);
        assert!(!fetcher.stats.prefetch_done.load(Ordering::Relaxed));
    }
}
