//! Image sources — OCI layout directories (`layout.rs`), `docker save`
//! archives (`archive.rs`) and registries (`registry.rs`) — resolved to a
//! config and an ordered list of layers, and the pieces they share.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::{
    Descriptor, ImageIndex as OciIndex, ImageManifest as OciManifest, MediaType,
};
use serde::Deserialize;

use crate::error::IoContext;
use crate::verify::{sha256_hex, verify_blob, DigestCheckedReader, HashingReader};
use crate::OciError;
use skiff_format::ImageRef;
use skiff_registry::{BareCredentials, Registry, RegistryRef};
use skiff_store::Store;

/// Manifests and configs are small; anything bigger is not one.
pub(crate) const MAX_JSON_BLOB: u64 = 16 << 20;

/// `os/arch[/variant]`, e.g. `linux/amd64`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine skiff runs on.
    pub fn host() -> Platform {
        Platform {
            os: "linux".into(),
            arch: skiff_registry::launcher::host_architecture().into(),
            variant: None,
        }
    }

    /// The platform a `--platform` flag names, or the host's without one.
    pub fn parse_or_host(flag: Option<&str>) -> Result<Platform, OciError> {
        flag.map_or_else(|| Ok(Platform::host()), Platform::parse)
    }

    pub fn parse(s: &str) -> Result<Platform, OciError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).into(),
                arch: (*arch).into(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Platform {
                    os: (*os).into(),
                    arch: (*arch).into(),
                    variant: Some((*variant).into()),
                })
            }
            _ => Err(OciError::Malformed {
                what: "platform".into(),
                reason: format!("{s:?} is not os/arch[/variant]"),
            }),
        }
    }

    fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        p.os().to_string() == self.os
            && p.architecture().to_string() == self.arch
            && (self.variant.is_none() || p.variant() == &self.variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

impl LayerCompression {
    fn from_media_type(media_type: &str) -> Result<Self, OciError> {
        const TAR: [&str; 3] = [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.oci.image.layer.nondistributable.v1.tar",
            "application/vnd.docker.image.rootfs.diff.tar",
        ];
        const GZIP: [&str; 4] = [
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        ];
        const ZSTD: [&str; 2] = [
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        ];
        if TAR.contains(&media_type) {
            Ok(LayerCompression::None)
        } else if GZIP.contains(&media_type) {
            Ok(LayerCompression::Gzip)
        } else if ZSTD.contains(&media_type) {
            Ok(LayerCompression::Zstd)
        } else {
            Err(OciError::UnknownMediaType(media_type.to_owned()))
        }
    }

    /// For sources that do not say (docker-archive): look at the magic bytes.
    fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            LayerCompression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            LayerCompression::Zstd
        } else {
            LayerCompression::None
        }
    }
}

/// One layer to apply, with what to check it against.
#[derive(Clone, Debug)]
pub struct LayerDescriptor {
    /// Where the blob is in the source.
    pub(crate) location: BlobLocation,
    /// Digest of the blob as stored, when the source names one.
    pub digest: Option<String>,
    pub size: u64,
    pub compression: Option<LayerCompression>,
    /// sha256 of the uncompressed tar, from the config's `rootfs.diff_ids`.
    pub diff_id: String,
}

#[derive(Clone, Debug)]
pub(crate) enum BlobLocation {
    File(PathBuf),
    /// A byte range of the docker archive.
    Range {
        offset: u64,
        size: u64,
    },
    /// A blob of the registry repository, named by the layer's digest.
    Remote,
    /// A layer of an image in a skiff store: its conversion record, by diff_id.
    Recorded,
}

/// An image picked out of a source: what `convert` needs.
#[derive(Debug)]
pub struct ResolvedImage {
    pub manifest_digest: String,
    pub config_digest: String,
    /// The config blob, byte for byte.
    pub config: Vec<u8>,
    pub platform: Platform,
    pub layers: Vec<LayerDescriptor>,
}

/// Where images are read from.
#[derive(Debug)]
pub enum ImageSource {
    /// `oci:DIR[:TAG]`
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE[:NAME:TAG]`
    DockerArchive {
        file: PathBuf,
        reference: Option<String>,
    },
    /// `docker://[HOST[:PORT]/]NAME[:TAG|@DIGEST]`
    Registry {
        reference: RegistryRef,
        client: Box<Registry>,
    },
    /// An image converted into a skiff store: its layers are the records
    /// the conversion kept of them (their files and chunks), not blobs.
    Store { store: Arc<Store>, image: ImageRef },
}

impl ImageSource {
    /// Parses `oci:DIR[:TAG]`, `docker-archive:FILE[:NAME:TAG]` or `docker://REF`.
    pub fn parse(spec: &str) -> Result<ImageSource, OciError> {
        Self::parse_with(spec, BareCredentials::Apply)
    }

    /// As [`ImageSource::parse`], saying whether a bare `SKIFF_REGISTRY_AUTH`
    /// is for this registry (not when the command publishes to another one).
    pub fn parse_with(spec: &str, bare: BareCredentials) -> Result<ImageSource, OciError> {
        if let Some(rest) = spec.strip_prefix("oci:") {
            let (dir, tag) = split_reference(rest, |p| p.join("index.json").exists());
            return Ok(ImageSource::OciLayout { dir, tag });
        }
        if let Some(rest) = spec.strip_prefix("docker-archive:") {
            let (file, reference) = match rest.split_once(':') {
                Some((file, reference)) if !Path::new(rest).exists() => {
                    (PathBuf::from(file), Some(reference.to_owned()))
                }
                _ => (PathBuf::from(rest), None),
            };
            return Ok(ImageSource::DockerArchive { file, reference });
        }
        if let Some(rest) = spec.strip_prefix("docker://") {
            let reference = RegistryRef::parse(rest)?;
            let client = Box::new(Registry::with_bare_credentials(&reference, bare)?);
            return Ok(ImageSource::Registry { reference, client });
        }
        Err(OciError::UnsupportedSource(spec.to_owned()))
    }

    pub fn name(&self) -> String {
        match self {
            ImageSource::OciLayout { dir, .. } => format!("OCI layout {}", dir.display()),
            ImageSource::DockerArchive { file, .. } => format!("docker archive {}", file.display()),
            ImageSource::Registry { reference, .. } => {
                format!(
                    "registry image {}/{}:{}",
                    reference.host, reference.repository, reference.reference
                )
            }
            ImageSource::Store { image, .. } => format!("skiff store image {image}"),
        }
    }

    /// Picks the image (by tag and platform) and reads its manifest and config.
    pub fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        match self {
            ImageSource::OciLayout { dir, tag } => {
                crate::layout::resolve_layout(dir, tag.as_deref(), platform)
            }
            ImageSource::DockerArchive { file, reference } => {
                crate::archive::resolve_archive(file, reference.as_deref(), platform)
            }
            ImageSource::Registry { reference, client } => {
                crate::registry::resolve_registry(reference, client, platform)
            }
            ImageSource::Store { store, image } => resolve_stored(store, image),
        }
    }

    /// Opens a layer's blob, checked against its digest and size where known.
    pub fn open_layer(&self, layer: &LayerDescriptor) -> Result<Box<dyn Read + Send>, OciError> {
        match (&layer.location, self) {
            (BlobLocation::File(path), _) => {
                let file = File::open(path).context(|| format!("opening {}", path.display()))?;
                if let Some(digest) = &layer.digest {
                    // Checked up front: cheap beside decompression, and a bad blob costs no work.
                    verify_blob(
                        &file,
                        &format!("layer blob {digest}"),
                        digest,
                        Some(layer.size),
                    )?;
                }
                let mut file = file;
                file.seek(SeekFrom::Start(0))
                    .context(|| format!("reading {}", path.display()))?;
                Ok(Box::new(file))
            }
            (BlobLocation::Range { offset, size }, ImageSource::DockerArchive { file, .. }) => {
                let mut f = File::open(file).context(|| format!("opening {}", file.display()))?;
                f.seek(SeekFrom::Start(*offset))
                    .context(|| format!("reading {}", file.display()))?;
                let member = f.take(*size);
                Ok(match &layer.digest {
                    Some(digest) => Box::new(DigestCheckedReader::new(member, digest, *size)),
                    None => Box::new(member),
                })
            }
            (BlobLocation::Remote, ImageSource::Registry { client, .. }) => {
                let digest = layer
                    .digest
                    .as_deref()
                    .expect("remote layers are named by digest");
                Ok(Box::new(DigestCheckedReader::new(
                    crate::registry::open_blob(client, digest)?,
                    digest,
                    layer.size,
                )))
            }
            (BlobLocation::Recorded, _) => Err(malformed(
                format!("layer {}", layer.diff_id),
                "a skiff store keeps a layer as the record of its conversion, not as a blob",
            )),
            _ => unreachable!("each source makes only its own kind of blob location"),
        }
    }
}

/// An image of a skiff store as a source: its manifest's record of the
/// image it was converted from. Its layers' sizes are not known (0).
fn resolve_stored(store: &Store, image: &ImageRef) -> Result<ResolvedImage, OciError> {
    let manifest = store.image(image)?;
    let source = &manifest.source;
    if source.diff_ids.is_empty() {
        return Err(malformed(
            format!("skiff store image {image}"),
            "it was converted by a skiff that kept no layer records: convert it again",
        ));
    }
    Ok(ResolvedImage {
        manifest_digest: source.manifest_digest.clone(),
        config_digest: source.config_digest.clone(),
        config: manifest.config.get().as_bytes().to_vec(),
        platform: Platform::parse(&source.platform)?,
        layers: source
            .diff_ids
            .iter()
            .map(|diff_id| LayerDescriptor {
                location: BlobLocation::Recorded,
                digest: None,
                size: 0,
                compression: None,
                diff_id: diff_id.clone(),
            })
            .collect(),
    })
}

/// Splits `PATH:REF` where the path may itself hold colons: the whole string is
/// a path if `is_source` says so, otherwise the last colon separates the reference.
fn split_reference(rest: &str, is_source: impl Fn(&Path) -> bool) -> (PathBuf, Option<String>) {
    if is_source(Path::new(rest)) {
        return (PathBuf::from(rest), None);
    }
    match rest.rsplit_once(':') {
        Some((path, reference)) if !reference.contains('/') => {
            (PathBuf::from(path), Some(reference.to_owned()))
        }
        _ => (PathBuf::from(rest), None),
    }
}

pub(crate) fn malformed(what: impl Into<String>, reason: impl fmt::Display) -> OciError {
    OciError::Malformed {
        what: what.into(),
        reason: reason.to_string(),
    }
}

pub(crate) fn is_index(media_type: &MediaType) -> bool {
    matches!(media_type, MediaType::ImageIndex)
        || media_type.to_string() == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// The layers of an image manifest, each with its diff_id from the config,
/// and the config's platform; `location` says where a blob digest lives.
pub(crate) fn layers_of(
    manifest: &OciManifest,
    config: &[u8],
    location: impl Fn(&str) -> Result<BlobLocation, OciError>,
) -> Result<(Vec<LayerDescriptor>, Option<Platform>), OciError> {
    let (diff_ids, platform) = parse_config(config)?;
    if diff_ids.len() != manifest.layers().len() {
        return Err(malformed(
            "image config",
            format!(
                "{} diff_ids for {} layers",
                diff_ids.len(),
                manifest.layers().len()
            ),
        ));
    }
    let layers = manifest
        .layers()
        .iter()
        .zip(diff_ids)
        .map(|(layer, diff_id)| {
            let digest = layer.digest().to_string();
            Ok(LayerDescriptor {
                location: location(&digest)?,
                compression: Some(LayerCompression::from_media_type(
                    layer.media_type().as_ref(),
                )?),
                digest: Some(digest),
                size: layer.size(),
                diff_id,
            })
        })
        .collect::<Result<Vec<_>, OciError>>()?;
    Ok((layers, platform))
}

/// The manifest of `index` for `platform`.
pub(crate) fn pick_platform(index: &OciIndex, platform: &Platform) -> Result<Descriptor, OciError> {
    index
        .manifests()
        .iter()
        .find(|d| d.platform().as_ref().is_some_and(|p| platform.matches(p)))
        .cloned()
        .ok_or_else(|| OciError::PlatformNotFound {
            wanted: platform.to_string(),
            available: index
                .manifests()
                .iter()
                .filter_map(|d| {
                    d.platform()
                        .as_ref()
                        .map(|p| format!("{}/{}", p.os(), p.architecture()))
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[derive(Deserialize)]
struct ConfigView {
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    rootfs: RootFsView,
}

#[derive(Deserialize)]
struct RootFsView {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// The diff_ids and platform of a config, validated.
pub(crate) fn parse_config(config: &[u8]) -> Result<(Vec<String>, Option<Platform>), OciError> {
    let view: ConfigView =
        serde_json::from_slice(config).map_err(|e| malformed("image config", e))?;
    if view.rootfs.kind != "layers" {
        return Err(malformed(
            "image config",
            format!("rootfs type {:?} (expected \"layers\")", view.rootfs.kind),
        ));
    }
    for id in &view.rootfs.diff_ids {
        sha256_hex(id)?;
    }
    let platform = match (view.os, view.architecture) {
        (Some(os), Some(arch)) => Some(Platform {
            os,
            arch,
            variant: view.variant,
        }),
        _ => None,
    };
    Ok((view.rootfs.diff_ids, platform))
}

/// Wraps a layer blob in the decompressor its media type (or magic) asks for,
/// and hashes the uncompressed stream for the diff_id check.
pub(crate) fn decompressed<'a>(
    mut blob: Box<dyn Read + Send + 'a>,
    compression: Option<LayerCompression>,
) -> Result<HashingReader<Box<dyn Read + Send + 'a>>, OciError> {
    let compression = match compression {
        Some(c) => c,
        None => {
            let mut head = [0u8; 4];
            let mut filled = 0;
            while filled < head.len() {
                let n = blob
                    .read(&mut head[filled..])
                    .context(|| "reading layer".to_string())?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            let c = LayerCompression::sniff(&head[..filled]);
            blob = Box::new(std::io::Cursor::new(head[..filled].to_vec()).chain(blob));
            c
        }
    };
    let reader: Box<dyn Read + Send + 'a> = match compression {
        LayerCompression::None => blob,
        LayerCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        LayerCompression::Zstd => {
            Box::new(zstd::Decoder::new(blob).context(|| "starting zstd decoder".to_string())?)
        }
    };
    Ok(HashingReader::new(reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_source_specs() {
        match ImageSource::parse("oci:/tmp/nowhere:v1").unwrap() {
            ImageSource::OciLayout { dir, tag } => {
                assert_eq!(dir, PathBuf::from("/tmp/nowhere"));
                assert_eq!(tag.as_deref(), Some("v1"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ImageSource::parse("http://x"),
            Err(OciError::UnsupportedSource(_))
        ));
        assert_eq!(
            Platform::parse("linux/arm64/v8")
                .unwrap()
                .variant
                .as_deref(),
            Some("v8")
        );
        assert!(Platform::parse("linux").is_err());
    }

    #[test]
    fn media_types() {
        assert_eq!(
            LayerCompression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd")
                .unwrap(),
            LayerCompression::Zstd
        );
        assert!(matches!(
            LayerCompression::from_media_type("application/x-unknown"),
            Err(OciError::UnknownMediaType(_))
        ));
    }
}
