//! The host agent: what runs on a host beside its containers.
//!
//! - [`settings`]: the one typed definition of a lazy mount's options.
//! - [`origin`]: where an image comes from, and opening it.
//! - [`daemon`]: mount daemons, their records in the run directory, starting and stopping them.
//! - [`status`]: the typed protocol a daemon answers on its socket.
//! - [`supervisor`]: the process that keeps a mount's connection and starts its daemons.
//! - [`shared`]: mounts shared by containers and snapshots, held by leases.
//! - [`containers`]: container state on local disk.
//!
//! The command line and the snapshotter are thin layers over this crate.

pub mod containers;
pub mod daemon;
mod error;
pub mod host;
pub mod origin;
pub mod settings;
pub mod shared;
pub mod status;
pub mod supervisor;

pub use containers::{check_container_id, new_container_id, ContainerState, Containers};
pub use daemon::{
    find_shared_mount, read_spec, serve_mount, start_daemon, stop_mount, upgrade_mount,
    ConnectionFiles, MountRecord, MountSpec, RunDir, Unmounted,
};
pub use error::{AgentError, Result};
pub use host::{mountpoint_path, now_unix, write_atomically, ProcessId};
pub use origin::{
    open_image, read_token_file, ImageArg, OpenOptions, OpenedImage, Origin, PinnedImage,
};
pub use settings::{MountSettings, DEFAULT_CACHE_DIR, DEFAULT_RUN_DIR};
pub use shared::{Lease, MountRequest, SharedMounts};
pub use status::{mount_status, take_profile, CacheStatus, MountStatus, Request};
pub use supervisor::{supervise, supervise_upgrade, Supervision};
