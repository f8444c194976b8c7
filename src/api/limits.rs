//! Request-wide limits: how many requests are handled at once, and how long
//! one may take. Both answer in the usual JSON error shape.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;

/// Probes and scrapes: never counted or timed out, so they answer under load.
fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// Refuses a request with 503 when `slots` are all taken, instead of queueing
/// it behind work it would only wait for.
pub async fn concurrency(State(slots): State<Arc<Semaphore>>, request: Request, next: Next) -> Response {
    if is_probe(request.uri().path()) {
        return next.run(request).await;
    }
    match slots.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::TooManyRequests.into_response(),
    }
}

/// Answers 408 when a request (reading its body included) takes longer than
/// `limit`. Admin routes are exempt: an activation re-embeds the gallery.
/// Writes that reached the store finish on their own task (see
/// `Catalog::add`), so a timeout never leaves the index behind the store.
pub async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if limit.is_zero() || is_probe(path) || path.starts_with("/admin/") {
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}
