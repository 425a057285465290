//! `docker://[HOST[:PORT]/]NAME[:TAG|@DIGEST]` references, and which
//! registries are spoken to over plain HTTP.

use std::fmt;

use crate::RegistryError;

pub const DOCKER_HUB: &str = "registry-1.docker.io";

/// A parsed `docker://` reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegistryRef {
    /// `HOST[:PORT]`, as written.
    pub host: String,
    pub repository: String,
    /// A tag, or a `sha256:` digest.
    pub reference: String,
}

impl RegistryRef {
    /// Parses what follows `docker://`.
    pub fn parse(s: &str) -> Result<RegistryRef, RegistryError> {
        let bad = |reason: &str| RegistryError::BadReference {
            reference: s.to_owned(),
            reason: reason.into(),
        };
        let (host, rest) = match s.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                if !valid_host(first) {
                    return Err(bad(
                        "the host must be NAME, IPv4 or [IPv6], with an optional :PORT",
                    ));
                }
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
        let reference_ok = if let Some(hex) = reference.strip_prefix("sha256:") {
            hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        } else {
            !reference.is_empty()
                && reference.len() <= 128
                && reference
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !reference.starts_with(['.', '-'])
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

    /// Parses `docker://…`; `None` if `s` does not start so.
    pub fn parse_url(s: &str) -> Option<Result<RegistryRef, RegistryError>> {
        s.strip_prefix("docker://").map(RegistryRef::parse)
    }

    /// The same repository with another tag or digest.
    pub fn with_reference(&self, reference: &str) -> RegistryRef {
        RegistryRef {
            reference: reference.to_owned(),
            ..self.clone()
        }
    }

    pub fn is_digest(&self) -> bool {
        self.reference.starts_with("sha256:")
    }

    /// `http://HOST` for loopback hosts and those in `SKIFF_INSECURE_REGISTRIES`,
    /// `https://HOST` for all others.
    pub fn base_url(&self) -> String {
        let scheme = if is_plain_http_allowed(&self.host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}", self.host)
    }
}

impl fmt::Display for RegistryRef {
    /// `docker://HOST/REPO:TAG` (or `@DIGEST`), as a user would type it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = if self.is_digest() { '@' } else { ':' };
        write!(
            f,
            "docker://{}/{}{sep}{}",
            self.host, self.repository, self.reference
        )
    }
}

/// `NAME`, IPv4 or `[IPv6]`, then an optional `:PORT`: nothing a URL would
/// read as user info, path or query (`localhost:5000@evil.example`).
fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        (None, port)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = name.is_none_or(|n| {
        !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    });
    port_ok && name_ok
}

/// The host part of `HOST[:PORT]` (brackets kept for IPv6).
pub(crate) fn host_only(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[');
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

pub(crate) fn is_loopback(host: &str) -> bool {
    let h = host_only(host);
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `host` (`HOST[:PORT]`) may be spoken to over plain HTTP, with
/// credentials: loopback, or listed in `SKIFF_INSECURE_REGISTRIES` (comma-separated).
pub fn is_plain_http_allowed(host: &str) -> bool {
    is_loopback(host)
        || std::env::var("SKIFF_INSECURE_REGISTRIES")
            .map(|v| {
                v.split(',')
                    .any(|h| h.trim() == host || h.trim() == host_only(host))
            })
            .unwrap_or(false)
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
        assert_eq!(r.to_string(), "docker://127.0.0.1:5000/team/app:latest");
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = RegistryRef::parse(&format!("quay.io/x/y@{digest}")).unwrap();
        assert_eq!(r.reference, digest);
        assert_eq!(r.base_url(), "https://quay.io");
        assert_eq!(r.to_string(), format!("docker://quay.io/x/y@{digest}"));
        let r = RegistryRef::parse("[::1]:5000/app:1").unwrap();
        assert_eq!(r.base_url(), "http://[::1]:5000");
        for bad in [
            "",
            "UPPER/case",
            "host.io/a//b",
            "x@sha256:zz",
            "a:b c",
            "a:-x",
        ] {
            assert!(RegistryRef::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn plain_http_only_for_loopback() {
        assert!(is_plain_http_allowed("localhost:5000"));
        assert!(is_plain_http_allowed("127.0.0.1"));
        assert!(is_plain_http_allowed("[::1]:5000"));
        assert!(!is_plain_http_allowed("registry.example:5000"));
        assert!(!is_plain_http_allowed("127.example"));
    }
}
