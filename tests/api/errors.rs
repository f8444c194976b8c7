//! Every bad input gets its 4xx and a JSON error body, and the server stays up.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::helpers::{assert_error, fixtures, spawn_app, TestApp};

fn png() -> Vec<u8> {
    fixtures().remove(0).1
}

async fn assert_still_healthy(app: &TestApp) {
    let response = app.health().await;
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

#[tokio::test]
async fn bad_search_inputs() {
    let app = spawn_app().await;
    let image = png();
    assert_error(app.search_raw(b"definitely not an image", "3", "image/png").await, 415, "unsupported_image").await;
    assert_error(app.search_raw(&image[..image.len() / 2], "3", "image/png").await, 422, "invalid_image").await;
    assert_error(app.search_raw(b"", "3", "image/png").await, 400, "empty_body").await;
    assert_error(app.search_raw(&image, "abc", "image/png").await, 400, "invalid_query").await;
    assert_error(app.search_raw(&image, "-1", "image/png").await, 400, "invalid_query").await;
    assert_error(app.search_raw(&image, "0", "image/png").await, 422, "invalid_k").await;
    assert_error(app.search_raw(&image, "100000", "image/png").await, 422, "invalid_k").await;
    assert_error(app.search_raw(&image, "3", "text/plain").await, 415, "unsupported_media_type").await;
    let empty_form = app
        .client
        .post(app.url("/search"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ--\r\n")
        .send()
        .await
        .unwrap();
    assert_error(empty_form, 400, "missing_image").await;
    let stray = Form::new().part("image", Part::bytes(image.clone())).text("label", "x");
    assert_error(app.post_form("/search", stray).await, 400, "unknown_field").await;
    let two = Form::new().part("image", Part::bytes(image.clone())).part("image", Part::bytes(image.clone()));
    assert_error(app.post_form("/search", two).await, 400, "duplicate_field").await;
    assert_still_healthy(&app).await;
}

#[tokio::test]
async fn bad_gallery_inputs_store_nothing() {
    let app = spawn_app().await;
    let image = png();
    let good_and_bad = vec![image.clone(), image[..image.len() / 2].to_vec()];
    assert_error(app.add_images(&good_and_bad, Some("x"), None).await, 422, "invalid_image").await;
    assert_error(
        app.add_images(std::slice::from_ref(&image), Some("x"), Some("{not json")).await,
        400,
        "invalid_metadata",
    )
    .await;
    assert_error(
        app.add_images(std::slice::from_ref(&image), Some("x"), Some("[1, 2]")).await,
        422,
        "invalid_metadata",
    )
    .await;
    assert_error(app.add_images(std::slice::from_ref(&image), Some("   "), None).await, 422, "invalid_label").await;
    assert_error(app.add_images(&[], Some("x"), None).await, 400, "missing_image").await;
    assert_error(app.add_images(&[b"GIF89a".to_vec()], None, None).await, 422, "invalid_image").await;
    let stray = Form::new().part("image", Part::bytes(image.clone())).text("colour", "red");
    assert_error(app.post_form("/gallery", stray).await, 400, "unknown_field").await;
    let not_multipart = app.client.post(app.url("/gallery")).body(image.clone()).send().await.unwrap();
    assert_error(not_multipart, 400, "invalid_multipart").await;
    let broken = app
        .client
        .post(app.url("/gallery"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body("--XYZ\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc")
        .send()
        .await
        .unwrap();
    assert_error(broken, 400, "invalid_multipart").await;
    let too_many = vec![image.clone(); 17];
    assert_error(app.add_images(&too_many, None, None).await, 413, "too_many_images").await;

    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["indexed_items"], 0, "a rejected request stores nothing");
}

#[tokio::test]
async fn oversized_bodies_and_images_are_refused() {
    let app = spawn_app().await;
    let huge = vec![0u8; 5 * 1024 * 1024];
    assert_error(app.search_raw(&huge, "1", "image/png").await, 413, "body_too_large").await;
    // A tiny PNG whose header claims 100000 x 100000 pixels.
    let bomb = png_claiming(100_000, 100_000);
    assert_error(app.search_raw(&bomb, "1", "image/png").await, 413, "image_too_large").await;
    assert_still_healthy(&app).await;
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let app = spawn_app().await;
    assert_error(app.client.get(app.url("/nope")).send().await.unwrap(), 404, "not_found").await;
    assert_error(app.client.get(app.url("/search")).send().await.unwrap(), 405, "method_not_allowed").await;
    let response = app.health().await;
    assert!(response.headers().contains_key("x-request-id"));
    let spec = app.client.get(app.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(spec.status().as_u16(), 200);
    let spec = spec.text().await.unwrap();
    assert!(spec.starts_with("openapi: 3.1") && spec.contains("/search:"), "{spec}");
    assert_still_healthy(&app).await;
}

/// A PNG of a few dozen bytes whose header claims `width` x `height` pixels.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", &[]), (b"IEND", &[])] {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        out.extend_from_slice(&chunk);
        out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in data {
        crc ^= *byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
