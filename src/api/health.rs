//! `/health`: liveness, with what the service runs on.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::AppState;

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
