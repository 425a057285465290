use std::io::Read;
use std::ops::Range;

use fastcdc::v2020::{FastCDC, Normalization, StreamCDC};
use skiff_format::ChunkingParams;

/// Cuts byte streams into content-defined chunks with FastCDC 2020
/// (normalisation level 1, the crate's default gear table).
///
/// ```
/// use skiff_chunk::Chunker;
/// let chunker = Chunker::new(Default::default());
/// let data = vec![7u8; 300 * 1024];
/// let total: usize = chunker.cut(&data).map(|r| r.len()).sum();
/// assert_eq!(total, data.len());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Chunker {
    params: ChunkingParams,
}

impl Chunker {
    pub fn new(params: ChunkingParams) -> Self {
        Chunker { params }
    }

    pub fn params(&self) -> ChunkingParams {
        self.params
    }

    /// Chunk boundaries of an in-memory buffer, as byte ranges.
    pub fn cut<'a>(&self, data: &'a [u8]) -> impl Iterator<Item = Range<usize>> + 'a {
        let p = self.params;
        FastCDC::with_level(
            data,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            Normalization::Level1,
        )
        .map(|c| c.offset..c.offset + c.length)
    }

    /// Chunks of a stream too large to hold in memory; the cut points equal
    /// those of [`Chunker::cut`] on the same bytes.
    pub fn cut_stream<R: Read>(&self, source: R) -> impl Iterator<Item = std::io::Result<Vec<u8>>> {
        let p = self.params;
        StreamCDC::with_level(
            source,
            p.min_size as usize,
            p.avg_size as usize,
            p.max_size as usize,
            Normalization::Level1,
        )
        .map(|r| {
            r.map(|c| c.data).map_err(|e| match e {
                fastcdc::v2020::Error::IoError(io) => io,
                other => std::io::Error::other(other.to_string()),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic pseudo-random bytes (xorshift), so golden values need no fixture file.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    /// Golden cut points at the default 16/64/256 KiB. If a dependency update
    /// changes these, every existing store's dedup breaks: do not "fix" the
    /// numbers, pin the old chunker.
    #[test]
    fn golden_cut_points_default_params() {
        let data = noise(1 << 20, 0x5eed);
        let lengths: Vec<usize> = Chunker::new(ChunkingParams::default())
            .cut(&data)
            .map(|r| r.len())
            .collect();
        assert_eq!(lengths, GOLDEN_DEFAULT);
    }

    #[test]
    fn golden_cut_points_small_params() {
        let params = ChunkingParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        };
        let data = noise(64 * 1024, 42);
        let lengths: Vec<usize> = Chunker::new(params).cut(&data).map(|r| r.len()).collect();
        assert_eq!(lengths, GOLDEN_SMALL);
    }

    const GOLDEN_DEFAULT: &[usize] = &[
        80324, 98978, 93729, 136093, 66542, 193684, 65644, 29048, 85043, 118204, 70644, 10643,
    ];
    const GOLDEN_SMALL: &[usize] = &[
        1109, 9241, 2077, 4684, 4023, 5396, 1216, 4823, 6493, 1124, 4495, 6059, 3354, 5163, 5078,
        1201,
    ];

    #[test]
    fn dedups_shifted_content() {
        // Content-defined: inserting bytes at the front changes only the first chunks.
        let chunker = Chunker::new(ChunkingParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        });
        let data = noise(256 * 1024, 7);
        let mut shifted = b"a small prefix".to_vec();
        shifted.extend_from_slice(&data);
        let ids = |d: &[u8]| -> std::collections::HashSet<[u8; 32]> {
            chunker
                .cut(d)
                .map(|r| *blake3::hash(&d[r]).as_bytes())
                .collect()
        };
        let (a, b) = (ids(&data), ids(&shifted));
        assert!(
            a.intersection(&b).count() + 2 >= a.len(),
            "shift broke more than the first chunks"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn stream_and_slice_cut_alike(len in 0usize..600_000, seed in 1u64..u64::MAX) {
            let chunker = Chunker::new(ChunkingParams { min_size: 2048, avg_size: 8192, max_size: 32768 });
            let data = noise(len, seed);
            let from_slice: Vec<Vec<u8>> = chunker.cut(&data).map(|r| data[r].to_vec()).collect();
            let from_stream: Vec<Vec<u8>> = chunker.cut_stream(&data[..]).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(from_slice.concat(), data.clone());
            prop_assert_eq!(from_slice, from_stream);
        }
    }
}
