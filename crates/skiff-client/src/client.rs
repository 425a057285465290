//! Requests to a skiff chunk server (docs/API.md), blocking.

use std::io::Read;
use std::time::{Duration, Instant};

use reqwest::blocking::{RequestBuilder, Response};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use skiff_chunk::decompress_chunk;
use skiff_format::wire::{
    self, AccessReport, ChunkRecord, ImageSummary, RecordReader, UploadOutcome,
};
use skiff_format::{ChunkId, ImageManifest, ImageRef, IndexDigest};

use crate::ClientError;

/// An index may decompress to at most this much (a 100k-file index is a few MB).
const MAX_INDEX_BYTES: usize = 512 * 1024 * 1024;
/// The largest chunk FastCDC makes: the bound for decompressing one.
pub const MAX_CHUNK_BYTES: usize = 16 * 1024 * 1024;

/// How long a failing request is retried unless told otherwise.
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A connection to one chunk server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::blocking::Client,
    base: String,
    token: Option<String>,
    retry_window: Duration,
}

/// Retries `attempt` with exponential backoff while it fails for a passing
/// reason and the window lasts.
fn retrying<T>(
    window: Duration,
    mut attempt: impl FnMut() -> Result<T, ClientError>,
) -> Result<T, ClientError> {
    let deadline = Instant::now() + window;
    let mut backoff = FIRST_BACKOFF;
    loop {
        match attempt() {
            Err(e) if e.is_transient() && Instant::now() + backoff < deadline => {
                tracing::warn!("{e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            other => return other,
        }
    }
}

impl Client {
    /// `server` is `http://HOST:PORT` (or https); `token` is sent as a bearer token.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, ClientError> {
        let base = server.trim_end_matches('/').to_owned();
        let valid = reqwest::Url::parse(&base)
            .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
        if !valid {
            return Err(ClientError::InvalidServer(server.to_owned()));
        }
        let http = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Whole requests, including a batch body on a slow link.
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|source| ClientError::Http {
                url: base.clone(),
                source,
            })?;
        Ok(Client {
            http,
            base,
            token,
            retry_window: DEFAULT_RETRY_WINDOW,
        })
    }

    /// Retries requests that fail for a passing reason (see
    /// [`ClientError::is_transient`]) for up to `window`; zero turns retries off.
    pub fn with_retry_window(mut self, window: Duration) -> Self {
        self.retry_window = window;
        self
    }

    pub fn server(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request, retrying passing failures, and turns any answer but
    /// 2xx into [`ClientError::Status`].
    fn send(&self, url: &str, request: RequestBuilder) -> Result<Response, ClientError> {
        let request = match &self.token {
            Some(token) => request.header(AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        };
        retrying(self.retry_window, || {
            // Bodies are in memory, so a request can always be cloned.
            let attempt = request
                .try_clone()
                .ok_or_else(|| Self::protocol(url, "a request with a streamed body"))?;
            Self::send_once(url, attempt)
        })
    }

    fn send_once(url: &str, request: RequestBuilder) -> Result<Response, ClientError> {
        let response = request.send().map_err(|source| ClientError::Http {
            url: url.to_owned(),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().unwrap_or_default();
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

    fn read_body(url: &str, response: Response) -> Result<Vec<u8>, ClientError> {
        response
            .bytes()
            .map(|b| b.to_vec())
            .map_err(|source| ClientError::Http {
                url: url.to_owned(),
                source,
            })
    }

    fn protocol(url: &str, message: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            url: url.to_owned(),
            message: message.into(),
        }
    }

    pub fn health(&self) -> Result<(), ClientError> {
        let url = self.url("/healthz");
        self.send(&url, self.http.get(&url)).map(drop)
    }

    /// What this client's token (or no token) may do on the server.
    pub fn access(&self) -> Result<AccessReport, ClientError> {
        let url = self.url("/v1/auth");
        let body = Self::read_body(&url, self.send(&url, self.http.get(&url))?)?;
        serde_json::from_slice(&body).map_err(|e| Self::protocol(&url, e.to_string()))
    }

    pub fn images(&self) -> Result<Vec<ImageSummary>, ClientError> {
        let url = self.url("/v1/images");
        let body = Self::read_body(&url, self.send(&url, self.http.get(&url))?)?;
        serde_json::from_slice(&body).map_err(|e| Self::protocol(&url, e.to_string()))
    }

    /// The manifest tagged `image`; `None` if the server has no such tag.
    pub fn manifest(&self, image: &ImageRef) -> Result<Option<ImageManifest>, ClientError> {
        let url = self.url(&format!("/v1/manifests/{image}"));
        let response = match self.send(&url, self.http.get(&url)) {
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND.as_u16()) => return Ok(None),
            other => other?,
        };
        let manifest = ImageManifest::from_json(&Self::read_body(&url, response)?)
            .map_err(|e| Self::protocol(&url, e.to_string()))?;
        if manifest.image_ref() != *image {
            return Err(Self::protocol(
                &url,
                format!("asked for {image}, got {}", manifest.image_ref()),
            ));
        }
        Ok(Some(manifest))
    }

    pub fn put_manifest(&self, manifest: &ImageManifest) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/manifests/{}", manifest.image_ref()));
        let request = self
            .http
            .put(&url)
            .header(CONTENT_TYPE, "application/vnd.skiff.manifest.v1+json")
            .body(manifest.to_json());
        self.send(&url, request).map(drop)
    }

    pub fn delete_manifest(&self, image: &ImageRef) -> Result<(), ClientError> {
        let url = self.url(&format!("/v1/manifests/{image}"));
        self.send(&url, self.http.delete(&url)).map(drop)
    }

    /// The encoded index, checked against its digest.
    pub fn index_bytes(&self, digest: &IndexDigest) -> Result<Vec<u8>, ClientError> {
        let url = self.url(&format!("/v1/indexes/{digest}"));
        let compressed = Self::read_body(&url, self.send(&url, self.http.get(&url))?)?;
        let encoded = zstd::bulk::decompress(&compressed, MAX_INDEX_BYTES)
            .map_err(|e| Self::protocol(&url, format!("index is not valid zstd: {e}")))?;
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
            .header(CONTENT_TYPE, "application/zstd")
            .body(compressed);
        self.send(&url, request).map(drop)
    }

    /// Which of `ids` the server lacks, in the order asked.
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, ClientError> {
        let url = self.url("/v1/chunks/missing");
        let request = self.http.post(&url).body(wire::encode_ids(ids));
        let body = Self::read_body(&url, self.send(&url, request)?)?;
        wire::decode_ids(&body).map_err(|e| Self::protocol(&url, e.to_string()))
    }

    /// Fetches `ids` in one request and hands each chunk, verified against
    /// its id, to `each` as it arrives, in the order asked, with the size
    /// it had on the wire. An answer cut short is asked again for the chunks
    /// still to come, within the retry window.
    pub fn fetch(
        &self,
        ids: &[ChunkId],
        mut each: impl FnMut(ChunkId, Vec<u8>, usize) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let mut done = 0;
        retrying(self.retry_window, || {
            self.fetch_once(&ids[done..], &mut |id, data, wire_len| {
                each(id, data, wire_len)?;
                done += 1;
                Ok(())
            })
        })
    }

    fn fetch_once(
        &self,
        ids: &[ChunkId],
        each: &mut dyn FnMut(ChunkId, Vec<u8>, usize) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let url = self.url("/v1/chunks/fetch");
        let request = self.http.post(&url).body(wire::encode_ids(ids));
        let request = match &self.token {
            Some(token) => request.header(AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        };
        let response = Self::send_once(&url, request)?;
        let cut_short = |message: String| ClientError::Interrupted {
            url: url.clone(),
            message,
        };
        let mut records = RecordReader::new(response);
        for expected in ids {
            let record = records
                .next_record()
                .map_err(|e| cut_short(format!("batch body: {e}")))?
                .ok_or_else(|| cut_short(format!("the batch ended before chunk {expected}")))?;
            match record {
                ChunkRecord::Chunk { id, wire } if id == *expected => {
                    each(
                        id,
                        decompress_chunk(&id, &wire, MAX_CHUNK_BYTES)?,
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
        let mut rest = [0u8; 1];
        let mut reader = records.into_inner();
        if reader
            .read(&mut rest)
            .map_err(|e| cut_short(e.to_string()))?
            != 0
        {
            return Err(Self::protocol(&url, "the batch holds more than was asked"));
        }
        Ok(())
    }

    /// Uploads a body of chunk records (see [`wire::write_chunk_record`]).
    pub fn upload(&self, body: Vec<u8>) -> Result<UploadOutcome, ClientError> {
        let url = self.url("/v1/chunks");
        let request = self.http.post(&url).body(body);
        let body = Self::read_body(&url, self.send(&url, request)?)?;
        serde_json::from_slice(&body).map_err(|e| Self::protocol(&url, e.to_string()))
    }
}
