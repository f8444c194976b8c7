//! `/gallery`: adding, listing, fetching and deleting items.

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::upload::read_gallery_form;
use super::AppState;
use crate::catalog::{
    request_fingerprint, AddStatus, Added, IdempotencyKey, ItemSummary, OnDuplicate, Priority, Upload,
};

const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

#[derive(Debug, Deserialize)]
pub struct AddParams {
    #[serde(default)]
    on_duplicate: OnDuplicate,
    /// `bulk` for batch clients (`lookalike import`): embedded behind live traffic.
    #[serde(default)]
    priority: AddPriority,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AddPriority {
    #[default]
    Interactive,
    Bulk,
}

#[derive(Serialize)]
pub struct AddedItem {
    #[serde(flatten)]
    added: Added,
    label: Option<String>,
}

#[derive(Serialize)]
pub struct AddResponse {
    items: Vec<AddedItem>,
}

/// Names a write so that a retry of it stores nothing twice (see `catalog/once.rs`).
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on an answer given again to a retry.
const REPLAYED: &str = "idempotent-replayed";

/// `POST /gallery`: stores every image of the form, or none (201 when stored).
/// With an `Idempotency-Key`, a retry of the same request gets the first answer.
pub async fn add(
    State(state): State<AppState>,
    params: Result<Query<AddParams>, QueryRejection>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let key = idempotency_key(&headers)?;
    let form = read_gallery_form(form?, state.limits.form).await?;
    let metadata = form.metadata.unwrap_or_else(|| serde_json::json!({}));
    let uploads = form
        .images
        .into_iter()
        .map(|bytes| Upload { bytes, label: form.label.clone(), metadata: metadata.clone() })
        .collect();
    let priority = match params.priority {
        AddPriority::Interactive => Priority::Interactive,
        AddPriority::Bulk => Priority::Bulk,
    };
    let (added, replayed) = match key {
        None => (state.catalog.add(uploads, params.on_duplicate, priority).await?, false),
        Some(key) => {
            let fingerprint = request_fingerprint(params.on_duplicate, &uploads);
            let key = IdempotencyKey { key, fingerprint };
            let once = state.catalog.add_once(uploads, params.on_duplicate, priority, key).await?;
            (once.added, once.replayed)
        }
    };
    let any_stored = added.iter().any(|a| a.status == AddStatus::Added);
    let items = added.into_iter().map(|added| AddedItem { added, label: form.label.clone() }).collect();
    // 201 when something was stored; 200 when every image was a skipped duplicate.
    let status = if any_stored { StatusCode::CREATED } else { StatusCode::OK };
    let mut response = (status, Json(AddResponse { items })).into_response();
    if replayed {
        response.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else { return Ok(None) };
    let key = value.to_str().unwrap_or_default();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        let message = "Idempotency-Key is 1 to 255 visible ASCII characters (a UUID, say)";
        return Err(ApiError::invalid("invalid_idempotency_key", message));
    }
    Ok(Some(key.to_string()))
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    label: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<i64>,
    limit: Option<usize>,
}

#[derive(Serialize)]
pub struct ListResponse {
    items: Vec<ItemSummary>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<i64>,
}

/// `GET /gallery?label=&cursor=&limit=`: items in id order, a page at a time.
pub async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(params) = params?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid("invalid_limit", format!("limit must be between 1 and {MAX_PAGE}")));
    }
    if params.cursor.is_some_and(|c| c < 0) {
        return Err(ApiError::invalid("invalid_cursor", "cursor is a `next_cursor` from a previous page, 0 or more"));
    }
    let label = params.label.as_deref().map(super::upload::parse_label).transpose()?;
    let items = state.catalog.list(label, params.cursor.unwrap_or(0), limit).await?;
    let next_cursor = if items.len() == limit { items.last().map(|i| i.id) } else { None };
    Ok(Json(ListResponse { items, next_cursor }))
}

/// `GET /gallery/{id}`, with the `ETag` an edit's `If-Match` takes.
pub async fn get(State(state): State<AppState>, id: Result<Path<i64>, PathRejection>) -> Result<Response, ApiError> {
    let id = item_id(id)?;
    state.catalog.item(id).await?.map(super::edit::with_etag).ok_or_else(|| no_item(id))
}

/// `GET /gallery/{id}/image`: the original bytes, as uploaded.
pub async fn image(State(state): State<AppState>, id: Result<Path<i64>, PathRejection>) -> Result<Response, ApiError> {
    let id = item_id(id)?;
    let image = state.catalog.image(id).await?.ok_or_else(|| no_item(id))?;
    let headers =
        [(header::CONTENT_TYPE, image.media_type), (header::CACHE_CONTROL, "private, max-age=3600".to_string())];
    Ok((headers, Body::from(image.bytes)).into_response())
}

/// `DELETE /gallery/{id}`: gone from search results at once (204).
pub async fn delete(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = item_id(id)?;
    if state.catalog.delete(id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_item(id))
    }
}

pub(super) fn item_id(id: Result<Path<i64>, PathRejection>) -> Result<i64, ApiError> {
    id.map(|Path(id)| id).map_err(|_| ApiError::bad_request("invalid_id", "item ids are integers"))
}

pub(super) fn no_item(id: i64) -> ApiError {
    ApiError::NotFound(format!("no gallery item {id}"))
}
