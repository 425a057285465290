//! OCI image layout directories: `oci:DIR[:TAG]`.

use std::io::Read;
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex as OciIndex, ImageManifest as OciManifest};

use crate::error::IoContext;
use crate::source::{
    is_index, layers_of, malformed, pick_platform, BlobLocation, Platform, ResolvedImage,
    MAX_JSON_BLOB,
};
use crate::verify::{check_digest, sha256_digest, sha256_hex};
use crate::OciError;

/// Reads a small JSON blob of a layout, checking digest and size.
fn read_layout_blob(dir: &Path, desc: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
    let digest = desc.digest().to_string();
    let path = dir.join("blobs/sha256").join(sha256_hex(&digest)?);
    if desc.size() > MAX_JSON_BLOB {
        return Err(malformed(
            what,
            format!("{} bytes is too large for a {what}", desc.size()),
        ));
    }
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(OciError::MissingBlob(digest))
        }
        Err(e) => return Err(e).context(|| format!("opening {}", path.display())),
    };
    // One byte past the descriptor's size shows a longer file without reading all of it.
    let mut bytes = Vec::with_capacity(desc.size() as usize);
    file.take(desc.size() + 1)
        .read_to_end(&mut bytes)
        .context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 != desc.size() {
        return Err(OciError::SizeMismatch {
            what: format!("{what} {digest}"),
            expected: desc.size(),
            actual: bytes.len() as u64,
        });
    }
    check_digest(&format!("{what} {digest}"), &digest, sha256_digest(&bytes))?;
    Ok(bytes)
}

pub(crate) fn resolve_layout(
    dir: &Path,
    tag: Option<&str>,
    platform: &Platform,
) -> Result<ResolvedImage, OciError> {
    let index_path = dir.join("index.json");
    let index_bytes = match std::fs::read(&index_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(malformed(
                format!("OCI layout {}", dir.display()),
                "index.json is missing",
            ))
        }
        Err(e) => return Err(e).context(|| format!("reading {}", index_path.display())),
    };
    let index: OciIndex =
        serde_json::from_slice(&index_bytes).map_err(|e| malformed("index.json", e))?;
    let ref_name = |d: &Descriptor| {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name"))
            .cloned()
    };
    let available = || {
        index
            .manifests()
            .iter()
            .filter_map(ref_name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let source_name = || dir.display().to_string();
    let chosen = match (tag, index.manifests().as_slice()) {
        (Some(tag), manifests) => manifests
            .iter()
            .find(|d| ref_name(d).as_deref() == Some(tag))
            .ok_or_else(|| OciError::TagNotFound {
                tag: tag.to_owned(),
                source_name: source_name(),
                available: available(),
            })?,
        (None, [only]) => only,
        (None, []) => return Err(malformed("index.json", "it lists no images")),
        (None, _) => {
            return Err(OciError::TagRequired {
                source_name: source_name(),
                available: available(),
            })
        }
    };
    let mut desc = chosen.clone();
    // Follow (possibly nested) indexes down to the platform's manifest.
    for _ in 0..4 {
        if !is_index(desc.media_type()) {
            break;
        }
        let bytes = read_layout_blob(dir, &desc, "image index")?;
        let nested: OciIndex =
            serde_json::from_slice(&bytes).map_err(|e| malformed("image index", e))?;
        desc = pick_platform(&nested, platform)?;
    }
    let manifest_bytes = read_layout_blob(dir, &desc, "image manifest")?;
    let manifest: OciManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| malformed("image manifest", e))?;
    let config = read_layout_blob(dir, manifest.config(), "image config")?;
    let (layers, config_platform) = layers_of(&manifest, &config, |digest| {
        Ok(BlobLocation::File(
            dir.join("blobs/sha256").join(sha256_hex(digest)?),
        ))
    })?;
    for layer in &layers {
        if let BlobLocation::File(path) = &layer.location {
            if !path.exists() {
                return Err(OciError::MissingBlob(
                    layer.digest.clone().unwrap_or_default(),
                ));
            }
        }
    }
    Ok(ResolvedImage {
        manifest_digest: sha256_digest(&manifest_bytes),
        config_digest: manifest.config().digest().to_string(),
        config,
        platform: config_platform.unwrap_or_else(|| platform.clone()),
        layers,
    })
}
