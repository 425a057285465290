//! `skiff relayer`: a set of images written anew as ordinary OCI images
//! whose layers are cut where the images share files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use skiff_format::ImageRef;
use skiff_oci::{ConvertOptions, ImageSource, Platform, RelayerProgress};
use skiff_store::{Store, StoreConfig};

use crate::progress::{bytes, bytes_bar, ConvertBar};

#[derive(clap::Args)]
pub struct RelayerArgs {
    /// Images to restructure together: oci:DIR[:TAG], docker-archive:FILE[:NAME:TAG], docker://REF
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<String>,
    /// The OCI layout to write them into, oci:DIR (made if missing; a layout
    /// already there gains the images, and a tag it has already is an error).
    /// Each keeps its source's tag, or, where two sources have the same tag,
    /// NAME-TAG (NAME: the layout's directory, the archive's file or the
    /// repository's last part). The images are tagged once all is written
    #[arg(long, value_name = "oci:DIR")]
    out: String,
    /// Layers an image may have at most: files shared by the same images
    /// make a layer, and an image that would have more gets the files of
    /// those that save least in its top layer, its own
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_layers: usize,
    /// Platform to pick from a multi-platform index, os/arch[/variant] [default: the host's]
    #[arg(long)]
    platform: Option<String>,
    /// Where the images are converted on the way (removed after) [default: a
    /// temporary directory beside the output]
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

/// One image, before and after.
#[derive(Serialize)]
struct ImageLine {
    source: String,
    tag: String,
    manifest_digest: String,
    layers_before: usize,
    layers_after: usize,
}

#[derive(Serialize)]
struct Report {
    images: Vec<ImageLine>,
    /// Distinct gzip layers before and after: what a registry stores, and
    /// what a host pulling every image transfers.
    unique_layers_before: usize,
    unique_layers_after: usize,
    layer_bytes_before: u64,
    layer_bytes_after: u64,
}

struct Bar(indicatif::ProgressBar);

impl RelayerProgress for Bar {
    fn start(&self, layers: usize, bytes: u64) {
        self.0.set_length(bytes);
        self.0.set_message(format!("{layers} layers"));
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// What names a source in an output tag: its tag, and the name it is known by.
fn tag_parts(source: &ImageSource) -> (String, String) {
    let stem = |path: &Path| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    };
    match source {
        ImageSource::OciLayout { dir, tag } => {
            (stem(dir), tag.clone().unwrap_or_else(|| "latest".into()))
        }
        ImageSource::DockerArchive { file, reference } => {
            let tag = reference
                .as_deref()
                .and_then(|r| r.rsplit_once(':'))
                .map_or("latest", |(_, tag)| tag);
            (stem(file), tag.to_owned())
        }
        ImageSource::Registry { reference, .. } => {
            let name = reference.repository.rsplit('/').next().unwrap_or("image");
            let tag = reference.reference.replace("sha256:", "sha256-");
            (name.to_owned(), tag)
        }
        ImageSource::Store { image, .. } => {
            let name = image.name.rsplit('/').next().unwrap_or("image");
            (name.to_owned(), image.tag.clone())
        }
    }
}

/// Each source's tag in the output: its own where the tags differ, else
/// NAME-TAG (and a number where even those meet).
fn output_tags(sources: &[ImageSource]) -> Vec<String> {
    let parts: Vec<(String, String)> = sources.iter().map(tag_parts).collect();
    let distinct = parts.iter().map(|(_, t)| t).collect::<HashSet<_>>().len() == parts.len();
    let mut taken = HashSet::new();
    parts
        .into_iter()
        .map(|(name, tag)| {
            let base = if distinct {
                tag
            } else {
                format!("{name}-{tag}")
            };
            let mut candidate = base.clone();
            let mut n = 2;
            while !taken.insert(candidate.clone()) {
                candidate = format!("{base}-{n}");
                n += 1;
            }
            candidate
        })
        .collect()
}

pub fn run(args: RelayerArgs) -> Result<()> {
    let Some(out) = args.out.strip_prefix("oci:") else {
        bail!("--out is an OCI layout, oci:DIR, not {:?}", args.out);
    };
    let out = Path::new(out);
    if args.max_layers == 0 {
        bail!("--max-layers must be 1 or more");
    }
    let platform = Platform::parse_or_host(args.platform.as_deref())?;
    let sources = args
        .sources
        .iter()
        .map(|spec| ImageSource::parse(spec).with_context(|| format!("reading {spec}")))
        .collect::<Result<Vec<_>>>()?;
    let tags = output_tags(&sources);

    // The layers as they are: what a registry holds of these images now.
    let mut before: HashMap<String, u64> = HashMap::new();
    let mut layers_before = Vec::new();
    for (spec, source) in args.sources.iter().zip(&sources) {
        let resolved = source
            .resolve(&platform)
            .with_context(|| format!("reading {spec}"))?;
        for layer in &resolved.layers {
            let key = layer
                .digest
                .clone()
                .unwrap_or_else(|| layer.diff_id.clone());
            before.insert(key, layer.size);
        }
        layers_before.push(resolved.layers.len());
    }

    let work_parent = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => out
            .canonicalize()
            .ok()
            .or_else(|| std::path::absolute(out).ok())
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_else(std::env::temp_dir),
    };
    std::fs::create_dir_all(&work_parent)
        .with_context(|| format!("creating {}", work_parent.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".skiff-relayer-")
        .tempdir_in(&work_parent)
        .with_context(|| format!("making a work directory in {}", work_parent.display()))?;
    // Ctrl-C or SIGTERM: the work store goes, and the output gains no tag.
    let work_path = work.path().to_owned();
    ctrlc::set_handler(move || {
        let _ = std::fs::remove_dir_all(&work_path);
        eprintln!("\nskiff: stopped; the output layout gained no image");
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    // Frames read once and deleted: the quick level, not a kept store's.
    let work_config = StoreConfig {
        zstd_level: skiff_chunk::DEFAULT_ZSTD_LEVEL,
        ..StoreConfig::default()
    };
    let (store, _) = Store::open_or_create_new(&work.path().join("store"), &work_config)
        .context("making the work store")?;
    let options = ConvertOptions {
        platform,
        ..ConvertOptions::default()
    };
    let mut images = Vec::with_capacity(sources.len());
    for (n, (spec, source)) in args.sources.iter().zip(&sources).enumerate() {
        let target: ImageRef = format!("image{n}:1").parse()?;
        let bar = ConvertBar::new(format!("read {}", tags[n]));
        let report = skiff_oci::convert(source, &store, &target, &options, &bar)
            .with_context(|| format!("reading {spec}"))?;
        bar.finish();
        images.push((tags[n].clone(), report.manifest));
    }

    let bar = Bar(bytes_bar("write", 0));
    let made_out = !out.exists();
    let written = skiff_oci::relayer(&store, &images, out, args.max_layers, &bar)
        .inspect_err(|_| {
            // A layout this run made holds only untagged blobs: it goes.
            if made_out {
                let _ = std::fs::remove_dir_all(out);
            }
        })
        .with_context(|| format!("writing {}", out.display()))?;
    bar.0.finish_and_clear();
    let report = Report {
        images: written
            .images
            .iter()
            .zip(&args.sources)
            .zip(&layers_before)
            .map(|((image, source), &layers_before)| ImageLine {
                source: source.clone(),
                tag: image.tag.clone(),
                manifest_digest: image.manifest_digest.clone(),
                layers_before,
                layers_after: image.layers.len(),
            })
            .collect(),
        unique_layers_before: before.len(),
        unique_layers_after: written.layers.len(),
        layer_bytes_before: before.values().sum(),
        layer_bytes_after: written.layer_bytes(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let width = report
        .images
        .iter()
        .map(|i| i.source.len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!("{:<width$}  layers    tag in {}", "image", out.display());
    for image in &report.images {
        println!(
            "{:<width$}  {:>3} -> {:<3}  {}",
            image.source, image.layers_before, image.layers_after, image.tag
        );
    }
    let ratio = report.layer_bytes_before as f64 / report.layer_bytes_after.max(1) as f64;
    println!(
        "distinct layers {} -> {}, {} -> {} ({ratio:.2}x less): what a registry stores, and what a host pulling every image transfers",
        report.unique_layers_before,
        report.unique_layers_after,
        bytes(report.layer_bytes_before),
        bytes(report.layer_bytes_after),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sources_with_the_same_tag_are_told_apart_by_name() {
        let parse = |specs: &[&str]| -> Vec<String> {
            output_tags(
                &specs
                    .iter()
                    .map(|s| ImageSource::parse(s).unwrap())
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(parse(&["oci:/a/git:1", "oci:/a/perl:2"]), ["1", "2"]);
        assert_eq!(
            parse(&[
                "oci:/a/git:latest",
                "oci:/a/perl:latest",
                "oci:/b/perl:latest"
            ]),
            ["git-latest", "perl-latest", "perl-latest-2"]
        );
    }
}
