//! Bearer tokens: one for writes, optionally one for reads.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use skiff_format::wire::AccessReport;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// The tokens a server was started with. Without a write token, writes are
/// refused unless `anonymous_writes` opens them to everyone: a server must be
/// told in so many words to let any peer replace the manifests hosts pull.
/// Without a read token, reads are open.
#[derive(Clone, Default)]
pub struct Tokens {
    pub write: Option<String>,
    pub read: Option<String>,
    /// Writes need no token (only when `write` is `None`).
    pub anonymous_writes: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Tokens {
    /// Whether a request bearing `presented` may do `access`. The write
    /// token also grants reads. Comparisons take the same time whatever
    /// prefix matches, so a token cannot be guessed byte by byte.
    fn allows(&self, access: Access, presented: Option<&[u8]>) -> bool {
        let matches = |token: &Option<String>| match (token, presented) {
            (Some(token), Some(presented)) => bool::from(token.as_bytes().ct_eq(presented)),
            _ => false,
        };
        match access {
            Access::Write => match &self.write {
                Some(_) => matches(&self.write),
                None => self.anonymous_writes,
            },
            Access::Read => self.read.is_none() || matches(&self.read) || matches(&self.write),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    // The scheme is case-insensitive (RFC 9110).
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

fn check(parts: &Parts, state: &AppState, access: Access) -> Result<(), ApiError> {
    if state.tokens.allows(access, bearer(&parts.headers)) {
        return Ok(());
    }
    let what = match access {
        Access::Read => "reading",
        Access::Write => "writing",
    };
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        format!("{what} needs a valid bearer token (Authorization: Bearer TOKEN)"),
    ))
}

/// `GET /v1/auth`: what the presented token may do. Open to all, so that a
/// client learns before it sends a large body that the body would be refused
/// (a server that answers 401 early and closes can leave the client writing
/// into a closed connection).
pub async fn describe(State(state): State<AppState>, headers: HeaderMap) -> Json<AccessReport> {
    let presented = bearer(&headers);
    Json(AccessReport {
        read: state.tokens.allows(Access::Read, presented),
        write: state.tokens.allows(Access::Write, presented),
    })
}

/// An extractor that admits a request allowed to read. Handlers take it
/// before their body, so a refused request is never read.
pub struct CanRead;

/// An extractor that admits a request allowed to write.
pub struct CanWrite;

impl FromRequestParts<AppState> for CanRead {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        check(parts, state, Access::Read).map(|()| CanRead)
    }
}

impl FromRequestParts<AppState> for CanWrite {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        check(parts, state, Access::Write).map(|()| CanWrite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grant_what_they_should() {
        let closed = Tokens::default();
        assert!(!closed.allows(Access::Write, None));
        assert!(!closed.allows(Access::Write, Some(b"")));
        assert!(closed.allows(Access::Read, None));

        let open = Tokens {
            anonymous_writes: true,
            ..Tokens::default()
        };
        assert!(open.allows(Access::Write, None));
        assert!(open.allows(Access::Read, None));

        // A read token alone leaves writes closed, and does not grant them.
        let read_only = Tokens {
            read: Some("r".into()),
            ..Tokens::default()
        };
        assert!(!read_only.allows(Access::Write, Some(b"r")));
        assert!(!read_only.allows(Access::Write, None));
        assert!(read_only.allows(Access::Read, Some(b"r")));

        // A write token wins over anonymous_writes.
        let tokens = Tokens {
            write: Some("w-secret".into()),
            read: Some("r-secret".into()),
            anonymous_writes: true,
        };
        assert!(tokens.allows(Access::Write, Some(b"w-secret")));
        assert!(!tokens.allows(Access::Write, Some(b"r-secret")));
        assert!(!tokens.allows(Access::Write, Some(b"w-secre")));
        assert!(!tokens.allows(Access::Write, None));
        assert!(tokens.allows(Access::Read, Some(b"r-secret")));
        assert!(tokens.allows(Access::Read, Some(b"w-secret")));
        assert!(!tokens.allows(Access::Read, Some(b"")));

        let write_only = Tokens {
            write: Some("w".into()),
            ..Tokens::default()
        };
        assert!(write_only.allows(Access::Read, None));
        assert!(!write_only.allows(Access::Write, Some(b"x")));
    }
}
