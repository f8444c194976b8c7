//! Fine-tuning over HTTP with the real model: admin auth, validation of the
//! request and the data, a job that commits and swaps while searches and
//! uploads keep being answered, one that finds nothing better, cancellation,
//! rollback, and a restart in the middle of a job.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::Client;
use serde_json::{json, Value};

use lookalike::config::ServeConfig;

use crate::support::{
    activate, admin, assert_error, config, eventually, fixtures, job_status, spawn_app, spawn_app_with, spawn_with,
    wait_for_job, Server, TestApp, TOKEN,
};

async fn admin_app() -> TestApp {
    spawn_app_with(|c| c.admin_token = Some(TOKEN.into())).await
}

/// The committed fixtures, each stored with its class as label.
async fn add_labelled_fixtures(client: &Client, url: &str) -> usize {
    let all = fixtures();
    for (class, bytes) in &all {
        let form =
            Form::new().part("image", Part::bytes(bytes.clone()).file_name("x.png")).text("label", class.clone());
        let response = client.post(format!("{url}/gallery")).multipart(form).send().await.unwrap();
        assert_eq!(response.status(), 201);
    }
    all.len()
}

async fn start_job(app: &TestApp, params: Value) -> reqwest::Response {
    admin(app.client.post(app.url("/admin/finetune"))).json(&params).send().await.unwrap()
}

async fn get_json(app: &TestApp, path: &str) -> Value {
    let response = admin(app.client.get(app.url(path))).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

#[tokio::test]
async fn admin_routes_need_the_configured_token() {
    let open = spawn_app().await;
    let response = open.client.post(open.url("/admin/finetune")).json(&json!({})).send().await.unwrap();
    assert_error(response, 403, "admin_disabled").await;
    let response = admin(open.client.get(open.url("/admin/models"))).send().await.unwrap();
    assert_error(response, 403, "admin_disabled").await;
    open.stop().await;

    let app = admin_app().await;
    for (method, path) in [("POST", "/admin/finetune"), ("GET", "/admin/models"), ("POST", "/admin/models/1/activate")]
    {
        let request = app.client.request(method.parse().unwrap(), app.url(path));
        let response = request.try_clone().unwrap().send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_error(response, 401, "unauthorized").await;
        let response = request.bearer_auth("not-the-token-at-all").send().await.unwrap();
        assert_error(response, 401, "unauthorized").await;
    }
    let models = get_json(&app, "/admin/models").await;
    assert_eq!(models["active"], "1");
    assert_eq!(models["versions"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn the_admin_token_can_come_from_a_file() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), format!("  {TOKEN}\n")).unwrap();
    let path = secret.path().to_path_buf();
    let app = spawn_app_with(move |c| c.admin_token_file = Some(path)).await;
    assert_eq!(get_json(&app, "/admin/models").await["active"], "1", "the trimmed file contents are the token");
    let response = app.client.get(app.url("/admin/models")).bearer_auth(format!("{TOKEN}0")).send().await;
    assert_error(response.unwrap(), 401, "unauthorized").await;
    app.stop().await;
}

#[tokio::test]
async fn finetune_requests_and_data_are_checked() {
    let app = admin_app().await;
    // Only one label with images: no triplets can be formed.
    let bags: Vec<Vec<u8>> = fixtures().into_iter().filter(|(c, _)| c == "bag").map(|(_, b)| b).collect();
    assert_eq!(app.add_images(&bags, Some("bag"), None).await.status(), 201);
    let response = start_job(&app, json!({})).await;
    assert_error(response, 422, "insufficient_labels").await;
    let response = start_job(&app, json!({"epochs": 0})).await;
    assert_error(response, 422, "invalid_params").await;
    let response = start_job(&app, json!({"epoch": 3})).await;
    assert_error(response, 422, "invalid_params").await;
    let response = admin(app.client.post(app.url("/admin/finetune"))).body("{\"epochs\": ").send().await.unwrap();
    assert_error(response, 400, "invalid_json").await;
    let response = admin(app.client.get(app.url("/admin/finetune/no-such-job"))).send().await.unwrap();
    assert_error(response, 404, "not_found").await;
    let response = admin(app.client.post(app.url("/admin/models/77/activate"))).send().await.unwrap();
    assert_error(response, 404, "not_found").await;
    app.stop().await;
}

/// Searches and unlabelled uploads in a loop until `stop`; counts answers that are not 2xx.
fn background_load(
    app: &TestApp,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (errors, uploads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (client, base) = (app.client.clone(), app.address.clone());
    let (task_errors, task_uploads) = (errors.clone(), uploads.clone());
    let task = tokio::spawn(async move {
        let images = fixtures();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let (_, bytes) = &images[n % images.len()];
            let search =
                client.post(format!("{base}/search?k=3")).header("content-type", "image/png").body(bytes.clone());
            let upload = Form::new().part("image", Part::bytes(bytes.clone()).file_name("u.png"));
            let upload = client.post(format!("{base}/gallery")).multipart(upload);
            let (searched, uploaded) = tokio::join!(search.send(), upload.send());
            for status in [searched.map(|r| r.status()), uploaded.map(|r| r.status())] {
                if !status.is_ok_and(|s| s.is_success()) {
                    task_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            task_uploads.fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
    });
    (task, errors, uploads)
}

#[tokio::test]
async fn a_finetune_commits_and_swaps_while_search_and_uploads_keep_answering() {
    let app = admin_app().await;
    let labelled = add_labelled_fixtures(&app.client, &app.address).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (load, errors, uploads) = background_load(&app, stop.clone());

    let params = json!({"epochs": 2, "p": 4, "k": 2, "validation_fraction": 0.34, "seed": 1, "commit": "always"});
    let response = start_job(&app, params.clone()).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let job: Value = response.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/admin/finetune/{id}"));
    assert_eq!(job["data"]["labels"].as_array().unwrap().len(), 4);
    assert_eq!(job["data"]["validation_images"], 4, "one of each label's three images is held out");
    assert_error(start_job(&app, params).await, 409, "job_running").await;

    let (status, states) = wait_for_job(&app.client, &app.address, &id).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["result"]["committed"], true, "{status}");
    assert_eq!(status["result"]["version"], "2");
    assert!(states.contains(&"re_embedding".to_string()) || states.contains(&"swapping".to_string()), "{states:?}");
    assert_eq!(status["history"].as_array().unwrap().len(), 2);
    assert_eq!(
        status["step_losses"].as_array().unwrap().len(),
        2 * status["steps_per_epoch"].as_u64().unwrap() as usize
    );
    assert!(status["validation"]["before"]["recall_at_1"].is_number());
    assert!(status["elapsed_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(errors.load(Ordering::Relaxed), 0, "every search and upload during the job succeeded");
    assert!(uploads.load(Ordering::Relaxed) > 0);

    // The new version serves, over every item, including those uploaded during the job.
    let items = labelled + uploads.load(Ordering::Relaxed);
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["model_version"], "2");
    assert_eq!(health["indexed_items"], items);
    let models = get_json(&app, "/admin/models").await;
    assert_eq!(models["active"], "2");
    let v2 = &models["versions"][1];
    assert_eq!(
        (v2["version"].as_str(), v2["parent"].as_str(), v2["active"].as_bool()),
        (Some("2"), Some("1"), Some(true))
    );
    assert_eq!(v2["embedded_items"], items);
    assert!(v2["verification_threshold"].is_number());
    assert_eq!(v2["finetune"]["job"], id.as_str());
    let (_, query) = &fixtures()[0];
    let found: Value = app.search_raw(query, "1", "image/png").await.json().await.unwrap();
    assert_eq!(found["model"], v2["model"]);
    assert!(found["results"][0]["score"].as_f64().unwrap() > 0.99, "an identical stored image comes first: {found}");

    // A restart comes back on the active version, with its index reloaded from the dump taken at the swap.
    let data_dir = app.data_dir.clone();
    let guard = app.stop().await;
    let app = spawn_with(ServeConfig { admin_token: Some(TOKEN.into()), ..config(&data_dir) }).await;
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!((health["model_version"].as_str(), health["index_source"].as_str()), (Some("2"), Some("reloaded")));
    assert_eq!(health["indexed_items"], items);

    // Roll back: only items uploaded after the swap lack a version-1 embedding; only they are embedded.
    let stored_v1 = models["versions"][0]["embedded_items"].as_u64().unwrap();
    assert!(stored_v1 >= labelled as u64);
    let activation = activate(&app.client, &app.address, "1").await;
    assert_eq!(activation["state"], "done", "{activation}");
    let switched = &activation["result"];
    assert_eq!(switched["version"], "1");
    assert_eq!(activation["progress"]["embedded"], switched["embedded"]);
    let listed = get_json(&app, "/admin/activations").await;
    assert_eq!(listed["activations"][0]["id"], activation["id"]);
    assert_eq!(switched["embedded"].as_u64().unwrap(), items as u64 - stored_v1);
    assert_eq!(switched["items"], items);
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["model_version"], "1");
    app.stop().await;
    drop(guard);
}

#[tokio::test]
async fn a_finetune_that_does_not_improve_changes_nothing() {
    let app = admin_app().await;
    add_labelled_fixtures(&app.client, &app.address).await;
    // A step size far too small to move any embedding enough to change a ranking.
    let params = json!({"epochs": 1, "p": 4, "k": 2, "validation_fraction": 0.34, "learning_rate": 1e-9});
    let response = start_job(&app, params).await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let (status, _) = wait_for_job(&app.client, &app.address, &id).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["result"]["committed"], false);
    assert!(status["result"]["reason"].as_str().unwrap().contains("nothing was swapped"), "{status}");
    assert_eq!(get_json(&app, "/admin/models").await["versions"].as_array().unwrap().len(), 1);
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["model_version"], "1");
    app.stop().await;
}

#[tokio::test]
async fn a_running_finetune_can_be_cancelled() {
    let app = admin_app().await;
    add_labelled_fixtures(&app.client, &app.address).await;
    let params = json!({"epochs": 1000, "steps_per_epoch": 100000, "p": 4, "k": 2, "validation_fraction": 0.34});
    let response = start_job(&app, params).await;
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(120), "the job to take a training step", || async {
        let status = job_status(&app.client, &app.address, &id).await;
        if status["step"].as_u64() >= Some(1) {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    let response = admin(app.client.delete(app.url(&format!("/admin/finetune/{id}")))).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let (status, _) = wait_for_job(&app.client, &app.address, &id).await;
    assert_eq!(status["state"], "cancelled");
    let response = admin(app.client.delete(app.url(&format!("/admin/finetune/{id}")))).send().await.unwrap();
    assert_error(response, 409, "job_finished").await;
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["model_version"], "1");
    // The slot is free again.
    let listed = get_json(&app, "/admin/finetune").await;
    assert_eq!(listed["jobs"][0]["id"], id.as_str());
    app.stop().await;
}

#[tokio::test]
async fn a_restart_in_the_middle_of_a_job_marks_it_failed_and_keeps_the_active_model() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("LOOKALIKE_ADMIN_TOKEN", TOKEN)];
    let server = Server::start_with_env(dir.path(), "first.log", &env).await;
    let client = Client::new();
    let id = start_a_long_job(&client, &server.url).await;
    server.kill();
    // The checkpoints it had written (an epoch of it beat the start): removed at the next start.
    let scratch = dir.path().join("finetune").join(&id);
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("best.pt"), b"weights").unwrap();

    let server = Server::start_with_env(dir.path(), "second.log", &env).await;
    assert!(!scratch.exists(), "an interrupted job's checkpoints outlive it");
    let status = job_status(&client, &server.url, &id).await;
    assert_eq!(status["state"], "failed", "{status}");
    assert!(status["error"].as_str().unwrap().contains("interrupted by a restart"), "{status}");
    let health: Value = client.get(format!("{}/health", server.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["model_version"], "1");
    assert_eq!(health["indexed_items"], fixtures().len());
    // A new job may start: the slot is not held by the dead one.
    let response = client
        .post(format!("{}/admin/finetune", server.url))
        .bearer_auth(TOKEN)
        .json(&long_job_params())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    server.kill();
}

/// Parameters of a job that trains far longer than any test runs.
fn long_job_params() -> Value {
    json!({"epochs": 1000, "steps_per_epoch": 100000, "p": 4, "k": 2, "validation_fraction": 0.34})
}

/// Stores the labelled fixtures, starts a job that would train for hours and
/// waits until it trains; its id.
pub(crate) async fn start_a_long_job(client: &Client, url: &str) -> String {
    add_labelled_fixtures(client, url).await;
    let response =
        client.post(format!("{url}/admin/finetune")).bearer_auth(TOKEN).json(&long_job_params()).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(120), "the job to train", || async {
        let status = job_status(client, url, &id).await;
        if status["state"] == "training" {
            Ok(())
        } else {
            Err(status.to_string())
        }
    })
    .await;
    id
}

/// `(label, png bytes)` of a folder whose sub-folders are labels.
fn labelled_folder(path: &str) -> Vec<(String, Vec<u8>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let mut out = Vec::new();
    for class in std::fs::read_dir(&root).expect("fixture folder") {
        let class = class.unwrap().path();
        let label = class.file_name().unwrap().to_string_lossy().to_string();
        for file in std::fs::read_dir(&class).unwrap() {
            out.push((label.clone(), std::fs::read(file.unwrap().path()).unwrap()));
        }
    }
    out.sort();
    out
}

/// Recall@1 and MAP@R of the queries over HTTP, R = gallery images of the query's label.
async fn retrieval(
    app: &TestApp,
    queries: &[(String, Vec<u8>)],
    per_label: &std::collections::HashMap<String, usize>,
) -> (f64, f64) {
    let (mut recall, mut map) = (0.0, 0.0);
    for (label, bytes) in queries {
        let r = per_label[label];
        let found: Value = app.search_raw(bytes, &r.to_string(), "image/png").await.json().await.unwrap();
        let relevant: Vec<bool> =
            found["results"].as_array().unwrap().iter().map(|h| h["label"] == label.as_str()).collect();
        recall += f64::from(u8::from(relevant[0]));
        let (mut hits, mut precision_sum) = (0.0, 0.0);
        for (rank, is_relevant) in relevant.iter().enumerate() {
            if *is_relevant {
                hits += 1.0;
                precision_sum += hits / (rank + 1) as f64;
            }
        }
        map += precision_sum / r as f64;
    }
    (recall / queries.len() as f64, map / queries.len() as f64)
}

/// The claim at test scale (committed fixtures, `bench/finetune.py`
/// measures it at scale): labelled images of the classes the bundled model
/// never saw (7-9) plus a few of the seen ones; queries are unseen-class test
/// images not in the gallery. One fine-tune raises their MAP@R.
#[tokio::test]
async fn a_finetune_teaches_the_classes_the_model_never_saw() {
    let app = spawn_app_with(|c| (c.admin_token, c.max_k) = (Some(TOKEN.into()), 200)).await;
    let gallery = labelled_folder("tests/fixtures/fmnist-finetune/gallery");
    let queries = labelled_folder("tests/fixtures/fmnist-finetune/queries");
    let mut per_label = std::collections::HashMap::new();
    for (label, bytes) in &gallery {
        assert_eq!(app.add_images(std::slice::from_ref(bytes), Some(label), None).await.status(), 201);
        *per_label.entry(label.clone()).or_insert(0) += 1;
    }
    let (recall_before, map_before) = retrieval(&app, &queries, &per_label).await;

    let params = json!({"epochs": 15, "seed": 0});
    let response = start_job(&app, params).await;
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let (status, _) = wait_for_job(&app.client, &app.address, &id).await;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["result"]["committed"], true, "{status}");

    let (recall_after, map_after) = retrieval(&app, &queries, &per_label).await;
    eprintln!(
        "unseen classes, {} queries: Recall@1 {recall_before:.3} -> {recall_after:.3}, MAP@R {map_before:.3} -> \
         {map_after:.3}; job {:.1} s",
        queries.len(),
        status["elapsed_seconds"].as_f64().unwrap()
    );
    assert!(map_after > map_before + 0.05, "MAP@R {map_before:.3} -> {map_after:.3}");
    app.stop().await;
}

/// `--keep-runs`: finished jobs beyond the newest are forgotten, their
/// records on disk too, as each job ends.
#[tokio::test]
async fn finished_jobs_beyond_keep_runs_are_forgotten() {
    let app = spawn_app_with(|c| {
        c.admin_token = Some(TOKEN.into());
        c.keep_runs = 1;
    })
    .await;
    add_labelled_fixtures(&app.client, &app.address).await;
    let params = json!({"epochs": 1, "p": 4, "k": 2, "validation_fraction": 0.34, "seed": 1});
    let mut ids = Vec::new();
    for _ in 0..2 {
        let started: Value = start_job(&app, params.clone()).await.json().await.unwrap();
        let id = started["id"].as_str().unwrap().to_string();
        wait_for_job(&app.client, &app.address, &id).await;
        ids.push(id);
    }
    let records = || std::fs::read_dir(app.data_dir.join("finetune")).unwrap().flatten().count();
    eventually(Duration::from_secs(30), "one job record left", || async {
        let listed = get_json(&app, "/admin/finetune").await;
        let listed: Vec<&str> = listed["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
        if listed == [ids[1].as_str()] && records() == 1 {
            Ok(())
        } else {
            Err(format!("{listed:?}, {} records", records()))
        }
    })
    .await;
    let gone = admin(app.client.get(app.url(&format!("/admin/finetune/{}", ids[0])))).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    app.stop().await;
}
