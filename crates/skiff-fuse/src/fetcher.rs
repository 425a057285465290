//! Chunks for reads: from memory, from the host's cache, or fetched from
//! the source in one batch with their neighbours, each chunk once however
//! many readers want it at the same moment.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use skiff_format::{ChunkId, ChunkRef};
use skiff_source::{ChunkSource, SourceError};

use crate::stats::MountStats;

pub type ChunkBytes = Arc<[u8]>;

#[derive(Clone)]
struct ByLength;

impl Weighter<ChunkId, ChunkBytes> for ByLength {
    fn weight(&self, _id: &ChunkId, data: &ChunkBytes) -> u64 {
        data.len() as u64 + 64
    }
}

/// Why a flight came down without its chunk.
#[derive(Clone, Debug)]
struct Failure {
    message: String,
    /// The batch failed on one chunk (missing or corrupt), which may be
    /// another chunk than this flight's; otherwise the source failed as a whole.
    one_chunk: bool,
}

/// One chunk being fetched: whoever else needs it waits here.
#[derive(Default)]
struct Flight {
    outcome: Mutex<Option<Result<ChunkBytes, Failure>>>,
    landed: Condvar,
}

impl Flight {
    fn land(&self, outcome: Result<ChunkBytes, Failure>) {
        let mut slot = self.outcome.lock().expect("flight poisoned");
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.landed.notify_all();
    }

    fn wait(&self) -> Result<ChunkBytes, Failure> {
        let mut slot = self.outcome.lock().expect("flight poisoned");
        loop {
            if let Some(outcome) = slot.as_ref() {
                return outcome.clone();
            }
            slot = self.landed.wait(slot).expect("flight poisoned");
        }
    }
}

/// What [`Fetcher::claim`] found for a request.
#[derive(Default)]
struct Claim {
    /// Flights this thread leads.
    lead: Vec<(ChunkId, Arc<Flight>)>,
    /// Flights of needed chunks others lead.
    joined: Vec<(ChunkId, Arc<Flight>)>,
    /// Needed chunks that arrived meanwhile.
    ready: Vec<(ChunkId, ChunkBytes)>,
}

/// Lands a leader's flights that did not get data with its failure, and
/// takes them out of the table so later reads try again.
struct Landing<'a> {
    fetcher: &'a Fetcher,
    lead: &'a [(ChunkId, Arc<Flight>)],
    failure: Failure,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        for (_, flight) in self.lead {
            flight.land(Err(self.failure.clone()));
        }
        let mut flights = self
            .fetcher
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (id, flight) in self.lead {
            if flights.get(id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                flights.remove(id);
            }
        }
    }
}

/// Why a read could not be served.
#[derive(Debug)]
pub struct FetchFailed(pub String);

pub struct Fetcher {
    source: Arc<dyn ChunkSource>,
    memory: Cache<ChunkId, ChunkBytes, ByLength>,
    flights: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    /// Bytes of neighbouring chunks fetched along with a miss.
    window_bytes: u64,
    /// Reads waiting on the source right now; prefetch yields while any are.
    demand: AtomicUsize,
    pub stats: MountStats,
}

impl Fetcher {
    pub fn new(source: Arc<dyn ChunkSource>, memory_bytes: u64, window_bytes: u64) -> Fetcher {
        // quick_cache sizes its table by item count; 64 KiB is the average chunk.
        let items = (memory_bytes / 65536).max(16) as usize;
        Fetcher {
            source,
            memory: Cache::with_weighter(items, memory_bytes.max(1), ByLength),
            flights: Mutex::new(HashMap::new()),
            window_bytes,
            demand: AtomicUsize::new(0),
            stats: MountStats::default(),
        }
    }

    pub fn source(&self) -> &dyn ChunkSource {
        self.source.as_ref()
    }

    /// Whether reads are waiting on the source.
    pub fn busy_with_reads(&self) -> bool {
        self.demand.load(Ordering::Relaxed) > 0
    }

    /// Whether a chunk can be had without the network.
    pub fn is_local(&self, id: &ChunkId) -> bool {
        self.memory.contains_key(id) || self.source.is_local(id)
    }

    /// A chunk from memory or from the host's cache, without the network.
    pub fn cached(&self, id: &ChunkId) -> Option<ChunkBytes> {
        if let Some(data) = self.memory.get(id) {
            MountStats::add(&self.stats.memory_hits, 1);
            return Some(data);
        }
        let data: ChunkBytes = self.source.local(id)?.into();
        MountStats::add(&self.stats.disk_hits, 1);
        self.memory.insert(*id, data.clone());
        Some(data)
    }

    /// Every chunk of `wanted`, in order, if all are at hand without the network.
    pub fn all_cached(&self, wanted: &[ChunkRef]) -> Option<Vec<ChunkBytes>> {
        wanted
            .iter()
            .map(|c| {
                self.cached(&c.id)
                    .filter(|data| data.len() == c.len as usize)
            })
            .collect()
    }

    /// Every chunk of `wanted`, in order, fetching what is not at hand in one
    /// batch together with the chunks of `after` (the rest of the file) up to
    /// the read window. Blocks on the network: never call it from a FUSE worker.
    pub fn get(
        &self,
        wanted: &[ChunkRef],
        after: &[ChunkRef],
    ) -> Result<Vec<ChunkBytes>, FetchFailed> {
        self.demand.fetch_add(1, Ordering::Relaxed);
        let result = self.get_inner(wanted, after);
        self.demand.fetch_sub(1, Ordering::Relaxed);
        result
    }

    fn get_inner(
        &self,
        wanted: &[ChunkRef],
        after: &[ChunkRef],
    ) -> Result<Vec<ChunkBytes>, FetchFailed> {
        let mut have: HashMap<ChunkId, ChunkBytes> = HashMap::new();
        let mut missing = Vec::new();
        for chunk in wanted {
            match self.cached(&chunk.id) {
                Some(data) => {
                    have.insert(chunk.id, data);
                }
                None => missing.push(chunk.id),
            }
        }
        if !missing.is_empty() {
            let budget = self
                .window_bytes
                .saturating_sub(wanted.iter().map(|c| u64::from(c.len)).sum::<u64>());
            let extra = self.neighbours(after, budget);
            let claimed = self.claim(&missing, &extra);
            have.extend(claimed.ready);
            // The read's own chunks lead the batch, so a neighbour that fails
            // (corrupt, missing) cannot fail the read; a failure shows in the
            // flights of the chunks it concerns.
            let _ = self.fly(&claimed.lead, false);
            for (id, flight) in &claimed.lead {
                if missing.contains(id) {
                    have.insert(*id, flight.wait().map_err(|f| FetchFailed(f.message))?);
                }
            }
            let mut retry = Vec::new();
            for (id, flight) in &claimed.joined {
                match flight.wait() {
                    Ok(data) => {
                        have.insert(*id, data);
                    }
                    // A batch led by another reader (or by prefetch) can fail
                    // on a chunk this read does not need: ask again for ours.
                    Err(f) if f.one_chunk => retry.push(*id),
                    Err(f) => return Err(FetchFailed(f.message)),
                }
            }
            if !retry.is_empty() {
                let again = self.claim(&retry, &[]);
                have.extend(again.ready);
                let _ = self.fly(&again.lead, false);
                for (id, flight) in again.lead.iter().chain(again.joined.iter()) {
                    have.insert(*id, flight.wait().map_err(|f| FetchFailed(f.message))?);
                }
            }
        }
        wanted
            .iter()
            .map(|c| match have.get(&c.id) {
                // The bytes match the id; an index that disagrees on their
                // length would shift every byte after them.
                Some(data) if data.len() == c.len as usize => Ok(data.clone()),
                Some(data) => Err(FetchFailed(format!(
                    "chunk {} holds {} bytes, the index says {}",
                    c.id,
                    data.len(),
                    c.len
                ))),
                None => Err(FetchFailed(format!("chunk {} went missing", c.id))),
            })
            .collect()
    }

    /// Chunks of `after` worth bringing along: up to `budget` bytes, in file
    /// order, skipping what is already here.
    fn neighbours(&self, after: &[ChunkRef], budget: u64) -> Vec<ChunkId> {
        let mut extra = Vec::new();
        let mut taken = 0u64;
        for chunk in after {
            if taken >= budget {
                break;
            }
            taken += u64::from(chunk.len);
            if !self.is_local(&chunk.id) {
                extra.push(chunk.id);
            }
        }
        extra
    }

    /// Takes the lead on every id of `needed` and `extra` nobody is fetching
    /// yet, and joins the flights of `needed` ids somebody already is. A
    /// needed chunk whose flight landed since the caller looked is ready.
    fn claim(&self, needed: &[ChunkId], extra: &[ChunkId]) -> Claim {
        let mut flights = self.flights.lock().expect("flight table poisoned");
        let mut seen = HashSet::new();
        let mut claim = Claim::default();
        for (id, is_needed) in needed
            .iter()
            .map(|id| (id, true))
            .chain(extra.iter().map(|id| (id, false)))
        {
            if !seen.insert(*id) {
                continue;
            }
            match flights.get(id) {
                Some(flight) if is_needed => claim.joined.push((*id, flight.clone())),
                Some(_) => {}
                None => {
                    // A flight puts its chunk in memory before it leaves the
                    // table: one that landed since the caller looked is here.
                    if let Some(data) = self.memory.get(id) {
                        if is_needed {
                            claim.ready.push((*id, data));
                        }
                        continue;
                    }
                    let flight = Arc::new(Flight::default());
                    flights.insert(*id, flight.clone());
                    claim.lead.push((*id, flight));
                }
            }
        }
        claim
    }

    /// Fetches the chunks this thread leads in one request and lands every
    /// one of their flights, with data or with the error. Leaders never wait
    /// on other flights before landing their own, so no two readers can
    /// wait on each other.
    fn fly(&self, lead: &[(ChunkId, Arc<Flight>)], prefetch: bool) -> Result<(), SourceError> {
        if lead.is_empty() {
            return Ok(());
        }
        let ids: Vec<ChunkId> = lead.iter().map(|(id, _)| *id).collect();
        let by_id: HashMap<ChunkId, &Arc<Flight>> = lead.iter().map(|(id, f)| (*id, f)).collect();
        // Lands every flight and clears the table however this ends, a panic included.
        let mut landing = Landing {
            fetcher: self,
            lead,
            failure: Failure {
                message: "the fetch was abandoned".to_owned(),
                one_chunk: false,
            },
        };
        MountStats::add(&self.stats.fetch_requests, 1);
        let outcome = self.source.fetch(&ids, &mut |id, data| {
            let len = data.len() as u64;
            let data: ChunkBytes = data.into();
            self.memory.insert(id, data.clone());
            MountStats::add(&self.stats.fetched_chunks, 1);
            MountStats::add(&self.stats.fetched_bytes, len);
            if prefetch {
                MountStats::add(&self.stats.prefetched_chunks, 1);
                MountStats::add(&self.stats.prefetched_bytes, len);
            }
            if let Some(flight) = by_id.get(&id) {
                flight.land(Ok(data));
            }
        });
        let failure = match &outcome {
            Ok(()) => Failure {
                message: "the source did not send it".to_owned(),
                one_chunk: true,
            },
            Err(e) => {
                if matches!(e, SourceError::Corrupt(_)) {
                    MountStats::add(&self.stats.corrupt_chunks, 1);
                    tracing::error!("{e}");
                } else {
                    tracing::warn!("fetching {} chunks: {e}", ids.len());
                }
                Failure {
                    message: e.to_string(),
                    one_chunk: matches!(e, SourceError::Corrupt(_) | SourceError::Missing(_)),
                }
            }
        };
        landing.failure = failure;
        outcome
    }

    /// Fetches whichever of `ids` are neither here nor on their way, in one
    /// request, for prefetch. Returns how many it asked for.
    pub fn prefetch(&self, ids: &[ChunkId]) -> Result<usize, SourceError> {
        // The prefetch loop skipped what is local; what arrived since is in flight or in memory.
        let claimed = self.claim(&[], ids);
        self.fly(&claimed.lead, true)?;
        Ok(claimed.lead.len())
    }
}
