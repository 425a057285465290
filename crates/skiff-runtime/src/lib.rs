//! Running a container on an image's root file system: a writable overlay
//! over the (read-only, lazily fetched) image, an OCI runtime bundle written
//! from the image's own config, and crun or runc to run it.
//!
//! This crate knows nothing of chunks or mounts of images: it is handed a
//! directory holding the image's root and the image's OCI config.

mod bundle;
mod confine;
mod error;
mod overlay;
mod runtime;

pub use bundle::{write_bundle, ExecConfig, RunOptions};
pub use confine::{Network, SecurityOptions};
pub use error::RuntimeError;
pub use overlay::Overlay;
pub use runtime::Runtime;
