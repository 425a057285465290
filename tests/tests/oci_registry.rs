//! A registry as skiff's distribution engine, for real: Debian's
//! docker-registry with authentication on, behind a proxy that counts what
//! crosses it and can redirect blob GETs, ignore Range, cut blobs short or
//! tamper with them. Images are pushed, pulled, mounted lazily and run
//! straight from `docker://` references.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use serde_json::Value;
use skiff_format::ChunkId;
use skiff_tests::registry_proxy::RegistryProxy;
use skiff_tests::*;

const USER: &str = "skiff";
const PASSWORD: &str = "s3cret-pass";

/// The layer [`first_image`] and [`second_image`] are built on.
fn base_layer() -> Layer {
    Layer::new()
        .dir("etc", 0o755)
        .file("usr/lib/shared.bin", 0o644, noise(9_000_000, 11))
        .file("usr/share/common.txt", 0o644, text(1_000_000, 15))
        .symlink("usr/lib/link", "shared.bin")
}

/// The base layer, then files of its own and one small file to read alone.
fn first_image() -> Image {
    Image::new(vec![
        (base_layer(), Compression::Gzip),
        (
            Layer::new()
                .file("etc/hostname", 0o644, "first\n")
                .file("usr/share/doc/big.txt", 0o644, text(2_000_000, 12))
                .file("usr/bin/tool", 0o755, noise(1_500_000, 13)),
            // umoci reads gzip layers only.
            Compression::Gzip,
        ),
    ])
}

/// The same base layer, then files of its own.
fn second_image() -> Image {
    Image::new(vec![
        (base_layer(), Compression::Gzip),
        (
            Layer::new().file("etc/hostname", 0o644, "second\n").file(
                "usr/bin/other",
                0o755,
                noise(1_000_000, 14),
            ),
            Compression::Gzip,
        ),
    ])
}

/// A registry with basic auth, a counting proxy in front, and a docker
/// config holding the credentials for the proxy's address.
struct Setup {
    tmp: tempfile::TempDir,
    _registry: Registry,
    proxy: RegistryProxy,
    docker_config: PathBuf,
    store: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempdir();
        let registry = Registry::start_with_basic_auth(USER, PASSWORD);
        let proxy = RegistryProxy::start(&format!("http://127.0.0.1:{}", registry.port));
        let docker_config = docker_config(
            &tmp.path().join("docker"),
            &format!("127.0.0.1:{}", proxy.port),
            USER,
            PASSWORD,
        );
        let store = tmp.path().join("store");
        Setup {
            tmp,
            _registry: registry,
            proxy,
            docker_config,
            store,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `docker://PROXY/REPO`.
    fn reference(&self, repo_tag: &str) -> String {
        format!("docker://127.0.0.1:{}/{repo_tag}", self.proxy.port)
    }

    /// skiff with this setup's store and docker config.
    fn skiff(&self, args: &[&str]) -> Output {
        Command::new(skiff_bin())
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env_remove("SKIFF_REGISTRY_AUTH")
            .output()
            .unwrap()
    }

    fn skiff_ok(&self, args: &[&str]) -> String {
        let out = self.skiff(args);
        assert!(
            out.status.success(),
            "skiff {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn skiff_json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.skiff_ok(&args)).unwrap()
    }

    /// Converts `image` (written as a layout under `name`) into the store as `name:v1`.
    fn convert(&self, image: &Image, name: &str) -> PathBuf {
        let layout = self.path(&format!("layout-{name}"));
        image.write_layout(&layout, "v1");
        self.skiff_ok(&[
            "convert",
            &format!("oci:{}:v1", layout.display()),
            &format!("{name}:v1"),
        ]);
        layout
    }

    /// `skiff mount` of a registry image, with this setup's docker config.
    fn mount(&self, reference: &str, name: &str, extra: &[&str]) -> SkiffMount {
        let mountpoint = self.path(&format!("mnt-{name}"));
        let cache = self.path(&format!("cache-{name}"));
        let mut args = vec!["--cache", cache.to_str().unwrap(), "--retry-for", "5"];
        args.extend_from_slice(extra);
        std::env::set_var("DOCKER_CONFIG", &self.docker_config);
        SkiffMount::start(
            &self.store,
            reference,
            &mountpoint,
            &self.path("run"),
            &args,
        )
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn reading_one_small_file_fetches_under_one_percent_of_the_image() {
    let setup = Setup::new();
    // 320 MB of text-like files and one tiny file: a frame (~1 MiB before
    // compression) is about 0.4% of the image, as in a 250 MB image of real files.
    let mut layer = Layer::new().file("etc/hostname", 0o644, "big\n");
    for i in 0..80 {
        layer = layer.file(
            &format!("usr/share/data/{i:02}.txt"),
            0o644,
            text(4_000_000, 100 + i),
        );
    }
    setup.convert(&Image::new(vec![(layer, Compression::Gzip)]), "big");
    let dest = setup.reference("team/big:v1");
    setup.skiff_ok(&["push", "big:v1", &dest]);
    let image_bytes = setup.skiff_json(&["stats"])["frame_bytes"]
        .as_u64()
        .unwrap();
    let mount = setup.mount(&dest, "big", &["--no-prefetch"]);
    let before = mount.status()["traffic"]["bytes"].as_u64().unwrap();
    assert_eq!(fs::read(mount.path("etc/hostname")).unwrap(), b"big\n");
    let fetched = mount.status()["traffic"]["bytes"].as_u64().unwrap() - before;
    assert!(fetched > 0, "nothing was fetched");
    assert!(
        fetched * 100 < image_bytes,
        "reading a 4-byte file fetched {fetched} of the image's {image_bytes} bytes"
    );
    assert_eq!(mount.stat("fetch_requests"), 1);
}

#[test]
fn push_mount_and_pull_through_an_authenticated_registry() {
    let setup = Setup::new();
    let layout = setup.convert(&first_image(), "first");
    let dest = setup.reference("team/first:v1");

    // Without credentials the registry refuses, and says how to log in.
    let out = Command::new(skiff_bin())
        .arg("--store")
        .arg(&setup.store)
        .args(["push", "first:v1", &dest])
        .env("DOCKER_CONFIG", setup.path("no-such-config"))
        .env_remove("SKIFF_REGISTRY_AUTH")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("401") && stderr(&out).contains("docker login"),
        "{}",
        stderr(&out)
    );

    let report = setup.skiff_json(&["push", "first:v1", &dest]);
    assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
    let uploads = setup.proxy.stats.uploads.load(SeqCst);
    assert_eq!(uploads, report["blobs_uploaded"].as_u64().unwrap());
    assert_eq!(report["blobs"], report["blobs_uploaded"], "{report}");

    // Pushing again sends nothing: every blob is there.
    let again = setup.skiff_json(&["push", "first:v1", &dest]);
    assert_eq!(again["blobs_uploaded"], 0, "{again}");
    assert_eq!(setup.proxy.stats.uploads.load(SeqCst), uploads);

    // The repository lists it as a skiff image.
    let listed = setup.skiff_json(&["images", &setup.reference("team/first")]);
    assert_eq!(listed[0]["tag"], "v1", "{listed}");

    // Mounted lazily, the tree is the layout's, byte for byte.
    let mount = setup.mount(&dest, "first", &["--no-prefetch"]);
    let unpacked = umoci_unpack(&layout, "v1", &setup.path("unpacked"));
    let diffs = diff_trees(&unpacked, &mount.mountpoint, false);
    assert!(diffs.is_empty(), "{diffs:#?}");
    let status = mount.status();
    assert!(
        status["traffic"]["ranges"].as_u64().unwrap() > 0,
        "{status}"
    );
    assert!(setup.proxy.stats.range_gets.load(SeqCst) > 0);
    mount.umount();

    // Pulled into another store, the image is whole and checks out.
    let other = setup.path("pulled");
    let out = Command::new(skiff_bin())
        .arg("--store")
        .arg(&other)
        .args(["pull", &dest, "copy:v1", "--json"])
        .env("DOCKER_CONFIG", &setup.docker_config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let images = skiff_json(&other, &["images", "--json"]);
    let ours = setup.skiff_json(&["images"]);
    assert_eq!(images[0]["name"], "copy");
    assert_eq!(images[0]["index"], ours[0]["index"]);
    assert!(skiff_ok(&other, &["fsck"]).contains("store is consistent"));
}

#[test]
fn a_second_image_uploads_only_new_blobs_and_cross_mounts_shared_ones() {
    let setup = Setup::new();
    // Two images on one 24 MB base layer, each with a file of its own.
    let image = |name: &str, seed: u64| {
        Image::new(vec![
            (
                Layer::new().dir("etc", 0o755).file(
                    "usr/lib/base.bin",
                    0o644,
                    noise(24_000_000, 31),
                ),
                Compression::Gzip,
            ),
            (
                Layer::new()
                    .file("etc/hostname", 0o644, format!("{name}\n"))
                    .file("usr/bin/own", 0o755, noise(1_000_000, seed)),
                Compression::Gzip,
            ),
        ])
    };
    // (Odd seeds: noise() makes an even seed odd.)
    setup.convert(&image("first", 33), "first");
    // The second is converted into a store of its own: blobs follow from
    // the content alone, not from the store that holds it.
    let store2 = setup.path("store2");
    let layout = setup.path("layout-second");
    image("second", 35).write_layout(&layout, "v1");
    skiff_ok(
        &store2,
        &[
            "convert",
            &format!("oci:{}:v1", layout.display()),
            "second:v1",
        ],
    );
    let push2 = |dest: &str| -> Value {
        let out = Command::new(skiff_bin())
            .arg("--store")
            .arg(&store2)
            .args(["push", "second:v1", dest, "--json"])
            .env("DOCKER_CONFIG", &setup.docker_config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = setup.skiff_json(&["push", "first:v1", &setup.reference("team/first:v1")]);

    // Into the same repository: the blobs of the shared base are there already.
    let uploads = setup.proxy.stats.uploads.load(SeqCst);
    let second = push2(&setup.reference("team/first:second"));
    let sent = setup.proxy.stats.uploads.load(SeqCst) - uploads;
    assert_eq!(sent, second["blobs_uploaded"].as_u64().unwrap());
    assert!(second["blobs_present"].as_u64().unwrap() >= 2, "{second}");
    // Its own 1 MB file and its small metadata blobs (a layer starts a
    // blob, so none of the base's is sent again).
    let bytes = second["bytes_uploaded"].as_u64().unwrap();
    assert!(bytes < 1_300_000, "{second} after {first}");

    // Into another repository: what team/first has is cross-mounted, not sent.
    let uploads = setup.proxy.stats.uploads.load(SeqCst);
    let third = push2(&setup.reference("team/other:v1"));
    assert_eq!(setup.proxy.stats.uploads.load(SeqCst), uploads, "{third}");
    assert_eq!(third["blobs_uploaded"], 0, "{third}");
    assert_eq!(third["blobs_mounted"], third["blobs"], "{third}");
    assert!(setup.proxy.stats.mounts.load(SeqCst) >= third["blobs"].as_u64().unwrap());

    // And it mounts from there like the original.
    let mount = setup.mount(&setup.reference("team/other:v1"), "other", &[]);
    assert_eq!(fs::read(mount.path("etc/hostname")).unwrap(), b"second\n");
    assert_eq!(
        fs::read(mount.path("usr/bin/own")).unwrap(),
        noise(1_000_000, 35)
    );
    assert_eq!(
        fs::read(mount.path("usr/lib/base.bin")).unwrap(),
        noise(24_000_000, 31)
    );
}

#[test]
fn a_shared_base_makes_the_same_blobs_whatever_the_layers_above_hold() {
    let setup = Setup::new();
    // A 48 MB base; the first image's own layer also holds a copy of one
    // base file at an earlier path (as packages ship the same license
    // text). In the image's path order that file's chunks come first, so
    // the base would be framed differently in each image; a push frames
    // each layer in the layer's own path order, so the base is framed alike.
    let base_file = |i: u64| noise(1_000_000, 1001 + 2 * i);
    let image = |own: Layer| {
        let mut base = Layer::new().dir("usr/lib", 0o755);
        for i in 0..48 {
            base = base.file(&format!("usr/lib/f{i:02}"), 0o644, base_file(i));
        }
        Image::new(vec![(base, Compression::Gzip), (own, Compression::Gzip)])
    };
    setup.convert(
        &image(Layer::new().file("etc/copy", 0o644, base_file(24)).file(
            "etc/first",
            0o644,
            noise(100_000, 3),
        )),
        "first",
    );
    setup.convert(
        &image(Layer::new().file("etc/second", 0o644, noise(100_000, 5))),
        "second",
    );
    let first = setup.skiff_json(&["push", "first:v1", &setup.reference("base/first:v1")]);
    let second = setup.skiff_json(&["push", "second:v1", &setup.reference("base/second:v1")]);
    // Every blob of the base is cross-mounted, its last too (a layer starts
    // a blob); uploaded: the second image's own file and its small
    // metadata blobs.
    let bytes = second["bytes_uploaded"].as_u64().unwrap();
    assert!(second["blobs_mounted"].as_u64().unwrap() >= 4, "{second}");
    assert!(bytes < 1_000_000, "{second} after {first}");
    let mount = setup.mount(&setup.reference("base/second:v1"), "second", &[]);
    for i in [0, 24, 47] {
        assert_eq!(
            fs::read(mount.path(&format!("usr/lib/f{i:02}"))).unwrap(),
            base_file(i)
        );
    }
    assert_eq!(
        fs::read(mount.path("etc/second")).unwrap(),
        noise(100_000, 5)
    );
}

#[test]
fn a_package_installed_among_other_files_makes_the_blobs_it_makes_alone() {
    let setup = Setup::new();
    // A 10 MB package tree, installed by one image among 12 MB of other
    // files that sort before and after it, and by another with one file
    // of its own. Where content alone cut blobs, the blobs straddling the
    // tree's ends would differ (several MB to upload again); a large
    // directory starts and ends blobs of its own.
    let package_file = |i: u64| noise(1_000_000, 2001 + 2 * i);
    let image = |mut own: Layer| {
        for i in 0..10 {
            own = own.file(&format!("usr/share/pkg/f{i}"), 0o644, package_file(i));
        }
        let base = Layer::new().file("usr/lib/base", 0o644, noise(500_000, 7001));
        Image::new(vec![(base, Compression::Gzip), (own, Compression::Gzip)])
    };
    let mut among = Layer::new().file("usr/bin/among", 0o755, noise(2_000_000, 3003));
    for i in 0..5 {
        among = among
            .file(
                &format!("usr/share/aaa/f{i}"),
                0o644,
                noise(1_000_000, 4001 + 2 * i),
            )
            .file(
                &format!("usr/share/zzz/f{i}"),
                0o644,
                noise(1_000_000, 5001 + 2 * i),
            );
    }
    setup.convert(&image(among), "among");
    let alone = Layer::new().file("usr/bin/alone", 0o755, noise(300_000, 3001));
    setup.convert(&image(alone), "alone");
    let first = setup.skiff_json(&["push", "among:v1", &setup.reference("pkg/among:v1")]);
    let second = setup.skiff_json(&["push", "alone:v1", &setup.reference("pkg/alone:v1")]);
    let bytes = second["bytes_uploaded"].as_u64().unwrap();
    assert!(bytes < 1_500_000, "{second} after {first}");
    let mount = setup.mount(&setup.reference("pkg/alone:v1"), "alone", &[]);
    for i in [0, 9] {
        assert_eq!(
            fs::read(mount.path(&format!("usr/share/pkg/f{i}"))).unwrap(),
            package_file(i)
        );
    }
    assert_eq!(
        fs::read(mount.path("usr/bin/alone")).unwrap(),
        noise(300_000, 3001)
    );
}

#[test]
fn a_killed_push_resumes_with_what_is_missing() {
    let setup = Setup::new();
    setup.convert(&first_image(), "first");
    let dest = setup.reference("team/first:v1");
    // Uploads slowed so the push can be killed between two of them.
    setup.proxy.mode.upload_delay_ms.store(400, SeqCst);
    let mut child = Command::new(skiff_bin())
        .arg("--store")
        .arg(&setup.store)
        .args(["push", "first:v1", &dest])
        .env("DOCKER_CONFIG", &setup.docker_config)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while setup.proxy.stats.uploads.load(SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no uploads arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    setup.proxy.mode.upload_delay_ms.store(0, SeqCst);
    let done_before = setup.proxy.stats.uploads.load(SeqCst);
    let report = setup.skiff_json(&["push", "first:v1", &dest]);
    let total = report["blobs"].as_u64().unwrap();
    let resent = report["blobs_uploaded"].as_u64().unwrap();
    assert!(resent < total, "the rerun sent everything again: {report}");
    assert!(
        resent + done_before >= total && resent + done_before <= total + 1,
        "{done_before} before, {resent} after, of {total}"
    );
    let mount = setup.mount(&dest, "resumed", &[]);
    assert_eq!(
        fs::read(mount.path("usr/bin/tool")).unwrap(),
        noise(1_500_000, 13)
    );
}

/// A registry that demands bearer tokens (the proxy issues and checks them)
/// and sends blob GETs to "object storage" on another port.
fn bearer_setup() -> (tempfile::TempDir, Registry, RegistryProxy, PathBuf, PathBuf) {
    let tmp = tempdir();
    let registry = Registry::start();
    let proxy = RegistryProxy::start(&format!("http://127.0.0.1:{}", registry.port));
    *proxy.mode.bearer.lock().unwrap() = Some((USER.into(), PASSWORD.into()));
    let config = docker_config(
        &tmp.path().join("docker"),
        &format!("127.0.0.1:{}", proxy.port),
        USER,
        PASSWORD,
    );
    let store = tmp.path().join("store");
    let layout = tmp.path().join("layout");
    first_image().write_layout(&layout, "v1");
    skiff_ok(
        &store,
        &[
            "convert",
            &format!("oci:{}:v1", layout.display()),
            "first:v1",
        ],
    );
    (tmp, registry, proxy, config, store)
}

#[test]
fn bearer_tokens_are_renewed_and_never_reach_a_redirect() {
    let (tmp, _registry, proxy, config, store) = bearer_setup();
    let dest = format!("docker://127.0.0.1:{}/team/first:v1", proxy.port);
    let out = Command::new(skiff_bin())
        .arg("--store")
        .arg(&store)
        .args(["push", "first:v1", &dest])
        .env("DOCKER_CONFIG", &config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(proxy.stats.tokens_issued.load(SeqCst) >= 1);

    proxy.mode.redirect_blobs.store(true, SeqCst);
    proxy.mode.token_secs.store(2, SeqCst);
    std::env::set_var("DOCKER_CONFIG", &config);
    let mount = SkiffMount::start(
        &store,
        &dest,
        &tmp.path().join("mnt"),
        &tmp.path().join("run"),
        &[
            "--cache",
            tmp.path().join("cache").to_str().unwrap(),
            "--no-prefetch",
        ],
    );
    assert_eq!(fs::read(mount.path("etc/hostname")).unwrap(), b"first\n");
    let tokens = proxy.stats.tokens_issued.load(SeqCst);
    // Past the token's lifetime, reads go on: the token is renewed, never an EIO.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        fs::read(mount.path("usr/bin/tool")).unwrap(),
        noise(1_500_000, 13)
    );
    assert!(
        proxy.stats.tokens_issued.load(SeqCst) > tokens,
        "no token was renewed"
    );
    assert!(
        proxy.stats.redirect_gets.load(SeqCst) > 0,
        "nothing was redirected"
    );
    let seen = proxy.stats.redirect_auth_seen.lock().unwrap().clone();
    assert!(
        seen.is_empty(),
        "credentials reached the redirect target: {seen:?}"
    );
    assert_eq!(mount.stat("failed_reads"), 0);
}

#[test]
fn a_registry_that_ignores_range_is_read_whole_once() {
    let setup = Setup::new();
    setup.convert(&first_image(), "first");
    let dest = setup.reference("team/first:v1");
    setup.skiff_ok(&["push", "first:v1", &dest]);
    setup.proxy.mode.ignore_range.store(true, SeqCst);
    let packs = registry_manifest(&setup, "team/first", "v1")["layers"]
        .as_array()
        .unwrap()
        .len() as u64
        - 3;
    let mount = setup.mount(&dest, "whole", &["--no-prefetch"]);
    let whole_gets = || {
        let stats = &setup.proxy.stats;
        stats.blob_gets.load(SeqCst) - stats.range_gets.load(SeqCst)
    };
    let before = whole_gets();
    assert_eq!(
        fs::read(mount.path("usr/lib/shared.bin")).unwrap(),
        noise(9_000_000, 11)
    );
    assert_eq!(
        fs::read(mount.path("usr/bin/tool")).unwrap(),
        noise(1_500_000, 13)
    );
    assert_eq!(fs::read(mount.path("etc/hostname")).unwrap(), b"first\n");
    // Each pack blob read whole once at most, whatever the reads that need it.
    let whole = whole_gets() - before;
    assert!(
        whole >= 1 && whole <= packs,
        "{whole} whole GETs of {packs} pack blobs"
    );
    // Read again: all from the local copies.
    let cache = setup.path("cache-whole");
    fs::remove_dir_all(cache.join("packs")).unwrap();
    assert_eq!(
        fs::read(mount.path("usr/share/common.txt")).unwrap(),
        text(1_000_000, 15)
    );
    assert_eq!(whole_gets() - before, whole);
    let status = mount.status();
    let notes = status["traffic"]["notes"].to_string();
    assert!(notes.contains("ignores Range"), "{status}");
    let text = Command::new(skiff_bin())
        .args(["status", mount.mountpoint.to_str().unwrap(), "--run-dir"])
        .arg(setup.path("run"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("ignores Range"));
}

#[test]
fn cut_blobs_are_retried_and_tampered_blobs_never_become_data() {
    let setup = Setup::new();
    setup.convert(&first_image(), "first");
    let dest = setup.reference("team/first:v1");
    let report = setup.skiff_json(&["push", "first:v1", &dest]);
    assert!(report["blobs"].as_u64().unwrap() > 0);

    // Two answers cut short: the read retries and gets the right bytes.
    setup.proxy.mode.cut_blob_gets.store(2, SeqCst);
    let mount = setup.mount(&dest, "cut", &["--no-prefetch"]);
    assert_eq!(
        fs::read(mount.path("usr/bin/tool")).unwrap(),
        noise(1_500_000, 13)
    );
    assert_eq!(
        setup.proxy.mode.cut_blob_gets.load(SeqCst),
        0,
        "no answer was cut"
    );
    mount.umount();

    // Every answer for a pack blob has a byte flipped in its middle: no
    // flipped byte becomes data. A read fails with EIO, or (when its frames
    // came whole in other answers, around another frame's flipped byte)
    // gets exactly the file's bytes.
    let manifest = registry_manifest(&setup, "team/first", "v1");
    let packs: Vec<String> = manifest["layers"].as_array().unwrap()[3..]
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    *setup.proxy.mode.tamper_digests.lock().unwrap() = packs;
    let mount = setup.mount(&dest, "tampered", &["--no-prefetch"]);
    match fs::read(mount.path("usr/lib/shared.bin")) {
        Err(err) => assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}"),
        Ok(bytes) => assert!(bytes == noise(9_000_000, 11), "other bytes than the file's"),
    }
    // Frames the flipped byte missed hold good chunks, which may be kept;
    // the cache holds nothing else.
    let cached = skiff_client::stored_chunks(&setup.path("cache-tampered")).unwrap();
    for (id, data) in &cached {
        assert_eq!(&ChunkId::of(data), id, "a tampered chunk reached the cache");
    }
    assert!(mount.stat("corrupt_chunks") > 0);
    // The registry recovers, and so does the mount.
    setup.proxy.mode.tamper_digests.lock().unwrap().clear();
    assert_eq!(
        fs::read(mount.path("usr/lib/shared.bin")).unwrap(),
        noise(9_000_000, 11)
    );
}

#[test]
fn convert_publishes_straight_to_a_registry() {
    let setup = Setup::new();
    let layout = setup.path("layout");
    first_image().write_layout(&layout, "v1");
    // Converted and pushed in one go, with no store given: nothing lasts on disk.
    let out = Command::new(skiff_bin())
        .args([
            "convert",
            &format!("oci:{}:v1", layout.display()),
            &setup.reference("ci/first:v1"),
        ])
        .env("DOCKER_CONFIG", &setup.docker_config)
        .env("HOME", setup.path("home"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !setup.path("home/.local/share/skiff").exists(),
        "a store was left behind"
    );
    let mount = setup.mount(&setup.reference("ci/first:v1"), "ci", &[]);
    let unpacked = umoci_unpack(&layout, "v1", &setup.path("unpacked"));
    let diffs = diff_trees(&unpacked, &mount.mountpoint, false);
    assert!(diffs.is_empty(), "{diffs:#?}");

    // A plain OCI image is not mistaken for a skiff one.
    let out = setup.skiff(&[
        "mount",
        &setup.reference("ci/first:nope"),
        setup.path("m2").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
}

fn registry_manifest(setup: &Setup, repo: &str, tag: &str) -> Value {
    skiff_artifact_manifest(&setup.proxy.url, repo, tag, Some((USER, PASSWORD)))
}

#[test]
fn credentials_come_from_a_docker_credential_helper() {
    let setup = Setup::new();
    setup.convert(&second_image(), "second");
    // A helper as `docker login` with a credsStore would use: docker-credential-NAME get.
    let bin = setup.path("bin");
    fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-skifftest");
    let asked = setup.path("helper-asked");
    fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\necho \"$1 $server\" >> {}\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n",
            asked.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let host = format!("127.0.0.1:{}", setup.proxy.port);
    let config_dir = setup.path("helper-config");
    fs::create_dir_all(&config_dir).unwrap();
    for (name, config) in [
        (
            "credHelpers",
            serde_json::json!({ "credHelpers": { &host: "skifftest" } }),
        ),
        (
            "credsStore",
            serde_json::json!({ "credsStore": "skifftest" }),
        ),
    ] {
        fs::write(config_dir.join("config.json"), config.to_string()).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let out = Command::new(skiff_bin())
            .arg("--store")
            .arg(&setup.store)
            .args([
                "push",
                "second:v1",
                &setup.reference(&format!("helped/{}:v1", name.to_lowercase())),
            ])
            .env("DOCKER_CONFIG", &config_dir)
            .env("PATH", path)
            .env_remove("SKIFF_REGISTRY_AUTH")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
    }
    let asked = fs::read_to_string(&asked).unwrap();
    assert_eq!(asked.lines().count(), 2, "{asked}");
    assert!(asked.lines().all(|l| l == format!("get {host}")), "{asked}");
}
