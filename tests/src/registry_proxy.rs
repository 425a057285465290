//! A registry in the middle for push and pull tests: an HTTP/1.1 proxy in
//! front of a real OCI registry (distribution's `docker-registry`) that counts
//! what crosses it and, when told to, behaves like the less friendly
//! registries and networks out there: it redirects blob GETs to "object
//! storage", ignores Range, cuts bodies short, flips bytes, or demands bearer
//! tokens.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use sha2::{Digest, Sha256};

pub struct RegistryProxy {
    /// http://127.0.0.1:PORT of the proxy.
    pub url: String,
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    /// Can be changed while the proxy runs.
    pub mode: Arc<ProxyMode>,
}

/// What crossed the proxy. The per-kind counters (everything but `requests`
/// and `log`) only count requests that got past the bearer check.
#[derive(Default)]
pub struct ProxyStats {
    /// Blob uploads completed: PUT requests to .../blobs/uploads/... that carry `digest=`.
    pub uploads: AtomicU64,
    /// Body bytes of those PUTs and of PATCH requests to uploads.
    pub upload_bytes: AtomicU64,
    /// POST .../blobs/uploads/?mount=...&from=... requests answered 201 by upstream.
    pub mounts: AtomicU64,
    /// HEAD .../blobs/... requests.
    pub heads: AtomicU64,
    /// GET .../blobs/sha256:... requests to the proxy itself.
    pub blob_gets: AtomicU64,
    /// Of those, the ones with a Range header.
    pub range_gets: AtomicU64,
    /// Body bytes sent back for blob GETs, by the proxy or its redirect target.
    pub blob_bytes: AtomicU64,
    pub manifest_puts: AtomicU64,
    /// Every request the proxy (not its redirect target) received.
    pub requests: AtomicU64,
    pub tokens_issued: AtomicU64,
    /// Authorization header values that reached the redirect target (must stay empty in tests).
    pub redirect_auth_seen: Mutex<Vec<String>>,
    /// Requests served by the redirect target.
    pub redirect_gets: AtomicU64,
    /// Every request line seen, "METHOD PATH?QUERY" (for debugging failures);
    /// the redirect target's are prefixed with "[redirect target] ".
    pub log: Mutex<Vec<String>>,
}

#[derive(Default)]
pub struct ProxyMode {
    /// Answer blob GETs with 307 to a second listener ("object storage") on
    /// another port, whose URL carries the blob path and a one-off token.
    /// That listener fetches the blob from upstream without the client's
    /// Authorization, honours Range, and records any Authorization it gets in
    /// `stats.redirect_auth_seen`.
    pub redirect_blobs: AtomicBool,
    /// Drop the Range header on blob GETs, so upstream answers 200 with the whole blob.
    pub ignore_range: AtomicBool,
    /// Send the next N blob GET answers with their full Content-Length but
    /// only the first half of the body, then close (decremented per cut, 0 = off).
    pub cut_blob_gets: AtomicU64,
    /// Flip one byte in the middle of every blob GET body whose digest is listed.
    pub tamper_digests: Mutex<Vec<String>>,
    /// When Some((user, password)): the proxy demands bearer tokens from its
    /// own /token endpoint (Basic auth with these credentials) and does not
    /// forward Authorization upstream.
    pub bearer: Mutex<Option<(String, String)>>,
    /// Lifetime of issued tokens in seconds; 0 means 300.
    pub token_secs: AtomicU64,
    /// Hold each completing blob upload this long before forwarding it, so
    /// a test can kill a push between two uploads.
    pub upload_delay_ms: AtomicU64,
    /// Be a registry with OCI 1.1's referrers API (distribution 2.8 has
    /// none): manifests put with a `subject` are listed at
    /// `/v2/REPO/referrers/DIGEST`, and their PUT is answered with
    /// `OCI-Subject`.
    pub referrers_api: AtomicBool,
}

impl RegistryProxy {
    /// Starts the proxy (and its redirect-target listener) in front of
    /// `upstream` ("http://127.0.0.1:PORT"); one thread per connection; runs
    /// until the process ends.
    pub fn start(upstream: &str) -> RegistryProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let redirect_url = format!("http://127.0.0.1:{}", target.local_addr().unwrap().port());
        let client = reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Tests may run with HTTP_PROXY set; upstream is always local.
            .no_proxy()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap();
        let stats = Arc::new(ProxyStats::default());
        let mode = Arc::new(ProxyMode::default());
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            url: url.clone(),
            redirect_url,
            client,
            stats: stats.clone(),
            mode: mode.clone(),
            tokens: Mutex::new(HashMap::new()),
            grants: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            referrers: Mutex::new(HashMap::new()),
        });
        accept_loop(listener, shared.clone(), serve_proxy);
        accept_loop(target, shared, serve_redirect_target);
        RegistryProxy {
            url,
            port,
            stats,
            mode,
        }
    }
}

struct Shared {
    upstream: String,
    url: String,
    redirect_url: String,
    client: reqwest::blocking::Client,
    stats: Arc<ProxyStats>,
    mode: Arc<ProxyMode>,
    /// Bearer token -> when it stops being valid.
    tokens: Mutex<HashMap<String, Instant>>,
    /// Redirect token -> the blob it lets the redirect target serve.
    grants: Mutex<HashMap<String, Grant>>,
    seq: AtomicU64,
    /// "REPO SUBJECT" -> descriptors of the manifests put with that subject.
    referrers: Mutex<HashMap<String, Vec<serde_json::Value>>>,
}

impl Shared {
    fn random_token(&self) -> String {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut hasher = Sha256::new();
        hasher.update(self.seq.fetch_add(1, SeqCst).to_le_bytes());
        hasher.update(nanos.to_le_bytes());
        hasher.update(std::process::id().to_le_bytes());
        hasher.update(self.url.as_bytes());
        hex::encode(&hasher.finalize()[..16])
    }
}

#[derive(Clone)]
struct Grant {
    path: String,
    /// Like a presigned URL, the grant carries the upstream credentials (if
    /// upstream needs any) so the redirect target never needs the client's.
    upstream_auth: Option<String>,
}

struct Request {
    method: String,
    /// Path and query as received.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(path, _)| path)
    }

    fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, query)| query)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

struct Answer {
    status: u16,
    /// Everything but Content-Length and Connection.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The Content-Length to announce: the body's, except for HEAD answers.
    content_length: Option<u64>,
}

impl Answer {
    fn new(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Answer {
        let content_length = Some(body.len() as u64);
        Answer {
            status,
            headers,
            body,
            content_length,
        }
    }

    fn text(status: u16, message: &str) -> Answer {
        Answer::new(
            status,
            vec![("Content-Type".to_owned(), "text/plain".to_owned())],
            message.as_bytes().to_vec(),
        )
    }
}

/// Request headers that belong to one hop, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "expect",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
];

/// Upstream answer headers passed back to the client.
const RELAYED: [&str; 9] = [
    "content-type",
    "content-range",
    "docker-content-digest",
    "docker-upload-uuid",
    "range",
    "location",
    "www-authenticate",
    "link",
    "docker-distribution-api-version",
];

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    serve: fn(TcpStream, &Shared) -> std::io::Result<()>,
) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let shared = shared.clone();
            std::thread::spawn(move || {
                // A broken client connection only ends its own thread.
                let _ = serve(stream, &shared);
            });
        }
    });
}

fn serve_proxy(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some(mut req) = read_request(&mut stream)? else {
        return Ok(());
    };
    let (stats, mode) = (&shared.stats, &shared.mode);
    stats.requests.fetch_add(1, SeqCst);
    stats
        .log
        .lock()
        .unwrap()
        .push(format!("{} {}", req.method, req.target));
    let path = req.path().to_owned();
    let head = req.method == "HEAD";
    let bearer = mode.bearer.lock().unwrap().clone();

    if let Some((user, password)) = &bearer {
        if path == "/token" {
            let answer = issue_token(shared, &req, user, password);
            write_answer(&mut stream, &answer, head, usize::MAX)?;
            return Ok(());
        }
        if (path == "/v2" || path.starts_with("/v2/")) && !has_valid_token(shared, &req) {
            write_answer(&mut stream, &challenge(shared, &path), head, usize::MAX)?;
            return Ok(());
        }
    }

    if mode.referrers_api.load(SeqCst) {
        if let Some(answer) = referrers_api(shared, &req, &path) {
            write_answer(&mut stream, &answer, head, usize::MAX)?;
            return Ok(());
        }
    }

    let is_upload = path.contains("/blobs/uploads");
    let digest = if req.method == "GET" {
        blob_digest(&path).map(str::to_owned)
    } else {
        None
    };
    let body_len = req.body.len() as u64;
    match req.method.as_str() {
        "HEAD" if path.contains("/blobs/") => {
            stats.heads.fetch_add(1, SeqCst);
        }
        "GET" if digest.is_some() => {
            stats.blob_gets.fetch_add(1, SeqCst);
            if req.header("range").is_some() {
                stats.range_gets.fetch_add(1, SeqCst);
            }
        }
        "PUT" if is_upload && has_param(req.query(), "digest") => {
            stats.uploads.fetch_add(1, SeqCst);
            stats.upload_bytes.fetch_add(body_len, SeqCst);
            let delay = mode.upload_delay_ms.load(SeqCst);
            std::thread::sleep(Duration::from_millis(delay));
        }
        "PATCH" if is_upload => {
            stats.upload_bytes.fetch_add(body_len, SeqCst);
        }
        "PUT" if path.contains("/manifests/") => {
            stats.manifest_puts.fetch_add(1, SeqCst);
        }
        _ => {}
    }

    if digest.is_some() && mode.redirect_blobs.load(SeqCst) {
        let token = shared.random_token();
        let upstream_auth = if bearer.is_none() {
            req.header("authorization").map(str::to_owned)
        } else {
            None
        };
        let location = format!("{}{path}?token={token}", shared.redirect_url);
        shared.grants.lock().unwrap().insert(
            token,
            Grant {
                path,
                upstream_auth,
            },
        );
        let answer = Answer::new(307, vec![("Location".to_owned(), location)], Vec::new());
        write_answer(&mut stream, &answer, head, 0)?;
        return Ok(());
    }

    let mut strip = Vec::new();
    if bearer.is_some() {
        strip.push("authorization");
    }
    if digest.is_some() && mode.ignore_range.load(SeqCst) {
        strip.push("range");
    }
    let headers = upstream_headers(&req, &strip);
    let body = std::mem::take(&mut req.body);
    let mut answer = forward(
        shared,
        &req.method,
        &req.target,
        &headers,
        body,
        bearer.is_some(),
    );
    if req.method == "POST"
        && is_upload
        && has_param(req.query(), "mount")
        && has_param(req.query(), "from")
        && answer.status == 201
    {
        stats.mounts.fetch_add(1, SeqCst);
    }
    let send = match &digest {
        Some(digest) => mangle_blob(shared, digest, &mut answer),
        None => answer.body.len(),
    };
    let sent = write_answer(&mut stream, &answer, head, send)?;
    if digest.is_some() {
        stats.blob_bytes.fetch_add(sent as u64, SeqCst);
    }
    Ok(())
}

/// The referrers API: a GET of `/v2/REPO/referrers/DIGEST` is answered
/// here; a manifest PUT with a `subject` is forwarded, recorded and
/// answered with `OCI-Subject`. `None` for every other request.
fn referrers_api(shared: &Shared, req: &Request, path: &str) -> Option<Answer> {
    let under = path.strip_prefix("/v2/")?;
    let (repo, rest) = match under.rsplit_once("/referrers/") {
        Some((repo, digest)) => (repo, format!("referrers/{digest}")),
        None => {
            let (repo, reference) = under.rsplit_once("/manifests/")?;
            (repo, format!("manifests/{reference}"))
        }
    };
    if let (Some(subject), "GET") = (rest.strip_prefix("referrers/"), req.method.as_str()) {
        let wanted = req
            .query()
            .split('&')
            .find_map(|p| p.strip_prefix("artifactType="))
            .map(|t| t.replace("%2F", "/").replace("%2f", "/"));
        let listed: Vec<serde_json::Value> = shared
            .referrers
            .lock()
            .unwrap()
            .get(&format!("{repo} {subject}"))
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| wanted.as_deref().is_none_or(|t| d["artifactType"] == t))
            .collect();
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": listed,
        });
        return Some(Answer::new(
            200,
            vec![(
                "Content-Type".to_owned(),
                "application/vnd.oci.image.index.v1+json".to_owned(),
            )],
            serde_json::to_vec(&body).unwrap(),
        ));
    }
    if req.method != "PUT" || !rest.starts_with("manifests/") {
        return None;
    }
    let manifest: serde_json::Value = serde_json::from_slice(&req.body).ok()?;
    let subject = manifest["subject"]["digest"].as_str()?.to_owned();
    let digest = format!("sha256:{:x}", Sha256::digest(&req.body));
    let headers = upstream_headers(req, &[]);
    let mut answer = forward(
        shared,
        "PUT",
        &req.target,
        &headers,
        req.body.clone(),
        false,
    );
    if (200..300).contains(&answer.status) {
        let mut descriptor = serde_json::json!({
            "mediaType": manifest["mediaType"],
            "digest": digest,
            "size": req.body.len(),
        });
        for field in ["artifactType", "annotations"] {
            if !manifest[field].is_null() {
                descriptor[field] = manifest[field].clone();
            }
        }
        let mut referrers = shared.referrers.lock().unwrap();
        let listed = referrers.entry(format!("{repo} {subject}")).or_default();
        if !listed.iter().any(|d| d["digest"] == descriptor["digest"]) {
            listed.push(descriptor);
        }
        answer.headers.push(("OCI-Subject".to_owned(), subject));
    }
    Some(answer)
}

/// The "object storage" a redirected blob GET lands on.
fn serve_redirect_target(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let Some(req) = read_request(&mut stream)? else {
        return Ok(());
    };
    let stats = &shared.stats;
    stats.redirect_gets.fetch_add(1, SeqCst);
    stats
        .log
        .lock()
        .unwrap()
        .push(format!("[redirect target] {} {}", req.method, req.target));
    if let Some(auth) = req.header("authorization") {
        stats
            .redirect_auth_seen
            .lock()
            .unwrap()
            .push(auth.to_owned());
    }
    let head = req.method == "HEAD";
    let grant = query_param(req.query(), "token")
        .and_then(|token| shared.grants.lock().unwrap().get(token).cloned());
    let Some(grant) = grant else {
        write_answer(
            &mut stream,
            &Answer::text(403, "no such grant"),
            head,
            usize::MAX,
        )?;
        return Ok(());
    };
    if !matches!(req.method.as_str(), "GET" | "HEAD") {
        write_answer(
            &mut stream,
            &Answer::text(405, "read only"),
            head,
            usize::MAX,
        )?;
        return Ok(());
    }
    let mut strip = vec!["authorization"];
    if shared.mode.ignore_range.load(SeqCst) {
        strip.push("range");
    }
    let mut headers = upstream_headers(&req, &strip);
    if let Some(auth) = grant.upstream_auth {
        headers.push(("Authorization".to_owned(), auth));
    }
    let mut answer = forward(shared, &req.method, &grant.path, &headers, Vec::new(), true);
    let send = match blob_digest(&grant.path) {
        Some(digest) if !head => mangle_blob(shared, digest, &mut answer),
        _ => answer.body.len(),
    };
    let sent = write_answer(&mut stream, &answer, head, send)?;
    stats.blob_bytes.fetch_add(sent as u64, SeqCst);
    Ok(())
}

/// Reads one request; None when the client closed without sending one.
fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut raw = Vec::new();
    if reader.read_until(b'\n', &mut raw)? == 0 {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&raw).into_owned();
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(None);
    };
    let method = method.to_owned();
    // An absolute-form target (as sent to forward proxies) loses its authority.
    let target = match target.strip_prefix("http://") {
        Some(rest) => match rest.find('/') {
            Some(slash) => rest[slash..].to_owned(),
            None => "/".to_owned(),
        },
        None => target.to_owned(),
    };
    let mut headers = Vec::new();
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let text = String::from_utf8_lossy(&raw);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            break;
        }
        if let Some((name, value)) = text.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
    };
    if req
        .header("expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = req.header("content-length").map(|v| v.parse::<usize>());
    if chunked {
        req.body = read_chunked(&mut reader)?;
    } else if let Some(length) = length {
        let length = length.map_err(|_| std::io::Error::other("bad Content-Length"))?;
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        req.body = body;
    }
    Ok(Some(req))
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let size = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| std::io::Error::other("bad chunk size"))?;
        if size == 0 {
            // Skip the trailers up to the closing empty line.
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer)? == 0 || trailer.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = String::new();
        reader.read_line(&mut crlf)?;
    }
}

/// The request's headers minus the hop-by-hop ones and those in `strip` (lowercase).
fn upstream_headers(req: &Request, strip: &[&str]) -> Vec<(String, String)> {
    req.headers
        .iter()
        .filter(|(name, _)| {
            let lower = name.to_ascii_lowercase();
            !HOP_BY_HOP.contains(&lower.as_str()) && !strip.contains(&lower.as_str())
        })
        .cloned()
        .collect()
}

/// Sends one request upstream and reads the whole answer.
fn forward(
    shared: &Shared,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    bearer_mode: bool,
) -> Answer {
    let Ok(http_method) = reqwest::Method::from_bytes(method.as_bytes()) else {
        return Answer::text(405, "bad method");
    };
    let mut request = shared
        .client
        .request(http_method, format!("{}{target}", shared.upstream));
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE") {
        request = request.body(body);
    }
    let response = match request.send() {
        Ok(response) => response,
        Err(e) => return Answer::text(502, &format!("upstream: {e}")),
    };
    let status = response.status().as_u16();
    let mut relayed = Vec::new();
    for (name, value) in response.headers() {
        let name = name.as_str();
        // In bearer mode the challenges are the proxy's own.
        if !RELAYED.contains(&name) || (bearer_mode && name == "www-authenticate") {
            continue;
        }
        let Ok(value) = value.to_str() else {
            continue;
        };
        let value = match value.strip_prefix(shared.upstream.as_str()) {
            Some(rest)
                if name == "location"
                    && (rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) =>
            {
                format!("{}{rest}", shared.url)
            }
            _ => value.to_owned(),
        };
        relayed.push((name.to_owned(), value));
    }
    let upstream_length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = match response.bytes() {
        Ok(bytes) => bytes.to_vec(),
        Err(e) => return Answer::text(502, &format!("upstream body: {e}")),
    };
    let mut answer = Answer::new(status, relayed, body);
    if method == "HEAD" {
        answer.content_length = upstream_length;
    }
    answer
}

/// Applies `tamper_digests` and `cut_blob_gets` to a blob answer; returns how
/// many body bytes to send.
fn mangle_blob(shared: &Shared, digest: &str, answer: &mut Answer) -> usize {
    if !(200..300).contains(&answer.status) || answer.body.is_empty() {
        return answer.body.len();
    }
    let tamper = shared
        .mode
        .tamper_digests
        .lock()
        .unwrap()
        .iter()
        .any(|d| d == digest);
    if tamper {
        let middle = answer.body.len() / 2;
        answer.body[middle] ^= 0xff;
    }
    let cut = shared
        .mode
        .cut_blob_gets
        .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if cut {
        answer.body.len() / 2
    } else {
        answer.body.len()
    }
}

/// Writes the answer with `Connection: close` and at most `send` body bytes;
/// returns the body bytes written.
fn write_answer(
    stream: &mut TcpStream,
    answer: &Answer,
    head: bool,
    send: usize,
) -> std::io::Result<usize> {
    let reason = reqwest::StatusCode::from_u16(answer.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", answer.status);
    for (name, value) in &answer.headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    // 1xx and 204 answers must not carry a Content-Length.
    let bodiless_status = answer.status < 200 || answer.status == 204;
    if let Some(length) = answer.content_length.filter(|_| !bodiless_status) {
        out.push_str("Content-Length: ");
        out.push_str(&length.to_string());
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    stream.write_all(out.as_bytes())?;
    let mut sent = 0;
    if !head && !bodiless_status && answer.status != 304 {
        sent = send.min(answer.body.len());
        stream.write_all(&answer.body[..sent])?;
    }
    stream.flush()?;
    Ok(sent)
}

/// The digest of a `/v2/<repo>/blobs/<digest>` path.
fn blob_digest(path: &str) -> Option<&str> {
    let (_, last) = path.rsplit_once("/blobs/")?;
    if last.contains(':') && !last.contains('/') {
        Some(last)
    } else {
        None
    }
}

/// The repository of a `/v2/<repo>/(blobs|manifests|tags)/...` path.
fn repo_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let end = parts
        .iter()
        .position(|p| matches!(*p, "blobs" | "manifests" | "tags"))?;
    if end == 0 {
        return None;
    }
    Some(parts[..end].join("/"))
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

fn has_param(query: &str, name: &str) -> bool {
    query_param(query, name).is_some()
}

fn challenge(shared: &Shared, path: &str) -> Answer {
    let realm = format!(
        "Bearer realm=\"{}/token\",service=\"skiff-test\"",
        shared.url
    );
    let value = match repo_of(path) {
        Some(repo) => format!("{realm},scope=\"repository:{repo}:pull\""),
        None => realm,
    };
    let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#;
    Answer::new(
        401,
        vec![
            ("WWW-Authenticate".to_owned(), value),
            ("Content-Type".to_owned(), "application/json".to_owned()),
            (
                "Docker-Distribution-Api-Version".to_owned(),
                "registry/2.0".to_owned(),
            ),
        ],
        body.to_vec(),
    )
}

fn has_valid_token(shared: &Shared, req: &Request) -> bool {
    let Some((scheme, token)) = req.header("authorization").and_then(|v| v.split_once(' ')) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    shared
        .tokens
        .lock()
        .unwrap()
        .get(token.trim())
        .is_some_and(|expiry| Instant::now() < *expiry)
}

/// GET /token: Basic credentials in, a fresh bearer token out.
fn issue_token(shared: &Shared, req: &Request, user: &str, password: &str) -> Answer {
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let given = req
        .header("authorization")
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, creds)| creds.trim().trim_end_matches('='));
    if given != Some(expected.trim_end_matches('=')) {
        let mut answer = Answer::text(401, "bad credentials");
        answer.headers.push((
            "WWW-Authenticate".to_owned(),
            "Basic realm=\"skiff-test\"".to_owned(),
        ));
        return answer;
    }
    let secs = match shared.mode.token_secs.load(SeqCst) {
        0 => 300,
        secs => secs,
    };
    let token = shared.random_token();
    shared
        .tokens
        .lock()
        .unwrap()
        .insert(token.clone(), Instant::now() + Duration::from_secs(secs));
    shared.stats.tokens_issued.fetch_add(1, SeqCst);
    let body = serde_json::json!({ "token": token, "expires_in": secs }).to_string();
    Answer::new(
        200,
        vec![("Content-Type".to_owned(), "application/json".to_owned())],
        body.into_bytes(),
    )
}
