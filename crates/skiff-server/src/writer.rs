//! The one thread that appends uploaded chunks to the store's packs.
//!
//! A store has one pack writer at a time, and a long-lived one keeps packs
//! large instead of one small pack per upload. Each upload is made durable
//! (`persist`) before its request is answered.

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;

use skiff_chunk::FrameBuilder;
use skiff_format::wire::UploadOutcome;
use skiff_format::ChunkId;
use skiff_store::{PackWriter, Store, StoreError};
use tokio::sync::oneshot;

use crate::chunks::UploadSlot;

struct Job {
    chunks: Vec<(ChunkId, Vec<u8>)>,
    reply: oneshot::Sender<Result<UploadOutcome, StoreError>>,
    /// Held until the chunks are written: bounds the memory queued uploads take.
    _slot: UploadSlot,
}

pub struct ChunkWriter {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl ChunkWriter {
    pub fn start(store: Arc<Store>) -> Result<Self, StoreError> {
        // Fail at start-up, not at the first upload, on a read-only store.
        drop(store.pack_writer()?);
        let (jobs, receiver) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("skiff-chunk-writer".into())
            .spawn(move || write_loop(&store, &receiver))
            .map_err(|source| StoreError::Io {
                context: "starting the chunk writer thread".into(),
                source,
            })?;
        Ok(ChunkWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Stores verified chunks; answers once they are durable.
    pub async fn write(
        &self,
        chunks: Vec<(ChunkId, Vec<u8>)>,
        slot: UploadSlot,
    ) -> Result<UploadOutcome, StoreError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Corrupt("the chunk writer has stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(Job {
                chunks,
                reply,
                _slot: slot,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

impl Drop for ChunkWriter {
    /// Lets queued uploads finish, then closes the pack.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(store: &Store, jobs: &std::sync::mpsc::Receiver<Job>) {
    let mut writer = None;
    while let Ok(job) = jobs.recv() {
        let result = write_job(store, &mut writer, &job.chunks);
        if let Err(e) = &result {
            tracing::error!("storing uploaded chunks: {e}");
            // What was committed stays: those chunks were verified, and other
            // clients may already count on them. The uncommitted rest is
            // dropped, and the next job starts a fresh pack rather than trust
            // a half-written one.
            if let Some(writer) = writer.take() {
                writer.keep_committed();
            }
        }
        let _ = job.reply.send(result);
    }
    if let Some(Err(e)) = writer.map(PackWriter::finish) {
        tracing::error!("closing the chunk writer: {e}");
    }
}

fn write_job<'s>(
    store: &'s Store,
    writer: &mut Option<PackWriter<'s>>,
    chunks: &[(ChunkId, Vec<u8>)],
) -> Result<UploadOutcome, StoreError> {
    let config = store.config();
    let writer = match writer {
        Some(writer) => writer,
        None => writer.insert(store.pack_writer()?),
    };
    let mut outcome = UploadOutcome {
        received: chunks.len() as u64,
        ..UploadOutcome::default()
    };
    let mut frames = FrameBuilder::new(config.frame_size as usize, config.zstd_level)?;
    let mut seen = HashSet::new();
    for (id, data) in chunks {
        // Another client may have uploaded it since this one asked what was missing.
        if !seen.insert(*id) || store.contains_chunk(id)? {
            continue;
        }
        outcome.stored += 1;
        outcome.stored_bytes += data.len() as u64;
        if let Some(frame) = frames.push(*id, data)? {
            writer.append(&frame)?;
        }
    }
    if let Some(frame) = frames.finish()? {
        writer.append(&frame)?;
    }
    writer.persist()?;
    Ok(outcome)
}
