//! Editing stored items: `PATCH /gallery/{id}` (label and metadata, guarded
//! by `ETag`/`If-Match`) and `POST /gallery/labels` (one label for many ids).

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::gallery::{item_id, no_item};
use super::upload::{holds_nul, parse_label};
use super::AppState;
use crate::catalog::{Edited, ItemEdit, ItemSummary, MetadataEdit};

/// The most ids one `POST /gallery/labels` may relabel.
const MAX_RELABEL: usize = 10_000;
const MERGE_PATCH: &str = "application/merge-patch+json";

/// `PATCH /gallery/{id}`: `{"label": ..., "metadata": ...}`, each optional. As
/// `application/merge-patch+json` (RFC 7396) the metadata merges into what is
/// stored; as `application/json` it replaces it. A `null` label clears it.
pub async fn patch(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = item_id(id)?;
    let merge = match content_type(&headers).as_deref() {
        Some(MERGE_PATCH) => true,
        Some("application/json") => false,
        _ => {
            let message = format!("send the edit as {MERGE_PATCH} (metadata merges) or application/json (replaces)");
            return Err(ApiError::Unsupported { code: "unsupported_media_type", message });
        }
    };
    let mut edit = parse_edit(&json_object(&body)?, merge)?;
    edit.max_metadata_bytes = state.limits.form.max_text_part_bytes;
    let if_match = match headers.get(header::IF_MATCH) {
        Some(value) => Some(value.to_str().map_err(|_| invalid_if_match())?.to_string()),
        None => None,
    };
    match state.catalog.edit(id, edit, if_match).await? {
        Edited::Done(item) => Ok(with_etag(item)),
        Edited::Missing => Err(no_item(id)),
        Edited::TooLarge(size) => Err(ApiError::TooLarge {
            code: "metadata_too_large",
            message: format!(
                "the metadata would take {size} bytes as JSON, over the {} an item may hold (--max-text-part-bytes); nothing changed",
                state.limits.form.max_text_part_bytes
            ),
        }),
        Edited::Stale(item) => {
            // The current tag comes with the refusal, so a client can reread and retry at once.
            let tag = item.etag();
            let message = format!(
                "item {id} changed since the ETag you sent (now {tag}, sent in this answer's ETag); reapply your edit to what it is now"
            );
            let etag = HeaderValue::from_str(&tag).expect("an ETag is ASCII");
            Ok(([(header::ETAG, etag)], ApiError::PreconditionFailed(message)).into_response())
        }
    }
}

/// An item as JSON with its `ETag` (what `If-Match` takes).
pub(super) fn with_etag(item: ItemSummary) -> Response {
    let etag = HeaderValue::from_str(&item.etag()).expect("an ETag is ASCII");
    ([(header::ETAG, etag)], Json(item)).into_response()
}

#[derive(Serialize)]
pub struct Relabelled {
    updated: usize,
    label: Option<String>,
}

/// `POST /gallery/labels`: `{"ids": [...], "label": "..." | null}`, every id or none.
pub async fn relabel(State(state): State<AppState>, body: Bytes) -> Result<Json<Relabelled>, ApiError> {
    let mut body = json_object(&body)?;
    if let Some(other) = body.keys().find(|k| *k != "ids" && *k != "label") {
        return Err(unknown_field(other, "ids, label"));
    }
    let ids: Vec<i64> = match body.remove("ids") {
        Some(ids) => serde_json::from_value(ids).map_err(|_| invalid_ids())?,
        None => return Err(invalid_ids()),
    };
    if ids.is_empty() || ids.len() > MAX_RELABEL {
        return Err(invalid_ids());
    }
    let label = match body.remove("label") {
        None => return Err(ApiError::invalid("invalid_label", "`label` is required: a label, or null to clear it")),
        Some(value) => label_of(value)?,
    };
    let updated = ids.iter().collect::<std::collections::HashSet<_>>().len();
    let missing = state.catalog.relabel(ids, label.clone()).await?;
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().take(20).map(i64::to_string).collect();
        let more = if missing.len() > 20 { format!(" and {} more", missing.len() - 20) } else { String::new() };
        return Err(ApiError::NotFound(format!("no gallery items {}{more}; nothing was relabelled", shown.join(", "))));
    }
    Ok(Json(Relabelled { updated, label }))
}

/// The body's media type, lower case, without parameters.
fn content_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

/// The body as a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("invalid_body", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))),
    }
}

fn parse_edit(body: &Map<String, Value>, merge: bool) -> Result<ItemEdit, ApiError> {
    let mut edit = ItemEdit::default();
    for (key, value) in body {
        match key.as_str() {
            "label" => edit.label = Some(label_of(value.clone())?),
            "metadata" if holds_nul(value) => {
                return Err(ApiError::invalid("invalid_metadata", "metadata may not hold a NUL character (\\u0000)"))
            }
            "metadata" => {
                edit.metadata = match value {
                    Value::Object(_) | Value::Null if merge => MetadataEdit::Merge(value.clone()),
                    Value::Object(map) => MetadataEdit::Replace(map.clone()),
                    Value::Null => MetadataEdit::Replace(Map::new()),
                    _ => return Err(ApiError::invalid("invalid_metadata", "metadata must be a JSON object or null")),
                }
            }
            other => return Err(unknown_field(other, "label, metadata")),
        }
    }
    Ok(edit)
}

/// A label, or `null` for none.
fn label_of(value: Value) -> Result<Option<String>, ApiError> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => parse_label(&text).map(Some),
        _ => Err(ApiError::invalid("invalid_label", "a label is a string, or null to clear it")),
    }
}

fn unknown_field(name: &str, accepted: &str) -> ApiError {
    ApiError::bad_request("unknown_field", format!("unknown field `{name}`; accepted: {accepted}"))
}

fn invalid_ids() -> ApiError {
    ApiError::invalid("invalid_ids", format!("`ids` is a list of 1 to {MAX_RELABEL} item ids"))
}

fn invalid_if_match() -> ApiError {
    ApiError::bad_request("invalid_if_match", "If-Match is an ETag from GET /gallery/{id}, or *")
}
