//! Decoding limits, conversion and orientation on small images.

use super::*;

fn spec(resize: ResizePolicy) -> InputSpec {
    InputSpec { size: 8, channels: 3, mean: [0.5; 3], std: [0.5; 3], resize, filter: ResizeFilter::Bilinear }
}

const LIMITS: ImageLimits = ImageLimits { max_side: 64, max_decoded_bytes: 1 << 20 };

fn png(width: u32, height: u32, value: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(width, height, image::Luma([value]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

#[test]
fn grey_is_replicated_and_normalised() {
    let p = Preprocessor::new(spec(ResizePolicy::Stretch), LIMITS).prepare(&png(20, 10, 255)).unwrap();
    assert_eq!(p.pixels.len(), 3 * 8 * 8);
    assert!(p.pixels.iter().all(|v| (*v - 1.0).abs() < 1e-6), "white maps to (1 - 0.5) / 0.5");
    assert_eq!((p.width, p.height), (20, 10));
}

#[test]
fn transparency_is_composited_over_white() {
    let mut img = image::RgbaImage::from_pixel(4, 4, image::Rgba([0, 0, 0, 0]));
    img.put_pixel(0, 0, image::Rgba([255, 0, 0, 255]));
    img.put_pixel(1, 0, image::Rgba([0, 0, 0, 128]));
    let rgb = to_rgb_on_white(DynamicImage::ImageRgba8(img));
    assert_eq!(rgb.get_pixel(0, 0).0, [255, 0, 0], "opaque pixels keep their colour");
    assert_eq!(rgb.get_pixel(1, 0).0, [127, 127, 127], "half-transparent black is grey");
    assert_eq!(rgb.get_pixel(3, 3).0, [255, 255, 255], "transparent pixels are white, not black");
}

#[test]
fn the_budget_covers_the_conversion_not_only_the_decoded_pixels() {
    // 300 x 300 grey: 90,000 bytes decoded, 270,000 more as RGB; the budget sits between.
    let limits = ImageLimits { max_side: 512, max_decoded_bytes: 200_000 };
    let err = Preprocessor::new(spec(ResizePolicy::Stretch), limits).prepare(&png(300, 300, 9)).unwrap_err();
    assert!(matches!(err, PreprocessError::TooLarge(ref m) if m.contains("360000 bytes")), "{err:?}");
    // RGBA becomes RGB in place: 300 x 150 x 4 = 180,000 bytes is the whole peak.
    let rgba = image::RgbaImage::from_pixel(300, 150, image::Rgba([1, 2, 3, 255]));
    let mut bytes = Vec::new();
    rgba.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png).unwrap();
    Preprocessor::new(spec(ResizePolicy::Stretch), limits).prepare(&bytes).unwrap();
}

#[test]
fn progressive_jpegs_are_told_from_baseline_ones() {
    let baseline = [0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC0, 0, 2, 0xFF, 0xDA];
    let progressive = [0xFF, 0xD8, 0xFF, 0xE0, 0, 4, 0, 0, 0xFF, 0xC2, 0, 2, 0xFF, 0xDA];
    assert!(!progressive_jpeg(&baseline) && progressive_jpeg(&progressive));
    assert!(!progressive_jpeg(&[0xFF, 0xD8, 0xFF]), "short input");
}

#[test]
fn a_quarter_turn_is_applied_to_the_small_image_and_swaps_the_reported_size() {
    // The left half black, the right half white; a quarter turn puts white on one half of the rows.
    let img = image::RgbImage::from_fn(40, 20, |x, _| if x < 20 { image::Rgb([0; 3]) } else { image::Rgb([255; 3]) });
    let pre = Preprocessor::new(spec(ResizePolicy::Stretch), LIMITS);
    let upright = pre.prepare_oriented(DynamicImage::ImageRgb8(img.clone()), Orientation::NoTransforms).unwrap();
    let turned = pre.prepare_oriented(DynamicImage::ImageRgb8(img.clone()), Orientation::Rotate90).unwrap();
    let expected = pre.prepare_decoded(DynamicImage::ImageRgb8(image::imageops::rotate90(&img))).unwrap();
    assert_ne!(upright, turned);
    let largest_gap = turned.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    // Equal but for rounding between the resizer's two passes (one step is 1/255 / std = 0.0078).
    assert!(largest_gap <= 0.016, "turning after resizing is resizing after turning ({largest_gap})");
    assert!(turns_sideways(Orientation::Rotate90) && !turns_sideways(Orientation::FlipHorizontal));
}

#[test]
fn oversized_header_is_refused() {
    let err = Preprocessor::new(spec(ResizePolicy::CenterCrop), LIMITS).prepare(&png(65, 2, 0)).unwrap_err();
    assert!(matches!(err, PreprocessError::TooLarge(ref m) if m.starts_with("65x2")), "{err:?}");
}

#[test]
fn truncated_and_foreign_bytes_are_told_apart() {
    let bytes = png(16, 16, 7);
    let pre = Preprocessor::new(spec(ResizePolicy::Stretch), LIMITS);
    assert!(matches!(pre.prepare(&bytes[..bytes.len() / 2]), Err(PreprocessError::Corrupt { .. })));
    assert!(matches!(pre.prepare(b"hello, world"), Err(PreprocessError::UnsupportedFormat)));
    assert!(matches!(pre.prepare(b""), Err(PreprocessError::Empty)));
}
