//! Mounts that outlive their daemon: kill -9 of a mount daemon while
//! processes read from its mount, and the supervisor's new daemon takes the
//! same FUSE connection over. Readers compare every byte with the image as
//! `umoci unpack` writes it, and see no error.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_tests::*;

const MIB: usize = 1 << 20;

struct Setup {
    tmp: tempfile::TempDir,
    store: PathBuf,
    run: PathBuf,
    cache: PathBuf,
    expected: PathBuf,
    server: SkiffServer,
}

impl Setup {
    /// `image` converted as `name`, unpacked by umoci, and served.
    fn new(image: &Image, name: &str) -> Setup {
        let tmp = tempdir();
        let [store, run, cache, layout] =
            ["store", "run", "cache", "layout"].map(|n| tmp.path().join(n));
        image.write_layout(&layout, "latest");
        skiff_ok(
            &store,
            &["convert", &format!("oci:{}", layout.display()), name],
        );
        let expected = umoci_unpack(&layout, "latest", &tmp.path().join("expected"));
        let server = SkiffServer::start(&store, &[]);
        Setup {
            tmp,
            store,
            run,
            cache,
            expected,
            server,
        }
    }

    /// A lazy mount without prefetch: every read of a new chunk is a request
    /// a daemon may die in the middle of.
    fn mount(&self, name: &str) -> SkiffMount {
        self.mount_with(name, &[])
    }

    fn mount_with(&self, name: &str, extra: &[&str]) -> SkiffMount {
        let cache = self.cache.display().to_string();
        let mut args = vec![
            "--server",
            &self.server.url,
            "--cache",
            &cache,
            "--no-prefetch",
        ];
        args.extend_from_slice(extra);
        SkiffMount::start(
            &self.store,
            name,
            &self.tmp.path().join("mnt"),
            &self.run,
            &args,
        )
    }
}

fn signal(pid: u32, signal: &str) {
    assert!(Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

fn kill_9(pid: u32) {
    signal(pid, "-9");
}

/// `skiff status --json` once a daemon other than `old` answers it.
fn wait_for_takeover(mount: &SkiffMount, old: u32) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Between two daemons nobody answers.
        if let Ok(status) = mount.try_status() {
            if status["pid"].as_u64() != Some(u64::from(old)) {
                return status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no daemon took the mount over within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes whose command line names `run_dir` and `what` (a hidden command).
fn processes(run_dir: &Path, what: &str) -> Vec<u32> {
    let run_dir = run_dir.display().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.contains(&what.as_bytes()) && args.contains(&run_dir.as_bytes())
        })
        .filter(|pid| {
            // A zombie is gone but for its parent's wait.
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| !rest.starts_with('Z'))
            })
        })
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads `path` in 128 KiB pieces, pausing between them so that the read
/// takes long enough for daemons to die under it.
fn slow_read(path: &Path, pause: Duration) -> std::io::Result<Vec<u8>> {
    let mut file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    let mut piece = vec![0u8; 128 * 1024];
    loop {
        let n = file.read(&mut piece)?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&piece[..n]);
        std::thread::sleep(pause);
    }
}

#[test]
fn a_reader_never_notices_its_daemon_killed_three_times() {
    let image = Image::new(vec![(
        Layer::new()
            .file("data/big.bin", 0o644, noise(48 * MIB, 11))
            .file("etc/conf", 0o644, text(2000, 3)),
        Compression::Gzip,
    )]);
    let setup = Setup::new(&image, "big:1");
    let mount = setup.mount("big:1");
    let supervisor = mount.supervisor_pid();
    let path = mount.path("data/big.bin");
    // 384 pieces, 4 ms apart: about 1.5 s and more of reading.
    let reader = std::thread::spawn(move || slow_read(&path, Duration::from_millis(4)));
    let mut pid = mount.pid();
    for kill in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        // The second time with the server stopped: the reader's next miss
        // is a request the daemon has read and cannot answer when it dies.
        let frozen = kill == 1;
        if frozen {
            signal(setup.server.pid(), "-STOP");
            std::thread::sleep(Duration::from_millis(300));
        }
        kill_9(pid);
        let status = wait_for_takeover(&mount, pid);
        pid = status["pid"].as_u64().unwrap() as u32;
        if frozen {
            signal(setup.server.pid(), "-CONT");
        }
    }
    wait_until(
        "the reader hangs: a request the dead daemon had read was never answered",
        || reader.is_finished(),
    );
    let read = reader.join().unwrap().expect("the read failed");
    assert!(
        read == fs::read(setup.expected.join("data/big.bin")).unwrap(),
        "the bytes read across the takeovers differ from the image's"
    );
    let status = mount.status();
    assert_eq!(status["takeovers"], 3, "{status}");
    assert_eq!(status["supervisor_pid"], supervisor, "{status}");
    assert_eq!(status["stats"]["failed_reads"], 0, "{status}");
    assert!(status["uptime_secs"].as_f64().unwrap() >= 0.9, "{status}");
    mount.umount();
    wait_until("a daemon outlived the unmount", || {
        processes(&setup.run, "mount-daemon").is_empty()
            && processes(&setup.run, "mount-supervisor").is_empty()
    });
}

#[test]
fn twenty_kills_under_concurrent_readers_leave_no_dead_mount_no_leaked_daemon_and_no_error() {
    let mut layer = Layer::new();
    for n in 0..24 {
        let len = if n % 4 == 0 {
            2 * MIB
        } else {
            40_000 + n * 3000
        };
        layer = layer.file(
            &format!("d{}/f{n:02}", n % 3),
            0o644,
            noise(len, 500 + 2 * n as u64),
        );
    }
    let setup = Setup::new(&Image::new(vec![(layer, Compression::Gzip)]), "many:1");
    let mount = setup.mount("many:1");
    let files: Vec<String> = (0..24).map(|n| format!("d{}/f{n:02}", n % 3)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (stop, reads, files) = (stop.clone(), reads.clone(), files.clone());
            let (root, expected) = (mount.mountpoint.clone(), setup.expected.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Each reader its own order; later rounds read from the cache and the kernel.
                    let file = &files[(round * 7 + r * 5) % files.len()];
                    let got = fs::read(root.join(file)).map_err(|e| format!("{file}: {e}"))?;
                    if got != fs::read(expected.join(file)).unwrap() {
                        return Err(format!("{file} differs"));
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                    round += 1;
                }
                Ok(())
            })
        })
        .collect();
    let mut pid = mount.pid();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        kill_9(pid);
        pid = wait_for_takeover(&mount, pid)["pid"].as_u64().unwrap() as u32;
    }
    stop.store(true, Ordering::Relaxed);
    wait_until("a reader hangs", || readers.iter().all(|r| r.is_finished()));
    for reader in readers {
        reader.join().unwrap().expect("a reader saw an error");
    }
    assert!(reads.load(Ordering::Relaxed) > 20);
    assert_eq!(mount.status()["takeovers"], 20);
    assert_eq!(processes(&setup.run, "mount-daemon"), vec![pid]);
    assert_eq!(processes(&setup.run, "mount-supervisor").len(), 1);
    let mountpoint = mount.mountpoint.clone();
    mount.umount();
    assert!(!is_mount_point(&mountpoint));
    wait_until("a daemon outlived the unmount", || {
        processes(&setup.run, "mount-daemon").is_empty()
            && processes(&setup.run, "mount-supervisor").is_empty()
    });
}

#[test]
fn files_held_open_by_passthrough_and_through_skiff_stay_readable_and_open_again_after_a_takeover()
{
    let image = Image::new(vec![(
        Layer::new()
            .file("lib/large.so", 0o755, noise(3 * MIB, 21))
            .file("etc/small.conf", 0o644, text(9000, 22)),
        Compression::Gzip,
    )]);
    let setup = Setup::new(&image, "open:1");
    let mount = setup.mount_with("open:1", &["--passthrough"]);
    let large = fs::read(setup.expected.join("lib/large.so")).unwrap();
    let small = fs::read(setup.expected.join("etc/small.conf")).unwrap();
    // Opens assemble the file once all its chunks are here; then the kernel reads it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mount.stat("passthrough_opens") == 0 {
        assert!(fs::read(mount.path("lib/large.so")).unwrap() == large);
        assert!(Instant::now() < deadline, "never served by passthrough");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut held_large = fs::File::open(mount.path("lib/large.so")).unwrap();
    let mut held_small = fs::File::open(mount.path("etc/small.conf")).unwrap();
    // A daemon keeps its counters four times a second for the next one.
    std::thread::sleep(Duration::from_millis(600));
    let before = mount.status()["stats"].clone();
    let old = mount.pid();
    kill_9(old);
    let after = wait_for_takeover(&mount, old)["stats"].clone();
    for counter in ["reads", "read_bytes", "fetched_bytes", "passthrough_opens"] {
        assert_eq!(
            after[counter], before[counter],
            "{counter} after a takeover"
        );
    }

    // The kernel still holds each inode in the mode it was opened in: the
    // new daemon must open them again the same way, or the open fails.
    for _ in 0..3 {
        assert!(fs::read(mount.path("lib/large.so")).unwrap() == large);
        assert!(fs::read(mount.path("etc/small.conf")).unwrap() == small);
    }
    assert!(mount.stat("passthrough_opens") > 0);
    let mut bytes = Vec::new();
    held_large.read_to_end(&mut bytes).unwrap();
    assert!(bytes == large);
    bytes.clear();
    held_small.read_to_end(&mut bytes).unwrap();
    assert!(bytes == small);
    drop((held_large, held_small));
    // And once the last handle is closed, a new open is free to choose again.
    assert!(fs::read(mount.path("lib/large.so")).unwrap() == large);
    mount.umount();
}

#[test]
fn a_killed_supervisor_leaves_a_mount_that_serves_and_that_umount_cleans_up() {
    let image = Image::new(vec![(
        Layer::new().file("a/b.bin", 0o644, noise(700_000, 31)),
        Compression::Gzip,
    )]);
    let setup = Setup::new(&image, "sup:1");
    let mount = setup.mount("sup:1");
    let daemon = mount.pid();
    kill_9(mount.supervisor_pid());
    wait_until("the supervisor did not die", || {
        processes(&setup.run, "mount-supervisor").is_empty()
    });
    // Its daemon holds the connection too: nothing changes for readers.
    assert!(
        fs::read(mount.path("a/b.bin")).unwrap()
            == fs::read(setup.expected.join("a/b.bin")).unwrap()
    );
    assert_eq!(mount.pid(), daemon);
    let mountpoint = mount.mountpoint.clone();
    mount.umount();
    assert!(!is_mount_point(&mountpoint));
    wait_until("the daemon outlived the unmount", || {
        processes(&setup.run, "mount-daemon").is_empty()
    });
    // The dead supervisor's files go too.
    assert_eq!(left_in(&setup.run), Vec::<String>::new());
}

#[test]
fn skiff_upgrade_hands_every_mount_to_a_new_supervisor_while_a_reader_reads() {
    let image = Image::new(vec![(
        Layer::new().file("data/big.bin", 0o644, noise(32 * MIB, 41)),
        Compression::Gzip,
    )]);
    let setup = Setup::new(&image, "up:1");
    let mount = setup.mount("up:1");
    let (old_supervisor, old_daemon) = (mount.supervisor_pid(), mount.pid());
    let path = mount.path("data/big.bin");
    let reader = std::thread::spawn(move || slow_read(&path, Duration::from_millis(4)));
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(skiff_bin())
        .arg("upgrade")
        .arg("--run-dir")
        .arg(&setup.run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("upgraded"), "{stderr}");
    assert!(
        !reader.is_finished(),
        "the read ended before the upgrade: nothing was tested"
    );
    wait_until("the reader hangs after the upgrade", || {
        reader.is_finished()
    });
    let read = reader.join().unwrap().expect("the read failed");
    assert!(read == fs::read(setup.expected.join("data/big.bin")).unwrap());
    let status = mount.status();
    assert_ne!(status["supervisor_pid"], old_supervisor, "{status}");
    assert_ne!(status["pid"], old_daemon, "{status}");
    assert_eq!(status["takeovers"], 1, "{status}");
    assert_eq!(processes(&setup.run, "mount-supervisor").len(), 1);
    assert_eq!(processes(&setup.run, "mount-daemon").len(), 1);
    // A mount point that is not a mount is an error, and changes nothing.
    let out = Command::new(skiff_bin())
        .arg("upgrade")
        .arg(setup.tmp.path())
        .arg("--run-dir")
        .arg(&setup.run)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let mountpoint = mount.mountpoint.clone();
    mount.umount();
    assert!(!is_mount_point(&mountpoint));
    wait_until("a daemon outlived the unmount", || {
        processes(&setup.run, "mount-daemon").is_empty()
            && processes(&setup.run, "mount-supervisor").is_empty()
    });
    // What the supervisors kept for their daemons goes with the last one.
    assert_eq!(left_in(&setup.run), Vec::<String>::new());
}

/// What the run directory still holds of mounts, logs aside.
fn left_in(run_dir: &Path) -> Vec<String> {
    fs::read_dir(run_dir.join("mounts"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".log"))
        .collect()
}
