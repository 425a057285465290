//! A skiff image as an OCI artifact: the manifest that names its blobs
//! (docs/FORMAT.md, "In an OCI registry"), read and checked as a whole
//! before anything is mounted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use skiff_format::artifact::{
    ChunkTable, ARTIFACT_TYPE, CHUNK_TABLE_LAYER_TYPE, INDEX_DIGEST_ANNOTATION, INDEX_LAYER_TYPE,
    MANIFEST_LAYER_TYPE, OCI_CONFIG_TYPE, OCI_MANIFEST_TYPE, PACK_LAYER_TYPE,
};
use skiff_format::wire::MAX_INDEX_BYTES;
use skiff_format::{ImageIndex, ImageManifest, IndexDigest};

use crate::client::Registry;
use crate::digest::Sha256Digest;
use crate::launcher::{OciIndex, OCI_INDEX_TYPE};
use crate::RegistryError;

/// The skiff manifest holds the config and a profile of at most 100k ranges.
pub const MAX_SKIFF_MANIFEST_BYTES: u64 = 32 << 20;
/// 60 bytes a chunk before compression: 512 MiB is millions of chunks.
pub const MAX_CHUNK_TABLE_BYTES: u64 = 512 << 20;
/// A pack blob may be this large at most (skiff writes 16 to 64 MiB ones):
/// what a reader spools when a registry ignores `Range`.
pub const MAX_PACK_BLOB_BYTES: u64 = 1 << 30;
/// Layers before the first pack blob: the skiff manifest, the index, the chunk table.
pub const FIRST_PACK_LAYER: usize = 3;

/// An OCI content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Sha256Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_owned(),
            digest: crate::sha256_digest(bytes),
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
        }
    }
}

/// An OCI image manifest, as much of it as skiff writes and reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OciManifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// The image this one is about (OCI 1.1 referrers): set on artifacts
    /// attached beside an unconverted image (crate::referrers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl OciManifest {
    /// The manifest of a skiff image: its config, then skiff manifest,
    /// index, chunk table and pack blobs as layers.
    pub fn skiff(
        config: Descriptor,
        skiff_manifest: Descriptor,
        index: Descriptor,
        index_digest: &IndexDigest,
        table: Descriptor,
        packs: Vec<Descriptor>,
    ) -> OciManifest {
        let mut layers = vec![skiff_manifest, index, table];
        layers.extend(packs);
        let annotations = BTreeMap::from([(
            INDEX_DIGEST_ANNOTATION.to_owned(),
            format!("blake3:{index_digest}"),
        )]);
        OciManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST_TYPE.to_owned(),
            artifact_type: Some(ARTIFACT_TYPE.to_owned()),
            config,
            layers,
            subject: None,
            annotations,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serialises")
    }

    /// Whether this names a skiff image; the reason when it does not.
    pub fn check_skiff(&self) -> Result<(), String> {
        if self.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
            return Err(match &self.artifact_type {
                Some(other) => format!("its artifactType is {other}"),
                None => "it is a plain OCI image; convert it with `skiff convert docker://SRC docker://DST`".to_owned(),
            });
        }
        if self.config.media_type != OCI_CONFIG_TYPE {
            return Err(format!("its config is {}", self.config.media_type));
        }
        let types = [
            MANIFEST_LAYER_TYPE,
            INDEX_LAYER_TYPE,
            CHUNK_TABLE_LAYER_TYPE,
        ];
        for (at, want) in types.iter().enumerate() {
            match self.layers.get(at) {
                Some(layer) if layer.media_type == *want => {}
                Some(layer) => {
                    return Err(format!("layer {at} is {}, not {want}", layer.media_type))
                }
                None => return Err(format!("it has {} layers", self.layers.len())),
            }
        }
        if let Some(odd) = self
            .packs()
            .iter()
            .find(|l| l.media_type != PACK_LAYER_TYPE)
        {
            return Err(format!("a pack layer is {}", odd.media_type));
        }
        Ok(())
    }

    pub fn packs(&self) -> &[Descriptor] {
        self.layers.get(FIRST_PACK_LAYER..).unwrap_or_default()
    }
}

/// A skiff image read from a registry: everything a mount needs before it is ready.
pub struct RemoteImage {
    /// The OCI manifest's own digest.
    pub digest: Sha256Digest,
    pub oci: OciManifest,
    /// The skiff manifest, named after the registry reference.
    pub manifest: ImageManifest,
    /// The skiff manifest as stored (layer 0), under the name it was pushed with.
    pub stored_manifest: ImageManifest,
    /// The encoded index, as checked against its digest.
    pub index_bytes: Vec<u8>,
    pub index: ImageIndex,
    /// The encoded chunk table, as read.
    pub table_bytes: Vec<u8>,
    pub table: ChunkTable,
}

/// What a [`RemoteImage`] is made of as read from its registry, checked
/// again when made into one: kept on local disk, it lets a mount daemon
/// that takes a mount over open the image without the network.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteImageParts {
    pub digest: Sha256Digest,
    pub oci: OciManifest,
    pub stored_manifest: ImageManifest,
    #[serde(skip)]
    pub index_bytes: Vec<u8>,
    #[serde(skip)]
    pub table_bytes: Vec<u8>,
}

fn not_skiff(registry: &Registry, reason: impl Into<String>) -> RegistryError {
    RegistryError::NotSkiff {
        reference: registry.reference().to_string(),
        reason: reason.into(),
    }
}

fn limited(
    registry: &Registry,
    what: &str,
    d: &Descriptor,
    limit: u64,
) -> Result<(), RegistryError> {
    if d.size > limit {
        return Err(not_skiff(
            registry,
            format!("its {what} is {} bytes (at most {limit})", d.size),
        ));
    }
    Ok(())
}

/// Decompresses at most `limit` bytes of a zstd blob.
fn unzstd(bytes: &[u8], limit: u64, what: &str) -> Result<Vec<u8>, RegistryError> {
    skiff_chunk::decompress_bounded(bytes, limit as usize)
        .map_err(|e| RegistryError::Io(format!("{what}: {e}")))
}

impl RemoteImage {
    /// The skiff artifact at `reference` (a tag or digest) of `registry`'s
    /// repository: the manifest there, or the one its image index lists as
    /// skiff's (what a push puts at a tag, crate::launcher), with its digest.
    pub fn manifest_at(
        registry: &Registry,
        reference: &str,
    ) -> Result<(OciManifest, Sha256Digest), RegistryError> {
        let (bytes, media_type, digest) = Self::get_manifest(registry, reference)?;
        let (bytes, digest) = if media_type == OCI_INDEX_TYPE {
            let index: OciIndex = serde_json::from_slice(&bytes)
                .map_err(|e| not_skiff(registry, format!("its image index does not parse: {e}")))?;
            let entry = index.artifact().ok_or_else(|| {
                not_skiff(registry, "it is an image index that lists no skiff image")
            })?;
            let (bytes, _, digest) = Self::get_manifest(registry, &entry.digest.to_string())?;
            (bytes, digest)
        } else {
            (bytes, digest)
        };
        let oci: OciManifest = serde_json::from_slice(&bytes)
            .map_err(|e| not_skiff(registry, format!("its manifest does not parse: {e}")))?;
        oci.check_skiff()
            .map_err(|reason| not_skiff(registry, reason))?;
        Ok((oci, digest))
    }

    fn get_manifest(
        registry: &Registry,
        reference: &str,
    ) -> Result<(Vec<u8>, String, Sha256Digest), RegistryError> {
        registry
            .manifest(reference, &[OCI_MANIFEST_TYPE, OCI_INDEX_TYPE])?
            .ok_or_else(|| RegistryError::Status {
                url: registry.reference().with_reference(reference).to_string(),
                status: 404,
                hint: " (no such repository or tag)",
                message: String::new(),
            })
    }

    /// Reads and checks the image at `registry`'s reference: the manifest,
    /// then the skiff manifest, index and chunk table (in parallel).
    pub fn fetch(registry: &Registry) -> Result<RemoteImage, RegistryError> {
        let (oci, digest) = Self::manifest_at(registry, &registry.reference().reference)?;
        let [manifest_d, index_d, table_d] = [&oci.layers[0], &oci.layers[1], &oci.layers[2]];
        limited(
            registry,
            "skiff manifest",
            manifest_d,
            MAX_SKIFF_MANIFEST_BYTES,
        )?;
        limited(registry, "index", index_d, MAX_INDEX_BYTES as u64)?;
        limited(registry, "chunk table", table_d, MAX_CHUNK_TABLE_BYTES)?;
        let (manifest_bytes, index_zstd, table_zstd) = std::thread::scope(|s| {
            let m = s.spawn(|| registry.blob(&manifest_d.digest, manifest_d.size));
            let i = s.spawn(|| registry.blob(&index_d.digest, index_d.size));
            let t = registry.blob(&table_d.digest, table_d.size);
            let join = |h: std::thread::ScopedJoinHandle<'_, _>| {
                h.join()
                    .unwrap_or_else(|_| Err(RegistryError::Io("a fetch thread panicked".into())))
            };
            (join(m), join(i), t)
        });
        let parts = RemoteImageParts {
            digest,
            oci,
            stored_manifest: ImageManifest::from_json(&manifest_bytes?)?,
            index_bytes: unzstd(&index_zstd?, MAX_INDEX_BYTES as u64, "the index")?,
            table_bytes: unzstd(&table_zstd?, MAX_CHUNK_TABLE_BYTES, "the chunk table")?,
        };
        RemoteImage::from_parts(registry, parts)
    }

    /// Checks `parts` and makes the image of them, named after `registry`'s reference.
    pub fn from_parts(
        registry: &Registry,
        parts: RemoteImageParts,
    ) -> Result<RemoteImage, RegistryError> {
        let RemoteImageParts {
            digest,
            oci,
            stored_manifest,
            index_bytes,
            table_bytes,
        } = parts;
        oci.check_skiff()
            .map_err(|reason| not_skiff(registry, reason))?;
        let mut manifest = stored_manifest.clone();
        let actual = IndexDigest::of(&index_bytes);
        if actual != manifest.index.digest {
            return Err(RegistryError::DigestMismatch {
                what: "the image index".into(),
                expected: manifest.index.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let index = ImageIndex::decode(&index_bytes)?;
        let table = ChunkTable::decode(&table_bytes, oci.packs().len(), &index.distinct_chunks())?;
        for pack in oci.packs() {
            limited(registry, "pack blob", pack, MAX_PACK_BLOB_BYTES)?;
        }
        let outside = table
            .frames
            .iter()
            .find(|f| f.offset + u64::from(f.len) > oci.packs()[f.blob as usize].size);
        if let Some(frame) = outside {
            return Err(not_skiff(
                registry,
                format!(
                    "a frame at {} lies past the end of pack blob {}",
                    frame.offset, frame.blob
                ),
            ));
        }
        // The registry's name is the image's name here, whatever it was pushed from.
        let reference = registry.reference();
        manifest.name = format!("{}/{}", reference.host, reference.repository);
        manifest.tag = if reference.is_digest() {
            "latest".to_owned()
        } else {
            reference.reference.clone()
        };
        Ok(RemoteImage {
            digest,
            oci,
            manifest,
            stored_manifest,
            index_bytes,
            index,
            table_bytes,
            table,
        })
    }

    /// What [`RemoteImage::from_parts`] makes this image again from.
    pub fn parts(&self) -> RemoteImageParts {
        RemoteImageParts {
            digest: self.digest,
            oci: self.oci.clone(),
            stored_manifest: self.stored_manifest.clone(),
            index_bytes: self.index_bytes.clone(),
            table_bytes: self.table_bytes.clone(),
        }
    }
}
