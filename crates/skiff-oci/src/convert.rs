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
    ChunkId, ChunkRef, ImageIndex, ImageManifest, ImageRef, IndexDescriptor, SourceInfo,
    MANIFEST_SCHEMA_VERSION,
};
use skiff_store::Store;

use crate::error::IoContext;
use crate::layer_cache::{self, LayerRecorder};
use crate::merge::{Content, MergedTree};
use crate::source::{decompressed, ImageSource, Platform};
use crate::tar_entry::{bad_layer, LayerEntries};
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
    /// Converts only the first this many layers (the prefix an artifact
    /// attached beside the image holds); the manifest's `source` names
    /// those layers, its config stays the image's.
    pub layers: Option<usize>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            platform: Platform::host(),
            threads: 0,
            cancel: Arc::default(),
            layers: None,
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
    let mut resolved = source.resolve(&options.platform)?;
    if let Some(count) = options.layers {
        if count == 0 || count > resolved.layers.len() {
            return Err(OciError::Malformed {
                what: "layer prefix".into(),
                reason: format!(
                    "asked for the first {count} of {} layers",
                    resolved.layers.len()
                ),
            });
        }
        resolved.layers.truncate(count);
    }
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
        profile: None,
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
                let mut entries = LayerEntries::new(layer, &mut archive)?;
                loop {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(OciError::Interrupted);
                    }
                    let mut contents = |reader: &mut dyn Read, size: u64| {
                        let slot = next_slot;
                        next_slot += 1;
                        send_contents(reader, size, slot, shared, &work)?;
                        Ok(Content::Slot(slot))
                    };
                    let Some((path, meta, kind)) = entries.next_entry(&mut contents)? else {
                        break;
                    };
                    recorder.record(&path, &meta, &kind);
                    tree.apply(layer, &path, meta, kind)?;
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

/// Reads a file's contents and hands them to the workers. A tar header can
/// claim any size: memory grows only with bytes actually read.
fn send_contents(
    entry: &mut dyn Read,
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
