//! One pass over a layer's files: each file's content digest, length and
//! zstd length, and the layer's new chunks framed as a store would frame them.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use skiff_chunk::{
    Chunker, FrameBuilder, DEFAULT_FRAME_SIZE, DEFAULT_ZSTD_LEVEL, STORE_ZSTD_LEVEL,
};
use skiff_format::ChunkId;
use skiff_oci::{layer_files, ImageSource, LayerDescriptor, LayerFiles, OciError};

/// What one regular file of a layer holds.
#[derive(Clone, Copy, Debug)]
pub struct FileFacts {
    pub sha256: [u8; 32],
    pub size: u64,
    /// The file compressed alone (zstd at the store's level).
    pub zstd: u64,
}

/// One layer, read: its files' facts, in tar order.
pub type LayerFacts = LayerFiles<FileFacts>;

/// The chunks seen so far across every layer, and what the new ones cost.
#[derive(Default)]
pub struct ChunkLedger {
    seen: Mutex<HashSet<ChunkId>>,
    totals: Mutex<ChunkTotals>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkTotals {
    pub chunks: u64,
    pub raw: u64,
    pub zstd: u64,
}

impl ChunkLedger {
    pub fn totals(&self) -> ChunkTotals {
        *self.totals.lock().expect("chunk totals poisoned")
    }

    fn claim(&self, id: ChunkId) -> bool {
        self.seen.lock().expect("chunk set poisoned").insert(id)
    }

    fn add_frame(&self, frame_len: usize) {
        self.totals.lock().expect("chunk totals poisoned").zstd += frame_len as u64;
    }

    fn add_chunk(&self, len: usize) {
        let mut totals = self.totals.lock().expect("chunk totals poisoned");
        totals.chunks += 1;
        totals.raw += len as u64;
    }
}

/// Counts what is written to it.
#[derive(Default)]
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hashes and compresses what is read through it.
struct Tee<'a> {
    inner: &'a mut dyn Read,
    hasher: Sha256,
    zstd: zstd::stream::write::Encoder<'static, Counter>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.zstd.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Reads every file of `layer`: digests, lengths, zstd lengths, and the
/// chunks no earlier layer had (claimed in `ledger`), framed as a store
/// frames them. Stops at the next file once `cancel` is set (another layer failed).
pub fn scan_layer(
    source: &ImageSource,
    layer: &LayerDescriptor,
    index: usize,
    chunker: &Chunker,
    ledger: &ChunkLedger,
    cancel: &AtomicBool,
) -> Result<LayerFacts, OciError> {
    // As a new store frames them.
    let mut frames = FrameBuilder::new(DEFAULT_FRAME_SIZE, STORE_ZSTD_LEVEL)?;
    let read = layer_files(source, layer, index, |contents, _size| {
        if cancel.load(Ordering::Relaxed) {
            return Err(OciError::Interrupted);
        }
        let io_error = |source: io::Error| OciError::Io {
            context: format!("reading a file of layer {index}"),
            source,
        };
        let mut tee = Tee {
            inner: contents,
            hasher: Sha256::new(),
            zstd: zstd::stream::write::Encoder::new(Counter::default(), DEFAULT_ZSTD_LEVEL)
                .map_err(io_error)?,
        };
        let mut size = 0u64;
        for chunk in chunker.cut_stream(&mut tee) {
            let chunk = chunk.map_err(io_error)?;
            size += chunk.len() as u64;
            let id = ChunkId::of(&chunk);
            if ledger.claim(id) {
                ledger.add_chunk(chunk.len());
                if let Some(frame) = frames.push(id, &chunk)? {
                    ledger.add_frame(frame.compressed.len());
                }
            }
        }
        let Tee { hasher, zstd, .. } = tee;
        let zstd = zstd.finish().map_err(io_error)?.0;
        Ok(FileFacts {
            sha256: hasher.finalize().into(),
            size,
            zstd,
        })
    })?;
    if let Some(frame) = frames.finish()? {
        ledger.add_frame(frame.compressed.len());
    }
    Ok(read)
}
