//! `skiff mount --shared`: several hosts (network namespaces reaching one
//! real `skiff serve`) on one cache directory, as hosts on shared storage.
//! Counted at the server: each chunk crosses once in all. A host killed
//! while it holds claims holds the others up for one lease, and the bound
//! holds for all of them together.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_tests::netns::Hosts;
use skiff_tests::*;

const MIB: usize = 1 << 20;

/// 24 MiB of distinct noise in files of 1 to 3 MiB, and 400 small text files.
fn image() -> Image {
    let mut layer = Layer::new();
    for n in 0..12 {
        layer = layer.file(
            &format!("usr/lib/f{n:02}.bin"),
            0o644,
            noise((1 + n % 3) * MIB, 2001 + 2 * n as u64),
        );
    }
    for n in 0..400 {
        layer = layer.file(
            &format!("usr/share/doc/d{}/f{n:03}", n / 40),
            0o644,
            text(500 + (n * 53) % 4000, n as u64),
        );
    }
    Image::new(vec![(layer, Compression::Gzip)])
}

struct Lab {
    tmp: tempfile::TempDir,
    hosts: Hosts,
    server: SkiffServer,
    expected: PathBuf,
    distinct_chunks: usize,
}

impl Lab {
    fn new(count: usize) -> Lab {
        let tmp = tempdir();
        let store = tmp.path().join("store");
        let layout = tmp.path().join("layout");
        image().write_layout(&layout, "latest");
        skiff_ok(
            &store,
            &["convert", &format!("oci:{}", layout.display()), "img:1"],
        );
        let expected = umoci_unpack(&layout, "latest", &tmp.path().join("expected"));
        let hosts = Hosts::new(count);
        let server = SkiffServer::start_for(&hosts, &store);
        let distinct_chunks = server.index("img:1").distinct_chunks().len();
        Lab {
            tmp,
            hosts,
            server,
            expected,
            distinct_chunks,
        }
    }

    /// Mounts the image on host `k` over the cache at `cache`.
    fn mount(&self, k: usize, cache: &Path, extra: &[&str]) -> SkiffMount {
        let dir = self.tmp.path().join(format!("host{k}"));
        let mountpoint = dir.join("mnt");
        fs::create_dir_all(&mountpoint).unwrap();
        let url = format!("http://{}:{}", self.hosts.server_addr(k), self.server.port);
        let out = self
            .hosts
            .on_host(k, &skiff_bin())
            .args(["--store", dir.join("store").to_str().unwrap()])
            .args(["mount", "img:1", mountpoint.to_str().unwrap()])
            .args(["--server", &url, "--cache", cache.to_str().unwrap()])
            .args(["--run-dir", dir.join("run").to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount on host {k}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SkiffMount {
            mountpoint,
            run_dir: dir.join("run"),
        }
    }

    fn chunks_served(&self) -> f64 {
        self.server.metric("skiff_chunks_sent_total", &[])
    }
}

/// Reads every file of each mount at once, one thread per mount, and
/// compares each tree with the unpacked image.
fn read_all_at_once(mounts: &[SkiffMount], expected: &Path) {
    std::thread::scope(|scope| {
        for mount in mounts {
            scope.spawn(move || {
                let diffs = diff_trees(expected, &mount.mountpoint, true);
                assert!(diffs.is_empty(), "{}", diffs.join("\n"));
            });
        }
    });
}

/// What a mount's daemon logged, for a failure's message.
fn log_of(mount: &SkiffMount) -> String {
    let mut log = String::new();
    for entry in fs::read_dir(mount.run_dir.join("mounts"))
        .unwrap()
        .flatten()
    {
        if entry.path().extension().is_some_and(|e| e == "log") {
            log += &fs::read_to_string(entry.path()).unwrap_or_default();
        }
    }
    log
}

fn cache_bytes(cache: &Path) -> u64 {
    ["packs", "files"]
        .iter()
        .flat_map(|dir| fs::read_dir(cache.join(dir)).unwrap())
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn three_hosts_on_one_shared_cache_fetch_each_chunk_once_in_all() {
    let lab = Lab::new(3);
    let cache = lab.tmp.path().join("shared-cache");
    // Without prefetch, which would have the first host mounted fetch it
    // all before the others start: they race for every chunk.
    let mounts: Vec<SkiffMount> = (1..=3)
        .map(|k| lab.mount(k, &cache, &["--shared", "--no-prefetch"]))
        .collect();
    read_all_at_once(&mounts, &lab.expected);
    // What each host took from the network itself, and what from the others.
    let (fetched, from_others): (Vec<u64>, Vec<u64>) = mounts
        .iter()
        .map(|m| {
            let status = m.status();
            let from_others = status["traffic"]["from_shared_cache"].as_u64().unwrap_or(0);
            let asked = status["stats"]["fetched_chunks"].as_u64().unwrap();
            (asked - from_others, from_others)
        })
        .unzip();
    assert_eq!(
        lab.chunks_served(),
        lab.distinct_chunks as f64,
        "chunks fetched by each host: {fetched:?}, taken from the others: {from_others:?}"
    );
    assert_eq!(fetched.iter().sum::<u64>(), lab.distinct_chunks as u64);
    // The work was shared: more than one host fetched, and each read the rest from the cache.
    assert!(
        fetched.iter().filter(|&&n| n > 0).count() >= 2,
        "{fetched:?}"
    );
    assert!(from_others.iter().all(|&n| n > 0), "{from_others:?}");
    for mount in &mounts {
        assert_eq!(mount.stat("failed_reads"), 0, "{}", log_of(mount));
    }

    // Without --shared, the same hosts on caches of their own each fetch it all.
    drop(mounts);
    let before = lab.chunks_served();
    let alone: Vec<SkiffMount> = (1..=3)
        .map(|k| {
            let own = lab.tmp.path().join(format!("own-cache{k}"));
            lab.mount(k, &own, &["--no-prefetch"])
        })
        .collect();
    read_all_at_once(&alone, &lab.expected);
    assert_eq!(
        lab.chunks_served() - before,
        3.0 * lab.distinct_chunks as f64
    );
}

#[test]
fn a_host_killed_while_it_holds_claims_does_not_block_the_others() {
    let lab = Lab::new(2);
    let cache = lab.tmp.path().join("shared-cache");
    let claimant = lab.mount(1, &cache, &["--shared", "--no-prefetch"]);
    // Cut off, its read claims the chunks and hangs on the network.
    lab.hosts.unplug(1);
    let path = claimant.path("usr/lib/f04.bin");
    let stuck = std::thread::spawn(move || fs::read(path).map(|_| ()));
    let claims = cache.join("claims");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::read_dir(&claims).unwrap().count() == 0 {
        assert!(Instant::now() < deadline, "no claims were made");
        std::thread::sleep(Duration::from_millis(20));
    }
    let claimed = fs::read_dir(&claims).unwrap().count();
    for pid in [claimant.supervisor_pid(), claimant.pid()] {
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    assert!(
        stuck.join().unwrap().is_err(),
        "the killed host's read succeeded"
    );

    // The other host waits out the dead host's lease, then fetches itself.
    let other = lab.mount(2, &cache, &["--shared", "--no-prefetch"]);
    let started = Instant::now();
    let read = fs::read(other.path("usr/lib/f04.bin")).unwrap();
    let waited = started.elapsed();
    assert!(read == fs::read(lab.expected.join("usr/lib/f04.bin")).unwrap());
    assert!(
        waited < skiff_client::CLAIM_LEASE + Duration::from_secs(10),
        "the read took {waited:?}"
    );
    assert!(
        waited >= skiff_client::CLAIM_LEASE / 2,
        "{claimed} claims did not hold the read up: {waited:?}"
    );
    assert_eq!(other.stat("failed_reads"), 0);
    std::mem::forget(claimant);
    let _ = Command::new("umount")
        .arg("-l")
        .arg(lab.tmp.path().join("host1/mnt"))
        .status();
}

#[test]
fn the_bound_holds_for_three_hosts_on_one_shared_cache() {
    let lab = Lab::new(3);
    let cache = lab.tmp.path().join("shared-cache");
    // 8 MB for an image of 24 MiB: chunks are evicted while others wait on them.
    let mounts: Vec<SkiffMount> = (1..=3)
        .map(|k| lab.mount(k, &cache, &["--shared", "--cache-max-gb", "0.008"]))
        .collect();
    read_all_at_once(&mounts, &lab.expected);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = cache_bytes(&cache);
    while held > 8_000_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        held = cache_bytes(&cache);
    }
    assert!(held <= 8_000_000, "the cache holds {held} bytes");
    assert!(held > 0);
    for mount in &mounts {
        assert_eq!(mount.stat("failed_reads"), 0);
    }
}
