//! The lazy, read-only FUSE file system of an image: the merged root from
//! its index, file bytes fetched chunk by chunk at first read through a
//! [`ChunkSource`], and the rest prefetched in the background.
//!
//! This crate knows nothing of HTTP or of the cache directory: the caller
//! hands it a source (a local store, or a chunk server behind the host's
//! chunk cache) and gets back a live [`Mount`].

mod fetcher;
mod fs;
mod handover;
mod journal;
mod pool;
mod prefetch;
mod profile;
mod readahead;
mod stats;
mod tree;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};
use skiff_format::{ImageIndex, StartupProfile};
use skiff_source::ChunkSource;
use thiserror::Error;

pub use fetcher::Fetcher;
use handover::Negotiated;
pub use handover::{resend_pending, Connection, SessionState};
pub use prefetch::{prefetch_order, PrefetchConfig, PrefetchPlan};
pub use readahead::{Layout, WindowLimits};
pub use stats::{StatsReport, StatsSnapshot};
pub use tree::ImageTree;

use crate::journal::OpenJournal;
use crate::prefetch::Prefetcher;
use crate::profile::Recorder;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("mounting at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("unmounting {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Chunks kept in memory, in bytes.
    pub memory_bytes: u64,
    /// How much a read that misses fetches along with its own chunks, in
    /// path order across files: a new stream of reads starts at the
    /// smallest window, which doubles while reads go on in order.
    pub window: WindowLimits,
    /// Threads that wait on the source for reads.
    pub network_threads: usize,
    /// Threads that take requests from the kernel.
    pub fuse_threads: usize,
    pub prefetch: Option<PrefetchConfig>,
    /// Shown as the mount's source in /proc/mounts.
    pub fsname: String,
    /// Record a startup profile from the first read on ([`Mount::finish_profile`]).
    /// Such a mount sends every read through itself (no passthrough).
    pub record_profile: bool,
    /// Answer opens of files: pin each open file's chunks in the host's
    /// cache, and hand files assembled on this host to the kernel to read
    /// directly (passthrough). Otherwise the first open is answered ENOSYS
    /// and the kernel sends no more opens or releases: two round trips a
    /// file fewer, most of a cold walk's requests.
    pub answer_opens: bool,
    /// Journal open files here, so that a successor can take the mount
    /// over ([`Mount::take_over`]); none: no successor can.
    pub open_journal: Option<PathBuf>,
    /// Honour setuid bits and device nodes (a root file system under a
    /// root-only directory); otherwise the mount is nosuid,nodev.
    pub setuid_and_devices: bool,
    /// Created just before a busy mount is detached at an unmount, so that
    /// whoever asked for the unmount can tell a detach from a slow exit.
    pub detached_marker: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            memory_bytes: 256 << 20,
            window: WindowLimits {
                min: 256 << 10,
                max: 16 << 20,
            },
            network_threads: 16,
            fuse_threads: 4,
            prefetch: Some(PrefetchConfig::default()),
            fsname: "skiff".into(),
            record_profile: false,
            answer_opens: false,
            open_journal: None,
            setuid_and_devices: false,
            detached_marker: None,
        }
    }
}

/// A mounted image. Dropping it unmounts.
pub struct Mount {
    session: Option<BackgroundSession>,
    /// Another descriptor of the FUSE connection, for [`Mount::connection`].
    device: OwnedFd,
    negotiated: Arc<Negotiated>,
    prefetcher: Option<Prefetcher>,
    fetcher: Arc<Fetcher>,
    tree: Arc<ImageTree>,
    recorder: Arc<Recorder>,
    mountpoint: PathBuf,
    /// Whether the mount is still where it was mounted (see [`Mount::forget_mountpoint`]).
    at_mountpoint: bool,
    detached_marker: Option<PathBuf>,
}

impl Mount {
    /// Mounts `index` at `mountpoint`, reading through `source`, and returns
    /// once the kernel has answered a first request on it.
    pub fn start(
        index: ImageIndex,
        source: Arc<dyn ChunkSource>,
        mountpoint: &Path,
        options: &MountOptions,
    ) -> Result<Mount, MountError> {
        let mount_error = |source| MountError::Mount {
            path: mountpoint.to_owned(),
            source,
        };
        if !std::fs::metadata(mountpoint).map_err(mount_error)?.is_dir() {
            return Err(MountError::NotADirectory {
                path: mountpoint.to_owned(),
            });
        }
        // What INIT negotiates is learnt in `init`.
        let parts =
            Parts::new(index, source, options, SessionState::default()).map_err(mount_error)?;
        let fs = match &options.open_journal {
            Some(path) => parts
                .fs
                .with_journal(OpenJournal::create(path).map_err(mount_error)?),
            None => parts.fs,
        };
        let mut config = session_config(options);
        config.mount_options = vec![
            MountOption::FSName(options.fsname.clone()),
            MountOption::Subtype("skiff".into()),
            MountOption::RO,
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
        ];
        // A root file system: its setuid binaries and device nodes work.
        config.mount_options.extend(if options.setuid_and_devices {
            [MountOption::Suid, MountOption::Dev]
        } else {
            [MountOption::NoSuid, MountOption::NoDev]
        });
        // Returns once the kernel's INIT is answered.
        let session = Session::new(fs, mountpoint, &config).map_err(mount_error)?;
        let device = session.as_fd().try_clone_to_owned().map_err(mount_error)?;
        let session = session.spawn().map_err(mount_error)?;
        std::fs::metadata(mountpoint).map_err(mount_error)?;
        Ok(Mount::running(
            parts.shared,
            session,
            device,
            mountpoint,
            options,
        ))
    }

    /// Serves a mount that another daemon served until now, through its
    /// FUSE connection, without unmounting: files open stay open. `index`
    /// must be the one the connection was serving (inode numbers are
    /// positions in it), and the open-file journal the one it kept.
    pub fn take_over(
        index: ImageIndex,
        source: Arc<dyn ChunkSource>,
        mountpoint: &Path,
        options: &MountOptions,
        connection: Connection,
    ) -> Result<Mount, MountError> {
        let mount_error = |source| MountError::Mount {
            path: mountpoint.to_owned(),
            source,
        };
        let parts = Parts::new(index, source, options, connection.state).map_err(mount_error)?;
        let fs = match &options.open_journal {
            Some(path) => {
                let (journal, open) = OpenJournal::resume(path).map_err(mount_error)?;
                tracing::info!("taking over with {} files open", open.len());
                parts
                    .fs
                    .with_inherited_opens(&open, connection.generation)
                    .with_journal(journal)
            }
            None => parts.fs,
        };
        let device = connection
            .fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(mount_error)?;
        let session = Session::from_fd_initialized(
            fs,
            connection.fd,
            SessionACL::All,
            session_config(options),
        );
        // What the one before had read and not answered, before this one
        // reads anything: a resend also re-queues what was read since, which
        // would then be answered twice.
        resend_pending(device.as_fd()).map_err(mount_error)?;
        let session = session.spawn().map_err(mount_error)?;
        Ok(Mount::running(
            parts.shared,
            session,
            device,
            mountpoint,
            options,
        ))
    }

    fn running(
        shared: Shared,
        session: BackgroundSession,
        device: OwnedFd,
        mountpoint: &Path,
        options: &MountOptions,
    ) -> Mount {
        let Shared {
            tree,
            fetcher,
            recorder,
            negotiated,
        } = shared;
        let prefetcher = options.prefetch.clone().map(|config| {
            let plan = prefetch_order(fetcher.layout(), &config.first);
            Prefetcher::start(fetcher.clone(), plan, config)
        });
        Mount {
            session: Some(session),
            device,
            negotiated,
            prefetcher,
            fetcher,
            tree,
            recorder,
            mountpoint: mountpoint.to_owned(),
            at_mountpoint: true,
            detached_marker: options.detached_marker.clone(),
        }
    }

    /// For a mount taken over after it was detached: it is no longer at
    /// its mount point, where another mount may be now, so unmounting it
    /// only waits for its last open file to close.
    pub fn forget_mountpoint(&mut self) {
        self.at_mountpoint = false;
    }

    /// Another descriptor of this mount's FUSE connection, and its state:
    /// what a successor needs to take the mount over.
    pub fn connection(&self) -> io::Result<Connection> {
        Ok(Connection {
            fd: self.device.as_fd().try_clone_to_owned()?,
            state: self.negotiated.state(),
            generation: 0,
        })
    }

    /// Stops recording and returns the startup profile of what was read so
    /// far; `None` if this mount was not recording or already finished.
    pub fn finish_profile(&self, command: Vec<String>) -> Option<StartupProfile> {
        self.recorder.finish(&self.tree, command)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn stats(&self) -> StatsReport {
        self.fetcher.stats.report()
    }

    /// The counters, for a daemon that takes the mount over.
    pub fn stats_snapshot(&self) -> StatsSnapshot {
        self.fetcher.stats.snapshot()
    }

    /// Counts on from what the daemon before this one counted.
    pub fn add_stats(&self, before: &StatsSnapshot) {
        self.fetcher.stats.add_snapshot(before);
    }

    /// What the chunk source did on the network, if it is a network source.
    pub fn source_traffic(&self) -> Option<skiff_source::SourceTraffic> {
        self.fetcher.source().traffic()
    }

    pub fn tree(&self) -> &ImageTree {
        &self.tree
    }

    /// Distinct chunks of the image and their bytes, and how many of each
    /// are on this host (in memory or in the host's cache).
    pub fn local_share(&self) -> LocalShare {
        let mut share = LocalShare::default();
        let mut seen = std::collections::HashSet::new();
        for chunk in self.tree.index().chunk_refs() {
            if !seen.insert(chunk.id) {
                continue;
            }
            share.chunks += 1;
            share.bytes += u64::from(chunk.len);
            if self.fetcher.is_local(&chunk.id) {
                share.local_chunks += 1;
                share.local_bytes += u64::from(chunk.len);
            }
        }
        share
    }

    /// Whether the kernel still has the file system mounted (someone may
    /// have run `umount` on it).
    pub fn is_mounted(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.guard.is_finished())
    }

    /// Stops prefetch and unmounts; a mount with files open is detached and
    /// this returns once the last of them is closed.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), MountError> {
        if let Some(prefetcher) = self.prefetcher.take() {
            prefetcher.stop();
        }
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let unmount_error = |source: io::Error| MountError::Unmount {
            path: self.mountpoint.clone(),
            source,
        };
        if self.at_mountpoint && !session.guard.is_finished() {
            match umount2(&self.mountpoint, MntFlags::empty()) {
                // Someone unmounted it already.
                Ok(()) | Err(Errno::EINVAL) => {}
                // Files are open (a running container): detach the mount
                // now and serve those files until they are closed.
                Err(Errno::EBUSY) => {
                    tracing::warn!(
                        "{} is busy: detached; serving the files still open until they are closed",
                        self.mountpoint.display()
                    );
                    if let Some(marker) = &self.detached_marker {
                        if let Err(e) = std::fs::write(marker, std::process::id().to_string()) {
                            tracing::warn!("{}: {e}", marker.display());
                        }
                    }
                    umount2(&self.mountpoint, MntFlags::MNT_DETACH)
                        .map_err(|e| unmount_error(e.into()))?;
                }
                Err(e) => return Err(unmount_error(e.into())),
            }
        }
        // The session ends when the kernel lets go of the file system.
        session.join().map_err(unmount_error)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            tracing::error!("{e}");
        }
    }
}

/// What a mount shares with its file system.
struct Shared {
    tree: Arc<ImageTree>,
    fetcher: Arc<Fetcher>,
    recorder: Arc<Recorder>,
    negotiated: Arc<Negotiated>,
}

struct Parts {
    fs: fs::SkiffFs,
    shared: Shared,
}

impl Parts {
    fn new(
        index: ImageIndex,
        source: Arc<dyn ChunkSource>,
        options: &MountOptions,
        state: SessionState,
    ) -> io::Result<Parts> {
        let layout = Arc::new(Layout::of(&index));
        let tree = Arc::new(ImageTree::new(index));
        let mut fetcher = Fetcher::new(source, options.memory_bytes, options.window, layout);
        if options
            .prefetch
            .as_ref()
            .is_some_and(|p| !p.first.is_empty())
        {
            fetcher.keep_first_windows_in_file();
        }
        let fetcher = Arc::new(fetcher);
        let recorder = Arc::new(if options.record_profile {
            Recorder::recording()
        } else {
            Recorder::default()
        });
        let negotiated = Arc::new(Negotiated::of(state));
        let fs = fs::SkiffFs::new(
            tree.clone(),
            fetcher.clone(),
            options,
            recorder.clone(),
            negotiated.clone(),
        )?;
        Ok(Parts {
            fs,
            shared: Shared {
                tree,
                fetcher,
                recorder,
                negotiated,
            },
        })
    }
}

fn session_config(options: &MountOptions) -> Config {
    let mut config = Config::default();
    // Containers run as other users than the mounting one.
    config.acl = SessionACL::All;
    config.n_threads = Some(options.fuse_threads.max(1));
    // One descriptor for every thread: the requests a thread had read when
    // its daemon died stay queued on the descriptor the supervisor keeps,
    // and are sent again to the successor (a cloned descriptor would take
    // them with it, failed).
    config.clone_fd = false;
    config
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalShare {
    pub chunks: u64,
    pub bytes: u64,
    pub local_chunks: u64,
    pub local_bytes: u64,
}
