//! The embedding engine seen through HTTP: concurrent searches share forward
//! passes, a full queue answers 503 at once, and `/metrics` reports it all.

use futures::future::join_all;

use crate::support::{assert_error, config, fixtures, spawn_with, TestApp};

async fn app_with(tune: impl FnOnce(&mut lookalike::config::ServeConfig)) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    tune(&mut config);
    (spawn_with(config).await, dir)
}

async fn metrics(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    response.text().await.unwrap()
}

#[tokio::test]
async fn concurrent_searches_share_forward_passes() {
    // A generous deadline so the requests below, sent together, meet in the queue.
    let (app, _dir) = app_with(|c| {
        c.max_batch = 8;
        c.max_delay_ms = 50.0;
    })
    .await;
    let images: Vec<Vec<u8>> = fixtures().into_iter().map(|(_, png)| png).collect();
    assert_eq!(app.add_images(&images, None, None).await.status(), 201);

    let searches = (0..16).map(|i| app.search_raw(&images[i % images.len()], "3", "image/png"));
    let mut batch_sizes = Vec::new();
    for response in join_all(searches).await {
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["results"].as_array().unwrap().len(), 3);
        batch_sizes.push(body["timing"]["batch_size"].as_u64().unwrap());
    }
    assert!(batch_sizes.iter().all(|&n| (1..=8).contains(&n)), "batch sizes {batch_sizes:?}");
    assert!(batch_sizes.iter().any(|&n| n > 1), "16 concurrent searches never shared a batch: {batch_sizes:?}");

    let text = metrics(&app).await;
    for line in [
        "lookalike_http_requests_total{method=\"POST\",route=\"/search\",status=\"200\"}",
        "lookalike_http_request_duration_seconds_bucket{method=\"POST\",route=\"/search\",status=\"200\",le=\"0.5\"}",
        "lookalike_embed_batch_size_bucket{le=\"8\"}",
        "lookalike_embed_batch_seconds_count{device=\"cpu\"}",
        "lookalike_embed_queue_wait_seconds_count{priority=\"interactive\"}",
        "lookalike_embed_queue_depth{priority=\"interactive\"}",
        "lookalike_preprocess_seconds_count",
        "lookalike_model_info{model=\"shufflenet-v1-g3-w0.5@1\"",
        "lookalike_index_items",
    ] {
        assert!(text.contains(line), "/metrics lacks `{line}`:\n{text}");
    }
}

#[tokio::test]
async fn a_full_queue_answers_503_at_once_and_the_service_recovers() {
    let (app, _dir) = app_with(|c| {
        c.max_batch = 1;
        c.max_delay_ms = 0.0;
        c.queue_capacity = 1;
    })
    .await;
    let image = fixtures().remove(0).1;
    let searches = (0..48).map(|_| app.search_raw(&image, "1", "image/png"));
    let responses = join_all(searches).await;
    let mut refused = 0;
    for response in responses {
        match response.status().as_u16() {
            200 => {}
            503 => {
                let retry = response.headers().get("retry-after").expect("503 carries Retry-After");
                assert!(retry.to_str().unwrap().parse::<u64>().unwrap() >= 1);
                assert_error(response, 503, "overloaded").await;
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused > 0, "48 concurrent searches into a queue of one were all admitted");
    assert!(metrics(&app).await.contains("lookalike_embed_rejected_total"));
    // Back-pressure is not a failure: the next search is served.
    assert_eq!(app.search_raw(&image, "1", "image/png").await.status(), 200);
    assert_eq!(app.health().await.status(), 200);
}
