use std::fs::File;
use std::io::Write;

use rocksdb::WriteBatch;
use skiff_chunk::Frame;
use skiff_format::ChunkId;

use crate::error::IoContext;
use crate::layout::{pack_meta_key, ChunkLocation, CF_CHUNKS, CF_META, META_NEXT_PACK};
use crate::{Store, StoreError};

/// A pack is closed and a new one started past this size.
const PACK_ROLLOVER_BYTES: u64 = 1 << 30;
/// Frames are made durable and reachable in batches of about this many bytes.
const COMMIT_EVERY_BYTES: u64 = 64 << 20;

struct OpenPack {
    id: u32,
    file: File,
    len: u64,
}

/// What a writer added to the store.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteSummary {
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub frame_bytes: u64,
}

/// Appends frames to new pack files and makes their chunks reachable.
///
/// Nothing is visible until [`PackWriter::commit`] (also called every ~64 MiB);
/// a writer dropped without [`PackWriter::finish`] removes everything it added,
/// so a failed command leaves the store as it was.
pub struct PackWriter<'s> {
    store: &'s Store,
    pack: Option<OpenPack>,
    pending: Vec<(ChunkId, ChunkLocation)>,
    pending_bytes: u64,
    /// Chunks and packs this writer made reachable: undone by [`PackWriter::abort`].
    added_chunks: Vec<ChunkId>,
    created_packs: Vec<u32>,
    summary: WriteSummary,
    finished: bool,
}

impl<'s> PackWriter<'s> {
    pub(crate) fn new(store: &'s Store) -> Self {
        PackWriter {
            store,
            pack: None,
            pending: Vec::new(),
            pending_bytes: 0,
            added_chunks: Vec::new(),
            created_packs: Vec::new(),
            summary: WriteSummary::default(),
            finished: false,
        }
    }

    /// Appends a frame whose chunks the store does not hold yet.
    pub fn append(&mut self, frame: &Frame) -> Result<(), StoreError> {
        if self
            .pack
            .as_ref()
            .is_none_or(|p| p.len >= PACK_ROLLOVER_BYTES)
        {
            self.commit()?;
            self.start_pack()?;
        }
        let pack = self.pack.as_mut().expect("a pack was just opened");
        let frame_offset = pack.len;
        pack.file
            .write_all(&frame.compressed)
            .context(|| format!("writing pack {}", pack.id))?;
        pack.len += frame.compressed.len() as u64;
        for entry in &frame.entries {
            self.pending.push((
                entry.id,
                ChunkLocation {
                    pack: pack.id,
                    frame_offset,
                    frame_len: frame.compressed.len() as u32,
                    frame_raw_len: frame.uncompressed_len,
                    offset: entry.offset,
                    len: entry.len,
                },
            ));
            self.summary.chunks += 1;
            self.summary.chunk_bytes += u64::from(entry.len);
        }
        self.summary.frame_bytes += frame.compressed.len() as u64;
        self.pending_bytes += frame.compressed.len() as u64;
        if self.pending_bytes >= COMMIT_EVERY_BYTES {
            self.commit()?;
        }
        Ok(())
    }

    fn start_pack(&mut self) -> Result<(), StoreError> {
        let store = self.store;
        let meta = store.cf(CF_META);
        let id = store.next_pack_id()?;
        // Reserve the id and register the empty pack before creating its file:
        // recovery removes pack files the database does not know.
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, META_NEXT_PACK, u64::from(id + 1).to_le_bytes());
        batch.put_cf(meta, pack_meta_key(id), 0u64.to_le_bytes());
        store.write_batch(batch)?;
        self.created_packs.push(id);
        let path = store.pack_path(id);
        let file = File::options()
            .create_new(true)
            .append(true)
            .open(&path)
            .context(|| format!("creating {}", path.display()))?;
        crate::store::sync_dir(path.parent().expect("packs live in a directory"))?;
        self.pack = Some(OpenPack { id, file, len: 0 });
        Ok(())
    }

    /// Makes everything appended so far durable and reachable.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        let Some(pack) = self.pack.as_ref() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        pack.file
            .sync_data()
            .context(|| format!("syncing pack {}", pack.id))?;
        let mut batch = WriteBatch::default();
        let chunks = self.store.cf(CF_CHUNKS);
        for (id, loc) in &self.pending {
            batch.put_cf(chunks, id.as_bytes(), loc.encode());
        }
        batch.put_cf(
            self.store.cf(CF_META),
            pack_meta_key(pack.id),
            pack.len.to_le_bytes(),
        );
        self.store.write_batch(batch)?;
        self.added_chunks
            .extend(self.pending.drain(..).map(|(id, _)| id));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Commits, and makes everything written so far permanent: a later drop
    /// or [`PackWriter::abort`] only removes what is appended after this.
    /// For long-lived writers (a server, a resumable pull) whose earlier
    /// batches are complete on their own.
    pub fn persist(&mut self) -> Result<(), StoreError> {
        self.commit()?;
        self.added_chunks.clear();
        // Packs stay registered; a pack created by this writer is now kept.
        self.created_packs.clear();
        Ok(())
    }

    /// Commits and keeps everything written.
    pub fn finish(mut self) -> Result<WriteSummary, StoreError> {
        self.commit()?;
        self.finished = true;
        Ok(self.summary)
    }

    /// Keeps what was committed and forgets frames appended since (the
    /// bytes stay past the pack's committed length and are cut off at the
    /// next open): for a writer whose last append failed part-way.
    pub fn keep_committed(mut self) {
        self.pending.clear();
        self.finished = true;
    }

    /// Removes everything this writer added.
    pub fn abort(mut self) -> Result<(), StoreError> {
        self.undo()
    }

    fn undo(&mut self) -> Result<(), StoreError> {
        self.finished = true;
        self.pack = None;
        self.pending.clear();
        let mut batch = WriteBatch::default();
        for id in &self.added_chunks {
            batch.delete_cf(self.store.cf(CF_CHUNKS), id.as_bytes());
        }
        for pack in &self.created_packs {
            batch.delete_cf(self.store.cf(CF_META), pack_meta_key(*pack));
        }
        self.store.write_batch(batch)?;
        for pack in self.created_packs.drain(..) {
            self.store.forget_pack(pack);
            let path = self.store.pack_path(pack);
            std::fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        }
        self.added_chunks.clear();
        Ok(())
    }
}

impl Drop for PackWriter<'_> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.undo() {
                tracing::warn!("could not undo an unfinished write (gc will reclaim it): {e}");
            }
        }
    }
}
