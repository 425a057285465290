//! Pulling from an OCI distribution registry (distribution, Harbor, Quay,
//! Docker Hub, …): `docker://[HOST[:PORT]/]NAME[:TAG|@DIGEST]`.
//!
//! Loopback registries and those named in `SKIFF_INSECURE_REGISTRIES`
//! (comma-separated hosts) are spoken to over plain HTTP, as Docker does;
//! all others over HTTPS. Anonymous and bearer-token access work out of the
//! box; `SKIFF_REGISTRY_AUTH=user:password` adds credentials.

use std::io::Read;
use std::sync::Mutex;

use reqwest::blocking::{Client, Response};
use reqwest::header::{ACCEPT, WWW_AUTHENTICATE};
use reqwest::StatusCode;

use oci_spec::image::{ImageIndex as OciIndex, ImageManifest as OciManifest, MediaType};

use crate::source::{
    is_index, layers_of, malformed, pick_platform, BlobLocation, Platform, ResolvedImage,
    MAX_JSON_BLOB,
};
use crate::verify::{check_digest, sha256_digest, sha256_hex};
use crate::OciError;

const DOCKER_HUB: &str = "registry-1.docker.io";

/// Manifest media types we can read, most preferred first.
pub(crate) const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A parsed `docker://` reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRef {
    pub host: String,
    pub repository: String,
    /// A tag, or a `sha256:` digest.
    pub reference: String,
}

impl RegistryRef {
    /// Parses what follows `docker://`.
    pub fn parse(s: &str) -> Result<RegistryRef, OciError> {
        let bad = |reason: &str| OciError::Malformed {
            what: format!("registry reference {s:?}"),
            reason: reason.into(),
        };
        let (host, rest) = match s.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), rest)
            }
            _ => (DOCKER_HUB.to_owned(), s),
        };
        let (name, reference) = if let Some((name, digest)) = rest.split_once('@') {
            (name, digest.to_owned())
        } else {
            match rest.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name, tag.to_owned()),
                _ => (rest, "latest".to_owned()),
            }
        };
        let repository = if host == DOCKER_HUB && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_owned()
        };
        let name_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !name_ok {
            return Err(bad("the repository must be lowercase path components"));
        }
        let reference_ok = if reference.starts_with("sha256:") {
            crate::verify::sha256_hex(&reference).is_ok()
        } else {
            !reference.is_empty()
                && reference.len() <= 128
                && reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !reference_ok {
            return Err(bad("the tag or digest is malformed"));
        }
        Ok(RegistryRef {
            host,
            repository,
            reference,
        })
    }

    fn base_url(&self) -> String {
        let host_only = self
            .host
            .rsplit_once(':')
            .map_or(self.host.as_str(), |(h, _)| h);
        let loopback =
            host_only == "localhost" || host_only.starts_with("127.") || host_only == "[::1]";
        let listed = std::env::var("SKIFF_INSECURE_REGISTRIES")
            .map(|v| v.split(',').any(|h| h.trim() == self.host))
            .unwrap_or(false);
        let scheme = if loopback || listed { "http" } else { "https" };
        format!("{scheme}://{}", self.host)
    }
}

/// Talks to one repository of one registry (made by [`ImageSource::parse`](crate::ImageSource::parse)).
#[derive(Debug)]
pub struct RegistryClient {
    http: Client,
    base: String,
    repository: String,
    token: Mutex<Option<String>>,
}

fn registry_error(url: &str, reason: impl std::fmt::Display) -> OciError {
    OciError::Registry {
        url: url.to_owned(),
        reason: reason.to_string(),
    }
}

impl RegistryClient {
    pub(crate) fn new(reference: &RegistryRef) -> Result<Self, OciError> {
        let http = Client::builder()
            .user_agent(concat!("skiff/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(30))
            // Applies to each read of a body as well: a stalled registry fails, a slow one does not.
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(|e| registry_error(&reference.host, e))?;
        Ok(RegistryClient {
            http,
            base: reference.base_url(),
            repository: reference.repository.clone(),
            token: Mutex::new(None),
        })
    }

    /// GET with the current token; on 401, follows the auth challenge once.
    fn get(&self, path: &str, accept: &[&str]) -> Result<Response, OciError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        let send = || {
            let mut request = self.http.get(&url);
            if !accept.is_empty() {
                request = request.header(ACCEPT, accept.join(", "));
            }
            if let Some(token) = self.token.lock().expect("token lock poisoned").as_ref() {
                request = request.bearer_auth(token);
            } else if let Some((user, password)) = credentials() {
                request = request.basic_auth(user, Some(password));
            }
            request.send().map_err(|e| registry_error(&url, e))
        };
        let mut response = send()?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let challenge = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(challenge) =
                challenge.filter(|c| c.to_ascii_lowercase().starts_with("bearer "))
            {
                let token = self.fetch_token(&challenge)?;
                *self.token.lock().expect("token lock poisoned") = Some(token);
                response = send()?;
            }
        }
        if !response.status().is_success() {
            let status = response.status();
            let mut body = String::new();
            let _ = response.take(512).read_to_string(&mut body);
            let hint = match status {
                StatusCode::NOT_FOUND => " (no such repository, tag or blob)",
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    " (set SKIFF_REGISTRY_AUTH=user:password)"
                }
                _ => "",
            };
            return Err(registry_error(
                &url,
                format!("{status}{hint}: {}", body.trim()),
            ));
        }
        Ok(response)
    }

    /// Gets a bearer token as the `WWW-Authenticate` challenge asks.
    fn fetch_token(&self, challenge: &str) -> Result<String, OciError> {
        let params = parse_challenge(&challenge["bearer ".len()..]);
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                registry_error(
                    &self.base,
                    format!("auth challenge without a realm: {challenge}"),
                )
            })?;
        let default_scope = format!("repository:{}:pull", self.repository);
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
            query.push(("service", service));
        }
        let scope = params
            .iter()
            .find(|(k, _)| k == "scope")
            .map_or(default_scope.as_str(), |(_, v)| v.as_str());
        query.push(("scope", scope));
        let url = reqwest::Url::parse_with_params(&realm, &query)
            .map_err(|e| registry_error(&realm, format!("bad realm: {e}")))?;
        let mut request = self.http.get(url);
        if let Some((user, password)) = credentials() {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().map_err(|e| registry_error(&realm, e))?;
        if !response.status().is_success() {
            return Err(registry_error(
                &realm,
                format!("token request failed: {}", response.status()),
            ));
        }
        let body: serde_json::Value = read_json(response, &realm)?;
        body.get("token")
            .or_else(|| body.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .ok_or_else(|| registry_error(&realm, "token response holds no token"))
    }

    /// A manifest or index by tag or digest, with its media type.
    pub(crate) fn manifest(&self, reference: &str) -> Result<(Vec<u8>, String), OciError> {
        let response = self.get(&format!("manifests/{reference}"), &MANIFEST_TYPES)?;
        let media_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .unwrap_or_default();
        let bytes = read_limited(response, &format!("manifest {reference}"))?;
        Ok((bytes, media_type))
    }

    /// A small blob (a config), read whole.
    pub(crate) fn small_blob(&self, digest: &str) -> Result<Vec<u8>, OciError> {
        read_limited(
            self.get(&format!("blobs/{digest}"), &[])?,
            &format!("blob {digest}"),
        )
    }

    /// A blob as a stream; read errors name the blob and their whole cause.
    pub(crate) fn blob(&self, digest: &str) -> Result<BlobStream, OciError> {
        let response = self.get(&format!("blobs/{digest}"), &[])?;
        Ok(BlobStream {
            response,
            digest: digest.to_owned(),
        })
    }
}

/// A blob being downloaded.
pub(crate) struct BlobStream {
    response: Response,
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

fn credentials() -> Option<(String, String)> {
    let auth = std::env::var("SKIFF_REGISTRY_AUTH").ok()?;
    let (user, password) = auth.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `key="value",key2="value2"` of a `WWW-Authenticate` header.
fn parse_challenge(params: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, tail)) => (value.to_owned(), tail),
                None => (quoted.to_owned(), ""),
            }
        } else {
            match after.split_once(',') {
                Some((value, tail)) => (value.trim().to_owned(), tail),
                None => (after.trim().to_owned(), ""),
            }
        };
        out.push((key, value));
        rest = tail.trim_start_matches([',', ' ']);
    }
    out
}

/// Manifests and configs are small; a registry sending more is broken or hostile.
fn read_limited(response: Response, what: &str) -> Result<Vec<u8>, OciError> {
    const LIMIT: u64 = 16 << 20;
    let url = response.url().to_string();
    let mut bytes = Vec::new();
    response
        .take(LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| registry_error(&url, format!("reading {what}: {e}")))?;
    if bytes.len() as u64 > LIMIT {
        return Err(registry_error(
            &url,
            format!("{what} is larger than {LIMIT} bytes"),
        ));
    }
    Ok(bytes)
}

fn read_json(response: Response, url: &str) -> Result<serde_json::Value, OciError> {
    let bytes = read_limited(response, "JSON")?;
    serde_json::from_slice(&bytes).map_err(|e| registry_error(url, format!("malformed JSON: {e}")))
}

pub(crate) fn resolve_registry(
    reference: &RegistryRef,
    client: &RegistryClient,
    platform: &Platform,
) -> Result<ResolvedImage, OciError> {
    let fetch = |reference: &str, what: &str| -> Result<(Vec<u8>, String, String), OciError> {
        let (bytes, content_type) = client.manifest(reference)?;
        let digest = sha256_digest(&bytes);
        if reference.starts_with("sha256:") {
            check_digest(what, reference, digest.clone())?;
        }
        // The body's own mediaType wins over a registry's Content-Type.
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or(content_type);
        Ok((bytes, media_type, digest))
    };
    let (mut bytes, mut media_type, mut digest) = fetch(&reference.reference, "image manifest")?;
    if !MANIFEST_TYPES.contains(&media_type.as_str()) {
        return Err(OciError::UnknownMediaType(media_type));
    }
    if is_index(&MediaType::from(media_type.as_str())) {
        let index: OciIndex =
            serde_json::from_slice(&bytes).map_err(|e| malformed("image index", e))?;
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
    let config = client.small_blob(&config_digest)?;
    check_digest("image config", &config_digest, sha256_digest(&config))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references_like_docker() {
        let r = RegistryRef::parse("debian:bookworm").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            (DOCKER_HUB, "library/debian", "bookworm")
        );
        let r = RegistryRef::parse("127.0.0.1:5000/team/app").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "team/app", "latest")
        );
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = RegistryRef::parse(&format!("quay.io/x/y@{digest}")).unwrap();
        assert_eq!(r.reference, digest);
        assert_eq!(r.base_url(), "https://quay.io");
        for bad in ["", "UPPER/case", "host.io/a//b", "x@sha256:zz", "a:b c"] {
            assert!(RegistryRef::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn parses_auth_challenges() {
        let params = parse_challenge(
            r#"realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(
            params[0],
            ("realm".into(), "https://auth.example/token".into())
        );
        assert_eq!(params[1], ("service".into(), "registry.example".into()));
        assert_eq!(params[2], ("scope".into(), "repository:a/b:pull".into()));
    }
}
