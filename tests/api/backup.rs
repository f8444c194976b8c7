//! `lookalike backup` of a serving embedded service under write load, and
//! `lookalike restore`: every upload acknowledged before the backup began is
//! restored and found by its own image; a damaged archive or a non-empty
//! folder is refused, and a refused restore leaves nothing behind.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use lookalike::manifest::FASHION_MODEL_DIR;

use crate::crash::unique_image;
use crate::support::{config, fixtures, spawn_app, spawn_with};

/// Runs the binary with `args`; its exit success and its stdout and stderr.
fn lookalike(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lookalike")).args(args).output().expect("the binary runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// An acknowledged upload: its id and its bytes.
type Uploaded = (i64, Vec<u8>);

fn restore(archive: &Path, into: &Path) -> (bool, String) {
    let (archive, into) = (archive.to_str().unwrap(), into.to_str().unwrap());
    lookalike(&["restore", archive, "--data-dir", into, "--model", FASHION_MODEL_DIR])
}

#[tokio::test]
async fn a_backup_under_write_load_restores_every_acknowledged_upload() {
    let app = Arc::new(spawn_app().await);
    let base = fixtures();
    let acknowledged: Arc<Mutex<Vec<Uploaded>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (app, acknowledged, stop) = (app.clone(), acknowledged.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let image = unique_image(&base[n % base.len()].1, n);
                let response = app.add_images(std::slice::from_ref(&image), Some("load"), None).await;
                assert_eq!(response.status(), 201);
                let id = response.json::<Value>().await.unwrap()["items"][0]["id"].as_i64().unwrap();
                acknowledged.lock().unwrap().push((id, image));
                n += 1;
            }
        })
    };
    while acknowledged.lock().unwrap().len() < 30 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A models/ACTIVE file (naming the bundled version) must come through the backup
    // unharmed, in the archive and in the live folder.
    let active = app.data_dir.join("models").join("ACTIVE");
    std::fs::create_dir_all(active.parent().unwrap()).unwrap();
    std::fs::write(&active, "1").unwrap();

    // The backup runs while the writer goes on.
    let before: Vec<Uploaded> = acknowledged.lock().unwrap().clone();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("gallery.tar");
    let (data, to) = (app.data_dir.display().to_string(), archive.display().to_string());
    let (ok, output) =
        tokio::task::spawn_blocking(move || lookalike(&["backup", "--data-dir", &data, "--to", &to])).await.unwrap();
    assert!(ok, "{output}");
    assert_eq!(std::fs::read_to_string(&active).unwrap(), "1", "the live ACTIVE is untouched");
    let during = acknowledged.lock().unwrap().len() - before.len();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    // Uploads usually go on during the backup (a process start takes longer
    // than an upload); whether one did depends on timing, so it is not asserted.
    eprintln!("{during} uploads acknowledged while the backup ran");
    let (again, output) = lookalike(&[
        "backup",
        "--data-dir",
        &app.data_dir.display().to_string(),
        "--to",
        &archive.display().to_string(),
    ]);
    assert!(!again && output.contains("exists already"), "{output}");

    // Refused: a non-empty folder, and a damaged archive (one byte of an image changed).
    let occupied = work.path().join("occupied");
    std::fs::create_dir_all(&occupied).unwrap();
    std::fs::write(occupied.join("note"), "keep me").unwrap();
    let (ok, output) = restore(&archive, &occupied);
    assert!(!ok && output.contains("not empty"), "{output}");
    assert_eq!(std::fs::read_to_string(occupied.join("note")).unwrap(), "keep me");
    let mut bytes = std::fs::read(&archive).unwrap();
    let image = &before[0].1;
    let at = bytes.windows(image.len()).position(|w| w == image.as_slice()).expect("the image is in the archive");
    bytes[at + image.len() / 2] ^= 0xff;
    let damaged = work.path().join("damaged.tar");
    std::fs::write(&damaged, bytes).unwrap();
    let (ok, output) = restore(&damaged, &work.path().join("from-damaged"));
    assert!(!ok && output.contains("checksum"), "{output}");
    assert!(!work.path().join("from-damaged").exists(), "a refused restore leaves nothing behind");

    // Restored: every upload acknowledged before the backup began, found by its own image.
    let restored = work.path().join("restored");
    let (ok, output) = restore(&archive, &restored);
    assert!(ok, "{output}");
    assert_eq!(std::fs::read_to_string(restored.join("models").join("ACTIVE")).unwrap(), "1");
    let app = Arc::into_inner(app).expect("the writer is done");
    app.stop().await;
    let app = spawn_with(config(&restored)).await;
    let health: Value = app.health().await.json().await.unwrap();
    let listed: Value = app.client.get(app.url("/gallery?limit=500")).send().await.unwrap().json().await.unwrap();
    let stored = listed["items"].as_array().unwrap().len();
    assert!(stored >= before.len() && stored <= before.len() + during, "{stored} items restored");
    assert_eq!(health["indexed_items"].as_u64(), Some(stored as u64), "every restored item is searchable");
    for (id, image) in &before {
        let found: Value = app.search_raw(image, "1", "image/png").await.json().await.unwrap();
        assert_eq!(found["results"][0]["id"].as_i64(), Some(*id), "{found}");
    }
    app.stop().await;
}
