//! The one HTTP error type: every failure becomes a status and the stable body
//! `{"error": {"code": "...", "message": "..."}}`. Details of 5xx errors are
//! logged, never sent.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::catalog::{CatalogError, ErrorKind, PreprocessError};
use crate::curation::ScanError;
use crate::finetune::JobError;
use crate::lifecycle::LifecycleError;

/// Seconds a client is asked to wait after a 503.
const RETRY_AFTER_SECS: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad multipart, bad query string, empty body, missing part).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// 401: a route without the right API key, or an admin route without the right admin token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a read-only API key asked to add or delete.
    #[error("this API key is read-only: adding and deleting items needs the read-write key")]
    ReadOnlyKey,
    /// 403: a request for a host name this service does not answer to, or a
    /// state-changing request from a foreign browser origin.
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// 403: admin routes are disabled (no admin token configured).
    #[error("admin routes are disabled: start the service with LOOKALIKE_ADMIN_TOKEN or --admin-token-file")]
    AdminDisabled,
    /// 404: no such route or item.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists but not with this method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 408: the request took longer than the configured timeout.
    #[error("the request took longer than {}s; a slow upload or a busy service, retry", .0.as_secs_f64())]
    Timeout(std::time::Duration),
    /// 408: the body arrived slower than `--min-body-rate` allows.
    #[error("the request body arrived slower than {0} bytes a second (--min-body-rate); it was cut off")]
    SlowBody(u64),
    /// 409: the request conflicts with what is stored (a refused duplicate).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// 412: an edit's `If-Match` names a state the item has left.
    #[error("{0}")]
    PreconditionFailed(String),
    /// 413: the body, or an image's dimensions, exceed a configured limit.
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
    /// 415: the body's media type, or the image format, is not supported.
    #[error("{message}")]
    Unsupported { code: &'static str, message: String },
    /// 422: well-formed but invalid: an undecodable image, an out-of-range parameter.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// 503: the embedding queue is full; retry shortly.
    #[error("the service is overloaded, retry shortly")]
    Overloaded,
    /// 503: the concurrent-request limit is reached; retry shortly.
    #[error("too many requests are being handled at once, retry shortly")]
    TooManyRequests,
    /// 503: the request bodies held in memory at once are at their budget; retry shortly.
    #[error("request bodies being read are at their memory budget (--max-buffered-body-bytes), retry shortly")]
    BodyBudget,
    /// 503: from `/ready`: the service should not be sent traffic now.
    #[error("not ready: {0}")]
    NotReady(String),
    /// 503: a part the request needs is not running.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug or a failing disk; logged with details, sent without.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest { code, message: message.into() }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid { code, message: message.into() }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::ReadOnlyKey => (StatusCode::FORBIDDEN, "read_only_key"),
            Self::AdminDisabled => (StatusCode::FORBIDDEN, "admin_disabled"),
            Self::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::SlowBody(_) => (StatusCode::REQUEST_TIMEOUT, "body_too_slow"),
            Self::Conflict { code, .. } => (StatusCode::CONFLICT, code),
            Self::PreconditionFailed(_) => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            Self::TooLarge { code, .. } => (StatusCode::PAYLOAD_TOO_LARGE, code),
            Self::Unsupported { code, .. } => (StatusCode::UNSUPPORTED_MEDIA_TYPE, code),
            Self::Invalid { code, .. } => (StatusCode::UNPROCESSABLE_ENTITY, code),
            Self::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            Self::TooManyRequests | Self::BodyBudget => (StatusCode::SERVICE_UNAVAILABLE, "too_many_requests"),
            Self::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error; see the server log".to_string()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(json!({ "error": { "code": code, "message": message } }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<PreprocessError> for ApiError {
    fn from(e: PreprocessError) -> Self {
        image_error(None, e)
    }
}

/// An image error naming the form part it came from.
pub fn image_part_error(part: &str, e: PreprocessError) -> ApiError {
    image_error(Some(format!("part {part}")), e)
}

/// Names the offending image (`image 2`, `part a`) when a request carries several.
fn image_error(which: Option<String>, e: PreprocessError) -> ApiError {
    let message = match which {
        Some(which) => format!("{which}: {e}"),
        None => e.to_string(),
    };
    match e {
        PreprocessError::Empty => ApiError::bad_request("empty_image", message),
        PreprocessError::UnsupportedFormat => ApiError::Unsupported { code: "unsupported_image", message },
        PreprocessError::Corrupt { .. } => ApiError::invalid("invalid_image", message),
        PreprocessError::TooLarge { .. } => ApiError::TooLarge { code: "image_too_large", message },
    }
}

impl ApiError {
    /// The answer to a failure of kind `kind`; `conflict` is the code a conflict answers with.
    fn of_kind(kind: ErrorKind, conflict: &'static str, message: String) -> Self {
        match kind {
            ErrorKind::Invalid => Self::Invalid { code: "invalid", message },
            ErrorKind::NotFound => Self::NotFound(message),
            ErrorKind::Conflict => Self::Conflict { code: conflict, message },
            ErrorKind::Busy => Self::Overloaded,
            ErrorKind::Unavailable => Self::Unavailable(message),
            ErrorKind::Internal => Self::Internal(message),
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        if let CatalogError::Image { position, source } = e {
            return image_error(Some(format!("image {position}")), source);
        }
        if let CatalogError::KeyReused(_) = e {
            return Self::invalid("idempotency_key_reused", e.to_string());
        }
        let conflict = match e {
            CatalogError::Cancelled => "cancelled",
            CatalogError::KeyStale(_) => "idempotency_key_stale",
            _ => "duplicate",
        };
        Self::of_kind(e.kind(), conflict, e.to_string())
    }
}

impl From<ScanError> for ApiError {
    fn from(e: ScanError) -> Self {
        match e {
            ScanError::Running(_) => Self::Conflict { code: "job_running", message: e.to_string() },
            ScanError::Store(e) => CatalogError::from(e).into(),
        }
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Catalog(e) => e.into(),
            LifecycleError::Busy(_) => Self::of_kind(e.kind(), "job_running", e.to_string()),
            LifecycleError::InUse(..) => Self::of_kind(e.kind(), "model_in_use", e.to_string()),
            _ => Self::of_kind(e.kind(), "conflict", e.to_string()),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Data(_) => Self::invalid("insufficient_labels", e.to_string()),
            JobError::Params(_) => Self::invalid("invalid_params", e.to_string()),
            JobError::Catalog(e) => e.into(),
            JobError::Lifecycle(e) => e.into(),
            JobError::Io(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(e: MultipartRejection) -> Self {
        Self::bad_request("invalid_multipart", e.body_text())
    }
}

impl From<MultipartError> for ApiError {
    fn from(e: MultipartError) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::TooLarge { code: "body_too_large", message: e.body_text() };
        }
        Self::bad_request("invalid_multipart", e.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::TooLarge { code: "body_too_large", message: e.body_text() };
        }
        Self::bad_request("invalid_body", e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::bad_request("invalid_query", e.body_text())
    }
}
