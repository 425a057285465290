//! `skiff relayer`: images written anew with layers cut where they share
//! files, each compared with the original by `umoci unpack` (every path,
//! byte and attribute), and bad input that leaves the output untouched.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use serde_json::Value;
use skiff_tests::*;

/// Four images: `app` (a base and an app layer), `app-squashed` (the same
/// files squashed into one layer, and one more), `worker` (the base, other
/// files) and the rich image (whiteouts, opaque directories, hard links
/// across layers, xattrs, devices, long names).
fn images() -> Vec<(&'static str, Image)> {
    let base = || {
        Layer::new()
            .dir("usr", 0o755)
            .dir("usr/lib", 0o755)
            .file("usr/lib/libbig.so", 0o755, noise(400_000, 1))
            .file("usr/lib/libsmall.so", 0o755, noise(20_000, 2))
            .dir("etc", 0o755)
            .file("etc/os-release", 0o644, "ID=test\n")
    };
    let app = || {
        Layer::new()
            .dir("app", 0o755)
            .file("app/main", 0o755, noise(200_000, 3))
            .file("app/config", 0o644, text(3000, 4))
            .hardlink("app/main-link", "app/main")
    };
    let squashed = {
        let mut layer = base();
        for (entry, attrs) in app().entries {
            layer = layer.entry_with(entry, attrs);
        }
        layer.file("app/extra", 0o644, text(500, 5))
    };
    let worker = Layer::new()
        .dir("srv", 0o700)
        .file("srv/worker", 0o755, noise(150_000, 6))
        .symlink("srv/current", "worker");
    vec![
        (
            "app",
            Image::new(vec![
                (base(), Compression::Gzip),
                (app(), Compression::Gzip),
            ]),
        ),
        (
            "app-squashed",
            Image::new(vec![(squashed, Compression::Gzip)]),
        ),
        (
            "worker",
            Image::new(vec![
                (base(), Compression::Gzip),
                (worker, Compression::Gzip),
            ]),
        ),
        ("rich", rich_image()),
    ]
}

/// Writes each image as a layout named after it; returns the sources.
fn write_sources(dir: &Path) -> Vec<String> {
    images()
        .iter()
        .map(|(name, image)| {
            let layout = dir.join(name);
            image.write_layout(&layout, "v1");
            format!("oci:{}:v1", layout.display())
        })
        .collect()
}

fn layer_digests(layout: &Path, tag: &str) -> Vec<String> {
    let index: Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let descriptor = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in {index}"));
    let digest = descriptor["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let manifest: Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(digest)).unwrap())
            .unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(
                l["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            l["digest"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn relayered_images_unpack_exactly_as_the_originals_and_share_their_common_files() {
    let tmp = tempdir();
    let sources = write_sources(&tmp.path().join("src"));
    let store = tmp.path().join("store");
    for max_layers in ["16", "2"] {
        let out = tmp.path().join(format!("out-{max_layers}"));
        let mut args = vec!["relayer", "--json", "--max-layers", max_layers];
        args.extend(sources.iter().map(String::as_str));
        let out_arg = format!("oci:{}", out.display());
        args.extend(["--out", &out_arg]);
        let report = skiff_json(&store, &args);

        for ((name, _), line) in images().iter().zip(report["images"].as_array().unwrap()) {
            // The sources all say v1: each is told apart by its layout's name.
            let tag = format!("{name}-v1");
            assert_eq!(line["tag"], tag.as_str());
            let expected = umoci_unpack(
                &tmp.path().join("src").join(name),
                "v1",
                &tmp.path().join(format!("expected-{name}-{max_layers}")),
            );
            let actual = umoci_unpack(
                &out,
                &tag,
                &tmp.path().join(format!("got-{name}-{max_layers}")),
            );
            let diffs = diff_trees(&expected, &actual, true);
            assert!(
                diffs.is_empty(),
                "{tag} with at most {max_layers} layers:\n{}",
                diffs.join("\n")
            );
            let layers = layer_digests(&out, &tag);
            assert_eq!(
                layers.len(),
                line["layers_after"].as_u64().unwrap() as usize
            );
            assert!(
                layers.len() <= max_layers.parse().unwrap(),
                "{tag}: {layers:?}"
            );
        }

        // What app and app-squashed hold alike is one layer of both, and the
        // base of app and worker another: fewer bytes than the originals.
        let layers = |name: &str| -> HashSet<String> {
            layer_digests(&out, &format!("{name}-v1"))
                .into_iter()
                .collect()
        };
        let (app, squashed, worker) = (layers("app"), layers("app-squashed"), layers("worker"));
        if max_layers == "16" {
            assert!(
                app.intersection(&squashed).count() >= 2,
                "{app:?} {squashed:?}"
            );
            assert!(!app.intersection(&worker).collect::<Vec<_>>().is_empty());
            assert!(
                report["layer_bytes_after"].as_u64().unwrap()
                    < report["layer_bytes_before"].as_u64().unwrap(),
                "{report}"
            );
        } else {
            // Two layers: the most saving group, and everything else with the directories.
            assert_eq!(app.len(), 2);
        }
    }

    // skiff reads a relayered image back into the same tree: the same index.
    let index_of = |source: String, name: &str| {
        skiff_json(&store, &["convert", "--json", &source, name])["manifest"]["index"]["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let relayered = format!("oci:{}:rich-v1", tmp.path().join("out-16").display());
    assert_eq!(
        index_of(relayered, "rich:new"),
        index_of(sources[3].clone(), "rich:old")
    );
}

#[test]
fn a_corrupt_source_or_a_bad_output_leaves_the_output_as_it_was() {
    let tmp = tempdir();
    let sources = write_sources(&tmp.path().join("src"));
    let store = tmp.path().join("store");
    let out = tmp.path().join("out");

    // A layer with a flipped byte: the digest check refuses it.
    let broken = LayoutEditor::new(&tmp.path().join("src/worker"));
    let mut bytes = broken.layer_bytes(1);
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    broken.set_layer_bytes(1, &bytes);
    let failed = skiff(
        &store,
        &[
            "relayer",
            &sources[0],
            &sources[2],
            "--out",
            &format!("oci:{}", out.display()),
        ],
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("worker"), "{stderr}");
    assert!(!out.exists(), "the output was made");
    // Nor is a work directory left beside it.
    let left: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".skiff-relayer")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let not_layout = skiff(&store, &["relayer", &sources[0], "--out", "/tmp/x"]);
    assert!(!not_layout.status.success());
    assert!(String::from_utf8_lossy(&not_layout.stderr).contains("oci:DIR"));
    let zero = skiff(
        &store,
        &[
            "relayer",
            &sources[0],
            "--max-layers",
            "0",
            "--out",
            &format!("oci:{}", out.display()),
        ],
    );
    assert!(!zero.status.success());
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--max-layers"));
    // A layout that has the tag already keeps its image.
    let existing = tmp.path().join("existing");
    let existing_arg = format!("oci:{}", existing.display());
    skiff_ok(&store, &["relayer", &sources[0], "--out", &existing_arg]);
    let index_before = fs::read(existing.join("index.json")).unwrap();
    let again = skiff(&store, &["relayer", &sources[0], "--out", &existing_arg]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already has an image tagged v1"),
        "{stderr}"
    );
    assert_eq!(fs::read(existing.join("index.json")).unwrap(), index_before);
    // A directory that is neither empty nor a layout is refused as it is.
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("notes"), "mine").unwrap();
    let occupied = skiff(
        &store,
        &[
            "relayer",
            &sources[0],
            "--out",
            &format!("oci:{}", out.display()),
        ],
    );
    assert!(!occupied.status.success());
    assert_eq!(fs::read_dir(&out).unwrap().count(), 1);
}
