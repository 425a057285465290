//! The regular files of one layer, as its tar holds them (not merged with
//! the layers below): what `skiff analyze` measures.

use std::io::Read;

use crate::merge::{Content, EntryKind};
use crate::source::decompressed;
use crate::tar_entry::{is_whiteout, LayerEntries};
use crate::verify::check_digest;
use crate::{ImageSource, LayerDescriptor, OciError};

/// What [`layer_files`] read: the uncompressed tar's length and, for each
/// regular file in tar order, its path and what `read` made of it.
#[derive(Debug)]
pub struct LayerFiles<T> {
    pub tar_bytes: u64,
    pub files: Vec<(Vec<u8>, T)>,
}

/// Reads `layer` of `source` (decompressed, checked against its diff_id)
/// and hands the contents of each regular file to `read` (an empty reader
/// for an empty file). Whiteouts, links, directories and devices are not
/// files here. Memory grows with the number of files, not their bytes.
pub fn layer_files<T>(
    source: &ImageSource,
    layer: &LayerDescriptor,
    index: usize,
    mut read: impl FnMut(&mut dyn Read, u64) -> Result<T, OciError>,
) -> Result<LayerFiles<T>, OciError> {
    let blob = source.open_layer(layer)?;
    let mut tar_stream = decompressed(blob, layer.compression)?;
    let mut files = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut tar_stream);
        let mut entries = LayerEntries::new(index, &mut archive)?;
        loop {
            let mut read_here = None;
            let mut contents = |reader: &mut dyn Read, size: u64| {
                read_here = Some(read(reader, size)?);
                Ok(Content::Empty)
            };
            let Some((path, _, kind)) = entries.next_entry(&mut contents)? else {
                break;
            };
            let EntryKind::File(_, size) = kind else {
                continue;
            };
            if is_whiteout(&path) {
                continue;
            }
            let made = match read_here {
                Some(made) => made,
                None => read(&mut std::io::empty(), size)?,
            };
            files.push((path, made));
        }
    }
    let (tar_bytes, diff_id) = tar_stream.finish(&format!("layer {index}"))?;
    check_digest(
        &format!("layer {index} (uncompressed)"),
        &layer.diff_id,
        diff_id,
    )?;
    Ok(LayerFiles { tar_bytes, files })
}
