//! `skiff analyze` against an independent count (Python's tarfile and hashlib).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use skiff_tests::*;

/// Three images: two share a base layer and have almost equal upper
/// layers; the third repeats files of both in one plain-tar layer.
fn write_images(dir: &Path) -> Vec<String> {
    let shared = noise(150_000, 1);
    let base = Layer::new()
        .dir("etc", 0o755)
        .dir("usr", 0o755)
        .file("etc/hostname", 0o644, "box\n")
        .file("etc/empty", 0o644, "")
        .file("usr/lib.so", 0o755, shared.clone())
        .file("usr/readme", 0o644, text(40_000, 2))
        .symlink("usr/lib.so.1", "lib.so")
        .hardlink("usr/lib-again.so", "usr/lib.so");
    let upper = |version: u64| {
        Layer::new()
            .dir("app", 0o755)
            .file("app/main", 0o755, noise(200_000, 3))
            .file("app/helper", 0o755, noise(30_000, 4))
            .file("app/copy-of-lib.so", 0o644, shared.clone())
            .file("app/version", 0o644, format!("{version}\n"))
            .file("app/empty", 0o644, "")
            // The same content twice in one layer: two files, one content of the layer.
            .file("app/same-a", 0o644, text(5_000, 11))
            .file("app/same-b", 0o644, text(5_000, 11))
            .file(
                &format!("app/{}", "long-name-".repeat(15)),
                0o644,
                noise(3_000, 12),
            )
            .whiteout("etc", "hostname")
    };
    let mixed = Layer::new()
        .dir("opt", 0o755)
        .opaque("opt")
        .file("opt/main", 0o755, noise(200_000, 3))
        .file("opt/readme", 0o644, text(40_000, 2))
        .file("opt/lib.so", 0o644, shared.clone())
        .file("opt/own", 0o644, noise(10_000, 9));
    let images = [
        (
            "one",
            Image::new(vec![
                (base.clone(), Compression::Gzip),
                (upper(1), Compression::Gzip),
            ]),
        ),
        (
            "two",
            Image::new(vec![
                (base, Compression::Gzip),
                (upper(2), Compression::Gzip),
            ]),
        ),
        ("three", Image::new(vec![(mixed, Compression::None)])),
    ];
    images
        .iter()
        .map(|(name, image)| {
            let layout = dir.join(name);
            image.write_layout(&layout, "v1");
            format!("{}:v1", layout.display())
        })
        .collect()
}

fn python_count(specs: &[String]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("analyze_check.py");
    let out = Command::new("python3")
        .arg(script)
        .args(specs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "analyze_check.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn analyze_agrees_with_an_independent_count() {
    let tmp = tempdir();
    let specs = write_images(tmp.path());
    let plots = tmp.path().join("plots");
    let args: Vec<String> = ["analyze", "--json", "--similar", "0", "--top", "1000"]
        .iter()
        .map(|s| s.to_string())
        .chain(["--plots".to_owned(), plots.display().to_string()])
        .chain(specs.iter().map(|s| format!("oci:{s}")))
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let skiff = skiff_json(&tmp.path().join("unused-store"), &args);
    let python = python_count(&specs);

    assert_eq!(
        skiff["images"].as_array().unwrap().len() as u64,
        python["images"]
    );
    let layers = &skiff["layer_measures"];
    for key in [
        "references",
        "unique",
        "referenced_tar_bytes",
        "unique_tar_bytes",
        "unique_compressed_bytes",
    ] {
        assert_eq!(layers[key], python[key], "{key}");
    }
    // The base layer is shared: 5 references, 4 unique layers.
    assert_eq!(layers["references"], 5);
    assert_eq!(layers["unique"], 4);
    let files = &skiff["file_measures"];
    for key in [
        "files",
        "bytes",
        "distinct_contents",
        "distinct_bytes",
        "duplicates",
        "duplicate_bytes",
    ] {
        assert_eq!(files[key], python[key], "{key}");
    }
    assert!(files["duplicates"].as_u64().unwrap() >= 8, "{files}");
    assert_eq!(skiff["copies_histogram"], python["copies_histogram"]);
    assert_eq!(skiff["stored"]["file_level_raw"], python["distinct_bytes"]);

    let key = |d: &Value| {
        (
            d["sha256"].as_str().unwrap().to_owned(),
            d["copies"].as_u64().unwrap(),
            d["size"].as_u64().unwrap(),
            d["layers"].as_u64().unwrap(),
        )
    };
    // The same list in the same order (most copies, then the larger, then the first seen).
    let ours: Vec<_> = skiff["most_duplicated"]
        .as_array()
        .unwrap()
        .iter()
        .map(key)
        .collect();
    let theirs: Vec<_> = python["duplicated"]
        .as_array()
        .unwrap()
        .iter()
        .map(key)
        .collect();
    assert_eq!(ours, theirs);
    let paths = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        paths(&skiff["most_duplicated"]),
        paths(&python["duplicated"])
    );
    // Two files of one layer are two copies, in one layer.
    let same = ours.iter().find(|d| d.2 == 5_000 && d.1 == 4).unwrap();
    assert_eq!(same.3, 2, "same-a and same-b in both upper layers");

    let pair = |p: &Value| {
        (
            p["a"].as_u64().unwrap(),
            p["b"].as_u64().unwrap(),
            p["common_contents"].as_u64().unwrap(),
            p["similarity"].as_f64().unwrap(),
        )
    };
    let mut ours: Vec<_> = skiff["similar_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(pair)
        .collect();
    let mut theirs: Vec<_> = python["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(pair)
        .collect();
    ours.sort_by_key(|p| (p.0, p.1));
    theirs.sort_by_key(|p| (p.0, p.1));
    assert_eq!(ours.len(), theirs.len(), "{ours:?} against {theirs:?}");
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!((o.0, o.1, o.2), (t.0, t.1, t.2));
        assert!((o.3 - t.3).abs() < 1e-12, "{o:?} against {t:?}");
    }
    // The two upper layers differ in one small file: almost equal.
    let uppers = ours.iter().find(|p| (p.0, p.1) == (1, 2)).unwrap();
    assert!(uppers.3 > 0.6 && uppers.3 < 1.0, "{uppers:?}");

    // Chunk-level dedup stores no more than file-level, and a chunk once.
    let stored = &skiff["stored"];
    let chunk_raw = stored["chunk_level_raw"].as_u64().unwrap();
    assert!(chunk_raw > 0 && chunk_raw <= stored["file_level_raw"].as_u64().unwrap());
    assert!(stored["chunk_level_zstd"].as_u64().unwrap() < chunk_raw);
    assert_eq!(
        skiff["pull"]["with_layers"],
        python["unique_compressed_bytes"]
    );

    // The plots: SVG, a heatmap cell for every pair of the 4 unique layers,
    // a bar for each way of storing.
    let svg = |name: &str| std::fs::read_to_string(plots.join(name)).unwrap();
    for name in ["copies.svg", "similarity.svg", "storage.svg"] {
        assert!(svg(name).starts_with("<svg"), "{name}");
    }
    assert!(svg("similarity.svg").matches("<rect").count() >= 16);
    assert!(svg("similarity.svg").contains("one:v1"));
    assert!(svg("storage.svg").contains("skiff chunks, zstd frames"));
}

#[test]
fn analyze_refuses_a_corrupt_layer() {
    let tmp = tempdir();
    let specs = write_images(tmp.path());
    // Truncate the first image's upper layer blob.
    let layout = tmp.path().join("one");
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_owned();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(manifest_digest)).unwrap(),
    )
    .unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(&manifest["layers"][1]["digest"].as_str().unwrap()[7..]);
    let data = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &data[..data.len() / 2]).unwrap();

    let out = skiff(
        &tmp.path().join("unused-store"),
        &["analyze", &format!("oci:{}", specs[0])],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("analyzing the images"), "{stderr}");
    assert_eq!(
        stderr.matches("descriptor says").count(),
        1,
        "the blob's size, said once: {stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn analyze_of_images_in_a_store_agrees_with_analyze_of_their_layouts() {
    let tmp = tempdir();
    let specs = write_images(tmp.path());
    let store = tmp.path().join("store");
    let names = ["one:v1", "two:v1", "three:v1"];
    for (spec, name) in specs.iter().zip(names) {
        skiff_ok(&store, &["convert", &format!("oci:{spec}"), name]);
    }
    let run = |sources: Vec<String>| {
        // One thread: which layer frames a chunk shared by two first, and so
        // the zstd bytes of the frames, depends on the order layers are read.
        let mut args = vec![
            "analyze",
            "--json",
            "--similar",
            "0",
            "--top",
            "1000",
            "--threads",
            "1",
        ];
        args.extend(sources.iter().map(String::as_str));
        skiff_json(&store, &args)
    };
    let from_store = run(names.iter().map(|n| format!("store:{n}")).collect());
    let from_layouts = run(specs.iter().map(|s| format!("oci:{s}")).collect());
    // The records hold every file of every layer: all that files make is the same.
    for key in [
        "file_measures",
        "most_duplicated",
        "similar_layers",
        "similarity_matrix",
        "copies_histogram",
    ] {
        assert_eq!(from_store[key], from_layouts[key], "{key}");
    }
    for key in [
        "file_level_raw",
        "file_level_zstd",
        "chunk_level_chunks",
        "chunk_level_raw",
        "chunk_level_zstd",
    ] {
        assert_eq!(
            from_store["stored"][key], from_layouts["stored"][key],
            "{key}"
        );
    }
    let (s, o) = (
        &from_store["layer_measures"],
        &from_layouts["layer_measures"],
    );
    assert_eq!(s["references"], o["references"]);
    assert_eq!(s["unique"], o["unique"]);
    assert_eq!(s["recorded"], s["unique"]);
    assert_eq!(o["recorded"], 0);
    // The tars are gone: their bytes are reckoned from the entries, and
    // their gzip sizes are not known.
    let (reckoned, counted) = (
        s["unique_tar_bytes"].as_f64().unwrap(),
        o["unique_tar_bytes"].as_f64().unwrap(),
    );
    assert!(
        (reckoned / counted - 1.0).abs() < 0.02,
        "{reckoned} vs {counted}"
    );
    assert_eq!(s["unique_compressed_bytes"], 0);

    // An image the store does not hold is a clear error.
    let missing = skiff(&store, &["analyze", "store:nope:1"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope"));
}
