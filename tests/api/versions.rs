//! Stored vectors belong to one encoder: a different `encoder.pt` under a
//! reused name and version is re-embedded, never served another encoder's
//! vectors, and one that contradicts its manifest is refused at start.

use std::path::Path;

use lookalike::manifest::{ENCODER_FILE, FASHION_MODEL_DIR};
use lookalike::startup::Application;
use serde_json::Value;

use crate::backbones::python;
use crate::support::{activate, config, fixtures, spawn_with, TOKEN};

/// The Fashion-MNIST model copied to `dir`, its manifest without `encoder_sha256`.
fn unpinned_copy(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let source = Path::new(FASHION_MODEL_DIR);
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(source.join("manifest.json")).unwrap()).unwrap();
    manifest.as_object_mut().unwrap().remove("encoder_sha256");
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    std::fs::copy(source.join(ENCODER_FILE), dir.join(ENCODER_FILE)).unwrap();
}

async fn top_score(app: &crate::support::TestApp, png: &[u8]) -> f64 {
    let body: Value = app.search_raw(png, "1", "image/png").await.json().await.unwrap();
    body["results"][0]["score"].as_f64().unwrap()
}

#[tokio::test]
async fn another_encoder_under_the_same_name_and_version_is_re_embedded_not_reused() {
    let (model, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    unpinned_copy(model.path());
    let with_model = || {
        let mut c = config(data.path());
        c.model = model.path().into();
        c
    };
    let images: Vec<Vec<u8>> = fixtures().into_iter().take(4).map(|(_, png)| png).collect();
    let app = spawn_with(with_model()).await;
    assert_eq!(app.add_images(&images, None, None).await.status(), 201);
    assert!(top_score(&app, &images[0]).await > 0.999);
    app.stop().await;

    // Same name, same version, other weights.
    let encoder = model.path().join(ENCODER_FILE);
    python(&[
        "-c",
        "import sys, torch; torch.manual_seed(0); m = torch.jit.load(sys.argv[1])\n\
         with torch.no_grad():\n    for p in m.parameters(): p.add_(torch.randn_like(p) * 0.1)\n\
         torch.jit.save(m, sys.argv[1])",
        encoder.to_str().unwrap(),
    ]);
    let app = spawn_with(with_model()).await;
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["index_source"], "rebuilt", "the old encoder's index dump is not reloaded: {health}");
    assert_eq!(health["indexed_items"], 4);
    // Each image finds itself as itself: its stored vector comes from this encoder.
    for png in &images {
        assert!(top_score(&app, png).await > 0.999, "a stored vector of the old encoder was served");
    }
    app.stop().await;

    // A manifest that records another encoder's hash is refused, with the reason.
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(model.path().join("manifest.json")).unwrap()).unwrap();
    manifest["encoder_sha256"] = "0".repeat(64).into();
    std::fs::write(model.path().join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let refused = Application::build(with_model()).await.err().expect("a mismatched encoder is refused");
    assert!(format!("{refused:#}").contains("encoder_sha256"), "{refused:#}");
}

/// The Fashion-MNIST model saved into `data_dir` as version 2, as fine-tuning would.
fn saved_copy_as_version_2(data_dir: &Path) {
    saved_copy(data_dir, "2", None);
}

/// The Fashion-MNIST model saved into `data_dir` as `version`, fine-tuned from `parent`.
fn saved_copy(data_dir: &Path, version: &str, parent: Option<&str>) {
    let saved = data_dir.join("models").join(version);
    std::fs::create_dir_all(&saved).unwrap();
    let source = Path::new(FASHION_MODEL_DIR);
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(source.join("manifest.json")).unwrap()).unwrap();
    manifest["version"] = version.into();
    if let Some(parent) = parent {
        manifest["parent"] = parent.into();
    }
    std::fs::write(saved.join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    std::fs::copy(source.join(ENCODER_FILE), saved.join(ENCODER_FILE)).unwrap();
}

/// A PNG of `side` x `side` pixels.
fn png_of_side(side: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(side, side, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test]
async fn an_image_that_no_longer_preprocesses_is_left_out_of_a_switch_and_counted() {
    let data = tempfile::tempdir().unwrap();
    let with_side = |side: u32| {
        let mut c = config(data.path());
        (c.admin_token, c.max_image_side) = (Some(TOKEN.into()), side);
        c
    };
    let app = spawn_with(with_side(4096)).await;
    let small: Vec<Vec<u8>> = fixtures().into_iter().take(3).map(|(_, png)| png).collect();
    assert_eq!(app.add_images(&small, None, None).await.status(), 201);
    let big: Value = app.add_images(&[png_of_side(300)], None, None).await.json().await.unwrap();
    let big = big["items"][0]["id"].as_i64().unwrap();
    app.stop().await;

    // A second version of the model beside the data, then a lower side limit than the big image.
    saved_copy_as_version_2(data.path());
    let app = spawn_with(with_side(128)).await;
    let activation = activate(&app.client, &app.address, "2").await;
    assert_eq!(activation["state"], "done", "{activation}");
    let switched = &activation["result"];
    assert_eq!((switched["items"].as_u64(), switched["unembeddable"].clone()), (Some(3), serde_json::json!([big])));
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!((health["model_version"].as_str(), health["unembeddable_items"].as_u64()), (Some("2"), Some(1)));
    app.stop().await;

    // A restart on that version starts, and says the same.
    let app = spawn_with(with_side(128)).await;
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!((health["indexed_items"].as_u64(), health["unembeddable_items"].as_u64()), (Some(3), Some(1)));
    app.stop().await;
}

/// A job record as a service killed in the middle of a job leaves it.
fn interrupted_record(id: &str, state: &str, saved_version: Option<&str>) -> Value {
    serde_json::json!({
        "id": id, "state": state, "params": lookalike::finetune::FinetuneParams::default(),
        "base_version": "1", "saved_version": saved_version,
        "data": {"labels": ["a", "b"], "train_images": 8, "validation_images": 2, "ignored_labels": []},
        "epoch": 3, "epochs": 3, "step": 10, "steps_per_epoch": 10, "history": [], "step_losses": [],
        "validation": {}, "created_at": 1, "finished_at": null, "elapsed_seconds": 5.0, "result": null, "error": null,
    })
}

#[tokio::test]
async fn an_interrupted_job_is_recorded_as_the_active_version_says() {
    let data = tempfile::tempdir().unwrap();
    // The kill came after job `swapped` made its version 2 active, and before job `early` saved anything.
    saved_copy_as_version_2(data.path());
    std::fs::write(data.path().join("models/ACTIVE"), "2").unwrap();
    let jobs = data.path().join("finetune");
    std::fs::create_dir_all(&jobs).unwrap();
    for (id, state, version) in [("swapped", "swapping", Some("2")), ("early", "training", None)] {
        let record = serde_json::to_vec(&interrupted_record(id, state, version)).unwrap();
        std::fs::write(jobs.join(format!("{id}.json")), record).unwrap();
    }

    let mut c = config(data.path());
    c.admin_token = Some(TOKEN.into());
    let app = spawn_with(c).await;
    let status = |id: &'static str| {
        let request = app.client.get(app.url(&format!("/admin/finetune/{id}"))).bearer_auth(TOKEN);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let swapped = status("swapped").await;
    assert_eq!(
        (swapped["state"].as_str(), swapped["result"]["committed"].as_bool()),
        (Some("done"), Some(true)),
        "{swapped}"
    );
    assert_eq!(swapped["result"]["version"], "2");
    let early = status("early").await;
    assert_eq!(early["state"], "failed", "{early}");
    assert!(early["error"].as_str().unwrap().contains("nothing was swapped"), "{early}");
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["model_version"], "2");
    app.stop().await;
}

/// `DELETE /admin/models/{version}` refuses the bundled, active and
/// rollback-target versions, and frees a deleted version's folder,
/// embeddings and index dump; its number is never given out again.
#[tokio::test]
async fn a_deleted_version_takes_its_embeddings_and_index_with_it() {
    let data = tempfile::tempdir().unwrap();
    saved_copy(data.path(), "2", None);
    saved_copy(data.path(), "3", Some("2"));
    let mut c = config(data.path());
    c.admin_token = Some(TOKEN.into());
    let app = spawn_with(c).await;
    let images: Vec<Vec<u8>> = fixtures().into_iter().take(4).map(|(_, png)| png).collect();
    assert_eq!(app.add_images(&images, None, None).await.status(), 201);
    for version in ["2", "3"] {
        assert_eq!(activate(&app.client, &app.address, version).await["state"], "done");
    }
    let index_folders = |version: &str| {
        let marker = format!("@{version}_");
        let entries = std::fs::read_dir(data.path().join("index")).unwrap().flatten();
        entries.filter(|e| e.file_name().to_string_lossy().contains(&marker)).count()
    };
    assert_eq!(index_folders("3"), 1, "the switch to 3 dumped its index");
    let delete = |version: &'static str| {
        let request = app.client.delete(app.url(&format!("/admin/models/{version}"))).bearer_auth(TOKEN);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    for (version, why) in [("1", "the bundled model"), ("3", "the active version"), ("2", "the rollback target")] {
        let (status, refused) = delete(version).await;
        assert_eq!((status, refused["error"]["code"].as_str()), (409, Some("model_in_use")), "{refused}");
        assert!(refused["error"]["message"].as_str().unwrap().contains(why), "{refused}");
    }
    assert_eq!(delete("9").await.0, 404);

    assert_eq!(activate(&app.client, &app.address, "1").await["state"], "done");
    for version in ["2", "3"] {
        let (status, deleted) = delete(version).await;
        assert_eq!((status, deleted["embeddings_deleted"].as_u64()), (200, Some(4)), "{deleted}");
        assert!(!data.path().join("models").join(version).exists());
        assert_eq!(index_folders(version), 0, "version {version}'s index dump is gone");
    }
    let models: Value =
        app.client.get(app.url("/admin/models")).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    let listed: Vec<&str> =
        models["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap()).collect();
    assert_eq!(listed, ["1"], "{models}");
    assert_eq!(delete("3").await.0, 404, "deleted once");
    assert!(top_score(&app, &images[0]).await > 0.999, "search goes on with the active version");
    app.stop().await;

    // The numbers of deleted versions stay used: the next saved version is 4.
    let registry = lookalike::registry::Registry::new(Path::new(FASHION_MODEL_DIR), data.path());
    assert_eq!(registry.next_version().unwrap(), "4");
}
