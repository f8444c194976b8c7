//! Crash safety of the real binary: uploads stream in, the process is killed
//! with SIGKILL at a different point each round, and after a restart every
//! acknowledged item is present, searchable and serves its own bytes, and no
//! half-written item is visible.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use reqwest::Client;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{eventually_every, fixtures, Server};

/// A distinct image for upload `n`: a fixture with a stripe drawn from `n`.
pub(crate) fn unique_image(base: &[u8], n: usize) -> Vec<u8> {
    let mut img = image::load_from_memory(base).unwrap().to_luma8();
    let row = (n % 20) as u32 + 4;
    for x in 0..img.width() {
        img.put_pixel(x, row, image::Luma([((n * 37 + x as usize * 11) % 256) as u8]));
    }
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Default, Clone)]
pub(crate) struct Ledger {
    /// id → bytes, for every upload answered 201.
    pub(crate) acked: HashMap<i64, Vec<u8>>,
    /// Hashes of everything ever sent, acknowledged or not.
    pub(crate) sent: HashSet<String>,
}

/// Two clients upload 1-3 images per request until the server dies.
pub(crate) async fn stream_uploads(url: String, ledger: Arc<Mutex<Ledger>>, first: usize) {
    let bases: Vec<Vec<u8>> = fixtures().into_iter().map(|(_, png)| png).collect();
    let clients = (0..2).map(|c| {
        let (url, ledger, bases) = (url.clone(), ledger.clone(), bases.clone());
        tokio::spawn(async move {
            let client = Client::new();
            for round in 0.. {
                let n = first + round * 2 + c;
                let images: Vec<Vec<u8>> =
                    (0..1 + n % 3).map(|j| unique_image(&bases[(n + j) % bases.len()], n * 4 + j)).collect();
                ledger.lock().unwrap().sent.extend(images.iter().map(|i| sha256(i)));
                let mut form = Form::new().text("label", format!("upload-{n}"));
                for image in &images {
                    form = form.part("image", Part::bytes(image.clone()).file_name("x.png"));
                }
                let Ok(response) = client.post(format!("{url}/gallery")).multipart(form).send().await else { break };
                if response.status() != 201 {
                    break;
                }
                let Ok(body) = response.json::<Value>().await else { break };
                let mut ledger = ledger.lock().unwrap();
                for (item, image) in body["items"].as_array().unwrap().iter().zip(images) {
                    ledger.acked.insert(item["id"].as_i64().unwrap(), image);
                }
            }
        })
    });
    futures::future::join_all(clients).await;
}

pub(crate) async fn verify(url: &str, ledger: &Ledger) {
    let client = Client::new();
    for (id, bytes) in &ledger.acked {
        let image = client.get(format!("{url}/gallery/{id}/image")).send().await.unwrap();
        assert_eq!(image.status(), 200, "acknowledged item {id} is missing after the crash");
        assert_eq!(image.bytes().await.unwrap().as_ref(), bytes.as_slice(), "item {id} serves other bytes");
        let search = client
            .post(format!("{url}/search?k=20"))
            .header("content-type", "image/png")
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        let body: Value = search.json().await.unwrap();
        let found =
            body["results"].as_array().unwrap().iter().any(|r| r["id"] == *id && r["score"].as_f64().unwrap() > 0.999);
        assert!(found, "acknowledged item {id} is not found by its own image: {body}");
    }
    // Whatever is listed is whole: bytes we sent, an image that is served, and indexed.
    let mut listed = 0;
    let mut cursor = 0;
    loop {
        let page: Value =
            client.get(format!("{url}/gallery?limit=200&cursor={cursor}")).send().await.unwrap().json().await.unwrap();
        for item in page["items"].as_array().unwrap() {
            listed += 1;
            let hash = item["content_hash"].as_str().unwrap();
            assert!(ledger.sent.contains(hash), "item {} holds bytes nobody sent", item["id"]);
            let id = item["id"].as_i64().unwrap();
            let image = client.get(format!("{url}/gallery/{id}/image")).send().await.unwrap();
            assert_eq!(sha256(&image.bytes().await.unwrap()), hash, "item {id} is half-written");
        }
        match page["next_cursor"].as_i64() {
            Some(next) => cursor = next,
            None => break,
        }
    }
    let health: Value = client.get(format!("{url}/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["indexed_items"], listed, "every stored item is indexed, and only those: {health}");
    assert!(listed >= ledger.acked.len());
}

#[tokio::test]
async fn acknowledged_uploads_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut server = Server::start(dir.path(), "round-0.log").await;
    // Kill points: acknowledged items so far, and time since the (re)start:
    // before any dump, after a periodic dump, after several.
    for (round, (kill_after, min_ms)) in [(4, 0), (25, 1600), (60, 3300)].into_iter().enumerate() {
        let started = Instant::now();
        let uploads = tokio::spawn(stream_uploads(server.url.clone(), ledger.clone(), round * 10_000));
        // Looking at different rates, so the kills land at different points.
        let every = Duration::from_millis(if round == 1 { 3 } else { 17 });
        let what = format!("{kill_after} acknowledged uploads and {min_ms} ms");
        eventually_every(every, Duration::from_secs(120), &what, || async {
            let acked = ledger.lock().unwrap().acked.len();
            let done = acked >= kill_after && started.elapsed() >= Duration::from_millis(min_ms);
            if done {
                Ok(())
            } else {
                Err(format!("{acked} acknowledged"))
            }
        })
        .await;
        server.kill();
        uploads.await.unwrap();
        server = Server::start(dir.path(), &format!("round-{}.log", round + 1)).await;
        let log = std::fs::read_to_string(dir.path().join(format!("round-{}.log", round + 1))).unwrap();
        eprintln!("round {round}: {}", log.lines().find(|l| l.contains("index ready")).unwrap_or(&log));
        let snapshot = ledger.lock().unwrap().clone();
        verify(&server.url, &snapshot).await;
    }
    server.kill();
}
