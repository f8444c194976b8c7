//! API keys at the door: with any key configured, every route but the probes
//! (`/health`, `/ready`, `/metrics`), the page and its script, the contract
//! and the admin routes (their own token) needs one, as `Authorization:
//! Bearer <key>` or `api-key: <key>`; a read-only key cannot add or delete.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::limits::is_probe;
use super::ApiError;
use crate::auth::{Access, ApiKeys};

/// Routes besides the probes that answer without a key: the page and the contract.
const OPEN: [&str; 3] = ["/", "/app.js", "/openapi.yaml"];

pub async fn require(State(keys): State<Arc<ApiKeys>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let exempt = is_probe(path) || OPEN.contains(&path) || path == "/admin" || path.starts_with("/admin/");
    if !keys.required() || exempt || request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let Some(presented) = presented_key(request.headers()) else {
        let message = "this service needs an API key: `Authorization: Bearer <key>` or `api-key: <key>`";
        return ApiError::Unauthorized(message.into()).into_response();
    };
    match keys.access(presented) {
        None => ApiError::Unauthorized("the API key is wrong".into()).into_response(),
        Some(Access::Read) if is_write(request.method(), path) => ApiError::ReadOnlyKey.into_response(),
        Some(_) => next.run(request).await,
    }
}

/// `api-key: <key>`, else `Authorization: Bearer <key>`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("api-key").or_else(|| header("authorization").and_then(|v| v.strip_prefix("Bearer "))).map(str::trim)
}

/// Everything but reading: any method besides GET and HEAD, except the two
/// searches that POST an image and the duplicate scan (it changes nothing).
fn is_write(method: &Method, path: &str) -> bool {
    let reads = [Method::GET, Method::HEAD];
    !reads.contains(method) && !["/search", "/verify", "/gallery/duplicates"].contains(&path)
}
