//! Recording a startup profile: every read the kernel sends, reduced to the
//! chunks it touched, in the order they were first touched.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use fuser::INodeNo;
use skiff_format::{ProfileRange, StartupProfile, MAX_PROFILE_RANGES};

use crate::tree::ImageTree;

/// Granularity of the `read_bytes` count.
const PAGE: u64 = 4096;

#[derive(Default)]
pub struct Recorder {
    /// Checked first on every read: a mount that does not record takes no lock.
    active: AtomicBool,
    state: Mutex<Option<Recording>>,
}

#[derive(Default)]
struct Recording {
    seen: HashSet<(u64, usize)>,
    /// (inode, chunk position) in first-access order.
    order: Vec<(u64, usize)>,
    pages: HashSet<(u64, u64)>,
}

impl Recorder {
    pub fn recording() -> Recorder {
        Recorder {
            active: AtomicBool::new(true),
            state: Mutex::new(Some(Recording::default())),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Notes a read of bytes `offset..offset + len` of `ino`, which covers
    /// chunks `first..first + count`.
    pub fn note(&self, ino: INodeNo, first: usize, count: usize, offset: u64, len: u64) {
        if !self.is_recording() {
            return;
        }
        let mut state = self.state.lock().expect("recorder poisoned");
        let Some(recording) = state.as_mut() else {
            return;
        };
        for position in first..first + count {
            if recording.seen.insert((ino.0, position)) {
                recording.order.push((ino.0, position));
            }
        }
        let end = offset.saturating_add(len);
        for page in offset / PAGE..end.div_ceil(PAGE) {
            recording.pages.insert((ino.0, page));
        }
    }

    /// Stops recording and returns what was read, or `None` when this
    /// mount was not recording (or was asked before).
    pub fn finish(&self, tree: &ImageTree, command: Vec<String>) -> Option<StartupProfile> {
        self.active.store(false, Ordering::Relaxed);
        let recording = self.state.lock().expect("recorder poisoned").take()?;
        let wanted: HashSet<u64> = recording.order.iter().map(|(ino, _)| *ino).collect();
        // A hard-linked file goes by its first path. A path that is not
        // UTF-8 cannot be named in the JSON profile; its chunks are then
        // fetched on demand as without a profile.
        let mut paths: HashMap<u64, String> = HashMap::new();
        for (path, ino) in tree.index().walk() {
            if wanted.contains(&ino) && !paths.contains_key(&ino) {
                if let Ok(path) = String::from_utf8(path) {
                    paths.insert(ino, path);
                }
            }
        }
        let mut ranges: Vec<ProfileRange> = Vec::new();
        for (ino, position) in recording.order {
            let Some(path) = paths.get(&ino) else {
                continue;
            };
            let position = position as u32;
            let extends_last = ranges
                .last()
                .is_some_and(|last| last.path == *path && last.first + last.count == position);
            // A store refuses more; the start's first ranges matter most.
            if !extends_last && ranges.len() == MAX_PROFILE_RANGES {
                break;
            }
            match ranges.last_mut() {
                Some(last) if extends_last => last.count += 1,
                _ => ranges.push(ProfileRange {
                    path: path.clone(),
                    first: position,
                    count: 1,
                }),
            }
        }
        Some(StartupProfile {
            command,
            read_bytes: recording.pages.len() as u64 * PAGE,
            ranges,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::tree::tests::tree;

    #[test]
    fn a_recording_keeps_first_touches_in_order_and_ends_once() {
        let tree = tree();
        let recorder = Recorder::recording();
        assert!(recorder.is_recording());
        // Chunks 1 and 2 of /a, then chunk 0, then all three again.
        recorder.note(INodeNo(2), 1, 2, 100, 250);
        recorder.note(INodeNo(2), 0, 1, 0, 100);
        recorder.note(INodeNo(2), 0, 3, 0, 350);
        let profile = recorder.finish(&tree, vec!["cat".into()]).unwrap();
        let ranges: Vec<(&str, u32, u32)> = profile
            .ranges
            .iter()
            .map(|r| (r.path.as_str(), r.first, r.count))
            .collect();
        assert_eq!(ranges, [("a", 1, 2), ("a", 0, 1)]);
        assert_eq!(profile.read_bytes, PAGE);
        assert_eq!(profile.command, ["cat"]);
        let order = profile.chunk_order(tree.index()).unwrap();
        let ids: Vec<_> = tree
            .index()
            .inode(2)
            .map(|_| tree.chunks_from(INodeNo(2), 0))
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(order, [ids[1], ids[2], ids[0]]);
        // Finished: nothing more is noted, and a second finish has nothing.
        assert!(!recorder.is_recording());
        recorder.note(INodeNo(2), 0, 1, 0, 1);
        assert!(recorder.finish(&tree, Vec::new()).is_none());
    }

    #[test]
    fn a_mount_that_does_not_record_notes_nothing() {
        let recorder = Recorder::default();
        recorder.note(INodeNo(2), 0, 1, 0, 1);
        assert!(recorder.finish(&tree(), Vec::new()).is_none());
    }
}
