//! Reading OCI images (image layouts and `docker save` archives), merging
//! their layers into one skiff [`ImageIndex`](skiff_format::ImageIndex), and
//! exporting an index back to a single-layer OCI image.

mod convert;
mod error;
mod export;
mod merge;
mod source;
mod verify;

pub use convert::{convert, ConvertOptions, ConvertProgress, ConvertReport};
pub use error::OciError;
pub use export::{export, ExportReport};
pub use merge::MergedTree;
pub use source::{ImageSource, LayerCompression, LayerDescriptor, Platform, ResolvedImage};
