//! The OCI distribution API of one repository, blocking: manifests, blobs
//! (whole, ranged, uploaded, cross-mounted) and tags, with the registry's
//! auth (anonymous, basic, bearer tokens renewed as they expire), redirects
//! that never carry credentials to another host, and bounded retries.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::blocking::{RequestBuilder, Response};
use reqwest::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION,
    RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode, Url};
use skiff_source::{Backoff, SourceTraffic};

use crate::auth::{
    credentials_for, token_lifetime, BareCredentials, Challenge, Credentials, Token, TokenAnswer,
    IDENTITY_TOKEN_USER,
};
use crate::digest::{sha256_digest, Sha256Digest};
use crate::launcher::{IndexEntry, OciIndex, OCI_INDEX_TYPE};
use crate::reference::{is_plain_http_allowed, RegistryRef};
use crate::referrers::referrers_tag;
use crate::RegistryError;

/// Manifests are small; distribution refuses those over 4 MiB.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Error bodies and token answers are read up to this much.
const MAX_SMALL_BODY: u64 = 64 << 10;
const MAX_REDIRECTS: usize = 5;
/// A repository's tag list is read up to this many tags.
const MAX_TAGS: usize = 100_000;
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::from_secs(30);

/// What a request needs the token to allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
    /// Push here, and pull from another repository of the same registry (a cross-mount).
    PushMountFrom(String),
}

impl Access {
    fn scopes(&self, repository: &str) -> Vec<String> {
        match self {
            Access::Pull => vec![format!("repository:{repository}:pull")],
            Access::Push => vec![format!("repository:{repository}:pull,push")],
            Access::PushMountFrom(from) => vec![
                format!("repository:{repository}:pull,push"),
                format!("repository:{from}:pull"),
            ],
        }
    }
}

/// The answer to a ranged blob GET.
pub enum RangeAnswer {
    /// The bytes asked for, to be read from the body as they arrive
    /// (their count is the caller's to add to [`Traffic`]).
    Partial(Response),
    /// The registry (or a proxy) ignored `Range` and sends the whole blob.
    Whole(Response),
}

/// What a cross-mount did.
pub enum MountOutcome {
    Mounted,
    /// The registry could not mount and opened an upload at this URL instead.
    Upload(String),
}

#[derive(Default)]
struct AuthState {
    /// The registry asked for basic credentials.
    basic: bool,
    /// The registry's token endpoint, once a challenge named it.
    bearer: Option<(String, Option<String>)>,
    /// Tokens by scope.
    tokens: HashMap<String, Token>,
}

/// Requests, bytes and ranges, for `skiff status` and the tests.
#[derive(Default)]
pub struct Traffic {
    requests: AtomicU64,
    bytes: AtomicU64,
    ranges: AtomicU64,
    retries: AtomicU64,
    tokens: AtomicU64,
    notes: Mutex<Vec<String>>,
}

impl Traffic {
    pub fn note(&self, note: String) {
        tracing::warn!("{note}");
        let mut notes = self.notes.lock().expect("notes poisoned");
        if !notes.contains(&note) && notes.len() < 32 {
            notes.push(note);
        }
    }

    pub fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SourceTraffic {
        SourceTraffic {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            ranges: self.ranges.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            notes: self.notes.lock().expect("notes poisoned").clone(),
            from_shared_cache: 0,
        }
    }

    /// Bearer tokens fetched so far.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }
}

/// The HTTP clients of a registry. Plain-HTTP URLs (a loopback or insecure
/// registry) need no TLS roots, and loading the system's (some 150 files)
/// cost a cold lazy mount tens of milliseconds before its first request:
/// the client that verifies HTTPS is built at the first https:// URL (an
/// HTTPS registry, or a redirect to a blob store).
struct HttpClients {
    plain: reqwest::blocking::Client,
    verified: OnceLock<Result<reqwest::blocking::Client, String>>,
}

impl HttpClients {
    fn builder() -> reqwest::blocking::ClientBuilder {
        reqwest::blocking::Client::builder()
            .user_agent(concat!("skiff/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // Applies to each read of a body as well: a stalled registry fails, a slow one does not.
            .timeout(Duration::from_secs(60))
            // Followed by hand, so credentials never go to another host.
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(16)
    }

    fn new(base: &str) -> Result<Self, RegistryError> {
        let plain = Self::builder()
            // Trusts no certificate: it never speaks TLS.
            .tls_certs_only(std::iter::empty())
            .build()
            .map_err(|e| http_error(base, e))?;
        Ok(HttpClients {
            plain,
            verified: OnceLock::new(),
        })
    }

    fn for_url(&self, url: &Url) -> Result<&reqwest::blocking::Client, RegistryError> {
        if url.scheme() == "http" {
            return Ok(&self.plain);
        }
        self.verified
            .get_or_init(|| Self::builder().build().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|message| protocol(url.as_str(), format!("no HTTPS client: {message}")))
    }
}

/// One repository of one registry.
pub struct Registry {
    http: HttpClients,
    reference: RegistryRef,
    base: Url,
    credentials: Option<Credentials>,
    auth: Mutex<AuthState>,
    retry_window: Duration,
    pub traffic: Traffic,
}

impl std::fmt::Debug for Registry {
    /// Names the repository; credentials and tokens stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.reference)
    }
}

fn http_error(url: &str, source: reqwest::Error) -> RegistryError {
    RegistryError::Http {
        url: url.to_owned(),
        source,
    }
}

fn protocol(url: &str, message: impl Into<String>) -> RegistryError {
    RegistryError::Protocol {
        url: url.to_owned(),
        message: message.into(),
    }
}

/// scheme, host and port: credentials stay within one.
fn origin_of(url: &Url) -> (String, Option<String>, Option<u16>) {
    (
        url.scheme().to_owned(),
        url.host_str().map(str::to_owned),
        url.port_or_known_default(),
    )
}

impl Registry {
    /// A client for `reference`'s repository, with the credentials the
    /// environment or docker's config hold for its host.
    pub fn new(reference: &RegistryRef) -> Result<Registry, RegistryError> {
        Self::with_bare_credentials(reference, BareCredentials::Apply)
    }

    /// As [`Registry::new`], saying whether a bare `SKIFF_REGISTRY_AUTH` is for this registry.
    pub fn with_bare_credentials(
        reference: &RegistryRef,
        bare: BareCredentials,
    ) -> Result<Registry, RegistryError> {
        let credentials = credentials_for(&reference.host, bare)?;
        Self::with_credentials(reference, credentials)
    }

    pub fn with_credentials(
        reference: &RegistryRef,
        credentials: Option<Credentials>,
    ) -> Result<Registry, RegistryError> {
        let base_text = reference.base_url();
        let bad = |reason: String| RegistryError::BadReference {
            reference: reference.to_string(),
            reason,
        };
        let base = Url::parse(&base_text).map_err(|e| bad(e.to_string()))?;
        // The URL must name the host that decided plain HTTP and credentials.
        let wanted = crate::reference::host_only(&reference.host).to_ascii_lowercase();
        let parsed = base.host_str().unwrap_or_default().trim_matches(['[', ']']);
        if parsed != wanted || !base.username().is_empty() || base.password().is_some() {
            return Err(bad(format!("{base_text} does not name host {wanted}")));
        }
        let http = HttpClients::new(&base_text)?;
        Ok(Registry {
            http,
            reference: reference.clone(),
            base,
            credentials,
            auth: Mutex::new(AuthState::default()),
            retry_window: DEFAULT_RETRY_WINDOW,
            traffic: Traffic::default(),
        })
    }

    /// Retries requests that fail for a passing reason for up to `window`; zero turns retries off.
    pub fn with_retry_window(mut self, window: Duration) -> Self {
        self.retry_window = window;
        self
    }

    pub fn reference(&self) -> &RegistryRef {
        &self.reference
    }

    pub fn repository(&self) -> &str {
        &self.reference.repository
    }

    /// `HOST[:PORT]` of the registry.
    pub fn host(&self) -> &str {
        &self.reference.host
    }

    fn url(&self, path: &str) -> String {
        format!("{}v2/{}/{path}", self.base, self.reference.repository)
    }

    /// The `Authorization` header for `access`, from what earlier challenges taught.
    fn authorization(&self, access: &Access) -> Result<Option<String>, RegistryError> {
        let (basic, bearer, scopes) = {
            let auth = self.auth.lock().expect("auth poisoned");
            let scopes = access.scopes(&self.reference.repository).join(" ");
            if let Some(token) = auth.tokens.get(&scopes) {
                if Instant::now() < token.renew_at {
                    return Ok(Some(format!("Bearer {}", token.value)));
                }
            }
            (auth.basic, auth.bearer.clone(), scopes)
        };
        if let Some((realm, service)) = bearer {
            let token = self.fetch_token(&realm, service.as_deref(), access)?;
            let value = format!("Bearer {}", token.value);
            self.auth
                .lock()
                .expect("auth poisoned")
                .tokens
                .insert(scopes, token);
            return Ok(Some(value));
        }
        if basic {
            if let Some(c) = &self.credentials {
                return Ok(Some(basic_header(c)));
            }
        }
        Ok(None)
    }

    /// Learns from a 401's challenge what the registry wants.
    fn learn(&self, response: &Response) {
        let Some(challenge) = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse)
        else {
            return;
        };
        let mut auth = self.auth.lock().expect("auth poisoned");
        match challenge {
            Challenge::Basic => auth.basic = true,
            Challenge::Bearer { realm, service, .. } => {
                auth.bearer = Some((realm, service));
                // A token the registry refuses (revoked, expired early) is renewed.
                auth.tokens.clear();
            }
        }
    }

    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        access: &Access,
    ) -> Result<Token, RegistryError> {
        let url =
            Url::parse(realm).map_err(|e| protocol(realm, format!("bad token realm: {e}")))?;
        let realm_host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => return Err(protocol(realm, "token realm without a host")),
        };
        let credentials = self.credentials.as_ref();
        if credentials.is_some() && url.scheme() == "http" && !is_plain_http_allowed(&realm_host) {
            return Err(RegistryError::Credentials {
                host: self.reference.host.clone(),
                reason: format!(
                    "the token realm {realm} is plain HTTP; credentials are not sent there \
                     (list {realm_host} in SKIFF_INSECURE_REGISTRIES if that is intended)"
                ),
            });
        }
        match self.request_token(&url, service, access, credentials) {
            // Credentials this token service refuses may be meant for
            // another registry: pull anonymously, as docker does.
            Err(e) if e.status() == Some(401) && credentials.is_some() => {
                tracing::warn!("{e}; trying without credentials");
                self.request_token(&url, service, access, None)
            }
            other => other,
        }
    }

    fn request_token(
        &self,
        realm_url: &Url,
        service: Option<&str>,
        access: &Access,
        credentials: Option<&Credentials>,
    ) -> Result<Token, RegistryError> {
        let mut url = realm_url.clone();
        let realm = realm_url.as_str();
        let scopes = access.scopes(&self.reference.repository);
        let request = match credentials {
            Some(c) if c.username == IDENTITY_TOKEN_USER => {
                let mut form = vec![
                    ("grant_type", "refresh_token".to_owned()),
                    ("refresh_token", c.password.clone()),
                    ("client_id", "skiff".to_owned()),
                    ("scope", scopes.join(" ")),
                ];
                if let Some(service) = service {
                    form.push(("service", service.to_owned()));
                }
                self.http
                    .for_url(&url)?
                    .post(url.clone())
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form_body(&form))
            }
            _ => {
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    for scope in &scopes {
                        query.append_pair("scope", scope);
                    }
                }
                let request = self.http.for_url(&url)?.get(url.clone());
                match credentials {
                    Some(c) => request.header(AUTHORIZATION, basic_header(c)),
                    None => request,
                }
            }
        };
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        self.traffic.tokens.fetch_add(1, Ordering::Relaxed);
        let response = request.send().map_err(|e| http_error(realm, e))?;
        let response = check(response, realm)?;
        let body = read_bounded(response, MAX_SMALL_BODY, realm)?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| protocol(realm, format!("token answer: {e}")))?;
        let value = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| protocol(realm, "the token answer holds no token"))?;
        Ok(Token {
            value,
            renew_at: Instant::now() + token_lifetime(answer.expires_in),
        })
    }

    /// Sends one request: authorises it, follows the auth challenge and
    /// redirects (without credentials to other hosts), and checks the status.
    fn send(
        &self,
        method: Method,
        url: &str,
        access: &Access,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut target = Url::parse(url).map_err(|e| protocol(url, e.to_string()))?;
        let home = origin_of(&self.base);
        let mut authorised = 0;
        let mut hops = 0;
        loop {
            let ours = origin_of(&target) == home;
            let authorization = if ours {
                self.authorization(access)?
            } else {
                None
            };
            let mut request = build(
                self.http
                    .for_url(&target)?
                    .request(method.clone(), target.clone()),
            );
            if let Some(value) = &authorization {
                request = request.header(AUTHORIZATION, value);
            }
            self.traffic.requests.fetch_add(1, Ordering::Relaxed);
            let response = request.send().map_err(|e| http_error(target.as_str(), e))?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && ours && authorised < 2 {
                authorised += 1;
                self.learn(&response);
                // Again only if what would be sent now differs (a token, a
                // renewed token, basic credentials), however threads raced.
                if self.authorization(access)? != authorization {
                    continue;
                }
            }
            if status.is_redirection() && matches!(method, Method::GET | Method::HEAD) {
                if let Some(location) = response.headers().get(LOCATION) {
                    hops += 1;
                    if hops > MAX_REDIRECTS {
                        return Err(protocol(url, "too many redirects"));
                    }
                    let location = location
                        .to_str()
                        .map_err(|_| protocol(url, "a redirect to a non-ASCII location"))?;
                    target = response
                        .url()
                        .join(location)
                        .map_err(|e| protocol(url, format!("bad redirect {location:?}: {e}")))?;
                    // A tag's manifest cannot be checked against anything: never downgrade.
                    if target.scheme() != "https" && self.base.scheme() == "https" {
                        return Err(protocol(
                            url,
                            format!("refusing a redirect from HTTPS to {target}"),
                        ));
                    }
                    continue;
                }
            }
            return check(response, target.as_str());
        }
    }

    /// [`Registry::send`] retried for passing failures within the retry window.
    fn send_retrying(
        &self,
        method: Method,
        url: &str,
        access: &Access,
        build: &dyn Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut backoff = Backoff::new(self.retry_window);
        loop {
            match self.send(method.clone(), url, access, build) {
                Err(e) if backoff.retry(e.is_transient(), &e) => {
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }

    /// A manifest by tag or digest: its bytes, media type and sha256
    /// digest (checked when asked for by digest); `None` if there is none.
    pub fn manifest(
        &self,
        reference: &str,
        accept: &[&str],
    ) -> Result<Option<(Vec<u8>, String, Sha256Digest)>, RegistryError> {
        if reference.contains(':') && reference.parse::<Sha256Digest>().is_err() {
            return Err(protocol(
                &self.reference.to_string(),
                format!("{reference} is not a sha256 digest, the only kind skiff can check"),
            ));
        }
        let url = self.url(&format!("manifests/{reference}"));
        let accept = accept.join(", ");
        let response = match self.send_retrying(Method::GET, &url, &Access::Pull, &|r| {
            r.header(ACCEPT, &accept)
        }) {
            Err(e) if e.status() == Some(404) => return Ok(None),
            other => other?,
        };
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .unwrap_or_default();
        let bytes = read_bounded(response, MAX_MANIFEST_BYTES, &url)?;
        let digest = sha256_digest(&bytes);
        if let Ok(expected) = reference.parse::<Sha256Digest>() {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what: format!("manifest {reference}"),
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        // The body's own mediaType wins over a registry's Content-Type.
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned))
            .unwrap_or(content_type);
        Ok(Some((bytes, media_type, digest)))
    }

    /// Tags `bytes` as `reference`; returns the manifest's digest.
    pub fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Sha256Digest, RegistryError> {
        self.put_manifest_response(reference, media_type, bytes)?;
        Ok(sha256_digest(bytes))
    }

    /// Puts a manifest that has a `subject` by its digest; whether the
    /// registry indexed it for the referrers API (it says so with an
    /// `OCI-Subject` header), else the pusher keeps the fallback tag.
    pub fn put_referrer(&self, media_type: &str, bytes: &[u8]) -> Result<bool, RegistryError> {
        let digest = sha256_digest(bytes);
        let response = self.put_manifest_response(&digest.to_string(), media_type, bytes)?;
        Ok(response.headers().contains_key("oci-subject"))
    }

    fn put_manifest_response(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Response, RegistryError> {
        let url = self.url(&format!("manifests/{reference}"));
        self.send_retrying(Method::PUT, &url, &Access::Push, &|r| {
            r.header(CONTENT_TYPE, media_type).body(bytes.to_vec())
        })
    }

    /// The referrers of the manifest `subject` whose artifactType is
    /// `artifact_type`: from the referrers API, or from the index at its
    /// tag fallback (`sha256-HEX`) on a registry without it (distribution
    /// 2.x). Only the first page; none if there are none.
    pub fn referrers(
        &self,
        subject: &Sha256Digest,
        artifact_type: &str,
    ) -> Result<Vec<IndexEntry>, RegistryError> {
        let url = format!(
            "{}?artifactType={}",
            self.url(&format!("referrers/{subject}")),
            url_escape(artifact_type)
        );
        let listed = match self.send_retrying(Method::GET, &url, &Access::Pull, &|r| {
            r.header(ACCEPT, OCI_INDEX_TYPE)
        }) {
            // The API is not there: the pusher kept the list at the fallback tag.
            Err(e) if matches!(e.status(), Some(404 | 405)) => {
                match self.manifest(&referrers_tag(subject), &[OCI_INDEX_TYPE])? {
                    Some((bytes, _, _)) => bytes,
                    None => return Ok(Vec::new()),
                }
            }
            other => read_bounded(other?, MAX_MANIFEST_BYTES, &url)?,
        };
        let index: OciIndex = serde_json::from_slice(&listed)
            .map_err(|e| protocol(&url, format!("the referrers of {subject}: {e}")))?;
        // A registry may not filter.
        Ok(index
            .manifests
            .into_iter()
            .filter(|m| m.artifact_type.as_deref() == Some(artifact_type))
            .collect())
    }

    /// The blob's size if the repository has it.
    pub fn blob_size(
        &self,
        digest: &Sha256Digest,
        access: &Access,
    ) -> Result<Option<u64>, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        match self.send_retrying(Method::HEAD, &url, access, &|r| r) {
            Ok(response) => Ok(response
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A blob read whole (at most `limit` bytes) and checked against its digest.
    pub fn blob(&self, digest: &Sha256Digest, limit: u64) -> Result<Vec<u8>, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let mut backoff = Backoff::new(self.retry_window);
        loop {
            let attempt = self
                .send(Method::GET, &url, &Access::Pull, &|r| r)
                .and_then(|response| read_bounded(response, limit, &url));
            match attempt {
                Ok(bytes) => {
                    self.traffic.add_bytes(bytes.len() as u64);
                    let actual = sha256_digest(&bytes);
                    if actual != *digest {
                        return Err(RegistryError::DigestMismatch {
                            what: format!("blob {digest}"),
                            expected: digest.to_string(),
                            actual: actual.to_string(),
                        });
                    }
                    return Ok(bytes);
                }
                Err(e) if backoff.retry(e.is_transient(), &e) => {
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A blob as a stream, for the caller to check as it reads.
    pub fn blob_stream(&self, digest: &Sha256Digest) -> Result<Response, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        self.send_retrying(Method::GET, &url, &Access::Pull, &|r| r)
    }

    /// Bytes `range` of a blob, in one request with one closed range
    /// (some CDNs refuse multi-range); `timeout` bounds the attempt.
    pub fn blob_range(
        &self,
        digest: &Sha256Digest,
        range: Range<u64>,
        timeout: Duration,
    ) -> Result<RangeAnswer, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        self.traffic.ranges.fetch_add(1, Ordering::Relaxed);
        let response = self.send(Method::GET, &url, &Access::Pull, &|r| {
            r.header(RANGE, &header).timeout(timeout)
        })?;
        let at = response.url().to_string();
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Ok(RangeAnswer::Whole(response));
        }
        let content_range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let expected_prefix = format!("bytes {}-{}/", range.start, range.end - 1);
        if !content_range.starts_with(&expected_prefix) {
            return Err(protocol(
                &at,
                format!("asked for {header}, got Content-Range {content_range:?}"),
            ));
        }
        Ok(RangeAnswer::Partial(response))
    }

    /// Mounts a blob from another repository of this registry.
    pub fn mount_blob(
        &self,
        digest: &Sha256Digest,
        from: &str,
    ) -> Result<MountOutcome, RegistryError> {
        let url = format!(
            "{}?mount={digest}&from={}",
            self.url("blobs/uploads/"),
            form_encode(from)
        );
        let response = self.send_retrying(
            Method::POST,
            &url,
            &Access::PushMountFrom(from.to_owned()),
            &|r| r.header(CONTENT_LENGTH, "0"),
        )?;
        if response.status() == StatusCode::CREATED {
            return Ok(MountOutcome::Mounted);
        }
        Ok(MountOutcome::Upload(self.location(&response, &url)?))
    }

    fn location(&self, response: &Response, url: &str) -> Result<String, RegistryError> {
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| protocol(url, "an upload answer without a Location"))?;
        response
            .url()
            .join(location)
            .map(String::from)
            .map_err(|e| protocol(url, format!("bad upload location {location:?}: {e}")))
    }

    /// Uploads a blob in one PUT (monolithic), into `session` if the
    /// registry already opened one, else into a new one.
    pub fn upload_blob(
        &self,
        digest: &Sha256Digest,
        bytes: &[u8],
        session: Option<String>,
    ) -> Result<(), RegistryError> {
        let mut backoff = Backoff::new(self.retry_window);
        let mut session = session;
        loop {
            let attempt = (|| {
                let location = match session.take() {
                    Some(location) => location,
                    None => {
                        let url = self.url("blobs/uploads/");
                        let response = self.send(Method::POST, &url, &Access::Push, &|r| {
                            r.header(CONTENT_LENGTH, "0")
                        })?;
                        self.location(&response, &url)?
                    }
                };
                let mut put =
                    Url::parse(&location).map_err(|e| protocol(&location, e.to_string()))?;
                put.query_pairs_mut()
                    .append_pair("digest", &digest.to_string());
                self.send(Method::PUT, put.as_str(), &Access::Push, &|r| {
                    r.header(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    )
                    .header(CONTENT_LENGTH, bytes.len())
                    .body(bytes.to_vec())
                })
                .map(drop)
            })();
            match attempt {
                Err(e) if backoff.retry(e.is_transient(), &e) => {
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }

    /// Every tag of the repository, following `Link` pages.
    pub fn tags(&self) -> Result<Vec<String>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let mut tags = Vec::new();
        let mut url = self.url("tags/list?n=1000");
        while tags.len() < MAX_TAGS {
            let response = match self.send_retrying(Method::GET, &url, &Access::Pull, &|r| r) {
                Err(e) if e.status() == Some(404) => break,
                other => other?,
            };
            let at = response.url().clone();
            let next = response
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.split_once('<')?
                        .1
                        .split_once('>')
                        .map(|(u, _)| u.to_owned())
                });
            let body = read_bounded(response, MAX_MANIFEST_BYTES, &url)?;
            let page: TagList = serde_json::from_slice(&body)
                .map_err(|e| protocol(&url, format!("tag list: {e}")))?;
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(next) => {
                    url = at
                        .join(&next)
                        .map_err(|e| protocol(&url, e.to_string()))?
                        .to_string();
                }
                None => break,
            }
        }
        Ok(tags)
    }
}

/// `application/x-www-form-urlencoded` of `pairs`.
fn form_body(pairs: &[(&str, String)]) -> String {
    let mut encoder = Url::parse("http://form.invalid/").expect("a constant URL parses");
    encoder
        .query_pairs_mut()
        .extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
    encoder.query().unwrap_or_default().to_owned()
}

fn basic_header(c: &Credentials) -> String {
    let raw = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn form_encode(s: &str) -> String {
    url_escape(s)
}

/// Percent-encodes everything but unreserved characters and `/`.
fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Any answer but 2xx becomes [`RegistryError::Status`], with the registry's message.
fn check(response: Response, url: &str) -> Result<Response, RegistryError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = read_bounded(response, MAX_SMALL_BODY, url).unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            let first = v.get("errors")?.get(0)?;
            Some(format!(
                "{} {}",
                first.get("code")?.as_str().unwrap_or(""),
                first.get("message").and_then(|m| m.as_str()).unwrap_or("")
            ))
        })
        .unwrap_or_else(|| text.trim().chars().take(300).collect());
    let hint = match status {
        StatusCode::NOT_FOUND => " (no such repository, tag or blob)",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            " (log in with `docker login`, or set SKIFF_REGISTRY_AUTH=[HOST=]USER:PASSWORD)"
        }
        _ => "",
    };
    Err(RegistryError::Status {
        url: url.to_owned(),
        status: status.as_u16(),
        hint,
        message: message.trim().to_owned(),
    })
}

/// Reads a body of at most `limit` bytes; more is an error, never a longer buffer.
pub(crate) fn read_bounded(
    response: Response,
    limit: u64,
    url: &str,
) -> Result<Vec<u8>, RegistryError> {
    let declared = response.content_length();
    crate::body::read_bounded(response, declared, limit).map_err(|e| match e {
        crate::body::BodyError::Read(e) => RegistryError::Interrupted {
            url: url.to_owned(),
            message: e.to_string(),
        },
        too_long => protocol(url, too_long.to_string()),
    })
}
