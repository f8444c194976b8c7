//! One job from start to end: read its images, train on a blocking thread,
//! save the chosen weights as a version, switch the catalog to it; every
//! step folded into the job's record.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;

use super::data::{PreparedImages, Split};
use super::jobs::{Job, JobRecord, JobResult, JobState};
use super::params::Commit;
use super::train::{self, EpochRecord, TrainData, TrainError, Trainer};
use crate::catalog::{Catalog, CatalogError, Progress, Switched};
use crate::clock::now_millis;
use crate::lifecycle::ports::{Fence, PortError};
use crate::lifecycle::{Finishing, LifecycleError, ModelLifecycle};
use crate::manifest::Manifest;
use crate::registry::ModelVersion;

/// Step losses kept in a job's record (the most recent ones).
const MAX_STEP_LOSSES: usize = 5000;
/// Images read from the store at a time while a job prepares its data: the
/// store is held for one chunk at a time (searches and uploads go on in
/// between), and only one chunk's original bytes are in memory. Small, since
/// photos can be large: 32 images of 8 MiB held SQLite for long enough to
/// stall a search for close to a second (`make bench-finetune-start`).
const READ_CHUNK: usize = 4;

/// Why a job stopped before its end.
enum Stop {
    /// With the version saved before the cancel, if any.
    Cancelled(Option<String>),
    Failed(RunError),
}

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("scratch folder: {0}")]
    Scratch(std::io::Error),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("{0}")]
    Lifecycle(#[from] LifecycleError),
    #[error("{0}")]
    Train(TrainError),
    #[error("the training thread failed: {0}")]
    Thread(tokio::task::JoinError),
    #[error("saved version {version}, but switching to it failed: {source}")]
    Switch { version: String, source: LifecycleError },
}

impl From<RunError> for Stop {
    fn from(error: RunError) -> Self {
        Self::Failed(error)
    }
}

/// What a job runs with.
pub(super) struct Runner {
    pub catalog: Catalog,
    pub lifecycle: ModelLifecycle,
    pub trainer: Trainer,
    pub job: Arc<Job>,
    /// The lifecycle lock the job runs under: losing it cancels the job,
    /// which then ends failed, saying why.
    pub fence: Fence,
    /// Marked just before the job answers as ended.
    pub finishing: Finishing,
}

impl Runner {
    /// Runs the job to its end, recording how it ended.
    pub async fn run(&self, base: ModelVersion, split: Split, scratch: &Path) {
        let job = &self.job;
        let (fence, watched) = (self.fence.clone(), job.clone());
        let watch = tokio::spawn(async move {
            if fence.wait_lost().await.is_some() {
                watched.cancel();
            }
        });
        let outcome = self.steps(base, split, scratch).await;
        watch.abort();
        self.finishing.mark();
        match outcome {
            Ok(result) => job.finish(JobState::Done, Some(result), None),
            Err(Stop::Cancelled(version)) if self.fence.lost().is_some() => {
                let lost = PortError::LockLost(self.fence.lost().unwrap_or_default());
                let saved = version.map(|v| format!("; version {v} is saved and can be activated")).unwrap_or_default();
                job.finish(JobState::Failed, None, Some(format!("{lost}{saved}")))
            }
            Err(Stop::Cancelled(version)) => {
                let why = if job.shutdown.load(Ordering::Relaxed) { "stopped by a shutdown" } else { "cancelled" };
                let reason = match &version {
                    Some(v) => format!("{why} before the swap; version {v} is saved and can be activated"),
                    None => format!("{why}; nothing was swapped"),
                };
                job.finish(JobState::Cancelled, Some(JobResult { committed: false, version, reason }), None)
            }
            Err(Stop::Failed(error)) => job.finish(JobState::Failed, None, Some(error.to_string())),
        }
    }

    async fn steps(&self, base: ModelVersion, split: Split, scratch: &Path) -> Result<JobResult, Stop> {
        let job = &self.job;
        job.set_state(JobState::Training);
        std::fs::create_dir_all(scratch).map_err(RunError::Scratch)?;
        let prepared = self.prepare(&split).await?;
        let trained = self.train(&base, prepared, scratch).await?;
        let params = job.record().params;
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
        let manifest = new_manifest(&job.record(), &base, &trained, &chosen.0);
        let version = self.lifecycle.save_version(chosen.1.clone(), manifest).await.map_err(RunError::Lifecycle)?;
        tracing::info!(version = %version.version, parent = %base.version, "fine-tuned model saved");
        let saved = version.version.clone();
        job.update(true, |r, _| r.saved_version = Some(saved.clone()));
        let switched = self.switch(version).await.map_err(|source| match source.is_cancelled() {
            true => Stop::Cancelled(Some(saved.clone())),
            false => Stop::Failed(RunError::Switch { version: saved.clone(), source }),
        })?;
        let reason = format!(
            "validation Recall@1 {:.4} -> {:.4}, MAP@R {:.4} -> {:.4}; {} images re-embedded, {} indexed{}",
            trained.before.recall_at_1,
            chosen.0.validation.recall_at_1,
            trained.before.map_at_r,
            chosen.0.validation.map_at_r,
            switched.embedded,
            switched.items,
            unembeddable_note(&switched.unembeddable)
        );
        Ok(JobResult { committed: true, version: Some(saved), reason })
    }

    /// Reads and preprocesses the split's images a chunk at a time; an item
    /// deleted since the split, or one that no longer decodes, is left out.
    async fn prepare(&self, split: &Split) -> Result<PreparedImages, Stop> {
        let preprocessor = self.catalog.preprocessor();
        let mut prepared = PreparedImages::default();
        for (members, is_train) in [(&split.train, true), (&split.validation, false)] {
            for chunk in members.chunks(READ_CHUNK) {
                if self.job.cancel.load(Ordering::Relaxed) {
                    return Err(Stop::Cancelled(None));
                }
                let ids = chunk.iter().map(|(id, _)| *id).collect();
                let images: BTreeMap<i64, Vec<u8>> =
                    self.catalog.images(ids).await.map_err(RunError::Catalog)?.into_iter().collect();
                let (preprocessor, chunk) = (preprocessor.clone(), chunk.to_vec());
                prepared = tokio::task::spawn_blocking(move || {
                    for (id, label) in chunk {
                        if let Some(image) = images.get(&id).and_then(|bytes| preprocessor.prepare(bytes).ok()) {
                            prepared.push(&image.pixels, label, is_train);
                        }
                    }
                    prepared
                })
                .await
                .map_err(RunError::Thread)?;
            }
        }
        Ok(prepared)
    }

    /// Trains on a blocking thread.
    async fn train(
        &self,
        base: &ModelVersion,
        prepared: PreparedImages,
        scratch: &Path,
    ) -> Result<train::Outcome, Stop> {
        let preprocessor = self.catalog.preprocessor();
        let (job, trainer, encoder, scratch) =
            (self.job.clone(), self.trainer.clone(), base.encoder_path(), scratch.to_path_buf());
        let trained = tokio::task::spawn_blocking(move || {
            let data = TrainData::new(prepared, &preprocessor)?;
            let params = job.record().params;
            let mut report = |event: train::Event| on_event(&job, event);
            train::train(&trainer, &encoder, &data, &params, &scratch, &mut report, &job.cancel)
        })
        .await
        .map_err(RunError::Thread)?;
        trained.map_err(|e| match e {
            TrainError::Cancelled => Stop::Cancelled(None),
            other => Stop::Failed(RunError::Train(other)),
        })
    }

    /// Re-embeds and swaps, reporting progress into the job.
    async fn switch(&self, version: ModelVersion) -> Result<Switched, LifecycleError> {
        let job = &self.job;
        job.set_state(JobState::ReEmbedding);
        let started = Instant::now();
        let progress = |step: Progress| {
            let rate = step.embedded as f64 / started.elapsed().as_secs_f64().max(1e-3);
            job.update(false, |_, live| {
                live.reembedding = Some(step);
                live.eta_seconds = Some((step.to_embed - step.embedded) as f64 / rate.max(1e-3));
            });
        };
        let swapping = || job.set_state(JobState::Swapping);
        self.lifecycle.switch_to(version, &progress, &swapping, &job.cancel).await
    }
}

/// For a job's result: how many stored items the new model could not preprocess, and which.
fn unembeddable_note(ids: &[i64]) -> String {
    if ids.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = ids.iter().take(20).map(i64::to_string).collect();
    let more = if ids.len() > shown.len() { ", ..." } else { "" };
    format!(
        "; {} stored images could not be preprocessed and are not searchable (ids {}{more})",
        ids.len(),
        shown.join(", ")
    )
}

/// Folds a training event into the job's record.
fn on_event(job: &Job, event: train::Event) {
    match event {
        train::Event::Started { before, steps_per_epoch } => job.update(true, |r, _| {
            r.validation.before = Some(before);
            r.validation.latest = Some(before);
            r.steps_per_epoch = steps_per_epoch;
        }),
        train::Event::Step { epoch, step, loss, seconds_per_step } => job.update(false, |r, live| {
            (r.epoch, r.step) = (epoch, step);
            r.step_losses.push(loss);
            if r.step_losses.len() > MAX_STEP_LOSSES {
                r.step_losses.remove(0);
            }
            let steps_left = (r.epochs - epoch) * r.steps_per_epoch + (r.steps_per_epoch - step);
            live.eta_seconds = Some(steps_left as f64 * seconds_per_step);
        }),
        train::Event::Epoch(record) => job.update(true, |r, _| {
            r.validation.latest = Some(record.validation);
            let best = r.validation.best.or(r.validation.before);
            if best.is_none_or(|b| record.validation.beats(&b, r.params.select_by)) {
                r.validation.best = Some(record.validation);
            }
            r.history.push(record);
        }),
    }
}

/// The manifest of the chosen weights: the parent's, with the parent, the
/// job's parameters and figures, and the recalibrated verification threshold.
fn new_manifest(job: &JobRecord, base: &ModelVersion, trained: &train::Outcome, chosen: &EpochRecord) -> Manifest {
    let mut manifest = base.manifest.clone();
    manifest.trained = true;
    manifest.verification_threshold = Some(chosen.validation.threshold);
    // Calibrated for the parent's space: a job pulls class-mates together, so
    // it no longer holds (`--near-duplicate-distance` still sets one).
    manifest.near_duplicate_distance = None;
    // The parent's training and evaluation figures do not describe this model.
    manifest.extra.remove("training");
    manifest.extra.remove("evaluation");
    manifest.extra.remove("encoder_sha256");
    manifest.extra.insert("parent".into(), json!(base.version));
    manifest.extra.insert(
        "finetune".into(),
        json!({
            "job": job.id,
            "created_at": now_millis(),
            "params": job.params,
            "data": job.data,
            "validation_before": trained.before,
            "validation_after": chosen.validation,
            "epoch": chosen.epoch,
            "stopped_early": trained.stopped_early,
            "history": job.history,
            "train_seconds": job.elapsed_seconds,
        }),
    );
    manifest
}
