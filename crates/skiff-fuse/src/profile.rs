//! Recording a startup profile: every read the kernel sends, reduced to the
//! chunks it touched, in the order they were first touched.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use fuser::INodeNo;
use skiff_format::{ProfileRange, StartupProfile};

use crate::tree::ImageTree;

/// Granularity of the `read_bytes` count.
const PAGE: u64 = 4096;

#[derive(Default)]
pub struct Recorder {
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
            state: Mutex::new(Some(Recording::default())),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.state.lock().expect("recorder poisoned").is_some()
    }

    /// Notes a read of bytes `offset..offset + len` of `ino`, which covers
    /// chunks `first..first + count`.
    pub fn note(&self, ino: INodeNo, first: usize, count: usize, offset: u64, len: u64) {
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
        let recording = self.state.lock().expect("recorder poisoned").take()?;
        let wanted: HashSet<u64> = recording.order.iter().map(|(ino, _)| *ino).collect();
        let paths: HashMap<u64, String> = tree
            .index()
            .walk()
            .into_iter()
            .filter(|(_, ino)| wanted.contains(ino))
            // A path that is not UTF-8 cannot be named in the JSON profile;
            // its chunks are then fetched on demand as without a profile.
            .filter_map(|(path, ino)| Some((ino, String::from_utf8(path).ok()?)))
            .collect();
        let mut ranges: Vec<ProfileRange> = Vec::new();
        for (ino, position) in recording.order {
            let Some(path) = paths.get(&ino) else {
                continue;
            };
            let position = position as u32;
            match ranges.last_mut() {
                Some(last) if last.path == *path && last.first + last.count == position => {
                    last.count += 1;
                }
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
