//! What the fuzz targets (`fuzz/`) check, shared with the test that replays
//! their committed corpus on stable Rust (`tests/fuzz_corpus.rs`), so every
//! input a fuzzer ever kept is checked again by `make test`.

use std::sync::LazyLock;

use bytes::Bytes;

use crate::api::upload::{parse_gallery_body, FormLimits};
use crate::manifest::Manifest;
use crate::manifest::BUNDLED_MODEL_DIR;
use crate::preprocess::{ImageLimits, Preprocessor};

/// The multipart boundary of the upload target's content type.
pub const FORM_BOUNDARY: &str = "fuzzboundary";

/// Small limits, so the fuzzer reaches them.
pub const FORM_LIMITS: FormLimits =
    FormLimits { max_parts: 8, max_part_bytes: 64 * 1024, max_text_part_bytes: 1024, max_images: 4 };

/// The service's defaults would let one input allocate 256 MiB; these keep
/// each run fast while still exercising the checks.
pub const IMAGE_LIMITS: ImageLimits = ImageLimits { max_side: 4096, max_decoded_bytes: 64 * 1024 * 1024 };

/// The bundled model's preprocessing under `IMAGE_LIMITS`.
pub fn preprocessor() -> Preprocessor {
    let manifest = Manifest::load(BUNDLED_MODEL_DIR.as_ref()).expect("the bundled manifest loads");
    Preprocessor::new(manifest.input, IMAGE_LIMITS)
}

/// Any bytes give pixels of the model's input shape, all finite, from an
/// image within the limits, or a typed error. A panic is the finding.
pub fn check_preprocess(preprocessor: &Preprocessor, data: &[u8]) {
    if let Ok(prepared) = preprocessor.prepare(data) {
        assert_eq!(prepared.pixels.len(), preprocessor.input_len());
        assert!(prepared.pixels.iter().all(|v| v.is_finite()), "non-finite input values");
        assert!(prepared.width <= IMAGE_LIMITS.max_side && prepared.height <= IMAGE_LIMITS.max_side);
    }
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime"));

/// Any body gives a form that keeps the rules (1 to `max_images` images
/// within the part limit, a printable label, an object as metadata) or a
/// 4xx error; a 5xx or a panic is the finding.
pub fn check_upload_form(data: &[u8]) {
    let content_type = format!("multipart/form-data; boundary={FORM_BOUNDARY}");
    let parsed = RUNTIME.block_on(parse_gallery_body(&content_type, Bytes::copy_from_slice(data), FORM_LIMITS));
    match parsed {
        Ok(form) => {
            assert!((1..=FORM_LIMITS.max_images).contains(&form.images.len()));
            assert!(form.images.iter().all(|image| image.len() <= FORM_LIMITS.max_part_bytes));
            if let Some(label) = &form.label {
                assert!(!label.trim().is_empty() && !label.chars().any(char::is_control), "label {label:?}");
            }
            if let Some(metadata) = &form.metadata {
                assert!(metadata.is_object());
            }
        }
        Err(error) => assert!(error.status().is_client_error(), "{error:?} answered {}", error.status()),
    }
}
