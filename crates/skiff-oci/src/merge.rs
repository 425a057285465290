//! Applying layer tars in order into one merged tree: whiteouts, opaque
//! directories, hard links across layers, and path safety.

use std::collections::{BTreeMap, HashMap};

use skiff_format::{
    ChunkRef, ChunkingParams, DirEntry, ImageIndex, Inode, InodeKind, Metadata, Xattr,
    MAX_NAME_BYTES, MAX_PATH_BYTES, MAX_SYMLINK_BYTES, ROOT_INO,
};

use crate::OciError;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

type NodeId = usize;

/// A regular file's contents: filled in by the chunking workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    Empty,
    /// Position in the converter's result table.
    Slot(usize),
}

#[derive(Clone, Debug)]
enum NodeKind {
    Dir(BTreeMap<Vec<u8>, Dentry>),
    File(Content, u64),
    Symlink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

#[derive(Clone, Copy, Debug)]
struct Dentry {
    node: NodeId,
    /// The layer that last created or listed this name; whiteouts and opaque
    /// markers only hide names from lower layers.
    layer: usize,
}

#[derive(Clone, Debug)]
struct Node {
    meta: Metadata,
    kind: NodeKind,
}

/// What a tar entry turns into, once its contents (if any) are handled.
#[derive(Debug)]
pub(crate) enum EntryKind {
    Dir,
    File(Content, u64),
    Symlink(Vec<u8>),
    HardLink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

/// The root file system as the layers applied so far leave it.
pub struct MergedTree {
    nodes: Vec<Node>,
}

impl Default for MergedTree {
    fn default() -> Self {
        MergedTree {
            nodes: vec![Node {
                meta: Metadata {
                    mode: 0o755,
                    ..Default::default()
                },
                kind: NodeKind::Dir(BTreeMap::new()),
            }],
        }
    }
}

/// A tar path split into safe components; `..` and absolute paths are handled
/// the way Docker does, except that climbing above the root is an error.
pub(crate) fn split_path(layer: usize, raw: &[u8]) -> Result<Vec<Vec<u8>>, OciError> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if parts.pop().is_none() {
                    return Err(OciError::PathEscapesRoot {
                        layer,
                        path: String::from_utf8_lossy(raw).into_owned(),
                    });
                }
            }
            p if p.contains(&0) => {
                return Err(OciError::BadEntry {
                    layer,
                    path: String::from_utf8_lossy(raw).into_owned(),
                    reason: "NUL in path".into(),
                })
            }
            p if p.len() > MAX_NAME_BYTES => {
                return Err(OciError::BadEntry {
                    layer,
                    path: String::from_utf8_lossy(raw).into_owned(),
                    reason: format!("a name longer than {MAX_NAME_BYTES} bytes"),
                })
            }
            p => parts.push(p.to_vec()),
        }
    }
    // "/a/b": each part and its slash. Past PATH_MAX no program could open
    // it, and a deeper tree costs every reader of the index more.
    let len: usize = parts.iter().map(|p| p.len() + 1).sum();
    if len > MAX_PATH_BYTES {
        return Err(OciError::BadEntry {
            layer,
            path: String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned() + "…",
            reason: format!("a path of {len} bytes (at most {MAX_PATH_BYTES})"),
        });
    }
    Ok(parts)
}

/// What the index allows of a symlink and of xattrs (`ImageIndex::validate`).
fn check_limits(
    layer: usize,
    parts: &[Vec<u8>],
    meta: &Metadata,
    kind: &EntryKind,
) -> Result<(), OciError> {
    let refuse = |reason: String| {
        Err(OciError::BadEntry {
            layer,
            path: display(parts),
            reason,
        })
    };
    if let EntryKind::Symlink(target) = kind {
        if target.len() > MAX_SYMLINK_BYTES {
            return refuse(format!(
                "a symlink target of {} bytes (at most {MAX_SYMLINK_BYTES})",
                target.len()
            ));
        }
    }
    if let Some(x) = meta.xattrs.iter().find(|x| !x.within_linux_limits()) {
        return refuse(format!(
            "xattr {:?} is longer than Linux allows",
            String::from_utf8_lossy(&x.name)
        ));
    }
    Ok(())
}

fn display(parts: &[Vec<u8>]) -> String {
    String::from_utf8_lossy(&parts.join(&b'/')).into_owned()
}

impl MergedTree {
    fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, Dentry>> {
        match &self.nodes[dir].kind {
            NodeKind::Dir(children) => Some(children),
            _ => None,
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, Dentry> {
        match &mut self.nodes[dir].kind {
            NodeKind::Dir(children) => children,
            _ => unreachable!("callers check that {dir} is a directory"),
        }
    }

    /// Walks to the directory holding `parts`' last component. With `create`,
    /// missing directories are made (0755, root) and every directory passed is
    /// marked as listed by `layer`; without, a missing one gives `None`.
    fn parent_dir(
        &mut self,
        layer: usize,
        parts: &[Vec<u8>],
        create: bool,
    ) -> Result<Option<NodeId>, OciError> {
        let mut dir = 0;
        for (depth, name) in parts[..parts.len() - 1].iter().enumerate() {
            let existing = self.children(dir).and_then(|c| c.get(name)).copied();
            let next = match existing {
                Some(dentry) => match &self.nodes[dentry.node].kind {
                    NodeKind::Dir(_) => {
                        if create {
                            self.children_mut(dir)
                                .insert(name.clone(), Dentry { layer, ..dentry });
                        }
                        dentry.node
                    }
                    NodeKind::Symlink(_) => {
                        return Err(OciError::WritesThroughSymlink {
                            layer,
                            path: display(parts),
                            link: display(&parts[..=depth]),
                        })
                    }
                    _ if create => {
                        return Err(OciError::BadEntry {
                            layer,
                            path: display(parts),
                            reason: format!("{} is not a directory", display(&parts[..=depth])),
                        })
                    }
                    _ => return Ok(None),
                },
                None if create => {
                    let node = self.push(Node {
                        meta: Metadata {
                            mode: 0o755,
                            ..Default::default()
                        },
                        kind: NodeKind::Dir(BTreeMap::new()),
                    });
                    self.children_mut(dir)
                        .insert(name.clone(), Dentry { node, layer });
                    node
                }
                None => return Ok(None),
            };
            dir = next;
        }
        Ok(Some(dir))
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Applies one tar entry of layer `layer` (0-based, bottom first).
    pub(crate) fn apply(
        &mut self,
        layer: usize,
        raw_path: &[u8],
        meta: Metadata,
        kind: EntryKind,
    ) -> Result<(), OciError> {
        let parts = split_path(layer, raw_path)?;
        check_limits(layer, &parts, &meta, &kind)?;
        let Some(name) = parts.last().cloned() else {
            // The root itself ("./"): only its metadata can change.
            return match kind {
                EntryKind::Dir => {
                    self.nodes[0].meta = meta;
                    Ok(())
                }
                _ => Err(OciError::BadEntry {
                    layer,
                    path: "/".into(),
                    reason: "the root must be a directory".into(),
                }),
            };
        };

        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let Some(dir) = self.parent_dir(layer, &parts, false)? else {
                return Ok(());
            };
            if name == OPAQUE_MARKER {
                self.make_opaque(dir, layer);
            } else if !hidden.starts_with(WHITEOUT_PREFIX) {
                // `.wh..wh.*` other than the opaque marker is aufs bookkeeping, not a whiteout.
                let hidden = hidden.to_vec();
                match self.children(dir).and_then(|c| c.get(&hidden)).copied() {
                    Some(d) if d.layer < layer => {
                        self.children_mut(dir).remove(&hidden);
                    }
                    // A directory this layer listed before its whiteout: the
                    // whiteout still hides what lower layers put inside it.
                    Some(d) if matches!(self.nodes[d.node].kind, NodeKind::Dir(_)) => {
                        self.make_opaque(d.node, layer);
                    }
                    _ => {}
                }
            }
            return Ok(());
        }

        let dir = self
            .parent_dir(layer, &parts, true)?
            .expect("created on demand");
        let existing = self.children(dir).and_then(|c| c.get(&name)).copied();
        let node = match kind {
            EntryKind::Dir => match existing {
                // A directory over a directory keeps what is inside.
                Some(d) if matches!(self.nodes[d.node].kind, NodeKind::Dir(_)) => {
                    self.nodes[d.node].meta = meta;
                    d.node
                }
                _ => self.push(Node {
                    meta,
                    kind: NodeKind::Dir(BTreeMap::new()),
                }),
            },
            EntryKind::HardLink(target) => {
                let target_parts = split_path(layer, &target)?;
                let target_node =
                    self.lookup(layer, &target_parts)?
                        .ok_or_else(|| OciError::BadEntry {
                            layer,
                            path: display(&parts),
                            reason: format!(
                                "hard link to {:?}, which does not exist",
                                display(&target_parts)
                            ),
                        })?;
                if matches!(self.nodes[target_node].kind, NodeKind::Dir(_)) {
                    return Err(OciError::BadEntry {
                        layer,
                        path: display(&parts),
                        reason: "hard link to a directory".into(),
                    });
                }
                target_node
            }
            EntryKind::File(content, size) => self.push(Node {
                meta,
                kind: NodeKind::File(content, size),
            }),
            EntryKind::Symlink(target) => self.push(Node {
                meta,
                kind: NodeKind::Symlink(target),
            }),
            EntryKind::CharDevice(major, minor) => self.push(Node {
                meta,
                kind: NodeKind::CharDevice(major, minor),
            }),
            EntryKind::BlockDevice(major, minor) => self.push(Node {
                meta,
                kind: NodeKind::BlockDevice(major, minor),
            }),
            EntryKind::Fifo => self.push(Node {
                meta,
                kind: NodeKind::Fifo,
            }),
        };
        self.children_mut(dir).insert(name, Dentry { node, layer });
        Ok(())
    }

    /// The node at `parts`, without following symlinks in the last component.
    fn lookup(&mut self, layer: usize, parts: &[Vec<u8>]) -> Result<Option<NodeId>, OciError> {
        let Some(name) = parts.last() else {
            return Ok(Some(0));
        };
        let Some(dir) = self.parent_dir(layer, parts, false)? else {
            return Ok(None);
        };
        Ok(self.children(dir).and_then(|c| c.get(name)).map(|d| d.node))
    }

    /// Hides everything lower layers put below `dir`; what this layer listed stays.
    fn make_opaque(&mut self, dir: NodeId, layer: usize) {
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let children = self.children_mut(dir);
            children.retain(|_, d| d.layer >= layer);
            let subdirs: Vec<NodeId> = children.values().map(|d| d.node).collect();
            pending.extend(
                subdirs
                    .into_iter()
                    .filter(|&n| matches!(self.nodes[n].kind, NodeKind::Dir(_))),
            );
        }
    }

    /// Numbers inodes depth-first in name order and builds the index;
    /// `chunks` gives each content slot's chunk list.
    pub(crate) fn into_index(
        self,
        chunking: ChunkingParams,
        chunks: &mut dyn FnMut(usize) -> Vec<ChunkRef>,
    ) -> ImageIndex {
        let mut ino_of: HashMap<NodeId, u64> = HashMap::new();
        let mut order: Vec<NodeId> = Vec::new();
        let mut stack = vec![0usize];
        while let Some(node) = stack.pop() {
            if ino_of.contains_key(&node) {
                continue;
            }
            order.push(node);
            ino_of.insert(node, order.len() as u64 - 1 + ROOT_INO);
            if let NodeKind::Dir(children) = &self.nodes[node].kind {
                stack.extend(children.values().rev().map(|d| d.node));
            }
        }
        let inodes = order
            .into_iter()
            .map(|id| {
                let node = &self.nodes[id];
                let kind = match &node.kind {
                    NodeKind::Dir(children) => InodeKind::Directory {
                        entries: children
                            .iter()
                            .map(|(name, d)| DirEntry {
                                name: name.clone(),
                                ino: ino_of[&d.node],
                            })
                            .collect(),
                    },
                    NodeKind::File(Content::Empty, _) => InodeKind::File {
                        size: 0,
                        chunks: Vec::new(),
                    },
                    NodeKind::File(Content::Slot(slot), size) => InodeKind::File {
                        size: *size,
                        chunks: chunks(*slot),
                    },
                    NodeKind::Symlink(target) => InodeKind::Symlink {
                        target: target.clone(),
                    },
                    NodeKind::CharDevice(major, minor) => InodeKind::CharDevice {
                        major: *major,
                        minor: *minor,
                    },
                    NodeKind::BlockDevice(major, minor) => InodeKind::BlockDevice {
                        major: *major,
                        minor: *minor,
                    },
                    NodeKind::Fifo => InodeKind::Fifo,
                };
                Inode {
                    meta: node.meta.clone(),
                    kind,
                }
            })
            .collect();
        ImageIndex { chunking, inodes }
    }
}

/// Sorts and dedups xattrs (last value wins), as the index requires.
pub(crate) fn normalize_xattrs(mut xattrs: Vec<Xattr>) -> Vec<Xattr> {
    xattrs.reverse();
    xattrs.sort_by(|a, b| a.name.cmp(&b.name));
    xattrs.dedup_by(|a, b| a.name == b.name);
    xattrs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            mode: 0o644,
            ..Default::default()
        }
    }

    fn file(tree: &mut MergedTree, layer: usize, path: &str, size: u64) {
        tree.apply(
            layer,
            path.as_bytes(),
            meta(),
            EntryKind::File(Content::Slot(size as usize), size),
        )
        .unwrap();
    }

    fn paths(tree: MergedTree) -> Vec<String> {
        let index = tree.into_index(ChunkingParams::default(), &mut |_| Vec::new());
        index
            .walk()
            .into_iter()
            .skip(1)
            .map(|(p, _)| String::from_utf8(p).unwrap())
            .collect()
    }

    #[test]
    fn whiteouts_hide_lower_layers_only() {
        let mut tree = MergedTree::default();
        file(&mut tree, 0, "etc/a", 0);
        file(&mut tree, 0, "etc/b", 0);
        file(&mut tree, 1, "etc/c", 0);
        tree.apply(1, b"etc/.wh.c", meta(), EntryKind::File(Content::Empty, 0))
            .unwrap();
        tree.apply(1, b"etc/.wh.a", meta(), EntryKind::File(Content::Empty, 0))
            .unwrap();
        tree.apply(
            1,
            b"nowhere/.wh.x",
            meta(),
            EntryKind::File(Content::Empty, 0),
        )
        .unwrap();
        assert_eq!(paths(tree), ["etc", "etc/b", "etc/c"]);
    }

    #[test]
    fn a_whiteout_hides_lower_contents_whatever_the_tar_order() {
        let mut tree = MergedTree::default();
        file(&mut tree, 0, "a/old", 0);
        file(&mut tree, 1, "a/x", 0);
        tree.apply(1, b".wh.a", meta(), EntryKind::File(Content::Empty, 0))
            .unwrap();
        assert_eq!(paths(tree), ["a", "a/x"]);
    }

    #[test]
    fn opaque_directories_drop_lower_contents_at_any_depth() {
        let mut tree = MergedTree::default();
        file(&mut tree, 0, "d/old", 0);
        file(&mut tree, 0, "d/sub/old", 0);
        file(&mut tree, 1, "d/sub/new", 0);
        tree.apply(
            1,
            b"d/.wh..wh..opq",
            meta(),
            EntryKind::File(Content::Empty, 0),
        )
        .unwrap();
        file(&mut tree, 1, "d/after", 0);
        assert_eq!(paths(tree), ["d", "d/after", "d/sub", "d/sub/new"]);
    }

    #[test]
    fn hard_links_across_layers_share_an_inode() {
        let mut tree = MergedTree::default();
        file(&mut tree, 0, "bin/a", 5);
        tree.apply(
            1,
            b"./bin/b",
            meta(),
            EntryKind::HardLink(b"/bin/a".to_vec()),
        )
        .unwrap();
        let index = tree.into_index(ChunkingParams::default(), &mut |_| Vec::new());
        let walk = index.walk();
        let ino = |p: &str| {
            walk.iter()
                .find(|(path, _)| path == p.as_bytes())
                .unwrap()
                .1
        };
        assert_eq!(ino("bin/a"), ino("bin/b"));
        assert_eq!(index.link_counts()[ino("bin/a") as usize - 1], 2);
    }

    #[test]
    fn unsafe_paths_are_errors() {
        let mut tree = MergedTree::default();
        assert!(matches!(
            tree.apply(
                0,
                b"../../etc/passwd",
                meta(),
                EntryKind::File(Content::Empty, 0)
            ),
            Err(OciError::PathEscapesRoot { .. })
        ));
        tree.apply(0, b"link", meta(), EntryKind::Symlink(b"/etc".to_vec()))
            .unwrap();
        assert!(matches!(
            tree.apply(
                1,
                b"link/passwd",
                meta(),
                EntryKind::File(Content::Empty, 0)
            ),
            Err(OciError::WritesThroughSymlink { .. })
        ));
        // An absolute path lands inside the root.
        file(&mut tree, 0, "/abs/x", 0);
        assert!(paths(tree).contains(&"abs/x".to_string()));
    }
}
