//! `convert`: layers in, one merged index and deduplicated chunks out.
//!
//! ```text
//! this thread: read layer ─▶ decompress ─▶ tar entries ─▶ merged tree
//!                                     │ file contents
//!                                     ▼
//! workers (one per core): FastCDC ─▶ BLAKE3 ─▶ new? ─▶ zstd frame
//!                                                    │
//! pack writer thread:  append frames to a pack, commit every ~64 MiB
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use serde::Serialize;
use skiff_chunk::{Chunker, Frame, FrameBuilder};
use skiff_format::{
    ChunkId, ChunkRef, ImageIndex, ImageManifest, ImageRef, IndexDescriptor, Metadata, SourceInfo,
    Xattr, MANIFEST_SCHEMA_VERSION,
};
use skiff_store::Store;

use crate::error::IoContext;
use crate::layer_cache::{self, LayerRecorder};
use crate::merge::{normalize_xattrs, Content, EntryKind, MergedTree};
use crate::source::{decompressed, ImageSource, Platform};
use crate::verify::check_digest;
use crate::OciError;

/// Files larger than this are chunked as a stream instead of read whole.
const STREAM_FILE_BYTES: u64 = 32 << 20;
/// Chunks per work item when a large file is streamed.
const STREAM_BATCH_BYTES: usize = 8 << 20;

pub struct ConvertOptions {
    pub platform: Platform,
    /// Chunking and compression threads; 0 means one per core.
    pub threads: usize,
    /// Set (by a signal handler, say) to stop; the conversion then fails with
    /// [`OciError::Interrupted`] and leaves the store as it was.
    pub cancel: Arc<AtomicBool>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            platform: Platform::host(),
            threads: 0,
            cancel: Arc::default(),
        }
    }
}

/// Told how far a conversion is; every method has a no-op default.
pub trait ConvertProgress: Sync {
    /// Total compressed bytes of the layers about to be read.
    fn start(&self, _total_bytes: u64) {}
    fn layer(&self, _index: usize, _count: usize) {}
    /// More compressed layer bytes were read.
    fn advance(&self, _bytes: u64) {}
}

impl ConvertProgress for () {}

/// What a conversion did.
#[derive(Debug, Serialize)]
pub struct ConvertReport {
    pub manifest: ImageManifest,
    pub layers: usize,
    /// Layers converted before, applied from their records without reading them.
    pub cached_layers: usize,
    pub layer_bytes: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_chunk_bytes: u64,
    pub new_frame_bytes: u64,
    pub elapsed: Duration,
}

enum Pieces {
    Whole(Vec<u8>),
    /// Already cut (a streamed large file).
    Cut(Vec<Vec<u8>>),
}

struct WorkItem {
    slot: usize,
    part: u32,
    pieces: Pieces,
}

/// Shared by the workers: which chunks are already stored or claimed, and results.
struct Shared<'a> {
    store: &'a Store,
    cancel: &'a AtomicBool,
    chunker: Chunker,
    claimed: Mutex<HashSet<ChunkId>>,
    results: Mutex<HashMap<usize, BTreeMap<u32, Vec<ChunkRef>>>>,
}

impl Shared<'_> {
    /// True if this chunk must be written by the caller: not stored, not claimed.
    fn claim(&self, id: &ChunkId) -> Result<bool, OciError> {
        if self.store.contains_chunk(id)? {
            return Ok(false);
        }
        Ok(self.claimed.lock().expect("claim set poisoned").insert(*id))
    }
}

/// Converts the image `source` into `store` under the name `target`.
pub fn convert(
    source: &ImageSource,
    store: &Store,
    target: &ImageRef,
    options: &ConvertOptions,
    progress: &dyn ConvertProgress,
) -> Result<ConvertReport, OciError> {
    let started = Instant::now();
    let resolved = source.resolve(&options.platform)?;
    let config = store.config().clone();
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let layer_bytes: u64 = resolved.layers.iter().map(|l| l.size).sum();
    tracing::info!(
        source = %source.name(),
        manifest = %resolved.manifest_digest,
        platform = %resolved.platform,
        layers = resolved.layers.len(),
        layer_bytes,
        threads,
        "converting"
    );
    progress.start(layer_bytes);

    let shared = Shared {
        store,
        cancel: &options.cancel,
        chunker: Chunker::new(config.chunking),
        claimed: Mutex::new(HashSet::new()),
        results: Mutex::new(HashMap::new()),
    };
    let writer = store.pack_writer()?;

    let (tree, recorded, mut writer) = std::thread::scope(|scope| -> Result<_, OciError> {
        let (work_tx, work_rx) = bounded::<WorkItem>(threads * 2);
        let (frame_tx, frame_rx) = bounded::<Frame>(threads * 2);
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (rx, tx, shared) = (work_rx.clone(), frame_tx.clone(), &shared);
                scope.spawn(move || {
                    chunk_worker(
                        rx,
                        tx,
                        shared,
                        config.frame_size as usize,
                        config.zstd_level,
                    )
                })
            })
            .collect();
        drop((work_rx, frame_tx));
        let writer_thread = scope.spawn(move || -> Result<_, OciError> {
            let mut writer = writer;
            for frame in frame_rx {
                writer.append(&frame)?;
            }
            Ok(writer)
        });

        let read_result = read_layers(source, &resolved, &shared, work_tx, progress);
        let worker_results: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().expect("chunk worker panicked"))
            .collect();
        // A writer or worker failure is the cause when the reader saw its
        // channel close; the reader's own error (bad input) comes last.
        let writer = writer_thread.join().expect("pack writer panicked")?;
        worker_results.into_iter().collect::<Result<Vec<()>, _>>()?;
        let (tree, recorded) = read_result?;
        Ok((tree, recorded, writer))
    })?;
    // Chunks first, then the image that references them. On any error below
    // the writer is dropped unfinished and removes its chunks again; after
    // `put_image`, `finish` has nothing left to commit and cannot fail.
    writer.commit()?;

    let mut results = shared.results.into_inner().expect("results poisoned");
    let chunks_of = |slot: usize| -> Vec<ChunkRef> {
        results
            .get(&slot)
            .map(|parts| parts.values().flatten().copied().collect())
            .unwrap_or_default()
    };
    let cached_layers = resolved.layers.len() - recorded.len();
    let records: Vec<(String, skiff_store::LayerRecord)> = recorded
        .into_iter()
        .map(|(diff_id, recorder)| (diff_id, recorder.finish(&chunks_of)))
        .collect();
    let mut chunk_count = 0u64;
    let index = tree.into_index(config.chunking, &mut |slot| {
        let parts = results.remove(&slot).unwrap_or_default();
        let refs: Vec<ChunkRef> = parts.into_values().flatten().collect();
        chunk_count += refs.len() as u64;
        refs
    });
    let manifest = manifest_for(target, &index, &resolved, config.chunking)?;
    index.validate()?;
    // Last chance to honour a Ctrl-C: after this the image is stored.
    if options.cancel.load(Ordering::Relaxed) {
        return Err(OciError::Interrupted);
    }
    store.put_image(&manifest, &index, &records)?;
    let written = writer.finish()?;
    tracing::info!(
        image = %target,
        index = %manifest.index.digest,
        chunks = chunk_count,
        new_chunks = written.chunks,
        new_frame_bytes = written.frame_bytes,
        elapsed = ?started.elapsed(),
        "converted"
    );
    Ok(ConvertReport {
        manifest,
        layers: resolved.layers.len(),
        cached_layers,
        layer_bytes,
        chunks: chunk_count,
        new_chunks: written.chunks,
        new_chunk_bytes: written.chunk_bytes,
        new_frame_bytes: written.frame_bytes,
        elapsed: started.elapsed(),
    })
}

fn manifest_for(
    target: &ImageRef,
    index: &ImageIndex,
    resolved: &crate::ResolvedImage,
    chunking: skiff_format::ChunkingParams,
) -> Result<ImageManifest, OciError> {
    let encoded = index.encode();
    let config = String::from_utf8(resolved.config.clone())
        .ok()
        .and_then(|s| serde_json::value::RawValue::from_string(s).ok())
        .ok_or_else(|| OciError::Malformed {
            what: "image config".into(),
            reason: "not UTF-8 JSON".into(),
        })?;
    Ok(ImageManifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        name: target.name.clone(),
        tag: target.tag.clone(),
        index: IndexDescriptor {
            digest: skiff_format::IndexDigest::of(&encoded),
            size: encoded.len() as u64,
            files: index.file_count(),
            logical_bytes: index.logical_bytes(),
        },
        chunking,
        source: SourceInfo {
            manifest_digest: resolved.manifest_digest.clone(),
            config_digest: resolved.config_digest.clone(),
            platform: resolved.platform.to_string(),
            layers: resolved.layers.len() as u32,
            diff_ids: resolved.layers.iter().map(|l| l.diff_id.clone()).collect(),
        },
        config,
    })
}

/// Counts compressed bytes for the progress bar.
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn ConvertProgress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

fn read_layers(
    source: &ImageSource,
    resolved: &crate::ResolvedImage,
    shared: &Shared<'_>,
    work: Sender<WorkItem>,
    progress: &dyn ConvertProgress,
) -> Result<(MergedTree, Vec<(String, LayerRecorder)>), OciError> {
    let cancel = shared.cancel;
    let mut tree = MergedTree::default();
    let mut next_slot = 0usize;
    let mut recorded = Vec::new();
    for (layer, desc) in resolved.layers.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(OciError::Interrupted);
        }
        progress.layer(layer, resolved.layers.len());
        if let Some(entries) = shared
            .store
            .layer_record(&desc.diff_id)?
            .as_ref()
            .and_then(layer_cache::decode)
        {
            tracing::debug!(layer, diff_id = %desc.diff_id, entries = entries.len(), "layer converted before: applying its record");
            let mut results = shared.results.lock().expect("results poisoned");
            for entry in entries {
                let kind =
                    layer_cache::entry_kind(entry.kind, &mut next_slot, &mut |slot, parts| {
                        results.insert(slot, parts);
                    });
                tree.apply(layer, &entry.path, entry.meta, kind)?;
            }
            progress.advance(desc.size);
            continue;
        }
        let mut recorder = LayerRecorder::default();
        tracing::debug!(layer, digest = ?desc.digest, size = desc.size, compression = ?desc.compression, "applying layer");
        let blob = source.open_layer(desc)?;
        let counted: Box<dyn Read + Send + '_> = Box::new(Counting {
            inner: blob,
            progress,
        });
        let tar_stream = decompressed(counted, desc.compression)?;
        // Decompression and the diff_id hash run in their own thread, so the
        // tar parser here only copies file contents out to the workers.
        let diff_id = std::thread::scope(|scope| -> Result<String, OciError> {
            let (buffers, received) = bounded::<std::io::Result<Vec<u8>>>(8);
            let decoder = scope.spawn(move || pump(tar_stream, &buffers, layer));
            let mut reader = ChannelReader {
                buffers: received,
                current: Vec::new(),
                pos: 0,
            };
            let applied = (|| -> Result<(), OciError> {
                let mut archive = tar::Archive::new(&mut reader);
                let mut pending = PendingExtensions::default();
                // Raw: extension headers come to us, so their size can be bounded.
                for entry in archive
                    .entries()
                    .map_err(|e| bad_layer(layer, e))?
                    .raw(true)
                {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(OciError::Interrupted);
                    }
                    let mut entry = entry.map_err(|e| bad_layer(layer, e))?;
                    if let Some((path, meta, kind)) = parse_entry(
                        layer,
                        &mut entry,
                        &mut pending,
                        shared,
                        &work,
                        &mut next_slot,
                    )? {
                        recorder.record(&path, &meta, &kind);
                        tree.apply(layer, &path, meta, kind)?;
                    }
                }
                if !pending.is_empty() {
                    return Err(bad_layer(
                        layer,
                        "extension headers at the end describe no entry",
                    ));
                }
                // Padding after the end-of-archive blocks still counts for the diff_id.
                std::io::copy(&mut reader, &mut std::io::sink())
                    .map_err(|e| bad_layer(layer, e))?;
                Ok(())
            })();
            drop(reader); // unblocks the decoder if the tar was abandoned early
            let digest = decoder.join().expect("layer decoder panicked");
            applied?;
            digest
        })?;
        check_digest(
            &format!("layer {layer} (uncompressed)"),
            &desc.diff_id,
            diff_id,
        )?;
        recorded.push((desc.diff_id.clone(), recorder));
    }
    Ok((tree, recorded))
}

/// Moves a decompressed layer into `buffers` in 1 MiB pieces; returns the
/// digest of all of it.
fn pump(
    mut tar_stream: crate::verify::HashingReader<Box<dyn Read + Send + '_>>,
    buffers: &Sender<std::io::Result<Vec<u8>>>,
    layer: usize,
) -> Result<String, OciError> {
    loop {
        let mut buf = vec![0u8; 1 << 20];
        let mut filled = 0;
        while filled < buf.len() {
            match tar_stream.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let reason = e.to_string();
                    let _ = buffers.send(Err(e));
                    return Err(bad_layer(layer, reason));
                }
            }
        }
        if filled == 0 {
            break;
        }
        buf.truncate(filled);
        if buffers.send(Ok(buf)).is_err() {
            // The parser stopped and its error is the one reported: do not
            // download and decompress the rest of the layer for nothing.
            return Err(bad_layer(layer, "parsing stopped"));
        }
    }
    Ok(tar_stream.finish(&format!("layer {layer}"))?.1)
}

/// Reads what [`pump`] sends, as one stream.
struct ChannelReader {
    buffers: Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.current.len() {
            match self.buffers.recv() {
                Ok(piece) => {
                    self.current = piece?;
                    self.pos = 0;
                }
                Err(_) => return Ok(0), // sender finished: end of stream
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn bad_layer(layer: usize, e: impl std::fmt::Display) -> OciError {
    OciError::BadLayer {
        layer,
        reason: e.to_string(),
    }
}

/// PAX and GNU long-name headers are metadata: anything bigger is an attack
/// (a few MB of gzip can claim gigabytes of "header").
const MAX_EXTENSION_HEADER: u64 = 1 << 20;

/// Extension headers seen since the last real entry; they describe the next.
#[derive(Default)]
pub(crate) struct PendingExtensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl PendingExtensions {
    pub(crate) fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// Reads one entry of a layer read in raw mode. Extension headers are read
/// here, bounded, into `pending`; a real entry is turned into what it means
/// for the merged tree, its contents sent to the workers. `None` for entries
/// that change nothing by themselves.
fn parse_entry<R: Read>(
    layer: usize,
    entry: &mut tar::Entry<'_, R>,
    pending: &mut PendingExtensions,
    shared: &Shared<'_>,
    work: &Sender<WorkItem>,
    next_slot: &mut usize,
) -> Result<Option<(Vec<u8>, Metadata, EntryKind)>, OciError> {
    use tar::EntryType as T;
    let entry_type = entry.header().entry_type();
    if matches!(
        entry_type,
        T::GNULongName | T::GNULongLink | T::XHeader | T::XGlobalHeader
    ) {
        let size = entry.size();
        let header_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if size > MAX_EXTENSION_HEADER {
            return Err(OciError::BadEntry {
                layer,
                path: header_name,
                reason: format!("{entry_type:?} header claims {size} bytes (at most {MAX_EXTENSION_HEADER} bytes are accepted)"),
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| bad_layer(layer, e))?;
        let slot = match entry_type {
            T::GNULongName => &mut pending.long_name,
            T::GNULongLink => &mut pending.long_link,
            T::XHeader => &mut pending.pax,
            _ => return Ok(None), // global PAX headers set defaults nobody relies on
        };
        if slot.is_some() {
            return Err(bad_layer(
                layer,
                format!("two {entry_type:?} headers for one entry"),
            ));
        }
        if entry_type != T::XHeader {
            // GNU long names are NUL-terminated.
            while data.last() == Some(&0) {
                data.pop();
            }
        }
        *slot = Some(data);
        return Ok(None);
    }
    let extensions = std::mem::take(pending);
    let pax: Vec<(Vec<u8>, Vec<u8>)> = match &extensions.pax {
        Some(records) => tar::PaxExtensions::new(records)
            .map(|r| r.map(|ext| (ext.key_bytes().to_vec(), ext.value_bytes().to_vec())))
            .collect::<Result<_, _>>()
            .map_err(|e| bad_layer(layer, format!("malformed PAX header: {e}")))?,
        None => Vec::new(),
    };
    let pax_value = |key: &[u8]| {
        pax.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let path = extensions
        .long_name
        .or_else(|| pax_value(b"path"))
        .unwrap_or_else(|| entry.path_bytes().into_owned());
    let path_str = || String::from_utf8_lossy(&path).into_owned();
    let bad = |reason: String| OciError::BadEntry {
        layer,
        path: path_str(),
        reason,
    };
    let header = entry.header();
    let number = |value: std::io::Result<u64>, what: &str| -> Result<u64, OciError> {
        value.map_err(|e| bad(format!("bad {what}: {e}")))
    };
    let mut meta = Metadata {
        mode: header.mode().map_err(|e| bad(format!("bad mode: {e}")))? & 0o7777,
        uid: u32::try_from(number(header.uid(), "uid")?)
            .map_err(|_| bad("uid out of range".into()))?,
        gid: u32::try_from(number(header.gid(), "gid")?)
            .map_err(|_| bad("gid out of range".into()))?,
        mtime: i64::try_from(number(header.mtime(), "mtime")?)
            .map_err(|_| bad("mtime out of range".into()))?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let link_name = extensions
        .long_link
        .or_else(|| pax_value(b"linkpath"))
        .or_else(|| header.link_name_bytes().map(|l| l.into_owned()));
    let mut xattrs = Vec::new();
    for (key, value) in &pax {
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            xattrs.push(Xattr {
                name: name.to_vec(),
                value: value.clone(),
            });
        } else if key == b"mtime" {
            (meta.mtime, meta.mtime_nsec) =
                parse_pax_time(value).ok_or_else(|| bad("bad PAX mtime".into()))?;
        } else if key == b"uid" || key == b"gid" {
            let id = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u32>().ok());
            let id = id.ok_or_else(|| bad(format!("bad PAX {}", String::from_utf8_lossy(key))))?;
            if key == b"uid" {
                meta.uid = id;
            } else {
                meta.gid = id;
            }
        } else if key == b"size" {
            // Raw reading sizes data by the header; a different PAX size would misalign the stream.
            let size = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
            if size != Some(entry.size()) {
                return Err(bad("PAX size record disagrees with the header (files over 8 GiB are not supported)".into()));
            }
        }
    }
    meta.xattrs = normalize_xattrs(xattrs);

    let device = || -> Result<(u32, u32), OciError> {
        let major = header
            .device_major()
            .map_err(|e| bad(format!("bad device major: {e}")))?;
        let minor = header
            .device_minor()
            .map_err(|e| bad(format!("bad device minor: {e}")))?;
        Ok((major.unwrap_or(0), minor.unwrap_or(0)))
    };
    let kind = match entry_type {
        T::Directory => EntryKind::Dir,
        T::Symlink => {
            EntryKind::Symlink(link_name.ok_or_else(|| bad("symlink without a target".into()))?)
        }
        T::Link => {
            EntryKind::HardLink(link_name.ok_or_else(|| bad("hard link without a target".into()))?)
        }
        T::Char => {
            let (major, minor) = device()?;
            EntryKind::CharDevice(major, minor)
        }
        T::Block => {
            let (major, minor) = device()?;
            EntryKind::BlockDevice(major, minor)
        }
        T::Fifo => EntryKind::Fifo,
        T::Regular | T::Continuous => {
            let size = entry.size();
            if size == 0 || is_whiteout(&path) {
                EntryKind::File(Content::Empty, 0)
            } else {
                let slot = *next_slot;
                *next_slot += 1;
                send_contents(entry, size, slot, shared, work).map_err(|e| match e {
                    OciError::Io { source, .. } => bad(format!("reading contents: {source}")),
                    other => other,
                })?;
                EntryKind::File(Content::Slot(slot), size)
            }
        }
        other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
    };
    Ok(Some((path, meta, kind)))
}

fn is_whiteout(path: &[u8]) -> bool {
    path.rsplit(|&b| b == b'/')
        .next()
        .is_some_and(|name| name.starts_with(b".wh."))
}

/// `SECONDS[.FRACTION]` as in PAX headers (may be negative).
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let negative = secs.starts_with('-');
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nsec: u32 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    if negative && nsec > 0 {
        // -1.5 means 1.5 s before the epoch: -2 s + 0.5 s ("-0.5" too, whose seconds parse as 0).
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nsec));
    }
    Some((secs, nsec))
}

/// Reads a file's contents and hands them to the workers. A tar header can
/// claim any size: memory grows only with bytes actually read.
fn send_contents<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    size: u64,
    slot: usize,
    shared: &Shared<'_>,
    work: &Sender<WorkItem>,
) -> Result<(), OciError> {
    let send = |item: WorkItem| {
        work.send(item).map_err(|_| OciError::BadLayer {
            layer: 0,
            reason: "chunk workers stopped".into(),
        })
    };
    let short = |read: u64| OciError::Io {
        context: "reading file contents".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("header says {size} bytes, the layer ends after {read}"),
        ),
    };
    if size <= STREAM_FILE_BYTES {
        let mut data = Vec::with_capacity(size as usize);
        entry
            .read_to_end(&mut data)
            .context(|| "reading file contents".into())?;
        if data.len() as u64 != size {
            return Err(short(data.len() as u64));
        }
        return send(WorkItem {
            slot,
            part: 0,
            pieces: Pieces::Whole(data),
        });
    }
    let mut read = 0u64;
    let mut part = 0u32;
    let mut batch = Vec::new();
    let mut batch_bytes = 0usize;
    for chunk in shared.chunker.cut_stream(&mut *entry) {
        if shared.cancel.load(Ordering::Relaxed) {
            return Err(OciError::Interrupted);
        }
        let chunk = chunk.context(|| "reading file contents".into())?;
        read += chunk.len() as u64;
        batch_bytes += chunk.len();
        batch.push(chunk);
        if batch_bytes >= STREAM_BATCH_BYTES {
            send(WorkItem {
                slot,
                part,
                pieces: Pieces::Cut(std::mem::take(&mut batch)),
            })?;
            part += 1;
            batch_bytes = 0;
        }
    }
    if read != size {
        return Err(short(read));
    }
    if !batch.is_empty() {
        send(WorkItem {
            slot,
            part,
            pieces: Pieces::Cut(batch),
        })?;
    }
    Ok(())
}

fn chunk_worker(
    work: Receiver<WorkItem>,
    frames: Sender<Frame>,
    shared: &Shared<'_>,
    frame_size: usize,
    level: i32,
) -> Result<(), OciError> {
    let mut builder = FrameBuilder::new(frame_size, level)?;
    let stopped = || OciError::BadLayer {
        layer: 0,
        reason: "pack writer stopped".into(),
    };
    for item in work {
        let mut refs = Vec::new();
        let mut add = |data: &[u8]| -> Result<(), OciError> {
            let id = ChunkId::of(data);
            refs.push(ChunkRef {
                id,
                len: data.len() as u32,
            });
            if shared.claim(&id)? {
                if let Some(frame) = builder.push(id, data)? {
                    frames.send(frame).map_err(|_| stopped())?;
                }
            }
            Ok(())
        };
        match &item.pieces {
            Pieces::Whole(data) => {
                for range in shared.chunker.cut(data) {
                    add(&data[range])?;
                }
            }
            Pieces::Cut(chunks) => {
                for chunk in chunks {
                    add(chunk)?;
                }
            }
        }
        shared
            .results
            .lock()
            .expect("results poisoned")
            .entry(item.slot)
            .or_default()
            .insert(item.part, refs);
    }
    if let Some(frame) = builder.finish()? {
        frames.send(frame).map_err(|_| stopped())?;
    }
    Ok(())
}
