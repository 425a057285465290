//! Index bytes from a server, a registry or a store: decoding, validation,
//! and what a mount and an export do with an index that passed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_format::{ImageIndex, StartupProfile};

fuzz_target!(|data: &[u8]| {
    let Ok(index) = ImageIndex::decode(data) else {
        return;
    };
    let _ = index.link_counts();
    for (path, ino) in index.walk() {
        assert_eq!(index.lookup_path(&path), Some(ino));
    }
    let _ = index.logical_bytes();
    let _ = index.distinct_chunks();
    let profile = StartupProfile {
        ranges: index
            .walk()
            .into_iter()
            .take(64)
            .map(|(path, _)| skiff_format::ProfileRange {
                path: String::from_utf8_lossy(&path).into_owned(),
                first: 0,
                count: 2,
            })
            .collect(),
        ..StartupProfile::default()
    };
    let _ = profile.chunk_order(&index);
});
