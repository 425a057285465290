use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the image config is not valid: {0}")]
    ImageConfig(String),
    #[error("the image has no command to run (no Entrypoint or Cmd): give one after `--`")]
    NoCommand,
    #[error("user {user:?}: {reason}")]
    User { user: String, reason: String },
    #[error("{0}")]
    InvalidOption(String),
    #[error("writing the runtime config: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("mounting the overlay at {path}: {source}")]
    Overlay {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{runtime} is not installed (install the Debian package `{runtime}`)")]
    RuntimeMissing { runtime: &'static str },
}

impl RuntimeError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> RuntimeError {
        let context = context.into();
        move |source| RuntimeError::Io { context, source }
    }
}
