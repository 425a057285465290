//! Mount daemons: one process per lazy mount, found through the run directory.
//!
//! ```text
//! RUN_DIR/mounts/KEY.json            pid, image, origin, mount point, the spec it was started with
//! RUN_DIR/mounts/KEY.sock            the status protocol (status.rs)
//! RUN_DIR/mounts/KEY.log             the daemon's log
//! RUN_DIR/mounts/KEY.manifest.json   the image's manifest (its OCI config, for a runtime bundle)
//! ```
//! where KEY is derived from the mount point's canonical path. A daemon is
//! started from a typed [`MountSpec`] (sent as JSON on its stdin), never
//! from an argv spelled out by hand, by the mount's supervisor
//! (supervisor.rs), which starts another on the same connection if it dies.

use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use skiff_fuse::Mount;

use crate::error::{AgentError, IoContext, Result};
use crate::host::{
    clear_dead_mount, file_key, is_dead_mount, mounted_here, now_unix, write_atomically,
    MountedHere, ProcessId,
};
use crate::origin::{open_image, ImageArg, OpenOptions, OpenedImage, Origin, PinnedImage};
use crate::settings::MountSettings;
use crate::status::spawn_status_server;
use crate::supervisor::{self, Handover, Supervision};

/// How long unmounting waits for a daemon to let go.
const UNMOUNT_WAIT: Duration = Duration::from_secs(20);

/// Everything a mount daemon is told: the whole of its configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountSpec {
    pub image: ImageArg,
    pub origin: Origin,
    /// Canonical (see [`crate::mountpoint_path`]).
    pub mountpoint: PathBuf,
    /// The chunk server's bearer token, for an image on a server.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub settings: MountSettings,
    /// Record a startup profile of the reads: such a mount is never shared.
    #[serde(default)]
    pub record_profile: bool,
}

/// Where a run directory keeps what it knows about mounts.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> RunDir {
        RunDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn base(&self, mountpoint: &Path) -> PathBuf {
        self.root.join("mounts").join(mount_key(mountpoint))
    }

    pub fn record_path(&self, mountpoint: &Path) -> PathBuf {
        self.base(mountpoint).with_extension("json")
    }

    pub fn socket_path(&self, mountpoint: &Path) -> PathBuf {
        self.base(mountpoint).with_extension("sock")
    }

    /// The log of the daemon of the mount at `mountpoint`.
    pub fn log_path(&self, mountpoint: &Path) -> PathBuf {
        self.base(mountpoint).with_extension("log")
    }

    /// Where the daemon of the mount at `mountpoint` keeps the image's manifest.
    pub fn manifest_path(&self, mountpoint: &Path) -> PathBuf {
        self.base(mountpoint).with_extension("manifest.json")
    }

    /// The files of a supervised connection that `supervisor` mounted at `mountpoint`.
    pub fn connection_files(&self, mountpoint: &Path, supervisor: ProcessId) -> ConnectionFiles {
        let instance = file_key(format!("{}:{}", supervisor.pid, supervisor.start).as_bytes());
        let mut base = self.base(mountpoint).into_os_string();
        base.push(".");
        base.push(instance);
        ConnectionFiles { base: base.into() }
    }

    /// Where shared mounts made for containers and snapshots live.
    pub fn shared_mounts(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The state root of an OCI runtime's containers.
    pub fn runtime_state(&self, runtime: &str) -> PathBuf {
        self.root.join("runtime").join(runtime)
    }

    pub fn record(&self, mountpoint: &Path) -> Option<MountRecord> {
        read_record(&self.record_path(mountpoint))
    }

    /// Writes `record` where [`RunDir::record`] finds it, whole or not at all.
    pub fn write_record(&self, record: &MountRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record).map_err(|source| AgentError::Json {
            context: "writing the mount record".into(),
            source,
        })?;
        write_atomically(&self.record_path(&record.mountpoint), &json)
    }

    /// Every mount record this run directory holds, live or not.
    pub fn records(&self) -> Vec<MountRecord> {
        let Ok(entries) = std::fs::read_dir(self.root.join("mounts")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
            .filter_map(|entry| read_record(&entry.path()))
            .collect()
    }

    fn remove_records(&self, mountpoint: &Path) {
        for path in [
            self.record_path(mountpoint),
            self.socket_path(mountpoint),
            self.manifest_path(mountpoint),
        ] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What a supervised FUSE connection's daemons keep for the next one, and
/// where its supervisor listens. Named after the mount point and the
/// supervisor that mounted it: an upgrade keeps them, and a busy mount
/// detached at an unmount keeps its own while a new mount at the same path
/// has others.
///
/// ```text
/// RUN_DIR/mounts/KEY.ID.supervisor.sock   where the supervisor's daemons find it
/// RUN_DIR/mounts/KEY.ID.opens             the daemon's open-file journal (skiff-fuse)
/// RUN_DIR/mounts/KEY.ID.image/            the image's metadata, so a new daemon needs no network
/// RUN_DIR/mounts/KEY.ID.stats.json        the daemon's counters, written four times a second
/// ```
#[derive(Clone, Debug)]
pub struct ConnectionFiles {
    base: PathBuf,
}

impl ConnectionFiles {
    const SOCKET: &'static str = ".supervisor.sock";

    /// The files of the connection whose supervisor listens at `socket`.
    pub fn of_socket(socket: &Path) -> Option<ConnectionFiles> {
        let base = socket.to_str()?.strip_suffix(Self::SOCKET)?;
        Some(ConnectionFiles { base: base.into() })
    }

    fn with(&self, suffix: &str) -> PathBuf {
        let mut path = self.base.clone().into_os_string();
        path.push(suffix);
        path.into()
    }

    pub fn socket(&self) -> PathBuf {
        self.with(Self::SOCKET)
    }

    pub fn journal(&self) -> PathBuf {
        self.with(".opens")
    }

    /// There once the daemon has detached the busy mount at an unmount.
    pub fn detached(&self) -> PathBuf {
        self.with(".detached")
    }

    pub fn image(&self) -> PathBuf {
        self.with(".image")
    }

    pub fn stats(&self) -> PathBuf {
        self.with(".stats.json")
    }

    /// Removes them all (the connection is gone).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(self.socket());
        let _ = std::fs::remove_file(self.journal());
        let _ = std::fs::remove_file(self.detached());
        let _ = std::fs::remove_dir_all(self.image());
        let _ = std::fs::remove_file(self.stats());
    }
}

/// The name under which the run directory keeps what it knows of the mount at `mountpoint`.
pub(crate) fn mount_key(mountpoint: &Path) -> String {
    file_key(mountpoint.as_os_str().as_encoded_bytes())
}

/// What the run directory records about a live mount.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MountRecord {
    /// The daemon that serves the mount now.
    #[serde(flatten)]
    pub daemon: ProcessId,
    /// The process that keeps the mount's connection and starts its daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<ProcessId>,
    /// Where that supervisor listens (`skiff upgrade` asks it there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_socket: Option<PathBuf>,
    pub image: String,
    pub source: String,
    /// Where the image comes from.
    #[serde(default = "unknown_origin", deserialize_with = "Origin::lenient")]
    pub origin: Origin,
    pub mountpoint: PathBuf,
    pub started_unix: u64,
    /// A recording mount is never shared.
    #[serde(default)]
    pub record_profile: bool,
    /// Mounted nosuid,nodev (`skiff mount` without --suid-dev): not shared
    /// with a container, whose root file system needs both.
    #[serde(default)]
    pub nosuid: bool,
}

fn unknown_origin() -> Origin {
    Origin::Unknown
}

fn read_record(path: &Path) -> Option<MountRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

impl MountRecord {
    /// Whether something still serves the mount: its supervisor (which
    /// starts a new daemon if the one serving it dies), or its daemon.
    pub fn is_alive(&self) -> bool {
        self.holder().is_some()
    }

    /// Whether its supervisor still runs (a mount that can be taken over).
    pub fn is_supervised(&self) -> bool {
        self.supervisor.is_some_and(|s| s.is_running())
    }

    /// The process to signal to unmount: the supervisor, else the daemon.
    pub fn holder(&self) -> Option<ProcessId> {
        self.supervisor
            .into_iter()
            .chain([self.daemon])
            .find(ProcessId::is_running)
    }

    /// Whether another user of `image` from `origin` may read through this mount.
    pub fn shareable_for(&self, image: &ImageArg, origin: &Origin) -> bool {
        self.image == image.to_string()
            && self.origin == *origin
            && self.origin != Origin::Unknown
            && !self.record_profile
            && !self.nosuid
    }
}

/// A live, shareable skiff mount of `image` from `origin` that `run_dir` knows.
pub fn find_shared_mount(run_dir: &RunDir, image: &ImageArg, origin: &Origin) -> Option<PathBuf> {
    run_dir
        .records()
        .into_iter()
        .find(|record| {
            record.shareable_for(image, origin)
                && record.is_alive()
                && mounted_here(&record.mountpoint) == MountedHere::Skiff
        })
        .map(|record| record.mountpoint)
}

/// Refuses a mount point that is in use or not a directory, clears a dead
/// skiff mount there, and creates the mount point and the run directory.
pub fn check_mount_point(run_dir: &RunDir, mountpoint: &Path) -> Result<()> {
    let record_path = run_dir.record_path(mountpoint);
    match (mounted_here(mountpoint), read_record(&record_path)) {
        // Its mount was taken away from outside and the daemon is winding
        // down: its files go with it, so wait rather than race it.
        (MountedHere::Nothing, Some(record)) if record.is_alive() => {
            let deadline = Instant::now() + UNMOUNT_WAIT;
            while let Some(holder) = record.holder() {
                if Instant::now() > deadline {
                    return Err(AgentError::DaemonStuck {
                        path: mountpoint.to_owned(),
                        pid: holder.pid,
                        secs: UNMOUNT_WAIT.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        (MountedHere::Nothing, _) => {}
        (MountedHere::Skiff, Some(record)) if record.is_alive() => {
            return Err(AgentError::AlreadyMounted {
                path: mountpoint.to_owned(),
                image: record.image,
                pid: record.daemon.pid,
            })
        }
        (MountedHere::Skiff, _) if is_dead_mount(mountpoint) => clear_dead_mount(mountpoint)?,
        (MountedHere::Skiff, _) => {
            return Err(AgentError::UnknownDaemon {
                path: mountpoint.to_owned(),
                run_dir: run_dir.root().to_owned(),
            })
        }
        (MountedHere::Other(fs_type), _) => {
            return Err(AgentError::OtherMount {
                path: mountpoint.to_owned(),
                fs_type,
            })
        }
    }
    if std::fs::symlink_metadata(mountpoint).is_ok_and(|m| !m.is_dir()) {
        return Err(AgentError::NotADirectory(mountpoint.to_owned()));
    }
    std::fs::create_dir_all(mountpoint)
        .io_context(|| format!("creating {}", mountpoint.display()))?;
    if let Some(dir) = record_path.parent() {
        // Root's alone: its sockets hand out FUSE connections and status.
        crate::host::create_private_dir(dir)
            .io_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// Checks the mount point and starts a supervisor (this binary's hidden
/// `mount-supervisor` command) for `spec` in its own process group, with its
/// daemon's log in the run directory; returns its pid once the daemon
/// reports the mount ready.
pub fn start_daemon(run_dir: &RunDir, spec: &MountSpec) -> Result<u32> {
    spec.settings.validate()?;
    check_mount_point(run_dir, &spec.mountpoint)?;
    let spec_json = serde_json::to_vec(spec).map_err(|source| AgentError::Json {
        context: "writing the mount spec".into(),
        source,
    })?;
    launch_supervisor(run_dir, &spec.mountpoint, &[], &spec_json)
}

/// Hands the mount at `mountpoint` (canonical) to a new supervisor and
/// daemon started from this binary, without unmounting: open files and
/// running containers go on. Returns the new supervisor's pid once its
/// daemon serves the mount.
pub fn upgrade_mount(run_dir: &RunDir, mountpoint: &Path) -> Result<u32> {
    let record = run_dir
        .record(mountpoint)
        .filter(MountRecord::is_alive)
        .ok_or_else(|| AgentError::NotMounted(mountpoint.to_owned()))?;
    if !record.is_supervised() {
        return Err(AgentError::Supervisor(format!(
            "{} has no supervisor (mounted by an older skiff, or its supervisor was killed): \
             unmount it and mount it again",
            mountpoint.display()
        )));
    }
    let mut upgrade = std::ffi::OsString::from("--upgrade=");
    upgrade.push(mountpoint);
    launch_supervisor(run_dir, mountpoint, &[upgrade], &[])
}

/// Starts this binary's hidden `mount-supervisor` command with `args` and
/// `input` on its stdin, in its own process group, its log in the run
/// directory; returns its pid once it says the mount is ready.
fn launch_supervisor(
    run_dir: &RunDir,
    mountpoint: &Path,
    args: &[std::ffi::OsString],
    input: &[u8],
) -> Result<u32> {
    let log_path = run_dir.log_path(mountpoint);
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .io_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let program = std::env::current_exe().io_context(|| "finding the skiff binary".into())?;
    let mut command = Command::new(program);
    command
        .arg("mount-supervisor")
        .arg("--run-dir")
        .arg(run_dir.root())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        // Ctrl-C in the caller's terminal must not reach the daemon.
        .process_group(0);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    let mut child = command
        .spawn()
        .io_context(|| "starting the mount supervisor".into())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A supervisor that died at once shows in its log, read below.
        let _ = stdin.write_all(input);
    }
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    if line.trim() == "ready" {
        return Ok(child.id());
    }
    let status = child
        .wait()
        .io_context(|| "waiting for the mount supervisor".into())?;
    let mut log_text = String::new();
    if let Ok(mut log) = std::fs::File::open(&log_path) {
        let _ = log.seek(std::io::SeekFrom::Start(log_start));
        let _ = log.read_to_string(&mut log_text);
    }
    // The daemon's own error comes before its supervisor's.
    let reason = log_text
        .lines()
        .find_map(|l| l.strip_prefix("skiff: error: "))
        .unwrap_or("see the log");
    Err(AgentError::DaemonFailed {
        status: status.to_string(),
        reason: reason.to_owned(),
        log: log_path,
    })
}

/// Reads a daemon's spec from its stdin (see [`start_daemon`]).
pub fn read_spec(input: impl Read) -> Result<MountSpec> {
    serde_json::from_reader(input).map_err(|source| AgentError::Json {
        context: "reading the mount spec".into(),
        source,
    })
}

/// Serves the mount `spec` describes until `stop` says so or someone
/// unmounts it from outside; `ready` is called once the file system answers.
/// Install the signal handler that feeds `stop` before calling this.
pub fn serve_mount(
    run_dir: &RunDir,
    spec: &MountSpec,
    supervision: &Supervision,
    stop: mpsc::Receiver<()>,
    ready: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let started = Instant::now();
    spec.settings.validate()?;
    // A successor first takes what the supervisor holds: the connection, and the image it serves.
    let inherited = match supervision {
        Supervision::Takeover { socket } => {
            let mut link = supervisor::connect(socket)?;
            let (handover, fd): (Handover, _) =
                supervisor::receive_with_fd(&mut link, "the handover")?;
            Some((handover, fd))
        }
        _ => {
            check_mount_point(run_dir, &spec.mountpoint)?;
            None
        }
    };
    let files = match supervision {
        Supervision::First { socket } | Supervision::Takeover { socket } => {
            Some(ConnectionFiles::of_socket(socket).ok_or_else(|| {
                AgentError::Supervisor(format!("{} is not a supervisor's socket", socket.display()))
            })?)
        }
        Supervision::None => None,
    };
    let kept = files.as_ref().map(ConnectionFiles::image);
    let OpenedImage {
        manifest,
        registry_digest,
        index,
        source,
        cache,
    } = open_image(
        &spec.image,
        &spec.origin,
        &spec.settings,
        OpenOptions {
            token_file: spec.token_file.as_deref(),
            pinned: inherited.as_ref().map(|(handover, _)| &handover.image),
            keep: kept.as_deref(),
        },
    )?;
    let describe = source.describe();
    let image = spec.image.to_string();
    let mut options = spec.settings.fuse_options(
        &image,
        &manifest,
        &index,
        spec.record_profile,
        cache.is_some(),
    );
    options.open_journal = files.as_ref().map(ConnectionFiles::journal);
    options.detached_marker = files.as_ref().map(ConnectionFiles::detached);
    let supervisor_process = ProcessId::of(std::os::unix::process::parent_id());
    let (mount, started_unix, publish, takeovers) = match (supervision, inherited) {
        (_, Some((handover, fd))) => {
            let connection = supervisor::into_connection(&handover, fd);
            let mut mount =
                Mount::take_over(index, source, &spec.mountpoint, &options, connection)?;
            // A mount detached at an unmount is no longer at its mount point
            // (another may be there now): it only serves its open files.
            let publish = run_dir
                .record(&spec.mountpoint)
                .is_some_and(|r| r.supervisor == Some(supervisor_process));
            if !publish {
                mount.forget_mountpoint();
            }
            (mount, handover.started_unix, publish, handover.takeovers)
        }
        (Supervision::First { socket }, None) => {
            let mount = Mount::start(index, source, &spec.mountpoint, &options)?;
            let mut link = supervisor::connect(socket)?;
            let connection = mount
                .connection()
                .io_context(|| "copying the FUSE connection".into())?;
            let handover = Handover {
                session: connection.state,
                image: PinnedImage {
                    manifest: manifest.clone(),
                    registry_digest,
                },
                started_unix: now_unix(),
                takeovers: 0,
                generation: 0,
            };
            supervisor::send_with_fd(&mut link, &handover, &connection.fd)?;
            (mount, handover.started_unix, true, 0)
        }
        (_, None) => {
            let mount = Mount::start(index, source, &spec.mountpoint, &options)?;
            (mount, now_unix(), true, 0)
        }
    };
    let record = MountRecord {
        daemon: ProcessId::current(),
        supervisor: files.as_ref().map(|_| supervisor_process),
        supervisor_socket: files.as_ref().map(ConnectionFiles::socket),
        image: image.clone(),
        source: describe,
        origin: spec.origin.clone(),
        mountpoint: spec.mountpoint.clone(),
        started_unix,
        record_profile: spec.record_profile,
        nosuid: !spec.settings.setuid_and_devices,
    };
    let stats_path = files.as_ref().map(ConnectionFiles::stats);
    if let (Supervision::Takeover { .. }, Some(path)) = (supervision, &stats_path) {
        if let Some(before) = std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        {
            mount.add_stats(&before);
        }
    }
    let mount = Arc::new(mount);
    let stats_keeper = stats_path.map(|path| StatsKeeper::start(Arc::downgrade(&mount), path));
    // Removes the mount's records when the daemon stops, however it stops.
    let records = publish.then(|| RecordsGuard(run_dir, &spec.mountpoint));
    if publish {
        // Uptime counts from the first daemon's mount.
        let mounted = match takeovers {
            0 => started,
            _ => Instant::now()
                .checked_sub(Duration::from_secs(now_unix().saturating_sub(started_unix)))
                .unwrap_or(started),
        };
        let status = StatusContext {
            cache,
            started: mounted,
            takeovers,
        };
        publish_records(run_dir, spec, &manifest, &record, &mount, status)?;
    }
    tracing::info!(
        "{image} {} at {} in {:.0} ms",
        if matches!(supervision, Supervision::Takeover { .. }) {
            "taken over"
        } else {
            "mounted"
        },
        spec.mountpoint.display(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    ready()?;

    // Until a signal, or until someone unmounts it from outside.
    while mount.is_mounted() {
        if stop.recv_timeout(Duration::from_millis(20)).is_ok() {
            break;
        }
    }
    // The mount point is free for a new mount from here on, even while a
    // busy mount is detached and still serves its open files.
    drop(records);
    let mut mount = mount;
    let mount = loop {
        // A status request holds the mount for a moment.
        match Arc::try_unwrap(mount) {
            Ok(mount) => break mount,
            Err(shared) => mount = shared,
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let unmounted = mount.unmount();
    drop(stats_keeper);
    // A supervisor removes its connection's files when its daemon is done;
    // the last daemon of a dead one does.
    if let Some(files) = files.filter(|_| !supervisor_process.is_running()) {
        files.remove();
    }
    unmounted?;
    tracing::info!("unmounted {}", spec.mountpoint.display());
    Ok(())
}

/// Four times a second, the mount's counters where its next daemon finds
/// them (a daemon killed loses at most its last quarter second of counts).
/// Dropping it stops it.
struct StatsKeeper {
    stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatsKeeper {
    fn start(mount: std::sync::Weak<Mount>, path: PathBuf) -> StatsKeeper {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut written = None;
            loop {
                let Some(snapshot) = mount.upgrade().map(|m| m.stats_snapshot()) else {
                    return;
                };
                let json = serde_json::to_vec(&snapshot).unwrap_or_default();
                if written.as_ref() != Some(&json) {
                    // Renamed into place, not synced: they only need to outlive the process.
                    let mut partial = path.clone().into_os_string();
                    partial.push(".partial");
                    let kept = std::fs::write(&partial, &json)
                        .and_then(|()| std::fs::rename(&partial, &path));
                    if let Err(e) = kept {
                        tracing::debug!("keeping the mount's counters: {e}");
                    }
                    written = Some(json);
                }
                let waited = stopped.recv_timeout(Duration::from_millis(250));
                if waited != Err(mpsc::RecvTimeoutError::Timeout) {
                    return;
                }
            }
        });
        StatsKeeper {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StatsKeeper {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes what the run directory knows of a live mount, and answers status requests.
fn publish_records(
    run_dir: &RunDir,
    spec: &MountSpec,
    manifest: &skiff_format::ImageManifest,
    record: &MountRecord,
    mount: &Arc<Mount>,
    status: StatusContext,
) -> Result<()> {
    // The manifest first: whoever finds the record finds the manifest.
    write_atomically(
        &run_dir.manifest_path(&spec.mountpoint),
        &manifest.to_json(),
    )?;
    run_dir.write_record(record)?;
    let socket_path = run_dir.socket_path(&spec.mountpoint);
    let _ = std::fs::remove_file(&socket_path);
    let listener = UnixListener::bind(&socket_path)
        .io_context(|| format!("listening on {}", socket_path.display()))?;
    spawn_status_server(
        listener,
        mount.clone(),
        record.clone(),
        status.cache,
        status.started,
        status.takeovers,
    );
    Ok(())
}

/// What a mount's status answers say beyond its record.
struct StatusContext {
    cache: Option<Arc<skiff_client::ChunkCache>>,
    started: Instant,
    takeovers: u32,
}

struct RecordsGuard<'a>(&'a RunDir, &'a Path);

impl Drop for RecordsGuard<'_> {
    fn drop(&mut self) {
        self.0.remove_records(self.1);
    }
}

/// How a mount went away.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Unmounted, its daemon gone or going.
    Done,
    /// It was busy: detached, and the daemon (this pid) serves the files
    /// still open until they are closed.
    Detached { pid: u32 },
}

/// Unmounts what a skiff daemon serves at `mountpoint` (canonical).
pub fn stop_mount(run_dir: &RunDir, mountpoint: &Path) -> Result<Unmounted> {
    let mut outcome = Unmounted::Done;
    match run_dir.record(mountpoint) {
        Some(record) if record.is_alive() => {
            let Some(mut holder) = record.holder() else {
                return Err(AgentError::NotMounted(mountpoint.to_owned()));
            };
            let deadline = Instant::now() + UNMOUNT_WAIT;
            loop {
                let pid = holder.pid;
                kill(Pid::from_raw(pid as i32), Signal::SIGTERM)
                    .map_err(std::io::Error::from)
                    .io_context(|| format!("signalling the mount daemon (pid {pid})"))?;
                // Done when the daemon exits, or when it has detached a busy
                // mount and serves the files still open.
                while holder.is_running() && mounted_here(mountpoint) == MountedHere::Skiff {
                    if Instant::now() > deadline {
                        return Err(AgentError::DaemonStuck {
                            path: mountpoint.to_owned(),
                            pid,
                            secs: UNMOUNT_WAIT.as_secs(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                // An upgrade may have handed the mount to another supervisor meanwhile.
                match run_dir.record(mountpoint).and_then(|r| r.holder()) {
                    Some(next)
                        if next != holder && mounted_here(mountpoint) == MountedHere::Skiff =>
                    {
                        holder = next;
                    }
                    _ => break,
                }
            }
            let pid = holder.pid;
            // The mount has left its mount point: unmounted, and the daemon
            // is on its way out (which takes a moment after a read), or
            // detached because files are open, which the daemon says.
            let detached = record
                .supervisor_socket
                .as_deref()
                .and_then(ConnectionFiles::of_socket)
                .map(|files| files.detached());
            let started = Instant::now();
            while holder.is_running() && started.elapsed() < UNMOUNT_WAIT {
                let said = match &detached {
                    Some(marker) => marker.exists(),
                    // A daemon of an older skiff says nothing: one still
                    // running after a moment serves a detached busy mount.
                    None => started.elapsed() > Duration::from_secs(1),
                };
                if said {
                    outcome = Unmounted::Detached { pid };
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        _ => match mounted_here(mountpoint) {
            MountedHere::Skiff if is_dead_mount(mountpoint) => clear_dead_mount(mountpoint)?,
            MountedHere::Skiff => {
                return Err(AgentError::UnknownDaemon {
                    path: mountpoint.to_owned(),
                    run_dir: run_dir.root().to_owned(),
                })
            }
            MountedHere::Other(fs_type) => {
                return Err(AgentError::NotSkiff {
                    path: mountpoint.to_owned(),
                    fs_type,
                })
            }
            MountedHere::Nothing => return Err(AgentError::NotMounted(mountpoint.to_owned())),
        },
    }
    // A supervisor or its daemon removes the connection's files; when both
    // are dead (a dead mount), nobody else will.
    if let Some(record) = run_dir.record(mountpoint).filter(|r| !r.is_alive()) {
        if let Some(files) = record
            .supervisor_socket
            .as_deref()
            .and_then(ConnectionFiles::of_socket)
        {
            files.remove();
        }
    }
    run_dir.remove_records(mountpoint);
    if mounted_here(mountpoint) == MountedHere::Skiff {
        return Err(AgentError::StillMounted(mountpoint.to_owned()));
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(image: &str, origin: Origin, record_profile: bool) -> MountRecord {
        MountRecord {
            daemon: ProcessId::current(),
            supervisor: None,
            supervisor_socket: None,
            image: image.into(),
            source: "test".into(),
            origin,
            mountpoint: "/m".into(),
            started_unix: 0,
            record_profile,
            nosuid: false,
        }
    }

    #[test]
    fn a_mount_is_shared_only_for_the_same_image_from_the_same_place_and_never_while_recording() {
        let image: ImageArg = "debian:12".parse().unwrap();
        let store = Origin::Store { path: "/s".into() };
        let server = Origin::Server {
            url: "http://h".into(),
        };
        assert!(record("debian:12", store.clone(), false).shareable_for(&image, &store));
        assert!(!record("debian:12", store.clone(), false).shareable_for(&image, &server));
        assert!(!record("debian:11", store.clone(), false).shareable_for(&image, &store));
        assert!(!record("debian:12", store.clone(), true).shareable_for(&image, &store));
        assert!(
            !record("debian:12", Origin::Unknown, false).shareable_for(&image, &Origin::Unknown)
        );
    }

    #[test]
    fn a_record_an_older_skiff_wrote_still_reads_with_an_unknown_origin() {
        let old = r#"{"pid": 7, "pid_start": 9, "image": "a:b", "source": "s",
                      "origin": {"kind": "s3", "bucket": "x"},
                      "mountpoint": "/m", "started_unix": 1}"#;
        let record: MountRecord = serde_json::from_str(old).unwrap();
        assert_eq!(record.daemon, ProcessId { pid: 7, start: 9 });
        assert_eq!(record.origin, Origin::Unknown);
        assert!(!record.record_profile);
    }

    #[test]
    fn a_spec_survives_its_trip_to_the_daemon() {
        let spec = MountSpec {
            image: "docker://127.0.0.1:5000/a/b:c".parse().unwrap(),
            origin: Origin::Registry {
                reference: "127.0.0.1:5000/a/b:c".into(),
            },
            mountpoint: "/run/skiff/images/x".into(),
            token_file: None,
            settings: MountSettings {
                prefetch: false,
                ..MountSettings::default()
            },
            record_profile: true,
        };
        let back = read_spec(&serde_json::to_vec(&spec).unwrap()[..]).unwrap();
        assert_eq!(back.image, spec.image);
        assert_eq!(back.origin, spec.origin);
        assert_eq!(back.settings, spec.settings);
        assert!(back.record_profile);
    }
}
