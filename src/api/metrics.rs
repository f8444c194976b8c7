//! `/metrics` in the Prometheus text format, and the middleware that counts
//! and times every request by route and status.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics;

pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    metrics::index_items(state.catalog.serving().indexed_items);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

/// Labels by the route template (`/gallery/{id}`), never the raw path, and
/// folds unknown methods together, so clients cannot inflate the label sets.
pub async fn record(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", MatchedPath::as_str).to_owned();
    let method = match *request.method() {
        Method::GET | Method::POST | Method::PUT | Method::DELETE | Method::PATCH | Method::HEAD | Method::OPTIONS => {
            request.method().as_str().to_owned()
        }
        _ => "other".to_owned(),
    };
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::http_request(&method, &route, response.status().as_u16(), started.elapsed());
    response
}
