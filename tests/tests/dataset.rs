//! Round trip of every image of the `tools/make-images` dataset: skiff
//! convert + export + umoci unpack against umoci unpack of the source.
//! Ignored by default (the dataset takes ten minutes to build); run with
//! `make roundtrip`.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use skiff_tests::*;

#[test]
#[ignore = "needs the tools/make-images dataset; run with `make roundtrip`"]
fn every_dataset_image_round_trips() {
    let dir = PathBuf::from(
        std::env::var("SKIFF_IMAGES_DIR").unwrap_or_else(|_| "/var/cache/skiff/images".into()),
    );
    let mut images: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (run tools/make-images)", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(".done").exists())
        .collect();
    images.sort();
    assert!(!images.is_empty(), "no images in {}", dir.display());
    let tmp = tempdir();
    let store = tmp.path().join("store");
    let mut failures = Vec::new();
    for image in &images {
        let name = image.file_name().unwrap().to_str().unwrap();
        skiff_ok(
            &store,
            &["convert", &format!("oci:{}:latest", image.display()), name],
        );
        let out = tmp.path().join(format!("out-{name}"));
        skiff_ok(
            &store,
            &["export", name, &format!("oci:{}:latest", out.display())],
        );
        let expected = umoci_unpack(image, "latest", &tmp.path().join(format!("src-{name}")));
        let actual = umoci_unpack(&out, "latest", &tmp.path().join(format!("exp-{name}")));
        let diffs = diff_trees(&expected, &actual, true);
        eprintln!("{name}: {} differences", diffs.len());
        if !diffs.is_empty() {
            failures.push(format!(
                "{name}:\n  {}",
                diffs
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ));
        }
        for dir in [
            out,
            expected.parent().unwrap().to_owned(),
            actual.parent().unwrap().to_owned(),
        ] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
    assert!(skiff_ok(&store, &["fsck"]).contains("store is consistent"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
