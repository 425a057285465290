//! Reading OCI images (image layouts, `docker save` archives and registries), merging
//! their layers into one skiff [`ImageIndex`](skiff_format::ImageIndex), and
//! exporting an index back to a single-layer OCI image.

mod archive;
mod convert;
mod error;
mod export;
mod layer_cache;
mod layer_files;
mod layout;
mod merge;
mod registry;
mod relayer;
mod source;
mod tar_entry;
mod verify;

pub use convert::{convert, ConvertOptions, ConvertProgress, ConvertReport};
pub use error::OciError;
pub use export::{export, ExportReport, WrittenLayer};
pub use layer_cache::{layer_path_order, PathOrder};
pub use layer_files::{layer_files, LayerFiles};
pub use merge::MergedTree;
pub use relayer::{relayer, RelayerProgress, RelayerReport, RelayeredImage};
pub use source::{ImageSource, LayerCompression, LayerDescriptor, Platform, ResolvedImage};

/// Entry points for the fuzz targets (`tests/fuzz`): the layer parser as
/// `convert` runs it, without a store or a registry.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::io::Read;

    use skiff_format::{ChunkId, ChunkRef, ChunkingParams, ImageIndex};

    use crate::merge::Content;
    use crate::tar_entry::{bad_layer, LayerEntries};
    use crate::{MergedTree, OciError};

    /// Applies `tar` as layers 0 and 1 (the same bytes twice, so that
    /// whiteouts and hard links meet what they name) and builds the index.
    pub fn read_layers(tar: &[u8]) -> Result<ImageIndex, OciError> {
        let mut tree = MergedTree::default();
        // Each file's length, by slot: its chunks are made up to match.
        let mut sizes: Vec<u64> = Vec::new();
        for layer in 0..2 {
            let mut archive = tar::Archive::new(tar);
            let mut entries = LayerEntries::new(layer, &mut archive)?;
            loop {
                let mut contents = |reader: &mut dyn Read, _size: u64| {
                    let read = std::io::copy(reader, &mut std::io::sink())
                        .map_err(|e| bad_layer(layer, e))?;
                    sizes.push(read);
                    Ok(Content::Slot(sizes.len() - 1))
                };
                let Some((path, meta, kind)) = entries.next_entry(&mut contents)? else {
                    break;
                };
                tree.apply(layer, &path, meta, kind)?;
            }
        }
        let chunking = ChunkingParams::default();
        let max = u64::from(chunking.max_size);
        Ok(tree.into_index(chunking, &mut |slot| {
            let size = sizes.get(slot).copied().unwrap_or(0);
            (0..size.div_ceil(max))
                .map(|n| ChunkRef {
                    id: ChunkId::of(&[slot.to_le_bytes(), n.to_le_bytes()].concat()),
                    len: (size - n * max).min(max) as u32,
                })
                .collect()
        }))
    }
}
