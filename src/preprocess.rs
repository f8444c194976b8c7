//! Image bytes to encoder input: decode under limits, convert to RGB, resize
//! as the manifest says, apply EXIF orientation, normalise to CHW `f32`.
//!
//! `--max-decoded-bytes` bounds a decode's peak, not only its output: the
//! decoded pixels, a conversion to RGB that cannot happen in place, and a
//! progressive JPEG's coefficients are counted from the header before any
//! pixel is allocated. RGBA becomes RGB in place, and the orientation is
//! applied to the resized image (a 90 degree turn of the full image would be
//! a second full copy; turning and resizing to a square commute).

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use fast_image_resize::{images::Image, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{ColorType, DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};

use crate::embed::Priority;
use crate::manifest::{InputSpec, ResizeFilter, ResizePolicy};

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("the body is empty")]
    Empty,
    #[error("not an image in a supported format (JPEG, PNG, WebP, GIF, BMP, TIFF)")]
    UnsupportedFormat,
    #[error("the {format} image could not be decoded: {reason}")]
    Corrupt { format: String, reason: String },
    #[error("the image is too large: {0}")]
    TooLarge(String),
}

/// Decoding limits, checked from the header before any pixel is allocated.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_side: u32,
    pub max_decoded_bytes: u64,
}

/// A decoded, resized, normalised image ready for the encoder.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `3 * size * size` values in CHW order.
    pub pixels: Vec<f32>,
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// A bounded pool for preprocessing off the async runtime: at most `threads`
/// images are decoded at once (on tokio's blocking threads), so a burst of
/// uploads queues here instead of spawning a decoder thread per image and
/// starving the encoder of cores. Bulk work holds at most `threads - 1` of
/// them (one, with a single thread), so a search never queues behind an
/// import's whole backlog of decodes.
#[derive(Debug, Clone)]
pub struct PreprocessPool {
    preprocessor: Preprocessor,
    permits: Arc<Semaphore>,
    bulk_permits: Arc<Semaphore>,
}

impl PreprocessPool {
    /// `threads` 0 means one per CPU core.
    pub fn new(preprocessor: Preprocessor, threads: usize) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = if threads == 0 { cores } else { threads };
        let bulk = threads.saturating_sub(1).max(1);
        Self { preprocessor, permits: Arc::new(Semaphore::new(threads)), bulk_permits: Arc::new(Semaphore::new(bulk)) }
    }

    /// The same thread budget, preparing input for another model.
    pub fn for_input(&self, spec: InputSpec) -> Self {
        Self { preprocessor: Preprocessor::new(spec, self.preprocessor.limits), ..self.clone() }
    }

    /// The synchronous preprocessor, for callers already on their own thread.
    pub fn preprocessor(&self) -> &Preprocessor {
        &self.preprocessor
    }

    /// Decodes and prepares on a blocking thread, holding one of the pool's
    /// permits until the decode ends: a request dropped meanwhile (client
    /// gone, timeout) frees its concurrency slot, but not the permit of a
    /// decode still running, so decodes at once stay within the budget.
    pub async fn prepare(&self, bytes: Bytes, priority: Priority) -> Result<Prepared, PreprocessError> {
        let bulk_permit = match priority {
            Priority::Interactive => None,
            Priority::Bulk => Some(acquire(&self.bulk_permits).await),
        };
        let permit = acquire(&self.permits).await;
        let pre = self.preprocessor.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let _permits = (permit, bulk_permit);
            let started = Instant::now();
            let prepared = pre.prepare(&bytes);
            crate::metrics::preprocess(started.elapsed());
            prepared
        })
        .await;
        // A decoder that panics on hostile bytes is a bad image, not a dead request.
        joined.unwrap_or_else(|_| {
            Err(PreprocessError::Corrupt { format: "image".into(), reason: "the decoder failed".into() })
        })
    }
}

async fn acquire(permits: &Arc<Semaphore>) -> OwnedSemaphorePermit {
    permits.clone().acquire_owned().await.expect("the semaphore is never closed")
}

/// Turns image bytes into encoder input for one model's manifest.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: InputSpec,
    limits: ImageLimits,
}

impl Preprocessor {
    pub fn new(spec: InputSpec, limits: ImageLimits) -> Self {
        Self { spec, limits }
    }

    /// What the encoder expects (size, normalisation, resize policy).
    pub fn spec(&self) -> &InputSpec {
        &self.spec
    }

    /// Side, in pixels, of the prepared square image.
    pub fn size(&self) -> u32 {
        self.spec.size
    }

    /// Number of `f32` values in one prepared image.
    pub fn input_len(&self) -> usize {
        self.spec.input_len()
    }

    pub fn prepare(&self, bytes: &[u8]) -> Result<Prepared, PreprocessError> {
        let (image, format, orientation) = decode_unoriented(bytes, self.limits)?;
        let (mut width, mut height) = (image.width(), image.height());
        if turns_sideways(orientation) {
            (width, height) = (height, width);
        }
        Ok(Prepared { pixels: self.prepare_oriented(image, orientation)?, format, width, height })
    }

    /// The steps after decoding: RGB, resize, normalise. Evaluation calls this
    /// on images it decodes itself, so it measures what the service computes.
    pub fn prepare_decoded(&self, image: DynamicImage) -> Result<Vec<f32>, PreprocessError> {
        self.prepare_oriented(image, Orientation::NoTransforms)
    }

    /// RGB, resize, then `orientation` on the small square, normalise.
    fn prepare_oriented(&self, image: DynamicImage, orientation: Orientation) -> Result<Vec<f32>, PreprocessError> {
        let rgb = DynamicImage::ImageRgb8(to_rgb_on_white(image));
        let resized = self.resize(&rgb)?;
        drop(rgb);
        let size = self.spec.size;
        let square = image::RgbImage::from_raw(size, size, resized.into_vec()).expect("a size x size RGB buffer");
        let mut square = DynamicImage::ImageRgb8(square);
        square.apply_orientation(orientation);
        Ok(self.normalise(square.as_bytes()))
    }

    fn resize(&self, rgb: &DynamicImage) -> Result<Image<'static>, PreprocessError> {
        let size = self.spec.size;
        let mut dst = Image::new(size, size, PixelType::U8x3);
        let mut options = ResizeOptions::new().resize_alg(resize_alg(self.spec.filter));
        if self.spec.resize == ResizePolicy::CenterCrop {
            options = options.fit_into_destination(Some((0.5, 0.5)));
        }
        Resizer::new()
            .resize(rgb, &mut dst, &options)
            .map_err(|e| PreprocessError::Corrupt { format: "decoded".into(), reason: e.to_string() })?;
        Ok(dst)
    }

    /// Interleaved RGB bytes to planar, normalised floats.
    fn normalise(&self, rgb: &[u8]) -> Vec<f32> {
        let plane = rgb.len() / 3;
        let mut out = vec![0f32; rgb.len()];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (px[c] as f32 / 255.0 - self.spec.mean[c]) / self.spec.std[c];
            }
        }
        out
    }
}

/// RGB with any transparency composited over white. Dropping the alpha
/// channel instead would show whatever colour transparent pixels happen to
/// store (often black), so two copies of one icon saved by different tools
/// would look unalike. White is what viewers and the training recipe use.
pub fn to_rgb_on_white(image: DynamicImage) -> image::RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    // In place: pixel i's three bytes go to 3i.., never past what is still to be read (4i..).
    let mut bytes = rgba.into_raw();
    for i in 0..bytes.len() / 4 {
        let alpha = bytes[4 * i + 3] as u32;
        for c in 0..3 {
            // Integer blend with rounding: c * a + 255 * (255 - a), over 255.
            bytes[3 * i + c] = ((bytes[4 * i + c] as u32 * alpha + 255 * (255 - alpha) + 127) / 255) as u8;
        }
    }
    bytes.truncate(bytes.len() / 4 * 3);
    image::RgbImage::from_raw(width, height, bytes).expect("three bytes per pixel; this is a bug")
}

fn resize_alg(filter: ResizeFilter) -> ResizeAlg {
    match filter {
        ResizeFilter::Nearest => ResizeAlg::Nearest,
        ResizeFilter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        ResizeFilter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
        ResizeFilter::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
    }
}

/// Decodes the first frame of an image, refusing oversized ones from the
/// header, and applies its EXIF orientation.
pub fn decode(bytes: &[u8], limits: ImageLimits) -> Result<(DynamicImage, ImageFormat), PreprocessError> {
    let (mut image, format, orientation) = decode_unoriented(bytes, limits)?;
    image.apply_orientation(orientation);
    Ok((image, format))
}

/// Whether an orientation turns the image by a quarter (width and height swap).
fn turns_sideways(orientation: Orientation) -> bool {
    use Orientation::*;
    matches!(orientation, Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH)
}

/// Bytes a decode and its conversion to RGB hold at their peak, from the
/// header: the decoded pixels, a copy when the conversion cannot happen in
/// place, and a progressive JPEG's DCT coefficients (2 bytes a sample).
fn peak_bytes(decoder: &impl ImageDecoder, progressive_jpeg: bool) -> u64 {
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    let color = decoder.color_type();
    let conversion = match color {
        ColorType::Rgb8 | ColorType::Rgba8 => 0,
        other if other.has_alpha() => 4 * pixels,
        _ => 3 * pixels,
    };
    let coefficients = if progressive_jpeg { 2 * pixels * color.channel_count() as u64 } else { 0 };
    decoder.total_bytes() + conversion + coefficients
}

/// Whether JPEG bytes are progressive (an SOF2 frame before the first scan).
fn progressive_jpeg(bytes: &[u8]) -> bool {
    let mut at = 2; // after SOI
    while at + 4 <= bytes.len() && bytes[at] == 0xFF {
        match bytes[at + 1] {
            0xC2 => return true,
            0xDA => return false,
            0xFF => at += 1, // fill byte
            _ => at += 2 + u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize,
        }
    }
    false
}

/// `decode` without the orientation, which is returned.
fn decode_unoriented(
    bytes: &[u8],
    limits: ImageLimits,
) -> Result<(DynamicImage, ImageFormat, Orientation), PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let reader =
        ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|_| PreprocessError::UnsupportedFormat)?;
    let format = reader.format().ok_or(PreprocessError::UnsupportedFormat)?;
    let format_name = format!("{format:?}").to_uppercase();
    let corrupt = |e: ImageError| classify(e, &format_name, limits);

    // The decoder's own allocation limit backs up the header check below,
    // which runs first and can name the dimensions.
    let mut reader = reader;
    let mut image_limits = image::Limits::default();
    image_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(image_limits);

    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    let peak = peak_bytes(&decoder, format == ImageFormat::Jpeg && progressive_jpeg(bytes));
    if width > limits.max_side || height > limits.max_side || peak > limits.max_decoded_bytes {
        return Err(PreprocessError::TooLarge(format!(
            "{width}x{height} pixels taking {peak} bytes to decode and convert; at most {} a side and {} bytes \
             (--max-decoded-bytes) are accepted",
            limits.max_side, limits.max_decoded_bytes
        )));
    }
    let orientation = decoder.orientation().map_err(corrupt)?;
    let image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    Ok((image, format, orientation))
}

fn classify(error: ImageError, format: &str, limits: ImageLimits) -> PreprocessError {
    match error {
        ImageError::Unsupported(_) => PreprocessError::UnsupportedFormat,
        ImageError::Limits(e) => {
            PreprocessError::TooLarge(format!("{e}; at most {} decoded bytes are accepted", limits.max_decoded_bytes))
        }
        other => PreprocessError::Corrupt { format: format.to_string(), reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests;
