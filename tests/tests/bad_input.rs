//! A corpus of broken images, built here: each must fail with a clear error,
//! a non-zero exit, and leave the store exactly as it was.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::json;
use skiff_tests::*;

fn good_layer() -> Layer {
    Layer::new()
        .dir("etc", 0o755)
        .file("etc/hosts", 0o644, text(200_000, 1))
        .file("bin/app", 0o755, noise(400_000, 2))
}

/// A layer unlike `good_layer`: a fault in it cannot be skipped as a layer
/// the store converted before.
fn other_layer() -> Layer {
    good_layer().file("etc/other", 0o644, text(50_000, 3))
}

/// A two-layer image whose second layer is `top`.
fn with_top(top: Layer) -> Image {
    Image::new(vec![
        (good_layer(), Compression::Gzip),
        (top, Compression::Gzip),
    ])
}

struct Case {
    name: &'static str,
    /// Words the error message must contain.
    expect: &'static str,
    build: Box<dyn Fn(&Path)>,
}

fn corpus() -> Vec<Case> {
    let layout = |image: Image| {
        move |dir: &Path| {
            image.write_layout(dir, "latest");
        }
    };
    vec![
        Case {
            name: "entry climbing out of the root",
            expect: "climbs out of the root",
            build: Box::new(layout(with_top(Layer::new().entry(Entry::Raw {
                path: b"../../../tmp/skiff-escape".to_vec(),
                kind: tar::EntryType::Regular,
                size: 4,
                data: b"evil".to_vec(),
            })))),
        },
        Case {
            name: "write through a symlink",
            expect: "through the symbolic link",
            build: Box::new(layout(Image::new(vec![
                (good_layer().symlink("escape", "/tmp"), Compression::Gzip),
                // Raw: the fixture builder would list `escape/` as a directory first.
                (
                    Layer::new().entry(Entry::Raw {
                        path: b"escape/owned".to_vec(),
                        kind: tar::EntryType::Regular,
                        size: 1,
                        data: b"x".to_vec(),
                    }),
                    Compression::Gzip,
                ),
            ]))),
        },
        Case {
            name: "truncated gzip",
            expect: "layer 1",
            build: Box::new(|dir: &Path| {
                with_top(other_layer()).write_layout(dir, "latest");
                let editor = LayoutEditor::new(dir);
                let bytes = editor.layer_bytes(1);
                editor.set_layer_bytes(1, &bytes[..bytes.len() / 2]);
            }),
        },
        Case {
            name: "corrupt gzip",
            expect: "layer 1",
            build: Box::new(|dir: &Path| {
                with_top(other_layer()).write_layout(dir, "latest");
                let editor = LayoutEditor::new(dir);
                let mut bytes = editor.layer_bytes(1);
                for b in &mut bytes[100..140] {
                    *b ^= 0xa5;
                }
                editor.set_layer_bytes(1, &bytes);
            }),
        },
        Case {
            name: "blob digest mismatch",
            expect: "does not match its digest",
            build: Box::new(|dir: &Path| {
                with_top(other_layer()).write_layout(dir, "latest");
                let editor = LayoutEditor::new(dir);
                let path = editor.layer_path(1);
                let mut bytes = std::fs::read(&path).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                std::fs::write(path, bytes).unwrap();
            }),
        },
        Case {
            name: "missing blob",
            expect: "missing",
            build: Box::new(|dir: &Path| {
                with_top(other_layer()).write_layout(dir, "latest");
                std::fs::remove_file(LayoutEditor::new(dir).layer_path(1)).unwrap();
            }),
        },
        Case {
            name: "malformed manifest JSON",
            expect: "malformed image manifest",
            build: Box::new(|dir: &Path| {
                with_top(other_layer()).write_layout(dir, "latest");
                LayoutEditor::new(dir).set_manifest_bytes(b"{\"schemaVersion\": 2, \"layers\": [");
            }),
        },
        Case {
            name: "malformed config JSON",
            expect: "malformed image config",
            build: Box::new(|dir: &Path| {
                with_top(other_layer()).write_layout(dir, "latest");
                LayoutEditor::new(dir).set_config_bytes(b"{\"rootfs\": 12}");
            }),
        },
        Case {
            name: "layer that does not match its diff_id",
            expect: "does not match its digest",
            build: Box::new(|dir: &Path| {
                let image = with_top(other_layer());
                image.write_layout(dir, "latest");
                let mut config: serde_json::Value =
                    serde_json::from_slice(&image.config_bytes()).unwrap();
                config["rootfs"]["diff_ids"][1] = json!(sha256(b"something else"));
                LayoutEditor::new(dir).set_config_bytes(&serde_json::to_vec(&config).unwrap());
            }),
        },
        Case {
            name: "tar header claiming an absurd size",
            expect: "bytes",
            build: Box::new(layout(with_top(Layer::new().entry(Entry::Raw {
                path: b"huge".to_vec(),
                kind: tar::EntryType::Regular,
                size: 1 << 40,
                data: b"tiny".to_vec(),
            })))),
        },
        Case {
            name: "unknown media type",
            expect: "unsupported media type",
            build: Box::new(|dir: &Path| {
                with_top(other_layer()).write_layout(dir, "latest");
                LayoutEditor::new(dir).edit_manifest(|m| {
                    m["layers"][1]["mediaType"] = json!("application/x-mystery")
                });
            }),
        },
        Case {
            name: "hard link to nothing",
            expect: "does not exist",
            build: Box::new(layout(with_top(
                Layer::new().hardlink("etc/link", "etc/nothing"),
            ))),
        },
        Case {
            name: "not an image layout",
            expect: "index.json is missing",
            build: Box::new(|dir: &Path| std::fs::create_dir_all(dir).unwrap()),
        },
    ]
}

#[test]
fn bad_input_fails_cleanly_and_leaves_the_store_unchanged() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let good = tmp.path().join("good");
    Image::new(vec![(good_layer(), Compression::Gzip)]).write_layout(&good, "latest");
    skiff_ok(
        &store,
        &["convert", &format!("oci:{}", good.display()), "good"],
    );
    let before = store_state(&store);
    let packs_before: Vec<_> = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let mut failures = Vec::new();
    for (i, case) in corpus().iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        (case.build)(&dir);
        let out = skiff(
            &store,
            &["convert", &format!("oci:{}", dir.display()), "bad:latest"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{}: convert succeeded", case.name));
        } else if !stderr.contains(case.expect) {
            failures.push(format!(
                "{}: error does not say {:?}: {stderr}",
                case.name, case.expect
            ));
        }
        if store_state(&store) != before {
            failures.push(format!("{}: the store changed", case.name));
        }
        let packs: Vec<_> = std::fs::read_dir(store.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        if packs != packs_before {
            failures.push(format!("{}: pack files changed: {packs:?}", case.name));
        }
        if !skiff_ok(&store, &["fsck"]).contains("store is consistent") {
            failures.push(format!("{}: fsck fails afterwards", case.name));
        }
    }
    assert!(
        !Path::new("/tmp/skiff-escape").exists(),
        "an entry escaped the root"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn usage_errors_are_clear() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let out = skiff(&store, &["stats"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no skiff store"));
    let out = skiff(&store, &["convert", "ftp://example", "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported image source"));
    let out = skiff(&store, &["convert", "oci:/nonexistent", "Bad Name"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid image reference"));
}

#[test]
fn a_failed_first_convert_leaves_no_store_behind() {
    let tmp = tempdir();
    let store = tmp.path().join("new-store");
    let out = skiff(
        &store,
        &[
            "convert",
            &format!("oci:{}", tmp.path().join("missing").display()),
            "x",
        ],
    );
    assert!(!out.status.success());
    assert!(
        !store.exists(),
        "a failed convert created {}",
        store.display()
    );
}

/// An image layout at `dir` whose one layer is `tar`.
fn layout_with_layer_tar(dir: &Path, tar: &[u8]) {
    layout_with_layer(dir, &compress(tar, Compression::Gzip), &sha256(tar));
}

/// A PAX header entry giving the next entry `path`.
fn pax_path(path: &[u8]) -> Vec<u8> {
    let record_len = |digits: usize| digits + " path=\n".len() + path.len();
    let mut digits = 1;
    while record_len(digits).to_string().len() != digits {
        digits += 1;
    }
    let mut record = format!("{} path=", record_len(digits)).into_bytes();
    record.extend_from_slice(path);
    record.push(b'\n');
    let mut header = tar::Header::new_ustar();
    header.set_path("PaxHeader").unwrap();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(record.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(&record);
    tar.resize(tar.len().next_multiple_of(512), 0);
    tar
}

#[test]
fn depth_and_path_length_bombs_are_refused_at_once() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    seed_store(&store, &tmp.path().join("seed"));
    let before = store_state(&store);
    let file = |path: &[u8]| {
        let mut tar = pax_path(path);
        tar.extend_from_slice(
            &Layer::new()
                .entry(Entry::Raw {
                    path: b"short".to_vec(),
                    kind: tar::EntryType::Regular,
                    size: 0,
                    data: vec![],
                })
                .tar(),
        );
        tar
    };
    // ~1 MiB of "a/": half a million nested directories, from 1 KB of gzip.
    let deep = [b"a/".repeat(500_000), b"f".to_vec()].concat();
    let long_name = [b"d/".to_vec(), vec![b'n'; 300]].concat();
    for (what, tar, expect) in [
        ("deep", file(&deep), "at most 4096"),
        ("long name", file(&long_name), "longer than 255 bytes"),
    ] {
        let src = tmp.path().join(what);
        layout_with_layer_tar(&src, &tar);
        let started = std::time::Instant::now();
        let out = skiff(&store, &["convert", &format!("oci:{}", src.display()), "x"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expect),
            "{what}: {stderr}"
        );
        assert!(stderr.len() < 4096, "{what}: the error repeats the path");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{what}"
        );
    }
    assert_eq!(store_state(&store), before);
    // The deepest tree the limits allow converts and exports.
    let deepest = [b"a/".repeat(2000), b"f".to_vec()].concat();
    let src = tmp.path().join("deepest");
    layout_with_layer_tar(&src, &file(&deepest));
    skiff_ok(
        &store,
        &["convert", &format!("oci:{}", src.display()), "deepest"],
    );
    let out = tmp.path().join("exported");
    skiff_ok(
        &store,
        &["export", "deepest", &format!("oci:{}:e", out.display())],
    );
}

#[test]
fn oversized_extension_headers_are_refused_without_reading_them() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    // A PAX header claiming 64 MiB of (real, highly compressible) records.
    let mut tar = Vec::new();
    let mut header = tar::Header::new_ustar();
    header.set_path("PaxHeader").unwrap();
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_size(64 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    tar.extend_from_slice(header.as_bytes());
    tar.extend(std::iter::repeat_n(b'\n', 64 << 20));
    let layer = Layer::new().entry(Entry::Raw {
        path: b"after".to_vec(),
        kind: tar::EntryType::Regular,
        size: 0,
        data: vec![],
    });
    tar.extend_from_slice(&layer.tar());
    let src = tmp.path().join("src");
    layout_with_layer_tar(&src, &tar);

    let out = skiff(&store, &["convert", &format!("oci:{}", src.display()), "x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("at most 1048576 bytes are accepted"),
        "{stderr}"
    );
}

/// A server on 127.0.0.1 that answers every request with `status` and a
/// body that never ends; returns its URL. It lives as long as the test.
fn endless_server(status: u16) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut stream = stream;
                let head = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                );
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let piece = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                while stream.write_all(piece.as_bytes()).is_ok() {}
            });
        }
    });
    url
}

#[test]
fn endless_answers_from_a_server_end_in_a_clear_error() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    seed_store(&store, &tmp.path().join("seed"));
    for status in [200, 500] {
        let server = endless_server(status);
        let started = std::time::Instant::now();
        for args in [
            vec![
                "pull",
                "seed:latest",
                "--server",
                &server,
                "--retry-for",
                "0",
            ],
            vec!["images", "--server", &server],
        ] {
            let out = skiff(&store, &args);
            assert!(!out.status.success(), "{args:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            // 200: the body is refused past its bound; 500: the error's
            // message is cut at its bound and reported.
            assert!(
                stderr.contains("a body over") || stderr.contains("500"),
                "{args:?}: {stderr}"
            );
            assert!(stderr.len() < 70_000, "{} bytes of error", stderr.len());
        }
        // Seconds, not the time to fill memory.
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        // A mount's daemon gives up the same way, and says why.
        let mnt = tmp.path().join(format!("mnt-{status}"));
        let out = Command::new(skiff_bin())
            .args(["mount", "seed:latest"])
            .arg(&mnt)
            .args(["--server", &server, "--retry-for", "1", "--run-dir"])
            .arg(tmp.path().join("run"))
            .arg("--cache")
            .arg(tmp.path().join("cache"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("a body over") || stderr.contains("500"),
            "{stderr}"
        );
    }
}
