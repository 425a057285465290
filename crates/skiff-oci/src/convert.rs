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
        chunker: Chunker::new(config.chunking),
        claimed: Mutex::new(HashSet::new()),
        results: Mutex::new(HashMap::new()),
    };
    let writer = store.pack_writer()?;

    let (tree, mut writer) = std::thread::scope(|scope| -> Result<_, OciError> {
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

        let read_result = read_layers(
            source,
            &resolved,
            &shared,
            work_tx,
            progress,
            &options.cancel,
        );
        let worker_results: Vec<_> = workers
            .into_iter()
            .map(|w| w.join().expect("chunk worker panicked"))
            .collect();
        // A writer or worker failure is the cause when the reader saw its
        // channel close; the reader's own error (bad input) comes last.
        let writer = writer_thread.join().expect("pack writer panicked")?;
        worker_results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok((read_result?, writer))
    })?;
    // Chunks first, then the image that references them. On any error below
    // the writer is dropped unfinished and removes its chunks again; after
    // `put_image`, `finish` has nothing left to commit and cannot fail.
    writer.commit()?;

    let mut results = shared.results.into_inner().expect("results poisoned");
    let mut chunk_count = 0u64;
    let index = tree.into_index(config.chunking, &mut |slot| {
        let parts = results.remove(&slot).unwrap_or_default();
        let refs: Vec<ChunkRef> = parts.into_values().flatten().collect();
        chunk_count += refs.len() as u64;
        refs
    });
    let manifest = manifest_for(target, &index, &resolved, config.chunking)?;
    store.put_image(&manifest, &index)?;
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
    cancel: &AtomicBool,
) -> Result<MergedTree, OciError> {
    let mut tree = MergedTree::default();
    let mut next_slot = 0usize;
    for (layer, desc) in resolved.layers.iter().enumerate() {
        progress.layer(layer, resolved.layers.len());
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
                for entry in archive.entries().map_err(|e| bad_layer(layer, e))? {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(OciError::Interrupted);
                    }
                    let mut entry = entry.map_err(|e| bad_layer(layer, e))?;
                    apply_entry(&mut tree, layer, &mut entry, shared, &work, &mut next_slot)?;
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
    }
    Ok(tree)
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
            break; // the parser stopped; its error is the one to report
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

fn apply_entry<R: Read>(
    tree: &mut MergedTree,
    layer: usize,
    entry: &mut tar::Entry<'_, R>,
    shared: &Shared<'_>,
    work: &Sender<WorkItem>,
    next_slot: &mut usize,
) -> Result<(), OciError> {
    let path = entry.path_bytes().into_owned();
    let path_str = || String::from_utf8_lossy(&path).into_owned();
    let bad = |reason: String| OciError::BadEntry {
        layer,
        path: path_str(),
        reason,
    };
    let header = entry.header();
    let mut meta = Metadata {
        mode: header.mode().map_err(|e| bad(e.to_string()))? & 0o7777,
        uid: u32::try_from(header.uid().map_err(|e| bad(e.to_string()))?)
            .map_err(|_| bad("uid out of range".into()))?,
        gid: u32::try_from(header.gid().map_err(|e| bad(e.to_string()))?)
            .map_err(|_| bad("gid out of range".into()))?,
        mtime: i64::try_from(header.mtime().map_err(|e| bad(e.to_string()))?)
            .map_err(|_| bad("mtime out of range".into()))?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    let entry_type = header.entry_type();
    let link_name = entry.link_name_bytes().map(|l| l.into_owned());
    let device = (
        header.device_major().ok().flatten().unwrap_or(0),
        header.device_minor().ok().flatten().unwrap_or(0),
    );
    if let Some(extensions) = entry.pax_extensions().map_err(|e| bad(e.to_string()))? {
        let mut xattrs = Vec::new();
        for ext in extensions {
            let ext = ext.map_err(|e| bad(e.to_string()))?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push(Xattr {
                    name: name.to_vec(),
                    value: ext.value_bytes().to_vec(),
                });
            } else if key == b"mtime" {
                let (secs, nsec) =
                    parse_pax_time(ext.value_bytes()).ok_or_else(|| bad("bad PAX mtime".into()))?;
                meta.mtime = secs;
                meta.mtime_nsec = nsec;
            } else if key == b"uid" || key == b"gid" {
                let value = std::str::from_utf8(ext.value_bytes())
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok());
                let value = value
                    .ok_or_else(|| bad(format!("bad PAX {}", String::from_utf8_lossy(key))))?;
                if key == b"uid" {
                    meta.uid = value;
                } else {
                    meta.gid = value;
                }
            }
        }
        meta.xattrs = normalize_xattrs(xattrs);
    }

    use tar::EntryType as T;
    let kind = match entry_type {
        T::Directory => EntryKind::Dir,
        T::Symlink => {
            EntryKind::Symlink(link_name.ok_or_else(|| bad("symlink without a target".into()))?)
        }
        T::Link => {
            EntryKind::HardLink(link_name.ok_or_else(|| bad("hard link without a target".into()))?)
        }
        T::Char => EntryKind::CharDevice(device.0, device.1),
        T::Block => EntryKind::BlockDevice(device.0, device.1),
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
        T::XGlobalHeader => return Ok(()),
        other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
    };
    tree.apply(layer, &path, meta, kind)
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
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nsec = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    if secs < 0 && nsec > 0 {
        // -1.5 means 1.5 s before the epoch: -2 s + 0.5 s.
        return Some((secs - 1, 1_000_000_000 - nsec));
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
