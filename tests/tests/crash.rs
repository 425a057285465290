//! kill -9 during convert, and two converts racing for one store.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use skiff_tests::*;

fn big_image(seed: u64) -> Image {
    let mut layer = Layer::new();
    for i in 0..24 {
        layer = layer.file(
            &format!("data/file{i}"),
            0o644,
            [noise(1_000_000, seed + i), text(1_000_000, seed + 100 + i)].concat(),
        );
    }
    Image::new(vec![
        (layer, Compression::Gzip),
        (Layer::new().file("top", 0o644, "top"), Compression::None),
    ])
}

#[test]
fn kill_9_at_any_moment_leaves_a_usable_store() {
    let tmp = tempdir();
    let (src, store) = (tmp.path().join("src"), tmp.path().join("store"));
    big_image(1).write_layout(&src, "latest");
    let source = format!("oci:{}", src.display());

    // Kill at spread-out moments of the conversion.
    for delay_ms in [0u64, 5, 20, 50, 100, 200, 350, 600, 900] {
        let mut child = Command::new(skiff_bin())
            .arg("--store")
            .arg(&store)
            .args(["convert", &source, "big"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        if store.join("skiff-store.json").exists() {
            let fsck = skiff(&store, &["fsck"]);
            assert!(
                fsck.status.success(),
                "fsck failed after a kill at {delay_ms} ms: {}{}",
                String::from_utf8_lossy(&fsck.stdout),
                String::from_utf8_lossy(&fsck.stderr)
            );
        }
    }
    skiff_ok(&store, &["convert", &source, "big"]);
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));
    let out = tmp.path().join("out");
    skiff_ok(
        &store,
        &["export", "big", &format!("oci:{}:x", out.display())],
    );
    let a = umoci_unpack(&src, "latest", &tmp.path().join("u1"));
    let b = umoci_unpack(&out, "x", &tmp.path().join("u2"));
    assert!(diff_trees(&a, &b, true).is_empty());
}

#[test]
fn concurrent_converts_succeed_or_report_busy() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    big_image(1).write_layout(&tmp.path().join("a"), "latest");
    big_image(50).write_layout(&tmp.path().join("b"), "latest");
    // Create the store first so both race for the same one.
    seed_store(&store, &tmp.path().join("seed"));

    let spawn = |name: &str| {
        Command::new(skiff_bin())
            .arg("--store")
            .arg(&store)
            .args([
                "convert",
                &format!("oci:{}", tmp.path().join(name).display()),
                name,
            ])
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| spawn("a").unwrap());
        let b = s.spawn(|| spawn("b").unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    for out in [&a, &b] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || stderr.contains("is busy"),
            "unclear failure: {stderr}"
        );
    }
    assert!(
        a.status.success() || b.status.success(),
        "neither convert succeeded"
    );
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));
    let images = skiff_json(&store, &["images", "--json"]);
    let expected = 1 + usize::from(a.status.success()) + usize::from(b.status.success());
    assert_eq!(images.as_array().unwrap().len(), expected);
}

#[test]
fn ctrl_c_stops_convert_and_leaves_the_store_as_it_was() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    seed_store(&store, &tmp.path().join("seed"));
    big_image(7).write_layout(&tmp.path().join("big"), "latest");
    let before = store_state(&store);

    // Earlier and earlier until the signal lands before the conversion ends.
    for delay_ms in [300u64, 150, 100, 60, 40, 20] {
        let child = Command::new(skiff_bin())
            .arg("--store")
            .arg(&store)
            .args([
                "convert",
                &format!("oci:{}", tmp.path().join("big").display()),
                "big",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let killed = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            skiff_ok(&store, &["rmi", "big"]);
            skiff_ok(&store, &["gc"]);
            continue;
        }
        if std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(libc::SIGINT) {
            // Earlier than its handler (a busy machine starts it slowly):
            // it died before it wrote anything.
            assert_eq!(
                store_state(&store),
                before,
                "a convert killed at start changed the store"
            );
            continue;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        assert_eq!(store_state(&store), before, "Ctrl-C left the store changed");
        assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));
        return;
    }
    panic!("convert always finished before Ctrl-C arrived");
}
