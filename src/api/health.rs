//! `/health`: liveness, with what the service runs on. `/ready`: whether it
//! should be sent traffic now (workers running, store answering, not draining).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::{ApiError, AppState};
use crate::catalog::IndexSource;

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
    index_source: IndexSource,
    /// Stored items the serving model could not preprocess (not searchable).
    unembeddable_items: usize,
}

pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let serving = state.catalog.serving();
    Json(Health {
        status: "ok",
        model: serving.model,
        device: serving.device,
        workers: serving.workers,
        precision: serving.precision,
        max_batch: serving.max_batch,
        cuda_available: serving.cuda_available,
        model_version: serving.version,
        indexed_items: serving.indexed_items,
        index_source: state.index_startup.source,
        unembeddable_items: serving.unembeddable_items,
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
    let serving = state.catalog.serving();
    if !serving.workers_running {
        return Err(ApiError::NotReady("the embedding workers have stopped".into()));
    }
    if let Err(error) = state.store_check.answer(&state).await {
        return Err(ApiError::NotReady(format!("the gallery store does not answer: {error}")));
    }
    Ok(Json(Ready { status: "ready", model_version: serving.version, indexed_items: serving.indexed_items }))
}

/// How long a store check answers every `/ready` after it: a flood of probes
/// costs one store round trip a second, not one each.
const STORE_CHECK_TTL: Duration = Duration::from_secs(1);
/// How long a store check waits for the store.
const STORE_CHECK_WAIT: Duration = Duration::from_secs(2);

/// The last store check and when it was made; one check runs at a time, and
/// probes that arrive meanwhile wait for it instead of starting their own.
#[derive(Default)]
pub struct StoreCheck {
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl StoreCheck {
    async fn answer(&self, state: &AppState) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref().filter(|(at, _)| at.elapsed() < STORE_CHECK_TTL) {
            tracing::trace!(age_ms = at.elapsed().as_millis(), "store check from cache");
            return result.clone();
        }
        // A store that hangs is a store that does not answer: probes must not wait on it.
        let ping = tokio::time::timeout(STORE_CHECK_WAIT, state.catalog.ping()).await;
        let result = match ping {
            Ok(answered) => answered.map_err(|error| error.to_string()),
            Err(_) => Err(format!("no answer within {} s", STORE_CHECK_WAIT.as_secs())),
        };
        *last = Some((Instant::now(), result.clone()));
        result
    }
}
