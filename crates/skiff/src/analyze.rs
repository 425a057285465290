//! `skiff analyze`: the redundancy study on the user's images, as a table or JSON.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use skiff_analyze::{analyze, write_plots, Analysis, AnalyzeOptions, AnalyzeProgress};
use skiff_format::ImageRef;
use skiff_oci::{ImageSource, Platform};
use skiff_store::Store;

use crate::progress::{bytes, bytes_bar};

#[derive(clap::Args)]
pub struct AnalyzeArgs {
    /// Images to analyze together: oci:DIR[:TAG], docker-archive:FILE[:NAME:TAG],
    /// docker://REF, or store:NAME:TAG (an image of the store, --store: its
    /// layers as their conversion recorded them; their gzip sizes are not known)
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<String>,
    /// Platform to pick from a multi-platform index, os/arch[/variant] [default: the host's]
    #[arg(long)]
    platform: Option<String>,
    /// Threads reading layers [default: one per core]
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// How many of the most duplicated files to list
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// List pairs of layers whose files are at least this alike (Jaccard index of their contents, 0 to 1)
    #[arg(long, default_value_t = 0.5, value_name = "SHARE")]
    similar: f64,
    /// Print the whole analysis as JSON
    #[arg(long)]
    json: bool,
    /// Also draw plots into DIR: copies.svg (how many copies file contents have), similarity.svg (a heatmap of how alike the layers are), storage.svg (bytes by way of storing)
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
}

struct Bar(ProgressBar);

impl AnalyzeProgress for Bar {
    fn start(&self, layers: usize, compressed_bytes: u64) {
        self.0.set_length(compressed_bytes);
        self.0.set_message(format!("{layers} unique layers"));
    }
    fn layer_done(&self, compressed_bytes: u64) {
        self.0.inc(compressed_bytes);
    }
}

/// A `store:NAME:TAG` source, of the store at `store_dir()` (opened once).
fn stored_source(
    spec: &str,
    name: &str,
    store: &mut Option<Arc<Store>>,
    store_dir: &dyn Fn() -> Result<PathBuf>,
) -> Result<ImageSource> {
    let image: ImageRef = name
        .parse()
        .with_context(|| format!("{spec:?}: expected store:NAME:TAG"))?;
    let store = match store {
        Some(store) => store.clone(),
        None => {
            let dir = store_dir()?;
            let opened = Arc::new(
                Store::open_read_only(&dir)
                    .with_context(|| format!("opening store {}", dir.display()))?,
            );
            store.insert(opened).clone()
        }
    };
    Ok(ImageSource::Store { store, image })
}

pub fn run(args: AnalyzeArgs, store_dir: &dyn Fn() -> Result<PathBuf>) -> Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.similar),
        "--similar is a share between 0 and 1, not {}",
        args.similar
    );
    let mut store = None;
    let sources = args
        .sources
        .iter()
        .map(|spec| {
            let source = match spec.strip_prefix("store:") {
                Some(name) => stored_source(spec, name, &mut store, store_dir)?,
                None => ImageSource::parse(spec)?,
            };
            Ok((spec.clone(), source))
        })
        .collect::<Result<Vec<_>>>()?;
    let options = AnalyzeOptions {
        platform: Platform::parse_or_host(args.platform.as_deref())?,
        threads: args.threads,
        top_files: args.top,
        similar_at_least: args.similar,
    };
    let bar = Bar(bytes_bar("analyze", 0));
    let analysis = analyze(&sources, &options, &bar).context("analyzing the images")?;
    bar.0.finish_and_clear();
    // Printed first: plots that cannot be written must not cost the analysis.
    if args.json {
        println!("{}", serde_json::to_string_pretty(&analysis)?);
    } else {
        print_text(&analysis);
    }
    if let Some(dir) = &args.plots {
        for path in write_plots(&analysis, dir)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn share(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn print_text(a: &Analysis) {
    let l = &a.layer_measures;
    let f = &a.file_measures;
    println!("Images and layers");
    println!("  images                         {:>12}", a.images.len());
    println!("  layer references               {:>12}", l.references);
    println!("  unique layers                  {:>12}", l.unique);
    println!(
        "  layer-level dedup              {:>11.2}x  ({} referenced, {} unique, uncompressed)",
        l.dedup_ratio,
        bytes(l.referenced_tar_bytes),
        bytes(l.unique_tar_bytes)
    );
    println!(
        "  compression of unique layers   {:>11.2}x  ({} as stored)",
        l.compression_ratio,
        bytes(l.unique_compressed_bytes)
    );
    println!(
        "  both                           {:>11.2}x",
        l.combined_ratio
    );
    if l.recorded > 0 {
        println!(
            "  ({} of the unique layers are a skiff store's records: their tar bytes are reckoned \
             from their entries, their compressed bytes are not known and count as 0)",
            l.recorded
        );
    }
    println!();
    println!("Files in unique layers");
    println!(
        "  files                          {:>12}  ({})",
        f.files,
        bytes(f.bytes)
    );
    println!(
        "  distinct contents              {:>12}  ({})",
        f.distinct_contents,
        bytes(f.distinct_bytes)
    );
    println!(
        "  duplicates                     {:>12}  ({} of files, {} of bytes)",
        f.duplicates,
        share(f.duplicate_share_by_count),
        share(f.duplicate_share_by_bytes)
    );
    if !a.most_duplicated.is_empty() {
        println!();
        println!("Most duplicated files");
        println!(
            "  {:>7}  {:>7}  {:>10}  path (first seen)",
            "copies", "layers", "size"
        );
        for d in &a.most_duplicated {
            println!(
                "  {:>7}  {:>7}  {:>10}  {}",
                d.copies,
                d.layers,
                bytes(d.size),
                d.path
            );
        }
    }
    println!();
    if a.similar_layers.is_empty() {
        println!("Almost equal layers: none");
    } else {
        println!("Almost equal layers (share of distinct file contents in common)");
        for p in &a.similar_layers {
            println!(
                "  {:>6}  {} ~ {}  ({} contents in common)",
                share(p.similarity),
                short(&a.layers[p.a].diff_id),
                short(&a.layers[p.b].diff_id),
                p.common_contents
            );
        }
    }
    let s = &a.stored;
    println!();
    println!("Stored for the whole set");
    println!(
        "  layers (unique blobs)          {:>12}",
        bytes(s.layers_compressed)
    );
    println!(
        "  file-level dedup               {:>12}  raw, {} with zstd",
        bytes(s.file_level_raw),
        bytes(s.file_level_zstd)
    );
    println!(
        "  skiff (chunk-level dedup)      {:>12}  raw in {} chunks, {} in zstd frames",
        bytes(s.chunk_level_raw),
        s.chunk_level_chunks,
        bytes(s.chunk_level_zstd)
    );
    println!();
    println!("A host pulling every image transfers");
    println!(
        "  with layers                    {:>12}",
        bytes(a.pull.with_layers)
    );
    println!(
        "  with skiff                     {:>12}  ({:.2}x less)",
        bytes(a.pull.with_skiff),
        a.pull.with_layers as f64 / a.pull.with_skiff.max(1) as f64
    );
}

/// The first 12 hex digits of a digest.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}
