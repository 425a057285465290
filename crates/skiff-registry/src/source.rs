//! A skiff image in a registry as a [`ChunkSource`]: chunks come from
//! ranged reads of the pack blobs, a frame at a time.
//!
//! A fetch looks its chunks up in the chunk table, takes the frames that
//! hold them in blob order, coalesces neighbours into requests of one
//! closed range each (up to [`RangePlan::max_request_bytes`]), and sends
//! those on several connections at once. Every frame is decompressed with
//! its stated length as the bound and every chunk checked against its
//! BLAKE3 id before it is handed on.
//!
//! A registry or proxy that answers a ranged GET with 200 and the whole
//! blob gets its blob read once, to a local file checked against the
//! blob's sha256, and every later read of that blob is served from there.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use skiff_chunk::{decompress_frame, verify_chunk};
use skiff_format::artifact::ChunkTable;
use skiff_format::ChunkId;
use skiff_source::{Backoff, ChunkSource, SourceError, SourceTraffic};

use crate::client::{RangeAnswer, Registry};
use crate::digest::Sha256Writer;
use crate::image::{Descriptor, RemoteImage};
use crate::RegistryError;

/// How a fetch turns frames into requests.
#[derive(Clone, Debug)]
pub struct RangePlan {
    /// Neighbouring frames share a request up to this many bytes.
    pub max_request_bytes: u64,
    /// Frames this close (bytes of unneeded frames between them) still share a request.
    pub max_gap_bytes: u64,
    /// Requests in flight at once, each on its own connection.
    pub connections: usize,
    /// One attempt of a request; a stalled registry costs a retry, not the window.
    pub attempt_timeout: Duration,
    /// How long a failing request is retried before the read fails.
    pub retry_window: Duration,
}

impl Default for RangePlan {
    fn default() -> Self {
        RangePlan {
            max_request_bytes: 8 << 20,
            max_gap_bytes: 256 << 10,
            connections: 4,
            attempt_timeout: Duration::from_secs(10),
            retry_window: Duration::from_secs(30),
        }
    }
}

/// Consecutive frames of one blob fetched with one ranged GET.
#[derive(Debug, PartialEq, Eq)]
struct RangeRequest {
    blob: u32,
    start: u64,
    end: u64,
    /// Positions in the chunk table's frames.
    frames: Vec<u32>,
}

/// Groups `frames` (positions in `table.frames`, ascending, so in blob order) into requests.
fn plan_requests(table: &ChunkTable, frames: &[u32], plan: &RangePlan) -> Vec<RangeRequest> {
    let mut requests: Vec<RangeRequest> = Vec::new();
    for &at in frames {
        let frame = &table.frames[at as usize];
        let (start, end) = (frame.offset, frame.offset + u64::from(frame.len));
        match requests.last_mut() {
            Some(last)
                if last.blob == frame.blob
                    && start >= last.end
                    && start - last.end <= plan.max_gap_bytes
                    && end - last.start <= plan.max_request_bytes =>
            {
                last.end = end;
                last.frames.push(at);
            }
            _ => requests.push(RangeRequest {
                blob: frame.blob,
                start,
                end,
                frames: vec![at],
            }),
        }
    }
    requests
}

type WholeBlob = Arc<OnceLock<Result<Arc<File>, String>>>;

/// Decompressed frames by position, weighed by their bytes.
#[derive(Clone)]
struct ByLength;

impl quick_cache::Weighter<u32, Bytes> for ByLength {
    fn weight(&self, _frame: &u32, raw: &Bytes) -> u64 {
        raw.len() as u64 + 64
    }
}

/// Frames just decompressed stay this long (in bytes): a frame holds the
/// chunks of several files, which reads and prefetch ask for one file at a
/// time, so without it each would fetch the frame again.
const RECENT_FRAME_BYTES: u64 = 64 << 20;

/// A frame one fetch is getting, which others that need it wait for
/// instead of asking the registry for it again.
#[derive(Default)]
struct FrameFlight {
    landed: Mutex<bool>,
    cv: Condvar,
}

impl FrameFlight {
    fn land(&self) {
        *self.landed.lock().expect("frame flight poisoned") = true;
        self.cv.notify_all();
    }

    /// Waits until it landed (in `recent`, or failed), at most `limit`.
    fn wait(&self, limit: Duration) {
        let landed = self.landed.lock().expect("frame flight poisoned");
        let _ = self
            .cv
            .wait_timeout_while(landed, limit, |landed| !*landed)
            .expect("frame flight poisoned");
    }
}

/// The frames a fetch leads: landed and let go however it ends.
struct FrameFlights<'a> {
    source: &'a RegistrySource,
    frames: Vec<u32>,
}

impl Drop for FrameFlights<'_> {
    fn drop(&mut self) {
        let mut flights = self
            .source
            .in_flight
            .lock()
            .expect("frame flights poisoned");
        for at in &self.frames {
            if let Some(flight) = flights.remove(at) {
                flight.land();
            }
        }
    }
}

pub struct RegistrySource {
    registry: Arc<Registry>,
    packs: Vec<Descriptor>,
    table: ChunkTable,
    plan: RangePlan,
    /// Blobs read whole because the registry ignored `Range`, by position.
    whole: Mutex<HashMap<u32, WholeBlob>>,
    spool_dir: PathBuf,
    said_ranges_ignored: AtomicBool,
    recent: quick_cache::sync::Cache<u32, Bytes, ByLength>,
    /// Frames being fetched right now: a read window and a read-ahead that
    /// share a frame at their edge fetch it once.
    in_flight: Mutex<HashMap<u32, Arc<FrameFlight>>>,
}

fn corrupt(e: impl std::fmt::Display) -> SourceError {
    SourceError::Corrupt(e.to_string())
}

fn to_source_error(e: RegistryError) -> SourceError {
    match e {
        RegistryError::DigestMismatch { .. } | RegistryError::Chunk(_) => corrupt(e),
        other => SourceError::Unavailable(other.to_string()),
    }
}

impl RegistrySource {
    /// Chunks of `image` from `registry`; blobs read whole land in `spool_dir`.
    pub fn new(
        registry: Arc<Registry>,
        image: &RemoteImage,
        plan: RangePlan,
        spool_dir: PathBuf,
    ) -> RegistrySource {
        RegistrySource {
            registry,
            packs: image.oci.packs().to_vec(),
            table: image.table.clone(),
            plan,
            whole: Mutex::new(HashMap::new()),
            spool_dir,
            said_ranges_ignored: AtomicBool::new(false),
            recent: quick_cache::sync::Cache::with_weighter(
                (RECENT_FRAME_BYTES >> 20) as usize,
                RECENT_FRAME_BYTES,
                ByLength,
            ),
            in_flight: Mutex::default(),
        }
    }

    /// The chunks of `wanted` out of a decompressed frame, each checked
    /// against its id. Slices of the frame when they are most of it; copies
    /// when they are a small part, so a cached chunk does not keep a whole
    /// frame alive.
    fn chunks_of(
        raw: &Bytes,
        wanted: &[(ChunkId, u32, u32)],
        out: &mut Vec<(ChunkId, Bytes)>,
    ) -> Result<(), SourceError> {
        let wanted_bytes: usize = wanted.iter().map(|(_, _, len)| *len as usize).sum();
        let share = wanted_bytes * 2 >= raw.len();
        for (id, offset, len) in wanted {
            let range = *offset as usize..(*offset as usize + *len as usize);
            let data = raw
                .get(range.clone())
                .ok_or_else(|| corrupt(format!("chunk {id} lies outside its frame")))?;
            verify_chunk(id, data).map_err(corrupt)?;
            let data = if share {
                raw.slice(range)
            } else {
                Bytes::copy_from_slice(data)
            };
            out.push((*id, data));
        }
        Ok(())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Fetches `request`'s frames and hands each frame's wanted chunks to
    /// `send` as soon as that frame has arrived, so a read waits for its own
    /// frame, not for the whole request. An answer cut short is asked again
    /// from the first frame not yet handed on.
    fn fetch_request(
        &self,
        request: &RangeRequest,
        wanted: &Wanted,
        send: &mut dyn FnMut(Vec<(ChunkId, Bytes)>),
    ) -> Result<(), SourceError> {
        let blob = &self.packs[request.blob as usize];
        let mut done = 0;
        let mut backoff = Backoff::new(self.plan.retry_window);
        loop {
            let rest = &request.frames[done..];
            let Some(&first) = rest.first() else {
                return Ok(());
            };
            let whole = match self.whole_ready(request.blob) {
                Some(file) => Some(file),
                None => {
                    let start = self.table.frames[first as usize].offset;
                    // A larger request may take longer on a slow link: a second per MiB more.
                    let budget = self.plan.attempt_timeout
                        + Duration::from_secs((request.end - start) >> 20);
                    let timeout = backoff.remaining().min(budget).max(Backoff::FIRST_DELAY);
                    match self
                        .registry
                        .blob_range(&blob.digest, start..request.end, timeout)
                    {
                        Ok(RangeAnswer::Partial(response)) => {
                            let before = done;
                            let read =
                                self.read_frames(response, start, rest, wanted, send, &mut done);
                            match read {
                                Ok(()) => return Ok(()),
                                Err(Attempt::Bad(e)) => return Err(e),
                                Err(Attempt::Net(e)) => {
                                    if done > before {
                                        backoff.progressed();
                                    }
                                    if !backoff.retry(e.is_transient(), &e) {
                                        return Err(to_source_error(e));
                                    }
                                    continue;
                                }
                            }
                        }
                        // That answer is bound by one range's deadline: the
                        // whole blob comes on a request of its own.
                        Ok(RangeAnswer::Whole(response)) => {
                            drop(response);
                            Some(self.whole_blob(request.blob)?)
                        }
                        Err(e) if backoff.retry(e.is_transient(), &e) => continue,
                        Err(e) => return Err(to_source_error(e)),
                    }
                }
            };
            if let Some(file) = whole {
                for &at in rest {
                    let frame = &self.table.frames[at as usize];
                    let end = frame.offset + u64::from(frame.len);
                    let bytes = read_file_range(&file, frame.offset, end)?;
                    send(self.decode_frame(at, &bytes, wanted)?);
                }
                return Ok(());
            }
        }
    }

    /// Reads `frames` off a ranged answer that starts at `start`, skipping
    /// the gaps between them, decoding and handing on each as it completes.
    fn read_frames(
        &self,
        mut response: reqwest::blocking::Response,
        start: u64,
        frames: &[u32],
        wanted: &Wanted,
        send: &mut dyn FnMut(Vec<(ChunkId, Bytes)>),
        done: &mut usize,
    ) -> Result<(), Attempt> {
        let cut = |e: std::io::Error| {
            Attempt::Net(RegistryError::Interrupted {
                url: format!(
                    "blob {}",
                    self.packs[self.table.frames[frames[0] as usize].blob as usize].digest
                ),
                message: e.to_string(),
            })
        };
        let mut pos = start;
        let mut buf = Vec::new();
        for &at in frames {
            let frame = &self.table.frames[at as usize];
            let gap = frame.offset - pos;
            std::io::copy(&mut (&mut response).take(gap), &mut std::io::sink())
                .map_err(cut)
                .and_then(|n| {
                    if n == gap {
                        Ok(())
                    } else {
                        Err(cut(std::io::ErrorKind::UnexpectedEof.into()))
                    }
                })?;
            buf.resize(frame.len as usize, 0);
            response.read_exact(&mut buf).map_err(cut)?;
            self.registry.traffic.add_bytes(gap + u64::from(frame.len));
            send(self.decode_frame(at, &buf, wanted).map_err(Attempt::Bad)?);
            *done += 1;
            pos = frame.offset + u64::from(frame.len);
        }
        Ok(())
    }

    fn whole_ready(&self, blob: u32) -> Option<Arc<File>> {
        let whole = self.whole.lock().expect("whole blobs poisoned");
        whole.get(&blob)?.get()?.as_ref().ok().cloned()
    }

    /// Reads a blob whose registry ignored `Range`, once, to a local file
    /// checked against its digest.
    fn whole_blob(&self, blob: u32) -> Result<Arc<File>, SourceError> {
        let slot = self
            .whole
            .lock()
            .expect("whole blobs poisoned")
            .entry(blob)
            .or_default()
            .clone();
        let descriptor = &self.packs[blob as usize];
        let outcome = slot.get_or_init(|| {
            if !self.said_ranges_ignored.swap(true, Ordering::Relaxed) {
                self.registry.traffic.note(format!(
                    "{} ignores Range on blob GETs (answers 200): each such blob is read \
                     whole once, checked, and served from a local copy",
                    self.registry.host()
                ));
            }
            self.registry
                .blob_stream(&descriptor.digest)
                .and_then(|response| spool(response, descriptor, &self.spool_dir, &self.registry))
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        match outcome {
            Ok(file) => Ok(file.clone()),
            Err(message) => {
                let message = message.clone();
                // The next read tries again.
                let mut whole = self.whole.lock().expect("whole blobs poisoned");
                if whole.get(&blob).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    whole.remove(&blob);
                }
                Err(SourceError::Unavailable(message))
            }
        }
    }

    /// Decompresses frame `at` and checks the chunks of it that `wanted` names.
    fn decode_frame(
        &self,
        at: u32,
        compressed: &[u8],
        wanted: &Wanted,
    ) -> Result<Vec<(ChunkId, Bytes)>, SourceError> {
        let frame = &self.table.frames[at as usize];
        let raw = decompress_frame(compressed, frame.raw_len as usize).map_err(|e| {
            corrupt(format!(
                "a frame at {} of blob {} does not decode: {e}",
                frame.offset, self.packs[frame.blob as usize].digest
            ))
        })?;
        let raw = Bytes::from(raw);
        let mut out = Vec::new();
        Self::chunks_of(&raw, wanted.get(&at).map_or(&[], Vec::as_slice), &mut out)?;
        // Kept only once its wanted chunks proved it sound.
        self.recent.insert(at, raw);
        if let Some(flight) = self
            .in_flight
            .lock()
            .expect("frame flights poisoned")
            .remove(&at)
        {
            flight.land();
        }
        Ok(out)
    }
}

/// Why an attempt at a ranged answer ended early.
enum Attempt {
    /// The network: worth asking again.
    Net(RegistryError),
    /// Bytes that are not the chunks: never retried into data.
    Bad(SourceError),
}

/// The chunks a fetch wants, by frame: (id, offset, length) in the frame.
type Wanted = HashMap<u32, Vec<(ChunkId, u32, u32)>>;

/// Copies a whole blob to an unnamed file in `dir`, checking size and sha256.
fn spool(
    mut response: reqwest::blocking::Response,
    descriptor: &Descriptor,
    dir: &std::path::Path,
    registry: &Registry,
) -> Result<File, RegistryError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| RegistryError::Io(format!("{}: {e}", dir.display())))?;
    let file = tempfile::tempfile_in(dir)
        .map_err(|e| RegistryError::Io(format!("a spool file in {}: {e}", dir.display())))?;
    let mut hasher = Sha256Writer::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let n = response
            .read(&mut buf)
            .map_err(|e| RegistryError::Interrupted {
                url: format!("blob {}", descriptor.digest),
                message: e.to_string(),
            })?;
        if n == 0 {
            break;
        }
        if written + n as u64 > descriptor.size {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob {}", descriptor.digest),
                expected: format!("{} bytes", descriptor.size),
                actual: "more".into(),
            });
        }
        hasher.update(&buf[..n]);
        file.write_all_at(&buf[..n], written)
            .map_err(|e| RegistryError::Io(format!("spool file: {e}")))?;
        written += n as u64;
        registry.traffic.add_bytes(n as u64);
    }
    if written != descriptor.size {
        return Err(RegistryError::Interrupted {
            url: format!("blob {}", descriptor.digest),
            message: format!("{written} of {} bytes", descriptor.size),
        });
    }
    let actual = hasher.finish();
    if actual != descriptor.digest {
        return Err(RegistryError::DigestMismatch {
            what: format!("blob {}", descriptor.digest),
            expected: descriptor.digest.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(file)
}

fn read_file_range(file: &File, start: u64, end: u64) -> Result<Vec<u8>, SourceError> {
    let mut bytes = vec![0u8; (end - start) as usize];
    file.read_exact_at(&mut bytes, start)
        .map_err(|e| SourceError::Unavailable(format!("reading a local copy of a blob: {e}")))?;
    Ok(bytes)
}

impl ChunkSource for RegistrySource {
    fn fetch(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Bytes),
    ) -> Result<(), SourceError> {
        // Chunks by frame, and the frames in blob order.
        let mut wanted: Wanted = HashMap::new();
        let mut seen = HashSet::new();
        // Whether ids[i] is the first of its kind: repeats are handed on once.
        let first: Vec<bool> = ids.iter().map(|id| seen.insert(*id)).collect();
        for (id, _) in ids.iter().zip(&first).filter(|(_, first)| **first) {
            let (chunk, _) = self.table.find(id).ok_or(SourceError::Missing(*id))?;
            wanted
                .entry(chunk.frame)
                .or_default()
                .push((*id, chunk.offset, chunk.len));
        }
        // Frames decompressed a moment ago need no request; frames another
        // fetch is getting are waited for.
        let mut ready: HashMap<ChunkId, Bytes> = HashMap::new();
        let mut frames = Vec::new();
        let mut awaited = Vec::new();
        {
            let mut in_flight = self.in_flight.lock().expect("frame flights poisoned");
            for (at, chunks) in &wanted {
                let mut out = Vec::new();
                match self.recent.get(at) {
                    Some(raw) if Self::chunks_of(&raw, chunks, &mut out).is_ok() => {
                        ready.extend(out);
                        continue;
                    }
                    // Bytes no earlier read checked are wrong: ask again.
                    Some(_) => self.recent.remove(at),
                    None => None,
                };
                match in_flight.get(at) {
                    Some(flight) => awaited.push((*at, flight.clone())),
                    None => {
                        in_flight.insert(*at, Arc::default());
                        frames.push(*at);
                    }
                }
            }
        }
        let _leading = FrameFlights {
            source: self,
            frames: frames.clone(),
        };
        frames.sort_unstable();
        let requests = plan_requests(&self.table, &frames, &self.plan);
        let queue = Mutex::new((0..requests.len()).collect::<VecDeque<_>>());
        let failed = AtomicBool::new(false);
        let (tx, rx) = mpsc::channel();
        let workers = self.plan.connections.clamp(1, requests.len().max(1));
        let mut next = 0;
        let mut first_error = None;
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let tx = tx.clone();
                let (queue, failed, requests, wanted) = (&queue, &failed, &requests, &wanted);
                scope.spawn(move || loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(at) = queue.lock().expect("queue poisoned").pop_front() else {
                        return;
                    };
                    let outcome = self.fetch_request(&requests[at], wanted, &mut |chunks| {
                        let _ = tx.send(Ok(chunks));
                    });
                    if let Err(e) = outcome {
                        failed.store(true, Ordering::Relaxed);
                        let _ = tx.send(Err(e));
                        return;
                    }
                });
            }
            if !awaited.is_empty() {
                let tx = tx.clone();
                let (failed, wanted) = (&failed, &wanted);
                scope.spawn(move || {
                    for (at, flight) in awaited {
                        flight.wait(self.plan.attempt_timeout);
                        let mut out = Vec::new();
                        let chunks = wanted.get(&at).map_or(&[][..], Vec::as_slice);
                        match self.recent.get(&at) {
                            Some(raw) if Self::chunks_of(&raw, chunks, &mut out).is_ok() => {
                                let _ = tx.send(Ok(out));
                            }
                            // Its fetch failed, or it is gone already: get it here.
                            _ => {
                                let request = plan_requests(&self.table, &[at], &self.plan);
                                let outcome =
                                    self.fetch_request(&request[0], wanted, &mut |chunks| {
                                        let _ = tx.send(Ok(chunks));
                                    });
                                if let Err(e) = outcome {
                                    failed.store(true, Ordering::Relaxed);
                                    let _ = tx.send(Err(e));
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            drop(tx);
            // Hand chunks on in the order asked, as soon as the ones before them are in.
            let mut deliver = |ready: &mut HashMap<ChunkId, Bytes>| {
                while let Some(id) = ids.get(next) {
                    match ready.remove(id) {
                        Some(data) => each(*id, data),
                        None if !first[next] => {}
                        None => break,
                    }
                    next += 1;
                }
            };
            deliver(&mut ready);
            for outcome in rx {
                match outcome {
                    Ok(chunks) => ready.extend(chunks),
                    Err(e) => {
                        first_error.get_or_insert(e);
                        continue;
                    }
                }
                deliver(&mut ready);
            }
        });
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn describe(&self) -> String {
        self.registry.reference().to_string()
    }

    fn traffic(&self) -> Option<SourceTraffic> {
        Some(self.registry.traffic.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_format::artifact::TableFrame;

    fn frame(blob: u32, offset: u64, len: u32) -> TableFrame {
        TableFrame {
            blob,
            offset,
            len,
            raw_len: len * 3,
        }
    }

    #[test]
    fn chunks_share_a_mostly_wanted_frame_and_copy_a_small_part_of_one() {
        let parts: Vec<Vec<u8>> = (0..4u8).map(|n| vec![n; 1000]).collect();
        let raw = Bytes::from(parts.concat());
        let wanted = |which: &[usize]| -> Vec<(ChunkId, u32, u32)> {
            which
                .iter()
                .map(|&i| (ChunkId::of(&parts[i]), i as u32 * 1000, 1000))
                .collect()
        };
        let inside = |data: &Bytes| {
            let at = data.as_ptr() as usize;
            at >= raw.as_ptr() as usize && at < raw.as_ptr() as usize + raw.len()
        };
        let mut out = Vec::new();
        RegistrySource::chunks_of(&raw, &wanted(&[0, 1, 3]), &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(
            out.iter().all(|(_, data)| inside(data)),
            "slices of the frame"
        );
        assert_eq!(out[2].1, parts[3]);
        let mut out = Vec::new();
        RegistrySource::chunks_of(&raw, &wanted(&[2]), &mut out).unwrap();
        assert!(!inside(&out[0].1), "a copy: the frame is not kept for it");
        assert_eq!(out[0].1, parts[2]);
        // Bytes that do not hash to the id are refused, shared or not.
        let mut bad = wanted(&[0, 1, 2]);
        bad[1].1 = 3000;
        assert!(RegistrySource::chunks_of(&raw, &bad, &mut Vec::new()).is_err());
    }

    #[test]
    fn neighbours_share_a_request_up_to_the_window() {
        let table = ChunkTable {
            frames: vec![
                frame(0, 0, 100),
                frame(0, 100, 100),
                frame(0, 250, 100),
                frame(0, 2000, 100),
                frame(1, 0, 100),
            ],
            chunks: Vec::new(),
        };
        let plan = RangePlan {
            max_request_bytes: 350,
            max_gap_bytes: 50,
            ..RangePlan::default()
        };
        let requests = plan_requests(&table, &[0, 1, 2, 3, 4], &plan);
        let spans: Vec<_> = requests.iter().map(|r| (r.blob, r.start, r.end)).collect();
        // 0+1 adjoin, 2 is 50 bytes on and still fits 350; 3 is too far; 4 is another blob.
        assert_eq!(spans, vec![(0, 0, 350), (0, 2000, 2100), (1, 0, 100)]);
        let tight = RangePlan {
            max_request_bytes: 200,
            ..plan
        };
        let requests = plan_requests(&table, &[0, 1, 2], &tight);
        assert_eq!(requests.len(), 2, "the window splits a run of frames");
        assert_eq!(requests[0].frames, vec![0, 1]);
    }
}
