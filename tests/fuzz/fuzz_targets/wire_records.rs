//! Bodies of the chunk API: id lists and chunk record streams.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff_format::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(ids) = wire::decode_ids(data) {
        assert_eq!(wire::encode_ids(&ids), data);
    }
    let mut reader = wire::RecordReader::new(data);
    while let Ok(Some(record)) = reader.next_record() {
        let _ = record.id();
    }
});
