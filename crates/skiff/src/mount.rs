//! `skiff mount`, `skiff umount` and `skiff status`: their arguments and
//! what they print. The daemons themselves live in `skiff-agent`.
//!
//! A mount is served by a daemon: `skiff mount` starts this binary's hidden
//! `mount-supervisor` command in its own process group with the mount's
//! typed spec on its stdin, waits until it says the file system is ready (a
//! line on a pipe, not a sleep), and returns. The supervisor starts the
//! `mount-daemon` that serves it, and another on the same connection if that
//! one dies.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::{Context, Result};
use skiff_agent::{
    mount_status, mountpoint_path, read_spec, serve_mount, start_daemon, stop_mount, supervise,
    supervise_upgrade, upgrade_mount, ImageArg, MountSettings, MountSpec, Origin, RunDir,
    Supervision, Unmounted, DEFAULT_CACHE_DIR, DEFAULT_RUN_DIR,
};

use crate::progress::bytes;

/// How a lazy mount fetches and caches: shared by `skiff mount` and `skiff
/// run`, with the defaults of [`MountSettings`].
#[derive(clap::Args, Clone)]
pub struct MountFlags {
    /// The host's chunk cache, shared by every mount
    #[arg(long, env = "SKIFF_CACHE", default_value = DEFAULT_CACHE_DIR, value_name = "DIR")]
    cache: PathBuf,
    /// Bound on the chunk cache; least recently used chunks go first
    #[arg(long, default_value_t = MountSettings::default().cache_max_gb, value_name = "GB")]
    cache_max_gb: f64,
    /// The cache is on storage that other hosts mount too (NFS, say): each
    /// chunk is claimed in it before it is fetched, so that of all the hosts
    /// reading an image one fetches each chunk and the others read it from
    /// the cache. A claim whose host stops renewing it expires in 10 s.
    /// Every process using the cache must say it
    #[arg(long)]
    shared: bool,
    /// Do not fetch the rest of the image in the background
    #[arg(long)]
    no_prefetch: bool,
    /// Cap on the background prefetch rate (0: none)
    #[arg(long, default_value_t = MountSettings::default().prefetch_rate_mb, value_name = "MB/S")]
    prefetch_rate_mb: u64,
    /// The largest read window: a read that misses fetches what follows it
    /// in the image (across files, in path order) in the same request,
    /// 256 KiB at first and twice as much each time reads go on in order,
    /// up to this
    #[arg(long, default_value_t = MountSettings::default().window_kib, value_name = "KIB")]
    window_kb: u64,
    /// Memory for chunks, per mount
    #[arg(long, default_value_t = MountSettings::default().memory_mib, value_name = "MIB")]
    memory_mb: u64,
    /// Seconds a read keeps retrying an unreachable or stalled server or registry before it fails with EIO
    #[arg(long, default_value_t = MountSettings::default().retry_for_secs, value_name = "SECS")]
    retry_for: u64,
    /// Do not fetch the image's startup profile first
    #[arg(long)]
    no_profile: bool,
    /// Answer every open of a file, so that an open file's chunks stay in
    /// the host's cache while it is open (a running container's binaries
    /// are then readable whatever the cache evicts and whether or not the
    /// registry is up), and files whose chunks are all on this host are
    /// read by the kernel straight from a copy on local disk (FUSE
    /// passthrough). Each open then costs a round trip to the daemon, and a
    /// release one after it: a cold walk of many small files is up to a
    /// quarter slower. Without it, the kernel opens files itself, and reads
    /// the page cache misses come from the daemon's memory, the host's
    /// cache or the network. [default: true for `skiff run` and the
    /// snapshotter, false for `skiff mount`]
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    passthrough: Option<bool>,
}

impl MountFlags {
    /// The settings of a container's mount (`skiff run`, the snapshotter).
    pub(crate) fn settings(&self) -> MountSettings {
        MountSettings {
            cache: self.cache.clone(),
            cache_max_gb: self.cache_max_gb,
            shared_cache: self.shared,
            prefetch: !self.no_prefetch,
            prefetch_rate_mb: self.prefetch_rate_mb,
            window_kib: self.window_kb,
            memory_mib: self.memory_mb,
            retry_for_secs: self.retry_for,
            use_profile: !self.no_profile,
            passthrough: self
                .passthrough
                .unwrap_or(MountSettings::default().passthrough),
            // skiff run and the snapshotter mount under root-only directories.
            setuid_and_devices: true,
        }
    }
}

#[derive(clap::Args)]
pub struct MountArgs {
    /// NAME[:TAG] of the image, or docker://HOST[:PORT]/REPO[:TAG] in a registry
    image: ImageArg,
    /// An empty directory to mount it on (created if missing)
    mountpoint: PathBuf,
    /// Read chunks from this server [default: from the local store, --store, or the image's registry]
    #[arg(long, env = "SKIFF_SERVER", value_name = "URL")]
    server: Option<String>,
    /// File holding the server's bearer token
    #[arg(
        long,
        env = "SKIFF_TOKEN_FILE",
        value_name = "FILE",
        requires = "server"
    )]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    flags: MountFlags,
    /// Honour the image's setuid bits and device nodes. Any user who can reach the
    /// mount point could then run its setuid binaries as root: use it only under a
    /// root-only directory [default: nosuid,nodev]
    #[arg(long)]
    suid_dev: bool,
    /// Stay in the foreground until unmounted (Ctrl-C or SIGTERM unmounts)
    #[arg(long)]
    foreground: bool,
    /// Where mounts keep their records and status sockets
    #[arg(long, env = "SKIFF_RUN_DIR", default_value = DEFAULT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct MountPointArgs {
    /// Where the image is mounted
    pub(crate) mountpoint: PathBuf,
    #[arg(long, env = "SKIFF_RUN_DIR", default_value = DEFAULT_RUN_DIR, value_name = "DIR")]
    pub(crate) run_dir: PathBuf,
}

pub fn mount(store_dir: &Path, args: MountArgs) -> Result<()> {
    let run_dir = RunDir::new(&args.run_dir);
    let spec = MountSpec {
        origin: Origin::of(&args.image, args.server.as_deref(), store_dir)?,
        image: args.image,
        mountpoint: mountpoint_path(&args.mountpoint)?,
        token_file: args.token_file,
        settings: MountSettings {
            setuid_and_devices: args.suid_dev,
            // A mount to read an image from: opens are left to the kernel.
            passthrough: args.flags.passthrough.unwrap_or(false),
            ..args.flags.settings()
        },
        record_profile: false,
    };
    if !args.foreground {
        let pid = start_daemon(&run_dir, &spec)?;
        eprintln!(
            "mounted at {} (daemon pid {pid}, log {}); `skiff status {0}` shows progress, `skiff umount {0}` unmounts",
            spec.mountpoint.display(),
            run_dir.log_path(&spec.mountpoint).display()
        );
        return Ok(());
    }
    serve(&run_dir, &spec, &Supervision::None, || {
        eprintln!(
            "{} mounted at {}; Ctrl-C unmounts",
            spec.image,
            spec.mountpoint.display()
        );
    })
}

/// `skiff mount-supervisor`: keeps the mount whose spec arrives on stdin
/// (or the mount it takes from another supervisor) served by daemons, and
/// says "ready" on stdout once the first answers.
pub fn supervisor(run_dir: &Path, upgrade: Option<&Path>) -> Result<()> {
    let run_dir = RunDir::new(run_dir);
    let stop = stop_on_signal()?;
    let ready = || {
        say_ready();
        Ok(())
    };
    match upgrade {
        Some(mountpoint) => supervise_upgrade(&run_dir, mountpoint, stop, ready)?,
        None => supervise(&run_dir, read_spec(std::io::stdin().lock())?, stop, ready)?,
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct UpgradeArgs {
    /// The mounts to upgrade [default: every mount in the run directory]
    mountpoints: Vec<PathBuf>,
    #[arg(long, env = "SKIFF_RUN_DIR", default_value = DEFAULT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,
}

/// `skiff upgrade`: each mount in turn; a failure leaves that mount as it
/// was and the others are still upgraded.
pub fn upgrade(args: UpgradeArgs) -> Result<ExitCode> {
    let run_dir = RunDir::new(&args.run_dir);
    let mountpoints = if args.mountpoints.is_empty() {
        let mut supervised = Vec::new();
        for record in run_dir.records().into_iter().filter(|r| r.is_alive()) {
            if record.is_supervised() {
                supervised.push(record.mountpoint);
            } else {
                eprintln!(
                    "skipping {}: no supervisor (--foreground, or its supervisor was killed); \
                     unmount it and mount it again to upgrade it",
                    record.mountpoint.display()
                );
            }
        }
        supervised
    } else {
        args.mountpoints
            .iter()
            .map(|path| mountpoint_path(path))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut failed = 0;
    for mountpoint in &mountpoints {
        match upgrade_mount(&run_dir, mountpoint) {
            Ok(pid) => eprintln!("upgraded {} (supervisor pid {pid})", mountpoint.display()),
            Err(e) => {
                failed += 1;
                eprintln!("skiff: error: upgrading {}: {e}", mountpoint.display());
            }
        }
    }
    if mountpoints.is_empty() {
        eprintln!("no mounts in {}", run_dir.root().display());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `skiff mount-daemon`: serves the mount whose spec arrives on stdin and
/// says "ready" on stdout once it answers.
pub fn daemon(run_dir: &Path, supervisor: Option<PathBuf>, takeover: bool) -> Result<()> {
    let supervision = match supervisor {
        Some(socket) if takeover => Supervision::Takeover { socket },
        Some(socket) => Supervision::First { socket },
        None => Supervision::None,
    };
    if !matches!(supervision, Supervision::None) {
        // A panicking thread would leave a half-working mount that then
        // unmounts itself; dying at once lets the supervisor start another.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            std::process::abort();
        }));
    }
    let spec = read_spec(std::io::stdin().lock())?;
    serve(&RunDir::new(run_dir), &spec, &supervision, say_ready)
}

fn say_ready() {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());
}

/// The first SIGINT or SIGTERM, as a message.
fn stop_on_signal() -> Result<mpsc::Receiver<()>> {
    let (stop_tx, stop_rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the signal handler")?;
    Ok(stop_rx)
}

fn serve(
    run_dir: &RunDir,
    spec: &MountSpec,
    supervision: &Supervision,
    ready: impl FnOnce(),
) -> Result<()> {
    // Before anything is mounted: a signal from now on unmounts cleanly.
    let stop = stop_on_signal()?;
    serve_mount(run_dir, spec, supervision, stop, || {
        ready();
        Ok(())
    })?;
    Ok(())
}

pub fn umount(args: MountPointArgs) -> Result<()> {
    let mountpoint = mountpoint_path(&args.mountpoint)?;
    if let Unmounted::Detached { pid } = stop_mount(&RunDir::new(&args.run_dir), &mountpoint)? {
        eprintln!(
            "{} was busy: it is detached, and the daemon (pid {pid}) serves the files still open until they are closed",
            mountpoint.display()
        );
    }
    Ok(())
}

pub fn status(args: MountPointArgs, json: bool) -> Result<()> {
    let mountpoint = mountpoint_path(&args.mountpoint)?;
    let status = mount_status(&RunDir::new(&args.run_dir), &mountpoint)?;
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
        if t.from_shared_cache > 0 {
            println!(
                "shared      {} chunks came from the shared cache, fetched by other hosts",
                t.from_shared_cache
            );
        }
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
