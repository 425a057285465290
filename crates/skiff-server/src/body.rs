//! Request bodies read whole, with the route's size limit.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};

use crate::error::ApiError;

/// A whole request body. Unlike a bare `Bytes`, a body over the route's
/// limit (413) or one that fails to arrive (400) gets the JSON error body
/// every other refusal has.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(request, state)
            .await
            .map(Body)
            .map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))
    }
}
