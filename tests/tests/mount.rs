//! `skiff mount` for real: a FUSE mount served by a real `skiff serve` on
//! 127.0.0.1, compared byte for byte with `umoci unpack` of the source,
//! with counts of what crossed the network, a chunk tampered with on the
//! way, the server killed under it, prefetch, and the cache's bound.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_format::ChunkId;
use skiff_tests::proxy::TamperingProxy;
use skiff_tests::*;

const MIB: usize = 1 << 20;

struct Setup {
    tmp: tempfile::TempDir,
    store: PathBuf,
    run: PathBuf,
    cache: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempdir();
        let [store, run, cache] = ["store", "run", "cache"].map(|n| tmp.path().join(n));
        Setup {
            tmp,
            store,
            run,
            cache,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes `image` as a layout and converts it as `name`; returns the layout.
    fn convert(&self, image: &Image, name: &str) -> PathBuf {
        let layout = self.path(&format!("layout-{}", name.replace(':', "-")));
        image.write_layout(&layout, "latest");
        skiff_ok(
            &self.store,
            &["convert", &format!("oci:{}", layout.display()), name],
        );
        layout
    }

    /// Mounts `name` from `server_url` with the test's cache and run dirs.
    fn mount(&self, name: &str, dir: &str, server_url: &str, extra: &[&str]) -> SkiffMount {
        let cache = self.cache.display().to_string();
        let mut args = vec!["--server", server_url, "--cache", &cache];
        args.extend_from_slice(extra);
        SkiffMount::start(&self.store, name, &self.path(dir), &self.run, &args)
    }

    fn unpack(&self, layout: &Path, dir: &str) -> PathBuf {
        umoci_unpack(layout, "latest", &self.path(dir))
    }
}

fn assert_eio(result: std::io::Result<Vec<u8>>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        Ok(_) => panic!("{what}: the read succeeded"),
    }
}

/// 100 MiB of distinct noise (`noise` seeds differing only in bit 0 are the same) in 4 MiB files, a small config file, and eight
/// copies of one 4 MiB file under different names (the same chunks).
fn large_image() -> Image {
    let mut layer = Layer::new().file("etc/small.conf", 0o644, text(3000, 1));
    for n in 0..25 {
        layer = layer.file(
            &format!("usr/lib/f{n:02}.bin"),
            0o644,
            noise(4 * MIB, 1001 + 2 * n),
        );
    }
    let copy = noise(4 * MIB, 7);
    for n in 0..8 {
        layer = layer.file(&format!("opt/copy{n}.bin"), 0o644, copy.clone());
    }
    Image::new(vec![(layer, Compression::None)])
}

/// Files a few chunks long, for tests that count what one read needs.
fn small_image(seed: u64) -> Image {
    Image::new(vec![(
        Layer::new()
            .file("shared/lib.so", 0o755, noise(600_000, 42))
            .file("own/a.bin", 0o644, noise(300_000, seed))
            .file("own/b.txt", 0o644, text(20_000, seed + 1))
            .file("own/c.bin", 0o644, noise(900_000, seed + 2))
            .file("own/d.bin", 0o644, noise(500_000, seed + 3))
            .symlink("own/link", "a.bin"),
        Compression::Gzip,
    )])
}

#[test]
fn a_mount_presents_the_image_exactly_as_umoci_unpacks_it() {
    let setup = Setup::new();
    let layout = setup.path("rich");
    rich_image().write_layout(&layout, "latest");
    skiff_ok(
        &setup.store,
        &["convert", &format!("oci:{}", layout.display()), "rich:v1"],
    );
    let expected = setup.unpack(&layout, "expected");
    let server = SkiffServer::start(&setup.store, &[]);

    let over_http = setup.mount("rich:v1", "mnt-http", &server.url, &["--no-prefetch"]);
    let diffs = diff_trees(&expected, &over_http.mountpoint, true);
    assert!(
        diffs.is_empty(),
        "mount over HTTP differs:\n{}",
        diffs.join("\n")
    );

    // The same code path over the local store.
    let local = SkiffMount::start(
        &setup.store,
        "rich:v1",
        &setup.path("mnt-local"),
        &setup.run,
        &[],
    );
    let diffs = diff_trees(&expected, &local.mountpoint, true);
    assert!(
        diffs.is_empty(),
        "mount of the store differs:\n{}",
        diffs.join("\n")
    );

    // default_permissions: the kernel enforces modes and owners (notes is 0640, 1000:1001).
    let notes = over_http.path("home/user/notes");
    let cat_as = |uid: &str, gid: &str| {
        Command::new("setpriv")
            .args(["--reuid", uid, "--regid", gid, "--clear-groups", "cat"])
            .arg(&notes)
            .output()
            .unwrap()
    };
    let refused = cat_as("2000", "2000");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let owner = cat_as("1000", "1001");
    assert!(owner.status.success());
    assert_eq!(
        owner.stdout,
        fs::read(expected.join("home/user/notes")).unwrap()
    );
    let group = cat_as("3000", "1001");
    assert!(group.status.success(), "the group may read a 0640 file");

    // Read-only: no writes, no new files.
    let write = fs::write(over_http.path("etc/config"), b"x");
    assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    let create = fs::write(over_http.path("new-file"), b"x");
    assert_eq!(create.unwrap_err().raw_os_error(), Some(libc::EROFS));

    let statfs = Command::new("stat")
        .args(["-f", "-c", "%T %s"])
        .arg(&over_http.mountpoint)
        .output()
        .unwrap();
    // coreutils names FUSE's magic number "fuseblk".
    assert_eq!(
        String::from_utf8_lossy(&statfs.stdout).trim(),
        "fuseblk 4096"
    );

    let (http_dir, local_dir) = (over_http.mountpoint.clone(), local.mountpoint.clone());
    over_http.umount();
    local.umount();
    assert!(!is_mount_point(&http_dir) && !is_mount_point(&local_dir));
    assert!(
        fs::read_dir(&http_dir).unwrap().next().is_none(),
        "the directory is empty again"
    );
}

#[test]
fn reading_a_file_fetches_only_its_chunks_once_however_many_read_it() {
    let setup = Setup::new();
    let image = large_image();
    let layout = setup.convert(&image, "large:1");
    let server = SkiffServer::start(&setup.store, &[]);
    let started = Instant::now();
    let mount = setup.mount("large:1", "mnt", &server.url, &["--no-prefetch"]);
    let mount_time = started.elapsed();
    assert!(
        mount_time < Duration::from_secs(5),
        "mount took {mount_time:?}"
    );

    let status = mount.status();
    let image_bytes = status["local"]["bytes"].as_u64().unwrap();
    assert!(image_bytes > 100 * MIB as u64, "{status}");
    // Listing and stat-ing every path needs the index only.
    let expected = setup.unpack(&layout, "expected");
    for entry in walk_paths(&mount.mountpoint) {
        fs::symlink_metadata(&entry).unwrap();
    }
    assert_eq!(mount.stat("fetched_bytes"), 0);

    // One small file: its own chunk and the first window of what follows
    // it in path order, in one request.
    let small = fs::read(mount.path("etc/small.conf")).unwrap();
    assert_eq!(small, fs::read(expected.join("etc/small.conf")).unwrap());
    let fetched = mount.stat("fetched_bytes");
    assert!(fetched > 3000, "no neighbours came along: {fetched}");
    assert!(
        fetched * 100 < image_bytes,
        "one file fetched {fetched} of {image_bytes} bytes"
    );
    assert_eq!(mount.stat("fetch_requests"), 1);

    // A read that misses far from the last starts a new stream: one
    // request of the smallest window (256 KiB and the chunk that crosses it).
    let before = mount.status()["stats"].clone();
    let mut head = vec![0u8; 4096];
    use std::io::Read;
    fs::File::open(mount.path("usr/lib/f03.bin"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(head, noise(4 * MIB, 1007)[..4096]);
    let after = mount.status()["stats"].clone();
    let delta = |k: &str| after[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!(
        delta("fetch_requests") - delta("read_aheads"),
        1,
        "{before} -> {after}"
    );
    let window = delta("fetched_bytes");
    assert!(
        (256 * 1024..=3 * 256 * 1024 + MIB as u64).contains(&window),
        "the read window fetched {window} bytes"
    );

    // Eight files with the same bytes read at once: every chunk crosses once.
    let readers: Vec<_> = (0..8)
        .map(|n| {
            let path = mount.path(&format!("opt/copy{n}.bin"));
            std::thread::spawn(move || fs::read(path).unwrap())
        })
        .collect();
    let copy = noise(4 * MIB, 7);
    for reader in readers {
        assert!(reader.join().unwrap() == copy, "a reader got other bytes");
    }
    // The cache started empty and evicts nothing: a chunk fetched twice
    // would make the bytes fetched outgrow the distinct bytes it holds.
    let status = mount.status();
    assert_eq!(
        status["stats"]["fetched_bytes"], status["local"]["local_bytes"],
        "{status}"
    );
    assert!(status["local"]["local_bytes"].as_u64().unwrap() >= 4 * MIB as u64);
    assert_eq!(mount.stat("failed_reads"), 0);
}

#[test]
fn a_cold_walk_of_many_small_files_makes_few_requests() {
    let setup = Setup::new();
    // 3,000 files of 1 to 3 KB in 30 directories, as in /usr/share.
    let mut layer = Layer::new();
    for dir in 0..30 {
        for n in 0..100 {
            let seed = (dir * 100 + n) as u64;
            layer = layer.file(
                &format!("usr/share/d{dir:02}/f{n:03}"),
                0o644,
                text(1000 + (seed as usize * 37) % 2000, seed),
            );
        }
    }
    let layout = setup.convert(&Image::new(vec![(layer, Compression::Gzip)]), "small:1");
    let expected = setup.unpack(&layout, "expected");
    let server = SkiffServer::start(&setup.store, &[]);
    let mount = setup.mount("small:1", "mnt", &server.url, &["--no-prefetch"]);
    // What `find -type f -exec cat {} +` does: every file in walk order.
    let cat = Command::new("sh")
        .arg("-c")
        .arg("find . -type f -exec cat {} + | wc -c")
        .current_dir(&mount.mountpoint)
        .output()
        .unwrap();
    assert!(cat.status.success(), "{cat:?}");
    let status = mount.status();
    let requests = status["stats"]["fetch_requests"].as_u64().unwrap();
    // 6 MB: windows of 256 KiB, doubling, and fetched ahead: a handful of
    // requests, where one per file made 3,000.
    assert!(requests <= 16, "{requests} requests: {status}");
    assert_eq!(
        status["stats"]["fetched_bytes"], status["local"]["bytes"],
        "every chunk once, nothing twice: {status}"
    );
    assert_eq!(status["stats"]["failed_reads"], 0);
    // The kernel opens files and directories itself after the first of
    // each is answered ENOSYS: no round trip per open or close.
    let opens = status["stats"]["opens"].as_u64().unwrap();
    assert!(opens <= 2, "{opens} opens reached the daemon: {status}");
    let read: u64 = String::from_utf8_lossy(&cat.stdout).trim().parse().unwrap();
    assert!(read > 5_000_000, "find and cat read {read} bytes");
    for path in walk_paths(&mount.mountpoint) {
        if path.is_file() {
            let relative = path.strip_prefix(&mount.mountpoint).unwrap();
            assert_eq!(
                fs::read(&path).unwrap(),
                fs::read(expected.join(relative)).unwrap(),
                "{}",
                relative.display()
            );
        }
    }
    // Asked to answer opens (for passthrough and pins), it sees each one.
    let answering = setup.mount("small:1", "mnt-open", &server.url, &["--passthrough"]);
    let mut files = 0;
    for path in walk_paths(&answering.mountpoint) {
        if path.is_file() {
            fs::read(path).unwrap();
            files += 1;
        }
    }
    assert_eq!(files, 3000);
    assert!(answering.stat("opens") >= files);
}

/// Every path under `root`, depth first.
fn walk_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
            out.push(entry.path());
        }
    }
    out
}

#[test]
fn a_chunk_that_fails_verification_is_never_returned() {
    let setup = Setup::new();
    let layout = setup.convert(&small_image(1), "small:1");
    let expected = setup.unpack(&layout, "expected");
    let server = SkiffServer::start(&setup.store, &[]);
    let index = server.index("small:1");
    let victim = file_chunks(&index, "own/a.bin")[0].id;
    let c_chunks = file_chunks(&index, "own/c.bin");
    let neighbour = c_chunks.last().unwrap().id;
    let proxy = TamperingProxy::start(&server.url, &[victim, neighbour]);

    let mount = setup.mount(
        "small:1",
        "mnt",
        &proxy.url,
        &["--no-prefetch", "--retry-for", "2"],
    );
    assert_eio(
        fs::read(mount.path("own/a.bin")),
        "a file with a tampered chunk",
    );
    assert!(proxy.tampered.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert!(mount.stat("corrupt_chunks") >= 1);
    assert!(mount.stat("failed_reads") >= 1);
    // Other files read fine, and the bad bytes never reached the cache.
    assert_eq!(
        fs::read(mount.path("own/b.txt")).unwrap(),
        fs::read(expected.join("own/b.txt")).unwrap()
    );
    let hex = victim.to_string();
    // A fetch writes its pack once it ends, a moment after its reads are answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stored = skiff_client::stored_chunks(&setup.cache).unwrap();
    while stored.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        stored = skiff_client::stored_chunks(&setup.cache).unwrap();
    }
    assert!(!stored.is_empty(), "nothing reached the cache");
    assert!(stored
        .iter()
        .all(|(id, data)| *id != victim && ChunkId::of(data) == *id));
    let logs: String = fs::read_dir(setup.run.join("mounts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| fs::read_to_string(p).unwrap())
        .collect();
    assert!(logs.contains(&hex) && logs.contains("corrupt"), "{logs}");
    // A bad chunk in a read's window, not in the read, does not fail it.
    assert!(c_chunks.len() > 2, "c.bin needs several chunks");
    let mut head = vec![0u8; 4096];
    use std::io::Read;
    fs::File::open(mount.path("own/c.bin"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(head, fs::read(expected.join("own/c.bin")).unwrap()[..4096]);
    assert_eio(
        fs::read(mount.path("own/c.bin")),
        "reading up to the bad chunk",
    );
    // The same mount does not hand out the bad bytes on a second try either.
    assert_eio(fs::read(mount.path("own/a.bin")), "a second read");

    // Straight from the server, through the same cache, the file is right.
    let direct = setup.mount("small:1", "mnt-direct", &server.url, &["--no-prefetch"]);
    assert_eq!(
        fs::read(direct.path("own/a.bin")).unwrap(),
        fs::read(expected.join("own/a.bin")).unwrap()
    );
}

#[test]
fn reads_wait_out_a_server_restart_and_fail_with_eio_when_it_stays_away() {
    let setup = Setup::new();
    let layout = setup.convert(&small_image(2), "small:2");
    let expected = setup.unpack(&layout, "expected");
    let mut server = SkiffServer::start(&setup.store, &[]);
    let port = server.port;
    let mount = setup.mount(
        "small:2",
        "mnt",
        &server.url,
        &["--no-prefetch", "--retry-for", "4"],
    );
    let want = |rel: &str| fs::read(expected.join(rel)).unwrap();
    assert_eq!(
        fs::read(mount.path("own/a.bin")).unwrap(),
        want("own/a.bin")
    );

    server.kill();
    let started = Instant::now();
    assert_eio(
        fs::read(mount.path("own/c.bin")),
        "a read with the server gone",
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(15),
        "the read gave up after {waited:?}"
    );
    // The mount lives on: metadata and what is cached still work.
    assert!(fs::read_dir(&mount.mountpoint).unwrap().count() > 0);
    assert_eq!(fs::read(mount.path("own/link")).unwrap(), want("own/a.bin"));

    let server = SkiffServer::start_on(port, &setup.store, &[]);
    assert_eq!(
        fs::read(mount.path("own/c.bin")).unwrap(),
        want("own/c.bin")
    );

    // A server that stalls (SIGSTOP) costs the same bounded wait, then EIO.
    let (b_bin, stop) = (mount.path("own/b.txt"), |signal: &str, pid: u32| {
        Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
    });
    stop("-STOP", server.pid());
    let started = Instant::now();
    assert_eio(fs::read(&b_bin), "a read from a stalled server");
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "a stalled server held a read for {waited:?}"
    );
    stop("-CONT", server.pid());
    assert_eq!(fs::read(&b_bin).unwrap(), want("own/b.txt"));

    // A read that starts while the server is down finishes once it is back.
    drop(server);
    let path = mount.path("own/d.bin");
    let reader = std::thread::spawn(move || fs::read(path));
    std::thread::sleep(Duration::from_secs(1));
    let _server = SkiffServer::start_on(port, &setup.store, &[]);
    assert_eq!(reader.join().unwrap().unwrap(), want("own/d.bin"));
}

/// Polls `skiff status` until prefetch is done (at most a minute).
fn wait_for_prefetch(mount: &SkiffMount) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mount.status()["stats"]["prefetch_done"].as_bool().unwrap() {
        assert!(
            Instant::now() < deadline,
            "prefetch did not finish: {}",
            mount.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn prefetch_brings_the_whole_image_and_the_mount_outlives_the_server() {
    let setup = Setup::new();
    let layout = setup.convert(&small_image(3), "small:3");
    setup.convert(&small_image(4), "small:4");
    let expected = setup.unpack(&layout, "expected");
    let mut server = SkiffServer::start(&setup.store, &[]);
    let port = server.port;

    let mount = setup.mount("small:3", "mnt", &server.url, &[]);
    wait_for_prefetch(&mount);
    let status = mount.status();
    assert_eq!(
        status["local"]["local_bytes"], status["local"]["bytes"],
        "{status}"
    );
    assert_eq!(mount.stat("prefetched_bytes"), mount.stat("fetched_bytes"));
    // An overlay stacks on a mount that leaves opens to the kernel, as on
    // one that answers them (below).
    assert!(
        read_through_overlay(&setup, &mount.mountpoint, "own/c.bin", "default")
            == fs::read(expected.join("own/c.bin")).unwrap()
    );
    server.kill();
    let diffs = diff_trees(&expected, &mount.mountpoint, true);
    assert!(
        diffs.is_empty(),
        "with the server gone:\n{}",
        diffs.join("\n")
    );

    // The cache outlives the mount: mounted again, nothing is fetched.
    let _server = SkiffServer::start_on(port, &setup.store, &[]);
    let mnt = mount.mountpoint.clone();
    mount.umount();
    assert!(!is_mount_point(&mnt));
    let again = setup.mount("small:3", "mnt", &_server.url, &["--passthrough"]);
    wait_for_prefetch(&again);
    let diffs = diff_trees(&expected, &again.mountpoint, true);
    assert!(diffs.is_empty(), "mounted again:\n{}", diffs.join("\n"));
    assert_eq!(again.stat("fetched_bytes"), 0);
    // Files whose chunks are all here are assembled in the background and
    // then read by the kernel directly (passthrough) ...
    read_until_passthrough(&again, "own/c.bin", &expected);
    // ... and opens of it at the same time share one backing file (the
    // kernel fails an open that brings a second one with EIO: running a
    // binary twice at once did).
    let want = fs::read(expected.join("own/c.bin")).unwrap();
    let mut held = fs::File::open(again.path("own/c.bin")).unwrap();
    for _ in 0..3 {
        assert!(fs::read(again.path("own/c.bin")).unwrap() == want);
    }
    let mut through_held = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut through_held).unwrap();
    assert!(through_held == want);
    drop(held);
    // ... and an overlay still stacks on the mount.
    assert!(read_through_overlay(&setup, &again.mountpoint, "own/c.bin", "pt") == want);

    // Another image through the same cache finds the chunks they share.
    let other = setup.mount(
        "small:4",
        "mnt-other",
        &_server.url,
        &["--no-prefetch", "--passthrough"],
    );
    let shared_len = 600_000;
    assert!(other.status()["local"]["local_bytes"].as_u64().unwrap() >= shared_len);
    read_until_passthrough(&other, "shared/lib.so", &expected);
    assert_eq!(other.stat("fetched_bytes"), 0);
}

/// Reads `rel` through an overlay mounted on `lower` (its directories named by `name`).
fn read_through_overlay(setup: &Setup, lower: &Path, rel: &str, name: &str) -> Vec<u8> {
    let [upper, work, merged] =
        ["upper", "work", "merged"].map(|d| setup.path(&format!("{d}-{name}")));
    for dir in [&upper, &work, &merged] {
        fs::create_dir_all(dir).unwrap();
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let overlay = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &options])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(overlay.success());
    let read = fs::read(merged.join(rel));
    Command::new("umount").arg(&merged).status().unwrap();
    read.unwrap()
}

/// Reads `rel` (which must equal the file in `expected`) until the mount
/// serves an open of it by passthrough: the first opens assemble the file.
fn read_until_passthrough(mount: &SkiffMount, rel: &str, expected: &Path) {
    let want = fs::read(expected.join(rel)).unwrap();
    let before = mount.stat("passthrough_opens");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(fs::read(mount.path(rel)).unwrap() == want, "{rel} differs");
        if mount.stat("passthrough_opens") > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{rel} is never served by passthrough"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes of packs and assembled files in a cache directory.
fn cache_bytes(cache: &Path) -> u64 {
    ["packs", "files"]
        .iter()
        .flat_map(|dir| walk_paths(&cache.join(dir)))
        .map(|p| fs::metadata(p).unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[test]
fn the_cache_stays_within_its_bound_and_reads_stay_right() {
    let setup = Setup::new();
    let layout = setup.convert(&small_image(5), "small:5");
    let expected = setup.unpack(&layout, "expected");
    let server = SkiffServer::start(&setup.store, &[]);
    // 1 MB for an image of 2.3 MB.
    let mount = setup.mount("small:5", "mnt", &server.url, &["--cache-max-gb", "0.001"]);
    wait_for_prefetch(&mount);
    let diffs = diff_trees(&expected, &mount.mountpoint, true);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // Eviction runs in the background, a moment after the cache outgrows its bound.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut held = cache_bytes(&setup.cache);
    while held > 1_000_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        held = cache_bytes(&setup.cache);
    }
    assert!(held <= 1_000_000, "the cache holds {held} bytes");
    assert!(held > 0);
}

/// Whether `pid` runs (a zombie left by a killed daemon does not).
fn daemon_running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// SIGKILLs a mount's supervisor and then its daemon (which the supervisor
/// would replace) and waits until its mount answers ENOTCONN.
fn kill_9_and_wait_for_dead_mount(mount: &SkiffMount) {
    let (supervisor, daemon) = (mount.supervisor_pid(), mount.pid());
    for pid in [supervisor, daemon] {
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_dir(&mount.mountpoint)
        .map(drop)
        .map_err(|e| e.raw_os_error())
        != Err(Some(libc::ENOTCONN))
    {
        assert!(Instant::now() < deadline, "the mount did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn umount_status_and_a_killed_daemon() {
    let setup = Setup::new();
    let layout = setup.convert(&small_image(6), "small:6");
    let expected = setup.unpack(&layout, "expected");
    let server = SkiffServer::start(&setup.store, &[]);
    let run = setup.run.display().to_string();
    let skiff_here = |args: &[&str]| skiff(&setup.store, args);

    // Clear errors, and nothing left mounted.
    let mnt = setup.path("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let mnt_s = mnt.display().to_string();
    let missing = skiff_here(&[
        "mount",
        "nope:1",
        &mnt_s,
        "--server",
        &server.url,
        "--run-dir",
        &run,
    ]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("no image nope:1"), "{stderr}");
    assert!(!is_mount_point(&mnt));
    let not_dir = setup.path("file");
    fs::write(&not_dir, b"x").unwrap();
    let out = skiff_here(&[
        "mount",
        "small:6",
        not_dir.to_str().unwrap(),
        "--server",
        &server.url,
        "--run-dir",
        &run,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
    let out = skiff_here(&["status", &mnt_s, "--run-dir", &run]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no skiff mount answers"));

    let mount = setup.mount("small:6", "mnt", &server.url, &[]);
    let again = skiff_here(&[
        "mount",
        "small:6",
        &mnt_s,
        "--server",
        &server.url,
        "--run-dir",
        &run,
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already has small:6 mounted"));
    let printed = skiff_here(&["status", &mnt_s, "--run-dir", &run]);
    assert!(String::from_utf8_lossy(&printed.stdout).contains("of the image"));

    // kill -9 of the supervisor and the daemon leaves a dead mount; mounting again clears it.
    kill_9_and_wait_for_dead_mount(&mount);
    let dead = fs::read_dir(&mnt).map(|_| ()).unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN));
    std::mem::forget(mount);
    let mount = setup.mount("small:6", "mnt", &server.url, &[]);
    assert_eq!(
        fs::read(mount.path("own/b.txt")).unwrap(),
        fs::read(expected.join("own/b.txt")).unwrap()
    );
    mount.umount();
    assert!(!is_mount_point(&mnt));
    let out = skiff_here(&["umount", &mnt_s, "--run-dir", &run]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing is mounted"));
    // Right after a read, with nothing open, an unmount is only an unmount:
    // however long the daemon takes to exit, it says nothing of a detach.
    for _ in 0..3 {
        let mount = setup.mount("small:6", "mnt", &server.url, &[]);
        assert_eq!(
            fs::read(mount.path("own/c.bin")).unwrap(),
            fs::read(expected.join("own/c.bin")).unwrap()
        );
        let out = skiff_here(&["umount", &mnt_s, "--run-dir", &run]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !stderr.contains("busy"), "{stderr}");
        std::mem::forget(mount);
        assert!(!is_mount_point(&mnt));
    }
    // A busy mount is detached at once and serves its open files until they close.
    let mount = setup.mount("small:6", "mnt", &server.url, &[]);
    let pid = mount.pid();
    let mut open_file = fs::File::open(mount.path("own/c.bin")).unwrap();
    let out = skiff_here(&["umount", &mnt_s, "--run-dir", &run]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("detached"));
    std::mem::forget(mount);
    assert!(!is_mount_point(&mnt));
    let mut bytes = Vec::new();
    use std::io::Read;
    open_file.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes, fs::read(expected.join("own/c.bin")).unwrap());
    drop(open_file);
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon_running(pid) {
        assert!(
            Instant::now() < deadline,
            "the daemon outlived its last open file"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // In the foreground until Ctrl-C, which unmounts.
    let fg = setup.path("mnt-fg");
    let mut daemon = Command::new(skiff_bin())
        .args(["mount", "small:6"])
        .arg(&fg)
        .args(["--server", &server.url, "--run-dir", &run, "--foreground"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mount_point(&fg) {
        assert!(
            Instant::now() < deadline,
            "the foreground mount never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        fs::read(fg.join("own/b.txt")).unwrap(),
        fs::read(expected.join("own/b.txt")).unwrap()
    );
    Command::new("kill")
        .args(["-INT", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().unwrap().success());
    assert!(!is_mount_point(&fg));

    // A dead mount can be unmounted too.
    let mount = setup.mount("small:6", "mnt", &server.url, &[]);
    kill_9_and_wait_for_dead_mount(&mount);
    mount.umount();
    assert!(!is_mount_point(&mnt));
}

/// Peak resident memory of a process, from /proc/PID/status (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn a_2_gib_file_is_assembled_for_passthrough_in_bounded_memory() {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    const SIZE: u64 = 2 << 30;
    let tmp = tempdir();
    // One 2 GiB file of zeros, streamed into a gzipped layer: a few MB.
    let mut header = tar::Header::new_gnu();
    header.set_size(SIZE);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    struct Hashing<W: Write>(W, Sha256);
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.0.write(buf)?;
            self.1.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush()
        }
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut writer = tar::Builder::new(Hashing(gz, Sha256::new()));
    writer
        .append_data(&mut header, "big", std::io::repeat(0).take(SIZE))
        .unwrap();
    let Hashing(gz, hasher) = writer.into_inner().unwrap();
    let diff_id = format!("sha256:{}", hex::encode(hasher.finalize()));
    let layout = tmp.path().join("layout");
    layout_with_layer(&layout, &gz.finish().unwrap(), &diff_id);
    let store = tmp.path().join("store");
    skiff_ok(
        &store,
        &["convert", &format!("oci:{}", layout.display()), "big"],
    );
    let server = SkiffServer::start(&store, &[]);
    let cache = tmp.path().join("cache");
    let mount = SkiffMount::start(
        &store,
        "big",
        &tmp.path().join("mnt"),
        &tmp.path().join("run"),
        &[
            "--server",
            &server.url,
            "--cache",
            cache.to_str().unwrap(),
            "--memory-mb",
            "64",
            "--passthrough",
        ],
    );
    // The first open reads through skiff and brings the (one) chunk here;
    // the next ones assemble the file in the background, then use it.
    let zeros = |path: &Path| {
        let mut file = fs::File::open(path).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf).unwrap();
            if n == 0 {
                return total;
            }
            assert!(buf[..n].iter().all(|&b| b == 0));
            total += n as u64;
        }
    };
    assert_eq!(zeros(&mount.path("big")), SIZE);
    let deadline = Instant::now() + Duration::from_secs(120);
    while mount.stat("passthrough_opens") == 0 {
        assert!(Instant::now() < deadline, "never served by passthrough");
        drop(fs::File::open(mount.path("big")).unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(zeros(&mount.path("big")), SIZE);
    let peak = peak_rss(mount.pid());
    assert!(
        peak < (64 + 96) * MIB as u64,
        "the daemon's peak RSS was {} MiB for a 2 GiB file",
        peak / MIB as u64
    );
}

/// The options /proc/self/mountinfo gives the mount at `path`.
fn mount_options(path: &Path) -> Vec<String> {
    let path = path.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(path))
        .map(|l| {
            l.split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_mount_at_a_path_the_user_names_honours_no_setuid_or_device_unless_asked() {
    let setup = Setup::new();
    setup.convert(&small_image(7), "small:7");
    let server = SkiffServer::start(&setup.store, &[]);
    let plain = setup.mount("small:7", "plain", &server.url, &[]);
    let options = mount_options(&plain.mountpoint);
    assert!(
        options.contains(&"nosuid".into()) && options.contains(&"nodev".into()),
        "{options:?}"
    );
    let root_fs = setup.mount("small:7", "rootfs", &server.url, &["--suid-dev"]);
    let options = mount_options(&root_fs.mountpoint);
    assert!(
        !options.contains(&"nosuid".into()) && !options.contains(&"nodev".into()),
        "{options:?}"
    );
    plain.umount();
    root_fs.umount();
}
