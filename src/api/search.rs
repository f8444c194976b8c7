//! `/search`: the most similar gallery items to an uploaded image.

use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, Request, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::{image_part_error, ApiError};
use super::gallery::{item_id, no_item};
use super::upload::{read_pair_form, read_query_image};
use super::AppState;
use crate::catalog::{CatalogError, Explanation, SearchOutcome, SearchQuery, Verified};

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

/// `POST /search?k=N` with an image as a multipart `image` part or a raw body.
pub async fn search(
    State(state): State<AppState>,
    params: Result<Query<SearchParams>, QueryRejection>,
    request: Request,
) -> Result<Json<SearchOutcome>, ApiError> {
    let query = search_query(params?.0, &state)?;
    let image = read_query_image(request, &state).await?;
    Ok(Json(state.catalog.search(image, &query).await?))
}

/// `GET /gallery/{id}/similar?k=N`: the items most similar to a stored one, itself left out.
pub async fn similar(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Json<SearchOutcome>, ApiError> {
    let id = item_id(id)?;
    let query = search_query(params?.0, &state)?;
    let outcome = state.catalog.search_by_id(id, &query).await?;
    Ok(Json(outcome.ok_or_else(|| no_item(id))?))
}

fn search_query(params: SearchParams, state: &AppState) -> Result<SearchQuery, ApiError> {
    let k = params.k.unwrap_or(DEFAULT_K);
    if k == 0 || k > state.limits.max_k {
        return Err(ApiError::invalid("invalid_k", format!("k must be between 1 and {}", state.limits.max_k)));
    }
    if params.min_score.is_some_and(|m| !(-1.0..=1.0).contains(&m)) {
        return Err(ApiError::invalid("invalid_min_score", "min_score must be between -1 and 1"));
    }
    let label = params.label.as_deref().map(super::upload::parse_label).transpose()?;
    Ok(SearchQuery { k, label, min_score: params.min_score })
}

/// `POST /verify`: two images, parts `a` and `b`.
pub async fn verify(
    State(state): State<AppState>,
    params: Result<Query<VerifyParams>, QueryRejection>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<VerifyAnswer>, ApiError> {
    let Query(params) = params?;
    let (a, b) = read_pair_form(form?, state.limits.form).await?;
    let explain = params.explain.then(|| (a.clone(), b.clone()));
    let verified = state.catalog.verify(a, b).await.map_err(pair_error)?;
    let explanation = match explain {
        Some((a, b)) => Some(state.catalog.explain(a, b).await.map_err(pair_error)?),
        None => None,
    };
    Ok(Json(VerifyAnswer { verified, explanation }))
}

#[derive(Debug, Deserialize)]
pub struct VerifyParams {
    /// Also answer a similarity map per image (`explain.rs`).
    #[serde(default)]
    explain: bool,
}

#[derive(Serialize)]
pub struct VerifyAnswer {
    #[serde(flatten)]
    verified: Verified,
    #[serde(skip_serializing_if = "Option::is_none")]
    explanation: Option<Explanation>,
}

fn pair_error(e: CatalogError) -> ApiError {
    match e {
        CatalogError::Image { position, source } => image_part_error(["a", "b"][position], source),
        other => other.into(),
    }
}

/// `GET /gallery/{a}/explain/{b}`: why two stored items match, a map per image.
pub async fn explain(
    State(state): State<AppState>,
    ids: Result<Path<(i64, i64)>, PathRejection>,
) -> Result<Json<Explanation>, ApiError> {
    let Path((a, b)) = ids.map_err(|_| ApiError::bad_request("invalid_id", "item ids are integers"))?;
    match state.catalog.explain_items(a, b).await? {
        Some(explanation) => Ok(Json(explanation)),
        None => Err(ApiError::NotFound(format!("no gallery item {a} or {b}"))),
    }
}
