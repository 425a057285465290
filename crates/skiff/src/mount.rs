//! `skiff mount`, `skiff umount` and `skiff status`.
//!
//! A mount is served by a daemon: `skiff mount` starts itself again with
//! `--foreground` in its own process group, waits until that process says
//! the file system is ready (a line on a pipe, not a sleep), and returns.
//! The daemon keeps a record and a status socket in the run directory:
//!
//! ```text
//! RUN_DIR/mounts/KEY.json   pid, image, source, mount point
//! RUN_DIR/mounts/KEY.sock   answers with the mount's status as JSON
//! RUN_DIR/mounts/KEY.log    the daemon's log
//! ```
//! where KEY is derived from the mount point's canonical path.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use skiff_client::{process_is_running, ChunkCache};
use skiff_format::ChunkId;
use skiff_fuse::{LocalShare, Mount, MountOptions, PrefetchConfig, StatsReport};
use skiff_source::SourceTraffic;

use crate::origin::{open_image, ImageArg, OpenOptions, OpenedImage, Origin};
use crate::progress::bytes;

pub(crate) const DEFAULT_RUN_DIR: &str = "/run/skiff";
pub(crate) const DEFAULT_CACHE_DIR: &str = "/var/cache/skiff/chunks";
/// How long `skiff umount` waits for the daemon to let go.
const UNMOUNT_WAIT: Duration = Duration::from_secs(20);

#[derive(clap::Args)]
pub struct MountArgs {
    /// NAME[:TAG] of the image, or docker://HOST[:PORT]/REPO[:TAG] in a registry
    pub(crate) image: ImageArg,
    /// An empty directory to mount it on (created if missing)
    pub(crate) mountpoint: PathBuf,
    /// Read chunks from this server [default: from the local store, --store, or the image's registry]
    #[arg(long, env = "SKIFF_SERVER", value_name = "URL")]
    pub(crate) server: Option<String>,
    /// File holding the server's bearer token
    #[arg(
        long,
        env = "SKIFF_TOKEN_FILE",
        value_name = "FILE",
        requires = "server"
    )]
    pub(crate) token_file: Option<PathBuf>,
    /// The host's chunk cache, shared by every mount
    #[arg(long, env = "SKIFF_CACHE", default_value = DEFAULT_CACHE_DIR, value_name = "DIR")]
    pub(crate) cache: PathBuf,
    /// Bound on the chunk cache; least recently used chunks go first
    #[arg(long, default_value_t = 20.0, value_name = "GB")]
    pub(crate) cache_max_gb: f64,
    /// Do not fetch the rest of the image in the background
    #[arg(long)]
    pub(crate) no_prefetch: bool,
    /// Cap on the background prefetch rate (0: none)
    #[arg(long, default_value_t = 0, value_name = "MB/S")]
    pub(crate) prefetch_rate_mb: u64,
    /// A read that misses fetches this much of the file in one request
    #[arg(long, default_value_t = 1024, value_name = "KIB")]
    pub(crate) window_kb: u64,
    /// Memory for chunks, per mount
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub(crate) memory_mb: u64,
    /// Seconds a read keeps retrying an unreachable or stalled server or registry before it fails with EIO
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub(crate) retry_for: u64,
    /// Stay in the foreground until unmounted (Ctrl-C or SIGTERM unmounts)
    #[arg(long)]
    pub(crate) foreground: bool,
    /// Where mounts keep their records and status sockets
    #[arg(long, env = "SKIFF_RUN_DIR", default_value = DEFAULT_RUN_DIR, value_name = "DIR")]
    pub(crate) run_dir: PathBuf,
    /// Do not fetch the image's startup profile first
    #[arg(long)]
    pub(crate) no_profile: bool,
    /// Record a startup profile of the reads from now on (`skiff run --record-profile`)
    #[arg(long, hide = true)]
    pub(crate) record_profile: bool,
    /// Print "ready" on stdout once mounted (used by the parent of a daemon)
    #[arg(long, hide = true)]
    pub(crate) notify_ready: bool,
}

#[derive(clap::Args)]
pub struct MountPointArgs {
    /// Where the image is mounted
    pub(crate) mountpoint: PathBuf,
    #[arg(long, env = "SKIFF_RUN_DIR", default_value = DEFAULT_RUN_DIR, value_name = "DIR")]
    pub(crate) run_dir: PathBuf,
}

/// What the run directory records about a live mount.
#[derive(Serialize, Deserialize)]
struct MountRecord {
    pid: u32,
    /// The daemon's start time (clock ticks after boot), so a pid reused by
    /// another process is not mistaken for it.
    #[serde(default)]
    pid_start: u64,
    image: String,
    source: String,
    /// Where the image comes from.
    #[serde(default = "unknown_origin", deserialize_with = "Origin::lenient")]
    origin: Origin,
    mountpoint: PathBuf,
    started_unix: u64,
}

fn unknown_origin() -> Origin {
    Origin::Unknown
}

/// `skiff status --json`.
#[derive(Serialize, Deserialize)]
struct MountStatus {
    image: String,
    source: String,
    mountpoint: PathBuf,
    pid: u32,
    uptime_secs: f64,
    /// Chunks of this image on this host (memory or cache).
    local: LocalShare,
    stats: StatsReport,
    /// What the source did on the network (a registry's requests, bytes, ranges).
    #[serde(default)]
    traffic: Option<SourceTraffic>,
    cache: Option<CacheStatus>,
}

#[derive(Serialize, Deserialize)]
struct CacheStatus {
    dir: PathBuf,
    bytes: u64,
    max_bytes: u64,
}

/// The mount point as an absolute path with its parent's symlinks resolved,
/// without touching the mount point itself (a dead mount fails every stat).
fn mountpoint_path(path: &Path) -> Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
        bail!("cannot mount on {}", path.display());
    };
    let parent = parent
        .canonicalize()
        .with_context(|| format!("{}", parent.display()))?;
    Ok(parent.join(name))
}

fn record_paths(run_dir: &Path, mountpoint: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = record_base(run_dir, mountpoint);
    (
        base.with_extension("json"),
        base.with_extension("sock"),
        base.with_extension("log"),
    )
}

fn record_base(run_dir: &Path, mountpoint: &Path) -> PathBuf {
    let key = ChunkId::of(mountpoint.as_os_str().as_encoded_bytes()).to_string();
    run_dir.join("mounts").join(&key[..16])
}

/// The log of the daemon of the mount at `mountpoint`.
pub(crate) fn log_path(run_dir: &Path, mountpoint: &Path) -> PathBuf {
    record_base(run_dir, mountpoint).with_extension("log")
}

/// Where the daemon of the mount at `mountpoint` keeps the image's manifest.
pub(crate) fn manifest_path(run_dir: &Path, mountpoint: &Path) -> PathBuf {
    record_base(run_dir, mountpoint).with_extension("manifest.json")
}

/// A live skiff mount of `image` from `origin` that this run dir knows.
pub(crate) fn find_mount(run_dir: &Path, image: &ImageArg, origin: &Origin) -> Option<PathBuf> {
    let image = image.to_string();
    std::fs::read_dir(run_dir.join("mounts"))
        .ok()?
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
        .filter_map(|entry| read_record(&entry.path()))
        .find(|record| {
            record.image == image
                && record.origin == *origin
                && record.origin != Origin::Unknown
                && record.daemon_runs()
                && mounted_here(&record.mountpoint) == MountedHere::Skiff
        })
        .map(|record| record.mountpoint)
}

/// What is mounted at `path`, from /proc/self/mountinfo.
#[derive(PartialEq, Eq)]
enum MountedHere {
    Nothing,
    /// A skiff FUSE mount (its source reads "skiff:IMAGE").
    Skiff,
    Other(String),
}

fn mounted_here(path: &Path) -> MountedHere {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return MountedHere::Nothing;
    };
    let Some(wanted) = path.to_str() else {
        return MountedHere::Nothing;
    };
    // The last line for a path is the mount on top.
    for line in info.lines().rev() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(point), Some(dash)) = (fields.get(4), fields.iter().position(|f| *f == "-"))
        else {
            continue;
        };
        if unescape_mountinfo(point) != wanted {
            continue;
        }
        let fs_type = fields.get(dash + 1).copied().unwrap_or("?");
        let source = fields
            .get(dash + 2)
            .map(|s| unescape_mountinfo(s))
            .unwrap_or_default();
        return if fs_type.starts_with("fuse") && source.starts_with("skiff:") {
            MountedHere::Skiff
        } else {
            MountedHere::Other(fs_type.to_owned())
        };
    }
    MountedHere::Nothing
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&digits, 8) {
                Ok(byte) => out.push(byte as char),
                Err(_) => out.push_str(&digits),
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read_record(path: &Path) -> Option<MountRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// When process `pid` started, in clock ticks after boot (/proc/PID/stat field 22).
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(COMM)" start with the state, field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid`, which started at `start` (see [`process_start`]),
/// still runs: a pid reused by another process does not count.
pub(crate) fn still_runs(pid: u32, start: u64) -> bool {
    process_is_running(pid) && process_start(pid) == Some(start)
}

impl MountRecord {
    /// Whether the daemon that wrote this record still runs.
    fn daemon_runs(&self) -> bool {
        still_runs(self.pid, self.pid_start)
    }
}

/// Whether the mount at `path` is dead: its daemon is gone and every access
/// fails with ENOTCONN.
fn is_dead_mount(path: &Path) -> bool {
    // Opening asks the daemon (a stat may be answered from the kernel's cache).
    std::fs::read_dir(path).is_err_and(|e| e.raw_os_error() == Some(nix::libc::ENOTCONN))
}

/// Removes a mount's record and status socket when the daemon stops, however it stops.
struct RecordFiles<'a>(&'a [&'a Path]);

impl Drop for RecordFiles<'_> {
    fn drop(&mut self) {
        for path in self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Detaches a skiff mount whose daemon is gone ("Transport endpoint is not connected").
fn clear_dead_mount(mountpoint: &Path) -> Result<()> {
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmounting the dead mount at {}", mountpoint.display()))?;
    tracing::warn!("removed a dead skiff mount at {}", mountpoint.display());
    Ok(())
}

/// Refuses a mount point that is in use or not a directory, clears a dead
/// skiff mount there, and creates the mount point and the run directory.
fn check_mount_point(args: &MountArgs, mountpoint: &Path) -> Result<()> {
    let (record_path, _, _) = record_paths(&args.run_dir, mountpoint);
    if args.cache_max_gb.is_nan() || args.cache_max_gb <= 0.0 {
        bail!("--cache-max-gb must be above 0, not {}", args.cache_max_gb);
    }
    match (mounted_here(mountpoint), read_record(&record_path)) {
        // Its mount was taken away from outside and the daemon is winding
        // down: its files go with it, so wait rather than race it.
        (MountedHere::Nothing, Some(record)) if record.daemon_runs() => {
            let deadline = Instant::now() + UNMOUNT_WAIT;
            while record.daemon_runs() {
                if Instant::now() > deadline {
                    bail!(
                        "the daemon (pid {}) of an earlier mount at {} does not exit",
                        record.pid,
                        mountpoint.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        (MountedHere::Nothing, _) => {}
        (MountedHere::Skiff, Some(record)) if record.daemon_runs() => bail!(
            "{} already has {} mounted (pid {}); run `skiff umount {}` first",
            mountpoint.display(),
            record.image,
            record.pid,
            mountpoint.display()
        ),
        (MountedHere::Skiff, _) if is_dead_mount(mountpoint) => clear_dead_mount(mountpoint)?,
        (MountedHere::Skiff, _) => bail!(
            "{} is mounted by a skiff daemon that {} does not know (another --run-dir?)",
            mountpoint.display(),
            args.run_dir.display()
        ),
        (MountedHere::Other(fs_type), _) => bail!(
            "{} is already a mount point ({fs_type}); pick an empty directory",
            mountpoint.display()
        ),
    }
    if std::fs::symlink_metadata(mountpoint).is_ok_and(|m| !m.is_dir()) {
        bail!("{} is not a directory", mountpoint.display());
    }
    std::fs::create_dir_all(mountpoint)
        .with_context(|| format!("creating {}", mountpoint.display()))?;
    std::fs::create_dir_all(record_path.parent().context("run directory")?)
        .with_context(|| format!("creating {}", args.run_dir.display()))?;
    Ok(())
}

pub fn mount(store_dir: &Path, args: MountArgs) -> Result<()> {
    let mountpoint = mountpoint_path(&args.mountpoint)?;
    let (record_path, socket_path, log_path) = record_paths(&args.run_dir, &mountpoint);
    check_mount_point(&args, &mountpoint)?;
    if !args.foreground {
        let pid = spawn_daemon(&daemon_argv(store_dir, &args, &mountpoint), &log_path)?;
        eprintln!(
            "mounted at {} (daemon pid {pid}, log {}); `skiff status {0}` shows progress, `skiff umount {0}` unmounts",
            mountpoint.display(),
            log_path.display()
        );
        return Ok(());
    }
    serve_mount(store_dir, &args, &mountpoint, &record_path, &socket_path)
}

/// The command line of the daemon serving `args`.
fn daemon_argv(store_dir: &Path, args: &MountArgs, mountpoint: &Path) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![
        "--store".into(),
        store_dir.into(),
        "mount".into(),
        args.image.to_string().into(),
        mountpoint.into(),
        "--cache".into(),
        args.cache.clone().into(),
        format!("--cache-max-gb={}", args.cache_max_gb).into(),
        format!("--prefetch-rate-mb={}", args.prefetch_rate_mb).into(),
        format!("--window-kb={}", args.window_kb).into(),
        format!("--memory-mb={}", args.memory_mb).into(),
        format!("--retry-for={}", args.retry_for).into(),
        "--run-dir".into(),
        args.run_dir.clone().into(),
        "--foreground".into(),
        "--notify-ready".into(),
    ];
    if let Some(server) = &args.server {
        argv.extend(["--server".into(), server.into()]);
    }
    if let Some(token_file) = &args.token_file {
        argv.extend(["--token-file".into(), token_file.into()]);
    }
    for (set, flag) in [
        (args.no_prefetch, "--no-prefetch"),
        (args.no_profile, "--no-profile"),
        (args.record_profile, "--record-profile"),
    ] {
        if set {
            argv.push(flag.into());
        }
    }
    argv
}

/// Mounts as `args` say (the checks of `skiff mount` included) with a daemon,
/// and returns once it is ready.
pub(crate) fn mount_in_background(store_dir: &Path, args: MountArgs) -> Result<u32> {
    let mountpoint = mountpoint_path(&args.mountpoint)?;
    let (_, _, log_path) = record_paths(&args.run_dir, &mountpoint);
    let args = MountArgs {
        foreground: true,
        ..args
    };
    check_mount_point(&args, &mountpoint)?;
    spawn_daemon(&daemon_argv(store_dir, &args, &mountpoint), &log_path)
}

/// Starts the daemon (`skiff … mount … --foreground --notify-ready`) in its
/// own process group with its log in the run directory, and returns its pid
/// once it reports the mount ready.
fn spawn_daemon(argv: &[OsString], log_path: &Path) -> Result<u32> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut command = Command::new(std::env::current_exe().context("finding the skiff binary")?);
    command
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Ctrl-C in this terminal must not reach the daemon.
        .process_group(0);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    let mut child = command.spawn().context("starting the mount daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() == "ready" {
        return Ok(child.id());
    }
    let status = child.wait()?;
    let mut log_text = String::new();
    if let Ok(mut log) = std::fs::File::open(log_path) {
        use std::io::Seek;
        let _ = log.seek(std::io::SeekFrom::Start(log_start));
        let _ = log.read_to_string(&mut log_text);
    }
    let reason = log_text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("skiff: error: "))
        .unwrap_or("see the log");
    bail!(
        "the mount daemon exited ({status}) before the mount was ready: {reason} ({})",
        log_path.display()
    )
}

fn serve_mount(
    store_dir: &Path,
    args: &MountArgs,
    mountpoint: &Path,
    record_path: &Path,
    socket_path: &Path,
) -> Result<()> {
    let started = Instant::now();
    // Before anything is mounted: a signal from now on unmounts cleanly.
    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the signal handler")?;
    let origin = Origin::of(&args.image, args.server.as_deref(), store_dir)?;
    let OpenedImage {
        manifest,
        index,
        source,
        cache,
    } = open_image(
        &args.image,
        &origin,
        &OpenOptions {
            token_file: args.token_file.as_deref(),
            retry_for: Duration::from_secs(args.retry_for),
            cache: &args.cache,
            cache_max_bytes: (args.cache_max_gb * 1e9) as u64,
        },
    )?;
    let describe = source.describe();
    // A recording mount must not learn from the profile it is replacing.
    let first = match &manifest.profile {
        Some(profile) if !args.no_profile && !args.record_profile => {
            match profile.chunk_order(&index) {
                Ok(first) => first,
                Err(e) => {
                    tracing::warn!("ignoring the image's startup profile: {e}");
                    Vec::new()
                }
            }
        }
        _ => Vec::new(),
    };
    // Prefetching from a local store would only copy it into memory.
    let prefetch = (!args.no_prefetch && cache.is_some()).then(|| PrefetchConfig {
        max_rate: args.prefetch_rate_mb * 1_000_000,
        first,
        ..PrefetchConfig::default()
    });
    let options = MountOptions {
        memory_bytes: args.memory_mb << 20,
        window_bytes: args.window_kb << 10,
        prefetch,
        fsname: format!("skiff:{}", args.image),
        record_profile: args.record_profile,
        ..MountOptions::default()
    };
    let mount = Mount::start(index, source, mountpoint, &options)?;
    let pid = std::process::id();
    let record = MountRecord {
        pid,
        pid_start: process_start(pid).unwrap_or(0),
        image: args.image.to_string(),
        source: describe,
        origin,
        mountpoint: mountpoint.to_owned(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let manifest_path = manifest_path(&args.run_dir, mountpoint);
    let _records = RecordFiles(&[record_path, socket_path, &manifest_path]);
    // The manifest first: whoever finds the record finds the manifest.
    write_atomically(&manifest_path, &manifest.to_json())?;
    write_atomically(record_path, &serde_json::to_vec_pretty(&record)?)?;
    let _ = std::fs::remove_file(socket_path);
    let listener = UnixListener::bind(socket_path)
        .with_context(|| format!("listening on {}", socket_path.display()))?;
    let mount = Arc::new(mount);
    spawn_status_server(listener, mount.clone(), record, cache, started);
    tracing::info!(
        "{} mounted at {} in {:.0} ms",
        args.image,
        mountpoint.display(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    if args.notify_ready {
        println!("ready");
        std::io::stdout().flush()?;
    } else {
        eprintln!(
            "{} mounted at {}; Ctrl-C unmounts",
            args.image,
            mountpoint.display()
        );
    }

    // Until a signal, or until someone unmounts it from outside.
    while mount.is_mounted() {
        if stop_rx.recv_timeout(Duration::from_millis(20)).is_ok() {
            break;
        }
    }
    // The mount point is free for a new mount from here on, even while a
    // busy mount is detached and still serves its open files.
    drop(_records);
    let mut mount = mount;
    let mount = loop {
        // A status request holds the mount for a moment.
        match Arc::try_unwrap(mount) {
            Ok(mount) => break mount,
            Err(shared) => mount = shared,
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    mount.unmount()?;
    tracing::info!("unmounted {}", mountpoint.display());
    Ok(())
}

/// Written aside and renamed: a reader never sees half a file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, path))
        .with_context(|| format!("writing {}", path.display()))
}

fn spawn_status_server(
    listener: UnixListener,
    mount: Arc<Mount>,
    record: MountRecord,
    cache: Option<Arc<ChunkCache>>,
    started: Instant,
) {
    let weak = Arc::downgrade(&mount);
    drop(mount);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Some(mount) = weak.upgrade() else { return };
            let Ok(mut stream) = stream else { continue };
            // One request line: `status` (or nothing) or `profile`.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request = String::new();
            let _ = BufReader::new(&stream).read_line(&mut request);
            let body = if request.trim() == "profile" {
                serde_json::to_vec(&mount.finish_profile(Vec::new()))
            } else {
                serde_json::to_vec(&MountStatus {
                    image: record.image.clone(),
                    source: record.source.clone(),
                    mountpoint: record.mountpoint.clone(),
                    pid: record.pid,
                    uptime_secs: started.elapsed().as_secs_f64(),
                    local: mount.local_share(),
                    stats: mount.stats(),
                    traffic: mount.source_traffic(),
                    cache: cache.as_ref().map(|c| CacheStatus {
                        dir: c.root().to_owned(),
                        bytes: c.approx_bytes(),
                        max_bytes: c.max_bytes(),
                    }),
                })
            };
            drop(mount);
            if let Ok(body) = body {
                let _ = stream.write_all(&body);
            }
        }
    });
}

/// Sends `request` to the daemon of the mount at `mountpoint` and returns its answer.
pub(crate) fn ask_daemon(run_dir: &Path, mountpoint: &Path, request: &str) -> Result<Vec<u8>> {
    let (_, socket_path, _) = record_paths(run_dir, mountpoint);
    let mut stream = UnixStream::connect(&socket_path).with_context(|| {
        format!(
            "no skiff mount answers for {} (looked for {})",
            mountpoint.display(),
            socket_path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    Ok(body)
}

pub fn umount(args: MountPointArgs) -> Result<()> {
    stop_mount(&args, true)
}

/// Unmounts what a skiff daemon serves at `args.mountpoint`; a busy mount is
/// detached (and said so when `loud`).
pub(crate) fn stop_mount(args: &MountPointArgs, loud: bool) -> Result<()> {
    let mountpoint = mountpoint_path(&args.mountpoint)?;
    let (record_path, socket_path, _) = record_paths(&args.run_dir, &mountpoint);
    match read_record(&record_path) {
        Some(record) if record.daemon_runs() => {
            kill(Pid::from_raw(record.pid as i32), Signal::SIGTERM)
                .with_context(|| format!("signalling the mount daemon (pid {})", record.pid))?;
            // Done when the daemon exits, or when it has detached a busy
            // mount and serves the files still open.
            let deadline = Instant::now() + UNMOUNT_WAIT;
            while record.daemon_runs() && mounted_here(&mountpoint) == MountedHere::Skiff {
                if Instant::now() > deadline {
                    bail!(
                        "the mount daemon (pid {}) did not unmount {} within {} s; see its log",
                        record.pid,
                        mountpoint.display(),
                        UNMOUNT_WAIT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if record.daemon_runs() && loud {
                eprintln!(
                    "{} was busy: it is detached, and the daemon (pid {}) serves the files still open until they are closed",
                    mountpoint.display(),
                    record.pid
                );
            }
        }
        _ => match mounted_here(&mountpoint) {
            MountedHere::Skiff if is_dead_mount(&mountpoint) => clear_dead_mount(&mountpoint)?,
            MountedHere::Skiff => bail!(
                "{} is mounted by a skiff daemon that {} does not know (another --run-dir?)",
                mountpoint.display(),
                args.run_dir.display()
            ),
            MountedHere::Other(fs_type) => {
                bail!("{} is a {fs_type} mount, not skiff's", mountpoint.display())
            }
            MountedHere::Nothing => bail!("nothing is mounted at {}", mountpoint.display()),
        },
    }
    let _ = std::fs::remove_file(&record_path);
    let _ = std::fs::remove_file(&socket_path);
    let _ = std::fs::remove_file(manifest_path(&args.run_dir, &mountpoint));
    if mounted_here(&mountpoint) == MountedHere::Skiff {
        bail!("{} is still mounted", mountpoint.display());
    }
    Ok(())
}

pub fn status(args: MountPointArgs, json: bool) -> Result<()> {
    let mountpoint = mountpoint_path(&args.mountpoint)?;
    let body = ask_daemon(&args.run_dir, &mountpoint, "status")?;
    let status: MountStatus =
        serde_json::from_slice(&body).context("reading the mount's status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let s = &status.stats;
    let percent = |part: u64, whole: u64| {
        if whole == 0 {
            100.0
        } else {
            part as f64 * 100.0 / whole as f64
        }
    };
    let latency = |v: Option<u64>| v.map_or("-".to_owned(), |us| format!("<{us} µs"));
    println!(
        "image       {} at {}",
        status.image,
        status.mountpoint.display()
    );
    println!("source      {}", status.source);
    println!(
        "daemon      pid {}, up {:.0} s",
        status.pid, status.uptime_secs
    );
    println!(
        "local       {:.1}% of the image ({} of {}, {} of {} chunks){}",
        percent(status.local.local_bytes, status.local.bytes),
        bytes(status.local.local_bytes),
        bytes(status.local.bytes),
        status.local.local_chunks,
        status.local.chunks,
        if s.prefetch_done {
            ", prefetch done"
        } else {
            ""
        }
    );
    println!(
        "fetched     {} in {} chunks, {} requests ({} by prefetch)",
        bytes(s.fetched_bytes),
        s.fetched_chunks,
        s.fetch_requests,
        bytes(s.prefetched_bytes)
    );
    println!(
        "reads       {} ({}), {} failed; chunk hits: {} memory, {} disk",
        s.reads,
        bytes(s.read_bytes),
        s.failed_reads,
        s.memory_hits,
        s.disk_hits
    );
    println!(
        "latency     p50 {}, p90 {}, p99 {}",
        latency(s.read_latency_us_p50),
        latency(s.read_latency_us_p90),
        latency(s.read_latency_us_p99)
    );
    if s.profile_chunks > 0 {
        println!(
            "profile     {} chunks fetched first{}",
            s.profile_chunks,
            if s.profile_done { ", all here" } else { "" }
        );
    }
    if s.corrupt_chunks > 0 {
        println!("corrupt     {} chunks refused", s.corrupt_chunks);
    }
    if let Some(t) = &status.traffic {
        println!(
            "network     {} requests, {} ranges, {} received, {} retried",
            t.requests,
            t.ranges,
            bytes(t.bytes),
            t.retries
        );
        for note in &t.notes {
            println!("note        {note}");
        }
    }
    if let Some(cache) = &status.cache {
        println!(
            "cache       {} ({} of {})",
            cache.dir.display(),
            bytes(cache.bytes),
            bytes(cache.max_bytes)
        );
    }
    Ok(())
}
