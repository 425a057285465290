//! Records of converted layers, kept in the store by diff_id: an image that
//! shares a layer with one converted before applies the record instead of
//! downloading, decompressing and chunking the layer again (as `docker pull`
//! skips layers it has). gc drops a record once any chunk it names is freed.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use skiff_format::{ChunkId, ChunkRef, Metadata};
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
        let mut chunks = Vec::new();
        let entries: Vec<RecordedEntry> = self
            .entries
            .into_iter()
            .map(|(mut entry, slot)| {
                if let (Some(slot), RecordedKind::File { chunks, .. }) = (slot, &mut entry.kind) {
                    *chunks = chunks_of(slot);
                }
                entry
            })
            .collect();
        // The set is what the store needs; a push orders the layer from the entries.
        for entry in &entries {
            if let RecordedKind::File { chunks: file, .. } = &entry.kind {
                chunks.extend(file.iter().map(|c| c.id).filter(|id| seen.insert(*id)));
            }
        }
        let mut payload = vec![RECORD_VERSION];
        payload.extend(postcard::to_stdvec(&entries).expect("postcard encoding into a Vec"));
        LayerRecord { chunks, payload }
    }
}

/// A layer's distinct chunks in its own path order, and where in that
/// order large directories begin and end.
#[derive(Debug, PartialEq, Eq)]
pub struct PathOrder {
    pub chunks: Vec<ChunkId>,
    /// Ascending positions in `chunks` (never 0 nor the end) where a
    /// directory begins or ends whose files bring at least the asked
    /// number of bytes of chunks not seen before in this order.
    pub dir_bounds: Vec<u32>,
}

/// A converted layer's path order, from its record, with the bounds of
/// directories of at least `large_dir_raw` bytes; `None` for a record of
/// another version or a broken one.
pub fn layer_path_order(record: &LayerRecord, large_dir_raw: u64) -> Option<PathOrder> {
    decode(record).map(|entries| path_order(&entries, large_dir_raw))
}

/// The distinct chunks of a layer's files in the layer's own path order
/// (depth first, names sorted; a path the tar holds twice in its tar
/// order): a function of the layer alone, whatever order its tar writer
/// chose. And the bounds of each directory whose files' chunks, first seen
/// there in this order, hold at least `large_dir_raw` bytes. Every store
/// frames a push by this at push time, so any change to it changes the
/// registry blobs every store makes (and uploads them again).
fn path_order(entries: &[RecordedEntry], large_dir_raw: u64) -> PathOrder {
    let mut files: Vec<(Vec<&[u8]>, &[ChunkRef])> = entries
        .iter()
        .filter_map(|e| match &e.kind {
            RecordedKind::File { chunks, .. } => Some((components(&e.path), chunks.as_slice())),
            _ => None,
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut seen = HashSet::new();
    // Each file's chunks first seen in this order.
    let new_chunks: Vec<Vec<ChunkRef>> = files
        .iter()
        .map(|(_, chunks)| {
            chunks
                .iter()
                .filter(|c| seen.insert(c.id))
                .copied()
                .collect()
        })
        .collect();
    let mut order = PathOrder {
        chunks: Vec::new(),
        dir_bounds: Vec::new(),
    };
    // The directories the last file is in, outermost first: where each
    // began in `order.chunks` and the bytes of its chunks so far. Depth
    // first, a directory's files are contiguous, so one pass sizes them all.
    let mut open: Vec<(u32, u64)> = Vec::new();
    let mut before: &[&[u8]] = &[];
    for ((path, _), chunks) in files.iter().zip(&new_chunks) {
        let dirs = &path[..path.len().saturating_sub(1)];
        let common = dirs.iter().zip(before).take_while(|(a, b)| a == b).count();
        let at = order.chunks.len() as u32;
        close_dirs(&mut open, common, at, large_dir_raw, &mut order.dir_bounds);
        open.resize(dirs.len(), (at, 0));
        if let Some(innermost) = open.last_mut() {
            innermost.1 += chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
        }
        order.chunks.extend(chunks.iter().map(|c| c.id));
        before = dirs;
    }
    let end = order.chunks.len() as u32;
    close_dirs(&mut open, 0, end, large_dir_raw, &mut order.dir_bounds);
    // Neither the layer's first chunk nor its end is a bound.
    order.dir_bounds.sort_unstable();
    order.dir_bounds.dedup();
    order.dir_bounds.retain(|&at| at > 0 && at < end);
    order
}

/// Closes the open directories deeper than `depth` at position `at`: a
/// large one's bounds go to `bounds`, its bytes to its parent's.
fn close_dirs(
    open: &mut Vec<(u32, u64)>,
    depth: usize,
    at: u32,
    large_dir_raw: u64,
    bounds: &mut Vec<u32>,
) {
    while open.len() > depth {
        let Some((began, raw)) = open.pop() else {
            break;
        };
        if raw >= large_dir_raw {
            bounds.extend([began, at]);
        }
        if let Some(parent) = open.last_mut() {
            parent.1 += raw;
        }
    }
}

/// A path's names, as the merge reads them (no empty names, no `.`, `..`
/// going up), so `./usr/x` and `usr//y` sort in one tree.
fn components(path: &[u8]) -> Vec<&[u8]> {
    let mut names = Vec::new();
    for name in path.split(|&b| b == b'/') {
        match name {
            b"" | b"." => {}
            b".." => {
                names.pop();
            }
            name => names.push(name),
        }
    }
    names
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, chunks: &[ChunkId]) -> RecordedEntry {
        RecordedEntry {
            path: path.as_bytes().to_vec(),
            meta: Metadata::default(),
            kind: RecordedKind::File {
                size: chunks.len() as u64,
                chunks: chunks.iter().map(|&id| ChunkRef { id, len: 1 }).collect(),
            },
        }
    }

    #[test]
    fn a_layers_path_order_is_the_same_whatever_the_tar_order() {
        let [a, b, c, d] = [1u8, 2, 3, 4].map(|i| ChunkId::of(&[i]));
        // Written in directory-listing order; "usr/a-c" sorts after the
        // subtree "usr/a/..." (depth first), though '-' < '/' bytewise.
        let entries = vec![
            file("usr/b", &[d, a]),
            file("usr/a-c", &[c]),
            RecordedEntry {
                path: b"usr/a".to_vec(),
                meta: Metadata::default(),
                kind: RecordedKind::Dir,
            },
            file("usr/a/z", &[b, a]),
        ];
        assert_eq!(path_order(&entries, u64::MAX).chunks, vec![b, a, c, d]);
        let mut reversed = entries.clone();
        reversed.reverse();
        assert_eq!(path_order(&reversed, u64::MAX).chunks, vec![b, a, c, d]);
    }

    #[test]
    fn large_directories_bound_runs_of_the_path_order() {
        let id = |i: u32| ChunkId::of(&i.to_le_bytes());
        let mib = 1 << 20;
        let sized = |path: &str, ids: &[u32]| RecordedEntry {
            path: path.as_bytes().to_vec(),
            meta: Metadata::default(),
            kind: RecordedKind::File {
                size: u64::from(mib) * ids.len() as u64,
                chunks: ids
                    .iter()
                    .map(|&i| ChunkRef {
                        id: id(i),
                        len: mib,
                    })
                    .collect(),
            },
        };
        let large = 8 * u64::from(mib);
        let entries = vec![
            sized("usr/bin/a", &[0, 1]),
            // 9 MiB of chunks first seen here: large.
            sized("usr/share/pkg/x", &[2, 3, 4, 5]),
            sized("usr/share/pkg/y/z", &[6, 7, 8, 9, 10]),
            // 7 MiB new and 1 MiB seen before: not large.
            sized("usr/share/repeat/w", &[11, 12, 13, 14, 0]),
            sized("usr/share/repeat/x", &[15, 16, 17]),
            sized("usr/share/tail", &[18]),
        ];
        let order = path_order(&entries, large);
        assert_eq!(order.chunks, (0..19).map(id).collect::<Vec<_>>());
        // usr/share (17 MiB) and usr/share/pkg begin at chunk 2; pkg ends at 11.
        assert_eq!(order.dir_bounds, vec![2, 11]);
        // A large directory followed by chunks seen before only ends at the end: no bound there.
        let mut ending = entries[..3].to_vec();
        ending.push(sized("usr/zzz", &[0]));
        assert_eq!(path_order(&ending, large).dir_bounds, vec![2]);
        assert!(path_order(&entries, u64::MAX).dir_bounds.is_empty());
        // Leaving one large directory and entering the next across a file
        // with no new chunks: one bound there. Paths as tars write them
        // ("./", "//") sort as the merge reads them; a file at the root.
        let entries = vec![
            sized("./a/big/f", &[0, 1, 2, 3, 4, 5, 6, 7, 8]),
            sized("b/empty", &[]),
            sized("c//big/g", &[9, 10, 11, 12, 13, 14, 15, 16, 17]),
            sized("./c/small", &[18]),
            sized("z", &[19]),
        ];
        let order = path_order(&entries, large);
        assert_eq!(order.chunks, (0..20).map(id).collect::<Vec<_>>());
        // a and a/big end at 9, c and c/big begin there; c/big ends at 18, c at 19.
        assert_eq!(order.dir_bounds, vec![9, 18, 19]);
    }
}
