use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong on the host agent's side of a mount or a container.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid mount settings: {0}")]
    Settings(String),
    #[error("{0}")]
    Supervisor(String),
    #[error("cannot mount on {0}")]
    BadMountPoint(PathBuf),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{} already has {image} mounted (pid {pid}); run `skiff umount {}` first", .path.display(), .path.display())]
    AlreadyMounted {
        path: PathBuf,
        image: String,
        pid: u32,
    },
    #[error("{} is mounted by a skiff daemon that {} does not know (another --run-dir?)", .path.display(), .run_dir.display())]
    UnknownDaemon { path: PathBuf, run_dir: PathBuf },
    #[error("{} is already a mount point ({fs_type}); pick an empty directory", .path.display())]
    OtherMount { path: PathBuf, fs_type: String },
    #[error("{} is a {fs_type} mount, not skiff's", .path.display())]
    NotSkiff { path: PathBuf, fs_type: String },
    #[error("nothing is mounted at {}", .0.display())]
    NotMounted(PathBuf),
    #[error("{} is still mounted", .0.display())]
    StillMounted(PathBuf),
    #[error("the daemon (pid {pid}) of the mount at {} did not let go within {secs} s; see its log", .path.display())]
    DaemonStuck { path: PathBuf, pid: u32, secs: u64 },
    #[error("the mount daemon exited ({status}) before the mount was ready: {reason} ({})", .log.display())]
    DaemonFailed {
        status: String,
        reason: String,
        log: PathBuf,
    },
    #[error("no skiff mount answers for {} (looked for {})", .mountpoint.display(), .socket.display())]
    NoDaemon {
        mountpoint: PathBuf,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{image} cannot come from the {origin}")]
    OriginMismatch { image: String, origin: String },
    #[error("getting {image}")]
    Open {
        image: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid container ID {0:?}: use up to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")]
    InvalidContainerId(String),
    #[error("no container {0}")]
    NoContainer(String),
    #[error(transparent)]
    Store(#[from] skiff_store::StoreError),
    #[error(transparent)]
    Client(#[from] skiff_client::ClientError),
    #[error(transparent)]
    Registry(#[from] skiff_registry::RegistryError),
    #[error(transparent)]
    Format(#[from] skiff_format::FormatError),
    #[error(transparent)]
    Mount(#[from] skiff_fuse::MountError),
    #[error(transparent)]
    Runtime(#[from] skiff_runtime::RuntimeError),
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Adds what was being done to an I/O error.
pub(crate) trait IoContext<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io_context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| AgentError::Io {
            context: context(),
            source,
        })
    }
}
