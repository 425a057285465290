//! Chunks for reads: from memory, from the host's cache, or fetched from
//! the source in one batch with their neighbours in path order (see
//! readahead.rs), each chunk once however many readers want it at the
//! same moment.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use quick_cache::sync::Cache;
use quick_cache::Weighter;
use skiff_format::{ChunkId, ChunkRef, InodeNo};
use skiff_source::{ChunkSource, SourceError};

use crate::readahead::{Layout, Streams, Window, WindowLimits};
use crate::stats::MountStats;

/// A chunk in memory, shared without copies (a `Vec` from the source becomes one as it is).
pub type ChunkBytes = skiff_source::Bytes;

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
    /// The batch went well without this chunk: it was left out (see
    /// [`ChunkSource::fetch_wanting`]).
    left_out: bool,
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
    /// Flights this thread leads: first those of needed chunks, then the rest.
    lead: Vec<(ChunkId, Arc<Flight>)>,
    /// How many of `lead` are needed.
    lead_needed: usize,
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

/// A stream's next window, claimed and to be fetched off the reading
/// thread. Dropped unfetched, it gives its flights up, so no reader waits
/// on them.
pub struct ReadAhead<'a> {
    fetcher: &'a Fetcher,
    lead: Vec<(ChunkId, Arc<Flight>)>,
}

impl ReadAhead<'_> {
    /// Fetches the window; blocks on the network.
    pub fn fetch(mut self) {
        MountStats::add(&self.fetcher.stats.read_aheads, 1);
        let lead = std::mem::take(&mut self.lead);
        let _ = self.fetcher.fly(&lead, 0, false);
    }
}

impl Drop for ReadAhead<'_> {
    fn drop(&mut self) {
        if !self.lead.is_empty() {
            drop(Landing {
                fetcher: self.fetcher,
                lead: &self.lead,
                failure: Failure {
                    message: "the read-ahead was dropped".to_owned(),
                    one_chunk: false,
                    left_out: false,
                },
            });
        }
    }
}

/// Positions a window scan looks at beyond what it takes, at most: a scan
/// through a region already here stops (under the streams' lock) soon.
const SCAN_AT_MOST: usize = 4096;

pub struct Fetcher {
    source: Arc<dyn ChunkSource>,
    memory: Cache<ChunkId, ChunkBytes, ByLength>,
    flights: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    /// The image's chunks in path order, along which windows run.
    layout: Arc<Layout>,
    /// Each stream of reads and its window.
    streams: Streams,
    /// Reads waiting on the source right now; prefetch yields while any are.
    demand: AtomicUsize,
    pub stats: MountStats,
}

impl Fetcher {
    pub fn new(
        source: Arc<dyn ChunkSource>,
        memory_bytes: u64,
        window: WindowLimits,
        layout: Arc<Layout>,
    ) -> Fetcher {
        // quick_cache sizes its table by item count; 64 KiB is the average chunk.
        let items = (memory_bytes / 65536).max(16) as usize;
        Fetcher {
            source,
            memory: Cache::with_weighter(items, memory_bytes.max(1), ByLength),
            flights: Mutex::new(HashMap::new()),
            layout,
            streams: Streams::new(window),
            demand: AtomicUsize::new(0),
            stats: MountStats::default(),
        }
    }

    /// See [`Streams::keep_first_windows_in_file`].
    pub fn keep_first_windows_in_file(&mut self) {
        self.streams.keep_first_windows_in_file();
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
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
        let data = self.source.local(id)?;
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

    /// Every chunk of `wanted` (a read of file `ino`, from its first chunk
    /// if `at_head`), in order, fetching what is not at hand in one batch
    /// together with its neighbours in path order, up to the window of the
    /// stream of reads it belongs to. Blocks on the network: never call it
    /// from a FUSE worker.
    pub fn get(
        &self,
        ino: InodeNo,
        at_head: bool,
        wanted: &[ChunkRef],
    ) -> Result<Vec<ChunkBytes>, FetchFailed> {
        self.demand.fetch_add(1, Ordering::Relaxed);
        let result = self.get_inner(ino, at_head, wanted);
        self.demand.fetch_sub(1, Ordering::Relaxed);
        result
    }

    fn get_inner(
        &self,
        ino: InodeNo,
        at_head: bool,
        wanted: &[ChunkRef],
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
            let extra = self.window_for(ino, at_head, &missing, wanted);
            let claimed = self.claim(&missing, &extra);
            have.extend(claimed.ready);
            // The read's own chunks lead the batch, so a neighbour that fails
            // (corrupt, missing) cannot fail the read; a failure shows in the
            // flights of the chunks it concerns.
            let _ = self.fly(&claimed.lead, claimed.lead_needed, false);
            for (id, flight) in &claimed.lead {
                if missing.contains(id) {
                    have.insert(*id, flight.wait().map_err(|f| FetchFailed(f.message))?);
                }
            }
            let mut retry = Vec::new();
            let mut left_out = Vec::new();
            for (id, flight) in &claimed.joined {
                match flight.wait() {
                    Ok(data) => {
                        have.insert(*id, data);
                    }
                    // Left out of a batch that did not need it (another host
                    // on a shared cache is bringing it): this read asks itself.
                    Err(f) if f.left_out => left_out.push(*id),
                    // A batch led by another reader (or by prefetch) can fail
                    // on a chunk this read does not need: ask again for ours.
                    Err(f) if f.one_chunk => retry.push(*id),
                    Err(f) => return Err(FetchFailed(f.message)),
                }
            }
            if !retry.is_empty() {
                let again = self.claim(&retry, &[]);
                have.extend(again.ready);
                let _ = self.fly(&again.lead, again.lead_needed, false);
                for (id, flight) in &again.lead {
                    have.insert(*id, flight.wait().map_err(|f| FetchFailed(f.message))?);
                }
                for (id, flight) in &again.joined {
                    match flight.wait() {
                        Ok(data) => {
                            have.insert(*id, data);
                        }
                        Err(f) if f.left_out => left_out.push(*id),
                        Err(f) => return Err(FetchFailed(f.message)),
                    }
                }
            }
            if !left_out.is_empty() {
                self.fetch_for_one_read(&left_out, &mut have)?;
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

    /// The neighbours a miss of `missing` (chunks of the read `wanted` of
    /// file `ino`) brings along: what follows the read in path order, up to
    /// its stream's window less the read's own bytes.
    fn window_for(
        &self,
        ino: InodeNo,
        at_head: bool,
        missing: &[ChunkId],
        wanted: &[ChunkRef],
    ) -> Vec<ChunkId> {
        let positions = || missing.iter().filter_map(|id| self.layout.position(id));
        let (Some(first), Some(last)) = (positions().min(), positions().max()) else {
            return Vec::new();
        };
        let own: u64 = wanted.iter().map(|c| u64::from(c.len)).sum();
        self.streams.miss(first, ino, at_head, |window| {
            let window = Window {
                bytes: window.bytes.saturating_sub(own),
                ..window
            };
            self.neighbours(last + 1, window, ino)
        })
    }

    /// The chunks from layout position `from` on that are not here, up to
    /// the window's bytes of them (and not past the end of file `ino` unless
    /// the window runs across files), and the position after the last one
    /// looked at.
    fn neighbours(&self, from: usize, window: Window, ino: InodeNo) -> (usize, Vec<ChunkId>) {
        let mut extra = Vec::new();
        let mut taken = 0u64;
        let mut at = from;
        let chunks = self.layout.chunks();
        let end = if window.across_files {
            chunks.len()
        } else {
            self.layout.file_end(ino).min(chunks.len())
        };
        while taken < window.bytes && at < end && at - from < SCAN_AT_MOST + extra.len() {
            let chunk = &chunks[at];
            at += 1;
            if !self.is_local(&chunk.id) {
                taken += u64::from(chunk.len);
                extra.push(chunk.id);
            }
        }
        (at, extra)
    }

    /// Notes that a read of file `ino` reached `id`, and says whether that
    /// fetches a stream's next window (cheap: for the FUSE thread, which
    /// hands [`Fetcher::read_ahead`] on).
    pub fn read_ahead_due(&self, ino: InodeNo, id: &ChunkId) -> bool {
        self.layout
            .position(id)
            .is_some_and(|at| self.streams.due(at, ino))
    }

    /// A read of file `ino` reached `id`: if that is past the middle of its
    /// stream's last fetch, the stream's next window, claimed, for the
    /// caller to fetch off the reading thread.
    pub fn read_ahead(&self, ino: InodeNo, id: &ChunkId) -> Option<ReadAhead<'_>> {
        let at = self.layout.position(id)?;
        let extra = self
            .streams
            .reached(at, ino, |from, window| self.neighbours(from, window, ino))?;
        let claimed = self.claim(&[], &extra);
        (!claimed.lead.is_empty()).then_some(ReadAhead {
            fetcher: self,
            lead: claimed.lead,
        })
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
                    claim.lead_needed += usize::from(is_needed);
                }
            }
        }
        claim
    }

    /// Fetches the chunks this thread leads in one request and lands every
    /// one of their flights, with data or with the error. Leaders never wait
    /// on other flights before landing their own, so no two readers can
    /// wait on each other. Only the first `needed` must come (see
    /// [`ChunkSource::fetch_wanting`]); a flight of the others the source
    /// left out comes down, and a read that joined it asks again.
    fn fly(
        &self,
        lead: &[(ChunkId, Arc<Flight>)],
        needed: usize,
        prefetch: bool,
    ) -> Result<(), SourceError> {
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
                left_out: false,
            },
        };
        MountStats::add(&self.stats.fetch_requests, 1);
        let outcome = self.source.fetch_wanting(&ids, needed, &mut |id, data| {
            let data = self.arrived(id, &data, prefetch);
            if let Some(flight) = by_id.get(&id) {
                flight.land(Ok(data));
            }
        });
        let failure = match &outcome {
            Ok(()) => Failure {
                message: "the source did not send it".to_owned(),
                one_chunk: true,
                left_out: true,
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
                    left_out: false,
                }
            }
        };
        landing.failure = failure;
        outcome
    }

    /// Fetches `ids` for one read, outside the flight table: chunks another
    /// thread's batch left out, which the source must now bring (or wait
    /// for, on a shared cache), however many other batches leave them out.
    fn fetch_for_one_read(
        &self,
        ids: &[ChunkId],
        have: &mut HashMap<ChunkId, ChunkBytes>,
    ) -> Result<(), FetchFailed> {
        let mut wanted = Vec::new();
        for id in ids {
            match self.cached(id) {
                Some(data) => {
                    have.insert(*id, data);
                }
                None => wanted.push(*id),
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        MountStats::add(&self.stats.fetch_requests, 1);
        self.source
            .fetch_wanting(&wanted, wanted.len(), &mut |id, data| {
                have.insert(id, self.arrived(id, &data, false));
            })
            .map_err(|e| FetchFailed(e.to_string()))
    }

    /// Keeps a chunk that came from the source in memory and counts it.
    fn arrived(&self, id: ChunkId, data: &ChunkBytes, prefetch: bool) -> ChunkBytes {
        let len = data.len() as u64;
        // A copy of its own: a slice would keep its whole frame alive
        // after the frame's other chunks left, past the memory bound.
        let data = ChunkBytes::copy_from_slice(data);
        self.memory.insert(id, data.clone());
        MountStats::add(&self.stats.fetched_chunks, 1);
        MountStats::add(&self.stats.fetched_bytes, len);
        if prefetch {
            MountStats::add(&self.stats.prefetched_chunks, 1);
            MountStats::add(&self.stats.prefetched_bytes, len);
        }
        data
    }

    /// As [`Fetcher::prefetch`], and every chunk must come: none is left to
    /// another host sharing the cache (one it claimed is waited for).
    pub fn prefetch_all(&self, ids: &[ChunkId]) -> Result<usize, SourceError> {
        self.prefetch_wanting(ids, true)
    }

    /// Fetches whichever of `ids` are neither here nor on their way, in one
    /// request, for prefetch. Returns how many it asked for.
    pub fn prefetch(&self, ids: &[ChunkId]) -> Result<usize, SourceError> {
        self.prefetch_wanting(ids, false)
    }

    fn prefetch_wanting(&self, ids: &[ChunkId], all: bool) -> Result<usize, SourceError> {
        // The prefetch loop skipped what is local; what arrived since is in flight or in memory.
        let claimed = self.claim(&[], ids);
        let needed = if all { claimed.lead.len() } else { 0 };
        self.fly(&claimed.lead, needed, true)?;
        Ok(claimed.lead.len())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use crate::prefetch::{self, PrefetchConfig};

    /// Sends what it is asked for after a short wait (a round trip), and
    /// counts every chunk it sends and every request.
    #[derive(Default)]
    struct Counting {
        sent: Mutex<HashMap<ChunkId, u32>>,
        requests: AtomicUsize,
    }

    impl ChunkSource for Counting {
        fn fetch(
            &self,
            ids: &[ChunkId],
            each: &mut dyn FnMut(ChunkId, ChunkBytes),
        ) -> Result<(), SourceError> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            for id in ids {
                *self.sent.lock().unwrap().entry(*id).or_default() += 1;
                each(*id, bytes_of(id).into());
            }
            Ok(())
        }

        fn describe(&self) -> String {
            "a counting source".into()
        }
    }

    /// A source that leaves out half the chunks a batch does not need, as
    /// one on a cache shared with other hosts leaves out those they bring.
    #[derive(Default)]
    struct LeavesOut(Counting, AtomicUsize);

    impl ChunkSource for LeavesOut {
        fn fetch(
            &self,
            ids: &[ChunkId],
            each: &mut dyn FnMut(ChunkId, ChunkBytes),
        ) -> Result<(), SourceError> {
            self.0.fetch(ids, each)
        }

        fn fetch_wanting(
            &self,
            ids: &[ChunkId],
            needed: usize,
            each: &mut dyn FnMut(ChunkId, ChunkBytes),
        ) -> Result<(), SourceError> {
            let (must, may) = ids.split_at(needed);
            let sent: Vec<ChunkId> = must
                .iter()
                .chain(may.iter().filter(|id| id.as_bytes()[0] % 2 == 0))
                .copied()
                .collect();
            self.1.fetch_add(ids.len() - sent.len(), Ordering::SeqCst);
            self.0.fetch(&sent, each)
        }

        fn describe(&self) -> String {
            "a source that leaves chunks out".into()
        }
    }

    const CHUNK_LEN: u32 = 2048;

    fn bytes_of(id: &ChunkId) -> Vec<u8> {
        id.as_bytes().repeat(CHUNK_LEN as usize / 32)
    }

    /// `files` files of `per_file` chunks each, every chunk distinct, in path order.
    fn image(files: usize, per_file: usize) -> Vec<Vec<ChunkRef>> {
        (0..files)
            .map(|f| {
                (0..per_file)
                    .map(|c| ChunkRef {
                        id: ChunkId::of(format!("{f}/{c}").as_bytes()),
                        len: CHUNK_LEN,
                    })
                    .collect()
            })
            .collect()
    }

    /// Prefetch of the whole image in batches of 32 KiB, on a thread.
    fn prefetch_in_background(fetcher: &Arc<Fetcher>) -> std::thread::JoinHandle<()> {
        let fetcher = fetcher.clone();
        let plan = prefetch::prefetch_order(fetcher.layout(), &[]);
        std::thread::spawn(move || {
            let config = PrefetchConfig {
                batch_bytes: 32 << 10,
                max_batch_bytes: 32 << 10,
                ..PrefetchConfig::default()
            };
            prefetch::run(&fetcher, &plan, &config, &AtomicBool::new(false));
        })
    }

    fn fetcher(
        files: &[Vec<ChunkRef>],
        source: Arc<impl ChunkSource + 'static>,
        window: WindowLimits,
    ) -> Fetcher {
        let layout = Layout::new(files.concat());
        Fetcher::new(source, 64 << 20, window, Arc::new(layout))
    }

    /// What the FUSE read path does for a read of file `ino`: fetch ahead
    /// when due, then get the chunks.
    fn read(fetcher: &Arc<Fetcher>, ino: InodeNo, chunks: &[ChunkRef]) {
        for chunk in chunks {
            if fetcher.read_ahead_due(ino, &chunk.id) {
                let fetcher = fetcher.clone();
                let id = chunk.id;
                std::thread::spawn(move || {
                    if let Some(ahead) = fetcher.read_ahead(ino, &id) {
                        ahead.fetch();
                    }
                });
            }
            let got = fetcher.get(ino, true, std::slice::from_ref(chunk)).unwrap();
            assert_eq!(&got[0][..], &bytes_of(&chunk.id)[..]);
        }
    }

    #[test]
    fn a_walk_of_many_small_files_takes_few_requests() {
        let files = image(2000, 1);
        let source = Arc::new(Counting::default());
        let limits = WindowLimits {
            min: 256 << 10,
            max: 16 << 20,
        };
        let fetcher = Arc::new(fetcher(&files, source.clone(), limits));
        for (n, file) in files.iter().enumerate() {
            read(&fetcher, n as InodeNo + 2, file);
        }
        // 4 MB of 2 KiB files: windows of 256 KiB, 512 KiB, 1 MiB, 2 MiB
        // and the rest, not a request per file.
        let requests = source.requests.load(Ordering::SeqCst);
        assert!(requests <= 8, "{requests} requests for 2000 files");
        let sent = source.sent.lock().unwrap();
        assert_eq!(sent.len(), 2000);
        assert!(sent.values().all(|&n| n == 1), "a chunk was sent twice");
    }

    #[test]
    fn reads_get_the_chunks_that_read_ahead_and_prefetch_batches_left_out() {
        let files = image(300, 4);
        let source = Arc::new(LeavesOut::default());
        let limits = WindowLimits {
            min: 8 << 10,
            max: 64 << 10,
        };
        let fetcher = Arc::new(fetcher(&files, source.clone(), limits));
        let prefetching = prefetch_in_background(&fetcher);
        // Two readers a file apart, each joining the other's batches.
        let readers: Vec<_> = [0usize, 1]
            .into_iter()
            .map(|from| {
                let (fetcher, files) = (fetcher.clone(), files.clone());
                std::thread::spawn(move || {
                    for n in (from..files.len()).step_by(2) {
                        read(&fetcher, n as InodeNo + 2, &files[n]);
                    }
                })
            })
            .collect();
        for reader in readers {
            reader.join().unwrap();
        }
        prefetching.join().unwrap();
        // Every read got its bytes (`read` checks them), though batches left
        // out hundreds of chunks, and each chunk was sent.
        assert!(source.1.load(Ordering::SeqCst) > 100);
        assert_eq!(source.0.sent.lock().unwrap().len(), 1200);
    }

    #[test]
    fn a_read_ahead_dropped_unfetched_leaves_no_reader_waiting() {
        let files = image(64, 1);
        let source = Arc::new(Counting::default());
        let fetcher = Arc::new(fetcher(
            &files,
            source.clone(),
            WindowLimits::fixed(8 << 10),
        ));
        // The miss at file 0 fetches files 0..4; a read at 2 is due to fetch 4..8.
        fetcher.get(2, true, &files[0]).unwrap();
        assert!(fetcher.read_ahead_due(4, &files[2][0].id));
        let ahead = fetcher.read_ahead(4, &files[2][0].id).unwrap();
        drop(ahead);
        // File 5 was claimed by the read-ahead: a read of it fetches it now.
        let got = fetcher.get(7, true, &files[5]).unwrap();
        assert_eq!(&got[0][..], &bytes_of(&files[5][0].id)[..]);
        assert!(fetcher.flights.lock().unwrap().is_empty());
    }

    #[test]
    fn two_readers_and_prefetch_never_fetch_a_chunk_twice() {
        let files = image(300, 4);
        let source = Arc::new(Counting::default());
        let limits = WindowLimits {
            min: 8 << 10,
            max: 64 << 10,
        };
        let fetcher = Arc::new(fetcher(&files, source.clone(), limits));
        let prefetching = prefetch_in_background(&fetcher);
        let readers: Vec<_> = [0usize, 150]
            .into_iter()
            .map(|from| {
                let (fetcher, files) = (fetcher.clone(), files.clone());
                std::thread::spawn(move || {
                    for n in (0..files.len()).map(|n| (n + from) % files.len()) {
                        read(&fetcher, n as InodeNo + 2, &files[n]);
                    }
                })
            })
            .collect();
        for reader in readers {
            reader.join().unwrap();
        }
        prefetching.join().unwrap();
        // Read-aheads still in flight land before their chunks count as sent.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !fetcher.flights.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let sent = source.sent.lock().unwrap();
        assert_eq!(sent.len(), 1200);
        let twice: Vec<_> = sent.iter().filter(|(_, &n)| n > 1).collect();
        assert!(twice.is_empty(), "sent more than once: {twice:?}");
        assert!(source.requests.load(Ordering::SeqCst) > 2);
    }
}
