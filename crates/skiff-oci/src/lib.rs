//! Reading OCI images (image layouts, `docker save` archives and registries), merging
//! their layers into one skiff [`ImageIndex`](skiff_format::ImageIndex), and
//! exporting an index back to a single-layer OCI image.

mod archive;
mod convert;
mod error;
mod export;
mod layer_cache;
mod layout;
mod merge;
mod registry;
mod source;
mod tar_entry;
mod verify;

pub use convert::{convert, ConvertOptions, ConvertProgress, ConvertReport};
pub use error::OciError;
pub use export::{export, ExportReport};
pub use merge::MergedTree;
pub use source::{ImageSource, LayerCompression, LayerDescriptor, Platform, ResolvedImage};

/// Entry points for the fuzz targets (`tests/fuzz`): the layer parser as
/// `convert` runs it, without a store or a registry.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::io::Read;

    use skiff_format::{ChunkingParams, ImageIndex};

    use crate::merge::Content;
    use crate::tar_entry::{bad_layer, parse_entry, PendingExtensions};
    use crate::{MergedTree, OciError};

    /// Applies `tar` as layers 0 and 1 (the same bytes twice, so that
    /// whiteouts and hard links meet what they name) and builds the index.
    pub fn read_layers(tar: &[u8]) -> Result<ImageIndex, OciError> {
        let mut tree = MergedTree::default();
        let mut slots = 0usize;
        for layer in 0..2 {
            let mut archive = tar::Archive::new(tar);
            let mut pending = PendingExtensions::default();
            for entry in archive
                .entries()
                .map_err(|e| bad_layer(layer, e))?
                .raw(true)
            {
                let mut entry = entry.map_err(|e| bad_layer(layer, e))?;
                let mut contents = |reader: &mut dyn Read, _size: u64| {
                    std::io::copy(reader, &mut std::io::sink()).map_err(|e| bad_layer(layer, e))?;
                    slots += 1;
                    Ok(Content::Slot(slots - 1))
                };
                if let Some((path, meta, kind)) =
                    parse_entry(layer, &mut entry, &mut pending, &mut contents)?
                {
                    tree.apply(layer, &path, meta, kind)?;
                }
            }
        }
        Ok(tree.into_index(ChunkingParams::default(), &mut |_| Vec::new()))
    }
}
