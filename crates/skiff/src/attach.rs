//! `skiff attach docker://HOST/REPO:TAG`: skiff artifacts beside an
//! unconverted image, one per layer prefix (skiff_registry::referrers), so
//! the image keeps its name and skiff's snapshotter, asked for it, mounts
//! it lazily.

use std::path::Path;

use anyhow::{bail, Context, Result};
use skiff_format::ImageRef;
use skiff_oci::{ConvertOptions, ImageSource};
use skiff_registry::referrers::referrers_tag;
use skiff_registry::{Descriptor, Registry, RegistryRef};
use skiff_store::{Store, StoreConfig};

use crate::progress;

/// The media types an image's manifest may have.
const IMAGE_MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

pub fn attach(
    store: Option<&Path>,
    reference: &RegistryRef,
    conversion: &crate::ConvertFlags,
    json: bool,
) -> Result<()> {
    let (store_dir, _temporary) = crate::given_or_temporary_store(store, "skiff-attach-")?;
    let source_arg = reference.to_string();
    let source = ImageSource::parse(&source_arg)?;
    let tag = match reference.is_digest() {
        true => reference.reference.replace(':', "-"),
        false => reference.reference.clone(),
    };
    let name_of = |what: &str| -> Result<ImageRef> {
        Ok(format!("{}:{tag}.{what}", reference.repository).parse()?)
    };
    let store = Store::open_or_create(&store_dir, &StoreConfig::default())
        .with_context(|| format!("opening store {}", store_dir.display()))?;
    let options = conversion.options()?;
    // The whole image first, so every layer leaves its record; the
    // prefixes are then made from those records without reading a layer again.
    let whole = name_of("whole")?;
    let manifest = crate::convert_interruptibly(&store, &source, &whole, &options)?.manifest;
    // The prefixes of that very image, should the tag move meanwhile.
    let subject_digest = &manifest.source.manifest_digest;
    let pinned = reference.with_reference(subject_digest);
    let source = ImageSource::parse(&pinned.to_string())?;
    let mut prefixes = Vec::new();
    for layers in 1..=manifest.source.layers as usize {
        let name = name_of(&format!("layers-{layers}"))?;
        let options = ConvertOptions {
            platform: options.platform.clone(),
            threads: options.threads,
            cancel: options.cancel.clone(),
            layers: Some(layers),
        };
        let converted = skiff_oci::convert(&source, &store, &name, &options, &())
            .with_context(|| format!("converting the first {layers} layers of {pinned}"))?;
        if converted.manifest.source.manifest_digest != *subject_digest {
            bail!(
                "{pinned} resolved to another manifest, {}",
                converted.manifest.source.manifest_digest
            );
        }
        prefixes.push(name);
    }
    store.remove_image(&whole)?;

    let registry = Registry::new(reference)?;
    let (bytes, media_type, digest) = registry
        .manifest(subject_digest, &IMAGE_MANIFEST_TYPES)?
        .with_context(|| format!("{source_arg}'s manifest {subject_digest} is gone"))?;
    if !IMAGE_MANIFEST_TYPES.contains(&media_type.as_str()) {
        bail!("{source_arg}'s manifest is {media_type}, not an image manifest");
    }
    let subject = Descriptor {
        media_type,
        digest,
        size: bytes.len() as u64,
        annotations: Default::default(),
    };
    let bar = progress::TransferBar::new("attach");
    let report = skiff_client::attach_to_registry(&store, &prefixes, &registry, &subject, &bar)
        .with_context(|| format!("attaching skiff artifacts to {source_arg}"))?;
    bar.bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let uploaded: u64 = report.artifacts.iter().map(|a| a.bytes_uploaded).sum();
    println!(
        "attached {} skiff artifacts (one for each layer prefix) to {} in {:.2}s, {} uploaded",
        report.artifacts.len(),
        report.subject,
        report.elapsed.as_secs_f64(),
        progress::bytes(uploaded),
    );
    if report.referrers_api {
        println!("listed by the registry's referrers API");
    } else {
        println!(
            "listed at the tag {} (this registry has no referrers API)",
            referrers_tag(&subject.digest)
        );
    }
    println!("{source_arg} is unchanged; skiff's snapshotter now mounts it lazily");
    Ok(())
}
