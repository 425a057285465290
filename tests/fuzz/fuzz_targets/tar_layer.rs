//! A layer tar as `convert` reads it: extension headers, paths, links,
//! whiteouts, the merge of two layers and the index built from them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = skiff_oci::fuzzing::read_layers(data) {
        // What convert writes must be an index every reader accepts.
        index.validate().expect("convert built an invalid index");
        let bytes = index.encode();
        let decoded = skiff_format::ImageIndex::decode(&bytes).expect("an encoded index decodes");
        assert_eq!(decoded, index);
    }
});
