//! What a Siamese encoder offers beyond ranking: pair verification, labels
//! voted by labelled neighbours (or `unknown`), search by a stored item; and
//! CORS for frontends on other origins.

use reqwest::multipart::{Form, Part};
use serde_json::Value;

use crate::support::{assert_error, fixtures, spawn_app, spawn_app_with, TestApp};

fn image(name: &str) -> Vec<u8> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fmnist").join(format!("{name}.png"));
    std::fs::read(path).expect("fixture")
}

async fn verify(app: &TestApp, a: &str, b: &str) -> Value {
    let form = Form::new()
        .part("a", Part::bytes(image(a)).file_name("a.png"))
        .part("b", Part::bytes(image(b)).file_name("b.png"));
    let response = app.post_form("/verify", form).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn verify_compares_two_images_at_the_models_threshold() {
    let app = spawn_app().await;
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/models/fashion-mnist/manifest.json")).unwrap(),
    )
    .unwrap();
    let threshold = manifest["verification_threshold"].as_f64().unwrap();

    let same = verify(&app, "tshirt-0", "tshirt-1").await;
    assert!((same["threshold"].as_f64().unwrap() - threshold).abs() < 1e-6);
    assert_eq!(same["same"], true, "{same}");
    let different = verify(&app, "tshirt-0", "trouser-0").await;
    assert_eq!(different["same"], false, "{different}");
    assert!(different["similarity"].as_f64() < same["similarity"].as_f64());
    let itself = verify(&app, "bag-0", "bag-0").await;
    assert!(itself["similarity"].as_f64().unwrap() > 0.9999 && itself["distance"].as_f64().unwrap() < 0.01);

    let one_part = Form::new().part("a", Part::bytes(image("bag-0")).file_name("a.png"));
    assert_error(app.post_form("/verify", one_part).await, 400, "missing_image").await;
    let broken = Form::new()
        .part("a", Part::bytes(image("bag-0")).file_name("a.png"))
        .part("b", Part::bytes(image("bag-0")[..60].to_vec()).file_name("b.png"));
    let response = app.post_form("/verify", broken).await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().starts_with("part b:"), "{body}");
    let extra = Form::new().part("c", Part::bytes(image("bag-0")).file_name("c.png"));
    assert_error(app.post_form("/verify", extra).await, 400, "unknown_field").await;
    app.stop().await;
}

/// Stores two of each fixture class, labelled; returns the ids by class.
async fn labelled_gallery(app: &TestApp) -> Vec<(String, i64)> {
    let mut ids = Vec::new();
    for (class, bytes) in fixtures().into_iter().filter(|(_, b)| !b.is_empty()) {
        if ids.iter().filter(|(c, _)| *c == class).count() == 2 {
            continue;
        }
        let added: Value = app.add_images(&[bytes], Some(&class), None).await.json().await.unwrap();
        ids.push((class, added["items"][0]["id"].as_i64().unwrap()));
    }
    ids
}

#[tokio::test]
async fn searches_predict_a_label_from_labelled_neighbours_or_say_unknown() {
    let app = spawn_app().await;
    labelled_gallery(&app).await;
    // The third image of each class was not stored: its neighbours vote for its class.
    for class in ["bag", "sandal", "trouser", "tshirt"] {
        let found: Value = app.search_raw(&image(&format!("{class}-2")), "3", "image/png").await.json().await.unwrap();
        let prediction = &found["prediction"];
        assert_eq!(prediction["label"], class, "{found}");
        assert_eq!(prediction["known"], true);
        assert!(prediction["confidence"].as_f64().unwrap() > 0.5, "{prediction}");
        assert_eq!(prediction["votes"], 8, "every labelled item votes (knn_k 10 > 8 items)");
    }
    app.stop().await;

    // Only trousers are labelled: a T-shirt's nearest labelled neighbour is
    // farther than the default unknown distance (1 - the model's threshold).
    let trousers = spawn_app().await;
    let pair = [image("trouser-0"), image("trouser-1")];
    assert_eq!(trousers.add_images(&pair, Some("trouser"), None).await.status(), 201);
    let found: Value = trousers.search_raw(&image("tshirt-2"), "3", "image/png").await.json().await.unwrap();
    let prediction = &found["prediction"];
    assert_eq!(
        (prediction["label"].as_str(), prediction["known"].as_bool()),
        (Some("unknown"), Some(false)),
        "{found}"
    );
    assert!(prediction["nearest_distance"].as_f64().unwrap() > 0.185, "{found}");
    assert_eq!(prediction["confidence"], 0.0);
    let found: Value = trousers.search_raw(&image("trouser-2"), "3", "image/png").await.json().await.unwrap();
    assert_eq!(found["prediction"]["label"], "trouser", "{found}");
    trousers.stop().await;
}

#[tokio::test]
async fn similar_items_of_a_stored_item_leave_it_out() {
    let app = spawn_app().await;
    let ids = labelled_gallery(&app).await;
    // Trousers: a class the bundled model was trained on, so its items are each other's nearest.
    let (class, id) = ids.iter().find(|(c, _)| c == "trouser").unwrap();
    let response = app.client.get(app.url(&format!("/gallery/{id}/similar?k=3"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let found: Value = response.json().await.unwrap();
    let results = found["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r["id"] != *id), "the item itself is left out: {found}");
    assert_eq!(results[0]["label"], class.as_str(), "its class-mate comes first: {found}");
    assert_eq!(found["prediction"]["label"], class.as_str());
    assert_eq!(found["timing"]["batch_size"], 0, "nothing was embedded");

    let response = app.client.get(app.url("/gallery/999999/similar")).send().await.unwrap();
    assert_error(response, 404, "not_found").await;
    let response = app.client.get(app.url(&format!("/gallery/{id}/similar?k=0"))).send().await.unwrap();
    assert_error(response, 422, "invalid_k").await;
    let response = app.client.get(app.url("/gallery/abc/similar")).send().await.unwrap();
    assert_error(response, 400, "invalid_id").await;
    app.stop().await;
}

async fn preflight(app: &TestApp, origin: &str) -> reqwest::Response {
    app.client
        .request(reqwest::Method::OPTIONS, app.url("/search"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn cors_lets_configured_origins_in_and_no_one_else() {
    let app = spawn_app_with(|c| c.cors_origins = vec!["https://shop.example".into()]).await;
    let allowed = preflight(&app, "https://shop.example").await;
    assert!(allowed.status().is_success());
    assert_eq!(allowed.headers()["access-control-allow-origin"], "https://shop.example");
    let methods = allowed.headers()["access-control-allow-methods"].to_str().unwrap().to_string();
    assert!(methods.contains("POST") && methods.contains("DELETE"), "{methods}");
    let other = preflight(&app, "https://evil.example").await;
    assert!(other.headers().get("access-control-allow-origin").is_none());
    // A simple request from the allowed origin can read the request id.
    let health = app.client.get(app.url("/health")).header("origin", "https://shop.example").send().await.unwrap();
    assert_eq!(health.headers()["access-control-allow-origin"], "https://shop.example");
    assert!(health.headers()["access-control-expose-headers"].to_str().unwrap().contains("x-request-id"));
    app.stop().await;

    let closed = spawn_app().await;
    let response = preflight(&closed, "https://shop.example").await;
    assert!(response.headers().get("access-control-allow-origin").is_none(), "no CORS unless configured");
    closed.stop().await;
}
