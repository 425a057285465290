//! `docker save` archives: `docker-archive:FILE[:NAME:TAG]`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;

use crate::error::IoContext;
use crate::source::{
    malformed, parse_config, BlobLocation, LayerDescriptor, Platform, ResolvedImage, MAX_JSON_BLOB,
};
use crate::verify::{check_digest, sha256_digest};
use crate::OciError;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Byte ranges of the regular files in a tar archive, by path.
fn archive_members(file: &Path) -> Result<HashMap<String, (u64, u64)>, OciError> {
    let f = File::open(file).context(|| format!("opening {}", file.display()))?;
    let mut archive = tar::Archive::new(f);
    let mut members = HashMap::new();
    let mut links = Vec::new();
    // With seek, member data is skipped over instead of read.
    let entries = archive
        .entries_with_seek()
        .context(|| format!("reading {}", file.display()))?;
    for entry in entries {
        let entry = entry.context(|| format!("reading {}", file.display()))?;
        let path = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                members.insert(path, (entry.raw_file_position(), entry.size()));
            }
            // Older `docker save` links a repeated layer to its first copy.
            tar::EntryType::Symlink | tar::EntryType::Link => {
                if let Some(target) = entry.link_name_bytes() {
                    links.push((path, String::from_utf8_lossy(&target).into_owned()));
                }
            }
            _ => {}
        }
    }
    for (path, target) in links {
        let parent = Path::new(&path).parent().unwrap_or(Path::new(""));
        let resolved = if target.starts_with("../") {
            normalize_archive_path(&parent.join(&target))
        } else {
            target.trim_start_matches("./").to_owned()
        };
        if let Some(range) = members.get(&resolved).copied() {
            members.insert(path, range);
        }
    }
    Ok(members)
}

fn normalize_archive_path(path: &Path) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.to_str().unwrap_or("").split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

pub(crate) fn resolve_archive(
    file: &Path,
    reference: Option<&str>,
    platform: &Platform,
) -> Result<ResolvedImage, OciError> {
    let members = archive_members(file)?;
    let read_member = |name: &str, what: &str| -> Result<Vec<u8>, OciError> {
        let &(offset, size) = members
            .get(name)
            .ok_or_else(|| OciError::MissingBlob(format!("{name} ({what})")))?;
        if size > MAX_JSON_BLOB {
            return Err(malformed(what, format!("{size} bytes is too large")));
        }
        let mut f = File::open(file).context(|| format!("opening {}", file.display()))?;
        f.seek(SeekFrom::Start(offset))
            .context(|| format!("reading {}", file.display()))?;
        let mut buf = Vec::with_capacity(size as usize);
        f.take(size)
            .read_to_end(&mut buf)
            .context(|| format!("reading {name} from {}", file.display()))?;
        if buf.len() as u64 != size {
            return Err(malformed(what, format!("{name} is truncated")));
        }
        Ok(buf)
    };
    let manifest_bytes = read_member("manifest.json", "docker archive manifest")?;
    let entries: Vec<ArchiveManifestEntry> = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| malformed("docker archive manifest.json", e))?;
    let tags = |e: &ArchiveManifestEntry| e.repo_tags.clone().unwrap_or_default();
    let available = || entries.iter().flat_map(tags).collect::<Vec<_>>().join(", ");
    let entry = match (reference, entries.as_slice()) {
        (Some(r), _) => entries
            .iter()
            .find(|e| tags(e).iter().any(|t| t == r))
            .ok_or_else(|| OciError::TagNotFound {
                tag: r.to_owned(),
                source_name: file.display().to_string(),
                available: available(),
            })?,
        (None, [only]) => only,
        (None, _) => {
            return Err(OciError::TagRequired {
                source_name: file.display().to_string(),
                available: available(),
            })
        }
    };
    let config = read_member(&entry.config, "image config")?;
    // Configs are named by their digest (`HEX.json` or `blobs/sha256/HEX`).
    let config_hex = Path::new(&entry.config)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".json"));
    let config_digest = sha256_digest(&config);
    if let Some(hex) =
        config_hex.filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        check_digest(
            "image config",
            &format!("sha256:{hex}"),
            config_digest.clone(),
        )?;
    }
    let (diff_ids, config_platform) = parse_config(&config)?;
    if diff_ids.len() != entry.layers.len() {
        return Err(malformed(
            "image config",
            format!(
                "{} diff_ids for {} layers",
                diff_ids.len(),
                entry.layers.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(diff_ids) {
        let &(offset, size) = members
            .get(name.as_str())
            .ok_or_else(|| OciError::MissingBlob(name.clone()))?;
        let digest = name
            .strip_prefix("blobs/sha256/")
            .filter(|h| h.len() == 64)
            .map(|h| format!("sha256:{h}"));
        layers.push(LayerDescriptor {
            location: BlobLocation::Range { offset, size },
            digest,
            size,
            compression: None,
            diff_id,
        });
    }
    Ok(ResolvedImage {
        manifest_digest: sha256_digest(&manifest_bytes),
        config_digest,
        config,
        platform: config_platform.unwrap_or_else(|| platform.clone()),
        layers,
    })
}
