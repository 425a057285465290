//! Requests to a skiff chunk server (docs/API.md), blocking.

use std::io::Read;
use std::time::Duration;

use reqwest::blocking::{RequestBuilder, Response};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::de::DeserializeOwned;
use skiff_chunk::{decompress_bounded, decompress_chunk, decompress_frame, verify_chunk};
use skiff_format::wire::{
    self, AccessReport, ChunkRecord, FrameChunk, ImageSummary, RecordReader, UploadOutcome,
    FRAME_RECORDS_CONTENT_TYPE, INDEX_CONTENT_TYPE, MANIFEST_CONTENT_TYPE, MAX_CHUNK_BYTES,
    MAX_INDEX_BYTES, RECORDS_CONTENT_TYPE,
};
use skiff_format::{ChunkId, ImageIndex, ImageManifest, ImageRef, IndexDigest};
use skiff_registry::body::{read_bounded, BodyError};

use bytes::Bytes;
use skiff_source::Backoff;

use crate::ClientError;

/// How long a failing request is retried unless told otherwise.
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// A connection to one chunk server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::blocking::Client,
    base: String,
    token: Option<String>,
    retry_window: Duration,
    batch_timeout: Option<Duration>,
}

impl Client {
    /// `server` is `http://HOST:PORT` (or https); `token` is sent as a bearer token.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        let base = server.trim_end_matches('/').to_owned();
        let scheme = reqwest::Url::parse(&base)
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
            .map(|url| url.scheme().to_owned())
            .ok_or_else(|| ClientError::InvalidServer(server.to_owned()))?;
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Whole requests, including a batch body on a slow link.
            .timeout(Duration::from_secs(300));
        if scheme == "http" {
            // No TLS to a plain-HTTP server: loading the system's roots (some
            // 150 files) would only delay a cold mount's first request.
            builder = builder.tls_certs_only(std::iter::empty());
        }
        let http = builder.build().map_err(|source| ClientError::Http {
            url: base.clone(),
            source,
        })?;
        Ok(Client {
            http,
            base,
            token,
            retry_window: DEFAULT_RETRY_WINDOW,
            batch_timeout: None,
        })
    }

    /// Retries requests that fail for a passing reason (see
    /// [`ClientError::is_transient`]) for up to `window`; zero turns retries off.
    pub fn with_retry_window(mut self, window: Duration) -> Self {
        self.retry_window = window;
        self
    }

    /// Bounds each attempt of a batch fetch, so a server that stalls costs
    /// a retry rather than the whole window; attempts never outlast the window.
    pub fn with_batch_timeout(mut self, timeout: Duration) -> Self {
        self.batch_timeout = Some(timeout);
        self
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn protocol(url: &str, message: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            url: url.to_owned(),
            message: message.into(),
        }
    }

    /// Sends one request; any answer but 2xx becomes [`ClientError::Status`].
    fn send_once(&self, url: &str, request: RequestBuilder) -> Result<Response, ClientError> {
        let request = match &self.token {
            Some(token) => request.header(AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        };
        let response = request.send().map_err(|source| ClientError::Http {
            url: url.to_owned(),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        // An error body is a sentence: a peer cannot make it cost more.
        let body = read_body(response, MAX_ERROR_BODY, url)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        Err(ClientError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            message,
        })
    }

    /// Sends a request and reads its whole answer, retrying both for passing
    /// failures. `tolerated` names a status that ends the request without an
    /// error once it was retried (a DELETE whose first answer was lost).
    /// Answers longer than `limit` bytes are refused, never read whole.
    fn call(
        &self,
        url: &str,
        request: RequestBuilder,
        limit: u64,
        tolerated_after_retry: Option<u16>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut backoff = Backoff::new(self.retry_window);
        let mut retried = false;
        loop {
            // Bodies are in memory, so a request can always be cloned.
            let attempt = request
                .try_clone()
                .ok_or_else(|| Self::protocol(url, "a request with a streamed body"))?;
            let answer = self
                .send_once(url, attempt)
                .and_then(|response| read_body(response, limit, url));
            match answer {
                Err(e)
                    if retried && e.status().is_some() && e.status() == tolerated_after_retry =>
                {
                    return Ok(Vec::new());
                }
                Err(e) if backoff.retry(e.is_transient(), &e) => retried = true,
                other => return other,
            }
        }
    }

    fn call_json<T: DeserializeOwned>(
        &self,
        url: &str,
        request: RequestBuilder,
        limit: u64,
    ) -> Result<T, ClientError> {
        let body = self.call(url, request, limit, None)?;
        serde_json::from_slice(&body).map_err(|e| Self::protocol(url, e.to_string()))
    }

    pub fn health(&self) -> Result<(), ClientError> {
        let url = self.url("/healthz");
        self.call(&url, self.http.get(&url), MAX_SMALL_BODY, None)
            .map(drop)
    }

    /// What this client's token (or no token) may do on the server.
    pub fn access(&self) -> Result<AccessReport, ClientError> {
        let url = self.url("/v1/auth");
        self.call_json(&url, self.http.get(&url), MAX_SMALL_BODY)
    }

    pub fn images(&self) -> Result<Vec<ImageSummary>, ClientError> {
        let url = self.url("/v1/images");
        self.call_json(&url, self.http.get(&url), MAX_LISTING_BODY)
    }

    /// The manifest tagged `image`; `None` if the server has no such tag.
    pub fn manifest(&self, image: &ImageRef) -> Result<Option<ImageManifest>, ClientError> {
        Ok(self.manifest_and_etag(image)?.map(|(manifest, _)| manifest))
    }

    /// The manifest tagged `image` and its entity tag, for
    /// [`Client::put_manifest_if_match`]; `None` if the server has no such tag.
    pub fn manifest_and_etag(
        &self,
        image: &ImageRef,
    ) -> Result<Option<(ImageManifest, String)>, ClientError> {
        let url = self.url(&format!("/v1/manifests/{image}"));
        let body = match self.call(&url, self.http.get(&url), wire::MAX_MANIFEST_BYTES, None) {
            Err(e) if e.status() == Some(404) => return Ok(None),
            other => other?,
        };
        let manifest =
            ImageManifest::from_json(&body).map_err(|e| Self::protocol(&url, e.to_string()))?;
        if manifest.image_ref() != *image {
            return Err(Self::protocol(
                &url,
                format!("asked for {image}, got {}", manifest.image_ref()),
            ));
        }
        // The server's ETag is the hash of exactly these bytes.
        Ok(Some((manifest, wire::manifest_etag(&body))))
    }

    pub fn put_manifest(&self, manifest: &ImageManifest) -> Result<(), ClientError> {
        self.put_manifest_where(manifest, None)
    }

    /// Replaces the tag only if it still names what `etag` (from
    /// [`Client::manifest_and_etag`]) named; a 412 [`ClientError::Status`] if not.
    pub fn put_manifest_if_match(
        &self,
        manifest: &ImageManifest,
        etag: &str,
    ) -> Result<(), ClientError> {
        self.put_manifest_where(manifest, Some(etag))
    }

    fn put_manifest_where(
        &self,
        manifest: &ImageManifest,
        if_match: Option<&str>,
    ) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/manifests/{}", manifest.image_ref()));
        let mut request = self
            .http
            .put(&url)
            .header(CONTENT_TYPE, MANIFEST_CONTENT_TYPE)
            .body(manifest.to_json());
        if let Some(etag) = if_match {
            request = request.header(reqwest::header::IF_MATCH, etag);
        }
        self.call(&url, request, MAX_SMALL_BODY, None).map(drop)
    }

    pub fn delete_manifest(&self, image: &ImageRef) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/manifests/{image}"));
        // A retry that finds the tag gone means the first attempt removed it.
        self.call(&url, self.http.delete(&url), MAX_SMALL_BODY, Some(404))
            .map(drop)
    }

    /// An image's manifest and its index, encoded (as checked against its
    /// digest) and decoded (and validated).
    pub fn image(
        &self,
        image: &ImageRef,
    ) -> Result<(ImageManifest, Vec<u8>, ImageIndex), ClientError> {
        let manifest = self.manifest(image)?.ok_or_else(|| ClientError::Status {
            url: self.base.clone(),
            status: 404,
            message: format!("the server has no image {image}"),
        })?;
        let encoded = self.index_bytes(&manifest.index.digest)?;
        let index = ImageIndex::decode(&encoded)?;
        index.validate()?;
        Ok((manifest, encoded, index))
    }

    /// The encoded index, checked against its digest.
    pub fn index_bytes(&self, digest: &IndexDigest) -> Result<Vec<u8>, ClientError> {
        let url = self.url(&format!("/v1/indexes/{digest}"));
        let compressed = self.call(
            &url,
            self.http.get(&url),
            wire::MAX_COMPRESSED_INDEX_BYTES,
            None,
        )?;
        let encoded = decompress_bounded(&compressed, MAX_INDEX_BYTES)
            .map_err(|e| Self::protocol(&url, format!("index: {e}")))?;
        let actual = IndexDigest::of(&encoded);
        if actual != *digest {
            return Err(Self::protocol(
                &url,
                format!("asked for index {digest}, got bytes hashing to {actual}"),
            ));
        }
        Ok(encoded)
    }

    pub fn put_index(&self, encoded: &[u8]) -> Result<(), ClientError> {
        let digest = IndexDigest::of(encoded);
        let url = self.url(&format!("/v1/indexes/{digest}"));
        let compressed = zstd::bulk::compress(encoded, 3)
            .map_err(|e| Self::protocol(&url, format!("compressing the index: {e}")))?;
        let request = self
            .http
            .put(&url)
            .header(CONTENT_TYPE, INDEX_CONTENT_TYPE)
            .body(compressed);
        self.call(&url, request, MAX_SMALL_BODY, None).map(drop)
    }

    /// Which of `ids` (at most [`wire::MAX_IDS_PER_REQUEST`]) the server lacks, in
    /// the order asked.
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, ClientError> {
        let url = self.url("/v1/chunks/missing");
        let request = self.http.post(&url).body(wire::encode_ids(ids));
        let limit = (ids.len() * wire::ID_LEN) as u64;
        let body = self.call(&url, request, limit, None)?;
        wire::decode_ids(&body).map_err(|e| Self::protocol(&url, e.to_string()))
    }

    /// Fetches `ids` (at most [`wire::MAX_IDS_PER_REQUEST`]) in one request and
    /// hands each distinct chunk once, verified against its id, to `each` as
    /// it arrives, with the size it had on the wire: in the order asked from
    /// a server that sends chunk by chunk, a frame's chunks together from
    /// one that sends the frames it stores. An answer cut short is asked
    /// again for the chunks still to come; the retry window restarts
    /// whenever chunks arrive.
    pub fn fetch(
        &self,
        ids: &[ChunkId],
        mut each: impl FnMut(ChunkId, Bytes, usize) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut backoff = Backoff::new(self.retry_window);
        let mut seen = std::collections::HashSet::new();
        let mut wanted: Vec<ChunkId> = ids.iter().copied().filter(|id| seen.insert(*id)).collect();
        let mut delivered = std::collections::HashSet::new();
        while !wanted.is_empty() {
            let before = delivered.len();
            let timeout = self
                .batch_timeout
                .map(|t| t.min(backoff.remaining()).max(Backoff::FIRST_DELAY));
            let attempt = self.fetch_once(&wanted, timeout, &mut |id, data, wire_len| {
                each(id, data, wire_len)?;
                delivered.insert(id);
                Ok(())
            });
            let progressed = delivered.len() > before;
            wanted.retain(|id| !delivered.contains(id));
            match attempt {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if progressed {
                        backoff.progressed();
                    }
                    // Everything arrived and only the end of the answer was
                    // lost: there is nothing left to ask for.
                    if wanted.is_empty() && e.is_transient() {
                        return Ok(());
                    }
                    if !backoff.retry(e.is_transient(), &e) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn fetch_once(
        &self,
        ids: &[ChunkId],
        timeout: Option<Duration>,
        each: &mut dyn FnMut(ChunkId, Bytes, usize) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let url = self.url("/v1/chunks/fetch");
        let mut request = self
            .http
            .post(&url)
            .header(
                ACCEPT,
                format!("{FRAME_RECORDS_CONTENT_TYPE}, {RECORDS_CONTENT_TYPE}"),
            )
            .body(wire::encode_ids(ids));
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response = self.send_once(&url, request)?;
        let cut_short = |message: String| ClientError::Interrupted {
            url: url.clone(),
            message,
        };
        let frames = response
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes() == FRAME_RECORDS_CONTENT_TYPE.as_bytes());
        let mut records = RecordReader::new(response);
        if frames {
            Self::read_frame_answer(&url, ids, &mut records, each)?;
            return Self::nothing_more(&url, records);
        }
        for expected in ids {
            let record = records
                .next_record()
                .map_err(|e| cut_short(format!("batch body: {e}")))?
                .ok_or_else(|| cut_short(format!("the batch ended before chunk {expected}")))?;
            match record {
                ChunkRecord::Chunk { id, wire } if id == *expected => {
                    each(
                        id,
                        Bytes::from(decompress_chunk(&id, &wire, MAX_CHUNK_BYTES)?),
                        wire.len(),
                    )?;
                }
                ChunkRecord::Missing(id) if id == *expected => {
                    return Err(ClientError::ChunkMissing(id));
                }
                other => {
                    return Err(Self::protocol(
                        &url,
                        format!("expected chunk {expected}, got a record for {}", other.id()),
                    ))
                }
            }
        }
        Self::nothing_more(&url, records)
    }

    /// Reads an answer of chunk and frame records in any order until every
    /// one of `ids` (distinct) has come once.
    fn read_frame_answer(
        url: &str,
        ids: &[ChunkId],
        records: &mut RecordReader<Response>,
        each: &mut dyn FnMut(ChunkId, Bytes, usize) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut outstanding: std::collections::HashSet<ChunkId> = ids.iter().copied().collect();
        let cut_short = |message: String| ClientError::Interrupted {
            url: url.to_owned(),
            message,
        };
        let unasked = |id: &ChunkId| {
            Self::protocol(
                url,
                format!("a record for chunk {id}, not asked for or sent twice"),
            )
        };
        while !outstanding.is_empty() {
            let record = records
                .next_record()
                .map_err(|e| cut_short(format!("batch body: {e}")))?
                .ok_or_else(|| {
                    cut_short(format!(
                        "the batch ended {} chunks short",
                        outstanding.len()
                    ))
                })?;
            match record {
                ChunkRecord::Chunk { id, wire } => {
                    if !outstanding.remove(&id) {
                        return Err(unasked(&id));
                    }
                    each(
                        id,
                        Bytes::from(decompress_chunk(&id, &wire, MAX_CHUNK_BYTES)?),
                        wire.len(),
                    )?;
                }
                ChunkRecord::Missing(id) if outstanding.contains(&id) => {
                    return Err(ClientError::ChunkMissing(id));
                }
                ChunkRecord::Missing(id) => return Err(unasked(&id)),
                ChunkRecord::Frame {
                    chunks,
                    raw_len,
                    frame,
                } => {
                    if let Some(c) = chunks.iter().find(|c| !outstanding.contains(&c.id)) {
                        return Err(unasked(&c.id));
                    }
                    // Chunks handed on are slices of the frame: the
                    // server sends a frame only when most of it was asked for.
                    let raw = Bytes::from(decompress_frame(&frame, raw_len as usize)?);
                    for FrameChunk { id, offset, len } in chunks {
                        let data = raw.slice(offset as usize..(offset + len) as usize);
                        verify_chunk(&id, &data)?;
                        outstanding.remove(&id);
                        // The frame's bytes shared out by length, for progress.
                        let share = (frame.len() as u64 * u64::from(len)
                            / u64::from(raw_len.max(1)))
                            as usize;
                        each(id, data, share)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks that an answer holds nothing after its last record.
    fn nothing_more(url: &str, records: RecordReader<Response>) -> Result<(), ClientError> {
        let mut rest = [0u8; 1];
        let mut reader = records.into_inner();
        let read = reader
            .read(&mut rest)
            .map_err(|e| ClientError::Interrupted {
                url: url.to_owned(),
                message: e.to_string(),
            })?;
        if read != 0 {
            return Err(Self::protocol(url, "the batch holds more than was asked"));
        }
        Ok(())
    }

    /// Uploads a body of chunk records (see [`wire::write_chunk_record`]).
    pub fn upload(&self, body: Vec<u8>) -> Result<UploadOutcome, ClientError> {
        let url = self.url("/v1/chunks");
        self.call_json(&url, self.http.post(&url).body(body), MAX_SMALL_BODY)
    }
}

/// The most of an error answer that is read, and of small JSON answers.
const MAX_ERROR_BODY: u64 = 64 * 1024;
const MAX_SMALL_BODY: u64 = 64 * 1024;
/// `GET /v1/images`: a summary per image.
const MAX_LISTING_BODY: u64 = 64 * 1024 * 1024;

/// A whole answer of at most `limit` bytes (see [`skiff_registry::body`]).
fn read_body(response: Response, limit: u64, url: &str) -> Result<Vec<u8>, ClientError> {
    let declared = response.content_length();
    read_bounded(response, declared, limit).map_err(|e| match e {
        BodyError::Read(e) => ClientError::Interrupted {
            url: url.to_owned(),
            message: e.to_string(),
        },
        too_long => ClientError::Protocol {
            url: url.to_owned(),
            message: too_long.to_string(),
        },
    })
}
