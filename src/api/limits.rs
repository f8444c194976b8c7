//! Request-wide limits: how many requests are handled at once, how many body
//! bytes they may hold in memory together, and how long one may take. Each
//! answers in the usual JSON error shape.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, BodyDataStream};
use axum::extract::{Request, State};
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// Probes and scrapes: never counted or timed out, so they answer under load.
pub(super) fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// Readiness probes answered at once: each is cheap (the store check is
/// cached), so this only bounds a flood, apart from the requests' slots.
const PROBE_SLOTS: usize = 32;

/// Slots for requests (`--max-concurrent-requests`) and, apart, for probes.
#[derive(Clone)]
pub struct Slots {
    requests: Arc<Semaphore>,
    probes: Arc<Semaphore>,
}

impl Slots {
    pub fn new(requests: usize) -> Self {
        Self { requests: Arc::new(Semaphore::new(requests)), probes: Arc::new(Semaphore::new(PROBE_SLOTS)) }
    }
}

/// Refuses a request with 503 when its slots are all taken, instead of
/// queueing it behind work it would only wait for. Probes are not counted:
/// `/health` and `/metrics` read memory only, and `/ready` waits for one of
/// slots of its own (its store check is cached and bounded), so a flood of
/// probes neither takes the requests' slots nor holds up the liveness probe.
pub async fn concurrency(State(slots): State<Slots>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path == "/ready" {
        let Ok(_permit) = slots.probes.acquire().await else { unreachable!("the probe slots are never closed") };
        return next.run(request).await;
    }
    if is_probe(path) {
        return next.run(request).await;
    }
    match slots.requests.try_acquire() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::TooManyRequests.into_response(),
    }
}

/// The request-body bytes all requests together may hold in memory, counted
/// in KiB (a semaphore counts permits in `u32`), and the pace a body must keep.
#[derive(Clone)]
pub struct BodyBudget {
    kib: Arc<Semaphore>,
    max_body_bytes: usize,
    /// Bytes a second a body must average after `BODY_GRACE`; zero: no minimum.
    min_rate: u64,
}

/// How long a body may take before its pace is checked: a client's first
/// bytes can wait on a slow start or a busy network.
const BODY_GRACE: Duration = Duration::from_secs(5);

impl BodyBudget {
    pub fn new(total_bytes: usize, max_body_bytes: usize, min_rate: u64) -> Self {
        Self { kib: Arc::new(Semaphore::new(total_bytes / 1024)), max_body_bytes, min_rate }
    }
}

/// Why a body was cut off while it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Its bytes would take the bodies held at once past the budget.
    Budget,
    /// It fell behind the minimum pace.
    TooSlow,
}

/// What a metered body holds until its request is answered.
#[derive(Default)]
struct Held {
    permits: Mutex<Option<OwnedSemaphorePermit>>,
    cut: Mutex<Option<Cut>>,
}

/// Meters every request body as it arrives: each chunk takes its bytes from
/// the budget (held until the request is answered), so a client holds only
/// what it has sent, never what it declares; a body that would pass the budget
/// answers 503, and one that falls behind `--min-body-rate` after a 5 s grace
/// answers 408. A body declared over `--max-body-bytes` is refused (413)
/// before a byte of it is read.
pub async fn body_budget(State(budget): State<BodyBudget>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|d| d > budget.max_body_bytes as u64) {
        let message =
            format!("the request body is over the limit of {} bytes (--max-body-bytes)", budget.max_body_bytes);
        return ApiError::TooLarge { code: "body_too_large", message }.into_response();
    }
    if declared.unwrap_or(0) == 0 && !headers.contains_key(TRANSFER_ENCODING) {
        return next.run(request).await;
    }
    let held = Arc::new(Held::default());
    let (parts, body) = request.into_parts();
    let metered = Body::from_stream(metered(body, budget.clone(), held.clone()));
    let response = next.run(Request::from_parts(parts, metered)).await;
    let cut = *held.cut.lock().unwrap_or_else(|e| e.into_inner());
    match cut {
        Some(Cut::Budget) => ApiError::BodyBudget.into_response(),
        Some(Cut::TooSlow) => ApiError::SlowBody(budget.min_rate).into_response(),
        None => response,
    }
}

/// The body's chunks, each paid for from the budget as it arrives, ending in
/// an error (and a `Cut` recorded in `held`) when the budget or the pace is not met.
fn metered(body: Body, budget: BodyBudget, held: Arc<Held>) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
    let started = Instant::now();
    let state = (body.into_data_stream(), 0u64, false);
    futures::stream::unfold(state, move |(mut chunks, received, done)| {
        let (budget, held) = (budget.clone(), held.clone());
        async move {
            if done {
                return None;
            }
            let chunk = match next_in_pace(&mut chunks, started, received, budget.min_rate).await {
                Ok(None) => return None,
                Ok(Some(Err(error))) => return Some((Err(std::io::Error::other(error)), (chunks, received, true))),
                Ok(Some(Ok(chunk))) => chunk,
                Err(cut) => return Some((Err(cut_off(&held, cut)), (chunks, received, true))),
            };
            let total = received + chunk.len() as u64;
            match pay(&budget, &held, received, total) {
                Ok(()) => Some((Ok(chunk), (chunks, total, false))),
                Err(cut) => {
                    // Read the rest without keeping it, so the client gets its 503 whole
                    // and can retry on the same connection.
                    drain(&mut chunks, started, total, &budget).await;
                    Some((Err(cut_off(&held, cut)), (chunks, total, true)))
                }
            }
        }
    })
}

/// Reads and drops the rest of a refused body, at the pace a body must keep
/// and up to `--max-body-bytes`.
async fn drain(chunks: &mut BodyDataStream, started: Instant, mut received: u64, budget: &BodyBudget) {
    while received <= budget.max_body_bytes as u64 {
        let Ok(Some(Ok(chunk))) = next_in_pace(chunks, started, received, budget.min_rate).await else { return };
        received += chunk.len() as u64;
    }
}

/// The next chunk, if it arrives in time for the body to keep `min_rate`
/// bytes a second (counted from the end of the grace; 0: no minimum).
async fn next_in_pace(
    chunks: &mut BodyDataStream,
    started: Instant,
    received: u64,
    min_rate: u64,
) -> Result<Option<Result<Bytes, axum::Error>>, Cut> {
    if min_rate == 0 {
        return Ok(chunks.next().await);
    }
    let due = BODY_GRACE + Duration::from_secs_f64(received as f64 / min_rate as f64);
    let deadline = tokio::time::Instant::from_std(started + due);
    tokio::time::timeout_at(deadline, chunks.next()).await.map_err(|_| Cut::TooSlow)
}

/// Takes the KiB between `before` and `after` bytes from the budget.
fn pay(budget: &BodyBudget, held: &Held, before: u64, after: u64) -> Result<(), Cut> {
    let kib = u32::try_from(after.div_ceil(1024) - before.div_ceil(1024)).unwrap_or(u32::MAX);
    if kib == 0 {
        return Ok(());
    }
    let permit = budget.kib.clone().try_acquire_many_owned(kib).map_err(|_| Cut::Budget)?;
    let mut permits = held.permits.lock().unwrap_or_else(|e| e.into_inner());
    match permits.as_mut() {
        Some(all) => all.merge(permit),
        None => *permits = Some(permit),
    }
    Ok(())
}

fn cut_off(held: &Held, cut: Cut) -> std::io::Error {
    *held.cut.lock().unwrap_or_else(|e| e.into_inner()) = Some(cut);
    std::io::Error::other(format!("request body cut off: {cut:?}"))
}

/// Answers 408 when a request (reading its body included) takes longer than
/// `limit`. Admin routes are exempt: an activation re-embeds the gallery.
/// Writes that reached the store finish on their own task (see
/// `Catalog::add`), so a timeout never leaves the index behind the store.
pub async fn timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if limit.is_zero() || is_probe(path) || path.starts_with("/admin/") {
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}
