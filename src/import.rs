//! `lookalike import DIR`: adds a folder of images to a running service.
//!
//! It talks to the service over HTTP rather than writing the data directory
//! itself: the service is the single writer of the store and the index, and
//! its batcher embeds the import's requests (sent with `priority=bulk`)
//! behind live traffic, which keeps priority. Files already stored (same bytes) are skipped by the
//! service (`on_duplicate=skip`), so a re-run resumes where one stopped.
//!
//! Layout: images in sub-folders take the sub-folder's name as label (one
//! level; deeper folders belong to their top sub-folder), images at the top
//! are unlabelled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];
/// Attempts for a request answered 503 (the service's queue is full).
const OVERLOAD_RETRIES: u32 = 20;

#[derive(Debug, Clone, Args)]
pub struct ImportConfig {
    /// Folder of images: one sub-folder per label, or images at the top level (unlabelled).
    pub dir: PathBuf,

    /// Base URL of the running service.
    #[arg(long, env = "LOOKALIKE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Images per request (at most the service's --max-images-per-request).
    #[arg(long, default_value_t = 32)]
    pub batch: usize,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,

    /// No progress bar (for logs and scripts).
    #[arg(long)]
    pub quiet: bool,

    /// API key of a service that requires one (the read-write key: importing adds items).
    #[arg(long, env = "LOOKALIKE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// One image file to import.
#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    label: Option<String>,
}

/// What happened to every file.
#[derive(Debug, Default)]
pub struct ImportSummary {
    pub added: usize,
    pub skipped: usize,
    /// `(file, reason)`
    pub rejected: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

impl ImportSummary {
    pub fn render(&self) -> String {
        let total = self.added + self.skipped + self.rejected.len();
        let mut out = format!(
            "{total} files in {:.1} s ({:.0} images/s): {} added, {} skipped (already stored), {} rejected\n",
            self.seconds,
            total as f64 / self.seconds.max(1e-9),
            self.added,
            self.skipped,
            self.rejected.len()
        );
        for (path, reason) in &self.rejected {
            out.push_str(&format!("  rejected {}: {reason}\n", path.display()));
        }
        out
    }
}

/// An HTTP client that sends the API key, when there is one, with every request.
fn client(api_key: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        let mut value =
            reqwest::header::HeaderValue::from_str(key.trim()).context("the API key is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert("api-key", value);
    }
    Ok(reqwest::Client::builder().default_headers(headers).build()?)
}

pub async fn run(config: &ImportConfig) -> anyhow::Result<ImportSummary> {
    let started = Instant::now();
    let sources = discover(&config.dir)?;
    anyhow::ensure!(!sources.is_empty(), "no images ({}) under {}", IMAGE_EXTENSIONS.join(", "), config.dir.display());
    let client = client(config.api_key.as_deref())?;
    let url = config.url.trim_end_matches('/').to_string();
    client
        .get(format!("{url}/health"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("no lookalike service answers at {url} (start it with `lookalike serve`)"))?;

    let progress = progress_bar(sources.len() as u64, config.quiet);
    let batches = batches(sources, config.batch.max(1));
    let outcomes = stream::iter(batches)
        .map(|batch| {
            let (client, url, progress) = (client.clone(), url.clone(), progress.clone());
            async move {
                let n = batch.len() as u64;
                let outcome = import_batch(&client, &url, batch).await;
                progress.inc(n);
                outcome
            }
        })
        .buffer_unordered(config.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    progress.finish_and_clear();

    let mut summary = ImportSummary::default();
    for outcome in outcomes {
        let outcome = outcome?;
        summary.added += outcome.added;
        summary.skipped += outcome.skipped;
        summary.rejected.extend(outcome.rejected);
    }
    summary.rejected.sort();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Image files under `dir`, sorted, with their labels.
fn discover(dir: &Path) -> anyhow::Result<Vec<Source>> {
    anyhow::ensure!(dir.is_dir(), "{} is not a folder", dir.display());
    let mut sources = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if !entry.file_type().is_file() || !is_image {
            continue;
        }
        let relative = path.strip_prefix(dir).unwrap_or(path);
        let label = match relative.components().count() {
            1 => None,
            _ => relative.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()),
        };
        sources.push(Source { path: path.to_path_buf(), label });
    }
    Ok(sources)
}

/// Requests carry one label each (the API applies a label to a whole request).
fn batches(sources: Vec<Source>, size: usize) -> Vec<Vec<Source>> {
    let mut by_label: BTreeMap<Option<String>, Vec<Source>> = BTreeMap::new();
    for source in sources {
        by_label.entry(source.label.clone()).or_default().push(source);
    }
    by_label.into_values().flat_map(|group| group.chunks(size).map(<[Source]>::to_vec).collect::<Vec<_>>()).collect()
}

#[derive(Default)]
struct BatchOutcome {
    added: usize,
    skipped: usize,
    rejected: Vec<(PathBuf, String)>,
}

/// Sends a batch; if the service refuses it for one bad image, sends the
/// images one by one so only the bad ones are rejected.
async fn import_batch(client: &reqwest::Client, url: &str, batch: Vec<Source>) -> anyhow::Result<BatchOutcome> {
    let mut outcome = BatchOutcome::default();
    let mut readable = Vec::new();
    for source in batch {
        match std::fs::read(&source.path) {
            Ok(bytes) => readable.push((source, bytes)),
            Err(e) => outcome.rejected.push((source.path, format!("cannot read: {e}"))),
        }
    }
    if readable.is_empty() {
        return Ok(outcome);
    }
    match post(client, url, &readable).await? {
        Ok(statuses) => count(&mut outcome, &statuses),
        Err(_) if readable.len() > 1 => {
            for single in readable {
                match post(client, url, std::slice::from_ref(&single)).await? {
                    Ok(statuses) => count(&mut outcome, &statuses),
                    Err(reason) => outcome.rejected.push((single.0.path, reason)),
                }
            }
        }
        Err(reason) => outcome.rejected.push((readable.remove(0).0.path, reason)),
    }
    Ok(outcome)
}

fn count(outcome: &mut BatchOutcome, statuses: &[String]) {
    for status in statuses {
        match status.as_str() {
            "skipped" => outcome.skipped += 1,
            _ => outcome.added += 1,
        }
    }
}

/// One `POST /gallery`: `Ok(Ok(statuses))` when stored, `Ok(Err(reason))`
/// when the service refused the images (4xx), `Err` when it cannot be reached
/// or keeps failing. A full queue (503) is retried after `Retry-After`.
async fn post(
    client: &reqwest::Client,
    url: &str,
    images: &[(Source, Vec<u8>)],
) -> anyhow::Result<Result<Vec<String>, String>> {
    for _ in 0..OVERLOAD_RETRIES {
        let mut form = Form::new();
        if let Some(label) = &images[0].0.label {
            form = form.text("label", label.clone());
        }
        for (source, bytes) in images {
            let name = source.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            form = form.part("image", Part::bytes(bytes.clone()).file_name(name));
        }
        let response = client
            .post(format!("{url}/gallery?on_duplicate=skip&priority=bulk"))
            .multipart(form)
            .send()
            .await
            .with_context(|| format!("sending to {url}"))?;
        let status = response.status();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            let items = body["items"].as_array().cloned().unwrap_or_default();
            return Ok(Ok(items.iter().map(|i| i["status"].as_str().unwrap_or("added").to_string()).collect()));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(1))).await;
            continue;
        }
        let message = body["error"]["message"].as_str().unwrap_or("no details").to_string();
        if status.is_client_error() {
            return Ok(Err(format!("{status}: {message}")));
        }
        anyhow::bail!("the service failed ({status}): {message}");
    }
    anyhow::bail!("the service stayed overloaded; try a lower --concurrency")
}

fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {elapsed}")
        .expect("a valid template");
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_folders_are_labels_and_top_level_images_are_unlabelled() {
        let dir = tempfile::tempdir().unwrap();
        for path in ["a.png", "notes.txt", "shoes/x.JPG", "shoes/deep/y.png", "bags/z.webp"] {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
        let found: Vec<(String, Option<String>)> = discover(dir.path())
            .unwrap()
            .into_iter()
            .map(|s| (s.path.file_name().unwrap().to_string_lossy().into_owned(), s.label))
            .collect();
        assert_eq!(
            found,
            vec![
                ("a.png".into(), None),
                ("z.webp".into(), Some("bags".into())),
                ("y.png".into(), Some("shoes".into())),
                ("x.JPG".into(), Some("shoes".into())),
            ]
        );
        let sources = discover(dir.path()).unwrap();
        let sizes: Vec<usize> = batches(sources, 1).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 1, 1, 1]);
    }
}
