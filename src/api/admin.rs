//! `/admin`: fine-tuning jobs and model versions, behind the admin bearer token.

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::{AUTHORIZATION, LOCATION};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::finetune::FinetuneParams;
use crate::lifecycle::VersionInfo;

/// Proof that the request carried the admin token; handlers that take it are admin-only.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(token) = &state.admin else {
            return Err(ApiError::AdminDisabled);
        };
        let presented =
            parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(presented) if token.matches(presented.trim()) => Ok(Admin),
            Some(_) => Err(ApiError::Unauthorized("the admin token is wrong".into())),
            None => Err(ApiError::Unauthorized("admin routes need `Authorization: Bearer <token>`".into())),
        }
    }
}

/// `POST /admin/finetune`: JSON parameters (all optional; an empty body takes
/// the active model's defaults, then ours).
pub async fn start(_: Admin, State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let model_defaults = state.lifecycle.active_version().manifest.finetune_defaults;
    let params = FinetuneParams::from_request(&body, &model_defaults).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid("invalid_params", e.to_string()),
        _ => ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}")),
    })?;
    let status = state.jobs.start(params).await?;
    let location = format!("/admin/finetune/{}", status.record.id);
    Ok((StatusCode::ACCEPTED, [(LOCATION, location)], Json(status)).into_response())
}

/// `GET /admin/finetune`: every job, newest first (in cluster mode, every replica's).
pub async fn list(_: Admin, State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(json!({ "jobs": state.jobs.list().await? })).into_response())
}

/// `GET /admin/finetune/{id}` (in cluster mode, of any replica).
pub async fn status(_: Admin, State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let status = state.jobs.status(&id).await?.ok_or_else(|| no_job(&id))?;
    Ok(Json(status).into_response())
}

/// `DELETE /admin/finetune/{id}`: asks a running job to stop; 202 with its
/// status. In cluster mode, the replica running it stops it within a second.
pub async fn cancel(_: Admin, State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let status = state.jobs.status(&id).await?.ok_or_else(|| no_job(&id))?;
    if status.record.state.is_finished() {
        let message = format!("job {id} has already finished");
        return Err(ApiError::Conflict { code: "job_finished", message });
    }
    state.jobs.cancel(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

#[derive(Serialize)]
pub struct Models {
    active: String,
    versions: Vec<VersionInfo>,
}

/// `GET /admin/models`
pub async fn models(_: Admin, State(state): State<AppState>) -> Result<Json<Models>, ApiError> {
    let active = state.lifecycle.active_version().version;
    let versions = state.lifecycle.versions().await?;
    Ok(Json(Models { active, versions }))
}

/// `POST /admin/models/{version}/activate`: starts switching to a version,
/// embedding the gallery with it first where its embeddings are not stored.
/// Answers `202` at once; the switch goes on even if the client goes away.
pub async fn activate(
    _: Admin,
    State(state): State<AppState>,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    let status = state.lifecycle.activate(&version).await?;
    let location = format!("/admin/activations/{}", status.id);
    Ok((StatusCode::ACCEPTED, [(LOCATION, location)], Json(status)).into_response())
}

/// `DELETE /admin/models/{version}`: deletes a saved version with its
/// embeddings and index (not the bundled, active or rollback-target one).
pub async fn delete_model(
    _: Admin,
    State(state): State<AppState>,
    Path(version): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.lifecycle.delete_version(&version).await?).into_response())
}

/// `GET /admin/activations`: the activations since start, newest first (in
/// cluster mode, every replica's).
pub async fn activations(_: Admin, State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(json!({ "activations": state.lifecycle.activations().await? })).into_response())
}

/// `GET /admin/activations/{id}` (in cluster mode, of any replica).
pub async fn activation(_: Admin, State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let status = state.lifecycle.activation(&id).await?;
    status.map(|s| Json(s).into_response()).ok_or_else(|| ApiError::NotFound(format!("no model activation `{id}`")))
}

fn no_job(id: &str) -> ApiError {
    ApiError::NotFound(format!("no fine-tune job `{id}`"))
}
