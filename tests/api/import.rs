//! `lookalike import DIR` (the real binary) against a live service: labels
//! from sub-folders, bad files rejected with a reason, a re-run skips
//! everything already stored.

use std::process::Command;

use serde_json::Value;

use crate::support::{fixtures, spawn_app};

fn import(dir: &std::path::Path, url: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_lookalike"))
        .args(["import", "--quiet", "--batch", "4", "--url", url])
        .arg(dir)
        .output()
        .expect("the binary runs");
    assert!(output.status.success(), "import failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn a_folder_is_imported_once_and_a_rerun_skips_it() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().unwrap();
    let fixtures = fixtures();
    for (i, (class, png)) in fixtures.iter().enumerate() {
        let folder = dir.path().join(class);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join(format!("{i}.png")), png).unwrap();
    }
    std::fs::write(dir.path().join("loose.png"), marked(&fixtures[0].1)).unwrap(); // unlabelled
    std::fs::write(dir.path().join("tshirt/broken.png"), b"not an image at all").unwrap();

    let first = tokio::task::spawn_blocking({
        let (dir, url) = (dir.path().to_path_buf(), app.address.clone());
        move || import(&dir, &url)
    })
    .await
    .unwrap();
    let n = fixtures.len();
    assert!(first.contains(&format!("{} added, 0 skipped (already stored), 1 rejected", n + 1)), "{first}");
    assert!(first.contains("broken.png: 415"), "the reason is given: {first}");

    let bags: Value = app.client.get(app.url("/gallery?label=bag")).send().await.unwrap().json().await.unwrap();
    assert_eq!(bags["items"].as_array().unwrap().len(), 3);

    let second = tokio::task::spawn_blocking({
        let (dir, url) = (dir.path().to_path_buf(), app.address.clone());
        move || import(&dir, &url)
    })
    .await
    .unwrap();
    assert!(second.contains(&format!("0 added, {} skipped (already stored), 1 rejected", n + 1)), "{second}");
    let health: Value = app.health().await.json().await.unwrap();
    assert_eq!(health["indexed_items"], n + 1);
}

/// The same picture with one pixel changed: other bytes, a near duplicate.
fn marked(png: &[u8]) -> Vec<u8> {
    let mut img = image::load_from_memory(png).unwrap().to_luma8();
    img.put_pixel(0, 0, image::Luma([255]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

#[tokio::test]
async fn an_import_into_a_service_with_api_keys_sends_its_key() {
    const KEY: &str = "import-test-api-key-0123456789";
    let app = crate::support::spawn_app_with(|c| c.api_key = Some(KEY.into())).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bag")).unwrap();
    for (i, (_, png)) in fixtures().into_iter().take(2).enumerate() {
        std::fs::write(dir.path().join(format!("bag/{i}.png")), png).unwrap();
    }
    let output = tokio::task::spawn_blocking({
        let (dir, url) = (dir.path().to_path_buf(), app.address.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_lookalike"))
                .args(["import", "--quiet", "--url", &url])
                .arg(&dir)
                .env("LOOKALIKE_API_KEY", KEY)
                .output()
                .expect("the binary runs")
        }
    })
    .await
    .unwrap();
    assert!(output.status.success(), "import failed: {}", String::from_utf8_lossy(&output.stderr));
    let listed: Value =
        app.client.get(app.url("/gallery?label=bag")).bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");
    app.stop().await;
}
