//! HTTP layer: routes, shared state and middleware. Handlers parse, call the
//! catalog and translate errors; the logic lives in the domain modules.

mod admin;
mod duplicates;
mod edit;
mod error;
mod gallery;
mod health;
mod keys;
mod limits;
mod metrics;
mod origin;
mod search;
mod suggestions;
pub mod upload;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, Method, Request};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tower_http::LatencyUnit;
use tracing::Level;

pub use error::ApiError;

use crate::auth::{AdminToken, ApiKeys};
use crate::catalog::{Catalog, IndexStartup};
use crate::finetune::Jobs;
use crate::lifecycle::ModelLifecycle;
use upload::FormLimits;

/// Per-request limits taken from the configuration.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_body_bytes: usize,
    pub max_k: usize,
    pub form: FormLimits,
    /// Zero: no timeout.
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// Request-body bytes all requests together may hold in memory.
    pub max_buffered_body_bytes: usize,
    /// Bytes a second a request body must average after its first 5 s; zero: no minimum.
    pub min_body_rate: u64,
}

/// What every handler can reach; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub catalog: Catalog,
    pub lifecycle: ModelLifecycle,
    pub limits: Arc<RequestLimits>,
    pub metrics: PrometheusHandle,
    pub index_startup: Arc<IndexStartup>,
    /// `None`: admin routes are disabled.
    pub admin: Option<Arc<AdminToken>>,
    /// Keys the other routes need; none configured: they are open.
    pub api_keys: Arc<ApiKeys>,
    pub jobs: Jobs,
    /// Origins allowed by CORS (`*` for any); empty: no CORS headers.
    pub cors_origins: Arc<[String]>,
    /// Host names requests may use besides addresses and `localhost` (see `origin`).
    pub allowed_hosts: Arc<[String]>,
    /// Set once shutdown begins: `/ready` then answers 503.
    pub draining: Arc<AtomicBool>,
    /// `/ready`'s store check, cached for a second.
    pub store_check: Arc<health::StoreCheck>,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const API_KEY: HeaderName = HeaderName::from_static("api-key");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
const DENY: HeaderValue = HeaderValue::from_static("DENY");

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let timeout = state.limits.request_timeout;
    let slots = limits::Slots::new(state.limits.max_concurrent_requests);
    let budget = limits::BodyBudget::new(state.limits.max_buffered_body_bytes, body_limit, state.limits.min_body_rate);
    let site = origin::SitePolicy::new(&state.allowed_hosts, state.cors_origins.clone());
    Router::new()
        .route("/", get(web_page))
        .route("/app.js", get(web_script))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(metrics::render))
        .route("/openapi.yaml", get(openapi))
        .route("/gallery", post(gallery::add).get(gallery::list))
        .route("/gallery/labels", post(edit::relabel))
        .route("/gallery/suggestions", get(suggestions::suggestions))
        .route("/gallery/duplicates", post(duplicates::start))
        .route("/gallery/duplicates/{id}", get(duplicates::status))
        .route("/gallery/{id}", get(gallery::get).delete(gallery::delete).patch(edit::patch))
        .route("/gallery/{id}/image", get(gallery::image))
        .route("/gallery/{id}/similar", get(search::similar))
        .route("/gallery/{a}/explain/{b}", get(search::explain))
        .route("/search", post(search::search))
        .route("/verify", post(search::verify))
        .route("/admin/finetune", post(admin::start).get(admin::list))
        .route("/admin/finetune/{id}", get(admin::status).delete(admin::cancel))
        .route("/admin/models", get(admin::models))
        .route("/admin/models/{version}", axum::routing::delete(admin::delete_model))
        .route("/admin/models/{version}/activate", post(admin::activate))
        .route("/admin/activations", get(admin::activations))
        .route("/admin/activations/{id}", get(admin::activation))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(timeout, limits::timeout))
        .layer(middleware::from_fn_with_state(budget, limits::body_budget))
        .layer(middleware::from_fn_with_state(slots, limits::concurrency))
        .layer(middleware::from_fn_with_state(state.api_keys.clone(), keys::require))
        .layer(middleware::from_fn_with_state(site, origin::check))
        .layer(cors(&state.cors_origins))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                // One line per request at info, in the request's span (so with its id).
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(|request: &Request<_>| {
                            let id = request.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("-");
                            tracing::info_span!("request", method = %request.method(), uri = %request.uri(), request_id = %id)
                        })
                        .on_response(DefaultOnResponse::new().level(Level::INFO).latency_unit(LatencyUnit::Millis)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                // The service returns user-uploaded bytes: browsers must not guess their type,
                // and no other site may frame its page.
                .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF))
                .layer(SetResponseHeaderLayer::overriding(header::X_FRAME_OPTIONS, DENY))
                .layer(middleware::from_fn(metrics::record))
                // A panic (a bug) answers 500 in the usual error shape instead of dropping the connection.
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::Internal("a request handler panicked".into()).into_response()
                })),
        )
        .with_state(state)
}

/// CORS for browser frontends on other origins: the configured origins may
/// call every route with the methods and headers the API uses, and read the
/// request id and `Location`. With none configured, no CORS headers are sent.
fn cors(origins: &[String]) -> CorsLayer {
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o.trim()).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, header::IF_MATCH, API_KEY, IDEMPOTENCY_KEY])
        .expose_headers([REQUEST_ID, header::LOCATION, header::ETAG, IDEMPOTENT_REPLAYED])
        .max_age(std::time::Duration::from_secs(3600))
}

/// The web page: an HTML file and its script, embedded in the binary (no
/// CDN), so the service and its page are always the same version. The
/// policy keeps the page to its own origin, runs only its own script file
/// (no inline script) and lets no other site frame it.
async fn web_page() -> impl IntoResponse {
    const POLICY: &str = "default-src 'self'; img-src 'self' blob:; style-src 'unsafe-inline'; \
                          script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
                          form-action 'self'";
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CONTENT_SECURITY_POLICY, POLICY)],
        include_str!("../../static/index.html"),
    )
}

async fn web_script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../../static/app.js"))
}

/// The API contract, embedded at build time so it always matches this binary.
async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], include_str!("../../openapi.yaml"))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
