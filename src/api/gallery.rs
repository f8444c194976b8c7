//! `/gallery`: adding images.

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::upload::read_gallery_form;
use super::AppState;
use crate::catalog::Upload;
use crate::gallery::Inserted;

#[derive(Serialize)]
pub struct AddedItem {
    #[serde(flatten)]
    inserted: Inserted,
    label: Option<String>,
}

#[derive(Serialize)]
pub struct AddResponse {
    items: Vec<AddedItem>,
}

/// `POST /gallery`: stores every image of the form, or none (201 when stored).
pub async fn add(
    State(state): State<AppState>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<AddResponse>), ApiError> {
    let form = read_gallery_form(form?, state.limits.max_images_per_request).await?;
    let metadata = form.metadata.unwrap_or_else(|| serde_json::json!({}));
    let uploads = form
        .images
        .into_iter()
        .map(|bytes| Upload { bytes, label: form.label.clone(), metadata: metadata.clone() })
        .collect();
    let inserted = state.catalog.add(uploads).await?;
    let items = inserted.into_iter().map(|inserted| AddedItem { inserted, label: form.label.clone() }).collect();
    Ok((StatusCode::CREATED, Json(AddResponse { items })))
}
