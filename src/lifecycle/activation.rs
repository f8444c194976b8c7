//! Model activations as background runs: `POST /admin/models/{version}/activate`
//! answers `202` at once, the switch goes on by itself (a client that leaves
//! cannot stop it halfway), and its progress and result are read by id.
//! This process's activations are kept in memory, the most recent `KEPT`: a
//! restart ends any that was running, and `ACTIVE` says which version serves.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::ports::RunKind;
use super::runs::RunStatus;
use super::LifecycleError;
use crate::catalog::{Progress, Switched};
use crate::clock::now_millis;

/// Finished activations remembered for `GET /admin/activations`.
const KEPT: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationState {
    Running,
    Done,
    Failed,
}

/// One activation, as `GET /admin/activations/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivationStatus {
    pub id: String,
    pub version: String,
    pub state: ActivationState,
    /// Images of the gallery embedded with the version so far, of those it lacked.
    pub progress: Progress,
    pub result: Option<Switched>,
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub started_at: u64,
    pub finished_at: Option<u64>,
}

impl RunStatus for ActivationStatus {
    const KIND: RunKind = RunKind::Activation;

    fn id(&self) -> &str {
        &self.id
    }

    fn is_running(&self) -> bool {
        self.state == ActivationState::Running
    }

    fn orphan(&mut self, why: &str) {
        self.state = ActivationState::Failed;
        self.error = Some(why.to_string());
    }
}

/// The activations this process has run, newest last.
#[derive(Default)]
pub(super) struct Activations {
    runs: Mutex<VecDeque<watch::Receiver<ActivationStatus>>>,
}

impl Activations {
    /// Random, like job ids: behind a load balancer an id never names another replica's activation.
    pub(super) fn new_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }

    pub(super) fn begin(&self, id: &str, version: &str) -> watch::Sender<ActivationStatus> {
        let status = ActivationStatus {
            id: id.to_string(),
            version: version.to_string(),
            state: ActivationState::Running,
            progress: Progress { embedded: 0, to_embed: 0 },
            result: None,
            error: None,
            started_at: now_millis(),
            finished_at: None,
        };
        let (sender, receiver) = watch::channel(status);
        let mut runs = self.lock();
        runs.push_back(receiver);
        while runs.len() > KEPT {
            runs.pop_front();
        }
        sender
    }

    pub(super) fn find(&self, id: &str) -> Option<watch::Receiver<ActivationStatus>> {
        self.lock().iter().find(|r| r.borrow().id == id).cloned()
    }

    /// Newest first.
    pub(super) fn list(&self) -> Vec<ActivationStatus> {
        self.lock().iter().rev().map(|r| r.borrow().clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<watch::Receiver<ActivationStatus>>> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) fn finish(sender: &watch::Sender<ActivationStatus>, outcome: Result<Switched, LifecycleError>) {
    sender.send_modify(|status| {
        status.finished_at = Some(now_millis());
        match outcome {
            Ok(switched) => {
                status.state = ActivationState::Done;
                status.progress.embedded = status.progress.embedded.max(switched.embedded);
                status.result = Some(switched);
            }
            Err(error) => {
                tracing::error!(%error, version = %status.version, "model activation failed");
                status.state = ActivationState::Failed;
                status.error = Some(error.to_string());
            }
        }
    });
}
