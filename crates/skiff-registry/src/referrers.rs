//! skiff artifacts attached beside an unconverted image, so that its name
//! stays as it is and every other client pulls it as before (OCI 1.1
//! `subject`, found through the referrers API or its tag fallback, as SOCI
//! does).
//!
//! containerd unpacks an image layer by layer, and each layer's snapshot is
//! named by its chain id: the identity of the root file system the layers
//! up to it make, which images sharing a base share too. So one artifact
//! is attached for each prefix of the image's layers, each an ordinary
//! skiff image of that prefix's merged tree, annotated with its chain id:
//! a snapshot made from one is right for every image that has that chain
//! id, and any layer an image adds on top unpacks onto it.

use std::collections::BTreeMap;

use skiff_format::artifact::ARTIFACT_TYPE;

use crate::client::Registry;
use crate::digest::{sha256_digest, Sha256Digest};
use crate::image::{OciManifest, RemoteImage};
use crate::RegistryError;

/// On an attached artifact: the chain id of the layer prefix it holds.
pub const CHAIN_ID_ANNOTATION: &str = "dev.skiff.chain-id";

/// The tag that lists `subject`'s referrers where the registry has no
/// referrers API.
pub fn referrers_tag(subject: &Sha256Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// containerd's chain ids for layers with these diff_ids, bottom first:
/// the first is its diff_id, each next one the digest of "PREVIOUS DIFF_ID".
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(previous) => sha256_digest(format!("{previous} {diff_id}").as_bytes()).to_string(),
        };
        chain.push(next);
    }
    chain
}

/// The skiff artifacts attached to the image manifest `subject`: chain id →
/// the artifacts that say they hold it, in the order the registry lists them
/// (a reader checks each with [`check_attached`] before it trusts the claim).
pub fn attached(
    registry: &Registry,
    subject: &Sha256Digest,
) -> Result<BTreeMap<String, Vec<Sha256Digest>>, RegistryError> {
    let mut by_chain: BTreeMap<String, Vec<Sha256Digest>> = BTreeMap::new();
    for entry in registry.referrers(subject, ARTIFACT_TYPE)? {
        if let Some(chain) = entry.annotations.get(CHAIN_ID_ANNOTATION) {
            let candidates = by_chain.entry(chain.clone()).or_default();
            if !candidates.contains(&entry.digest) {
                candidates.push(entry.digest);
            }
        }
    }
    Ok(by_chain)
}

/// Reads the artifact at `registry`'s reference (a digest) as a mount
/// would, all its metadata (so a snapshot committed for it can be mounted
/// later), and checks that it is a skiff image attached to `subject` whose
/// layers have the chain id `chain_id`; returns its layers' chain ids,
/// bottom first.
pub fn check_attached(
    registry: &Registry,
    subject: &Sha256Digest,
    chain_id: &str,
) -> Result<Vec<String>, RegistryError> {
    let refused = |reason: String| RegistryError::NotSkiff {
        reference: registry.reference().to_string(),
        reason,
    };
    let image = RemoteImage::fetch(registry)?;
    check_subject(&image.oci, subject).map_err(refused)?;
    let chain = chain_ids(&image.stored_manifest.source.diff_ids);
    if chain.last().map(String::as_str) != Some(chain_id) {
        return Err(refused(format!(
            "its layers' chain id is {}, not {chain_id}",
            chain.last().map_or("(no layers)", String::as_str)
        )));
    }
    if image
        .oci
        .annotations
        .get(CHAIN_ID_ANNOTATION)
        .map(String::as_str)
        != Some(chain_id)
    {
        return Err(refused(format!(
            "its {CHAIN_ID_ANNOTATION} annotation is not {chain_id}"
        )));
    }
    Ok(chain)
}

fn check_subject(oci: &OciManifest, subject: &Sha256Digest) -> Result<(), String> {
    match &oci.subject {
        Some(d) if d.digest == *subject => Ok(()),
        Some(d) => Err(format!("it is attached to {}, not {subject}", d.digest)),
        None => Err("it is attached to no image".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_containerd() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chain = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chain[0], a);
        // sha256("sha256:aaa… sha256:bbb…"), as containerd's identity.ChainID computes it.
        assert_eq!(
            chain[1],
            sha256_digest(format!("{a} {b}").as_bytes()).to_string()
        );
        assert_ne!(chain_ids(&[b, a])[1], chain[1]);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn the_fallback_tag_is_the_digest_with_a_dash() {
        let d: Sha256Digest = format!("sha256:{}", "0f".repeat(32)).parse().unwrap();
        assert_eq!(referrers_tag(&d), format!("sha256-{}", "0f".repeat(32)));
    }
}
