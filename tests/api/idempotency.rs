//! Retries never store twice: an upload under an `Idempotency-Key` stores its
//! items once, and a retry (same key, same request) gets the first answer,
//! in embedded mode and across cluster replicas, also when the retries race.

use reqwest::multipart::{Form, Part};
use reqwest::{Client, RequestBuilder};
use serde_json::Value;

use crate::support::{fixtures, spawn_app, spawn_app_with, PgServer, TestApp};

fn upload(client: &Client, base: &str, png: &[u8], key: &str) -> RequestBuilder {
    let form = Form::new().part("image", Part::bytes(png.to_vec()).file_name("x.png")).text("label", "shirt");
    client.post(format!("{base}/gallery")).header("idempotency-key", key).multipart(form)
}

/// `(status, replayed, body)`.
async fn send(request: RequestBuilder) -> (u16, bool, Value) {
    let response = request.send().await.unwrap();
    let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    (response.status().as_u16(), replayed, response.json().await.unwrap())
}

async fn count(app: &TestApp) -> usize {
    let page: Value = app.client.get(app.url("/gallery?limit=500")).send().await.unwrap().json().await.unwrap();
    page["items"].as_array().unwrap().len()
}

async fn a_retry_gets_the_first_answer(app: &TestApp, other: &str) {
    let images = fixtures();
    let (png, another) = (&images[0].1, &images[1].1);
    let (status, replayed, first) = send(upload(&app.client, &app.address, png, "upload-1")).await;
    assert_eq!((status, replayed), (201, false), "{first}");
    // The retry: on the same replica, then on another one.
    for base in [app.address.as_str(), other] {
        let (status, replayed, again) = send(upload(&app.client, base, png, "upload-1")).await;
        assert_eq!((status, replayed, &again), (201, true, &first), "a retry through {base}");
    }
    assert_eq!(count(app).await, 1, "stored once");
    // The same key with another request is refused; the same image under another key is stored.
    let (status, _, reused) = send(upload(&app.client, &app.address, another, "upload-1")).await;
    assert_eq!((status, reused["error"]["code"].as_str()), (422, Some("idempotency_key_reused")), "{reused}");
    let (status, replayed, _) = send(upload(&app.client, &app.address, png, "upload-2")).await;
    assert_eq!((status, replayed), (201, false));
    // Retries that race: one stores, every one gets the same answer.
    let racing = (0..6).map(|_| send(upload(&app.client, &app.address, another, "upload-3")));
    let answers = futures::future::join_all(racing).await;
    assert!(answers.iter().all(|(status, _, body)| *status == 201 && *body == answers[0].2), "{answers:?}");
    assert_eq!(answers.iter().filter(|(_, replayed, _)| !replayed).count(), 1, "{answers:?}");
    assert_eq!(count(app).await, 3);
    // Once what a key stored is deleted, its retry says so instead of naming a gone item.
    let id = first["items"][0]["id"].as_i64().unwrap();
    assert_eq!(app.client.delete(app.url(&format!("/gallery/{id}"))).send().await.unwrap().status(), 204);
    let (status, _, stale) = send(upload(&app.client, &app.address, png, "upload-1")).await;
    assert_eq!((status, stale["error"]["code"].as_str()), (409, Some("idempotency_key_stale")), "{stale}");
    // Also when the first answer named an item it found stored (a skipped duplicate).
    let skip = |key: &str| {
        let form = Form::new().part("image", Part::bytes(another.to_vec()).file_name("x.png")).text("label", "shirt");
        app.client
            .post(format!("{}/gallery?on_duplicate=skip", app.address))
            .header("idempotency-key", key.to_string())
            .multipart(form)
    };
    let (status, _, skipped) = send(skip("upload-4")).await;
    assert_eq!((status, skipped["items"][0]["status"].as_str()), (200, Some("skipped")), "{skipped}");
    let existing = skipped["items"][0]["id"].as_i64().unwrap();
    assert_eq!(app.client.delete(app.url(&format!("/gallery/{existing}"))).send().await.unwrap().status(), 204);
    let (status, _, stale) = send(skip("upload-4")).await;
    assert_eq!((status, stale["error"]["code"].as_str()), (409, Some("idempotency_key_stale")), "{stale}");
    // A key that is not one.
    let (status, _, bad) = send(upload(&app.client, &app.address, png, "")).await;
    assert_eq!((status, bad["error"]["code"].as_str()), (422, Some("invalid_idempotency_key")), "{bad}");
}

#[tokio::test]
async fn a_retried_upload_is_stored_once() {
    let app = spawn_app().await;
    let address = app.address.clone();
    a_retry_gets_the_first_answer(&app, &address).await;
    app.stop().await;
}

#[tokio::test]
async fn a_retried_upload_is_stored_once_across_replicas() {
    let pg = PgServer::start();
    let url = pg.url();
    let first = spawn_app_with(|c| c.database_url = Some(url.clone())).await;
    let second = spawn_app_with(|c| c.database_url = Some(url)).await;
    a_retry_gets_the_first_answer(&first, &second.address).await;
    second.stop().await;
    first.stop().await;
}
