//! JSON a peer sends: manifests (with their startup profiles), image
//! references, and skiff's chunk tables in registry artifacts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_format::{ImageManifest, ImageRef};

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = ImageManifest::from_json(data) {
        let again = ImageManifest::from_json(&manifest.to_json()).expect("a manifest round-trips");
        assert_eq!(again.name, manifest.name);
        if let Some(profile) = &manifest.profile {
            let _ = profile.summary();
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(image) = text.parse::<ImageRef>() {
            let _ = image.key();
        }
    }
    let _ = skiff_format::artifact::ChunkTable::decode(data, 4, &[]);
});
