//! The `skiff` command.

mod analyze;
mod attach;
mod mount;
mod progress;
mod relayer;
mod run;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::time::Duration;

use skiff_client::{Client, TransferReport};
use skiff_format::wire::ImageSummary;
use skiff_format::ImageRef;
use skiff_registry::{BareCredentials, Registry, RegistryRef};

use skiff_agent::ImageArg;
use skiff_oci::{ConvertOptions, ImageSource, Platform};
use skiff_server::{ConnectionLimits, Server, ServerConfig, Tokens};
use skiff_store::{Store, StoreConfig};

#[derive(Parser)]
#[command(
    name = "skiff",
    version,
    about = "Lazy-loading, chunk-deduplicated container image store",
    long_about = "skiff converts OCI images into a store of content-defined chunks (FastCDC, \
                  zstd, BLAKE3): files shared by any images or layers are stored once.\n\n\
                  Logging goes to stderr and is filtered by RUST_LOG (e.g. RUST_LOG=debug)."
)]
struct Cli {
    /// The store directory [default: $SKIFF_STORE, else $XDG_DATA_HOME/skiff, else ~/.local/share/skiff]
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

/// How `convert` and `attach` convert.
#[derive(clap::Args)]
struct ConvertFlags {
    /// Platform to pick from a multi-platform index, os/arch[/variant] [default: the host's]
    #[arg(long)]
    platform: Option<String>,
    /// Chunking and compression threads [default: one per core]
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl ConvertFlags {
    fn options(&self) -> Result<ConvertOptions> {
        Ok(ConvertOptions {
            platform: Platform::parse_or_host(self.platform.as_deref())?,
            threads: self.threads,
            ..ConvertOptions::default()
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Convert an OCI image into the store (creating the store if needed)
    #[command(after_help = "SOURCE is one of:\n  \
        oci:DIR[:TAG]                    an OCI image layout directory\n  \
        docker-archive:FILE[:NAME:TAG]   a `docker save` archive\n  \
        docker://[HOST/]NAME[:TAG|@DIGEST]  a registry (plain HTTP for loopback hosts and\n  \
                                         those in SKIFF_INSECURE_REGISTRIES; credentials\n  \
                                         from SKIFF_REGISTRY_AUTH=user:password)\n\n\
        TARGET is NAME[:TAG] in the store, or docker://HOST[:PORT]/REPO:TAG: converted into\n  \
        --store if given (so later pushes share its blobs), else a temporary store, then\n  \
        pushed to that registry.\n\n\
        Examples:\n  \
        skiff convert oci:./debian:bookworm debian:bookworm\n  \
        skiff convert docker://registry.example/debian:12 docker://registry.example/skiff/debian:12")]
    Convert {
        /// Where the image comes from
        source: String,
        /// NAME[:TAG] to store it under (tag defaults to latest), or docker://HOST/REPO:TAG to publish to
        target: ImageArg,
        #[command(flatten)]
        conversion: ConvertFlags,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Publish skiff's artifacts beside an image in a registry, leaving its tag as it is
    #[command(
        long_about = "Converts the image at docker://HOST/REPO:TAG and attaches skiff's artifacts \
        to it in the same repository (OCI 1.1 `subject`): one skiff image for each prefix of \
        its layers, listed by the registry's referrers API or, on registries without one \
        (distribution 2.x), at the tag sha256-HEX. The tag still names the original image, \
        which every other client pulls as before; skiff's containerd snapshotter, asked for it, \
        finds the artifacts and mounts the image lazily. Attaching again replaces skiff's \
        entries and keeps any others (signatures, SOCI indexes).",
        after_help = "Converted into --store if given (so later pushes share its blobs), else a \
        temporary store.\n\nExample:\n  skiff attach docker://registry.example/team/app:1.4"
    )]
    Attach {
        /// docker://HOST[:PORT]/REPO:TAG or @sha256:DIGEST of the image
        image: String,
        #[command(flatten)]
        conversion: ConvertFlags,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Measure how much a set of images duplicates: layers, files, chunks, and what storing them costs
    #[command(
        long_about = "Reads every unique layer of the images once (on all cores; memory grows \
        with the number of files and chunks, not their bytes) and reports the measures of the Docker Hub \
        redundancy study for them: layer references and unique layers, what sharing layers by \
        digest and compressing them save, the files of the unique layers and the share that \
        duplicate an earlier one (by count and bytes), the most duplicated files, pairs of almost \
        equal layers, and what layer-level, file-level and skiff's chunk-level deduplication \
        would store and a host pulling every image would transfer. docs/ANALYZE.md explains each \
        measure.",
        after_help = "Examples:\n  skiff analyze oci:./debian:12 oci:./python:3.11 oci:./node:20\n  \
        skiff analyze --json docker://registry.example/team/app:1.4 docker://registry.example/team/app:1.5"
    )]
    Analyze(analyze::AnalyzeArgs),
    /// Write a set of images anew with layers cut where they share files, as ordinary OCI images
    #[command(
        long_about = "Reads the images, groups the files of their merged trees by the set of \
        images holding each (a file is the same in two images when its path, contents, owner, mode, \
        times and xattrs are), and writes every image into an OCI layout with a layer per group it \
        holds: what several images share is one layer, stored and pulled once. Each image's top layer \
        holds its directories and the files no other image holds; an image that would have more \
        than --max-layers layers keeps the groups that save the most as layers and gets the others' \
        files in its top layer too. The layers are gzip tars any docker or \
        containerd pulls, and each image's tree is the same as before, path for path. Prints the \
        distinct layers and their bytes before and after (\"Carving Perfect Layers\", HotCloud '19; \
        docs/ANALYZE.md).",
        after_help = "Examples:\n  skiff relayer oci:./app:1.4 oci:./app:1.5 oci:./worker:1.5 --out oci:./relayered\n  \
        skiff relayer --max-layers 8 --json docker://registry.example/team/app:1.4 docker://registry.example/team/app:1.5 --out oci:./out"
    )]
    Relayer(relayer::RelayerArgs),
    /// List the images in the store, on a server, or a registry repository's skiff tags
    #[command(
        after_help = "Examples:\n  skiff images\n  skiff images --server http://127.0.0.1:7070\n  \
        skiff images docker://registry.example/skiff/debian"
    )]
    Images {
        /// docker://HOST[:PORT]/REPO: list that repository's skiff images
        repository: Option<String>,
        /// List a server's images instead of the local store's
        #[arg(long, value_name = "URL", conflicts_with = "repository")]
        server: Option<String>,
        /// Bearer token for a server that guards reads
        #[arg(long, value_name = "FILE", requires = "server")]
        token_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Serve the store over HTTP for push, pull and lazy mounts (docs/API.md)
    #[command(
        after_help = "The server owns the store for writing while it runs; stop it with \
        Ctrl-C or SIGTERM (in-flight requests finish first).\n\n\
        Example: skiff --store /srv/skiff serve --listen 0.0.0.0:7070 --token-file /etc/skiff/token"
    )]
    Serve {
        /// Address and port to listen on
        #[arg(long, default_value = "127.0.0.1:7070", value_name = "ADDR:PORT")]
        listen: String,
        /// File holding the bearer token uploads, tags and deletes need (required unless
        /// --allow-anonymous-writes)
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// File holding the bearer token reads need [default: reads are open]
        #[arg(long, value_name = "FILE")]
        read_token_file: Option<PathBuf>,
        /// Let anyone who can reach the server upload, tag and delete, with no token. Any
        /// process on the host (a container sharing its network, say) could then replace
        /// the images every host pulls
        #[arg(long, conflicts_with = "token_file")]
        allow_anonymous_writes: bool,
        /// Memory for hot chunks, in MiB (0 turns the cache off)
        #[arg(long, default_value_t = 512, value_name = "MIB")]
        cache_mb: u64,
        /// Connections served at once; more wait until one closes
        #[arg(long, default_value_t = ConnectionLimits::default().max_connections, value_name = "N")]
        max_connections: usize,
        /// Connections one client address may hold at once; more are closed
        #[arg(long, default_value_t = ConnectionLimits::default().max_connections_per_client, value_name = "N")]
        max_connections_per_client: usize,
        /// Seconds a client has to send a request's headers (and to start the next
        /// request on a kept-alive connection)
        #[arg(long, default_value_t = ConnectionLimits::default().header_timeout.as_secs(), value_name = "SECS")]
        header_timeout: u64,
        /// Seconds a connection may pass with no byte moving while the server waits on
        /// the client (a stalled upload body, an answer nobody reads)
        #[arg(long, default_value_t = ConnectionLimits::default().idle_timeout.as_secs(), value_name = "SECS")]
        idle_timeout: u64,
    },
    /// Send an image to a registry or a server: only what it lacks, resumable
    #[command(
        after_help = "To a registry, the image's chunks travel as pack blobs: blobs the \
        repository has are not sent, blobs another repository of the registry got from this \
        store are cross-mounted. Credentials come from docker's config.json (auths, credHelpers, \
        credsStore) or SKIFF_REGISTRY_AUTH=[HOST=]USER:PASSWORD.\n\n\
        Examples:\n  \
        skiff push debian:bookworm docker://registry.example/skiff/debian:bookworm\n  \
        skiff push debian:bookworm --server http://127.0.0.1:7070"
    )]
    Push {
        /// NAME[:TAG] in the local store
        image: ImageRef,
        /// docker://HOST[:PORT]/REPO:TAG to publish to [default: --server]
        destination: Option<String>,
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        json: bool,
    },
    /// Fetch an image from a registry or a server into the store: only the chunks it lacks, resumable
    #[command(after_help = "Examples:\n  \
        skiff pull docker://registry.example/skiff/debian:bookworm debian:bookworm\n  \
        skiff pull debian:bookworm --server http://127.0.0.1:7070")]
    Pull {
        /// NAME[:TAG] on the server, or docker://HOST[:PORT]/REPO:TAG
        image: ImageArg,
        /// NAME[:TAG] to store a registry's image under [default: REPO:TAG]
        target: Option<ImageRef>,
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        json: bool,
    },
    /// Show sizes, chunk counts, dedup and compression ratios
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Write an image as a single-layer OCI image layout
    #[command(after_help = "Example: skiff export debian:bookworm oci:./out:bookworm")]
    Export {
        /// NAME[:TAG] in the store
        image: ImageRef,
        /// oci:DIR[:TAG] to write (tag defaults to the image's)
        destination: String,
    },
    /// Check every index and chunk in the store
    Fsck {
        #[arg(long)]
        json: bool,
    },
    /// Remove an image's tag, locally or on a server (its data stays until `gc`)
    Rmi {
        image: ImageRef,
        /// Remove the tag on this server instead of in the local store
        #[arg(long, value_name = "URL")]
        server: Option<String>,
        /// Bearer token for the server's writes
        #[arg(long, value_name = "FILE", requires = "server")]
        token_file: Option<PathBuf>,
    },
    /// Mount an image read-only, fetching each chunk at its first read
    #[command(
        after_help = "Without --foreground, returns once the mount is ready and leaves a \
        daemon serving it; chunks land in the host's cache (--cache), shared by every mount.\n\n\
        Examples:\n  \
        skiff mount debian:bookworm /mnt/debian --server http://127.0.0.1:7070\n  \
        skiff --store /srv/skiff mount debian:bookworm /mnt/debian"
    )]
    Mount(mount::MountArgs),
    /// Unmount an image mounted by `skiff mount`
    Umount(mount::MountPointArgs),
    /// Hand running lazy mounts to this binary without unmounting them
    #[command(
        after_help = "Each mount's supervisor gives its FUSE connection to a new supervisor \
        started from this binary, whose daemon serves it from then on; open files and running \
        containers go on (their pending reads pause for a moment). Without a mount point, every \
        mount in the run directory is upgraded. Run it after installing a new skiff."
    )]
    Upgrade(mount::UpgradeArgs),
    /// Serve containerd's snapshots API on a unix socket (a remote snapshotter)
    #[command(
        after_help = "Ordinary layers get overlayfs semantics, as with containerd's own \
        overlayfs snapshotter. A skiff image pushed to a registry (`skiff push`) is not \
        downloaded: its layer becomes a lazy mount of the image through the host's chunk \
        cache, shared with `skiff run` and `skiff mount`. In containerd's config.toml:\n\n  \
        [proxy_plugins.skiff]\n    type = \"snapshot\"\n    address = \"/run/skiff/snapshotter.sock\"\n\n\
        and for CRI: snapshotter = \"skiff\", disable_snapshot_annotations = false. \
        SIGINT or SIGTERM stops it; snapshots stay on disk for the next start."
    )]
    Snapshotter {
        /// The unix socket containerd connects to
        #[arg(long, default_value = skiff_snapshotter::DEFAULT_ADDRESS, value_name = "PATH")]
        address: PathBuf,
        /// Where snapshots and their metadata live (local disk)
        #[arg(long, default_value = skiff_snapshotter::DEFAULT_ROOT, value_name = "DIR")]
        root: PathBuf,
        /// Mount daemons' records and the shared mounts (as for `skiff run`)
        #[arg(long, env = "SKIFF_RUN_DIR", default_value = skiff_agent::DEFAULT_RUN_DIR, value_name = "DIR")]
        run_dir: PathBuf,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics (calls, remote snapshots, lazy mounts) [default: off]
        #[arg(long, value_name = "ADDR:PORT")]
        metrics_address: Option<std::net::SocketAddr>,
        /// Mount ordinary images under HOST or HOST/REPO (repeatable, or comma-separated)
        /// lazily through the artifacts `skiff attach` put beside them. Whoever can attach
        /// there decides what every image with the same layers shows on this node: name
        /// only repositories your build pipeline alone pushes to [default: none]
        #[arg(
            long,
            value_name = "HOST[/REPO]",
            value_delimiter = ',',
            env = "SKIFF_ATTACHED_FROM"
        )]
        attached_from: Vec<String>,
        /// How skiff images are mounted
        #[command(flatten)]
        mount: mount::MountFlags,
    },
    /// Serve one lazy mount; its supervisor starts it with the mount's spec on stdin
    #[command(hide = true)]
    MountDaemon {
        #[arg(long, value_name = "DIR")]
        run_dir: PathBuf,
        /// The supervisor's socket: hand it the mount's connection, or take the one it holds
        #[arg(long, value_name = "SOCKET")]
        supervisor: Option<PathBuf>,
        /// Take over the connection the supervisor holds instead of mounting
        #[arg(long, requires = "supervisor")]
        takeover: bool,
    },
    /// Keep one lazy mount's connection and start its daemons; `skiff mount`
    /// and `skiff run` start it with the mount's spec on stdin
    #[command(hide = true)]
    MountSupervisor {
        #[arg(long, value_name = "DIR")]
        run_dir: PathBuf,
        /// Take this mount over from the supervisor that serves it (`skiff upgrade`)
        #[arg(long, value_name = "MOUNTPOINT")]
        upgrade: Option<PathBuf>,
    },
    /// Show what a mount has fetched, how much of the image is local, read latencies
    Status {
        #[command(flatten)]
        at: mount::MountPointArgs,
        #[arg(long)]
        json: bool,
    },
    /// Run a container from an image, fetching its chunks as they are read
    #[command(
        after_help = "The image is mounted lazily (a mount of it that exists is shared), \
        an overlay on local disk takes the container's writes, and crun (or runc) runs it \
        with the host's network. The exit code is the container's.\n\n\
        Examples:\n  \
        skiff run debian:bookworm --server http://127.0.0.1:7070 --rm -- echo hello\n  \
        skiff run python:3 --server URL --record-profile -- python3 -c pass\n  \
        skiff run debian:bookworm --rm -- bash        (a terminal when run from one)"
    )]
    Run(Box<run::RunArgs>),
    /// List containers
    Ps {
        #[command(flatten)]
        dirs: run::Dirs,
        #[arg(long)]
        json: bool,
    },
    /// Remove containers (their writes go with them)
    Rm(run::RmArgs),
    /// Delete chunks and indexes no image references, and compact packs
    Gc {
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct Remote {
    /// The chunk server's URL
    #[arg(long, env = "SKIFF_SERVER", value_name = "URL")]
    server: Option<String>,
    /// File holding the server's bearer token
    #[arg(long, env = "SKIFF_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Seconds to keep retrying a request that fails for a passing reason
    /// (server unreachable or restarting, connection reset, 502/503/504); 0: no retries
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    retry_for: u64,
}

impl Remote {
    /// The server of a command that also works on the local store.
    fn at(server: String, token_file: Option<PathBuf>) -> Remote {
        Remote {
            server: Some(server),
            token_file,
            retry_for: skiff_client::DEFAULT_RETRY_WINDOW.as_secs(),
        }
    }

    fn client(&self) -> Result<Client> {
        let Some(server) = &self.server else {
            bail!("name a server with --server URL (or $SKIFF_SERVER), or a registry as docker://HOST/REPO:TAG");
        };
        let token = self
            .token_file
            .as_deref()
            .map(skiff_agent::read_token_file)
            .transpose()?;
        Ok(Client::new(server, token)?.with_retry_window(Duration::from_secs(self.retry_for)))
    }

    fn registry(&self, reference: &RegistryRef) -> Result<Registry> {
        if let Some(server) = &self.server {
            // Likely $SKIFF_SERVER, set for other commands.
            tracing::warn!("{reference} names a registry; ignoring the server {server}");
        }
        Ok(Registry::new(reference)?.with_retry_window(Duration::from_secs(self.retry_for)))
    }
}

fn default_store() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SKIFF_STORE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("skiff"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .context("cannot find a store: set --store, SKIFF_STORE or HOME")?;
    Ok(PathBuf::from(home).join(".local/share/skiff"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // A mount daemon's stderr is its log file: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // `skiff run` passes the container's exit code on; its own failures
    // are 125, as `docker run` reports them.
    let failure = if matches!(cli.command, Command::Run(_)) {
        125
    } else {
        1
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skiff: error: {e:#}");
            let interrupted = e
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(skiff_oci::OciError::Interrupted)));
            // 128 + SIGINT, as shells report a command stopped by Ctrl-C.
            ExitCode::from(if interrupted { 130 } else { failure })
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    // These never touch a store: a service unit needs no HOME for them.
    let needs_store = !matches!(
        cli.command,
        Command::Snapshotter { .. }
            | Command::Analyze(_)
            | Command::Relayer(_)
            | Command::MountDaemon { .. }
            | Command::MountSupervisor { .. }
            | Command::Upgrade(_)
            | Command::Attach { .. }
    );
    let store_dir = match &cli.store {
        Some(dir) => dir.clone(),
        None if needs_store => default_store()?,
        None => PathBuf::new(),
    };
    match cli.command {
        Command::Convert {
            source,
            target: ImageArg::Registry(destination),
            conversion,
            json,
        } => convert_and_push(
            cli.store.as_deref(),
            &source,
            &destination,
            &conversion,
            json,
        )?,
        Command::Convert {
            source,
            target: ImageArg::Named(target),
            conversion,
            json,
        } => convert(
            &store_dir,
            &ImageSource::parse(&source)?,
            &target,
            &conversion,
            json,
        )?,
        Command::Attach {
            image,
            conversion,
            json,
        } => attach::attach(
            cli.store.as_deref(),
            &registry_arg(&image)?,
            &conversion,
            json,
        )?,
        Command::Images {
            repository: Some(repository),
            json,
            ..
        } => registry_images(&repository, json)?,
        Command::Images {
            server: Some(server),
            token_file,
            json,
            ..
        } => remote_images(&Remote::at(server, token_file).client()?, json)?,
        Command::Images { json, .. } => images(&Store::open_read_only(&store_dir)?, json)?,
        Command::Serve {
            listen,
            token_file,
            read_token_file,
            allow_anonymous_writes,
            cache_mb,
            max_connections,
            max_connections_per_client,
            header_timeout,
            idle_timeout,
        } => {
            if token_file.is_none() && !allow_anonymous_writes {
                bail!(
                    "serve: writes need a token: pass --token-file FILE (clients use the same \
                     --token-file), or --allow-anonymous-writes to let anyone who can reach \
                     {listen} upload, tag and delete"
                );
            }
            let tokens = Tokens {
                anonymous_writes: allow_anonymous_writes,
                write: token_file
                    .as_deref()
                    .map(skiff_agent::read_token_file)
                    .transpose()?,
                read: read_token_file
                    .as_deref()
                    .map(skiff_agent::read_token_file)
                    .transpose()?,
            };
            let config = ServerConfig {
                tokens,
                cache_bytes: cache_mb << 20,
                limits: ConnectionLimits {
                    max_connections,
                    max_connections_per_client,
                    header_timeout: Duration::from_secs(header_timeout.max(1)),
                    idle_timeout: Duration::from_secs(idle_timeout.max(1)),
                },
            };
            serve(&store_dir, &listen, config)?
        }
        Command::Push {
            image,
            destination: Some(destination),
            remote,
            json,
        } => {
            let reference = registry_arg(&destination)?;
            let registry = remote.registry(&reference)?;
            let store = Store::open_read_only(&store_dir)?;
            push_to_registry(&store, &image, &registry, json)?;
        }
        Command::Push {
            image,
            destination: None,
            remote,
            json,
        } => {
            let client = remote.client()?;
            let store = Store::open_read_only(&store_dir)?;
            let bar = progress::TransferBar::new("push");
            let report = skiff_client::push(&store, &image, &client, &bar)
                .with_context(|| format!("pushing {image} to {}", client.server()))?;
            bar.bar.finish_and_clear();
            print_transfer(&report, "pushed", "to", client.server(), json)?;
        }
        Command::Pull {
            image: ImageArg::Registry(reference),
            target,
            remote,
            json,
        } => {
            let registry = Arc::new(remote.registry(&reference)?);
            let target = match target {
                Some(target) => target,
                None => format!("{}:{}", reference.repository, reference.reference)
                    .parse()
                    .context("name the image in the store: skiff pull docker://… NAME:TAG")?,
            };
            let store = Store::open_or_create(&store_dir, &StoreConfig::default())
                .with_context(|| format!("opening store {}", store_dir.display()))?;
            let bar = progress::TransferBar::new("pull");
            let report = skiff_client::pull_from_registry(registry, &store, &target, &bar)
                .with_context(|| format!("pulling {reference}"))?;
            bar.bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pulled {} as {}: {} of {} chunks fetched ({}, {} from the registry in {} requests), {:.2}s",
                    report.source,
                    report.image,
                    report.chunks_fetched,
                    report.chunks,
                    progress::bytes(report.bytes_fetched),
                    progress::bytes(report.wire_bytes),
                    report.requests,
                    report.elapsed.as_secs_f64()
                );
            }
        }
        Command::Pull {
            image: ImageArg::Named(image),
            target: Some(_),
            ..
        } => bail!("a second NAME:TAG is for images from a registry; {image} keeps its name"),
        Command::Pull {
            image: ImageArg::Named(image),
            target: None,
            remote,
            json,
        } => {
            let client = remote.client()?;
            let store = Store::open_or_create(&store_dir, &StoreConfig::default())
                .with_context(|| format!("opening store {}", store_dir.display()))?;
            let bar = progress::TransferBar::new("pull");
            let report = skiff_client::pull(&client, &store, &image, &bar)
                .with_context(|| format!("pulling {image} from {}", client.server()))?;
            bar.bar.finish_and_clear();
            print_transfer(&report, "pulled", "from", client.server(), json)?;
        }
        Command::Mount(args) => mount::mount(&store_dir, args)?,
        Command::Run(args) => return run::run(&store_dir, *args),
        Command::Ps { dirs, json } => run::ps(&dirs, json)?,
        Command::Rm(args) => run::rm(args)?,
        Command::Umount(args) => mount::umount(args)?,
        Command::Upgrade(args) => return mount::upgrade(args),
        Command::MountDaemon {
            run_dir,
            supervisor,
            takeover,
        } => mount::daemon(&run_dir, supervisor, takeover)?,
        Command::MountSupervisor { run_dir, upgrade } => {
            mount::supervisor(&run_dir, upgrade.as_deref())?
        }
        Command::Snapshotter {
            address,
            root,
            run_dir,
            metrics_address,
            attached_from,
            mount,
        } => snapshotter(skiff_snapshotter::SnapshotterConfig {
            address,
            root,
            run_dir,
            settings: mount.settings(),
            metrics_address,
            attached_from,
        })?,
        Command::Status { at, json } => mount::status(at, json)?,
        Command::Analyze(args) => analyze::run(args, &|| match &cli.store {
            Some(dir) => Ok(dir.clone()),
            None => default_store(),
        })?,
        Command::Relayer(args) => relayer::run(args)?,
        Command::Stats { json } => stats(&Store::open_read_only(&store_dir)?, json)?,
        Command::Export { image, destination } => {
            export(&Store::open_read_only(&store_dir)?, &image, &destination)?
        }
        Command::Fsck { json } => return fsck(&Store::open_read_only(&store_dir)?, json),
        Command::Rmi {
            image,
            server: Some(server),
            token_file,
        } => {
            let client = Remote::at(server, token_file).client()?;
            client.delete_manifest(&image)?;
            println!(
                "removed {image} from {} (its data stays until `skiff gc` on the server's store)",
                client.server()
            );
        }
        Command::Rmi { image, .. } => {
            Store::open(&store_dir)?.remove_image(&image)?;
            println!("removed {image} (run `skiff gc` to free its data)");
        }
        Command::Gc { json } => {
            let report = Store::open(&store_dir)?.gc()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "removed {} chunks and {} indexes, rewrote {} packs: {} -> {}",
                    report.chunks_removed,
                    report.indexes_removed,
                    report.packs_rewritten,
                    progress::bytes(report.bytes_before),
                    progress::bytes(report.bytes_after)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn convert(
    store_dir: &Path,
    source: &ImageSource,
    target: &ImageRef,
    conversion: &ConvertFlags,
    json: bool,
) -> Result<()> {
    // A directory the user made stays, empty or not.
    let existed = store_dir.exists();
    let (store, created) = Store::open_or_create_new(store_dir, &StoreConfig::default())
        .with_context(|| format!("opening store {}", store_dir.display()))?;
    let report = match convert_interruptibly(&store, source, target, &conversion.options()?) {
        Ok(report) => report,
        Err(e) => {
            // A store made for this conversion leaves no trace of a failure,
            // unless something else has come to use it meanwhile.
            if created && !existed {
                if let Err(removing) = store.remove_if_unused() {
                    tracing::warn!("{removing}");
                }
            }
            return Err(e);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let secs = report.elapsed.as_secs_f64();
    println!(
        "converted {target}: {} layers ({} known from earlier conversions), {} files, {} in {} chunks; {} new chunks ({} -> {} compressed) in {secs:.2}s ({}/s of layers)",
        report.layers,
        report.cached_layers,
        report.manifest.index.files,
        progress::bytes(report.manifest.index.logical_bytes),
        report.chunks,
        report.new_chunks,
        progress::bytes(report.new_chunk_bytes),
        progress::bytes(report.new_frame_bytes),
        progress::bytes((report.layer_bytes as f64 / secs.max(1e-9)) as u64),
    );
    println!("index {}", report.manifest.index.digest);
    Ok(())
}

/// Converts with a progress bar; the first Ctrl-C or SIGTERM asks the
/// conversion to stop and undo its writes, a second one exits at once (the
/// store stays consistent anyway).
fn convert_interruptibly(
    store: &Store,
    source: &ImageSource,
    target: &ImageRef,
    options: &ConvertOptions,
) -> Result<skiff_oci::ConvertReport> {
    let cancel = options.cancel.clone();
    ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nskiff: stopping; removing what this conversion wrote (Ctrl-C again to quit at once)"
        );
    })
    .context("installing the Ctrl-C handler")?;
    let bar = progress::ConvertBar::new(format!("{target}"));
    let report = skiff_oci::convert(source, store, target, options, &bar)
        .with_context(|| format!("converting {} into {target}", source.name()))?;
    bar.finish();
    Ok(report)
}

/// A `docker://` argument.
fn registry_arg(arg: &str) -> Result<RegistryRef> {
    match RegistryRef::parse_url(arg) {
        Some(reference) => Ok(reference?),
        None => {
            bail!("{arg:?} is not a registry reference: expected docker://HOST[:PORT]/REPO:TAG")
        }
    }
}

fn push_to_registry(
    store: &Store,
    image: &ImageRef,
    registry: &Registry,
    json: bool,
) -> Result<()> {
    let bar = progress::TransferBar::new("push");
    let report = skiff_client::push_to_registry(store, image, registry, &bar)
        .with_context(|| format!("pushing {image} to {}", registry.reference()))?;
    bar.bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "pushed {image} to {} ({}): {} blobs, {} uploaded ({}), {} cross-mounted, {} present, {:.2}s",
        report.destination,
        report.digest,
        report.blobs,
        report.blobs_uploaded,
        progress::bytes(report.bytes_uploaded),
        report.blobs_mounted,
        report.blobs_present,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

/// `skiff convert SOURCE docker://DST`: into `store` if given, else a
/// temporary store that goes when the push is done.
fn convert_and_push(
    store: Option<&Path>,
    source: &str,
    destination: &RegistryRef,
    conversion: &ConvertFlags,
    json: bool,
) -> Result<()> {
    if destination.is_digest() {
        bail!("publish {destination} to a tag, not a digest");
    }
    let registry = Registry::new(destination)?;
    let target: ImageRef =
        format!("{}:{}", destination.repository, destination.reference).parse()?;
    let (store_dir, _temporary) = given_or_temporary_store(store, "skiff-convert-")?;
    // A bare SKIFF_REGISTRY_AUTH is for the registry published to, not the source's.
    let source = ImageSource::parse_with(source, BareCredentials::Ignore)?;
    convert(&store_dir, &source, &target, conversion, json)?;
    let store = Store::open_read_only(&store_dir)?;
    push_to_registry(&store, &target, &registry, json)
}

/// `store` if given, else a temporary store, which goes with the guard.
fn given_or_temporary_store(
    store: Option<&Path>,
    prefix: &str,
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match store {
        Some(dir) => Ok((dir.to_owned(), None)),
        None => {
            let temporary = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .context("making a temporary store")?;
            Ok((temporary.path().to_owned(), Some(temporary)))
        }
    }
}

/// Tags `skiff images docker://…` looks at, at most.
const MAX_LISTED_TAGS: usize = 10_000;

fn registry_images(repository: &str, json: bool) -> Result<()> {
    let mut reference = registry_arg(repository)?;
    if repository
        .rsplit('/')
        .next()
        .is_some_and(|last| last.contains(':') || last.contains('@'))
    {
        bail!("name a repository, docker://HOST/REPO, without a tag");
    }
    reference.reference = "latest".into();
    let registry = Registry::new(&reference)?;
    let mut rows = Vec::new();
    let tags = registry.tags()?;
    for tag in tags.into_iter().take(MAX_LISTED_TAGS) {
        if RegistryRef::parse(&format!(
            "{}/{}:{tag}",
            reference.host, reference.repository
        ))
        .is_err()
        {
            tracing::warn!("skipping a malformed tag {tag:?}");
            continue;
        }
        match skiff_registry::RemoteImage::manifest_at(&registry, &tag) {
            Ok((oci, _)) => {
                let layer = &oci.layers[0];
                let bytes =
                    registry.blob(&layer.digest, skiff_registry::MAX_SKIFF_MANIFEST_BYTES)?;
                let mut manifest = skiff_format::ImageManifest::from_json(&bytes)?;
                manifest.name = format!("{}/{}", reference.host, reference.repository);
                manifest.tag = tag;
                rows.push(ImageSummary::from(&manifest));
            }
            // Plain images and other artifacts share repositories with skiff's,
            // and a tag may go (or be an index) between the listing and here.
            Err(skiff_registry::RegistryError::NotSkiff { .. }) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    print_images(&rows, json)
}

fn images(store: &Store, json: bool) -> Result<()> {
    let rows: Vec<ImageSummary> = store.images()?.iter().map(ImageSummary::from).collect();
    print_images(&rows, json)
}

fn remote_images(client: &Client, json: bool) -> Result<()> {
    print_images(&client.images()?, json)
}

fn print_images(rows: &[ImageSummary], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    let width = rows
        .iter()
        .map(|r| r.name.len() + r.tag.len() + 1)
        .max()
        .unwrap_or(0)
        .max(32);
    println!(
        "{:<width$} {:<20} {:>8} {:>10}  PROFILE",
        "IMAGE", "INDEX", "FILES", "SIZE"
    );
    for row in rows {
        let profile = row.profile.as_ref().map_or("-".to_owned(), |p| {
            format!("{} files, {} read", p.files, progress::bytes(p.read_bytes))
        });
        println!(
            "{:<width$} {:<20} {:>8} {:>10}  {profile}",
            format!("{}:{}", row.name, row.tag),
            format!("blake3:{}", &row.index.to_hex()[..12]),
            row.files,
            progress::bytes(row.logical_bytes)
        );
    }
    Ok(())
}

fn serve(store_dir: &Path, listen: &str, config: ServerConfig) -> Result<()> {
    let store = Arc::new(
        Store::open_or_create(store_dir, &StoreConfig::default())
            .with_context(|| format!("opening store {}", store_dir.display()))?,
    );
    if config.tokens.anonymous_writes {
        eprintln!(
            "skiff: warning: --allow-anonymous-writes: anyone who can reach {listen} may upload, tag and delete"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let server = Server::bind(listen, store.clone(), config).await?;
        let addr = server.local_addr()?;
        eprintln!(
            "skiff: serving {} on http://{addr} (Ctrl-C to stop)",
            store_dir.display()
        );
        server.run(shutdown_signal(), Duration::from_secs(30)).await
    })?;
    runtime.shutdown_timeout(Duration::from_secs(10));
    drop(store);
    eprintln!("skiff: server stopped, store closed");
    Ok(())
}

fn snapshotter(config: skiff_snapshotter::SnapshotterConfig) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(skiff_snapshotter::serve(&config, shutdown_signal()))?;
    eprintln!("skiff: snapshotter stopped");
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    eprintln!("skiff: shutting down; letting in-flight requests finish (Ctrl-C again to stop now)");
    tokio::spawn(async {
        // Acknowledged writes are durable, so stopping at once loses none of them.
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("skiff: stopping now");
            std::process::exit(130);
        }
    });
}

fn print_transfer(
    report: &TransferReport,
    verb: &str,
    direction: &str,
    server: &str,
    json: bool,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "{verb} {} {direction} {server}: {} of {} chunks sent ({}, {} on the wire) in {} batches, {:.2}s",
        report.image,
        report.chunks_sent,
        report.chunks,
        progress::bytes(report.bytes_sent),
        progress::bytes(report.wire_bytes),
        report.batches,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}

fn stats(store: &Store, json: bool) -> Result<()> {
    let s = store.stats()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let sized = |label: &str, n: u64| println!("{label:<24}{n} ({})", progress::bytes(n));
    println!("{:<24}{}", "images:", s.images);
    sized("logical bytes:", s.logical_bytes);
    sized("unique chunk bytes:", s.chunk_bytes);
    sized("compressed chunk bytes:", s.frame_bytes);
    sized("pack bytes on disk:", s.pack_bytes);
    println!("chunks:                 {}", s.chunks);
    println!("dedup ratio:            {:.2}", s.dedup_ratio);
    println!("compression ratio:      {:.2}", s.compression_ratio);
    Ok(())
}

fn export(store: &Store, image: &ImageRef, destination: &str) -> Result<()> {
    let Some(rest) = destination.strip_prefix("oci:") else {
        bail!("unsupported destination {destination:?}: use oci:DIR[:TAG]");
    };
    let (dir, tag) = match rest.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => (dir, tag.to_owned()),
        _ => (rest, image.tag.clone()),
    };
    let manifest = store.image(image)?;
    let bar = progress::bytes_bar("export", manifest.index.logical_bytes);
    let report = skiff_oci::export(store, &manifest, Path::new(dir), &tag, &|n| bar.inc(n))
        .with_context(|| format!("exporting {image} to {destination}"))?;
    bar.finish_and_clear();
    println!(
        "exported {image} to oci:{}:{} (layer {}, {})",
        report.dir.display(),
        report.tag,
        report.layer_digest,
        progress::bytes(report.layer_bytes)
    );
    Ok(())
}

fn fsck(store: &Store, json: bool) -> Result<ExitCode> {
    // Only sizes the progress bar: fsck itself reports what stats would trip on.
    let total = store.stats().map_or(0, |s| s.frame_bytes);
    let bar = progress::bytes_bar("fsck", total);
    let report = store.fsck(&|n| bar.inc(n))?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} images, {} chunks in {} frames",
            report.images, report.chunks, report.frames
        );
        for problem in &report.problems {
            println!("problem: {problem}");
        }
        if report.problems.is_empty() {
            println!("store is consistent");
        }
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
