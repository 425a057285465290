//! Records of converted layers, kept in the store by diff_id: an image that
//! shares a layer with one converted before applies the record instead of
//! downloading, decompressing and chunking the layer again (as `docker pull`
//! skips layers it has). gc drops a record once any chunk it names is freed.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use skiff_format::{ChunkRef, Metadata};
use skiff_store::LayerRecord;

use crate::merge::{Content, EntryKind};

/// First byte of a record payload.
const RECORD_VERSION: u8 = 1;

/// One tar entry of a layer, as it was applied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RecordedEntry {
    pub path: Vec<u8>,
    pub meta: Metadata,
    pub kind: RecordedKind,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum RecordedKind {
    Dir,
    File { size: u64, chunks: Vec<ChunkRef> },
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

/// A layer being converted: its entries, with file contents still in
/// the chunk workers' hands (by slot) until the conversion ends.
#[derive(Debug, Default)]
pub(crate) struct LayerRecorder {
    entries: Vec<(RecordedEntry, Option<usize>)>,
}

impl LayerRecorder {
    pub(crate) fn record(&mut self, path: &[u8], meta: &Metadata, kind: &EntryKind) {
        let (kind, slot) = match kind {
            EntryKind::Dir => (RecordedKind::Dir, None),
            EntryKind::File(Content::Empty, _) => (
                RecordedKind::File {
                    size: 0,
                    chunks: Vec::new(),
                },
                None,
            ),
            EntryKind::File(Content::Slot(slot), size) => (
                RecordedKind::File {
                    size: *size,
                    chunks: Vec::new(),
                },
                Some(*slot),
            ),
            EntryKind::Symlink(target) => (RecordedKind::Symlink(target.clone()), None),
            EntryKind::HardLink(target) => (RecordedKind::HardLink(target.clone()), None),
            EntryKind::CharDevice(major, minor) => (RecordedKind::CharDevice(*major, *minor), None),
            EntryKind::BlockDevice(major, minor) => {
                (RecordedKind::BlockDevice(*major, *minor), None)
            }
            EntryKind::Fifo => (RecordedKind::Fifo, None),
        };
        self.entries.push((
            RecordedEntry {
                path: path.to_vec(),
                meta: meta.clone(),
                kind,
            },
            slot,
        ));
    }

    /// The finished record; `chunks_of` gives a slot's chunk list.
    pub(crate) fn finish(self, chunks_of: &dyn Fn(usize) -> Vec<ChunkRef>) -> LayerRecord {
        let mut seen = HashSet::new();
        let mut ids = Vec::new();
        let entries: Vec<RecordedEntry> = self
            .entries
            .into_iter()
            .map(|(mut entry, slot)| {
                if let (Some(slot), RecordedKind::File { chunks, .. }) = (slot, &mut entry.kind) {
                    *chunks = chunks_of(slot);
                    ids.extend(chunks.iter().map(|c| c.id).filter(|id| seen.insert(*id)));
                }
                entry
            })
            .collect();
        let mut payload = vec![RECORD_VERSION];
        payload.extend(postcard::to_stdvec(&entries).expect("postcard encoding into a Vec"));
        LayerRecord {
            chunks: ids,
            payload,
        }
    }
}

/// The entries of a record, or `None` if it is of another version or broken
/// (the layer is then converted from its blob as if never seen).
pub(crate) fn decode(record: &LayerRecord) -> Option<Vec<RecordedEntry>> {
    let (&version, body) = record.payload.split_first()?;
    if version != RECORD_VERSION {
        return None;
    }
    let entries: Vec<RecordedEntry> = postcard::from_bytes(body).ok()?;
    let consistent = entries.iter().all(|e| match &e.kind {
        RecordedKind::File { size, chunks } => {
            chunks.iter().map(|c| u64::from(c.len)).sum::<u64>() == *size
        }
        _ => true,
    });
    consistent.then_some(entries)
}

/// Turns a recorded entry back into what the merge applies; file contents
/// get a slot whose chunks are known already.
pub(crate) fn entry_kind(
    kind: RecordedKind,
    next_slot: &mut usize,
    results: &mut dyn FnMut(usize, BTreeMap<u32, Vec<ChunkRef>>),
) -> EntryKind {
    match kind {
        RecordedKind::Dir => EntryKind::Dir,
        RecordedKind::File { size: 0, .. } => EntryKind::File(Content::Empty, 0),
        RecordedKind::File { size, chunks } => {
            let slot = *next_slot;
            *next_slot += 1;
            results(slot, BTreeMap::from([(0, chunks)]));
            EntryKind::File(Content::Slot(slot), size)
        }
        RecordedKind::Symlink(target) => EntryKind::Symlink(target),
        RecordedKind::HardLink(target) => EntryKind::HardLink(target),
        RecordedKind::CharDevice(major, minor) => EntryKind::CharDevice(major, minor),
        RecordedKind::BlockDevice(major, minor) => EntryKind::BlockDevice(major, minor),
        RecordedKind::Fifo => EntryKind::Fifo,
    }
}
