//! Fine-tuning jobs: one at a time, in the background, while search keeps
//! serving. A job trains a copy of the active encoder with triplet loss on the
//! labelled gallery (`train`, `loss`), saves it as a new model version when
//! it beats the active one on held-out items, re-embeds the gallery with it at
//! bulk priority and swaps model and index at once (`run`, through the catalog).
//!
//! Every state change is written to `<data>/finetune/<id>.json` (`jobs`); at
//! start, a job a crash or a stop interrupted is marked failed. The swap is
//! atomic by construction (the `ACTIVE` file is the last write), so an
//! interrupted job leaves the old model active, or the new one complete.

mod data;
mod jobs;
mod loss;
pub mod params;
mod run;
mod train;

use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

pub use data::{DataSummary, SplitError};
pub use jobs::{Job, JobRecord, JobResult, JobState, JobStatus, ValidationFigures};
pub use params::{FinetuneParams, InvalidParams};
pub use train::{EpochRecord, Trainer, Validation};

use crate::catalog::{Catalog, CatalogError, SlotHolder};
use crate::clock::now_millis;
use jobs::JobBook;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Data(#[from] SplitError),
    #[error("invalid parameters: {0}")]
    Params(#[from] InvalidParams),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("job records: {0}")]
    Io(#[from] std::io::Error),
}

/// Starts, lists and stops fine-tune jobs over one catalog.
#[derive(Clone)]
pub struct Jobs {
    book: JobBook,
    catalog: Catalog,
    trainer: Trainer,
}

impl Jobs {
    /// Reads the job records in `dir`; see `JobBook::open` for jobs a stop interrupted.
    pub fn open(dir: &Path, catalog: Catalog, trainer: Trainer) -> Result<Self, JobError> {
        let active = catalog.active_version().version;
        let jobs = Self { book: JobBook::open(dir, &active, catalog.cluster())?, catalog, trainer };
        if jobs.catalog.cluster().is_some() {
            tokio::spawn(jobs.clone().follow_cancels());
        }
        Ok(jobs)
    }

    /// Cluster mode: cancels the running job when another replica was asked to.
    async fn follow_cancels(self) {
        let cluster = self.catalog.cluster().expect("cluster mode");
        loop {
            tokio::time::sleep(crate::cluster::POLL).await;
            let Some(SlotHolder::Job(id)) = self.catalog.slot_holder() else { continue };
            match cluster.cancel_requested(&id).await {
                Ok(true) => {
                    if let Some(job) = self.book.get(&id) {
                        tracing::info!(job = %id, "cancel asked through another replica");
                        job.cancel();
                    }
                }
                Ok(false) => {}
                Err(error) => tracing::debug!(%error, "cannot read whether the job was cancelled"),
            }
        }
    }

    /// Cluster mode: a job another replica runs or ran, as it last recorded it.
    pub async fn remote(&self, id: &str) -> Result<Option<serde_json::Value>, JobError> {
        let Some(cluster) = self.catalog.cluster() else { return Ok(None) };
        Ok(cluster.run("job", id).await.map_err(CatalogError::from)?)
    }

    /// Cluster mode: every replica's jobs, newest first; `None` in embedded mode.
    pub async fn cluster_list(&self) -> Result<Option<Vec<serde_json::Value>>, JobError> {
        let Some(cluster) = self.catalog.cluster() else { return Ok(None) };
        Ok(Some(cluster.runs("job").await.map_err(CatalogError::from)?))
    }

    /// Cluster mode: asks the replica running job `id` to cancel it; false when no replica knows it.
    pub async fn cancel_remote(&self, id: &str) -> Result<bool, JobError> {
        let Some(cluster) = self.catalog.cluster() else { return Ok(false) };
        Ok(cluster.request_cancel(id).await.map_err(CatalogError::from)?)
    }

    pub fn get(&self, id: &str) -> Option<std::sync::Arc<Job>> {
        self.book.get(id)
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        self.book.list()
    }

    /// Checks the parameters and the data, then starts a job in the background.
    pub async fn start(&self, params: FinetuneParams) -> Result<JobStatus, JobError> {
        params.validate()?;
        let id = uuid::Uuid::new_v4().to_string();
        let slot = self.catalog.claim(SlotHolder::Job(id.clone())).await?;
        let labelled = self.catalog.labelled().await?;
        let mut rng = StdRng::seed_from_u64(params.seed);
        let split =
            data::split(&labelled, params.labels.as_deref(), params.validation_fraction, params.max_images, &mut rng)?;
        let base = self.catalog.active_version();
        let record = JobRecord {
            id: id.clone(),
            state: JobState::Queued,
            epochs: params.epochs,
            params,
            base_version: base.version.clone(),
            saved_version: None,
            data: split.summary.clone(),
            epoch: 0,
            step: 0,
            steps_per_epoch: 0,
            history: Vec::new(),
            step_losses: Vec::new(),
            validation: ValidationFigures::default(),
            created_at: now_millis(),
            finished_at: None,
            elapsed_seconds: 0.0,
            result: None,
            error: None,
        };
        let job = self.book.add(record)?;
        if let Some(cluster) = self.catalog.cluster() {
            // Readable on every replica once this one has answered.
            let first = serde_json::to_value(job.status()).expect("a job status serialises");
            if let Err(error) = cluster.record_run("job", &id, first).await {
                job.finish(JobState::Failed, None, Some(format!("could not record the job: {error}")));
                return Err(CatalogError::from(error).into());
            }
        }
        tracing::info!(job = %id, base = %base.model, data = ?split.summary, "fine-tune job queued");
        let runner = run::Runner { catalog: self.catalog.clone(), trainer: self.trainer.clone(), job: job.clone() };
        let scratch = self.book.scratch(&id);
        tokio::spawn(async move {
            let _slot = slot;
            runner.run(base, split, &scratch).await;
            let _ = std::fs::remove_dir_all(&scratch);
        });
        Ok(job.status())
    }

    /// At shutdown: asks the running job, if any, to stop, and waits up to
    /// `grace` for it (or an activation) to end and record how. A job stops
    /// at its next training step, or before its swap; past the grace it is
    /// abandoned, and the next start records it failed. Returns whether the
    /// slot was free in time.
    pub async fn stop_running(&self, grace: Duration) -> bool {
        if let Some(SlotHolder::Job(id)) = self.catalog.slot_holder() {
            if let Some(job) = self.book.get(&id) {
                tracing::info!(job = %id, "stopping the fine-tune job for shutdown");
                job.shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
                job.cancel();
            }
        }
        let deadline = Instant::now() + grace;
        while self.catalog.slot_holder().is_some() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}
