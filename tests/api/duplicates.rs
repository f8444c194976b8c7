//! Curation: `POST /gallery/duplicates` (near-copies across the whole gallery, grouped so
//! that every two items of a group are close, the largest then oldest suggested as keeper)
//! and `GET /gallery/suggestions`.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::time::Duration;

use serde_json::{json, Value};

use lookalike::manifest::BUNDLED_MODEL_DIR;

use crate::support::{assert_error, eventually, spawn_app, spawn_app_with, TestApp};

/// The clip-art fixtures (colour, with transparency), by file name.
fn clipart() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clipart");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The image scaled by `percent` and encoded again: a copy with other bytes and another size.
pub(crate) fn rescaled(png: &[u8], percent: u32) -> Vec<u8> {
    let image = image::load_from_memory(png).unwrap();
    let (w, h) = (image.width() * percent / 100, image.height() * percent / 100);
    let resized = image.resize_exact(w, h, image::imageops::FilterType::Triangle);
    let mut out = Cursor::new(Vec::new());
    resized.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn add(app: &TestApp, image: Vec<u8>) -> i64 {
    let response = app.add_images(&[image], None, None).await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["items"][0]["id"].as_i64().unwrap()
}

async fn finished_scan(app: &TestApp, query: &str) -> Value {
    let started = app.client.post(app.url(&format!("/gallery/duplicates{query}"))).send().await.unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let id = location.trim_start_matches("/gallery/duplicates/").to_string();
    eventually(Duration::from_secs(60), "the scan to finish", || async {
        let scan = scan_record(app, &id).await;
        if scan["state"] == "running" {
            Err(scan.to_string())
        } else {
            Ok(scan)
        }
    })
    .await
}

#[tokio::test]
async fn planted_copies_are_grouped_with_the_largest_suggested_as_keeper() {
    // The general default, at its calibrated distance (no --near-duplicate-distance).
    let app = spawn_app_with(|c| (c.model, c.near_duplicate_distance) = (BUNDLED_MODEL_DIR.into(), None)).await;
    let images = clipart();
    let mut added = Vec::new();
    for image in &images {
        added.push(add(&app, image.clone()).await);
    }
    // Three originals get copies: the first two two copies each, the third one.
    let mut planted: Vec<(i64, BTreeSet<i64>)> = Vec::new();
    for (n, (id, bytes)) in added.iter().zip(&images).take(3).enumerate() {
        let large = add(&app, rescaled(bytes, 150)).await;
        let mut group = BTreeSet::from([*id, large]);
        if n < 2 {
            group.insert(add(&app, rescaled(bytes, 125)).await);
        }
        planted.push((large, group));
    }

    let scan = finished_scan(&app, "").await;
    assert_eq!(scan["state"], "done", "{scan}");
    assert_eq!(scan["total"].as_u64(), Some(added.len() as u64 + 5));
    assert_eq!(scan["scanned"], scan["total"]);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(format!("{BUNDLED_MODEL_DIR}/manifest.json")).unwrap()).unwrap();
    let calibrated = manifest["evaluation"]["near_duplicate"]["distance"].as_f64().unwrap();
    assert!((scan["distance"].as_f64().unwrap() - calibrated).abs() < 1e-6, "the model's calibrated distance");
    let mut found: Vec<(i64, BTreeSet<i64>)> = scan["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let ids: BTreeSet<i64> = g["items"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
            let pairs = g["pairs"].as_array().unwrap();
            for pair in pairs {
                assert!(pair["distance"].as_f64().unwrap() <= calibrated, "{pair}");
            }
            assert_eq!(
                pairs.len(),
                ids.len() * (ids.len() - 1) / 2,
                "every two items of a group are a close pair: {g}"
            );
            (g["keeper"].as_i64().unwrap(), ids)
        })
        .collect();
    found.sort();
    planted.sort();
    assert_eq!(found, planted, "exactly the planted groups, each kept by its largest copy");
    assert_eq!(scan["duplicates"], 5);
    app.stop().await;
}

#[tokio::test]
async fn scans_answer_bad_distances_and_unknown_ids_clearly() {
    let app = spawn_app().await;
    for bad in ["?distance=0", "?distance=3", "?distance=abc"] {
        let response = app.client.post(app.url(&format!("/gallery/duplicates{bad}"))).send().await.unwrap();
        let status = response.status().as_u16();
        assert!(status == 422 || status == 400, "{bad}: {status}");
    }
    let unknown = app.client.get(app.url("/gallery/duplicates/no-such-scan")).send().await.unwrap();
    assert_error(unknown, 404, "not_found").await;
    let empty = finished_scan(&app, "?distance=0.05").await;
    assert_eq!((empty["state"].clone(), empty["groups"].clone()), (Value::from("done"), Value::Array(vec![])));
    app.stop().await;
}

/// Scan records live in the store: a restart still answers for a finished
/// scan; a record left running by the process before reads as failed and
/// does not block a new scan, while one that is still written to does.
#[tokio::test]
async fn scan_records_outlive_a_restart_and_a_stopped_processs_scan_reads_failed() {
    let app = spawn_app().await;
    let done = finished_scan(&app, "?distance=0.05").await;
    assert_eq!(done["state"], "done", "{done}");
    let data_dir = app.data_dir.clone();
    let guard = app.stop().await;

    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Written just now, as by a process that stopped mid-scan: the next start gives it up at once.
    record_running(&data_dir, ABANDONED, now, now);
    let app = crate::support::spawn_with(crate::support::config(&data_dir)).await;
    let again = scan_record(&app, done["id"].as_str().unwrap()).await;
    assert_eq!(again, done, "the finished record, as it was");
    let abandoned = scan_record(&app, ABANDONED).await;
    assert_eq!(abandoned["state"], "failed", "{abandoned}");
    assert!(abandoned["error"].as_str().unwrap().contains("stopped before it finished"), "{abandoned}");
    assert_eq!(finished_scan(&app, "?distance=0.05").await["state"], "done", "an abandoned scan blocks nothing");

    // A record still written to (as by another replica) is a running scan: a second start is refused.
    record_running(&data_dir, ELSEWHERE, now, now + 600_000);
    let refused = app.client.post(app.url("/gallery/duplicates?distance=0.05")).send().await.unwrap();
    assert_error(refused, 409, "job_running").await;
    app.stop().await;
    drop(guard);
}

async fn scan_record(app: &TestApp, id: &str) -> Value {
    let response = app.client.get(app.url(&format!("/gallery/duplicates/{id}"))).send().await.unwrap();
    response.json().await.unwrap()
}

const ABANDONED: &str = "00000000-0000-4000-8000-00000000000a";
const ELSEWHERE: &str = "00000000-0000-4000-8000-00000000000e";

/// Writes a running scan's record straight into the store, last written at `written`.
fn record_running(data_dir: &std::path::Path, id: &str, now: i64, written: i64) {
    let record = json!({"id": id, "state": "running", "model": "m@1", "distance": 0.05, "scanned": 1, "total": 9,
                        "created_at": now, "finished_at": null, "duplicates": null, "groups": null, "error": null});
    let store = rusqlite::Connection::open(data_dir.join("gallery.sqlite3")).unwrap();
    let sql =
        "INSERT INTO duplicate_scans (id, state, record, created_at, updated_at) VALUES (?1, 'running', ?2, ?3, ?4)";
    store.execute(sql, rusqlite::params![id, record.to_string(), now, written]).unwrap();
}

#[tokio::test]
async fn suggestions_are_unlabelled_items_from_different_parts_of_the_gallery() {
    let app = spawn_app().await;
    // Two bags labelled; every other fixture unlabelled.
    let mut classes = std::collections::HashMap::new();
    for (n, (class, bytes)) in crate::support::fixtures().into_iter().enumerate() {
        let label = (class == "bag" && n < 2).then_some("bag");
        let response = app.add_images(&[bytes], label, None).await;
        assert_eq!(response.status(), 201);
        classes.insert(response.json::<Value>().await.unwrap()["items"][0]["id"].as_i64().unwrap(), class);
    }
    let answer = suggest(&app, 3).await;
    assert_eq!((answer["unlabelled"].as_u64(), answer["examined"].as_u64()), (Some(10), Some(10)), "{answer}");
    let suggested = |answer: &Value| -> Vec<(i64, String)> {
        let suggestions = answer["suggestions"].as_array().unwrap();
        assert!(suggestions.iter().all(|s| s["item"]["label"].is_null()), "only unlabelled items: {answer}");
        suggestions.iter().map(|s| s["item"]["id"].as_i64().unwrap()).map(|id| (id, classes[&id].clone())).collect()
    };
    // One of each class with no labelled member: a pick reaches its class-mates.
    let picked = suggested(&answer);
    let picked_classes: BTreeSet<&str> = picked.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(picked_classes, BTreeSet::from(["sandal", "trouser", "tshirt"]), "{answer}");
    for suggestion in answer["suggestions"].as_array().unwrap() {
        assert!(suggestion["cluster_size"].as_u64().unwrap() >= 3, "{answer}");
        assert!(["unknown", "uncertain", "cluster"].contains(&suggestion["reason"].as_str().unwrap()), "{answer}");
    }

    // Label the trousers: they are suggested no more.
    let trousers: Vec<i64> = classes.iter().filter(|(_, c)| *c == "trouser").map(|(id, _)| *id).collect();
    let labelled =
        app.client.post(app.url("/gallery/labels")).json(&serde_json::json!({"ids": trousers, "label": "trouser"}));
    assert_eq!(labelled.send().await.unwrap().status(), 200);
    let again = suggest(&app, 10).await;
    assert!(suggested(&again).iter().all(|(_, class)| class != "trouser"), "{again}");
    let bad = app.client.get(app.url("/gallery/suggestions?n=0")).send().await.unwrap();
    assert_error(bad, 422, "invalid_n").await;
    app.stop().await;
}

async fn suggest(app: &TestApp, n: usize) -> Value {
    let url = app.url(&format!("/gallery/suggestions?n={n}"));
    app.client.get(url).send().await.unwrap().json().await.unwrap()
}
