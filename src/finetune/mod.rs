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

use crate::catalog::{Catalog, CatalogError};
use crate::clock::now_millis;
use crate::lifecycle::{LifecycleError, ModelLifecycle, PortError, SlotHolder, POLL};
use jobs::JobBook;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Data(#[from] SplitError),
    #[error("invalid parameters: {0}")]
    Params(#[from] InvalidParams),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("job records: {0}")]
    Io(#[from] std::io::Error),
}

impl From<PortError> for JobError {
    fn from(e: PortError) -> Self {
        Self::Lifecycle(e.into())
    }
}

/// Step losses per job in a list of jobs (up to 5,000 each in a job's own status).
const LISTED_LOSSES: usize = 200;

/// At most `most` values: the means of equal runs of consecutive ones.
fn thinned(values: &[f64], most: usize) -> Vec<f64> {
    if values.len() <= most {
        return values.to_vec();
    }
    let run = values.len().div_ceil(most);
    values.chunks(run).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect()
}

/// How jobs run, and how many are remembered.
#[derive(Clone)]
pub struct JobSettings {
    pub trainer: Trainer,
    /// Bytes a job's prepared images may take (`--finetune-memory-mib`).
    pub memory_budget: usize,
    /// Finished jobs whose records are kept (`--keep-runs`).
    pub keep_runs: usize,
}

impl JobSettings {
    /// The most images a job may prepare at `input_len` values each: its
    /// `max_images`, or fewer when the memory budget says so (at least 4).
    fn max_images(&self, params: &FinetuneParams, input_len: usize) -> usize {
        let within_budget = self.memory_budget / (input_len * std::mem::size_of::<f32>()).max(1);
        params.max_images.min(within_budget).max(4)
    }
}

/// Starts, lists and stops fine-tune jobs over one catalog.
#[derive(Clone)]
pub struct Jobs {
    book: JobBook,
    catalog: Catalog,
    lifecycle: ModelLifecycle,
    settings: JobSettings,
}

impl Jobs {
    /// Reads the job records in `dir` (see `JobBook::open` for jobs a stop
    /// interrupted), keeping the newest `keep_runs` finished ones.
    pub fn open(
        dir: &Path,
        catalog: Catalog,
        lifecycle: ModelLifecycle,
        settings: JobSettings,
    ) -> Result<Self, JobError> {
        let active = catalog.active_version().version;
        let book = JobBook::open(dir, &active, lifecycle.runs().clone())?;
        book.prune(settings.keep_runs);
        let jobs = Self { book, catalog, lifecycle, settings };
        tokio::spawn(jobs.clone().follow_cancels());
        Ok(jobs)
    }

    /// Cancels the running job when it was asked to through another replica.
    async fn follow_cancels(self) {
        loop {
            tokio::time::sleep(POLL).await;
            let Some(SlotHolder::Job(id)) = self.lifecycle.slot_holder() else { continue };
            match self.lifecycle.runs().cancel_requested(&id).await {
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

    /// A job of any replica, by id (this process's first, as it stands now).
    pub async fn status(&self, id: &str) -> Result<Option<JobStatus>, JobError> {
        if let Some(job) = self.book.get(id) {
            return Ok(Some(job.status()));
        }
        Ok(self.lifecycle.runs().get(id).await?)
    }

    /// Every replica's jobs, newest first.
    pub async fn list(&self) -> Result<Vec<JobStatus>, JobError> {
        let mut all: Vec<JobStatus> = self.lifecycle.runs().list().await?;
        for job in self.book.list() {
            // This process's running job as it stands now; its finished ones
            // as the log has them, and from disk those it no longer holds.
            let recorded = all.iter().position(|r| r.record.id == job.record.id);
            match recorded {
                Some(at) if !job.record.state.is_finished() => all[at] = job,
                Some(_) => {}
                None => all.push(job),
            }
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.record.created_at));
        for status in &mut all {
            status.record.step_losses = thinned(&status.record.step_losses, LISTED_LOSSES);
        }
        Ok(all)
    }

    /// Asks job `id` to stop, here or on the replica running it (within a
    /// `POLL`); false when no replica knows it.
    pub async fn cancel(&self, id: &str) -> Result<bool, JobError> {
        if let Some(job) = self.book.get(id) {
            job.cancel();
            return Ok(true);
        }
        Ok(self.lifecycle.runs().request_cancel(id).await?)
    }

    /// Checks the parameters and the data, then starts a job in the background.
    /// Runs on a task of its own: a client that goes away while the job is
    /// being recorded leaves it started, not queued forever.
    pub async fn start(&self, params: FinetuneParams) -> Result<JobStatus, JobError> {
        let jobs = self.clone();
        tokio::spawn(async move { jobs.start_here(params).await }).await.map_err(LifecycleError::from)?
    }

    async fn start_here(&self, params: FinetuneParams) -> Result<JobStatus, JobError> {
        params.validate()?;
        let id = uuid::Uuid::new_v4().to_string();
        let slot = self.lifecycle.claim(SlotHolder::Job(id.clone())).await?;
        let labelled = self.catalog.labelled().await?;
        let mut rng = StdRng::seed_from_u64(params.seed);
        let max_images = self.settings.max_images(&params, self.catalog.preprocessor().input_len());
        let split = data::split(&labelled, params.labels.as_deref(), params.validation_fraction, max_images, &mut rng)?;
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
        // Readable on every replica once this one has answered.
        if let Err(error) = self.lifecycle.runs().record(&job.status()).await {
            job.finish(JobState::Failed, None, Some(format!("could not record the job: {error}")));
            return Err(error.into());
        }
        tracing::info!(job = %id, base = %base.model, data = ?split.summary, "fine-tune job queued");
        let runner = run::Runner {
            catalog: self.catalog.clone(),
            lifecycle: self.lifecycle.clone(),
            trainer: self.settings.trainer.clone(),
            job: job.clone(),
            fence: slot.fence(),
            finishing: slot.finishing(),
        };
        let (scratch, runs, ended) = (self.book.scratch(&id), self.lifecycle.runs().clone(), job.clone());
        let (book, keep) = (self.book.clone(), self.settings.keep_runs);
        tokio::spawn(async move {
            // Awaited by a second task, so that even a job that panics ends failed and frees the slot.
            let run = tokio::spawn({
                let scratch = scratch.clone();
                async move { runner.run(base, split, &scratch).await }
            });
            if let Err(error) = run.await {
                slot.finishing().mark();
                ended.finish(JobState::Failed, None, Some(format!("the job's task failed: {error}")));
            }
            let _ = std::fs::remove_dir_all(&scratch);
            runs.record_final(&ended.status()).await;
            drop(slot);
            book.prune(keep);
        });
        Ok(job.status())
    }

    /// At shutdown: asks the running job, if any, to stop, and waits up to
    /// `grace` for it (or an activation) to end and record how. A job stops
    /// at its next training step, or before its swap; past the grace it is
    /// abandoned, and the next start records it failed. Returns whether the
    /// slot was free in time.
    pub async fn stop_running(&self, grace: Duration) -> bool {
        if let Some(SlotHolder::Job(id)) = self.lifecycle.slot_holder() {
            if let Some(job) = self.book.get(&id) {
                tracing::info!(job = %id, "stopping the fine-tune job for shutdown");
                job.shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
                job.cancel();
            }
        }
        let deadline = Instant::now() + grace;
        while self.lifecycle.slot_holder().is_some() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{thinned, FinetuneParams, JobSettings, Trainer};

    #[test]
    fn a_job_prepares_no_more_images_than_its_memory_budget_holds() {
        let settings = |mib: usize| JobSettings {
            trainer: Trainer { device: "cpu".parse().unwrap(), threads: 1 },
            memory_budget: mib << 20,
            keep_runs: 100,
        };
        let params = FinetuneParams { max_images: 200_000, ..FinetuneParams::default() };
        let at_96_px = 3 * 96 * 96; // 110,592 bytes an image
        assert_eq!(settings(2048).max_images(&params, at_96_px), 19_418, "2 GiB, not 200,000 x 110 KB = 22 GB");
        assert_eq!(settings(2048).max_images(&FinetuneParams::default(), at_96_px), 19_418);
        assert_eq!(settings(1).max_images(&params, 3 * 224 * 224), 4, "never below 4");
        let few = FinetuneParams { max_images: 100, ..FinetuneParams::default() };
        assert_eq!(settings(2048).max_images(&few, at_96_px), 100, "the job's own bound when it is lower");
    }

    #[test]
    fn losses_in_lists_are_thinned_to_means_of_runs() {
        let losses: Vec<f64> = (0..5000).map(f64::from).collect();
        let listed = thinned(&losses, 200);
        assert_eq!(listed.len(), 200);
        assert_eq!((listed[0], listed[199]), (12.0, 4987.0), "means of 25 consecutive steps");
        assert_eq!(thinned(&[1.0, 2.0], 200), vec![1.0, 2.0]);
    }
}
