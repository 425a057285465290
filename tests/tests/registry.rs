//! Converting straight from a registry: a real one (docker-registry, images
//! pushed with skopeo) and a fake one that dies in the middle of a blob.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use serde_json::Value;
use skiff_tests::*;

fn sample() -> Image {
    Image::new(vec![
        (
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/os-release", 0o644, text(3000, 1))
                .file("bin/sh", 0o755, noise(400_000, 2)),
            Compression::Gzip,
        ),
        (
            Layer::new().whiteout("etc", "os-release").file(
                "usr/lib/big",
                0o644,
                noise(900_000, 3),
            ),
            Compression::Gzip,
        ),
    ])
}

fn index_digest(store: &std::path::Path, source: &str, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["convert", "--json"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[source, name]);
    skiff_json(store, &args)["manifest"]["index"]["digest"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn converts_from_a_real_registry_like_from_the_layout() {
    let registry = Registry::start();
    let tmp = tempdir();
    let layout = tmp.path().join("layout");
    sample().write_layout(&layout, "v1");
    registry.push(&layout, "v1", "team/app:v1");

    let from_layout = index_digest(
        &tmp.path().join("s1"),
        &format!("oci:{}:v1", layout.display()),
        "app:v1",
        &[],
    );
    let store = tmp.path().join("s2");
    let from_registry = index_digest(
        &store,
        &format!("docker://127.0.0.1:{}/team/app:v1", registry.port),
        "app:v1",
        &[],
    );
    assert_eq!(from_layout, from_registry);
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));

    // A missing tag is a clear error that changes nothing.
    let before = store_state(&store);
    let out = skiff(
        &store,
        &[
            "convert",
            &format!("docker://127.0.0.1:{}/team/app:nope", registry.port),
            "x",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("404")
            && stderr.contains("no such repository, tag or blob"),
        "{stderr}"
    );
    assert_eq!(store_state(&store), before);
}

#[test]
fn picks_a_platform_from_a_registry_index() {
    let registry = Registry::start();
    let tmp = tempdir();
    let layout = tmp.path().join("multi");
    let (amd64, arm64) = (image_for_arch("amd64"), image_for_arch("arm64"));
    write_multi_platform_layout(
        &layout,
        "multi",
        &[("linux/amd64", &amd64), ("linux/arm64", &arm64)],
    );
    registry.push(&layout, "multi", "multi:1");
    let single = tmp.path().join("arm-only");
    arm64.write_layout(&single, "x");

    let store = tmp.path().join("store");
    let via_registry = index_digest(
        &store,
        &format!("docker://127.0.0.1:{}/multi:1", registry.port),
        "m",
        &["--platform", "linux/arm64"],
    );
    let direct = index_digest(
        &tmp.path().join("s2"),
        &format!("oci:{}:x", single.display()),
        "m",
        &[],
    );
    assert_eq!(via_registry, direct);
}

/// Serves one image like a registry would, but cuts the layer blob off
/// half-way and closes the connection.
fn fake_registry_dying_mid_blob(layout: &std::path::Path) -> u16 {
    let editor = LayoutEditor::new(layout);
    let manifest = editor.manifest();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let blobs = layout.join("blobs/sha256");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request_line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_owned();
            let (content_type, body, cut) = if path.contains("/manifests/") {
                (
                    "application/vnd.oci.image.manifest.v1+json",
                    manifest_bytes.clone(),
                    false,
                )
            } else if let Some(digest) = path.split("/blobs/").nth(1) {
                let body = std::fs::read(blobs.join(digest.trim_start_matches("sha256:")))
                    .unwrap_or_default();
                ("application/octet-stream", body, digest == layer_digest)
            } else {
                ("text/plain", Vec::new(), false)
            };
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let sent = if cut {
                &body[..body.len() / 2]
            } else {
                &body[..]
            };
            let _ = stream.write_all(sent);
            // Dropping the stream closes it: the client sees a short body.
        }
    });
    port
}

#[test]
fn a_registry_dying_mid_blob_fails_cleanly() {
    let tmp = tempdir();
    let layout = tmp.path().join("layout");
    Image::new(vec![(
        Layer::new().file("big", 0o644, noise(3_000_000, 9)),
        Compression::Gzip,
    )])
    .write_layout(&layout, "v1");
    let port = fake_registry_dying_mid_blob(&layout);

    let store = tmp.path().join("store");
    seed_store(&store, &tmp.path().join("seed"));
    let before: (Value, Value) = store_state(&store);

    let out = skiff(
        &store,
        &[
            "convert",
            &format!("docker://127.0.0.1:{port}/app:v1"),
            "app",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "convert of a truncated blob succeeded"
    );
    assert!(
        stderr.contains("layer 0") && stderr.contains("downloading blob"),
        "{stderr}"
    );
    assert_eq!(
        store_state(&store),
        before,
        "a failed pull changed the store"
    );
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));
}
