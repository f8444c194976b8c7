//! `/gallery/duplicates`: scans for near-copies across the whole gallery,
//! grouped, with a suggested keeper per group.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::LOCATION;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::curation::scans;
use crate::gallery::SCANS_KEPT;

#[derive(Debug, Deserialize)]
pub struct ScanParams {
    /// Cosine distance under which two items are copies; default: the model's.
    distance: Option<f64>,
}

/// `POST /gallery/duplicates?distance=`: starts a scan (202, followed at its `Location`).
pub async fn start(
    State(state): State<AppState>,
    params: Result<Query<ScanParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params?;
    let distance = match params.distance {
        // Checked before narrowing: 2.0000000000000004 would round to 2 as an f32.
        Some(d) if d.is_finite() && d > 0.0 && d <= 2.0 => d as f32,
        Some(_) => return Err(ApiError::invalid("invalid_distance", "distance is a cosine distance in (0, 2]")),
        None => state.catalog.copy_distance().ok_or_else(|| {
            let message = "the serving model has no calibrated near-duplicate distance; pass ?distance= (0.05, say)";
            ApiError::invalid("invalid_distance", message)
        })?,
    };
    let scan = scans::start(state.catalog.clone(), distance).await?;
    let location = format!("/gallery/duplicates/{}", scan.id);
    Ok((StatusCode::ACCEPTED, [(LOCATION, location)], Json(scan)).into_response())
}

/// `GET /gallery/duplicates/{id}`: a scan's progress, then its groups.
pub async fn status(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let missing = || {
        let message = format!("no duplicate scan {id} (the last {SCANS_KEPT} are kept; start another)");
        ApiError::NotFound(message)
    };
    // Scan ids are UUIDs: anything else (a NUL byte, say) never reaches the store.
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(missing());
    }
    let scan = scans::get(&state.catalog, &id).await?.ok_or_else(missing)?;
    Ok(Json(scan).into_response())
}
