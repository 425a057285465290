//! `push` and `pull`: move one image between a local store and a server,
//! sending only the chunks the other side lacks.
//!
//! Both are resumable: chunks travel in batches, and each batch is durable
//! on the receiving side before the next is sent, so a transfer killed at
//! any point and run again sends only what had not arrived. The manifest is
//! written last, so a half-transferred image is never visible.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;
use skiff_chunk::{compress_chunk, FrameBuilder};
use skiff_format::wire::write_chunk_record;
use skiff_format::{ChunkId, ChunkRef, ImageIndex, ImageRef};
use skiff_store::Store;

use crate::{Client, ClientError};

/// Ids per "which are missing" request.
const MISSING_BATCH: usize = 8192;
/// Chunks per upload or fetch request, at most; well under the server's limit.
const MAX_BATCH_CHUNKS: usize = skiff_format::wire::MAX_IDS_PER_REQUEST / 4;
/// Uncompressed bytes per upload or fetch request.
const TRANSFER_BATCH_BYTES: u64 = 8 << 20;

/// Told how a transfer advances; the CLI draws a bar with it.
pub trait TransferProgress: Sync {
    /// The chunks that will be sent and their uncompressed bytes.
    fn start(&self, chunks: u64, bytes: u64);
    /// `bytes` more (uncompressed) have arrived on the other side.
    fn advance(&self, bytes: u64);
}

/// A progress sink that ignores everything.
pub struct NoProgress;

impl TransferProgress for NoProgress {
    fn start(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
}

#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    pub image: String,
    /// Distinct chunks the image references.
    pub chunks: u64,
    /// Of those, the ones the receiving side lacked and that were sent.
    pub chunks_sent: u64,
    /// Their uncompressed bytes.
    pub bytes_sent: u64,
    /// Compressed bytes of chunks on the wire (record framing aside).
    pub wire_bytes: u64,
    /// Requests that carried chunks.
    pub batches: u64,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

pub(crate) fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Splits chunks into runs of about [`TRANSFER_BATCH_BYTES`], and of at
/// most [`MAX_BATCH_CHUNKS`] (an image of tiny files has many chunks per MiB).
fn batches(chunks: &[ChunkRef]) -> Vec<&[ChunkRef]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, chunk) in chunks.iter().enumerate() {
        if bytes >= TRANSFER_BATCH_BYTES || i - start == MAX_BATCH_CHUNKS {
            out.push(&chunks[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += u64::from(chunk.len);
    }
    if start < chunks.len() {
        out.push(&chunks[start..]);
    }
    out
}

/// Sends `image` from `store` to the server.
pub fn push(
    store: &Store,
    image: &ImageRef,
    client: &Client,
    progress: &dyn TransferProgress,
) -> Result<TransferReport, ClientError> {
    let started = Instant::now();
    let manifest = store.image(image)?;
    // Asked first: a refused upload of a large batch may surface as a broken
    // connection instead of the server's 401.
    if !client.access()?.write {
        return Err(ClientError::Unauthorized {
            server: client.server().to_owned(),
            what: "uploads",
        });
    }
    let encoded = store.index_bytes(&manifest.index.digest)?;
    let chunks = ImageIndex::decode(&encoded)?.distinct_chunks();

    let mut missing = Vec::new();
    for ask in chunks.chunks(MISSING_BATCH) {
        let ids: Vec<_> = ask.iter().map(|c| c.id).collect();
        let lacking: HashSet<_> = client.missing(&ids)?.into_iter().collect();
        missing.extend(ask.iter().filter(|c| lacking.contains(&c.id)).copied());
    }
    let bytes_sent: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
    progress.start(missing.len() as u64, bytes_sent);

    let mut report = TransferReport {
        image: image.to_string(),
        chunks: chunks.len() as u64,
        chunks_sent: missing.len() as u64,
        bytes_sent,
        wire_bytes: 0,
        batches: 0,
        elapsed: Duration::ZERO,
    };
    // One thread reads and compresses the next batch while this one uploads.
    std::thread::scope(|scope| -> Result<(), ClientError> {
        let (bodies, ready) = std::sync::mpsc::sync_channel(1);
        let batches = batches(&missing);
        scope.spawn(move || {
            for batch in batches {
                let body = upload_body(store, batch);
                let failed = body.is_err();
                if bodies.send(body).is_err() || failed {
                    return;
                }
            }
        });
        for body in ready {
            let (body, raw, wire) = body?;
            client.upload(body)?;
            report.wire_bytes += wire;
            report.batches += 1;
            progress.advance(raw);
        }
        Ok(())
    })?;

    client.put_index(&encoded)?;
    client.put_manifest(&manifest)?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// An upload body for `batch`, its raw and its compressed chunk bytes.
fn upload_body(store: &Store, batch: &[ChunkRef]) -> Result<(Vec<u8>, u64, u64), ClientError> {
    let compressed: Vec<_> = batch
        .par_iter()
        .map(|c| Ok((c.id, compress_chunk(&store.read_chunk(&c.id)?)?)))
        .collect::<Result<_, ClientError>>()?;
    let wire: usize = compressed.iter().map(|(_, w)| w.len()).sum();
    let mut body = Vec::with_capacity(wire + compressed.len() * 37);
    for (id, chunk) in &compressed {
        write_chunk_record(&mut body, id, chunk);
    }
    let raw = batch.iter().map(|c| u64::from(c.len)).sum();
    Ok((body, raw, wire as u64))
}

/// Fetches `image` from the server into `store`.
pub fn pull(
    client: &Client,
    store: &Store,
    image: &ImageRef,
    progress: &dyn TransferProgress,
) -> Result<TransferReport, ClientError> {
    let started = Instant::now();
    let (manifest, encoded, index) = client.image(image)?;
    let chunks = index.distinct_chunks();
    let missing = missing_in(store, &chunks)?;
    let bytes_sent: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
    progress.start(missing.len() as u64, bytes_sent);

    let mut wire_bytes = 0;
    let batches_done = store_chunks(store, &missing, progress, &mut |ids, each| {
        client.fetch(ids, |id, data, wire_len| {
            wire_bytes += wire_len as u64;
            each(id, &data)
        })
    })?;
    store.put_index(&encoded)?;
    store.put_manifest(&manifest)?;
    Ok(TransferReport {
        image: image.to_string(),
        chunks: chunks.len() as u64,
        chunks_sent: missing.len() as u64,
        bytes_sent,
        wire_bytes,
        batches: batches_done,
        elapsed: started.elapsed(),
    })
}

/// Where a fetch hands each verified chunk.
pub(crate) type ChunkSink<'a> = dyn FnMut(ChunkId, &[u8]) -> Result<(), ClientError> + 'a;

/// Fetches one batch of ids into a [`ChunkSink`].
pub(crate) type BatchFetch<'a> =
    dyn FnMut(&[ChunkId], &mut ChunkSink) -> Result<(), ClientError> + 'a;

/// The chunks of `chunks` that `store` lacks.
pub(crate) fn missing_in(store: &Store, chunks: &[ChunkRef]) -> Result<Vec<ChunkRef>, ClientError> {
    let mut missing = Vec::new();
    for chunk in chunks {
        if !store.contains_chunk(&chunk.id)? {
            missing.push(*chunk);
        }
    }
    Ok(missing)
}

/// Fetches `missing` into `store` in batches, each durable before the next
/// is asked for (a rerun skips them); returns how many batches it took.
/// `fetch` gets a batch's ids and hands each verified chunk on.
pub(crate) fn store_chunks(
    store: &Store,
    missing: &[ChunkRef],
    progress: &dyn TransferProgress,
    fetch: &mut BatchFetch,
) -> Result<u64, ClientError> {
    let config = store.config();
    let mut writer = store.pack_writer()?;
    let mut batches_done = 0;
    for batch in batches(missing) {
        let mut frames = FrameBuilder::new(config.frame_size as usize, config.zstd_level)?;
        let ids: Vec<_> = batch.iter().map(|c| c.id).collect();
        fetch(&ids, &mut |id, data| {
            progress.advance(data.len() as u64);
            if let Some(frame) = frames.push(id, data)? {
                writer.append(&frame)?;
            }
            Ok(())
        })?;
        if let Some(frame) = frames.finish()? {
            writer.append(&frame)?;
        }
        // This batch stays even if a later one fails: a rerun skips it.
        writer.persist()?;
        batches_done += 1;
    }
    writer.finish()?;
    Ok(batches_done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_format::ChunkId;

    fn refs(lens: &[u32]) -> Vec<ChunkRef> {
        lens.iter()
            .enumerate()
            .map(|(i, &len)| ChunkRef {
                id: ChunkId::of(&i.to_le_bytes()),
                len,
            })
            .collect()
    }

    #[test]
    fn batches_cut_on_bytes_and_on_count() {
        let big = refs(&[4 << 20; 5]);
        let sizes: Vec<_> = batches(&big).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
        let tiny = refs(&vec![10; MAX_BATCH_CHUNKS * 2 + 1]);
        let sizes: Vec<_> = batches(&tiny).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, [MAX_BATCH_CHUNKS, MAX_BATCH_CHUNKS, 1]);
        assert!(batches(&[]).is_empty());
    }
}
