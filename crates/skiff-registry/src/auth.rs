//! Registry credentials as operators keep them, and the challenges that ask
//! for them.
//!
//! Where credentials for a host come from, first match wins:
//! 1. `SKIFF_REGISTRY_AUTH`: `HOST=USER:PASSWORD[,HOST=USER:PASSWORD…]`, or a
//!    bare `USER:PASSWORD` for the one registry a command is about (the
//!    destination, when `convert` reads one registry and writes another);
//! 2. docker's `config.json` (`$DOCKER_CONFIG/config.json`, else
//!    `~/.docker/config.json`): `credHelpers[HOST]`, then `auths[HOST]`,
//!    then `credsStore`, a helper run as `docker-credential-NAME get`.
//!
//! Credentials go to the registry's own host and to the token realm its
//! challenge names, never to a redirect's host, and never over plain HTTP
//! to a host that is not loopback or listed as insecure.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;

use crate::reference::DOCKER_HUB;
use crate::RegistryError;

/// A user name and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ****)", self.username)
    }
}

fn credential_error(host: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::Credentials {
        host: host.to_owned(),
        reason: reason.into(),
    }
}

/// Whether a bare `SKIFF_REGISTRY_AUTH=USER:PASSWORD` applies to a registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareCredentials {
    /// The registry is the one the command is about.
    Apply,
    /// Another registry (the source of a registry-to-registry convert): only
    /// credentials named for its host.
    Ignore,
}

/// The credentials the environment and docker's config hold for `host` (`HOST[:PORT]`).
pub fn credentials_for(
    host: &str,
    bare: BareCredentials,
) -> Result<Option<Credentials>, RegistryError> {
    if let Ok(value) = std::env::var("SKIFF_REGISTRY_AUTH") {
        if let Some(found) = from_skiff_env(&value, host, bare) {
            return Ok(Some(found));
        }
    }
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(credential_error(
                host,
                format!("reading {}: {e}", path.display()),
            ))
        }
    };
    let config: DockerConfig = serde_json::from_str(&text)
        .map_err(|e| credential_error(host, format!("{}: {e}", path.display())))?;
    config.lookup(host)
}

fn from_skiff_env(value: &str, host: &str, bare_use: BareCredentials) -> Option<Credentials> {
    let split = |pair: &str| {
        pair.split_once(':').map(|(u, p)| Credentials {
            username: u.to_owned(),
            password: p.to_owned(),
        })
    };
    let mut bare = None;
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.split_once('=') {
            Some((for_host, pair)) if looks_like_host(for_host) => {
                if for_host == host {
                    return split(pair);
                }
            }
            _ => bare = bare.or_else(|| split(entry)),
        }
    }
    bare.filter(|_| bare_use == BareCredentials::Apply)
}

/// `HOST[:PORT]` with a dot, `localhost` or a port: not `USER:PASSWORD`.
fn looks_like_host(s: &str) -> bool {
    let (name, port) = match s.rsplit_once(':') {
        Some((name, _)) if !name.ends_with(']') && name.contains(':') => (s, None),
        Some((name, port)) => (name, Some(port)),
        None => (s, None),
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let chars_ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
    !name.is_empty()
        && chars_ok
        && (name.contains('.') || name == "localhost" || port.is_some() || name.starts_with('['))
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|d| !d.is_empty())?;
    Some(PathBuf::from(home).join(".docker/config.json"))
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

/// `https://index.docker.io/v1/` → `index.docker.io`, `http://h:5000/x` → `h:5000`.
fn config_key_host(key: &str) -> &str {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    rest.split('/').next().unwrap_or(rest)
}

/// Docker Hub's credentials are filed under its index's name.
fn same_registry(key_host: &str, host: &str) -> bool {
    let hub = |h: &str| h == DOCKER_HUB || h == "index.docker.io" || h == "docker.io";
    key_host == host || (hub(key_host) && hub(host))
}

impl DockerConfig {
    fn lookup(&self, host: &str) -> Result<Option<Credentials>, RegistryError> {
        let helper_server = if same_registry(DOCKER_HUB, host) {
            "https://index.docker.io/v1/".to_owned()
        } else {
            host.to_owned()
        };
        if let Some((_, helper)) = self
            .cred_helpers
            .iter()
            .find(|(key, _)| same_registry(config_key_host(key), host))
        {
            return run_helper(helper, &helper_server, host);
        }
        if let Some((_, auth)) = self
            .auths
            .iter()
            .find(|(key, _)| same_registry(config_key_host(key), host))
        {
            if let Some(found) = auth.credentials(host)? {
                return Ok(Some(found));
            }
        }
        match &self.creds_store {
            Some(store) if !store.is_empty() => run_helper(store, &helper_server, host),
            _ => Ok(None),
        }
    }
}

impl DockerAuth {
    fn credentials(&self, host: &str) -> Result<Option<Credentials>, RegistryError> {
        if let Some(encoded) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| credential_error(host, format!("auths: bad base64: {e}")))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| credential_error(host, "auths: not UTF-8"))?;
            let (username, password) = text
                .split_once(':')
                .ok_or_else(|| credential_error(host, "auths: expected USER:PASSWORD"))?;
            return Ok(Some(Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            }));
        }
        if let (Some(username), Some(password)) = (&self.username, &self.password) {
            return Ok(Some(Credentials {
                username: username.clone(),
                password: password.clone(),
            }));
        }
        Ok(self.identity_token.as_ref().map(|token| Credentials {
            username: IDENTITY_TOKEN_USER.to_owned(),
            password: token.clone(),
        }))
    }
}

/// The user name docker's helpers give for an OAuth2 refresh token.
pub(crate) const IDENTITY_TOKEN_USER: &str = "<token>";

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Runs `docker-credential-NAME get` with the server on stdin.
fn run_helper(name: &str, server: &str, host: &str) -> Result<Option<Credentials>, RegistryError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(credential_error(
            host,
            format!("bad credential helper name {name:?}"),
        ));
    }
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| credential_error(host, format!("running {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| credential_error(host, format!("running {program}: {e}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // The helper protocol's answer for a server it has nothing for.
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(credential_error(
            host,
            format!(
                "{program} get failed ({}): {}{}",
                output.status,
                stdout.trim(),
                stderr.trim()
            ),
        ));
    }
    let answer: HelperAnswer = serde_json::from_str(&stdout)
        .map_err(|e| credential_error(host, format!("{program} answered: {e}")))?;
    Ok(Some(Credentials {
        username: answer.username,
        password: answer.secret,
    }))
}

/// A parsed `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    pub(crate) fn parse(header: &str) -> Option<Challenge> {
        let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_params(params);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    }
}

/// `key="value",key2="value2"` of a `WWW-Authenticate` header.
fn parse_params(params: &str) -> Vec<(String, String)> {
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

/// A bearer token and when to stop using it.
#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub(crate) value: String,
    pub(crate) renew_at: Instant,
}

/// How long a token may be used: its `expires_in` (60 s when absent, as
/// the token spec says), less a margin so it is renewed before it lapses.
pub(crate) fn token_lifetime(expires_in: Option<u64>) -> Duration {
    // A day at most: a token server's number must not overflow a clock.
    let secs = expires_in.filter(|s| *s > 0).unwrap_or(60).min(86_400);
    Duration::from_secs(secs) - Duration::from_secs(secs / 10).min(Duration::from_secs(30))
}

#[derive(Deserialize)]
pub(crate) struct TokenAnswer {
    #[serde(default)]
    pub(crate) token: Option<String>,
    #[serde(default)]
    pub(crate) access_token: Option<String>,
    #[serde(default)]
    pub(crate) expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None, "no realm");
        assert_eq!(Challenge::parse("Negotiate"), None);
    }

    #[test]
    fn skiff_env_credentials_are_per_host() {
        use BareCredentials::{Apply, Ignore};
        let both = "h.example:5000=u1:p1,u2:p2";
        let for_h = from_skiff_env(both, "h.example:5000", Ignore).unwrap();
        assert_eq!(
            (for_h.username.as_str(), for_h.password.as_str()),
            ("u1", "p1")
        );
        let other = from_skiff_env(both, "other.example", Apply).unwrap();
        assert_eq!(other.username, "u2");
        assert_eq!(
            from_skiff_env(both, "other.example", Ignore),
            None,
            "bare, for another registry"
        );
        assert_eq!(
            from_skiff_env("h.example=u:p", "other.example", Apply),
            None
        );
        assert_eq!(
            from_skiff_env("u:p:with:colons", "x", Apply)
                .unwrap()
                .password,
            "p:with:colons"
        );
    }

    #[test]
    fn docker_config_auths_and_hub_names() {
        let config: DockerConfig = serde_json::from_str(
            r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                          "reg.example:5000": {"username": "a", "password": "b"}}}"#,
        )
        .unwrap();
        let hub = config.lookup(DOCKER_HUB).unwrap().unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pass")
        );
        assert_eq!(
            config.lookup("reg.example:5000").unwrap().unwrap().username,
            "a"
        );
        assert_eq!(
            config.lookup("reg.example").unwrap(),
            None,
            "the port is part of the name"
        );
    }

    #[test]
    fn token_lifetimes_keep_a_margin() {
        assert_eq!(token_lifetime(None), Duration::from_secs(54));
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(270));
        assert_eq!(token_lifetime(Some(3600)), Duration::from_secs(3570));
        assert_eq!(token_lifetime(Some(u64::MAX)), Duration::from_secs(86_370));
    }
}
