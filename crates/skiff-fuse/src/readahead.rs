//! Which neighbours a read brings along, and when to fetch ahead of reads.
//!
//! The image's chunks in path order (depth first, names sorted: the order
//! of the index's inodes, of `find`, `ls -R`, `tar` and most starts) are
//! the layout a read window runs along, across the ends of files: a
//! directory of small files costs one request, not one per file. Each
//! stream of reads has a window of its own, which doubles each time reads
//! go on where its last fetch ended; a
//! read that lands anywhere else starts a new stream at the smallest
//! window, so random reads fetch little. As the kernel's readahead does, a
//! stream whose reads pass the middle of what it fetched fetches its next
//! window before the reads get there.
//!
//! A new stream that starts at the head of a file runs across files with
//! its first window (a small file is rarely read alone); one that starts
//! inside a file (a page fault in a binary) stays in it. A grown window
//! runs past the end of the file being read only once the stream has moved
//! on from file to file twice: a program that reads one large file through
//! (its own binary, a library) has not said it will read the next one.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use skiff_format::{ChunkId, ChunkRef, ImageIndex, InodeKind, InodeNo};

/// Every distinct chunk of an image, in path order.
pub struct Layout {
    chunks: Vec<ChunkRef>,
    position: HashMap<ChunkId, usize>,
    /// By inode position: the layout position after a file's last chunk.
    file_end: Vec<usize>,
}

impl Layout {
    pub fn of(index: &ImageIndex) -> Layout {
        // Inodes are numbered depth first in name order, so their chunks,
        // each where it first appears, are the path order.
        let mut layout = Layout::new(index.distinct_chunks());
        layout.file_end = index
            .inodes
            .iter()
            .map(|inode| match &inode.kind {
                InodeKind::File { chunks, .. } => chunks
                    .iter()
                    .filter_map(|c| layout.position(&c.id))
                    .max()
                    .map_or(0, |last| last + 1),
                _ => 0,
            })
            .collect();
        layout
    }

    /// `chunks`, distinct, in the order to lay them out (no file ends known).
    pub(crate) fn new(chunks: Vec<ChunkRef>) -> Layout {
        let position = chunks.iter().enumerate().map(|(n, c)| (c.id, n)).collect();
        Layout {
            chunks,
            position,
            file_end: Vec::new(),
        }
    }

    /// The layout position after the last chunk of file `ino`; the end of
    /// the layout if that is not known.
    pub fn file_end(&self, ino: InodeNo) -> usize {
        (ino as usize)
            .checked_sub(1)
            .and_then(|at| self.file_end.get(at))
            .copied()
            .unwrap_or(self.chunks.len())
    }

    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    pub fn position(&self, id: &ChunkId) -> Option<usize> {
        self.position.get(id).copied()
    }
}

/// The smallest and the largest window, in raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowLimits {
    pub min: u64,
    pub max: u64,
}

impl WindowLimits {
    /// A fixed window.
    pub fn fixed(bytes: u64) -> WindowLimits {
        WindowLimits {
            min: bytes,
            max: bytes,
        }
    }
}

/// Streams remembered at once: readers walking the image side by side
/// (the kernel's readahead of several files, `make -j`) each keep theirs.
const STREAMS: usize = 8;
/// A miss this few positions past a stream's end still continues it (a
/// scan's end already counts the chunks it found here; these arrived since).
const SLACK: usize = 8;
/// Moves from file to file after which a stream's windows run across files.
const CROSSINGS_TO_WALK: u32 = 2;

/// What a stream may fetch next: up to `window` bytes, past the end of the
/// file being read only if `across_files`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub bytes: u64,
    pub across_files: bool,
}

/// A run of the layout that reads are walking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stream {
    /// The layout positions its last fetch covered.
    start: usize,
    end: usize,
    /// A read at or past this position (and before `end`) fetches the next window.
    trigger: usize,
    window: u64,
    /// The file its last read was in, and how often its reads moved to another.
    ino: InodeNo,
    crossings: u32,
}

impl Stream {
    fn continued_by(&self, at: usize) -> bool {
        at >= self.start && at < self.end.saturating_add(SLACK)
    }

    fn holds(&self, at: usize) -> bool {
        at >= self.start && at < self.end
    }

    fn read_in(&mut self, ino: InodeNo) {
        if ino != self.ino {
            self.ino = ino;
            self.crossings = self.crossings.saturating_add(1);
        }
    }

    /// The next window, doubled.
    fn grown(&mut self, max: u64) -> Window {
        self.window = self.window.saturating_mul(2).min(max);
        Window {
            bytes: self.window,
            across_files: self.crossings >= CROSSINGS_TO_WALK,
        }
    }

    fn fires_at(&self, at: usize) -> bool {
        at >= self.trigger && at < self.end
    }

    fn covered(&mut self, start: usize, end: usize) {
        self.start = start;
        self.end = end.max(start);
        self.trigger = start + (self.end - start) / 2;
    }
}

/// The streams of one mount, most recent first.
pub struct Streams {
    limits: WindowLimits,
    streams: Mutex<VecDeque<Stream>>,
    /// Whether a new stream at the head of a file runs across files: not
    /// for an image with a startup profile, whose start is fetched by it.
    first_across_files: bool,
}

impl Streams {
    pub fn new(limits: WindowLimits) -> Streams {
        let min = limits.min.max(1);
        Streams {
            limits: WindowLimits {
                min,
                max: limits.max.max(min),
            },
            streams: Mutex::new(VecDeque::with_capacity(STREAMS + 1)),
            first_across_files: true,
        }
    }

    /// New streams' first windows stay in their file (a startup profile
    /// fetches the files a start opens; a read it missed is no walk).
    pub fn keep_first_windows_in_file(&mut self) {
        self.first_across_files = false;
    }

    /// A read of file `ino` (from its first byte if `at_head`) missed at
    /// layout position `at`. `scan(window)` picks what to fetch with it and
    /// says at which position it stopped; the window is that of the stream
    /// the miss continues (doubled), or the smallest for a new stream.
    pub fn miss<T>(
        &self,
        at: usize,
        ino: InodeNo,
        at_head: bool,
        scan: impl FnOnce(Window) -> (usize, T),
    ) -> T {
        let mut streams = self.streams.lock().expect("read streams poisoned");
        let (mut stream, window) = match streams.iter().position(|s| s.continued_by(at)) {
            Some(i) => {
                let mut stream = streams.remove(i).expect("a found stream");
                stream.read_in(ino);
                let window = stream.grown(self.limits.max);
                (stream, window)
            }
            None => {
                let stream = Stream {
                    start: at,
                    end: at,
                    trigger: at,
                    window: self.limits.min,
                    ino,
                    crossings: 0,
                };
                let window = Window {
                    bytes: self.limits.min,
                    across_files: at_head && self.first_across_files,
                };
                (stream, window)
            }
        };
        let (end, picked) = scan(window);
        stream.covered(at, end);
        self.remember(&mut streams, stream);
        picked
    }

    /// Notes a read of file `ino` at layout position `at`, and says whether
    /// [`Streams::reached`] would fetch.
    pub fn due(&self, at: usize, ino: InodeNo) -> bool {
        let mut streams = self.streams.lock().expect("read streams poisoned");
        // Every stream that holds it: a small one a miss just started must
        // not hide the grown one it overlaps.
        let mut fires = false;
        for stream in streams.iter_mut().filter(|s| s.holds(at)) {
            stream.read_in(ino);
            fires |= stream.fires_at(at);
        }
        fires
    }

    /// A read of file `ino` reached layout position `at`. If that is past
    /// the middle of a stream's last fetch, `scan(from, window)` picks the
    /// stream's next window, from where the last one ended.
    pub fn reached<T>(
        &self,
        at: usize,
        ino: InodeNo,
        scan: impl FnOnce(usize, Window) -> (usize, T),
    ) -> Option<T> {
        let mut streams = self.streams.lock().expect("read streams poisoned");
        let i = streams.iter().position(|s| s.fires_at(at))?;
        let mut stream = streams.remove(i).expect("a found stream");
        stream.read_in(ino);
        let window = stream.grown(self.limits.max);
        let from = stream.end;
        let (end, picked) = scan(from, window);
        stream.covered(from, end);
        self.remember(&mut streams, stream);
        Some(picked)
    }

    fn remember(&self, streams: &mut VecDeque<Stream>, stream: Stream) {
        streams.push_front(stream);
        streams.truncate(STREAMS);
    }

    /// The window of the stream a miss at `at` would continue.
    #[cfg(test)]
    pub fn window_at(&self, at: usize) -> Option<u64> {
        let streams = self.streams.lock().expect("read streams poisoned");
        streams
            .iter()
            .find(|s| s.continued_by(at))
            .map(|s| s.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    /// A layout of chunks of 64 KiB, all missing: a scan takes whole chunks up to the window.
    fn scan_from(from: usize, window: Window) -> (usize, u64) {
        let chunks = (window.bytes / (64 * KIB)).max(1) as usize;
        (from + chunks, window.bytes)
    }

    #[test]
    fn a_sequential_walk_doubles_the_window_up_to_the_largest() {
        let streams = Streams::new(WindowLimits {
            min: 256 * KIB,
            max: 4096 * KIB,
        });
        let mut at = 0;
        let mut windows = Vec::new();
        for _ in 0..7 {
            // Each miss lands where the last fetch ended.
            let window = streams.miss(at, 7, true, |w| scan_from(at, w));
            windows.push(window / KIB);
            at += (window / (64 * KIB)) as usize;
        }
        assert_eq!(windows, [256, 512, 1024, 2048, 4096, 4096, 4096]);
    }

    #[test]
    fn random_reads_start_small_again() {
        let streams = Streams::new(WindowLimits {
            min: 256 * KIB,
            max: 4096 * KIB,
        });
        let mut at = 0;
        for _ in 0..6 {
            let window = streams.miss(at, 7, true, |w| scan_from(at, w));
            at += (window / (64 * KIB)) as usize;
        }
        assert_eq!(streams.window_at(at), Some(4096 * KIB));
        // Reads far from the stream, and far from one another.
        for jump in [5_000, 90_000, 40_000, 70_000, 10_000] {
            let window = streams.miss(jump, 7, true, |w| scan_from(jump, w));
            assert_eq!(window, 256 * KIB, "a random read at {jump}");
        }
        // Enough new streams push the long one out: a read at its end starts small too.
        for jump in [20_000, 30_000, 50_000, 60_000] {
            streams.miss(jump, 7, true, |w| scan_from(jump, w));
        }
        assert_eq!(streams.window_at(at), None);
        assert_eq!(streams.miss(at, 7, true, |w| scan_from(at, w)), 256 * KIB);
    }

    #[test]
    fn a_read_past_the_middle_fetches_the_next_window_once() {
        let streams = Streams::new(WindowLimits {
            min: 256 * KIB,
            max: 1024 * KIB,
        });
        // The miss at 0 fetches 4 chunks: positions 0..4, trigger at 2.
        streams.miss(0, 7, true, |w| scan_from(0, w));
        assert!(!streams.due(1, 7));
        assert_eq!(streams.reached(1, 7, scan_from), None);
        assert!(streams.due(2, 7));
        let next = streams.reached(2, 7, |from, w| {
            assert_eq!(from, 4, "the next window starts where the last ended");
            scan_from(from, w)
        });
        assert_eq!(next, Some(512 * KIB));
        // The same position again, or the rest of the first window: nothing more.
        assert_eq!(streams.reached(2, 7, scan_from), None);
        assert_eq!(streams.reached(3, 7, scan_from), None);
        // Positions 4..12 now, trigger at 8.
        assert_eq!(streams.reached(8, 7, scan_from), Some(1024 * KIB));
    }

    #[test]
    fn grown_windows_cross_files_only_once_reads_walk_from_file_to_file() {
        let streams = Streams::new(WindowLimits {
            min: 256 * KIB,
            max: 4096 * KIB,
        });
        let mut across = Vec::new();
        let mut note = |from: usize, w: Window| {
            across.push(w.across_files);
            scan_from(from, w)
        };
        // A miss inside a file stays in it; at the head of one, it crosses files.
        streams.miss(50, 9, false, |w| note(50, w));
        streams.miss(0, 1, true, |w| note(0, w));
        // With a startup profile, not even that.
        let mut profiled = Streams::new(WindowLimits {
            min: 256 * KIB,
            max: 4096 * KIB,
        });
        profiled.keep_first_windows_in_file();
        profiled.miss(900, 4, true, |w| {
            assert!(!w.across_files);
            scan_from(900, w)
        });
        // One large file read through: its windows stay in it.
        streams.due(1, 2);
        streams.reached(2, 2, &mut note);
        streams.due(5, 2);
        streams.reached(8, 2, &mut note);
        // A second move to another file: now a walk, and windows cross.
        streams.due(13, 3);
        streams.reached(20, 3, &mut note);
        assert_eq!(across, [false, true, false, false, true]);
    }
}
