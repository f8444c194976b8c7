//! `/health`: liveness, with what the service runs on. `/ready`: whether it
//! should be sent traffic now (workers running, store answering, not draining).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::{ApiError, AppState};

#[derive(Serialize)]
pub struct Health {
    status: &'static str,
    model: String,
    model_version: String,
    device: String,
    workers: usize,
    precision: String,
    max_batch: usize,
    cuda_available: bool,
    indexed_items: usize,
    /// How the index was made ready at start: `reloaded` (from its dump) or `rebuilt`.
    index_source: &'static str,
}

pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let active = state.catalog.active();
    let info = active.embedder.info();
    Json(Health {
        status: "ok",
        model: info.model_key.clone(),
        device: info.device.clone(),
        workers: info.workers,
        precision: info.precision.to_string(),
        max_batch: info.policy.max_batch,
        cuda_available: info.cuda.available,
        model_version: active.version.version.clone(),
        indexed_items: active.index.len(),
        index_source: state.index_startup.source,
    })
}

#[derive(Serialize)]
pub struct Ready {
    status: &'static str,
    model_version: String,
    indexed_items: usize,
}

/// 200 when a request would be served; 503 `not_ready` (with the reason)
/// while shutting down, when the embedding workers have stopped, or when the
/// store does not answer. A load balancer takes the instance out on 503;
/// `/health` stays 200 as long as the process is alive.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Ready>, ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::NotReady("shutting down".into()));
    }
    let active = state.catalog.active();
    if !active.embedder.is_running() {
        return Err(ApiError::NotReady("the embedding workers have stopped".into()));
    }
    if let Err(error) = state.catalog.gallery.ping().await {
        return Err(ApiError::NotReady(format!("the gallery store does not answer: {error}")));
    }
    Ok(Json(Ready {
        status: "ready",
        model_version: active.version.version.clone(),
        indexed_items: active.index.len(),
    }))
}
