//! Editing what is stored: `PATCH /gallery/{id}` with `ETag`/`If-Match`, and
//! `POST /gallery/labels`; filtered search, the k-NN vote and a restart follow.

use reqwest::Response;
use serde_json::{json, Value};

use crate::search::add_fixtures;
use crate::support::{assert_error, config, spawn_app, spawn_with, TestApp};

const MERGE: &str = "application/merge-patch+json";

async fn patch(app: &TestApp, id: i64, content_type: &str, body: &Value, if_match: Option<&str>) -> Response {
    let mut request = app.client.patch(app.url(&format!("/gallery/{id}"))).header("content-type", content_type);
    if let Some(tag) = if_match {
        request = request.header("if-match", tag);
    }
    request.body(body.to_string()).send().await.unwrap()
}

/// The item and its ETag, from an answer that must be 200.
async fn item_and_tag(response: Response) -> (Value, String) {
    assert_eq!(response.status(), 200);
    let tag = response.headers()["etag"].to_str().unwrap().to_string();
    (response.json().await.unwrap(), tag)
}

async fn get_item(app: &TestApp, id: i64) -> (Value, String) {
    item_and_tag(app.client.get(app.url(&format!("/gallery/{id}"))).send().await.unwrap()).await
}

async fn relabel(app: &TestApp, body: Value) -> Response {
    app.client.post(app.url("/gallery/labels")).json(&body).send().await.unwrap()
}

/// Ids a search of `image` finds under `query`, and the voted label.
async fn search(app: &TestApp, image: &[u8], query: &str) -> (Vec<i64>, String) {
    let response = app.search_raw(image, query.trim_start_matches("k="), "image/png").await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{query}: {body}");
    let ids = body["results"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
    (ids, body["prediction"]["label"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn an_edit_changes_label_and_metadata_and_searches_votes_and_a_restart_follow() {
    let app = spawn_app().await;
    let added = add_fixtures(&app).await;
    let bags: Vec<(i64, Vec<u8>)> =
        added.iter().filter(|(_, class, _)| class == "bag").map(|(id, _, bytes)| (*id, bytes.clone())).collect();
    assert_eq!(bags.len(), 3);
    let (id, bytes) = bags[0].clone();

    // A merge patch: the label changes, `null` removes a key, a new key is added.
    let (_, first_tag) = get_item(&app, id).await;
    let edit = json!({"label": "handbag", "metadata": {"source": null, "sku": "B-7"}});
    let (edited, tag) = item_and_tag(patch(&app, id, MERGE, &edit, Some(&first_tag)).await).await;
    assert_eq!(edited["label"], "handbag");
    assert_eq!(edited["metadata"], json!({"sku": "B-7"}));
    assert_ne!(tag, first_tag);
    assert_eq!(get_item(&app, id).await, (edited.clone(), tag.clone()), "GET reads the edit and its tag");

    // Filtered search follows at once: the item under its new label only.
    assert_eq!(search(&app, &bytes, "k=10&label=handbag").await.0, vec![id]);
    let still_bags = search(&app, &bytes, "k=10&label=bag").await.0;
    assert_eq!(still_bags.len(), 2);
    assert!(!still_bags.contains(&id));

    // An editor holding the old tag is refused, and nothing changes.
    let late = patch(&app, id, MERGE, &json!({"label": "purse"}), Some(&first_tag)).await;
    assert_eq!(late.headers()["etag"], tag.as_str(), "a refusal carries the current tag");
    assert_error(late, 412, "precondition_failed").await;
    assert_eq!(get_item(&app, id).await.0["label"], "handbag");

    // Plain JSON replaces the metadata and leaves the label; a null label clears it.
    let (replaced, _) =
        item_and_tag(patch(&app, id, "application/json", &json!({"metadata": {"c": 1}}), None).await).await;
    assert_eq!((replaced["label"].clone(), replaced["metadata"].clone()), (json!("handbag"), json!({"c": 1})));
    let (cleared, _) = item_and_tag(patch(&app, id, MERGE, &json!({"label": null}), Some("*")).await).await;
    assert!(cleared["label"].is_null());
    assert!(search(&app, &bytes, "k=10&label=handbag").await.0.is_empty());

    // Many at once, all or none: one missing id and nothing changes.
    let ids: Vec<i64> = bags.iter().map(|(id, _)| *id).collect();
    let missing = relabel(&app, json!({"ids": [ids[0], ids[1], 999_999], "label": "sack"})).await;
    assert_error(missing, 404, "not_found").await;
    assert!(get_item(&app, ids[0]).await.0["label"].is_null());
    assert_eq!(get_item(&app, ids[1]).await.0["label"], "bag");
    let done = relabel(&app, json!({"ids": [ids[0], ids[1], ids[2], ids[2]], "label": "sack"})).await;
    assert_eq!(done.status(), 200);
    assert_eq!(done.json::<Value>().await.unwrap(), json!({"updated": 3, "label": "sack"}));

    // The k-NN vote reads the new labels: a bag now votes `sack`.
    let (found, voted) = search(&app, &bags[1].1, "k=3&label=sack").await;
    assert_eq!(found.len(), 3);
    assert_eq!(voted, "sack");
    assert_eq!(search(&app, &bags[1].1, "k=5").await.1, "sack");

    // What was edited is what a restart serves.
    let data_dir = app.data_dir.clone();
    let guard = app.stop().await;
    let app = spawn_with(config(&data_dir)).await;
    let mut after: Vec<i64> = search(&app, &bytes, "k=10&label=sack").await.0;
    after.sort_unstable();
    assert_eq!(after, ids);
    assert!(search(&app, &bytes, "k=10&label=bag").await.0.is_empty());
    app.stop().await;
    drop(guard);
}

#[tokio::test]
async fn of_editors_holding_the_same_tag_exactly_one_wins() {
    let app = spawn_app().await;
    let (id, _, _) = add_fixtures(&app).await[0].clone();
    let (_, tag) = get_item(&app, id).await;
    let bodies: Vec<Value> = (0..8).map(|i| json!({"label": format!("editor-{i}")})).collect();
    let edits = bodies.iter().map(|body| patch(&app, id, MERGE, body, Some(&tag)));
    let statuses: Vec<u16> = futures::future::join_all(edits).await.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 412).count(), 7, "{statuses:?}");
    app.stop().await;
}

#[tokio::test]
async fn malformed_edits_get_clear_errors_and_change_nothing() {
    let app = spawn_app().await;
    let (id, class, _) = add_fixtures(&app).await[0].clone();
    let text = app.client.patch(app.url(&format!("/gallery/{id}"))).body("{}").send().await.unwrap();
    assert_error(text, 415, "unsupported_media_type").await;
    let broken = app.client.patch(app.url(&format!("/gallery/{id}"))).header("content-type", MERGE).body("{");
    assert_error(broken.send().await.unwrap(), 400, "invalid_json").await;
    assert_error(patch(&app, id, MERGE, &json!([1]), None).await, 400, "invalid_body").await;
    assert_error(patch(&app, id, MERGE, &json!({"id": 5}), None).await, 400, "unknown_field").await;
    assert_error(patch(&app, id, MERGE, &json!({"label": ""}), None).await, 422, "invalid_label").await;
    assert_error(patch(&app, id, MERGE, &json!({"label": 7}), None).await, 422, "invalid_label").await;
    assert_error(patch(&app, id, MERGE, &json!({"metadata": [1]}), None).await, 422, "invalid_metadata").await;
    assert_error(patch(&app, id, MERGE, &json!({"metadata": {"a": "\u{0}"}}), None).await, 422, "invalid_metadata")
        .await;
    assert_error(patch(&app, 999_999, MERGE, &json!({"label": "x"}), None).await, 404, "not_found").await;
    // Metadata is held to what an upload's metadata part may take (4096 bytes in the tests).
    let big = json!({"metadata": {"notes": "x".repeat(5000)}});
    assert_error(patch(&app, id, MERGE, &big, None).await, 413, "metadata_too_large").await;
    assert_error(relabel(&app, json!({"ids": [], "label": "x"})).await, 422, "invalid_ids").await;
    assert_error(relabel(&app, json!({"ids": ["a"], "label": "x"})).await, 422, "invalid_ids").await;
    assert_error(relabel(&app, json!({"ids": [id]})).await, 422, "invalid_label").await;
    assert_error(relabel(&app, json!({"ids": [id], "label": "x", "more": 1})).await, 400, "unknown_field").await;
    let (item, _) = get_item(&app, id).await;
    assert_eq!(
        (item["label"].as_str(), item["metadata"].clone()),
        (Some(class.as_str()), json!({"source": "fixture"}))
    );
    app.stop().await;
}
