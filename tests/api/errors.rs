//! Every bad input gets its 4xx and a JSON error body, and the server stays up.

use std::io::{Cursor, Write};

use flate2::write::ZlibEncoder;
use flate2::Compression;
use image::codecs::gif::GifEncoder;
use image::{Frame, ImageFormat};
use reqwest::multipart::{Form, Part};
use reqwest::RequestBuilder;
use serde_json::Value;

use lookalike::config::ServeConfig;

use crate::support::{fixtures, spawn_app, spawn_app_with, PgServer, TestApp, TOKEN};

fn png() -> Vec<u8> {
    fixtures().remove(0).1
}

async fn assert_still_healthy(app: &TestApp) {
    let response = app.health().await;
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

/// One bad request and the error it must get.
struct Case {
    name: &'static str,
    request: RequestBuilder,
    status: u16,
    code: &'static str,
}

fn case(name: &'static str, request: RequestBuilder, status: u16, code: &'static str) -> Case {
    Case { name, request, status, code }
}

fn raw(app: &TestApp, path: &str, content_type: Option<&str>, body: Vec<u8>) -> RequestBuilder {
    let request = app.client.post(app.url(path)).body(body);
    match content_type {
        Some(ct) => request.header("content-type", ct),
        None => request,
    }
}

fn form(app: &TestApp, path: &str, form: Form) -> RequestBuilder {
    app.client.post(app.url(path)).multipart(form)
}

fn image_part(bytes: &[u8]) -> Part {
    Part::bytes(bytes.to_vec()).file_name("x.png")
}

/// 17 parts: one more than the 16 images, so both image and part limits can be reached.
fn matrix_config(config: &mut ServeConfig) {
    (config.admin_token, config.max_form_parts) = (Some(TOKEN.into()), 17);
}

#[tokio::test]
async fn bad_input_matrix() {
    let app = spawn_app_with(matrix_config).await;
    bad_input_matrix_on(&app).await;
    app.stop().await;
}

/// The same answers in cluster mode, where PostgreSQL refuses what SQLite
/// would store (a NUL character).
#[tokio::test]
async fn bad_input_matrix_in_cluster_mode() {
    let pg = PgServer::start();
    let url = pg.url();
    let app = spawn_app_with(|c| {
        matrix_config(c);
        c.database_url = Some(url);
    })
    .await;
    bad_input_matrix_on(&app).await;
    app.stop().await;
}

/// Every kind of bad input the issue lists, against a gallery with items:
/// each gets its status and JSON error, and afterwards the service is
/// healthy and ready and the gallery holds exactly what it held before.
async fn bad_input_matrix_on(app: &TestApp) {
    let image = png();
    let jpeg = reencode(&image, ImageFormat::Jpeg);
    let seeded: Vec<Vec<u8>> = fixtures().into_iter().take(3).map(|(_, png)| png).collect();
    let unseeded = fixtures().remove(5).1;
    assert_eq!(app.add_images(&seeded, Some("seed"), None).await.status(), 201);
    let before = gallery_listing(app).await;

    let multipart = "multipart/form-data; boundary=XYZ";
    let cases = vec![
        // Bodies and content types.
        case("empty search body", raw(app, "/search", Some("image/png"), vec![]), 400, "empty_body"),
        case("empty gallery body", raw(app, "/gallery", Some(multipart), vec![]), 400, "invalid_multipart"),
        case("empty verify body", raw(app, "/verify", Some(multipart), vec![]), 400, "invalid_multipart"),
        case(
            "text/plain search",
            raw(app, "/search", Some("text/plain"), image.clone()),
            415,
            "unsupported_media_type",
        ),
        case("gallery without content type", raw(app, "/gallery", None, image.clone()), 400, "invalid_multipart"),
        case(
            "gallery as JSON",
            raw(app, "/gallery", Some("application/json"), b"{}".to_vec()),
            400,
            "invalid_multipart",
        ),
        // Images.
        case(
            "truncated PNG",
            raw(app, "/search", Some("image/png"), image[..image.len() / 2].to_vec()),
            422,
            "invalid_image",
        ),
        case(
            "truncated JPEG",
            raw(app, "/search", Some("image/jpeg"), jpeg[..jpeg.len() / 2].to_vec()),
            422,
            "invalid_image",
        ),
        case(
            "text sent as an image",
            raw(app, "/search", Some("image/jpeg"), b"definitely not an image".to_vec()),
            415,
            "unsupported_image",
        ),
        case(
            "PNG header claiming 100000 x 100000",
            raw(app, "/search", Some("image/png"), png_claiming(100_000, 100_000)),
            413,
            "image_too_large",
        ),
        case(
            "decompression bomb",
            raw(app, "/search", Some("image/png"), decompression_bomb(20_000)),
            413,
            "image_too_large",
        ),
        case(
            "truncated image among good ones",
            form(
                app,
                "/gallery",
                Form::new().part("image", image_part(&image)).part("image", image_part(&image[..100])),
            ),
            422,
            "invalid_image",
        ),
        case(
            "GIF header only",
            form(app, "/gallery", Form::new().part("image", image_part(b"GIF89a"))),
            422,
            "invalid_image",
        ),
        // Multipart forms.
        case(
            "unterminated multipart",
            raw(
                app,
                "/gallery",
                Some(multipart),
                b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc".to_vec(),
            ),
            400,
            "invalid_multipart",
        ),
        case(
            "multipart without boundary",
            raw(app, "/gallery", Some("multipart/form-data"), image.clone()),
            400,
            "invalid_multipart",
        ),
        case("form without image", raw(app, "/search", Some(multipart), b"--XYZ--\r\n".to_vec()), 400, "missing_image"),
        case("gallery form without image", form(app, "/gallery", Form::new().text("label", "x")), 400, "missing_image"),
        case("verify without b", form(app, "/verify", Form::new().part("a", image_part(&image))), 400, "missing_image"),
        case(
            "two search images",
            form(app, "/search", Form::new().part("image", image_part(&image)).part("image", image_part(&image))),
            400,
            "duplicate_field",
        ),
        case(
            "two labels",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("label", "a").text("label", "b")),
            400,
            "duplicate_field",
        ),
        case(
            "two verify a parts",
            form(app, "/verify", Form::new().part("a", image_part(&image)).part("a", image_part(&image))),
            400,
            "duplicate_field",
        ),
        case(
            "unknown part",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("colour", "red")),
            400,
            "unknown_field",
        ),
        case(
            "metadata not JSON",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("metadata", "{not json")),
            400,
            "invalid_metadata",
        ),
        case(
            "metadata not an object",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("metadata", "[1, 2]")),
            422,
            "invalid_metadata",
        ),
        case(
            "blank label",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("label", "   ")),
            422,
            "invalid_label",
        ),
        case(
            "metadata holding a NUL",
            form(
                app,
                "/gallery",
                Form::new().part("image", image_part(&image)).text("metadata", r#"{"a": "x\u0000"}"#),
            ),
            422,
            "invalid_metadata",
        ),
        case(
            "metadata key holding a NUL",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("metadata", r#"{"\u0000": 1}"#)),
            422,
            "invalid_metadata",
        ),
        case(
            "label holding a NUL",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("label", "a\u{0}b")),
            422,
            "invalid_label",
        ),
        case(
            "label with a zero-width space",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("label", "ca\u{200b}t")),
            422,
            "invalid_label",
        ),
        case(
            "label with a right-to-left override",
            form(app, "/gallery", Form::new().part("image", image_part(&image)).text("label", "\u{202e}gpj.exe")),
            422,
            "invalid_label",
        ),
        case("list filtered by a NUL label", app.client.get(app.url("/gallery?label=%00")), 422, "invalid_label"),
        case(
            "search filtered by a NUL label",
            raw(app, "/search?label=%00", Some("image/png"), image.clone()),
            422,
            "invalid_label",
        ),
        case(
            "similar filtered by an invisible label",
            app.client.get(app.url("/gallery/1/similar?label=%E2%80%8B")),
            422,
            "invalid_label",
        ),
        case(
            "label not UTF-8",
            form(
                app,
                "/gallery",
                Form::new().part("image", image_part(&image)).part("label", Part::bytes(vec![0xff, 0xfe])),
            ),
            400,
            "invalid_multipart",
        ),
        // Limits (the test configuration: 16 images, 17 parts here, 2 MiB a part, 4 KiB a text part, 4 MiB a body).
        case(
            "17 images",
            form(app, "/gallery", (0..17).fold(Form::new(), |f, _| f.part("image", image_part(&image)))),
            413,
            "too_many_images",
        ),
        case(
            "18 parts",
            form(
                app,
                "/gallery",
                (0..16).fold(Form::new().text("label", "x").text("metadata", "{}"), |f, _| {
                    f.part("image", image_part(&image))
                }),
            ),
            413,
            "too_many_parts",
        ),
        case(
            "3 MiB image part",
            form(app, "/gallery", Form::new().part("image", image_part(&vec![0; 3 << 20]))),
            413,
            "part_too_large",
        ),
        case(
            "5 KiB metadata",
            form(
                app,
                "/gallery",
                Form::new()
                    .part("image", image_part(&image))
                    .text("metadata", format!("{{\"a\": \"{}\"}}", "x".repeat(5000))),
            ),
            413,
            "part_too_large",
        ),
        case("5 MiB body", raw(app, "/search", Some("image/png"), vec![0; 5 << 20]), 413, "body_too_large"),
        // Query parameters.
        case("k of 0", raw(app, "/search?k=0", Some("image/png"), image.clone()), 422, "invalid_k"),
        case("negative k", raw(app, "/search?k=-1", Some("image/png"), image.clone()), 400, "invalid_query"),
        case(
            "enormous k",
            raw(app, "/search?k=99999999999999999999", Some("image/png"), image.clone()),
            400,
            "invalid_query",
        ),
        case("k above the limit", raw(app, "/search?k=100000", Some("image/png"), image.clone()), 422, "invalid_k"),
        case("k not a number", raw(app, "/search?k=abc", Some("image/png"), image.clone()), 400, "invalid_query"),
        // Unknown ids and routes.
        case("unknown item", app.client.get(app.url("/gallery/999999")), 404, "not_found"),
        case("unknown item image", app.client.get(app.url("/gallery/999999/image")), 404, "not_found"),
        case("unknown item similar", app.client.get(app.url("/gallery/999999/similar")), 404, "not_found"),
        case("delete unknown item", app.client.delete(app.url("/gallery/999999")), 404, "not_found"),
        case("id not a number", app.client.get(app.url("/gallery/abc")), 400, "invalid_id"),
        case("unknown route", app.client.get(app.url("/nope")), 404, "not_found"),
        case("wrong method", app.client.get(app.url("/search")), 405, "method_not_allowed"),
        // Admin routes without the right token: a search client gets nowhere.
        case(
            "fine-tune without token",
            app.client.post(app.url("/admin/finetune")).json(&serde_json::json!({})),
            401,
            "unauthorized",
        ),
        case(
            "fine-tune with a wrong token",
            app.client
                .post(app.url("/admin/finetune"))
                .bearer_auth("not-the-admin-token-at-all")
                .json(&serde_json::json!({})),
            401,
            "unauthorized",
        ),
        case(
            "models with a basic auth",
            app.client.get(app.url("/admin/models")).basic_auth("admin", Some(TOKEN)),
            401,
            "unauthorized",
        ),
        case("activate without token", app.client.post(app.url("/admin/models/1/activate")), 401, "unauthorized"),
        case(
            "an activation that does not exist",
            app.client.get(app.url("/admin/activations/a999")).bearer_auth(TOKEN),
            404,
            "not_found",
        ),
        case(
            "fine-tune with invalid JSON",
            app.client
                .post(app.url("/admin/finetune"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{"),
            400,
            "invalid_json",
        ),
        case(
            "fine-tune with a P x K batch the triplet loss cannot hold",
            app.client.post(app.url("/admin/finetune")).bearer_auth(TOKEN).json(&serde_json::json!({"p": 32, "k": 32})),
            422,
            "invalid_params",
        ),
        case(
            "a request that uploads one image twice, with on_duplicate=reject",
            app.client.post(app.url("/gallery?on_duplicate=reject")).multipart(
                Form::new()
                    .part("image", Part::bytes(unseeded.clone()).file_name("a.png"))
                    .part("image", Part::bytes(unseeded.clone()).file_name("b.png")),
            ),
            409,
            "duplicate",
        ),
    ];
    for case in cases {
        let response = case.request.send().await.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or_else(|e| panic!("{}: no JSON body: {e}", case.name));
        assert_eq!((status, body["error"]["code"].as_str()), (case.status, Some(case.code)), "{}: {body}", case.name);
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}: {body}", case.name);
    }

    // A GIF of thousands of frames is not refused, but only its first frame is decoded.
    let gif = animated_gif(3000);
    let response = raw(app, "/search?k=1", Some("image/gif"), gif).send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    assert_still_healthy(app).await;
    let ready = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(gallery_listing(app).await, before, "the bad requests changed the gallery");
}

/// Every item of the gallery as listed (ids, hashes, labels).
async fn gallery_listing(app: &TestApp) -> Value {
    let page: Value = app.client.get(app.url("/gallery?limit=200")).send().await.unwrap().json().await.unwrap();
    page["items"].clone()
}

fn reencode(png: &[u8], format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image::load_from_memory(png).unwrap().to_rgb8().write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// A real PNG of `side` x `side` black pixels: a few hundred kB that would
/// decode to `side`² bytes.
fn decompression_bomb(side: u32) -> Vec<u8> {
    let mut zipped = ZlibEncoder::new(Vec::new(), Compression::best());
    let row = vec![0u8; side as usize + 1]; // filter byte + pixels
    for _ in 0..side {
        zipped.write_all(&row).unwrap();
    }
    png_with(side, side, &zipped.finish().unwrap())
}

/// A GIF of `frames` 16 x 16 frames.
fn animated_gif(frames: usize) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        for n in 0..frames {
            let pixels = image::RgbaImage::from_pixel(16, 16, image::Rgba([(n % 256) as u8, 0, 0, 255]));
            encoder.encode_frame(Frame::new(pixels)).unwrap();
        }
    }
    out
}

#[tokio::test]
async fn every_answer_has_a_request_id_and_the_contract_is_served() {
    let app = spawn_app().await;
    let ok = app.health().await;
    let not_found = app.client.get(app.url("/nope")).send().await.unwrap();
    let (a, b) = (&ok.headers()["x-request-id"], &not_found.headers()["x-request-id"]);
    assert!(a != b && uuid::Uuid::parse_str(a.to_str().unwrap()).is_ok(), "{a:?} {b:?}");
    let own = app.client.get(app.url("/health")).header("x-request-id", "client-7").send().await.unwrap();
    assert_eq!(own.headers()["x-request-id"], "client-7", "a client's own id is kept");
    let spec = app.client.get(app.url("/openapi.yaml")).send().await.unwrap();
    assert_eq!(spec.status().as_u16(), 200);
    let spec = spec.text().await.unwrap();
    assert!(spec.starts_with("openapi: 3.1") && spec.contains("/search:"), "{spec}");
    assert_still_healthy(&app).await;
}

/// A PNG of a few dozen bytes whose header claims `width` x `height` pixels.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    png_with(width, height, &[])
}

/// An 8-bit greyscale PNG with the given compressed pixel data.
fn png_with(width: u32, height: u32, idat: &[u8]) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit greyscale
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(&b"IHDR"[..], &ihdr[..]), (b"IDAT", idat), (b"IEND", &[])] {
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
