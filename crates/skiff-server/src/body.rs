//! Request bodies read whole, with the route's size limit.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;

use crate::error::ApiError;

/// The longest a request body may take to arrive: 64 MiB (the largest
/// upload) at under 250 KB/s.
const MAX_BODY_TIME: std::time::Duration = std::time::Duration::from_secs(300);

/// A whole request body. Unlike a bare `Bytes`, a body over the route's
/// limit (413) or one that fails to arrive (400) gets the JSON error body
/// every other refusal has.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        // A body may trickle in, but not for ever: each byte resets the
        // connection's idle timer, so only a bound on the whole stops a
        // client holding its slot with a byte a minute.
        tokio::time::timeout(MAX_BODY_TIME, Bytes::from_request(request, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {MAX_BODY_TIME:?}"),
                )
            })?
            .map(Body)
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
    }
}
