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
