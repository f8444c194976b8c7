//! Cluster mode against a real PostgreSQL with pgvector (`pg.rs`): release
//! binaries as replicas over one database, each with a data folder of its own.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response};
use serde_json::Value;
use tempfile::TempDir;

use crate::crash::{unique_image, Server};
use crate::helpers::fixtures;
use crate::pg::PgServer;

/// Replicas, each on a data folder of its own, over `pg`.
async fn replicas(pg: &PgServer, n: usize) -> (Vec<Server>, Vec<TempDir>) {
    let url = pg.url();
    let dirs: Vec<TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    // Started together: their migrations meet at the advisory lock.
    let env = [("LOOKALIKE_DATABASE_URL", url.as_str())];
    let started = dirs.iter().map(|d| Server::start_with_env(d.path(), "replica.log", &env));
    (futures::future::join_all(started).await, dirs)
}

async fn upload(client: &Client, server: &Server, image: &[u8], label: &str) -> Response {
    let form =
        Form::new().part("image", Part::bytes(image.to_vec()).file_name("x.png")).text("label", label.to_string());
    client.post(format!("{}/gallery", server.url)).multipart(form).send().await.unwrap()
}

async fn search(client: &Client, server: &Server, image: &[u8], query: &str) -> Response {
    let url = format!("{}/search?{query}", server.url);
    client.post(url).header("content-type", "image/png").body(image.to_vec()).send().await.unwrap()
}

async fn json(response: Response) -> Value {
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn replicas_over_one_database_share_the_gallery_and_filter_in_sql() {
    let pg = PgServer::start();
    let (replicas, _dirs) = replicas(&pg, 3).await;
    assert_eq!(pg.psql("SELECT version FROM lookalike_schema"), "2");
    let client = Client::new();
    let images = fixtures();

    // Each image is written on one replica and searched on the next: a 201 means every replica sees it.
    let mut ids = Vec::new();
    for (i, (class, bytes)) in images.iter().enumerate() {
        let response = upload(&client, &replicas[i % 3], bytes, class).await;
        assert_eq!(response.status(), 201);
        let added: Value = response.json().await.unwrap();
        let id = added["items"][0]["id"].as_i64().unwrap();
        ids.push(id);
        let found = json(search(&client, &replicas[(i + 1) % 3], bytes, "k=3").await).await;
        assert_eq!(found["results"][0]["id"], id, "{found}");
        assert!(found["results"][0]["score"].as_f64().unwrap() > 0.99, "{found}");
    }

    // A label filter runs in SQL: only that label, the image itself first; an unknown label finds nothing.
    let (class, bytes) = &images[0];
    let filtered = json(search(&client, &replicas[2], bytes, &format!("k=50&label={class}")).await).await;
    let results = filtered["results"].as_array().unwrap();
    let expected = images.iter().filter(|(c, _)| c == class).count();
    assert_eq!(results.len(), expected, "{filtered}");
    assert!(results.iter().all(|r| r["label"] == class.as_str()));
    assert_eq!(results[0]["id"], ids[0]);
    let unknown = json(search(&client, &replicas[1], bytes, "label=no-such-label").await).await;
    assert_eq!(unknown["results"].as_array().unwrap().len(), 0);

    // A delete on one replica leaves every replica's results at once.
    let deleted = client.delete(format!("{}/gallery/{}", replicas[1].url, ids[0])).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    for replica in &replicas {
        let found = json(search(&client, replica, bytes, "k=5").await).await;
        assert!(found["results"].as_array().unwrap().iter().all(|r| r["id"] != ids[0]), "{found}");
    }
    let listed = json(client.get(format!("{}/gallery?limit=500", replicas[0].url)).send().await.unwrap()).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), images.len() - 1);

    // The model's partial HNSW index exists and a search of the service's shape can use it.
    let index = pg.psql("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'embeddings_hnsw_%'");
    assert!(index.starts_with("embeddings_hnsw_") && !index.contains('\n'), "one index per model: {index}");
    let model = pg.psql("SELECT DISTINCT model FROM embeddings");
    let dim = pg.psql("SELECT DISTINCT vector_dims(embedding) FROM embeddings");
    let plan = pg.psql(&format!(
        "SET enable_seqscan = off; SET enable_bitmapscan = off; EXPLAIN SELECT item_id FROM embeddings WHERE model = '{model}'
         ORDER BY embedding::vector({dim}) <=> (SELECT embedding::vector({dim}) FROM embeddings LIMIT 1) LIMIT 5"
    ));
    assert!(plan.contains(&format!("Index Scan using {index}")), "{plan}");
    for replica in replicas {
        replica.terminate(Duration::from_secs(30)).await;
    }
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_build_is_refused() {
    let pg = PgServer::start();
    let (replicas, _dirs) = replicas(&pg, 1).await;
    replicas.into_iter().for_each(Server::kill);
    pg.psql("UPDATE lookalike_schema SET version = 99");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("refused.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .env("LOOKALIKE_DATABASE_URL", pg.url())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("a replica started on a database migrated by a newer build");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("schema version 99, newer than this build's 2; upgrade lookalike"), "{stderr}");
}

/// What the uploader saw: acknowledged images by id, and answers other than 201 or 503.
#[derive(Default)]
struct Uploads {
    acknowledged: HashMap<i64, Vec<u8>>,
    unavailable: usize,
    unexpected: Vec<String>,
}

fn record(uploads: &Mutex<Uploads>, added: Result<Value, Option<String>>, image: Vec<u8>) {
    let mut seen = uploads.lock().unwrap();
    match added {
        Ok(added) => {
            seen.acknowledged.insert(added["items"][0]["id"].as_i64().unwrap(), image);
        }
        Err(None) => seen.unavailable += 1,
        Err(Some(unexpected)) => seen.unexpected.push(unexpected),
    }
}

#[tokio::test]
async fn a_database_restart_under_traffic_loses_no_acknowledged_upload() {
    let pg = PgServer::start();
    let (mut replicas, _dirs) = replicas(&pg, 1).await;
    let replica = Arc::new(replicas.remove(0));
    let client = Client::new();
    let base = fixtures().remove(0).1;
    let uploads = Arc::new(Mutex::new(Uploads::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let uploader = {
        let (client, replica, uploads, stop, base) =
            (client.clone(), replica.clone(), uploads.clone(), stop.clone(), base.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let image = unique_image(&base, n);
                n += 1;
                let form = Form::new().part("image", Part::bytes(image.clone()).file_name("x.png"));
                let sent = client.post(format!("{}/gallery", replica.url)).multipart(form).send().await;
                let added = match sent {
                    Ok(r) if r.status() == 201 => Ok(r.json::<Value>().await.unwrap()),
                    Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after") => Err(None),
                    Ok(r) => Err(Some(r.status().to_string())),
                    Err(e) => Err(Some(e.to_string())),
                };
                record(&uploads, added, image);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let acknowledged = || uploads.lock().unwrap().acknowledged.len();
    wait_until("10 uploads before the restart", || acknowledged() >= 10).await;

    pg.stop();
    let ready = || async { client.get(format!("{}/ready", replica.url)).send().await.unwrap().status().as_u16() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready().await != 503 {
        assert!(Instant::now() < deadline, "/ready did not turn 503 while the database was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let down = search(&client, &replica, &base, "k=3").await;
    assert_eq!(down.status(), 503);
    assert!(down.headers().contains_key("retry-after"));

    pg.pg_ctl_start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready().await != 200 {
        assert!(Instant::now() < deadline, "/ready did not come back after the database did");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after_restart = acknowledged();
    wait_until("10 more uploads after the restart", || acknowledged() >= after_restart + 10).await;
    stop.store(true, Ordering::Relaxed);
    uploader.await.unwrap();

    let seen = std::mem::take(&mut *uploads.lock().unwrap());
    let (unexpected, unavailable) = (&seen.unexpected, seen.unavailable);
    assert!(unexpected.is_empty(), "answers other than 201 or 503 ({unavailable} were 503): {unexpected:?}");
    for (id, image) in &seen.acknowledged {
        let stored = client.get(format!("{}/gallery/{id}/image", replica.url)).send().await.unwrap();
        assert_eq!(stored.bytes().await.unwrap().as_ref(), image.as_slice(), "item {id} serves its own bytes");
        let body = json(search(&client, &replica, image, "k=100").await).await;
        let found =
            body["results"].as_array().unwrap().iter().any(|r| r["id"] == *id && r["score"].as_f64().unwrap() > 0.999);
        assert!(found, "acknowledged item {id} is not found by its own image: {body}");
    }
    // Every acknowledged item is listed. An upload answered 503 may still have committed (its answer
    // was lost with the connection), so at most that many more.
    let listed = json(client.get(format!("{}/gallery?limit=500", replica.url)).send().await.unwrap()).await;
    let listed: Vec<i64> = listed["items"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
    assert!(seen.acknowledged.keys().all(|id| listed.contains(id)), "{listed:?}");
    assert!(listed.len() <= seen.acknowledged.len() + seen.unavailable, "{listed:?}");
    Arc::into_inner(replica).unwrap().terminate(Duration::from_secs(30)).await;
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn lookalike_migrate_moves_an_embedded_gallery_with_its_ids() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let embedded = Server::start_with_env(dir.path(), "embedded.log", &[]).await;
    let client = Client::new();
    let images = fixtures();
    let mut ids = Vec::new();
    for (class, bytes) in &images {
        let response = upload(&client, &embedded, bytes, class).await;
        assert_eq!(response.status(), 201);
        ids.push(response.json::<Value>().await.unwrap()["items"][0]["id"].as_i64().unwrap());
    }
    // A deleted item leaves a hole in the ids; the move keeps every id as it is.
    let deleted = client.delete(format!("{}/gallery/{}", embedded.url, ids[1])).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    embedded.terminate(Duration::from_secs(30)).await;

    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_lookalike"))
            .args(["migrate", "--to", &pg.url(), "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let moved = migrate();
    let stdout = String::from_utf8_lossy(&moved.stdout);
    assert!(moved.status.success(), "{stdout}{}", String::from_utf8_lossy(&moved.stderr));
    assert!(
        stdout.contains(&format!("moved {} items with {} embeddings", images.len() - 1, images.len() - 1)),
        "{stdout}"
    );
    let again = migrate();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"), "a second run refuses");

    // A replica on the database (and the same data folder, for its model versions) serves the moved gallery.
    let url = pg.url();
    let replica = Server::start_with_env(dir.path(), "replica.log", &[("LOOKALIKE_DATABASE_URL", &url)]).await;
    let health = json(client.get(format!("{}/health", replica.url)).send().await.unwrap()).await;
    assert_eq!(health["indexed_items"].as_u64(), Some(images.len() as u64 - 1), "{health}");
    for (i, (class, bytes)) in images.iter().enumerate().filter(|(i, _)| *i != 1) {
        let found = json(search(&client, &replica, bytes, "k=3").await).await;
        assert_eq!(found["results"][0]["id"], ids[i], "{found}");
        assert_eq!(found["results"][0]["label"], class.as_str());
    }
    // New ids continue past the moved ones.
    let extra = unique_image(&images[0].1, 7);
    let added: Value = upload(&client, &replica, &extra, "extra").await.json().await.unwrap();
    assert!(added["items"][0]["id"].as_i64().unwrap() > *ids.iter().max().unwrap(), "{added}");
    replica.terminate(Duration::from_secs(30)).await;
}
