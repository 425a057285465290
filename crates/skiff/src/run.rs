//! `skiff run`, `skiff ps` and `skiff rm`: their arguments, the container's
//! supervision and what they print. Container state and the image's shared
//! lazy mount (a lease on it) come from `skiff-agent`.
//!
//! The image's lazy mount is shared: a mount of the same image from the
//! same place that `skiff mount`, another `skiff run` or the snapshotter
//! made is used as it is. A mount the agent made is unmounted when its last
//! holder lets go.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use skiff_agent::{
    check_container_id, new_container_id, now_unix, open_image, take_profile, ContainerState,
    Containers, ImageArg, MountRequest, OpenOptions, Origin, ProcessId, RunDir, SharedMounts,
    DEFAULT_RUN_DIR,
};
use skiff_format::ImageManifest;
use skiff_registry::Registry;
use skiff_runtime::{
    write_bundle, ExecConfig, Network, Overlay, RunOptions, Runtime, SecurityOptions,
};
use skiff_store::Store;

use crate::mount::MountFlags;
use crate::progress::bytes;
use crate::Remote;

const DEFAULT_CONTAINERS_DIR: &str = "/var/lib/skiff/containers";
/// How long `skiff rm --force` waits for a killed container's `skiff run` to clean up.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// How long a container may take to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct RunArgs {
    /// NAME[:TAG] of the image, or docker://HOST[:PORT]/REPO[:TAG] in a registry
    image: ImageArg,
    /// The command and its arguments [default: the image's Entrypoint and Cmd]
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
    /// Run the image from this server [default: from the local store, --store]
    #[arg(long, env = "SKIFF_SERVER", value_name = "URL")]
    server: Option<String>,
    /// File holding the server's bearer token (recording a profile needs the write token)
    #[arg(
        long,
        env = "SKIFF_TOKEN_FILE",
        value_name = "FILE",
        requires = "server"
    )]
    token_file: Option<PathBuf>,
    /// Remove the container when it exits
    #[arg(long)]
    rm: bool,
    /// The container's ID [default: 12 random hex digits]
    #[arg(long, value_name = "ID")]
    name: Option<String>,
    /// Set an environment variable (KEY=VALUE), or pass this one's on (KEY)
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the container [default: the image's]
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// user[:group], by name or number [default: the image's]
    #[arg(short, long, value_name = "USER")]
    user: Option<String>,
    /// Replace the image's entrypoint ("" clears it)
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// The container's host name [default: its ID]
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Give the container a terminal [default: when stdin and stdout are terminals]
    #[arg(short, long, conflicts_with = "no_tty")]
    tty: bool,
    /// Never give the container a terminal
    #[arg(long)]
    no_tty: bool,
    /// The container's network: host (the host's interfaces, as `docker run --network
    /// host`: its servers answer on 127.0.0.1, and it reaches every service the host
    /// listens on, loopback included) or none (loopback only). The default is host because
    /// skiff has no bridge network, and most images expect to reach the network; give
    /// untrusted images none
    #[arg(long, default_value = "host", value_name = "host|none")]
    network: Network,
    /// no-new-privileges (setuid binaries give nothing), or seccomp=unconfined (no
    /// seccomp filter) [default: docker's seccomp profile, device rules and masked paths]
    #[arg(long = "security-opt", value_name = "OPTION")]
    security_opt: Vec<String>,
    /// The OCI runtime
    #[arg(long, default_value = "crun", value_parser = ["crun", "runc"])]
    runtime: String,
    /// Record which files the start reads, in order, and store that startup
    /// profile with the image: later mounts fetch those chunks first
    #[arg(long)]
    record_profile: bool,
    /// Stop recording after this long even if the command still runs (a server)
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    profile_secs: u64,
    #[command(flatten)]
    mount: MountFlags,
    #[command(flatten)]
    dirs: Dirs,
}

impl RunArgs {
    fn security(&self) -> Result<SecurityOptions> {
        let mut security = SecurityOptions::default();
        for option in &self.security_opt {
            security.apply(option)?;
        }
        Ok(security)
    }
}

#[derive(clap::Args, Clone)]
pub struct Dirs {
    /// Where containers keep their state and writes (local disk)
    #[arg(long, env = "SKIFF_CONTAINERS", default_value = DEFAULT_CONTAINERS_DIR, value_name = "DIR")]
    containers: PathBuf,
    /// Where mounts keep their records and status sockets
    #[arg(long, env = "SKIFF_RUN_DIR", default_value = DEFAULT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,
}

impl Dirs {
    fn run_dir(&self) -> RunDir {
        RunDir::new(&self.run_dir)
    }

    fn shared_mounts(&self) -> SharedMounts {
        SharedMounts::new(self.run_dir())
    }
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// IDs of containers
    #[arg(required = true)]
    ids: Vec<String>,
    /// Stop a running container first
    #[arg(short, long)]
    force: bool,
    #[command(flatten)]
    dirs: Dirs,
}

/// The exit code a shell would report for `status`.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

pub fn run(store_dir: &Path, args: RunArgs) -> Result<ExitCode> {
    let runtime = Runtime::from_name(&args.runtime).context("unknown runtime")?;
    let id = args.name.clone().unwrap_or_else(new_container_id);
    check_container_id(&id)?;
    args.security()?;
    let containers = Containers::open(&args.dirs.containers)?;
    let dir = containers.path(&id);
    let origin = Origin::of(&args.image, args.server.as_deref(), store_dir)?;

    // Claim the ID and a mount of the image under the lock, so a container
    // ending now cannot unmount the image under this one.
    let lock = containers.lock()?;
    if dir.exists() {
        bail!("a container {id} exists already; `skiff rm {id}` removes it");
    }
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let request = MountRequest {
        image: args.image.clone(),
        origin: origin.clone(),
        token_file: args.token_file.clone(),
        settings: args.mount.settings(),
        recording_at: args.record_profile.then(|| dir.join("image")),
    };
    let supervisor = ProcessId::current();
    let leased =
        args.dirs
            .shared_mounts()
            .acquire(&request, &ContainerState::holder(&id), Some(supervisor));
    let lease = match leased {
        Ok(lease) => lease,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(anyhow::Error::new(e).context(format!("mounting {}", args.image)));
        }
    };
    let lower = lease.mountpoint.clone();
    let mut state = ContainerState {
        id: id.clone(),
        image: args.image.to_string(),
        command: args.command.clone(),
        runtime: runtime.name().to_owned(),
        created_unix: now_unix(),
        supervisor,
        lower: lower.clone(),
        lease: Some(lease),
        owns_mount: false,
        exit_code: None,
    };
    let saved = containers.save(&state).map_err(anyhow::Error::from);
    drop(lock);
    // The bundle may read the image's /etc/passwd over the network: not
    // under the lock.
    let prepared = saved.and_then(|()| prepare(&args, &dir, &lower, &id));
    let (manifest, bundle_args) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            finish(&containers, &args.dirs, &mut state, 125, true);
            return Err(e);
        }
    };
    state.command = bundle_args.clone();
    if let Err(e) = containers.save(&state) {
        finish(&containers, &args.dirs, &mut state, 125, true);
        return Err(e.into());
    }

    let state_root = args.dirs.run_dir().runtime_state(runtime.name());
    let code = match supervise(
        &args,
        runtime,
        &state_root,
        &dir,
        &id,
        &manifest,
        &bundle_args,
        store_dir,
    ) {
        Ok(code) => code,
        Err(e) => {
            if let Err(cleanup) = runtime.delete(&state_root, &id) {
                eprintln!("skiff: {cleanup}");
            }
            finish(&containers, &args.dirs, &mut state, 125, args.rm);
            return Err(e);
        }
    };
    finish(&containers, &args.dirs, &mut state, code, args.rm);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Mounts the overlay and writes the bundle; returns the manifest and the
/// command line.
fn prepare(
    args: &RunArgs,
    dir: &Path,
    lower: &Path,
    id: &str,
) -> Result<(ImageManifest, Vec<String>)> {
    let manifest_path = args.dirs.run_dir().manifest_path(lower);
    let manifest = std::fs::read(&manifest_path)
        .map_err(anyhow::Error::new)
        .and_then(|bytes| Ok(ImageManifest::from_json(&bytes)?))
        .with_context(|| format!("reading the image's manifest ({})", manifest_path.display()))?;
    let image = ExecConfig::from_image_config(manifest.config.get())?;
    let rootfs = dir.join("rootfs");
    Overlay::mount(lower, &dir.join("upper"), &dir.join("work"), &rootfs)?;
    let tty = args.tty
        || (!args.no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal());
    let options = RunOptions {
        command: args.command.clone(),
        entrypoint: args.entrypoint.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        hostname: args.hostname.clone().unwrap_or_else(|| id.to_owned()),
        tty,
        network: args.network,
        security: args.security()?,
    };
    let command = write_bundle(dir, &rootfs, &image, &options)?;
    Ok((manifest, command))
}

/// Runs the container to its end, recording a profile on the way if asked,
/// and returns its exit code.
#[allow(clippy::too_many_arguments)]
fn supervise(
    args: &RunArgs,
    runtime: Runtime,
    state_root: &Path,
    bundle: &Path,
    id: &str,
    manifest: &ImageManifest,
    command: &[String],
    store_dir: &Path,
) -> Result<i32> {
    std::fs::create_dir_all(state_root)
        .with_context(|| format!("creating {}", state_root.display()))?;
    let mut child = runtime
        .run_command(state_root, bundle, id)?
        .spawn()
        .with_context(|| format!("starting {}", runtime.name()))?;
    // SIGINT and SIGTERM go on to the container (the runtime passes them
    // to its process); one that ignores them (a PID 1 without a handler
    // does) is killed after a grace period, as `docker stop` does.
    let child_pid = Arc::new(AtomicU32::new(child.id()));
    let forward = child_pid.clone();
    let (kill_root, kill_id) = (state_root.to_owned(), id.to_owned());
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = kill(
            Pid::from_raw(forward.load(Ordering::Relaxed) as i32),
            Signal::SIGTERM,
        );
        let (root, id) = (kill_root.clone(), kill_id.clone());
        std::thread::spawn(move || {
            std::thread::sleep(STOP_GRACE);
            let _ = runtime.kill(&root, &id, "KILL");
        });
    }) {
        tracing::warn!("signals will not reach the container: {e}");
    }
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = if args.record_profile {
        let limit = Duration::from_secs(args.profile_secs);
        let status = done_rx.recv_timeout(limit).ok();
        if let Err(e) = store_profile(args, manifest, command, bundle, store_dir) {
            eprintln!("skiff: the startup profile was not stored: {e:#}");
        }
        match status {
            Some(status) => status,
            None => done_rx.recv().context("waiting for the container")?,
        }
    } else {
        done_rx.recv().context("waiting for the container")?
    };
    Ok(exit_code(status.context("waiting for the container")?))
}

/// Takes the profile from the recording mount and stores it in the image's
/// manifest, on the server or in the local store.
fn store_profile(
    args: &RunArgs,
    recorded_on: &ImageManifest,
    command: &[String],
    container_dir: &Path,
    store_dir: &Path,
) -> Result<()> {
    let recording = skiff_agent::mountpoint_path(&container_dir.join("image"))?;
    let profile = take_profile(&args.dirs.run_dir(), &recording)?;
    let mut profile = profile.context("the mount was not recording")?;
    profile.command = command.to_vec();
    let summary = profile.summary();
    let tag_moved = |now: &ImageManifest| {
        anyhow::anyhow!(
            "{} now names another image (index {}, the profile was recorded on {})",
            args.image,
            now.index.digest,
            recorded_on.index.digest
        )
    };
    let origin = Origin::of(&args.image, args.server.as_deref(), store_dir)?;
    let place = match (&origin, &args.image) {
        (Origin::Registry { .. }, ImageArg::Registry(reference)) => {
            let settings = args.mount.settings();
            let registry = Registry::new(reference)?.with_retry_window(settings.retry_window());
            // The profile's chunks, from the host's cache the recording filled.
            let image = open_image(&args.image, &origin, &settings, OpenOptions::default())?;
            let digest = skiff_client::put_profile(
                &registry,
                &recorded_on.index.digest,
                profile,
                image.source.as_ref(),
            )?;
            format!("{reference} (manifest {digest})")
        }
        (Origin::Server { url: server }, ImageArg::Named(image)) => {
            let remote = Remote {
                server: Some(server.clone()),
                token_file: args.token_file.clone(),
                retry_for: args.mount.settings().retry_for_secs,
            };
            let client = remote.client()?;
            let (mut manifest, etag) = client
                .manifest_and_etag(image)?
                .with_context(|| format!("{image} is no longer on {server}"))?;
            if manifest.index.digest != recorded_on.index.digest {
                return Err(tag_moved(&manifest));
            }
            manifest.profile = Some(profile);
            // Only if the tag has not moved since it was read (a push meanwhile).
            match client.put_manifest_if_match(&manifest, &etag) {
                Err(e) if e.status() == Some(412) => {
                    bail!("{image} changed on {server} while the profile was being stored; it is not stored")
                }
                other => other?,
            }
            server.clone()
        }
        (_, ImageArg::Named(image)) => {
            let store = Store::open(store_dir)?;
            let mut manifest = store.image(image)?;
            if manifest.index.digest != recorded_on.index.digest {
                return Err(tag_moved(&manifest));
            }
            manifest.profile = Some(profile);
            store.put_manifest(&manifest)?;
            format!("the store at {}", store_dir.display())
        }
        (origin, image) => bail!("{image} cannot come from the {origin}"),
    };
    eprintln!(
        "skiff: recorded a startup profile of {}: {} files, {} ranges, {} read; stored on {place}",
        args.image,
        summary.files,
        summary.ranges,
        bytes(summary.read_bytes)
    );
    Ok(())
}

/// Lets go of the container's hold on the image's mount.
fn release_lease(state: &ContainerState, dirs: &Dirs) {
    if let Some(lease) = &state.mount_lease() {
        if let Err(e) = dirs.shared_mounts().release(lease) {
            eprintln!("skiff: letting go of {}: {e}", lease.mountpoint.display());
        }
    }
}

/// Unmounts the overlay, records the exit code (or removes the container),
/// and lets go of the image's mount if this was its last container.
fn finish(
    containers: &Containers,
    dirs: &Dirs,
    state: &mut ContainerState,
    code: i32,
    remove: bool,
) {
    let dir = containers.path(&state.id);
    if let Err(e) = Overlay::unmount(&dir.join("rootfs")) {
        eprintln!("skiff: {e}");
    }
    let lock = containers.lock();
    if let Err(e) = &lock {
        // Cleaning up matters more than the lock: go on without it.
        eprintln!("skiff: {e:#}");
    }
    state.exit_code = Some(code);
    if let Err(e) = containers.save(state) {
        eprintln!("skiff: {e:#}");
    }
    // Before the directory goes: a private mount lives inside it.
    release_lease(state, dirs);
    if remove {
        if let Err(e) = containers.remove(state, &dirs.run_dir()) {
            eprintln!("skiff: {e:#}");
        }
    }
    drop(lock);
}

pub fn ps(dirs: &Dirs, json: bool) -> Result<()> {
    let containers = Containers::open(&dirs.containers)?;
    let states = containers.all();
    if json {
        let rows: Vec<_> = states
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id,
                    "image": s.image,
                    "command": s.command,
                    "runtime": s.runtime,
                    "created_unix": s.created_unix,
                    "running": s.is_running(),
                    "exit_code": s.exit_code,
                    "status": s.status(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<14} {:<24} {:<30} {:>9}  STATUS",
        "ID", "IMAGE", "COMMAND", "CREATED"
    );
    for state in states {
        let mut command = state.command.join(" ");
        if command.chars().count() > 30 {
            command = command.chars().take(27).collect::<String>() + "...";
        }
        let age = now_unix().saturating_sub(state.created_unix);
        println!(
            "{:<14} {:<24} {:<30} {:>9}  {}",
            state.id,
            state.image,
            command,
            format!("{} ago", human_age(age)),
            state.status()
        );
    }
    Ok(())
}

fn human_age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

pub fn rm(args: RmArgs) -> Result<()> {
    let containers = Containers::open(&args.dirs.containers)?;
    let mut failed = false;
    for id in &args.ids {
        match remove_one(&containers, &args, id) {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("skiff: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        bail!("some containers were not removed");
    }
    Ok(())
}

fn remove_one(containers: &Containers, args: &RmArgs, id: &str) -> Result<()> {
    check_container_id(id)?;
    let state = containers.state(id)?;
    if state.is_running() {
        if !args.force {
            bail!("container {id} is running; stop it, or `skiff rm --force {id}`");
        }
        // Killed, as `docker rm --force` does; its `skiff run` cleans up.
        let runtime = Runtime::from_name(&state.runtime).context("unknown runtime")?;
        let state_root = args.dirs.run_dir().runtime_state(runtime.name());
        runtime.kill(&state_root, id, "KILL")?;
        let deadline = Instant::now() + STOP_WAIT;
        while state.is_running() {
            if Instant::now() > deadline {
                bail!(
                    "container {id} did not stop within {} s",
                    STOP_WAIT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _lock = containers.lock()?;
    // Gone already if its `skiff run --rm` cleaned up.
    let Ok(now) = containers.state(id) else {
        return Ok(());
    };
    // Another container may have taken the ID since.
    if now.created_unix != state.created_unix
        || now.supervisor != state.supervisor
        || now.is_running()
    {
        bail!("container {id} was replaced by a new one while it was removed; it stays");
    }
    let state = now;
    if state.exit_code.is_none() {
        // Its `skiff run` died: what the runtime keeps of it goes too.
        if let Some(runtime) = Runtime::from_name(&state.runtime) {
            runtime.delete(&args.dirs.run_dir().runtime_state(runtime.name()), id)?;
        }
    }
    release_lease(&state, &args.dirs);
    containers.remove(&state, &args.dirs.run_dir())?;
    Ok(())
}
