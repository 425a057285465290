//! Mark and sweep: chunks and indexes no image references are deleted, then
//! packs holding dead frames are rewritten with only their live frames.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;

use rocksdb::{IteratorMode, WriteBatch};
use serde::Serialize;
use skiff_format::{ChunkId, IndexDigest};

use crate::error::IoContext;
use crate::layout::{
    pack_meta_key, ChunkLocation, LayerRecord, CF_CHUNKS, CF_INDEXES, CF_LAYERS, CF_META,
    META_NEXT_PACK,
};
use crate::{Store, StoreError};

/// The live chunks of one frame.
type FrameChunks = Vec<(ChunkId, ChunkLocation)>;

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub chunks_removed: u64,
    pub indexes_removed: u64,
    /// Layer records dropped because no image uses their layer any more.
    pub layers_removed: u64,
    pub packs_rewritten: u64,
    /// Pack bytes on disk before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl Store {
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        // Readers opened before now may point at packs gc deletes: wait for none.
        let _no_readers = crate::store::readers_lock(
            self.root(),
            crate::store::LockKind::Exclusive,
            "other skiff commands are reading it",
        )?;
        let mut report = GcReport {
            bytes_before: self.pack_bytes()?,
            ..Default::default()
        };

        // Mark.
        let mut live_indexes = HashSet::new();
        let mut live_chunks = HashSet::new();
        let mut live_layers = HashSet::new();
        for manifest in self.images()? {
            let index = self.index(&manifest.index.digest)?;
            live_chunks.extend(index.chunk_refs().map(|c| c.id));
            live_indexes.insert(manifest.index.digest);
            live_layers.extend(manifest.source.diff_ids);
        }
        // A layer record lives while an image made from that layer does, and
        // keeps its chunks (files later layers deleted, too) alive with it.
        let mut batch = WriteBatch::default();
        for item in self.db.iterator_cf(self.cf(CF_LAYERS), IteratorMode::Start) {
            let (key, value) = item?;
            match LayerRecord::decode(&value) {
                Ok(record) if live_layers.contains(String::from_utf8_lossy(&key).as_ref()) => {
                    live_chunks.extend(record.chunks);
                }
                _ => {
                    batch.delete_cf(self.cf(CF_LAYERS), &key);
                    report.layers_removed += 1;
                }
            }
        }

        // Sweep the database.
        for item in self
            .db
            .iterator_cf(self.cf(CF_INDEXES), IteratorMode::Start)
        {
            let (key, _) = item?;
            if !live_indexes.contains(&IndexDigest::from_slice(&key)?) {
                batch.delete_cf(self.cf(CF_INDEXES), &key);
                report.indexes_removed += 1;
            }
        }
        let mut live_by_frame: BTreeMap<(u32, u64), Vec<(ChunkId, ChunkLocation)>> =
            BTreeMap::new();
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (key, value) = item?;
            let id = ChunkId::from_slice(&key)?;
            if live_chunks.contains(&id) {
                let loc = ChunkLocation::decode(&value)?;
                live_by_frame
                    .entry(loc.frame_key())
                    .or_default()
                    .push((id, loc));
            } else {
                batch.delete_cf(self.cf(CF_CHUNKS), &key);
                report.chunks_removed += 1;
            }
        }
        self.write_batch(batch)?;

        // Compact: a pack whose live frames are smaller than the file is
        // rewritten; frames are copied verbatim, without recompression.
        for (pack, len) in self.committed_packs()? {
            let frames: Vec<&FrameChunks> = live_by_frame
                .range((pack, 0)..=(pack, u64::MAX))
                .map(|(_, chunks)| chunks)
                .collect();
            let live: u64 = frames
                .iter()
                .map(|chunks| u64::from(chunks[0].1.frame_len))
                .sum();
            if live == len {
                continue;
            }
            tracing::debug!(pack, len, live, "rewriting pack");
            self.rewrite_pack(pack, &frames)?;
            report.packs_rewritten += 1;
        }
        report.bytes_after = self.pack_bytes()?;
        Ok(report)
    }

    fn rewrite_pack(&self, old: u32, frames: &[&FrameChunks]) -> Result<(), StoreError> {
        let meta = self.cf(CF_META);
        let mut batch = WriteBatch::default();
        if frames.is_empty() {
            batch.delete_cf(meta, pack_meta_key(old));
            self.write_batch(batch)?;
        } else {
            let new = self.next_pack_id()?;
            // The new pack is unknown to the database until it is complete and
            // synced; a crash before that leaves a file recovery removes.
            let path = self.pack_path(new);
            let mut file = File::options()
                .create_new(true)
                .write(true)
                .open(&path)
                .context(|| format!("creating {}", path.display()))?;
            let mut len = 0u64;
            for chunks in frames {
                let raw = self.read_raw_frame(&chunks[0].1)?;
                file.write_all(&raw)
                    .context(|| format!("writing {}", path.display()))?;
                for (id, loc) in chunks.iter() {
                    let moved = ChunkLocation {
                        pack: new,
                        frame_offset: len,
                        ..*loc
                    };
                    batch.put_cf(self.cf(CF_CHUNKS), id.as_bytes(), moved.encode());
                }
                len += raw.len() as u64;
            }
            file.sync_all()
                .context(|| format!("syncing {}", path.display()))?;
            crate::store::sync_dir(path.parent().expect("packs live in a directory"))?;
            batch.put_cf(meta, META_NEXT_PACK, u64::from(new + 1).to_le_bytes());
            batch.put_cf(meta, pack_meta_key(new), len.to_le_bytes());
            batch.delete_cf(meta, pack_meta_key(old));
            self.write_batch(batch)?;
        }
        self.forget_pack(old);
        let path = self.pack_path(old);
        std::fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
        Ok(())
    }
}
