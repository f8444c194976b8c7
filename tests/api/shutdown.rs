//! SIGTERM on the real binary while uploads stream in, a search is still
//! sending its body and a fine-tune job trains: the search is answered, the
//! job stops and says so, the process exits 0 with the index dumped and the
//! store closed, and after a restart every acknowledged upload is there.
//! The server logs JSON here, which this test also reads back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Client;
use serde_json::Value;

use crate::crash::{sha256, stream_uploads, verify, Ledger};
use crate::finetune::start_a_long_job;
use crate::support::{eventually, fixtures, job_status, Server, SlowRequest, TOKEN};

const ENV: [(&str, &str); 3] =
    [("LOOKALIKE_ADMIN_TOKEN", TOKEN), ("LOOKALIKE_LOG_FORMAT", "json"), ("LOOKALIKE_SHUTDOWN_DELAY_SECS", "1")];

#[tokio::test]
async fn sigterm_drains_requests_stops_the_job_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(dir.path(), "first.log", &ENV).await;
    let client = Client::new();
    let job = start_a_long_job(&client, &server.url).await;
    // A request the log should show under the id we give it.
    let traced = client.get(format!("{}/health", server.url)).header("x-request-id", "trace-me-42").send().await;
    assert_eq!(traced.unwrap().headers()["x-request-id"], "trace-me-42");

    let mut ledger = Ledger::default();
    ledger.sent.extend(fixtures().iter().map(|(_, png)| sha256(png)));
    let ledger = Arc::new(Mutex::new(ledger));
    let uploads = tokio::spawn(stream_uploads(server.url.clone(), ledger.clone(), 0));
    eventually(Duration::from_secs(120), "10 acknowledged uploads", || async {
        let acked = ledger.lock().unwrap().acked.len();
        if acked >= 10 {
            Ok(())
        } else {
            Err(format!("{acked}"))
        }
    })
    .await;
    let image = fixtures().remove(0).1;
    let in_flight = SlowRequest::start(server.address(), "/search?k=3", "image/png", &image, image.len() / 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let url = server.url.clone();
    let stopping = tokio::spawn(server.terminate(Duration::from_secs(60)));
    // During the shutdown delay: not ready, but still alive and serving.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = Client::new();
    let ready = fresh.get(format!("{url}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<Value>().await.unwrap()["error"]["code"], "not_ready");
    assert_eq!(fresh.get(format!("{url}/health")).send().await.unwrap().status(), 200);
    // After it: no new connection is served, but the request in flight is answered.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(Client::new().get(format!("{url}/health")).send().await.is_err(), "a connection after the delay");
    let (status, body) = in_flight.finish().await;
    assert_eq!(status, 200, "the request in flight at SIGTERM is answered: {body}");
    let exit = stopping.await.unwrap();
    assert!(exit.success(), "exit status {exit}");
    uploads.await.unwrap();

    let raw_log = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    assert!(!raw_log.contains(TOKEN), "the admin token is in the log");
    let log = json_log(&dir.path().join("first.log"));
    let said = |message: &str| log.iter().any(|line| line["message"] == message);
    for step in [
        "shutting down",
        "stopping the fine-tune job for shutdown",
        "no longer serving requests",
        "gallery store closed",
    ] {
        assert!(said(step), "the log lacks {step:?}");
    }
    let traced = log.iter().find(|l| l["span"]["request_id"] == "trace-me-42");
    assert!(traced.is_some(), "no log line carries the request id");

    let server = Server::start_with_env(dir.path(), "second.log", &ENV).await;
    let status = job_status(&client, &server.url, &job).await;
    assert_eq!(status["state"], "cancelled", "{status}");
    let reason = status["result"]["reason"].as_str().unwrap();
    assert!(reason.contains("stopped by a shutdown"), "{status}");
    // The dump taken at shutdown was complete: the restart reloads it and has nothing to reconcile.
    let log = json_log(&dir.path().join("second.log"));
    let ready = log.iter().find(|l| l["message"] == "index ready").expect("an `index ready` line");
    assert_eq!(
        (ready["source"].as_str(), ready["added"].as_u64(), ready["removed"].as_u64()),
        (Some("reloaded"), Some(0), Some(0)),
        "{ready}"
    );
    let snapshot = ledger.lock().unwrap().clone();
    assert!(snapshot.acked.len() >= 10);
    verify(&server.url, &snapshot).await;
    server.kill();
}

/// The server's log, one JSON object a line (any other line fails the test).
fn json_log(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}")))
        .collect()
}
