//! `relayer`: a set of images with their layers cut anew, so that what the
//! images share is stored once ("Carving Perfect Layers", HotCloud '19).
//!
//! Every path of every image's merged tree is an entry, named by all it is:
//! path, kind, owner, mode, times, xattrs and contents. Entries held by the
//! same set of images form a group. Two cuts into layers are tried, and the
//! one that stores less is kept: a layer per group, the groups that save
//! the most (their bytes times the other images sharing them) first while
//! the images have places under `max_layers` (`by_saving`); or a tree of
//! the images joined by how much they hold in common, a layer per node of
//! what all images below it hold (`by_likeness`). What gets no layer goes
//! into each holder's top layer, its own.
//!
//! A file's names (hard links) are one entry, so a link and its target are
//! always in the same layer. Directories go into each image's top layer:
//! their mode, owner and mtime are then the last word (lower layers put
//! files under parents made on the way). The layers hold no whiteouts:
//! their union is the image's tree, path for path.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;
use skiff_format::{ImageIndex, ImageManifest, Inode, InodeKind, InodeNo};
use skiff_store::Store;

use crate::export::{
    append_entry, layout_tags, prepare_layout, tag_images, write_image_blobs, write_layer,
    WrittenLayer,
};
use crate::OciError;

/// Told how far a relayering is.
pub trait RelayerProgress: Sync {
    /// The layers about to be written, and the file bytes they hold.
    fn start(&self, _layers: usize, _bytes: u64) {}
    /// More file bytes were written.
    fn advance(&self, _bytes: u64) {}
}

impl RelayerProgress for () {}

/// What was written for one image.
#[derive(Debug, Serialize)]
pub struct RelayeredImage {
    pub tag: String,
    pub manifest_digest: String,
    /// The image's layers, bottom first (indexes into [`RelayerReport::layers`]).
    pub layers: Vec<usize>,
}

/// What [`relayer`] wrote.
#[derive(Debug, Serialize)]
pub struct RelayerReport {
    pub images: Vec<RelayeredImage>,
    /// Every distinct layer written.
    pub layers: Vec<WrittenLayer>,
}

impl RelayerReport {
    /// Bytes of the distinct layers: what a registry stores, and what a
    /// host pulling every image transfers.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// One path of a new layer, as image `image` has it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Placed {
    image: usize,
    path: Vec<u8>,
    ino: InodeNo,
    /// For the second and later names of a file: the first.
    link_to: Option<Vec<u8>>,
}

/// The new layers, and which of them each image stacks.
#[derive(Debug)]
struct Plan {
    /// Each distinct layer's entries, in tar order.
    layers: Vec<Vec<Placed>>,
    /// Each image's layers, bottom first.
    images: Vec<Vec<usize>>,
}

/// Bytes an entry's header costs in a tar, beside its contents.
const HEADER_BYTES: u64 = 512;

/// Everything a file, symlink or device is, with all its names, as one
/// digest: two images hold the same entry when these agree.
fn describe(names: &[Vec<u8>], inode: &Inode) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    let mut field = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    for name in names {
        field(name);
    }
    field(b"");
    let meta = &inode.meta;
    field(&inode.type_bits().to_le_bytes());
    field(&meta.mode.to_le_bytes());
    field(&meta.uid.to_le_bytes());
    field(&meta.gid.to_le_bytes());
    field(&meta.mtime.to_le_bytes());
    field(&meta.mtime_nsec.to_le_bytes());
    for xattr in &meta.xattrs {
        field(&xattr.name);
        field(&xattr.value);
    }
    match &inode.kind {
        InodeKind::File { size, chunks } => {
            field(&size.to_le_bytes());
            for chunk in chunks {
                field(chunk.id.as_bytes());
            }
        }
        InodeKind::Symlink { target } => field(target),
        InodeKind::CharDevice { major, minor } | InodeKind::BlockDevice { major, minor } => {
            field(&major.to_le_bytes());
            field(&minor.to_le_bytes());
        }
        InodeKind::Directory { .. } | InodeKind::Fifo | InodeKind::Socket => {}
    }
    *hasher.finalize().as_bytes()
}

/// Depth-first name order, the order `ImageIndex::walk` yields: parents
/// before children, and a hard link's first name before the others.
fn tar_order(a: &Placed, b: &Placed) -> std::cmp::Ordering {
    a.path
        .split(|&c| c == b'/')
        .cmp(b.path.split(|&c| c == b'/'))
}

fn file_bytes(index: &ImageIndex, ino: InodeNo) -> u64 {
    match index.inode(ino).map(|i| &i.kind) {
        Some(InodeKind::File { size, .. }) => *size,
        _ => 0,
    }
}

/// The images' entries, grouped by the set of images holding them.
struct Grouping {
    /// Every distinct entry: a file's names, first name first.
    entries: Vec<Vec<Placed>>,
    /// Each group: the images holding its entries (ascending), and the entries.
    groups: Vec<(Vec<usize>, Vec<usize>)>,
    group_bytes: Vec<u64>,
    /// Each image's directories.
    tops: Vec<Vec<Placed>>,
}

impl Grouping {
    fn new(indexes: &[ImageIndex]) -> Grouping {
        // Every distinct entry (a file's names, first name first): where it
        // was first seen, and the images holding it.
        let mut by_key: HashMap<[u8; 32], usize> = HashMap::new();
        let mut entries: Vec<Vec<Placed>> = Vec::new();
        let mut holders: Vec<Vec<usize>> = Vec::new();
        // Each image's directories, for its top layer.
        let mut tops: Vec<Vec<Placed>> = vec![Vec::new(); indexes.len()];
        for (image, index) in indexes.iter().enumerate() {
            let mut names: HashMap<InodeNo, Vec<Vec<u8>>> = HashMap::new();
            let mut files = Vec::new();
            for (path, ino) in index.walk() {
                match index.inode(ino).map(|i| &i.kind) {
                    Some(InodeKind::Directory { .. }) => tops[image].push(Placed {
                        image,
                        path,
                        ino,
                        link_to: None,
                    }),
                    Some(_) => {
                        let seen = names.entry(ino).or_default();
                        if seen.is_empty() {
                            files.push(ino);
                        }
                        seen.push(path);
                    }
                    None => {}
                }
            }
            for ino in files {
                let (Some(inode), Some(names)) = (index.inode(ino), names.remove(&ino)) else {
                    continue;
                };
                let key = describe(&names, inode);
                let at = *by_key.entry(key).or_insert_with(|| {
                    let first = names[0].clone();
                    entries.push(
                        names
                            .into_iter()
                            .enumerate()
                            .map(|(n, path)| Placed {
                                image,
                                path,
                                ino,
                                link_to: (n > 0).then(|| first.clone()),
                            })
                            .collect(),
                    );
                    holders.push(Vec::new());
                    entries.len() - 1
                });
                holders[at].push(image);
            }
        }

        // Entries by the set of images holding them, in the order first seen.
        let mut group_of_set: HashMap<&[usize], usize> = HashMap::new();
        let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new(); // (images, entries)
        for (at, images) in holders.iter().enumerate() {
            let group = *group_of_set.entry(images.as_slice()).or_insert_with(|| {
                groups.push((images.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[group].1.push(at);
        }
        let group_bytes: Vec<u64> = groups
            .iter()
            .map(|(_, members)| {
                members
                    .iter()
                    .map(|&at| {
                        let e = &entries[at][0];
                        HEADER_BYTES * entries[at].len() as u64
                            + file_bytes(&indexes[e.image], e.ino)
                    })
                    .sum()
            })
            .collect();
        Grouping {
            entries,
            groups,
            group_bytes,
            tops,
        }
    }

    fn placed(&self, group: usize) -> impl Iterator<Item = Placed> + '_ {
        self.groups[group]
            .1
            .iter()
            .flat_map(|&at| self.entries[at].iter().cloned())
    }

    /// What storing group `g` once instead of in each of its images saves.
    fn saving(&self, g: usize) -> u64 {
        self.group_bytes[g] * (self.groups[g].0.len() as u64 - 1)
    }
}

/// Which groups make each shared layer, and each image's stack of them.
struct Cut {
    /// The groups in each shared layer.
    layers: Vec<Vec<usize>>,
    /// Each image's shared layers, bottom first.
    stacks: Vec<Vec<usize>>,
    /// The groups in each image's top layer, beside its directories.
    own: Vec<Vec<usize>>,
}

impl Cut {
    /// The bytes its layers hold, all told (directories left out: every cut
    /// stores each image's once).
    fn bytes(&self, grouping: &Grouping) -> u64 {
        self.layers
            .iter()
            .chain(&self.own)
            .flatten()
            .map(|&g| grouping.group_bytes[g])
            .sum()
    }

    fn into_plan(self, grouping: Grouping) -> Plan {
        let mut layers: Vec<Vec<Placed>> = self
            .layers
            .iter()
            .map(|groups| {
                let mut placed: Vec<Placed> =
                    groups.iter().flat_map(|&g| grouping.placed(g)).collect();
                placed.sort_by(tar_order);
                placed
            })
            .collect();
        let mut images = Vec::with_capacity(self.stacks.len());
        for ((mut stack, own), top) in self.stacks.into_iter().zip(&self.own).zip(&grouping.tops) {
            let mut top = top.clone();
            top.extend(own.iter().flat_map(|&g| grouping.placed(g)));
            // Never empty: the root is a directory.
            top.sort_by(tar_order);
            layers.push(top);
            stack.push(layers.len() - 1);
            images.push(stack);
        }
        Plan { layers, images }
    }
}

/// Cuts the images' trees into layers, at most `max_layers` an image: the
/// cut by what each group saves, or the cut along how alike the images are,
/// whichever stores less.
fn plan(indexes: &[ImageIndex], max_layers: usize) -> Plan {
    let grouping = Grouping::new(indexes);
    let greedy = by_saving(&grouping, max_layers);
    let cut = match by_likeness(&grouping, max_layers) {
        Some(likeness) if likeness.bytes(&grouping) < greedy.bytes(&grouping) => likeness,
        _ => greedy,
    };
    cut.into_plan(grouping)
}

/// Shared groups become layers, the most saving first, each for the images
/// holding it that still have a place: the top layer (the directories)
/// takes one of each image's. A group only one of its images has room for
/// would save nothing as a layer. What is not a layer goes into each
/// holder's top layer, its own anyway.
fn by_saving(grouping: &Grouping, max_layers: usize) -> Cut {
    let images = grouping.tops.len();
    let mut by_saving: Vec<usize> = (0..grouping.groups.len())
        .filter(|&g| grouping.saving(g) > 0)
        .collect();
    by_saving.sort_by_key(|&g| (std::cmp::Reverse(grouping.saving(g)), g));
    let mut room = vec![max_layers - 1; images];
    let mut cut = Cut {
        layers: Vec::new(),
        stacks: vec![Vec::new(); images],
        own: vec![Vec::new(); images],
    };
    let mut kept = vec![false; grouping.groups.len()];
    let mut stacks: Vec<Vec<(usize, usize)>> = vec![Vec::new(); images];
    for g in by_saving {
        let held_by = &grouping.groups[g].0;
        let keepers: Vec<usize> = held_by.iter().copied().filter(|&i| room[i] > 0).collect();
        if keepers.len() < 2 {
            continue;
        }
        cut.layers.push(vec![g]);
        kept[g] = true;
        for &i in &keepers {
            room[i] -= 1;
            stacks[i].push((held_by.len(), cut.layers.len() - 1));
        }
        for &i in held_by {
            if !keepers.contains(&i) {
                cut.own[i].push(g);
            }
        }
    }
    for (g, (held_by, _)) in grouping.groups.iter().enumerate() {
        if !kept[g] {
            for &i in held_by {
                cut.own[i].push(g);
            }
        }
    }
    for (i, mut stack) in stacks.into_iter().enumerate() {
        // The most widely shared at the bottom, as a base image's layers are.
        stack.sort_by_key(|&(holders, layer)| (std::cmp::Reverse(holders), layer));
        cut.stacks[i] = stack.into_iter().map(|(_, layer)| layer).collect();
    }
    cut
}

/// Image sets are bit masks here: the likeness cut is tried for this many
/// images at most (the saving cut has no bound).
const LIKENESS_AT_MOST: usize = 64;

/// A cut along how alike the images are, as images built on each other
/// are layered: the two most alike (the most bytes held by both) are joined,
/// then the two most alike of what is left, and so on into a tree. Each
/// group goes into the highest nodes whose images all hold it, and each
/// image stacks the nodes above it. A path longer than `max_layers` loses
/// the node that saves least, whose groups go down to its children.
fn by_likeness(grouping: &Grouping, max_layers: usize) -> Option<Cut> {
    let images = grouping.tops.len();
    if !(2..=LIKENESS_AT_MOST).contains(&images) {
        return None;
    }
    let masks: Vec<u64> = grouping
        .groups
        .iter()
        .map(|(held_by, _)| held_by.iter().fold(0u64, |m, &i| m | 1 << i))
        .collect();
    // Bytes of the groups every image of `mask` holds.
    let shared = |mask: u64| -> u64 {
        masks
            .iter()
            .zip(&grouping.group_bytes)
            .filter(|(held, _)| *held & mask == mask)
            .map(|(_, bytes)| bytes)
            .sum()
    };
    struct Node {
        mask: u64,
        children: Vec<usize>,
        parent: Option<usize>,
        groups: Vec<usize>,
        alive: bool,
    }
    let mut nodes: Vec<Node> = (0..images)
        .map(|i| Node {
            mask: 1 << i,
            children: Vec::new(),
            parent: None,
            groups: Vec::new(),
            alive: true,
        })
        .collect();
    let mut roots: Vec<usize> = (0..images).collect();
    let mut scores: HashMap<(usize, usize), u64> = HashMap::new();
    for (x, &a) in roots.iter().enumerate() {
        for &b in &roots[x + 1..] {
            scores.insert((a, b), shared(nodes[a].mask | nodes[b].mask));
        }
    }
    loop {
        let best = scores
            .iter()
            .filter(|(_, &score)| score > 0)
            .max_by_key(|(&(a, b), &score)| (score, std::cmp::Reverse((a, b))))
            .map(|(&pair, _)| pair);
        let Some((a, b)) = best else { break };
        let joined = nodes.len();
        nodes.push(Node {
            mask: nodes[a].mask | nodes[b].mask,
            children: vec![a, b],
            parent: None,
            groups: Vec::new(),
            alive: true,
        });
        nodes[a].parent = Some(joined);
        nodes[b].parent = Some(joined);
        roots.retain(|&r| r != a && r != b);
        scores.retain(|&(x, y), _| x != a && x != b && y != a && y != b);
        for &r in &roots {
            scores.insert((r, joined), shared(nodes[r].mask | nodes[joined].mask));
        }
        roots.push(joined);
    }
    // Each group to the highest nodes all of whose images hold it.
    for (g, &held) in masks.iter().enumerate() {
        let mut stack: Vec<usize> = roots
            .iter()
            .copied()
            .filter(|&r| nodes[r].mask & held != 0)
            .collect();
        while let Some(at) = stack.pop() {
            if nodes[at].mask & !held == 0 {
                nodes[at].groups.push(g);
            } else {
                stack.extend(
                    nodes[at]
                        .children
                        .iter()
                        .copied()
                        .filter(|&c| nodes[c].mask & held != 0),
                );
            }
        }
    }
    // The nodes with groups above leaf `i`, nearest first.
    let above = |nodes: &[Node], i: usize| -> Vec<usize> {
        let mut path = Vec::new();
        let mut at = nodes[i].parent;
        while let Some(node) = at {
            if nodes[node].alive && !nodes[node].groups.is_empty() {
                path.push(node);
            }
            at = nodes[node].parent;
        }
        path
    };
    let node_saving = |node: &Node| -> u64 {
        let bytes: u64 = node.groups.iter().map(|&g| grouping.group_bytes[g]).sum();
        bytes * u64::from(node.mask.count_ones() - 1)
    };
    loop {
        let too_deep: Vec<usize> = (0..images)
            .flat_map(|i| {
                let path = above(&nodes, i);
                if path.len() + 1 > max_layers {
                    path
                } else {
                    Vec::new()
                }
            })
            .collect();
        let Some(&weakest) = too_deep
            .iter()
            .min_by_key(|&&n| (node_saving(&nodes[n]), n))
        else {
            break;
        };
        // Its groups go down to the nodes below it (copied into each).
        let groups = std::mem::take(&mut nodes[weakest].groups);
        nodes[weakest].alive = false;
        let mut below = nodes[weakest].children.clone();
        while let Some(node) = below.pop() {
            if nodes[node].alive {
                nodes[node].groups.extend(groups.iter().copied());
            } else {
                below.extend(nodes[node].children.iter().copied());
            }
        }
    }
    let mut cut = Cut {
        layers: Vec::new(),
        stacks: vec![Vec::new(); images],
        own: (0..images).map(|i| nodes[i].groups.clone()).collect(),
    };
    let mut layer_of: HashMap<usize, usize> = HashMap::new();
    for i in 0..images {
        let mut path = above(&nodes, i);
        // The root at the bottom.
        path.reverse();
        cut.stacks[i] = path
            .into_iter()
            .map(|node| {
                *layer_of.entry(node).or_insert_with(|| {
                    cut.layers.push(nodes[node].groups.clone());
                    cut.layers.len() - 1
                })
            })
            .collect();
    }
    Some(cut)
}

/// Writes `images` (each with the tag it gets in `dir`) into the OCI layout
/// `dir` with their layers cut anew, at most `max_layers` an image; the
/// layers are gzip'd at the usual level, so any docker pulls them. Every
/// image's tree stays the same, path for path.
pub fn relayer(
    store: &Store,
    images: &[(String, ImageManifest)],
    dir: &Path,
    max_layers: usize,
    progress: &dyn RelayerProgress,
) -> Result<RelayerReport, OciError> {
    if max_layers == 0 {
        return Err(OciError::Malformed {
            what: "--max-layers".into(),
            reason: "an image needs a layer at least".into(),
        });
    }
    let indexes = images
        .iter()
        .map(|(_, manifest)| store.index(&manifest.index.digest))
        .collect::<Result<Vec<_>, _>>()?;
    // An image already in the layout stays: its tag is not taken.
    let taken = layout_tags(dir)?;
    if let Some((tag, _)) = images.iter().find(|(tag, _)| taken.contains(tag)) {
        return Err(OciError::Malformed {
            what: format!("output layout {}", dir.display()),
            reason: format!("it already has an image tagged {tag}"),
        });
    }
    let plan = plan(&indexes, max_layers);
    let blobs = prepare_layout(dir)?;
    let total: u64 = plan
        .layers
        .iter()
        .flatten()
        .filter(|p| p.link_to.is_none())
        .map(|p| file_bytes(&indexes[p.image], p.ino))
        .sum();
    progress.start(plan.layers.len(), total);
    let mut written = Vec::with_capacity(plan.layers.len());
    for layer in &plan.layers {
        written.push(write_layer(
            &blobs,
            flate2::Compression::default(),
            |tar| {
                for placed in layer {
                    let index = &indexes[placed.image];
                    let inode = index
                        .inode(placed.ino)
                        .expect("the plan holds the index's own inodes");
                    let link_to = placed.link_to.as_deref();
                    append_entry(tar, store, &placed.path, inode, link_to, &|n| {
                        progress.advance(n);
                    })?;
                }
                Ok(())
            },
        )?);
    }
    let mut report = RelayerReport {
        images: Vec::with_capacity(images.len()),
        layers: Vec::new(),
    };
    // Two layers with the same bytes (the top layers of images with the same
    // directories, say) are one blob.
    let mut distinct: HashMap<String, usize> = HashMap::new();
    let mut tags = Vec::with_capacity(images.len());
    for ((tag, manifest), stack) in images.iter().zip(&plan.images) {
        let layers: Vec<WrittenLayer> = stack.iter().map(|&l| written[l].clone()).collect();
        let (manifest_digest, size) = write_image_blobs(dir, manifest.config.get(), &layers)?;
        tags.push((tag.clone(), manifest_digest.clone(), size));
        let layers = layers
            .into_iter()
            .map(|layer| {
                *distinct.entry(layer.digest.clone()).or_insert_with(|| {
                    report.layers.push(layer);
                    report.layers.len() - 1
                })
            })
            .collect();
        report.images.push(RelayeredImage {
            tag: tag.clone(),
            manifest_digest,
            layers,
        });
    }
    // Tagged once every blob is written: a failure leaves no image half there.
    tag_images(dir, &tags)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use skiff_format::{ChunkId, ChunkRef, ChunkingParams, DirEntry, Metadata};

    /// An index of files at `paths` (each a single chunk named by its path
    /// and `seed`) in directories made on the way, plus a hard link to the
    /// first file.
    fn index(paths: &[&str], seed: u8) -> ImageIndex {
        let dir = |entries: Vec<DirEntry>| Inode {
            meta: Metadata {
                mode: 0o755,
                ..Metadata::default()
            },
            kind: InodeKind::Directory { entries },
        };
        let mut inodes = vec![dir(Vec::new())];
        for path in paths {
            let chunk = ChunkRef {
                id: ChunkId::of(&[path.as_bytes(), &[seed]].concat()),
                len: 1000,
            };
            inodes.push(Inode {
                meta: Metadata {
                    mode: 0o644,
                    ..Metadata::default()
                },
                kind: InodeKind::File {
                    size: 1000,
                    chunks: vec![chunk],
                },
            });
            let ino = inodes.len() as InodeNo;
            let InodeKind::Directory { entries } = &mut inodes[0].kind else {
                unreachable!()
            };
            entries.push(DirEntry {
                name: path.as_bytes().to_vec(),
                ino,
            });
        }
        let InodeKind::Directory { entries } = &mut inodes[0].kind else {
            unreachable!()
        };
        entries.push(DirEntry {
            name: b"zz-link".to_vec(),
            ino: 2,
        });
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        ImageIndex {
            chunking: ChunkingParams::default(),
            inodes,
        }
    }

    /// `index` without its hard link.
    fn unlinked(mut index: ImageIndex) -> ImageIndex {
        let InodeKind::Directory { entries } = &mut index.inodes[0].kind else {
            unreachable!()
        };
        entries.retain(|e| e.name != b"zz-link");
        index
    }

    /// `index` with the file at `name` made `size` bytes long.
    fn sized(mut index: ImageIndex, name: &str, size: u32) -> ImageIndex {
        let InodeKind::Directory { entries } = &index.inodes[0].kind else {
            unreachable!()
        };
        let ino = entries
            .iter()
            .find(|e| e.name == name.as_bytes())
            .unwrap()
            .ino;
        let InodeKind::File { size: len, chunks } = &mut index.inodes[ino as usize - 1].kind else {
            unreachable!()
        };
        *len = u64::from(size);
        chunks[0].len = size;
        index
    }

    #[test]
    fn under_a_tight_bound_images_alike_share_what_they_have_in_common() {
        // A small base in all four; a big "lang" in 0 and 1, another in 2 and 3.
        let image = |lang: &str| sized(unlinked(index(&["base", lang], 0)), lang, 50_000);
        let images = [
            image("lang-l"),
            image("lang-l"),
            image("lang-m"),
            image("lang-m"),
        ];
        let plan = plan(&images, 2);
        // One layer beside the top: the base and the language together,
        // shared by the two images that hold both.
        assert_eq!(paths(&plan, 0), [vec!["base", "lang-l"], vec![""]]);
        assert_eq!(paths(&plan, 2), [vec!["base", "lang-m"], vec![""]]);
        assert_eq!(plan.images[0][0], plan.images[1][0]);
        assert_eq!(plan.images[2][0], plan.images[3][0]);
        // By what each group saves alone, each image would hold a copy of
        // the base or of its language.
        let grouping = Grouping::new(&images);
        let greedy = by_saving(&grouping, 2).bytes(&grouping);
        let likeness = by_likeness(&grouping, 2).unwrap().bytes(&grouping);
        assert!(likeness < greedy, "{likeness} vs {greedy}");
    }

    fn paths(plan: &Plan, image: usize) -> Vec<Vec<String>> {
        plan.images[image]
            .iter()
            .map(|&l| {
                plan.layers[l]
                    .iter()
                    .map(|p| String::from_utf8_lossy(&p.path).into_owned())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn files_held_by_the_same_images_share_a_layer_and_the_rest_fit_the_bound() {
        let images = || {
            [
                index(&["base1", "base2", "ab", "a-only"], 0),
                index(&["base1", "base2", "ab", "b-only"], 0),
                index(&["base1", "base2", "c-only"], 0),
            ]
        };
        let plan = plan(&images(), 8);
        // zz-link is base1's second name: it goes where base1 goes. What
        // one image alone holds is in its top layer, with the directories.
        assert_eq!(
            paths(&plan, 0),
            [
                vec!["base1", "base2", "zz-link"],
                vec!["ab"],
                vec!["", "a-only"],
            ]
        );
        // The shared layers are the same layers, not copies.
        assert_eq!(plan.images[0][..2], plan.images[1][..2]);
        assert_eq!(plan.images[0][0], plan.images[2][0]);
        assert_eq!(plan.images[2].len(), 2);
        // Under a bound of 2, the base (the most saving) stays a layer, and
        // what a and b share goes into each one's top layer.
        let plan = super::plan(&images(), 2);
        assert_eq!(
            paths(&plan, 0),
            [vec!["base1", "base2", "zz-link"], vec!["", "a-only", "ab"]]
        );
        assert_eq!(plan.images[0][0], plan.images[1][0]);
        let plan_one = super::plan(&[index(&["x", "y"], 0)], 1);
        assert_eq!(paths(&plan_one, 0), [vec!["", "x", "y", "zz-link"]]);
    }

    #[test]
    fn a_group_only_one_of_its_images_has_room_for_is_no_layer() {
        // a and b share "ab" (big), b and c share "bc" (small): with one place
        // beside the top layer, b takes "ab", and "bc" would be c's alone.
        let mut a = unlinked(index(&["ab"], 0));
        let mut b = unlinked(index(&["ab", "bc"], 0));
        let c = unlinked(index(&["bc"], 0));
        for index in [&mut a, &mut b] {
            let InodeKind::File { size, chunks } = &mut index.inodes[1].kind else {
                unreachable!()
            };
            *size = 50_000;
            chunks[0].len = 50_000;
        }
        let plan = plan(&[a, b, c], 2);
        assert_eq!(paths(&plan, 1), [vec!["ab"], vec!["", "bc"]]);
        assert_eq!(paths(&plan, 2), [vec!["", "bc"]]);
        // With a place more, "bc" is a layer of both.
        let b = unlinked(index(&["ab", "bc"], 0));
        let plan = super::plan(&[b, unlinked(index(&["bc"], 0))], 3);
        assert_eq!(paths(&plan, 1), [vec!["bc"], vec![""]]);
    }

    #[test]
    fn a_file_that_differs_in_anything_is_not_shared() {
        let a = index(&["f", "g"], 0);
        let b = index(&["f", "g"], 1); // other contents under the same paths
        let mut c = index(&["f", "g"], 0);
        c.inodes[1].meta.mtime = 7;
        let plan = plan(&[a, b, c], 8);
        assert_eq!(paths(&plan, 0), [vec!["g"], vec!["", "f", "zz-link"]]);
        // a and c share g only; b shares nothing with them.
        assert_eq!(plan.images[0][0], plan.images[2][0]);
        assert!(!plan.images[1].contains(&plan.images[0][0]));
    }
}
