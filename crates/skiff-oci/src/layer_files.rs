//! The regular files of one layer, as its tar holds them (not merged with
//! the layers below): what `skiff analyze` measures.

use std::io::Read;

use skiff_store::Store;

use crate::export::ChunkReader;
use crate::layer_cache::{self, RecordedKind};
use crate::merge::{Content, EntryKind};
use crate::source::{decompressed, malformed, BlobLocation};
use crate::tar_entry::{is_whiteout, LayerEntries};
use crate::verify::check_digest;
use crate::{ImageSource, LayerDescriptor, OciError};

/// What [`layer_files`] read: the uncompressed tar's length and, for each
/// regular file in tar order, its path and what `read` made of it.
#[derive(Debug)]
pub struct LayerFiles<T> {
    pub tar_bytes: u64,
    /// Whether `tar_bytes` is reckoned from the entries (a layer of a skiff
    /// store, whose tar is gone) rather than counted.
    pub tar_bytes_estimated: bool,
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
    if let (BlobLocation::Recorded, ImageSource::Store { store, .. }) = (&layer.location, source) {
        return recorded_layer_files(store, layer, index, read);
    }
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
    Ok(LayerFiles {
        tar_bytes,
        tar_bytes_estimated: false,
        files,
    })
}

/// Bytes a tar spends on an entry: a header, the contents in 512-byte
/// blocks, and an extended header where a name or link target outgrows
/// the header's 100 bytes.
fn tar_entry_bytes(path: &[u8], kind: &RecordedKind) -> u64 {
    let block = |n: u64| n.div_ceil(512) * 512;
    let (size, target) = match kind {
        RecordedKind::File { size, .. } => (*size, &[][..]),
        RecordedKind::Symlink(target) | RecordedKind::HardLink(target) => (0, &target[..]),
        _ => (0, &[][..]),
    };
    let long = path.len() > 100 || target.len() > 100;
    let extended = if long {
        512 + block((path.len() + target.len() + 40) as u64)
    } else {
        0
    };
    512 + block(size) + extended
}

/// [`layer_files`] for a layer of a skiff store image: its files from the
/// record the conversion kept, their contents from the store's chunks.
fn recorded_layer_files<T>(
    store: &Store,
    layer: &LayerDescriptor,
    index: usize,
    mut read: impl FnMut(&mut dyn Read, u64) -> Result<T, OciError>,
) -> Result<LayerFiles<T>, OciError> {
    let what = || format!("layer {index} ({})", layer.diff_id);
    let record = store.layer_record(&layer.diff_id)?.ok_or_else(|| {
        malformed(
            what(),
            "the store keeps no record of it (convert the image again)",
        )
    })?;
    let entries = layer_cache::decode(&record)
        .ok_or_else(|| malformed(what(), "its record is damaged or of another version"))?;
    // The two zero blocks that end a tar.
    let mut tar_bytes = 1024;
    let mut files = Vec::new();
    for entry in entries {
        tar_bytes += tar_entry_bytes(&entry.path, &entry.kind);
        let RecordedKind::File { size, chunks } = entry.kind else {
            continue;
        };
        if is_whiteout(&entry.path) {
            continue;
        }
        let mut contents = ChunkReader::new(store, &chunks);
        // Named as a tar layer's entry is (tar_entry.rs), by its path.
        let made = read(&mut contents, size).map_err(|e| match e {
            OciError::Io { source, .. } => OciError::BadEntry {
                layer: index,
                path: String::from_utf8_lossy(&entry.path).into_owned(),
                reason: format!("reading contents: {source}"),
            },
            other => other,
        })?;
        files.push((entry.path, made));
    }
    Ok(LayerFiles {
        tar_bytes,
        tar_bytes_estimated: true,
        files,
    })
}
