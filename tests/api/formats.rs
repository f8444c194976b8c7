//! Every supported image format is decoded, and EXIF orientation is applied.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ImageEncoder, ImageFormat};
use serde_json::Value;

use crate::support::{fixtures, spawn_app, TestApp};

/// Stores the PNG fixture and returns its id.
async fn add(app: &TestApp, png: &[u8]) -> i64 {
    let body: Value = app.add_images(&[png.to_vec()], Some("trouser"), None).await.json().await.unwrap();
    body["items"][0]["id"].as_i64().unwrap()
}

async fn best(app: &TestApp, image: &[u8]) -> (i64, f64) {
    let response = app.search_form(image, 1).await;
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    (body["results"][0]["id"].as_i64().unwrap(), body["results"][0]["score"].as_f64().unwrap())
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

fn trouser() -> Vec<u8> {
    fixtures().into_iter().find(|(class, _)| class == "trouser").unwrap().1
}

#[tokio::test]
async fn every_supported_format_finds_the_png_original() {
    let app = spawn_app().await;
    let png = trouser();
    let id = add(&app, &png).await;
    // Distractors: the other classes.
    for (class, bytes) in fixtures().into_iter().filter(|(c, _)| c != "trouser") {
        assert_eq!(app.add_images(&[bytes], Some(&class), None).await.status(), 201, "a distractor upload");
    }
    let rgb = DynamicImage::ImageRgb8(image::load_from_memory(&png).unwrap().to_rgb8());
    for format in [ImageFormat::Jpeg, ImageFormat::Gif, ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::WebP] {
        let (hit, score) = best(&app, &encode(&rgb, format)).await;
        assert_eq!(hit, id, "{format:?}");
        assert!(score > 0.97, "{format:?}: score {score}");
    }
}

#[tokio::test]
async fn exif_orientation_is_applied() {
    let app = spawn_app().await;
    let png = trouser();
    let id = add(&app, &png).await;
    // Stored turned a quarter left, tagged "rotate 90 clockwise to display".
    let turned = image::load_from_memory(&png).unwrap().rotate270().to_rgb8();
    let jpeg = |exif: Option<Vec<u8>>| {
        let mut out = Vec::new();
        let mut encoder = JpegEncoder::new_with_quality(&mut out, 95);
        if let Some(exif) = exif {
            encoder.set_exif_metadata(exif).unwrap();
        }
        encoder.write_image(turned.as_raw(), turned.width(), turned.height(), image::ExtendedColorType::Rgb8).unwrap();
        out
    };
    let (hit, upright) = best(&app, &jpeg(Some(orientation_exif(6)))).await;
    assert_eq!(hit, id);
    let (_, sideways) = best(&app, &jpeg(None)).await;
    assert!(upright > 0.97, "the tagged copy is seen upright: {upright}");
    assert!(upright - sideways > 0.05, "orientation must matter: upright {upright}, untagged {sideways}");
}

/// A big-endian TIFF block holding one IFD entry: Orientation (0x0112) = `value`.
fn orientation_exif(value: u16) -> Vec<u8> {
    let mut exif = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    exif.extend_from_slice(&1u16.to_be_bytes());
    exif.extend_from_slice(&[0x01, 0x12, 0x00, 0x03, 0x00, 0x00, 0x00, 0x01]);
    exif.extend_from_slice(&value.to_be_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    exif
}
