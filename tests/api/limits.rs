//! Request-wide limits with slow clients on raw sockets: a request that takes
//! too long is answered 408, requests past the concurrency limit get 503
//! while probes still answer, and both leave the service serving.

use std::time::Duration;

use serde_json::Value;

use crate::support::{eventually, fixtures, spawn_app_with, SlowRequest};

#[tokio::test]
async fn a_request_slower_than_the_timeout_gets_408() {
    let app = spawn_app_with(|c| c.request_timeout_secs = 1).await;
    let image = fixtures().remove(0).1;
    // Half a body, then nothing: the client stalls.
    let stalled = SlowRequest::start(app.direct, "/search?k=1", "image/png", &image, image.len() / 2).await;
    let (status, body) = stalled.answer().await;
    assert_eq!((status, body["error"]["code"].as_str()), (408, Some("request_timeout")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("1s"), "{body}");
    // A normal request is served.
    assert_eq!(app.search_raw(&image, "1", "image/png").await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn requests_past_the_concurrency_limit_get_503_and_probes_still_answer() {
    let app = spawn_app_with(|c| c.max_concurrent_requests = 1).await;
    let image = fixtures().remove(0).1;
    // The one slot, held by a client still sending its body.
    let holder = SlowRequest::start(app.direct, "/search?k=1", "image/png", &image, 10).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let refused = app.search_raw(&image, "1", "image/png").await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests", "{body}");
    for probe in ["/health", "/ready", "/metrics"] {
        assert_eq!(app.client.get(app.url(probe)).send().await.unwrap().status(), 200, "{probe}");
    }

    let (status, body) = holder.finish().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.search_raw(&image, "1", "image/png").await.status(), 200, "the slot is free again");
    app.stop().await;
}

#[tokio::test]
async fn bodies_past_the_memory_budget_get_503_and_small_requests_still_pass() {
    const MIB: usize = 1024 * 1024;
    let app = spawn_app_with(|c| c.max_buffered_body_bytes = 5 * MIB).await;
    let image = fixtures().remove(0).1;
    let mut large = image.clone();
    large.resize(3 * MIB, 0); // a PNG with trailing padding: 3 MiB
                              // 3 MiB of the 5 MiB budget, sent and held by a client that has not finished.
    let holder = SlowRequest::start(app.direct, "/search?k=1", "image/png", &large, large.len() - 10).await;
    // Another 3 MiB body does not fit beside it: 503 once the holder's bytes are read.
    let refused = eventually(Duration::from_secs(5), "a body past the budget to be refused", || async {
        let response = app.search_raw(&large, "1", "image/png").await;
        if response.status() == 503 {
            Ok(response)
        } else {
            Err(response.status().to_string())
        }
    })
    .await;
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests", "{body}");
    // A small body fits beside the holder.
    assert_eq!(app.search_raw(&image, "1", "image/png").await.status(), 200);

    let (status, body) = holder.finish().await;
    assert_ne!(status, 503, "{body}");
    assert_ne!(app.search_raw(&large, "1", "image/png").await.status(), 503, "the budget is free again");
    app.stop().await;
}

/// Sockets that declare the largest body and send a byte a second: they hold
/// only what they sent, so other requests go on, and they are cut off with
/// 408 once they fall behind `--min-body-rate`.
#[tokio::test]
async fn clients_sending_a_byte_a_second_neither_starve_the_budget_nor_stay() {
    const MIB: usize = 1024 * 1024;
    // 16 declared bodies of 4 MiB (the tests' --max-body-bytes) are twice this budget.
    let app = spawn_app_with(|c| (c.max_buffered_body_bytes, c.min_body_rate) = (32 * MIB, 1024)).await;
    let image = fixtures().remove(0).1;
    let declared = vec![0u8; 4 * MIB];
    let mut trickles = Vec::new();
    for _ in 0..16 {
        let request = SlowRequest::start(app.direct, "/search?k=1", "image/png", &declared, 1).await;
        trickles.push(tokio::spawn(request.trickle(Duration::from_secs(1))));
    }
    let search = app.search_raw(&image, "1", "image/png").await;
    assert_eq!(search.status(), 200, "{}", search.text().await.unwrap());
    let upload = app.add_images(std::slice::from_ref(&image), None, None).await;
    assert_eq!(upload.status(), 201, "{}", upload.text().await.unwrap());
    for trickle in trickles {
        let (status, body) = trickle.await.unwrap();
        assert_eq!((status, body["error"]["code"].as_str()), (408, Some("body_too_slow")), "{body}");
    }
    app.stop().await;
}
