//! Request-wide limits: how many requests are handled at once, how many body
//! bytes they may hold in memory together, and how long one may take. Each
//! answers in the usual JSON error shape.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;

/// Probes and scrapes: never counted or timed out, so they answer under load.
pub(super) fn is_probe(path: &str) -> bool {
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

/// The request-body bytes all requests together may hold in memory, counted
/// in KiB (a semaphore counts permits in `u32`).
#[derive(Clone)]
pub struct BodyBudget {
    kib: Arc<Semaphore>,
    max_body_bytes: usize,
}

impl BodyBudget {
    pub fn new(total_bytes: usize, max_body_bytes: usize) -> Self {
        Self { kib: Arc::new(Semaphore::new(total_bytes / 1024)), max_body_bytes }
    }
}

/// Refuses a request with 503 when its body would take the bodies held at
/// once past the budget: a body counts at its declared length (at the body
/// limit when it is streamed without one) until the request is answered.
/// Without it, the concurrency limit times the body limit (256 x 32 MiB by
/// default) could all be buffered at once.
pub async fn body_budget(State(budget): State<BodyBudget>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let streamed = headers.contains_key(TRANSFER_ENCODING);
    let bytes = declared.unwrap_or(if streamed { budget.max_body_bytes } else { 0 }).min(budget.max_body_bytes);
    if bytes == 0 {
        return next.run(request).await;
    }
    let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
    match budget.kib.clone().try_acquire_many_owned(kib) {
        Ok(_held) => next.run(request).await,
        Err(_) => ApiError::BodyBudget.into_response(),
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
