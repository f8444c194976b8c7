//! `/search`: the most similar gallery items to an uploaded image.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, Request, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::upload::read_query_image;
use super::AppState;
use crate::catalog::{Neighbour, SearchQuery, Timing};

const DEFAULT_K: usize = 10;

#[derive(Debug, Deserialize)]
pub struct SearchParams {
    /// How many neighbours to return.
    k: Option<usize>,
    /// Only items with this label.
    label: Option<String>,
    /// Only results with at least this cosine similarity.
    min_score: Option<f32>,
}

#[derive(Serialize)]
pub struct SearchResponse {
    model: String,
    results: Vec<Neighbour>,
    timing: Timing,
}

/// `POST /search?k=N` with an image as a multipart `image` part or a raw body.
pub async fn search(
    State(state): State<AppState>,
    params: Result<Query<SearchParams>, QueryRejection>,
    request: Request,
) -> Result<Json<SearchResponse>, ApiError> {
    let Query(params) = params?;
    let k = params.k.unwrap_or(DEFAULT_K);
    if k == 0 || k > state.limits.max_k {
        return Err(ApiError::invalid("invalid_k", format!("k must be between 1 and {}", state.limits.max_k)));
    }
    if params.min_score.is_some_and(|m| !(-1.0..=1.0).contains(&m)) {
        return Err(ApiError::invalid("invalid_min_score", "min_score must be between -1 and 1"));
    }
    let image = read_query_image(request, &state).await?;
    let query = SearchQuery { k, label: params.label, min_score: params.min_score };
    let outcome = state.catalog.search(image, &query).await?;
    Ok(Json(SearchResponse { model: outcome.model, results: outcome.results, timing: outcome.timing }))
}
