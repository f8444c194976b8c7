//! Adding images and finding them again, on the real encoder.

use std::io::Cursor;

use image::{imageops::FilterType, ImageFormat};
use serde_json::Value;

use crate::support::{config, fixtures, spawn_app, spawn_with, TestApp};

/// Uploads every fixture with its class as label; returns `(id, class, bytes)`.
pub async fn add_fixtures(app: &TestApp) -> Vec<(i64, String, Vec<u8>)> {
    let mut added = Vec::new();
    for (class, bytes) in fixtures() {
        let response =
            app.add_images(std::slice::from_ref(&bytes), Some(&class), Some(r#"{"source":"fixture"}"#)).await;
        assert_eq!(response.status().as_u16(), 201);
        let body: Value = response.json().await.unwrap();
        let id = body["items"][0]["id"].as_i64().expect("an id");
        assert_eq!(body["items"][0]["label"], class.as_str());
        added.push((id, class, bytes));
    }
    added
}

async fn top_hit(response: reqwest::Response) -> (i64, f64, Value) {
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    let first = &body["results"][0];
    (first["id"].as_i64().expect("a result"), first["score"].as_f64().unwrap(), body)
}

/// Upscaled 2x and re-encoded as JPEG: a different file of the same picture.
fn altered_copy(png: &[u8]) -> Vec<u8> {
    let img = image::load_from_memory(png).unwrap();
    let bigger = img.resize_exact(img.width() * 2, img.height() * 2, FilterType::Lanczos3).to_rgb8();
    let mut out = Vec::new();
    bigger.write_to(&mut Cursor::new(&mut out), ImageFormat::Jpeg).unwrap();
    out
}

#[tokio::test]
async fn every_image_finds_itself_first() {
    let app = spawn_app().await;
    let added = add_fixtures(&app).await;
    for (id, class, bytes) in &added {
        let (hit, score, body) = top_hit(app.search_raw(bytes, "5", "image/png").await).await;
        assert_eq!(hit, *id, "{class}: {body}");
        assert!(score > 0.999, "self-similarity {score}");
        assert_eq!(body["results"][0]["label"], class.as_str());
        assert_eq!(body["results"][0]["metadata"]["source"], "fixture");
        assert_eq!(body["results"].as_array().unwrap().len(), 5);
        assert!(body["timing"]["total_ms"].as_f64().unwrap() > 0.0);
    }
}

#[tokio::test]
async fn an_altered_copy_still_finds_its_original() {
    let app = spawn_app().await;
    let added = add_fixtures(&app).await;
    for (id, class, bytes) in &added {
        let (hit, score, body) = top_hit(app.search_form(&altered_copy(bytes), 3).await).await;
        assert_eq!(hit, *id, "{class}: {body}");
        assert!(score > 0.9, "{class}: similarity of the altered copy {score}");
    }
}

#[tokio::test]
async fn a_multi_image_upload_is_one_request_and_flags_exact_duplicates() {
    let app = spawn_app().await;
    let images: Vec<Vec<u8>> = fixtures().into_iter().take(3).map(|(_, b)| b).collect();
    let first: Value = app.add_images(&images, Some("batch"), None).await.json().await.unwrap();
    let items = first["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| i["duplicate_of"].is_null()));

    let again: Value = app.add_images(&images[..1], None, None).await.json().await.unwrap();
    assert_eq!(again["items"][0]["duplicate_of"], items[0]["id"]);
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["indexed_items"], 4);
}

#[tokio::test]
async fn the_gallery_survives_a_restart() {
    let app = spawn_app().await;
    let added = add_fixtures(&app).await;
    let data_dir = app.data_dir.clone();
    let guard = app.stop().await;

    let dumps = std::fs::read_dir(data_dir.join("index")).unwrap().flatten().map(|e| e.path().join("CURRENT"));
    assert_eq!(dumps.filter(|current| current.exists()).count(), 1, "a graceful stop dumps the index");

    let app = spawn_with(config(&data_dir)).await;
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["indexed_items"], added.len());
    assert_eq!(health["index_source"], "reloaded", "the dump is reloaded, not rebuilt: {health}");
    let (id, _, bytes) = &added[4];
    let (hit, _, _) = top_hit(app.search_raw(bytes, "1", "image/png").await).await;
    assert_eq!(hit, *id);
    drop(guard);
}

#[tokio::test]
async fn a_new_image_of_a_trained_class_finds_its_class() {
    // Gallery: one image per seen class. Queries: the other images of those
    // classes. Needs a trained encoder: random weights fail this.
    let app = spawn_app().await;
    let fixtures: Vec<(String, Vec<u8>)> =
        fixtures().into_iter().filter(|(class, _)| ["tshirt", "trouser", "sandal"].contains(&class.as_str())).collect();
    let mut seen_classes = std::collections::HashSet::new();
    let mut queries = Vec::new();
    for (class, bytes) in fixtures {
        if seen_classes.insert(class.clone()) {
            assert_eq!(app.add_images(&[bytes], Some(&class), None).await.status().as_u16(), 201);
        } else {
            queries.push((class, bytes));
        }
    }
    assert_eq!(queries.len(), 6);
    for (class, bytes) in &queries {
        let (_, score, body) = top_hit(app.search_raw(bytes, "3", "image/png").await).await;
        assert_eq!(body["results"][0]["label"], class.as_str(), "{body}");
        let runner_up = body["results"][1]["score"].as_f64().unwrap();
        assert!(score - runner_up > 0.2, "{class}: the right class should win clearly: {body}");
    }
}
