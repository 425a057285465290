//! convert → export → umoci unpack, compared with umoci unpack of the source.
#![allow(clippy::unwrap_used)]

use skiff_tests::*;

#[test]
fn round_trip_matches_umoci_unpack_of_the_source() {
    let tmp = tempdir();
    let (src, store, out) = (
        tmp.path().join("src"),
        tmp.path().join("store"),
        tmp.path().join("out"),
    );
    rich_image().write_layout(&src, "v1");

    let printed = skiff_ok(
        &store,
        &["convert", &format!("oci:{}:v1", src.display()), "rich:v1"],
    );
    assert!(printed.contains("converted rich:v1"), "{printed}");
    skiff_ok(
        &store,
        &[
            "export",
            "rich:v1",
            &format!("oci:{}:exported", out.display()),
        ],
    );

    let expected = umoci_unpack(&src, "v1", &tmp.path().join("unpack-src"));
    let actual = umoci_unpack(&out, "exported", &tmp.path().join("unpack-out"));
    let diffs = diff_trees(&expected, &actual, true);
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));

    // The merge rules really were exercised.
    assert!(!expected.join("etc/removed").exists());
    assert!(!expected.join("opaque/old").exists() && !expected.join("opaque/sub/old").exists());
    assert!(expected.join("opaque/new").exists());
    assert!(!expected.join("bin/tool-alias").exists());
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(actual.join(p)).unwrap().ino();
    assert_eq!(ino("bin/tool"), ino("etc/tool-link"));
    assert_eq!(
        xattr::get(actual.join("usr/bin/ping"), "security.capability").unwrap(),
        Some(caps())
    );
}

#[test]
fn same_image_gives_same_index_from_layout_and_docker_archive() {
    let tmp = tempdir();
    let image = rich_image();
    let (src, archive) = (tmp.path().join("src"), tmp.path().join("image.tar"));
    image.write_layout(&src, "v1");
    image.write_docker_archive(&archive, "rich:v1");

    let digest_of = |store: &std::path::Path, source: String| {
        let report = skiff_json(store, &["convert", "--json", &source, "rich:v1"]);
        report["manifest"]["index"]["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let a = digest_of(&tmp.path().join("s1"), format!("oci:{}:v1", src.display()));
    let b = digest_of(&tmp.path().join("s2"), format!("oci:{}:v1", src.display()));
    let c = digest_of(
        &tmp.path().join("s3"),
        format!("docker-archive:{}", archive.display()),
    );
    assert_eq!(a, b, "converting twice must give the same index");
    assert_eq!(
        a, c,
        "the same layers from a docker archive must give the same index"
    );

    // zstd and uncompressed layers: same tree, same index.
    let mut recompressed = image.clone();
    let kinds = [Compression::Zstd, Compression::None, Compression::Zstd];
    for ((_, c), kind) in recompressed.layers.iter_mut().zip(kinds) {
        *c = kind;
    }
    let zstd_src = tmp.path().join("zstd-src");
    recompressed.write_layout(&zstd_src, "v1");
    let d = digest_of(
        &tmp.path().join("s4"),
        format!("oci:{}:v1", zstd_src.display()),
    );
    assert_eq!(a, d, "layer compression must not change the index");
}

#[test]
fn images_stats_fsck_rm_and_gc() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let shared = noise(2_000_000, 11);
    let one = Image::new(vec![(
        Layer::new()
            .file("a", 0o644, shared.clone())
            .file("only-one", 0o644, noise(500_000, 12)),
        Compression::Gzip,
    )]);
    // Built independently: same big file under another name, in a different layer order.
    let two = Image::new(vec![
        (Layer::new().file("x", 0o644, "small"), Compression::Gzip),
        (
            Layer::new().file("renamed/a", 0o644, shared),
            Compression::Gzip,
        ),
    ]);
    one.write_layout(&tmp.path().join("one"), "latest");
    two.write_layout(&tmp.path().join("two"), "latest");
    skiff_ok(
        &store,
        &[
            "convert",
            &format!("oci:{}", tmp.path().join("one").display()),
            "one",
        ],
    );
    let after_one = skiff_json(&store, &["stats", "--json"]);
    skiff_ok(
        &store,
        &[
            "convert",
            &format!("oci:{}", tmp.path().join("two").display()),
            "two:1",
        ],
    );
    let after_two = skiff_json(&store, &["stats", "--json"]);

    // The shared 2 MB file is stored once: the second image adds only "small".
    let added =
        after_two["chunk_bytes"].as_u64().unwrap() - after_one["chunk_bytes"].as_u64().unwrap();
    assert_eq!(added, 5, "second image added {added} chunk bytes");
    assert_eq!(
        after_two["logical_bytes"].as_u64().unwrap(),
        2 * 2_000_000 + 500_000 + 5
    );
    assert!(after_two["dedup_ratio"].as_f64().unwrap() > 1.7);

    let images = skiff_json(&store, &["images", "--json"]);
    let names: Vec<String> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i["name"].as_str().unwrap(),
                i["tag"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["one:latest", "two:1"]);
    let listing = skiff_ok(&store, &["images"]);
    assert!(
        listing.contains("two:1") && listing.contains("FILES"),
        "{listing}"
    );

    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));

    skiff_ok(&store, &["rmi", "one"]);
    let gc = skiff_json(&store, &["gc", "--json"]);
    assert!(gc["chunks_removed"].as_u64().unwrap() > 0);
    assert!(gc["bytes_after"].as_u64().unwrap() < gc["bytes_before"].as_u64().unwrap());
    let after_gc = skiff_json(&store, &["stats", "--json"]);
    assert_eq!(after_gc["chunk_bytes"].as_u64().unwrap(), 2_000_000 + 5);
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));
    // What is left still exports byte for byte.
    let out = tmp.path().join("out");
    skiff_ok(
        &store,
        &["export", "two:1", &format!("oci:{}:t", out.display())],
    );
    let a = umoci_unpack(&tmp.path().join("two"), "latest", &tmp.path().join("u1"));
    let b = umoci_unpack(&out, "t", &tmp.path().join("u2"));
    assert!(diff_trees(&a, &b, true).is_empty());

    let missing = skiff(&store, &["rmi", "nope:1"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
}

#[test]
fn fsck_finds_a_corrupted_pack() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    Image::new(vec![(
        Layer::new().file("f", 0o644, text(300_000, 5)),
        Compression::Gzip,
    )])
    .write_layout(&tmp.path().join("src"), "latest");
    skiff_ok(
        &store,
        &[
            "convert",
            &format!("oci:{}", tmp.path().join("src").display()),
            "img",
        ],
    );
    let pack = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&pack).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&pack, bytes).unwrap();
    let out = skiff(&store, &["fsck"]);
    assert!(!out.status.success(), "fsck passed a corrupted pack");
    assert!(String::from_utf8_lossy(&out.stdout).contains("problem:"));
}

#[test]
fn multi_platform_index_picks_the_requested_platform() {
    let tmp = tempdir();
    let src = tmp.path().join("src");
    let (amd64, arm64) = (image_for_arch("amd64"), image_for_arch("arm64"));
    write_multi_platform_layout(
        &src,
        "multi",
        &[("linux/amd64", &amd64), ("linux/arm64", &arm64)],
    );
    let store = tmp.path().join("store");
    let source = format!("oci:{}:multi", src.display());

    let arch_of = |name: &str| {
        let out = tmp.path().join(format!("out-{name}"));
        skiff_ok(
            &store,
            &["export", name, &format!("oci:{}:x", out.display())],
        );
        let root = umoci_unpack(&out, "x", &tmp.path().join(format!("u-{name}")));
        std::fs::read_to_string(root.join("arch")).unwrap()
    };
    skiff_ok(
        &store,
        &["convert", "--platform", "linux/arm64", &source, "arm"],
    );
    assert_eq!(arch_of("arm"), "arm64");
    skiff_ok(&store, &["convert", &source, "host"]);
    assert_eq!(arch_of("host"), host_arch());

    let out = skiff(
        &store,
        &["convert", "--platform", "linux/s390x", &source, "none"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no image for platform linux/s390x") && stderr.contains("linux/arm64"),
        "{stderr}"
    );
}

#[test]
fn a_layout_with_several_images_needs_a_tag() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let src = tmp.path().join("src");
    Image::new(vec![(
        Layer::new().file("f", 0o644, "one"),
        Compression::Gzip,
    )])
    .write_layout(&src, "latest");
    skiff_ok(
        &store,
        &["convert", &format!("oci:{}", src.display()), "one"],
    );
    // Two tags in one layout: export adds to an existing layout.
    let shared = tmp.path().join("shared");
    skiff_ok(
        &store,
        &["export", "one", &format!("oci:{}:a", shared.display())],
    );
    skiff_ok(
        &store,
        &["export", "one", &format!("oci:{}:b", shared.display())],
    );

    let out = skiff(
        &store,
        &["convert", &format!("oci:{}", shared.display()), "x"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("several images") && stderr.contains("a, b"),
        "{stderr}"
    );
    let out = skiff(
        &store,
        &["convert", &format!("oci:{}:c", shared.display()), "x"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no image tagged \"c\""),
        "{stderr}"
    );
    skiff_ok(
        &store,
        &["convert", &format!("oci:{}:b", shared.display()), "x"],
    );
    let images = skiff_json(&store, &["images", "--json"]);
    assert_eq!(
        images[0]["index"], images[1]["index"],
        "export and re-convert must keep the index"
    );
}

#[test]
fn layers_converted_before_are_not_read_again_until_gc_frees_them() {
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let src = tmp.path().join("src");
    let base = Layer::new()
        .file("usr/lib/libbig.so", 0o755, noise(800_000, 21))
        .file("etc/a", 0o644, "a");
    let top = Layer::new()
        .whiteout("etc", "a")
        .file("app", 0o755, noise(100_000, 22));
    Image::new(vec![(base, Compression::Gzip), (top, Compression::Gzip)]).write_layout(&src, "v1");
    let source = format!("oci:{}:v1", src.display());
    let first = skiff_json(&store, &["convert", "--json", &source, "one"]);
    assert_eq!(first["cached_layers"], 0);

    // Break the base layer's blob: a second image sharing it does not read it.
    let blob = LayoutEditor::new(&src).layer_path(0);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let second = skiff_json(&store, &["convert", "--json", &source, "two"]);
    assert_eq!(second["cached_layers"], 2);
    assert_eq!(second["new_chunks"], 0);
    assert_eq!(first["manifest"]["index"], second["manifest"]["index"]);
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));

    // The record outlives gc while an image made from the layer exists, and
    // keeps the chunk of `etc/a` (whited out above it) alive with it.
    skiff_ok(&store, &["rmi", "two"]);
    let gc = skiff_json(&store, &["gc", "--json"]);
    assert_eq!(gc["layers_removed"], 0);
    assert_eq!(
        skiff_json(&store, &["convert", "--json", &source, "again"])["cached_layers"],
        2
    );
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));

    // Once no image uses the layers, gc drops the records and their chunks.
    skiff_ok(&store, &["rmi", "one"]);
    skiff_ok(&store, &["rmi", "again"]);
    let gc = skiff_json(&store, &["gc", "--json"]);
    assert_eq!(gc["layers_removed"], 2);
    assert_eq!(skiff_json(&store, &["stats", "--json"])["chunks"], 0);
    let out = skiff(&store, &["convert", &source, "three"]);
    assert!(
        !out.status.success(),
        "the broken blob was not read after gc"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match its digest"));
}
