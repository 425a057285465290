//! The image index: everything needed to present an image's merged root file
//! system without any of its layers.

use serde::{Deserialize, Serialize};

use crate::{ChunkId, FormatError, IndexDigest};

/// First bytes of an encoded index; the version follows as a little-endian u32.
pub const INDEX_MAGIC: &[u8; 8] = b"SKIFFIDX";
/// The index encoding this code writes and reads.
pub const INDEX_FORMAT_VERSION: u32 = 1;
/// The root directory's inode number (as in FUSE).
pub const ROOT_INO: InodeNo = 1;

/// An inode number: position in [`ImageIndex::inodes`] plus one.
pub type InodeNo = u64;

/// The largest chunk FastCDC 2020 makes (its maximum `max_size`).
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;

/// The longest name in a directory (Linux's NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// The longest path from the root, `/` included (Linux's PATH_MAX). It also
/// bounds the depth: a tree 2048 directories deep is as deep as it gets,
/// and whatever walks it holds one path at a time of at most this length.
pub const MAX_PATH_BYTES: usize = 4096;
/// The longest symlink target (PATH_MAX less its NUL).
pub const MAX_SYMLINK_BYTES: usize = 4095;
/// Extended attributes as Linux bounds them (XATTR_NAME_MAX, XATTR_SIZE_MAX).
pub const MAX_XATTR_NAME_BYTES: usize = 255;
pub const MAX_XATTR_VALUE_BYTES: usize = 65536;

/// FastCDC 2020 parameters; one set per store, recorded in every index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkingParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkingParams {
    fn default() -> Self {
        ChunkingParams {
            min_size: 16 * 1024,
            avg_size: 64 * 1024,
            max_size: 256 * 1024,
        }
    }
}

impl ChunkingParams {
    /// Checks the limits FastCDC 2020 supports and that min ≤ avg ≤ max.
    pub fn validate(&self) -> Result<(), FormatError> {
        let err = |m: String| Err(FormatError::InvalidChunking(m));
        if self.min_size < 64 || self.avg_size < 256 || self.max_size < 1024 {
            return err(format!("{self:?}: below FastCDC's minimums (64/256/1024)"));
        }
        if self.avg_size > 4 * 1024 * 1024 || self.max_size > MAX_CHUNK_SIZE {
            return err(format!(
                "{self:?}: above FastCDC's maximums (4 MiB avg, 16 MiB max)"
            ));
        }
        if !(self.min_size <= self.avg_size && self.avg_size <= self.max_size) {
            return err(format!("{self:?}: need min ≤ avg ≤ max"));
        }
        Ok(())
    }
}

/// One chunk of a file, in file order: its id and uncompressed length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// An extended attribute, name and value as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

impl Xattr {
    /// Whether Linux could hold it (XATTR_NAME_MAX, XATTR_SIZE_MAX).
    pub fn within_linux_limits(&self) -> bool {
        self.name.len() <= MAX_XATTR_NAME_BYTES && self.value.len() <= MAX_XATTR_VALUE_BYTES
    }
}

/// What every inode carries regardless of its type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// A name in a directory and the inode it points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: InodeNo,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InodeKind {
    /// Entries sorted by name (bytewise).
    Directory {
        entries: Vec<DirEntry>,
    },
    File {
        size: u64,
        chunks: Vec<ChunkRef>,
    },
    Symlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub meta: Metadata,
    pub kind: InodeKind,
}

impl Inode {
    /// The file type bits of `st_mode` (`S_IFDIR`, `S_IFREG`, …).
    pub fn type_bits(&self) -> u32 {
        match self.kind {
            InodeKind::Directory { .. } => 0o040000,
            InodeKind::File { .. } => 0o100000,
            InodeKind::Symlink { .. } => 0o120000,
            InodeKind::CharDevice { .. } => 0o020000,
            InodeKind::BlockDevice { .. } => 0o060000,
            InodeKind::Fifo => 0o010000,
            InodeKind::Socket => 0o140000,
        }
    }

    /// Logical size as `stat` reports it.
    pub fn size(&self) -> u64 {
        match &self.kind {
            InodeKind::File { size, .. } => *size,
            InodeKind::Symlink { target } => target.len() as u64,
            _ => 0,
        }
    }
}

/// The merged root file system of an image.
///
/// Inodes are numbered in depth-first order of sorted names starting at
/// [`ROOT_INO`]; hard links are directory entries that share an inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    pub chunking: ChunkingParams,
    pub inodes: Vec<Inode>,
}

impl ImageIndex {
    pub fn inode(&self, ino: InodeNo) -> Option<&Inode> {
        let pos = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.inodes.get(pos)
    }

    /// Encodes as `INDEX_MAGIC`, the version (u32 LE), then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.inodes.len() * 64);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
        // Serialising plain owned data into a Vec cannot fail.
        postcard::to_io(self, &mut out).expect("postcard encoding into a Vec");
        out
    }

    /// Decodes and validates an index that may come from outside the process.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let rest = bytes
            .strip_prefix(INDEX_MAGIC.as_slice())
            .ok_or(FormatError::BadIndexMagic)?;
        let (version, body) = rest
            .split_first_chunk::<4>()
            .ok_or(FormatError::BadIndexMagic)?;
        let version = u32::from_le_bytes(*version);
        if version != INDEX_FORMAT_VERSION {
            return Err(FormatError::UnsupportedIndexVersion(
                version,
                INDEX_FORMAT_VERSION,
            ));
        }
        let (index, trailing): (ImageIndex, _) = postcard::take_from_bytes(body)?;
        if !trailing.is_empty() {
            return Err(FormatError::MalformedIndex(format!(
                "{} trailing bytes",
                trailing.len()
            )));
        }
        index.validate()?;
        Ok(index)
    }

    /// The digest of the encoded index.
    pub fn digest(&self) -> IndexDigest {
        IndexDigest::of(&self.encode())
    }

    /// Checks the structural rules every reader relies on: a directory root,
    /// entries in range and sorted, every directory reachable exactly once,
    /// file sizes equal to their chunk lengths.
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::MalformedIndex(m));
        self.chunking.validate()?;
        match self.inodes.first() {
            Some(Inode {
                kind: InodeKind::Directory { .. },
                ..
            }) => {}
            _ => return bad("the root inode is not a directory".into()),
        }
        let mut links = vec![0u32; self.inodes.len()];
        links[0] = 1;
        // Length of each directory's path from the root ("/a/b" is 4): a
        // directory is reached before its own entries are read.
        let mut path_len = vec![0usize; self.inodes.len()];
        for (pos, inode) in self.inodes.iter().enumerate() {
            let ino = pos as u64 + 1;
            if inode.meta.mode & !0o7777 != 0 {
                return bad(format!(
                    "inode {ino}: mode {:o} has type bits",
                    inode.meta.mode
                ));
            }
            if !inode.meta.xattrs.windows(2).all(|w| w[0].name < w[1].name) {
                return bad(format!("inode {ino}: xattrs not sorted or duplicated"));
            }
            if let Some(x) = inode.meta.xattrs.iter().find(|x| !x.within_linux_limits()) {
                return bad(format!(
                    "inode {ino}: xattr {:?} is longer than Linux allows",
                    String::from_utf8_lossy(&x.name)
                ));
            }
            match &inode.kind {
                InodeKind::Directory { entries } => {
                    if !entries.windows(2).all(|w| w[0].name < w[1].name) {
                        return bad(format!("inode {ino}: entries not sorted or duplicated"));
                    }
                    for entry in entries {
                        let name = &entry.name;
                        if name.is_empty()
                            || name.len() > MAX_NAME_BYTES
                            || name == b"."
                            || name == b".."
                            || name.contains(&b'/')
                            || name.contains(&0)
                        {
                            return bad(format!(
                                "inode {ino}: invalid entry name {:?}",
                                String::from_utf8_lossy(name)
                            ));
                        }
                        let Some(target) = self.inode(entry.ino) else {
                            return bad(format!(
                                "inode {ino}: entry points at missing inode {}",
                                entry.ino
                            ));
                        };
                        let child_len = path_len[pos] + 1 + name.len();
                        if child_len > MAX_PATH_BYTES {
                            return bad(format!(
                                "inode {ino}: a path of {child_len} bytes (at most {MAX_PATH_BYTES})"
                            ));
                        }
                        let count = &mut links[entry.ino as usize - 1];
                        *count += 1;
                        if matches!(target.kind, InodeKind::Directory { .. }) {
                            if *count > 1 || entry.ino <= ino {
                                return bad(format!(
                                    "directory inode {} linked twice or before its parent",
                                    entry.ino
                                ));
                            }
                            path_len[entry.ino as usize - 1] = child_len;
                        }
                    }
                }
                InodeKind::Symlink { target } if target.len() > MAX_SYMLINK_BYTES => {
                    return bad(format!(
                        "inode {ino}: a symlink target of {} bytes (at most {MAX_SYMLINK_BYTES})",
                        target.len()
                    ));
                }
                InodeKind::File { size, chunks } => {
                    let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
                    if total != *size || chunks.iter().any(|c| c.len == 0) {
                        return bad(format!(
                            "inode {ino}: size {size} but chunks hold {total} bytes"
                        ));
                    }
                }
                _ => {}
            }
        }
        if let Some(pos) = links.iter().position(|&n| n == 0) {
            return bad(format!("inode {} is not reachable from the root", pos + 1));
        }
        Ok(())
    }

    /// `st_nlink` of every inode, by position: the number of entries that
    /// name a non-directory; 2 plus the number of subdirectories for a directory.
    pub fn link_counts(&self) -> Vec<u32> {
        let is_dir = |ino: InodeNo| {
            matches!(
                self.inode(ino),
                Some(Inode {
                    kind: InodeKind::Directory { .. },
                    ..
                })
            )
        };
        let mut counts: Vec<u32> = self
            .inodes
            .iter()
            .map(|i| {
                if matches!(i.kind, InodeKind::Directory { .. }) {
                    2
                } else {
                    0
                }
            })
            .collect();
        for (pos, inode) in self.inodes.iter().enumerate() {
            if let InodeKind::Directory { entries } = &inode.kind {
                for entry in entries {
                    if is_dir(entry.ino) {
                        counts[pos] += 1;
                    } else {
                        counts[entry.ino as usize - 1] += 1;
                    }
                }
            }
        }
        counts
    }

    /// The inode at `path` (relative to the root, `/`-separated), without
    /// following symlinks.
    pub fn lookup_path(&self, path: &[u8]) -> Option<InodeNo> {
        let mut ino = ROOT_INO;
        for name in path.split(|&b| b == b'/').filter(|n| !n.is_empty()) {
            let InodeKind::Directory { entries } = &self.inode(ino)?.kind else {
                return None;
            };
            let pos = entries
                .binary_search_by(|e| e.name.as_slice().cmp(name))
                .ok()?;
            ino = entries[pos].ino;
        }
        Some(ino)
    }

    /// Every path depth-first in sorted order, as `(path, ino)`.
    /// The root is visited first with an empty path.
    pub fn walk(&self) -> Vec<(Vec<u8>, InodeNo)> {
        let mut out = Vec::with_capacity(self.inodes.len());
        let mut stack: Vec<(Vec<u8>, InodeNo)> = vec![(Vec::new(), ROOT_INO)];
        while let Some((path, ino)) = stack.pop() {
            if let Some(Inode {
                kind: InodeKind::Directory { entries },
                ..
            }) = self.inode(ino)
            {
                for entry in entries.iter().rev() {
                    let mut child = path.clone();
                    if !child.is_empty() {
                        child.push(b'/');
                    }
                    child.extend_from_slice(&entry.name);
                    stack.push((child, entry.ino));
                }
            }
            out.push((path, ino));
        }
        out
    }

    /// Sum of the sizes of all regular files, each inode counted once.
    pub fn logical_bytes(&self) -> u64 {
        self.inodes
            .iter()
            .filter_map(|i| match &i.kind {
                InodeKind::File { size, .. } => Some(*size),
                _ => None,
            })
            .sum()
    }

    pub fn file_count(&self) -> u64 {
        self.inodes
            .iter()
            .filter(|i| matches!(i.kind, InodeKind::File { .. }))
            .count() as u64
    }

    /// The image's distinct chunks in first-use order (file order).
    pub fn distinct_chunks(&self) -> Vec<ChunkRef> {
        let mut seen = std::collections::HashSet::new();
        self.chunk_refs()
            .filter(|c| seen.insert(c.id))
            .copied()
            .collect()
    }

    /// Every chunk referenced by regular files, in file order, duplicates included.
    pub fn chunk_refs(&self) -> impl Iterator<Item = &ChunkRef> {
        self.inodes.iter().flat_map(|i| match &i.kind {
            InodeKind::File { chunks, .. } => chunks.as_slice(),
            _ => &[],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32) -> Metadata {
        Metadata {
            mode,
            ..Default::default()
        }
    }

    /// `/a` (file, hard-linked as `/d/b`), `/d` (dir), `/l -> a`.
    fn sample() -> ImageIndex {
        let chunk = ChunkRef {
            id: ChunkId::of(b"abc"),
            len: 3,
        };
        ImageIndex {
            chunking: ChunkingParams::default(),
            inodes: vec![
                Inode {
                    meta: meta(0o755),
                    kind: InodeKind::Directory {
                        entries: vec![
                            DirEntry {
                                name: b"a".to_vec(),
                                ino: 2,
                            },
                            DirEntry {
                                name: b"d".to_vec(),
                                ino: 3,
                            },
                            DirEntry {
                                name: b"l".to_vec(),
                                ino: 4,
                            },
                        ],
                    },
                },
                Inode {
                    meta: meta(0o4755),
                    kind: InodeKind::File {
                        size: 3,
                        chunks: vec![chunk],
                    },
                },
                Inode {
                    meta: meta(0o1777),
                    kind: InodeKind::Directory {
                        entries: vec![DirEntry {
                            name: b"b".to_vec(),
                            ino: 2,
                        }],
                    },
                },
                Inode {
                    meta: meta(0o777),
                    kind: InodeKind::Symlink {
                        target: b"a".to_vec(),
                    },
                },
            ],
        }
    }

    /// A chain of `depth` directories each named `name`, with a file at the bottom.
    fn chain(depth: usize, name: &[u8]) -> ImageIndex {
        let mut inodes: Vec<Inode> = (0..depth + 1)
            .map(|i| Inode {
                meta: meta(0o755),
                kind: InodeKind::Directory {
                    entries: vec![DirEntry {
                        name: name.to_vec(),
                        ino: i as u64 + 2,
                    }],
                },
            })
            .collect();
        inodes.push(Inode {
            meta: meta(0o644),
            kind: InodeKind::File {
                size: 0,
                chunks: Vec::new(),
            },
        });
        ImageIndex {
            chunking: ChunkingParams::default(),
            inodes,
        }
    }

    #[test]
    fn names_paths_and_depth_are_bounded() {
        // "/a/a/…/a": 2 bytes a level, 2048 levels is PATH_MAX.
        assert!(chain(2047, b"a").validate().is_ok());
        let too_deep = chain(2048, b"a").validate().unwrap_err();
        assert!(too_deep.to_string().contains("at most 4096"), "{too_deep}");
        assert!(chain(1, &[b'n'; 255]).validate().is_ok());
        assert!(chain(1, &[b'n'; 256]).validate().is_err());
        let mut long_link = sample();
        long_link.inodes[3].kind = InodeKind::Symlink {
            target: vec![b'x'; MAX_SYMLINK_BYTES + 1],
        };
        assert!(long_link.validate().is_err());
        let mut big_xattr = sample();
        big_xattr.inodes[1].meta.xattrs = vec![Xattr {
            name: b"user.x".to_vec(),
            value: vec![0; MAX_XATTR_VALUE_BYTES + 1],
        }];
        assert!(big_xattr.validate().is_err());
    }

    pub(super) fn sample_for_props() -> ImageIndex {
        sample()
    }

    #[test]
    fn round_trips_and_digest_is_stable() {
        let index = sample();
        let bytes = index.encode();
        assert!(bytes.starts_with(INDEX_MAGIC));
        assert_eq!(ImageIndex::decode(&bytes).unwrap(), index);
        assert_eq!(index.digest(), IndexDigest::of(&bytes));
        assert_eq!(sample().digest(), index.digest());
    }

    #[test]
    fn walk_and_link_counts() {
        let index = sample();
        let paths: Vec<_> = index
            .walk()
            .into_iter()
            .map(|(p, i)| (String::from_utf8(p).unwrap(), i))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("".into(), 1),
                ("a".into(), 2),
                ("d".into(), 3),
                ("d/b".into(), 2),
                ("l".into(), 4)
            ]
        );
        assert_eq!(index.link_counts(), vec![3, 2, 2, 1]);
        assert_eq!(index.logical_bytes(), 3);
    }

    #[test]
    fn rejects_broken_indexes() {
        let mut bytes = sample().encode();
        bytes[0] = b'X';
        assert!(matches!(
            ImageIndex::decode(&bytes),
            Err(FormatError::BadIndexMagic)
        ));

        let mut v2 = sample().encode();
        v2[8] = 2;
        assert!(matches!(
            ImageIndex::decode(&v2),
            Err(FormatError::UnsupportedIndexVersion(2, 1))
        ));

        let mut bad_size = sample();
        bad_size.inodes[1].kind = InodeKind::File {
            size: 4,
            chunks: vec![ChunkRef {
                id: ChunkId::of(b"abc"),
                len: 3,
            }],
        };
        assert!(ImageIndex::decode(&bad_size.encode()).is_err());

        let mut dangling = sample();
        dangling.inodes[2].kind = InodeKind::Directory {
            entries: vec![DirEntry {
                name: b"b".to_vec(),
                ino: 9,
            }],
        };
        assert!(ImageIndex::decode(&dangling.encode()).is_err());

        let mut cycle = sample();
        cycle.inodes[2].kind = InodeKind::Directory {
            entries: vec![DirEntry {
                name: b"up".to_vec(),
                ino: 1,
            }],
        };
        assert!(ImageIndex::decode(&cycle.encode()).is_err());

        let mut slash = sample();
        slash.inodes[2].kind = InodeKind::Directory {
            entries: vec![DirEntry {
                name: b"x/y".to_vec(),
                ino: 2,
            }],
        };
        assert!(ImageIndex::decode(&slash.encode()).is_err());

        let truncated = &sample().encode()[..20];
        assert!(ImageIndex::decode(truncated).is_err());
    }
}

#[cfg(test)]
mod decode_props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the bytes, decoding returns an index that passes
        /// validation or an error; it never panics.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = INDEX_MAGIC.to_vec();
            bytes.extend_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&body);
            if let Ok(index) = ImageIndex::decode(&bytes) {
                prop_assert!(index.validate().is_ok());
            }
        }

        #[test]
        fn mutated_indexes_decode_valid_or_fail(pos in 12usize..400, byte in any::<u8>()) {
            let mut bytes = tests::sample_for_props().encode();
            let pos = pos % bytes.len();
            bytes[pos] = byte;
            if let Ok(index) = ImageIndex::decode(&bytes) {
                prop_assert!(index.validate().is_ok());
                let _ = index.walk();
                let _ = index.link_counts();
            }
        }
    }
}
