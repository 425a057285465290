//! Startup profiles: which parts of which files a container start read, in
//! the order it first read them, so later mounts fetch exactly those first.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::{ChunkId, FormatError, ImageIndex, InodeKind};

/// Most ranges a profile may hold (a start touching more is not a start).
pub const MAX_PROFILE_RANGES: usize = 100_000;

/// A recorded start of an image, stored in its manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupProfile {
    /// The command whose start was recorded, for people reading it.
    pub command: Vec<String>,
    /// Distinct bytes the start read from the image (in 4 KiB pages).
    pub read_bytes: u64,
    /// Runs of chunks within files, in first-access order.
    pub ranges: Vec<ProfileRange>,
}

/// Chunks `first..first + count` of the regular file at `path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileRange {
    /// Path from the image root, without a leading `/`.
    pub path: String,
    pub first: u32,
    pub count: u32,
}

/// A profile in numbers, for listings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileSummary {
    pub files: u64,
    pub ranges: u64,
    pub read_bytes: u64,
}

impl StartupProfile {
    pub fn summary(&self) -> ProfileSummary {
        let files: HashSet<&str> = self.ranges.iter().map(|r| r.path.as_str()).collect();
        ProfileSummary {
            files: files.len() as u64,
            ranges: self.ranges.len() as u64,
            read_bytes: self.read_bytes,
        }
    }

    /// The profile's chunks in order, each once, or an error naming the
    /// first range the index does not have.
    pub fn chunk_order(&self, index: &ImageIndex) -> Result<Vec<ChunkId>, FormatError> {
        if self.ranges.len() > MAX_PROFILE_RANGES {
            return Err(FormatError::InvalidProfile(format!(
                "{} ranges (at most {MAX_PROFILE_RANGES})",
                self.ranges.len()
            )));
        }
        // A recorded start names each (file, chunk) once, so its ranges add up
        // to at most the index's chunk references; a crafted profile naming
        // a big file's chunks over and over would cost ranges × count.
        let named: u64 = self.ranges.iter().map(|r| u64::from(r.count)).sum();
        let references = index.chunk_refs().count() as u64;
        if named > references {
            return Err(FormatError::InvalidProfile(format!(
                "its ranges name {named} chunks; the image has {references} chunk references"
            )));
        }
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for range in &self.ranges {
            let chunks = index
                .lookup_path(range.path.as_bytes())
                .and_then(|ino| match &index.inode(ino)?.kind {
                    InodeKind::File { chunks, .. } => Some(chunks),
                    _ => None,
                })
                .ok_or_else(|| {
                    FormatError::InvalidProfile(format!(
                        "{:?} is not a regular file of the image",
                        range.path
                    ))
                })?;
            let (first, count) = (range.first as usize, range.count as usize);
            let picked = first
                .checked_add(count)
                .and_then(|end| chunks.get(first..end))
                .filter(|picked| !picked.is_empty())
                .ok_or_else(|| {
                    FormatError::InvalidProfile(format!(
                        "chunks {first}..+{count} of {:?}, which has {}",
                        range.path,
                        chunks.len()
                    ))
                })?;
            order.extend(picked.iter().map(|c| c.id).filter(|id| seen.insert(*id)));
        }
        Ok(order)
    }

    /// Bytes of the distinct chunks the profile names.
    pub fn chunk_bytes(&self, index: &ImageIndex) -> u64 {
        let lens: std::collections::HashMap<ChunkId, u32> =
            index.chunk_refs().map(|c| (c.id, c.len)).collect();
        self.chunk_order(index)
            .unwrap_or_default()
            .iter()
            .filter_map(|id| lens.get(id))
            .map(|&len| u64::from(len))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChunkRef, ChunkingParams, DirEntry, Inode, Metadata};

    fn file(chunks: &[&[u8]]) -> Inode {
        Inode {
            meta: Metadata::default(),
            kind: InodeKind::File {
                size: chunks.iter().map(|c| c.len() as u64).sum(),
                chunks: chunks
                    .iter()
                    .map(|c| ChunkRef {
                        id: ChunkId::of(c),
                        len: c.len() as u32,
                    })
                    .collect(),
            },
        }
    }

    /// `/bin/a` with chunks a0 a1 a2, `/bin/b` with b0 a1, and `/lib` a directory.
    fn index() -> ImageIndex {
        let dir = |entries: Vec<(&str, u64)>| Inode {
            meta: Metadata::default(),
            kind: InodeKind::Directory {
                entries: entries
                    .into_iter()
                    .map(|(name, ino)| DirEntry {
                        name: name.as_bytes().to_vec(),
                        ino,
                    })
                    .collect(),
            },
        };
        ImageIndex {
            chunking: ChunkingParams::default(),
            inodes: vec![
                dir(vec![("bin", 2), ("lib", 5)]),
                dir(vec![("a", 3), ("b", 4)]),
                file(&[b"a0", b"a1", b"a2"]),
                file(&[b"b0", b"a1"]),
                dir(vec![]),
            ],
        }
    }

    fn range(path: &str, first: u32, count: u32) -> ProfileRange {
        ProfileRange {
            path: path.into(),
            first,
            count,
        }
    }

    #[test]
    fn chunks_come_in_profile_order_each_once() {
        let profile = StartupProfile {
            ranges: vec![
                range("bin/b", 0, 2),
                range("bin/a", 2, 1),
                range("bin/a", 0, 2),
            ],
            ..StartupProfile::default()
        };
        let ids = |names: &[&[u8]]| names.iter().map(|n| ChunkId::of(n)).collect::<Vec<_>>();
        assert_eq!(
            profile.chunk_order(&index()).unwrap(),
            ids(&[b"b0", b"a1", b"a2", b"a0"])
        );
        assert_eq!(profile.chunk_bytes(&index()), 8);
    }

    #[test]
    fn ranges_the_index_lacks_are_refused() {
        for bad in [
            range("bin/c", 0, 1),
            range("lib", 0, 1),
            range("bin/a", 2, 2),
            range("bin/a", 3, 0),
            range("bin/a", u32::MAX, 2),
        ] {
            let profile = StartupProfile {
                ranges: vec![bad.clone()],
                ..StartupProfile::default()
            };
            assert!(
                matches!(
                    profile.chunk_order(&index()),
                    Err(FormatError::InvalidProfile(_))
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn a_profile_naming_more_chunks_than_the_image_has_is_refused() {
        // The image has 5 chunk references; all of them once is fine.
        let whole = StartupProfile {
            ranges: vec![range("bin/a", 0, 3), range("bin/b", 0, 2)],
            ..StartupProfile::default()
        };
        assert_eq!(whole.chunk_order(&index()).unwrap().len(), 4);
        // The same file's chunks again and again: refused before any lookup.
        let repeated = StartupProfile {
            ranges: vec![range("bin/a", 0, 3); 2],
            ..StartupProfile::default()
        };
        assert!(matches!(
            repeated.chunk_order(&index()),
            Err(FormatError::InvalidProfile(_))
        ));
    }
}
