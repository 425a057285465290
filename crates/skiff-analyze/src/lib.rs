//! The redundancy study of Docker Hub ("Large-scale analysis of the Docker
//! Hub dataset", Zhao et al., and "Carving Perfect Layers"), run on an
//! operator's own images: how much layers share by digest, how much their
//! files share beyond that, which layers are almost equal, and what
//! layer-level, file-level and skiff's chunk-level deduplication store and
//! transfer for the set.
//!
//! Definitions (each measure, so that an independent count can check it):
//! - a layer is identified by its diff_id (the sha256 of its uncompressed
//!   tar); *layer references* are every image's layers, *unique layers* the
//!   distinct diff_ids; a unique layer's compressed size is its blob's.
//! - *files* are the regular-file entries of the unique layers' tars
//!   (whiteouts are not files; hard links, symlinks and directories are
//!   not), each identified by the sha256 of its contents; a file is a
//!   *duplicate* if an earlier file (in image, layer, tar order) had the
//!   same contents, so `duplicates = files - distinct contents`.
//! - the *similarity* of two unique layers is the Jaccard index of their
//!   sets of distinct non-empty file contents: |A ∩ B| / |A ∪ B| (a content
//!   held by more than [`PAIRED_AT_MOST`] layers is left out).
//! - *file-level dedup* stores each distinct content once (raw bytes, and
//!   each compressed alone with zstd); *chunk-level dedup* (skiff) stores
//!   each distinct FastCDC chunk once, raw and in zstd frames of about 1 MiB
//!   as `skiff convert` makes them (the frames' composition depends on which
//!   layer reached a chunk first, so this figure varies by a fraction of a
//!   percent between runs; every other figure is exact).

mod plots;
mod scan;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use skiff_chunk::Chunker;
use skiff_oci::{ImageSource, OciError, Platform};
use thiserror::Error;

pub use plots::{write_plots, PlotError};
use scan::{scan_layer, ChunkLedger};
pub use scan::{FileFacts, LayerFacts};

#[derive(Debug, Error)]
pub enum AnalyzeError {
    #[error("{image}")]
    Image {
        image: String,
        #[source]
        source: Box<OciError>,
    },
    #[error("layer {diff_id} of {image}")]
    Layer {
        image: String,
        diff_id: String,
        #[source]
        source: Box<OciError>,
    },
}

/// How to analyze.
#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    pub platform: Platform,
    /// Worker threads reading layers (0: one per core).
    pub threads: usize,
    /// How many of the most duplicated files to list.
    pub top_files: usize,
    /// Layer pairs at least this similar are listed as almost equal.
    pub similar_at_least: f64,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            platform: Platform::host(),
            threads: 0,
            top_files: 10,
            similar_at_least: 0.5,
        }
    }
}

/// Told as layers are read.
pub trait AnalyzeProgress: Sync {
    fn start(&self, _layers: usize, _compressed_bytes: u64) {}
    fn layer_done(&self, _compressed_bytes: u64) {}
}

impl AnalyzeProgress for () {}

/// One image of the set.
#[derive(Clone, Debug, Serialize)]
pub struct ImageSummary {
    pub name: String,
    pub manifest_digest: String,
    pub layers: Vec<String>,
}

/// One unique layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    pub diff_id: String,
    /// Images (by position in `images`) that reference it.
    pub images: Vec<usize>,
    pub compressed_bytes: u64,
    pub tar_bytes: u64,
    pub files: u64,
    pub file_bytes: u64,
    /// Distinct non-empty contents: the set its similarity is computed on.
    pub distinct_contents: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerMeasures {
    pub references: u64,
    pub unique: u64,
    /// Uncompressed tar bytes of every reference.
    pub referenced_tar_bytes: u64,
    pub unique_tar_bytes: u64,
    pub unique_compressed_bytes: u64,
    /// Unique layers read from a skiff store (`store:NAME:TAG`), as their
    /// conversion recorded them: their tar bytes are reckoned from their
    /// entries and their compressed bytes are not known (counted as 0).
    pub recorded: u64,
    /// referenced / unique tar bytes: what sharing layers by digest saves.
    pub dedup_ratio: f64,
    /// Unique tar bytes / their compressed blobs.
    pub compression_ratio: f64,
    /// Both: referenced tar bytes / unique compressed bytes.
    pub combined_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileMeasures {
    pub files: u64,
    pub bytes: u64,
    pub distinct_contents: u64,
    pub distinct_bytes: u64,
    pub duplicates: u64,
    pub duplicate_bytes: u64,
    /// duplicates / files
    pub duplicate_share_by_count: f64,
    /// duplicate bytes / bytes
    pub duplicate_share_by_bytes: f64,
}

/// A content held by many files.
#[derive(Clone, Debug, Serialize)]
pub struct DuplicatedFile {
    pub sha256: String,
    pub size: u64,
    pub copies: u64,
    /// Unique layers holding it.
    pub layers: u64,
    /// Where it was first seen.
    pub path: String,
}

/// Two unique layers and what they share.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPair {
    pub a: usize,
    pub b: usize,
    pub common_contents: u64,
    pub similarity: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Stored {
    /// The unique layers' blobs, as a registry holds them.
    pub layers_compressed: u64,
    pub file_level_raw: u64,
    pub file_level_zstd: u64,
    pub chunk_level_chunks: u64,
    pub chunk_level_raw: u64,
    pub chunk_level_zstd: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PullBytes {
    /// Each unique layer's blob once.
    pub with_layers: u64,
    /// Each distinct chunk once, in frames (indexes not counted).
    pub with_skiff: u64,
}

/// Everything `skiff analyze` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub images: Vec<ImageSummary>,
    pub layers: Vec<LayerSummary>,
    pub layer_measures: LayerMeasures,
    pub file_measures: FileMeasures,
    pub most_duplicated: Vec<DuplicatedFile>,
    /// Pairs of unique layers at least `similar_at_least` alike, most alike first.
    pub similar_layers: Vec<LayerPair>,
    /// Jaccard similarity of every pair of unique layers (row by row), for
    /// the heatmap; left out for sets of more than [`MATRIX_AT_MOST`] layers.
    pub similarity_matrix: Option<Vec<Vec<f64>>>,
    /// How many distinct contents occur in exactly N files, by N.
    pub copies_histogram: BTreeMap<u64, u64>,
    pub stored: Stored,
    pub pull: PullBytes,
}

/// The similarity matrix and heatmap are drawn for at most this many unique layers.
pub const MATRIX_AT_MOST: usize = 256;
/// A content in more layers than this (a license file, a trigger file)
/// says nothing about which layers are alike, and would cost layers² pairs:
/// it is left out of the similarity.
pub const PAIRED_AT_MOST: usize = 1000;

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Reads every unique layer of `sources` (named as the user wrote them) once, on
/// `options.threads` threads, and computes the measures.
pub fn analyze(
    sources: &[(String, ImageSource)],
    options: &AnalyzeOptions,
    progress: &dyn AnalyzeProgress,
) -> Result<Analysis, AnalyzeError> {
    let mut images = Vec::new();
    // Unique layers in first-reference order: (image, layer descriptor).
    let mut unique: Vec<(usize, skiff_oci::LayerDescriptor)> = Vec::new();
    let mut by_diff_id: HashMap<String, usize> = HashMap::new();
    let mut referenced_by: Vec<Vec<usize>> = Vec::new();
    for (at, (name, source)) in sources.iter().enumerate() {
        let resolved = source
            .resolve(&options.platform)
            .map_err(|source| AnalyzeError::Image {
                image: name.clone(),
                source: Box::new(source),
            })?;
        for layer in &resolved.layers {
            let slot = *by_diff_id.entry(layer.diff_id.clone()).or_insert_with(|| {
                unique.push((at, layer.clone()));
                referenced_by.push(Vec::new());
                unique.len() - 1
            });
            referenced_by[slot].push(at);
        }
        images.push(ImageSummary {
            name: name.clone(),
            manifest_digest: resolved.manifest_digest,
            layers: resolved.layers.iter().map(|l| l.diff_id.clone()).collect(),
        });
    }
    progress.start(unique.len(), unique.iter().map(|(_, l)| l.size).sum());

    let chunker = Chunker::new(Default::default());
    let ledger = ChunkLedger::default();
    let facts: Mutex<Vec<Option<LayerFacts>>> =
        Mutex::new((0..unique.len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<AnalyzeError>> = Mutex::new(None);
    let cancel = AtomicBool::new(false);
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    }
    .min(unique.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                if cancel.load(Ordering::Relaxed) {
                    return;
                }
                let at = next.fetch_add(1, Ordering::Relaxed);
                let Some((image, layer)) = unique.get(at) else {
                    return;
                };
                let (name, source) = &sources[*image];
                match scan_layer(source, layer, at, &chunker, &ledger, &cancel) {
                    Ok(read) => {
                        facts.lock().expect("facts poisoned")[at] = Some(read);
                        progress.layer_done(layer.size);
                    }
                    Err(source) => {
                        // Told before the others are stopped, so their
                        // Interrupted never takes the place of the cause.
                        failed.lock().expect("failure poisoned").get_or_insert(
                            AnalyzeError::Layer {
                                image: name.clone(),
                                diff_id: layer.diff_id.clone(),
                                source: Box::new(source),
                            },
                        );
                        cancel.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("failure poisoned") {
        return Err(e);
    }
    let facts: Vec<LayerFacts> = facts
        .into_inner()
        .expect("facts poisoned")
        .into_iter()
        .map(|f| f.expect("every layer was read"))
        .collect();
    Ok(measure(
        images,
        &unique,
        referenced_by,
        &facts,
        ledger.totals(),
        options,
    ))
}

/// What one distinct content is, and where it was seen.
struct Content {
    sha256: [u8; 32],
    size: u64,
    zstd: u64,
    copies: u64,
    layers: Vec<usize>,
    first_path: (usize, usize),
}

fn measure(
    images: Vec<ImageSummary>,
    unique: &[(usize, skiff_oci::LayerDescriptor)],
    mut referenced_by: Vec<Vec<usize>>,
    facts: &[LayerFacts],
    chunks: scan::ChunkTotals,
    options: &AnalyzeOptions,
) -> Analysis {
    // Contents in first-seen order (layers in first-reference order, files in tar order).
    let mut contents: Vec<Content> = Vec::new();
    let mut by_digest: HashMap<[u8; 32], usize> = HashMap::new();
    let mut layers = Vec::with_capacity(facts.len());
    for (at, layer) in facts.iter().enumerate() {
        for (file, (_, f)) in layer.files.iter().enumerate() {
            let slot = *by_digest.entry(f.sha256).or_insert_with(|| {
                contents.push(Content {
                    sha256: f.sha256,
                    size: f.size,
                    zstd: f.zstd,
                    copies: 0,
                    layers: Vec::new(),
                    first_path: (at, file),
                });
                contents.len() - 1
            });
            let content = &mut contents[slot];
            content.copies += 1;
            if content.layers.last() != Some(&at) {
                content.layers.push(at);
            }
        }
        let (_, desc) = &unique[at];
        layers.push(LayerSummary {
            diff_id: desc.diff_id.clone(),
            images: std::mem::take(&mut referenced_by[at]),
            compressed_bytes: desc.size,
            tar_bytes: layer.tar_bytes,
            files: layer.files.len() as u64,
            file_bytes: layer.files.iter().map(|(_, f)| f.size).sum(),
            distinct_contents: 0, // counted below, once every layer is in
        });
    }
    // What the similarity compares: non-empty contents in at most PAIRED_AT_MOST layers.
    let compared = |c: &&Content| c.size > 0 && c.layers.len() <= PAIRED_AT_MOST;
    for c in contents.iter().filter(compared) {
        for &at in &c.layers {
            layers[at].distinct_contents += 1;
        }
    }

    let referenced_tar_bytes: u64 = layers
        .iter()
        .map(|l| l.tar_bytes * l.images.len() as u64)
        .sum();
    let unique_tar_bytes: u64 = layers.iter().map(|l| l.tar_bytes).sum();
    let unique_compressed_bytes: u64 = layers.iter().map(|l| l.compressed_bytes).sum();
    let layer_measures = LayerMeasures {
        references: images.iter().map(|i| i.layers.len() as u64).sum(),
        unique: layers.len() as u64,
        referenced_tar_bytes,
        unique_tar_bytes,
        unique_compressed_bytes,
        recorded: facts.iter().filter(|f| f.tar_bytes_estimated).count() as u64,
        dedup_ratio: ratio(referenced_tar_bytes, unique_tar_bytes),
        compression_ratio: ratio(unique_tar_bytes, unique_compressed_bytes),
        combined_ratio: ratio(referenced_tar_bytes, unique_compressed_bytes),
    };

    let files: u64 = layers.iter().map(|l| l.files).sum();
    let bytes: u64 = layers.iter().map(|l| l.file_bytes).sum();
    let distinct_bytes: u64 = contents.iter().map(|c| c.size).sum();
    let file_measures = FileMeasures {
        files,
        bytes,
        distinct_contents: contents.len() as u64,
        distinct_bytes,
        duplicates: files - contents.len() as u64,
        duplicate_bytes: bytes - distinct_bytes,
        duplicate_share_by_count: ratio(files - contents.len() as u64, files),
        duplicate_share_by_bytes: ratio(bytes - distinct_bytes, bytes),
    };

    let mut ranked: Vec<(usize, &Content)> = contents
        .iter()
        .enumerate()
        .filter(|(_, c)| c.copies > 1)
        .collect();
    // Most copies first; then the larger; then first seen.
    ranked.sort_by(|(a_at, a), (b_at, b)| {
        b.copies
            .cmp(&a.copies)
            .then(b.size.cmp(&a.size))
            .then(a_at.cmp(b_at))
    });
    let most_duplicated = ranked
        .iter()
        .take(options.top_files)
        .map(|(_, c)| {
            let (layer, file) = c.first_path;
            DuplicatedFile {
                sha256: hex::encode(c.sha256),
                size: c.size,
                copies: c.copies,
                layers: c.layers.len() as u64,
                path: String::from_utf8_lossy(&facts[layer].files[file].0).into_owned(),
            }
        })
        .collect();

    let mut copies_histogram = BTreeMap::new();
    for c in &contents {
        *copies_histogram.entry(c.copies).or_insert(0) += 1;
    }

    // Pairs that share anything, by an inverted index: work grows with
    // (layers holding a content)², not with every pair of layers.
    let mut common: HashMap<(usize, usize), u64> = HashMap::new();
    for c in contents.iter().filter(compared) {
        for (i, &a) in c.layers.iter().enumerate() {
            for &b in &c.layers[i + 1..] {
                *common.entry((a, b)).or_insert(0) += 1;
            }
        }
    }
    let n = layers.len();
    let mut matrix = (n <= MATRIX_AT_MOST).then(|| vec![vec![0.0; n]; n]);
    let mut similar_layers = Vec::new();
    for (a, row) in matrix.iter_mut().flatten().enumerate() {
        row[a] = if layers[a].distinct_contents == 0 {
            0.0
        } else {
            1.0
        };
    }
    let mut pairs: Vec<_> = common.into_iter().collect();
    pairs.sort_unstable();
    for ((a, b), shared) in pairs {
        let union = layers[a].distinct_contents + layers[b].distinct_contents - shared;
        let similarity = ratio(shared, union);
        if let Some(matrix) = &mut matrix {
            matrix[a][b] = similarity;
            matrix[b][a] = similarity;
        }
        if similarity >= options.similar_at_least {
            similar_layers.push(LayerPair {
                a,
                b,
                common_contents: shared,
                similarity,
            });
        }
    }
    similar_layers.sort_by(|x, y| {
        y.similarity
            .total_cmp(&x.similarity)
            .then((x.a, x.b).cmp(&(y.a, y.b)))
    });

    let stored = Stored {
        layers_compressed: unique_compressed_bytes,
        file_level_raw: distinct_bytes,
        file_level_zstd: contents.iter().map(|c| c.zstd).sum(),
        chunk_level_chunks: chunks.chunks,
        chunk_level_raw: chunks.raw,
        chunk_level_zstd: chunks.zstd,
    };
    let pull = PullBytes {
        with_layers: unique_compressed_bytes,
        with_skiff: chunks.zstd,
    };
    Analysis {
        images,
        layers,
        layer_measures,
        file_measures,
        most_duplicated,
        similar_layers,
        similarity_matrix: matrix,
        copies_histogram,
        stored,
        pull,
    }
}
