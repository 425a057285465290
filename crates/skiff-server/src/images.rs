//! Image routes: the catalog, manifests and indexes.

use std::str::FromStr;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use skiff_format::wire::{
    manifest_etag, ImageSummary, INDEX_CONTENT_TYPE, MANIFEST_CONTENT_TYPE, MAX_INDEX_BYTES,
};
use skiff_format::{ImageManifest, ImageRef, IndexDigest};
use skiff_store::StoreError;

use crate::auth::{CanRead, CanWrite};
use crate::body::Body;
use crate::chunks::{immutable_headers, not_modified, UploadSlot};
use crate::error::ApiError;
use crate::AppState;

fn parse_image(text: &str) -> Result<ImageRef, ApiError> {
    ImageRef::from_str(text).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn parse_digest(text: &str) -> Result<IndexDigest, ApiError> {
    IndexDigest::from_str(text).map_err(|e| ApiError::bad_request(format!("index digest: {e}")))
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    work: impl FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let shared = state.clone();
    tokio::task::spawn_blocking(move || work(&shared)).await?
}

/// `GET /v1/images`: every image, sorted by name and tag.
pub async fn list_images(
    _: CanRead,
    State(state): State<AppState>,
) -> Result<Json<Vec<ImageSummary>>, ApiError> {
    let images = blocking(&state, |s| Ok(s.store.images()?)).await?;
    Ok(Json(images.iter().map(ImageSummary::from).collect()))
}

/// `GET /v1/tags/{name}`: the tags of one image name.
pub async fn list_tags(
    _: CanRead,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // Names follow the rules of references: `NAME:latest` must parse.
    let probe = parse_image(&format!("{name}:latest"))?;
    let images = blocking(&state, |s| Ok(s.store.images()?)).await?;
    let tags: Vec<&str> = images
        .iter()
        .filter(|m| m.name == probe.name)
        .map(|m| m.tag.as_str())
        .collect();
    if tags.is_empty() {
        return Err(ApiError::not_found(format!(
            "no image named {}",
            probe.name
        )));
    }
    Ok(Json(
        serde_json::json!({ "name": probe.name, "tags": tags }),
    ))
}

/// `GET /v1/manifests/{name:tag}`: the manifest, and, for a recently pushed
/// image, a head start for the client's first chunk requests (the hot-chunk
/// cache is warmed behind it).
pub async fn get_manifest(
    _: CanRead,
    State(state): State<AppState>,
    Path(image): Path<String>,
) -> Result<Response, ApiError> {
    let image = parse_image(&image)?;
    let manifest = blocking(&state, move |s| Ok(s.store.image(&image)?)).await?;
    let body = manifest.to_json();
    // Most reads are of images not pushed lately: no task for those.
    if state.cache.recently_pushed(&manifest.image_ref()) {
        let shared = state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = shared.cache.warm(&shared.store, &manifest) {
                tracing::warn!("warming the cache for {}: {e}", manifest.image_ref());
            }
        });
    }
    let etag = HeaderValue::from_str(&manifest_etag(&body))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(MANIFEST_CONTENT_TYPE),
            ),
            (header::ETAG, etag),
        ],
        body,
    )
        .into_response())
}

/// `PUT /v1/manifests/{name:tag}`: tags a manifest whose index is stored.
/// With `If-Match: ETAG`, only if the tag still names the manifest that
/// `GET` answered with that tag (412 otherwise): a client that adds to a
/// manifest it read (a startup profile) never moves the tag back.
pub async fn put_manifest(
    _: CanWrite,
    State(state): State<AppState>,
    Path(image): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    let if_match = headers
        .get(header::IF_MATCH)
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| ApiError::bad_request("If-Match is not text"))?;
    let image = parse_image(&image)?;
    let manifest =
        ImageManifest::from_json(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if manifest.image_ref() != image {
        return Err(ApiError::bad_request(format!(
            "the manifest is for {}, not {image}",
            manifest.image_ref()
        )));
    }
    blocking(&state, move |s| {
        // Read, compare and write as one step among this server's tag changes.
        let _tags = s
            .tags
            .lock()
            .map_err(|_| ApiError::internal("tag lock poisoned"))?;
        if let Some(expected) = &if_match {
            let current = match s.store.image(&image) {
                Ok(current) => Some(manifest_etag(&current.to_json())),
                Err(StoreError::ImageNotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let matches = match expected.as_str() {
                "*" => current.is_some(),
                tag => current.as_deref() == Some(tag),
            };
            if !matches {
                return Err(ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    format!("{image} has changed since it was read (If-Match {expected})"),
                ));
            }
        }
        match s.store.put_manifest(&manifest) {
            Err(StoreError::IndexNotFound(digest)) => Err(ApiError::unprocessable(format!(
                "index {digest} is not on this server: upload it first"
            ))),
            other => {
                other?;
                s.cache.note_pushed(&manifest);
                Ok(())
            }
        }
    })
    .await?;
    Ok(StatusCode::CREATED)
}

/// `DELETE /v1/manifests/{name:tag}`: removes the tag (data stays until gc).
pub async fn delete_manifest(
    _: CanWrite,
    State(state): State<AppState>,
    Path(image): Path<String>,
) -> Result<StatusCode, ApiError> {
    let image = parse_image(&image)?;
    blocking(&state, move |s| {
        let _tags = s
            .tags
            .lock()
            .map_err(|_| ApiError::internal("tag lock poisoned"))?;
        Ok(s.store.remove_image(&image)?)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/indexes/{digest}`: the encoded index, zstd-compressed. Indexes
/// never change under their digest: ETag and `If-None-Match` as for chunks.
pub async fn get_index(
    _: CanRead,
    State(state): State<AppState>,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest = parse_digest(&digest)?;
    let hex = digest.hex_bytes();
    if not_modified(&hex, &headers) && state.store.contains_index(&digest)? {
        return Ok((StatusCode::NOT_MODIFIED, immutable_headers(&hex)).into_response());
    }
    let compressed = blocking(&state, move |s| {
        let encoded = s.store.index_bytes(&digest)?;
        zstd::bulk::compress(&encoded, 3)
            .map_err(|e| ApiError::internal(format!("compressing index {digest}: {e}")))
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(INDEX_CONTENT_TYPE),
        )],
        immutable_headers(&hex),
        compressed,
    )
        .into_response())
}

/// `PUT /v1/indexes/{digest}`: stores an index once every chunk it names is here.
pub async fn put_index(
    _: CanWrite,
    _slot: UploadSlot,
    State(state): State<AppState>,
    Path(digest): Path<String>,
    Body(body): Body,
) -> Result<StatusCode, ApiError> {
    let digest = parse_digest(&digest)?;
    blocking(&state, move |s| {
        let encoded = skiff_chunk::decompress_bounded(&body, MAX_INDEX_BYTES).map_err(|e| {
            ApiError::unprocessable(format!(
                "the body is not a zstd-compressed index of at most {MAX_INDEX_BYTES} bytes: {e}"
            ))
        })?;
        let actual = IndexDigest::of(&encoded);
        if actual != digest {
            return Err(ApiError::unprocessable(format!(
                "the index hashes to {actual}, not {digest}"
            )));
        }
        match s.store.put_index(&encoded) {
            // The index itself does not decode or validate: the client's fault.
            Err(StoreError::Format(e)) => Err(ApiError::unprocessable(e.to_string())),
            other => Ok(other.map(drop)?),
        }
    })
    .await?;
    Ok(StatusCode::CREATED)
}
