//! Bring your own encoder: a torchvision backbone wrapped by `models/export.py`
//! (its state dict saved to a file and loaded with `--weights`, as a user does
//! with ImageNet weights fetched elsewhere), served, searched and fine-tuned
//! through HTTP. Random weights here: nothing is downloaded.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::support::{fixtures, spawn_app_with, wait_for_job, TOKEN};

pub fn python(args: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join(".venv/bin/python")).args(args).current_dir(root).status().expect("run python");
    assert!(status.success(), "python {args:?} failed");
}

#[tokio::test]
async fn an_exported_torchvision_backbone_serves_searches_and_fine_tunes() {
    let dir = tempfile::tempdir().unwrap();
    let (weights, model) = (dir.path().join("weights.pt"), dir.path().join("model"));
    let (weights_arg, model_arg) = (weights.to_str().unwrap(), model.to_str().unwrap());
    python(&[
        "-c",
        "import sys, torch, torchvision; torch.manual_seed(0); \
         torch.save(torchvision.models.mobilenet_v3_small().state_dict(), sys.argv[1])",
        weights_arg,
    ]);
    python(&[
        "models/export.py",
        "--backbone",
        "mobilenet_v3_small",
        "--weights",
        weights_arg,
        "--size",
        "64",
        "--out",
        model_arg,
    ]);
    let manifest: Value = serde_json::from_slice(&std::fs::read(model.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["architecture"]["name"], "torchvision/mobilenet_v3_small");
    assert_eq!(manifest["embedding"]["dim"], 576, "the head keeps the backbone's feature size");

    let app = spawn_app_with(|c| (c.model, c.admin_token) = (model.clone(), Some(TOKEN.into()))).await;
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["model"], "mobilenet_v3_small@1");
    let all = fixtures();
    for (label, bytes) in &all {
        assert_eq!(app.add_images(std::slice::from_ref(bytes), Some(label), None).await.status(), 201);
    }
    let found = |body: Value| body["results"][0]["score"].as_f64().unwrap();
    let first = app.search_form(&all[0].1, 3).await.json::<Value>().await.unwrap();
    assert!(found(first) > 0.999, "an image finds itself first");

    let params = json!({"epochs": 2, "p": 4, "k": 2, "validation_fraction": 0.34, "commit": "always"});
    let response = app.client.post(app.url("/admin/finetune")).bearer_auth(TOKEN).json(&params).send().await.unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let (status, _) = wait_for_job(&app.client, &app.address, &id).await;
    assert_eq!(
        (status["state"].as_str(), status["result"]["committed"].as_bool()),
        (Some("done"), Some(true)),
        "{status}"
    );
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["model_version"], "2");
    assert_eq!(health["indexed_items"], all.len());
    let again = app.search_form(&all[0].1, 3).await.json::<Value>().await.unwrap();
    assert!(found(again) > 0.999, "the fine-tuned version re-embedded the gallery");
    app.stop().await;
}
