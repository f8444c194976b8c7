//! `GET /gallery/suggestions?n=`: unlabelled items worth labelling next.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::catalog::Suggestions;

const MAX_SUGGESTIONS: usize = 200;

/// One computation at a time per process (each is up to 2,000 index
/// searches); further requests wait their turn.
static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

#[derive(Debug, Deserialize)]
pub struct SuggestionParams {
    n: Option<usize>,
}

pub async fn suggestions(
    State(state): State<AppState>,
    params: Result<Query<SuggestionParams>, QueryRejection>,
) -> Result<Json<Suggestions>, ApiError> {
    let Query(params) = params?;
    let n = params.n.unwrap_or(20);
    if n == 0 || n > MAX_SUGGESTIONS {
        return Err(ApiError::invalid("invalid_n", format!("n must be between 1 and {MAX_SUGGESTIONS}")));
    }
    let _turn = RUNNING.acquire().await.expect("the semaphore is never closed");
    Ok(Json(state.catalog.suggestions(n).await?))
}
