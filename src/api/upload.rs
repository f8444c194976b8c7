//! Reading images out of requests: multipart forms, or a raw `image/*` body.

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header::CONTENT_TYPE;
use bytes::BytesMut;
use serde_json::Value;

use super::error::ApiError;
use super::AppState;

/// Longest label accepted, in characters.
const MAX_LABEL_CHARS: usize = 200;

/// Bounds on one multipart form, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct FormLimits {
    /// Parts of any kind.
    pub max_parts: usize,
    /// Bytes of one image part.
    pub max_part_bytes: usize,
    /// Bytes of one text part (`label`, `metadata`).
    pub max_text_part_bytes: usize,
    /// `image` parts of a gallery form.
    pub max_images: usize,
}

/// A `POST /gallery` form: images plus a label and metadata applying to all of them.
#[derive(Debug, Default)]
pub struct GalleryForm {
    pub images: Vec<Bytes>,
    pub label: Option<String>,
    pub metadata: Option<Value>,
}

/// A multipart form read part by part under its limits: each part is
/// counted and read chunk by chunk, so an oversized one is refused before
/// it is buffered whole.
struct FormReader {
    form: Multipart,
    parts: usize,
    limits: FormLimits,
}

impl FormReader {
    fn new(form: Multipart, limits: FormLimits) -> Self {
        Self { form, parts: 0, limits }
    }

    /// The next part's name and bytes; text parts get the smaller text limit.
    async fn next(&mut self, is_text: impl Fn(&str) -> bool) -> Result<Option<(String, Bytes)>, ApiError> {
        let Some(mut field) = self.form.next_field().await? else { return Ok(None) };
        self.parts += 1;
        if self.parts > self.limits.max_parts {
            return Err(ApiError::TooLarge {
                code: "too_many_parts",
                message: format!("a form may have at most {} parts", self.limits.max_parts),
            });
        }
        let name = field.name().unwrap_or_default().to_string();
        let limit = if is_text(&name) { self.limits.max_text_part_bytes } else { self.limits.max_part_bytes };
        let mut bytes = BytesMut::new();
        while let Some(chunk) = field.chunk().await? {
            if bytes.len() + chunk.len() > limit {
                return Err(ApiError::TooLarge {
                    code: "part_too_large",
                    message: format!("form part `{name}` is larger than {limit} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some((name, bytes.freeze())))
    }
}

/// Reads a gallery form: `image` parts (repeatable), optional `label` text and
/// optional `metadata` (a JSON object).
pub async fn read_gallery_form(form: Multipart, limits: FormLimits) -> Result<GalleryForm, ApiError> {
    let mut form = FormReader::new(form, limits);
    let mut out = GalleryForm::default();
    while let Some((name, bytes)) = form.next(|name| name == "label" || name == "metadata").await? {
        match name.as_str() {
            "image" => {
                if out.images.len() == limits.max_images {
                    return Err(ApiError::TooLarge {
                        code: "too_many_images",
                        message: format!("at most {} images per request", limits.max_images),
                    });
                }
                out.images.push(bytes);
            }
            "label" if out.label.is_some() => return Err(duplicate_field("label")),
            "label" => out.label = Some(parse_label(&text(&name, &bytes)?)?),
            "metadata" if out.metadata.is_some() => return Err(duplicate_field("metadata")),
            "metadata" => out.metadata = Some(parse_metadata(&text(&name, &bytes)?)?),
            other => return Err(unknown_field(other, "image, label, metadata")),
        }
    }
    if out.images.is_empty() {
        return Err(ApiError::bad_request("missing_image", "the form has no `image` part"));
    }
    Ok(out)
}

/// Parses a whole `POST /gallery` body as the handler does; for the fuzz
/// targets and their regression tests, which have bytes rather than a request.
pub async fn parse_gallery_body(content_type: &str, body: Bytes, limits: FormLimits) -> Result<GalleryForm, ApiError> {
    let request = Request::builder()
        .method("POST")
        .header(CONTENT_TYPE, content_type)
        .body(axum::body::Body::from(body))
        .map_err(|e| ApiError::bad_request("invalid_multipart", e.to_string()))?;
    let form = Multipart::from_request(request, &()).await?;
    read_gallery_form(form, limits).await
}

/// Reads the single query image of a request: a multipart form with one
/// `image` part, or the raw body sent as `image/*` or `application/octet-stream`.
pub async fn read_query_image(request: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let content_type =
        request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(|v| v.to_ascii_lowercase());
    match content_type.as_deref() {
        Some(ct) if ct.starts_with("multipart/form-data") => {
            let form = Multipart::from_request(request, state).await?;
            read_single_image_form(FormReader::new(form, state.limits.form)).await
        }
        None => raw_body(request, state).await,
        Some(ct) if ct.starts_with("image/") || ct.starts_with("application/octet-stream") => raw_body(request, state).await,
        Some(other) => Err(ApiError::Unsupported {
            code: "unsupported_media_type",
            message: format!(
                "content type '{other}' is not accepted: send multipart/form-data with an `image` part, \
                 or the image itself with an image/* content type (curl: -H 'Content-Type: image/jpeg' --data-binary @file.jpg)"
            ),
        }),
    }
}

async fn raw_body(request: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let body = Bytes::from_request(request, state).await?;
    if body.is_empty() {
        return Err(ApiError::bad_request("empty_body", "the request body is empty; send an image"));
    }
    Ok(body)
}

/// Reads a `POST /verify` form: exactly one `a` and one `b` image part.
pub async fn read_pair_form(form: Multipart, limits: FormLimits) -> Result<(Bytes, Bytes), ApiError> {
    let mut form = FormReader::new(form, limits);
    let (mut a, mut b) = (None, None);
    while let Some((name, bytes)) = form.next(|_| false).await? {
        let slot = match name.as_str() {
            "a" => &mut a,
            "b" => &mut b,
            other => return Err(unknown_field(other, "a, b")),
        };
        if slot.is_some() {
            return Err(duplicate_field(&name));
        }
        *slot = Some(bytes);
    }
    match (a, b) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => Err(ApiError::bad_request("missing_image", "the form needs two image parts, `a` and `b`")),
    }
}

async fn read_single_image_form(mut form: FormReader) -> Result<Bytes, ApiError> {
    let mut image = None;
    while let Some((name, bytes)) = form.next(|_| false).await? {
        match name.as_str() {
            "image" if image.is_some() => return Err(duplicate_field("image")),
            "image" => image = Some(bytes),
            other => return Err(unknown_field(other, "image")),
        }
    }
    image.ok_or_else(|| ApiError::bad_request("missing_image", "the form has no `image` part"))
}

fn text(name: &str, bytes: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::bad_request("invalid_multipart", format!("form part `{name}` is not UTF-8 text")))
}

/// 1 to 200 characters as sent, not only whitespace (U+FEFF counts, as in the
/// spec's regular expression), nothing a reader cannot see; stored trimmed.
/// Also the rule for `?label=` filters, so both modes answer them alike.
pub(super) fn parse_label(text: &str) -> Result<String, ApiError> {
    let label = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    if label.is_empty() || text.chars().count() > MAX_LABEL_CHARS || text.chars().any(unseen) {
        return Err(ApiError::invalid(
            "invalid_label",
            format!(
                "a label is 1 to {MAX_LABEL_CHARS} printable characters, without control, invisible or \
                 direction-changing characters"
            ),
        ));
    }
    Ok(label.to_string())
}

/// Characters that change what a label looks like without being seen: control
/// characters, zero-width characters and joiners, bidirectional overrides and
/// isolates (which can make "gpj.exe" read "exe.jpg"), the soft hyphen, the
/// word joiner and invisible operators, and the line and paragraph separators.
/// The same set as the `Label` pattern of openapi.yaml.
fn unseen(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00ad}' | '\u{061c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// A JSON object with no NUL character in any key or string: PostgreSQL's
/// `jsonb` cannot hold one, and embedded mode answers the same.
fn parse_metadata(text: &str) -> Result<Value, ApiError> {
    match serde_json::from_str::<Value>(text) {
        Ok(value) if holds_nul(&value) => {
            Err(ApiError::invalid("invalid_metadata", "metadata may not hold a NUL character (\\u0000)"))
        }
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(ApiError::invalid("invalid_metadata", "metadata must be a JSON object")),
        Err(e) => Err(ApiError::bad_request("invalid_metadata", format!("metadata is not valid JSON: {e}"))),
    }
}

pub(super) fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(key, v)| key.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

fn duplicate_field(name: &str) -> ApiError {
    ApiError::bad_request("duplicate_field", format!("the form has more than one `{name}` part"))
}

fn unknown_field(name: &str, accepted: &str) -> ApiError {
    ApiError::bad_request("unknown_field", format!("unknown form part `{name}`; accepted: {accepted}"))
}
