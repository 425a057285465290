//! Reading images from an OCI distribution registry (distribution, Harbor,
//! Quay, Docker Hub, …): `docker://[HOST[:PORT]/]NAME[:TAG|@DIGEST]`, through
//! [`skiff_registry::Registry`] and so with its credential rules (docker's
//! config, credential helpers, `SKIFF_REGISTRY_AUTH`; credentials only to
//! the registry's own host and token realm).

use std::io::Read;

use oci_spec::image::{ImageIndex as OciIndex, ImageManifest as OciManifest, MediaType};
use skiff_registry::{Registry, RegistryError, RegistryRef};

use crate::source::{
    is_index, layers_of, malformed, pick_platform, BlobLocation, Platform, ResolvedImage,
    MAX_JSON_BLOB,
};
use crate::verify::sha256_hex;
use crate::OciError;

/// Manifest media types we can read, most preferred first.
pub(crate) const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

impl From<RegistryError> for OciError {
    fn from(e: RegistryError) -> Self {
        OciError::Registry {
            url: String::new(),
            reason: e.to_string(),
        }
    }
}

/// A blob being downloaded; read errors name the blob and their whole cause.
pub(crate) struct BlobStream {
    response: reqwest::blocking::Response,
    digest: String,
}

impl Read for BlobStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.response.read(buf).map_err(|e| {
            // reqwest's own message is only the outermost layer ("body error").
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                reason = format!("{reason}: {cause}");
                source = cause.source();
            }
            std::io::Error::new(
                e.kind(),
                format!("downloading blob {}: {reason}", self.digest),
            )
        })
    }
}

pub(crate) fn open_blob(registry: &Registry, digest: &str) -> Result<BlobStream, OciError> {
    let parsed = digest.parse()?;
    Ok(BlobStream {
        response: registry.blob_stream(&parsed)?,
        digest: digest.to_owned(),
    })
}

pub(crate) fn resolve_registry(
    reference: &RegistryRef,
    client: &Registry,
    platform: &Platform,
) -> Result<ResolvedImage, OciError> {
    let fetch = |reference: &str, what: &str| -> Result<(Vec<u8>, String, String), OciError> {
        // The registry client checks a manifest asked for by digest against it.
        let (bytes, media_type, digest) =
            client
                .manifest(reference, &MANIFEST_TYPES)?
                .ok_or_else(|| OciError::Registry {
                    url: client.reference().with_reference(reference).to_string(),
                    reason: format!("404 (no such repository, tag or blob): no {what} there"),
                })?;
        Ok((bytes, media_type, digest.to_string()))
    };
    let (mut bytes, mut media_type, mut digest) = fetch(&reference.reference, "image manifest")?;
    if !MANIFEST_TYPES.contains(&media_type.as_str()) {
        return Err(OciError::UnknownMediaType(media_type));
    }
    if is_index(&MediaType::from(media_type.as_str())) {
        let index: OciIndex =
            serde_json::from_slice(&bytes).map_err(|e| malformed("image index", e))?;
        // Its platform entry is a launcher of one stub layer, not the image.
        if index.manifests().iter().any(|m| {
            m.artifact_type().as_ref().map(|t| t.to_string()).as_deref()
                == Some(skiff_format::artifact::ARTIFACT_TYPE)
        }) {
            return Err(OciError::Registry {
                url: client.reference().to_string(),
                reason: "this is a skiff image already: mount, run or pull it (`skiff pull`)"
                    .into(),
            });
        }
        let chosen = pick_platform(&index, platform)?;
        (bytes, media_type, digest) = fetch(chosen.digest().as_ref(), "image manifest")?;
        if is_index(&MediaType::from(media_type.as_str())) {
            return Err(malformed("image index", "an index inside an index"));
        }
    }
    let manifest: OciManifest =
        serde_json::from_slice(&bytes).map_err(|e| malformed("image manifest", e))?;
    let config_desc = manifest.config();
    let config_digest = config_desc.digest().to_string();
    sha256_hex(&config_digest)?;
    if config_desc.size() > MAX_JSON_BLOB {
        return Err(malformed(
            "image config",
            format!("{} bytes is too large", config_desc.size()),
        ));
    }
    let config = client.blob(&config_digest.parse()?, MAX_JSON_BLOB)?;
    let (layers, config_platform) = layers_of(&manifest, &config, |digest| {
        sha256_hex(digest)?;
        Ok(BlobLocation::Remote)
    })?;
    Ok(ResolvedImage {
        manifest_digest: digest,
        config_digest,
        config,
        platform: config_platform.unwrap_or_else(|| platform.clone()),
        layers,
    })
}
