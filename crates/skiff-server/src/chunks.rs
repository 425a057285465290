//! Chunk routes: one chunk, a batch streamed as it is read, which are
//! missing, and uploads.

use std::str::FromStr;

use axum::body::{self, Bytes};
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rayon::prelude::*;
use skiff_chunk::decompress_chunk;
use skiff_format::wire::{self, ChunkRecord, RecordKind, RecordReader, UploadOutcome};
use skiff_format::ChunkId;
use skiff_store::StoreError;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::{CanRead, CanWrite};
use crate::body::Body;
use crate::error::ApiError;
use crate::AppState;

pub const CHUNK_CONTENT_TYPE: &str = "application/zstd";
pub const RECORDS_CONTENT_TYPE: &str = "application/vnd.skiff.chunks.v1";
pub const IDS_CONTENT_TYPE: &str = "application/vnd.skiff.chunk-ids.v1";
/// Uploads verified and stored at once; more wait for a slot.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// Ids of a batch loaded in parallel before their records are sent.
const FETCH_PARALLEL_GROUP: usize = 16;
/// Chunks never change under their id.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// The largest chunk an upload may hold once decompressed (FastCDC's maximum).
const MAX_CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// All chunks of one upload, decompressed: bounds the memory a request costs.
pub const MAX_UPLOAD_RAW_BYTES: usize = 256 * 1024 * 1024;

fn parse_id(text: &str) -> Result<ChunkId, ApiError> {
    ChunkId::from_str(text).map_err(|e| ApiError::bad_request(format!("chunk id: {e}")))
}

/// `ETag` and `Cache-Control` for content named by its digest (`hex`):
/// the tag is the digest in quotes, and the bytes never change.
pub(crate) fn immutable_headers(hex: &[u8; 64]) -> [(header::HeaderName, HeaderValue); 2] {
    let mut tag = [b'"'; 66];
    tag[1..65].copy_from_slice(hex);
    [
        (
            header::ETAG,
            HeaderValue::from_bytes(&tag).expect("hex is a valid header value"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE)),
    ]
}

/// Whether `If-None-Match` names the content with digest `hex`.
pub(crate) fn not_modified(hex: &[u8; 64], headers: &HeaderMap) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|candidate| {
            let candidate = candidate.trim().trim_start_matches("W/");
            candidate == "*"
                || candidate
                    .strip_prefix('"')
                    .and_then(|c| c.strip_suffix('"'))
                    .is_some_and(|c| c.as_bytes() == hex)
        })
}

/// `GET /v1/chunks/{id}`: the chunk as one zstd frame.
pub async fn get_chunk(
    _: CanRead,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let hex = id.hex_bytes();
    if not_modified(&hex, &headers) && state.store.contains_chunk(&id)? {
        return Ok((StatusCode::NOT_MODIFIED, immutable_headers(&hex)).into_response());
    }
    let wire = match state.cache.get(&id) {
        Some(wire) => wire,
        None => {
            let shared = state.clone();
            tokio::task::spawn_blocking(move || shared.cache.load(&shared.store, &id))
                .await??
                .ok_or_else(|| ApiError::not_found(format!("chunk {id} is not on this server")))?
        }
    };
    state.metrics.chunks_out.inc();
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(CHUNK_CONTENT_TYPE),
        )],
        immutable_headers(&hex),
        wire,
    )
        .into_response())
}

/// `HEAD /v1/chunks/{id}`: whether the chunk is here, and its size.
pub async fn head_chunk(
    _: CanRead,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let location = state
        .store
        .chunk_location(&id)?
        .ok_or_else(|| ApiError::not_found(format!("chunk {id} is not on this server")))?;
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(CHUNK_CONTENT_TYPE),
        )],
        immutable_headers(&id.hex_bytes()),
    )
        .into_response();
    response
        .headers_mut()
        .insert("x-skiff-chunk-length", HeaderValue::from(location.len));
    Ok(response)
}

fn parse_ids(body: &[u8]) -> Result<Vec<ChunkId>, ApiError> {
    let ids = wire::decode_ids(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::bad_request("the id list is empty"));
    }
    Ok(ids)
}

/// `POST /v1/chunks/fetch`: a record per requested id, in request order,
/// each sent as soon as it is read.
pub async fn fetch_chunks(
    _: CanRead,
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let ids = parse_ids(&body)?;
    let count = ids.len();
    // A few records in flight: the reader stays just ahead of the socket.
    let (records, stream) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let shared = state.clone();
    tokio::task::spawn_blocking(move || {
        for group in ids.chunks(FETCH_PARALLEL_GROUP) {
            // Cached chunks are taken as they are; the others cost a frame
            // read and a compression each, so those are loaded in parallel.
            let mut loaded: Vec<_> = group.iter().map(|id| shared.cache.get(id)).collect();
            let misses: Vec<_> = (0..group.len()).filter(|&i| loaded[i].is_none()).collect();
            let mut fetched = misses
                .par_iter()
                .map(|&i| shared.cache.load(&shared.store, &group[i]))
                .collect::<Vec<_>>()
                .into_iter();
            for (id, cached) in group.iter().zip(loaded.drain(..)) {
                let result = match cached {
                    Some(wire) => Ok(Some(wire)),
                    None => fetched.next().expect("one load per miss"),
                };
                // Header and chunk go out as two pieces: the chunk is not copied.
                let failed = match record_pieces(&shared, id, result) {
                    Ok((header, wire)) => {
                        records.blocking_send(Ok(header)).is_err()
                            || wire.is_some_and(|w| records.blocking_send(Ok(w)).is_err())
                    }
                    Err(e) => {
                        let _ = records.blocking_send(Err(e));
                        true
                    }
                };
                if failed {
                    return; // the client went away, or the stream is cut short
                }
            }
        }
    });
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(RECORDS_CONTENT_TYPE),
            ),
            (
                header::HeaderName::from_static("x-skiff-chunk-count"),
                HeaderValue::from(count),
            ),
        ],
        body::Body::from_stream(ReceiverStream::new(stream)),
    )
        .into_response())
}

/// One record of a batch answer: its header, and the chunk if there is one.
fn record_pieces(
    state: &AppState,
    id: &ChunkId,
    loaded: Result<Option<Bytes>, StoreError>,
) -> Result<(Bytes, Option<Bytes>), std::io::Error> {
    match loaded {
        Ok(Some(wire)) => {
            state.metrics.chunks_out.inc();
            state
                .metrics
                .bytes_out
                .inc_by((wire::RECORD_HEADER_LEN + wire.len()) as u64);
            let header = wire::record_header(id, RecordKind::Chunk, wire.len() as u32);
            Ok((Bytes::copy_from_slice(&header), Some(wire)))
        }
        Ok(None) => {
            let header = wire::record_header(id, RecordKind::Missing, 0);
            Ok((Bytes::copy_from_slice(&header), None))
        }
        Err(e) => {
            // Cut the stream short: the client sees a truncated body, never bad data.
            tracing::error!("reading chunk {id} for a batch: {e}");
            Err(std::io::Error::other(e.to_string()))
        }
    }
}

/// `POST /v1/chunks/missing`: which of the listed ids this server lacks.
pub async fn missing_chunks(
    _: CanRead,
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let ids = parse_ids(&body)?;
    let shared = state.clone();
    let missing = tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for id in &ids {
            if !shared.store.contains_chunk(id)? {
                missing.push(*id);
            }
        }
        Ok::<_, ApiError>(missing)
    })
    .await??;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(IDS_CONTENT_TYPE),
        )],
        wire::encode_ids(&missing),
    )
        .into_response())
}

/// A place among the uploads verified at once, taken before the body is
/// read (the client waits on TCP back-pressure meanwhile), so memory stays
/// bounded however many clients push: at most
/// [`MAX_CONCURRENT_UPLOADS`] × (64 MiB body + 256 MiB decompressed).
pub struct UploadSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl FromRequestParts<AppState> for UploadSlot {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let permit = state
            .upload_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the server is shutting down"))?;
        Ok(UploadSlot(permit))
    }
}

/// `POST /v1/chunks`: stores uploaded chunk records. Every chunk is
/// decompressed and hashed first; one bad chunk refuses the whole upload
/// and nothing of it is stored.
pub async fn upload_chunks(
    _: CanWrite,
    _slot: UploadSlot,
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<UploadOutcome>), ApiError> {
    let shared = state.clone();
    let chunks = tokio::task::spawn_blocking(move || verify_upload(&shared, &body)).await??;
    if chunks.is_empty() {
        return Err(ApiError::bad_request("the upload holds no chunks"));
    }
    state.metrics.chunks_received.inc_by(chunks.len() as u64);
    let outcome = state.writer.write(chunks).await?;
    state.metrics.chunks_stored.inc_by(outcome.stored);
    Ok((StatusCode::OK, Json(outcome)))
}

fn verify_upload(state: &AppState, body: &[u8]) -> Result<Vec<(ChunkId, Vec<u8>)>, ApiError> {
    let mut chunks = Vec::new();
    let mut raw_bytes = 0usize;
    for record in RecordReader::new(body) {
        let record = record.map_err(|e| ApiError::bad_request(format!("upload body: {e}")))?;
        let ChunkRecord::Chunk { id, wire } = record else {
            return Err(ApiError::bad_request(format!(
                "upload body: record for {} carries no chunk",
                record.id()
            )));
        };
        let data = decompress_chunk(&id, &wire, MAX_CHUNK_BYTES).map_err(|e| {
            state.metrics.chunks_rejected.inc();
            tracing::warn!("refused an upload: chunk {id}: {e}");
            ApiError::unprocessable(format!("upload refused: chunk {id}: {e}"))
        })?;
        raw_bytes += data.len();
        if raw_bytes > MAX_UPLOAD_RAW_BYTES {
            return Err(ApiError::too_large(format!(
                "the upload's chunks decompress to more than {MAX_UPLOAD_RAW_BYTES} bytes; send smaller batches"
            )));
        }
        chunks.push((id, data));
    }
    Ok(chunks)
}
