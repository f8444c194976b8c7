//! The jobs this service knows: each job's record (on disk, one JSON file
//! per job), its live state while it runs, and what `GET /admin/finetune`
//! shows of it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::data::DataSummary;
use super::params::FinetuneParams;
use super::train::{EpochRecord, Validation};
use crate::catalog::Progress;
use crate::clock::now_millis;
use crate::files::write_atomic;
use crate::lifecycle::ports::RunKind;
use crate::lifecycle::{RunStatus, Runs};

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

/// What is written to `<id>.json` at every state change and epoch, and read
/// back at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub state: JobState,
    pub params: FinetuneParams,
    /// The version that was active when the job started.
    pub base_version: String,
    /// The version the chosen weights were saved as, once they are (written
    /// before the switch, so a restart can tell whether the switch happened).
    #[serde(default)]
    pub saved_version: Option<String>,
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
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub elapsed_seconds: f64,
    pub result: Option<JobResult>,
    pub error: Option<String>,
}

/// What only a running job has: it is never written down.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub reembedding: Option<Progress>,
    /// Rough seconds left: training from the measured step time, re-embedding from its rate.
    pub eta_seconds: Option<f64>,
}

/// Everything `GET /admin/finetune/{id}` reports: the record and the live state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    #[serde(flatten)]
    pub record: JobRecord,
    pub reembedding: Option<Progress>,
    pub eta_seconds: Option<f64>,
}

impl RunStatus for JobStatus {
    const KIND: RunKind = RunKind::Job;

    fn id(&self) -> &str {
        &self.record.id
    }

    fn is_running(&self) -> bool {
        !self.record.state.is_finished()
    }

    fn orphan(&mut self, why: &str) {
        self.record.state = JobState::Failed;
        self.record.error = Some(why.to_string());
    }
}

/// A job: its record and live state, and flags that ask it to stop.
pub struct Job {
    state: Mutex<(JobRecord, Live)>,
    pub(super) cancel: AtomicBool,
    /// The cancel came from a shutdown, not from a client.
    pub(super) shutdown: AtomicBool,
    started: Instant,
    path: PathBuf,
    /// Where every change is copied for the other replicas.
    mirror: Runs,
}

impl Job {
    fn new(record: JobRecord, path: PathBuf, mirror: Runs) -> Self {
        Self {
            state: Mutex::new((record, Live::default())),
            cancel: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            started: Instant::now(),
            path,
            mirror,
        }
    }

    pub fn status(&self) -> JobStatus {
        let (mut record, live) = self.state.lock().expect("job state lock").clone();
        if !record.state.is_finished() {
            record.elapsed_seconds = self.started.elapsed().as_secs_f64();
        }
        JobStatus { record, reembedding: live.reembedding, eta_seconds: live.eta_seconds }
    }

    pub fn record(&self) -> JobRecord {
        self.status().record
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Changes the record and the live state; `persist` also writes the
    /// record (state changes, epochs).
    pub(super) fn update(&self, persist: bool, change: impl FnOnce(&mut JobRecord, &mut Live)) {
        let mut guard = self.state.lock().expect("job state lock");
        let (record, live) = &mut *guard;
        change(record, live);
        if record.state.is_finished() {
            record.finished_at.get_or_insert_with(now_millis);
            record.elapsed_seconds = self.started.elapsed().as_secs_f64();
            live.eta_seconds = None;
        }
        if persist {
            if let Err(error) = write_record(&self.path, record) {
                tracing::error!(%error, job = %record.id, "could not write the job record");
            }
        }
        self.mirror.publish(&JobStatus {
            record: record.clone(),
            reembedding: live.reembedding,
            eta_seconds: live.eta_seconds,
        });
    }

    pub(super) fn set_state(&self, state: JobState) {
        self.update(true, |r, _| r.state = state);
        tracing::info!(job = %self.record().id, ?state, "fine-tune job");
    }

    pub(super) fn finish(&self, state: JobState, result: Option<JobResult>, error: Option<String>) {
        self.update(true, |r, _| (r.state, r.result, r.error) = (state, result, error));
        let record = self.record();
        tracing::info!(job = %record.id, ?state, result = ?record.result, error = ?record.error, "fine-tune job finished");
    }
}

/// The jobs this service knows, by id: finished ones from their records,
/// and the running one.
#[derive(Clone)]
pub struct JobBook {
    dir: PathBuf,
    jobs: Arc<Mutex<BTreeMap<String, Arc<Job>>>>,
    mirror: Runs,
}

impl JobBook {
    /// Reads the job records in `dir`. A job that was running when the
    /// service stopped is marked done if the version it saved is the active
    /// one (`active`: the stop came after its swap), failed otherwise.
    pub fn open(dir: &Path, active: &str, mirror: Runs) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut jobs = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            // A job's scratch checkpoints, left by a stop in the middle of it: no job runs yet.
            if path.is_dir() {
                tracing::info!(scratch = %path.display(), "removing an interrupted job's checkpoints");
                fs::remove_dir_all(&path)?;
                continue;
            }
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Some(mut record) = fs::read(&path).ok().and_then(|b| serde_json::from_slice::<JobRecord>(&b).ok())
            else {
                tracing::warn!(record = %path.display(), "skipping an unreadable job record");
                continue;
            };
            if !record.state.is_finished() {
                tracing::warn!(job = %record.id, state = ?record.state, "a fine-tune job was interrupted by a restart");
                settle_interrupted(&mut record, active);
                write_record(&path, &record)?;
            }
            jobs.insert(record.id.clone(), Arc::new(Job::new(record, path, mirror.clone())));
        }
        Ok(Self { dir: dir.into(), jobs: Arc::new(Mutex::new(jobs)), mirror })
    }

    /// Writes a new job's first record and keeps it.
    pub(super) fn add(&self, record: JobRecord) -> std::io::Result<Arc<Job>> {
        let path = self.dir.join(format!("{}.json", record.id));
        write_record(&path, &record)?;
        let job = Arc::new(Job::new(record, path, self.mirror.clone()));
        job.update(false, |_, _| {}); // the other replicas see it from the start
        self.jobs.lock().expect("jobs lock").insert(job.record().id, job.clone());
        Ok(job)
    }

    /// Where a job keeps its checkpoints while it runs.
    pub(super) fn scratch(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("jobs lock").get(id).cloned()
    }

    /// Forgets finished jobs beyond the newest `keep`, records and all;
    /// failures only cost disk.
    pub fn prune(&self, keep: usize) {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        let mut finished: Vec<(u64, String)> = jobs
            .values()
            .map(|job| job.record())
            .filter(|record| record.state.is_finished())
            .map(|record| (record.created_at, record.id))
            .collect();
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for (_, id) in finished.into_iter().skip(keep) {
            if let Some(job) = jobs.remove(&id) {
                if let Err(error) = fs::remove_file(&job.path) {
                    tracing::warn!(%error, job = %id, "could not remove an old job record");
                }
            }
        }
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let jobs: Vec<Arc<Job>> = self.jobs.lock().expect("jobs lock").values().cloned().collect();
        let mut statuses: Vec<JobStatus> = jobs.iter().map(|j| j.status()).collect();
        statuses.sort_by_key(|s| std::cmp::Reverse(s.record.created_at));
        statuses
    }
}

/// How an interrupted job ended, agreeing with which version is active.
fn settle_interrupted(record: &mut JobRecord, active: &str) {
    let was = record.state;
    record.finished_at = Some(now_millis());
    match record.saved_version.clone() {
        Some(version) if version == active => {
            record.state = JobState::Done;
            let reason = format!("interrupted by a restart after its swap while {was:?}; version {version} is active");
            record.result = Some(JobResult { committed: true, version: Some(version), reason });
        }
        Some(version) => {
            record.state = JobState::Failed;
            record.error = Some(format!(
                "interrupted by a restart while {was:?}, before its swap; version {version} is saved and can be activated"
            ));
        }
        None => {
            record.state = JobState::Failed;
            record.error = Some(format!("interrupted by a restart while {was:?}; nothing was swapped"));
        }
    }
}

fn write_record(path: &Path, record: &JobRecord) -> std::io::Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(record).expect("a job record serialises"))
}
