//! Cluster mode against a real PostgreSQL with pgvector (`pg.rs`): release
//! binaries as replicas over one database, each with a data folder of its own.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::{Client, Response};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::crash::unique_image;
use crate::support::{admin_json, eventually, eventually_every, fixtures, search, upload, PgServer, Server, TOKEN};

/// Replicas, each on a data folder of its own, over `pg`.
async fn replicas(pg: &PgServer, n: usize) -> (Vec<Server>, Vec<TempDir>) {
    let url = pg.url();
    let dirs: Vec<TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    // Started together: their migrations meet at the advisory lock.
    let env = [("LOOKALIKE_DATABASE_URL", url.as_str())];
    let started = dirs.iter().map(|d| Server::start_with_env(d.path(), "replica.log", &env));
    (futures::future::join_all(started).await, dirs)
}

async fn json(response: Response) -> Value {
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn replicas_over_one_database_share_the_gallery_and_filter_in_sql() {
    let pg = PgServer::start();
    let (replicas, _dirs) = replicas(&pg, 3).await;
    assert_eq!(pg.psql("SELECT version FROM lookalike_schema"), "5");
    let client = Client::new();
    let images = fixtures();

    // Each image is written on one replica and searched on the next: a 201 means every replica sees it.
    let mut ids = Vec::new();
    for (i, (class, bytes)) in images.iter().enumerate() {
        let response = upload(&client, &replicas[i % 3].url, bytes, class).await;
        assert_eq!(response.status(), 201);
        let added: Value = response.json().await.unwrap();
        let id = added["items"][0]["id"].as_i64().unwrap();
        ids.push(id);
        let found = json(search(&client, &replicas[(i + 1) % 3].url, bytes, "k=3").await).await;
        assert_eq!(found["results"][0]["id"], id, "{found}");
        assert!(found["results"][0]["score"].as_f64().unwrap() > 0.99, "{found}");
    }

    // A label filter runs in SQL: only that label, the image itself first; an unknown label finds nothing.
    let (class, bytes) = &images[0];
    let filtered = json(search(&client, &replicas[2].url, bytes, &format!("k=50&label={class}")).await).await;
    let results = filtered["results"].as_array().unwrap();
    let expected = images.iter().filter(|(c, _)| c == class).count();
    assert_eq!(results.len(), expected, "{filtered}");
    assert!(results.iter().all(|r| r["label"] == class.as_str()));
    assert_eq!(results[0]["id"], ids[0]);
    let unknown = json(search(&client, &replicas[1].url, bytes, "label=no-such-label").await).await;
    assert_eq!(unknown["results"].as_array().unwrap().len(), 0);

    // An edit through one replica: another replica's filtered search follows at
    // once, an editor there holding the old ETag is refused, and a relabelling
    // with a missing id changes nothing anywhere.
    let item = format!("/gallery/{}", ids[1]);
    let tag = client.get(format!("{}{item}", replicas[0].url)).send().await.unwrap().headers()["etag"].clone();
    let edit = |replica: &Server, body: &'static str| {
        let request = client.patch(format!("{}{item}", replica.url)).header("if-match", tag.clone());
        request.header("content-type", "application/merge-patch+json").body(body).send()
    };
    let edited =
        json(edit(&replicas[0], r#"{"label": "relabelled", "metadata": {"note": "fixed"}}"#).await.unwrap()).await;
    assert_eq!((edited["label"].clone(), edited["metadata"].clone()), (json!("relabelled"), json!({"note": "fixed"})));
    assert_eq!(edit(&replicas[1], r#"{"label": "other"}"#).await.unwrap().status(), 412);
    let found = json(search(&client, &replicas[2].url, &images[1].1, "k=5&label=relabelled").await).await;
    let found: Vec<&Value> = found["results"].as_array().unwrap().iter().map(|r| &r["id"]).collect();
    assert_eq!(found, vec![&json!(ids[1])]);
    let relabel = json!({"ids": [ids[1], ids[2], 9_999_999], "label": "x"});
    let missing = client.post(format!("{}/gallery/labels", replicas[2].url)).json(&relabel).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let after = json(client.get(format!("{}/gallery/{}", replicas[1].url, ids[2])).send().await.unwrap()).await;
    assert_eq!(after["label"], images[2].0.as_str());

    // Curation over SQL: a scan groups a planted copy with its original, and
    // another replica than the one running it answers for it; suggestions
    // list the one unlabelled item.
    let copy = crate::duplicates::rescaled(&images[3].1, 200);
    let added = client
        .post(format!("{}/gallery", replicas[0].url))
        .multipart(Form::new().part("image", Part::bytes(copy).file_name("c.png")));
    let copy_id = json_status(added.send().await.unwrap(), 201).await["items"][0]["id"].as_i64().unwrap();
    // Ten older finished scans: the start keeps the newest 8, itself included.
    pg.psql(
        "INSERT INTO duplicate_scans (id, state, record, created_at, updated_at)
         SELECT 'old-' || n, 'done', '{}', n, n FROM generate_series(1, 10) AS n",
    );
    let started = client.post(format!("{}/gallery/duplicates?distance=0.02", replicas[1].url)).send().await.unwrap();
    assert_eq!(pg.psql("SELECT count(*) FROM duplicate_scans WHERE id NOT LIKE 'old-%'"), "1");
    assert_eq!(pg.psql("SELECT count(*) FROM duplicate_scans"), "8");
    let scan_url = format!("{}{}", replicas[2].url, started.headers()["location"].to_str().unwrap());
    let scan = eventually(Duration::from_secs(30), "the scan to finish", || async {
        let scan: Value = client.get(&scan_url).send().await.unwrap().json().await.unwrap();
        if scan["state"] == "running" {
            Err(scan.to_string())
        } else {
            Ok(scan)
        }
    })
    .await;
    assert_eq!((scan["state"].as_str(), scan["total"].as_u64()), (Some("done"), Some(images.len() as u64 + 1)));
    let grouped = scan["groups"].as_array().unwrap().iter().any(|g| {
        let members: Vec<i64> = g["items"].as_array().unwrap().iter().map(|i| i["id"].as_i64().unwrap()).collect();
        members.contains(&ids[3]) && members.contains(&copy_id) && g["keeper"] == copy_id
    });
    assert!(grouped, "{scan}");
    let suggested =
        json(client.get(format!("{}/gallery/suggestions?n=5", replicas[2].url)).send().await.unwrap()).await;
    assert_eq!(suggested["unlabelled"], 1, "{suggested}");
    assert_eq!(suggested["suggestions"][0]["item"]["id"], copy_id, "{suggested}");
    assert_eq!(client.delete(format!("{}/gallery/{copy_id}", replicas[2].url)).send().await.unwrap().status(), 204);

    // A delete on one replica leaves every replica's results at once.
    let deleted = client.delete(format!("{}/gallery/{}", replicas[1].url, ids[0])).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    for replica in &replicas {
        let found = json(search(&client, &replica.url, bytes, "k=5").await).await;
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
    let url = pg.url();
    let mut refused = Server::spawn(dir.path(), "refused.log", &[("LOOKALIKE_DATABASE_URL", url.as_str())]);
    let status = refused.exited(Duration::from_secs(120)).await;
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("schema version 99, newer than this build's 5; upgrade lookalike"), "{stderr}");
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
    eventually(Duration::from_secs(30), "/ready to answer 503 while the database is down", || async {
        let status = ready().await;
        if status == 503 {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let down = search(&client, &replica.url, &base, "k=3").await;
    assert_eq!(down.status(), 503);
    assert!(down.headers().contains_key("retry-after"));

    pg.pg_ctl_start();
    eventually(Duration::from_secs(60), "/ready to come back after the database", || async {
        let status = ready().await;
        if status == 200 {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
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
        let body = json(search(&client, &replica.url, image, "k=100").await).await;
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
    eventually(Duration::from_secs(120), what, || async {
        if done() {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await
}

/// The bundled encoder saved again as version 2 in the data folder `dir`:
/// a version nothing is embedded with yet.
fn save_second_version(dir: &std::path::Path) {
    let saved = dir.join("models/2");
    std::fs::create_dir_all(&saved).unwrap();
    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    std::fs::copy(bundled.join("encoder.pt"), saved.join("encoder.pt")).unwrap();
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(bundled.join("manifest.json")).unwrap()).unwrap();
    manifest["version"] = "2".into();
    std::fs::write(saved.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
}

#[tokio::test]
async fn after_a_flip_uploads_are_embedded_with_the_old_version_too_while_a_replica_still_serves_it() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    save_second_version(dir.path());
    let url = pg.url();
    let env = [("LOOKALIKE_DATABASE_URL", url.as_str()), ("LOOKALIKE_ADMIN_TOKEN", TOKEN)];
    let replica = Server::start_with_env(dir.path(), "replica.log", &env).await;
    let client = Client::new();
    let images = fixtures();
    for (class, bytes) in &images[..4] {
        assert_eq!(upload(&client, &replica.url, bytes, class).await.status(), 201);
    }
    let bundled = serving(&client, &replica.url).await;

    // A replica that never learns a flip: its row says it is alive (for an hour) and serves the
    // bundled version, and it says it is ready for every switch (`activate` below).
    pg.psql(&format!(
        "INSERT INTO replicas (id, seen_at, serving) VALUES ('lagging', now() + interval '1 hour', '{bundled}')"
    ));
    activate(&pg, &client, &replica.url, "2").await;
    let models_of = |id: i64| pg.psql(&format!("SELECT COUNT(*) FROM embeddings WHERE item_id = {id}"));
    let upload_new = |n: usize| {
        let (image, client, url) = (unique_image(&images[0].1, n), client.clone(), replica.url.clone());
        async move {
            let form = Form::new().part("image", Part::bytes(image).file_name("x.png"));
            let added = json_status(client.post(format!("{url}/gallery")).multipart(form).send().await.unwrap(), 201);
            added.await["items"][0]["id"].as_i64().unwrap()
        }
    };

    // The switched replica embeds its uploads with both versions while the other serves the old one.
    for n in 0..3 {
        assert_eq!(models_of(upload_new(n).await), "2", "an upload lacks the version a live replica serves");
    }
    // A rollback meanwhile (the model switched from is still loaded, and taken again). Then every
    // live replica serves the active version, and uploads are embedded with that one only.
    activate(&pg, &client, &replica.url, &bundled).await;
    let next = std::sync::atomic::AtomicUsize::new(3);
    eventually(Duration::from_secs(60), "uploads embedded with one version only", || async {
        let models = models_of(upload_new(next.fetch_add(1, Ordering::Relaxed)).await);
        if models == "1" {
            Ok(())
        } else {
            Err(format!("{models} versions"))
        }
    })
    .await;
    replica.terminate(Duration::from_secs(30)).await;
}

/// Activates `version` through the replica at `url` and waits until it serves it, with the
/// test's `lagging` replica row saying it is ready for the switch.
async fn activate(pg: &PgServer, client: &Client, url: &str, version: &str) {
    let (status, activation) = admin_json(client.post(format!("{url}/admin/models/{version}/activate"))).await;
    assert_eq!(status, 202, "{activation}");
    let seen_at = format!("{url}/admin/activations/{}", activation["id"].as_str().unwrap());
    eventually(Duration::from_secs(120), "the activation to finish", || async {
        pg.psql(
            "UPDATE replicas SET ready_for = s.switch_id FROM cluster_state s
             WHERE id = 'lagging' AND s.switch_id IS NOT NULL",
        );
        let (_, seen) = admin_json(client.get(&seen_at)).await;
        ended(&seen, "done", "the activation failed")
    })
    .await;
    wait_for_version(client, url, version).await;
}

#[tokio::test]
async fn lookalike_migrate_moves_an_embedded_gallery_with_its_ids() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    // A saved version, active.
    save_second_version(dir.path());
    std::fs::write(dir.path().join("models/ACTIVE"), "2").unwrap();
    let embedded = Server::start_with_env(dir.path(), "embedded.log", &[]).await;
    let client = Client::new();
    let images = fixtures();
    let mut ids = Vec::new();
    for (class, bytes) in &images {
        let response = upload(&client, &embedded.url, bytes, class).await;
        assert_eq!(response.status(), 201);
        ids.push(response.json::<Value>().await.unwrap()["items"][0]["id"].as_i64().unwrap());
    }
    // A deleted item leaves a hole in the ids; the move keeps every id as it is.
    let deleted = client.delete(format!("{}/gallery/{}", embedded.url, ids[1])).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    embedded.terminate(Duration::from_secs(30)).await;
    // Metadata stored before the API refused NUL characters, which PostgreSQL cannot hold.
    let store = rusqlite::Connection::open(dir.path().join("gallery.sqlite3")).unwrap();
    store.execute("UPDATE items SET metadata = ?1 WHERE id = ?2", (r#"{"note":"a\u0000b"}"#, ids[0])).unwrap();
    drop(store);

    // The URL from the environment, as the service takes it.
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_lookalike"))
            .args(["migrate", "--data-dir"])
            .arg(dir.path())
            .env("LOOKALIKE_DATABASE_URL", pg.url())
            .output()
            .unwrap()
    };
    let moved = migrate();
    let stdout = String::from_utf8_lossy(&moved.stdout);
    assert!(moved.status.success(), "{stdout}{}", String::from_utf8_lossy(&moved.stderr));
    assert!(
        stdout.contains(&format!(
            "moved {} items with {} embeddings and 1 saved model versions (version 2 active)",
            images.len() - 1,
            images.len() - 1
        )),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("it is now U+FFFD in items [{}]", ids[0])), "{stdout}");
    let again = migrate();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds"), "a second run refuses");

    // A replica on the database, with a data folder of its own, serves the moved gallery with the
    // moved active version (fetched from the database), embedding nothing again.
    let (url, fresh) = (pg.url(), tempfile::tempdir().unwrap());
    let replica = Server::start_with_env(fresh.path(), "replica.log", &[("LOOKALIKE_DATABASE_URL", &url)]).await;
    let health = json(client.get(format!("{}/health", replica.url)).send().await.unwrap()).await;
    assert_eq!(health["model_version"], "2", "{health}");
    assert_eq!(pg.psql("SELECT COUNT(DISTINCT model) FROM embeddings"), "1");
    assert_eq!(health["indexed_items"].as_u64(), Some(images.len() as u64 - 1), "{health}");
    let first = json(client.get(format!("{}/gallery/{}", replica.url, ids[0])).send().await.unwrap()).await;
    assert_eq!(first["metadata"]["note"], "a\u{fffd}b", "{first}");
    for (i, (class, bytes)) in images.iter().enumerate().filter(|(i, _)| *i != 1) {
        let found = json(search(&client, &replica.url, bytes, "k=3").await).await;
        assert_eq!(found["results"][0]["id"], ids[i], "{found}");
        assert_eq!(found["results"][0]["label"], class.as_str());
    }
    // New ids continue past the moved ones.
    let extra = unique_image(&images[0].1, 7);
    let added: Value = upload(&client, &replica.url, &extra, "extra").await.json().await.unwrap();
    assert!(added["items"][0]["id"].as_i64().unwrap() > *ids.iter().max().unwrap(), "{added}");
    replica.terminate(Duration::from_secs(30)).await;
}

/// What the background clients saw: answers other than 2xx, by replica.
#[derive(Default)]
struct Traffic {
    searches: usize,
    failures: Vec<String>,
    acknowledged: HashMap<i64, Vec<u8>>,
    /// Uploads to a replica killed before it answered: each may or may not
    /// have committed, so the gallery may hold up to this many extra items.
    unanswered: usize,
}

/// Searches and uploads on every replica in `urls` (those still in it)
/// until `stop`, recording every answer.
fn background_traffic(
    urls: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    traffic: Arc<Mutex<Traffic>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = Client::new();
        let images = fixtures();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let targets = urls.lock().unwrap().clone();
            for url in targets {
                let (_, base) = &images[n % images.len()];
                let searched = client
                    .post(format!("{url}/search?k=3"))
                    .header("content-type", "image/png")
                    .body(base.clone())
                    .send()
                    .await;
                let image = unique_image(base, 1000 + n);
                n += 1;
                let form = Form::new().part("image", Part::bytes(image.clone()).file_name("x.png"));
                let uploaded = client.post(format!("{url}/gallery")).multipart(form).send().await;
                let uploaded = match uploaded {
                    Ok(r) if r.status() == 201 => {
                        r.json::<Value>().await.map_err(|e| format!("upload on {url}: 201 without its body: {e}"))
                    }
                    Ok(r) => Err(format!("upload on {url}: {}", r.status())),
                    Err(e) => Err(format!("upload on {url}: {e}")),
                };
                let mut seen = traffic.lock().unwrap();
                if !urls.lock().unwrap().contains(&url) {
                    // Killed meanwhile: a 201 it sent still counts, a lost answer is not a failure.
                    match uploaded {
                        Ok(added) => {
                            seen.acknowledged.insert(added["items"][0]["id"].as_i64().unwrap(), image);
                        }
                        Err(_) => seen.unanswered += 1,
                    }
                    continue;
                }
                seen.searches += 1;
                match searched {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => seen.failures.push(format!("search on {url}: {}", r.status())),
                    Err(e) => seen.failures.push(format!("search on {url}: {e}")),
                }
                match uploaded {
                    Ok(added) => {
                        seen.acknowledged.insert(added["items"][0]["id"].as_i64().unwrap(), image);
                    }
                    Err(failure) => seen.failures.push(failure),
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Which version a replica serves, from `/health`.
async fn serving(client: &Client, url: &str) -> String {
    let health = json(client.get(format!("{url}/health")).send().await.unwrap()).await;
    health["model_version"].as_str().unwrap_or_else(|| panic!("{health}")).to_string()
}

async fn wait_for_version(client: &Client, url: &str, version: &str) {
    eventually(Duration::from_secs(60), &format!("{url} to serve version {version}"), || async {
        let serving = serving(client, url).await;
        if serving == version {
            Ok(())
        } else {
            Err(serving)
        }
    })
    .await
}

/// `Ok` once a job's or an activation's status is in one of `done` (`|`-separated);
/// a test failure if it ended otherwise.
fn ended(seen: &Value, done: &str, failed: &str) -> Result<Value, String> {
    match seen["state"].as_str().unwrap() {
        state if done.split('|').any(|d| d == state) => Ok(seen.clone()),
        "failed" | "cancelled" => panic!("{failed}: {seen}"),
        _ => Err(seen.to_string()),
    }
}

#[tokio::test]
async fn a_finetune_through_one_replica_switches_all_three_and_survives_a_replica_killed_while_re_embedding() {
    let pg = PgServer::start();
    let (url, data) = (pg.url(), tempfile::tempdir().unwrap());
    let env = [("LOOKALIKE_DATABASE_URL", url.as_str()), ("LOOKALIKE_ADMIN_TOKEN", TOKEN)];
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir_in(data.path()).unwrap()).collect();
    let started = dirs.iter().map(|d| Server::start_with_env(d.path(), "replica.log", &env));
    let mut replicas: Vec<Option<Server>> = futures::future::join_all(started).await.into_iter().map(Some).collect();
    let urls: Vec<String> = replicas.iter().map(|r| r.as_ref().unwrap().url.clone()).collect();
    let client = Client::new();

    // A labelled gallery to train on, and enough unlabelled images that re-embedding takes a while.
    let images = fixtures();
    let mut expected: HashMap<i64, Vec<u8>> = HashMap::new();
    for (i, (class, bytes)) in images.iter().enumerate() {
        let response = upload(&client, &replicas[i % 3].as_ref().unwrap().url, bytes, class).await;
        let added: Value = response.json().await.unwrap();
        expected.insert(added["items"][0]["id"].as_i64().unwrap(), bytes.clone());
    }
    for chunk in 0..30 {
        let batch: Vec<Vec<u8>> =
            (0..16).map(|j| unique_image(&images[(chunk + j) % images.len()].1, chunk * 16 + j)).collect();
        let mut form = Form::new();
        for (j, bytes) in batch.iter().enumerate() {
            form = form.part("image", Part::bytes(bytes.clone()).file_name(format!("{j}.png")));
        }
        let added =
            json_status(client.post(format!("{}/gallery", urls[chunk % 3])).multipart(form).send().await.unwrap(), 201)
                .await;
        for (item, bytes) in added["items"].as_array().unwrap().iter().zip(batch) {
            expected.insert(item["id"].as_i64().unwrap(), bytes);
        }
    }
    let bundled = serving(&client, &urls[0]).await;

    // Searches and uploads on every replica from here to the end.
    let (live, stop, traffic) = (
        Arc::new(Mutex::new(urls.clone())),
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Traffic::default())),
    );
    let clients = background_traffic(live.clone(), stop.clone(), traffic.clone());

    // One fine-tune at a time across the cluster: the job is accepted by replica 0, refused by replica 1.
    let params = json!({"epochs": 1, "p": 4, "k": 2, "validation_fraction": 0.34, "seed": 1, "commit": "always"});
    let (status, job) = admin_json(client.post(format!("{}/admin/finetune", urls[0])).json(&params)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let (status, busy) = admin_json(client.post(format!("{}/admin/finetune", urls[1])).json(&params)).await;
    assert_eq!((status, busy["error"]["code"].as_str()), (409, Some("job_running")), "{busy}");

    // Its progress reads the same from another replica; replica 2 is killed while the cluster re-embeds.
    let job_status = format!("{}/admin/finetune/{id}", urls[1]);
    eventually_every(Duration::from_millis(20), Duration::from_secs(300), "the job to re-embed", || async {
        let (status, seen) = admin_json(client.get(&job_status)).await;
        assert_eq!(status, 200, "{seen}");
        ended(&seen, "re_embedding|swapping|done", "the job ended early")
    })
    .await;
    // Killed once the new model's embeddings start to arrive (or the work is done already).
    eventually_every(Duration::from_millis(20), Duration::from_secs(300), "the new model's embeddings", || async {
        let models = pg.psql("SELECT COUNT(DISTINCT model) FROM embeddings");
        if models != "1" {
            Ok(())
        } else {
            Err(format!("{models} models"))
        }
    })
    .await;
    live.lock().unwrap().retain(|u| *u != urls[2]);
    replicas[2].take().unwrap().kill();
    let embedded = pg.psql("SELECT model, COUNT(*) FROM embeddings GROUP BY model");
    eprintln!("killed replica 2 with these embeddings stored:\n{embedded}");

    // The others finish the work and the switch: the job reads done from replica 1.
    let seen = eventually(Duration::from_secs(300), "the job to finish", || async {
        ended(&admin_json(client.get(&job_status)).await.1, "done", "the job did not commit")
    })
    .await;
    assert_eq!(seen["result"]["committed"], true, "{seen}");
    let version = seen["result"]["version"].as_str().unwrap().to_string();
    assert_ne!(version, bundled);
    for url in &urls[..2] {
        wait_for_version(&client, url, &version).await;
    }
    let lacking = |version: &str| {
        pg.psql(&format!(
            "SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM embeddings e
             WHERE e.model LIKE '%@{version}#%' AND e.item_id = i.id)"
        ))
    };
    assert_eq!(lacking(&version), "0", "items without an embedding of the new version");
    // A replica started now serves the cluster's version, fetched from the database.
    let late = Server::start_with_env(dirs[2].path(), "late.log", &env).await;
    assert_eq!(serving(&client, &late.url).await, version);
    live.lock().unwrap().push(late.url.clone());

    // Rollback through another replica switches every replica back.
    let (status, activation) = admin_json(client.post(format!("{}/admin/models/{bundled}/activate", urls[1]))).await;
    assert_eq!(status, 202, "{activation}");
    let activation_status = format!("{}/admin/activations/{}", urls[0], activation["id"].as_str().unwrap());
    eventually(Duration::from_secs(300), "the rollback to finish", || async {
        let (status, seen) = admin_json(client.get(&activation_status)).await;
        assert_eq!(status, 200, "{seen}");
        ended(&seen, "done", "the rollback failed")
    })
    .await;
    for url in [&urls[0], &urls[1], &late.url] {
        wait_for_version(&client, url, &bundled).await;
    }

    stop.store(true, Ordering::Relaxed);
    clients.await.unwrap();
    let seen = std::mem::take(&mut *traffic.lock().unwrap());
    assert!(seen.failures.is_empty(), "answers other than 2xx in {} rounds: {:?}", seen.searches, seen.failures);
    assert!(seen.acknowledged.len() > 10, "the background uploads went on: {}", seen.acknowledged.len());

    // Every acknowledged item has an embedding of both versions and is found by its own image.
    expected.extend(seen.acknowledged);
    assert_eq!(lacking(&bundled), "0", "items without an embedding of the version rolled back to");
    assert_eq!(pg.psql("SELECT COUNT(DISTINCT model) FROM embeddings"), "2");
    // The killed replica may have committed an upload it never answered.
    let stored: usize = pg.psql("SELECT COUNT(*) FROM items").parse().unwrap();
    assert!(
        (expected.len()..=expected.len() + seen.unanswered).contains(&stored),
        "{stored} items stored, {} acknowledged, {} uploads unanswered by the killed replica",
        expected.len(),
        seen.unanswered
    );
    for (i, (id, image)) in expected.iter().enumerate() {
        let url = [&urls[0], &urls[1], &late.url][i % 3];
        let body = json(
            client
                .post(format!("{url}/search?k=50"))
                .header("content-type", "image/png")
                .body(image.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        let found =
            body["results"].as_array().unwrap().iter().any(|r| r["id"] == *id && r["score"].as_f64().unwrap() > 0.999);
        assert!(found, "acknowledged item {id} is not found by its own image: {body}");
    }
    for replica in replicas.into_iter().flatten().chain([late]) {
        replica.terminate(Duration::from_secs(30)).await;
    }
}

async fn json_status(response: Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    response.json().await.unwrap()
}

/// A job's final state reaches the database even when the database is away at
/// the moment the job ends: the replica writes it again until it is taken.
/// (The job ends because the database went away: its lifecycle lock went with it.)
#[tokio::test]
async fn a_final_state_written_while_the_database_is_away_is_published_once_it_is_back() {
    let pg = PgServer::start();
    let (url, dir) = (pg.url(), tempfile::tempdir().unwrap());
    let env = [("LOOKALIKE_DATABASE_URL", url.as_str()), ("LOOKALIKE_ADMIN_TOKEN", TOKEN)];
    let server = Server::start_with_env(dir.path(), "replica.log", &env).await;
    let client = Client::new();
    for (class, bytes) in fixtures() {
        assert_eq!(upload(&client, &server.url, &bytes, &class).await.status(), 201);
    }
    let params = json!({"epochs": 1000, "p": 4, "k": 2, "validation_fraction": 0.34, "seed": 1});
    let (status, job) = admin_json(client.post(format!("{}/admin/finetune", server.url)).json(&params)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let state_in_database = || pg.psql(&format!("SELECT status->>'state' FROM lifecycle_runs WHERE id = '{id}'"));
    eventually(Duration::from_secs(120), "the job to train", || async {
        let state = state_in_database();
        if state == "training" {
            Ok(())
        } else {
            Err(state)
        }
    })
    .await;

    // Stopping the database also closes the lifecycle lock's connection: the job stops, failed.
    pg.stop();
    let job_url = format!("{}/admin/finetune/{id}", server.url);
    let ended = eventually(Duration::from_secs(60), "the job to end here", || async {
        let (_, seen) = admin_json(client.get(&job_url)).await;
        if seen["state"] == "failed" {
            Ok(seen)
        } else {
            Err(seen["state"].to_string())
        }
    })
    .await;
    assert!(ended["error"].as_str().unwrap().contains("lost the lifecycle lock"), "{ended}");
    pg.pg_ctl_start();
    eventually(Duration::from_secs(60), "the final state in the database", || async {
        let state = state_in_database();
        if state == "failed" {
            Ok(())
        } else {
            Err(state)
        }
    })
    .await;
    server.terminate(Duration::from_secs(30)).await;
}

/// `DELETE /admin/models/{version}` through one replica deletes the version
/// for all: its row keeps the number without the encoder, its embeddings and
/// pgvector index go, and the other replica drops its copy.
#[tokio::test]
async fn a_version_deleted_through_one_replica_is_gone_from_every_replica() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    save_second_version(dir.path());
    let embedded = Server::start_with_env(dir.path(), "embedded.log", &[]).await;
    let client = Client::new();
    for (class, bytes) in fixtures().iter().take(5) {
        assert_eq!(upload(&client, &embedded.url, bytes, class).await.status(), 201);
    }
    embedded.terminate(Duration::from_secs(30)).await;
    let moved = Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .env("LOOKALIKE_DATABASE_URL", pg.url())
        .output()
        .unwrap();
    assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));

    let url = pg.url();
    let env = [("LOOKALIKE_DATABASE_URL", url.as_str()), ("LOOKALIKE_ADMIN_TOKEN", TOKEN)];
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = Server::start_with_env(dirs[0].path(), "replica.log", &env).await;
    let b = Server::start_with_env(dirs[1].path(), "replica.log", &env).await;
    activate(&pg, &client, &a.url, "2").await;
    let indexes = "SELECT COUNT(*) FROM pg_indexes WHERE indexname LIKE 'embeddings_hnsw_%'";
    assert_eq!(pg.psql(indexes), "2", "the bundled model's index and version 2's");
    let (status, refused) = admin_json(client.delete(format!("{}/admin/models/2", b.url))).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("model_in_use")), "{refused}");
    activate(&pg, &client, &a.url, "1").await;

    // Refused while replica b still serves version 2 (it learns the flip within a second).
    let deleted = eventually(Duration::from_secs(30), "the deletion", || async {
        match admin_json(client.delete(format!("{}/admin/models/2", b.url))).await {
            (200, deleted) => Ok(deleted),
            (409, refused) if refused["error"]["code"] == "model_in_use" => Err(refused.to_string()),
            (status, other) => panic!("{status}: {other}"),
        }
    })
    .await;
    assert_eq!(deleted["embeddings_deleted"].as_u64(), Some(5), "{deleted}");
    assert_eq!(pg.psql("SELECT deleted, octet_length(encoder) FROM model_versions"), "t|0");
    assert_eq!(pg.psql("SELECT COUNT(DISTINCT model) FROM embeddings"), "1");
    assert_eq!(pg.psql(indexes), "1", "version 2's index is dropped");
    let (_, models) = admin_json(client.get(format!("{}/admin/models", a.url))).await;
    assert_eq!(models["versions"].as_array().unwrap().len(), 1, "{models}");
    assert!(!dirs[0].path().join("models/2").exists(), "the other replica dropped its copy");
    for server in [a, b] {
        server.terminate(Duration::from_secs(30)).await;
    }
}
