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
use skiff_format::wire::{
    self, ChunkRecord, FrameChunk, RecordKind, RecordReader, UploadOutcome, CHUNK_CONTENT_TYPE,
    FRAME_RECORDS_CONTENT_TYPE, IDS_CONTENT_TYPE, MAX_CHUNK_BYTES, RECORDS_CONTENT_TYPE,
};
use skiff_format::ChunkId;
use skiff_store::{ChunkLocation, StoreError};
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::{CanRead, CanWrite};
use crate::body::Body;
use crate::error::ApiError;
use crate::AppState;

/// Uploads verified and stored at once; more wait for a slot.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;
/// A batch whose client reads nothing for this long is dropped.
const STALLED_CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Ids of a batch loaded in parallel before their records are sent.
const FETCH_PARALLEL_GROUP: usize = 16;
/// Ids of a batch located at once, and grouped by the frame that holds them.
const FRAME_PLAN_GROUP: usize = 1024;
/// A frame goes out as it is stored when the ids asked for are at least
/// this share of its bytes (in quarters); otherwise chunk by chunk.
const FRAME_WANTED_QUARTERS: u64 = 3;
/// Chunks never change under their id.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
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

/// Whether the client takes frame records (its `Accept` names them).
fn accepts_frames(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim() == FRAME_RECORDS_CONTENT_TYPE)
}

/// `POST /v1/chunks/fetch`: a record per requested id, in request order,
/// each sent as soon as it is read; to a client that accepts frame
/// records, frames as stored where most of one is asked for.
pub async fn fetch_chunks(
    _: CanRead,
    State(state): State<AppState>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let ids = parse_ids(&body)?;
    let count = ids.len();
    let frames = accepts_frames(&headers);
    // A few records in flight: the reader stays just ahead of the socket.
    let (records, stream) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    // An async task, not a blocking thread, waits on the client: a client
    // that stops reading holds no thread, and is dropped after a while.
    if frames {
        tokio::spawn(stream_frames(state, ids, records));
    } else {
        tokio::spawn(stream_records(state, ids, records));
    }
    let content_type = if frames {
        FRAME_RECORDS_CONTENT_TYPE
    } else {
        RECORDS_CONTENT_TYPE
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::HeaderName::from_static("x-skiff-chunk-count"),
                HeaderValue::from(count),
            ),
        ],
        body::Body::from_stream(ReceiverStream::new(stream)),
    )
        .into_response())
}

type RecordSender = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Sends a piece of the answer; false once the client is gone or stalled.
async fn send_piece(records: &RecordSender, piece: Result<Bytes, std::io::Error>) -> bool {
    match tokio::time::timeout(STALLED_CLIENT_TIMEOUT, records.send(piece)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false, // the client went away
        Err(_) => {
            tracing::warn!(
                "a batch client read nothing for {STALLED_CLIENT_TIMEOUT:?}; dropping it"
            );
            false
        }
    }
}

/// Ids of a batch that one record (or a run of them) answers.
enum Group {
    /// Ids held by one stored frame (any location of them names it).
    Frame(Vec<(ChunkId, ChunkLocation)>),
    Missing(ChunkId),
}

/// The ids of a batch as the frames that hold them, in the order each
/// frame is first needed; an id the store lacks is a group of its own.
fn by_frame(located: Vec<(ChunkId, Option<ChunkLocation>)>) -> Vec<Group> {
    let mut groups = Vec::new();
    let mut at: std::collections::HashMap<(u32, u64), usize> = std::collections::HashMap::new();
    for (id, location) in located {
        let Some(loc) = location else {
            groups.push(Group::Missing(id));
            continue;
        };
        match at.get(&(loc.pack, loc.frame_offset)) {
            Some(&n) => {
                if let Group::Frame(chunks) = &mut groups[n] {
                    chunks.push((id, loc));
                }
            }
            None => {
                at.insert((loc.pack, loc.frame_offset), groups.len());
                groups.push(Group::Frame(vec![(id, loc)]));
            }
        }
    }
    groups
}

/// Sends each distinct id once, in any order: a frame most of whose bytes
/// are asked for goes out as it is stored (no decompression, no
/// compression), the chunks of other frames one by one, as
/// [`stream_records`] sends them.
async fn stream_frames(state: AppState, ids: Vec<ChunkId>, records: RecordSender) {
    let mut seen = std::collections::HashSet::new();
    let ids: Vec<ChunkId> = ids.into_iter().filter(|id| seen.insert(*id)).collect();
    for batch in ids.chunks(FRAME_PLAN_GROUP) {
        let (shared, batch) = (state.clone(), batch.to_vec());
        let located = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .map(|id| Ok((id, shared.store.chunk_location(&id)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await;
        let located = match located {
            Ok(Ok(located)) => located,
            failed => {
                tracing::error!("locating chunks for a batch: {failed:?}");
                let _ = send_piece(
                    &records,
                    Err(std::io::Error::other("locating chunks failed")),
                )
                .await;
                return;
            }
        };
        for group in by_frame(located) {
            let chunks = match group {
                Group::Missing(id) => {
                    let header = wire::record_header(&id, RecordKind::Missing, 0);
                    if !send_piece(&records, Ok(Bytes::copy_from_slice(&header))).await {
                        return;
                    }
                    continue;
                }
                Group::Frame(chunks) => chunks,
            };
            let frame = chunks[0].1;
            let wanted: u64 = chunks.iter().map(|(_, loc)| u64::from(loc.len)).sum();
            let whole = wanted * 4 >= u64::from(frame.frame_raw_len) * FRAME_WANTED_QUARTERS;
            let sent = if whole {
                send_frame(&state, &records, frame, &chunks).await
            } else {
                let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
                send_chunks(&state, &records, &ids).await
            };
            if !sent {
                return;
            }
        }
    }
}

/// Sends one frame record: the frame's stored bytes and where `chunks` lie in it.
async fn send_frame(
    state: &AppState,
    records: &RecordSender,
    frame: ChunkLocation,
    chunks: &[(ChunkId, ChunkLocation)],
) -> bool {
    let shared = state.clone();
    let read = tokio::task::spawn_blocking(move || shared.store.read_raw_frame(&frame)).await;
    let compressed = match read {
        Ok(Ok(compressed)) => compressed,
        failed => {
            // Cut the stream short: the client sees a truncated body, never bad data.
            tracing::error!("reading a frame for a batch: {failed:?}");
            let _ = send_piece(
                records,
                Err(std::io::Error::other("reading a frame failed")),
            )
            .await;
            return false;
        }
    };
    let table: Vec<FrameChunk> = chunks
        .iter()
        .map(|(id, loc)| FrameChunk {
            id: *id,
            offset: loc.offset,
            len: loc.len,
        })
        .collect();
    let payload = wire::frame_payload(&table, frame.frame_raw_len, &compressed);
    let header = wire::record_header(&table[0].id, RecordKind::Frame, payload.len() as u32);
    state.metrics.chunks_out.inc_by(table.len() as u64);
    state
        .metrics
        .bytes_out
        .inc_by((wire::RECORD_HEADER_LEN + payload.len()) as u64);
    send_piece(records, Ok(Bytes::copy_from_slice(&header))).await
        && send_piece(records, Ok(Bytes::from(payload))).await
}

/// Sends a record per id, in order, until done or the client is gone.
async fn stream_records(state: AppState, ids: Vec<ChunkId>, records: RecordSender) {
    send_chunks(&state, &records, &ids).await;
}

/// A chunk record per id (its wire form, from the hot cache or loaded and
/// compressed), in order; false once the stream ended early.
async fn send_chunks(state: &AppState, records: &RecordSender, ids: &[ChunkId]) -> bool {
    let send = |piece: Result<Bytes, std::io::Error>| send_piece(records, piece);
    for group in ids.chunks(FETCH_PARALLEL_GROUP) {
        // Cached chunks are taken as they are; the others cost a frame read
        // and a compression each, so those are loaded in parallel, off the
        // async workers.
        let cached: Vec<_> = group.iter().map(|id| state.cache.get(id)).collect();
        let mut loaded = if cached.iter().all(Option::is_some) {
            Vec::new().into_iter()
        } else {
            let shared = state.clone();
            let misses: Vec<_> = group
                .iter()
                .zip(&cached)
                .filter(|(_, c)| c.is_none())
                .map(|(id, _)| *id)
                .collect();
            let loading = tokio::task::spawn_blocking(move || {
                misses
                    .par_iter()
                    .map(|id| shared.cache.load(&shared.store, id))
                    .collect::<Vec<_>>()
            });
            match loading.await {
                Ok(loaded) => loaded.into_iter(),
                Err(e) => {
                    tracing::error!("loading chunks for a batch: {e}");
                    let _ = send(Err(std::io::Error::other("loading chunks failed"))).await;
                    return false;
                }
            }
        };
        for (id, cached) in group.iter().zip(cached) {
            let result = match cached {
                Some(wire) => Ok(Some(wire)),
                None => loaded.next().unwrap_or(Ok(None)),
            };
            // Header and chunk go out as two pieces: the chunk is not copied.
            let sent = match record_pieces(state, id, result) {
                Ok((header, wire)) => {
                    let mut sent = send(Ok(header)).await;
                    if let (true, Some(wire)) = (sent, wire) {
                        sent = send(Ok(wire)).await;
                    }
                    sent
                }
                Err(e) => {
                    let _ = send(Err(e)).await;
                    false
                }
            };
            if !sent {
                return false; // the client is gone, or the stream is cut short
            }
        }
    }
    true
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
pub struct UploadSlot {
    _permit: OwnedSemaphorePermit,
}

impl FromRequestParts<AppState> for UploadSlot {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let permit = state
            .upload_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::internal("the server is shutting down"))?;
        Ok(UploadSlot { _permit: permit })
    }
}

/// `POST /v1/chunks`: stores uploaded chunk records. Every chunk is
/// decompressed and hashed first; one bad chunk refuses the whole upload
/// and nothing of it is stored.
pub async fn upload_chunks(
    _: CanWrite,
    slot: UploadSlot,
    State(state): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<UploadOutcome>), ApiError> {
    let shared = state.clone();
    // The slot travels with the work, not with this request: a client that
    // hangs up does not free it while its chunks are still being checked
    // or written.
    let (chunks, slot) = tokio::task::spawn_blocking(move || {
        verify_upload(&shared, &body).map(|chunks| (chunks, slot))
    })
    .await??;
    if chunks.is_empty() {
        return Err(ApiError::bad_request("the upload holds no chunks"));
    }
    state.metrics.chunks_received.inc_by(chunks.len() as u64);
    let outcome = state.writer.write(chunks, slot).await?;
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
