//! `skiff run` for real: containers started by crun (and runc) on an
//! overlay of a lazy FUSE mount served by a real `skiff serve`, their
//! output, exit codes and writes, and startup profiles that go through the
//! server and lead the fetch order.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use skiff_format::{ChunkId, ImageManifest};
use skiff_tests::proxy::TamperingProxy;
use skiff_tests::*;

const NOISE: usize = 300 * 1024;

/// busybox and its applets, users, and three layers that overwrite and
/// white out each other's files.
fn app_image() -> Image {
    let base = busybox_layer(&[
        "sh", "cat", "echo", "ls", "id", "pwd", "hostname", "test", "sleep", "rm", "mkdir", "tty",
        "unshare", "mknod", "dd", "grep", "wc", "cp", "chmod",
    ])
    // Setuid root: no host user may reach it through skiff's directories.
    .file("bin/suid-tool", 0o4755, "#!/bin/sh\nid -u\n")
    .file(
        "etc/passwd",
        0o644,
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/data:/bin/sh\n",
    )
    .file("etc/group", 0o644, "root:x:0:\napp:x:1000:\n")
    .file("etc/motd", 0o644, "layer 0 motd\n")
    .file("data/gone", 0o644, "whited out by layer 1\n");
    let middle = Layer::new()
        .dir("app", 0o755)
        .file("etc/motd", 0o644, "layer 1 motd\n")
        .whiteout("data", "gone")
        .file(
            "app/greet.sh",
            0o755,
            "#!/bin/sh\necho \"greetings from $GREETING in $(pwd) as $(id -u)\"\nexit ${1:-0}\n",
        );
    let top = Layer::new().file("data/aa", 0o644, noise(NOISE, 1)).file(
        "data/zz",
        0o644,
        noise(NOISE, 2),
    );
    let mut image = Image::new(vec![
        (base, Compression::Gzip),
        (middle, Compression::Zstd),
        (top, Compression::Gzip),
    ]);
    image.config = json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {
            "Entrypoint": ["/app/greet.sh"],
            "Cmd": ["7"],
            "Env": ["PATH=/bin", "GREETING=layers"],
            "WorkingDir": "/data",
            "User": "app",
        },
    });
    image
}

struct Setup {
    tmp: tempfile::TempDir,
    store: PathBuf,
    server: SkiffServer,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempdir();
        let store = tmp.path().join("store");
        let layout = tmp.path().join("layout");
        app_image().write_layout(&layout, "latest");
        skiff_ok(
            &store,
            &["convert", &format!("oci:{}", layout.display()), "app:1"],
        );
        let server = SkiffServer::start(&store, &[]);
        Setup { tmp, store, server }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `skiff …` with this test's containers, run and cache directories.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(skiff_bin());
        command
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env("SKIFF_CONTAINERS", self.path("containers"))
            .env("SKIFF_RUN_DIR", self.path("run"))
            .env("SKIFF_CACHE", self.path("cache"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        command
    }

    /// `skiff run app:1 --server URL --name NAME -u 0 -- sh -c SCRIPT`,
    /// in the background (stderr piped).
    fn spawn_as_root(&self, name: &str, script: &str) -> std::process::Child {
        self.command(&[
            "run",
            "app:1",
            "--server",
            &self.server.url,
            "--name",
            name,
            "-u",
            "0",
            "--entrypoint",
            "",
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    }

    /// `skiff run app:1 --server URL ARGS…`.
    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["run", "app:1", "--server", &self.server.url];
        all.extend_from_slice(args);
        self.command(&all).output().unwrap()
    }

    fn containers(&self) -> Vec<String> {
        fs::read_dir(self.path("containers"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".lock")
                    .collect()
            })
            .unwrap_or_default()
    }

    fn ps(&self) -> Value {
        let out = self.command(&["ps", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// skiff's FUSE mounts under this test's directory.
    fn skiff_mounts(&self) -> Vec<String> {
        let root = self.tmp.path().to_str().unwrap().to_owned();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|p| p.starts_with(&root))
            .collect()
    }
}

fn text(out: &Output) -> (String, String, Option<i32>) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code(),
    )
}

#[test]
fn a_container_runs_from_a_lazily_mounted_multi_layer_image() {
    let setup = Setup::new();

    // The image's own entrypoint, cmd, env, working dir and user.
    let (stdout, stderr, code) = text(&setup.run(&["--rm"]));
    assert_eq!(
        stdout, "greetings from layers in /data as 1000\n",
        "{stderr}"
    );
    assert_eq!(code, Some(7), "{stderr}");

    // Each of them overridden.
    let (stdout, stderr, code) = text(&setup.run(&[
        "--rm",
        "-e",
        "GREETING=override",
        "-w",
        "/",
        "-u",
        "0",
        "--",
        "3",
    ]));
    assert_eq!(stdout, "greetings from override in / as 0\n", "{stderr}");
    assert_eq!(code, Some(3));

    // The merged layers: layer 1's motd, layer 0's file whited out, the host name.
    let (stdout, stderr, code) = text(&setup.run(&[
        "--rm",
        "--name",
        "box1",
        "--entrypoint",
        "",
        "--",
        "sh",
        "-c",
        "cat /etc/motd; test -e /data/gone || echo gone-is-gone; hostname",
    ]));
    assert_eq!(stdout, "layer 1 motd\ngone-is-gone\nbox1\n", "{stderr}");
    assert_eq!(code, Some(0));

    // Standard input passes through; so does it with runc.
    for runtime in ["crun", "runc"] {
        let mut child = setup
            .command(&[
                "run",
                "app:1",
                "--server",
                &setup.server.url,
                "--rm",
                "--runtime",
                runtime,
                "--entrypoint",
                "",
                "--",
                "cat",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"piped through\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr, code) = text(&out);
        assert_eq!(
            (stdout.as_str(), code),
            ("piped through\n", Some(0)),
            "{runtime}: {stderr}"
        );
    }

    // With a terminal (script(1) gives it one), the shell gets a tty.
    let command = format!(
        "{} --store {} run app:1 --server {} --rm --entrypoint '' -- sh -c 'tty; exit 5'",
        skiff_bin().display(),
        setup.store.display(),
        setup.server.url
    );
    let out = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("SKIFF_CONTAINERS", setup.path("containers"))
        .env("SKIFF_RUN_DIR", setup.path("run"))
        .env("SKIFF_CACHE", setup.path("cache"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr, code) = text(&out);
    assert!(stdout.contains("/dev/pts/"), "no tty: {stdout} {stderr}");
    assert_eq!(code, Some(5));

    // --rm leaves no container and no mount behind.
    assert!(setup.containers().is_empty(), "{:?}", setup.containers());
    assert_eq!(setup.ps(), json!([]));
    assert!(
        setup.skiff_mounts().is_empty(),
        "{:?}",
        setup.skiff_mounts()
    );

    // An image already mounted as a root file system (--suid-dev) is
    // shared, and stays mounted afterwards; the start read a few files, not
    // the image.
    let mount = SkiffMount::start(
        &setup.store,
        "app:1",
        &setup.path("shared"),
        &setup.path("run"),
        &[
            "--suid-dev",
            "--server",
            &setup.server.url,
            "--no-prefetch",
            "--cache",
            setup.path("cache-shared").to_str().unwrap(),
        ],
    );
    let before = mount.stat("fetched_bytes");
    let (stdout, _, code) = text(&setup.run(&["--rm", "--", "0"]));
    assert_eq!(
        (stdout.as_str(), code),
        ("greetings from layers in /data as 1000\n", Some(0))
    );
    assert!(is_mount_point(&setup.path("shared")));
    let fetched = mount.stat("fetched_bytes") - before;
    // busybox and the small files, none of the data files' bytes.
    let busybox = fs::metadata("/bin/busybox").unwrap().len();
    assert!(
        fetched > busybox / 2 && fetched < busybox + NOISE as u64 / 2,
        "the start fetched {fetched} bytes through the shared mount"
    );
    drop(mount);

    // What skiff run refuses: exit 125, a clear reason, nothing left behind.
    let cases: [(&[&str], &str); 4] = [
        (&["--name", "../up"], "invalid container ID"),
        (
            &["-w", "relative", "--", "sh"],
            "working directory must be absolute",
        ),
        (&["-u", "nobody-here"], "no such user"),
        (&["--", "/no/such/binary"], ""),
    ];
    for (args, reason) in cases {
        let mut all = vec!["--rm"];
        all.extend_from_slice(args);
        let (_, stderr, code) = text(&setup.run(&all));
        assert_ne!(code, Some(0), "{args:?} succeeded");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }
    let out = setup
        .command(&["run", "nope:1", "--server", &setup.server.url, "--rm"])
        .output()
        .unwrap();
    let (_, stderr, code) = text(&out);
    assert_eq!(code, Some(125));
    assert!(stderr.contains("nope:1"), "{stderr}");
    assert!(setup.containers().is_empty(), "{:?}", setup.containers());
    assert!(
        setup.skiff_mounts().is_empty(),
        "{:?}",
        setup.skiff_mounts()
    );
}

/// Name → BLAKE3 of the contents of every file under `dir`, but the
/// cache's count of bytes held (`usage`), which every write changes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in fs::read_dir(&at).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else if entry.file_type().unwrap().is_file() && path != dir.join("usage") {
                let digest = ChunkId::of(&fs::read(&path).unwrap()).to_string();
                files.insert(path, digest);
            }
        }
    }
    files
}

#[test]
fn writes_in_one_container_never_reach_another_or_the_image() {
    let setup = Setup::new();
    let reader = "cat /etc/motd; ls /data; test -e /new && echo new-is-here; true";
    // Fill the cache first, so the writer's run can be checked against it.
    let (first, stderr, _) =
        text(&setup.run(&["--rm", "--entrypoint", "", "--", "sh", "-c", reader]));
    assert_eq!(first, "layer 1 motd\naa\nzz\n", "{stderr}");
    let cache = snapshot(&setup.path("cache"));

    // The writer keeps running while a second container reads.
    let mut writer = setup.spawn_as_root(
        "writer",
        "echo changed > /etc/motd && rm /data/aa && mkdir /new && echo hi > /new/f && sleep 3",
    );
    let upper = setup.path("containers/writer/upper");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !upper.join("new/f").exists() {
        assert!(Instant::now() < deadline, "the writer never wrote");
        if writer.try_wait().unwrap().is_some() {
            let out = writer.wait_with_output().unwrap();
            panic!("the writer ended: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(setup.ps()[0]["status"], "running");
    let (second, stderr, code) =
        text(&setup.run(&["--rm", "--entrypoint", "", "--", "sh", "-c", reader]));
    assert_eq!(
        (second.as_str(), code),
        (first.as_str(), Some(0)),
        "{stderr}"
    );

    let out = writer.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The writes are in the writer's upper directory, and only there.
    assert_eq!(
        fs::read_to_string(upper.join("etc/motd")).unwrap(),
        "changed\n"
    );
    assert_eq!(fs::read_to_string(upper.join("new/f")).unwrap(), "hi\n");
    let (third, _, _) = text(&setup.run(&["--rm", "--entrypoint", "", "--", "sh", "-c", reader]));
    assert_eq!(third, first);
    // Not one cached chunk changed, and the store is intact.
    let after = snapshot(&setup.path("cache"));
    for (path, digest) in &cache {
        if let Some(now) = after.get(path) {
            assert_eq!(now, digest, "{} changed", path.display());
        }
    }
    assert!(skiff_ok(&setup.store, &["fsck"]).contains("store is consistent"));

    // The stopped writer is listed until it is removed.
    let ps = setup.ps();
    assert_eq!(ps.as_array().unwrap().len(), 1, "{ps}");
    assert_eq!(
        (ps[0]["id"].as_str(), ps[0]["exit_code"].as_i64()),
        (Some("writer"), Some(0))
    );
    let out = setup.run(&["--name", "writer", "--", "/app/greet.sh"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = setup.command(&["rm", "writer"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(setup.containers().is_empty());

    // Two running containers on one mount of the image: the first made it.
    let start = |name: &str| {
        let child = setup
            .command(&[
                "run",
                "app:1",
                "--server",
                &setup.server.url,
                "--name",
                name,
                "--entrypoint",
                "",
                "--",
                "sleep",
                "60",
            ])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let rootfs = format!("{name}/rootfs");
        while !setup.skiff_mounts().iter().any(|m| m.ends_with(&rootfs)) {
            assert!(Instant::now() < deadline, "{name} never started");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    };
    let image_mounts = || {
        let images = setup.path("run/images");
        setup
            .skiff_mounts()
            .into_iter()
            .filter(|m| Path::new(m).starts_with(&images))
            .count()
    };
    let mut first = start("first");
    let mut second = start("second");
    assert_eq!(image_mounts(), 1, "{:?}", setup.skiff_mounts());

    // A running container is removed only with --force, which kills it.
    let out = setup.command(&["rm", "first"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running"));
    let started = Instant::now();
    let out = setup.command(&["rm", "--force", "first"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_ne!(first.wait().unwrap().code(), Some(0));
    // The image's mount outlives the container that made it while another runs on it,
    assert_eq!(image_mounts(), 1, "{:?}", setup.skiff_mounts());
    let (stdout, _, code) = text(&setup.run(&["--rm", "--", "0"]));
    assert_eq!(
        (stdout.as_str(), code),
        ("greetings from layers in /data as 1000\n", Some(0))
    );
    // ... and goes with the last one.
    let out = setup
        .command(&["rm", "--force", "second"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(second.wait().unwrap().code(), Some(0));
    assert!(setup.containers().is_empty());
    assert!(
        setup.skiff_mounts().is_empty(),
        "{:?}",
        setup.skiff_mounts()
    );
}

/// The manifest of `image` as the server has it.
fn server_manifest(server: &SkiffServer, image: &str) -> ImageManifest {
    let body = reqwest::blocking::get(format!("{}/v1/manifests/{image}", server.url))
        .unwrap()
        .bytes()
        .unwrap();
    ImageManifest::from_json(&body).unwrap()
}

/// Where each of `ids` first appears in the fetch requests, in order.
fn positions(fetches: &[Vec<ChunkId>], ids: &[ChunkId]) -> Vec<usize> {
    let all: Vec<&ChunkId> = fetches.iter().flatten().collect();
    ids.iter()
        .map(|id| {
            all.iter()
                .position(|f| *f == id)
                .expect("chunk never fetched")
        })
        .collect()
}

#[test]
fn a_recorded_profile_round_trips_through_the_server_and_leads_the_fetch() {
    let mut setup = Setup::new();
    let index = setup.server.index("app:1");
    let aa: Vec<ChunkId> = file_chunks(&index, "data/aa")
        .iter()
        .map(|c| c.id)
        .collect();
    let zz: Vec<ChunkId> = file_chunks(&index, "data/zz")
        .iter()
        .map(|c| c.id)
        .collect();
    assert!(
        aa.len() > 1 && zz.len() > 1,
        "the noise files span several chunks"
    );

    // The start reads zz, then aa: the reverse of path order.
    let out = setup.run(&[
        "--rm",
        "--record-profile",
        "--entrypoint",
        "",
        "--",
        "sh",
        "-c",
        "cat /data/zz > /dev/null && cat /data/aa > /dev/null && echo read",
    ]);
    let (stdout, stderr, code) = text(&out);
    assert_eq!((stdout.as_str(), code), ("read\n", Some(0)), "{stderr}");
    assert!(stderr.contains("recorded a startup profile"), "{stderr}");

    // Stored on the server, in the image's manifest, in first-access order.
    let manifest = server_manifest(&setup.server, "app:1");
    let profile = manifest
        .profile
        .clone()
        .expect("the server has the profile");
    let paths: Vec<&str> = profile.ranges.iter().map(|r| r.path.as_str()).collect();
    let first_of = |p: &str| paths.iter().position(|x| *x == p).unwrap();
    assert!(first_of("bin/busybox") < first_of("data/zz"), "{paths:?}");
    assert!(first_of("data/zz") < first_of("data/aa"), "{paths:?}");
    assert!(
        profile.read_bytes >= 2 * NOISE as u64,
        "{}",
        profile.read_bytes
    );
    let order = profile.chunk_order(&index).unwrap();
    for id in aa.iter().chain(&zz) {
        assert!(
            order.contains(id),
            "the profile misses a chunk of the data files"
        );
    }
    let listed = skiff_json(
        &setup.store,
        &["images", "--server", &setup.server.url, "--json"],
    );
    assert!(
        listed[0]["profile"]["files"].as_u64().unwrap() >= 3,
        "{listed}"
    );

    // A mount with an empty cache, through a proxy that logs the fetch
    // requests, until its prefetch is done.
    let mount_logged = |dir: &str, extra: &[&str]| {
        let proxy = TamperingProxy::start(&setup.server.url, &[]);
        let cache = setup.path(&format!("cache-{dir}"));
        let mut args = vec!["--server", &proxy.url, "--cache", cache.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mount = SkiffMount::start(
            &setup.store,
            "app:1",
            &setup.path(dir),
            &setup.path("run"),
            &args,
        );
        wait_for_prefetch(&mount);
        let fetches = proxy.fetches.lock().unwrap().clone();
        (mount, fetches)
    };

    // It asks for the profile's chunks first, all in one request, in its
    // order: zz before aa.
    let (mount, fetches) = mount_logged("profiled", &[]);
    assert_eq!(
        fetches[0], order,
        "the first request is the profile, in order"
    );
    let (aa_at, zz_at) = (positions(&fetches, &aa), positions(&fetches, &zz));
    assert!(
        zz_at.iter().max() < aa_at.iter().min(),
        "zz {zz_at:?}, aa {aa_at:?}"
    );
    assert_eq!(
        mount.status()["stats"]["profile_chunks"].as_u64(),
        Some(order.len() as u64)
    );
    drop(mount);

    // Without the profile, prefetch goes in path order: aa before zz.
    let (mount, fetches) = mount_logged("plain", &["--no-profile"]);
    let (aa_at, zz_at) = (positions(&fetches, &aa), positions(&fetches, &zz));
    assert!(
        aa_at.iter().max() < zz_at.iter().min(),
        "aa {aa_at:?}, zz {zz_at:?}"
    );
    drop(mount);

    // The server refuses a profile that names what the image lacks.
    let mut bad = manifest.clone();
    bad.profile.as_mut().unwrap().ranges[0].path = "no/such/file".into();
    let answer = reqwest::blocking::Client::new()
        .put(format!("{}/v1/manifests/app:1", setup.server.url))
        .body(bad.to_json())
        .send()
        .unwrap();
    assert_eq!(answer.status().as_u16(), 422);
    assert_eq!(
        server_manifest(&setup.server, "app:1").profile,
        Some(profile)
    );

    // A profile recorded from the local store is stored there.
    setup.server.kill();
    let out = setup
        .command(&[
            "run",
            "app:1",
            "--rm",
            "--record-profile",
            "--entrypoint",
            "",
            "--",
            "cat",
            "/etc/motd",
        ])
        .output()
        .unwrap();
    let (stdout, stderr, code) = text(&out);
    assert_eq!(
        (stdout.as_str(), code),
        ("layer 1 motd\n", Some(0)),
        "{stderr}"
    );
    let local = skiff_json(&setup.store, &["images", "--json"]);
    assert!(
        local[0]["profile"]["files"].as_u64().unwrap() >= 2,
        "{local}"
    );
}

fn wait_for_prefetch(mount: &SkiffMount) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mount.status()["stats"]["prefetch_done"] != true {
        assert!(
            Instant::now() < deadline,
            "prefetch did not finish: {}",
            mount.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_container_runs_from_a_registry_and_its_profile_is_stored_there() {
    let setup = Setup::new();
    let registry = Registry::start_with_basic_auth("runner", "pw");
    let host = format!("127.0.0.1:{}", registry.port);
    let config = docker_config(&setup.path("docker"), &host, "runner", "pw");
    let image = format!("docker://{host}/apps/app:1");
    let skiff = |args: &[&str]| {
        setup
            .command(args)
            .env("DOCKER_CONFIG", &config)
            .output()
            .unwrap()
    };
    let out = skiff(&["push", "app:1", &image]);
    assert!(out.status.success(), "{}", text(&out).1);
    let layers = || {
        let manifest = skiff_artifact_manifest(
            &format!("http://{host}"),
            "apps/app",
            "1",
            Some(("runner", "pw")),
        );
        manifest["layers"].as_array().unwrap().len()
    };
    let before = layers();

    // Straight from the registry, with the image's own entrypoint and user.
    let (stdout, stderr, code) = text(&skiff(&["run", "--rm", &image]));
    assert_eq!(
        stdout, "greetings from layers in /data as 1000\n",
        "{stderr}"
    );
    assert_eq!(code, Some(7), "{stderr}");

    // A profile recorded on it goes to the registry, under the same tag.
    let (stdout, stderr, code) = text(&skiff(&[
        "run",
        "--rm",
        "--record-profile",
        &image,
        "--entrypoint",
        "",
        "--",
        "sh",
        "-c",
        "cat /data/zz > /dev/null && echo read",
    ]));
    assert_eq!((stdout.as_str(), code), ("read\n", Some(0)), "{stderr}");
    assert!(stderr.contains("recorded a startup profile"), "{stderr}");
    let out = skiff(&["images", &format!("docker://{host}/apps/app"), "--json"]);
    assert!(out.status.success(), "{}", text(&out).1);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["tag"], "1", "{listed}");
    assert!(
        listed[0]["profile"]["files"].as_u64().unwrap() >= 2,
        "{listed}"
    );
    // Its chunks were laid out anew in one more pack blob, in the order the start read them.
    assert_eq!(layers(), before + 1);

    // The next container starts with the profile fetched first.
    let (stdout, stderr, code) = text(&skiff(&["run", "--rm", &image, "--", "0"]));
    assert_eq!(
        stdout, "greetings from layers in /data as 1000\n",
        "{stderr}"
    );
    assert_eq!(code, Some(0));
    assert!(
        setup.skiff_mounts().is_empty(),
        "{:?}",
        setup.skiff_mounts()
    );
}

/// A block device of this host, as `major:minor` (whatever the machine's disks are).
fn a_host_block_device() -> String {
    fs::read_dir("/sys/dev/block")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .min()
        .expect("the host has a block device")
}

#[test]
fn containers_are_confined_as_docker_confines_them() {
    let setup = Setup::new();
    let device = a_host_block_device();
    let (major, minor) = device.split_once(':').unwrap();
    // /dev is a tmpfs without nodev, as docker's: only the device cgroup
    // stands between a node made there and the host's disk.
    let probe = format!(
        "unshare -U true && echo unshare-worked; \
         test -c /proc/keys && echo keys-masked; \
         test -e /proc/kcore && ! test -c /proc/kcore && echo kcore-shown; \
         ls /sys/firmware | grep -c .; \
         mknod /dev/disk b {major} {minor} && echo mknod-worked; \
         dd if=/dev/disk of=/dev/null bs=512 count=1 && echo disk-opened; \
         grep NoNewPrivs /proc/self/status; \
         grep -c : /proc/net/dev; true"
    );
    let run = |extra: &[&str]| {
        let mut args = vec!["--rm", "-u", "0", "--entrypoint", ""];
        args.extend_from_slice(extra);
        args.extend(["--", "sh", "-c", &probe]);
        text(&setup.run(&args))
    };

    // The defaults: docker's seccomp profile, masked paths and device rules, the host's network.
    // The host shows what the container must not see.
    assert!(fs::read_dir("/sys/firmware").is_ok_and(|mut d| d.next().is_some()));
    assert!(Path::new("/proc/keys").is_file());
    let (stdout, stderr, code) = run(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    let host_interfaces = fs::read_to_string("/proc/net/dev")
        .unwrap()
        .matches(':')
        .count();
    assert_eq!(
        stdout,
        format!("keys-masked\n0\nmknod-worked\nNoNewPrivs:\t0\n{host_interfaces}\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("unshare: unshare(0x10000000): Operation not permitted"),
        "{stderr}"
    );
    // EPERM from the device cgroup (a nodev mount would say EACCES, a missing device ENXIO).
    assert!(
        stderr.contains("can't open '/dev/disk': Operation not permitted"),
        "{stderr}"
    );

    // Without the seccomp filter the same call works: the filter was what refused it.
    let (stdout, stderr, _) = run(&[
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "none",
    ]);
    assert_eq!(
        stdout, "unshare-worked\nkeys-masked\n0\nmknod-worked\nNoNewPrivs:\t1\n1\n",
        "{stderr}"
    );

    // A bad option is refused before anything is mounted or created.
    let out = setup.run(&["--rm", "--security-opt", "apparmor=x", "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--security-opt"));
    assert!(setup.containers().is_empty());
    assert!(setup.skiff_mounts().is_empty());
}

#[test]
fn no_host_user_reaches_setuid_files_through_skiffs_directories() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new();
    // The test's own directory lets everyone through, as /var/lib does: only
    // the modes skiff gives its directories keep other users out.
    fs::set_permissions(setup.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mut container = setup.spawn_as_root(
        "holder",
        "cp /bin/busybox /tmp/root-shell && chmod 4755 /tmp/root-shell && sleep 30",
    );
    let container_dir = setup.path("containers/holder");
    let written = container_dir.join("upper/tmp/root-shell");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::metadata(&written).is_ok_and(|m| m.permissions().mode() & 0o4000 != 0) {
        assert!(
            Instant::now() < deadline,
            "the container never wrote its setuid file"
        );
        assert!(
            container.try_wait().unwrap().is_none(),
            "the container ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let lazy_mount = setup
        .skiff_mounts()
        .into_iter()
        .find(|m| m.starts_with(setup.path("run").to_str().unwrap()))
        .expect("the image's lazy mount is under the run dir");
    let targets = [
        PathBuf::from(&lazy_mount).join("bin/suid-tool"),
        container_dir.join("rootfs/bin/suid-tool"),
        container_dir.join("rootfs/tmp/root-shell"),
        written,
    ];
    for target in &targets {
        // Root sees it, setuid and all.
        let mode = fs::metadata(target).unwrap().permissions().mode();
        assert_ne!(mode & 0o4000, 0, "{}", target.display());
        // Through sh: setpriv's own exec of an unreachable path is not a fair test
        // (util-linux 2.38 runs it anyway).
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args(["sh", "-c", "\"$1\"", "sh"])
            .arg(target)
            .output()
            .expect("setpriv (util-linux) is installed");
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "nobody ran {}: {out:?}",
            target.display()
        );
    }
    for dir in ["run/images", "run/mounts", "containers", "cache"] {
        let mode = fs::metadata(setup.path(dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{dir} is {mode:o}");
    }
    let _ = Command::new(skiff_bin())
        .args(["rm", "--force", "holder"])
        .env("SKIFF_CONTAINERS", setup.path("containers"))
        .env("SKIFF_RUN_DIR", setup.path("run"))
        .stdout(Stdio::null())
        .status();
    let _ = container.wait();
}
