//! Fine-tuning jobs: one at a time, in the background, while search keeps
//! serving. A job trains a copy of the active encoder with triplet loss on the
//! labelled gallery (`train`), saves it as a new model version when it beats
//! the active one on held-out items, re-embeds the gallery with it at bulk
//! priority and swaps model and index at once (`Catalog::switch_to`).
//!
//! Every state change is written to `<data>/finetune/<id>.json`; at start, a
//! job a crash or a stop interrupted is marked failed. The swap is atomic by
//! construction (the `ACTIVE` file is the last write), so an interrupted job
//! leaves the old model active, or the new one complete.

mod data;
pub mod params;
mod train;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use data::{DataSummary, SplitError};
pub use params::FinetuneParams;
pub use train::{EpochRecord, Validation};

use crate::catalog::{Catalog, CatalogError, Progress};
use crate::preprocess::Preprocessor;
use crate::registry::ModelVersion;
use params::Commit;

/// Step losses kept in a job's status (the most recent ones).
const MAX_STEP_LOSSES: usize = 5000;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job {0} is still running; wait for it or cancel it")]
    Busy(String),
    #[error("{0}")]
    Data(#[from] SplitError),
    #[error("invalid parameters: {0}")]
    Params(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("job records: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Training,
    ReEmbedding,
    Swapping,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// A job's validation figures: before training, the best epoch, the latest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ValidationFigures {
    pub before: Option<Validation>,
    pub best: Option<Validation>,
    pub latest: Option<Validation>,
}

/// How a finished job ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResult {
    /// Whether the trained encoder became the active model.
    pub committed: bool,
    /// The saved version, if one was saved.
    pub version: Option<String>,
    pub reason: String,
}

/// Everything `GET /admin/finetune/{id}` reports; also the job's record on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    pub params: FinetuneParams,
    /// The version that was active when the job started.
    pub base_version: String,
    pub data: DataSummary,
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub steps_per_epoch: usize,
    /// One record per finished epoch.
    pub history: Vec<EpochRecord>,
    /// Loss of each training step (the latest 5000).
    pub step_losses: Vec<f64>,
    pub validation: ValidationFigures,
    pub reembedding: Option<Progress>,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub elapsed_seconds: f64,
    /// Rough seconds left: training from the measured step time, re-embedding from its rate.
    pub eta_seconds: Option<f64>,
    pub result: Option<JobResult>,
    pub error: Option<String>,
}

/// A job: its status, and a flag that asks it to stop.
pub struct Job {
    status: Mutex<JobStatus>,
    cancel: AtomicBool,
    /// The cancel came from a shutdown, not from a client.
    shutdown: AtomicBool,
    started: Instant,
    record: PathBuf,
}

impl Job {
    pub fn status(&self) -> JobStatus {
        let mut status = self.status.lock().expect("job status lock").clone();
        if !status.state.is_finished() {
            status.elapsed_seconds = self.started.elapsed().as_secs_f64();
        }
        status
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Changes the status; `persist` also writes the record (state changes, epochs).
    fn update(&self, persist: bool, change: impl FnOnce(&mut JobStatus)) {
        let mut status = self.status.lock().expect("job status lock");
        change(&mut status);
        if status.state.is_finished() {
            status.finished_at.get_or_insert_with(now_millis);
            status.elapsed_seconds = self.started.elapsed().as_secs_f64();
            status.eta_seconds = None;
        }
        if persist {
            if let Err(error) = write_record(&self.record, &status) {
                tracing::error!(%error, job = %status.id, "could not write the job record");
            }
        }
    }

    fn set_state(&self, state: JobState) {
        self.update(true, |s| s.state = state);
        tracing::info!(job = %self.status().id, ?state, "fine-tune job");
    }

    fn finish(&self, state: JobState, result: Option<JobResult>, error: Option<String>) {
        self.update(true, |s| (s.state, s.result, s.error) = (state, result, error));
        let status = self.status();
        tracing::info!(job = %status.id, ?state, result = ?status.result, error = ?status.error, "fine-tune job finished");
    }
}

/// The jobs this service knows: finished ones from their records, and at most
/// one running. Model activations share the one-at-a-time slot.
#[derive(Clone)]
pub struct Jobs {
    dir: PathBuf,
    inner: Arc<Mutex<JobsInner>>,
}

#[derive(Default)]
struct JobsInner {
    jobs: BTreeMap<String, Arc<Job>>,
    /// What holds the slot: a job id, or `activation`.
    busy: Option<String>,
}

/// Frees the one-at-a-time slot when dropped.
pub struct Slot {
    jobs: Jobs,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.jobs.inner.lock().expect("jobs lock").busy = None;
    }
}

impl Jobs {
    /// Reads the job records in `dir`; jobs that were running are marked failed.
    pub fn open(dir: &Path) -> Result<Self, JobError> {
        fs::create_dir_all(dir)?;
        let mut jobs = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Some(mut status) = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<JobStatus>(&b).ok())
            else {
                tracing::warn!(record = %path.display(), "skipping an unreadable job record");
                continue;
            };
            if !status.state.is_finished() {
                let was = status.state;
                tracing::warn!(job = %status.id, state = ?was, "a fine-tune job was interrupted by a restart");
                status.state = JobState::Failed;
                status.error = Some(format!("interrupted by a restart while {was:?}; nothing was swapped"));
                status.eta_seconds = None;
                status.finished_at = Some(now_millis());
                write_record(&path, &status)?;
            }
            let job = Job {
                status: Mutex::new(status.clone()),
                cancel: AtomicBool::new(false),
                shutdown: AtomicBool::new(false),
                started: Instant::now(),
                record: path,
            };
            jobs.insert(status.id.clone(), Arc::new(job));
        }
        Ok(Self { dir: dir.into(), inner: Arc::new(Mutex::new(JobsInner { jobs, busy: None })) })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.inner.lock().expect("jobs lock").jobs.get(id).cloned()
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let jobs: Vec<Arc<Job>> = self.inner.lock().expect("jobs lock").jobs.values().cloned().collect();
        let mut statuses: Vec<JobStatus> = jobs.iter().map(|j| j.status()).collect();
        statuses.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        statuses
    }

    /// Takes the one-at-a-time slot for `holder`, or says who has it.
    pub fn claim(&self, holder: &str) -> Result<Slot, JobError> {
        let mut inner = self.inner.lock().expect("jobs lock");
        if let Some(busy) = &inner.busy {
            return Err(JobError::Busy(busy.clone()));
        }
        inner.busy = Some(holder.to_string());
        Ok(Slot { jobs: self.clone() })
    }

    /// At shutdown: asks the running job, if any, to stop, and waits up to
    /// `grace` for it (or an activation) to end and record how. A job stops
    /// at its next training step, or before its swap; past the grace it is
    /// abandoned, and the next start records it failed. Returns whether the
    /// slot was free in time.
    pub async fn stop_running(&self, grace: Duration) -> bool {
        let running = {
            let inner = self.inner.lock().expect("jobs lock");
            inner.busy.as_ref().and_then(|id| inner.jobs.get(id)).cloned()
        };
        if let Some(job) = running {
            tracing::info!(job = %job.status().id, "stopping the fine-tune job for shutdown");
            job.shutdown.store(true, Ordering::Relaxed);
            job.cancel();
        }
        let deadline = Instant::now() + grace;
        while self.inner.lock().expect("jobs lock").busy.is_some() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Checks the parameters and the data, then starts a job in the background.
    pub async fn start(&self, catalog: &Catalog, params: FinetuneParams) -> Result<JobStatus, JobError> {
        params.validate().map_err(JobError::Params)?;
        let id = uuid::Uuid::new_v4().to_string();
        let slot = self.claim(&id)?;
        let labelled = catalog.gallery.labelled().await.map_err(CatalogError::from)?;
        let mut rng = StdRng::seed_from_u64(params.seed);
        let split =
            data::split(&labelled, params.labels.as_deref(), params.validation_fraction, params.max_images, &mut rng)?;
        let base = catalog.active().version.clone();
        let status = JobStatus {
            id: id.clone(),
            state: JobState::Queued,
            epochs: params.epochs,
            params,
            base_version: base.version.clone(),
            data: split.summary.clone(),
            epoch: 0,
            step: 0,
            steps_per_epoch: 0,
            history: Vec::new(),
            step_losses: Vec::new(),
            validation: ValidationFigures::default(),
            reembedding: None,
            created_at: now_millis(),
            finished_at: None,
            elapsed_seconds: 0.0,
            eta_seconds: None,
            result: None,
            error: None,
        };
        let record = self.dir.join(format!("{id}.json"));
        write_record(&record, &status)?;
        let job = Arc::new(Job {
            status: Mutex::new(status.clone()),
            cancel: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            started: Instant::now(),
            record,
        });
        self.inner.lock().expect("jobs lock").jobs.insert(id.clone(), job.clone());
        tracing::info!(job = %id, base = %base.model, data = ?split.summary, "fine-tune job queued");
        let (catalog, scratch) = (catalog.clone(), self.dir.join(&id));
        tokio::spawn(async move {
            let _slot = slot;
            run(&catalog, &job, base, split, &scratch).await;
            let _ = fs::remove_dir_all(&scratch);
        });
        Ok(status)
    }
}

/// Runs a job to its end, recording how it ended.
async fn run(catalog: &Catalog, job: &Arc<Job>, base: ModelVersion, split: data::Split, scratch: &Path) {
    match run_steps(catalog, job, base, split, scratch).await {
        Ok(result) => job.finish(JobState::Done, Some(result), None),
        Err(Stop::Cancelled(version)) => {
            let why = if job.shutdown.load(Ordering::Relaxed) { "stopped by a shutdown" } else { "cancelled" };
            let reason = match &version {
                Some(v) => format!("{why} before the swap; version {v} is saved and can be activated"),
                None => format!("{why}; nothing was swapped"),
            };
            job.finish(JobState::Cancelled, Some(JobResult { committed: false, version, reason }), None)
        }
        Err(Stop::Failed(error)) => job.finish(JobState::Failed, None, Some(error)),
    }
}

enum Stop {
    /// With the version saved before the cancel, if any.
    Cancelled(Option<String>),
    Failed(String),
}

async fn run_steps(
    catalog: &Catalog,
    job: &Arc<Job>,
    base: ModelVersion,
    split: data::Split,
    scratch: &Path,
) -> Result<JobResult, Stop> {
    job.set_state(JobState::Training);
    fs::create_dir_all(scratch).map_err(|e| Stop::Failed(format!("scratch folder: {e}")))?;
    let ids: Vec<i64> = split.train.iter().chain(&split.validation).map(|(id, _)| *id).collect();
    let images = catalog.gallery.images(ids).await.map_err(|e| Stop::Failed(e.to_string()))?;
    let preprocessor = catalog.active().preprocess.preprocessor().clone();
    let (job_for_thread, base_for_thread, scratch) = (job.clone(), base.clone(), scratch.to_path_buf());
    let trained = tokio::task::spawn_blocking(move || {
        let data = prepare(&preprocessor, &split, images)?;
        let params = job_for_thread.status().params;
        let mut report = |event: train::Event| on_event(&job_for_thread, event);
        train::train(&base_for_thread.encoder_path(), &data, &params, &scratch, &mut report, &job_for_thread.cancel)
            .map_err(|e| match e {
                train::TrainError::Cancelled => Stop::Cancelled(None),
                other => Stop::Failed(other.to_string()),
            })
    })
    .await
    .map_err(|e| Stop::Failed(format!("the training thread failed: {e}")))??;

    let params = job.status().params;
    let chosen = match (&trained.best, &trained.last, params.commit) {
        (Some(best), _, _) => best.clone(),
        (None, Some(last), Commit::Always) => last.clone(),
        _ => {
            let reason = format!(
                "no epoch beat the active model's validation {} (before: Recall@1 {:.4}, MAP@R {:.4}); \
                 nothing was swapped",
                params.select_by, trained.before.recall_at_1, trained.before.map_at_r
            );
            return Ok(JobResult { committed: false, version: None, reason });
        }
    };
    let version = save_version(catalog, job, &base, &trained, &chosen).map_err(|e| Stop::Failed(e.to_string()))?;
    let saved = version.version.clone();
    job.set_state(JobState::ReEmbedding);
    let started = Instant::now();
    let progress = |step: Progress| {
        let rate = step.embedded as f64 / started.elapsed().as_secs_f64().max(1e-3);
        job.update(false, |s| {
            s.reembedding = Some(step);
            s.eta_seconds = Some((step.to_embed - step.embedded) as f64 / rate.max(1e-3));
        });
    };
    let swapping = || job.set_state(JobState::Swapping);
    match catalog.switch_to(version, &progress, &swapping, &job.cancel).await {
        Ok(switched) => Ok(JobResult {
            committed: true,
            version: Some(saved),
            reason: format!(
                "validation Recall@1 {:.4} -> {:.4}, MAP@R {:.4} -> {:.4}; {} images re-embedded, {} indexed",
                trained.before.recall_at_1,
                chosen.0.validation.recall_at_1,
                trained.before.map_at_r,
                chosen.0.validation.map_at_r,
                switched.embedded,
                switched.items
            ),
        }),
        Err(CatalogError::Cancelled) => Err(Stop::Cancelled(Some(saved))),
        Err(error) => Err(Stop::Failed(format!("saved version {saved}, but switching to it failed: {error}"))),
    }
}

/// Decodes and preprocesses the job's images on the training thread.
fn prepare(
    preprocessor: &Preprocessor,
    split: &data::Split,
    images: Vec<(i64, Vec<u8>)>,
) -> Result<train::TrainData, Stop> {
    let bytes: BTreeMap<i64, Vec<u8>> = images.into_iter().collect();
    let (mut pixels, mut labels, mut train, mut validation) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (set, is_train) in [(&split.train, true), (&split.validation, false)] {
        for (id, label) in set {
            // An item deleted since the split, or one that no longer decodes, is left out.
            let Some(prepared) = bytes.get(id).and_then(|b| preprocessor.prepare(b).ok()) else { continue };
            let position = labels.len();
            pixels.extend_from_slice(&prepared.pixels);
            labels.push(*label);
            if is_train {
                train.push(position)
            } else {
                validation.push(position)
            }
        }
    }
    if validation.is_empty() || train.len() < 4 {
        return Err(Stop::Failed("too few of the selected images could be read".into()));
    }
    let size = preprocessor.size() as i64;
    let images = tch::Tensor::from_slice(&pixels).view([labels.len() as i64, 3, size, size]);
    let spec = preprocessor.spec();
    Ok(train::TrainData { images, labels, train, validation, mean: spec.mean, std: spec.std })
}

/// Folds a training event into the job's status.
fn on_event(job: &Job, event: train::Event) {
    match event {
        train::Event::Started { before, steps_per_epoch } => job.update(true, |s| {
            s.validation.before = Some(before);
            s.validation.latest = Some(before);
            s.steps_per_epoch = steps_per_epoch;
        }),
        train::Event::Step { epoch, step, loss, seconds_per_step } => job.update(false, |s| {
            (s.epoch, s.step) = (epoch, step);
            s.step_losses.push(loss);
            if s.step_losses.len() > MAX_STEP_LOSSES {
                s.step_losses.remove(0);
            }
            let steps_left = (s.epochs - epoch) * s.steps_per_epoch + (s.steps_per_epoch - step);
            s.eta_seconds = Some(steps_left as f64 * seconds_per_step);
        }),
        train::Event::Epoch(record) => job.update(true, |s| {
            s.validation.latest = Some(record.validation);
            let best = s.validation.best.or(s.validation.before);
            if best.is_none_or(|b| record.validation.beats(&b, s.params.select_by)) {
                s.validation.best = Some(record.validation);
            }
            s.history.push(record);
        }),
    }
}

/// Saves the chosen weights as a new version whose manifest records its parent,
/// the job's parameters and figures, and the recalibrated verification threshold.
fn save_version(
    catalog: &Catalog,
    job: &Job,
    base: &ModelVersion,
    trained: &train::Outcome,
    (record, weights): &(EpochRecord, PathBuf),
) -> Result<ModelVersion, crate::registry::RegistryError> {
    let status = job.status();
    let mut manifest = base.manifest.clone();
    manifest.version = catalog.registry.next_version()?;
    manifest.trained = true;
    manifest.verification_threshold = Some(record.validation.threshold);
    // The parent's training and evaluation figures do not describe this model.
    manifest.extra.remove("training");
    manifest.extra.remove("evaluation");
    manifest.extra.remove("encoder_sha256");
    manifest.extra.insert("parent".into(), json!(base.version));
    manifest.extra.insert(
        "finetune".into(),
        json!({
            "job": status.id,
            "created_at": now_millis(),
            "params": status.params,
            "data": status.data,
            "validation_before": trained.before,
            "validation_after": record.validation,
            "epoch": record.epoch,
            "stopped_early": trained.stopped_early,
            "history": status.history,
            "train_seconds": status.elapsed_seconds,
        }),
    );
    let version = catalog.registry.save(weights, &manifest)?;
    tracing::info!(version = %version.version, parent = %base.version, "fine-tuned model saved");
    Ok(version)
}

fn write_record(path: &Path, status: &JobStatus) -> std::io::Result<()> {
    let temp = path.with_extension("partial");
    fs::write(&temp, serde_json::to_vec_pretty(status).expect("a job status serialises"))?;
    fs::rename(&temp, path)
}

fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
