//! The image's merged root as the kernel sees it: attributes, parents and
//! where each chunk of each file starts, all worked out once at mount.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};
use skiff_format::{ChunkRef, ImageIndex, Inode, InodeKind, InodeNo, ROOT_INO};

/// Block size reported by `stat` and `statfs`.
pub const BLOCK_SIZE: u32 = 4096;

pub struct ImageTree {
    index: ImageIndex,
    nlink: Vec<u32>,
    /// By inode position: the directory holding it (the root holds itself).
    parent: Vec<InodeNo>,
    /// By inode position, for regular files: the offset where each chunk
    /// starts, then the file's size.
    chunk_starts: Vec<Box<[u64]>>,
}

/// The chunks that cover a byte range of a file.
pub struct ChunkSpan<'a> {
    /// Position in the file's chunk list of the first chunk.
    pub first: usize,
    pub chunks: &'a [ChunkRef],
    /// File offset where the first chunk starts.
    pub start: u64,
    /// Bytes of the range that lie inside the file.
    pub len: u64,
}

impl ImageTree {
    /// Takes an index that has passed [`ImageIndex::validate`].
    pub fn new(index: ImageIndex) -> ImageTree {
        let nlink = index.link_counts();
        let mut parent = vec![ROOT_INO; index.inodes.len()];
        let mut chunk_starts = Vec::with_capacity(index.inodes.len());
        for (pos, inode) in index.inodes.iter().enumerate() {
            let dir_ino = pos as InodeNo + 1;
            match &inode.kind {
                InodeKind::Directory { entries } => {
                    for entry in entries {
                        if let Some(slot) = parent.get_mut(entry.ino as usize - 1) {
                            *slot = dir_ino;
                        }
                    }
                    chunk_starts.push(Box::default());
                }
                InodeKind::File { size, chunks } => {
                    let mut starts = Vec::with_capacity(chunks.len() + 1);
                    let mut at = 0u64;
                    for chunk in chunks {
                        starts.push(at);
                        at += u64::from(chunk.len);
                    }
                    starts.push(*size);
                    chunk_starts.push(starts.into_boxed_slice());
                }
                _ => chunk_starts.push(Box::default()),
            }
        }
        // Hard links to directories do not exist, so a directory's parent is
        // the one directory that names it; for files it is only used for "..".
        ImageTree {
            index,
            nlink,
            parent,
            chunk_starts,
        }
    }

    pub fn index(&self) -> &ImageIndex {
        &self.index
    }

    pub fn inode(&self, ino: INodeNo) -> Option<&Inode> {
        self.index.inode(ino.0)
    }

    pub fn parent(&self, ino: INodeNo) -> INodeNo {
        INodeNo(
            self.parent
                .get((ino.0 as usize).wrapping_sub(1))
                .copied()
                .unwrap_or(ROOT_INO),
        )
    }

    /// The entry `name` in directory `dir`.
    pub fn lookup(&self, dir: INodeNo, name: &[u8]) -> Option<INodeNo> {
        let InodeKind::Directory { entries } = &self.inode(dir)?.kind else {
            return None;
        };
        let pos = entries
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()?;
        Some(INodeNo(entries[pos].ino))
    }

    /// The chunks of file `ino` that hold bytes `offset..offset + len`.
    pub fn span(&self, ino: INodeNo, offset: u64, len: u64) -> Option<ChunkSpan<'_>> {
        let InodeKind::File { size, chunks } = &self.inode(ino)?.kind else {
            return None;
        };
        let starts = self.chunk_starts.get(ino.0 as usize - 1)?;
        let end = offset.saturating_add(len).min(*size);
        if offset >= end {
            return Some(ChunkSpan {
                first: 0,
                chunks: &[],
                start: offset,
                len: 0,
            });
        }
        // The last chunk starting at or before `offset`, through the first
        // one ending at or after `end`.
        let first = starts.partition_point(|&s| s <= offset) - 1;
        let last = starts.partition_point(|&s| s < end) - 1;
        Some(ChunkSpan {
            first,
            chunks: &chunks[first..=last],
            start: starts[first],
            len: end - offset,
        })
    }

    /// The chunks of file `ino` from position `from` on.
    pub fn chunks_from(&self, ino: INodeNo, from: usize) -> &[ChunkRef] {
        match self.inode(ino).map(|i| &i.kind) {
            Some(InodeKind::File { chunks, .. }) => chunks.get(from..).unwrap_or(&[]),
            _ => &[],
        }
    }

    pub fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let inode = self.inode(ino)?;
        let meta = &inode.meta;
        let kind = match inode.kind {
            InodeKind::Directory { .. } => FileType::Directory,
            InodeKind::File { .. } => FileType::RegularFile,
            InodeKind::Symlink { .. } => FileType::Symlink,
            InodeKind::CharDevice { .. } => FileType::CharDevice,
            InodeKind::BlockDevice { .. } => FileType::BlockDevice,
            InodeKind::Fifo => FileType::NamedPipe,
            InodeKind::Socket => FileType::Socket,
        };
        let rdev = match inode.kind {
            InodeKind::CharDevice { major, minor } | InodeKind::BlockDevice { major, minor } => {
                encode_dev(major, minor)
            }
            _ => 0,
        };
        let size = inode.size();
        let mtime = system_time(meta.mtime, meta.mtime_nsec);
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (meta.mode & 0o7777) as u16,
            nlink: self.nlink.get(ino.0 as usize - 1).copied().unwrap_or(1),
            uid: meta.uid,
            gid: meta.gid,
            rdev,
            blksize: BLOCK_SIZE,
            flags: 0,
        })
    }
}

/// The kernel's `new_encode_dev`: how FUSE carries a device number in 32 bits.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn system_time(secs: i64, nsec: u32) -> SystemTime {
    let nanos = Duration::new(0, nsec.min(999_999_999));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use skiff_format::{ChunkId, ChunkingParams, DirEntry, Metadata};

    fn file(lens: &[u32]) -> Inode {
        let chunks: Vec<ChunkRef> = lens
            .iter()
            .enumerate()
            .map(|(n, &len)| ChunkRef {
                id: ChunkId::of(&[n as u8]),
                len,
            })
            .collect();
        Inode {
            meta: Metadata::default(),
            kind: InodeKind::File {
                size: lens.iter().map(|&l| u64::from(l)).sum(),
                chunks,
            },
        }
    }

    /// `/a` (chunks of 100, 50 and 200 bytes), `/b` (empty), `/d/link` (a hard link to `/a`).
    pub(crate) fn tree() -> ImageTree {
        let dir = |entries: Vec<DirEntry>| Inode {
            meta: Metadata {
                mode: 0o755,
                ..Metadata::default()
            },
            kind: InodeKind::Directory { entries },
        };
        let entry = |name: &str, ino| DirEntry {
            name: name.as_bytes().to_vec(),
            ino,
        };
        ImageTree::new(ImageIndex {
            chunking: ChunkingParams::default(),
            inodes: vec![
                dir(vec![entry("a", 2), entry("b", 3), entry("d", 4)]),
                file(&[100, 50, 200]),
                file(&[]),
                dir(vec![entry("link", 2)]),
            ],
        })
    }

    #[test]
    fn spans_cover_exactly_the_chunks_a_range_touches() {
        let tree = tree();
        let a = INodeNo(2);
        let span = |offset, len| {
            let s = tree.span(a, offset, len).unwrap();
            (s.first, s.chunks.len(), s.start)
        };
        assert_eq!(span(0, 1), (0, 1, 0));
        assert_eq!(span(0, 100), (0, 1, 0));
        assert_eq!(span(0, 101), (0, 2, 0));
        assert_eq!(span(99, 2), (0, 2, 0));
        assert_eq!(span(100, 50), (1, 1, 100));
        assert_eq!(span(120, 1000), (1, 2, 100));
        assert_eq!(tree.span(a, 120, 1000).unwrap().len, 230);
        assert_eq!(span(349, 1), (2, 1, 150));
        assert_eq!(span(350, 10).1, 0, "at the end of the file");
        assert_eq!(tree.span(INodeNo(3), 0, 10).unwrap().chunks.len(), 0);
        assert!(tree.span(INodeNo(1), 0, 10).is_none(), "not a file");
    }

    #[test]
    fn lookups_parents_and_link_counts() {
        let tree = tree();
        assert_eq!(tree.lookup(INodeNo(1), b"b"), Some(INodeNo(3)));
        assert_eq!(tree.lookup(INodeNo(1), b"c"), None);
        assert_eq!(tree.lookup(INodeNo(4), b"link"), Some(INodeNo(2)));
        assert_eq!(tree.parent(INodeNo(4)), INodeNo(1));
        assert_eq!(tree.parent(INodeNo(1)), INodeNo(1));
        assert_eq!(tree.attr(INodeNo(2)).unwrap().nlink, 2);
        assert_eq!(tree.attr(INodeNo(1)).unwrap().nlink, 3);
        assert_eq!(tree.attr(INodeNo(2)).unwrap().blocks, 1);
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(259, 0x12345), 0x12310345);
    }
}
